//! In-process, per-`refund_id` locks. Two deliveries of the same refund that
//! are in flight at once (two copies in one prefetch window, or a redelivery
//! while a slow provider call is still running) are serialised here, so the
//! second one reads the record the first one left and never reaches the
//! provider. The store stays the authority across restarts; this only makes
//! "the record says Attempting" mean "a previous process was attempting".

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

/// The lock table; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct RefundLocks {
    table: Arc<Mutex<HashMap<String, Arc<AsyncMutex<()>>>>>,
}

/// Holds one refund's lock; the table entry goes when the last holder or
/// waiter is done.
#[derive(Debug)]
pub struct RefundGuard {
    refund_id: String,
    table: Arc<Mutex<HashMap<String, Arc<AsyncMutex<()>>>>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl RefundLocks {
    /// Waits for the lock of `refund_id`.
    pub async fn lock(&self, refund_id: &str) -> RefundGuard {
        let mutex = {
            let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
            table
                .entry(refund_id.to_string())
                .or_insert_with(|| Arc::new(AsyncMutex::new(())))
                .clone()
        };
        let guard = mutex.lock_owned().await;
        RefundGuard {
            refund_id: refund_id.to_string(),
            table: self.table.clone(),
            guard: Some(guard),
        }
    }

    /// Refunds currently locked or waited for.
    pub fn len(&self) -> usize {
        self.table.lock().map(|t| t.len()).unwrap_or(0)
    }

    /// Whether no refund is locked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for RefundGuard {
    fn drop(&mut self) {
        // Release the async lock first, then drop the table entry if no one
        // else holds or waits for it (the table's Arc is the only one left).
        self.guard.take();
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mutex) = table.get(&self.refund_id) {
            if Arc::strong_count(mutex) == 1 {
                table.remove(&self.refund_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn serialises_one_refund_and_cleans_up() {
        let locks = RefundLocks::default();
        let first = locks.lock("r1").await;
        let other = locks.lock("r2").await; // a different refund is not blocked
        let locks2 = locks.clone();
        let waiter = tokio::spawn(async move { locks2.lock("r1").await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(first);
        let second = waiter.await.expect("waiter");
        drop(second);
        drop(other);
        assert!(locks.is_empty());
    }
}
