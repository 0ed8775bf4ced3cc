//! The outbox: which recorded events the broker has not confirmed yet. A
//! mark (refund id → event id and when) is written with the record
//! ([`Store::commit`]), taken off after the broker's confirm
//! ([`Store::mark_published`]); the sweep (`worker/outbox.rs`) publishes
//! what is left.

use super::journal::TreeId;
use super::{unix_now, Store, StoreError};
use std::time::Duration;

/// An unconfirmed event, as the outbox holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// The refund.
    pub refund_id: String,
    /// The event the broker has not confirmed.
    pub event_id: String,
    /// When it was recorded (Unix seconds).
    pub since: u64,
}

impl Store {
    /// The broker confirmed `event_id`: take the refund off the outbox,
    /// unless a newer event replaced it meanwhile (then the newer mark is
    /// put back). Callers hold the refund's lock, so nothing else writes
    /// this mark in between. Not synced: if this is lost in a crash, the
    /// event is published once more (same id).
    pub fn mark_published(&self, refund_id: &str, event_id: &str) -> Result<(), StoreError> {
        if let Some(journal) = self.journal() {
            let outbox = &self.outbox;
            return journal.write(|w| {
                let current = w.read(TreeId::Outbox, outbox, refund_id.as_bytes())?;
                let same = current
                    .and_then(|bytes| parse_outbox(refund_id, &bytes))
                    .is_some_and(|e| e.event_id == event_id);
                if same {
                    w.put(refund_id, TreeId::Outbox, refund_id, None, None);
                }
                Ok(())
            });
        }
        let key = refund_id.as_bytes();
        if let Some(removed) = self.outbox.remove(key)? {
            if parse_outbox(refund_id, &removed).is_some_and(|e| e.event_id != event_id) {
                self.outbox.insert(key, removed)?;
            }
        }
        Ok(())
    }

    /// The refund's outbox mark, if its event is still unconfirmed.
    pub fn outbox_mark(&self, refund_id: &str) -> Result<Option<OutboxEntry>, StoreError> {
        let key = refund_id.as_bytes();
        let bytes = match self.overlay(TreeId::Outbox, key) {
            Some(pending) => pending,
            None => self.outbox.get(key)?.map(|value| value.to_vec()),
        };
        Ok(bytes.and_then(|bytes| parse_outbox(refund_id, &bytes)))
    }

    /// Events recorded at least `min_age` ago and not confirmed since.
    /// Blocking: walks the outbox (small: only unconfirmed events).
    pub fn unconfirmed(&self, min_age: Duration) -> Result<Vec<OutboxEntry>, StoreError> {
        let now = unix_now();
        let mut out = Vec::new();
        for item in self.outbox.iter() {
            let (key, value) = item?;
            let refund_id = String::from_utf8_lossy(&key).to_string();
            if let Some(entry) = parse_outbox(&refund_id, &value) {
                if now.saturating_sub(entry.since) >= min_age.as_secs() {
                    out.push(entry);
                }
            }
        }
        Ok(out)
    }

    /// Events not confirmed yet.
    pub fn unconfirmed_len(&self) -> usize {
        self.outbox.len()
    }
}

pub(super) fn outbox_value(event_id: &str, since: u64) -> String {
    format!("{event_id} {since}")
}

pub(super) fn parse_outbox(refund_id: &str, bytes: &[u8]) -> Option<OutboxEntry> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (event_id, since) = text.split_once(' ')?;
    Some(OutboxEntry {
        refund_id: refund_id.to_string(),
        event_id: event_id.to_string(),
        since: since.parse().ok()?,
    })
}
