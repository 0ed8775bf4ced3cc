//! This replica's lease: a row in `replicas` whose `lease_until` the
//! replica pushes forward every third of `store.postgres.lease`, on the
//! database's clock. While it is alive the refunds this replica is
//! attempting are its own: a copy elsewhere waits. Once it has expired
//! (the replica killed, frozen, cut off from the database) another replica
//! settles them from their records, and this one is fenced: an expired
//! lease is never renewed (the replica registers a new one), and a write
//! that acts on a record it read before someone else wrote it does not
//! land (the revision compare).
//!
//! The replica also keeps a local bound, on its own monotonic clock: the
//! time of the last renewal that succeeded plus the lease, less a margin.
//! Before a provider call it checks that bound, so a replica frozen past
//! its lease does not send a request when it wakes up.

use super::{unavailable, PgShared};
use crate::store::StoreError;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// What a renewal keeps back from the lease on this replica's own clock
/// (network and scheduling delays between the database's clock and ours).
const MARGIN: Duration = Duration::from_secs(1);

impl PgShared {
    /// Registers a new lease for this process; its id owns the refunds it
    /// claims from now on.
    pub(super) async fn register(&self) -> Result<(), StoreError> {
        let sent = Instant::now();
        let client = self.client().await?;
        let lease = self.lease_secs();
        let row = client
            .query_one(
                "INSERT INTO replicas (name, lease_until) \
                 VALUES ($1, now() + make_interval(secs => $2)) RETURNING id",
                &[&self.name, &lease],
            )
            .await
            .map_err(unavailable)?;
        let id: i64 = row.get(0);
        self.me.store(id, Ordering::SeqCst);
        self.renewed(sent);
        info!(
            replica = id,
            name = self.name.as_str(),
            "registered this replica's lease"
        );
        Ok(())
    }

    /// Pushes the lease forward; `Ok(false)` when it had expired already
    /// (then this replica registers a new one).
    async fn renew(&self) -> Result<bool, StoreError> {
        let sent = Instant::now();
        let client = self.client().await?;
        let lease = self.lease_secs();
        let me = self.me.load(Ordering::SeqCst);
        let renewed = client
            .execute(
                "UPDATE replicas SET lease_until = now() + make_interval(secs => $2) \
                 WHERE id = $1 AND lease_until > now()",
                &[&me, &lease],
            )
            .await
            .map_err(unavailable)?;
        if renewed == 1 {
            self.renewed(sent);
        }
        Ok(renewed == 1)
    }

    fn renewed(&self, sent: Instant) {
        let until = sent + self.lease.saturating_sub(MARGIN);
        *self.valid_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(until);
        self.healthy.store(true, Ordering::SeqCst);
    }

    fn lease_secs(&self) -> f64 {
        self.lease.as_secs_f64()
    }

    /// Whether this replica's lease surely still holds now (its own clock).
    pub(super) fn lease_holds(&self) -> bool {
        self.valid_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|until| Instant::now() < until)
    }

    /// Keeps the lease alive until `stop` is set; marks the store unhealthy
    /// while the database does not answer.
    pub(super) async fn keep_alive(self: std::sync::Arc<Self>) {
        let every = self.lease / 3;
        loop {
            tokio::select! {
                _ = self.stop.notified() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if !self.migrated.load(Ordering::SeqCst) || self.me.load(Ordering::SeqCst) == 0 {
                match self.prepare().await {
                    Ok(()) => info!("the database answers: taking refunds again"),
                    Err(e) => self.unhealthy(&StoreError::Unavailable(e.to_string())),
                }
                continue;
            }
            let result = self.renew().await;
            match result {
                Ok(true) => {}
                Ok(false) => {
                    error!("this replica's lease expired (frozen or cut off longer than store.postgres.lease): other replicas settle what it was attempting; registering a new lease");
                    if let Err(e) = self.register().await {
                        self.unhealthy(&e);
                    }
                }
                Err(e) => self.unhealthy(&e),
            }
        }
    }

    fn unhealthy(&self, e: &StoreError) {
        if self.healthy.swap(false, Ordering::SeqCst) {
            warn!(error = %e, "the database does not answer: not taking refunds until it does");
        }
    }

    /// Ends the lease at once (a clean stop): what this replica left
    /// attempting is settled by the others without waiting.
    pub(super) async fn release(&self) {
        let me = self.me.load(Ordering::SeqCst);
        if let Ok(client) = self.client().await {
            let _ = client
                .execute(
                    "UPDATE replicas SET lease_until = now() WHERE id = $1",
                    &[&me],
                )
                .await;
        }
        *self.valid_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}
