//! `carewall check-config [--config FILE]`: validate everything a start
//! would, without serving.

use std::path::PathBuf;

use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct CheckConfigArgs {
    /// Configuration file (default: config/carewall.toml if it exists).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

pub fn run(args: CheckConfigArgs) -> anyhow::Result<()> {
    let (config, policies) = Config::load_all(&Config::sources(args.config.as_deref()))?;
    // Loading the classifier checks the model folder and ONNX Runtime too.
    let classifier = super::serve::build_classifier(&config)?;
    println!("configuration OK");
    println!("  listen:      {}", config.server.listen);
    println!(
        "  upstream:    {}",
        config
            .upstream
            .base_url
            .as_deref()
            .unwrap_or("(not set: only /v1/moderations will work)")
    );
    println!(
        "  api key:     {}",
        if config.upstream.api_key.is_some() {
            "set"
        } else {
            "not set"
        }
    );
    println!(
        "  moderation:  {}",
        if config.moderation.enabled {
            "on"
        } else {
            "off (pass-through)"
        }
    );
    println!(
        "  policy:      {} (available: {})",
        config.moderation.policy,
        policies.names().join(", ")
    );
    println!("  classifier:  {}", classifier.name());
    println!(
        "  client keys: {}",
        match config.server.client_keys.count() {
            0 => "none (every client is let through)".to_string(),
            n => n.to_string(),
        }
    );
    for w in crate::config::policy_warnings(&policies, &config.server.client_keys) {
        println!("warning: {w}");
    }
    Ok(())
}
