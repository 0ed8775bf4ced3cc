//! The record of one refund: its lifecycle state, the command that
//! claimed it and its history; and the tombstone a finished record becomes
//! after `store.retention`. Plain data; the store decides where it lives.

use crate::contract::command::{Operation, RefundCommand};
use crate::contract::event::{now_rfc3339, OutcomeEvent, Status};
use serde::{Deserialize, Serialize};

/// Where a refund is in its life.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RefundState {
    /// A provider request is (or was) on its way. Written and synced before
    /// the request leaves; found after a restart it means "outcome unknown".
    Attempting {
        /// When the attempt started.
        since: String,
    },
    /// The last attempt surely did not reach the provider: a new attempt is
    /// safe.
    NotSent {
        /// Why it was not sent.
        reason: String,
    },
    /// The provider accepted it and will post the final answer (Paynet).
    Pending {
        /// The `pending` event.
        event: OutcomeEvent,
        /// Since when.
        since: String,
    },
    /// The final outcome, synced before its event is published.
    Finished {
        /// The event, re-published as is on every redelivery.
        event: OutcomeEvent,
    },
    /// The provider may or may not have executed it; a person must decide.
    InDoubt {
        /// The `in_doubt` event.
        event: OutcomeEvent,
    },
}

impl RefundState {
    /// Short name for logs and listings.
    pub fn name(&self) -> &'static str {
        match self {
            RefundState::Attempting { .. } => "attempting",
            RefundState::NotSent { .. } => "not_sent",
            RefundState::Pending { .. } => "pending",
            RefundState::Finished { .. } => "finished",
            RefundState::InDoubt { .. } => "in_doubt",
        }
    }

    /// The event this state publishes, if any (`pending`, the final one,
    /// `in_doubt`): what the outbox re-publishes until it is confirmed.
    pub fn event(&self) -> Option<&OutcomeEvent> {
        match self {
            RefundState::Pending { event, .. }
            | RefundState::Finished { event }
            | RefundState::InDoubt { event } => Some(event),
            RefundState::Attempting { .. } | RefundState::NotSent { .. } => None,
        }
    }
}

/// One line of a refund's history, for operators.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// When.
    pub at: String,
    /// What happened.
    pub note: String,
}

/// What one provider request carried, recorded before it left: after a
/// crash or a lost answer, whether repeating it is safe is decided from
/// this, never from today's configuration (an account renamed, pointed at
/// another terminal or switched to deduplication since).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptTrace {
    /// The attempt's number (1 for the first).
    pub number: u32,
    /// The account's kind (`hyp_pay`, `creditguard`, `paynet`).
    pub kind: String,
    /// The provider's deduplication id the request carried (CreditGuard
    /// `requestId` with `mayBeDuplicate`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The terminal the request went to, where the kind has one
    /// (CreditGuard's deduplication holds per terminal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal: Option<String>,
    /// When it started (RFC 3339).
    pub at: String,
}

/// The stored record of one refund.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefundRecord {
    /// Key.
    pub refund_id: String,
    /// Hash of the normalised command that claimed this `refund_id`.
    pub payload_hash: String,
    /// That command.
    pub command: RefundCommand,
    /// Lifecycle state.
    pub state: RefundState,
    /// Provider requests started so far.
    pub attempts: u32,
    /// Unguessable per-refund token of the provider callback URL (Paynet).
    #[serde(default)]
    pub callback_token: String,
    /// How many times the refund went in doubt; each episode has its own
    /// `in_doubt` event id, so consumers that dedupe see every episode.
    #[serde(default)]
    pub in_doubt_episodes: u32,
    /// First seen.
    pub created_at: String,
    /// Last change.
    pub updated_at: String,
    /// What happened, in order.
    pub history: Vec<HistoryEntry>,
    /// What the latest attempt carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<AttemptTrace>,
    /// Attempts whose outcome is unknown: each may have reached the
    /// provider. While one is listed, nothing settles the refund as "not
    /// paid" (abandon, an edit) until an operator resolved it or the
    /// provider answered a repeat of the same request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uncertain: Vec<AttemptTrace>,
    /// The store's revision of this record when it was read or last
    /// written (PostgreSQL compares it on every write); not stored in the
    /// record itself.
    #[serde(skip)]
    pub revision: i64,
    /// A payout's daily limit as configured when this process claims it
    /// (`store::ledger::claim_limit`); not stored.
    #[serde(skip)]
    pub daily_limit: Option<u64>,
}

impl RefundRecord {
    /// A fresh record in the `Attempting` state for the first attempt.
    pub fn attempting(command: &RefundCommand) -> Self {
        let now = now_rfc3339();
        RefundRecord {
            refund_id: command.refund_id.clone(),
            payload_hash: command.payload_hash(),
            command: command.clone(),
            state: RefundState::Attempting { since: now.clone() },
            attempts: 1,
            callback_token: random_token(),
            in_doubt_episodes: 0,
            created_at: now.clone(),
            updated_at: now.clone(),
            history: vec![HistoryEntry {
                at: now,
                note: "attempt 1 started".into(),
            }],
            attempt: None,
            uncertain: Vec::new(),
            revision: 0,
            daily_limit: None,
        }
    }

    /// The status an operator sees: the event status of a finished refund,
    /// otherwise the lifecycle state (`attempting`, `not_sent`, `pending`,
    /// `in_doubt`).
    pub fn status(&self) -> &'static str {
        match &self.state {
            RefundState::Finished { event } => event.status.as_str(),
            other => other.name(),
        }
    }

    /// Notes that the latest attempt's outcome is unknown (its answer was
    /// lost, or the worker stopped during it). An attempt without a record
    /// of what it carried (written by an older version) counts as one that
    /// carried no deduplication id.
    pub fn note_uncertain(&mut self) {
        let trace = self.attempt.clone().unwrap_or_else(|| AttemptTrace {
            number: self.attempts,
            kind: "unknown".into(),
            request_id: None,
            terminal: None,
            at: self.updated_at.clone(),
        });
        if !self.uncertain.iter().any(|u| u.number == trace.number) {
            self.uncertain.push(trace);
        }
    }

    /// The provider answered the latest attempt: earlier attempts that
    /// carried the same deduplication id to the same terminal are answered
    /// with it (the provider returns the first answer to a repeat).
    pub fn answered(&mut self) {
        let Some(last) = &self.attempt else {
            return;
        };
        if last.request_id.is_none() {
            return;
        }
        self.uncertain.retain(|u| {
            !(u.request_id == last.request_id && u.terminal == last.terminal && u.kind == last.kind)
        });
    }

    /// Whether an attempt may have reached the provider without an answer
    /// that settles it (the refund is in doubt, or a request with an
    /// unknown outcome was followed by one that was not sent).
    pub fn may_have_been_paid_unseen(&self) -> bool {
        matches!(self.state, RefundState::InDoubt { .. }) || !self.uncertain.is_empty()
    }

    /// Moves to `state`, noting why.
    pub fn transition(&mut self, state: RefundState, note: impl Into<String>) {
        let now = now_rfc3339();
        self.state = state;
        self.updated_at = now.clone();
        self.history.push(HistoryEntry {
            at: now,
            note: note.into(),
        });
    }
}

/// What is left of a finished refund after `store.retention`: enough to
/// recognise every later copy of its command and answer it with the
/// recorded outcome, so it never reaches a provider again. Kept for
/// `store.tombstone_retention`. Field names are short: there is one per
/// finished refund.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    /// Hash of the command that claimed the refund.
    #[serde(rename = "h")]
    pub payload_hash: String,
    /// The final event's id.
    #[serde(rename = "e")]
    pub event_id: String,
    /// The final status.
    #[serde(rename = "s")]
    pub status: Status,
    /// What the provider performed.
    #[serde(rename = "p", default, skip_serializing_if = "Option::is_none")]
    pub performed: Option<Operation>,
    /// The provider's transaction id.
    #[serde(rename = "t", default, skip_serializing_if = "Option::is_none")]
    pub provider_transaction_id: Option<String>,
    /// The provider's code.
    #[serde(rename = "c", default, skip_serializing_if = "Option::is_none")]
    pub provider_code: Option<String>,
    /// The provider's message.
    #[serde(rename = "m", default, skip_serializing_if = "Option::is_none")]
    pub provider_message: Option<String>,
    /// The worker's error kind (declined, abandoned).
    #[serde(rename = "k", default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
    /// Provider calls made.
    #[serde(rename = "a")]
    pub attempts: u32,
    /// When the outcome was decided (RFC 3339).
    #[serde(rename = "o")]
    pub occurred_at: String,
    /// When the record became this tombstone (RFC 3339).
    #[serde(rename = "d")]
    pub pruned_at: String,
    /// The provider account (for reports over pruned refunds).
    #[serde(rename = "v", default)]
    pub provider: String,
    /// The amount asked for, if the command had one.
    #[serde(rename = "n", default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<crate::contract::money::Amount>,
    /// Set for a payout only (reports count payouts apart).
    #[serde(rename = "y", default, skip_serializing_if = "Option::is_none")]
    pub payout: Option<bool>,
}

impl Tombstone {
    /// The tombstone of a finished record; `None` for any other state.
    pub fn of(record: &RefundRecord) -> Option<Self> {
        let RefundState::Finished { event } = &record.state else {
            return None;
        };
        Some(Tombstone {
            payload_hash: record.payload_hash.clone(),
            event_id: event.event_id.clone(),
            status: event.status,
            performed: event.performed,
            provider_transaction_id: event.provider_transaction_id.clone(),
            provider_code: event.provider_code.clone(),
            provider_message: event.provider_message.clone(),
            error_kind: event.error.as_ref().map(|e| e.kind.clone()),
            attempts: event.attempts,
            occurred_at: event.occurred_at.clone(),
            pruned_at: now_rfc3339(),
            provider: record.command.provider.clone(),
            amount: record.command.amount.clone(),
            payout: (record.command.operation == crate::contract::command::Operation::Payout)
                .then_some(true),
        })
    }

    /// The recorded outcome again, for a copy of the same command: the echo
    /// fields come from that copy (same payload hash, so the same values).
    pub fn event(&self, command: &RefundCommand) -> OutcomeEvent {
        let mut event = OutcomeEvent::new(
            &command.refund_id,
            self.status,
            &command.echo(),
            self.attempts,
        );
        event.event_id = self.event_id.clone();
        event.performed = self.performed;
        event.provider_transaction_id = self.provider_transaction_id.clone();
        event.provider_code = self.provider_code.clone();
        event.provider_message = self.provider_message.clone();
        event.occurred_at = self.occurred_at.clone();
        if let Some(kind) = &self.error_kind {
            event = event.with_error(
                kind,
                format!(
                    "recorded outcome of a refund finished at {} (details pruned)",
                    self.occurred_at
                ),
            );
        }
        event
    }
}

/// 32 hex characters from the OS's random source.
///
/// The bytes come from a per-thread pool that one `getrandom` call fills
/// with [`TOKEN_POOL_BYTES`], so a refund costs no system call of its own
/// (it was one per refund, 0.5 % of the worker's samples at prefetch 64).
/// Every byte goes into one token only and is wiped from the pool when
/// taken.
fn random_token() -> String {
    thread_local! {
        static POOL: std::cell::RefCell<TokenPool> = const {
            std::cell::RefCell::new(TokenPool {
                bytes: [0; TOKEN_POOL_BYTES],
                next: TOKEN_POOL_BYTES,
            })
        };
    }
    let bytes = POOL.with(|pool| pool.borrow_mut().take());
    crate::contract::command::hex(&bytes)
}

/// Random bytes for 256 tokens.
const TOKEN_POOL_BYTES: usize = 4096;

/// Random bytes not yet used; `next` is the first unused one.
struct TokenPool {
    bytes: [u8; TOKEN_POOL_BYTES],
    next: usize,
}

impl TokenPool {
    fn take(&mut self) -> [u8; 16] {
        if self.next + 16 > self.bytes.len() {
            if getrandom::fill(&mut self.bytes).is_err() {
                // The OS random source does not fail on Linux. Were it to,
                // this one token is all zeros, which only makes callbacks
                // for this refund guessable, never pays twice; the pool
                // stays empty, so the next token tries again.
                return [0; 16];
            }
            self.next = 0;
        }
        let mut token = [0u8; 16];
        let taken = &mut self.bytes[self.next..self.next + 16];
        token.copy_from_slice(taken);
        taken.fill(0);
        self.next += 16;
        token
    }
}

#[cfg(test)]
mod tests {
    use super::random_token;

    #[test]
    fn tokens_are_hex_and_distinct_across_pool_refills() {
        // 1 000 tokens take the pool through four refills.
        let tokens: std::collections::HashSet<String> = (0..1000).map(|_| random_token()).collect();
        assert_eq!(tokens.len(), 1000);
        for token in &tokens {
            assert_eq!(token.len(), 32);
            assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
            assert_ne!(token, &"0".repeat(32));
        }
    }
}
