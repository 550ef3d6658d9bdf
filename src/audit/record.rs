//! Record types: [`AuditRecord`] is what the gateway fills (plain text, raw
//! conversation key); [`StoredRecord`] is what the store holds (text sealed,
//! conversation key hashed); [`RecordView`] is what the review API shows.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::classifier::{Category, Scores};

use super::crypto::{CryptoError, Keyring};
use super::pseudonym::Pseudonymizer;
use super::redact::redact;
use super::settings::TextMode;

/// Action name of a response that the policy let through untouched; every
/// other action counts as flagged.
pub const ALLOW: &str = "allow";

/// Latency figures of one request, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Time spent in the classifier (queue + inference) for this response.
    pub classifier_ms: Option<f64>,
    /// Delay the gateway added on top of the upstream (what the client felt).
    pub added_ms: Option<f64>,
    /// Upstream time to the last byte.
    pub upstream_ms: Option<f64>,
}

/// One audited response, as the gateway fills it. Plain text lives here only
/// in memory: the sink's writer redacts and encrypts it before storage.
#[derive(Clone)]
pub struct AuditRecord {
    /// Equals the response's `x-carewall-request-id` header.
    pub request_id: String,
    /// When the decision was made.
    pub time: SystemTime,
    /// Tenant / client key id (never the key itself).
    pub tenant: Option<String>,
    /// Raw conversation key (OpenAI `user` field or a header). Hashed with
    /// the pseudonym key before storage; never stored, never logged.
    pub conversation_key: Option<String>,
    /// Model name the client asked for.
    pub model: String,
    /// Name and version of the policy that decided.
    pub policy_name: String,
    pub policy_version: String,
    /// How the response was moderated, e.g. `buffered`, `streaming`.
    pub streaming: String,
    /// All 8 probabilities.
    pub scores: Scores,
    /// The category that triggered the action (the top one when allowed).
    pub category: Category,
    /// Threshold of that category's rule when the decision was made.
    pub threshold: Option<f32>,
    /// Policy action taken or, in shadow mode, that would have been taken:
    /// one of [`actions`] (`allow`, `annotate`, ..., `unclassified`).
    pub action: String,
    /// True when the policy ran in shadow mode (the action was not enforced).
    pub shadow: bool,
    pub latency: Latency,
    /// `[seeker]...[supporter]...` context, as classified.
    pub context: String,
    /// `[supporter]` + the reply, as classified.
    pub response: String,
    /// Earlier drafts that were judged and rejected (retries), oldest first.
    pub drafts: Vec<DraftRecord>,
    /// What the person actually received (the reply, with a note appended,
    /// or the safe/block reply).
    pub delivered: String,
}

/// A judged draft that was not delivered, as recorded (sealed with the
/// text: it is conversation text).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DraftRecord {
    /// `[supporter]` + the draft, as classified.
    pub response: String,
    pub scores: Option<Scores>,
    /// The category that rejected it, its threshold and the action.
    pub category: Category,
    pub threshold: Option<f32>,
    pub action: String,
}

/// The decrypted text of a record.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OpenedText {
    pub context: String,
    /// The final draft (what was judged last).
    pub response: String,
    pub drafts: Vec<DraftRecord>,
    /// `None` for records written before delivered text was kept.
    pub delivered: Option<String>,
}

impl std::fmt::Debug for AuditRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Text and the raw conversation key stay out of Debug output so a
        // stray `{:?}` cannot leak them into a log.
        f.debug_struct("AuditRecord")
            .field("request_id", &self.request_id)
            .field("category", &self.category)
            .field("action", &self.action)
            .field("shadow", &self.shadow)
            .finish_non_exhaustive()
    }
}

impl AuditRecord {
    /// True when the action is anything but `allow`.
    pub fn is_flagged(&self) -> bool {
        self.action != ALLOW
    }
}

/// A counsellor's verdict on one record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Review {
    /// The category the reviewer says is right.
    pub label: Category,
    pub note: Option<String>,
    pub reviewer: String,
    /// Milliseconds since the Unix epoch.
    pub time_ms: i64,
}

/// What a review history entry did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviewKind {
    /// A label (with its note) was given.
    Label,
    /// The label in force was withdrawn; the one before it (if any) is in
    /// force again.
    Undo,
}

impl ReviewKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ReviewKind::Label => "label",
            ReviewKind::Undo => "undo",
        }
    }

    pub fn parse(s: &str) -> Option<ReviewKind> {
        match s {
            "label" => Some(ReviewKind::Label),
            "undo" => Some(ReviewKind::Undo),
            _ => None,
        }
    }
}

/// One entry of a record's review history. The history is append-only:
/// a new label or an undo adds an entry, nothing is ever changed or removed
/// (except by retention, with the record).
#[derive(Debug, Clone, PartialEq)]
pub struct ReviewEvent {
    /// Increasing across the store: later entries have larger ids.
    pub id: i64,
    pub kind: ReviewKind,
    /// The label given (`Label` only).
    pub label: Option<Category>,
    pub note: Option<String>,
    pub reviewer: String,
    /// Milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// The label entry an `Undo` withdrew.
    pub undoes: Option<i64>,
}

/// The label entries still in force after replaying `history` (oldest
/// first): each label is pushed, each undo pops the latest. The last one is
/// the current review.
pub fn labels_in_force(history: &[ReviewEvent]) -> Vec<&ReviewEvent> {
    let mut stack: Vec<&ReviewEvent> = Vec::new();
    for e in history {
        match e.kind {
            ReviewKind::Label => stack.push(e),
            ReviewKind::Undo => {
                stack.pop();
            }
        }
    }
    stack
}

/// Text as stored: the mode it was recorded under and, unless `none`, the
/// sealed JSON `{"context","response"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredText {
    pub mode: TextMode,
    pub key_id: Option<String>,
    pub nonce: Option<Vec<u8>>,
    pub ciphertext: Option<Vec<u8>>,
}

/// One row of the audit table.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRecord {
    pub request_id: String,
    /// Milliseconds since the Unix epoch.
    pub time_ms: i64,
    pub tenant: Option<String>,
    /// `c_` + 32 hex digits, see [`Pseudonymizer`].
    pub conversation_id: Option<String>,
    pub model: String,
    pub policy_name: String,
    pub policy_version: String,
    pub streaming: String,
    pub scores: Scores,
    pub category: Category,
    pub threshold: Option<f32>,
    pub action: String,
    pub shadow: bool,
    pub latency: Latency,
    pub text: StoredText,
    /// The review in force (the last label not undone), if any.
    pub review: Option<Review>,
    /// Every review entry, oldest first (filled by `get` and `list`).
    pub history: Vec<ReviewEvent>,
}

#[derive(Serialize, Deserialize)]
struct TextPayload {
    context: String,
    response: String,
    // Absent in records written before drafts were kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    drafts: Vec<DraftRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    delivered: Option<String>,
}

/// Milliseconds since the Unix epoch (0 for times before it).
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-27T05:00:00.000Z`.
pub fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

/// Parse a time given by a person: milliseconds since the epoch, RFC 3339
/// (`2026-01-31T12:00:00Z`, `2026-01-31T20:00:00+08:00`), or a date
/// (`2026-01-31`, midnight UTC).
pub fn parse_time(v: &str) -> Option<i64> {
    parse_time_bound(v, false)
}

/// [`parse_time`] for the bounds of a range `[since, until)`. A date alone
/// means that whole day in UTC: as the lower bound its first millisecond,
/// as the upper bound (`upper`) the start of the next day, so `since` =
/// `until` = one date selects that day.
pub fn parse_time_bound(v: &str, upper: bool) -> Option<i64> {
    let v = v.trim();
    if let Ok(ms) = v.parse::<i64>() {
        return Some(ms);
    }
    if v.len() == 10 && v.as_bytes().get(4) == Some(&b'-') {
        let start = humantime::parse_rfc3339(&format!("{v}T00:00:00Z"))
            .ok()
            .map(unix_ms)?;
        return Some(if upper { start + 86_400_000 } else { start });
    }
    humantime::parse_rfc3339_weak(v)
        .ok()
        .or_else(|| crate::config::parse_rfc3339(v))
        .map(unix_ms)
}

/// Every action a record can carry: the policy actions
/// ([`crate::policy::Action::ALL`]) and `unclassified` (text released
/// without a passing check). Filters accept these and nothing else.
pub fn actions() -> Vec<&'static str> {
    crate::policy::Action::ALL
        .iter()
        .map(|a| a.key())
        .chain([super::gateway::UNCLASSIFIED])
        .collect()
}

/// Parse a category given by a person: label id (`4`), key
/// (`toxic_language`) or name (`Toxic Language`).
pub fn parse_category(v: &str) -> Option<Category> {
    v.parse::<usize>()
        .ok()
        .and_then(Category::from_id)
        .or_else(|| Category::parse(v))
}

impl StoredRecord {
    /// Prepare `r` for storage: hash the conversation key, apply the text
    /// mode, encrypt. `keyring` must be present unless `mode` is `None`.
    pub fn seal(
        r: AuditRecord,
        mode: TextMode,
        keyring: Option<&Keyring>,
        pseudonymizer: Option<&Pseudonymizer>,
    ) -> Result<StoredRecord, CryptoError> {
        let conversation_id = match (pseudonymizer, &r.conversation_key) {
            (Some(p), Some(raw)) => Some(p.conversation_id(r.tenant.as_deref(), raw)),
            _ => None,
        };
        let text = match (mode, keyring) {
            (TextMode::None, _) => StoredText {
                mode: TextMode::None,
                key_id: None,
                nonce: None,
                ciphertext: None,
            },
            (_, None) => {
                return Err(CryptoError::BadKey(
                    "audit text requested without an encryption key".into(),
                ))
            }
            (m, Some(ring)) => {
                let payload = if m == TextMode::Redacted {
                    TextPayload {
                        context: redact(&r.context),
                        response: redact(&r.response),
                        drafts: r
                            .drafts
                            .iter()
                            .map(|d| DraftRecord {
                                response: redact(&d.response),
                                ..d.clone()
                            })
                            .collect(),
                        delivered: Some(redact(&r.delivered)),
                    }
                } else {
                    TextPayload {
                        context: r.context,
                        response: r.response,
                        drafts: r.drafts,
                        delivered: Some(r.delivered),
                    }
                };
                let json = serde_json::to_vec(&payload).map_err(|_| CryptoError::Encrypt)?;
                let s = ring.seal(r.request_id.as_bytes(), &json)?;
                StoredText {
                    mode: m,
                    key_id: Some(s.key_id),
                    nonce: Some(s.nonce),
                    ciphertext: Some(s.ciphertext),
                }
            }
        };
        Ok(StoredRecord {
            request_id: r.request_id,
            time_ms: unix_ms(r.time),
            tenant: r.tenant,
            conversation_id,
            model: r.model,
            policy_name: r.policy_name,
            policy_version: r.policy_version,
            streaming: r.streaming,
            scores: r.scores,
            category: r.category,
            threshold: r.threshold,
            action: r.action,
            shadow: r.shadow,
            latency: r.latency,
            text,
            review: None,
            history: Vec::new(),
        })
    }

    /// Decrypt the text. `Ok(None)` when none was stored.
    pub fn open_text(&self, keyring: Option<&Keyring>) -> Result<Option<OpenedText>, CryptoError> {
        let (Some(key_id), Some(nonce), Some(ct)) =
            (&self.text.key_id, &self.text.nonce, &self.text.ciphertext)
        else {
            return Ok(None);
        };
        let Some(ring) = keyring else {
            return Err(CryptoError::BadKey(format!(
                "record text is encrypted with key id `{key_id}` but no key is loaded; set CAREWALL__AUDIT__ENCRYPTION_KEY or pass --key"
            )));
        };
        let pt = ring.open(key_id, nonce, ct, self.request_id.as_bytes())?;
        let p: TextPayload = serde_json::from_slice(&pt).map_err(|_| CryptoError::Decrypt {
            key_id: key_id.clone(),
        })?;
        Ok(Some(OpenedText {
            context: p.context,
            response: p.response,
            drafts: p.drafts,
            delivered: p.delivered,
        }))
    }

    /// The API / CLI view. Text is included when `text` is given.
    pub fn view(&self, text: Option<OpenedText>, text_error: Option<String>) -> RecordView {
        let (context, response, drafts, delivered) = match text {
            Some(t) => (Some(t.context), Some(t.response), t.drafts, t.delivered),
            None => (None, None, Vec::new(), None),
        };
        RecordView {
            request_id: self.request_id.clone(),
            time: rfc3339(self.time_ms),
            time_ms: self.time_ms,
            tenant: self.tenant.clone(),
            conversation_id: self.conversation_id.clone(),
            model: self.model.clone(),
            policy_name: self.policy_name.clone(),
            policy_version: self.policy_version.clone(),
            streaming: self.streaming.clone(),
            scores: Category::ALL
                .iter()
                .map(|c| (c.key().to_string(), score_json(self.scores.get(*c))))
                .collect(),
            category: self.category,
            threshold: self.threshold.map(round6),
            action: self.action.clone(),
            shadow: self.shadow,
            latency: self.latency,
            text_mode: self.text.mode.as_str(),
            key_id: self.text.key_id.clone(),
            context,
            response,
            drafts,
            delivered,
            text_error,
            review: self.review.clone().map(|r| ReviewView {
                id: labels_in_force(&self.history).last().map(|e| e.id),
                label: r.label,
                label_id: r.label.id(),
                note: r.note,
                reviewer: r.reviewer,
                time: rfc3339(r.time_ms),
            }),
            history: self
                .history
                .iter()
                .map(|e| ReviewEventView {
                    id: e.id,
                    kind: e.kind,
                    label: e.label,
                    label_id: e.label.map(Category::id),
                    note: e.note.clone(),
                    reviewer: e.reviewer.clone(),
                    time: rfc3339(e.time_ms),
                    time_ms: e.time_ms,
                    undoes: e.undoes,
                })
                .collect(),
        }
    }
}

/// f32 -> f64 without float noise (0.6, not 0.6000000238418579).
fn round6(p: f32) -> f64 {
    (f64::from(p) * 1e6).round() / 1e6
}

/// f32 -> JSON number without float noise (0.8, not 0.800000011920929).
fn score_json(p: f32) -> serde_json::Value {
    let rounded = round6(p);
    serde_json::Number::from_f64(rounded).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

/// A record as the review API and CLI show it.
#[derive(Debug, Clone, Serialize)]
pub struct RecordView {
    pub request_id: String,
    /// RFC 3339 UTC.
    pub time: String,
    pub time_ms: i64,
    pub tenant: Option<String>,
    pub conversation_id: Option<String>,
    pub model: String,
    pub policy_name: String,
    pub policy_version: String,
    pub streaming: String,
    /// Category key -> probability, in label order.
    pub scores: serde_json::Map<String, serde_json::Value>,
    pub category: Category,
    pub threshold: Option<f64>,
    pub action: String,
    pub shadow: bool,
    pub latency: Latency,
    pub text_mode: &'static str,
    pub key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
    /// Rejected drafts (retries), oldest first, each with what rejected it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drafts: Vec<DraftRecord>,
    /// What the person received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered: Option<String>,
    /// Why the text could not be shown (e.g. a missing key), if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_error: Option<String>,
    /// The review in force.
    pub review: Option<ReviewView>,
    /// Every review entry, oldest first.
    pub history: Vec<ReviewEventView>,
}

/// A review as shown.
#[derive(Debug, Clone, Serialize)]
pub struct ReviewView {
    /// The history entry that gave this label (pass it to an undo);
    /// `None` only for a review without history (an older store).
    pub id: Option<i64>,
    pub label: Category,
    pub label_id: usize,
    pub note: Option<String>,
    pub reviewer: String,
    pub time: String,
}

/// A review history entry as shown.
#[derive(Debug, Clone, Serialize)]
pub struct ReviewEventView {
    pub id: i64,
    pub kind: ReviewKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<Category>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label_id: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub reviewer: String,
    /// RFC 3339 UTC.
    pub time: String,
    pub time_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub undoes: Option<i64>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::audit::crypto::Key;

    pub(crate) fn sample() -> AuditRecord {
        AuditRecord {
            request_id: "req-1".into(),
            time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            tenant: Some("tenant-a".into()),
            conversation_key: Some("user-42".into()),
            model: "gpt-4o-mini".into(),
            policy_name: "default".into(),
            policy_version: "3".into(),
            streaming: "buffered".into(),
            scores: Scores([0.01, 0.02, 0.03, 0.04, 0.8, 0.05, 0.02, 0.03]),
            category: Category::ToxicLanguage,
            threshold: Some(0.5),
            action: "block".into(),
            shadow: false,
            latency: Latency {
                classifier_ms: Some(12.5),
                added_ms: Some(14.0),
                upstream_ms: Some(800.0),
            },
            context: "[seeker]我的电话是13812345678".into(),
            response: "[supporter]你真没用".into(),
            drafts: Vec::new(),
            delivered: "blocked".into(),
        }
    }

    #[test]
    fn seal_redacts_encrypts_and_hashes() {
        let ring = Keyring::new(Key::from_bytes(&[5; 32]));
        let p = Pseudonymizer::new([6; 32]);
        let s = StoredRecord::seal(sample(), TextMode::Redacted, Some(&ring), Some(&p)).unwrap();
        assert_eq!(s.time_ms, 1_700_000_000_123);
        let cid = s.conversation_id.clone().unwrap();
        assert!(!cid.contains("user-42"));
        let ct = s.text.ciphertext.clone().unwrap();
        assert!(!ct.windows(11).any(|w| w == b"13812345678"));
        let t = s.open_text(Some(&ring)).unwrap().unwrap();
        assert_eq!(t.context, "[seeker]我的电话是[PHONE]");
        assert_eq!(t.response, "[supporter]你真没用");
        assert_eq!(t.delivered.as_deref(), Some("blocked"));
        let v = s.view(None, None);
        assert_eq!(v.time, "2023-11-14T22:13:20.123Z");
        assert!(format!("{:?}", sample()).contains("req-1"));
        assert!(!format!("{:?}", sample()).contains("没用"));
    }

    #[test]
    fn undo_pops_the_latest_label_in_force() {
        let ev = |id, kind, label| ReviewEvent {
            id,
            kind,
            label,
            note: None,
            reviewer: "r".into(),
            time_ms: id,
            undoes: None,
        };
        let l = |id, c| ev(id, ReviewKind::Label, Some(c));
        let u = |id| ev(id, ReviewKind::Undo, None);
        let ids = |h: &[ReviewEvent]| labels_in_force(h).iter().map(|e| e.id).collect::<Vec<_>>();
        assert_eq!(ids(&[]), Vec::<i64>::new());
        let h = [l(1, Category::Nonsense), l(2, Category::ToxicLanguage)];
        assert_eq!(ids(&h), [1, 2]);
        let h = [
            l(1, Category::Nonsense),
            l(2, Category::ToxicLanguage),
            u(3),
        ];
        assert_eq!(ids(&h), [1]);
        let h = [
            l(1, Category::Nonsense),
            u(2),
            u(3),
            l(4, Category::SafeResponse),
        ];
        assert_eq!(ids(&h), [4]);
    }

    #[test]
    fn dates_are_whole_days_as_bounds_and_offsets_are_understood() {
        let day = 86_400_000;
        let t0 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
        assert_eq!(parse_time_bound("2026-01-01", false), Some(t0));
        assert_eq!(parse_time_bound("2026-01-01", true), Some(t0 + day));
        assert_eq!(parse_time("2026-01-01"), Some(t0));
        assert_eq!(parse_time("2026-01-01T08:00:00+08:00"), Some(t0));
        assert_eq!(parse_time("2026-01-01T00:00:00Z"), Some(t0));
        assert_eq!(parse_time(&t0.to_string()), Some(t0));
        assert_eq!(parse_time("2026-13-01"), None);
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn record_actions_are_the_policy_actions_and_unclassified() {
        assert_eq!(
            actions(),
            [
                "allow",
                "annotate",
                "append",
                "retry",
                "replace",
                "block",
                "unclassified"
            ]
        );
        for a in crate::policy::Action::ALL {
            assert_eq!(crate::policy::Action::parse(a.key()), Some(a));
        }
    }

    #[test]
    fn none_mode_stores_no_text_and_full_keeps_it() {
        let ring = Keyring::new(Key::from_bytes(&[5; 32]));
        let s = StoredRecord::seal(sample(), TextMode::None, Some(&ring), None).unwrap();
        assert!(s.text.ciphertext.is_none() && s.conversation_id.is_none());
        assert_eq!(s.open_text(Some(&ring)).unwrap(), None);
        let s = StoredRecord::seal(sample(), TextMode::Full, Some(&ring), None).unwrap();
        let c = s.open_text(Some(&ring)).unwrap().unwrap().context;
        assert!(c.contains("13812345678"));
        let err = s.open_text(None).unwrap_err().to_string();
        assert!(err.contains("no key is loaded"), "{err}");
    }
}
