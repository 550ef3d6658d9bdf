//! The model folder (`model.onnx`, `tokenizer.json`, `carewall-model.json`)
//! and the ONNX Runtime shared library: finding, checking and loading them.
//!
//! Invariant: every failure here is a [`BuildError`] whose message names the
//! offending path and the fix; nothing in this module panics on bad files.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Deserialize;

use super::{BuildError, Category};

/// File names inside a model folder.
pub const MODEL_FILE: &str = "model.onnx";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const SPEC_FILE: &str = "carewall-model.json";

/// Where `scripts/setup.sh` puts the library, relative to the repository root.
pub const DEFAULT_ORT_DYLIB: &str = ".cache/onnxruntime/libonnxruntime.so";

const ORT_FIX: &str = "run `bash scripts/setup.sh` (fetches onnxruntime 1.31.1 from PyPI into \
     .cache/onnxruntime/), or set ORT_DYLIB_PATH / `classifier.ort_dylib_path` to a \
     libonnxruntime.so of version >= 1.17";

/// The model's input contract, parsed from `carewall-model.json`
/// (see `models/README.md`). Unknown keys are allowed so the training side
/// can add metadata without breaking older binaries.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ModelSpec {
    pub name: String,
    #[serde(default)]
    pub version: String,
    /// Label names in output order; must be the 8 categories in id order.
    pub labels: Vec<String>,
    /// Longest sequence including special tokens.
    pub max_length: usize,
    /// Response tokens kept (cut at the end) before the context gets the rest.
    pub max_response_tokens: usize,
    /// Most context tokens in one window (the newest are kept), so a long
    /// history can never crowd out the reply. Absent: `max_length - 4`
    /// (the context takes whatever the response leaves).
    #[serde(default)]
    pub max_context_tokens: Option<usize>,
    /// Response tokens a window repeats from the one before it, so a
    /// sentence cut by a window edge is also seen whole. Absent: 32.
    #[serde(default)]
    pub window_overlap_tokens: Option<usize>,
    pub cls_id: u32,
    pub sep_id: u32,
    pub pad_id: u32,
    /// Graph input names; `input_ids` and `attention_mask` always, optionally
    /// `token_type_ids`.
    pub inputs: Vec<String>,
    /// Graph output holding `[batch, 8]` logits.
    pub output: String,
}

/// Graph inputs this runtime knows how to fill.
const KNOWN_INPUTS: [&str; 3] = ["input_ids", "attention_mask", "token_type_ids"];

impl ModelSpec {
    /// Parse and validate the JSON text of `carewall-model.json`; `path` is
    /// only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<ModelSpec, BuildError> {
        let spec: ModelSpec = serde_json::from_str(text).map_err(|e| {
            BuildError(format!(
                "{}: not a valid carewall-model.json: {e}; the file must match the format in \
                 models/README.md (re-export the model with training/)",
                path.display()
            ))
        })?;
        spec.validate(path)?;
        Ok(spec)
    }

    /// Read and validate `carewall-model.json` at `path`.
    pub fn load(path: &Path) -> Result<ModelSpec, BuildError> {
        let text = read_file(path, "the model's label/format description")?;
        ModelSpec::parse(&text, path)
    }

    fn validate(&self, path: &Path) -> Result<(), BuildError> {
        let mut problems = Vec::new();
        if self.labels.len() != Category::ALL.len() {
            problems.push(format!(
                "`labels` must list the {} categories, got {}",
                Category::ALL.len(),
                self.labels.len()
            ));
        } else {
            for (i, label) in self.labels.iter().enumerate() {
                // The output order is the contract; a reordered label list
                // would silently mislabel every verdict.
                if Category::parse(label).map(Category::id) != Some(i) {
                    problems.push(format!(
                        "`labels[{i}]` must be {:?}, got {label:?}",
                        Category::ALL[i].display_name()
                    ));
                }
            }
        }
        if self.max_length < 8 {
            problems.push(format!(
                "`max_length` must be >= 8, got {}",
                self.max_length
            ));
        } else if self.max_response_tokens == 0 || self.max_response_tokens > self.max_length - 4 {
            problems.push(format!(
                "`max_response_tokens` must be in 1..={} (max_length - 4), got {}",
                self.max_length - 4,
                self.max_response_tokens
            ));
        }
        if let Some(c) = self.max_context_tokens {
            if c > self.max_length.saturating_sub(4) {
                problems.push(format!(
                    "`max_context_tokens` must be at most max_length - 4 = {}, got {c}",
                    self.max_length.saturating_sub(4)
                ));
            }
        }
        if let Some(o) = self.window_overlap_tokens {
            if o * 2 > self.max_response_tokens {
                problems.push(format!(
                    "`window_overlap_tokens` must be at most half of max_response_tokens ({}), got {o}",
                    self.max_response_tokens
                ));
            }
        }
        for required in ["input_ids", "attention_mask"] {
            if !self.inputs.iter().any(|i| i == required) {
                problems.push(format!("`inputs` must contain {required:?}"));
            }
        }
        for input in &self.inputs {
            if !KNOWN_INPUTS.contains(&input.as_str()) {
                problems.push(format!(
                    "`inputs` has {input:?}, which this runtime cannot fill (known: {})",
                    KNOWN_INPUTS.join(", ")
                ));
            }
        }
        if self.output.is_empty() {
            problems.push("`output` must name the logits output".to_string());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(BuildError(format!(
                "{}: {}; fix the file or re-export the model with training/",
                path.display(),
                problems.join("; ")
            )))
        }
    }

    /// True when the graph takes `token_type_ids`.
    pub fn uses_token_type_ids(&self) -> bool {
        self.inputs.iter().any(|i| i == "token_type_ids")
    }
}

/// The three files of a model folder, checked to exist.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub model: PathBuf,
    pub tokenizer: PathBuf,
    pub spec: PathBuf,
}

impl ModelFiles {
    /// Check that `dir` holds the three files a model needs.
    pub fn locate(dir: &Path) -> Result<ModelFiles, BuildError> {
        if !dir.is_dir() {
            return Err(BuildError(format!(
                "model folder {} does not exist; set `classifier.model_dir` (or --model-dir) to \
                 a folder holding {MODEL_FILE}, {TOKENIZER_FILE} and {SPEC_FILE} \
                 (the shipped one is models/carewall-safety)",
                dir.display()
            )));
        }
        let files = ModelFiles {
            dir: dir.to_path_buf(),
            model: dir.join(MODEL_FILE),
            tokenizer: dir.join(TOKENIZER_FILE),
            spec: dir.join(SPEC_FILE),
        };
        for p in [&files.spec, &files.tokenizer, &files.model] {
            if !p.is_file() {
                return Err(BuildError(format!(
                    "{} is missing; the model folder {} must hold {MODEL_FILE}, \
                     {TOKENIZER_FILE} and {SPEC_FILE} (restore it from git, e.g. \
                     `git checkout -- {}`, or re-export it with training/)",
                    p.display(),
                    dir.display(),
                    dir.display()
                )));
            }
        }
        Ok(files)
    }
}

fn read_file(path: &Path, what: &str) -> Result<String, BuildError> {
    std::fs::read_to_string(path)
        .map_err(|e| BuildError(format!("cannot read {} ({what}): {e}", path.display())))
}

/// Load the tokenizer at `path` and check that the special ids the spec
/// names exist in its vocabulary.
pub fn load_tokenizer(path: &Path, spec: &ModelSpec) -> Result<tokenizers::Tokenizer, BuildError> {
    let tokenizer = tokenizers::Tokenizer::from_file(path).map_err(|e| {
        BuildError(format!(
            "{}: not a valid Hugging Face tokenizer.json: {e}; restore the file from git or \
             re-export the model with training/",
            path.display()
        ))
    })?;
    let vocab = tokenizer.get_vocab_size(true);
    for (key, id) in [
        ("cls_id", spec.cls_id),
        ("sep_id", spec.sep_id),
        ("pad_id", spec.pad_id),
    ] {
        if id as usize >= vocab {
            return Err(BuildError(format!(
                "{}: `{key}` = {id} is outside the tokenizer's vocabulary of {vocab} tokens \
                 ({}); the two files come from different exports",
                path.display(),
                spec.name
            )));
        }
    }
    Ok(tokenizer)
}

/// Find `libonnxruntime.so`: the configured path, else `ORT_DYLIB_PATH`,
/// else [`DEFAULT_ORT_DYLIB`] under the working directory or under any
/// ancestor of the executable's folder (so `target/debug/carewall` finds the
/// repository's copy).
pub fn locate_ort_dylib(configured: Option<&Path>) -> Result<PathBuf, BuildError> {
    let env = std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty());
    locate_ort_dylib_from(configured, env.as_deref().map(Path::new))
}

fn locate_ort_dylib_from(
    configured: Option<&Path>,
    env: Option<&Path>,
) -> Result<PathBuf, BuildError> {
    if let Some(p) = configured {
        return existing(p, "`classifier.ort_dylib_path` / --ort-dylib-path");
    }
    if let Some(p) = env {
        return existing(p, "ORT_DYLIB_PATH");
    }
    let mut candidates = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        candidates.push(cwd.join(DEFAULT_ORT_DYLIB));
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1) {
            let candidate = dir.join(DEFAULT_ORT_DYLIB);
            if !candidates.contains(&candidate) {
                candidates.push(candidate);
            }
        }
    }
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let searched: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    Err(BuildError(format!(
        "ONNX Runtime library not found (no `classifier.ort_dylib_path`, no ORT_DYLIB_PATH, \
         and none of: {}); {ORT_FIX}",
        searched.join(", ")
    )))
}

fn existing(p: &Path, source: &str) -> Result<PathBuf, BuildError> {
    if p.is_file() {
        // ort resolves relative paths against the executable's folder, not
        // the working directory; make it absolute so both agree.
        Ok(std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()))
    } else {
        Err(BuildError(format!(
            "ONNX Runtime library {} (from {source}) does not exist; {ORT_FIX}",
            p.display()
        )))
    }
}

/// The library ONNX Runtime was loaded from in this process and the
/// environment built on it. ort keeps one library per process, so a later
/// load with another path is refused instead of silently running on the
/// first.
static LOADED: Mutex<Option<(PathBuf, Option<ort::environment::Environment>)>> = Mutex::new(None);

/// Load ONNX Runtime from `path` (once per process) and return the shared
/// environment sessions are created in.
pub fn init_ort(path: &Path) -> Result<ort::environment::Environment, BuildError> {
    let mut loaded = LOADED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((first, env)) = loaded.as_ref() {
        if first != path {
            return Err(BuildError(format!(
                "ONNX Runtime was already loaded from {} in this process; cannot switch to {} \
                 (use one `classifier.ort_dylib_path` / ORT_DYLIB_PATH per process)",
                first.display(),
                path.display()
            )));
        }
        if let Some(env) = env {
            return Ok(env.clone());
        }
    }
    let builder = ort::init_from(path).map_err(|e| {
        BuildError(format!(
            "cannot load ONNX Runtime from {}: {e}; {ORT_FIX}",
            path.display()
        ))
    })?;
    *loaded = Some((path.to_path_buf(), None));
    let env = builder
        .with_name("carewall")
        .with_telemetry(false)
        .build()
        .map_err(|e| {
            BuildError(format!(
                "ONNX Runtime from {} failed to create an environment: {e}; {ORT_FIX}",
                path.display()
            ))
        })?;
    *loaded = Some((path.to_path_buf(), Some(env.clone())));
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
      "name": "carewall-safety", "version": "t",
      "labels": ["Nonsense", "Humanoid Mimicry", "Linguistic Neglect", "Unamiable Judgment",
                 "Toxic Language", "Unauthorized Preachment", "Nonfactual Statement", "Safe Response"],
      "max_length": 256, "max_response_tokens": 128,
      "cls_id": 0, "sep_id": 2, "pad_id": 1,
      "inputs": ["input_ids", "attention_mask"], "output": "logits", "extra": 1
    }"#;

    fn parse(text: &str) -> Result<ModelSpec, String> {
        ModelSpec::parse(text, Path::new("m/carewall-model.json")).map_err(|e| e.0)
    }

    #[test]
    fn good_spec_parses() {
        let spec = parse(GOOD).expect("valid spec");
        assert_eq!(spec.max_length, 256);
        assert!(!spec.uses_token_type_ids());
    }

    #[test]
    fn bad_specs_name_the_file_and_the_field() {
        let cases = [
            (
                GOOD.replace("\"Nonsense\", ", ""),
                "`labels` must list the 8",
            ),
            (
                GOOD.replace(
                    "\"Nonsense\", \"Humanoid Mimicry\"",
                    "\"Humanoid Mimicry\", \"Nonsense\"",
                ),
                "`labels[0]` must be \"Nonsense\"",
            ),
            (
                GOOD.replace(
                    "\"max_response_tokens\": 128",
                    "\"max_response_tokens\": 300",
                ),
                "`max_response_tokens`",
            ),
            (
                GOOD.replace("\"input_ids\", ", ""),
                "must contain \"input_ids\"",
            ),
            (
                GOOD.replace("\"attention_mask\"]", "\"attention_mask\", \"pixels\"]"),
                "\"pixels\"",
            ),
            (
                GOOD.replace("\"output\": \"logits\"", "\"output\": \"\""),
                "`output`",
            ),
            ("{not json".to_string(), "not a valid carewall-model.json"),
        ];
        for (text, want) in cases {
            let err = parse(&text).expect_err(want);
            assert!(err.contains(want), "{err:?} should contain {want:?}");
            assert!(
                err.contains("m/carewall-model.json"),
                "{err:?} should name the file"
            );
        }
    }

    #[test]
    fn dylib_lookup_order_and_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lib = dir.path().join("libonnxruntime.so");
        std::fs::write(&lib, b"x").expect("write");
        let missing = dir.path().join("nope.so");
        // The configured path wins over the environment variable.
        assert_eq!(
            locate_ort_dylib_from(Some(&lib), Some(&missing)).ok(),
            Some(lib.clone())
        );
        assert_eq!(
            locate_ort_dylib_from(None, Some(&lib)).ok(),
            Some(lib.clone())
        );
        let err = locate_ort_dylib_from(Some(&missing), None)
            .expect_err("missing")
            .0;
        assert!(
            err.contains("nope.so") && err.contains("scripts/setup.sh"),
            "{err}"
        );
        let err = locate_ort_dylib_from(None, Some(&missing))
            .expect_err("missing")
            .0;
        assert!(
            err.contains("ORT_DYLIB_PATH") && err.contains("nope.so"),
            "{err}"
        );
    }

    #[test]
    fn missing_model_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = ModelFiles::locate(&dir.path().join("absent"))
            .expect_err("absent")
            .0;
        assert!(err.contains("absent") && err.contains("model_dir"), "{err}");
        std::fs::write(dir.path().join(SPEC_FILE), GOOD).expect("write");
        std::fs::write(dir.path().join(TOKENIZER_FILE), "{}").expect("write");
        let err = ModelFiles::locate(dir.path()).expect_err("no model").0;
        assert!(
            err.contains(MODEL_FILE) && err.contains("is missing"),
            "{err}"
        );
    }
}
