//! Reading the layers: `config/default.toml` (compiled in), an optional
//! `--config FILE`, then `REFUND_WORKER__SECTION__KEY` environment
//! variables. Two conveniences for containers:
//!
//! * `REFUND_WORKER__…_FILE=/run/secrets/x` reads the value of
//!   `REFUND_WORKER__…` from that file (mounted Kubernetes or Docker
//!   secrets), without its trailing newline.
//! * An error names the key and where its value came from (the environment
//!   variable, the file, or the built-in defaults), so the one line an
//!   operator reads says what to fix.

use super::{ConfigError, DEFAULT_TOML, ENV_PREFIX};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The layers of one load.
#[derive(Debug)]
pub(super) struct Layers {
    file: Option<PathBuf>,
    env: HashMap<String, String>,
}

impl Layers {
    /// The layers with `env` (the process environment when `None`), with
    /// `_FILE` variables resolved.
    pub(super) fn new(
        file: Option<&Path>,
        env: Option<HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let env = env.unwrap_or_else(|| std::env::vars().collect());
        let prefix = format!("{ENV_PREFIX}__");
        let mut resolved = HashMap::new();
        let mut from_files = Vec::new();
        for (name, value) in env {
            if !name.starts_with(&prefix) {
                continue;
            }
            match name.strip_suffix("_FILE") {
                Some(base) => from_files.push((base.to_string(), name, value)),
                None => {
                    resolved.insert(name, value);
                }
            }
        }
        for (base, var, path) in from_files {
            if resolved.contains_key(&base) {
                return Err(ConfigError::SecretFile {
                    var,
                    problem: format!("{base} is set as well; set only one of them"),
                });
            }
            let content = std::fs::read_to_string(&path).map_err(|e| ConfigError::SecretFile {
                var: var.clone(),
                problem: format!("cannot read {path}: {e}"),
            })?;
            resolved.insert(base, content.trim_end_matches(['\n', '\r']).to_string());
        }
        Ok(Layers {
            file: file.map(Path::to_path_buf),
            env: resolved,
        })
    }

    /// The configuration builder over all layers.
    pub(super) fn builder(&self) -> config::ConfigBuilder<config::builder::DefaultState> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(file) = &self.file {
            builder = builder.add_source(config::File::from(file.as_path()).required(true));
        }
        builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .source(Some(self.env.clone().into_iter().collect())),
        )
    }

    /// Refuses a key that no setting reads, naming the first one found (and
    /// how many more there are).
    pub(super) fn refuse_unknown(&self, config: &config::Config) -> Result<(), ConfigError> {
        let unknown = super::keys::unknown(config);
        let Some(first) = unknown.first() else {
            return Ok(());
        };
        let mut hint = first
            .hint
            .as_ref()
            .map(|h| format!(": {h}"))
            .unwrap_or_default();
        if unknown.len() > 1 {
            let others: Vec<&str> = unknown[1..].iter().map(|u| u.key.as_str()).collect();
            hint.push_str(&format!(" (also unknown: {})", others.join(", ")));
        }
        Err(ConfigError::Unknown {
            origin: self.origin(&first.key),
            key: first.key.clone(),
            hint,
        })
    }

    /// Where the value of `key` (dotted, e.g. `providers.hyp_pay.pass_p`)
    /// came from: the last layer that sets it.
    pub(super) fn origin(&self, key: &str) -> String {
        let var = env_var(key);
        if self.env.contains_key(&var) {
            return format!("environment variable {var}");
        }
        if let Some(file) = &self.file {
            let in_file = config::Config::builder()
                .add_source(config::File::from(file.as_path()))
                .build()
                .is_ok_and(|c| c.get::<config::Value>(key).is_ok());
            if in_file {
                return format!("file {}", file.display());
            }
        }
        "the built-in defaults (config/default.toml)".into()
    }

    /// Adds where the offending value came from to an error that names a
    /// key.
    pub(super) fn locate(&self, error: ConfigError) -> ConfigError {
        let (key, message) = match &error {
            ConfigError::Invalid { key, .. } => (key.clone(), String::new()),
            ConfigError::Load(e) => {
                let message = e.to_string();
                match key_in(&message) {
                    Some(key) => (key, message),
                    None => return error,
                }
            }
            _ => return error,
        };
        ConfigError::Located {
            origin: self.origin_in(&key, &message),
            error: Box::new(error),
        }
    }

    /// As [`Layers::origin`]; when the error names a whole table (a provider
    /// account is read as one value, so its errors name
    /// `providers.<name>`), the variable under it whose value the message
    /// quotes is the one to fix.
    fn origin_in(&self, key: &str, message: &str) -> String {
        let table = format!("{}__", env_var(key));
        let mut under: Vec<&String> = self
            .env
            .keys()
            .filter(|name| name.starts_with(&table))
            .collect();
        under.sort();
        if let Some(var) = under
            .iter()
            .find(|name| message.contains(&format!("{:?}", self.env[name.as_str()])))
        {
            return format!("environment variable {var}");
        }
        if !self.env.contains_key(&env_var(key)) && !under.is_empty() {
            let names: Vec<&str> = under.iter().map(|s| s.as_str()).collect();
            return format!(
                "{} or one of the environment variables {}",
                self.origin(key),
                names.join(", ")
            );
        }
        self.origin(key)
    }
}

/// `amqp.prefetch` → `REFUND_WORKER__AMQP__PREFETCH`.
pub fn env_var(key: &str) -> String {
    let mut name = String::from(ENV_PREFIX);
    for part in key.split('.') {
        name.push_str("__");
        name.push_str(&part.to_ascii_uppercase());
    }
    name
}

/// The key named in a message of the config crate ("… for key `a.b`").
fn key_in(message: &str) -> Option<String> {
    let start = message.find("key `")? + "key `".len();
    let end = message[start..].find('`')? + start;
    Some(message[start..end].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_env_variables_and_finds_keys_in_messages() {
        assert_eq!(env_var("amqp.prefetch"), "REFUND_WORKER__AMQP__PREFETCH");
        assert_eq!(
            key_in("invalid type: string \"x\", expected u16 for key `amqp.prefetch` in …"),
            Some("amqp.prefetch".into())
        );
        assert_eq!(key_in("no key here"), None);
    }

    #[test]
    fn file_variables_supply_secrets_and_refuse_doubles() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("pass");
        std::fs::write(&path, "s3cret\n").expect("write");
        let env: HashMap<String, String> = [(
            "REFUND_WORKER__PROVIDERS__HYP_PAY__PASS_P_FILE".to_string(),
            path.display().to_string(),
        )]
        .into_iter()
        .collect();
        let layers = Layers::new(None, Some(env.clone())).expect("layers");
        assert_eq!(
            layers.env["REFUND_WORKER__PROVIDERS__HYP_PAY__PASS_P"],
            "s3cret"
        );
        let mut both = env;
        both.insert(
            "REFUND_WORKER__PROVIDERS__HYP_PAY__PASS_P".into(),
            "other".into(),
        );
        let err = Layers::new(None, Some(both)).expect_err("both").to_string();
        assert!(err.contains("PASS_P_FILE"), "{err}");
        let missing: HashMap<String, String> = [(
            "REFUND_WORKER__AMQP__URL_FILE".to_string(),
            "/nonexistent/secret".to_string(),
        )]
        .into_iter()
        .collect();
        let err = Layers::new(None, Some(missing))
            .expect_err("missing")
            .to_string();
        assert!(err.contains("REFUND_WORKER__AMQP__URL_FILE"), "{err}");
    }
}
