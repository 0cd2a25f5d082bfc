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

    // identity_window outside 64 KiB..1 GiB: named, with its range; the bounds themselves pass.
    for (value, ok) in [
        ("\"63KiB\"", false),
        ("\"2GiB\"", false),
        ("\"64KiB\"", true),
        ("\"1GiB\"", true),
    ] {
        std::fs::write(
            &cfg,
            format!("listen = \"127.0.0.1:0\"\nidentity_window = {value}\n{tls}"),
        )
        .unwrap();
        let (code, text) = run(&cfg, &["--check-config"]);
        if ok {
            assert_eq!(code, 0, "identity_window = {value}: {text}");
        } else {
            assert_eq!(code, 2, "identity_window = {value}: {text}");
            assert!(
                text.contains("identity_window") && text.contains("between 64KiB and 1GiB"),
                "{text}"
            );
        }
    }

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
    // Wait until it logs (to stderr) that it is listening.
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = String::new();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while !seen.contains("intermediate listening") && start.elapsed() < Duration::from_secs(10) {
        let n = stderr.read(&mut buf).unwrap();
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

/// Runs the binary with `args` (no config unless given) and returns (exit code, stdout, stderr).
fn exec(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("ZTNA_CONFIG")
        .env_remove("ZTNA_LOG_FORMAT")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn errors_say_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let tls = pki(dir.path(), "intermediate");
    let cfg = dir.path().join("intermediate.toml");
    let cfg_s = cfg.to_str().unwrap();
    let check = |body: String| {
        std::fs::write(&cfg, body).unwrap();
        exec(&["--config", cfg_s, "--check-config"], &[])
    };

    // No configuration at all.
    let (code, _, err) = exec(&[], &[]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(
        err.trim(),
        "ztna-intermediate: no configuration: pass --config FILE or set ZTNA_CONFIG"
    );

    // Port out of range, in the file and on the command line.
    let (code, _, err) = check(format!("listen = \"0.0.0.0:99999\"\n{tls}"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("port 99999 is out of range 1-65535"), "{err}");
    assert!(
        err.contains("listen") && err.contains("intermediate.toml"),
        "{err}"
    );
    std::fs::write(&cfg, &tls).unwrap();
    let (code, _, err) = exec(
        &[
            "--config",
            cfg_s,
            "--check-config",
            "--ops-listen",
            "127.0.0.1:70000",
        ],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("port 70000 is out of range 1-65535"), "{err}");

    // A hostname where an address is required.
    let (code, _, err) = check(format!("listen = \"localhost:4433\"\n{tls}"));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("\"localhost\" is a hostname, but an IP address is required here"),
        "{err}"
    );

    // Durations without a unit, as a string and as a number.
    let (code, _, err) = check(format!("drain_timeout = \"30\"\n{tls}"));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("drain_timeout") && err.contains("add a unit, e.g. \"30s\""),
        "{err}"
    );
    let (code, _, err) = check(format!("drain_timeout = 30\n{tls}"));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("drain_timeout") && err.contains("write \"30s\""),
        "{err}"
    );

    // Handshake limits of 0 would refuse every connection while /readyz says ready.
    for key in ["max_handshakes", "max_handshakes_per_source"] {
        let (code, _, err) = check(format!("{key} = 0\n{tls}"));
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains(key) && err.contains("must be at least 1"),
            "{err}"
        );
    }

    // Certificate and key that do not belong together: both files named.
    let other = tempfile::tempdir().unwrap();
    pki(other.path(), "intermediate");
    let mixed = tls.replace(
        &format!("{}/relay.key", dir.path().display()),
        &format!("{}/relay.key", other.path().display()),
    );
    let (code, _, err) = check(mixed);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("certificate {}/relay.pem", dir.path().display()))
            && err.contains(&format!("private key {}/relay.key", other.path().display()))
            && err.contains("do not belong together"),
        "{err}"
    );
}

#[test]
fn check_config_verifies_the_certificate_against_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let tls = pki(dir.path(), "intermediate");
    let cfg = dir.path().join("intermediate.toml");
    let cfg_s = cfg.to_str().unwrap();
    std::fs::write(&cfg, &tls).unwrap();
    let (code, out, err) = exec(&["--config", cfg_s, "--check-config"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("config ok (spiffe://cli.example/intermediate/relay valid until"),
        "{out}"
    );

    // A certificate from another CA (same trust domain name), with the deployment CA configured.
    let foreign = tempfile::tempdir().unwrap();
    pki(foreign.path(), "intermediate");
    std::fs::write(
        &cfg,
        format!(
            "[tls]\nca = \"{0}/ca.pem\"\ncert = \"{1}/relay.pem\"\nkey = \"{1}/relay.key\"\n",
            dir.path().display(),
            foreign.path().display()
        ),
    )
    .unwrap();
    let (code, out, err) = exec(&["--config", cfg_s, "--check-config"], &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains(&format!(
            "not issued by the CA in {}/ca.pem",
            dir.path().display()
        )),
        "{err}"
    );

    // Expired.
    let ca = Ca::load(dir.path()).unwrap();
    let mut req = IssueRequest::new("intermediate", "old");
    let now = time::OffsetDateTime::now_utc();
    req.validity = Validity {
        not_before: now - time::Duration::days(10),
        not_after: now - time::Duration::days(1),
    };
    ca.issue(&req)
        .unwrap()
        .write(dir.path(), "old", true)
        .unwrap();
    std::fs::write(&cfg, tls.replace("relay.", "old.")).unwrap();
    let (code, out, err) = exec(&["--config", cfg_s, "--check-config"], &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("old.pem: expired on"), "{err}");

    // Wrong role.
    ca.issue(&IssueRequest::new("agent", "alice"))
        .unwrap()
        .write(dir.path(), "alice", true)
        .unwrap();
    std::fs::write(&cfg, tls.replace("relay.", "alice.")).unwrap();
    let (code, out, err) = exec(&["--config", cfg_s, "--check-config"], &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("certificate is for role agent") && err.contains("needs role intermediate"),
        "{err}"
    );
}

/// Starts the daemon with `args`, waits for "intermediate listening" on stderr, stops it with
/// SIGTERM and returns everything it wrote to stderr.
fn stderr_of_a_run(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("ZTNA_LOG_FORMAT")
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("intermediate listening")
        && start.elapsed() < Duration::from_secs(10)
    {
        let n = stderr.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = stderr.read_to_end(&mut seen);
    let _ = child.wait();
    String::from_utf8_lossy(&seen).into_owned()
}

#[test]
fn logs_are_plain_text_or_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let tls = pki(dir.path(), "intermediate");
    let cfg = dir.path().join("intermediate.toml");
    let base = "listen = \"127.0.0.1:0\"\nops_listen = \"127.0.0.1:0\"\ndrain_timeout = \"1s\"\n";
    std::fs::write(&cfg, format!("{base}{tls}")).unwrap();
    let cfg_s = cfg.to_str().unwrap();

    // stderr is a pipe here, as under systemd: no colour codes.
    let text = stderr_of_a_run(&["--config", cfg_s], &[]);
    assert!(text.contains("intermediate listening"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in piped logs: {text:?}"
    );

    let json_line = |text: &str| {
        let line = text
            .lines()
            .find(|l| l.contains("intermediate listening"))
            .unwrap_or_else(|| panic!("no listening line in {text}"))
            .to_string();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert_eq!(v["message"], "intermediate listening", "{line}");
        assert_eq!(v["level"], "INFO", "{line}");
        assert!(
            v["listen"].as_str().unwrap_or("").starts_with("127.0.0.1:"),
            "{line}"
        );
        for l in text.lines() {
            assert!(serde_json::from_str::<serde_json::Value>(l).is_ok(), "{l}");
        }
    };
    // --log-format json, ZTNA_LOG_FORMAT=json and log_format = "json" in the file.
    json_line(&stderr_of_a_run(
        &["--config", cfg_s, "--log-format", "json"],
        &[],
    ));
    json_line(&stderr_of_a_run(
        &["--config", cfg_s],
        &[("ZTNA_LOG_FORMAT", "json")],
    ));
    std::fs::write(&cfg, format!("log_format = \"json\"\n{base}{tls}")).unwrap();
    json_line(&stderr_of_a_run(&["--config", cfg_s], &[]));

    std::fs::write(&cfg, format!("log_format = \"xml\"\n{base}{tls}")).unwrap();
    let (code, _, err) = exec(&["--config", cfg_s, "--check-config"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("log_format") && err.contains("xml"), "{err}");
}

#[test]
fn completions_and_man_page() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let (code, out, err) = exec(&["completions", shell], &[]);
        assert_eq!(code, 0, "{shell}: {err}");
        for flag in ["--config", "--check-config", "--listen", "--log-format"] {
            // fish spells long options `-l name`.
            let spelled = match shell {
                "fish" => format!("-l {}", &flag[2..]),
                _ => flag.to_string(),
            };
            assert!(
                out.contains(&spelled),
                "{shell} completions lack {flag}: {out}"
            );
        }
    }
    let (code, out, err) = exec(&["man"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(".TH ztna-intermediate"), "{out}");
    assert!(out.contains("\\-\\-check\\-config"), "{out}");
    // Without a subcommand the daemon still takes its flags as before.
    let (code, _, err) = exec(&["completions", "tcsh"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("tcsh"), "{err}");
}

/// The example in examples/ passes `--check-config --config-only`, also with every commented
/// default uncommented (so a renamed key or a changed value format cannot hide there).
#[test]
fn example_config_is_valid() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/intermediate.toml"
    );
    let text = std::fs::read_to_string(example).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let all = dir.path().join("intermediate.toml");
    let mut uncommented = 0;
    let body: String = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                }) =>
            {
                uncommented += 1;
                format!("{rest}\n")
            }
            _ => format!("{l}\n"),
        })
        .collect();
    assert!(uncommented >= 5, "{body}");
    std::fs::write(&all, body).unwrap();
    for cfg in [std::path::Path::new(example), all.as_path()] {
        let out = Command::new(BIN)
            .arg("--config")
            .arg(cfg)
            .args(["--check-config", "--config-only"])
            .env_remove("ZTNA_CONFIG")
            .env_remove("ZTNA_INTERMEDIATES")
            .env_remove("ZTNA_FORWARDS")
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}",
            cfg.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
