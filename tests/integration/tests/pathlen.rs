//! The deployment CA says pathlen:0: a sub-CA it signed must not be able to mint identities,
//! neither for clients (agents, connectors) nor for the intermediate, even when the sub-CA
//! certificate is sent along in the chain.

use std::path::PathBuf;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use ztna_integration::*;
use ztna_node::config::TlsConfig;
use ztna_proto::Role;

/// Issues `role`/`name` from a sub-CA that the deployment CA signed, and writes the chain
/// leaf + sub-CA + root (what a misusing operator would deploy).
fn issue_via_sub_ca(pki: &Pki, role: &str, name: &str) -> TlsConfig {
    let ca_key = KeyPair::from_pem(pki.ca.key_pem()).unwrap();
    let ca = CertificateParams::from_ca_cert_pem(pki.ca.cert_pem())
        .unwrap()
        .self_signed(&ca_key)
        .unwrap();
    let mut sub = CertificateParams::default();
    sub.distinguished_name
        .push(DnType::CommonName, "rogue sub-CA");
    sub.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    sub.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let sub_key = KeyPair::generate().unwrap();
    let sub_cert = sub.signed_by(&sub_key, &ca, &ca_key).unwrap();

    let mut leaf = CertificateParams::default();
    leaf.distinguished_name.push(DnType::CommonName, name);
    leaf.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{TD}/{role}/{name}").try_into().unwrap(),
    )];
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &sub_cert, &sub_key).unwrap();

    let dir = pki.dir.path();
    let cert: PathBuf = dir.join(format!("{name}-via-sub.pem"));
    let key: PathBuf = dir.join(format!("{name}-via-sub.key"));
    std::fs::write(
        &cert,
        format!("{}{}{}", leaf_cert.pem(), sub_cert.pem(), pki.ca.cert_pem()),
    )
    .unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    TlsConfig {
        ca: pki.ca_path.clone(),
        cert,
        key,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sub_ca_cannot_mint_a_client_identity() {
    logs();
    let pki = Pki::new();
    let im = start_intermediate(&pki, open_policy(&["web"]));
    // The same name issued properly is accepted: only the issuer differs.
    let good = pki.issue("agent", "mallory");
    let (_ep, _conn) = raw_connect(&good, Role::Agent, im.addr)
        .await
        .expect("a certificate from the deployment CA is accepted");

    let tls = issue_via_sub_ca(&pki, "agent", "mallory");
    let err = refused(&tls, Role::Agent, im.addr)
        .await
        .expect("a certificate from a sub-CA was accepted");
    assert!(err.contains("not issued by the deployment CA"), "{err}");
    // The client reads the refusal before the relay's handshake task has
    // counted it: the count follows within moments, not necessarily first.
    let unauthorized = || {
        metric(
            &im.daemon.metrics.common.render(),
            "ztna_intermediate_handshakes_total",
            &[("result", "unauthorized")],
        )
    };
    assert!(
        eventually(Duration::from_secs(5), || unauthorized() >= 1.0).await,
        "{}",
        im.daemon.metrics.common.render()
    );

    // --check-config says so before it is deployed.
    let why = ztna_node::Identity::check(&tls, Role::Agent)
        .unwrap_err()
        .to_string();
    assert!(why.contains("not issued by the CA in"), "{why}");
    im.daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sub_ca_cannot_mint_an_intermediate() {
    logs();
    let pki = Pki::new();
    let tls = issue_via_sub_ca(&pki, "intermediate", "rogue-relay");
    // Our intermediate refuses to start with it (as --check-config says)...
    let mut cfg = intermediate_config(&pki, loopback0(), open_policy(&["web"]));
    cfg.tls = tls.clone();
    let why = match ztna_intermediate::Intermediate::bind(cfg) {
        Ok(_) => panic!("the intermediate started with a certificate from a sub-CA"),
        Err(e) => e.to_string(),
    };
    assert!(why.contains("not issued by the CA in"), "{why}");
    // ...and a rogue QUIC server presenting it (no such check) is refused by agents.
    let identity = ztna_node::Identity::load(&tls, Role::Intermediate).unwrap();
    let server = ztna_node::transport::server_config(
        &identity,
        &[Role::Agent],
        &ztna_node::transport::TransportOptions::default(),
    )
    .unwrap();
    let rogue = quinn::Endpoint::server(server, loopback0()).unwrap();
    let addr = rogue.local_addr().unwrap();
    let accepting = tokio::spawn({
        let rogue = rogue.clone();
        async move {
            while let Some(i) = rogue.accept().await {
                let _ = i.await;
            }
        }
    });
    let agent = pki.issue("agent", "alice");
    let err = match raw_connect(&agent, Role::Agent, addr).await {
        Ok(_) => panic!("the agent accepted an intermediate certificate from a sub-CA"),
        Err(e) => e,
    };
    assert!(err.contains("not issued by the deployment CA"), "{err}");
    rogue.close(0u32.into(), b"done");
    accepting.abort();
}

/// Nor by renewing an established connection: a sub-CA's leaf for the connection's own
/// identity, sent with the sub-CA and signed properly for the connection, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sub_ca_cannot_renew_a_connection() {
    logs();
    let pki = Pki::new();
    let im = start_intermediate(&pki, open_policy(&["web"]));
    let good = pki.issue("agent", "mallory");
    let (_ep, conn) = raw_connect(&good, Role::Agent, im.addr).await.unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let mut recv = ztna_node::io::FramedRecv::new(recv);
    let hello = ztna_proto::ClientMsg::Hello {
        version: ztna_proto::PROTOCOL_VERSION,
        role: Role::Agent,
        software: "crafted".into(),
        watch: vec![],
    };
    ztna_node::io::write_frame(&mut send, &hello).await.unwrap();
    let welcome = recv
        .expect::<ztna_proto::ServerMsg>(Duration::from_secs(5))
        .await
        .unwrap();
    assert!(matches!(welcome, ztna_proto::ServerMsg::Welcome { .. }));
    let rogue = ztna_node::Identity::load(&issue_via_sub_ca(&pki, "agent", "mallory"), Role::Agent)
        .expect("the rogue identity loads (its CA file is the deployment's)");
    let ztna_proto::ClientMsg::Renew {
        scheme, signature, ..
    } = ztna_node::renew::request(&conn, &rogue).unwrap()
    else {
        unreachable!("request makes a Renew")
    };
    // The leaf and the sub-CA that vouches for it.
    let chain = rogue.chain.iter().take(2).map(|c| c.to_vec()).collect();
    let msg = ztna_proto::ClientMsg::Renew {
        chain,
        scheme,
        signature,
    };
    ztna_node::io::write_frame(&mut send, &msg).await.unwrap();
    let answer = recv
        .expect::<ztna_proto::ServerMsg>(Duration::from_secs(5))
        .await
        .unwrap();
    println!("MEASURED a sub-CA's renewal: {answer:?}");
    match answer {
        ztna_proto::ServerMsg::RenewRefused { reason } => {
            assert!(
                reason.contains("not issued by the deployment CA"),
                "{reason}"
            )
        }
        other => panic!("a sub-CA's leaf renewed the connection: {other:?}"),
    }
    assert_eq!(
        metric(
            &im.daemon.metrics.common.render(),
            "ztna_intermediate_renewals_total",
            &[("result", "accepted")],
        ),
        0.0
    );
    im.daemon.shutdown().await;
}
