//! Who is calling, as far as the transport knows. The TLS layer puts a [`ClientCertificate`]
//! in a request's extensions when the client presented a certificate that chains to the
//! configured client CA; the auth layer maps it to roles.

/// A verified TLS client certificate.
#[derive(Clone, Debug)]
pub struct ClientCertificate {
    /// The certificate's subject, as text (for the audit trail's actor and the logs).
    pub subject: String,
    /// Lowercase hex SHA-256 of the DER certificate.
    pub sha256: String,
    /// The chain the client presented, leaf first: verified again against the client CAs in
    /// service when they change, or when a certificate of it reaches its notAfter.
    pub chain: std::sync::Arc<[rustls::pki_types::CertificateDer<'static>]>,
    /// When the chain is next verified again, at the latest (Unix seconds; `i64::MAX`:
    /// never): the earliest notAfter of the chain presented, then, after a verification
    /// past it, the earliest notAfter still ahead (an expired certificate the path does not
    /// use made every request verify the chain again: a re-attack's finding).
    pub not_after: std::sync::Arc<std::sync::atomic::AtomicI64>,
    /// The generation of the client CAs it was last verified against
    /// ([`crate::tls::client_ca_generation`]), shared by the connection's requests.
    pub checked: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl ClientCertificate {
    /// Why the certificate no longer identifies its connection's caller, if it does not. It
    /// was checked once, at the handshake, and a keep-alive connection then kept its identity
    /// past its expiry and past a reload that removed its CA (a review's finding): now, once
    /// the client CAs in service have changed since it was verified, or a certificate of its
    /// chain has reached its notAfter, the chain is verified again against the CAs in service
    /// (as a new handshake would be: an expired certificate the path does not use, or CAs
    /// that still trust it, change nothing).
    pub fn stale(&self) -> Option<&'static str> {
        use std::sync::atomic::Ordering;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let current = crate::tls::client_ca_generation();
        let past = now >= self.not_after.load(Ordering::Acquire);
        if self.checked.load(Ordering::Acquire) == current && !past {
            return None;
        }
        match crate::tls::verify_in_service(&self.chain) {
            Ok(()) => {
                self.checked.store(current, Ordering::Release);
                if past {
                    // The path verified now uses certificates valid now only: the earliest
                    // notAfter still ahead bounds it.
                    let next = crate::tls::earliest_not_after_after(&self.chain, now);
                    self.not_after
                        .store(next.unwrap_or(i64::MAX), Ordering::Release);
                }
                None
            }
            Err(crate::tls::Reverified::Expired) => {
                Some("has expired since the connection was made")
            }
            Err(crate::tls::Reverified::Untrusted) => {
                Some("is no longer trusted by the client CAs in service")
            }
        }
    }
}
