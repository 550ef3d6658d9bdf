//! Moderation: turns an upstream chat response (whole or streamed) into what
//! the client receives, by classifying it with its context and applying the
//! request's policy.
//!
//! Invariant: `moderation` never touches sockets, hyper or rustls. It talks
//! to the upstream through [`ChatUpstream`] and to the client through plain
//! values (JSON, SSE frames on a channel), so every path is testable with
//! scripted upstreams and the paused tokio clock. No text is released to
//! the client before the classification covering it has passed, except in
//! `observe` mode, whose whole point is to pass text through.

pub mod complete;
pub mod context;
pub mod fields;
pub mod sink;
pub mod stream;
pub mod verdict;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use tokio::sync::Semaphore;

use crate::classifier::{Classifier, ClassifyError, Pair, Scores};
use crate::error::GatewayError;
use crate::policy::{Decision, Mode, Policy};
use crate::telemetry::{Classification, RequestProbe};

pub use sink::{
    ClientIdentity, Draft, ExchangeOutcome, ExchangeRecord, ExchangeSink, NoopSink, Timings,
};
pub use verdict::Verdict;

/// A stream of SSE `data` payloads from the upstream (chunk JSON or `[DONE]`).
pub type DataStream = BoxStream<'static, Result<String, GatewayError>>;

/// The upstream, as the moderation engine needs it: open a stream, or get a
/// whole completion. Implemented over hyper in `proxy::upstream` and by
/// scripted fakes in tests. Retries call these again with a new body.
pub trait ChatUpstream: Send + Sync + 'static {
    /// Send a `stream: true` request; `Ok` once the upstream answered 200.
    fn open_stream(
        &self,
        body: serde_json::Value,
    ) -> BoxFuture<'_, Result<DataStream, GatewayError>>;
    /// Send a non-streaming request and return the response JSON.
    fn complete(
        &self,
        body: serde_json::Value,
    ) -> BoxFuture<'_, Result<serde_json::Value, GatewayError>>;
}

/// Shared classification front: bounded concurrency and a timeout around the
/// classifier. One per process.
pub struct Moderator {
    classifier: Arc<dyn Classifier>,
    permits: Semaphore,
    timeout: Duration,
}

/// Scores plus how long the classification took (queueing included).
#[derive(Debug, Clone, Copy)]
pub struct Classified {
    pub scores: Scores,
    pub elapsed: Duration,
}

impl Moderator {
    /// `max_concurrent` bounds classifications in flight across all requests;
    /// `timeout` covers waiting for a permit and the classification itself.
    pub fn new(
        classifier: Arc<dyn Classifier>,
        max_concurrent: usize,
        timeout: Duration,
    ) -> Moderator {
        Moderator {
            classifier,
            permits: Semaphore::new(max_concurrent.max(1)),
            timeout,
        }
    }

    pub fn classifier(&self) -> &Arc<dyn Classifier> {
        &self.classifier
    }

    /// Classify one (context, response) pair, both in the benchmark format.
    pub async fn classify(
        &self,
        context: &str,
        response: &str,
    ) -> Result<Classified, (ClassifyError, Duration)> {
        let started = Instant::now();
        let pair = Pair {
            context: context.to_string(),
            response: response.to_string(),
        };
        let work = async {
            let _permit = self
                .permits
                .acquire()
                .await
                .map_err(|_| ClassifyError::Unavailable)?;
            self.classifier.classify(pair).await
        };
        let ms = self.timeout.as_millis() as u64;
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(scores)) => {
                if scores.0.iter().any(|p| !p.is_finite()) {
                    return Err((
                        ClassifyError::Backend(
                            "classifier returned a non-finite probability".into(),
                        ),
                        started.elapsed(),
                    ));
                }
                Ok(Classified {
                    scores,
                    elapsed: started.elapsed(),
                })
            }
            Ok(Err(e)) => Err((e, started.elapsed())),
            Err(_) => Err((ClassifyError::Timeout { ms }, started.elapsed())),
        }
    }
}

/// The `mode` label of a verdict: `enforce`, `shadow`, or `none` when
/// nothing was flagged.
pub fn mode_key(mode: Option<Mode>) -> &'static str {
    match mode {
        Some(Mode::Enforce) => "enforce",
        Some(Mode::Shadow) => "shadow",
        None => "none",
    }
}

/// Low-cardinality kind of a classifier failure, for spans and metrics.
pub fn error_kind(e: &ClassifyError) -> &'static str {
    match e {
        ClassifyError::Overloaded { .. } => "overloaded",
        ClassifyError::Timeout { .. } => "timeout",
        ClassifyError::Backend(_) => "error",
        ClassifyError::Unavailable => "unavailable",
    }
}

/// Close a classification's span with its result and record the policy's
/// decision on it (a `carewall.decision` span).
fn observe_decision(
    probe: &RequestProbe,
    span: Option<Classification>,
    policy: &str,
    d: &Decision,
    c: &Classified,
) {
    if let Some(span) = span {
        span.done(d.top, c.scores.get(d.top));
    }
    let (category, score, action, mode) = match d.applied.or_else(|| d.shadow.first().copied()) {
        Some(x) => (x.category, x.score, x.action.key(), mode_key(Some(x.mode))),
        None => (d.top, c.scores.get(d.top), d.action().key(), mode_key(None)),
    };
    probe.decision(policy, category, score, action, mode);
}

/// The policy's guards on `reply` (the text the classifier judged in this
/// check), when the classification succeeded: enforce hits are merged into
/// `scores` (1.0 for their category) before the policy decides, every hit
/// is recorded in the tally (verdict `guards`), and hits new to this
/// response are counted (`carewall_guard_hits_total`) and put on the span.
pub(crate) fn guard(
    policy: &Policy,
    probe: &RequestProbe,
    reply: &str,
    scores: &mut Scores,
    tally: &mut verdict::Tally,
) {
    if policy.guards.is_empty() {
        return;
    }
    let hits = policy.guards.apply(reply, scores);
    if !hits.is_empty() {
        for h in tally.note_guards(policy, hits) {
            probe.guard_hit(&h.id, h.category);
        }
    }
}

/// The policy's guards on `reply` when the classification failed: the
/// decision on the guard hits alone (`None` when no guard matched), for
/// [`verdict::Tally::gate_error`], so a guard still blocks while the
/// model is down.
pub(crate) fn guard_alone(
    policy: &Policy,
    probe: &RequestProbe,
    reply: &str,
    tally: &mut verdict::Tally,
) -> Option<Decision> {
    if policy.guards.is_empty() {
        return None;
    }
    let hits = policy.guards.find(reply);
    if hits.is_empty() {
        return None;
    }
    let decision = policy.decide_guards(&hits);
    for h in tally.note_guards(policy, hits) {
        probe.guard_hit(&h.id, h.category);
    }
    Some(decision)
}

/// Provider token usage (`{"prompt_tokens", "completion_tokens"}`) onto the
/// request's spans.
pub fn observe_usage(probe: &RequestProbe, usage: &serde_json::Value) {
    let n = |k: &str| usage.get(k).and_then(serde_json::Value::as_u64);
    if let (Some(input), Some(output)) = (n("prompt_tokens"), n("completion_tokens")) {
        probe.set_usage(input, output);
    }
}
