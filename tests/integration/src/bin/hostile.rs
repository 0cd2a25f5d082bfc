//! `ztna-hostile`: the hostile test client of issue 12 and the well-behaved victim measured beside
//! it. Every subcommand is bounded in count and time, talks only to loopback or private
//! addresses, and prints JSON lines: events as they happen, then one summary line (the last).
//!
//! Attacks (as an authenticated peer, in our own protocol): `exhaust`, `flood-write`, `names`,
//! `initials` (spoofed raw Initials; root), `hold` (revocation: a held flow that reports how it
//! ends), `ticket` (issue 14: a crafted direct client with a ticket it made, or none). Local helpers: `victim`, `serve` (backends), `upload`, `download`, `udp-flows`, and
//! `issue` (a certificate whose notAfter is seconds away).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use ztna_integration::hostile::{attacks, direct, initials, local, unix_now, Creds, NameKind};
use ztna_node::config::TlsConfig;

#[derive(Parser)]
#[command(
    name = "ztna-hostile",
    about = "Hostile test client for ZTNA (test networks only)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Tls {
    /// Deployment CA the intermediate's certificate must chain to.
    #[arg(long)]
    ca: PathBuf,
    /// Our certificate (chain PEM); its SPIFFE role is the role we claim.
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
}

impl Tls {
    fn creds(&self) -> Result<Creds, String> {
        let tls = TlsConfig {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        };
        let role = attacks::role_of(&tls)?;
        Ok(Creds { tls, role })
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Flow,
    Register,
}

#[derive(Subcommand)]
enum Cmd {
    /// Item 1: N connections with one certificate, M idle TCP flows each, held, then closed.
    Exhaust {
        #[command(flatten)]
        tls: Tls,
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        service: String,
        #[arg(long, default_value_t = 20)]
        conns: usize,
        #[arg(long, default_value_t = 100)]
        flows: usize,
        /// Finish our side of each flow after the FlowOpen.
        #[arg(long)]
        half_close: bool,
        #[arg(long, default_value_t = 15.0)]
        hold: f64,
        /// Seconds an open may wait for a stream and for its reply.
        #[arg(long, default_value_t = 5.0)]
        open_timeout: f64,
    },
    /// Item 2: K flows writing as fast as possible into a backend that never reads.
    FloodWrite {
        #[command(flatten)]
        tls: Tls,
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        service: String,
        #[arg(long, default_value_t = 500)]
        flows: usize,
        #[arg(long, default_value_t = 5)]
        conns: usize,
        #[arg(long, default_value_t = 15.0)]
        secs: f64,
    },
    /// Item 6: FlowOpens (agent) or Registers (connector) with huge service names.
    Names {
        #[command(flatten)]
        tls: Tls,
        #[arg(long)]
        server: SocketAddr,
        #[arg(long, value_enum, default_value = "flow")]
        kind: Kind,
        #[arg(long, default_value_t = 65_000)]
        name_len: usize,
        /// Messages per second.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
        /// A connection closed by the intermediate is replaced at most this often.
        #[arg(long, default_value_t = 20.0)]
        reconnects_per_sec: f64,
    },
    /// Item 8: valid QUIC Initials from spoofed sources (raw socket: root).
    Initials {
        /// Used to build the ClientHellos and for the probe handshakes.
        #[command(flatten)]
        tls: Tls,
        #[arg(long)]
        target: SocketAddr,
        /// Spoofed source network, e.g. 127.0.0.0/8.
        #[arg(long, default_value = "127.0.0.0/8")]
        sources: String,
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        /// Time a real handshake this often (seconds; 0: never).
        #[arg(long, default_value_t = 0.5)]
        probe_every: f64,
    },
    /// Item 3: hold a flow (pinged through an echo) and try new flows; report how they end.
    Hold {
        #[command(flatten)]
        tls: Tls,
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        service: String,
        #[arg(long, default_value_t = 30.0)]
        secs: f64,
        #[arg(long, default_value_t = 0.2)]
        interval: f64,
        #[arg(long, default_value_t = 1.0)]
        new_flow_every: f64,
    },
    /// A well-behaved client: one TCP round trip every interval through an agent's local port.
    Victim {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        /// Stop after this many requests instead of after `secs`.
        #[arg(long)]
        count: Option<usize>,
        #[arg(long, default_value_t = 0.1)]
        interval: f64,
        #[arg(long, default_value_t = 3.0)]
        timeout: f64,
    },
    /// Backends: echo, sink (never reads), source (sends N bytes), count (EOF vs reset), UDP echo.
    Serve {
        #[arg(long)]
        echo: Vec<SocketAddr>,
        #[arg(long)]
        sink: Vec<SocketAddr>,
        #[arg(long)]
        source: Vec<SocketAddr>,
        #[arg(long, default_value_t = 200 << 20)]
        source_bytes: u64,
        #[arg(long)]
        count: Vec<SocketAddr>,
        #[arg(long)]
        udp_echo: Vec<SocketAddr>,
        #[arg(long, default_value_t = 600.0)]
        secs: f64,
    },
    /// Uploads bytes through a local port at a given rate; reports how it ended.
    Upload {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 200 << 20)]
        bytes: u64,
        /// MiB per second (0: unlimited).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        #[arg(long, default_value_t = 120.0)]
        secs: f64,
    },
    /// Downloads from a local port at a given rate; reports bytes and EOF vs reset.
    Download {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        #[arg(long, default_value_t = 120.0)]
        secs: f64,
    },
    /// Item 7: many UDP flows (one local socket each) through an agent's UDP port, held.
    UdpFlows {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1100)]
        count: usize,
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        hold: f64,
    },
    /// Issue 14: a crafted direct (P2P) client. Dials the connector at SERVER as the agent of
    /// --cert, presents a ticket signed with --signer-cert/--signer-key (an intermediate's, or a
    /// forger's), a raw one, or none, and opens a TCP flow to SERVICE; an accepted flow must echo.
    Ticket {
        #[command(flatten)]
        tls: Tls,
        /// The connector's QUIC address (its `bind`).
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        service: String,
        /// The connector's SPIFFE ID, as the ticket names it.
        #[arg(long)]
        connector: String,
        /// Signs the ticket; without it no ticket is presented.
        #[arg(long, requires = "signer_key")]
        signer_cert: Option<PathBuf>,
        #[arg(long)]
        signer_key: Option<PathBuf>,
        /// The CA the signer's certificate chains to (default: --ca).
        #[arg(long)]
        signer_ca: Option<PathBuf>,
        /// The agent the ticket names (default: ours).
        #[arg(long)]
        for_agent: Option<String>,
        /// The services the ticket names, comma-separated (default: SERVICE).
        #[arg(long, value_delimiter = ',')]
        for_services: Vec<String>,
        /// Milliseconds the ticket lives from now (negative: expired).
        #[arg(long, default_value_t = 30_000, allow_negative_numbers = true)]
        lifetime_ms: i64,
        /// Present these hex bytes as the ticket (a malformed one).
        #[arg(long)]
        raw_ticket: Option<String>,
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
    },
    /// Issues a certificate from DIR/ca.pem + ca.key whose notAfter is SECS from now.
    Issue {
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        role: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        expires_in: u32,
    },
}

fn print(v: Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn parse_net(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (ip, len) = s.split_once('/').unwrap_or((s, "32"));
    let ip: Ipv4Addr = ip.parse().map_err(|e| format!("{s}: {e}"))?;
    let len: u8 = len.parse().map_err(|e| format!("{s}: {e}"))?;
    if len > 32 {
        return Err(format!("{s}: prefix longer than 32"));
    }
    Ok((ip, len))
}

fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err(format!("--raw-ticket {s}: an odd number of hex digits"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
                .ok_or_else(|| format!("--raw-ticket {s}: not hex"))
        })
        .collect()
}

fn issue(ca: &Path, role: &str, name: &str, out: &Path, secs: u32) -> Result<Value, String> {
    let ca = ztna_pki::Ca::load(ca).map_err(|e| e.to_string())?;
    let now = time::OffsetDateTime::now_utc();
    let mut req = ztna_pki::IssueRequest::new(role, name);
    req.validity = ztna_pki::Validity {
        not_before: now - time::Duration::minutes(5),
        not_after: now + time::Duration::seconds(i64::from(secs)),
    };
    let issued = ca.issue(&req).map_err(|e| e.to_string())?;
    let (cert, key) = issued.write(out, name, true).map_err(|e| e.to_string())?;
    Ok(json!({
        "mode": "issue",
        "cert": cert,
        "key": key,
        "spiffe_id": issued.spiffe_id,
        "not_after": issued.not_after.unix_timestamp(),
    }))
}

async fn run(cmd: Cmd) -> Result<Value, String> {
    let secs = Duration::from_secs_f64;
    match cmd {
        Cmd::Exhaust {
            tls,
            server,
            service,
            conns,
            flows,
            half_close,
            hold,
            open_timeout,
        } => {
            let o = attacks::Exhaust {
                server,
                service,
                conns,
                flows,
                half_close,
                hold_secs: hold,
                open_timeout: secs(open_timeout.clamp(0.1, 60.0)),
            };
            attacks::exhaust(&tls.creds()?, &o).await
        }
        Cmd::FloodWrite {
            tls,
            server,
            service,
            flows,
            conns,
            secs,
        } => {
            let o = attacks::FloodWrite {
                server,
                service,
                conns,
                flows,
                secs,
            };
            attacks::flood_write(&tls.creds()?, &o).await
        }
        Cmd::Names {
            tls,
            server,
            kind,
            name_len,
            rate,
            secs,
            reconnects_per_sec,
        } => {
            let o = attacks::Names {
                server,
                kind: match kind {
                    Kind::Flow => NameKind::Flow,
                    Kind::Register => NameKind::Register,
                },
                name_len,
                rate,
                secs,
                reconnects_per_sec,
            };
            attacks::names(&tls.creds()?, &o).await
        }
        Cmd::Initials {
            tls,
            target,
            sources,
            rate,
            secs: s,
            probe_every,
        } => {
            let (source_net, source_prefix) = parse_net(&sources)?;
            let o = initials::Initials {
                target,
                source_net,
                source_prefix,
                rate,
                secs: s,
                probe_every: (probe_every > 0.0).then(|| secs(probe_every.max(0.05))),
            };
            initials::initials(&tls.creds()?, &o, &print).await
        }
        Cmd::Hold {
            tls,
            server,
            service,
            secs: s,
            interval,
            new_flow_every,
        } => {
            let o = attacks::Hold {
                server,
                service,
                secs: s,
                interval: secs(interval.clamp(0.01, 60.0)),
                new_flow_every: secs(new_flow_every.clamp(0.1, 60.0)),
            };
            attacks::hold(&tls.creds()?, &o, &print).await
        }
        Cmd::Victim {
            target,
            secs: s,
            count,
            interval,
            timeout,
        } => {
            let o = local::Victim {
                target,
                interval: secs(interval.clamp(0.001, 60.0)),
                secs: s,
                count,
                timeout: secs(timeout.clamp(0.1, 60.0)),
            };
            local::victim(&o).await
        }
        Cmd::Serve {
            echo,
            sink,
            source,
            source_bytes,
            count,
            udp_echo,
            secs,
        } => {
            let o = local::Serve {
                echo,
                sink,
                source,
                source_bytes,
                count,
                udp_echo,
                secs,
            };
            local::serve(&o, Arc::new(print)).await?;
            Ok(json!({"mode": "serve", "ended": unix_now()}))
        }
        Cmd::Upload {
            target,
            bytes,
            rate,
            secs,
        } => {
            local::upload(&local::Upload {
                target,
                bytes,
                mib_per_sec: rate,
                secs,
            })
            .await
        }
        Cmd::Download { target, rate, secs } => {
            local::download(&local::Download {
                target,
                mib_per_sec: rate,
                secs,
            })
            .await
        }
        Cmd::UdpFlows {
            target,
            count,
            rate,
            hold,
        } => {
            let o = local::UdpFlows {
                target,
                count,
                rate,
                hold_secs: hold,
            };
            local::udp_flows(&o, &print).await
        }
        Cmd::Issue {
            ca,
            role,
            name,
            out,
            expires_in,
        } => issue(&ca, &role, &name, &out, expires_in),
        Cmd::Ticket {
            tls,
            server,
            service,
            connector,
            signer_cert,
            signer_key,
            signer_ca,
            for_agent,
            for_services,
            lifetime_ms,
            raw_ticket,
            timeout,
        } => {
            let signer = match (signer_cert, signer_key) {
                (Some(cert), Some(key)) => Some(TlsConfig {
                    ca: signer_ca.unwrap_or_else(|| tls.ca.clone()),
                    cert,
                    key,
                }),
                _ => None,
            };
            let raw_ticket = raw_ticket.map(|h| parse_hex(&h)).transpose()?;
            let o = direct::TicketProbe {
                server,
                agent: TlsConfig {
                    ca: tls.ca,
                    cert: tls.cert,
                    key: tls.key,
                },
                service,
                connector,
                signer,
                for_agent,
                for_services,
                lifetime_ms,
                raw_ticket,
                limit: secs(timeout.clamp(0.1, 60.0)),
            };
            direct::ticket_probe(&o).await
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ztna-hostile: runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // SIGTERM/SIGINT end the attack early the way its deadline would: connections are closed.
    rt.spawn(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        ztna_integration::hostile::stop_token().cancel();
    });
    match rt.block_on(run(cli.cmd)) {
        Ok(mut summary) => {
            summary["summary"] = true.into();
            print(summary);
            ExitCode::SUCCESS
        }
        Err(e) => {
            print(json!({"summary": true, "error": e}));
            eprintln!("ztna-hostile: {e}");
            ExitCode::from(1)
        }
    }
}
