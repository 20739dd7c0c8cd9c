//! What a connector trusts and shows: the roots that verify the router's certificate (a
//! file, PEM in memory, or the system's), and the client certificate it presents when the
//! router verifies clients (mTLS, `auth.client_ca`).

use std::path::PathBuf;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::{tls_error, ClientError, Connector, ALPN};

/// Where the roots that verify the router's certificate come from.
#[derive(Clone, Debug)]
pub enum TrustRoots {
    /// The PEM CA certificates in a file (a development router's `DATA_DIR/tls/ca.pem`).
    File(PathBuf),
    /// PEM CA certificates in memory.
    Pem(Vec<u8>),
    /// The system's trust store (for a router whose certificate a public or enterprise CA
    /// the system trusts signed).
    System,
}

/// A PEM certificate chain and its private key, from files or memory.
#[derive(Clone)]
enum ClientCertificate {
    Files { chain: PathBuf, key: PathBuf },
    Pem { chain: Vec<u8>, key: Vec<u8> },
}

/// How to make a [`Connector`]: `Connector::builder("router.example").trust_file(ca)
/// .client_certificate_files(cert, key).build()`.
#[derive(Clone)]
pub struct ConnectorBuilder {
    pub(crate) server_name: String,
    roots: TrustRoots,
    client_certificate: Option<ClientCertificate>,
    pub(crate) alpn: Vec<u8>,
    pub(crate) idle_timeout: std::time::Duration,
}

impl std::fmt::Debug for ConnectorBuilder {
    // The key is not shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectorBuilder")
            .field("server_name", &self.server_name)
            .field("roots", &self.roots)
            .field("client_certificate", &self.client_certificate.is_some())
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

impl ConnectorBuilder {
    pub(crate) fn new(server_name: &str) -> Self {
        ConnectorBuilder {
            server_name: server_name.to_owned(),
            roots: TrustRoots::System,
            client_certificate: None,
            alpn: ALPN.to_vec(),
            idle_timeout: std::time::Duration::from_secs(30),
        }
    }

    /// Trusts the PEM CA certificates in `path`.
    pub fn trust_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.roots = TrustRoots::File(path.into());
        self
    }

    /// Trusts the PEM CA certificates in `pem`.
    pub fn trust_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.roots = TrustRoots::Pem(pem.into());
        self
    }

    /// Trusts the system's roots (the default).
    pub fn trust_system(mut self) -> Self {
        self.roots = TrustRoots::System;
        self
    }

    /// Presents the PEM certificate chain in `chain` (the client's own first) with the
    /// PEM private key in `key` when the router asks for one (mTLS).
    pub fn client_certificate_files(
        mut self,
        chain: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        self.client_certificate = Some(ClientCertificate::Files {
            chain: chain.into(),
            key: key.into(),
        });
        self
    }

    /// [`ConnectorBuilder::client_certificate_files`] from PEM in memory.
    pub fn client_certificate_pem(
        mut self,
        chain: impl Into<Vec<u8>>,
        key: impl Into<Vec<u8>>,
    ) -> Self {
        self.client_certificate = Some(ClientCertificate::Pem {
            chain: chain.into(),
            key: key.into(),
        });
        self
    }

    /// How long a connection may go without hearing from the router before it is taken
    /// for dead (30 s by default; at least 1 s). A router that vanishes without closing
    /// (a crash, a lost host) is noticed after this long, so a `ResilientClient` over
    /// several routers fails over after it. Keep-alives go out every third of it or every
    /// 5 s, whichever is sooner. The router's own idle timeout applies too (the lower of
    /// the two wins).
    pub fn idle_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.idle_timeout = timeout.max(std::time::Duration::from_secs(1));
        self
    }

    /// Offers another ALPN id than swarmbus's (tests of refusal use this).
    pub fn alpn(mut self, alpn: &[u8]) -> Self {
        self.alpn = alpn.to_vec();
        self
    }

    /// The connector: reads the roots and the client certificate, binds a UDP socket.
    /// Must be called within a tokio runtime, which drives its connections.
    pub fn build(self) -> Result<Connector, ClientError> {
        Connector::from_builder(self)
    }

    /// The roots, and the client certificate chain and key, read.
    pub(crate) fn tls_material(&self) -> Result<TlsMaterial, ClientError> {
        let roots = self.roots()?;
        let certificate = match &self.client_certificate {
            None => None,
            Some(ClientCertificate::Files { chain, key }) => {
                let chain_pem = std::fs::read(chain)
                    .map_err(|e| tls_error(format!("reading {}: {e}", chain.display())))?;
                let key_pem = std::fs::read(key)
                    .map_err(|e| tls_error(format!("reading {}: {e}", key.display())))?;
                Some(parse_client_certificate(&chain_pem, &key_pem)?)
            }
            Some(ClientCertificate::Pem { chain, key }) => {
                Some(parse_client_certificate(chain, key)?)
            }
        };
        Ok((roots, certificate))
    }

    fn roots(&self) -> Result<rustls::RootCertStore, ClientError> {
        let mut roots = rustls::RootCertStore::empty();
        let (certs, source) = match &self.roots {
            TrustRoots::File(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| tls_error(format!("reading {}: {e}", path.display())))?;
                (
                    parse_certificates(&pem, &path.display().to_string())?,
                    path.display().to_string(),
                )
            }
            TrustRoots::Pem(pem) => (
                parse_certificates(pem, "the trusted PEM")?,
                "the trusted PEM".to_owned(),
            ),
            TrustRoots::System => {
                let found = rustls_native_certs::load_native_certs();
                if found.certs.is_empty() {
                    let why = found
                        .errors
                        .first()
                        .map(|error| format!(": {error}"))
                        .unwrap_or_default();
                    return Err(tls_error(format!(
                        "the system's trust store has no certificate{why}"
                    )));
                }
                // A store with some unreadable entries still verifies with the rest.
                let (added, _ignored) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(tls_error(
                        "no certificate of the system's trust store parses",
                    ));
                }
                return Ok(roots);
            }
        };
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| tls_error(format!("{source}: {e}")))?;
        }
        Ok(roots)
    }
}

/// Trust roots, and the client certificate chain with its key.
pub(crate) type TlsMaterial = (
    rustls::RootCertStore,
    Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
);

fn parse_certificates(
    pem: &[u8],
    source: &str,
) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(format!("parsing {source}: {e}")))?;
    if certs.is_empty() {
        return Err(tls_error(format!("no certificate in {source}")));
    }
    Ok(certs)
}

fn parse_client_certificate(
    chain: &[u8],
    key: &[u8],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ClientError> {
    let chain = parse_certificates(chain, "the client certificate chain")?;
    let key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| tls_error(format!("parsing the client certificate's key: {e}")))?;
    Ok((chain, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unreadable_roots_and_client_certificates_are_tls_errors() {
        let refused = [
            Connector::builder("x").trust_pem(b"not pem".to_vec()),
            Connector::builder("x").trust_file("/nonexistent/ca.pem"),
            Connector::builder("x")
                .trust_pem(CA.as_bytes())
                .client_certificate_pem(CA.as_bytes(), b"no key".to_vec()),
            Connector::builder("x")
                .trust_pem(CA.as_bytes())
                .client_certificate_files("/nonexistent/c.pem", "/nonexistent/k.pem"),
        ];
        for builder in refused {
            let error = builder.clone().build().unwrap_err();
            assert!(
                matches!(error, ClientError::Tls { .. }),
                "{builder:?}: {error}"
            );
        }
        Connector::builder("x")
            .trust_pem(CA.as_bytes())
            .build()
            .unwrap();
    }

    /// A self-signed CA certificate (openssl), for parsing only.
    const CA: &str = "-----BEGIN CERTIFICATE-----
MIIBcDCCARegAwIBAgIUPU4G42TsSdIE7kpUs2S9+w9kn8IwCgYIKoZIzj0EAwIw
DTELMAkGA1UEAwwCY2EwIBcNMjYxMjAyMDIyMzM1WhgPMjEyNjExMDgwMjIzMzVa
MA0xCzAJBgNVBAMMAmNhMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEC4VQJ16P
K2mffJeOSpjPi87G4quvRsVR85RslPjgHVmqhHAop/VAXZeVIrzKMFfWbtnPSyer
Z6h3vM7uzkj0saNTMFEwHQYDVR0OBBYEFNbZDbEM1fqdMO0v6SCxohBhbjs6MB8G
A1UdIwQYMBaAFNbZDbEM1fqdMO0v6SCxohBhbjs6MA8GA1UdEwEB/wQFMAMBAf8w
CgYIKoZIzj0EAwIDRwAwRAIgLTWMiB7X4r5jt8Hnkz6NlaIAju8sLmvg8rk9iVm/
cAACIHBxgmwdmtznEV8hHG/Kzh9hAhN7+53EgeaXJZ/P7kJZ
-----END CERTIFICATE-----
";
}
