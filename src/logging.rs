//! Log set-up: one function, so telemetry (OpenTelemetry layers) can be
//! added in one place later.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LoggingConfig};

/// Install the global subscriber: JSON or pretty lines on stderr, filtered
/// by `logging.level` (`RUST_LOG` overrides it when set). Conversation text
/// never reaches a log line unless `logging.log_conversation_text` is set;
/// the code checks that flag wherever text could be logged.
pub fn init(cfg: &LoggingConfig) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(v)?,
        _ => EnvFilter::try_new(&cfg.level)?,
    };
    let registry = tracing_subscriber::registry().with(filter);
    let result = match cfg.format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Pretty => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
    };
    // A second init (tests, demo inside a process that already logs) is fine.
    let _ = result;
    Ok(())
}
