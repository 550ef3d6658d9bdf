//! PostgreSQL store. Migrations take a transaction-scoped advisory lock so
//! several gateways starting at once take turns.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _, PgPool, Postgres};

use super::common::impl_audit_store;
use super::StoreError;
use crate::audit::settings::redact_password;

/// Arbitrary but fixed: the advisory lock id of carewall's audit migrations.
const MIGRATION_LOCK: &str = "SELECT pg_advisory_xact_lock(7263001)";

/// Applied in order, each once. Version 2 adds the append-only review
/// history (`audit_reviews`), seeded with the reviews already stored; the
/// review columns of `audit_records` stay and hold the review in force, so
/// an older binary still reads and writes the store.
const MIGRATIONS: &[(i64, &str)] = &[
    (
    1,
    "CREATE TABLE IF NOT EXISTS audit_records (
        request_id TEXT PRIMARY KEY,
        time_ms BIGINT NOT NULL,
        tenant TEXT,
        conversation_id TEXT,
        model TEXT NOT NULL,
        policy_name TEXT NOT NULL,
        policy_version TEXT NOT NULL,
        streaming TEXT NOT NULL,
        scores TEXT NOT NULL,
        category TEXT NOT NULL,
        threshold DOUBLE PRECISION,
        action TEXT NOT NULL,
        shadow BOOLEAN NOT NULL,
        classifier_ms DOUBLE PRECISION,
        added_ms DOUBLE PRECISION,
        upstream_ms DOUBLE PRECISION,
        text_mode TEXT NOT NULL,
        key_id TEXT,
        nonce BYTEA,
        ciphertext BYTEA,
        review_label BIGINT,
        review_note TEXT,
        reviewer TEXT,
        reviewed_ms BIGINT
    );
    CREATE INDEX IF NOT EXISTS audit_records_time ON audit_records (time_ms DESC, request_id DESC);
    CREATE INDEX IF NOT EXISTS audit_records_category_time ON audit_records (category, time_ms DESC);
    CREATE INDEX IF NOT EXISTS audit_records_conversation ON audit_records (conversation_id);",
),
    (
    2,
    "CREATE TABLE IF NOT EXISTS audit_reviews (
        id BIGSERIAL PRIMARY KEY,
        request_id TEXT NOT NULL REFERENCES audit_records (request_id) ON DELETE CASCADE,
        kind TEXT NOT NULL CHECK (kind IN ('label', 'undo')),
        label BIGINT,
        note TEXT,
        reviewer TEXT NOT NULL,
        time_ms BIGINT NOT NULL,
        undoes BIGINT
    );
    CREATE INDEX IF NOT EXISTS audit_reviews_record ON audit_reviews (request_id, id);
    INSERT INTO audit_reviews (request_id, kind, label, note, reviewer, time_ms)
        SELECT request_id, 'label', review_label, review_note, COALESCE(reviewer, 'unknown'),
               COALESCE(reviewed_ms, 0)
        FROM audit_records WHERE review_label IS NOT NULL ORDER BY reviewed_ms, request_id;",
),
];

/// Audit records in PostgreSQL.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connect and migrate. With `schema`, the tables live in that schema
    /// (created if missing); tests use it to keep runs apart. Schema names
    /// are limited to `[a-z0-9_]`, at most 63 characters.
    pub async fn connect(url: &str, schema: Option<&str>) -> Result<PostgresStore, StoreError> {
        let safe = redact_password(url);
        let connect_err = |reason: String| StoreError::Connect {
            url: safe.clone(),
            reason,
        };
        let mut opts = PgConnectOptions::from_str(url).map_err(|e| connect_err(e.to_string()))?;
        // One direct connection first: the pool would retry a refused or
        // misconfigured server until its acquire timeout, where a person
        // starting the gateway wants the reason at once.
        let probe = opts
            .connect()
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let _ = probe.close().await;
        if let Some(s) = schema {
            if s.is_empty()
                || s.len() > 63
                || !s
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                return Err(StoreError::Invalid(format!(
                    "schema name `{s}`: use 1-63 characters from [a-z0-9_]"
                )));
            }
            let mut conn = opts
                .connect()
                .await
                .map_err(|e| connect_err(e.to_string()))?;
            // The name was checked above, so quoting it is safe.
            sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{s}\""))
                .execute(&mut conn)
                .await
                .map_err(|e| connect_err(e.to_string()))?;
            let _ = conn.close().await;
            opts = opts.options([("search_path", s)]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        Self::migrate(&pool, MIGRATIONS, Some(MIGRATION_LOCK)).await?;
        Ok(PostgresStore { pool })
    }
}

impl_audit_store!(PostgresStore, Postgres, "postgres");
