//! The `refund-worker` command line: its definition and the dispatch to the
//! handlers in `cli/`; everything else is in the library.

mod cli;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cli::ops::{DlqCommand, RefundsCommand};
use refund_worker::config::{ConfigError, LogFormat, Settings};
use refund_worker::ops::client;
use refund_worker::values::secret::Secret;
use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Probe the running worker's readiness (`/readyz` on http.addr): exit
    /// 0 when ready, 1 otherwise. For container health checks, with no
    /// shell tool in the image.
    Health {
        /// A TOML file layered over config/default.toml (for http.addr).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The worker's HTTP address (default: http.addr of the configuration).
        #[arg(long, env = "REFUND_WORKER_URL")]
        worker_url: Option<String>,
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
            Command::Events {
                amqp_url,
                exchange,
                count,
            } => Ok(client::tail_events(&Secret::new(amqp_url), &exchange, count).await?),
            Command::Health { config, worker_url } => {
                cli::ops::health(config, worker_url.as_deref()).await
            }
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
        }
    })
}
