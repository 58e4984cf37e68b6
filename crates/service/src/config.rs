//! Layered configuration, the same for every service: defaults, then a TOML file, then
//! environment variables, then flags, deserialised once into the service's own struct
//! (which should `deny_unknown_fields`, so a misspelt key is an error naming it).
//!
//! The environment is passed in as a map so tests never touch the process environment.
//! A nested key is spelled with `__` in the environment: `DISPATCH_BROKER_LIMITS__MAX_ENTRIES`
//! sets `limits.max_entries`. Values that parse as TOML numbers or booleans are taken as
//! such; everything else is a string.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A configuration that cannot be used, with what to change.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

/// Where a service's settings come from, lowest precedence first.
pub struct Layers<'a> {
    /// A TOML file, if one was given.
    pub file: Option<&'a Path>,
    /// The process environment (or a test's map).
    pub env: &'a BTreeMap<String, String>,
    /// Prefix of the service's variables, e.g. `DISPATCH_BROKER_`.
    pub env_prefix: &'a str,
    /// Variables with the prefix that are not keys (the config file's path, say).
    pub env_not_keys: &'a [&'a str],
    /// Flags, each a dotted key and a TOML value.
    pub overrides: &'a [(String, toml::Value)],
}

/// Builds `T` from its defaults and the layers.
pub fn load<T: Serialize + DeserializeOwned + Default>(
    layers: &Layers<'_>,
) -> Result<T, ConfigError> {
    let mut table =
        toml::Table::try_from(T::default()).map_err(|e| ConfigError(format!("defaults: {e}")))?;
    if let Some(file) = layers.file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", file.display())))?;
        let from_file: toml::Table = text
            .parse()
            .map_err(|e| ConfigError(format!("{}: {e}", file.display())))?;
        merge(&mut table, from_file);
    }
    for (name, raw) in layers.env {
        let Some(key) = name.strip_prefix(layers.env_prefix) else {
            continue;
        };
        if layers.env_not_keys.contains(&key) {
            continue;
        }
        let path: Vec<String> = key.split("__").map(str::to_lowercase).collect();
        set_path(&mut table, &path, env_value(raw));
    }
    for (key, value) in layers.overrides {
        let path: Vec<String> = key.split('.').map(str::to_owned).collect();
        set_path(&mut table, &path, value.clone());
    }
    toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError(e.to_string()))
}

/// Sets one dotted key in a layer of overrides (for flags and for settings read under
/// another name, such as pfcon's environment variables).
pub fn set(overrides: &mut Vec<(String, toml::Value)>, key: &str, value: toml::Value) {
    overrides.push((key.to_owned(), value));
}

/// An environment value as TOML when it parses as a number or boolean, else as text.
pub fn env_value(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut table) => match table.remove("v") {
            Some(
                value @ (toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_)),
            ) => value,
            _ => toml::Value::String(raw.to_owned()),
        },
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(inner)), toml::Value::Table(value)) => merge(inner, value),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = table;
    for key in parents {
        let entry = at
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(inner) = entry else {
            return;
        };
        at = inner;
    }
    at.insert(last.clone(), value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Sample {
        name: String,
        port: u16,
        inner: Inner,
    }

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        limit: u64,
        on: bool,
    }

    #[test]
    fn layers_apply_in_order_and_unknown_keys_are_named() {
        let dir = std::env::temp_dir().join(format!("dispatch-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "name = \"file\"\nport = 1\n[inner]\nlimit = 10\n").unwrap();
        let env = BTreeMap::from([
            ("SVC_INNER__LIMIT".to_owned(), "20".to_owned()),
            ("SVC_INNER__ON".to_owned(), "true".to_owned()),
            ("SVC_CONFIG".to_owned(), "ignored".to_owned()),
            ("OTHER".to_owned(), "x".to_owned()),
        ]);
        let overrides = [("name".to_owned(), toml::Value::String("flag".into()))];
        let layers = Layers {
            file: Some(&file),
            env: &env,
            env_prefix: "SVC_",
            env_not_keys: &["CONFIG"],
            overrides: &overrides,
        };
        let sample: Sample = load(&layers).unwrap();
        assert_eq!(
            sample,
            Sample {
                name: "flag".into(),
                port: 1,
                inner: Inner {
                    limit: 20,
                    on: true
                }
            }
        );

        let env = BTreeMap::from([("SVC_INNR__LIMIT".to_owned(), "1".to_owned())]);
        let layers = Layers {
            file: None,
            env: &env,
            env_prefix: "SVC_",
            env_not_keys: &[],
            overrides: &[],
        };
        let err = load::<Sample>(&layers).unwrap_err().to_string();
        assert!(err.contains("innr"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
