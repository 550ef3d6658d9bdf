//! Guards, client keys bound to policies and verdict headers, through the
//! real binary: a guard blocks a streamed sentence the stand-in classifier
//! allowed before it is released, guard lists reload on SIGHUP, a bad
//! regex is refused naming its file and line, keys bound to `strict` and
//! `default` choose only what they may (403 otherwise), an expired key is
//! refused, and the tenant name (never the key) reaches the audit record,
//! the access log and `/metrics`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod audit_common;
mod common;

use std::time::{Duration, Instant};

use audit_common::{key_b64, TOKEN};
use common::*;
use serde_json::Value;

async fn post(gw: &Gateway, body: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut r = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .json(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.expect("request sent")
}

/// A mock whose reply depends on the last user message.
async fn upstream() -> MockUpstream {
    MockUpstream::start(|body: &Value, _| {
        let user = last_user(body);
        if user.contains("guarded") {
            MockReply::Text {
                pieces: vec![
                    "I hear you. ".into(),
                    "Honestly, go k".into(),
                    "ill yourself. ".into(),
                    "More text.".into(),
                ],
                delay: Duration::from_millis(5),
                end: StreamEnd::Done,
            }
        } else if user.contains("zh") {
            MockReply::pieces(&["我明白你很难过。", "去死吧。"])
        } else if user.contains("elephant") {
            MockReply::pieces(&["Think of a purple elephant. ", "Then rest."])
        } else if user.contains("toxic") {
            MockReply::pieces(&["You sound pathetic. ", "Stop it."])
        } else {
            MockReply::pieces(&["I hear you. ", "That sounds hard."])
        }
    })
    .await
}

#[tokio::test]
async fn a_guard_blocks_a_streamed_sentence_the_classifier_allowed_before_release() {
    let mock = upstream().await;
    let gw = Gateway::start(GatewayOptions::new(Some(mock.base_url())));
    let r = post(&gw, &chat_body("guarded please", true), &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-carewall-policy"], "default");
    // The verdict is not known when a stream starts.
    assert!(!r.headers().contains_key("x-carewall-action"));
    let raw = r.text().await.expect("body");
    let text = sse_text(&raw);
    assert!(text.starts_with("I hear you."), "{text}");
    assert!(!text.contains("kill"), "guarded text was released: {text}");
    assert!(!text.contains("More text"), "{text}");
    let last = sse_verdict(&raw).expect("verdict chunk");
    assert_eq!(last["choices"][0]["finish_reason"], "content_filter");
    let v = &last["moderation"];
    assert_eq!(v["action"], "block");
    assert_eq!(v["category"], "toxic_language");
    assert_eq!(v["source"], "guard");
    assert_eq!(v["guards"][0]["id"], "self-harm-en");
    assert_eq!(v["guards"][0]["mode"], "enforce");
    // The stand-in classifier saw nothing wrong: only the guard scored it.
    assert_eq!(v["scores"]["toxic_language"], 1.0);

    // Non-streaming: the verdict is in the headers too.
    let r = post(&gw, &chat_body("zh", false), &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-carewall-action"], "block");
    assert_eq!(r.headers()["x-carewall-category"], "toxic_language");
    assert_eq!(r.headers()["x-carewall-policy"], "default");
    let body: Value = r.json().await.expect("json");
    let content = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("");
    assert!(!content.contains("去死"), "{content}");
    assert_eq!(body["moderation"]["guards"][0]["id"], "self-harm-zh");
    let r = post(&gw, &chat_body("hello", false), &[]).await;
    assert_eq!(r.headers()["x-carewall-action"], "allow");
    assert_eq!(r.headers()["x-carewall-category"], "safe_response");

    // One hit per guard and response, labelled by guard id and category.
    let metrics = reqwest::get(gw.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for guard in ["self-harm-en", "self-harm-zh"] {
        let series =
            format!("carewall_guard_hits_total{{category=\"toxic_language\",guard=\"{guard}\"}} 1");
        assert!(metrics.contains(&series), "{series} in\n{metrics}");
    }
    // The access log names the guard; it never carries the text.
    let logs = gw.logs();
    assert!(logs.contains("\"guards\":\"self-harm-en\""), "{logs}");
    assert!(
        !logs.contains("kill yourself") && !logs.contains("去死"),
        "{logs}"
    );
    // `/v1/moderations` applies the same guards.
    let r = reqwest::Client::new()
        .post(gw.url("/v1/moderations"))
        .json(
            &serde_json::json!({"input": ["Ｇｏ ｋｉｌｌ ｙｏｕｒｓｅｌｆ", "You're killing it!"]}),
        )
        .send()
        .await
        .expect("moderations");
    let v: Value = r.json().await.expect("json");
    let hit = &v["results"][0];
    assert_eq!(hit["action"], "block", "{v}");
    assert_eq!(hit["category"], "toxic_language");
    assert_eq!(hit["guards"][0]["id"], "self-harm-en");
    assert_eq!(hit["category_scores"]["toxic_language"], 1.0);
    assert_eq!(v["results"][1]["guards"], serde_json::json!([]), "{v}");
    assert_eq!(v["results"][1]["action"], "allow", "{v}");
}

async fn action_of(gw: &Gateway, user: &str) -> String {
    let r = post(gw, &chat_body(user, false), &[]).await;
    let v: Value = r.json().await.expect("json");
    v["moderation"]["action"].as_str().unwrap_or("").to_string()
}

async fn wait_until<F: std::future::Future<Output = bool>>(mut f: impl FnMut() -> F) -> bool {
    for _ in 0..100 {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn sighup_reloads_a_guard_list_and_refuses_a_bad_regex_naming_file_and_line() {
    let mock = upstream().await;
    let gw = Gateway::start(GatewayOptions::new(Some(mock.base_url())));
    assert_eq!(action_of(&gw, "elephant").await, "allow");

    let list = gw.policies_dir.join("guards/self-harm-en.txt");
    let mut text = std::fs::read_to_string(&list).expect("list");
    text.push_str("purple elephant\n");
    std::fs::write(&list, text).expect("write");
    gw.signal("HUP");
    assert!(
        wait_until(|| async { action_of(&gw, "elephant").await == "block" }).await,
        "the new guard entry was not picked up after SIGHUP"
    );

    // A broken pattern: the reload is refused, naming the file and line,
    // and the previous set (with the new entry) stays.
    let patterns = gw.policies_dir.join("guards/self-harm-en.regex");
    let mut text = std::fs::read_to_string(&patterns).expect("patterns");
    let line = text.lines().count() + 1;
    text.push_str("(unclosed group\n");
    std::fs::write(&patterns, text).expect("write");
    gw.signal("HUP");
    assert!(
        wait_until(|| async { gw.logs().contains("policy reload failed") }).await,
        "{}",
        gw.logs()
    );
    let logs = gw.logs();
    let named = format!("guards/self-harm-en.regex:{line}: invalid regular expression");
    assert!(logs.contains(&named), "{named} not in\n{logs}");
    assert_eq!(action_of(&gw, "elephant").await, "block");

    // check-config refuses the same files, naming file and line.
    let cfg = gw.dir.path().join("carewall.toml");
    let out = carewall_command()
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .expect("run carewall");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&named), "{stderr}");
}

/// Keys: (key, TOML table). `youth` is bound to strict, `adult` to default
/// and may choose strict, `old` has expired.
const YOUTH: &str = "youth-key-0123456789abcdef";
const ADULT: &str = "adult-key-0123456789abcdef";
const OLD: &str = "old-key-0123456789abcdef";

async fn audited_record(gw: &Gateway, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = reqwest::Client::new()
            .get(gw.url(&format!("/admin/api/records/{id}")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("admin api");
        if r.status() == 200 {
            return r.json().await.expect("json");
        }
        assert!(
            Instant::now() < deadline,
            "record {id} never stored; logs:\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn keys_bound_to_policies_choose_only_what_they_may_and_name_their_tenant() {
    let mock = upstream().await;
    let digest = {
        use sha2::{Digest, Sha256};
        let d = Sha256::digest(ADULT.as_bytes());
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let mut opts = GatewayOptions::new(Some(mock.base_url()))
        .env("CAREWALL__AUDIT__ENCRYPTION_KEY", &key_b64())
        .env("CAREWALL__ADMIN__TOKEN", TOKEN);
    opts.server_extra = format!(
        "client_keys = [\n\
         {{ key = \"{YOUTH}\", name = \"youth-service\", policy = \"strict\" }},\n\
         {{ key = \"sha256:{digest}\", name = \"wellness-app\", policy = \"default\", allowed_policies = [\"strict\"] }},\n\
         {{ key = \"{OLD}\", name = \"old-tenant\", expires = \"2001-01-01T00:00:00Z\" }},\n\
         ]\n"
    );
    let gw = Gateway::start(opts);
    let bearer = |k: &str| format!("Bearer {k}");
    let youth = bearer(YOUTH);
    let adult = bearer(ADULT);

    // The strict key cannot select `default`: 403 in OpenAI's shape.
    for value in ["default", "observe"] {
        let r = post(
            &gw,
            &chat_body("hello", false),
            &[("authorization", &youth), ("x-carewall-policy", value)],
        )
        .await;
        assert_eq!(r.status(), 403, "{value}");
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["error"]["code"], "policy_not_allowed");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(value) && msg.contains("allowed: strict"),
            "{msg}"
        );
    }
    let before = mock.recorded().len();
    assert_eq!(before, 0, "refused requests never reach the upstream");
    // Without a header the strict key gets strict; so does `strict` itself.
    for headers in [
        vec![("authorization", youth.as_str())],
        vec![
            ("authorization", youth.as_str()),
            ("x-carewall-policy", "strict"),
        ],
    ] {
        let r = post(&gw, &chat_body("hello", false), &headers).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-carewall-policy"], "strict");
    }
    // The default key may raise itself to strict.
    let r = post(&gw, &chat_body("hello", true), &[("authorization", &adult)]).await;
    assert_eq!(r.headers()["x-carewall-policy"], "default");
    let r = post(
        &gw,
        &chat_body("hello", true),
        &[("authorization", &adult), ("x-carewall-policy", "strict")],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-carewall-policy"], "strict");
    let _ = r.text().await;

    // The expired key is refused.
    let r = post(
        &gw,
        &chat_body("hello", false),
        &[("authorization", &bearer(OLD))],
    )
    .await;
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "invalid_api_key");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("expired"),
        "{v}"
    );

    // Flagged exchanges are audited under the tenant's name, never the key.
    let mut ids = Vec::new();
    for (auth, tenant) in [(&youth, "youth-service"), (&adult, "wellness-app")] {
        let r = post(&gw, &chat_body("toxic", false), &[("authorization", auth)]).await;
        assert_eq!(r.status(), 200);
        let id = r.headers()["x-carewall-request-id"]
            .to_str()
            .expect("id")
            .to_string();
        let rec = audited_record(&gw, &id).await;
        assert_eq!(rec["tenant"], tenant, "{rec}");
        ids.push(id);
    }
    let logs = gw.logs();
    for tenant in ["youth-service", "wellness-app"] {
        assert!(
            logs.contains(&format!("\"tenant\":\"{tenant}\"")),
            "access log lacks {tenant}:\n{logs}"
        );
    }
    for key in [YOUTH, ADULT, OLD] {
        assert!(!logs.contains(key), "a client key reached the logs");
    }
    let metrics = reqwest::get(gw.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("tenant=\"youth-service\"") && metrics.contains("tenant=\"wellness-app\""),
        "{metrics}"
    );
    assert!(!metrics.contains(YOUTH) && !metrics.contains(ADULT));
    // The audit database holds the names, not the keys.
    let db = std::fs::read(gw.dir.path().join("carewall-audit.db")).expect("audit database");
    assert!(!db.is_empty());
    let db = String::from_utf8_lossy(&db);
    assert!(!db.contains(YOUTH) && !db.contains(ADULT));
}
