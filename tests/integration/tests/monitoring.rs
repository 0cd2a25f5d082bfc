//! Live check of the observability assets against what the daemons really export: start the
//! daemons, push traffic, scrape them with a real Prometheus server (loopback only, bounded), and
//! check that every metric the dashboard and the alert rules use exists, that every dashboard
//! query parses and runs, and that every alert rule evaluates without error.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use ztna_integration::*;
use ztna_proto::{Protocol, ServiceState};

fn monitoring_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../nixos/monitoring")
}

/// Every `ztna_*` metric name mentioned in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("ztna_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// GET with a tiny HTTP/1.1 client that understands chunked bodies (Prometheus uses them).
async fn get(addr: SocketAddr, path_and_query: &str) -> serde_json::Value {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect prometheus");
    let req =
        format!("GET {path_and_query} HTTP/1.1\r\nhost: prometheus\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("http response");
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || tail.len() < n {
                break;
            }
            out.push_str(&tail[..n]);
            rest = tail[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        body.to_string()
    };
    serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("bad JSON from {path_and_query}: {e}: {body}"))
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

struct Prom(std::process::Child);
impl Drop for Prom {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_match_what_the_daemons_export() {
    logs();
    let dir = monitoring_dir();
    let dashboard =
        std::fs::read_to_string(dir.join("dashboards/ztna-overview.json")).expect("dashboard");
    let alerts = std::fs::read_to_string(dir.join("alerts.yml")).expect("alerts");
    let dash: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard JSON");

    // promtool on the rules and their unit tests (also run by .ci/run directly).
    match std::process::Command::new("promtool")
        .arg("test")
        .arg("rules")
        .arg(dir.join("alerts.test.yml"))
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "promtool test rules failed:\n{}",
            String::from_utf8_lossy(&out.stdout)
        ),
        Err(_) => eprintln!(
            "SKIP promtool test rules: promtool not installed (Debian package `prometheus`)"
        ),
    }
    let Ok(prom_version) = std::process::Command::new("prometheus")
        .arg("--version")
        .output()
    else {
        eprintln!("SKIP live Prometheus check: `prometheus` not installed (Debian package `prometheus`; .ci/run installs it)");
        return;
    };
    assert!(prom_version.status.success());

    // The daemons, with traffic of both protocols.
    let pki = Pki::new();
    let (echo, _e) = tcp_echo().await;
    let (uecho, _s, _u) = udp_echo().await;
    let im = start_intermediate(&pki, open_policy(&["web", "idle"]));
    let mut c = start_connector(
        &pki,
        "web-1",
        &[im.addr],
        &[("web", Some(echo), Some(uecho))],
    );
    c.wait_registered(1).await;
    // The agent uses direct paths (on loopback the punch succeeds), so the P2P panel and the
    // direct-share rules have real data.
    let mut a = start_agent_with(
        pki.issue("agent", "alice"),
        &[im.addr],
        &[("web", ForwardProtocol::Tcp), ("web", ForwardProtocol::Udp)],
        "p2p = true",
    )
    .await;
    a.wait_status("web", ServiceState::Available).await;

    // A real Prometheus, loopback only, scraping every second.
    let tmp = tempfile::tempdir().unwrap();
    let web = free_tcp_port();
    let cfg = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {alerts}\nscrape_configs:\n\
         - job_name: ztna-intermediate\n  static_configs: [{{targets: ['{i}']}}]\n\
         - job_name: ztna-connector\n  static_configs: [{{targets: ['{c}']}}]\n\
         - job_name: ztna-agent\n  static_configs: [{{targets: ['{a}']}}]\n",
        alerts = dir.join("alerts.yml").display(),
        i = im.ops,
        c = c.ops,
        a = a.ops,
    );
    let cfg_path = tmp.path().join("prometheus.yml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let log = std::fs::File::create(tmp.path().join("prometheus.log")).unwrap();
    let child = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", cfg_path.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            tmp.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start prometheus");
    let _prom = Prom(child);

    // Wait (bounded) until all three targets are up and scraped after the traffic.
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(web)).await
        {
            let _ = s.shutdown().await;
            let up = get(
                web,
                &format!(
                    "/api/v1/query?query={}",
                    encode("sum(up{job=~\"ztna-.*\"})")
                ),
            )
            .await;
            let n = up["data"]["result"][0]["value"][1]
                .as_str()
                .unwrap_or("0")
                .parse::<f64>()
                .unwrap_or(0.0);
            if n == 3.0 {
                break;
            }
        }
        assert!(
            Instant::now() < end,
            "Prometheus never scraped all three daemons:\n{}",
            std::fs::read_to_string(tmp.path().join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Traffic of both protocols while Prometheus scrapes: the first flows go via the relay while
    // the direct path comes up, the later ones direct.
    let port = a.port("web", Protocol::Tcp);
    for _ in 0..10 {
        assert_eq!(tcp_roundtrip(port, b"x").await.unwrap(), b"x");
    }
    assert!(
        eventually(Duration::from_secs(10), || metric(
            &a.daemon.metrics.common.render(),
            "ztna_agent_direct_paths",
            &[]
        ) >= 1.0)
        .await,
        "no direct path on loopback"
    );
    for _ in 0..10 {
        assert_eq!(tcp_roundtrip(port, b"x").await.unwrap(), b"x");
    }
    let u = UdpSocket::bind(loopback0()).await.unwrap();
    u.connect(a.port("web", Protocol::Udp)).await.unwrap();
    let mut buf = [0u8; 16];
    for _ in 0..20 {
        u.send(b"u").await.unwrap();
        if tokio::time::timeout(Duration::from_millis(300), u.recv(&mut buf))
            .await
            .is_ok()
        {
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // a few scrapes and rule evaluations

    let names = get(web, "/api/v1/label/__name__/values").await;
    let scraped: BTreeSet<String> = names["data"]
        .as_array()
        .expect("names")
        .iter()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    let used: BTreeSet<String> = metric_names(&dashboard)
        .union(&metric_names(&alerts))
        .cloned()
        .collect();
    let missing: Vec<&String> = used.iter().filter(|n| !scraped.contains(*n)).collect();
    println!("MEASURED monitoring: {} metric names used by dashboard and alerts, {} scraped, missing: {missing:?}", used.len(), scraped.len());
    assert!(
        missing.is_empty(),
        "dashboard/alert metrics not exported by any daemon: {missing:?}"
    );

    // Every dashboard query parses and runs against real data.
    let mut queries = 0;
    for panel in dash["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("expr");
            let q = expr
                .replace("$job", ".*")
                .replace("$instance", ".*")
                .replace("$__rate_interval", "1m");
            let r = get(web, &format!("/api/v1/query?query={}", encode(&q))).await;
            assert_eq!(
                r["status"], "success",
                "panel {:?}: query {q} failed: {r}",
                panel["title"]
            );
            queries += 1;
        }
    }
    // Every alert rule evaluates without error.
    let rules = get(web, "/api/v1/rules").await;
    let mut evaluated = 0;
    for g in rules["data"]["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            assert_eq!(
                r["health"], "ok",
                "rule {} unhealthy: {}",
                r["name"], r["lastError"]
            );
            evaluated += 1;
        }
    }
    assert_eq!(
        evaluated, 13,
        "expected the 11 ZTNA alert rules and 2 recording rules to be loaded"
    );
    // The service with a policy but no connector shows up at 0 — what ZtnaServiceUnavailable needs.
    let idle = get(
        web,
        &format!(
            "/api/v1/query?query={}",
            encode("ztna_intermediate_service_connectors{service=\"idle\"}")
        ),
    )
    .await;
    assert_eq!(idle["data"]["result"][0]["value"][1], "0", "{idle}");
    println!(
        "MEASURED monitoring: {queries} dashboard queries ran, {evaluated} alert rules healthy"
    );

    // The P2P panel and the recorded ratios show the direct flows (they once queried a label
    // value no daemon exports and showed 0 whatever happened).
    let value = |r: &serde_json::Value| {
        r["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
    };
    let panel = |title: &str| {
        dash["panels"]
            .as_array()
            .expect("panels")
            .iter()
            .find(|p| p["title"] == title)
            .unwrap_or_else(|| panic!("no panel {title:?}"))
            .clone()
    };
    let p2p = panel("P2P vs relay");
    let mut shown = Vec::new();
    for t in p2p["targets"].as_array().expect("targets") {
        let q = t["expr"]
            .as_str()
            .expect("expr")
            .replace("$job", ".*")
            .replace("$instance", ".*")
            .replace("$__rate_interval", "1m");
        let r = get(web, &format!("/api/v1/query?query={}", encode(&q))).await;
        shown.push((
            t["legendFormat"].as_str().unwrap_or("").to_string(),
            value(&r),
        ));
    }
    let mut recorded = Vec::new();
    for rule in [
        "ztna:direct_flow_share:ratio_rate15m",
        "ztna:p2p_attempt_success:ratio_rate15m",
    ] {
        let r = get(web, &format!("/api/v1/query?query={}", encode(rule))).await;
        recorded.push((rule, value(&r)));
    }
    println!("MEASURED monitoring: P2P panel {shown:?}, recorded {recorded:?}");
    for (legend, v) in &shown {
        let v = v.unwrap_or(0.0);
        assert!(v > 0.0 && v <= 1.0, "P2P panel shows {legend} = {v}");
    }
    let paths = panel("Direct paths");
    let connections = paths["targets"][0]["expr"].as_str().expect("expr");
    let r = get(web, &format!("/api/v1/query?query={}", encode(connections))).await;
    assert_eq!(
        value(&r),
        Some(1.0),
        "Direct paths panel: {connections}: {r}"
    );
    let share = recorded[0].1.expect("direct share recorded");
    assert!(share > 0.0 && share < 1.0, "direct share {share}");
    assert_eq!(recorded[1].1, Some(1.0), "punch attempts that went direct");
    a.daemon.shutdown().await;
    c.daemon.shutdown().await;
    im.daemon.shutdown().await;
}
