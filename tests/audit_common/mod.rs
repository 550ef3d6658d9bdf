//! Helpers shared by the audit integration tests: sample records, keys, and
//! access to the real PostgreSQL server named by `CAREWALL_TEST_POSTGRES_URL`.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use carewall::audit::crypto::Key;
use carewall::audit::store::PostgresStore;
use carewall::audit::{
    AuditRecord, AuditStore, Keyring, Latency, Pseudonymizer, StoredRecord, TextMode,
};
use carewall::classifier::{Category, Scores};

/// Base of all sample times: 2026-01-01T00:00:00Z.
pub const T0: i64 = 1_767_225_600_000;

pub fn keyring() -> Keyring {
    Keyring::new(Key::from_bytes(&[0x42; 32]))
}

pub fn key_b64() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode([0x42u8; 32])
}

pub fn pseudonymizer() -> Pseudonymizer {
    Pseudonymizer::new([0x17; 32])
}

/// Scores with `top` at 0.72 and the rest sharing the remainder.
pub fn scores_for(top: Category, p: f32) -> Scores {
    let mut s = [(1.0 - p) / 7.0; 8];
    s[top.id()] = p;
    Scores(s)
}

/// A sample record `i`: categories cycle, every third is shadow, every
/// fourth is allowed; times are one second apart.
pub fn record(i: usize) -> AuditRecord {
    let cat = Category::ALL[i % 8];
    AuditRecord {
        request_id: format!("req-{i:04}"),
        time: UNIX_EPOCH + Duration::from_millis((T0 + i as i64 * 1000) as u64),
        tenant: Some("tenant-a".into()),
        conversation_key: Some(format!("user-{}", i % 3)),
        model: "gpt-4o-mini".into(),
        policy_name: "default".into(),
        policy_version: "7".into(),
        streaming: if i % 2 == 0 {
            "buffered".into()
        } else {
            "streaming".into()
        },
        scores: scores_for(cat, 0.5 + (i % 5) as f32 * 0.1),
        category: cat,
        threshold: Some(0.6),
        action: if i % 4 == 3 {
            "allow".into()
        } else {
            "block".into()
        },
        shadow: i % 3 == 0,
        latency: Latency {
            classifier_ms: Some(10.0 + i as f64),
            added_ms: Some(12.0),
            upstream_ms: Some(300.0),
        },
        context: format!("[seeker]我最近很难过 secret-context-{i}，电话13812345678"),
        response: format!("[supporter]secret-response-{i} 你要坚强"),
        drafts: Vec::new(),
        delivered: format!("secret-delivered-{i}"),
    }
}

pub fn sealed(i: usize, mode: TextMode) -> StoredRecord {
    StoredRecord::seal(record(i), mode, Some(&keyring()), Some(&pseudonymizer())).unwrap()
}

/// The PostgreSQL URL, or `None` after printing why the test is skipped
/// (a failure instead when `CAREWALL_REQUIRE_POSTGRES=1`).
pub fn pg_url(test: &str) -> Option<String> {
    match std::env::var("CAREWALL_TEST_POSTGRES_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            if std::env::var("CAREWALL_REQUIRE_POSTGRES").as_deref() == Ok("1") {
                panic!(
                    "{test}: CAREWALL_REQUIRE_POSTGRES=1 but CAREWALL_TEST_POSTGRES_URL is not set; \
                     set it to e.g. postgres://postgres@127.0.0.1:5432/test"
                );
            }
            eprintln!(
                "SKIPPED {test}: CAREWALL_TEST_POSTGRES_URL is not set, so the PostgreSQL tests \
                 do not run on this machine (.ci/run sets it to postgres://postgres@127.0.0.1:5432/test)"
            );
            None
        }
    }
}

/// A schema name unique to this process and call.
pub fn unique_schema(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "carewall_test_{tag}_{}_{}",
        std::process::id(),
        nanos % 1_000_000_000
    )
}

/// A fresh PostgreSQL store in its own schema.
pub async fn pg_store(url: &str, schema: &str) -> Arc<dyn AuditStore> {
    Arc::new(PostgresStore::connect(url, Some(schema)).await.unwrap())
}

/// Drop a test schema (best effort).
pub async fn drop_schema(url: &str, schema: &str) {
    use sqlx::Connection as _;
    if let Ok(mut c) = sqlx::PgConnection::connect(url).await {
        let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .execute(&mut c)
            .await;
        let _ = c.close().await;
    }
}

/// The admin token the HTTP tests use.
pub const TOKEN: &str = "test-admin-token-0123456789";

/// Serve the admin handler on 127.0.0.1:0 with hyper, like the gateway
/// does. Returns the base URL; the server lives until the runtime ends.
pub async fn serve_admin(state: carewall::admin::AdminState) -> String {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(state);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let state = state.clone();
                    async move {
                        let resp = if carewall::admin::matches(req.uri().path()) {
                            carewall::admin::handle(req, &state).await
                        } else {
                            let mut r = hyper::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from_static(b"not found"),
                            ));
                            *r.status_mut() = hyper::StatusCode::NOT_FOUND;
                            r
                        };
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

/// Admin settings holding [`TOKEN`].
pub fn admin_settings() -> carewall::audit::AdminSettings {
    carewall::audit::AdminSettings {
        token: Some(TOKEN.to_string()),
    }
}

/// Drops its test schema when it goes out of scope, also when the test
/// panics, so failed runs leave nothing behind in the shared database.
pub struct SchemaGuard {
    url: String,
    schema: String,
}

impl SchemaGuard {
    pub fn new(url: &str, schema: &str) -> SchemaGuard {
        SchemaGuard {
            url: url.to_string(),
            schema: schema.to_string(),
        }
    }
}

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        let (url, schema) = (self.url.clone(), self.schema.clone());
        // Drop may run inside the test's runtime, which cannot be blocked
        // on: clean up from a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(drop_schema(&url, &schema));
            }
        })
        .join();
    }
}
