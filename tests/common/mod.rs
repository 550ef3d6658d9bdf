//! Black-box test harness: a scripted mock upstream and the real `carewall`
//! binary started on port 0 with a temporary configuration.
//!
//! Reusable for other classifiers: [`GatewayOptions::classifier`] is the
//! `[classifier]` TOML section (see [`keyword_classifier`]); real-model
//! end-to-end tests pass an `onnx` section instead.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// The `[classifier]` section for the deterministic keyword classifier.
pub fn keyword_classifier() -> String {
    "[classifier]\nkind = \"keyword\"\ntimeout_ms = 1000\n".to_string()
}

// ------------------------------------------------------------ mock upstream

/// How a streamed mock reply ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// finish chunk + `[DONE]`.
    Done,
    /// The connection breaks mid-way (no finish, no `[DONE]`).
    Cut,
    /// A `data:` line that is not JSON.
    Malformed,
}

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum MockReply {
    /// A streamed (or, for `stream: false` requests, whole) reply: the
    /// pieces joined are the text.
    Text {
        pieces: Vec<String>,
        delay: Duration,
        end: StreamEnd,
    },
    /// A JSON body with this status (errors, or anything raw).
    Json { status: u16, body: Value },
    /// Never answers (first-byte timeout).
    Hang,
}

impl MockReply {
    /// A reply streamed in the given pieces, 5 ms apart.
    pub fn pieces(pieces: &[&str]) -> MockReply {
        MockReply::Text {
            pieces: pieces.iter().map(|s| s.to_string()).collect(),
            delay: Duration::from_millis(5),
            end: StreamEnd::Done,
        }
    }

    pub fn error(status: u16, message: &str) -> MockReply {
        MockReply::Json {
            status,
            body: json!({"error": {"message": message, "type": "mock_error", "code": "mock", "param": null}}),
        }
    }
}

/// A request the mock received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Value,
}

type Script = dyn Fn(&Value, usize) -> MockReply + Send + Sync;

/// The scripted upstream. `script(body, n)` picks the reply for the n-th
/// (0-based) chat request.
#[derive(Clone)]
pub struct MockUpstream {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    /// Streams whose client (the gateway) went away before the end.
    pub cancelled: Arc<AtomicUsize>,
}

pub const MOCK_MODEL: &str = "mock-model";

fn chunk(id: &str, delta: Value, finish: Value) -> Bytes {
    let v = json!({"id": id, "object": "chat.completion.chunk", "created": 1700000000, "model": MOCK_MODEL,
                   "system_fingerprint": "fp_mock",
                   "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
    Bytes::from(format!("data: {v}\n\n"))
}

type MockBody = BoxBody<Bytes, std::io::Error>;

fn full(status: u16, v: &Value) -> Response<MockBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(v.to_string()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    provider_headers(r.headers_mut());
    r
}

/// Informational headers a real provider sends.
fn provider_headers(h: &mut http::HeaderMap) {
    h.insert("x-request-id", http::HeaderValue::from_static("req-mock"));
    h.insert(
        "x-ratelimit-remaining-requests",
        http::HeaderValue::from_static("99"),
    );
}

impl MockUpstream {
    pub async fn start(
        script: impl Fn(&Value, usize) -> MockReply + Send + Sync + 'static,
    ) -> MockUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind mock");
        let addr = listener.local_addr().expect("addr");
        let mock = MockUpstream {
            addr,
            requests: Arc::new(Mutex::new(Vec::new())),
            cancelled: Arc::new(AtomicUsize::new(0)),
        };
        let script: Arc<Script> = Arc::new(script);
        let counter = Arc::new(AtomicUsize::new(0));
        let m = mock.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                // Small SSE frames: without this, delayed ACKs add ~40 ms.
                let _ = tcp.set_nodelay(true);
                let (m, script, counter) = (m.clone(), script.clone(), counter.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let (m, script, counter) = (m.clone(), script.clone(), counter.clone());
                        async move { Ok::<_, Infallible>(m.serve(req, &*script, &counter).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        mock
    }

    /// `http://127.0.0.1:PORT/v1`
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn recorded(&self) -> Vec<Recorded> {
        self.requests.lock().expect("lock").clone()
    }

    async fn serve(
        &self,
        req: Request<Incoming>,
        script: &Script,
        counter: &AtomicUsize,
    ) -> Response<MockBody> {
        let path = req.uri().path().to_string();
        let headers = req.headers().clone();
        let bytes = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        self.requests.lock().expect("lock").push(Recorded {
            path: path.clone(),
            headers,
            body: body.clone(),
        });
        if path == "/v1/models" {
            return full(
                200,
                &json!({"object": "list", "data": [{"id": MOCK_MODEL, "object": "model", "created": 0, "owned_by": "mock"}]}),
            );
        }
        if path != "/v1/chat/completions" {
            return full(
                404,
                &json!({"error": {"message": "no such path", "type": "invalid_request_error", "code": null}}),
            );
        }
        let n = counter.fetch_add(1, Ordering::SeqCst);
        match script(&body, n) {
            MockReply::Json { status, body } => full(status, &body),
            MockReply::Hang => {
                // Counted as cancelled when the gateway gives up on it.
                struct OnDrop(Arc<AtomicUsize>);
                impl Drop for OnDrop {
                    fn drop(&mut self) {
                        self.0.fetch_add(1, Ordering::SeqCst);
                    }
                }
                let _guard = OnDrop(self.cancelled.clone());
                std::future::pending::<()>().await;
                unreachable!()
            }
            MockReply::Text { pieces, delay, end } => {
                let id = format!("chatcmpl-mock-{n}");
                if body.get("stream").and_then(Value::as_bool) != Some(true) {
                    return full(
                        200,
                        &json!({"id": id, "object": "chat.completion", "created": 1700000000, "model": MOCK_MODEL,
                                "choices": [{"index": 0, "message": {"role": "assistant", "content": pieces.concat()},
                                             "logprobs": null, "finish_reason": "stop"}],
                                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}),
                    );
                }
                let (tx, mut rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
                let cancelled = self.cancelled.clone();
                tokio::spawn(async move {
                    let mut frames = vec![chunk(
                        &id,
                        json!({"role": "assistant", "content": ""}),
                        Value::Null,
                    )];
                    frames.extend(
                        pieces
                            .iter()
                            .map(|p| chunk(&id, json!({"content": p}), Value::Null)),
                    );
                    for (i, f) in frames.into_iter().enumerate() {
                        if i > 0 {
                            tokio::time::sleep(delay).await;
                        }
                        if tx.send(Ok(Frame::data(f))).await.is_err() {
                            cancelled.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    }
                    let tail: Vec<Result<Frame<Bytes>, std::io::Error>> = match end {
                        StreamEnd::Done => vec![
                            Ok(Frame::data(chunk(&id, json!({}), json!("stop")))),
                            Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n"))),
                        ],
                        StreamEnd::Cut => vec![Err(std::io::Error::other("mock cut the stream"))],
                        StreamEnd::Malformed => vec![Ok(Frame::data(Bytes::from_static(
                            b"data: {this is not json\n\n",
                        )))],
                    };
                    for t in tail {
                        if tx.send(t).await.is_err() {
                            cancelled.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    }
                    // Keep the connection open until the gateway hangs up
                    // after a malformed event, like a confused server would.
                    if end == StreamEnd::Malformed {
                        tx.closed().await;
                    }
                });
                let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
                let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
                r.headers_mut().insert(
                    "content-type",
                    http::HeaderValue::from_static("text/event-stream"),
                );
                provider_headers(r.headers_mut());
                r
            }
        }
    }
}

/// The text of the last user message in a chat request body.
pub fn last_user(body: &Value) -> String {
    body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|x| x["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_string()
}

// ------------------------------------------------------------ the gateway

/// What to start the gateway with.
pub struct GatewayOptions {
    /// `upstream.base_url`; `None` leaves it unset.
    pub upstream: Option<String>,
    /// The `[classifier]` section.
    pub classifier: String,
    /// Extra TOML appended to `[server]`/`[upstream]`/`[moderation]` is not
    /// possible in TOML, so sections come whole: this replaces the defaults
    /// of [`GatewayOptions::upstream_section`] etc. when set.
    pub upstream_extra: String,
    pub server_extra: String,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Text replacements in the written policy files: (file stem, from, to).
    pub policy_patches: Vec<(String, String, String)>,
}

impl GatewayOptions {
    pub fn new(upstream: Option<String>) -> GatewayOptions {
        GatewayOptions {
            upstream,
            classifier: keyword_classifier(),
            upstream_extra: String::new(),
            server_extra: String::new(),
            env: Vec::new(),
            policy_patches: Vec::new(),
        }
    }

    pub fn env(mut self, k: &str, v: &str) -> GatewayOptions {
        self.env.push((k.to_string(), v.to_string()));
        self
    }
}

/// A running gateway; killed on drop.
pub struct Gateway {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub policies_dir: PathBuf,
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Write the shipped policies (with their guard lists, `guards/`) plus an
/// `observe` and a `buffer` variant of the default into `dir`.
pub fn write_policies(dir: &Path) {
    std::fs::create_dir_all(dir.join("guards")).expect("policies dir");
    for e in std::fs::read_dir(repo_path("policies/guards")).expect("policies/guards") {
        let path = e.expect("guard list").path();
        if let Some(name) = path.file_name() {
            std::fs::copy(&path, dir.join("guards").join(name)).expect("copy guard list");
        }
    }
    let default =
        std::fs::read_to_string(repo_path("policies/default.toml")).expect("default policy");
    std::fs::write(dir.join("default.toml"), &default).expect("write");
    std::fs::copy(repo_path("policies/strict.toml"), dir.join("strict.toml")).expect("copy strict");
    let observe = default
        .replace("name = \"default\"", "name = \"observe\"")
        .replace("streaming = \"window\"", "streaming = \"observe\"");
    std::fs::write(dir.join("observe.toml"), observe).expect("write observe");
    let buffer = default
        .replace("name = \"default\"", "name = \"buffer\"")
        .replace("streaming = \"window\"", "streaming = \"buffer\"");
    std::fs::write(dir.join("buffer.toml"), buffer).expect("write buffer");
}

pub fn config_toml(opts: &GatewayOptions, policies_dir: &Path) -> String {
    let upstream = match &opts.upstream {
        Some(u) => format!("base_url = \"{u}\"\napi_key = \"sk-gateway-secret\"\n"),
        None => String::new(),
    };
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_secs = 10\n{server_extra}\n\
         [upstream]\n{upstream}connect_timeout_ms = 2000\nfirst_byte_timeout_ms = 5000\ntotal_timeout_ms = 30000\n{upstream_extra}\n\
         [moderation]\npolicy = \"default\"\npolicies_dir = \"{dir}\"\n\
         [moderation.header_policies]\nstrict = \"strict\"\nobserve = \"observe\"\nbuffer = \"buffer\"\ndefault = \"default\"\n\
         {classifier}\n[logging]\nformat = \"json\"\nlevel = \"info\"\n",
        server_extra = opts.server_extra,
        upstream_extra = opts.upstream_extra,
        dir = policies_dir.display(),
        classifier = opts.classifier,
    )
}

/// The binary under test. `CAREWALL_BIN` overrides it (for checkouts that
/// share a cargo target folder, where another checkout's build may have
/// replaced `target/debug/carewall`).
pub fn carewall_bin() -> PathBuf {
    std::env::var_os("CAREWALL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_carewall")))
}

/// A `Command` for the binary with no inherited carewall/OpenAI settings.
pub fn carewall_command() -> Command {
    let mut cmd = Command::new(carewall_bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("CAREWALL__") || k == "OPENAI_API_KEY" || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd
}

impl Gateway {
    pub fn start(opts: GatewayOptions) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let policies_dir = dir.path().join("policies");
        write_policies(&policies_dir);
        for (stem, from, to) in &opts.policy_patches {
            let file = policies_dir.join(format!("{stem}.toml"));
            let text = std::fs::read_to_string(&file).expect("policy to patch");
            assert!(text.contains(from.as_str()), "{stem}.toml has no `{from}`");
            std::fs::write(&file, text.replacen(from.as_str(), to, 1)).expect("patch policy");
        }
        let cfg = dir.path().join("carewall.toml");
        std::fs::write(&cfg, config_toml(&opts, &policies_dir)).expect("write config");
        let mut cmd = carewall_command();
        cmd.arg("serve").arg("--config").arg(&cfg);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        Gateway::spawn(cmd, dir, policies_dir)
    }

    /// Run `cmd` (a carewall command that serves) and wait for its address.
    pub fn spawn(mut cmd: Command, dir: tempfile::TempDir, policies_dir: PathBuf) -> Gateway {
        let log = std::fs::File::create(dir.path().join("stderr.log")).expect("log file");
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .stdin(Stdio::null())
            .spawn()
            .expect("start carewall");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let rest = line
                    .strip_prefix("carewall listening on http://")
                    .or_else(|| line.strip_prefix("carewall listening on https://"));
                if let Some(rest) = rest {
                    let _ = tx.send(rest.trim().to_string());
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a.parse().expect("address"),
            Err(_) => {
                let _ = child.kill();
                let logs =
                    std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
                panic!("carewall did not print its address; stderr:\n{logs}");
            }
        };
        Gateway {
            child,
            addr,
            dir,
            policies_dir,
        }
    }

    /// `http://127.0.0.1:PORT/v1`
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "could not send {sig}");
    }

    /// An async-openai client that names a policy with `x-carewall-policy`.
    pub fn openai_with_policy(
        &self,
        policy: &str,
    ) -> async_openai::Client<async_openai::config::OpenAIConfig> {
        let cfg = async_openai::config::OpenAIConfig::new()
            .with_api_base(self.base_url())
            .with_api_key("client-key")
            .with_header("x-carewall-policy", policy)
            .expect("header");
        async_openai::Client::with_config(cfg)
    }

    /// An async-openai client pointed at the gateway (no retries, so error
    /// tests see the first answer).
    pub fn openai(&self) -> async_openai::Client<async_openai::config::OpenAIConfig> {
        let cfg = async_openai::config::OpenAIConfig::new()
            .with_api_base(self.base_url())
            .with_api_key("client-key-not-forwarded");
        async_openai::Client::with_config(cfg)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A one-message chat request for async-openai.
pub fn chat_request(
    model: &str,
    user: &str,
) -> async_openai::types::chat::CreateChatCompletionRequest {
    use async_openai::types::chat::{
        ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
    };
    CreateChatCompletionRequestArgs::default()
        .model(model)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content(user)
            .build()
            .expect("message")
            .into()])
        .build()
        .expect("request")
}

/// Parse an SSE body into its `data` payloads.
pub fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|ev| {
            let data: Vec<&str> = ev
                .lines()
                .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
                .collect();
            if data.is_empty() {
                None
            } else {
                Some(data.join("\n"))
            }
        })
        .collect()
}

/// Concatenated `delta.content` of an SSE body's chunks.
pub fn sse_text(body: &str) -> String {
    sse_events(body)
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect()
}

/// The chunk carrying the `moderation` object.
pub fn sse_verdict(body: &str) -> Option<Value> {
    sse_events(body)
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|v| v.get("moderation").is_some())
}

pub fn chat_body(user: &str, stream: bool) -> Value {
    json!({"model": MOCK_MODEL, "stream": stream, "messages": [
        {"role": "system", "content": "You are a supportive assistant."},
        {"role": "user", "content": user}
    ]})
}
