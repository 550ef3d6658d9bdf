//! The `[audit]` and `[admin]` config sections: raw serde forms (unknown
//! keys rejected) and the typed, validated [`AuditSettings`] /
//! [`AdminSettings`]. Secrets may come from the environment
//! (`CAREWALL__AUDIT__ENCRYPTION_KEY`, `CAREWALL__AUDIT__PSEUDONYM_KEY`,
//! `CAREWALL__ADMIN__TOKEN`, `CAREWALL__AUDIT__URL`), which wins over the
//! file, or from files (`*_file` keys), so they need not sit in the config.
//!
//! Validation collects every problem before failing and names the key.
//! Messages never contain secret values.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::crypto::{decode_key_bytes, Key, Keyring};
use super::pseudonym::Pseudonymizer;

/// `[audit]` as written in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuditSection {
    /// Record anything at all (default true).
    pub enabled: Option<bool>,
    /// `sqlite://PATH` (relative to the config file's folder) or
    /// `postgres://...`. Default: `sqlite://carewall-audit.db`.
    pub url: Option<String>,
    /// Base64 of 32 bytes. Prefer the env var or `encryption_key_file`.
    pub encryption_key: Option<String>,
    /// File holding the base64 key.
    pub encryption_key_file: Option<PathBuf>,
    /// Older keys (base64), used only to decrypt after a rotation.
    pub previous_encryption_keys: Option<Vec<String>>,
    /// Base64 of 32 bytes keying the conversation-id HMAC.
    pub pseudonym_key: Option<String>,
    /// File holding the base64 pseudonym key.
    pub pseudonym_key_file: Option<PathBuf>,
    /// `full`, `redacted` or `none`.
    pub text: Option<String>,
    /// Fraction (0..=1) of allowed responses recorded too.
    pub sample_rate: Option<f64>,
    /// Records older than this many days are purged.
    pub retention_days: Option<u32>,
    /// Bounded writer queue length.
    pub queue_capacity: Option<usize>,
    /// Most records written per transaction.
    pub batch_size: Option<usize>,
    /// Longest a record waits in the queue before its batch is written.
    pub flush_interval_ms: Option<u64>,
    /// `block` (wait up to `block_timeout_ms`, then drop) or `drop`.
    pub overflow: Option<String>,
    /// How long `block` waits for queue space.
    pub block_timeout_ms: Option<u64>,
}

/// `[admin]` as written in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdminSection {
    /// Bearer token for `/admin/api/*`. Prefer `CAREWALL__ADMIN__TOKEN`.
    pub token: Option<String>,
    /// File holding the token.
    pub token_file: Option<PathBuf>,
}

/// What happens to conversation text in audit records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextMode {
    /// Stored as is (encrypted).
    Full,
    /// Identifiers masked, then stored (encrypted).
    Redacted,
    /// Not stored at all.
    None,
}

impl TextMode {
    /// Config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TextMode::Full => "full",
            TextMode::Redacted => "redacted",
            TextMode::None => "none",
        }
    }

    /// Parse the config spelling.
    pub fn parse(s: &str) -> Option<TextMode> {
        match s {
            "full" => Some(TextMode::Full),
            "redacted" => Some(TextMode::Redacted),
            "none" => Some(TextMode::None),
            _ => None,
        }
    }
}

/// What a full queue does to a new record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Wait up to the timeout for space, then drop.
    Block(Duration),
    /// Drop at once (counted and logged).
    Drop,
}

/// Where records live.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// An SQLite file (created if missing).
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL.
    Postgres(String),
}

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display_safe())
    }
}

impl StoreUrl {
    /// Parse `sqlite://PATH` (relative paths resolve against `base_dir`) or
    /// `postgres://` / `postgresql://`.
    pub fn parse(url: &str, base_dir: &Path) -> Result<StoreUrl, String> {
        if let Some(rest) = url.strip_prefix("sqlite://") {
            if rest.is_empty() {
                return Err("`sqlite://` needs a file path, e.g. sqlite://carewall-audit.db or sqlite:///var/lib/carewall/audit.db".into());
            }
            let path = Path::new(rest);
            let path = if path.is_absolute() {
                path.to_path_buf()
            } else {
                base_dir.join(path)
            };
            Ok(StoreUrl::Sqlite(path))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(StoreUrl::Postgres(url.to_string()))
        } else {
            Err(format!(
                "expected `sqlite://PATH` or `postgres://...`, got `{}`",
                redact_password(url)
            ))
        }
    }

    /// The URL with any password replaced by `***`, for logs and errors.
    pub fn display_safe(&self) -> String {
        match self {
            StoreUrl::Sqlite(p) => format!("sqlite://{}", p.display()),
            StoreUrl::Postgres(u) => redact_password(u),
        }
    }
}

/// Replace the password in `scheme://user:password@host` with `***`.
pub fn redact_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.find('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &userinfo[..colon],
            &rest[at..]
        ),
        None => url.to_string(),
    }
}

/// Validated `[audit]` settings.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub enabled: bool,
    pub url: StoreUrl,
    /// Present whenever `text` is not `none`.
    pub keyring: Option<Keyring>,
    /// Present when a pseudonym key or an encryption key is configured;
    /// without one, conversation ids are not recorded at all.
    pub pseudonymizer: Option<Pseudonymizer>,
    pub text: TextMode,
    pub sample_rate: f64,
    pub retention_days: u32,
    pub queue_capacity: usize,
    pub batch_size: usize,
    pub flush_interval: Duration,
    pub overflow: Overflow,
}

/// Validated `[admin]` settings.
#[derive(Clone, Default)]
pub struct AdminSettings {
    /// `None`: the review API answers 503 until a token is configured.
    pub token: Option<String>,
}

impl std::fmt::Debug for AdminSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminSettings")
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish()
    }
}

/// Every problem found in the `[audit]` / `[admin]` sections.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct SettingsError(pub Vec<String>);

/// Environment lookup, injectable for tests.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, for [`AuditSettings::from_raw`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl AuditSettings {
    /// Defaults for a config in `base_dir`: SQLite next to it, no key, no
    /// text.
    pub fn defaults(base_dir: &Path) -> AuditSettings {
        match AuditSettings::from_raw(&RawAuditSection::default(), base_dir, &|_| None) {
            Ok(s) => s,
            Err(e) => unreachable!("defaults are valid: {e}"),
        }
    }

    /// Validate `raw`; `base_dir` is the config file's folder; `env` looks up
    /// environment variables (pass [`process_env`]).
    pub fn from_raw(
        raw: &RawAuditSection,
        base_dir: &Path,
        env: Env<'_>,
    ) -> Result<AuditSettings, SettingsError> {
        let mut errors = Vec::new();

        let url_text = env("CAREWALL__AUDIT__URL")
            .or_else(|| raw.url.clone())
            .unwrap_or_else(|| "sqlite://carewall-audit.db".to_string());
        let url = match StoreUrl::parse(&url_text, base_dir) {
            Ok(u) => Some(u),
            Err(e) => {
                errors.push(format!("audit.url: {e}"));
                None
            }
        };

        let enc_key = secret(
            env("CAREWALL__AUDIT__ENCRYPTION_KEY"),
            raw.encryption_key.as_deref(),
            raw.encryption_key_file.as_deref(),
            "audit.encryption_key",
            "audit.encryption_key_file",
            base_dir,
            &mut errors,
        )
        .and_then(
            |text| match decode_key_bytes(&text, "audit.encryption_key") {
                Ok(b) => Some(b),
                Err(e) => {
                    errors.push(e.to_string());
                    None
                }
            },
        );

        let mut keyring = enc_key.map(|b| Keyring::new(Key::from_bytes(&b)));
        for (i, k) in raw.previous_encryption_keys.iter().flatten().enumerate() {
            match Key::from_base64(k, &format!("audit.previous_encryption_keys[{i}]")) {
                Ok(key) => keyring = keyring.map(|r| r.with_previous(key)),
                Err(e) => errors.push(e.to_string()),
            }
        }
        if raw
            .previous_encryption_keys
            .as_ref()
            .is_some_and(|v| !v.is_empty())
            && keyring.is_none()
        {
            errors.push("audit.previous_encryption_keys: set only together with a current key (CAREWALL__AUDIT__ENCRYPTION_KEY, audit.encryption_key or audit.encryption_key_file)".into());
        }

        let pseudo_key = secret(
            env("CAREWALL__AUDIT__PSEUDONYM_KEY"),
            raw.pseudonym_key.as_deref(),
            raw.pseudonym_key_file.as_deref(),
            "audit.pseudonym_key",
            "audit.pseudonym_key_file",
            base_dir,
            &mut errors,
        )
        .and_then(
            |text| match decode_key_bytes(&text, "audit.pseudonym_key") {
                Ok(b) => Some(b),
                Err(e) => {
                    errors.push(e.to_string());
                    None
                }
            },
        );
        let pseudonymizer = match (pseudo_key, enc_key) {
            (Some(k), _) => Some(Pseudonymizer::new(k)),
            (None, Some(k)) => Some(Pseudonymizer::derived_from(&k)),
            (None, None) => None,
        };

        // Without a key the only safe default is to store no text; asking
        // for text without a key is an error rather than a silent downgrade.
        let text = match raw.text.as_deref() {
            None if keyring.is_some() => TextMode::Redacted,
            None => TextMode::None,
            Some(s) => match TextMode::parse(s) {
                Some(m) => {
                    if m != TextMode::None && keyring.is_none() {
                        errors.push(format!("audit.text = \"{s}\" needs an encryption key: set CAREWALL__AUDIT__ENCRYPTION_KEY (base64 of 32 bytes, e.g. from `openssl rand -base64 32`) or audit.encryption_key_file, or set audit.text = \"none\""));
                    }
                    m
                }
                None => {
                    errors.push(format!(
                        "audit.text: expected \"full\", \"redacted\" or \"none\", got \"{s}\""
                    ));
                    TextMode::None
                }
            },
        };

        let sample_rate = raw.sample_rate.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&sample_rate) {
            errors.push(format!(
                "audit.sample_rate: must be in 0..=1, got {sample_rate}"
            ));
        }
        let retention_days = raw.retention_days.unwrap_or(30);
        if retention_days == 0 {
            errors.push("audit.retention_days: must be at least 1".into());
        }
        let queue_capacity = raw.queue_capacity.unwrap_or(10_000);
        if !(1..=10_000_000).contains(&queue_capacity) {
            errors.push(format!(
                "audit.queue_capacity: must be in 1..=10000000, got {queue_capacity}"
            ));
        }
        let batch_size = raw.batch_size.unwrap_or(256);
        if !(1..=10_000).contains(&batch_size) {
            errors.push(format!(
                "audit.batch_size: must be in 1..=10000, got {batch_size}"
            ));
        }
        let flush_ms = raw.flush_interval_ms.unwrap_or(200);
        if !(1..=60_000).contains(&flush_ms) {
            errors.push(format!(
                "audit.flush_interval_ms: must be in 1..=60000, got {flush_ms}"
            ));
        }
        let block_ms = raw.block_timeout_ms.unwrap_or(100);
        if block_ms > 10_000 {
            errors.push(format!(
                "audit.block_timeout_ms: must be at most 10000 (records wait this long, holding memory), got {block_ms}"
            ));
        }
        let overflow = match raw.overflow.as_deref().unwrap_or("block") {
            "block" => Overflow::Block(Duration::from_millis(block_ms)),
            "drop" => {
                if raw.block_timeout_ms.is_some() {
                    errors.push(
                        "audit.block_timeout_ms: only applies with audit.overflow = \"block\""
                            .into(),
                    );
                }
                Overflow::Drop
            }
            other => {
                errors.push(format!(
                    "audit.overflow: expected \"block\" or \"drop\", got \"{other}\""
                ));
                Overflow::Drop
            }
        };

        match (errors.is_empty(), url) {
            (true, Some(url)) => Ok(AuditSettings {
                enabled: raw.enabled.unwrap_or(true),
                url,
                keyring,
                pseudonymizer,
                text,
                sample_rate,
                retention_days,
                queue_capacity,
                batch_size,
                flush_interval: Duration::from_millis(flush_ms),
                overflow,
            }),
            _ => Err(SettingsError(errors)),
        }
    }
}

impl AdminSettings {
    /// Validate `raw`; `CAREWALL__ADMIN__TOKEN` wins over the file.
    pub fn from_raw(
        raw: &RawAdminSection,
        base_dir: &Path,
        env: Env<'_>,
    ) -> Result<AdminSettings, SettingsError> {
        let mut errors = Vec::new();
        let token = secret(
            env("CAREWALL__ADMIN__TOKEN"),
            raw.token.as_deref(),
            raw.token_file.as_deref(),
            "admin.token",
            "admin.token_file",
            base_dir,
            &mut errors,
        );
        if let Some(t) = &token {
            if t.chars().count() < 16 {
                errors.push(format!("admin.token: must be at least 16 characters (got {}); generate one with `openssl rand -hex 24`", t.chars().count()));
            }
            if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                errors.push("admin.token: must not contain whitespace".into());
            }
        }
        if errors.is_empty() {
            Ok(AdminSettings { token })
        } else {
            Err(SettingsError(errors))
        }
    }
}

/// A secret from env (wins), inline value, or file; both inline and file is
/// an error.
fn secret(
    from_env: Option<String>,
    inline: Option<&str>,
    file: Option<&Path>,
    key: &str,
    file_key: &str,
    base_dir: &Path,
    errors: &mut Vec<String>,
) -> Option<String> {
    if let Some(v) = from_env {
        return Some(v.trim().to_string());
    }
    match (inline, file) {
        (Some(_), Some(_)) => {
            errors.push(format!("{key} and {file_key}: set one, not both"));
            None
        }
        (Some(v), None) => Some(v.trim().to_string()),
        (None, Some(f)) => {
            let path = if f.is_absolute() {
                f.to_path_buf()
            } else {
                base_dir.join(f)
            };
            match std::fs::read_to_string(&path) {
                Ok(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
                Ok(_) => {
                    errors.push(format!("{file_key}: {} is empty", path.display()));
                    None
                }
                Err(e) => {
                    errors.push(format!("{file_key}: cannot read {}: {e}", path.display()));
                    None
                }
            }
        }
        (None, None) => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::audit::crypto::KEY_LEN;
    use base64::Engine as _;

    fn key_b64(b: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([b; KEY_LEN])
    }

    fn parse(toml_text: &str, env: Env<'_>) -> Result<AuditSettings, SettingsError> {
        let raw: RawAuditSection = toml::from_str(toml_text).unwrap();
        AuditSettings::from_raw(&raw, Path::new("/etc/carewall"), env)
    }

    #[test]
    fn defaults_are_private() {
        let s = AuditSettings::defaults(Path::new("/etc/carewall"));
        assert_eq!(
            s.url,
            StoreUrl::Sqlite(PathBuf::from("/etc/carewall/carewall-audit.db"))
        );
        assert_eq!(s.text, TextMode::None, "no key, no text");
        assert!(s.keyring.is_none() && s.pseudonymizer.is_none());
        assert_eq!(s.sample_rate, 0.0);
        assert!(matches!(s.overflow, Overflow::Block(_)));
    }

    #[test]
    fn env_wins_and_key_enables_redacted_text() {
        let k = key_b64(3);
        let env = move |n: &str| match n {
            "CAREWALL__AUDIT__ENCRYPTION_KEY" => Some(k.clone()),
            "CAREWALL__AUDIT__URL" => Some("postgres://u:secret@db/x".into()),
            _ => None,
        };
        let s = parse("url = \"sqlite://a.db\"", &env).unwrap();
        assert_eq!(s.url, StoreUrl::Postgres("postgres://u:secret@db/x".into()));
        assert_eq!(format!("{:?}", s.url), "postgres://u:***@db/x");
        assert_eq!(s.text, TextMode::Redacted);
        assert!(s.keyring.is_some() && s.pseudonymizer.is_some());
    }

    #[test]
    fn every_error_is_reported_with_its_key() {
        let err = parse(
            r#"
            url = "mysql://u:pw@h/db"
            text = "full"
            sample_rate = 1.5
            batch_size = 0
            overflow = "spill"
            encryption_key = "AAAA"
            "#,
            &|_| None,
        )
        .unwrap_err();
        let msg = err.to_string();
        for needle in [
            "audit.url",
            "mysql://u:***@h/db",
            "audit.encryption_key: must be base64 of exactly 32 bytes",
            "audit.text = \"full\" needs an encryption key",
            "audit.sample_rate",
            "audit.batch_size",
            "audit.overflow",
        ] {
            assert!(msg.contains(needle), "missing {needle:?} in:\n{msg}");
        }
        assert!(!msg.contains("pw@"), "password leaked: {msg}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<RawAuditSection>("retention = 3").unwrap_err();
        assert!(err.to_string().contains("retention"), "{err}");
        assert!(toml::from_str::<RawAdminSection>("tokn = \"x\"").is_err());
    }

    #[test]
    fn key_file_and_admin_token() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), format!("{}\n", key_b64(9))).unwrap();
        let raw: RawAuditSection =
            toml::from_str("encryption_key_file = \"k\"\ntext = \"full\"").unwrap();
        let s = AuditSettings::from_raw(&raw, dir.path(), &|_| None).unwrap();
        assert_eq!(s.text, TextMode::Full);
        let raw: RawAuditSection = toml::from_str("encryption_key_file = \"missing\"").unwrap();
        let e = AuditSettings::from_raw(&raw, dir.path(), &|_| None).unwrap_err();
        assert!(e
            .to_string()
            .contains("audit.encryption_key_file: cannot read"));

        let short = RawAdminSection {
            token: Some("short".into()),
            token_file: None,
        };
        let e = AdminSettings::from_raw(&short, dir.path(), &|_| None).unwrap_err();
        assert!(e.to_string().contains("admin.token: must be at least 16"));
        assert!(!e.to_string().contains("short"));
        let env =
            |n: &str| (n == "CAREWALL__ADMIN__TOKEN").then(|| "a-very-long-admin-token".into());
        let a = AdminSettings::from_raw(&short, dir.path(), &env).unwrap();
        assert_eq!(a.token.as_deref(), Some("a-very-long-admin-token"));
        assert!(!format!("{a:?}").contains("long-admin"));
    }
}
