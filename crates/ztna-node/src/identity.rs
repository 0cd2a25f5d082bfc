//! Identity: the deployment CA, this node's certificate, SPIFFE IDs, and the rustls configs that
//! enforce mutual TLS with role checks.
//!
//! * Servers (the intermediate, and later P2P listeners) require a client certificate that chains
//!   to the CA *and* carries a SPIFFE ID of the same trust domain with an allowed role.
//! * Clients verify the server by chain + SPIFFE role (not by DNS name), so connecting by IP works.
//!
//! There is no way to turn verification off.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use thiserror::Error;
use ztna_proto::Role;

use crate::config::TlsConfig;

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} holds no {expected}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("{path}: {message}")]
    BadCert { path: PathBuf, message: String },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error(
        "certificate {} and private key {} do not belong together (the key is not the one the \
         certificate was issued for: check that both come from the same `ztna-pki issue`)",
        cert.display(),
        key.display()
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("certificate {}: {message}", path.display())]
    Untrusted { path: PathBuf, message: String },
}

/// `spiffe://<trust-domain>/<role>/<name>`
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub role: Role,
    pub name: String,
}

impl std::fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "spiffe://{}/{}/{}",
            self.trust_domain, self.role, self.name
        )
    }
}

fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl SpiffeId {
    /// Parses a workload SPIFFE ID with exactly a role and a name segment.
    pub fn parse(uri: &str) -> Result<SpiffeId, String> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| format!("{uri:?} is not a spiffe:// URI"))?;
        let mut parts = rest.split('/');
        let (td, role, name) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(td), Some(role), Some(name), None) => (td, role, name),
            _ => {
                return Err(format!(
                    "{uri:?} is not spiffe://<trust-domain>/<role>/<name>"
                ))
            }
        };
        if !valid_trust_domain(td) {
            return Err(format!("{uri:?} has an invalid trust domain"));
        }
        let role = Role::parse(role).ok_or_else(|| {
            format!("{uri:?} has unknown role {role:?} (agent, connector or intermediate)")
        })?;
        if !valid_name(name) {
            return Err(format!("{uri:?} has an invalid name"));
        }
        Ok(SpiffeId {
            trust_domain: td.to_string(),
            role,
            name: name.to_string(),
        })
    }

    /// Extracts the single SPIFFE URI SAN of a certificate.
    pub fn from_cert(der: &[u8]) -> Result<SpiffeId, String> {
        let uris = uri_sans(der)?;
        let spiffe: Vec<&String> = uris.iter().filter(|u| u.starts_with("spiffe://")).collect();
        match spiffe.as_slice() {
            [one] => SpiffeId::parse(one),
            [] => Err("certificate has no SPIFFE ID (URI SAN spiffe://...)".to_string()),
            _ => Err("certificate has more than one SPIFFE ID".to_string()),
        }
    }
}

fn uri_sans(der: &[u8]) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unparseable certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Trust domain of a CA certificate: its `spiffe://<td>` URI SAN (written by `ztna-pki init`).
fn ca_trust_domain(der: &[u8]) -> Result<String, String> {
    for uri in uri_sans(der)? {
        if let Some(td) = uri.strip_prefix("spiffe://") {
            let td = td.trim_end_matches('/');
            if valid_trust_domain(td) {
                return Ok(td.to_string());
            }
        }
    }
    Err(
        "CA certificate has no spiffe://<trust-domain> URI SAN (create it with `ztna-pki init`)"
            .into(),
    )
}

/// Whether a certificate says it is a CA (basicConstraints cA = TRUE).
fn is_ca(der: &[u8]) -> bool {
    x509_parser::parse_x509_certificate(der)
        .ok()
        .and_then(|(_, c)| c.basic_constraints().ok().flatten().map(|b| b.value.ca))
        .unwrap_or(false)
}

fn not_after(der: &[u8]) -> Result<SystemTime, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unparseable certificate: {e}"))?;
    let ts = cert.validity().not_after.timestamp();
    Ok(UNIX_EPOCH + Duration::from_secs(ts.max(0) as u64))
}

/// The crypto provider every config uses: rustls with *ring*, TLS 1.3 suites only, AES-128-GCM
/// first.
///
/// ring's default order puts AES-256-GCM/SHA-384 first. AES-128-GCM's key schedule
/// (HKDF-SHA-256) runs on the CPU's SHA extensions, where SHA-384 has none: SHA-384 was 5 % of
/// an intermediate's CPU while 10,000 agents connected (perf), and a handshake costs 0.61
/// instead of 0.76 ms at 5,000 agents (ztna-bench; bulk throughput does not change).
/// AES-128-GCM is TLS 1.3's mandatory suite and what QUIC's Initial packets use anyway. Our
/// clients and servers both list this order, and a rustls server follows the client's order,
/// so peers of an older release keep AES-256.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// Everything loaded from the `[tls]` section.
#[derive(Clone)]
pub struct Identity {
    pub id: SpiffeId,
    /// The CA certificates as configured (DER).
    ca_ders: Arc<Vec<CertificateDer<'static>>>,
    pub chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    pub roots: Arc<RootCertStore>,
    pub trust_domain: String,
    /// notAfter of our own leaf certificate.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id.to_string())
            .finish_non_exhaustive()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, IdentityError> {
    let path = TlsConfig::resolve(path);
    std::fs::read(&path).map_err(|source| IdentityError::Read { what, path, source })
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let pem = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::BadCert {
            path: path.into(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(IdentityError::Empty {
            what,
            path: path.into(),
            expected: "PEM certificate",
        });
    }
    Ok(certs)
}

impl Identity {
    /// Loads CA, certificate chain and key, and checks that they belong together: the leaf must
    /// carry a SPIFFE ID of `expected_role` in the CA's trust domain.
    pub fn load(tls: &TlsConfig, expected_role: Role) -> Result<Identity, IdentityError> {
        let ca = certs("CA certificate", &tls.ca)?;
        let chain = certs("certificate", &tls.cert)?;
        let key_pem = read("private key", &tls.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => IdentityError::Empty {
                what: "private key",
                path: tls.key.clone(),
                expected: "PEM private key",
            },
            e => IdentityError::BadCert {
                path: tls.key.clone(),
                message: e.to_string(),
            },
        })?;
        let mismatch = || IdentityError::KeyMismatch {
            cert: TlsConfig::resolve(&tls.cert),
            key: TlsConfig::resolve(&tls.key),
        };
        match rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider()) {
            Err(rustls::Error::InconsistentKeys(_)) => return Err(mismatch()),
            Err(e) => {
                return Err(IdentityError::BadCert {
                    path: tls.key.clone(),
                    message: format!("unusable private key: {e}"),
                })
            }
            Ok(_) => {}
        }
        Self::from_parts(ca, chain, key, expected_role, &tls.cert)
    }

    /// What `--check-config` does: loads the `[tls]` files like a daemon start and also verifies
    /// the certificate the way peers will, against the configured CA: issued directly by it (no
    /// intermediate CA), inside its validity period, with the key usage and SPIFFE role
    /// `role` needs. Returns a one-line summary.
    pub fn check(tls: &TlsConfig, role: Role) -> Result<String, IdentityError> {
        Self::load_verified(tls, role).map(|(_, summary)| summary)
    }

    /// [`Identity::load`], then the checks of [`Identity::check`]: what a daemon does at start
    /// and on reload, so that it never runs (or reports ready) with a certificate every peer
    /// would refuse: expired, not valid yet, or not issued by the configured CA. Returns the
    /// identity and the one-line summary.
    pub fn load_verified(tls: &TlsConfig, role: Role) -> Result<(Identity, String), IdentityError> {
        let identity = Self::load(tls, role)?;
        let path = TlsConfig::resolve(&tls.cert);
        let untrusted = |message: String| IdentityError::Untrusted {
            path: path.clone(),
            message,
        };
        let leaf = identity
            .chain
            .first()
            .ok_or_else(|| untrusted("empty certificate chain".into()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| untrusted(format!("unparseable certificate: {e}")))?;
        let validity = parsed.validity();
        let now = x509_parser::time::ASN1Time::now();
        if now < validity.not_before {
            return Err(untrusted(format!(
                "not valid yet: valid from {} (is this host's clock right?)",
                validity.not_before
            )));
        }
        if now > validity.not_after {
            return Err(untrusted(format!(
                "expired on {}: issue a new one with `ztna-pki issue ... --force`",
                validity.not_after
            )));
        }
        let ca = TlsConfig::resolve(&tls.ca);
        verify_chain(&identity.roots, leaf, role, UnixTime::now()).map_err(|e| {
            untrusted(match e {
                rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature,
                ) => format!(
                    "not issued by the CA in {} (a certificate from another deployment's CA, or \
                     from an intermediate CA, which is not accepted: issue it directly from the \
                     deployment CA)",
                    ca.display()
                ),
                other => format!("refused by the CA in {}: {other}", ca.display()),
            })
        })?;
        let summary = format!(
            "{} valid until {}, issued by the CA in {}",
            identity.id,
            validity.not_after,
            ca.display()
        );
        Ok((identity, summary))
    }

    /// Builds an identity from DER parts (also used by tests and the demo).
    pub fn from_parts(
        ca: Vec<CertificateDer<'static>>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        expected_role: Role,
        cert_path: &Path,
    ) -> Result<Identity, IdentityError> {
        let bad = |message: String| IdentityError::BadCert {
            path: cert_path.into(),
            message,
        };
        let ca_der = ca.first().ok_or_else(|| bad("no CA certificate".into()))?;
        let trust_domain = ca_trust_domain(ca_der).map_err(bad)?;
        let mut roots = RootCertStore::empty();
        for (i, c) in ca.iter().enumerate() {
            // Every certificate of the CA file becomes a trust anchor, able to vouch for any
            // identity of our trust domain: each must be a CA of that trust domain (a bundle of
            // the old and the new deployment CA during a CA rotation), not another deployment's
            // CA, a corporate CA or a leaf pasted in by mistake.
            if !is_ca(c) {
                return Err(bad(format!(
                    "certificate {} of the CA file is not a CA certificate (a leaf pasted into \
                     the CA file?)",
                    i + 1
                )));
            }
            match ca_trust_domain(c) {
                Ok(td) if td == trust_domain => {}
                Ok(td) => {
                    return Err(bad(format!(
                        "certificate {} of the CA file is the CA of trust domain {td}, not \
                         {trust_domain}: it would be trusted to vouch for our identities",
                        i + 1
                    )))
                }
                Err(why) => {
                    return Err(bad(format!("certificate {} of the CA file: {why}", i + 1)))
                }
            }
            roots
                .add(c.clone())
                .map_err(|e| bad(format!("unusable CA certificate: {e}")))?;
        }
        let leaf = chain
            .first()
            .ok_or_else(|| bad("empty certificate chain".into()))?;
        let id = SpiffeId::from_cert(leaf).map_err(bad)?;
        if id.role != expected_role {
            return Err(bad(format!(
                "certificate is for role {} ({id}), this daemon needs role {expected_role}",
                id.role
            )));
        }
        if id.trust_domain != trust_domain {
            return Err(bad(format!(
                "certificate {id} is not in the CA's trust domain {trust_domain}"
            )));
        }
        let not_after = not_after(leaf).map_err(bad)?;
        // The key must match the certificate: rustls checks this when building a config.
        let identity = Identity {
            id,
            ca_ders: Arc::new(ca),
            chain,
            key: Arc::new(key),
            roots: Arc::new(roots),
            trust_domain,
            not_after,
        };
        identity.server_config(&[Role::Agent])?;
        Ok(identity)
    }

    /// A secret derived from our private key for `purpose`: stable across restarts, useless to
    /// anyone without the key.
    pub fn derive_secret(&self, purpose: &str) -> [u8; 32] {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.key.secret_der());
        let tag = ring::hmac::sign(&key, format!("ztna/1 {purpose}").as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(&tag.as_ref()[..32]);
        out
    }

    /// Seconds since the epoch of our certificate's notAfter.
    pub fn expiry_unix(&self) -> f64 {
        self.not_after
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    }

    /// rustls server config requiring clients with one of `client_roles`.
    pub fn server_config(
        &self,
        client_roles: &[Role],
    ) -> Result<rustls::ServerConfig, IdentityError> {
        let provider = provider();
        let inner =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                .build()
                .map_err(|e| IdentityError::Tls(e.to_string()))?;
        let verifier = Arc::new(SpiffeClientVerifier {
            inner,
            ca_ders: self.ca_ders.clone(),
            trust_domain: self.trust_domain.clone(),
            roles: client_roles.to_vec(),
        });
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| IdentityError::Tls(format!("certificate and key do not match: {e}")))?;
        cfg.alpn_protocols = vec![ztna_proto::ALPN.to_vec()];
        Ok(cfg)
    }

    /// rustls client config that presents our certificate and accepts only a server with
    /// `server_role` in our trust domain.
    pub fn client_config(&self, server_role: Role) -> Result<rustls::ClientConfig, IdentityError> {
        let provider = provider();
        let verifier = Arc::new(SpiffeServerVerifier {
            roots: self.roots.clone(),
            ca_ders: self.ca_ders.clone(),
            trust_domain: self.trust_domain.clone(),
            role: server_role,
            provider: provider.clone(),
        });
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| IdentityError::Tls(format!("certificate and key do not match: {e}")))?;
        cfg.alpn_protocols = vec![ztna_proto::ALPN.to_vec()];
        Ok(cfg)
    }
}

/// Verifies `leaf` against `roots` the way a peer does for `role` (serverAuth for
/// intermediates, clientAuth otherwise), at `now`. No intermediate certificates are used: ztna-pki
/// issues leaves directly from the deployment CA, and a sub-CA the CA signed must not be able to
/// mint identities (the root's pathlen:0 says so, and this enforces it).
fn verify_chain(
    roots: &Arc<RootCertStore>,
    leaf: &CertificateDer<'_>,
    role: Role,
    now: UnixTime,
) -> Result<(), rustls::Error> {
    let provider = provider();
    if role == Role::Intermediate {
        let cert = ParsedCertificate::try_from(leaf)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            &[],
            now,
            provider.signature_verification_algorithms.all,
        )
    } else {
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?
            .verify_client_cert(leaf, &[], now)
            .map(|_| ())
    }
}

/// Certificates refused before the handshake completes are logged at most once a second: anyone
/// can present one, as often as they like.
const REFUSED_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The SPIFFE ID a refused certificate claims, for the log: unverified (anyone can put any ID in
/// a certificate of their own), so it is named `claimed_peer`, and cut to 128 characters.
fn claimed(end_entity: &CertificateDer<'_>) -> String {
    let who = SpiffeId::from_cert(end_entity)
        .map(|i| i.to_string())
        .unwrap_or_else(|e| e);
    match who.char_indices().nth(128) {
        Some((cut, _)) => format!("{}…", &who[..cut]),
        None => who,
    }
}

/// Logs a peer chain that carries certificates other than our CA: they are not used (see
/// [`verify_chain`]), so a leaf issued by a sub-CA fails as "unknown issuer".
fn note_foreign_intermediates(
    roots: &[CertificateDer<'static>],
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) {
    if intermediates
        .iter()
        .any(|c| !roots.iter().any(|r| r.as_ref() == c.as_ref()))
    {
        crate::warn_limited!(REFUSED_LOG_EVERY, claimed_peer = %claimed(end_entity), "peer chain holds a CA certificate other than our deployment CA; it is ignored: only certificates issued directly by the deployment CA are accepted");
    }
}

fn spiffe_check(
    der: &CertificateDer<'_>,
    trust_domain: &str,
    roles: &[Role],
) -> Result<SpiffeId, rustls::Error> {
    let id = SpiffeId::from_cert(der).map_err(|e| {
        crate::warn_limited!(REFUSED_LOG_EVERY, error = %e, "refused peer certificate");
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
            VerifyError(e),
        ))))
    })?;
    if id.trust_domain != trust_domain || !roles.contains(&id.role) {
        let want: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        crate::warn_limited!(REFUSED_LOG_EVERY, peer = %id, expected_roles = ?want, %trust_domain, "refused peer: wrong role or trust domain");
        return Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ));
    }
    Ok(id)
}

#[derive(Debug)]
struct VerifyError(String);
impl std::fmt::Display for VerifyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for VerifyError {}

#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    ca_ders: Arc<Vec<CertificateDer<'static>>>,
    trust_domain: String,
    roles: Vec<Role>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        note_foreign_intermediates(&self.ca_ders, end_entity, intermediates);
        // No intermediates: only leaves issued directly by the deployment CA (see verify_chain).
        if let Err(e) = self.inner.verify_client_cert(end_entity, &[], now) {
            crate::warn_limited!(REFUSED_LOG_EVERY, claimed_peer = %claimed(end_entity), error = %e, "refused client certificate");
            return Err(e);
        }
        spiffe_check(end_entity, &self.trust_domain, &self.roles)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    ca_ders: Arc<Vec<CertificateDer<'static>>>,
    trust_domain: String,
    role: Role,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Chain + validity + serverAuth EKU; the DNS name is deliberately not checked: the
        // server is identified by its SPIFFE role, so `intermediates = ["203.0.113.7:4433"]` works.
        // No intermediates: only leaves issued directly by the deployment CA (see verify_chain).
        note_foreign_intermediates(&self.ca_ders, end_entity, intermediates);
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            &[],
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        spiffe_check(end_entity, &self.trust_domain, &[self.role])?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The SPIFFE ID of the peer of an established connection (already verified by the handshake).
pub fn peer_id(conn: &quinn::Connection) -> Option<SpiffeId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    SpiffeId::from_cert(certs.first()?).ok()
}

/// Explains a failed connection in words an operator understands, in particular TLS alerts the
/// other side sent while refusing our certificate.
pub fn describe_connection_error(e: &quinn::ConnectionError) -> String {
    use quinn::ConnectionError as E;
    match e {
        E::ConnectionClosed(close) => {
            let code = u64::from(close.error_code);
            if (0x100..0x200).contains(&code) {
                let alert = (code - 0x100) as u8;
                format!(
                    "refused by peer during TLS handshake: {}",
                    alert_text(alert)
                )
            } else {
                format!("closed by peer: {close}")
            }
        }
        E::TransportError(t) => {
            let code = u64::from(t.code);
            if (0x100..0x200).contains(&code) {
                format!(
                    "TLS handshake failed: {} ({})",
                    alert_text((code - 0x100) as u8),
                    t.reason
                )
            } else {
                format!("transport error: {t}")
            }
        }
        E::ApplicationClosed(app) => {
            let code = u64::from(app.error_code);
            let reason = String::from_utf8_lossy(&app.reason);
            format!(
                "closed by peer ({}): {reason}",
                ztna_proto::codes::name(code)
            )
        }
        E::TimedOut => "timed out (peer unreachable or not answering)".to_string(),
        other => other.to_string(),
    }
}

fn alert_text(alert: u8) -> &'static str {
    match alert {
        42 => "bad certificate",
        43 => "unsupported certificate (wrong key usage)",
        44 => "certificate revoked",
        45 => "certificate expired or not yet valid",
        46 => "certificate rejected (no valid SPIFFE ID)",
        48 => "certificate not issued by the deployment CA (unknown CA)",
        49 => "access denied (wrong role or trust domain for this peer)",
        51 => "certificate signature check failed (not issued by the deployment CA)",
        116 => "certificate required",
        120 => "no common application protocol (ALPN ztna/1)",
        _ => "TLS alert",
    }
}

/// The certificate chain the peer of an established connection presented (leaf first).
pub fn peer_chain(conn: &quinn::Connection) -> Vec<CertificateDer<'static>> {
    conn.peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|b| *b)
        .unwrap_or_default()
}

/// notAfter of a certificate, if it parses.
pub fn cert_not_after(der: &[u8]) -> Option<SystemTime> {
    not_after(der).ok()
}

impl Identity {
    /// Checks a client's chain (leaf first) as a new handshake would now: it must chain to our
    /// current CA, be valid at this moment and carry a SPIFFE ID with one of `roles` in our trust
    /// domain. Used to re-verify established peers after the CA changed.
    pub fn verify_client_chain(
        &self,
        chain: &[CertificateDer<'static>],
        roles: &[Role],
    ) -> Result<SpiffeId, String> {
        let leaf = chain.first().ok_or_else(|| "no certificate".to_string())?;
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| e.to_string())?;
        // The leaf alone, as the handshake does (see `verify_chain`): the rest of a chain a peer
        // sends must not let a sub-CA's leaves in.
        verifier
            .verify_client_cert(leaf, &[], UnixTime::now())
            .map_err(|e| match e {
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
                | rustls::Error::InvalidCertificate(CertificateError::BadSignature) => {
                    "certificate not issued by the deployment CA".to_string()
                }
                rustls::Error::InvalidCertificate(CertificateError::Expired) => {
                    "certificate expired".to_string()
                }
                other => other.to_string(),
            })?;
        spiffe_check(leaf, &self.trust_domain, roles)
            .map_err(|_| "wrong role or trust domain".to_string())
    }
}

/// Signature schemes tickets are signed with, in order of preference (whatever the key is).
const SIGNING_SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
];

impl Identity {
    /// Signs `msg` with our certificate's key; returns the TLS SignatureScheme code and the
    /// signature (used for direct-path tickets, verified with [`verify_signature`]).
    pub fn sign(&self, msg: &[u8]) -> Result<(u16, Vec<u8>), IdentityError> {
        let key = provider()
            .key_provider
            .load_private_key(self.key.clone_key())
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        let signer = key
            .choose_scheme(SIGNING_SCHEMES)
            .ok_or_else(|| IdentityError::Tls("key cannot sign tickets".to_string()))?;
        let sig = signer
            .sign(msg)
            .map_err(|e| IdentityError::Tls(e.to_string()))?;
        Ok((u16::from(signer.scheme()), sig))
    }
}

/// Checks that `sig` over `msg` was made with the key of `cert` using `scheme`.
pub fn verify_signature(
    cert: &CertificateDer<'_>,
    scheme: u16,
    msg: &[u8],
    sig: &[u8],
) -> Result<(), String> {
    let alg: &dyn rustls_pki_types::SignatureVerificationAlgorithm =
        match SignatureScheme::from(scheme) {
            SignatureScheme::ECDSA_NISTP256_SHA256 => webpki::ring::ECDSA_P256_SHA256,
            SignatureScheme::ECDSA_NISTP384_SHA384 => webpki::ring::ECDSA_P384_SHA384,
            SignatureScheme::ED25519 => webpki::ring::ED25519,
            SignatureScheme::RSA_PSS_SHA256 => webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
            other => return Err(format!("unsupported signature scheme {other:?}")),
        };
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|e| format!("bad certificate: {e}"))?;
    ee.verify_signature(alg, msg, sig)
        .map_err(|e| format!("bad signature: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_spiffe_ids() {
        let id = SpiffeId::parse("spiffe://corp.example/connector/web-1").unwrap();
        assert_eq!(id.role, Role::Connector);
        assert_eq!(id.name, "web-1");
        assert_eq!(id.to_string(), "spiffe://corp.example/connector/web-1");
        for bad in [
            "https://corp.example/agent/a",
            "spiffe://corp.example/agent",
            "spiffe://corp.example/agent/a/b",
            "spiffe://corp.example/admin/a",
            "spiffe://Corp.Example/agent/a",
            "spiffe://corp.example/agent/",
            "spiffe://corp.example/agent/a b",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
