//! The DIMSE SCP: C-ECHO and C-STORE, on dicom-ul's PDUs and this crate's association negotiation (`ul`).
//!
//! Each association runs in its own task, so a slow peer stalls nobody else; a semaphore
//! caps how many run at once (beyond it: A-ASSOCIATE-RJ, transient, local limit exceeded).
//! A C-STORE's success response is sent only after the spool returned, that is after the
//! instance's file and directory entry were fsynced.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use dicom_ul::Pdu;
use dicom_ul::association::server::AccessControl;
use dicom_ul::pdu::{
    AbortRQSource, AssociationRJ, AssociationRJResult,
    AssociationRJServiceProviderPresentationReason, AssociationRJServiceUserReason,
    AssociationRJSource, PDataValue, PDataValueType, PresentationContextNegotiated,
    PresentationContextResultReason, UserIdentity,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::events::{AbortedBy, DicomEvent, EventSink, InstanceEvent, NoEvents};
use crate::sop;
use crate::spool::{Incoming, Spool, StoreError, Upload};
use crate::ul;

const C_STORE_RQ: u16 = 0x0001;
const C_ECHO_RQ: u16 = 0x0030;
/// C-CANCEL-RQ: has no response (PS3.7 9.3.2.3).
const C_CANCEL_RQ: u16 = 0x0FFF;
const NO_DATA_SET: u16 = 0x0101;

/// DIMSE status codes (PS3.4 B.2.3, PS3.7 C).
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    pub const PROCESSING_FAILURE: u16 = 0x0110;
    pub const DUPLICATE_SOP_INSTANCE: u16 = 0x0111;
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    pub const DATA_SET_DOES_NOT_MATCH_SOP_CLASS: u16 = 0xA900;
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
}

/// A calling AE allowed to associate, optionally only from one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedAe {
    pub ae_title: String,
    pub host: Option<IpAddr>,
}

impl std::str::FromStr for AllowedAe {
    type Err = ScpError;

    /// `AE` or `AE@IP`.
    fn from_str(s: &str) -> Result<Self, ScpError> {
        let (ae, host) = match s.rsplit_once('@') {
            Some((ae, host)) => {
                let ip = host.parse().map_err(|_| ScpError::InvalidAllowedAe {
                    entry: s.to_owned(),
                })?;
                (ae, Some(ip))
            }
            None => (s, None),
        };
        let ae = ae.trim();
        if !valid_ae_title(ae) {
            return Err(ScpError::InvalidAllowedAe {
                entry: s.to_owned(),
            });
        }
        Ok(AllowedAe {
            ae_title: ae.to_owned(),
            host,
        })
    }
}

/// Settings of the SCP.
#[derive(Debug, Clone)]
pub struct ScpConfig {
    pub addr: SocketAddr,
    /// This node's AE title.
    pub ae_title: String,
    /// Calling AEs allowed to associate; `None`: any (allowed only on loopback unless
    /// `insecure`).
    pub allowed: Option<Vec<AllowedAe>>,
    /// Allow a non-loopback address without an allowlist.
    pub insecure: bool,
    /// Largest PDU this node receives.
    pub max_pdu_length: u32,
    /// How long a new connection may take to send its A-ASSOCIATE-RQ (ARTIM).
    pub association_timeout: Duration,
    /// How long an association may stay silent (or a send may block) before it is aborted.
    pub idle_timeout: Duration,
    /// Associations served at once.
    pub max_associations: usize,
    /// Largest data set of one C-STORE, in bytes.
    pub max_instance_bytes: u64,
    /// Bytes of data sets being received at once, over all associations (they are held in
    /// memory until stored); a C-STORE that would go beyond is answered 0xA700.
    pub max_inflight_bytes: u64,
    /// Storage SOP classes accepted besides the built-in list.
    pub extra_sop_classes: Vec<String>,
    /// Reject an association whose called AE title is not this node's (A-ASSOCIATE-RJ,
    /// called-AE-title-not-recognized), as Orthanc's `DicomCheckCalledAet`; off by default,
    /// like dcmtk's `storescp` and Orthanc, since modalities are often configured with
    /// another node's title.
    pub check_called_ae: bool,
    /// How long a stopping SCP waits for the requests in progress ([`Scp::serve`]).
    pub shutdown_grace: Duration,
}

impl ScpConfig {
    pub const DEFAULT_AE_TITLE: &'static str = "NIGHTINGALE";

    /// The defaults, at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        ScpConfig {
            addr,
            ae_title: Self::DEFAULT_AE_TITLE.into(),
            allowed: None,
            insecure: false,
            max_pdu_length: 65_536,
            association_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            max_associations: 32,
            check_called_ae: false,
            max_instance_bytes: 2 << 30,
            max_inflight_bytes: 4 << 30,
            extra_sop_classes: Vec::new(),
            shutdown_grace: SHUTDOWN_GRACE,
        }
    }

    /// Checks the settings, including the rule that a non-loopback address needs an
    /// allowlist (or `insecure`).
    pub fn check(&self) -> Result<(), ScpError> {
        if !valid_ae_title(&self.ae_title) {
            return Err(ScpError::InvalidAeTitle {
                ae_title: self.ae_title.clone(),
            });
        }
        if !(4096..=16 << 20).contains(&self.max_pdu_length) {
            return Err(ScpError::InvalidSetting {
                what: "dicom_max_pdu (--dicom-max-pdu) must be between 4096 and 16777216 bytes",
            });
        }
        if self.max_inflight_bytes < self.max_instance_bytes {
            return Err(ScpError::InvalidSetting {
                what: "dicom_max_inflight_bytes (--dicom-max-inflight-bytes) must be at least \
                       dicom_max_instance_bytes (--dicom-max-instance-bytes)",
            });
        }
        if !(1..=MAX_ASSOCIATIONS).contains(&self.max_associations) {
            return Err(ScpError::InvalidSetting {
                what: "dicom_max_associations (--dicom-max-associations) must be between 1 and 65536",
            });
        }
        if self.association_timeout.is_zero() || self.idle_timeout.is_zero() {
            return Err(ScpError::InvalidSetting {
                what: "DICOM timeouts must be positive",
            });
        }
        if let Some(uid) = self
            .extra_sop_classes
            .iter()
            .find(|u| !sop::is_valid_uid(u))
        {
            return Err(ScpError::InvalidSopClass { uid: uid.clone() });
        }
        if !self.addr.ip().is_loopback() && self.allowed.is_none() && !self.insecure {
            return Err(ScpError::OpenWithoutAllowlist { addr: self.addr });
        }
        Ok(())
    }
}

/// The SCP could not start.
#[derive(Debug, thiserror::Error)]
pub enum ScpError {
    #[error(
        "DICOM address {addr} is not loopback and no calling-AE allowlist is configured: configure one or pass --insecure"
    )]
    OpenWithoutAllowlist { addr: SocketAddr },
    #[error(
        "invalid AE title {ae_title:?}: 1 to 16 characters, no backslash or control characters"
    )]
    InvalidAeTitle { ae_title: String },
    #[error("invalid allowed AE {entry:?}: expected AE or AE@IP")]
    InvalidAllowedAe { entry: String },
    #[error("invalid SOP class UID {uid:?}")]
    InvalidSopClass { uid: String },
    #[error("{what}")]
    InvalidSetting { what: &'static str },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

fn valid_ae_title(ae: &str) -> bool {
    let t = ae.trim();
    !t.is_empty() && ae.len() <= 16 && ae.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'\\')
}

/// A bound, not yet serving, SCP.
pub struct Scp {
    listener: TcpListener,
    config: Arc<ScpConfig>,
    spool: Arc<Spool>,
    slots: Arc<Semaphore>,
    /// Connections waiting for their A-ASSOCIATE-RQ (see [`Scp::serve`]).
    waiting: Arc<Semaphore>,
    waiting_by_host: Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>,
    budget: Arc<Budget>,
    events: Arc<dyn EventSink>,
}

/// The most `max_associations` may be (a semaphore's permits; a value near `usize::MAX`
/// panicked at start-up: a red-team finding).
pub const MAX_ASSOCIATIONS: usize = 65_536;

/// Connections from one host that may wait for their A-ASSOCIATE-RQ at once.
pub const MAX_WAITING_PER_HOST: usize = 8;

/// Connections (from all hosts) that may wait for their A-ASSOCIATE-RQ at once: this many
/// per association slot, at least 64.
fn max_waiting(max_associations: usize) -> usize {
    max_associations.saturating_mul(4).max(64)
}

/// A connection's place among those waiting for their A-ASSOCIATE-RQ, by host.
struct WaitingPlace {
    by_host: Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>,
    host: IpAddr,
}

/// The host a connection's address counts under: an IPv4 address, or the /64 prefix of an
/// IPv6 one (what one host is usually given: each of its addresses took 8 places of its own;
/// IPv4-mapped addresses count as IPv4), as the HTTP listeners count clients.
fn host_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl WaitingPlace {
    fn take(
        by_host: &Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>,
        address: IpAddr,
    ) -> Option<WaitingPlace> {
        let host = host_of(address);
        let mut map = by_host.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(host).or_insert(0);
        if *n >= MAX_WAITING_PER_HOST {
            return None;
        }
        *n += 1;
        Some(WaitingPlace {
            by_host: by_host.clone(),
            host,
        })
    }
}

impl Drop for WaitingPlace {
    fn drop(&mut self) {
        let mut map = self.by_host.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.host) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.host);
            }
        }
    }
}

/// Bytes of data sets being received, over all associations.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    used: std::sync::atomic::AtomicU64,
}

impl Budget {
    pub fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            used: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Bytes one data set holds of the [`Budget`]; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Reservation {
    pub fn new(budget: &Arc<Budget>) -> Reservation {
        Reservation {
            budget: budget.clone(),
            bytes: 0,
        }
    }

    /// Reserves `n` more bytes; false (nothing reserved) when the budget cannot take them.
    pub fn grow(&mut self, n: u64) -> bool {
        use std::sync::atomic::Ordering;
        let before = self.budget.used.fetch_add(n, Ordering::AcqRel);
        if before.saturating_add(n) > self.budget.limit {
            self.budget.used.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        self.bytes += n;
        true
    }

    /// Gives every reserved byte back now.
    pub fn release(&mut self) {
        self.budget
            .used
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::AcqRel);
        self.bytes = 0;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release();
    }
}

impl Scp {
    /// Checks the configuration and binds the listening socket.
    pub async fn bind(config: ScpConfig, spool: Arc<Spool>) -> Result<Scp, ScpError> {
        config.check()?;
        let listener = TcpListener::bind(config.addr)
            .await
            .map_err(|source| ScpError::Bind {
                addr: config.addr,
                source,
            })?;
        Ok(Scp {
            listener,
            slots: Arc::new(Semaphore::new(config.max_associations)),
            waiting: Arc::new(Semaphore::new(max_waiting(config.max_associations))),
            waiting_by_host: Arc::default(),
            budget: Budget::new(config.max_inflight_bytes),
            config: Arc::new(config),
            spool,
            events: Arc::new(NoEvents),
        })
    }

    /// Sends association and instance events to `sink` (the audit trail): see
    /// [`EventSink`] for what the SCP waits for.
    pub fn with_events(mut self, sink: Arc<dyn EventSink>) -> Scp {
        self.events = sink;
        self
    }

    /// The address actually bound (port 0 picks one).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The bytes of data sets being received now, over all associations (a data set is
    /// charged as it arrives): lets a caller see that a C-STORE is under way.
    pub fn inflight(&self) -> Arc<Budget> {
        self.budget.clone()
    }

    /// Accepts associations until `shutdown` completes, then stops: no new connection is
    /// accepted, a request arriving on a connection not yet associated is refused (transient,
    /// local limit exceeded), and each association ends with an A-ABORT once the request in
    /// progress (a C-STORE whose data set is arriving) is answered, its end audited. Returns
    /// when every association has ended, or after [`SHUTDOWN_GRACE`] (an SCU that stalls in
    /// the middle of a data set). Every association and its instances ran on until the
    /// process ended, unaudited, and were accepted while the HTTP listeners drained (a
    /// review's finding).
    /// Reports a connection refused at accept (`reason`: `host_not_allowed`, `busy`) off the
    /// accept loop, which a write of its record must not hold. The event sink bounds what a
    /// flood of them writes (the audit's throttle): a host the allowlist refuses was counted
    /// in the metrics only (a re-attack's finding).
    fn report_refused_at_accept(&self, peer: SocketAddr, reason: &'static str) {
        let events = self.events.clone();
        tokio::spawn(async move {
            Reporter::send(&events, DicomEvent::AssociationRejected { peer, reason }).await;
        });
    }

    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let (stopping, stop_seen) = tokio::sync::watch::channel(Stopping::No);
        // Each connection's task holds a sender: all gone, every association has ended.
        let (alive, mut all_ended) = tokio::sync::mpsc::channel::<()>(1);
        loop {
            let accepted = tokio::select! {
                _ = &mut shutdown => break,
                accepted = self.listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, keep serving.
                    tracing::warn!(error = %e, "DICOM accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            // An allowlist whose every entry names its host refuses any other host whatever
            // it sends: such a connection is closed at once and takes no waiting place (a
            // red-team finding: eight addresses the allowlist refuses filled every waiting
            // place, and the one allowlisted SCU was shut out).
            if let Some(allowed) = &self.config.allowed
                && !allowed.is_empty()
                && allowed.iter().all(|a| a.host.is_some())
                && !allowed
                    .iter()
                    .filter_map(|a| a.host)
                    .any(|h| canonical_ip(h) == canonical_ip(peer.ip()))
            {
                association_outcome("host_not_allowed");
                if let Some(not_logged) = UNASSOCIATED_LOG.allow() {
                    tracing::info!(%peer, not_logged, "DICOM connection closed: no allowlist entry names this host");
                }
                self.report_refused_at_accept(peer, "host_not_allowed");
                continue;
            }
            // Until its A-ASSOCIATE-RQ arrives a connection holds a waiting place (bounded
            // per host and in all), not an association slot: silent connections (32 of
            // them, from one host) took every slot until ARTIM expired, and real SCUs were
            // refused as busy.
            let Ok(waiting) = self.waiting.clone().try_acquire_owned() else {
                association_outcome("busy");
                if let Some(not_logged) = UNASSOCIATED_LOG.allow() {
                    tracing::warn!(%peer, not_logged, "DICOM connection closed: too many connections waiting for their A-ASSOCIATE-RQ");
                }
                self.report_refused_at_accept(peer, "busy");
                continue;
            };
            let Some(place) = WaitingPlace::take(&self.waiting_by_host, peer.ip()) else {
                association_outcome("busy");
                if let Some(not_logged) = UNASSOCIATED_LOG.allow() {
                    tracing::warn!(%peer, not_logged, "DICOM connection closed: too many connections from this host waiting for their A-ASSOCIATE-RQ");
                }
                self.report_refused_at_accept(peer, "busy");
                continue;
            };
            let config = self.config.clone();
            let slots = self.slots.clone();
            let spool = self.spool.clone();
            let budget = self.budget.clone();
            let events = self.events.clone();
            let mut stopping = stop_seen.clone();
            let alive = alive.clone();
            tokio::spawn(async move {
                let _alive = alive;
                let deadline = tokio::time::Instant::now() + config.association_timeout;
                let mut stream = stream;
                let mut buf = BytesMut::with_capacity(8 << 10);
                // A connection still to send its request is closed when the SCP stops (one
                // silent connection held a stop for its 30 s association timeout: a
                // re-attack's finding).
                let opened = tokio::select! {
                    opened = tokio::time::timeout_at(
                        deadline,
                        opening(&mut stream, &mut buf, config.max_pdu_length),
                    ) => opened,
                    () = reached(&mut stopping, Stopping::Stop) => {
                        let said = "DICOM connection closed before its A-ASSOCIATE-RQ: the server is shutting down";
                        return not_associated(&events, peer, "shutting_down", said).await;
                    }
                };
                let Ok(opened) = opened else {
                    let said = "DICOM association not established: no A-ASSOCIATE-RQ in time";
                    return not_associated(&events, peer, "timeout", said).await;
                };
                // The connection keeps its waiting place (bounded per host and in all) until
                // its association is accepted or refused, and takes an association slot only
                // once the request is accepted: a request refused (an AE the allowlist does
                // not name, no context it can use) or still arriving holds no slot (a
                // red-team finding: a host the allowlist refuses, opening 25 connections a
                // second, kept every slot full while each refusal was answered, and the
                // allowlisted SCUs were refused as busy).
                let start = Start {
                    peer,
                    deadline,
                    opened,
                    buf,
                    admission: Admission {
                        slots,
                        waiting: (place, waiting),
                    },
                    stopping,
                };
                serve_association(stream, start, &config, &spool, &budget, events).await;
            });
        }
        drop(self.listener);
        self.slots.close();
        stopping.send_replace(Stopping::Stop);
        drop(alive);
        let active = self.config.max_associations - self.slots.available_permits();
        if active > 0 {
            tracing::info!(
                active,
                "DICOM: stopping; associations end once their request in progress is answered"
            );
        }
        let grace = self.config.shutdown_grace;
        if tokio::time::timeout(grace, all_ended.recv()).await.is_ok() {
            return;
        }
        // An SCU that stalls in the middle of a data set: its association is aborted where
        // it waits, its end audited (cut without a word when the process ended: a
        // re-attack's finding), and the instance is not acknowledged.
        tracing::warn!(
            grace_secs = grace.as_secs_f64(),
            "DICOM: associations still open at the end of the shutdown grace are cut"
        );
        stopping.send_replace(Stopping::Cut);
        let _ = tokio::time::timeout(CUT_GRACE, all_ended.recv()).await;
    }
}

/// How far a stopping SCP is ([`Scp::serve`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stopping {
    No,
    /// Associations end between requests; connections not yet associated are closed.
    Stop,
    /// The grace is over: associations end wherever they wait.
    Cut,
}

/// The log lines of connections that end without an association (refused at accept,
/// closed or aborted before their request, refused at negotiation): anyone who reaches the
/// port causes them at will, and 5,000 junk connections wrote 5,000 lines in a second (a
/// review's finding). At most one a second, the rest counted in the next; the metrics
/// (`nightingale_dicom_associations_total` by outcome) and the audit trail count each.
static UNASSOCIATED_LOG: crate::log_limit::LogLimit = crate::log_limit::LogLimit::new();

/// A connection that ends without an association: counted by `reason`, logged with `said`
/// (no AE title: the peer's bytes), and reported.
async fn not_associated(
    events: &Arc<dyn EventSink>,
    peer: SocketAddr,
    reason: &'static str,
    said: &str,
) {
    association_outcome(reason);
    if let Some(not_logged) = UNASSOCIATED_LOG.allow() {
        tracing::info!(%peer, not_logged, "{said}");
    }
    Reporter::send(events, DicomEvent::AssociationRejected { peer, reason }).await;
}

/// Resolves once the SCP has reached `level` of its stop (or its `serve` has ended). The
/// watch's read guard is dropped inside (it is not `Send`).
async fn reached(stopping: &mut tokio::sync::watch::Receiver<Stopping>, level: Stopping) {
    let _ = stopping.wait_for(|s| *s >= level).await;
}

/// Why an association cut at the end of a stop's grace ended.
const CUT: &str = "cut at the end of the shutdown grace";

/// How long a cut association has to record its end.
const CUT_GRACE: Duration = Duration::from_secs(5);

/// What admits a connection: the waiting place it holds until its association stands, and
/// the association slots, one of which it takes then.
struct Admission {
    slots: Arc<Semaphore>,
    waiting: (WaitingPlace, tokio::sync::OwnedSemaphorePermit),
}

/// The fixed fields of an A-ASSOCIATE-RQ after its PDU header (PS3.8 9.3.2): protocol version,
/// reserved, called and calling AE titles, reserved.
const A_ASSOCIATE_RQ_FIXED: u32 = 2 + 2 + 16 + 16 + 32;

/// What the first bytes of a connection are.
enum Opened {
    /// The peer closed (or reset) the connection before 42 bytes of a request came: it is
    /// seen at once, since the bytes are read, not peeked at (a peer that sent 8 bytes and
    /// closed kept its host's waiting place for the association timeout: a red-team finding).
    Closed,
    /// The first PDU is of another type.
    Other(u8),
    /// An A-ASSOCIATE-RQ declaring a length no request has.
    BadLength,
    /// The start of an A-ASSOCIATE-RQ: its fixed fields up to the calling AE title.
    Request(Opening),
}

/// Reads the first bytes of a connection into `buf` (the request is read on from there):
/// until the PDU type tells, then its length, then its first 42 bytes (PDU header, protocol
/// version, reserved, called and calling AE titles). The caller bounds the wait. The calling
/// AE title is checked on the raw field ([`Opening::calling_ae_valid`]).
async fn opening(stream: &mut TcpStream, buf: &mut BytesMut, max_pdu_length: u32) -> Opened {
    loop {
        if let Some(&kind) = buf.first()
            && kind != 0x01
        {
            return Opened::Other(kind);
        }
        if buf.len() >= 6 {
            // A length no request has: answered in `serve_association`. The maximum PDU length bounds P-DATA
            // (PS3.8 D.1), not the request: 128 contexts of 18 transfer syntaxes each take
            // 74 KB, over a 64 KiB maximum, and dcmtk's storescp takes them.
            let len = u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]);
            if len > MAX_ASSOCIATE_RQ.max(max_pdu_length) || len < A_ASSOCIATE_RQ_FIXED {
                return Opened::BadLength;
            }
        }
        if buf.len() >= 42 {
            return Opened::Request(Opening {
                calling_ae_valid: raw_ae_title_valid(&buf[26..42]),
            });
        }
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return Opened::Closed,
            Ok(_) => {}
        }
    }
}

/// The longest A-ASSOCIATE-RQ taken (128 contexts of 64-character UIDs with 100 transfer
/// syntaxes each stay well under it).
const MAX_ASSOCIATE_RQ: u32 = 1 << 20;

/// What is checked of an A-ASSOCIATE-RQ before it is read.
struct Opening {
    /// The calling AE field is a title PS3.5 6.2 allows: dicom-ul's reader trims every kind
    /// of whitespace (a tab, a newline) from it before [`AccessControl`] sees it, so a title
    /// such as "CT1\t" would pass an allowlist entry "CT1".
    calling_ae_valid: bool,
}

/// An AE title field as sent, padded with spaces (or, from some old implementations, NULs):
/// a title [`valid_ae_title`] allows.
fn raw_ae_title_valid(field: &[u8]) -> bool {
    let end = field.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    std::str::from_utf8(&field[..end]).is_ok_and(valid_ae_title)
}

/// Reads the first PDU of a connection (the A-ASSOCIATE-RQ, or what came in its place) with
/// dicom-ul's reader, holding it to `limit` bytes; what follows it stays in `buf`.
/// `Err(None)`: the connection closed or failed first; `Err(Some(_))`: not a valid PDU.
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    limit: u32,
) -> Result<Pdu, Option<dicom_ul::pdu::ReadError>> {
    loop {
        let mut cursor = std::io::Cursor::new(&buf[..]);
        match dicom_ul::pdu::read_pdu(&mut cursor, limit, true) {
            Ok(Some(pdu)) => {
                let used = cursor.position() as usize;
                buf.advance(used);
                return Ok(pdu);
            }
            Ok(None) => {}
            Err(e) => return Err(Some(e)),
        }
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(None),
            Ok(_) => {}
        }
    }
}

/// Answers an A-ASSOCIATE-RQ with `answer` (an A-ASSOCIATE-RJ or an A-ABORT), closes the
/// connection, and counts and reports the association as refused for `reason`.
async fn refuse(
    stream: TcpStream,
    answer: &Pdu,
    reason: &'static str,
    config: &ScpConfig,
    events: &Arc<dyn EventSink>,
    peer: SocketAddr,
) {
    association_outcome("not_established");
    answer_and_close(stream, answer, config.idle_timeout).await;
    Reporter::send(events, DicomEvent::AssociationRejected { peer, reason }).await;
}

/// Answers a connection that has no association with an A-ABORT from `source`, closes it,
/// and counts and reports it as not established.
async fn abort_unassociated(
    stream: TcpStream,
    source: AbortRQSource,
    config: &ScpConfig,
    events: &Arc<dyn EventSink>,
    peer: SocketAddr,
) {
    let abort = Pdu::AbortRQ { source };
    refuse(stream, &abort, "not_established", config, events, peer).await;
}

/// Writes `pdu` (bounded by `limit`) and closes the connection.
async fn answer_and_close(mut stream: TcpStream, pdu: &Pdu, limit: Duration) {
    let mut buf = Vec::new();
    if dicom_ul::write_pdu(&mut buf, pdu).is_ok() {
        let sent = tokio::time::timeout(limit, async {
            stream.write_all(&buf).await?;
            stream.shutdown().await
        })
        .await;
        if matches!(sent, Ok(Ok(()))) && unread(&stream) {
            linger(&mut stream).await;
        }
    }
}

/// Whether the peer has sent bytes not read yet (one is read to tell; or its side is in an
/// unknown state): closing
/// with unread bytes makes the kernel send a reset, which can destroy the answer, so the
/// close then lingers. A peer that sent its request and waits for the answer has none: its
/// connection is closed at once, and holds its waiting place no longer (a red-team finding:
/// every refusal lingered up to 2 s).
fn unread(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    match stream.try_read(&mut probe) {
        Ok(n) => n > 0,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// Bytes a lingering close reads, at most.
const LINGER_BYTES: usize = 8 << 20;
/// How long a lingering close waits for the peer to stop sending.
const LINGER_TIME: Duration = Duration::from_secs(2);

/// A lingering close: after the answer and our half-close, what the peer is still sending
/// (the rest of a request refused for its length, say) is read and dropped until it closes
/// its side, up to [`LINGER_BYTES`] or [`LINGER_TIME`]. Closing with unread bytes queued
/// makes the kernel send a reset, which can destroy the answer before the peer reads it
/// (CI saw an A-ABORT lost so, for an A-ASSOCIATE-RQ over 1 MiB).
async fn linger(stream: &mut TcpStream) {
    let drain = async {
        let mut sink = vec![0u8; 64 << 10];
        let mut read = 0usize;
        while read < LINGER_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

/// The calling-AE allowlist, checked against the peer's address too.
struct Allowlist {
    allowed: Option<Vec<AllowedAe>>,
    peer: IpAddr,
    /// With [`ScpConfig::check_called_ae`]: the called AE title must be this node's.
    check_called: bool,
}

impl AccessControl for Allowlist {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        if self.check_called && called_ae_title.trim() != this_ae_title.trim() {
            return Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
        }
        // (The calling AE field's repertoire was checked on the raw request: see `Opening`.)
        let Some(allowed) = &self.allowed else {
            return Ok(());
        };
        let calling = calling_ae_title.trim();
        let peer = canonical_ip(self.peer);
        if allowed
            .iter()
            .any(|a| a.ae_title == calling && a.host.is_none_or(|h| canonical_ip(h) == peer))
        {
            Ok(())
        } else {
            Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized)
        }
    }
}

fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// One pending DIMSE request: its command, and the data set fragments so far.
struct Pending {
    presentation_context_id: u8,
    message_id: u16,
    sop_class_uid: String,
    sop_instance_uid: String,
    /// The data set so far, when it is not received straight into the spool.
    data: Vec<u8>,
    /// The data set being written to its temporary file as it arrives (see
    /// [`Spool::begin`]); `None`: kept in `data`, stored at the end with [`Spool::store`].
    upload: Option<Upload>,
    /// Why the data set is being dropped instead of kept, if it is.
    overflow: Option<Overflow>,
    reservation: Reservation,
}

impl Pending {
    /// Bytes of the data set received (and kept) so far.
    fn received(&self) -> usize {
        self.upload.as_ref().map_or(self.data.len(), Upload::len)
    }
}

#[derive(Debug, Clone, Copy)]
enum Overflow {
    /// Larger than `max_instance_bytes`.
    Instance,
    /// Beyond `max_inflight_bytes` with the other data sets being received.
    Inflight,
}

/// A connection whose A-ASSOCIATE-RQ has come (or whose first PDU is another): who, by when
/// the association must stand, and what [`opening`] read of the request.
struct Start {
    peer: SocketAddr,
    deadline: tokio::time::Instant,
    opened: Opened,
    /// What was read of the connection so far (the request goes on from here).
    buf: BytesMut,
    admission: Admission,
    /// How far the SCP is in stopping ([`Scp::serve`]).
    stopping: tokio::sync::watch::Receiver<Stopping>,
}

/// How long a stopping SCP waits for its associations' requests in progress, by default
/// ([`ScpConfig::shutdown_grace`]).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

async fn serve_association(
    stream: TcpStream,
    start: Start,
    config: &ScpConfig,
    spool: &Arc<Spool>,
    budget: &Arc<Budget>,
    events: Arc<dyn EventSink>,
) {
    let Start {
        peer,
        deadline,
        opened,
        mut buf,
        admission,
        mut stopping,
    } = start;
    // PS3.8 Table 9-10, state Sta2 (awaiting the A-ASSOCIATE-RQ): an A-ABORT closes the
    // connection (AA-2); an A-RELEASE-RQ is answered with an A-ABORT (AA-1), never with a
    // release. Other PDUs are refused below, once read.
    let opening = match opened {
        Opened::Closed => {
            association_outcome("not_established");
            if let Some(not_logged) = UNASSOCIATED_LOG.allow() {
                tracing::info!(%peer, not_logged, "DICOM connection closed before its A-ASSOCIATE-RQ");
            }
            return;
        }
        Opened::Other(0x07) => {
            let said = "DICOM connection closed: A-ABORT before any association";
            return not_associated(&events, peer, "not_established", said).await;
        }
        Opened::Other(0x05) => {
            if let Some(not_logged) = UNASSOCIATED_LOG.allow() {
                tracing::info!(%peer, not_logged, "DICOM association aborted: A-RELEASE-RQ before any association");
            }
            abort_unassociated(stream, AbortRQSource::ServiceUser, config, &events, peer).await;
            return;
        }
        Opened::Other(_) | Opened::BadLength => None,
        Opened::Request(o) => Some(o),
    };
    // A PDU whose declared length is over what is read where the request is awaited: the
    // A-ASSOCIATE-RQ up to MAX_ASSOCIATE_RQ (or the maximum PDU length, when larger), any
    // other PDU up to the maximum PDU length (HTTP sent to the DICOM port reads as one of
    // 1.4 GB): an invalid PDU, answered without reading it. A request of a length no request
    // has, and a PDU header not yet whole from a peer that sent something else than a
    // request, are answered so too.
    let refused = match (&opening, buf.len() >= 6) {
        (Some(_), _) => None,
        (None, true) if buf[0] != 0x01 => (u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]])
            > config.max_pdu_length)
            .then_some("a PDU over the length limit where the A-ASSOCIATE-RQ was awaited"),
        (None, true) => Some("an A-ASSOCIATE-RQ of a length no request has"),
        (None, false) => Some("a PDU header cut short where the A-ASSOCIATE-RQ was awaited"),
    };
    // Every A-ABORT sent while the request is awaited is PS3.8's AA-1 (Table 9-10, Sta2 with
    // events 3, 4, 10, 12, 13 and 19): service-user source, reason not significant.
    if let Some(why) = refused {
        if let Some(not_logged) = UNASSOCIATED_LOG.allow() {
            tracing::info!(%peer, not_logged, why, "DICOM association aborted");
        }
        abort_unassociated(stream, AbortRQSource::ServiceUser, config, &events, peer).await;
        return;
    }
    if let Some(o) = &opening
        && !o.calling_ae_valid
    {
        // The title itself is not logged: it is whatever bytes the peer chose.
        if let Some(not_logged) = UNASSOCIATED_LOG.allow() {
            tracing::info!(%peer, not_logged, "DICOM association rejected: calling AE title not a valid AE title");
        }
        let rj = Pdu::AssociationRJ(AssociationRJ {
            result: AssociationRJResult::Permanent,
            source: AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CallingAETitleNotRecognized,
            ),
        });
        refuse(stream, &rj, "calling_ae", config, &events, peer).await;
        return;
    }
    let mut stream = stream;
    let limit = MAX_ASSOCIATE_RQ.max(config.max_pdu_length);
    // The rest of a request begun before the stop is not waited for (a half-sent request
    // held the stop for the association timeout: a re-attack's finding).
    let read = tokio::select! {
        read = tokio::time::timeout_at(deadline, read_request(&mut stream, &mut buf, limit)) => read,
        () = reached(&mut stopping, Stopping::Stop) => {
            let said = "DICOM connection closed in the middle of its A-ASSOCIATE-RQ: the server is shutting down";
            return not_associated(&events, peer, "shutting_down", said).await;
        }
    };
    let pdu = match read {
        Ok(Ok(pdu)) => pdu,
        Ok(Err(None)) => {
            let said = "DICOM association not established: connection closed";
            return not_associated(&events, peer, "not_established", said).await;
        }
        Ok(Err(Some(e))) => {
            // Sta2, event 19 (an invalid PDU): AA-1.
            if let Some(not_logged) = UNASSOCIATED_LOG.allow() {
                tracing::info!(%peer, not_logged, error = %error_summary(&e), "DICOM association aborted: the A-ASSOCIATE-RQ cannot be read");
            }
            abort_unassociated(stream, AbortRQSource::ServiceUser, config, &events, peer).await;
            return;
        }
        Err(_) => {
            let said = "DICOM association not established: no A-ASSOCIATE-RQ in time";
            return not_associated(&events, peer, "timeout", said).await;
        }
    };
    let rq = match pdu {
        Pdu::AssociationRQ(rq) => rq,
        _ => {
            // Sta2 with another PDU (events 3, 4, 10, 13, 19): AA-1.
            if let Some(not_logged) = UNASSOCIATED_LOG.allow() {
                tracing::info!(%peer, not_logged, "DICOM association aborted: another PDU than an A-ASSOCIATE-RQ");
            }
            abort_unassociated(stream, AbortRQSource::ServiceUser, config, &events, peer).await;
            return;
        }
    };
    let allowlist = Allowlist {
        allowed: config.allowed.clone(),
        peer: peer.ip(),
        check_called: config.check_called_ae,
    };
    let serves = |uid: &str| {
        uid == sop::VERIFICATION
            || sop::STORAGE_CLASSES.iter().any(|c| c.uid == uid)
            || config.extra_sop_classes.iter().any(|c| c == uid)
    };
    let acceptor = ul::Acceptor {
        ae_title: &config.ae_title,
        max_pdu_length: config.max_pdu_length,
        access: &allowlist,
        serves: &serves,
    };
    let accepted = match ul::negotiate(&acceptor, rq) {
        Ok(accepted) => accepted,
        Err(refusal) => {
            let reason = refusal.reason();
            if let Some(not_logged) = UNASSOCIATED_LOG.allow() {
                tracing::info!(%peer, not_logged, reason, "DICOM association refused");
            }
            refuse(stream, &refusal.answer(), reason, config, &events, peer).await;
            return;
        }
    };
    // An association slot, now that the request is accepted; none free: A-ASSOCIATE-RJ
    // transient, local limit exceeded. The waiting place is given back either way.
    let Admission { slots, waiting } = admission;
    drop(waiting);
    let Ok(_slot) = slots.clone().try_acquire_owned() else {
        // Closed: the SCP is stopping (it was recorded as busy: a re-attack's finding).
        let (reason, said) = if slots.is_closed() {
            ("shutting_down", "the server is shutting down")
        } else {
            ("busy", "too many associations")
        };
        association_outcome(reason);
        tracing::warn!(%peer, "DICOM association refused: {said}");
        let rejected = DicomEvent::AssociationRejected { peer, reason };
        if let Err(e) = events.event(rejected).await {
            tracing::error!(error = %e, "DICOM event not recorded");
        }
        let rj = Pdu::AssociationRJ(AssociationRJ {
            result: AssociationRJResult::Transient,
            source: AssociationRJSource::ServiceProviderPresentation(
                AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
            ),
        });
        answer_and_close(stream, &rj, config.idle_timeout).await;
        return;
    };
    let (answer, mut association) = accepted.into_association(stream, buf);
    if !matches!(
        tokio::time::timeout(config.idle_timeout, association.send(&answer)).await,
        Ok(Ok(()))
    ) {
        association_outcome("not_established");
        tracing::info!(%peer, "DICOM association not established: A-ASSOCIATE-AC not sent");
        let rejected = DicomEvent::AssociationRejected {
            peer,
            reason: "not_established",
        };
        Reporter::send(&events, rejected).await;
        return;
    }
    association_outcome("accepted");
    let _active = ActiveGauge::new();
    let calling_ae = association.peer_ae_title().trim().to_owned();
    let accepted = association
        .presentation_contexts()
        .iter()
        .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .count();
    tracing::info!(
        %peer,
        calling_ae,
        contexts = association.presentation_contexts().len(),
        accepted,
        "DICOM association accepted"
    );
    let reporter = Reporter::new(events, peer, &calling_ae);
    let accepted_event = DicomEvent::AssociationAccepted {
        association: reporter.association,
        peer,
        calling_ae: calling_ae.clone(),
        contexts_proposed: association.presentation_contexts().len(),
        contexts_accepted: accepted,
    };
    Reporter::send(&reporter.events, accepted_event).await;
    let ending = run_association(
        &mut association,
        config,
        spool,
        budget,
        &reporter,
        &mut stopping,
    )
    .await;
    reporter.ended(&ending).await;
    let (stored, failed) = match ending {
        Ok(Ending::Released(counts)) => {
            tracing::info!(%peer, calling_ae, stored = counts.0, failed = counts.1, "DICOM association released");
            return;
        }
        Ok(Ending::AbortedByPeer(counts)) => {
            tracing::info!(%peer, calling_ae, "DICOM association aborted by the peer");
            counts
        }
        Err((reason, counts)) => {
            tracing::warn!(%peer, calling_ae, reason, "DICOM association aborted");
            let _ = tokio::time::timeout(config.idle_timeout, association.abort()).await;
            counts
        }
    };
    tracing::info!(%peer, calling_ae, stored, failed, "DICOM association closed");
}

/// An association-layer error for the log: its words only, up to the first structure it
/// prints (dicom-ul's messages can embed a whole PDU, `PData { data: [40, 48, …] }`, which
/// would put whatever a peer sent, patient data included, into the log), at most 120
/// printable characters.
fn error_summary(e: &dyn std::fmt::Display) -> String {
    let text = e.to_string();
    let words = text.split(['{', '[', '(']).next().unwrap_or_default();
    words
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(120)
        .collect()
}

fn association_outcome(outcome: &'static str) {
    metrics::counter!("nightingale_dicom_associations_total", "outcome" => outcome).increment(1);
}

/// `nightingale_dicom_associations_active`, up while it lives.
struct ActiveGauge;

impl ActiveGauge {
    fn new() -> ActiveGauge {
        metrics::gauge!("nightingale_dicom_associations_active").increment(1.0);
        ActiveGauge
    }
}

impl Drop for ActiveGauge {
    fn drop(&mut self) {
        metrics::gauge!("nightingale_dicom_associations_active").decrement(1.0);
    }
}

enum Ending {
    Released((u64, u64)),
    AbortedByPeer((u64, u64)),
}

type Counts = (u64, u64);

/// Runs the DIMSE exchange until release or abort. `Err` carries why this side aborts.
async fn run_association(
    association: &mut ul::Association,
    config: &ScpConfig,
    spool: &Arc<Spool>,
    budget: &Arc<Budget>,
    reporter: &Reporter,
    stopping: &mut tokio::sync::watch::Receiver<Stopping>,
) -> Result<Ending, (&'static str, Counts)> {
    let calling_ae = reporter.calling_ae.as_str();
    let mut counts: Counts = (0, 0);
    let mut command: Vec<u8> = Vec::new();
    let mut pending: Option<Pending> = None;
    // A request this SCP does not serve whose data set (a C-FIND identifier, say) is still
    // arriving: its context and the answer to send once the data set has ended.
    let mut discarding: Option<(u8, Vec<u8>)> = None;
    // The context of the command set's first fragment: every fragment is on it (PS3.8
    // 9.3.5.1; fragments on two contexts were joined and answered on the last one's).
    let mut command_context: Option<u8> = None;
    // The memory of the last data set received into the spool, for the next one.
    let mut spare: Vec<u8> = Vec::new();
    loop {
        // Between requests (none in progress), a stopping SCP ends the association; a
        // request in progress is answered first. Bytes of the next one already read do not
        // make it one in progress (an SCU sending requests without reading the responses
        // always had some, and went on storing for the whole grace: a re-attack's finding).
        let between = pending.is_none() && discarding.is_none() && command.is_empty();
        if between && *stopping.borrow() != Stopping::No {
            return Err(("the server is shutting down", counts));
        }
        let receiving = tokio::time::timeout(
            config.idle_timeout,
            receive(association, config.max_pdu_length),
        );
        // Between requests the stop ends it; in the middle of one, only the cut at the end
        // of the grace. The cut is watched where the association waits on its peer (here
        // and in `send_command`), never while an instance is stored and audited (dropped
        // there, an instance was kept unaudited: a re-attack's finding).
        let (level, why) = if between {
            (Stopping::Stop, "the server is shutting down")
        } else {
            (Stopping::Cut, CUT)
        };
        let next = tokio::select! {
            next = receiving => next,
            () = reached(stopping, level) => return Err((why, counts)),
        };
        let pdu = match next {
            Ok(Ok(pdu)) => pdu,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "DICOM receive failed");
                return Err(("cannot read the next PDU", counts));
            }
            Err(_) => return Err(("idle timeout", counts)),
        };
        let (values, len) = match pdu {
            Received::PData { values, len } => (values, len),
            Received::Other(Pdu::ReleaseRQ) => {
                if pending.is_some() {
                    tracing::warn!(
                        "DICOM release with a request in progress: its data set is dropped"
                    );
                }
                let _ =
                    tokio::time::timeout(config.idle_timeout, association.send(&Pdu::ReleaseRP))
                        .await;
                return Ok(Ending::Released(counts));
            }
            Received::Other(Pdu::AbortRQ { .. }) => return Ok(Ending::AbortedByPeer(counts)),
            Received::Other(_) => return Err(("unexpected PDU", counts)),
        };
        for value in values {
            let data = &association.get_mut().1[value.range.clone()];
            match value.value_type {
                PDataValueType::Command => {
                    if pending.is_some() || discarding.is_some() {
                        return Err(("command while a data set was expected", counts));
                    }
                    if command.len() + data.len() > 1 << 20 {
                        return Err(("command set too large", counts));
                    }
                    if *command_context.get_or_insert(value.presentation_context_id)
                        != value.presentation_context_id
                    {
                        return Err((
                            "command fragments on different presentation contexts",
                            counts,
                        ));
                    }
                    command.extend_from_slice(data);
                    if !value.is_last {
                        continue;
                    }
                    command_context = None;
                    let bytes = std::mem::take(&mut command);
                    let Some(cmd) = parse_command(&bytes) else {
                        return Err(("unreadable command set", counts));
                    };
                    let pc = value.presentation_context_id;
                    // A context the association never negotiated: a protocol error (PS3.8
                    // 9.3.5), not a request to answer.
                    if !association
                        .presentation_contexts()
                        .iter()
                        .any(|c| c.id == pc)
                    {
                        return Err(("command on a presentation context never negotiated", counts));
                    }
                    // The answer to give, once the request's data set (if it announces one)
                    // has been read through.
                    let answer = match cmd.field {
                        C_ECHO_RQ => {
                            // On a context not accepted, or accepted for another SOP class
                            // than Verification: refused, SOP class not supported (PS3.7
                            // 9.3.5.2), not a success.
                            let verification = accepted_context(association, pc).is_some_and(|c| {
                                sop::trim_uid(&c.abstract_syntax) == sop::VERIFICATION
                            });
                            // A C-ECHO-RQ has no data set (PS3.7 9.3.5.1); one that says it
                            // has is answered once the data set has been read through (it was
                            // answered at once, and the data set then aborted the association
                            // as "without a command": a red-team finding).
                            Some(if verification {
                                echo_response(cmd.message_id)
                            } else {
                                response(
                                    0x8030,
                                    cmd.message_id,
                                    sop::VERIFICATION,
                                    None,
                                    status::SOP_CLASS_NOT_SUPPORTED,
                                    None,
                                )
                            })
                        }
                        C_STORE_RQ if cmd.data_set_type != NO_DATA_SET => {
                            let upload = begin_upload(
                                association,
                                spool,
                                calling_ae,
                                pc,
                                &cmd,
                                std::mem::take(&mut spare),
                            );
                            pending = Some(Pending {
                                presentation_context_id: pc,
                                message_id: cmd.message_id,
                                sop_class_uid: cmd.sop_class_uid,
                                sop_instance_uid: cmd.sop_instance_uid,
                                data: Vec::new(),
                                upload,
                                overflow: None,
                                reservation: Reservation::new(budget),
                            });
                            None
                        }
                        // Nothing of ours to cancel, and no response to give.
                        C_CANCEL_RQ => None,
                        // A response (bit 15 of the command field) to a request this SCP
                        // never sent: a protocol error, not a request to answer with a
                        // "response" to it (a red-team finding).
                        field if field & 0x8000 != 0 => {
                            return Err(("a response where a request was expected", counts));
                        }
                        field => {
                            // A request we do not serve, or a C-STORE-RQ that says it has no
                            // data set (a malformed request: cannot understand, not an
                            // unrecognized operation).
                            let (status, comment) = if field == C_STORE_RQ {
                                (status::CANNOT_UNDERSTAND, "a C-STORE-RQ without a data set")
                            } else {
                                (status::UNRECOGNIZED_OPERATION, "operation not supported")
                            };
                            Some(response(
                                field | 0x8000,
                                cmd.message_id,
                                &cmd.sop_class_uid,
                                (!cmd.sop_instance_uid.is_empty())
                                    .then_some(cmd.sop_instance_uid.as_str()),
                                status,
                                Some(comment),
                            ))
                        }
                    };
                    if let Some(rsp) = answer {
                        if cmd.data_set_type != NO_DATA_SET {
                            // Its data set follows: read it through, then answer.
                            discarding = Some((pc, rsp));
                        } else {
                            send_command(association, config, pc, rsp, stopping)
                                .await
                                .map_err(|r| (r, counts))?;
                        }
                    }
                }
                PDataValueType::Data => {
                    if let Some((pc, _)) = &discarding {
                        if *pc != value.presentation_context_id {
                            return Err(("data set on another presentation context", counts));
                        }
                        if value.is_last {
                            let (pc, rsp) = discarding.take().expect("discarding");
                            send_command(association, config, pc, rsp, stopping)
                                .await
                                .map_err(|r| (r, counts))?;
                        }
                        continue;
                    }
                    let Some(p) = pending.as_mut() else {
                        return Err(("data set without a command", counts));
                    };
                    if p.presentation_context_id != value.presentation_context_id {
                        return Err(("data set on another presentation context", counts));
                    }
                    if p.overflow.is_none() {
                        let n = data.len() as u64;
                        let overflow = if p.received() as u64 + n > config.max_instance_bytes {
                            Some(Overflow::Instance)
                        } else if !p.reservation.grow(n) {
                            Some(Overflow::Inflight)
                        } else {
                            None
                        };
                        if overflow.is_some() {
                            // Drop what was received; read the rest to answer in turn.
                            p.overflow = overflow;
                            p.data = Vec::new();
                            p.upload = None; // frees its buffer
                            p.reservation.release();
                        } else if let Some(upload) = p.upload.as_mut() {
                            // Hashed and kept in memory; written at the end, on a
                            // blocking thread.
                            upload.append(data);
                        } else {
                            p.data.extend_from_slice(data);
                        }
                    }
                    if !value.is_last {
                        continue;
                    }
                    let p = pending.take().expect("pending request");
                    let pc_id = p.presentation_context_id;
                    let mut event = reporter.instance(&p);
                    let message_id = p.message_id;
                    let (status, rsp, buffer) = store(
                        association,
                        config,
                        spool,
                        calling_ae,
                        p,
                        &mut counts,
                        &mut event,
                    )
                    .await;
                    if let Some(buffer) = buffer.filter(|b| b.capacity() <= MAX_SPARE_BYTES) {
                        spare = buffer;
                    }
                    let rsp = reporter
                        .instance_done(event, status, message_id, rsp, &mut counts)
                        .await;
                    send_command(association, config, pc_id, rsp, stopping)
                        .await
                        .map_err(|r| (r, counts))?;
                }
            }
        }
        // The PDU's values are handled: its bytes leave the read buffer.
        association.get_mut().1.advance(len);
    }
}

/// A received PDU ([`receive`]).
enum Received {
    /// A P-DATA-TF PDU, left in the association's read buffer: its presentation data
    /// values as ranges of that buffer, and its length (to consume once they are handled).
    PData { values: Vec<Pdv>, len: usize },
    /// Any other PDU, consumed.
    Other(Pdu),
}

/// A presentation data value of a P-DATA-TF PDU in the read buffer.
struct Pdv {
    presentation_context_id: u8,
    value_type: PDataValueType,
    is_last: bool,
    range: std::ops::Range<usize>,
}

/// Reads the next PDU. P-DATA-TF PDUs (nearly every byte of a C-STORE) are parsed in place,
/// with dicom-ul's checks (length within the negotiated maximum, item lengths within the
/// PDU), so that their values are read from the read buffer without being copied (dicom-ul's
/// own reader copies every value twice); any other PDU is dicom-ul's.
async fn receive(
    association: &mut ul::Association,
    max_pdu_length: u32,
) -> Result<Received, String> {
    loop {
        let (socket, buf) = association.get_mut();
        if buf.len() >= 6 {
            let len = u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]);
            if buf[0] == 0x04 {
                if len > max_pdu_length {
                    return Err(format!(
                        "P-DATA-TF of {len} bytes over the maximum of {max_pdu_length}"
                    ));
                }
                let end = 6 + len as usize;
                if buf.len() >= end {
                    return pdata_values(&buf[..end])
                        .map(|values| Received::PData { values, len: end });
                }
                buf.reserve(end - buf.len());
            } else {
                let mut cursor = std::io::Cursor::new(&buf[..]);
                match dicom_ul::pdu::read_pdu(&mut cursor, max_pdu_length, true) {
                    Ok(Some(pdu)) => {
                        let used = cursor.position() as usize;
                        buf.advance(used);
                        return Ok(Received::Other(pdu));
                    }
                    Ok(None) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
        if socket.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("connection closed".into());
        }
    }
}

/// The presentation data values of the complete P-DATA-TF PDU `pdu` (its 6-byte header
/// included), as ranges of it.
fn pdata_values(pdu: &[u8]) -> Result<Vec<Pdv>, String> {
    let mut values = Vec::new();
    let mut at = 6;
    while at < pdu.len() {
        if pdu.len() - at < 4 + 1 + 1 {
            return Err("P-DATA-TF item cut short".into());
        }
        let item_length =
            u32::from_be_bytes([pdu[at], pdu[at + 1], pdu[at + 2], pdu[at + 3]]) as usize;
        if item_length < 2 {
            return Err(format!("P-DATA-TF item of length {item_length}"));
        }
        let presentation_context_id = pdu[at + 4];
        let header = pdu[at + 5];
        let start = at + 6;
        let end = at + 4 + item_length;
        if end > pdu.len() {
            return Err("P-DATA-TF item longer than its PDU".into());
        }
        values.push(Pdv {
            presentation_context_id,
            value_type: if header & 0x01 != 0 {
                PDataValueType::Command
            } else {
                PDataValueType::Data
            },
            is_last: header & 0x02 != 0,
            range: start..end,
        });
        at = end;
    }
    Ok(values)
}

/// The presentation context `id`, when the association accepted it.
fn accepted_context(
    association: &ul::Association,
    id: u8,
) -> Option<&PresentationContextNegotiated> {
    association
        .presentation_contexts()
        .iter()
        .find(|pc| pc.id == id && pc.reason == PresentationContextResultReason::Acceptance)
}

/// Starts receiving a C-STORE's data set straight into the spool, when its presentation
/// context was accepted for its SOP class (anything else is answered at the end by
/// [`store`], from the data kept in memory, as is any data set the spool cannot begin).
fn begin_upload(
    association: &ul::Association,
    spool: &Spool,
    calling_ae: &str,
    presentation_context_id: u8,
    cmd: &Command,
    buffer: Vec<u8>,
) -> Option<Upload> {
    let context = accepted_context(association, presentation_context_id)?;
    if sop::trim_uid(&context.abstract_syntax) != sop::trim_uid(&cmd.sop_class_uid) {
        return None;
    }
    spool
        .begin(
            &Incoming {
                transfer_syntax: &context.transfer_syntax,
                calling_ae,
                expected_sop_class: Some(&cmd.sop_class_uid),
                expected_sop_instance: Some(&cmd.sop_instance_uid),
            },
            buffer,
        )
        .ok()
}

/// The largest buffer an association keeps between data sets (beyond, it is freed): what
/// idle associations hold is bounded by this times the association cap.
const MAX_SPARE_BYTES: usize = 4 << 20;

/// Handles one complete C-STORE: returns the status, the encoded C-STORE-RSP, and the
/// buffer of a data set received into the spool (for the next one).
async fn store(
    association: &ul::Association,
    config: &ScpConfig,
    spool: &Arc<Spool>,
    calling_ae: &str,
    p: Pending,
    counts: &mut Counts,
    event: &mut InstanceEvent,
) -> (u16, Vec<u8>, Option<Vec<u8>>) {
    // Every data set received and held, stored or refused (as STOW counts every byte it
    // reads): a flood of corrupt, conflicting or misdirected instances is traffic too (red-
    // team findings). What was read past a limit and discarded is not held, nor counted.
    metrics::counter!("nightingale_dicom_received_bytes_total").increment(p.received() as u64);
    let context = accepted_context(association, p.presentation_context_id);
    let respond = |status: u16, comment: Option<&str>| {
        let rsp = response(
            0x8001,
            p.message_id,
            &p.sop_class_uid,
            Some(&p.sop_instance_uid),
            status,
            comment,
        );
        (status, rsp, None)
    };
    let Some(context) = context else {
        failed(counts, event, "context_not_accepted");
        return respond(
            status::SOP_CLASS_NOT_SUPPORTED,
            Some("presentation context not accepted"),
        );
    };
    if sop::trim_uid(&context.abstract_syntax) != sop::trim_uid(&p.sop_class_uid) {
        failed(counts, event, "sop_class_not_supported");
        return respond(
            status::SOP_CLASS_NOT_SUPPORTED,
            Some("SOP class differs from the presentation context"),
        );
    }
    match p.overflow {
        Some(Overflow::Instance) => {
            failed(counts, event, "too_large");
            tracing::warn!(
                limit = config.max_instance_bytes,
                "C-STORE refused: data set over the size limit"
            );
            return respond(
                status::OUT_OF_RESOURCES,
                Some("data set larger than the configured limit"),
            );
        }
        Some(Overflow::Inflight) => {
            failed(counts, event, "busy");
            tracing::warn!(
                limit = config.max_inflight_bytes,
                "C-STORE refused: too many bytes being received at once"
            );
            return respond(
                status::OUT_OF_RESOURCES,
                Some("busy: too much data in flight, retry later"),
            );
        }
        None => {}
    }
    let transfer_syntax = sop::trim_uid(&context.transfer_syntax).to_owned();
    event.transfer_syntax = transfer_syntax.clone();
    let size = p.received();
    let started = std::time::Instant::now();
    let result = {
        let spool = spool.clone();
        let calling_ae = calling_ae.to_owned();
        let sop_class = p.sop_class_uid.clone();
        let sop_instance = p.sop_instance_uid.clone();
        let ts = transfer_syntax.clone();
        let data = p.data;
        let upload = p.upload;
        // Held until the spool returned: the bytes are in memory until then.
        let _reservation = p.reservation;
        tokio::task::spawn_blocking(move || {
            let incoming = Incoming {
                transfer_syntax: &ts,
                calling_ae: &calling_ae,
                expected_sop_class: Some(&sop_class),
                expected_sop_instance: Some(&sop_instance),
            };
            let (result, buffer) = match upload {
                Some(mut upload) => {
                    let result = spool.finish(&mut upload, &incoming);
                    (result, Some(upload.into_buffer()))
                }
                None => (spool.store(&data, &incoming), None),
            };
            if let Ok(free) = spool.free_bytes() {
                metrics::gauge!("nightingale_dicom_spool_free_bytes").set(free as f64);
            }
            (result, buffer)
        })
        .await
    };
    let (result, buffer) = match result {
        Ok((result, buffer)) => (Ok(result), buffer),
        Err(join) => (Err(join), None),
    };
    let class = sop::storage_class(sop::trim_uid(&p.sop_class_uid))
        .map(|c| c.name)
        .unwrap_or("other");
    let (status, rsp, _) = match result {
        Ok(Ok(stored)) => {
            counts.0 += 1;
            event.sop_class_uid = stored.sop_class_uid.clone();
            event.study_uid = Some(stored.study_uid.clone());
            event.series_uid = Some(stored.series_uid.clone());
            event.sha256 = Some(stored.sha256.clone());
            event.duplicate = stored.duplicate;
            metrics::counter!(
                "nightingale_dicom_instances_stored_total",
                "duplicate" => if stored.duplicate { "true" } else { "false" }
            )
            .increment(1);
            metrics::histogram!("nightingale_dicom_store_seconds")
                .record(started.elapsed().as_secs_f64());
            tracing::info!(
                sop_class = class,
                transfer_syntax,
                size,
                duplicate = stored.duplicate,
                store_ms = started.elapsed().as_millis() as u64,
                "C-STORE stored"
            );
            respond(status::SUCCESS, None)
        }
        Ok(Err(e)) => {
            failed(counts, event, e.kind());
            tracing::warn!(sop_class = class, transfer_syntax, size, reason = e.kind(), error = %e, "C-STORE refused");
            let comment = error_comment(&e);
            respond(status_of(&e), Some(&comment))
        }
        Err(join) => {
            failed(counts, event, "internal");
            tracing::error!(error = %join, "C-STORE: the spool task failed");
            respond(status::PROCESSING_FAILURE, Some("internal error"))
        }
    };
    (status, rsp, buffer)
}

// ---- audit events (issue 8, OPS slice) ----

/// Numbers associations in this process (from 1) for the events.
static ASSOCIATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Sends one association's events to the sink.
struct Reporter {
    events: Arc<dyn EventSink>,
    association: u64,
    peer: SocketAddr,
    calling_ae: String,
}

impl Reporter {
    fn new(events: Arc<dyn EventSink>, peer: SocketAddr, calling_ae: &str) -> Reporter {
        Reporter {
            events,
            association: ASSOCIATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            peer,
            calling_ae: calling_ae.to_owned(),
        }
    }

    /// Sends an event; a sink failure is logged (association events do not change answers).
    async fn send(events: &Arc<dyn EventSink>, event: DicomEvent) -> bool {
        match events.event(event).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "DICOM event not recorded");
                false
            }
        }
    }

    /// The event of a C-STORE about to be handled, from its command.
    fn instance(&self, p: &Pending) -> InstanceEvent {
        InstanceEvent {
            association: self.association,
            peer: self.peer,
            calling_ae: self.calling_ae.clone(),
            sop_class_uid: p.sop_class_uid.clone(),
            sop_instance_uid: p.sop_instance_uid.clone(),
            study_uid: None,
            series_uid: None,
            transfer_syntax: String::new(),
            size: p.received() as u64,
            status: status::SUCCESS,
            sha256: None,
            duplicate: false,
            reason: None,
        }
    }

    /// Records a handled C-STORE before its response goes out. A stored instance whose
    /// record cannot be written is answered 0x0110 instead of success.
    async fn instance_done(
        &self,
        mut event: InstanceEvent,
        status: u16,
        message_id: u16,
        rsp: Vec<u8>,
        counts: &mut Counts,
    ) -> Vec<u8> {
        event.status = status;
        let success = status == status::SUCCESS;
        let (class, instance) = (event.sop_class_uid.clone(), event.sop_instance_uid.clone());
        let event = if success {
            DicomEvent::InstanceStored(event)
        } else {
            DicomEvent::InstanceRefused(event)
        };
        if Reporter::send(&self.events, event).await || !success {
            return rsp;
        }
        counts.0 -= 1;
        counts.1 += 1;
        metrics::counter!("nightingale_dicom_instances_failed_total", "reason" => "audit")
            .increment(1);
        response(
            0x8001,
            message_id,
            &class,
            Some(&instance),
            status::PROCESSING_FAILURE,
            Some("audit trail unavailable"),
        )
    }

    /// Records how the association ended.
    async fn ended(&self, ending: &Result<Ending, (&'static str, Counts)>) {
        let (association, peer, calling_ae) =
            (self.association, self.peer, self.calling_ae.clone());
        let event = match ending {
            Ok(Ending::Released((stored, failed))) => DicomEvent::AssociationReleased {
                association,
                peer,
                calling_ae,
                stored: *stored,
                failed: *failed,
            },
            Ok(Ending::AbortedByPeer((stored, failed))) => DicomEvent::AssociationAborted {
                association,
                peer,
                calling_ae,
                by: AbortedBy::Peer,
                reason: None,
                stored: *stored,
                failed: *failed,
            },
            Err((reason, (stored, failed))) => DicomEvent::AssociationAborted {
                association,
                peer,
                calling_ae,
                by: AbortedBy::Local,
                reason: Some(reason),
                stored: *stored,
                failed: *failed,
            },
        };
        Reporter::send(&self.events, event).await;
    }
}

// ---- end audit events ----

/// Counts a failed C-STORE (per association, and in `nightingale_dicom_instances_failed_total`).
fn failed(counts: &mut Counts, event: &mut InstanceEvent, reason: &'static str) {
    counts.1 += 1;
    event.reason = Some(reason);
    metrics::counter!("nightingale_dicom_instances_failed_total", "reason" => reason).increment(1);
}

/// The DIMSE status for a spool error.
pub fn status_of(e: &StoreError) -> u16 {
    match e {
        StoreError::OutOfResources { .. }
        | StoreError::DiskFull { .. }
        | StoreError::TooLarge { .. } => status::OUT_OF_RESOURCES,
        StoreError::UnknownTransferSyntax { .. }
        | StoreError::CannotParse { .. }
        | StoreError::Malformed(_) => status::CANNOT_UNDERSTAND,
        StoreError::MissingAttribute { .. }
        | StoreError::InvalidUid { .. }
        | StoreError::Mismatch { .. }
        | StoreError::MissingPixelData => status::DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
        StoreError::Conflict => status::DUPLICATE_SOP_INSTANCE,
        StoreError::Io { .. } | StoreError::Index(_) | StoreError::Torn => {
            status::PROCESSING_FAILURE
        }
    }
}

/// An Error Comment (LO: at most 64 characters, no backslash) for a spool error.
fn error_comment(e: &StoreError) -> String {
    let text = match e {
        // The parser's message can be long; the kind says enough to the sender.
        StoreError::CannotParse { .. } => "cannot parse the data set".to_owned(),
        StoreError::Io { .. } | StoreError::Index(_) | StoreError::Torn => {
            "spool failure".to_owned()
        }
        // Written to fit: the log has the long form (a sender's operator saw "… is alre").
        StoreError::Conflict => "SOP Instance UID already stored with other content".to_owned(),
        StoreError::Mismatch { name } => format!("{name} differs from the command's"),
        StoreError::OutOfResources { .. } => {
            "out of resources: the spool is nearly full".to_owned()
        }
        StoreError::DiskFull { .. } => "out of resources: the spool's disk is full".to_owned(),
        StoreError::TooLarge { limit, .. } => format!("larger than the limit of {limit} bytes"),
        other => other.to_string(),
    };
    let text: String = text
        .chars()
        .filter(|c| c.is_ascii() && !c.is_ascii_control() && *c != '\\')
        .collect();
    if text.len() <= 64 {
        return text;
    }
    format!("{}...", &text[..61])
}

struct Command {
    field: u16,
    message_id: u16,
    data_set_type: u16,
    sop_class_uid: String,
    sop_instance_uid: String,
}

fn parse_command(bytes: &[u8]) -> Option<Command> {
    // One strict walk over the element headers (no object tree: this runs for every
    // message). Strict, since a parser that believes an element's length (a command element
    // claiming 0xFFFFFFF0 bytes) would allocate and fill gigabytes on the async worker,
    // stalling every association (found by dicom/tests/hostile.rs).
    const WANTED: [(u16, u16); 7] = [
        (0x0000, 0x0100), // Command Field
        (0x0000, 0x0110), // Message ID
        (0x0000, 0x0800), // Command Data Set Type
        (0x0000, 0x0002), // Affected SOP Class UID
        (0x0000, 0x1000), // Affected SOP Instance UID
        (0x0000, 0x0003), // Requested SOP Class UID (N-services)
        (0x0000, 0x1001), // Requested SOP Instance UID (N-services)
    ];
    let found = crate::structure::walk(
        bytes,
        crate::structure::Encoding::of("1.2.840.10008.1.2"),
        &WANTED,
    )
    .ok()?;
    // US: the first value (little endian).
    let u16_of = |i: usize| match &found[i] {
        Some(crate::structure::Found::Value(v)) if v.len() >= 2 => {
            Some(u16::from_le_bytes([v[0], v[1]]))
        }
        _ => None,
    };
    let str_of = |i: usize| match &found[i] {
        Some(crate::structure::Found::Value(v)) => {
            sop::trim_uid(&String::from_utf8_lossy(v)).to_owned()
        }
        _ => String::new(),
    };
    let field = u16_of(0)?;
    // PS3.7 9.3.2.3: a C-CANCEL-RQ names the request it cancels (Message ID Being Responded
    // To) and carries no Message ID of its own (one was required, and a conformant cancel
    // aborted the association: a red-team finding).
    let message_id = match field {
        C_CANCEL_RQ => u16_of(1).unwrap_or(0),
        _ => u16_of(1)?,
    };
    // An N-service request names its class and instance as Requested; its response names
    // them as Affected (PS3.7 10.3): they are answered under those. Only N-services: a
    // C-STORE-RQ without its Affected UIDs is malformed whatever else it carries (a
    // re-attack's finding: one naming only Requested UIDs was stored).
    let n_service = field & 0x7FFF >= 0x0100;
    let or_requested = |affected: String, requested: usize| {
        if affected.is_empty() && n_service {
            str_of(requested)
        } else {
            affected
        }
    };
    Some(Command {
        field,
        message_id,
        data_set_type: u16_of(2).unwrap_or(NO_DATA_SET),
        sop_class_uid: or_requested(str_of(3), 5),
        sop_instance_uid: or_requested(str_of(4), 6),
    })
}

async fn send_command(
    association: &mut ul::Association,
    config: &ScpConfig,
    presentation_context_id: u8,
    data: Vec<u8>,
    stopping: &mut tokio::sync::watch::Receiver<Stopping>,
) -> Result<(), &'static str> {
    // Fragments that fit the peer's maximum PDU length (PS3.8 9.3.5: the PDU's variable
    // field, whose PDV item adds a 4-byte length, the context id and the message control
    // header; 0 means no limit): a peer asking for small PDUs had its response refused
    // whole by dicom-ul and the association aborted after its instance was stored.
    let max = association.requestor_max_pdu_length() as usize;
    let room = if max == 0 {
        data.len().max(1)
    } else {
        max.saturating_sub(6)
    };
    if room == 0 {
        return Err("the peer's maximum PDU length cannot carry a response");
    }
    let fragments: Vec<Vec<u8>> = if data.len() <= room {
        vec![data]
    } else {
        data.chunks(room).map(<[u8]>::to_vec).collect()
    };
    let last = fragments.len() - 1;
    let send_all = async {
        for (i, data) in fragments.into_iter().enumerate() {
            let pdu = Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id,
                    value_type: PDataValueType::Command,
                    is_last: i == last,
                    data,
                }],
            };
            association.send(&pdu).await?;
        }
        Ok::<_, std::io::Error>(())
    };
    // A peer that reads nothing holds this until the idle timeout, or the end of a stop's
    // grace (it held the association past the cut, which ended it unaudited).
    // The send first: a response the socket takes at once goes out even after the cut (an
    // instance stored just before it was answered A-ABORT by the draw of a fair select: a
    // re-attack's finding).
    let sent = tokio::select! {
        biased;
        sent = tokio::time::timeout(config.idle_timeout, send_all) => sent,
        () = reached(stopping, Stopping::Cut) => return Err(CUT),
    };
    match sent {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err("cannot send the response"),
        Err(_) => Err("timeout sending the response"),
    }
}

fn echo_response(message_id: u16) -> Vec<u8> {
    response(
        0x8030,
        message_id,
        sop::VERIFICATION,
        None,
        status::SUCCESS,
        None,
    )
}

/// Encodes a response command set in Implicit VR Little Endian (PS3.7 E), with its group
/// length first.
fn response(
    field: u16,
    message_id: u16,
    sop_class_uid: &str,
    sop_instance_uid: Option<&str>,
    status: u16,
    comment: Option<&str>,
) -> Vec<u8> {
    fn element(out: &mut Vec<u8>, element: u16, value: &[u8], pad: u8) {
        let len = value.len() + value.len() % 2;
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&element.to_le_bytes());
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.extend_from_slice(value);
        if value.len() % 2 == 1 {
            out.push(pad);
        }
    }
    let mut body = Vec::with_capacity(160);
    element(&mut body, 0x0002, sop_class_uid.as_bytes(), 0);
    element(&mut body, 0x0100, &field.to_le_bytes(), 0);
    element(&mut body, 0x0120, &message_id.to_le_bytes(), 0);
    element(&mut body, 0x0800, &NO_DATA_SET.to_le_bytes(), 0);
    element(&mut body, 0x0900, &status.to_le_bytes(), 0);
    if let Some(comment) = comment {
        element(&mut body, 0x0902, comment.as_bytes(), b' ');
    }
    if let Some(uid) = sop_instance_uid {
        element(&mut body, 0x1000, uid.as_bytes(), 0);
    }
    let mut out = Vec::with_capacity(body.len() + 12);
    element(&mut out, 0x0000, &(body.len() as u32).to_le_bytes(), 0);
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_dictionary_std::tags;
    use dicom_object::InMemDicomObject;

    /// The addresses of one IPv6 /64 share a host's waiting places (each address took 8 of
    /// its own: one machine with many addresses filled every place, a red-team finding).
    #[test]
    fn waiting_places_are_counted_per_ipv4_address_and_ipv6_slash_64() {
        let by_host = Arc::default();
        let mut held = Vec::new();
        for i in 0..MAX_WAITING_PER_HOST as u16 {
            let ip: IpAddr = std::net::Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, i + 1).into();
            held.push(WaitingPlace::take(&by_host, ip).unwrap());
        }
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert!(WaitingPlace::take(&by_host, same_64).is_none());
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(WaitingPlace::take(&by_host, other_64).is_some());
        // IPv4 and its mapped IPv6 form are one host; another IPv4 address is another.
        for _ in 0..MAX_WAITING_PER_HOST {
            held.push(WaitingPlace::take(&by_host, "192.0.2.1".parse().unwrap()).unwrap());
        }
        assert!(WaitingPlace::take(&by_host, "::ffff:192.0.2.1".parse().unwrap()).is_none());
        assert!(WaitingPlace::take(&by_host, "192.0.2.2".parse().unwrap()).is_some());
        drop(held);
        assert!(by_host.lock().unwrap().is_empty());
    }

    #[test]
    fn association_errors_are_logged_without_what_the_peer_sent() {
        let e = "unexpected response from peer PData { data: [68, 79, 69, 94, 74, 65, 78, 69] }";
        assert_eq!(error_summary(&e), "unexpected response from peer PData");
        let long = "x".repeat(500);
        assert_eq!(error_summary(&long).len(), 120);
        assert_eq!(error_summary(&"bad\nline\u{7}"), "badline");
    }

    /// An Error Comment is LO (at most 64 characters): the reasons a sender most needs are
    /// written to fit, not cut (`dicom store` showed "… other content is alre"), and any
    /// other is cut with "...".
    #[test]
    fn error_comments_fit_in_64_characters() {
        use crate::structure::StructureError;
        let errors = [
            StoreError::Conflict,
            StoreError::Mismatch {
                name: "SOPInstanceUID",
            },
            StoreError::Mismatch {
                name: "SOPClassUID",
            },
            StoreError::OutOfResources {
                free_bytes: u64::MAX,
                needed_bytes: u64::MAX,
            },
            StoreError::DiskFull { op: "write" },
            StoreError::TooLarge {
                size: u64::MAX,
                limit: u64::MAX,
            },
            StoreError::Malformed(StructureError::LengthPastEnd {
                offset: usize::MAX,
                length: u32::MAX,
            }),
            StoreError::MissingAttribute {
                name: "StudyInstanceUID",
            },
            StoreError::Torn,
        ];
        for e in &errors {
            let c = error_comment(e);
            assert!(c.len() <= 64 && !c.is_empty(), "{e}: {c:?}");
            assert!(!c.contains('\\'), "{c}");
        }
        assert_eq!(
            error_comment(&errors[0]),
            "SOP Instance UID already stored with other content"
        );
        assert_eq!(
            error_comment(&errors[1]),
            "SOPInstanceUID differs from the command's"
        );
        assert!(error_comment(&errors[6]).ends_with("..."));
    }

    #[test]
    fn allowed_ae_entries() {
        let a: AllowedAe = "PACS@10.0.0.5".parse().unwrap();
        assert_eq!(a.ae_title, "PACS");
        assert_eq!(a.host, Some("10.0.0.5".parse().unwrap()));
        let b: AllowedAe = "MODALITY".parse().unwrap();
        assert_eq!(b.host, None);
        assert!("".parse::<AllowedAe>().is_err());
        assert!("WAY_TOO_LONG_AE_TITLE".parse::<AllowedAe>().is_err());
        assert!("PACS@not-an-ip".parse::<AllowedAe>().is_err());
    }

    #[test]
    fn non_loopback_needs_an_allowlist_or_insecure() {
        let mut c = ScpConfig::new("0.0.0.0:11112".parse().unwrap());
        assert!(matches!(
            c.check(),
            Err(ScpError::OpenWithoutAllowlist { .. })
        ));
        c.insecure = true;
        c.check().unwrap();
        c.insecure = false;
        c.allowed = Some(vec!["PACS".parse().unwrap()]);
        c.check().unwrap();
        let c = ScpConfig::new("127.0.0.1:11112".parse().unwrap());
        c.check().unwrap();
    }

    #[test]
    fn the_inflight_budget_is_shared_and_given_back() {
        let budget = Budget::new(100);
        let mut a = Reservation::new(&budget);
        let mut b = Reservation::new(&budget);
        assert!(a.grow(60));
        assert!(!b.grow(50), "60 + 50 is over 100");
        assert_eq!(budget.used(), 60);
        assert!(b.grow(40));
        assert_eq!(budget.used(), 100);
        drop(a);
        assert_eq!(budget.used(), 40);
        assert!(b.grow(60));
        b.release();
        assert_eq!(budget.used(), 0);
        assert!(b.grow(100));
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn allowlist_checks_ae_and_host() {
        let list = Allowlist {
            allowed: Some(vec![
                "PACS@10.0.0.5".parse().unwrap(),
                "CT1".parse().unwrap(),
            ]),
            peer: "10.0.0.5".parse().unwrap(),
            check_called: false,
        };
        assert!(list.check_access("NIGHTINGALE", "PACS", "X", None).is_ok());
        assert!(list.check_access("NIGHTINGALE", "CT1 ", "X", None).is_ok());
        assert_eq!(
            list.check_access("NIGHTINGALE", "OTHER", "X", None),
            Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized)
        );
        let elsewhere = Allowlist {
            allowed: list.allowed.clone(),
            peer: "10.0.0.6".parse().unwrap(),
            check_called: false,
        };
        assert!(
            elsewhere
                .check_access("NIGHTINGALE", "PACS", "X", None)
                .is_err()
        );
        // With the called AE checked: this node's title (padding aside) or refused, before
        // the calling AE is looked at.
        let strict = Allowlist {
            allowed: None,
            peer: "10.0.0.6".parse().unwrap(),
            check_called: true,
        };
        assert!(
            strict
                .check_access("NIGHTINGALE", "ANY", "NIGHTINGALE ", None)
                .is_ok()
        );
        assert_eq!(
            strict.check_access("NIGHTINGALE", "ANY", "OTHERNODE", None),
            Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized)
        );
    }

    #[test]
    fn response_round_trips_through_the_parser() {
        let bytes = response(
            0x8001,
            7,
            "1.2.840.10008.5.1.4.1.1.2",
            Some("1.2.3"),
            0xA900,
            Some("odd"),
        );
        let ts = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
        let obj = InMemDicomObject::read_dataset_with_ts(bytes.as_slice(), &ts).unwrap();
        let u16_of = |tag| obj.element(tag).unwrap().to_int::<u16>().unwrap();
        assert_eq!(u16_of(tags::COMMAND_FIELD), 0x8001);
        assert_eq!(u16_of(tags::MESSAGE_ID_BEING_RESPONDED_TO), 7);
        assert_eq!(u16_of(tags::STATUS), 0xA900);
        let len = obj
            .element(tags::COMMAND_GROUP_LENGTH)
            .unwrap()
            .to_int::<u32>()
            .unwrap();
        assert_eq!(len as usize, bytes.len() - 12);
        assert_eq!(
            obj.element(tags::ERROR_COMMENT)
                .unwrap()
                .to_str()
                .unwrap()
                .trim(),
            "odd"
        );
    }
}
