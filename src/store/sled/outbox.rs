//! The outbox in sled: a mark (refund id → event id and when) is written
//! with the record ([`SledStore::commit`]) and taken off after the broker's
//! confirm ([`SledStore::mark_published`]); the sweep (`worker/outbox.rs`)
//! publishes what is left.

use super::SledStore;
use crate::store::{unix_now, OutboxEntry, StoreError};
use std::time::Duration;

impl SledStore {
    /// The broker confirmed `event_id`: take the refund off the outbox,
    /// unless a newer event replaced it meanwhile.
    pub fn mark_published(&self, refund_id: &str, event_id: &str) -> Result<(), StoreError> {
        let trees = self.trees()?;
        let key = refund_id.as_bytes();
        let Some(current) = trees.outbox.get(key)? else {
            return Ok(());
        };
        if parse_outbox(refund_id, &current).is_some_and(|e| e.event_id == event_id) {
            // Only this mark: a newer one written meanwhile stays.
            let _ = trees
                .outbox
                .compare_and_swap(key, Some(current), None as Option<&[u8]>)?;
        }
        Ok(())
    }

    /// The refund's outbox mark, if its event is still unconfirmed.
    pub fn outbox_mark(&self, refund_id: &str) -> Result<Option<OutboxEntry>, StoreError> {
        let bytes = self.trees()?.outbox.get(refund_id.as_bytes())?;
        Ok(bytes.and_then(|bytes| parse_outbox(refund_id, &bytes)))
    }

    /// Events recorded at least `min_age` ago and not confirmed since, at
    /// most `limit`. Blocking: walks the outbox (small: only unconfirmed
    /// events).
    pub fn unconfirmed(
        &self,
        min_age: Duration,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let now = unix_now();
        let mut out = Vec::new();
        for item in self.trees()?.outbox.iter() {
            let (key, value) = item?;
            let refund_id = String::from_utf8_lossy(&key).to_string();
            if let Some(entry) = parse_outbox(&refund_id, &value) {
                if now.saturating_sub(entry.since) >= min_age.as_secs() {
                    out.push(entry);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
        }
        out.sort_by_key(|e| e.since);
        Ok(out)
    }
}

pub(super) fn outbox_value(event_id: &str, since: u64) -> String {
    format!("{event_id} {since}")
}

pub(crate) fn parse_outbox(refund_id: &str, bytes: &[u8]) -> Option<OutboxEntry> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (event_id, since) = text.split_once(' ')?;
    Some(OutboxEntry {
        refund_id: refund_id.to_string(),
        event_id: event_id.to_string(),
        since: since.parse().ok()?,
    })
}
