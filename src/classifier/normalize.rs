//! What the model sees is what a person reads: the one text normalisation
//! applied before every judgement (gateway windows, `/v1/moderations`,
//! `carewall classify`/`eval`, the stand-in classifier) and, mirrored in
//! `training/normalize.py`, before training and evaluation. The person still
//! receives the upstream's text unchanged; only the judged copy is normalised.
//!
//! Steps, in order (documented in `models/README.md`, "Normalisation"):
//! 1. remove characters a client renders as nothing: format characters
//!    (Unicode `Cf`: zero-width space/joiners, word joiner, BOM, bidi
//!    controls, soft hyphen, tag characters), variation selectors, the
//!    combining grapheme joiner and the Hangul/braille fillers;
//! 2. Unicode NFKC (full-width letters and digits, compatibility spaces such
//!    as U+00A0 and U+3000 become their plain forms);
//! 3. whitespace: a run of whitespace between two CJK characters (or a CJK
//!    character and ASCII punctuation) is removed;
//!    runs of three or more single letters or digits separated by single
//!    spaces are joined ("k i l l" -> "kill"); every other run becomes one
//!    space, or one newline when it contains a line break; leading and
//!    trailing whitespace is dropped.
//!
//! Invariant: pure and total (any `&str` in, a `String` out); idempotent;
//! the same cases as `training/normalize_cases.json` pass in both languages.

use unicode_normalization::UnicodeNormalization;

/// Inclusive ranges of code points removed before judgement.
const INVISIBLE: &[(u32, u32)] = &[
    (0x00AD, 0x00AD), // soft hyphen
    (0x034F, 0x034F), // combining grapheme joiner
    (0x0600, 0x0605),
    (0x061C, 0x061C),
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x115F, 0x1160), // Hangul choseong/jungseong fillers
    (0x17B4, 0x17B5),
    (0x180B, 0x180F), // Mongolian variation selectors and vowel separator
    (0x200B, 0x200F), // zero-width space, ZWNJ, ZWJ, LRM, RLM
    (0x202A, 0x202E), // bidi embeddings and overrides
    (0x2060, 0x2064), // word joiner, invisible operators
    (0x2066, 0x206F), // bidi isolates, deprecated format characters
    (0x2800, 0x2800), // braille blank
    (0x3164, 0x3164), // Hangul filler
    (0xFE00, 0xFE0F), // variation selectors
    (0xFEFF, 0xFEFF), // BOM / zero-width no-break space
    (0xFFA0, 0xFFA0), // half-width Hangul filler
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE007F), // tag characters
    (0xE0100, 0xE01EF), // variation selectors supplement
];

/// True for a character removed before judgement.
pub fn is_invisible(c: char) -> bool {
    let u = c as u32;
    INVISIBLE.iter().any(|&(lo, hi)| (lo..=hi).contains(&u))
}

/// CJK ideographs, kana, Hangul syllables, CJK punctuation and the
/// full-width forms that NFKC keeps.
pub fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x2E80..=0x2FDF      // radicals
        | 0x3000..=0x303F    // CJK symbols and punctuation
        | 0x3040..=0x30FF    // hiragana, katakana
        | 0x3100..=0x312F    // bopomofo
        | 0x3130..=0x318F    // Hangul compatibility jamo
        | 0x31F0..=0x31FF
        | 0x3400..=0x4DBF    // extension A
        | 0x4E00..=0x9FFF    // unified ideographs
        | 0xAC00..=0xD7AF    // Hangul syllables
        | 0xF900..=0xFAFF    // compatibility ideographs
        | 0xFE30..=0xFE4F    // CJK compatibility forms
        | 0xFF00..=0xFFEF    // half/full-width forms
        | 0x20000..=0x3134F  // extensions B-H
    )
}

/// No space is kept between two CJK characters, or between a CJK character
/// and ASCII punctuation (NFKC turns full-width `，` into `,`).
fn tight(a: char, b: char) -> bool {
    let cjk_or_punct = |c: char| is_cjk(c) || c.is_ascii_punctuation();
    cjk_or_punct(a) && cjk_or_punct(b) && (is_cjk(a) || is_cjk(b))
}

/// The judged form of `text` (see the module documentation).
pub fn normalize(text: &str) -> String {
    let visible: String = text.chars().filter(|&c| !is_invisible(c)).collect();
    let chars: Vec<char> = visible
        .nfkc()
        .filter(|&c| !is_invisible(c))
        .map(|c| if c == '\r' { '\n' } else { c })
        .collect();
    // Split into words (maximal non-whitespace runs) and the gaps between.
    let mut words: Vec<&[char]> = Vec::new();
    let mut gaps: Vec<&[char]> = Vec::new(); // gaps[i] sits before words[i]
    let mut i = 0;
    let mut gap_start = 0;
    while i < chars.len() {
        if chars[i].is_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && !chars[i].is_whitespace() {
            i += 1;
        }
        gaps.push(&chars[gap_start..start]);
        words.push(&chars[start..i]);
        gap_start = i;
    }
    let single = |w: &[char]| w.len() == 1 && w[0].is_alphanumeric() && !is_cjk(w[0]);
    // join[i]: the gap before words[i] is removed because words[i-1] and
    // words[i] belong to a run of >= 3 single characters with one-space gaps.
    let mut join = vec![false; words.len()];
    let mut k = 0;
    while k < words.len() {
        if !single(words[k]) {
            k += 1;
            continue;
        }
        let mut end = k + 1;
        while end < words.len()
            && single(words[end])
            && gaps[end].len() == 1
            && gaps[end][0] != '\n'
        {
            end += 1;
        }
        if end - k >= 3 {
            for j in join.iter_mut().take(end).skip(k + 1) {
                *j = true;
            }
        }
        k = end;
    }
    let mut out = String::with_capacity(visible.len());
    for (idx, w) in words.iter().enumerate() {
        if idx > 0 && !join[idx] {
            let prev = words[idx - 1][words[idx - 1].len() - 1];
            let next = w[0];
            if !tight(prev, next) {
                out.push(if gaps[idx].contains(&'\n') { '\n' } else { ' ' });
            }
        }
        out.extend(w.iter());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Case {
        input: String,
        expected: String,
    }

    /// The cases shared with `training/normalize.py` (`check_normalize.py`).
    #[test]
    fn shared_cases_match() {
        let cases: Vec<Case> =
            serde_json::from_str(include_str!("../../training/normalize_cases.json"))
                .expect("training/normalize_cases.json parses");
        assert!(cases.len() >= 20);
        for c in cases {
            assert_eq!(normalize(&c.input), c.expected, "input {:?}", c.input);
        }
    }

    #[test]
    fn invisible_and_spacing_tricks_read_as_the_plain_text() {
        let plain = "你就是个废物，去死吧";
        let want = normalize(plain);
        for sep in [
            "\u{200B}",
            "\u{200D}",
            "\u{2060}",
            "\u{FE0F}",
            "\u{00A0}",
            "\u{3000}",
            " ",
            "\n",
            "  ",
            "\u{E0041}",
        ] {
            let spaced: String = plain
                .chars()
                .map(|c| format!("{c}{sep}"))
                .collect::<String>();
            assert_eq!(normalize(&spaced), want, "separator {:?}", sep);
        }
        assert_eq!(normalize("k i l l yourself"), "kill yourself");
        assert_eq!(normalize("go k\u{200B}ill y\u{00A0}o u"), "go kill you");
        assert_eq!(normalize("Ｋｉｌｌ"), "Kill");
    }

    #[test]
    fn ordinary_text_is_kept() {
        assert_eq!(normalize("I am a boy."), "I am a boy.");
        assert_eq!(normalize("Take 3 of them"), "Take 3 of them");
        assert_eq!(normalize("a b"), "a b");
        assert_eq!(normalize("line one\n\n  line two  "), "line one\nline two");
        assert_eq!(normalize("我用 iPhone 打字"), "我用 iPhone 打字");
        assert_eq!(normalize(""), "");
        assert_eq!(normalize(" \u{200B} "), "");
    }

    #[test]
    fn idempotent_on_samples() {
        for s in [
            "你 就 是\u{200B}个废物",
            "k i l l  y o u r s e l f",
            "Ｔａｋｅ　３ pills\r\nnow",
            "👨\u{200D}👩\u{200D}👧 family",
        ] {
            let once = normalize(s);
            assert_eq!(normalize(&once), once, "{s:?}");
        }
    }
}
