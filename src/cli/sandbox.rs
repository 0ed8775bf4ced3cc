//! `refund-worker sandbox`: the provider sandbox on its own port.

use super::run::wait_for_signal;
use anyhow::Context;
use refund_worker::config::LogFormat;
use refund_worker::sandbox::{Sandbox, SandboxConfig};
use refund_worker::telemetry;

pub(crate) async fn run(addr: String, config: SandboxConfig) -> anyhow::Result<()> {
    telemetry::init(LogFormat::Auto, "info");
    let sandbox = Sandbox::new(config);
    let bound = sandbox
        .spawn(&addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(%bound, "sandbox serving Hyp Pay at /p/, CreditGuard at /xpo/Relay, Paynet at /v1/transaction/reversed_request");
    wait_for_signal().await;
    Ok(())
}
