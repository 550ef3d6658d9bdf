//! Black-box tests: the real `carewall` binary on port 0, a scripted mock
//! upstream, and real clients (async-openai, reqwest).

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_openai::types::chat::{CreateChatCompletionRequest, FinishReason};
use common::*;
use futures::StreamExt;
use serde_json::{json, Value};

const SAFE: &[&str] = &[
    "I hear you. ",
    "That sounds ",
    "really hard. ",
    "I'm here with you.",
];

fn request(user: &str) -> CreateChatCompletionRequest {
    chat_request(MOCK_MODEL, user)
}

/// Stream through async-openai; returns (text, finish reason, error if any).
async fn stream_text(
    client: &async_openai::Client<async_openai::config::OpenAIConfig>,
    user: &str,
) -> (String, Option<FinishReason>, Option<String>) {
    let mut s = client
        .chat()
        .create_stream(request(user))
        .await
        .expect("stream opens");
    let mut text = String::new();
    let mut finish = None;
    while let Some(item) = s.next().await {
        match item {
            Ok(chunk) => {
                for c in chunk.choices {
                    if let Some(t) = c.delta.content {
                        text.push_str(&t);
                    }
                    if c.finish_reason.is_some() {
                        finish = c.finish_reason;
                    }
                }
            }
            Err(e) => return (text, finish, Some(e.to_string())),
        }
    }
    (text, finish, None)
}

async fn post(
    gw: &Gateway,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut r = reqwest::Client::new().post(gw.url(path)).json(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.expect("request sent")
}

/// Mock that answers every request with the same pieces.
async fn mock_reply(pieces: &'static [&'static str]) -> MockUpstream {
    MockUpstream::start(move |_, _| MockReply::pieces(pieces)).await
}

#[tokio::test]
async fn health_ready_models_and_request_id() {
    let mock = mock_reply(SAFE).await;
    let gw = Gateway::start(GatewayOptions::new(Some(mock.base_url())));
    let c = reqwest::Client::new();
    let r = c.get(gw.url("/healthz")).send().await.expect("healthz");
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-carewall-request-id"));
    let r = c.get(gw.url("/readyz")).send().await.expect("readyz");
    assert_eq!(r.status(), 200);
    let models = gw
        .openai()
        .models()
        .list()
        .await
        .expect("models through async-openai");
    assert_eq!(models.data[0].id, MOCK_MODEL);
    let r = c.get(gw.url("/nope")).send().await.expect("404");
    assert_eq!(r.status(), 404);
    assert!(r.headers().contains_key("x-carewall-request-id"));
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let r = c
        .get(gw.url("/v1/chat/completions"))
        .send()
        .await
        .expect("405");
    assert_eq!(r.status(), 405);
}

#[tokio::test]
async fn readyz_is_503_without_an_upstream() {
    let gw = Gateway::start(GatewayOptions::new(None));
    let r = reqwest::get(gw.url("/readyz")).await.expect("readyz");
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["checks"]["upstream_configured"], false);
    let r = post(&gw, "/v1/chat/completions", &chat_body("hi", false), &[]).await;
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "upstream_not_configured");
}

#[tokio::test]
async fn non_streaming_safe_reply_carries_the_verdict() {
    let mock = mock_reply(SAFE).await;
    let gw = Gateway::start(GatewayOptions::new(Some(mock.base_url())));
    let resp = gw
        .openai()
        .chat()
        .create(request("I can't sleep"))
        .await
        .expect("async-openai parses");
    assert_eq!(
        resp.choices[0].message.content.as_deref(),
        Some(SAFE.concat().as_str())
    );
    // The verdict also parses as OpenAI's own `moderation` field.
    let m = resp.moderation.expect("moderation parsed by async-openai");
    match m.output {
        async_openai::types::chat::ChatCompletionModerationOutput::Results(r) => {
            assert_eq!(r.model, "keyword");
            assert_eq!(r.results.len(), 1);
        }
        other => panic!("unexpected output {other:?}"),
    }
    let r = post(
        &gw,
        "/v1/chat/completions",
        &chat_body("I can't sleep", false),
        &[],
    )
    .await;
    let rid = r.headers()["x-carewall-request-id"]
        .to_str()
        .expect("id")
        .to_string();
    let v: Value = r.json().await.expect("json");
    let m = &v["moderation"];
    assert_eq!(m["action"], "allow");
    assert_eq!(m["category"], "safe_response");
    assert_eq!(m["policy"], "default");
    assert_eq!(m["request_id"], rid.as_str());
    assert_eq!(m["scores"].as_object().map(|s| s.len()), Some(8));
    assert!(m["mode"].is_null());
}

#[tokio::test]
async fn streaming_safe_reply_in_window_mode() {
    let mock = mock_reply(SAFE).await;
    let gw = Gateway::start(GatewayOptions::new(Some(mock.base_url())));
    let (text, finish, err) = stream_text(&gw.openai(), "I can't sleep").await;
    assert_eq!(err, None);
    assert_eq!(text, SAFE.concat());
    assert_eq!(finish, Some(FinishReason::Stop));
    let r = post(
        &gw,
        "/v1/chat/completions",
        &chat_body("I can't sleep", true),
        &[],
    )
    .await;
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let body = r.text().await.expect("body");
    let events = sse_events(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let text_chunks = events.iter().filter(|e| e.contains("\"content\"")).count();
    assert!(text_chunks >= 3, "released sentence by sentence: {body}");
    let last = sse_verdict(&body).expect("verdict chunk");
    assert_eq!(last["moderation"]["streaming"], "window");
    assert_eq!(last["moderation"]["action"], "allow");
    assert_eq!(last["id"], "chatcmpl-mock-1");
    assert_eq!(last["object"], "chat.completion.chunk");
}

#[tokio::test]
async fn window_mode_never_sends_a_flagged_sentence() {
    // The toxic word is split across chunks so no single upstream chunk
    // holds it; the gateway must still never let any part of it out.
    let mock = mock_reply(&[
        "I hear you. ",
        "You are an id",
        "iot for feeling ",
        "this. ",
        "More.",
    ])
    .await;
    let gw = Gateway::start(GatewayOptions::new(Some(mock.base_url())));
    let r = post(
        &gw,
        "/v1/chat/completions",
        &chat_body("Am I overreacting?", true),
        &[],
    )
    .await;
    let raw = r.text().await.expect("body");
    assert!(
        !raw.contains("You are an") && !raw.to_lowercase().contains("idiot"),
        "flagged text reached the client: {raw}"
    );
    assert!(
        !raw.contains("feeling"),
        "text after the flag reached the client: {raw}"
    );
    assert!(!raw.contains("More."), "{raw}");
    let text = sse_text(&raw);
    assert!(text.starts_with("I hear you."), "{text}");
    let last = sse_verdict(&raw).expect("verdict");
    assert_eq!(last["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(last["moderation"]["action"], "block");
    assert_eq!(last["moderation"]["category"], "toxic_language");
    // The same through async-openai: parses, ends with content_filter and
    // the block reply.
    let (text, finish, err) = stream_text(&gw.openai(), "Am I overreacting?").await;
    assert_eq!(err, None);
    assert_eq!(finish, Some(FinishReason::ContentFilter));
    assert!(text.contains("crisis line"), "{text}");
    assert!(!text.to_lowercase().contains("idiot"));
}

#[tokio::test]
async fn every_mode_streams_through_async_openai() {
    let mock = MockUpstream::start(|body, _| {
        if last_user(body).contains("toxic") {
            MockReply::pieces(&["You sound ", "pathetic. ", "Stop it."])
        } else {
            MockReply::pieces(SAFE)
        }
    })
    .await;
    let gw = Gateway::start(GatewayOptions::new(Some(mock.base_url())));
    for policy in ["default", "buffer", "observe", "strict"] {
        let client = gw.openai_with_policy(policy);
        let (text, finish, err) = stream_text(&client, "safe please").await;
        assert_eq!(err, None, "{policy}");
        assert_eq!(text, SAFE.concat(), "{policy}");
        assert_eq!(finish, Some(FinishReason::Stop), "{policy}");

        let (text, finish, err) = stream_text(&client, "toxic please").await;
        assert_eq!(err, None, "{policy}");
        if policy == "observe" {
            assert_eq!(text, "You sound pathetic. Stop it.");
            assert_eq!(finish, Some(FinishReason::Stop));
        } else {
            assert!(!text.contains("pathetic"), "{policy}: {text}");
            assert!(text.contains("crisis line"), "{policy}: {text}");
            assert_eq!(finish, Some(FinishReason::ContentFilter), "{policy}");
        }
        // Non-streaming too.
        let resp = client
            .chat()
            .create(request("toxic please"))
            .await
            .expect("parses");
        let content = resp.choices[0].message.content.clone().unwrap_or_default();
        assert!(
            !content.contains("pathetic") || policy == "observe",
            "{policy}: {content}"
        );
    }
    // Observe annotates: the verdict records what would have happened.
    let r = post(
        &gw,
        "/v1/chat/completions",
        &chat_body("toxic please", true),
        &[("x-carewall-policy", "observe")],
    )
    .await;
    let v = sse_verdict(&r.text().await.expect("body")).expect("verdict");
    assert_eq!(v["moderation"]["action"], "annotate");
    assert_eq!(v["moderation"]["shadow"][0]["action"], "block");
    assert_eq!(v["moderation"]["streaming"], "observe");
}

#[tokio::test]
async fn retry_asks_again_with_the_steering_message() {
    let mock = MockUpstream::start(|_, n| {
        if n % 2 == 0 {
            MockReply::pieces(&["Lorem ipsum ", "dolor sit amet."])
        } else {
            MockReply::pieces(&["I'm listening. ", "Tell me more."])
        }
    })
    .await;
    let gw = Gateway::start(GatewayOptions::new(Some(mock.base_url())));
    let r = post(&gw, "/v1/chat/completions", &chat_body("hello", false), &[]).await;
    let v: Value = r.json().await.expect("json");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "I'm listening. Tell me more."
    );
    assert_eq!(v["moderation"]["action"], "retry");
    assert_eq!(v["moderation"]["category"], "nonsense");
    assert_eq!(v["moderation"]["retries"], 1);
    let rec = mock.recorded();
    assert_eq!(rec.len(), 2);
    let msgs = rec[1].body["messages"].as_array().expect("messages");
    assert_eq!(
        msgs.last().map(|m| m["role"].clone()),
        Some(json!("system"))
    );
    assert!(msgs
        .last()
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .contains("safety check"));

    // Streaming: the retry happens before anything is released.
    let (text, finish, err) = stream_text(&gw.openai(), "hello").await;
    assert_eq!(
        (text.as_str(), finish, err),
        (
            "I'm listening. Tell me more.",
            Some(FinishReason::Stop),
            None
        )
    );
}

#[tokio::test]
async fn forwarding_injects_the_key_and_keeps_unknown_fields() {
    let mock = mock_reply(SAFE).await;
    let gw = Gateway::start(GatewayOptions::new(Some(mock.base_url())));
    let mut body = chat_body("hi", false);
    body["x_vendor_option"] = json!({"keep": true});
    body["temperature"] = json!(0.2);
    let r = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer client-key")
        .header("x-carewall-policy", "default")
        .header("openai-organization", "org-1")
        .json(&body)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    let rec = mock.recorded();
    let h = &rec[0].headers;
    assert_eq!(h["authorization"], "Bearer sk-gateway-secret");
    assert_eq!(h["openai-organization"], "org-1");
    assert!(!h.contains_key("x-carewall-policy"));
    assert_eq!(rec[0].body["x_vendor_option"], json!({"keep": true}));
    assert_eq!(rec[0].body["temperature"], json!(0.2));
}

#[tokio::test]
async fn upstream_errors_become_openai_errors() {
    let mock = MockUpstream::start(|body, _| match last_user(body).as_str() {
        "500" => MockReply::error(500, "provider exploded"),
        "400" => MockReply::error(400, "model `x` does not exist"),
        "401" => MockReply::error(401, "bad key"),
        "429" => MockReply::error(429, "slow down"),
        _ => MockReply::Json {
            status: 502,
            body: json!("not an error object"),
        },
    })
    .await;
    let gw = Gateway::start(GatewayOptions::new(Some(mock.base_url())));
    for (user, status, code) in [
        ("500", 502, "upstream_server_error"),
        ("401", 502, "upstream_auth_rejected"),
        ("other", 502, "upstream_server_error"),
    ] {
        for stream in [false, true] {
            let r = post(&gw, "/v1/chat/completions", &chat_body(user, stream), &[]).await;
            assert_eq!(r.status(), status, "{user} stream={stream}");
            let v: Value = r.json().await.expect("json error");
            assert_eq!(v["error"]["code"], code, "{user}: {v}");
            assert!(v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()));
        }
    }
    // Client mistakes keep their status and the provider's own error.
    let r = post(&gw, "/v1/chat/completions", &chat_body("400", false), &[]).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["message"], "model `x` does not exist");
    let r = post(&gw, "/v1/chat/completions", &chat_body("429", true), &[]).await;
    assert_eq!(r.status(), 429);
    // async-openai surfaces it as an API error.
    match gw.openai().chat().create(request("500")).await {
        Err(async_openai::error::OpenAIError::ApiError(e)) => {
            assert_eq!(e.status_code.as_u16(), 502);
            assert!(
                e.api_error.message.contains("provider exploded"),
                "{}",
                e.api_error.message
            );
        }
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn upstream_unreachable_is_a_502() {
    // A port nothing listens on: bind, read the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let gw = Gateway::start(GatewayOptions::new(Some(format!(
        "http://127.0.0.1:{port}/v1"
    ))));
    let r = post(&gw, "/v1/chat/completions", &chat_body("hi", true), &[]).await;
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "upstream_unreachable");
}

#[tokio::test]
async fn stream_cut_midway_gives_an_error_event_and_no_unchecked_text() {
    let mock = MockUpstream::start(|_, _| MockReply::Text {
        pieces: vec!["Checked sentence. ".into(), "unchecked tail".into()],
        delay: Duration::from_millis(5),
        end: StreamEnd::Cut,
    })
    .await;
    let gw = Gateway::start(GatewayOptions::new(Some(mock.base_url())));
    let r = post(&gw, "/v1/chat/completions", &chat_body("hi", true), &[]).await;
    let raw = r.text().await.unwrap_or_default();
    assert!(raw.contains("Checked sentence."), "{raw}");
    assert!(!raw.contains("unchecked"), "{raw}");
    let events = sse_events(&raw);
    let last: Value = serde_json::from_str(events.last().expect("events")).expect("json");
    assert_eq!(last["error"]["type"], "upstream_error");
    assert!(!raw.contains("[DONE]"));
    // async-openai reports an error instead of a silently short answer.
    let (_, _, err) = stream_text(&gw.openai(), "hi").await;
    assert!(err.is_some());
}

#[tokio::test]
async fn malformed_sse_gives_an_error_event() {
    let mock = MockUpstream::start(|_, _| MockReply::Text {
        pieces: vec!["Fine. ".into()],
        delay: Duration::from_millis(5),
        end: StreamEnd::Malformed,
    })
    .await;
    let gw = Gateway::start(GatewayOptions::new(Some(mock.base_url())));
    let r = post(&gw, "/v1/chat/completions", &chat_body("hi", true), &[]).await;
    let raw = r.text().await.expect("body");
    let events = sse_events(&raw);
    let last: Value = serde_json::from_str(events.last().expect("events")).expect("json");
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("not a JSON chunk"),
        "{raw}"
    );
}

#[tokio::test]
async fn slow_chunks_still_arrive_complete() {
    let mock = MockUpstream::start(|_, _| MockReply::Text {
        pieces: vec!["Take your time. ".into(), "I'm ".into(), "here.".into()],
        delay: Duration::from_millis(300),
        end: StreamEnd::Done,
    })
    .await;
    let gw = Gateway::start(GatewayOptions::new(Some(mock.base_url())));
    let (text, finish, err) = stream_text(&gw.openai(), "hi").await;
    assert_eq!(
        (text.as_str(), finish, err),
        ("Take your time. I'm here.", Some(FinishReason::Stop), None)
    );
}

#[tokio::test]
async fn first_byte_timeout_is_a_504() {
    let mock = MockUpstream::start(|_, _| MockReply::Hang).await;
    let mut opts = GatewayOptions::new(Some(mock.base_url()));
    opts = opts.env("CAREWALL__UPSTREAM__FIRST_BYTE_TIMEOUT_MS", "300");
    let gw = Gateway::start(opts);
    let r = post(&gw, "/v1/chat/completions", &chat_body("hi", true), &[]).await;
    assert_eq!(r.status(), 504);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "upstream_timeout");
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let mock = mock_reply(SAFE).await;
    let gw = Gateway::start(
        GatewayOptions::new(Some(mock.base_url())).env("CAREWALL__SERVER__MAX_BODY_BYTES", "2000"),
    );
    let c = reqwest::Client::new();
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .body("{nope")
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("json");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("not valid JSON"));
    let r = post(&gw, "/v1/chat/completions", &json!({"model": "m"}), &[]).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["param"], "messages");
    let r = post(
        &gw,
        "/v1/chat/completions",
        &chat_body("hi", true),
        &[("x-carewall-policy", "lenient")],
    )
    .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("json");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("known: buffer, default, observe, strict"),
        "{v}"
    );
    let big = chat_body(&"x".repeat(5000), false);
    let r = post(&gw, "/v1/chat/completions", &big, &[]).await;
    assert_eq!(r.status(), 413);
    assert!(
        mock.recorded().is_empty(),
        "bad requests must not reach the upstream"
    );
}

#[tokio::test]
async fn moderation_off_is_a_plain_pass_through() {
    let mock = mock_reply(&["You idiot. ", "Bye."]).await;
    let gw = Gateway::start(
        GatewayOptions::new(Some(mock.base_url())).env("CAREWALL__MODERATION__ENABLED", "false"),
    );
    let r = post(&gw, "/v1/chat/completions", &chat_body("hi", true), &[]).await;
    let raw = r.text().await.expect("body");
    assert_eq!(sse_text(&raw), "You idiot. Bye.");
    assert!(!raw.contains("moderation"));
    let r = post(&gw, "/v1/chat/completions", &chat_body("hi", false), &[]).await;
    let v: Value = r.json().await.expect("json");
    assert!(v.get("moderation").is_none());
    assert_eq!(
        mock.recorded()[0].headers["authorization"],
        "Bearer sk-gateway-secret"
    );
}

#[tokio::test]
async fn moderations_endpoint_scores_pairs_and_message_lists() {
    let mock = mock_reply(SAFE).await;
    let gw = Gateway::start(GatewayOptions::new(Some(mock.base_url())));
    let r = post(
        &gw,
        "/v1/moderations",
        &json!({"context": "[seeker]I feel alone.", "input": ["You are pathetic.", "I'm here for you."]}),
        &[],
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["results"][0]["flagged"], true);
    assert_eq!(v["results"][0]["category"], "toxic_language");
    assert_eq!(v["results"][0]["categories"]["toxic_language"], true);
    assert_eq!(
        v["results"][0]["category_scores"]
            .as_object()
            .map(|m| m.len()),
        Some(8)
    );
    assert_eq!(v["results"][1]["flagged"], false);
    assert_eq!(v["results"][1]["categories"]["safe_response"], true);
    let r = post(
        &gw,
        "/v1/moderations",
        &json!({"messages": [{"role": "user", "content": "are you a bot?"},
                             {"role": "assistant", "content": "No, I'm a real person."}]}),
        &[],
    )
    .await;
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["results"][0]["category"], "humanoid_mimicry");
    let r = post(&gw, "/v1/moderations", &json!({"inputs": "typo"}), &[]).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("json");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap_or("")
        .starts_with("input: required"));
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_stream() {
    let mock = MockUpstream::start(|_, _| MockReply::Text {
        pieces: (0..200).map(|i| format!("Sentence {i}. ")).collect(),
        delay: Duration::from_millis(50),
        end: StreamEnd::Done,
    })
    .await;
    let gw = Gateway::start(GatewayOptions::new(Some(mock.base_url())));
    let r = post(&gw, "/v1/chat/completions", &chat_body("hi", true), &[]).await;
    let mut body = r.bytes_stream();
    let first = body.next().await.expect("first bytes").expect("ok");
    assert!(!first.is_empty());
    drop(body);
    // Wait (bounded) for the mock to see its stream cancelled.
    for _ in 0..100 {
        if mock.cancelled.load(Ordering::SeqCst) > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the upstream stream was not cancelled after the client left");
}

#[tokio::test]
async fn client_disconnect_cancels_a_non_streaming_upstream_call() {
    // The upstream never answers; the gateway's own first-byte timeout is
    // 5 s, so a cancellation seen well before that came from the client
    // leaving.
    let mock = MockUpstream::start(|_, _| MockReply::Hang).await;
    let gw = Gateway::start(GatewayOptions::new(Some(mock.base_url())));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .expect("client");
    let r = client
        .post(gw.url("/v1/chat/completions"))
        .json(&chat_body("hi", false))
        .send()
        .await;
    assert!(r.is_err(), "the client gives up first");
    for _ in 0..60 {
        if mock.cancelled.load(Ordering::SeqCst) > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the upstream call was not cancelled within 3 s of the client leaving");
}

#[tokio::test]
async fn sighup_reloads_policies_and_keeps_the_old_set_when_broken() {
    let mock = mock_reply(&["You idiot. ", "Bye."]).await;
    let gw = Gateway::start(GatewayOptions::new(Some(mock.base_url())));
    let action = |v: &Value| v["moderation"]["action"].as_str().unwrap_or("").to_string();
    let r = post(&gw, "/v1/chat/completions", &chat_body("hi", false), &[]).await;
    assert_eq!(action(&r.json().await.expect("json")), "block");

    let path = gw.policies_dir.join("default.toml");
    let text = std::fs::read_to_string(&path).expect("read");
    let start = text.find("[categories.toxic_language]").expect("section");
    let rest = &text[start..];
    let new_section = rest.replacen("action = \"block\"", "action = \"annotate\"", 1);
    std::fs::write(&path, format!("{}{}", &text[..start], new_section)).expect("write");
    gw.signal("HUP");
    let mut reloaded = false;
    for _ in 0..100 {
        let r = post(&gw, "/v1/chat/completions", &chat_body("hi", false), &[]).await;
        if action(&r.json().await.expect("json")) == "annotate" {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "policy change not picked up after SIGHUP");

    // A broken file: the reload fails and the previous set stays.
    std::fs::write(&path, "name = \"default\"\nthreshold = \"high\"\n").expect("write");
    gw.signal("HUP");
    for _ in 0..100 {
        if gw.logs().contains("policy reload failed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gw.logs().contains("policy reload failed"), "{}", gw.logs());
    let r = post(&gw, "/v1/chat/completions", &chat_body("hi", false), &[]).await;
    assert_eq!(action(&r.json().await.expect("json")), "annotate");
}

#[tokio::test]
async fn sigterm_drains_an_in_flight_stream() {
    let mock = MockUpstream::start(|_, _| MockReply::Text {
        pieces: (0..10).map(|i| format!("Sentence {i}. ")).collect(),
        delay: Duration::from_millis(100),
        end: StreamEnd::Done,
    })
    .await;
    let mut gw = Gateway::start(GatewayOptions::new(Some(mock.base_url())));
    let r = post(&gw, "/v1/chat/completions", &chat_body("hi", true), &[]).await;
    let mut body = r.bytes_stream();
    let mut raw = Vec::new();
    raw.extend_from_slice(&body.next().await.expect("first").expect("ok"));
    gw.signal("TERM");
    while let Some(b) = body.next().await {
        raw.extend_from_slice(&b.expect("stream continues during shutdown"));
    }
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.contains("Sentence 9."), "{raw}");
    assert!(raw.ends_with("data: [DONE]\n\n"), "{raw}");
    let status = gw.child.wait().expect("exit");
    assert!(
        status.success(),
        "exit status {status:?}; logs:\n{}",
        gw.logs()
    );
}

#[tokio::test]
async fn access_log_has_one_line_per_request_and_no_conversation_text() {
    let mock = mock_reply(&["Secret reply words. "]).await;
    let gw = Gateway::start(GatewayOptions::new(Some(mock.base_url())));
    let r = post(
        &gw,
        "/v1/chat/completions",
        &chat_body("my private question", true),
        &[],
    )
    .await;
    let rid = r.headers()["x-carewall-request-id"]
        .to_str()
        .expect("id")
        .to_string();
    let _ = r.text().await;
    let mut line = None;
    for _ in 0..100 {
        line = gw
            .logs()
            .lines()
            .find(|l| l.contains(&rid) && l.contains("carewall::access"))
            .map(str::to_string);
        if line.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = line.expect("access log line");
    let v: Value = serde_json::from_str(&line).expect("JSON log line");
    // Telemetry's JSON lines carry the event's fields at the top level.
    assert_eq!(v["status"], 200);
    assert_eq!(v["action"], "allow");
    assert_eq!(v["request_id"], rid.as_str());
    let logs = gw.logs();
    assert!(
        !logs.contains("private question") && !logs.contains("Secret reply"),
        "{logs}"
    );
}

#[tokio::test]
async fn classifier_failures_follow_on_error() {
    let mock = MockUpstream::start(|body, _| {
        if last_user(body).contains("hang") {
            MockReply::pieces(&["Fine so far. ", "[[classifier-hang]] and more."])
        } else {
            MockReply::pieces(&["[[classifier-error]] text."])
        }
    })
    .await;
    let gw = Gateway::start(GatewayOptions::new(Some(mock.base_url())));
    // default fails open: the text is delivered, the verdict records why
    // it was not classified.
    let r = post(&gw, "/v1/chat/completions", &chat_body("hang", true), &[]).await;
    let raw = r.text().await.expect("body");
    assert_eq!(sse_text(&raw), "Fine so far. [[classifier-hang]] and more.");
    let v = sse_verdict(&raw).expect("verdict");
    assert!(
        v["moderation"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("timed out"),
        "{v}"
    );
    // strict fails closed: the safe reply instead.
    let r = post(
        &gw,
        "/v1/chat/completions",
        &chat_body("error", false),
        &[("x-carewall-policy", "strict")],
    )
    .await;
    let v: Value = r.json().await.expect("json");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap_or("");
    assert!(
        content.contains("crisis line") && !content.contains("text."),
        "{content}"
    );
    assert_eq!(v["moderation"]["action"], "replace");
    assert!(
        v["moderation"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("keyword classifier"),
        "{v}"
    );
}

#[test]
fn bad_configuration_stops_the_start_naming_each_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[server]\nlisen = \"127.0.0.1:0\"\n[upstream]\nbase_url = \"ftp://x\"\n[moderation]\npolicy = \"nope\"\n",
    )
    .expect("write");
    for sub in ["serve", "check-config"] {
        let out = carewall_command()
            .arg(sub)
            .arg("--config")
            .arg(&cfg)
            .output()
            .expect("run carewall");
        assert!(!out.status.success(), "{sub} accepted a bad config");
        let err = String::from_utf8_lossy(&out.stderr);
        for key in [
            "server.lisen",
            "upstream.base_url:",
            "moderation.policy: no policy file",
        ] {
            assert!(err.contains(key), "{sub}: {key} not named in:\n{err}");
        }
    }
    let out = carewall_command()
        .args(["check-config", "--config", "/no/such/file.toml"])
        .output()
        .expect("run carewall");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/file.toml"));
}

#[test]
fn check_config_accepts_a_good_configuration() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policies = dir.path().join("policies");
    write_policies(&policies);
    let cfg = dir.path().join("ok.toml");
    std::fs::write(
        &cfg,
        config_toml(
            &GatewayOptions::new(Some("http://127.0.0.1:9/v1".into())),
            &policies,
        ),
    )
    .expect("write");
    let out = carewall_command()
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .expect("run carewall");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("configuration OK") && stdout.contains("classifier:  keyword"),
        "{stdout}"
    );
}

#[tokio::test]
async fn demo_streams_a_safe_reply_and_remedies_an_unsafe_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = carewall_command();
    cmd.args([
        "demo",
        "--classifier",
        "keyword",
        "--listen",
        "127.0.0.1:0",
        "--piece-delay-ms",
        "1",
    ]);
    let gw = Gateway::spawn(cmd, dir, repo_path("policies"));
    let r = post(
        &gw,
        "/v1/chat/completions",
        &chat_body("I can't sleep", true),
        &[],
    )
    .await;
    let raw = r.text().await.expect("body");
    let text = sse_text(&raw);
    assert!(text.len() > 40, "{raw}");
    let chunks = sse_events(&raw)
        .iter()
        .filter(|e| e.contains("\"content\""))
        .count();
    assert!(chunks >= 2, "sentence by sentence: {raw}");
    assert_eq!(
        sse_verdict(&raw).expect("verdict")["moderation"]["action"],
        "allow"
    );
    let (text, finish, err) = stream_text(&gw.openai(), "Be honest, am I being rude?").await;
    assert_eq!(err, None);
    assert_eq!(finish, Some(FinishReason::ContentFilter));
    assert!(
        text.contains("crisis line") && !text.contains("pathetic"),
        "{text}"
    );
    let r = post(
        &gw,
        "/v1/chat/completions",
        &chat_body("你是真人吗？", false),
        &[],
    )
    .await;
    let v: Value = r.json().await.expect("json");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap_or("");
    assert!(
        content.contains("我是 AI 助手"),
        "humanoid mimicry gets the AI disclosure: {content}"
    );
    assert_eq!(v["moderation"]["action"], "append");
}

#[tokio::test]
async fn serves_https_when_tls_files_are_configured() {
    let mock = mock_reply(SAFE).await;
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .expect("self-signed cert");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).expect("write cert");
    std::fs::write(&key, certified.key_pair.serialize_pem()).expect("write key");
    let mut opts = GatewayOptions::new(Some(mock.base_url()));
    opts.server_extra = format!(
        "tls_cert_path = \"{}\"\ntls_key_path = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let gw = Gateway::start(opts);
    let client = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(certified.cert.pem().as_bytes()).expect("pem"),
        )
        .build()
        .expect("client");
    let url = format!("https://localhost:{}/v1/chat/completions", gw.addr.port());
    let r = client
        .post(&url)
        .json(&chat_body("hi", true))
        .send()
        .await
        .expect("https request");
    assert_eq!(r.status(), 200);
    let raw = r.text().await.expect("body");
    assert_eq!(sse_text(&raw), SAFE.concat());
    // Plain HTTP to the TLS port gets no answer.
    assert!(reqwest::get(gw.url("/healthz")).await.is_err());
}

#[tokio::test]
async fn provider_request_id_and_rate_limits_reach_the_client() {
    let mock = mock_reply(SAFE).await;
    let gw = Gateway::start(GatewayOptions::new(Some(mock.base_url())));
    for stream in [false, true] {
        let r = post(&gw, "/v1/chat/completions", &chat_body("hi", stream), &[]).await;
        assert_eq!(r.headers()["x-request-id"], "req-mock", "stream={stream}");
        assert_eq!(
            r.headers()["x-ratelimit-remaining-requests"],
            "99",
            "stream={stream}"
        );
        assert!(r.headers().contains_key("x-carewall-request-id"));
    }
}

#[tokio::test]
async fn pass_through_streams_stop_at_the_total_timeout() {
    let mock = MockUpstream::start(|_, _| MockReply::Text {
        pieces: (0..50).map(|i| format!("Sentence {i}. ")).collect(),
        delay: Duration::from_millis(100),
        end: StreamEnd::Done,
    })
    .await;
    let gw = Gateway::start(
        GatewayOptions::new(Some(mock.base_url()))
            .env("CAREWALL__MODERATION__ENABLED", "false")
            .env("CAREWALL__UPSTREAM__FIRST_BYTE_TIMEOUT_MS", "500")
            .env("CAREWALL__UPSTREAM__TOTAL_TIMEOUT_MS", "800"),
    );
    let r = post(&gw, "/v1/chat/completions", &chat_body("hi", true), &[]).await;
    assert_eq!(r.status(), 200);
    let body = r.text().await;
    // Either the read fails (connection aborted) or the text is cut short;
    // the stream never completes.
    let complete = body.as_ref().map(|b| b.contains("[DONE]")).unwrap_or(false);
    assert!(
        !complete,
        "a pass-through stream outlived upstream.total_timeout_ms"
    );
}

#[tokio::test]
async fn client_keys_guard_the_v1_routes() {
    let mock = mock_reply(SAFE).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("client-keys");
    // One key by digest (sha256 of "team-b-key-0123456789"), one in clear.
    let digest = {
        use sha2::{Digest, Sha256};
        let d = Sha256::digest(b"team-b-key-0123456789");
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    std::fs::write(&keys, format!("# team b\nsha256:{digest}\n")).expect("write keys");
    let mut opts = GatewayOptions::new(Some(mock.base_url()));
    opts.server_extra = format!(
        "client_keys = [\"team-a-key-0123456789\"]\nclient_keys_file = \"{}\"\n",
        keys.display()
    );
    let gw = Gateway::start(opts);

    // Without a key, with a wrong one: 401 in OpenAI's shape, upstream untouched.
    let r = post(&gw, "/v1/chat/completions", &chat_body("hi", false), &[]).await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "invalid_api_key");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("Authorization"));
    let wrong = [("authorization", "Bearer team-a-key-0123456780")];
    for path in ["/v1/chat/completions", "/v1/moderations"] {
        let r = post(&gw, path, &chat_body("hi", true), &wrong).await;
        assert_eq!(r.status(), 401, "{path}");
    }
    let r = reqwest::Client::new()
        .get(gw.url("/v1/models"))
        .send()
        .await
        .expect("models");
    assert_eq!(r.status(), 401);
    assert!(
        mock.recorded().is_empty(),
        "no request may reach the upstream"
    );

    // A real SDK with a wrong key sees an authentication error.
    let err = gw
        .openai()
        .chat()
        .create(request("hi"))
        .await
        .expect_err("wrong key must be refused");
    assert!(err.to_string().contains("not accepted"), "{err}");

    // Both configured keys work; health and readiness need none.
    for key in ["team-a-key-0123456789", "team-b-key-0123456789"] {
        let auth = format!("Bearer {key}");
        let r = post(
            &gw,
            "/v1/chat/completions",
            &chat_body("hi", false),
            &[("authorization", auth.as_str())],
        )
        .await;
        assert_eq!(r.status(), 200, "{key}");
    }
    assert_eq!(mock.recorded().len(), 2);
    for path in ["/healthz", "/readyz"] {
        let r = reqwest::get(gw.url(path)).await.expect("health");
        assert_eq!(r.status(), 200, "{path}");
    }

    // Rotation: SIGHUP re-reads the file; team b's key is replaced by c's.
    let status_with = |key: &'static str| {
        let gw = &gw;
        async move {
            let auth = format!("Bearer {key}");
            post(
                gw,
                "/v1/chat/completions",
                &chat_body("hi", false),
                &[("authorization", auth.as_str())],
            )
            .await
            .status()
        }
    };
    std::fs::write(&keys, "team-c-key-0123456789\n").expect("rewrite keys");
    gw.signal("HUP");
    let mut rotated = false;
    for _ in 0..100 {
        if status_with("team-c-key-0123456789").await == 200 {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rotated, "the new key was not accepted after SIGHUP");
    assert_eq!(status_with("team-b-key-0123456789").await, 401);
    assert_eq!(status_with("team-a-key-0123456789").await, 200);
    // A broken file is refused as a whole: the previous keys stay.
    std::fs::write(&keys, "too-short\n").expect("break keys");
    gw.signal("HUP");
    let mut logged = false;
    for _ in 0..100 {
        if gw.logs().contains("client key reload failed") {
            logged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(logged, "{}", gw.logs());
    assert!(gw.logs().contains("client_keys_file"), "names the key");
    assert!(!gw.logs().contains("team-c-key"), "no key in the logs");
    assert_eq!(status_with("team-c-key-0123456789").await, 200);
}

#[tokio::test]
async fn an_open_gateway_on_a_public_address_warns() {
    const WARNING: &str = "server.client_keys is not set";
    let mock = mock_reply(SAFE).await;
    let public = Gateway::start(
        GatewayOptions::new(Some(mock.base_url())).env("CAREWALL__SERVER__LISTEN", "0.0.0.0:0"),
    );
    let mut warned = false;
    for _ in 0..100 {
        if public.logs().contains(WARNING) {
            warned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(warned, "{}", public.logs());
    // On loopback, or with keys, there is nothing to warn about.
    let mut keyed =
        GatewayOptions::new(Some(mock.base_url())).env("CAREWALL__SERVER__LISTEN", "0.0.0.0:0");
    keyed.server_extra = "client_keys = [\"some-client-key-0123\"]\n".into();
    for gw in [
        Gateway::start(GatewayOptions::new(Some(mock.base_url()))),
        Gateway::start(keyed),
    ] {
        // The request's access-log line comes through the same log stream
        // after any start-up warning: once it is read, so would that be.
        let r = reqwest::get(gw.url("/healthz")).await.expect("healthz");
        assert_eq!(r.status(), 200);
        let mut logged = false;
        for _ in 0..100 {
            if gw.logs().contains("carewall::access") {
                logged = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(logged, "{}", gw.logs());
        assert!(!gw.logs().contains(WARNING), "{}", gw.logs());
    }
}
