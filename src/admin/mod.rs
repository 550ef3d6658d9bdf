//! The review API (`/admin/api/*`, bearer-token protected) and the review
//! console (`/admin`, static assets compiled into the binary).
//!
//! Mount: route every request whose path satisfies [`matches()`] to
//! [`handle`]. The handler is a plain async function over any
//! `http_body::Body`, so it fits a hyper service and tests alike.
//!
//! Invariants: every `/admin/api/*` request is authenticated before any
//! store access, with a constant-time token comparison; errors map to HTTP
//! in one place ([`AdminError::status`]); the admin token never appears in a
//! response or a log; conversation text appears only in authenticated
//! responses, never in logs.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use subtle::ConstantTimeEq as _;

use crate::audit::settings::AdminSettings;
use crate::audit::{AuditSink, AuditStore, Keyring, StoreError};

mod api;
mod console;

/// Largest request body accepted (review bodies are tiny).
pub const MAX_BODY: usize = 64 * 1024;

/// Returns the thresholds in force per category (indexed by label id), so
/// the summary can judge precision at the current policy.
pub type ThresholdSource = Arc<dyn Fn() -> [Option<f32>; 8] + Send + Sync>;

/// What the admin handler needs.
#[derive(Clone)]
pub struct AdminState {
    pub store: Arc<dyn AuditStore>,
    /// Opens record text; `None` shows records without text.
    pub keyring: Option<Keyring>,
    /// `None`: the API answers 503 until a token is configured.
    token: Option<String>,
    /// Current policy thresholds, when the gateway provides them.
    pub thresholds: Option<ThresholdSource>,
    /// The sink, to show queue counters in the summary.
    pub sink: Option<AuditSink>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("backend", &self.store.backend())
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

impl AdminState {
    /// State over `store`, opening text with `keyring`, guarded by the
    /// token in `admin`.
    pub fn new(
        store: Arc<dyn AuditStore>,
        keyring: Option<Keyring>,
        admin: &AdminSettings,
    ) -> AdminState {
        AdminState {
            store,
            keyring,
            token: admin.token.clone(),
            thresholds: None,
            sink: None,
        }
    }

    /// Provide the current thresholds (see [`ThresholdSource`]).
    pub fn with_thresholds(mut self, f: ThresholdSource) -> AdminState {
        self.thresholds = Some(f);
        self
    }

    /// Show this sink's counters in the summary.
    pub fn with_sink(mut self, sink: AuditSink) -> AdminState {
        self.sink = Some(sink);
        self
    }

    fn authorize(&self, headers: &http::HeaderMap) -> Result<(), AdminError> {
        let Some(expected) = &self.token else {
            return Err(AdminError::Disabled);
        };
        let presented = crate::proxy::auth::bearer_token(headers).ok_or(
            AdminError::Unauthorized("missing `Authorization: Bearer <admin token>` header"),
        )?;
        // ct_eq on slices of different lengths returns false without
        // comparing contents; the length of the token is not a secret worth
        // hiding (it is fixed by configuration).
        if bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
            Ok(())
        } else {
            Err(AdminError::Unauthorized("invalid admin token"))
        }
    }
}

/// Why an admin request failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error(
        "the admin API is disabled: set CAREWALL__ADMIN__TOKEN (or admin.token_file) to enable it"
    )]
    Disabled,
    /// A malformed request; `param` names the query parameter or body field.
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<&'static str>,
    },
    #[error("{0}")]
    NotFound(String),
    /// The record changed since the console read it (an undo of a label
    /// that is no longer the current one, or of none).
    #[error("{0}")]
    Conflict(String),
    #[error("method {method} not allowed here; allowed: {allow}")]
    MethodNotAllowed { method: String, allow: &'static str },
    #[error("request body larger than {MAX_BODY} bytes")]
    TooLarge,
    #[error("audit store error: {0}")]
    Store(#[from] StoreError),
}

impl AdminError {
    /// A 400 about the query parameter or body field `param`.
    pub fn bad(param: &'static str, message: impl Into<String>) -> AdminError {
        AdminError::BadRequest {
            message: message.into(),
            param: Some(param),
        }
    }

    /// A 400 about the request as a whole.
    pub fn bad_request(message: impl Into<String>) -> AdminError {
        AdminError::BadRequest {
            message: message.into(),
            param: None,
        }
    }

    /// The one mapping from admin errors to HTTP statuses.
    pub fn status(&self) -> StatusCode {
        match self {
            AdminError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AdminError::Disabled => StatusCode::SERVICE_UNAVAILABLE,
            AdminError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::Conflict(_) => StatusCode::CONFLICT,
            AdminError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            AdminError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            AdminError::Store(StoreError::Invalid(_)) => StatusCode::BAD_REQUEST,
            AdminError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `error.type`, as `/v1` uses it.
    fn kind(&self) -> &'static str {
        match self {
            AdminError::Unauthorized(_)
            | AdminError::BadRequest { .. }
            | AdminError::NotFound(_)
            | AdminError::Conflict(_)
            | AdminError::MethodNotAllowed { .. }
            | AdminError::TooLarge
            | AdminError::Store(StoreError::Invalid(_)) => "invalid_request_error",
            AdminError::Disabled => "service_unavailable",
            AdminError::Store(_) => "server_error",
        }
    }

    /// Stable machine code for `error.code`.
    fn code(&self) -> &'static str {
        match self {
            AdminError::Unauthorized(_) => "invalid_admin_token",
            AdminError::Disabled => "admin_disabled",
            AdminError::BadRequest { .. } | AdminError::Store(StoreError::Invalid(_)) => {
                "invalid_request"
            }
            AdminError::NotFound(_) => "not_found",
            AdminError::Conflict(_) => "conflict",
            AdminError::MethodNotAllowed { .. } => "method_not_allowed",
            AdminError::TooLarge => "request_too_large",
            AdminError::Store(_) => "store_error",
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            AdminError::BadRequest { param, .. } => *param,
            _ => None,
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let status = self.status();
        if status.is_server_error() && !matches!(self, AdminError::Disabled) {
            tracing::error!(error = %self, "admin request failed");
        }
        let body =
            crate::error::openai_error(&self.to_string(), self.kind(), self.code(), self.param());
        let mut resp = json_response(status, &body);
        if let AdminError::MethodNotAllowed { allow, .. } = &self {
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"carewall-admin\""),
            );
        }
        resp
    }
}

/// True for the paths [`handle`] serves: `/admin` and `/admin/...`.
pub fn matches(path: &str) -> bool {
    path == "/admin" || path.starts_with("/admin/")
}

/// Serve one admin request. Never fails: errors become JSON responses.
pub async fn handle<B>(req: Request<B>, state: &AdminState) -> Response<Full<Bytes>>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match route(req, state).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn route<B>(req: Request<B>, state: &AdminState) -> Result<Response<Full<Bytes>>, AdminError>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if let Some(asset) = console::asset(&path) {
        return match method {
            Method::GET | Method::HEAD => Ok(console::serve(asset)),
            m => Err(AdminError::MethodNotAllowed {
                method: m.to_string(),
                allow: "GET, HEAD",
            }),
        };
    }
    let Some(api_path) = path.strip_prefix("/admin/api/") else {
        return Err(AdminError::NotFound(format!("no admin page at {path}")));
    };
    // Authenticate before looking at anything else in the request.
    state.authorize(req.headers())?;
    let query = req.uri().query().unwrap_or("").to_string();
    let segments: Vec<&str> = api_path.split('/').collect();
    match (segments.as_slice(), &method) {
        (["records"], &Method::GET) => api::list(state, &query).await,
        (["records", id], &Method::GET) => api::get(state, &decode_segment(id)?).await,
        (["records", id, "review"], &Method::POST) => {
            let id = decode_segment(id)?;
            let body = read_body(req.into_body()).await?;
            api::review(state, &id, &body).await
        }
        (["records", id, "review", "undo"], &Method::POST) => {
            let id = decode_segment(id)?;
            let body = read_body(req.into_body()).await?;
            api::undo(state, &id, &body).await
        }
        (["export"], &Method::GET) => api::export(state, &query).await,
        (["summary"], &Method::GET) => api::summary(state).await,
        (["meta"], &Method::GET) => api::meta().await,
        (["records"], _)
        | (["records", _], _)
        | (["export"], _)
        | (["summary"], _)
        | (["meta"], _) => Err(AdminError::MethodNotAllowed {
            method: method.to_string(),
            allow: "GET",
        }),
        (["records", _, "review"], _) | (["records", _, "review", "undo"], _) => {
            Err(AdminError::MethodNotAllowed {
                method: method.to_string(),
                allow: "POST",
            })
        }
        _ => Err(AdminError::NotFound(format!(
            "no admin API endpoint at {path}; see GET /admin/api/records, /admin/api/records/{{request_id}}, POST /admin/api/records/{{request_id}}/review, POST /admin/api/records/{{request_id}}/review/undo, GET /admin/api/export, GET /admin/api/summary, GET /admin/api/meta"
        ))),
    }
}

fn decode_segment(s: &str) -> Result<String, AdminError> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| AdminError::bad_request("request id in the path is not valid UTF-8"))
}

async fn read_body<B>(body: B) -> Result<Bytes, AdminError>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(AdminError::TooLarge)
        }
        Err(e) => Err(AdminError::bad_request(format!(
            "cannot read request body: {e}"
        ))),
    }
}

/// A JSON response with the headers every admin response carries.
pub(crate) fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    bytes_response(status, "application/json", Bytes::from(bytes))
}

pub(crate) fn bytes_response(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Review data is sensitive: never cache it anywhere.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// Convert to a boxed body for services whose body type is
/// `BoxBody<Bytes, E>`.
pub fn boxed<E>(
    resp: Response<Full<Bytes>>,
) -> Response<http_body_util::combinators::BoxBody<Bytes, E>>
where
    E: 'static,
{
    resp.map(|b| b.map_err(|never: Infallible| match never {}).boxed())
}
