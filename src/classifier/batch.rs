//! Dynamic micro-batching: a bounded queue in front of inference worker
//! threads. A worker blocks for the first request, then gathers more until
//! it has `max_batch` or `max_wait` has passed since the first arrived, and
//! answers every request of the batch from one engine call.
//!
//! Invariants: memory is bounded by `queue_capacity` (a full queue fails
//! fast with [`ClassifyError::Overloaded`]); engines run only on the
//! workers' own std threads, never on the async reactor; dropping the
//! [`Batcher`] answers what is still queued with `Unavailable` and joins the
//! workers.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{ClassifyError, Pair, Scores};

/// Something that scores a whole batch at once; owned by one worker thread.
pub trait BatchEngine: Send + 'static {
    /// Score `pairs`, one [`Scores`] per pair in the same order.
    fn run(&mut self, pairs: &[&Pair]) -> Result<Vec<Scores>, String>;
}

/// Queue and batching limits (taken from `ClassifierSettings`).
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    pub max_batch: usize,
    pub max_wait: Duration,
    pub queue_capacity: usize,
    pub timeout: Duration,
}

/// What one engine call looked like; handed to the observer, if any.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchEvent {
    /// Requests answered by this call.
    pub size: usize,
    /// Requests still waiting in the queue when the batch was taken.
    pub queue_depth: usize,
    /// Time the oldest request of the batch spent queued.
    pub oldest_wait: Duration,
    /// Engine time (tokenisation + inference + softmax).
    pub run_time: Duration,
    /// False when the engine returned an error for the whole batch.
    pub ok: bool,
}

/// Callback for telemetry: called on the worker thread after each batch, so
/// it must be cheap (record into a histogram, no I/O).
pub type BatchObserver = Arc<dyn Fn(&BatchEvent) + Send + Sync>;

/// Live counters, shared between the workers and whoever reads them.
pub struct BatchStats {
    batches: AtomicU64,
    items: AtomicU64,
    queue_depth: AtomicUsize,
    overloaded: AtomicU64,
    timed_out: AtomicU64,
    abandoned: AtomicU64,
    failed_batches: AtomicU64,
    run_nanos: AtomicU64,
    /// `size_counts[n]` = batches of exactly n requests (index 0 unused).
    size_counts: Vec<AtomicU64>,
    observer: OnceLock<BatchObserver>,
}

/// A point-in-time copy of [`BatchStats`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub batches: u64,
    pub items: u64,
    pub queue_depth: usize,
    pub overloaded: u64,
    pub timed_out: u64,
    /// Requests whose caller gave up (timeout, cancel) before their batch ran.
    pub abandoned: u64,
    pub failed_batches: u64,
    pub run_time: Duration,
    /// `batch_sizes[n]` = number of batches of exactly n requests.
    pub batch_sizes: Vec<u64>,
}

impl StatsSnapshot {
    /// Largest batch seen so far (0 if none).
    pub fn max_batch_seen(&self) -> usize {
        self.batch_sizes.iter().rposition(|&c| c > 0).unwrap_or(0)
    }
}

impl BatchStats {
    fn new(max_batch: usize) -> BatchStats {
        BatchStats {
            batches: AtomicU64::new(0),
            items: AtomicU64::new(0),
            queue_depth: AtomicUsize::new(0),
            overloaded: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            failed_batches: AtomicU64::new(0),
            run_nanos: AtomicU64::new(0),
            size_counts: (0..=max_batch).map(|_| AtomicU64::new(0)).collect(),
            observer: OnceLock::new(),
        }
    }

    /// Requests queued and not yet taken by a worker.
    pub fn queue_depth(&self) -> usize {
        self.queue_depth.load(Ordering::Relaxed)
    }

    /// Install the per-batch callback (once; later calls return `false`).
    pub fn set_observer(&self, observer: BatchObserver) -> bool {
        self.observer.set(observer).is_ok()
    }

    /// Copy all counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            batches: self.batches.load(Ordering::Relaxed),
            items: self.items.load(Ordering::Relaxed),
            queue_depth: self.queue_depth(),
            overloaded: self.overloaded.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
            abandoned: self.abandoned.load(Ordering::Relaxed),
            failed_batches: self.failed_batches.load(Ordering::Relaxed),
            run_time: Duration::from_nanos(self.run_nanos.load(Ordering::Relaxed)),
            batch_sizes: self
                .size_counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
        }
    }

    fn record(&self, event: &BatchEvent) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.items.fetch_add(event.size as u64, Ordering::Relaxed);
        if !event.ok {
            self.failed_batches.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(event.run_time.as_nanos()).unwrap_or(u64::MAX);
        self.run_nanos.fetch_add(nanos, Ordering::Relaxed);
        if let Some(c) = self.size_counts.get(event.size) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(observer) = self.observer.get() {
            observer(event);
        }
    }
}

struct Job {
    pair: Pair,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Scores, ClassifyError>>,
}

/// The queue plus its workers. Cheap to share behind an `Arc`.
pub struct Batcher {
    tx: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
    stats: Arc<BatchStats>,
    stopping: Arc<AtomicBool>,
    live_workers: Arc<AtomicUsize>,
    config: BatchConfig,
}

impl Batcher {
    /// Start one worker thread per engine. Limits of 0 are rejected.
    pub fn start<E: BatchEngine>(engines: Vec<E>, config: BatchConfig) -> Result<Batcher, String> {
        if engines.is_empty() {
            return Err("`workers` must be at least 1".into());
        }
        if config.max_batch == 0 {
            return Err("`max_batch` must be at least 1".into());
        }
        if config.queue_capacity == 0 {
            return Err("`queue_capacity` must be at least 1".into());
        }
        let (tx, rx) = mpsc::sync_channel::<Job>(config.queue_capacity);
        let rx = Arc::new(Mutex::new(rx));
        let stats = Arc::new(BatchStats::new(config.max_batch));
        let stopping = Arc::new(AtomicBool::new(false));
        let live_workers = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::with_capacity(engines.len());
        for (i, engine) in engines.into_iter().enumerate() {
            let worker = Worker {
                engine,
                rx: Arc::clone(&rx),
                stats: Arc::clone(&stats),
                stopping: Arc::clone(&stopping),
                live: Arc::clone(&live_workers),
                max_batch: config.max_batch,
                max_wait: config.max_wait,
            };
            live_workers.fetch_add(1, Ordering::SeqCst);
            let spawned = std::thread::Builder::new()
                .name(format!("carewall-infer-{i}"))
                .spawn(move || worker.run());
            match spawned {
                Ok(handle) => workers.push(handle),
                Err(e) => {
                    live_workers.fetch_sub(1, Ordering::SeqCst);
                    // Dropping `tx` on return stops the workers already started.
                    stopping.store(true, Ordering::SeqCst);
                    return Err(format!("cannot start inference thread: {e}"));
                }
            }
        }
        Ok(Batcher {
            tx: Some(tx),
            workers,
            stats,
            stopping,
            live_workers,
            config,
        })
    }

    /// Shared counters; also reachable after the batcher is dropped.
    pub fn stats(&self) -> Arc<BatchStats> {
        Arc::clone(&self.stats)
    }

    /// True while at least one worker is serving.
    pub fn is_running(&self) -> bool {
        !self.stopping.load(Ordering::SeqCst) && self.live_workers.load(Ordering::SeqCst) > 0
    }

    /// Queue a pair and wait (at most `timeout`) for its scores. Never
    /// blocks the calling thread: a full queue fails at once.
    pub async fn submit(&self, pair: Pair) -> Result<Scores, ClassifyError> {
        let tx = self.tx.as_ref().ok_or(ClassifyError::Unavailable)?;
        if !self.is_running() {
            return Err(ClassifyError::Unavailable);
        }
        let (reply, rx) = oneshot::channel();
        // Count before sending so the worker's decrement never underflows.
        self.stats.queue_depth.fetch_add(1, Ordering::Relaxed);
        match tx.try_send(Job {
            pair,
            enqueued: Instant::now(),
            reply,
        }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
                self.stats.overloaded.fetch_add(1, Ordering::Relaxed);
                return Err(ClassifyError::Overloaded {
                    capacity: self.config.queue_capacity,
                });
            }
            Err(TrySendError::Disconnected(_)) => {
                self.stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
                return Err(ClassifyError::Unavailable);
            }
        }
        match tokio::time::timeout(self.config.timeout, rx).await {
            Ok(Ok(result)) => result,
            // The worker dropped the reply without answering: it is gone.
            Ok(Err(_)) => Err(ClassifyError::Unavailable),
            Err(_) => {
                self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                Err(ClassifyError::Timeout {
                    ms: u64::try_from(self.config.timeout.as_millis()).unwrap_or(u64::MAX),
                })
            }
        }
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Closing the channel wakes idle workers; busy ones finish their
        // current batch, answer the rest `Unavailable`, and exit.
        self.tx.take();
        for handle in self.workers.drain(..) {
            if handle.join().is_err() {
                tracing::error!("an inference worker panicked while stopping");
            }
        }
    }
}

struct Worker<E> {
    engine: E,
    rx: Arc<Mutex<Receiver<Job>>>,
    stats: Arc<BatchStats>,
    stopping: Arc<AtomicBool>,
    live: Arc<AtomicUsize>,
    max_batch: usize,
    max_wait: Duration,
}

impl<E: BatchEngine> Worker<E> {
    fn run(mut self) {
        while let Some(jobs) = self.gather() {
            self.stats
                .queue_depth
                .fetch_sub(jobs.len(), Ordering::Relaxed);
            if self.stopping.load(Ordering::SeqCst) {
                for job in jobs {
                    let _ = job.reply.send(Err(ClassifyError::Unavailable));
                }
                continue;
            }
            self.serve(jobs);
        }
        self.live.fetch_sub(1, Ordering::SeqCst);
    }

    /// Block for one job, then take more until the batch is full or
    /// `max_wait` has passed. `None` once the channel is closed and empty.
    fn gather(&self) -> Option<Vec<Job>> {
        // Holding the lock while waiting is deliberate: only one worker
        // gathers at a time, the others are busy running their batch.
        let rx = self
            .rx
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let first = rx.recv().ok()?;
        let deadline = Instant::now() + self.max_wait;
        let mut jobs = vec![first];
        while jobs.len() < self.max_batch {
            match rx.try_recv() {
                Ok(job) => {
                    jobs.push(job);
                    continue;
                }
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match rx.recv_timeout(deadline - now) {
                Ok(job) => jobs.push(job),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        Some(jobs)
    }

    fn serve(&mut self, jobs: Vec<Job>) {
        let (jobs, gone): (Vec<Job>, Vec<Job>) =
            jobs.into_iter().partition(|j| !j.reply.is_closed());
        if !gone.is_empty() {
            self.stats
                .abandoned
                .fetch_add(gone.len() as u64, Ordering::Relaxed);
        }
        let Some(oldest) = jobs.iter().map(|j| j.enqueued).min() else {
            return;
        };
        let pairs: Vec<&Pair> = jobs.iter().map(|j| &j.pair).collect();
        let started = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| self.engine.run(&pairs)))
            .unwrap_or_else(|_| Err("inference engine panicked".to_string()))
            .and_then(|scores| {
                if scores.len() == pairs.len() {
                    Ok(scores)
                } else {
                    Err(format!(
                        "engine returned {} results for {} pairs",
                        scores.len(),
                        pairs.len()
                    ))
                }
            });
        let event = BatchEvent {
            size: jobs.len(),
            queue_depth: self.stats.queue_depth(),
            oldest_wait: started.saturating_duration_since(oldest),
            run_time: started.elapsed(),
            ok: result.is_ok(),
        };
        self.stats.record(&event);
        match result {
            Ok(scores) => {
                for (job, s) in jobs.into_iter().zip(scores) {
                    let _ = job.reply.send(Ok(s));
                }
            }
            Err(msg) => {
                tracing::warn!(batch = event.size, error = %msg, "classifier batch failed");
                for job in jobs {
                    let _ = job.reply.send(Err(ClassifyError::Backend(msg.clone())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Sender};

    /// Deterministic stand-in: scores a pair by its response length, records
    /// batch sizes, and can be held at a gate to build up a queue.
    struct FakeEngine {
        gate: Option<Arc<Gate>>,
        sizes: Sender<usize>,
        fail_on: Option<&'static str>,
    }

    impl BatchEngine for FakeEngine {
        fn run(&mut self, pairs: &[&Pair]) -> Result<Vec<Scores>, String> {
            // Report first, so a test knows the worker is inside the engine.
            let _ = self.sizes.send(pairs.len());
            if let Some(gate) = &self.gate {
                gate.wait();
            }
            if let Some(bad) = self.fail_on {
                if pairs.iter().any(|p| p.response == bad) {
                    return Err("boom".into());
                }
            }
            Ok(pairs
                .iter()
                .map(|p| {
                    let mut s = [0.0; 8];
                    s[p.response.len() % 8] = 1.0;
                    Scores(s)
                })
                .collect())
        }
    }

    /// Closed until `open()`: holds the engine so a queue builds up.
    #[derive(Default)]
    struct Gate {
        open: Mutex<bool>,
        cond: std::sync::Condvar,
    }

    impl Gate {
        fn wait(&self) {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            while !*open {
                open = self.cond.wait(open).unwrap_or_else(|p| p.into_inner());
            }
        }

        fn open(&self) {
            *self.open.lock().unwrap_or_else(|p| p.into_inner()) = true;
            self.cond.notify_all();
        }
    }

    fn pair(r: &str) -> Pair {
        Pair {
            context: String::new(),
            response: r.to_string(),
        }
    }

    fn config(max_batch: usize, queue_capacity: usize) -> BatchConfig {
        BatchConfig {
            max_batch,
            max_wait: Duration::from_millis(20),
            queue_capacity,
            timeout: Duration::from_secs(30),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_share_batches_and_get_their_own_answer() {
        let gate = Arc::new(Gate::default());
        let (sizes_tx, sizes) = channel();
        let engine = FakeEngine {
            gate: Some(Arc::clone(&gate)),
            sizes: sizes_tx,
            fail_on: None,
        };
        let batcher = Arc::new(Batcher::start(vec![engine], config(8, 64)).expect("start"));
        // Hold the engine so requests pile up in the queue deterministically.
        let mut tasks = Vec::new();
        for i in 0..20 {
            let b = Arc::clone(&batcher);
            tasks.push(tokio::spawn(async move {
                (i, b.submit(pair(&"x".repeat(i))).await)
            }));
        }
        // The worker takes a first batch and blocks in the engine; everything
        // else must then be queued behind it.
        let first = loop {
            match sizes.try_recv() {
                Ok(n) => break n,
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        };
        while batcher.stats().queue_depth() < 20 - first {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        gate.open();
        for t in tasks {
            let (i, result) = t.await.expect("task");
            assert_eq!(
                result.expect("scores").top().id(),
                i % 8,
                "request {i} got another's answer"
            );
        }
        let seen: Vec<usize> = std::iter::once(first).chain(sizes.try_iter()).collect();
        assert_eq!(seen.iter().sum::<usize>(), 20);
        assert!(seen.iter().all(|&n| n <= 8), "{seen:?}");
        assert!(
            seen.iter().any(|&n| n > 1),
            "no batching happened: {seen:?}"
        );
        let snap = batcher.stats().snapshot();
        assert_eq!(snap.items, 20);
        assert_eq!(snap.queue_depth, 0);
        assert_eq!(snap.batch_sizes.iter().sum::<u64>(), snap.batches);
        assert!(snap.max_batch_seen() > 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_queue_fails_fast_with_overloaded() {
        let gate = Arc::new(Gate::default());
        let (sizes_tx, sizes) = channel();
        let engine = FakeEngine {
            gate: Some(Arc::clone(&gate)),
            sizes: sizes_tx,
            fail_on: None,
        };
        let batcher = Arc::new(Batcher::start(vec![engine], config(1, 2)).expect("start"));
        // One request is taken by the (blocked) worker, two fill the queue.
        let first = tokio::spawn({
            let b = Arc::clone(&batcher);
            async move { b.submit(pair("a")).await }
        });
        while sizes.try_recv().is_err() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let queued: Vec<_> = (0..2)
            .map(|_| {
                let b = Arc::clone(&batcher);
                tokio::spawn(async move { b.submit(pair("b")).await })
            })
            .collect();
        while batcher.stats().queue_depth() < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let err = batcher.submit(pair("c")).await.expect_err("queue is full");
        assert!(
            matches!(err, ClassifyError::Overloaded { capacity: 2 }),
            "{err:?}"
        );
        assert_eq!(batcher.stats().snapshot().overloaded, 1);
        gate.open();
        assert!(first.await.expect("task").is_ok());
        for q in queued {
            assert!(q.await.expect("task").is_ok());
        }
    }

    #[tokio::test]
    async fn slow_engine_gives_timeout() {
        let gate = Arc::new(Gate::default());
        let (sizes_tx, _sizes) = channel();
        let engine = FakeEngine {
            gate: Some(Arc::clone(&gate)),
            sizes: sizes_tx,
            fail_on: None,
        };
        let mut cfg = config(4, 8);
        cfg.timeout = Duration::from_millis(50);
        let batcher = Batcher::start(vec![engine], cfg).expect("start");
        let err = batcher.submit(pair("a")).await.expect_err("engine is held");
        assert!(matches!(err, ClassifyError::Timeout { ms: 50 }), "{err:?}");
        assert_eq!(batcher.stats().snapshot().timed_out, 1);
        gate.open();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn engine_errors_reach_every_request_of_the_batch_and_workers_survive() {
        let (sizes_tx, _sizes) = channel();
        let engine = FakeEngine {
            gate: None,
            sizes: sizes_tx,
            fail_on: Some("bad"),
        };
        let batcher = Batcher::start(vec![engine], config(4, 8)).expect("start");
        let err = batcher.submit(pair("bad")).await.expect_err("engine fails");
        assert!(
            matches!(&err, ClassifyError::Backend(m) if m == "boom"),
            "{err:?}"
        );
        assert!(batcher.submit(pair("ok")).await.is_ok());
        assert_eq!(batcher.stats().snapshot().failed_batches, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drop_stops_workers_and_observer_sees_batches() {
        let (sizes_tx, _sizes) = channel();
        let engine = FakeEngine {
            gate: None,
            sizes: sizes_tx,
            fail_on: None,
        };
        let batcher = Batcher::start(vec![engine], config(4, 8)).expect("start");
        let seen = Arc::new(AtomicUsize::new(0));
        let seen2 = Arc::clone(&seen);
        assert!(batcher
            .stats()
            .set_observer(Arc::new(move |e: &BatchEvent| {
                seen2.fetch_add(e.size, Ordering::SeqCst);
            })));
        assert!(batcher.submit(pair("a")).await.is_ok());
        assert_eq!(seen.load(Ordering::SeqCst), 1);
        let live = Arc::clone(&batcher.live_workers);
        drop(batcher);
        assert_eq!(live.load(Ordering::SeqCst), 0, "workers must have exited");
    }

    #[test]
    fn zero_limits_are_rejected() {
        let (sizes_tx, _sizes) = channel();
        let engine = || FakeEngine {
            gate: None,
            sizes: sizes_tx.clone(),
            fail_on: None,
        };
        assert!(Batcher::start(vec![engine()], config(0, 8)).is_err());
        assert!(Batcher::start(vec![engine()], config(4, 0)).is_err());
        assert!(Batcher::start(Vec::<FakeEngine>::new(), config(4, 8)).is_err());
    }
}
