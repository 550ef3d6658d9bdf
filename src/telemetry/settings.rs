//! The `[telemetry]` config section (raw serde form and its validated,
//! typed form) and the logging options `telemetry::init` takes from the
//! gateway's `[logging]` section.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

/// `[telemetry]` exactly as written in `carewall.toml` or set through
/// `CAREWALL__TELEMETRY__*` environment variables. Validate it with
/// [`RawTelemetrySettings::validate`] before use.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetrySettings {
    /// OTLP/HTTP base URL of a collector, e.g. `http://otel-collector:4318`.
    /// Unset or empty: no exporter at all (the default).
    pub otlp_endpoint: Option<String>,
    /// `service.name` resource attribute.
    pub service_name: Option<String>,
    /// Fraction of new traces kept (0..=1); a sampled incoming `traceparent`
    /// is always followed (parent-based sampling).
    pub sample_ratio: Option<f64>,
    /// How often metrics are pushed over OTLP, in seconds.
    pub export_interval_secs: Option<u64>,
    /// Time allowed for one OTLP export request, in seconds.
    pub export_timeout_secs: Option<u64>,
    /// Serve the Prometheus text exposition on `/metrics` (default `true`).
    pub prometheus: Option<bool>,
}

/// Validated `[telemetry]` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySettings {
    /// OTLP/HTTP base URL without a trailing slash; `None` means no exporter.
    /// Spans go to `<endpoint>/v1/traces`, metrics to `<endpoint>/v1/metrics`.
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
    pub sample_ratio: f64,
    pub export_interval: Duration,
    pub export_timeout: Duration,
    pub prometheus: bool,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            otlp_endpoint: None,
            service_name: "carewall".to_owned(),
            sample_ratio: 1.0,
            export_interval: Duration::from_secs(10),
            export_timeout: Duration::from_secs(10),
            prometheus: true,
        }
    }
}

impl TelemetrySettings {
    /// URL spans are posted to, if exporting.
    pub fn traces_url(&self) -> Option<String> {
        self.otlp_endpoint
            .as_ref()
            .map(|e| format!("{e}/v1/traces"))
    }

    /// URL metrics are posted to, if exporting.
    pub fn metrics_url(&self) -> Option<String> {
        self.otlp_endpoint
            .as_ref()
            .map(|e| format!("{e}/v1/metrics"))
    }
}

/// One invalid `[telemetry]` or `[logging]` value; `key` is the full
/// config key so the message tells the operator what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsError {
    pub key: &'static str,
    pub message: String,
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl std::error::Error for SettingsError {}

impl RawTelemetrySettings {
    /// Check every field and collect all problems before failing.
    pub fn validate(self) -> Result<TelemetrySettings, Vec<SettingsError>> {
        let defaults = TelemetrySettings::default();
        let mut errors = Vec::new();

        let otlp_endpoint = match self.otlp_endpoint.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(url) => match check_endpoint(url) {
                Ok(url) => Some(url),
                Err(message) => {
                    errors.push(SettingsError {
                        key: "telemetry.otlp_endpoint",
                        message,
                    });
                    None
                }
            },
        };

        let service_name = match self.service_name {
            None => defaults.service_name,
            Some(name) if name.trim().is_empty() => {
                errors.push(SettingsError {
                    key: "telemetry.service_name",
                    message: "must not be empty (it names this gateway in Jaeger and Prometheus)"
                        .into(),
                });
                defaults.service_name
            }
            Some(name) => name.trim().to_owned(),
        };

        let sample_ratio = self.sample_ratio.unwrap_or(defaults.sample_ratio);
        if !(0.0..=1.0).contains(&sample_ratio) {
            errors.push(SettingsError {
                key: "telemetry.sample_ratio",
                message: format!("must be in 0..=1, got {sample_ratio}"),
            });
        }

        let mut seconds = |key: &'static str, value: Option<u64>, default: Duration| match value {
            None => default,
            Some(s) if (1..=3600).contains(&s) => Duration::from_secs(s),
            Some(s) => {
                errors.push(SettingsError {
                    key,
                    message: format!("must be between 1 and 3600 seconds, got {s}"),
                });
                default
            }
        };
        let export_interval = seconds(
            "telemetry.export_interval_secs",
            self.export_interval_secs,
            defaults.export_interval,
        );
        let export_timeout = seconds(
            "telemetry.export_timeout_secs",
            self.export_timeout_secs,
            defaults.export_timeout,
        );

        if errors.is_empty() {
            Ok(TelemetrySettings {
                otlp_endpoint,
                service_name,
                sample_ratio,
                export_interval,
                export_timeout,
                prometheus: self.prometheus.unwrap_or(defaults.prometheus),
            })
        } else {
            Err(errors)
        }
    }
}

/// Accepts `http://host[:port][/prefix]` and returns it without a trailing
/// slash. TLS to the collector is not built in (the exporter's HTTP client
/// carries no TLS stack): run the collector next to the gateway instead.
fn check_endpoint(url: &str) -> Result<String, String> {
    let uri: http::Uri = url.parse().map_err(|e| {
        format!("`{url}` is not a URL ({e}); expected an OTLP/HTTP base URL like http://otel-collector:4318")
    })?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "`{url}`: https is not supported by the built-in exporter; point it at a local \
                 OpenTelemetry Collector over http (e.g. http://localhost:4318) and let the \
                 collector use TLS onwards"
            ))
        }
        _ => {
            return Err(format!(
                "`{url}` needs an http:// scheme, e.g. http://otel-collector:4318"
            ))
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!(
            "`{url}` has no host; expected e.g. http://otel-collector:4318"
        ));
    }
    if uri.query().is_some() {
        return Err(format!("`{url}` must not carry a query string"));
    }
    if uri.path().ends_with("/v1/traces") || uri.path().ends_with("/v1/metrics") {
        return Err(format!(
            "`{url}` is a signal URL; give the base URL (without /v1/traces or /v1/metrics)"
        ));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One JSON object per line (production, log shippers).
    #[default]
    Json,
    /// Human-readable, coloured when the output is a terminal.
    Pretty,
}

/// What `telemetry::init` needs from the gateway's `[logging]` section.
/// The gateway owns that section; it converts its validated form into this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggingOptions {
    pub format: LogFormat,
    /// `tracing` filter directive, e.g. `info` or `carewall=debug,info`.
    /// `RUST_LOG`, when set, takes precedence.
    pub level: String,
    /// Debug only: allow conversation text in logs and spans. Telemetry never
    /// records text itself; this flag is passed on so call sites can check it.
    pub log_conversation_text: bool,
}

impl Default for LoggingOptions {
    fn default() -> Self {
        LoggingOptions {
            format: LogFormat::Json,
            level: "info".to_owned(),
            log_conversation_text: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &str) -> Result<TelemetrySettings, Vec<SettingsError>> {
        let raw: RawTelemetrySettings = match toml::from_str(raw) {
            Ok(r) => r,
            Err(e) => panic!("toml did not parse: {e}"),
        };
        raw.validate()
    }

    #[test]
    fn empty_section_means_off_with_prometheus_on() {
        let s = check("").unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(s, TelemetrySettings::default());
        assert_eq!(s.otlp_endpoint, None);
        assert!(s.prometheus);
        assert_eq!(s.traces_url(), None);
    }

    #[test]
    fn endpoint_is_a_base_url() {
        let s = check(r#"otlp_endpoint = "http://otel-collector:4318/""#)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            s.traces_url().as_deref(),
            Some("http://otel-collector:4318/v1/traces")
        );
        assert_eq!(
            s.metrics_url().as_deref(),
            Some("http://otel-collector:4318/v1/metrics")
        );
        let s = check(r#"otlp_endpoint = "  ""#).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(s.otlp_endpoint, None);
    }

    #[test]
    fn bad_values_are_all_reported_with_their_key() {
        let errors = check(
            r#"
            otlp_endpoint = "https://collector.example:4318"
            service_name = ""
            sample_ratio = 1.7
            export_interval_secs = 0
            "#,
        )
        .err()
        .unwrap_or_default();
        let keys: Vec<_> = errors.iter().map(|e| e.key).collect();
        assert_eq!(
            keys,
            [
                "telemetry.otlp_endpoint",
                "telemetry.service_name",
                "telemetry.sample_ratio",
                "telemetry.export_interval_secs"
            ]
        );
        assert_eq!(
            errors[2].to_string(),
            "telemetry.sample_ratio: must be in 0..=1, got 1.7"
        );
    }

    #[test]
    fn endpoint_mistakes_are_explained() {
        for (url, needle) in [
            ("otel:4318", "http:// scheme"),
            ("http://c:4318/v1/traces", "base URL"),
            ("http://c:4318?x=1", "query"),
            ("not a url", "not a URL"),
        ] {
            let errors = check(&format!("otlp_endpoint = {url:?}"))
                .err()
                .unwrap_or_default();
            assert_eq!(errors.len(), 1, "{url}");
            assert!(errors[0].message.contains(needle), "{url}: {}", errors[0]);
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<RawTelemetrySettings>("otlp_endpiont = \"http://x:4318\"");
        let message = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("otlp_endpiont"), "{message}");
    }

    #[test]
    fn environment_variable_reaches_the_field() {
        // The gateway layers `CAREWALL__SECTION__KEY` with the `config` crate;
        // this pins the variable name operators and outside checks use.
        let env: std::collections::HashMap<String, String> = [
            (
                "CAREWALL__TELEMETRY__OTLP_ENDPOINT",
                "http://collector:4318",
            ),
            ("CAREWALL__TELEMETRY__SAMPLE_RATIO", "0.25"),
            ("CAREWALL__TELEMETRY__EXPORT_INTERVAL_SECS", "5"),
            ("CAREWALL__TELEMETRY__PROMETHEUS", "false"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let cfg = config::Config::builder()
            .add_source(
                config::Environment::with_prefix("CAREWALL")
                    .prefix_separator("__")
                    .separator("__")
                    .source(Some(env)),
            )
            .build()
            .and_then(|c| c.get::<RawTelemetrySettings>("telemetry"));
        let raw = cfg.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(raw.otlp_endpoint.as_deref(), Some("http://collector:4318"));
        // Environment values are strings; numbers and booleans still parse.
        let s = raw.validate().unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(s.sample_ratio, 0.25);
        assert_eq!(s.export_interval, Duration::from_secs(5));
        assert!(!s.prometheus);
    }
}
