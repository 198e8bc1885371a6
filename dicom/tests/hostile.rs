//! Hostile input at the upper layer and in DIMSE: malformed A-ASSOCIATE-RQs (each with the
//! answer PS3.8 gives it, or a closed connection where dicom-ul cannot parse the PDU), then
//! a bounded, seeded proptest corpus of mutated association requests and mutated C-STORE
//! streams. After every case the server must still serve (a C-ECHO on a new association), and
//! the spool must hold exactly the instances the server acknowledged with success, each a file
//! that parses.
//!
//! The corpus is deterministic (a fixed ChaCha seed), so a failure reproduces; raise
//! `NIGHTINGALE_FUZZ_CASES` to run more cases locally.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use dicom_ul::pdu::{
    AbortRQSource, AssociationRJResult, AssociationRJServiceProviderASCEReason,
    AssociationRJServiceUserReason, AssociationRJSource, PDataValueType, Pdu,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use support::*;

fn valid_rq() -> Vec<u8> {
    pdu_bytes(&Pdu::AssociationRQ(associate_rq(&[(CT, EXPLICIT_LE)])))
}

fn is_accept(answer: &Answer) -> bool {
    matches!(answer, Answer::Pdu(Pdu::AssociationAC(_)))
}

/// The A-ABORT PS3.8 sends for an invalid or unexpected PDU while the A-ASSOCIATE-RQ is
/// awaited: action AA-1 (Table 9-10, state Sta2), service-user source.
fn is_invalid_pdu_abort(answer: &Answer) -> bool {
    matches!(
        answer,
        Answer::Pdu(Pdu::AbortRQ {
            source: AbortRQSource::ServiceUser
        })
    )
}

/// `answer` is an A-ASSOCIATE-RJ, rejected-permanent, from `source` with its reason.
fn assert_rejected_permanently(answer: Answer, source: AssociationRJSource) {
    let Answer::Pdu(Pdu::AssociationRJ(rj)) = answer else {
        panic!("expected an A-ASSOCIATE-RJ from {source:?}: {answer:?}");
    };
    assert_eq!(rj.result, AssociationRJResult::Permanent);
    assert_eq!(rj.source, source);
}

/// Sends `bytes` in pieces of the given sizes (then the rest), pausing between them, and
/// reads one PDU back.
fn trickle(addr: SocketAddr, bytes: &[u8], pieces: &[usize]) -> Answer {
    use std::io::Write;
    let mut socket = std::net::TcpStream::connect(addr).unwrap();
    socket.set_nodelay(true).unwrap();
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    socket.set_write_timeout(Some(TIMEOUT)).unwrap();
    let mut at = 0;
    for &n in pieces {
        socket.write_all(&bytes[at..at + n]).unwrap();
        socket.flush().unwrap();
        at += n;
        std::thread::sleep(Duration::from_millis(30));
    }
    socket.write_all(&bytes[at..]).unwrap();
    read_answer(&mut socket)
}

fn is_abort_or_close(answer: &Answer) -> bool {
    matches!(answer, Answer::Closed | Answer::Pdu(Pdu::AbortRQ { .. }))
}

/// With `check_called_ae`, an association called for another AE title is rejected
/// permanently (service user, called-AE-title-not-recognized); this node's title, padded or
/// not, is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_called_ae_is_rejected_when_checked() {
    let server = start(|c| c.check_called_ae = true).await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        let mut rq = associate_rq(&[(CT, EXPLICIT_LE)]);
        rq.called_ae_title = "OTHER_NODE".into();
        assert_rejected_permanently(
            exchange(addr, &pdu_bytes(&Pdu::AssociationRQ(rq)), false),
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CalledAETitleNotRecognized,
            ),
        );
        let answer = exchange(addr, &valid_rq(), false);
        assert!(is_accept(&answer), "{answer:?}");
        echo(addr);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_association_requests_are_refused_and_the_server_goes_on() {
    let server = start(|c| {
        c.association_timeout = Duration::from_secs(2);
        c.max_pdu_length = 16_384;
    })
    .await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        let valid = valid_rq();

        // Not DICOM at all: the first six bytes read as a PDU type and a huge length. An
        // invalid PDU where an A-ASSOCIATE-RQ is awaited: A-ABORT (PS3.8 Sta2, event 19).
        let answer = exchange(addr, b"GET / HTTP/1.1\r\nHost: pacs\r\n\r\n", false);
        assert!(is_invalid_pdu_abort(&answer), "HTTP request: {answer:?}");
        echo(addr);

        // A declared PDU length of 0xFFFFFFF0, then a megabyte: refused on the header, not
        // buffered (the write fails or the answer is a close).
        let mut huge = vec![0x01, 0x00, 0xFF, 0xFF, 0xFF, 0xF0];
        huge.extend(std::iter::repeat_n(0u8, 1 << 20));
        let answer = exchange(addr, &huge, false);
        assert!(is_abort_or_close(&answer), "0xFFFFFFF0: {answer:?}");
        echo(addr);

        // A request declaring 1 MiB + 1 bytes (over the request limit, which is above the
        // maximum PDU length): refused with an A-ABORT on its header, even when every byte
        // follows (a red-team finding: dicom-ul, reading the request without a limit of its
        // own, accepted 71 MiB ones).
        // A well-formed request: 120 contexts of 321 transfer syntaxes each.
        let mut rq = associate_rq(&[(CT, EXPLICIT_LE)]);
        let syntaxes: Vec<String> = (0..320)
            .map(|i| format!("1.2.840.10008.1.2.4.{}", 1000 + i))
            .chain([EXPLICIT_LE.to_owned()])
            .collect();
        rq.presentation_contexts = (0..120)
            .map(|i| dicom_ul::pdu::PresentationContextProposed {
                id: (2 * i + 1) as u8,
                abstract_syntax: CT.to_owned(),
                transfer_syntaxes: syntaxes.clone(),
            })
            .collect();
        let long_rq = pdu_bytes(&Pdu::AssociationRQ(rq));
        assert!(long_rq.len() > (1 << 20) + 6, "{}", long_rq.len());
        let answer = exchange(addr, &long_rq, false);
        assert!(
            is_invalid_pdu_abort(&answer),
            "request over 1 MiB: {answer:?}"
        );
        echo(addr);

        // Cut in half, then the peer stops sending but keeps the connection open: closed after
        // the association timeout (2 s here; the read is bounded at 20 s).
        let answer = exchange(addr, &valid[..valid.len() / 2], false);
        assert!(is_abort_or_close(&answer), "silent half RQ: {answer:?}");
        // Cut in half and closed.
        let answer = exchange(addr, &valid[..valid.len() / 2], true);
        assert!(is_abort_or_close(&answer), "closed half RQ: {answer:?}");
        echo(addr);

        // The application context item claims 0xFFFF bytes, past the end of the PDU.
        let mut item = valid.clone();
        assert_eq!(
            item[74], 0x10,
            "the application context item follows the fixed fields"
        );
        item[76] = 0xFF;
        item[77] = 0xFF;
        let answer = exchange(addr, &item, true);
        assert!(
            is_invalid_pdu_abort(&answer),
            "item past the end: {answer:?}"
        );
        echo(addr);

        // A presentation context item shorter than its fixed fields.
        let mut rq = valid.clone();
        let pc = 74
            + rq[74..]
                .windows(2)
                .position(|w| w == [0x20, 0x00])
                .expect("a presentation context item after the application context");
        rq[pc + 2] = 0x00;
        rq[pc + 3] = 0x01;
        let answer = exchange(addr, &rq, false);
        assert!(
            is_invalid_pdu_abort(&answer),
            "short context item: {answer:?}"
        );
        echo(addr);

        // A valid request trickled in pieces smaller than its fixed header: accepted.
        let answer = trickle(addr, &valid, &[1, 3, 7]);
        assert!(is_accept(&answer), "trickled RQ: {answer:?}");

        // A P-DATA-TF before any association: A-ABORT (AA-1).
        let answer = exchange(
            addr,
            &pdu_bytes(&pdata(1, PDataValueType::Data, true, vec![0; 16])),
            false,
        );
        assert!(is_invalid_pdu_abort(&answer), "P-DATA first: {answer:?}");
        echo(addr);

        // An unknown PDU type: A-ABORT (AA-1).
        let answer = exchange(addr, &[0x09, 0, 0, 0, 0, 4, 1, 2, 3, 4], false);
        assert!(
            is_invalid_pdu_abort(&answer),
            "unknown PDU type: {answer:?}"
        );
        echo(addr);

        // A protocol version without bit 0 (version 1, the only one there is): rejected
        // permanently by the service provider (ACSE), protocol-version-not-supported.
        for version in [0, 2, 0x8000] {
            let mut rq = associate_rq(&[(CT, EXPLICIT_LE)]);
            rq.protocol_version = version;
            assert_rejected_permanently(
                exchange(addr, &pdu_bytes(&Pdu::AssociationRQ(rq)), false),
                AssociationRJSource::ServiceProviderASCE(
                    AssociationRJServiceProviderASCEReason::ProtocolVersionNotSupported,
                ),
            );
        }
        echo(addr);
        // PS3.8 9.3.2: only bit 0 is tested, so a field with more bits set is a request for
        // version 1 (and possibly others): accepted.
        let mut rq = associate_rq(&[(CT, EXPLICIT_LE)]);
        rq.protocol_version = 0b11;
        let answer = exchange(addr, &pdu_bytes(&Pdu::AssociationRQ(rq)), false);
        assert!(is_accept(&answer), "version 3: {answer:?}");

        // Another application context than DICOM's: rejected, with that reason.
        let mut rq = associate_rq(&[(CT, EXPLICIT_LE)]);
        rq.application_context_name = "1.2.3.4".into();
        assert_rejected_permanently(
            exchange(addr, &pdu_bytes(&Pdu::AssociationRQ(rq)), false),
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::ApplicationContextNameNotSupported,
            ),
        );
        echo(addr);

        // A calling AE title outside PS3.5's repertoire (Latin-1 bytes, a newline, a tab, a
        // backslash, only spaces): rejected as not recognised, before it can reach a stored
        // file's Source AE Title or the audit trail. (The calling AE is bytes 26..42.)
        for calling in [
            &b"\xC4\xD6\xDC"[..],
            b"RED\nTEAM",
            b"CT1\t",
            b"CT\\1",
            b"                ",
        ] {
            let mut rq = valid_rq();
            let mut field = [b' '; 16];
            field[..calling.len()].copy_from_slice(calling);
            rq[26..42].copy_from_slice(&field);
            assert_rejected_permanently(
                exchange(addr, &rq, false),
                AssociationRJSource::ServiceUser(
                    AssociationRJServiceUserReason::CallingAETitleNotRecognized,
                ),
            );
        }
        echo(addr);

        // An A-ABORT or an A-RELEASE-RQ instead of a request: never an association.
        // PS3.8 Table 9-10 (Sta2): the A-ABORT closes the connection (AA-2), the
        // A-RELEASE-RQ is answered with an A-ABORT (AA-1), not a release.
        let abort = Pdu::AbortRQ {
            source: AbortRQSource::ServiceUser,
        };
        let answer = exchange(addr, &pdu_bytes(&abort), true);
        assert!(matches!(answer, Answer::Closed), "{answer:?}");
        let answer = exchange(addr, &pdu_bytes(&Pdu::ReleaseRQ), true);
        assert!(
            matches!(answer, Answer::Pdu(Pdu::AbortRQ { .. })),
            "{answer:?}"
        );
        echo(addr);
    })
    .await
    .unwrap();
    assert!(server.spool.instances().unwrap().is_empty());
}

/// One edit of a byte stream.
#[derive(Debug, Clone)]
enum Mutation {
    /// Cut the stream at this fraction of its length (per mille).
    Truncate(u16),
    /// Overwrite one byte (position in per mille of the length).
    Set(u16, u8),
    /// Insert bytes.
    Insert(u16, Vec<u8>),
    /// Overwrite four bytes with a big-endian length (the PDU header's or an item's).
    Length(u16, u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (0u16..1000).prop_map(Mutation::Truncate),
        (0u16..1000, any::<u8>()).prop_map(|(at, b)| Mutation::Set(at, b)),
        (0u16..1000, prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, b)| Mutation::Insert(at, b)),
        (
            0u16..1000,
            prop_oneof![
                Just(0u32),
                Just(1),
                Just(0xFFFF_FFF0),
                Just(u32::MAX),
                any::<u32>()
            ]
        )
            .prop_map(|(at, n)| Mutation::Length(at, n)),
    ]
}

fn apply(bytes: &mut Vec<u8>, mutations: &[Mutation]) {
    let at = |per_mille: u16, len: usize| (per_mille as usize * len) / 1000;
    for m in mutations {
        let len = bytes.len();
        match m {
            Mutation::Truncate(p) => bytes.truncate(at(*p, len)),
            Mutation::Set(p, b) if len > 0 => bytes[at(*p, len).min(len - 1)] = *b,
            Mutation::Set(..) => {}
            Mutation::Insert(p, b) => {
                let i = at(*p, len);
                bytes.splice(i..i, b.iter().copied());
            }
            Mutation::Length(p, n) => {
                let i = at(*p, len);
                if i + 4 <= len {
                    bytes[i..i + 4].copy_from_slice(&n.to_be_bytes());
                }
            }
        }
    }
}

fn cases() -> u32 {
    std::env::var("NIGHTINGALE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96)
}

fn runner() -> TestRunner {
    TestRunner::new_with_rng(
        Config {
            cases: cases(),
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_association_requests_never_stop_the_server() {
    let server = start(|c| c.association_timeout = Duration::from_secs(2)).await;
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        let valid = valid_rq();
        runner()
            .run(&prop::collection::vec(mutation(), 1..4), |mutations| {
                let mut bytes = valid.clone();
                apply(&mut bytes, &mutations);
                // Half-closed after the bytes: whatever the server makes of them, it
                // answers or closes at once (no case waits for a timeout).
                let _ = exchange(addr, &bytes, true);
                echo(addr);
                Ok(())
            })
            .unwrap();
    })
    .await
    .unwrap();
    assert!(server.spool.instances().unwrap().is_empty());
}

/// Sends `bytes` on an established association, half-closes, and returns every DIMSE
/// response the server sent before it closed.
fn send_raw_on_association(addr: SocketAddr, bytes: &[u8]) -> Vec<(u16, Option<String>)> {
    use std::io::Write;
    let mut assoc = connect(addr, &[(CT, EXPLICIT_LE)]).expect("an association");
    let socket = assoc.inner_stream();
    if socket.write_all(bytes).is_ok() {
        let _ = socket.shutdown(std::net::Shutdown::Write);
    }
    let mut responses = Vec::new();
    // Until the server closes, aborts or releases.
    while let Answer::Pdu(pdu @ Pdu::PData { .. }) = read_answer(socket) {
        responses.push(response_of(&pdu));
    }
    responses
}

fn indexed(server: &Running) -> BTreeSet<String> {
    server
        .spool
        .instances()
        .unwrap()
        .into_iter()
        .map(|s| {
            // Every indexed instance is a whole file that parses, holding that instance.
            let file = dicom_object::OpenFileOptions::new()
                .open_file(&s.path)
                .unwrap_or_else(|e| {
                    panic!("indexed file {} does not parse: {e}", s.path.display())
                });
            let uid = file
                .element(dicom_dictionary_std::tags::SOP_INSTANCE_UID)
                .unwrap()
                .to_str()
                .unwrap()
                .trim_end_matches('\0')
                .to_string();
            assert_eq!(uid, s.sop_instance_uid);
            uid
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_c_store_streams_store_exactly_what_was_acknowledged() {
    let server = start(|c| {
        c.association_timeout = Duration::from_secs(2);
        c.idle_timeout = Duration::from_secs(5);
    })
    .await;
    let addr = server.addr;
    let server = std::sync::Arc::new(server);
    let checked = server.clone();
    tokio::task::spawn_blocking(move || {
        let n = std::cell::Cell::new(0u32);
        runner()
            .run(&prop::collection::vec(mutation(), 1..3), |mutations| {
                n.set(n.get() + 1);
                // The presentation context dicom-ul's client proposes first has id 1.
                let uid = format!("1.2.3.100.77.{}", n.get());
                let mut bytes = pdu_bytes(&pdata(
                    1,
                    PDataValueType::Command,
                    true,
                    c_store_rq(1, &uid),
                ));
                bytes.extend(pdu_bytes(&pdata(1, PDataValueType::Data, true, ct(&uid))));
                apply(&mut bytes, &mutations);
                let before = indexed(&checked);
                let responses = send_raw_on_association(addr, &bytes);
                let after = indexed(&checked);
                let acknowledged: BTreeSet<String> = responses
                    .iter()
                    .filter(|(status, _)| *status == 0x0000)
                    .map(|(_, uid)| uid.clone().expect("a success names its instance"))
                    .collect();
                let new: BTreeSet<String> = after.difference(&before).cloned().collect();
                // Stored ⇔ acknowledged: nothing indexed that the peer was not told about,
                // nothing acknowledged that is not indexed.
                prop_assert!(
                    new.is_subset(&acknowledged),
                    "stored without success: {new:?} vs {acknowledged:?}"
                );
                prop_assert!(
                    acknowledged.is_subset(&after),
                    "acknowledged but not stored: {acknowledged:?}"
                );
                echo(addr);
                Ok(())
            })
            .unwrap();
        // The unmutated stream stores (the corpus is not vacuous).
        let uid = "1.2.3.100.77.0";
        let mut bytes = pdu_bytes(&pdata(1, PDataValueType::Command, true, c_store_rq(1, uid)));
        bytes.extend(pdu_bytes(&pdata(1, PDataValueType::Data, true, ct(uid))));
        assert_eq!(
            send_raw_on_association(addr, &bytes),
            [(0x0000, Some(uid.to_string()))]
        );
    })
    .await
    .unwrap();
    assert!(indexed(&server).contains("1.2.3.100.77.0"));
    assert_eq!(
        std::fs::read_dir(server.spool.root().join("tmp"))
            .unwrap()
            .count(),
        0,
        "no temp file is left behind"
    );
}
