//! `carewall eval --data FILE.jsonl [--json]`.

use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Labelled JSONL in the `dev.jsonl` format (`context`, `response`, `label`).
    #[arg(long)]
    pub data: PathBuf,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    anyhow::bail!("eval is not built yet (data: {})", args.data.display())
}
