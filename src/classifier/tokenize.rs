//! Turning a (context, response) pair into model inputs exactly as training
//! did (`models/README.md`, "Input contract"), and padding pairs into a batch.
//!
//! Invariant: [`assemble`] is the only place that decides truncation and
//! layout; the parity test pins it to the Python side's token ids.

use super::model::ModelSpec;
use super::Pair;

/// Limits and special ids the layout needs (a subset of [`ModelSpec`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub max_length: usize,
    pub max_response_tokens: usize,
    /// Most context tokens in one window (newest kept).
    pub max_context_tokens: usize,
    /// Response tokens a window repeats from the previous one.
    pub window_overlap_tokens: usize,
    pub cls_id: u32,
    pub sep_id: u32,
    pub pad_id: u32,
}

impl From<&ModelSpec> for Layout {
    fn from(s: &ModelSpec) -> Layout {
        Layout {
            max_length: s.max_length,
            max_response_tokens: s.max_response_tokens,
            max_context_tokens: s
                .max_context_tokens
                .unwrap_or(s.max_length.saturating_sub(4)),
            window_overlap_tokens: s.window_overlap_tokens.unwrap_or(DEFAULT_OVERLAP_TOKENS),
            cls_id: s.cls_id,
            sep_id: s.sep_id,
            pad_id: s.pad_id,
        }
    }
}

/// One pair's model inputs before padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPair {
    pub input_ids: Vec<i64>,
    /// 0 for `[cls] + context + [sep, sep]`, 1 for `response + [sep]`.
    pub token_type_ids: Vec<i64>,
}

impl EncodedPair {
    /// Number of tokens including special tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Never true for an assembled pair (it always holds the special tokens).
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
}

/// Response tokens a window repeats when `carewall-model.json` does not say.
pub const DEFAULT_OVERLAP_TOKENS: usize = 32;

/// Most windows one pair may need (about 23,000 response tokens with the
/// shipped limits); a longer reply is an error the policy's `on_error`
/// handles, never a silent cut.
pub const MAX_WINDOWS_PER_PAIR: usize = 256;

/// XLM-R pair layout: `[cls] + context[-k:] + [sep, sep] + response[:r] + [sep]`
/// with `r = max_response_tokens` and
/// `k = min(max_context_tokens, max_length - 4 - len(response))`, so the
/// newest context turns survive truncation and never crowd out the reply.
pub fn assemble(context: &[u32], response: &[u32], layout: &Layout) -> EncodedPair {
    let response = &response[..response.len().min(layout.max_response_tokens)];
    let budget = layout
        .max_length
        .saturating_sub(4 + response.len())
        .min(layout.max_context_tokens);
    // Python's `ids[-0:]` would keep everything; an explicit start index
    // keeps "no room" meaning no context.
    let context = &context[context.len().saturating_sub(budget)..];
    let n = context.len() + response.len() + 4;
    let mut input_ids = Vec::with_capacity(n);
    let mut token_type_ids = Vec::with_capacity(n);
    input_ids.push(i64::from(layout.cls_id));
    input_ids.extend(context.iter().map(|&t| i64::from(t)));
    input_ids.push(i64::from(layout.sep_id));
    input_ids.push(i64::from(layout.sep_id));
    token_type_ids.resize(input_ids.len(), 0);
    input_ids.extend(response.iter().map(|&t| i64::from(t)));
    input_ids.push(i64::from(layout.sep_id));
    token_type_ids.resize(input_ids.len(), 1);
    EncodedPair {
        input_ids,
        token_type_ids,
    }
}

/// Tokeniser plus layout: text pair in, [`EncodedPair`]s out.
pub struct PairEncoder {
    tokenizer: tokenizers::Tokenizer,
    layout: Layout,
    /// Token ids of [`RESPONSE_PREFIX`] alone: the start of every window
    /// after the first, so each window reads like a whole reply.
    prefix: Vec<u32>,
}

/// The tag every response starts with (`[supporter]`, the benchmark format).
pub const RESPONSE_PREFIX: &str = "[supporter]";

/// One view of a pair that the model scores: window `index` of the
/// response (0 = its beginning), with the full (capped) context or only the
/// seeker's last turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub index: usize,
    pub short_context: bool,
    /// First response token of the window (in the whole response's ids).
    pub start_token: usize,
}

impl PairEncoder {
    pub fn new(tokenizer: tokenizers::Tokenizer, layout: Layout) -> PairEncoder {
        let prefix = tokenizer
            .encode(RESPONSE_PREFIX, false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default();
        PairEncoder {
            tokenizer,
            layout,
            prefix,
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Token ids of one text, without special tokens.
    pub fn ids(&self, text: &str) -> Result<Vec<u32>, String> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| format!("tokenizer failed: {e}"))
    }

    /// The first window of a pair with its full context, per the input
    /// contract (what `parity.json`'s `input_ids` pin). A pair whose
    /// response fits one window is judged on this view (and, with a
    /// multi-turn context, on the seeker's last turn).
    pub fn encode(&self, pair: &Pair) -> Result<EncodedPair, String> {
        let windows = self.encode_windows(pair)?;
        windows
            .into_iter()
            .next()
            .map(|(_, e)| e)
            .ok_or_else(|| "no window".to_string())
    }

    /// Every view the model must score so that every token of the response
    /// is seen (see [`super::coverage`]): the response split into windows of
    /// `max_response_tokens` with `window_overlap_tokens` of overlap, each
    /// with the newest context (at most `max_context_tokens`), and again
    /// with only the seeker's last turn when the context holds more.
    ///
    /// Both texts are normalised first ([`super::normalize`]). The context
    /// is pre-cut by characters so a huge history cannot stall a worker;
    /// the margin of [`CHARS_PER_TOKEN_MARGIN`] characters per kept token
    /// leaves the kept tokens unchanged. The response is never cut: a reply
    /// that needs more than [`MAX_WINDOWS_PER_PAIR`] windows is an error.
    pub fn encode_windows(&self, pair: &Pair) -> Result<Vec<(View, EncodedPair)>, String> {
        let l = &self.layout;
        let context = super::normalize::normalize(tail_chars(
            &pair.context,
            l.max_length * CHARS_PER_TOKEN_MARGIN,
        ));
        let limit = MAX_WINDOWS_PER_PAIR * l.max_response_tokens * CHARS_PER_TOKEN_MARGIN;
        if pair.response.len() > limit {
            return Err(format!(
                "response too long to judge: {} bytes (more than {MAX_WINDOWS_PER_PAIR} windows)",
                pair.response.len()
            ));
        }
        let response = super::normalize::normalize(&pair.response);
        let ctx = self.ids(&context)?;
        let short = super::coverage::last_seeker_turn(&context);
        let short_ids = if short.len() < context.len() {
            Some(self.ids(short)?)
        } else {
            None
        };
        let rsp = self.ids(&response)?;
        let spans = super::coverage::response_spans(rsp.len(), l, self.prefix.len());
        if spans.len() > MAX_WINDOWS_PER_PAIR {
            return Err(format!(
                "response too long to judge: {} windows (at most {MAX_WINDOWS_PER_PAIR})",
                spans.len()
            ));
        }
        let mut out = Vec::with_capacity(spans.len() * 2);
        for (index, &(start, end)) in spans.iter().enumerate() {
            let body: Vec<u32> = if index == 0 {
                rsp[start..end].to_vec()
            } else {
                self.prefix
                    .iter()
                    .chain(&rsp[start..end])
                    .copied()
                    .collect()
            };
            let view = |short_context| View {
                index,
                short_context,
                start_token: start,
            };
            out.push((view(false), assemble(&ctx, &body, l)));
            if let Some(s) = &short_ids {
                out.push((view(true), assemble(s, &body, l)));
            }
        }
        Ok(out)
    }
}

/// Characters kept per token the model can see when pre-cutting long texts.
pub const CHARS_PER_TOKEN_MARGIN: usize = 32;

/// The last `n` characters of `s`.
fn tail_chars(s: &str, n: usize) -> &str {
    if n == 0 {
        return "";
    }
    match s.char_indices().rev().nth(n - 1) {
        Some((i, _)) => &s[i..],
        None => s,
    }
}

/// Right-padded `[batch, seq]` tensors (row-major), ready for the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaddedBatch {
    pub batch: usize,
    pub seq: usize,
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub token_type_ids: Vec<i64>,
}

/// Pad every pair to the longest one: `pad_id` with mask 0 and type 0.
pub fn pad(pairs: &[EncodedPair], pad_id: u32) -> PaddedBatch {
    let seq = pairs.iter().map(EncodedPair::len).max().unwrap_or(0);
    let total = seq * pairs.len();
    let mut input_ids = Vec::with_capacity(total);
    let mut attention_mask = Vec::with_capacity(total);
    let mut token_type_ids = Vec::with_capacity(total);
    for p in pairs {
        let fill = seq - p.len();
        input_ids.extend_from_slice(&p.input_ids);
        input_ids.extend(std::iter::repeat_n(i64::from(pad_id), fill));
        attention_mask.extend(std::iter::repeat_n(1, p.len()));
        attention_mask.extend(std::iter::repeat_n(0, fill));
        token_type_ids.extend_from_slice(&p.token_type_ids);
        token_type_ids.extend(std::iter::repeat_n(0, fill));
    }
    PaddedBatch {
        batch: pairs.len(),
        seq,
        input_ids,
        attention_mask,
        token_type_ids,
    }
}

/// Numerically stable softmax of one row of logits.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Layout = Layout {
        max_length: 12,
        max_response_tokens: 4,
        max_context_tokens: 8,
        window_overlap_tokens: 1,
        cls_id: 0,
        sep_id: 2,
        pad_id: 1,
    };

    fn check(context: &[u32], response: &[u32], ids: &[i64], types: &[i64]) {
        let got = assemble(context, response, &L);
        assert_eq!(
            got.input_ids, ids,
            "ids for ctx {context:?} resp {response:?}"
        );
        assert_eq!(
            got.token_type_ids, types,
            "types for ctx {context:?} resp {response:?}"
        );
        assert!(got.len() <= L.max_length);
    }

    #[test]
    fn layout_and_truncation() {
        // Fits: nothing cut.
        check(
            &[10, 11],
            &[20],
            &[0, 10, 11, 2, 2, 20, 2],
            &[0, 0, 0, 0, 0, 1, 1],
        );
        // Response cut at the end to max_response_tokens (4).
        check(
            &[10],
            &[20, 21, 22, 23, 24, 25],
            &[0, 10, 2, 2, 20, 21, 22, 23, 2],
            &[0, 0, 0, 0, 1, 1, 1, 1, 1],
        );
        // Context keeps its LAST 12 - 4 - 2 = 6 tokens.
        check(
            &[10, 11, 12, 13, 14, 15, 16, 17],
            &[20, 21],
            &[0, 12, 13, 14, 15, 16, 17, 2, 2, 20, 21, 2],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1],
        );
        // Long both ways: response 4, context 12 - 4 - 4 = 4 newest.
        check(
            &[10, 11, 12, 13, 14, 15],
            &[20, 21, 22, 23, 24],
            &[0, 12, 13, 14, 15, 2, 2, 20, 21, 22, 23, 2],
            &[0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
        );
        // Context shorter than its room (5 of 7) is kept whole; Python's
        // `ctx[len(ctx) - room:]` would keep only the last 2 here.
        check(
            &[10, 11, 12, 13, 14],
            &[20],
            &[0, 10, 11, 12, 13, 14, 2, 2, 20, 2],
            &[0, 0, 0, 0, 0, 0, 0, 0, 1, 1],
        );
        // Empty context and empty response still carry the special tokens.
        check(&[], &[], &[0, 2, 2, 2], &[0, 0, 0, 1]);
    }

    #[test]
    fn context_share_is_capped() {
        // Response of 1 token leaves room for 7 context tokens, but the cap
        // (max_context_tokens = 8) is not reached; with a cap of 3 only the
        // newest 3 survive.
        let capped = Layout {
            max_context_tokens: 3,
            ..L
        };
        let got = assemble(&[10, 11, 12, 13, 14], &[20], &capped);
        assert_eq!(got.input_ids, [0, 12, 13, 14, 2, 2, 20, 2]);
    }

    #[test]
    fn no_context_room_means_no_context() {
        let tight = Layout {
            max_length: 8,
            max_response_tokens: 4,
            ..L
        };
        let got = assemble(&[10, 11, 12], &[20, 21, 22, 23], &tight);
        assert_eq!(got.input_ids, [0, 2, 2, 20, 21, 22, 23, 2]);
    }

    #[test]
    fn padding_is_right_sided_with_zero_mask() {
        let a = assemble(&[10], &[20], &L);
        let b = assemble(&[10, 11, 12], &[20, 21], &L);
        let batch = pad(&[a, b], 1);
        assert_eq!((batch.batch, batch.seq), (2, 9));
        assert_eq!(&batch.input_ids[..9], &[0, 10, 2, 2, 20, 2, 1, 1, 1]);
        assert_eq!(&batch.attention_mask[..9], &[1, 1, 1, 1, 1, 1, 0, 0, 0]);
        assert_eq!(&batch.token_type_ids[..9], &[0, 0, 0, 0, 1, 1, 0, 0, 0]);
        assert_eq!(&batch.attention_mask[9..], &[1; 9]);
    }

    #[test]
    fn char_cuts_respect_utf8() {
        assert_eq!(tail_chars("abc你好吗", 2), "好吗");
        assert_eq!(tail_chars("ab", 5), "ab");
        assert_eq!(tail_chars("ab", 0), "");
    }

    #[test]
    fn softmax_is_stable_and_normalised() {
        let p = softmax(&[1000.0, 1000.0, f32::NEG_INFINITY]);
        assert_eq!(p, vec![0.5, 0.5, 0.0]);
        let p = softmax(&[0.0, (3.0f32).ln()]);
        assert!(
            (p[0] - 0.25).abs() < 1e-6 && (p[1] - 0.75).abs() < 1e-6,
            "{p:?}"
        );
    }
}
