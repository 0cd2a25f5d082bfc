//! Measuring helpers: percentiles, CPU time and RSS from /proc, metrics scraping.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

/// /proc/PID/stat counts CPU time in USER_HZ ticks, which Linux fixes at 100 for userspace.
const USER_HZ: f64 = 100.0;

/// Sorted samples (µs) with percentiles.
#[derive(Clone, Default)]
pub struct Samples(pub Vec<f64>);

impl Samples {
    pub fn new(mut v: Vec<f64>) -> Samples {
        v.sort_by(f64::total_cmp);
        Samples(v)
    }
    pub fn pct(&self, p: f64) -> Option<f64> {
        let v = &self.0;
        if v.is_empty() {
            return None;
        }
        let i = ((v.len() as f64 * p / 100.0) as usize).min(v.len() - 1);
        Some(v[i])
    }
    pub fn p50(&self) -> Option<f64> {
        self.pct(50.0)
    }
    pub fn p99(&self) -> Option<f64> {
        self.pct(99.0)
    }
    /// `p50 / p99` in µs, or `-`.
    pub fn show(&self) -> String {
        format!("{:>7} {:>7}", opt(self.p50(), 0), opt(self.p99(), 0))
    }
}

pub fn opt(x: Option<f64>, decimals: usize) -> String {
    x.filter(|x| x.is_finite())
        .map_or("-".into(), |x| format!("{x:.decimals$}"))
}

pub fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// CPU seconds (user + system) a process has used so far, all its threads included.
pub fn proc_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = stat_ticks(&stat)?;
    Some(ticks / USER_HZ)
}

/// utime + stime (fields 14 and 15) of a /proc stat line, whose comm may contain spaces.
fn stat_ticks(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state), so utime (14) is index 11.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Resident set size of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// CPU nanoseconds of this process's threads whose name starts with one of `prefixes`, by
/// thread id (from /proc/self/task/*/schedstat, nanosecond resolution).
pub fn threads_cpu(prefixes: &[&str]) -> HashMap<u64, u64> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for entry in dir.flatten() {
        let path = entry.path();
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u64>() else {
            continue;
        };
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !prefixes.iter().any(|p| comm.trim_end().starts_with(p)) {
            continue;
        }
        let ns = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
        if let Some(ns) = ns {
            out.insert(tid, ns);
        }
    }
    out
}

/// What CPU time to account a measurement to: some processes, or threads of this process.
#[derive(Clone)]
pub enum CpuOf {
    Pids(Vec<u32>),
    Threads(Vec<&'static str>),
}

/// A CPU-time reading to diff later.
pub enum CpuMark {
    Pids(Vec<(u32, f64)>),
    Threads(Vec<&'static str>, HashMap<u64, u64>),
}

impl CpuOf {
    pub fn mark(&self) -> CpuMark {
        match self {
            CpuOf::Pids(p) => CpuMark::Pids(
                p.iter()
                    .map(|&pid| (pid, proc_cpu(pid).unwrap_or(0.0)))
                    .collect(),
            ),
            CpuOf::Threads(t) => CpuMark::Threads(t.clone(), threads_cpu(t)),
        }
    }
}

impl CpuMark {
    /// CPU seconds used since this mark.
    pub fn since(&self) -> f64 {
        match self {
            CpuMark::Pids(p) => p
                .iter()
                .map(|&(pid, before)| (proc_cpu(pid).unwrap_or(before) - before).max(0.0))
                .sum(),
            CpuMark::Threads(t, before) => {
                let now = threads_cpu(t);
                let ns: u64 = now
                    .iter()
                    .map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0)))
                    .sum();
                ns as f64 / 1e9
            }
        }
    }
}

/// The Prometheus text of an ops endpoint (empty if it does not answer).
pub async fn scrape(ops: SocketAddr) -> String {
    match tokio::time::timeout(
        Duration::from_secs(5),
        ztna_integration::http_get(ops, "/metrics"),
    )
    .await
    {
        Ok((200, body)) => body,
        _ => String::new(),
    }
}

/// Every `name{labels} value` sample of a drop counter, as a map (for before/after deltas).
pub fn drop_counters(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.contains("dropped") || l.contains("udp_stream_payloads"))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Counters that moved between two [`drop_counters`] readings, as `name{labels} +delta`.
pub fn counter_deltas(before: &HashMap<String, f64>, after: &HashMap<String, f64>) -> Vec<String> {
    let mut out: Vec<String> = after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0.0);
            (d != 0.0).then(|| format!("{k} +{d}"))
        })
        .collect();
    out.sort();
    out
}

/// Datagrams the kernel dropped at a process's UDP sockets (full receive buffer), summed over
/// its sockets (the `drops` column of /proc/net/udp and udp6, matched by socket inode).
pub fn udp_socket_drops(pid: u32) -> u64 {
    let mut inodes = std::collections::HashSet::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in dir.flatten() {
            if let Ok(link) = std::fs::read_link(e.path()) {
                let l = link.to_string_lossy();
                if let Some(i) = l.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(i.to_string());
                }
            }
        }
    }
    let mut total = 0;
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 12 && inodes.contains(f[9]) {
                total += f[12].parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

pub fn mib_s_to_gbit(mib_s: f64) -> f64 {
    mib_s * 1024.0 * 1024.0 * 8.0 / 1e9
}

/// Parses `50ms`, `1s`, `100us`, or a plain number of milliseconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "ms"), |i| (&s[..i], &s[i..]));
    let v: f64 = num.parse().ok()?;
    let secs = match unit {
        "us" | "µs" => v / 1e6,
        "ms" => v / 1e3,
        "s" => v,
        _ => return None,
    };
    (0.0..10.0)
        .contains(&secs)
        .then(|| Duration::from_secs_f64(secs))
}

/// First argument that makes `ztna-bench` a UDP echo child ([`udp_echo_child`], [`SelfChild`]).
pub const UDP_ECHO_CHILD: &str = "--udp-echo-child";

/// The child's side: a blocking UDP echo on loopback. Prints its address on stdout, then echoes
/// until its parent goes away (stdin closes) or 10 minutes have passed.
pub fn udp_echo_child() -> anyhow::Result<()> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let echo = sock.try_clone()?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..n], from);
        }
    });
    serve_until_parent_leaves(sock.local_addr()?, Duration::from_secs(600))
}

/// A child's side of [`SelfChild`]: prints `addr` on stdout, then returns when the parent goes
/// away (stdin closes) or after `limit`.
pub fn serve_until_parent_leaves(addr: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    println!("{addr}");
    std::io::stdout().flush()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sink = [0u8; 64];
        while !matches!(std::io::stdin().read(&mut sink), Ok(0) | Err(_)) {}
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(limit);
    Ok(())
}

/// This binary re-run as a server child (`args` name which one), with the address it printed
/// first; killed on drop.
pub struct SelfChild {
    child: std::process::Child,
    pub addr: SocketAddr,
}

impl SelfChild {
    pub fn spawn(args: &[&std::ffi::OsStr], what: &str) -> anyhow::Result<SelfChild> {
        use anyhow::Context;
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut child = Command::new(std::env::current_exe()?)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {what}"))?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            std::io::BufReader::new(out).read_line(&mut line)?;
        }
        match line.trim().parse() {
            Ok(addr) => Ok(SelfChild { child, addr }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("{what} printed {line:?}, not its address")
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for SelfChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_comm() {
        let line = "123 (tokio rt (x)) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0";
        assert_eq!(stat_ticks(line), Some(300.0));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("50ms"), Some(Duration::from_millis(50)));
        assert_eq!(parse_duration("100"), Some(Duration::from_millis(100)));
        assert_eq!(parse_duration("0.1s"), Some(Duration::from_millis(100)));
        assert_eq!(parse_duration("x"), None);
    }
}
