//! Durations in configuration and on the command line: `500ms`, `10s`,
//! `15m`, `2h`, `30d`, or plain seconds. One parser, so `store.retention`
//! and `dlq list --older-than` read the same way.

use serde::Deserialize;
use std::time::Duration;

/// Parses a duration: a number with a unit (`500ms`, `10s`, `15m`, `2h`,
/// `30d`) or plain seconds.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 10s, 15m, 2h, 30d"))?;
    let unit_secs = match unit.trim() {
        "ms" => return Ok(Duration::from_millis(n)),
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use ms, s, m, h or d)"
            ))
        }
    };
    n.checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
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
