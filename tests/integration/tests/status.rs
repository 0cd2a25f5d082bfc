//! `ztna-<role> status`, run as an operator runs it (the real command lines, via the
//! `ztna-daemon` test binary), against running daemons: what it prints, its `--json`, and its
//! exit codes (0 ready, 1 not ready, 2 cannot be reached).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztna_integration::*;
use ztna_proto::ServiceState;

const BIN: &str = env!("CARGO_BIN_EXE_ztna-daemon");

/// Runs `ztna-daemon ROLE ARGS...`; returns (exit code, stdout, stderr).
async fn status(role: &str, args: &[&str]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg(role)
        .args(args)
        .env_remove("ZTNA_CONFIG")
        .env_remove("ZTNA_OPS_LISTEN");
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run ztna-daemon"))
        .await
        .expect("join");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn status_json(role: &str, ops: SocketAddr) -> Value {
    let (code, out, err) = status(role, &["status", "--json", "--ops", &ops.to_string()]).await;
    assert!(code == 0 || code == 1, "exit {code}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("--json is not JSON ({e}): {out}"))
}

fn find<'a>(list: &'a Value, key: &str, name: &str) -> &'a Value {
    list.as_array()
        .and_then(|l| l.iter().find(|x| x[key] == name))
        .unwrap_or_else(|| panic!("no {key} = {name} in {list}"))
}

/// An agent with one working relay and one that is not there, a service with a connector and
/// one without: `status` names both relays and both services with the states a user would see,
/// `--json` carries the same, and once the agent is stopped `status` says it cannot reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_status_lists_relays_services_and_exit_codes() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["web", "dns"]));
    let mut c = start_connector(&pki, "web-1", &[im.addr], &[("web", Some(echo), None)]);
    c.wait_registered(1).await;
    let dead = free_udp_port();
    let (web, dns, ops) = (free_tcp_port(), free_udp_port(), free_tcp_port());
    let cfg = agent_file(
        &pki,
        "alice",
        &[im.addr, dead],
        &[("web", "tcp", web), ("dns", "udp", dns)],
        &format!("ops_listen = \"{ops}\""),
    );
    let mut agent = Proc::spawn(BIN, "agent", "agent", &cfg, &[]);
    assert!(
        wait_ready(ops, Duration::from_secs(10)).await,
        "{}",
        agent.tail(20)
    );
    // One flow held open.
    let mut held = {
        let mut tries = 0;
        loop {
            match tokio::net::TcpStream::connect(web).await {
                Ok(mut s) => {
                    s.write_all(b"ping").await.unwrap();
                    let mut buf = [0u8; 4];
                    if s.read_exact(&mut buf).await.is_ok() {
                        break s;
                    }
                }
                Err(e) if tries > 50 => panic!("web forward: {e}"),
                Err(_) => {}
            }
            tries += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };

    let cfg_s = cfg.to_str().unwrap();
    let (code, out, err) = status("agent", &["--config", cfg_s, "status"]).await;
    assert_eq!(code, 0, "ready agent: exit {code}\n{out}{err}");
    println!("$ ztna-agent --config agent.toml status\n{out}");
    let (relay, dead_s) = (im.addr.to_string(), dead.to_string());
    let line = |start: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(start))
            .unwrap_or_else(|| panic!("no line starting {start:?} in\n{out}"))
            .to_string()
    };
    assert!(
        out.starts_with("spiffe://test.example/agent/alice  (agent "),
        "{out}"
    );
    assert!(
        out.contains("  ready: connected to 1/2 intermediates"),
        "{out}"
    );
    assert!(
        out.contains("certificate valid until ") && out.contains("days left)"),
        "{out}"
    );
    let a = line(&relay);
    assert!(
        a.contains(" connected ") && a.contains(" rtt ") && a.ends_with(" ms"),
        "{a}"
    );
    let b = line(&dead_s);
    assert!(b.contains(" connecting") || b.contains(" down "), "{b}");
    let w = line(&format!("web  tcp  {web}"));
    assert!(
        w.contains(" available ")
            && w.contains(&format!("via {relay} (relay)"))
            && w.ends_with("1 flow"),
        "{w}"
    );
    let d = line(&format!("dns  udp  {dns}"));
    assert!(
        d.contains(" unavailable ") && d.contains("no connector is serving dns"),
        "{d}"
    );
    assert!(
        out.contains("flows: 1 active (tcp 1, udp 0, opening 0)"),
        "{out}"
    );

    // --json: the same, for scripts; the subcommand after the flag works too.
    let (code, out, err) = status("agent", &["status", "--json", "--config", cfg_s]).await;
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(v["role"], "agent");
    assert_eq!(v["identity"], "spiffe://test.example/agent/alice");
    assert_eq!(v["version"], ztna_node::VERSION);
    assert_eq!(v["ready"], true);
    assert_eq!(v["draining"], false);
    assert_eq!(v["pid"], agent.pid());
    let days = v["certificate"]["days_left"].as_i64().expect("days_left");
    assert!(
        (364..=365).contains(&days),
        "the test certificate is issued for 365 days: {v}"
    );
    assert!(v["certificate"]["not_after"]
        .as_str()
        .is_some_and(|s| s.ends_with('Z')));
    let r = find(&v["intermediates"], "target", &relay);
    assert_eq!(r["state"], "connected");
    assert!(r["rtt_ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{r}");
    assert_eq!(r["address"], relay);
    assert_eq!(r["services"]["web"], "available");
    assert_eq!(r["services"]["dns"], "unavailable");
    let r = find(&v["intermediates"], "target", &dead_s);
    assert!(r["state"] == "connecting" || r["state"] == "down", "{r}");
    let s = find(&v["services"], "service", "web");
    assert_eq!(s["state"], "available");
    assert_eq!(s["relay"], relay);
    assert_eq!(s["path"], "relay");
    assert_eq!(s["listen"], web.to_string());
    assert_eq!(s["active_flows"], 1);
    let s = find(&v["services"], "service", "dns");
    assert_eq!(s["state"], "unavailable");
    assert_eq!(s["relay"], Value::Null);
    assert_eq!(v["flows"]["active"], 1);
    // The dead relay turns `down` with the reason once its attempt times out.
    let mut down = Value::Null;
    for _ in 0..100 {
        let v = status_json("agent", ops).await;
        let r = find(&v["intermediates"], "target", &dead_s).clone();
        if r["state"] == "down" {
            down = r;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        down["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{down}"
    );

    // Stopped: exit 2, naming the address it tried.
    held.shutdown().await.ok();
    drop(held);
    agent.signal("TERM");
    assert_eq!(agent.wait_exit(Duration::from_secs(15)).await, Some(0));
    let (code, out, err) = status("agent", &["--config", cfg_s, "status"]).await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains(&format!("cannot reach the ops endpoint at {ops}")),
        "{err}"
    );
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}

/// An agent with no relay it can reach answers but is not ready: exit 1, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_a_daemon_that_is_not_ready_exits_1() {
    logs();
    let pki = Pki::new();
    let a = start_agent(
        &pki,
        "alice",
        &[free_udp_port()],
        &[("web", ForwardProtocol::Tcp)],
    )
    .await;
    let (code, out, err) = status("agent", &["status", "--ops", &a.ops.to_string()]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("  NOT READY: connecting"), "{out}");
    assert!(
        out.contains("  web  tcp  ") && out.contains("waiting for an intermediate"),
        "{out}"
    );
    // Asking the agent's endpoint as if it were a connector's is refused, saying why.
    let (code, _, err) = status("connector", &["status", "--ops", &a.ops.to_string()]).await;
    assert_eq!(code, 2);
    assert!(
        err.contains(&format!(
            "{} is the ops endpoint of an agent, not of a connector (try ztna-agent status",
            a.ops
        )),
        "{err}"
    );
    a.daemon.shutdown().await;
}

/// Connector and intermediate: registrations (including one the policy rejects, with its
/// reason), flows, peers, connectors per service and limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_and_intermediate_status() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["web", "dns"]));
    let mut c = start_connector(
        &pki,
        "web-1",
        &[im.addr],
        &[("web", Some(echo), None), ("secret", Some(echo), None)],
    );
    c.wait_registered(1).await;
    let mut a = start_agent(&pki, "alice", &[im.addr], &[("web", ForwardProtocol::Tcp)]).await;
    a.wait_status("web", ServiceState::Available).await;
    assert!(
        eventually(Duration::from_secs(5), || {
            c.registered.borrow().first().is_some_and(|r| {
                r.len() == 2
                    && !r
                        .values()
                        .any(|s| *s == ztna_connector::Registration::Pending)
            })
        })
        .await
    );

    let (code, out, err) = status("connector", &["status", "--ops", &c.ops.to_string()]).await;
    assert_eq!(code, 0, "{out}{err}");
    println!("$ ztna-connector status\n{out}");
    let relay = im.addr.to_string();
    assert!(
        out.starts_with("spiffe://test.example/connector/web-1  (connector "),
        "{out}"
    );
    let row = out
        .lines()
        .find(|l| l.trim_start().starts_with(&relay))
        .unwrap_or_else(|| panic!("no row for {relay} in\n{out}"));
    assert!(
        row.contains(" registered ")
            && row.contains("secret rejected (policy does not allow")
            && row.contains("web registered"),
        "{row}"
    );
    assert!(
        out.contains(&format!("tcp {echo}")) && out.contains("registered on 1/1"),
        "{out}"
    );
    let v = status_json("connector", c.ops).await;
    assert_eq!(v["role"], "connector");
    assert_eq!(v["ready"], true);
    let r = &v["intermediates"][0];
    assert_eq!(r["target"], relay);
    assert_eq!(r["state"], "registered");
    assert_eq!(r["services"]["web"]["state"], "registered");
    assert_eq!(r["services"]["secret"]["state"], "rejected");
    assert!(r["services"]["secret"]["reason"]
        .as_str()
        .is_some_and(|s| s.contains("secret")));
    let web = find(&v["services"], "service", "web");
    assert_eq!(web["tcp"], echo.to_string());
    assert_eq!(web["registered_on"], 1);
    assert!(
        v["flows"]["capacity"].as_u64().is_some_and(|n| n > 0),
        "{v}"
    );
    assert_eq!(v["flows"]["saturated"], false);

    // One flow held through the relay shows up on both.
    let mut held = tokio::net::TcpStream::connect(a.port("web", ztna_proto::Protocol::Tcp))
        .await
        .unwrap();
    held.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    held.read_exact(&mut buf).await.unwrap();
    let v = status_json("connector", c.ops).await;
    assert_eq!(
        find(&v["services"], "service", "web")["active_flows"]["tcp"],
        1
    );
    assert_eq!(v["flows"]["active"], 1);

    let (code, out, err) = status("intermediate", &["status", "--ops", &im.ops.to_string()]).await;
    assert_eq!(code, 0, "{out}{err}");
    println!("$ ztna-intermediate status\n{out}");
    for want in [
        "peers: 1 agent, 1 connector",
        "  dns  no connector  0 flows",
        "  web  1 connector   1 flow",
        "flows: 1 active (tcp 1, udp 0)",
        "  max_flows ",
        "refused at a limit            none",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    let v = status_json("intermediate", im.ops).await;
    assert_eq!(v["role"], "intermediate");
    assert_eq!(v["identity"], "spiffe://test.example/intermediate/relay");
    assert_eq!(v["listen"], im.addr.to_string());
    assert_eq!(v["connections"]["agents"], 1);
    assert_eq!(v["connections"]["connectors"], 1);
    assert_eq!(find(&v["services"], "service", "web")["connectors"], 1);
    assert_eq!(find(&v["services"], "service", "dns")["connectors"], 0);
    assert_eq!(v["flows"]["tcp"], 1);
    assert_eq!(v["limits"]["flows"], 1);
    assert_eq!(v["limits"]["max_flows"], 100_000);
    assert_eq!(v["limits"]["saturated"], false);
    drop(held);
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}
