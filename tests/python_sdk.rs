//! The official Python `openai` package against the real binary: streaming
//! and non-streaming in every mode, remedies, retry, errors, moderations,
//! client keys.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

const SAFE: &[&str] = &[
    "I hear you. ",
    "That sounds ",
    "really hard. ",
    "I'm here with you.",
];

/// The Python the tests use: `CAREWALL_TEST_PYTHON` (scripts/test.sh sets
/// the project venv), else `.venv/bin/python` when present, else `python3`.
fn python() -> std::ffi::OsString {
    if let Some(p) = std::env::var_os("CAREWALL_TEST_PYTHON") {
        return p;
    }
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    if venv.exists() {
        venv.into_os_string()
    } else {
        "python3".into()
    }
}

fn python_has_openai() -> bool {
    Command::new(python())
        .args(["-c", "import openai"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Run python3 with `args` against the gateway (its `/v1` base URL in
/// `CAREWALL_BASE_URL`), off the test's reactor; the gateway comes back for
/// its logs.
async fn run_python(args: Vec<std::ffi::OsString>, gw: Gateway) -> (std::process::Output, Gateway) {
    tokio::task::spawn_blocking(move || {
        Command::new(python())
            .args(&args)
            .env("CAREWALL_BASE_URL", format!("http://{}/v1", gw.addr))
            .env("PYTHONUNBUFFERED", "1")
            .output()
            .map(|o| (o, gw))
    })
    .await
    .expect("join")
    .expect("run python3")
}

#[tokio::test]
async fn python_openai_sdk_streams_and_parses_in_every_mode() {
    assert!(
        python_has_openai(),
        "the Python package `openai` is missing: run `bash scripts/setup.sh` (installs tests/requirements.txt)"
    );
    let mock = MockUpstream::start(|body: &Value, _| {
        let steered = body["messages"]
            .as_array()
            .and_then(|m| m.last())
            .is_some_and(|m| {
                m["role"] == "system"
                    && m["content"].as_str().unwrap_or("").contains("safety check")
            });
        let user = last_user(body);
        if steered {
            MockReply::pieces(SAFE)
        } else if user.contains("toxic") {
            MockReply::pieces(&["You sound ", "pathetic. ", "Stop it."])
        } else if user.contains("nonsense") {
            MockReply::pieces(&["Lorem ipsum ", "dolor sit amet."])
        } else if user.contains("cut") {
            MockReply::Text {
                pieces: vec!["Checked. ".into(), "unchecked".into()],
                delay: std::time::Duration::from_millis(5),
                end: StreamEnd::Cut,
            }
        } else if user.contains("error500") {
            MockReply::error(500, "provider exploded")
        } else {
            MockReply::pieces(SAFE)
        }
    })
    .await;
    let gw = Gateway::start(GatewayOptions::new(Some(mock.base_url())));
    let script = repo_path("tests/python/sdk_client.py");
    let (out, gw) = run_python(vec![script.into_os_string()], gw).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python SDK checks failed\nstdout:\n{stdout}\nstderr:\n{stderr}\ngateway log:\n{}",
        gw.logs()
    );
    assert!(stdout.contains("python openai checks passed"), "{stdout}");
}

#[tokio::test]
async fn python_openai_sdk_sees_client_key_errors_as_authentication_errors() {
    assert!(
        python_has_openai(),
        "the Python package `openai` is missing: run `bash scripts/setup.sh` (installs tests/requirements.txt)"
    );
    let mock = MockUpstream::start(|_: &Value, _| MockReply::pieces(SAFE)).await;
    let mut opts = GatewayOptions::new(Some(mock.base_url()));
    opts.server_extra = "client_keys = [\"py-client-key-0123456789\"]\n".into();
    let gw = Gateway::start(opts);
    let script = r#"
import os, openai
base = os.environ["CAREWALL_BASE_URL"]
msgs = [{"role": "user", "content": "hi"}]
bad = openai.OpenAI(base_url=base, api_key="not-the-key-0123456789", max_retries=0)
try:
    bad.chat.completions.create(model="gpt-test", messages=msgs)
    raise SystemExit("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401, e.status_code
    assert e.code == "invalid_api_key", e.code
good = openai.OpenAI(base_url=base, api_key="py-client-key-0123456789", max_retries=0)
r = good.chat.completions.create(model="gpt-test", messages=msgs)
assert r.choices[0].message.content == "I hear you. That sounds really hard. I'm here with you.", r
chunks = good.chat.completions.create(model="gpt-test", messages=msgs, stream=True)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text.startswith("I hear you."), text
print("python client key checks passed")
"#;
    let (out, gw) = run_python(vec!["-c".into(), script.into()], gw).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("python client key checks passed"),
        "stdout:\n{stdout}\nstderr:\n{stderr}\ngateway log:\n{}",
        gw.logs()
    );
}

/// The verdict headers as the OpenAI Python SDK exposes them
/// (`with_raw_response`), and a policy its key may not choose as the SDK's
/// `PermissionDeniedError`.
#[tokio::test]
async fn python_openai_sdk_reads_the_verdict_headers_with_raw_response() {
    assert!(
        python_has_openai(),
        "the Python package `openai` is missing: run `bash scripts/setup.sh` (installs tests/requirements.txt)"
    );
    let mock = MockUpstream::start(|body: &Value, _| {
        if last_user(body).contains("guard") {
            MockReply::pieces(&["I hear you. ", "Go kill yourself."])
        } else {
            MockReply::pieces(SAFE)
        }
    })
    .await;
    let mut opts = GatewayOptions::new(Some(mock.base_url()));
    opts.server_extra =
        "client_keys = [{ key = \"py-strict-key-0123456789\", name = \"py-tenant\", policy = \"strict\" }]\n".into();
    let gw = Gateway::start(opts);
    let script = r#"
import os, openai
base = os.environ["CAREWALL_BASE_URL"]
c = openai.OpenAI(base_url=base, api_key="py-strict-key-0123456789", max_retries=0)
def ask(user, **kw):
    return c.chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": user}], **kw)
raw = ask("hi")
assert raw.headers.get("x-carewall-action") == "allow", dict(raw.headers)
assert raw.headers.get("x-carewall-category") == "safe_response", dict(raw.headers)
assert raw.headers.get("x-carewall-policy") == "strict", dict(raw.headers)
assert raw.parse().choices[0].message.content.startswith("I hear you."), raw.parse()
raw = ask("guard me")
assert raw.headers.get("x-carewall-action") == "block", dict(raw.headers)
assert raw.headers.get("x-carewall-category") == "toxic_language", dict(raw.headers)
r = raw.parse()
assert r.choices[0].finish_reason == "content_filter", r
assert "kill" not in r.choices[0].message.content, r
assert r.to_dict()["moderation"]["guards"][0]["id"] == "self-harm-en", r.to_dict()
s = ask("hi", stream=True)
assert s.headers.get("x-carewall-policy") == "strict", dict(s.headers)
text = "".join(ch.choices[0].delta.content or "" for ch in s.parse() if ch.choices)
assert text.startswith("I hear you."), text
try:
    c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}],
                              extra_headers={"x-carewall-policy": "default"})
    raise SystemExit("a weaker policy was accepted")
except openai.PermissionDeniedError as e:
    assert e.status_code == 403 and e.code == "policy_not_allowed", (e.status_code, e.code)
print("python verdict header checks passed")
"#;
    let (out, gw) = run_python(vec!["-c".into(), script.into()], gw).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("python verdict header checks passed"),
        "stdout:\n{stdout}\nstderr:\n{stderr}\ngateway log:\n{}",
        gw.logs()
    );
}
