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
