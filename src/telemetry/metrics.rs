//! Metrics: OpenTelemetry instruments read by two readers, a Prometheus
//! registry (rendered on `/metrics`) and, when an endpoint is set, a
//! periodic OTLP/HTTP exporter. One set of instruments feeds both, so the
//! two views cannot disagree.
//!
//! Recording is a lock-free lookup for an existing label set plus atomic
//! adds inside the SDK; every label value is a `&'static str`, a
//! [`Category`] or an integer, so recording never allocates a label and no
//! free text can become a label.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::Resource;

use super::{TelemetryError, TelemetrySettings};

/// `Content-Type` of [`Metrics::render_prometheus`]'s output.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Latency buckets in seconds: fine below 10 ms, where the gateway's own
/// overhead lives, coarse up to the minute a long generation can take.
const SECONDS_BUCKETS: [f64; 18] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0,
    60.0, 120.0,
];

const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// A bounded queue whose depth is exported as `carewall_queue_depth{queue}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    /// Pairs waiting for the classifier's workers.
    Classifier,
    /// Audit records waiting for the writer task.
    Audit,
}

impl Queue {
    const ALL: [Queue; 2] = [Queue::Classifier, Queue::Audit];

    /// Label value.
    pub fn key(self) -> &'static str {
        match self {
            Queue::Classifier => "classifier",
            Queue::Audit => "audit",
        }
    }
}

type DepthSource = Box<dyn Fn() -> usize + Send + Sync>;

/// Handle for recording carewall's metrics. Cheap to clone (one `Arc`);
/// make one at start-up and hand clones to the proxy, classifier and audit.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    provider: SdkMeterProvider,
    registry: Option<prometheus::Registry>,
    requests: Counter<u64>,
    responses: Counter<u64>,
    classifier_latency: Histogram<f64>,
    classifier_errors: Counter<u64>,
    classifier_batch_size: Histogram<u64>,
    upstream_latency: Histogram<f64>,
    upstream_ttft: Histogram<f64>,
    ttft: Histogram<f64>,
    added_ttft: Histogram<f64>,
    audit_dropped: Counter<u64>,
    unknown_fields: Counter<u64>,
    guard_hits: Counter<u64>,
    queues: Arc<QueueDepths>,
}

/// Depth per queue: a value set by the owner, or a callback read at
/// collection time (the callback wins when present).
#[derive(Default)]
struct QueueDepths {
    values: [AtomicU64; 2],
    sources: Mutex<[Option<DepthSource>; 2]>,
}

impl QueueDepths {
    fn read(&self, queue: Queue) -> u64 {
        let i = queue as usize;
        // Collection happens on the exporter/scrape path only, never while a
        // request holds this lock.
        if let Ok(sources) = self.sources.lock() {
            if let Some(f) = &sources[i] {
                return f() as u64;
            }
        }
        self.values[i].load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("prometheus", &self.inner.registry.is_some())
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// Build the instruments with a Prometheus reader (if
    /// `settings.prometheus`) and an OTLP/HTTP push reader (if
    /// `settings.otlp_endpoint`).
    pub fn new(settings: &TelemetrySettings) -> Result<Metrics, TelemetryError> {
        let mut builder = SdkMeterProvider::builder().with_resource(resource(settings));
        let registry = if settings.prometheus {
            let registry = prometheus::Registry::new();
            let exporter = opentelemetry_prometheus::exporter()
                .with_registry(registry.clone())
                // `target_info` and scope labels would add series that do not
                // start with `carewall_` and a label on every series.
                .without_target_info()
                .scope_info_enabled(false)
                .build()
                .map_err(|e| TelemetryError::Prometheus(e.to_string()))?;
            builder = builder.with_reader(exporter);
            Some(registry)
        } else {
            None
        };
        if let Some(url) = settings.metrics_url() {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(url)
                .with_timeout(settings.export_timeout)
                .build()
                .map_err(|e| TelemetryError::Exporter(format!("metrics: {e}")))?;
            let reader = PeriodicReader::builder(exporter)
                .with_interval(settings.export_interval)
                .build();
            builder = builder.with_reader(reader);
        }
        let provider = builder.build();
        Ok(Metrics::with_provider(provider, registry))
    }

    /// Instruments that record into nothing: for `check-config`, tools and
    /// unit tests of other modules.
    pub fn disabled() -> Metrics {
        Metrics::with_provider(SdkMeterProvider::builder().build(), None)
    }

    fn with_provider(
        provider: SdkMeterProvider,
        registry: Option<prometheus::Registry>,
    ) -> Metrics {
        let meter = provider.meter("carewall");
        let queues = Arc::new(QueueDepths::default());
        register_queue_gauge(&meter, &queues);
        let seconds = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(SECONDS_BUCKETS.to_vec())
                .build()
        };
        let inner = Inner {
            requests: meter
                .u64_counter("carewall.requests")
                .with_description("Requests answered, by route and HTTP status")
                .build(),
            responses: meter
                .u64_counter("carewall.responses")
                .with_description(
                    "Moderated responses by deciding category, action taken and mode (enforce/shadow, none when nothing was flagged)",
                )
                .build(),
            classifier_latency: seconds(
                "carewall.classifier.latency",
                "Time from submitting a pair to the classifier to its scores, by stage",
            ),
            classifier_errors: meter
                .u64_counter("carewall.classifier.errors")
                .with_description("Classifications that failed, by kind (timeout, overloaded, error)")
                .build(),
            classifier_batch_size: meter
                .u64_histogram("carewall.classifier.batch_size")
                .with_description("Pairs per classifier micro-batch")
                .with_boundaries(BATCH_BUCKETS.to_vec())
                .build(),
            upstream_latency: seconds(
                "carewall.upstream.latency",
                "Provider call duration, request sent to last byte received, by route",
            ),
            upstream_ttft: seconds(
                "carewall.upstream.time_to_first_token",
                "Provider time to first token, request sent to first content byte received",
            ),
            ttft: seconds(
                "carewall.time_to_first_token",
                "Client-side time to first token: request received to first content byte sent, by streaming mode",
            ),
            added_ttft: seconds(
                "carewall.added_time_to_first_token",
                "Time to first token the gateway added over the provider's (hold-back and classification), by streaming mode",
            ),
            audit_dropped: meter
                .u64_counter("carewall.audit.dropped")
                .with_description("Audit records dropped because the audit queue was full")
                .build(),
            unknown_fields: meter
                .u64_counter("carewall.unknown_fields")
                .with_description(
                    "Unknown delta fields and stray choices in upstream streams, by what the policy did with them (drop, pass)",
                )
                .build(),
            guard_hits: meter
                .u64_counter("carewall.guard.hits")
                .with_description(
                    "Responses in which a policy guard matched, by guard id (from the policy files) and category",
                )
                .build(),
            queues,
            provider,
            registry,
        };
        Metrics {
            inner: Arc::new(inner),
        }
    }

    /// One answered request without a tenant (`tenant="none"`); see
    /// [`Metrics::record_tenant_request`].
    pub fn record_request(&self, route: &'static str, status: u16) {
        self.record_tenant_request(route, status, None);
    }

    /// One answered request. `route` is the matched route, never the raw
    /// path (`/v1/chat/completions`, `/v1/models`, `/v1/moderations`,
    /// `/admin`, `other`). `tenant` is the client key's `name` (bounded:
    /// names come from the key configuration), `unnamed` for a key without
    /// one, `none` when no key was checked.
    pub fn record_tenant_request(
        &self,
        route: &'static str,
        status: u16,
        tenant: Option<Arc<str>>,
    ) {
        let tenant = match tenant {
            Some(t) => opentelemetry::Value::from(opentelemetry::StringValue::from(t)),
            None => opentelemetry::Value::from("none"),
        };
        self.inner.requests.add(
            1,
            &[
                KeyValue::new("route", route),
                KeyValue::new("status", i64::from(status)),
                KeyValue::new("tenant", tenant),
            ],
        );
    }

    /// A guard matched a response (once per guard and response). `guard`
    /// is the guard's id from the policy file: cloning the `Arc` allocates
    /// nothing and the ids are bounded by configuration.
    pub fn record_guard_hit(&self, guard: Arc<str>, category: crate::classifier::Category) {
        self.inner.guard_hits.add(
            1,
            &[
                KeyValue::new("guard", opentelemetry::StringValue::from(guard)),
                KeyValue::new("category", category.key()),
            ],
        );
    }

    /// One moderated response and its verdict: the category that decided it
    /// (`safe_response` for clean ones), the action (`allow`, `annotate`,
    /// `append`, `replace`, `retry`, `block`) and `enforce`, `shadow` or `none` (nothing flagged).
    /// `category` is the verdict's label: a category key, `unclassified`
    /// (text released without judgement) or `none` (nothing to judge).
    pub fn record_response(
        &self,
        category: &'static str,
        action: &'static str,
        mode: &'static str,
    ) {
        self.inner.responses.add(
            1,
            &[
                KeyValue::new("category", category),
                KeyValue::new("action", action),
                KeyValue::new("mode", mode),
            ],
        );
    }

    /// Latency of one classification; `stage` as in
    /// [`super::spans::classify_span`].
    pub fn record_classification(&self, stage: &'static str, latency: Duration) {
        self.inner
            .classifier_latency
            .record(latency.as_secs_f64(), &[KeyValue::new("stage", stage)]);
    }

    /// One failed classification (`timeout`, `overloaded`, `error`).
    pub fn record_classifier_error(&self, kind: &'static str) {
        self.inner
            .classifier_errors
            .add(1, &[KeyValue::new("kind", kind)]);
    }

    /// Size of one micro-batch run by the classifier.
    pub fn record_batch_size(&self, pairs: usize) {
        self.inner.classifier_batch_size.record(pairs as u64, &[]);
    }

    /// Current depth of a queue; call after enqueue/dequeue or from the
    /// consumer loop. Ignored once [`Metrics::watch_queue_depth`] set a
    /// callback for the same queue.
    pub fn set_queue_depth(&self, queue: Queue, depth: usize) {
        self.inner.queues.values[queue as usize].store(depth as u64, Ordering::Relaxed);
    }

    /// Read a queue's depth from `depth` whenever metrics are collected,
    /// e.g. `move || tx.max_capacity() - tx.capacity()` for a tokio channel.
    pub fn watch_queue_depth(
        &self,
        queue: Queue,
        depth: impl Fn() -> usize + Send + Sync + 'static,
    ) {
        if let Ok(mut sources) = self.inner.queues.sources.lock() {
            sources[queue as usize] = Some(Box::new(depth));
        }
    }

    /// Whole provider call, request sent to last byte.
    pub fn record_upstream_latency(&self, route: &'static str, latency: Duration) {
        self.inner
            .upstream_latency
            .record(latency.as_secs_f64(), &[KeyValue::new("route", route)]);
    }

    /// Time to first token, once per streamed response that delivered one:
    /// `client` is request received to first content byte sent to the
    /// client, `upstream` is upstream request sent to first content byte
    /// received. Records both and the difference (what the gateway added:
    /// its own overhead, window hold-back and classification), labelled by
    /// streaming mode (`buffer`, `window`, `observe`, `off`).
    pub fn record_ttft(&self, streaming: &'static str, client: Duration, upstream: Duration) {
        let labels = [KeyValue::new("streaming", streaming)];
        self.inner.ttft.record(client.as_secs_f64(), &labels);
        self.inner
            .upstream_ttft
            .record(upstream.as_secs_f64(), &labels);
        self.inner
            .added_ttft
            .record(client.saturating_sub(upstream).as_secs_f64(), &labels);
    }

    /// Audit records dropped because the audit queue was full.
    /// Unknown delta fields (or stray choices) of one response and what the
    /// policy's `unknown_fields` did with them (`drop`, `pass`).
    pub fn record_unknown_fields(&self, action: &'static str, n: u64) {
        self.inner
            .unknown_fields
            .add(n, &[KeyValue::new("action", action)]);
    }

    pub fn record_audit_dropped(&self, records: u64) {
        self.inner.audit_dropped.add(records, &[]);
    }

    /// Read the audit sink's queue depth and its running total of dropped
    /// records whenever metrics are collected (scrape or OTLP push): the
    /// audit writer keeps its own counters, so nothing on its hot path calls
    /// telemetry. Growth of `dropped_total` since the last collection is
    /// added to `carewall_audit_dropped_total`.
    pub fn watch_audit(
        &self,
        depth: impl Fn() -> usize + Send + Sync + 'static,
        dropped_total: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        let counter = self.inner.audit_dropped.clone();
        let seen = AtomicU64::new(0);
        self.watch_queue_depth(Queue::Audit, move || {
            let total = dropped_total();
            let before = seen.swap(total, Ordering::Relaxed);
            if total > before {
                counter.add(total - before, &[]);
            }
            depth()
        });
    }

    /// Whether `/metrics` should be served (`telemetry.prometheus`).
    pub fn prometheus_enabled(&self) -> bool {
        self.inner.registry.is_some()
    }

    /// Prometheus text exposition (format 0.0.4) of every instrument; empty
    /// when `telemetry.prometheus = false`. Serve it with
    /// [`PROMETHEUS_CONTENT_TYPE`].
    pub fn render_prometheus(&self) -> String {
        let Some(registry) = &self.inner.registry else {
            return String::new();
        };
        let families = registry.gather();
        let mut out = String::with_capacity(8 * 1024);
        match prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
            Ok(()) => out,
            Err(e) => {
                tracing::warn!(error = %e, "encoding Prometheus metrics failed");
                String::new()
            }
        }
    }

    /// Push pending metrics to the OTLP endpoint now (no-op without one).
    pub fn force_flush(&self) -> Result<(), TelemetryError> {
        self.inner
            .provider
            .force_flush()
            .map_err(|e| TelemetryError::Flush(format!("metrics: {e}")))
    }

    /// Final export and stop the readers. Blocks for up to the export timeout.
    pub(super) fn shutdown(&self) -> Result<(), TelemetryError> {
        self.inner
            .provider
            .shutdown()
            .map_err(|e| TelemetryError::Flush(format!("metrics: {e}")))
    }
}

fn register_queue_gauge(meter: &Meter, queues: &Arc<QueueDepths>) {
    let queues = Arc::clone(queues);
    // The SDK keeps the instrument alive through its callback registration.
    let _gauge = meter
        .u64_observable_gauge("carewall.queue.depth")
        .with_description("Items waiting in a bounded queue (classifier, audit)")
        .with_callback(move |observer| {
            for queue in Queue::ALL {
                observer.observe(queues.read(queue), &[KeyValue::new("queue", queue.key())]);
            }
        })
        .build();
}

pub(super) fn resource(settings: &TelemetrySettings) -> Resource {
    Resource::builder()
        .with_service_name(settings.service_name.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// The audit sink's own counters reach `/metrics` as they grow, counted
    /// once however often metrics are collected.
    #[test]
    fn audit_depth_and_drops_are_read_at_collection() {
        let metrics = Metrics::new(&TelemetrySettings::default()).expect("metrics");
        let depth = Arc::new(AtomicUsize::new(5));
        let dropped = Arc::new(AtomicU64::new(3));
        let (d, x) = (depth.clone(), dropped.clone());
        metrics.watch_audit(
            move || d.load(Ordering::Relaxed),
            move || x.load(Ordering::Relaxed),
        );
        let text = metrics.render_prometheus();
        assert_eq!(
            value(&text, "carewall_queue_depth{queue=\"audit\""),
            Some(5.0),
            "{text}"
        );
        let _ = metrics.render_prometheus();
        dropped.store(4, Ordering::Relaxed);
        depth.store(1, Ordering::Relaxed);
        let _ = metrics.render_prometheus();
        let text = metrics.render_prometheus();
        assert_eq!(
            value(&text, "carewall_audit_dropped_total"),
            Some(4.0),
            "{text}"
        );
        assert_eq!(
            value(&text, "carewall_queue_depth{queue=\"audit\""),
            Some(1.0),
            "{text}"
        );
    }
}
