//! What the SCP tells the outside about associations and instances, for the audit trail.
//!
//! The crate does not know where audit records go: the server gives the SCP an
//! [`EventSink`] ([`crate::Scp::with_events`]) and turns events into records. Events carry
//! the UIDs as received: a sink that writes them anywhere must hash or drop them itself (the
//! server's audit sink hashes them with SHA-256, or omits them, per configuration). They
//! never carry patient names or IDs: the SCP does not read those attributes.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

/// How an association ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortedBy {
    /// The peer sent A-ABORT (or closed the connection).
    Peer,
    /// This node aborted it (idle timeout, a protocol error, …).
    Local,
}

/// One event of the SCP. `association` numbers associations from 1 in this process, so the
/// instance events of an association can be told apart from another's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DicomEvent {
    /// An association was accepted.
    AssociationAccepted {
        association: u64,
        peer: SocketAddr,
        calling_ae: String,
        /// Presentation contexts proposed and accepted.
        contexts_proposed: usize,
        contexts_accepted: usize,
    },
    /// An association request was refused or never completed.
    AssociationRejected {
        peer: SocketAddr,
        /// Short stable reason: `not_established` (aborted, or an invalid PDU; a connection
        /// closed before sending anything is counted in the metrics only), `timeout`, `busy`,
        /// `host_not_allowed` (refused at accept), or the A-ASSOCIATE-RJ's: `protocol_version`,
        /// `application_context`, `calling_ae` (an invalid title or one the allowlist
        /// refuses), `called_ae`, `no_context`; `context_ids` (aborted).
        reason: &'static str,
    },
    /// The peer released the association.
    AssociationReleased {
        association: u64,
        peer: SocketAddr,
        calling_ae: String,
        stored: u64,
        failed: u64,
    },
    /// The association was aborted.
    AssociationAborted {
        association: u64,
        peer: SocketAddr,
        calling_ae: String,
        by: AbortedBy,
        /// Why this side aborted (`None` when the peer did).
        reason: Option<&'static str>,
        stored: u64,
        failed: u64,
    },
    /// An instance was stored (status 0x0000), or was already stored with the same bytes.
    InstanceStored(InstanceEvent),
    /// A C-STORE was answered with a failure status.
    InstanceRefused(InstanceEvent),
}

/// One C-STORE, as the audit sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceEvent {
    pub association: u64,
    pub peer: SocketAddr,
    pub calling_ae: String,
    /// SOP Class UID (of the data set when stored, else as announced in the command).
    pub sop_class_uid: String,
    /// SOP Instance UID (as above).
    pub sop_instance_uid: String,
    /// Study and Series Instance UID: known only when stored.
    pub study_uid: Option<String>,
    pub series_uid: Option<String>,
    /// The negotiated transfer syntax (empty when the context was not accepted).
    pub transfer_syntax: String,
    /// Bytes of the data set received.
    pub size: u64,
    /// The DIMSE status answered.
    pub status: u16,
    /// SHA-256 of the data set as received (hex), when stored.
    pub sha256: Option<String>,
    /// True when the same instance was already stored.
    pub duplicate: bool,
    /// Short stable reason of a refusal (`StoreError::kind` and the SCP's own reasons).
    pub reason: Option<&'static str>,
}

/// A sink could not take an event (its store failed).
#[derive(Debug, thiserror::Error)]
#[error("event sink failed: {reason}")]
pub struct SinkError {
    pub reason: String,
}

/// The future a sink returns.
pub type SinkFuture<'a> = Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send + 'a>>;

/// Where the SCP sends its events. The SCP awaits each instance event before it answers the
/// C-STORE: when the sink fails, a stored instance is answered 0x0110 (processing failure)
/// instead of success, so that no instance is acknowledged without its record (the sender
/// retries; the retry is an idempotent duplicate). Association events are awaited too; a
/// failure there is logged.
pub trait EventSink: Send + Sync {
    fn event(&self, event: DicomEvent) -> SinkFuture<'_>;
}

/// A sink that drops every event (the default).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoEvents;

impl EventSink for NoEvents {
    fn event(&self, _event: DicomEvent) -> SinkFuture<'_> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// A sink that sends events into a tokio channel (for tests and simple consumers). Never
/// fails; waits when the channel is full.
#[derive(Debug, Clone)]
pub struct ChannelSink(pub tokio::sync::mpsc::Sender<DicomEvent>);

impl EventSink for ChannelSink {
    fn event(&self, event: DicomEvent) -> SinkFuture<'_> {
        Box::pin(async move {
            let _ = self.0.send(event).await;
            Ok(())
        })
    }
}
