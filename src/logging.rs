//! Log and telemetry set-up: the one init path for every subcommand that
//! logs (`serve`, `demo`). It maps the gateway's `[logging]` section onto
//! [`crate::telemetry::LoggingOptions`] and installs the subscriber that
//! writes log lines to stderr and, when `telemetry.otlp_endpoint` is set,
//! exports spans. `classify` and `eval` never call it, so their stdout stays
//! machine-readable.

use crate::config::{Config, LogFormat, LoggingConfig};
use crate::telemetry::{self, LoggingOptions, TelemetryGuard};

/// `[logging]` as the telemetry module takes it.
pub fn options(cfg: &LoggingConfig) -> LoggingOptions {
    LoggingOptions {
        format: match cfg.format {
            LogFormat::Json => telemetry::LogFormat::Json,
            LogFormat::Pretty => telemetry::LogFormat::Pretty,
        },
        level: cfg.level.clone(),
        log_conversation_text: cfg.log_conversation_text,
    }
}

/// Install the global subscriber and exporters for `config`. Keep the guard
/// alive while serving and call [`TelemetryGuard::shutdown`] last, after
/// in-flight requests drained, so buffered spans and metrics are sent.
pub fn init(config: &Config) -> anyhow::Result<TelemetryGuard> {
    Ok(telemetry::init(
        &config.telemetry,
        &options(&config.logging),
    )?)
}

/// Flush telemetry at the end of a serving subcommand. Failures (collector
/// gone) are reported on stderr and do not fail the command: the requests
/// were served.
pub fn shutdown(guard: TelemetryGuard) {
    if let Err(e) = guard.shutdown() {
        eprintln!("carewall: {e}");
    }
}
