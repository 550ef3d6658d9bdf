//! The writer queue: batching, interval flushes, overflow (drop and block),
//! drain on shutdown, sampling; over a real SQLite file (and PostgreSQL when
//! `CAREWALL_TEST_POSTGRES_URL` is set).
#![allow(clippy::unwrap_used)]

mod audit_common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use audit_common::*;
use carewall::audit::store::{GroupCount, ListFilter, Page, SqliteStore, StoreFuture, UndoOutcome};
use carewall::audit::{
    AuditSink, AuditStore, Overflow, Review, SinkOptions, StoredRecord, SubmitOutcome, TextMode,
};
use tokio::sync::Semaphore;

fn opts(capacity: usize, batch: usize, overflow: Overflow) -> SinkOptions {
    SinkOptions {
        queue_capacity: capacity,
        batch_size: batch,
        flush_interval: Duration::from_millis(50),
        overflow,
        sample_rate: 0.0,
        // Sample times are in 2026; keep retention from purging them.
        retention_days: 100_000,
        purge_every: Duration::from_secs(3600),
    }
}

fn sink(opts: SinkOptions, store: Arc<dyn AuditStore>) -> AuditSink {
    AuditSink::start_with(
        opts,
        TextMode::Redacted,
        Some(keyring()),
        Some(pseudonymizer()),
        store,
    )
}

async fn sqlite() -> (tempfile::TempDir, Arc<SqliteStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("a.db")).await.unwrap());
    (dir, store)
}

/// A flagged record (every 4th sample record is allowed, so skip those).
fn flagged(i: usize) -> carewall::audit::AuditRecord {
    let mut r = record(i);
    r.action = "block".into();
    r
}

async fn count(store: &dyn AuditStore) -> usize {
    let mut n = 0;
    let mut f = ListFilter {
        limit: 500,
        ..ListFilter::default()
    };
    loop {
        let p = store.list(&f).await.unwrap();
        n += p.items.len();
        match p.next_cursor {
            Some(c) => f.cursor = Some(c),
            None => return n,
        }
    }
}

/// Wraps a store; `insert_batch` waits for a permit, so tests can hold the
/// writer mid-batch and fill the queue deterministically.
struct Gated {
    inner: Arc<dyn AuditStore>,
    gate: Arc<Semaphore>,
}

impl AuditStore for Gated {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn insert_batch<'a>(&'a self, records: &'a [StoredRecord]) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let permit = self.gate.acquire().await;
            let n = self.inner.insert_batch(records).await;
            if let Ok(p) = permit {
                p.forget();
            }
            n
        })
    }
    fn list<'a>(&'a self, f: &'a ListFilter) -> StoreFuture<'a, Page> {
        self.inner.list(f)
    }
    fn get<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<StoredRecord>> {
        self.inner.get(id)
    }
    fn review<'a>(&'a self, id: &'a str, r: &'a Review) -> StoreFuture<'a, bool> {
        self.inner.review(id, r)
    }
    fn undo_review<'a>(
        &'a self,
        id: &'a str,
        reviewer: &'a str,
        time_ms: i64,
        expected: Option<i64>,
    ) -> StoreFuture<'a, UndoOutcome> {
        self.inner.undo_review(id, reviewer, time_ms, expected)
    }
    fn group_counts(&self) -> StoreFuture<'_, Vec<GroupCount>> {
        self.inner.group_counts()
    }
    fn purge_before(&self, c: i64) -> StoreFuture<'_, u64> {
        self.inner.purge_before(c)
    }
    fn close(&self) -> StoreFuture<'_, ()> {
        self.inner.close()
    }
}

#[tokio::test]
async fn batches_by_size_and_flush_waits_for_commit() {
    let (_dir, store) = sqlite().await;
    let s = sink(opts(1000, 10, Overflow::Drop), store.clone());
    // On the current-thread runtime the writer cannot run before we await,
    // so all 35 are queued first and the batches are 10+10+10+5.
    for i in 0..35 {
        assert_eq!(s.try_submit(flagged(i)), SubmitOutcome::Queued);
    }
    assert_eq!(s.stats().queue_depth, 35);
    s.flush().await;
    let st = s.stats();
    assert_eq!((st.queued, st.written, st.batches), (35, 35, 4), "{st:?}");
    assert_eq!(count(store.as_ref()).await, 35);
    s.shutdown().await;
}

#[tokio::test]
async fn records_are_written_after_the_flush_interval_without_a_flush() {
    let (_dir, store) = sqlite().await;
    let s = sink(opts(1000, 1000, Overflow::Drop), store.clone());
    for i in 0..3 {
        s.try_submit(flagged(i));
    }
    // Nobody flushes and the batch is far from full: only the interval can
    // get these written. Poll (generously) until it has.
    // The batch counter moves just after the commit: wait for both.
    let mut seen = 0;
    for _ in 0..200 {
        seen = count(store.as_ref()).await;
        if seen == 3 && s.stats().batches > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(seen, 3);
    assert_eq!(s.stats().batches, 1, "one interval flush, one batch");
    s.shutdown().await;
}

#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);
impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Capture every log line of this test binary. A global subscriber, not a
/// thread-local one: tracing caches callsite interest process-wide, and a
/// test thread without a subscriber can otherwise switch a callsite off
/// for the thread that has one.
fn captured_logs() -> LogBuf {
    static LOGS: std::sync::OnceLock<LogBuf> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = LogBuf::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        logs
    })
    .clone()
}

#[tokio::test]
async fn drop_overflow_counts_logs_without_text_and_keeps_the_rest() {
    let logs = captured_logs();

    let (_dir, store) = sqlite().await;
    let gate = Arc::new(Semaphore::new(0));
    let gated = Arc::new(Gated {
        inner: store.clone(),
        gate: gate.clone(),
    });
    let s = sink(opts(4, 1, Overflow::Drop), gated);
    assert_eq!(s.try_submit(flagged(0)), SubmitOutcome::Queued);
    // Let the writer take record 0 and stall in insert_batch.
    while s.stats().queue_depth != 0 {
        tokio::task::yield_now().await;
    }
    for i in 1..=4 {
        assert_eq!(s.try_submit(flagged(i)), SubmitOutcome::Queued);
    }
    for i in 5..=7 {
        assert_eq!(s.try_submit(flagged(i)), SubmitOutcome::Dropped);
    }
    // `submit` under `drop` does not wait either.
    assert_eq!(s.submit(flagged(8)).await, SubmitOutcome::Dropped);
    assert_eq!(s.stats().dropped, 4);
    gate.add_permits(1000);
    let st = s.shutdown().await;
    assert_eq!((st.written, st.dropped), (5, 4), "{st:?}");
    assert_eq!(count(store.as_ref()).await, 5);
    assert_eq!(s.try_submit(flagged(9)), SubmitOutcome::Closed);

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("audit record dropped"), "{text}");
    assert!(text.contains("req-0005"), "names the request: {text}");
    assert!(!text.contains("secret-"), "text leaked into logs: {text}");
    assert!(!text.contains("13812345678"));
}

#[tokio::test]
async fn block_overflow_waits_then_drops_or_succeeds() {
    let (_dir, store) = sqlite().await;
    let gate = Arc::new(Semaphore::new(0));
    let gated = Arc::new(Gated {
        inner: store.clone(),
        gate: gate.clone(),
    });
    let s = sink(
        opts(1, 1, Overflow::Block(Duration::from_millis(30))),
        gated,
    );
    assert_eq!(s.submit(flagged(0)).await, SubmitOutcome::Queued);
    while s.stats().queue_depth != 0 {
        tokio::task::yield_now().await;
    }
    assert_eq!(s.submit(flagged(1)).await, SubmitOutcome::Queued);
    // Queue full, writer stalled: waits block_timeout, then drops.
    assert_eq!(s.submit(flagged(2)).await, SubmitOutcome::Dropped);
    let st = s.stats();
    assert_eq!((st.blocked, st.dropped), (1, 1));
    // A waiting submit succeeds once the writer frees a slot.
    let s2 = s.clone();
    let waiting = tokio::spawn(async move { s2.submit(flagged(3)).await });
    tokio::task::yield_now().await;
    gate.add_permits(1000);
    assert_eq!(waiting.await.unwrap(), SubmitOutcome::Queued);
    let st = s.shutdown().await;
    assert_eq!(st.written, 3, "{st:?}");
}

#[tokio::test]
async fn detached_submit_never_waits_but_honours_block() {
    let (_dir, store) = sqlite().await;
    let gate = Arc::new(Semaphore::new(0));
    let gated = Arc::new(Gated {
        inner: store.clone(),
        gate: gate.clone(),
    });
    // Queue of 1, generous block timeout: waiting records must survive a
    // stalled writer, and at most `queue_capacity` (1) of them may wait.
    let s = sink(opts(1, 1, Overflow::Block(Duration::from_secs(30))), gated);
    assert_eq!(s.submit_detached(flagged(0)), SubmitOutcome::Queued);
    while s.stats().queue_depth != 0 {
        tokio::task::yield_now().await;
    }
    assert_eq!(s.submit_detached(flagged(1)), SubmitOutcome::Queued);
    // Full: the call returns at once, the record waits in the background.
    assert_eq!(s.submit_detached(flagged(2)), SubmitOutcome::Waiting);
    // One waiter already: the next is dropped rather than piling up.
    assert_eq!(s.submit_detached(flagged(3)), SubmitOutcome::Dropped);
    let st = s.stats();
    assert_eq!((st.blocked, st.dropped, st.queued), (1, 1, 2), "{st:?}");
    gate.add_permits(1000);
    // The waiting record gets its slot once the writer moves.
    while s.stats().queued < 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.flush().await;
    let st = s.shutdown().await;
    assert_eq!((st.written, st.dropped), (3, 1), "{st:?}");
    assert_eq!(count(store.as_ref()).await, 3);

    // Under `drop` it is try_submit: no waiting at all.
    let (_dir2, store2) = sqlite().await;
    let gate2 = Arc::new(Semaphore::new(0));
    let s = sink(
        opts(1, 1, Overflow::Drop),
        Arc::new(Gated {
            inner: store2.clone(),
            gate: gate2.clone(),
        }),
    );
    assert_eq!(s.submit_detached(flagged(0)), SubmitOutcome::Queued);
    while s.stats().queue_depth != 0 {
        tokio::task::yield_now().await;
    }
    assert_eq!(s.submit_detached(flagged(1)), SubmitOutcome::Queued);
    assert_eq!(s.submit_detached(flagged(2)), SubmitOutcome::Dropped);
    gate2.add_permits(1000);
    s.shutdown().await;
}

async fn shutdown_drains(store: Arc<dyn AuditStore>) {
    let gate = Arc::new(Semaphore::new(0));
    let gated = Arc::new(Gated {
        inner: store.clone(),
        gate: gate.clone(),
    });
    let s = sink(opts(1000, 16, Overflow::Drop), gated);
    for i in 0..100 {
        assert_eq!(s.try_submit(flagged(i)), SubmitOutcome::Queued);
    }
    gate.add_permits(1000);
    let st = s.shutdown().await;
    assert_eq!((st.written, st.dropped, st.failed), (100, 0, 0), "{st:?}");
    assert_eq!(count(store.as_ref()).await, 100);
    // What was written is sealed: redacted, encrypted, pseudonymous.
    let r = store.get("req-0042").await.unwrap().unwrap();
    assert!(r.conversation_id.as_deref().unwrap().starts_with("c_"));
    let ctx = r.open_text(Some(&keyring())).unwrap().unwrap().context;
    assert!(ctx.contains("[PHONE]") && !ctx.contains("13812345678"));
}

#[tokio::test]
async fn shutdown_drains_the_queue_sqlite() {
    let (_dir, store) = sqlite().await;
    shutdown_drains(store).await;
}

#[tokio::test]
async fn shutdown_drains_the_queue_postgres() {
    let Some(url) = pg_url("shutdown_drains_the_queue_postgres") else {
        return;
    };
    let schema = unique_schema("sink");
    let _cleanup = SchemaGuard::new(&url, &schema);
    let store = pg_store(&url, &schema).await;
    shutdown_drains(store.clone()).await;
    store.close().await.unwrap();
}

#[tokio::test]
async fn sampling_and_disabled() {
    let (_dir, store) = sqlite().await;
    let s = sink(opts(100, 10, Overflow::Drop), store.clone());
    let mut allowed = record(3);
    assert_eq!(allowed.action, "allow");
    assert_eq!(s.try_submit(allowed.clone()), SubmitOutcome::SampledOut);
    assert_eq!(s.try_submit(flagged(1)), SubmitOutcome::Queued);
    s.shutdown().await;
    assert_eq!(s.stats().sampled_out, 1);

    let mut o = opts(100, 10, Overflow::Drop);
    o.sample_rate = 1.0;
    let s = sink(o, store.clone());
    allowed.request_id = "allowed-1".into();
    assert_eq!(s.try_submit(allowed), SubmitOutcome::Queued);
    s.shutdown().await;
    assert!(store.get("allowed-1").await.unwrap().is_some());

    let d = AuditSink::disabled();
    assert_eq!(d.try_submit(flagged(1)), SubmitOutcome::Disabled);
    assert_eq!(d.submit(flagged(1)).await, SubmitOutcome::Disabled);
    d.flush().await;
}
