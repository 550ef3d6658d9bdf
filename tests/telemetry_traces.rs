//! Spans reach an OTLP/HTTP collector with carewall's names, attributes and
//! parentage; an incoming W3C `traceparent` is joined and a new one goes
//! upstream; access-log lines carry the request id and the trace id.

#[path = "common/otlp.rs"]
mod otlp;

use std::time::Duration;

use carewall::classifier::Category;
use carewall::telemetry::{self, spans, AccessLog, LogFormat, LoggingOptions, TelemetrySettings};
use http::{HeaderMap, HeaderValue, Method};
use otlp::{Attr, OtlpReceiver};

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
const WAIT: Duration = Duration::from_secs(30);

#[path = "common/capture.rs"]
mod capture;
use capture::Capture;

impl Capture {
    fn json_lines(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}"))
            })
            .collect()
    }
}

fn settings(endpoint: &str, sample_ratio: f64) -> TelemetrySettings {
    TelemetrySettings {
        otlp_endpoint: Some(endpoint.to_owned()),
        service_name: "carewall-test".into(),
        sample_ratio,
        prometheus: false,
        ..TelemetrySettings::default()
    }
}

fn client_headers(sampled: bool) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let flags = if sampled { "01" } else { "00" };
    let value = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-{flags}");
    headers.insert(
        "traceparent",
        HeaderValue::from_str(&value).unwrap_or_else(|e| panic!("{e}")),
    );
    headers
}

/// What the proxy does for one flagged streamed request, through the
/// telemetry API only. Returns the headers that would go upstream.
fn flagged_request(incoming: &HeaderMap, request_id: &str) -> HeaderMap {
    let request = spans::request_span(&Method::POST, "/v1/chat/completions", request_id, incoming);
    spans::record_request_model(&request, "gpt-4o-mini");
    spans::record_streaming(&request, "window");

    let upstream = spans::upstream_span(&request, "gpt-4o-mini");
    let mut upstream_headers = incoming.clone();
    spans::inject_context(&upstream, &mut upstream_headers);
    spans::record_status(&upstream, 200);
    spans::record_response_model(&upstream, "gpt-4o-mini-2024-07-18");
    spans::record_usage(&upstream, 42, 17);

    let first = spans::classify_span(&request, "window", 0);
    spans::record_classification(&first, Category::SafeResponse, 0.97);
    drop(first);
    let second = spans::classify_span(&request, "window", 1);
    spans::record_classification(&second, Category::ToxicLanguage, 0.91);
    drop(second);

    let decision = spans::decision_span(&request, "default");
    spans::record_classification(&decision, Category::ToxicLanguage, 0.91);
    spans::record_verdict(
        &decision,
        Category::ToxicLanguage.key(),
        "replace",
        "enforce",
        "default",
    );
    drop(decision);
    drop(upstream);

    spans::record_verdict(
        &request,
        Category::ToxicLanguage.key(),
        "replace",
        "enforce",
        "default",
    );
    spans::record_response_model(&request, "gpt-4o-mini-2024-07-18");
    spans::record_usage(&request, 42, 17);
    spans::record_status(&request, 200);
    let trace_id = spans::trace_id(&request);
    let _in_request = request.enter();
    telemetry::log_access(&AccessLog {
        request_id,
        method: "POST",
        route: "/v1/chat/completions",
        status: 200,
        duration: Duration::from_millis(250),
        stream: true,
        model: Some("gpt-4o-mini"),
        streaming: Some("window"),
        category: Some(Category::ToxicLanguage.key()),
        action: Some("replace"),
        mode: Some("enforce"),
        policy: Some("default"),
        ttft: Some(Duration::from_millis(120)),
        added_ttft: Some(Duration::from_millis(20)),
        trace_id: trace_id.as_deref(),
        error: None,
        tenant: Some("youth-service"),
        guards: None,
    });
    upstream_headers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flagged_request_is_one_trace_joined_to_the_client_and_passed_upstream(
) -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let logs = Capture::default();
    let logging = LoggingOptions {
        format: LogFormat::Json,
        level: "info".into(),
        log_conversation_text: false,
    };
    let (dispatch, guard) =
        telemetry::build(&settings(&receiver.base_url, 1.0), &logging, logs.clone())?;
    assert!(guard.tracing_exported());

    let upstream_headers = tracing::dispatcher::with_default(&dispatch, || {
        flagged_request(&client_headers(true), "req-0001")
    });
    // Flushes the batch synchronously; blocking, so off the reactor.
    tokio::task::spawn_blocking(move || guard.shutdown()).await??;
    receiver.wait_until(WAIT, |r| r.spans().len() >= 5).await?;

    let spans = receiver.spans();
    let by_name = |name: &str| {
        spans
            .iter()
            .filter(|s| s.name == name)
            .cloned()
            .collect::<Vec<_>>()
    };
    let request = by_name(spans::names::REQUEST);
    let upstream = by_name(spans::names::UPSTREAM);
    let classify = by_name(spans::names::CLASSIFY);
    let decision = by_name(spans::names::DECISION);
    assert_eq!(
        (
            request.len(),
            upstream.len(),
            classify.len(),
            decision.len()
        ),
        (1, 1, 2, 1),
        "{spans:#?}"
    );
    let (request, upstream, decision) = (&request[0], &upstream[0], &decision[0]);

    // One trace, continuing the client's, with the expected tree.
    assert!(
        spans.iter().all(|s| s.trace_id == CLIENT_TRACE),
        "{spans:#?}"
    );
    assert_eq!(request.parent_span_id, CLIENT_SPAN);
    for child in [upstream, decision].into_iter().chain(&classify) {
        assert_eq!(child.parent_span_id, request.span_id, "{}", child.name);
    }
    assert_eq!(
        request.resource.get("service.name"),
        Some(&Attr::Str("carewall-test".into()))
    );
    // Spans to /v1/traces, the guard's metrics to /v1/metrics, all protobuf.
    let paths = receiver.paths();
    assert!(paths.iter().any(|p| p == "/v1/traces"), "{paths:?}");
    assert!(
        paths
            .iter()
            .all(|p| p == "/v1/traces" || p == "/v1/metrics"),
        "{paths:?}"
    );
    assert!(receiver
        .content_types()
        .iter()
        .all(|c| c == "application/x-protobuf"));

    // The provider sees our upstream span as its parent, in the same trace.
    let traceparent = upstream_headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert_eq!(
        traceparent,
        format!("00-{CLIENT_TRACE}-{}-01", upstream.span_id)
    );

    // Kinds: server (2) for the request, client (3) for the upstream call.
    assert_eq!((request.kind, upstream.kind), (2, 3));

    // Verdict and GenAI attributes.
    for span in [request, decision] {
        assert_eq!(
            span.str_attr("carewall.category"),
            Some("toxic_language"),
            "{}",
            span.name
        );
        assert_eq!(
            span.str_attr("carewall.action"),
            Some("replace"),
            "{}",
            span.name
        );
        assert_eq!(
            span.str_attr("carewall.mode"),
            Some("enforce"),
            "{}",
            span.name
        );
        assert_eq!(
            span.str_attr("carewall.policy"),
            Some("default"),
            "{}",
            span.name
        );
    }
    assert_eq!(request.str_attr("carewall.request_id"), Some("req-0001"));
    assert_eq!(request.str_attr("http.route"), Some("/v1/chat/completions"));
    assert_eq!(request.str_attr("http.request.method"), Some("POST"));
    assert_eq!(
        request.attr("http.response.status_code"),
        Some(&Attr::Int(200))
    );
    assert_eq!(request.str_attr("carewall.streaming"), Some("window"));
    assert_eq!(
        request.str_attr("gen_ai.request.model"),
        Some("gpt-4o-mini")
    );
    assert_eq!(upstream.str_attr("gen_ai.system"), Some("openai"));
    assert_eq!(upstream.str_attr("gen_ai.operation.name"), Some("chat"));
    assert_eq!(
        upstream.str_attr("gen_ai.response.model"),
        Some("gpt-4o-mini-2024-07-18")
    );
    assert_eq!(
        upstream.attr("gen_ai.usage.input_tokens"),
        Some(&Attr::Int(42))
    );
    assert_eq!(
        upstream.attr("gen_ai.usage.output_tokens"),
        Some(&Attr::Int(17))
    );
    let mut stages: Vec<_> = classify
        .iter()
        .map(|s| {
            (
                s.attr("carewall.classify.index").cloned(),
                s.str_attr("carewall.category"),
            )
        })
        .collect();
    stages.sort_by_key(|(i, _)| format!("{i:?}"));
    assert_eq!(
        stages,
        [
            (Some(Attr::Int(0)), Some("safe_response")),
            (Some(Attr::Int(1)), Some("toxic_language"))
        ]
    );
    match decision.attr("carewall.score") {
        Some(Attr::Double(p)) => assert!((p - 0.91).abs() < 1e-6, "{p}"),
        other => panic!("carewall.score: {other:?}"),
    }

    // Nothing but the declared attributes: no text can ride along.
    let keys: Vec<_> = request.attributes.keys().map(String::as_str).collect();
    let allowed = [
        "carewall.action",
        "carewall.category",
        "carewall.mode",
        "carewall.policy",
        "carewall.request_id",
        "carewall.streaming",
        "gen_ai.operation.name",
        "gen_ai.request.model",
        "gen_ai.response.model",
        "gen_ai.system",
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens",
        "http.request.method",
        "http.response.status_code",
        "http.route",
    ];
    assert!(keys.iter().all(|k| allowed.contains(k)), "{keys:?}");

    // The access log line: JSON, request id, verdict, trace id for the jump.
    let lines = logs.json_lines();
    let access: Vec<_> = lines
        .iter()
        .filter(|l| l["target"] == "carewall::access")
        .collect();
    assert_eq!(access.len(), 1, "{lines:#?}");
    let line = access[0];
    assert_eq!(line["request_id"], "req-0001");
    assert_eq!(line["status"], 200);
    assert_eq!(line["category"], "toxic_language");
    assert_eq!(line["action"], "replace");
    assert_eq!(line["trace_id"], CLIENT_TRACE);
    assert_eq!(line["added_ttft_ms"], 20.0);
    assert_eq!(line["span"]["carewall.request_id"], "req-0001");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_follows_the_callers_decision() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let (dispatch, guard) = telemetry::build(
        &settings(&receiver.base_url, 0.0),
        &LoggingOptions::default(),
        std::io::sink,
    )?;
    tracing::dispatcher::with_default(&dispatch, || {
        // Sampled by the caller: kept although our own ratio is 0.
        flagged_request(&client_headers(true), "kept");
        // Not sampled by the caller, and no caller at all: dropped.
        flagged_request(&client_headers(false), "dropped-1");
        flagged_request(&HeaderMap::new(), "dropped-2");
    });
    tokio::task::spawn_blocking(move || guard.shutdown()).await??;
    receiver.wait_until(WAIT, |r| !r.spans().is_empty()).await?;
    // `shutdown` returned after the final export: everything is in.
    let ids: Vec<_> = receiver
        .spans()
        .iter()
        .filter_map(|s| s.str_attr("carewall.request_id").map(str::to_owned))
        .collect();
    assert_eq!(ids, ["kept"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_is_exported_and_client_traceparent_passes(
) -> anyhow::Result<()> {
    let logs = Capture::default();
    let (dispatch, guard) = telemetry::build(
        &TelemetrySettings::default(),
        &LoggingOptions::default(),
        logs.clone(),
    )?;
    assert!(!guard.tracing_exported());
    let incoming = client_headers(true);
    let upstream =
        tracing::dispatcher::with_default(&dispatch, || flagged_request(&incoming, "off-1"));
    assert_eq!(upstream, incoming);
    let lines = logs.json_lines();
    let access: Vec<_> = lines
        .iter()
        .filter(|l| l["target"] == "carewall::access")
        .collect();
    assert_eq!(access.len(), 1, "{lines:#?}");
    assert_eq!(access[0]["request_id"], "off-1");
    assert!(access[0].get("trace_id").is_none());
    tokio::task::spawn_blocking(move || guard.shutdown()).await??;
    Ok(())
}

#[test]
fn bad_log_level_names_the_key() {
    let logging = LoggingOptions {
        level: "carewall=loud".into(),
        ..LoggingOptions::default()
    };
    // RUST_LOG would take precedence; this test assumes it is unset, as in CI.
    if std::env::var_os("RUST_LOG").is_some() {
        eprintln!("skipping: RUST_LOG is set");
        return;
    }
    let err = telemetry::build(&TelemetrySettings::default(), &logging, std::io::sink)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.starts_with("logging.level: `carewall=loud` is not a log filter directive"),
        "{err}"
    );
}
