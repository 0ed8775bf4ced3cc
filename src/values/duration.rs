//! Durations in configuration and on the command line: `500ms`, `10s`,
//! `15m`, `2h`, `30d`, or plain seconds. One parser, so `store.retention`
//! and `dlq list --older-than` read the same way.

use serde::Deserialize;
use std::time::Duration;

/// The units a duration may use: milliseconds to weeks. humantime also
/// reads months (`M`) and years, which are refused: `15M` is too easily
/// meant as minutes, and no setting here wants a month.
const UNITS: &[&str] = &[
    "ms", "msec", "s", "sec", "secs", "second", "seconds", "m", "min", "mins", "minute", "minutes",
    "h", "hr", "hrs", "hour", "hours", "d", "day", "days", "w", "week", "weeks",
];

/// Parses a duration: a number with a unit (`500ms`, `10s`, `15m`, `2h`,
/// `30d`, `2w`, or combinations like `1h 30m`) or plain seconds.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    let unknown = text
        .split(|c: char| !c.is_ascii_alphabetic())
        .find(|unit| !unit.is_empty() && !UNITS.contains(unit));
    if let Some(unit) = unknown {
        return Err(format!(
            "{text:?}: unknown unit {unit:?} (use ms, s, m, h, d or w)"
        ));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration like 10s, 15m, 2h, 30d ({e})"))
}

/// Accepts `"30d"`-style strings and plain seconds.
pub(crate) fn optional<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::Seconds(n)) => Ok(Some(Duration::from_secs(n))),
        Some(Raw::Text(t)) => parse(&t).map(Some).map_err(serde::de::Error::custom),
    }
}

/// A duration that must be given when the key is present.
pub(crate) fn required<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    optional(d)?.ok_or_else(|| serde::de::Error::custom("expected a duration like 30s"))
}
