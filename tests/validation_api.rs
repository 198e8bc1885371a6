//! Validation runs over HTTP (issue 11): `POST /validation/runs` with a dataset under the
//! server's validation root (JSON) or uploaded (text/csv), `GET /validation/runs/{id}` until
//! done, the report served, predictions in the server's audit trail with the caller as
//! actor; one run per model at a time; hostile requests (paths out of the root, oversized
//! and empty uploads, wrong types, unknown fields and models) refused with their reason.
//! The expected AUROC is the one the training script measured with scikit-learn on the same
//! test split (the bundle's metrics.json).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use nightingale::audit::AuditLog;
use nightingale::config::ServeArgs;
use nightingale::http::{self, AppState, HttpConfig};
use nightingale_models::{Repository, RepositoryOptions};
use serde_json::{Value, json};
use sha2::Digest;
use tower::ServiceExt;

mod support;
use support::copy_dir;

const MODEL: &str = "wdbc-malignancy";
const UPLOAD_LIMIT: u64 = 64 << 10;
/// The API key of a second researcher (added to the fixtures' configuration).
const OTHER_RESEARCHER: &str = "another-researcher-key-0123456789abcdef";

fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn key(role: &str) -> String {
    let keys: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_dir().join("tests/fixtures/auth/api_keys.json")).unwrap(),
    )
    .unwrap();
    keys[role].as_str().unwrap().to_owned()
}

struct Server {
    dir: Arc<tempfile::TempDir>,
    state: Arc<AppState>,
}

impl Server {
    fn new() -> Server {
        Server::with_max_run(http::validation::DEFAULT_MAX_RUN)
    }

    /// A server whose validation runs stop after `max_run`.
    fn with_max_run(max_run: Duration) -> Server {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(
            &repo_dir().join("models/bundles").join(MODEL),
            &dir.path().join("repo").join(MODEL),
        );
        Server::on(Arc::new(dir), "audit.jsonl", max_run)
    }

    /// The same server started again on its folders (what it kept on disk, nothing else;
    /// an audit trail of its own, as the first one may still hold its own).
    fn restarted(&self) -> Server {
        let audit = format!("audit-{}.jsonl", uuid::Uuid::new_v4());
        Server::on(self.dir.clone(), &audit, http::validation::DEFAULT_MAX_RUN)
    }

    /// A server on `dir` (its repository already there) writing its audit trail to `audit`.
    fn on(dir: Arc<tempfile::TempDir>, audit: &str, max_run: Duration) -> Server {
        let repo = dir.path().join("repo");
        let repository = Arc::new(Repository::new(&repo, RepositoryOptions::default()));
        repository.load_all().unwrap();
        let audit = AuditLog::open(&dir.path().join(audit), false).unwrap();
        // The fixtures' keys, and a second researcher's.
        let fixtures = repo_dir().join("tests/fixtures/auth");
        for f in ["nightingale.toml", "jwks.json"] {
            std::fs::copy(fixtures.join(f), dir.path().join(f)).unwrap();
        }
        let mut config = std::fs::read_to_string(dir.path().join("nightingale.toml")).unwrap();
        let digest = sha2::Sha256::digest(OTHER_RESEARCHER.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        config = config.replacen(
            "[auth.jwt]",
            &format!(
                "[[auth.api_keys]]\nname = \"other-researcher\"\nrole = \"researcher\"\nsha256 = \"{hex}\"\n\n[auth.jwt]"
            ),
            1,
        );
        std::fs::write(dir.path().join("nightingale.toml"), config).unwrap();
        let auth = ServeArgs {
            config: Some(dir.path().join("nightingale.toml")),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap()
        .auth;
        let state = AppState::new(
            repository,
            audit,
            HttpConfig {
                auth,
                ..HttpConfig::default()
            },
            None,
        );
        state.set_ready(true);
        let root = dir.path().join("datasets");
        if !root.exists() {
            std::fs::create_dir_all(root.join("sub")).unwrap();
            std::fs::copy(test_csv(), root.join("sub/test.csv")).unwrap();
            std::fs::write(dir.path().join("outside.csv"), "label\n1\n").unwrap();
            std::os::unix::fs::symlink(dir.path().join("outside.csv"), root.join("escape.csv"))
                .unwrap();
        }
        let validation = http::validation::Validation::new(
            Some(root),
            &dir.path().join("data"),
            UPLOAD_LIMIT,
            RepositoryOptions::default(),
        )
        .with_max_run(max_run);
        validation.remove_abandoned_uploads();
        validation.restore_runs();
        state.set_validation(validation);
        Server { dir, state }
    }

    async fn send(&self, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
        let res = http::app(self.state.clone()).oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
        (status, headers, v)
    }

    async fn post_json(&self, body: Value) -> (StatusCode, Value) {
        let req = Request::post("/validation/runs")
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", key("researcher")),
            )
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let (s, _, v) = self.send(req).await;
        (s, v)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.get_as(&key("researcher"), path).await
    }

    async fn get_as(&self, key: &str, path: &str) -> (StatusCode, Value) {
        let req = Request::get(path)
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .body(Body::empty())
            .unwrap();
        let (s, _, v) = self.send(req).await;
        (s, v)
    }

    /// The ids `GET /validation/runs` lists for the caller of `key`, newest first.
    async fn listed(&self, key: &str) -> Vec<String> {
        let (s, v) = self.get_as(key, "/validation/runs").await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Starts a run that keeps its model busy (a long bootstrap); its id.
    async fn start_long_run(&self) -> String {
        let (s, v) = self
            .post_json(json!({"model": MODEL, "dataset": "sub/test.csv", "bootstrap": 400000}))
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        v["id"].as_str().unwrap().to_owned()
    }

    /// A run stopped before its end has no report, and its model takes another run at once:
    /// that run's id.
    async fn assert_no_report_and_model_free(&self, id: &str) -> String {
        let (s, _) = self
            .get(&format!("/validation/runs/{id}/report.json"))
            .await;
        assert_eq!(s, StatusCode::CONFLICT);
        let (s, v) = self
            .post_json(json!({"model": MODEL, "dataset": "sub/test.csv", "bootstrap": 0}))
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "the model is free at once: {v}");
        v["id"].as_str().unwrap().to_owned()
    }

    /// Waits (bounded) until a stopped run's thread has ended, then checks it left no
    /// report in its folder.
    async fn assert_ends_without_a_report(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let (s, v) = self.get(&format!("/validation/runs/{id}")).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            if v["ended"] == true {
                break;
            }
            assert!(Instant::now() < deadline, "run {id} never ended: {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let run = self.dir.path().join("data/validation/runs").join(id);
        for file in ["report.json", "report.html"] {
            assert!(!run.join(file).exists(), "{id}: {file} kept");
        }
    }

    /// Polls a run until it is no longer running (bounded).
    async fn wait(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let (s, v) = self.get(&format!("/validation/runs/{id}")).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            if v["status"] != "running" {
                return v;
            }
            assert!(Instant::now() < deadline, "run {id} still running: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn test_csv() -> PathBuf {
    repo_dir()
        .join("models/bundles")
        .join(MODEL)
        .join("testdata/test.csv")
}

/// scikit-learn's AUROC of version 1 on the test split, from the training script.
fn sklearn_auroc() -> f64 {
    let m: Value = serde_json::from_str(
        &std::fs::read_to_string(
            repo_dir()
                .join("models/bundles")
                .join(MODEL)
                .join("1/metrics.json"),
        )
        .unwrap(),
    )
    .unwrap();
    m["test"]["auroc"]["value"].as_f64().unwrap()
}

fn audit_records(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn a_run_on_a_server_side_dataset_reports_scikit_learns_auroc_and_is_audited() {
    let metrics = http::install_recorder();
    let server = Server::new();
    let (s, v) = server
        .post_json(
            json!({"model": format!("{MODEL}@1"), "dataset": "sub/test.csv", "bootstrap": 100}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(v["status"], "running");
    let done = server.wait(&id).await;
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!(done["gate_passed"], true, "{done}");
    assert_eq!(done["progress"]["rows"], 114);
    let (s, report) = server.get(done["report"]["json"].as_str().unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert!((report["auroc"]["value"].as_f64().unwrap() - sklearn_auroc()).abs() < 1e-9);
    assert_eq!(report["model"]["version"], 1);
    // The dataset by the name it was given, not where the server keeps it; a dataset under
    // --validation-root is the operator's file, but a researcher's run of it (their options)
    // is theirs: it does not count for --require-validation.
    assert_eq!(
        report["dataset"]["path"], "sub/test.csv",
        "{}",
        report["dataset"]
    );
    assert_eq!(report["dataset"]["origin"], "researcher");
    let (s, html) = server.get(done["report"]["html"].as_str().unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert!(html.as_str().unwrap().contains("<svg"));
    let root = server.dir.path().display().to_string();
    assert!(!html.as_str().unwrap().contains(&root));
    assert!(!report.to_string().contains(&root), "{report}");
    // every prediction in the server's trail, with the caller as actor
    let records = audit_records(server.dir.path());
    let rows: u64 = records
        .iter()
        .filter(|r| r["kind"] == "inference" && r["actor"] == "api-key:researcher-client")
        .map(|r| r["rows"].as_u64().unwrap())
        .sum();
    assert_eq!(rows, 114);
    // The run's records and its report carry the run's id (a red-team finding: the records
    // carried a UUID of their own, and nothing tied them to the run).
    assert_eq!(report["run_id"], id.as_str());
    let of_run: u64 = records
        .iter()
        .filter(|r| {
            r["request_id"]
                .as_str()
                .is_some_and(|q| q.starts_with(&format!("validate-{id}-")))
        })
        .map(|r| r["rows"].as_u64().unwrap())
        .sum();
    assert_eq!(of_run, 114);
    // The run's copy of the model is told apart from the served model in the metrics (its
    // batches counted as the served model's), and sets no queue gauge (a gauge outlives it).
    let text = metrics.render();
    let copy = format!(
        "nightingale_batch_rows_sum{{model=\"{MODEL}\",version=\"1\",purpose=\"validation\"}} 114"
    );
    assert!(text.contains(&copy), "{text}");
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("nightingale_queue_depth{") && l.contains("purpose")),
        "{text}"
    );
}

#[tokio::test]
async fn an_uploaded_dataset_is_validated_then_deleted() {
    let server = Server::new();
    let csv = std::fs::read(test_csv()).unwrap();
    let upload = |query: &str| {
        Request::post(format!("/validation/runs?{query}"))
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", key("researcher")),
            )
            .header(header::CONTENT_TYPE, "text/csv; charset=utf-8")
            .body(Body::from(csv.clone()))
            .unwrap()
    };
    // An option given twice is refused (the last one was taken: a review's finding).
    let (s, _, v) = server
        .send(upload(&format!("model={MODEL}&bootstrap=1&bootstrap=2")))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"].as_str().unwrap().contains("given twice"), "{v}");
    // A CSV declared in another character set than UTF-8 is refused up front (415), not
    // accepted and then failed on its first accented byte.
    // So is one whose charset cannot be told (given twice, quoted past a `;`).
    for declared in [
        "text/csv; charset=\"ISO-8859-1\"",
        "text/csv; charset=utf-8; charset=latin1",
        "text/csv; charset=\"utf-8;latin1\"",
        "text/csv; header=\"a;charset=utf-8\"; charset=latin1",
    ] {
        let mut latin1 = upload(&format!("model={MODEL}"));
        latin1
            .headers_mut()
            .insert(header::CONTENT_TYPE, declared.parse().unwrap());
        let (s, _, v) = server.send(latin1).await;
        assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{declared}: {v}");
    }
    // No version asked: the run names the one it evaluated once done (it stayed null).
    let (s, h, v) = server
        .send(upload(&format!("model={MODEL}&bootstrap=50&seed=3")))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(h[header::LOCATION], format!("/validation/runs/{id}"));
    let done = server.wait(&id).await;
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!(done["version"], 2, "{done}");
    let run_dir = server.dir.path().join("data/validation/runs").join(&id);
    assert!(run_dir.join("report.json").is_file());
    assert!(
        !run_dir.join("dataset.csv").exists(),
        "the upload must not be kept"
    );
    // the run's folder (the upload's while it ran) is its owner's only (a red-team finding)
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&run_dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{mode:o}");
    let (_, report) = server
        .get(&format!("/validation/runs/{id}/report.json"))
        .await;
    assert_eq!(report["model"]["version"], 2);
    assert_eq!(report["settings"]["seed"], 3);
    // The page runs no script and loads nothing, whatever its text.
    let req = Request::get(format!("/validation/runs/{id}/report.html"))
        .header(
            header::AUTHORIZATION,
            format!("Bearer {}", key("researcher")),
        )
        .body(Body::empty())
        .unwrap();
    let (s, h, page) = server.send(req).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h[header::CONTENT_TYPE], "text/html; charset=utf-8");
    let policy = h[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(
        policy.starts_with("default-src 'none';") && policy.contains("sandbox"),
        "{policy}"
    );
    assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    assert!(
        page.as_str().unwrap().contains("<svg") && !page.as_str().unwrap().contains("<script"),
        "the report is self-contained and script-free"
    );
    // An upload's report says so: the deployment gate does not count it.
    assert_eq!(report["dataset"]["origin"], "upload");
}

/// Red-team finding: a server killed while it received or ran an upload left the dataset
/// (patient data, up to the upload limit) on disk for good. At start-up the uploads no
/// process holds are deleted: only in a run folder of the server's making (named by its
/// UUID, holding the owner lock made before the upload), only the upload's file, and the
/// folder only when nothing else is left; a folder another server on the same data folder
/// holds is left alone, and so is everything else (re-attacks' findings: runs in progress,
/// a `validate --out` folder's own `dataset.csv` and audit trail, an operator's notes were
/// deleted, and a lock created through a link).
#[test]
fn uploads_left_by_a_killed_server_are_deleted_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("data/validation/runs");
    let id = |n: u8| format!("00000000-0000-4000-8000-0000000000{n:02}");
    let upload = |name: &str, report: bool| {
        let d = runs.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(".owner.lock"), b"").unwrap();
        std::fs::write(d.join("dataset.csv"), b"mean radius,label\n1,1\n").unwrap();
        if report {
            std::fs::write(d.join("report.json"), b"{}").unwrap();
        }
        d
    };
    let cut_off = upload(&id(1), false);
    let ran = upload(&id(2), true);
    let held = upload(&id(3), false);
    // Cut off after its run wrote its audit trail: the upload goes, the rest stays.
    let partial = upload(&id(4), false);
    std::fs::write(partial.join("audit.jsonl"), b"").unwrap();
    // Not uploads of this server: a `validate --out` folder with its own dataset.csv, one
    // named like a run but without the owner lock, one whose lock is a link.
    let pipeline = runs.join("pima-1-ci");
    std::fs::create_dir_all(&pipeline).unwrap();
    std::fs::write(pipeline.join("dataset.csv"), b"op").unwrap();
    std::fs::write(pipeline.join("audit.jsonl"), b"").unwrap();
    let unlocked = runs.join(id(5));
    std::fs::create_dir_all(&unlocked).unwrap();
    std::fs::write(unlocked.join("dataset.csv"), b"op").unwrap();
    let linked = runs.join(id(6));
    std::fs::create_dir_all(&linked).unwrap();
    std::fs::write(linked.join("dataset.csv"), b"op").unwrap();
    let elsewhere = dir.path().join("elsewhere");
    std::os::unix::fs::symlink(&elsewhere, linked.join(".owner.lock")).unwrap();
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(held.join(".owner.lock"))
        .unwrap();
    lock.try_lock().unwrap();
    let validation = http::validation::Validation::new(
        None,
        &dir.path().join("data"),
        UPLOAD_LIMIT,
        RepositoryOptions::default(),
    );
    assert_eq!(validation.remove_abandoned_uploads(), 3);
    assert!(!cut_off.exists());
    assert!(!ran.join("dataset.csv").exists());
    assert!(ran.join("report.json").is_file());
    assert!(held.join("dataset.csv").is_file());
    assert!(!partial.join("dataset.csv").exists());
    assert!(partial.join("audit.jsonl").is_file());
    assert!(pipeline.join("dataset.csv").is_file());
    assert!(unlocked.join("dataset.csv").is_file());
    assert!(linked.join("dataset.csv").is_file());
    assert!(!elsewhere.exists());
    drop(lock);
    assert_eq!(validation.remove_abandoned_uploads(), 1);
    assert!(!held.exists());
}

/// An upload that never becomes a run leaves nothing on disk (it may hold patient data):
/// a body cut off, a client gone mid-body, options refused after the upload.
#[tokio::test]
async fn an_upload_that_never_runs_leaves_nothing_behind() {
    use futures_util::StreamExt;
    let server = Server::new();
    let runs = server.dir.path().join("data/validation/runs");
    let leftovers = || {
        std::fs::read_dir(&runs)
            .map(|d| d.count())
            .unwrap_or_default()
    };
    let upload = |body: Body, query: &str| {
        Request::post(format!("/validation/runs?model={MODEL}{query}"))
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", key("researcher")),
            )
            .header(header::CONTENT_TYPE, "text/csv")
            .body(body)
            .unwrap()
    };
    let head = std::fs::read(test_csv()).unwrap()[..2000].to_vec();

    // Cut off: the stream fails after part of the dataset.
    let cut = futures_util::stream::iter([
        Ok::<_, std::io::Error>(bytes::Bytes::from(head.clone())),
        Err(std::io::Error::other("connection reset")),
    ]);
    let (s, _, v) = server.send(upload(Body::from_stream(cut), "")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(leftovers(), 0, "a cut upload's folder is removed");

    // The client goes mid-body: the request is dropped while its body is awaited.
    let stalled =
        futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(head.clone()))])
            .chain(futures_util::stream::pending());
    let gone = tokio::time::timeout(
        Duration::from_millis(300),
        server.send(upload(Body::from_stream(stalled), "")),
    )
    .await;
    assert!(gone.is_err(), "the body never ends");
    assert_eq!(leftovers(), 0, "an abandoned upload's folder is removed");

    // Options refused once the upload is in: a subgroup column named twice.
    let (s, _, v) = server
        .send(upload(Body::from(head), "&subgroup=site,site"))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"].as_str().unwrap().contains("named twice"), "{v}");
    assert_eq!(leftovers(), 0);
}

/// Red-team finding: an upload was received whole (and written to disk) before its run was
/// refused: 20 concurrent uploads for a model that does not exist were all stored before their
/// 404s, and a busy model's 409 came only after the body. Now an unknown model, a model with a
/// run going, or too many runs working are answered before the body is read: a body that
/// never ends gets its answer at once.
#[tokio::test]
async fn an_upload_that_could_not_run_is_refused_before_its_body_is_read() {
    use futures_util::StreamExt;
    let server = Server::new();
    let runs = server.dir.path().join("data/validation/runs");
    let endless = || {
        Body::from_stream(
            futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(
                b"a,b\n",
            ))])
            .chain(futures_util::stream::pending()),
        )
    };
    let upload = |model: &str| {
        Request::post(format!("/validation/runs?model={model}"))
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", key("researcher")),
            )
            .header(header::CONTENT_TYPE, "text/csv")
            .body(endless())
            .unwrap()
    };
    let answer = tokio::time::timeout(
        Duration::from_secs(20),
        server.send(upload("no-such-model")),
    )
    .await
    .expect("answered without reading the body");
    assert_eq!(answer.0, StatusCode::NOT_FOUND, "{}", answer.2);
    // A run of the model going: 409 at once.
    let (s, v) = server
        .post_json(json!({"model": MODEL, "dataset": "sub/test.csv", "bootstrap": 400000}))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let answer = tokio::time::timeout(Duration::from_secs(20), server.send(upload(MODEL)))
        .await
        .expect("answered without reading the body");
    assert_eq!(answer.0, StatusCode::CONFLICT, "{}", answer.2);
    // Nothing of either upload was written (the running run may or may not have made its
    // own folder yet).
    let uploads = std::fs::read_dir(&runs)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().join("dataset.csv").exists())
                .count()
        })
        .unwrap_or(0);
    assert_eq!(uploads, 0, "an upload was written");
    server.wait(&id).await;
}

#[tokio::test]
async fn one_run_per_model_at_a_time() {
    let server = Server::new();
    // a long bootstrap keeps the first run busy while the second is asked for
    let (s, v) = server
        .post_json(json!({"model": MODEL, "dataset": "sub/test.csv", "bootstrap": 400000}))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let (s, v) = server
        .post_json(json!({"model": MODEL, "dataset": "sub/test.csv", "bootstrap": 0}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    // the model named, not the run's id (it may be another researcher's)
    let error = v["error"].as_str().unwrap();
    assert!(error.contains(MODEL) && !error.contains(&id), "{v}");
    assert_eq!(server.wait(&id).await["status"], "done");
    let (s, v) = server
        .post_json(json!({"model": MODEL, "dataset": "sub/test.csv", "bootstrap": 0}))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    server.wait(v["id"].as_str().unwrap()).await;
}

/// `DELETE /validation/runs/{id}` cancels a running run: it reads `cancelled` at once (with
/// who asked), the model takes another run at once, the cancelled run keeps that state and
/// has no report; a run that has ended or does not exist cannot be cancelled.
#[tokio::test]
async fn a_running_run_can_be_cancelled_and_frees_its_model() {
    let server = Server::new();
    let delete = |id: &str| {
        Request::delete(format!("/validation/runs/{id}"))
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", key("researcher")),
            )
            .body(Body::empty())
            .unwrap()
    };
    let id = server.start_long_run().await;
    let (s, _, v) = server.send(delete(&id)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "cancelled", "{v}");
    assert_eq!(v["error"], "cancelled by api-key:researcher-client", "{v}");
    assert!(v["report"].is_null(), "{v}");
    let (s, _, v) = server.send(delete(&id)).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let second = server.assert_no_report_and_model_free(&id).await;
    assert_eq!(server.wait(&second).await["status"], "done");
    let (s, _, v) = server.send(delete(&second)).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(server.wait(&id).await["status"], "cancelled");
    let (s, _, _) = server
        .send(delete("00000000-0000-0000-0000-000000000000"))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // The cancelled run's thread finishes its bootstrap, then keeps no report (a passing one
    // left on disk would count for --require-validation).
    server.assert_ends_without_a_report(&id).await;
}

/// A run still going at the server's limit (`--validation-max-run-secs`) stops as a
/// cancelled one does: it reads `failed` with the limit named, has no report, and its model
/// takes another run at once.
#[tokio::test]
async fn a_run_past_the_servers_limit_is_stopped_and_frees_its_model() {
    let server = Server::with_max_run(Duration::from_millis(300));
    let id = server.start_long_run().await;
    let v = server.wait(&id).await;
    assert_eq!(v["status"], "failed", "{v}");
    let error = v["error"].as_str().unwrap();
    assert!(
        error.contains("--validation-max-run-secs") && error.starts_with("stopped after 0 s"),
        "{v}"
    );
    assert!(v["report"].is_null(), "{v}");
    let next = server.assert_no_report_and_model_free(&id).await;
    server.wait(&next).await;
    server.assert_ends_without_a_report(&id).await;
}

/// A run is its owner's: another researcher is told it does not exist, whether asking for
/// its status, its report or to cancel it.
#[tokio::test]
async fn a_run_is_its_owners_alone() {
    let server = Server::new();
    let (s, v) = server
        .post_json(json!({"model": MODEL, "dataset": "sub/test.csv", "bootstrap": 0}))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(server.wait(&id).await["status"], "done");
    let other = |method: &str, path: String| {
        Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {OTHER_RESEARCHER}"))
            .body(Body::empty())
            .unwrap()
    };
    for (method, path) in [
        ("GET", format!("/validation/runs/{id}")),
        ("GET", format!("/validation/runs/{id}/report.json")),
        ("GET", format!("/validation/runs/{id}/report.html")),
        ("DELETE", format!("/validation/runs/{id}")),
    ] {
        let (s, _, v) = server.send(other(method, path.clone())).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{method} {path}: {v}");
        assert_eq!(v["error"], "no such validation run", "{v}");
    }
    // The other researcher's own runs are theirs.
    let req = Request::post("/validation/runs")
        .header(header::AUTHORIZATION, format!("Bearer {OTHER_RESEARCHER}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({"model": MODEL, "dataset": "sub/test.csv", "bootstrap": 0}).to_string(),
        ))
        .unwrap();
    let (s, _, v) = server.send(req).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let theirs = v["id"].as_str().unwrap().to_owned();
    let (s, _, v) = server
        .send(other("GET", format!("/validation/runs/{theirs}")))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _) = server.get(&format!("/validation/runs/{theirs}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = server
        .get(&format!("/validation/runs/{id}/report.json"))
        .await;
    assert_eq!(s, StatusCode::OK, "the owner reads it: {v}");
}

/// `GET /validation/runs` lists the caller's runs, newest first;
/// after a restart the server lists them again as they ended, serves the done run's report,
/// and a cancelled run keeps none. A run another server on the data folder is still running
/// (it holds the run's folder) is not taken for an interrupted one.
#[tokio::test]
async fn runs_are_listed_by_owner_and_kept_across_a_restart() {
    let server = Server::new();
    let (s, v) = server
        .post_json(json!({"model": MODEL, "dataset": "sub/test.csv", "bootstrap": 0}))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let done = v["id"].as_str().unwrap().to_owned();
    let done_status = server.wait(&done).await;
    assert_eq!(done_status["status"], "done", "{done_status}");
    let req = Request::post("/validation/runs")
        .header(header::AUTHORIZATION, format!("Bearer {OTHER_RESEARCHER}"))
        .header(header::CONTENT_TYPE, "text/csv")
        .uri(format!("/validation/runs?model={MODEL}&bootstrap=0"))
        .body(Body::from(std::fs::read(test_csv()).unwrap()))
        .unwrap();
    let (s, _, v) = server.send(req).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let theirs = v["id"].as_str().unwrap().to_owned();
    assert_eq!(
        server
            .get_as(OTHER_RESEARCHER, &format!("/validation/runs/{theirs}"))
            .await
            .0,
        StatusCode::OK
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    while server
        .get_as(OTHER_RESEARCHER, &format!("/validation/runs/{theirs}"))
        .await
        .1["ended"]
        != true
    {
        assert!(Instant::now() < deadline, "the upload's run never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let long = server.start_long_run().await;
    assert_eq!(
        server.listed(&key("researcher")).await,
        [long.as_str(), done.as_str()]
    );
    assert_eq!(server.listed(OTHER_RESEARCHER).await, [theirs.as_str()]);
    // A second server on the same folders while the long run goes on: the run is the
    // first server's, not an interrupted one.
    let beside = server.restarted();
    assert_eq!(beside.listed(&key("researcher")).await, [done.as_str()]);
    // Cancelled, ended: the next start lists all three as they ended.
    let req = Request::delete(format!("/validation/runs/{long}"))
        .header(
            header::AUTHORIZATION,
            format!("Bearer {}", key("researcher")),
        )
        .body(Body::empty())
        .unwrap();
    assert_eq!(server.send(req).await.0, StatusCode::OK);
    server.assert_ends_without_a_report(&long).await;
    let after = server.restarted();
    assert_eq!(
        after.listed(&key("researcher")).await,
        [long.as_str(), done.as_str()]
    );
    assert_eq!(after.listed(OTHER_RESEARCHER).await, [theirs.as_str()]);
    let (s, v) = after.get(&format!("/validation/runs/{done}")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    for field in [
        "status",
        "gate_passed",
        "progress",
        "created",
        "report",
        "version",
    ] {
        assert_eq!(v[field], done_status[field], "{field}: {v}");
    }
    assert_eq!(v["ended"], true);
    let (s, report) = after
        .get(&format!("/validation/runs/{done}/report.json"))
        .await;
    assert_eq!(s, StatusCode::OK, "{report}");
    assert_eq!(report["run_id"], done.as_str());
    let (s, v) = after.get(&format!("/validation/runs/{long}")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "cancelled", "{v}");
    assert_eq!(
        after
            .get(&format!("/validation/runs/{long}/report.json"))
            .await
            .0,
        StatusCode::CONFLICT
    );
    // Still the owner's alone, and the uploaded dataset is gone.
    assert_eq!(
        after.get(&format!("/validation/runs/{theirs}")).await.0,
        StatusCode::NOT_FOUND
    );
    let folder = server.dir.path().join("data/validation/runs").join(&theirs);
    assert!(!folder.join("dataset.csv").exists());
    // The model takes a new run on the restarted server.
    let (s, v) = after
        .post_json(json!({"model": MODEL, "dataset": "sub/test.csv", "bootstrap": 0}))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    after.wait(v["id"].as_str().unwrap()).await;
}

#[tokio::test]
async fn hostile_requests_are_refused_with_their_reason() {
    let server = Server::new();
    for (body, status, why) in [
        (
            json!({"model": MODEL, "dataset": "../outside.csv"}),
            StatusCode::BAD_REQUEST,
            "without ..",
        ),
        (
            json!({"model": MODEL, "dataset": "/etc/passwd"}),
            StatusCode::BAD_REQUEST,
            "relative path",
        ),
        (
            json!({"model": MODEL, "dataset": "escape.csv"}),
            StatusCode::BAD_REQUEST,
            "outside the validation root",
        ),
        (
            json!({"model": MODEL, "dataset": "nope.csv"}),
            StatusCode::NOT_FOUND,
            "no such dataset",
        ),
        (json!({"model": MODEL}), StatusCode::BAD_REQUEST, "dataset"),
        (
            json!({"model": "no-such-model", "dataset": "sub/test.csv"}),
            StatusCode::NOT_FOUND,
            "unknown model",
        ),
        (
            json!({"model": MODEL, "dataset": "sub/test.csv", "bogus": 1}),
            StatusCode::BAD_REQUEST,
            "unknown field",
        ),
        (
            json!({"model": MODEL, "dataset": "sub/test.csv", "bootstrap": -1}),
            StatusCode::BAD_REQUEST,
            "not valid",
        ),
    ] {
        let (s, v) = server.post_json(body.clone()).await;
        assert_eq!(s, status, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(why), "{body}: {v}");
    }
    // NAME@VERSION that cannot be, and options out of range: 400 before any run starts
    for (model, why) in [
        (format!("{MODEL}@9"), "no version 9"),
        (format!("{MODEL}@-1"), "positive integer"),
        (format!("{MODEL}@99999999999999999999"), "positive integer"),
    ] {
        let (s, v) = server
            .post_json(json!({"model": model, "dataset": "sub/test.csv"}))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{model}: {v}");
        assert!(v["error"].as_str().unwrap().contains(why), "{model}: {v}");
    }
    let (s, v) = server
        .post_json(json!({"model": MODEL, "dataset": "sub/test.csv", "bootstrap": 10_000_000}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v["error"].as_str().unwrap().contains("at most"), "{v}");
    // a run that fails on its data (a label column the dataset lacks) fails the run, not the
    // request, with the reason and without the server's paths
    let (s, v) = server
        .post_json(json!({"model": MODEL, "dataset": "sub/test.csv", "label_column": "nope"}))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let failed = server.wait(v["id"].as_str().unwrap()).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("nope"), "{failed}");
    assert!(
        !error.contains(&*server.dir.path().to_string_lossy()),
        "{failed}"
    );
    let (s, _) = server
        .get(&format!(
            "/validation/runs/{}/report.json",
            v["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    // uploads: declared too large (refused before reading), streamed too large, empty, wrong type
    let runs = server.dir.path().join("data/validation/runs");
    let count = || std::fs::read_dir(&runs).map(|d| d.count()).unwrap_or(0);
    let before = count();
    // a misspelt option, and options in the query of a JSON request: 400, not ignored
    for (uri, content_type, body, why) in [
        (
            format!("/validation/runs?model={MODEL}&boostrap=0"),
            "text/csv",
            "a,label\n1,1\n".to_owned(),
            "unknown query parameter \"boostrap\"",
        ),
        (
            "/validation/runs?seed=1".to_owned(),
            "application/json",
            json!({"model": MODEL, "dataset": "sub/test.csv"}).to_string(),
            "in its body",
        ),
    ] {
        let req = Request::post(uri)
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", key("researcher")),
            )
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::from(body))
            .unwrap();
        let (s, _, v) = server.send(req).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(v["error"].as_str().unwrap().contains(why), "{v}");
    }
    let big = vec![b'1'; UPLOAD_LIMIT as usize + 1];
    let req = Request::post(format!("/validation/runs?model={MODEL}"))
        .header(
            header::AUTHORIZATION,
            format!("Bearer {}", key("researcher")),
        )
        .header(header::CONTENT_TYPE, "text/csv")
        .header(header::CONTENT_LENGTH, big.len())
        .body(Body::from(big.clone()))
        .unwrap();
    let (s, _, v) = server.send(req).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    let stream = futures_util::stream::iter(
        big.chunks(4096)
            .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    );
    let req = Request::post(format!("/validation/runs?model={MODEL}"))
        .header(
            header::AUTHORIZATION,
            format!("Bearer {}", key("researcher")),
        )
        .header(header::CONTENT_TYPE, "text/csv")
        .body(Body::from_stream(stream))
        .unwrap();
    let (s, _, v) = server.send(req).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_eq!(count(), before, "a refused upload leaves nothing behind");
    for (ct, body, status) in [
        ("text/csv", Vec::new(), StatusCode::BAD_REQUEST),
        (
            "application/octet-stream",
            b"x".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
    ] {
        let req = Request::post(format!("/validation/runs?model={MODEL}"))
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", key("researcher")),
            )
            .header(header::CONTENT_TYPE, ct)
            .body(Body::from(body))
            .unwrap();
        let (s, _, v) = server.send(req).await;
        assert_eq!(s, status, "{ct}: {v}");
    }
    // A compressed upload was taken for the CSV itself (red-team finding): refused.
    for coding in ["gzip", "br"] {
        let req = Request::post(format!("/validation/runs?model={MODEL}"))
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", key("researcher")),
            )
            .header(header::CONTENT_TYPE, "text/csv")
            .header(header::CONTENT_ENCODING, coding)
            .body(Body::from(std::fs::read(test_csv()).unwrap()))
            .unwrap();
        let (s, _, v) = server.send(req).await;
        assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{coding}: {v}");
        assert!(
            v["error"].as_str().unwrap().contains("Content-Encoding"),
            "{v}"
        );
    }
    assert_eq!(count(), before, "a refused upload leaves nothing behind");
    let req = Request::post("/validation/runs?bootstrap=abc&model=x")
        .header(
            header::AUTHORIZATION,
            format!("Bearer {}", key("researcher")),
        )
        .header(header::CONTENT_TYPE, "text/csv")
        .body(Body::from("label\n1\n"))
        .unwrap();
    let (s, _, v) = server.send(req).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // unknown or malformed run ids
    for id in ["00000000-0000-0000-0000-000000000000", "..%2F..%2Fetc", "x"] {
        let (s, _) = server.get(&format!("/validation/runs/{id}")).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{id}");
    }
    // another role may not start runs
    let req = Request::post("/validation/runs")
        .header(header::AUTHORIZATION, format!("Bearer {}", key("infer")))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({"model": MODEL, "dataset": "sub/test.csv"}).to_string(),
        ))
        .unwrap();
    let (s, _, _) = server.send(req).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

/// `serve --require-validation`: a version serves only with a passing report for its exact
/// manifest; reports come from the same `validate` runs (here the library call behind the
/// command line).
#[test]
fn require_validation_promotes_only_versions_with_a_passing_report() {
    use clap::Parser;
    use nightingale::validate::{RunContext, ValidateCommand, require_validation, run_job};

    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    copy_dir(
        &repo_dir().join("models/bundles").join(MODEL),
        &repo.join(MODEL),
    );
    let reports = dir.path().join("reports");
    std::fs::create_dir_all(&reports).unwrap();
    let gated = || {
        Repository::new(
            &repo,
            RepositoryOptions {
                promotion: Some(require_validation(reports.clone())),
                ..RepositoryOptions::default()
            },
        )
    };
    // no report: refused, and the index says why
    let repository = gated();
    let err = repository.load(MODEL).unwrap_err().to_string();
    assert!(err.contains("no validation report"), "{err}");
    assert!(err.contains("--require-validation"), "{err}");
    // a passing report for each served version (versions 1 and 2)
    for v in [1, 2] {
        let out = reports.join(format!("v{v}"));
        let args = ValidateCommand::try_parse_from([
            "validate",
            "--repository",
            repo.to_str().unwrap(),
            "--model",
            &format!("{MODEL}@{v}"),
            "--dataset",
            test_csv().to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--bootstrap",
            "100",
            "--quiet",
        ])
        .unwrap()
        .args;
        let report = run_job(&args, RunContext::default()).unwrap();
        assert_eq!(report.gate.as_ref().map(|g| g.passed), Some(true));
    }
    let repository = gated();
    assert_eq!(repository.load(MODEL).unwrap(), vec![1, 2]);
    // a failing gate in the only report of version 2 refuses version 2
    let path = reports.join("v2/report.json");
    let mut report: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    report["gate"]["passed"] = json!(false);
    std::fs::write(&path, report.to_string()).unwrap();
    let err = gated().load(MODEL).unwrap_err().to_string();
    assert!(err.contains("does not pass a gate"), "{err}");
    let write = |folder: &str, report: &Value| {
        std::fs::create_dir_all(reports.join(folder)).unwrap();
        std::fs::write(reports.join(folder).join("report.json"), report.to_string()).unwrap();
    };
    // Reports on uploaded datasets never count, passing or not: version 2 has none that does.
    assert_eq!(report["dataset"]["origin"], "file");
    report["gate"]["passed"] = json!(true);
    report["dataset"]["origin"] = json!("upload");
    write("v2", &report);
    let err = gated().load(MODEL).unwrap_err().to_string();
    assert!(err.contains("are on uploaded datasets"), "{err}");
    // Nor do researchers' runs (their label, output, patient-id column and replicates: one
    // made to fail withdrew an operator's pass).
    report["dataset"]["origin"] = json!("researcher");
    write("v2", &report);
    let err = gated().load(MODEL).unwrap_err().to_string();
    assert!(err.contains("of researchers' runs"), "{err}");
    // Nor reports scored from given predictions, and the refusal says so (it said there was
    // no report at all: a review's finding).
    let mut scored = report.clone();
    scored["dataset"]["origin"] = json!("file");
    scored["source"] = json!("predictions");
    write("v2", &scored);
    let err = gated().load(MODEL).unwrap_err().to_string();
    assert!(err.contains("scored from given predictions"), "{err}");
    // A report of a bundle that declares no gate: the refusal names the missing gate (it
    // read as a failed metric: a review's finding).
    let mut ungated = report.clone();
    ungated["dataset"]["origin"] = json!("file");
    ungated["gate"] = Value::Null;
    write("v2", &ungated);
    let err = gated().load(MODEL).unwrap_err().to_string();
    assert!(err.contains("declares no [[validation.gate]]"), "{err}");
    // The operator's passing report again, and a newer upload and researcher's run that
    // fail: still serves.
    report["dataset"]["origin"] = json!("file");
    write("v2", &report);
    let mut upload = report.clone();
    upload["dataset"]["origin"] = json!("upload");
    upload["gate"]["passed"] = json!(false);
    upload["created"] = json!("2999-01-01T00:00:00Z");
    write("v2-upload", &upload);
    let mut research = upload.clone();
    research["dataset"]["origin"] = json!("researcher");
    write("v2-research", &research);
    assert_eq!(gated().load(MODEL).unwrap(), vec![1, 2]);
    // A newer report of the operator's that fails withdraws the older pass.
    upload["dataset"]["origin"] = json!("file");
    write("v2-later", &upload);
    let err = gated().load(MODEL).unwrap_err().to_string();
    assert!(
        err.contains("newest validation report") && err.contains("2999-01-01"),
        "{err}"
    );
    std::fs::remove_dir_all(reports.join("v2-later")).unwrap();
    // an edited manifest is a different manifest: its reports must be made again
    let manifest = repo.join(MODEL).join("bundle.toml");
    let mut text = std::fs::read_to_string(&manifest).unwrap();
    text.push_str("# edited after validation\n");
    std::fs::write(&manifest, text).unwrap();
    let err = gated().load(MODEL).unwrap_err().to_string();
    assert!(err.contains("no validation report"), "{err}");
}

/// A batch the model refuses for working memory is split until it fits: `row-tile` holds
/// 256 KiB a row, so under a 1 MiB limit its batches of 64 rows are refused (16 MiB) and
/// the run scores them in smaller requests; the AUROC is scikit-learn's on onnxruntime's
/// probabilities (models/train/make_load_fixtures.py), and every request is audited,
/// the refused ones with status 400.
#[test]
fn validate_splits_a_batch_over_the_working_memory_limit() {
    use clap::Parser;
    use nightingale::validate::{RunContext, ValidateCommand, run_job};

    let fixtures = repo_dir().join("models/tests/fixtures");
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("row-tile.expected.json")).unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    copy_dir(&fixtures.join("bundles/row-tile"), &repo.join("row-tile"));
    let run = |limit: &str, out: &str| {
        let out = dir.path().join(out);
        let args = ValidateCommand::try_parse_from([
            "validate",
            "--repository",
            repo.to_str().unwrap(),
            "--model",
            "row-tile",
            "--dataset",
            fixtures.join("row-tile.csv").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--bootstrap",
            "0",
            "--max-inference-bytes",
            limit,
            "--quiet",
        ])
        .unwrap()
        .args;
        let report = run_job(&args, RunContext::default()).unwrap();
        let audit: Vec<Value> = std::fs::read_to_string(out.join("audit.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (serde_json::to_value(&report).unwrap(), audit)
    };
    let (report, audit) = run("1048576", "split");
    assert_eq!(report["dataset"]["rows_used"], expected["rows"], "{report}");
    let auroc = report["auroc"]["value"]
        .as_f64()
        .or_else(|| report["auroc"].as_f64())
        .unwrap_or_else(|| panic!("no AUROC in {report}"));
    let want = expected["auroc"].as_f64().unwrap();
    assert!(
        (auroc - want).abs() < 1e-9,
        "AUROC {auroc}, scikit-learn {want}"
    );
    let inferences: Vec<&Value> = audit.iter().filter(|e| e["model"] == "row-tile").collect();
    let refused = inferences.iter().filter(|e| e["status"] == 400).count();
    let scored: u64 = inferences
        .iter()
        .filter(|e| e["status"] == 200)
        .map(|e| e["rows"].as_u64().unwrap())
        .sum();
    assert!(
        refused >= 5,
        "each 64-row batch is refused first: {inferences:?}"
    );
    assert_eq!(scored, 300, "every row scored once: {inferences:?}");
    assert!(
        inferences
            .iter()
            .filter(|e| e["status"] == 200)
            .all(|e| e["rows"].as_u64().unwrap() <= 4),
        "{inferences:?}"
    );
    // with the default limit, one request a batch, and the same answer
    let (whole, audit) = run("4294967296", "whole");
    assert_eq!(whole["auroc"], report["auroc"]);
    assert!(
        audit
            .iter()
            .filter(|e| e["model"] == "row-tile")
            .all(|e| e["status"] == 200)
    );
}

/// A panic inside a run (npyz multiplies an `images.npy` header's shape past u64 and
/// panics) ends the run as an error: the server's run thread then frees its slot and model
/// (four such panics blocked every run until a restart: a red-team finding), and the
/// command line exits 2 rather than 101.
#[test]
fn a_panic_in_a_run_is_an_error_not_a_lost_thread() {
    use clap::Parser;
    use nightingale::validate::{RunContext, ValidateCommand, run_job};

    use nightingale_validation::dataset::npy_v1 as npy;
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    copy_dir(
        &repo_dir().join("models/bundles/image-orientation"),
        &repo.join("image-orientation"),
    );
    let data = dir.path().join("tensors");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("images.npy"),
        npy("<f4", "(18446744073709551615, 1, 224, 224)", &[0; 64]),
    )
    .unwrap();
    std::fs::write(data.join("labels.npy"), npy("<i8", "(6,)", &[0; 48])).unwrap();
    let args = ValidateCommand::try_parse_from([
        "validate",
        "--repository",
        repo.to_str().unwrap(),
        "--model",
        "image-orientation",
        "--dataset",
        data.to_str().unwrap(),
        "--out",
        dir.path().join("out").to_str().unwrap(),
        "--bootstrap",
        "0",
        "--quiet",
    ])
    .unwrap()
    .args;
    let err = run_job(&args, RunContext::default())
        .expect_err("the header is refused, by an error or a caught panic");
    // npyz panics on this header in test builds (its shape product overflows u64 under
    // overflow checks): the run reports the caught panic
    let text = format!("{err:#}");
    assert!(text.contains("internal error (a panic"), "{text}");
}

/// A review's finding: a dataset checked under the validation root when its run was asked
/// for, then replaced by a link to a file (or a folder) outside the root before the run read
/// it, was read, its columns in the report. A server's run (`confined`) reads the very path
/// it checked: a link in its place now fails the run, and the files of a folder dataset are
/// resolved against the folder as it was, not against where a link now leads.
#[test]
fn a_dataset_replaced_by_a_link_after_its_check_is_not_read() {
    use clap::Parser;
    use nightingale::validate::{RunContext, ValidateCommand, run_job};

    use nightingale_validation::dataset::{PathRefused, path_in};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let repo = root.join("repo");
    copy_dir(
        &repo_dir().join("models/bundles").join(MODEL),
        &repo.join(MODEL),
    );
    let outside = root.join("outside.csv");
    std::fs::copy(test_csv(), &outside).unwrap();
    // Checked as a plain file; then a link to a file elsewhere stands in its place.
    let dataset = root.join("vroot/d.csv");
    std::fs::create_dir_all(dataset.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&outside, &dataset).unwrap();
    let args = ValidateCommand::try_parse_from([
        "validate",
        "--repository",
        repo.to_str().unwrap(),
        "--model",
        MODEL,
        "--dataset",
        dataset.to_str().unwrap(),
        "--out",
        root.join("out").to_str().unwrap(),
        "--bootstrap",
        "0",
        "--quiet",
    ])
    .unwrap()
    .args;
    let ctx = RunContext {
        confined: true,
        ..RunContext::default()
    };
    let err = run_job(&args, ctx).expect_err("a link in the checked path's place");
    assert!(
        format!("{err:#}").contains("changed after the run was asked for"),
        "{err:#}"
    );
    // The command line follows a link it is given, as ever.
    run_job(&args, RunContext::default()).unwrap();

    // A folder dataset replaced by a link: its files are not found through the link.
    let folder = root.join("vroot/ds");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("manifest.csv"), "file,label\n").unwrap();
    assert_eq!(
        path_in(&folder, "manifest.csv"),
        Ok(folder.join("manifest.csv"))
    );
    let elsewhere = root.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("manifest.csv"), "file,label\n").unwrap();
    std::fs::remove_dir_all(&folder).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &folder).unwrap();
    assert_eq!(path_in(&folder, "manifest.csv"), Err(PathRefused::Outside));
    assert_eq!(
        path_in(&folder, "./manifest.csv"),
        Err(PathRefused::NotRelative)
    );
}
/// A review's finding: one researcher trickling four uploads held every upload place, and
/// everyone else's upload was refused 503 until the request deadline, over and over. One
/// caller holds at most half of the places; another caller still gets one. (The first
/// version of this test raced: its third upload could take a place before the two it meant
/// to hold had theirs. Each held upload is now seen on disk before the next is sent.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_caller_cannot_hold_every_upload_place() {
    use futures_util::StreamExt as _;
    let server = Server::new();
    let runs = server.dir.path().join("data/validation/runs");
    // An upload whose body never ends (a client trickling it), as `key`'s.
    let stalled = |key: &str| {
        Request::post(format!("/validation/runs?model={MODEL}"))
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .header(header::CONTENT_TYPE, "text/csv; charset=utf-8")
            .body(Body::from_stream(
                futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(
                    b"label,",
                ))])
                .chain(futures_util::stream::pending()),
            ))
            .unwrap()
    };
    // The uploads being received: their folders, each with its dataset file begun.
    let receiving = || {
        std::fs::read_dir(&runs).map_or(0, |d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().join("dataset.csv").exists())
                .count()
        })
    };
    let until_receiving = |n: usize, what: &'static str| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while receiving() < n {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let send = |req: Request<Body>| {
        let app = http::app(server.state.clone());
        tokio::spawn(async move { app.oneshot(req).await })
    };
    let mut held = Vec::new();
    for n in 1..=2 {
        held.push(send(stalled(&key("researcher"))));
        until_receiving(n, "a held upload never began").await;
    }
    // A third of the same caller's is refused at once.
    let res = tokio::time::timeout(
        Duration::from_secs(10),
        http::app(server.state.clone()).oneshot(stalled(&key("researcher"))),
    )
    .await
    .expect("the third upload was not answered")
    .unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(text.contains("the most one caller may"), "{text}");
    assert_eq!(receiving(), 2);
    // Another researcher's upload takes a place and is being received.
    let other = send(stalled(OTHER_RESEARCHER));
    until_receiving(3, "another caller's upload was not received").await;
    assert!(!other.is_finished(), "{other:?}");
    // A held upload given up gives its place back: the caller's next one is received.
    held.pop().unwrap().abort();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while receiving() > 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the given-up upload stayed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = send(stalled(&key("researcher")));
    until_receiving(3, "the caller's next upload was not received").await;
    assert!(!again.is_finished(), "{again:?}");
    for h in held.into_iter().chain([other, again]) {
        h.abort();
    }
}
