//! TLS for every link: loading PEM files into rustls configurations (ring provider only), turning
//! handshake failures into messages that say what to check, and generating a local CA with
//! participant certificates (`fedmq certs`).
//!
//! Who uses what:
//! - MQTT sessions ([`crate::transport::SessionOptions::tls`]): [`client_config`] from the CA that
//!   signed the broker's certificate, plus a client certificate for mutual TLS.
//! - The S3 client ([`crate::store::S3Options::ca_path`]): the CA bundle is handed to the SDK's
//!   own rustls client (ring), after [`load_roots`] has checked it.
//! - The embedded store ([`crate::store::StoreTls`]): [`server_config`].
//! - The embedded broker: rumqttd reads its certificate files itself; [`load_certs`] and
//!   [`load_key`] check them first so that a bad path fails at start-up with its name.
//!
//! Design: one crypto provider, ring, passed explicitly to every configuration
//! ([`crypto_provider`]). Nothing here relies on rustls' process-wide default provider, and
//! aws-lc is not in the dependency tree.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore, ServerConfig};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Why a TLS configuration could not be built, or certificates not generated.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        /// What the file should hold ("CA certificate", "private key", ...).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A PEM file does not hold what it should.
    #[error("{what} {}: {reason}", path.display())]
    Invalid {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The certificates and keys do not make a usable configuration (e.g. key and certificate
    /// do not match).
    #[error("TLS configuration: {0}")]
    Config(String),
    /// Certificate generation failed (`fedmq certs`).
    #[error("generating certificates: {0}")]
    Generate(String),
    /// A file `fedmq certs` would write already exists.
    #[error("{} already exists; remove it or pass --force to overwrite", .0.display())]
    Exists(PathBuf),
    /// A generated file could not be written.
    #[error("writing {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, TlsError>;

/// The one crypto provider of every fedmq TLS configuration: ring.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn invalid(path: &Path, what: &'static str, reason: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        what,
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Every certificate of a PEM file (a chain: leaf first).
///
/// # Errors
/// [`TlsError::Read`], or [`TlsError::Invalid`] when the file holds no `CERTIFICATE` block or a
/// malformed one.
pub fn load_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, what, format!("malformed PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(
            path,
            what,
            "no PEM certificate (-----BEGIN CERTIFICATE-----) in the file",
        ));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
///
/// # Errors
/// [`TlsError::Read`], or [`TlsError::Invalid`] when the file holds no private key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    const WHAT: &str = "private key";
    let bytes = read(path, WHAT)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => invalid(
            path,
            WHAT,
            "no PEM private key (-----BEGIN PRIVATE KEY-----) in the file",
        ),
        e => invalid(path, WHAT, format!("malformed PEM: {e}")),
    })
}

/// The CA certificates of a PEM bundle as trust anchors.
///
/// # Errors
/// As [`load_certs`], and [`TlsError::Invalid`] when a certificate cannot be a trust anchor.
pub fn load_roots(path: &Path) -> Result<RootCertStore> {
    const WHAT: &str = "CA certificate";
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path, WHAT)? {
        roots
            .add(cert)
            .map_err(|e| invalid(path, WHAT, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// A certificate and its private key (PEM files), presented to the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// The leaf's private key.
    pub key: PathBuf,
}

/// A client configuration that trusts only the CAs in `ca` and, with `identity`, presents that
/// certificate (mutual TLS). TLS 1.2 and 1.3, ring.
///
/// # Errors
/// [`TlsError`] naming the file that is missing or invalid, or [`TlsError::Config`] when the key
/// does not match the certificate.
pub fn client_config(ca: &Path, identity: Option<&Identity>) -> Result<ClientConfig> {
    let roots = load_roots(ca)?;
    let builder = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some(id) => {
            let certs = load_certs(&id.cert, "client certificate")?;
            let key = load_key(&id.key)?;
            builder.with_client_auth_cert(certs, key).map_err(|e| {
                TlsError::Config(format!(
                    "client certificate {} with key {}: {e}",
                    id.cert.display(),
                    id.key.display()
                ))
            })
        }
    }
}

/// A server configuration presenting `identity`, without client authentication. TLS 1.2 and
/// 1.3, ring. `alpn`: the application protocols offered (e.g. `http/1.1`).
///
/// # Errors
/// As [`client_config`].
pub fn server_config(identity: &Identity, alpn: &[&[u8]]) -> Result<ServerConfig> {
    let certs = load_certs(&identity.cert, "server certificate")?;
    let key = load_key(&identity.key)?;
    let mut cfg = ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            TlsError::Config(format!(
                "server certificate {} with key {}: {e}",
                identity.cert.display(),
                identity.key.display()
            ))
        })?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// The rustls error somewhere in `err`'s source chain, looking inside `std::io::Error`s (whose
/// `source()` skips the error they wrap, which is where TLS streams put it).
pub fn find_rustls_error<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(r) = find_rustls_error(inner) {
                    return Some(r);
                }
            }
        }
        cur = e.source();
    }
    None
}

/// What a failed handshake means and what to check, for `peer` (e.g. "the MQTT broker
/// 10.0.0.5:8883") whose certificate should be signed by a CA in `ca` and valid for `host`.
/// `None` when `err` is not a TLS error.
pub fn explain_handshake(
    err: &(dyn std::error::Error + 'static),
    peer: &str,
    host: &str,
    ca: &Path,
) -> Option<String> {
    let e = find_rustls_error(err)?;
    let ca = ca.display();
    let hint = match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                "{peer}'s certificate is not signed by a CA in {ca}: check that {ca} is the CA \
                 that issued it"
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    "{peer}'s certificate is not valid for the host name {host:?}: connect with a \
                     name in its subject alternative names, or reissue it with {host} among them \
                     (fedmq certs --hosts)"
                )
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => format!(
                "{peer}'s certificate is expired or not yet valid: check its validity dates and \
                 both clocks"
            ),
            _ => format!("{peer}'s certificate was rejected (trust anchors: {ca})"),
        },
        rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied,
        ) => format!(
            "{peer} refused our client certificate: it requires mutual TLS; set a client \
             certificate and key signed by a CA that {peer} trusts"
        ),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            format!("{peer} does not speak TLS on this port (a plain-text listener?)")
        }
        _ => format!("check the TLS settings of both ends (trust anchors: {ca})"),
    };
    Some(format!("TLS handshake with {peer} failed ({e}): {hint}"))
}

// ---------------------------------------------------------------------------------------------
// Certificate generation (`fedmq certs`)

/// What `fedmq certs` generates.
#[derive(Debug, Clone)]
pub struct CertsPlan {
    /// Output directory (created when missing).
    pub out: PathBuf,
    /// Participant ids: one certificate each (`<id>.pem`, `<id>.key`).
    pub participants: Vec<String>,
    /// Host names and IP addresses put in the subject alternative names of the certificates
    /// that a peer connects to by address (`server`, `broker`, `store`).
    pub hosts: Vec<String>,
    /// Also issue `broker` and `store` certificates.
    pub infrastructure: bool,
    /// Validity of every certificate, from one hour ago.
    pub validity: Duration,
    /// Overwrite existing files.
    pub force: bool,
}

impl CertsPlan {
    /// Defaults: `broker` and `store` certificates too, hosts `127.0.0.1` and `localhost`,
    /// 365 days, no overwriting.
    pub fn new(out: impl Into<PathBuf>, participants: Vec<String>) -> Self {
        Self {
            out: out.into(),
            participants,
            hosts: vec!["127.0.0.1".into(), "localhost".into()],
            infrastructure: true,
            validity: Duration::from_secs(365 * 24 * 3600),
            force: false,
        }
    }

    /// Participants plus `broker` and `store` when asked, without duplicates, in order.
    pub fn subjects(&self) -> Vec<String> {
        let mut all: Vec<String> = Vec::new();
        let extra = ["broker", "store"];
        let infra = if self.infrastructure { &extra[..] } else { &[] };
        for id in self
            .participants
            .iter()
            .map(String::as_str)
            .chain(infra.iter().copied())
        {
            if !all.iter().any(|a| a == id) {
                all.push(id.to_string());
            }
        }
        all
    }
}

/// Names under which a participant's certificate is also valid as a server certificate.
fn serves(id: &str) -> bool {
    matches!(id, "server" | "broker" | "store")
}

/// Generates a CA (`ca.pem`, `ca.key`) and one certificate per subject of `plan`
/// (`<id>.pem`, `<id>.key`), each valid as TLS server and client certificate (both extended
/// key usages; subject alternative names from `plan.hosts` for `server`, `broker` and `store`).
/// Keys are ECDSA P-256, written with mode 0600. Returns the files written, in order.
///
/// For local and test use: the CA key lies next to the certificates it signed.
///
/// # Errors
/// [`TlsError::Exists`] before anything is written when a file exists and `force` is off;
/// [`TlsError::Generate`] for a bad id or host; [`TlsError::Write`].
pub fn generate_certs(plan: &CertsPlan) -> Result<Vec<PathBuf>> {
    let subjects = plan.subjects();
    if subjects.is_empty() {
        return Err(TlsError::Generate("no participants given".into()));
    }
    for id in &subjects {
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            || id.starts_with('.')
        {
            return Err(TlsError::Generate(format!(
                "participant id {id:?} must be non-empty and use only letters, digits, '-', '_' \
                 and '.' (it names the files)"
            )));
        }
        if id == "ca" {
            return Err(TlsError::Generate(
                "\"ca\" is reserved for the CA's own files".into(),
            ));
        }
    }
    let mut files: Vec<(PathBuf, bool)> = vec![
        (plan.out.join("ca.pem"), false),
        (plan.out.join("ca.key"), true),
    ];
    for id in &subjects {
        files.push((plan.out.join(format!("{id}.pem")), false));
        files.push((plan.out.join(format!("{id}.key")), true));
    }
    if !plan.force {
        if let Some((p, _)) = files.iter().find(|(p, _)| p.exists()) {
            return Err(TlsError::Exists(p.clone()));
        }
    }

    let gen = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let now = SystemTime::now();
    let not_before = time::OffsetDateTime::from(now - Duration::from_secs(3600));
    let not_after = time::OffsetDateTime::from(now + plan.validity);

    let mut ca_params = CertificateParams::default();
    // A distinct name per CA: a certificate from another fedmq CA is then reported as from an
    // unknown issuer rather than as a bad signature.
    ca_params.distinguished_name = dn(&format!("fedmq local CA {:08x}", rand::random::<u32>()));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    let ca_key = KeyPair::generate().map_err(gen)?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(gen)?;

    let mut contents: Vec<String> = vec![ca.pem(), ca_key_pem];
    for id in &subjects {
        let sans = if serves(id) {
            plan.hosts.clone()
        } else {
            Vec::new()
        };
        let mut params = CertificateParams::new(sans).map_err(|e| {
            TlsError::Generate(format!("subject alternative names {:?}: {e}", plan.hosts))
        })?;
        params.distinguished_name = dn(id);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate().map_err(gen)?;
        let cert = params.signed_by(&key, &ca).map_err(gen)?;
        contents.push(cert.pem());
        contents.push(key.serialize_pem());
    }

    std::fs::create_dir_all(&plan.out).map_err(|source| TlsError::Write {
        path: plan.out.clone(),
        source,
    })?;
    for ((path, secret), text) in files.iter().zip(&contents) {
        write_file(path, text.as_bytes(), *secret)?;
    }
    Ok(files.into_iter().map(|(p, _)| p).collect())
}

/// A subject with only a common name. Deliberately no organization (O): rumqttd, built with
/// client-certificate verification, would turn it into a tenant and prefix every topic with it.
fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Writes `bytes` to `path`; `secret` files get mode 0600 from creation on (Unix).
fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<()> {
    let err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        opts.mode(if secret { 0o600 } else { 0o644 });
        let mut f = opts.open(path).map_err(err)?;
        // An existing file (--force) keeps its old mode through `open`: set it explicitly.
        let mode = if secret { 0o600 } else { 0o644 };
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(err)?;
        f.write_all(bytes).map_err(err)
    }
    #[cfg(not(unix))]
    {
        let _ = secret;
        let mut f = opts.open(path).map_err(err)?;
        f.write_all(bytes).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificates_load_and_chain() {
        let dir = tempfile::tempdir().unwrap();
        let plan = CertsPlan::new(dir.path(), vec!["server".into(), "client-1".into()]);
        let files = generate_certs(&plan).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "ca.pem",
                "ca.key",
                "server.pem",
                "server.key",
                "client-1.pem",
                "client-1.key",
                "broker.pem",
                "broker.key",
                "store.pem",
                "store.key"
            ]
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for f in &files {
                let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
                let want = if f.extension().unwrap() == "key" {
                    0o600
                } else {
                    0o644
                };
                assert_eq!(mode, want, "{}", f.display());
            }
        }
        let id = Identity {
            cert: dir.path().join("client-1.pem"),
            key: dir.path().join("client-1.key"),
        };
        client_config(&dir.path().join("ca.pem"), Some(&id)).unwrap();
        let broker = Identity {
            cert: dir.path().join("broker.pem"),
            key: dir.path().join("broker.key"),
        };
        server_config(&broker, &[]).unwrap();
        // Refuses to overwrite, before writing anything.
        assert!(matches!(generate_certs(&plan), Err(TlsError::Exists(_))));
        let forced = CertsPlan {
            force: true,
            ..plan
        };
        generate_certs(&forced).unwrap();
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = load_roots(&missing).unwrap_err().to_string();
        assert!(
            e.contains("CA certificate") && e.contains("nope.pem"),
            "{e}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "hello").unwrap();
        let e = load_roots(&empty).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = load_key(&empty).unwrap_err().to_string();
        assert!(e.contains("no PEM private key"), "{e}");
    }

    #[test]
    fn bad_participant_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "../x", "a b", "ca"] {
            let plan = CertsPlan::new(dir.path(), vec![bad.into()]);
            assert!(
                matches!(generate_certs(&plan), Err(TlsError::Generate(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn handshake_errors_are_explained() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        let msg =
            explain_handshake(&io, "the MQTT broker h:1", "h", Path::new("/x/ca.pem")).unwrap();
        assert!(
            msg.contains("TLS handshake with the MQTT broker h:1 failed"),
            "{msg}"
        );
        assert!(msg.contains("/x/ca.pem"), "{msg}");
        let plain = std::io::Error::other("refused");
        assert!(explain_handshake(&plain, "p", "h", Path::new("c")).is_none());
    }
}
