//! Telemetry through the real binary: a flagged streamed request sent by
//! async-openai with a W3C `traceparent`, exported to an in-test OTLP/HTTP
//! receiver given as `CAREWALL__TELEMETRY__OTLP_ENDPOINT`; `/metrics`
//! scraped and parsed before and after; conversation text looked for in
//! every exported span attribute and in the gateway's log lines.

mod common;
#[path = "common/otlp.rs"]
mod otlp;
#[path = "common/promtext.rs"]
mod promtext;

use std::time::Duration;

use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
};
use common::*;
use futures::StreamExt;
use otlp::{OtlpReceiver, ReceivedSpan};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
/// Distinctive words in the question and in the (unsafe) reply: none may
/// appear in a span or a log line.
const QUESTION_MARKER: &str = "Quetzalwhisper";
const REPLY_MARKER: &str = "Marmalodrift";
const WAIT: Duration = Duration::from_secs(30);

fn flagged_upstream() -> impl Fn(&serde_json::Value, usize) -> MockReply + Send + Sync + 'static {
    |body, _| {
        if last_user(body).contains("toxic") {
            MockReply::pieces(&["Marmalodrift, ", "you sound ", "pathetic. ", "Stop it."])
        } else {
            MockReply::pieces(&["I hear you. ", "I'm here with you."])
        }
    }
}

async fn scrape(gw: &Gateway) -> (String, String) {
    let resp = reqwest::get(gw.url("/metrics"))
        .await
        .expect("GET /metrics");
    assert_eq!(resp.status(), 200);
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (ct, resp.text().await.expect("metrics body"))
}

fn child_of<'a>(
    spans: &'a [ReceivedSpan],
    parent: &ReceivedSpan,
    name: &str,
) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| {
            s.name == name && s.parent_span_id == parent.span_id && s.trace_id == parent.trace_id
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flagged_stream_is_one_trace_and_moves_metrics_without_conversation_text(
) -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let mock = MockUpstream::start(flagged_upstream()).await;
    let mut gw = Gateway::start(
        GatewayOptions::new(Some(mock.base_url()))
            .env("CAREWALL__TELEMETRY__OTLP_ENDPOINT", &receiver.base_url)
            .env("CAREWALL__TELEMETRY__EXPORT_INTERVAL_SECS", "1"),
    );

    // Before any chat traffic: parses, every name is carewall_*.
    let (content_type, before) = scrape(&gw).await;
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let before = promtext::parse(&before).map_err(anyhow::Error::msg)?;
    let flagged_before = before.sum(
        "carewall_responses_total",
        &[("category", "toxic_language")],
    );

    let cfg = async_openai::config::OpenAIConfig::new()
        .with_api_base(gw.base_url())
        .with_api_key("client-key")
        .with_header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))?;
    let client = async_openai::Client::with_config(cfg);
    let req = CreateChatCompletionRequestArgs::default()
        .model(MOCK_MODEL)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content(format!("toxic please, {QUESTION_MARKER}"))
            .build()?
            .into()])
        .build()?;
    let mut stream = client.chat().create_stream(req).await?;
    let mut text = String::new();
    while let Some(item) = stream.next().await {
        let chunk = item?;
        if let Some(t) = chunk.choices.first().and_then(|c| c.delta.content.clone()) {
            text.push_str(&t);
        }
    }
    assert!(
        !text.contains("pathetic"),
        "the unsafe reply was released: {text}"
    );

    // (b) /metrics after the traffic. The stream's task records the
    // exchange after the client has read `[DONE]`, so wait (bounded) for it.
    let mut after = promtext::parse(&scrape(&gw).await.1).map_err(anyhow::Error::msg)?;
    for _ in 0..100 {
        let moved = after.sum(
            "carewall_responses_total",
            &[("category", "toxic_language")],
        ) > flagged_before;
        if moved {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        after = promtext::parse(&scrape(&gw).await.1).map_err(anyhow::Error::msg)?;
    }
    for name in after.types.keys() {
        assert!(
            name.starts_with("carewall_"),
            "metric `{name}` lacks the carewall_ prefix"
        );
    }
    for s in after.matching("carewall_responses_total", &[]) {
        assert!(s.labels.contains_key("category"), "{s:?}");
    }
    assert_eq!(
        after.sum(
            "carewall_responses_total",
            &[("category", "toxic_language")]
        ),
        flagged_before + 1.0
    );
    assert!(
        after.sum(
            "carewall_requests_total",
            &[("route", "/v1/chat/completions"), ("status", "200")]
        ) >= 1.0
    );
    assert!(
        after.sum(
            "carewall_added_time_to_first_token_seconds_count",
            &[("streaming", "window")]
        ) >= 1.0,
        "added TTFT histogram did not move"
    );
    assert!(after.sum("carewall_classifier_latency_seconds_count", &[]) >= 1.0);

    // Graceful shutdown flushes the spans.
    gw.signal("TERM");
    let status = tokio::task::spawn_blocking(move || {
        let s = gw.child.wait();
        (gw, s)
    })
    .await?;
    let (gw, exit) = status;
    assert!(exit?.success(), "gateway exit; logs:\n{}", gw.logs());
    receiver
        .wait_until(WAIT, |r| {
            r.spans()
                .iter()
                .any(|s| s.name == "carewall.request" && s.trace_id == TRACE_ID)
        })
        .await?;
    let spans = receiver.spans();

    // (a) one trace: the request span joins the caller's trace.
    let requests: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.name == "carewall.request" && s.trace_id == TRACE_ID)
        .collect();
    assert_eq!(requests.len(), 1, "{requests:#?}");
    let request = requests[0];
    assert_eq!(request.parent_span_id, CALLER_SPAN);
    assert_eq!(
        request.str_attr("carewall.category"),
        Some("toxic_language")
    );
    let action = request.str_attr("carewall.action").unwrap_or_default();
    assert!(
        ["replace", "block", "retry"].contains(&action),
        "action {action}"
    );
    assert_eq!(request.str_attr("carewall.policy"), Some("default"));
    assert_eq!(request.str_attr("carewall.mode"), Some("enforce"));
    assert_eq!(request.str_attr("gen_ai.system"), Some("openai"));
    assert_eq!(request.str_attr("gen_ai.request.model"), Some(MOCK_MODEL));
    assert_eq!(request.str_attr("http.route"), Some("/v1/chat/completions"));

    let upstream = child_of(&spans, request, "carewall.upstream");
    assert!(!upstream.is_empty(), "no upstream span");
    assert_eq!(
        upstream[0].str_attr("gen_ai.request.model"),
        Some(MOCK_MODEL)
    );
    let classify = child_of(&spans, request, "carewall.classify");
    assert!(!classify.is_empty(), "no classify span");
    assert!(classify
        .iter()
        .any(|s| s.str_attr("carewall.category") == Some("toxic_language")));
    let decisions = child_of(&spans, request, "carewall.decision");
    assert!(decisions.iter().any(
        |s| s.str_attr("carewall.category") == Some("toxic_language")
            && s.str_attr("carewall.action") == Some(action)
    ));

    // The provider saw a traceparent in the same trace, naming an upstream span.
    let recorded = mock.recorded();
    let tp = recorded
        .first()
        .and_then(|r| r.headers.get("traceparent"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent upstream: `{tp}`");
    assert_eq!(parts[1], TRACE_ID);
    assert!(
        upstream.iter().any(|u| u.span_id == parts[2]),
        "upstream traceparent does not name an upstream span: {tp}"
    );

    // Metrics also went out over OTLP (pushed at shutdown at the latest).
    receiver
        .wait_until(WAIT, |r| {
            r.points().iter().any(|p| {
                p.metric == "carewall.responses"
                    && p.attributes.get("category").and_then(otlp::Attr::as_str)
                        == Some("toxic_language")
            })
        })
        .await?;
    assert!(receiver
        .points()
        .iter()
        .any(|p| p.metric == "carewall.added_time_to_first_token" && p.value >= 1.0));

    // (c) no conversation text in spans or logs.
    for s in &spans {
        let dump = format!("{:?} {:?}", s.name, s.attributes);
        for marker in [QUESTION_MARKER, REPLY_MARKER, "pathetic"] {
            assert!(!dump.contains(marker), "`{marker}` in span {dump}");
        }
    }
    let logs = gw.logs();
    for marker in [QUESTION_MARKER, REPLY_MARKER, "pathetic"] {
        assert!(
            !logs.contains(marker),
            "`{marker}` in the gateway log:\n{logs}"
        );
    }
    // One access-log line for the chat request, with its trace id.
    let access: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("carewall::access") && l.contains("/v1/chat/completions"))
        .collect();
    assert_eq!(access.len(), 1, "{logs}");
    assert!(access[0].contains(TRACE_ID), "{}", access[0]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_is_404_when_disabled() {
    let mock = MockUpstream::start(flagged_upstream()).await;
    let gw = Gateway::start(
        GatewayOptions::new(Some(mock.base_url())).env("CAREWALL__TELEMETRY__PROMETHEUS", "false"),
    );
    let resp = reqwest::get(gw.url("/metrics"))
        .await
        .expect("GET /metrics");
    assert_eq!(resp.status(), 404);
}

/// A client that goes away mid-stream is logged once, as 499.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cancel_is_one_access_line_with_499() {
    let mock = MockUpstream::start(|_, _| MockReply::Text {
        pieces: (0..200).map(|i| format!("Sentence {i}. ")).collect(),
        delay: Duration::from_millis(20),
        end: StreamEnd::Done,
    })
    .await;
    let gw = Gateway::start(GatewayOptions::new(Some(mock.base_url())));
    let resp = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body("hello", true))
        .send()
        .await
        .expect("send");
    let mut body = resp.bytes_stream();
    let _first = body.next().await;
    drop(body);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let logs = gw.logs();
        let access: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("carewall::access") && l.contains("/v1/chat/completions"))
            .collect();
        if !access.is_empty() {
            assert_eq!(access.len(), 1, "{logs}");
            assert!(access[0].contains("\"status\":499"), "{}", access[0]);
            assert!(access[0].contains("client_cancelled"), "{}", access[0]);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no access line:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `carewall mock-upstream` (the compose stack's provider) serves the
/// gateway: a safe question streams through, an unsafe reply is replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_upstream_subcommand_serves_the_gateway() -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut cmd = carewall_command();
    cmd.args([
        "mock-upstream",
        "--listen",
        "127.0.0.1:0",
        "--piece-delay-ms",
        "1",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null());
    let mut child = Kill(cmd.spawn()?);
    let stdout = child
        .0
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let line = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout).lines().map_while(Result::ok).next()
    })
    .await?
    .unwrap_or_default();
    let base = line
        .strip_prefix("carewall mock upstream listening on ")
        .ok_or_else(|| anyhow::anyhow!("unexpected first line: {line}"))?
        .trim()
        .to_string();
    let gw = Gateway::start(GatewayOptions::new(Some(base)));
    let resp = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body("Be honest, am I being rude?", true))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let body = resp.text().await?;
    let last = sse_verdict(&body).ok_or_else(|| anyhow::anyhow!("no verdict: {body}"))?;
    let verdict = &last["moderation"];
    assert_eq!(verdict["category"], "toxic_language", "{verdict}");
    assert_ne!(verdict["action"], "allow", "{verdict}");
    drop(child);
    Ok(())
}
