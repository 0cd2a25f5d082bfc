//! Backend addresses (`tcp = "db.internal:5432"`, `udp = "10.0.0.5:53"`) and how a flow reaches
//! them.
//!
//! An IP literal is used as it is, without a lookup. A host name is resolved when a flow opens,
//! through a small cache (30 s for an answer, 5 s for a failure), so a DNS change is picked up
//! within the TTL and a burst of flows makes one lookup, not one each. When a name stops
//! resolving (the resolver is down, or does not answer), the last good answer is used for up to
//! an hour: a DNS outage does not become a backend outage. TCP tries every address
//! in the resolver's order, each within what is left of `connect_timeout`. UDP uses the first
//! address this host can send to (one it has a route to), and the flow's socket is connected to
//! it (the injection defence stays as it is); when that address's host refuses the flow's
//! datagrams (ICMP), the flow moves to the next address of the same family.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use tokio::net::TcpStream;
use tokio::sync::OnceCell;
use tokio::time::Instant;

/// Where a service's flows go: an IP address or a host name, and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    host: String,
    port: u16,
    /// Set when `host` is an IP literal (no lookup).
    ip: Option<IpAddr>,
}

impl Backend {
    /// Parses `host:port` (`db.internal:5432`, `10.0.0.5:5432`, `[2001:db8::5]:5432`); errors
    /// say what to write instead.
    pub fn parse(s: &str) -> Result<Backend, String> {
        let (host, port) = ztna_node::config::parse_host_port(s.trim())?;
        let ip = host.parse::<IpAddr>().ok();
        Ok(Backend { host, port, ip })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address when the backend is given as an IP address.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.ip.map(|ip| SocketAddr::new(ip, self.port))
    }
}

impl From<SocketAddr> for Backend {
    fn from(a: SocketAddr) -> Backend {
        Backend {
            host: a.ip().to_string(),
            port: a.port(),
            ip: Some(a.ip()),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr() {
            Some(a) => write!(f, "{a}"),
            None => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

impl<'de> Deserialize<'de> for Backend {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Backend, D::Error> {
        let s = String::deserialize(d)?;
        Backend::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A name lookup: (host, port) to addresses, in order of preference.
pub type LookupFuture = Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>;
type Lookup = Arc<dyn Fn(String, u16) -> LookupFuture + Send + Sync>;

/// How long an answer is used before the name is looked up again.
pub const TTL: Duration = Duration::from_secs(30);
/// How long a failed lookup is remembered (flows are refused at once meanwhile, unless there is
/// a last good answer to use).
pub const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// How long the last good answer is used while the name does not resolve.
pub const STALE_TTL: Duration = Duration::from_secs(3600);
/// A lookup that has not answered in this long has failed (and is remembered as failed).
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a flow waits for a fresh answer when a last good one is there to fall back on.
const STALE_WAIT: Duration = Duration::from_millis(500);

type Answer = (Instant, Result<Arc<[SocketAddr]>, String>);
/// (host, port) → the answer, or the lookup in progress.
type Cache = HashMap<(String, u16), Arc<OnceCell<Answer>>>;
/// (host, port) → the last answer that had addresses, and when it came.
type Good = HashMap<(String, u16), (Instant, Arc<[SocketAddr]>)>;

/// Resolves backend host names, with a cache; one lookup per name at a time. Cheap to clone.
#[derive(Clone)]
pub struct Resolver {
    lookup: Lookup,
    ttl: Duration,
    negative_ttl: Duration,
    stale_ttl: Duration,
    /// Keys come from the configuration, so the table stays as small as the list of services.
    cache: Arc<Mutex<Cache>>,
    good: Arc<Mutex<Good>>,
}

impl Default for Resolver {
    fn default() -> Self {
        Resolver::system()
    }
}

impl Resolver {
    /// The operating system's resolver (`getaddrinfo`: /etc/hosts, DNS, ...).
    pub fn system() -> Resolver {
        Resolver::with_lookup(|host, port| {
            Box::pin(async move {
                Ok(tokio::net::lookup_host((host.as_str(), port))
                    .await?
                    .collect())
            })
        })
    }

    /// A resolver that asks `lookup` (tests, or an embedding with its own name service).
    pub fn with_lookup(
        lookup: impl Fn(String, u16) -> LookupFuture + Send + Sync + 'static,
    ) -> Self {
        Resolver {
            lookup: Arc::new(lookup),
            ttl: TTL,
            negative_ttl: NEGATIVE_TTL,
            stale_ttl: STALE_TTL,
            cache: Arc::default(),
            good: Arc::default(),
        }
    }

    /// Another limit than [`STALE_TTL`] on how long a last good answer is used.
    pub fn with_stale_ttl(mut self, stale: Duration) -> Resolver {
        self.stale_ttl = stale;
        self
    }

    /// Other cache lifetimes than [`TTL`] and [`NEGATIVE_TTL`].
    pub fn with_ttl(mut self, answer: Duration, failure: Duration) -> Resolver {
        self.ttl = answer;
        self.negative_ttl = failure;
        self
    }

    /// A fixed table of names; any other name does not resolve.
    pub fn fixed(table: &[(&str, &[IpAddr])]) -> Resolver {
        let table: Arc<HashMap<String, Vec<IpAddr>>> = Arc::new(
            table
                .iter()
                .map(|(h, ips)| (h.to_string(), ips.to_vec()))
                .collect(),
        );
        Resolver::with_lookup(move |host, port| {
            let found = table.get(&host).cloned();
            Box::pin(async move {
                match found {
                    Some(ips) => Ok(ips
                        .into_iter()
                        .map(|ip| SocketAddr::new(ip, port))
                        .collect()),
                    None => Err(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "Name or service not known",
                    )),
                }
            })
        })
    }

    /// What the cache holds for a named `backend` now, without a lookup: how old the answer is,
    /// and the addresses or why the name did not resolve. None for an IP literal, a name not
    /// looked up yet, or a lookup in progress.
    pub fn cached(&self, backend: &Backend) -> Option<(Duration, Result<Vec<SocketAddr>, String>)> {
        if backend.ip.is_some() {
            return None;
        }
        let cache = ztna_node::lock(&self.cache);
        let (at, answer) = cache.get(&(backend.host.clone(), backend.port))?.get()?;
        Some((
            at.elapsed(),
            answer.as_ref().map(|a| a.to_vec()).map_err(Clone::clone),
        ))
    }

    /// The addresses of `backend`, in order of preference, within `limit`. An IP literal comes
    /// back at once. The error names the host and says why.
    ///
    /// When the answer in the cache has expired, a new lookup runs on a task of its own (a flow
    /// that stops waiting does not cancel it: the next flow gets its answer). With a last good
    /// answer younger than the stale limit, a flow waits at most [`STALE_WAIT`] for the new one
    /// and otherwise, or when the lookup fails, is given the last good answer.
    pub async fn resolve(
        &self,
        backend: &Backend,
        limit: Duration,
    ) -> Result<Vec<SocketAddr>, String> {
        if let Some(a) = backend.addr() {
            return Ok(vec![a]);
        }
        let key = (backend.host.clone(), backend.port);
        let cell = {
            let mut cache = ztna_node::lock(&self.cache);
            let fresh = cache.get(&key).filter(|c| match c.get() {
                Some((at, Ok(_))) => at.elapsed() < self.ttl,
                Some((at, Err(_))) => at.elapsed() < self.negative_ttl,
                None => true, // a lookup in progress: wait for it
            });
            match fresh {
                Some(c) => c.clone(),
                None => {
                    let c = Arc::new(OnceCell::new());
                    cache.insert(key.clone(), c.clone());
                    c
                }
            }
        };
        let stale = ztna_node::lock(&self.good)
            .get(&key)
            .filter(|(at, _)| at.elapsed() < self.stale_ttl)
            .map(|(_, a)| a.clone());
        let answer = match cell.get() {
            Some(a) => Some(a.clone()),
            None => {
                let task = tokio::spawn(self.lookup_into(cell, key, backend.host.clone()));
                let wait = match stale {
                    Some(_) => STALE_WAIT.min(limit),
                    None => limit,
                };
                tokio::time::timeout(wait, task)
                    .await
                    .ok()
                    .and_then(|r| r.ok())
            }
        };
        match (answer, stale) {
            (Some((_, Ok(addrs))), _) => Ok(addrs.to_vec()),
            (answer, Some(stale)) => {
                let why = match answer {
                    Some((_, Err(why))) => why,
                    _ => format!("no answer within {STALE_WAIT:?}"),
                };
                ztna_node::warn_limited!(Duration::from_secs(10), backend = %backend, why = %why, "the backend's name does not resolve now; using its last good addresses");
                Ok(stale.to_vec())
            }
            (Some((_, Err(why))), None) => Err(why),
            (None, None) => Err(format!(
                "cannot resolve {}: no answer within {limit:?}",
                backend.host
            )),
        }
    }

    /// Looks `key` up into `cell` (unless another lookup already filled it) within
    /// [`LOOKUP_TIMEOUT`], keeping an answer with addresses as the last good one. Returns what
    /// the cell holds.
    fn lookup_into(
        &self,
        cell: Arc<OnceCell<Answer>>,
        key: (String, u16),
        host: String,
    ) -> impl Future<Output = Answer> + Send + 'static {
        let (lookup, good) = (self.lookup.clone(), self.good.clone());
        async move {
            cell.get_or_init(|| async {
                let found =
                    tokio::time::timeout(LOOKUP_TIMEOUT, (lookup)(key.0.clone(), key.1)).await;
                let answer = match found {
                    Ok(Ok(addrs)) => {
                        let mut unique: Vec<SocketAddr> = Vec::with_capacity(addrs.len());
                        for a in addrs {
                            if !unique.contains(&a) {
                                unique.push(a);
                            }
                        }
                        if unique.is_empty() {
                            Err(format!("{host} resolves to no address"))
                        } else {
                            let unique: Arc<[SocketAddr]> = Arc::from(unique);
                            ztna_node::lock(&good).insert(key, (Instant::now(), unique.clone()));
                            Ok(unique)
                        }
                    }
                    Ok(Err(e)) => Err(format!("cannot resolve {host}: {e}")),
                    Err(_) => Err(format!(
                        "cannot resolve {host}: no answer within {LOOKUP_TIMEOUT:?}"
                    )),
                };
                (Instant::now(), answer)
            })
            .await
            .clone()
        }
    }
}

/// Connects to a TCP backend: every address in turn, each within what is left of `limit`
/// (lookup included). Returns the stream and the address used, or why none took it (naming the
/// backend and `service`, as the agent's user will read it).
pub async fn connect_tcp(
    resolver: &Resolver,
    backend: &Backend,
    service: &str,
    limit: Duration,
) -> Result<(TcpStream, SocketAddr), String> {
    let deadline = Instant::now() + limit;
    let addrs = addresses(resolver, backend, service, limit).await?;
    let mut failures: Vec<(SocketAddr, String)> = Vec::new();
    for addr in &addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            failures.push((*addr, "not tried: connect_timeout used up".to_string()));
            continue;
        }
        match tokio::time::timeout(left, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                if !failures.is_empty() {
                    tracing::debug!(%backend, %addr, ?failures, "backend reached on a later address");
                }
                return Ok((s, *addr));
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                failures.push((*addr, format!("refused the connection: {e}")))
            }
            Ok(Err(e)) => failures.push((*addr, format!("could not be reached: {e}"))),
            Err(_) => failures.push((
                *addr,
                format!("did not answer within {left:.1?} (of connect_timeout {limit:?})"),
            )),
        }
    }
    Err(none_took(backend, service, &failures))
}

/// The addresses of `backend` to try, in order, or why there are none (naming the backend and
/// `service`).
async fn addresses(
    resolver: &Resolver,
    backend: &Backend,
    service: &str,
    limit: Duration,
) -> Result<Vec<SocketAddr>, String> {
    resolver
        .resolve(backend, limit)
        .await
        .map_err(|why| format!("backend {backend} of {service}: {why}"))
}

/// Why no address of `backend` could be used, one reason per address tried.
fn none_took(backend: &Backend, service: &str, failures: &[(SocketAddr, String)]) -> String {
    match (backend.addr(), failures) {
        // An IP address: the wording operators already know.
        (Some(_), [(_, why)]) => format!("backend {backend} of {service} {why}"),
        (None, [(addr, why)]) => format!("backend {backend} ({addr}) of {service} {why}"),
        _ => format!(
            "backend {backend} of {service}: no address took the connection ({})",
            failures
                .iter()
                .map(|(a, why)| format!("{a} {why}"))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    }
}

/// A UDP flow's socket, connected to one of its backend's addresses. Shared by the flow's two
/// directions: either may learn that the backend's host refused a datagram.
#[derive(Debug)]
pub struct UdpBackend {
    pub socket: tokio::net::UdpSocket,
    /// Every address of the backend, in the resolver's order (never empty).
    addrs: Vec<SocketAddr>,
    /// Index of the one the socket is connected to.
    at: std::sync::atomic::AtomicUsize,
    /// Held while moving to another address.
    moving: std::sync::Mutex<()>,
}

impl UdpBackend {
    /// The address the socket is connected to now.
    pub fn addr(&self) -> SocketAddr {
        let at = self.at.load(std::sync::atomic::Ordering::Relaxed);
        self.addrs[at % self.addrs.len()]
    }

    /// The backend's host refused a datagram sent to `refused` (ICMP port unreachable; the
    /// kernel reports it on the socket's next send or receive, whichever comes first):
    /// connects the socket to the backend's next address of the same family, round robin, and
    /// returns it. None when there is no other, or the socket has already moved on from
    /// `refused` (both directions may report the same refusal); the flow then stays where it
    /// is, and a backend that comes back gets its next datagrams.
    pub fn refused(&self, refused: SocketAddr) -> Option<SocketAddr> {
        use std::sync::atomic::Ordering;
        let _one_move_at_a_time = ztna_node::lock(&self.moving);
        let n = self.addrs.len();
        let at = self.at.load(Ordering::Relaxed) % n;
        if self.addrs[at] != refused {
            return None;
        }
        for i in 1..n {
            let j = (at + i) % n;
            let next = self.addrs[j];
            // Another family needs another socket: not this flow's.
            if next.is_ipv4() == refused.is_ipv4()
                && ztna_node::udp::reconnect(&self.socket, next).is_ok()
            {
                self.at.store(j, Ordering::Relaxed);
                return Some(next);
            }
        }
        None
    }
}

/// Opens a UDP flow's socket, connected to the first address of `backend` the host can send
/// to (`buffer`: its socket buffers). UDP has no handshake to tell a live backend from a dead
/// one, but an address this host has no route to, or may not send to, fails at once
/// (`connect`: an IPv6 address on a host without IPv6, a broadcast address), and then the next
/// one is used, in the resolver's order; an address whose host refuses datagrams later is left
/// through [`UdpBackend::refused`]. Returns the socket, or why no address could be used
/// (worded as [`connect_tcp`] words it).
pub async fn open_udp(
    resolver: &Resolver,
    backend: &Backend,
    service: &str,
    limit: Duration,
    buffer: usize,
) -> Result<UdpBackend, String> {
    let addrs = addresses(resolver, backend, service, limit).await?;
    let mut failures: Vec<(SocketAddr, String)> = Vec::new();
    for (at, addr) in addrs.iter().enumerate() {
        match ztna_node::udp::connected(*addr, buffer).await {
            Ok(socket) => {
                if !failures.is_empty() {
                    tracing::debug!(%backend, %addr, ?failures, "UDP backend on a later address");
                }
                return Ok(UdpBackend {
                    socket,
                    addrs,
                    at: std::sync::atomic::AtomicUsize::new(at),
                    moving: std::sync::Mutex::new(()),
                });
            }
            Err(e) => failures.push((*addr, format!("cannot be used: {e}"))),
        }
    }
    Err(none_took(backend, service, &failures))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn parses_names_and_addresses_with_clear_errors() {
        let b = Backend::parse("db.internal:5432").unwrap();
        assert_eq!((b.host(), b.port(), b.addr()), ("db.internal", 5432, None));
        assert_eq!(b.to_string(), "db.internal:5432");
        let b = Backend::parse("[2001:db8::5]:53").unwrap();
        assert_eq!(b.addr(), Some("[2001:db8::5]:53".parse().unwrap()));
        assert_eq!(b.to_string(), "[2001:db8::5]:53");
        for (bad, want) in [
            ("db.internal", "has no port"),
            ("db.internal:99999", "port 99999 is out of range 1-65535"),
            ("db.internal:0", "port 0 is out of range 1-65535"),
            ("10.0.0.5:http", "port \"http\" is not a number"),
            ("tcp://db.internal:5432", "without a scheme"),
        ] {
            let e = Backend::parse(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    fn counting(
        table: &'static [(&'static str, &'static [IpAddr])],
    ) -> (Resolver, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let fixed = Resolver::fixed(table);
        let c = calls.clone();
        let r = Resolver::with_lookup(move |h, p| {
            c.fetch_add(1, Ordering::SeqCst);
            (fixed.lookup)(h, p)
        });
        (r, calls)
    }

    const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[tokio::test]
    async fn answers_are_cached_for_the_ttl_failures_briefly() {
        let (r, calls) = counting(&[("db.test", &[LOOPBACK])]);
        let (ttl, negative) = (Duration::from_millis(400), Duration::from_millis(200));
        let r = r.with_ttl(ttl, negative);
        let db = Backend::parse("db.test:5432").unwrap();
        let limit = Duration::from_secs(5);
        assert_eq!(
            r.resolve(&db, limit).await.unwrap(),
            vec!["127.0.0.1:5432".parse::<SocketAddr>().unwrap()]
        );
        r.resolve(&db, limit).await.unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "second flow used the cache"
        );
        let (age, answer) = r.cached(&db).expect("cached");
        assert!(age < ttl);
        assert_eq!(
            answer.unwrap(),
            vec!["127.0.0.1:5432".parse::<SocketAddr>().unwrap()]
        );
        tokio::time::sleep(ttl).await;
        r.resolve(&db, limit).await.unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "looked up again after the TTL"
        );

        let gone = Backend::parse("gone.test:53").unwrap();
        let e = r.resolve(&gone, limit).await.unwrap_err();
        assert!(e.contains("cannot resolve gone.test"), "{e}");
        r.resolve(&gone, limit).await.unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 3, "a failure is remembered");
        assert!(r.cached(&gone).is_some_and(|(_, a)| a.is_err()));
        tokio::time::sleep(negative).await;
        r.resolve(&gone, limit).await.unwrap_err();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            4,
            "and retried after NEGATIVE_TTL"
        );

        // IP literals never ask the resolver.
        let ip = Backend::parse("10.0.0.5:53").unwrap();
        assert_eq!(
            r.resolve(&ip, limit).await.unwrap(),
            vec!["10.0.0.5:53".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_flows_makes_one_lookup() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let r = Resolver::with_lookup(move |_, port| {
            c.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(vec![SocketAddr::new(LOOPBACK, port)])
            })
        });
        let db = Backend::parse("db.test:5432").unwrap();
        let all: Vec<_> = (0..50)
            .map(|_| {
                let (r, db) = (r.clone(), db.clone());
                tokio::spawn(async move { r.resolve(&db, Duration::from_secs(5)).await })
            })
            .collect();
        for t in all {
            assert!(t.await.unwrap().is_ok());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_lookup_that_hangs_fails_within_the_limit() {
        let r = Resolver::with_lookup(|_, _| Box::pin(std::future::pending()));
        let db = Backend::parse("slow.test:5432").unwrap();
        let e = r
            .resolve(&db, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(
            e.contains("slow.test") && e.contains("no answer within 300ms"),
            "{e}"
        );
    }

    /// A DNS outage is not a backend outage: once the name stops resolving (its lookups fail,
    /// or hang), flows get the last good addresses, at once or after at most STALE_WAIT, until
    /// the stale limit; then the lookup's error. A name never resolved has nothing to fall back on.
    #[tokio::test]
    async fn a_name_that_stops_resolving_keeps_its_last_good_addresses() {
        // 0: answers, 1: fails, 2: hangs.
        let mode = Arc::new(AtomicUsize::new(0));
        let m = mode.clone();
        let r = Resolver::with_lookup(move |_, port| {
            let mode = m.load(Ordering::SeqCst);
            Box::pin(async move {
                match mode {
                    0 => Ok(vec![SocketAddr::new(LOOPBACK, port)]),
                    1 => Err(std::io::Error::other(
                        "Temporary failure in name resolution",
                    )),
                    _ => std::future::pending().await,
                }
            })
        })
        .with_ttl(Duration::from_millis(100), Duration::from_millis(100))
        .with_stale_ttl(Duration::from_secs(2));
        let db = Backend::parse("db.test:5432").unwrap();
        let limit = Duration::from_secs(5);
        let good = vec!["127.0.0.1:5432".parse::<SocketAddr>().unwrap()];
        assert_eq!(r.resolve(&db, limit).await.unwrap(), good);
        mode.store(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(150)).await;
        let t0 = Instant::now();
        assert_eq!(r.resolve(&db, limit).await.unwrap(), good, "lookup failing");
        assert!(
            t0.elapsed() < Duration::from_millis(100),
            "{:?}",
            t0.elapsed()
        );
        // Past the stale limit the lookup's failure shows.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let e = r.resolve(&db, limit).await.unwrap_err();
        assert!(e.contains("Temporary failure"), "{e}");
        // A name never resolved has no last good answer.
        let other = Backend::parse("other.test:5432").unwrap();
        assert!(r.resolve(&other, limit).await.is_err());
        // Back: fresh answers again; then a lookup that hangs.
        mode.store(0, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(r.resolve(&db, limit).await.unwrap(), good);
        mode.store(2, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(150)).await;
        let t0 = Instant::now();
        assert_eq!(r.resolve(&db, limit).await.unwrap(), good, "lookup hanging");
        let waited = t0.elapsed();
        assert!(
            waited >= STALE_WAIT && waited < STALE_WAIT + Duration::from_millis(300),
            "{waited:?}"
        );
        // The next flow does not start a lookup of its own: the hanging one is still under
        // way, and it waits for it as long (one lookup per name at a time).
        let t0 = Instant::now();
        assert_eq!(r.resolve(&db, limit).await.unwrap(), good);
        assert!(t0.elapsed() >= STALE_WAIT, "{:?}", t0.elapsed());
    }

    #[tokio::test]
    async fn udp_uses_the_first_address_it_can_send_to() {
        let echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = echo.local_addr().unwrap().port();
        // The broadcast address comes first: a socket without SO_BROADCAST may not send there,
        // so `connect` refuses it at once (EACCES), as it refuses an address with no route.
        let broadcast: IpAddr = "255.255.255.255".parse().unwrap();
        let r = Resolver::fixed(&[
            ("dns.test", &[broadcast, LOOPBACK]),
            ("bad.test", &[broadcast]),
        ]);
        let dns = Backend::parse(&format!("dns.test:{port}")).unwrap();
        let limit = Duration::from_secs(2);
        let u = open_udp(&r, &dns, "dns", limit, 1 << 16).await.unwrap();
        assert_eq!(u.addr(), SocketAddr::new(LOOPBACK, port));
        let s = &u.socket;
        s.send(b"ping").await.unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = echo.recv_from(&mut buf).await.unwrap();
        assert_eq!((&buf[..n], from), (&b"ping"[..], s.local_addr().unwrap()));
        let bad = Backend::parse(&format!("bad.test:{port}")).unwrap();
        let e = open_udp(&r, &bad, "dns", limit, 1 << 16).await.unwrap_err();
        assert!(
            e.starts_with(&format!(
                "backend bad.test:{port} (255.255.255.255:{port}) of dns cannot be used"
            )),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_refused_udp_flow_moves_round_robin_within_its_family() {
        let port = 9; // nothing is sent: only where the socket points matters
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), LOOPBACK);
        let v6: IpAddr = "::1".parse().unwrap();
        let r = Resolver::fixed(&[("dns.test", &[a, v6, b])]);
        let dns = Backend::parse(&format!("dns.test:{port}")).unwrap();
        let u = open_udp(&r, &dns, "dns", Duration::from_secs(2), 1 << 16)
            .await
            .unwrap();
        let at = |ip| SocketAddr::new(ip, port);
        assert_eq!(u.addr(), at(a));
        // The IPv6 address needs another socket: skipped.
        assert_eq!(u.refused(at(a)), Some(at(b)));
        assert_eq!(u.socket.peer_addr().unwrap(), at(b));
        // The other direction reporting the same refusal moves nothing.
        assert_eq!(u.refused(at(a)), None);
        assert_eq!(u.addr(), at(b));
        // Round robin: back to the first.
        assert_eq!(u.refused(at(b)), Some(at(a)));
        assert_eq!(u.socket.peer_addr().unwrap(), at(a));
        // A backend with one address stays where it is.
        let one = Resolver::fixed(&[("one.test", &[b])]);
        let one_b = Backend::parse(&format!("one.test:{port}")).unwrap();
        let u = open_udp(&one, &one_b, "dns", Duration::from_secs(2), 1 << 16)
            .await
            .unwrap();
        assert_eq!(u.refused(at(b)), None);
        assert_eq!(u.addr(), at(b));
    }

    #[tokio::test]
    async fn tcp_tries_every_address_in_order() {
        let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = up.local_addr().unwrap().port();
        // 127.0.0.2 is loopback too, with nothing listening on that port: refused.
        let r = Resolver::fixed(&[("db.test", &["127.0.0.2".parse().unwrap(), LOOPBACK])]);
        let db = Backend::parse(&format!("db.test:{port}")).unwrap();
        let (_s, used) = connect_tcp(&r, &db, "db", Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(used, SocketAddr::new(LOOPBACK, port));
        drop(up);
        let e = connect_tcp(&r, &db, "db", Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(
            e.starts_with(&format!("backend db.test:{port} of db: no address took the connection (127.0.0.2:{port} refused")),
            "{e}"
        );
        let e = connect_tcp(
            &r,
            &Backend::parse("nope.test:1").unwrap(),
            "db",
            Duration::from_secs(2),
        )
        .await
        .unwrap_err();
        assert!(
            e.contains("backend nope.test:1 of db: cannot resolve nope.test"),
            "{e}"
        );
    }
}
