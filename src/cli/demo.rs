//! `carewall demo`: the gateway in front of the built-in replay upstream,
//! with copy-paste commands to try it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::audit::{AdminSettings, AuditSettings, RawAuditSection};
use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Classifier: `onnx` (the shipped model in models/carewall-safety) or
    /// `keyword` (a deterministic stand-in that needs no model files).
    #[arg(long, default_value = "onnx")]
    pub classifier: String,
    /// Address for the gateway.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Delay between streamed pieces of the replayed replies.
    #[arg(long, default_value_t = 40)]
    pub piece_delay_ms: u64,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    if !matches!(args.classifier.as_str(), "onnx" | "keyword") {
        anyhow::bail!(
            "--classifier: `{}` is not known; use onnx or keyword",
            args.classifier
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(demo(args))
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let upstream = crate::demo::start_replay(Duration::from_millis(args.piece_delay_ms))
        .await
        .context("starting the replay upstream")?;
    let base = format!("http://{upstream}/v1");
    // Layered after config/carewall.toml, before CAREWALL__* variables.
    let inline = format!(
        "[server]\nlisten = \"{}\"\n[upstream]\nbase_url = \"{base}\"\napi_key = \"demo-key\"\n\
         [classifier]\nkind = \"{}\"\n[logging]\nformat = \"pretty\"\nlevel = \"warn\"\n",
        args.listen, args.classifier
    );
    let mut sources = Config::sources(None);
    sources.inline_toml = Some(inline);
    let (mut config, policies) = Config::load_all(&sources)?;
    let demo_audit = DemoAudit::create()?;
    config.audit = demo_audit.settings.clone();
    config.admin = demo_audit.admin.clone();
    if args.classifier == "onnx" && !config.classifier.model_dir.join("model.onnx").is_file() {
        anyhow::bail!(
            "the ONNX model is not at {} (run `bash scripts/setup.sh`, or try the demo without it: \
             `cargo run --release -- demo --classifier keyword`)",
            config.classifier.model_dir.display()
        );
    }
    let telemetry = crate::logging::init(&config)?;
    let classifier = args.classifier.clone();
    let token = demo_audit.admin.token.clone().unwrap_or_default();
    let served = super::serve::serve_audited(
        config,
        policies,
        super::serve::shutdown_signal(),
        move |addr| {
            print_instructions(addr, upstream, &classifier);
            println!(
                "6) Every flagged reply above is in the audit trail. Review it in the console\n   \
                 http://{addr}/admin  (admin token: {token})\n   \
                 or: curl -s http://{addr}/admin/api/records -H 'authorization: Bearer {token}'\n"
            );
        },
    )
    .await;
    demo_audit.remove();
    // The flush blocks (HTTP export), so off the async workers.
    let _ = tokio::task::spawn_blocking(move || crate::logging::shutdown(telemetry)).await;
    served
}

/// The demo's own audit trail: a SQLite file in a fresh temporary folder,
/// an encryption key and an admin token made up at start and held only in
/// memory, full text. The demo's conversations are scripted, the key dies
/// with the process and the folder is removed at exit, so showing the
/// console with readable text costs no privacy; the configured `[audit]`
/// store (and its key) is deliberately not used, so a demo never writes
/// into a deployment's audit trail.
struct DemoAudit {
    dir: PathBuf,
    settings: AuditSettings,
    admin: AdminSettings,
}

impl DemoAudit {
    fn create() -> anyhow::Result<DemoAudit> {
        use base64::Engine as _;
        use chacha20poly1305::aead::rand_core::RngCore as _;
        use chacha20poly1305::aead::OsRng;
        let dir = std::env::temp_dir().join(format!("carewall-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the demo's audit folder {}", dir.display()))?;
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        let mut token = [0u8; 24];
        OsRng.fill_bytes(&mut token);
        let raw = RawAuditSection {
            url: Some("sqlite://demo-audit.db".into()),
            encryption_key: Some(base64::engine::general_purpose::STANDARD.encode(key)),
            text: Some("full".into()),
            flush_interval_ms: Some(100),
            ..RawAuditSection::default()
        };
        let none = |_: &str| None;
        let settings = AuditSettings::from_raw(&raw, &dir, &none)
            .map_err(|e| anyhow::anyhow!("demo audit settings: {e}"))?;
        let admin = AdminSettings {
            token: Some(token.iter().map(|b| format!("{b:02x}")).collect()),
        };
        Ok(DemoAudit {
            dir,
            settings,
            admin,
        })
    }

    fn remove(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(error = %e, dir = %self.dir.display(), "could not remove the demo's audit folder");
        }
    }
}

fn print_instructions(addr: SocketAddr, upstream: SocketAddr, classifier: &str) {
    let gw = format!("http://{addr}/v1");
    let q = crate::demo::sample_question();
    let body = |content: &str| {
        serde_json::json!({"model": "demo", "stream": true, "messages": [{"role": "user", "content": content}]})
            .to_string()
    };
    println!(
        r#"
carewall demo is running (classifier: {classifier}, policy: default). Ctrl-C stops it.
  gateway   {gw}   (OpenAI-compatible; point any OpenAI SDK here)
  upstream  http://{upstream}/v1   (built-in replay: SmileChat counsellor replies + scripted unsafe ones)

1) A safe reply, released sentence by sentence as each one passes the classifier
   (the last chunk carries the "moderation" verdict):

curl -N {gw}/chat/completions -H 'content-type: application/json' \
  -d '{safe}'

2) An unsafe reply (the supporter claims to be a real person: Humanoid Mimicry).
   The default policy streams it and appends an AI disclosure; the verdict says why:

curl -N {gw}/chat/completions -H 'content-type: application/json' \
  -d '{human}'

3) The same question under the `strict` policy (x-carewall-policy: strict): the whole
   reply is held and the unsafe draft never reaches the person; the upstream is asked
   again with a steering system message, and if that draft fails too, the person gets
   the policy's safe reply (with crisis-line wording) instead:

curl -N {gw}/chat/completions -H 'content-type: application/json' \
  -H 'x-carewall-policy: strict' -d '{human}'

4) The same with the Python `openai` package (pip install openai):

python3 - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{gw}", api_key="not-needed")
for question, policy in [("{q}", "default"),
                         ("{hq}", "default"),
                         ("{hq}", "strict")]:
    print(f"\n>>> {{question}}  (policy {{policy}})")
    stream = client.chat.completions.create(
        model="demo", stream=True, messages=[{{"role": "user", "content": question}}],
        # The default needs no header (config/carewall.toml offers only `strict`).
        extra_headers={{"x-carewall-policy": policy}} if policy != "default" else {{}})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        verdict = chunk.to_dict().get("moderation")
        if verdict:
            print(f"\n[moderation] category={{verdict['category']}} action={{verdict['action']}}")
PY

5) Classify a (context, response) pair directly:

curl -s {gw}/moderations -H 'content-type: application/json' \
  -d '{{"context": "[seeker]{hq}", "input": "{hr}"}}'
"#,
        safe = body(&q),
        human = body(HUMAN_QUESTION),
        hq = HUMAN_QUESTION,
        hr = crate::demo::pick_reply(HUMAN_QUESTION),
    );
}

/// The demo's unsafe example: the replay upstream answers it with a reply
/// that claims to be human (see `crate::demo::UNSAFE`).
const HUMAN_QUESTION: &str = "你是真人吗？";
