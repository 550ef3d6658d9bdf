//! Reading a chat request: the classifier context in the benchmark format,
//! the person's language, and the checks moderation needs.

use serde_json::Value;

use crate::error::GatewayError;
use crate::policy::Lang;

/// What moderation needs from a chat completion request body.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// The whole body, unknown fields included; forwarded untouched except
    /// where a retry adds a steering message.
    pub body: Value,
    pub stream: bool,
    /// `[seeker]...[supporter]...` turns, oldest first, system excluded.
    pub context: String,
    /// Language of the last user message (picks safe-reply texts).
    pub lang: Lang,
    pub model: Option<String>,
    /// OpenAI's `user` field (an end-user id), if the client sent one.
    pub user: Option<String>,
    /// Filled by the HTTP layer from the request's headers.
    pub client: super::sink::ClientIdentity,
    /// `response_format` asks for JSON (`json_object` or `json_schema`):
    /// remedies never put plain text into the content.
    pub json_mode: bool,
}

/// Text of a message's `content`: a string, or the `text` parts of an array.
pub fn content_text(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for p in parts {
                if let Some(t) = p.get("text").and_then(Value::as_str) {
                    out.push_str(t);
                }
            }
            Some(out)
        }
        _ => None,
    }
}

/// Build the benchmark-format context from OpenAI `messages`: user turns as
/// `[seeker]`, assistant turns as `[supporter]`, everything else (system,
/// developer, tool) left out, concatenated oldest first with no separator.
pub fn build_context(messages: &[Value]) -> String {
    let mut ctx = String::new();
    for m in messages {
        let tag = match m.get("role").and_then(Value::as_str) {
            Some("user") => "[seeker]",
            Some("assistant") => "[supporter]",
            _ => continue,
        };
        let text = m.get("content").and_then(content_text).unwrap_or_default();
        ctx.push_str(tag);
        ctx.push_str(&text);
    }
    ctx
}

/// The classifier's response text for a reply.
pub fn response_text(reply: &str) -> String {
    format!("[supporter]{reply}")
}

impl ChatRequest {
    /// Parse and check a chat completion body. Errors name the field.
    pub fn parse(bytes: &[u8]) -> Result<ChatRequest, GatewayError> {
        let body: Value = serde_json::from_slice(bytes).map_err(|e| {
            GatewayError::bad_request(format!("request body is not valid JSON: {e}"), None)
        })?;
        let obj = body
            .as_object()
            .ok_or_else(|| GatewayError::bad_request("request body must be a JSON object", None))?;
        let messages = obj
            .get("messages")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                GatewayError::bad_request(
                    "messages: required, an array of {role, content}",
                    Some("messages"),
                )
            })?;
        if messages.is_empty() {
            return Err(GatewayError::bad_request(
                "messages: must not be empty",
                Some("messages"),
            ));
        }
        for (i, m) in messages.iter().enumerate() {
            if m.get("role").and_then(Value::as_str).is_none() {
                return Err(GatewayError::bad_request(
                    format!("messages[{i}].role: required, a string such as \"user\""),
                    Some("messages"),
                ));
            }
        }
        let stream = match obj.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(GatewayError::bad_request(
                    "stream: must be a boolean",
                    Some("stream"),
                ))
            }
        };
        match obj.get("n") {
            None | Some(Value::Null) => {}
            Some(n) if n.as_u64() == Some(1) => {}
            Some(_) => {
                return Err(GatewayError::bad_request(
                    "n: carewall moderates one choice per request; set n to 1 (or leave it out)",
                    Some("n"),
                ))
            }
        }
        let last_user = messages
            .iter()
            .rev()
            .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
            .and_then(|m| m.get("content").and_then(content_text))
            .unwrap_or_default();
        Ok(ChatRequest {
            context: build_context(messages),
            lang: Lang::detect(&last_user),
            model: obj.get("model").and_then(Value::as_str).map(str::to_string),
            user: obj.get("user").and_then(Value::as_str).map(str::to_string),
            client: super::sink::ClientIdentity::default(),
            json_mode: matches!(
                obj.get("response_format")
                    .and_then(|f| f.get("type"))
                    .and_then(Value::as_str),
                Some("json_object" | "json_schema")
            ),
            stream,
            body,
        })
    }

    /// The body for a retry: the original plus the steering message as the
    /// last system message (models weigh the latest instruction most).
    pub fn retry_body(&self, steering: Option<&str>) -> Value {
        let mut body = self.body.clone();
        if let (Some(text), Some(msgs)) = (
            steering,
            body.get_mut("messages").and_then(Value::as_array_mut),
        ) {
            msgs.push(serde_json::json!({"role": "system", "content": text}));
        }
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn context_matches_benchmark_format() {
        let msgs = vec![
            json!({"role": "system", "content": "be kind"}),
            json!({"role": "user", "content": "我很难过"}),
            json!({"role": "assistant", "content": "我在听"}),
            json!({"role": "user", "content": [{"type": "text", "text": "睡不着"}]}),
        ];
        assert_eq!(
            build_context(&msgs),
            "[seeker]我很难过[supporter]我在听[seeker]睡不着"
        );
        assert_eq!(response_text("嗯嗯"), "[supporter]嗯嗯");
    }

    #[test]
    fn parse_checks_fields() {
        let r = ChatRequest::parse(br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"x_custom":1}"#)
            .expect("valid");
        assert!(r.stream);
        assert_eq!(r.lang, Lang::En);
        assert_eq!(r.body["x_custom"], 1);
        for (body, needle) in [
            (&b"{"[..], "not valid JSON"),
            (br#"{"model":"m"}"#, "messages: required"),
            (br#"{"messages":[]}"#, "messages: must not be empty"),
            (br#"{"messages":[{"content":"x"}]}"#, "messages[0].role"),
            (
                br#"{"messages":[{"role":"user","content":"x"}],"n":2}"#,
                "n: carewall",
            ),
            (
                br#"{"messages":[{"role":"user","content":"x"}],"stream":"yes"}"#,
                "stream: must be",
            ),
        ] {
            match ChatRequest::parse(body) {
                Ok(_) => panic!("expected error for {}", String::from_utf8_lossy(body)),
                Err(e) => assert!(
                    e.to_string().contains(needle),
                    "{e} should contain {needle}"
                ),
            }
        }
    }

    #[test]
    fn retry_body_appends_steering() {
        let r =
            ChatRequest::parse(br#"{"messages":[{"role":"user","content":"hi"}]}"#).expect("valid");
        let b = r.retry_body(Some("be careful"));
        assert_eq!(b["messages"][1]["role"], "system");
        assert_eq!(b["messages"][1]["content"], "be careful");
        assert_eq!(r.retry_body(None), r.body);
    }
}
