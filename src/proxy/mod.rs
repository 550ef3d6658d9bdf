//! The HTTP side: listener, routing, upstream client, SSE framing, bodies.
//!
//! Invariant: only `proxy` touches hyper and rustls. Handlers stay thin:
//! they read the request, pick the policy snapshot, and hand plain values to
//! `moderation`; every error becomes a response in one place
//! ([`body::error_response`]).

pub mod auth;
pub mod body;
mod handlers;
pub mod server;
pub mod sse;
pub mod upstream;

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::classifier::Classifier;
use crate::config::{Config, ConfigError};
use crate::error::GatewayError;
use crate::moderation::{ExchangeSink, Moderator};
use crate::policy::PolicySet;

pub use handlers::handle;
pub use server::{bind, serve};

/// Everything a request needs, shared by all connections.
pub struct AppState {
    pub config: Arc<Config>,
    /// Swapped whole on SIGHUP; a request loads it once and keeps its policy
    /// for its whole life, so reloads never change an in-flight stream.
    pub policies: ArcSwap<PolicySet>,
    /// The keys `/v1/*` accepts; swapped whole when SIGHUP re-reads
    /// `server.client_keys_file`.
    pub client_keys: ArcSwap<crate::config::ClientKeys>,
    pub moderator: Arc<Moderator>,
    pub upstream: Arc<upstream::UpstreamClient>,
    /// Receives every moderated exchange (the audit log plugs in here).
    pub sink: Arc<dyn ExchangeSink>,
    /// Telemetry instruments (`/metrics`); disabled unless
    /// `telemetry::init` ran in this process.
    pub metrics: crate::telemetry::Metrics,
    /// The review API and console under `/admin`; set once at start-up
    /// (unset: `/admin` answers 404).
    pub admin: std::sync::OnceLock<crate::admin::AdminState>,
}

impl AppState {
    /// Build the shared state from a validated configuration, its policies,
    /// a classifier (see [`crate::classifier::build`]) and an exchange sink
    /// ([`crate::moderation::NoopSink`] when nothing records exchanges).
    pub fn new(
        config: Config,
        policies: PolicySet,
        classifier: Arc<dyn Classifier>,
        sink: Arc<dyn ExchangeSink>,
    ) -> Result<Arc<AppState>, GatewayError> {
        let upstream = Arc::new(upstream::UpstreamClient::new(&config.upstream)?);
        let sink: Arc<dyn ExchangeSink> = if config.logging.log_conversation_text {
            Arc::new(crate::moderation::sink::ConversationLogSink(sink))
        } else {
            sink
        };
        let metrics = crate::telemetry::metrics();
        watch_classifier(&metrics, classifier.as_ref());
        let moderator = Arc::new(Moderator::new(
            classifier,
            config.moderation.max_concurrent_classifications,
            config.classifier.timeout,
        ));
        Ok(Arc::new(AppState {
            client_keys: ArcSwap::from_pointee(config.server.client_keys.clone()),
            config: Arc::new(config),
            policies: ArcSwap::from_pointee(policies),
            moderator,
            upstream,
            sink,
            metrics,
            admin: std::sync::OnceLock::new(),
        }))
    }

    /// Re-read the policies folder (guard lists included) and swap the new
    /// set in if it is valid and every policy a client key names is in it;
    /// otherwise keep the current one and return why. The keys checked are
    /// those a following [`AppState::reload_client_keys`] would load (when
    /// that file is valid), so renaming a policy in both at once works.
    pub fn reload_policies(&self) -> Result<Vec<String>, ConfigError> {
        let set = PolicySet::load(&self.config.moderation)?;
        let fresh = self.fresh_client_keys();
        let keys = match &fresh {
            Some(Ok(k)) => k,
            _ => &**self.client_keys.load(),
        };
        let problems = keys.check_policies(&set);
        if !problems.is_empty() {
            return Err(ConfigError(problems));
        }
        let names = set.names();
        self.policies.store(Arc::new(set));
        Ok(names)
    }

    /// Re-read `server.client_keys_file` and swap the new keys in if they
    /// are all valid and name only loaded policies; otherwise keep the
    /// current ones and return why. `Ok(None)` when no file is configured
    /// (nothing to reload).
    pub fn reload_client_keys(&self) -> Result<Option<usize>, ConfigError> {
        let Some(fresh) = self.fresh_client_keys() else {
            return Ok(None);
        };
        let keys = fresh.map_err(ConfigError)?;
        let problems = keys.check_policies(&self.policies.load());
        if !problems.is_empty() {
            return Err(ConfigError(problems));
        }
        let n = keys.count();
        self.client_keys.store(Arc::new(keys));
        Ok(Some(n))
    }

    /// The client keys as the sources say now; `None` without a keys file.
    fn fresh_client_keys(&self) -> Option<Result<crate::config::ClientKeys, Vec<String>>> {
        let sources = &self.config.server.client_key_sources;
        sources.file.as_ref()?;
        Some(sources.load())
    }

    /// What an operator should fix but the gateway can run with: header
    /// values that select a weaker policy than the default, keys allowed a
    /// policy weaker than their own, expired keys.
    pub fn policy_warnings(&self) -> Vec<String> {
        crate::config::policy_warnings(&self.policies.load(), &self.client_keys.load())
    }

    /// Ready to serve chat: upstream configured and, when moderation is on,
    /// the classifier loaded.
    pub fn is_ready(&self) -> bool {
        self.upstream.is_configured()
            && (!self.config.moderation.enabled || self.moderator.classifier().is_ready())
    }
}

/// Feed the classifier's micro-batch sizes and queue depth into `metrics`
/// (classifiers without a batcher have nothing to report).
fn watch_classifier(metrics: &crate::telemetry::Metrics, classifier: &dyn Classifier) {
    let Some(stats) = classifier.batch_stats() else {
        return;
    };
    let m = metrics.clone();
    // The observer slot is set once per classifier; a second AppState over
    // the same classifier keeps the first one's, which records the same.
    let _ = stats.set_observer(Arc::new(move |e: &crate::classifier::BatchEvent| {
        m.record_batch_size(e.size)
    }));
    metrics.watch_queue_depth(crate::telemetry::Queue::Classifier, move || {
        stats.queue_depth()
    });
}
