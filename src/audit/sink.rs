//! [`AuditSink`]: the gateway's only entry into the audit trail. A bounded
//! queue, drained by one writer task that seals records (redaction,
//! pseudonym, encryption) and writes them in batches, plus a retention task
//! that purges old records.
//!
//! Durability: a record is safe once its batch commits. A batch is written
//! when it reaches `batch_size` or when its oldest record has waited
//! `flush_interval`, whichever comes first, so a crash (kill -9) loses at
//! most what sat in the queue: under normal load the records of the last
//! `flush_interval`; if the database falls behind, up to `queue_capacity`
//! records. [`AuditSink::shutdown`] drains the queue before returning.

use std::hash::{Hash as _, Hasher as _};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::crypto::Keyring;
use super::pseudonym::Pseudonymizer;
use super::record::{unix_ms, AuditRecord, StoredRecord};
use super::settings::{AuditSettings, Overflow, TextMode};
use super::store::{open_store, AuditStore, StoreError};

/// What happened to a submitted record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// In the queue; the writer will store it.
    Queued,
    /// An allowed response not picked by `sample_rate`.
    SampledOut,
    /// The queue was full (after waiting, under `block`); counted in
    /// `dropped` and logged.
    Dropped,
    /// The sink is shut down; counted in `dropped`.
    Closed,
    /// Auditing is disabled (`audit.enabled = false`).
    Disabled,
    /// The queue was full and `overflow = "block"`: a background task waits
    /// up to `block_timeout_ms` for space (then the record is queued, or
    /// dropped and counted). Only from [`AuditSink::submit_detached`].
    Waiting,
}

/// Counter snapshot, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditStats {
    /// Records accepted into the queue.
    pub queued: u64,
    /// Records committed to the store.
    pub written: u64,
    /// Records lost to a full queue or a closed sink.
    pub dropped: u64,
    /// Records lost to store errors (after retries) or sealing errors.
    pub failed: u64,
    /// Batches committed.
    pub batches: u64,
    /// Allowed responses skipped by sampling.
    pub sampled_out: u64,
    /// Submissions that had to wait for queue space (`block`).
    pub blocked: u64,
    /// Records deleted by retention.
    pub purged: u64,
    /// Records in the queue right now.
    pub queue_depth: u64,
}

#[derive(Default)]
struct Counters {
    queued: AtomicU64,
    written: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    batches: AtomicU64,
    sampled_out: AtomicU64,
    blocked: AtomicU64,
    purged: AtomicU64,
    last_drop_log_ms: AtomicI64,
}

enum Msg {
    Record(Box<AuditRecord>),
    Flush(oneshot::Sender<()>),
}

/// A first, non-waiting try at queueing under `block`.
enum Enqueue {
    Done(SubmitOutcome),
    /// The queue is full: the sink, `block_timeout`, request id, message.
    Full((Arc<Inner>, Duration, String, Msg)),
}

/// How the writer turns records into rows.
#[derive(Clone)]
struct Sealer {
    mode: TextMode,
    keyring: Option<Keyring>,
    pseudonymizer: Option<Pseudonymizer>,
}

/// Knobs of the sink, taken from [`AuditSettings`].
#[derive(Debug, Clone, Copy)]
pub struct SinkOptions {
    pub queue_capacity: usize,
    pub batch_size: usize,
    pub flush_interval: Duration,
    pub overflow: Overflow,
    pub sample_rate: f64,
    pub retention_days: u32,
    /// How often retention runs (first run at start).
    pub purge_every: Duration,
}

struct Inner {
    tx: mpsc::Sender<Msg>,
    /// Bounds the records waiting in background tasks under `block`
    /// (as many as the queue holds), so overload cannot grow memory.
    waiters: Arc<tokio::sync::Semaphore>,
    counters: Arc<Counters>,
    opts: SinkOptions,
    cancel: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Cheap-to-clone handle to the audit queue.
#[derive(Clone)]
pub struct AuditSink {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for AuditSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSink")
            .field("enabled", &self.inner.is_some())
            .finish_non_exhaustive()
    }
}

impl AuditSink {
    /// Open the configured store, migrate it, and start the sink. Returns
    /// the store too, for the review API. Must run inside a tokio runtime.
    pub async fn open(
        settings: &AuditSettings,
    ) -> Result<(AuditSink, Arc<dyn AuditStore>), StoreError> {
        let store = open_store(&settings.url).await?;
        Ok((AuditSink::start(settings, store.clone()), store))
    }

    /// Start the writer and retention tasks over `store`. Must run inside a
    /// tokio runtime. With `enabled = false` this is [`AuditSink::disabled`].
    pub fn start(settings: &AuditSettings, store: Arc<dyn AuditStore>) -> AuditSink {
        if !settings.enabled {
            return AuditSink::disabled();
        }
        let opts = SinkOptions {
            queue_capacity: settings.queue_capacity,
            batch_size: settings.batch_size,
            flush_interval: settings.flush_interval,
            overflow: settings.overflow,
            sample_rate: settings.sample_rate,
            retention_days: settings.retention_days,
            purge_every: Duration::from_secs(3600),
        };
        AuditSink::start_with(
            opts,
            settings.text,
            settings.keyring.clone(),
            settings.pseudonymizer.clone(),
            store,
        )
    }

    /// [`AuditSink::start`] with explicit parts (tests, benchmarks).
    pub fn start_with(
        opts: SinkOptions,
        mode: TextMode,
        keyring: Option<Keyring>,
        pseudonymizer: Option<Pseudonymizer>,
        store: Arc<dyn AuditStore>,
    ) -> AuditSink {
        let (tx, rx) = mpsc::channel(opts.queue_capacity.max(1));
        let counters = Arc::new(Counters::default());
        let cancel = CancellationToken::new();
        // Text without a key cannot be sealed; store none rather than fail
        // every record (settings validation rejects this combination).
        let mode = if keyring.is_none() {
            TextMode::None
        } else {
            mode
        };
        let writer = Writer {
            rx,
            store: store.clone(),
            sealer: Sealer {
                mode,
                keyring,
                pseudonymizer,
            },
            batch_size: opts.batch_size.max(1),
            flush_interval: opts.flush_interval,
            counters: counters.clone(),
            cancel: cancel.clone(),
        };
        let mut tasks = vec![tokio::spawn(writer.run())];
        tasks.push(tokio::spawn(retention(
            store,
            opts.retention_days,
            opts.purge_every,
            counters.clone(),
            cancel.clone(),
        )));
        AuditSink {
            inner: Some(Arc::new(Inner {
                tx,
                waiters: Arc::new(tokio::sync::Semaphore::new(opts.queue_capacity.max(1))),
                counters,
                opts,
                cancel,
                tasks: Mutex::new(tasks),
            })),
        }
    }

    /// A sink that records nothing.
    pub fn disabled() -> AuditSink {
        AuditSink { inner: None }
    }

    /// True unless disabled.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Whether a record with this request id and action would be kept:
    /// always when flagged, else by `sample_rate`. Deterministic per
    /// request id, so retries decide alike. Lets the gateway skip building
    /// a record that would be thrown away.
    pub fn wants(&self, request_id: &str, flagged: bool) -> bool {
        match &self.inner {
            None => false,
            Some(_) if flagged => true,
            Some(i) => sampled(request_id, i.opts.sample_rate),
        }
    }

    /// Queue a record without ever waiting: when the queue is full the
    /// record is dropped (counted, logged) whatever `overflow` says. For
    /// places that cannot await, such as a body's `poll_frame`.
    pub fn try_submit(&self, record: AuditRecord) -> SubmitOutcome {
        let Some(inner) = &self.inner else {
            return SubmitOutcome::Disabled;
        };
        if !self.wants(&record.request_id, record.is_flagged()) {
            inner.counters.sampled_out.fetch_add(1, Ordering::Relaxed);
            return SubmitOutcome::SampledOut;
        }
        let id = record.request_id.clone();
        match inner.tx.try_send(Msg::Record(Box::new(record))) {
            Ok(()) => {
                inner.counters.queued.fetch_add(1, Ordering::Relaxed);
                SubmitOutcome::Queued
            }
            Err(mpsc::error::TrySendError::Full(_)) => inner.dropped(&id, "queue full"),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                inner.dropped(&id, "sink shut down");
                SubmitOutcome::Closed
            }
        }
    }

    /// Queue a record without making the caller wait, yet honouring
    /// `overflow`: under `drop` this is [`AuditSink::try_submit`]; under
    /// `block` a full queue hands the record to a background task that waits
    /// up to `block_timeout_ms` for space ([`SubmitOutcome::Waiting`]). At
    /// most `queue_capacity` records wait at once; beyond that they are
    /// dropped (counted, logged). The gateway's response path uses this.
    pub fn submit_detached(&self, record: AuditRecord) -> SubmitOutcome {
        let (inner, timeout, id, msg) = match self.enqueue_blocking(record) {
            Enqueue::Done(outcome) => return outcome,
            Enqueue::Full(full) => full,
        };
        let Ok(permit) = inner.waiters.clone().try_acquire_owned() else {
            return inner.dropped(&id, "queue full and as many records already waiting");
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return inner.dropped(&id, "queue full (no runtime to wait on)");
        };
        inner.counters.blocked.fetch_add(1, Ordering::Relaxed);
        runtime.spawn(async move {
            let _permit = permit;
            inner.wait_for_space(msg, timeout, &id).await;
        });
        SubmitOutcome::Waiting
    }

    /// Queue a record, applying `overflow` when the queue is full: `block`
    /// waits up to its timeout for space, then drops; `drop` drops at once.
    pub async fn submit(&self, record: AuditRecord) -> SubmitOutcome {
        match self.enqueue_blocking(record) {
            Enqueue::Done(outcome) => outcome,
            Enqueue::Full((inner, timeout, id, msg)) => {
                inner.counters.blocked.fetch_add(1, Ordering::Relaxed);
                inner.wait_for_space(msg, timeout, &id).await
            }
        }
    }

    /// The part of `submit` that never waits: sampling, `drop` overflow, and
    /// a first try; a full queue under `block` gives the message back.
    fn enqueue_blocking(&self, record: AuditRecord) -> Enqueue {
        let Some(inner) = &self.inner else {
            return Enqueue::Done(SubmitOutcome::Disabled);
        };
        let Overflow::Block(timeout) = inner.opts.overflow else {
            return Enqueue::Done(self.try_submit(record));
        };
        if !self.wants(&record.request_id, record.is_flagged()) {
            inner.counters.sampled_out.fetch_add(1, Ordering::Relaxed);
            return Enqueue::Done(SubmitOutcome::SampledOut);
        }
        let id = record.request_id.clone();
        match inner.tx.try_send(Msg::Record(Box::new(record))) {
            Ok(()) => {
                inner.counters.queued.fetch_add(1, Ordering::Relaxed);
                Enqueue::Done(SubmitOutcome::Queued)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                inner.dropped(&id, "sink shut down");
                Enqueue::Done(SubmitOutcome::Closed)
            }
            Err(mpsc::error::TrySendError::Full(msg)) => {
                Enqueue::Full((inner.clone(), timeout, id, msg))
            }
        }
    }

    /// Wait until everything queued before this call is committed (or has
    /// failed). Returns at once when disabled or shut down.
    pub async fn flush(&self) {
        let Some(inner) = &self.inner else { return };
        let (tx, rx) = oneshot::channel();
        if inner.tx.send(Msg::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Counter snapshot.
    pub fn stats(&self) -> AuditStats {
        let Some(inner) = &self.inner else {
            return AuditStats::default();
        };
        let c = &inner.counters;
        AuditStats {
            queued: c.queued.load(Ordering::Relaxed),
            written: c.written.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            sampled_out: c.sampled_out.load(Ordering::Relaxed),
            blocked: c.blocked.load(Ordering::Relaxed),
            purged: c.purged.load(Ordering::Relaxed),
            queue_depth: (inner.tx.max_capacity() - inner.tx.capacity()) as u64,
        }
    }

    /// Stop accepting records, write everything queued, stop the tasks.
    /// Safe to call more than once and from any clone; later submissions
    /// answer [`SubmitOutcome::Closed`].
    pub async fn shutdown(&self) -> AuditStats {
        if let Some(inner) = &self.inner {
            inner.cancel.cancel();
            let tasks = match inner.tasks.lock() {
                Ok(mut t) => std::mem::take(&mut *t),
                Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
            };
            for t in tasks {
                if let Err(e) = t.await {
                    tracing::error!(error = %e, "audit task ended abnormally");
                }
            }
        }
        self.stats()
    }
}

impl Inner {
    /// Wait up to `timeout` for queue space (the `block` overflow).
    async fn wait_for_space(&self, msg: Msg, timeout: Duration, id: &str) -> SubmitOutcome {
        match self.tx.send_timeout(msg, timeout).await {
            Ok(()) => {
                self.counters.queued.fetch_add(1, Ordering::Relaxed);
                SubmitOutcome::Queued
            }
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                self.dropped(id, "queue full after waiting block_timeout_ms")
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => {
                self.dropped(id, "sink shut down");
                SubmitOutcome::Closed
            }
        }
    }

    fn dropped(&self, request_id: &str, reason: &'static str) -> SubmitOutcome {
        let total = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        // At most one line per second: an overloaded database must not turn
        // into a log flood as well.
        let now = unix_ms(SystemTime::now());
        let last = self.counters.last_drop_log_ms.load(Ordering::Relaxed);
        if now - last >= 1000
            && self
                .counters
                .last_drop_log_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                request_id,
                reason,
                dropped_total = total,
                capacity = self.opts.queue_capacity,
                "audit record dropped"
            );
        }
        SubmitOutcome::Dropped
    }
}

/// Deterministic sampling: a hash of the request id against the rate.
fn sampled(request_id: &str, rate: f64) -> bool {
    if rate <= 0.0 {
        return false;
    }
    if rate >= 1.0 {
        return true;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    request_id.hash(&mut h);
    (h.finish() as f64 / u64::MAX as f64) < rate
}

struct Writer {
    rx: mpsc::Receiver<Msg>,
    store: Arc<dyn AuditStore>,
    sealer: Sealer,
    batch_size: usize,
    flush_interval: Duration,
    counters: Arc<Counters>,
    cancel: CancellationToken,
}

impl Writer {
    async fn run(mut self) {
        let mut batch = Vec::with_capacity(self.batch_size);
        let mut waiters = Vec::new();
        loop {
            let first = tokio::select! {
                biased;
                m = self.rx.recv() => m,
                _ = self.cancel.cancelled() => None,
            };
            let Some(first) = first else { break };
            self.take(first, &mut batch, &mut waiters);
            // Fill the batch until it is full, the oldest record has waited
            // flush_interval, or someone asked for a flush.
            let deadline = Instant::now() + self.flush_interval;
            while batch.len() < self.batch_size && waiters.is_empty() {
                tokio::select! {
                    biased;
                    m = self.rx.recv() => match m {
                        Some(m) => self.take(m, &mut batch, &mut waiters),
                        None => break,
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = self.cancel.cancelled() => break,
                }
            }
            self.write(&mut batch).await;
            for w in waiters.drain(..) {
                let _ = w.send(());
            }
        }
        // Shutdown: refuse new records, then drain what is queued.
        self.rx.close();
        while let Some(m) = self.rx.recv().await {
            self.take(m, &mut batch, &mut waiters);
            if batch.len() >= self.batch_size {
                self.write(&mut batch).await;
            }
        }
        self.write(&mut batch).await;
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
    }

    fn take(&self, m: Msg, batch: &mut Vec<StoredRecord>, waiters: &mut Vec<oneshot::Sender<()>>) {
        match m {
            Msg::Flush(w) => waiters.push(w),
            Msg::Record(r) => {
                let id = r.request_id.clone();
                match StoredRecord::seal(
                    *r,
                    self.sealer.mode,
                    self.sealer.keyring.as_ref(),
                    self.sealer.pseudonymizer.as_ref(),
                ) {
                    Ok(s) => batch.push(s),
                    Err(e) => {
                        self.counters.failed.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(request_id = %id, error = %e, "audit record could not be sealed; not stored");
                    }
                }
            }
        }
    }

    /// Write and clear `batch`, retrying transient failures twice. Inserts
    /// are idempotent per request id, so a retry after an unclear failure
    /// cannot duplicate rows.
    async fn write(&self, batch: &mut Vec<StoredRecord>) {
        if batch.is_empty() {
            return;
        }
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=3 {
            match self.store.insert_batch(batch).await {
                Ok(_) => {
                    self.counters
                        .written
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    self.counters.batches.fetch_add(1, Ordering::Relaxed);
                    batch.clear();
                    return;
                }
                Err(e) if attempt < 3 => {
                    tracing::warn!(error = %e, attempt, records = batch.len(), "audit batch write failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                }
                Err(e) => {
                    self.counters
                        .failed
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    tracing::error!(error = %e, records = batch.len(), "audit batch lost after 3 attempts");
                }
            }
        }
        batch.clear();
    }
}

/// Purge records older than `days` now and every `every`, until cancelled.
async fn retention(
    store: Arc<dyn AuditStore>,
    days: u32,
    every: Duration,
    counters: Arc<Counters>,
    cancel: CancellationToken,
) {
    loop {
        let cutoff = unix_ms(SystemTime::now()) - i64::from(days) * 86_400_000;
        match store.purge_before(cutoff).await {
            Ok(n) => {
                counters.purged.fetch_add(n, Ordering::Relaxed);
                if n > 0 {
                    tracing::info!(purged = n, retention_days = days, "audit retention purge");
                }
            }
            Err(e) => tracing::warn!(error = %e, "audit retention purge failed; will retry"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_is_deterministic_and_near_the_rate() {
        let ids: Vec<String> = (0..10_000).map(|i| format!("req-{i}")).collect();
        let hits = ids.iter().filter(|id| sampled(id, 0.1)).count();
        assert!((800..1200).contains(&hits), "{hits}");
        assert!(ids.iter().all(|id| sampled(id, 0.1) == sampled(id, 0.1)));
        assert!(!sampled("x", 0.0) && sampled("x", 1.0));
    }
}
