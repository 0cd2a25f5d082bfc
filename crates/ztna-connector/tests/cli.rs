//! The connector binary as an operator runs it: relative paths in the config file, `--bind`,
//! completions and the man page.

use std::path::Path;
use std::process::Command;

use ztna_pki::{Ca, IssueRequest, Validity};

const BIN: &str = env!("CARGO_BIN_EXE_ztna-connector");

/// Writes ca.pem, web-1.pem and web-1.key into `dir`.
fn pki(dir: &Path) {
    let ca = Ca::generate("cli.example", Validity::days(1)).unwrap();
    ca.write(dir, true).unwrap();
    ca.issue(&IssueRequest::new("connector", "web-1"))
        .unwrap()
        .write(dir, "web-1", true)
        .unwrap();
}

const RELATIVE: &str = "intermediates = [\"relay.example.com:4433\"]\n\
    [tls]\nca = \"ca.pem\"\ncert = \"web-1.pem\"\nkey = \"web-1.key\"\n\
    [[service]]\nname = \"web\"\ntcp = \"127.0.0.1:8080\"\n";

fn run(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(BIN)
        .current_dir(cwd)
        .args(args)
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("ZTNA_CONFIG")
        .env_remove("ZTNA_BIND")
        .envs(env.iter().copied())
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
fn relative_paths_resolve_next_to_the_config_file_then_in_credentials() {
    // `cd /tmp && ztna-connector --config /srv/ztna/connector.toml`
    let srv = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    pki(srv.path());
    let cfg = srv.path().join("connector.toml");
    std::fs::write(&cfg, RELATIVE).unwrap();
    let cfg_s = cfg.to_str().unwrap();
    let (code, text) = run(
        elsewhere.path(),
        &["--config", cfg_s, "--check-config"],
        &[],
    );
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("config ok (spiffe://cli.example/connector/web-1"),
        "{text}"
    );

    // The NixOS modules: the config names credentials that live in $CREDENTIALS_DIRECTORY.
    let creds = tempfile::tempdir().unwrap();
    let etc = tempfile::tempdir().unwrap();
    pki(creds.path());
    let cfg = etc.path().join("connector.toml");
    std::fs::write(&cfg, RELATIVE).unwrap();
    let cfg_s = cfg.to_str().unwrap();
    let creds_s = creds.path().to_str().unwrap();
    let (code, text) = run(
        elsewhere.path(),
        &["--config", cfg_s, "--check-config"],
        &[("CREDENTIALS_DIRECTORY", creds_s)],
    );
    assert_eq!(code, 0, "{text}");
    // `$CREDENTIALS_DIRECTORY/...` in the file keeps working too.
    std::fs::write(
        &cfg,
        RELATIVE
            .replace("\"ca.pem\"", "\"$CREDENTIALS_DIRECTORY/ca.pem\"")
            .replace("\"web-1.key\"", "\"${CREDENTIALS_DIRECTORY}/web-1.key\""),
    )
    .unwrap();
    let (code, text) = run(
        elsewhere.path(),
        &["--config", cfg_s, "--check-config"],
        &[("CREDENTIALS_DIRECTORY", creds_s)],
    );
    assert_eq!(code, 0, "{text}");

    // Found nowhere: the error names the file next to the config, where the operator looks.
    std::fs::write(&cfg, RELATIVE).unwrap();
    let (code, text) = run(
        elsewhere.path(),
        &["--config", cfg_s, "--check-config"],
        &[],
    );
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains(&format!("{}", etc.path().join("ca.pem").display())),
        "{text}"
    );

    // Paths given on the command line are relative to the working directory.
    let (code, text) = run(
        srv.path(),
        &[
            "--config",
            cfg_s,
            "--check-config",
            "--tls-ca",
            "ca.pem",
            "--tls-cert",
            "web-1.pem",
            "--tls-key",
            "web-1.key",
        ],
        &[],
    );
    assert_eq!(code, 0, "{text}");
}

#[test]
fn bind_flag_and_environment_set_the_bind_key() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let cfg = dir.path().join("connector.toml");
    std::fs::write(&cfg, RELATIVE).unwrap();
    let cfg_s = cfg.to_str().unwrap();
    let only = ["--config", cfg_s, "--check-config", "--config-only"];
    let (code, text) = run(
        dir.path(),
        &[&only[..], &["--bind", "0.0.0.0:0"]].concat(),
        &[],
    );
    assert_eq!(code, 0, "{text}");
    let (code, text) = run(
        dir.path(),
        &[&only[..], &["--bind", "localhost:0"]].concat(),
        &[],
    );
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("bind") && text.contains("is a hostname, but an IP address is required"),
        "{text}"
    );
    let (code, text) = run(dir.path(), &only, &[("ZTNA_BIND", "0.0.0.0:99999")]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("port 99999 is out of range 1-65535"),
        "{text}"
    );
    // Intermediates are host:port with a real port.
    let (code, text) = run(
        dir.path(),
        &[&only[..], &["--intermediate", "relay.example.com:0"]].concat(),
        &[],
    );
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("intermediates") && text.contains("port 0 is out of range 1-65535"),
        "{text}"
    );
}

#[test]
fn completions_and_man_page() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "elvish", "powershell"] {
        let (code, out) = run(dir.path(), &["completions", shell], &[]);
        assert_eq!(code, 0, "{out}");
        for flag in ["--config", "--intermediate", "--bind", "--drain-timeout"] {
            assert!(out.contains(flag), "{shell} completions lack {flag}");
        }
    }
    let (code, out) = run(dir.path(), &["man"], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(".TH ztna-connector"), "{out}");
    assert!(out.contains("ZTNA_BIND"), "{out}");
}

/// The example in examples/ passes `--check-config --config-only`, also with every commented
/// default uncommented (so a renamed key or a changed value format cannot hide there).
#[test]
fn example_config_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/connector.toml");
    let text = std::fs::read_to_string(example).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let all = dir.path().join("connector.toml");
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

/// Backends may be host names (resolved when a flow opens); a malformed value is still refused
/// with a message that says what to write.
#[test]
fn backends_by_host_name_and_malformed_backends() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let cfg = dir.path().join("connector.toml");
    let check = |backend: &str| {
        let text = RELATIVE.replace("tcp = \"127.0.0.1:8080\"", backend);
        std::fs::write(&cfg, text).unwrap();
        run(
            dir.path(),
            &[
                "--config",
                cfg.to_str().unwrap(),
                "--check-config",
                "--config-only",
            ],
            &[],
        )
    };
    for ok in [
        "tcp = \"db.internal:5432\"",
        "udp = \"dns.internal:53\"",
        "tcp = \"[2001:db8::5]:5432\"",
    ] {
        let (code, text) = check(ok);
        assert_eq!(code, 0, "{ok}: {text}");
    }
    for (bad, want) in [
        ("tcp = \"db.internal\"", "has no port"),
        (
            "tcp = \"db.internal:99999\"",
            "port 99999 is out of range 1-65535",
        ),
        ("udp = \"dns.internal:0\"", "port 0 is out of range 1-65535"),
        ("tcp = \"http://db.internal:80\"", "without a scheme"),
    ] {
        let (code, text) = check(bad);
        assert_eq!(code, 2, "{bad}: {text}");
        assert!(
            text.contains(want) && text.contains("connector.toml"),
            "{bad}: {text}"
        );
    }
}
