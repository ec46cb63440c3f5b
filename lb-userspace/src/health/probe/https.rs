//! `type = "https"`: the HTTP check's GET over TLS (rustls, ring provider).
//!
//! - SNI: `sni`, else the check's `host` if it is a DNS name, else none
//!   (rustls sends no SNI for an IP address).
//! - Verification (`tls_verify`, on by default): the certificate must chain
//!   to a root of `tls_ca_file`, or of the system's store without one, and
//!   be for that name, or for the backend's IP address when there is no name.
//!   Off, any certificate is accepted; the handshake's signatures are still
//!   checked, so the probe still proves the server holds its key.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, OnceLock},
};

use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject as _},
};
use tokio_rustls::TlsConnector;

use super::{ProbeFailure, connect, http};
use crate::config::model::TlsCheck;

/// A prepared TLS client: settings built once per checker, used by each probe.
#[derive(Clone)]
pub struct Connector {
    connector: TlsConnector,
    /// The name to send and verify; `None` uses the backend's address.
    server_name: Option<ServerName<'static>>,
}

impl Connector {
    /// Builds the TLS settings of `tls`; `host` is the check's Host header,
    /// the default name.
    ///
    /// # Errors
    /// When the trust roots cannot be read (a local problem, not the backend's).
    pub fn new(tls: &TlsCheck, host: Option<&str>) -> Result<Self, String> {
        #[expect(
            deprecated,
            reason = "ring keeps the build lean (no cmake, no aws-lc); a probe on the backend network needs no \
                      post-quantum key exchange"
        )]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|error| format!("TLS settings: {error}"))?;
        let config = if tls.verify {
            let roots = match &tls.ca_file {
                Some(path) => Arc::new(load_ca_file(path)?),
                None => system_roots()?,
            };
            builder.with_root_certificates(roots).with_no_client_auth()
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
                .with_no_client_auth()
        };
        let server_name = server_name(tls.sni.as_deref(), host);
        Ok(Connector { connector: TlsConnector::from(Arc::new(config)), server_name })
    }
}

/// The name a check sends and verifies: `sni`, else `host` without its
/// port when that is a DNS name; `None` when neither is (the backend's IP
/// address is used then).
#[must_use]
pub fn server_name(sni: Option<&str>, host: Option<&str>) -> Option<ServerName<'static>> {
    let candidate = sni.or_else(|| host.map(host_without_port))?;
    match ServerName::try_from(candidate.to_owned()) {
        Ok(name @ ServerName::DnsName(_)) => Some(name),
        // An IP literal names no host: the backend's own address does that.
        _ => None,
    }
}

/// `example.org:8443` → `example.org`; `[2001:db8::1]:443` → `[2001:db8::1]`
/// (an IP, which is then not used as a name).
fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(ip, _)| ip);
    }
    host.split_once(':').map_or(host, |(name, _)| name)
}

/// GET over TLS.
///
/// # Errors
/// [`ProbeFailure::Tls`] when the handshake fails (no TLS, a certificate
/// that fails verification, ...), else as the HTTP check.
pub async fn probe(address: SocketAddr, check: &http::Check<'_>, connector: &Connector) -> Result<(), ProbeFailure> {
    let request = http::request(check.path, check.host, address)?;
    let stream = connect(address).await?;
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%address, %error, "setting TCP_NODELAY failed");
    }
    let name = connector.server_name.clone().unwrap_or_else(|| ServerName::IpAddress(address.ip().into()));
    let mut tls = connector.connector.connect(name, stream).await.map_err(ProbeFailure::Tls)?;
    http::exchange(&mut tls, &request, check).await
}

/// The roots of a PEM file (certificates only; other blocks are skipped).
///
/// # Errors
/// When the file cannot be read, holds a bad certificate, or holds none;
/// the message names the file.
pub fn load_ca_file(path: &Path) -> Result<RootCertStore, String> {
    let shown = path.display();
    let certs = CertificateDer::pem_file_iter(path).map_err(|error| format!("cannot read {shown}: {error}"))?;
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.enumerate() {
        let cert = cert.map_err(|error| format!("{shown}: certificate {}: {error}", i + 1))?;
        roots.add(cert).map_err(|error| format!("{shown}: certificate {}: {error}", i + 1))?;
    }
    if roots.is_empty() {
        return Err(format!("{shown} holds no PEM certificate"));
    }
    Ok(roots)
}

/// The system's trust store, read once per process.
fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
                return Err(format!(
                    "no trusted roots in the system's store ({}); set tls_ca_file",
                    if errors.is_empty() { "it is empty".to_owned() } else { errors.join("; ") }
                ));
            }
            Ok(Arc::new(roots))
        })
        .clone()
}

/// `tls_verify = false`: any certificate, for any name, is accepted; the
/// handshake signatures are still verified with the provider's algorithms.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(sni: Option<&str>, host: Option<&str>) -> Option<String> {
        server_name(sni, host).map(|n| n.to_str().into_owned())
    }

    #[test]
    fn the_name_is_sni_then_the_host_then_none() {
        assert_eq!(name(Some("api.test"), Some("www.test")), Some("api.test".to_owned()));
        assert_eq!(name(None, Some("www.test:8443")), Some("www.test".to_owned()));
        assert_eq!(name(None, Some("198.18.2.10:443")), None, "an IP is not a name");
        assert_eq!(name(None, Some("[2001:db8::1]:443")), None);
        assert_eq!(name(None, None), None);
    }

    #[test]
    fn a_ca_file_that_is_missing_or_empty_is_refused() {
        let missing = load_ca_file(Path::new("/nonexistent/ca.pem")).expect_err("missing");
        assert!(missing.starts_with("cannot read /nonexistent/ca.pem"), "{missing}");
        let dir = std::env::temp_dir().join(format!("lb-ca-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let error = load_ca_file(&empty).expect_err("no certificate");
        assert!(error.ends_with("holds no PEM certificate"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_plain_http_server_fails_the_handshake() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("local_addr");
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut hello = [0; 1024];
                let _ = stream.read(&mut hello).await;
                let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            }
        });
        let tls = TlsCheck { sni: None, verify: false, ca_file: None };
        let connector = Connector::new(&tls, None).expect("settings");
        let check = http::Check {
            path: "/",
            host: None,
            expect_status: crate::config::model::StatusRange { min: 200, max: 399 },
            expect_body: None,
        };
        let error = probe(address, &check, &connector).await.expect_err("not TLS");
        assert!(matches!(error, ProbeFailure::Tls(_)), "{error:?}");
        assert!(error.to_string().starts_with("TLS handshake: "), "{error}");
    }
}
