//! Cluster certificates and the QUIC TLS configurations built from them.
//!
//! `locus-server init` (and `locus up`) make a cluster CA and sign one
//! certificate per node and per client. Every connection is mutual TLS: a
//! peer whose certificate the CA did not sign is refused during the
//! handshake. A certificate's role sits in its subject's OU field and the
//! server checks it per request ([`Role`]).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The DNS name every node certificate carries and clients verify.
pub const SERVER_NAME: &str = "locus";
/// A connection that hears nothing for this long is closed (a peer that
/// died without closing it, or was stopped, is noticed within this time).
/// As long as the metadata service takes to call a chunk server dead: a
/// write to a killed replica stalls this long before the chain drops it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Keep-alive on open connections, well under [`IDLE_TIMEOUT`].
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);
/// Concurrent requests one connection may have open.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// What a certificate allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Role {
    /// A Locus server: may join Raft and call any server.
    Node,
    /// An administrator: everything a client may do, plus cluster changes.
    Admin,
    /// A filesystem client: namespace and data.
    Client,
    /// A VM host agent.
    Host,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Admin => "admin",
            Role::Client => "client",
            Role::Host => "host",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "node" => Role::Node,
            "admin" => Role::Admin,
            "client" => Role::Client,
            "host" => Role::Host,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a PEM {what}")]
    Pem { path: PathBuf, what: &'static str },
    #[error("certificate generation: {0}")]
    Gen(#[from] rcgen::Error),
    #[error("tls configuration: {0}")]
    Config(String),
    #[error("peer certificate: {0}")]
    Peer(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io { path: path.to_path_buf(), source }
}

/// The files of one identity: the cluster CA, a certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Identity {
    /// The identity named `name` in a certificate directory.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        Identity { ca: dir.join("ca.pem"), cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) }
    }
}

/// Creates the cluster CA in `dir` unless one exists. Returns whether it made one.
pub fn init_ca(dir: &Path) -> Result<bool, TlsError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    if cert_path.exists() && key_path.exists() {
        return Ok(false);
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Locus cluster CA");
    dn.push(DnType::OrganizationName, "Locus");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let cert = params.self_signed(&key)?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
    Ok(true)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))
}

/// Signs a certificate for `name` with `role` using the CA in `dir`, and
/// writes `<name>.pem` and `<name>.key` there. Node certificates are valid
/// for [`SERVER_NAME`], `localhost` and the given IP addresses.
pub fn issue(dir: &Path, name: &str, role: Role, ips: &[IpAddr]) -> Result<Identity, TlsError> {
    let ca_key_path = dir.join("ca.key");
    let ca_cert_path = dir.join("ca.pem");
    let ca_key_pem = std::fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    let ca_pem = std::fs::read_to_string(&ca_cert_path).map_err(io(&ca_cert_path))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;

    let mut sans = vec![SERVER_NAME.to_string(), "localhost".to_string()];
    sans.extend(ips.iter().map(|ip| ip.to_string()));
    let mut params = CertificateParams::new(if role == Role::Node { sans } else { Vec::new() })?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "Locus");
    dn.push(DnType::OrganizationalUnitName, role.as_str());
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let id = Identity::in_dir(dir, name);
    write_private(&id.key, key.serialize_pem().as_bytes())?;
    std::fs::write(&id.cert, cert.pem()).map_err(io(&id.cert))?;
    Ok(id)
}

/// ring's suites with AES-128-GCM first: every byte of the data path is
/// sealed once per hop, and AES-128 does it in 10 rounds where AES-256
/// takes 14 (both as strong as the cluster's P-256 certificates need).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// The cluster's identity: blake3 of its CA certificates (DER). Local
/// sockets compare it, so a client never takes another cluster's server
/// for its own (two clusters in two network namespaces may both have a
/// server at 127.0.0.1:7111).
pub fn cluster_fingerprint(id: &Identity) -> Result<[u8; 32], TlsError> {
    let mut h = blake3::Hasher::new();
    for c in load_certs(&id.ca)? {
        h.update(&(c.len() as u64).to_le_bytes());
        h.update(&c);
    }
    Ok(*h.finalize().as_bytes())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(TlsError::Pem { path: path.to_path_buf(), what: "certificate" });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| TlsError::Pem { path: path.to_path_buf(), what: "private key" })
}

fn roots(id: &Identity) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(&id.ca)? {
        roots.add(c).map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// The largest datagram MTU discovery probes for (and endpoints accept).
/// Measured on loopback (`locus-bench data --targets lib`, CPU seconds of
/// the whole cluster for the same bytes): 1472 costs twice what 4096 does
/// (per-datagram work in quinn and the kernel), and 8192 or 16384 cost
/// more again than 4096. A little above 4096, so that the answer to a
/// 4 KiB read (the data and its headers) fits one datagram, not two.
/// Ethernet paths settle at their own MTU.
const MTU_UPPER_BOUND: u16 = 4096 + 512;

/// Ack-eliciting packets a peer may receive before it must acknowledge.
const ACK_ELICITING_THRESHOLD: u32 = 8;

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("idle timeout fits")));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_concurrent_bidi_streams(MAX_STREAMS_PER_CONNECTION.into());
    t.max_concurrent_uni_streams(0u32.into());
    // Bulk data moves over these connections: allow a few MiB in flight.
    t.stream_receive_window((16u32 << 20).into());
    t.receive_window((64u32 << 20).into());
    t.send_window(64 << 20);
    // Probe for datagrams larger than Ethernet's: loopback and jumbo-frame
    // links carry bulk data in fewer packets.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    t.mtu_discovery_config(Some(mtu));
    // Ask the peer to acknowledge every few packets rather than every
    // second one (the ACK frequency extension; both ends are quinn). A 4 KiB
    // read is one datagram each way; with the default the server sent an
    // acknowledgement-only datagram for nearly every request and the
    // client one for nearly every answer, each a syscall and a wakeup on
    // both sides. Acknowledgements still ride on every data packet, and
    // the peer's delay is bounded by its max_ack_delay.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(ACK_ELICITING_THRESHOLD.into());
    t.ack_frequency_config(Some(ack));
    Arc::new(t)
}

/// The server side: requires a client certificate signed by the cluster CA
/// and offers `alpns`.
pub fn server_config(id: &Identity, alpns: &[&[u8]]) -> Result<quinn::ServerConfig, TlsError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(id)?, provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&id.cert)?, load_key(&id.key)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    tls.max_early_data_size = 0;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(transport_config());
    Ok(cfg)
}

/// The client side: presents this identity, trusts only the cluster CA and
/// speaks `alpn`.
pub fn client_config(id: &Identity, alpn: &[u8]) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(id)?)
        .with_client_auth_cert(load_certs(&id.cert)?, load_key(&id.key)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport_config());
    Ok(cfg)
}

/// Creates the cluster CA and the certificates of `nodes` metadata nodes
/// (`node-1` ..), `chunk_servers` chunk servers (`chunk-1` ..) and the
/// standard clients (`admin`, `client`, `host`) in `dir`. Existing files are
/// kept. Returns what it made.
pub fn init_cluster_certs(dir: &Path, nodes: u64, chunk_servers: u64, ips: &[IpAddr]) -> Result<Vec<String>, TlsError> {
    let mut made = Vec::new();
    if init_ca(dir)? {
        made.push("ca".to_string());
    }
    let mut want: Vec<(String, Role)> = (1..=nodes).map(|i| (format!("node-{i}"), Role::Node)).collect();
    want.extend((1..=chunk_servers).map(|i| (format!("chunk-{i}"), Role::Node)));
    want.push(("admin".into(), Role::Admin));
    want.push(("client".into(), Role::Client));
    want.push(("host".into(), Role::Host));
    for (name, role) in want {
        let id = Identity::in_dir(dir, &name);
        if id.cert.exists() && id.key.exists() {
            continue;
        }
        issue(dir, &name, role, ips)?;
        made.push(name);
    }
    Ok(made)
}

/// The role and name in the peer's (already verified) certificate.
pub fn peer_identity(conn: &quinn::Connection) -> Result<(Role, String), TlsError> {
    let any = conn.peer_identity().ok_or_else(|| TlsError::Peer("no certificate".into()))?;
    let certs = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TlsError::Peer("unexpected identity type".into()))?;
    let der = certs.first().ok_or_else(|| TlsError::Peer("empty chain".into()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::Peer(e.to_string()))?;
    let subject = cert.subject();
    let role = subject
        .iter_organizational_unit()
        .filter_map(|a| a.as_str().ok())
        .find_map(Role::parse)
        .ok_or_else(|| TlsError::Peer("no role in subject".into()))?;
    let name = subject.iter_common_name().filter_map(|a| a.as_str().ok()).next().unwrap_or("").to_string();
    Ok((role, name))
}

/// The negotiated ALPN of a connection.
pub fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?.downcast::<quinn::crypto::rustls::HandshakeData>().ok()?.protocol
}

/// Socket buffer asked for each QUIC endpoint. Bulk transfers send bursts
/// of large datagrams; with the kernel's default (~208 KiB) a burst
/// overflows the receiver's buffer, and every dropped datagram costs a
/// retransmission and a halved congestion window. At 8 MiB a sequential
/// write through the mount still lost about 80 datagrams per 2 GiB (two
/// cores: a receiver is not always running); at 32 MiB none, and 1 GiB
/// `dd` runs went from 157-196 to 178-206 MB/s. The kernel takes memory
/// only for datagrams queued, not for the limit.
const UDP_BUFFER_BYTES: usize = 32 << 20;

/// Sets a socket buffer option, past `net.core.{r,w}mem_max` when allowed
/// (root: the `FORCE` variant), else as large as the limit allows.
fn set_buffer(fd: std::os::fd::RawFd, force: libc::c_int, plain: libc::c_int, bytes: usize) {
    let v = bytes as libc::c_int;
    let set = |opt| {
        // SAFETY: fd is a live socket; the value is a c_int of the right size.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &v as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    if set(force) != 0 && set(plain) != 0 {
        tracing::debug!(bytes, "could not enlarge a UDP socket buffer");
    }
}

/// A QUIC endpoint on `bind` with large socket buffers; a server endpoint
/// when `server` is given.
pub fn bind_endpoint(bind: SocketAddr, server: Option<quinn::ServerConfig>) -> std::io::Result<quinn::Endpoint> {
    use std::os::fd::AsRawFd;
    let socket = std::net::UdpSocket::bind(bind)?;
    let fd = socket.as_raw_fd();
    set_buffer(fd, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, UDP_BUFFER_BYTES);
    set_buffer(fd, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, UDP_BUFFER_BYTES);
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime for the QUIC endpoint"))?;
    let mut cfg = quinn::EndpointConfig::default();
    // Accept datagrams as large as MTU discovery may settle on (the
    // default, 1472, would cap every path at Ethernet size).
    cfg.max_udp_payload_size(MTU_UPPER_BOUND).map_err(|e| std::io::Error::other(e.to_string()))?;
    quinn::Endpoint::new(cfg, server, socket, runtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_and_load() {
        let d = tempfile::tempdir().unwrap();
        assert!(init_ca(d.path()).unwrap());
        assert!(!init_ca(d.path()).unwrap(), "an existing CA is kept");
        let id = issue(d.path(), "node-1", Role::Node, &["127.0.0.1".parse().unwrap()]).unwrap();
        server_config(&id, &[b"x"]).unwrap();
        let admin = issue(d.path(), "admin", Role::Admin, &[]).unwrap();
        client_config(&admin, b"x").unwrap();
        let mode = std::fs::metadata(&admin.key).unwrap().permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
    }
}
