//! The audit trail: what the gateway flagged, what it did, and what a
//! counsellor later said about it.
//!
//! Flow: the gateway fills an [`AuditRecord`] (plain text, raw conversation
//! key) and hands it to an [`AuditSink`]. The sink's writer task redacts the
//! text per [`TextMode`], hashes the conversation key into a pseudonym,
//! encrypts the text, and writes batches to an [`AuditStore`] (SQLite or
//! PostgreSQL).
//!
//! Invariants:
//! - Conversation text never reaches a log line, a span, or the database in
//!   clear: it leaves [`AuditRecord`] only as ciphertext ([`crypto`]).
//! - The raw conversation key (user id) is never stored; only its keyed hash.
//! - `audit` knows nothing about HTTP; the review API lives in `crate::admin`.
//! - Writes never sit on the response path: [`AuditSink::try_submit`] never
//!   waits, [`AuditSink::submit`] waits at most `block_timeout`.

pub mod crypto;
pub mod export;
pub mod gateway;
pub mod pseudonym;
pub mod record;
pub mod redact;
pub mod settings;
pub mod sink;
pub mod store;
pub mod summary;

pub use crypto::{CryptoError, Keyring};
pub use pseudonym::Pseudonymizer;
pub use record::{
    AuditRecord, Latency, RecordView, Review, ReviewEvent, ReviewKind, StoredRecord, StoredText,
};
pub use settings::{
    AdminSettings, AuditSettings, Overflow, RawAdminSection, RawAuditSection, SettingsError,
    StoreUrl, TextMode,
};
pub use sink::{AuditSink, AuditStats, SinkOptions, SubmitOutcome};
pub use store::{open_store, AuditStore, ListFilter, Page, StoreError, UndoOutcome};
