//! The binary as an operator runs it: config errors name key and file, `--check-config`, exit
//! codes, a graceful exit 0 on SIGTERM.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ztna_pki::{Ca, IssueRequest, Validity};

const BIN: &str = env!("CARGO_BIN_EXE_ztna-intermediate");

fn pki(dir: &Path, role: &str) -> String {
    let ca = Ca::generate("cli.example", Validity::days(1)).unwrap();
    ca.write(dir, true).unwrap();
    ca.issue(&IssueRequest::new(role, "relay"))
        .unwrap()
        .write(dir, "relay", true)
        .unwrap();
    format!(
        "[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/relay.pem\"\nkey = \"{0}/relay.key\"\n",
        dir.display()
    )
}

fn run(config: &Path, extra: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(extra)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn config_errors_check_config_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let tls = pki(dir.path(), "intermediate");
    let cfg = dir.path().join("intermediate.toml");

    std::fs::write(&cfg, format!("lisen = \"127.0.0.1:0\"\n{tls}")).unwrap();
    let (code, text) = run(&cfg, &["--check-config"]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("lisen") && text.contains("intermediate.toml"),
        "{text}"
    );

    std::fs::write(&cfg, format!("drain_timeout = \"soon\"\n{tls}")).unwrap();
    let (code, text) = run(&cfg, &["--check-config"]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("drain_timeout") && text.contains("soon"),
        "{text}"
    );

    std::fs::write(
        &cfg,
        format!("listen = \"127.0.0.1:0\"\nops_listen = \"127.0.0.1:0\"\n{tls}"),
    )
    .unwrap();
    let (code, text) = run(&cfg, &["--check-config"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("config ok"), "{text}");

    // A command-line override is validated like the file.
    let (code, text) = run(&cfg, &["--check-config", "--drain-timeout", "5 fortnights"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("drain_timeout"), "{text}");

    // Certificate for the wrong role, and a missing key file.
    let other = tempfile::tempdir().unwrap();
    let wrong = pki(other.path(), "agent");
    std::fs::write(&cfg, format!("listen = \"127.0.0.1:0\"\n{wrong}")).unwrap();
    let (code, text) = run(&cfg, &["--check-config"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("needs role intermediate"), "{text}");
    std::fs::remove_file(other.path().join("relay.key")).unwrap();
    let (code, text) = run(&cfg, &["--check-config"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("relay.key"), "{text}");

    // --config-only checks the file without the certificates (build-time check in Nix).
    let (code, text) = run(&cfg, &["--check-config", "--config-only"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("certificates not checked"), "{text}");

    // Port in use: exit 1 with a one-line reason.
    let busy = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    std::fs::write(&cfg, format!("listen = \"127.0.0.1:{port}\"\n{tls}")).unwrap();
    let (code, text) = run(&cfg, &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("cannot listen on 127.0.0.1"), "{text}");
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let tls = pki(dir.path(), "intermediate");
    let cfg = dir.path().join("intermediate.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nops_listen = \"127.0.0.1:0\"\ndrain_timeout = \"2s\"\n{tls}"
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it logs that it is listening.
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = String::new();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while !seen.contains("intermediate listening") && start.elapsed() < Duration::from_secs(10) {
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.contains("intermediate listening"), "{seen}");
    let kill = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(kill.success());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}
