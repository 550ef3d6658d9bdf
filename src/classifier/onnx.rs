//! The shipped model served through ONNX Runtime (`ort`, loaded at run time)
//! behind the micro-batcher.
//!
//! Invariant: a constructed [`OnnxClassifier`] has checked the model folder
//! against its contract (files, labels, graph inputs/outputs) and loaded one
//! session per worker; inference happens only on the batcher's threads.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::{TensorElementType, TensorRef, ValueType};

use super::batch::{BatchConfig, BatchEngine, BatchStats, Batcher};
use super::coverage;
use super::model::{init_ort, load_tokenizer, locate_ort_dylib, ModelFiles, ModelSpec};
use super::tokenize::{pad, softmax, EncodedPair, Layout, PaddedBatch, PairEncoder, View};
use super::{BuildError, Category, Classifier, ClassifierSettings, ClassifyFuture, Pair, Scores};

/// One ONNX session plus the shared tokeniser: scores batches synchronously.
/// Used by the batcher's workers, and directly by benchmarks and the parity
/// test.
pub struct OnnxModel {
    session: Session,
    encoder: Arc<PairEncoder>,
    spec: Arc<ModelSpec>,
    files: Arc<ModelFiles>,
    env: ort::environment::Environment,
    intra_threads: usize,
}

impl OnnxModel {
    /// Load the model in `model_dir` with ONNX Runtime from `ort_dylib_path`
    /// (or `ORT_DYLIB_PATH`, or the set-up script's location).
    pub fn load(
        model_dir: &Path,
        ort_dylib_path: Option<&Path>,
        intra_threads: usize,
    ) -> Result<OnnxModel, BuildError> {
        let files = ModelFiles::locate(model_dir)?;
        let spec = ModelSpec::load(&files.spec)?;
        let tokenizer = load_tokenizer(&files.tokenizer, &spec)?;
        let dylib = locate_ort_dylib(ort_dylib_path)?;
        let env = init_ort(&dylib)?;
        let encoder = Arc::new(PairEncoder::new(tokenizer, Layout::from(&spec)));
        let session = open_session(&env, &files, &spec, intra_threads)?;
        Ok(OnnxModel {
            session,
            encoder,
            spec: Arc::new(spec),
            files: Arc::new(files),
            env,
            intra_threads,
        })
    }

    /// Another session on the same model and tokeniser (one per worker).
    pub fn another_session(&self) -> Result<OnnxModel, BuildError> {
        Ok(OnnxModel {
            session: open_session(&self.env, &self.files, &self.spec, self.intra_threads)?,
            encoder: Arc::clone(&self.encoder),
            spec: Arc::clone(&self.spec),
            files: Arc::clone(&self.files),
            env: self.env.clone(),
            intra_threads: self.intra_threads,
        })
    }

    /// The model's contract as read from `carewall-model.json`.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Tokenise one pair per the input contract.
    pub fn encode(&self, pair: &Pair) -> Result<EncodedPair, String> {
        self.encoder.encode(pair)
    }

    /// The tokeniser and layout.
    pub fn encoder(&self) -> &PairEncoder {
        &self.encoder
    }

    /// Raw logits, one row of 8 per padded pair.
    pub fn logits(&mut self, batch: &PaddedBatch) -> Result<Vec<[f32; 8]>, String> {
        if batch.batch == 0 {
            return Ok(Vec::new());
        }
        let shape = [batch.batch as i64, batch.seq as i64];
        let tensor = |data| input_view(shape, data);
        let mut inputs: Vec<(Cow<'static, str>, SessionInputValue<'_>)> = vec![
            ("input_ids".into(), tensor(&batch.input_ids)?),
            ("attention_mask".into(), tensor(&batch.attention_mask)?),
        ];
        if self.spec.uses_token_type_ids() {
            inputs.push(("token_type_ids".into(), tensor(&batch.token_type_ids)?));
        }
        let outputs = self
            .session
            .run(inputs)
            .map_err(|e| format!("inference failed: {e}"))?;
        let value = outputs
            .get(&self.spec.output)
            .ok_or_else(|| format!("model produced no output named {:?}", self.spec.output))?;
        let (out_shape, data) = value
            .try_extract_tensor::<f32>()
            .map_err(|e| format!("output {:?} is not a float tensor: {e}", self.spec.output))?;
        if **out_shape != [batch.batch as i64, 8] {
            return Err(format!(
                "output {:?} has shape {:?}, expected [{}, 8]",
                self.spec.output, &**out_shape, batch.batch
            ));
        }
        Ok(data
            .chunks_exact(8)
            .map(|row| {
                let mut r = [0.0f32; 8];
                r.copy_from_slice(row);
                r
            })
            .collect())
    }

    /// Tokenise, run and softmax: one judgement per pair, in input order.
    /// Every window of every pair ([`coverage`]) is scored; windows of
    /// similar length share a session call (see [`length_groups`]), across
    /// pairs, and each pair's views are then aggregated.
    pub fn scores(&mut self, pairs: &[&Pair]) -> Result<Vec<Scores>, String> {
        let mut views: Vec<(usize, View)> = Vec::new();
        let mut encoded: Vec<EncodedPair> = Vec::new();
        for (i, p) in pairs.iter().enumerate() {
            for (v, e) in self.encoder.encode_windows(p)? {
                views.push((i, v));
                encoded.push(e);
            }
        }
        let lengths: Vec<usize> = encoded.iter().map(EncodedPair::len).collect();
        let mut probs = vec![Scores([0.0; 8]); encoded.len()];
        for group in length_groups(&lengths, PADDING_SLACK, MAX_TOKENS_PER_CALL) {
            let members: Vec<EncodedPair> = group.iter().map(|&i| encoded[i].clone()).collect();
            let logits = self.logits(&pad(&members, self.spec.pad_id))?;
            for (&i, l) in group.iter().zip(&logits) {
                probs[i] = probabilities(l);
            }
        }
        let mut per_pair: Vec<Vec<(View, Scores)>> = vec![Vec::new(); pairs.len()];
        for ((i, v), p) in views.into_iter().zip(probs) {
            per_pair[i].push((v, p));
        }
        Ok(per_pair.iter().map(|v| coverage::aggregate(v)).collect())
    }
}

/// Padding allowed in one session call, as a share of the real tokens.
pub const PADDING_SLACK: f64 = 0.25;

/// Most padded tokens (`count * longest`) in one session call. Measured on
/// the early model (2-core x86): per pair, batch 8 is ~4% cheaper than batch
/// 1 at 64 tokens but 30-60% dearer at 256 tokens, where the activations
/// outgrow the caches; so short pairs share calls and long ones run alone.
pub const MAX_TOKENS_PER_CALL: usize = 512;

/// Split a batch into groups (indices into `lengths`) that each make one
/// session call: sorted by length, a group grows while its padded size
/// `count * longest` stays within `1 + slack` of its real tokens and within
/// `max_tokens`. On CPU one sequence already fills the matrix units, so a
/// bigger call saves only per-call overhead while padding costs real
/// compute.
pub fn length_groups(lengths: &[usize], slack: f64, max_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut real = 0usize;
    for i in order {
        let len = lengths[i];
        let fits = groups.last().is_some_and(|g| {
            // Sorted ascending, so `len` is the new longest.
            let padded = (g.len() + 1) * len;
            padded <= max_tokens && padded as f64 <= (1.0 + slack) * (real + len) as f64
        });
        match groups.last_mut() {
            Some(g) if fits => {
                g.push(i);
                real += len;
            }
            _ => {
                groups.push(vec![i]);
                real = len;
            }
        }
    }
    groups
}

/// A borrowed input tensor: views, not copies, since the padded batch
/// outlives the run.
fn input_view(shape: [i64; 2], data: &[i64]) -> Result<SessionInputValue<'_>, String> {
    TensorRef::from_array_view((shape, data))
        .map(SessionInputValue::from)
        .map_err(|e| format!("cannot build input tensor: {e}"))
}

/// Softmax of one logits row as [`Scores`].
pub fn probabilities(logits: &[f32; 8]) -> Scores {
    let p = softmax(logits);
    let mut s = [0.0f32; 8];
    s.copy_from_slice(&p);
    Scores(s)
}

impl BatchEngine for OnnxModel {
    fn run(&mut self, pairs: &[&Pair]) -> Result<Vec<Scores>, String> {
        self.scores(pairs)
    }
}

fn open_session(
    env: &ort::environment::Environment,
    files: &ModelFiles,
    spec: &ModelSpec,
    intra_threads: usize,
) -> Result<Session, BuildError> {
    let path = &files.model;
    let corrupt = |e: String| {
        BuildError(format!(
            "cannot load {}: {e}; the file is not a usable ONNX model (restore it from git or \
             re-export it with training/)",
            path.display()
        ))
    };
    let session = Session::builder(env)
        .map_err(|e| corrupt(e.to_string()))?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|e| corrupt(e.to_string()))?
        .with_intra_threads(intra_threads.max(1))
        .map_err(|e| corrupt(e.to_string()))?
        // Inference threads are ours; ORT's inter-op pool would only compete.
        .with_inter_threads(1)
        .map_err(|e| corrupt(e.to_string()))?
        // Spinning intra-op threads burn the cores the proxy and the other
        // workers need (measured: 2x the CPU per pair on a busy 2-core box).
        .with_intra_op_spinning(false)
        .map_err(|e| corrupt(e.to_string()))?
        .commit_from_file(path)
        .map_err(|e| corrupt(e.to_string()))?;
    check_signature(&session, spec, path)?;
    Ok(session)
}

/// The graph must take exactly the inputs the spec lists (int64) and produce
/// the named output as float `[batch, 8]`.
fn check_signature(session: &Session, spec: &ModelSpec, path: &Path) -> Result<(), BuildError> {
    let mismatch = |what: String| {
        BuildError(format!(
            "{} does not match {}: {what}; the model and carewall-model.json come from \
             different exports (re-export both with training/)",
            path.display(),
            super::model::SPEC_FILE
        ))
    };
    let graph: BTreeSet<&str> = session.inputs().iter().map(|i| i.name()).collect();
    let listed: BTreeSet<&str> = spec.inputs.iter().map(String::as_str).collect();
    if graph != listed {
        return Err(mismatch(format!(
            "graph inputs {graph:?}, listed inputs {listed:?}"
        )));
    }
    for input in session.inputs() {
        if let ValueType::Tensor { ty, .. } = input.dtype() {
            if *ty != TensorElementType::Int64 {
                return Err(mismatch(format!(
                    "input {:?} is {ty:?}, expected int64",
                    input.name()
                )));
            }
        }
    }
    let output = session
        .outputs()
        .iter()
        .find(|o| o.name() == spec.output)
        .ok_or_else(|| {
            let names: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
            mismatch(format!(
                "no output {:?} (graph outputs: {names:?})",
                spec.output
            ))
        })?;
    match output.dtype() {
        ValueType::Tensor {
            ty: TensorElementType::Float32,
            shape,
            ..
        } if shape.len() == 2 && (shape[1] == Category::ALL.len() as i64 || shape[1] < 0) => Ok(()),
        other => Err(mismatch(format!(
            "output {:?} is {other:?}, expected float32 [batch, 8]",
            spec.output
        ))),
    }
}

/// The ONNX classifier: one session per worker behind a bounded micro-batching
/// queue.
pub struct OnnxClassifier {
    batcher: Batcher,
    name: String,
    spec: ModelSpec,
}

impl OnnxClassifier {
    /// Load the model and start the workers. Reads `model_dir`,
    /// `ort_dylib_path`, `intra_threads`, `workers`, `max_batch`, `max_wait`,
    /// `queue_capacity` and `timeout` from `settings` (not `kind`).
    pub fn new(settings: &ClassifierSettings) -> Result<OnnxClassifier, BuildError> {
        if settings.workers == 0 {
            return Err(BuildError("`classifier.workers` must be at least 1".into()));
        }
        let first = OnnxModel::load(
            &settings.model_dir,
            settings.ort_dylib_path.as_deref(),
            settings.intra_threads,
        )?;
        let spec = first.spec().clone();
        let mut engines = Vec::with_capacity(settings.workers);
        for _ in 1..settings.workers {
            engines.push(first.another_session()?);
        }
        engines.push(first);
        let batcher = Batcher::start(
            engines,
            BatchConfig {
                max_batch: settings.max_batch,
                max_wait: settings.max_wait,
                queue_capacity: settings.queue_capacity,
                timeout: settings.timeout,
            },
        )
        .map_err(|e| BuildError(format!("classifier settings: {e}")))?;
        let name = if spec.version.is_empty() {
            spec.name.clone()
        } else {
            format!("{}@{}", spec.name, spec.version)
        };
        Ok(OnnxClassifier {
            batcher,
            name,
            spec,
        })
    }

    /// Live batching counters (batch sizes, queue depth, overloads, ...).
    pub fn stats(&self) -> Arc<BatchStats> {
        self.batcher.stats()
    }

    /// The model's contract as read from `carewall-model.json`.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }
}

impl Classifier for OnnxClassifier {
    fn classify(&self, pair: Pair) -> ClassifyFuture<'_> {
        Box::pin(self.batcher.submit(pair))
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn is_ready(&self) -> bool {
        self.batcher.is_running()
    }

    fn batch_stats(&self) -> Option<Arc<BatchStats>> {
        Some(self.stats())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similar_lengths_share_a_call_and_outliers_get_their_own() {
        // Equal lengths: one group, in any order.
        assert_eq!(length_groups(&[40, 40, 40], 0.25, 512), vec![vec![0, 1, 2]]);
        // 40,41,42 pad to 42*3 = 126 <= 1.25 * 123; 256 would pad the rest to 1024.
        assert_eq!(
            length_groups(&[256, 41, 40, 42], 0.25, 512),
            vec![vec![2, 1, 3], vec![0]]
        );
        // No slack: only exact ties group.
        assert_eq!(
            length_groups(&[10, 11, 10], 0.0, 512),
            vec![vec![0, 2], vec![1]]
        );
        assert!(length_groups(&[], 0.25, 512).is_empty());
        // The token budget splits equal lengths: 3 x 200 = 600 > 512.
        assert_eq!(
            length_groups(&[200, 200, 200], 0.25, 512),
            vec![vec![0, 1], vec![2]]
        );
        // A pair longer than the budget still runs, alone.
        assert_eq!(
            length_groups(&[600, 600], 0.25, 512),
            vec![vec![0], vec![1]]
        );
        // Every index appears exactly once.
        let lens = [5, 300, 17, 18, 90, 91, 256, 6, 7];
        let mut all: Vec<usize> = length_groups(&lens, 0.25, 512).concat();
        all.sort_unstable();
        assert_eq!(all, (0..lens.len()).collect::<Vec<_>>());
    }
}
