//! The gateway's request-level error type and its one mapping to HTTP.
//!
//! Every error a client can see is a [`GatewayError`]; [`GatewayError::status`],
//! [`GatewayError::kind`] and [`GatewayError::code`] are exhaustive matches, and
//! the OpenAI-shaped body (`{"error": {"message", "type", "code", "param"}}`)
//! is built only by [`openai_error`] (for `/v1` in [`GatewayError::body`]),
//! so SDKs show every error properly.

use http::StatusCode;
use serde_json::json;

/// The one OpenAI-shaped error body, `{"error": {"message", "type", "code",
/// "param"}}`, shared by `/v1` ([`GatewayError::body`]) and the admin API
/// (`crate::admin::AdminError`), so every client reads one shape.
pub fn openai_error(
    message: &str,
    kind: &str,
    code: &str,
    param: Option<&str>,
) -> serde_json::Value {
    json!({"error": {"message": message, "type": kind, "code": code, "param": param}})
}

/// Who caused an error: decides the status class and the log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Client,
    Upstream,
    Internal,
}

/// Why a request failed before (or instead of) a normal response.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The request is malformed; the message names the field and the fix.
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<String>,
    },
    /// `server.client_keys` is set and the request's bearer key is missing
    /// or not one of them.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The request's `x-carewall-policy` names a policy its client key may
    /// not use (`server.client_keys`: `policy`, `allowed_policies`).
    #[error("x-carewall-policy: `{value}` is not allowed for this client key; allowed: {}", allowed.join(", "))]
    PolicyNotAllowed { value: String, allowed: Vec<String> },
    #[error("request body is larger than server.max_body_bytes ({limit} bytes)")]
    PayloadTooLarge { limit: usize },
    #[error("no route for {method} {path}; carewall serves POST /v1/chat/completions, GET /v1/models, POST /v1/moderations, GET /healthz, GET /readyz")]
    NotFound { method: String, path: String },
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    /// `upstream.base_url` is not set: only `/v1/moderations` works.
    #[error("no upstream is configured: set upstream.base_url (or CAREWALL__UPSTREAM__BASE_URL)")]
    NoUpstream,
    #[error("could not reach the upstream: {0}")]
    UpstreamConnect(String),
    #[error("the upstream did not answer within {phase} timeout ({ms} ms)")]
    UpstreamTimeout { phase: &'static str, ms: u64 },
    /// The upstream answered with an error status. `body` is its
    /// OpenAI-shaped error object when it sent one.
    #[error("the upstream answered {status}: {message}")]
    UpstreamStatus {
        status: StatusCode,
        message: String,
        body: Option<serde_json::Value>,
    },
    #[error("the upstream sent an invalid response: {0}")]
    UpstreamProtocol(String),
    /// The classifier is not loaded yet or failed (for `/v1/moderations`;
    /// chat requests follow the policy's `on_error` instead).
    #[error("the classifier is unavailable: {0}")]
    ClassifierUnavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl GatewayError {
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> GatewayError {
        GatewayError::BadRequest {
            message: message.into(),
            param: param.map(str::to_string),
        }
    }

    pub fn source(&self) -> Source {
        match self {
            GatewayError::BadRequest { .. }
            | GatewayError::Unauthorized(_)
            | GatewayError::PolicyNotAllowed { .. }
            | GatewayError::PayloadTooLarge { .. }
            | GatewayError::NotFound { .. }
            | GatewayError::MethodNotAllowed { .. } => Source::Client,
            GatewayError::UpstreamConnect(_)
            | GatewayError::UpstreamTimeout { .. }
            | GatewayError::UpstreamStatus { .. }
            | GatewayError::UpstreamProtocol(_) => Source::Upstream,
            GatewayError::NoUpstream
            | GatewayError::ClassifierUnavailable(_)
            | GatewayError::Internal(_) => Source::Internal,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            GatewayError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            GatewayError::PolicyNotAllowed { .. } => StatusCode::FORBIDDEN,
            GatewayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::NotFound { .. } => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::NoUpstream | GatewayError::ClassifierUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::UpstreamConnect(_) | GatewayError::UpstreamProtocol(_) => {
                StatusCode::BAD_GATEWAY
            }
            GatewayError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            // Client-caused upstream errors (bad model name, rate limit)
            // keep their status so SDK retry logic works; the gateway's own
            // credentials being refused, or a provider fault, is a 502.
            GatewayError::UpstreamStatus { status, .. } => match status.as_u16() {
                401 | 403 => StatusCode::BAD_GATEWAY,
                400..=499 => *status,
                _ => StatusCode::BAD_GATEWAY,
            },
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `error.type`.
    pub fn kind(&self) -> &'static str {
        match self {
            GatewayError::BadRequest { .. }
            | GatewayError::Unauthorized(_)
            | GatewayError::PolicyNotAllowed { .. }
            | GatewayError::PayloadTooLarge { .. }
            | GatewayError::NotFound { .. }
            | GatewayError::MethodNotAllowed { .. } => "invalid_request_error",
            GatewayError::UpstreamConnect(_)
            | GatewayError::UpstreamTimeout { .. }
            | GatewayError::UpstreamStatus { .. }
            | GatewayError::UpstreamProtocol(_) => "upstream_error",
            GatewayError::NoUpstream | GatewayError::ClassifierUnavailable(_) => {
                "service_unavailable"
            }
            GatewayError::Internal(_) => "server_error",
        }
    }

    /// Stable machine code for `error.code`.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::BadRequest { .. } => "invalid_request",
            GatewayError::Unauthorized(_) => "invalid_api_key",
            GatewayError::PolicyNotAllowed { .. } => "policy_not_allowed",
            GatewayError::PayloadTooLarge { .. } => "request_too_large",
            GatewayError::NotFound { .. } => "not_found",
            GatewayError::MethodNotAllowed { .. } => "method_not_allowed",
            GatewayError::NoUpstream => "upstream_not_configured",
            GatewayError::UpstreamConnect(_) => "upstream_unreachable",
            GatewayError::UpstreamTimeout { .. } => "upstream_timeout",
            GatewayError::UpstreamStatus { status, .. } => match status.as_u16() {
                401 | 403 => "upstream_auth_rejected",
                429 => "upstream_rate_limited",
                400..=499 => "upstream_rejected_request",
                _ => "upstream_server_error",
            },
            GatewayError::UpstreamProtocol(_) => "upstream_protocol_error",
            GatewayError::ClassifierUnavailable(_) => "classifier_unavailable",
            GatewayError::Internal(_) => "internal_error",
        }
    }

    /// The JSON body sent to the client.
    pub fn body(&self) -> serde_json::Value {
        // A provider's own error for a client mistake (bad model name, rate
        // limit) is more useful to the client than a rewrap: pass it as is.
        if let GatewayError::UpstreamStatus {
            status,
            body: Some(b),
            ..
        } = self
        {
            if matches!(status.as_u16(), 400..=499)
                && !matches!(status.as_u16(), 401 | 403)
                && b.get("error").is_some()
            {
                return b.clone();
            }
        }
        let message = match self {
            GatewayError::UpstreamStatus { status, .. } if matches!(status.as_u16(), 401 | 403) => {
                format!(
                "the upstream refused the gateway's provider key ({status}); check upstream.api_key"
            )
            }
            other => other.to_string(),
        };
        let param = match self {
            GatewayError::BadRequest { param, .. } => param.clone(),
            _ => None,
        };
        openai_error(&message, self.kind(), self.code(), param.as_deref())
    }

    /// Log at warn for upstream and internal problems, debug for client ones.
    pub fn log_level(&self) -> tracing::Level {
        match self.source() {
            Source::Client => tracing::Level::DEBUG,
            Source::Upstream => tracing::Level::WARN,
            Source::Internal => tracing::Level::ERROR,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_statuses_map_sensibly() {
        let e = |s: u16| GatewayError::UpstreamStatus {
            status: StatusCode::from_u16(s).expect("status"),
            message: "m".into(),
            body: None,
        };
        assert_eq!(e(400).status(), StatusCode::BAD_REQUEST);
        assert_eq!(e(429).status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e(401).status(), StatusCode::BAD_GATEWAY);
        assert_eq!(e(503).status(), StatusCode::BAD_GATEWAY);
        assert_eq!(e(401).code(), "upstream_auth_rejected");
        let body = e(401).body();
        assert!(body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("upstream.api_key"));
    }

    #[test]
    fn body_is_openai_shaped() {
        let b = GatewayError::bad_request("messages: required", Some("messages")).body();
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["code"], "invalid_request");
        assert_eq!(b["error"]["param"], "messages");
    }
}
