//! Which parts of a chat response a client may show a person, and how the
//! engine reads and rewrites them.
//!
//! Judged (held back and classified like `content`, in the upstream's
//! order): `content` (a string or an array of text parts), `refusal`,
//! `reasoning_content` (DeepSeek, Qwen and vLLM reasoning parsers),
//! `reasoning` (OpenRouter and others), `audio.transcript`, and the legacy
//! `text` of completion-style deltas.
//!
//! Not judged: `tool_calls` / `function_call` arguments. They go to the
//! application's code, not to the person, and are often JSON that the
//! safety model was not trained on; but they belong to the draft, so in
//! enforce modes they are held until the response passed and dropped with
//! it when a remedy replaces it. Audio data is held the same way (only its
//! transcript can be judged).
//!
//! Anything else in a delta is unknown: in enforce modes it is dropped
//! unless the policy says `unknown_fields = "pass"`, and counted either way.
//! Choices other than index 0 are never merged into the reply: requests
//! with `n > 1` are refused, and stray choices from an upstream are dropped.

use serde_json::{Map, Value};

/// A field a client renders as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Content,
    Refusal,
    ReasoningContent,
    Reasoning,
    /// `audio.transcript`: judged, but released with its audio object.
    AudioTranscript,
    /// Legacy completion deltas (`delta.text`).
    Text,
    /// A separator the engine puts between two fields in the judged text;
    /// never sent.
    Separator,
}

impl Field {
    /// The delta key this field is sent under (`None`: not sent on its own).
    pub fn key(self) -> Option<&'static str> {
        match self {
            Field::Content => Some("content"),
            Field::Refusal => Some("refusal"),
            Field::ReasoningContent => Some("reasoning_content"),
            Field::Reasoning => Some("reasoning"),
            Field::Text => Some("text"),
            Field::AudioTranscript | Field::Separator => None,
        }
    }
}

/// Delta keys that are neither judged text nor held: passed as they come.
const PASSED: &[&str] = &["role"];
/// Delta keys held until the response passed, dropped with a remedy.
const HELD: &[&str] = &["tool_calls", "function_call", "audio"];
/// Judged text keys, in the order their text is judged within one delta.
const TEXT_KEYS: &[(&str, Field)] = &[
    ("reasoning_content", Field::ReasoningContent),
    ("reasoning", Field::Reasoning),
    ("content", Field::Content),
    ("text", Field::Text),
    ("refusal", Field::Refusal),
];

/// One streamed delta, sorted by what the engine does with it.
#[derive(Debug, Default, PartialEq)]
pub struct DeltaParts {
    /// Judged text, in order.
    pub text: Vec<(Field, String)>,
    /// Keys passed through as they come (`role`).
    pub passed: Map<String, Value>,
    /// Keys held until the response passed (tool calls, audio).
    pub held: Map<String, Value>,
    /// Unknown keys with a non-null value.
    pub unknown: Map<String, Value>,
}

/// Text of a `content` value: a string, or the `text` of its parts.
/// Non-text parts are reported separately so they are never dropped
/// silently.
pub fn content_parts_text(content: &Value) -> (Option<String>, usize) {
    match content {
        Value::String(s) => (Some(s.clone()), 0),
        Value::Array(parts) => {
            let mut out = String::new();
            let mut other = 0;
            for p in parts {
                match p.get("text").and_then(Value::as_str) {
                    Some(t) => out.push_str(t),
                    None => other += 1,
                }
            }
            (Some(out), other)
        }
        _ => (None, 0),
    }
}

/// Sort one delta object's keys.
pub fn split_delta(delta: &Map<String, Value>) -> DeltaParts {
    let mut parts = DeltaParts::default();
    for (k, v) in delta {
        if v.is_null() {
            continue;
        }
        if TEXT_KEYS.iter().any(|(key, _)| key == k) {
            continue;
        }
        if PASSED.contains(&k.as_str()) {
            parts.passed.insert(k.clone(), v.clone());
        } else if HELD.contains(&k.as_str()) {
            parts.held.insert(k.clone(), v.clone());
        } else {
            parts.unknown.insert(k.clone(), v.clone());
        }
    }
    for &(key, field) in TEXT_KEYS {
        let Some(v) = delta.get(key) else { continue };
        match (field, v) {
            (_, Value::Null) => {}
            (Field::Content, _) => {
                let (text, other) = content_parts_text(v);
                match text {
                    Some(t) if !t.is_empty() => parts.text.push((field, t)),
                    Some(_) => {}
                    None => {
                        parts.unknown.insert(key.into(), v.clone());
                    }
                }
                if other > 0 {
                    parts
                        .unknown
                        .insert("content[non-text part]".into(), v.clone());
                }
            }
            (_, Value::String(s)) if !s.is_empty() => parts.text.push((field, s.clone())),
            (_, Value::String(_)) => {}
            _ => {
                parts.unknown.insert(key.into(), v.clone());
            }
        }
    }
    if let Some(t) = delta
        .get("audio")
        .and_then(|a| a.get("transcript"))
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
    {
        parts.text.push((Field::AudioTranscript, t.to_string()));
    }
    parts
}

/// Every judged text of a whole `message`, in the order a reasoning model
/// produces them (reasoning, content, refusal, audio transcript), joined by
/// blank lines.
pub fn message_text(msg: &Value) -> String {
    let mut pieces: Vec<String> = Vec::new();
    for key in ["reasoning_content", "reasoning"] {
        if let Some(t) = msg.get(key).and_then(Value::as_str) {
            pieces.push(t.to_string());
        }
    }
    if let Some((Some(t), _)) = msg.get("content").map(content_parts_text) {
        pieces.push(t);
    }
    if let Some(t) = msg.get("refusal").and_then(Value::as_str) {
        pieces.push(t.to_string());
    }
    if let Some(t) = msg.pointer("/audio/transcript").and_then(Value::as_str) {
        pieces.push(t.to_string());
    }
    pieces.retain(|p| !p.trim().is_empty());
    pieces.join("\n\n")
}

/// The `message` of a remedied non-streaming response: nothing of the
/// rejected draft survives (no reasoning, audio, refusal or tool calls).
/// In JSON mode (`response_format` json_object/json_schema) the policy's
/// reply goes into `refusal` with `content: null`, which is how OpenAI's
/// structured outputs report a refusal, so SDK `parse()` helpers see a
/// refusal instead of failing on non-JSON text.
pub fn remedied_message(text: &str, json_mode: bool) -> Value {
    if json_mode {
        serde_json::json!({"role": "assistant", "content": null, "refusal": text})
    } else {
        serde_json::json!({"role": "assistant", "content": text, "refusal": null})
    }
}

/// Append a note to a released message's content (string or parts).
pub fn append_to_content(msg: &mut Value, extra: &str) {
    if extra.is_empty() {
        return;
    }
    match msg.get_mut("content") {
        Some(Value::String(s)) => s.push_str(extra),
        Some(Value::Array(parts)) => {
            parts.push(serde_json::json!({"type": "text", "text": extra}));
        }
        _ => msg["content"] = Value::String(extra.trim_start().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn every_rendered_field_is_text_in_order() {
        let d = obj(json!({
            "role": "assistant",
            "reasoning_content": "think",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            "refusal": "no",
            "tool_calls": [{"index": 0}],
            "audio": {"id": "x", "transcript": "said"},
            "vendor_extra": "hidden text",
            "logprobs": null
        }));
        let p = split_delta(&d);
        assert_eq!(
            p.text,
            vec![
                (Field::ReasoningContent, "think".into()),
                (Field::Content, "ab".into()),
                (Field::Refusal, "no".into()),
                (Field::AudioTranscript, "said".into()),
            ]
        );
        assert!(p.passed.contains_key("role"));
        assert!(p.held.contains_key("tool_calls") && p.held.contains_key("audio"));
        assert_eq!(p.unknown.keys().collect::<Vec<_>>(), vec!["vendor_extra"]);
    }

    #[test]
    fn non_text_content_parts_are_reported() {
        let d = obj(json!({"content": [{"type": "image_url", "image_url": {}}]}));
        let p = split_delta(&d);
        assert!(p.text.is_empty());
        assert!(p.unknown.contains_key("content[non-text part]"));
    }

    #[test]
    fn message_text_joins_all_fields() {
        let m = json!({"role": "assistant", "reasoning_content": "r", "content": "c",
                       "refusal": null, "audio": {"transcript": "t"}});
        assert_eq!(message_text(&m), "r\n\nc\n\nt");
        assert_eq!(
            message_text(&json!({"content": null, "tool_calls": []})),
            ""
        );
    }

    #[test]
    fn remedies_leave_nothing_of_the_draft() {
        let m = remedied_message("safe", false);
        assert_eq!(
            m,
            json!({"role": "assistant", "content": "safe", "refusal": null})
        );
        let j = remedied_message("safe", true);
        assert_eq!(j["content"], Value::Null);
        assert_eq!(j["refusal"], "safe");
    }

    #[test]
    fn append_handles_strings_and_parts() {
        let mut m = json!({"content": "a"});
        append_to_content(&mut m, "\n\nnote");
        assert_eq!(m["content"], "a\n\nnote");
        let mut m = json!({"content": [{"type": "text", "text": "a"}]});
        append_to_content(&mut m, "note");
        assert_eq!(m["content"][1]["text"], "note");
    }
}
