//! Stage 1, intake: what can be decided from the message alone. Size,
//! content type and JSON shape are checked before anything else; a message
//! that cannot be tied to a refund is dead-lettered as poison, one that names
//! a refund but is not a valid command is answered with `rejected`.
//!
//! A body too large or of the wrong content type is not read as a command,
//! but when its `refund_id` can be read it is still a refund: its dead
//! letter names it (so a purge treats it as one), and a refund the store
//! does not know is answered with `rejected`, so its sender hears of it.
//!
//! Nothing here depends on configuration beyond `amqp.max_body_bytes`, so a
//! refund that was seen before is never turned away here because an account
//! was renamed since (the claim stage decides that from the record).

use super::{PipelineError, Worker};
use crate::broker::publisher::Publisher;
use crate::contract::command::{Echo, ParseError, RefundCommand};
use crate::store::Known;
use lapin::message::Delivery;

/// The largest body not read as a command that is still searched for its
/// `refund_id` (a bound on what one poison message costs).
const MAX_UNREAD_BODY: usize = 4 << 20;

impl Worker {
    /// The delivery's command, or `None` when intake already settled it
    /// (poison dead-lettered, invalid command rejected).
    pub(super) async fn intake(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
    ) -> Result<Option<RefundCommand>, PipelineError> {
        let amqp = &self.settings.amqp;
        if delivery.data.len() > amqp.max_body_bytes {
            let message = format!(
                "body of {} bytes exceeds amqp.max_body_bytes = {}",
                delivery.data.len(),
                amqp.max_body_bytes
            );
            self.unread(publisher, delivery, "oversize", message)
                .await?;
            return Ok(None);
        }
        if let Some(ct) = delivery.properties.content_type() {
            let ct = ct.as_str();
            if !ct
                .trim()
                .to_ascii_lowercase()
                .starts_with("application/json")
            {
                let message = format!("content_type {ct:?} is not application/json");
                self.unread(publisher, delivery, "wrong_content_type", message)
                    .await?;
                return Ok(None);
            }
        }
        match RefundCommand::parse(&delivery.data) {
            Ok(command) => {
                tracing::Span::current().record("refund_id", command.refund_id.as_str());
                Ok(Some(command))
            }
            Err(ParseError::Poison(p)) => {
                self.poison(publisher, delivery, p.kind, p.message, None)
                    .await?;
                Ok(None)
            }
            Err(ParseError::Invalid(invalid)) => {
                tracing::Span::current().record("refund_id", invalid.refund_id.as_str());
                // A refund recorded before (by a version that read this
                // body, or before the body was damaged) is its record's:
                // the copy continues from the recorded command.
                if let Some(Known::Record(record)) = self.store.lookup(&invalid.refund_id).await? {
                    tracing::warn!(message = %invalid.message, "a copy of a recorded refund is not a valid command now: continuing from its record");
                    return Ok(Some(record.command));
                }
                self.reject(
                    publisher,
                    &invalid.refund_id,
                    &invalid.echo,
                    "invalid_command",
                    invalid.message,
                )
                .await?;
                Ok(None)
            }
        }
    }

    /// A body that is not read as a command (`kind`: too large, wrong
    /// content type). When its `refund_id` can be read, a refund the store
    /// does not know gets `rejected` (a known one is its record's: a
    /// rejection would contradict what was recorded), and its dead letter
    /// names the refund.
    async fn unread(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
        kind: &'static str,
        message: String,
    ) -> Result<(), PipelineError> {
        let readable = delivery.data.len() <= MAX_UNREAD_BODY;
        let Some((refund_id, echo)) = Echo::of_body(&delivery.data).filter(|_| readable) else {
            return self.poison(publisher, delivery, kind, message, None).await;
        };
        tracing::Span::current().record("refund_id", refund_id.as_str());
        // Under the refund's lock: a well-formed copy being claimed now
        // decides first.
        let _guard = self.locks.lock(&refund_id).await;
        if self.store.lookup(&refund_id).await?.is_none() {
            let rejection = format!("{message}; the command was not read");
            self.reject(publisher, &refund_id, &echo, "invalid_command", rejection)
                .await?;
        }
        self.poison(publisher, delivery, kind, message, Some(refund_id))
            .await
    }
}
