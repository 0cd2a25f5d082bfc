//! ztna-demo: the whole ZTNA system on loopback in one process.
//!
//! Generates a throwaway PKI, starts an intermediate, a connector with built-in backends (TCP
//! echo, a tiny HTTP server, UDP echo) and an agent, prints what to try, and stops cleanly on
//! Ctrl-C. Everything goes through the same library entry points as the real daemons.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use ztna_node::CancellationToken;
use ztna_pki::{Ca, IssueRequest, Validity};

/// Runs intermediate, connector and agent on loopback with a throwaway PKI.
#[derive(Parser)]
#[command(name = "ztna-demo", version)]
struct Cli {
    /// First local port of the agent's forwards (web = PORT, echo = PORT+1, udp echo = PORT+2).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Run for this many seconds and exit (default: until Ctrl-C).
    #[arg(long)]
    seconds: Option<u64>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    ztna_node::logging::init();
    let dir = tempfile::tempdir().context("creating a temporary directory for the demo PKI")?;
    let ca = Ca::generate("demo.ztna", Validity::days(1))?;
    let (ca_path, _) = ca.write(dir.path(), false)?;
    let tls = |role: &str, name: &str| -> Result<String> {
        let issued = ca.issue(&IssueRequest::new(role, name))?;
        let (cert, key) = issued.write(dir.path(), name, false)?;
        Ok(format!(
            "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            ca_path, cert, key
        ))
    };

    // Built-in backends.
    let http = spawn_http().await?;
    let echo = spawn_tcp_echo().await?;
    let udp = spawn_udp_echo().await?;

    let stop = CancellationToken::new();
    let im_cfg: ztna_intermediate::Config = toml::from_str(&format!(
        "listen = \"127.0.0.1:0\"\nops_listen = \"127.0.0.1:0\"\ndrain_timeout = \"2s\"\n{}\n\
         [[policy]]\nservice = \"web\"\nconnectors = [\"spiffe://demo.ztna/connector/*\"]\nagents = [\"spiffe://demo.ztna/agent/*\"]\n\
         [[policy]]\nservice = \"echo\"\nconnectors = [\"spiffe://demo.ztna/connector/*\"]\nagents = [\"spiffe://demo.ztna/agent/*\"]\n",
        tls("intermediate", "relay")?
    ))?;
    let im = ztna_intermediate::Intermediate::bind(im_cfg)?;
    let relay = im.local_addr()?;
    let im_ops = im.ops_addr()?;
    let im_task = tokio::spawn(im.run(stop.clone()));

    let c_cfg: ztna_connector::Config = toml::from_str(&format!(
        "intermediates = [\"{relay}\"]\nops_listen = \"127.0.0.1:0\"\ndrain_timeout = \"2s\"\n{}\n\
         [[service]]\nname = \"web\"\ntcp = \"{http}\"\n\
         [[service]]\nname = \"echo\"\ntcp = \"{echo}\"\nudp = \"{udp}\"\n",
        tls("connector", "demo-connector")?
    ))?;
    let c = ztna_connector::Connector::bind(c_cfg)?;
    let mut registered = c.registrations();
    let c_ops = c.ops_addr()?;
    let c_task = tokio::spawn(c.run(stop.clone()));

    let p = cli.port;
    let a_cfg: ztna_agent::Config = toml::from_str(&format!(
        "intermediates = [\"{relay}\"]\nops_listen = \"127.0.0.1:0\"\n{}\n\
         [[forward]]\nservice = \"web\"\nprotocol = \"tcp\"\nlisten = \"127.0.0.1:{p}\"\n\
         [[forward]]\nservice = \"echo\"\nprotocol = \"tcp\"\nlisten = \"127.0.0.1:{}\"\n\
         [[forward]]\nservice = \"echo\"\nprotocol = \"udp\"\nlisten = \"127.0.0.1:{}\"\n",
        tls("agent", "demo-user")?,
        p + 1,
        p + 2
    ))?;
    let agent = ztna_agent::Agent::bind(a_cfg).await.with_context(|| {
        format!(
            "binding the agent's local ports {p}..{} (try --port)",
            p + 2
        )
    })?;
    let a_ops = agent.ops_addr()?;
    let a_task = tokio::spawn(agent.run(stop.clone()));

    tokio::time::timeout(
        Duration::from_secs(10),
        registered.wait_for(|v| {
            v.iter().any(|r| {
                r.values()
                    .any(|s| *s == ztna_connector::Registration::Registered)
            })
        }),
    )
    .await
    .context("the connector did not register within 10 s")??;

    println!();
    println!(
        "ZTNA demo running: agent -> intermediate ({relay}) -> connector -> built-in backends"
    );
    println!("  PKI (throwaway): {}", dir.path().display());
    println!();
    println!("Try:");
    println!("  curl http://127.0.0.1:{p}/                       # HTTP backend, via the relay");
    println!(
        "  echo hello | nc -q1 127.0.0.1 {}                # TCP echo",
        p + 1
    );
    println!(
        "  echo hello | nc -u -w1 127.0.0.1 {}             # UDP echo",
        p + 2
    );
    println!();
    println!("Ops endpoints (/metrics, /healthz, /readyz):");
    println!("  intermediate http://{im_ops}/metrics");
    println!("  connector    http://{c_ops}/metrics");
    println!("  agent        http://{a_ops}/readyz");
    println!();
    println!("Ctrl-C stops everything cleanly.");

    match cli.seconds {
        Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
        None => {
            tokio::signal::ctrl_c()
                .await
                .context("waiting for Ctrl-C")?;
        }
    }
    println!("stopping...");
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let _ = a_task.await;
        let _ = c_task.await;
        let _ = im_task.await;
    })
    .await;
    println!("stopped");
    Ok(())
}

async fn spawn_http() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let body = format!("hello from the private web backend, reached through ZTNA (backend saw {peer})\n");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}

async fn spawn_tcp_echo() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

async fn spawn_udp_echo() -> Result<SocketAddr> {
    let s = UdpSocket::bind("127.0.0.1:0").await?;
    let addr = s.local_addr()?;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    Ok(addr)
}
