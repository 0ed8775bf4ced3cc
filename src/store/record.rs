//! The record of one refund: its lifecycle state, the command that
//! claimed it and its history. Plain data; the store decides where it lives.

use crate::command::RefundCommand;
use crate::event::{now_rfc3339, OutcomeEvent};
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
}

/// One line of a refund's history, for operators.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// When.
    pub at: String,
    /// What happened.
    pub note: String,
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
    /// First seen.
    pub created_at: String,
    /// Last change.
    pub updated_at: String,
    /// What happened, in order.
    pub history: Vec<HistoryEntry>,
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
            created_at: now.clone(),
            updated_at: now.clone(),
            history: vec![HistoryEntry {
                at: now,
                note: "attempt 1 started".into(),
            }],
        }
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

/// 32 hex characters from the OS's random source.
fn random_token() -> String {
    let mut bytes = [0u8; 16];
    // The OS random source does not fail on Linux; an all-zero token would
    // only make callbacks for this one refund guessable, never pay twice.
    let _ = getrandom::fill(&mut bytes);
    crate::command::hex(&bytes)
}
