//! The TLS suite our peers agree on, checked with real rustls handshakes between the configs the
//! daemons build (in memory, no network).

use std::sync::Arc;

use quinn::rustls::crypto::ring::cipher_suite;
use quinn::rustls::{self, ClientConnection, ServerConnection, SupportedCipherSuite};
use ztna_integration::*;
use ztna_node::Identity;
use ztna_proto::Role;

/// Moves everything `from` has to send into `to`, and lets `to` process it.
fn pump(from: &mut rustls::Connection, to: &mut rustls::Connection) {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).unwrap();
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).unwrap();
    }
    to.process_new_packets().unwrap();
}

fn handshake(client: rustls::ClientConfig, server: rustls::ServerConfig) -> SupportedCipherSuite {
    let name = "ztna-intermediate".try_into().unwrap();
    let mut c = rustls::Connection::from(ClientConnection::new(Arc::new(client), name).unwrap());
    let mut s = rustls::Connection::from(ServerConnection::new(Arc::new(server)).unwrap());
    for _ in 0..10 {
        pump(&mut c, &mut s);
        pump(&mut s, &mut c);
        if !c.is_handshaking() && !s.is_handshaking() {
            assert_eq!(c.negotiated_cipher_suite(), s.negotiated_cipher_suite());
            return s.negotiated_cipher_suite().unwrap();
        }
    }
    panic!("the handshake did not complete");
}

#[test]
fn agents_connectors_and_intermediates_agree_on_aes_128_gcm() {
    let pki = Pki::new();
    let im = Identity::load(&pki.issue("intermediate", "im-1"), Role::Intermediate).unwrap();
    let server = im.server_config(&[Role::Agent, Role::Connector]).unwrap();
    for (role, name) in [(Role::Agent, "alice"), (Role::Connector, "web-1")] {
        let peer = Identity::load(&pki.issue(role.as_str(), name), role).unwrap();
        let got = handshake(
            peer.client_config(Role::Intermediate).unwrap(),
            server.clone(),
        );
        assert_eq!(
            got.suite(),
            cipher_suite::TLS13_AES_128_GCM_SHA256.suite(),
            "{role:?}"
        );
    }
}
