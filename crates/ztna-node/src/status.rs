//! The `status` every daemon reports: `GET /status` on the ops endpoint (JSON), and the `status`
//! subcommand that asks a running daemon for it and prints a summary (`--json`: the answer as
//! it came, for scripts).
//!
//! Every answer starts with [`Common`] (identity, version, readiness, certificate); each daemon
//! adds what it knows (relays, services, flows). The subcommand finds the endpoint from
//! `--ops ADDR`, else `--ops-listen`/`ZTNA_OPS_LISTEN`, else `ops_listen` of the config file
//! (`--config`/`ZTNA_CONFIG`), else the daemon's default, and exits 0 when the daemon answered
//! and is ready, 1 when it answered but is not ready, 2 when it could not be asked.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use ztna_proto::Role;

use crate::health::Health;

/// How long the subcommand waits for the daemon's answer.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// The most the subcommand reads of an answer.
const MAX_ANSWER: u64 = 16 << 20;

/// What every daemon's status starts with.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Common {
    /// `agent`, `connector` or `intermediate`.
    pub role: String,
    /// The SPIFFE ID of the certificate in use.
    pub identity: String,
    pub version: String,
    pub pid: u32,
    pub uptime_seconds: u64,
    /// What `/readyz` answers: can it do its job now.
    pub ready: bool,
    /// The one-line status (`/readyz` body, systemd `STATUS=`).
    pub status: String,
    /// A drain is under way (SIGTERM): new work is refused, running flows finish.
    pub draining: bool,
    pub certificate: Certificate,
}

/// The daemon's own certificate.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Certificate {
    /// notAfter, RFC 3339 in UTC.
    pub not_after: String,
    pub not_after_unix: i64,
    /// Whole days until notAfter; negative once expired.
    pub days_left: i64,
}

impl Common {
    /// The common part of a status, now.
    pub fn new(
        role: Role,
        identity: &crate::SpiffeId,
        expiry_unix: f64,
        health: &Health,
    ) -> Common {
        let not_after_unix = expiry_unix as i64;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        Common {
            role: role.as_str().to_string(),
            identity: identity.to_string(),
            version: crate::VERSION.to_string(),
            pid: std::process::id(),
            uptime_seconds: health.uptime().as_secs(),
            ready: health.is_ready(),
            status: health.status(),
            draining: health.is_stopping(),
            certificate: Certificate {
                not_after: rfc3339(not_after_unix),
                not_after_unix,
                days_left: (not_after_unix - now).div_euclid(86_400),
            },
        }
    }

    /// The summary's first lines: who, readiness, certificate.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "{}  ({} {}, pid {}, up {})",
            self.identity,
            self.role,
            self.version,
            self.pid,
            words(Duration::from_secs(self.uptime_seconds))
        );
        let state = if self.ready { "ready" } else { "NOT READY" };
        let _ = writeln!(out, "  {state}: {}", self.status);
        if self.draining {
            let _ = writeln!(
                out,
                "  draining: new flows are refused, running flows finish"
            );
        }
        let c = &self.certificate;
        let left = match c.days_left {
            d if d < 0 => format!("EXPIRED {} ago", days(-d)),
            0 => "expires within a day".to_string(),
            d => format!("{} left", days(d)),
        };
        let _ = writeln!(out, "  certificate valid until {} ({left})", c.not_after);
    }
}

fn days(n: i64) -> String {
    if n == 1 {
        "1 day".to_string()
    } else {
        format!("{n} days")
    }
}

/// A duration as an operator reads it: `45s`, `3m 12s`, `2h 5m`, `3d 4h`.
pub fn words(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// A Unix time as RFC 3339 in UTC (`2026-05-01T12:00:00Z`).
pub fn rfc3339(unix: i64) -> String {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60
    )
}

/// `1 flow`, `3 flows`: a count with its noun.
pub fn count(n: usize, noun: &str) -> String {
    match n {
        1 => format!("1 {noun}"),
        n => format!("{n} {noun}s"),
    }
}

/// The ops endpoint's `/status` provider of a daemon: `snapshot` of its shared state as JSON,
/// or `null` once the daemon is gone (the provider does not keep it alive).
pub fn provider<S, T>(
    shared: &std::sync::Arc<S>,
    snapshot: impl Fn(&S) -> T + Send + Sync + 'static,
) -> impl Fn() -> serde_json::Value + Send + Sync + 'static
where
    S: Send + Sync + 'static,
    T: Serialize,
{
    let weak = std::sync::Arc::downgrade(shared);
    move || match weak.upgrade() {
        Some(shared) => serde_json::to_value(snapshot(&shared)).unwrap_or_default(),
        None => serde_json::Value::Null,
    }
}

/// Rows as aligned columns, each line indented by `indent` spaces; trailing blanks trimmed.
pub fn table(rows: &[Vec<String>], indent: usize) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = " ".repeat(indent);
        for (c, cell) in r.iter().enumerate() {
            line.push_str(cell);
            if c + 1 < r.len() {
                let pad = widths[c].saturating_sub(cell.chars().count()) + 2;
                line.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Arguments of the `status` subcommand.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct StatusArgs {
    /// Print the daemon's answer as JSON (the body of GET /status), for scripts.
    #[arg(long)]
    pub json: bool,
    /// Ops endpoint to ask, e.g. 127.0.0.1:9472 (default: `ops_listen` of --config, else the
    /// daemon's default).
    #[arg(long, value_name = "ADDR")]
    pub ops: Option<String>,
}

/// Where to ask: `--ops`, else `ops_listen` given on the command line or in the environment,
/// else in the config file, else `default`. A wildcard address (`0.0.0.0`, `[::]`) is asked on
/// loopback.
pub fn ops_addr(
    args: &StatusArgs,
    ops_listen: Option<&str>,
    config: Option<&Path>,
    default: SocketAddr,
) -> Result<SocketAddr, String> {
    if let Some(ops) = &args.ops {
        return parse_target(ops).map_err(|e| format!("--ops: {e}"));
    }
    if let Some(s) = ops_listen {
        return crate::config::parse_addr(s)
            .map(local)
            .map_err(|e| format!("--ops-listen: {e}"));
    }
    let Some(path) = config else {
        return Ok(local(default));
    };
    let origin = crate::config::origin(Some(path));
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    let table: toml::Table = toml::from_str(&text)
        .map_err(|e| format!("invalid config {origin}: {}", e.to_string().trim_end()))?;
    match table.get("ops_listen") {
        None => Ok(local(default)),
        Some(toml::Value::String(s)) => crate::config::parse_addr(s)
            .map(local)
            .map_err(|e| format!("invalid config {origin}: ops_listen: {e}")),
        Some(other) => Err(format!(
            "invalid config {origin}: ops_listen: expected an address like \"127.0.0.1:9470\", found {other}"
        )),
    }
}

/// `--ops`: an address, or a name and port (`localhost:9472`).
fn parse_target(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = crate::config::parse_addr(s) {
        return Ok(local(a));
    }
    let (host, port) = crate::config::parse_host_port(s)?;
    std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .next()
        .map(local)
        .ok_or_else(|| format!("{host} resolves to no address"))
}

/// A listen address as a place to connect to: wildcards become loopback.
fn local(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), a.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), a.port())
        }
        _ => a,
    }
}

/// What the daemon answered.
#[derive(Debug)]
pub enum Answer {
    /// The JSON status, as received.
    Status(serde_json::Value, String),
    /// It could not be asked, or answered something else: why.
    Unreachable(String),
}

/// Asks the ops endpoint at `addr` for `/status`, expecting a daemon of `role`.
pub async fn fetch(addr: SocketAddr, role: Role) -> Answer {
    let asked = tokio::time::timeout(
        QUERY_TIMEOUT,
        crate::ops::get_limited(addr, "/status", MAX_ANSWER),
    )
    .await;
    let (code, body) = match asked {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            return Answer::Unreachable(format!(
                "cannot reach the ops endpoint at {addr}: {e} (is ztna-{role} running, with \
                 ops_listen = \"{addr}\"? see --ops and --config)"
            ))
        }
        Err(_) => {
            return Answer::Unreachable(format!(
                "the ops endpoint at {addr} did not answer within {QUERY_TIMEOUT:?}"
            ))
        }
    };
    if code != 200 {
        return Answer::Unreachable(format!(
            "{addr} answered HTTP {code} to GET /status: not a ZTNA daemon's ops endpoint, or \
             one older than this command"
        ));
    }
    let value: serde_json::Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => {
            return Answer::Unreachable(format!("{addr} answered /status with no JSON status: {e}"))
        }
    };
    match value.get("role").and_then(|r| r.as_str()) {
        Some(r) if r == role.as_str() => Answer::Status(value, body),
        Some(other) => Answer::Unreachable(format!(
            "{addr} is the ops endpoint of {}, not of {} (try ztna-{other} status --ops {addr})",
            with_article(other),
            with_article(role.as_str())
        )),
        None => Answer::Unreachable(format!("{addr} answered /status without a role")),
    }
}

/// "an agent", "a connector", "an intermediate".
fn with_article(role: &str) -> String {
    if role.starts_with(['a', 'e', 'i', 'o', 'u']) {
        format!("an {role}")
    } else {
        format!("a {role}")
    }
}

/// The `status` subcommand: asks the daemon at `addr`, prints the summary made by `render` (or
/// the JSON with `--json`), and returns 0 (ready), 1 (not ready) or 2 (not asked).
pub fn run(
    name: &str,
    role: Role,
    args: &StatusArgs,
    addr: Result<SocketAddr, String>,
    render: impl Fn(&serde_json::Value) -> Result<String, String>,
) -> ExitCode {
    let addr = match addr {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{name} status: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name} status: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let (value, body) = match rt.block_on(fetch(addr, role)) {
        Answer::Status(v, body) => (v, body),
        Answer::Unreachable(why) => {
            eprintln!("{name} status: {why}");
            return ExitCode::from(2);
        }
    };
    let text = if args.json {
        Ok(format!("{}\n", body.trim_end()))
    } else {
        render(&value)
    };
    match text {
        Ok(t) => print!("{t}"),
        Err(e) => {
            eprintln!("{name} status: {addr} answered a status this command cannot read: {e}");
            return ExitCode::from(2);
        }
    }
    let ready = value.get("ready").and_then(|r| r.as_bool()) == Some(true);
    if ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_durations() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_777_638_896), "2026-05-01T12:34:56Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(words(Duration::from_secs(45)), "45s");
        assert_eq!(words(Duration::from_secs(192)), "3m 12s");
        assert_eq!(words(Duration::from_secs(7500)), "2h 5m");
        assert_eq!(words(Duration::from_secs(273_600)), "3d 4h");
    }

    #[test]
    fn tables_align() {
        let rows = vec![
            vec!["a".to_string(), "long cell".to_string(), "x".to_string()],
            vec!["bbbb".to_string(), "c".to_string(), String::new()],
        ];
        assert_eq!(table(&rows, 2), "  a     long cell  x\n  bbbb  c\n");
    }

    #[test]
    fn where_to_ask() {
        let default: SocketAddr = "127.0.0.1:9472".parse().unwrap();
        let none = StatusArgs::default();
        assert_eq!(ops_addr(&none, None, None, default).unwrap(), default);
        let ops = StatusArgs {
            ops: Some("[::1]:9000".into()),
            ..Default::default()
        };
        assert_eq!(
            ops_addr(&ops, Some("127.0.0.1:1"), None, default).unwrap(),
            "[::1]:9000".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            ops_addr(&none, Some("0.0.0.0:9100"), None, default).unwrap(),
            "127.0.0.1:9100".parse::<SocketAddr>().unwrap()
        );
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("agent.toml");
        std::fs::write(&cfg, "intermediates = []\nops_listen = \"[::]:9200\"\n").unwrap();
        assert_eq!(
            ops_addr(&none, None, Some(&cfg), default).unwrap(),
            "[::1]:9200".parse::<SocketAddr>().unwrap()
        );
        std::fs::write(&cfg, "intermediates = []\n").unwrap();
        assert_eq!(ops_addr(&none, None, Some(&cfg), default).unwrap(), default);
        std::fs::write(&cfg, "ops_listen = \"127.0.0.1:99999\"\n").unwrap();
        let e = ops_addr(&none, None, Some(&cfg), default).unwrap_err();
        assert!(
            e.contains("agent.toml") && e.contains("port 99999 is out of range"),
            "{e}"
        );
        let e = ops_addr(&none, None, Some(&dir.path().join("nope.toml")), default).unwrap_err();
        assert!(
            e.contains("cannot read config file") && e.contains("nope.toml"),
            "{e}"
        );
        let bad = StatusArgs {
            ops: Some("127.0.0.1".into()),
            ..Default::default()
        };
        assert!(ops_addr(&bad, None, None, default)
            .unwrap_err()
            .contains("--ops"));
    }

    #[tokio::test]
    async fn a_stopped_daemon_is_named_by_its_address() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        match fetch(addr, Role::Agent).await {
            Answer::Unreachable(why) => {
                assert!(
                    why.contains(&format!("cannot reach the ops endpoint at {addr}")),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
    }
}
