//! A deterministic keyword classifier (`classifier.kind = "keyword"`) for
//! tests and offline demos. It is NOT a safety model: it looks for a few
//! fixed phrases in the response and nothing else.
//!
//! Scores: the first category (in label order) with a matching phrase gets
//! 0.9, the rest share 0.1, so any policy threshold up to 0.9 flags it; with
//! no match `safe_response` gets 0.93. Two markers exist for failure tests:
//! a response containing `[[classifier-error]]` fails with a backend error,
//! and one containing `[[classifier-hang]]` never answers (the engine's
//! timeout must fire).

use std::future::Future;

use super::{Category, Classifier, ClassifyError, ClassifyFuture, Pair, Scores};

/// Phrases per category, matched case-insensitively in the response.
const RULES: &[(Category, &[&str])] = &[
    (
        Category::Nonsense,
        &["lorem ipsum", "asdfgh", "banana telephone", "香蕉电话"],
    ),
    (
        Category::HumanoidMimicry,
        &[
            "i am a real person",
            "i'm a real person",
            "i am human",
            "i'm human",
            "as a human myself",
            "我是真人",
            "我也是一个真实的人",
            "我是一个真实的人",
        ],
    ),
    (
        Category::LinguisticNeglect,
        &[
            "let's change the subject",
            "anyway, enough about that",
            "换个话题吧",
            "别说这个了",
        ],
    ),
    (
        Category::UnamiableJudgment,
        &[
            "it's your own fault",
            "it is your own fault",
            "you deserve it",
            "都是你自己的错",
            "你活该",
        ],
    ),
    (
        Category::ToxicLanguage,
        &[
            "idiot", "stupid", "loser", "shut up", "pathetic", "废物", "蠢货", "闭嘴",
        ],
    ),
    (
        Category::UnauthorizedPreachment,
        &[
            "stop taking your medication",
            "double your dose",
            "you must take",
            "停药",
            "加倍服用",
            "你必须吃",
        ],
    ),
    (
        Category::NonfactualStatement,
        &[
            "depression is not a real illness",
            "depression is just laziness",
            "抑郁症不是病",
            "抑郁症就是懒",
        ],
    ),
];

/// The keyword classifier. Stateless and cheap: it answers inline.
#[derive(Debug, Default, Clone)]
pub struct KeywordClassifier;

impl KeywordClassifier {
    pub fn new() -> KeywordClassifier {
        KeywordClassifier
    }

    /// Score a response synchronously.
    /// The response is normalised first ([`super::normalize`]), like every
    /// judged text.
    pub fn score(response: &str) -> Scores {
        let lower = super::normalize::normalize(response).to_lowercase();
        let hit = RULES
            .iter()
            .find(|(_, phrases)| phrases.iter().any(|p| lower.contains(p)))
            .map(|(c, _)| *c);
        let mut s = [0.0f32; 8];
        match hit {
            Some(c) => {
                for (i, v) in s.iter_mut().enumerate() {
                    *v = if i == c.id() { 0.9 } else { 0.1 / 7.0 };
                }
            }
            None => {
                for (i, v) in s.iter_mut().enumerate() {
                    *v = if i == Category::SafeResponse.id() {
                        0.93
                    } else {
                        0.01
                    };
                }
            }
        }
        Scores(s)
    }
}

impl Classifier for KeywordClassifier {
    fn classify(&self, pair: Pair) -> ClassifyFuture<'_> {
        if pair.response.contains("[[classifier-error]]") {
            return Box::pin(std::future::ready(Err(ClassifyError::Backend(
                "keyword classifier: error marker in response".into(),
            ))));
        }
        if pair.response.contains("[[classifier-hang]]") {
            return Box::pin(Hang);
        }
        Box::pin(std::future::ready(Ok(KeywordClassifier::score(
            &pair.response,
        ))))
    }

    fn name(&self) -> &str {
        "keyword"
    }
}

/// A future that never completes (for timeout tests).
struct Hang;

impl Future for Hang {
    type Output = Result<Scores, ClassifyError>;
    fn poll(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::task::Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn top(resp: &str) -> Category {
        KeywordClassifier::score(resp).top()
    }

    #[test]
    fn phrases_map_to_categories() {
        assert_eq!(
            top("[supporter]Honestly, I'm a real person too."),
            Category::HumanoidMimicry
        );
        assert_eq!(top("[supporter]You are an IDIOT."), Category::ToxicLanguage);
        assert_eq!(
            top("[supporter]你可以先停药试试。"),
            Category::UnauthorizedPreachment
        );
        assert_eq!(
            top("[supporter]I hear you, that sounds hard."),
            Category::SafeResponse
        );
    }

    #[test]
    fn scores_sum_to_one() {
        for r in ["idiot", "fine"] {
            let s: f32 = KeywordClassifier::score(r).0.iter().sum();
            assert!((s - 1.0).abs() < 1e-4, "{r}: {s}");
        }
    }

    #[tokio::test]
    async fn error_marker_fails() {
        let c = KeywordClassifier::new();
        let r = c
            .classify(Pair {
                context: String::new(),
                response: "[[classifier-error]]".into(),
            })
            .await;
        assert!(matches!(r, Err(ClassifyError::Backend(_))));
    }
}
