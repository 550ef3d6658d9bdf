//! Command line: `serve`, `check-config`, `classify`, `demo`, `eval`, `audit`,
//! `mock-upstream`.
//! Each subcommand's arguments and body live in a file of their own.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod audit;
pub mod check_config;
pub mod classify;
pub mod demo;
pub mod eval;
pub mod mock_upstream;
pub mod serve;

#[derive(Debug, Parser)]
#[command(
    name = "carewall",
    version,
    about = "Streaming moderation gateway for mental-health support chat"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(serve::ServeArgs),
    /// Validate the configuration and policies without serving.
    CheckConfig(check_config::CheckConfigArgs),
    /// Run the gateway in front of a built-in replay upstream and print
    /// commands to try it.
    Demo(demo::DemoArgs),
    /// Evaluate the classifier on labelled JSONL (the `dev.jsonl` format).
    Eval(eval::EvalArgs),
    /// Read and maintain the audit trail: list, show, export, purge.
    Audit(audit::AuditArgs),
    /// Classify JSONL `{"context", "response"}` lines from stdin; one JSONL
    /// verdict per line on stdout.
    Classify(classify::ClassifyArgs),
    /// Serve the demo's scripted OpenAI-compatible upstream on its own
    /// (replayed supporter replies, some deliberately unsafe).
    MockUpstream(mock_upstream::MockUpstreamArgs),
}

/// Parse the command line and run the chosen subcommand.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::CheckConfig(args) => check_config::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Audit(args) => audit::run(args),
        Command::Classify(args) => classify::run(args),
        Command::MockUpstream(args) => mock_upstream::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory as _;
        super::Cli::command().debug_assert();
    }
}
