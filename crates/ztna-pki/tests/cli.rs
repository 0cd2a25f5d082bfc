use std::process::{Command, Output};

fn pki(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ztna-pki"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn init_and_issue_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let out = dir.path().join("out");
    let (ca, out) = (ca.to_str().unwrap(), out.to_str().unwrap());

    let o = pki(&[
        "init",
        "--out",
        ca,
        "--trust-domain",
        "corp.example",
        "--days",
        "30",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("ca.pem") && stdout.contains("spiffe://corp.example"),
        "{stdout}"
    );

    let o = pki(&[
        "issue",
        "--ca",
        ca,
        "--role",
        "connector",
        "--name",
        "web-1",
        "--out",
        out,
        "--dns",
        "web-1.corp.example",
        "--dns",
        "web",
        "--ip",
        "10.1.2.3",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("spiffe://corp.example/connector/web-1"),
        "{stdout}"
    );
    for f in ["web-1.pem", "web-1.key"] {
        assert!(dir.path().join("out").join(f).is_file(), "{f}");
    }
    let pem = std::fs::read_to_string(dir.path().join("out/web-1.pem")).unwrap();
    assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2);

    // Second init without --force fails and names the file.
    let o = pki(&["init", "--out", ca, "--trust-domain", "corp.example"]);
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.starts_with("ztna-pki: ") && stderr.contains("ca.pem"),
        "{stderr}"
    );
}

#[test]
fn bad_arguments_fail_with_message() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().to_str().unwrap();
    assert!(
        pki(&["init", "--out", ca, "--trust-domain", "corp.example"])
            .status
            .success()
    );

    let o = pki(&[
        "issue", "--ca", ca, "--role", "admin", "--name", "x", "--out", ca,
    ]);
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.starts_with("ztna-pki: ") && stderr.contains("invalid role \"admin\""),
        "{stderr}"
    );
    assert!(!dir.path().join("x.pem").exists());

    let o = pki(&[
        "issue", "--ca", ca, "--role", "agent", "--name", "x", "--out", ca, "--ip", "nope",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--ip"));

    let o = pki(&["init", "--out", ca, "--trust-domain", "Bad!", "--force"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid trust domain"));

    let o = pki(&[
        "init",
        "--out",
        ca,
        "--trust-domain",
        "td",
        "--days",
        "0",
        "--force",
    ]);
    assert!(!o.status.success());
}

#[test]
fn show_prints_identity_validity_and_issuer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert!(pki(&["init", "--out", d, "--trust-domain", "corp.example"])
        .status
        .success());
    assert!(pki(&[
        "issue",
        "--ca",
        d,
        "--role",
        "connector",
        "--name",
        "web-1",
        "--out",
        d,
        "--dns",
        "web-1.corp.example",
        "--ip",
        "10.1.2.3",
        "--days",
        "30",
    ])
    .status
    .success());

    let o = pki(&["show", &format!("{d}/web-1.pem")]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    for want in [
        "SPIFFE ID     spiffe://corp.example/connector/web-1",
        "role          connector",
        "name          web-1",
        "trust domain  corp.example",
        "issuer        CN=ZTNA CA corp.example",
        "DNS names     web-1.corp.example",
        "IP addresses  10.1.2.3",
        "in file       2 certificate(s)",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert!(
        out.contains("status        valid, 29 days left")
            || out.contains("status        valid, 30 days left"),
        "{out}"
    );

    let o = pki(&["show", &format!("{d}/ca.pem")]);
    assert_eq!(o.status.code(), Some(0));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("SPIFFE ID     spiffe://corp.example\n"),
        "{out}"
    );
    assert!(out.contains("role          deployment CA"), "{out}");

    // Not ours: a key, a text file, a certificate without a SPIFFE ID: exit 2 with the reason.
    let o = pki(&["show", &format!("{d}/web-1.key")]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("not a ZTNA certificate: the file holds no PEM certificate"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let plain = dir.path().join("notes.txt");
    std::fs::write(&plain, "hello\n").unwrap();
    assert_eq!(
        pki(&["show", plain.to_str().unwrap()]).status.code(),
        Some(2)
    );
    let ca = ztna_pki::Ca::load(dir.path()).unwrap();
    let raw = ca
        .issue_raw("plain", &[], ztna_pki::Validity::days(1))
        .unwrap();
    let foreign = dir.path().join("plain.pem");
    std::fs::write(&foreign, raw.cert_pem).unwrap();
    let o = pki(&["show", foreign.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no spiffe:// URI SAN"));
    // A file that cannot be read is an ordinary error (1), naming it.
    let o = pki(&["show", &format!("{d}/missing.pem")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing.pem"));
}

#[test]
fn completions_and_man_page() {
    for shell in ["bash", "zsh", "elvish", "powershell"] {
        let o = pki(&["completions", shell]);
        assert!(o.status.success());
        let out = String::from_utf8_lossy(&o.stdout);
        for word in ["init", "issue", "show", "--trust-domain", "--role"] {
            assert!(out.contains(word), "{shell} completions lack {word}");
        }
    }
    let o = pki(&["completions", "fish"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("-l trust-domain"));
    let o = pki(&["man"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(".TH ztna-pki"), "{out}");
    assert!(out.contains("issue"), "{out}");
}
