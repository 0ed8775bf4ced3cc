//! The reconciliation report's counting over the store's records and the
//! tombstones of pruned ones (`crate::contract::report` holds the row and prints it).

use crate::contract::event::Status;
use crate::contract::report::ReportRow;
use crate::store::{RefundRecord, RefundState, Tombstone};
use std::collections::BTreeMap;
use time::Date;

/// The day of an RFC 3339 time.
fn day_of(at: &str) -> Option<Date> {
    time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.to_offset(time::UtcOffset::UTC).date())
}

/// The report for the days `from..=to` over `records` and the
/// `tombstones` of pruned refunds (by refund id). A refund being pruned can
/// have both for a moment: the record counts.
pub(crate) fn tally(
    records: impl Iterator<Item = RefundRecord>,
    tombstones: impl Iterator<Item = (String, Tombstone)>,
    from: Date,
    to: Date,
) -> Vec<ReportRow> {
    let mut rows: BTreeMap<(String, String, String, &str), ReportRow> = BTreeMap::new();
    let mut count = |provider: &str,
                     at: &str,
                     amount: Option<&crate::contract::money::Amount>,
                     status: Status,
                     payout: bool| {
        let Some(day) = day_of(at).filter(|d| *d >= from && *d <= to) else {
            return;
        };
        let currency = amount.map(|a| a.currency.clone()).unwrap_or_default();
        let operation = if payout { "payout" } else { "refund" };
        let key = (
            provider.to_string(),
            day.to_string(),
            currency.clone(),
            operation,
        );
        let row = rows.entry(key).or_insert_with(|| ReportRow {
            provider: provider.to_string(),
            day: day.to_string(),
            currency,
            operation: operation.to_string(),
            ..Default::default()
        });
        let tally = match status {
            Status::Succeeded => &mut row.succeeded,
            Status::Failed => &mut row.failed,
            Status::InDoubt => &mut row.in_doubt,
            Status::Pending => &mut row.pending,
            Status::Rejected => return,
        };
        tally.add(amount.map(|a| a.minor));
    };
    let mut recorded = std::collections::HashSet::new();
    for record in records {
        recorded.insert(record.refund_id.clone());
        if let Some(event) = record.state.event() {
            let status = match &record.state {
                RefundState::InDoubt { .. } => Status::InDoubt,
                RefundState::Pending { .. } => Status::Pending,
                _ => event.status,
            };
            count(
                &record.command.provider,
                &event.occurred_at,
                record.command.amount.as_ref(),
                status,
                record.command.operation == crate::contract::command::Operation::Payout,
            );
        }
    }
    for (refund_id, t) in tombstones {
        if recorded.contains(&refund_id) {
            continue;
        }
        let payout = t.payout.unwrap_or(false);
        count(
            &t.provider,
            &t.occurred_at,
            t.amount.as_ref(),
            t.status,
            payout,
        );
    }
    rows.into_values().collect()
}
