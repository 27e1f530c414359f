//! rustls configurations built from PEM files and rebuilt when the files change, the server side's
//! accepted connections (each carrying the caller's identity) and the client side's connector.
//!
//! Every Titus connection is to a replica, so a client checks that the server's certificate chains
//! to the cluster CA and names a replica — not a host name: replicas are reached by IPs, compose
//! service names and load balancers alike, and the CA is the trust boundary. A server asks for a
//! client certificate but does not require one (a client may present a bearer token instead); what
//! the caller may do is the control plane's decision, made per call from [`PeerInfo`].

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::admission::{Admission, Gate};
use crate::identity::{Identity, Kind};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
}

fn file_error(path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::File { path: path.to_path_buf(), message: message.into() }
}

/// Where a holder's PEM files are. `cert_and_key` is absent for a client that authenticates with a
/// bearer token only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert_and_key: Option<(PathBuf, PathBuf)>,
}

impl TlsFiles {
    pub fn new(ca: impl Into<PathBuf>, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> TlsFiles {
        TlsFiles { ca: ca.into(), cert_and_key: Some((cert.into(), key.into())) }
    }

    fn paths(&self) -> Vec<&Path> {
        let mut p = vec![self.ca.as_path()];
        if let Some((c, k)) = &self.cert_and_key {
            p.push(c);
            p.push(k);
        }
        p
    }

    /// Modification time and length of each file: a change to any of them means reload.
    fn stamp(&self) -> Vec<Option<(SystemTime, u64)>> {
        self.paths().iter().map(|p| fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len())))).collect()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = fs::read(path).map_err(|e| file_error(path, e.to_string()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = fs::read(path).map_err(|e| file_error(path, e.to_string()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| file_error(path, format!("not a PEM private key: {e}")))?
        .ok_or_else(|| file_error(path, "holds no PEM private key"))
}

/// One loaded generation of the files.
struct Loaded {
    /// Asks for a client certificate (a caller may use a token instead).
    server: Option<Arc<ServerConfig>>,
    /// Requires one: for ports no token opens (the peer port), so nobody without a certificate
    /// from the CA gets past the handshake, let alone holds a connection.
    server_strict: Option<Arc<ServerConfig>>,
    client: Arc<ClientConfig>,
    identity: Option<Identity>,
    stamp: Vec<Option<(SystemTime, u64)>>,
}

fn load(files: &TlsFiles, serve: bool) -> Result<Loaded, TlsError> {
    let stamp = files.stamp();
    let provider = provider();
    let mut roots = RootCertStore::empty();
    for ca in read_certs(&files.ca)? {
        roots.add(ca).map_err(|e| file_error(&files.ca, format!("not a usable CA certificate: {e}")))?;
    }
    let roots = Arc::new(roots);
    let own = match &files.cert_and_key {
        Some((cert, key)) => {
            let chain = read_certs(cert)?;
            let identity = Identity::from_cert_der(&chain[0]).map_err(|e| file_error(cert, e))?;
            let key_der = read_key(key)?;
            let signing = provider
                .key_provider
                .load_private_key(key_der.clone_key())
                .map_err(|e| file_error(key, format!("unusable private key: {e}")))?;
            let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing);
            certified.keys_match().map_err(|e| file_error(key, format!("does not match {}: {e}", cert.display())))?;
            Some((chain, key_der, identity))
        }
        None => None,
    };
    let versions = &[&rustls::version::TLS13];
    let tls_error = |e: rustls::Error| TlsError::Config(e.to_string());
    let server_config = |optional: bool| -> Result<Option<Arc<ServerConfig>>, TlsError> {
        let Some((chain, key, _)) = &own else {
            return Err(TlsError::Config("a server needs a certificate and a key".into()));
        };
        let builder = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone());
        let builder = if optional { builder.allow_unauthenticated() } else { builder };
        let verifier = builder.build().map_err(|e| TlsError::Config(format!("client certificate verifier: {e}")))?;
        let mut config = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(tls_error)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(tls_error)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Some(Arc::new(config)))
    };
    let (server, server_strict) = if serve { (server_config(true)?, server_config(false)?) } else { (None, None) };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(tls_error)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ReplicaVerifier { roots, provider }));
    let mut client = match &own {
        Some((chain, key, _)) => builder.with_client_auth_cert(chain.clone(), key.clone_key()).map_err(tls_error)?,
        None => builder.with_no_client_auth(),
    };
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded { server, server_strict, client: Arc::new(client), identity: own.map(|(_, _, id)| id), stamp })
}

/// A holder's TLS material, reloaded when its files change (see [`Tls::spawn_reloader`]).
/// Connections already open keep the certificates they were made with; new ones use the new files.
pub struct Tls {
    files: TlsFiles,
    serve: bool,
    current: RwLock<Arc<Loaded>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).field("identity", &self.identity()).finish()
    }
}

impl Tls {
    /// Loads a server's (and its outgoing connections') material: it must have a certificate whose
    /// identity is of `kind`.
    pub fn server(files: TlsFiles, kind: Kind) -> Result<Arc<Tls>, TlsError> {
        Tls::open(files, true, Some(kind))
    }

    /// Loads a client's material: a CA, and a certificate and key unless it uses a token.
    pub fn client(files: TlsFiles, kind: Option<Kind>) -> Result<Arc<Tls>, TlsError> {
        Tls::open(files, false, kind)
    }

    fn open(files: TlsFiles, serve: bool, kind: Option<Kind>) -> Result<Arc<Tls>, TlsError> {
        let loaded = load(&files, serve)?;
        check_kind(&files, &loaded, kind)?;
        Ok(Arc::new(Tls { files, serve, current: RwLock::new(Arc::new(loaded)) }))
    }

    fn current(&self) -> Arc<Loaded> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The identity this holder's certificate names (None without a certificate).
    pub fn identity(&self) -> Option<Identity> {
        self.current().identity.clone()
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.current().client.clone()
    }

    /// The server's configuration; `require_client_cert` refuses a handshake without a client
    /// certificate from the CA.
    pub fn server_config(&self, require_client_cert: bool) -> Option<Arc<ServerConfig>> {
        let current = self.current();
        if require_client_cert {
            current.server_strict.clone()
        } else {
            current.server.clone()
        }
    }

    /// Rebuilds the configurations when a file changed. A half-written or mismatched set is not
    /// taken: the old one stays in use and the next call tries again. Ok(true) when it reloaded.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let current = self.current();
        if self.files.stamp() == current.stamp {
            return Ok(false);
        }
        let loaded = load(&self.files, self.serve)?;
        if loaded.identity != current.identity {
            return Err(TlsError::Config(format!(
                "the new certificate names {} but this process is {}; keeping the old one",
                loaded.identity.as_ref().map_or("nobody".into(), |i| i.to_string()),
                current.identity.as_ref().map_or("nobody".into(), |i| i.to_string()),
            )));
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
        Ok(true)
    }

    /// [`Tls::spawn_reloader`] when called inside a tokio runtime (a CLI building its options
    /// before its runtime starts has no use for one).
    pub fn spawn_reloader_if_in_runtime(self: &Arc<Self>, every: Duration) {
        if tokio::runtime::Handle::try_current().is_ok() {
            self.spawn_reloader(every);
        }
    }

    /// Checks the files every `every` and reloads them when they change, for as long as this
    /// `Tls` is in use.
    pub fn spawn_reloader(self: &Arc<Self>, every: Duration) {
        let weak: Weak<Tls> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut last_error = String::new();
            loop {
                tokio::time::sleep(every).await;
                let Some(tls) = weak.upgrade() else { return };
                match tls.reload_if_changed() {
                    Ok(true) => {
                        last_error.clear();
                        tracing::info!(ca = %tls.files.ca.display(), "TLS certificates reloaded from disk")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        let message = e.to_string();
                        if message != last_error {
                            tracing::warn!(error = %message, "TLS files changed but cannot be used yet; keeping the old ones");
                            last_error = message;
                        }
                    }
                }
            }
        });
    }
}

fn check_kind(files: &TlsFiles, loaded: &Loaded, kind: Option<Kind>) -> Result<(), TlsError> {
    match (kind, &loaded.identity, &files.cert_and_key) {
        (Some(want), Some(id), Some((cert, _))) if id.kind != want => {
            Err(file_error(cert, format!("names {id}, but this process needs a {want} certificate")))
        }
        _ => Ok(()),
    }
}

/// A client's check of a server: chains to the CA and names a replica.
#[derive(Debug)]
struct ReplicaVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ReplicaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match Identity::from_cert_der(end_entity) {
            Ok(id) if id.kind == Kind::Replica => Ok(ServerCertVerified::assertion()),
            Ok(id) => Err(rustls::Error::General(format!("the server is {id}, not a replica"))),
            Err(e) => Err(rustls::Error::General(format!("the server's certificate: {e}"))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

// ----- server side -----

/// What the server knows of a connection's caller; tonic puts it in every request's extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// Whether the connection is TLS (false only in insecure mode).
    pub tls: bool,
    /// The identity of a verified client certificate.
    pub identity: Option<Identity>,
    /// Why a presented certificate gave no identity (it chained to the CA but named nobody).
    pub identity_error: Option<String>,
    /// The verified client certificate's serial number ([`crate::identity::serial_hex`]): what a
    /// revocation names.
    pub serial: Option<String>,
    /// The connection's admission: the first authenticated call on it says so
    /// ([`Admission::authenticated`]), which keeps it from being timed out or evicted.
    pub admission: Option<Admission>,
}

impl PeerInfo {
    /// The caller on this connection was authenticated (see [`crate::admission`]).
    pub fn authenticated(&self) {
        if let Some(a) = &self.admission {
            a.authenticated();
        }
    }
}

enum ServerIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

struct ServerStream {
    io: ServerIo,
}

/// An accepted connection (TLS unless insecure), holding its slot under the listener's limits:
/// closed (its next read or write fails) when evicted or unauthenticated at its deadline.
pub struct Conn {
    stream: ServerStream,
    info: PeerInfo,
    admission: Admission,
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Poll::Ready(e) = self.admission.poll_closed(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Poll::Ready(e) = self.admission.poll_closed(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Poll::Ready(e) = self.admission.poll_closed(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

macro_rules! delegate_io {
    ($ty:ty, $field:ident, $($variant:path),+) => {
        impl AsyncRead for $ty {
            fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
                match &mut self.$field {
                    $($variant(s) => Pin::new(s).poll_read(cx, buf),)+
                }
            }
        }

        impl AsyncWrite for $ty {
            fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                match &mut self.$field {
                    $($variant(s) => Pin::new(s).poll_write(cx, buf),)+
                }
            }

            fn poll_write_vectored(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                match &mut self.$field {
                    $($variant(s) => Pin::new(s).poll_write_vectored(cx, bufs),)+
                }
            }

            fn is_write_vectored(&self) -> bool {
                match &self.$field {
                    $($variant(s) => s.is_write_vectored(),)+
                }
            }

            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match &mut self.$field {
                    $($variant(s) => Pin::new(s).poll_flush(cx),)+
                }
            }

            fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match &mut self.$field {
                    $($variant(s) => Pin::new(s).poll_shutdown(cx),)+
                }
            }
        }
    };
}

delegate_io!(ServerStream, io, ServerIo::Plain, ServerIo::Tls);

/// The connections `listener` accepts, TLS-handshaken with the current certificates when `tls` is
/// given (plaintext otherwise), Nagle off, admitted by `gate` ([`crate::admission`]): handshakes run
/// concurrently, and a connection must authenticate within the gate's timeout of its accept.
/// Accepting stops when the returned stream is dropped, which frees the port.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    gate: Arc<Gate>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel::<io::Result<Conn>>(64);
    let limits = *gate.limits();
    tokio::spawn(async move {
        let mut refused = 0u64;
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (stream, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, say: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(mut admission) = gate.admit(remote.ip()) else {
                refused += 1;
                if refused.is_power_of_two() {
                    tracing::warn!(%remote, refused, max = limits.max_connections, "every connection slot is held by an authenticated caller; closing new connections");
                }
                continue;
            };
            admission.start_clock();
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "could not disable Nagle on an accepted connection");
            }
            let Some(tls) = tls.clone() else {
                admission.handshaken();
                let info = PeerInfo {
                    remote: Some(remote),
                    tls: false,
                    identity: None,
                    identity_error: None,
                    serial: None,
                    admission: Some(admission.clone()),
                };
                let conn = Conn { stream: ServerStream { io: ServerIo::Plain(stream) }, info, admission };
                if tx.send(Ok(conn)).await.is_err() {
                    return;
                }
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let Some(config) = tls.server_config(limits.require_client_cert) else { return };
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                // Bounded by the admission: evicted, or its clock runs out, and the handshake stops.
                let stream = tokio::select! {
                    r = acceptor.accept(stream) => match r {
                        Ok(s) => s,
                        Err(e) => return tracing::debug!(%remote, error = %e, "TLS handshake refused"),
                    },
                    e = admission.closed() => return tracing::debug!(%remote, error = %e, "TLS handshake not done in time"),
                };
                let cert = stream.get_ref().1.peer_certificates().and_then(|c| c.first());
                let serial = cert.and_then(|c| crate::identity::serial_hex(c).ok());
                let (identity, identity_error) = match cert {
                    None => (None, None),
                    Some(cert) => match Identity::from_cert_der(cert) {
                        Ok(id) => (Some(id), None),
                        Err(e) => (None, Some(e)),
                    },
                };
                // Authenticated only by its first call, certificate or not: the call is where a
                // revoked certificate or an unknown token is refused.
                admission.handshaken();
                let info = PeerInfo {
                    remote: Some(remote),
                    tls: true,
                    identity,
                    identity_error,
                    serial,
                    admission: Some(admission.clone()),
                };
                let conn = Conn { stream: ServerStream { io: ServerIo::Tls(Box::new(stream)) }, info, admission };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

// ----- client side -----

pub enum ClientIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

pub struct ClientConn {
    io: ClientIo,
}

delegate_io!(ClientConn, io, ClientIo::Plain, ClientIo::Tls);

/// Connects tonic channels to replicas: TCP (Nagle off), then TLS with the current certificates
/// when `tls` is set. Bounded by `timeout`, handshake included.
#[derive(Clone, Debug)]
pub struct Connector {
    pub tls: Option<Arc<Tls>>,
    pub timeout: Duration,
}

impl Connector {
    pub fn new(tls: Option<Arc<Tls>>, timeout: Duration) -> Connector {
        Connector { tls, timeout }
    }

    async fn connect(self, uri: http::Uri) -> io::Result<ClientConn> {
        let host = uri.host().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri}: no host")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
        let tcp = TcpStream::connect((host.as_str(), port)).await?;
        tcp.set_nodelay(true)?;
        let Some(tls) = self.tls else { return Ok(ClientConn { io: ClientIo::Plain(tcp) }) };
        // The name is not what is verified (the certificate's replica identity is); it must only
        // be a valid SNI value.
        let name = ServerName::try_from("replica.titus.invalid").expect("a valid DNS name");
        let stream = tokio_rustls::TlsConnector::from(tls.client_config()).connect(name, tcp).await?;
        Ok(ClientConn { io: ClientIo::Tls(Box::new(stream)) })
    }
}

/// The first certificate of a PEM file, DER.
pub fn read_cert_der(path: &Path) -> Result<Vec<u8>, TlsError> {
    Ok(read_certs(path)?.remove(0).to_vec())
}

/// The certificate (DER) the replica at `addr` presents now: for checking a rotation took effect.
pub async fn server_certificate(addr: &str, tls: &Tls) -> io::Result<Vec<u8>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("replica.titus.invalid").expect("a valid DNS name");
    let stream = tokio_rustls::TlsConnector::from(tls.client_config()).connect(name, tcp).await?;
    let cert = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec());
    cert.ok_or_else(|| io::Error::other("the server presented no certificate"))
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<ClientConn>;
    type Error = io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, this.connect(uri.clone())).await {
                Ok(r) => r.map(hyper_util::rt::TokioIo::new),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting to {uri}: no answer within {timeout:?}"),
                )),
            }
        })
    }
}
