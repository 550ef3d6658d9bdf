//! The streaming moderation engine: reads the upstream's chunk stream,
//! decides what to release, and writes SSE frames for the client to a
//! channel.
//!
//! Modes (`moderation.streaming` of the policy):
//! - `window`: text is held until a sentence boundary (`。！？!?.` or a
//!   newline) or `max_hold_chars`; the response so far (with its context) is
//!   classified before the held text is released; the complete response is
//!   classified at the end. Nothing is released before the classification
//!   covering it passed.
//! - `buffer`: the whole response is held and classified once.
//! - `observe`: chunks pass through untouched; the complete response is
//!   classified at the end and only annotated.
//!
//! Mid-stream remedies (`replace`, `block`, `fail_closed`): the flagged and
//! all later text is withheld, the upstream call is dropped, and the safe
//! (or block) reply is sent as a continuation after a blank line, then the
//! final chunk (`finish_reason` `stop` for replace, `content_filter` for
//! block) with the verdict. `retry` is only possible while nothing has been
//! released; later it falls back to `replace`.
//!
//! Output framing: chunks the gateway writes reuse the first upstream
//! chunk's `id`, `created`, `model` and `system_fingerprint`, so the client
//! sees one consistent `chat.completion.chunk` stream ending in `[DONE]`,
//! even across retries. The final chunk carries the `moderation` object.
//! Tool-call deltas are forwarded as they come (they are not text shown to
//! the person); `logprobs` are dropped in window and buffer modes because the
//! text is re-chunked.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::context::{response_text, ChatRequest};
use super::fields::{self, Field};
use super::sink::{Draft, ExchangeOutcome, ExchangeRecord, ExchangeSink, Timings};
use super::verdict::{
    appendix, remedy_finish_reason, remedy_text, Gate, Tally, Verdict, VerdictMeta,
};
use super::{mode_key, ChatUpstream, DataStream, Moderator};
use crate::classifier::Category;
use crate::error::GatewayError;
use crate::policy::{Action, Candidate, PolicyRef, StreamMode, UnknownFields};
use crate::proxy::sse;
use crate::telemetry::RequestProbe;

/// Characters after which held text may be released in window mode.
pub const BOUNDARIES: &[char] = &['。', '！', '？', '!', '?', '.', '\n'];

/// Byte index up to which `pending` is ready for classification: after the
/// last sentence boundary once at least `min_segment` characters are
/// pending (tiny sentences are merged, so a reply of one-character
/// sentences cannot cost one classification each); else, once `max_hold`
/// characters are pending, after `max_hold - HOLD_TAIL` of them (the tail
/// stays held so a word cut by the limit is judged whole with what
/// follows); else none.
pub fn ready_cut(pending: &str, max_hold: usize, min_segment: usize) -> Option<usize> {
    let mut cut = None;
    let mut chars = 0;
    let mut chars_at_cut = 0;
    for (i, ch) in pending.char_indices() {
        chars += 1;
        if BOUNDARIES.contains(&ch) {
            cut = Some(i + ch.len_utf8());
            chars_at_cut = chars;
        }
    }
    if cut.is_some() && chars_at_cut >= min_segment {
        return cut;
    }
    if chars < max_hold.max(1) {
        return None;
    }
    let keep = max_hold.max(1) - hold_tail(max_hold);
    pending
        .char_indices()
        .nth(keep)
        .map(|(i, _)| i)
        .or(Some(pending.len()))
}

/// Characters kept back when held text is released at `max_hold_chars`.
pub fn hold_tail(max_hold: usize) -> usize {
    (max_hold / 2).min(16)
}

/// Shortest window-mode segment (in characters) judged on its own once
/// [`EAGER_SEGMENTS`] checks were made: later sentences shorter than this
/// wait for the next ones, so a reply of one-character sentences costs
/// about one classification per 48 characters, not one per sentence.
pub const MIN_SEGMENT_CHARS: usize = 48;

/// Window-mode checks made sentence by sentence, however short, at the
/// start of a reply (where the time to the first token matters).
pub const EAGER_SEGMENTS: u32 = 4;

/// The minimum segment length after `checks` window checks.
pub fn min_segment(checks: u32) -> usize {
    if checks < EAGER_SEGMENTS {
        1
    } else {
        MIN_SEGMENT_CHARS
    }
}

/// Characters of already released text judged again in front of each new
/// window-mode segment, so a sentence is judged with what came just before
/// it while the work per reply stays linear in its length. Replies shorter
/// than this are judged whole at every step, exactly as in buffer mode.
pub const OVERLAP_CHARS: usize = 200;

/// The texts window mode judges for a reply streamed in small pieces, in order:
/// each segment with its overlap, and whether that text starts at the
/// reply's beginning (the engine's cut and overlap rules, without the
/// stream). Used by `carewall eval --streaming window` to compare window
/// and buffer mode on the same replies.
pub fn window_checks(reply: &str, max_hold: usize) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut released = String::new();
    let mut pending = String::new();
    // The reply arrives in pieces of a few characters, as providers stream.
    let chars: Vec<char> = reply.chars().collect();
    for piece in chars.chunks(8) {
        pending.extend(piece);
        while let Some(cut) = ready_cut(&pending, max_hold, min_segment(out.len() as u32)) {
            let segment: String = pending.drain(..cut).collect();
            let (overlap, whole) = overlap_tail(&released);
            out.push((format!("{overlap}{segment}"), whole));
            released.push_str(&segment);
        }
    }
    if !pending.is_empty() || out.is_empty() {
        let (overlap, whole) = overlap_tail(&released);
        out.push((format!("{overlap}{pending}"), whole));
    }
    out
}

/// The text judged in front of a new segment: the last [`OVERLAP_CHARS`]
/// characters of `released`, starting after a sentence boundary when one
/// falls inside them. Returns the text and whether it is all of `released`
/// (the judged text then starts at the reply's beginning).
pub fn overlap_tail(released: &str) -> (&str, bool) {
    let Some((start, _)) = released.char_indices().rev().nth(OVERLAP_CHARS - 1) else {
        return (released, true);
    };
    if start == 0 {
        return (released, true);
    }
    let tail = &released[start..];
    let after_boundary = tail
        .char_indices()
        .find(|(_, c)| BOUNDARIES.contains(c))
        .map(|(i, c)| i + c.len_utf8())
        .filter(|&i| i < tail.len());
    (after_boundary.map_or(tail, |i| &tail[i..]), false)
}

/// Everything one streamed exchange needs.
pub struct StreamJob {
    pub moderator: Arc<Moderator>,
    pub upstream: Arc<dyn ChatUpstream>,
    pub sink: Arc<dyn ExchangeSink>,
    pub policy: PolicyRef,
    pub mode: StreamMode,
    pub request: ChatRequest,
    pub request_id: String,
    /// When the whole upstream exchange must be over (`upstream.total_timeout_ms`).
    pub deadline: Instant,
    pub started: Instant,
    pub started_at: SystemTime,
    pub upstream_first_byte: Option<Duration>,
    /// `upstream.total_timeout_ms`, for the error message.
    pub total_timeout: Duration,
    /// The request's telemetry (spans, TTFT); [`RequestProbe::none`] in tests.
    pub probe: RequestProbe,
}

/// How the stream ended, for the access log.
#[derive(Debug, Clone)]
pub struct StreamSummary {
    pub verdict: Verdict,
    pub outcome: ExchangeOutcome,
}

struct Gone;

/// The client side: frames written to the response body's channel.
struct Out {
    tx: mpsc::Sender<Bytes>,
    template: Option<Map<String, Value>>,
    fallback_id: String,
    fallback_model: String,
    role_sent: bool,
    delivered: String,
    probe: RequestProbe,
}

impl Out {
    async fn send(&mut self, b: Bytes) -> Result<(), Gone> {
        self.tx.send(b).await.map_err(|_| Gone)
    }

    /// Remember the first upstream chunk's identity fields.
    fn learn(&mut self, chunk: &Value) {
        if self.template.is_some() {
            return;
        }
        let mut m = Map::new();
        for k in [
            "id",
            "object",
            "created",
            "model",
            "system_fingerprint",
            "service_tier",
        ] {
            if let Some(v) = chunk.get(k) {
                m.insert(k.to_string(), v.clone());
            }
        }
        self.template = Some(m);
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Map<String, Value> {
        let mut m = self.template.clone().unwrap_or_default();
        m.entry("id")
            .or_insert_with(|| Value::String(self.fallback_id.clone()));
        m.entry("object")
            .or_insert_with(|| json!("chat.completion.chunk"));
        m.entry("created").or_insert_with(|| {
            json!(SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0))
        });
        m.entry("model")
            .or_insert_with(|| Value::String(self.fallback_model.clone()));
        m.insert(
            "choices".into(),
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]),
        );
        m
    }

    async fn delta(&mut self, mut delta: Map<String, Value>) -> Result<(), Gone> {
        if !self.role_sent {
            delta.insert("role".into(), json!("assistant"));
            self.role_sent = true;
        }
        let c = self.chunk(Value::Object(delta), None);
        self.send(sse::encode(&Value::Object(c).to_string())).await
    }

    async fn text(&mut self, t: &str) -> Result<(), Gone> {
        self.field_text(Field::Content, t).await
    }

    /// Text of one rendered field, as a delta under its own key.
    async fn field_text(&mut self, field: Field, t: &str) -> Result<(), Gone> {
        let Some(key) = field.key() else {
            return Ok(());
        };
        if t.is_empty() {
            return Ok(());
        }
        self.delivered.push_str(t);
        let mut d = Map::new();
        d.insert(key.into(), json!(t));
        self.delta(d).await?;
        self.probe.client_first_token();
        Ok(())
    }

    async fn finish(
        &mut self,
        reason: &str,
        verdict: &Verdict,
        held: Option<Value>,
    ) -> Result<(), Gone> {
        let mut c = match held.and_then(|v| match v {
            Value::Object(m) => Some(m),
            _ => None,
        }) {
            Some(m) => m,
            None => {
                let mut d = Map::new();
                if !self.role_sent {
                    d.insert("role".into(), json!("assistant"));
                    self.role_sent = true;
                }
                self.chunk(Value::Object(d), Some(reason))
            }
        };
        c.insert("moderation".into(), verdict.to_json());
        self.send(sse::encode(&Value::Object(c).to_string())).await
    }

    async fn error(&mut self, e: &GatewayError) -> Result<(), Gone> {
        self.send(sse::encode(&e.body().to_string())).await
    }

    async fn done(&mut self) -> Result<(), Gone> {
        self.send(sse::done()).await
    }
}

enum Step {
    Data(String),
    End,
    Fail(GatewayError),
    Gone,
}

enum AttemptEnd {
    /// Final chunk and `[DONE]` were written.
    Done,
    Retry(Candidate),
    Failed(GatewayError),
    Gone,
}

struct Run<'a> {
    job: &'a StreamJob,
    out: Out,
    tally: Tally,
    meta: VerdictMeta,
    /// Text released to the client in this attempt.
    released: String,
    /// Text received but not yet classified: every rendered field, in the
    /// upstream's order (`moderation::fields`).
    pending: String,
    /// Which field each byte run of `pending` came from.
    pending_fields: Vec<(Field, usize)>,
    /// Tool-call and audio deltas of this attempt, sent once the response
    /// passed and dropped with a remedy.
    held_deltas: Vec<Map<String, Value>>,
    /// Unknown delta keys and stray choices seen (dropped or passed per
    /// the policy's `unknown_fields`).
    unknown: BTreeSet<String>,
    /// The field of the last text received (a change inserts a separator
    /// into the judged text).
    last_field: Option<Field>,
    /// `released.len()` when the last classification covered all of it.
    classified_upto: Option<usize>,
    finish_reason: Option<String>,
    /// Observe mode: the upstream's finish chunk, held for the verdict.
    held_finish: Option<Value>,
    /// Chunks without choices (usage) or after the finish chunk.
    trailing: Vec<Value>,
    /// Upstream text of the current attempt.
    upstream_text: String,
    classify_total: Duration,
    /// The current attempt is a retry (for the classify span's stage).
    retrying: bool,
    /// Rejected drafts of earlier attempts.
    drafts: Vec<Draft>,
}

/// Run one streamed exchange to its end. Frames go to `tx`; when the
/// receiver is dropped (client gone) the upstream stream is dropped too,
/// which cancels the upstream call. The sink gets the record at the end.
pub async fn run(job: StreamJob, first: DataStream, tx: mpsc::Sender<Bytes>) -> StreamSummary {
    let meta = VerdictMeta {
        request_id: job.request_id.clone(),
        policy: job.policy.name.clone(),
        policy_version: job.policy.version.clone(),
        streaming: Some(job.mode),
        classifier: job.moderator.classifier().name().to_string(),
    };
    let mut run = Run {
        job: &job,
        out: Out {
            tx,
            template: None,
            fallback_id: format!("chatcmpl-{}", job.request_id),
            fallback_model: job
                .request
                .model
                .clone()
                .unwrap_or_else(|| "unknown".into()),
            role_sent: false,
            delivered: String::new(),
            probe: job.probe.clone(),
        },
        tally: Tally::default(),
        meta,
        released: String::new(),
        pending: String::new(),
        pending_fields: Vec::new(),
        held_deltas: Vec::new(),
        unknown: BTreeSet::new(),
        last_field: None,
        classified_upto: None,
        finish_reason: None,
        held_finish: None,
        trailing: Vec::new(),
        upstream_text: String::new(),
        classify_total: Duration::ZERO,
        retrying: false,
        drafts: Vec::new(),
    };
    let outcome = run.drive(first).await;
    let mut verdict = run.tally.verdict(&run.meta);
    verdict.unknown_fields = run.unknown.iter().cloned().collect();
    if !run.unknown.is_empty() {
        let action = match job.policy.unknown_fields {
            UnknownFields::Drop => "drop",
            UnknownFields::Pass => "pass",
        };
        job.probe.unknown_fields(action, run.unknown.len() as u64);
    }
    if let ExchangeOutcome::UpstreamFailed = outcome {
        verdict
            .error
            .get_or_insert_with(|| "upstream failed mid-stream".into());
    }
    let record = ExchangeRecord {
        verdict: verdict.clone(),
        outcome,
        model: job.request.model.clone(),
        user: job.request.user.clone(),
        threshold: verdict
            .category
            .and_then(|c| job.policy.rules.get(&c))
            .map(|r| r.threshold),
        stream: true,
        context: job.request.context.clone(),
        upstream_text: std::mem::take(&mut run.upstream_text),
        drafts: std::mem::take(&mut run.drafts),
        delivered_text: std::mem::take(&mut run.out.delivered),
        timings: Timings {
            started_at: job.started_at,
            total: job.started.elapsed(),
            upstream_first_byte: job.upstream_first_byte,
            classify_total: run.classify_total,
        },
        client: job.request.client.clone(),
    };
    job.sink.record(record);
    job.probe.set_verdict(
        verdict.category_label(),
        verdict.action.key(),
        mode_key(verdict.mode),
        &verdict.policy,
    );
    StreamSummary { verdict, outcome }
}

impl Run<'_> {
    async fn drive(&mut self, first: DataStream) -> ExchangeOutcome {
        let mut stream = first;
        loop {
            match self.attempt(&mut stream).await {
                AttemptEnd::Done => return ExchangeOutcome::Completed,
                AttemptEnd::Gone => return ExchangeOutcome::ClientDisconnected,
                AttemptEnd::Failed(e) => {
                    let _ = self.out.error(&e).await;
                    self.tally.error = Some(e.to_string());
                    return ExchangeOutcome::UpstreamFailed;
                }
                AttemptEnd::Retry(c) => {
                    self.drafts.push(Draft {
                        text: self.upstream_text.clone(),
                        scores: self.tally.last_scores,
                        category: c.category,
                        threshold: self.job.policy.rules.get(&c.category).map(|r| r.threshold),
                        action: c.action,
                    });
                    // Dropping the stream cancels the rejected attempt upstream.
                    drop(std::mem::replace(
                        &mut stream,
                        futures::stream::empty().boxed(),
                    ));
                    self.tally.start_retry(&c);
                    self.retrying = true;
                    let body = self
                        .job
                        .request
                        .retry_body(self.job.policy.retry_system_message.as_deref());
                    let opened = tokio::time::timeout_at(
                        self.job.deadline,
                        self.job.upstream.open_stream(body),
                    )
                    .await;
                    match opened {
                        Ok(Ok(s)) => {
                            stream = s;
                            self.reset_attempt();
                        }
                        Ok(Err(e)) => {
                            self.tally.error = Some(format!("retry failed: {e}"));
                            return self.stop_outcome(Action::Replace, Some(c.category)).await;
                        }
                        Err(_) => {
                            self.tally.error = Some("retry failed: upstream total timeout".into());
                            return self.stop_outcome(Action::Replace, Some(c.category)).await;
                        }
                    }
                }
            }
        }
    }

    async fn stop_outcome(
        &mut self,
        action: Action,
        category: Option<Category>,
    ) -> ExchangeOutcome {
        match self.stop(action, category).await {
            AttemptEnd::Gone => ExchangeOutcome::ClientDisconnected,
            _ => ExchangeOutcome::Completed,
        }
    }

    fn reset_attempt(&mut self) {
        self.released.clear();
        self.pending.clear();
        self.pending_fields.clear();
        self.held_deltas.clear();
        self.last_field = None;
        self.classified_upto = None;
        self.finish_reason = None;
        self.held_finish = None;
        self.trailing.clear();
        self.upstream_text.clear();
    }

    /// Add received text to `pending`, remembering which field it came
    /// from; a change of field puts a newline into the judged text (never
    /// sent) so two fields are not read as one word.
    fn push_text(&mut self, pieces: &[(Field, String)]) {
        for (field, t) in pieces {
            if self.last_field.is_some_and(|f| f != *field) {
                self.push_run(Field::Separator, "\n");
            }
            self.last_field = Some(*field);
            self.push_run(*field, t);
        }
    }

    fn push_run(&mut self, field: Field, t: &str) {
        self.pending.push_str(t);
        match self.pending_fields.last_mut() {
            Some((f, n)) if *f == field => *n += t.len(),
            _ => self.pending_fields.push((field, t.len())),
        }
    }

    /// Send the first `cut` bytes of `pending` to the client, each run in
    /// its own field, and drop them from `pending`.
    async fn release(&mut self, cut: usize) -> Result<(), Gone> {
        let text: String = self.pending.drain(..cut).collect();
        let mut at = 0;
        while at < text.len() {
            let Some((field, n)) = self.pending_fields.first_mut() else {
                break;
            };
            let take = (*n).min(text.len() - at);
            let field = *field;
            *n -= take;
            if *n == 0 {
                self.pending_fields.remove(0);
            }
            self.out.field_text(field, &text[at..at + take]).await?;
            at += take;
        }
        Ok(())
    }

    async fn next(&mut self, stream: &mut DataStream) -> Step {
        let closed = self.out.tx.clone();
        tokio::select! {
            biased;
            _ = closed.closed() => Step::Gone,
            r = tokio::time::timeout_at(self.job.deadline, stream.next()) => match r {
                Err(_) => Step::Fail(GatewayError::UpstreamTimeout {
                    phase: "the total",
                    ms: self.job.total_timeout.as_millis() as u64,
                }),
                Ok(None) => Step::End,
                Ok(Some(Ok(d))) => Step::Data(d),
                Ok(Some(Err(e))) => Step::Fail(e),
            },
        }
    }

    /// Classify `reply` (a segment with the overlap before it, or the whole
    /// response) and gate it. `None`: the client went away while waiting.
    /// `last`: the check of the end of the response (not a window).
    /// `whole`: `reply` starts at the response's beginning; otherwise only
    /// the harm categories count (Nonsense and Linguistic Neglect are
    /// judged on the reply's opening, see `classifier::coverage`).
    async fn check(&mut self, reply: &str, last: bool, whole: bool) -> Option<Gate> {
        let observe = self.job.mode == StreamMode::Observe;
        let response = response_text(reply);
        let closed = self.out.tx.clone();
        let stage = if self.retrying {
            "retry"
        } else if self.job.mode == StreamMode::Buffer {
            "buffer"
        } else if last {
            "final"
        } else {
            "window"
        };
        let span = self.job.probe.classification(stage);
        let res = tokio::select! {
            biased;
            _ = closed.closed() => return None,
            r = self.job.moderator.classify(&self.job.request.context, &response) => r,
        };
        let released_any = !self.released.is_empty();
        let gate = match res {
            Ok(mut c) => {
                self.classify_total += c.elapsed;
                if !whole {
                    opening_only(&mut c.scores);
                }
                super::guard(
                    &self.job.policy,
                    &self.job.probe,
                    reply,
                    &mut c.scores,
                    &mut self.tally,
                );
                let d = self.job.policy.decide(&c.scores);
                super::observe_decision(&self.job.probe, span, &self.job.policy.name, &d, &c);
                self.tally
                    .gate(&self.job.policy, &d, c.scores, released_any, observe)
            }
            Err((e, elapsed)) => {
                self.classify_total += elapsed;
                if let Some(span) = span {
                    span.failed(super::error_kind(&e));
                }
                let can_hold = self.job.mode == StreamMode::Window && !last;
                let guard =
                    super::guard_alone(&self.job.policy, &self.job.probe, reply, &mut self.tally);
                self.tally
                    .gate_error(&self.job.policy, &e, guard.as_ref(), observe, can_hold)
            }
        };
        Some(gate)
    }

    async fn attempt(&mut self, stream: &mut DataStream) -> AttemptEnd {
        let observe = self.job.mode == StreamMode::Observe;
        let mut saw_done = false;
        loop {
            let data = match self.next(stream).await {
                Step::Gone => return AttemptEnd::Gone,
                Step::Fail(e) => {
                    self.job
                        .probe
                        .finish_upstream(Some(200), Some("upstream_stream"));
                    return AttemptEnd::Failed(e);
                }
                Step::End => {
                    self.job.probe.finish_upstream(Some(200), None);
                    break;
                }
                Step::Data(d) => d,
            };
            if data.trim() == "[DONE]" {
                self.job.probe.finish_upstream(Some(200), None);
                saw_done = true;
                break;
            }
            let chunk: Value = match serde_json::from_str(&data) {
                Ok(v @ Value::Object(_)) => v,
                _ => {
                    return AttemptEnd::Failed(GatewayError::UpstreamProtocol(
                        "a stream event is not a JSON chunk object".into(),
                    ))
                }
            };
            if let Some(err) = chunk.get("error") {
                let msg = err
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("no message");
                return AttemptEnd::Failed(GatewayError::UpstreamProtocol(format!(
                    "the upstream reported an error mid-stream: {msg}"
                )));
            }
            if self.out.template.is_none() {
                if let Some(m) = chunk.get("model").and_then(Value::as_str) {
                    self.job.probe.set_response_model(m);
                }
            }
            self.out.learn(&chunk);
            if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
                super::observe_usage(&self.job.probe, u);
            }
            let choices = chunk
                .get("choices")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if choices.is_empty() {
                // Usage-only chunks (stream_options.include_usage) go last.
                self.trailing.push(chunk);
                continue;
            }
            // Only choice 0 is the reply (requests with n > 1 are refused);
            // stray choices are never merged into it nor forwarded.
            let index = |c: &Value| c.get("index").and_then(Value::as_u64).unwrap_or(0);
            for c in choices.iter().filter(|c| index(c) != 0) {
                self.unknown.insert(format!("choices[{}]", index(c)));
            }
            let Some(choice) = choices.into_iter().find(|c| index(c) == 0) else {
                continue;
            };
            let parts = match choice.get("delta") {
                Some(Value::Object(d)) => fields::split_delta(d),
                _ => fields::DeltaParts::default(),
            };
            let text: String = parts.text.iter().map(|(_, t)| t.as_str()).collect();
            let finish = choice
                .get("finish_reason")
                .and_then(Value::as_str)
                .map(str::to_string);
            self.upstream_text.push_str(&text);
            if !text.is_empty() {
                self.job.probe.upstream_first_token();
            }

            if observe {
                self.push_text(&parts.text);
                if finish.is_some() {
                    self.finish_reason = finish;
                    self.held_finish = Some(chunk);
                } else if self.held_finish.is_some() {
                    self.trailing.push(chunk);
                } else {
                    self.out.delivered.push_str(&text);
                    if self.out.send(sse::encode(&data)).await.is_err() {
                        return AttemptEnd::Gone;
                    }
                    if !text.is_empty() {
                        self.out.probe.client_first_token();
                    }
                }
                continue;
            }

            if let Some(f) = finish {
                self.finish_reason = Some(f);
            }
            // Tool calls and audio are held with the draft; unknown keys
            // are dropped or passed per the policy; `role` goes at once.
            if !parts.held.is_empty() {
                self.held_deltas.push(parts.held);
            }
            let mut now = Map::new();
            for (k, v) in parts.unknown {
                self.unknown.insert(k.clone());
                if self.job.policy.unknown_fields == UnknownFields::Pass {
                    now.insert(k, v);
                }
            }
            let role_only = parts.passed.contains_key("role") && text.is_empty();
            if (!now.is_empty() || (role_only && !self.out.role_sent))
                && self.out.delta(now).await.is_err()
            {
                return AttemptEnd::Gone;
            }
            if text.is_empty() {
                continue;
            }
            self.push_text(&parts.text);
            if self.job.mode != StreamMode::Window {
                continue;
            }
            while let Some(cut) = ready_cut(
                &self.pending,
                self.job.policy.max_hold_chars,
                min_segment(self.tally.classifications),
            ) {
                let segment: String = self.pending[..cut].to_string();
                let (overlap, whole) = overlap_tail(&self.released);
                let candidate = format!("{overlap}{segment}");
                match self.check(&candidate, false, whole).await {
                    None => return AttemptEnd::Gone,
                    Some(Gate::Hold) => {
                        // Keep it held; the next check (at the latest the
                        // final one) judges it again with what follows.
                        break;
                    }
                    Some(Gate::Release) => {
                        if self.tally.error.is_some() && !self.tally.unjudged {
                            self.tally.recovered();
                        }
                        if self.release(cut).await.is_err() {
                            return AttemptEnd::Gone;
                        }
                        self.released.push_str(&segment);
                        self.classified_upto = Some(self.released.len());
                    }
                    Some(Gate::Retry(c)) => return AttemptEnd::Retry(c),
                    Some(Gate::Stop { action, category }) => {
                        return self.stop(action, category).await
                    }
                }
            }
        }
        if !saw_done && self.finish_reason.is_none() {
            return AttemptEnd::Failed(GatewayError::UpstreamProtocol(
                "the upstream stream ended before the response was complete".into(),
            ));
        }
        self.finish_attempt().await
    }

    async fn finish_attempt(&mut self) -> AttemptEnd {
        let observe = self.job.mode == StreamMode::Observe;
        // Only what no window covered is judged (with the overlap before it).
        let (overlap, whole) = overlap_tail(&self.released);
        let rest = format!("{overlap}{}", self.pending);
        let covered = self.pending.is_empty() && self.classified_upto == Some(self.released.len());
        if !rest.is_empty() && !covered {
            match self.check(&rest, true, whole).await {
                None => return AttemptEnd::Gone,
                Some(Gate::Release) | Some(Gate::Hold) => {}
                Some(Gate::Retry(c)) => return AttemptEnd::Retry(c),
                Some(Gate::Stop { action, category }) => return self.stop(action, category).await,
            }
        }
        if !observe {
            let pending = self.pending.clone();
            if self.release(self.pending.len()).await.is_err() {
                return AttemptEnd::Gone;
            }
            self.released.push_str(&pending);
            for held in std::mem::take(&mut self.held_deltas) {
                if self.out.delta(held).await.is_err() {
                    return AttemptEnd::Gone;
                }
            }
            // JSON mode: a note would break the JSON; the verdict says it.
            if !self.job.request.json_mode {
                let extra = appendix(&self.job.policy, &self.tally.appends, self.job.request.lang);
                if self.out.text(&extra).await.is_err() {
                    return AttemptEnd::Gone;
                }
            }
        }
        let mut verdict = self.tally.verdict(&self.meta);
        verdict.unknown_fields = self.unknown.iter().cloned().collect();
        let reason = self.finish_reason.clone().unwrap_or_else(|| "stop".into());
        let held = self.held_finish.take();
        if self.out.finish(&reason, &verdict, held).await.is_err() {
            return AttemptEnd::Gone;
        }
        for t in std::mem::take(&mut self.trailing) {
            if self.out.send(sse::encode(&t.to_string())).await.is_err() {
                return AttemptEnd::Gone;
            }
        }
        if self.out.done().await.is_err() {
            return AttemptEnd::Gone;
        }
        AttemptEnd::Done
    }

    /// End the response with a remedy: withhold everything not yet
    /// released, send the safe/block reply, the final chunk and `[DONE]`.
    async fn stop(&mut self, action: Action, category: Option<Category>) -> AttemptEnd {
        self.tally.stopped(action, category);
        self.pending.clear();
        self.pending_fields.clear();
        self.held_deltas.clear();
        let text = remedy_text(&self.job.policy, action, self.job.request.lang);
        let reply = if self.released.is_empty() {
            text.to_string()
        } else {
            format!("\n\n{text}")
        };
        // JSON mode: the reply is a refusal, as OpenAI's structured outputs
        // report one, never plain text inside the JSON content.
        let field = if self.job.request.json_mode {
            Field::Refusal
        } else {
            Field::Content
        };
        if self.out.field_text(field, &reply).await.is_err() {
            return AttemptEnd::Gone;
        }
        let mut verdict = self.tally.verdict(&self.meta);
        verdict.unknown_fields = self.unknown.iter().cloned().collect();
        if self
            .out
            .finish(remedy_finish_reason(action), &verdict, None)
            .await
            .is_err()
        {
            return AttemptEnd::Gone;
        }
        if self.out.done().await.is_err() {
            return AttemptEnd::Gone;
        }
        AttemptEnd::Done
    }
}

/// A window-mode check of text that does not start at the reply's
/// beginning: drop Nonsense and Linguistic Neglect (properties of how the
/// whole reply answers the seeker, judged on its opening).
pub fn opening_only(scores: &mut crate::classifier::Scores) {
    for c in [Category::Nonsense, Category::LinguisticNeglect] {
        scores.0[c.id()] = 0.0;
    }
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
