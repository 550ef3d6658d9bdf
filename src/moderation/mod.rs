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

pub use sink::{ClientIdentity, ExchangeOutcome, ExchangeRecord, ExchangeSink, NoopSink, Timings};
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
