//! Layered configuration: `config/carewall.toml`, then `CAREWALL__SECTION__KEY`
//! environment variables (and `OPENAI_API_KEY` for `upstream.api_key`).
//!
//! Two stages, as in tensorzero: each section is first read into a raw serde
//! struct with `deny_unknown_fields`, then validated into typed values. Every
//! error is collected (not just the first) and names its key, so one run of
//! `carewall check-config` shows everything that needs fixing.
//!
//! Adding a section (`[audit]`, `[admin]`, `[telemetry]`) is local: a raw
//! struct, a typed struct, one field in [`Config`], one arm in
//! [`Config::from_sources`] and its name in [`SECTIONS`].
//!
//! Invariant: `config` does no network I/O and starts nothing; it only reads
//! files and the environment.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::classifier::{ClassifierKind, ClassifierSettings};

/// The default configuration file, relative to the working directory.
pub const DEFAULT_CONFIG_PATH: &str = "config/carewall.toml";

/// Top-level sections this build knows. Anything else is rejected.
pub const SECTIONS: &[&str] = &[
    "server",
    "upstream",
    "moderation",
    "classifier",
    "logging",
    "telemetry",
    "audit",
    "admin",
];

/// Everything that was wrong with a configuration, one line per problem,
/// each starting with the key it is about.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration ({} problem{}):\n  - {}", .0.len(), if .0.len() == 1 { "" } else { "s" }, .0.join("\n  - "))]
pub struct ConfigError(pub Vec<String>);

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub moderation: ModerationConfig,
    pub classifier: ClassifierSettings,
    pub logging: LoggingConfig,
    /// `[telemetry]`: OTLP export and `/metrics` (see `crate::telemetry`).
    pub telemetry: crate::telemetry::TelemetrySettings,
    /// `[audit]`: the audit trail (see [`crate::audit`]).
    pub audit: crate::audit::AuditSettings,
    /// `[admin]`: the review API's token.
    pub admin: crate::audit::AdminSettings,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to bind; port 0 picks a free port (the bound address is
    /// printed at start-up).
    pub listen: SocketAddr,
    /// Largest accepted request body; larger bodies get 413.
    pub max_body_bytes: usize,
    /// How long in-flight streams may run on after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Serve HTTPS with these PEM files instead of plain HTTP.
    pub tls: Option<TlsFiles>,
    /// Keys clients must present on `/v1/*` (empty: no client check), as
    /// loaded at start; the gateway re-reads `client_key_sources` on SIGHUP.
    pub client_keys: ClientKeys,
    pub client_key_sources: ClientKeySources,
}

/// Where the client keys come from, kept so that SIGHUP can re-read the
/// file (key rotation without a restart).
#[derive(Clone, Default)]
pub struct ClientKeySources {
    /// `server.client_keys`: plain keys (or digests) and key tables.
    pub inline: Vec<KeySpec>,
    /// `server.client_keys_file`: one key per line, or, for a `.toml` file,
    /// `[[keys]]` tables.
    pub file: Option<PathBuf>,
}

/// One entry of `server.client_keys` or of a keys file: a key (or its
/// `sha256:` digest) alone, or a table with attributes.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum KeySpec {
    Plain(String),
    /// Checked field by field in [`ClientKeys::parse`], so that each error
    /// names its field.
    Table(BTreeMap<String, serde_json::Value>),
}

impl std::fmt::Debug for ClientKeySources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientKeySources")
            .field("inline", &self.inline.len())
            .field("file", &self.file)
            .finish()
    }
}

/// A `.toml` keys file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeysFile {
    keys: Vec<KeySpec>,
}

impl ClientKeySources {
    /// Read the file (if any) and parse every entry; every problem is
    /// named by its key (and file line).
    pub fn load(&self) -> Result<ClientKeys, Vec<String>> {
        let mut errors = Vec::new();
        let mut entries: Vec<(String, KeySpec)> = self
            .inline
            .iter()
            .enumerate()
            .map(|(i, k)| (format!("server.client_keys[{i}]"), k.clone()))
            .collect();
        if let Some(path) = &self.file {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    let before = entries.len();
                    if path.extension().is_some_and(|e| e == "toml") {
                        match toml::from_str::<RawKeysFile>(&text) {
                            Ok(f) => entries.extend(f.keys.into_iter().enumerate().map(|(i, k)| {
                                (
                                    format!("server.client_keys_file {} keys[{i}]", path.display()),
                                    k,
                                )
                            })),
                            Err(e) => errors.push(format!(
                                "server.client_keys_file: {}: {} (a `.toml` keys file holds `[[keys]]` tables with `key`, `name`, `policy`, `allowed_policies`, `expires`)",
                                path.display(),
                                e.to_string().replace('\n', " ").trim()
                            )),
                        }
                    } else {
                        for (n, line) in text.lines().enumerate() {
                            let line = line.trim();
                            if !line.is_empty() && !line.starts_with('#') {
                                entries.push((
                                    format!("server.client_keys_file {}:{}", path.display(), n + 1),
                                    KeySpec::Plain(line.to_string()),
                                ));
                            }
                        }
                    }
                    if entries.len() == before && errors.is_empty() {
                        errors.push(format!(
                            "server.client_keys_file: {} holds no key (one key or `sha256:<hex>` per line, `#` starts a comment; or a `.toml` file of `[[keys]]`)",
                            path.display()
                        ));
                    }
                }
                Err(e) => errors.push(format!(
                    "server.client_keys_file: cannot read {}: {e}",
                    path.display()
                )),
            }
        }
        let keys = ClientKeys::parse(&entries, &mut errors);
        if errors.is_empty() {
            Ok(keys)
        } else {
            Err(errors)
        }
    }
}

/// The policy binding of a client key: its default policy and what its
/// `x-carewall-policy` header may choose.
pub use crate::policy::KeyBinding;

/// What a request's client key grants, once accepted: who it is (the
/// tenant, never the key) and its policy binding.
#[derive(Debug, Clone)]
pub struct KeyGrant {
    /// The key's `name`, or `unnamed` for a key without one: a metric label
    /// (bounded by the key configuration), the access log, spans.
    pub tenant: Arc<str>,
    /// The key's `name`, if it has one (the audit record's tenant).
    pub name: Option<String>,
    /// `None`: the key chooses policies like an open gateway does (default
    /// policy, `moderation.header_policies`).
    pub binding: Option<Arc<KeyBinding>>,
}

#[derive(Clone)]
struct ClientKey {
    digest: [u8; 32],
    grant: KeyGrant,
    expires: Option<SystemTime>,
    /// `server.client_keys[2]` or `server.client_keys_file PATH:LINE`.
    origin: String,
}

/// Why a presented key was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRefusal {
    Unknown,
    Expired,
}

/// The keys that may use the gateway's `/v1/*` routes, kept only as SHA-256
/// digests so that neither the config file nor memory dumps need the keys
/// themselves, each with its tenant name, policy binding and expiry. Empty
/// means every client is let through (the default, for deployments that
/// authenticate in front of the gateway).
#[derive(Clone, Default)]
pub struct ClientKeys(Vec<ClientKey>);

const KEY_FIELDS: &str = "key, name, policy, allowed_policies, expires";

/// Tenant names: letters, digits, `-`, `_`, `.`, at most 64 characters
/// (they become a metric label and appear in logs).
fn is_valid_tenant(name: &str) -> bool {
    !name.is_empty()
        && name.chars().count() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn key_digest(what: &str, e: &str, errors: &mut Vec<String>) -> Option<[u8; 32]> {
    use sha2::{Digest, Sha256};
    let e = e.trim();
    if let Some(hex) = e.strip_prefix("sha256:") {
        let d = decode_hex32(hex);
        if d.is_none() {
            errors.push(format!(
                "{what}: `sha256:` must be followed by 64 hex digits (the SHA-256 of the key, e.g. `printf %s KEY | sha256sum`)"
            ));
        }
        d
    } else if e.chars().count() < 16 {
        errors.push(format!(
            "{what}: a client key must be at least 16 characters (or give its digest as `sha256:<hex>`)"
        ));
        None
    } else {
        Some(Sha256::digest(e.as_bytes()).into())
    }
}

/// A TOML datetime comes through serde as a one-entry table; accept it
/// like the quoted string.
fn datetime_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(m) if m.len() == 1 => m
            .iter()
            .next()
            .filter(|(k, _)| k.contains("datetime"))
            .and_then(|(_, v)| v.as_str().map(str::to_string)),
        _ => None,
    }
}

/// An RFC 3339 timestamp (`2027-01-31T00:00:00Z`, `2027-01-31T08:00:00+08:00`).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    if let Ok(t) = humantime::parse_rfc3339(s) {
        return Some(t);
    }
    // humantime takes `Z` only: apply a numeric offset by hand.
    if s.len() < 6 {
        return None;
    }
    let (base, off) = s.split_at(s.len() - 6);
    let sign = match off.as_bytes().first() {
        Some(b'+') => 1i64,
        Some(b'-') => -1i64,
        _ => return None,
    };
    let (h, m) = off[1..].split_once(':')?;
    let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
    if h > 23 || m > 59 {
        return None;
    }
    let utc = humantime::parse_rfc3339(&format!("{base}Z")).ok()?;
    let shift = Duration::from_secs(u64::try_from(h * 3600 + m * 60).ok()?);
    if sign > 0 {
        utc.checked_sub(shift)
    } else {
        utc.checked_add(shift)
    }
}

fn string_list(what: &str, v: &serde_json::Value, errors: &mut Vec<String>) -> Vec<String> {
    match v {
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|x| match x.as_str() {
                Some(s) => Some(s.to_string()),
                None => {
                    errors.push(format!(
                        "{what}: every item must be a policy name (a string)"
                    ));
                    None
                }
            })
            .collect(),
        _ => {
            errors.push(format!(
                "{what}: must be a list of policy names, e.g. [\"strict\"]"
            ));
            Vec::new()
        }
    }
}

impl ClientKeys {
    /// Parse entries of `server.client_keys` / `server.client_keys_file`:
    /// `sha256:<64 hex digits>` (the digest of a key) or a key itself
    /// (at least 16 characters), alone or as the `key` of a table with
    /// `name`, `policy`, `allowed_policies` and `expires`. The first item
    /// of each entry names its source in errors.
    fn parse(entries: &[(String, KeySpec)], errors: &mut Vec<String>) -> ClientKeys {
        let unnamed: Arc<str> = Arc::from("unnamed");
        let mut out: Vec<ClientKey> = Vec::new();
        for (what, spec) in entries {
            let (key_text, table) = match spec {
                KeySpec::Plain(k) => (Some(k.clone()), None),
                KeySpec::Table(t) => (
                    match t.get("key") {
                        Some(serde_json::Value::String(k)) => Some(k.clone()),
                        Some(_) => {
                            errors.push(format!(
                                "{what}.key: must be a string (the key or `sha256:<hex>`)"
                            ));
                            None
                        }
                        None => {
                            errors.push(format!(
                                "{what}.key: required (the key, or `sha256:<hex>` of it)"
                            ));
                            None
                        }
                    },
                    Some(t),
                ),
            };
            let mut name = None;
            let mut policy = None;
            let mut allowed: Option<Vec<String>> = None;
            let mut expires = None;
            if let Some(t) = table {
                for (field, v) in t {
                    let at = format!("{what}.{field}");
                    match field.as_str() {
                        "key" => {}
                        "name" => match v.as_str() {
                            Some(n) if is_valid_tenant(n) => name = Some(n.to_string()),
                            _ => errors.push(format!(
                                "{at}: the tenant name must be 1-64 letters, digits, `-`, `_` or `.` (it is a metric label), got {v}"
                            )),
                        },
                        "policy" => match v.as_str() {
                            Some(p) if crate::policy::is_valid_name(p) => policy = Some(p.to_string()),
                            _ => errors.push(format!(
                                "{at}: must be a policy name (letters, digits, `-`, `_`), got {v}"
                            )),
                        },
                        "allowed_policies" => {
                            let list = string_list(&at, v, errors);
                            for p in &list {
                                if !crate::policy::is_valid_name(p) {
                                    errors.push(format!("{at}: `{p}` is not a policy name (letters, digits, `-`, `_`)"));
                                }
                            }
                            allowed = Some(list);
                        }
                        "expires" => match datetime_text(v).as_deref().and_then(parse_rfc3339) {
                            Some(t) => expires = Some(t),
                            None => errors.push(format!(
                                "{at}: must be an RFC 3339 time, e.g. \"2027-01-31T00:00:00Z\" or \"2027-01-31T08:00:00+08:00\", got {v}"
                            )),
                        },
                        other => errors.push(format!(
                            "{what}: unknown field `{other}`; known: {KEY_FIELDS}"
                        )),
                    }
                }
            }
            let Some(digest) = key_text.and_then(|k| key_digest(what, &k, errors)) else {
                continue;
            };
            if let Some(prev) = out.iter().find(|k| k.digest == digest) {
                errors.push(format!(
                    "{what}: the same key is already listed at {}; list each key once",
                    prev.origin
                ));
                continue;
            }
            let binding = (policy.is_some() || allowed.is_some()).then(|| {
                Arc::new(KeyBinding {
                    policy,
                    allowed: allowed.unwrap_or_default(),
                })
            });
            out.push(ClientKey {
                digest,
                grant: KeyGrant {
                    tenant: name
                        .as_deref()
                        .map(Arc::from)
                        .unwrap_or_else(|| unnamed.clone()),
                    name,
                    binding,
                },
                expires,
                origin: what.clone(),
            });
        }
        ClientKeys(out)
    }

    /// How many keys there are.
    pub fn count(&self) -> usize {
        self.0.len()
    }

    /// Whether client keys are required.
    pub fn is_enabled(&self) -> bool {
        !self.0.is_empty()
    }

    /// Whether `key` is one of the configured keys (expired or not).
    pub fn accepts(&self, key: &str) -> bool {
        self.position(key).is_some()
    }

    /// The index of `key`'s entry. Digests are compared in constant time
    /// and every entry is checked, whichever matches.
    fn position(&self, key: &str) -> Option<usize> {
        use sha2::{Digest, Sha256};
        use subtle::{ConditionallySelectable, ConstantTimeEq};
        let d: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found = subtle::Choice::from(0);
        let mut index = 0u64;
        for (i, k) in self.0.iter().enumerate() {
            let eq = k.digest.ct_eq(&d);
            index = u64::conditional_select(&index, &(i as u64), eq);
            found |= eq;
        }
        bool::from(found).then_some(index as usize)
    }

    /// What `key` grants at `now`: its tenant and policy binding, or why
    /// it is refused.
    pub fn grant(&self, key: &str, now: SystemTime) -> Result<&KeyGrant, KeyRefusal> {
        let k = self
            .position(key)
            .and_then(|i| self.0.get(i))
            .ok_or(KeyRefusal::Unknown)?;
        match k.expires {
            Some(t) if now >= t => Err(KeyRefusal::Expired),
            _ => Ok(&k.grant),
        }
    }

    /// Every policy a key names must exist in `set`.
    pub fn check_policies(&self, set: &crate::policy::PolicySet) -> Vec<String> {
        let names = set.names();
        let mut errors = Vec::new();
        for k in &self.0 {
            let Some(b) = &k.grant.binding else { continue };
            for (field, p) in b
                .policy
                .iter()
                .map(|p| ("policy", p))
                .chain(b.allowed.iter().map(|p| ("allowed_policies", p)))
            {
                if !names.contains(p) {
                    errors.push(format!(
                        "{}.{field}: no policy `{p}`; known: {}",
                        k.origin,
                        names.join(", ")
                    ));
                }
            }
        }
        errors
    }

    /// Things an operator should know: keys already expired, and keys whose
    /// `allowed_policies` include a policy weaker than the key's own
    /// (see [`crate::policy::Policy::weaker_than`]).
    pub fn warnings(&self, set: &crate::policy::PolicySet, now: SystemTime) -> Vec<String> {
        let mut out = Vec::new();
        for k in &self.0 {
            if k.expires.is_some_and(|t| now >= t) {
                out.push(format!(
                    "{}: this key has expired and is refused (401)",
                    k.origin
                ));
            }
            let Some(b) = &k.grant.binding else { continue };
            let Some(own) = set.binding_default(b) else {
                continue;
            };
            for p in &b.allowed {
                let Ok(other) = set.get(p) else { continue };
                let why = other.weaker_than(&own);
                if !why.is_empty() {
                    out.push(format!(
                        "{}.allowed_policies: `{p}` is weaker than the key's policy `{}` ({}): its header can lower its floor",
                        k.origin,
                        own.name,
                        why.join("; ")
                    ));
                }
            }
        }
        out
    }
}

/// What an operator should fix but the gateway can run with (printed by
/// `check-config`, logged at start): `header_policies` values that select
/// a weaker policy than the default, keys allowed a policy weaker than
/// their own, expired keys.
pub fn policy_warnings(set: &crate::policy::PolicySet, keys: &ClientKeys) -> Vec<String> {
    let mut out = set.header_warnings();
    out.extend(keys.warnings(set, SystemTime::now()));
    out
}

impl std::fmt::Debug for ClientKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientKeys({} keys)", self.0.len())
    }
}

fn decode_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// PEM certificate chain and private key for server TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[upstream]`: the OpenAI-compatible provider.
#[derive(Clone)]
pub struct UpstreamConfig {
    /// Base URL including the version path, e.g. `https://api.openai.com/v1`.
    /// `None` leaves the gateway unready (only `/v1/moderations` works).
    pub base_url: Option<String>,
    /// Provider key injected as `Authorization: Bearer`; clients never see it.
    pub api_key: Option<String>,
    pub connect_timeout: Duration,
    /// Until the upstream's response headers arrive.
    pub first_byte_timeout: Duration,
    /// The whole upstream exchange, stream included.
    pub total_timeout: Duration,
}

// Hand-written so the provider key never lands in a log line.
impl std::fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("connect_timeout", &self.connect_timeout)
            .field("first_byte_timeout", &self.first_byte_timeout)
            .field("total_timeout", &self.total_timeout)
            .finish()
    }
}

/// `[moderation]`.
#[derive(Debug, Clone)]
pub struct ModerationConfig {
    /// `false` turns the gateway into a plain pass-through.
    pub enabled: bool,
    /// Name of the default policy (a file `<policies_dir>/<name>.toml`).
    pub policy: String,
    pub policies_dir: PathBuf,
    /// `x-carewall-policy` header value -> policy name. Only listed values
    /// are accepted, so clients cannot pick an arbitrary policy file.
    pub header_policies: BTreeMap<String, String>,
    /// Classifications running at once across all requests.
    pub max_concurrent_classifications: usize,
}

/// `[logging]`.
#[derive(Debug, Clone)]
pub struct LoggingConfig {
    pub format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive, e.g. `info` or
    /// `carewall=debug,info`.
    pub level: String,
    /// Debug only: allow conversation text in logs. Off by default because
    /// this traffic is mental-health conversation.
    pub log_conversation_text: bool,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

// ---------------------------------------------------------------- raw forms

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    max_body_bytes: Option<u64>,
    shutdown_grace_secs: Option<u64>,
    tls_cert_path: Option<PathBuf>,
    tls_key_path: Option<PathBuf>,
    client_keys: Option<Vec<KeySpec>>,
    client_keys_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    base_url: Option<String>,
    api_key: Option<String>,
    connect_timeout_ms: Option<u64>,
    first_byte_timeout_ms: Option<u64>,
    total_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModeration {
    enabled: Option<bool>,
    policy: Option<String>,
    policies_dir: Option<PathBuf>,
    header_policies: Option<BTreeMap<String, String>>,
    max_concurrent_classifications: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClassifier {
    kind: Option<String>,
    model_dir: Option<PathBuf>,
    ort_dylib_path: Option<PathBuf>,
    intra_threads: Option<u64>,
    workers: Option<u64>,
    max_batch: Option<u64>,
    max_wait_ms: Option<u64>,
    queue_capacity: Option<u64>,
    timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogging {
    format: Option<String>,
    level: Option<String>,
    log_conversation_text: Option<bool>,
}

/// Where configuration comes from. Tests pass an explicit environment map
/// instead of touching the process environment.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// A TOML file; `None` means no file (built-in defaults).
    pub file: Option<PathBuf>,
    /// Inline TOML layered after the file (used by `carewall demo`).
    pub inline_toml: Option<String>,
    /// Environment variables; `None` reads the process environment.
    pub env: Option<HashMap<String, String>>,
}

impl Config {
    /// Load `file` (or [`DEFAULT_CONFIG_PATH`] if it exists) and the
    /// process environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Config::from_sources(&Config::sources(file))
    }

    /// Load and validate, collecting every problem.
    pub fn from_sources(src: &Sources) -> Result<Config, ConfigError> {
        let (config, errors) = Config::build(src)?;
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError(errors))
        }
    }

    /// Load the configuration and the policies it names, reporting every
    /// problem of both at once (policies are checked even when other
    /// sections have errors).
    pub fn load_all(src: &Sources) -> Result<(Config, crate::policy::PolicySet), ConfigError> {
        let Checked {
            config,
            policies,
            errors,
        } = Config::check(src)?;
        match policies {
            Some(p) if errors.is_empty() => Ok((config, p)),
            Some(_) => Err(ConfigError(errors)),
            None if errors.is_empty() => Err(ConfigError(vec![
                "moderation.policies_dir: the policies could not be loaded".into(),
            ])),
            None => Err(ConfigError(errors)),
        }
    }

    /// The configuration and the policies it names, with every problem of
    /// both (none invented: a policy problem about a key whose value was
    /// already refused is left out). `Err` only when the sources cannot be
    /// read at all.
    pub fn check(src: &Sources) -> Result<Checked, ConfigError> {
        let (config, mut errors) = Config::build(src)?;
        let policies = match crate::policy::PolicySet::load(&config.moderation) {
            Ok(p) => {
                let more = config.server.client_keys.check_policies(&p);
                extend_unless_known(&mut errors, more);
                Some(p)
            }
            Err(e) => {
                extend_unless_known(&mut errors, e.0);
                None
            }
        };
        Ok(Checked {
            config,
            policies,
            errors,
        })
    }

    /// The sources for a `--config` argument: the file (or
    /// [`DEFAULT_CONFIG_PATH`] if it exists) and the process environment.
    pub fn sources(file: Option<&Path>) -> Sources {
        let file = match file {
            Some(f) => Some(f.to_path_buf()),
            None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.is_file()),
        };
        Sources {
            file,
            ..Sources::default()
        }
    }

    /// A configuration with defaults wherever a value was invalid, and the
    /// problems found. `Err` only when the sources cannot be read at all.
    fn build(src: &Sources) -> Result<(Config, Vec<String>), ConfigError> {
        let mut errors = Vec::new();
        let env: HashMap<String, String> = match &src.env {
            Some(m) => m.clone(),
            None => std::env::vars().collect(),
        };

        let mut builder = config::Config::builder();
        if let Some(path) = &src.file {
            if !path.is_file() {
                return Err(ConfigError(vec![format!(
                    "--config: no file {} (pass the path of a TOML file, e.g. {DEFAULT_CONFIG_PATH})",
                    path.display()
                )]));
            }
            builder = builder
                .add_source(config::File::from(path.as_path()).format(config::FileFormat::Toml));
        }
        if let Some(inline) = &src.inline_toml {
            builder = builder.add_source(config::File::from_str(inline, config::FileFormat::Toml));
        }
        // Only CAREWALL__* variables are configuration; the map is filtered
        // here so that unrelated variables never reach the parser.
        let carewall_env: config::Map<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with("CAREWALL__"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("CAREWALL")
                .prefix_separator("__")
                .separator("__")
                .source(Some(carewall_env)),
        );
        let merged = match builder.build() {
            Ok(c) => c,
            Err(e) => {
                return Err(ConfigError(vec![format!(
                    "could not read configuration: {e}"
                )]))
            }
        };
        let mut top: BTreeMap<String, config::Value> = match merged.try_deserialize() {
            Ok(t) => t,
            Err(e) => {
                return Err(ConfigError(vec![format!(
                    "could not read configuration: {e}"
                )]))
            }
        };
        for key in top.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                errors.push(format!(
                    "{key}: unknown section; known sections: {}",
                    SECTIONS.join(", ")
                ));
            }
        }

        let server: RawServer = section(&mut top, "server", &mut errors);
        let upstream: RawUpstream = section(&mut top, "upstream", &mut errors);
        let moderation: RawModeration = section(&mut top, "moderation", &mut errors);
        let classifier: RawClassifier = section(&mut top, "classifier", &mut errors);
        let logging: RawLogging = section(&mut top, "logging", &mut errors);
        let telemetry: crate::telemetry::RawTelemetrySettings =
            section(&mut top, "telemetry", &mut errors);
        let audit: crate::audit::RawAuditSection = section(&mut top, "audit", &mut errors);
        let admin: crate::audit::RawAdminSection = section(&mut top, "admin", &mut errors);

        let server = validate_server(server, &mut errors);
        let upstream = validate_upstream(upstream, &env, &mut errors);
        let moderation = validate_moderation(moderation, &mut errors);
        let classifier = validate_classifier(classifier, &mut errors);
        let logging = validate_logging(logging, &mut errors);
        let telemetry = telemetry.validate().unwrap_or_else(|es| {
            errors.extend(es.iter().map(ToString::to_string));
            crate::telemetry::TelemetrySettings::default()
        });
        // Relative audit paths (SQLite file, key files) are next to the
        // config file, so a deployment's data stays beside its config.
        let base_dir = config_dir(src.file.as_deref());
        let env_of = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
        let audit = crate::audit::AuditSettings::from_raw(&audit, &base_dir, &env_of)
            .unwrap_or_else(|e| {
                errors.extend(e.0);
                crate::audit::AuditSettings::defaults(&base_dir)
            });
        let admin = crate::audit::AdminSettings::from_raw(&admin, &base_dir, &env_of)
            .unwrap_or_else(|e| {
                errors.extend(e.0);
                crate::audit::AdminSettings::default()
            });

        Ok((
            Config {
                server,
                upstream,
                moderation,
                classifier,
                logging,
                telemetry,
                audit,
                admin,
            },
            errors,
        ))
    }
}

/// The folder of the config file (the working directory without one).
pub fn config_dir(file: Option<&Path>) -> PathBuf {
    match file.and_then(Path::parent) {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Deserialize one section, prefixing any error with `section.path`.
///
/// serde stops at the first problem, so each problem is reported, the key at
/// fault dropped and the rest read again: every problem of a section is
/// reported in one run, and its valid keys keep their values (a typo in one
/// key must not reset `moderation.policies_dir` and so invent an error
/// about the policies).
fn section<T: DeserializeOwned + Default>(
    top: &mut BTreeMap<String, config::Value>,
    name: &str,
    errors: &mut Vec<String>,
) -> T {
    let Some(mut value) = top.remove(name) else {
        return T::default();
    };
    loop {
        let e = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(v) => return v,
            Err(e) => e,
        };
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let key = if path == "." || path.is_empty() {
            name.to_string()
        } else {
            format!("{name}.{path}")
        };
        errors.push(format!("{key}: {}", clean_serde_message(&inner)));
        let first = path
            .split(['.', '['])
            .next()
            .filter(|k| !k.is_empty() && *k != "?")
            .map(str::to_string);
        let removed = match (&mut value.kind, first) {
            (config::ValueKind::Table(t), Some(k)) => t.remove(&k).is_some(),
            _ => false,
        };
        if !removed {
            return T::default();
        }
    }
}

/// The `config` crate appends its own origin to messages; keep them short.
fn clean_serde_message(msg: &str) -> String {
    let msg = msg.trim();
    if msg.contains("expected a sequence") || msg.contains("expected a map") {
        // An environment variable always holds one string.
        format!("{msg}; lists and tables are set in the TOML file, not from the environment")
    } else {
        msg.to_string()
    }
}

fn positive(key: &str, v: Option<u64>, default: u64, errors: &mut Vec<String>) -> u64 {
    match v {
        None => default,
        Some(0) => {
            errors.push(format!("{key}: must be at least 1, got 0"));
            default
        }
        Some(n) => n,
    }
}

fn validate_server(raw: RawServer, errors: &mut Vec<String>) -> ServerConfig {
    let listen_s = raw.listen.unwrap_or_else(|| "127.0.0.1:8080".to_string());
    let listen = match listen_s.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            errors.push(format!(
                "server.listen: `{listen_s}` is not an address with a port, e.g. `127.0.0.1:8080` or `0.0.0.0:0`"
            ));
            SocketAddr::from(([127, 0, 0, 1], 8080))
        }
    };
    let max_body_bytes = positive(
        "server.max_body_bytes",
        raw.max_body_bytes,
        4 * 1024 * 1024,
        errors,
    );
    let grace = raw.shutdown_grace_secs.unwrap_or(30);
    let tls = match (raw.tls_cert_path, raw.tls_key_path) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            for (k, p) in [
                ("server.tls_cert_path", &cert),
                ("server.tls_key_path", &key),
            ] {
                if !p.is_file() {
                    errors.push(format!("{k}: no file {}", p.display()));
                }
            }
            Some(TlsFiles { cert, key })
        }
        (Some(_), None) => {
            errors.push("server.tls_key_path: required when server.tls_cert_path is set".into());
            None
        }
        (None, Some(_)) => {
            errors.push("server.tls_cert_path: required when server.tls_key_path is set".into());
            None
        }
    };
    let client_key_sources = ClientKeySources {
        inline: raw.client_keys.unwrap_or_default(),
        file: raw.client_keys_file,
    };
    let client_keys = client_key_sources.load().unwrap_or_else(|e| {
        errors.extend(e);
        ClientKeys::default()
    });
    ServerConfig {
        listen,
        max_body_bytes: usize::try_from(max_body_bytes).unwrap_or(usize::MAX),
        shutdown_grace: Duration::from_secs(grace),
        tls,
        client_keys,
        client_key_sources,
    }
}

fn validate_upstream(
    raw: RawUpstream,
    env: &HashMap<String, String>,
    errors: &mut Vec<String>,
) -> UpstreamConfig {
    let base_url = match raw
        .base_url
        .map(|s| s.trim().trim_end_matches('/').to_string())
    {
        None => None,
        Some(s) if s.is_empty() => None,
        Some(s) => match s.parse::<http::Uri>() {
            Ok(u)
                if matches!(u.scheme_str(), Some("http" | "https"))
                    && u.host().is_some()
                    && u.query().is_none() =>
            {
                Some(s)
            }
            _ => {
                errors.push(format!(
                    "upstream.base_url: `{s}` is not an http(s) URL without a query, e.g. `https://api.openai.com/v1`"
                ));
                None
            }
        },
    };
    // An explicit carewall setting wins; OPENAI_API_KEY is the fallback
    // most deployments already have.
    let api_key = raw.api_key.filter(|k| !k.trim().is_empty()).or_else(|| {
        env.get("OPENAI_API_KEY")
            .filter(|k| !k.trim().is_empty())
            .cloned()
    });
    if let Some(k) = &api_key {
        if k.chars().any(|c| c.is_control() || c == ' ') {
            errors.push("upstream.api_key: contains spaces or control characters".into());
        }
    }
    let connect = positive(
        "upstream.connect_timeout_ms",
        raw.connect_timeout_ms,
        5_000,
        errors,
    );
    let first = positive(
        "upstream.first_byte_timeout_ms",
        raw.first_byte_timeout_ms,
        60_000,
        errors,
    );
    let total = positive(
        "upstream.total_timeout_ms",
        raw.total_timeout_ms,
        600_000,
        errors,
    );
    if total < first {
        errors.push(format!(
            "upstream.total_timeout_ms: must be at least upstream.first_byte_timeout_ms ({first}), got {total}"
        ));
    }
    UpstreamConfig {
        base_url,
        api_key,
        connect_timeout: Duration::from_millis(connect),
        first_byte_timeout: Duration::from_millis(first),
        total_timeout: Duration::from_millis(total),
    }
}

fn validate_moderation(raw: RawModeration, errors: &mut Vec<String>) -> ModerationConfig {
    let policy = raw.policy.unwrap_or_else(|| "default".to_string());
    if !crate::policy::is_valid_name(&policy) {
        errors.push(format!(
            "moderation.policy: `{policy}` is not a policy name (letters, digits, `-`, `_`), e.g. `default`"
        ));
    }
    let header_policies = raw.header_policies.unwrap_or_default();
    for (value, name) in &header_policies {
        if !crate::policy::is_valid_name(name) {
            errors.push(format!(
                "moderation.header_policies.{value}: `{name}` is not a policy name (letters, digits, `-`, `_`)"
            ));
        }
    }
    let max_conc = positive(
        "moderation.max_concurrent_classifications",
        raw.max_concurrent_classifications,
        64,
        errors,
    );
    ModerationConfig {
        enabled: raw.enabled.unwrap_or(true),
        policy,
        policies_dir: raw
            .policies_dir
            .unwrap_or_else(|| PathBuf::from("policies")),
        header_policies,
        max_concurrent_classifications: usize::try_from(max_conc).unwrap_or(usize::MAX),
    }
}

fn validate_classifier(raw: RawClassifier, errors: &mut Vec<String>) -> ClassifierSettings {
    let d = ClassifierSettings::default();
    let kind = match raw.kind.as_deref() {
        None | Some("onnx") => ClassifierKind::Onnx,
        Some("keyword") => ClassifierKind::Keyword,
        Some(other) => {
            errors.push(format!(
                "classifier.kind: `{other}` is not a classifier kind; known: onnx, keyword"
            ));
            d.kind.clone()
        }
    };
    let usize_of = |key: &str, v: Option<u64>, default: usize, errors: &mut Vec<String>| {
        usize::try_from(positive(key, v, default as u64, errors)).unwrap_or(default)
    };
    ClassifierSettings {
        kind,
        model_dir: raw.model_dir.unwrap_or(d.model_dir),
        ort_dylib_path: raw.ort_dylib_path.or(d.ort_dylib_path),
        intra_threads: usize_of(
            "classifier.intra_threads",
            raw.intra_threads,
            d.intra_threads,
            errors,
        ),
        workers: usize_of("classifier.workers", raw.workers, d.workers, errors),
        max_batch: usize_of("classifier.max_batch", raw.max_batch, d.max_batch, errors),
        // 0 is meaningful here: do not wait to fill a batch.
        max_wait: raw
            .max_wait_ms
            .map(Duration::from_millis)
            .unwrap_or(d.max_wait),
        queue_capacity: usize_of(
            "classifier.queue_capacity",
            raw.queue_capacity,
            d.queue_capacity,
            errors,
        ),
        timeout: Duration::from_millis(positive(
            "classifier.timeout_ms",
            raw.timeout_ms,
            d.timeout.as_millis() as u64,
            errors,
        )),
    }
}

fn validate_logging(raw: RawLogging, errors: &mut Vec<String>) -> LoggingConfig {
    let format = match raw.format.as_deref() {
        None | Some("json") => LogFormat::Json,
        Some("pretty") => LogFormat::Pretty,
        Some(other) => {
            errors.push(format!(
                "logging.format: `{other}` is not a log format; known: json, pretty"
            ));
            LogFormat::Json
        }
    };
    let level = raw.level.unwrap_or_else(|| "info".to_string());
    if let Err(e) = check_log_level(&level) {
        errors.push(format!("logging.level: {e}"));
    }
    LoggingConfig {
        format,
        level,
        log_conversation_text: raw.log_conversation_text.unwrap_or(false),
    }
}

/// The levels `logging.level` accepts, alone or after `target=`.
const LOG_LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

/// `logging.level` is a level (`info`) or comma-separated directives, each
/// a level or `target=level` (`carewall=debug,info`). An `EnvFilter` also
/// takes a bare word as a target name with every level, so `verbose` would
/// pass it and silence every other log line: refuse anything else.
fn check_log_level(level: &str) -> Result<(), String> {
    let is_level = |l: &str| LOG_LEVELS.contains(&l.trim().to_ascii_lowercase().as_str());
    let is_target = |t: &str| {
        let t = t.trim();
        !t.is_empty()
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '.'))
    };
    let hint = format!(
        "use a level ({}) or comma-separated `target=level` directives, e.g. `info` or `carewall=debug,info`",
        LOG_LEVELS.join(", ")
    );
    if level.trim().is_empty() {
        return Err(format!("is empty; {hint}"));
    }
    for d in level.split(',') {
        let d = d.trim();
        let what = match d.split_once('=') {
            None if is_level(d) => continue,
            None if d == level.trim() => format!("`{d}` is not a log level"),
            None => format!("`{d}` in `{level}` is not a level or `target=level`"),
            Some((t, l)) if is_target(t) && is_level(l) => continue,
            Some((t, _)) if !is_target(t) => {
                format!(
                    "`{d}`: the target before `=` must be a module path such as `carewall::access`"
                )
            }
            Some((_, l)) => format!("`{d}`: `{}` is not a log level", l.trim()),
        };
        return Err(format!("{what}; {hint}"));
    }
    Ok(())
}

/// What an operator should know before serving with `config`, though it
/// runs (printed by `check-config`): a real upstream without a provider
/// key, a console without a token, an audit trail without text.
pub fn setup_warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if let (Some(url), None) = (&config.upstream.base_url, &config.upstream.api_key) {
        let local = url
            .parse::<http::Uri>()
            .ok()
            .and_then(|u| u.host().map(str::to_string))
            .is_some_and(|h| {
                let h = h.trim_start_matches('[').trim_end_matches(']');
                h == "localhost"
                    || h.parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            });
        if !local {
            out.push(format!(
                "upstream.api_key: not set (nor OPENAI_API_KEY) for the upstream {url}: a provider refuses requests without its key (clients get 502); set CAREWALL__UPSTREAM__API_KEY or OPENAI_API_KEY, unless this upstream needs no key"
            ));
        }
    }
    if config.audit.enabled && config.admin.token.is_none() {
        out.push(
            "admin.token: not set: the review console and API at /admin answer 503 (disabled); set CAREWALL__ADMIN__TOKEN (e.g. `openssl rand -hex 24`) or admin.token_file".to_string(),
        );
    }
    if config.audit.enabled && config.audit.keyring.is_none() {
        out.push(
            "audit.encryption_key: not set: the audit trail stores no conversation text (audit.text = none), so reviewers see scores only and exports are empty; set CAREWALL__AUDIT__ENCRYPTION_KEY (e.g. `openssl rand -base64 32`) or audit.encryption_key_file".to_string(),
        );
    }
    out
}

/// Add `more` to `errors`, except problems about a key that already has
/// one: a key whose value was refused is checked further with its default,
/// and what that default lacks is not the operator's problem.
fn extend_unless_known(errors: &mut Vec<String>, more: Vec<String>) {
    let key = |e: &str| e.split(": ").next().unwrap_or("").to_string();
    let known: std::collections::BTreeSet<String> = errors.iter().map(|e| key(e)).collect();
    errors.extend(more.into_iter().filter(|e| !known.contains(&key(e))));
}

/// Everything one `check-config` run finds.
pub struct Checked {
    /// The configuration, with defaults wherever a value was refused.
    pub config: Config,
    /// The policies, when they could be read.
    pub policies: Option<crate::policy::PolicySet>,
    /// Every problem, each naming its key.
    pub errors: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_sources(&Sources {
            file: None,
            inline_toml: Some(toml.to_string()),
            env: Some(
                env.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
        })
    }

    fn errors_of(toml: &str, env: &[(&str, &str)]) -> Vec<String> {
        match load(toml, env) {
            Ok(_) => panic!("expected errors for {toml:?}"),
            Err(e) => e.0,
        }
    }

    #[test]
    fn telemetry_section_mounts_with_env_and_keyed_errors() {
        let c = load("", &[]).expect("defaults");
        assert_eq!(c.telemetry.otlp_endpoint, None);
        let c = load(
            "[telemetry]\nsample_ratio = 0.5\n",
            &[
                (
                    "CAREWALL__TELEMETRY__OTLP_ENDPOINT",
                    "http://collector.example:4318",
                ),
                ("CAREWALL__TELEMETRY__PROMETHEUS", "false"),
            ],
        )
        .expect("valid");
        assert_eq!(
            c.telemetry.otlp_endpoint.as_deref(),
            Some("http://collector.example:4318")
        );
        assert_eq!(c.telemetry.sample_ratio, 0.5);
        assert!(!c.telemetry.prometheus);
        let errs = errors_of(
            "[telemetry]\nsample_ratio = 1.7\nexport_intervl_secs = 1\n",
            &[],
        );
        assert!(errs.iter().any(|e| e.starts_with("telemetry.")), "{errs:?}");
        assert!(errs.iter().all(|e| e.starts_with("telemetry")), "{errs:?}");
    }

    #[test]
    fn defaults_are_valid() {
        let c = load("", &[]).expect("defaults");
        assert!(c.moderation.enabled);
        assert_eq!(c.moderation.policy, "default");
        assert_eq!(c.server.listen.port(), 8080);
        assert_eq!(c.classifier.kind, ClassifierKind::Onnx);
        assert!(c.upstream.base_url.is_none());
    }

    #[test]
    fn env_overrides_file_and_parses_types() {
        let c = load(
            "[server]\nlisten = \"127.0.0.1:9000\"\n[upstream]\nbase_url = \"http://a.example/v1\"\n",
            &[
                ("CAREWALL__SERVER__LISTEN", "127.0.0.1:0"),
                ("CAREWALL__MODERATION__ENABLED", "false"),
                ("CAREWALL__SERVER__MAX_BODY_BYTES", "1000"),
                ("CAREWALL__UPSTREAM__API_KEY", "sk-test"),
            ],
        )
        .expect("valid");
        assert_eq!(c.server.listen.port(), 0);
        assert!(!c.moderation.enabled);
        assert_eq!(c.server.max_body_bytes, 1000);
        assert_eq!(c.upstream.api_key.as_deref(), Some("sk-test"));
        assert_eq!(c.upstream.base_url.as_deref(), Some("http://a.example/v1"));
    }

    #[test]
    fn openai_api_key_is_the_fallback() {
        let c = load("", &[("OPENAI_API_KEY", "sk-env")]).expect("valid");
        assert_eq!(c.upstream.api_key.as_deref(), Some("sk-env"));
        let c = load(
            "[upstream]\napi_key = \"sk-file\"\n",
            &[("OPENAI_API_KEY", "sk-env")],
        )
        .expect("valid");
        assert_eq!(c.upstream.api_key.as_deref(), Some("sk-file"));
        assert!(
            !format!("{:?}", c.upstream).contains("sk-file"),
            "key must not appear in Debug"
        );
    }

    #[test]
    fn unknown_keys_and_sections_are_named() {
        let errs = errors_of("[server]\nlisen = \"x\"\n[bogus]\na = 1\n", &[]);
        assert!(
            errs.iter()
                .any(|e| e.starts_with("server") && e.contains("lisen")),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.starts_with("bogus: unknown section")),
            "{errs:?}"
        );
    }

    #[test]
    fn all_errors_are_collected_each_naming_its_key() {
        let errs = errors_of(
            "[server]\nlisten = \"nowhere\"\nmax_body_bytes = 0\n[upstream]\nbase_url = \"ftp://x\"\n\
             [classifier]\nkind = \"magic\"\n[logging]\nformat = \"xml\"\n",
            &[],
        );
        for key in [
            "server.listen:",
            "server.max_body_bytes:",
            "upstream.base_url:",
            "classifier.kind:",
            "logging.format:",
        ] {
            assert!(
                errs.iter().any(|e| e.starts_with(key)),
                "missing {key} in {errs:?}"
            );
        }
    }

    #[test]
    fn wrong_type_names_the_key() {
        let errs = errors_of("", &[("CAREWALL__SERVER__MAX_BODY_BYTES", "lots")]);
        assert!(
            errs.iter().any(|e| e.starts_with("server.max_body_bytes")),
            "{errs:?}"
        );
    }

    #[test]
    fn load_all_reports_config_and_policy_problems_together() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
        let err = Config::load_all(&Sources {
            file: None,
            inline_toml: Some(format!(
                "[server]\nlisten = \"x\"\n[moderation]\npolicy = \"foo\"\npolicies_dir = \"{dir}\"\n"
            )),
            env: Some(HashMap::new()),
        })
        .expect_err("invalid");
        assert!(
            err.0.iter().any(|e| e.starts_with("server.listen:")),
            "{err}"
        );
        assert!(
            err.0
                .iter()
                .any(|e| e.starts_with("moderation.policy: no policy file")
                    && e.ends_with("foo.toml; known: default, strict")),
            "{err}"
        );
    }

    #[test]
    fn client_keys_accept_keys_and_digests_and_name_bad_entries() {
        let c = load("", &[]).expect("defaults");
        assert!(!c.server.client_keys.is_enabled());
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("keys");
        // sha256("abcdefghijklmnop")
        std::fs::write(
            &file,
            "# ops\n\nsha256:f39dac6cbaba535e2c207cd0cd8f154974223c848f727f98b3564cea569b41cf\n",
        )
        .expect("write");
        let c = load(
            &format!(
                "[server]\nclient_keys = [\"0123456789abcdef\"]\nclient_keys_file = \"{}\"\n",
                file.display()
            ),
            &[],
        )
        .expect("valid keys");
        let keys = &c.server.client_keys;
        assert!(keys.is_enabled());
        assert!(keys.accepts("0123456789abcdef"));
        assert!(keys.accepts("abcdefghijklmnop"));
        assert!(!keys.accepts("0123456789abcdeF"));
        assert!(!keys.accepts(""));
        assert_eq!(format!("{keys:?}"), "ClientKeys(2 keys)");

        std::fs::write(&file, "# nothing\n").expect("write");
        let errs = errors_of(
            &format!(
                "[server]\nclient_keys = [\"short\", \"sha256:zz\"]\nclient_keys_file = \"{}\"\n",
                file.display()
            ),
            &[],
        );
        for want in [
            "server.client_keys[0]: a client key must be at least 16 characters",
            "server.client_keys[1]: `sha256:` must be followed by 64 hex digits",
            "server.client_keys_file: ",
        ] {
            assert!(errs.iter().any(|e| e.starts_with(want)), "{want}: {errs:?}");
        }
        // A list cannot come from one environment variable: say where it goes.
        let errs = errors_of("", &[("CAREWALL__SERVER__CLIENT_KEYS", "abc")]);
        assert!(
            errs.iter()
                .any(|e| e.starts_with("server.client_keys: invalid type")
                    && e.ends_with("set in the TOML file, not from the environment")),
            "{errs:?}"
        );
        let errs = errors_of(
            "",
            &[("CAREWALL__SERVER__CLIENT_KEYS_FILE", "/nonexistent/keys")],
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("server.client_keys_file: cannot read /nonexistent/keys")),
            "{errs:?}"
        );
    }

    #[test]
    fn client_key_tables_carry_tenant_policy_and_expiry() {
        let now = SystemTime::now();
        let c = load(
            r#"
[server]
client_keys = [
  "plain-key-0123456789",
  { key = "youth-key-0123456789", name = "youth-service", policy = "strict" },
  { key = "adult-key-0123456789", name = "wellness.app", policy = "default", allowed_policies = ["strict"], expires = "2999-01-01T08:00:00+08:00" },
  { key = "old-key-0123456789ab", name = "old", expires = "2001-01-01T00:00:00Z" },
]
"#,
            &[],
        )
        .expect("valid keys");
        let keys = &c.server.client_keys;
        assert_eq!(keys.count(), 4);
        let plain = keys.grant("plain-key-0123456789", now).expect("plain");
        assert_eq!((&*plain.tenant, plain.name.as_deref()), ("unnamed", None));
        assert!(plain.binding.is_none());
        let youth = keys.grant("youth-key-0123456789", now).expect("youth");
        assert_eq!(&*youth.tenant, "youth-service");
        let b = youth.binding.as_deref().expect("bound");
        assert_eq!((b.policy.as_deref(), b.allowed.len()), (Some("strict"), 0));
        let adult = keys.grant("adult-key-0123456789", now).expect("adult");
        assert_eq!(
            adult.binding.as_deref().map(|b| b.allowed.clone()),
            Some(vec!["strict".to_string()])
        );
        assert_eq!(
            keys.grant("old-key-0123456789ab", now).err(),
            Some(KeyRefusal::Expired)
        );
        assert_eq!(
            keys.grant("nobody-0123456789ab", now).err(),
            Some(KeyRefusal::Unknown)
        );
        assert!(!format!("{keys:?}").contains("youth"));

        let errs = errors_of(
            r#"
[server]
client_keys = [
  { key = "a-key-0123456789abc", name = "has space", polcy = "strict", expires = "tomorrow", allowed_policies = "strict" },
  { name = "no-key" },
  "dup-key-0123456789ab",
  { key = "dup-key-0123456789ab", name = "dup" },
]
"#,
            &[],
        );
        for want in [
            "server.client_keys[0].name: the tenant name must be",
            "server.client_keys[0]: unknown field `polcy`; known: key, name, policy, allowed_policies, expires",
            "server.client_keys[0].expires: must be an RFC 3339 time",
            "server.client_keys[0].allowed_policies: must be a list of policy names",
            "server.client_keys[1].key: required",
            "server.client_keys[3]: the same key is already listed at server.client_keys[2]",
        ] {
            assert!(errs.iter().any(|e| e.starts_with(want)), "{want}: {errs:?}");
        }
    }

    #[test]
    fn a_toml_keys_file_and_unknown_key_policies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("keys.toml");
        std::fs::write(
            &file,
            "[[keys]]\nkey = \"file-key-0123456789\"\nname = \"t1\"\npolicy = \"lenient\"\nexpires = 2999-01-01T00:00:00Z\n",
        )
        .expect("write");
        let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
        let src = Sources {
            file: None,
            inline_toml: Some(format!(
                "[server]\nclient_keys_file = \"{}\"\n[moderation]\npolicies_dir = \"{policies}\"\n",
                file.display()
            )),
            env: Some(HashMap::new()),
        };
        let c = Config::from_sources(&src).expect("keys parse");
        let g = c
            .server
            .client_keys
            .grant("file-key-0123456789", SystemTime::now())
            .expect("grant");
        assert_eq!(&*g.tenant, "t1");
        let err = Config::load_all(&src).expect_err("unknown policy");
        assert!(
            err.0
                .iter()
                .any(|e| e.contains("keys[0].policy: no policy `lenient`; known: default, strict")),
            "{err}"
        );
    }

    #[test]
    fn rfc3339_with_offsets() {
        let z = parse_rfc3339("2027-01-31T00:00:00Z").expect("z");
        assert_eq!(parse_rfc3339("2027-01-31T08:00:00+08:00"), Some(z));
        assert_eq!(parse_rfc3339("2027-01-30T19:00:00-05:00"), Some(z));
        assert_eq!(parse_rfc3339("2027-01-31"), None);
        assert_eq!(parse_rfc3339("2027-01-31T00:00:00+25:00"), None);
    }

    #[test]
    fn header_policies_weaker_than_the_default_are_warned_about() {
        let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
        let shipped = Config::load_all(&Sources {
            file: Some(PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/config/carewall.toml"
            ))),
            inline_toml: Some(format!("[moderation]\npolicies_dir = \"{policies}\"\n")),
            env: Some(HashMap::new()),
        })
        .expect("shipped config");
        assert_eq!(
            policy_warnings(&shipped.1, &shipped.0.server.client_keys),
            Vec::<String>::new()
        );
        let (c, set) = Config::load_all(&Sources {
            file: None,
            inline_toml: Some(format!(
                "[server]\nclient_keys = [{{ key = \"k-0123456789abcdef\", policy = \"strict\", allowed_policies = [\"default\"] }}]\n\
                 [moderation]\npolicy = \"strict\"\npolicies_dir = \"{policies}\"\n[moderation.header_policies]\nstrict = \"strict\"\ndefault = \"default\"\n"
            )),
            env: Some(HashMap::new()),
        })
        .expect("valid");
        let w = policy_warnings(&set, &c.server.client_keys);
        assert!(
            w.iter().any(|w| w.starts_with("moderation.header_policies.default: `default` is weaker than the default policy `strict`")),
            "{w:?}"
        );
        assert!(
            w.iter().any(|w| w.starts_with("server.client_keys[0].allowed_policies: `default` is weaker than the key's policy `strict`")),
            "{w:?}"
        );
        assert!(
            !w.iter().any(|w| w.contains("header_policies.strict")),
            "{w:?}"
        );
    }

    #[test]
    fn audit_and_admin_problems_are_collected_with_the_rest() {
        let errs = errors_of(
            "[server]\nlisten = \"x\"\n[audit]\ntext = \"full\"\nflush_interval_ms = 0\n[admin]\ntoken = \"short\"\n",
            &[],
        );
        for key in [
            "server.listen:",
            "audit.text",
            "audit.flush_interval_ms:",
            "admin.token:",
        ] {
            assert!(
                errs.iter().any(|e| e.starts_with(key)),
                "missing {key} in {errs:?}"
            );
        }
        let errs = errors_of("[audit]\nbogus = 1\n", &[]);
        assert!(
            errs.iter()
                .any(|e| e.starts_with("audit") && e.contains("bogus")),
            "{errs:?}"
        );
        // Env names the spec fixes; the SQLite file defaults to the config's folder.
        let c = load(
            "",
            &[
                ("CAREWALL__AUDIT__URL", "sqlite://x/audit.db"),
                ("CAREWALL__ADMIN__TOKEN", "0123456789abcdef0123"),
            ],
        )
        .expect("valid");
        assert_eq!(c.audit.url.display_safe(), "sqlite://./x/audit.db");
        assert!(c.admin.token.is_some());
        assert_eq!(c.audit.text, crate::audit::TextMode::None);
    }

    #[test]
    fn logging_level_accepts_levels_and_target_directives_only() {
        for ok in [
            "info",
            "WARN",
            "off",
            "carewall=debug,info",
            "carewall::access=warn, error",
        ] {
            let c = load(&format!("[logging]\nlevel = \"{ok}\"\n"), &[]);
            assert!(c.is_ok(), "{ok}: {:?}", c.err());
        }
        for (bad, needle) in [
            ("verbose", "`verbose` is not a log level"),
            ("info,verbose", "`verbose` in `info,verbose`"),
            (
                "carewall=loud",
                "`carewall=loud`: `loud` is not a log level",
            ),
            ("=info", "`=info`: the target"),
            ("", "is empty"),
        ] {
            let errs = errors_of(&format!("[logging]\nlevel = \"{bad}\"\n"), &[]);
            assert!(
                errs.iter()
                    .any(|e| e.starts_with("logging.level: ") && e.contains(needle)),
                "{bad}: {errs:?}"
            );
        }
        let errs = errors_of("", &[("CAREWALL__LOGGING__LEVEL", "verbose")]);
        assert!(
            errs.iter()
                .any(|e| e.starts_with("logging.level: `verbose`")),
            "{errs:?}"
        );
    }

    #[test]
    fn every_problem_of_a_section_is_reported_and_none_invented() {
        let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
        let check = |toml: String| {
            Config::check(&Sources {
                file: None,
                inline_toml: Some(toml),
                env: Some(HashMap::new()),
            })
            .expect("readable")
            .errors
        };
        // One unknown key in [moderation]: that key, nothing about the
        // policies (policies_dir keeps its value).
        let errs = check(format!(
            "[moderation]\npolcy = \"strict\"\npolicies_dir = \"{policies}\"\n"
        ));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("moderation.polcy: unknown field"),
            "{errs:?}"
        );
        // Two problems in one section are both reported, with the rest.
        let errs = check(format!(
            "[server]\nlisen = 1\nmax_body_bytes = \"big\"\n[moderation]\nbogus = 1\npolicies_dir = \"{policies}\"\n[logging]\nlevel = \"verbose\"\n"
        ));
        for key in [
            "server.lisen:",
            "server.max_body_bytes:",
            "moderation.bogus:",
            "logging.level:",
        ] {
            assert!(errs.iter().any(|e| e.starts_with(key)), "{key}: {errs:?}");
        }
        assert_eq!(errs.len(), 4, "{errs:?}");
        // A refused policies_dir or policy is reported once, not again as
        // a missing folder or file at its default.
        let errs = check("[moderation]\npolicies_dir = 5\n".into());
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].starts_with("moderation.policies_dir: "), "{errs:?}");
        let errs = check(format!(
            "[moderation]\npolicy = \"no such\"\npolicies_dir = \"{policies}\"\n"
        ));
        assert_eq!(errs.len(), 1, "{errs:?}");
        // Policy problems come with the others in the same run.
        let errs = check(format!(
            "[server]\nlisten = \"x\"\n[moderation]\npolicy = \"foo\"\npolicies_dir = \"{policies}\"\n"
        ));
        assert!(
            errs.iter().any(|e| e.starts_with("server.listen:")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("moderation.policy: no policy file")),
            "{errs:?}"
        );
    }

    #[test]
    fn setup_warnings_name_a_missing_provider_key_token_and_encryption_key() {
        let c = load(
            "[upstream]\nbase_url = \"https://api.openai.com/v1\"\n",
            &[],
        )
        .expect("valid");
        let w = setup_warnings(&c);
        for key in [
            "upstream.api_key: not set",
            "admin.token: not set",
            "audit.encryption_key: not set",
        ] {
            assert!(w.iter().any(|w| w.starts_with(key)), "{key}: {w:?}");
        }
        assert!(w.iter().any(|w| w.contains("503")), "{w:?}");
        assert!(
            w.iter().any(|w| w.contains("no conversation text")),
            "{w:?}"
        );
        // A local stand-in needs no key; everything set: no warnings.
        let key = "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=";
        let c = load(
            "[upstream]\nbase_url = \"http://127.0.0.1:9100/v1\"\n",
            &[
                ("CAREWALL__ADMIN__TOKEN", "0123456789abcdef0123"),
                ("CAREWALL__AUDIT__ENCRYPTION_KEY", key),
            ],
        )
        .expect("valid");
        assert_eq!(setup_warnings(&c), Vec::<String>::new());
        let c = load(
            "[upstream]\nbase_url = \"https://api.openai.com/v1\"\n[audit]\nenabled = false\n",
            &[("OPENAI_API_KEY", "sk-test")],
        )
        .expect("valid");
        assert_eq!(setup_warnings(&c), Vec::<String>::new());
    }

    #[test]
    fn missing_config_file_is_a_clear_error() {
        let err = Config::from_sources(&Sources {
            file: Some(PathBuf::from("/nonexistent/carewall.toml")),
            inline_toml: None,
            env: Some(HashMap::new()),
        })
        .expect_err("missing file");
        assert!(err.to_string().contains("/nonexistent/carewall.toml"));
    }
}
