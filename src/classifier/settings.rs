//! Typed, validated classifier settings (the `[classifier]` config section
//! after validation). The raw serde form lives in `crate::config`.

use std::path::PathBuf;
use std::time::Duration;

/// Which implementation serves classifications.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClassifierKind {
    /// The shipped ONNX model through ONNX Runtime (`ort`).
    Onnx,
    /// A deterministic keyword classifier for tests and offline demos only.
    Keyword,
}

/// Everything needed to build a classifier.
#[derive(Debug, Clone)]
pub struct ClassifierSettings {
    pub kind: ClassifierKind,
    /// Folder holding `model.onnx`, `tokenizer.json`, `carewall-model.json`.
    pub model_dir: PathBuf,
    /// `libonnxruntime.so`; `None` means `ORT_DYLIB_PATH`, then the set-up
    /// script's default location.
    pub ort_dylib_path: Option<PathBuf>,
    /// Intra-op threads per ONNX session.
    pub intra_threads: usize,
    /// Number of inference worker threads (each owns a session).
    pub workers: usize,
    /// Largest micro-batch.
    pub max_batch: usize,
    /// How long the batcher waits to fill a batch.
    pub max_wait: Duration,
    /// Bounded queue capacity; beyond it requests fail with `Overloaded`.
    pub queue_capacity: usize,
    /// Per-classification timeout.
    pub timeout: Duration,
}

impl Default for ClassifierSettings {
    fn default() -> Self {
        ClassifierSettings {
            kind: ClassifierKind::Onnx,
            model_dir: PathBuf::from("models/carewall-safety"),
            ort_dylib_path: None,
            intra_threads: 2,
            workers: 1,
            max_batch: 16,
            max_wait: Duration::from_millis(2),
            queue_capacity: 1024,
            timeout: Duration::from_millis(2000),
        }
    }
}
