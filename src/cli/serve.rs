//! `carewall serve --config FILE`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use crate::admin::AdminState;
use crate::audit::gateway::{default_thresholds, GatewayAuditSink};
use crate::audit::AuditSink;
use crate::classifier::{self, Classifier, ClassifyError, ClassifyFuture, Pair};
use crate::config::Config;
use crate::moderation::{ExchangeSink, NoopSink};
use crate::policy::PolicySet;
use crate::proxy::{self, AppState};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Configuration file (default: config/carewall.toml if it exists).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let (config, policies) = Config::load_all(&Config::sources(args.config.as_deref()))?;
    let telemetry = crate::logging::init(&config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let served = rt.block_on(serve_audited(config, policies, shutdown_signal(), |_| {}));
    // Last in the shutdown sequence: in-flight requests have drained and the
    // audit queue is written, so spans and metrics are all buffered.
    // Blocking, hence outside the runtime.
    crate::logging::shutdown(telemetry);
    served
}

/// [`serve`] with the audit trail and the review console as configured
/// (`[audit]`, `[admin]`): opens the store, records every moderated
/// exchange, serves `/admin`, and on shutdown (after streams drained)
/// writes everything still queued and closes the store.
pub async fn serve_audited(
    config: Config,
    policies: PolicySet,
    shutdown: impl std::future::Future<Output = ()>,
    on_bound: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    let (sink, store) = if config.audit.enabled {
        let (sink, store) = AuditSink::open(&config.audit).await.with_context(|| {
            format!(
                "audit.url: could not open the audit store {} (set audit.enabled = false to run without an audit trail)",
                config.audit.url.display_safe()
            )
        })?;
        tracing::info!(store = %config.audit.url.display_safe(), text = config.audit.text.as_str(), admin_token = config.admin.token.is_some(), "audit trail on; review console at /admin");
        (sink, Some(store))
    } else {
        tracing::info!("audit trail off (audit.enabled = false)");
        (AuditSink::disabled(), None)
    };
    {
        // Audit queue depth and drops on /metrics and OTLP.
        let (depth, dropped) = (sink.clone(), sink.clone());
        crate::telemetry::metrics().watch_audit(
            move || depth.stats().queue_depth as usize,
            move || dropped.stats().dropped,
        );
    }
    let admin = store.as_ref().map(|store| {
        AdminState::new(store.clone(), config.audit.keyring.clone(), &config.admin)
            .with_sink(sink.clone())
    });
    let exchange: Arc<dyn ExchangeSink> = if sink.is_enabled() {
        Arc::new(GatewayAuditSink::new(sink.clone()))
    } else {
        Arc::new(NoopSink)
    };
    let served = serve_with(config, policies, exchange, admin, shutdown, on_bound).await;
    // Streams have drained (or start-up failed): nothing more is submitted.
    let stats = sink.shutdown().await;
    if sink.is_enabled() {
        tracing::info!(
            written = stats.written,
            dropped = stats.dropped,
            failed = stats.failed,
            "audit queue drained"
        );
    }
    if let Some(store) = store {
        if let Err(e) = store.close().await {
            tracing::error!(error = %e, "closing the audit store failed");
        }
    }
    served
}

/// Stands in when moderation is off and no classifier could be built, so a
/// pass-through deployment does not need the model files.
struct Unavailable(String);

impl Classifier for Unavailable {
    fn classify(&self, _pair: Pair) -> ClassifyFuture<'_> {
        Box::pin(std::future::ready(Err(ClassifyError::Unavailable)))
    }
    fn name(&self) -> &str {
        &self.0
    }
    fn is_ready(&self) -> bool {
        false
    }
}

/// Build the classifier the configuration asks for. With moderation off, a
/// failure is logged and the gateway runs as a pass-through without one.
pub fn build_classifier(config: &Config) -> anyhow::Result<Arc<dyn Classifier>> {
    match classifier::build(&config.classifier) {
        Ok(c) => Ok(c),
        Err(e) if !config.moderation.enabled => {
            tracing::warn!(error = %e, "no classifier (moderation is off, so chat still passes through)");
            Ok(Arc::new(Unavailable("unavailable".into())))
        }
        Err(e) => Err(anyhow::anyhow!("classifier: {e}")),
    }
}

/// Build the state, bind, announce the address on stdout, and serve until
/// `shutdown`. SIGHUP reloads policies. `on_bound` sees the bound address
/// (the demo prints its instructions there).
pub async fn serve(
    config: Config,
    policies: PolicySet,
    sink: Arc<dyn ExchangeSink>,
    shutdown: impl std::future::Future<Output = ()>,
    on_bound: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    serve_with(config, policies, sink, None, shutdown, on_bound).await
}

/// [`serve`], also serving the review console and API at `/admin` when
/// `admin` is given (its summary reads the live default policy's
/// thresholds, so a SIGHUP reload shows at once).
pub async fn serve_with(
    config: Config,
    policies: PolicySet,
    sink: Arc<dyn ExchangeSink>,
    admin: Option<AdminState>,
    shutdown: impl std::future::Future<Output = ()>,
    on_bound: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    let classifier = build_classifier(&config)?;
    let state = AppState::new(config, policies, classifier, sink)?;
    if let Some(admin) = admin {
        // Weak: the state owns the admin state, which must not keep the
        // state alive.
        let weak = Arc::downgrade(&state);
        let admin = admin.with_thresholds(Arc::new(move || {
            weak.upgrade()
                .map(|s| default_thresholds(&s.policies.load()))
                .unwrap_or([None; 8])
        }));
        // Fresh state: the cell is empty.
        let _ = state.admin.set(admin);
    }
    let listener = proxy::bind(&state.config.server).await?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let scheme = if state.config.server.tls.is_some() {
        "https"
    } else {
        "http"
    };
    // Tests and scripts read the port from this line.
    println!("carewall listening on {scheme}://{addr}");
    tracing::info!(%addr, moderation = state.config.moderation.enabled, classifier = state.moderator.classifier().name(), "listening");
    if !state.client_keys.load().is_enabled() && !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "server.client_keys is not set: any client that can reach this address uses the upstream key; set it unless something in front of the gateway authenticates clients"
        );
    }
    on_bound(addr);
    for w in state.policy_warnings() {
        tracing::warn!(warning = %w, "configuration warning (carewall check-config lists them)");
    }
    spawn_reload_on_sighup(state.clone());
    proxy::serve(state, listener, shutdown).await?;
    Ok(())
}

#[cfg(unix)]
fn spawn_reload_on_sighup(state: Arc<AppState>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; policy reload is off");
        return;
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match state.reload_policies() {
                Ok(names) => tracing::info!(policies = ?names, "policies reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "policy reload failed; keeping the previous policies")
                }
            }
            match state.reload_client_keys() {
                Ok(None) => {}
                Ok(Some(keys)) => tracing::info!(keys, "client keys reloaded"),
                Err(e) => tracing::error!(
                    error = %e,
                    "client key reload failed; keeping the previous keys"
                ),
            }
        }
    });
}

#[cfg(not(unix))]
fn spawn_reload_on_sighup(_state: Arc<AppState>) {}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown signal received");
}
