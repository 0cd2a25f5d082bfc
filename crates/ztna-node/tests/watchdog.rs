//! The systemd notify protocol on a real NOTIFY_SOCKET: READY, STATUS, STOPPING, WATCHDOG at half
//! of WATCHDOG_USEC, and no WATCHDOG while the liveness probe fails. (Own test binary, so setting
//! the environment here affects nothing else.)

use std::time::{Duration, Instant};

use tokio::net::UnixDatagram;
use ztna_node::health::Health;
use ztna_node::CancellationToken;

async fn collect(sock: &UnixDatagram, for_: Duration) -> Vec<String> {
    let mut out = Vec::new();
    let end = Instant::now() + for_;
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(
        end.saturating_duration_since(Instant::now()),
        sock.recv(&mut buf),
    )
    .await
    {
        out.extend(
            String::from_utf8_lossy(&buf[..n])
                .lines()
                .map(str::to_string),
        );
    }
    out
}

fn count(msgs: &[String], what: &str) -> usize {
    msgs.iter().filter(|m| *m == what).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_protocol_and_watchdog_follow_liveness() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    std::env::set_var("NOTIFY_SOCKET", &path);
    std::env::set_var("WATCHDOG_USEC", "400000"); // ping every 200 ms
    std::env::remove_var("WATCHDOG_PID");

    let health = Health::new(Duration::from_millis(600));
    health.spawn_heartbeat();
    let beat = health.register("main loop");
    health.set_status("starting up");
    let stop = CancellationToken::new();
    let task = tokio::spawn(health.clone().notify_systemd(stop.clone()));

    // READY first (with the status), then WATCHDOG every ~200 ms while the loop beats.
    let msgs = {
        let pump = async {
            loop {
                beat.beat();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            m = collect(&sock, Duration::from_millis(2000)) => m,
            _ = pump => unreachable!(),
        }
    };
    assert_eq!(
        msgs.first().map(String::as_str),
        Some("READY=1"),
        "{msgs:?}"
    );
    assert!(msgs.iter().any(|m| m == "STATUS=starting up"), "{msgs:?}");
    let pings = count(&msgs, "WATCHDOG=1");
    assert!(
        (7..=12).contains(&pings),
        "expected ~10 WATCHDOG=1 in 2 s at 200 ms, got {pings}: {msgs:?}"
    );

    // The loop stops making progress: after the stall threshold, no more WATCHDOG.
    health.set_status("serving 3 flows");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let _ = collect(&sock, Duration::from_millis(10)).await; // drop what queued before the stall
    let stalled = collect(&sock, Duration::from_millis(1500)).await;
    assert_eq!(
        count(&stalled, "WATCHDOG=1"),
        0,
        "WATCHDOG sent while the liveness probe fails: {stalled:?}"
    );
    assert!(health.live().unwrap_err().contains("main loop"));

    // Progress again: pinging resumes. Then a drain announces STOPPING.
    beat.beat();
    let resumed = collect(&sock, Duration::from_millis(500)).await;
    assert!(count(&resumed, "WATCHDOG=1") >= 1, "{resumed:?}");
    health.set_stopping();
    let last = collect(&sock, Duration::from_millis(300)).await;
    assert!(last.iter().any(|m| m == "STOPPING=1"), "{last:?}");
    stop.cancel();
    task.await.unwrap();
}
