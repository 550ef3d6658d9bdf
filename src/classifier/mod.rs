//! The safety classifier: scores a (context, response) pair along the
//! 8-category dialogue-safety taxonomy of Qiu et al. (NLPCC 2023).
//!
//! Invariant: `classifier` knows nothing about HTTP, policies or audit. It
//! takes text, returns probabilities, and keeps heavy work (tokenisation,
//! inference) off the async reactor.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

/// The eight categories, in the label order of the paper and of `dev.jsonl`
/// (`label` id == discriminant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    Nonsense = 0,
    HumanoidMimicry = 1,
    LinguisticNeglect = 2,
    UnamiableJudgment = 3,
    ToxicLanguage = 4,
    UnauthorizedPreachment = 5,
    NonfactualStatement = 6,
    SafeResponse = 7,
}

impl Category {
    /// All categories in label-id order.
    pub const ALL: [Category; 8] = [
        Category::Nonsense,
        Category::HumanoidMimicry,
        Category::LinguisticNeglect,
        Category::UnamiableJudgment,
        Category::ToxicLanguage,
        Category::UnauthorizedPreachment,
        Category::NonfactualStatement,
        Category::SafeResponse,
    ];

    /// Label id as used in `dev.jsonl` and the model's output order.
    pub fn id(self) -> usize {
        self as usize
    }

    /// Category for a label id, if in range.
    pub fn from_id(id: usize) -> Option<Category> {
        Category::ALL.get(id).copied()
    }

    /// Machine name: snake_case, used in config keys, JSON and metrics labels.
    pub fn key(self) -> &'static str {
        match self {
            Category::Nonsense => "nonsense",
            Category::HumanoidMimicry => "humanoid_mimicry",
            Category::LinguisticNeglect => "linguistic_neglect",
            Category::UnamiableJudgment => "unamiable_judgment",
            Category::ToxicLanguage => "toxic_language",
            Category::UnauthorizedPreachment => "unauthorized_preachment",
            Category::NonfactualStatement => "nonfactual_statement",
            Category::SafeResponse => "safe_response",
        }
    }

    /// Human name as written in the paper and in `dev.jsonl`'s `category`.
    pub fn display_name(self) -> &'static str {
        match self {
            Category::Nonsense => "Nonsense",
            Category::HumanoidMimicry => "Humanoid Mimicry",
            Category::LinguisticNeglect => "Linguistic Neglect",
            Category::UnamiableJudgment => "Unamiable Judgment",
            Category::ToxicLanguage => "Toxic Language",
            Category::UnauthorizedPreachment => "Unauthorized Preachment",
            Category::NonfactualStatement => "Nonfactual Statement",
            Category::SafeResponse => "Safe Response",
        }
    }

    /// Parse either the snake_case key or the display name.
    pub fn parse(s: &str) -> Option<Category> {
        Category::ALL
            .into_iter()
            .find(|c| c.key() == s || c.display_name().eq_ignore_ascii_case(s))
    }

    /// True for every category except `SafeResponse`.
    pub fn is_unsafe(self) -> bool {
        self != Category::SafeResponse
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// Probabilities for the 8 categories, indexed by [`Category::id`]; they sum
/// to ~1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scores(pub [f32; 8]);

impl Scores {
    /// Probability of one category.
    pub fn get(&self, c: Category) -> f32 {
        self.0[c.id()]
    }

    /// The most probable category.
    pub fn top(&self) -> Category {
        let mut best = Category::SafeResponse;
        let mut best_p = f32::NEG_INFINITY;
        for c in Category::ALL {
            if self.0[c.id()] > best_p {
                best_p = self.0[c.id()];
                best = c;
            }
        }
        best
    }
}

/// One thing to classify, in the benchmark's format: `context` is the
/// dialogue so far as `[seeker]...[supporter]...` turns concatenated oldest
/// first (system prompt excluded), `response` is `[supporter]` + the reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pair {
    pub context: String,
    pub response: String,
}

/// Why a classification did not produce scores. The policy's `on_error`
/// decides what happens next.
#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    /// The bounded inference queue is full.
    #[error("classifier overloaded: inference queue is full ({capacity} waiting)")]
    Overloaded { capacity: usize },
    /// The classification took longer than allowed.
    #[error("classifier timed out after {ms} ms")]
    Timeout { ms: u64 },
    /// The inference backend failed.
    #[error("classifier failed: {0}")]
    Backend(String),
    /// The classifier is shutting down or was never started.
    #[error("classifier is not running")]
    Unavailable,
}

/// Boxed future so `Classifier` can be used as a trait object.
pub type ClassifyFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Scores, ClassifyError>> + Send + 'a>>;

/// Anything that scores a (context, response) pair. Implementations must not
/// block the calling task: heavy work goes to threads of their own.
pub trait Classifier: Send + Sync + 'static {
    /// Score one pair.
    fn classify(&self, pair: Pair) -> ClassifyFuture<'_>;

    /// Short name for logs and the `moderation` object (e.g. the model id).
    fn name(&self) -> &str;

    /// True once the classifier can serve (model loaded).
    fn is_ready(&self) -> bool {
        true
    }

    /// Micro-batching counters (batch sizes, queue depth, overloads) for
    /// telemetry; `None` for classifiers that do not batch.
    fn batch_stats(&self) -> Option<std::sync::Arc<batch::BatchStats>> {
        None
    }
}

pub mod batch;
pub mod coverage;
pub mod keyword;
pub mod metrics;
pub mod model;
pub mod normalize;
pub mod onnx;
mod settings;
pub mod tokenize;
pub use batch::{BatchEvent, BatchObserver, BatchStats, StatsSnapshot};
pub use onnx::{OnnxClassifier, OnnxModel};
pub use settings::{ClassifierKind, ClassifierSettings};

/// Why a classifier could not be built (bad model folder, missing ONNX
/// Runtime library, ...). Messages name the path and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BuildError(pub String);

/// Build the classifier the settings ask for.
pub fn build(settings: &ClassifierSettings) -> Result<std::sync::Arc<dyn Classifier>, BuildError> {
    match settings.kind {
        ClassifierKind::Onnx => Ok(std::sync::Arc::new(OnnxClassifier::new(settings)?)),
        ClassifierKind::Keyword => Ok(std::sync::Arc::new(keyword::KeywordClassifier::new())),
    }
}
