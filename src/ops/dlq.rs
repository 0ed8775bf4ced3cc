//! Operator tools for the dead-letter queue: list, show, replay, purge.
//!
//! The queue is browsed by taking every message with `basic.get` without
//! acking it; what the operator does not replay or purge goes back to the
//! queue, in order, when the browsing channel closes. A replayed message is
//! published to the commands exchange with publisher confirms and only then
//! acked (removed), so an interrupted replay loses nothing; a message that
//! was published but not yet removed is replayed twice at worst, and the
//! store absorbs the duplicate.

use crate::broker::{
    HEADER_ATTEMPTS, HEADER_DELAYED_ROUNDS, HEADER_ERROR, HEADER_ERROR_KIND, HEADER_FIRST_FAILURE,
    HEADER_LAST_FAILURE, HEADER_ORIGINAL_ROUTING_KEY, HEADER_PROVIDER, HEADER_REFUND_ID,
};
use crate::config::AmqpSettings;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use serde::Serialize;
use std::time::Duration;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Header added to a replayed command: how many times it was replayed.
pub const HEADER_REPLAYS: &str = "x-refund-replays";

/// Reasons a replay cannot fix (the body itself is bad): skipped by a
/// replay unless its filter names the reason explicitly.
pub const POISON_KINDS: &[&str] = &[
    "malformed",
    "missing_refund_id",
    "invalid_refund_id",
    "wrong_content_type",
    "oversize",
];

/// Reasons that say the body names no refund at all.
const NO_REFUND_KINDS: &[&str] = &["malformed", "missing_refund_id", "invalid_refund_id"];

/// Most messages browsed at once (the rest stay in the queue untouched).
pub const MAX_BROWSE: usize = 100_000;

/// Tool failures.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// Broker error.
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    /// A replayed message was not confirmed; it stays in the dead-letter queue.
    #[error("the broker did not confirm the replay of {0}; it stays in the dead-letter queue")]
    NotConfirmed(String),
}

/// One dead-lettered message as an operator sees it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadMessage {
    /// From `x-refund-id`, or read from the body.
    pub refund_id: Option<String>,
    /// From `x-refund-provider`.
    pub provider: Option<String>,
    /// `x-refund-error-kind`.
    pub kind: String,
    /// `x-refund-error`.
    pub error: String,
    /// `x-refund-attempts`.
    pub attempts: i64,
    /// `x-refund-first-failure-at`.
    pub first_failure_at: Option<String>,
    /// `x-refund-last-failure-at`.
    pub last_failure_at: Option<String>,
    /// Seconds since the last failure.
    pub age_secs: Option<i64>,
    /// The body, as text, with any card token masked.
    pub body: String,
    /// All headers, as text.
    pub headers: std::collections::BTreeMap<String, String>,
    #[serde(skip)]
    delivery_tag: u64,
    #[serde(skip)]
    raw: Vec<u8>,
    #[serde(skip)]
    properties: BasicProperties,
}

/// Which messages an operation applies to.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// `x-refund-error-kind` equals this.
    pub reason: Option<String>,
    /// Provider account equals this.
    pub provider: Option<String>,
    /// `refund_id` equals this.
    pub refund_id: Option<String>,
    /// Last failure at least this long ago.
    pub older_than: Option<Duration>,
}

impl Filter {
    /// Whether no condition is set.
    pub fn is_empty(&self) -> bool {
        self.reason.is_none()
            && self.provider.is_none()
            && self.refund_id.is_none()
            && self.older_than.is_none()
    }

    /// Whether `m` matches every condition.
    pub fn matches(&self, m: &DeadMessage) -> bool {
        self.reason.as_ref().is_none_or(|r| *r == m.kind)
            && self
                .provider
                .as_ref()
                .is_none_or(|p| m.provider.as_ref() == Some(p))
            && self
                .refund_id
                .as_ref()
                .is_none_or(|id| m.refund_id.as_ref() == Some(id))
            && self
                .older_than
                .is_none_or(|d| m.age_secs.is_some_and(|age| age >= d.as_secs() as i64))
    }
}

/// What a replay or purge did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Messages looked at.
    pub browsed: usize,
    /// Messages matching the filter.
    pub matched: usize,
    /// Replayed (or removed, for a purge); with `dry_run`, would have been.
    pub done: usize,
    /// Skipped in-doubt refunds not yet resolved.
    pub skipped_in_doubt: Vec<String>,
    /// Skipped poison messages (see [`POISON_KINDS`]).
    pub skipped_poison: usize,
    /// Purge: refund messages kept (no `--include-refunds`).
    pub skipped_refunds: usize,
    /// Purge: refunds recorded as abandoned before their message went.
    pub abandoned: Vec<String>,
    /// Purge: refunds that could not be abandoned (message kept), and why.
    pub refused: Vec<(String, String)>,
    /// Replay: messages older than `store.tombstone_retention` (kept).
    pub skipped_too_old: Vec<String>,
}

/// A browsing session over the dead-letter queue.
#[derive(Debug)]
pub struct Dlq {
    connection: Connection,
    channel: Channel,
    amqp: AmqpSettings,
    messages: Vec<DeadMessage>,
    /// Messages in the queue when it was browsed.
    total: u32,
}

impl Dlq {
    /// Connects and takes every message (up to [`MAX_BROWSE`]) unacked.
    pub async fn open(amqp: &AmqpSettings) -> Result<Self, DlqError> {
        Self::open_first(amqp, MAX_BROWSE).await
    }

    /// Connects and takes the first `limit` messages unacked (a page that
    /// lists them: the rest of the queue is left as it is).
    pub async fn open_first(amqp: &AmqpSettings, limit: usize) -> Result<Self, DlqError> {
        let connection = crate::broker::connect_with(amqp, "refund-worker-dlq").await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let total = channel
            .queue_declare(
                amqp.dead_letter_queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?
            .message_count();
        let mut messages = Vec::new();
        while messages.len() < limit.min(MAX_BROWSE) {
            let Some(got) = channel
                .basic_get(
                    amqp.dead_letter_queue.as_str().into(),
                    BasicGetOptions { no_ack: false },
                )
                .await?
            else {
                break;
            };
            let mut message = describe(
                got.delivery.delivery_tag,
                got.delivery.data.clone(),
                got.delivery.properties.clone(),
            );
            message.distrust_if_dead_lettered_from(&amqp.commands_queue);
            messages.push(message);
        }
        Ok(Dlq {
            connection,
            channel,
            amqp: amqp.clone(),
            messages,
            total,
        })
    }

    /// How many messages the queue held when it was browsed.
    pub fn total(&self) -> u32 {
        self.total
    }

    /// The browsed messages, oldest first.
    pub fn messages(&self) -> &[DeadMessage] {
        &self.messages
    }

    /// Re-publishes matching messages to the commands exchange and removes
    /// each after the broker confirmed it. `in_doubt` tells whether a
    /// refund is still in doubt (then its message is skipped). A message
    /// whose first failure is older than `max_age`
    /// (`store.tombstone_retention`) is skipped: its refund's record and
    /// tombstone may be gone, so nothing would stop it being paid again.
    /// `progress` is called after each message.
    pub async fn replay(
        &mut self,
        filter: &Filter,
        limit: Option<usize>,
        dry_run: bool,
        max_age: Duration,
        mut still_in_doubt: impl AsyncFnMut(&str) -> bool,
        mut progress: impl FnMut(&DeadMessage),
    ) -> Result<Report, DlqError> {
        let mut report = Report {
            browsed: self.messages.len(),
            ..Default::default()
        };
        for m in self.messages.iter().filter(|m| filter.matches(m)) {
            report.matched += 1;
            if limit.is_some_and(|l| report.done >= l) {
                continue;
            }
            if filter.reason.is_none() && POISON_KINDS.contains(&m.kind.as_str()) {
                report.skipped_poison += 1;
                continue;
            }
            if m.first_failure_age().is_some_and(|age| age > max_age) {
                report
                    .skipped_too_old
                    .push(m.refund_id.clone().unwrap_or_default());
                continue;
            }
            if m.kind == "in_doubt" {
                let id = m.refund_id.clone().unwrap_or_default();
                if still_in_doubt(&id).await {
                    report.skipped_in_doubt.push(id);
                    continue;
                }
            }
            if !dry_run {
                let properties = replay_properties(&m.properties);
                Self::republish(&self.channel, &self.amqp, m, &m.raw, properties).await?;
            }
            report.done += 1;
            progress(m);
        }
        Ok(report)
    }

    /// Publishes `body` where `m` was first published, with a confirm, then
    /// removes `m` (only after the confirm: an interruption loses nothing).
    async fn republish(
        channel: &Channel,
        amqp: &AmqpSettings,
        m: &DeadMessage,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), DlqError> {
        // The commands exchange, whatever a header says: a producer could
        // have named any exchange there (the events exchange, say).
        let exchange = amqp.commands_exchange.clone();
        let routing_key = m
            .headers
            .get(HEADER_ORIGINAL_ROUTING_KEY)
            .cloned()
            .unwrap_or_else(|| "refund.replay".into());
        let confirm = channel
            .basic_publish(
                exchange.as_str().into(),
                routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            )
            .await?
            .await?;
        if !matches!(confirm, Confirmation::Ack(None)) {
            return Err(DlqError::NotConfirmed(
                m.refund_id.clone().unwrap_or_default(),
            ));
        }
        channel
            .basic_ack(m.delivery_tag, BasicAckOptions::default())
            .await?;
        Ok(())
    }

    /// Publishes a corrected copy of `m` (see `dlq_edit.rs`) and removes `m`
    /// after the broker confirmed the copy.
    pub async fn republish_edited(
        &self,
        m: &DeadMessage,
        body: &[u8],
        edit_header: &str,
    ) -> Result<(), DlqError> {
        let mut properties = replay_properties(&m.properties);
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(
            crate::ops::dlq_edit::HEADER_EDITS.into(),
            AMQPValue::LongString(edit_header.into()),
        );
        properties = properties.with_headers(headers);
        Self::republish(&self.channel, &self.amqp, m, body, properties).await
    }

    /// Removes matching messages (up to `limit`). A message that names no
    /// refund (a bad body) goes at once. Any other dead letter stands for a
    /// refund: it is kept unless `abandon` is given, which must record the
    /// refund's fate and publish its event (see `worker/abandon.rs`) before
    /// the message is removed; a refund it cannot abandon keeps its
    /// message.
    pub async fn purge(
        &mut self,
        filter: &Filter,
        limit: Option<usize>,
        mut abandon: Option<impl AsyncFnMut(&DeadMessage) -> Result<(), String>>,
    ) -> Result<Report, DlqError> {
        let mut report = Report {
            browsed: self.messages.len(),
            ..Default::default()
        };
        for m in self.messages.iter().filter(|m| filter.matches(m)) {
            report.matched += 1;
            if limit.is_some_and(|l| report.done >= l) {
                continue;
            }
            if m.carries_refund() {
                let Some(abandon) = abandon.as_mut() else {
                    report.skipped_refunds += 1;
                    continue;
                };
                if let Err(why) = abandon(m).await {
                    report
                        .refused
                        .push((m.refund_id.clone().unwrap_or_default(), why));
                    continue;
                }
                report
                    .abandoned
                    .push(m.refund_id.clone().unwrap_or_default());
            }
            self.channel
                .basic_ack(m.delivery_tag, BasicAckOptions::default())
                .await?;
            report.done += 1;
        }
        Ok(report)
    }

    /// As [`Dlq::purge`] without abandoning: messages that name no refund
    /// only.
    pub async fn purge_poison(
        &mut self,
        filter: &Filter,
        limit: Option<usize>,
    ) -> Result<Report, DlqError> {
        type NoAbandon = fn(&DeadMessage) -> std::future::Ready<Result<(), String>>;
        self.purge(filter, limit, None::<NoAbandon>).await
    }

    /// Puts everything not replayed or purged back in the queue.
    pub async fn close(self) {
        let _ = self.channel.close(200, "done".into()).await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}

impl DeadMessage {
    /// A command the broker dead-lettered straight from the commands queue
    /// (expired, over a length limit) never passed the worker: its
    /// `x-refund-*` headers are the producer's, not ours, so they say
    /// nothing about it (a forged kind could make a refund look like
    /// poison). It is described from its body and from the broker's
    /// `x-death` record.
    fn distrust_if_dead_lettered_from(&mut self, commands_queue: &str) {
        let Some((queue, reason, time)) = latest_death(&self.properties) else {
            return;
        };
        if queue != commands_queue {
            return;
        }
        let body: Option<serde_json::Value> = serde_json::from_slice(&self.raw).ok();
        let field = |key: &str| {
            body.as_ref()
                .and_then(|b| b.get(key))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        self.kind = "rejected_by_broker".into();
        self.error = format!("the broker dead-lettered it from {queue} ({reason})");
        self.refund_id = field("refund_id");
        self.provider = field("provider");
        self.attempts = 0;
        let at = time.and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok());
        let at = at.and_then(|t| t.format(&Rfc3339).ok());
        self.first_failure_at = at.clone();
        self.last_failure_at = at;
        self.age_secs = time.map(|t| OffsetDateTime::now_utc().unix_timestamp() - t);
    }

    /// Whether the message stands for a refund: its refund id could be read
    /// (a header the worker wrote, or the body of a message the broker
    /// dead-lettered). Only a body that names no refund is poison.
    pub fn carries_refund(&self) -> bool {
        !NO_REFUND_KINDS.contains(&self.kind.as_str())
            && self
                .refund_id
                .as_deref()
                .is_some_and(|id| crate::contract::command::check_refund_id(id).is_ok())
    }

    /// How long ago the refund first failed (from
    /// `x-refund-first-failure-at`, else the last failure).
    pub fn first_failure_age(&self) -> Option<Duration> {
        let at = self
            .first_failure_at
            .as_deref()
            .or(self.last_failure_at.as_deref())
            .and_then(|at| OffsetDateTime::parse(at, &Rfc3339).ok())
            .or_else(|| {
                // A message that never failed in the worker: when it was
                // published.
                let published = i64::try_from(*self.properties.timestamp().as_ref()?).ok()?;
                OffsetDateTime::from_unix_timestamp(published).ok()
            })?;
        Some((OffsetDateTime::now_utc() - at).unsigned_abs())
    }

    /// The body as it is in the queue (a card token maybe whole), for an
    /// edit that republishes it to the commands exchange.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// The body as JSON, when it is JSON.
    pub fn body_json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.raw).ok()
    }
}

/// The most recent entry of the broker's `x-death` header: the queue, the
/// reason and when (Unix seconds).
fn latest_death(properties: &BasicProperties) -> Option<(String, String, Option<i64>)> {
    let headers = properties.headers().as_ref()?;
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(latest) = deaths.as_slice().first()? else {
        return None;
    };
    let text = |key: &str| latest.inner().get(key).map(as_text).unwrap_or_default();
    let time = match latest.inner().get("time") {
        Some(AMQPValue::Timestamp(t)) => i64::try_from(*t).ok(),
        _ => None,
    };
    Some((text("queue"), text("reason"), time))
}

/// The original properties without the failure headers, with the replay
/// counted; delayed rounds start afresh.
fn replay_properties(original: &BasicProperties) -> BasicProperties {
    let mut headers = FieldTable::default();
    let mut replays = 0;
    if let Some(old) = original.headers() {
        for (key, value) in old.inner() {
            match key.as_str() {
                HEADER_ERROR_KIND | HEADER_ERROR | HEADER_LAST_FAILURE | HEADER_DELAYED_ROUNDS => {}
                HEADER_REPLAYS => replays = as_i64(value).unwrap_or(0),
                _ => {
                    headers.insert(key.clone(), value.clone());
                }
            }
        }
    }
    headers.insert(HEADER_REPLAYS.into(), AMQPValue::LongLongInt(replays + 1));
    original.clone().with_headers(headers).with_delivery_mode(2)
}

fn as_i64(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::LongString(s) => s.to_string().parse().ok(),
        _ => None,
    }
}

fn as_text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => s.to_string(),
        AMQPValue::ShortString(s) => s.to_string(),
        other => as_i64(other)
            .map(|n| n.to_string())
            .unwrap_or_else(|| format!("{other:?}")),
    }
}

/// How an operator sees a dead-lettered message with these properties
/// (the header reader behind `dlq list/show`; fuzzed in `fuzzing.rs`).
pub fn describe_message(raw: Vec<u8>, properties: BasicProperties) -> DeadMessage {
    describe(0, raw, properties)
}

fn describe(delivery_tag: u64, raw: Vec<u8>, properties: BasicProperties) -> DeadMessage {
    let headers: std::collections::BTreeMap<String, String> = properties
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .map(|(k, v)| (k.to_string(), as_text(v)))
                .collect()
        })
        .unwrap_or_default();
    // What people see: a payout's card token masked (a message the broker
    // dead-lettered itself still carries it whole in `raw`).
    let body =
        String::from_utf8_lossy(&crate::contract::command::mask_card_tokens(&raw)).to_string();
    let refund_id = headers.get(HEADER_REFUND_ID).cloned().or_else(|| {
        serde_json::from_slice::<serde_json::Value>(&raw)
            .ok()?
            .get("refund_id")?
            .as_str()
            .map(str::to_string)
    });
    let last = headers.get(HEADER_LAST_FAILURE).cloned();
    let age_secs = last
        .as_deref()
        .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
        .map(|t| (OffsetDateTime::now_utc() - t).whole_seconds());
    DeadMessage {
        refund_id,
        provider: headers.get(HEADER_PROVIDER).cloned(),
        kind: headers
            .get(HEADER_ERROR_KIND)
            .cloned()
            .unwrap_or_else(|| "rejected_by_broker".into()),
        error: headers.get(HEADER_ERROR).cloned().unwrap_or_default(),
        attempts: headers
            .get(HEADER_ATTEMPTS)
            .and_then(|a| a.parse().ok())
            .unwrap_or(0),
        first_failure_at: headers.get(HEADER_FIRST_FAILURE).cloned(),
        last_failure_at: last,
        age_secs,
        body,
        headers,
        delivery_tag,
        raw,
        properties,
    }
}

/// Parses `90s`, `15m`, `2h`, `3d` (or plain seconds).
pub fn parse_age(text: &str) -> Result<Duration, String> {
    crate::config::parse_duration(text)
}

/// Renders an age in seconds as `3d4h`, `5m`, `42s`.
pub fn human_age(secs: i64) -> String {
    match secs {
        s if s >= 86_400 => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
        s if s >= 3600 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_parse_and_print() {
        assert_eq!(parse_age("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_age("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_age("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_age("3d"), Ok(Duration::from_secs(259_200)));
        assert!(parse_age("soon").is_err());
        assert_eq!(parse_age("1w"), Ok(Duration::from_secs(604_800)));
        assert!(parse_age("5x").is_err());
        assert_eq!(human_age(42), "42s");
        assert_eq!(human_age(3_900), "1h5m");
        assert_eq!(human_age(90_000), "1d1h");
    }

    #[test]
    fn replay_drops_failure_headers_and_counts_replays() {
        let mut headers = FieldTable::default();
        headers.insert(
            HEADER_ERROR_KIND.into(),
            AMQPValue::LongString("in_doubt".into()),
        );
        headers.insert(
            HEADER_FIRST_FAILURE.into(),
            AMQPValue::LongString("2026-01-01T00:00:00Z".into()),
        );
        headers.insert(HEADER_DELAYED_ROUNDS.into(), AMQPValue::LongLongInt(3));
        headers.insert(HEADER_REPLAYS.into(), AMQPValue::LongLongInt(1));
        let props = replay_properties(&BasicProperties::default().with_headers(headers));
        let out = props.headers().clone().unwrap_or_default();
        assert!(!out.inner().contains_key(HEADER_ERROR_KIND));
        assert!(!out.inner().contains_key(HEADER_DELAYED_ROUNDS));
        assert!(out.inner().contains_key(HEADER_FIRST_FAILURE));
        assert_eq!(out.inner().get(HEADER_REPLAYS).and_then(as_i64), Some(2));
    }
}
