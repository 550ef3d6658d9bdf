//! Policy files: raw TOML form, validation into [`Policy`], and the set of
//! all policies in `moderation.policies_dir`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use super::guards::{GuardSet, RawGuard};
use super::{
    Action, CategoryRule, Mode, OnError, Policy, PolicyRef, StreamMode, Texts, UnknownFields,
};
use crate::classifier::Category;
use crate::config::{ConfigError, ModerationConfig};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTexts {
    en: Option<String>,
    zh: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    threshold: Option<f64>,
    mode: Option<String>,
    action: Option<String>,
    on_error: Option<String>,
    append: Option<RawTexts>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Option<String>,
    version: Option<String>,
    #[allow(dead_code)] // documentation for operators; kept so the key is accepted
    description: Option<String>,
    streaming: Option<String>,
    max_hold_chars: Option<u64>,
    max_retries: Option<u64>,
    unknown_fields: Option<String>,
    retry_system_message: Option<String>,
    safe_reply: Option<RawTexts>,
    block_reply: Option<RawTexts>,
    #[serde(default)]
    categories: BTreeMap<String, RawRule>,
    #[serde(default)]
    guards: Vec<RawGuard>,
}

/// Letters, digits, `-` and `_`: policy names are file stems, never paths.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn texts(key: &str, raw: Option<RawTexts>, errors: &mut Vec<String>) -> Option<Texts> {
    let raw = raw?;
    let mut get = |lang: &str, v: Option<String>| match v {
        Some(s) if !s.trim().is_empty() => s,
        _ => {
            errors.push(format!("{key}.{lang}: required and must not be empty (a remedy never leaves an empty answer)"));
            String::new()
        }
    };
    let en = get("en", raw.en);
    let zh = get("zh", raw.zh);
    Some(Texts { en, zh })
}

/// Parse and validate one policy file's text. `expected_name` is the file
/// stem; the `name` inside must match it so that logs and verdicts never
/// disagree with the file an operator edits. `dir` is the policy file's
/// folder: guard list files are relative to it.
pub(crate) fn parse_policy(
    text: &str,
    expected_name: &str,
    dir: &Path,
) -> Result<Policy, Vec<String>> {
    let raw: RawPolicy = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => return Err(vec![e.to_string().replace('\n', " ").trim().to_string()]),
    };
    let mut errors = Vec::new();
    let name = raw.name.unwrap_or_else(|| expected_name.to_string());
    if name != expected_name {
        errors.push(format!(
            "name: `{name}` must match the file name `{expected_name}`"
        ));
    }
    let version = raw.version.unwrap_or_else(|| "unversioned".to_string());
    let streaming = match raw.streaming.as_deref() {
        None => StreamMode::Window,
        Some(s) => StreamMode::parse(s).unwrap_or_else(|| {
            errors.push(format!(
                "streaming: `{s}` is not a streaming mode; known: buffer, window, observe"
            ));
            StreamMode::Window
        }),
    };
    let max_hold_chars = match raw.max_hold_chars {
        None => 200,
        Some(0) => {
            errors.push("max_hold_chars: must be at least 1, got 0".into());
            200
        }
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
    };
    let max_retries = match raw.max_retries {
        None => 1,
        Some(n) if n > 5 => {
            errors.push(format!(
                "max_retries: at most 5 (each retry is a full upstream call), got {n}"
            ));
            1
        }
        Some(n) => n as u32,
    };
    let unknown_fields = match raw.unknown_fields.as_deref() {
        None | Some("drop") => UnknownFields::Drop,
        Some("pass") => UnknownFields::Pass,
        Some(o) => {
            errors.push(format!(
                "unknown_fields: `{o}` is not known; known: drop (default), pass"
            ));
            UnknownFields::Drop
        }
    };
    let retry_system_message = raw.retry_system_message.filter(|s| !s.trim().is_empty());
    let safe_reply = texts("safe_reply", raw.safe_reply, &mut errors);
    if safe_reply.is_none() {
        errors.push("safe_reply: required ([safe_reply] with `en` and `zh`)".into());
    }
    let block_reply = texts("block_reply", raw.block_reply, &mut errors);

    let mut rules = BTreeMap::new();
    for (key, rr) in raw.categories {
        let Some(cat) = Category::parse(&key) else {
            errors.push(format!(
                "categories.{key}: unknown category; known: {}",
                Category::ALL
                    .iter()
                    .filter(|c| c.is_unsafe())
                    .map(|c| c.key())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            continue;
        };
        if !cat.is_unsafe() {
            errors.push(format!(
                "categories.{key}: `safe_response` takes no rule (it is the absence of a flag)"
            ));
            continue;
        }
        let k = format!("categories.{}", cat.key());
        let threshold = match rr.threshold {
            None => {
                errors.push(format!("{k}.threshold: required (a probability in 0..=1)"));
                1.0
            }
            Some(t) if !(0.0..=1.0).contains(&t) => {
                errors.push(format!("{k}.threshold: must be in 0..=1, got {t}"));
                1.0
            }
            Some(t) => t as f32,
        };
        let mode = match rr.mode.as_deref() {
            None | Some("enforce") => Mode::Enforce,
            Some("shadow") => Mode::Shadow,
            Some(o) => {
                errors.push(format!(
                    "{k}.mode: `{o}` is not a mode; known: enforce, shadow"
                ));
                Mode::Enforce
            }
        };
        let action = match rr.action.as_deref() {
            None => {
                errors.push(format!("{k}.action: required; one of allow, annotate, append, retry, replace, block"));
                Action::Allow
            }
            Some(a) => Action::parse(a).unwrap_or_else(|| {
                errors.push(format!(
                    "{k}.action: `{a}` is not an action; known: allow, annotate, append, retry, replace, block"
                ));
                Action::Allow
            }),
        };
        let on_error = match rr.on_error.as_deref() {
            None | Some("fail_open") => OnError::FailOpen,
            Some("fail_closed") => OnError::FailClosed,
            Some("hold") => OnError::Hold,
            Some(o) => {
                errors.push(format!(
                    "{k}.on_error: `{o}` is not known; known: fail_open, fail_closed, hold"
                ));
                OnError::FailOpen
            }
        };
        let append = texts(&format!("{k}.append"), rr.append, &mut errors);
        if action == Action::Append && append.is_none() {
            errors.push(format!(
                "{k}.append: required when action = \"append\" ([{k}.append] with `en` and `zh`)"
            ));
        }
        if action == Action::Retry && max_retries == 0 {
            errors.push(format!("{k}.action: `retry` needs max_retries >= 1"));
        }
        rules.insert(
            cat,
            CategoryRule {
                threshold,
                mode,
                action,
                on_error,
                append,
            },
        );
    }
    for cat in Category::ALL.iter().filter(|c| c.is_unsafe()) {
        if !rules.contains_key(cat) {
            errors.push(format!(
                "categories.{}: missing; every unsafe category needs an explicit rule (use action = \"allow\" to let it pass)",
                cat.key()
            ));
        }
    }
    let guards = GuardSet::load(raw.guards, dir, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    let safe_reply = safe_reply.unwrap_or(Texts {
        en: String::new(),
        zh: String::new(),
    });
    Ok(Policy {
        name,
        version,
        streaming,
        max_hold_chars,
        max_retries,
        unknown_fields,
        retry_system_message,
        block_reply: block_reply.unwrap_or_else(|| safe_reply.clone()),
        safe_reply,
        rules,
        guards,
    })
}

/// Every policy in the policies folder, the default's name and the header
/// map. Immutable: a reload builds a new set and swaps it in whole.
#[derive(Debug, Clone)]
pub struct PolicySet {
    policies: BTreeMap<String, PolicyRef>,
    default: String,
    header: BTreeMap<String, String>,
}

/// Why a per-request policy could not be chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownHeaderPolicy {
    pub value: String,
    pub known: Vec<String>,
}

/// The policies a client key is bound to (`policy`, `allowed_policies` in
/// `server.client_keys`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyBinding {
    /// The key's default policy; `None`: `moderation.policy`.
    pub policy: Option<String>,
    /// What the key's `x-carewall-policy` header may choose besides its
    /// default (policy names, or `moderation.header_policies` values that
    /// map to them).
    pub allowed: Vec<String>,
}

/// Why a request's policy could not be chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SelectError {
    /// The header names no policy this gateway offers (400).
    Unknown(UnknownHeaderPolicy),
    /// The header names a policy the client key may not use (403).
    NotAllowed { value: String, allowed: Vec<String> },
}

impl PolicySet {
    /// Load every `*.toml` in `moderation.policies_dir`, validate them and
    /// check that `moderation.policy` and the header map name existing ones.
    /// All problems are collected.
    pub fn load(m: &ModerationConfig) -> Result<PolicySet, ConfigError> {
        let dir = &m.policies_dir;
        let mut errors = Vec::new();
        let mut policies = BTreeMap::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                return Err(ConfigError(vec![format!(
                    "moderation.policies_dir: cannot read folder {}: {e}",
                    dir.display()
                )]))
            }
        };
        let mut paths: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        paths.sort();
        for path in paths {
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            if !is_valid_name(&stem) {
                errors.push(format!(
                    "{}: policy file names may only use letters, digits, `-`, `_`",
                    path.display()
                ));
                continue;
            }
            match load_file(&path, &stem) {
                Ok(p) => {
                    policies.insert(stem, Arc::new(p));
                }
                Err(errs) => {
                    errors.extend(errs.into_iter().map(|e| format!("{}: {e}", path.display())))
                }
            }
        }
        let known = |policies: &BTreeMap<String, PolicyRef>| {
            if policies.is_empty() {
                "none".to_string()
            } else {
                policies.keys().cloned().collect::<Vec<_>>().join(", ")
            }
        };
        // A file that exists but failed validation already has its own
        // errors; don't also claim it is missing.
        let broken: Vec<String> = errors.clone();
        let exists = |name: &str| {
            policies.contains_key(name)
                || broken.iter().any(|e| e.contains(&format!("{name}.toml:")))
        };
        if !exists(&m.policy) {
            errors.push(format!(
                "moderation.policy: no policy file {}; known: {}",
                dir.join(format!("{}.toml", m.policy)).display(),
                known(&policies)
            ));
        }
        for (value, name) in &m.header_policies {
            if !exists(name) {
                errors.push(format!(
                    "moderation.header_policies.{value}: no policy file {}; known: {}",
                    dir.join(format!("{name}.toml")).display(),
                    known(&policies)
                ));
            }
        }
        if !errors.is_empty() {
            return Err(ConfigError(errors));
        }
        Ok(PolicySet {
            policies,
            default: m.policy.clone(),
            header: m.header_policies.clone(),
        })
    }

    /// The policy for a request: the default, or the one mapped from the
    /// `x-carewall-policy` header value.
    pub fn select(&self, header: Option<&str>) -> Result<PolicyRef, UnknownHeaderPolicy> {
        let name = match header {
            None => &self.default,
            Some(v) => match self.header.get(v) {
                Some(n) => n,
                None => {
                    return Err(UnknownHeaderPolicy {
                        value: v.to_string(),
                        known: self.header.keys().cloned().collect(),
                    })
                }
            },
        };
        // Validated at load: every referenced name exists. The fallback to
        // any policy only guards against a logic error, never reached.
        match self.policies.get(name) {
            Some(p) => Ok(p.clone()),
            None => Err(UnknownHeaderPolicy {
                value: name.clone(),
                known: self.header.keys().cloned().collect(),
            }),
        }
    }

    /// The policy for a request whose client key has `binding` (see
    /// [`KeyBinding`]); without one, exactly [`PolicySet::select`]. With
    /// one, no header means the key's policy, and a header (a policy name,
    /// or a `header_policies` value) must resolve to the key's policy or
    /// one of its `allowed_policies`, else [`SelectError::NotAllowed`].
    pub fn select_for(
        &self,
        binding: Option<&KeyBinding>,
        header: Option<&str>,
    ) -> Result<PolicyRef, SelectError> {
        let Some(b) = binding else {
            return self.select(header).map_err(SelectError::Unknown);
        };
        let own = b.policy.as_deref().unwrap_or(&self.default);
        let name = match header {
            None => own,
            Some(v) => self.header.get(v).map(String::as_str).unwrap_or(v),
        };
        let allowed = name == own || b.allowed.iter().any(|a| a == name);
        match (allowed, self.policies.get(name)) {
            (true, Some(p)) => Ok(p.clone()),
            _ => {
                let mut names = vec![own.to_string()];
                names.extend(b.allowed.iter().filter(|a| *a != own).cloned());
                Err(SelectError::NotAllowed {
                    value: header.unwrap_or(own).to_string(),
                    allowed: names,
                })
            }
        }
    }

    /// A policy by name.
    pub fn get(&self, name: &str) -> Result<PolicyRef, UnknownHeaderPolicy> {
        self.policies
            .get(name)
            .cloned()
            .ok_or_else(|| UnknownHeaderPolicy {
                value: name.to_string(),
                known: self.names(),
            })
    }

    /// The default policy of a key binding.
    pub fn binding_default(&self, b: &KeyBinding) -> Option<PolicyRef> {
        self.policies
            .get(b.policy.as_deref().unwrap_or(&self.default))
            .cloned()
    }

    /// `moderation.header_policies` entries that select a policy weaker
    /// than the default (see [`Policy::weaker_than`]): without client keys
    /// bound to policies, any client can lower its own floor with them.
    pub fn header_warnings(&self) -> Vec<String> {
        let Some(default) = self.default_policy() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (value, name) in &self.header {
            let Some(p) = self.policies.get(name) else {
                continue;
            };
            let why = p.weaker_than(&default);
            if !why.is_empty() {
                out.push(format!(
                    "moderation.header_policies.{value}: `{name}` is weaker than the default policy `{}` ({}): any client can lower its moderation with `x-carewall-policy: {value}`; remove it, or bind client keys to policies (server.client_keys: policy, allowed_policies)",
                    default.name,
                    why.join("; ")
                ));
            }
        }
        out
    }

    /// The default policy.
    pub fn default_policy(&self) -> Option<PolicyRef> {
        self.policies.get(&self.default).cloned()
    }

    /// Names of all loaded policies.
    pub fn names(&self) -> Vec<String> {
        self.policies.keys().cloned().collect()
    }
}

/// Load one policy file on its own (offline tools: `carewall eval
/// --policy`); errors name the file.
pub fn load_policy_file(path: &Path) -> Result<Policy, String> {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string();
    load_file(path, &stem).map_err(|e| format!("{}: {}", path.display(), e.join("; ")))
}

fn load_file(path: &Path, stem: &str) -> Result<Policy, Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| vec![format!("cannot read: {e}")])?;
    let dir = path.parent().unwrap_or(Path::new("."));
    parse_policy(&text, stem, dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn errs(text: &str) -> Vec<String> {
        match parse_policy(text, "p", Path::new(".")) {
            Ok(_) => panic!("expected errors"),
            Err(e) => e,
        }
    }

    const MINIMAL: &str = r#"
name = "p"
[safe_reply]
en = "I'm here with you."
zh = "我在这里陪着你。"
[categories.nonsense]
threshold = 0.5
action = "annotate"
[categories.humanoid_mimicry]
threshold = 0.5
action = "append"
append = { en = "(I am an AI.)", zh = "（我是 AI。）" }
[categories.linguistic_neglect]
threshold = 0.5
action = "allow"
[categories.unamiable_judgment]
threshold = 0.5
action = "retry"
[categories.toxic_language]
threshold = 0.5
action = "block"
on_error = "fail_closed"
[categories.unauthorized_preachment]
threshold = 0.5
action = "replace"
mode = "shadow"
[categories.nonfactual_statement]
threshold = 0.5
action = "annotate"
"#;

    #[test]
    fn minimal_policy_parses_with_defaults() {
        let p = parse_policy(MINIMAL, "p", Path::new(".")).expect("valid");
        assert_eq!(p.streaming, StreamMode::Window);
        assert_eq!(p.max_retries, 1);
        assert_eq!(p.block_reply, p.safe_reply);
        assert_eq!(
            p.rules[&Category::ToxicLanguage].on_error,
            OnError::FailClosed
        );
        assert_eq!(
            p.rules[&Category::UnauthorizedPreachment].mode,
            Mode::Shadow
        );
    }

    #[test]
    fn shipped_policies_parse() {
        for (name, text) in [
            ("default", include_str!("../../policies/default.toml")),
            ("strict", include_str!("../../policies/strict.toml")),
        ] {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
            if let Err(e) = parse_policy(text, name, &dir) {
                panic!("{name}: {e:?}");
            }
        }
    }

    #[test]
    fn errors_name_their_keys() {
        let bad = MINIMAL
            .replace(
                "threshold = 0.5\naction = \"block\"",
                "threshold = 1.7\naction = \"explode\"",
            )
            .replace("name = \"p\"", "name = \"p\"\nstreaming = \"sometimes\"");
        let e = errs(&bad);
        assert!(
            e.iter().any(|m| m.starts_with("streaming: `sometimes`")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|m| m
                    .contains("categories.toxic_language.threshold: must be in 0..=1, got 1.7")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|m| m.contains("categories.toxic_language.action: `explode`")),
            "{e:?}"
        );
    }

    #[test]
    fn missing_category_and_append_text_are_errors() {
        let bad = MINIMAL.replace(
            "append = { en = \"(I am an AI.)\", zh = \"（我是 AI。）\" }\n",
            "",
        );
        let bad = bad.replace(
            "[categories.nonsense]\nthreshold = 0.5\naction = \"annotate\"\n",
            "",
        );
        let e = errs(&bad);
        assert!(
            e.iter()
                .any(|m| m.starts_with("categories.nonsense: missing")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|m| m.starts_with("categories.humanoid_mimicry.append: required")),
            "{e:?}"
        );
    }

    #[test]
    fn empty_safe_reply_is_rejected() {
        let bad = MINIMAL.replace("en = \"I'm here with you.\"", "en = \"  \"");
        let e = errs(&bad);
        assert!(e.iter().any(|m| m.starts_with("safe_reply.en")), "{e:?}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = errs(&MINIMAL.replace("name = \"p\"", "name = \"p\"\nthreshhold = 1"));
        assert!(e.iter().any(|m| m.contains("threshhold")), "{e:?}");
    }

    #[test]
    fn name_must_match_file() {
        let e = match parse_policy(MINIMAL, "other", Path::new(".")) {
            Ok(_) => panic!("expected error"),
            Err(e) => e,
        };
        assert!(
            e.iter().any(|m| m.starts_with("name: `p` must match")),
            "{e:?}"
        );
    }

    fn moderation(dir: PathBuf, policy: &str, header: &[(&str, &str)]) -> ModerationConfig {
        ModerationConfig {
            enabled: true,
            policy: policy.to_string(),
            policies_dir: dir,
            header_policies: header
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            max_concurrent_classifications: 4,
        }
    }

    #[test]
    fn keys_bound_to_policies_choose_only_what_they_allow() {
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/policies"));
        let set = PolicySet::load(&moderation(
            dir,
            "default",
            &[("lenient", "default"), ("strict", "strict")],
        ))
        .expect("loads");
        // No binding: the header map, as without keys.
        assert_eq!(
            set.select_for(None, Some("lenient")).expect("mapped").name,
            "default"
        );
        let strict_only = KeyBinding {
            policy: Some("strict".into()),
            allowed: vec![],
        };
        assert_eq!(
            set.select_for(Some(&strict_only), None).expect("own").name,
            "strict"
        );
        assert_eq!(
            set.select_for(Some(&strict_only), Some("strict"))
                .expect("own")
                .name,
            "strict"
        );
        for header in ["default", "lenient", "nonexistent"] {
            assert_eq!(
                set.select_for(Some(&strict_only), Some(header)).err(),
                Some(SelectError::NotAllowed {
                    value: header.into(),
                    allowed: vec!["strict".into()]
                }),
                "{header}"
            );
        }
        let adult = KeyBinding {
            policy: Some("default".into()),
            allowed: vec!["strict".into()],
        };
        assert_eq!(
            set.select_for(Some(&adult), None).expect("own").name,
            "default"
        );
        assert_eq!(
            set.select_for(Some(&adult), Some("strict"))
                .expect("allowed")
                .name,
            "strict"
        );
        // Without `policy`, the key's default is `moderation.policy`.
        let floor = KeyBinding {
            policy: None,
            allowed: vec!["strict".into()],
        };
        assert_eq!(
            set.select_for(Some(&floor), None).expect("default").name,
            "default"
        );
    }

    #[test]
    fn set_checks_default_and_header_names() {
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/policies"));
        let set = PolicySet::load(&moderation(dir.clone(), "default", &[("strict", "strict")]))
            .expect("loads");
        assert_eq!(set.select(None).expect("default").name, "default");
        assert_eq!(set.select(Some("strict")).expect("strict").name, "strict");
        let err = set.select(Some("lenient")).expect_err("unknown");
        assert_eq!(err.known, vec!["strict".to_string()]);

        let err =
            PolicySet::load(&moderation(dir, "foo", &[("x", "bar")])).expect_err("unknown names");
        let msg = err.to_string();
        assert!(msg.contains("moderation.policy: no policy file"), "{msg}");
        assert!(msg.contains("foo.toml; known: default, strict"), "{msg}");
        assert!(
            msg.contains("moderation.header_policies.x: no policy file"),
            "{msg}"
        );
    }
}
