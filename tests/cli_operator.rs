//! The binary's operator commands as a new operator runs them: broken
//! configurations through `check-config` (every problem in one run, none
//! invented; warnings for a deployment that runs but misleads), and the
//! offline `classify` and `eval` with the shipped model (bad lines reported
//! and skipped, ids echoed, progress on stderr only).
//!
//! The model tests need ONNX Runtime (`ORT_DYLIB_PATH`, else
//! `.cache/onnxruntime/`; `bash scripts/setup.sh`).
#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The binary with no inherited carewall or provider settings.
fn carewall() -> Command {
    let bin = std::env::var_os("CAREWALL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_carewall")));
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars() {
        if k.starts_with("CAREWALL__") || k == "OPENAI_API_KEY" || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.current_dir(repo());
    cmd
}

fn run_with_stdin(mut cmd: Command, stdin: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write_config(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("carewall.toml");
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn check_config_reports_config_policy_and_classifier_problems_in_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let policies = repo().join("policies");
    // The config is outside the repository, so a policies_dir reset to its
    // default (`policies`, relative) would not be found: the old spurious
    // error. The classifier's model folder does not exist.
    let cfg = write_config(
        dir.path(),
        &format!(
            "[moderation]\npolicy = \"default\"\npolicies_dir = \"{}\"\nmax_concurent_classifications = 8\n\
             [classifier]\nkind = \"onnx\"\nmodel_dir = \"{}\"\n\
             [logging]\nlevel = \"verbose\"\n",
            policies.display(),
            dir.path().join("no-model").display()
        ),
    );
    let out = carewall()
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    for needle in [
        "moderation.max_concurent_classifications",
        "logging.level: `verbose` is not a log level",
        "classifier:",
        "no-model",
    ] {
        assert!(err.contains(needle), "{needle} not in:\n{err}");
    }
    assert!(
        !err.contains("moderation.policies_dir"),
        "a problem invented:\n{err}"
    );
    assert!(err.contains("(3 problems)"), "{err}");
}

#[test]
fn check_config_warns_about_a_missing_provider_key_admin_token_and_encryption_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "[upstream]\nbase_url = \"https://api.openai.com/v1\"\n\
             [moderation]\npolicies_dir = \"{}\"\n[classifier]\nkind = \"keyword\"\n",
            repo().join("policies").display()
        ),
    );
    let out = carewall()
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("configuration OK"), "{stdout}");
    for needle in [
        "warning: upstream.api_key: not set",
        "warning: admin.token: not set: the review console and API at /admin answer 503",
        "warning: audit.encryption_key: not set: the audit trail stores no conversation text",
    ] {
        assert!(stdout.contains(needle), "{needle} not in:\n{stdout}");
    }
    // With the key, the token and the encryption key: no such warnings.
    let out = carewall()
        .args(["check-config", "--config"])
        .arg(&cfg)
        .env("OPENAI_API_KEY", "sk-test")
        .env("CAREWALL__ADMIN__TOKEN", "0123456789abcdef0123")
        .env(
            "CAREWALL__AUDIT__ENCRYPTION_KEY",
            "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=",
        )
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(!stdout.contains("warning:"), "{stdout}");
}

#[test]
fn classify_reports_a_bad_line_goes_on_and_echoes_ids() {
    let input = concat!(
        "{\"id\": \"pair-a\", \"context\": \"[seeker]I can't sleep\", \"response\": \"[supporter]That sounds exhausting.\"}\n",
        "{\"context\": \"[seeker]hi\", \"respons\": \"typo\"}\n",
        "\n",
        "not json at all\n",
        "{\"id\": 17, \"response\": \"[supporter]You are worthless.\"}\n",
        "{\"response\": \"[supporter]no id here\"}\n",
    );
    let mut cmd = carewall();
    cmd.args(["classify", "--max-batch", "4"]);
    let out = run_with_stdin(cmd, input);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "skipped lines fail the run at the end"
    );
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(
        lines.len(),
        3,
        "every valid line classified:\n{stdout}\n{stderr}"
    );
    assert_eq!(lines[0]["id"], "pair-a");
    assert_eq!(lines[0]["line"], 1);
    assert_eq!(lines[1]["id"], 17);
    assert_eq!(lines[1]["line"], 5);
    assert!(lines[2].get("id").is_none(), "{}", lines[2]);
    assert_eq!(lines[2]["line"], 6);
    for l in &lines {
        assert_eq!(l["scores"].as_object().unwrap().len(), 8, "{l}");
        assert!(l["category"].is_string() && l["unsafe"].is_boolean(), "{l}");
    }
    assert!(stderr.contains("stdin line 2: "), "{stderr}");
    assert!(stderr.contains("stdin line 4: "), "{stderr}");
    assert!(stderr.contains("`response`"), "{stderr}");
    assert!(stderr.contains("2 line(s) skipped"), "{stderr}");
    assert!(
        !stderr.contains("stdin line 3"),
        "a blank line is no error: {stderr}"
    );
    // No conversation text on stderr.
    assert!(
        !stderr.contains("worthless") && !stderr.contains("typo"),
        "{stderr}"
    );
}

#[test]
fn eval_shows_progress_on_stderr_and_keeps_stdout_for_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev.jsonl");
    std::fs::write(
        &data,
        concat!(
            "{\"context\": \"[seeker]I failed my exam\", \"response\": \"[supporter]That must hurt. What happened?\", \"label\": 7}\n",
            "{\"context\": \"[seeker]I feel alone\", \"response\": \"[supporter]You are pathetic.\", \"label\": 3}\n",
            "{\"context\": \"[seeker]I am sad\", \"response\": \"[supporter]I also lost my mother last year.\", \"label\": 1}\n",
        ),
    )
    .unwrap();
    let out = carewall()
        .args(["eval", "--json", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON report ({e}):\n{stdout}"));
    assert!(report.is_object(), "{report}");
    assert!(stderr.contains("eval: classifying 3 pairs"), "{stderr}");
    assert!(stderr.contains("eval: 3/3 pairs classified in"), "{stderr}");
    assert!(!stdout.contains("eval:"), "progress on stdout:\n{stdout}");
}
