//! Evaluation metrics over the 8 categories, computed from a confusion
//! matrix: the paper's accuracy and weighted precision/recall/F1, plus
//! macro-F1, binary safe-vs-unsafe accuracy and unsafe recall.
//!
//! Invariant: pure arithmetic, no I/O. Conventions follow scikit-learn:
//! a precision/recall with a zero denominator is 0; weighted averages weight
//! by true support; macro-F1 averages over the classes present in the truth
//! or the predictions.

use serde::Serialize;

use super::Category;

/// `counts[truth][predicted]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Confusion {
    pub counts: [[u64; 8]; 8],
}

impl Confusion {
    /// Count one prediction.
    pub fn add(&mut self, truth: Category, predicted: Category) {
        self.counts[truth.id()][predicted.id()] += 1;
    }

    /// Build from (truth, predicted) pairs.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (Category, Category)>) -> Confusion {
        let mut c = Confusion::default();
        for (t, p) in pairs {
            c.add(t, p);
        }
        c
    }

    /// Number of examples.
    pub fn n(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    fn support(&self, c: usize) -> u64 {
        self.counts[c].iter().sum()
    }

    fn predicted(&self, c: usize) -> u64 {
        self.counts.iter().map(|row| row[c]).sum()
    }
}

/// Precision, recall and F1 of one category.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassMetrics {
    pub category: Category,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Examples whose true label is this category.
    pub support: u64,
    /// Examples predicted as this category.
    pub predicted: u64,
}

/// Everything `carewall eval` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub n: u64,
    pub accuracy: f64,
    pub weighted_precision: f64,
    pub weighted_recall: f64,
    pub weighted_f1: f64,
    pub macro_f1: f64,
    /// Accuracy of "unsafe (any of the 7) vs Safe Response".
    pub binary_accuracy: f64,
    /// Share of truly unsafe examples predicted as any unsafe category.
    pub unsafe_recall: f64,
    pub per_class: Vec<ClassMetrics>,
    pub confusion: Confusion,
}

fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

fn f1(p: f64, r: f64) -> f64 {
    if p + r == 0.0 {
        0.0
    } else {
        2.0 * p * r / (p + r)
    }
}

/// Compute the report for a confusion matrix.
pub fn report(confusion: &Confusion) -> Report {
    let n = confusion.n();
    let c = &confusion.counts;
    let per_class: Vec<ClassMetrics> = Category::ALL
        .iter()
        .map(|&cat| {
            let i = cat.id();
            let tp = c[i][i];
            let support = confusion.support(i);
            let predicted = confusion.predicted(i);
            let precision = ratio(tp, predicted);
            let recall = ratio(tp, support);
            ClassMetrics {
                category: cat,
                precision,
                recall,
                f1: f1(precision, recall),
                support,
                predicted,
            }
        })
        .collect();
    let correct: u64 = (0..8).map(|i| c[i][i]).sum();
    let weighted = |f: fn(&ClassMetrics) -> f64| -> f64 {
        if n == 0 {
            return 0.0;
        }
        per_class
            .iter()
            .map(|m| f(m) * m.support as f64)
            .sum::<f64>()
            / n as f64
    };
    let present: Vec<&ClassMetrics> = per_class
        .iter()
        .filter(|m| m.support > 0 || m.predicted > 0)
        .collect();
    let macro_f1 = if present.is_empty() {
        0.0
    } else {
        present.iter().map(|m| m.f1).sum::<f64>() / present.len() as f64
    };
    let safe = Category::SafeResponse.id();
    let mut binary_correct = 0;
    let mut unsafe_total = 0;
    let mut unsafe_caught = 0;
    for (t, row) in c.iter().enumerate() {
        for (p, &k) in row.iter().enumerate() {
            if (t == safe) == (p == safe) {
                binary_correct += k;
            }
            if t != safe {
                unsafe_total += k;
                if p != safe {
                    unsafe_caught += k;
                }
            }
        }
    }
    Report {
        n,
        accuracy: ratio(correct, n),
        weighted_precision: weighted(|m| m.precision),
        weighted_recall: weighted(|m| m.recall),
        weighted_f1: weighted(|m| m.f1),
        macro_f1,
        binary_accuracy: ratio(binary_correct, n),
        unsafe_recall: ratio(unsafe_caught, unsafe_total),
        per_class,
        confusion: confusion.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, what: &str) {
        assert!((a - b).abs() < 1e-9, "{what}: got {a}, want {b}");
    }

    /// Reference values from scikit-learn 1.9.1, computed once with
    /// `y_true = [7,7,7,7,2,2,2,0,0,5]`, `y_pred = [7,7,7,2,2,2,7,0,5,7]` and
    /// `accuracy_score`, `precision_recall_fscore_support(average="weighted",
    /// zero_division=0)`, `f1_score(average="macro", zero_division=0)`;
    /// binary values with `accuracy_score`/`recall_score` on `label != 7`.
    #[test]
    fn matches_scikit_learn_on_a_hand_made_example() {
        let truth = [7, 7, 7, 7, 2, 2, 2, 0, 0, 5];
        let pred = [7, 7, 7, 2, 2, 2, 7, 0, 5, 7];
        let conf = Confusion::from_pairs(truth.iter().zip(pred.iter()).map(|(&t, &p)| {
            (
                Category::from_id(t).expect("label"),
                Category::from_id(p).expect("label"),
            )
        }));
        let r = report(&conf);
        assert_eq!(r.n, 10);
        close(r.accuracy, 0.6, "accuracy");
        // By hand: safe P=3/5 R=3/4; neglect P=R=2/3; nonsense P=1 R=1/2; preach 0;
        // every F1 but preachment's is 2/3, so macro = 2/3 * 3/4.
        close(r.weighted_precision, 0.64, "weighted precision");
        close(r.weighted_recall, 0.6, "weighted recall");
        close(r.weighted_f1, 0.6, "weighted f1");
        close(r.macro_f1, 0.5, "macro f1");
        // Binary: 7 of 10 agree on safe-vs-unsafe; 4 of 6 unsafe caught.
        close(r.binary_accuracy, 0.7, "binary accuracy");
        close(r.unsafe_recall, 4.0 / 6.0, "unsafe recall");
        let safe = &r.per_class[7];
        close(safe.precision, 0.6, "safe precision");
        close(safe.recall, 0.75, "safe recall");
        assert_eq!((safe.support, safe.predicted), (4, 5));
    }

    #[test]
    fn empty_and_perfect() {
        let r = report(&Confusion::default());
        assert_eq!(
            (r.n, r.accuracy, r.macro_f1, r.unsafe_recall),
            (0, 0.0, 0.0, 0.0)
        );
        let conf = Confusion::from_pairs(Category::ALL.iter().map(|&c| (c, c)));
        let r = report(&conf);
        for v in [
            r.accuracy,
            r.weighted_f1,
            r.macro_f1,
            r.binary_accuracy,
            r.unsafe_recall,
        ] {
            close(v, 1.0, "perfect");
        }
    }
}
