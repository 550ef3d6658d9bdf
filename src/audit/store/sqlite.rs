//! SQLite store: one file, WAL mode, `synchronous = FULL` so a committed
//! batch survives a process kill and a power cut alike; a busy timeout so a
//! reader (the CLI) never makes the writer fail.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool};

use super::common::impl_audit_store;
use super::StoreError;

/// Applied in order, each once. Version 2 adds the append-only review
/// history (`audit_reviews`), seeded with the reviews already stored; the
/// review columns of `audit_records` stay and hold the review in force, so
/// an older binary still reads and writes the store.
const MIGRATIONS: &[(i64, &str)] = &[
    (
    1,
    "CREATE TABLE IF NOT EXISTS audit_records (
        request_id TEXT PRIMARY KEY NOT NULL,
        time_ms INTEGER NOT NULL,
        tenant TEXT,
        conversation_id TEXT,
        model TEXT NOT NULL,
        policy_name TEXT NOT NULL,
        policy_version TEXT NOT NULL,
        streaming TEXT NOT NULL,
        scores TEXT NOT NULL,
        category TEXT NOT NULL,
        threshold REAL,
        action TEXT NOT NULL,
        shadow INTEGER NOT NULL CHECK (shadow IN (0, 1)),
        classifier_ms REAL,
        added_ms REAL,
        upstream_ms REAL,
        text_mode TEXT NOT NULL,
        key_id TEXT,
        nonce BLOB,
        ciphertext BLOB,
        review_label INTEGER,
        review_note TEXT,
        reviewer TEXT,
        reviewed_ms INTEGER
    );
    CREATE INDEX IF NOT EXISTS audit_records_time ON audit_records (time_ms DESC, request_id DESC);
    CREATE INDEX IF NOT EXISTS audit_records_category_time ON audit_records (category, time_ms DESC);
    CREATE INDEX IF NOT EXISTS audit_records_conversation ON audit_records (conversation_id);",
),
    (
    2,
    "CREATE TABLE IF NOT EXISTS audit_reviews (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        request_id TEXT NOT NULL REFERENCES audit_records (request_id) ON DELETE CASCADE,
        kind TEXT NOT NULL CHECK (kind IN ('label', 'undo')),
        label INTEGER,
        note TEXT,
        reviewer TEXT NOT NULL,
        time_ms INTEGER NOT NULL,
        undoes INTEGER
    );
    CREATE INDEX IF NOT EXISTS audit_reviews_record ON audit_reviews (request_id, id);
    INSERT INTO audit_reviews (request_id, kind, label, note, reviewer, time_ms)
        SELECT request_id, 'label', review_label, review_note, COALESCE(reviewer, 'unknown'),
               COALESCE(reviewed_ms, 0)
        FROM audit_records WHERE review_label IS NOT NULL ORDER BY reviewed_ms, request_id;",
),
];

/// Audit records in an SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    path: PathBuf,
}

impl SqliteStore {
    /// Open (creating if missing) the database at `path` and migrate it. The
    /// parent folder must exist.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let url = format!("sqlite://{}", path.display());
        let connect_err = |reason: String| StoreError::Connect {
            url: url.clone(),
            reason,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !parent.is_dir() {
                return Err(connect_err(format!(
                    "folder {} does not exist; create it or point audit.url elsewhere",
                    parent.display()
                )));
            }
        }
        let opts = SqliteConnectOptions::from_str("sqlite:")
            .map_err(|e| connect_err(e.to_string()))?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        restrict_permissions(path);
        Self::migrate(&pool, MIGRATIONS, None).await?;
        Ok(SqliteStore {
            pool,
            path: path.to_path_buf(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `PRAGMA integrity_check` result (`ok` when healthy).
    pub async fn integrity_check(&self) -> Result<String, StoreError> {
        let (s,): (String,) = sqlx::query_as("PRAGMA integrity_check")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| StoreError::Query {
                op: "integrity_check",
                reason: e.to_string(),
            })?;
        Ok(s)
    }

    /// Current journal mode (`wal` once opened).
    pub async fn journal_mode(&self) -> Result<String, StoreError> {
        let (s,): (String,) = sqlx::query_as("PRAGMA journal_mode")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| StoreError::Query {
                op: "journal_mode",
                reason: e.to_string(),
            })?;
        Ok(s)
    }
}

/// The file holds ciphertext only, but metadata (categories, tenants) is
/// still sensitive: keep it owner-only. Best effort; failure is harmless.
fn restrict_permissions(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
}

impl_audit_store!(SqliteStore, Sqlite, "sqlite");
