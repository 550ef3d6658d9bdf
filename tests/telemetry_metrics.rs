//! `/metrics` content parses as Prometheus text, uses `carewall_` names and
//! a `category` label, and moves with recorded traffic; the same
//! instruments arrive over OTLP/HTTP.

#[path = "common/otlp.rs"]
mod otlp;
#[path = "common/promtext.rs"]
mod promtext;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use carewall::classifier::Category;
use carewall::telemetry::{Metrics, Queue, TelemetrySettings};
use otlp::{Attr, OtlpReceiver};

fn scrape(metrics: &Metrics) -> promtext::Exposition {
    let text = metrics.render_prometheus();
    promtext::parse(&text)
        .unwrap_or_else(|e| panic!("/metrics is not valid Prometheus text: {e}\n{text}"))
}

/// One flagged and one clean streamed response, as the proxy records them.
fn traffic(m: &Metrics) {
    m.record_request("/v1/chat/completions", 200);
    m.record_classification("window", Duration::from_millis(4));
    m.record_classification("final", Duration::from_millis(6));
    m.record_batch_size(3);
    m.record_upstream_latency("/v1/chat/completions", Duration::from_millis(900));
    m.record_ttft(
        "window",
        Duration::from_millis(130),
        Duration::from_millis(100),
    );
    m.record_response(Category::ToxicLanguage.key(), "replace", "enforce");

    m.record_request("/v1/chat/completions", 200);
    m.record_response(Category::SafeResponse.key(), "allow", "enforce");
    m.record_response(Category::HumanoidMimicry.key(), "append", "shadow");
}

#[test]
fn prometheus_text_is_valid_and_counts_traffic() {
    let metrics = Metrics::new(&TelemetrySettings::default()).unwrap_or_else(|e| panic!("{e}"));
    assert!(metrics.prometheus_enabled());

    traffic(&metrics);
    let first = scrape(&metrics);
    traffic(&metrics);
    metrics.record_request("/v1/chat/completions", 502);
    metrics.record_audit_dropped(2);
    metrics.record_classifier_error("timeout");
    let second = scrape(&metrics);

    for s in &second.samples {
        assert!(
            s.name.starts_with("carewall_"),
            "{} does not start with carewall_",
            s.name
        );
    }
    for (name, kind) in [
        ("carewall_requests_total", "counter"),
        ("carewall_responses_total", "counter"),
        ("carewall_classifier_latency_seconds", "histogram"),
        ("carewall_classifier_batch_size", "histogram"),
        ("carewall_classifier_errors_total", "counter"),
        ("carewall_upstream_latency_seconds", "histogram"),
        ("carewall_upstream_time_to_first_token_seconds", "histogram"),
        ("carewall_time_to_first_token_seconds", "histogram"),
        ("carewall_added_time_to_first_token_seconds", "histogram"),
        ("carewall_audit_dropped_total", "counter"),
        ("carewall_queue_depth", "gauge"),
    ] {
        assert_eq!(
            second.types.get(name).map(String::as_str),
            Some(kind),
            "{name}: {:?}",
            second.types
        );
    }

    let flagged = [
        ("category", "toxic_language"),
        ("action", "replace"),
        ("mode", "enforce"),
    ];
    assert_eq!(first.sum("carewall_responses_total", &flagged), 1.0);
    assert_eq!(second.sum("carewall_responses_total", &flagged), 2.0);
    let shadow = [("category", "humanoid_mimicry"), ("mode", "shadow")];
    assert_eq!(second.sum("carewall_responses_total", &shadow), 2.0);
    assert_eq!(second.sum("carewall_responses_total", &[]), 6.0);

    let ok = [("route", "/v1/chat/completions"), ("status", "200")];
    assert_eq!(first.sum("carewall_requests_total", &ok), 2.0);
    assert_eq!(second.sum("carewall_requests_total", &ok), 4.0);
    assert_eq!(
        second.sum("carewall_requests_total", &[("status", "502")]),
        1.0
    );
    assert_eq!(second.sum("carewall_audit_dropped_total", &[]), 2.0);
    assert_eq!(
        second.sum("carewall_classifier_errors_total", &[("kind", "timeout")]),
        1.0
    );

    // Added TTFT = client TTFT - upstream TTFT = 30 ms, twice.
    let added = [("streaming", "window")];
    assert_eq!(
        first.sum("carewall_added_time_to_first_token_seconds_count", &added),
        1.0
    );
    assert_eq!(
        second.sum("carewall_added_time_to_first_token_seconds_count", &added),
        2.0
    );
    let sum = second.sum("carewall_added_time_to_first_token_seconds_sum", &added);
    assert!((sum - 0.060).abs() < 1e-9, "{sum}");
    // 30 ms falls in (0.02, 0.05].
    let bucket = |le: &str| {
        second.sum(
            "carewall_added_time_to_first_token_seconds_bucket",
            &[("streaming", "window"), ("le", le)],
        )
    };
    assert_eq!((bucket("0.02"), bucket("0.05")), (0.0, 2.0));
    assert_eq!(
        second.sum(
            "carewall_classifier_latency_seconds_count",
            &[("stage", "final")]
        ),
        2.0
    );
    assert_eq!(second.sum("carewall_classifier_batch_size_sum", &[]), 6.0);
}

#[test]
fn queue_depths_come_from_setters_or_callbacks() {
    let metrics = Metrics::new(&TelemetrySettings::default()).unwrap_or_else(|e| panic!("{e}"));
    metrics.set_queue_depth(Queue::Classifier, 7);
    let depth = Arc::new(AtomicUsize::new(3));
    let watched = depth.clone();
    metrics.watch_queue_depth(Queue::Audit, move || watched.load(Ordering::Relaxed));
    let e = scrape(&metrics);
    assert_eq!(
        e.sum("carewall_queue_depth", &[("queue", "classifier")]),
        7.0
    );
    assert_eq!(e.sum("carewall_queue_depth", &[("queue", "audit")]), 3.0);
    depth.store(11, Ordering::Relaxed);
    metrics.set_queue_depth(Queue::Classifier, 0);
    let e = scrape(&metrics);
    assert_eq!(
        e.sum("carewall_queue_depth", &[("queue", "classifier")]),
        0.0
    );
    assert_eq!(e.sum("carewall_queue_depth", &[("queue", "audit")]), 11.0);
}

#[test]
fn prometheus_off_renders_nothing() {
    let settings = TelemetrySettings {
        prometheus: false,
        ..TelemetrySettings::default()
    };
    let metrics = Metrics::new(&settings).unwrap_or_else(|e| panic!("{e}"));
    traffic(&metrics);
    assert!(!metrics.prometheus_enabled());
    assert_eq!(metrics.render_prometheus(), "");
    let disabled = Metrics::disabled();
    traffic(&disabled);
    assert_eq!(disabled.render_prometheus(), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_instruments_arrive_over_otlp() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let settings = TelemetrySettings {
        otlp_endpoint: Some(receiver.base_url.clone()),
        ..TelemetrySettings::default()
    };
    let metrics = Metrics::new(&settings)?;
    traffic(&metrics);
    metrics.set_queue_depth(Queue::Audit, 5);
    let flushing = metrics.clone();
    tokio::task::spawn_blocking(move || flushing.force_flush()).await??;
    receiver
        .wait_until(Duration::from_secs(30), |r| {
            r.paths().iter().any(|p| p == "/v1/metrics")
        })
        .await?;

    let points = receiver.points();
    let find = |metric: &str, labels: &[(&str, &str)]| {
        points
            .iter()
            .rfind(|p| {
                p.metric == metric
                    && labels
                        .iter()
                        .all(|(k, v)| p.attributes.get(*k) == Some(&Attr::Str((*v).to_owned())))
            })
            .cloned()
    };
    let flagged = find(
        "carewall.responses",
        &[
            ("category", "toxic_language"),
            ("action", "replace"),
            ("mode", "enforce"),
        ],
    );
    assert_eq!(flagged.map(|p| p.value), Some(1.0), "{points:#?}");
    let added = find(
        "carewall.added_time_to_first_token",
        &[("streaming", "window")],
    );
    let added = added.unwrap_or_else(|| panic!("no added TTFT point in {points:#?}"));
    assert_eq!((added.value, added.unit.as_str()), (1.0, "s"));
    assert!((added.sum - 0.030).abs() < 1e-9, "{}", added.sum);
    let requests = points
        .iter()
        .rfind(|p| {
            p.metric == "carewall.requests" && p.attributes.get("status") == Some(&Attr::Int(200))
        })
        .map(|p| p.value);
    assert_eq!(requests, Some(2.0));
    assert_eq!(
        find("carewall.queue.depth", &[("queue", "audit")]).map(|p| p.value),
        Some(5.0)
    );
    assert!(receiver.paths().iter().all(|p| p == "/v1/metrics"));
    Ok(())
}
#[test]
fn prometheus_text_parser_rejects_what_prometheus_rejects() {
    let good = "# HELP a_total x\n# TYPE a_total counter\na_total{k=\"v\\\"q\"} 3\n\
                # TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3.5\nh_count 2\n";
    let e = promtext::parse(good).unwrap_or_else(|m| panic!("{m}"));
    assert_eq!(e.sum("a_total", &[("k", "v\"q")]), 3.0);
    for bad in [
        "1bad 1\n",
        "a{k=v} 1\n",
        "a{k=\"v} 1\n",
        "a 1x\n",
        "a 1\na 2\n",
        "a 1\n# TYPE a counter\n",
        "# TYPE a counter\n# TYPE a gauge\n",
        "a 1\nb 1\na{x=\"1\"} 1\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_count 3\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_count 1\n",
        "a{k=\"\\x\"} 1\n",
    ] {
        assert!(promtext::parse(bad).is_err(), "accepted {bad:?}");
    }
}

/// Prometheus' own parser and linter, when installed (Debian package
/// `prometheus`): `promtool check metrics` reads the exposition on stdin.
#[test]
fn promtool_accepts_the_exposition() -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!("skipping: promtool is not installed (apt-get install prometheus)");
        return Ok(());
    };
    let metrics = Metrics::new(&TelemetrySettings::default())?;
    traffic(&metrics);
    metrics.set_queue_depth(Queue::Audit, 2);
    metrics.record_audit_dropped(1);
    metrics.record_classifier_error("overloaded");
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(metrics.render_prometheus().as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check metrics: {report}");
    assert!(report.trim().is_empty(), "promtool lint findings: {report}");
    Ok(())
}
