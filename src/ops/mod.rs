//! The operator commands behind `refund-worker dlq …` and
//! `refund-worker refunds …`: what they print and how they decide. The
//! dead-letter commands talk to the broker; the refund commands talk to the
//! running worker's HTTP API (the worker holds the store's lock).

pub mod client;
pub mod dlq;
pub mod dlq_edit;
pub mod queue_migration;

use crate::config::AmqpSettings;
use crate::ops::dlq::{human_age, DeadMessage, Dlq, Filter, Report};
use crate::values::secret::Secret;
use crate::worker::{Decision, Resolution};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use std::io::IsTerminal;

/// Operator command failures, with what to do about them.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Broker side.
    #[error(transparent)]
    Dlq(#[from] crate::ops::dlq::DlqError),
    /// The worker's API could not be reached.
    #[error("worker API at {url}: {message}")]
    Api {
        /// Base URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// Refused before doing anything.
    #[error("{0}")]
    Refused(String),
}

/// A client of the worker's HTTP API.
#[derive(Debug, Clone)]
pub struct WorkerApi {
    base: String,
    http: reqwest::Client,
    token: Option<Secret>,
}

impl WorkerApi {
    /// `base` like `http://127.0.0.1:8080`.
    pub fn new(base: &str) -> Self {
        WorkerApi {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
            token: None,
        }
    }

    /// Sends `Authorization: Bearer <token>` (`http.operator_token`).
    pub fn with_token(mut self, token: Option<Secret>) -> Self {
        self.token = token.filter(|t| !t.is_empty());
        self
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.authorized(self.http.get(format!("{}{path}", self.base)))
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.authorized(self.http.post(format!("{}{path}", self.base)))
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token.expose()),
            None => request,
        }
    }

    fn err(&self, message: impl ToString) -> OpsError {
        OpsError::Api {
            url: self.base.clone(),
            message: message.to_string(),
        }
    }

    async fn decode(&self, response: reqwest::Response) -> Result<Value, OpsError> {
        let status = response.status();
        let body: Value = response.json().await.map_err(|e| self.err(e))?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(self.err(format!(
                "HTTP {}: {}",
                status.as_u16(),
                body.get("error").and_then(Value::as_str).unwrap_or("")
            )))
        }
    }

    /// The stored record of a refund, `None` if the worker says it has no
    /// such refund. Any other answer that is not a record (a 404 from a
    /// listener without the operator API, a wrong address) is an error,
    /// never "no record".
    pub async fn refund(&self, refund_id: &str) -> Result<Option<Value>, OpsError> {
        let path = format!("/refunds/{refund_id}");
        let response = self.get(&path).send().await.map_err(|e| self.err(e))?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            let body: Value = response.json().await.unwrap_or(Value::Null);
            if body["not_found"] == "refund" {
                return Ok(None);
            }
            return Err(self.err(format!(
                "HTTP 404 for {path} without the operator API's answer: is this the worker's \
                 private listener (http.addr)? Set --worker-url or REFUND_WORKER_URL"
            )));
        }
        self.decode(response).await.map(Some)
    }

    /// Records with this status.
    pub async fn list(&self, status: Option<&str>, limit: usize) -> Result<Vec<Value>, OpsError> {
        let mut request = self.get("/refunds").query(&[("limit", limit.to_string())]);
        if let Some(status) = status {
            request = request.query(&[("status", status)]);
        }
        let response = request.send().await.map_err(|e| self.err(e))?;
        let body = self.decode(response).await?;
        Ok(body.as_array().cloned().unwrap_or_default())
    }

    /// Resolves an in-doubt refund.
    pub async fn resolve(
        &self,
        refund_id: &str,
        resolution: &Resolution,
    ) -> Result<Value, OpsError> {
        let response = self
            .post(&format!("/refunds/{refund_id}/resolve"))
            .json(resolution)
            .send()
            .await
            .map_err(|e| self.err(e))?;
        self.decode(response).await
    }

    /// Whether the worker still has this refund in doubt. A refund the
    /// store does not know (never recorded, or its tombstone expired) and
    /// an unreachable API count as in doubt: never replay on a guess.
    pub async fn still_in_doubt(&self, refund_id: &str) -> bool {
        match self.refund(refund_id).await {
            Ok(Some(record)) => {
                status_of(&record) == "in_doubt"
                    || record["uncertain"]
                        .as_array()
                        .is_some_and(|u| !u.is_empty())
            }
            Ok(None) | Err(_) => true,
        }
    }

    /// Puts a corrected command in a refund's record (`dlq edit`).
    pub async fn amend(
        &self,
        refund_id: &str,
        command: &Value,
        decision: &Decision,
        changes: &str,
    ) -> Result<Value, OpsError> {
        let body = serde_json::json!({
            "command": command,
            "by": decision.by,
            "reason": decision.reason,
            "changes": changes,
        });
        let response = self
            .post(&format!("/refunds/{refund_id}/amend"))
            .json(&body)
            .send()
            .await
            .map_err(|e| self.err(e))?;
        self.decode(response).await
    }

    /// The reconciliation report for `from..=to` (`YYYY-MM-DD`).
    pub async fn report(&self, from: &str, to: &str) -> Result<Value, OpsError> {
        let response = self
            .get("/report")
            .query(&[("from", from), ("to", to)])
            .send()
            .await
            .map_err(|e| self.err(e))?;
        self.decode(response).await
    }

    /// Records a refund as abandoned (`failed`, `error.kind = abandoned`),
    /// or publishes a decided one's event again; `command` is the body of
    /// its message, for a refund the worker has no record of.
    pub async fn abandon(
        &self,
        refund_id: &str,
        decision: &Decision,
        command: Option<Value>,
        unread: bool,
    ) -> Result<Value, OpsError> {
        let body = serde_json::json!({
            "by": decision.by,
            "reason": decision.reason,
            "command": command,
            "unread": unread,
        });
        let response = self
            .post(&format!("/refunds/{refund_id}/abandon"))
            .json(&body)
            .send()
            .await
            .map_err(|e| self.err(e))?;
        self.decode(response).await
    }

    /// Releases a refund's over-refund reservation.
    pub async fn release(&self, refund_id: &str, decision: &Decision) -> Result<Value, OpsError> {
        let response = self
            .post(&format!("/refunds/{refund_id}/release"))
            .json(decision)
            .send()
            .await
            .map_err(|e| self.err(e))?;
        self.decode(response).await
    }
}

/// The operator-facing status of a record as the API returns it.
pub fn status_of(record: &Value) -> String {
    let state = &record["state"];
    match state["state"].as_str() {
        Some("tombstone") => state["status"].as_str().unwrap_or("finished").to_string(),
        Some("finished") => state["event"]["status"]
            .as_str()
            .unwrap_or("finished")
            .to_string(),
        Some(other) => other.to_string(),
        None => "unknown".into(),
    }
}

/// `dlq list`.
pub async fn dlq_list(amqp: &AmqpSettings, filter: &Filter, json: bool) -> Result<(), OpsError> {
    let dlq = Dlq::open(amqp).await?;
    let matching: Vec<&DeadMessage> = dlq
        .messages()
        .iter()
        .filter(|m| filter.matches(m))
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&matching).unwrap_or_default()
        );
    } else {
        println!(
            "{:<28} {:<12} {:<22} {:>8}  {:<20} {:<20} {:>7}",
            "REFUND_ID", "PROVIDER", "REASON", "ATTEMPTS", "FIRST_FAILURE", "LAST_FAILURE", "AGE"
        );
        for m in &matching {
            println!(
                "{:<28} {:<12} {:<22} {:>8}  {:<20} {:<20} {:>7}",
                m.refund_id.as_deref().unwrap_or("-"),
                m.provider.as_deref().unwrap_or("-"),
                m.kind,
                m.attempts,
                short_time(m.first_failure_at.as_deref()),
                short_time(m.last_failure_at.as_deref()),
                m.age_secs.map(human_age).unwrap_or_else(|| "-".into()),
            );
        }
        eprintln!(
            "{} of {} dead-lettered message(s) shown",
            matching.len(),
            dlq.messages().len()
        );
    }
    dlq.close().await;
    Ok(())
}

fn short_time(t: Option<&str>) -> String {
    t.map(|t| t.chars().take(19).collect())
        .unwrap_or_else(|| "-".into())
}

/// `dlq show REFUND_ID`.
pub async fn dlq_show(
    amqp: &AmqpSettings,
    api: &WorkerApi,
    refund_id: &str,
) -> Result<(), OpsError> {
    let dlq = Dlq::open(amqp).await?;
    let filter = Filter {
        refund_id: Some(refund_id.to_string()),
        ..Default::default()
    };
    let messages: Vec<&DeadMessage> = dlq
        .messages()
        .iter()
        .filter(|m| filter.matches(m))
        .collect();
    let record = match api.refund(refund_id).await {
        Ok(record) => record.unwrap_or(Value::Null),
        Err(e) => Value::String(format!("not available: {e}")),
    };
    let out = serde_json::json!({ "messages": messages, "record": record });
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    dlq.close().await;
    Ok(())
}

/// `dlq replay`. Messages whose refund first failed longer ago than
/// `max_age` (`store.tombstone_retention`) are kept.
pub async fn dlq_replay(
    amqp: &AmqpSettings,
    api: &WorkerApi,
    filter: &Filter,
    limit: Option<usize>,
    dry_run: bool,
    quiet: bool,
    max_age: std::time::Duration,
) -> Result<Report, OpsError> {
    let mut dlq = Dlq::open(amqp).await?;
    let total = dlq.messages().iter().filter(|m| filter.matches(m)).count();
    let bar = if !quiet && std::io::stderr().is_terminal() && total > 20 {
        let bar = ProgressBar::new(total as u64);
        if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} replayed {msg}") {
            bar.set_style(style);
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    let report = dlq
        .replay(
            filter,
            limit,
            dry_run,
            max_age,
            async |id: &str| api.still_in_doubt(id).await,
            |m| {
                bar.inc(1);
                if dry_run && !quiet {
                    bar.suspend(|| {
                        println!(
                            "would replay {} ({})",
                            m.refund_id.as_deref().unwrap_or("-"),
                            m.kind
                        )
                    });
                }
            },
        )
        .await;
    bar.finish_and_clear();
    dlq.close().await;
    let report = report?;
    for id in &report.skipped_in_doubt {
        eprintln!("skipped {id}: in doubt; resolve it first (refund-worker refunds resolve {id} --executed TXN | --not-executed)");
    }
    for id in &report.skipped_too_old {
        eprintln!(
            "skipped {id}: it first failed more than store.tombstone_retention ({}) ago, so its \
             record may be gone and nothing would stop a second payment; check with the \
             provider, then publish a new command if it is still owed",
            humantime::format_duration(max_age)
        );
    }
    if report.skipped_poison > 0 {
        eprintln!(
            "skipped {} poison message(s) (bad body: a replay cannot fix them; name the reason with --reason to force, or purge them)",
            report.skipped_poison
        );
    }
    eprintln!(
        "{} {} of {} matching message(s) ({} in the queue), {} skipped as in doubt, {} as poison",
        if dry_run { "would replay" } else { "replayed" },
        report.done,
        report.matched,
        report.browsed,
        report.skipped_in_doubt.len(),
        report.skipped_poison
    );
    Ok(report)
}

/// What `dlq purge` may remove.
#[derive(Debug, Clone, Default)]
pub struct PurgeScope {
    /// Everything matching no filter (with `yes`).
    pub all: bool,
    /// Also refunds that are not decided: each is recorded as abandoned.
    pub include_refunds: bool,
    /// Confirms `all` and `include_refunds`.
    pub yes: bool,
    /// Who purges (required with `include_refunds`).
    pub by: Option<String>,
    /// Why (required with `include_refunds`).
    pub reason: Option<String>,
}

/// `dlq purge`.
pub async fn dlq_purge(
    amqp: &AmqpSettings,
    api: &WorkerApi,
    filter: &Filter,
    scope: &PurgeScope,
    limit: Option<usize>,
) -> Result<Report, OpsError> {
    if filter.is_empty() && !(scope.all && scope.yes) {
        return Err(OpsError::Refused(
            "purge needs a filter (--reason, --provider, --refund-id, --older-than) or --all --yes"
                .into(),
        ));
    }
    let decision = if scope.include_refunds {
        let (Some(by), Some(reason), true) = (&scope.by, &scope.reason, scope.yes) else {
            return Err(OpsError::Refused(
                "--include-refunds abandons the refunds it purges (a `failed` event each): \
                 it needs --yes, --by and --reason"
                    .into(),
            ));
        };
        Some(Decision {
            by: by.clone(),
            reason: reason.clone(),
        })
    } else {
        None
    };
    let mut dlq = Dlq::open(amqp).await?;
    let abandon = decision.as_ref().map(|decision| {
        async move |m: &DeadMessage| -> Result<(), String> {
            let Some(id) = &m.refund_id else {
                return Err("no refund id".into());
            };
            let unread = matches!(m.kind.as_str(), "oversize" | "wrong_content_type");
            api.abandon(id, decision, m.body_json(), unread)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    });
    let report = dlq.purge(filter, limit, abandon).await;
    dlq.close().await;
    let report = report?;
    for (id, why) in &report.refused {
        eprintln!("kept {id}: {why}");
    }
    if report.skipped_refunds > 0 {
        eprintln!(
            "kept {} refund message(s): each stands for a refund; replay them, or purge them \
             with --include-refunds --yes --by --why to record each one's fate and publish its \
             event (refunds that may have been paid are never abandoned: resolve them first)",
            report.skipped_refunds
        );
    }
    eprintln!(
        "removed {} of {} message(s) in the dead-letter queue ({} refund(s) abandoned)",
        report.done,
        report.browsed,
        report.abandoned.len()
    );
    Ok(report)
}

/// `refunds abandon`.
pub async fn refunds_abandon(
    api: &WorkerApi,
    refund_id: &str,
    decision: &Decision,
) -> Result<(), OpsError> {
    let record = api.abandon(refund_id, decision, None, false).await?;
    println!("{} is now {}", refund_id, status_of(&record));
    Ok(())
}

/// `refunds release`.
pub async fn refunds_release(
    api: &WorkerApi,
    refund_id: &str,
    decision: &Decision,
) -> Result<(), OpsError> {
    let answer = api.release(refund_id, decision).await?;
    println!("released {} for {refund_id}", answer["released"]);
    Ok(())
}

/// `refunds show`.
pub async fn refunds_show(api: &WorkerApi, refund_id: &str) -> Result<(), OpsError> {
    match api.refund(refund_id).await? {
        Some(record) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&record).unwrap_or_default()
            );
            Ok(())
        }
        None => Err(OpsError::Refused(format!(
            "no refund {refund_id} in the store"
        ))),
    }
}

/// `refunds list`.
pub async fn refunds_list(
    api: &WorkerApi,
    status: Option<&str>,
    limit: usize,
    json: bool,
) -> Result<(), OpsError> {
    let records = api.list(status, limit).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&records).unwrap_or_default()
        );
        return Ok(());
    }
    println!(
        "{:<28} {:<12} {:<10} {:>8}  {:<20}",
        "REFUND_ID", "PROVIDER", "STATUS", "ATTEMPTS", "UPDATED"
    );
    for r in &records {
        println!(
            "{:<28} {:<12} {:<10} {:>8}  {:<20}",
            r["refund_id"].as_str().unwrap_or("-"),
            r["command"]["provider"].as_str().unwrap_or("-"),
            status_of(r),
            r["attempts"].as_u64().unwrap_or(0),
            short_time(r["updated_at"].as_str()),
        );
    }
    eprintln!("{} refund(s)", records.len());
    Ok(())
}

/// `refunds resolve`.
pub async fn refunds_resolve(
    api: &WorkerApi,
    refund_id: &str,
    resolution: &Resolution,
) -> Result<(), OpsError> {
    let record = api.resolve(refund_id, resolution).await?;
    println!("{} is now {}", refund_id, status_of(&record));
    if resolution.not_executed {
        println!("replay it to retry: refund-worker dlq replay --refund-id {refund_id}");
    }
    Ok(())
}

/// `report`: the reconciliation report as a table, CSV or JSON.
pub async fn report(api: &WorkerApi, from: &str, to: &str, format: &str) -> Result<(), OpsError> {
    let value = api.report(from, to).await?;
    let rows: Vec<crate::contract::report::ReportRow> = serde_json::from_value(value.clone())
        .map_err(|e| OpsError::Refused(format!("unexpected report from the worker: {e}")))?;
    match format {
        "json" => println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        ),
        "csv" => print!("{}", crate::contract::report::to_csv(&rows)),
        _ => print!("{}", crate::contract::report::to_table(&rows)),
    }
    Ok(())
}

/// `dlq edit`: corrects a dead-lettered command and replays it. Shows the
/// diff first; with `dry_run` stops there. Refuses in-doubt refunds. The
/// refund's record takes the corrected command (with who, why and the
/// changes in its history) before the copy is published with a confirm;
/// the dead letter is removed only after that.
pub async fn dlq_edit(
    amqp: &AmqpSettings,
    api: &WorkerApi,
    refund_id: &str,
    sets: &[String],
    decision: &Decision,
    dry_run: bool,
) -> Result<String, OpsError> {
    dlq_edit_with(
        amqp,
        refund_id,
        sets,
        decision,
        dry_run,
        async |id: &str| {
            Ok(api
                .refund(id)
                .await?
                .is_some_and(|r| status_of(&r) == "in_doubt"))
        },
        async |id: &str, command: &Value, decision: &Decision, changes: &str| {
            api.amend(id, command, decision, changes).await.map(|_| ())
        },
        |diff: &str| eprintln!("{refund_id}:\n{diff}"),
    )
    .await
    .inspect(|_| {
        if !dry_run {
            eprintln!("{refund_id}: corrected and replayed");
        }
    })
}

/// As [`dlq_edit`], with the refund's status and the amendment given as
/// functions (the operator console calls the worker directly), and `show`
/// given the diff before anything changes. Prints nothing itself. Returns
/// the diff.
#[allow(clippy::too_many_arguments)]
pub async fn dlq_edit_with(
    amqp: &AmqpSettings,
    refund_id: &str,
    sets: &[String],
    decision: &Decision,
    dry_run: bool,
    mut in_doubt: impl AsyncFnMut(&str) -> Result<bool, OpsError>,
    mut amend: impl AsyncFnMut(&str, &Value, &Decision, &str) -> Result<(), OpsError>,
    show: impl FnOnce(&str),
) -> Result<String, OpsError> {
    let sets = crate::ops::dlq_edit::parse_sets(sets).map_err(OpsError::Refused)?;
    if decision.by.trim().is_empty() || decision.reason.trim().is_empty() {
        return Err(OpsError::Refused("--by and --reason are required".into()));
    }
    let dlq = Dlq::open(amqp).await?;
    let result = async {
        let Some(m) = dlq
            .messages()
            .iter()
            .find(|m| m.refund_id.as_deref() == Some(refund_id))
        else {
            return Err(OpsError::Refused(format!(
                "no dead letter for {refund_id} (another operator may be editing or replaying it)"
            )));
        };
        if m.kind == "in_doubt" || in_doubt(refund_id).await? {
            return Err(OpsError::Refused(format!(
                "{refund_id} is in doubt: resolve it first, never edit it"
            )));
        }
        let (command, changes) =
            crate::ops::dlq_edit::apply(m.raw(), &sets).map_err(OpsError::Refused)?;
        let diff = crate::ops::dlq_edit::diff(&changes);
        show(&diff);
        if dry_run {
            return Ok(diff);
        }
        let changes_text = serde_json::to_string(&changes).unwrap_or_default();
        amend(refund_id, &command, decision, &changes_text).await?;
        let chain = crate::ops::dlq_edit::chain(
            m.headers.get(crate::ops::dlq_edit::HEADER_EDITS).map(String::as_str),
            &decision.by,
            &decision.reason,
            &changes,
            m.body.as_bytes(),
        );
        let body = command.to_string();
        dlq.republish_edited(m, body.as_bytes(), &chain)
            .await
            .map_err(|e| {
                OpsError::Refused(format!(
                    "the record took the correction, but the corrected copy was not published ({e}); \
                     the dead letter is still there: run the same edit again"
                ))
            })?;
        Ok(diff)
    }
    .await;
    dlq.close().await;
    result
}
