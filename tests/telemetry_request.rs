//! `RequestTelemetry`, the per-request bundle the proxy uses: one flagged
//! streamed request yields the span tree, the Prometheus series and one
//! access-log line; a request dropped mid-way is still accounted for.

#[path = "common/otlp.rs"]
mod otlp;
#[path = "common/promtext.rs"]
mod promtext;

use std::time::Duration;

use carewall::classifier::Category;
use carewall::telemetry::{
    self, spans, LogFormat, LoggingOptions, RequestTelemetry, TelemetrySettings,
};
use http::{HeaderMap, HeaderValue, Method};
use otlp::{Attr, OtlpReceiver};

const CLIENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

#[path = "common/capture.rs"]
mod capture;
use capture::Capture;

fn access_lines(logs: &Capture) -> Vec<serde_json::Value> {
    let bytes = logs.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "carewall::access")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_flagged_stream_and_one_cancelled_request() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let settings = TelemetrySettings {
        otlp_endpoint: Some(receiver.base_url.clone()),
        ..TelemetrySettings::default()
    };
    let logging = LoggingOptions {
        format: LogFormat::Json,
        level: "info".into(),
        log_conversation_text: false,
    };
    let logs = Capture::default();
    let (dispatch, guard) = telemetry::build(&settings, &logging, logs.clone())?;
    let metrics = guard.metrics().clone();

    let mut incoming = HeaderMap::new();
    incoming.insert(
        "traceparent",
        HeaderValue::from_str(&format!("00-{CLIENT_TRACE}-b7ad6b7169203331-01"))?,
    );

    let upstream_traceparent = tracing::dispatcher::with_default(&dispatch, || {
        // The call sequence the proxy follows for a streamed, flagged reply.
        let mut req = RequestTelemetry::start(
            &metrics,
            &Method::POST,
            "/v1/chat/completions",
            "req-42",
            &incoming,
        );
        req.set_request("gpt-4o-mini", true);
        req.set_streaming("window");
        let mut upstream_headers = HeaderMap::new();
        let call = req.upstream_call(&mut upstream_headers);
        req.upstream_first_token();
        let c = req.classification("window");
        c.done(Category::SafeResponse, 0.95);
        req.decision("default", Category::SafeResponse, 0.95, "allow", "enforce");
        req.client_first_token();
        let c = req.classification("window");
        c.done(Category::ToxicLanguage, 0.88);
        req.decision(
            "default",
            Category::ToxicLanguage,
            0.88,
            "replace",
            "enforce",
        );
        req.set_verdict(
            Category::ToxicLanguage.key(),
            "replace",
            "enforce",
            "default",
        );
        let c = req.classification("final");
        c.failed("timeout");
        req.set_usage(30, 12);
        req.set_response_model("gpt-4o-mini-2024-07-18");
        call.finish(Some(200), None);
        req.finish(200);

        // A client that hangs up before anything was sent.
        let mut gone = RequestTelemetry::start(
            &metrics,
            &Method::POST,
            "/v1/chat/completions",
            "req-43",
            &HeaderMap::new(),
        );
        gone.set_request("gpt-4o-mini", true);
        let _call = gone.upstream_call(&mut HeaderMap::new());
        drop(gone);

        upstream_headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });

    // Prometheus: counted once per request, verdict by category.
    let text = metrics.render_prometheus();
    let e = promtext::parse(&text).map_err(anyhow::Error::msg)?;
    let flagged = [
        ("category", "toxic_language"),
        ("action", "replace"),
        ("mode", "enforce"),
    ];
    assert_eq!(e.sum("carewall_responses_total", &flagged), 1.0, "{text}");
    assert_eq!(e.sum("carewall_responses_total", &[]), 1.0, "{text}");
    assert_eq!(e.sum("carewall_requests_total", &[("status", "200")]), 1.0);
    assert_eq!(e.sum("carewall_requests_total", &[("status", "499")]), 1.0);
    assert_eq!(
        e.sum(
            "carewall_added_time_to_first_token_seconds_count",
            &[("streaming", "window")]
        ),
        1.0
    );
    assert_eq!(e.sum("carewall_upstream_latency_seconds_count", &[]), 2.0);
    assert_eq!(
        e.sum(
            "carewall_classifier_latency_seconds_count",
            &[("stage", "window")]
        ),
        2.0
    );
    assert_eq!(
        e.sum("carewall_classifier_errors_total", &[("kind", "timeout")]),
        1.0
    );

    // Access log: one line per request, the cancelled one with 499.
    let lines = access_lines(&logs);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert_eq!(lines[0]["request_id"], "req-42");
    assert_eq!(lines[0]["category"], "toxic_language");
    assert_eq!(lines[0]["trace_id"], CLIENT_TRACE);
    assert!(
        lines[0]["added_ttft_ms"]
            .as_f64()
            .is_some_and(|a| a >= 0.0 && a <= lines[0]["ttft_ms"].as_f64().unwrap_or(-1.0)),
        "{}",
        lines[0]
    );
    assert_eq!(lines[1]["request_id"], "req-43");
    assert_eq!(
        (lines[1]["status"].as_u64(), lines[1]["error"].as_str()),
        (Some(499), Some("client_cancelled"))
    );

    tokio::task::spawn_blocking(move || guard.shutdown()).await??;
    receiver
        .wait_until(Duration::from_secs(30), |r| {
            r.spans()
                .iter()
                .filter(|s| s.name == spans::names::REQUEST)
                .count()
                == 2
        })
        .await?;
    let spans = receiver.spans();
    let request = spans
        .iter()
        .find(|s| s.str_attr("carewall.request_id") == Some("req-42"))
        .ok_or_else(|| anyhow::anyhow!("no request span: {spans:#?}"))?;
    assert_eq!(request.trace_id, CLIENT_TRACE);
    assert_eq!(
        request.str_attr("carewall.category"),
        Some("toxic_language")
    );
    assert_eq!(request.str_attr("carewall.action"), Some("replace"));
    assert_eq!(
        request.attr("gen_ai.usage.output_tokens"),
        Some(&Attr::Int(12))
    );
    let children: Vec<_> = spans
        .iter()
        .filter(|s| s.parent_span_id == request.span_id)
        .collect();
    let mut names: Vec<_> = children.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "carewall.classify",
            "carewall.classify",
            "carewall.classify",
            "carewall.decision",
            "carewall.decision",
            "carewall.upstream"
        ]
    );
    let upstream = children
        .iter()
        .find(|s| s.name == spans::names::UPSTREAM)
        .ok_or_else(|| anyhow::anyhow!("no upstream span"))?;
    assert_eq!(
        upstream_traceparent,
        Some(format!("00-{CLIENT_TRACE}-{}-01", upstream.span_id))
    );
    let failed = children
        .iter()
        .find(|s| s.str_attr("carewall.classify.stage") == Some("final"))
        .ok_or_else(|| anyhow::anyhow!("no final classification"))?;
    assert_eq!(
        (failed.str_attr("error.type"), failed.status_code),
        (Some("timeout"), 2)
    );

    let gone = spans
        .iter()
        .find(|s| s.str_attr("carewall.request_id") == Some("req-43"))
        .ok_or_else(|| anyhow::anyhow!("no span for the cancelled request"))?;
    assert_eq!(
        gone.attr("http.response.status_code"),
        Some(&Attr::Int(499))
    );
    assert_eq!(
        (gone.str_attr("error.type"), gone.status_code),
        (Some("client_cancelled"), 2)
    );
    Ok(())
}
