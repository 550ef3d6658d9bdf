//! Per-request telemetry in one value: the proxy creates a
//! [`RequestTelemetry`] when a request arrives, moves it into the response
//! body (or stream adapter), and telemetry is complete when it is finished
//! or dropped: spans closed with their attributes, metrics recorded once,
//! one access-log line written.
//!
//! It is built on the free functions in [`super::spans`] and on
//! [`Metrics`]; the proxy can use those directly instead where that fits
//! better, but then it must keep the same "once per request" rules.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderMap;
use tracing::Span;

use super::spans;
use super::{log_access, AccessLog, Metrics};
use crate::classifier::Category;

/// Telemetry state of one client request. Not `Clone`: exactly one owner
/// finishes it, so metrics and the access log are written once.
#[derive(Debug)]
pub struct RequestTelemetry {
    metrics: Metrics,
    span: Span,
    request_id: String,
    method: http::Method,
    route: &'static str,
    received: Instant,
    stream: bool,
    streaming: Option<&'static str>,
    model: Option<String>,
    upstream_sent: Option<Instant>,
    upstream_first_token: Option<Instant>,
    client_first_token: Option<Instant>,
    verdict: Option<Verdict>,
    policy: Option<String>,
    error: Option<&'static str>,
    classifications: u32,
    /// The client key's tenant (its `name`, or `unnamed`).
    tenant: Option<Arc<str>>,
    /// Guards that matched the response, each once.
    guards: Vec<Arc<str>>,
    finished: bool,
}

#[derive(Debug, Clone, Copy)]
struct Verdict {
    category: &'static str,
    action: &'static str,
    mode: &'static str,
}

impl RequestTelemetry {
    /// At request start, once the route is matched and the request id made:
    /// opens the `carewall.request` span (joined to an incoming
    /// `traceparent`) and starts the clock.
    pub fn start(
        metrics: &Metrics,
        method: &http::Method,
        route: &'static str,
        request_id: &str,
        headers: &HeaderMap,
    ) -> Self {
        RequestTelemetry {
            metrics: metrics.clone(),
            span: spans::request_span(method, route, request_id, headers),
            request_id: request_id.to_owned(),
            method: method.clone(),
            route,
            received: Instant::now(),
            stream: false,
            streaming: None,
            model: None,
            upstream_sent: None,
            upstream_first_token: None,
            client_first_token: None,
            verdict: None,
            policy: None,
            error: None,
            classifications: 0,
            tenant: None,
            guards: Vec::new(),
            finished: false,
        }
    }

    /// The request span: enter it (or `.instrument(span.clone())` futures)
    /// so log lines written while handling carry the request id.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// The model the client asked for and whether it asked for a stream.
    pub fn set_request(&mut self, model: &str, stream: bool) {
        spans::record_request_model(&self.span, model);
        self.model = Some(model.to_owned());
        self.stream = stream;
    }

    /// The streaming moderation mode chosen (`buffer`, `window`,
    /// `observe`, `off`).
    pub fn set_streaming(&mut self, streaming: &'static str) {
        spans::record_streaming(&self.span, streaming);
        self.streaming = Some(streaming);
    }

    /// Just before the provider request is sent: opens `carewall.upstream`
    /// and writes its `traceparent` into the outgoing `headers`. Call again
    /// for a retry; each call is its own span.
    pub fn upstream_call(&mut self, headers: &mut HeaderMap) -> UpstreamCall {
        let model = self.model.as_deref().unwrap_or("");
        let span = spans::upstream_span(&self.span, model);
        spans::inject_context(&span, headers);
        let sent = Instant::now();
        self.upstream_sent = Some(sent);
        self.upstream_first_token = None;
        UpstreamCall {
            span,
            sent,
            metrics: self.metrics.clone(),
            route: self.route,
            finished: false,
        }
    }

    /// The first content byte of the provider's answer arrived (first SSE
    /// delta with content, or the whole body when not streaming).
    pub fn upstream_first_token(&mut self) {
        if self.upstream_first_token.is_none() {
            self.upstream_first_token = Some(Instant::now());
        }
    }

    /// The first content byte was released to the client. Later calls are
    /// ignored.
    pub fn client_first_token(&mut self) {
        if self.client_first_token.is_none() {
            self.client_first_token = Some(Instant::now());
        }
    }

    /// Before submitting a pair to the classifier. `stage`: `window`,
    /// `final`, `buffer`, `retry` or `moderations`.
    pub fn classification(&mut self, stage: &'static str) -> Classification {
        let index = self.classifications;
        self.classifications += 1;
        Classification {
            span: spans::classify_span(&self.span, stage, index),
            stage,
            started: Instant::now(),
            metrics: self.metrics.clone(),
        }
    }

    /// One policy decision on a classification result: a closed
    /// `carewall.decision` span with the verdict. Does not change the
    /// response's verdict; call [`RequestTelemetry::set_verdict`] for that.
    pub fn decision(
        &self,
        policy: &str,
        category: Category,
        score: f32,
        action: &'static str,
        mode: &'static str,
    ) {
        let span = spans::decision_span(&self.span, policy);
        spans::record_classification(&span, category, score);
        spans::record_verdict(&span, category.key(), action, mode, policy);
    }

    /// The response's final verdict (the one sent in its `moderation`
    /// object). Recorded on the request span now, counted in
    /// `carewall_responses_total` when the request finishes. A later call
    /// replaces an earlier one.
    pub fn set_verdict(
        &mut self,
        category: &'static str,
        action: &'static str,
        mode: &'static str,
        policy: &str,
    ) {
        spans::record_verdict(&self.span, category, action, mode, policy);
        self.verdict = Some(Verdict {
            category,
            action,
            mode,
        });
        self.policy = Some(policy.to_owned());
    }

    /// Unknown delta fields of the response (see `moderation::fields`).
    pub fn unknown_fields(&self, action: &'static str, n: u64) {
        self.metrics.record_unknown_fields(action, n);
    }

    /// The tenant of the request's client key (its `name`, `unnamed` for
    /// a key without one; never the key): on the request span, the access
    /// log and the `tenant` label of `carewall_requests_total`.
    pub fn set_tenant(&mut self, tenant: Arc<str>) {
        spans::record_tenant(&self.span, &tenant);
        self.tenant = Some(tenant);
    }

    /// A policy guard matched the response (call once per guard): counted
    /// in `carewall_guard_hits_total{guard,category}` and listed in the
    /// request span's `carewall.guards` and the access log.
    pub fn guard_hit(&mut self, guard: &Arc<str>, category: Category) {
        self.metrics.record_guard_hit(guard.clone(), category);
        if !self.guards.contains(guard) {
            self.guards.push(guard.clone());
        }
        spans::record_guards(&self.span, &self.guards_label());
    }

    fn guards_label(&self) -> String {
        self.guards
            .iter()
            .map(|g| &**g)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Token usage reported by the provider.
    pub fn set_usage(&self, input_tokens: u64, output_tokens: u64) {
        spans::record_usage(&self.span, input_tokens, output_tokens);
    }

    /// The model the provider says answered.
    pub fn set_response_model(&self, model: &str) {
        spans::record_response_model(&self.span, model);
    }

    /// Mark the request failed with a low-cardinality kind (`timeout`,
    /// `upstream_error`, `classifier_error`, `client_cancelled`, ...).
    pub fn set_error(&mut self, kind: &'static str) {
        spans::record_error(&self.span, kind);
        self.error = Some(kind);
    }

    /// The response has ended (last byte sent, or the stream ended in any
    /// way): records the status, TTFT figures, the verdict count and the
    /// request count, writes the access-log line and closes the span.
    /// `status` is the HTTP status sent to the client.
    pub fn finish(mut self, status: u16) {
        self.finish_inner(status);
    }

    fn finish_inner(&mut self, status: u16) {
        if self.finished {
            return;
        }
        self.finished = true;
        spans::record_status(&self.span, status);
        self.metrics
            .record_tenant_request(self.route, status, self.tenant.clone());
        if let Some(v) = self.verdict {
            self.metrics.record_response(v.category, v.action, v.mode);
        }
        let ttft = self
            .client_first_token
            .map(|t| t.saturating_duration_since(self.received));
        let upstream_ttft = match (self.upstream_sent, self.upstream_first_token) {
            (Some(sent), Some(first)) => Some(first.saturating_duration_since(sent)),
            _ => None,
        };
        let added = match (ttft, upstream_ttft) {
            (Some(client), Some(upstream)) => {
                self.metrics
                    .record_ttft(self.streaming.unwrap_or("off"), client, upstream);
                Some(client.saturating_sub(upstream))
            }
            _ => None,
        };
        let trace_id = spans::trace_id(&self.span);
        let guards = (!self.guards.is_empty()).then(|| self.guards_label());
        let _entered = self.span.enter();
        log_access(&AccessLog {
            request_id: &self.request_id,
            method: self.method.as_str(),
            route: self.route,
            status,
            duration: self.received.elapsed(),
            stream: self.stream,
            model: self.model.as_deref(),
            streaming: self.streaming,
            category: self.verdict.map(|v| v.category),
            action: self.verdict.map(|v| v.action),
            mode: self.verdict.map(|v| v.mode),
            policy: self.policy.as_deref(),
            ttft,
            added_ttft: added,
            trace_id: trace_id.as_deref(),
            error: self.error,
            tenant: self.tenant.as_deref(),
            guards: guards.as_deref(),
        });
    }
}

impl Drop for RequestTelemetry {
    /// A request dropped unfinished was cut short (client went away, task
    /// cancelled): it still gets its metrics and access-log line, with
    /// status 499 (client closed request, as nginx logs it).
    fn drop(&mut self) {
        if !self.finished {
            if self.error.is_none() {
                self.set_error("client_cancelled");
            }
            self.finish_inner(499);
        }
    }
}

/// One provider call; finish it when the provider's response has ended.
#[derive(Debug)]
pub struct UpstreamCall {
    span: Span,
    sent: Instant,
    metrics: Metrics,
    route: &'static str,
    finished: bool,
}

impl UpstreamCall {
    /// The `carewall.upstream` span, e.g. to record the response model.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// The provider's response has ended (or failed, with `error` set):
    /// records its status and duration.
    pub fn finish(mut self, status: Option<u16>, error: Option<&'static str>) {
        self.finish_inner(status, error);
    }

    fn finish_inner(&mut self, status: Option<u16>, error: Option<&'static str>) {
        self.finished = true;
        if let Some(status) = status {
            spans::record_status(&self.span, status);
        }
        if let Some(kind) = error {
            spans::record_error(&self.span, kind);
        }
        self.metrics
            .record_upstream_latency(self.route, self.sent.elapsed());
    }
}

impl Drop for UpstreamCall {
    fn drop(&mut self) {
        if !self.finished {
            self.finish_inner(None, Some("cancelled"));
        }
    }
}

/// One classification in flight.
#[derive(Debug)]
pub struct Classification {
    span: Span,
    stage: &'static str,
    started: Instant,
    metrics: Metrics,
}

impl Classification {
    /// Scores came back: records the top category and its probability, and
    /// the latency.
    pub fn done(self, top: Category, score: f32) -> Duration {
        spans::record_classification(&self.span, top, score);
        let latency = self.started.elapsed();
        self.metrics.record_classification(self.stage, latency);
        latency
    }

    /// The classifier failed (`timeout`, `overloaded`, `error`).
    pub fn failed(self, kind: &'static str) {
        spans::record_error(&self.span, kind);
        self.metrics.record_classifier_error(kind);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The proxy moves these into spawned tasks and response bodies.
    #[test]
    fn request_parts_can_move_across_tasks() {
        fn movable<T: Send + Sync + 'static>() {}
        movable::<RequestTelemetry>();
        movable::<UpstreamCall>();
        movable::<Classification>();
        movable::<Metrics>();
    }
}
