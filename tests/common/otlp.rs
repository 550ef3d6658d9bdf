//! An OTLP/HTTP receiver for tests: a hyper server on 127.0.0.1:0 that
//! accepts protobuf `POST /v1/traces` and `POST /v1/metrics`, decodes them
//! with `opentelemetry-proto`, and keeps everything for assertions.
//!
//! Point `telemetry.otlp_endpoint` (or `CAREWALL__TELEMETRY__OTLP_ENDPOINT`)
//! at [`OtlpReceiver::base_url`].

#![allow(dead_code)] // each test file uses a different part of the harness

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::metric;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// An attribute value as received.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Str(String),
    Int(i64),
    Double(f64),
    Bool(bool),
    Other,
}

impl Attr {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Attr::Str(s) => Some(s),
            _ => None,
        }
    }
}

fn attr(v: &Option<AnyValue>) -> Attr {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => Attr::Str(s.clone()),
        Some(any_value::Value::IntValue(i)) => Attr::Int(*i),
        Some(any_value::Value::DoubleValue(d)) => Attr::Double(*d),
        Some(any_value::Value::BoolValue(b)) => Attr::Bool(*b),
        _ => Attr::Other,
    }
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, Attr> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), attr(&kv.value)))
        .collect()
}

/// One received span, flattened out of its resource and scope.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub name: String,
    /// Lower-case hex, as in `traceparent`.
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub kind: i32,
    pub attributes: BTreeMap<String, Attr>,
    pub resource: BTreeMap<String, Attr>,
    /// `Status.code`: 0 unset, 1 ok, 2 error.
    pub status_code: i32,
}

impl ReceivedSpan {
    pub fn attr(&self, key: &str) -> Option<&Attr> {
        self.attributes.get(key)
    }

    pub fn str_attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).and_then(Attr::as_str)
    }
}

/// One data point of a received metric.
#[derive(Debug, Clone)]
pub struct ReceivedPoint {
    pub metric: String,
    pub attributes: BTreeMap<String, Attr>,
    /// Sum or gauge value; for histograms the number of observations.
    pub value: f64,
    /// Histogram sum (0 for other kinds).
    pub sum: f64,
    pub unit: String,
}

#[derive(Default)]
struct State {
    traces: Vec<ExportTraceServiceRequest>,
    metrics: Vec<ExportMetricsServiceRequest>,
    paths: Vec<String>,
    content_types: Vec<String>,
}

/// The running receiver; the server task stops when this is dropped.
pub struct OtlpReceiver {
    pub base_url: String,
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl OtlpReceiver {
    /// Start listening on an ephemeral port.
    pub async fn start() -> anyhow::Result<OtlpReceiver> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let notify = Arc::new(Notify::new());
        let (s, n) = (state.clone(), notify.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (s, n) = (s.clone(), n.clone());
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req| handle(req, s.clone(), n.clone()));
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        Ok(OtlpReceiver {
            base_url: format!("http://{addr}"),
            state,
            notify,
            task,
        })
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for req in &state.traces {
            for rs in &req.resource_spans {
                let resource = rs
                    .resource
                    .as_ref()
                    .map(|r| attrs(&r.attributes))
                    .unwrap_or_default();
                for ss in &rs.scope_spans {
                    for s in &ss.spans {
                        out.push(ReceivedSpan {
                            name: s.name.clone(),
                            trace_id: hex(&s.trace_id),
                            span_id: hex(&s.span_id),
                            parent_span_id: hex(&s.parent_span_id),
                            kind: s.kind,
                            attributes: attrs(&s.attributes),
                            resource: resource.clone(),
                            status_code: s.status.as_ref().map(|st| st.code).unwrap_or(0),
                        });
                    }
                }
            }
        }
        out
    }

    /// Every metric data point received so far, oldest export first (with
    /// cumulative temporality the last matching point is the current total).
    pub fn points(&self) -> Vec<ReceivedPoint> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for req in &state.metrics {
            for rm in &req.resource_metrics {
                for sm in &rm.scope_metrics {
                    for m in &sm.metrics {
                        let point = |attributes: &[KeyValue], value: f64, sum: f64| ReceivedPoint {
                            metric: m.name.clone(),
                            attributes: attrs(attributes),
                            value,
                            sum,
                            unit: m.unit.clone(),
                        };
                        match &m.data {
                            Some(metric::Data::Sum(s)) => {
                                for p in &s.data_points {
                                    out.push(point(&p.attributes, number(&p.value), 0.0));
                                }
                            }
                            Some(metric::Data::Gauge(g)) => {
                                for p in &g.data_points {
                                    out.push(point(&p.attributes, number(&p.value), 0.0));
                                }
                            }
                            Some(metric::Data::Histogram(h)) => {
                                for p in &h.data_points {
                                    out.push(point(
                                        &p.attributes,
                                        p.count as f64,
                                        p.sum.unwrap_or(0.0),
                                    ));
                                }
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        out
    }

    /// Request paths received (`/v1/traces`, `/v1/metrics`), in order.
    pub fn paths(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .paths
            .clone()
    }

    /// `Content-Type`s received, in order.
    pub fn content_types(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .content_types
            .clone()
    }

    /// Wait until `done(self)` holds. Gives up after `limit` with an error
    /// so a broken exporter fails the test instead of hanging it.
    pub async fn wait_until(
        &self,
        limit: Duration,
        done: impl Fn(&OtlpReceiver) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Register for the next wake-up before checking, so a request
            // landing between the check and the wait is not missed.
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(self) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                anyhow::bail!(
                    "OTLP receiver: condition not met within {limit:?}; received paths {:?}",
                    self.paths()
                );
            }
        }
    }
}

fn number(v: &Option<opentelemetry_proto::tonic::metrics::v1::number_data_point::Value>) -> f64 {
    use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value;
    match v {
        Some(Value::AsDouble(d)) => *d,
        Some(Value::AsInt(i)) => *i as f64,
        None => f64::NAN,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = req.uri().path().to_owned();
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let method_ok = req.method() == http::Method::POST;
    let body = req.into_body().collect().await?.to_bytes();
    let reply = |status: StatusCode, body: Vec<u8>| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/x-protobuf"),
        );
        r
    };
    if !method_ok {
        return Ok(reply(StatusCode::METHOD_NOT_ALLOWED, Vec::new()));
    }
    let response = match path.as_str() {
        "/v1/traces" => match ExportTraceServiceRequest::decode(body) {
            Ok(decoded) => {
                let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                s.traces.push(decoded);
                s.paths.push(path);
                s.content_types.push(content_type);
                reply(
                    StatusCode::OK,
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }
            Err(_) => reply(StatusCode::BAD_REQUEST, Vec::new()),
        },
        "/v1/metrics" => match ExportMetricsServiceRequest::decode(body) {
            Ok(decoded) => {
                let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                s.metrics.push(decoded);
                s.paths.push(path);
                s.content_types.push(content_type);
                reply(
                    StatusCode::OK,
                    ExportMetricsServiceResponse::default().encode_to_vec(),
                )
            }
            Err(_) => reply(StatusCode::BAD_REQUEST, Vec::new()),
        },
        _ => reply(StatusCode::NOT_FOUND, Vec::new()),
    };
    notify.notify_waiters();
    Ok(response)
}
