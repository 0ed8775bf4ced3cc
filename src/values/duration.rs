//! Durations in configuration and on the command line: `500ms`, `10s`,
//! `15m`, `2h`, `30d`, or plain seconds. One parser, so `store.retention`
//! and `dlq list --older-than` read the same way.

use serde::Deserialize;
use std::time::Duration;

/// Parses a duration: a number with a unit (`500ms`, `10s`, `15m`, `2h`,
/// `30d`, or humantime's combinations like `1h 30m`) or plain seconds.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
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
