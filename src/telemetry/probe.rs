//! [`RequestProbe`]: a shareable handle on one request's
//! [`RequestTelemetry`], for the places that each see part of a request
//! (the handler, the upstream client, the streaming engine's task).
//!
//! Every method is synchronous and holds the lock only for the call, never
//! across an await. A probe made with [`RequestProbe::none`] does nothing,
//! so the moderation engine's unit tests need no telemetry.

use std::sync::{Arc, Mutex, MutexGuard};

use http::HeaderMap;
use tracing::Span;

use super::{Classification, RequestTelemetry, UpstreamCall};
use crate::classifier::Category;

/// Shared handle on one request's telemetry. Cloning shares it. When the
/// last clone is dropped without [`RequestProbe::finish`], the request is
/// recorded as cut short (status 499, `client_cancelled`), which is what a
/// client disconnect looks like from here.
#[derive(Debug, Clone, Default)]
pub struct RequestProbe(Option<Arc<Mutex<Inner>>>);

#[derive(Debug)]
struct Inner {
    request: Option<RequestTelemetry>,
    /// The provider call in flight; replaced by a retry's call (the
    /// replaced one ends as `cancelled`, which is what happened to it).
    upstream: Option<UpstreamCall>,
}

impl RequestProbe {
    /// Share `telemetry` between the parts of the proxy handling it.
    pub fn new(telemetry: RequestTelemetry) -> RequestProbe {
        RequestProbe(Some(Arc::new(Mutex::new(Inner {
            request: Some(telemetry),
            upstream: None,
        }))))
    }

    /// A probe that records nothing.
    pub fn none() -> RequestProbe {
        RequestProbe(None)
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> Option<R> {
        let m = self.0.as_ref()?;
        // A panic elsewhere while holding the lock leaves plain data behind;
        // telemetry keeps going rather than failing the request.
        let mut g: MutexGuard<'_, Inner> = m.lock().unwrap_or_else(|p| p.into_inner());
        Some(f(&mut g))
    }

    fn with_request<R>(&self, f: impl FnOnce(&mut RequestTelemetry) -> R) -> Option<R> {
        self.with(|i| i.request.as_mut().map(f)).flatten()
    }

    /// The request span (disabled when there is none), to instrument work
    /// so its log lines carry the request id.
    pub fn span(&self) -> Span {
        self.with_request(|r| r.span().clone())
            .unwrap_or_else(Span::none)
    }

    /// See [`RequestTelemetry::set_request`].
    pub fn set_request(&self, model: &str, stream: bool) {
        self.with_request(|r| r.set_request(model, stream));
    }

    /// See [`RequestTelemetry::set_streaming`].
    pub fn set_streaming(&self, streaming: &'static str) {
        self.with_request(|r| r.set_streaming(streaming));
    }

    /// Open the span of a provider call and write its `traceparent` into
    /// the outgoing `headers`. A call still open is ended as cancelled.
    pub fn upstream_call(&self, headers: &mut HeaderMap) {
        self.with(|i| {
            if let Some(r) = i.request.as_mut() {
                i.upstream = Some(r.upstream_call(headers));
            }
        });
    }

    /// The provider call in flight has ended (see [`UpstreamCall::finish`]).
    pub fn finish_upstream(&self, status: Option<u16>, error: Option<&'static str>) {
        if let Some(Some(call)) = self.with(|i| i.upstream.take()) {
            call.finish(status, error);
        }
    }

    /// See [`RequestTelemetry::upstream_first_token`].
    pub fn upstream_first_token(&self) {
        self.with_request(RequestTelemetry::upstream_first_token);
    }

    /// See [`RequestTelemetry::client_first_token`].
    pub fn client_first_token(&self) {
        self.with_request(RequestTelemetry::client_first_token);
    }

    /// See [`RequestTelemetry::classification`]; `None` for a probe that
    /// records nothing.
    pub fn classification(&self, stage: &'static str) -> Option<Classification> {
        self.with_request(|r| r.classification(stage))
    }

    /// See [`RequestTelemetry::decision`].
    pub fn decision(
        &self,
        policy: &str,
        category: Category,
        score: f32,
        action: &'static str,
        mode: &'static str,
    ) {
        self.with_request(|r| r.decision(policy, category, score, action, mode));
    }

    /// See [`RequestTelemetry::set_verdict`].
    pub fn set_verdict(
        &self,
        category: &'static str,
        action: &'static str,
        mode: &'static str,
        policy: &str,
    ) {
        self.with_request(|r| r.set_verdict(category, action, mode, policy));
    }

    /// See [`RequestTelemetry::set_tenant`].
    pub fn set_tenant(&self, tenant: Arc<str>) {
        self.with_request(|r| r.set_tenant(tenant));
    }

    /// See [`RequestTelemetry::guard_hit`].
    pub fn guard_hit(&self, guard: &Arc<str>, category: Category) {
        self.with_request(|r| r.guard_hit(guard, category));
    }

    /// Usage reported by the provider, on the request and upstream spans.
    pub fn set_usage(&self, input_tokens: u64, output_tokens: u64) {
        self.with(|i| {
            if let Some(r) = i.request.as_ref() {
                r.set_usage(input_tokens, output_tokens);
            }
            if let Some(u) = i.upstream.as_ref() {
                super::spans::record_usage(u.span(), input_tokens, output_tokens);
            }
        });
    }

    /// The model the provider says answered, on the request and upstream
    /// spans.
    pub fn set_response_model(&self, model: &str) {
        self.with(|i| {
            if let Some(r) = i.request.as_ref() {
                r.set_response_model(model);
            }
            if let Some(u) = i.upstream.as_ref() {
                super::spans::record_response_model(u.span(), model);
            }
        });
    }

    /// See [`RequestTelemetry::unknown_fields`].
    pub fn unknown_fields(&self, action: &'static str, n: u64) {
        self.with_request(|r| r.unknown_fields(action, n));
    }

    /// See [`RequestTelemetry::set_error`].
    pub fn set_error(&self, kind: &'static str) {
        self.with_request(|r| r.set_error(kind));
    }

    /// The response has ended with `status`: ends an open provider call,
    /// then records the request (metrics, access-log line, span). Later
    /// calls, and the other clones' drops, do nothing.
    pub fn finish(&self, status: u16) {
        let taken = self.with(|i| (i.upstream.take(), i.request.take()));
        if let Some((upstream, request)) = taken {
            if let Some(u) = upstream {
                u.finish(None, None);
            }
            if let Some(r) = request {
                r.finish(status);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{Metrics, TelemetrySettings};

    fn probe(metrics: &Metrics) -> RequestProbe {
        RequestProbe::new(RequestTelemetry::start(
            metrics,
            &http::Method::POST,
            "/v1/chat/completions",
            "req-1",
            &HeaderMap::new(),
        ))
    }

    fn requests(metrics: &Metrics, status: &str) -> bool {
        metrics.render_prometheus().lines().any(|l| {
            l.starts_with("carewall_requests_total")
                && l.contains(&format!("status=\"{status}\""))
                && !l.ends_with(" 0")
        })
    }

    #[test]
    fn finish_records_once_and_dropping_unfinished_records_499() {
        let settings = TelemetrySettings::default();
        let metrics = Metrics::new(&settings).expect("metrics");
        let p = probe(&metrics);
        let q = p.clone();
        p.finish(200);
        q.finish(500);
        drop((p, q));
        assert!(requests(&metrics, "200"));
        assert!(!requests(&metrics, "500"));

        let metrics = Metrics::new(&settings).expect("metrics");
        let p = probe(&metrics);
        let q = p.clone();
        drop(p);
        assert!(!requests(&metrics, "499"), "a clone is still alive");
        drop(q);
        assert!(requests(&metrics, "499"));
    }

    #[test]
    fn none_records_nothing() {
        let p = RequestProbe::none();
        assert!(p.classification("final").is_none());
        p.finish(200);
    }
}
