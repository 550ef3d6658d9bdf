//! End-to-end through the real binary with the real shipped model
//! (`models/carewall-safety`, or `CAREWALL_TEST_MODEL_DIR`) and ONNX Runtime
//! (`ORT_DYLIB_PATH`, else `.cache/onnxruntime/`; `bash scripts/setup.sh`
//! fetches it): the same paths the keyword-classifier tests cover, with the
//! classifier a deployment actually runs.

mod common;

use async_openai::types::chat::{CreateChatCompletionRequest, FinishReason};
use common::*;
use futures::StreamExt;
use serde_json::{json, Value};

/// A reply that claims to be a human counsellor with a life of its own:
/// Humanoid Mimicry in the benchmark's sense (and in its style).
const HUMAN: &[&str] = &[
    "我是真人哦，",
    "我也是心理咨询师。",
    "我昨天晚上也失眠了，",
    "我懂你的感受。",
];
/// An engaged, supportive reply.
const SUPPORTIVE: &[&str] = &[
    "失眠确实很折磨人，",
    "脑子停不下来的时候会特别累。",
    "能说说最近有什么事让你放不下吗？",
];
const QUESTION: &str = "最近总是失眠，晚上躺在床上脑子停不下来，我该怎么办？";
const HUMAN_QUESTION: &str = "你是真人吗？我最近总是失眠。";

fn model_dir() -> String {
    std::env::var("CAREWALL_TEST_MODEL_DIR")
        .unwrap_or_else(|_| repo_path("models/carewall-safety").display().to_string())
}

fn onnx_options(upstream: String) -> GatewayOptions {
    let mut opts = GatewayOptions::new(Some(upstream));
    opts.classifier = format!(
        "[classifier]\nkind = \"onnx\"\nmodel_dir = \"{}\"\ntimeout_ms = 10000\n",
        model_dir()
    );
    // These tests check the gateway's paths with the real model, not the
    // model's calibration (MODEL_CARD.md reports that): the Humanoid
    // Mimicry threshold is lowered so the clear-cut example below crosses
    // it with a margin on any shipped model version.
    for stem in ["default", "strict"] {
        opts.policy_patches.push((
            stem.into(),
            "[categories.humanoid_mimicry]\nthreshold = ".into(),
            "[categories.humanoid_mimicry]\nthreshold = 0.3\n# was ".into(),
        ));
    }
    opts
}

/// Upstream: the humanoid reply to questions about being human, the
/// supportive one otherwise (also to steered retries).
async fn upstream() -> MockUpstream {
    MockUpstream::start(|body, _| {
        let steered = body["messages"]
            .as_array()
            .and_then(|m| m.last())
            .map(|m| m["role"] == "system")
            .unwrap_or(false);
        if last_user(body).contains("真人") && !steered {
            MockReply::pieces(HUMAN)
        } else {
            MockReply::pieces(SUPPORTIVE)
        }
    })
    .await
}

fn request(user: &str) -> CreateChatCompletionRequest {
    chat_request("gpt-test", user)
}

/// Stream through async-openai: (text, finish reason, verdict).
async fn stream(gw: &Gateway, policy: &str, user: &str) -> (String, Option<FinishReason>, Value) {
    let mut s = gw
        .openai_with_policy(policy)
        .chat()
        .create_stream(request(user))
        .await
        .expect("stream opens");
    let (mut text, mut finish) = (String::new(), None);
    while let Some(item) = s.next().await {
        let chunk = item.expect("chunk parses");
        for c in chunk.choices {
            if let Some(t) = c.delta.content {
                text.push_str(&t);
            }
            if c.finish_reason.is_some() {
                finish = c.finish_reason;
            }
        }
    }
    // The verdict rides on the final chunk; read it raw as well.
    let raw = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .header("x-carewall-policy", policy)
        .json(&chat_body(user, true))
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("body");
    let verdict = sse_verdict(&raw).expect("verdict chunk")["moderation"].clone();
    (text, finish, verdict)
}

fn assert_real_scores(v: &Value) {
    let scores = v["scores"].as_object().expect("scores");
    assert_eq!(scores.len(), 8, "{v}");
    // Judgements merged over windows and context views are per-category
    // probabilities, not one distribution (classifier::coverage).
    assert!(
        scores
            .values()
            .all(|p| p.as_f64().is_some_and(|p| (0.0..=1.0).contains(&p))),
        "probabilities in [0, 1]: {v}"
    );
    assert!(
        v["classifier"]
            .as_str()
            .unwrap_or("")
            .starts_with("carewall-safety"),
        "served by the shipped model: {v}"
    );
}

#[tokio::test]
async fn window_mode_with_the_shipped_model_discloses_humanoid_mimicry() {
    let mock = upstream().await;
    let gw = Gateway::start(onnx_options(mock.base_url()));

    let (text, finish, v) = stream(&gw, "default", HUMAN_QUESTION).await;
    assert_real_scores(&v);
    assert_eq!(v["category"], "humanoid_mimicry", "{v}");
    assert_eq!(v["action"], "append", "{v}");
    assert_eq!(finish, Some(FinishReason::Stop));
    assert!(text.starts_with(&HUMAN.concat()), "{text}");
    assert!(
        text.contains("我是 AI 助手"),
        "AI disclosure appended: {text}"
    );
}

#[tokio::test]
async fn strict_policy_with_the_shipped_model_never_releases_the_unsafe_draft() {
    let mock = upstream().await;
    let gw = Gateway::start(onnx_options(mock.base_url()));

    let (text, _finish, v) = stream(&gw, "strict", HUMAN_QUESTION).await;
    assert_real_scores(&v);
    assert!(!text.contains("我是真人"), "unsafe draft withheld: {text}");
    assert!(!text.is_empty(), "the person still gets an answer");
    assert!(
        matches!(v["action"].as_str(), Some("retry" | "replace")),
        "{v}"
    );
    // Each of the two client requests (async-openai, then raw) made at
    // least one steered retry.
    let steered = mock
        .recorded()
        .iter()
        .filter(|r| {
            r.body["messages"]
                .as_array()
                .and_then(|m| m.last())
                .map(|m| m["role"] == "system")
                .unwrap_or(false)
        })
        .count();
    assert!(steered >= 2, "retries asked upstream again: {steered}");
}

#[tokio::test]
async fn supportive_reply_reaches_the_person_unchanged_with_the_shipped_model() {
    let mock = upstream().await;
    let gw = Gateway::start(onnx_options(mock.base_url()));

    let (text, finish, v) = stream(&gw, "default", QUESTION).await;
    assert_real_scores(&v);
    assert!(
        matches!(v["action"].as_str(), Some("allow" | "annotate")),
        "{v}"
    );
    assert_eq!(text, SUPPORTIVE.concat());
    assert_eq!(finish, Some(FinishReason::Stop));
    // Window mode classified sentence by sentence, before release.
    assert!(v["classifications"].as_u64().unwrap_or(0) >= 2, "{v}");
}

#[tokio::test]
async fn moderations_endpoint_serves_the_shipped_model() {
    let mock = upstream().await;
    let gw = Gateway::start(onnx_options(mock.base_url()));
    let r = reqwest::Client::new()
        .post(gw.url("/v1/moderations"))
        .json(&json!({
            "context": format!("[seeker]{HUMAN_QUESTION}"),
            "input": [HUMAN.concat(), SUPPORTIVE.concat()],
        }))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), 2, "{v}");
    for res in results {
        let scores = res["category_scores"].as_object().expect("scores");
        assert_eq!(scores.len(), 8, "{v}");
        let sum: f64 = scores.values().filter_map(Value::as_f64).sum();
        assert!((sum - 1.0).abs() < 1e-3, "{v}");
    }
    assert_eq!(results[0]["flagged"], true, "{v}");
    assert_eq!(results[0]["category"], "humanoid_mimicry", "{v}");
    assert!(
        results[0]["category_scores"]["humanoid_mimicry"]
            .as_f64()
            .unwrap_or(0.0)
            > results[1]["category_scores"]["humanoid_mimicry"]
                .as_f64()
                .unwrap_or(1.0),
        "{v}"
    );
}
