//! Telemetry: structured logs, OpenTelemetry traces and metrics, and the
//! Prometheus text endpoint's content.
//!
//! Invariant: `telemetry` never sees conversation text. Its functions take
//! enums, ids, model names and numbers only, so no prompt or reply can reach
//! a span, a metric label or a log line through it. It knows nothing about
//! the proxy: the proxy calls it (see `notes/telemetry.md` for the call
//! sites).
//!
//! * [`init`] installs the global `tracing` subscriber (JSON or pretty log
//!   lines on stderr, plus an OpenTelemetry layer exporting spans over
//!   OTLP/HTTP when `telemetry.otlp_endpoint` is set) and returns a
//!   [`TelemetryGuard`] whose [`TelemetryGuard::shutdown`] flushes.
//! * [`spans`] defines the request/upstream/classify/decision spans, their
//!   attribute names and W3C `traceparent` propagation.
//! * [`Metrics`] holds the instruments, exported over OTLP and rendered as
//!   Prometheus text for `/metrics`.
//! * [`log_access`] writes the one access-log line per request.

use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{Layer, Registry};

mod metrics;
mod probe;
mod request;
mod settings;
pub mod spans;

pub use metrics::{Metrics, Queue, PROMETHEUS_CONTENT_TYPE};
pub use probe::RequestProbe;
pub use request::{Classification, RequestTelemetry, UpstreamCall};
pub use settings::{
    LogFormat, LoggingOptions, RawTelemetrySettings, SettingsError, TelemetrySettings,
};

/// Errors from setting telemetry up or flushing it.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A log filter directive did not parse.
    #[error("{key}: `{directive}` is not a log filter directive ({reason}); e.g. `info` or `carewall=debug,info`")]
    LogFilter {
        /// `logging.level` or the `RUST_LOG` variable.
        key: &'static str,
        directive: String,
        reason: String,
    },
    /// The OTLP exporter could not be built.
    #[error("OTLP exporter for `telemetry.otlp_endpoint`: {0}")]
    Exporter(String),
    /// The Prometheus reader could not be built.
    #[error("Prometheus exporter: {0}")]
    Prometheus(String),
    /// A global subscriber was installed before; `init` runs once per process.
    #[error("telemetry is already initialised in this process")]
    AlreadyInitialised,
    /// Flushing or shutting an exporter down failed (collector unreachable,
    /// timeout); what was not sent is lost.
    #[error("telemetry flush failed: {0}")]
    Flush(String),
}

/// Keeps the exporters alive; [`TelemetryGuard::shutdown`] flushes them.
/// Dropping it without calling `shutdown` flushes too, ignoring errors.
#[derive(Debug)]
pub struct TelemetryGuard {
    tracer_provider: Option<SdkTracerProvider>,
    metrics: Metrics,
    log_conversation_text: bool,
    shut_down: bool,
}

impl TelemetryGuard {
    /// The metrics handle; clone it into the proxy, classifier and audit.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether spans are exported (an OTLP endpoint is set).
    pub fn tracing_exported(&self) -> bool {
        self.tracer_provider.is_some()
    }

    /// The debug switch from [`LoggingOptions::log_conversation_text`]: only
    /// when this is true may a call site put conversation text in a log line.
    pub fn log_conversation_text(&self) -> bool {
        self.log_conversation_text
    }

    /// Export what is buffered (spans, then metrics) and stop the
    /// exporters. Call once, last in the graceful-shutdown sequence, after
    /// in-flight requests have drained. It blocks (up to the export timeout
    /// per signal): from async code, call it inside
    /// `tokio::task::spawn_blocking`.
    pub fn shutdown(mut self) -> Result<(), TelemetryError> {
        self.shutdown_inner()
    }

    fn shutdown_inner(&mut self) -> Result<(), TelemetryError> {
        if self.shut_down {
            return Ok(());
        }
        self.shut_down = true;
        let spans = match &self.tracer_provider {
            Some(p) => p
                .shutdown()
                .map_err(|e| TelemetryError::Flush(format!("spans: {e}"))),
            None => Ok(()),
        };
        let metrics = self.metrics.shutdown();
        spans.and(metrics)
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown_inner() {
            eprintln!("carewall: {e}");
        }
    }
}

static GLOBAL_METRICS: std::sync::OnceLock<Metrics> = std::sync::OnceLock::new();

/// The metrics handle installed by [`init`], or a disabled one (nothing
/// recorded, no `/metrics`) when `init` has not run in this process.
pub fn metrics() -> Metrics {
    GLOBAL_METRICS
        .get()
        .cloned()
        .unwrap_or_else(Metrics::disabled)
}

/// Install the global subscriber (logs to stderr), the W3C TraceContext
/// propagator, and the exporters `settings` ask for. Call once, first
/// thing in `serve`, before the runtime spawns work.
pub fn init(
    settings: &TelemetrySettings,
    logging: &LoggingOptions,
) -> Result<TelemetryGuard, TelemetryError> {
    let (dispatch, guard) = build(settings, logging, std::io::stderr)?;
    tracing::dispatcher::set_global_default(dispatch)
        .map_err(|_| TelemetryError::AlreadyInitialised)?;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // The subscriber is global, so the metrics handle that goes with it is
    // too: the proxy state picks it up without threading it through every
    // constructor.
    let _ = GLOBAL_METRICS.set(guard.metrics.clone());
    if let Some(provider) = &guard.tracer_provider {
        opentelemetry::global::set_tracer_provider(provider.clone());
    }
    Ok(guard)
}

/// Like [`init`] but installs nothing globally: returns the subscriber as
/// a [`tracing::Dispatch`] writing logs to `writer`. For tests (use it with
/// `tracing::dispatcher::set_default`) and embedding.
pub fn build<W>(
    settings: &TelemetrySettings,
    logging: &LoggingOptions,
    writer: W,
) -> Result<(tracing::Dispatch, TelemetryGuard), TelemetryError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = log_filter(logging)?;
    let fmt_layer: Box<dyn Layer<Registry> + Send + Sync> = match logging.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
    };

    let tracer_provider = match settings.traces_url() {
        Some(url) => Some(tracer_provider(settings, url)?),
        None => None,
    };
    // Spans go to OpenTelemetry at `info` whatever the log level, so quiet
    // logs do not silently empty the traces.
    let otel_layer = tracer_provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("carewall"))
            // Only the attributes `spans` declares: no source paths, thread
            // names or timing counters on every span.
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_level(false)
            .with_tracked_inactivity(false)
            .with_filter(LevelFilter::INFO)
            .boxed()
    });

    let metrics = Metrics::new(settings)?;
    let subscriber = Registry::default().with(fmt_layer).with(otel_layer);
    let guard = TelemetryGuard {
        tracer_provider,
        metrics,
        log_conversation_text: logging.log_conversation_text,
        shut_down: false,
    };
    Ok((tracing::Dispatch::new(subscriber), guard))
}

fn log_filter(logging: &LoggingOptions) -> Result<EnvFilter, TelemetryError> {
    let (key, directive) = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => ("RUST_LOG", v),
        _ => ("logging.level", logging.level.clone()),
    };
    EnvFilter::builder()
        .parse(&directive)
        .map_err(|e| TelemetryError::LogFilter {
            key,
            reason: e.to_string(),
            directive,
        })
}

fn tracer_provider(
    settings: &TelemetrySettings,
    url: String,
) -> Result<SdkTracerProvider, TelemetryError> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(url)
        .with_timeout(settings.export_timeout)
        .build()
        .map_err(|e| TelemetryError::Exporter(format!("spans: {e}")))?;
    // Parent-based: a caller that sampled its trace gets our spans too.
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(settings.sample_ratio)));
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler)
        .with_resource(metrics::resource(settings))
        .build())
}

/// The facts of one finished request for its access-log line. Only ids,
/// enums, model names and numbers: no field can hold conversation text.
#[derive(Debug, Clone, Default)]
pub struct AccessLog<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    /// Matched route, not the raw path.
    pub route: &'static str,
    pub status: u16,
    /// Request received to last byte sent.
    pub duration: Duration,
    pub stream: bool,
    pub model: Option<&'a str>,
    /// `buffer`, `window`, `observe` or `off`.
    pub streaming: Option<&'static str>,
    pub category: Option<&'static str>,
    pub action: Option<&'static str>,
    /// `enforce` or `shadow`.
    pub mode: Option<&'static str>,
    pub policy: Option<&'a str>,
    pub ttft: Option<Duration>,
    pub added_ttft: Option<Duration>,
    /// From [`spans::trace_id`], to jump from the log line to the trace.
    pub trace_id: Option<&'a str>,
    /// Low-cardinality error kind, as in [`spans::record_error`].
    pub error: Option<&'static str>,
    /// The client key's tenant name (never the key).
    pub tenant: Option<&'a str>,
    /// Ids of the policy guards that matched, comma-separated.
    pub guards: Option<&'a str>,
}

/// Write the request's access-log line (target `carewall::access`, level
/// `info`). Call once per request when its response has ended.
pub fn log_access(entry: &AccessLog<'_>) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    tracing::info!(
        target: "carewall::access",
        request_id = entry.request_id,
        method = entry.method,
        route = entry.route,
        status = entry.status,
        duration_ms = ms(entry.duration),
        stream = entry.stream,
        model = entry.model,
        streaming = entry.streaming,
        category = entry.category,
        action = entry.action,
        mode = entry.mode,
        policy = entry.policy,
        ttft_ms = entry.ttft.map(ms),
        added_ttft_ms = entry.added_ttft.map(ms),
        trace_id = entry.trace_id,
        error = entry.error,
        tenant = entry.tenant,
        guards = entry.guards,
        "access"
    );
}
