//! `carewall audit list|show|export|purge`: read and maintain the audit
//! store from the shell. The store and key come from flags or, by default,
//! from the same environment variables the gateway reads.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use crate::audit::crypto::{Key, Keyring};
use crate::audit::export::reviewed_jsonl;
use crate::audit::record::{actions, parse_category, parse_time_bound, rfc3339, unix_ms};
use crate::audit::store::{open_store, AuditStore, ListFilter};
use crate::audit::{AuditSettings, StoreUrl};
use crate::config::Config;

/// Where the store is and how to open its text. `--url`/`--key` (or their
/// environment variables) win; what they leave open comes from the
/// gateway's configuration file, so `carewall audit list` on the gateway's
/// host reads the gateway's own store with its own key.
#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    /// The gateway's configuration file, for `[audit]` url and keys
    /// (default: config/carewall.toml if it exists).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Audit store: `sqlite://PATH` or `postgres://...`.
    #[arg(long, env = "CAREWALL__AUDIT__URL", hide_env_values = true)]
    pub url: Option<String>,
    /// Encryption key (base64 of 32 bytes), to show text.
    #[arg(long, env = "CAREWALL__AUDIT__ENCRYPTION_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// File holding the encryption key (instead of --key).
    #[arg(long, conflicts_with = "key")]
    pub key_file: Option<PathBuf>,
    /// Older key(s) kept after a rotation, to open older records.
    #[arg(long = "previous-key", hide_env_values = true)]
    pub previous_keys: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: AuditCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// List records, newest first.
    List(ListArgs),
    /// Show one record, with its text when the key is given.
    Show(ShowArgs),
    /// Write reviewed records as JSONL in the `dev.jsonl` training format.
    Export(ExportArgs),
    /// Delete records older than N days.
    Purge(PurgeArgs),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Most records to show (1-500).
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Only reviewed (true) or unreviewed (false) records.
    #[arg(long)]
    pub reviewed: Option<bool>,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Filters shared by `list` and `export`, as the review API takes them.
#[derive(Debug, clap::Args)]
pub struct FilterArgs {
    /// Model category: label id, key or name.
    #[arg(long)]
    pub category: Option<String>,
    /// Action: allow, annotate, append, retry, replace, block or unclassified.
    #[arg(long)]
    pub action: Option<String>,
    /// Only shadow-mode (true) or enforced (false) records.
    #[arg(long)]
    pub shadow: Option<bool>,
    /// From this time (RFC 3339, a date = that day in UTC, or epoch ms), inclusive.
    #[arg(long)]
    pub since: Option<String>,
    /// Until this time, exclusive; a date includes that whole day (UTC).
    #[arg(long)]
    pub until: Option<String>,
}

impl FilterArgs {
    fn filter(&self) -> anyhow::Result<ListFilter> {
        let category = self
            .category
            .as_deref()
            .map(|c| parse_category(c).ok_or_else(|| anyhow::anyhow!("--category: unknown category `{c}`; use a label id 0-7 or a key such as toxic_language")))
            .transpose()?;
        let known = actions();
        if let Some(a) = self.action.as_deref().filter(|a| !known.contains(a)) {
            bail!(
                "--action: unknown action `{a}`; known: {}",
                known.join(", ")
            );
        }
        let since_ms = time_arg("since", &self.since, false)?;
        let until_ms = time_arg("until", &self.until, true)?;
        if let (Some(s), Some(u)) = (since_ms, until_ms) {
            if s >= u {
                bail!("--since must be earlier than --until (a date as --until includes that whole day)");
            }
        }
        Ok(ListFilter {
            category,
            action: self.action.clone(),
            shadow: self.shadow,
            since_ms,
            until_ms,
            ..ListFilter::default()
        })
    }
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// The record's request id (the response's x-carewall-request-id).
    pub request_id: String,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Write to this file instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub filter: FilterArgs,
}

#[derive(Debug, clap::Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Delete records older than this many days.
    #[arg(long)]
    pub older_than_days: u32,
}

/// Run an `audit` subcommand.
pub fn run(args: AuditArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        match args.command {
            AuditCommand::List(a) => list(a).await,
            AuditCommand::Show(a) => show(a).await,
            AuditCommand::Export(a) => export(a).await,
            AuditCommand::Purge(a) => purge(a).await,
        }
    })
}

/// The `[audit]` settings of the configuration file: the one `--config`
/// names (its problems are errors), or config/carewall.toml when present.
fn configured(args: &StoreArgs) -> anyhow::Result<Option<AuditSettings>> {
    let sources = Config::sources(args.config.as_deref());
    if sources.file.is_none() {
        return Ok(None);
    }
    let config = Config::from_sources(&sources).map_err(|e| {
        anyhow::anyhow!(
            "{e}\n(read from {}; pass --config FILE, or --url and --key)",
            sources
                .file
                .as_deref()
                .map_or_else(|| "?".into(), |p| p.display().to_string())
        )
    })?;
    Ok(Some(config.audit))
}

async fn open(args: &StoreArgs) -> anyhow::Result<std::sync::Arc<dyn AuditStore>> {
    let url = match &args.url {
        Some(url) => {
            StoreUrl::parse(url, Path::new(".")).map_err(|e| anyhow::anyhow!("--url: {e}"))?
        }
        None => match configured(args)? {
            Some(audit) => audit.url,
            None => bail!("no audit store given: pass --config FILE (the gateway's configuration), --url sqlite://PATH or --url postgres://..., or set CAREWALL__AUDIT__URL"),
        },
    };
    if let StoreUrl::Sqlite(p) = &url {
        // Opening would create an empty database; a typo should not.
        if !p.exists() {
            let from = if args.url.is_some() {
                "--url"
            } else {
                "audit.url (from the configuration)"
            };
            bail!("{from}: no audit database at {}", p.display());
        }
    }
    Ok(open_store(&url).await?)
}

fn keyring(args: &StoreArgs) -> anyhow::Result<Option<Keyring>> {
    let text = match (&args.key, &args.key_file) {
        (Some(k), _) => Some(k.clone()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("--key-file: cannot read {}", f.display()))?,
        ),
        (None, None) => None,
    };
    let Some(text) = text else {
        if !args.previous_keys.is_empty() {
            bail!(
                "--previous-key needs a current key too (--key or CAREWALL__AUDIT__ENCRYPTION_KEY)"
            );
        }
        // The configured keys (current and previous), when there is a
        // configuration; with --url but a broken default config, go on
        // without text rather than refuse to list.
        return match configured(args) {
            Ok(audit) => Ok(audit.and_then(|a| a.keyring)),
            Err(e) if args.config.is_none() && args.url.is_some() => {
                eprintln!("warning: no key from the configuration: {e}");
                Ok(None)
            }
            Err(e) => Err(e),
        };
    };
    let mut ring = Keyring::new(Key::from_base64(&text, "--key")?);
    for (i, k) in args.previous_keys.iter().enumerate() {
        ring = ring.with_previous(Key::from_base64(k, &format!("--previous-key #{}", i + 1))?);
    }
    Ok(Some(ring))
}

fn time_arg(name: &str, v: &Option<String>, upper: bool) -> anyhow::Result<Option<i64>> {
    v.as_deref()
        .map(|s| {
            parse_time_bound(s, upper).ok_or_else(|| {
                anyhow::anyhow!("--{name}: expected RFC 3339 (2026-01-31T12:00:00Z), a date (2026-01-31, that day in UTC) or epoch ms, got `{s}`")
            })
        })
        .transpose()
}

async fn list(a: ListArgs) -> anyhow::Result<()> {
    if !(1..=500).contains(&a.limit) {
        bail!("--limit: must be in 1..=500, got {}", a.limit);
    }
    let filter = ListFilter {
        reviewed: a.reviewed,
        limit: a.limit,
        ..a.filter.filter()?
    };
    let store = open(&a.store).await?;
    let page = store.list(&filter).await?;
    let mut out = std::io::stdout().lock();
    if a.json {
        for r in &page.items {
            writeln!(out, "{}", serde_json::to_string(&r.view(None, None))?)?;
        }
    } else {
        writeln!(
            out,
            "{:<24}  {:<36}  {:<23}  {:<8}  {:<6}  {:>5}  reviewed",
            "time", "request_id", "category", "action", "shadow", "score"
        )?;
        for r in &page.items {
            writeln!(
                out,
                "{:<24}  {:<36}  {:<23}  {:<8}  {:<6}  {:>5.3}  {}",
                rfc3339(r.time_ms),
                r.request_id,
                r.category.key(),
                r.action,
                r.shadow,
                r.scores.get(r.category),
                r.review.as_ref().map_or("-", |v| v.label.key()),
            )?;
        }
        if page.next_cursor.is_some() {
            writeln!(
                out,
                "(more records: raise --limit or narrow with --since/--until)"
            )?;
        }
    }
    store.close().await?;
    Ok(())
}

async fn show(a: ShowArgs) -> anyhow::Result<()> {
    let ring = keyring(&a.store)?;
    let store = open(&a.store).await?;
    let Some(r) = store.get(&a.request_id).await? else {
        bail!("no audit record with request_id `{}`", a.request_id);
    };
    let (text, err) = match r.open_text(ring.as_ref()) {
        Ok(t) => (t, None),
        Err(e) => (None, Some(e.to_string())),
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&r.view(text, err.clone()))?
    );
    store.close().await?;
    if let Some(e) = err {
        bail!("{e}");
    }
    Ok(())
}

async fn export(a: ExportArgs) -> anyhow::Result<()> {
    let ring = keyring(&a.store)?;
    if ring.is_none() {
        bail!("export needs the encryption key to open the text: pass --key, set CAREWALL__AUDIT__ENCRYPTION_KEY, or --config FILE with audit.encryption_key_file");
    }
    let filter = a.filter.filter()?;
    let store = open(&a.store).await?;
    let e = reviewed_jsonl(store.as_ref(), ring.as_ref(), &filter).await?;
    match &a.out {
        Some(p) => std::fs::write(p, &e.jsonl)
            .with_context(|| format!("--out: cannot write {}", p.display()))?,
        None => std::io::stdout().lock().write_all(&e.jsonl)?,
    }
    eprintln!(
        "exported {} reviewed records{}",
        e.lines,
        if e.skipped > 0 {
            format!(
                " ({} skipped: no stored text or a key that is not loaded)",
                e.skipped
            )
        } else {
            String::new()
        }
    );
    store.close().await?;
    Ok(())
}

async fn purge(a: PurgeArgs) -> anyhow::Result<()> {
    if a.older_than_days == 0 {
        bail!("--older-than-days: must be at least 1");
    }
    let store = open(&a.store).await?;
    let cutoff = unix_ms(std::time::SystemTime::now()) - i64::from(a.older_than_days) * 86_400_000;
    let n = store.purge_before(cutoff).await?;
    println!("purged {n} records older than {}", rfc3339(cutoff));
    store.close().await?;
    Ok(())
}
