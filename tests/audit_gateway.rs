//! The audit trail through the real gateway binary: a flagged response
//! reaches the review API with the same request id, its text is readable
//! only through the key, the admin API refuses a missing token, kill -9
//! under load loses nothing flushed, and SIGTERM drains the queue.
//!
//! Runs on SQLite always and on PostgreSQL when `CAREWALL_TEST_POSTGRES_URL`
//! is set (a unique schema per test, dropped afterwards).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod audit_common;
mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use audit_common::{drop_schema, key_b64, keyring, pg_store, pg_url, unique_schema, TOKEN};
use carewall::audit::store::SqliteStore;
use carewall::audit::AuditStore;
use common::{chat_body, Gateway, GatewayOptions, MockReply, MockUpstream};
use serde_json::Value;

/// Marker in every upstream reply; must never appear in the database bytes.
const SECRET: &str = "zebra-marker-4711";
/// The conversation id clients send; only its keyed hash may be stored.
const CONVERSATION: &str = "conversation-raw-id-5150";

/// A reply the keyword classifier flags as toxic language (default policy:
/// block), carrying [`SECRET`].
async fn toxic_upstream() -> MockUpstream {
    MockUpstream::start(|_, _| {
        // The marker sits in the flagged sentence: in window mode the
        // gateway stops reading the upstream after it.
        MockReply::pieces(&["You are pathetic ", SECRET, ", stop whining. ", "Really."])
    })
    .await
}

fn audited(upstream: &MockUpstream) -> GatewayOptions {
    GatewayOptions::new(Some(upstream.base_url()))
        .env("CAREWALL__AUDIT__ENCRYPTION_KEY", &key_b64())
        .env("CAREWALL__AUDIT__TEXT", "full")
        .env("CAREWALL__ADMIN__TOKEN", TOKEN)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// One chat request; returns the request id and the body.
async fn chat(gw: &Gateway, stream: bool) -> (String, String) {
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer client-key-abc")
        .header("x-carewall-conversation-id", CONVERSATION)
        .json(&chat_body("Be honest, am I being rude?", stream))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = resp
        .headers()
        .get("x-carewall-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let body = resp.text().await.unwrap();
    (id, body)
}

async fn admin_get(gw: &Gateway, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = client().get(gw.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Poll the review API until `id` is listed. The bound only keeps a broken
/// build from hanging; it is not a speed assertion (the writer flushes
/// every `audit.flush_interval_ms`, 200 ms by default).
async fn wait_listed(gw: &Gateway, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, page) = admin_get(
            gw,
            "/admin/api/records?limit=50&category=toxic_language",
            Some(TOKEN),
        )
        .await;
        assert_eq!(status, 200, "{page}");
        if let Some(item) = page["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["request_id"] == id)
        {
            return item.clone();
        }
        assert!(
            Instant::now() < deadline,
            "record {id} never listed; logs:\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The checks of the "flagged response reaches the console" scenario.
async fn flagged_responses_reach_the_review_api(gw: &Gateway) -> Vec<String> {
    // (b) the API needs the admin token.
    let (status, body) = admin_get(gw, "/admin/api/records?limit=5", None).await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = admin_get(
        gw,
        "/admin/api/records?limit=5",
        Some("wrong-token-wrong-token"),
    )
    .await;
    assert_eq!(status, 401);

    let mut ids = Vec::new();
    for (stream, mode) in [(false, "none"), (true, "window")] {
        let (id, body) = chat(gw, stream).await;
        assert!(!body.contains(SECRET), "blocked text reached the client");
        let item = wait_listed(gw, &id).await;
        assert_eq!(item["request_id"], id.as_str());
        assert_eq!(item["category"], "toxic_language");
        assert_eq!(item["action"], "block");
        assert_eq!(item["shadow"], false);
        assert_eq!(item["streaming"], mode);
        assert_eq!(item["policy_name"], "default");
        assert_eq!(item["model"], common::MOCK_MODEL);
        assert!(item["scores"]["toxic_language"].as_f64().unwrap() >= 0.4);
        assert_eq!(item["scores"].as_object().unwrap().len(), 8);
        let tenant = item["tenant"].as_str().unwrap();
        assert!(
            tenant.starts_with("key-") && !tenant.contains("client-key-abc"),
            "{tenant}"
        );
        let conv = item["conversation_id"].as_str().unwrap();
        assert!(!conv.is_empty() && !conv.contains(CONVERSATION), "{conv}");

        // The text reads back through the API (the gateway holds the key).
        let (status, rec) = admin_get(gw, &format!("/admin/api/records/{id}"), Some(TOKEN)).await;
        assert_eq!(status, 200, "{rec}");
        let response = rec["response"].as_str().unwrap();
        assert!(
            response.starts_with("[supporter]") && response.contains(SECRET),
            "{response}"
        );
        assert!(rec["context"].as_str().unwrap().contains("am I being rude"));
        ids.push(id);
    }
    // Same conversation, same pseudonym.
    let (_, page) = admin_get(gw, "/admin/api/records?limit=50", Some(TOKEN)).await;
    let convs: HashSet<String> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["conversation_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(convs.len(), 1, "{page}");
    // The summary judges flags at the live default policy's thresholds.
    let (status, summary) = admin_get(gw, "/admin/api/summary", Some(TOKEN)).await;
    assert_eq!(status, 200, "{summary}");
    let toxic = summary["categories"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["category"] == "toxic_language")
        .unwrap();
    assert!(
        (toxic["threshold"].as_f64().unwrap() - 0.45).abs() < 1e-6,
        "{toxic}"
    );
    assert_eq!(toxic["flagged"], 2, "{toxic}");
    ids
}

fn assert_not_in_files(dir: &Path, needles: &[&str]) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.starts_with("carewall-audit.db") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        for n in needles {
            assert!(
                !bytes.windows(n.len()).any(|w| w == n.as_bytes()),
                "`{n}` found in clear in {}",
                path.display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flagged_response_reaches_the_console_on_sqlite() {
    let upstream = toxic_upstream().await;
    let gw = Gateway::start(audited(&upstream));
    let ids = flagged_responses_reach_the_review_api(&gw).await;

    // Neither the reply nor the raw conversation id is in the database file
    // (nor its WAL) in clear.
    let db = gw.dir.path().join("carewall-audit.db");
    assert!(db.is_file(), "audit database next to the config file");
    assert_not_in_files(gw.dir.path(), &[SECRET, CONVERSATION, "pathetic"]);

    // `carewall audit` finds the same store through the gateway's config.
    let cfg = gw.dir.path().join("carewall.toml");
    let out = common::carewall_command()
        .args(["audit", "show", &ids[0], "--config"])
        .arg(&cfg)
        .env("CAREWALL__AUDIT__ENCRYPTION_KEY", key_b64())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(SECRET), "{stdout}");
    let out = common::carewall_command()
        .args(["audit", "list", "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        ids.iter().all(|id| stdout.contains(id.as_str())),
        "{stdout}"
    );
    assert!(
        !stdout.contains(SECRET),
        "no text without the key: {stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flagged_response_reaches_the_console_on_postgres() {
    let Some(url) = pg_url("flagged_response_reaches_the_console_on_postgres") else {
        return;
    };
    let schema = unique_schema("gw");
    // Create and migrate the schema; the gateway then selects it through
    // libpq-style options in its URL.
    pg_store(&url, &schema).await.close().await.unwrap();
    let sep = if url.contains('?') { '&' } else { '?' };
    let gw_url = format!("{url}{sep}options=-c%20search_path%3D{schema}");
    let upstream = toxic_upstream().await;
    let gw = Gateway::start(audited(&upstream).env("CAREWALL__AUDIT__URL", &gw_url));
    let result = tokio::spawn(async move {
        let ids = flagged_responses_reach_the_review_api(&gw).await;
        (ids, gw)
    })
    .await;
    let check = async {
        let (ids, gw) = result.expect("PostgreSQL scenario");
        assert!(
            !gw.dir.path().join("carewall-audit.db").exists(),
            "no SQLite file when PostgreSQL is configured"
        );
        // The stored row has no clear text in any column.
        use sqlx::Connection as _;
        let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
        let rows: Vec<(String,)> = sqlx::query_as(&format!(
            "SELECT row_to_json(r)::text FROM \"{schema}\".audit_records r"
        ))
        .fetch_all(&mut c)
        .await
        .unwrap();
        assert_eq!(rows.len(), ids.len());
        for (row,) in rows {
            assert!(
                !row.contains(SECRET) && !row.contains(CONVERSATION),
                "{row}"
            );
        }
        let _ = c.close().await;
    };
    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(check)).await;
    drop_schema(&url, &schema).await;
    if let Err(p) = outcome {
        std::panic::resume_unwind(p);
    }
}

/// Request ids of completed responses, with when they completed.
type Completed = Arc<Mutex<Vec<(String, Instant)>>>;

/// Drive `workers` clients at the gateway, alternating streamed and plain
/// requests, until `stop`; each completed response is recorded with the
/// instant it completed.
fn drive(
    gw_url: String,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> (Completed, Vec<tokio::task::JoinHandle<()>>) {
    let done = Arc::new(Mutex::new(Vec::new()));
    let tasks = (0..workers)
        .map(|w| {
            let (done, stop, url) = (done.clone(), stop.clone(), gw_url.clone());
            tokio::spawn(async move {
                let http = client();
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let stream = (w + n) % 2 == 0;
                    let Ok(resp) = http
                        .post(format!("{url}/v1/chat/completions"))
                        .json(&chat_body("Be honest, am I being rude?", stream))
                        .send()
                        .await
                    else {
                        break;
                    };
                    let Some(id) = resp
                        .headers()
                        .get("x-carewall-request-id")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                    else {
                        break;
                    };
                    // Completed = the whole body (the stream's [DONE]) read.
                    match resp.text().await {
                        Ok(body) if !stream || body.contains("[DONE]") => {
                            done.lock().unwrap().push((id, Instant::now()));
                        }
                        _ => break,
                    }
                }
            })
        })
        .collect();
    (done, tasks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing_flushed() {
    const FLUSH_MS: u64 = 100;
    let upstream = toxic_upstream().await;
    let mut gw = Gateway::start(
        audited(&upstream).env("CAREWALL__AUDIT__FLUSH_INTERVAL_MS", &FLUSH_MS.to_string()),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (done, tasks) = drive(format!("http://{}", gw.addr), 8, stop.clone());
    // Load for a while, but kill only once enough responses completed to
    // make the check meaningful.
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n = done.lock().unwrap().len();
        if started.elapsed() > Duration::from_secs(3) && n >= 60 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "only {n} responses completed; logs:\n{}",
            gw.logs()
        );
    }
    gw.child.kill().unwrap(); // SIGKILL, mid-load
    let killed_at = Instant::now();
    gw.child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }

    let done = done.lock().unwrap().clone();
    let margin = Duration::from_millis(FLUSH_MS) + Duration::from_secs(1);
    let must_have: Vec<&String> = done
        .iter()
        .filter(|(_, at)| killed_at.duration_since(*at) > margin)
        .map(|(id, _)| id)
        .collect();
    assert!(
        must_have.len() >= 20,
        "too few responses before the margin ({} of {})",
        must_have.len(),
        done.len()
    );

    let store = SqliteStore::open(&gw.dir.path().join("carewall-audit.db"))
        .await
        .expect("the database opens after kill -9");
    assert_eq!(store.integrity_check().await.unwrap(), "ok");
    let ring = keyring();
    for id in &must_have {
        let rec = store
            .get(id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{id} completed well before the kill but is missing"));
        let response = rec
            .open_text(Some(&ring))
            .expect("decrypts")
            .expect("has text")
            .response;
        assert!(response.contains(SECRET), "{response}");
    }
    // Nothing twice: every stored id is distinct (and at least the above).
    let mut seen = HashSet::new();
    let mut cursor = None;
    loop {
        let page = store
            .list(&carewall::audit::ListFilter {
                limit: 500,
                cursor,
                ..Default::default()
            })
            .await
            .unwrap();
        for r in &page.items {
            assert!(seen.insert(r.request_id.clone()), "{} twice", r.request_id);
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert!(seen.len() >= must_have.len());
    eprintln!(
        "kill -9: {} responses completed, {} before the margin (all present), {} records stored",
        done.len(),
        must_have.len(),
        seen.len()
    );
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_audit_queue() {
    let upstream = toxic_upstream().await;
    // Nothing is written before shutdown: a long interval and big batches,
    // so every record present afterwards was written by the drain.
    let mut gw = Gateway::start(
        audited(&upstream)
            .env("CAREWALL__AUDIT__FLUSH_INTERVAL_MS", "60000")
            .env("CAREWALL__AUDIT__BATCH_SIZE", "10000"),
    );
    let mut ids = Vec::new();
    for i in 0..24 {
        let (id, _) = chat(&gw, i % 2 == 0).await;
        ids.push(id);
    }
    gw.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = gw.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "gateway did not exit on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit {status:?}; logs:\n{}", gw.logs());
    assert!(gw.logs().contains("audit queue drained"), "{}", gw.logs());

    let store = SqliteStore::open(&gw.dir.path().join("carewall-audit.db"))
        .await
        .unwrap();
    assert_eq!(store.integrity_check().await.unwrap(), "ok");
    let ring = keyring();
    for id in &ids {
        let rec = store
            .get(id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{id} completed before SIGTERM but is missing"));
        assert!(rec.open_text(Some(&ring)).unwrap().is_some());
    }
    store.close().await.unwrap();
}

/// Fetch one record (with text) by id once it is stored.
async fn wait_record(gw: &Gateway, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, rec) = admin_get(gw, &format!("/admin/api/records/{id}"), Some(TOKEN)).await;
        if status == 200 {
            return rec;
        }
        assert!(
            Instant::now() < deadline,
            "record {id} never stored ({status}: {rec}); logs:\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_drafts_and_the_delivered_text_reach_the_audit_api() {
    // First answer: nonsense (default policy: retry); the retry is fine.
    let upstream = MockUpstream::start(|body, _| {
        // A retry carries the policy's steering message as the last message.
        let steered = body["messages"]
            .as_array()
            .and_then(|m| m.last())
            .is_some_and(|m| m["role"] == "system");
        if !steered {
            MockReply::pieces(&["Lorem ipsum dolor ", SECRET, " sit amet."])
        } else {
            MockReply::pieces(&["I hear you. ", "Tell me more about it."])
        }
    })
    .await;
    let gw = Gateway::start(audited(&upstream));
    for stream in [false, true] {
        let (id, body) = chat(&gw, stream).await;
        assert!(body.contains("Tell me more"), "{body}");
        assert!(!body.contains(SECRET), "{body}");
        let rec = wait_record(&gw, &id).await;
        assert_eq!(rec["action"], "retry", "{rec}");
        let drafts = rec["drafts"].as_array().expect("drafts listed");
        assert_eq!(drafts.len(), 1, "{rec}");
        assert!(
            drafts[0]["response"].as_str().unwrap().contains(SECRET),
            "the rejected draft is kept for review: {rec}"
        );
        assert_eq!(drafts[0]["category"], "nonsense");
        assert_eq!(drafts[0]["action"], "retry");
        assert!(rec["response"].as_str().unwrap().contains("Tell me more"));
        assert_eq!(
            rec["delivered"], "I hear you. Tell me more about it.",
            "{rec}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unclassified_releases_are_labelled_counted_and_always_audited() {
    // The stand-in classifier fails on this marker; the default policy
    // fails open, so the reply is delivered, and must say so.
    let upstream =
        MockUpstream::start(|_, _| MockReply::pieces(&["Fine words [[classifier-error]]. "])).await;
    let gw = Gateway::start(audited(&upstream));
    for stream in [false, true] {
        let (id, body) = chat(&gw, stream).await;
        let verdict: Value = if stream {
            common::sse_verdict(&body).expect("verdict chunk")["moderation"].clone()
        } else {
            serde_json::from_str::<Value>(&body).unwrap()["moderation"].clone()
        };
        assert_eq!(verdict["unclassified"], true, "{verdict}");
        assert_eq!(verdict["category"], Value::Null, "{verdict}");
        assert_eq!(verdict["action"], "allow");
        assert!(verdict["error"].as_str().is_some(), "{verdict}");
        let rec = wait_record(&gw, &id).await;
        assert_eq!(rec["action"], "unclassified", "{rec}");
    }
    let metrics = client()
        .get(gw.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("carewall_responses_total")
                && l.contains("category=\"unclassified\"")),
        "{metrics}"
    );
}
