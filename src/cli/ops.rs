//! `refund-worker dlq …` and `refund-worker refunds …`: their arguments
//! and the dispatch to the operator commands in the library (`ops.rs`).

use anyhow::Context;
use clap::Subcommand;
use refund_worker::config::{Settings, ToolSettings};
use refund_worker::contract::command::Operation;
use refund_worker::ops::{self, dlq};
use refund_worker::worker::{Decision, Resolution};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub(crate) struct DlqFilter {
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
    #[arg(long, value_parser = refund_worker::ops::dlq::parse_age)]
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
pub(crate) enum DlqCommand {
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
    /// Correct a dead-lettered command (a typo in the provider account or
    /// the transaction) and replay it: shows the diff, records who, why and
    /// what changed (refund history and an x-refund-edits header chain).
    /// Refuses refund_id changes and in-doubt refunds.
    Edit {
        /// The refund.
        refund_id: String,
        /// A change, path=value (transaction.id="12290620", provider=hyp_pay); repeatable.
        #[arg(long = "set", required = true)]
        sets: Vec<String>,
        /// Who edits (recorded).
        #[arg(long)]
        by: String,
        /// Why (recorded).
        #[arg(long)]
        reason: String,
        /// Only show the diff.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove matching messages that name no refund (a filter, or --all
    /// --yes). Messages that carry a refund are kept unless
    /// --include-refunds --yes --by --why: then each refund's fate is
    /// recorded and its event published before its message goes (a refund
    /// not sent is abandoned: a `failed` event); a refund that may have
    /// been paid keeps its message until it is resolved.
    Purge {
        #[command(flatten)]
        filter: DlqFilter,
        /// Everything in the queue.
        #[arg(long)]
        all: bool,
        /// Also refunds that are not decided; each is recorded as abandoned.
        #[arg(long)]
        include_refunds: bool,
        /// Confirms --all and --include-refunds.
        #[arg(long)]
        yes: bool,
        /// Who purges (recorded; required with --include-refunds).
        #[arg(long)]
        by: Option<String>,
        /// Why (recorded; required with --include-refunds). `--reason` is
        /// the dead-letter reason filter.
        #[arg(long)]
        why: Option<String>,
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
    },
}

#[derive(Subcommand)]
pub(crate) enum RefundsCommand {
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
        /// What the provider performed: refund or cancel (required where the
        /// account may perform a refund as a cancel, i.e. CreditGuard).
        #[arg(long, requires = "executed", value_parser = ["refund", "cancel"])]
        performed: Option<String>,
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
    /// Give up a refund that was not sent: it is recorded as `failed`
    /// (error.kind abandoned), its reservation released, its event
    /// published. It will never be sent. A refund that may have been paid
    /// (in doubt) is refused: resolve it first.
    Abandon {
        /// The refund.
        refund_id: String,
        /// Who decides (recorded).
        #[arg(long)]
        by: String,
        /// Why (recorded).
        #[arg(long)]
        reason: String,
    },
    /// Release an over-refund reservation that nothing will settle (the
    /// refund is unknown, failed or abandoned).
    Release {
        /// The refund.
        refund_id: String,
        /// Who decides (recorded).
        #[arg(long)]
        by: String,
        /// Why (recorded).
        #[arg(long)]
        reason: String,
    },
}

/// The worker's API: `--worker-url` (or `REFUND_WORKER_URL`) when given,
/// else the `http.addr` of the same configuration the worker reads.
fn worker_api(tools: &ToolSettings, worker_url: Option<&str>) -> ops::WorkerApi {
    let url = worker_url
        .map(str::to_string)
        .unwrap_or_else(|| tools.worker_url());
    ops::WorkerApi::new(&url).with_token(tools.http.operator_token.clone())
}

pub(crate) async fn dlq(
    config: Option<PathBuf>,
    worker_url: Option<&str>,
    command: DlqCommand,
) -> anyhow::Result<()> {
    let tools = Settings::load_tools(config.as_deref())?;
    let api = worker_api(&tools, worker_url);
    let amqp = tools.amqp;
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
            let max_age = tools.retention.tombstones;
            let filter = filter.into_filter();
            ops::dlq_replay(&amqp, &api, &filter, limit, dry_run, quiet, max_age).await?;
        }
        DlqCommand::Edit {
            refund_id,
            sets,
            by,
            reason,
            dry_run,
        } => {
            let decision = Decision { by, reason };
            ops::dlq_edit(&amqp, &api, &refund_id, &sets, &decision, dry_run).await?;
        }
        DlqCommand::Purge {
            filter,
            all,
            include_refunds,
            yes,
            by,
            why,
            limit,
        } => {
            let scope = ops::PurgeScope {
                all,
                include_refunds,
                yes,
                by,
                reason: why,
            };
            ops::dlq_purge(&amqp, &api, &filter.into_filter(), &scope, limit).await?;
        }
    }
    Ok(())
}

pub(crate) async fn refunds(
    config: Option<PathBuf>,
    worker_url: Option<&str>,
    command: RefundsCommand,
) -> anyhow::Result<()> {
    let tools = Settings::load_tools(config.as_deref())?;
    let api = worker_api(&tools, worker_url);
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
            performed,
            not_executed,
            by,
            reason,
        } => {
            let performed = match performed.as_deref() {
                Some("cancel") => Some(Operation::Cancel),
                Some(_) => Some(Operation::Refund),
                None => None,
            };
            let resolution = Resolution {
                executed,
                performed,
                not_executed,
                by,
                reason,
            };
            ops::refunds_resolve(&api, &refund_id, &resolution).await?
        }
        RefundsCommand::Abandon {
            refund_id,
            by,
            reason,
        } => ops::refunds_abandon(&api, &refund_id, &Decision { by, reason }).await?,
        RefundsCommand::Release {
            refund_id,
            by,
            reason,
        } => ops::refunds_release(&api, &refund_id, &Decision { by, reason }).await?,
    }
    Ok(())
}

/// `refund-worker report`.
pub(crate) async fn report(
    config: Option<PathBuf>,
    worker_url: Option<&str>,
    from: &str,
    to: &str,
    format: &str,
) -> anyhow::Result<()> {
    let tools = Settings::load_tools(config.as_deref())?;
    let api = worker_api(&tools, worker_url);
    ops::report(&api, from, to, format).await?;
    Ok(())
}

/// `refund-worker health`: one GET of `/readyz` with a short timeout. Ready
/// is exit 0; anything else (not ready, no answer) is an error, exit 1, with
/// the reason on stderr.
pub(crate) async fn health(
    config: Option<PathBuf>,
    worker_url: Option<&str>,
) -> anyhow::Result<()> {
    let tools = Settings::load_tools(config.as_deref())?;
    let base = worker_url.map_or_else(|| tools.worker_url(), str::to_string);
    let url = format!("{}/readyz", base.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(3))
        .build()?;
    let response = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("{url}: no answer"))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    anyhow::ensure!(status.is_success(), "{url}: {status}: {}", body.trim());
    println!("ready");
    Ok(())
}
