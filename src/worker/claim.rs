//! Stage 2, claim: under the per-refund lock, the store decides first what
//! this delivery is. A refund seen before (a record, or the tombstone of a
//! pruned one) takes the path its record names whatever today's
//! configuration says (`known.rs`), so a renamed account or a changed rule
//! never turns a decided refund into `rejected`. Only a refund never seen is
//! checked against today's configuration (known account, provider rules),
//! and is then claimed (`Attempting`, with its over-refund reservation, in
//! one write, synced) before any provider call.

use super::admit::Admitted;
use super::park::Unsent;
use super::{PipelineError, Worker};
use crate::broker::publisher::Publisher;
use crate::contract::command::{Operation, RefundCommand};
use crate::contract::event::now_rfc3339;
use crate::providers::Provider;
use crate::store::ledger::OverRefund;
use crate::store::{AttemptTrace, Claim, Known, RefundRecord, RefundState, StoreError};
use lapin::message::Delivery;
use tracing::{debug, info};

/// What the attempt stage needs: the provider, the record (`Attempting`,
/// durable) and the pass through the account's gate.
pub(super) type Claimed<'p> = (&'p Provider, RefundRecord, Admitted);

impl Worker {
    /// The provider and the record to attempt, or `None` when the delivery
    /// was settled here (rejected, duplicate re-published, in doubt parked).
    /// The caller holds the refund's lock.
    pub(super) async fn claim<'p>(
        &'p self,
        publisher: &Publisher,
        delivery: &Delivery,
        command: &RefundCommand,
    ) -> Result<Option<Claimed<'p>>, PipelineError> {
        match self.store.lookup(&command.refund_id).await? {
            None => self.claim_new(publisher, delivery, command).await,
            Some(Known::Tombstone(tombstone)) => {
                if tombstone.payload_hash != command.payload_hash() {
                    let message = format!(
                        "refund_id {} was already used for a different command (finished {}); \
                         the original refund is not affected",
                        command.refund_id, tombstone.occurred_at
                    );
                    self.reject_command(publisher, command, "conflicting_payload", message)
                        .await?;
                    return Ok(None);
                }
                info!(
                    status = tombstone.status.as_str(),
                    "duplicate of a pruned refund: re-publishing its recorded outcome"
                );
                let event = tombstone.event(command);
                publisher.publish_event(&event).await?;
                Ok(None)
            }
            Some(Known::Record(existing)) => {
                self.on_record(publisher, delivery, command, *existing)
                    .await
            }
        }
    }

    /// A refund with a record: the same command continues from it; another
    /// command re-using the id is rejected and changes nothing.
    async fn on_record<'p>(
        &'p self,
        publisher: &Publisher,
        delivery: &Delivery,
        command: &RefundCommand,
        existing: RefundRecord,
    ) -> Result<Option<Claimed<'p>>, PipelineError> {
        if existing.payload_hash != command.payload_hash() {
            let message = format!(
                "refund_id {} was already used for a different command (first seen {}); \
                 the original refund is not affected",
                command.refund_id, existing.created_at
            );
            self.reject_command(publisher, command, "conflicting_payload", message)
                .await?;
            return Ok(None);
        }
        self.continue_known(publisher, delivery, existing).await
    }

    /// A refund never seen: today's configuration decides whether it is
    /// valid; then the record and the reservation are written together.
    async fn claim_new<'p>(
        &'p self,
        publisher: &Publisher,
        delivery: &Delivery,
        command: &RefundCommand,
    ) -> Result<Option<Claimed<'p>>, PipelineError> {
        let Some(provider) = self.providers.get(&command.provider) else {
            let message = format!(
                "provider {:?} is not a configured account (configured: {})",
                command.provider,
                self.providers.names().join(", ")
            );
            self.reject_command(publisher, command, "unknown_provider", message)
                .await?;
            return Ok(None);
        };
        if command.has_masked_token() {
            return self.park_masked(publisher, delivery, command).await;
        }
        if let Err(message) = provider.check(command) {
            self.reject_command(publisher, command, "invalid_command", message)
                .await?;
            return Ok(None);
        }
        let daily_limit = match command.operation {
            Operation::Payout => match provider.payout_rule(command) {
                Ok(limit) => limit,
                Err(refused) => {
                    self.reject_command(publisher, command, refused.kind, refused.message)
                        .await?;
                    return Ok(None);
                }
            },
            _ => None,
        };
        let refund = Unsent {
            refund_id: &command.refund_id,
            provider: &command.provider,
            attempts: 0,
        };
        let Some(admitted) = self.admit(publisher, delivery, refund).await? else {
            return Ok(None);
        };
        let mut fresh = RefundRecord::attempting(command);
        fresh.attempt = Some(provider.trace(&command.refund_id, 1));
        fresh.daily_limit = daily_limit;
        match self.store.claim(&mut fresh).await? {
            Claim::Claimed => {
                self.sync_before_call(&mut fresh).await?;
                debug!("claimed");
                Ok(Some((provider, fresh, admitted)))
            }
            Claim::OverRefund(over) => {
                let (kind, message) = over_limit(command, &over);
                self.reject_command(publisher, command, kind, message)
                    .await?;
                Ok(None)
            }
            // We hold the lock and looked just now: another replica
            // claimed it meanwhile. Its record decides.
            Claim::Exists(existing) => {
                Box::pin(self.on_record(publisher, delivery, command, *existing)).await
            }
        }
    }

    /// A payout read back from a dead letter carries its card token masked;
    /// with no record to take the whole token from, it cannot be sent, and
    /// rejecting it would end a payout an operator can still complete. It
    /// goes back to the dead-letter queue, saying how to supply the token.
    async fn park_masked<'p>(
        &'p self,
        publisher: &Publisher,
        delivery: &Delivery,
        command: &RefundCommand,
    ) -> Result<Option<Claimed<'p>>, PipelineError> {
        let message = format!(
            "payout {} carries a masked card token and has no record to take the whole \
             token from: supply it (refund-worker dlq edit {} --set \
             payout.card_token=<token> --by ... --reason ...)",
            command.refund_id, command.refund_id
        );
        self.poison(
            publisher,
            delivery,
            "card_token_masked",
            message,
            Some(command.refund_id.clone()),
        )
        .await?;
        Ok(None)
    }

    /// What the next attempt of `record` carries: what an earlier attempt
    /// that may have been executed carried (a repeat of that request), or,
    /// when none may have been, what the account sends today. `Err` says
    /// why no attempt may be sent (an earlier one may have been executed
    /// and this account cannot repeat it safely).
    pub(super) fn next_trace(
        record: &RefundRecord,
        provider: &Provider,
    ) -> Result<AttemptTrace, String> {
        let number = record.attempts + 1;
        match record.uncertain.last() {
            None => Ok(provider.trace(&record.refund_id, number)),
            Some(prior) if provider.repeat_is_safe(prior) => Ok(AttemptTrace {
                number,
                at: now_rfc3339(),
                ..prior.clone()
            }),
            Some(prior) => Err(format!(
                "attempt {} went to a {} account{} and may have been executed; \
                 account {:?} cannot repeat it safely ({})",
                prior.number,
                prior.kind,
                prior
                    .request_id
                    .as_ref()
                    .map(|_| " with a deduplication id")
                    .unwrap_or(" without a deduplication id"),
                record.command.provider,
                provider.kind()
            )),
        }
    }

    /// Records a new attempt carrying `trace` durably before the request
    /// leaves, as this process's attempt.
    pub(super) async fn begin_attempt(
        &self,
        record: &mut RefundRecord,
        trace: AttemptTrace,
    ) -> Result<(), StoreError> {
        record.attempts = trace.number;
        let note = format!("attempt {} started", record.attempts);
        record.attempt = Some(trace);
        record.transition(
            RefundState::Attempting {
                since: now_rfc3339(),
            },
            note,
        );
        self.store.take_attempt(record).await?;
        self.sync_before_call(record).await
    }

    /// Makes `Attempting` durable. If that fails the request is not sent,
    /// and the record says so (`NotSent`), so that a later look at it does
    /// not take the failed sync for an attempt whose outcome is unknown.
    pub(super) async fn sync_before_call(
        &self,
        record: &mut RefundRecord,
    ) -> Result<(), StoreError> {
        if let Err(e) = self.store.sync_refund(&record.refund_id).await {
            let reason = format!("the attempt could not be made durable ({e}); nothing was sent");
            self.not_sent_after_all(record, reason).await;
            return Err(e);
        }
        Ok(())
    }

    /// An `Attempting` record whose request did not leave after all: it
    /// says so (best effort; a record left `Attempting` is taken as an
    /// attempt with an unknown outcome, which is never wrong, only
    /// cautious).
    pub(super) async fn not_sent_after_all(&self, record: &mut RefundRecord, reason: String) {
        record.transition(
            RefundState::NotSent {
                reason: reason.clone(),
            },
            reason,
        );
        let _ = self.store.put(record).await;
    }
}

/// The rejection of a claim its ledger refused: the over-refund guard, or
/// a payout's daily limit.
fn over_limit(command: &RefundCommand, over: &OverRefund) -> (&'static str, String) {
    match command.operation {
        Operation::Payout => (
            "payout_daily_limit_exceeded",
            format!(
                "a payout of {} would exceed payouts.daily_limit_minor {} of account {:?} \
                 today (UTC): {} already paid out, in flight or in doubt",
                over.requested, over.original_amount, command.provider, over.reserved
            ),
        ),
        _ => (
            "over_refund",
            format!(
                "refunding {} would exceed original_amount {}: {} already refunded or in flight",
                over.requested, over.original_amount, over.reserved
            ),
        ),
    }
}
