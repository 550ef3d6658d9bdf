//! `carewall check-config [--config FILE]`: validate everything a start
//! would, without serving, and report every problem in one run: the
//! configuration, the policies and the classifier together (the classifier
//! is skipped only when its own section has errors, since its defaults
//! would then be checked instead). Then warnings: things that run but
//! probably are not what the operator wants.

use std::path::PathBuf;

use crate::config::{Checked, Config, ConfigError};

#[derive(Debug, clap::Args)]
pub struct CheckConfigArgs {
    /// Configuration file (default: config/carewall.toml if it exists).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

pub fn run(args: CheckConfigArgs) -> anyhow::Result<()> {
    let Checked {
        config,
        policies,
        mut errors,
    } = Config::check(&Config::sources(args.config.as_deref()))?;
    // Loading the classifier checks the model folder and ONNX Runtime too.
    let classifier_section_ok = !errors.iter().any(|e| e.starts_with("classifier"));
    let classifier = if classifier_section_ok {
        match super::serve::build_classifier(&config) {
            Ok(c) => Some(c),
            Err(e) => {
                errors.push(format!("{e:#}"));
                None
            }
        }
    } else {
        None
    };
    let (Some(policies), Some(classifier), true) = (policies, classifier, errors.is_empty()) else {
        return Err(ConfigError(errors).into());
    };
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
    let mut warnings = crate::config::setup_warnings(&config);
    warnings.extend(crate::config::policy_warnings(
        &policies,
        &config.server.client_keys,
    ));
    for w in warnings {
        println!("warning: {w}");
    }
    Ok(())
}
