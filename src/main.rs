//! The `refund-worker` command line: its definition and the dispatch to the
//! handlers in `cli/`; everything else is in the library.

mod cli;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cli::ops::{DlqCommand, RefundsCommand};
use refund_worker::client;
use refund_worker::config::{ConfigError, LogFormat, Settings};
use refund_worker::sandbox::{SandboxConfig, Seed};
use refund_worker::secret::Secret;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// jemalloc instead of glibc's malloc: a fifth of the worker's CPU was in
/// malloc and free, much of it waiting for the lock of the arena a block
/// came from when another thread frees it. Its options (kept small enough
/// for the 64 MiB peak RSS at prefetch 256) are in `.cargo/config.toml`.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "refund-worker",
    version,
    about = "Executes refund commands from RabbitMQ exactly once"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker.
    Run {
        /// A TOML file layered over config/default.toml (environment variables
        /// REFUND_WORKER__SECTION__KEY override both).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Log format (overrides log.format).
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
    /// Run the provider sandbox (Hyp Pay at /p/).
    Sandbox {
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
    },
    /// Publish command files (JSON) to the commands exchange, with confirms.
    Publish {
        /// Broker URL.
        #[arg(long, env = "REFUND_WORKER__AMQP__URL", default_value = DEFAULT_AMQP, hide_env_values = true)]
        amqp_url: String,
        /// Commands exchange.
        #[arg(long, default_value = "refunds.commands")]
        exchange: String,
        /// Command files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Copy a single node's store into PostgreSQL (growing into replicas).
    Store {
        #[command(subcommand)]
        command: cli::admin::StoreCommand,
    },
    /// Move a single node's classic queues to quorum queues.
    Queues {
        #[command(subcommand)]
        command: cli::admin::QueuesCommand,
    },
    /// Inspect, replay and purge the dead-letter queue.
    Dlq {
        /// A TOML file layered over config/default.toml (for amqp.*).
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        /// The running worker's HTTP address (default: http.addr of the configuration).
        #[arg(long, global = true, env = "REFUND_WORKER_URL")]
        worker_url: Option<String>,
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Inspect and resolve refunds through the running worker's HTTP API.
    Refunds {
        /// A TOML file layered over config/default.toml (for
        /// http.operator_token; REFUND_WORKER__HTTP__OPERATOR_TOKEN works too).
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        /// The running worker's HTTP address (default: http.addr of the configuration).
        #[arg(long, global = true, env = "REFUND_WORKER_URL")]
        worker_url: Option<String>,
        #[command(subcommand)]
        command: RefundsCommand,
    },
    /// Benchmark: the worker against a baseline relay on the same broker.
    Bench {
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
        /// Run the provider-pressure scenarios instead: a burst for a
        /// rate-limited account with another account behind it (with and
        /// without the per-account share), and a provider outage (breaker
        /// on and off).
        #[arg(long)]
        pressure: bool,
        /// Pressure: refunds in the burst.
        #[arg(long, default_value_t = 5000)]
        burst: usize,
        /// Pressure: seconds the provider is down.
        #[arg(long, default_value_t = 60)]
        outage_secs: u64,
        /// Replicas on PostgreSQL instead (with --replicas N): PostgreSQL
        /// against sled at 0 ms, one replica against N at the first
        /// latency above 0 (200 ms unless given), and a replica killed
        /// mid-drain. E.g. `bench --backend postgres --replicas 3 --n 4000`.
        #[arg(long, value_parser = ["sled", "postgres"], default_value = "sled")]
        backend: String,
        /// Replicas for --backend postgres.
        #[arg(long, default_value_t = 3)]
        replicas: usize,
        /// Worker and relay drains per configuration, taking turns (the
        /// relay alone varies by about a quarter between runs).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Run this worker binary instead of this one (to compare two
        /// builds in one run; the relay is always this binary's).
        #[arg(long, hide = true)]
        worker_exe: Option<PathBuf>,
    },
    /// The benchmark's baseline relay as a process of its own (used by
    /// `bench`, so that its CPU is measured like the worker's).
    #[command(hide = true)]
    BenchRelay {
        /// The run's configuration file (written by `bench`).
        #[arg(long)]
        config: PathBuf,
        /// Messages to relay.
        #[arg(long)]
        n: usize,
    },
    /// The reconciliation report: per provider account, day and currency,
    /// counts and sums of succeeded, failed, in-doubt and pending refunds.
    Report {
        /// First day (YYYY-MM-DD, UTC).
        #[arg(long)]
        from: String,
        /// Last day (YYYY-MM-DD, UTC), included.
        #[arg(long)]
        to: String,
        /// table, csv or json.
        #[arg(long, default_value = "table", value_parser = ["table", "csv", "json"])]
        format: String,
        /// A TOML file layered over config/default.toml (for http.operator_token).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The running worker's HTTP address (default: http.addr of the configuration).
        #[arg(long, env = "REFUND_WORKER_URL")]
        worker_url: Option<String>,
    },
    /// Start a private RabbitMQ cluster on this machine (for trying and
    /// testing several replicas); prints its amqp.url and runs until Ctrl-C.
    LocalCluster {
        /// Nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
    /// Print outcome events as they are published (one line each).
    Events {
        /// Broker URL.
        #[arg(long, env = "REFUND_WORKER__AMQP__URL", default_value = DEFAULT_AMQP, hide_env_values = true)]
        amqp_url: String,
        /// Events exchange.
        #[arg(long, default_value = "refunds.events")]
        exchange: String,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
}

const DEFAULT_AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Runs the command; an error is one line on stderr (never a backtrace,
/// whatever `RUST_BACKTRACE` says) and exit status 2 for a configuration
/// error, 1 for anything else.
fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // A configuration error's text already holds its cause; other
            // errors print their chain of context.
            let (line, code) = match error.downcast_ref::<ConfigError>() {
                Some(config) => (config.to_string(), 2),
                None => (format!("{error:#}"), 1),
            };
            eprintln!("refund-worker: {}", line.replace('\n', " "));
            ExitCode::from(code)
        }
    }
}

/// A multi-thread runtime with `threads` workers (`None`: one per core).
fn runtime(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = threads {
        builder.worker_threads(threads);
    }
    builder
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn execute(cli: Cli) -> anyhow::Result<()> {
    if let Command::Run { config, log_format } = cli.command {
        // The worker's runtime is sized by its configuration
        // (`runtime.worker_threads`), so the configuration comes first.
        let settings = Settings::load(config.as_deref())?;
        return runtime(settings.runtime_threads())?.block_on(cli::run::run(settings, log_format));
    }
    runtime(None)?.block_on(async move {
        match cli.command {
            Command::Run { .. } => unreachable!("handled above"),
            Command::Sandbox {
                addr,
                seed,
                latency_ms,
                hyp_masof,
                hyp_pass_p,
                hyp_z_pass,
                cg_user,
                cg_password,
                cg_terminal,
                paynet_secret,
                paynet_callback_delay_ms,
            } => {
                let seed = match seed {
                    Some(path) => Seed::from_file(&path).map_err(anyhow::Error::msg)?,
                    None => Seed::default_seed(),
                };
                let config = SandboxConfig {
                    hyp_masof,
                    hyp_pass_p,
                    hyp_z_pass,
                    cg_user,
                    cg_password,
                    cg_terminal,
                    paynet_secret,
                    paynet_callback_delay: Duration::from_millis(paynet_callback_delay_ms),
                    latency: Duration::from_millis(latency_ms),
                    seed,
                };
                cli::sandbox::run(addr, config).await
            }
            Command::Publish {
                amqp_url,
                exchange,
                files,
            } => {
                let mut bodies = Vec::new();
                for file in &files {
                    bodies.push(
                        std::fs::read(file)
                            .with_context(|| format!("reading {}", file.display()))?,
                    );
                }
                client::publish(&Secret::new(amqp_url), &exchange, &bodies).await?;
                eprintln!("published {} command(s) to {exchange}", bodies.len());
                Ok(())
            }
            Command::Report {
                from,
                to,
                format,
                config,
                worker_url,
            } => cli::ops::report(config, worker_url.as_deref(), &from, &to, &format).await,
            Command::LocalCluster { nodes } => cli::run::local_cluster(nodes).await,
            Command::Events {
                amqp_url,
                exchange,
                count,
            } => Ok(client::tail_events(&Secret::new(amqp_url), &exchange, count).await?),
            Command::Store { command } => cli::admin::store(command).await,
            Command::Queues { command } => cli::admin::queues(command).await,
            Command::Dlq {
                config,
                worker_url,
                command,
            } => cli::ops::dlq(config, worker_url.as_deref(), command).await,
            Command::Refunds {
                config,
                worker_url,
                command,
            } => cli::ops::refunds(config, worker_url.as_deref(), command).await,
            Command::BenchRelay { config, n } => {
                refund_worker::bench::relay_process(&config, n).await
            }
            Command::Bench {
                n,
                prefetch,
                latency_ms,
                amqp_url,
                json,
                plot,
                quiet,
                pressure,
                burst,
                outage_secs,
                rounds,
                worker_exe,
                backend,
                replicas,
            } => {
                let options = refund_worker::bench::BenchOptions {
                    pressure: pressure.then_some(refund_worker::bench::PressureOptions {
                        burst,
                        outage: Duration::from_secs(outage_secs),
                    }),
                    n,
                    prefetch,
                    latency_ms,
                    amqp_url,
                    json: Some(json),
                    plot: Some(plot),
                    quiet,
                    worker_exe: match worker_exe {
                        Some(path) => path,
                        None => std::env::current_exe().context("locating this executable")?,
                    },
                    rounds,
                };
                if backend == "postgres" {
                    refund_worker::bench::replicas::run(&options, replicas.max(1)).await?;
                } else {
                    refund_worker::bench::run(&options).await?;
                }
                Ok(())
            }
        }
    })
}
