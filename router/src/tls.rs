//! TLS material for the QUIC endpoint.
//!
//! With no certificate configured the router runs on a development CA that it creates once
//! under `DATA_DIR/tls/` (rcgen) and reuses on every restart:
//! `ca.pem` (give this to clients), `ca-key.pem`, `server.pem`, `server-key.pem`.
//! Key files are written with mode 0600.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::RouterError;

/// Names the development server certificate is valid for.
pub const DEV_SERVER_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Paths of the development TLS files under a data dir.
#[derive(Clone, Debug)]
pub struct DevTlsPaths {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl DevTlsPaths {
    pub fn under(data_dir: &Path) -> Self {
        let dir = data_dir.join("tls");
        DevTlsPaths {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca-key.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            dir,
        }
    }
}

fn tls_error(context: impl Into<String>, err: impl std::fmt::Display) -> RouterError {
    RouterError::Tls {
        context: context.into(),
        detail: err.to_string(),
    }
}

fn ca_params() -> CertificateParams {
    // Deterministic parameters: the issuer can be rebuilt from them and the stored CA key.
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "swarmbus development CA");
    name.push(DnType::OrganizationName, "swarmbus");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn write_private(path: &Path, contents: &str) -> Result<(), RouterError> {
    write_private_file(path, contents)
        .map_err(|e| tls_error(format!("writing {}", path.display()), e))
}

/// Writes a file only its owner may read (private keys).
pub(crate) fn write_private_file(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    // A file that was there keeps the mode it had: narrow it too.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(contents.as_bytes())
}

fn write_public(path: &Path, contents: &str) -> Result<(), RouterError> {
    std::fs::write(path, contents).map_err(|e| tls_error(format!("writing {}", path.display()), e))
}

/// Makes sure the development CA and server certificate exist under `data_dir`, creating
/// what is missing. An existing CA is kept, so clients that trust `ca.pem` keep working.
pub fn ensure_dev_tls(data_dir: &Path) -> Result<DevTlsPaths, RouterError> {
    let paths = DevTlsPaths::under(data_dir);
    std::fs::create_dir_all(&paths.dir)
        .map_err(|e| tls_error(format!("creating {}", paths.dir.display()), e))?;
    let have_ca = paths.ca_cert.exists() && paths.ca_key.exists();
    let have_server = paths.server_cert.exists() && paths.server_key.exists();
    if have_server && paths.ca_cert.exists() {
        return Ok(paths);
    }
    if paths.ca_cert.exists() && !have_ca {
        // Making a new CA would silently break every client that trusts the old ca.pem.
        return Err(tls_error(
            format!(
                "re-issuing the server certificate under {}",
                paths.dir.display()
            ),
            "ca.pem exists but ca-key.pem is missing; restore ca-key.pem, or remove the tls \
             directory to create a new development CA (clients must then trust the new ca.pem)",
        ));
    }
    let ca_key = if have_ca {
        let pem = std::fs::read_to_string(&paths.ca_key)
            .map_err(|e| tls_error(format!("reading {}", paths.ca_key.display()), e))?;
        KeyPair::from_pem(&pem).map_err(|e| tls_error("parsing the CA key", e))?
    } else {
        let key = KeyPair::generate().map_err(|e| tls_error("generating the CA key", e))?;
        let cert = ca_params()
            .self_signed(&key)
            .map_err(|e| tls_error("signing the CA certificate", e))?;
        write_private(&paths.ca_key, &key.serialize_pem())?;
        write_public(&paths.ca_cert, &cert.pem())?;
        tracing::info!(path = %paths.ca_cert.display(), "created a development CA");
        key
    };
    let issuer = Issuer::new(ca_params(), ca_key);
    let server_key = KeyPair::generate().map_err(|e| tls_error("generating the server key", e))?;
    let mut params = CertificateParams::new(DEV_SERVER_NAMES.map(String::from).to_vec())
        .map_err(|e| tls_error("server certificate names", e))?;
    params
        .distinguished_name
        .push(DnType::CommonName, "swarmbus router (development)");
    let server_cert = params
        .signed_by(&server_key, &issuer)
        .map_err(|e| tls_error("signing the server certificate", e))?;
    write_private(&paths.server_key, &server_key.serialize_pem())?;
    write_public(&paths.server_cert, &server_cert.pem())?;
    Ok(paths)
}

/// Reads a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, RouterError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_error(format!("reading {}", path.display()), e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(format!("parsing {}", path.display()), e))?;
    if certs.is_empty() {
        return Err(tls_error(
            format!("reading {}", path.display()),
            "no certificate in file",
        ));
    }
    Ok(certs)
}

/// Reads a PEM private key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, RouterError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| tls_error(format!("reading {}", path.display()), e))
}

/// The certificate chain and key the router serves, read from their files.
#[derive(Debug)]
pub struct ServerIdentity {
    pub certs: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl ServerIdentity {
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, RouterError> {
        Ok(ServerIdentity {
            certs: load_certs(cert_path)?,
            key: load_key(key_path)?,
        })
    }
}

/// The rustls server configuration: TLS 1.3 only (QUIC), ALPN `swarmbus/1` only, so a
/// client offering any other protocol is refused during the handshake. With `clients`
/// (`auth.client_ca`), a client may present a certificate and must then present one that
/// verifier accepts; a client without one is still served (its Hello must then carry a
/// credential).
pub fn server_config(
    identity: &ServerIdentity,
    clients: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> Result<quinn::ServerConfig, RouterError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_error("TLS versions", e))?;
    let builder = match clients {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut tls = builder
        .with_single_cert(identity.certs.clone(), identity.key.clone_key())
        .map_err(|e| tls_error("server certificate and key", e))?;
    tls.alpn_protocols = vec![swarmbus_schema::ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| tls_error("QUIC TLS configuration", e))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}

/// The verifier of client certificates (mTLS): signed by one of the CA certificates in
/// `ca_path`, and not revoked by the CRLs in `crl_paths` (PEM; every CA of a chain needs
/// its CRL once any is given, or its certificates are refused as of unknown status). Clients
/// without a certificate are let through to the Hello, which must then carry a credential.
pub fn client_verifier(
    ca_path: &Path,
    crl_paths: &[PathBuf],
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, RouterError> {
    use rustls::pki_types::CertificateRevocationListDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca_path)? {
        roots
            .add(cert)
            .map_err(|e| tls_error(format!("auth.client_ca {}", ca_path.display()), e))?;
    }
    let mut crls = Vec::new();
    for path in crl_paths {
        let before = crls.len();
        for crl in CertificateRevocationListDer::pem_file_iter(path)
            .map_err(|e| tls_error(format!("reading {}", path.display()), e))?
        {
            crls.push(crl.map_err(|e| tls_error(format!("parsing {}", path.display()), e))?);
        }
        if crls.len() == before {
            return Err(tls_error(
                format!("reading {}", path.display()),
                "no CRL in file (PEM, -----BEGIN X509 CRL-----)",
            ));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .with_crls(crls)
        .allow_unauthenticated()
        .build()
        .map_err(|e| tls_error("auth.client_ca and auth.client_crls", e))
}

#[cfg(test)]
mod reset_key_tests {
    use super::*;

    #[test]
    fn the_stateless_reset_key_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let sign = |key: &ring::hmac::Key| ring::hmac::sign(key, b"cid").as_ref().to_vec();
        let (first, first_cid) = stateless_reset_key(dir.path()).unwrap();
        let (again, again_cid) = stateless_reset_key(dir.path()).unwrap();
        assert_eq!(sign(&first), sign(&again));
        assert_eq!(first_cid, again_cid);
        std::fs::write(dir.path().join("stateless-reset.key"), "zz").unwrap();
        assert!(stateless_reset_key(dir.path()).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_ca_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure_dev_tls(dir.path()).unwrap();
        let ca = std::fs::read(&first.ca_cert).unwrap();
        let server = std::fs::read(&first.server_cert).unwrap();
        let again = ensure_dev_tls(dir.path()).unwrap();
        assert_eq!(std::fs::read(&again.ca_cert).unwrap(), ca);
        assert_eq!(std::fs::read(&again.server_cert).unwrap(), server);
        // A lost server certificate is re-issued by the same CA.
        std::fs::remove_file(&again.server_cert).unwrap();
        let reissued = ensure_dev_tls(dir.path()).unwrap();
        assert_eq!(std::fs::read(&reissued.ca_cert).unwrap(), ca);
        assert_ne!(std::fs::read(&reissued.server_cert).unwrap(), server);
        server_config(
            &ServerIdentity::load(&reissued.server_cert, &reissued.server_key).unwrap(),
            None,
        )
        .unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for key in [&reissued.ca_key, &reissued.server_key] {
                let mode = std::fs::metadata(key).unwrap().permissions().mode();
                assert_eq!(mode & 0o077, 0, "{} readable by others", key.display());
            }
        }
        // Without the CA key a lost server certificate is an error, not a new CA.
        std::fs::remove_file(&reissued.ca_key).unwrap();
        std::fs::remove_file(&reissued.server_cert).unwrap();
        let err = ensure_dev_tls(dir.path()).unwrap_err();
        assert!(err.to_string().contains("ca-key.pem is missing"), "{err}");
        assert_eq!(std::fs::read(&reissued.ca_cert).unwrap(), ca);
    }
}

/// The key of the router's QUIC stateless resets, kept in `DATA_DIR/stateless-reset.key`
/// (created on first start, mode 0600). Because it survives restarts, a client whose
/// connection the previous process held (a crash, or a close packet lost) gets a valid
/// stateless reset from the new process at its next packet and reconnects at once, instead
/// of waiting out its idle timeout.
///
/// Returns the HMAC key of the reset tokens and the key of the connection id generator:
/// the restarted process must recognise the old connection ids as its own too, or it drops
/// their packets instead of resetting them.
pub fn stateless_reset_key(data_dir: &Path) -> Result<(ring::hmac::Key, u64), RouterError> {
    let path = data_dir.join("stateless-reset.key");
    let secret = match std::fs::read_to_string(&path) {
        Ok(text) => decode_hex(text.trim())
            .filter(|secret| secret.len() == 32)
            .ok_or_else(|| {
                tls_error(
                    format!("reading {}", path.display()),
                    "not 64 hex digits; remove it to make a new one",
                )
            })?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
                .map_err(|_| tls_error("generating the stateless reset key", "no randomness"))?;
            let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
            write_private(&path, &format!("{hex}\n"))?;
            secret.to_vec()
        }
        Err(error) => return Err(tls_error(format!("reading {}", path.display()), error)),
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
    let tag = ring::hmac::sign(&key, b"swarmbus connection ids");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&tag.as_ref()[..8]);
    Ok((key, u64::from_le_bytes(cid_key)))
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}
