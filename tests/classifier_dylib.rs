//! A missing or wrong ONNX Runtime library is a clear error, never a panic.
//! Its own test binary: ort loads one library per process, and these tests
//! must run before any good library is loaded.

use std::path::PathBuf;
use std::process::Command;

use carewall::classifier::{build, ClassifierSettings};

fn settings(lib: PathBuf, model_dir: &tempfile::TempDir) -> ClassifierSettings {
    ClassifierSettings {
        // The library is checked after the model folder; point at any folder
        // with the three files so the library error is the one reported.
        model_dir: model_dir.path().to_path_buf(),
        ort_dylib_path: Some(lib),
        ..ClassifierSettings::default()
    }
}

/// A folder holding stand-ins for the three model files: the library is
/// loaded before the model itself is parsed by ONNX Runtime.
fn model_dir_with_files() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let spec = r#"{"name": "t", "labels": ["Nonsense", "Humanoid Mimicry", "Linguistic Neglect",
      "Unamiable Judgment", "Toxic Language", "Unauthorized Preachment", "Nonfactual Statement",
      "Safe Response"], "max_length": 256, "max_response_tokens": 128, "cls_id": 0, "sep_id": 2,
      "pad_id": 1, "inputs": ["input_ids", "attention_mask"], "output": "logits"}"#;
    std::fs::write(dir.join("carewall-model.json"), spec).expect("write");
    // Smallest valid tokenizer.json: a word-level model with 3 tokens.
    let tok = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
      "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
      "decoder": null, "model": {"type": "WordLevel", "vocab": {"<s>": 0, "<pad>": 1, "</s>": 2},
      "unk_token": "<pad>"}}"#;
    std::fs::write(dir.join("tokenizer.json"), tok).expect("write");
    std::fs::write(dir.join("model.onnx"), b"unused").expect("write");
    tmp
}

fn build_err(lib: PathBuf) -> String {
    let dir = model_dir_with_files();
    match build(&settings(lib, &dir)) {
        Ok(_) => panic!("should not build"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_library_names_path_and_fix() {
    let err = build_err(PathBuf::from("/nonexistent/libonnxruntime.so"));
    assert!(err.contains("/nonexistent/libonnxruntime.so"), "{err}");
    assert!(
        err.contains("bash scripts/setup.sh") && err.contains("ORT_DYLIB_PATH"),
        "{err}"
    );
}

#[test]
fn a_file_that_is_no_library_names_path_and_fix() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bogus = tmp.path().join("libonnxruntime.so");
    std::fs::write(&bogus, b"not an ELF file").expect("write");
    let err = build_err(bogus.clone());
    assert!(
        err.contains("cannot load ONNX Runtime") && err.contains(&bogus.display().to_string()),
        "{err}"
    );
    assert!(err.contains("bash scripts/setup.sh"), "{err}");
}

#[test]
fn the_binary_reports_a_missing_library_on_stderr() {
    let dir = model_dir_with_files();
    let mut child = Command::new(env!("CARGO_BIN_EXE_carewall"))
        .args(["classify", "--model-dir"])
        .arg(dir.path())
        .env("ORT_DYLIB_PATH", "/nonexistent/from-env.so")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn carewall");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(b"{\"response\": \"[supporter]hi\"}\n")
            .expect("write");
    }
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("/nonexistent/from-env.so") && stderr.contains("ORT_DYLIB_PATH"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
