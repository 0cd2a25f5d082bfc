//! Configuration loading shared by the daemons: TOML files with unknown keys rejected, command-line
//! overrides, durations like `"30s"`, addresses checked with messages that say what to fix, and
//! file paths resolved against the config file's directory, then `$CREDENTIALS_DIRECTORY`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{de::DeserializeOwned, Deserialize, Deserializer};
use thiserror::Error;

/// What `--config` and `ZTNA_CONFIG` are for, said when neither was given.
pub const NO_CONFIG: &str = "no configuration: pass --config FILE or set ZTNA_CONFIG";

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
    #[error("{NO_CONFIG}")]
    Missing,
}

/// A configuration whose file paths are resolved when it is loaded.
pub trait Paths {
    /// Every key that holds a file path, as (dotted key, value).
    fn paths_mut(&mut self) -> Vec<(&'static str, &mut PathBuf)>;
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
///
/// Relative paths (see [`Paths`]) from the file are resolved against the file's directory, those
/// from the command line against the working directory; either falls back to
/// `$CREDENTIALS_DIRECTORY` (see [`anchor`]). With neither a file nor an override there is no
/// configuration at all, which is [`ConfigError::Missing`].
pub fn load<T: DeserializeOwned + Paths>(
    path: Option<&Path>,
    overrides: Vec<(&str, toml::Value)>,
) -> Result<T, ConfigError> {
    if path.is_none() && overrides.is_empty() {
        return Err(ConfigError::Missing);
    }
    let from_cli: Vec<String> = overrides.iter().map(|(k, _)| k.to_string()).collect();
    let mut config: T = parse(path, overrides)?;
    let file_dir = path.and_then(Path::parent);
    let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    for (key, value) in config.paths_mut() {
        let base = if from_cli.iter().any(|k| k == key) {
            None
        } else {
            file_dir
        };
        *value = anchor(value, base, creds.as_deref());
    }
    Ok(config)
}

/// Where a relative path from a config file (`base` = its directory) or from the command line
/// (`base` = None: the working directory) points: there if the file exists, else in
/// `creds` (`$CREDENTIALS_DIRECTORY`, systemd `LoadCredential=`) if it exists there, else there
/// (so an error names the place the operator meant). Absolute paths and paths starting with
/// `$CREDENTIALS_DIRECTORY` are left alone.
pub fn anchor(value: &Path, base: Option<&Path>, creds: Option<&Path>) -> PathBuf {
    let text = value.to_string_lossy();
    if value.is_absolute()
        || text.starts_with("$CREDENTIALS_DIRECTORY")
        || text.starts_with("${CREDENTIALS_DIRECTORY}")
    {
        return value.to_path_buf();
    }
    let here = match base {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(value),
        _ => value.to_path_buf(),
    };
    if !here.exists() {
        if let Some(c) = creds.map(|c| c.join(value)).filter(|c| c.exists()) {
            return c;
        }
    }
    here
}

fn parse<T: DeserializeOwned>(
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
    toml::from_str(&merged).map_err(|e| {
        let mut message = e.to_string().trim_end().to_string();
        if path.is_none() {
            message.push_str(&format!(" ({NO_CONFIG})"));
        }
        ConfigError::Parse {
            origin: if path.is_some() {
                format!("{origin} (with command-line overrides)")
            } else {
                origin.clone()
            },
            message,
        }
    })
}

/// Parses durations like `"250ms"`, `"30s"`, `"5m"`, `"1h"`. A number without a unit is an
/// error: `"30"` could mean seconds or milliseconds, so the operator has to say which.
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
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "" => {
            return Err(format!(
                "invalid duration {s:?}: add a unit, e.g. \"{num}s\" (ms, s, m or h)"
            ))
        }
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

/// Serde adapter for [`Duration`] fields written as `"30s"`; a bare number is refused with a
/// message that says which unit to add.
pub mod duration {
    use super::*;
    use serde::de::{Error, Visitor};

    struct V;

    impl Visitor<'_> for V {
        type Value = Duration;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a duration with a unit, like \"30s\" or \"500ms\"")
        }

        fn visit_str<E: Error>(self, s: &str) -> Result<Duration, E> {
            parse_duration(s).map_err(E::custom)
        }

        fn visit_i64<E: Error>(self, n: i64) -> Result<Duration, E> {
            Err(E::custom(format!(
                "a duration needs a unit: write \"{n}s\" (or ms, m, h), not {n}"
            )))
        }

        fn visit_u64<E: Error>(self, n: u64) -> Result<Duration, E> {
            self.visit_i64(i64::try_from(n).unwrap_or(i64::MAX))
        }

        fn visit_f64<E: Error>(self, n: f64) -> Result<Duration, E> {
            Err(E::custom(format!(
                "a duration needs a unit: write \"{n}s\" (or ms, m, h), not {n}"
            )))
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(V)
    }

    /// For `Option<Duration>` fields (use with `#[serde(default)]`).
    pub fn option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        deserialize(d).map(Some)
    }
}

/// Parses a port number; `zero_ok` for listen addresses, where 0 means "any free port".
fn parse_port(port: &str, zero_ok: bool) -> Result<u16, String> {
    let n: u64 = port
        .parse()
        .map_err(|_| format!("port {port:?} is not a number"))?;
    match u16::try_from(n) {
        Ok(p) if p > 0 || zero_ok => Ok(p),
        _ => Err(format!("port {n} is out of range 1-65535")),
    }
}

/// Splits `host:port` / `[v6]:port`; the host comes back without brackets.
fn split_host_port(s: &str) -> Result<(&str, &str), String> {
    let example = "e.g. 127.0.0.1:4433, [::1]:4433";
    if let Some(rest) = s.strip_prefix('[') {
        let (host, port) = rest
            .split_once("]:")
            .ok_or_else(|| format!("{s:?} is not [IPv6]:PORT ({example})"))?;
        return Ok((host, port));
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} has no port ({example})"))?;
    if host.contains(':') {
        return Err(format!(
            "{s:?}: write an IPv6 address in brackets, e.g. [{host}]:{port}"
        ));
    }
    Ok((host, port))
}

/// Parses a socket address (`IP:PORT`, `[IPv6]:PORT`) where a hostname is not allowed (listen
/// and bind addresses, local forwards). Errors say what to write instead.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let (host, port) = split_host_port(s.trim())?;
    let port = parse_port(port, true)?;
    match host.parse::<IpAddr>() {
        Ok(ip) => Ok(SocketAddr::new(ip, port)),
        Err(_) if host.is_empty() => Err(format!(
            "{s:?} has no address (e.g. 0.0.0.0:{port} for every IPv4 address, [::]:{port} for all)"
        )),
        Err(_) => Err(format!(
            "{s:?}: {host:?} is a hostname, but an IP address is required here \
             (e.g. 127.0.0.1:{port}, [::1]:{port}, or [::]:{port} for every address)"
        )),
    }
}

/// Checks a `host:port` whose host may be a name (an intermediate): port 1-65535, IPv6 in
/// brackets.
pub fn check_host_port(s: &str) -> Result<(), String> {
    parse_host_port(s).map(|_| ())
}

/// Parses a `host:port` whose host may be a name or an IP address (backends, intermediates):
/// port 1-65535, IPv6 in brackets, no scheme. The host comes back without brackets.
pub fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    if s.contains("://") {
        return Err(format!(
            "{s:?}: write HOST:PORT without a scheme (e.g. db.internal:5432, 10.0.0.5:5432)"
        ));
    }
    let (host, port) = split_host_port(s)?;
    if host.is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    if host
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || "/@?#[]".contains(c))
    {
        return Err(format!(
            "{s:?}: {host:?} is not a host name or IP address (e.g. db.internal:5432, 10.0.0.5:5432)"
        ));
    }
    let port = parse_port(port, false)?;
    Ok((host.to_string(), port))
}

/// Serde adapter for [`SocketAddr`] fields, with [`parse_addr`]'s messages.
pub mod addr {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        let s = String::deserialize(d)?;
        parse_addr(&s).map_err(serde::de::Error::custom)
    }

    /// For `Option<SocketAddr>` fields (use with `#[serde(default)]`).
    pub fn option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        deserialize(d).map(Some)
    }
}

/// Parses sizes like `"16MiB"`, `"512KiB"`, `"1GiB"` or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?} (expected e.g. \"16MiB\", \"512KiB\")"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {other:?} (use KiB, MiB or GiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .filter(|v| *v < (1 << 62))
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// Serde adapter for sizes written as `"16MiB"` (or a number of bytes).
pub mod size {
    use super::*;
    use serde::de::{Error, Visitor};

    struct V;

    impl Visitor<'_> for V {
        type Value = u64;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a size like \"16MiB\" or a number of bytes")
        }

        fn visit_str<E: Error>(self, s: &str) -> Result<u64, E> {
            parse_size(s).map_err(E::custom)
        }

        fn visit_i64<E: Error>(self, n: i64) -> Result<u64, E> {
            u64::try_from(n).map_err(|_| E::custom(format!("a size cannot be negative ({n})")))
        }

        fn visit_u64<E: Error>(self, n: u64) -> Result<u64, E> {
            Ok(n)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(V)
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
    /// The `[tls]` paths, for [`Paths::paths_mut`].
    pub fn paths_mut(&mut self) -> Vec<(&'static str, &mut PathBuf)> {
        vec![
            ("tls.ca", &mut self.ca),
            ("tls.cert", &mut self.cert),
            ("tls.key", &mut self.key),
        ]
    }

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

/// The field names of a struct config type, as serde sees them (for tests that check an
/// example file documents every key).
pub fn field_names<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Grab(Option<&'static [&'static str]>);
    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("stop")
        }
    }
    impl std::error::Error for Stop {}
    impl serde::de::Error for Stop {
        fn custom<E: std::fmt::Display>(_: E) -> Self {
            Stop
        }
    }
    impl<'de> serde::Deserializer<'de> for &mut Grab {
        type Error = Stop;
        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            self.0 = Some(fields);
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut g = Grab(None);
    let _ = T::deserialize(&mut g);
    g.0.unwrap_or(&[])
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
    impl Paths for Sample {
        fn paths_mut(&mut self) -> Vec<(&'static str, &mut PathBuf)> {
            self.tls.as_mut().map(|t| t.paths_mut()).unwrap_or_default()
        }
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Addrs {
        #[serde(with = "addr")]
        listen: SocketAddr,
        #[serde(default, deserialize_with = "addr::option")]
        backend: Option<SocketAddr>,
    }
    impl Paths for Addrs {
        fn paths_mut(&mut self) -> Vec<(&'static str, &mut PathBuf)> {
            Vec::new()
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("512KiB").unwrap(), 512 << 10);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("16MB").unwrap_err().contains("unknown unit"));
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("30 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_duration("s").is_err());
        // No unit: say which one to add instead of guessing seconds.
        let e = parse_duration("30").unwrap_err();
        assert!(e.contains("add a unit, e.g. \"30s\""), "{e}");
    }

    #[test]
    fn durations_without_unit_in_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.toml");
        for (value, want) in [
            ("\"30\"", "add a unit, e.g. \"30s\""),
            ("30", "write \"30s\""),
            ("1.5", "write \"1.5s\""),
        ] {
            std::fs::write(&p, format!("listen = \"a\"\ntimeout = {value}\n")).unwrap();
            let e = load::<Sample>(Some(&p), vec![]).unwrap_err().to_string();
            assert!(e.contains("timeout") && e.contains(want), "{value}: {e}");
        }
    }

    #[test]
    fn addresses_say_what_to_fix() {
        let parse = |text: &str| {
            toml::from_str::<Addrs>(text)
                .map(|a| (a.listen, a.backend))
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            parse("listen = \"[::]:0\"\nbackend = \"10.0.0.1:53\"").unwrap(),
            (
                "[::]:0".parse().unwrap(),
                Some("10.0.0.1:53".parse().unwrap())
            )
        );
        let e = parse("listen = \"0.0.0.0:99999\"").unwrap_err();
        assert!(e.contains("port 99999 is out of range 1-65535"), "{e}");
        let e = parse("listen = \"localhost:4433\"").unwrap_err();
        assert!(
            e.contains("\"localhost\" is a hostname, but an IP address is required here"),
            "{e}"
        );
        let e = parse("listen = \"127.0.0.1\"").unwrap_err();
        assert!(e.contains("has no port"), "{e}");
        let e = parse("listen = \"::1:80\"").unwrap_err();
        assert!(e.contains("in brackets, e.g. [::1]:80"), "{e}");
        let e = parse("listen = \"0.0.0.0:http\"").unwrap_err();
        assert!(e.contains("port \"http\" is not a number"), "{e}");

        assert!(check_host_port("relay.example.com:4433").is_ok());
        assert!(check_host_port("[2001:db8::1]:4433").is_ok());
        assert_eq!(
            check_host_port("relay:0").unwrap_err(),
            "port 0 is out of range 1-65535"
        );
        assert_eq!(
            check_host_port("relay:70000").unwrap_err(),
            "port 70000 is out of range 1-65535"
        );
        assert!(check_host_port("relay").unwrap_err().contains("no port"));
        assert_eq!(
            parse_host_port("db.internal:5432").unwrap(),
            ("db.internal".to_string(), 5432)
        );
        assert_eq!(
            parse_host_port("[2001:db8::1]:53").unwrap(),
            ("2001:db8::1".to_string(), 53)
        );
        let e = parse_host_port("http://db.internal:5432").unwrap_err();
        assert!(e.contains("without a scheme"), "{e}");
        let e = parse_host_port("db internal:5432").unwrap_err();
        assert!(e.contains("is not a host name or IP address"), "{e}");
        assert!(parse_host_port(":5432")
            .unwrap_err()
            .contains("has no host"));
    }

    #[test]
    fn no_configuration_at_all() {
        assert_eq!(
            load::<Sample>(None, vec![]).unwrap_err().to_string(),
            "no configuration: pass --config FILE or set ZTNA_CONFIG"
        );
    }

    #[test]
    fn relative_paths_anchor_at_the_config_file_then_credentials() {
        let etc = tempfile::tempdir().unwrap();
        let creds = tempfile::tempdir().unwrap();
        std::fs::write(etc.path().join("here.pem"), "x").unwrap();
        std::fs::write(creds.path().join("cred.pem"), "x").unwrap();
        std::fs::write(creds.path().join("here.pem"), "x").unwrap();
        let (base, c) = (Some(etc.path()), Some(creds.path()));
        // Next to the config file first, even when the credentials have one too.
        assert_eq!(
            anchor(Path::new("here.pem"), base, c),
            etc.path().join("here.pem")
        );
        assert_eq!(
            anchor(Path::new("cred.pem"), base, c),
            creds.path().join("cred.pem")
        );
        // Missing everywhere: the config file's directory, so the error names that file.
        assert_eq!(
            anchor(Path::new("gone.pem"), base, c),
            etc.path().join("gone.pem")
        );
        assert_eq!(
            anchor(Path::new("/abs/x.pem"), base, c),
            PathBuf::from("/abs/x.pem")
        );
        assert_eq!(
            anchor(Path::new("$CREDENTIALS_DIRECTORY/k.pem"), base, c),
            PathBuf::from("$CREDENTIALS_DIRECTORY/k.pem")
        );
        // Through load: file values are anchored at the file, command-line values are not.
        let cfg = etc.path().join("x.toml");
        std::fs::write(
            &cfg,
            "listen = \"a\"\n[tls]\nca = \"here.pem\"\ncert = \"sub/c.pem\"\nkey = \"k\"\n",
        )
        .unwrap();
        let s: Sample = load(Some(&cfg), vec![("tls.key", "cli.key".into())]).unwrap();
        let tls = s.tls.unwrap();
        assert_eq!(tls.ca, etc.path().join("here.pem"));
        assert_eq!(tls.cert, etc.path().join("sub/c.pem"));
        assert_eq!(tls.key, PathBuf::from("cli.key"));
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
        // From the file: next to the file; from the command line: as given.
        assert_eq!(tls.ca, dir.path().join("c"));
        let only_cli: Sample = load(None, vec![("listen", "z".into())]).unwrap();
        assert_eq!(only_cli.listen, "z");
        let e = load::<Sample>(None, vec![("timeout", "5s".into())])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("listen") && e.contains("pass --config FILE"),
            "{e}"
        );
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
