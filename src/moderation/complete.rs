//! Non-streaming moderation: classify the whole answer, apply the policy to
//! the response JSON, and attach the verdict.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use tokio::time::Instant;

use super::context::{response_text, ChatRequest};
use super::sink::{Draft, ExchangeOutcome, ExchangeRecord, ExchangeSink, Timings};
use super::verdict::{
    appendix, remedy_finish_reason, remedy_text, Gate, Tally, Verdict, VerdictMeta,
};
use super::{fields, mode_key, ChatUpstream, Moderator};
use crate::policy::{Action, PolicyRef};
use crate::telemetry::RequestProbe;

/// Everything one non-streaming exchange needs.
pub struct CompleteJob {
    pub moderator: Arc<Moderator>,
    pub upstream: Arc<dyn ChatUpstream>,
    pub sink: Arc<dyn ExchangeSink>,
    pub policy: PolicyRef,
    pub request: ChatRequest,
    pub request_id: String,
    pub deadline: Instant,
    pub started: Instant,
    pub started_at: SystemTime,
    pub upstream_first_byte: Option<Duration>,
    /// The request's telemetry; [`RequestProbe::none`] in tests.
    pub probe: RequestProbe,
}

/// Everything a client may show from a completion's first choice
/// (`moderation::fields`: content, refusal, reasoning, audio transcript),
/// after dropping any further choices (requests with `n > 1` are refused,
/// so extra choices from an upstream are never delivered unjudged).
fn reply_of(resp: &mut Value) -> Option<String> {
    if let Some(Value::Array(choices)) = resp.get_mut("choices") {
        choices.truncate(1);
    }
    resp.pointer("/choices/0/message")
        .map(fields::message_text)
        .filter(|t| !t.is_empty())
}

/// Replace the first choice's message with the policy's reply: nothing of
/// the rejected draft (reasoning, audio, refusal, tool calls, logprobs)
/// survives.
fn set_remedy(resp: &mut Value, text: &str, finish: &str, json_mode: bool) {
    if let Some(Value::Object(choice)) = resp.pointer_mut("/choices/0") {
        choice.insert("message".into(), fields::remedied_message(text, json_mode));
        choice.insert("finish_reason".into(), json!(finish));
        choice.insert("logprobs".into(), Value::Null);
    }
}

/// Moderate a complete response (`first` is the upstream's answer) and
/// return the body for the client with the `moderation` object attached.
pub async fn run(job: CompleteJob, first: Value) -> (Value, Verdict) {
    let meta = VerdictMeta {
        request_id: job.request_id.clone(),
        policy: job.policy.name.clone(),
        policy_version: job.policy.version.clone(),
        streaming: None,
        classifier: job.moderator.classifier().name().to_string(),
    };
    let lang = job.request.lang;
    let mut tally = Tally::default();
    let mut classify_total = Duration::ZERO;
    let mut resp = first;
    let mut upstream_text;
    let delivered;
    let mut retrying = false;
    let mut drafts = Vec::new();
    loop {
        upstream_text = reply_of(&mut resp).unwrap_or_default();
        if upstream_text.is_empty() {
            // Tool calls or an empty answer: nothing a person reads.
            delivered = String::new();
            break;
        }
        let span = job
            .probe
            .classification(if retrying { "retry" } else { "final" });
        let gate = match job
            .moderator
            .classify(&job.request.context, &response_text(&upstream_text))
            .await
        {
            Ok(mut c) => {
                classify_total += c.elapsed;
                super::guard(
                    &job.policy,
                    &job.probe,
                    &upstream_text,
                    &mut c.scores,
                    &mut tally,
                );
                let d = job.policy.decide(&c.scores);
                super::observe_decision(&job.probe, span, &job.policy.name, &d, &c);
                tally.gate(&job.policy, &d, c.scores, false, false)
            }
            Err((e, elapsed)) => {
                classify_total += elapsed;
                if let Some(span) = span {
                    span.failed(super::error_kind(&e));
                }
                let guard = super::guard_alone(&job.policy, &job.probe, &upstream_text, &mut tally);
                tally.gate_error(&job.policy, &e, guard.as_ref(), false, false)
            }
        };
        match gate {
            // One check per response: `hold` has nothing later to wait for.
            Gate::Release | Gate::Hold => {
                // JSON mode: an appended note would break the JSON; the
                // verdict still says `append`.
                let extra = if job.request.json_mode {
                    String::new()
                } else {
                    appendix(&job.policy, &tally.appends, lang)
                };
                if let Some(msg) = resp.pointer_mut("/choices/0/message") {
                    fields::append_to_content(msg, &extra);
                }
                delivered = format!("{upstream_text}{extra}");
                break;
            }
            Gate::Retry(c) => {
                drafts.push(Draft {
                    text: upstream_text.clone(),
                    scores: tally.last_scores,
                    category: c.category,
                    threshold: job.policy.rules.get(&c.category).map(|r| r.threshold),
                    action: c.action,
                });
                tally.start_retry(&c);
                retrying = true;
                let body = job
                    .request
                    .retry_body(job.policy.retry_system_message.as_deref());
                let failed = match tokio::time::timeout_at(
                    job.deadline,
                    job.upstream.complete(body),
                )
                .await
                {
                    Ok(Ok(r)) => {
                        resp = r;
                        None
                    }
                    Ok(Err(e)) => Some(format!("retry failed: {e}")),
                    Err(_) => Some("retry failed: upstream total timeout".to_string()),
                };
                if let Some(error) = failed {
                    tally.error = Some(error);
                    delivered = remedy(
                        &mut resp,
                        &mut tally,
                        &job,
                        Action::Replace,
                        Some(c.category),
                    );
                    break;
                }
            }
            Gate::Stop { action, category } => {
                delivered = remedy(&mut resp, &mut tally, &job, action, category);
                break;
            }
        }
    }
    let verdict = tally.verdict(&meta);
    job.probe.set_verdict(
        verdict.category_label(),
        verdict.action.key(),
        mode_key(verdict.mode),
        &verdict.policy,
    );
    if let Value::Object(m) = &mut resp {
        m.insert("moderation".into(), verdict.to_json());
    }
    job.sink.record(ExchangeRecord {
        verdict: verdict.clone(),
        outcome: ExchangeOutcome::Completed,
        model: job.request.model.clone(),
        user: job.request.user.clone(),
        threshold: verdict
            .category
            .and_then(|c| job.policy.rules.get(&c))
            .map(|r| r.threshold),
        stream: false,
        context: job.request.context.clone(),
        upstream_text,
        drafts,
        delivered_text: delivered,
        timings: Timings {
            started_at: job.started_at,
            total: job.started.elapsed(),
            upstream_first_byte: job.upstream_first_byte,
            classify_total,
        },
        client: job.request.client.clone(),
    });
    (resp, verdict)
}

fn remedy(
    resp: &mut Value,
    tally: &mut Tally,
    job: &CompleteJob,
    action: Action,
    category: Option<crate::classifier::Category>,
) -> String {
    tally.stopped(action, category);
    let text = remedy_text(&job.policy, action, job.request.lang).to_string();
    set_remedy(
        resp,
        &text,
        remedy_finish_reason(action),
        job.request.json_mode,
    );
    text
}
