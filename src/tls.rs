//! HTTPS: the rustls server configuration read from PEM files, its reload, and the acceptor
//! that hands a verified client certificate to the HTTP layer.
//!
//! - One crypto provider for the whole process: aws-lc-rs, installed as rustls' process default
//!   by [`install_crypto_provider`] before anything builds a TLS configuration.
//! - [`load_server_config`] reads the certificate chain and the private key (and the client CA
//!   bundle for mutual TLS) and checks that the key belongs to the certificate; every failure
//!   names the file. ALPN offers `h2` then `http/1.1`, so clients that speak HTTP/2 get it.
//! - [`ClientCertAcceptor`] wraps axum-server's rustls acceptor: after the handshake it reads the
//!   client's certificate (verified by rustls against the client CA) and inserts a
//!   [`ClientCertificate`] into the extensions of every request on that connection.
//! - [`reload_on_sighup`] re-reads the files on `SIGHUP`; a pair that does not load is logged
//!   and the certificate in service stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::Request;
use axum_server::accept::Accept;

use crate::http::idle::{Activity, IdleClose, Tracked};
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;

use crate::http::identity::ClientCertificate;

/// ALPN protocols offered, in order of preference.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Whether clients must present a certificate when a client CA is configured.
#[derive(clap::ValueEnum, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// A client may connect without a certificate (and authenticate another way, e.g. an API
    /// key); one that presents a certificate must chain to the client CA or the handshake fails.
    #[default]
    Optional,
    /// Every client must present a certificate that chains to the client CA.
    Required,
}

/// Where the server's TLS material comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM bundle of the CAs that client certificates must chain to (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// Whether a client certificate is required when `client_ca` is set.
    pub client_auth: ClientAuth,
}

/// The TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a PEM file: {source}")]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path}: no certificate in the file")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no private key in the file")]
    NoPrivateKey { path: PathBuf },
    #[error(
        "{path}: the private key is encrypted; give the server an unencrypted key readable by its user only (e.g. openssl pkey -in KEY -out PLAIN)"
    )]
    EncryptedKey { path: PathBuf },
    #[error("certificate {cert} and key {key} cannot be used together: {source}")]
    CertifiedKey {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("client CA {path}: {source}")]
    ClientCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    /// A certificate in the client CA file is not a CA's: with it as a trust anchor, its key
    /// could sign any client identity (an operator "pinning" one client's certificate).
    #[error(
        "client CA {path}: certificate {index} ({subject}) is not a CA certificate ({reason}); --tls-client-ca takes the CAs that issue client certificates, not a client's own certificate"
    )]
    NotACa {
        path: PathBuf,
        index: usize,
        subject: String,
        reason: &'static str,
    },
    #[error("client CA {path}: {source}")]
    ClientVerifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
}

/// The log lines of connections refused over the connection cap ([`crate::log_limit`]).
static OVER_CAP_LOG: crate::log_limit::LogLimit = crate::log_limit::LogLimit::new();

/// The log lines of client certificates refused in the handshake, one limit per reason (one
/// shared limit let untrusted certificates sent every second hide real clients' expired
/// ones: a re-attack finding).
static CLIENT_CERT_LOGS: [crate::log_limit::LogLimit; CERTIFICATE_REFUSALS.len()] =
    [const { crate::log_limit::LogLimit::new() }; CERTIFICATE_REFUSALS.len()];

/// The reasons a client certificate is refused for, as [`certificate_refusal`] names them.
const CERTIFICATE_REFUSALS: [&str; 8] = [
    "none_presented",
    "unknown_issuer",
    "expired",
    "not_yet_valid",
    "wrong_purpose",
    "revoked",
    "bad_signature",
    "other_certificate_error",
];

/// Why the handshake refused a client certificate (an index into [`CERTIFICATE_REFUSALS`]),
/// or `None` for another handshake failure.
fn certificate_refusal(error: &rustls::Error) -> Option<usize> {
    use rustls::CertificateError as E;
    let reason = match error {
        rustls::Error::NoCertificatesPresented => "none_presented",
        rustls::Error::InvalidCertificate(e) => match e {
            E::UnknownIssuer => "unknown_issuer",
            E::Expired | E::ExpiredContext { .. } => "expired",
            E::NotValidYet | E::NotValidYetContext { .. } => "not_yet_valid",
            E::InvalidPurpose | E::InvalidPurposeContext { .. } => "wrong_purpose",
            E::Revoked => "revoked",
            E::BadSignature | E::UnsupportedSignatureAlgorithmContext { .. } => "bad_signature",
            _ => "other_certificate_error",
        },
        _ => return None,
    };
    CERTIFICATE_REFUSALS.iter().position(|r| *r == reason)
}

/// What a TLS listener does with a connection that ended before it was served (its
/// acceptor's error): a client certificate the handshake refused (expired, from a CA not
/// trusted, not for client authentication, none where one is required) is a warning, at most
/// one line a second, and counted in `nightingale_tls_handshake_failures_total{reason =
/// "client_certificate"}`, so that an operator sees failed client authentication and
/// probing (they were logged at debug level only); other handshake failures are counted as
/// `handshake` and logged at debug level, as the acceptor's own refusals (caps, plain HTTP)
/// are here (those are counted and logged where they happen).
pub fn connection_refused(peer: Option<&std::net::SocketAddr>, e: &std::io::Error) {
    let tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let peer = peer.map_or_else(|| "-".to_owned(), |p| p.ip().to_string());
    match tls.map(|error| (error, certificate_refusal(error))) {
        Some((error, Some(reason))) => {
            metrics::counter!(
                "nightingale_tls_handshake_failures_total",
                "reason" => CERTIFICATE_REFUSALS[reason]
            )
            .increment(1);
            if let Some(held) = CLIENT_CERT_LOGS[reason].allow() {
                tracing::warn!(
                    peer = %peer,
                    reason = CERTIFICATE_REFUSALS[reason],
                    error = %error,
                    not_logged_before = held,
                    "TLS connection refused: its client certificate was not accepted"
                );
            }
        }
        Some((error, None)) => {
            metrics::counter!("nightingale_tls_handshake_failures_total", "reason" => "handshake")
                .increment(1);
            tracing::debug!(peer = %peer, error = %error, "TLS handshake failed");
        }
        None => tracing::debug!(peer = %peer, error = %e, "TLS connection refused"),
    }
}

/// Installs aws-lc-rs as rustls' process-wide crypto provider. Idempotent: a provider already
/// installed (by an earlier call) stays.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The largest certificate chain, key or CA file read (PEM: a chain of a dozen certificates
/// is tens of KiB).
const MAX_PEM_BYTES: u64 = 1 << 20;

/// Reads a PEM file: a regular file (a link is followed) of at most [`MAX_PEM_BYTES`]. A
/// FIFO would block the read (and with it every later reload), a device such as `/dev/zero`
/// would never end: both are refused, as a file too large is (red-team finding: a link to
/// `/dev/zero` swapped in for the certificate took gigabytes on SIGHUP).
fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    crate::files::read_regular(path, MAX_PEM_BYTES).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    crate::files::warn_if_others_can_read(path, "the TLS private key");
    // PKCS#8 encrypted, or a traditional PEM key with its encryption headers: both read as
    // "no private key" or "not a PEM file" otherwise.
    let text = String::from_utf8_lossy(&bytes);
    if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || text.contains("Proc-Type: 4,ENCRYPTED")
    {
        return Err(TlsError::EncryptedKey {
            path: path.to_owned(),
        });
    }
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|source| match source {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_owned(),
        },
        source => TlsError::Pem {
            path: path.to_owned(),
            source,
        },
    })
}

/// Reads the PEM files and builds the server configuration (ALPN `h2`, `http/1.1`). Call
/// [`install_crypto_provider`] first.
pub fn load_server_config(settings: &TlsSettings) -> Result<Arc<ServerConfig>, TlsError> {
    let (config, verifier) = load_parts(settings)?;
    put_in_service(verifier);
    Ok(config)
}

/// A client certificate verifier, the one of the configuration in service.
type Verifier = Arc<dyn rustls::server::danger::ClientCertVerifier>;

/// Makes `verifier` the one open connections' certificates are verified again with, and bumps
/// the generation so that they are ([`ClientCertificate::stale`]).
fn put_in_service(verifier: Option<Verifier>) {
    *CLIENT_VERIFIER.write().unwrap_or_else(|p| p.into_inner()) = verifier;
    CLIENT_CA_GENERATION.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
}

/// The server configuration, and its client certificate verifier (with `--tls-client-ca`).
fn load_parts(settings: &TlsSettings) -> Result<(Arc<ServerConfig>, Option<Verifier>), TlsError> {
    let mut client_verifier: Option<Verifier> = None;
    let chain = certificates(&settings.cert)?;
    let key = private_key(&settings.key)?;
    let builder = ServerConfig::builder();
    let builder = match &settings.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for (i, ca) in certificates(path)?.into_iter().enumerate() {
                check_is_ca(&ca).map_err(|(subject, reason)| TlsError::NotACa {
                    path: path.clone(),
                    index: i + 1,
                    subject,
                    reason,
                })?;
                roots.add(ca).map_err(|source| TlsError::ClientCa {
                    path: path.clone(),
                    source,
                })?;
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots));
            let verifier = match settings.client_auth {
                ClientAuth::Optional => verifier.allow_unauthenticated(),
                ClientAuth::Required => verifier,
            };
            let verifier = verifier
                .build()
                .map_err(|source| TlsError::ClientVerifier {
                    path: path.clone(),
                    source,
                })?;
            client_verifier = Some(verifier.clone());
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config =
        builder
            .with_single_cert(chain, key)
            .map_err(|source| TlsError::CertifiedKey {
                cert: settings.cert.clone(),
                key: settings.key.clone(),
                source,
            })?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    if settings.client_ca.is_some() {
        // No session resumption where clients present certificates: a resumed session brings
        // back the certificate of its first handshake unchecked, so a client kept its identity
        // past its certificate's expiry for as long as it resumed (a review's finding). Every
        // connection is a full handshake, checked against the CAs (and their reload) of now.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok((Arc::new(config), client_verifier))
}

/// `Ok` when `der` is a CA certificate (basic constraints `CA:TRUE`, and a key usage, where
/// given, that allows signing certificates); else its subject and what is wrong.
fn check_is_ca(der: &CertificateDer<'_>) -> Result<(), (String, &'static str)> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    // One that cannot be parsed is refused too: webpki takes a trust anchor's subject and
    // key from a certificate whose other fields are barely read, so a garbled "v1" client
    // certificate passed as a CA let its key mint identities (a re-attack's finding).
    let Ok((_, cert)) = X509Certificate::from_der(der.as_ref()) else {
        return Err((
            "(cannot be read)".to_owned(),
            "it is not a well-formed X.509 certificate",
        ));
    };
    let subject = crate::log_line::printable(&cert.subject().to_string()).into_owned();
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(Some(_)) => return Err((subject, "basic constraints say CA:FALSE")),
        Ok(None) => return Err((subject, "no basic constraints extension")),
        Err(_) => return Err((subject, "its basic constraints cannot be read")),
    }
    match cert.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => {
            Err((subject, "its key usage does not allow signing certificates"))
        }
        Err(_) => Err((subject, "its key usage cannot be read")),
        _ => Ok(()),
    }
}

/// Re-reads the TLS files on every `SIGHUP` (until the task is dropped). New connections get
/// the new certificate; connections already open keep theirs. A pair that does not load is
/// logged and the configuration in service stays.
#[cfg(unix)]
pub async fn reload_on_sighup(settings: TlsSettings, config: RustlsConfig) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP: TLS reload is off");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        let loaded = {
            let settings = settings.clone();
            tokio::task::spawn_blocking(move || {
                load_parts(&settings).map(|c| (c, validity_problem(&settings.cert)))
            })
            .await
        };
        match loaded {
            Ok(Ok((_, Some(problem)))) => tracing::error!(
                cert = %settings.cert.display(),
                problem = %problem,
                "SIGHUP: TLS reload refused: the new certificate is not valid now; the previous certificate stays in service"
            ),
            Ok(Ok(((new, verifier), None))) => {
                config.reload_from_config(new);
                tracing::info!(
                    cert = %settings.cert.display(),
                    "SIGHUP: TLS certificate reloaded"
                );
                // The client CAs as read now: open connections' certificates are verified
                // again against them at their next request, and refused (401) if they no
                // longer chain to them.
                if let Some(path) = &settings.client_ca {
                    put_in_service(verifier);
                    tracing::info!(
                        client_ca = %path.display(),
                        "SIGHUP: client CAs reloaded; open connections' certificates are verified again against them"
                    );
                }
            }
            Ok(Err(e)) => tracing::error!(
                error = %e,
                "SIGHUP: TLS reload failed; the previous certificate stays in service"
            ),
            Err(e) => tracing::error!(error = %e, "SIGHUP: TLS reload task failed"),
        }
    }
}

/// Why the first certificate of the chain in `cert` is not valid now (expired, or not yet
/// valid), if it is not: clients refuse such a certificate, so the server says so (a warning
/// at start-up; a reload to it is refused). `None` when it is valid, or cannot be read (the
/// load reports that).
pub fn validity_problem(cert: &Path) -> Option<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let chain = certificates(cert).ok()?;
    let now = x509_parser::time::ASN1Time::now();
    // Every certificate of the chain: an expired intermediate fails clients as an expired
    // leaf does (a re-attack finding: a reload to one was taken).
    for (i, der) in chain.iter().enumerate() {
        let Ok((_, c)) = X509Certificate::from_der(der.as_ref()) else {
            continue;
        };
        let which = if i == 0 {
            String::new()
        } else {
            format!("chain certificate {} ({}): ", i + 1, c.subject())
        };
        let validity = c.validity();
        if now < validity.not_before {
            return Some(format!("{which}not valid before {}", validity.not_before));
        }
        if now > validity.not_after {
            return Some(format!("{which}expired on {}", validity.not_after));
        }
    }
    None
}

/// The [`ClientCertificate`] of a chain a client presented (leaf first), verified against the
/// client CAs of `generation`: the leaf's subject as RFC 4514 text (most specific RDN first,
/// e.g. `CN=pacs-gateway,O=Radiology`, as `openssl x509 -nameopt RFC2253` prints it for ASCII
/// names) and the SHA-256 of its DER bytes. A certificate with an empty subject (a workload
/// certificate that names itself in its subject alternative names only) is known by those
/// names, `SAN:DNS:a.example,URI:spiffe://…` (in the certificate's order); one with neither by
/// its SHA-256, `SHA256:<hex>`: every such certificate was the one caller `tls:`. `None` if
/// the chain is empty or its leaf does not parse.
pub fn client_certificate(
    chain: &[CertificateDer<'_>],
    generation: u64,
) -> Option<ClientCertificate> {
    use x509_parser::asn1_rs::ToDer;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let der = chain.first()?.as_ref();
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let registry = x509_parser::objects::oid_registry();
    let mut rdns = Vec::new();
    for rdn in cert
        .subject()
        .iter_rdn()
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        let mut attrs = Vec::new();
        for attr in rdn.iter() {
            let name = x509_parser::objects::oid2abbrev(attr.attr_type(), registry)
                .map(str::to_owned)
                .unwrap_or_else(|_| attr.attr_type().to_id_string());
            let value = match attr.as_str() {
                Ok(s) => escape_rfc4514(s),
                // Not a string type: RFC 4514's hex form of the value's DER.
                Err(_) => format!("#{}", hex::encode(attr.attr_value().to_der_vec().ok()?)),
            };
            attrs.push(format!("{name}={value}"));
        }
        rdns.push(attrs.join("+"));
    }
    let sha256 = hex::encode(Sha256::digest(der));
    let mut subject = rdns.join(",");
    if subject.is_empty() {
        subject = alternative_names(&cert)
            .map(|names| format!("SAN:{names}"))
            .unwrap_or_else(|| format!("SHA256:{sha256}"));
    }
    // Verified again from its chain's earliest notAfter on (an intermediate may expire
    // before the leaf), and once the client CAs change after `generation`.
    let not_after = earliest_not_after_after(chain, i64::MIN).unwrap_or(i64::MAX);
    Some(ClientCertificate {
        subject,
        sha256,
        chain: chain.iter().map(|d| d.clone().into_owned()).collect(),
        not_after: Arc::new(std::sync::atomic::AtomicI64::new(not_after)),
        checked: Arc::new(std::sync::atomic::AtomicU64::new(generation)),
    })
}

/// Bumped each time a verifier is put in service (start-up, each SIGHUP reload with
/// `--tls-client-ca`): certificates verified against an earlier one are verified again at
/// their next request ([`ClientCertificate::stale`]).
static CLIENT_CA_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The generation of the client CAs in service.
pub fn client_ca_generation() -> u64 {
    CLIENT_CA_GENERATION.load(std::sync::atomic::Ordering::Acquire)
}

/// The client certificate verifier in service (the one of the configuration new handshakes
/// get): [`ClientCertificate::stale`] verifies open connections' chains again with it.
static CLIENT_VERIFIER: std::sync::RwLock<
    Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
> = std::sync::RwLock::new(None);

/// Why a chain verified again failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reverified {
    /// A certificate of every path is past its notAfter.
    Expired,
    /// The client CAs in service do not trust it (or none are).
    Untrusted,
}

/// Verifies `chain` (leaf first) again against the client CAs in service, now.
pub fn verify_in_service(chain: &[CertificateDer<'static>]) -> Result<(), Reverified> {
    let verifier = CLIENT_VERIFIER
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let (Some(verifier), Some((leaf, intermediates))) = (verifier, chain.split_first()) else {
        return Err(Reverified::Untrusted);
    };
    match verifier.verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now()) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. },
        )) => Err(Reverified::Expired),
        Err(_) => Err(Reverified::Untrusted),
    }
}

/// The earliest notAfter of a chain's certificates that is after `now` (Unix seconds).
pub fn earliest_not_after_after(chain: &[CertificateDer<'_>], now: i64) -> Option<i64> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    chain
        .iter()
        .filter_map(|der| X509Certificate::from_der(der.as_ref()).ok())
        .map(|(_, c)| c.validity().not_after.timestamp())
        .filter(|t| *t > now)
        .min()
}

/// A certificate's subject alternative names as `KIND:value`, comma-separated, in its order
/// (`None` when it has none): DNS, URI, email, IP (as text); others by their kind alone.
fn alternative_names(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let extension = cert.subject_alternative_name().ok()??;
    // Each name with its value: a name shown by its kind alone (otherName, dirName…) made
    // every certificate of that kind one caller (a re-attack finding). A name this cannot
    // write out (not valid text, an X.400 or EDI party name) makes the certificate known by
    // its fingerprint instead.
    let names: Option<Vec<String>> = extension
        .value
        .general_names
        .iter()
        .map(|name| {
            Some(match name {
                GeneralName::DNSName(v) => format!("DNS:{}", escape_rfc4514(v)),
                GeneralName::URI(v) => format!("URI:{}", escape_rfc4514(v)),
                GeneralName::RFC822Name(v) => format!("email:{}", escape_rfc4514(v)),
                GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => format!(
                        "IP:{}",
                        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*bytes).ok()?)
                    ),
                    16 => format!(
                        "IP:{}",
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*bytes).ok()?)
                    ),
                    _ => format!("IP:#{}", hex::encode(bytes)),
                },
                GeneralName::OtherName(oid, value) => {
                    format!("otherName:{}#{}", oid.to_id_string(), hex::encode(value))
                }
                GeneralName::DirectoryName(dn) => {
                    format!("dirName:{}", escape_rfc4514(&dn.to_string()))
                }
                GeneralName::RegisteredID(oid) => format!("RID:{}", oid.to_id_string()),
                _ => return None,
            })
        })
        .collect();
    let names = names?;
    (!names.is_empty()).then(|| names.join(","))
}

/// RFC 4514 section 2.4 escaping of an attribute value.
fn escape_rfc4514(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, '"' | '+' | ',' | ';' | '<' | '>' | '\\')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
            out.push(c);
        } else if c == '\0' {
            out.push_str("\\00");
        } else {
            out.push(c);
        }
    }
    out
}

/// axum-server's rustls acceptor plus the client certificate: after the handshake, a verified
/// client certificate (rustls checked it against the client CA) becomes a
/// [`ClientCertificate`] in the extensions of every request on the connection. A client that
/// speaks plain HTTP to this port gets `400` saying to use `https://`, and the connection closes.
#[derive(Clone)]
pub struct ClientCertAcceptor {
    inner: RustlsAcceptor,
    /// The server's handle (its count of open connections) and the most it may hold.
    cap: Option<(axum_server::Handle<std::net::SocketAddr>, usize)>,
    /// A connection with no request in flight for this long is closed
    /// ([`crate::http::idle`]).
    idle_timeout: Duration,
    /// A response the client takes nothing of for this long is dropped
    /// ([`crate::http::idle::SEND_STALL_TIMEOUT`] by default).
    send_stall: Duration,
    /// Connections per client ([`crate::http::clients`]).
    clients: Arc<crate::http::clients::ClientCounts>,
}

impl ClientCertAcceptor {
    pub fn new(config: RustlsConfig) -> Self {
        ClientCertAcceptor {
            inner: RustlsAcceptor::new(config),
            cap: None,
            idle_timeout: crate::http::serve::DEFAULT_IDLE_TIMEOUT,
            send_stall: crate::http::idle::SEND_STALL_TIMEOUT,
            clients: crate::http::clients::ClientCounts::new(
                crate::http::clients::DEFAULT_MAX_PER_CLIENT,
            ),
        }
    }

    /// Closes connections with no request in flight for `timeout`.
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Drops a response the client takes nothing of for `stall`.
    pub fn with_send_stall(mut self, stall: Duration) -> Self {
        self.send_stall = stall;
        self
    }

    /// Closes a new connection at once while its client holds `max` open ones already.
    pub fn with_client_cap(mut self, max: usize) -> Self {
        self.clients = crate::http::clients::ClientCounts::new(max);
        self
    }

    /// Closes a new connection at once while `handle` counts more than `max` open ones (this
    /// one included): no handshake, no buffers, its descriptor given back.
    pub fn with_connection_cap(
        mut self,
        handle: axum_server::Handle<std::net::SocketAddr>,
        max: usize,
    ) -> Self {
        self.cap = Some((handle, max));
        self
    }
}

impl<S> Accept<TcpStream, S> for ClientCertAcceptor
where
    S: Send + 'static,
{
    type Stream = IdleClose<tokio_rustls::server::TlsStream<TcpStream>>;
    type Service = Tracked<WithClientCert<axum_server::tls::TlsService<S>>>;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = std::io::Result<(Self::Stream, Self::Service)>> + Send>,
    >;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let inner = self.inner.clone();
        let idle_timeout = self.idle_timeout;
        let send_stall = self.send_stall;
        let slot = match stream.peer_addr() {
            Ok(peer) => self.clients.admit(peer.ip()).ok_or(()),
            // Not a connected socket any more: nothing to count, nothing to serve.
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        let clients = self.clients.clone();
        let over_cap = self
            .cap
            .as_ref()
            .map(|(handle, max)| (handle.connection_count(), *max))
            .filter(|(count, max)| count > max);
        Box::pin(async move {
            let Ok(slot) = slot else {
                crate::http::clients::refused("tls", &clients);
                drop(stream);
                return Err(std::io::Error::other(
                    "client connection cap reached (--max-connections-per-client): closed",
                ));
            };
            if let Some((count, max)) = over_cap {
                metrics::counter!(
                    "nightingale_http_connections_refused_total",
                    "listener" => "tls",
                    "reason" => "cap"
                )
                .increment(1);
                if let Some(held) = OVER_CAP_LOG.allow() {
                    tracing::info!(
                        count,
                        max,
                        not_logged_before = held,
                        "TLS connection refused: over the connection cap"
                    );
                }
                drop(stream);
                return Err(std::io::Error::other(
                    "connection cap reached (--max-connections): closed",
                ));
            }
            if is_plain_http(&stream).await? {
                answer_plain_http(stream).await;
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "plain HTTP on the HTTPS port: answered 400",
                ));
            }
            // Read before the handshake begins: a reload during the handshake has the chain
            // verified again at its first request (a review's finding).
            let generation = client_ca_generation();
            let (stream, service) = inner.accept(stream, service).await?;
            let (_, connection) = stream.get_ref();
            let certificate = connection
                .peer_certificates()
                .filter(|chain| !chain.is_empty())
                .and_then(|chain| match client_certificate(chain, generation) {
                    Some(c) => Some(Arc::new(c)),
                    None => {
                        tracing::warn!(
                            "verified client certificate whose subject does not parse: ignored"
                        );
                        None
                    }
                });
            if let Some(c) = &certificate {
                // Debug-formatted: a subject is the client's text (a newline in it forged a
                // log line, an escape sequence reached the terminal).
                tracing::debug!(subject = ?c.subject, sha256 = %c.sha256, "TLS client certificate");
            }
            let activity = Activity::holding(Some(slot));
            Ok((
                IdleClose::new(stream, activity.clone(), idle_timeout)
                    .with_first_byte_deadline(crate::http::serve::HEADER_READ_TIMEOUT)
                    .with_write_stall(send_stall),
                Tracked::new(
                    WithClientCert {
                        inner: service,
                        certificate,
                    },
                    activity,
                )
                .with_stall_timeout(send_stall),
            ))
        })
    }
}

/// How long a new connection may stay silent before its first byte (the TLS handshake's
/// deadline, axum-server's default, applies after it).
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the client started with plain HTTP (a method name in ASCII capitals) instead of a
/// TLS handshake (a record that starts with byte 0x16). Peeks: nothing is consumed.
async fn is_plain_http(stream: &TcpStream) -> std::io::Result<bool> {
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(FIRST_BYTE_TIMEOUT, stream.peek(&mut first))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no TLS handshake within 10 s")
        })??;
    Ok(n == 1 && first[0].is_ascii_uppercase())
}

/// Answers a plain-HTTP request sent to the HTTPS port with 400 and an explanation in the
/// server's JSON error shape (as Go's net/http does, in text), then closes. What the client sent is read (bounded in size and time) before
/// closing, so that the close is not a reset that would hide the answer.
async fn answer_plain_http(mut stream: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: 60\r\n\r\n{\"error\":\"this port speaks HTTPS: use https:// to reach it\"}";
    let bounded = async {
        let mut buf = [0u8; 4096];
        // The request head (and a small body): enough to empty a typical request.
        let mut read = 0;
        while read < 64 << 10 {
            match tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => read += n,
                _ => break,
            }
        }
        stream.write_all(ANSWER).await?;
        stream.shutdown().await?;
        // Wait (bounded) for the client to close after reading the answer.
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
        }
        std::io::Result::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), bounded).await;
}

/// A connection's service that inserts the connection's [`ClientCertificate`] (when there is
/// one) into each request's extensions.
#[derive(Clone, Debug)]
pub struct WithClientCert<S> {
    inner: S,
    certificate: Option<Arc<ClientCertificate>>,
}

impl<S, B> tower::Service<Request<B>> for WithClientCert<S>
where
    S: tower::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if let Some(c) = &self.certificate {
            req.extensions_mut().insert(ClientCertificate::clone(c));
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each reason a client certificate is refused for has its own label and log limit (one
    /// shared limit let one kind hide another: a re-attack finding).
    #[test]
    fn client_certificate_refusals_are_told_apart() {
        use rustls::CertificateError as E;
        let name = |e: rustls::Error| certificate_refusal(&e).map(|i| CERTIFICATE_REFUSALS[i]);
        assert_eq!(
            name(rustls::Error::InvalidCertificate(E::Expired)),
            Some("expired")
        );
        assert_eq!(
            name(rustls::Error::InvalidCertificate(E::UnknownIssuer)),
            Some("unknown_issuer")
        );
        assert_eq!(
            name(rustls::Error::InvalidCertificate(E::NotValidYet)),
            Some("not_yet_valid")
        );
        assert_eq!(
            name(rustls::Error::InvalidCertificate(E::InvalidPurpose)),
            Some("wrong_purpose")
        );
        assert_eq!(
            name(rustls::Error::NoCertificatesPresented),
            Some("none_presented")
        );
        assert_eq!(name(rustls::Error::DecryptError), None);
    }

    #[test]
    fn rfc4514_escapes_specials() {
        assert_eq!(escape_rfc4514("a,b+c"), "a\\,b\\+c");
        assert_eq!(escape_rfc4514(" #x "), "\\ #x\\ ");
        assert_eq!(escape_rfc4514("#x"), "\\#x");
        assert_eq!(escape_rfc4514("plain name"), "plain name");
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(client_certificate(&[CertificateDer::from(b"not DER".to_vec())], 0).is_none());
        assert!(client_certificate(&[], 0).is_none());
    }

    #[test]
    fn missing_files_are_named() {
        install_crypto_provider();
        let err = load_server_config(&TlsSettings {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            client_ca: None,
            client_auth: ClientAuth::Optional,
        })
        .unwrap_err();
        assert!(matches!(err, TlsError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
    }

    /// Red-team finding: a certificate path that became a FIFO blocked the reload (and every
    /// later one); a link to /dev/zero took gigabytes. Neither is read now, nor a file over
    /// the limit; each is refused at once (the configuration in service stays).
    #[test]
    fn only_regular_files_of_bounded_size_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("cert.fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let zero = dir.path().join("zero.pem");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let big = dir.path().join("big.pem");
        std::fs::write(&big, vec![b'A'; (MAX_PEM_BYTES + 1) as usize]).unwrap();
        for path in [&fifo, &zero, &big, &dir.path().to_path_buf()] {
            let started = std::time::Instant::now();
            let err = read(path).unwrap_err();
            assert!(matches!(err, TlsError::Read { .. }), "{err:?}");
            assert!(started.elapsed() < std::time::Duration::from_secs(5));
        }
        let small = dir.path().join("small.pem");
        std::fs::write(&small, b"-----BEGIN CERTIFICATE-----\n").unwrap();
        assert_eq!(read(&small).unwrap().len(), 28);
    }
}
