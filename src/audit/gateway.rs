//! The gateway's side of the audit trail: turns each finished exchange
//! ([`ExchangeRecord`]) into an [`AuditRecord`] and queues it.
//!
//! Invariant: [`GatewayAuditSink::record`] never waits (it runs on the
//! request's task right after the response ended): it uses
//! [`AuditSink::submit_detached`], so under `overflow = "drop"` a full queue
//! drops the record (counted and logged by the sink) and under `"block"` a
//! bounded number of records wait for space in the background; nobody's
//! response is delayed either way.

use std::time::Duration;

use crate::classifier::{Category, Scores};
use crate::moderation::{ExchangeRecord, ExchangeSink};
use crate::policy::{Mode, PolicySet, StreamMode};

use super::record::{AuditRecord, DraftRecord, Latency, ALLOW};
use super::sink::AuditSink;

/// The audit sink as the gateway's [`ExchangeSink`].
#[derive(Debug, Clone)]
pub struct GatewayAuditSink {
    sink: AuditSink,
}

impl GatewayAuditSink {
    pub fn new(sink: AuditSink) -> GatewayAuditSink {
        GatewayAuditSink { sink }
    }
}

impl ExchangeSink for GatewayAuditSink {
    fn record(&self, record: ExchangeRecord) {
        let (action, shadow) = audited_action(&record);
        // Cheap check first: most allowed responses are not sampled, and
        // building the record would copy the whole conversation.
        if !self.sink.wants(&record.verdict.request_id, action != ALLOW) {
            return;
        }
        self.sink
            .submit_detached(audit_record(record, action, shadow));
    }
}

/// The action to record and whether it was only a shadow finding. In
/// shadow mode nothing was done, so the record carries what the policy
/// would have done (the strictest shadow finding), marked shadow.
///
/// Text released without a classification covering it (the classifier
/// failed and `on_error` let it through) is always recorded, with the
/// action `unclassified` unless a remedy was applied to it as well.
fn audited_action(record: &ExchangeRecord) -> (String, bool) {
    let v = &record.verdict;
    match (v.mode, v.shadow.first()) {
        (Some(Mode::Shadow), Some(would)) => (would.action.key().to_string(), true),
        _ if v.unclassified && !v.action.changes_text() && v.category.is_none() => {
            (UNCLASSIFIED.to_string(), false)
        }
        _ => (v.action.key().to_string(), false),
    }
}

/// The audit action of a response released without judgement.
pub const UNCLASSIFIED: &str = "unclassified";

/// The streaming mode as shown in the console.
pub fn streaming_label(stream: bool, mode: Option<StreamMode>) -> &'static str {
    match (stream, mode) {
        (false, _) => "none",
        (true, Some(StreamMode::Buffer)) => "buffer",
        (true, Some(StreamMode::Window)) => "window",
        (true, Some(StreamMode::Observe)) => "observe",
        (true, None) => "stream",
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Build the audit record of one exchange.
///
/// The response text is what the upstream produced (what the classifier
/// judged, and what a counsellor should label), not the remedy the client
/// got; the delivered text is in the verdict's action.
pub fn audit_record(record: ExchangeRecord, action: String, shadow: bool) -> AuditRecord {
    let ExchangeRecord {
        verdict,
        model,
        stream,
        context,
        upstream_text,
        drafts,
        delivered_text,
        timings,
        client,
        user,
        threshold,
        ..
    } = record;
    // An unclassified release names no category (its action says
    // `unclassified`); the column needs one, so it holds safe_response.
    let category = match (shadow, verdict.shadow.first()) {
        (true, Some(would)) => would.category,
        _ => verdict.category.unwrap_or(Category::SafeResponse),
    };
    let latency = Latency {
        classifier_ms: Some(ms(timings.classify_total)),
        // For a non-streamed response the upstream figure is its whole
        // answer, so the rest of the total is what the gateway added. A
        // stream overlaps both; only the classifier time is meaningful.
        added_ms: match (stream, timings.upstream_first_byte) {
            (false, Some(up)) => Some(ms(timings.total.saturating_sub(up))),
            _ => None,
        },
        upstream_ms: match stream {
            false => timings.upstream_first_byte.map(ms),
            true => None,
        },
    };
    AuditRecord {
        request_id: verdict.request_id,
        time: timings.started_at,
        // The key's tenant name when it has one, else its fingerprint.
        tenant: client.tenant.or(client.key_id),
        // The explicit conversation header wins over the end-user id.
        conversation_key: client
            .conversation
            .or(user.filter(|u| !u.trim().is_empty())),
        model: model.unwrap_or_default(),
        policy_name: verdict.policy,
        policy_version: verdict.policy_version,
        streaming: streaming_label(stream, verdict.streaming).to_string(),
        // No scores means the classifier failed (on_error handled it); the
        // record still says what was done, with all-zero scores.
        scores: verdict.scores.unwrap_or(Scores([0.0; 8])),
        category,
        threshold,
        action,
        shadow,
        latency,
        context,
        response: crate::moderation::context::response_text(&upstream_text),
        drafts: drafts
            .into_iter()
            .map(|d| DraftRecord {
                response: crate::moderation::context::response_text(&d.text),
                scores: d.scores,
                category: d.category,
                threshold: d.threshold,
                action: d.action.key().to_string(),
            })
            .collect(),
        delivered: delivered_text,
    }
}

/// Thresholds of the default policy, indexed by label id (`None` for
/// `safe_response`), for the review summary.
pub fn default_thresholds(set: &PolicySet) -> [Option<f32>; 8] {
    let mut out = [None; 8];
    if let Some(p) = set.default_policy() {
        for c in Category::ALL {
            out[c.id()] = p.rules.get(&c).map(|r| r.threshold);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::config::ModerationConfig;
    use crate::moderation::verdict::WouldHave;
    use crate::moderation::{ClientIdentity, ExchangeOutcome, Timings, Verdict};
    use crate::policy::Action;

    fn policies() -> PolicySet {
        let m = ModerationConfig {
            enabled: true,
            policy: "default".into(),
            policies_dir: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"),
            header_policies: Default::default(),
            max_concurrent_classifications: 1,
        };
        PolicySet::load(&m).unwrap_or_else(|e| panic!("shipped policies: {e}"))
    }

    fn exchange(action: Action, mode: Option<Mode>, shadow: Vec<WouldHave>) -> ExchangeRecord {
        let mut scores = [0.01; 8];
        scores[Category::ToxicLanguage.id()] = 0.93;
        ExchangeRecord {
            verdict: Verdict {
                request_id: "rid-1".into(),
                policy: "default".into(),
                policy_version: "3".into(),
                streaming: Some(StreamMode::Window),
                category: Some(Category::ToxicLanguage),
                unclassified: false,
                unknown_fields: Vec::new(),
                flagged: mode.is_some(),
                action,
                mode,
                scores: Some(Scores(scores)),
                shadow,
                classifier: "keyword".into(),
                classifications: 2,
                retries: 0,
                error: None,
                flagged_categories: vec![Category::ToxicLanguage],
                source: mode.map(|_| crate::moderation::verdict::Source::Model),
                guards: Vec::new(),
            },
            outcome: ExchangeOutcome::Completed,
            drafts: Vec::new(),
            model: Some("m".into()),
            user: Some("end-user-7".into()),
            threshold: Some(0.4),
            stream: true,
            context: "[seeker]hi".into(),
            upstream_text: "you idiot".into(),
            delivered_text: "safe reply".into(),
            timings: Timings {
                started_at: SystemTime::UNIX_EPOCH,
                total: Duration::from_millis(900),
                upstream_first_byte: Some(Duration::from_millis(300)),
                classify_total: Duration::from_millis(40),
            },
            client: ClientIdentity {
                key_id: Some("key-00".into()),
                tenant: None,
                conversation: Some("conv".into()),
            },
        }
    }

    #[test]
    fn enforced_block_is_recorded_with_the_upstream_text() {
        let ex = exchange(Action::Block, Some(Mode::Enforce), vec![]);
        let (action, shadow) = audited_action(&ex);
        assert_eq!((action.as_str(), shadow), ("block", false));
        let r = audit_record(ex, action, shadow);
        assert_eq!(r.request_id, "rid-1");
        assert_eq!(r.response, "[supporter]you idiot");
        assert_eq!(r.streaming, "window");
        assert_eq!(r.tenant.as_deref(), Some("key-00"));
        assert_eq!(r.conversation_key.as_deref(), Some("conv"));
        assert_eq!(r.threshold, Some(0.4));
        assert_eq!(r.latency.classifier_ms, Some(40.0));
        // A stream overlaps upstream and gateway time.
        assert_eq!(r.latency.added_ms, None);
        assert!(r.is_flagged());
    }

    #[test]
    fn shadow_finding_records_what_would_have_happened() {
        let would = WouldHave {
            category: Category::UnamiableJudgment,
            score: 0.8,
            action: Action::Replace,
        };
        let ex = exchange(Action::Allow, Some(Mode::Shadow), vec![would]);
        let (action, shadow) = audited_action(&ex);
        assert_eq!((action.as_str(), shadow), ("replace", true));
        let r = audit_record(ex, action, shadow);
        assert_eq!(r.category, Category::UnamiableJudgment);
        assert!(r.is_flagged(), "shadow findings are always recorded");
    }

    #[test]
    fn allowed_response_is_not_flagged_and_plain_requests_get_added_latency() {
        let mut ex = exchange(Action::Allow, None, vec![]);
        ex.stream = false;
        ex.verdict.streaming = None;
        ex.client.conversation = None;
        let (action, shadow) = audited_action(&ex);
        let r = audit_record(ex, action, shadow);
        assert!(!r.is_flagged());
        // Without the conversation header, the end-user id identifies it.
        assert_eq!(r.conversation_key.as_deref(), Some("end-user-7"));
        assert_eq!(r.streaming, "none");
        assert_eq!(r.latency.upstream_ms, Some(300.0));
        assert_eq!(r.latency.added_ms, Some(600.0));
    }

    #[test]
    fn thresholds_follow_the_default_policy() {
        let t = default_thresholds(&policies());
        assert_eq!(t[Category::ToxicLanguage.id()], Some(0.45));
        assert_eq!(t[Category::SafeResponse.id()], None);
    }
}
