use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ::time::{Duration, OffsetDateTime};
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;
use x509_parser::prelude::*;
use ztna_pki::{Ca, IssueRequest, PkiError, Validity};

/// DER of every certificate in a PEM file, in order.
fn ders(path: &Path) -> Vec<Vec<u8>> {
    let data = std::fs::read(path).unwrap();
    Pem::iter_from_buffer(&data)
        .map(|p| p.unwrap().contents)
        .collect()
}

fn sans(cert: &X509Certificate<'_>) -> Vec<String> {
    let san = cert
        .subject_alternative_name()
        .unwrap()
        .expect("SAN extension");
    san.value
        .general_names
        .iter()
        .map(|gn| match gn {
            GeneralName::URI(u) => format!("uri:{u}"),
            GeneralName::DNSName(d) => format!("dns:{d}"),
            GeneralName::IPAddress(b) => {
                let ip: IpAddr = match b.len() {
                    4 => <[u8; 4]>::try_from(*b).unwrap().into(),
                    _ => <[u8; 16]>::try_from(*b).unwrap().into(),
                };
                format!("ip:{ip}")
            }
            other => format!("other:{other:?}"),
        })
        .collect()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Asserts `leaf` is signed by `ca` and names it as issuer (DN + key identifier).
fn assert_chains(leaf: &X509Certificate<'_>, ca: &X509Certificate<'_>) {
    leaf.verify_signature(Some(ca.public_key()))
        .expect("leaf signature verifies with CA key");
    assert_eq!(leaf.issuer().as_raw(), ca.subject().as_raw());
    let ski = ca
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
        .expect("CA has SKI");
    let aki = leaf
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .expect("leaf has AKI");
    assert_eq!(aki, ski);
}

#[test]
fn init_and_issue_write_valid_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let ca = Ca::generate("corp.example", Validity::days(3650)).unwrap();
    let (ca_pem, ca_key) = ca.write(&ca_dir, false).unwrap();
    assert_eq!(
        (ca_pem.clone(), ca_key.clone()),
        (ca_dir.join("ca.pem"), ca_dir.join("ca.key"))
    );
    assert_eq!(mode(&ca_key), 0o600);
    assert_eq!(ca.trust_domain(), "corp.example");

    let ca_der = ders(&ca_pem).remove(0);
    let (_, ca_cert) = parse_x509_certificate(&ca_der).unwrap();
    assert!(ca_cert.is_ca());
    assert_eq!(sans(&ca_cert), ["uri:spiffe://corp.example"]);
    assert_eq!(ca_cert.subject().to_string(), "CN=ZTNA CA corp.example");
    let ku = ca_cert.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign() && ku.digital_signature());

    let req = IssueRequest {
        dns: vec!["web-1.corp.example".into()],
        ips: vec!["10.0.0.7".parse().unwrap(), "fd00::7".parse().unwrap()],
        ..IssueRequest::new("connector", "web-1")
    };
    let issued = ca.issue(&req).unwrap();
    assert_eq!(issued.spiffe_id, "spiffe://corp.example/connector/web-1");
    let out = dir.path().join("nodes");
    let (leaf_pem, leaf_key) = issued.write(&out, "web-1", false).unwrap();
    assert_eq!(leaf_pem, out.join("web-1.pem"));
    assert_eq!(mode(&leaf_key), 0o600);

    let chain = ders(&leaf_pem);
    assert_eq!(chain.len(), 2, "leaf followed by CA");
    assert_eq!(chain[1], ca_der);
    let (_, leaf) = parse_x509_certificate(&chain[0]).unwrap();
    assert!(!leaf.is_ca());
    assert_eq!(leaf.subject().to_string(), "CN=web-1");
    assert_eq!(
        sans(&leaf),
        [
            "uri:spiffe://corp.example/connector/web-1",
            "dns:web-1.corp.example",
            "ip:10.0.0.7",
            "ip:fd00::7"
        ]
    );
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(leaf.key_usage().unwrap().unwrap().value.digital_signature());
    assert_eq!(
        leaf.validity().not_after.timestamp(),
        issued.not_after.unix_timestamp()
    );
    let skew = OffsetDateTime::now_utc() - leaf.validity().not_before.to_datetime();
    assert!(
        skew >= Duration::minutes(4) && skew <= Duration::minutes(6),
        "{skew}"
    );
    assert_chains(&leaf, &ca_cert);
}

#[test]
fn plain_request_has_only_the_spiffe_san() {
    let ca = Ca::generate("td", Validity::days(1)).unwrap();
    for role in ztna_pki::ROLES {
        let issued = ca.issue(&IssueRequest::new(role, "n_1.x")).unwrap();
        let pem = Pem::iter_from_buffer(issued.cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let leaf = pem.parse_x509().unwrap();
        assert_eq!(sans(&leaf), [format!("uri:spiffe://td/{role}/n_1.x")]);
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth, "{role}");
    }
}

#[test]
fn issue_from_loaded_ca_chains_to_original() {
    let dir = tempfile::tempdir().unwrap();
    let original = Ca::generate("corp.example", Validity::days(30)).unwrap();
    original.write(dir.path(), false).unwrap();
    let loaded = Ca::load(dir.path()).unwrap();
    assert_eq!(loaded.trust_domain(), "corp.example");
    assert_eq!(loaded.cert_pem(), original.cert_pem());
    assert_eq!(loaded.key_pem(), original.key_pem());

    let issued = loaded.issue(&IssueRequest::new("agent", "alice")).unwrap();
    let (leaf_pem, _) = issued.write(dir.path(), "alice", false).unwrap();
    let chain = ders(&leaf_pem);
    let (_, leaf) = parse_x509_certificate(&chain[0]).unwrap();
    let ca_der = ders(&dir.path().join("ca.pem")).remove(0);
    let (_, ca_cert) = parse_x509_certificate(&ca_der).unwrap();
    assert_eq!(chain[1], ca_der);
    assert_chains(&leaf, &ca_cert);
}

#[test]
fn from_pem_rejects_mismatched_key_and_non_spiffe_ca() {
    let a = Ca::generate("a.example", Validity::days(1)).unwrap();
    let b = Ca::generate("b.example", Validity::days(1)).unwrap();
    let err = Ca::from_pem(a.cert_pem(), b.key_pem())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("does not match"), "{err}");
    // A leaf is not a CA.
    let leaf = a.issue(&IssueRequest::new("agent", "x")).unwrap();
    let err = Ca::from_pem(&leaf.cert_pem, &leaf.key_pem)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a CA"), "{err}");
    let err = Ca::load(Path::new("/nonexistent-ztna"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("/nonexistent-ztna/ca.pem"), "{err}");
}

#[test]
fn refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let first = Ca::generate("corp.example", Validity::days(1)).unwrap();
    let (cert, key) = first.write(dir.path(), false).unwrap();
    let second = Ca::generate("corp.example", Validity::days(1)).unwrap();
    let err = second.write(dir.path(), false).unwrap_err();
    assert!(
        matches!(&err, PkiError::AlreadyExists(p) if p == &cert),
        "{err}"
    );
    assert!(err.to_string().contains("ca.pem"), "{err}");
    assert_eq!(std::fs::read_to_string(&cert).unwrap(), first.cert_pem());
    assert_eq!(std::fs::read_to_string(&key).unwrap(), first.key_pem());

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    second.write(dir.path(), true).unwrap();
    assert_eq!(std::fs::read_to_string(&cert).unwrap(), second.cert_pem());
    assert_eq!(std::fs::read_to_string(&key).unwrap(), second.key_pem());
    assert_eq!(mode(&key), 0o600, "force re-tightens key mode");

    let issued = second.issue(&IssueRequest::new("agent", "a")).unwrap();
    issued.write(dir.path(), "a", false).unwrap();
    let err = issued
        .write(dir.path(), "a", false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("a.pem") && err.contains("--force"), "{err}");

    // A forced re-issue replaces both files whole (written beside them, then renamed over
    // them): nothing is left behind.
    let again = second.issue(&IssueRequest::new("agent", "a")).unwrap();
    again.write(dir.path(), "a", true).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("a.key")).unwrap(),
        again.key_pem
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("a.pem")).unwrap(),
        again.cert_pem
    );
    assert_eq!(mode(&dir.path().join("a.key")), 0o600);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".new"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // A node named `ca` would overwrite the CA's own files, key included, even with --force.
    let node = second.issue(&IssueRequest::new("agent", "ca")).unwrap();
    let err = node.write(dir.path(), "ca", true).unwrap_err().to_string();
    assert!(err.contains("CA's own files"), "{err}");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), second.key_pem());
}

#[test]
fn validation_errors_name_the_problem() {
    for td in [
        "",
        "Corp.example",
        "spiffe://corp.example",
        "corp example",
        "a/b",
        &"a".repeat(256),
    ] {
        let err = Ca::generate(td, Validity::days(1))
            .err()
            .expect(td)
            .to_string();
        assert!(err.contains("invalid trust domain"), "{td}: {err}");
    }
    let ca = Ca::generate("corp.example", Validity::days(1)).unwrap();
    let err = ca
        .issue(&IssueRequest::new("admin", "x"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("invalid role \"admin\""), "{err}");
    for name in ["", "a/b", "..", "é", "a b", &"n".repeat(129)] {
        let err = ca
            .issue(&IssueRequest::new("agent", name))
            .err()
            .expect(name)
            .to_string();
        assert!(err.contains("invalid name"), "{name}: {err}");
    }
    assert!(ca
        .issue(&IssueRequest::new("agent", &"n".repeat(128)))
        .is_ok());
    let req = IssueRequest {
        dns: vec![String::new()],
        ..IssueRequest::new("agent", "x")
    };
    let err = ca.issue(&req).err().unwrap().to_string();
    assert!(err.contains("invalid DNS name"), "{err}");
}

#[test]
fn issue_raw_and_expired_validity() {
    let ca = Ca::generate("corp.example", Validity::days(1)).unwrap();
    let now = OffsetDateTime::now_utc();
    let expired = Validity {
        not_before: now - Duration::days(2),
        not_after: now - Duration::days(1),
    };
    let uris = vec![
        "spiffe://other.example/agent/x".to_string(),
        "not a uri".to_string(),
    ];
    let issued = ca.issue_raw("weird", &uris, expired).unwrap();
    assert_eq!(issued.spiffe_id, uris[0]);
    let pem = Pem::iter_from_buffer(issued.cert_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let leaf = pem.parse_x509().unwrap();
    assert_eq!(
        sans(&leaf),
        ["uri:spiffe://other.example/agent/x", "uri:not a uri"]
    );
    assert!(!leaf.validity().is_valid());

    let none = ca.issue_raw("bare", &[], Validity::days(1)).unwrap();
    let pem = Pem::iter_from_buffer(none.cert_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    assert!(pem
        .parse_x509()
        .unwrap()
        .subject_alternative_name()
        .unwrap()
        .is_none());
}
