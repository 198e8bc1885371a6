//! The SCU against a hostile peer (red-team finding): a "PACS" that accepts the
//! association, reads a C-STORE, then answers with a command set that never ends, one PDV
//! at a time. Each receive was bounded by the DIMSE timeout but not the whole response, and
//! empty PDVs did not count, so an empty not-last command PDV every 20 s held the
//! association, and every result queued behind it, for ever.
//!
//! The peer speaks the Upper Layer protocol from raw bytes (PS3.8 9.3: A-ASSOCIATE-AC,
//! P-DATA-TF with PDV items whose message control header says command / not last), as
//! `/tmp/rt1/trickle_pacs.py` did.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dicom_object::meta::FileMetaTableBuilder;
use nightingale_dicom::scu::{Part10File, ScuError, ScuOptions, StoreAssociation, StoreFailure};

mod support;

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

fn read_pdu(c: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 6];
    c.read_exact(&mut head)?;
    let mut body = vec![0u8; u32::from_be_bytes(head[2..6].try_into().unwrap()) as usize];
    c.read_exact(&mut body)?;
    Ok((head[0], body))
}

fn item(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![kind, 0];
    out.extend((payload.len() as u16).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// How the peer answers a C-STORE.
#[derive(Clone, Copy)]
enum Trickle {
    /// Empty command PDVs, not last.
    Empty,
    /// One byte of command set per PDV, not last.
    OneByte,
    /// A command PDV on a presentation context that was never negotiated.
    OtherContext,
}

/// Accepts one association, accepting every context with its first transfer syntax, reads
/// the C-STORE up to the last data fragment, then trickles `how` every `every`.
fn trickling_peer(how: Trickle, every: Duration) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let (kind, body) = read_pdu(&mut c).unwrap();
        assert_eq!(kind, 1, "A-ASSOCIATE-RQ");
        let (called, calling) = (&body[4..20], &body[20..36]);
        let (items, mut at, mut ac) = (&body[68..], 0usize, Vec::new());
        while at < items.len() {
            let (kind, len) = (
                items[at],
                u16::from_be_bytes([items[at + 2], items[at + 3]]),
            );
            let data = &items[at + 4..at + 4 + len as usize];
            if kind == 0x10 {
                ac.extend(item(0x10, data));
            }
            if kind == 0x20 {
                let (pc, sub) = (data[0], &data[4..]);
                let (mut so, mut ts) = (0usize, None);
                while so < sub.len() {
                    let sl = u16::from_be_bytes([sub[so + 2], sub[so + 3]]) as usize;
                    if sub[so] == 0x40 && ts.is_none() {
                        ts = Some(sub[so + 4..so + 4 + sl].to_vec());
                    }
                    so += 4 + sl;
                }
                let mut result = vec![pc, 0, 0, 0];
                result.extend(item(0x40, &ts.unwrap()));
                ac.extend(item(0x21, &result));
            }
            at += 4 + len as usize;
        }
        let mut user = item(0x51, &16_384u32.to_be_bytes());
        user.extend(item(0x52, b"1.2.3.4"));
        ac.extend(item(0x50, &user));
        let mut pdu = vec![0, 1, 0, 0];
        pdu.extend_from_slice(called);
        pdu.extend_from_slice(calling);
        pdu.extend([0u8; 32]);
        pdu.extend(ac);
        let mut out = vec![2, 0];
        out.extend((pdu.len() as u32).to_be_bytes());
        out.extend(pdu);
        c.write_all(&out).unwrap();
        // The request: until the last data set fragment.
        let pc = loop {
            let Ok((kind, body)) = read_pdu(&mut c) else {
                return;
            };
            assert_eq!(kind, 4, "P-DATA-TF");
            if body[5] & 3 == 2 {
                break body[4];
            }
        };
        let payload: &[u8] = match how {
            Trickle::Empty => &[],
            Trickle::OneByte | Trickle::OtherContext => &[0],
        };
        let pc = match how {
            Trickle::OtherContext => pc.wrapping_add(2),
            _ => pc,
        };
        loop {
            let mut pdv = ((2 + payload.len()) as u32).to_be_bytes().to_vec();
            pdv.extend([pc, 0x01]); // command, not last
            pdv.extend_from_slice(payload);
            let mut out = vec![4, 0];
            out.extend((pdv.len() as u32).to_be_bytes());
            out.extend(pdv);
            if c.write_all(&out).is_err() {
                return; // the SCU gave up and closed the connection
            }
            std::thread::sleep(every);
        }
    });
    addr
}

fn part10(dir: &Path) -> PathBuf {
    let obj = support::ct_object("1.2.3.200", "1.2.3.200.1", Some("1.2.3.200.1.1"), None);
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(EXPLICIT_LE)
                .media_storage_sop_class_uid(CT)
                .media_storage_sop_instance_uid("1.2.3.200.1.1"),
        )
        .unwrap();
    let path = dir.join("ct.dcm");
    file.write_to_file(&path).unwrap();
    path
}

/// `part10`'s file with its data set replaced by `dataset` (its meta kept).
fn with_dataset(dir: &Path, name: &str, dataset: &[u8]) -> PathBuf {
    let good = std::fs::read(part10(dir)).unwrap();
    let group = u32::from_le_bytes(good[140..144].try_into().unwrap()) as usize;
    let mut bytes = good[..144 + group].to_vec();
    bytes.extend_from_slice(dataset);
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// An element in Explicit VR Little Endian with a 2-byte length.
fn short_element(tag: (u16, u16), vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
    let mut e = Vec::new();
    e.extend_from_slice(&tag.0.to_le_bytes());
    e.extend_from_slice(&tag.1.to_le_bytes());
    e.extend_from_slice(vr);
    e.extend_from_slice(&(value.len() as u16).to_le_bytes());
    e.extend_from_slice(value);
    e
}

/// The C-STORE names the data set's UIDs (pydicom's rtplan.dcm: its meta names another
/// instance), read from the first top-level elements only: a data set of 3,000 nested
/// sequences (a stack overflow when the data set was parsed whole) and one declaring a 4 GB
/// element (4 GB of memory) fall back to the meta's UIDs at once (re-attack findings).
#[test]
fn the_data_sets_uids_are_read_from_its_first_elements_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut other = short_element((0x0008, 0x0016), b"UI", b"1.2.840.10008.5.1.4.1.1.2\0");
    other.extend(short_element((0x0008, 0x0018), b"UI", b"1.2.3.777\0"));
    other.extend(short_element((0x0010, 0x0010), b"PN", b"X^Y "));
    let file = Part10File::open(&with_dataset(dir.path(), "other.dcm", &other)).unwrap();
    assert_eq!(file.sop_instance_uid, "1.2.3.777");
    assert_eq!(file.sop_class_uid, CT);
    // The same UIDs after an 80 KB sequence of defined length, after one of undefined
    // length with an item, and after an element of group 0008 out of order (a second
    // re-attack: the first 64 KiB alone missed them).
    let sequence = |defined: bool| {
        let mut item_body = Vec::new();
        for _ in 0..10 {
            item_body.extend(short_element((0x0008, 0x0100), b"SH", &[b'A'; 8000]));
        }
        let mut item = vec![0xFE, 0xFF, 0x00, 0xE0];
        if defined {
            item.extend_from_slice(&(item_body.len() as u32).to_le_bytes());
            item.extend(item_body);
        } else {
            item.extend_from_slice(&[0xFF; 4]);
            item.extend(item_body);
            item.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        }
        let mut sq = vec![0x08, 0x00, 0x06, 0x00, b'S', b'Q', 0, 0];
        if defined {
            sq.extend_from_slice(&(item.len() as u32).to_le_bytes());
            sq.extend(item);
        } else {
            sq.extend_from_slice(&[0xFF; 4]);
            sq.extend(item);
            sq.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        }
        sq.extend(other.clone());
        sq
    };
    // a UN of undefined length: its content is Implicit VR (PS3.5 6.2.2)
    let mut un = vec![
        0x08, 0x00, 0x06, 0x00, b'U', b'N', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
    ];
    un.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
    un.extend_from_slice(&[0x08, 0x00, 0x00, 0x01, 6, 0, 0, 0]);
    un.extend_from_slice(b"CODE01");
    un.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
    un.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
    un.extend(other.clone());
    let mut out_of_order = short_element((0x0008, 0x0020), b"DA", b"20240101");
    out_of_order.extend(other.clone());
    for (name, dataset) in [
        ("defined.dcm", sequence(true)),
        ("undefined.dcm", sequence(false)),
        ("order.dcm", out_of_order),
        ("un.dcm", un),
    ] {
        let file = Part10File::open(&with_dataset(dir.path(), name, &dataset)).unwrap();
        assert_eq!(file.sop_instance_uid, "1.2.3.777", "{name}");
    }

    let mut deep = vec![
        0x08, 0x00, 0x06, 0x00, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
    ];
    for _ in 0..3000 {
        deep.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        deep.extend_from_slice(&[
            0x08, 0x00, 0x06, 0x00, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ]);
    }
    let mut huge = vec![
        0x08, 0x00, 0x10, 0x00, b'U', b'N', 0, 0, 0xF0, 0xFF, 0xFF, 0xFF,
    ];
    huge.extend_from_slice(&[0u8; 100]);
    for (name, dataset) in [("deep.dcm", deep), ("huge.dcm", huge)] {
        let file = Part10File::open(&with_dataset(dir.path(), name, &dataset)).unwrap();
        assert_eq!(file.sop_instance_uid, "1.2.3.200.1.1", "{name}");
        assert_eq!(file.sop_class_uid, CT, "{name}");
    }
}

async fn store_against(how: Trickle, dimse: Duration, exchange: Duration) -> StoreFailure {
    let dir = tempfile::tempdir().unwrap();
    let file = Part10File::open(&part10(dir.path())).unwrap();
    let addr = trickling_peer(how, Duration::from_millis(50));
    let options = ScuOptions {
        called_ae_title: "TRICKLE".into(),
        dimse_timeout: dimse,
        exchange_timeout: exchange,
        ..ScuOptions::default()
    };
    let contexts = vec![(CT.to_owned(), EXPLICIT_LE.to_owned())];
    let mut association = StoreAssociation::open(&addr, &options, &contexts)
        .await
        .unwrap();
    // Far above every bound under test: without them the store never returns.
    tokio::time::timeout(Duration::from_secs(30), association.store(&file))
        .await
        .expect("the C-STORE is bounded")
        .unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_response_fragments_count_against_a_bound() {
    let started = Instant::now();
    let failure = store_against(
        Trickle::Empty,
        Duration::from_secs(10),
        Duration::from_secs(20),
    )
    .await;
    assert!(
        matches!(
            failure,
            StoreFailure::Association(ScuError::Protocol {
                what: "response made of empty fragments"
            })
        ),
        "{failure:?}"
    );
    // Five empty PDVs 50 ms apart, not the 10 s response bound.
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// A response on another presentation context than its request's (here one never
/// negotiated) is a protocol error, not this request's answer (a red-team finding: it was
/// taken as the C-STORE's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_on_another_presentation_context_is_refused() {
    let failure = store_against(
        Trickle::OtherContext,
        Duration::from_secs(10),
        Duration::from_secs(20),
    )
    .await;
    assert!(
        matches!(
            failure,
            StoreFailure::Association(ScuError::Protocol {
                what: "a response on another presentation context than its request's"
            })
        ),
        "{failure:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_that_never_ends_is_bounded_as_a_whole() {
    // Bytes keep coming (each receive within the bound), the command set never ends: the
    // whole response is bounded by the DIMSE timeout ...
    let started = Instant::now();
    let failure = store_against(
        Trickle::OneByte,
        Duration::from_secs(2),
        Duration::from_secs(20),
    )
    .await;
    assert!(
        matches!(
            failure,
            StoreFailure::Association(ScuError::Timeout {
                what: "waiting for the response",
                ..
            })
        ),
        "{failure:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(6));
    // ... and the whole exchange by the exchange timeout, when that is shorter.
    let started = Instant::now();
    let failure = store_against(
        Trickle::OneByte,
        Duration::from_secs(20),
        Duration::from_secs(1),
    )
    .await;
    assert!(
        matches!(
            failure,
            StoreFailure::Association(ScuError::Timeout {
                what: "the whole C-STORE exchange",
                ..
            })
        ),
        "{failure:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}
