//! `carewall audit list|show|export|purge` as a user runs them: the real
//! binary against a real SQLite file (and PostgreSQL when configured).
#![allow(clippy::unwrap_used)]

mod audit_common;

use std::process::{Command, Output};
use std::sync::Arc;

use audit_common::*;
use carewall::audit::store::SqliteStore;
use carewall::audit::{AuditStore, Review, TextMode};
use carewall::classifier::Category;

fn carewall(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_carewall"));
    c.args(args);
    // Away from the repository, so config/carewall.toml is not picked up
    // as the default configuration.
    c.current_dir(std::env::temp_dir());
    for v in ["CAREWALL__AUDIT__URL", "CAREWALL__AUDIT__ENCRYPTION_KEY"] {
        c.env_remove(v);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

async fn seed(store: &dyn AuditStore) {
    let recs: Vec<_> = (0..12).map(|i| sealed(i, TextMode::Redacted)).collect();
    store.insert_batch(&recs).await.unwrap();
    let review = Review {
        label: Category::LinguisticNeglect,
        note: None,
        reviewer: "c1".into(),
        time_ms: T0,
    };
    store.review("req-0004", &review).await.unwrap();
    store.review("req-0009", &review).await.unwrap();
}

/// The commands against one store URL.
fn check_commands(url: &str) {
    let key = key_b64();
    // list: table, filters, JSON lines.
    let o = carewall(&["audit", "list", "--url", url, "--limit", "5"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("time"), "{out}");
    assert!(
        out.contains("req-0011") && !out.contains("req-0005"),
        "{out}"
    );
    assert!(out.contains("more records"));
    let o = carewall(
        &["audit", "list", "--category", "toxic_language", "--json"],
        &[("CAREWALL__AUDIT__URL", url)],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "only req-0004 is toxic among 0..12");
    assert!(lines
        .iter()
        .all(|l| l["category"] == "toxic_language" && l["context"].is_null()));
    let o = carewall(
        &[
            "audit",
            "list",
            "--url",
            url,
            "--reviewed",
            "true",
            "--json",
        ],
        &[],
    );
    assert_eq!(stdout(&o).lines().count(), 2);

    // show: text with the key, a clear error without or with a wrong one.
    let o = carewall(
        &["audit", "show", "req-0004", "--url", url, "--key", &key],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(v["context"].as_str().unwrap().contains("secret-context-4"));
    assert_eq!(v["review"]["label"], "linguistic_neglect");
    let o = carewall(&["audit", "show", "req-0004", "--url", url], &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no key is loaded"), "{}", stderr(&o));
    assert!(!stdout(&o).contains("secret-context-4"));
    let wrong = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode([7u8; 32])
    };
    let o = carewall(
        &["audit", "show", "req-0004", "--url", url],
        &[("CAREWALL__AUDIT__ENCRYPTION_KEY", &wrong)],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not loaded"), "{}", stderr(&o));
    let o = carewall(&["audit", "show", "nope", "--url", url, "--key", &key], &[]);
    assert!(stderr(&o).contains("no audit record with request_id `nope`"));

    // export: dev.jsonl lines from the reviewer's labels.
    let o = carewall(&["audit", "export", "--url", url, "--key", &key], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines
        .iter()
        .all(|l| l["label"] == 2 && l["category"] == "Linguistic Neglect"));
    assert!(stderr(&o).contains("exported 2 reviewed records"));
    let o = carewall(&["audit", "export", "--url", url], &[]);
    assert!(stderr(&o).contains("needs the encryption key"));
    // The export takes the list's filters (req-0004 is toxic_language,
    // req-0009 humanoid_mimicry); a date as --until includes that day.
    let o = carewall(
        &[
            "audit",
            "export",
            "--url",
            url,
            "--key",
            &key,
            "--category",
            "toxic_language",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().count(), 1, "{}", stdout(&o));
    let o = carewall(
        &[
            "audit",
            "export",
            "--url",
            url,
            "--key",
            &key,
            "--since",
            "2026-01-01",
            "--until",
            "2026-01-01",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().count(), 2, "{}", stdout(&o));

    // Bad input names the flag.
    let o = carewall(
        &["audit", "list", "--url", url, "--since", "yesterday"],
        &[],
    );
    assert!(stderr(&o).contains("--since"), "{}", stderr(&o));
    let o = carewall(&["audit", "list", "--url", url, "--category", "mean"], &[]);
    assert!(stderr(&o).contains("--category: unknown category `mean`"));
    let o = carewall(&["audit", "list", "--url", url, "--action", "flag"], &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--action: unknown action `flag`; known: allow, annotate, append, retry, replace, block, unclassified"),
        "{}",
        stderr(&o)
    );
    let o = carewall(&["audit", "list", "--url", "mysql://x"], &[]);
    assert!(stderr(&o).contains("expected `sqlite://PATH` or `postgres://...`"));
    let o = carewall(&["audit", "list"], &[]);
    assert!(stderr(&o).contains("CAREWALL__AUDIT__URL"));
    let o = carewall(&["audit", "show", "x", "--url", url, "--key", "AAAA"], &[]);
    assert!(
        stderr(&o).contains("--key: must be base64 of exactly 32 bytes"),
        "{}",
        stderr(&o)
    );

    // purge: every sample is from 2026-01-01, older than a day by now.
    let o = carewall(
        &["audit", "purge", "--url", url, "--older-than-days", "1"],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("purged 12 records"),
        "{}",
        stdout(&o)
    );
    let o = carewall(&["audit", "list", "--url", url, "--json"], &[]);
    assert_eq!(stdout(&o).lines().count(), 0);
}

#[tokio::test]
async fn cli_over_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let store = SqliteStore::open(&path).await.unwrap();
    seed(&store).await;
    store.close().await.unwrap();
    let url = format!("sqlite://{}", path.display());
    tokio::task::spawn_blocking(move || check_commands(&url))
        .await
        .unwrap();
    let o = carewall(
        &[
            "audit",
            "list",
            "--url",
            &format!("sqlite://{}/missing.db", dir.path().display()),
        ],
        &[],
    );
    assert!(
        stderr(&o).contains("no audit database at"),
        "{}",
        stderr(&o)
    );
}

#[tokio::test]
async fn cli_over_postgres() {
    let Some(url) = pg_url("cli_over_postgres") else {
        return;
    };
    let schema = unique_schema("cli");
    let _cleanup = SchemaGuard::new(&url, &schema);
    let store: Arc<dyn AuditStore> = pg_store(&url, &schema).await;
    seed(store.as_ref()).await;
    store.close().await.unwrap();
    // libpq-style `options` select the test schema.
    let sep = if url.contains('?') { '&' } else { '?' };
    let cli_url = format!("{url}{sep}options=-c%20search_path%3D{schema}");
    tokio::task::spawn_blocking(move || check_commands(&cli_url))
        .await
        .unwrap();
}
