//! Model control with its audit trail, through the router: rollback to a named version
//! (`{"parameters": {"version": "N"}}`), unload, refused loads, the operator view of the
//! repository index, and the repository poller swapping a new version in (or refusing a broken
//! one while the old keeps serving). The bundle is the real wdbc-malignancy (versions 1 and 2),
//! signed with the repository's demo key.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use nightingale::audit::{AuditLog, AuditRecord, EventKind, Outcome};
use nightingale::http::{self, AppState, HttpConfig};
use nightingale_models::{
    LoadTarget, PromotionCheck, Repository, RepositoryOptions, SignaturePolicy,
};
use serde_json::{Value, json};
use tower::ServiceExt;

mod support;
use support::copy_dir;

const MODEL: &str = "wdbc-malignancy";
const TOKEN: &str = "test-admin-token-0123456789";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Fixture {
    dir: tempfile::TempDir,
    state: Arc<AppState>,
}

impl Fixture {
    /// A repository with the bundle; `versions` are the version folders kept on disk (the
    /// manifest, and so its signature, is unchanged: it may list versions not on disk).
    async fn new(versions: &[u64]) -> Fixture {
        Fixture::with_promotion(versions, None).await
    }

    /// As [`Fixture::new`], with a deployment check asked before each version loads.
    async fn with_promotion(versions: &[u64], promotion: Option<PromotionCheck>) -> Fixture {
        Fixture::with(versions, promotion, |_| {}, false).await
    }

    /// As [`Fixture::new`]; `prepare` is given the bundle folder before anything loads, and
    /// with `ledger` the server keeps a release ledger in the fixture's folder.
    async fn with(
        versions: &[u64],
        promotion: Option<PromotionCheck>,
        prepare: impl FnOnce(&Path),
        ledger: bool,
    ) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        let bundle = repo.join(MODEL);
        copy_dir(&root().join("models/bundles").join(MODEL), &bundle);
        for v in [1u64, 2] {
            if !versions.contains(&v) {
                std::fs::remove_dir_all(bundle.join(v.to_string())).unwrap();
            }
        }
        prepare(&bundle);
        let state = Fixture::start(dir.path(), promotion, ledger, "audit.jsonl").await;
        Fixture { dir, state }
    }

    /// A server on the fixture's folder (its repository, audit trail and, with `ledger`, its
    /// release ledger and rollback pins), started as `serve` starts: every bundle loaded.
    async fn start(
        dir: &Path,
        promotion: Option<PromotionCheck>,
        ledger: bool,
        audit: &str,
    ) -> Arc<AppState> {
        let repo = dir.join("repo");
        let releases = ledger.then(|| {
            Arc::new(
                nightingale_models::releases::ReleaseLedger::open(&dir.join("data/releases.json"))
                    .unwrap(),
            )
        });
        let pins = ledger.then(|| {
            Arc::new(
                nightingale_models::releases::PinLedger::open(&dir.join("data/pins.json")).unwrap(),
            )
        });
        let options = RepositoryOptions {
            releases,
            pins,
            signatures: SignaturePolicy::load(
                &[root().join("keys/demo/nightingale-demo.pub")],
                true,
            )
            .unwrap(),
            promotion,
            ..RepositoryOptions::default()
        };
        let repository = Arc::new(Repository::new(&repo, options));
        let audit = AuditLog::open(&dir.join(audit), false).unwrap();
        let state = AppState::new(
            repository,
            audit,
            HttpConfig {
                admin_token: Some(TOKEN.into()),
                ..HttpConfig::default()
            },
            Some(http::install_recorder()),
        );
        nightingale::deploy::load_all(&state).await;
        state.set_ready(true);
        state
    }

    fn bundle(&self) -> PathBuf {
        self.dir.path().join("repo").join(MODEL)
    }

    async fn post(&self, uri: &str, body: &str, token: Option<&str>) -> (StatusCode, Value) {
        let mut req = Request::post(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let res = http::app(self.state.clone())
            .oneshot(req.body(Body::from(body.to_owned())).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        let res = http::app(self.state.clone())
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// The `nightingale_queue_depth` series of this model in `/metrics`.
    async fn queue_series(&self) -> Vec<String> {
        let res = http::app(self.state.clone())
            .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec())
            .unwrap()
            .lines()
            .filter(|l| l.starts_with(&format!("nightingale_queue_depth{{model=\"{MODEL}\"")))
            .map(|l| l.rsplit_once(' ').unwrap().0.to_owned())
            .collect()
    }

    async fn index(&self) -> Vec<Value> {
        let (s, v) = self.post("/v2/repository/index", "", None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v.as_array().unwrap().clone()
    }

    async fn infer_version(&self) -> (StatusCode, Value) {
        let body = json!({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32",
            "data": vec![1.0f32; 30]}]});
        self.post(
            &format!("/v2/models/{MODEL}/infer"),
            &body.to_string(),
            None,
        )
        .await
    }

    /// Audit records (each is stored before its action is answered, so no wait is needed).
    async fn audit(&self) -> Vec<AuditRecord> {
        let text = std::fs::read_to_string(self.dir.path().join("audit.jsonl")).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// The model file's SHA-256 as bundle.toml lists it (written by the training script with
/// Python's hashlib), not as the server computes it.
/// (kind, version) of every record of the trail in `path` that is not an inference.
fn model_events(path: &Path) -> Vec<(EventKind, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<AuditRecord>(l).unwrap())
        .filter(|r| r.event.kind != EventKind::Inference)
        .map(|r| (r.event.kind, r.event.version))
        .collect()
}

fn model_sha(bundle: &Path, version: u64) -> String {
    let text = std::fs::read_to_string(bundle.join("bundle.toml")).unwrap();
    let manifest: toml::Value = toml::from_str(&text).unwrap();
    manifest["versions"][version.to_string()]["files"]["model.onnx"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn rollback_serves_the_named_version_alone_and_is_audited_with_its_actor() {
    let f = Fixture::new(&[1, 2]).await;
    let (_, v) = f.infer_version().await;
    assert_eq!(v["model_version"], "2");

    let uri = format!("/v2/repository/models/{MODEL}/load");
    // Without the token: refused, nothing changes.
    let (s, _) = f
        .post(&uri, r#"{"parameters": {"version": "1"}}"#, None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    let (s, v) = f
        .post(&uri, r#"{"parameters": {"version": "1"}}"#, Some(TOKEN))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, v) = f.infer_version().await;
    assert_eq!(v["model_version"], "1");
    let (s, _) = f.get(&format!("/v2/models/{MODEL}/versions/2/ready")).await;
    assert_ne!(s, StatusCode::OK, "version 2 no longer serves");

    let index = f.index().await;
    assert_eq!(index.len(), 1, "{index:?}");
    let row = &index[0];
    assert_eq!(row["version"], "1");
    assert_eq!(row["state"], "READY");
    assert_eq!(row["pinned"], true);
    assert_eq!(row["signature"]["status"], "verified");
    assert_eq!(row["signature"]["key_id"], "B98C67AF02AD8F31");
    assert!(
        row["selftest"].as_str().unwrap().starts_with("self-test "),
        "{row}"
    );
    assert!(row["loaded_at"].as_str().unwrap().ends_with('Z'), "{row}");

    // A plain load returns to the version policy (all versions).
    let (s, _) = f.post(&uri, "", Some(TOKEN)).await;
    assert_eq!(s, StatusCode::OK);
    let (_, v) = f.infer_version().await;
    assert_eq!(v["model_version"], "2");
    assert!(f.index().await.iter().all(|r| r.get("pinned").is_none()));

    let records = f.audit().await;
    let control: Vec<&AuditRecord> = records
        .iter()
        .filter(|r| r.event.kind != EventKind::Inference)
        .collect();
    let summary: Vec<(EventKind, &str, &str)> = control
        .iter()
        .map(|r| {
            (
                r.event.kind,
                r.event.version.as_str(),
                r.event.actor.as_deref().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (EventKind::ModelLoad, "1", "startup"),
            (EventKind::ModelLoad, "2", "startup"),
            // The attempt without the token: refused, and audited.
            (EventKind::AccessRefused, "", "unauthenticated"),
            (EventKind::ModelRollback, "1", "admin-token"),
            // Version 2 stopped serving with the rollback: recorded too.
            (EventKind::ModelUnload, "2", "admin-token"),
            (EventKind::ModelLoad, "1", "admin-token"),
            (EventKind::ModelLoad, "2", "admin-token"),
        ]
    );
    let rollback = control[3];
    assert_eq!(rollback.event.model_sha256, model_sha(&f.bundle(), 1));
    assert_eq!(rollback.event.outcome, Outcome::Ok);
    assert!(
        rollback
            .event
            .detail
            .as_deref()
            .unwrap()
            .contains("B98C67AF02AD8F31"),
        "{rollback:?}"
    );
    let check = nightingale::audit::verify(&f.dir.path().join("audit.jsonl")).unwrap();
    assert_eq!(check.records as usize, records.len());
}

#[tokio::test]
async fn bad_load_requests_are_refused_and_what_serves_keeps_serving() {
    let f = Fixture::new(&[1, 2]).await;
    let uri = format!("/v2/repository/models/{MODEL}/load");
    for body in [
        r#"{"parameters": {"version": "0"}}"#,
        r#"{"parameters": {"version": "one"}}"#,
        r#"{"parameters": {"version": -1}}"#,
        r#"{"parameters": {"config": "{}"}}"#,
        r#"{"parameters": 7}"#,
        r#"[1]"#,
        r#"{"parameters": {"version": "1""#,
        // A key given twice is ambiguous, not read as its last value.
        r#"{"parameters": {"version": "1", "version": "2"}}"#,
        r#"{"parameters": {"version": "1"}, "parameters": {}}"#,
    ] {
        let (s, v) = f.post(&uri, body, Some(TOKEN)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(v["error"].is_string(), "{v}");
    }
    // A version that is not on disk: refused, audited, version 2 still serves.
    let (s, v) = f
        .post(&uri, r#"{"parameters": {"version": "9"}}"#, Some(TOKEN))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"].as_str().unwrap().contains("9"), "{v}");
    let (_, v) = f.infer_version().await;
    assert_eq!(v["model_version"], "2");
    let refused: Vec<AuditRecord> = f
        .audit()
        .await
        .into_iter()
        .filter(|r| r.event.kind == EventKind::ModelRefused)
        .collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].event.version, "9");
    assert_eq!(refused[0].event.actor.as_deref(), Some("admin-token"));
    let index = f.index().await;
    let failed: Vec<&Value> = index.iter().filter(|r| r["state"] != "READY").collect();
    assert_eq!(failed.len(), 1, "{index:?}");
    assert_eq!(failed[0]["version"], "9");
    assert!(failed[0]["refused_at"].is_string());
}

#[tokio::test]
async fn unload_is_audited() {
    let f = Fixture::new(&[1]).await;
    let series = format!("nightingale_queue_depth{{model=\"{MODEL}\",version=\"1\"}}");
    assert_eq!(f.queue_series().await, [series]);
    let (s, _) = f
        .post(
            &format!("/v2/repository/models/{MODEL}/unload"),
            "",
            Some(TOKEN),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = f.infer_version().await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    // Red-team finding: the unloaded version's queue series stayed in /metrics for good.
    assert!(f.queue_series().await.is_empty());
    let last = f.audit().await.pop().unwrap();
    assert_eq!(last.event.kind, EventKind::ModelUnload);
    assert_eq!(last.event.actor.as_deref(), Some("admin-token"));
}

/// Red-team finding: `{"parameters": {"version": "1"}}` on unload was ignored and took every
/// version down. Parameters other than Triton's `unload_dependents` are now refused.
#[tokio::test]
async fn unload_refuses_parameters_it_does_not_take() {
    let f = Fixture::new(&[1, 2]).await;
    let uri = format!("/v2/repository/models/{MODEL}/unload");
    for body in [
        r#"{"parameters": {"version": "1"}}"#,
        r#"{"parameters": {"unload_dependents": true, "x": 1}}"#,
        r#"{"parameters": 3}"#,
        "[]",
        "{",
        // Red-team finding: another repository's name, or a misspelt key, was ignored.
        r#"{"repository_name": "other"}"#,
        r#"{"paramters": {"unload_dependents": true}}"#,
    ] {
        let (s, v) = f.post(&uri, body, Some(TOKEN)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        let (_, v) = f.infer_version().await;
        assert_eq!(v["model_version"], "2", "{body}: still serving");
    }
    // The same on load (a misspelt rollback acted as a plain load) and on the index.
    let load = format!("/v2/repository/models/{MODEL}/load");
    for body in [
        r#"{"repository_name": "other"}"#,
        r#"{"paramters": {"version": "1"}}"#,
    ] {
        let (s, v) = f.post(&load, body, Some(TOKEN)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(
            v["error"].as_str().unwrap().contains("not supported"),
            "{v}"
        );
    }
    let (s, v) = f
        .post(
            "/v2/repository/index",
            r#"{"repository_name": "other"}"#,
            Some(TOKEN),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = f
        .post(
            &uri,
            r#"{"parameters": {"unload_dependents": false}}"#,
            Some(TOKEN),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _) = f.infer_version().await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
}

/// Polls `f` until `check` holds, for at most 30 s.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `chmod` changes a bundle's fingerprint (no modification time changes): a version
/// refused because its model file could not be read is loaded again once it can be (a
/// red-team finding: the poller never saw the fix).
#[cfg(unix)]
#[tokio::test]
async fn a_permission_change_is_a_change_the_poller_sees() {
    use std::os::unix::fs::PermissionsExt as _;
    let f = Fixture::new(&[1]).await;
    let before = f.state.repository.fingerprints();
    let file = f.bundle().join("1").join("model.onnx");
    let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(std::fs::metadata(&file).unwrap().modified().unwrap(), mtime);
    assert_ne!(f.state.repository.fingerprints(), before);
}

/// A bundle folder still there without its `bundle.toml` (a deploy tool deleting and writing
/// it again, a dangling link in its place) keeps serving what it served: it unloaded every
/// version of the model, where a manifest that does not verify is refused and the loaded
/// versions go on (a review's finding). Only the folder's removal unloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_without_its_manifest_for_a_while_keeps_serving() {
    let f = Fixture::new(&[1]).await;
    let seen = f.state.repository.fingerprints();
    let poller = tokio::spawn(nightingale::deploy::poll(
        f.state.clone(),
        Duration::from_millis(100),
        seen,
    ));
    let manifest = f.bundle().join("bundle.toml");
    let aside = f.dir.path().join("bundle.toml.aside");
    std::fs::rename(&manifest, &aside).unwrap();
    // Ten polls without it, then a dangling link for ten more: served all along.
    // Version 1 answers at each of ten polls.
    let serves_for_ten_polls = async || {
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (s, v) = f.infer_version().await;
            assert_eq!(
                (s, v["model_version"].as_str()),
                (StatusCode::OK, Some("1")),
                "{v}"
            );
        }
    };
    serves_for_ten_polls().await;
    std::os::unix::fs::symlink(f.dir.path().join("nowhere"), &manifest).unwrap();
    serves_for_ten_polls().await;
    std::fs::remove_file(&manifest).unwrap();
    std::fs::rename(&aside, &manifest).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (s, v) = f.infer_version().await;
    assert_eq!(
        (s, v["model_version"].as_str()),
        (StatusCode::OK, Some("1")),
        "{v}"
    );
    assert!(
        !f.audit()
            .await
            .iter()
            .any(|r| r.event.kind == EventKind::ModelUnload),
        "unloaded"
    );
    // The folder removed: unloaded, as before.
    let trash = f.dir.path().join("trash");
    std::fs::rename(f.bundle(), &trash).unwrap();
    eventually("the model is unloaded", async || {
        f.infer_version().await.0 == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    poller.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_poller_swaps_a_new_version_in_and_refuses_a_broken_one() {
    let f = Fixture::new(&[1]).await;
    let seen = f.state.repository.fingerprints();
    let poller = tokio::spawn(nightingale::deploy::poll(
        f.state.clone(),
        Duration::from_millis(100),
        seen,
    ));
    let (_, v) = f.infer_version().await;
    assert_eq!(v["model_version"], "1");

    // A broken version 2 (its model file does not match its checksum) appears: refused, 1
    // keeps serving, the index says why.
    let staging = f.dir.path().join("staging");
    copy_dir(
        &root().join("models/bundles").join(MODEL).join("2"),
        &staging,
    );
    let mut onnx = std::fs::read(staging.join("model.onnx")).unwrap();
    onnx[100] ^= 0x01;
    std::fs::write(staging.join("model.onnx"), onnx).unwrap();
    std::fs::rename(&staging, f.bundle().join("2")).unwrap();
    eventually("the broken version is refused", async || {
        f.index().await.iter().any(|r| r["state"] == "UNAVAILABLE")
    })
    .await;
    let index = f.index().await;
    let refused = index.iter().find(|r| r["state"] == "UNAVAILABLE").unwrap();
    assert_eq!(refused["version"], "2");
    let reason = refused["reason"].as_str().unwrap();
    assert!(reason.contains("checksum mismatch"), "{reason}");
    assert!(
        reason.contains(&format!("{MODEL}/2/model.onnx")),
        "{reason}"
    );
    let (s, v) = f.infer_version().await;
    assert_eq!(
        (s, v["model_version"].as_str()),
        (StatusCode::OK, Some("1"))
    );

    // Replaced by the real version 2: swapped in. The broken one leaves in one rename (a
    // deletion file by file could show the poller a half-deleted version, refused again).
    let trash = f.dir.path().join("trash");
    std::fs::rename(f.bundle().join("2"), &trash).unwrap();
    std::fs::remove_dir_all(&trash).unwrap();
    copy_dir(
        &root().join("models/bundles").join(MODEL).join("2"),
        &staging,
    );
    std::fs::rename(&staging, f.bundle().join("2")).unwrap();
    eventually("version 2 serves", async || {
        f.infer_version().await.1["model_version"] == "2"
    })
    .await;
    assert!(f.index().await.iter().all(|r| r["state"] == "READY"));

    // The bundle removed from disk (in one rename, as above): unloaded.
    std::fs::rename(f.bundle(), &trash).unwrap();
    std::fs::remove_dir_all(&trash).unwrap();
    eventually("the model is unloaded", async || {
        f.infer_version().await.0 == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    // The unload's audit record follows the unload itself: wait for it (bounded) rather
    // than read the trail the moment the model stops answering.
    eventually("the unload is audited", async || {
        f.audit()
            .await
            .iter()
            .any(|r| r.event.kind == EventKind::ModelUnload)
    })
    .await;
    poller.abort();

    let records = f.audit().await;
    let by_poller: Vec<(EventKind, String)> = records
        .iter()
        .filter(|r| r.event.actor.as_deref() == Some(nightingale::deploy::POLLER))
        .map(|r| (r.event.kind, r.event.version.clone()))
        .collect();
    assert_eq!(
        by_poller,
        vec![
            (EventKind::ModelRefused, "2".into()),
            (EventKind::ModelLoad, "1".into()),
            (EventKind::ModelLoad, "2".into()),
            // One record per version that stopped serving, with its file's SHA-256.
            (EventKind::ModelUnload, "1".into()),
            (EventKind::ModelUnload, "2".into()),
        ]
    );
    for r in records
        .iter()
        .filter(|r| r.event.kind == EventKind::ModelUnload)
    {
        let v: u64 = r.event.version.parse().unwrap();
        let source = root().join("models/bundles").join(MODEL);
        assert_eq!(r.event.model_sha256, model_sha(&source, v), "{r:?}");
    }
    let refused = records
        .iter()
        .find(|r| r.event.kind == EventKind::ModelRefused)
        .unwrap();
    assert!(
        refused
            .event
            .detail
            .as_deref()
            .unwrap()
            .contains("checksum mismatch")
    );
}

/// Holds the first load of version 1 after `arm` inside the repository's load lock (as a
/// rollback of gigabytes would be held by its reading) until `release`.
#[derive(Default)]
struct Gate {
    state: std::sync::Mutex<(bool, bool, bool)>, // armed, entered, released
    changed: std::sync::Condvar,
}

impl Gate {
    fn check(&self, version: u64) {
        let mut s = self.state.lock().unwrap();
        if !(s.0 && version == 1 && !s.1) {
            return;
        }
        s.1 = true;
        self.changed.notify_all();
        let (s, timeout) = self
            .changed
            .wait_timeout_while(s, Duration::from_secs(30), |s| !s.2)
            .unwrap();
        assert!(!timeout.timed_out() && s.2, "the gate was never released");
    }

    fn set(&self, f: impl FnOnce(&mut (bool, bool, bool))) {
        f(&mut self.state.lock().unwrap());
        self.changed.notify_all();
    }

    fn entered(&self) -> bool {
        self.state.lock().unwrap().1
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poller_reload_queued_behind_a_rollback_does_not_undo_it() {
    let gate = Arc::new(Gate::default());
    let check = gate.clone();
    let f = Fixture::with_promotion(
        &[1, 2],
        Some(PromotionCheck(
            Arc::new(move |_, version, _| {
                check.check(version);
                Ok(())
            }),
            None,
        )),
    )
    .await;
    let repository = f.state.repository.clone();
    assert_eq!(repository.pinned(MODEL), None);
    let poller = tokio::spawn(nightingale::deploy::poll(
        f.state.clone(),
        Duration::from_millis(50),
        repository.fingerprints(),
    ));

    // The operator rolls back to version 1; the rollback is held inside the load lock.
    gate.set(|s| s.0 = true);
    let state = f.state.clone();
    let rollback = tokio::spawn(async move {
        nightingale::deploy::load(&state, MODEL, LoadTarget::Version(1), "admin-token", "-").await
    });
    eventually("the rollback is loading", async || gate.entered()).await;

    // Meanwhile the bundle changes on disk (CI adds a note): the poller sees it stay the same
    // for one interval and asks for a reload, which waits behind the rollback.
    std::fs::write(f.bundle().join("testdata/note.txt"), "new").unwrap();
    eventually(
        "the poller's reload waits behind the rollback",
        async || repository.loads_pending() == 2,
    )
    .await;
    gate.set(|s| s.2 = true);
    let served = rollback.await.unwrap().unwrap();
    assert_eq!(served.iter().map(|m| m.version).collect::<Vec<_>>(), [1]);
    eventually("every load has finished", async || {
        repository.loads_pending() == 0
    })
    .await;
    poller.abort();

    // The rollback stands: pinned, version 1 alone, and nothing loaded by the poller.
    assert_eq!(repository.pinned(MODEL), Some(1));
    let (_, v) = f.infer_version().await;
    assert_eq!(v["model_version"], "1");
    let index = f.index().await;
    let ready: Vec<&Value> = index.iter().filter(|r| r["state"] == "READY").collect();
    assert_eq!(ready.len(), 1, "{index:?}");
    assert_eq!(ready[0]["version"], "1");
    let records = f.audit().await;
    let after_startup: Vec<(EventKind, String, Option<String>)> = records
        .iter()
        .filter(|r| r.event.actor.as_deref() != Some(nightingale::deploy::STARTUP))
        .filter(|r| r.event.kind != EventKind::Inference)
        .map(|r| (r.event.kind, r.event.version.clone(), r.event.actor.clone()))
        .collect();
    assert_eq!(
        after_startup,
        vec![
            (
                EventKind::ModelRollback,
                "1".into(),
                Some("admin-token".into())
            ),
            (
                EventKind::ModelUnload,
                "2".into(),
                Some("admin-token".into())
            ),
        ]
    );

    // The next plain load (an operator's) clears the pin as before.
    let served = repository.load_target(MODEL, LoadTarget::Policy).unwrap();
    assert_eq!(served.iter().map(|m| m.version).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(repository.pinned(MODEL), None);
    // And a poller-style load of an unpinned model loads the policy's versions.
    let served = repository
        .load_target(MODEL, LoadTarget::PolicyUnlessPinned)
        .unwrap();
    assert_eq!(served.iter().map(|m| m.version).collect::<Vec<_>>(), [1, 2]);
}

/// Red-team finding: an operator's unload (a recall) was undone by the repository poller as
/// soon as any file of the bundle changed (a model card edited): the poller reloaded it.
/// Now it stays unloaded, whatever changes on disk, until an operator loads it; the poller's
/// own unload (the bundle left the disk) does not hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_unload_holds_against_the_poller_until_a_load() {
    let f = Fixture::new(&[1]).await;
    let repository = f.state.repository.clone();
    let poller = tokio::spawn(nightingale::deploy::poll(
        f.state.clone(),
        Duration::from_millis(50),
        repository.fingerprints(),
    ));
    let (s, _) = f
        .post(
            &format!("/v2/repository/models/{MODEL}/unload"),
            "",
            Some(TOKEN),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(repository.held(MODEL));
    // A file of the bundle changes: the poller sees it (stable for an interval) and leaves
    // the model unloaded. Its attempt is over once the fingerprint it saw is applied, which
    // the index cannot show: wait for several intervals' worth of polls, bounded.
    std::fs::write(f.bundle().join("testdata/note.txt"), "edited").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(repository.loads_pending(), 0);
    let (s, _) = f.infer_version().await;
    assert_eq!(
        s,
        StatusCode::SERVICE_UNAVAILABLE,
        "the poller reloaded a held model"
    );
    assert!(repository.held(MODEL));
    // The bundle's folder moved away (for more than two polls) and back, as a deployment
    // tool that re-syncs by rename does: still held (a red-team finding: the poller's
    // unload cleared the hold, and the recalled model served again on its return).
    let away = f.dir.path().join("away");
    std::fs::rename(f.bundle(), &away).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    std::fs::rename(&away, f.bundle()).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(repository.loads_pending(), 0);
    assert!(repository.held(MODEL), "the hold was lost");
    let (s, _) = f.infer_version().await;
    assert_eq!(
        s,
        StatusCode::SERVICE_UNAVAILABLE,
        "a recalled model serves again"
    );
    // An operator's load brings it back, and the hold is gone.
    let (s, _) = f
        .post(
            &format!("/v2/repository/models/{MODEL}/load"),
            "",
            Some(TOKEN),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(!repository.held(MODEL));
    let (s, _) = f.infer_version().await;
    assert_eq!(s, StatusCode::OK);
    poller.abort();
    let by_poller = f
        .audit()
        .await
        .into_iter()
        .filter(|r| r.event.actor.as_deref() == Some(nightingale::deploy::POLLER))
        .count();
    assert_eq!(by_poller, 0, "the poller acted on a held model");
}

/// `--require-validation` refused the bundle at start-up for want of a passing report; the
/// report then appears, the bundle's files unchanged: the poller loads it (it waited for a
/// change of the bundle's files that never came: a review's finding, was a README known
/// issue), once per change of the reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_refused_for_want_of_a_report_serves_when_the_report_appears() {
    use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
    let passed = Arc::new(AtomicBool::new(false));
    let reports = Arc::new(AtomicU8::new(0));
    let (p, r) = (passed.clone(), reports.clone());
    let f = Fixture::with_promotion(
        &[1, 2],
        Some(PromotionCheck(
            Arc::new(move |_, _, _| {
                if p.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err("no passing report".into())
                }
            }),
            Some(Arc::new(move || [r.load(Ordering::SeqCst); 32])),
        )),
    )
    .await;
    let repository = f.state.repository.clone();
    assert_eq!(
        repository.awaiting_promotion(),
        [(MODEL.to_owned(), [0; 32])]
    );
    let (s, _) = f.infer_version().await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let poller = tokio::spawn(nightingale::deploy::poll(
        f.state.clone(),
        Duration::from_millis(50),
        repository.fingerprints(),
    ));
    let refusals = || {
        model_events(&f.dir.path().join("audit.jsonl"))
            .into_iter()
            .filter(|(kind, _)| *kind == EventKind::ModelRefused)
            .count()
    };
    let at_start = refusals();
    // A failing report appears: loaded again once, refused again, and not again while the
    // reports stay as they are.
    reports.store(1, Ordering::SeqCst);
    eventually("the refusal is read again", async || {
        repository.awaiting_promotion() == [(MODEL.to_owned(), [1; 32])]
    })
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(repository.loads_pending(), 0);
    assert_eq!(refusals(), at_start + 1, "loaded again once per change");
    // The passing report appears.
    passed.store(true, Ordering::SeqCst);
    reports.store(2, Ordering::SeqCst);
    eventually("the model serves", async || {
        f.infer_version().await.0 == StatusCode::OK
    })
    .await;
    poller.abort();
    assert!(repository.awaiting_promotion().is_empty());
    let (s, v) = f.infer_version().await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["model_version"], "2", "{v}");
    let by_poller = f
        .audit()
        .await
        .into_iter()
        .filter(|r| {
            r.event.actor.as_deref() == Some(nightingale::deploy::POLLER)
                && r.event.kind != EventKind::Inference
        })
        .map(|r| (r.event.kind, r.event.version, r.event.outcome))
        .collect::<Vec<_>>();
    assert_eq!(
        by_poller,
        [
            (EventKind::ModelRefused, "1".into(), Outcome::Rejected),
            (EventKind::ModelLoad, "1".into(), Outcome::Ok),
            (EventKind::ModelLoad, "2".into(), Outcome::Ok),
        ]
    );
}

/// Writes `release = n` into the bundle's manifest; signs it with the demo key when `sign`,
/// else removes its signature.
fn set_release(bundle: &Path, n: u64, sign: bool) {
    let manifest = bundle.join("bundle.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let text = match text.find("\nrelease = ") {
        Some(at) => {
            let end = at + 1 + text[at + 1..].find('\n').unwrap();
            format!("{}\nrelease = {n}{}", &text[..at], &text[end..])
        }
        None => text.replacen(
            &format!("name = \"{MODEL}\"\n"),
            &format!("name = \"{MODEL}\"\nrelease = {n}\n"),
            1,
        ),
    };
    std::fs::write(&manifest, text).unwrap();
    if sign {
        let key = nightingale_models::SigningKey::from_file(
            &root().join("keys/demo/nightingale-demo.key"),
            None,
        )
        .unwrap();
        nightingale_models::Bundle::open(bundle)
            .unwrap()
            .sign(&key)
            .unwrap();
    } else {
        match std::fs::remove_file(bundle.join("bundle.toml.minisig")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("{e}"),
            _ => {}
        }
    }
}

fn sign_release(bundle: &Path, n: u64) {
    set_release(bundle, n, true);
}

/// Red-team finding: the release ledger could not be read for a moment (a full or read-only
/// data volume) and the poller gave up on the new release for good. It is tried again, and
/// serves once the ledger can be read; the refusal's reason does not show the data folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_refused_for_an_unreadable_ledger_is_tried_again() {
    let f = Fixture::with(&[1, 2], None, |b| sign_release(b, 2), true).await;
    let repository = f.state.repository.clone();
    let ledger_path = f.dir.path().join("data/releases.json");
    let ledger = nightingale_models::releases::ReleaseLedger::open(&ledger_path).unwrap();
    assert_eq!(ledger.accepted(MODEL).unwrap().release, 2);
    let poller = tokio::spawn(nightingale::deploy::poll(
        f.state.clone(),
        Duration::from_millis(50),
        repository.fingerprints(),
    ));
    let saved = std::fs::read(&ledger_path).unwrap();
    std::fs::remove_file(&ledger_path).unwrap();
    std::fs::create_dir(&ledger_path).unwrap();
    sign_release(&f.bundle(), 3);
    let data = f.dir.path().join("data").display().to_string();
    eventually("the refusal is in the index", async || {
        f.index().await.iter().any(|e| {
            e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("releases.json"))
        })
    })
    .await;
    let index = f.index().await;
    assert!(
        !Value::from(index.clone()).to_string().contains(&data),
        "{index:?}"
    );
    let (status, _) = f.infer_version().await;
    assert_eq!(status, StatusCode::OK, "release 2 keeps serving");
    std::fs::remove_dir(&ledger_path).unwrap();
    std::fs::write(&ledger_path, saved).unwrap();
    eventually("release 3 serves once the ledger can be read", async || {
        ledger.accepted(MODEL).is_some_and(|a| a.release == 3)
    })
    .await;
    poller.abort();
}

/// Red-team finding: where signatures are trusted but not required, an unsigned manifest
/// declaring release 2^63 - 1 raised the floor, and every later signed release was refused
/// as older. An unsigned manifest is held to the floor but does not raise it.
#[tokio::test]
async fn an_unsigned_manifest_does_not_raise_the_release_floor() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let bundle = repo.join(MODEL);
    copy_dir(&root().join("models/bundles").join(MODEL), &bundle);
    sign_release(&bundle, 2);
    let ledger = Arc::new(
        nightingale_models::releases::ReleaseLedger::open(&dir.path().join("releases.json"))
            .unwrap(),
    );
    let repository = Repository::new(
        &repo,
        RepositoryOptions {
            releases: Some(ledger.clone()),
            signatures: SignaturePolicy::load(
                &[root().join("keys/demo/nightingale-demo.pub")],
                false,
            )
            .unwrap(),
            ..RepositoryOptions::default()
        },
    );
    repository.load(MODEL).unwrap();
    assert_eq!(ledger.accepted(MODEL).unwrap().release, 2);
    set_release(&bundle, i64::MAX as u64, false);
    repository
        .load(MODEL)
        .expect("unsigned manifests serve here");
    assert_eq!(ledger.accepted(MODEL).unwrap().release, 2);
    // Held to the floor all the same.
    set_release(&bundle, 1, false);
    let e = repository.load(MODEL).unwrap_err().to_string();
    assert!(e.contains("older than release 2"), "{e}");
    sign_release(&bundle, 3);
    repository.load(MODEL).expect("the signed release 3 serves");
    assert_eq!(ledger.accepted(MODEL).unwrap().release, 3);
}

/// Red-team finding: an operator unloaded a model, asked for it back, and the load was
/// refused for a bad file; once the file was fixed the poller left the model unloaded for
/// good ("held until the next load"). An operator's plain load lifts the hold whatever its
/// outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_load_that_fails_lifts_the_hold() {
    let f = Fixture::new(&[1]).await;
    let repository = f.state.repository.clone();
    let poller = tokio::spawn(nightingale::deploy::poll(
        f.state.clone(),
        Duration::from_millis(50),
        repository.fingerprints(),
    ));
    let uri = |what: &str| format!("/v2/repository/models/{MODEL}/{what}");
    let (s, _) = f.post(&uri("unload"), "", Some(TOKEN)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(repository.held(MODEL));
    let metrics = f.bundle().join("1/metrics.json");
    let good = std::fs::read(&metrics).unwrap();
    std::fs::write(&metrics, "{}").unwrap();
    let (s, body) = f.post(&uri("load"), "", Some(TOKEN)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(!repository.held(MODEL), "the operator's load left the hold");
    std::fs::write(&metrics, good).unwrap();
    eventually("the fixed bundle serves again", async || {
        f.infer_version().await.0 == StatusCode::OK
    })
    .await;
    poller.abort();
}

/// Red-team finding: an older signed manifest put back served again. Through model control:
/// refused (the newer release keeps serving, the refusal audited) until an admin loads it
/// with `{"parameters": {"release": "N"}}`, which the load's record names.
#[tokio::test]
async fn an_older_release_put_back_needs_an_admin_s_explicit_release() {
    let f = Fixture::with(&[1, 2], None, |b| sign_release(b, 2), true).await;
    let (status, _) = f.infer_version().await;
    assert_eq!(status, StatusCode::OK);
    sign_release(&f.bundle(), 1);
    let load = format!("/v2/repository/models/{MODEL}/load");
    let (status, body) = f.post(&load, "", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("release 1, older than release 2")),
        "{body}"
    );
    let (status, _) = f.infer_version().await;
    assert_eq!(status, StatusCode::OK, "release 2 keeps serving");
    let (status, body) = f
        .post(&load, r#"{"parameters": {"release": "1"}}"#, Some(TOKEN))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let records = f.audit().await;
    assert!(records.iter().any(|r| {
        r.event.kind == EventKind::ModelRefused
            && r.event
                .detail
                .as_deref()
                .is_some_and(|d| d.contains("older than release 2"))
    }));
    assert!(records.iter().any(|r| {
        r.event.kind == EventKind::ModelLoad
            && r.event
                .detail
                .as_deref()
                .is_some_and(|d| d.contains("release=1; release chosen by the operator"))
    }));
    // A bad release parameter is refused before anything loads.
    let (status, _) = f
        .post(&load, r#"{"parameters": {"release": "0"}}"#, Some(TOKEN))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// Red-team finding: a rollback's pin lived in memory only, and a restart served the
/// version rolled back from again. With the server's pins kept in its data folder, a
/// restart serves the pinned version (audited as a rollback by `startup`); a plain load
/// lifts the pin for good. An unload in between keeps the pin, and the index says so (it
/// said "not pinned" while the restart served the pin: a review's finding).
#[tokio::test]
async fn a_rollback_holds_across_a_restart_until_a_plain_load() {
    let mut f = Fixture::with(&[1, 2], None, |_| {}, true).await;
    let uri = format!("/v2/repository/models/{MODEL}/load");
    let (s, v) = f
        .post(&uri, r#"{"parameters": {"version": "1"}}"#, Some(TOKEN))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let unload = format!("/v2/repository/models/{MODEL}/unload");
    let (s, v) = f.post(&unload, "", Some(TOKEN)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let index = f.index().await;
    assert_eq!(index.len(), 1, "{index:?}");
    assert_eq!(
        (&index[0]["state"], &index[0]["pinned"]),
        (&json!("UNLOADED"), &json!(true)),
        "{index:?}"
    );
    // restart (its own audit trail: the first server's is still held): the pinned version
    // alone, pinned
    f.state = Fixture::start(f.dir.path(), None, true, "audit-2.jsonl").await;
    let (_, v) = f.infer_version().await;
    assert_eq!(v["model_version"], "1");
    let index = f.index().await;
    assert_eq!(index.len(), 1, "{index:?}");
    assert_eq!(index[0]["pinned"], true, "{index:?}");
    let startup = model_events(&f.dir.path().join("audit-2.jsonl"));
    assert_eq!(
        startup,
        vec![(EventKind::ModelRollback, "1".to_owned())],
        "{startup:?}"
    );
    // a plain load lifts it, and the next restart serves the policy's versions
    let (s, _) = f.post(&uri, "", Some(TOKEN)).await;
    assert_eq!(s, StatusCode::OK);
    f.state = Fixture::start(f.dir.path(), None, true, "audit-3.jsonl").await;
    let (_, v) = f.infer_version().await;
    assert_eq!(v["model_version"], "2");
    assert_eq!(f.index().await.len(), 2);
}

/// A review's finding: a rollback's pin kept across a restart held only when its version
/// loaded at start-up. With the pinned version's folder away at the restart (a deployment
/// tool moving it, the bundle moved aside and back), the poller later loaded the policy's
/// versions, the one rolled back from included. The pin holds: the pinned version alone is
/// loaded when its files are back, and the poller leaves it alone after.
#[tokio::test]
async fn a_pin_whose_version_did_not_load_at_start_up_still_holds() {
    let mut f = Fixture::with(&[1, 2], None, |_| {}, true).await;
    let uri = format!("/v2/repository/models/{MODEL}/load");
    let (s, v) = f
        .post(&uri, r#"{"parameters": {"version": "1"}}"#, Some(TOKEN))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let v1 = f.bundle().join("1");
    let aside = f.dir.path().join("v1-aside");
    std::fs::rename(&v1, &aside).unwrap();
    f.state = Fixture::start(f.dir.path(), None, true, "audit-2.jsonl").await;
    let (s, v) = f.infer_version().await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    // The index says what keeps it unavailable: the pin.
    let index = f.index().await;
    assert_eq!(index.len(), 1, "{index:?}");
    assert_eq!(index[0]["pinned"], true, "{index:?}");
    std::fs::rename(&aside, &v1).unwrap();
    // What the poller does once the bundle's files changed.
    let poll = |state: Arc<AppState>| async move {
        nightingale::deploy::load(
            &state,
            MODEL,
            LoadTarget::PolicyUnlessPinned,
            nightingale::deploy::POLLER,
            "-",
        )
        .await
    };
    poll(f.state.clone()).await.unwrap();
    let (_, v) = f.infer_version().await;
    assert_eq!(v["model_version"], "1");
    let index = f.index().await;
    assert_eq!(index.len(), 1, "{index:?}");
    assert_eq!(index[0]["pinned"], true, "{index:?}");
    assert!(poll(f.state.clone()).await.is_err());
    assert_eq!(f.index().await.len(), 1);
    // Audited as the rollback's return, as start-up records it.
    let kinds = model_events(&f.dir.path().join("audit-2.jsonl"));
    assert_eq!(
        kinds,
        vec![
            (EventKind::ModelRefused, "1".to_owned()),
            (EventKind::ModelRollback, "1".to_owned())
        ],
        "{kinds:?}"
    );
}

/// A re-attack's finding: a rollback whose pin could not be written (a full or read-only
/// data folder) was answered 200, and a restart then served the version rolled back from.
/// It is refused (503) as a release the ledger cannot record is, and what served serves on.
#[tokio::test]
async fn a_rollback_whose_pin_cannot_be_kept_is_refused_and_changes_nothing() {
    let f = Fixture::with(&[1, 2], None, |_| {}, true).await;
    let pins = f.dir.path().join("data/pins.json");
    let _ = std::fs::remove_file(&pins);
    std::fs::create_dir(&pins).unwrap(); // not a file: the pin cannot be written
    let uri = format!("/v2/repository/models/{MODEL}/load");
    let (s, v) = f
        .post(&uri, r#"{"parameters": {"version": "1"}}"#, Some(TOKEN))
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(
        v.to_string().contains("rollback pin could not be kept"),
        "{v}"
    );
    // Both versions serve, unpinned; the index shows the refusal beside them.
    let index = f.index().await;
    let ready: Vec<&Value> = index.iter().filter(|r| r["state"] == "READY").collect();
    assert_eq!(ready.len(), 2, "{index:?}");
    assert!(index.iter().all(|r| r["pinned"] != true), "{index:?}");
    let (_, v) = f.infer_version().await;
    assert_eq!(v["model_version"], "2");
}
