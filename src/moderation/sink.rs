//! Where finished exchanges go (the audit log plugs in here).

use std::time::{Duration, SystemTime};

use super::Verdict;

/// How the exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExchangeOutcome {
    /// The client got a complete response (possibly remedied).
    Completed,
    /// The client went away; the upstream call was cancelled.
    ClientDisconnected,
    /// The upstream failed mid-way; the client got an error event.
    UpstreamFailed,
}

/// Durations measured for one exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Timings {
    /// Wall-clock time the request arrived.
    pub started_at: SystemTime,
    /// Request arrival to the end of the response.
    pub total: Duration,
    /// Request arrival to the upstream's response headers (first attempt).
    pub upstream_first_byte: Option<Duration>,
    /// Sum of classification times (queueing included).
    pub classify_total: Duration,
}

/// Everything about one moderated exchange, handed to the sink after the
/// response ended. Contains conversation text: sinks must treat it as
/// sensitive (never log it unless configured to).
#[derive(Debug, Clone)]
pub struct ExchangeRecord {
    pub verdict: Verdict,
    pub outcome: ExchangeOutcome,
    /// The request's `model` field.
    pub model: Option<String>,
    /// The request's `user` (end-user id) field, raw: hash it before storing.
    pub user: Option<String>,
    /// Threshold of the policy rule for `verdict.category` (`None` for
    /// `safe_response`).
    pub threshold: Option<f32>,
    pub stream: bool,
    /// Benchmark-format context (`[seeker]...[supporter]...`).
    pub context: String,
    /// Text the upstream produced in the final attempt (what was judged).
    pub upstream_text: String,
    /// Earlier drafts that were judged and rejected (a retry asked the
    /// upstream again), oldest first; the final draft is `upstream_text`.
    pub drafts: Vec<Draft>,
    /// Text the client actually received.
    pub delivered_text: String,
    pub timings: Timings,
    /// Who sent the request (tenant key id, conversation header), as far
    /// as the request's headers say.
    pub client: ClientIdentity,
}

/// A judged draft that was not delivered: its text, merged scores, and the
/// category, threshold and action that rejected it.
#[derive(Debug, Clone, PartialEq)]
pub struct Draft {
    pub text: String,
    pub scores: Option<crate::classifier::Scores>,
    pub category: crate::classifier::Category,
    pub threshold: Option<f32>,
    pub action: crate::policy::Action,
}

/// What identifies the client of one request. Both are raw identifiers:
/// the audit sink hashes them before anything is stored, and they never go
/// into a log line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientIdentity {
    /// A fingerprint of the client's bearer key (`key-` + 16 hex digits of
    /// its SHA-256), never the key itself; `None` without `Authorization`.
    pub key_id: Option<String>,
    /// The client key's `name` (the tenant), when it has one; never the key.
    pub tenant: Option<String>,
    /// The `x-carewall-conversation-id` header (the audit trail falls back
    /// to the request's `user` field).
    pub conversation: Option<String>,
}

/// Receives every moderated exchange. Called on the request's task right
/// after its response ended: implementations must not block (queue the
/// record and write it elsewhere).
pub trait ExchangeSink: Send + Sync + 'static {
    fn record(&self, record: ExchangeRecord);
}

/// A sink that drops records (used when no audit is configured).
#[derive(Debug, Default)]
pub struct NoopSink;

impl ExchangeSink for NoopSink {
    fn record(&self, _record: ExchangeRecord) {}
}

/// Wraps a sink and also logs each exchange's text at debug level, target
/// `carewall::conversation`. Installed only when
/// `logging.log_conversation_text` is set: conversation text is otherwise
/// never logged.
pub struct ConversationLogSink(pub std::sync::Arc<dyn ExchangeSink>);

impl ExchangeSink for ConversationLogSink {
    fn record(&self, record: ExchangeRecord) {
        tracing::debug!(
            target: "carewall::conversation",
            request_id = %record.verdict.request_id,
            context = %record.context,
            upstream_text = %record.upstream_text,
            delivered_text = %record.delivered_text,
            "exchange text (logging.log_conversation_text is on)"
        );
        self.0.record(record);
    }
}
