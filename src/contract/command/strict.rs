//! JSON read the strict way: a key that appears twice in one object is an
//! error (serde_json keeps the last one silently, so `{"amount":…,
//! "amount":…}` would be read as whichever came last, and two readers of
//! the same bytes could disagree about a refund), and so is nesting deeper
//! than [`MAX_DEPTH`] (a record holds the command's JSON a few levels down,
//! and serde_json refuses to read anything nested past 128 levels: a
//! command nested just under that would be stored but never read again).

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::fmt;

/// Deepest nesting of objects and arrays accepted in a command.
pub const MAX_DEPTH: usize = 32;

/// A JSON value read strictly; deserialise it with
/// [`serde_path_to_error`] to learn where a duplicate is.
#[derive(Debug, Clone, PartialEq)]
pub struct StrictValue(pub Value);

impl<'de> serde::Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Strict { depth: 0 }
            .deserialize(deserializer)
            .map(StrictValue)
    }
}

/// `#[serde(deserialize_with)]` for an object read strictly.
pub(super) fn map<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Map<String, Value>, D::Error> {
    match (Strict { depth: 1 }).deserialize(deserializer)? {
        Value::Object(map) => Ok(map),
        other => Err(de::Error::invalid_type(unexpected(&other), &"an object")),
    }
}

/// `#[serde(deserialize_with)]` for an optional value read strictly.
pub(super) fn optional<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Value>, D::Error> {
    match (Strict { depth: 1 }).deserialize(deserializer)? {
        Value::Null => Ok(None),
        other => Ok(Some(other)),
    }
}

fn unexpected(value: &Value) -> de::Unexpected<'_> {
    match value {
        Value::Null => de::Unexpected::Unit,
        Value::Bool(b) => de::Unexpected::Bool(*b),
        Value::Number(_) => de::Unexpected::Other("a number"),
        Value::String(s) => de::Unexpected::Str(s),
        Value::Array(_) => de::Unexpected::Seq,
        Value::Object(_) => de::Unexpected::Map,
    }
}

/// Reads one value at `depth` (the number of objects and arrays around it).
#[derive(Clone, Copy)]
struct Strict {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl Strict {
    fn inner<E: de::Error>(self) -> Result<Strict, E> {
        if self.depth >= MAX_DEPTH {
            return Err(E::custom(format!("nested deeper than {MAX_DEPTH} levels")));
        }
        Ok(Strict {
            depth: self.depth + 1,
        })
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let inner = self.inner()?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(inner)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let inner = self.inner()?;
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            if map.contains_key(&key) {
                return Err(de::Error::custom(format!("the key {key:?} appears twice")));
            }
            let value = access.next_value_seed(inner)?;
            map.insert(key, value);
        }
        Ok(Value::Object(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Value, String> {
        let mut de = serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize::<_, StrictValue>(&mut de)
            .map(|v| v.0)
            .map_err(|e| format!("{}: {}", e.path(), e.inner()))
    }

    #[test]
    fn duplicates_anywhere_are_named_with_their_path() {
        assert_eq!(
            read(r#"{"a":1,"b":[{"c":true}]}"#),
            Ok(serde_json::json!({"a":1,"b":[{"c":true}]}))
        );
        let err = read(r#"{"a":1,"a":2}"#).expect_err("duplicate");
        assert!(err.contains("\"a\" appears twice"), "{err}");
        let err = read(r#"{"t":{"x":[{"id":1,"id":1}]}}"#).expect_err("nested");
        assert!(err.starts_with("t.x[0]"), "{err}");
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        assert!(read(&deep(MAX_DEPTH)).is_ok());
        let err = read(&deep(MAX_DEPTH + 1)).expect_err("too deep");
        assert!(err.contains("nested deeper"), "{err}");
    }
}
