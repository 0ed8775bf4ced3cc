//! `refund-bench tombstones`: what N tombstones of pruned refunds take in a
//! sled store on disk (the figure behind `store.tombstone_retention`'s
//! sizing in docs/configuration.md). A measurement, not a test: it prints.

use refund_worker::contract::command::Operation;
use refund_worker::contract::event::{event_id, Status};
use refund_worker::store::{SledOptions, Tombstone};
use std::path::Path;

/// Writes `n` typical tombstones into a fresh store and prints its size.
pub async fn run(n: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = refund_worker::store::sled::SledStore::open(dir.path(), SledOptions::default())?;
    for i in 0..n {
        let refund_id = format!("rf-2026-{i:09}");
        store.put_tombstone(&refund_id, &typical(&refund_id, i))?;
    }
    store.sync("").await?;
    store.close().await?;
    drop(store);
    let size = dir_size(dir.path());
    println!(
        "{n} tombstones: store {:.1} MiB on disk, {:.0} bytes per refund",
        size as f64 / (1024.0 * 1024.0),
        size as f64 / n.max(1) as f64
    );
    Ok(())
}

/// A CreditGuard refund that succeeded, as the pruner keeps it.
fn typical(refund_id: &str, i: u64) -> Tombstone {
    Tombstone {
        payload_hash: format!("{:064x}", u128::from(i) * 0x9e37_79b9_7f4a_7c15),
        event_id: event_id(refund_id, Status::Succeeded),
        status: Status::Succeeded,
        performed: Some(Operation::Refund),
        provider_transaction_id: Some(format!("{}", 400_000_000 + i)),
        provider_code: Some("000".into()),
        provider_message: Some("Permitted transaction".into()),
        error_kind: None,
        attempts: 1,
        occurred_at: "2026-11-22T10:15:00Z".into(),
        pruned_at: "2026-12-22T10:15:00Z".into(),
        provider: "creditguard".into(),
        amount: Some(refund_worker::contract::money::Amount {
            minor: 20_000,
            currency: "ILS".into(),
        }),
        payout: None,
    }
}

fn dir_size(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}
