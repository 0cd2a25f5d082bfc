//! Configuration loading shared by the daemons: TOML files with unknown keys rejected, command-line
//! overrides, durations like `"30s"`, and TLS paths that may live in `$CREDENTIALS_DIRECTORY`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{de::DeserializeOwned, Deserialize, Deserializer};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid config {origin}: {key}: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
}

/// Where a configuration came from, for error messages.
pub fn origin(path: Option<&Path>) -> String {
    match path {
        Some(p) => format!("in {}", p.display()),
        None => "from the command line".to_string(),
    }
}

/// Loads a TOML config, applies `overrides` (dotted key → value, from the command line), and
/// deserializes it with unknown keys rejected. Errors name the file and the key.
pub fn load<T: DeserializeOwned>(
    path: Option<&Path>,
    overrides: Vec<(&str, toml::Value)>,
) -> Result<T, ConfigError> {
    let origin = origin(path);
    let text = match path {
        Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
            path: p.to_path_buf(),
            source,
        })?,
        None => String::new(),
    };
    let parse_err = |e: toml::de::Error| ConfigError::Parse {
        origin: origin.clone(),
        message: e.to_string().trim_end().to_string(),
    };
    if overrides.is_empty() {
        // Parse the original text so error messages point at the user's line.
        return toml::from_str(&text).map_err(parse_err);
    }
    let mut table: toml::Table = toml::from_str(&text).map_err(parse_err)?;
    for (key, value) in overrides {
        let mut cur = &mut table;
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().unwrap_or(key);
        for p in parts {
            let entry = cur
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => cur = t,
                _ => {
                    return Err(ConfigError::Invalid {
                        origin,
                        key: key.to_string(),
                        message: format!("`{p}` is not a table"),
                    })
                }
            }
        }
        cur.insert(last.to_string(), value);
    }
    let merged = toml::to_string(&table).map_err(|e| ConfigError::Parse {
        origin: origin.clone(),
        message: e.to_string(),
    })?;
    toml::from_str(&merged).map_err(|e| ConfigError::Parse {
        origin: format!("{origin} (with command-line overrides)"),
        message: e.to_string().trim_end().to_string(),
    })
}

/// Parses durations like `"250ms"`, `"30s"`, `"5m"`, `"1h"`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        format!("invalid duration {s:?} (expected e.g. \"500ms\", \"30s\", \"5m\")")
    })?;
    let secs = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "invalid duration {s:?}: unknown unit {other:?} (use ms, s, m or h)"
            ))
        }
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("invalid duration {s:?}: out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Serde adapter for [`Duration`] fields written as `"30s"`.
pub mod duration {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Str(String),
            Secs(u64),
        }
        match Raw::deserialize(d)? {
            Raw::Str(s) => parse_duration(&s).map_err(serde::de::Error::custom),
            Raw::Secs(n) => Ok(Duration::from_secs(n)),
        }
    }
}

/// `[tls]` section shared by every daemon.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Deployment CA certificate (PEM).
    pub ca: PathBuf,
    /// This node's certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
}

impl TlsConfig {
    /// Resolves a configured path: `$CREDENTIALS_DIRECTORY`/`${CREDENTIALS_DIRECTORY}` is expanded,
    /// and a relative path that does not exist is looked up in `$CREDENTIALS_DIRECTORY` (systemd
    /// `LoadCredential=`), so `cert = "cert.pem"` works under the NixOS modules.
    pub fn resolve(path: &Path) -> PathBuf {
        let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        let s = path.to_string_lossy();
        if let Some(dir) = &creds {
            for var in ["${CREDENTIALS_DIRECTORY}", "$CREDENTIALS_DIRECTORY"] {
                if let Some(rest) = s.strip_prefix(var) {
                    return dir.join(rest.trim_start_matches('/'));
                }
            }
            if path.is_relative() && !path.exists() {
                return dir.join(path);
            }
        }
        path.to_path_buf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        listen: String,
        #[serde(with = "duration", default = "default_timeout")]
        timeout: Duration,
        tls: Option<TlsConfig>,
    }
    fn default_timeout() -> Duration {
        Duration::from_secs(30)
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("30 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.toml");
        std::fs::write(&p, "listen = \"a\"\nlisen = \"b\"\n").unwrap();
        let e = load::<Sample>(Some(&p), vec![]).unwrap_err().to_string();
        assert!(e.contains("lisen"), "{e}");
        assert!(e.contains("x.toml"), "{e}");
    }

    #[test]
    fn bad_value_names_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.toml");
        std::fs::write(&p, "listen = \"a\"\ntimeout = \"soon\"\n").unwrap();
        let e = load::<Sample>(Some(&p), vec![]).unwrap_err().to_string();
        assert!(e.contains("timeout") && e.contains("soon"), "{e}");
    }

    #[test]
    fn overrides_apply_and_nest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.toml");
        std::fs::write(
            &p,
            "listen = \"a\"\n[tls]\nca = \"c\"\ncert = \"d\"\nkey = \"e\"\n",
        )
        .unwrap();
        let s: Sample = load(
            Some(&p),
            vec![
                ("listen", "b".into()),
                ("tls.key", "k".into()),
                ("timeout", "5s".into()),
            ],
        )
        .unwrap();
        assert_eq!(s.listen, "b");
        assert_eq!(s.timeout, Duration::from_secs(5));
        let tls = s.tls.unwrap();
        assert_eq!(tls.key, PathBuf::from("k"));
        assert_eq!(tls.ca, PathBuf::from("c"));
        let only_cli: Sample = load(None, vec![("listen", "z".into())]).unwrap();
        assert_eq!(only_cli.listen, "z");
        assert!(load::<Sample>(None, vec![])
            .unwrap_err()
            .to_string()
            .contains("listen"));
    }

    #[test]
    fn tls_paths_resolve_in_credentials_directory() {
        // The only test in this crate that touches CREDENTIALS_DIRECTORY.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), "x").unwrap();
        std::env::set_var("CREDENTIALS_DIRECTORY", dir.path());
        assert_eq!(
            TlsConfig::resolve(Path::new("cert.pem")),
            dir.path().join("cert.pem")
        );
        assert_eq!(
            TlsConfig::resolve(Path::new("${CREDENTIALS_DIRECTORY}/key.pem")),
            dir.path().join("key.pem")
        );
        assert_eq!(
            TlsConfig::resolve(Path::new("$CREDENTIALS_DIRECTORY/ca.pem")),
            dir.path().join("ca.pem")
        );
        assert_eq!(
            TlsConfig::resolve(Path::new("/etc/ztna/ca.pem")),
            PathBuf::from("/etc/ztna/ca.pem")
        );
        std::env::remove_var("CREDENTIALS_DIRECTORY");
        assert_eq!(
            TlsConfig::resolve(Path::new("cert.pem")),
            PathBuf::from("cert.pem")
        );
    }
}
