//! The store contract, run against SQLite (a real file) and against the real
//! PostgreSQL server named by `CAREWALL_TEST_POSTGRES_URL`.
#![allow(clippy::unwrap_used)]

mod audit_common;

use std::collections::HashSet;

use audit_common::*;
use carewall::audit::crypto::Key;
use carewall::audit::store::{ListFilter, SqliteStore, UndoOutcome};
use carewall::audit::{AuditStore, CryptoError, Keyring, Review, ReviewKind, TextMode};
use carewall::classifier::Category;

const N: usize = 40;

/// Everything a store must do, on any backend.
async fn contract(store: &dyn AuditStore) {
    // Insert in two batches; a repeated batch inserts nothing.
    let records: Vec<_> = (0..N).map(|i| sealed(i, TextMode::Redacted)).collect();
    assert_eq!(store.insert_batch(&records[..25]).await.unwrap(), 25);
    assert_eq!(store.insert_batch(&records[20..]).await.unwrap(), 15);
    assert_eq!(store.insert_batch(&records[..5]).await.unwrap(), 0);

    // get round-trips every field.
    let got = store.get("req-0007").await.unwrap().unwrap();
    assert_eq!(got, records[7]);
    assert!(store.get("nope").await.unwrap().is_none());

    // Paging: newest first, every record exactly once.
    let mut seen = Vec::new();
    let mut f = ListFilter {
        limit: 7,
        ..ListFilter::default()
    };
    loop {
        let page = store.list(&f).await.unwrap();
        assert!(page.items.len() <= 7);
        seen.extend(page.items.iter().map(|r| r.request_id.clone()));
        match page.next_cursor {
            Some(c) => f.cursor = Some(c),
            None => break,
        }
    }
    let want: Vec<String> = (0..N).rev().map(|i| format!("req-{i:04}")).collect();
    assert_eq!(seen, want);

    // Filters, each checked against the same predicate on the samples.
    let all = |f: ListFilter| async move {
        let mut f = ListFilter { limit: 500, ..f };
        f.limit = 500;
        store.list(&f).await.unwrap().items
    };
    let by_cat = all(ListFilter {
        category: Some(Category::ToxicLanguage),
        ..ListFilter::default()
    })
    .await;
    assert_eq!(by_cat.len(), N / 8);
    assert!(by_cat.iter().all(|r| r.category == Category::ToxicLanguage));
    let allowed = all(ListFilter {
        action: Some("allow".into()),
        ..ListFilter::default()
    })
    .await;
    assert_eq!(allowed.len(), N / 4);
    let shadow = all(ListFilter {
        shadow: Some(true),
        action: Some("block".into()),
        ..ListFilter::default()
    })
    .await;
    let want_shadow = (0..N).filter(|i| i % 3 == 0 && i % 4 != 3).count();
    assert_eq!(shadow.len(), want_shadow);
    let window = all(ListFilter {
        since_ms: Some(T0 + 10_000),
        until_ms: Some(T0 + 20_000),
        ..ListFilter::default()
    })
    .await;
    let ids: HashSet<_> = window.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(ids.len(), 10, "since inclusive, until exclusive");
    assert!(ids.contains("req-0010") && !ids.contains("req-0020"));
    let conv = records[4].conversation_id.clone().unwrap();
    let by_conv = all(ListFilter {
        conversation_id: Some(conv.clone()),
        ..ListFilter::default()
    })
    .await;
    assert_eq!(by_conv.len(), (0..N).filter(|i| i % 3 == 4 % 3).count());

    // Reviews.
    let review = Review {
        label: Category::UnamiableJudgment,
        note: Some("harsh tone".into()),
        reviewer: "counsellor-1".into(),
        time_ms: T0 + 99_000,
    };
    assert!(store.review("req-0004", &review).await.unwrap());
    assert!(!store.review("nope", &review).await.unwrap());
    let second = Review {
        label: Category::SafeResponse,
        note: None,
        reviewer: "counsellor-2".into(),
        time_ms: T0 + 100_000,
    };
    assert!(store.review("req-0005", &second).await.unwrap());
    assert_eq!(
        store.get("req-0004").await.unwrap().unwrap().review,
        Some(review.clone())
    );
    let reviewed = all(ListFilter {
        reviewed: Some(true),
        ..ListFilter::default()
    })
    .await;
    assert_eq!(
        reviewed
            .iter()
            .map(|r| r.request_id.as_str())
            .collect::<Vec<_>>(),
        ["req-0005", "req-0004"]
    );
    let unreviewed = all(ListFilter {
        reviewed: Some(false),
        ..ListFilter::default()
    })
    .await;
    assert_eq!(unreviewed.len(), N - 2);

    // Counts.
    let counts = store.group_counts().await.unwrap();
    assert_eq!(counts.iter().map(|c| c.total).sum::<u64>(), N as u64);
    assert_eq!(counts.iter().map(|c| c.reviewed).sum::<u64>(), 2);
    let toxic_block: u64 = counts
        .iter()
        .filter(|c| c.category == Category::ToxicLanguage && c.action == "block")
        .map(|c| c.total)
        .sum();
    assert_eq!(
        toxic_block,
        (0..N).filter(|i| i % 8 == 4 && i % 4 != 3).count() as u64
    );

    // Review history: append-only, an undo brings the label before back.
    let relabel = Review {
        label: Category::ToxicLanguage,
        note: Some("on second thought".into()),
        reviewer: "counsellor-2".into(),
        time_ms: T0 + 101_000,
    };
    assert!(store.review("req-0004", &relabel).await.unwrap());
    let r = store.get("req-0004").await.unwrap().unwrap();
    assert_eq!(r.review, Some(relabel.clone()));
    let h = r.history.clone();
    assert_eq!(h.len(), 2, "{h:?}");
    assert!(h.iter().all(|e| e.kind == ReviewKind::Label));
    assert!(h[0].id < h[1].id);
    assert_eq!(
        (h[0].label, h[0].note.as_deref(), h[0].reviewer.as_str()),
        (
            Some(Category::UnamiableJudgment),
            Some("harsh tone"),
            "counsellor-1"
        )
    );
    assert_eq!(
        (h[1].label, h[1].time_ms),
        (Some(Category::ToxicLanguage), T0 + 101_000)
    );
    let listed = all(ListFilter {
        reviewed: Some(true),
        ..ListFilter::default()
    })
    .await;
    let in_list = listed.iter().find(|r| r.request_id == "req-0004").unwrap();
    assert_eq!(in_list.history, h, "the list carries the history too");
    // An undo of a label that is no longer in force is refused.
    assert_eq!(
        store
            .undo_review("req-0004", "counsellor-3", T0 + 102_000, Some(h[0].id))
            .await
            .unwrap(),
        UndoOutcome::Stale { current: h[1].id }
    );
    assert_eq!(
        store
            .undo_review("req-0004", "counsellor-3", T0 + 102_000, Some(h[1].id))
            .await
            .unwrap(),
        UndoOutcome::Undone
    );
    let r = store.get("req-0004").await.unwrap().unwrap();
    assert_eq!(r.review, Some(review.clone()), "the first label is back");
    assert_eq!(r.history.len(), 3);
    let undo = &r.history[2];
    assert_eq!(
        (undo.kind, undo.undoes, undo.reviewer.as_str(), undo.label),
        (ReviewKind::Undo, Some(h[1].id), "counsellor-3", None)
    );
    assert_eq!(
        store
            .undo_review("req-0004", "counsellor-3", T0 + 103_000, None)
            .await
            .unwrap(),
        UndoOutcome::Undone
    );
    let r = store.get("req-0004").await.unwrap().unwrap();
    assert_eq!((r.review.as_ref(), r.history.len()), (None, 4));
    assert_eq!(
        store
            .undo_review("req-0004", "counsellor-3", T0 + 104_000, None)
            .await
            .unwrap(),
        UndoOutcome::NothingToUndo
    );
    assert_eq!(
        store.undo_review("nope", "x", 0, None).await.unwrap(),
        UndoOutcome::NoRecord
    );
    let unreviewed = all(ListFilter {
        reviewed: Some(false),
        ..ListFilter::default()
    })
    .await;
    assert_eq!(
        unreviewed.len(),
        N - 1,
        "an undone record is unreviewed again"
    );
    // Labelled again: the history goes on.
    assert!(store.review("req-0004", &review).await.unwrap());
    assert_eq!(
        store.get("req-0004").await.unwrap().unwrap().history.len(),
        5
    );

    // Text opens with the key only.
    let opened = got.open_text(Some(&keyring())).unwrap().unwrap();
    let (ctx, resp) = (opened.context, opened.response);
    assert!(
        ctx.contains("secret-context-7") && ctx.contains("[PHONE]"),
        "{ctx}"
    );
    assert!(resp.contains("secret-response-7"));
    let wrong = Keyring::new(Key::from_bytes(&[1; 32]));
    let err = got.open_text(Some(&wrong)).unwrap_err();
    assert!(matches!(err, CryptoError::UnknownKey { .. }), "{err}");

    // Purge: records before T0+30s go.
    assert_eq!(store.purge_before(T0 + 30_000).await.unwrap(), 30);
    assert_eq!(all(ListFilter::default()).await.len(), N - 30);
    assert!(store.get("req-0004").await.unwrap().is_none());
}

#[tokio::test]
async fn sqlite_store_contract_and_encryption_at_rest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let store = SqliteStore::open(&path).await.unwrap();
    assert_eq!(store.journal_mode().await.unwrap(), "wal");
    contract(&store).await;
    assert_eq!(store.integrity_check().await.unwrap(), "ok");
    assert_eq!(
        sqlite_count(&path, "SELECT COUNT(*) FROM audit_reviews").await,
        0,
        "retention removed the purged records' review history"
    );
    // Write one more and check no plaintext reaches the file or its WAL.
    store
        .insert_batch(&[sealed(100, TextMode::Full)])
        .await
        .unwrap();
    store.close().await.unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    if let Ok(wal) = std::fs::read(dir.path().join("audit.db-wal")) {
        bytes.extend(wal);
    }
    assert!(contains(&bytes, b"req-0100"), "the row is there");
    for needle in [
        "secret-context-100",
        "secret-response-100",
        "13812345678",
        "user-1",
    ] {
        assert!(
            !contains(&bytes, needle.as_bytes()),
            "{needle} stored in clear"
        );
    }
    // Reopening runs migrations again harmlessly and keeps the data.
    let again = SqliteStore::open(&path).await.unwrap();
    let r = again.get("req-0100").await.unwrap().unwrap();
    let ctx = r.open_text(Some(&keyring())).unwrap().unwrap().context;
    assert!(ctx.contains("13812345678"), "full mode keeps the number");
    assert_eq!(
        again.get("req-0035").await.unwrap().unwrap().request_id,
        "req-0035"
    );
}

#[tokio::test]
async fn sqlite_open_errors_are_clear() {
    let err = SqliteStore::open(std::path::Path::new("/nonexistent-dir/x/audit.db"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("/nonexistent-dir/x") && err.contains("does not exist"),
        "{err}"
    );
}

#[tokio::test]
async fn postgres_store_contract_and_encryption_at_rest() {
    let Some(url) = pg_url("postgres_store_contract_and_encryption_at_rest") else {
        return;
    };
    let schema = unique_schema("store");
    let _cleanup = SchemaGuard::new(&url, &schema);
    let store = pg_store(&url, &schema).await;
    assert_eq!(store.backend(), "postgres");
    contract(store.as_ref()).await;
    {
        use sqlx::Connection as _;
        let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
        let (n,): (i64,) =
            sqlx::query_as(&format!("SELECT COUNT(*) FROM \"{schema}\".audit_reviews"))
                .fetch_one(&mut c)
                .await
                .unwrap();
        assert_eq!(n, 0, "retention removed the purged records' review history");
    }
    store
        .insert_batch(&[sealed(100, TextMode::Full)])
        .await
        .unwrap();
    // Every column of every row, as PostgreSQL renders it.
    {
        use sqlx::Connection as _;
        let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
        let rows: Vec<(String,)> =
            sqlx::query_as(&format!("SELECT t::text FROM \"{schema}\".audit_records t"))
                .fetch_all(&mut c)
                .await
                .unwrap();
        let dump = rows.into_iter().map(|r| r.0).collect::<String>();
        assert!(dump.contains("req-0100"));
        for needle in [
            "secret-context-100",
            "secret-response-100",
            "13812345678",
            "user-1",
        ] {
            assert!(!dump.contains(needle), "{needle} stored in clear");
        }
    }
    // A second connection migrates harmlessly and sees the data.
    let again = pg_store(&url, &schema).await;
    assert!(again.get("req-0100").await.unwrap().is_some());
    store.close().await.unwrap();
    again.close().await.unwrap();
}

#[tokio::test]
async fn postgres_connect_errors_hide_the_password() {
    let err = carewall::audit::store::PostgresStore::connect(
        "postgres://someone:hunter2@127.0.0.1:1/none",
        None,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("someone:***@127.0.0.1:1"), "{err}");
    assert!(!err.contains("hunter2"));
}

async fn sqlite_count(path: &std::path::Path, sql: &str) -> i64 {
    use sqlx::Connection as _;
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let (n,): (i64,) = sqlx::query_as(sql).fetch_one(&mut c).await.unwrap();
    c.close().await.unwrap();
    n
}

/// The schema of the first release (migration 1 only), with one reviewed
/// record, as a store written by an older binary looks.
const V1_SCHEMA: &str = "CREATE TABLE carewall_audit_migrations (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL);
    INSERT INTO carewall_audit_migrations VALUES (1, 0);
    CREATE TABLE audit_records (request_id TEXT PRIMARY KEY NOT NULL, time_ms INTEGER NOT NULL,
        tenant TEXT, conversation_id TEXT, model TEXT NOT NULL, policy_name TEXT NOT NULL,
        policy_version TEXT NOT NULL, streaming TEXT NOT NULL, scores TEXT NOT NULL,
        category TEXT NOT NULL, threshold REAL, action TEXT NOT NULL,
        shadow INTEGER NOT NULL CHECK (shadow IN (0, 1)), classifier_ms REAL, added_ms REAL,
        upstream_ms REAL, text_mode TEXT NOT NULL, key_id TEXT, nonce BLOB, ciphertext BLOB,
        review_label INTEGER, review_note TEXT, reviewer TEXT, reviewed_ms INTEGER);
    INSERT INTO audit_records VALUES ('old-1', 1767225600000, NULL, NULL, 'm', 'default', '1',
        'none', '[0.1,0.1,0.1,0.1,0.3,0.1,0.1,0.1]', 'toxic_language', 0.5, 'block', 0,
        NULL, NULL, NULL, 'none', NULL, NULL, NULL, 4, 'rude', 'counsellor-0', 1767225700000);
    INSERT INTO audit_records VALUES ('old-2', 1767225601000, NULL, NULL, 'm', 'default', '1',
        'none', '[0.1,0.1,0.1,0.1,0.3,0.1,0.1,0.1]', 'toxic_language', 0.5, 'block', 0,
        NULL, NULL, NULL, 'none', NULL, NULL, NULL, NULL, NULL, NULL, NULL);";

#[tokio::test]
async fn an_older_sqlite_store_migrates_with_its_reviews_as_history() {
    use sqlx::Connection as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    {
        let mut c =
            sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=rwc", path.display()))
                .await
                .unwrap();
        sqlx::raw_sql(V1_SCHEMA).execute(&mut c).await.unwrap();
        c.close().await.unwrap();
    }
    let store = SqliteStore::open(&path).await.unwrap();
    let r = store.get("old-1").await.unwrap().unwrap();
    assert_eq!(
        r.review.as_ref().map(|v| v.label),
        Some(Category::ToxicLanguage)
    );
    assert_eq!(r.history.len(), 1, "{:?}", r.history);
    assert_eq!(
        (
            r.history[0].kind,
            r.history[0].note.as_deref(),
            r.history[0].reviewer.as_str(),
            r.history[0].time_ms
        ),
        (
            ReviewKind::Label,
            Some("rude"),
            "counsellor-0",
            1_767_225_700_000
        )
    );
    assert!(store
        .get("old-2")
        .await
        .unwrap()
        .unwrap()
        .history
        .is_empty());
    assert_eq!(
        store.undo_review("old-1", "c", 1, None).await.unwrap(),
        UndoOutcome::Undone
    );
    assert!(store.get("old-1").await.unwrap().unwrap().review.is_none());
    store.close().await.unwrap();
    // The old columns still hold the review in force, so an older binary
    // reading the same file sees the undo too.
    assert_eq!(
        sqlite_count(
            &path,
            "SELECT COUNT(*) FROM audit_records WHERE review_label IS NOT NULL"
        )
        .await,
        0
    );
    // Opening again applies nothing twice.
    let again = SqliteStore::open(&path).await.unwrap();
    assert_eq!(again.get("old-1").await.unwrap().unwrap().history.len(), 2);
    again.close().await.unwrap();
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
