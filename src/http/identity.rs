//! Who is calling, as far as the transport knows. The TLS layer puts a [`ClientCertificate`]
//! in a request's extensions when the client presented a certificate that chains to the
//! configured client CA; the auth layer maps it to roles.

/// A verified TLS client certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCertificate {
    /// The certificate's subject, as text (for the audit trail's actor and the logs).
    pub subject: String,
    /// Lowercase hex SHA-256 of the DER certificate.
    pub sha256: String,
}
