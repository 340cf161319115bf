//! The migration connection: TCP, wrapped in TLS 1.3 with mutual certificate authentication
//! (rustls, `ring` provider) unless the operator chose plain TCP.
//!
//! Both sides hold a certificate and key of their own and the CA that signs the other side's:
//! the source checks the destination's certificate against the CA and the destination's name,
//! the destination accepts only a source whose client certificate the CA signed. Plain TCP is
//! for loopback (tests, one host) or an operator who says so explicitly: it authenticates
//! nobody, so whoever reaches the port can hand the destination a VM.
use std::{
    fmt,
    io::{self, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::{
    client::WebPkiServerVerifier,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    server::WebPkiClientVerifier,
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned,
};

use crate::{MigrationError, Result};

/// A byte stream the migration runs over (TCP or TLS over TCP).
pub trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

/// The PEM files of one side's TLS identity.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TlsFiles {
    /// This side's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// This side's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificate(s) (PEM) that sign the other side's certificate.
    pub ca: PathBuf,
}

/// A loaded TLS identity: the client and server configurations built from [`TlsFiles`].
pub struct TlsIdentity {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsIdentity")
    }
}

fn tls_err(what: &'static str) -> impl FnOnce(rustls::Error) -> MigrationError {
    move |source| MigrationError::Tls { what, source }
}

fn bad_file(path: &Path, reason: impl Into<String>) -> MigrationError {
    MigrationError::TlsFile {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl TlsIdentity {
    /// Loads the certificate, key and CA; TLS 1.3 only, mutual authentication required.
    pub fn load(files: &TlsFiles) -> Result<Self> {
        // The `ring` provider builds with nothing but a C compiler; rustls deprecates it only
        // because it has no post-quantum key exchange (X25519 and the NIST curves remain).
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
            .map_err(|e| bad_file(&files.cert, e.to_string()))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad_file(&files.cert, e.to_string()))?;
        if chain.is_empty() {
            return Err(bad_file(&files.cert, "no certificate in the file"));
        }
        let key = PrivateKeyDer::from_pem_file(&files.key)
            .map_err(|e| bad_file(&files.key, e.to_string()))?;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(&files.ca)
            .map_err(|e| bad_file(&files.ca, e.to_string()))?
        {
            let ca = ca.map_err(|e| bad_file(&files.ca, e.to_string()))?;
            roots
                .add(ca)
                .map_err(|e| bad_file(&files.ca, e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(bad_file(&files.ca, "no CA certificate in the file"));
        }
        let roots = Arc::new(roots);
        let server_verifier =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| bad_file(&files.ca, e.to_string()))?;
        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err("configuring the client"))?
            .with_webpki_verifier(server_verifier)
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(tls_err("loading the client certificate"))?;
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| bad_file(&files.ca, e.to_string()))?;
        let server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err("configuring the server"))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain, key)
            .map_err(tls_err("loading the server certificate"))?;
        Ok(TlsIdentity {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }
}

/// How a migration connection is secured.
#[derive(Clone, Debug, Default)]
pub enum Security {
    /// Plain TCP: no authentication, no encryption (loopback, or an explicit operator choice).
    #[default]
    Plain,
    /// TLS 1.3 with mutual certificate authentication.
    Tls(Arc<TlsIdentity>),
}

impl Security {
    /// Loads `files` if given, plain otherwise.
    pub fn from_files(files: Option<&TlsFiles>) -> Result<Self> {
        Ok(match files {
            Some(f) => Security::Tls(Arc::new(TlsIdentity::load(f)?)),
            None => Security::Plain,
        })
    }

    /// True for TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Security::Tls(_))
    }
}

/// True when every address of `addr` stays on this host (loopback).
pub fn is_loopback(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(a) => a.is_loopback(),
        IpAddr::V6(a) => a.is_loopback() || a.to_ipv4_mapped().is_some_and(|v| v.is_loopback()),
    }
}

/// An established migration connection.
pub struct Stream {
    /// The byte stream (TLS or plain).
    pub conn: Box<dyn Conn>,
    /// The TCP socket under it (timeouts, shutdown).
    pub tcp: TcpStream,
    /// The peer's address.
    pub peer: SocketAddr,
    /// True when the stream is TLS.
    pub tls: bool,
}

fn setup_tcp(tcp: &TcpStream, timeout: Duration) -> Result<()> {
    tcp.set_nodelay(true).map_err(MigrationError::io("setup"))?;
    tcp.set_read_timeout(Some(timeout))
        .map_err(MigrationError::io("setup"))?;
    tcp.set_write_timeout(Some(timeout))
        .map_err(MigrationError::io("setup"))?;
    Ok(())
}

/// Drives a TLS handshake to its end within `deadline`.
fn handshake<C, S>(conn: &mut C, tcp: &mut TcpStream, deadline: Instant) -> Result<()>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    while conn.is_handshaking() {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| MigrationError::Io {
                what: "TLS handshake",
                source: io::Error::new(io::ErrorKind::TimedOut, "handshake took too long"),
            })?;
        tcp.set_read_timeout(Some(left))
            .map_err(MigrationError::io("setup"))?;
        if let Err(e) = conn.complete_io(tcp) {
            // A TLS alert or verification failure arrives as InvalidData wrapping rustls's error.
            return Err(
                match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    Some(tls) => MigrationError::Tls {
                        what: "handshake",
                        source: tls.clone(),
                    },
                    None => MigrationError::Io {
                        what: "TLS handshake",
                        source: e,
                    },
                },
            );
        }
    }
    Ok(())
}

/// Connects to a destination. `server_name` is the name its certificate must carry (TLS).
pub fn connect(
    addr: SocketAddr,
    security: &Security,
    server_name: &str,
    timeout: Duration,
) -> Result<Stream> {
    let tcp = TcpStream::connect_timeout(&addr, timeout).map_err(MigrationError::io("connect"))?;
    setup_tcp(&tcp, timeout)?;
    let mut tcp2 = tcp.try_clone().map_err(MigrationError::io("setup"))?;
    let conn: Box<dyn Conn> = match security {
        Security::Plain => Box::new(tcp2),
        Security::Tls(id) => {
            let name = ServerName::try_from(server_name.to_string()).map_err(|e| {
                MigrationError::NotMigratable(format!(
                    "{server_name:?} is not a valid TLS server name: {e}"
                ))
            })?;
            let mut c = ClientConnection::new(id.client.clone(), name)
                .map_err(tls_err("starting the handshake"))?;
            handshake(&mut c, &mut tcp2, Instant::now() + timeout)?;
            tcp.set_read_timeout(Some(timeout))
                .map_err(MigrationError::io("setup"))?;
            Box::new(StreamOwned::new(c, tcp2))
        }
    };
    Ok(Stream {
        conn,
        tcp,
        peer: addr,
        tls: security.is_tls(),
    })
}

/// Secures an accepted connection: the TLS handshake (client certificate required) within
/// `handshake_timeout`, which also bounds every read and write until the caller sets another.
pub fn accept(tcp: TcpStream, security: &Security, handshake_timeout: Duration) -> Result<Stream> {
    let peer = tcp.peer_addr().map_err(MigrationError::io("setup"))?;
    setup_tcp(&tcp, handshake_timeout)?;
    let mut tcp2 = tcp.try_clone().map_err(MigrationError::io("setup"))?;
    let conn: Box<dyn Conn> = match security {
        Security::Plain => Box::new(tcp2),
        Security::Tls(id) => {
            let mut c = ServerConnection::new(id.server.clone())
                .map_err(tls_err("starting the handshake"))?;
            handshake(&mut c, &mut tcp2, Instant::now() + handshake_timeout)?;
            Box::new(StreamOwned::new(c, tcp2))
        }
    };
    Ok(Stream {
        conn,
        tcp,
        peer,
        tls: security.is_tls(),
    })
}

/// The host part of `ADDR:PORT` (brackets of an IPv6 literal removed), for the TLS name.
pub fn host_part(to: &str) -> &str {
    let host = to.rsplit_once(':').map_or(to, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_part_strips_the_port_and_brackets() {
        assert_eq!(host_part("127.0.0.1:7000"), "127.0.0.1");
        assert_eq!(host_part("hostb.example:7000"), "hostb.example");
        assert_eq!(host_part("[::1]:7000"), "::1");
    }

    #[test]
    fn loopback_is_recognised() {
        assert!(is_loopback(&"127.0.0.5:1".parse().unwrap()));
        assert!(is_loopback(&"[::1]:1".parse().unwrap()));
        assert!(is_loopback(&"[::ffff:127.0.0.1]:1".parse().unwrap()));
        assert!(!is_loopback(&"0.0.0.0:1".parse().unwrap()));
        assert!(!is_loopback(&"10.1.2.3:1".parse().unwrap()));
    }
}
