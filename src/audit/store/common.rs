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
                    row.as_ref().map(Self::decode).transpose()
                })
            }

            fn review<'a>(
                &'a self,
                request_id: &'a str,
                review: &'a $crate::audit::record::Review,
            ) -> super::StoreFuture<'a, bool> {
                Box::pin(async move {
                    let res = sqlx::query(super::sql::REVIEW)
                        .bind(review.label.id() as i64)
                        .bind(&review.note)
                        .bind(&review.reviewer)
                        .bind(review.time_ms)
                        .bind(request_id)
                        .execute(&self.pool)
                        .await
                        .map_err(|e| super::StoreError::Query {
                            op: "review",
                            reason: e.to_string(),
                        })?;
                    Ok(res.rows_affected() > 0)
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
                    let res = sqlx::query(super::sql::PURGE)
                        .bind(cutoff_ms)
                        .execute(&self.pool)
                        .await
                        .map_err(|e| super::StoreError::Query {
                            op: "purge",
                            reason: e.to_string(),
                        })?;
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
