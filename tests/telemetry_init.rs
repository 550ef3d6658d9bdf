//! `telemetry::init` installs the process-wide subscriber once (its own test
//! binary, since it changes global state).

use carewall::telemetry::{self, LogFormat, LoggingOptions, TelemetryError, TelemetrySettings};

#[test]
fn init_installs_once_and_shutdown_flushes() {
    let logging = LoggingOptions {
        format: LogFormat::Pretty,
        ..LoggingOptions::default()
    };
    let guard =
        telemetry::init(&TelemetrySettings::default(), &logging).unwrap_or_else(|e| panic!("{e}"));
    assert!(!guard.tracing_exported());
    assert!(!guard.log_conversation_text());
    assert!(guard.metrics().prometheus_enabled());
    tracing::info!("telemetry initialised");
    assert!(tracing::dispatcher::has_been_set());

    let again = telemetry::init(&TelemetrySettings::default(), &logging);
    assert!(
        matches!(again, Err(TelemetryError::AlreadyInitialised)),
        "{again:?}"
    );
    guard.shutdown().unwrap_or_else(|e| panic!("{e}"));
}
