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
use tracing::Instrument;

use super::body::{error_response, full, json_response, sse_response, Body, DeadlineBody};
use super::upstream::{forward_headers, strip_hop_by_hop, HyperChat, UpstreamClient};
use super::AppState;
use crate::classifier::Category;
use crate::config::KeyGrant;
use crate::error::GatewayError;
use crate::moderation::context::{build_context, content_text, response_text, ChatRequest};
use crate::moderation::{complete, stream, ChatUpstream, ClientIdentity, ExchangeOutcome};
use crate::policy::{Candidate, Mode, SelectError, StreamMode};
use crate::telemetry::{RequestProbe, RequestTelemetry, PROMETHEUS_CONTENT_TYPE};

/// Response header carrying the request id on every response.
pub const REQUEST_ID_HEADER: &str = "x-carewall-request-id";
/// Request header choosing a policy through `moderation.header_policies`.
pub const POLICY_HEADER: &str = "x-carewall-policy";
/// Response headers with the verdict (non-streaming: all three; streams:
/// the policy only, since the verdict is known at the end, on the final
/// chunk), for clients that cannot read the body's `moderation` object.
pub const ACTION_HEADER: &str = "x-carewall-action";
pub const CATEGORY_HEADER: &str = "x-carewall-category";
/// Request header naming the conversation, for the audit trail's
/// pseudonymous conversation id (wins over the body's `user` field).
pub const CONVERSATION_HEADER: &str = "x-carewall-conversation-id";
/// How long a client may take to send its request body.
const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The service function: route, map errors, stamp the request id.
pub async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let request_id = uuid::Uuid::now_v7().to_string();
    // One request span and one access-log line per request, both from
    // telemetry: the probe finishes them when the response ends (for a
    // moderated stream, the engine's task takes the probe and finishes it
    // at the end of the stream; a client that goes away makes it a 499).
    let mut probe = Some(RequestProbe::new(RequestTelemetry::start(
        &state.metrics,
        req.method(),
        route_name(req.uri().path()),
        &request_id,
        req.headers(),
    )));
    let span = probe
        .as_ref()
        .map(RequestProbe::span)
        .unwrap_or_else(tracing::Span::none);
    let result = route(&state, req, &request_id, &mut probe)
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
            if let Some(p) = probe.as_ref() {
                p.set_error(e.code());
            }
            error_response(&e)
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    if let Some(p) = probe {
        p.finish(resp.status().as_u16());
    }
    Ok(resp)
}

async fn route(
    state: &Arc<AppState>,
    req: Request<Incoming>,
    request_id: &str,
    probe: &mut Option<RequestProbe>,
) -> Result<Response<Body>, GatewayError> {
    let path = req.uri().path().to_string();
    let tel = probe.clone().unwrap_or_default();
    if crate::admin::matches(&path) {
        if let Some(admin) = state.admin.get() {
            let resp = crate::admin::handle(req, admin).await;
            return Ok(resp.map(|b| b.map_err(|never| match never {}).boxed_unsync()));
        }
    }
    let grant = if path.starts_with("/v1/") {
        super::auth::check_client_key(&state.client_keys.load(), req.headers())?
    } else {
        None
    };
    if let Some(g) = &grant {
        tel.set_tenant(g.tenant.clone());
    }
    let grant = grant.as_ref();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        (&Method::GET, "/readyz") => Ok(readyz(state)),
        // Disabled (`telemetry.prometheus = false`): 404 like any unknown path.
        (&Method::GET, "/metrics") if state.metrics.prometheus_enabled() => {
            let mut r = Response::new(full(state.metrics.render_prometheus()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(PROMETHEUS_CONTENT_TYPE),
            );
            Ok(r)
        }
        (&Method::GET, "/v1/models") => passthrough(state, req, "/models", &tel).await,
        (&Method::POST, "/v1/chat/completions") => chat(state, req, request_id, grant, probe).await,
        (&Method::POST, "/v1/moderations") => {
            moderations(state, req, request_id, grant, &tel).await
        }
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

fn stream_mode_key(mode: StreamMode) -> &'static str {
    match mode {
        StreamMode::Buffer => "buffer",
        StreamMode::Window => "window",
        StreamMode::Observe => "observe",
    }
}

/// The matched route for spans and metric labels (bounded cardinality:
/// never the raw path).
fn route_name(path: &str) -> &'static str {
    match path {
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/metrics" => "/metrics",
        "/v1/models" => "/v1/models",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/moderations" => "/v1/moderations",
        _ => "other",
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

/// The whole request body, at most `limit` bytes (413 above, refused
/// before reading when `content-length` says so).
async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, GatewayError> {
    if declared_length(&req).is_some_and(|n| n > limit as u64) {
        return Err(GatewayError::PayloadTooLarge { limit });
    }
    let body = req.into_body();
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

/// The policy for a request: its client key's binding and the
/// `x-carewall-policy` header (see [`crate::policy::PolicySet::select_for`]).
fn select_policy(
    state: &AppState,
    grant: Option<&KeyGrant>,
    header: Option<&str>,
) -> Result<crate::policy::PolicyRef, GatewayError> {
    let binding = grant.and_then(|g| g.binding.as_deref());
    state
        .policies
        .load()
        .select_for(binding, header)
        .map_err(|e| match e {
            SelectError::NotAllowed { value, allowed } => {
                GatewayError::PolicyNotAllowed { value, allowed }
            }
            SelectError::Unknown(u) => GatewayError::bad_request(
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
            ),
        })
}

/// The client's key fingerprint, tenant name and the conversation header.
/// The key is hashed here so that only its fingerprint travels further.
fn client_identity(headers: &http::HeaderMap, grant: Option<&KeyGrant>) -> ClientIdentity {
    use sha2::{Digest, Sha256};
    let key_id = super::auth::bearer_token(headers).map(|k| {
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
        tenant: grant.and_then(|g| g.name.clone()),
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
    probe: &RequestProbe,
) -> Result<Response<Body>, GatewayError> {
    if !state.upstream.is_configured() {
        return Err(GatewayError::NoUpstream);
    }
    let deadline = Instant::now() + state.upstream.total_timeout;
    let method = req.method().clone();
    let headers = forward_headers(req.headers());
    let bytes = read_body(req, state.config.server.max_body_bytes).await?;
    forward(
        state,
        method,
        upstream_path,
        headers,
        bytes,
        deadline,
        probe,
    )
    .await
}

async fn forward(
    state: &AppState,
    method: Method,
    upstream_path: &str,
    headers: http::HeaderMap,
    bytes: Bytes,
    deadline: Instant,
    probe: &RequestProbe,
) -> Result<Response<Body>, GatewayError> {
    let mut headers = headers;
    probe.upstream_call(&mut headers);
    let resp = match state
        .upstream
        .send(method, upstream_path, headers, bytes)
        .await
    {
        Ok(r) => r,
        Err(e) => {
            probe.finish_upstream(None, Some(e.code()));
            return Err(e);
        }
    };
    // Pass-through bodies are not read here: the upstream span ends with
    // the response head.
    let status = resp.status().as_u16();
    if !resp.status().is_success() {
        let e = UpstreamClient::status_error(resp).await;
        probe.finish_upstream(Some(status), Some(e.code()));
        return Err(e);
    }
    probe.finish_upstream(Some(status), None);
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
    grant: Option<&KeyGrant>,
    probe: &mut Option<RequestProbe>,
) -> Result<Response<Body>, GatewayError> {
    let tel = probe.clone().unwrap_or_default();
    let started = Instant::now();
    let started_at = SystemTime::now();
    if !state.upstream.is_configured() {
        return Err(GatewayError::NoUpstream);
    }
    let policy_header = policy_header(&req)?;
    let client = client_identity(req.headers(), grant);
    let headers = forward_headers(req.headers());
    let bytes = read_body(req, state.config.server.max_body_bytes).await?;
    if !state.config.moderation.enabled {
        tel.set_streaming("off");
        let deadline = started + state.upstream.total_timeout;
        return forward(
            state,
            Method::POST,
            "/chat/completions",
            headers,
            bytes,
            deadline,
            &tel,
        )
        .await;
    }
    // One snapshot for the whole request: a SIGHUP reload mid-stream does
    // not change this request's policy.
    let policy = select_policy(state, grant, policy_header.as_deref())?;
    let mut request = ChatRequest::parse(&bytes)?;
    request.client = client;
    tel.set_request(request.model.as_deref().unwrap_or(""), request.stream);
    tel.set_streaming(if request.stream {
        stream_mode_key(policy.streaming)
    } else {
        "off"
    });
    let upstream =
        Arc::new(HyperChat::new(state.upstream.clone(), headers).with_probe(tel.clone()));
    let deadline = started + state.upstream.total_timeout;

    if request.stream {
        let first = upstream.open_stream(request.body.clone()).await?;
        let provider_headers = upstream.take_response_headers();
        let policy_name = policy.name.clone();
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
            probe: tel.clone(),
        };
        let (tx, rx) = mpsc::channel(32);
        // The stream's task finishes the request's telemetry, not `handle`.
        let owned = probe.take().unwrap_or_default();
        let span = owned.span();
        tokio::spawn(
            async move {
                let summary = stream::run(job, first, tx).await;
                match summary.outcome {
                    ExchangeOutcome::Completed => owned.finish(200),
                    ExchangeOutcome::UpstreamFailed => {
                        owned.set_error("upstream_failed");
                        owned.finish(200);
                    }
                    ExchangeOutcome::ClientDisconnected => {
                        owned.set_error("client_cancelled");
                        owned.finish(499);
                    }
                }
            }
            .instrument(span),
        );
        let mut resp = sse_response(rx);
        resp.headers_mut().extend(provider_headers);
        set_header(&mut resp, POLICY_HEADER, &policy_name);
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
            probe: tel.clone(),
        };
        let (body, verdict) = complete::run(job, first).await;
        // The whole body goes out at once: its first token is now.
        tel.client_first_token();
        let mut resp = json_response(StatusCode::OK, &body);
        resp.headers_mut().extend(provider_headers);
        set_header(&mut resp, ACTION_HEADER, verdict.action.key());
        set_header(&mut resp, CATEGORY_HEADER, verdict.category_label());
        set_header(&mut resp, POLICY_HEADER, &verdict.policy);
        Ok(resp)
    }
}

/// A verdict header (values are policy names and enum keys, always valid
/// header text; anything else is skipped rather than failing the response).
fn set_header(resp: &mut Response<Body>, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().insert(name, v);
    }
}

/// `POST /v1/moderations`: classify (context, response) pairs directly.
async fn moderations(
    state: &AppState,
    req: Request<Incoming>,
    request_id: &str,
    grant: Option<&KeyGrant>,
    probe: &RequestProbe,
) -> Result<Response<Body>, GatewayError> {
    let policy_header = policy_header(&req)?;
    let bytes = read_body(req, state.config.server.max_body_bytes).await?;
    let body: Value = serde_json::from_slice(&bytes).map_err(|e| {
        GatewayError::bad_request(format!("request body is not valid JSON: {e}"), None)
    })?;
    let policy = select_policy(state, grant, policy_header.as_deref())?;

    let (context, inputs) = moderation_inputs(&body)?;
    let mut results = Vec::with_capacity(inputs.len());
    for input in inputs {
        let guard_hits;
        let response = if input.starts_with("[supporter]") {
            input
        } else {
            response_text(&input)
        };
        let span = probe.classification("moderations");
        let reply = response.strip_prefix("[supporter]").unwrap_or(&response);
        let classified = match state.moderator.classify(&context, &response).await {
            Ok(mut c) => {
                let hits = policy.guards.apply(reply, &mut c.scores);
                for h in &hits {
                    probe.guard_hit(&h.id, h.category);
                }
                guard_hits = hits;
                c
            }
            Err((e, _)) => {
                if let Some(span) = span {
                    span.failed(crate::moderation::error_kind(&e));
                }
                return Err(GatewayError::ClassifierUnavailable(e.to_string()));
            }
        };
        let mut decision = policy.decide(&classified.scores);
        // Shadow guards record what would have happened, as shadow rules do.
        for h in guard_hits.iter().filter(|h| h.mode == Mode::Shadow) {
            if let Some(rule) = policy.rules.get(&h.category) {
                decision.shadow.push(Candidate {
                    category: h.category,
                    score: 1.0,
                    action: rule.action,
                    mode: Mode::Shadow,
                });
            }
        }
        if let Some(span) = span {
            span.done(decision.top, classified.scores.get(decision.top));
        }
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
            "guards": guard_hits.iter().map(|h| json!({
                "id": &*h.id, "category": h.category.key(), "mode": h.mode,
            })).collect::<Vec<_>>(),
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
