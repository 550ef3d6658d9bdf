//! kill -9 under load: a child process writes audit records through the real
//! sink into a real SQLite file and reports each commit; the parent kills it
//! with SIGKILL mid-stream and checks that every record reported committed
//! is intact and readable, and that the database passes `integrity_check`.
//!
//! The gateway-level version (kill -9 `carewall serve` under client load)
//! asserts the same on records whose responses completed more than one
//! `flush_interval` before the kill.
#![allow(clippy::unwrap_used)]

mod audit_common;

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use audit_common::*;
use carewall::audit::store::SqliteStore;
use carewall::audit::{AuditSink, AuditStore, Overflow, SinkOptions, TextMode};

const CHILD_ENV: &str = "CAREWALL_AUDIT_CRASH_CHILD_DB";

/// The writer process. Not a test on its own: `kill_9_loses_nothing_committed`
/// runs it (with `--ignored`) in a child process and kills it.
#[test]
#[ignore = "helper process for kill_9_loses_nothing_committed"]
fn crash_writer_child() {
    let path = std::env::var(CHILD_ENV).expect("run by kill_9_loses_nothing_committed");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let store: Arc<dyn AuditStore> = Arc::new(
            SqliteStore::open(std::path::Path::new(&path))
                .await
                .unwrap(),
        );
        let sink = AuditSink::start_with(
            SinkOptions {
                queue_capacity: 100_000,
                batch_size: 32,
                flush_interval: Duration::from_millis(20),
                overflow: Overflow::Block(Duration::from_secs(5)),
                sample_rate: 0.0,
                retention_days: 100_000,
                purge_every: Duration::from_secs(3600),
            },
            TextMode::Full,
            Some(keyring()),
            Some(pseudonymizer()),
            store,
        );
        // Report commits: records are queued and written in order by one
        // writer, so `written == n` means req-0000..req-(n-1) are committed.
        let watch = sink.clone();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                let w = watch.stats().written;
                if w != last {
                    last = w;
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "written {w}");
                    let _ = out.flush();
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        for i in 0.. {
            let mut r = record(i);
            r.action = "block".into();
            r.request_id = format!("crash-{i:06}");
            sink.submit(r).await;
            if i % 8 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_committed() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("crash.db");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_writer_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &db)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let reported = tokio::task::spawn_blocking(move || {
        let mut last = 0u64;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(n) = line.strip_prefix("written ") {
                last = n.trim().parse().unwrap();
                if last >= 2000 {
                    break;
                }
            }
        }
        last
    });
    let reported = tokio::time::timeout(Duration::from_secs(120), reported)
        .await
        .expect("the child reported no progress within two minutes")
        .unwrap();
    // SIGKILL: no destructors, no shutdown, no final flush.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the child was killed, not finished");
    assert!(reported >= 2000, "child reported only {reported} records");

    let store = SqliteStore::open(&db).await.unwrap();
    assert_eq!(store.integrity_check().await.unwrap(), "ok");
    for i in 0..reported as usize {
        let id = format!("crash-{i:06}");
        let r = store
            .get(&id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{id} was reported committed but is missing"));
        let ctx = r.open_text(Some(&keyring())).unwrap().unwrap().context;
        assert!(
            ctx.contains(&format!("secret-context-{i}")),
            "{id} text intact"
        );
    }
    eprintln!("kill -9 after {reported} reported commits: all intact, integrity_check ok");
}
