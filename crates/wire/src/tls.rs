//! Mutual TLS 1.3 with each node's identity bound into its certificate.
//!
//! A node is its ed25519 network key ([`PeerId`]), but its TLS certificate
//! carries an ECDSA P-256 key: Python and C++ grpcio refuse ed25519
//! certificates in the handshake, while P-256 works in every gRPC stack. The
//! two keys are tied together the way libp2p's TLS handshake does it: the
//! self-signed certificate carries an extension holding the network key and
//! that key's signature over the certificate's SubjectPublicKeyInfo. Whoever
//! completes a handshake with such a certificate holds the TLS key (TLS
//! checks the handshake signature) and was vouched for by the network key
//! (we check the binding), so the bound key is the peer's id. No CA is
//! involved.
//!
//! # The binding extension
//!
//! - OID [`BINDING_OID`], `1.3.6.1.4.1.53594.1.1`, not critical (so stacks
//!   that do not know it still accept the certificate).
//! - Content, DER: `SEQUENCE { publicKey OCTET STRING, signature OCTET
//!   STRING }`, the ASN.1 shape libp2p uses under the same OID. Ours holds
//!   the raw 32-byte ed25519 key (libp2p: a protobuf-wrapped key) and the
//!   64-byte signature `KeyPair::sign_digest(Domain::TlsBinding,
//!   Digest::of(spki_der))`, where `spki_der` is the certificate's
//!   SubjectPublicKeyInfo DER. A libp2p certificate is therefore refused here
//!   (its key is not 32 bytes) and ours by libp2p (our key is not its
//!   protobuf, and the signed message differs): the two never mistake one
//!   another. Being DER, the encoding is always the same 102 bytes:
//!   `30 64 04 20 <key> 04 40 <signature>`.
//!
//! # What the verifiers check
//!
//! Exactly one certificate, well-formed X.509, validly self-signed, with no
//! critical extension we do not understand, carrying exactly one binding
//! whose signature verifies over that very certificate's key; and the TLS
//! 1.3 handshake signature made with the certificate's key. Validity dates
//! are not checked: the binding, not a date, is what is trusted, and node
//! clocks may be wrong; generated certificates are valid from 1975 to 4096
//! so that stacks which do check dates accept them. Session resumption is
//! off on both sides, so every connection runs these checks.
//!
//! The client also checks the server is the peer it dialled, if it knows
//! it. The server lets callers without a certificate, or with a plain
//! self-signed one carrying no binding (what grpcurl or grpcio present), in
//! as [`Caller::Anonymous`] in [`Access::Public`], and refuses them in
//! [`Access::Private`], where only allowlisted peers get past the handshake.
//! A binding that does not verify is refused in either mode. A server
//! without a binding is always refused: a node must prove its id.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use futures::stream::BoxStream;
use rcgen::PublicKeyData;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError};
use rustls::{SignatureScheme, client::Resumption, server::NoServerSessionStorage};
use soma_types::{Access, Digest, Domain, KeyPair, PeerId, PublicKey, Signature};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};
use tonic_tls::rustls::{SslConnectInfo, TlsStream};
use x509_parser::oid_registry::Oid;
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

use crate::activity::Watched;
use crate::inbound::{Admission, Admitted, ConnInfo, ConnectionLimit, Refusal};

/// The OID of the identity binding extension, as rcgen takes it.
pub const BINDING_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 53594, 1, 1];

/// The server name the client sends and the DNS name in every node
/// certificate. Constant: a node is identified by its bound key, not by a
/// name, but a fixed name lets stacks that insist on checking one (grpcio
/// with a target name override) do so.
pub const SERVER_NAME: &str = "soma-p2p";

/// How long a server waits by default for a client to complete the TLS
/// handshake before dropping the connection, so silent clients cannot pile
/// up ([`inbound::Config::handshake_timeout`](crate::inbound::Config)).
pub const ACCEPT_HANDSHAKE_TIMEOUT: Duration = crate::inbound::DEFAULT_HANDSHAKE_TIMEOUT;

/// ALPN protocol of gRPC: HTTP/2.
const ALPN_H2: &[u8] = b"h2";

/// The DER prefix of the binding: SEQUENCE of 100 bytes, OCTET STRING of 32.
const BINDING_KEY_PREFIX: [u8; 4] = [0x30, 0x64, 0x04, 0x20];
/// The DER header of the binding's signature: OCTET STRING of 64 bytes.
const BINDING_SIGNATURE_PREFIX: [u8; 2] = [0x04, 0x40];

static BINDING: LazyLock<Oid<'static>> =
    LazyLock::new(|| Oid::from(BINDING_OID).expect("the binding OID is well-formed"));

/// Errors of the TLS transport: making identities, checking certificates,
/// connecting.
#[derive(Clone, Debug, thiserror::Error)]
pub enum TlsError {
    /// Generating the TLS key or signing the certificate failed.
    #[error("generating the certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM input holds no certificate, or no PKCS#8 private key.
    #[error("invalid pem: {0}")]
    Pem(String),
    /// The private key is not the certificate's key.
    #[error("private key does not match the certificate")]
    KeyMismatch,
    /// A certificate is not well-formed, comes with a chain, or has a
    /// critical extension we do not understand.
    #[error("invalid certificate: {0}")]
    Certificate(String),
    /// The certificate's signature does not verify with its own key.
    #[error("certificate is not validly self-signed")]
    NotSelfSigned,
    /// The certificate carries no identity binding.
    #[error("certificate has no identity binding")]
    MissingBinding,
    /// The binding is not the expected DER, appears twice, or its key is
    /// not a valid ed25519 point.
    #[error("malformed identity binding")]
    MalformedBinding,
    /// The binding's signature does not verify over this certificate's key.
    #[error("identity binding signature does not verify")]
    InvalidBinding,
    /// The server proved another identity than the peer dialled.
    #[error("peer is {found}, expected {expected}")]
    UnexpectedPeer {
        /// The peer we dialled.
        expected: PeerId,
        /// The peer the server proved to be.
        found: PeerId,
    },
    /// In private mode, the caller is not on the allowlist.
    #[error("peer {0} is not allowlisted")]
    NotAllowed(PeerId),
    /// rustls refused the configuration or the handshake.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The address is not `host:port`.
    #[error("invalid address {0:?}")]
    Address(String),
    /// Connecting failed: TCP, the TLS handshake, or HTTP/2. Shown with
    /// its causes (tonic's own text is only "transport error").
    #[error("connecting: {}", with_causes(.0.to_string(), std::error::Error::source(.0.as_ref())))]
    Connect(#[source] Arc<tonic::transport::Error>),
    /// Connecting took longer than allowed.
    #[error("timed out")]
    Timeout,
    /// The server's admission rules left no slot for this connection.
    #[error("connection not admitted: {0}")]
    NotAdmitted(#[from] Refusal),
}

/// `text` (an error's) followed by each of its causes from `source` on:
/// "transport error: tcp connect error: Connection refused (os error
/// 111)". Errors of the transport say little more than their kind at the
/// top.
pub fn with_causes(
    mut text: String,
    mut source: Option<&(dyn std::error::Error + 'static)>,
) -> String {
    while let Some(cause) = source {
        let more = cause.to_string();
        // A source often repeats the text of the one it is the source of.
        if !text.ends_with(&more) {
            text = format!("{text}: {more}");
        }
        source = cause.source();
    }
    text
}

/// A node's TLS identity: a P-256 key and its self-signed certificate bound
/// to the node's network key.
#[derive(Clone)]
pub struct NodeIdentity {
    peer_id: PeerId,
    cert: CertificateDer<'static>,
    /// PKCS#8 DER of the TLS key.
    key_der: Vec<u8>,
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

/// A wrong identity, for tests that check forgeries are refused (the
/// `testing` feature).
#[cfg(feature = "testing")]
#[derive(Debug)]
pub enum Forgery {
    /// A certificate without the binding extension.
    NoBinding,
    /// The binding names the network key, but another key signed it.
    SignedByAnotherKey,
    /// The network key signed the key of another certificate.
    BindsOtherCertificate,
}

impl NodeIdentity {
    /// A fresh P-256 TLS key and a self-signed certificate binding it to
    /// `network_key`.
    pub fn generate(network_key: &KeyPair) -> Result<Self, TlsError> {
        Self::build(network_key, |spki| {
            Ok(Some(sign_binding(network_key, network_key, spki)))
        })
    }

    /// An identity whose certificate is wrong as `forgery` says; its
    /// [`peer_id`](Self::peer_id) is `network_key`'s. Only for tests.
    #[cfg(feature = "testing")]
    pub fn forged(network_key: &KeyPair, forgery: Forgery) -> Result<Self, TlsError> {
        let binding = |spki: &[u8]| match forgery {
            Forgery::NoBinding => Ok(None),
            Forgery::SignedByAnotherKey => {
                Ok(Some(sign_binding(network_key, &KeyPair::generate(), spki)))
            }
            Forgery::BindsOtherCertificate => {
                let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
                Ok(Some(sign_binding(
                    network_key,
                    network_key,
                    &other.subject_public_key_info(),
                )))
            }
        };
        Self::build(network_key, binding)
    }

    fn build(
        network_key: &KeyPair,
        binding_of: impl FnOnce(&[u8]) -> Result<Option<Vec<u8>>, TlsError>,
    ) -> Result<Self, TlsError> {
        let tls_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let binding = binding_of(&tls_key.subject_public_key_info())?;

        let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, SERVER_NAME);
        params.custom_extensions = binding
            .map(|content| rcgen::CustomExtension::from_oid_content(BINDING_OID, content))
            .into_iter()
            .collect();
        let cert = params.self_signed(&tls_key)?;
        Ok(NodeIdentity {
            peer_id: network_key.public().into(),
            cert: cert.der().clone(),
            key_der: tls_key.serialize_der(),
            cert_pem: cert.pem(),
            key_pem: tls_key.serialize_pem(),
        })
    }

    /// Loads an identity from its certificate (the first `CERTIFICATE` in
    /// `cert_pem`) and its PKCS#8 key (`PRIVATE KEY`), checking the
    /// certificate the way a peer would and that the key is its key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| TlsError::Pem(format!("certificate: {e}")))?;
        let peer_id = verify_certificate(&cert, &[])?;
        let tls_key =
            rcgen::KeyPair::from_pem(key_pem).map_err(|e| TlsError::Pem(format!("key: {e}")))?;
        let (_, parsed) =
            X509Certificate::from_der(&cert).map_err(|e| TlsError::Certificate(e.to_string()))?;
        if parsed.public_key().raw != tls_key.subject_public_key_info().as_slice() {
            return Err(TlsError::KeyMismatch);
        }
        Ok(NodeIdentity {
            peer_id,
            cert,
            key_der: tls_key.serialize_der(),
            cert_pem: cert_pem.to_owned(),
            key_pem: tls_key.serialize_pem(),
        })
    }

    /// The certificate, PEM-encoded.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The TLS private key, PEM-encoded PKCS#8.
    pub fn key_pem(&self) -> String {
        self.key_pem.clone()
    }

    /// The network key the certificate is bound to.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    fn cert_chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert.clone()]
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivatePkcs8KeyDer::from(self.key_der.clone()).into()
    }
}

/// Who is calling, as established by the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Caller {
    /// A caller that proved this identity.
    Peer(PeerId),
    /// A caller that presented no certificate, or one without a binding
    /// (only possible in [`Access::Public`]).
    Anonymous,
}

impl Caller {
    /// The caller's peer id, `None` if anonymous.
    pub fn peer_id(self) -> Option<PeerId> {
        match self {
            Caller::Peer(p) => Some(p),
            Caller::Anonymous => None,
        }
    }
}

/// Server-side admission rule.
#[derive(Clone, Debug, Default)]
pub struct AccessPolicy {
    /// Whether anonymous callers are let in.
    pub access: Access,
    /// The peers let in under [`Access::Private`]; ignored under
    /// [`Access::Public`]. Read when the server config is made.
    pub allowlist: HashSet<PeerId>,
}

/// The TLS configuration of a server with `identity`, admitting callers
/// by `policy`: TLS 1.3 only, ALPN `h2`, client certificates checked for a
/// valid binding, required and allowlisted in private mode.
pub fn server_config(
    identity: &NodeIdentity,
    policy: &AccessPolicy,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(ClientVerifier {
        policy: policy.clone(),
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.cert_chain(), identity.private_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Where a client config's verifier puts the server's id once a handshake
/// proved it.
pub type VerifiedPeer = Arc<Mutex<Option<PeerId>>>;

/// The TLS configuration of a client presenting `identity` (none: call
/// anonymously), requiring the server to prove `expected` (none: learn
/// it). Returns the config and a slot filled with the server's id once a
/// handshake verified it.
///
/// When `expected` is none, the first id verified is pinned: later
/// handshakes with the same config (a channel reconnecting) must prove it
/// again, so a channel never silently changes peers.
pub fn client_config(
    identity: Option<&NodeIdentity>,
    expected: Option<PeerId>,
) -> Result<(Arc<rustls::ClientConfig>, VerifiedPeer), TlsError> {
    let verifier = Arc::new(ServerVerifier::new(expected));
    let verified = verifier.verified.clone();
    Ok((make_client_config(identity, verifier)?, verified))
}

fn make_client_config(
    identity: Option<&NodeIdentity>,
    verifier: Arc<ServerVerifier>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some(identity) => {
            builder.with_client_auth_cert(identity.cert_chain(), identity.private_key())?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// An accepted TLS connection, its activity watched.
pub type Connection = Watched<TlsStream<Admitted>>;

/// The TLS connections accepted on a listener, for [`crate::serve`] (or
/// [`tonic::transport::Server::serve_with_incoming`]).
pub type Incoming = BoxStream<'static, Result<Connection, tonic_tls::Error>>;

/// Accepts TLS connections on `listener` with `config`, at most
/// [`DEFAULT_MAX_CONNECTIONS`](crate::inbound::DEFAULT_MAX_CONNECTIONS)
/// open at once; see [`incoming_with_limit`].
pub fn incoming(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> Incoming {
    incoming_with_limit(listener, config, ConnectionLimit::default())
}

/// Accepts TLS connections on `listener` with `config`, admitted by
/// `limit` (see [`crate::inbound`]): a socket past a cap is reset as soon
/// as it is accepted, before any handshake work. Handshakes run
/// concurrently, each bounded by the limit's handshake timeout; a failed
/// one is logged and dropped. Once a handshake proves the caller, the
/// limit decides whether it keeps its slot. The streams carry the peer's
/// certificates to the handlers, where [`caller`] reads them.
pub fn incoming_with_limit(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    limit: ConnectionLimit,
) -> Incoming {
    let tcp = TcpIncoming::from(listener).with_nodelay(Some(true));
    let acceptor = Acceptor {
        inner: tokio_rustls::TlsAcceptor::from(config),
        limit: limit.clone(),
    };
    tonic_tls::incoming_inner(Admission::new(tcp, limit), acceptor)
}

/// tonic-tls's rustls acceptor with a handshake timeout, asking the limit
/// whether the proven caller keeps its slot.
#[derive(Clone)]
struct Acceptor {
    inner: tokio_rustls::TlsAcceptor,
    limit: ConnectionLimit,
}

impl tonic_tls::TlsAcceptor<Admitted> for Acceptor {
    type TlsStream = Watched<TlsStream<Admitted>>;

    async fn accept(
        &self,
        stream: Admitted,
    ) -> Result<Watched<TlsStream<Admitted>>, tonic_tls::Error> {
        let toucher = stream.toucher();
        let timeout = self.limit.config().handshake_timeout;
        let stream = match tokio::time::timeout(timeout, self.inner.accept(stream)).await {
            Ok(stream) => stream?,
            Err(_) => {
                self.limit.handshake_timed_out();
                return Err(TlsError::Timeout.into());
            }
        };
        let (io, connection) = stream.get_ref();
        io.identify(caller_of(connection.peer_certificates()))
            .map_err(TlsError::from)?;
        Ok(Watched::new(TlsStream::new(stream), toucher))
    }
}

/// Dials `address` (`host:port`) over TLS as `identity` (none: anonymously),
/// checking the server is `expected` (none: learning who it is). Returns
/// the channel and the server's verified id. `timeout` bounds the TCP
/// connect and the handshake, now and when the channel reconnects.
///
/// With TLS 1.3 the server judges the client's certificate after the
/// client has finished its side of the handshake, so a server that refuses
/// this client (not allowlisted, bad certificate) shows as the first call
/// failing, not as this function failing.
pub async fn connect(
    address: &str,
    identity: Option<&NodeIdentity>,
    expected: Option<PeerId>,
    timeout: Duration,
) -> Result<(Channel, PeerId), TlsError> {
    let bad_address = || TlsError::Address(address.to_owned());
    // "http": the TLS is ours, done by the connector. With "https" tonic
    // would insist on its own TLS if any crate in the build enabled it.
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|_| bad_address())?
        .connect_timeout(timeout);
    if endpoint.uri().port_u16().is_none() || endpoint.uri().path() != "/" {
        return Err(bad_address());
    }
    let verifier = Arc::new(ServerVerifier::new(expected));
    let config = make_client_config(identity, verifier.clone())?;
    let server_name = ServerName::try_from(SERVER_NAME).expect("SERVER_NAME is a DNS name");
    let connector = tonic_tls::rustls::TlsConnector::new(
        tonic_tls::TcpTransport::from_endpoint(&endpoint),
        config,
        server_name,
    );
    let channel =
        match tokio::time::timeout(timeout, endpoint.connect_with_connector(connector)).await {
            Err(_) => return Err(TlsError::Timeout),
            Ok(Err(e)) => {
                return Err(verifier.take_refusal().unwrap_or_else(|| {
                    if is_timeout(&e) {
                        TlsError::Timeout
                    } else {
                        TlsError::Connect(Arc::new(e))
                    }
                }));
            }
            Ok(Ok(channel)) => channel,
        };
    let peer = lock(&verifier.verified).ok_or_else(|| {
        TlsError::Certificate("handshake finished without a verified server".into())
    })?;
    Ok((channel, peer))
}

/// The caller of a request served over [`incoming`]: `Peer(id)` if it
/// presented a certificate, else `Anonymous`.
///
/// The handshake verified the certificate and recorded the caller it
/// proves with the connection (`incoming` yields a connection only after
/// that), so this reads it back without parsing anything per request. A
/// request without that connection info is anonymous.
pub fn caller<T>(request: &tonic::Request<T>) -> Caller {
    request
        .extensions()
        .get::<SslConnectInfo<ConnInfo>>()
        .and_then(|info| info.get_ref().caller)
        .unwrap_or(Caller::Anonymous)
}

/// The caller whose handshake, already verified, presented `certs`.
fn caller_of(certs: Option<&[CertificateDer<'_>]>) -> Caller {
    certs
        .and_then(|certs| {
            let (_, cert) = X509Certificate::from_der(certs.first()?).ok()?;
            let (key, _) = binding(&cert).ok()?;
            Some(Caller::Peer(key.into()))
        })
        .unwrap_or(Caller::Anonymous)
}

/// The host a request came from, as fetch slots count it (see
/// [`crate::inbound::host`]: an IPv4 address, or an IPv6 /48; its
/// [`crate::inbound::network`] is the network it counts in), unless its
/// caller skips those caps (a committee member, an allowlisted peer, an
/// exempt loopback caller): `None` then, and when the address is
/// not known. Limits per identity are no limits where identities are
/// free; limits per host and per network are.
pub fn origin<T>(request: &tonic::Request<T>) -> Option<std::net::IpAddr> {
    let info = request.extensions().get::<SslConnectInfo<ConnInfo>>()?;
    let info = info.get_ref();
    if info.uncapped {
        return None;
    }
    Some(crate::inbound::host(info.tcp.remote_addr()?.ip()))
}

/// The count of answer bytes handed and not written of the connection a
/// request came on (see [`crate::backlog`]), when it was served over
/// [`incoming`].
pub fn send_backlog(
    extensions: &tonic::codegen::http::Extensions,
) -> Option<std::sync::Arc<crate::backlog::SendBacklog>> {
    extensions
        .get::<SslConnectInfo<ConnInfo>>()
        .map(|info| info.get_ref().backlog.clone())
}

/// The socket address a request came from, when it was served over
/// [`incoming`]: it names the connection the call came on.
pub fn remote_addr<T>(request: &tonic::Request<T>) -> Option<std::net::SocketAddr> {
    request
        .extensions()
        .get::<SslConnectInfo<ConnInfo>>()
        .and_then(|info| info.get_ref().tcp.remote_addr())
}

/// Checks a peer's certificate (see the module docs) and returns the id it
/// proves.
fn verify_certificate(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<PeerId, TlsError> {
    if !intermediates.is_empty() {
        return Err(TlsError::Certificate(
            "a chain instead of a single certificate".into(),
        ));
    }
    let (rest, cert) =
        X509Certificate::from_der(end_entity).map_err(|e| TlsError::Certificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(TlsError::Certificate("trailing bytes".into()));
    }
    cert.verify_signature(None)
        .map_err(|_| TlsError::NotSelfSigned)?;
    let unknown_critical = cert.extensions().iter().any(|ext| {
        ext.critical
            && ext.oid != *BINDING
            && matches!(
                ext.parsed_extension(),
                ParsedExtension::UnsupportedExtension { .. }
            )
    });
    if unknown_critical {
        return Err(TlsError::Certificate("unknown critical extension".into()));
    }
    let (key, signature) = binding(&cert)?;
    let spki = Digest::of(cert.public_key().raw);
    if !key.verify(Domain::TlsBinding, &spki, &signature) {
        return Err(TlsError::InvalidBinding);
    }
    Ok(key.into())
}

/// The network key and signature of `cert`'s binding, unverified.
fn binding(cert: &X509Certificate<'_>) -> Result<(PublicKey, Signature), TlsError> {
    let mut bindings = cert.extensions().iter().filter(|ext| ext.oid == *BINDING);
    let ext = bindings.next().ok_or(TlsError::MissingBinding)?;
    if bindings.next().is_some() {
        return Err(TlsError::MalformedBinding);
    }
    decode_binding(ext.value).ok_or(TlsError::MalformedBinding)
}

/// The binding of `network_key` to the TLS key `spki`, signed by `signer`
/// (the network key itself, unless a test forges it).
fn sign_binding(network_key: &KeyPair, signer: &KeyPair, spki: &[u8]) -> Vec<u8> {
    let signature = signer.sign_digest(Domain::TlsBinding, &Digest::of(spki));
    encode_binding(&network_key.public(), &signature)
}

/// The DER of the binding extension's content.
fn encode_binding(key: &PublicKey, signature: &Signature) -> Vec<u8> {
    let mut der = Vec::with_capacity(102);
    der.extend_from_slice(&BINDING_KEY_PREFIX);
    der.extend_from_slice(key.as_bytes());
    der.extend_from_slice(&BINDING_SIGNATURE_PREFIX);
    der.extend_from_slice(&signature.0);
    der
}

/// Parses exactly the DER [`encode_binding`] writes; DER has one encoding
/// per value, so anything else is malformed.
fn decode_binding(der: &[u8]) -> Option<(PublicKey, Signature)> {
    let body = der.strip_prefix(&BINDING_KEY_PREFIX)?;
    let (key, rest) = body.split_first_chunk::<32>()?;
    let signature = rest.strip_prefix(&BINDING_SIGNATURE_PREFIX)?;
    let signature = Signature(signature.try_into().ok()?);
    Some((PublicKey::from_bytes(key).ok()?, signature))
}

/// The crypto of both sides, explicitly ring: never a process-wide default.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Logs why a certificate was refused and turns it into the rustls error
/// that fails the handshake.
fn refuse(error: TlsError) -> rustls::Error {
    tracing::debug!(%error, "refused peer certificate");
    let reason = match error {
        // Alerts "access denied" rather than "bad certificate".
        TlsError::NotAllowed(_) | TlsError::UnexpectedPeer { .. } => {
            CertificateError::ApplicationVerificationFailure
        }
        error => CertificateError::Other(OtherError(Arc::new(error))),
    };
    rustls::Error::InvalidCertificate(reason)
}

fn lock<T: Copy>(slot: &Mutex<T>) -> T {
    *slot.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether a connect error is a timeout of the TCP connect or handshake.
fn is_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return true;
        }
        next = error.source();
    }
    false
}

/// The server's side: checks client certificates.
#[derive(Debug)]
struct ClientVerifier {
    policy: AccessPolicy,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.policy.access == Access::Private
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match verify_certificate(end_entity, intermediates) {
            Ok(peer) => {
                if self.policy.access == Access::Private && !self.policy.allowlist.contains(&peer) {
                    return Err(refuse(TlsError::NotAllowed(peer)));
                }
                Ok(ClientCertVerified::assertion())
            }
            // A plain self-signed certificate, as standard gRPC tools
            // present: an anonymous caller, admitted in public mode only.
            // It still had to be self-signed, and the handshake signature
            // is still checked against its key.
            Err(TlsError::MissingBinding) if self.policy.access == Access::Public => {
                Ok(ClientCertVerified::assertion())
            }
            Err(error) => Err(refuse(error)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Unreachable with TLS 1.3 only; correct regardless.
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The client's side: checks the server's certificate and who it is.
#[derive(Debug)]
struct ServerVerifier {
    expected: Option<PeerId>,
    /// The server's id, once a handshake proved it.
    verified: VerifiedPeer,
    /// Why the last certificate was refused, for [`connect`] to report.
    refusal: Mutex<Option<TlsError>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerVerifier {
    fn new(expected: Option<PeerId>) -> Self {
        ServerVerifier {
            expected,
            verified: Arc::new(Mutex::new(None)),
            refusal: Mutex::new(None),
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }

    fn take_refusal(&self) -> Option<TlsError> {
        self.refusal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<PeerId, TlsError> {
        let found = verify_certificate(end_entity, intermediates)?;
        match self.expected.or(lock(&self.verified)) {
            Some(expected) if expected != found => {
                Err(TlsError::UnexpectedPeer { expected, found })
            }
            _ => Ok(found),
        }
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.check(end_entity, intermediates) {
            Ok(_) => Ok(ServerCertVerified::assertion()),
            Err(error) => {
                *self.refusal.lock().unwrap_or_else(PoisonError::into_inner) = Some(error.clone());
                Err(refuse(error))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Unreachable with TLS 1.3 only; correct regardless.
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let valid = rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)?;
        // Only now has the server proved it holds the certificate's key:
        // record its id (verify_server_cert checked this same certificate).
        let peer = self.check(cert, &[]).map_err(refuse)?;
        *self.verified.lock().unwrap_or_else(PoisonError::into_inner) = Some(peer);
        Ok(valid)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
