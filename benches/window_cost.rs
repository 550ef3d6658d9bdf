//! Window-mode cost per reply: classifications (checks), model views
//! (windows x context views) and response tokens scored, and wall time per
//! reply, for streamed replies of about 100, 500 and 2,000 tokens, through
//! the real streaming engine and the shipped model.
//!
//! Run (ONNX Runtime from `bash scripts/setup.sh`):
//! `cargo bench --bench window_cost`
//! (plain harness: prints one table; `CAREWALL_BENCH_MODEL_DIR` picks the model).
//!
//! "Before" (the engine before whole-reply coverage) is derived, not run:
//! it classified the whole reply so far at every sentence boundary, one
//! view each, cut to its first 128 response tokens, so its checks were the
//! number of sentences and nothing after the first ~128 tokens was seen.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use carewall::classifier::model::{load_tokenizer, ModelFiles, ModelSpec};
use carewall::classifier::tokenize::{Layout, PairEncoder};
use carewall::classifier::{build, Classifier, ClassifierSettings, ClassifyFuture, Pair};
use carewall::moderation::context::ChatRequest;
use carewall::moderation::stream::{run, StreamJob};
use carewall::moderation::{ChatUpstream, DataStream, Moderator, NoopSink};
use carewall::policy::{PolicySet, StreamMode};
use futures::future::BoxFuture;
use futures::StreamExt;
use serde_json::{json, Value};

fn model_dir() -> PathBuf {
    std::env::var_os("CAREWALL_BENCH_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models/carewall-safety"))
}

/// Counts checks and views around the real classifier.
struct Counting {
    inner: Arc<dyn Classifier>,
    encoder: PairEncoder,
    checks: AtomicUsize,
    views: AtomicUsize,
    tokens: AtomicUsize,
}

impl Classifier for Counting {
    fn classify(&self, pair: Pair) -> ClassifyFuture<'_> {
        self.checks.fetch_add(1, Ordering::Relaxed);
        if let Ok(w) = self.encoder.encode_windows(&pair) {
            self.views.fetch_add(w.len(), Ordering::Relaxed);
            let t: usize = w.iter().map(|(_, e)| e.len()).sum();
            self.tokens.fetch_add(t, Ordering::Relaxed);
        }
        self.inner.classify(pair)
    }
    fn name(&self) -> &str {
        "counting"
    }
}

struct NoRetry;
impl ChatUpstream for NoRetry {
    fn open_stream(
        &self,
        _: Value,
    ) -> BoxFuture<'_, Result<DataStream, carewall::error::GatewayError>> {
        Box::pin(async { Err(carewall::error::GatewayError::Internal("no retries".into())) })
    }
    fn complete(&self, _: Value) -> BoxFuture<'_, Result<Value, carewall::error::GatewayError>> {
        Box::pin(async { Err(carewall::error::GatewayError::Internal("no retries".into())) })
    }
}

fn reply_chunks(sentences: usize) -> DataStream {
    let s = "If you can, keep the same wake-up time each day, even after a bad night. ";
    let mut ev: Vec<String> = Vec::new();
    for i in 0..sentences {
        ev.push(
            json!({"id": "b", "object": "chat.completion.chunk", "created": 1, "model": "m",
                   "choices": [{"index": 0, "delta": {"content": s}, "finish_reason": null}]})
            .to_string(),
        );
        let _ = i;
    }
    ev.push(
        json!({"id": "b", "object": "chat.completion.chunk", "created": 1, "model": "m",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        .to_string(),
    );
    futures::stream::iter(ev.into_iter().map(Ok)).boxed()
}

fn main() {
    let dir = model_dir();
    let files = ModelFiles::locate(&dir).unwrap_or_else(|e| panic!("{e}"));
    let spec = ModelSpec::load(&files.spec).unwrap_or_else(|e| panic!("{e}"));
    let tok = load_tokenizer(&files.tokenizer, &spec).unwrap_or_else(|e| panic!("{e}"));
    let encoder = PairEncoder::new(tok, Layout::from(&spec));
    let settings = ClassifierSettings {
        model_dir: dir.clone(),
        intra_threads: 2,
        timeout: Duration::from_secs(120),
        ..ClassifierSettings::default()
    };
    let inner = build(&settings).unwrap_or_else(|e| panic!("{e}"));
    let counting = Arc::new(Counting {
        inner,
        encoder,
        checks: AtomicUsize::new(0),
        views: AtomicUsize::new(0),
        tokens: AtomicUsize::new(0),
    });
    let m = carewall::config::ModerationConfig {
        enabled: true,
        policy: "default".into(),
        policies_dir: PathBuf::from("policies"),
        header_policies: Default::default(),
        max_concurrent_classifications: 4,
    };
    let mut policy = (*PolicySet::load(&m)
        .unwrap_or_else(|e| panic!("{e}"))
        .default_policy()
        .unwrap_or_else(|| panic!("default policy")))
    .clone();
    policy.streaming = StreamMode::Window;
    let policy = Arc::new(policy);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    // One sentence is 17 tokens with the shipped tokenizer.
    println!("| reply tokens | sentences | checks | views | tokens scored | wall ms/reply | before: checks (views) |");
    println!("|---|---|---|---|---|---|---|");
    for target in [100usize, 500, 2000] {
        let sentences = target / 17;
        let (checks0, views0, tokens0) = (
            counting.checks.load(Ordering::Relaxed),
            counting.views.load(Ordering::Relaxed),
            counting.tokens.load(Ordering::Relaxed),
        );
        let reps = 3;
        let started = Instant::now();
        for _ in 0..reps {
            let body = json!({"model": "m", "stream": true,
                              "messages": [{"role": "user", "content": "I can't sleep, what can I do?"}]});
            let request =
                ChatRequest::parse(body.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}"));
            let now = tokio::time::Instant::now();
            let job = StreamJob {
                probe: carewall::telemetry::RequestProbe::none(),
                moderator: Arc::new(Moderator::new(
                    counting.clone(),
                    4,
                    Duration::from_secs(120),
                )),
                upstream: Arc::new(NoRetry),
                sink: Arc::new(NoopSink),
                mode: StreamMode::Window,
                policy: policy.clone(),
                request,
                request_id: "bench".into(),
                deadline: now + Duration::from_secs(600),
                started: now,
                started_at: SystemTime::now(),
                upstream_first_byte: None,
                total_timeout: Duration::from_secs(600),
            };
            rt.block_on(async {
                let (tx, mut rx) = tokio::sync::mpsc::channel(64);
                let h = tokio::spawn(run(job, reply_chunks(sentences), tx));
                while rx.recv().await.is_some() {}
                let _ = h.await;
            });
        }
        let per = |a: usize, b: usize| (a - b) as f64 / reps as f64;
        println!(
            "| {} | {sentences} | {:.0} | {:.0} | {:.0} | {:.0} | {sentences} (1 each, first 128 tokens only) |",
            sentences * 17,
            per(counting.checks.load(Ordering::Relaxed), checks0),
            per(counting.views.load(Ordering::Relaxed), views0),
            per(counting.tokens.load(Ordering::Relaxed), tokens0),
            started.elapsed().as_secs_f64() * 1000.0 / reps as f64
        );
    }
}
