//! Export of reviewed records in the training format of `dev.jsonl`:
//! one JSON object per line with `context`, `response`, `label` (the
//! reviewer's label id) and `category` (its display name), oldest first.

use serde::Serialize;

use super::crypto::Keyring;
use super::store::{reviewed_matching, AuditStore, ListFilter, StoreError};

#[derive(Serialize)]
struct Line<'a> {
    context: &'a str,
    response: &'a str,
    label: usize,
    category: &'static str,
}

/// What an export produced.
#[derive(Debug, Default)]
pub struct Export {
    /// JSONL bytes, one record per line.
    pub jsonl: Vec<u8>,
    /// Records written.
    pub lines: u64,
    /// Reviewed records skipped: no stored text (`audit.text = "none"`) or
    /// text that the loaded keys cannot open.
    pub skipped: u64,
}

/// Export the reviewed records that `filter` selects (category, action,
/// mode, time range, conversation; see [`reviewed_matching`]).
pub async fn reviewed_jsonl(
    store: &dyn AuditStore,
    keyring: Option<&Keyring>,
    filter: &ListFilter,
) -> Result<Export, StoreError> {
    let records = reviewed_matching(store, filter).await?;
    let mut out = Export::default();
    // Listing is newest first; a training file reads naturally oldest first.
    for r in records.iter().rev() {
        let Some(review) = &r.review else { continue };
        match r.open_text(keyring) {
            Ok(Some(text)) => {
                let line = Line {
                    context: &text.context,
                    response: &text.response,
                    label: review.label.id(),
                    category: review.label.display_name(),
                };
                if let Ok(mut l) = serde_json::to_vec(&line) {
                    out.jsonl.append(&mut l);
                    out.jsonl.push(b'\n');
                    out.lines += 1;
                }
            }
            Ok(None) | Err(_) => out.skipped += 1,
        }
    }
    Ok(out)
}
