//! Issue 12 in-process: the hostile client's attacks (`ztna_integration::hostile`) against the
//! daemons' library entry points, with the victim measured alongside. The same attacks run
//! against real processes, with RSS and log volume, in `tests/system/hostile.py`.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use ztna_integration::hostile::{attacks, local, unix_now, Creds, NameKind};
use ztna_integration::*;
use ztna_proto::{codes, Role, ServiceState};

fn creds(tls: ztna_node::config::TlsConfig, role: Role) -> Creds {
    Creds { tls, role }
}

/// A backend that accepts and never reads, writes or closes (holds up to 10,000 connections).
async fn sink() -> SocketAddr {
    let l = TcpListener::bind(loopback0()).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            if held.len() < 10_000 {
                held.push(s);
            }
        }
    });
    addr
}

fn victim(port: SocketAddr, secs: f64) -> local::Victim {
    local::Victim {
        target: port,
        interval: Duration::from_millis(100),
        secs,
        count: None,
        timeout: Duration::from_secs(3),
    }
}

fn gauge(text: &str, name: &str) -> f64 {
    metric(text, name, &[])
}

/// Item 1: one agent identity opening many connections with many idle, half-closed flows towards
/// a backend that never answers gets no more than its limits, a victim on another service of the
/// same connector keeps working, and everything is freed when the attacker leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_cannot_exhaust_the_relay_across_connections() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let dead_end = sink().await;
    let mut cfg = intermediate_config(&pki, loopback0(), open_policy(&["web", "other"]));
    cfg.max_flows_per_agent = 60;
    cfg.max_connections_per_identity = 3;
    let im = start_intermediate_with(cfg);
    let mut c = start_connector(
        &pki,
        "web-1",
        &[im.addr],
        &[("web", Some(dead_end), None), ("other", Some(echo), None)],
    );
    c.wait_registered(1).await;
    let mut a = start_agent(
        &pki,
        "alice",
        &[im.addr],
        &[("other", ForwardProtocol::Tcp)],
    )
    .await;
    a.wait_status("other", ServiceState::Available).await;

    let attacker = creds(pki.issue("agent", "mallory"), Role::Agent);
    let o = attacks::Exhaust {
        server: im.addr,
        service: "web".into(),
        conns: 6,
        flows: 40,
        half_close: true,
        hold_secs: 3.0,
        open_timeout: Duration::from_secs(3),
    };
    let v = victim(a.port("other", ztna_proto::Protocol::Tcp), 4.0);
    let (attack, during) = tokio::join!(attacks::exhaust(&attacker, &o), local::victim(&v));
    let (attack, during) = (attack.unwrap(), during.unwrap());
    let freed = eventually(Duration::from_secs(5), || {
        gauge(
            &im.daemon.metrics.common.render(),
            "ztna_intermediate_flows_active",
        ) == 0.0
            && gauge(
                &c.daemon.metrics.common.render(),
                "ztna_connector_flows_active",
            ) == 0.0
    })
    .await;
    let after = local::victim(&local::Victim {
        count: Some(20),
        ..victim(a.port("other", ztna_proto::Protocol::Tcp), 0.0)
    })
    .await
    .unwrap();
    println!("MEASURED exhaust: attacker {attack}; victim during {during}; after {after}");
    assert!(attack["connections_ok"].as_u64().unwrap() <= 3, "{attack}");
    assert_eq!(attack["flows_accepted"], 60, "{attack}");
    assert!(during["success_pct"].as_f64().unwrap() >= 99.0, "{during}");
    assert_eq!(after["ok"], 20, "{after}");
    assert!(freed, "flows still held after the attacker left");
}

/// Item 6: service names past the protocol's cap are refused when the frame is decoded, and the
/// connection is closed with a protocol violation that names the field; the victim is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_names_are_refused_at_decode() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let mut c = start_connector(&pki, "web-1", &[im.addr], &[("web", Some(echo), None)]);
    c.wait_registered(1).await;
    let mut a = start_agent(&pki, "alice", &[im.addr], &[("web", ForwardProtocol::Tcp)]).await;
    a.wait_status("web", ServiceState::Available).await;
    let v = victim(a.port("web", ztna_proto::Protocol::Tcp), 2.5);
    for (kind, cert) in [
        (
            NameKind::Flow,
            creds(pki.issue("agent", "mallory"), Role::Agent),
        ),
        (
            NameKind::Register,
            creds(pki.issue("connector", "rogue"), Role::Connector),
        ),
    ] {
        let o = attacks::Names {
            server: im.addr,
            kind,
            name_len: 65_000,
            rate: 200.0,
            secs: 2.0,
            reconnects_per_sec: 10.0,
        };
        let (r, during) = tokio::join!(attacks::names(&cert, &o), local::victim(&v));
        let (r, during) = (r.unwrap(), during.unwrap());
        println!("MEASURED names {kind:?}: {r}; victim {during}");
        let closes = r["closed_by_peer"].as_object().unwrap();
        assert!(
            !closes.is_empty()
                && closes
                    .keys()
                    .all(|k| k.contains("protocol violation") && k.contains("128-byte limit")),
            "{r}"
        );
        assert!(
            r["replies"]
                .as_object()
                .unwrap()
                .keys()
                .all(|k| !k.starts_with("rejected") && k != "registered"),
            "a long name reached policy: {r}"
        );
        assert!(during["success_pct"].as_f64().unwrap() >= 99.0, "{during}");
    }
    let text = im.daemon.metrics.common.render();
    assert_eq!(
        metric(
            &text,
            "ztna_intermediate_flows_total",
            &[("result", "denied")]
        ),
        0.0,
        "oversized opens were evaluated as flows"
    );
}

/// What `hold` reported as the end of the connection: (Unix time, close code).
fn conn_end(r: &serde_json::Value) -> Option<(f64, Option<u64>)> {
    let e = &r["connection_end"];
    Some((e["t"].as_f64()?, e["code"].as_u64()))
}

fn hold(server: SocketAddr, secs: f64) -> attacks::Hold {
    attacks::Hold {
        server,
        service: "web".into(),
        secs,
        interval: Duration::from_millis(100),
        new_flow_every: Duration::from_millis(300),
    }
}

/// Item 3: a certificate that expires during the connection is cut at its notAfter (with the
/// REVOKED code and a metric); no flow opens after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_certificate_is_cut_at_not_after() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let mut c = start_connector(&pki, "web-1", &[im.addr], &[("web", Some(echo), None)]);
    c.wait_registered(1).await;
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    let mut req = ztna_pki::IssueRequest::new("agent", "short-lived");
    req.validity = ztna_pki::Validity {
        not_before: now - time::Duration::minutes(5),
        not_after: now + time::Duration::seconds(4),
    };
    let issued = pki.ca.issue(&req).unwrap();
    let not_after = issued.not_after.unix_timestamp() as f64;
    let tls = pki.tls_for(&issued, "short-lived");
    let r = attacks::hold(&creds(tls, Role::Agent), &hold(im.addr, 10.0), &|_| {})
        .await
        .unwrap();
    println!("MEASURED expiry (notAfter {not_after}): {r}");
    let (at, code) = conn_end(&r).expect("connection not closed");
    assert!(
        (-1.0..=2.0).contains(&(at - not_after)),
        "closed {:.2} s after notAfter",
        at - not_after
    );
    assert_eq!(code, Some(u64::from(codes::REVOKED)), "{r}");
    if let Some(last) = r["last_new_flow_accepted"].as_f64() {
        assert!(last <= not_after + 0.5, "a flow opened after notAfter: {r}");
    }
    let text = im.daemon.metrics.common.render();
    assert_eq!(
        metric(
            &text,
            "ztna_intermediate_revocations_total",
            &[("reason", "certificate_expired")]
        ),
        1.0,
        "{text}"
    );
}

/// Item 3: a reload that removes an agent from the policy ends its open flow with REVOKED and
/// denies new ones; a reload to a new CA disconnects peers authenticated under the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_revoke_open_flows_and_old_ca_peers() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let rule = |agents: &[&str]| PolicyRule {
        service: "web".into(),
        connectors: vec![format!("spiffe://{TD}/connector/*")],
        agents: agents.iter().map(|a| Pki::id("agent", a)).collect(),
    };
    let base = intermediate_config(&pki, loopback0(), vec![rule(&["alice", "bob", "carol"])]);
    let im = ztna_intermediate::Intermediate::bind(base.clone()).expect("bind");
    let (addr, handle) = (im.local_addr().unwrap(), im.handle());
    let stop = ztna_node::CancellationToken::new();
    let task = tokio::spawn(im.run(stop.clone()));
    let mut c = start_connector(&pki, "web-1", &[addr], &[("web", Some(echo), None)]);
    c.wait_registered(1).await;

    // Policy: bob is removed while his flow runs.
    let bob = creds(pki.issue("agent", "bob"), Role::Agent);
    let held = tokio::spawn(async move { attacks::hold(&bob, &hold(addr, 4.0), &|_| {}).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut cfg = base.clone();
    cfg.policy = vec![rule(&["alice", "carol"])];
    let t_reload = unix_now();
    handle.reload(cfg).expect("reload");
    let r = held.await.unwrap().unwrap();
    println!("MEASURED policy reload at {t_reload}: {r}");
    let end = &r["flow_end"];
    let ended = end["t"].as_f64().expect("bob's flow was not ended");
    assert!(
        ended - t_reload <= 2.0,
        "ended {:.2} s after",
        ended - t_reload
    );
    assert_eq!(end["code"], u64::from(codes::REVOKED), "{r}");
    if let Some(last) = r["last_new_flow_accepted"].as_f64() {
        assert!(last <= t_reload, "bob opened a flow after the reload: {r}");
    }

    // CA: the relay moves to a new deployment CA; carol's connection (old CA) is closed.
    let carol = creds(pki.issue("agent", "carol"), Role::Agent);
    let held = tokio::spawn(async move { attacks::hold(&carol, &hold(addr, 6.0), &|_| {}).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let other = Pki::new();
    let mut cfg = base.clone();
    cfg.tls = other.issue("intermediate", "relay");
    let t_reload = unix_now();
    handle.reload(cfg).expect("reload");
    let r = held.await.unwrap().unwrap();
    println!("MEASURED CA reload at {t_reload}: {r}");
    let (at, code) = conn_end(&r).expect("carol still connected after the CA changed");
    assert!(at - t_reload <= 2.0, "closed {:.2} s after", at - t_reload);
    assert_eq!(code, Some(u64::from(codes::REVOKED)), "{r}");
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
}

/// Item 5: a connector whose backend is dead, next to a healthy one: flows go through the
/// healthy one (retried and demoted), not to the one that always refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_with_a_dead_backend_is_failed_over() {
    logs();
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let dead = free_tcp_port();
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let mut broken = start_connector(&pki, "web-1", &[im.addr], &[("web", Some(dead), None)]);
    let mut good = start_connector(&pki, "web-2", &[im.addr], &[("web", Some(echo), None)]);
    broken.wait_registered(1).await;
    good.wait_registered(1).await;
    let mut a = start_agent(&pki, "alice", &[im.addr], &[("web", ForwardProtocol::Tcp)]).await;
    a.wait_status("web", ServiceState::Available).await;
    let v = local::victim(&local::Victim {
        count: Some(50),
        interval: Duration::from_millis(20),
        ..victim(a.port("web", ztna_proto::Protocol::Tcp), 0.0)
    })
    .await
    .unwrap();
    println!("MEASURED failover: {v}");
    assert!(v["ok"].as_u64().unwrap() >= 49, "{v}");
}
