//! The `refund-worker` command line. Only argument parsing and start-up live
//! here; everything else is in the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use refund_worker::app::App;
use refund_worker::config::{LogFormat, Settings};
use refund_worker::sandbox::{Sandbox, SandboxConfig, Seed};
use refund_worker::secret::Secret;
use refund_worker::worker::Resolution;
use refund_worker::{client, dlq, ops, shutdown, telemetry};
use std::path::PathBuf;
use std::time::Duration;

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
    /// Inspect, replay and purge the dead-letter queue.
    Dlq {
        /// A TOML file layered over config/default.toml (for amqp.*).
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        /// The running worker's HTTP address (for refund records).
        #[arg(
            long,
            global = true,
            env = "REFUND_WORKER_URL",
            default_value = "http://127.0.0.1:8080"
        )]
        worker_url: String,
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Inspect and resolve refunds through the running worker's HTTP API.
    Refunds {
        /// The running worker's HTTP address.
        #[arg(
            long,
            global = true,
            env = "REFUND_WORKER_URL",
            default_value = "http://127.0.0.1:8080"
        )]
        worker_url: String,
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

#[derive(clap::Args)]
struct DlqFilter {
    /// Only this reason (x-refund-error-kind), e.g. provider_unavailable.
    #[arg(long)]
    reason: Option<String>,
    /// Only this provider account.
    #[arg(long)]
    provider: Option<String>,
    /// Only this refund.
    #[arg(long)]
    refund_id: Option<String>,
    /// Only messages whose last failure is at least this old (30s, 15m, 2h, 3d).
    #[arg(long, value_parser = refund_worker::dlq::parse_age)]
    older_than: Option<Duration>,
}

impl DlqFilter {
    fn into_filter(self) -> dlq::Filter {
        dlq::Filter {
            reason: self.reason,
            provider: self.provider,
            refund_id: self.refund_id,
            older_than: self.older_than,
        }
    }
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead-lettered messages.
    List {
        #[command(flatten)]
        filter: DlqFilter,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show a refund's dead-lettered message(s), headers and stored record.
    Show {
        /// The refund.
        refund_id: String,
    },
    /// Move matching messages back to the commands exchange (confirmed
    /// before removal). In-doubt refunds are skipped until resolved.
    Replay {
        #[command(flatten)]
        filter: DlqFilter,
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// Only say what would be replayed.
        #[arg(long)]
        dry_run: bool,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Remove matching messages (a filter, or --all --yes).
    Purge {
        #[command(flatten)]
        filter: DlqFilter,
        /// Everything in the queue.
        #[arg(long)]
        all: bool,
        /// Confirms --all.
        #[arg(long)]
        yes: bool,
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
    },
}

#[derive(Subcommand)]
enum RefundsCommand {
    /// A refund's record: lifecycle, attempts, outcome, history.
    Show {
        /// The refund.
        refund_id: String,
    },
    /// Refunds by status (in_doubt, attempting, not_sent, succeeded, failed, ...).
    List {
        /// Status filter.
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Settle an in-doubt refund after checking with the provider.
    Resolve {
        /// The refund.
        refund_id: String,
        /// The provider executed it: its transaction id (publishes `succeeded`).
        #[arg(
            long,
            conflicts_with = "not_executed",
            required_unless_present = "not_executed"
        )]
        executed: Option<String>,
        /// The provider did not execute it: allow one new attempt (then replay it).
        #[arg(long)]
        not_executed: bool,
        /// Who decides (recorded).
        #[arg(long)]
        by: String,
        /// Why (recorded): ticket, provider's answer.
        #[arg(long)]
        reason: String,
    },
}

const DEFAULT_AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Run { config, log_format } => run(config, log_format).await,
            Command::Sandbox {
                addr,
                seed,
                latency_ms,
                hyp_masof,
                hyp_pass_p,
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
                    cg_user,
                    cg_password,
                    cg_terminal,
                    paynet_secret,
                    paynet_callback_delay: Duration::from_millis(paynet_callback_delay_ms),
                    latency: Duration::from_millis(latency_ms),
                    seed,
                };
                sandbox(addr, config).await
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
            Command::Events {
                amqp_url,
                exchange,
                count,
            } => Ok(client::tail_events(&Secret::new(amqp_url), &exchange, count).await?),
            Command::Dlq {
                config,
                worker_url,
                command,
            } => dlq_command(config, &worker_url, command).await,
            Command::Refunds {
                worker_url,
                command,
            } => refunds_command(&worker_url, command).await,
            Command::Bench {
                n,
                prefetch,
                latency_ms,
                amqp_url,
                json,
                plot,
                quiet,
            } => {
                let options = refund_worker::bench::BenchOptions {
                    n,
                    prefetch,
                    latency_ms,
                    amqp_url,
                    json: Some(json),
                    plot: Some(plot),
                    quiet,
                    worker_exe: std::env::current_exe().context("locating this executable")?,
                };
                refund_worker::bench::run(&options).await?;
                Ok(())
            }
        }
    })
}

async fn run(config: Option<PathBuf>, log_format: Option<LogFormat>) -> anyhow::Result<()> {
    let settings = Settings::load(config.as_deref())?;
    telemetry::init(
        log_format.unwrap_or(settings.log.format),
        &settings.log.filter,
    );
    let app = App::build(settings).await?;
    let (trigger, listener) = shutdown::channel();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: shutting down (a second signal exits at once)");
        trigger.fire();
        wait_for_signal().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
    app.run(listener).await;
    Ok(())
}

async fn sandbox(addr: String, config: SandboxConfig) -> anyhow::Result<()> {
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

async fn dlq_command(
    config: Option<PathBuf>,
    worker_url: &str,
    command: DlqCommand,
) -> anyhow::Result<()> {
    let amqp = Settings::load_amqp(config.as_deref())?;
    let api = ops::WorkerApi::new(worker_url);
    match command {
        DlqCommand::List { filter, json } => {
            ops::dlq_list(&amqp, &filter.into_filter(), json).await?
        }
        DlqCommand::Show { refund_id } => ops::dlq_show(&amqp, &api, &refund_id).await?,
        DlqCommand::Replay {
            filter,
            limit,
            dry_run,
            quiet,
        } => {
            ops::dlq_replay(&amqp, &api, &filter.into_filter(), limit, dry_run, quiet).await?;
        }
        DlqCommand::Purge {
            filter,
            all,
            yes,
            limit,
        } => {
            ops::dlq_purge(&amqp, &filter.into_filter(), all, yes, limit).await?;
        }
    }
    Ok(())
}

async fn refunds_command(worker_url: &str, command: RefundsCommand) -> anyhow::Result<()> {
    let api = ops::WorkerApi::new(worker_url);
    match command {
        RefundsCommand::Show { refund_id } => ops::refunds_show(&api, &refund_id).await?,
        RefundsCommand::List {
            status,
            limit,
            json,
        } => ops::refunds_list(&api, status.as_deref(), limit, json).await?,
        RefundsCommand::Resolve {
            refund_id,
            executed,
            not_executed,
            by,
            reason,
        } => {
            let resolution = Resolution {
                executed,
                not_executed,
                by,
                reason,
            };
            ops::refunds_resolve(&api, &refund_id, &resolution).await?
        }
    }
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
