//! Deployment CA creation and role certificate issuance for ZTNA.
//!
//! Every node identity is a SPIFFE URI SAN `spiffe://<trust-domain>/<role>/<name>`.
//! The CA certificate carries a single URI SAN `spiffe://<trust-domain>`, which is
//! how nodes learn the trust domain from the CA file.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, Ia5String, IsCa, KeyPair, KeyUsagePurpose, SanType,
    PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::GeneralName;

/// Roles a certificate can be issued for.
pub const ROLES: [&str; 3] = ["agent", "connector", "intermediate"];

const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("invalid trust domain {value:?}: {reason}")]
    InvalidTrustDomain { value: String, reason: &'static str },
    #[error("invalid name {value:?}: {reason}")]
    InvalidName { value: String, reason: &'static str },
    #[error("invalid role {0:?}: expected one of agent, connector, intermediate")]
    InvalidRole(String),
    #[error("invalid DNS name {0:?}: must be non-empty ASCII")]
    InvalidDns(String),
    #[error("invalid URI SAN {0:?}: must be ASCII")]
    InvalidUri(String),
    #[error("refusing to overwrite existing file {} (use --force)", .0.display())]
    AlreadyExists(PathBuf),
    #[error("{}: {error}", .path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid CA: {0}")]
    InvalidCa(String),
    #[error("certificate generation failed: {0}")]
    Rcgen(rcgen::Error),
    #[error("not a ZTNA certificate: {0}")]
    NotOurs(String),
}

impl From<rcgen::Error> for PkiError {
    fn from(e: rcgen::Error) -> Self {
        PkiError::Rcgen(e)
    }
}

/// Certificate validity window. `not_after` may lie in the past (expired certs for tests).
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From 5 minutes ago (clock skew allowance) until `n` days from now.
    pub fn days(n: u32) -> Validity {
        let now = OffsetDateTime::now_utc();
        let now = now.replace_nanosecond(0).unwrap_or(now);
        Validity {
            not_before: now - Duration::minutes(5),
            not_after: now + Duration::days(n.into()),
        }
    }
}

/// A deployment CA: certificate, private key and the trust domain it vouches for.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    trust_domain: String,
    /// Issuer view of the CA (same subject DN, key and key identifier as `cert_pem`).
    issuer: Certificate,
    key: KeyPair,
}

impl Ca {
    pub fn generate(trust_domain: &str, validity: Validity) -> Result<Ca, PkiError> {
        validate_trust_domain(trust_domain)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&format!("ZTNA CA {trust_domain}"));
        params.subject_alt_names = vec![uri_san(&format!("spiffe://{trust_domain}"))?];
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let issuer = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: issuer.pem(),
            key_pem: key.serialize_pem(),
            trust_domain: trust_domain.to_owned(),
            issuer,
            key,
        })
    }

    /// Loads `DIR/ca.pem` and `DIR/ca.key`.
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let read = |file: &str| {
            let path = dir.join(file);
            fs::read_to_string(&path).map_err(|error| PkiError::Io { path, error })
        };
        Ca::from_pem(&read(CA_CERT_FILE)?, &read(CA_KEY_FILE)?)
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let bad = |what: &str| PkiError::InvalidCa(what.to_owned());
        let key = KeyPair::from_pem(key_pem).map_err(|e| bad(&format!("CA key: {e}")))?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| bad(&format!("CA certificate PEM: {e}")))?;
        let cert = pem
            .parse_x509()
            .map_err(|e| bad(&format!("CA certificate: {e}")))?;
        if !cert.is_ca() {
            return Err(bad(
                "certificate is not a CA (basicConstraints CA:TRUE missing)",
            ));
        }
        if cert.public_key().raw != key.public_key_der().as_slice() {
            return Err(bad("private key does not match the CA certificate"));
        }
        let trust_domain = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .into_iter()
            .flat_map(|san| san.value.general_names.iter())
            .find_map(|gn| match gn {
                GeneralName::URI(u) => u.strip_prefix("spiffe://").filter(|td| !td.contains('/')),
                _ => None,
            })
            .ok_or_else(|| bad("certificate has no spiffe://<trust-domain> URI SAN"))?
            .to_owned();
        validate_trust_domain(&trust_domain)?;
        // Re-create the issuer: same DN, key and (pre-specified) key identifier as the original.
        let params = CertificateParams::from_ca_cert_pem(cert_pem)?;
        let issuer = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            trust_domain,
            issuer,
            key,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Writes `DIR/ca.pem` and `DIR/ca.key` (mode 0600), creating DIR if needed.
    pub fn write(&self, dir: &Path, force: bool) -> Result<(PathBuf, PathBuf), PkiError> {
        write_pair(
            dir,
            CA_CERT_FILE,
            &self.cert_pem,
            CA_KEY_FILE,
            &self.key_pem,
            force,
        )
    }

    pub fn issue(&self, req: &IssueRequest) -> Result<Issued, PkiError> {
        if !ROLES.contains(&req.role.as_str()) {
            return Err(PkiError::InvalidRole(req.role.clone()));
        }
        validate_name(&req.name)?;
        let spiffe_id = format!("spiffe://{}/{}/{}", self.trust_domain, req.role, req.name);
        let mut sans = vec![uri_san(&spiffe_id)?];
        for d in &req.dns {
            let ia5 = Ia5String::try_from(d.as_str())
                .ok()
                .filter(|_| !d.is_empty());
            sans.push(SanType::DnsName(
                ia5.ok_or_else(|| PkiError::InvalidDns(d.clone()))?,
            ));
        }
        sans.extend(req.ips.iter().map(|ip| SanType::IpAddress(*ip)));
        self.sign_leaf(&req.name, sans, spiffe_id, req.validity)
    }

    /// Test hook: issue a leaf with exactly these URI SANs (may be empty or malformed),
    /// no validation of them.
    pub fn issue_raw(
        &self,
        common_name: &str,
        uri_sans: &[String],
        validity: Validity,
    ) -> Result<Issued, PkiError> {
        let sans = uri_sans
            .iter()
            .map(|u| uri_san(u))
            .collect::<Result<_, _>>()?;
        let spiffe_id = uri_sans.first().cloned().unwrap_or_default();
        self.sign_leaf(common_name, sans, spiffe_id, validity)
    }

    fn sign_leaf(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        spiffe_id: String,
        validity: Validity,
    ) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name);
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let leaf = params.signed_by(&key, &self.issuer, &self.key)?;
        let mut cert_pem = leaf.pem();
        if !cert_pem.ends_with('\n') {
            cert_pem.push('\n');
        }
        cert_pem.push_str(&self.cert_pem);
        Ok(Issued {
            cert_pem,
            key_pem: key.serialize_pem(),
            spiffe_id,
            not_after: validity.not_after,
        })
    }
}

#[derive(Clone, Debug)]
pub struct IssueRequest {
    pub role: String,
    pub name: String,
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub validity: Validity,
}

impl IssueRequest {
    /// A request with no extra SANs, valid for 365 days.
    pub fn new(role: &str, name: &str) -> IssueRequest {
        IssueRequest {
            role: role.to_owned(),
            name: name.to_owned(),
            dns: Vec::new(),
            ips: Vec::new(),
            validity: Validity::days(365),
        }
    }
}

/// An issued leaf certificate and its private key.
pub struct Issued {
    /// Leaf certificate followed by the CA certificate.
    pub cert_pem: String,
    pub key_pem: String,
    pub spiffe_id: String,
    pub not_after: OffsetDateTime,
}

impl Issued {
    /// Writes `DIR/<name>.pem` and `DIR/<name>.key` (mode 0600), creating DIR if needed.
    pub fn write(
        &self,
        dir: &Path,
        name: &str,
        force: bool,
    ) -> Result<(PathBuf, PathBuf), PkiError> {
        validate_name(name)?;
        if name == "ca" {
            return Err(PkiError::InvalidName {
                value: name.to_owned(),
                reason: "ca.pem and ca.key are the CA's own files: writing a node's there would \
                         destroy the CA key; choose another --name",
            });
        }
        let (cert, key) = (format!("{name}.pem"), format!("{name}.key"));
        write_pair(dir, &cert, &self.cert_pem, &key, &self.key_pem, force)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), PkiError> {
    let err = |reason| {
        Err(PkiError::InvalidTrustDomain {
            value: td.to_owned(),
            reason,
        })
    };
    if td.contains("://") {
        return err(
            "must not include a scheme (give e.g. corp.example, not spiffe://corp.example)",
        );
    }
    if td.is_empty() || td.len() > 255 {
        return err("must be 1 to 255 characters long");
    }
    if !td
        .bytes()
        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_'))
    {
        return err("only lowercase letters, digits, '.', '-' and '_' are allowed");
    }
    Ok(())
}

fn validate_name(name: &str) -> Result<(), PkiError> {
    let err = |reason| {
        Err(PkiError::InvalidName {
            value: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 128 {
        return err("must be 1 to 128 characters long");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return err("only letters, digits, '.', '-' and '_' are allowed");
    }
    if name == "." || name == ".." {
        return err("'.' and '..' are not valid SPIFFE path segments");
    }
    Ok(())
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn uri_san(uri: &str) -> Result<SanType, PkiError> {
    Ia5String::try_from(uri)
        .map(SanType::URI)
        .map_err(|_| PkiError::InvalidUri(uri.to_owned()))
}

/// Writes a certificate file and a 0600 key file; with `force == false` neither is
/// written if either already exists.
fn write_pair(
    dir: &Path,
    cert_file: &str,
    cert_pem: &str,
    key_file: &str,
    key_pem: &str,
    force: bool,
) -> Result<(PathBuf, PathBuf), PkiError> {
    fs::create_dir_all(dir).map_err(|error| PkiError::Io {
        path: dir.to_owned(),
        error,
    })?;
    let (cert_path, key_path) = (dir.join(cert_file), dir.join(key_file));
    if !force {
        if let Some(p) = [&cert_path, &key_path].into_iter().find(|p| p.exists()) {
            return Err(PkiError::AlreadyExists(p.clone()));
        }
    }
    if !force {
        write_file(&key_path, key_pem, 0o600, false)?;
        write_file(&cert_path, cert_pem, 0o644, false)?;
        return Ok((cert_path, key_path));
    }
    // Replacing a pair a daemon may read at any moment: both are written in full beside the old
    // ones first, then renamed over them, so no one ever reads half a file, and a failed write
    // (disk full, permissions) leaves the old pair as it was.
    let new = |p: &Path| {
        let mut name = p.as_os_str().to_owned();
        name.push(".new");
        PathBuf::from(name)
    };
    let (cert_new, key_new) = (new(&cert_path), new(&key_path));
    let staged = write_file(&key_new, key_pem, 0o600, true)
        .and_then(|()| write_file(&cert_new, cert_pem, 0o644, true));
    if let Err(e) = staged {
        let _ = fs::remove_file(&key_new);
        let _ = fs::remove_file(&cert_new);
        return Err(e);
    }
    for (from, to) in [(&key_new, &key_path), (&cert_new, &cert_path)] {
        fs::rename(from, to).map_err(|error| PkiError::Io {
            path: to.clone(),
            error,
        })?;
    }
    Ok((cert_path, key_path))
}

fn write_file(path: &Path, contents: &str, mode: u32, force: bool) -> Result<(), PkiError> {
    let io_err = |error: std::io::Error| {
        if error.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::AlreadyExists(path.to_owned())
        } else {
            PkiError::Io {
                path: path.to_owned(),
                error,
            }
        }
    };
    let mut opts = OpenOptions::new();
    opts.write(true);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        opts.mode(mode);
        let file = opts.open(path).map_err(io_err)?;
        // `mode` only applies on creation; enforce it when overwriting too.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err)?;
        write_all(file, contents).map_err(io_err)
    }
    #[cfg(not(unix))]
    {
        let _ = mode;
        write_all(opts.open(path).map_err(io_err)?, contents).map_err(io_err)
    }
}

fn write_all(mut file: fs::File, contents: &str) -> std::io::Result<()> {
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

/// What `ztna-pki show` prints about a certificate.
#[derive(Clone, Debug)]
pub struct CertInfo {
    /// `spiffe://<td>/<role>/<name>` for a node, `spiffe://<td>` for the CA.
    pub spiffe_id: String,
    /// agent, connector or intermediate; `None` for the CA.
    pub role: Option<String>,
    pub name: Option<String>,
    pub trust_domain: String,
    pub is_ca: bool,
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub dns: Vec<String>,
    pub ips: Vec<String>,
    /// Certificates in the file (leaf + CA for an issued certificate).
    pub chain_len: usize,
}

/// Describes the first certificate of a PEM file written by this tool (a CA or a role
/// certificate). Anything else is [`PkiError::NotOurs`] with the reason.
pub fn describe(pem: &[u8]) -> Result<CertInfo, PkiError> {
    let not_ours = |m: String| PkiError::NotOurs(m);
    let blocks: Vec<_> = x509_parser::pem::Pem::iter_from_buffer(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| not_ours(format!("unreadable PEM: {e}")))?;
    let certs: Vec<_> = blocks.iter().filter(|b| b.label == "CERTIFICATE").collect();
    let first = certs
        .first()
        .ok_or_else(|| not_ours("the file holds no PEM certificate".into()))?;
    let cert = first
        .parse_x509()
        .map_err(|e| not_ours(format!("unparseable certificate: {e}")))?;
    let mut uris = Vec::new();
    let (mut dns, mut ips) = (Vec::new(), Vec::new());
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for gn in &san.value.general_names {
            match gn {
                GeneralName::URI(u) => uris.push(u.to_string()),
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                GeneralName::IPAddress(b) => ips.push(match b.len() {
                    4 => IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default()).to_string(),
                    16 => IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default()).to_string(),
                    _ => format!("{b:02x?}"),
                }),
                _ => {}
            }
        }
    }
    let spiffe: Vec<&String> = uris.iter().filter(|u| u.starts_with("spiffe://")).collect();
    let id = match spiffe.as_slice() {
        [one] => (*one).clone(),
        [] => return Err(not_ours("it has no spiffe:// URI SAN".into())),
        _ => return Err(not_ours("it has more than one spiffe:// URI SAN".into())),
    };
    let path = id.trim_start_matches("spiffe://");
    let parts: Vec<&str> = path.split('/').collect();
    let is_ca = cert.is_ca();
    let (trust_domain, role, name) = match (is_ca, parts.as_slice()) {
        (true, [td]) => (td.to_string(), None, None),
        (false, [td, role, name]) if ROLES.contains(role) && validate_name(name).is_ok() => (
            td.to_string(),
            Some(role.to_string()),
            Some(name.to_string()),
        ),
        _ => {
            return Err(not_ours(format!(
                "{id} is not spiffe://<trust-domain>/<agent|connector|intermediate>/<name> \
                 (or spiffe://<trust-domain> on a CA)"
            )))
        }
    };
    validate_trust_domain(&trust_domain).map_err(|e| not_ours(e.to_string()))?;
    let time = |t: x509_parser::time::ASN1Time| t.to_datetime();
    Ok(CertInfo {
        spiffe_id: id,
        role,
        name,
        trust_domain,
        is_ca,
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string(),
        not_before: time(cert.validity().not_before),
        not_after: time(cert.validity().not_after),
        dns,
        ips,
        chain_len: certs.len(),
    })
}
