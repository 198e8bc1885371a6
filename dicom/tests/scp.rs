//! The SCP driven by dicom-ul's own client (a second implementation of the upper layer):
//! presentation contexts rejected per context with the right reason, a data set cut inside
//! an element header, an A-ABORT in the middle of an object, the association cap, and the
//! idle timeout. Every wait is bounded by the client's read timeout.
//!
//! The dcmtk peers (echoscu, storescu) are in tests/peer/test_dicom_scp.py.

mod support;

use std::time::Duration;

use dicom_ul::pdu::{
    AssociationRJResult, AssociationRJServiceProviderPresentationReason,
    AssociationRJServiceUserReason, AssociationRJSource, PDataValueType, Pdu,
    PresentationContextResultReason,
};
use support::*;

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

/// A context proposing several transfer syntaxes is accepted with the one this node prefers
/// (uncompressed first), whatever the requestor's order: a modality that lists JPEG-LS
/// first (stored, but not decoded by the pipeline) sends Explicit VR Little Endian instead.
/// The instance then stores in the syntax negotiated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preferred_transfer_syntax_is_taken_whatever_the_proposed_order() {
    const JPEG_LS: &str = "1.2.840.10008.1.2.4.80";
    const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
    const JPEG_LOSSLESS: &str = "1.2.840.10008.1.2.4.70";
    let server = start(|_| {}).await;
    let addr = server.addr;
    let (chosen, status) = tokio::task::spawn_blocking(move || {
        let mut assoc = dicom_ul::ClientAssociationOptions::new()
            .calling_ae_title("RUSTSCU")
            .called_ae_title("NIGHTINGALE")
            .read_timeout(TIMEOUT)
            .write_timeout(TIMEOUT)
            .with_presentation_context(CT, vec![JPEG_LS, JPEG_BASELINE, EXPLICIT_LE])
            .with_presentation_context(CT, vec![JPEG_LS, JPEG_BASELINE, JPEG_LOSSLESS])
            .with_presentation_context(CT, vec![JPEG_LS])
            .establish(addr)
            .unwrap();
        let chosen: Vec<String> = assoc
            .presentation_contexts()
            .iter()
            .map(|pc| pc.transfer_syntax.trim_end_matches('\0').to_owned())
            .collect();
        let pc = assoc.presentation_contexts()[0].id;
        let status = store(&mut assoc, pc, 1, "1.2.3.100.7.1", ct("1.2.3.100.7.1"));
        assoc.release().unwrap();
        (chosen, status)
    })
    .await
    .unwrap();
    assert_eq!(chosen, [EXPLICIT_LE, JPEG_LOSSLESS, JPEG_LS]);
    assert_eq!(status, 0x0000);
    let stored = server.spool.instances().unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].transfer_syntax, EXPLICIT_LE);
}

/// A request none of whose presentation contexts this node can take (none at all, or only
/// unknown SOP classes and unsupported transfer syntaxes) is an association that can do
/// nothing: A-ASSOCIATE-RJ, rejected-permanent, service user, no reason given (it used to be
/// accepted and held until the idle timeout; dcmtk's storescp answers an A-ASSOCIATE-AC
/// refusing every context, which PS3.8 allows too). One acceptable context among them is
/// enough for an association.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_no_acceptable_context_is_rejected() {
    let server = start(|_| {}).await;
    let addr = server.addr;
    let none: &[(&str, &str)] = &[];
    let unusable: &[(&str, &str)] = &[("1.2.3.4.5.6.999", EXPLICIT_LE), (CT, MPEG2)];
    for contexts in [none, unusable] {
        let answer = tokio::task::spawn_blocking(move || raw_associate(addr, contexts))
            .await
            .unwrap();
        let Pdu::AssociationRJ(rj) = answer else {
            panic!("{contexts:?}: expected A-ASSOCIATE-RJ, got {answer:?}");
        };
        assert_eq!(rj.result, AssociationRJResult::Permanent, "{contexts:?}");
        assert_eq!(
            rj.source,
            AssociationRJSource::ServiceUser(AssociationRJServiceUserReason::NoReasonGiven),
            "{contexts:?}"
        );
    }
    let answer = tokio::task::spawn_blocking(move || {
        raw_associate(addr, &[("1.2.3.4.5.6.999", EXPLICIT_LE), (CT, EXPLICIT_LE)])
    })
    .await
    .unwrap();
    assert!(matches!(answer, Pdu::AssociationAC(_)), "{answer:?}");
    echo(addr);
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
    // The aborted data set was being written to a temporary file: its task deletes it when
    // it reads the abort (bounded wait: the abort may be read after the second store).
    let tmp = server.spool.root().join("tmp");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_dir(&tmp).unwrap().count() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "temporary file of the aborted object left behind"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
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

/// A C-ECHO on a context accepted for another SOP class (CT Image Storage) is refused, SOP
/// class not supported, not answered with success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_c_echo_on_a_storage_context_is_refused() {
    let server = start(|_| {}).await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        const VERIFICATION: &str = "1.2.840.10008.1.1";
        let mut assoc = connect(addr, &[(CT, EXPLICIT_LE)]).unwrap();
        let pc = accepted_pc(&assoc);
        let command = command_set(0x0030, 7, VERIFICATION, None, 0x0101);
        assoc
            .send(&pdata(pc, PDataValueType::Command, true, command))
            .unwrap();
        assert_eq!(status_of(assoc.receive().unwrap()), 0x0122);
        assoc.release().unwrap();
        echo(addr);
    })
    .await
    .unwrap();
}

/// A new connection from this host is closed at once (its waiting places are taken): a read
/// sees the end (or a reset), not the 10 s timeout.
fn assert_closed_at_once(addr: std::net::SocketAddr) {
    use std::io::Read;
    let mut one_more = std::net::TcpStream::connect(addr).unwrap();
    one_more
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 1];
    let read = one_more.read(&mut buf);
    assert!(
        matches!(&read, Ok(0))
            || matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "a connection beyond the host's waiting places was kept: {read:?}"
    );
}

/// Connections that never send their A-ASSOCIATE-RQ hold no association slot: with one
/// slot and several silent connections open, a real SCU is still served; beyond
/// `MAX_WAITING_PER_HOST` waiting connections from one host, new ones are closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_do_not_take_association_slots() {
    let server = start(|c| c.max_associations = 1).await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        // One association slot, and more silent connections than that: a real SCU is served
        // (the accept loop takes connections in order, so these are waiting before it comes).
        let per_host = nightingale_dicom::scp::MAX_WAITING_PER_HOST;
        let mut silent: Vec<_> = (0..per_host - 1)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        echo(addr);
        // The host's last waiting place taken, the next connection is closed at once: read
        // sees the end (or a reset), not the 10 s timeout.
        silent.push(std::net::TcpStream::connect(addr).unwrap());
        assert_closed_at_once(addr);
    })
    .await
    .unwrap();
}

/// A connection holds its host's waiting place, not an association slot, while its
/// request is read: one host stalling long requests holds at most `MAX_WAITING_PER_HOST`
/// waiting places and no slot (a red-team finding: 33 stalled 200 KB requests from one host
/// took all 32 slots for the association timeout), and its next connection is closed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_half_sent_requests_are_bounded_per_host() {
    use std::io::Write;
    let server = start(|c| c.max_associations = 32).await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        let per_host = nightingale_dicom::scp::MAX_WAITING_PER_HOST;
        // A-ASSOCIATE-RQ header declaring 200,000 bytes, then 66,000 of them.
        let mut start = vec![0x01, 0];
        start.extend_from_slice(&200_000u32.to_be_bytes());
        start.extend_from_slice(&[0, 1, 0, 0]);
        start.extend_from_slice(b"NIGHTINGALE     ");
        start.extend_from_slice(b"EVIL            ");
        start.resize(66_000, 0);
        let stalled: Vec<_> = (0..per_host)
            .map(|_| {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.write_all(&start).unwrap();
                s
            })
            .collect();
        // Past the first look at their requests (which ends at 64 KiB).
        std::thread::sleep(Duration::from_secs(1));
        assert_closed_at_once(addr);
        drop(stalled);
    })
    .await
    .unwrap();
}

/// Requests the allowlist refuses take no association slot, and their connections are
/// closed as soon as the answer is out (a peer that waits for it has nothing unread): with
/// one slot and the refused connections left open by their peer, an allowlisted SCU is
/// served (a red-team finding: every refusal held a slot while it lingered up to 2 s, and a
/// host opening 25 refused connections a second kept every slot full).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_take_no_association_slot() {
    let server = start(|c| {
        c.max_associations = 1;
        c.allowed = Some(vec!["RUSTSCU".parse().unwrap()]);
    })
    .await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut rq = associate_rq(&[(CT, EXPLICIT_LE)]);
        rq.calling_ae_title = "INTRUDER".into();
        let bytes = pdu_bytes(&Pdu::AssociationRQ(rq));
        // Twice the host's waiting places, one after the other, each left open after its
        // answer: every one is refused (not closed unanswered for want of a place).
        let refused: Vec<_> = (0..2 * nightingale_dicom::scp::MAX_WAITING_PER_HOST)
            .map(|_| {
                let mut socket = std::net::TcpStream::connect(addr).unwrap();
                socket.set_read_timeout(Some(TIMEOUT)).unwrap();
                socket.write_all(&bytes).unwrap();
                match read_answer(&mut socket) {
                    Answer::Pdu(Pdu::AssociationRJ(rj)) => assert_eq!(
                        rj.source,
                        AssociationRJSource::ServiceUser(
                            AssociationRJServiceUserReason::CallingAETitleNotRecognized
                        )
                    ),
                    other => panic!("expected A-ASSOCIATE-RJ, got {other:?}"),
                }
                // The server closed its side at once: the next read sees the end.
                assert!(matches!(read_answer(&mut socket), Answer::Closed));
                socket
            })
            .collect();
        echo(addr);
        drop(refused);
    })
    .await
    .unwrap();
}

/// A connection that sends the start of a request and closes gives its host's waiting
/// place back at once (its bytes are read, so the close is seen: peeked at, they hid it, and
/// the place was held for the association timeout, a red-team finding).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_half_way_through_its_request_gives_its_place_back() {
    let server = start(|c| c.association_timeout = Duration::from_secs(60)).await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        for _ in 0..nightingale_dicom::scp::MAX_WAITING_PER_HOST {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(b"\x01\x00\x00\x00\x00\x44\x00\x01").unwrap();
        }
        // Every place is free again well within the 60 s association timeout.
        let until = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let served = connect(addr, &[("1.2.840.10008.1.1", EXPLICIT_LE)]).is_ok();
            if served {
                break;
            }
            assert!(
                std::time::Instant::now() < until,
                "the host's places were still held"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        echo(addr);
    })
    .await
    .unwrap();
}

/// With an allowlist whose every entry names its host, a connection from another host is
/// closed at once and takes no waiting place: addresses the allowlist refuses cannot fill
/// the places and shut an allowlisted SCU out (a red-team finding).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_no_allowlist_entry_names_take_no_waiting_place() {
    let server = start(|c| {
        c.max_associations = 1;
        c.allowed = Some(vec!["RUSTSCU@127.0.0.1".parse().unwrap()]);
    })
    .await;
    let addr = server.addr;
    // More silent connections from 127.0.0.2 than all the waiting places there are: each is
    // closed at once.
    let mut others = Vec::new();
    for _ in 0..70 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut stream = socket.connect(addr).await.unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(
            TIMEOUT,
            tokio::io::AsyncReadExt::read(&mut stream, &mut byte),
        )
        .await
        .expect("closed at once, not held");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        others.push(stream);
    }
    tokio::task::spawn_blocking(move || echo(addr))
        .await
        .unwrap();
    drop(others);
}

/// A connection that sends the start of its A-ASSOCIATE-RQ (its header and AE titles, 42
/// bytes) and stalls still only waits: it takes no association slot until the whole request
/// is in, so a real SCU is served beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_do_not_take_association_slots() {
    use std::io::Write;
    let server = start(|c| c.max_associations = 1).await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        // A-ASSOCIATE-RQ header declaring 200 bytes, version 1, called and calling AE.
        let mut start = vec![0x01, 0, 0, 0, 0, 200, 0, 1, 0, 0];
        start.extend_from_slice(b"NIGHTINGALE     ");
        start.extend_from_slice(b"EVIL            ");
        let stalled: Vec<_> = (0..2)
            .map(|_| {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.write_all(&start).unwrap();
                s
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        echo(addr);
        drop(stalled);
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
        expect_abort(&mut assoc, "");
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
        expect_abort(&mut assoc, "");
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

/// Red-team finding: an A-ASSOCIATE-RQ longer than the maximum PDU length (128 contexts of
/// 18 transfer syntaxes each: 74 KB against 64 KiB) was aborted, where the maximum bounds
/// P-DATA only (PS3.8 D.1) and dcmtk's storescp takes it. Here: 120 contexts of 12 transfer
/// syntaxes against a 16 KiB maximum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_associate_request_longer_than_the_maximum_pdu_is_read() {
    let server = start(|c| c.max_pdu_length = 16_384).await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        let syntaxes: Vec<String> = (0..11)
            .map(|i| format!("1.2.840.10008.1.2.4.{}", 200 + i))
            .chain([EXPLICIT_LE.to_owned()])
            .collect();
        let mut options = dicom_ul::ClientAssociationOptions::new()
            .calling_ae_title("RUSTSCU")
            .called_ae_title("NIGHTINGALE")
            .read_timeout(std::time::Duration::from_secs(30))
            .write_timeout(std::time::Duration::from_secs(30));
        for _ in 0..120 {
            options = options.with_presentation_context(
                CT,
                syntaxes.iter().map(String::as_str).collect::<Vec<_>>(),
            );
        }
        let mut assoc = options.establish(addr).unwrap();
        let pc = accepted_pc(&assoc);
        assert_eq!(
            store(&mut assoc, pc, 1, "1.2.3.100.4.1", ct("1.2.3.100.4.1")),
            0x0000
        );
        assoc.release().unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_on_a_context_never_negotiated_aborts_the_association() {
    let server = start(|_| {}).await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        let mut assoc = connect(addr, &[(CT, EXPLICIT_LE)]).unwrap();
        let pc = accepted_pc(&assoc);
        let unknown = if pc == 77 { 79 } else { 77 };
        // A C-ECHO-RQ on context 77, which the client never proposed.
        let command = command_set(0x0030, 1, "1.2.840.10008.1.1", None, 0x0101);
        assoc
            .send(&pdata(unknown, PDataValueType::Command, true, command))
            .unwrap();
        expect_abort(&mut assoc, "");
        echo(addr);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_not_served_is_answered_after_its_data_set_and_c_cancel_gets_no_answer() {
    let server = start(|_| {}).await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        let mut assoc = connect(addr, &[(CT, EXPLICIT_LE)]).unwrap();
        let pc = accepted_pc(&assoc);
        // A C-FIND-RQ with its identifier (data set type 0x0000): 0x0211 once the
        // identifier has arrived, and the association goes on.
        let find = command_set(0x0020, 1, CT, None, 0x0000);
        assoc
            .send(&pdata(pc, PDataValueType::Command, true, find))
            .unwrap();
        assoc
            .send(&pdata(
                pc,
                PDataValueType::Data,
                true,
                vec![
                    0x08, 0x00, 0x52, 0x00, 0x06, 0x00, 0x00, 0x00, b'S', b'T', b'U', b'D', b'Y',
                    b' ',
                ],
            ))
            .unwrap();
        assert_eq!(status_of(assoc.receive().unwrap()), 0x0211);
        // A C-CANCEL-RQ has no response: the next answer is the C-STORE's. As PS3.7 has
        // it (no Message ID of its own: a red-team finding, it aborted the association),
        // and with one.
        assoc
            .send(&pdata(pc, PDataValueType::Command, true, c_cancel_rq(1)))
            .unwrap();
        let cancel = command_set(0x0FFF, 3, CT, None, 0x0101);
        assoc
            .send(&pdata(pc, PDataValueType::Command, true, cancel))
            .unwrap();
        assert_eq!(
            store(&mut assoc, pc, 4, "1.2.3.100.9.1", ct("1.2.3.100.9.1")),
            0x0000
        );
        // A C-STORE-RQ naming its instance only as Requested (N-services' elements): not
        // stored (a re-attack's finding: it was, from the Requested UIDs).
        let requested_only = command_of(|obj| {
            use dicom_core::{DataElement, PrimitiveValue, VR};
            use dicom_dictionary_std::tags;
            obj.put(DataElement::new(
                tags::COMMAND_FIELD,
                VR::US,
                PrimitiveValue::from(0x0001u16),
            ));
            obj.put(DataElement::new(
                tags::MESSAGE_ID,
                VR::US,
                PrimitiveValue::from(7u16),
            ));
            obj.put(DataElement::new(
                tags::REQUESTED_SOP_CLASS_UID,
                VR::UI,
                PrimitiveValue::from(CT),
            ));
            obj.put(DataElement::new(
                tags::REQUESTED_SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from("1.2.3.100.9.7"),
            ));
            obj.put(DataElement::new(
                tags::COMMAND_DATA_SET_TYPE,
                VR::US,
                PrimitiveValue::from(0x0000u16),
            ));
        });
        assoc
            .send(&pdata(pc, PDataValueType::Command, true, requested_only))
            .unwrap();
        assoc
            .send(&pdata(pc, PDataValueType::Data, true, ct("1.2.3.100.9.7")))
            .unwrap();
        assert_ne!(status_of(assoc.receive().unwrap()), 0x0000);
        // A C-STORE-RQ saying it has no data set: cannot understand (0xC000), and the
        // association goes on (it was 0x0211, unrecognized operation).
        let bare = command_set(0x0001, 5, CT, Some("1.2.3.100.9.2"), 0x0101);
        assoc
            .send(&pdata(pc, PDataValueType::Command, true, bare))
            .unwrap();
        assert_eq!(status_of(assoc.receive().unwrap()), 0xC000);
        // A response sent to this SCP (C-STORE-RSP, 0x8001): a protocol error, the
        // association aborted (it was answered with a "response" to the response).
        let rsp = command_set(0x8001, 6, CT, Some("1.2.3.100.9.3"), 0x0101);
        assoc
            .send(&pdata(pc, PDataValueType::Command, true, rsp))
            .unwrap();
        expect_abort(&mut assoc, " after a response from the SCU");
        echo(addr);
    })
    .await
    .unwrap();
}

/// Red-team findings: a C-ECHO-RQ announcing a data set was answered at once, and the data
/// set then aborted the association; a command set's fragments on two contexts were joined
/// and answered on the last one's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echo_announcing_a_data_set_and_a_command_split_over_contexts() {
    let server = start(|_| {}).await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        const VERIFICATION: &str = "1.2.840.10008.1.1";
        let mut assoc = connect(addr, &[(VERIFICATION, EXPLICIT_LE), (CT, EXPLICIT_LE)]).unwrap();
        let ids: Vec<u8> = assoc.presentation_contexts().iter().map(|c| c.id).collect();
        let (verification, ct_pc) = (ids[0], ids[1]);
        let echo_with_data = command_set(0x0030, 1, VERIFICATION, None, 0x0000);
        assoc
            .send(&pdata(
                verification,
                PDataValueType::Command,
                true,
                echo_with_data,
            ))
            .unwrap();
        assoc
            .send(&pdata(
                verification,
                PDataValueType::Data,
                true,
                vec![0x08, 0x00, 0x60, 0x00, 0x02, 0x00, 0x00, 0x00, b'C', b'T'],
            ))
            .unwrap();
        assert_eq!(status_of(assoc.receive().unwrap()), 0x0000);
        // The association goes on.
        assert_eq!(
            store(&mut assoc, ct_pc, 2, "1.2.3.100.11.1", ct("1.2.3.100.11.1")),
            0x0000
        );
        // A command set begun on one context and ended on another: a protocol error.
        let command = c_store_rq(3, "1.2.3.100.11.2");
        let (head, tail) = command.split_at(command.len() / 2);
        assoc
            .send(&pdata(ct_pc, PDataValueType::Command, false, head.to_vec()))
            .unwrap();
        assoc
            .send(&pdata(
                verification,
                PDataValueType::Command,
                true,
                tail.to_vec(),
            ))
            .unwrap();
        expect_abort(&mut assoc, "");
        echo(addr);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presentation_context_ids_that_are_even_or_repeated_abort_the_association() {
    let server = start(|_| {}).await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        for ids in [[1u8, 1], [1, 2]] {
            let mut rq = associate_rq(&[(CT, EXPLICIT_LE), (CT, "1.2.840.10008.1.2")]);
            for (pc, id) in rq.presentation_contexts.iter_mut().zip(ids) {
                pc.id = id;
            }
            let mut socket = std::net::TcpStream::connect(addr).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            socket
                .write_all(&pdu_bytes(&Pdu::AssociationRQ(rq)))
                .unwrap();
            // dicom-ul answers the request; the SCP then aborts before anything is sent on it.
            let mut aborted = false;
            for _ in 0..2 {
                match read_answer(&mut socket) {
                    Answer::Pdu(Pdu::AbortRQ { .. }) => {
                        aborted = true;
                        break;
                    }
                    Answer::Pdu(Pdu::AssociationAC(_)) => continue,
                    other => panic!("{ids:?}: expected A-ASSOCIATE-AC then A-ABORT, got {other:?}"),
                }
            }
            assert!(aborted, "{ids:?}: no A-ABORT");
        }
        echo(addr);
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

/// A peer asking for small PDUs (its maximum PDU length 64 here; pynetdicom lets a
/// requestor ask for that) gets its responses in fragments that fit: a C-ECHO's status
/// arrives whole over several P-DATA PDUs, instead of the association being aborted after
/// the request was served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_split_to_the_peers_maximum_pdu_length() {
    use std::io::Write;
    let server = start(|_| {}).await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        const VERIFICATION: &str = "1.2.840.10008.1.1";
        let mut rq = associate_rq(&[(VERIFICATION, EXPLICIT_LE)]);
        rq.user_variables = vec![dicom_ul::pdu::UserVariableItem::MaxLength(64)];
        let mut socket = std::net::TcpStream::connect(addr).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        socket
            .write_all(&pdu_bytes(&Pdu::AssociationRQ(rq)))
            .unwrap();
        let read = |socket: &mut std::net::TcpStream| -> Pdu {
            use std::io::Read;
            let mut pdu = vec![0u8; 6];
            socket.read_exact(&mut pdu).unwrap();
            let len = u32::from_be_bytes([pdu[2], pdu[3], pdu[4], pdu[5]]) as usize;
            pdu.resize(6 + len, 0);
            socket.read_exact(&mut pdu[6..]).unwrap();
            dicom_ul::read_pdu(&mut pdu.as_slice(), 1 << 20, false)
                .unwrap()
                .expect("a whole PDU")
        };
        let Pdu::AssociationAC(ac) = read(&mut socket) else {
            panic!("expected A-ASSOCIATE-AC");
        };
        let pc = ac.presentation_contexts[0].id;
        socket
            .write_all(&pdu_bytes(&pdata(
                pc,
                PDataValueType::Command,
                true,
                command_set(0x0030, 7, VERIFICATION, None, 0x0101),
            )))
            .unwrap();
        let mut command = Vec::new();
        let mut pdus = 0;
        loop {
            let Pdu::PData { data } = read(&mut socket) else {
                panic!("expected P-DATA");
            };
            pdus += 1;
            let pdv = &data[0];
            assert!(
                pdv.data.len() + 6 <= 64,
                "a fragment over the peer's maximum"
            );
            command.extend_from_slice(&pdv.data);
            if pdv.is_last {
                break;
            }
        }
        assert!(pdus > 1, "the response fits one PDU of 64 bytes?");
        let ts = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
        let obj =
            dicom_object::InMemDicomObject::read_dataset_with_ts(command.as_slice(), &ts).unwrap();
        assert_eq!(
            obj.element(dicom_dictionary_std::tags::STATUS)
                .unwrap()
                .to_int::<u16>()
                .unwrap(),
            0x0000
        );
    })
    .await
    .unwrap();
}
