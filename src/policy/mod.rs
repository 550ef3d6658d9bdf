//! Policies: per-category thresholds, modes and actions, and the decision
//! rule that turns classifier scores into what happens to a response.
//!
//! Invariant: `policy` does no I/O after loading and knows nothing about HTTP
//! or streams. [`PolicySet`] is immutable; reloads build a new one.

mod guards;
pub(crate) mod parse;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use crate::classifier::{Category, Scores};

pub use guards::{prepare as prepare_guard_text, GuardHit, GuardLang, GuardSet};
pub use parse::{
    is_valid_name, load_policy_file, KeyBinding, PolicySet, SelectError, UnknownHeaderPolicy,
};

/// How a streamed response is moderated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamMode {
    /// Hold the whole response, classify once, then release or remedy.
    Buffer,
    /// Release sentence by sentence, each only after it was classified.
    Window,
    /// Pass through untouched, classify at the end, annotate and audit only.
    Observe,
}

impl StreamMode {
    pub fn parse(s: &str) -> Option<StreamMode> {
        match s {
            "buffer" => Some(StreamMode::Buffer),
            "window" => Some(StreamMode::Window),
            "observe" => Some(StreamMode::Observe),
            _ => None,
        }
    }
}

/// Whether a category's action is applied or only recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Enforce,
    /// Record what would have happened; change nothing.
    Shadow,
}

/// What happens to a flagged response. Variants are ordered by severity
/// (`Allow` least): when several categories are flagged, the most severe
/// enforced action wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    /// Attach the verdict, leave the text.
    Annotate,
    /// Add the category's configured text at the end.
    Append,
    /// Ask the upstream again (steered), re-moderate, fall back to `Replace`.
    Retry,
    /// The response becomes the policy's safe reply.
    Replace,
    /// Stop with `finish_reason: "content_filter"` and the block reply.
    Block,
}

impl Action {
    /// Every action, least severe first.
    pub const ALL: [Action; 6] = [
        Action::Allow,
        Action::Annotate,
        Action::Append,
        Action::Retry,
        Action::Replace,
        Action::Block,
    ];

    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "allow" => Some(Action::Allow),
            "annotate" => Some(Action::Annotate),
            "append" => Some(Action::Append),
            "retry" => Some(Action::Retry),
            "replace" => Some(Action::Replace),
            "block" => Some(Action::Block),
            _ => None,
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Annotate => "annotate",
            Action::Append => "append",
            Action::Retry => "retry",
            Action::Replace => "replace",
            Action::Block => "block",
        }
    }

    /// True when the text the client receives differs from the upstream's.
    pub fn changes_text(self) -> bool {
        matches!(
            self,
            Action::Append | Action::Retry | Action::Replace | Action::Block
        )
    }
}

/// What to do when the classifier fails or times out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Release the response unclassified (the verdict records the error).
    FailOpen,
    /// Withhold it and send the safe reply.
    FailClosed,
    /// Streams in `window` mode: keep holding the text whose check failed
    /// and judge it again in the next check (at the latest the final one);
    /// only if that fails too is it released, labelled `unclassified`.
    /// Elsewhere (one check per response) the same as `fail_open`.
    Hold,
}

/// Unknown fields in streamed deltas (text carewall cannot judge).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownFields {
    /// Removed before the chunk is sent (counted). The default.
    Drop,
    /// Forwarded as they come (counted).
    Pass,
}

/// Language of the person asking; picks which shipped text is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Lang {
    En,
    Zh,
}

impl Lang {
    /// Chinese if the text contains any CJK ideograph, else English.
    pub fn detect(text: &str) -> Lang {
        let cjk = text.chars().any(|c| {
            matches!(c as u32, 0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0xF900..=0xFAFF | 0x20000..=0x2A6DF)
        });
        if cjk {
            Lang::Zh
        } else {
            Lang::En
        }
    }
}

/// A text shipped in both languages. Both are non-empty (validated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Texts {
    pub en: String,
    pub zh: String,
}

impl Texts {
    pub fn get(&self, lang: Lang) -> &str {
        match lang {
            Lang::En => &self.en,
            Lang::Zh => &self.zh,
        }
    }
}

/// The rule for one unsafe category.
#[derive(Debug, Clone, PartialEq)]
pub struct CategoryRule {
    /// Flag when the category's probability is at least this.
    pub threshold: f32,
    pub mode: Mode,
    pub action: Action,
    pub on_error: OnError,
    /// Present (and required) when `action` is `append`.
    pub append: Option<Texts>,
}

/// One validated policy file.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub version: String,
    /// Streaming mode used for `stream: true` requests.
    pub streaming: StreamMode,
    /// In window mode, release held text after this many characters even
    /// without a sentence boundary.
    pub max_hold_chars: usize,
    pub max_retries: u32,
    /// What enforce modes do with delta fields carewall does not know
    /// (`moderation::fields`): they may carry text a client renders.
    pub unknown_fields: UnknownFields,
    /// Added as the last system message when retrying.
    pub retry_system_message: Option<String>,
    /// Used by `replace` and `fail_closed`.
    pub safe_reply: Texts,
    /// Used by `block`.
    pub block_reply: Texts,
    /// One rule per unsafe category (all seven are required in the file).
    pub rules: BTreeMap<Category, CategoryRule>,
    /// `[[guards]]`: phrase lists and patterns acted on whatever the model
    /// scored (see [`GuardSet`]).
    pub guards: GuardSet,
}

/// A category that crossed its threshold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Candidate {
    pub category: Category,
    pub score: f32,
    pub action: Action,
    pub mode: Mode,
}

/// The outcome of applying a policy to one set of scores.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The enforced candidate with the most severe action (ties: higher
    /// score), if any category in enforce mode crossed its threshold.
    pub applied: Option<Candidate>,
    /// Every enforce candidate (including `applied`), most severe first.
    pub enforced: Vec<Candidate>,
    /// Shadow-mode candidates: what would have happened.
    pub shadow: Vec<Candidate>,
    /// The most probable category overall.
    pub top: Category,
}

impl Decision {
    /// The action that is actually applied (`Allow` when nothing was flagged).
    pub fn action(&self) -> Action {
        self.applied.map(|c| c.action).unwrap_or(Action::Allow)
    }

    /// True when any category, enforce or shadow, crossed its threshold.
    pub fn flagged(&self) -> bool {
        !self.enforced.is_empty() || !self.shadow.is_empty()
    }
}

fn by_severity(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.action.cmp(&a.action).then(
        b.score
            .partial_cmp(&a.score)
            .unwrap_or(std::cmp::Ordering::Equal),
    )
}

impl Policy {
    /// Apply the decision rule: candidates are unsafe categories whose score
    /// is at least their threshold; the applied one is the enforce candidate
    /// with the most severe action, ties broken by score.
    pub fn decide(&self, scores: &Scores) -> Decision {
        let mut enforced = Vec::new();
        let mut shadow = Vec::new();
        for (cat, rule) in &self.rules {
            let score = scores.get(*cat);
            // NaN never crosses a threshold; a broken model must not block
            // everything silently (the classifier reports such errors).
            if score >= rule.threshold {
                let c = Candidate {
                    category: *cat,
                    score,
                    action: rule.action,
                    mode: rule.mode,
                };
                match rule.mode {
                    Mode::Enforce => enforced.push(c),
                    Mode::Shadow => shadow.push(c),
                }
            }
        }
        enforced.sort_by(by_severity);
        shadow.sort_by(by_severity);
        Decision {
            applied: enforced.first().copied(),
            enforced,
            shadow,
            top: scores.top(),
        }
    }

    /// The decision on guard hits alone, for a check whose classification
    /// failed: every enforce hit is a candidate with score 1.0 and its
    /// category's action and mode; nothing else is.
    pub fn decide_guards(&self, hits: &[GuardHit]) -> Decision {
        let mut enforced = Vec::new();
        let mut shadow = Vec::new();
        for h in hits.iter().filter(|h| h.mode == Mode::Enforce) {
            let Some(rule) = self.rules.get(&h.category) else {
                continue;
            };
            let c = Candidate {
                category: h.category,
                score: 1.0,
                action: rule.action,
                mode: rule.mode,
            };
            let list = match rule.mode {
                Mode::Enforce => &mut enforced,
                Mode::Shadow => &mut shadow,
            };
            if !list.iter().any(|x: &Candidate| x.category == c.category) {
                list.push(c);
            }
        }
        enforced.sort_by(by_severity);
        shadow.sort_by(by_severity);
        let top = enforced
            .first()
            .or(shadow.first())
            .map(|c| c.category)
            .unwrap_or(Category::SafeResponse);
        Decision {
            applied: enforced.first().copied(),
            enforced,
            shadow,
            top,
        }
    }

    /// How this policy is weaker than `other`, one reason per difference
    /// (empty: at least as strict everywhere). Weaker means, for any unsafe
    /// category: shadow where `other` enforces; a less severe action
    /// (allow < annotate < append < retry < replace < block); a higher
    /// threshold; a more lenient `on_error` (fail_open < hold <
    /// fail_closed). Also a streaming mode that holds less (observe <
    /// window < buffer) and a guard id of `other` that this policy lacks.
    pub fn weaker_than(&self, other: &Policy) -> Vec<String> {
        fn on_error_rank(e: OnError) -> u8 {
            match e {
                OnError::FailOpen => 0,
                OnError::Hold => 1,
                OnError::FailClosed => 2,
            }
        }
        fn streaming_rank(m: StreamMode) -> u8 {
            match m {
                StreamMode::Observe => 0,
                StreamMode::Window => 1,
                StreamMode::Buffer => 2,
            }
        }
        let mut why = Vec::new();
        for (cat, theirs) in &other.rules {
            let Some(mine) = self.rules.get(cat) else {
                continue;
            };
            let k = cat.key();
            let enforced = |r: &CategoryRule| r.mode == Mode::Enforce && r.action != Action::Allow;
            if enforced(theirs) && !enforced(mine) {
                why.push(format!("{k}: not enforced"));
                continue;
            }
            if !enforced(theirs) {
                continue;
            }
            if mine.action < theirs.action {
                why.push(format!(
                    "{k}: action {} < {}",
                    mine.action.key(),
                    theirs.action.key()
                ));
            }
            if mine.threshold > theirs.threshold {
                why.push(format!(
                    "{k}: threshold {} > {}",
                    mine.threshold, theirs.threshold
                ));
            }
            if on_error_rank(mine.on_error) < on_error_rank(theirs.on_error) {
                why.push(format!("{k}: more lenient on_error"));
            }
        }
        if streaming_rank(self.streaming) < streaming_rank(other.streaming) {
            why.push("streaming holds less".into());
        }
        for id in other.guards.ids() {
            if !self.guards.ids().contains(&id) {
                why.push(format!("lacks guard `{id}`"));
            }
        }
        why
    }

    /// What a classifier failure means under this policy: the strictest
    /// `on_error` of any enforced category wins (fail closed, then hold,
    /// then fail open).
    pub fn on_error(&self) -> OnError {
        let enforced = || self.rules.values().filter(|r| r.mode == Mode::Enforce);
        if enforced().any(|r| r.on_error == OnError::FailClosed) {
            OnError::FailClosed
        } else if enforced().any(|r| r.on_error == OnError::Hold) {
            OnError::Hold
        } else {
            OnError::FailOpen
        }
    }

    /// The append text for a category, if its rule has one.
    pub fn append_text(&self, cat: Category, lang: Lang) -> Option<&str> {
        self.rules
            .get(&cat)
            .and_then(|r| r.append.as_ref())
            .map(|t| t.get(lang))
    }
}

/// Shared handle to one policy; a request keeps the one it started with.
pub type PolicyRef = Arc<Policy>;

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn scores_with(pairs: &[(Category, f32)]) -> Scores {
        let mut s = [0.0f32; 8];
        let mut rest = 1.0;
        for (c, p) in pairs {
            s[c.id()] = *p;
            rest -= p;
        }
        s[Category::SafeResponse.id()] += rest.max(0.0);
        Scores(s)
    }

    fn policy() -> Policy {
        let text = include_str!("../../policies/default.toml");
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        parse::parse_policy(text, "default", &dir).expect("shipped default policy parses")
    }

    #[test]
    fn safe_scores_allow() {
        let p = policy();
        let d = p.decide(&scores_with(&[]));
        assert_eq!(d.action(), Action::Allow);
        assert!(!d.flagged());
        assert_eq!(d.top, Category::SafeResponse);
    }

    #[test]
    fn most_severe_enforced_action_wins() {
        let mut p = policy();
        for (c, a) in [
            (Category::HumanoidMimicry, Action::Append),
            (Category::ToxicLanguage, Action::Block),
        ] {
            let r = p.rules.get_mut(&c).expect("rule");
            r.action = a;
            r.mode = Mode::Enforce;
            r.threshold = 0.3;
            r.append = Some(Texts {
                en: "x".into(),
                zh: "x".into(),
            });
        }
        let d = p.decide(&scores_with(&[
            (Category::HumanoidMimicry, 0.5),
            (Category::ToxicLanguage, 0.35),
        ]));
        assert_eq!(d.action(), Action::Block);
        assert_eq!(d.applied.map(|c| c.category), Some(Category::ToxicLanguage));
        assert_eq!(d.enforced.len(), 2);
    }

    #[test]
    fn ties_break_by_score() {
        let mut p = policy();
        for c in [Category::ToxicLanguage, Category::UnamiableJudgment] {
            let r = p.rules.get_mut(&c).expect("rule");
            r.action = Action::Replace;
            r.mode = Mode::Enforce;
            r.threshold = 0.2;
        }
        let d = p.decide(&scores_with(&[
            (Category::ToxicLanguage, 0.3),
            (Category::UnamiableJudgment, 0.4),
        ]));
        assert_eq!(
            d.applied.map(|c| c.category),
            Some(Category::UnamiableJudgment)
        );
    }

    #[test]
    fn shadow_records_but_does_not_apply() {
        let mut p = policy();
        let r = p.rules.get_mut(&Category::ToxicLanguage).expect("rule");
        r.mode = Mode::Shadow;
        r.action = Action::Block;
        r.threshold = 0.5;
        let d = p.decide(&scores_with(&[(Category::ToxicLanguage, 0.9)]));
        assert_eq!(d.action(), Action::Allow);
        assert!(d.flagged());
        assert_eq!(d.shadow[0].action, Action::Block);
    }

    #[test]
    fn below_threshold_is_not_a_candidate() {
        let p = policy();
        let t = p.rules[&Category::ToxicLanguage].threshold;
        let d = p.decide(&scores_with(&[(Category::ToxicLanguage, t - 0.01)]));
        assert!(d
            .enforced
            .iter()
            .all(|c| c.category != Category::ToxicLanguage));
        let d = p.decide(&scores_with(&[(Category::ToxicLanguage, t)]));
        assert!(d
            .enforced
            .iter()
            .any(|c| c.category == Category::ToxicLanguage));
    }

    #[test]
    fn weaker_compares_every_category_streaming_and_guards() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let strict =
            parse::parse_policy(include_str!("../../policies/strict.toml"), "strict", &dir)
                .expect("strict");
        let default = policy();
        assert!(strict.weaker_than(&default).is_empty());
        let why = default.weaker_than(&strict);
        assert!(
            why.iter()
                .any(|w| w == "toxic_language: threshold 0.45 > 0.35"),
            "{why:?}"
        );
        assert!(why.iter().any(|w| w == "streaming holds less"), "{why:?}");
        assert!(
            why.iter().any(|w| w.starts_with("nonsense: more lenient")),
            "{why:?}"
        );
        let mut shadowed = strict.clone();
        shadowed
            .rules
            .get_mut(&Category::ToxicLanguage)
            .expect("rule")
            .mode = Mode::Shadow;
        shadowed.guards = GuardSet::default();
        let why = shadowed.weaker_than(&strict);
        assert!(
            why.contains(&"toxic_language: not enforced".to_string()),
            "{why:?}"
        );
        assert!(
            why.contains(&"lacks guard `self-harm-zh`".to_string()),
            "{why:?}"
        );
    }

    #[test]
    fn language_detection() {
        assert_eq!(Lang::detect("I feel lost"), Lang::En);
        assert_eq!(Lang::detect("我很难过"), Lang::Zh);
        assert_eq!(Lang::detect("ok 好"), Lang::Zh);
        assert_eq!(Lang::detect(""), Lang::En);
    }

    #[test]
    fn fail_closed_wins_over_fail_open() {
        let mut p = policy();
        for r in p.rules.values_mut() {
            r.on_error = OnError::FailOpen;
        }
        assert_eq!(p.on_error(), OnError::FailOpen);
        p.rules
            .get_mut(&Category::ToxicLanguage)
            .expect("rule")
            .on_error = OnError::FailClosed;
        assert_eq!(p.on_error(), OnError::FailClosed);
        // A shadow rule never changes what happens.
        p.rules
            .get_mut(&Category::ToxicLanguage)
            .expect("rule")
            .mode = Mode::Shadow;
        assert_eq!(p.on_error(), OnError::FailOpen);
    }
}
