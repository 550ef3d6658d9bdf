//! The review API through a real HTTP server (hyper on port 0) and a real
//! HTTP client, over SQLite and over PostgreSQL.
#![allow(clippy::unwrap_used)]

mod audit_common;

use std::sync::Arc;
use std::time::Duration;

use audit_common::*;
use carewall::admin::AdminState;
use carewall::audit::store::SqliteStore;
use carewall::audit::{AuditSink, AuditStore, Overflow, SinkOptions, TextMode};
use serde_json::Value;

async fn seed(store: Arc<dyn AuditStore>) -> AuditSink {
    let sink = AuditSink::start_with(
        SinkOptions {
            queue_capacity: 100,
            batch_size: 8,
            flush_interval: Duration::from_millis(20),
            overflow: Overflow::Drop,
            sample_rate: 1.0,
            retention_days: 100_000,
            purge_every: Duration::from_secs(3600),
        },
        TextMode::Redacted,
        Some(keyring()),
        Some(pseudonymizer()),
        store,
    );
    for i in 0..24 {
        sink.try_submit(record(i));
    }
    sink.flush().await;
    sink
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn get(base: &str, path: &str) -> (u16, Value) {
    let r = client()
        .get(format!("{base}{path}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn post(base: &str, path: &str, body: &str) -> (u16, Value) {
    let r = client()
        .post(format!("{base}{path}"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn error_message(v: &Value) -> String {
    v["error"]["message"].as_str().unwrap_or("").to_string()
}

/// The shape `/v1` errors have (`carewall::error::openai_error`): exactly
/// `{"error": {"message", "type", "code", "param"}}`, strings or a null param.
fn assert_openai_shape(v: &Value) {
    let reference = carewall::error::openai_error("m", "t", "c", None);
    let keys = |v: &Value| {
        let mut k: Vec<String> = v["error"]
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        k.sort();
        k
    };
    assert_eq!(keys(v), keys(&reference), "{v}");
    assert_eq!(v.as_object().map(|o| o.len()), Some(1), "{v}");
    for k in ["message", "type", "code"] {
        assert!(v["error"][k].is_string(), "{k} in {v}");
    }
    assert!(
        v["error"]["param"].is_string() || v["error"]["param"].is_null(),
        "{v}"
    );
}

async fn api_contract(store: Arc<dyn AuditStore>) {
    let sink = seed(store.clone()).await;
    let state =
        AdminState::new(store.clone(), Some(keyring()), &admin_settings()).with_sink(sink.clone());
    let base = serve_admin(state).await;
    let http = client();

    // --- authentication ---
    let r = http
        .get(format!("{base}/admin/api/records"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    let body: Value = r.json().await.unwrap();
    assert_openai_shape(&body);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["code"], "invalid_admin_token");
    for bad in ["Bearer wrong-token", "Bearer ", "Basic dGVzdDp0ZXN0", TOKEN] {
        let r = http
            .get(format!("{base}/admin/api/records"))
            .header("authorization", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{bad}");
        let text = r.text().await.unwrap();
        assert!(!text.contains(TOKEN), "token echoed back");
    }
    // A token one character longer or shorter is refused too.
    for t in [format!("{TOKEN}x"), TOKEN[..TOKEN.len() - 1].to_string()] {
        let r = http
            .get(format!("{base}/admin/api/summary"))
            .bearer_auth(t)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }

    // --- list ---
    let (s, v) = get(&base, "/admin/api/records?limit=5").await;
    assert_eq!(s, 200, "{v}");
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 5);
    assert_eq!(items[0]["request_id"], "req-0023", "newest first");
    for it in items {
        for k in [
            "request_id",
            "category",
            "action",
            "shadow",
            "scores",
            "time",
            "policy_name",
        ] {
            assert!(!it[k].is_null(), "missing {k} in {it}");
        }
        assert_eq!(it["scores"].as_object().unwrap().len(), 8);
    }
    let cursor = v["next_cursor"].as_str().unwrap().to_string();
    let (_, v2) = get(
        &base,
        &format!("/admin/api/records?limit=5&cursor={cursor}"),
    )
    .await;
    assert_eq!(v2["items"][0]["request_id"], "req-0018");

    let (_, v) = get(
        &base,
        "/admin/api/records?category=toxic_language&limit=100",
    )
    .await;
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert!(items.iter().all(|i| i["category"] == "toxic_language"));
    let (_, v) = get(
        &base,
        "/admin/api/records?action=allow&shadow=false&limit=100",
    )
    .await;
    let items = v["items"].as_array().unwrap();
    assert_eq!(
        items.len(),
        (0..24).filter(|i| i % 4 == 3 && i % 3 != 0).count()
    );
    let (_, v) = get(
        &base,
        "/admin/api/records?since=2026-01-01T00:00:05Z&until=2026-01-01T00:00:08Z",
    )
    .await;
    let ids: Vec<_> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["request_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["req-0007", "req-0006", "req-0005"]);

    // A date as `until` includes that day: From = To = one day works.
    let (s, v) = get(
        &base,
        "/admin/api/records?since=2026-01-01&until=2026-01-01&limit=100",
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["items"].as_array().unwrap().len(), 24);
    let (_, v) = get(&base, "/admin/api/records?until=2025-12-31&limit=100").await;
    assert_eq!(v["items"].as_array().unwrap().len(), 0);
    // Bounds in ms, as the console sends a day in the reviewer's zone
    // (here UTC-5: 2025-12-31 local is 05:00Z to 05:00Z the next day).
    let day = 86_400_000;
    let (_, v) = get(
        &base,
        &format!(
            "/admin/api/records?since={}&until={}&limit=100",
            T0 - day + 5 * 3_600_000,
            T0 + 5 * 3_600_000
        ),
    )
    .await;
    assert_eq!(v["items"].as_array().unwrap().len(), 24);

    // --- the filters' values come from the API, and only those work ---
    let (s, meta) = get(&base, "/admin/api/meta").await;
    assert_eq!(s, 200, "{meta}");
    assert_eq!(
        meta["actions"],
        serde_json::json!([
            "allow",
            "annotate",
            "append",
            "retry",
            "replace",
            "block",
            "unclassified"
        ])
    );
    assert_eq!(meta["categories"].as_array().unwrap().len(), 8);
    assert_eq!(meta["categories"][4]["key"], "toxic_language");
    for a in meta["actions"].as_array().unwrap() {
        let (s, v) = get(
            &base,
            &format!("/admin/api/records?action={}", a.as_str().unwrap()),
        )
        .await;
        assert_eq!(s, 200, "{a}: {v}");
    }

    // --- bad filters ---
    for (q, needle, param) in [
        ("limit=-1", "`limit`", Some("limit")),
        ("category=angry", "unknown category", Some("category")),
        (
            "action=flag",
            "unknown action `flag`; known: allow, annotate",
            Some("action"),
        ),
        ("action=Block", "unknown action `Block`", Some("action")),
        ("shadow=perhaps", "`shadow`", Some("shadow")),
        ("reviewed=yes", "`reviewed`", Some("reviewed")),
        ("since=last-week", "`since`", Some("since")),
        (
            "since=2026-01-02&until=2026-01-01",
            "earlier",
            Some("since"),
        ),
        (
            "conversation_id=user-1",
            "`conversation_id`",
            Some("conversation_id"),
        ),
        ("cursor=!!", "`cursor`", Some("cursor")),
        ("sort=asc", "unknown query parameter `sort`", None),
    ] {
        let (s, v) = get(&base, &format!("/admin/api/records?{q}")).await;
        assert_eq!(s, 400, "{q}: {v}");
        assert!(error_message(&v).contains(needle), "{q}: {v}");
        assert_openai_shape(&v);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "invalid_request");
        assert_eq!(v["error"]["param"].as_str(), param, "{q}: {v}");
    }

    // --- get one, decrypted ---
    let (s, v) = get(&base, "/admin/api/records/req-0004").await;
    assert_eq!(s, 200);
    assert!(v["context"].as_str().unwrap().contains("secret-context-4"));
    assert!(
        v["context"].as_str().unwrap().contains("[PHONE]"),
        "redacted: {}",
        v["context"]
    );
    assert!(v["response"]
        .as_str()
        .unwrap()
        .contains("secret-response-4"));
    assert!(v["conversation_id"].as_str().unwrap().starts_with("c_"));
    let (s, v) = get(&base, "/admin/api/records/no-such-id").await;
    assert_eq!(s, 404);
    assert!(error_message(&v).contains("no-such-id"));

    // --- review ---
    let (s, v) = post(
        &base,
        "/admin/api/records/req-0004/review",
        r#"{"label": 3, "note": "judgmental", "reviewer": "counsellor-1"}"#,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["review"]["label"], "unamiable_judgment");
    assert_eq!(v["review"]["reviewer"], "counsellor-1");
    let (s, _) = post(
        &base,
        "/admin/api/records/req-0010/review",
        r#"{"label": "safe_response", "reviewer": "counsellor-2"}"#,
    )
    .await;
    assert_eq!(s, 200);
    for (body, needle) in [
        ("not json", "review body"),
        (r#"{"label": 9, "reviewer": "x"}"#, "`label`"),
        (r#"{"label": "rude", "reviewer": "x"}"#, "`label`"),
        (r#"{"label": 1}"#, "reviewer"),
        (r#"{"label": 1, "reviewer": "   "}"#, "`reviewer`"),
        (
            r#"{"label": 1, "reviewer": "x", "score": 3}"#,
            "unknown field",
        ),
        (r#"[1, 2]"#, "review body"),
    ] {
        let (s, v) = post(&base, "/admin/api/records/req-0005/review", body).await;
        assert_eq!(s, 400, "{body}: {v}");
        assert!(error_message(&v).contains(needle), "{body}: {v}");
    }
    let (s, _) = post(
        &base,
        "/admin/api/records/no-such-id/review",
        r#"{"label": 1, "reviewer": "x"}"#,
    )
    .await;
    assert_eq!(s, 404);
    let (s, _) = get(&base, "/admin/api/records/req-0004/review").await;
    assert_eq!(s, 405);
    let big = format!(
        r#"{{"label": 1, "reviewer": "x", "note": "{}"}}"#,
        "a".repeat(70_000)
    );
    let (s, _) = post(&base, "/admin/api/records/req-0005/review", &big).await;
    assert_eq!(s, 413);
    let (_, v) = get(&base, "/admin/api/records?reviewed=true").await;
    assert_eq!(v["items"].as_array().unwrap().len(), 2);

    // --- history and undo: a new label keeps the old one, note included ---
    let (s, v) = post(
        &base,
        "/admin/api/records/req-0004/review",
        r#"{"label": "toxic_language", "note": "worse than that", "reviewer": "counsellor-2"}"#,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["review"]["label"], "toxic_language");
    let h = v["history"].as_array().unwrap().clone();
    assert_eq!(h.len(), 2, "{v}");
    assert_eq!(
        (
            &h[0]["kind"],
            &h[0]["label"],
            &h[0]["note"],
            &h[0]["reviewer"]
        ),
        (
            &Value::from("label"),
            &Value::from("unamiable_judgment"),
            &Value::from("judgmental"),
            &Value::from("counsellor-1")
        )
    );
    assert!(h[0]["time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(v["review"]["id"], h[1]["id"]);
    let (first_id, second_id) = (h[0]["id"].as_i64().unwrap(), h[1]["id"].as_i64().unwrap());
    // Undoing a label that is no longer in force is a conflict.
    let (s, v) = post(
        &base,
        "/admin/api/records/req-0004/review/undo",
        &format!(r#"{{"reviewer": "counsellor-1", "review_id": {first_id}}}"#),
    )
    .await;
    assert_eq!(s, 409, "{v}");
    assert_openai_shape(&v);
    assert!(error_message(&v).contains("labelled again"), "{v}");
    let (s, v) = post(
        &base,
        "/admin/api/records/req-0004/review/undo",
        &format!(r#"{{"reviewer": "counsellor-2", "review_id": {second_id}}}"#),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["review"]["label"], "unamiable_judgment",
        "the first label is back"
    );
    assert_eq!(v["review"]["note"], "judgmental");
    assert_eq!(v["history"].as_array().unwrap().len(), 3);
    assert_eq!(v["history"][2]["kind"], "undo");
    assert_eq!(v["history"][2]["undoes"], second_id);
    assert_eq!(v["history"][2]["reviewer"], "counsellor-2");
    for (body, status, needle) in [
        (r#"{"reviewer": ""}"#, 400, "`reviewer`"),
        (r#"{"review_id": 1}"#, 400, "reviewer"),
        (r#"{"reviewer": "x", "why": 1}"#, 400, "unknown field"),
    ] {
        let (s, v) = post(&base, "/admin/api/records/req-0004/review/undo", body).await;
        assert_eq!(s, status, "{body}: {v}");
        assert!(error_message(&v).contains(needle), "{body}: {v}");
    }
    let (s, _) = post(
        &base,
        "/admin/api/records/req-0006/review/undo",
        r#"{"reviewer": "x"}"#,
    )
    .await;
    assert_eq!(s, 409, "nothing to undo");
    let (s, _) = post(
        &base,
        "/admin/api/records/no-such-id/review/undo",
        r#"{"reviewer": "x"}"#,
    )
    .await;
    assert_eq!(s, 404);
    let (s, _) = get(&base, "/admin/api/records/req-0004/review/undo").await;
    assert_eq!(s, 405);

    // --- export: dev.jsonl format, reviewer's label ---
    let r = http
        .get(format!("{base}/admin/api/export"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    assert_eq!(r.headers()["x-carewall-export-skipped"], "0");
    let text = r.text().await.unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        let mut keys: Vec<_> = l.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["category", "context", "label", "response"]);
    }
    assert_eq!(lines[0]["label"], 3);
    assert_eq!(lines[0]["category"], "Unamiable Judgment");
    assert!(lines[0]["context"]
        .as_str()
        .unwrap()
        .starts_with("[seeker]"));
    assert!(lines[0]["response"]
        .as_str()
        .unwrap()
        .starts_with("[supporter]"));
    assert_eq!(lines[1]["label"], 7);
    let (s, _) = get(&base, "/admin/api/export?format=csv").await;
    assert_eq!(s, 400);
    // The export honours the list's filters.
    let export_lines = |q: &'static str| {
        let (base, http) = (base.clone(), http.clone());
        async move {
            let r = http
                .get(format!("{base}/admin/api/export?{q}"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{q}");
            r.text().await.unwrap().lines().count()
        }
    };
    assert_eq!(export_lines("category=nonsense").await, 0);
    assert_eq!(export_lines("category=toxic_language").await, 1);
    assert_eq!(
        export_lines("category=humanoid_mimicry&action=block").await,
        0
    );
    assert_eq!(export_lines("shadow=false").await, 2);
    assert_eq!(export_lines("since=2026-01-01&until=2026-01-01").await, 2);
    assert_eq!(export_lines("until=2026-01-01T00:00:05Z").await, 1);
    let (s, v) = get(&base, "/admin/api/export?action=flag").await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = get(&base, "/admin/api/export?reviewed=false").await;
    assert_eq!(s, 400, "the export is reviewed records only: {v}");

    // --- summary ---
    let (s, v) = get(&base, "/admin/api/summary").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["total"], 24);
    assert_eq!(v["reviewed"], 2);
    assert_eq!(v["categories"].as_array().unwrap().len(), 8);
    assert_eq!(v["queue"]["written"], 24);
    let tox = &v["categories"][4];
    assert_eq!(tox["category"], "toxic_language");

    // --- console and unknown paths ---
    let r = http.get(format!("{base}/admin")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("script-src 'self'"));
    assert!(r.text().await.unwrap().contains("<title>"));
    let r = http
        .get(format!("{base}/admin/console.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (s, _) = get(&base, "/admin/api/nothing").await;
    assert_eq!(s, 404);
    let r = http
        .delete(format!("{base}/admin/api/records"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET");

    sink.shutdown().await;
}

#[tokio::test]
async fn admin_api_over_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn AuditStore> =
        Arc::new(SqliteStore::open(&dir.path().join("a.db")).await.unwrap());
    api_contract(store).await;
}

#[tokio::test]
async fn admin_api_over_postgres() {
    let Some(url) = pg_url("admin_api_over_postgres") else {
        return;
    };
    let schema = unique_schema("api");
    let _cleanup = SchemaGuard::new(&url, &schema);
    let store = pg_store(&url, &schema).await;
    api_contract(store.clone()).await;
    store.close().await.unwrap();
}

#[tokio::test]
async fn admin_api_without_token_is_disabled_and_wrong_key_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn AuditStore> =
        Arc::new(SqliteStore::open(&dir.path().join("a.db")).await.unwrap());
    let sink = seed(store.clone()).await;
    sink.shutdown().await;
    let disabled = serve_admin(AdminState::new(
        store.clone(),
        Some(keyring()),
        &Default::default(),
    ))
    .await;
    let (s, v) = get(&disabled, "/admin/api/records").await;
    assert_eq!(s, 503);
    assert!(error_message(&v).contains("CAREWALL__ADMIN__TOKEN"));
    assert_openai_shape(&v);
    assert_eq!(v["error"]["code"], "admin_disabled");

    // A server holding the wrong key lists records but says why the text
    // is missing instead of failing or showing garbage.
    let wrong = carewall::audit::Keyring::new(carewall::audit::crypto::Key::from_bytes(&[9; 32]));
    let base = serve_admin(AdminState::new(store, Some(wrong), &admin_settings())).await;
    let (s, v) = get(&base, "/admin/api/records/req-0001").await;
    assert_eq!(s, 200);
    assert!(v["context"].is_null());
    assert!(
        v["text_error"].as_str().unwrap().contains("not loaded"),
        "{v}"
    );
}

/// The path the gateway takes: TOML sections -> validated settings (key from
/// the environment) -> `AuditSink::open` -> a flagged record -> the API.
#[tokio::test]
async fn config_to_sink_to_api() {
    use carewall::audit::{AdminSettings, AuditSettings, RawAdminSection, RawAuditSection};
    let dir = tempfile::tempdir().unwrap();
    let raw: RawAuditSection = toml::from_str(
        "url = \"sqlite://audit.db\"\ntext = \"full\"\nflush_interval_ms = 50\noverflow = \"drop\"",
    )
    .unwrap();
    let key = key_b64();
    let env = move |n: &str| match n {
        "CAREWALL__AUDIT__ENCRYPTION_KEY" => Some(key.clone()),
        "CAREWALL__ADMIN__TOKEN" => Some(TOKEN.to_string()),
        _ => None,
    };
    let settings = AuditSettings::from_raw(&raw, dir.path(), &env).unwrap();
    let admin = AdminSettings::from_raw(&RawAdminSection::default(), dir.path(), &env).unwrap();
    let (sink, store) = AuditSink::open(&settings).await.unwrap();
    assert!(
        dir.path().join("audit.db").exists(),
        "SQLite file next to the config"
    );
    let mut allowed = record(3);
    allowed.request_id = "allowed".into();
    assert_eq!(
        sink.submit(allowed).await,
        carewall::audit::SubmitOutcome::SampledOut
    );
    // Now, not 2026-01-01 like the other samples: the default 30-day
    // retention purge runs at start and would race to delete an old record.
    let mut fresh = record(4);
    fresh.time = std::time::SystemTime::now();
    assert_eq!(
        sink.submit(fresh).await,
        carewall::audit::SubmitOutcome::Queued
    );
    sink.flush().await;
    let base = serve_admin(AdminState::new(
        store.clone(),
        settings.keyring.clone(),
        &admin,
    ))
    .await;
    let (s, v) = get(&base, "/admin/api/records?category=toxic_language").await;
    assert_eq!(s, 200);
    assert_eq!(v["items"][0]["request_id"], "req-0004");
    assert_eq!(v["items"][0]["text_mode"], "full");
    assert!(v["items"][0]["context"]
        .as_str()
        .unwrap()
        .contains("13812345678"));
    sink.shutdown().await;
    store.close().await.unwrap();
}
