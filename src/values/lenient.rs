//! Deserialisers that take a value typed in TOML or the same value as the
//! string an environment variable carries. Provider accounts need them: an
//! account is an internally tagged enum (`kind = "…"`), which serde reads
//! through a buffer that no longer lets the config crate turn `"true"` into
//! `true`, so `REFUND_WORKER__PROVIDERS__X__DEDUPE_REQUESTS=true` would be
//! refused without them.

use serde::{Deserialize, Deserializer};

#[derive(Deserialize)]
#[serde(untagged)]
enum Raw<T> {
    Typed(T),
    Text(String),
}

/// A boolean, or `true`/`false`/`1`/`0`/`yes`/`no` as text.
pub fn bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    match Raw::<bool>::deserialize(d)? {
        Raw::Typed(b) => Ok(b),
        Raw::Text(t) => match t.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            other => Err(serde::de::Error::custom(format!(
                "expected a boolean (true or false), found {other:?}"
            ))),
        },
    }
}

/// An unsigned integer, or its decimal text.
pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match Raw::<u64>::deserialize(d)? {
        Raw::Typed(n) => Ok(n),
        Raw::Text(t) => t
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("expected a whole number, found {t:?}"))),
    }
}

/// An optional unsigned integer, typed or as text.
pub fn optional_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    u64(d).map(Some)
}

/// An optional number, typed (integer or float) or as text.
pub fn optional_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    match Raw::<f64>::deserialize(d)? {
        Raw::Typed(n) => Ok(Some(n)),
        Raw::Text(t) => t
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("expected a number, found {t:?}"))),
    }
}

/// A number, typed (integer or float) or as text.
pub fn f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    optional_f64(d).map(|n| n.unwrap_or_default())
}
