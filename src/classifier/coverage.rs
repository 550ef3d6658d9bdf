//! Whole-response coverage: how a (context, response) pair becomes the
//! views the model scores, and how their scores become one judgement.
//!
//! - The response's tokens are split into windows: the first holds its
//!   first `max_response_tokens`; each later one starts
//!   `window_overlap_tokens` before the previous one ended and is prefixed
//!   with `[supporter]`, so together they cover every token and a sentence
//!   cut by an edge is also seen whole ([`response_spans`]).
//! - Each window is scored with the newest context (at most
//!   `max_context_tokens`) and, when the context holds more than the
//!   seeker's last turn, again with only that turn, so padding or a long
//!   history cannot switch a verdict off ([`last_seeker_turn`]).
//! - [`aggregate`]: for the five harm categories (Humanoid Mimicry,
//!   Unamiable Judgment, Toxic Language, Unauthorized Preachment,
//!   Nonfactual Statement) the most severe view wins (max); Nonsense and
//!   Linguistic Neglect are properties of how the reply answers the seeker,
//!   so they come from the first window with the full context; Safe
//!   Response is the minimum over views. The result is not a distribution;
//!   every entry keeps its meaning for the policy's per-category thresholds.
//!
//! The same rules are implemented in `training/carewall_model.py`
//! (`encode_windows`, `aggregate`) and pinned by `parity.json`.
//!
//! Invariant: pure functions; no tokeniser, no I/O.

use super::tokenize::{Layout, View};
use super::{Category, Scores};

/// Categories judged on every view, most severe wins.
pub const HARM: [Category; 5] = [
    Category::HumanoidMimicry,
    Category::UnamiableJudgment,
    Category::ToxicLanguage,
    Category::UnauthorizedPreachment,
    Category::NonfactualStatement,
];

/// The seeker's last turn of a benchmark-format context (from its last
/// `[seeker]` tag), or the whole context when it has no tag.
pub fn last_seeker_turn(context: &str) -> &str {
    match context.rfind("[seeker]") {
        Some(i) => &context[i..],
        None => context,
    }
}

/// `[start, end)` token ranges of the response windows for a response of
/// `n` tokens: window 0 is `[0, min(n, r))`; each later window holds
/// `r - prefix_len` tokens and starts `overlap` tokens before the previous
/// end. Always at least one window (an empty response has `[0, 0)`).
pub fn response_spans(n: usize, layout: &Layout, prefix_len: usize) -> Vec<(usize, usize)> {
    let r = layout.max_response_tokens.max(1);
    let mut spans = vec![(0, n.min(r))];
    let room = r.saturating_sub(prefix_len).max(1);
    let overlap = layout.window_overlap_tokens.min(room / 2);
    let mut end = n.min(r);
    while end < n {
        let start = end - overlap;
        end = (start + room).min(n);
        spans.push((start, end));
    }
    spans
}

/// One judgement from the scores of every view (rules in the module
/// documentation). `views` must not be empty; the first full-context view
/// of window 0 is taken for Nonsense and Linguistic Neglect.
pub fn aggregate(views: &[(View, Scores)]) -> Scores {
    let Some(first) = views
        .iter()
        .find(|(v, _)| v.index == 0 && !v.short_context)
        .or_else(|| views.first())
    else {
        return Scores([0.0; 8]);
    };
    let mut out = first.1;
    for (_, s) in views {
        for c in HARM {
            out.0[c.id()] = out.0[c.id()].max(s.get(c));
        }
        let safe = Category::SafeResponse.id();
        out.0[safe] = out.0[safe].min(s.0[safe]);
    }
    out
}

/// Fold a later judgement of the same response (the next window of a
/// stream) into `into`, by the rules of [`aggregate`]: harm categories keep
/// the highest score, Safe Response the lowest, Nonsense and Linguistic
/// Neglect stay those of the opening.
pub fn merge(into: &mut Scores, next: &Scores) {
    for c in HARM {
        into.0[c.id()] = into.0[c.id()].max(next.get(c));
    }
    let safe = Category::SafeResponse.id();
    into.0[safe] = into.0[safe].min(next.0[safe]);
}

/// The view whose score decided `category` in [`aggregate`] (the first one
/// reaching the maximum), for verdicts that name where a finding was.
pub fn decisive(views: &[(View, Scores)], category: Category) -> Option<View> {
    let best = views
        .iter()
        .map(|(_, s)| s.get(category))
        .fold(f32::NEG_INFINITY, f32::max);
    views
        .iter()
        .find(|(_, s)| s.get(category) == best)
        .map(|(v, _)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(r: usize, overlap: usize) -> Layout {
        Layout {
            max_length: 64,
            max_response_tokens: r,
            max_context_tokens: 32,
            window_overlap_tokens: overlap,
            cls_id: 0,
            sep_id: 2,
            pad_id: 1,
        }
    }

    #[test]
    fn spans_cover_every_token_with_overlap() {
        let l = layout(10, 2);
        assert_eq!(response_spans(0, &l, 3), vec![(0, 0)]);
        assert_eq!(response_spans(10, &l, 3), vec![(0, 10)]);
        // room 7, overlap 2: 0..10, 8..15, 13..20, 18..23
        assert_eq!(
            response_spans(23, &l, 3),
            vec![(0, 10), (8, 15), (13, 20), (18, 23)]
        );
        for n in 0..200 {
            let spans = response_spans(n, &l, 3);
            let mut seen = vec![false; n];
            for &(a, b) in &spans {
                assert!(b <= n && a <= b);
                let len = if a == 0 { b - a } else { b - a + 3 };
                assert!(len <= 10, "window {a}..{b} too long");
                seen[a..b].iter_mut().for_each(|s| *s = true);
            }
            assert!(seen.iter().all(|&s| s), "n={n} not covered: {spans:?}");
            // Linear: about n / (room - overlap) windows.
            assert!(
                spans.len() <= 1 + n / 5 + 1,
                "n={n}: {} windows",
                spans.len()
            );
        }
    }

    #[test]
    fn overlap_never_stalls() {
        // A prefix as long as the window and an overlap larger than the room
        // still advance.
        let l = layout(4, 4);
        let spans = response_spans(50, &l, 4);
        assert_eq!(spans.last().map(|s| s.1), Some(50));
        assert!(spans.windows(2).all(|w| w[1].1 > w[0].1));
    }

    #[test]
    fn last_seeker_turn_is_found() {
        assert_eq!(
            last_seeker_turn("[seeker]a[supporter]b[seeker]c"),
            "[seeker]c"
        );
        assert_eq!(last_seeker_turn("no tags"), "no tags");
        assert_eq!(last_seeker_turn(""), "");
    }

    fn scores(hot: Category, p: f32) -> Scores {
        let mut s = [0.0; 8];
        s[hot.id()] = p;
        s[Category::SafeResponse.id()] = 1.0 - p;
        Scores(s)
    }

    fn view(index: usize, short_context: bool) -> View {
        View {
            index,
            short_context,
            start_token: index * 10,
        }
    }

    #[test]
    fn harm_anywhere_wins_and_neglect_comes_from_the_opening() {
        let views = vec![
            (view(0, false), scores(Category::LinguisticNeglect, 0.3)),
            (view(0, true), scores(Category::LinguisticNeglect, 0.9)),
            (view(1, false), scores(Category::Nonsense, 0.8)),
            (view(2, true), scores(Category::ToxicLanguage, 0.7)),
        ];
        let s = aggregate(&views);
        assert_eq!(s.get(Category::ToxicLanguage), 0.7);
        assert_eq!(s.get(Category::LinguisticNeglect), 0.3);
        assert_eq!(s.get(Category::Nonsense), 0.0);
        assert!((s.get(Category::SafeResponse) - 0.1).abs() < 1e-6);
        assert_eq!(
            decisive(&views, Category::ToxicLanguage),
            Some(view(2, true))
        );
    }

    #[test]
    fn one_view_is_returned_unchanged() {
        let s = scores(Category::HumanoidMimicry, 0.4);
        assert_eq!(aggregate(&[(view(0, false), s)]), s);
    }
}
