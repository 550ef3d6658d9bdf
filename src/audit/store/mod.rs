//! One storage interface, [`AuditStore`], with an SQLite implementation
//! (embedded default: a file in WAL mode) and a PostgreSQL one. Both run the
//! same SQL (`$N` placeholders work in both) except for the DDL, and both
//! apply their migrations on open.
//!
//! Invariant: stores move bytes; they never see plaintext conversation text
//! or keys. Listing order is newest first (`time_ms DESC, request_id DESC`),
//! and cursors are keyset positions in that order, so paging is stable while
//! new records arrive.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use base64::Engine as _;

use crate::classifier::{Category, Scores};

use super::record::{Latency, Review, ReviewEvent, ReviewKind, StoredRecord, StoredText};
use super::settings::{StoreUrl, TextMode};

mod common;
mod postgres;
mod sql;
mod sqlite;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// Why a store operation failed. Messages carry no record text.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or reached.
    #[error("cannot open audit store {url}: {reason}")]
    Connect { url: String, reason: String },
    /// A migration failed.
    #[error("audit store migration {version} failed: {reason}")]
    Migrate { version: i64, reason: String },
    /// A query failed.
    #[error("audit store {op} failed: {reason}")]
    Query { op: &'static str, reason: String },
    /// A row could not be decoded (a schema or data problem).
    #[error("audit record `{request_id}` is unreadable: {reason}")]
    Corrupt { request_id: String, reason: String },
    /// The caller passed something invalid (a bad cursor, schema name...).
    #[error("{0}")]
    Invalid(String),
}

/// Boxed future so `AuditStore` can be a trait object.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Largest page [`AuditStore::list`] returns.
pub const MAX_LIMIT: u32 = 500;

/// A keyset position: the last item of the previous page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub time_ms: i64,
    pub request_id: String,
}

impl Cursor {
    /// Opaque, URL-safe form.
    pub fn encode(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{}:{}", self.time_ms, self.request_id))
    }

    /// Parse [`Cursor::encode`]'s output.
    pub fn decode(s: &str) -> Result<Cursor, StoreError> {
        let bad = || {
            StoreError::Invalid(format!(
                "`cursor`: `{s}` is not a cursor returned by this API"
            ))
        };
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| bad())?;
        let text = String::from_utf8(raw).map_err(|_| bad())?;
        let (t, id) = text.split_once(':').ok_or_else(bad)?;
        Ok(Cursor {
            time_ms: t.parse().map_err(|_| bad())?,
            request_id: id.to_string(),
        })
    }
}

/// Which records to list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListFilter {
    pub category: Option<Category>,
    pub action: Option<String>,
    pub shadow: Option<bool>,
    pub reviewed: Option<bool>,
    /// Inclusive lower bound, ms since the epoch.
    pub since_ms: Option<i64>,
    /// Exclusive upper bound, ms since the epoch.
    pub until_ms: Option<i64>,
    pub conversation_id: Option<String>,
    /// 1..=[`MAX_LIMIT`]; 0 means the default of 50.
    pub limit: u32,
    pub cursor: Option<Cursor>,
}

/// One page of records.
#[derive(Debug, Clone)]
pub struct Page {
    pub items: Vec<StoredRecord>,
    /// Pass back as `cursor` for the next page; `None` at the end.
    pub next_cursor: Option<Cursor>,
}

/// What [`AuditStore::undo_review`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UndoOutcome {
    /// The label was withdrawn.
    Undone,
    /// No record with that request id.
    NoRecord,
    /// The record has no label in force.
    NothingToUndo,
    /// The label in force is another history entry than the expected one.
    Stale { current: i64 },
}

/// Record counts for one (category, action, shadow) group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupCount {
    pub category: Category,
    pub action: String,
    pub shadow: bool,
    pub total: u64,
    pub reviewed: u64,
}

/// Storage for audit records. All methods are cancel-safe in the sense that
/// a dropped future leaves the database consistent (each write is one
/// transaction).
pub trait AuditStore: Send + Sync + 'static {
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;

    /// Insert records in one transaction. Records whose `request_id` is
    /// already stored are skipped (so a retried batch is harmless). Returns
    /// how many were new.
    fn insert_batch<'a>(&'a self, records: &'a [StoredRecord]) -> StoreFuture<'a, u64>;

    /// A page of records, newest first.
    fn list<'a>(&'a self, filter: &'a ListFilter) -> StoreFuture<'a, Page>;

    /// One record by request id.
    fn get<'a>(&'a self, request_id: &'a str) -> StoreFuture<'a, Option<StoredRecord>>;

    /// Label a record: append the label to its review history and make it
    /// the review in force (the previous one stays in the history). `false`
    /// if no such record.
    fn review<'a>(&'a self, request_id: &'a str, review: &'a Review) -> StoreFuture<'a, bool>;

    /// Withdraw the label in force: append an undo by `reviewer` to the
    /// history; the label before it (if any) is in force again. With
    /// `expected`, only if the label in force is that history entry (so a
    /// console never undoes a label someone else gave since).
    fn undo_review<'a>(
        &'a self,
        request_id: &'a str,
        reviewer: &'a str,
        time_ms: i64,
        expected: Option<i64>,
    ) -> StoreFuture<'a, UndoOutcome>;

    /// Counts grouped by (category, action, shadow).
    fn group_counts(&self) -> StoreFuture<'_, Vec<GroupCount>>;

    /// Delete records older than `cutoff_ms`; returns how many.
    fn purge_before(&self, cutoff_ms: i64) -> StoreFuture<'_, u64>;

    /// Close connections (waits for queries in flight).
    fn close(&self) -> StoreFuture<'_, ()>;
}

/// Open the store a URL names and apply migrations.
pub async fn open_store(url: &StoreUrl) -> Result<Arc<dyn AuditStore>, StoreError> {
    Ok(match url {
        StoreUrl::Sqlite(path) => Arc::new(SqliteStore::open(path).await?),
        StoreUrl::Postgres(u) => Arc::new(PostgresStore::connect(u, None).await?),
    })
}

/// Every reviewed record, oldest review pages first by listing order; pages
/// through the store so memory stays bounded per page.
pub async fn all_reviewed(store: &dyn AuditStore) -> Result<Vec<StoredRecord>, StoreError> {
    reviewed_matching(store, &ListFilter::default()).await
}

/// Every reviewed record that `filter` selects (its `reviewed`, `limit` and
/// `cursor` are ignored), newest first, paging through the store.
pub async fn reviewed_matching(
    store: &dyn AuditStore,
    filter: &ListFilter,
) -> Result<Vec<StoredRecord>, StoreError> {
    let mut out = Vec::new();
    let mut filter = ListFilter {
        reviewed: Some(true),
        limit: MAX_LIMIT,
        cursor: None,
        ..filter.clone()
    };
    loop {
        let page = store.list(&filter).await?;
        out.extend(page.items);
        match page.next_cursor {
            Some(c) => filter.cursor = Some(c),
            None => return Ok(out),
        }
    }
}

/// A row's columns in Rust types both backends decode natively.
pub(crate) struct RowData {
    pub request_id: String,
    pub time_ms: i64,
    pub tenant: Option<String>,
    pub conversation_id: Option<String>,
    pub model: String,
    pub policy_name: String,
    pub policy_version: String,
    pub streaming: String,
    pub scores: String,
    pub category: String,
    pub threshold: Option<f64>,
    pub action: String,
    pub shadow: bool,
    pub classifier_ms: Option<f64>,
    pub added_ms: Option<f64>,
    pub upstream_ms: Option<f64>,
    pub text_mode: String,
    pub key_id: Option<String>,
    pub nonce: Option<Vec<u8>>,
    pub ciphertext: Option<Vec<u8>>,
    pub review_label: Option<i64>,
    pub review_note: Option<String>,
    pub reviewer: Option<String>,
    pub reviewed_ms: Option<i64>,
}

impl RowData {
    pub(crate) fn into_record(self) -> Result<StoredRecord, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            request_id: self.request_id.clone(),
            reason,
        };
        let scores: [f32; 8] =
            serde_json::from_str(&self.scores).map_err(|e| corrupt(format!("scores: {e}")))?;
        let category = Category::parse(&self.category)
            .ok_or_else(|| corrupt(format!("unknown category `{}`", self.category)))?;
        let mode = TextMode::parse(&self.text_mode)
            .ok_or_else(|| corrupt(format!("unknown text mode `{}`", self.text_mode)))?;
        let review = match (self.review_label, &self.reviewer, self.reviewed_ms) {
            (Some(l), Some(who), Some(t)) => Some(Review {
                label: usize::try_from(l)
                    .ok()
                    .and_then(Category::from_id)
                    .ok_or_else(|| corrupt(format!("review label {l} out of range")))?,
                note: self.review_note.clone(),
                reviewer: who.clone(),
                time_ms: t,
            }),
            _ => None,
        };
        Ok(StoredRecord {
            request_id: self.request_id,
            time_ms: self.time_ms,
            tenant: self.tenant,
            conversation_id: self.conversation_id,
            model: self.model,
            policy_name: self.policy_name,
            policy_version: self.policy_version,
            streaming: self.streaming,
            scores: Scores(scores),
            category,
            threshold: self.threshold.map(|t| t as f32),
            action: self.action,
            shadow: self.shadow,
            latency: Latency {
                classifier_ms: self.classifier_ms,
                added_ms: self.added_ms,
                upstream_ms: self.upstream_ms,
            },
            text: StoredText {
                mode,
                key_id: self.key_id,
                nonce: self.nonce,
                ciphertext: self.ciphertext,
            },
            review,
            history: Vec::new(),
        })
    }
}

/// A history entry to append.
pub(crate) struct NewReview<'a> {
    pub request_id: &'a str,
    pub kind: ReviewKind,
    pub label: Option<i64>,
    pub note: Option<&'a str>,
    pub reviewer: &'a str,
    pub time_ms: i64,
    pub undoes: Option<i64>,
}

/// A review history row in Rust types both backends decode natively.
pub(crate) struct ReviewRow {
    pub request_id: String,
    pub id: i64,
    pub kind: String,
    pub label: Option<i64>,
    pub note: Option<String>,
    pub reviewer: String,
    pub time_ms: i64,
    pub undoes: Option<i64>,
}

impl ReviewRow {
    pub(crate) fn into_event(self) -> Result<(String, ReviewEvent), StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            request_id: self.request_id.clone(),
            reason,
        };
        let kind = ReviewKind::parse(&self.kind)
            .ok_or_else(|| corrupt(format!("unknown review entry kind `{}`", self.kind)))?;
        let label = match self.label {
            None => None,
            Some(l) => Some(
                usize::try_from(l)
                    .ok()
                    .and_then(Category::from_id)
                    .ok_or_else(|| corrupt(format!("review label {l} out of range")))?,
            ),
        };
        if kind == ReviewKind::Label && label.is_none() {
            return Err(corrupt(format!("review entry {} has no label", self.id)));
        }
        Ok((
            self.request_id,
            ReviewEvent {
                id: self.id,
                kind,
                label,
                note: self.note,
                reviewer: self.reviewer,
                time_ms: self.time_ms,
                undoes: self.undoes,
            },
        ))
    }
}

/// Normalise a requested page size.
pub(crate) fn effective_limit(limit: u32) -> u32 {
    match limit {
        0 => 50,
        n => n.min(MAX_LIMIT),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip_and_rejects_garbage() {
        let c = Cursor {
            time_ms: 1_700_000_000_000,
            request_id: "req:with:colons".into(),
        };
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        for bad in ["", "!!!", "bm9jb2xvbg", "eDp5"] {
            let e = Cursor::decode(bad).unwrap_err().to_string();
            assert!(e.contains("`cursor`"), "{e}");
        }
    }
}
