//! Per-category review summary: how often the model flagged what, how often
//! counsellors agreed, the precision of each category's flags, and a
//! threshold suggestion learnt from the reviewed records.
//!
//! Caveat written into every suggestion: reviewed records are mostly flagged
//! ones (plus the sampled allowed ones), so recall estimates are optimistic;
//! raise `audit.sample_rate` to review allowed responses too.

use serde::Serialize;

use crate::classifier::Category;

use super::record::{StoredRecord, ALLOW};
use super::store::GroupCount;

/// Fewest reviewed positives before a threshold is suggested.
pub const MIN_POSITIVES: usize = 5;

/// Summary of one category.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CategorySummary {
    pub category: Category,
    pub label_id: usize,
    /// Records whose model category is this one.
    pub total: u64,
    /// ... of which the policy flagged (action other than `allow`).
    pub flagged: u64,
    /// ... of which in shadow mode.
    pub shadow: u64,
    pub reviewed: u64,
    /// Reviewed records of this model category whose label agrees.
    pub agreed: u64,
    /// `agreed / reviewed`.
    pub agreement: Option<f64>,
    /// Reviewed flagged records of this category.
    pub flagged_reviewed: u64,
    /// Share of reviewed flags of this category that the reviewer confirmed:
    /// the precision of flags at the threshold in force when they were made.
    pub flag_precision: Option<f64>,
    /// The threshold now in force (from the policy, else the latest record).
    pub threshold: Option<f64>,
    /// Over all reviewed records: of those scoring at or above `threshold`
    /// for this category, the share labelled with it.
    pub precision_at_threshold: Option<f64>,
    /// Reviewed records labelled with this category.
    pub labelled: u64,
    /// Threshold maximising F1 on the reviewed records, if there are enough.
    pub suggested_threshold: Option<f64>,
    pub suggested_precision: Option<f64>,
    pub suggested_recall: Option<f64>,
    /// Why there is no suggestion, or what it rests on.
    pub note: String,
}

/// The whole summary.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub total: u64,
    pub reviewed: u64,
    /// Reviewed records whose label equals the model category, overall.
    pub agreement: Option<f64>,
    pub categories: Vec<CategorySummary>,
}

/// f32 -> f64 rounded to 6 places, so JSON shows 0.7, not 0.699999988.
fn r6(x: f32) -> f64 {
    (f64::from(x) * 1e6).round() / 1e6
}

fn ratio(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

/// Build the summary from grouped counts and the reviewed records.
/// `current[c]` is the threshold in force for category `c`, when known.
pub fn summarize(
    counts: &[GroupCount],
    reviewed: &[StoredRecord],
    current: &[Option<f32>; 8],
) -> Summary {
    let mut categories = Vec::with_capacity(8);
    for c in Category::ALL {
        let mine = counts.iter().filter(|g| g.category == c);
        let total = mine.clone().map(|g| g.total).sum();
        let flagged = mine
            .clone()
            .filter(|g| g.action != ALLOW)
            .map(|g| g.total)
            .sum();
        let shadow = mine
            .clone()
            .filter(|g| g.action != ALLOW && g.shadow)
            .map(|g| g.total)
            .sum();
        let label = |r: &StoredRecord| r.review.as_ref().map(|v| v.label);
        let rev_mine: Vec<&StoredRecord> = reviewed.iter().filter(|r| r.category == c).collect();
        let agreed = rev_mine.iter().filter(|r| label(r) == Some(c)).count() as u64;
        let flagged_rev: Vec<&&StoredRecord> =
            rev_mine.iter().filter(|r| r.action != ALLOW).collect();
        let confirmed = flagged_rev.iter().filter(|r| label(r) == Some(c)).count() as u64;

        // Threshold in force: the policy's, else the newest record's.
        let threshold = current[c.id()].or_else(|| {
            reviewed
                .iter()
                .filter(|r| r.category == c && r.threshold.is_some())
                .max_by_key(|r| r.time_ms)
                .and_then(|r| r.threshold)
        });
        let precision_at_threshold = threshold.and_then(|t| {
            let above: Vec<_> = reviewed.iter().filter(|r| r.scores.get(c) >= t).collect();
            let hits = above.iter().filter(|r| label(r) == Some(c)).count() as u64;
            ratio(hits, above.len() as u64)
        });

        let labelled = reviewed.iter().filter(|r| label(r) == Some(c)).count();
        let (suggested_threshold, suggested_precision, suggested_recall, note) = if c
            == Category::SafeResponse
        {
            (
                None,
                None,
                None,
                "Safe responses are not flagged; no threshold applies.".to_string(),
            )
        } else if labelled < MIN_POSITIVES {
            (
                    None,
                    None,
                    None,
                    format!(
                        "needs at least {MIN_POSITIVES} reviewed records labelled {} to suggest a threshold (has {labelled})",
                        c.key()
                    ),
                )
        } else {
            match best_threshold(reviewed, c) {
                    Some((t, p, r)) => (
                        Some(t),
                        Some(p),
                        Some(r),
                        format!(
                            "maximises F1 over {} reviewed records ({labelled} labelled {}); reviews are mostly of flagged responses, so recall is optimistic",
                            reviewed.len(),
                            c.key()
                        ),
                    ),
                    None => (None, None, None, "no threshold separates the reviewed records".into()),
                }
        };

        categories.push(CategorySummary {
            category: c,
            label_id: c.id(),
            total,
            flagged,
            shadow,
            reviewed: rev_mine.len() as u64,
            agreed,
            agreement: ratio(agreed, rev_mine.len() as u64),
            flagged_reviewed: flagged_rev.len() as u64,
            flag_precision: ratio(confirmed, flagged_rev.len() as u64),
            threshold: threshold.map(r6),
            precision_at_threshold,
            labelled: labelled as u64,
            suggested_threshold: suggested_threshold.map(r6),
            suggested_precision,
            suggested_recall,
            note,
        });
    }
    let total = counts.iter().map(|g| g.total).sum();
    let agreed_all = reviewed
        .iter()
        .filter(|r| r.review.as_ref().map(|v| v.label) == Some(r.category))
        .count() as u64;
    Summary {
        total,
        reviewed: reviewed.len() as u64,
        agreement: ratio(agreed_all, reviewed.len() as u64),
        categories,
    }
}

/// The score threshold for `c` with the best F1 on the reviewed records
/// (ties go to the higher threshold: fewer interventions for the same F1).
/// Returns (threshold, precision, recall).
fn best_threshold(reviewed: &[StoredRecord], c: Category) -> Option<(f32, f64, f64)> {
    let positives = reviewed
        .iter()
        .filter(|r| r.review.as_ref().map(|v| v.label) == Some(c))
        .count();
    let mut candidates: Vec<f32> = reviewed.iter().map(|r| r.scores.get(c)).collect();
    candidates.sort_by(|a, b| b.total_cmp(a));
    candidates.dedup();
    let mut best: Option<(f64, f32, f64, f64)> = None;
    for t in candidates {
        let (mut tp, mut fp) = (0usize, 0usize);
        for r in reviewed.iter().filter(|r| r.scores.get(c) >= t) {
            if r.review.as_ref().map(|v| v.label) == Some(c) {
                tp += 1;
            } else {
                fp += 1;
            }
        }
        if tp == 0 {
            continue;
        }
        let p = tp as f64 / (tp + fp) as f64;
        let r = tp as f64 / positives as f64;
        let f1 = 2.0 * p * r / (p + r);
        // Candidates go from high to low, so strict `>` keeps the higher
        // threshold on ties.
        if best.is_none_or(|(bf, ..)| f1 > bf + 1e-12) {
            best = Some((f1, t, p, r));
        }
    }
    best.map(|(_, t, p, r)| (t, p, r))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::audit::record::{Latency, Review, StoredText};
    use crate::audit::settings::TextMode;
    use crate::classifier::Scores;

    fn rec(
        id: usize,
        cat: Category,
        p: f32,
        action: &str,
        label: Option<Category>,
    ) -> StoredRecord {
        let mut s = [0.0f32; 8];
        s[cat.id()] = p;
        s[Category::SafeResponse.id()] = 1.0 - p;
        StoredRecord {
            request_id: format!("r{id}"),
            time_ms: id as i64,
            tenant: None,
            conversation_id: None,
            model: "m".into(),
            policy_name: "p".into(),
            policy_version: "1".into(),
            streaming: "buffered".into(),
            scores: Scores(s),
            category: cat,
            threshold: Some(0.5),
            action: action.into(),
            shadow: false,
            latency: Latency::default(),
            text: StoredText {
                mode: TextMode::None,
                key_id: None,
                nonce: None,
                ciphertext: None,
            },
            review: label.map(|l| Review {
                label: l,
                note: None,
                reviewer: "x".into(),
                time_ms: 0,
            }),
            history: Vec::new(),
        }
    }

    #[test]
    fn precision_agreement_and_suggestion() {
        use Category::*;
        // Toxic flags: scores 0.9..0.5; reviewers confirm the ones >= 0.7.
        let mut reviewed = Vec::new();
        for (i, p) in [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.55, 0.5]
            .iter()
            .enumerate()
        {
            let label = if *p >= 0.7 {
                ToxicLanguage
            } else {
                SafeResponse
            };
            reviewed.push(rec(i, ToxicLanguage, *p, "block", Some(label)));
        }
        let counts = vec![
            GroupCount {
                category: ToxicLanguage,
                action: "block".into(),
                shadow: false,
                total: 20,
                reviewed: 9,
            },
            GroupCount {
                category: ToxicLanguage,
                action: "allow".into(),
                shadow: false,
                total: 5,
                reviewed: 0,
            },
            GroupCount {
                category: Nonsense,
                action: "annotate".into(),
                shadow: true,
                total: 3,
                reviewed: 0,
            },
        ];
        let s = summarize(&counts, &reviewed, &[None; 8]);
        assert_eq!((s.total, s.reviewed), (28, 9));
        let t = &s.categories[ToxicLanguage.id()];
        assert_eq!((t.total, t.flagged, t.reviewed, t.agreed), (25, 20, 9, 6));
        assert_eq!(t.flag_precision, Some(6.0 / 9.0));
        assert_eq!(t.threshold, Some(0.5));
        assert_eq!(t.precision_at_threshold, Some(6.0 / 9.0));
        assert_eq!(t.suggested_threshold, Some(0.7));
        assert_eq!(
            (t.suggested_precision, t.suggested_recall),
            (Some(1.0), Some(1.0))
        );
        let n = &s.categories[Nonsense.id()];
        assert_eq!((n.total, n.flagged, n.shadow), (3, 3, 3));
        assert!(n.suggested_threshold.is_none());
        assert!(n.note.contains("needs at least 5"), "{}", n.note);
        // A policy threshold overrides the recorded one.
        let mut cur = [None; 8];
        cur[ToxicLanguage.id()] = Some(0.8);
        let s = summarize(&counts, &reviewed, &cur);
        assert_eq!(
            s.categories[ToxicLanguage.id()].precision_at_threshold,
            Some(1.0)
        );
    }
}
