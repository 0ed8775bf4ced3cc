//! Every key a layer sets must be one the worker reads. serde ignores a key
//! it does not know, so a typo (`http.operator_tokn`,
//! `store.retenton`) or a key of another version would change behaviour
//! without a word; here it stops start-up instead, naming the key, where it
//! was set, and the closest known key.
//!
//! The known keys come from the settings types themselves (their JSON
//! Schema, derived next to their `Deserialize`), so they cannot drift from
//! what is read. A provider account's keys depend on its `kind`.

use serde_json::Value as Schema;
use std::collections::BTreeSet;

/// A key no setting reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct UnknownKey {
    /// Dotted, as set (`http.operator_tokn`).
    pub(super) key: String,
    /// What to do instead, when there is something to say.
    pub(super) hint: Option<String>,
}

/// The keys of `config` that no setting reads, in key order.
pub(super) fn unknown(config: &config::Config) -> Vec<UnknownKey> {
    let root = schemars::schema_for!(super::Settings).to_value();
    let Ok(table) = config.cache.clone().into_table() else {
        return Vec::new();
    };
    let mut found = Vec::new();
    walk(&root, &root, &table, "", &mut found);
    found
}

fn walk(
    root: &Schema,
    schema: &Schema,
    table: &config::Map<String, config::Value>,
    prefix: &str,
    found: &mut Vec<UnknownKey>,
) {
    let kind = table.get("kind").and_then(|v| v.clone().into_string().ok());
    let shape = Shape::of(root, schema, kind.as_deref());
    for (key, value) in table {
        let path = format!("{prefix}{key}");
        let Some(child) = shape.child(key) else {
            let hint = hint(&path, key, &shape);
            // A whole unknown table: name the keys set in it, which the
            // origin of the error can point at.
            let mut leaves = Vec::new();
            leaves_of(value, &path, &mut leaves);
            found.extend(leaves.into_iter().map(|key| UnknownKey {
                key,
                hint: hint.clone(),
            }));
            continue;
        };
        if let config::ValueKind::Table(inner) = &value.kind {
            walk(root, child, inner, &format!("{path}."), found);
        }
    }
}

/// The dotted keys of the values under `value` (itself when not a table).
fn leaves_of(value: &config::Value, path: &str, out: &mut Vec<String>) {
    match &value.kind {
        config::ValueKind::Table(inner) if !inner.is_empty() => {
            for (key, value) in inner {
                leaves_of(value, &format!("{path}.{key}"), out);
            }
        }
        _ => out.push(path.to_string()),
    }
}

/// What an object schema allows: its named properties, and the schema of
/// any other key (a map's values), if it takes other keys.
#[derive(Default)]
struct Shape<'s> {
    properties: Vec<(&'s str, &'s Schema)>,
    others: Option<&'s Schema>,
    /// Takes anything (a value that is not a table of settings).
    open: bool,
}

impl<'s> Shape<'s> {
    fn of(root: &'s Schema, schema: &'s Schema, kind: Option<&str>) -> Self {
        let mut shape = Shape::default();
        shape.add(root, schema, kind, 0);
        shape
    }

    fn add(&mut self, root: &'s Schema, schema: &'s Schema, kind: Option<&str>, depth: usize) {
        if depth > 16 {
            return;
        }
        let Some(object) = schema.as_object() else {
            // `true`: anything goes.
            self.open = true;
            return;
        };
        // A reference and properties side by side (a variant of a tagged
        // enum: the account type, plus its `kind`) count together.
        if let Some(target) = referenced(root, schema) {
            self.add(root, target, kind, depth + 1);
        }
        if let Some(properties) = object.get("properties").and_then(Schema::as_object) {
            self.properties
                .extend(properties.iter().map(|(k, v)| (k.as_str(), v)));
        }
        match object.get("additionalProperties") {
            Some(Schema::Bool(true)) => self.open = true,
            Some(other @ Schema::Object(_)) => self.others = Some(other),
            _ => {}
        }
        for all in ["allOf"] {
            for part in object
                .get(all)
                .and_then(Schema::as_array)
                .into_iter()
                .flatten()
            {
                self.add(root, part, kind, depth + 1);
            }
        }
        for any in ["anyOf", "oneOf"] {
            let Some(parts) = object.get(any).and_then(Schema::as_array) else {
                continue;
            };
            // A tagged enum (a provider account): the variant its `kind`
            // names; otherwise every alternative.
            let chosen: Vec<&Schema> = parts
                .iter()
                .filter(|part| kind.is_none_or(|k| tag_of(root, part).is_none_or(|t| t == k)))
                .collect();
            for part in chosen {
                self.add(root, part, kind, depth + 1);
            }
        }
        if object.is_empty() {
            self.open = true;
        }
    }

    fn child(&self, key: &str) -> Option<&'s Schema> {
        static ANYTHING: Schema = Schema::Bool(true);
        self.properties
            .iter()
            .find(|(name, _)| *name == key)
            .map(|(_, schema)| *schema)
            .or(self.others)
            .or(self.open.then_some(&ANYTHING))
    }
}

/// The `kind` a variant of a tagged enum stands for.
fn tag_of<'s>(root: &'s Schema, part: &'s Schema) -> Option<&'s str> {
    let own = part.get("properties").and_then(|p| p.get("kind"));
    let kind = match own {
        Some(kind) => kind,
        None => referenced(root, part)?.get("properties")?.get("kind")?,
    };
    kind.get("const")
        .or_else(|| kind.get("enum")?.get(0))
        .and_then(Schema::as_str)
}

/// The definition `schema`'s `$ref` points at.
fn referenced<'s>(root: &'s Schema, schema: &'s Schema) -> Option<&'s Schema> {
    let name = schema.get("$ref")?.as_str()?.strip_prefix("#/$defs/")?;
    root.get("$defs")?.get(name)
}

/// What to say about an unknown `key` at `path`.
fn hint(path: &str, key: &str, shape: &Shape<'_>) -> Option<String> {
    if path == "cluster" || path.starts_with("cluster.") {
        return Some(
            "cluster mode is gone: replicas share a PostgreSQL database instead; set \
             store.backend = \"postgres\" and store.postgres.url (docs/replicas.md)"
                .into(),
        );
    }
    let parent = path.strip_suffix(key).unwrap_or_default();
    let names: BTreeSet<&str> = shape.properties.iter().map(|(name, _)| *name).collect();
    names
        .into_iter()
        .map(|name| (strsim::normalized_damerau_levenshtein(key, name), name))
        .filter(|(score, _)| *score >= 0.6)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, name)| format!("did you mean {parent}{name}?"))
}
