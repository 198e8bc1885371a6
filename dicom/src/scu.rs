//! A DIMSE SCU: C-ECHO, and C-STORE of DICOM Part 10 files, over dicom-ul's async client.
//!
//! Files are sent as they are on disk: each file's SOP class is proposed with the file's own
//! transfer syntax (one presentation context per distinct pair, at most 128 per
//! association), and its data set is streamed from the file without being decoded or
//! re-encoded. Many files share one association ([`store_files`]); each gets its own
//! outcome. A context the peer rejects fails only the files that needed it.
//!
//! Every network wait is bounded: connecting and the association request by
//! [`ScuOptions::connect_timeout`], each write and each whole response (however many PDUs
//! it comes in) by [`ScuOptions::dimse_timeout`], and one whole C-STORE (request, data set
//! and response) by [`ScuOptions::exchange_timeout`]. A response may carry at most
//! [`MAX_EMPTY_PDVS`] empty fragments: a peer that trickles empty not-last command PDVs
//! used to hold the association (and every result behind it) for ever.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_ul::ClientAssociationOptions;
use dicom_ul::association::client::AsyncClientAssociation;
use dicom_ul::pdu::{AssociationRJResult, PDataValue, PDataValueType, Pdu};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::TcpStream;

use crate::sop;

/// Deflated Explicit VR Little Endian.
const DEFLATED: &str = "1.2.840.10008.1.2.1.99";

const C_STORE_RQ: u16 = 0x0001;
const C_STORE_RSP: u16 = 0x8001;
const C_ECHO_RQ: u16 = 0x0030;
const C_ECHO_RSP: u16 = 0x8030;
/// Most presentation contexts in one association (odd IDs 1..=255).
pub const MAX_CONTEXTS: usize = 128;
/// Bytes of a data set written per bounded write.
const CHUNK: usize = 1 << 20;
/// Empty PDVs (no bytes of the command set) tolerated in one response: they make no
/// progress, and a response is a few hundred bytes.
pub const MAX_EMPTY_PDVS: usize = 4;

/// Settings of the SCU.
#[derive(Debug, Clone)]
pub struct ScuOptions {
    /// This node's AE title.
    pub calling_ae_title: String,
    /// The peer's AE title.
    pub called_ae_title: String,
    /// Largest PDU this node receives (announced to the peer).
    pub max_pdu_length: u32,
    /// Bound on the TCP connection plus the association request and its answer.
    pub connect_timeout: Duration,
    /// Bound on each write of a request and on the wait for each whole response.
    pub dimse_timeout: Duration,
    /// Bound on one whole C-STORE exchange: the request, its data set and the response.
    pub exchange_timeout: Duration,
}

impl Default for ScuOptions {
    fn default() -> Self {
        ScuOptions {
            calling_ae_title: "NIGHTINGALE".into(),
            called_ae_title: "ANY-SCP".into(),
            max_pdu_length: 65_536,
            connect_timeout: Duration::from_secs(10),
            dimse_timeout: Duration::from_secs(60),
            exchange_timeout: Duration::from_secs(300),
        }
    }
}

/// An association could not be set up, or broke.
#[derive(Debug, thiserror::Error)]
pub enum ScuError {
    #[error(
        "invalid AE title {ae_title:?}: 1 to 16 characters, no backslash or control characters"
    )]
    InvalidAeTitle { ae_title: String },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} did not answer the association request within {timeout:?}")]
    ConnectTimeout { addr: String, timeout: Duration },
    #[error("association rejected by {addr} ({}): {reason}", if *.permanent { "permanent" } else { "transient" })]
    Rejected {
        addr: String,
        permanent: bool,
        /// The A-ASSOCIATE-RJ source and reason, as dicom-ul words it.
        reason: String,
    },
    #[error("{addr} accepted none of the proposed presentation contexts")]
    NoContextAccepted { addr: String },
    #[error("the peer aborted the association")]
    Aborted,
    #[error("no answer from the peer within {timeout:?} ({what})")]
    Timeout {
        what: &'static str,
        timeout: Duration,
    },
    #[error("protocol error: {what}")]
    Protocol { what: &'static str },
    #[error("association error: {0}")]
    Association(#[from] dicom_ul::association::Error),
    #[error("I/O error while sending: {0}")]
    Io(#[from] std::io::Error),
}

/// A file cannot be sent.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a DICOM Part 10 file (no DICM preamble)")]
    NotPart10 { path: PathBuf },
    #[error("{path}: unreadable file meta information: {detail}")]
    Meta { path: PathBuf, detail: String },
}

/// Why one file was not stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreFailure {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("the peer rejected the presentation context {sop_class_uid} / {transfer_syntax}")]
    ContextRejected {
        sop_class_uid: String,
        transfer_syntax: String,
    },
    #[error(transparent)]
    Association(#[from] ScuError),
    #[error("not sent: the association failed before this file")]
    NotSent,
}

/// A DIMSE response status with its Error Comment, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DimseStatus {
    pub status: u16,
    pub error_comment: Option<String>,
}

impl DimseStatus {
    pub fn is_success(&self) -> bool {
        self.status == 0x0000
    }

    /// Warning statuses (0001, 0107, 0116, Bxxx; PS3.4 B.2.3, PS3.7 C): the instance was
    /// stored, with a coercion, elements discarded or the like.
    pub fn is_warning(&self) -> bool {
        matches!(self.status, 0x0001 | 0x0107 | 0x0116) || (self.status & 0xF000) == 0xB000
    }

    /// Failures that sending the same object again cannot change (PS3.4 B.2.3, PS3.7 C):
    /// the SOP class not supported (0122) or not authorized (0124), a data set that does
    /// not match its SOP class (A9xx), one the peer cannot understand (Cxxx). Out of
    /// resources (A7xx) and processing failures (0110) are worth another try.
    pub fn is_permanent_failure(&self) -> bool {
        matches!(self.status, 0x0122 | 0x0124)
            || (self.status & 0xFF00) == 0xA900
            || (self.status & 0xF000) == 0xC000
    }
}

impl std::fmt::Display for DimseStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0x{:04X}", self.status)?;
        if let Some(c) = &self.error_comment {
            write!(f, " ({c})")?;
        }
        Ok(())
    }
}

/// A Part 10 file ready to send: what its meta says, and where its data set lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part10File {
    pub path: PathBuf,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax: String,
    /// Offset of the data set in the file (after the meta group).
    pub dataset_offset: u64,
    /// Bytes of the data set.
    pub dataset_len: u64,
}

impl Part10File {
    /// Reads the preamble and the file meta group (not the data set).
    pub fn open(path: &Path) -> Result<Part10File, FileError> {
        let io = |source| FileError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut head = [0u8; 144];
        if file_len < head.len() as u64 {
            return Err(FileError::NotPart10 {
                path: path.to_owned(),
            });
        }
        file.read_exact(&mut head).map_err(io)?;
        if &head[128..132] != b"DICM" {
            return Err(FileError::NotPart10 {
                path: path.to_owned(),
            });
        }
        let meta_error = |detail: String| FileError::Meta {
            path: path.to_owned(),
            detail,
        };
        // (0002,0000) UL group length first, as PS3.10 requires.
        if head[132..136] != [0x02, 0x00, 0x00, 0x00] || &head[136..138] != b"UL" {
            return Err(meta_error("no (0002,0000) group length first".into()));
        }
        let group_len = u32::from_le_bytes(head[140..144].try_into().expect("4 bytes")) as u64;
        if group_len > 1 << 20 || 144 + group_len > file_len {
            return Err(meta_error(format!("group length {group_len} out of range")));
        }
        let mut meta_bytes = head[128..].to_vec();
        let mut rest = vec![0u8; group_len as usize];
        file.read_exact(&mut rest).map_err(io)?;
        meta_bytes.extend_from_slice(&rest);
        let (meta, _) =
            crate::meta::read_file_meta(&meta_bytes).map_err(|e| meta_error(e.to_string()))?;
        let dataset_offset = 144 + group_len;
        // The command names the instance the data set carries, as dcmtk's storescu and
        // dcmsend do: an SCP compares the command's UIDs with the data set's, and a file
        // whose meta names another (pydicom's rtplan.dcm) was refused 0xA900 where storescu
        // sent it (a review's finding). The meta's where the data set cannot be read.
        let transfer_syntax = sop::trim_uid(meta.transfer_syntax()).to_owned();
        let (class_in_data, instance_in_data) =
            dataset_uids(&mut file, file_len - dataset_offset, &transfer_syntax);
        Ok(Part10File {
            path: path.to_owned(),
            sop_class_uid: class_in_data
                .unwrap_or_else(|| sop::trim_uid(meta.media_storage_sop_class_uid()).to_owned()),
            sop_instance_uid: instance_in_data
                .unwrap_or_else(|| sop::trim_uid(meta.media_storage_sop_instance_uid()).to_owned()),
            transfer_syntax,
            dataset_offset,
            dataset_len: file_len - dataset_offset,
        })
    }

    fn context(&self) -> (String, String) {
        (self.sop_class_uid.clone(), self.transfer_syntax.clone())
    }
}

/// The SOP Class and SOP Instance UIDs of a data set, read from `file` (positioned at its
/// start, `len` bytes long, in `transfer_syntax`; inflated for Deflated), each `None` where
/// absent, empty or not found. Its elements are read by their headers up to the end of
/// group 0008 (in any order there), values skipped by their lengths (undefined-length
/// sequences item by item, at most [`UID_DEPTH`] deep), at most [`UID_SCAN`] bytes in all,
/// and only the two UIDs' values kept. A full parse of the data set took a 60 KB file of
/// 3,000 nested sequences to a stack overflow, and one declaring a 4 GB element to 4 GB of
/// memory (a re-attack's findings); a first fix that read 64 KiB missed UIDs after a larger
/// element or a sequence (a second re-attack). Not [`crate::structure::walk`]: it checks a
/// whole data set held in memory, and this reads the start of a file of any size.
fn dataset_uids(
    file: &mut std::fs::File,
    len: u64,
    transfer_syntax: &str,
) -> (Option<String>, Option<String>) {
    const UNDEFINED: u32 = 0xFFFF_FFFF;
    let plain = std::io::BufReader::new(file.take(len));
    let inner: Box<dyn Read + '_> = if transfer_syntax == DEFLATED {
        Box::new(flate2::read::DeflateDecoder::new(plain))
    } else {
        Box::new(plain)
    };
    let mut reader = inner.take(UID_SCAN);
    let big_endian = transfer_syntax == "1.2.840.10008.1.2.2";
    let explicit = transfer_syntax != "1.2.840.10008.1.2";
    let u16_of = |b: [u8; 2]| {
        if big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        }
    };
    let u32_of = |b: [u8; 4]| {
        if big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    };
    let (mut class, mut instance) = (None, None);
    let mut depth = 0usize;
    // The depth from which elements are in Implicit VR: the content of a UN of undefined
    // length (PS3.5 6.2.2): read as Explicit VR, the UIDs after one were missed (a
    // re-attack's finding).
    let mut implicit_from: Option<usize> = None;
    loop {
        let mut head = [0u8; 8];
        if reader.read_exact(&mut head).is_err() {
            break;
        }
        let group = u16_of([head[0], head[1]]);
        let element = u16_of([head[2], head[3]]);
        let short = u32_of([head[4], head[5], head[6], head[7]]);
        // Items and delimiters: a tag and a 4-byte length in every transfer syntax.
        if group == 0xFFFE {
            match element {
                0xE000 if short == UNDEFINED => depth += 1,
                0xE000 if skip(&mut reader, short) => {}
                0xE00D | 0xE0DD if depth > 0 => depth -= 1,
                _ => break,
            }
            if implicit_from.is_some_and(|from| depth < from) {
                implicit_from = None;
            }
            if depth > UID_DEPTH {
                break;
            }
            continue;
        }
        if depth == 0 && group > 0x0008 {
            break;
        }
        let vr = [head[4], head[5]];
        let explicit_here = explicit && implicit_from.is_none();
        let length = if !explicit_here {
            short
        } else if crate::structure::long_length(vr) {
            let mut long = [0u8; 4];
            if reader.read_exact(&mut long).is_err() {
                break;
            }
            u32_of(long)
        } else {
            u32::from(u16_of([head[6], head[7]]))
        };
        if length == UNDEFINED {
            // A sequence (or an undefined-length value made of items): its items follow.
            depth += 1;
            if explicit_here && &vr == b"UN" {
                implicit_from = Some(depth);
            }
            if depth > UID_DEPTH {
                break;
            }
            continue;
        }
        let wanted = depth == 0 && group == 0x0008 && matches!(element, 0x0016 | 0x0018);
        if !wanted || length > 1024 {
            if !skip(&mut reader, length) {
                break;
            }
            continue;
        }
        let mut value = vec![0u8; length as usize];
        if reader.read_exact(&mut value).is_err() {
            break;
        }
        let text = std::str::from_utf8(&value)
            .ok()
            .map(|v| sop::trim_uid(v).to_owned())
            .filter(|v| !v.is_empty());
        if element == 0x0016 {
            class = text;
        } else {
            instance = text;
        }
    }
    (class, instance)
}

/// Reads past `n` bytes of `reader`; `false` when it ends first.
fn skip(reader: &mut impl Read, n: u32) -> bool {
    std::io::copy(&mut reader.take(u64::from(n)), &mut std::io::sink())
        .is_ok_and(|copied| copied == u64::from(n))
}

/// How much of a data set (inflated) [`dataset_uids`] reads at most.
const UID_SCAN: u64 = 16 << 20;

/// How deeply nested sequences [`dataset_uids`] reads through.
const UID_DEPTH: usize = 64;

/// Every file under `paths` (folders recursively, in name order). Entries that cannot be
/// listed are returned as errors in place. Inside a folder, links to folders are not
/// followed (a link to `..` would send the same files again and again), and only regular
/// files (or links to them) are taken: reading a FIFO would wait forever. A path named on
/// the command line that is neither a folder nor a regular file is an error.
pub fn collect_files(paths: &[PathBuf]) -> Vec<Result<PathBuf, FileError>> {
    fn walk(dir: &Path, out: &mut Vec<Result<PathBuf, FileError>>) {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(source) => {
                out.push(Err(FileError::Io {
                    path: dir.to_owned(),
                    source,
                }));
                return;
            }
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths {
            let linked = p
                .symlink_metadata()
                .is_ok_and(|m| m.file_type().is_symlink());
            if p.is_dir() {
                if !linked {
                    walk(&p, out);
                }
            } else if p.is_file() {
                out.push(Ok(p));
            }
        }
    }
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, &mut out);
        } else if p.exists() && !p.is_file() {
            out.push(Err(FileError::Io {
                path: p.clone(),
                source: std::io::Error::other("not a regular file"),
            }));
        } else {
            out.push(Ok(p.clone()));
        }
    }
    out
}

fn valid_ae_title(ae: &str) -> bool {
    !ae.trim().is_empty()
        && ae.len() <= 16
        && ae.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'\\')
}

/// An open association to a storage SCP.
pub struct StoreAssociation {
    association: AsyncClientAssociation<TcpStream>,
    options: ScuOptions,
    next_message_id: u16,
}

impl StoreAssociation {
    /// Connects to `addr` (`host:port`) and proposes the `(SOP class, transfer syntax)`
    /// contexts (at most [`MAX_CONTEXTS`]). Fails when none is accepted.
    pub async fn open(
        addr: &str,
        options: &ScuOptions,
        contexts: &[(String, String)],
    ) -> Result<StoreAssociation, ScuError> {
        if contexts.len() > MAX_CONTEXTS {
            return Err(ScuError::Protocol {
                what: "more than 128 presentation contexts",
            });
        }
        let association = associate(addr, options, contexts).await?;
        Ok(StoreAssociation {
            association,
            options: options.clone(),
            next_message_id: 1,
        })
    }

    /// Whether the peer accepted `(sop_class, transfer_syntax)` (or, for Explicit VR Little
    /// Endian, Implicit VR Little Endian in its place).
    pub fn accepts(&self, sop_class_uid: &str, transfer_syntax: &str) -> bool {
        self.context_id(sop_class_uid, transfer_syntax).is_some()
    }

    /// The accepted context for a file of `(sop_class, transfer_syntax)`, and whether its
    /// data set must be re-encoded in Implicit VR Little Endian (the peer took that in
    /// place of the Explicit VR Little Endian offered).
    fn context_id(&self, sop_class_uid: &str, transfer_syntax: &str) -> Option<(u8, bool)> {
        let accepted = |ts: &str| {
            self.association
                .presentation_contexts()
                .iter()
                .find(|pc| {
                    sop::trim_uid(&pc.abstract_syntax) == sop_class_uid
                        && sop::trim_uid(&pc.transfer_syntax) == ts
                })
                .map(|pc| pc.id)
        };
        accepted(transfer_syntax).map(|id| (id, false)).or_else(|| {
            (transfer_syntax == EXPLICIT_VR_LE)
                .then(|| accepted(IMPLICIT_VR_LE))
                .flatten()
                .map(|id| (id, true))
        })
    }

    /// Sends one C-STORE of `file` and returns the peer's status, all within
    /// [`ScuOptions::exchange_timeout`]. A `ContextRejected` or `File` failure leaves the
    /// association usable; an `Association` failure (a timeout among them) does not.
    pub async fn store(&mut self, file: &Part10File) -> Result<DimseStatus, StoreFailure> {
        let timeout = self.options.exchange_timeout;
        match tokio::time::timeout(timeout, self.store_within(file)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(StoreFailure::Association(ScuError::Timeout {
                what: "the whole C-STORE exchange",
                timeout,
            })),
        }
    }

    async fn store_within(&mut self, file: &Part10File) -> Result<DimseStatus, StoreFailure> {
        let Some((pc, to_implicit)) = self.context_id(&file.sop_class_uid, &file.transfer_syntax)
        else {
            return Err(StoreFailure::ContextRejected {
                sop_class_uid: file.sop_class_uid.clone(),
                transfer_syntax: file.transfer_syntax.clone(),
            });
        };
        // Open the data set before anything is sent: a file that vanished fails alone.
        let io = |source| FileError::Io {
            path: file.path.clone(),
            source,
        };
        type Source = std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>;
        let (mut reader, mut left): (Source, u64) = if to_implicit {
            let data = implicit_dataset(file).await?;
            let len = data.len() as u64;
            (Box::pin(std::io::Cursor::new(data)), len)
        } else {
            let mut f = tokio::fs::File::open(&file.path).await.map_err(io)?;
            f.seek(std::io::SeekFrom::Start(file.dataset_offset))
                .await
                .map_err(io)?;
            // PS3.5 A.5: a deflated stream of odd length is sent with one NUL after it
            // (readers stop at the stream's own end). Sent as it was, dcmtk's storescp
            // aborted with "Odd Fragment Length" (pydicom's image_dfl.dcm: a review's
            // finding).
            if file.transfer_syntax == DEFLATED && file.dataset_len % 2 == 1 {
                let padded = f.take(file.dataset_len).chain(std::io::Cursor::new([0u8]));
                (Box::pin(padded), file.dataset_len + 1)
            } else {
                (Box::pin(f), file.dataset_len)
            }
        };
        let message_id = self.take_message_id();
        let command = c_store_rq(message_id, &file.sop_class_uid, &file.sop_instance_uid);
        self.send_command(pc, command).await?;
        // One P-DATA PDU per fragment, each within the peer's maximum PDU length (its PDV
        // item adds 6 bytes). dicom-ul's AsyncPDataWriter is not used: its Drop blocks the
        // thread (block_in_place), which panics on a current-thread runtime.
        let fragment = self.fragment_len();
        loop {
            let n = (fragment as u64).min(left) as usize;
            let mut data = vec![0u8; n];
            // A file cut short after its header was read: the association cannot carry on
            // (the peer waits for the rest of the data set), so it is an association error.
            reader
                .read_exact(&mut data)
                .await
                .map_err(|e| StoreFailure::Association(ScuError::Io(e)))?;
            left -= n as u64;
            let pdu = Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: pc,
                    value_type: PDataValueType::Data,
                    is_last: left == 0,
                    data,
                }],
            };
            bounded(
                self.options.dimse_timeout,
                "sending the data set",
                self.association.send(&pdu),
            )
            .await?
            .map_err(ScuError::from)?;
            if left == 0 {
                break;
            }
        }
        Ok(self
            .response(pc, C_STORE_RSP, message_id, Some(&file.sop_instance_uid))
            .await?)
    }

    /// Sends a C-ECHO on this association (it needs the Verification context).
    pub async fn echo(&mut self) -> Result<DimseStatus, ScuError> {
        let pc = self
            .association
            .presentation_contexts()
            .iter()
            .find(|pc| sop::trim_uid(&pc.abstract_syntax) == sop::VERIFICATION)
            .map(|pc| pc.id)
            .ok_or(ScuError::Protocol {
                what: "Verification context not accepted",
            })?;
        let message_id = self.take_message_id();
        self.send_command(pc, c_echo_rq(message_id)).await?;
        self.response(pc, C_ECHO_RSP, message_id, None).await
    }

    /// Releases the association (A-RELEASE), bounded by the DIMSE timeout.
    pub async fn release(self) -> Result<(), ScuError> {
        bounded(
            self.options.dimse_timeout,
            "the release",
            self.association.release(),
        )
        .await??;
        Ok(())
    }

    /// Aborts the association (A-ABORT).
    pub async fn abort(self) {
        let _ = bounded(
            self.options.dimse_timeout,
            "the abort",
            self.association.abort(),
        )
        .await;
    }

    fn take_message_id(&mut self) -> u16 {
        let id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1).max(1);
        id
    }

    /// Bytes of one P-DATA fragment: what the peer's maximum PDU length leaves after the
    /// PDV item's 6 bytes (0: no limit), at most [`CHUNK`]. A peer announcing 256 got
    /// 1,024-byte fragments, which dicom-ul refused to send (a red-team finding: every
    /// C-STORE to it failed).
    fn fragment_len(&self) -> usize {
        match self.association.acceptor_max_pdu_length() {
            0 => CHUNK,
            max => (max.saturating_sub(6) as usize).clamp(1, CHUNK),
        }
    }

    /// Sends a command set, in fragments that fit the peer's maximum PDU length.
    async fn send_command(&mut self, pc: u8, command: Vec<u8>) -> Result<(), ScuError> {
        let fragment = self.fragment_len();
        let count = command.len().div_ceil(fragment).max(1);
        for (i, chunk) in command.chunks(fragment).enumerate() {
            let pdu = Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: pc,
                    value_type: PDataValueType::Command,
                    is_last: i + 1 == count,
                    data: chunk.to_vec(),
                }],
            };
            bounded(
                self.options.dimse_timeout,
                "sending a command",
                self.association.send(&pdu),
            )
            .await??;
        }
        Ok(())
    }

    /// Reads PDUs until a whole command set arrives and returns its status: all of it
    /// within one [`ScuOptions::dimse_timeout`], with at most [`MAX_EMPTY_PDVS`] empty
    /// fragments, and on the presentation context `pc` the request went on (PS3.7 9.3.1:
    /// a response on another context, or one never negotiated, was taken as this one's).
    async fn response(
        &mut self,
        pc: u8,
        expected_field: u16,
        message_id: u16,
        sop_instance_uid: Option<&str>,
    ) -> Result<DimseStatus, ScuError> {
        let timeout = self.options.dimse_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut command = Vec::new();
        let mut empty = 0usize;
        loop {
            let pdu = tokio::time::timeout_at(deadline, self.association.receive())
                .await
                .map_err(|_| ScuError::Timeout {
                    what: "waiting for the response",
                    timeout,
                })??;
            let values = match pdu {
                Pdu::PData { data } => data,
                Pdu::AbortRQ { .. } => return Err(ScuError::Aborted),
                _ => {
                    return Err(ScuError::Protocol {
                        what: "unexpected PDU instead of a response",
                    });
                }
            };
            for value in values {
                if value.presentation_context_id != pc {
                    return Err(ScuError::Protocol {
                        what: "a response on another presentation context than its request's",
                    });
                }
                if value.value_type != PDataValueType::Command {
                    return Err(ScuError::Protocol {
                        what: "data set in a response",
                    });
                }
                if command.len() + value.data.len() > 1 << 20 {
                    return Err(ScuError::Protocol {
                        what: "response command set too large",
                    });
                }
                if value.data.is_empty() && !value.is_last {
                    empty += 1;
                    if empty > MAX_EMPTY_PDVS {
                        return Err(ScuError::Protocol {
                            what: "response made of empty fragments",
                        });
                    }
                }
                command.extend_from_slice(&value.data);
                if value.is_last {
                    return parse_response(&command, expected_field, message_id, sop_instance_uid);
                }
            }
        }
    }
}

/// Runs `fut` within `timeout`.
async fn bounded<T>(
    timeout: Duration,
    what: &'static str,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, ScuError> {
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ScuError::Timeout { what, timeout })
}

async fn associate(
    addr: &str,
    options: &ScuOptions,
    contexts: &[(String, String)],
) -> Result<AsyncClientAssociation<TcpStream>, ScuError> {
    for ae in [&options.calling_ae_title, &options.called_ae_title] {
        if !valid_ae_title(ae) {
            return Err(ScuError::InvalidAeTitle {
                ae_title: ae.clone(),
            });
        }
    }
    let mut client = ClientAssociationOptions::new()
        .calling_ae_title(options.calling_ae_title.as_str())
        .called_ae_title(options.called_ae_title.as_str())
        .max_pdu_length(options.max_pdu_length)
        .connection_timeout(options.connect_timeout)
        .read_timeout(options.dimse_timeout)
        .write_timeout(options.dimse_timeout);
    for (class, ts) in contexts {
        // Implicit VR Little Endian, the default every node takes (PS3.5 10.1), is offered
        // beside Explicit VR Little Endian: an SCP that takes only the default still gets
        // the object, sent in it ([`StoreAssociation::store`] re-encodes the data set).
        let mut offered = vec![ts.as_str()];
        if ts == EXPLICIT_VR_LE {
            offered.push(IMPLICIT_VR_LE);
        }
        client = client.with_presentation_context(class.as_str(), offered);
    }
    let established = tokio::time::timeout(options.connect_timeout, client.establish_async(addr))
        .await
        .map_err(|_| ScuError::ConnectTimeout {
            addr: addr.to_owned(),
            timeout: options.connect_timeout,
        })?;
    use dicom_ul::association::Error as UlError;
    let mut association = match established {
        Ok(a) => a,
        Err(UlError::Connect { source, .. }) => {
            return Err(ScuError::Connect {
                addr: addr.to_owned(),
                source,
            });
        }
        Err(UlError::Timeout { .. }) => {
            return Err(ScuError::ConnectTimeout {
                addr: addr.to_owned(),
                timeout: options.connect_timeout,
            });
        }
        Err(UlError::Rejected { association_rj, .. }) => {
            return Err(ScuError::Rejected {
                addr: addr.to_owned(),
                permanent: association_rj.result == AssociationRJResult::Permanent,
                reason: association_rj.source.to_string(),
            });
        }
        Err(UlError::NoAcceptedPresentationContexts { .. }) => {
            return Err(ScuError::NoContextAccepted {
                addr: addr.to_owned(),
            });
        }
        Err(e) => return Err(e.into()),
    };
    // dcmtk and most SCPs answer each PDU at once: Nagle would hold every small write.
    let _ = association.inner_stream().set_nodelay(true);
    Ok(association)
}

/// C-ECHO to `addr`: connects, proposes Verification, echoes, releases.
pub async fn echo(addr: &str, options: &ScuOptions) -> Result<DimseStatus, ScuError> {
    let verification = [(
        sop::VERIFICATION.to_owned(),
        "1.2.840.10008.1.2".to_owned(), // Implicit VR Little Endian: every SCP takes it
    )];
    let mut association = StoreAssociation::open(addr, options, &verification).await?;
    match association.echo().await {
        Ok(status) => {
            association.release().await?;
            Ok(status)
        }
        Err(e) => {
            association.abort().await;
            Err(e)
        }
    }
}

/// Explicit VR Little Endian.
const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
/// Implicit VR Little Endian, DICOM's default transfer syntax.
const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";

/// The data set of `file` (Explicit VR Little Endian) re-encoded in Implicit VR Little
/// Endian, for a peer that accepted only that: read whole (these are result objects and
/// operators' files, not studies streamed from a modality) on a blocking thread.
async fn implicit_dataset(file: &Part10File) -> Result<Vec<u8>, StoreFailure> {
    let path = file.path.clone();
    let offset = file.dataset_offset;
    let encode = move || -> Result<Vec<u8>, FileError> {
        let meta_error = |detail: String| FileError::Meta {
            path: path.clone(),
            detail,
        };
        let raw = std::fs::read(&path).map_err(|source| FileError::Io {
            path: path.clone(),
            source,
        })?;
        let dataset = raw
            .get(offset as usize..)
            .ok_or_else(|| meta_error("the file is shorter than its meta group".into()))?;
        // Its structure first, as the SCP checks what it receives (nesting at most 64 deep,
        // every length within the data set): parsed as it was, a 108 KB file of 3,000
        // nested sequences overflowed the stack, and a 368-byte one declaring a 2 GB item
        // took 2 GB (a re-attack's findings).
        let undefined_un = crate::structure::check_for_undefined_un(
            dataset,
            crate::structure::Encoding::of(EXPLICIT_VR_LE),
        )
        .map_err(|e| meta_error(format!("the data set is malformed: {e}")))?;
        // A UN of undefined length holds Implicit VR (PS3.5 6.2.2), which the re-encoder
        // reads as Explicit: a valid file was refused after taking 1.1 GB (four bytes of
        // its text read as a length), and another sent with other content than its own (a
        // re-attack's finding). Such a file goes only to a peer taking it as it is.
        if undefined_un {
            return Err(meta_error(
                "the data set holds a UN element of undefined length, which cannot be re-encoded in Implicit VR: send it to a peer that takes Explicit VR".into(),
            ));
        }
        let explicit = dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN.erased();
        let implicit = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
        let object = InMemDicomObject::read_dataset_with_ts(dataset, &explicit)
            .map_err(|e| meta_error(format!("the data set cannot be read: {e}")))?;
        let mut out = Vec::with_capacity(dataset.len());
        object
            .write_dataset_with_ts(&mut out, &implicit)
            .map_err(|e| meta_error(format!("the data set cannot be re-encoded: {e}")))?;
        Ok(out)
    };
    tokio::task::spawn_blocking(encode)
        .await
        .map_err(|e| StoreFailure::Association(ScuError::Io(std::io::Error::other(e.to_string()))))?
        .map_err(StoreFailure::File)
}

/// Files sent over one association: its contexts, and the files (with their outcome index).
type Batch = (Vec<(String, String)>, Vec<(usize, Part10File)>);

/// The outcome of one file of [`store_files`].
#[derive(Debug)]
pub struct StoreOutcome {
    pub path: PathBuf,
    /// The SOP Instance UID from the file's meta, when it could be read.
    pub sop_instance_uid: Option<String>,
    pub result: Result<DimseStatus, StoreFailure>,
}

impl StoreOutcome {
    /// Stored: success or warning status.
    pub fn is_stored(&self) -> bool {
        matches!(&self.result, Ok(s) if s.is_success() || s.is_warning())
    }
}

/// Sends every file to `addr` over as few associations as the contexts allow (one unless
/// the files need more than [`MAX_CONTEXTS`] distinct contexts), in order, and returns one
/// outcome per file, in order. A file that cannot be read fails alone; when an association
/// fails, the file being sent gets its error and the files after it go on a new association;
/// when one cannot be opened, they are [`NotSent`].
///
/// [`NotSent`]: StoreFailure::NotSent
pub async fn store_files(
    addr: &str,
    options: &ScuOptions,
    paths: Vec<PathBuf>,
) -> Vec<StoreOutcome> {
    let mut outcomes: Vec<StoreOutcome> = Vec::with_capacity(paths.len());
    let mut files: Vec<(usize, Part10File)> = Vec::new();
    for path in paths {
        match Part10File::open(&path) {
            Ok(f) => {
                files.push((outcomes.len(), f));
                outcomes.push(StoreOutcome {
                    path,
                    sop_instance_uid: None,
                    result: Err(StoreFailure::NotSent),
                });
            }
            Err(e) => outcomes.push(StoreOutcome {
                path,
                sop_instance_uid: None,
                result: Err(e.into()),
            }),
        }
    }
    // Batches of files whose contexts fit one association, in file order.
    let mut batches: Vec<Batch> = Vec::new();
    for (i, f) in files {
        outcomes[i].sop_instance_uid = Some(f.sop_instance_uid.clone());
        let ctx = f.context();
        let fits = batches
            .last()
            .is_some_and(|(contexts, _)| contexts.contains(&ctx) || contexts.len() < MAX_CONTEXTS);
        if !fits {
            batches.push((Vec::new(), Vec::new()));
        }
        let (contexts, members) = batches.last_mut().expect("a batch");
        if !contexts.contains(&ctx) {
            contexts.push(ctx);
        }
        members.push((i, f));
    }
    // A batch whose association failed on one file goes on with the files after it on a new
    // association, as dcmtk's storescu goes on past a file its peer refused (one malformed
    // file that made the peer abort left every later file of the run unsent: a red-team
    // finding). An association that cannot be opened ends the run.
    let mut batches: std::collections::VecDeque<Batch> = batches.into();
    let mut broken = false;
    while let Some((contexts, members)) = batches.pop_front() {
        if broken {
            break;
        }
        let mut association = match StoreAssociation::open(addr, options, &contexts).await {
            Ok(a) => a,
            Err(ScuError::NoContextAccepted { .. }) => {
                // Every context of this batch was rejected: each file says which.
                for (i, f) in members {
                    outcomes[i].result = Err(StoreFailure::ContextRejected {
                        sop_class_uid: f.sop_class_uid,
                        transfer_syntax: f.transfer_syntax,
                    });
                }
                continue;
            }
            Err(e) => {
                if let Some((i, _)) = members.first() {
                    outcomes[*i].result = Err(e.into());
                }
                broken = true;
                continue;
            }
        };
        let unique: BTreeSet<&(String, String)> = contexts.iter().collect();
        tracing::debug!(
            contexts = unique.len(),
            files = members.len(),
            "association open"
        );
        let mut failed = false;
        let mut members = members.into_iter();
        for (i, f) in members.by_ref() {
            let result = association.store(&f).await;
            let fatal = matches!(result, Err(StoreFailure::Association(_)));
            outcomes[i].result = result;
            if fatal {
                failed = true;
                break;
            }
        }
        if failed {
            association.abort().await;
            let rest: Vec<(usize, Part10File)> = members.collect();
            if !rest.is_empty() {
                tracing::warn!(
                    files = rest.len(),
                    "the association failed on one file: the files after it go on a new association"
                );
                batches.push_front((contexts, rest));
            }
        } else if let Err(e) = association.release().await {
            tracing::warn!(error = %e, "association release failed");
        }
    }
    outcomes
}

fn put_u16(obj: &mut InMemDicomObject, tag: dicom_core::Tag, v: u16) {
    obj.put(DataElement::new(tag, VR::US, PrimitiveValue::from(v)));
}

fn put_ui(obj: &mut InMemDicomObject, tag: dicom_core::Tag, v: &str) {
    obj.put(DataElement::new(tag, VR::UI, PrimitiveValue::from(v)));
}

/// Encodes a command set in Implicit VR Little Endian with its group length first.
fn encode_command(mut obj: InMemDicomObject) -> Vec<u8> {
    let ts = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
    let encode = |obj: &InMemDicomObject| {
        let mut out = Vec::new();
        obj.write_dataset_with_ts(&mut out, &ts)
            .expect("command sets encode");
        out
    };
    let body = encode(&obj);
    obj.put(DataElement::new(
        tags::COMMAND_GROUP_LENGTH,
        VR::UL,
        PrimitiveValue::from(body.len() as u32),
    ));
    encode(&obj)
}

fn c_store_rq(message_id: u16, sop_class_uid: &str, sop_instance_uid: &str) -> Vec<u8> {
    let mut obj = InMemDicomObject::new_empty();
    put_ui(&mut obj, tags::AFFECTED_SOP_CLASS_UID, sop_class_uid);
    put_u16(&mut obj, tags::COMMAND_FIELD, C_STORE_RQ);
    put_u16(&mut obj, tags::MESSAGE_ID, message_id);
    put_u16(&mut obj, tags::PRIORITY, 0x0000);
    put_u16(&mut obj, tags::COMMAND_DATA_SET_TYPE, 0x0000);
    put_ui(&mut obj, tags::AFFECTED_SOP_INSTANCE_UID, sop_instance_uid);
    encode_command(obj)
}

fn c_echo_rq(message_id: u16) -> Vec<u8> {
    let mut obj = InMemDicomObject::new_empty();
    put_ui(&mut obj, tags::AFFECTED_SOP_CLASS_UID, sop::VERIFICATION);
    put_u16(&mut obj, tags::COMMAND_FIELD, C_ECHO_RQ);
    put_u16(&mut obj, tags::MESSAGE_ID, message_id);
    put_u16(&mut obj, tags::COMMAND_DATA_SET_TYPE, 0x0101);
    encode_command(obj)
}

fn parse_response(
    bytes: &[u8],
    expected_field: u16,
    message_id: u16,
    sop_instance_uid: Option<&str>,
) -> Result<DimseStatus, ScuError> {
    let ts = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
    let obj =
        InMemDicomObject::read_dataset_with_ts(bytes, &ts).map_err(|_| ScuError::Protocol {
            what: "unreadable response command set",
        })?;
    let u16_of = |tag| {
        obj.element_opt(tag)
            .ok()
            .flatten()
            .and_then(|e| e.to_int::<u16>().ok())
    };
    if u16_of(tags::COMMAND_FIELD) != Some(expected_field) {
        return Err(ScuError::Protocol {
            what: "response of another kind than the request",
        });
    }
    if u16_of(tags::MESSAGE_ID_BEING_RESPONDED_TO) != Some(message_id) {
        return Err(ScuError::Protocol {
            what: "response to another message",
        });
    }
    // Affected SOP Instance UID is U(=) in a C-STORE-RSP (PS3.7 Table 9.3-2): when the
    // response has one, it is the request's (a red-team finding: a response naming another
    // instance was taken as this one stored).
    if let Some(expected) = sop_instance_uid
        && let Some(got) = obj
            .element_opt(tags::AFFECTED_SOP_INSTANCE_UID)
            .ok()
            .flatten()
            .and_then(|e| {
                e.to_str()
                    .ok()
                    .map(|v| v.trim_end_matches(['\0', ' ']).to_owned())
            })
        && !got.is_empty()
        && got != expected.trim_end_matches(['\0', ' '])
    {
        return Err(ScuError::Protocol {
            what: "response about another instance",
        });
    }
    let status = u16_of(tags::STATUS).ok_or(ScuError::Protocol {
        what: "response without a status",
    })?;
    let error_comment = obj
        .element_opt(tags::ERROR_COMMENT)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok().map(|s| s.trim().to_owned()))
        .filter(|s| !s.is_empty());
    Ok(DimseStatus {
        status,
        error_comment,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_links_are_not_followed_and_fifos_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a.dcm"), b"x").unwrap();
        std::os::unix::fs::symlink("..", root.join("sub/up")).unwrap();
        std::os::unix::fs::symlink("a.dcm", root.join("sub/b.dcm")).unwrap();
        let fifo = root.join("fifo.dcm");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let found: Vec<_> = collect_files(&[root.to_owned()])
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(found, vec![root.join("sub/a.dcm"), root.join("sub/b.dcm")]);
        let named = collect_files(&[fifo]);
        assert!(matches!(named[..], [Err(FileError::Io { .. })]));
    }

    #[test]
    fn commands_carry_their_group_length() {
        let bytes = c_store_rq(7, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4");
        let ts = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
        let obj = InMemDicomObject::read_dataset_with_ts(bytes.as_slice(), &ts).unwrap();
        let len = obj
            .element(tags::COMMAND_GROUP_LENGTH)
            .unwrap()
            .to_int::<u32>()
            .unwrap();
        assert_eq!(len as usize, bytes.len() - 12);
        assert_eq!(
            obj.element(tags::MESSAGE_ID)
                .unwrap()
                .to_int::<u16>()
                .unwrap(),
            7
        );
    }

    #[test]
    fn a_file_without_preamble_is_not_part10() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.dcm");
        std::fs::write(&path, vec![0u8; 400]).unwrap();
        assert!(matches!(
            Part10File::open(&path),
            Err(FileError::NotPart10 { .. })
        ));
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(
            Part10File::open(&path),
            Err(FileError::NotPart10 { .. })
        ));
    }
}
