//! DICOM operations end to end in one process: the SCU (`nightingale_dicom::scu`) sends
//! Part 10 files written byte by byte here to Nightingale's SCP, whose events go to the
//! audit trail. Checked: per-file outcomes (stored, refused by the SCP, context rejected,
//! unreadable file), the audit records of the association and of each instance with the
//! UIDs hashed (the expected SHA-256 computed here with sha2 from the UID the test sent) or
//! omitted, no UID in clear anywhere in the trail, and a chain that still verifies.
//!
//! The SCU against a real peer (dcmtk's storescp) is tests/peer/test_dicom_scu.py.

mod support;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nightingale::audit::dicom::{DicomAuditSink, UidAudit};
use nightingale::audit::{AuditLog, AuditRecord, EventKind, Outcome};
use nightingale_dicom::scu::{self, ScuError, ScuOptions, StoreFailure};
use nightingale_dicom::{Scp, ScpConfig, Spool, SpoolOptions};
use sha2::{Digest, Sha256};

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const MPEG2: &str = "1.2.840.10008.1.2.4.100";
const STUDY: &str = "1.2.826.0.1.3680043.10.1383.77.1";
const SERIES: &str = "1.2.826.0.1.3680043.10.1383.77.1.1";

/// One Explicit VR Little Endian element.
fn element(out: &mut Vec<u8>, group: u16, elem: u16, vr: &[u8; 2], value: &[u8], pad: u8) {
    let mut value = value.to_vec();
    if value.len() % 2 == 1 {
        value.push(pad);
    }
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(vr);
    if matches!(vr, b"OB" | b"OW" | b"UN" | b"SQ" | b"UT") {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    }
    out.extend_from_slice(&value);
}

/// A CT data set (with or without pixel data).
fn dataset(sop: &str, pixels: bool) -> Vec<u8> {
    let mut d = Vec::new();
    element(&mut d, 0x0008, 0x0016, b"UI", CT.as_bytes(), 0);
    element(&mut d, 0x0008, 0x0018, b"UI", sop.as_bytes(), 0);
    element(&mut d, 0x0020, 0x000D, b"UI", STUDY.as_bytes(), 0);
    element(&mut d, 0x0020, 0x000E, b"UI", SERIES.as_bytes(), 0);
    element(&mut d, 0x0028, 0x0010, b"US", &1u16.to_le_bytes(), 0);
    element(&mut d, 0x0028, 0x0011, b"US", &2u16.to_le_bytes(), 0);
    if pixels {
        element(&mut d, 0x7FE0, 0x0010, b"OW", &[1, 0, 2, 0], 0);
    }
    d
}

/// A Part 10 file: preamble, meta group (its length first), then the data set as given.
fn part10(path: &Path, sop: &str, ts: &str, dataset: &[u8]) {
    let mut meta = Vec::new();
    element(&mut meta, 0x0002, 0x0001, b"OB", &[0, 1], 0);
    element(&mut meta, 0x0002, 0x0002, b"UI", CT.as_bytes(), 0);
    element(&mut meta, 0x0002, 0x0003, b"UI", sop.as_bytes(), 0);
    element(&mut meta, 0x0002, 0x0010, b"UI", ts.as_bytes(), 0);
    element(&mut meta, 0x0002, 0x0012, b"UI", b"1.2.3.4", 0);
    let mut file = vec![0u8; 128];
    file.extend_from_slice(b"DICM");
    element(
        &mut file,
        0x0002,
        0x0000,
        b"UL",
        &(meta.len() as u32).to_le_bytes(),
        0,
    );
    file.extend_from_slice(&meta);
    file.extend_from_slice(dataset);
    std::fs::write(path, file).unwrap();
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

struct Node {
    addr: String,
    audit: PathBuf,
    _dir: tempfile::TempDir,
}

async fn start(uids: UidAudit, configure: impl FnOnce(&mut ScpConfig)) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&audit, false).unwrap();
    let (spool, _) = Spool::open(
        &dir.path().join("spool"),
        SpoolOptions {
            min_free_bytes: 0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut config = ScpConfig::new("127.0.0.1:0".parse().unwrap());
    configure(&mut config);
    let scp = Scp::bind(config, Arc::new(spool))
        .await
        .unwrap()
        .with_events(DicomAuditSink::new(log, uids));
    let addr = scp.local_addr().unwrap().to_string();
    tokio::spawn(scp.serve(std::future::pending()));
    Node {
        addr,
        audit,
        _dir: dir,
    }
}

fn options() -> ScuOptions {
    ScuOptions {
        calling_ae_title: "OPSSCU".into(),
        called_ae_title: "NIGHTINGALE".into(),
        connect_timeout: Duration::from_secs(10),
        dimse_timeout: Duration::from_secs(20),
        ..ScuOptions::default()
    }
}

fn records(path: &Path) -> Vec<AuditRecord> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits (bounded) until the trail holds a record matching `pred`.
async fn wait_for(path: &Path, pred: impl Fn(&AuditRecord) -> bool) -> Vec<AuditRecord> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all = records(path);
        if all.iter().any(&pred) {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "no such audit record within 20 s: {all:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_files_with_per_file_outcomes_and_audits_them_with_hashed_uids() {
    let node = start(UidAudit::Hash, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let good_uid = "1.2.826.0.1.3680043.10.1383.77.1.1.1";
    let bad_uid = "1.2.826.0.1.3680043.10.1383.77.1.1.2";
    let mpeg_uid = "1.2.826.0.1.3680043.10.1383.77.1.1.3";
    let good_ds = dataset(good_uid, true);
    let bad_ds = dataset(bad_uid, false);
    let good = dir.path().join("good.dcm");
    let no_pixels = dir.path().join("no-pixels.dcm");
    let mpeg = dir.path().join("mpeg.dcm");
    let missing = dir.path().join("missing.dcm");
    part10(&good, good_uid, EXPLICIT_LE, &good_ds);
    part10(&no_pixels, bad_uid, EXPLICIT_LE, &bad_ds);
    part10(&mpeg, mpeg_uid, MPEG2, &dataset(mpeg_uid, true));

    let outcomes = scu::store_files(
        &node.addr,
        &options(),
        vec![
            good.clone(),
            no_pixels.clone(),
            mpeg.clone(),
            missing.clone(),
        ],
    )
    .await;
    assert_eq!(outcomes.len(), 4);
    assert_eq!(outcomes[0].result.as_ref().unwrap().status, 0x0000);
    assert!(outcomes[0].is_stored());
    // The SCP refuses a CT without pixel data: 0xA900 with an Error Comment.
    let refused = outcomes[1].result.as_ref().unwrap();
    assert_eq!(refused.status, 0xA900);
    assert!(refused.error_comment.is_some() && !outcomes[1].is_stored());
    assert!(matches!(
        &outcomes[2].result,
        Err(StoreFailure::ContextRejected { transfer_syntax, .. }) if transfer_syntax == MPEG2
    ));
    assert!(matches!(&outcomes[3].result, Err(StoreFailure::File(_))));

    let all = wait_for(&node.audit, |r| {
        r.event.kind == EventKind::DicomAssociation && detail_map(r)["event"] == "released"
    })
    .await;
    let actor = Some("OPSSCU@127.0.0.1".to_owned());
    let accepted = all
        .iter()
        .find(|r| {
            r.event.kind == EventKind::DicomAssociation && detail_map(r)["event"] == "accepted"
        })
        .expect("an accepted record");
    assert_eq!(accepted.event.actor, actor);
    // Two contexts proposed (CT in Explicit VR LE, CT in MPEG2); the SCP takes one.
    assert_eq!(detail_map(accepted)["contexts_proposed"], "2");
    assert_eq!(detail_map(accepted)["contexts_accepted"], "1");

    let instances: Vec<&AuditRecord> = all
        .iter()
        .filter(|r| r.event.kind == EventKind::DicomInstance)
        .collect();
    assert_eq!(instances.len(), 2, "{instances:#?}");
    let stored = instances[0];
    let d = detail_map(stored);
    assert_eq!(
        (stored.event.status, stored.event.outcome),
        (0, Outcome::Ok)
    );
    assert_eq!(stored.event.actor, actor);
    assert_eq!(stored.event.request_id, accepted.event.request_id);
    assert_eq!(
        stored.event.input_sha256.as_deref(),
        Some(sha256(&good_ds).as_str())
    );
    assert_eq!(d["event"], "stored");
    assert_eq!(d["sop_class"], CT);
    assert_eq!(d["transfer_syntax"], EXPLICIT_LE);
    assert_eq!(d["size"], good_ds.len().to_string());
    assert_eq!(d["sop_instance_sha256"], sha256(good_uid.as_bytes()));
    assert_eq!(d["study_sha256"], sha256(STUDY.as_bytes()));
    assert_eq!(d["series_sha256"], sha256(SERIES.as_bytes()));

    let refused = instances[1];
    let d = detail_map(refused);
    assert_eq!(
        (refused.event.status, refused.event.outcome),
        (0xA900, Outcome::Rejected)
    );
    assert_eq!(d["event"], "refused");
    assert_eq!(d["reason"], "missing_pixel_data");
    assert_eq!(d["sop_instance_sha256"], sha256(bad_uid.as_bytes()));

    let released = all
        .iter()
        .find(|r| {
            r.event.kind == EventKind::DicomAssociation && detail_map(r)["event"] == "released"
        })
        .unwrap();
    assert_eq!(detail_map(released)["stored"], "1");
    assert_eq!(detail_map(released)["failed"], "1");

    // No instance, study or series UID in clear anywhere in the trail.
    let text = std::fs::read_to_string(&node.audit).unwrap();
    for uid in [good_uid, bad_uid, STUDY, SERIES] {
        assert!(!text.contains(uid), "{uid} in the audit trail");
    }
    let summary = nightingale::audit::verify(&node.audit).unwrap();
    assert_eq!(summary.records, all.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn omitted_uids_leave_no_trace_of_them() {
    let node = start(UidAudit::Omit, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let uid = "1.2.826.0.1.3680043.10.1383.77.1.1.9";
    let file = dir.path().join("one.dcm");
    part10(&file, uid, EXPLICIT_LE, &dataset(uid, true));
    let outcomes = scu::store_files(&node.addr, &options(), vec![file]).await;
    assert!(outcomes[0].is_stored(), "{outcomes:?}");
    let all = wait_for(&node.audit, |r| r.event.kind == EventKind::DicomInstance).await;
    let stored = all
        .iter()
        .find(|r| r.event.kind == EventKind::DicomInstance)
        .unwrap();
    let d = detail_map(stored);
    assert!(
        !d.keys().any(|k| k.ends_with("_sha256")),
        "{:?}",
        stored.event.detail
    );
    let text = std::fs::read_to_string(&node.audit).unwrap();
    for hidden in [
        uid.to_owned(),
        sha256(uid.as_bytes()),
        sha256(STUDY.as_bytes()),
    ] {
        assert!(!text.contains(&hidden));
    }
    nightingale::audit::verify(&node.audit).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_rejection_and_unreachable_peers_are_clear_errors() {
    let node = start(UidAudit::Hash, |c| {
        c.allowed = Some(vec!["OPSSCU".parse().unwrap()]);
    })
    .await;
    let status = scu::echo(&node.addr, &options()).await.unwrap();
    assert!(status.is_success(), "{status}");

    // An AE the allowlist does not know: A-ASSOCIATE-RJ, permanent; audited as rejected.
    let stranger = ScuOptions {
        calling_ae_title: "STRANGER".into(),
        ..options()
    };
    match scu::echo(&node.addr, &stranger).await {
        Err(ScuError::Rejected { permanent, .. }) => assert!(permanent),
        other => panic!("expected a rejection, got {other:?}"),
    }
    wait_for(&node.audit, |r| {
        r.event.kind == EventKind::DicomAssociation && detail_map(r)["event"] == "rejected"
    })
    .await;

    // Nobody listens on a port just released.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    match scu::echo(&format!("127.0.0.1:{port}"), &options()).await {
        Err(e @ ScuError::Connect { .. }) => {
            assert!(e.to_string().contains("cannot connect"), "{e}")
        }
        other => panic!("expected a connection error, got {other:?}"),
    }
    // An invalid AE title is refused before any connection.
    let bad = ScuOptions {
        called_ae_title: "A\\B".into(),
        ..options()
    };
    assert!(matches!(
        scu::echo(&node.addr, &bad).await,
        Err(ScuError::InvalidAeTitle { .. })
    ));
    nightingale::audit::verify(&node.audit).unwrap();
}

fn detail_map(r: &nightingale::audit::AuditRecord) -> std::collections::BTreeMap<String, String> {
    support::detail_pairs(r.event.detail.as_deref())
}
