//! Classifier speed: model latency per call at 64/128/256 tokens, batch 1
//! and 8, 1 and 2 intra-op threads; tokenisation cost; and throughput of the
//! micro-batching classifier under 64 concurrent callers.
//!
//! Run (ONNX Runtime from `bash scripts/setup.sh`):
//! `CAREWALL_BENCH_MODEL_DIR=models/carewall-safety cargo bench --bench classifier -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use carewall::classifier::tokenize::{assemble, pad, EncodedPair, Layout};
use carewall::classifier::{Classifier, ClassifierSettings, OnnxClassifier, OnnxModel, Pair};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn model_dir() -> PathBuf {
    std::env::var_os("CAREWALL_BENCH_MODEL_DIR")
        .or_else(|| std::env::var_os("CAREWALL_TEST_MODEL_DIR"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models/carewall-safety"))
}

fn load(threads: usize) -> OnnxModel {
    match OnnxModel::load(&model_dir(), None, threads) {
        Ok(m) => m,
        Err(e) => panic!("benchmark needs the model: {e}"),
    }
}

/// A support-chat pair long enough to fill 256 tokens.
fn long_pair() -> Pair {
    let seeker = "[seeker]最近工作压力很大，晚上总是睡不着，感觉自己什么都做不好，和家人说了他们也不理解我。";
    let supporter = "[supporter]听起来你这段时间真的很辛苦，一个人扛着这么多压力。";
    Pair {
        context: format!("{seeker}{supporter}").repeat(8),
        response: "[supporter]能和我说说最近让你最难受的一件事吗？我们可以一起慢慢理一理。"
            .repeat(4),
    }
}

/// Exactly `tokens` ids (special tokens included) from the real tokeniser.
fn input_of(model: &OnnxModel, tokens: usize) -> EncodedPair {
    let pair = long_pair();
    let enc = model.encoder();
    let ctx = enc.ids(&pair.context).expect("tokenise");
    let resp = enc.ids(&pair.response).expect("tokenise");
    let layout = Layout {
        max_length: tokens,
        max_response_tokens: tokens / 3,
        ..*enc.layout()
    };
    let e = assemble(&ctx, &resp, &layout);
    assert_eq!(e.len(), tokens, "sample text too short for {tokens} tokens");
    e
}

fn latency(c: &mut Criterion) {
    let mut group = c.benchmark_group("model");
    for threads in [1, 2] {
        let mut model = load(threads);
        let pad_id = model.spec().pad_id;
        for tokens in [64, 128, 256] {
            for batch in [1, 8] {
                let inputs = pad(&vec![input_of(&model, tokens); batch], pad_id);
                group.throughput(Throughput::Elements(batch as u64));
                group.bench_with_input(
                    BenchmarkId::new(format!("{threads}t/b{batch}"), tokens),
                    &inputs,
                    |b, inputs| b.iter(|| black_box(model.logits(inputs).expect("run"))),
                );
            }
        }
    }
    group.finish();

    let model = load(1);
    let mut group = c.benchmark_group("tokenise");
    for tokens in [64, 128, 256] {
        // Text cut so that the pair is about `tokens` long.
        let e = input_of(&model, tokens);
        let split = e
            .token_type_ids
            .iter()
            .position(|&t| t == 1)
            .unwrap_or(e.len());
        let pair = long_pair();
        let ctx_chars: String = pair
            .context
            .chars()
            .rev()
            .take(split * 2)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let resp_chars: String = pair.response.chars().take((e.len() - split) * 2).collect();
        let p = Pair {
            context: ctx_chars,
            response: resp_chars,
        };
        group.bench_with_input(BenchmarkId::from_parameter(tokens), &p, |b, p| {
            b.iter(|| black_box(model.encode(p).expect("encode")))
        });
    }
    group.finish();
}

fn throughput(c: &mut Criterion) {
    const TASKS: usize = 64;
    const PER_TASK: usize = 4;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("classifier_concurrent");
    group.sample_size(10);
    group.throughput(Throughput::Elements((TASKS * PER_TASK) as u64));
    // Realistic mixed lengths: the 256-token pair cut at different points.
    let base = long_pair();
    let pairs: Arc<Vec<Pair>> = Arc::new(
        (0..TASKS)
            .map(|i| Pair {
                context: base.context.chars().take(40 + (i * 7) % 300).collect(),
                response: base.response.chars().take(20 + (i * 13) % 120).collect(),
            })
            .collect(),
    );
    // (workers, intra-op threads per worker, max_batch)
    for (workers, intra, max_batch) in [(1, 2, 1), (1, 2, 16), (2, 1, 1), (2, 1, 4)] {
        let settings = ClassifierSettings {
            model_dir: model_dir(),
            intra_threads: intra,
            workers,
            max_batch,
            max_wait: Duration::from_millis(2),
            queue_capacity: 1024,
            timeout: Duration::from_secs(60),
            ..ClassifierSettings::default()
        };
        let classifier: Arc<dyn Classifier> = match OnnxClassifier::new(&settings) {
            Ok(c) => Arc::new(c),
            Err(e) => panic!("benchmark needs the model: {e}"),
        };
        group.bench_function(
            BenchmarkId::new("64_tasks", format!("w{workers}_t{intra}_b{max_batch}")),
            |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        rt.block_on(async {
                            let tasks: Vec<_> = (0..TASKS)
                                .map(|i| {
                                    let c = Arc::clone(&classifier);
                                    let pairs = Arc::clone(&pairs);
                                    tokio::spawn(async move {
                                        for k in 0..PER_TASK {
                                            let p = pairs[(i + k) % pairs.len()].clone();
                                            c.classify(p).await.expect("classify");
                                        }
                                    })
                                })
                                .collect();
                            for t in tasks {
                                t.await.expect("task");
                            }
                        });
                        total += start.elapsed();
                    }
                    total
                })
            },
        );
        if let Some(stats) = classifier.batch_stats() {
            let s = stats.snapshot();
            eprintln!(
                "workers {workers} x {intra} threads, max_batch {max_batch}: {} batches, mean size {:.1}, largest {}",
                s.batches,
                s.items as f64 / s.batches.max(1) as f64,
                s.max_batch_seen()
            );
        }
    }
    group.finish();
}

criterion_group!(benches, latency, throughput);
criterion_main!(benches);
