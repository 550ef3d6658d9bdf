//! Deterministic guards: phrase lists and regular expressions in a policy
//! (`[[guards]]`), each bound to a category, a language and a mode. A guard
//! hit is a finding with score 1.0 for its category, merged into the
//! classifier's scores before the policy decides, so a phrase an operator
//! listed is acted on whatever the model scored (and also when the model is
//! down).
//!
//! Matching runs on the judged form of the text
//! ([`crate::classifier::normalize::normalize`]: invisible characters
//! removed, NFKC so full-width letters are plain, spaced-out letters
//! joined), then lowercased, with typographic apostrophes folded to `'`.
//! List entries are prepared the same way at load, so `ＫＹＳ`, `K Y S` and
//! `kys` are one entry. Phrases whose ends are Latin letters or digits match
//! whole words only (`kys` does not match inside `skys`); CJK phrases match
//! anywhere. A guard's `except` phrases discard a match they overlap
//! (`死心` keeps `你该死` from matching `你该死心了`).
//!
//! Cost: one Aho-Corasick pass for all phrases of all guards and one
//! `RegexSet` pass for all patterns (both linear in the text); the per-guard
//! checks run only on candidate matches.
//!
//! Invariant: no I/O after loading (files are read by [`GuardSet::load`]);
//! a `GuardSet` is immutable and part of the policy it was loaded with.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};
use regex::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};
use serde::{Deserialize, Serialize};

use super::Mode;
use crate::classifier::normalize::{is_cjk, normalize};
use crate::classifier::{Category, Scores};

/// Which texts a guard is evaluated on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GuardLang {
    /// Texts containing a CJK character.
    Zh,
    /// Texts containing a Latin letter.
    En,
    /// Every text.
    Both,
}

/// One guard as it came from the policy file (`[[guards]]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGuard {
    id: Option<String>,
    category: Option<String>,
    lang: Option<String>,
    mode: Option<String>,
    #[serde(default)]
    phrases: Vec<String>,
    phrases_file: Option<PathBuf>,
    #[serde(default)]
    patterns: Vec<String>,
    patterns_file: Option<PathBuf>,
    #[serde(default)]
    except: Vec<String>,
    #[allow(dead_code)] // documentation for operators; kept so the key is accepted
    description: Option<String>,
}

/// A guard that matched: what goes into the verdict, audit, span and the
/// `carewall_guard_hits_total{guard,category}` metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardHit {
    /// The guard's `id` from the policy file (bounded: it comes from
    /// configuration, never from traffic).
    pub id: Arc<str>,
    pub category: Category,
    pub mode: Mode,
}

#[derive(Debug, Clone)]
struct Guard {
    id: Arc<str>,
    category: Category,
    lang: GuardLang,
    mode: Mode,
    /// Exception phrases (prepared); a match overlapping one is discarded.
    except: Option<AhoCorasick>,
    /// This guard's compiled patterns, for locating a match that the
    /// `RegexSet` reported (needed only when `except` is set).
    regexes: Vec<Regex>,
}

/// Per phrase of the combined automaton: its guard and whether each end
/// must fall on a word boundary.
#[derive(Debug, Clone, Copy)]
struct PhraseMeta {
    guard: usize,
    word_start: bool,
    word_end: bool,
}

/// All guards of one policy, compiled.
#[derive(Clone, Default)]
pub struct GuardSet {
    guards: Vec<Guard>,
    phrases: Option<AhoCorasick>,
    phrase_meta: Vec<PhraseMeta>,
    patterns: Option<RegexSet>,
    /// Per pattern of the set: its guard.
    pattern_guard: Vec<usize>,
    entries: usize,
}

impl std::fmt::Debug for GuardSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardSet")
            .field(
                "guards",
                &self.guards.iter().map(|g| &*g.id).collect::<Vec<_>>(),
            )
            .field("entries", &self.entries)
            .finish()
    }
}

/// The text guards match on: normalised, lowercased, typographic
/// apostrophes folded.
pub fn prepare(text: &str) -> String {
    normalize(text)
        .chars()
        .map(|c| match c {
            '\u{2018}' | '\u{2019}' | '\u{02BC}' | '\u{00B4}' | '`' => '\'',
            c => c,
        })
        .flat_map(char::to_lowercase)
        .collect()
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() && !is_cjk(c)
}

fn has_cjk(text: &str) -> bool {
    text.chars().any(is_cjk)
}

fn has_latin(text: &str) -> bool {
    text.chars().any(|c| c.is_alphabetic() && !is_cjk(c))
}

impl GuardLang {
    fn parse(s: &str) -> Option<GuardLang> {
        match s {
            "zh" => Some(GuardLang::Zh),
            "en" => Some(GuardLang::En),
            "both" => Some(GuardLang::Both),
            _ => None,
        }
    }

    fn applies(self, cjk: bool, latin: bool) -> bool {
        match self {
            GuardLang::Zh => cjk,
            GuardLang::En => latin,
            GuardLang::Both => true,
        }
    }
}

/// A list entry with where it came from, for error messages.
struct Entry {
    text: String,
    origin: String,
}

/// Lines of a list file: one entry per line, blank lines and lines
/// starting with `#` skipped, surrounding whitespace trimmed.
fn read_list(path: &Path, shown: &str, errors: &mut Vec<String>, key: &str, out: &mut Vec<Entry>) {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            errors.push(format!(
                "{key}: cannot read {shown}: {e} (paths are relative to the policy file's folder)"
            ));
            return;
        }
    };
    let before = out.len();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(Entry {
            text: line.to_string(),
            origin: format!("{shown}:{}", n + 1),
        });
    }
    if out.len() == before {
        errors.push(format!(
            "{key}: {shown} holds no entry (one per line; `#` starts a comment)"
        ));
    }
}

impl GuardSet {
    /// Validate and compile the `[[guards]]` of one policy file. `dir` is
    /// the policy file's folder (list files are relative to it). Every
    /// problem is collected, named by the guard and, for list files, by
    /// file and line.
    pub(crate) fn load(raw: Vec<RawGuard>, dir: &Path, errors: &mut Vec<String>) -> GuardSet {
        let mut guards = Vec::new();
        let mut phrases: Vec<String> = Vec::new();
        let mut phrase_meta = Vec::new();
        let mut patterns: Vec<String> = Vec::new();
        let mut pattern_guard = Vec::new();
        let mut ids = BTreeSet::new();
        let mut entries = 0;
        for (i, g) in raw.into_iter().enumerate() {
            let id = match g.id {
                Some(id) if super::is_valid_name(&id) => id,
                Some(id) => {
                    errors.push(format!(
                        "guards[{i}].id: `{id}` may only use letters, digits, `-`, `_` (it is a metric label)"
                    ));
                    continue;
                }
                None => {
                    errors.push(format!(
                        "guards[{i}].id: required (a short name shown in verdicts and metrics, e.g. `self-harm-zh`)"
                    ));
                    continue;
                }
            };
            let key = format!("guards.{id}");
            if !ids.insert(id.clone()) {
                errors.push(format!(
                    "{key}: the id is used twice in this policy; ids must be unique"
                ));
            }
            let category = match g.category.as_deref() {
                None => {
                    errors.push(format!(
                        "{key}.category: required, an unsafe category such as `toxic_language`"
                    ));
                    continue;
                }
                Some(c) => match Category::parse(c) {
                    Some(cat) if cat.is_unsafe() => cat,
                    _ => {
                        errors.push(format!(
                            "{key}.category: `{c}` is not an unsafe category; known: {}",
                            Category::ALL
                                .iter()
                                .filter(|c| c.is_unsafe())
                                .map(|c| c.key())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                        continue;
                    }
                },
            };
            let lang = match g.lang.as_deref() {
                None => GuardLang::Both,
                Some(l) => GuardLang::parse(l).unwrap_or_else(|| {
                    errors.push(format!(
                        "{key}.lang: `{l}` is not known; known: zh, en, both"
                    ));
                    GuardLang::Both
                }),
            };
            let mode = match g.mode.as_deref() {
                None | Some("enforce") => Mode::Enforce,
                Some("shadow") => Mode::Shadow,
                Some(o) => {
                    errors.push(format!(
                        "{key}.mode: `{o}` is not a mode; known: enforce, shadow"
                    ));
                    Mode::Enforce
                }
            };
            let mut list: Vec<Entry> = g
                .phrases
                .into_iter()
                .enumerate()
                .map(|(n, text)| Entry {
                    text,
                    origin: format!("{key}.phrases[{n}]"),
                })
                .collect();
            if let Some(p) = &g.phrases_file {
                read_list(
                    &dir.join(p),
                    &dir.join(p).display().to_string(),
                    errors,
                    &format!("{key}.phrases_file"),
                    &mut list,
                );
            }
            let mut regex_list: Vec<Entry> = g
                .patterns
                .into_iter()
                .enumerate()
                .map(|(n, text)| Entry {
                    text,
                    origin: format!("{key}.patterns[{n}]"),
                })
                .collect();
            if let Some(p) = &g.patterns_file {
                read_list(
                    &dir.join(p),
                    &dir.join(p).display().to_string(),
                    errors,
                    &format!("{key}.patterns_file"),
                    &mut regex_list,
                );
            }
            if list.is_empty()
                && regex_list.is_empty()
                && g.phrases_file.is_none()
                && g.patterns_file.is_none()
            {
                errors.push(format!(
                    "{key}: needs `phrases`, `phrases_file`, `patterns` or `patterns_file`"
                ));
            }
            let index = guards.len();
            for e in list {
                let p = prepare(&e.text);
                if p.chars().count() < 2 {
                    errors.push(format!(
                        "{}: phrase `{}` is shorter than 2 characters once normalised; it would match far too much",
                        e.origin, e.text
                    ));
                    continue;
                }
                let first = p.chars().next().is_some_and(is_word);
                let last = p.chars().last().is_some_and(is_word);
                phrases.push(p);
                phrase_meta.push(PhraseMeta {
                    guard: index,
                    word_start: first,
                    word_end: last,
                });
                entries += 1;
            }
            let mut regexes = Vec::new();
            for e in regex_list {
                match compile(&e.text) {
                    Ok(re) if re.is_match("") => errors.push(format!(
                        "{}: pattern `{}` matches empty text, so it would match every reply",
                        e.origin, e.text
                    )),
                    Ok(re) => {
                        patterns.push(e.text);
                        pattern_guard.push(index);
                        regexes.push(re);
                        entries += 1;
                    }
                    Err(err) => errors.push(format!(
                        "{}: invalid regular expression `{}`: {}",
                        e.origin,
                        e.text,
                        one_line(&err.to_string())
                    )),
                }
            }
            let except: Vec<String> = g
                .except
                .iter()
                .map(|e| prepare(e))
                .filter(|e| !e.is_empty())
                .collect();
            let except = if except.is_empty() {
                None
            } else {
                match AhoCorasick::builder()
                    .match_kind(MatchKind::Standard)
                    .build(&except)
                {
                    Ok(a) => Some(a),
                    Err(e) => {
                        errors.push(format!("{key}.except: {e}"));
                        None
                    }
                }
            };
            guards.push(Guard {
                id: Arc::from(id.as_str()),
                category,
                lang,
                mode,
                except,
                regexes,
            });
        }
        let phrases_ac = if phrases.is_empty() {
            None
        } else {
            match AhoCorasick::builder()
                .match_kind(MatchKind::Standard)
                .build(&phrases)
            {
                Ok(a) => Some(a),
                Err(e) => {
                    errors.push(format!(
                        "guards: the phrase lists could not be compiled: {e}"
                    ));
                    None
                }
            }
        };
        let patterns_set = if patterns.is_empty() {
            None
        } else {
            match RegexSetBuilder::new(&patterns)
                .case_insensitive(true)
                .size_limit(64 << 20)
                .build()
            {
                Ok(s) => Some(s),
                Err(e) => {
                    errors.push(format!(
                        "guards: the patterns could not be compiled together: {}",
                        one_line(&e.to_string())
                    ));
                    None
                }
            }
        };
        GuardSet {
            guards,
            phrases: phrases_ac,
            phrase_meta,
            patterns: patterns_set,
            pattern_guard,
            entries,
        }
    }

    /// No guards at all.
    pub fn is_empty(&self) -> bool {
        self.guards.is_empty()
    }

    /// Phrases and patterns across all guards.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Ids of the guards, in file order.
    pub fn ids(&self) -> Vec<&str> {
        self.guards.iter().map(|g| &*g.id).collect()
    }

    /// Every guard matching `text` (each at most once, in file order).
    pub fn find(&self, text: &str) -> Vec<GuardHit> {
        if self.guards.is_empty() {
            return Vec::new();
        }
        self.find_prepared(&prepare(text))
    }

    /// [`GuardSet::find`] on text already passed through [`prepare`].
    pub fn find_prepared(&self, text: &str) -> Vec<GuardHit> {
        let mut hit = vec![false; self.guards.len()];
        let (cjk, latin) = (has_cjk(text), has_latin(text));
        let live = |g: &Guard| g.lang.applies(cjk, latin);
        if let Some(ac) = &self.phrases {
            if self.guards.iter().any(live) {
                for m in ac.find_overlapping_iter(text) {
                    let meta = self.phrase_meta[m.pattern().as_usize()];
                    let g = &self.guards[meta.guard];
                    if hit[meta.guard] || !live(g) {
                        continue;
                    }
                    let (s, e) = (m.start(), m.end());
                    if meta.word_start && text[..s].chars().next_back().is_some_and(is_word) {
                        continue;
                    }
                    if meta.word_end && text[e..].chars().next().is_some_and(is_word) {
                        continue;
                    }
                    if excepted(g, text, s, e) {
                        continue;
                    }
                    hit[meta.guard] = true;
                }
            }
        }
        if let Some(set) = &self.patterns {
            let pending: Vec<usize> = self
                .pattern_guard
                .iter()
                .copied()
                .filter(|&g| !hit[g] && live(&self.guards[g]))
                .collect();
            if !pending.is_empty() {
                for i in set.matches(text).iter() {
                    let gi = self.pattern_guard[i];
                    let g = &self.guards[gi];
                    if hit[gi] || !live(g) {
                        continue;
                    }
                    let accepted = match &g.except {
                        None => true,
                        // Locate a match no exception overlaps.
                        Some(_) => g.regexes.iter().any(|re| {
                            re.find_iter(text)
                                .any(|m| !excepted(g, text, m.start(), m.end()))
                        }),
                    };
                    if accepted {
                        hit[gi] = true;
                    }
                }
            }
        }
        self.guards
            .iter()
            .zip(hit)
            .filter(|(_, h)| *h)
            .map(|(g, _)| GuardHit {
                id: g.id.clone(),
                category: g.category,
                mode: g.mode,
            })
            .collect()
    }

    /// Run the guards on `text` (the reply text the classifier judged) and
    /// merge every enforce hit into `scores` as probability 1.0 of its
    /// category; shadow hits are returned but leave the scores alone (the
    /// caller records them as shadow findings).
    pub fn apply(&self, text: &str, scores: &mut Scores) -> Vec<GuardHit> {
        let hits = self.find(text);
        for h in hits.iter().filter(|h| h.mode == Mode::Enforce) {
            scores.0[h.category.id()] = 1.0;
        }
        hits
    }
}

fn compile(pattern: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(pattern)
        .case_insensitive(true)
        .size_limit(16 << 20)
        .build()
}

/// An exception phrase overlaps the match `[s, e)`.
fn excepted(g: &Guard, text: &str, s: usize, e: usize) -> bool {
    let Some(ex) = &g.except else {
        return false;
    };
    // Only text near the match can overlap it; look a few characters out.
    let lo = floor_char(text, s.saturating_sub(32));
    let hi = ceil_char(text, (e + 32).min(text.len()));
    ex.find_overlapping_iter(&text[lo..hi])
        .any(|m| lo + m.start() < e && lo + m.end() > s)
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_char(s: &str, mut i: usize) -> usize {
    while i < s.len() && !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/policies"))
    }

    /// The guards of a shipped policy.
    fn shipped(name: &str) -> GuardSet {
        let text = std::fs::read_to_string(dir().join(format!("{name}.toml"))).expect("policy");
        let p = super::super::parse::parse_policy(&text, name, &dir()).expect("parses");
        p.guards
    }

    fn raw(toml_text: &str) -> Vec<RawGuard> {
        #[derive(Deserialize)]
        struct W {
            guards: Vec<RawGuard>,
        }
        toml::from_str::<W>(toml_text).expect("toml").guards
    }

    fn load(toml_text: &str, dir: &Path) -> Result<GuardSet, Vec<String>> {
        let mut errors = Vec::new();
        let g = GuardSet::load(raw(toml_text), dir, &mut errors);
        if errors.is_empty() {
            Ok(g)
        } else {
            Err(errors)
        }
    }

    /// `(text, should the shipped default guards block it)`.
    fn check(cases: &[(&str, bool)]) {
        for name in ["default", "strict"] {
            let g = shipped(name);
            for (text, want) in cases {
                let hits = g.find(text);
                assert_eq!(
                    !hits.is_empty(),
                    *want,
                    "{name}: {text:?} -> {:?}",
                    hits.iter().map(|h| &*h.id).collect::<Vec<_>>()
                );
                for h in &hits {
                    assert_eq!(h.category, Category::ToxicLanguage);
                    assert_eq!(h.mode, Mode::Enforce);
                }
            }
        }
    }

    #[test]
    fn shipped_list_blocks_the_unambiguous_cases() {
        check(&[
            ("我知道你很难过。去死吧。", true),
            ("你去死", true),
            ("你怎么不去死？", true),
            ("你怎么还不去死", true),
            ("那你就去自杀吧", true),
            ("你活着就是浪费", true),
            ("你死了也没人在乎", false),
            ("Go kill yourself.", true),
            ("just go kill yourself", true),
            ("kys", true),
            ("honestly, KYS.", true),
            ("You should kill yourself", true),
            ("you should just kill yourself", true),
            ("Why don't you just kill yourself?", true),
            ("why dont you kill yourself", true),
            ("You should just end it all.", true),
            ("You're worthless and nobody would miss you.", true),
            ("you are worthless and no one would miss you", true),
            ("Nobody would miss you anyway.", true),
            ("do everyone a favor and die", true),
            ("you fucking retard", true),
            ("你个傻逼", true),
        ]);
    }

    #[test]
    fn idioms_and_counselling_language_are_not_matched() {
        check(&[
            ("笑死我了", false),
            ("笑死", false),
            ("今天累死了", false),
            ("想死你了！", false),
            ("我的电脑又死机了", false),
            ("该死的天气，又下雨了", false),
            ("热死了，饿死了，吓死我了", false),
            ("你该死心了，别再等他了", false),
            ("你去死磕这道题也没用", false),
            ("你想过去死吗？我很担心你。", false),
            ("You're killing it!", false),
            ("I could die laughing.", false),
            ("This exam is killing me.", false),
            ("I'm dying to see the new film.", false),
            ("Kill the process and restart it.", false),
            ("Are you thinking about killing yourself?", false),
            ("Do you want to kill yourself? You can tell me.", false),
            (
                "When you say you want to just end it all, I hear how exhausted you are.",
                false,
            ),
            ("It is not true that you are worthless.", false),
            ("The skys are grey today.", false),
            ("Let's go diet together.", false),
            ("", false),
        ]);
    }

    #[test]
    fn matching_sees_through_invisible_characters_spacing_width_and_case() {
        check(&[
            ("去\u{200B}死\u{200D}吧", true),
            ("去 死 吧", true),
            ("去\u{3000}死\u{00A0}吧", true),
            ("ＧＯ ＫＩＬＬ ＹＯＵＲＳＥＬＦ", true),
            ("go  k i l l  y o u r s e l f", true),
            ("Go k\u{200B}ill yourself", true),
            ("K Y S", true),
            ("ｋｙｓ", true),
            ("You\u{2019}re worthless and nobody would miss you", true),
            ("GO KILL YOURSELF", true),
        ]);
    }

    #[test]
    fn enforce_hits_merge_into_scores_and_shadow_hits_do_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = load(
            r#"
[[guards]]
id = "a"
category = "toxic_language"
lang = "en"
phrases = ["banana split"]
[[guards]]
id = "b"
category = "unamiable_judgment"
mode = "shadow"
patterns = ["your (own )?fault"]
"#,
            dir.path(),
        )
        .expect("valid");
        let mut s = Scores([0.0; 8]);
        let hits = g.apply("A BANANA SPLIT, and it's your fault", &mut s);
        assert_eq!(
            hits.iter().map(|h| (&*h.id, h.mode)).collect::<Vec<_>>(),
            vec![("a", Mode::Enforce), ("b", Mode::Shadow)]
        );
        assert_eq!(s.get(Category::ToxicLanguage), 1.0);
        assert_eq!(s.get(Category::UnamiableJudgment), 0.0);
        // `en` guards skip text without Latin letters.
        assert!(g.find("香蕉").is_empty());
    }

    #[test]
    fn lists_load_from_files_and_bad_entries_name_file_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("guards")).expect("mkdir");
        std::fs::write(
            dir.path().join("guards/p.txt"),
            "# comment\n\nfirst phrase\n  ＳＥＣＯＮＤ phrase  \n",
        )
        .expect("write");
        std::fs::write(
            dir.path().join("guards/r.regex"),
            "# regexes\nok+ay\nbad(group\n",
        )
        .expect("write");
        let t = r#"
[[guards]]
id = "files"
category = "toxic_language"
phrases_file = "guards/p.txt"
"#;
        let g = load(t, dir.path()).expect("valid");
        assert_eq!(g.entries(), 2);
        assert_eq!(g.find("a Second Phrase!").len(), 1);
        let t = r#"
[[guards]]
id = "files"
category = "toxic_language"
patterns_file = "guards/r.regex"
[[guards]]
id = "x"
category = "safe_response"
phrases = ["a"]
"#;
        let errs = load(t, dir.path()).expect_err("bad regex");
        assert!(
            errs.iter()
                .any(|e| e.contains("guards/r.regex:3: invalid regular expression `bad(group`")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("guards.x.category: `safe_response`")),
            "{errs:?}"
        );
        let errs = load(
            "[[guards]]\nid = \"e\"\ncategory = \"toxic_language\"\npatterns = [\"a*\"]\nphrases = [\"x\"]\nphrases_file = \"missing.txt\"\n",
            dir.path(),
        )
        .expect_err("bad entries");
        for want in [
            "guards.e.patterns[0]: pattern `a*` matches empty text",
            "guards.e.phrases[0]: phrase `x` is shorter than 2 characters",
            "guards.e.phrases_file: cannot read",
        ] {
            assert!(errs.iter().any(|e| e.starts_with(want)), "{want}: {errs:?}");
        }
    }

    #[test]
    fn except_discards_overlapping_matches_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = load(
            "[[guards]]\nid = \"e\"\ncategory = \"toxic_language\"\nphrases = [\"你该死\"]\npatterns = [\"该死\"]\nexcept = [\"死心\", \"该死的天气\"]\n",
            dir.path(),
        )
        .expect("valid");
        assert!(g.find("你该死心了").is_empty());
        assert!(g.find("该死的天气").is_empty());
        assert_eq!(g.find("你该死心了。你该死").len(), 1);
    }

    #[test]
    fn shipped_lists_are_small_and_every_guard_is_toxic_enforce() {
        let g = shipped("default");
        assert!(!g.is_empty());
        assert!(g.entries() < 200, "{}", g.entries());
        for h in g.guards.iter() {
            assert_eq!(
                (h.category, h.mode),
                (Category::ToxicLanguage, Mode::Enforce)
            );
        }
    }
}
