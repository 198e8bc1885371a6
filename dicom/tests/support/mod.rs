//! Shared by the SCP tests: a running SCP on a temporary spool, small data sets and
//! DIMSE messages written by dicom-object, and dicom-ul's client to send them.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_ul::ClientAssociationOptions;
use dicom_ul::association::client::ClientAssociation;
use dicom_ul::pdu::{
    AssociationRQ, PDataValue, PDataValueType, Pdu, PresentationContextProposed,
    PresentationContextResultReason, UserVariableItem,
};
use nightingale_dicom::{Scp, ScpConfig, Spool, SpoolOptions};

pub const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
pub const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
pub const MPEG2: &str = "1.2.840.10008.1.2.4.100";
pub const TIMEOUT: Duration = Duration::from_secs(20);

pub struct Running {
    pub addr: SocketAddr,
    pub spool: Arc<Spool>,
    pub _dir: tempfile::TempDir,
}

/// A spool in a new temporary folder, without a high-water mark.
pub fn temp_spool() -> (Arc<Spool>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(
        dir.path(),
        SpoolOptions {
            min_free_bytes: 0,
            ..Default::default()
        },
    )
    .unwrap();
    (Arc::new(spool), dir)
}

pub async fn start(configure: impl FnOnce(&mut ScpConfig)) -> Running {
    let (spool, dir) = temp_spool();
    let mut config = ScpConfig::new("127.0.0.1:0".parse().unwrap());
    configure(&mut config);
    let scp = Scp::bind(config, spool.clone()).await.unwrap();
    let addr = scp.local_addr().unwrap();
    tokio::spawn(scp.serve(std::future::pending()));
    Running {
        addr,
        spool,
        _dir: dir,
    }
}

pub fn ct(sop: &str) -> Vec<u8> {
    ct_with(Some(sop))
}

/// A small CT data set; `None` leaves the SOP Instance UID out.
pub fn ct_with(sop: Option<&str>) -> Vec<u8> {
    explicit_le(&ct_object(
        "1.2.3.100",
        "1.2.3.100.1",
        sop,
        Some(vec![1, 0, 2, 0]),
    ))
}

/// A CT object (shared by every test of this crate); `None` leaves the SOP Instance UID, or
/// the image attributes and pixel data, out. One row of `pixels.len() / 2` 16-bit pixels.
pub fn ct_object(
    study: &str,
    series: &str,
    sop: Option<&str>,
    pixels: Option<Vec<u8>>,
) -> InMemDicomObject {
    let mut obj = InMemDicomObject::new_empty();
    let ui = |v: &str| PrimitiveValue::from(v);
    obj.put(DataElement::new(tags::SOP_CLASS_UID, VR::UI, ui(CT)));
    if let Some(sop) = sop {
        obj.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, ui(sop)));
    }
    obj.put(DataElement::new(
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        ui(study),
    ));
    obj.put(DataElement::new(
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        ui(series),
    ));
    obj.put(DataElement::new(tags::MODALITY, VR::CS, ui("CT")));
    if let Some(pixels) = pixels {
        obj.put(DataElement::new(
            tags::ROWS,
            VR::US,
            PrimitiveValue::from(1u16),
        ));
        obj.put(DataElement::new(
            tags::COLUMNS,
            VR::US,
            PrimitiveValue::from((pixels.len() / 2) as u16),
        ));
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::U8(pixels.into()),
        ));
    }
    obj
}

/// The data set in Explicit VR Little Endian.
pub fn explicit_le(obj: &InMemDicomObject) -> Vec<u8> {
    let ts = dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN.erased();
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &ts).unwrap();
    out
}

/// A C-STORE-RQ command set in Implicit VR Little Endian, written by dicom-object.
pub fn c_store_rq(message_id: u16, sop: &str) -> Vec<u8> {
    command_set(0x0001, message_id, CT, Some(sop), 0x0000)
}

/// A C-CANCEL-RQ as PS3.7 9.3.2.3 has it: the Message ID Being Responded To, no Message ID
/// and no SOP class (Implicit VR Little Endian, group length first).
pub fn c_cancel_rq(responding_to: u16) -> Vec<u8> {
    command_of(|obj| {
        obj.put(DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            PrimitiveValue::from(0x0FFFu16),
        ));
        obj.put(DataElement::new(
            tags::MESSAGE_ID_BEING_RESPONDED_TO,
            VR::US,
            PrimitiveValue::from(responding_to),
        ));
        obj.put(DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            PrimitiveValue::from(0x0101u16),
        ));
    })
}

/// A DIMSE request command set (Implicit VR Little Endian, group length first).
pub fn command_set(
    field: u16,
    message_id: u16,
    sop_class: &str,
    sop_instance: Option<&str>,
    data_set_type: u16,
) -> Vec<u8> {
    let us = |v: u16| PrimitiveValue::from(v);
    command_of(|obj| {
        obj.put(DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(sop_class),
        ));
        obj.put(DataElement::new(tags::COMMAND_FIELD, VR::US, us(field)));
        obj.put(DataElement::new(tags::MESSAGE_ID, VR::US, us(message_id)));
        if field == 0x0001 {
            obj.put(DataElement::new(tags::PRIORITY, VR::US, us(0)));
        }
        obj.put(DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            us(data_set_type),
        ));
        if let Some(sop) = sop_instance {
            obj.put(DataElement::new(
                tags::AFFECTED_SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from(sop),
            ));
        }
    })
}

/// A command set of the elements `put` adds, in Implicit VR Little Endian with its group
/// length first.
pub fn command_of(put: impl Fn(&mut InMemDicomObject)) -> Vec<u8> {
    let ts = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
    let build = |group_length: u32| {
        let mut obj = InMemDicomObject::new_empty();
        obj.put(DataElement::new(
            tags::COMMAND_GROUP_LENGTH,
            VR::UL,
            PrimitiveValue::from(group_length),
        ));
        put(&mut obj);
        let mut out = Vec::new();
        obj.write_dataset_with_ts(&mut out, &ts).unwrap();
        out
    };
    let first = build(0);
    build(first.len() as u32 - 12)
}

pub fn pdata(pc: u8, value_type: PDataValueType, is_last: bool, data: Vec<u8>) -> Pdu {
    Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: pc,
            value_type,
            is_last,
            data,
        }],
    }
}

pub fn connect(
    addr: SocketAddr,
    contexts: &[(&str, &str)],
) -> Result<ClientAssociation<std::net::TcpStream>, dicom_ul::association::Error> {
    let mut options = ClientAssociationOptions::new()
        .calling_ae_title("RUSTSCU")
        .called_ae_title("NIGHTINGALE")
        .read_timeout(TIMEOUT)
        .write_timeout(TIMEOUT);
    for (abstract_syntax, ts) in contexts {
        options = options.with_presentation_context(*abstract_syntax, vec![*ts]);
    }
    options.establish(addr)
}

/// Sends one C-STORE (the data set in `fragments`) and returns the response status.
pub fn store(
    assoc: &mut ClientAssociation<std::net::TcpStream>,
    pc: u8,
    message_id: u16,
    sop: &str,
    data: Vec<u8>,
) -> u16 {
    assoc
        .send(&pdata(
            pc,
            PDataValueType::Command,
            true,
            c_store_rq(message_id, sop),
        ))
        .unwrap();
    assoc
        .send(&pdata(pc, PDataValueType::Data, true, data))
        .unwrap();
    status_of(assoc.receive().unwrap())
}

/// Status and Affected SOP Instance UID of a DIMSE response.
pub fn response_of(pdu: &Pdu) -> (u16, Option<String>) {
    let Pdu::PData { data } = pdu else {
        panic!("expected P-DATA, got {pdu:?}");
    };
    let ts = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
    let obj = InMemDicomObject::read_dataset_with_ts(data[0].data.as_slice(), &ts).unwrap();
    let status = obj.element(tags::STATUS).unwrap().to_int::<u16>().unwrap();
    let uid = obj
        .element(tags::AFFECTED_SOP_INSTANCE_UID)
        .ok()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches('\0').to_string());
    (status, uid)
}

pub fn status_of(pdu: Pdu) -> u16 {
    let Pdu::PData { data } = pdu else {
        panic!("expected P-DATA, got {pdu:?}");
    };
    let ts = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
    let obj = InMemDicomObject::read_dataset_with_ts(data[0].data.as_slice(), &ts).unwrap();
    obj.element(tags::STATUS).unwrap().to_int::<u16>().unwrap()
}

pub fn accepted_pc(assoc: &ClientAssociation<std::net::TcpStream>) -> u8 {
    assoc
        .presentation_contexts()
        .iter()
        .find(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .expect("an accepted context")
        .id
}

/// An A-ASSOCIATE-RQ proposing `contexts` (one transfer syntax each), as dicom-ul writes it.
pub fn associate_rq(contexts: &[(&str, &str)]) -> AssociationRQ {
    AssociationRQ {
        protocol_version: 1,
        calling_ae_title: "RUSTSCU".into(),
        called_ae_title: "NIGHTINGALE".into(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: contexts
            .iter()
            .enumerate()
            .map(|(i, (abstract_syntax, ts))| PresentationContextProposed {
                id: (2 * i + 1) as u8,
                abstract_syntax: abstract_syntax.to_string(),
                transfer_syntaxes: vec![ts.to_string()],
            })
            .collect(),
        user_variables: vec![UserVariableItem::MaxLength(16_384)],
    }
}

/// The bytes of one PDU.
pub fn pdu_bytes(pdu: &Pdu) -> Vec<u8> {
    let mut bytes = Vec::new();
    dicom_ul::write_pdu(&mut bytes, pdu).unwrap();
    bytes
}

/// What came back on a raw socket.
#[derive(Debug)]
pub enum Answer {
    Pdu(Pdu),
    /// The server closed (or reset) the connection without a PDU.
    Closed,
}

/// Writes `bytes` on a fresh connection (then half-closes it when `finish`), and reads one
/// PDU back, bounded by [`TIMEOUT`]. A write the server refused by closing is not an error:
/// the answer is what matters.
pub fn exchange(addr: SocketAddr, bytes: &[u8], finish: bool) -> Answer {
    use std::io::Write;
    let mut socket = std::net::TcpStream::connect(addr).unwrap();
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    socket.set_write_timeout(Some(TIMEOUT)).unwrap();
    if socket.write_all(bytes).is_err() {
        return Answer::Closed;
    }
    if finish {
        let _ = socket.shutdown(std::net::Shutdown::Write);
    }
    read_answer(&mut socket)
}

/// Reads one PDU from a raw socket (bounded by the socket's read timeout), or notes that the
/// server closed it.
pub fn read_answer(socket: &mut std::net::TcpStream) -> Answer {
    use std::io::Read;
    let mut header = [0u8; 6];
    match socket.read_exact(&mut header) {
        Ok(()) => {}
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            panic!("no answer and no close within the read timeout")
        }
        Err(_) => return Answer::Closed,
    }
    let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
    assert!(len <= 1 << 20, "the server sent a PDU of {len} bytes");
    let mut pdu = header.to_vec();
    pdu.resize(6 + len, 0);
    socket
        .read_exact(&mut pdu[6..])
        .expect("the server's PDU is complete");
    Answer::Pdu(
        dicom_ul::read_pdu(pdu.as_slice(), 1 << 20, true)
            .expect("the server's PDU parses")
            .expect("the server's PDU is complete"),
    )
}

/// Sends an A-ASSOCIATE-RQ (written by dicom-ul) on a raw socket and reads the answer:
/// dicom-ul's client lists only accepted contexts, this test needs the rejected ones too.
pub fn raw_associate(addr: SocketAddr, contexts: &[(&str, &str)]) -> Pdu {
    match exchange(
        addr,
        &pdu_bytes(&Pdu::AssociationRQ(associate_rq(contexts))),
        false,
    ) {
        Answer::Pdu(pdu) => pdu,
        Answer::Closed => panic!("the server closed without answering"),
    }
}

/// The association's next PDU is an A-ABORT (`after`, for the message: " after …" or "").
pub fn expect_abort(assoc: &mut ClientAssociation<std::net::TcpStream>, after: &str) {
    match assoc.receive() {
        Ok(Pdu::AbortRQ { .. }) => {}
        other => panic!("expected A-ABORT{after}, got {other:?}"),
    }
}

/// A C-ECHO over a new association: the server is still serving.
pub fn echo(addr: SocketAddr) {
    const VERIFICATION: &str = "1.2.840.10008.1.1";
    let mut assoc = connect(addr, &[(VERIFICATION, EXPLICIT_LE)]).expect("an association");
    let pc = accepted_pc(&assoc);
    let command = command_set(0x0030, 7, VERIFICATION, None, 0x0101);
    assoc
        .send(&pdata(pc, PDataValueType::Command, true, command))
        .unwrap();
    assert_eq!(status_of(assoc.receive().unwrap()), 0x0000, "C-ECHO status");
    assoc.release().unwrap();
}
