//! `refund-sandbox`: the provider sandbox on its own port (Hyp Pay at `/p/`,
//! CreditGuard at `/xpo/Relay`, Paynet at `/v1/transaction/reversed_request`,
//! control endpoints under `/_sandbox/`).

use anyhow::Context;
use clap::Parser;
use refund_sandbox::{Sandbox, SandboxConfig, Seed};
use std::path::PathBuf;
use std::time::Duration;

/// Run the provider sandbox.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:8090", env = "SANDBOX_ADDR")]
    addr: String,
    /// JSON file of original transactions (default: examples/sandbox-seed.json, built in).
    #[arg(long)]
    seed: Option<PathBuf>,
    /// Delay added before every provider answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Hyp Pay terminal number the sandbox accepts.
    #[arg(long, default_value = "0010131918")]
    hyp_masof: String,
    /// Hyp Pay password the sandbox accepts.
    #[arg(
        long,
        default_value = "sandbox-pass",
        env = "SANDBOX_HYP_PASS_P",
        hide_env_values = true
    )]
    hyp_pass_p: String,
    /// Hyp Pay credit password (zPass) the sandbox accepts for payouts.
    #[arg(
        long,
        default_value = "sandbox-zpass",
        env = "SANDBOX_HYP_Z_PASS",
        hide_env_values = true
    )]
    hyp_z_pass: String,
    /// CreditGuard user the sandbox accepts.
    #[arg(long, default_value = "sandbox-user")]
    cg_user: String,
    /// CreditGuard password the sandbox accepts.
    #[arg(
        long,
        default_value = "sandbox-pass",
        env = "SANDBOX_CG_PASSWORD",
        hide_env_values = true
    )]
    cg_password: String,
    /// CreditGuard terminal number.
    #[arg(long, default_value = "0882819014")]
    cg_terminal: String,
    /// Paynet secret key the sandbox accepts.
    #[arg(
        long,
        default_value = "sandbox-secret",
        env = "SANDBOX_PAYNET_SECRET",
        hide_env_values = true
    )]
    paynet_secret: String,
    /// Delay before Paynet's final answer is posted to succeedUrl (ms).
    #[arg(long, default_value_t = 200)]
    paynet_callback_delay_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    tracing_init();
    let seed = match a.seed {
        Some(path) => Seed::from_file(&path).map_err(anyhow::Error::msg)?,
        None => Seed::default_seed(),
    };
    let config = SandboxConfig {
        hyp_masof: a.hyp_masof,
        hyp_pass_p: a.hyp_pass_p,
        hyp_z_pass: a.hyp_z_pass,
        cg_user: a.cg_user,
        cg_password: a.cg_password,
        cg_terminal: a.cg_terminal,
        paynet_secret: a.paynet_secret,
        paynet_callback_delay: Duration::from_millis(a.paynet_callback_delay_ms),
        latency: Duration::from_millis(a.latency_ms),
        seed,
    };
    let sandbox = Sandbox::new(config);
    let bound = sandbox
        .spawn(&a.addr)
        .await
        .with_context(|| format!("binding {}", a.addr))?;
    tracing::info!(%bound, "sandbox serving Hyp Pay at /p/, CreditGuard at /xpo/Relay, Paynet at /v1/transaction/reversed_request");
    eprintln!("sandbox listening on {bound}");
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// The worker's log setup, so the sandbox's lines look the same.
fn tracing_init() {
    refund_worker::observability::telemetry::init(refund_worker::config::LogFormat::Auto, "info");
}
