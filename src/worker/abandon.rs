//! Giving a refund up (`refunds abandon`, and what `dlq purge
//! --include-refunds` does for every refund message it removes) and
//! releasing a reservation nothing will settle (`refunds release`).
//!
//! The rule both follow: a message that carries a refund is never removed
//! without the refund's fate recorded and its event published, and nothing
//! is settled as "not paid" while an attempt may have reached the provider.
//! So abandoning
//!
//! * a refund not sent: records `failed` (`abandoned`), releases its
//!   reservation, publishes the event;
//! * a refund with no record (dead-lettered before its claim: a breaker
//!   open past the retry budget, throttled too often, expired in the
//!   queue): records it the same way from the command the caller gives;
//! * a refund already decided: publishes its recorded event again (its
//!   message may have been its only carrier), changes nothing;
//! * a refund that may have been paid (in doubt, or not sent after an
//!   attempt with an unknown outcome), pending or being attempted: is
//!   refused, saying what to do instead.

use super::resolve::{who, wrong_state, Decision, ResolveError};
use super::Worker;
use crate::contract::command::{ParseError, RefundCommand};
use crate::contract::event::{OutcomeEvent, Status};
use crate::observability::metrics;
use crate::store::ledger::LedgerChange;
use crate::store::{Claim, Known, RefundRecord, RefundState, Tombstone};
use tracing::warn;

/// The message that carries the refund being abandoned (a purge).
#[derive(Debug, Clone)]
pub struct Carrier {
    /// Its body, as JSON.
    pub body: serde_json::Value,
    /// It was not read as a command (too large, the wrong content type):
    /// intake answered it with `rejected`, and it records nothing.
    pub unread: bool,
}

/// What abandoning a refund amounted to.
#[derive(Debug, Clone)]
pub enum Abandoned {
    /// The refund's record: `failed` (`abandoned`) now, or the outcome it
    /// already had (whose event was published again).
    Recorded(Box<RefundRecord>),
    /// The refund was pruned: its tombstone's outcome stands.
    Decided(Box<Tombstone>),
    /// The message is not a valid command: `rejected` was published (it is
    /// not a refund anyone can pay).
    Rejected(String),
}

impl Worker {
    /// Gives a refund up for good (see the module's rules). `carrier` is
    /// the message that carries it (a purge): for a refund the store does
    /// not know, its command; a message whose command differs from the
    /// recorded one is answered `conflicting_payload` and the record is left
    /// as it is.
    pub async fn abandon(
        &self,
        refund_id: &str,
        decision: Decision,
        carrier: Option<Carrier>,
    ) -> Result<Abandoned, ResolveError> {
        let who = who(&decision.by, &decision.reason)?;
        let _guard = self.locks.lock(refund_id).await;
        // Twice at most: a copy may be claimed between the look and the
        // write (another replica); then its record decides.
        for _ in 0..2 {
            match self.store.lookup(refund_id).await? {
                Some(Known::Record(record)) => {
                    if let Some(other) = carrier.as_ref().and_then(|c| another_command(&record, c))
                    {
                        return self.reject_other(refund_id, &other).await;
                    }
                    return self.abandon_recorded(*record, &who).await;
                }
                Some(Known::Tombstone(t)) => return Ok(Abandoned::Decided(t)),
                None => {
                    let Some(carrier) = &carrier else {
                        return Err(ResolveError::NotFound(refund_id.to_string()));
                    };
                    if carrier.unread {
                        let error = ParseError::Poison(crate::contract::command::Poison {
                            kind: "unread",
                            message: "too large or of the wrong content type".into(),
                        });
                        return self
                            .reject_unreadable(refund_id, &carrier.body, error)
                            .await;
                    }
                    if let Some(done) = self
                        .abandon_unrecorded(refund_id, &carrier.body, &who)
                        .await?
                    {
                        return Ok(done);
                    }
                }
            }
        }
        Err(ResolveError::Invalid(format!(
            "{refund_id} changed while it was being abandoned; try again"
        )))
    }

    async fn abandon_recorded(
        &self,
        mut record: RefundRecord,
        who: &str,
    ) -> Result<Abandoned, ResolveError> {
        let refund_id = record.refund_id.clone();
        match &record.state {
            RefundState::Finished { event } => {
                // Its message may be the only carrier of this event (a
                // transient command, an expired one): publish it before
                // the message goes.
                self.publish_outside_delivery(event)
                    .await
                    .map_err(ResolveError::Publish)?;
                return Ok(Abandoned::Recorded(Box::new(record)));
            }
            RefundState::Pending { .. } => {
                return Err(wrong_state(
                    &record,
                    "the provider accepted it and will answer; it cannot be abandoned",
                ))
            }
            RefundState::Attempting { .. } => {
                return Err(wrong_state(
                    &record,
                    "an attempt is under way or was cut off; let the worker decide it first",
                ))
            }
            _ if record.may_have_been_paid_unseen() => {
                return Err(wrong_state(
                    &record,
                    &format!(
                        "an attempt may have reached the provider: check with the provider and \
                         resolve it first (refund-worker refunds resolve {refund_id} \
                         --executed TXN | --not-executed)"
                    ),
                ))
            }
            RefundState::NotSent { .. } | RefundState::InDoubt { .. } => {}
        }
        let was = record.state.name();
        let event = OutcomeEvent::new(
            &refund_id,
            Status::Failed,
            &record.command.echo(),
            record.attempts,
        )
        .with_error("abandoned", format!("abandoned while {was} {who}"));
        record.transition(
            RefundState::Finished {
                event: event.clone(),
            },
            format!("abandoned while {was} {who}; its reservation is released"),
        );
        self.store
            .commit(&mut record, LedgerChange::Release)
            .await?;
        self.store.sync_refund(&refund_id).await?;
        self.published_abandoned(&record, &event, who, was).await?;
        Ok(Abandoned::Recorded(Box::new(record)))
    }

    /// A refund the store does not know, from the command its message
    /// carries: recorded as `failed` (`abandoned`) without a reservation
    /// (none was ever made), so that any later copy is answered with it.
    /// `None` when a copy was claimed meanwhile.
    async fn abandon_unrecorded(
        &self,
        refund_id: &str,
        body: &serde_json::Value,
        who: &str,
    ) -> Result<Option<Abandoned>, ResolveError> {
        let command = match RefundCommand::parse(body.to_string().as_bytes()) {
            Ok(command) if command.refund_id == refund_id => command,
            Ok(_) => {
                return Err(ResolveError::Invalid(format!(
                    "the command given is not refund {refund_id}'s"
                )))
            }
            Err(e) => return self.reject_unreadable(refund_id, body, e).await.map(Some),
        };
        let event = OutcomeEvent::new(refund_id, Status::Failed, &command.echo(), 0)
            .with_error("abandoned", format!("abandoned before any attempt {who}"));
        let mut record = RefundRecord::attempting(&command);
        record.attempts = 0;
        record.transition(
            RefundState::Finished {
                event: event.clone(),
            },
            format!("abandoned before any attempt {who} (nothing was sent)"),
        );
        match self.store.insert_settled(&mut record).await? {
            Claim::Claimed => {}
            Claim::Exists(_) | Claim::OverRefund(_) => return Ok(None),
        }
        self.store.sync_refund(refund_id).await?;
        self.published_abandoned(&record, &event, who, "unrecorded")
            .await?;
        Ok(Some(Abandoned::Recorded(Box::new(record))))
    }

    /// A message that names a refund but is not a valid command: it gets
    /// the `rejected` event intake would have given it (it may never have
    /// been read: expired in the queue), and nothing is recorded.
    async fn reject_unreadable(
        &self,
        refund_id: &str,
        body: &serde_json::Value,
        error: ParseError,
    ) -> Result<Abandoned, ResolveError> {
        let reason = format!("the message is not a valid command: {error}");
        let echo = crate::contract::command::Echo::of_body(body.to_string().as_bytes())
            .map(|(_, echo)| echo)
            .unwrap_or_default();
        let event = OutcomeEvent::new(refund_id, Status::Rejected, &echo, 0)
            .with_error("invalid_command", reason.clone());
        self.publish_side(&event)
            .await
            .map_err(ResolveError::Publish)?;
        Ok(Abandoned::Rejected(reason))
    }

    /// A message reusing a recorded refund's id for another command: it
    /// is answered `conflicting_payload`, and the refund is left as it is.
    async fn reject_other(
        &self,
        refund_id: &str,
        other: &RefundCommand,
    ) -> Result<Abandoned, ResolveError> {
        let reason = format!(
            "refund_id {refund_id} was already used for a different command; the original \
             refund is not affected"
        );
        let event = OutcomeEvent::new(refund_id, Status::Rejected, &other.echo(), 0)
            .with_error("conflicting_payload", reason.clone());
        self.publish_side(&event)
            .await
            .map_err(ResolveError::Publish)?;
        Ok(Abandoned::Rejected(reason))
    }

    async fn published_abandoned(
        &self,
        record: &RefundRecord,
        event: &OutcomeEvent,
        who: &str,
        was: &str,
    ) -> Result<(), ResolveError> {
        metrics::outcome(
            self.providers.label(&record.command.provider),
            Some(record.command.operation),
            "failed",
        );
        warn!(refund_id = record.refund_id.as_str(), %who, was, "refund abandoned: it will not be sent");
        self.publish_outside_delivery(event)
            .await
            .map_err(ResolveError::Publish)
    }

    /// Releases a refund's over-refund reservation that nothing else will
    /// ever settle (for example one left by a version before reservations
    /// and records were written together). Refused while the refund may
    /// still be paid or was paid, and for a reservation that stands for a
    /// paid refund even when its record is long gone. Returns the amounts
    /// released.
    pub async fn release(
        &self,
        refund_id: &str,
        decision: Decision,
    ) -> Result<Vec<u64>, ResolveError> {
        let who = who(&decision.by, &decision.reason)?;
        let _guard = self.locks.lock(refund_id).await;
        let mut record = match self.store.lookup(refund_id).await? {
            Some(Known::Record(record)) => Some(*record),
            Some(Known::Tombstone(t)) if t.status == Status::Succeeded => {
                return Err(ResolveError::WrongState {
                    refund_id: refund_id.to_string(),
                    state: "succeeded".into(),
                    why: "it was paid: its reservation stands".into(),
                })
            }
            Some(Known::Tombstone(_)) | None => None,
        };
        if let Some(record) = &record {
            let allowed = match &record.state {
                RefundState::Finished { event } => event.status != Status::Succeeded,
                _ => false,
            };
            if !allowed {
                return Err(wrong_state(
                    record,
                    "it may still be paid or was paid; resolve or abandon it instead",
                ));
            }
        }
        let released = match self.store.release(refund_id).await? {
            Ok(released) => released,
            Err(paid) => {
                return Err(ResolveError::WrongState {
                    refund_id: refund_id.to_string(),
                    state: "succeeded".into(),
                    why: format!(
                        "its ledger entry of {} stands for a paid refund: it is never released",
                        paid.amount
                    ),
                })
            }
        };
        if let Some(record) = &mut record {
            record.transition(
                record.state.clone(),
                format!("reservation of {released:?} released {who}"),
            );
            self.store.annotate(record).await?;
        }
        self.store.sync_refund(refund_id).await?;
        warn!(refund_id, ?released, %who, "over-refund reservation released by an operator");
        Ok(released)
    }
}

/// The carrier's command, when it is a valid command other than the
/// recorded one.
fn another_command(record: &RefundRecord, carrier: &Carrier) -> Option<RefundCommand> {
    let command = RefundCommand::parse(carrier.body.to_string().as_bytes()).ok()?;
    (command.payload_hash() != record.payload_hash).then_some(command)
}
