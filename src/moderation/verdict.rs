//! The verdict attached to every moderated response (the `moderation`
//! object) and the bookkeeping that produces it across several
//! classifications (window segments, retries).

use std::collections::{BTreeMap, BTreeSet};

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use crate::classifier::{Category, ClassifyError, Scores};
use crate::policy::{
    Action, Candidate, Decision, GuardHit, Lang, Mode, OnError, Policy, StreamMode,
};

/// A shadow (or observe-mode) finding: what would have happened.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct WouldHave {
    pub category: Category,
    pub score: f32,
    pub action: Action,
}

/// A guard that matched the response (`guards` in the verdict).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GuardFinding {
    /// The guard's id in the policy file.
    pub id: String,
    pub category: Category,
    /// The guard's mode: `shadow` guards only record.
    pub mode: Mode,
}

/// What produced the finding the verdict's category names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The classifier's score crossed the threshold.
    Model,
    /// A guard of the policy matched (score 1.0).
    Guard,
}

/// The `moderation` object in responses and the audit record's core.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub request_id: String,
    pub policy: String,
    pub policy_version: String,
    /// `null` for non-streaming responses.
    pub streaming: Option<StreamMode>,
    /// The category the applied action is for; if nothing was enforced, the
    /// top shadow finding; else the most probable category. `null` when
    /// nothing was judged (no text), or when text was released unclassified
    /// and nothing was flagged.
    pub category: Option<Category>,
    /// True when some text reached the client without a classification
    /// covering it (the classifier failed and `on_error` released it).
    pub unclassified: bool,
    /// True when any category crossed its threshold (enforce or shadow).
    pub flagged: bool,
    /// What was done to the response.
    pub action: Action,
    /// `enforce` when an action was applied for a flagged category, `shadow`
    /// when findings were only recorded, `null` when nothing was flagged.
    pub mode: Option<Mode>,
    /// The judgement of the complete response: the classifications of all
    /// its windows merged (harm categories: the highest; Nonsense and
    /// Linguistic Neglect: the reply's opening; see `classifier::coverage`).
    /// `null` if it could not be classified.
    #[serde(serialize_with = "ser_scores")]
    pub scores: Option<Scores>,
    /// Findings that changed nothing (shadow mode, observe streams).
    pub shadow: Vec<WouldHave>,
    pub classifier: String,
    pub classifications: u32,
    pub retries: u32,
    /// Classifier failure that `on_error` handled, or an upstream failure.
    pub error: Option<String>,
    /// Every category that crossed its threshold in any classification.
    pub flagged_categories: Vec<Category>,
    /// Unknown delta fields and stray choices the upstream sent (dropped,
    /// or passed when the policy says `unknown_fields = "pass"`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unknown_fields: Vec<String>,
    /// `guard` when a guard hit for `category` decided (or, in shadow, was
    /// the finding), `model` when the classifier's score did; `null` when
    /// nothing was flagged.
    pub source: Option<Source>,
    /// Every guard that matched the response (each once), enforce or shadow.
    pub guards: Vec<GuardFinding>,
}

impl Verdict {
    /// The `moderation` object as sent to clients.
    ///
    /// OpenAI's chat completion schema now has an optional `moderation`
    /// field of its own (`{input, output}`, each tagged by `type`), and
    /// strict SDKs such as async-openai parse it. So the object carries those
    /// two keys in OpenAI's shape (the output result uses carewall's
    /// taxonomy as category names; the input is reported as not moderated),
    /// plus carewall's own verdict fields beside them, which SDKs ignore.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_else(|_| serde_json::json!({}));
        let output = match &self.scores {
            Some(scores) => {
                let mut categories = serde_json::Map::new();
                let mut category_scores = serde_json::Map::new();
                let mut applied = serde_json::Map::new();
                for c in Category::ALL {
                    let flagged = if c.is_unsafe() {
                        self.flagged_categories.contains(&c)
                    } else {
                        self.flagged_categories.is_empty()
                    };
                    categories.insert(c.key().into(), serde_json::json!(flagged));
                    category_scores.insert(
                        c.key().into(),
                        serde_json::json!((f64::from(scores.get(c)) * 10_000.0).round() / 10_000.0),
                    );
                    applied.insert(c.key().into(), serde_json::json!(["text"]));
                }
                serde_json::json!({
                    "type": "moderation_results",
                    "model": self.classifier,
                    "results": [{
                        "type": "moderation_result",
                        "model": self.classifier,
                        "flagged": self.flagged,
                        "categories": categories,
                        "category_scores": category_scores,
                        "category_applied_input_types": applied,
                    }],
                })
            }
            None => serde_json::json!({
                "type": "error",
                "code": "not_classified",
                "message": self.error.clone().unwrap_or_else(|| "the response had no text to classify".into()),
            }),
        };
        if let serde_json::Value::Object(m) = &mut v {
            m.insert(
                "input".into(),
                serde_json::json!({"type": "error", "code": "not_moderated",
                                   "message": "carewall moderates generated responses, not request input"}),
            );
            m.insert("output".into(), output);
        }
        v
    }
}

fn ser_scores<S: Serializer>(scores: &Option<Scores>, s: S) -> Result<S::Ok, S::Error> {
    match scores {
        None => s.serialize_none(),
        Some(sc) => {
            let mut m = s.serialize_map(Some(8))?;
            for c in Category::ALL {
                // Rounded so the JSON stays readable; 1e-4 is far below any
                // meaningful threshold difference.
                let p = (f64::from(sc.get(c)) * 10_000.0).round() / 10_000.0;
                m.serialize_entry(c.key(), &p)?;
            }
            m.end()
        }
    }
}

/// What the engine must do with the text a classification covered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Gate {
    /// Release it (maybe with appends at the end).
    Release,
    /// Nothing released yet and retries left: ask the upstream again.
    Retry(Candidate),
    /// Withhold it and end with a remedy (`Replace` or `Block`).
    Stop {
        action: Action,
        category: Option<Category>,
    },
    /// The check failed and `on_error = "hold"`: keep the text held and
    /// judge it again with the next check.
    Hold,
}

/// Accumulates classifications of one response into its verdict.
#[derive(Debug, Clone)]
pub struct Tally {
    /// The most severe action applied so far and what it was for.
    pub action: Action,
    pub category: Option<Category>,
    pub last_scores: Option<Scores>,
    shadow: BTreeMap<Category, WouldHave>,
    pub appends: Vec<Category>,
    pub classifications: u32,
    pub retries: u32,
    pub error: Option<String>,
    /// Set by retries so that a clean second answer still reports `retry`.
    pub retried_for: Option<Category>,
    top: Option<Category>,
    flagged: BTreeSet<Category>,
    /// Text was released without a passing classification.
    pub unjudged: bool,
    /// Guards that matched, each once, in the order first seen.
    pub guards: Vec<GuardHit>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            action: Action::Allow,
            category: None,
            last_scores: None,
            shadow: BTreeMap::new(),
            appends: Vec::new(),
            classifications: 0,
            retries: 0,
            error: None,
            retried_for: None,
            top: None,
            flagged: BTreeSet::new(),
            unjudged: false,
            guards: Vec::new(),
        }
    }
}

impl Tally {
    fn raise(&mut self, action: Action, category: Option<Category>) {
        if action > self.action || (action == self.action && self.category.is_none()) {
            self.action = action;
            self.category = category.or(self.category);
        }
    }

    fn shadow(&mut self, c: &Candidate) {
        let e = self.shadow.entry(c.category).or_insert(WouldHave {
            category: c.category,
            score: c.score,
            action: c.action,
        });
        if c.score > e.score {
            e.score = c.score;
        }
    }

    /// Record a classification and decide what happens to the text it
    /// covered. `released_any` says whether text already reached the client
    /// (a retry is only possible before that). `observe` records every
    /// finding as shadow and always releases.
    pub fn gate(
        &mut self,
        policy: &Policy,
        decision: &Decision,
        scores: Scores,
        released_any: bool,
        observe: bool,
    ) -> Gate {
        self.classifications += 1;
        match &mut self.last_scores {
            Some(merged) => crate::classifier::coverage::merge(merged, &scores),
            None => self.last_scores = Some(scores),
        }
        self.top = Some(decision.top);
        self.apply(policy, decision, released_any, observe)
    }

    /// Record a decision's findings and decide what happens to the text.
    fn apply(
        &mut self,
        policy: &Policy,
        decision: &Decision,
        released_any: bool,
        observe: bool,
    ) -> Gate {
        self.flagged.extend(
            decision
                .enforced
                .iter()
                .chain(&decision.shadow)
                .map(|c| c.category),
        );
        for c in &decision.shadow {
            self.shadow(c);
        }
        if observe {
            for c in &decision.enforced {
                self.shadow(c);
            }
            if decision.flagged() {
                self.raise(Action::Annotate, None);
            }
            return Gate::Release;
        }
        let Some(applied) = decision.applied else {
            return Gate::Release;
        };
        match applied.action {
            Action::Allow | Action::Annotate => {
                self.raise(applied.action, Some(applied.category));
                Gate::Release
            }
            Action::Append => {
                self.raise(Action::Append, Some(applied.category));
                if !self.appends.contains(&applied.category) {
                    self.appends.push(applied.category);
                }
                Gate::Release
            }
            Action::Retry if !released_any && self.retries < policy.max_retries => {
                Gate::Retry(applied)
            }
            Action::Retry | Action::Replace => Gate::Stop {
                action: Action::Replace,
                category: Some(applied.category),
            },
            Action::Block => Gate::Stop {
                action: Action::Block,
                category: Some(applied.category),
            },
        }
    }

    /// Record guard hits of one check (each guard once per response).
    /// Shadow hits become shadow findings with their category's action;
    /// enforce hits reach the decision through the scores. Returns the
    /// hits not seen before in this response (for metrics).
    pub fn note_guards(&mut self, policy: &Policy, hits: Vec<GuardHit>) -> Vec<GuardHit> {
        let mut new = Vec::new();
        for h in hits {
            if h.mode == Mode::Shadow {
                if let Some(rule) = policy.rules.get(&h.category) {
                    self.flagged.insert(h.category);
                    self.shadow(&Candidate {
                        category: h.category,
                        score: 1.0,
                        action: rule.action,
                        mode: Mode::Shadow,
                    });
                }
            }
            if !self.guards.iter().any(|g| g.id == h.id) {
                self.guards.push(h.clone());
                new.push(h);
            }
        }
        new
    }

    /// Record a classifier failure and apply the policy's `on_error`.
    /// `guard`: the decision on this check's guard hits, if any guard
    /// matched: a guard whose category's action withholds the text (block,
    /// replace; retry, which could not be judged, becomes replace) stops
    /// the response even though the model is down; milder ones are recorded
    /// and `on_error` decides. `can_hold`: a later check will cover this
    /// text (a window check in `window` mode). Text released here is marked
    /// unjudged.
    pub fn gate_error(
        &mut self,
        policy: &Policy,
        err: &ClassifyError,
        guard: Option<&Decision>,
        observe: bool,
        can_hold: bool,
    ) -> Gate {
        self.error = Some(err.to_string());
        if let Some(d) = guard {
            // `released_any = true`: no retry whose answer nothing could judge.
            let g = self.apply(policy, d, true, observe);
            if matches!(g, Gate::Stop { .. }) {
                return g;
            }
        }
        let gate = if observe {
            Gate::Release
        } else {
            match policy.on_error() {
                OnError::FailOpen => Gate::Release,
                OnError::Hold if can_hold => Gate::Hold,
                OnError::Hold => Gate::Release,
                OnError::FailClosed => Gate::Stop {
                    action: Action::Replace,
                    category: None,
                },
            }
        };
        if gate == Gate::Release {
            self.unjudged = true;
        }
        gate
    }

    /// A held check that failed is now covered by a later check that passed.
    pub fn recovered(&mut self) {
        if let Some(e) = self.error.take() {
            self.error = Some(format!("{e} (held; judged by a later check)"));
        }
    }

    /// A retry is starting: forget the discarded attempt's appends.
    pub fn start_retry(&mut self, c: &Candidate) {
        self.retries += 1;
        self.retried_for.get_or_insert(c.category);
        self.appends.clear();
        // The verdict's scores are those of the draft the person gets.
        self.last_scores = None;
        self.action = Action::Allow;
        self.category = None;
    }

    /// Record the remedy that ended the response.
    pub fn stopped(&mut self, action: Action, category: Option<Category>) {
        self.action = action;
        self.category = category.or(self.retried_for);
    }

    /// The final verdict.
    pub fn verdict(&self, meta: &VerdictMeta) -> Verdict {
        let mut action = self.action;
        let mut category = self.category;
        if self.retries > 0 && action < Action::Retry {
            // The retry was the remedy even though its answer then passed.
            action = Action::Retry;
            category = category.or(self.retried_for);
        }
        let shadow: Vec<WouldHave> = {
            let mut v: Vec<_> = self.shadow.values().copied().collect();
            v.sort_by(|a, b| b.action.cmp(&a.action).then(b.score.total_cmp(&a.score)));
            v
        };
        let enforced = category.is_some() && action != Action::Allow || action.changes_text();
        let flagged = category.is_some() || !shadow.is_empty();
        let mode = if enforced && category.is_some() {
            Some(Mode::Enforce)
        } else if !shadow.is_empty() {
            Some(Mode::Shadow)
        } else {
            None
        };
        let decided = category.or_else(|| shadow.first().map(|w| w.category));
        let source = match (mode, decided) {
            (Some(m), Some(c)) => Some(
                if self
                    .guards
                    .iter()
                    .any(|g| g.category == c && (g.mode == m || m == Mode::Shadow))
                {
                    Source::Guard
                } else {
                    Source::Model
                },
            ),
            _ => None,
        };
        let category = match decided {
            Some(c) => Some(c),
            // Unclassified text and no finding: no category can honestly be
            // named for the response.
            None if self.unjudged => None,
            None => self.top,
        };
        Verdict {
            request_id: meta.request_id.clone(),
            policy: meta.policy.clone(),
            policy_version: meta.policy_version.clone(),
            streaming: meta.streaming,
            category,
            unclassified: self.unjudged,
            flagged,
            action,
            mode,
            scores: self.last_scores,
            shadow,
            classifier: meta.classifier.clone(),
            classifications: self.classifications,
            retries: self.retries,
            error: self.error.clone(),
            flagged_categories: self.flagged.iter().copied().collect(),
            unknown_fields: Vec::new(),
            source,
            guards: self
                .guards
                .iter()
                .map(|g| GuardFinding {
                    id: g.id.to_string(),
                    category: g.category,
                    mode: g.mode,
                })
                .collect(),
        }
    }
}

/// The fixed parts of a verdict.
#[derive(Debug, Clone)]
pub struct VerdictMeta {
    pub request_id: String,
    pub policy: String,
    pub policy_version: String,
    pub streaming: Option<StreamMode>,
    pub classifier: String,
}

impl Verdict {
    /// The `category` label of metrics, access log and spans: the category,
    /// `unclassified` for text released without judgement, `none` when
    /// there was nothing to judge.
    pub fn category_label(&self) -> &'static str {
        match (self.category, self.unclassified) {
            (Some(c), _) => c.key(),
            (None, true) => "unclassified",
            (None, false) => "none",
        }
    }
}

/// Text that ends a remedied response: the safe reply for `replace` (and
/// `fail_closed`), the block reply for `block`.
pub fn remedy_text(policy: &Policy, action: Action, lang: Lang) -> &str {
    match action {
        Action::Block => policy.block_reply.get(lang),
        _ => policy.safe_reply.get(lang),
    }
}

/// `finish_reason` for a remedy.
pub fn remedy_finish_reason(action: Action) -> &'static str {
    match action {
        Action::Block => "content_filter",
        _ => "stop",
    }
}

/// The appended notes, each after a blank line.
pub fn appendix(policy: &Policy, appends: &[Category], lang: Lang) -> String {
    let mut s = String::new();
    for c in appends {
        if let Some(t) = policy.append_text(*c, lang) {
            s.push_str("\n\n");
            s.push_str(t);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        let dir = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/policies"));
        let m = crate::config::ModerationConfig {
            enabled: true,
            policy: "default".into(),
            policies_dir: dir,
            header_policies: Default::default(),
            max_concurrent_classifications: 1,
        };
        let set = crate::policy::PolicySet::load(&m).expect("policies");
        (*set.default_policy().expect("default")).clone()
    }

    fn meta() -> VerdictMeta {
        VerdictMeta {
            request_id: "r1".into(),
            policy: "default".into(),
            policy_version: "1".into(),
            streaming: None,
            classifier: "keyword".into(),
        }
    }

    fn scores(c: Category, p: f32) -> Scores {
        let mut s = [0.0; 8];
        s[c.id()] = p;
        s[Category::SafeResponse.id()] += 1.0 - p;
        Scores(s)
    }

    #[test]
    fn serialises_all_scores_by_key() {
        let p = policy();
        let mut t = Tally::default();
        let sc = scores(Category::ToxicLanguage, 0.9);
        let g = t.gate(&p, &p.decide(&sc), sc, false, false);
        assert!(matches!(
            g,
            Gate::Stop {
                action: Action::Block,
                ..
            }
        ));
        if let Gate::Stop { action, category } = g {
            t.stopped(action, category);
        }
        let v = t.verdict(&meta()).to_json();
        assert_eq!(
            v["output"]["results"][0]["categories"]["toxic_language"],
            true
        );
        assert_eq!(
            v["output"]["results"][0]["categories"]["safe_response"],
            false
        );
        assert_eq!(v["input"]["type"], "error");
        assert_eq!(v["category"], "toxic_language");
        assert_eq!(v["action"], "block");
        assert_eq!(v["mode"], "enforce");
        assert_eq!(v["flagged"], true);
        assert_eq!(v["scores"].as_object().map(|m| m.len()), Some(8));
        assert_eq!(v["scores"]["toxic_language"], 0.9);
    }

    #[test]
    fn retry_only_before_release_then_replace() {
        let p = policy();
        let sc = scores(Category::Nonsense, 0.9);
        let d = p.decide(&sc);
        let mut t = Tally::default();
        assert!(matches!(t.gate(&p, &d, sc, false, false), Gate::Retry(_)));
        assert!(matches!(
            t.gate(&p, &d, sc, true, false),
            Gate::Stop {
                action: Action::Replace,
                ..
            }
        ));
        if let Gate::Retry(c) = t.gate(&p, &d, sc, false, false) {
            t.start_retry(&c);
        }
        // Out of retries (default max_retries = 1): falls back to replace.
        assert!(matches!(
            t.gate(&p, &d, sc, false, false),
            Gate::Stop {
                action: Action::Replace,
                ..
            }
        ));
    }

    #[test]
    fn clean_retry_reports_retry() {
        let p = policy();
        let mut t = Tally::default();
        let bad = scores(Category::Nonsense, 0.9);
        if let Gate::Retry(c) = t.gate(&p, &p.decide(&bad), bad, false, false) {
            t.start_retry(&c);
        } else {
            panic!("expected retry");
        }
        let ok = scores(Category::SafeResponse, 0.0);
        assert_eq!(t.gate(&p, &p.decide(&ok), ok, false, false), Gate::Release);
        let v = t.verdict(&meta());
        assert_eq!(v.action, Action::Retry);
        assert_eq!(v.category, Some(Category::Nonsense));
        assert_eq!(v.retries, 1);
    }

    #[test]
    fn observe_records_shadow_only() {
        let p = policy();
        let mut t = Tally::default();
        let sc = scores(Category::ToxicLanguage, 0.9);
        assert_eq!(t.gate(&p, &p.decide(&sc), sc, false, true), Gate::Release);
        let v = t.verdict(&meta());
        assert_eq!(v.action, Action::Annotate);
        assert_eq!(v.mode, Some(Mode::Shadow));
        assert_eq!(v.shadow[0].action, Action::Block);
        assert_eq!(v.category, Some(Category::ToxicLanguage));
    }

    #[test]
    fn released_after_a_failure_is_unclassified() {
        let p = policy();
        let mut t = Tally::default();
        let e = ClassifyError::Timeout { ms: 5 };
        assert_eq!(t.gate_error(&p, &e, None, false, true), Gate::Release);
        let v = t.verdict(&meta());
        assert!(v.unclassified);
        assert_eq!(v.category, None);
        assert_eq!(v.category_label(), "unclassified");
        assert_eq!(v.action, Action::Allow);
        let j = v.to_json();
        assert_eq!(j["category"], serde_json::Value::Null);
        assert_eq!(j["unclassified"], true);
    }

    #[test]
    fn hold_keeps_text_until_a_later_check() {
        let mut p = policy();
        for r in p.rules.values_mut() {
            r.on_error = OnError::Hold;
        }
        let mut t = Tally::default();
        let e = ClassifyError::Overloaded { capacity: 1 };
        assert_eq!(t.gate_error(&p, &e, None, false, true), Gate::Hold);
        assert!(!t.unjudged);
        let sc = scores(Category::SafeResponse, 0.0);
        assert_eq!(t.gate(&p, &p.decide(&sc), sc, false, false), Gate::Release);
        t.recovered();
        assert!(!t.verdict(&meta()).unclassified);
        // The final check cannot hold: released, labelled.
        assert_eq!(t.gate_error(&p, &e, None, false, false), Gate::Release);
        assert!(t.verdict(&meta()).unclassified);
    }

    #[test]
    fn merged_scores_keep_the_worst_window() {
        let p = policy();
        let mut t = Tally::default();
        let a = scores(Category::ToxicLanguage, 0.3);
        let b = scores(Category::SafeResponse, 0.0);
        t.gate(&p, &p.decide(&a), a, false, false);
        t.gate(&p, &p.decide(&b), b, true, false);
        let v = t.verdict(&meta());
        assert_eq!(v.scores.map(|s| s.get(Category::ToxicLanguage)), Some(0.3));
    }

    #[test]
    fn safe_response_verdict() {
        let p = policy();
        let mut t = Tally::default();
        let sc = scores(Category::SafeResponse, 0.0);
        assert_eq!(t.gate(&p, &p.decide(&sc), sc, false, false), Gate::Release);
        let v = t.verdict(&meta());
        assert_eq!(
            (v.action, v.mode, v.flagged, v.category),
            (Action::Allow, None, false, Some(Category::SafeResponse))
        );
    }
}
