//! Review API handlers. Each takes parsed inputs and the state, returns a
//! response or an [`AdminError`]; HTTP mapping happens in `super`.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde::Deserialize;

use super::{bytes_response, json_response, AdminError, AdminState};
use crate::audit::export::reviewed_jsonl;
use crate::audit::record::{unix_ms, Review, StoredRecord};
use crate::audit::store::{all_reviewed, Cursor, ListFilter, UndoOutcome, MAX_LIMIT};
use crate::audit::summary::summarize;
use crate::classifier::Category;

type Resp = Result<Response<Full<Bytes>>, AdminError>;

const LIST_PARAMS: &[&str] = &[
    "limit",
    "category",
    "action",
    "shadow",
    "reviewed",
    "since",
    "until",
    "conversation_id",
    "cursor",
    "text",
];
/// The export takes the list's filters except those that make no sense
/// for it: it is reviewed records only, all of them, with text.
const EXPORT_PARAMS: &[&str] = &[
    "category",
    "action",
    "shadow",
    "since",
    "until",
    "conversation_id",
];

/// Parse a query string strictly: known keys only, each at most once.
fn params(query: &str, known: &[&str]) -> Result<Vec<(String, String)>, AdminError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if !known.contains(&k.as_ref()) {
            return Err(AdminError::bad_request(format!(
                "unknown query parameter `{k}`; known: {}",
                known.join(", ")
            )));
        }
        if out.iter().any(|(seen, _)| seen == &k) {
            return Err(AdminError::bad_request(format!(
                "query parameter `{k}` given more than once"
            )));
        }
        out.push((k.into_owned(), v.into_owned()));
    }
    Ok(out)
}

fn parse_bool(key: &'static str, v: &str) -> Result<bool, AdminError> {
    match v {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(AdminError::bad(
            key,
            format!("`{key}`: expected true or false, got `{v}`"),
        )),
    }
}

/// Milliseconds since the epoch, RFC 3339 (`2026-01-31T12:00:00Z`, with an
/// offset too), or a date: the whole day in UTC (see
/// [`crate::audit::record::parse_time_bound`]).
fn parse_time(key: &'static str, v: &str, upper: bool) -> Result<i64, AdminError> {
    crate::audit::record::parse_time_bound(v, upper).ok_or_else(|| {
        AdminError::bad(
            key,
            format!(
                "`{key}`: expected RFC 3339 time (2026-01-31T12:00:00Z or 2026-01-31T20:00:00+08:00), a date (2026-01-31, the whole day in UTC) or milliseconds since the epoch, got `{v}`"
            ),
        )
    })
}

/// Category from its key (`toxic_language`), name (`Toxic Language`) or
/// label id (`4`).
fn parse_category(key: &'static str, v: &str) -> Result<Category, AdminError> {
    crate::audit::record::parse_category(v).ok_or_else(|| {
        AdminError::bad(
            key,
            format!(
                "`{key}`: unknown category `{v}`; use a label id 0-7 or one of {}",
                Category::ALL.map(|c| c.key()).join(", ")
            ),
        )
    })
}

/// One of [`crate::audit::record::actions`].
fn parse_action(v: &str) -> Result<String, AdminError> {
    let known = crate::audit::record::actions();
    if known.contains(&v) {
        Ok(v.to_string())
    } else {
        Err(AdminError::bad(
            "action",
            format!(
                "`action`: unknown action `{v}`; known: {}",
                known.join(", ")
            ),
        ))
    }
}

/// A pseudonymous conversation id as records carry it: `c_` + 32 hex digits.
fn parse_conversation(v: &str) -> Result<String, AdminError> {
    let ok = v.len() == 34
        && v.starts_with("c_")
        && v[2..]
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if ok {
        Ok(v.to_string())
    } else {
        Err(AdminError::bad(
            "conversation_id",
            format!(
                "`conversation_id`: expected a pseudonymous id as records show it (`c_` + 32 hex digits), got `{v}`"
            ),
        ))
    }
}

/// Parse the filters of `query`, accepting only the keys in `known`.
/// Returns the filter and whether text was asked for.
fn parse_filter_with(query: &str, known: &[&str]) -> Result<(ListFilter, bool), AdminError> {
    let mut f = ListFilter {
        limit: 50,
        ..ListFilter::default()
    };
    let mut text = true;
    for (k, v) in params(query, known)? {
        match k.as_str() {
            "limit" => {
                f.limit = v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        AdminError::bad(
                            "limit",
                            format!("`limit`: expected an integer in 1..={MAX_LIMIT}, got `{v}`"),
                        )
                    })?
            }
            "category" => f.category = Some(parse_category("category", &v)?),
            "action" => f.action = Some(parse_action(&v)?),
            "shadow" => f.shadow = Some(parse_bool("shadow", &v)?),
            "reviewed" => f.reviewed = Some(parse_bool("reviewed", &v)?),
            "since" => f.since_ms = Some(parse_time("since", &v, false)?),
            "until" => f.until_ms = Some(parse_time("until", &v, true)?),
            "conversation_id" => f.conversation_id = Some(parse_conversation(&v)?),
            "cursor" => {
                f.cursor =
                    Some(Cursor::decode(&v).map_err(|e| AdminError::bad("cursor", e.to_string()))?)
            }
            "text" => text = parse_bool("text", &v)?,
            _ => {}
        }
    }
    if let (Some(s), Some(u)) = (f.since_ms, f.until_ms) {
        if s >= u {
            return Err(AdminError::bad(
                "since",
                "`since` must be earlier than `until` (a date as `until` includes that whole day)",
            ));
        }
    }
    Ok((f, text))
}

fn parse_filter(query: &str) -> Result<(ListFilter, bool), AdminError> {
    parse_filter_with(query, LIST_PARAMS)
}

/// The API view of a record, with text opened when asked for.
fn view(state: &AdminState, r: &StoredRecord, with_text: bool) -> serde_json::Value {
    let (text, err) = if with_text {
        match r.open_text(state.keyring.as_ref()) {
            Ok(t) => (t, None),
            Err(e) => (None, Some(e.to_string())),
        }
    } else {
        (None, None)
    };
    serde_json::to_value(r.view(text, err)).unwrap_or(serde_json::Value::Null)
}

/// `GET /admin/api/records`
pub async fn list(state: &AdminState, query: &str) -> Resp {
    let (filter, with_text) = parse_filter(query)?;
    let page = state.store.list(&filter).await?;
    let items: Vec<_> = page
        .items
        .iter()
        .map(|r| view(state, r, with_text))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({
            "items": items,
            "next_cursor": page.next_cursor.map(|c| c.encode()),
        }),
    ))
}

/// `GET /admin/api/records/{request_id}`
pub async fn get(state: &AdminState, id: &str) -> Resp {
    let r =
        state.store.get(id).await?.ok_or_else(|| {
            AdminError::NotFound(format!("no audit record with request_id `{id}`"))
        })?;
    Ok(json_response(StatusCode::OK, &view(state, &r, true)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReviewBody {
    label: serde_json::Value,
    #[serde(default)]
    note: Option<String>,
    reviewer: String,
}

/// `POST /admin/api/records/{request_id}/review`
pub async fn review(state: &AdminState, id: &str, body: &[u8]) -> Resp {
    let b: ReviewBody = serde_json::from_slice(body).map_err(|e| {
        AdminError::bad_request(format!(
            "review body: {e}; expected JSON {{\"label\": 0-7 or a category key, \"note\": optional text, \"reviewer\": name}}"
        ))
    })?;
    let label = match &b.label {
        serde_json::Value::Number(n) => n
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .and_then(Category::from_id),
        serde_json::Value::String(s) => Category::parse(s),
        _ => None,
    }
    .ok_or_else(|| {
        AdminError::bad(
            "label",
            format!(
                "`label`: expected a label id 0-7 or one of {}, got {}",
                Category::ALL.map(|c| c.key()).join(", "),
                b.label
            ),
        )
    })?;
    let reviewer = parse_reviewer(&b.reviewer)?;
    let note = b
        .note
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty());
    if note.as_ref().is_some_and(|n| n.chars().count() > 4000) {
        return Err(AdminError::bad(
            "note",
            "`note`: must be at most 4000 characters",
        ));
    }
    let review = Review {
        label,
        note,
        reviewer,
        time_ms: unix_ms(std::time::SystemTime::now()),
    };
    if !state.store.review(id, &review).await? {
        return Err(AdminError::NotFound(format!(
            "no audit record with request_id `{id}`"
        )));
    }
    tracing::info!(request_id = %id, label = label.key(), "audit record reviewed");
    get(state, id).await
}

fn parse_reviewer(v: &str) -> Result<String, AdminError> {
    let reviewer = v.trim();
    if reviewer.is_empty() || reviewer.chars().count() > 200 {
        return Err(AdminError::bad(
            "reviewer",
            "`reviewer`: must be 1-200 characters",
        ));
    }
    Ok(reviewer.to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UndoBody {
    reviewer: String,
    /// The history entry the console means to undo (`review.id`).
    #[serde(default)]
    review_id: Option<i64>,
}

/// `POST /admin/api/records/{request_id}/review/undo`: withdraw the label
/// in force (appended to the history as an undo; the label before it is in
/// force again).
pub async fn undo(state: &AdminState, id: &str, body: &[u8]) -> Resp {
    let b: UndoBody = serde_json::from_slice(body).map_err(|e| {
        AdminError::bad_request(format!(
            "undo body: {e}; expected JSON {{\"reviewer\": name, \"review_id\": optional id of the label to undo (review.id)}}"
        ))
    })?;
    let reviewer = parse_reviewer(&b.reviewer)?;
    let now = unix_ms(std::time::SystemTime::now());
    match state
        .store
        .undo_review(id, &reviewer, now, b.review_id)
        .await?
    {
        UndoOutcome::Undone => {}
        UndoOutcome::NoRecord => {
            return Err(AdminError::NotFound(format!(
                "no audit record with request_id `{id}`"
            )))
        }
        UndoOutcome::NothingToUndo => {
            return Err(AdminError::Conflict(format!(
                "record `{id}` has no label to undo"
            )))
        }
        UndoOutcome::Stale { current } => {
            return Err(AdminError::Conflict(format!(
                "record `{id}` was labelled again since (review {current} is in force, not {}); reload it and undo that one if you mean to",
                b.review_id.unwrap_or_default()
            )))
        }
    }
    tracing::info!(request_id = %id, "audit review undone");
    get(state, id).await
}

/// `GET /admin/api/meta`: the values the filters accept, so the console
/// offers exactly those (actions, categories).
pub async fn meta() -> Resp {
    let categories: Vec<_> = Category::ALL
        .iter()
        .map(|c| serde_json::json!({"id": c.id(), "key": c.key(), "name": c.display_name()}))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({
            "actions": crate::audit::record::actions(),
            "categories": categories,
        }),
    ))
}

/// `GET /admin/api/export`: the reviewed records that the filters select
/// (`category`, `action`, `shadow`, `since`, `until`, `conversation_id`, as
/// for the list), with text, as JSONL in the `dev.jsonl` format, labelled
/// with the reviewer's label. Records without stored text or whose text
/// cannot be opened are skipped and counted in the
/// `x-carewall-export-skipped` header.
pub async fn export(state: &AdminState, query: &str) -> Resp {
    let (filter, _) = parse_filter_with(query, EXPORT_PARAMS)?;
    let e = reviewed_jsonl(state.store.as_ref(), state.keyring.as_ref(), &filter).await?;
    tracing::info!(lines = e.lines, skipped = e.skipped, "audit export");
    let mut resp = bytes_response(StatusCode::OK, "application/x-ndjson", Bytes::from(e.jsonl));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"carewall-reviewed.jsonl\""),
    );
    h.insert("x-carewall-export-skipped", HeaderValue::from(e.skipped));
    Ok(resp)
}

/// `GET /admin/api/summary`
pub async fn summary(state: &AdminState) -> Resp {
    let counts = state.store.group_counts().await?;
    let reviewed = all_reviewed(state.store.as_ref()).await?;
    let current = state.thresholds.as_ref().map_or([None; 8], |f| f());
    let s = summarize(&counts, &reviewed, &current);
    let mut v = serde_json::to_value(&s).unwrap_or(serde_json::Value::Null);
    if let (Some(sink), Some(obj)) = (&state.sink, v.as_object_mut()) {
        let st = sink.stats();
        obj.insert(
            "queue".into(),
            serde_json::json!({
                "queued": st.queued, "written": st.written, "dropped": st.dropped,
                "failed": st.failed, "batches": st.batches, "depth": st.queue_depth,
            }),
        );
    }
    Ok(json_response(StatusCode::OK, &v))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_strictly() {
        let (f, text) = parse_filter(
            "limit=5&category=toxic_language&shadow=true&reviewed=0&since=2026-01-01&until=2026-01-02T00:00:00Z",
        )
        .unwrap();
        assert_eq!(f.limit, 5);
        assert_eq!(f.category, Some(Category::ToxicLanguage));
        assert_eq!((f.shadow, f.reviewed), (Some(true), Some(false)));
        assert_eq!(f.since_ms, Some(1_767_225_600_000));
        assert_eq!(f.until_ms, Some(1_767_225_600_000 + 86_400_000));
        assert!(text);
        // A date as `until` includes that day: since = until = one day works.
        let (f, _) = parse_filter("since=2026-01-01&until=2026-01-01").unwrap();
        assert_eq!(
            (f.since_ms, f.until_ms),
            (
                Some(1_767_225_600_000),
                Some(1_767_225_600_000 + 86_400_000)
            )
        );
        let (f, _) = parse_filter("since=2026-01-01T08:00:00%2B08:00").unwrap();
        assert_eq!(f.since_ms, Some(1_767_225_600_000));
        for a in crate::audit::record::actions() {
            assert_eq!(
                parse_filter(&format!("action={a}"))
                    .unwrap()
                    .0
                    .action
                    .as_deref(),
                Some(a)
            );
        }
        assert_eq!(
            parse_filter("category=4").unwrap().0.category,
            Some(Category::ToxicLanguage)
        );
        assert_eq!(
            parse_filter("category=Toxic%20Language")
                .unwrap()
                .0
                .category,
            Some(Category::ToxicLanguage)
        );
        for (q, needle) in [
            ("limit=0", "`limit`"),
            ("limit=abc", "`limit`"),
            ("limit=501", "`limit`"),
            ("category=rude", "unknown category `rude`"),
            ("shadow=maybe", "`shadow`"),
            ("since=yesterday", "`since`"),
            ("since=2026-02-01&until=2026-01-01", "earlier"),
            ("cursor=zzz", "`cursor`"),
            ("colour=red", "unknown query parameter `colour`"),
            ("limit=1&limit=2", "more than once"),
            ("action=DROP%20TABLE", "`action`"),
            ("action=flag", "unknown action `flag`"),
            ("conversation_id=user-1", "`conversation_id`"),
            ("since=2026-01-02&until=2026-01-01", "earlier"),
        ] {
            let e = parse_filter(q).unwrap_err().to_string();
            assert!(e.contains(needle), "{q}: {e}");
        }
    }
}
