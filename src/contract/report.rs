//! The daily reconciliation report: per provider account, day (UTC, of the
//! outcome) and currency, how many refunds succeeded, failed, are in doubt
//! and are pending, and their sums in minor units, from the store: records
//! and the tombstones of pruned ones (counted by `store/report.rs`; this
//! module is the row and its printing). Rejected commands never reached a
//! provider and are not recorded, so they are not in it. A refund without
//! an amount (a full refund or a cancel) is counted in `without_amount`:
//! its sum is the provider's to tell.

use serde::Serialize;
use time::Date;

/// Count and sum of one kind of outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Tally {
    /// Refunds.
    pub count: u64,
    /// Sum of their amounts (minor units).
    pub minor: u64,
    /// Of `count`, refunds without an amount (not in `minor`).
    pub without_amount: u64,
}

impl Tally {
    /// Counts one outcome (its amount, if it has one).
    pub(crate) fn add(&mut self, minor: Option<u64>) {
        self.count += 1;
        match minor {
            Some(minor) => self.minor += minor,
            None => self.without_amount += 1,
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ReportRow {
    /// Provider account.
    pub provider: String,
    /// `YYYY-MM-DD` (UTC) of the outcome.
    pub day: String,
    /// ISO 4217, or empty for refunds without an amount.
    pub currency: String,
    /// `refund` (refunds and cancels) or `payout`: payouts move money with
    /// no earlier charge, so they are counted apart.
    pub operation: String,
    /// Confirmed by the provider.
    pub succeeded: Tally,
    /// Declined (or abandoned).
    pub failed: Tally,
    /// May or may not have been executed.
    pub in_doubt: Tally,
    /// Accepted, final answer to come.
    pub pending: Tally,
}

/// Parses `YYYY-MM-DD`.
pub fn parse_day(text: &str) -> Result<Date, String> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    Date::parse(text.trim(), &format).map_err(|_| format!("{text:?} is not a date like 2026-11-23"))
}

/// The report as CSV (one header line).
pub fn to_csv(rows: &[ReportRow]) -> String {
    let mut out = String::from(
        "provider,day,currency,operation,succeeded_count,succeeded_minor,failed_count,failed_minor,in_doubt_count,in_doubt_minor,pending_count,pending_minor,without_amount\n",
    );
    for r in rows {
        let without = r.succeeded.without_amount
            + r.failed.without_amount
            + r.in_doubt.without_amount
            + r.pending.without_amount;
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            r.provider,
            r.day,
            r.currency,
            r.operation,
            r.succeeded.count,
            r.succeeded.minor,
            r.failed.count,
            r.failed.minor,
            r.in_doubt.count,
            r.in_doubt.minor,
            r.pending.count,
            r.pending.minor,
            without
        ));
    }
    out
}

/// The report as an aligned table, sums in major units for reading
/// (`1050` ILS is `10.50`).
pub fn to_table(rows: &[ReportRow]) -> String {
    let money = |t: &Tally, currency: &str| {
        let text = if currency.is_empty() {
            "-".to_string()
        } else {
            crate::contract::money::format_decimal(
                t.minor,
                crate::contract::money::minor_digits(currency),
            )
        };
        if t.without_amount > 0 {
            format!("{} / {text} (+{} full)", t.count, t.without_amount)
        } else {
            format!("{} / {text}", t.count)
        }
    };
    let mut out = format!(
        "{:<16} {:<10} {:<4} {:>22} {:>22} {:>22} {:>22}\n",
        "PROVIDER", "DAY", "CUR", "SUCCEEDED", "FAILED", "IN_DOUBT", "PENDING"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<16} {:<10} {:<4} {:>22} {:>22} {:>22} {:>22}\n",
            r.provider,
            r.day,
            if r.currency.is_empty() {
                "-"
            } else {
                &r.currency
            },
            money(&r.succeeded, &r.currency),
            money(&r.failed, &r.currency),
            money(&r.in_doubt, &r.currency),
            money(&r.pending, &r.currency),
        ));
    }
    out
}
