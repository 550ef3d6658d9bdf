//! Audit trail costs: redaction and sealing (the writer's CPU per record,
//! off the response path) and SQLite batch inserts (records per second the
//! writer can commit).
//!
//! Run: `cargo bench --bench audit`
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use carewall::audit::crypto::Key;
use carewall::audit::redact::redact;
use carewall::audit::store::SqliteStore;
use carewall::audit::{
    AuditRecord, AuditStore, Keyring, Latency, Pseudonymizer, StoredRecord, TextMode,
};
use carewall::classifier::{Category, Scores};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn sample(i: usize) -> AuditRecord {
    // 436 characters (940 bytes) of context with a phone number and an
    // e-mail address in every turn pair, and a short response.
    let context = "[seeker]我最近压力很大，晚上睡不着，总觉得自己什么都做不好。我的电话是13812345678，邮箱zhang.san@qq.com。[supporter]听起来你最近真的很辛苦，能多说说是什么让你觉得做不好吗？".repeat(4);
    AuditRecord {
        request_id: format!("bench-{i}"),
        time: SystemTime::now(),
        tenant: Some("tenant".into()),
        conversation_key: Some("user-1".into()),
        model: "gpt-4o-mini".into(),
        policy_name: "default".into(),
        policy_version: "1".into(),
        streaming: "buffered".into(),
        scores: Scores([0.01, 0.02, 0.6, 0.05, 0.02, 0.1, 0.1, 0.1]),
        category: Category::LinguisticNeglect,
        threshold: Some(0.5),
        action: "annotate".into(),
        shadow: false,
        latency: Latency::default(),
        context,
        response: "[supporter]你要坚强一点，别想太多了，早点睡觉就好了。Call me at (415) 555-1234."
            .into(),
        drafts: Vec::new(),
        delivered: "你要坚强一点，别想太多了，早点睡觉就好了。".into(),
    }
}

fn bench(c: &mut Criterion) {
    let ring = Keyring::new(Key::from_bytes(&[1; 32]));
    let pseudo = Pseudonymizer::new([2; 32]);
    let rec = sample(0);

    c.bench_function("redact_context_436_chars", |b| {
        b.iter(|| redact(&rec.context))
    });
    c.bench_function("seal_record_redacted", |b| {
        b.iter(|| {
            StoredRecord::seal(rec.clone(), TextMode::Redacted, Some(&ring), Some(&pseudo)).unwrap()
        })
    });
    c.bench_function("seal_record_full", |b| {
        b.iter(|| {
            StoredRecord::seal(rec.clone(), TextMode::Full, Some(&ring), Some(&pseudo)).unwrap()
        })
    });

    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = rt
        .block_on(SqliteStore::open(&dir.path().join("bench.db")))
        .unwrap();
    let mut g = c.benchmark_group("sqlite_insert_batch");
    g.measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(256));
    let mut n = 0usize;
    g.bench_function("256_records", |b| {
        b.iter_batched(
            || {
                (0..256)
                    .map(|_| {
                        n += 1;
                        StoredRecord::seal(
                            sample(n),
                            TextMode::Redacted,
                            Some(&ring),
                            Some(&pseudo),
                        )
                        .unwrap()
                    })
                    .collect::<Vec<_>>()
            },
            |batch| rt.block_on(store.insert_batch(&batch)).unwrap(),
            criterion::BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
