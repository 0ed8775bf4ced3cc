//! `refund-bench`: the benchmark (see `docs/performance.md`). It runs the
//! product binary (`refund-worker run`, found next to this one unless
//! `--worker-exe` names another) and its own relay as child processes, so
//! that each one's CPU is measured alone.

use anyhow::Context;
use clap::{Parser, Subcommand};
use refund_bench::{BenchOptions, PressureOptions};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(version, about = "refund-worker's benchmark")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Command {
    /// The baseline relay as a process of its own (started by the benchmark).
    #[command(hide = true)]
    Relay {
        /// The run's configuration file (written by the benchmark).
        #[arg(long)]
        config: PathBuf,
        /// Messages to relay.
        #[arg(long)]
        n: usize,
    },
    /// What N tombstones of pruned refunds take in a sled store on disk.
    Tombstones {
        /// Tombstones to write.
        #[arg(long, default_value_t = 1_000_000)]
        n: u64,
    },
}

#[derive(clap::Args)]
struct Bench {
    /// Commands per drain (make each drain last ≥ 10 s on your machine).
    #[arg(long, default_value_t = 10_000)]
    n: usize,
    /// Prefetch values to sweep.
    #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
    prefetch: Vec<u16>,
    /// Provider latencies to sweep (ms).
    #[arg(long, value_delimiter = ',', default_value = "0,50")]
    latency_ms: Vec<u64>,
    /// Use this broker instead of starting a private node.
    #[arg(long)]
    amqp_url: Option<String>,
    /// Write the results as JSON.
    #[arg(long, default_value = "bench.json")]
    json: PathBuf,
    /// Write the plot (SVG).
    #[arg(long, default_value = "bench.svg")]
    plot: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// The provider-pressure scenarios instead: a burst for a rate-limited
    /// account with another account behind it, and a provider outage.
    #[arg(long)]
    pressure: bool,
    /// Pressure: refunds in the burst.
    #[arg(long, default_value_t = 5000)]
    burst: usize,
    /// Pressure: seconds the provider is down.
    #[arg(long, default_value_t = 60)]
    outage_secs: u64,
    /// Replicas on PostgreSQL instead (with --replicas N).
    #[arg(long, value_parser = ["sled", "postgres"], default_value = "sled")]
    backend: String,
    /// Replicas for --backend postgres.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Worker and relay drains per configuration, taking turns.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The worker binary (default: refund-worker next to this binary).
    #[arg(long)]
    worker_exe: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Some(Command::Relay { config, n }) => {
                return refund_bench::relay_process(&config, n).await
            }
            Some(Command::Tombstones { n }) => return refund_bench::tombstones::run(n).await,
            None => {}
        }
        let b = cli.bench;
        let worker_exe = match b.worker_exe {
            Some(path) => path,
            None => std::env::current_exe()
                .context("locating this executable")?
                .with_file_name("refund-worker"),
        };
        anyhow::ensure!(
            worker_exe.exists(),
            "{} not found: build it (cargo build --release -p refund-worker) or give --worker-exe",
            worker_exe.display()
        );
        let options = BenchOptions {
            pressure: b.pressure.then_some(PressureOptions {
                burst: b.burst,
                outage: Duration::from_secs(b.outage_secs),
            }),
            n: b.n,
            prefetch: b.prefetch,
            latency_ms: b.latency_ms,
            amqp_url: b.amqp_url,
            json: Some(b.json),
            plot: Some(b.plot),
            quiet: b.quiet,
            worker_exe,
            rounds: b.rounds,
        };
        if b.backend == "postgres" {
            refund_bench::replicas::run(&options, b.replicas.max(1)).await?;
        } else {
            refund_bench::run(&options).await?;
        }
        Ok(())
    })
}
