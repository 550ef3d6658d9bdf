//! `carewall mock-upstream --listen ADDR`: the demo's built-in replay
//! upstream on its own, an OpenAI-compatible provider for the compose stack
//! and for trying the gateway without an API key.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct MockUpstreamArgs {
    /// Address to serve on; the OpenAI base URL is `http://ADDR/v1`.
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub listen: String,
    /// Delay between streamed pieces of the replayed replies.
    #[arg(long, default_value_t = 40)]
    pub piece_delay_ms: u64,
}

pub fn run(args: MockUpstreamArgs) -> anyhow::Result<()> {
    let listen: SocketAddr = args.listen.parse().map_err(|e| {
        anyhow::anyhow!(
            "--listen: `{}` is not an address ({e}); e.g. 0.0.0.0:9000",
            args.listen
        )
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let addr = crate::demo::start_replay_on(listen, Duration::from_millis(args.piece_delay_ms))
            .await
            .with_context(|| format!("--listen: cannot listen on {listen}"))?;
        // Scripts read the address from this line.
        println!("carewall mock upstream listening on http://{addr}/v1");
        super::serve::shutdown_signal().await;
        Ok(())
    })
}
