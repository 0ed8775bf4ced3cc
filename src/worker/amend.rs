//! An operator's correction of a command that was never sent (`dlq edit`):
//! the refund's record takes the corrected command, so the corrected copy
//! the edit republishes is the same refund, not a conflicting payload. Only
//! a refund with nothing sent may change: `not_sent` (or no record at all),
//! never one that is in doubt, pending, being attempted or decided. A
//! refund with an over-refund reservation (`original_amount`) cannot be
//! edited: its reservation is for the old command (abandon it and publish
//! a new refund instead).

use super::resolve::{Decision, ResolveError};
use super::Worker;
use crate::contract::command::{ParseError, RefundCommand};
use crate::store::RefundState;
use tracing::warn;

impl Worker {
    /// Puts `command` (the corrected body) in the record of `refund_id`,
    /// noting who, why and what changed. `Ok(false)` when the store has no
    /// record (nothing to amend: the corrected copy is a new refund).
    pub async fn amend(
        &self,
        refund_id: &str,
        command: &serde_json::Value,
        decision: Decision,
        changes: &str,
    ) -> Result<bool, ResolveError> {
        if decision.by.trim().is_empty() || decision.reason.trim().is_empty() {
            return Err(ResolveError::Invalid(
                "who (by) and why (reason) are required".into(),
            ));
        }
        let corrected = match RefundCommand::parse(command.to_string().as_bytes()) {
            Ok(c) => c,
            Err(ParseError::Invalid(i)) => return Err(ResolveError::Invalid(i.message)),
            Err(ParseError::Poison(p)) => return Err(ResolveError::Invalid(p.message)),
        };
        if corrected.refund_id != refund_id {
            return Err(ResolveError::Invalid("refund_id cannot be changed".into()));
        }
        let _guard = self.locks.lock(refund_id).await;
        let Some(mut record) = self.store.get(refund_id).await? else {
            return Ok(false);
        };
        if !matches!(record.state, RefundState::NotSent { .. }) {
            return Err(ResolveError::WrongState {
                refund_id: refund_id.to_string(),
                state: record.status().to_string(),
                why: "only a refund with nothing sent can be edited".into(),
            });
        }
        if let Some(prior) = record.uncertain.first() {
            // Its replay would repeat that request's deduplication id with
            // another body: a wrong answer recorded, or a second payment.
            return Err(ResolveError::WrongState {
                refund_id: refund_id.to_string(),
                state: record.status().to_string(),
                why: format!(
                    "attempt {} may have reached the provider: check with the provider and \
                     resolve it first (refund-worker refunds resolve {refund_id} --executed TXN | \
                     --not-executed), never edit it",
                    prior.number
                ),
            });
        }
        let corrected = keep_payout_rules(&record.command, corrected)?;
        if record.command.original_amount.is_some() || corrected.original_amount.is_some() {
            return Err(ResolveError::Invalid(
                "a refund with original_amount holds an over-refund reservation for its \
                 command: abandon it and publish a new refund instead"
                    .into(),
            ));
        }
        let who = format!("by {}: {}", decision.by.trim(), decision.reason.trim());
        record.payload_hash = corrected.payload_hash();
        record.command = corrected;
        let note = format!("command edited {who}; changes {changes}");
        record.transition(
            RefundState::NotSent {
                reason: note.clone(),
            },
            note,
        );
        self.store.put(&mut record).await?;
        self.store.sync_refund(&record.refund_id).await?;
        warn!(refund_id, %who, changes, "command edited by an operator");
        Ok(true)
    }
}

/// A payout's correction may fix where the money goes (the card token, the
/// holder), not how much or from where: its daily reservation is for that
/// amount on that account. A token left masked (the dead letter's copy)
/// means "unchanged" and takes the recorded one.
fn keep_payout_rules(
    recorded: &RefundCommand,
    mut corrected: RefundCommand,
) -> Result<RefundCommand, ResolveError> {
    let payout = crate::contract::command::Operation::Payout;
    if recorded.operation != payout && corrected.operation != payout {
        return Ok(corrected);
    }
    if corrected.operation != recorded.operation
        || corrected.provider != recorded.provider
        || corrected.amount != recorded.amount
    {
        return Err(ResolveError::Invalid(
            "a payout's operation, account and amount cannot be edited (only payout.*, \
             order_id, reason and metadata): abandon it and publish a new payout instead"
                .into(),
        ));
    }
    if let (Some(new), Some(old)) = (corrected.payout.as_mut(), recorded.payout.as_ref()) {
        if new.card_token.is_masked() {
            if new.card_token.last4() != old.card_token.last4() {
                return Err(ResolveError::Invalid(
                    "payout.card_token is masked and does not end like the recorded one: \
                     give the whole token"
                        .into(),
                ));
            }
            new.card_token = old.card_token.clone();
        }
    }
    Ok(corrected)
}
