//! TLS for the NBD server (qemu-nbd's `--tls-creds`): X.509 credentials in QEMU's directory
//! layout, served with rustls, and the part of the handshake that comes before TLS.
//!
//! With TLS configured, a client must ask for `NBD_OPT_STARTTLS` before anything else: every
//! other option gets `NBD_REP_ERR_TLS_REQD` (and `NBD_OPT_EXPORT_NAME`, which cannot be refused
//! by a reply, ends the connection), so no export name, size or content is ever sent in clear.
//! After the TLS handshake the option haggling starts again over the encrypted stream, as the
//! protocol prescribes (no new greeting).
//!
//! With an authorization object (`--tls-authz`, [`super::authz`]), a client whose certificate's
//! name it does not allow is dropped right after the TLS handshake, before any option.
//!
//! Credentials (`dir`): `ca-cert.pem` (the authority client certificates must chain to),
//! `server-cert.pem` (the server's certificate, optionally followed by its chain) and
//! `server-key.pem`. With `verify-peer` (QEMU's default) clients must present a certificate
//! signed by that authority.

use super::proto::*;
use crate::error::{Error, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A server's TLS setup.
#[derive(Clone)]
pub struct TlsServer {
    acceptor: tokio_rustls::TlsAcceptor,
    /// Which verified clients may go on (`--tls-authz`): see [`super::authz`].
    authz: Option<Arc<super::authz::Authz>>,
    verify_peer: bool,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsServer")
    }
}

fn load_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::arg(format!("Unable to read '{}': {e}", path.display()))
}

/// A credentials file must exist and be readable (QEMU's check and words, when the object is
/// defined).
fn check_access(path: &Path) -> Result<()> {
    std::fs::File::open(path).map(drop).map_err(|e| {
        Error::io(
            format!("Unable to access credentials {}", path.display()),
            e,
        )
    })
}

/// A certificate (with the chain after it, at least one certificate) and its private key.
fn load_identity(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    check_access(cert_path)?;
    check_access(key_path)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| load_err(cert_path, e))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| load_err(cert_path, e))?;
    if chain.is_empty() {
        return Err(load_err(cert_path, "no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| load_err(key_path, e))?;
    Ok((chain, key))
}

/// The certificate authorities of `dir/ca-cert.pem` (QEMU's layout), at least one.
fn load_roots(dir: &Path) -> Result<rustls::RootCertStore> {
    let ca_path = dir.join("ca-cert.pem");
    check_access(&ca_path)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&ca_path).map_err(|e| load_err(&ca_path, e))? {
        roots
            .add(c.map_err(|e| load_err(&ca_path, e))?)
            .map_err(|e| load_err(&ca_path, e))?;
    }
    if roots.is_empty() {
        return Err(load_err(&ca_path, "no certificate in the file"));
    }
    Ok(roots)
}

impl TlsServer {
    /// Loads X.509 credentials from `dir` (QEMU's `tls-creds-x509` layout).
    pub fn from_x509_dir(dir: &Path, verify_peer: bool) -> Result<TlsServer> {
        // ring builds with a plain C compiler (aws-lc-rs needs cmake and much longer builds);
        // rustls marks it deprecated because it lacks post-quantum key exchange.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert_path = dir.join("server-cert.pem");
        let key_path = dir.join("server-key.pem");
        let (chain, key) = load_identity(&cert_path, &key_path)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::arg(format!("TLS setup: {e}")))?;
        let builder = if verify_peer {
            let roots = load_roots(dir)?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| Error::arg(format!("TLS client verification: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|e| Error::arg(format!("TLS credentials in '{}': {e}", dir.display())))?;
        Ok(TlsServer {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            authz: None,
            verify_peer,
        })
    }

    /// Lets only clients whose certificate names an identity `authz` allows go past the TLS
    /// handshake. Needs verified client certificates: refused without `verify-peer` (QEMU then
    /// skips the check silently; an authorization that is never checked is refused here).
    pub fn with_authz(mut self, authz: super::authz::Authz) -> Result<TlsServer> {
        if !self.verify_peer {
            return Err(Error::arg(
                "--tls-authz needs client certificates: the TLS credentials have verify-peer=off",
            ));
        }
        self.authz = Some(Arc::new(authz));
        Ok(self)
    }

    /// Runs the handshake up to `NBD_OPT_STARTTLS` on a raw connection, then TLS. Returns the
    /// encrypted stream and whether the client asked for no zero padding (`NO_ZEROES`), for
    /// the rest of the haggling.
    pub async fn accept<S>(
        &self,
        mut s: S,
    ) -> io::Result<(tokio_rustls::server::TlsStream<S>, bool)>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let no_zeroes = before_tls(&mut s).await?;
        let tls = self.acceptor.accept(s).await?;
        if let Some(authz) = &self.authz {
            let denied = |why: String| io::Error::new(io::ErrorKind::PermissionDenied, why);
            let cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .ok_or_else(|| denied("TLS client sent no certificate".into()))?;
            let name = super::authz::subject_name(cert).map_err(|e| denied(e.to_string()))?;
            let allowed = authz
                .allows(&name)
                .map_err(|e| denied(format!("TLS x509 authz check for {name}: {e}")))?;
            if !allowed {
                return Err(denied(format!("TLS x509 authz check for {name} is denied")));
            }
        }
        Ok((tls, no_zeroes))
    }
}

fn violation(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Greeting, client flags, and options until `NBD_OPT_STARTTLS` (acknowledged). Reads exactly
/// what the client sent before its TLS hello, nothing more.
async fn before_tls<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> io::Result<bool> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&greeting).await?;
    s.flush().await?;
    let client_flags = s.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(violation(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    // A client gets a bounded number of refused options before TLS.
    for _ in 0..32 {
        let mut hb = [0u8; OPTION_HEADER_LEN];
        s.read_exact(&mut hb).await?;
        let hdr =
            OptionHeader::decode(&hb).map_err(|e| violation(format!("option header: {e}")))?;
        if hdr.len > 4096 {
            return Err(violation(format!("option of {} bytes before TLS", hdr.len)));
        }
        let mut data = vec![0u8; hdr.len as usize];
        s.read_exact(&mut data).await?;
        match hdr.option {
            OPT_STARTTLS if data.is_empty() => {
                s.write_all(&option_reply(OPT_STARTTLS, REP_ACK, &[]))
                    .await?;
                s.flush().await?;
                return Ok(no_zeroes);
            }
            OPT_STARTTLS => {
                let msg = b"NBD_OPT_STARTTLS takes no data";
                s.write_all(&option_reply(hdr.option, REP_ERR_INVALID, msg))
                    .await?;
            }
            OPT_EXPORT_NAME => {
                return Err(violation("NBD_OPT_EXPORT_NAME before TLS"));
            }
            OPT_ABORT => {
                let _ = s.write_all(&option_reply(OPT_ABORT, REP_ACK, &[])).await;
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "client aborted before TLS",
                ));
            }
            o => {
                let msg = format!("Option {o:#x} not permitted before TLS");
                s.write_all(&option_reply(o, REP_ERR_TLS_REQD, msg.as_bytes()))
                    .await?;
            }
        }
        s.flush().await?;
    }
    Err(violation("too many options before TLS"))
}

/// A client's X.509 credentials (QEMU's `tls-creds-x509` object with `endpoint=client`), loaded
/// once from QEMU's client layout in `dir`: `ca-cert.pem` (the authority the server's certificate
/// must chain to) and, when present, `client-cert.pem` with `client-key.pem` (for servers that
/// verify their clients).
#[derive(Clone)]
pub struct ClientCredentials {
    dir: PathBuf,
    roots: Arc<rustls::RootCertStore>,
    identity: Option<Arc<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>>,
}

impl std::fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientCredentials({})", self.dir.display())
    }
}

impl ClientCredentials {
    pub fn load(dir: &Path) -> Result<ClientCredentials> {
        let roots = load_roots(dir)?;
        let (cert_path, key_path) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
        let identity = if cert_path.exists() {
            Some(Arc::new(load_identity(&cert_path, &key_path)?))
        } else {
            None
        };
        Ok(ClientCredentials {
            dir: dir.to_path_buf(),
            roots: Arc::new(roots),
            identity,
        })
    }
}

/// A client's TLS setup for one server (`qemu-nbd --list --tls-creds`, QEMU's NBD driver with
/// `tls-creds=`): the credentials and the name the server's certificate must carry.
#[derive(Clone)]
pub struct TlsClient {
    connector: tokio_rustls::TlsConnector,
    /// `None`: no name to check the certificate against (a unix socket without
    /// `tls-hostname`), which QEMU refuses, and so does [`TlsClient::start`].
    server_name: Option<(String, rustls_pki_types::ServerName<'static>)>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = self.server_name.as_ref().map(|n| &n.0);
        write!(f, "TlsClient({name:?})")
    }
}

impl PartialEq for TlsClient {
    fn eq(&self, other: &TlsClient) -> bool {
        self.server_name == other.server_name
            && Arc::ptr_eq(self.connector.config(), other.connector.config())
    }
}

impl Eq for TlsClient {}

impl TlsClient {
    /// `hostname` is the name the server's certificate must carry (a DNS name or an IP
    /// address).
    pub fn new(creds: &ClientCredentials, hostname: Option<&str>) -> Result<TlsClient> {
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::arg(format!("TLS setup: {e}")))?
            .with_root_certificates(creds.roots.clone());
        let config = match &creds.identity {
            Some(id) => builder
                .with_client_auth_cert(id.0.clone(), id.1.clone_key())
                .map_err(|e| {
                    Error::arg(format!("TLS credentials in '{}': {e}", creds.dir.display()))
                })?,
            None => builder.with_no_client_auth(),
        };
        let server_name = match hostname {
            Some(h) => Some((
                h.to_string(),
                rustls_pki_types::ServerName::try_from(h.to_string())
                    .map_err(|_| Error::arg(format!("Invalid TLS hostname '{h}'")))?,
            )),
            None => None,
        };
        Ok(TlsClient {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// Credentials from `dir` for the server named `hostname`.
    pub fn from_x509_dir(dir: &Path, hostname: Option<&str>) -> Result<TlsClient> {
        TlsClient::new(&ClientCredentials::load(dir)?, hostname)
    }

    /// Asks the server at the other end of `s` (greeted already) for TLS and starts it.
    /// Failures are worded as QEMU's client words them.
    pub async fn start<S>(&self, mut s: S) -> io::Result<tokio_rustls::client::TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        use super::client::{option_error, read_reply, send_option};
        send_option(&mut s, OPT_STARTTLS, &[]).await?;
        let rep = read_reply(&mut s, OPT_STARTTLS).await?;
        match rep.rtype {
            REP_ACK => {}
            REP_ERR_UNSUP => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "Server don't support STARTTLS option",
                ))
            }
            t if t & REP_FLAG_ERROR != 0 => return Err(option_error(OPT_STARTTLS, &rep)),
            t => return Err(violation(format!("unexpected reply type {t} to STARTTLS"))),
        }
        let Some((hostname, server_name)) = &self.server_name else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "No hostname for certificate validation",
            ));
        };
        self.connector
            .connect(server_name.clone(), s)
            .await
            .map_err(|e| certificate_error(e, hostname))
    }
}

/// A failed client handshake in QEMU's (GnuTLS's) words where there is one.
fn certificate_error(e: io::Error, hostname: &str) -> io::Error {
    use rustls::CertificateError as C;
    let text = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        )) => {
            format!("Certificate does not match the hostname {hostname}")
        }
        // An authority of the same name that did not sign it is no known issuer either.
        Some(rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature)) => {
            "The certificate hasn't got a known issuer".to_string()
        }
        Some(rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. })) => {
            "The certificate has expired".to_string()
        }
        Some(other) => format!("TLS handshake failed: {other}"),
        None => return e,
    };
    io::Error::new(io::ErrorKind::PermissionDenied, text)
}
