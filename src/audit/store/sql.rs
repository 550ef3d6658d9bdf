//! SQL shared by both backends. `$N` placeholders are understood by
//! PostgreSQL and by sqlx's SQLite driver alike; only DDL differs.

use super::{Cursor, ListFilter};

/// Columns in the order [`super::RowData`] is read.
pub const COLUMNS: &str = "request_id, time_ms, tenant, conversation_id, model, policy_name, \
    policy_version, streaming, scores, category, threshold, action, shadow, classifier_ms, \
    added_ms, upstream_ms, text_mode, key_id, nonce, ciphertext, review_label, review_note, \
    reviewer, reviewed_ms";

pub const INSERT: &str = "INSERT INTO audit_records (request_id, time_ms, tenant, \
    conversation_id, model, policy_name, policy_version, streaming, scores, category, threshold, \
    action, shadow, classifier_ms, added_ms, upstream_ms, text_mode, key_id, nonce, ciphertext) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, \
    $19, $20) ON CONFLICT (request_id) DO NOTHING";

pub const GET: &str = "SELECT request_id, time_ms, tenant, conversation_id, model, policy_name, \
    policy_version, streaming, scores, category, threshold, action, shadow, classifier_ms, \
    added_ms, upstream_ms, text_mode, key_id, nonce, ciphertext, review_label, review_note, \
    reviewer, reviewed_ms FROM audit_records WHERE request_id = $1";

pub const REVIEW: &str = "UPDATE audit_records SET review_label = $1, review_note = $2, \
    reviewer = $3, reviewed_ms = $4 WHERE request_id = $5";

/// Locks a record's row for the rest of the transaction (a write lock on
/// SQLite, a row lock on PostgreSQL) and says whether it exists: review
/// changes read the history, then append to it, and must not interleave.
pub const TOUCH: &str = "UPDATE audit_records SET reviewed_ms = reviewed_ms WHERE request_id = $1";

pub const INSERT_REVIEW: &str = "INSERT INTO audit_reviews (request_id, kind, label, note, \
    reviewer, time_ms, undoes) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id";

/// Columns of a review history row.
pub const REVIEW_COLUMNS: &str = "request_id, id, kind, label, note, reviewer, time_ms, undoes";

/// The history of the records named by `n` request ids, oldest first.
pub fn history_query(n: usize) -> String {
    let marks: Vec<String> = (1..=n).map(|i| format!("${i}")).collect();
    format!(
        "SELECT {REVIEW_COLUMNS} FROM audit_reviews WHERE request_id IN ({}) ORDER BY id",
        marks.join(", ")
    )
}

pub const GROUP_COUNTS: &str = "SELECT category, action, shadow, COUNT(*) AS total, \
    COUNT(review_label) AS reviewed FROM audit_records GROUP BY category, action, shadow \
    ORDER BY category, action, shadow";

/// Retention removes a record's review history with it (before the
/// record, so the foreign key never dangles).
pub const PURGE_REVIEWS: &str = "DELETE FROM audit_reviews WHERE request_id IN \
    (SELECT request_id FROM audit_records WHERE time_ms < $1)";

pub const PURGE: &str = "DELETE FROM audit_records WHERE time_ms < $1";

pub const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS carewall_audit_migrations (\
    version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)";

pub const APPLIED: &str = "SELECT version FROM carewall_audit_migrations ORDER BY version";

pub const MARK_APPLIED: &str = "INSERT INTO carewall_audit_migrations (version, applied_ms) \
    VALUES ($1, $2) ON CONFLICT (version) DO NOTHING";

/// A value to bind, in order.
#[derive(Debug, Clone)]
pub enum Bind {
    Text(String),
    I64(i64),
    Bool(bool),
}

/// Add `cond`, whose `${i}` markers name `b[i]`, renumbering the markers to
/// the binds' final positions.
fn push_cond(cond: &str, b: Vec<Bind>, binds: &mut Vec<Bind>, conds: &mut Vec<String>) {
    let mut c = cond.to_string();
    for (i, v) in b.into_iter().enumerate() {
        binds.push(v);
        c = c.replace(&format!("${{{i}}}"), &format!("${}", binds.len()));
    }
    conds.push(c);
}

/// Build the list query for `f`, fetching `limit + 1` rows so the caller
/// knows whether another page exists.
pub fn list_query(f: &ListFilter, limit: u32) -> (String, Vec<Bind>) {
    let mut sql = format!("SELECT {COLUMNS} FROM audit_records");
    let mut binds = Vec::new();
    let mut conds: Vec<String> = Vec::new();
    if let Some(c) = f.category {
        push_cond(
            "category = ${0}",
            vec![Bind::Text(c.key().into())],
            &mut binds,
            &mut conds,
        );
    }
    if let Some(a) = &f.action {
        push_cond(
            "action = ${0}",
            vec![Bind::Text(a.clone())],
            &mut binds,
            &mut conds,
        );
    }
    if let Some(s) = f.shadow {
        push_cond("shadow = ${0}", vec![Bind::Bool(s)], &mut binds, &mut conds);
    }
    match f.reviewed {
        Some(true) => conds.push("review_label IS NOT NULL".into()),
        Some(false) => conds.push("review_label IS NULL".into()),
        None => {}
    }
    if let Some(t) = f.since_ms {
        push_cond(
            "time_ms >= ${0}",
            vec![Bind::I64(t)],
            &mut binds,
            &mut conds,
        );
    }
    if let Some(t) = f.until_ms {
        push_cond("time_ms < ${0}", vec![Bind::I64(t)], &mut binds, &mut conds);
    }
    if let Some(c) = &f.conversation_id {
        push_cond(
            "conversation_id = ${0}",
            vec![Bind::Text(c.clone())],
            &mut binds,
            &mut conds,
        );
    }
    if let Some(Cursor {
        time_ms,
        request_id,
    }) = &f.cursor
    {
        push_cond(
            "(time_ms < ${0} OR (time_ms = ${1} AND request_id < ${2}))",
            vec![
                Bind::I64(*time_ms),
                Bind::I64(*time_ms),
                Bind::Text(request_id.clone()),
            ],
            &mut binds,
            &mut conds,
        );
    }
    if !conds.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&conds.join(" AND "));
    }
    sql.push_str(&format!(
        " ORDER BY time_ms DESC, request_id DESC LIMIT {}",
        u64::from(limit) + 1
    ));
    (sql, binds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classifier::Category;

    #[test]
    fn placeholders_are_numbered_in_bind_order() {
        let f = ListFilter {
            category: Some(Category::Nonsense),
            reviewed: Some(false),
            since_ms: Some(5),
            cursor: Some(Cursor {
                time_ms: 9,
                request_id: "r".into(),
            }),
            ..ListFilter::default()
        };
        let (sql, binds) = list_query(&f, 10);
        assert!(sql.contains("category = $1"), "{sql}");
        assert!(sql.contains("review_label IS NULL"));
        assert!(sql.contains("time_ms >= $2"));
        assert!(sql.contains("(time_ms < $3 OR (time_ms = $4 AND request_id < $5))"));
        assert!(sql.ends_with("LIMIT 11"));
        assert_eq!(binds.len(), 5);
    }
}
