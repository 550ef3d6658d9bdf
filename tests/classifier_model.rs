//! The real model end to end: parity with the Python export, batching under
//! concurrent load, overload, and the errors for broken model folders.
//!
//! Model folder: `CAREWALL_TEST_MODEL_DIR`, else `models/carewall-safety`.
//! ONNX Runtime: `ORT_DYLIB_PATH`, else `.cache/onnxruntime/` (run
//! `bash scripts/setup.sh`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use carewall::classifier::tokenize::pad;
use carewall::classifier::{
    build, ClassifierSettings, ClassifyError, OnnxClassifier, OnnxModel, Pair,
};
use serde::Deserialize;

fn model_dir() -> PathBuf {
    let dir = std::env::var_os("CAREWALL_TEST_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models/carewall-safety"));
    assert!(
        dir.join("model.onnx").is_file(),
        "no model at {} (set CAREWALL_TEST_MODEL_DIR to a model folder)",
        dir.display()
    );
    dir
}

#[derive(Deserialize)]
struct Fixture {
    tolerance: f32,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    id: serde_json::Value,
    context: String,
    response: String,
    input_ids: Vec<i64>,
    token_type_ids: Vec<i64>,
    logits: Vec<f32>,
    probs: Vec<f32>,
    logits_batched: Vec<f32>,
}

fn fixture() -> Fixture {
    let path = model_dir().join("parity.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read parity fixture {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn load(threads: usize) -> OnnxModel {
    OnnxModel::load(&model_dir(), None, threads).unwrap_or_else(|e| panic!("{e}"))
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= tol,
        "{what}: max |diff| {worst} > {tol}\n got {got:?}\nwant {want:?}"
    );
}

#[test]
fn token_ids_and_single_pair_logits_match_python() {
    let fx = fixture();
    assert!(fx.cases.len() >= 8, "fixture too small");
    let mut model = load(1);
    for case in &fx.cases {
        let pair = Pair {
            context: case.context.clone(),
            response: case.response.clone(),
        };
        let enc = model.encode(&pair).expect("encode");
        assert_eq!(
            enc.input_ids, case.input_ids,
            "input_ids of case {}",
            case.id
        );
        assert_eq!(
            enc.token_type_ids, case.token_type_ids,
            "token_type_ids of case {}",
            case.id
        );
        let logits = model
            .logits(&pad(&[enc], model.spec().pad_id))
            .expect("run");
        assert_close(
            &logits[0],
            &case.logits,
            fx.tolerance,
            &format!("logits of case {}", case.id),
        );
        let scores = model.scores(&[&pair]).expect("scores");
        assert_close(
            &scores[0].0,
            &case.probs,
            fx.tolerance,
            &format!("probs of case {}", case.id),
        );
    }
}

#[test]
fn batched_logits_match_python() {
    let fx = fixture();
    let mut model = load(2);
    let pairs: Vec<Pair> = fx
        .cases
        .iter()
        .map(|c| Pair {
            context: c.context.clone(),
            response: c.response.clone(),
        })
        .collect();
    let encoded: Vec<_> = pairs
        .iter()
        .map(|p| model.encode(p).expect("encode"))
        .collect();
    let logits = model
        .logits(&pad(&encoded, model.spec().pad_id))
        .expect("run");
    for (case, got) in fx.cases.iter().zip(&logits) {
        assert_close(
            got,
            &case.logits_batched,
            fx.tolerance,
            &format!("batched logits of case {}", case.id),
        );
    }
}

fn settings() -> ClassifierSettings {
    ClassifierSettings {
        model_dir: model_dir(),
        intra_threads: 1,
        timeout: Duration::from_secs(60),
        ..ClassifierSettings::default()
    }
}

fn dev_pairs(n: usize) -> Vec<Pair> {
    let cases = fixture().cases;
    cases
        .iter()
        .cycle()
        .take(n)
        .map(|c| Pair {
            context: c.context.clone(),
            response: c.response.clone(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_batched_through_the_classifier_trait() {
    let s = ClassifierSettings {
        max_batch: 8,
        max_wait: Duration::from_millis(20),
        ..settings()
    };
    let classifier = build(&s).unwrap_or_else(|e| panic!("{e}"));
    assert!(classifier.is_ready());
    assert!(
        classifier.name().starts_with("carewall-safety"),
        "{}",
        classifier.name()
    );
    let stats = classifier
        .batch_stats()
        .expect("the ONNX classifier batches");
    let mut model = load(1);
    let pairs = dev_pairs(64);
    let tasks: Vec<_> = pairs
        .iter()
        .cloned()
        .map(|p| {
            let c = Arc::clone(&classifier);
            tokio::spawn(async move { c.classify(p).await })
        })
        .collect();
    for (pair, task) in pairs.iter().zip(tasks) {
        let got = task.await.expect("task").expect("scores");
        // Multi-view judgements (long replies, multi-turn contexts) are
        // aggregated per category, so only the range is checked here.
        assert!(
            got.0.iter().all(|p| (0.0..=1.0).contains(p)),
            "scores out of range: {got:?}"
        );
        // int8 dynamic quantisation makes a pair's logits depend on its batch
        // companions (activation scales are per tensor), so batched scores
        // are compared loosely; the first trained model moves by up to ~0.015.
        let alone = model.scores(&[pair]).expect("scores");
        assert_close(&got.0, &alone[0].0, 5e-2, "batched vs alone");
    }
    let snap = stats.snapshot();
    assert_eq!(snap.items, 64);
    assert!(
        snap.max_batch_seen() > 1,
        "no batching under 64 concurrent requests: {snap:?}"
    );
    assert!(snap.max_batch_seen() <= 8, "{snap:?}");
    assert_eq!(snap.queue_depth, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_batch_one_gives_the_scores_of_the_pair_alone() {
    let s = ClassifierSettings {
        max_batch: 1,
        intra_threads: 1,
        ..settings()
    };
    let classifier: Arc<dyn carewall::classifier::Classifier> =
        Arc::new(OnnxClassifier::new(&s).unwrap_or_else(|e| panic!("{e}")));
    let fx = fixture();
    let pairs: Vec<Pair> = fx
        .cases
        .iter()
        .map(|c| Pair {
            context: c.context.clone(),
            response: c.response.clone(),
        })
        .collect();
    let results =
        futures::future::join_all(pairs.iter().cloned().map(|p| classifier.classify(p))).await;
    for (case, got) in fx.cases.iter().zip(results) {
        let got = got.expect("scores");
        assert_close(
            &got.0,
            &case.probs,
            fx.tolerance,
            &format!("probs of case {} via the batcher", case.id),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_overloaded_at_once() {
    let s = ClassifierSettings {
        max_batch: 1,
        queue_capacity: 2,
        ..settings()
    };
    let classifier = OnnxClassifier::new(&s).unwrap_or_else(|e| panic!("{e}"));
    let classifier: Arc<dyn carewall::classifier::Classifier> = Arc::new(classifier);
    // join_all polls every future once before any can finish a model run,
    // so 40 submissions race a queue of 2 and a single worker.
    let results =
        futures::future::join_all(dev_pairs(40).into_iter().map(|p| classifier.classify(p))).await;
    let overloaded = results
        .iter()
        .filter(|r| matches!(r, Err(ClassifyError::Overloaded { capacity: 2 })))
        .count();
    let served = results.iter().filter(|r| r.is_ok()).count();
    assert!(
        overloaded > 0,
        "no Overloaded among {} results",
        results.len()
    );
    assert!(
        served > 0 && served + overloaded == 40,
        "served {served}, overloaded {overloaded}"
    );
    assert_eq!(
        classifier
            .batch_stats()
            .expect("stats")
            .snapshot()
            .overloaded as usize,
        overloaded
    );
}

/// A copy of the model folder that a test may break.
fn scratch_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["model.onnx", "tokenizer.json", "carewall-model.json"] {
        std::fs::copy(model_dir().join(f), dir.path().join(f)).expect("copy");
    }
    dir
}

fn original_spec() -> serde_json::Value {
    let text = std::fs::read_to_string(model_dir().join("carewall-model.json")).expect("read");
    serde_json::from_str(&text).expect("json")
}

fn load_err(dir: &Path) -> String {
    match OnnxModel::load(dir, None, 1) {
        Ok(_) => panic!("{} should not load", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn broken_model_folders_give_errors_naming_path_and_fix() {
    let dir = scratch_copy();
    std::fs::remove_file(dir.path().join("tokenizer.json")).expect("rm");
    let err = load_err(dir.path());
    assert!(
        err.contains("tokenizer.json is missing") && err.contains("git checkout"),
        "{err}"
    );

    let dir = scratch_copy();
    std::fs::write(dir.path().join("model.onnx"), b"definitely not protobuf").expect("write");
    let err = load_err(dir.path());
    assert!(
        err.contains("model.onnx") && err.contains("not a usable ONNX model"),
        "{err}"
    );

    let dir = scratch_copy();
    std::fs::write(dir.path().join("tokenizer.json"), b"{\"version\": 1").expect("write");
    let err = load_err(dir.path());
    assert!(
        err.contains("tokenizer.json") && err.contains("not a valid"),
        "{err}"
    );

    // A spec that disagrees with the graph's inputs.
    let dir = scratch_copy();
    let spec_path = dir.path().join("carewall-model.json");
    let mut spec = original_spec();
    let inputs = spec["inputs"].as_array().expect("inputs").clone();
    let flipped: Vec<_> = if inputs.iter().any(|i| i == "token_type_ids") {
        inputs
            .into_iter()
            .filter(|i| i != "token_type_ids")
            .collect()
    } else {
        inputs
            .into_iter()
            .chain([serde_json::json!("token_type_ids")])
            .collect()
    };
    spec["inputs"] = serde_json::Value::Array(flipped);
    std::fs::write(&spec_path, spec.to_string()).expect("write");
    let err = load_err(dir.path());
    assert!(
        err.contains("does not match") && err.contains("graph inputs"),
        "{err}"
    );

    let dir = scratch_copy();
    let mut spec = original_spec();
    spec["output"] = serde_json::json!("probabilities");
    std::fs::write(dir.path().join("carewall-model.json"), spec.to_string()).expect("write");
    let err = load_err(dir.path());
    assert!(err.contains("no output \"probabilities\""), "{err}");
}

#[test]
fn pre_cutting_huge_texts_keeps_the_tokens_the_model_sees() {
    let model = load(1);
    let layout = *model.encoder().layout();
    let seeker =
        "[seeker]我最近总是失眠，白天上班也没精神，同事说我变了很多。I feel tired all the time. ";
    let supporter = "[supporter]听起来你真的很累，愿意多说说吗？";
    let pair = Pair {
        context: format!("{seeker}{supporter}").repeat(400),
        response: format!(
            "[supporter]{}",
            "我理解你的感受，也想陪你一起想办法。Let's take it slowly. ".repeat(300)
        ),
    };
    assert!(pair.context.chars().count() > layout.max_length * 32);
    let cut = model.encode(&pair).expect("encode");
    let norm = carewall::classifier::normalize::normalize;
    let ctx = model.encoder().ids(&norm(&pair.context)).expect("ids");
    let resp = model.encoder().ids(&norm(&pair.response)).expect("ids");
    let full = carewall::classifier::tokenize::assemble(&ctx, &resp, &layout);
    assert_eq!(cut, full);
    assert_eq!(cut.len(), layout.max_length);
    // The response is not cut: every token is in some window.
    let windows = model.encoder().encode_windows(&pair).expect("windows");
    assert!(windows.len() > 20, "{} views", windows.len());
}
