//! A wrapper for credentials so they never reach a log line, an event, an
//! error message or a panic: `Debug` and `Display` print a placeholder and the
//! value is reachable only through [`Secret::expose`], which greps well.

use serde::{Deserialize, Deserializer};
use std::fmt;

/// A secret string (password, API key, URL with credentials).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The raw value, for the one place that must send it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when no value was configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([REDACTED])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}

impl schemars::JsonSchema for Secret {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Secret".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        String::json_schema(generator)
    }
}

/// The URLs of a secret that holds one URL or several separated by commas
/// (`amqp.url`: one per node of a cluster), in the order given.
pub fn url_list(url: &Secret) -> impl Iterator<Item = &str> {
    url.expose()
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
}

/// Compares secrets (tokens) in constant time (`subtle`, which keeps the
/// compiler from turning the comparison back into an early exit), so the
/// time an answer takes says nothing about how much matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

/// Removes the user-info part of a URL (`amqp://user:pass@host/` →
/// `amqp://***@host/`) so it can be logged.
/// Several comma-separated URLs are redacted one by one.
pub fn redact_url(url: &str) -> String {
    if url.contains(',') {
        return url
            .split(',')
            .map(|u| redact_url(u.trim()))
            .collect::<Vec<_>>()
            .join(",");
    }
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***{}", &url[..scheme_end], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_url_of_a_list_is_redacted() {
        assert_eq!(
            redact_url("amqp://u:p@n1:5672/%2f, amqps://u:p@n2:5671/%2f"),
            "amqp://***@n1:5672/%2f,amqps://***@n2:5671/%2f"
        );
    }

    #[test]
    fn debug_and_display_are_redacted() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s}"), "[REDACTED]");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn url_credentials_are_removed() {
        assert_eq!(
            redact_url("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqp://127.0.0.1/"), "amqp://127.0.0.1/");
    }
}
