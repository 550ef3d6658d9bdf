//! `carewall classify`: JSONL `{"id", "context", "response"}` on stdin, one
//! JSONL verdict per valid line on stdout, in input order, with the line's
//! `id` (and its line number) echoed. A line that cannot be read or
//! classified is reported on stderr with its line number and skipped; the
//! run goes on, and ends with a failure status when any line was skipped.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
    /// Any JSON value the caller uses to join the output to its input.
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    context: String,
    response: String,
}

/// One output line: the input's `id` (when it had one), its line number,
/// and the verdict.
#[derive(Debug, Serialize)]
struct OutputLine {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<serde_json::Value>,
    line: usize,
    #[serde(flatten)]
    verdict: Verdict,
}

/// The verdict of one pair.
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

/// One stdin line: the pair, or why it cannot be classified.
fn parse_line(line: &str) -> Result<(Option<serde_json::Value>, Pair), String> {
    let input: InputLine = serde_json::from_str(line).map_err(|e| {
        format!(
            "{e}; expected a JSON object with a string `response`, optionally `context` and `id`"
        )
    })?;
    Ok((
        input.id,
        Pair {
            context: input.context,
            response: input.response,
        },
    ))
}

pub fn run(args: ClassifyArgs) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let mut pairs = Vec::new();
    let mut skipped = 0usize;
    for (i, line) in stdin.lock().lines().enumerate() {
        let n = i + 1;
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                // Not UTF-8, for one: the line is lost, the rest is not.
                eprintln!("stdin line {n}: cannot read: {e} (skipped)");
                skipped += 1;
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(&line) {
            Ok((id, pair)) => pairs.push((n, id, pair)),
            Err(e) => {
                eprintln!("stdin line {n}: {e} (skipped)");
                skipped += 1;
            }
        }
    }
    let classifier = args.model.load()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stdout = std::io::stdout();
    let written = runtime.block_on(async {
        let mut out = stdout.lock();
        let mut written = 0usize;
        let mut results = futures::stream::iter(pairs)
            .map(|(line, id, pair)| {
                let c = Arc::clone(&classifier);
                async move { (line, id, c.classify(pair).await) }
            })
            .buffered(args.model.in_flight());
        while let Some((line, id, result)) = results.next().await {
            match result {
                Ok(scores) => {
                    let o = OutputLine {
                        id,
                        line,
                        verdict: Verdict::from(scores),
                    };
                    serde_json::to_writer(&mut out, &o)?;
                    out.write_all(b"\n")?;
                    written += 1;
                }
                Err(e) => {
                    eprintln!("stdin line {line}: classification failed: {e} (skipped)");
                    skipped += 1;
                }
            }
        }
        out.flush()?;
        anyhow::Ok(written)
    })?;
    if skipped > 0 {
        anyhow::bail!(
            "{skipped} line(s) skipped (named above on stderr); {written} classified on stdout"
        );
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_with_an_id_and_bad_ones_say_why() {
        let (id, pair) =
            parse_line(r#"{"id": "a-1", "context": "[seeker]x", "response": "y"}"#).unwrap();
        assert_eq!(id, Some(serde_json::json!("a-1")));
        assert_eq!(
            (pair.context.as_str(), pair.response.as_str()),
            ("[seeker]x", "y")
        );
        let (id, _) = parse_line(r#"{"id": 7, "response": "y"}"#).unwrap();
        assert_eq!(id, Some(serde_json::json!(7)));
        for bad in [
            "not json",
            r#"{"context": "x"}"#,
            r#"{"response": 3}"#,
            "[1]",
        ] {
            let e = parse_line(bad).unwrap_err();
            assert!(e.contains("`response`"), "{bad}: {e}");
        }
    }
}
