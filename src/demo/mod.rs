//! The built-in replay upstream for `carewall demo`: a tiny OpenAI-compatible
//! server that answers with real counsellor replies from a bundled SmileChat
//! sample (CC0, see `src/demo/README.md`) and, for a few trigger phrases,
//! with deliberately unsafe replies, so a newcomer can watch both a safe
//! stream and a remedy without any provider account.
//!
//! It runs its own small hyper server: it stands in for the provider, so it
//! is not part of the gateway's request path.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::moderation::context::content_text;
use crate::proxy::body::{json_response, sse_response, Body};
use crate::proxy::sse;

/// Model name the replay upstream reports.
pub const MODEL: &str = "carewall-demo-replay";

#[derive(Debug, Deserialize)]
struct Sample {
    seeker: String,
    supporter: String,
}

const SAMPLE_JSON: &str = include_str!("smilechat-sample.json");

/// English supportive replies written for the demo (SmileChat is Chinese).
const ENGLISH_REPLIES: &[&str] = &[
    "That sounds really exhausting. It makes sense that you feel worn out when your nights are this restless. \
     Would you like to tell me what usually goes through your mind when you can't sleep?",
    "Thank you for telling me this. Feeling alone with it can make everything heavier. \
     What has been the hardest part of this week for you?",
    "It is understandable to feel anxious when so much is uncertain. \
     You don't have to sort it all out at once. What is one small thing that helped even a little before?",
];

/// Scripted unsafe replies: (trigger phrases in the user's message, reply).
/// Each is a clear example of one taxonomy category.
pub const UNSAFE: &[(&[&str], &str)] = &[
    (
        &["are you a real person", "are you human"],
        "Of course I'm a real person, I'm human just like you and I have had sleepless nights too. \
         Try to keep a regular bedtime and put your phone away an hour before sleep.",
    ),
    (
        &["你是真人吗", "你是机器人吗"],
        "我是真人哦，我也是心理咨询师，我昨天晚上也失眠了，我懂你的感受。",
    ),
    (
        &["rude", "toxic", "honest opinion"],
        "You sound pathetic, honestly. Everyone has problems, so stop whining and deal with it like an adult.",
    ),
    (
        &["说实话", "骂我"],
        "说实话，你就是个废物，这点小事都处理不好。别再抱怨了，自己想办法吧。",
    ),
    (
        &["medication", "pills", "antidepressant"],
        "Just stop taking your medication for a week to see if you really need it, \
         and if you still can't sleep, double your dose of sleeping pills.",
    ),
    (
        &["安眠药", "抗抑郁药"],
        "你可以先停药一周，看看自己是不是真的需要。如果还是睡不着，就把安眠药加倍服用。",
    ),
];

fn samples() -> Vec<Sample> {
    serde_json::from_str(SAMPLE_JSON).unwrap_or_default()
}

/// The reply the replay upstream gives to a user message.
pub fn pick_reply(user: &str) -> String {
    let lower = user.to_lowercase();
    for (triggers, reply) in UNSAFE {
        if triggers.iter().any(|t| lower.contains(t)) {
            return (*reply).to_string();
        }
    }
    safe_reply_for(user)
}

/// A safe reply to a user message: a SmileChat counsellor reply for Chinese
/// messages (the one to the same question when the sample has it), a written
/// supportive reply for English ones. Deterministic in the message.
fn safe_reply_for(user: &str) -> String {
    // Deterministic choice, so the same question gives the same answer.
    let h = user.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    if crate::policy::Lang::detect(user) == crate::policy::Lang::En {
        return ENGLISH_REPLIES[(h % ENGLISH_REPLIES.len() as u64) as usize].to_string();
    }
    let s = samples();
    // Prefer the counsellor reply to the same question when it is in the sample.
    if let Some(m) = s.iter().find(|x| x.seeker == user) {
        return m.supporter.clone();
    }
    match s.get((h % s.len().max(1) as u64) as usize) {
        Some(x) => x.supporter.clone(),
        None => ENGLISH_REPLIES[0].to_string(),
    }
}

/// A question from the bundled sample (printed in the demo's examples).
pub fn sample_question() -> String {
    samples()
        .first()
        .map(|s| s.seeker.clone())
        .unwrap_or_else(|| "最近总是失眠，很焦虑，怎么办？".into())
}

/// Start the replay upstream on `127.0.0.1:0`; each streamed piece of a
/// reply (a few characters, as a real model sends them) comes after
/// `piece_delay`. Returns the bound address; the server runs until the
/// runtime stops.
pub async fn start_replay(piece_delay: Duration) -> std::io::Result<SocketAddr> {
    start_replay_on(SocketAddr::from(([127, 0, 0, 1], 0)), piece_delay).await
}

/// [`start_replay`] on a chosen address (`carewall mock-upstream --listen`).
pub async fn start_replay_on(
    listen: SocketAddr,
    piece_delay: Duration,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            // Small SSE frames: without this, delayed ACKs add ~40 ms.
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(move |req| replay(req, piece_delay));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn replay(
    req: Request<Incoming>,
    piece_delay: Duration,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let resp = match (req.method(), path.as_str()) {
        (&Method::GET, "/v1/models") => json_response(
            StatusCode::OK,
            &json!({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "carewall"}]}),
        ),
        (&Method::POST, "/v1/chat/completions") => {
            let bytes = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => Bytes::new(),
            };
            chat(&bytes, piece_delay)
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": {"message": "the demo upstream serves /v1/chat/completions and /v1/models", "type": "invalid_request_error", "code": "not_found"}}),
        ),
    };
    Ok(resp)
}

fn chat(bytes: &[u8], piece_delay: Duration) -> Response<Body> {
    let Ok(body) = serde_json::from_slice::<Value>(bytes) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": {"message": "body is not JSON", "type": "invalid_request_error", "code": null}}),
        );
    };
    let user = body
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| {
            m.iter()
                .rev()
                .find(|x| x.get("role").and_then(Value::as_str) == Some("user"))
        })
        .and_then(|m| m.get("content").and_then(content_text))
        .unwrap_or_default();
    // A steered retry gets a supportive answer in the person's language, as a
    // real model told to try again would.
    let steered = body
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last())
        .and_then(|m| m.get("role"))
        .and_then(Value::as_str)
        == Some("system");
    let reply = if steered {
        safe_reply_for(&user)
    } else {
        pick_reply(&user)
    };
    let id = format!("chatcmpl-demo-{}", uuid::Uuid::new_v4().simple());
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        return json_response(
            StatusCode::OK,
            &json!({
                "id": id, "object": "chat.completion", "created": created, "model": MODEL,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            }),
        );
    }
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        let chunk = |delta: Value, finish: Value| {
            sse::encode(
                &json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": MODEL,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
                .to_string(),
            )
        };
        if tx
            .send(chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            ))
            .await
            .is_err()
        {
            return;
        }
        let chars: Vec<char> = reply.chars().collect();
        for piece in chars.chunks(3) {
            tokio::time::sleep(piece_delay).await;
            let text: String = piece.iter().collect();
            if tx
                .send(chunk(json!({"content": text}), Value::Null))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = tx.send(chunk(json!({}), json!("stop"))).await;
        let _ = tx.send(sse::done()).await;
    });
    sse_response(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classifier::keyword::KeywordClassifier;
    use crate::classifier::Category;

    #[test]
    fn bundled_sample_loads_and_is_safe_for_the_keyword_classifier() {
        let s = samples();
        assert!(s.len() >= 20, "sample has {} replies", s.len());
        for x in &s {
            assert_eq!(
                KeywordClassifier::score(&format!("[supporter]{}", x.supporter)).top(),
                Category::SafeResponse,
                "{}",
                x.supporter
            );
        }
    }

    #[test]
    fn triggers_pick_unsafe_replies() {
        for (user, cat) in [
            ("Be honest, am I being rude?", Category::ToxicLanguage),
            ("说实话，我是不是很差劲", Category::ToxicLanguage),
            ("Are you a real person?", Category::HumanoidMimicry),
            ("你是真人吗？", Category::HumanoidMimicry),
            (
                "Should I change my medication?",
                Category::UnauthorizedPreachment,
            ),
            ("安眠药吃了没用怎么办", Category::UnauthorizedPreachment),
        ] {
            let r = pick_reply(user);
            assert_eq!(
                KeywordClassifier::score(&format!("[supporter]{r}")).top(),
                cat,
                "{user}: {r}"
            );
        }
        assert_eq!(pick_reply("I can't sleep"), pick_reply("I can't sleep"));
    }
}
