//! `carewall classify`: JSONL `{"context", "response"}` on stdin, one JSONL
//! verdict per line on stdout, in input order.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::classifier::{Category, Classifier, ClassifierSettings, OnnxClassifier, Pair, Scores};

/// Where the model and ONNX Runtime come from, and how hard to run them.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Folder holding model.onnx, tokenizer.json and carewall-model.json.
    #[arg(long, default_value = "models/carewall-safety")]
    pub model_dir: PathBuf,
    /// libonnxruntime.so; default: ORT_DYLIB_PATH, then .cache/onnxruntime/ (scripts/setup.sh).
    #[arg(long)]
    pub ort_dylib_path: Option<PathBuf>,
    /// Intra-op threads of the ONNX session.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Largest micro-batch.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Inference worker threads, each with its own session.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
}

impl ModelArgs {
    /// Settings for an offline run: generous timeout (a CLI run waits for
    /// its answers rather than shedding load like the gateway).
    pub fn settings(&self) -> ClassifierSettings {
        ClassifierSettings {
            model_dir: self.model_dir.clone(),
            ort_dylib_path: self.ort_dylib_path.clone(),
            intra_threads: self.threads,
            workers: self.workers,
            max_batch: self.max_batch,
            max_wait: Duration::from_millis(2),
            queue_capacity: self.in_flight().max(1),
            timeout: Duration::from_secs(120),
            ..ClassifierSettings::default()
        }
    }

    /// Requests kept in flight so the batcher can fill whole batches.
    pub fn in_flight(&self) -> usize {
        self.max_batch.max(1) * self.workers.max(1) * 2
    }

    /// Load the model (blocking).
    pub fn load(&self) -> anyhow::Result<Arc<OnnxClassifier>> {
        Ok(Arc::new(OnnxClassifier::new(&self.settings())?))
    }
}

#[derive(Debug, clap::Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Debug, Deserialize)]
struct InputLine {
    #[serde(default)]
    context: String,
    response: String,
}

/// One output line.
#[derive(Debug, Serialize)]
pub struct Verdict {
    /// Most probable category (snake_case key).
    pub category: Category,
    /// True when that category is not `safe_response`.
    #[serde(rename = "unsafe")]
    pub is_unsafe: bool,
    /// Probability per category key, all 8.
    pub scores: std::collections::BTreeMap<&'static str, f32>,
}

impl From<Scores> for Verdict {
    fn from(s: Scores) -> Verdict {
        let top = s.top();
        Verdict {
            category: top,
            is_unsafe: top.is_unsafe(),
            scores: Category::ALL.iter().map(|&c| (c.key(), s.get(c))).collect(),
        }
    }
}

pub fn run(args: ClassifyArgs) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let mut pairs = Vec::new();
    for (i, line) in stdin.lock().lines().enumerate() {
        let line = line.with_context(|| format!("stdin line {}: cannot read", i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let input: InputLine = serde_json::from_str(&line).with_context(|| {
            format!(
                "stdin line {}: expected a JSON object with string fields `response` and \
                 (optionally) `context`",
                i + 1
            )
        })?;
        pairs.push((
            i + 1,
            Pair {
                context: input.context,
                response: input.response,
            },
        ));
    }
    let classifier = args.model.load()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stdout = std::io::stdout();
    runtime.block_on(async {
        let mut out = stdout.lock();
        let mut results = futures::stream::iter(pairs)
            .map(|(line, pair)| {
                let c = Arc::clone(&classifier);
                async move { (line, c.classify(pair).await) }
            })
            .buffered(args.model.in_flight());
        while let Some((line, result)) = results.next().await {
            let scores =
                result.with_context(|| format!("stdin line {line}: classification failed"))?;
            serde_json::to_writer(&mut out, &Verdict::from(scores))?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
        anyhow::Ok(())
    })
}
