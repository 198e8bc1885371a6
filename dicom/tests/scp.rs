//! The SCP driven by dicom-ul's own client (a second implementation of the upper layer):
//! presentation contexts rejected per context with the right reason, a data set cut inside
//! an element header, an A-ABORT in the middle of an object, the association cap, and the
//! idle timeout. Every wait is bounded by the client's read timeout.
//!
//! The dcmtk peers (echoscu, storescu) are in tests/peer/test_dicom_scp.py.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_ul::ClientAssociationOptions;
use dicom_ul::association::client::ClientAssociation;
use dicom_ul::pdu::{
    AssociationRJResult, AssociationRJServiceProviderPresentationReason, AssociationRJSource,
    AssociationRQ, PDataValue, PDataValueType, Pdu, PresentationContextProposed,
    PresentationContextResultReason, UserVariableItem,
};
use nightingale_dicom::{Scp, ScpConfig, Spool, SpoolOptions};

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const MPEG2: &str = "1.2.840.10008.1.2.4.100";
const TIMEOUT: Duration = Duration::from_secs(20);

struct Running {
    addr: SocketAddr,
    spool: Arc<Spool>,
    _dir: tempfile::TempDir,
}

async fn start(configure: impl FnOnce(&mut ScpConfig)) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), SpoolOptions { min_free_bytes: 0 }).unwrap();
    let spool = Arc::new(spool);
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

fn ct(sop: &str) -> Vec<u8> {
    ct_with(Some(sop))
}

/// A small CT data set; `None` leaves the SOP Instance UID out.
fn ct_with(sop: Option<&str>) -> Vec<u8> {
    let mut obj = InMemDicomObject::new_empty();
    let ui = |v: &str| PrimitiveValue::from(v);
    obj.put(DataElement::new(tags::SOP_CLASS_UID, VR::UI, ui(CT)));
    if let Some(sop) = sop {
        obj.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, ui(sop)));
    }
    obj.put(DataElement::new(
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        ui("1.2.3.100"),
    ));
    obj.put(DataElement::new(
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        ui("1.2.3.100.1"),
    ));
    obj.put(DataElement::new(
        tags::ROWS,
        VR::US,
        PrimitiveValue::from(1u16),
    ));
    obj.put(DataElement::new(
        tags::COLUMNS,
        VR::US,
        PrimitiveValue::from(2u16),
    ));
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::U8(vec![1, 0, 2, 0].into()),
    ));
    let ts = dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN.erased();
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, &ts).unwrap();
    out
}

/// A C-STORE-RQ command set in Implicit VR Little Endian, written by dicom-object.
fn c_store_rq(message_id: u16, sop: &str) -> Vec<u8> {
    let ts = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
    let build = |group_length: u32| {
        let mut obj = InMemDicomObject::new_empty();
        obj.put(DataElement::new(
            tags::COMMAND_GROUP_LENGTH,
            VR::UL,
            PrimitiveValue::from(group_length),
        ));
        obj.put(DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(CT),
        ));
        obj.put(DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            PrimitiveValue::from(0x0001u16),
        ));
        obj.put(DataElement::new(
            tags::MESSAGE_ID,
            VR::US,
            PrimitiveValue::from(message_id),
        ));
        obj.put(DataElement::new(
            tags::PRIORITY,
            VR::US,
            PrimitiveValue::from(0u16),
        ));
        obj.put(DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            PrimitiveValue::from(0x0000u16),
        ));
        obj.put(DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(sop),
        ));
        let mut out = Vec::new();
        obj.write_dataset_with_ts(&mut out, &ts).unwrap();
        out
    };
    let first = build(0);
    build(first.len() as u32 - 12)
}

fn pdata(pc: u8, value_type: PDataValueType, is_last: bool, data: Vec<u8>) -> Pdu {
    Pdu::PData {
        data: vec![PDataValue {
            presentation_context_id: pc,
            value_type,
            is_last,
            data,
        }],
    }
}

fn connect(
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
fn store(
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

fn status_of(pdu: Pdu) -> u16 {
    let Pdu::PData { data } = pdu else {
        panic!("expected P-DATA, got {pdu:?}");
    };
    let ts = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
    let obj = InMemDicomObject::read_dataset_with_ts(data[0].data.as_slice(), &ts).unwrap();
    obj.element(tags::STATUS).unwrap().to_int::<u16>().unwrap()
}

fn accepted_pc(assoc: &ClientAssociation<std::net::TcpStream>) -> u8 {
    assoc
        .presentation_contexts()
        .iter()
        .find(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .expect("an accepted context")
        .id
}

/// Sends an A-ASSOCIATE-RQ (written by dicom-ul) on a raw socket and reads the answer:
/// dicom-ul's client lists only accepted contexts, this test needs the rejected ones too.
fn raw_associate(addr: SocketAddr, contexts: &[(&str, &str)]) -> Pdu {
    use std::io::{Read, Write};
    let rq = Pdu::AssociationRQ(AssociationRQ {
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
    });
    let mut socket = std::net::TcpStream::connect(addr).unwrap();
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut bytes = Vec::new();
    dicom_ul::write_pdu(&mut bytes, &rq).unwrap();
    socket.write_all(&bytes).unwrap();
    let mut header = [0u8; 6];
    socket.read_exact(&mut header).unwrap();
    let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
    let mut pdu = header.to_vec();
    pdu.resize(6 + len, 0);
    socket.read_exact(&mut pdu[6..]).unwrap();
    dicom_ul::read_pdu(pdu.as_slice(), 1 << 20, true)
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contexts_are_negotiated_one_by_one() {
    let server = start(|_| {}).await;
    let addr = server.addr;
    let ac = tokio::task::spawn_blocking(move || {
        raw_associate(
            addr,
            &[
                (CT, EXPLICIT_LE),
                ("1.2.3.4.5.6.999", EXPLICIT_LE),
                (CT, MPEG2),
            ],
        )
    })
    .await
    .unwrap();
    let Pdu::AssociationAC(ac) = ac else {
        panic!("expected A-ASSOCIATE-AC, got {ac:?}");
    };
    let reasons: Vec<_> = ac
        .presentation_contexts
        .iter()
        .map(|pc| (pc.id, pc.reason.clone()))
        .collect();
    assert_eq!(
        reasons,
        [
            (1, PresentationContextResultReason::Acceptance),
            (
                3,
                PresentationContextResultReason::AbstractSyntaxNotSupported
            ),
            (
                5,
                PresentationContextResultReason::TransferSyntaxesNotSupported
            ),
        ]
    );
    assert_eq!(
        ac.presentation_contexts[0]
            .transfer_syntax
            .trim_end_matches('\0'),
        EXPLICIT_LE
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_data_sets_fail_with_their_status_and_the_association_goes_on() {
    let server = start(|_| {}).await;
    let addr = server.addr;
    let statuses = tokio::task::spawn_blocking(move || {
        let mut assoc = connect(addr, &[(CT, EXPLICIT_LE)]).unwrap();
        let pc = accepted_pc(&assoc);
        let good = ct("1.2.3.100.1.1");
        // Cut two bytes into the Pixel Data element's header.
        let header = good
            .windows(4)
            .position(|w| w == [0xe0, 0x7f, 0x10, 0x00])
            .unwrap();
        let cut = good[..header + 2].to_vec();
        let a = store(&mut assoc, pc, 1, "1.2.3.100.1.2", cut);
        // No SOP Instance UID in the data set (the command names one).
        let b = store(&mut assoc, pc, 2, "1.2.3.100.1.3", ct_with(None));
        let c = store(&mut assoc, pc, 3, "1.2.3.100.1.1", good);
        assoc.release().unwrap();
        (a, b, c)
    })
    .await
    .unwrap();
    assert_eq!(statuses, (0xC000, 0xA900, 0x0000));
    let uids: Vec<_> = server
        .spool
        .instances()
        .unwrap()
        .into_iter()
        .map(|s| s.sop_instance_uid)
        .collect();
    assert_eq!(uids, ["1.2.3.100.1.1"]);
    // Two refused objects, each with its .reason file.
    assert_eq!(
        std::fs::read_dir(server.spool.quarantine_dir())
            .unwrap()
            .count(),
        4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_in_the_middle_of_an_object_stores_nothing() {
    let server = start(|_| {}).await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        let mut assoc = connect(addr, &[(CT, EXPLICIT_LE)]).unwrap();
        let pc = accepted_pc(&assoc);
        let data = ct("1.2.3.100.2.1");
        assoc
            .send(&pdata(
                pc,
                PDataValueType::Command,
                true,
                c_store_rq(1, "1.2.3.100.2.1"),
            ))
            .unwrap();
        assoc
            .send(&pdata(
                pc,
                PDataValueType::Data,
                false,
                data[..data.len() / 2].to_vec(),
            ))
            .unwrap();
        assoc.abort().unwrap();
        // The server goes on: a new association stores.
        let mut assoc = connect(addr, &[(CT, EXPLICIT_LE)]).unwrap();
        let pc = accepted_pc(&assoc);
        assert_eq!(
            store(&mut assoc, pc, 1, "1.2.3.100.2.2", ct("1.2.3.100.2.2")),
            0x0000
        );
        assoc.release().unwrap();
    })
    .await
    .unwrap();
    let uids: Vec<_> = server
        .spool
        .instances()
        .unwrap()
        .into_iter()
        .map(|s| s.sop_instance_uid)
        .collect();
    assert_eq!(uids, ["1.2.3.100.2.2"]);
    assert_eq!(
        std::fs::read_dir(server.spool.quarantine_dir())
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(server.spool.root().join("tmp"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_association_cap_a_request_is_rejected_transiently() {
    let server = start(|c| c.max_associations = 1).await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        let first = connect(addr, &[(CT, EXPLICIT_LE)]).unwrap();
        match connect(addr, &[(CT, EXPLICIT_LE)]) {
            Err(dicom_ul::association::Error::Rejected { association_rj, .. }) => {
                assert_eq!(association_rj.result, AssociationRJResult::Transient);
                assert_eq!(
                    association_rj.source,
                    AssociationRJSource::ServiceProviderPresentation(
                        AssociationRJServiceProviderPresentationReason::LocalLimitExceeded
                    )
                );
            }
            Err(e) => panic!("expected A-ASSOCIATE-RJ, got {e}"),
            Ok(_) => panic!("a second association was accepted beyond the cap"),
        }
        first.release().unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_association_is_aborted_after_the_idle_timeout() {
    let server = start(|c| c.idle_timeout = Duration::from_millis(300)).await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        let mut assoc = connect(addr, &[(CT, EXPLICIT_LE)]).unwrap();
        // Say nothing: the next thing the server sends is its A-ABORT (well within the
        // client's own read timeout).
        match assoc.receive() {
            Ok(Pdu::AbortRQ { .. }) => {}
            other => panic!("expected A-ABORT, got {other:?}"),
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pdu_larger_than_negotiated_aborts_the_association_and_the_server_goes_on() {
    let server = start(|c| c.max_pdu_length = 16_384).await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut assoc = connect(addr, &[(CT, EXPLICIT_LE)]).unwrap();
        assert_eq!(assoc.acceptor_max_pdu_length(), 16_384);
        let pc = accepted_pc(&assoc);
        // A P-DATA-TF of 64 KiB written straight to the socket (the client would refuse).
        let mut bytes = Vec::new();
        dicom_ul::write_pdu(
            &mut bytes,
            &pdata(pc, PDataValueType::Data, false, vec![0u8; 65_536]),
        )
        .unwrap();
        assoc.inner_stream().write_all(&bytes).unwrap();
        match assoc.receive() {
            Ok(Pdu::AbortRQ { .. }) => {}
            other => panic!("expected A-ABORT, got {other:?}"),
        }
        let mut assoc = connect(addr, &[(CT, EXPLICIT_LE)]).unwrap();
        let pc = accepted_pc(&assoc);
        assert_eq!(
            store(&mut assoc, pc, 1, "1.2.3.100.3.1", ct("1.2.3.100.3.1")),
            0x0000
        );
        assoc.release().unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_in_another_transfer_syntax_than_negotiated_is_refused() {
    const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
    let server = start(|_| {}).await;
    let addr = server.addr;
    let status = tokio::task::spawn_blocking(move || {
        let mut assoc = connect(addr, &[(CT, IMPLICIT_LE)]).unwrap();
        let pc = accepted_pc(&assoc);
        // Explicit VR Little Endian bytes on an Implicit VR Little Endian context.
        let status = store(&mut assoc, pc, 1, "1.2.3.100.4.1", ct("1.2.3.100.4.1"));
        assoc.release().unwrap();
        status
    })
    .await
    .unwrap();
    assert_eq!(status, 0xC000);
    assert!(server.spool.instances().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_set_over_the_size_limit_is_out_of_resources_and_the_next_one_stores() {
    let server = start(|c| {
        c.max_instance_bytes = 1_000;
        c.max_inflight_bytes = 1_000;
    })
    .await;
    let addr = server.addr;
    let statuses = tokio::task::spawn_blocking(move || {
        let mut assoc = connect(addr, &[(CT, EXPLICIT_LE)]).unwrap();
        let pc = accepted_pc(&assoc);
        let small = ct("1.2.3.100.5.2");
        assert!(small.len() < 1_000);
        // The same data set with 2,000 bytes of padding after it: over the limit, sent in
        // two fragments.
        let mut big = ct("1.2.3.100.5.1");
        big.extend_from_slice(&[0xFC, 0xFF, 0xFC, 0xFF, b'O', b'B', 0, 0]);
        big.extend_from_slice(&2_000u32.to_le_bytes());
        big.extend_from_slice(&[0u8; 2_000]);
        assoc
            .send(&pdata(
                pc,
                PDataValueType::Command,
                true,
                c_store_rq(1, "1.2.3.100.5.1"),
            ))
            .unwrap();
        assoc
            .send(&pdata(pc, PDataValueType::Data, false, big[..800].to_vec()))
            .unwrap();
        assoc
            .send(&pdata(pc, PDataValueType::Data, true, big[800..].to_vec()))
            .unwrap();
        let a = status_of(assoc.receive().unwrap());
        let b = store(&mut assoc, pc, 2, "1.2.3.100.5.2", small);
        assoc.release().unwrap();
        (a, b)
    })
    .await
    .unwrap();
    assert_eq!(statuses, (0xA700, 0x0000));
    let uids: Vec<_> = server
        .spool
        .instances()
        .unwrap()
        .into_iter()
        .map(|s| s.sop_instance_uid)
        .collect();
    assert_eq!(uids, ["1.2.3.100.5.2"]);
}
