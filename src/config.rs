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
use std::time::Duration;

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
    /// `server.client_keys`.
    pub inline: Vec<String>,
    /// `server.client_keys_file`.
    pub file: Option<PathBuf>,
}

impl std::fmt::Debug for ClientKeySources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientKeySources")
            .field("inline", &self.inline.len())
            .field("file", &self.file)
            .finish()
    }
}

impl ClientKeySources {
    /// Read the file (if any) and parse every entry; every problem is
    /// named by its key (and file line).
    pub fn load(&self) -> Result<ClientKeys, Vec<String>> {
        let mut errors = Vec::new();
        let mut entries: Vec<(String, String)> = self
            .inline
            .iter()
            .enumerate()
            .map(|(i, k)| (format!("server.client_keys[{i}]"), k.clone()))
            .collect();
        if let Some(path) = &self.file {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    let before = entries.len();
                    for (n, line) in text.lines().enumerate() {
                        let line = line.trim();
                        if !line.is_empty() && !line.starts_with('#') {
                            entries.push((
                                format!("server.client_keys_file {}:{}", path.display(), n + 1),
                                line.to_string(),
                            ));
                        }
                    }
                    if entries.len() == before {
                        errors.push(format!(
                            "server.client_keys_file: {} holds no key (one key or `sha256:<hex>` per line; `#` starts a comment)",
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

/// The keys that may use the gateway's `/v1/*` routes, kept only as SHA-256
/// digests so that neither the config file nor memory dumps need the keys
/// themselves. Empty means every client is let through (the default, for
/// deployments that authenticate in front of the gateway).
#[derive(Clone, Default)]
pub struct ClientKeys(Vec<[u8; 32]>);

impl ClientKeys {
    /// Parse entries of `server.client_keys` / `server.client_keys_file`:
    /// `sha256:<64 hex digits>` (the digest of a key) or a key itself
    /// (at least 16 characters). `what` names the source in errors.
    fn parse(entries: &[(String, String)], errors: &mut Vec<String>) -> ClientKeys {
        use sha2::{Digest, Sha256};
        let mut out = Vec::new();
        for (what, e) in entries {
            let e = e.trim();
            if let Some(hex) = e.strip_prefix("sha256:") {
                match decode_hex32(hex) {
                    Some(d) => out.push(d),
                    None => errors.push(format!(
                        "{what}: `sha256:` must be followed by 64 hex digits (the SHA-256 of the key, e.g. `printf %s KEY | sha256sum`)"
                    )),
                }
            } else if e.chars().count() < 16 {
                errors.push(format!(
                    "{what}: a client key must be at least 16 characters (or give its digest as `sha256:<hex>`)"
                ));
            } else {
                out.push(Sha256::digest(e.as_bytes()).into());
            }
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

    /// Whether `key` is one of the configured keys. Digests are compared in
    /// constant time and every entry is checked.
    pub fn accepts(&self, key: &str) -> bool {
        use sha2::{Digest, Sha256};
        use subtle::ConstantTimeEq;
        let d: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        self.0
            .iter()
            .fold(subtle::Choice::from(0), |acc, k| acc | k.ct_eq(&d))
            .into()
    }
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
    client_keys: Option<Vec<String>>,
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
        let (config, mut errors) = Config::build(src)?;
        match crate::policy::PolicySet::load(&config.moderation) {
            Ok(p) if errors.is_empty() => Ok((config, p)),
            Ok(_) => Err(ConfigError(errors)),
            Err(e) => {
                errors.extend(e.0);
                Err(ConfigError(errors))
            }
        }
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
fn section<T: DeserializeOwned + Default>(
    top: &mut BTreeMap<String, config::Value>,
    name: &str,
    errors: &mut Vec<String>,
) -> T {
    let Some(value) = top.remove(name) else {
        return T::default();
    };
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(v) => v,
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            let key = if path == "." || path.is_empty() {
                name.to_string()
            } else {
                format!("{name}.{path}")
            };
            errors.push(format!("{key}: {}", clean_serde_message(&inner)));
            T::default()
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
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
        errors.push(format!("logging.level: `{level}` is not a filter directive ({e}); e.g. `info` or `carewall=debug,info`"));
    }
    LoggingConfig {
        format,
        level,
        log_conversation_text: raw.log_conversation_text.unwrap_or(false),
    }
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
