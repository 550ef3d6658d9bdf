//! The one place where carewall's spans and their OpenTelemetry attribute
//! names are defined.
//!
//! Every helper takes enums, ids, model names and numbers only: there is no
//! parameter through which conversation text could reach a span. Fields are
//! declared empty when the span opens and filled later with the `record_*`
//! functions (`tracing` ignores fields a span did not declare).
//!
//! Span tree for one request:
//! ```text
//! carewall.request            (server; parent = incoming traceparent, if any)
//! ├── carewall.upstream       (client; GenAI `chat` call; its context goes upstream)
//! ├── carewall.classify       (one per classification: window checks, final)
//! └── carewall.decision       (the policy's verdict)
//! ```

use http::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::field::Empty;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::classifier::Category;

/// Span names, for tests and dashboards.
pub mod names {
    pub const REQUEST: &str = "carewall.request";
    pub const UPSTREAM: &str = "carewall.upstream";
    pub const CLASSIFY: &str = "carewall.classify";
    pub const DECISION: &str = "carewall.decision";
}

/// Attribute keys as they appear in exported spans (OpenTelemetry GenAI
/// and HTTP semantic conventions where they apply, `carewall.*` otherwise).
pub mod attr {
    pub const GEN_AI_SYSTEM: &str = "gen_ai.system";
    pub const GEN_AI_OPERATION_NAME: &str = "gen_ai.operation.name";
    pub const GEN_AI_REQUEST_MODEL: &str = "gen_ai.request.model";
    pub const GEN_AI_RESPONSE_MODEL: &str = "gen_ai.response.model";
    pub const GEN_AI_USAGE_INPUT_TOKENS: &str = "gen_ai.usage.input_tokens";
    pub const GEN_AI_USAGE_OUTPUT_TOKENS: &str = "gen_ai.usage.output_tokens";
    pub const HTTP_REQUEST_METHOD: &str = "http.request.method";
    pub const HTTP_ROUTE: &str = "http.route";
    pub const HTTP_RESPONSE_STATUS_CODE: &str = "http.response.status_code";
    pub const ERROR_TYPE: &str = "error.type";
    pub const REQUEST_ID: &str = "carewall.request_id";
    pub const CATEGORY: &str = "carewall.category";
    pub const ACTION: &str = "carewall.action";
    pub const MODE: &str = "carewall.mode";
    pub const POLICY: &str = "carewall.policy";
    pub const STREAMING: &str = "carewall.streaming";
    pub const SCORE: &str = "carewall.score";
    pub const CLASSIFY_STAGE: &str = "carewall.classify.stage";
    pub const CLASSIFY_INDEX: &str = "carewall.classify.index";
    pub const GUARDS: &str = "carewall.guards";
    pub const TENANT: &str = "carewall.tenant";
}

/// The span of one client request. Opens as a child of the caller's trace
/// when `headers` carry a valid W3C `traceparent`, else as a new root.
///
/// `route` is the matched route (`/v1/chat/completions`), never the raw
/// path; `request_id` is the id also sent back in `x-carewall-request-id`.
pub fn request_span(
    method: &http::Method,
    route: &'static str,
    request_id: &str,
    headers: &HeaderMap,
) -> Span {
    let span = tracing::info_span!(
        "carewall.request",
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = method.as_str(),
        http.route = route,
        http.response.status_code = Empty,
        carewall.request_id = request_id,
        carewall.streaming = Empty,
        gen_ai.system = Empty,
        gen_ai.operation.name = Empty,
        gen_ai.request.model = Empty,
        gen_ai.response.model = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        carewall.category = Empty,
        carewall.action = Empty,
        carewall.mode = Empty,
        carewall.policy = Empty,
        carewall.guards = Empty,
        carewall.tenant = Empty,
        error.type = Empty,
    );
    let parent = extract_context(headers);
    if parent.span().span_context().is_valid() {
        // Fails only when no OpenTelemetry layer is installed (telemetry
        // off), where there is no trace to join anyway.
        let _ = span.set_parent(parent);
    }
    span
}

/// The upstream (provider) call: a GenAI client span. Pass its context on
/// with [`inject_context`] so the provider's spans join the trace.
pub fn upstream_span(parent: &Span, request_model: &str) -> Span {
    tracing::info_span!(
        parent: parent,
        "carewall.upstream",
        otel.kind = "client",
        otel.status_code = Empty,
        gen_ai.system = "openai",
        gen_ai.operation.name = "chat",
        gen_ai.request.model = request_model,
        gen_ai.response.model = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        http.response.status_code = Empty,
        error.type = Empty,
    )
}

/// One classification. `stage` says which (`"window"`, `"final"`,
/// `"buffer"`, `"retry"`, `"moderations"`), `index` counts them within the
/// request (0-based).
pub fn classify_span(parent: &Span, stage: &'static str, index: u32) -> Span {
    tracing::info_span!(
        parent: parent,
        "carewall.classify",
        otel.status_code = Empty,
        carewall.classify.stage = stage,
        carewall.classify.index = i64::from(index),
        carewall.category = Empty,
        carewall.score = Empty,
        error.type = Empty,
    )
}

/// The policy decision for one classification result.
pub fn decision_span(parent: &Span, policy: &str) -> Span {
    tracing::info_span!(
        parent: parent,
        "carewall.decision",
        carewall.policy = policy,
        carewall.category = Empty,
        carewall.action = Empty,
        carewall.mode = Empty,
        carewall.score = Empty,
    )
}

/// Put a verdict on a request or decision span: the category that decided,
/// the action (`allow`, `annotate`, `append`, `replace`, `retry`, `block`),
/// the mode (`enforce`, `shadow`, or `none` when nothing was flagged) and the policy's name.
/// `category` is the verdict's label (`Verdict::category_label`: a
/// category key, `unclassified` or `none`).
pub fn record_verdict(
    span: &Span,
    category: &'static str,
    action: &'static str,
    mode: &'static str,
    policy: &str,
) {
    span.record(attr::CATEGORY, category);
    span.record(attr::ACTION, action);
    span.record(attr::MODE, mode);
    span.record(attr::POLICY, policy);
}

/// The guards that matched the response so far (ids from the policy
/// file, comma-separated), on the request span.
pub fn record_guards(span: &Span, ids: &str) {
    span.record(attr::GUARDS, ids);
}

/// The client key's tenant name (never the key), on the request span.
pub fn record_tenant(span: &Span, tenant: &str) {
    span.record(attr::TENANT, tenant);
}

/// Put a classification's top category and its probability on a classify
/// (or decision) span.
pub fn record_classification(span: &Span, top: Category, score: f32) {
    span.record(attr::CATEGORY, top.key());
    span.record(attr::SCORE, f64::from(score));
}

/// The streaming moderation mode used (`buffer`, `window`, `observe`, `off`).
pub fn record_streaming(span: &Span, streaming: &'static str) {
    span.record(attr::STREAMING, streaming);
}

/// The model the client asked for, on the request span; also marks it as a
/// GenAI `chat` operation.
pub fn record_request_model(span: &Span, model: &str) {
    span.record(attr::GEN_AI_SYSTEM, "openai");
    span.record(attr::GEN_AI_OPERATION_NAME, "chat");
    span.record(attr::GEN_AI_REQUEST_MODEL, model);
}

/// The model the provider says answered.
pub fn record_response_model(span: &Span, model: &str) {
    span.record(attr::GEN_AI_RESPONSE_MODEL, model);
}

/// Token usage as reported by the provider.
pub fn record_usage(span: &Span, input_tokens: u64, output_tokens: u64) {
    // As i64: tracing-opentelemetry exports `u64` fields as strings.
    let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    span.record(attr::GEN_AI_USAGE_INPUT_TOKENS, int(input_tokens));
    span.record(attr::GEN_AI_USAGE_OUTPUT_TOKENS, int(output_tokens));
}

/// HTTP status sent to the client (request span) or received from the
/// provider (upstream span). 5xx also marks the span as an error.
pub fn record_status(span: &Span, status: u16) {
    span.record(attr::HTTP_RESPONSE_STATUS_CODE, i64::from(status));
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
}

/// Mark a span failed with a low-cardinality error kind (`timeout`,
/// `upstream_5xx`, `classifier_error`, `client_cancelled`, ...). Never pass
/// an error message here: messages can quote request content.
pub fn record_error(span: &Span, kind: &'static str) {
    span.record(attr::ERROR_TYPE, kind);
    span.record("otel.status_code", "ERROR");
}

/// The trace id of a span as 32 hex digits, for log lines and responses;
/// `None` when tracing is off or the span is not recorded.
pub fn trace_id(span: &Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// The W3C trace context carried by `traceparent`/`tracestate` in
/// `headers` (an empty context when absent or malformed).
pub fn extract_context(headers: &HeaderMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Write `span`'s trace context as `traceparent` (and `tracestate`) into
/// the upstream request's headers, replacing any the client sent. When
/// tracing is off the headers are left as they are, so a client's own
/// `traceparent` still passes through untouched.
pub fn inject_context(span: &Span, headers: &mut HeaderMap) {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    headers.remove("tracestate");
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator only writes `traceparent`/`tracestate` with values
        // it formatted itself, so both conversions succeed; skip otherwise.
        if let (Ok(name), Ok(value)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn extract_reads_a_valid_traceparent() {
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", http::HeaderValue::from_static(PARENT));
        let cx = extract_context(&headers);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid());
        assert!(sc.is_remote());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
    }

    #[test]
    fn extract_ignores_garbage() {
        for bad in [
            "",
            "00-xyz",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            let mut headers = HeaderMap::new();
            headers.insert("traceparent", http::HeaderValue::from_static(bad));
            assert!(
                !extract_context(&headers).span().span_context().is_valid(),
                "{bad}"
            );
        }
    }

    #[test]
    fn inject_without_tracing_leaves_client_headers_alone() {
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", http::HeaderValue::from_static(PARENT));
        // No subscriber in this test: the span is disabled.
        let span = request_span(&http::Method::POST, "/v1/chat/completions", "r1", &headers);
        let mut upstream = headers.clone();
        inject_context(&span, &mut upstream);
        assert_eq!(upstream, headers);
        assert_eq!(trace_id(&span), None);
    }
}
