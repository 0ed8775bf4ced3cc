//! Publishing with publisher confirms. An event or a dead letter counts as
//! published only when the broker confirmed it; the command it answers is
//! acked after that, never before.

use crate::broker::{
    HEADER_ATTEMPTS, HEADER_DELAYED_ROUNDS, HEADER_ERROR, HEADER_ERROR_KIND, HEADER_FIRST_FAILURE,
    HEADER_LAST_FAILURE, HEADER_ORIGINAL_EXCHANGE, HEADER_ORIGINAL_ROUTING_KEY, HEADER_PROVIDER,
    HEADER_REFUND_ID, HEADER_THROTTLED,
};
use crate::config::AmqpSettings;
use crate::contract::event::OutcomeEvent;
use crate::observability::trace::TraceContext;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::AMQPValue;
use lapin::Confirmation;
use lapin::{BasicProperties, Channel};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A publish that was not confirmed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The channel or connection failed.
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker refused the message.
    #[error("the broker nacked the message")]
    Nacked,
    /// The message could not be routed to any queue.
    #[error("the broker returned the message as unroutable")]
    Returned,
    /// No confirm arrived in time.
    #[error("no publisher confirm within {0:?}")]
    Timeout(Duration),
}

/// What to write in a dead letter's headers.
#[derive(Debug, Clone, Default)]
pub struct DeadLetter {
    /// Short reason (`malformed`, `in_doubt`, `provider_unavailable`, ...).
    pub kind: String,
    /// Human-readable reason.
    pub error: String,
    /// Provider attempts so far.
    pub attempts: u32,
    /// First failure (RFC 3339).
    pub first_failure_at: String,
    /// Last failure (RFC 3339).
    pub last_failure_at: String,
    /// The refund, if known.
    pub refund_id: Option<String>,
    /// The provider account, if known.
    pub provider: Option<String>,
    /// Delayed-retry rounds done so far (written when set).
    pub delayed_rounds: Option<u32>,
    /// Parks for an account's share of the slots (written when set).
    pub throttled: Option<u32>,
}

/// Where [`Publisher::park`] sends a message.
#[derive(Debug, Clone, Copy)]
pub enum ParkTarget<'a> {
    /// The dead-letter exchange.
    DeadLetters,
    /// A delay queue, through the default exchange.
    DelayQueue(&'a str),
}

/// A confirm-mode channel for events and dead letters.
#[derive(Debug, Clone)]
pub struct Publisher {
    channel: Channel,
    events_exchange: String,
    dead_letter_exchange: String,
    confirm_timeout: Duration,
}

impl Publisher {
    /// Puts `channel` in confirm mode.
    pub async fn new(channel: Channel, amqp: &AmqpSettings) -> Result<Self, lapin::Error> {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Publisher {
            channel,
            events_exchange: amqp.events_exchange.clone(),
            dead_letter_exchange: amqp.dead_letter_exchange.clone(),
            confirm_timeout: Duration::from_millis(amqp.confirm_timeout_ms),
        })
    }

    /// Whether the channel is open. The broker closes a channel on an
    /// error (a publish refused for want of permission, an exchange
    /// deleted), and every later publish on it fails: the session ends and
    /// no provider is called until events can be published again.
    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Publishes an outcome event (persistent, confirmed). A nack or a
    /// missing confirm is retried a few times on the same channel; a broken
    /// channel is not (the delivery goes back and is redelivered on the next
    /// connection).
    pub async fn publish_event(&self, event: &OutcomeEvent) -> Result<(), PublishError> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.publish_event_once(event).await {
                Err(PublishError::Nacked | PublishError::Timeout(_)) if tries < 3 => {
                    tracing::warn!(tries, "event not confirmed; publishing it again");
                    tokio::time::sleep(Duration::from_millis(100 * tries)).await;
                }
                other => return other,
            }
        }
    }

    async fn publish_event_once(&self, event: &OutcomeEvent) -> Result<(), PublishError> {
        let body = serde_json::to_vec(event).unwrap_or_default();
        let routing_key = event.status.routing_key();
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(event.event_id.as_str().into())
            .with_correlation_id(event.refund_id.as_str().into())
            .with_type(routing_key.as_str().into())
            .with_timestamp(unix_now());
        // The refund span's context, when published for a delivery.
        if let Some(context) = TraceContext::current() {
            let mut headers = lapin::types::FieldTable::default();
            context.write(&mut headers);
            properties = properties.with_headers(headers);
        }
        self.publish(
            &self.events_exchange,
            &routing_key,
            false,
            &body,
            properties,
        )
        .await
    }

    /// Publishes `body` with the original properties and the reason headers
    /// added, to the dead-letter exchange or a delay queue. `exchange` and
    /// `routing_key` are where the command was first published; they travel
    /// in headers so a replay or a delayed retry can restore them.
    pub async fn park(
        &self,
        target: ParkTarget<'_>,
        body: &[u8],
        original: &BasicProperties,
        exchange: &str,
        routing_key: &str,
        info: &DeadLetter,
    ) -> Result<(), PublishError> {
        let mut headers = original.headers().clone().unwrap_or_default();
        // The refund span's context replaces the caller's.
        if let Some(context) = TraceContext::current() {
            context.write(&mut headers);
        }
        let mut put = |key: &str, value: &str| {
            headers.insert(key.into(), AMQPValue::LongString(value.into()));
        };
        put(HEADER_ERROR_KIND, &info.kind);
        put(HEADER_ERROR, &info.error);
        put(HEADER_FIRST_FAILURE, &info.first_failure_at);
        put(HEADER_LAST_FAILURE, &info.last_failure_at);
        put(HEADER_ORIGINAL_EXCHANGE, exchange);
        put(HEADER_ORIGINAL_ROUTING_KEY, routing_key);
        if let Some(id) = &info.refund_id {
            put(HEADER_REFUND_ID, id);
        }
        if let Some(provider) = &info.provider {
            put(HEADER_PROVIDER, provider);
        }
        headers.insert(
            HEADER_ATTEMPTS.into(),
            AMQPValue::LongLongInt(i64::from(info.attempts)),
        );
        if let Some(parks) = info.throttled {
            headers.insert(
                HEADER_THROTTLED.into(),
                AMQPValue::LongLongInt(i64::from(parks)),
            );
        }
        if let Some(rounds) = info.delayed_rounds {
            headers.insert(
                HEADER_DELAYED_ROUNDS.into(),
                AMQPValue::LongLongInt(i64::from(rounds)),
            );
        }
        let properties = original.clone().with_headers(headers).with_delivery_mode(2);
        let (exchange, routing_key) = match target {
            ParkTarget::DeadLetters => (self.dead_letter_exchange.as_str(), routing_key),
            ParkTarget::DelayQueue(queue) => ("", queue),
        };
        self.publish(exchange, routing_key, true, body, properties)
            .await
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory,
                    ..Default::default()
                },
                body,
                properties,
            )
            .await?;
        match tokio::time::timeout(self.confirm_timeout, confirm).await {
            Err(_) => Err(PublishError::Timeout(self.confirm_timeout)),
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(Confirmation::Ack(None))) | Ok(Ok(Confirmation::NotRequested)) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_)))) => Err(PublishError::Returned),
            Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::Nacked),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
