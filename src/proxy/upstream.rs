//! The HTTP client to the OpenAI-compatible provider: hyper-util's pooled
//! client over rustls (webpki roots, ring; no OpenSSL), with connect,
//! first-byte and total timeouts and the provider key injected.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::Value;

use super::sse::SseDecoder;
use crate::config::UpstreamConfig;
use crate::error::GatewayError;
use crate::moderation::{ChatUpstream, DataStream};

/// Largest upstream error or non-streaming body the gateway reads.
const MAX_UPSTREAM_BODY: usize = 32 * 1024 * 1024;

/// Headers that describe one hop, never forwarded (RFC 9110 7.6.1), plus
/// those the gateway sets itself.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

/// Remove hop-by-hop headers (and any named in `Connection`).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .filter_map(|s| HeaderName::from_bytes(s.as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in HOP_BY_HOP {
        headers.remove(*h);
    }
}

/// Headers of a client request as they go upstream: hop-by-hop removed, the
/// client's credentials and carewall's own headers dropped.
pub fn forward_headers(client: &HeaderMap) -> HeaderMap {
    let mut h = client.clone();
    strip_hop_by_hop(&mut h);
    h.remove(header::AUTHORIZATION);
    h.remove("api-key");
    let own: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().starts_with("x-carewall-"))
        .cloned()
        .collect();
    for k in own {
        h.remove(k);
    }
    h
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// The pooled client and the upstream's settings.
pub struct UpstreamClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: Option<String>,
    auth: Option<HeaderValue>,
    pub first_byte_timeout: Duration,
    pub total_timeout: Duration,
}

impl UpstreamClient {
    /// Build the client. Fails only if TLS cannot be set up.
    pub fn new(cfg: &UpstreamConfig) -> Result<UpstreamClient, GatewayError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))
            .map_err(|e| GatewayError::Internal(format!("TLS set-up failed: {e}")))?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        let auth = match &cfg.api_key {
            Some(k) => Some(
                HeaderValue::from_str(&format!("Bearer {k}"))
                    .map(|mut v| {
                        v.set_sensitive(true);
                        v
                    })
                    .map_err(|_| {
                        GatewayError::Internal(
                            "upstream.api_key is not a valid header value".into(),
                        )
                    })?,
            ),
            None => None,
        };
        Ok(UpstreamClient {
            client,
            base: cfg.base_url.clone(),
            auth,
            first_byte_timeout: cfg.first_byte_timeout,
            total_timeout: cfg.total_timeout,
        })
    }

    pub fn is_configured(&self) -> bool {
        self.base.is_some()
    }

    fn uri(&self, path: &str) -> Result<Uri, GatewayError> {
        let base = self.base.as_ref().ok_or(GatewayError::NoUpstream)?;
        format!("{base}{path}")
            .parse()
            .map_err(|e| GatewayError::Internal(format!("bad upstream URL {base}{path}: {e}")))
    }

    /// Send a request; `Ok` once response headers arrived (any status).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        mut headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response<Incoming>, GatewayError> {
        let uri = self.uri(path)?;
        strip_hop_by_hop(&mut headers);
        if let Some(a) = &self.auth {
            headers.insert(header::AUTHORIZATION, a.clone());
        }
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::new(body))
            .map_err(|e| GatewayError::Internal(format!("building the upstream request: {e}")))?;
        *req.headers_mut() = headers;
        match tokio::time::timeout(self.first_byte_timeout, self.client.request(req)).await {
            Err(_) => Err(GatewayError::UpstreamTimeout {
                phase: "the first-byte",
                ms: self.first_byte_timeout.as_millis() as u64,
            }),
            Ok(Err(e)) if e.is_connect() => Err(GatewayError::UpstreamConnect(error_chain(&e))),
            Ok(Err(e)) => Err(GatewayError::UpstreamProtocol(error_chain(&e))),
            Ok(Ok(r)) => Ok(r),
        }
    }

    /// Turn a non-2xx upstream response into an error carrying its message.
    pub async fn status_error(resp: Response<Incoming>) -> GatewayError {
        let status = resp.status();
        let bytes = match tokio::time::timeout(
            Duration::from_secs(10),
            Limited::new(resp.into_body(), 64 * 1024).collect(),
        )
        .await
        {
            Ok(Ok(b)) => b.to_bytes(),
            _ => Bytes::new(),
        };
        let body: Option<Value> = serde_json::from_slice(&bytes).ok();
        let message = body
            .as_ref()
            .and_then(|b| b.pointer("/error/message"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| {
                let t = String::from_utf8_lossy(&bytes);
                let t: String = t.chars().take(200).collect();
                if t.trim().is_empty() {
                    status.canonical_reason().unwrap_or("error").to_string()
                } else {
                    t
                }
            });
        GatewayError::UpstreamStatus {
            status,
            message,
            body,
        }
    }
}

/// Decode an upstream SSE body into `data` payloads.
pub fn data_stream(body: Incoming) -> DataStream {
    struct St {
        body: Incoming,
        dec: SseDecoder,
        queue: VecDeque<String>,
        finished: bool,
    }
    let st = St {
        body,
        dec: SseDecoder::default(),
        queue: VecDeque::new(),
        finished: false,
    };
    futures::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(d) = st.queue.pop_front() {
                return Some((Ok(d), st));
            }
            if st.finished {
                return None;
            }
            match st.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        match st.dec.feed(&data) {
                            Ok(evs) => st.queue.extend(evs.into_iter().map(|e| e.data)),
                            Err(e) => {
                                st.finished = true;
                                return Some((
                                    Err(GatewayError::UpstreamProtocol(format!(
                                        "malformed event stream: {e}"
                                    ))),
                                    st,
                                ));
                            }
                        }
                    }
                }
                Some(Err(e)) => {
                    st.finished = true;
                    return Some((
                        Err(GatewayError::UpstreamProtocol(format!(
                            "the upstream connection broke mid-stream: {}",
                            error_chain(&e)
                        ))),
                        st,
                    ));
                }
                None => {
                    st.finished = true;
                    match st.dec.finish() {
                        Ok(Some(e)) => st.queue.push_back(e.data),
                        Ok(None) => {}
                        Err(e) => {
                            return Some((
                                Err(GatewayError::UpstreamProtocol(format!(
                                    "malformed event stream: {e}"
                                ))),
                                st,
                            ))
                        }
                    }
                }
            }
        }
    })
    .boxed()
}

/// [`ChatUpstream`] over the real client, carrying the client's forwarded
/// headers so retries look like the original request.
pub struct HyperChat {
    pub client: Arc<UpstreamClient>,
    pub headers: HeaderMap,
    /// Informational headers of the first successful upstream response
    /// (request id, rate limits), passed on to the client.
    pub response_headers: std::sync::Mutex<Option<HeaderMap>>,
    /// The request's telemetry: each call opens an upstream span and sends
    /// its `traceparent`.
    pub probe: crate::telemetry::RequestProbe,
}

/// The provider's informational response headers worth passing on to the
/// client of a moderated response: its request id (for support tickets)
/// and rate-limit state (for client back-off).
pub fn provider_headers(h: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (k, v) in h {
        let n = k.as_str();
        if n == "x-request-id"
            || n.starts_with("x-ratelimit-")
            || n.starts_with("openai-")
            || n == "retry-after"
        {
            out.append(k.clone(), v.clone());
        }
    }
    out
}

impl HyperChat {
    pub fn new(client: Arc<UpstreamClient>, headers: HeaderMap) -> HyperChat {
        HyperChat {
            client,
            headers,
            response_headers: std::sync::Mutex::new(None),
            probe: crate::telemetry::RequestProbe::none(),
        }
    }

    /// Trace this request's provider calls through `probe`.
    pub fn with_probe(mut self, probe: crate::telemetry::RequestProbe) -> HyperChat {
        self.probe = probe;
        self
    }

    /// Send one chat call, inside its own upstream span; a failure ends
    /// the span with the error's kind.
    async fn send_chat(
        &self,
        stream: bool,
        bytes: Bytes,
    ) -> Result<hyper::Response<hyper::body::Incoming>, GatewayError> {
        let mut headers = self.headers_for(stream);
        self.probe.upstream_call(&mut headers);
        let resp = match self
            .client
            .send(Method::POST, "/chat/completions", headers, bytes)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                self.probe.finish_upstream(None, Some(e.code()));
                return Err(e);
            }
        };
        let ok = if stream {
            resp.status() == StatusCode::OK
        } else {
            resp.status().is_success()
        };
        if !ok {
            let status = resp.status().as_u16();
            let e = UpstreamClient::status_error(resp).await;
            self.probe.finish_upstream(Some(status), Some(e.code()));
            return Err(e);
        }
        Ok(resp)
    }

    fn remember(&self, h: &HeaderMap) {
        if let Ok(mut slot) = self.response_headers.lock() {
            slot.get_or_insert_with(|| provider_headers(h));
        }
    }

    /// The remembered provider headers (empty before a successful call).
    pub fn take_response_headers(&self) -> HeaderMap {
        self.response_headers
            .lock()
            .ok()
            .and_then(|mut s| s.take())
            .unwrap_or_default()
    }

    fn headers_for(&self, stream: bool) -> HeaderMap {
        let mut h = self.headers.clone();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        // The engine must read the stream's text, so no compression.
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        if stream {
            h.insert(
                header::ACCEPT,
                HeaderValue::from_static("text/event-stream"),
            );
        }
        h
    }
}

impl ChatUpstream for HyperChat {
    fn open_stream(&self, body: Value) -> BoxFuture<'_, Result<DataStream, GatewayError>> {
        Box::pin(async move {
            let bytes = Bytes::from(body.to_string());
            let resp = self.send_chat(true, bytes).await?;
            self.remember(resp.headers());
            Ok(data_stream(resp.into_body()))
        })
    }

    fn complete(&self, body: Value) -> BoxFuture<'_, Result<Value, GatewayError>> {
        Box::pin(async move {
            let bytes = Bytes::from(body.to_string());
            let resp = self.send_chat(false, bytes).await?;
            let status = resp.status().as_u16();
            self.remember(resp.headers());
            let collected = Limited::new(resp.into_body(), MAX_UPSTREAM_BODY)
                .collect()
                .await
                .map_err(|e| {
                    GatewayError::UpstreamProtocol(format!("reading the upstream body: {e}"))
                })?
                .to_bytes();
            let v: Value = serde_json::from_slice(&collected).map_err(|e| {
                GatewayError::UpstreamProtocol(format!("the upstream body is not JSON: {e}"))
            })?;
            if !v.is_object() {
                return Err(GatewayError::UpstreamProtocol(
                    "the upstream body is not a JSON object".into(),
                ));
            }
            self.probe.upstream_first_token();
            if let Some(m) = v.get("model").and_then(Value::as_str) {
                self.probe.set_response_model(m);
            }
            if let Some(u) = v.get("usage") {
                crate::moderation::observe_usage(&self.probe, u);
            }
            self.probe.finish_upstream(Some(status), None);
            Ok(v)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_drops_hop_by_hop_credentials_and_own_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(
            "authorization",
            HeaderValue::from_static("Bearer client-key"),
        );
        h.insert("x-carewall-policy", HeaderValue::from_static("strict"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("openai-organization", HeaderValue::from_static("org"));
        let f = forward_headers(&h);
        for gone in [
            "connection",
            "x-secret-hop",
            "authorization",
            "x-carewall-policy",
            "transfer-encoding",
        ] {
            assert!(!f.contains_key(gone), "{gone} forwarded");
        }
        assert_eq!(
            f.get("openai-organization").and_then(|v| v.to_str().ok()),
            Some("org")
        );
    }
}
