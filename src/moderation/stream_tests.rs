//! Window/buffer/observe engine tests on the paused tokio clock, with a
//! scripted upstream and a keyword classifier that takes a fixed time.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::*;
use crate::classifier::keyword::KeywordClassifier;
use crate::classifier::{Classifier, ClassifyFuture, Pair};
use crate::moderation::context::ChatRequest;
use crate::moderation::{ChatUpstream, DataStream, Moderator, NoopSink};
use crate::policy::{Policy, PolicySet, StreamMode};

const CLASSIFY_MS: u64 = 50;

/// Keyword scores after a fixed delay, so release times are checkable.
struct SlowKeyword;

impl Classifier for SlowKeyword {
    fn classify(&self, pair: Pair) -> ClassifyFuture<'_> {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(CLASSIFY_MS)).await;
            KeywordClassifier.classify(pair).await
        })
    }
    fn name(&self) -> &str {
        "slow-keyword"
    }
}

fn chunk(text: &str) -> String {
    json!({"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]})
    .to_string()
}

fn role_chunk() -> String {
    json!({"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": null}]})
    .to_string()
}

fn finish_chunk() -> String {
    json!({"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    .to_string()
}

/// A reply as upstream events: role, one chunk per piece 10 ms apart,
/// finish, `[DONE]`.
fn reply(pieces: &[&str]) -> Vec<(u64, String)> {
    let mut v = vec![(0, role_chunk())];
    v.extend(pieces.iter().map(|p| (10, chunk(p))));
    v.push((10, finish_chunk()));
    v.push((0, "[DONE]".into()));
    v
}

/// Sets its flag when dropped: shows the upstream stream was dropped.
struct DropFlag(Arc<AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn scripted(events: Vec<(u64, String)>, dropped: Option<Arc<AtomicBool>>) -> DataStream {
    let guard = dropped.map(DropFlag);
    futures::stream::unfold((VecDeque::from(events), guard), |(mut q, g)| async move {
        let (delay, data) = q.pop_front()?;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        Some((Ok(data), (q, g)))
    })
    .boxed()
}

/// Upstream for retries: hands out scripted replies in order and records
/// the bodies it was sent.
#[derive(Default)]
struct Replies {
    next: Mutex<VecDeque<Vec<(u64, String)>>>,
    bodies: Mutex<Vec<Value>>,
}

impl ChatUpstream for Replies {
    fn open_stream(&self, body: Value) -> BoxFuture<'_, Result<DataStream, GatewayError>> {
        if let Ok(mut b) = self.bodies.lock() {
            b.push(body);
        }
        let next = self.next.lock().ok().and_then(|mut q| q.pop_front());
        Box::pin(async move {
            match next {
                Some(ev) => Ok(scripted(ev, None)),
                None => Err(GatewayError::UpstreamConnect(
                    "no more scripted replies".into(),
                )),
            }
        })
    }
    fn complete(&self, _body: Value) -> BoxFuture<'_, Result<Value, GatewayError>> {
        Box::pin(async { Err(GatewayError::Internal("not used".into())) })
    }
}

fn policy(mode: StreamMode, name: &str) -> Policy {
    let dir = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/policies"));
    let m = crate::config::ModerationConfig {
        enabled: true,
        policy: name.into(),
        policies_dir: dir,
        header_policies: Default::default(),
        max_concurrent_classifications: 4,
    };
    let mut p = (*PolicySet::load(&m)
        .expect("policies")
        .default_policy()
        .expect("policy"))
    .clone();
    p.streaming = mode;
    p
}

struct Outcome {
    /// (ms since start, parsed data or "[DONE]")
    frames: Vec<(u64, Value)>,
    summary: StreamSummary,
}

impl Outcome {
    fn texts(&self) -> Vec<(u64, String)> {
        self.frames
            .iter()
            .filter_map(|(t, f)| {
                f.pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
                    .map(|s| (*t, s.to_string()))
            })
            .collect()
    }
    fn text(&self) -> String {
        self.texts().into_iter().map(|(_, s)| s).collect()
    }
    fn last_chunk(&self) -> &Value {
        &self
            .frames
            .iter()
            .rev()
            .find(|(_, f)| f.get("moderation").is_some())
            .expect("a chunk with the verdict")
            .1
    }
    fn ends_with_done(&self) -> bool {
        self.frames
            .last()
            .map(|(_, f)| f == "[DONE]")
            .unwrap_or(false)
    }
}

async fn run_with(
    policy: Policy,
    classifier: Arc<dyn Classifier>,
    first: DataStream,
    upstream: Arc<Replies>,
    user: &str,
) -> Outcome {
    let body =
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": user}]});
    let request = ChatRequest::parse(body.to_string().as_bytes()).expect("request");
    let start = Instant::now();
    let job = StreamJob {
        probe: crate::telemetry::RequestProbe::none(),
        moderator: Arc::new(Moderator::new(classifier, 4, Duration::from_millis(500))),
        upstream,
        sink: Arc::new(NoopSink),
        mode: policy.streaming,
        policy: Arc::new(policy),
        request,
        request_id: "req-1".into(),
        deadline: start + Duration::from_secs(60),
        started: start,
        started_at: SystemTime::now(),
        upstream_first_byte: None,
        total_timeout: Duration::from_secs(60),
    };
    let (tx, mut rx) = mpsc::channel(16);
    let handle = tokio::spawn(run(job, first, tx));
    let mut frames = Vec::new();
    let mut dec = crate::proxy::sse::SseDecoder::default();
    while let Some(b) = rx.recv().await {
        let t = start.elapsed().as_millis() as u64;
        for ev in dec.feed(&b).expect("valid SSE from the gateway") {
            let v = if ev.data == "[DONE]" {
                json!("[DONE]")
            } else {
                serde_json::from_str(&ev.data).expect("JSON frame")
            };
            frames.push((t, v));
        }
    }
    let summary = handle.await.expect("engine task");
    Outcome { frames, summary }
}

async fn window(pieces: &[&str]) -> Outcome {
    run_with(
        policy(StreamMode::Window, "default"),
        Arc::new(SlowKeyword),
        scripted(reply(pieces), None),
        Arc::new(Replies::default()),
        "I can't sleep",
    )
    .await
}

#[test]
fn ready_cut_finds_last_boundary_or_hold_limit() {
    assert_eq!(ready_cut("Hi. How", 100, 1), Some(3));
    assert_eq!(
        ready_cut("你好。我在！听", 100, 1),
        Some("你好。我在！".len())
    );
    assert_eq!(ready_cut("no boundary yet", 100, 1), None);
    // At the hold limit, all but the tail (half the limit, at most 16).
    assert_eq!(ready_cut("abcdef", 4, 1), Some(2));
    assert_eq!(ready_cut("一二三四五", 3, 1), Some("一二".len()));
    assert_eq!(ready_cut(&"x".repeat(200), 160, 1), Some(144));
    // Tiny sentences wait until MIN_SEGMENT_CHARS characters are pending.
    assert_eq!(ready_cut("a.b.c.", 100, 24), None);
    let many = "a.".repeat(12);
    assert_eq!(ready_cut(&many, 100, 24), Some(24));
    assert_eq!(ready_cut(&"a.".repeat(100), 160, 24), Some(200));
    assert_eq!(ready_cut("abcd", 4, 1), Some(2));
    assert_eq!(ready_cut("line\nnext", 100, 1), Some(5));
}

#[tokio::test(start_paused = true)]
async fn window_releases_each_sentence_only_after_its_classification() {
    let o = window(&["I hear you. ", "That sounds ", "really hard. ", "I'm here."]).await;
    let texts = o.texts();
    assert_eq!(o.text(), "I hear you. That sounds really hard. I'm here.");
    // Sentence one arrives at 10 ms and takes 50 ms to classify.
    assert_eq!(texts[0].1, "I hear you.");
    assert!(
        texts[0].0 >= 10 + CLASSIFY_MS,
        "released at {} ms, before its classification",
        texts[0].0
    );
    assert!(texts.len() >= 3, "streamed sentence by sentence: {texts:?}");
    let last = o.last_chunk();
    assert_eq!(last["moderation"]["action"], "allow");
    assert_eq!(last["moderation"]["streaming"], "window");
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["id"], "up-1");
    assert!(o.ends_with_done());
    assert_eq!(o.summary.outcome, ExchangeOutcome::Completed);
}

#[tokio::test(start_paused = true)]
async fn window_never_releases_a_flagged_sentence() {
    let o = window(&[
        "I hear you. ",
        "You are an idi",
        "ot for feeling this. ",
        "More text.",
    ])
    .await;
    let text = o.text();
    assert!(text.starts_with("I hear you."), "{text}");
    assert!(
        !text.to_lowercase().contains("idi"),
        "flagged text leaked: {text}"
    );
    assert!(
        !text.contains("More text"),
        "text after the flag leaked: {text}"
    );
    let p = policy(StreamMode::Window, "default");
    assert!(text.ends_with(&p.block_reply.en), "{text}");
    let last = o.last_chunk();
    assert_eq!(last["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(last["moderation"]["action"], "block");
    assert_eq!(last["moderation"]["category"], "toxic_language");
    assert!(o.ends_with_done());
}

#[tokio::test(start_paused = true)]
async fn window_retries_while_nothing_was_released() {
    let upstream = Arc::new(Replies::default());
    if let Ok(mut q) = upstream.next.lock() {
        q.push_back(reply(&["I am listening, ", "tell me more."]));
    }
    let o = run_with(
        policy(StreamMode::Window, "default"),
        Arc::new(SlowKeyword),
        scripted(reply(&["Lorem ipsum dolor sit amet. ", "Blah."]), None),
        upstream.clone(),
        "hello",
    )
    .await;
    assert_eq!(o.text(), "I am listening, tell me more.");
    let v = &o.last_chunk()["moderation"];
    assert_eq!(v["action"], "retry");
    assert_eq!(v["category"], "nonsense");
    assert_eq!(v["retries"], 1);
    let bodies = upstream.bodies.lock().expect("bodies").clone();
    assert_eq!(bodies.len(), 1);
    let msgs = bodies[0]["messages"].as_array().expect("messages");
    assert_eq!(
        msgs.last().map(|m| m["role"].clone()),
        Some(json!("system"))
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_release_falls_back_to_replace() {
    let o = window(&["That sounds hard. ", "Lorem ipsum dolor. ", "Tail."]).await;
    let text = o.text();
    let p = policy(StreamMode::Window, "default");
    assert_eq!(text, format!("That sounds hard.\n\n{}", p.safe_reply.en));
    assert_eq!(o.last_chunk()["moderation"]["action"], "replace");
    assert_eq!(o.last_chunk()["choices"][0]["finish_reason"], "stop");
}

#[tokio::test(start_paused = true)]
async fn append_adds_the_note_at_the_end() {
    let o = window(&["I'm a real person, ", "so I get it. ", "Rest well."]).await;
    let p = policy(StreamMode::Window, "default");
    let note = p
        .append_text(
            crate::classifier::Category::HumanoidMimicry,
            crate::policy::Lang::En,
        )
        .expect("note");
    assert_eq!(
        o.text(),
        format!("I'm a real person, so I get it. Rest well.\n\n{note}")
    );
    assert_eq!(o.last_chunk()["moderation"]["action"], "append");
}

#[tokio::test(start_paused = true)]
async fn chinese_request_gets_chinese_safe_reply() {
    let o = run_with(
        policy(StreamMode::Window, "default"),
        Arc::new(SlowKeyword),
        scripted(reply(&["你就是个废物。"]), None),
        Arc::new(Replies::default()),
        "我很难过",
    )
    .await;
    let p = policy(StreamMode::Window, "default");
    assert_eq!(o.text(), p.block_reply.zh);
}

#[tokio::test(start_paused = true)]
async fn long_text_without_boundaries_is_released_at_the_hold_limit() {
    let mut p = policy(StreamMode::Window, "default");
    p.max_hold_chars = 10;
    let o = run_with(
        p,
        Arc::new(SlowKeyword),
        scripted(reply(&["abcdefghij", "klmnopqrst", "uvw"]), None),
        Arc::new(Replies::default()),
        "hi",
    )
    .await;
    let texts: Vec<String> = o.texts().into_iter().map(|(_, s)| s).collect();
    // Each release keeps the last hold_tail(10) = 5 characters held, so a
    // word cut by the limit is judged whole with what follows.
    assert_eq!(texts, vec!["abcde", "fghij", "klmno", "pqrstuvw"]);
}

#[tokio::test(start_paused = true)]
async fn buffer_mode_holds_everything_until_the_end() {
    let o = run_with(
        policy(StreamMode::Buffer, "default"),
        Arc::new(SlowKeyword),
        scripted(reply(&["One. ", "Two. ", "Three."]), None),
        Arc::new(Replies::default()),
        "hi",
    )
    .await;
    let texts = o.texts();
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert_eq!(texts[0].1, "One. Two. Three.");
    // Last piece at 30 ms, finish at 40 ms, then one classification.
    assert!(texts[0].0 >= 40 + CLASSIFY_MS);
    assert_eq!(o.last_chunk()["moderation"]["classifications"], 1);
}

#[tokio::test(start_paused = true)]
async fn observe_passes_through_and_annotates() {
    let o = run_with(
        policy(StreamMode::Observe, "default"),
        Arc::new(SlowKeyword),
        scripted(reply(&["You idiot. ", "Bye."]), None),
        Arc::new(Replies::default()),
        "hi",
    )
    .await;
    assert_eq!(o.text(), "You idiot. Bye.");
    // Passed through as it came, before any classification finished.
    assert!(o.texts()[0].0 < CLASSIFY_MS);
    let v = &o.last_chunk()["moderation"];
    assert_eq!(v["action"], "annotate");
    assert_eq!(v["mode"], "shadow");
    assert_eq!(v["shadow"][0]["action"], "block");
    assert!(o.ends_with_done());
}

#[tokio::test(start_paused = true)]
async fn classifier_timeout_fails_open_under_default() {
    let o = window(&["Fine. ", "[[classifier-hang]] still fine."]).await;
    assert_eq!(o.text(), "Fine. [[classifier-hang]] still fine.");
    let v = &o.last_chunk()["moderation"];
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("timed out"),
        "{v}"
    );
}

#[tokio::test(start_paused = true)]
async fn classifier_error_fails_closed_under_strict() {
    let o = run_with(
        policy(StreamMode::Window, "strict"),
        Arc::new(SlowKeyword),
        scripted(reply(&["Fine. ", "[[classifier-error]] more."]), None),
        Arc::new(Replies::default()),
        "hi",
    )
    .await;
    let p = policy(StreamMode::Window, "strict");
    assert_eq!(o.text(), format!("Fine.\n\n{}", p.safe_reply.en));
    assert_eq!(o.last_chunk()["moderation"]["action"], "replace");
}

#[tokio::test(start_paused = true)]
async fn stream_cut_midway_withholds_unclassified_text_and_reports_an_error() {
    let events = vec![
        (0, role_chunk()),
        (10, chunk("Checked sentence. ")),
        (10, chunk("unchecked tail")),
    ];
    let o = run_with(
        policy(StreamMode::Window, "default"),
        Arc::new(SlowKeyword),
        scripted(events, None),
        Arc::new(Replies::default()),
        "hi",
    )
    .await;
    assert_eq!(o.text(), "Checked sentence.");
    let last = &o.frames.last().expect("frames").1;
    assert_eq!(last["error"]["code"], "upstream_protocol_error");
    assert!(!o.ends_with_done());
    assert_eq!(o.summary.outcome, ExchangeOutcome::UpstreamFailed);
}

#[tokio::test(start_paused = true)]
async fn malformed_chunk_is_an_error_event() {
    let events = vec![(0, role_chunk()), (10, "{not json".to_string())];
    let o = run_with(
        policy(StreamMode::Window, "default"),
        Arc::new(SlowKeyword),
        scripted(events, None),
        Arc::new(Replies::default()),
        "hi",
    )
    .await;
    let last = &o.frames.last().expect("frames").1;
    assert!(last["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("not a JSON chunk"));
}

#[tokio::test(start_paused = true)]
async fn client_disconnect_drops_the_upstream_stream() {
    let dropped = Arc::new(AtomicBool::new(false));
    let mut events = vec![(0, role_chunk())];
    for _ in 0..100 {
        events.push((100, chunk("More words. ")));
    }
    let body =
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let request = ChatRequest::parse(body.to_string().as_bytes()).expect("request");
    let start = Instant::now();
    let p = policy(StreamMode::Window, "default");
    let job = StreamJob {
        probe: crate::telemetry::RequestProbe::none(),
        moderator: Arc::new(Moderator::new(
            Arc::new(SlowKeyword),
            4,
            Duration::from_millis(500),
        )),
        upstream: Arc::new(Replies::default()),
        sink: Arc::new(NoopSink),
        mode: p.streaming,
        policy: Arc::new(p),
        request,
        request_id: "req-2".into(),
        deadline: start + Duration::from_secs(600),
        started: start,
        started_at: SystemTime::now(),
        upstream_first_byte: None,
        total_timeout: Duration::from_secs(600),
    };
    let (tx, mut rx) = mpsc::channel(16);
    let handle = tokio::spawn(run(job, scripted(events, Some(dropped.clone())), tx));
    // Read until the first text, then hang up.
    while let Some(b) = rx.recv().await {
        if String::from_utf8_lossy(&b).contains("More words") {
            break;
        }
    }
    drop(rx);
    let summary = handle.await.expect("engine task");
    assert_eq!(summary.outcome, ExchangeOutcome::ClientDisconnected);
    assert!(
        dropped.load(Ordering::SeqCst),
        "upstream stream was not dropped"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "engine kept reading after the client left"
    );
}

/// Keeps every record it is given.
#[derive(Default)]
struct Recording(Mutex<Vec<crate::moderation::ExchangeRecord>>);

impl crate::moderation::ExchangeSink for Recording {
    fn record(&self, record: crate::moderation::ExchangeRecord) {
        if let Ok(mut v) = self.0.lock() {
            v.push(record);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_sink_gets_the_verdict_both_texts_and_timings() {
    let body = json!({"model": "m", "stream": true, "user": "user-7",
                      "messages": [{"role": "user", "content": "hi"}]});
    let request = ChatRequest::parse(body.to_string().as_bytes()).expect("request");
    let start = Instant::now();
    let sink = Arc::new(Recording::default());
    let p = policy(StreamMode::Window, "default");
    let threshold = p.rules[&crate::classifier::Category::ToxicLanguage].threshold;
    let job = StreamJob {
        moderator: Arc::new(Moderator::new(
            Arc::new(SlowKeyword),
            4,
            Duration::from_millis(500),
        )),
        upstream: Arc::new(Replies::default()),
        sink: sink.clone(),
        mode: p.streaming,
        policy: Arc::new(p),
        request,
        request_id: "req-9".into(),
        deadline: start + Duration::from_secs(60),
        started: start,
        started_at: SystemTime::now(),
        upstream_first_byte: Some(Duration::from_millis(3)),
        total_timeout: Duration::from_secs(60),
        probe: crate::telemetry::RequestProbe::none(),
    };
    let (tx, mut rx) = mpsc::channel(16);
    let handle = tokio::spawn(run(
        job,
        scripted(reply(&["Okay. ", "You idiot."]), None),
        tx,
    ));
    while rx.recv().await.is_some() {}
    handle.await.expect("engine task");
    let records = sink.0.lock().expect("lock");
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r.verdict.request_id, "req-9");
    assert_eq!(r.verdict.action, crate::policy::Action::Block);
    assert_eq!(r.outcome, ExchangeOutcome::Completed);
    assert_eq!(r.user.as_deref(), Some("user-7"));
    assert_eq!(r.threshold, Some(threshold));
    assert_eq!(r.context, "[seeker]hi");
    assert_eq!(r.upstream_text, "Okay. You idiot.");
    assert!(r.delivered_text.starts_with("Okay.") && !r.delivered_text.contains("idiot"));
    assert!(r.timings.classify_total >= Duration::from_millis(2 * CLASSIFY_MS));
    assert_eq!(
        r.timings.upstream_first_byte,
        Some(Duration::from_millis(3))
    );
}

// ---- Every rendered field is judged (moderation::fields) ----

fn delta_chunk(delta: Value) -> String {
    json!({"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": 0, "delta": delta, "finish_reason": null}]})
    .to_string()
}

fn deltas(ds: Vec<Value>) -> Vec<(u64, String)> {
    let mut v = vec![(0, role_chunk())];
    v.extend(ds.into_iter().map(|d| (10, delta_chunk(d))));
    v.push((10, finish_chunk()));
    v.push((0, "[DONE]".into()));
    v
}

impl Outcome {
    /// Concatenated text the client got under one delta key.
    fn field(&self, key: &str) -> String {
        self.frames
            .iter()
            .filter_map(|(_, f)| f.pointer(&format!("/choices/0/delta/{key}")))
            .filter_map(Value::as_str)
            .collect()
    }
    fn any_delta_has(&self, key: &str) -> bool {
        self.frames
            .iter()
            .any(|(_, f)| f.pointer(&format!("/choices/0/delta/{key}")).is_some())
    }
}

async fn run_deltas(mode: StreamMode, ds: Vec<Value>) -> Outcome {
    run_with(
        policy(mode, "default"),
        Arc::new(SlowKeyword),
        scripted(deltas(ds), None),
        Arc::new(Replies::default()),
        "I can't sleep",
    )
    .await
}

#[tokio::test(start_paused = true)]
async fn toxic_reasoning_content_is_blocked_in_every_enforce_mode() {
    for mode in [StreamMode::Window, StreamMode::Buffer] {
        let o = run_deltas(
            mode,
            vec![
                json!({"reasoning_content": "The user is sad. "}),
                json!({"reasoning_content": "They are an idiot. "}),
                json!({"content": "I hear you."}),
            ],
        )
        .await;
        let seen = format!("{}{}", o.field("reasoning_content"), o.text());
        assert!(!seen.contains("idiot"), "{mode:?}: leaked: {seen}");
        assert!(!o.text().contains("I hear you"), "{mode:?}: {}", o.text());
        assert_eq!(o.last_chunk()["moderation"]["action"], "block", "{mode:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn reasoning_refusal_and_content_parts_are_delivered_after_judgement() {
    let o = run_deltas(
        StreamMode::Window,
        vec![
            json!({"reasoning_content": "Let me think. "}),
            json!({"content": [{"type": "text", "text": "I hear you. "}]}),
            json!({"refusal": "I can't help with that part."}),
        ],
    )
    .await;
    assert_eq!(o.field("reasoning_content"), "Let me think. ");
    assert_eq!(o.text(), "I hear you. ");
    assert_eq!(o.field("refusal"), "I can't help with that part.");
    assert_eq!(o.last_chunk()["moderation"]["action"], "allow");
}

#[tokio::test(start_paused = true)]
async fn other_choices_and_unknown_fields_never_reach_the_client() {
    let mut events = vec![(0, role_chunk())];
    events.push((10, chunk("I hear you. ")));
    events.push((
        10,
        json!({"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 1, "delta": {"content": "You idiot."}, "finish_reason": null}]})
        .to_string(),
    ));
    events.push((10, delta_chunk(json!({"vendor_note": "hidden text"}))));
    events.push((10, finish_chunk()));
    events.push((0, "[DONE]".into()));
    let o = run_with(
        policy(StreamMode::Window, "default"),
        Arc::new(SlowKeyword),
        scripted(events, None),
        Arc::new(Replies::default()),
        "hi",
    )
    .await;
    assert_eq!(o.text(), "I hear you. ");
    assert!(!o.any_delta_has("vendor_note"));
    assert!(o
        .frames
        .iter()
        .all(|(_, f)| f.pointer("/choices/1").is_none()));
    let v = &o.last_chunk()["moderation"];
    assert_eq!(v["action"], "allow");
    assert_eq!(v["unknown_fields"], json!(["choices[1]", "vendor_note"]));
}

#[tokio::test(start_paused = true)]
async fn tool_calls_are_held_and_dropped_with_a_remedy() {
    let call = json!({"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                       "function": {"name": "f", "arguments": "{}"}}]});
    let ok = run_deltas(StreamMode::Window, vec![call.clone()]).await;
    assert!(
        ok.any_delta_has("tool_calls"),
        "released once the reply passed"
    );
    let bad = run_deltas(
        StreamMode::Window,
        vec![call, json!({"content": "You idiot."})],
    )
    .await;
    assert!(!bad.any_delta_has("tool_calls"), "dropped with the draft");
    assert_eq!(bad.last_chunk()["moderation"]["action"], "block");
}

#[tokio::test(start_paused = true)]
async fn json_mode_remedies_are_refusals_and_appends_stay_in_the_verdict() {
    let run = |pieces: Vec<&'static str>| async move {
        let body = json!({"model": "m", "stream": true, "response_format": {"type": "json_object"},
                          "messages": [{"role": "user", "content": "hi"}]});
        let request = ChatRequest::parse(body.to_string().as_bytes()).expect("request");
        assert!(request.json_mode);
        let start = Instant::now();
        let p = policy(StreamMode::Window, "default");
        let job = StreamJob {
            probe: crate::telemetry::RequestProbe::none(),
            moderator: Arc::new(Moderator::new(
                Arc::new(SlowKeyword),
                4,
                Duration::from_millis(500),
            )),
            upstream: Arc::new(Replies::default()),
            sink: Arc::new(NoopSink),
            mode: p.streaming,
            policy: Arc::new(p),
            request,
            request_id: "req-1".into(),
            deadline: start + Duration::from_secs(60),
            started: start,
            started_at: SystemTime::now(),
            upstream_first_byte: None,
            total_timeout: Duration::from_secs(60),
        };
        let (tx, mut rx) = mpsc::channel(16);
        let handle = tokio::spawn(run(job, scripted(reply(&pieces), None), tx));
        let mut frames = Vec::new();
        let mut dec = crate::proxy::sse::SseDecoder::default();
        while let Some(b) = rx.recv().await {
            for ev in dec.feed(&b).expect("SSE") {
                if ev.data != "[DONE]" {
                    frames.push((0, serde_json::from_str(&ev.data).expect("JSON")));
                }
            }
        }
        Outcome {
            frames,
            summary: handle.await.expect("task"),
        }
    };
    let blocked = run(vec!["{\"a\": \"you idiot\"}"]).await;
    assert_eq!(blocked.text(), "");
    assert!(!blocked.field("refusal").is_empty());
    let appended = run(vec!["{\"a\": \"I'm a real person\"}"]).await;
    assert_eq!(appended.text(), "{\"a\": \"I'm a real person\"}");
    assert_eq!(appended.last_chunk()["moderation"]["action"], "append");
}

#[tokio::test(start_paused = true)]
async fn long_reply_harm_at_the_end_is_judged_with_linear_work() {
    // 120 sentences; the last one is toxic.
    let mut pieces: Vec<String> = (0..120)
        .map(|i| format!("Sentence number {i} is calm and kind. "))
        .collect();
    pieces.push("You idiot.".into());
    let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
    let o = window(&refs).await;
    assert!(!o.text().contains("idiot"));
    let v = &o.last_chunk()["moderation"];
    assert_eq!(v["action"], "block");
    let n = v["classifications"].as_u64().unwrap_or(0);
    // ~4,700 characters: eager checks, then about one per 48 characters.
    assert!(n < 120, "{n} classifications for 121 sentences");
}

mod coverage_property {
    //! No byte of a flagged marker ever reaches the client in enforce
    //! modes, whatever the reply, its chunking, the marker's position and
    //! disguise, or the field it is in; marker-free replies arrive whole.
    use super::*;
    use proptest::prelude::*;

    const WORDS: &[&str] = &[
        "I hear you. ",
        "That sounds hard",
        ", and ",
        "sleep matters. ",
        "我理解你的感受。",
        "慢慢来",
        "，",
        "你并不孤单！",
        "Try a walk tomorrow? ",
        "\n",
        "温柔地对待自己",
        "one step at a time",
        " ",
    ];

    fn disguise(marker: &str, how: u8) -> String {
        let sep = match how % 4 {
            0 => "",
            1 => " ",
            2 => "\u{200B}",
            _ => "\u{00A0}",
        };
        marker
            .chars()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(sep)
    }

    fn split_at_chars(s: &str, cuts: &[usize]) -> Vec<String> {
        let chars: Vec<char> = s.chars().collect();
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (chars.len() + 1)).collect();
        points.push(0);
        points.push(chars.len());
        points.sort_unstable();
        points.dedup();
        points
            .windows(2)
            .map(|w| chars[w[0]..w[1]].iter().collect())
            .filter(|p: &String| !p.is_empty())
            .collect()
    }

    fn run_case(
        mode: StreamMode,
        key: &'static str,
        pieces: Vec<String>,
    ) -> (Outcome, &'static str) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        let ds = pieces.into_iter().map(|p| json!({ key: p })).collect();
        (rt.block_on(run_deltas(mode, ds)), key)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

        #[test]
        fn marker_never_leaks_and_clean_replies_arrive_whole(
            words in proptest::collection::vec(0..WORDS.len(), 0..150),
            at in 0usize..10_000,
            marker_zh in any::<bool>(),
            how in any::<u8>(),
            with_marker in any::<bool>(),
            cuts in proptest::collection::vec(0usize..100_000, 0..40),
            field in 0usize..3,
            buffer in any::<bool>(),
        ) {
            let body: String = words.iter().map(|&i| WORDS[i]).collect();
            let chars: Vec<char> = body.chars().collect();
            let at = at % (chars.len() + 1);
            let marker = disguise(if marker_zh { "废物" } else { "idiot" }, how);
            let reply: String = if with_marker {
                let head: String = chars[..at].iter().collect();
                let tail: String = chars[at..].iter().collect();
                // At a word boundary: the spaced-letter rule of
                // normalisation joins runs of single letters between words.
                format!("{head} {marker} {tail}")
            } else {
                body.clone()
            };
            let marker_start = chars[..at].iter().collect::<String>().len() + 1;
            let key = ["content", "reasoning_content", "refusal"][field];
            let mode = if buffer { StreamMode::Buffer } else { StreamMode::Window };
            let (o, key) = run_case(mode, key, split_at_chars(&reply, &cuts));
            let got = o.field(key);
            if with_marker {
                // Everything the client got in that field is a prefix of the
                // reply that ends before the marker starts.
                let delivered = if key == "content" {
                    let p = policy(mode, "default");
                    got.split(&format!("\n\n{}", p.block_reply.en)).next().unwrap_or("").to_string()
                        .trim_end_matches(p.block_reply.en.as_str()).to_string()
                } else {
                    got.clone()
                };
                prop_assert!(
                    delivered.len() <= marker_start && reply.starts_with(&delivered),
                    "leaked: field {} got {:?}, marker at byte {}", key, got, marker_start
                );
                prop_assert_eq!(&o.last_chunk()["moderation"]["action"], "block");
            } else {
                prop_assert_eq!(got, reply);
                prop_assert_eq!(&o.last_chunk()["moderation"]["action"], "allow");
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_guard_blocks_a_sentence_the_model_allowed_before_it_is_released() {
    // The keyword stand-in scores these as safe; the shipped guard does not.
    let o = window(&[
        "I hear you. ",
        "Honestly, go k",
        "ill yourself. ",
        "More text.",
    ])
    .await;
    let text = o.text();
    assert!(text.starts_with("I hear you."), "{text}");
    assert!(!text.contains("kill"), "guarded text leaked: {text}");
    assert!(!text.contains("More text"), "{text}");
    let p = policy(StreamMode::Window, "default");
    assert!(text.ends_with(&p.block_reply.en), "{text}");
    let last = o.last_chunk();
    assert_eq!(last["choices"][0]["finish_reason"], "content_filter");
    let v = &last["moderation"];
    assert_eq!(v["action"], "block");
    assert_eq!(v["category"], "toxic_language");
    assert_eq!(v["source"], "guard");
    assert_eq!(
        v["guards"],
        json!([{"id": "self-harm-en", "category": "toxic_language", "mode": "enforce"}])
    );
    assert_eq!(v["scores"]["toxic_language"], 1.0);
}

#[tokio::test(start_paused = true)]
async fn a_guard_still_blocks_when_the_classifier_fails() {
    // Default fails open: without the guard this text would be released.
    let o = window(&["Fine. ", "[[classifier-error]] 去死吧。", " more."]).await;
    let text = o.text();
    assert!(!text.contains("去死"), "{text}");
    let v = &o.last_chunk()["moderation"];
    assert_eq!(v["action"], "block");
    assert_eq!(v["source"], "guard");
    assert_eq!(v["guards"][0]["id"], "self-harm-zh");
    assert!(v["error"].as_str().is_some(), "{v}");
    assert_eq!(v["unclassified"], false, "{v}");
}

#[tokio::test(start_paused = true)]
async fn observe_and_shadow_guards_only_record() {
    let o = run_with(
        policy(StreamMode::Observe, "default"),
        Arc::new(SlowKeyword),
        scripted(reply(&["ok. ", "kys"]), None),
        Arc::new(Replies::default()),
        "hi",
    )
    .await;
    assert_eq!(o.text(), "ok. kys");
    let v = &o.last_chunk()["moderation"];
    assert_eq!(v["action"], "annotate");
    assert_eq!(v["mode"], "shadow");
    assert_eq!(v["source"], "guard");
    assert_eq!(v["guards"][0]["id"], "self-harm-en");

    let mut p = policy(StreamMode::Window, "default");
    let dir = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/policies"));
    let text = std::fs::read_to_string(dir.join("default.toml"))
        .expect("policy")
        .replace(
            "mode = \"enforce\"\nphrases_file = \"guards/self-harm-en.txt\"",
            "mode = \"shadow\"\nphrases_file = \"guards/self-harm-en.txt\"",
        );
    p.guards = crate::policy::parse::parse_policy(&text, "default", &dir)
        .expect("valid")
        .guards;
    let o = run_with(
        p,
        Arc::new(SlowKeyword),
        scripted(reply(&["ok. ", "kys"]), None),
        Arc::new(Replies::default()),
        "hi",
    )
    .await;
    assert_eq!(o.text(), "ok. kys");
    let v = &o.last_chunk()["moderation"];
    assert_eq!(v["action"], "allow", "{v}");
    assert_eq!(v["mode"], "shadow");
    assert_eq!(v["shadow"][0]["action"], "block");
    assert_eq!(v["guards"][0]["mode"], "shadow");
}

#[test]
fn window_checks_cover_the_reply_with_overlap() {
    let reply: String = (0..60).map(|i| format!("Sentence {i} is here. ")).collect();
    let checks = window_checks(&reply, 160);
    assert!(
        checks[0].1,
        "the first check starts at the reply's beginning"
    );
    // Once more than OVERLAP_CHARS were released, checks no longer start at the beginning.
    assert!(checks.iter().skip(12).all(|(_, whole)| !whole));
    // Every character is in some check, in order.
    let mut covered = String::new();
    for (text, _) in &checks {
        let overlap = text.len().min(covered.len());
        let (head, _) = text.split_at(
            (0..=overlap)
                .rev()
                .find(|&k| covered.ends_with(&text[..k]) && text.is_char_boundary(k))
                .unwrap_or(0),
        );
        covered.push_str(&text[head.len()..]);
    }
    assert_eq!(covered, reply);
    // Linear: checks grow with the reply, each bounded by overlap + segment.
    assert!(checks
        .iter()
        .all(|(t, _)| t.chars().count() <= OVERLAP_CHARS + 200));
    assert!(
        checks.len() < 60,
        "{} checks for 60 sentences",
        checks.len()
    );
    assert_eq!(window_checks("", 160).len(), 1);
}
