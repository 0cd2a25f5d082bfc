//! `--forward` shorthand and config validation through the binary.

use std::process::Command;

use ztna_pki::{Ca, IssueRequest, Validity};

const BIN: &str = env!("CARGO_BIN_EXE_ztna-agent");

#[test]
fn forward_shorthand_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("cli.example", Validity::days(1)).unwrap();
    ca.write(dir.path(), true).unwrap();
    ca.issue(&IssueRequest::new("agent", "alice"))
        .unwrap()
        .write(dir.path(), "alice", true)
        .unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "intermediates = [\"127.0.0.1:4433\"]\n[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/alice.pem\"\nkey = \"{0}/alice.key\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    };
    // No forward at all is an error naming the key.
    let (code, text) = run(&["--check-config"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("forward"), "{text}");
    // The shorthand supplies one.
    let (code, text) = run(&["--check-config", "--forward", "tcp:127.0.0.1:18080=web"]);
    assert_eq!(code, 0, "{text}");
    // A malformed shorthand names the problem.
    let (code, text) = run(&["--check-config", "--forward", "sctp:127.0.0.1:1=web"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("tcp or udp"), "{text}");
    // Environment variables work like flags.
    let out = Command::new(BIN)
        .arg("--check-config")
        .env("ZTNA_CONFIG", &cfg)
        .env("ZTNA_FORWARDS", "udp:127.0.0.1:15353=dns")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // `intermediates` may come from repeated --intermediate flags or ZTNA_INTERMEDIATES alone.
    let bare = dir.path().join("bare.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &bare,
        text.replace("intermediates = [\"127.0.0.1:4433\"]\n", ""),
    )
    .unwrap();
    let check = |extra: &[&str], env: Option<&str>| {
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(&bare)
            .args(["--check-config", "--forward", "tcp:127.0.0.1:18080=web"])
            .args(extra)
            .env_remove("ZTNA_INTERMEDIATES");
        if let Some(v) = env {
            cmd.env("ZTNA_INTERMEDIATES", v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, text) = check(&[], None);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("intermediates"), "{text}");
    let (code, text) = check(
        &[
            "--intermediate",
            "127.0.0.1:4433",
            "--intermediate",
            "127.0.0.1:4434",
        ],
        None,
    );
    assert_eq!(code, 0, "{text}");
    let (code, text) = check(&[], Some("127.0.0.1:4433,127.0.0.1:4434"));
    assert_eq!(code, 0, "{text}");
}

#[test]
fn bind_flag_completions_and_man_page() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        "intermediates = [\"[::1]:4433\"]\n[tls]\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"a.key\"\n\
         [[forward]]\nservice = \"web\"\nprotocol = \"tcp\"\nlisten = \"127.0.0.1:8080\"\n",
    )
    .unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(BIN)
            .args(args)
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
    };
    let cfg_s = cfg.to_str().unwrap();
    let only = ["--config", cfg_s, "--check-config", "--config-only"];
    assert_eq!(run(&only, &[]).0, 0);
    let (code, text) = run(&[&only[..], &["--bind", "[::1]:99999"]].concat(), &[]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("port 99999 is out of range 1-65535"),
        "{text}"
    );
    let (code, text) = run(&only, &[("ZTNA_BIND", "my-laptop:0")]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("\"my-laptop\" is a hostname"), "{text}");
    // A forward's listen address needs an IP too, in the file and in the shorthand.
    let (code, text) = run(
        &[&only[..], &["--forward", "tcp:localhost:8081=web"]].concat(),
        &[],
    );
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("\"localhost\" is a hostname"), "{text}");

    for shell in ["bash", "zsh", "elvish", "powershell"] {
        let (code, out) = run(&["completions", shell], &[]);
        assert_eq!(code, 0, "{out}");
        for flag in ["--config", "--forward", "--bind", "--log-format"] {
            assert!(out.contains(flag), "{shell} completions lack {flag}");
        }
    }
    let (code, out) = run(&["man"], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(".TH ztna-agent"), "{out}");
    assert!(
        out.contains("status"),
        "the man page lists the status subcommand"
    );

    // `status` finds the ops endpoint in the config; what it cannot use is exit 2, saying why.
    std::fs::write(&cfg, "ops_listen = \"127.0.0.1:99999\"\n").unwrap();
    let (code, text) = run(&["--config", cfg_s, "status"], &[]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("ztna-agent status: invalid config in")
            && text.contains("ops_listen: port 99999 is out of range 1-65535"),
        "{text}"
    );
    let gone = dir.path().join("gone.toml");
    let (code, text) = run(&["status", "--config", gone.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("cannot read config file") && text.contains("gone.toml"),
        "{text}"
    );
    let (code, text) = run(&["status", "--ops", "localhost"], &[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--ops: \"localhost\" has no port"), "{text}");
}

/// The example in examples/ passes `--check-config --config-only`, also with every commented
/// default uncommented (so a renamed key or a changed value format cannot hide there).
#[test]
fn example_config_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/agent.toml");
    let text = std::fs::read_to_string(example).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let all = dir.path().join("agent.toml");
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
