//! The parts of both stores that differ only in the sqlx database type,
//! written once as a macro: sqlx's generic bounds over `Database` are far
//! noisier than two instantiations of the same code.

/// Implement row decoding, migrations and [`super::AuditStore`] for a store
/// struct with a `pool` field of sqlx database `$db`.
macro_rules! impl_audit_store {
    ($store:ty, $db:ty, $backend:literal) => {
        impl $store {
            fn read_row(row: &<$db as sqlx::Database>::Row) -> Result<super::RowData, sqlx::Error> {
                use sqlx::Row as _;
                Ok(super::RowData {
                    request_id: row.try_get("request_id")?,
                    time_ms: row.try_get("time_ms")?,
                    tenant: row.try_get("tenant")?,
                    conversation_id: row.try_get("conversation_id")?,
                    model: row.try_get("model")?,
                    policy_name: row.try_get("policy_name")?,
                    policy_version: row.try_get("policy_version")?,
                    streaming: row.try_get("streaming")?,
                    scores: row.try_get("scores")?,
                    category: row.try_get("category")?,
                    threshold: row.try_get("threshold")?,
                    action: row.try_get("action")?,
                    shadow: row.try_get("shadow")?,
                    classifier_ms: row.try_get("classifier_ms")?,
                    added_ms: row.try_get("added_ms")?,
                    upstream_ms: row.try_get("upstream_ms")?,
                    text_mode: row.try_get("text_mode")?,
                    key_id: row.try_get("key_id")?,
                    nonce: row.try_get("nonce")?,
                    ciphertext: row.try_get("ciphertext")?,
                    review_label: row.try_get("review_label")?,
                    review_note: row.try_get("review_note")?,
                    reviewer: row.try_get("reviewer")?,
                    reviewed_ms: row.try_get("reviewed_ms")?,
                })
            }

            fn read_review_row(
                row: &<$db as sqlx::Database>::Row,
            ) -> Result<super::ReviewRow, sqlx::Error> {
                use sqlx::Row as _;
                Ok(super::ReviewRow {
                    request_id: row.try_get("request_id")?,
                    id: row.try_get("id")?,
                    kind: row.try_get("kind")?,
                    label: row.try_get("label")?,
                    note: row.try_get("note")?,
                    reviewer: row.try_get("reviewer")?,
                    time_ms: row.try_get("time_ms")?,
                    undoes: row.try_get("undoes")?,
                })
            }

            /// The review histories of `ids`, keyed by request id, each
            /// oldest first.
            async fn histories<'e, E>(
                executor: E,
                ids: &[&str],
            ) -> Result<
                std::collections::HashMap<String, Vec<$crate::audit::record::ReviewEvent>>,
                super::StoreError,
            >
            where
                E: sqlx::Executor<'e, Database = $db>,
            {
                let mut out: std::collections::HashMap<String, Vec<_>> =
                    std::collections::HashMap::new();
                if ids.is_empty() {
                    return Ok(out);
                }
                let sql = super::sql::history_query(ids.len());
                let mut query = sqlx::query(&sql);
                for id in ids {
                    query = query.bind(*id);
                }
                let rows =
                    query
                        .fetch_all(executor)
                        .await
                        .map_err(|e| super::StoreError::Query {
                            op: "review history",
                            reason: e.to_string(),
                        })?;
                for row in &rows {
                    let (id, event) = Self::read_review_row(row)
                        .map_err(|e| super::StoreError::Corrupt {
                            request_id: "?".into(),
                            reason: e.to_string(),
                        })?
                        .into_event()?;
                    out.entry(id).or_default().push(event);
                }
                Ok(out)
            }

            /// Append one history entry; its id.
            async fn append_review<'e, E>(
                executor: E,
                e: super::NewReview<'_>,
            ) -> Result<i64, sqlx::Error>
            where
                E: sqlx::Executor<'e, Database = $db>,
            {
                use sqlx::Row as _;
                sqlx::query(super::sql::INSERT_REVIEW)
                    .bind(e.request_id)
                    .bind(e.kind.as_str())
                    .bind(e.label)
                    .bind(e.note)
                    .bind(e.reviewer)
                    .bind(e.time_ms)
                    .bind(e.undoes)
                    .fetch_one(executor)
                    .await?
                    .try_get::<i64, _>(0)
            }

            fn decode(
                row: &<$db as sqlx::Database>::Row,
            ) -> Result<$crate::audit::record::StoredRecord, super::StoreError> {
                Self::read_row(row)
                    .map_err(|e| super::StoreError::Corrupt {
                        request_id: "?".into(),
                        reason: e.to_string(),
                    })?
                    .into_record()
            }

            /// Apply the migrations not yet recorded, each in a transaction.
            /// `lock` (if any) runs first inside each transaction so that
            /// concurrent starters take turns.
            async fn migrate(
                pool: &sqlx::Pool<$db>,
                migrations: &[(i64, &str)],
                lock: Option<&str>,
            ) -> Result<(), super::StoreError> {
                use sqlx::Row as _;
                let fail = |version: i64| {
                    move |e: sqlx::Error| super::StoreError::Migrate {
                        version,
                        reason: e.to_string(),
                    }
                };
                sqlx::query(super::sql::MIGRATIONS_TABLE)
                    .execute(pool)
                    .await
                    .map_err(fail(0))?;
                for (version, ddl) in migrations {
                    let mut tx = pool.begin().await.map_err(fail(*version))?;
                    if let Some(l) = lock {
                        sqlx::query(l)
                            .execute(&mut *tx)
                            .await
                            .map_err(fail(*version))?;
                    }
                    let applied: Vec<i64> = sqlx::query(super::sql::APPLIED)
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(fail(*version))?
                        .iter()
                        .map(|r| r.try_get::<i64, _>(0))
                        .collect::<Result<_, _>>()
                        .map_err(fail(*version))?;
                    if applied.contains(version) {
                        continue;
                    }
                    sqlx::raw_sql(ddl)
                        .execute(&mut *tx)
                        .await
                        .map_err(fail(*version))?;
                    sqlx::query(super::sql::MARK_APPLIED)
                        .bind(*version)
                        .bind($crate::audit::record::unix_ms(std::time::SystemTime::now()))
                        .execute(&mut *tx)
                        .await
                        .map_err(fail(*version))?;
                    tx.commit().await.map_err(fail(*version))?;
                }
                Ok(())
            }
        }

        impl super::AuditStore for $store {
            fn backend(&self) -> &'static str {
                $backend
            }

            fn insert_batch<'a>(
                &'a self,
                records: &'a [$crate::audit::record::StoredRecord],
            ) -> super::StoreFuture<'a, u64> {
                Box::pin(async move {
                    let q = |e: sqlx::Error| super::StoreError::Query {
                        op: "insert",
                        reason: e.to_string(),
                    };
                    let mut tx = self.pool.begin().await.map_err(q)?;
                    let mut inserted = 0;
                    for r in records {
                        let scores = serde_json::to_string(&r.scores.0).map_err(|e| {
                            super::StoreError::Invalid(format!("scores of {}: {e}", r.request_id))
                        })?;
                        let res = sqlx::query(super::sql::INSERT)
                            .bind(&r.request_id)
                            .bind(r.time_ms)
                            .bind(&r.tenant)
                            .bind(&r.conversation_id)
                            .bind(&r.model)
                            .bind(&r.policy_name)
                            .bind(&r.policy_version)
                            .bind(&r.streaming)
                            .bind(scores)
                            .bind(r.category.key())
                            .bind(r.threshold.map(f64::from))
                            .bind(&r.action)
                            .bind(r.shadow)
                            .bind(r.latency.classifier_ms)
                            .bind(r.latency.added_ms)
                            .bind(r.latency.upstream_ms)
                            .bind(r.text.mode.as_str())
                            .bind(&r.text.key_id)
                            .bind(&r.text.nonce)
                            .bind(&r.text.ciphertext)
                            .execute(&mut *tx)
                            .await
                            .map_err(q)?;
                        inserted += res.rows_affected();
                    }
                    tx.commit().await.map_err(q)?;
                    Ok(inserted)
                })
            }

            fn list<'a>(
                &'a self,
                filter: &'a super::ListFilter,
            ) -> super::StoreFuture<'a, super::Page> {
                Box::pin(async move {
                    let limit = super::effective_limit(filter.limit);
                    let (sql, binds) = super::sql::list_query(filter, limit);
                    let mut query = sqlx::query(&sql);
                    for b in binds {
                        query = match b {
                            super::sql::Bind::Text(s) => query.bind(s),
                            super::sql::Bind::I64(i) => query.bind(i),
                            super::sql::Bind::Bool(x) => query.bind(x),
                        };
                    }
                    let rows = query.fetch_all(&self.pool).await.map_err(|e| {
                        super::StoreError::Query {
                            op: "list",
                            reason: e.to_string(),
                        }
                    })?;
                    let mut items = rows
                        .iter()
                        .map(Self::decode)
                        .collect::<Result<Vec<_>, _>>()?;
                    let next_cursor = if items.len() > limit as usize {
                        items.truncate(limit as usize);
                        items.last().map(|r| super::Cursor {
                            time_ms: r.time_ms,
                            request_id: r.request_id.clone(),
                        })
                    } else {
                        None
                    };
                    // An undone label leaves a history without a review in
                    // force, so every record's history is read.
                    let ids: Vec<&str> = items.iter().map(|r| r.request_id.as_str()).collect();
                    let mut histories = Self::histories(&self.pool, &ids).await?;
                    for r in &mut items {
                        if let Some(h) = histories.remove(&r.request_id) {
                            r.history = h;
                        }
                    }
                    Ok(super::Page { items, next_cursor })
                })
            }

            fn get<'a>(
                &'a self,
                request_id: &'a str,
            ) -> super::StoreFuture<'a, Option<$crate::audit::record::StoredRecord>> {
                Box::pin(async move {
                    let row = sqlx::query(super::sql::GET)
                        .bind(request_id)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(|e| super::StoreError::Query {
                            op: "get",
                            reason: e.to_string(),
                        })?;
                    let Some(mut record) = row.as_ref().map(Self::decode).transpose()? else {
                        return Ok(None);
                    };
                    let mut h = Self::histories(&self.pool, &[request_id]).await?;
                    record.history = h.remove(request_id).unwrap_or_default();
                    Ok(Some(record))
                })
            }

            fn review<'a>(
                &'a self,
                request_id: &'a str,
                review: &'a $crate::audit::record::Review,
            ) -> super::StoreFuture<'a, bool> {
                Box::pin(async move {
                    let q = |e: sqlx::Error| super::StoreError::Query {
                        op: "review",
                        reason: e.to_string(),
                    };
                    let label = review.label.id() as i64;
                    let mut tx = self.pool.begin().await.map_err(q)?;
                    let found = sqlx::query(super::sql::TOUCH)
                        .bind(request_id)
                        .execute(&mut *tx)
                        .await
                        .map_err(q)?
                        .rows_affected();
                    if found == 0 {
                        return Ok(false);
                    }
                    Self::append_review(
                        &mut *tx,
                        super::NewReview {
                            request_id,
                            kind: $crate::audit::record::ReviewKind::Label,
                            label: Some(label),
                            note: review.note.as_deref(),
                            reviewer: &review.reviewer,
                            time_ms: review.time_ms,
                            undoes: None,
                        },
                    )
                    .await
                    .map_err(q)?;
                    sqlx::query(super::sql::REVIEW)
                        .bind(Some(label))
                        .bind(&review.note)
                        .bind(Some(&review.reviewer))
                        .bind(Some(review.time_ms))
                        .bind(request_id)
                        .execute(&mut *tx)
                        .await
                        .map_err(q)?;
                    tx.commit().await.map_err(q)?;
                    Ok(true)
                })
            }

            fn undo_review<'a>(
                &'a self,
                request_id: &'a str,
                reviewer: &'a str,
                time_ms: i64,
                expected: Option<i64>,
            ) -> super::StoreFuture<'a, super::UndoOutcome> {
                Box::pin(async move {
                    let q = |e: sqlx::Error| super::StoreError::Query {
                        op: "undo review",
                        reason: e.to_string(),
                    };
                    let mut tx = self.pool.begin().await.map_err(q)?;
                    let found = sqlx::query(super::sql::TOUCH)
                        .bind(request_id)
                        .execute(&mut *tx)
                        .await
                        .map_err(q)?
                        .rows_affected();
                    if found == 0 {
                        return Ok(super::UndoOutcome::NoRecord);
                    }
                    let history = Self::histories(&mut *tx, &[request_id])
                        .await?
                        .remove(request_id)
                        .unwrap_or_default();
                    let in_force = $crate::audit::record::labels_in_force(&history);
                    let Some(top) = in_force.last() else {
                        return Ok(super::UndoOutcome::NothingToUndo);
                    };
                    if expected.is_some_and(|e| e != top.id) {
                        return Ok(super::UndoOutcome::Stale { current: top.id });
                    }
                    Self::append_review(
                        &mut *tx,
                        super::NewReview {
                            request_id,
                            kind: $crate::audit::record::ReviewKind::Undo,
                            label: None,
                            note: None,
                            reviewer,
                            time_ms,
                            undoes: Some(top.id),
                        },
                    )
                    .await
                    .map_err(q)?;
                    let before = in_force.len().checked_sub(2).and_then(|i| in_force.get(i));
                    sqlx::query(super::sql::REVIEW)
                        .bind(before.and_then(|e| e.label).map(|l| l.id() as i64))
                        .bind(before.and_then(|e| e.note.clone()))
                        .bind(before.map(|e| e.reviewer.clone()))
                        .bind(before.map(|e| e.time_ms))
                        .bind(request_id)
                        .execute(&mut *tx)
                        .await
                        .map_err(q)?;
                    tx.commit().await.map_err(q)?;
                    Ok(super::UndoOutcome::Undone)
                })
            }

            fn group_counts(&self) -> super::StoreFuture<'_, Vec<super::GroupCount>> {
                Box::pin(async move {
                    use sqlx::Row as _;
                    let q = |e: sqlx::Error| super::StoreError::Query {
                        op: "summary",
                        reason: e.to_string(),
                    };
                    let rows = sqlx::query(super::sql::GROUP_COUNTS)
                        .fetch_all(&self.pool)
                        .await
                        .map_err(q)?;
                    let mut out = Vec::with_capacity(rows.len());
                    for row in &rows {
                        let cat: String = row.try_get("category").map_err(q)?;
                        let category =
                            $crate::classifier::Category::parse(&cat).ok_or_else(|| {
                                super::StoreError::Corrupt {
                                    request_id: "?".into(),
                                    reason: format!("unknown category `{cat}`"),
                                }
                            })?;
                        let total: i64 = row.try_get("total").map_err(q)?;
                        let reviewed: i64 = row.try_get("reviewed").map_err(q)?;
                        out.push(super::GroupCount {
                            category,
                            action: row.try_get("action").map_err(q)?,
                            shadow: row.try_get("shadow").map_err(q)?,
                            total: u64::try_from(total).unwrap_or(0),
                            reviewed: u64::try_from(reviewed).unwrap_or(0),
                        });
                    }
                    Ok(out)
                })
            }

            fn purge_before(&self, cutoff_ms: i64) -> super::StoreFuture<'_, u64> {
                Box::pin(async move {
                    let q = |e: sqlx::Error| super::StoreError::Query {
                        op: "purge",
                        reason: e.to_string(),
                    };
                    let mut tx = self.pool.begin().await.map_err(q)?;
                    sqlx::query(super::sql::PURGE_REVIEWS)
                        .bind(cutoff_ms)
                        .execute(&mut *tx)
                        .await
                        .map_err(q)?;
                    let res = sqlx::query(super::sql::PURGE)
                        .bind(cutoff_ms)
                        .execute(&mut *tx)
                        .await
                        .map_err(q)?;
                    tx.commit().await.map_err(q)?;
                    Ok(res.rows_affected())
                })
            }

            fn close(&self) -> super::StoreFuture<'_, ()> {
                Box::pin(async move {
                    self.pool.close().await;
                    Ok(())
                })
            }
        }
    };
}

pub(crate) use impl_audit_store;
