//! Routes. Each handler reads the request, calls into `moderation`, and
//! returns a response; errors bubble up to [`handle`], which maps them.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{field::Empty, Instrument};

use super::body::{error_response, json_response, sse_response, Body, DeadlineBody};
use super::upstream::{forward_headers, strip_hop_by_hop, HyperChat, UpstreamClient};
use super::AppState;
use crate::classifier::Category;
use crate::error::GatewayError;
use crate::moderation::context::{build_context, content_text, response_text, ChatRequest};
use crate::moderation::{complete, stream, ChatUpstream, ClientIdentity, ExchangeOutcome, Verdict};

/// Response header carrying the request id on every response.
pub const REQUEST_ID_HEADER: &str = "x-carewall-request-id";
/// Request header choosing a policy through `moderation.header_policies`.
pub const POLICY_HEADER: &str = "x-carewall-policy";
/// Request header naming the conversation, for the audit trail's
/// pseudonymous conversation id (wins over the body's `user` field).
pub const CONVERSATION_HEADER: &str = "x-carewall-conversation-id";
/// How long a client may take to send its request body.
const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// One access-log line per request, written when this is dropped: at the
/// end of the response for plain requests, at the end of the stream for
/// streamed ones (so the verdict is in it). Never carries conversation text.
/// This is also the place to record per-request metrics.
struct Access {
    request_id: String,
    method: Method,
    path: String,
    started: Instant,
    status: u16,
    stream: bool,
    policy: Option<String>,
    verdict: Option<(Category, &'static str, bool)>,
    outcome: Option<ExchangeOutcome>,
    span: tracing::Span,
}

impl Access {
    fn verdict(&mut self, v: &Verdict) {
        self.verdict = Some((v.category, v.action.key(), v.flagged));
        self.span.record("category", v.category.key());
        self.span.record("action", v.action.key());
    }
}

impl Drop for Access {
    fn drop(&mut self) {
        let (category, action, flagged) = match self.verdict {
            Some((c, a, f)) => (Some(c.key()), Some(a), Some(f)),
            None => (None, None, None),
        };
        let outcome = self.outcome.map(|o| match o {
            ExchangeOutcome::Completed => "completed",
            ExchangeOutcome::ClientDisconnected => "client_disconnected",
            ExchangeOutcome::UpstreamFailed => "upstream_failed",
        });
        tracing::info!(
            target: "carewall::access",
            parent: &self.span,
            request_id = %self.request_id,
            method = %self.method,
            path = %self.path,
            status = self.status,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            stream = self.stream,
            policy = self.policy.as_deref(),
            category,
            action,
            flagged,
            outcome,
            "request"
        );
    }
}

/// The service function: route, map errors, stamp the request id.
pub async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let request_id = uuid::Uuid::now_v7().to_string();
    let span = tracing::info_span!(
        "carewall.request",
        request_id = %request_id,
        method = %req.method(),
        path = %req.uri().path(),
        status = Empty,
        stream = Empty,
        policy = Empty,
        category = Empty,
        action = Empty,
    );
    let mut access = Some(Access {
        request_id: request_id.clone(),
        method: req.method().clone(),
        path: req.uri().path().to_string(),
        started: Instant::now(),
        status: 0,
        stream: false,
        policy: None,
        verdict: None,
        outcome: None,
        span: span.clone(),
    });
    let result = route(&state, req, &request_id, &mut access, &span)
        .instrument(span.clone())
        .await;
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            let _enter = span.enter();
            match e.log_level() {
                tracing::Level::ERROR => {
                    tracing::error!(error = %e, code = e.code(), "request failed")
                }
                tracing::Level::WARN => {
                    tracing::warn!(error = %e, code = e.code(), "request failed")
                }
                _ => tracing::debug!(error = %e, code = e.code(), "request rejected"),
            }
            error_response(&e)
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    span.record("status", resp.status().as_u16());
    if let Some(a) = access.as_mut() {
        a.status = resp.status().as_u16();
    }
    drop(access);
    Ok(resp)
}

async fn route(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    request_id: &str,
    access: &mut Option<Access>,
    span: &tracing::Span,
) -> Result<Response<Body>, GatewayError> {
    let path = req.uri().path().to_string();
    if crate::admin::matches(&path) {
        if let Some(admin) = state.admin.get() {
            let resp = crate::admin::handle(req, admin).await;
            return Ok(resp.map(|b| b.map_err(|never| match never {}).boxed_unsync()));
        }
    }
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        (&Method::GET, "/readyz") => Ok(readyz(state)),
        (&Method::GET, "/v1/models") => passthrough(state, req, "/models").await,
        (&Method::POST, "/v1/chat/completions") => chat(state, req, request_id, access, span).await,
        (&Method::POST, "/v1/moderations") => moderations(state, req, request_id).await,
        (_, "/healthz" | "/readyz" | "/v1/models" | "/v1/chat/completions" | "/v1/moderations") => {
            Err(GatewayError::MethodNotAllowed {
                method: req.method().to_string(),
                path,
            })
        }
        _ => Err(GatewayError::NotFound {
            method: req.method().to_string(),
            path,
        }),
    }
}

fn readyz(state: &AppState) -> Response<Body> {
    let classifier_ready = state.moderator.classifier().is_ready();
    let upstream = state.upstream.is_configured();
    let ready = state.is_ready();
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": {
            "upstream_configured": upstream,
            "classifier_ready": classifier_ready,
            "moderation_enabled": state.config.moderation.enabled,
        },
        "classifier": state.moderator.classifier().name(),
        "policies": state.policies.load().names(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, &body)
}

async fn read_body(
    body: Incoming,
    limit: usize,
    declared: Option<u64>,
) -> Result<Bytes, GatewayError> {
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(GatewayError::PayloadTooLarge { limit });
    }
    // A client that stops sending mid-body must not hold a task forever.
    let collected = tokio::time::timeout(BODY_READ_TIMEOUT, Limited::new(body, limit).collect())
        .await
        .map_err(|_| {
            GatewayError::bad_request(
                format!(
                    "the request body did not arrive within {} s",
                    BODY_READ_TIMEOUT.as_secs()
                ),
                None,
            )
        })?;
    match collected {
        Ok(b) => Ok(b.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(GatewayError::PayloadTooLarge { limit })
        }
        Err(e) => Err(GatewayError::bad_request(
            format!("could not read the request body: {e}"),
            None,
        )),
    }
}

/// The `x-carewall-policy` header, if present; not-text values are a 400
/// rather than silently the default policy.
fn policy_header(req: &Request<Incoming>) -> Result<Option<String>, GatewayError> {
    match req.headers().get(POLICY_HEADER) {
        None => Ok(None),
        Some(v) => v.to_str().map(|s| Some(s.trim().to_string())).map_err(|_| {
            GatewayError::bad_request(format!("{POLICY_HEADER}: not valid text"), None)
        }),
    }
}

/// The client's key fingerprint and the conversation header. The key is
/// hashed here so that only its fingerprint travels further.
fn client_identity(headers: &http::HeaderMap) -> ClientIdentity {
    use sha2::{Digest, Sha256};
    let key_id = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(|k| {
            let digest = Sha256::digest(k.as_bytes());
            let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
            format!("key-{hex}")
        });
    let conversation = headers
        .get(CONVERSATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_string);
    ClientIdentity {
        key_id,
        conversation,
    }
}

fn declared_length(req: &Request<Incoming>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Forward a request untouched and stream the upstream's answer back.
async fn passthrough(
    state: &AppState,
    req: Request<Incoming>,
    upstream_path: &str,
) -> Result<Response<Body>, GatewayError> {
    if !state.upstream.is_configured() {
        return Err(GatewayError::NoUpstream);
    }
    let deadline = Instant::now() + state.upstream.total_timeout;
    let method = req.method().clone();
    let headers = forward_headers(req.headers());
    let declared = declared_length(&req);
    let bytes = read_body(
        req.into_body(),
        state.config.server.max_body_bytes,
        declared,
    )
    .await?;
    forward(state, method, upstream_path, headers, bytes, deadline).await
}

async fn forward(
    state: &AppState,
    method: Method,
    upstream_path: &str,
    headers: http::HeaderMap,
    bytes: Bytes,
    deadline: Instant,
) -> Result<Response<Body>, GatewayError> {
    let resp = state
        .upstream
        .send(method, upstream_path, headers, bytes)
        .await?;
    if !resp.status().is_success() {
        return Err(UpstreamClient::status_error(resp).await);
    }
    let (mut parts, body) = resp.into_parts();
    // The body is re-framed by our side of the connection, so the
    // provider's framing headers (length, transfer-encoding) go.
    strip_hop_by_hop(&mut parts.headers);
    let body = DeadlineBody::new(body, deadline, state.upstream.total_timeout).boxed_unsync();
    Ok(Response::from_parts(parts, body))
}

async fn chat(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    request_id: &str,
    access: &mut Option<Access>,
    span: &tracing::Span,
) -> Result<Response<Body>, GatewayError> {
    let started = Instant::now();
    let started_at = SystemTime::now();
    if !state.upstream.is_configured() {
        return Err(GatewayError::NoUpstream);
    }
    let policy_header = policy_header(&req)?;
    let client = client_identity(req.headers());
    let headers = forward_headers(req.headers());
    let declared = declared_length(&req);
    let bytes = read_body(
        req.into_body(),
        state.config.server.max_body_bytes,
        declared,
    )
    .await?;
    if !state.config.moderation.enabled {
        let deadline = started + state.upstream.total_timeout;
        return forward(
            state,
            Method::POST,
            "/chat/completions",
            headers,
            bytes,
            deadline,
        )
        .await;
    }
    // One snapshot for the whole request: a SIGHUP reload mid-stream does
    // not change this request's policy.
    let policy = state
        .policies
        .load()
        .select(policy_header.as_deref())
        .map_err(|u| {
            GatewayError::bad_request(
                format!(
                    "{POLICY_HEADER}: `{}` is not a policy this gateway offers; known: {}",
                    u.value,
                    if u.known.is_empty() {
                        "none (remove the header)".to_string()
                    } else {
                        u.known.join(", ")
                    }
                ),
                None,
            )
        })?;
    span.record("policy", policy.name.as_str());
    let mut request = ChatRequest::parse(&bytes)?;
    request.client = client;
    span.record("stream", request.stream);
    if let Some(a) = access.as_mut() {
        a.policy = Some(policy.name.clone());
        a.stream = request.stream;
    }
    let upstream = Arc::new(HyperChat::new(state.upstream.clone(), headers));
    let deadline = started + state.upstream.total_timeout;

    if request.stream {
        let first = upstream.open_stream(request.body.clone()).await?;
        let provider_headers = upstream.take_response_headers();
        let job = stream::StreamJob {
            moderator: state.moderator.clone(),
            upstream,
            sink: state.sink.clone(),
            mode: policy.streaming,
            policy,
            request,
            request_id: request_id.to_string(),
            deadline,
            started,
            started_at,
            upstream_first_byte: Some(started.elapsed()),
            total_timeout: state.upstream.total_timeout,
        };
        let (tx, rx) = mpsc::channel(32);
        let mut acc = access.take();
        if let Some(a) = acc.as_mut() {
            a.status = 200;
        }
        tokio::spawn(
            async move {
                let summary = stream::run(job, first, tx).await;
                if let Some(a) = acc.as_mut() {
                    a.verdict(&summary.verdict);
                    a.outcome = Some(summary.outcome);
                }
                drop(acc);
            }
            .instrument(span.clone()),
        );
        let mut resp = sse_response(rx);
        resp.headers_mut().extend(provider_headers);
        Ok(resp)
    } else {
        let first = match tokio::time::timeout_at(deadline, upstream.complete(request.body.clone()))
            .await
        {
            Ok(r) => r?,
            Err(_) => {
                return Err(GatewayError::UpstreamTimeout {
                    phase: "the total",
                    ms: state.upstream.total_timeout.as_millis() as u64,
                })
            }
        };
        let first_byte = started.elapsed();
        let provider_headers = upstream.take_response_headers();
        let job = complete::CompleteJob {
            moderator: state.moderator.clone(),
            upstream,
            sink: state.sink.clone(),
            policy,
            request,
            request_id: request_id.to_string(),
            deadline,
            started,
            started_at,
            upstream_first_byte: Some(first_byte),
        };
        let (body, verdict) = complete::run(job, first).await;
        if let Some(a) = access.as_mut() {
            a.verdict(&verdict);
            a.outcome = Some(ExchangeOutcome::Completed);
        }
        let mut resp = json_response(StatusCode::OK, &body);
        resp.headers_mut().extend(provider_headers);
        Ok(resp)
    }
}

/// `POST /v1/moderations`: classify (context, response) pairs directly.
async fn moderations(
    state: &AppState,
    req: Request<Incoming>,
    request_id: &str,
) -> Result<Response<Body>, GatewayError> {
    let policy_header = policy_header(&req)?;
    let declared = declared_length(&req);
    let bytes = read_body(
        req.into_body(),
        state.config.server.max_body_bytes,
        declared,
    )
    .await?;
    let body: Value = serde_json::from_slice(&bytes).map_err(|e| {
        GatewayError::bad_request(format!("request body is not valid JSON: {e}"), None)
    })?;
    let policy = state
        .policies
        .load()
        .select(policy_header.as_deref())
        .map_err(|u| {
            GatewayError::bad_request(
                format!("{POLICY_HEADER}: `{}` is not a known policy", u.value),
                None,
            )
        })?;

    let (context, inputs) = moderation_inputs(&body)?;
    let mut results = Vec::with_capacity(inputs.len());
    for input in inputs {
        let response = if input.starts_with("[supporter]") {
            input
        } else {
            response_text(&input)
        };
        let classified = state
            .moderator
            .classify(&context, &response)
            .await
            .map_err(|(e, _)| GatewayError::ClassifierUnavailable(e.to_string()))?;
        let decision = policy.decide(&classified.scores);
        let flagged_cats: Vec<Category> = decision
            .enforced
            .iter()
            .chain(&decision.shadow)
            .map(|c| c.category)
            .collect();
        let mut categories = serde_json::Map::new();
        let mut scores = serde_json::Map::new();
        let mut applied = serde_json::Map::new();
        for c in Category::ALL {
            let flagged = if c.is_unsafe() {
                flagged_cats.contains(&c)
            } else {
                flagged_cats.is_empty()
            };
            categories.insert(c.key().into(), json!(flagged));
            applied.insert(c.key().into(), json!(["text"]));
            scores.insert(
                c.key().into(),
                json!((f64::from(classified.scores.get(c)) * 10_000.0).round() / 10_000.0),
            );
        }
        let category = decision
            .applied
            .map(|c| c.category)
            .or_else(|| decision.shadow.first().map(|c| c.category))
            .unwrap_or(decision.top);
        results.push(json!({
            "flagged": decision.flagged(),
            "category": category.key(),
            "action": decision.action().key(),
            "categories": categories,
            "category_scores": scores,
            "category_applied_input_types": applied,
        }));
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "id": format!("modr-{request_id}"),
            "model": state.moderator.classifier().name(),
            "policy": policy.name,
            "results": results,
        }),
    ))
}

/// Context and responses of a moderation request: `{"input", "context"}` or
/// `{"messages"}` (the last message is the response, the rest its context).
fn moderation_inputs(body: &Value) -> Result<(String, Vec<String>), GatewayError> {
    if let Some(msgs) = body.get("messages") {
        let msgs = msgs.as_array().filter(|m| !m.is_empty()).ok_or_else(|| {
            GatewayError::bad_request("messages: must be a non-empty array", Some("messages"))
        })?;
        let (last, rest) = msgs.split_last().ok_or_else(|| {
            GatewayError::bad_request("messages: must be a non-empty array", Some("messages"))
        })?;
        let text = last.get("content").and_then(content_text).ok_or_else(|| {
            GatewayError::bad_request(
                "messages: the last message needs text content",
                Some("messages"),
            )
        })?;
        return Ok((build_context(rest), vec![text]));
    }
    let context = match body.get("context") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(GatewayError::bad_request(
                "context: must be a string",
                Some("context"),
            ))
        }
    };
    let inputs = match body.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    GatewayError::bad_request("input: array items must be strings", Some("input"))
                })
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(GatewayError::bad_request(
                "input: required, the response text (or an array of them); or send `messages`",
                Some("input"),
            ))
        }
    };
    if inputs.len() > 64 {
        return Err(GatewayError::bad_request(
            "input: at most 64 items per request",
            Some("input"),
        ));
    }
    Ok((context, inputs))
}
