//! The HTTP contract, driven through the router without a socket: every KServe v2 endpoint,
//! both tensor encodings, the repository and statistics extensions, metrics, and the error
//! cases, on a repository holding the real wdbc-malignancy bundle and a tampered copy.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use bytes::Bytes;
use http_body_util::BodyExt;
use nightingale::audit::{self, AuditLog};
use nightingale::http::{self, AppState, HttpConfig};
use nightingale_models::{Repository, RepositoryOptions};
use serde_json::{Value, json};
use tower::ServiceExt;

mod support;
use support::copy_dir;

const MODEL: &str = "wdbc-malignancy";
const TOKEN: &str = "test-admin-token-0123456789";

fn bundles() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/bundles")
}

/// Test rows and onnxruntime's probabilities for them, from the bundle's test split.
fn test_split() -> Vec<(Vec<f32>, f32)> {
    let csv = std::fs::read_to_string(bundles().join(MODEL).join("testdata/test.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let p_col = header
        .iter()
        .position(|h| *h == "expected_p_malignant")
        .unwrap();
    lines
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            (
                cells[..30].iter().map(|v| v.parse().unwrap()).collect(),
                cells[p_col].parse().unwrap(),
            )
        })
        .collect()
}

/// Removes version 2 from a bundle copy, so tests about one version see exactly one.
fn keep_only_version_1(bundle: &Path) {
    std::fs::remove_dir_all(bundle.join("2")).unwrap();
    let manifest = std::fs::read_to_string(bundle.join("bundle.toml")).unwrap();
    std::fs::write(
        bundle.join("bundle.toml"),
        manifest.split("[versions.2]").next().unwrap(),
    )
    .unwrap();
}

struct Fixture {
    _dir: tempfile::TempDir,
    state: Arc<AppState>,
}

impl Fixture {
    fn new(config: HttpConfig) -> Fixture {
        Fixture::build(config, false)
    }

    fn build(config: HttpConfig, all_versions: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&bundles().join(MODEL), &dir.path().join(MODEL));
        if !all_versions {
            keep_only_version_1(&dir.path().join(MODEL));
        }
        // A copy whose model file no longer matches its checksum.
        let bad = dir.path().join("tampered");
        copy_dir(&bundles().join(MODEL), &bad);
        keep_only_version_1(&bad);
        let manifest = std::fs::read_to_string(bad.join("bundle.toml")).unwrap();
        std::fs::write(
            bad.join("bundle.toml"),
            manifest.replace(&format!("name = \"{MODEL}\""), "name = \"tampered\""),
        )
        .unwrap();
        let mut onnx = std::fs::read(bad.join("1/model.onnx")).unwrap();
        let last = onnx.len() - 1;
        onnx[last] ^= 0x01;
        std::fs::write(bad.join("1/model.onnx"), onnx).unwrap();

        let repository = Arc::new(Repository::new(dir.path(), RepositoryOptions::default()));
        repository.load_all().unwrap();
        let audit = AuditLog::open(&dir.path().join("audit.jsonl"), false).unwrap();
        let state = AppState::new(repository, audit, config, Some(http::install_recorder()));
        state.set_ready(true);
        Fixture { _dir: dir, state }
    }

    fn default() -> Fixture {
        Fixture::new(HttpConfig {
            admin_token: Some(TOKEN.into()),
            ..HttpConfig::default()
        })
    }

    async fn call(&self, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Bytes) {
        let res = http::app(self.state.clone()).oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, headers, body)
    }

    async fn get(&self, uri: &str) -> (StatusCode, Bytes) {
        let (s, _, b) = self
            .call(Request::get(uri).body(Body::empty()).unwrap())
            .await;
        (s, b)
    }

    /// POSTs JSON without a Content-Type header, as tritonclient does.
    async fn post_json(&self, uri: &str, body: &Value) -> (StatusCode, Value) {
        let (s, _, b) = self
            .call(
                Request::post(uri)
                    .body(Body::from(serde_json::to_vec(body).unwrap()))
                    .unwrap(),
            )
            .await;
        (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }

    async fn post_raw(
        &self,
        uri: &str,
        body: Vec<u8>,
        header_len: Option<&str>,
        token: Option<&str>,
    ) -> (StatusCode, axum::http::HeaderMap, Bytes) {
        let mut req = Request::builder().method(Method::POST).uri(uri);
        if let Some(n) = header_len {
            req = req
                .header("Inference-Header-Content-Length", n)
                .header("Content-Type", "application/octet-stream");
        }
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        self.call(req.body(Body::from(body)).unwrap()).await
    }
}

fn json_request(rows: &[Vec<f32>]) -> Value {
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    json!({"inputs": [{"name": "features", "shape": [rows.len(), 30], "datatype": "FP32", "data": flat}]})
}

/// The label onnxruntime's probabilities give: the argmax of [P(malignant), P(benign)].
fn onnxruntime_label(p_malignant: f32) -> i64 {
    if p_malignant >= 1.0 - p_malignant {
        0
    } else {
        1
    }
}

fn error_of(v: &Value) -> &str {
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {v}"))
}

fn probabilities(resp: &Value) -> Vec<f32> {
    let out = resp["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "probabilities")
        .unwrap();
    out["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

#[tokio::test]
async fn health_and_server_metadata() {
    let f = Fixture::default();
    assert_eq!(f.get("/v2/health/live").await.0, StatusCode::OK);
    assert_eq!(f.get("/v2/health/ready").await.0, StatusCode::OK);
    f.state.set_ready(false);
    assert_eq!(
        f.get("/v2/health/ready").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(f.get("/v2/health/live").await.0, StatusCode::OK);
    let (s, b) = f.get("/v2").await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["name"], "nightingale");
    for ext in ["binary_tensor_data", "model_repository", "statistics"] {
        assert!(
            v["extensions"].as_array().unwrap().iter().any(|e| e == ext),
            "{ext}"
        );
    }
}

/// A GET of `uri` answered 503 with `Retry-After: 5` and an error saying `why`.
async fn refused_for_now(f: &Fixture, uri: &str, why: &str) {
    let (s, h, b) = f.call(Request::get(uri).body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{uri}");
    assert_eq!(h[axum::http::header::RETRY_AFTER], "5", "{uri}");
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert!(error_of(&v).contains(why), "{uri}: {v}");
}

/// During the initial model load, a model not loaded yet is 503 with Retry-After, not 404
/// "unknown" (clients take a 404 as final: a review saw them during every restart); once
/// the load is done, an unknown model is 404.
#[tokio::test]
async fn models_not_loaded_yet_are_503_during_the_initial_load() {
    let f = Fixture::default();
    f.state.set_ready(false);
    for uri in [
        "/v2/models/not-loaded-yet".to_owned(),
        "/v2/models/not-loaded-yet/ready".to_owned(),
        format!("/v2/models/{MODEL}/versions/99"),
    ] {
        refused_for_now(&f, &uri, "still loading").await;
    }
    let (s, v) = f
        .post_json(
            "/v2/models/not-loaded-yet/infer",
            &json_request(&[vec![0.0; 30]]),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    // A model loaded already serves meanwhile.
    assert_eq!(
        f.get(&format!("/v2/models/{MODEL}")).await.0,
        StatusCode::OK
    );
    f.state.set_ready(true);
    assert_eq!(
        f.get("/v2/models/not-loaded-yet").await.0,
        StatusCode::NOT_FOUND
    );
}

/// While start-up opens its stores, `serve` listens: the health checks and the metrics are
/// answered (live 200, ready 503), every other route 503 "starting" with Retry-After, so that
/// CDS Hooks, DICOMweb or validation are not answered as if they were not configured (the
/// HTTP port was answered only after the slow steps: liveness probes timed out while a large
/// spool was indexed again, a review's finding). The process side is in
/// tests/peer/test_dicomweb.py (`test_listening_while_the_spool_is_indexed_again`).
#[tokio::test]
async fn starting_answers_health_and_metrics_only() {
    let f = Fixture::default();
    f.state.set_starting(true);
    assert_eq!(f.get("/v2/health/live").await.0, StatusCode::OK);
    assert_eq!(
        f.get("/v2/health/ready").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(f.get("/metrics").await.0, StatusCode::OK);
    for uri in [
        "/v2".to_owned(),
        format!("/v2/models/{MODEL}"),
        "/cds-services".to_owned(),
        "/dicomweb/studies".to_owned(),
        "/validation/runs".to_owned(),
    ] {
        refused_for_now(&f, &uri, "starting").await;
    }
    let (s, v) = f
        .post_json(
            &format!("/v2/models/{MODEL}/infer"),
            &json_request(&[vec![0.0; 30]]),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(error_of(&v).contains("starting"), "{v}");
    f.state.set_starting(false);
    assert_eq!(f.get("/v2/health/ready").await.0, StatusCode::OK);
    assert_eq!(f.get("/cds-services").await.0, StatusCode::OK);
    assert_eq!(
        f.get(&format!("/v2/models/{MODEL}")).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn model_metadata_and_readiness() {
    let f = Fixture::default();
    for uri in [
        format!("/v2/models/{MODEL}"),
        format!("/v2/models/{MODEL}/versions/1"),
    ] {
        let (s, b) = f.get(&uri).await;
        assert_eq!(s, StatusCode::OK, "{uri}");
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["name"], MODEL);
        assert_eq!(v["versions"], json!(["1"]));
        assert_eq!(
            v["inputs"],
            json!([{"name": "features", "datatype": "FP32", "shape": [-1, 30]}])
        );
        assert_eq!(
            v["outputs"][1],
            json!({"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]})
        );
    }
    assert_eq!(
        f.get(&format!("/v2/models/{MODEL}/ready")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        f.get(&format!("/v2/models/{MODEL}/versions/1/ready"))
            .await
            .0,
        StatusCode::OK
    );
    for uri in [
        "/v2/models/nope",
        "/v2/models/nope/ready",
        &format!("/v2/models/{MODEL}/versions/7"),
        &format!("/v2/models/{MODEL}/versions/x/ready"),
    ] {
        let (s, b) = f.get(uri).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{uri}");
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert!(!error_of(&v).is_empty());
    }
}

#[tokio::test]
async fn json_inference_matches_onnxruntime() {
    let f = Fixture::default();
    let split = test_split();
    let rows: Vec<Vec<f32>> = split.iter().map(|(r, _)| r.clone()).collect();
    for chunk in [1usize, 64] {
        for (batch, expected) in rows.chunks(chunk).zip(split.chunks(chunk)).take(3) {
            let (s, v) = f
                .post_json(&format!("/v2/models/{MODEL}/infer"), &json_request(batch))
                .await;
            assert_eq!(s, StatusCode::OK, "{v}");
            assert_eq!(v["model_name"], MODEL);
            assert_eq!(v["model_version"], "1");
            let p = probabilities(&v);
            assert_eq!(p.len(), batch.len() * 2);
            for (i, (_, want)) in expected.iter().enumerate() {
                assert!(
                    (p[2 * i] - want).abs() <= 1e-5,
                    "row {i}: {} vs onnxruntime {want}",
                    p[2 * i]
                );
            }
            // The label is the argmax of onnxruntime's probabilities (class 0: malignant).
            let labels = v["outputs"][0]["data"].as_array().unwrap();
            assert_eq!(labels.len(), batch.len());
            for (l, (_, p_malignant)) in labels.iter().zip(expected) {
                assert_eq!(l.as_i64().unwrap(), onnxruntime_label(*p_malignant));
            }
        }
    }
    // Nested data, a versioned path, an id and a chosen output.
    let nested = json!({"id": "req-7", "inputs": [{"name": "features", "shape": [2, 30], "datatype": "FP32", "data": [rows[0], rows[1]]}],
        "outputs": [{"name": "probabilities"}]});
    let (s, v) = f
        .post_json(&format!("/v2/models/{MODEL}/versions/1/infer"), &nested)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["id"], "req-7");
    assert_eq!(v["outputs"].as_array().unwrap().len(), 1);
    let (_, flat) = f
        .post_json(
            &format!("/v2/models/{MODEL}/infer"),
            &json_request(&rows[..2]),
        )
        .await;
    assert_eq!(probabilities(&v), probabilities(&flat));
}

fn binary_body(rows: &[Vec<f32>], outputs: Value) -> (Vec<u8>, String) {
    let raw: Vec<u8> = rows
        .iter()
        .flatten()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let header = json!({"inputs": [{"name": "features", "shape": [rows.len(), 30], "datatype": "FP32",
        "parameters": {"binary_data_size": raw.len()}}], "outputs": outputs});
    let mut body = serde_json::to_vec(&header).unwrap();
    let n = body.len();
    body.extend_from_slice(&raw);
    (body, n.to_string())
}

#[tokio::test]
async fn binary_tensor_extension_round_trip() {
    let f = Fixture::default();
    let split = test_split();
    let rows: Vec<Vec<f32>> = split.iter().take(64).map(|(r, _)| r.clone()).collect();
    let (body, n) = binary_body(
        &rows,
        json!([{"name": "label", "parameters": {"binary_data": false}}, {"name": "probabilities", "parameters": {"binary_data": true}}]),
    );
    let (s, headers, b) = f
        .post_raw(&format!("/v2/models/{MODEL}/infer"), body, Some(&n), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let header_len: usize = headers["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let v: Value = serde_json::from_slice(&b[..header_len]).unwrap();
    assert_eq!(v["outputs"][0]["name"], "label");
    assert!(v["outputs"][0]["data"].is_array(), "label stays JSON");
    let size = v["outputs"][1]["parameters"]["binary_data_size"]
        .as_u64()
        .unwrap() as usize;
    assert_eq!(size, 64 * 2 * 4);
    assert_eq!(b.len(), header_len + size);
    let p: Vec<f32> = b[header_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    for (i, (_, want)) in split.iter().take(64).enumerate() {
        assert!((p[2 * i] - want).abs() <= 1e-5);
    }
    // binary_data_output at the request level turns every output binary.
    let raw: Vec<u8> = rows[..1]
        .iter()
        .flatten()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let header = json!({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "parameters": {"binary_data_size": raw.len()}}],
        "parameters": {"binary_data_output": true}});
    let mut body = serde_json::to_vec(&header).unwrap();
    let n = body.len().to_string();
    body.extend_from_slice(&raw);
    let (s, headers, b) = f
        .post_raw(&format!("/v2/models/{MODEL}/infer"), body, Some(&n), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let header_len: usize = headers["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let v: Value = serde_json::from_slice(&b[..header_len]).unwrap();
    assert_eq!(
        v["outputs"][0]["parameters"]["binary_data_size"], 8,
        "one INT64 label"
    );
    assert_eq!(
        v["outputs"][1]["parameters"]["binary_data_size"], 8,
        "two FP32 probabilities"
    );
    assert_eq!(b.len(), header_len + 16);
}

#[tokio::test]
async fn classification_extension() {
    let f = Fixture::default();
    let split: Vec<(Vec<f32>, f32)> = test_split().into_iter().take(2).collect();
    let rows: Vec<Vec<f32>> = split.iter().map(|(r, _)| r.clone()).collect();
    let mut req = json_request(&rows);
    req["outputs"] = json!([{"name": "probabilities", "parameters": {"classification": 1}}]);
    let (s, v) = f
        .post_json(&format!("/v2/models/{MODEL}/infer"), &req)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["outputs"][0]["datatype"], "BYTES");
    assert_eq!(v["outputs"][0]["shape"], json!([2, 1]));
    // Each row's top class is the one onnxruntime's probabilities put first.
    for (i, (_, p_malignant)) in split.iter().enumerate() {
        let top = v["outputs"][0]["data"][i].as_str().unwrap();
        let want = match onnxruntime_label(*p_malignant) {
            0 => ":0:malignant",
            _ => ":1:benign",
        };
        assert!(top.ends_with(want), "row {i}: {top}, want {want}");
        let score: f32 = top.split(':').next().unwrap().parse().unwrap();
        let p_top = if want == ":0:malignant" {
            *p_malignant
        } else {
            1.0 - p_malignant
        };
        assert!((score - p_top).abs() <= 1e-5, "row {i}: {score} vs {p_top}");
    }
    // `label` has one value per row (shape [-1]): ranking it would rank the rows (the
    // patients) against each other: 400, not one answer for the batch.
    // Refused before the model runs (it ran first: an execution in the statistics, and
    // outputs digested in the audit record, for a request refused: a review's finding).
    let executions = |v: &Value| v["model_stats"][0]["execution_count"].as_u64().unwrap();
    let stats = format!("/v2/models/{MODEL}/versions/1/stats");
    let before: Value = serde_json::from_slice(&f.get(&stats).await.1).unwrap();
    req["outputs"] = json!([{"name": "label", "parameters": {"classification": 1}}]);
    let (s, v) = f
        .post_json(&format!("/v2/models/{MODEL}/infer"), &req)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("one value per row"),
        "{v}"
    );
    let after: Value = serde_json::from_slice(&f.get(&stats).await.1).unwrap();
    assert_eq!(executions(&after), executions(&before), "{after}");
}

#[tokio::test]
async fn bad_requests_get_400_with_the_reason() {
    let f = Fixture::default();
    let uri = format!("/v2/models/{MODEL}/infer");
    let row = vec![0.5f32; 30];
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"inputs": [{"name": "x", "shape": [1, 30], "datatype": "FP32", "data": row}]}),
            "unknown input \"x\"",
        ),
        (
            json!({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP64", "data": row}]}),
            "datatype FP64",
        ),
        (
            json!({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FLOAT", "data": row}]}),
            "unknown datatype",
        ),
        (
            json!({"inputs": [{"name": "features", "shape": [1, 29], "datatype": "FP32", "data": &row[..29]}]}),
            "shape [1, 29]",
        ),
        (
            json!({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": &row[..29]}]}),
            "needs 30",
        ),
        (
            json!({"inputs": [{"name": "features", "shape": [1, -30], "datatype": "FP32", "data": row}]}),
            "negative",
        ),
        (
            json!({"inputs": [{"name": "features", "shape": [4294967296u64, 4294967296u64], "datatype": "FP32", "data": row}]}),
            "too large",
        ),
        (
            json!({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": vec!["a"; 30]}]}),
            "data element 0 is a string: FP32 data takes numbers",
        ),
        (
            json!({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32"}]}),
            "neither data nor binary_data_size",
        ),
        (json!({"inputs": []}), "no inputs"),
        (
            json!({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": row}], "outputs": [{"name": "nope"}]}),
            "unknown output \"nope\"",
        ),
        (json_request(&vec![row.clone(); 65]), "max_batch_size 64"),
        (json!({"input": []}), "malformed inference request JSON"),
    ];
    for (body, needle) in cases {
        let (s, v) = f.post_json(&uri, &body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{needle}: {v}");
        assert!(error_of(&v).contains(needle), "expected {needle:?} in {v}");
    }
    // Errors never echo tensor contents.
    let secret = json!({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": vec![123456.5f32; 29]}]});
    let (_, v) = f.post_json(&uri, &secret).await;
    assert!(!error_of(&v).contains("123456"), "{v}");

    // Malformed bodies and binary framing.
    let (s, _, b) = f.post_raw(&uri, b"{not json".to_vec(), None, None).await;
    assert_eq!(
        s,
        StatusCode::BAD_REQUEST,
        "{}",
        String::from_utf8_lossy(&b)
    );
    let (body, n) = binary_body(std::slice::from_ref(&row), json!(null));
    let mut framing: Vec<(Vec<u8>, String, &str)> = vec![
        (body.clone(), "999999".into(), "only"),
        (body.clone(), "abc".into(), "non-negative integer"),
        (
            body[..body.len() - 4].to_vec(),
            n.clone(),
            "runs past the end",
        ),
        (
            [body.clone(), vec![0u8; 8]].concat(),
            n.clone(),
            "8 bytes of binary data follow",
        ),
    ];
    // JSON cannot carry NaN, the binary extension can: refused before any engine sees it.
    let mut nan_row = row.clone();
    nan_row[3] = f32::NAN;
    let (nan_body, nan_n) = binary_body(&[nan_row], json!(null));
    framing.push((nan_body, nan_n, "NaN or infinite"));
    for (body, n, needle) in framing {
        let (s, _, b) = f.post_raw(&uri, body, Some(&n), None).await;
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(s, StatusCode::BAD_REQUEST, "{needle}: {v}");
        assert!(error_of(&v).contains(needle), "expected {needle:?} in {v}");
    }
    // The header twice (the right length, then another): ambiguous framing, refused.
    let json = serde_json::to_vec(&json_request(&[vec![1.0; 30]])).unwrap();
    let req = Request::post(&uri)
        .header("Inference-Header-Content-Length", json.len().to_string())
        .header("Inference-Header-Content-Length", "5")
        .header("Content-Type", "application/octet-stream")
        .body(Body::from(json))
        .unwrap();
    let (s, _, b) = f.call(req).await;
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(error_of(&v).contains("more than once"), "{v}");
}

/// Compressed request bodies (tritonclient's `request_compression_algorithm`): gzip and
/// deflate (zlib) give the plain body's answer; another coding is 415 before the body is
/// read; a small body that inflates past the body limit is 413, one that does not inflate 400.
#[tokio::test]
async fn gzip_and_deflate_bodies_are_inflated_within_the_limits() {
    use std::io::Write;
    let f = Fixture::new(HttpConfig {
        max_body_bytes: 1 << 20,
        ..HttpConfig::default()
    });
    let uri = format!("/v2/models/{MODEL}/infer");
    let (row, p_malignant) = test_split().into_iter().next().unwrap();
    let plain = serde_json::to_vec(&json_request(&[row])).unwrap();
    let gzip = |bytes: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    };
    let zlib = |bytes: &[u8]| {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    };
    let post = |coding: &str, body: Vec<u8>| {
        Request::post(&uri)
            .header("content-encoding", coding)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap()
    };
    for (coding, body) in [
        ("gzip", gzip(&plain)),
        ("deflate", zlib(&plain)),
        ("identity", plain.clone()),
    ] {
        let (s, _, b) = f.call(post(coding, body)).await;
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(s, StatusCode::OK, "{coding}: {v}");
        assert!(
            (probabilities(&v)[0] - p_malignant).abs() <= 1e-5,
            "{coding}"
        );
    }
    for coding in ["br", "zstd", "gzip, gzip"] {
        let (s, _, b) = f.call(post(coding, plain.clone())).await;
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{coding}: {v}");
    }
    // 8 MiB of spaces compress to a few KiB: refused at the 1 MiB limit, not allocated.
    let bomb = gzip(&vec![b' '; 8 << 20]);
    assert!(bomb.len() < 64 << 10);
    let (s, _, b) = f.call(post("gzip", bomb)).await;
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(error_of(&v).contains("decompresses to more than"), "{v}");
    let (s, _, b) = f.call(post("gzip", plain.clone())).await;
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(error_of(&v).contains("does not decompress"), "{v}");
    let mut cut = gzip(&plain);
    cut.truncate(cut.len() / 2);
    let (s, _, _) = f.call(post("gzip", cut)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // A transfer coding other than chunked is 501 (RFC 9112 §6.1), closing the connection:
    // a gzip-coded body was read as if plain (red-team).
    for te in ["gzip, chunked", "chunked, identity", "compress"] {
        let req = Request::post(&uri)
            .header("transfer-encoding", te)
            .header("content-type", "application/json")
            .body(Body::from(gzip(&plain)))
            .unwrap();
        let (s, h, b) = f.call(req).await;
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(s, StatusCode::NOT_IMPLEMENTED, "{te}: {v}");
        assert_eq!(h["connection"], "close");
    }
}

#[tokio::test]
async fn unknown_models_404_and_oversized_bodies_413() {
    let f = Fixture::new(HttpConfig {
        max_body_bytes: 4096,
        ..HttpConfig::default()
    });
    let (s, v) = f
        .post_json("/v2/models/nope/infer", &json_request(&[vec![0.0; 30]]))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(error_of(&v).contains("unknown model"));
    // Answered before its body was read: the HTTP/1.1 connection closes, and says so (a
    // client reusing it lost its next request); a request whose body was read keeps it.
    let one = serde_json::to_vec(&json_request(&[vec![0.0; 30]])).unwrap();
    let sized = |uri: String| {
        Request::post(uri)
            .header(axum::http::header::CONTENT_LENGTH, one.len())
            .body(Body::from(one.clone()))
            .unwrap()
    };
    let (s, h, _) = f.call(sized("/v2/models/nope/infer".into())).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(h[axum::http::header::CONNECTION], "close");
    let (s, h, _) = f.call(sized(format!("/v2/models/{MODEL}/infer"))).await;
    assert_eq!(s, StatusCode::OK);
    assert!(!h.contains_key(axum::http::header::CONNECTION), "{h:?}");
    let (s, v) = f
        .post_json(
            &format!("/v2/models/{MODEL}/versions/9/infer"),
            &json_request(&[vec![0.0; 30]]),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let big = json_request(&vec![vec![0.123456f32; 30]; 64]);
    let (s, v) = f
        .post_json(&format!("/v2/models/{MODEL}/infer"), &big)
        .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(error_of(&v).contains("4096"));
    // An empty version segment names no version (it is not the default one).
    for path in ["ready", "stats"] {
        let (s, b) = f.get(&format!("/v2/models/{MODEL}/versions//{path}")).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{}", String::from_utf8_lossy(&b));
    }
    let (s, b) = f.get("/v3/nothing").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(serde_json::from_slice::<Value>(&b).unwrap()["error"].is_string());
    let (s, _, _) = f
        .call(
            Request::delete("/v2/health/live")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn tampered_bundle_is_refused_and_the_others_serve() {
    let f = Fixture::default();
    let (s, _, b) = f.post_raw("/v2/repository/index", vec![], None, None).await;
    assert_eq!(s, StatusCode::OK);
    let index: Value = serde_json::from_slice(&b).unwrap();
    let tampered = index
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "tampered")
        .unwrap();
    assert_eq!(tampered["state"], "UNAVAILABLE");
    let reason = tampered["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("checksum mismatch for tampered/1/model.onnx: "),
        "{reason}"
    );
    // Unauthenticated answers name files relative to the repository, never where it lives.
    let root = f._dir.path().to_str().unwrap();
    assert!(!String::from_utf8_lossy(&b).contains(root), "{index}");
    let good = index
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == MODEL)
        .unwrap();
    assert_eq!(good["state"], "READY");
    assert_eq!(good["version"], "1");
    let (s, _) = f
        .post_json(
            &format!("/v2/models/{MODEL}/infer"),
            &json_request(&[vec![1.0; 30]]),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, b) = f.get("/v2/models/tampered/ready").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let body = String::from_utf8_lossy(&b);
    assert!(
        body.contains("tampered/1/model.onnx") && !body.contains(root),
        "{body}"
    );
    // A load through the API answers the same relative path.
    let (s, _, b) = f
        .post_raw(
            "/v2/repository/models/tampered/load",
            vec![],
            None,
            Some(TOKEN),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let body = String::from_utf8_lossy(&b);
    assert!(
        body.contains("checksum mismatch for tampered/1/model.onnx") && !body.contains(root),
        "{body}"
    );
    // Only ready models when asked.
    let (_, v) = f
        .post_json("/v2/repository/index", &json!({"ready": true}))
        .await;
    assert!(
        v.as_array().unwrap().iter().all(|e| e["state"] == "READY"),
        "{v}"
    );
    // "ready" that is not a boolean, or a body that is not an object: 400, not ignored.
    for body in [json!({"ready": "yes"}), json!([true])] {
        let (s, v) = f.post_json("/v2/repository/index", &body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
    }
}

#[tokio::test]
async fn model_control_needs_the_admin_token() {
    let f = Fixture::default();
    let unload = format!("/v2/repository/models/{MODEL}/unload");
    let load = format!("/v2/repository/models/{MODEL}/load");
    let (s, _, _) = f.post_raw(&unload, vec![], None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = f
        .post_raw(&unload, vec![], None, Some("wrong-token-wrong-token"))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(
        f.get(&format!("/v2/models/{MODEL}/ready")).await.0,
        StatusCode::OK
    );

    let (s, _, _) = f.post_raw(&unload, vec![], None, Some(TOKEN)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        f.get(&format!("/v2/models/{MODEL}/ready")).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let (s, v) = f
        .post_json(
            &format!("/v2/models/{MODEL}/infer"),
            &json_request(&[vec![1.0; 30]]),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    // The same with a version named (it was 404, "no version being served").
    assert_eq!(
        f.get(&format!("/v2/models/{MODEL}/versions/1/ready"))
            .await
            .0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let (s, v) = f
        .post_json(
            &format!("/v2/models/{MODEL}/versions/1/infer"),
            &json_request(&[vec![1.0; 30]]),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(error_of(&v).contains("unloaded"), "{v}");
    // a model not ready says when to ask again, as a full queue does
    let body = serde_json::to_vec(&json_request(&[vec![1.0; 30]])).unwrap();
    let (s, headers, _) = f
        .post_raw(&format!("/v2/models/{MODEL}/infer"), body, None, None)
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers[axum::http::header::RETRY_AFTER], "5");
    let (_, v) = f.post_json("/v2/repository/index", &json!({})).await;
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == MODEL && e["state"] == "UNLOADED"),
        "{v}"
    );

    let (s, _, _) = f.post_raw(&load, vec![], None, Some(TOKEN)).await;
    assert_eq!(s, StatusCode::OK);
    // Loaded again, it answers as onnxruntime does.
    let (row, p_malignant) = test_split().into_iter().next().unwrap();
    let (s, v) = f
        .post_json(&format!("/v2/models/{MODEL}/infer"), &json_request(&[row]))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!((probabilities(&v)[0] - p_malignant).abs() <= 1e-5, "{v}");
    // Loading the tampered bundle fails with the reason; unknown names are 404; odd names 400.
    let (s, _, b) = f
        .post_raw(
            "/v2/repository/models/tampered/load",
            vec![],
            None,
            Some(TOKEN),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&b).contains("checksum mismatch"));
    let (s, _, _) = f
        .post_raw("/v2/repository/models/nope/load", vec![], None, Some(TOKEN))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, _) = f
        .post_raw(
            "/v2/repository/models/..%2F..%2Fetc/load",
            vec![],
            None,
            Some(TOKEN),
        )
        .await;
    // The name decodes to "../../etc": not a model name at all, so 400 (not "no such model").
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // Without a configured token, model control is off.
    let off = Fixture::new(HttpConfig::default());
    let (s, _, _) = off.post_raw(&unload, vec![], None, Some(TOKEN)).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn statistics_and_metrics() {
    let f = Fixture::default();
    for _ in 0..3 {
        let (s, _) = f
            .post_json(
                &format!("/v2/models/{MODEL}/infer"),
                &json_request(&[vec![1.0; 30], vec![2.0; 30]]),
            )
            .await;
        assert_eq!(s, StatusCode::OK);
    }
    // A well-formed tensor of the wrong shape reaches the model and fails there; a body
    // that does not decode fails before: both are failed requests to the model, in its
    // statistics as in the metrics and the audit trail (a red-team finding: the statistics
    // counted only the first).
    let wrong_shape = json!({"inputs": [{"name": "features", "shape": [1, 29], "datatype": "FP32", "data": vec![1.0f32; 29]}]});
    let (s, _) = f
        .post_json(&format!("/v2/models/{MODEL}/infer"), &wrong_shape)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = f
        .post_json(
            &format!("/v2/models/{MODEL}/infer"),
            &json_request(&[vec![1.0; 29]]),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    for uri in [
        format!("/v2/models/{MODEL}/stats"),
        format!("/v2/models/{MODEL}/versions/1/stats"),
        "/v2/models/stats".into(),
    ] {
        let (s, b) = f.get(&uri).await;
        assert_eq!(s, StatusCode::OK, "{uri}");
        let v: Value = serde_json::from_slice(&b).unwrap();
        let m = v["model_stats"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == MODEL)
            .unwrap()
            .clone();
        assert_eq!(m["version"], "1");
        assert_eq!(m["inference_stats"]["success"]["count"], 3, "{uri}: {m}");
        assert_eq!(
            m["inference_stats"]["fail"]["count"], 2,
            "both errors count as failed requests"
        );
        assert_eq!(m["inference_count"], 6);
        assert!(
            m["inference_stats"]["compute_infer"]["ns"]
                .as_u64()
                .unwrap()
                > 0
        );
        assert!(
            m["batch_stats"]
                .as_array()
                .unwrap()
                .iter()
                .any(|b| b["batch_size"] == 2)
        );
    }
    assert_eq!(
        f.get("/v2/models/nope/stats").await.0,
        StatusCode::NOT_FOUND
    );
    let (s, b) = f.get("/metrics").await;
    assert_eq!(s, StatusCode::OK);
    let text = String::from_utf8_lossy(&b);
    for name in [
        "nightingale_inference_requests_total",
        "nightingale_request_duration_seconds_bucket",
        "nightingale_queue_duration_seconds_bucket",
        "nightingale_compute_duration_seconds_bucket",
        "nightingale_queue_depth",
        "nightingale_models_loaded",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    assert!(text.contains("outcome=\"client_error\""));
    // Every family has its help text (a red-team finding: none had).
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split_whitespace().nth(2).unwrap();
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "no # HELP for {name}"
        );
    }
}

#[tokio::test]
async fn every_inference_is_audited_without_patient_data() {
    let f = Fixture::default();
    let rows: Vec<Vec<f32>> = test_split().into_iter().take(2).map(|(r, _)| r).collect();
    let req = Request::post(format!("/v2/models/{MODEL}/infer"))
        .header("x-request-id", "audit-test-1")
        .body(Body::from(
            serde_json::to_vec(&json_request(&rows)).unwrap(),
        ))
        .unwrap();
    let (s, headers, _) = f.call(req).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(headers["x-request-id"], "audit-test-1");
    // The same tensors sent in the binary encoding hash the same.
    let (body, n) = binary_body(&rows, json!(null));
    let (s, _, _) = f
        .post_raw(&format!("/v2/models/{MODEL}/infer"), body, Some(&n), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = f.post_json(&format!("/v2/models/{MODEL}/infer"), &json!({"inputs": [{"name": "features", "shape": [1, 29], "datatype": "FP32", "data": vec![1.0f32; 29]}]})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    let path = f._dir.path().join("audit.jsonl");
    assert_eq!(audit::verify(&path).unwrap().last_seq(), Some(2));
    let text = std::fs::read_to_string(&path).unwrap();
    let records: Vec<audit::AuditRecord> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records[0].event.request_id, "audit-test-1");
    assert_eq!(records[0].event.model, MODEL);
    assert_eq!(records[0].event.version, "1");
    assert_eq!(records[0].event.model_sha256.len(), 64);
    assert_eq!(records[0].event.rows, Some(2));
    assert_eq!(records[0].event.status, 200);
    assert_eq!(records[0].event.outcome, audit::Outcome::Ok);
    assert_eq!(records[0].event.kind, audit::EventKind::Inference);
    assert!(records[0].event.output_sha256.is_some());
    assert_eq!(
        records[0].event.input_sha256, records[1].event.input_sha256,
        "encoding-independent input digest"
    );
    assert_eq!(records[2].event.status, 400);
    assert_eq!(records[2].event.outcome, audit::Outcome::Rejected);
    assert!(records[2].event.output_sha256.is_none());
    // An id that is empty, not ASCII or too long is replaced by a UUID, the same in the
    // answer and in the audit record.
    for bad in [
        axum::http::HeaderValue::from_static(""),
        axum::http::HeaderValue::from_bytes("réq-1".as_bytes()).unwrap(),
        axum::http::HeaderValue::from_str(&"x".repeat(129)).unwrap(),
    ] {
        let req = Request::post(format!("/v2/models/{MODEL}/infer"))
            .header("x-request-id", bad.clone())
            .body(Body::from(
                serde_json::to_vec(&json_request(&rows)).unwrap(),
            ))
            .unwrap();
        let (s, headers, _) = f.call(req).await;
        assert_eq!(s, StatusCode::OK);
        let id = headers["x-request-id"].to_str().unwrap().to_owned();
        assert_eq!(id.len(), 36, "{id}");
        let text = std::fs::read_to_string(&path).unwrap();
        let last: audit::AuditRecord = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last.event.request_id, id);
    }
    // Digests only: no feature value appears in the log.
    for value in rows[0]
        .iter()
        .map(|v| v.to_string())
        .filter(|v| v.contains('.'))
    {
        assert!(
            !text.contains(&value),
            "the log must not hold input values ({value})"
        );
    }
}

#[tokio::test]
async fn two_versions_serve_side_by_side() {
    let f = Fixture::build(HttpConfig::default(), true);
    let (s, b) = f.get(&format!("/v2/models/{MODEL}")).await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["versions"], json!(["1", "2"]));
    // Each version against onnxruntime's probabilities for it, from the test split.
    let csv = std::fs::read_to_string(bundles().join(MODEL).join("testdata/test.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (c1, c2) = (col("expected_p_malignant"), col("expected_p_malignant_v2"));
    let table: Vec<Vec<&str>> = lines.take(64).map(|l| l.split(',').collect()).collect();
    let rows: Vec<Vec<f32>> = table
        .iter()
        .map(|c| c[..30].iter().map(|v| v.parse().unwrap()).collect())
        .collect();
    for (uri, version, column) in [
        (format!("/v2/models/{MODEL}/versions/1/infer"), "1", c1),
        (format!("/v2/models/{MODEL}/versions/2/infer"), "2", c2),
        (format!("/v2/models/{MODEL}/infer"), "2", c2),
    ] {
        let (s, v) = f.post_json(&uri, &json_request(&rows)).await;
        assert_eq!(s, StatusCode::OK, "{uri}: {v}");
        assert_eq!(v["model_version"], version, "{uri}");
        let p = probabilities(&v);
        for (i, cells) in table.iter().enumerate() {
            let want: f32 = cells[column].parse().unwrap();
            assert!(
                (p[2 * i] - want).abs() <= 1e-5,
                "{uri} row {i}: {} vs {want}",
                p[2 * i]
            );
        }
    }
}

/// A request body that never finishes arriving (a slow or stalled client).
struct Stalled;

impl http_body::Body for Stalled {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Pending
    }
}

#[tokio::test]
async fn a_stalled_body_times_out_with_408() {
    let f = Fixture::new(HttpConfig {
        request_timeout: std::time::Duration::from_millis(200),
        ..HttpConfig::default()
    });
    let req = Request::post(format!("/v2/models/{MODEL}/infer"))
        .body(Body::new(Stalled))
        .unwrap();
    let (s, _, b) = f.call(req).await;
    assert_eq!(s, StatusCode::REQUEST_TIMEOUT);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert!(error_of(&v).contains("did not complete"), "{v}");
    // The request reached the model before its body stalled: it is audited as a timeout.
    let log = f._dir.path().join("audit.jsonl");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while audit::verify(&log).map_or(0, |s| s.records) == 0 && std::time::Instant::now() < until {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let record: audit::AuditRecord = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(
        (record.event.status, record.event.outcome),
        (408, audit::Outcome::Timeout)
    );
    assert_eq!(record.event.input_sha256, None, "the body never arrived");
    // And counted as a failure in the statistics extension, as the trail says (a call
    // dropped at its deadline was counted nowhere: a red-team finding).
    let (s, _, b) = f
        .call(
            Request::get(format!("/v2/models/{MODEL}/stats"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let stats: Value = serde_json::from_slice(&b).unwrap();
    let m = &stats["model_stats"][0];
    assert_eq!(m["inference_stats"]["fail"]["count"], 1, "{m}");
    assert_eq!(m["inference_stats"]["success"]["count"], 0, "{m}");
    // The server goes on serving.
    let (s, _) = f
        .post_json(
            &format!("/v2/models/{MODEL}/infer"),
            &json_request(&[vec![1.0; 30]]),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
}

/// A bundle whose engine panics at warm-up (tract 0.23.9 on an out-of-range Gather; the
/// fixture is written by models/train/make_load_fixtures.py) is reported while the good one
/// serves: the initial load finishes, so the server becomes ready.
#[tokio::test]
async fn a_bundle_that_panics_in_warm_up_is_reported_and_the_server_becomes_ready() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&bundles().join(MODEL), &dir.path().join(MODEL));
    keep_only_version_1(&dir.path().join(MODEL));
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models/tests/fixtures/bundles/gather-out-of-range");
    copy_dir(&fixture, &dir.path().join("gather-out-of-range"));
    let repository = Arc::new(Repository::new(dir.path(), RepositoryOptions::default()));
    let audit = AuditLog::open(&dir.path().join("audit.jsonl"), false).unwrap();
    let state = AppState::new(
        repository.clone(),
        audit,
        HttpConfig::default(),
        Some(http::install_recorder()),
    );
    // As `serve` does: load everything off the async threads, then mark the server ready.
    let loader = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || {
            let outcomes = state.repository.load_all().unwrap();
            state.set_ready(true);
            outcomes
        })
    };
    let outcomes = loader.await.expect("the initial load does not panic");
    assert_eq!(outcomes.len(), 2);
    let f = Fixture { _dir: dir, state };
    assert_eq!(f.get("/v2/health/ready").await.0, StatusCode::OK);

    let (s, index) = f.post_json("/v2/repository/index", &json!({})).await;
    assert_eq!(s, StatusCode::OK);
    let row = |name: &str| {
        index
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing from {index}"))
            .clone()
    };
    let bad = row("gather-out-of-range");
    assert_eq!(bad["state"], "UNAVAILABLE");
    let reason = bad["reason"].as_str().unwrap();
    assert!(
        reason.starts_with(
            "gather-out-of-range/1/model.onnx: the tract engine panicked while warming up"
        ),
        "{reason}"
    );
    let root = f._dir.path().to_str().unwrap();
    assert!(!index.to_string().contains(root), "{index}");
    let good = row(MODEL);
    assert_eq!(good["state"], "READY");
    assert_eq!(good["backend"], "tract");

    let (s, b) = f.get("/v2/models/gather-out-of-range/ready").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let body = String::from_utf8_lossy(&b);
    assert!(body.contains("panicked") && !body.contains(root), "{body}");
    let (s, v) = f
        .post_json(
            &format!("/v2/models/{MODEL}/infer"),
            &json_request(&[vec![1.0; 30]]),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

/// Triton's raw binary request (qa/L0_http/http_test.py `test_raw_binary*`): with
/// `Inference-Header-Content-Length: 0` the body is the one input's bytes, the batch size is
/// deduced from its length, and every output comes back binary.
#[tokio::test]
async fn raw_binary_request_deduces_the_shape() {
    let f = Fixture::default();
    let split = test_split();
    let uri = format!("/v2/models/{MODEL}/infer");
    let raw: Vec<u8> = split[..3]
        .iter()
        .flat_map(|(r, _)| r.iter().flat_map(|x| x.to_le_bytes()))
        .collect();
    let check = |status: StatusCode, headers: &axum::http::HeaderMap, b: &Bytes| {
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(b));
        let n: usize = headers["inference-header-content-length"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let v: Value = serde_json::from_slice(&b[..n]).unwrap();
        assert_eq!(v["outputs"][0]["name"], "label");
        assert_eq!(v["outputs"][0]["shape"], json!([3]));
        assert_eq!(v["outputs"][0]["parameters"]["binary_data_size"], 24);
        assert_eq!(v["outputs"][1]["shape"], json!([3, 2]));
        assert_eq!(v["outputs"][1]["parameters"]["binary_data_size"], 24);
        let tail = &b[n..];
        assert_eq!(tail.len(), 48);
        for (i, (_, p_malignant)) in split[..3].iter().enumerate() {
            let label = i64::from_le_bytes(tail[8 * i..8 * i + 8].try_into().unwrap());
            assert_eq!(label, onnxruntime_label(*p_malignant), "row {i}");
            let at = 24 + 8 * i;
            let p = f32::from_le_bytes(tail[at..at + 4].try_into().unwrap());
            assert!(
                (p - p_malignant).abs() <= 1e-5,
                "row {i}: {p} vs {p_malignant}"
            );
        }
    };
    let (s, headers, b) = f.post_raw(&uri, raw.clone(), Some("0"), None).await;
    check(s, &headers, &b);
    // The same bytes in chunks of no declared length (Transfer-Encoding: chunked).
    let req = Request::post(&uri)
        .header("Inference-Header-Content-Length", "0")
        .body(Body::new(Chunks::new(raw.clone(), 100)))
        .unwrap();
    let (s, headers, b) = f.call(req).await;
    check(s, &headers, &b);
    // Bytes that are not whole rows of 30 FP32.
    let (s, _, b) = f
        .post_raw(&uri, raw[..raw.len() - 4].to_vec(), Some("0"), None)
        .await;
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        error_of(&v)
            .contains("356 bytes are not a whole number of FP32 elements of shape [-1, 30]"),
        "{v}"
    );
}

/// Duplicate output names (Triton's `test_duplicate_output_names`) and duplicate input names
/// are refused with 400 before anything runs.
#[tokio::test]
async fn duplicate_names_are_refused() {
    let f = Fixture::default();
    let uri = format!("/v2/models/{MODEL}/infer");
    let row = vec![0.5f32; 30];
    let mut req = json_request(std::slice::from_ref(&row));
    req["outputs"] = json!([{"name": "label"}, {"name": "label"}]);
    let (s, v) = f.post_json(&uri, &req).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(error_of(&v), "output \"label\" is requested more than once");
    let one = json!({"name": "features", "shape": [1, 30], "datatype": "FP32", "data": row});
    let (s, v) = f
        .post_json(&uri, &json!({"inputs": [one.clone(), one]}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(error_of(&v), "input \"features\" is given more than once");
    // Nothing ran; both are failed requests to the model in its statistics.
    let (_, b) = f.get(&format!("/v2/models/{MODEL}/stats")).await;
    let stats: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        stats["model_stats"][0]["inference_stats"]["fail"]["count"],
        2
    );
    assert_eq!(
        stats["model_stats"][0]["inference_stats"]["compute_infer"]["count"],
        0
    );
}

/// Nested `data` decodes at any depth up to 100 levels, as Triton's limit (its
/// `test_json_recursion_depth_limit`: 50 passes, 120 is refused); every datatype decodes
/// straight into its element vector.
#[tokio::test]
async fn nested_data_up_to_the_depth_limit() {
    let f = Fixture::default();
    let uri = format!("/v2/models/{MODEL}/infer");
    let (row, p_malignant) = test_split().into_iter().next().unwrap();
    let nest = |depth: usize| -> String {
        let inner = serde_json::to_string(&row).unwrap();
        format!("{}{inner}{}", "[".repeat(depth - 1), "]".repeat(depth - 1))
    };
    let body = |depth: usize| {
        format!(
            r#"{{"inputs":[{{"name":"features","shape":[1,30],"datatype":"FP32","data":{}}}],"outputs":[{{"name":"probabilities"}}]}}"#,
            nest(depth)
        )
        .into_bytes()
    };
    let (s, _, b) = f.post_raw(&uri, body(50), None, None).await;
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!((probabilities(&v)[0] - p_malignant).abs() <= 1e-5);
    let (s, _, b) = f.post_raw(&uri, body(100), None, None).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let (s, _, b) = f.post_raw(&uri, body(101), None, None).await;
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(
        error_of(&v),
        "input \"features\": data is nested deeper than 100 levels"
    );
    // More elements than the shape holds: refused as soon as the first extra one arrives.
    let mut long = row.clone();
    long.extend_from_slice(&row);
    let (s, v) = f
        .post_json(
            &uri,
            &json!({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [long]}]}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(
        error_of(&v),
        "input \"features\": shape [1, 30] needs 30 FP32 elements but data has more"
    );
    // Elements of the wrong kind (each other datatype's decoder: src/http/codec.rs tests; a
    // datatype the model does not take is refused before its data is read).
    for (datatype, data, needle) in [
        ("FP32", json!([[true]]), "data element 0 is true"),
        ("FP32", json!([[null]]), "data element 0 is null"),
        ("FP32", json!([{"a": 1}]), "data element 0 is an object"),
        (
            "INT64",
            json!([[1.5]]),
            "has datatype INT64 but the model expects FP32",
        ),
    ] {
        let (s, v) = f
            .post_json(
                &uri,
                &json!({"inputs": [{"name": "features", "shape": [1, 1], "datatype": datatype, "data": data}]}),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{datatype}: {v}");
        assert!(error_of(&v).contains(needle), "{datatype}: {v}");
    }
}

/// Nested `data` must be rectangular and its innermost arrays the shape's last dimension
/// (extra levels of one element aside): ragged arrays, which Triton flattens as they come
/// (`[[20 values], [10 values]]` passed as one row), and arrays that would put a row boundary
/// inside one are refused.
#[tokio::test]
async fn ragged_nested_data_is_refused() {
    let f = Fixture::default();
    let uri = format!("/v2/models/{MODEL}/infer");
    let (row, p_malignant) = test_split().into_iter().next().unwrap();
    let request = |data: Value| {
        json!({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": data}],
            "outputs": [{"name": "probabilities"}]})
    };
    // Rows nested one level deeper than the shape (Triton's QA nests them 100 deep): read.
    let (s, v) = f.post_json(&uri, &request(json!([[&row[..]]]))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!((probabilities(&v)[0] - p_malignant).abs() <= 1e-5);
    for (data, reason) in [
        // Rectangular, but its arrays are not the shape's rows (3 x 20 for [2, 30] would
        // move the row boundary: a second red-team finding).
        (
            json!([&row[..15], &row[15..]]),
            "data is nested in arrays of 15 elements, but the last dimension of shape [1, 30] is 30",
        ),
        (
            json!([&row[..20], &row[20..]]),
            "data is ragged: arrays 2 levels deep hold 20 and 10 elements",
        ),
        (
            json!([[&row[..10], &row[10..20]], [&row[20..]]]),
            "data is ragged: arrays 2 levels deep hold 2 and 1 elements",
        ),
        (
            json!([&row[..29], row[29]]),
            "data is ragged: an element and an array both 1 levels deep",
        ),
        (
            json!([row[0], &row[1..]]),
            "data is ragged: an element and an array both 1 levels deep",
        ),
        // Empty arrays as filler where elements belong (a second red-team finding: the
        // rows' boundaries shifted and a 200 came back).
        (
            json!([[], &row[..]]),
            "data is ragged: arrays 2 levels deep hold 0 and 30 elements",
        ),
        (
            json!([&row[..15], [json!([]), &row[15..]]]),
            "data is ragged: an element and an array both 2 levels deep",
        ),
    ] {
        let (s, v) = f.post_json(&uri, &request(data)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(error_of(&v), format!("input \"features\": {reason}"));
    }
}

/// Rejections from axum's extractors answer in the `{"error"}` shape too.
#[tokio::test]
async fn extractor_rejections_are_json_errors() {
    let f = Fixture::default();
    for (method, uri, want) in [
        (Method::GET, "/v2/models/%FF/ready", StatusCode::BAD_REQUEST),
        (
            Method::POST,
            "/v2/models/%FF/infer",
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/v2/models/wdbc-malignancy/versions/%C3%28",
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v2/repository/models/%FF/load",
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::PUT,
            "/v2/models/wdbc-malignancy/infer",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            Method::GET,
            "/v2/models/wdbc-malignancy/versions/",
            StatusCode::NOT_FOUND,
        ),
    ] {
        // With the admin token: authentication comes before the handler's extractors.
        let (s, headers, b) = f
            .call(
                Request::builder()
                    .method(method.clone())
                    .uri(uri)
                    .header("Authorization", format!("Bearer {TOKEN}"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(s, want, "{method} {uri}: {}", String::from_utf8_lossy(&b));
        assert_eq!(
            headers["content-type"], "application/json",
            "{method} {uri}"
        );
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert!(!error_of(&v).is_empty(), "{method} {uri}: {v}");
    }
}

/// A request body that arrives in chunks, with no declared length; `stall`: then nothing
/// more, never ending.
struct Chunks {
    data: Bytes,
    chunk: usize,
    stall: bool,
}

impl Chunks {
    fn new(data: Vec<u8>, chunk: usize) -> Chunks {
        Chunks {
            data: data.into(),
            chunk,
            stall: false,
        }
    }

    /// `data` at once, then a body that never ends.
    fn then_stalled(data: Vec<u8>) -> Chunks {
        let chunk = data.len();
        Chunks {
            stall: true,
            ..Chunks::new(data, chunk)
        }
    }
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.data.is_empty() {
            return match self.stall {
                true => std::task::Poll::Pending,
                false => std::task::Poll::Ready(None),
            };
        }
        let n = self.chunk.min(self.data.len());
        let part = self.data.split_to(n);
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(part))))
    }
}

/// Waits (bounded) until `done` holds.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

/// The in-flight memory budget: a body that could never fit is 413, one that does not fit
/// now is 503 with Retry-After before its body is read (Content-Length) or as soon as its
/// chunks overrun the budget; a body is charged as its bytes arrive, so clients that declare
/// large bodies and send nothing hold none of it (a slow-body attack on the budget); the
/// budget comes back when the request ends.
#[tokio::test]
async fn the_inflight_budget_refuses_with_503_and_retry_after() {
    const BUDGET: usize = 1 << 20;
    let f = Fixture::new(HttpConfig {
        max_inflight_bytes: BUDGET,
        ..HttpConfig::default()
    });
    let uri = format!("/v2/models/{MODEL}/infer");
    let declared = |len: usize, body: Body| {
        Request::post(&uri)
            .header("content-length", len.to_string())
            .body(body)
            .unwrap()
    };
    // Twice 600 000 bytes is more than the whole budget.
    let (s, _, b) = f.call(declared(600_000, Body::new(Stalled))).await;
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(error_of(&v).contains("max_inflight_bytes"), "{v}");
    assert_eq!(f.state.inflight_bytes_free(), BUDGET);

    // Eight clients declare 300 000 bytes each and send nothing: they hold no budget, and a
    // request that comes after them is answered.
    let app = http::app(f.state.clone());
    let idle: Vec<_> = (0..8)
        .map(|_| tokio::spawn(app.clone().oneshot(declared(300_000, Body::new(Stalled)))))
        .collect();
    let (row, p_malignant) = test_split().into_iter().next().unwrap();
    let (s, v) = f
        .post_json(&uri, &json_request(std::slice::from_ref(&row)))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!((probabilities(&v)[0] - p_malignant).abs() <= 1e-5);
    assert_eq!(f.state.inflight_bytes_free(), BUDGET);

    // One client has sent 300 000 bytes of its body and stalls: it holds twice that.
    let holder = tokio::spawn(app.oneshot(declared(
        400_000,
        Body::new(Chunks::then_stalled(vec![b' '; 300_000])),
    )));
    until("the first request is charged", || {
        f.state.inflight_bytes_free() < BUDGET
    })
    .await;
    assert_eq!(
        f.state.inflight_bytes_free(),
        BUDGET - 600_000usize.div_ceil(1024) * 1024
    );
    // 448 KiB are left: a declared 300 000 bytes do not fit, refused before reading.
    let (s, headers, b) = f.call(declared(300_000, Body::new(Stalled))).await;
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(headers["retry-after"], "1");
    assert!(error_of(&v).contains("in-flight memory budget"), "{v}");
    // A chunked body is charged as it arrives: 4 x 100 000 bytes overrun the 448 KiB left.
    let req = Request::post(&uri)
        .body(Body::new(Chunks::new(vec![b' '; 400_000], 100_000)))
        .unwrap();
    let (s, headers, _) = f.call(req).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "1");
    // A small request still fits and is answered right.
    let (s, v) = f.post_json(&uri, &json_request(&[row])).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!((probabilities(&v)[0] - p_malignant).abs() <= 1e-5);
    // The stalled clients go away: the share comes back.
    holder.abort();
    let _ = holder.await;
    for client in idle {
        client.abort();
        let _ = client.await;
    }
    until("the budget is whole again", || {
        f.state.inflight_bytes_free() == BUDGET
    })
    .await;
}

/// The cap on requests in flight: a request takes its place once its body is in (a client
/// that never sends its body holds none), and keeps it until its answer is ready; the
/// answer then holds its bytes until it has gone out, not the place (unread answers held
/// every place for two minutes: a red-team finding).
#[tokio::test]
async fn the_inflight_request_cap_refuses_with_503_and_retry_after() {
    let f = Fixture::new(HttpConfig {
        max_inflight_requests: 1,
        ..HttpConfig::default()
    });
    let uri = format!("/v2/models/{MODEL}/infer");
    let app = http::app(f.state.clone());
    let full = f.state.inflight_bytes_free();
    let valid = || {
        Request::post(&uri)
            .body(Body::from(
                serde_json::to_vec(&json_request(&[vec![1.0; 30]])).unwrap(),
            ))
            .unwrap()
    };
    // Clients whose bodies never come hold no place.
    let idle: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(
                app.clone().oneshot(
                    Request::post(&uri)
                        .header("content-length", "1000")
                        .body(Body::new(Stalled))
                        .unwrap(),
                ),
            )
        })
        .collect();
    let (s, _, b) = f.call(valid()).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    // A response not yet sent (its body unread) holds its bytes, not the one place.
    let held = app.clone().oneshot(valid()).await.unwrap();
    assert_eq!(held.status(), StatusCode::OK);
    assert!(f.state.inflight_bytes_free() < full);
    let (s, _, b) = f.call(valid()).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    // (The refusal while a request holds the place: `admission_tests` in src/http/mod.rs.)
    drop(held);
    for client in idle {
        client.abort();
        let _ = client.await;
    }
    until("the request is released", || {
        f.state.inflight_bytes_free() == full
    })
    .await;
    let (s, _, _) = f.call(valid()).await;
    assert_eq!(s, StatusCode::OK);
}

/// `[batching] max_rows_per_request` in bundle.toml limits the rows of one request (400 with
/// the limit named), and `queue_bytes` is read from the manifest too.
#[tokio::test]
async fn the_bundle_sets_its_row_limit_per_request() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join(MODEL);
    copy_dir(&bundles().join(MODEL), &bundle);
    keep_only_version_1(&bundle);
    let manifest = std::fs::read_to_string(bundle.join("bundle.toml")).unwrap();
    std::fs::write(
        bundle.join("bundle.toml"),
        manifest.replacen(
            "[batching]\n",
            "[batching]\nmax_rows_per_request = 2\nqueue_bytes = 1048576\n",
            1,
        ),
    )
    .unwrap();
    let repository = Arc::new(Repository::new(dir.path(), RepositoryOptions::default()));
    repository.load(MODEL).unwrap();
    let config = repository.get(MODEL, None).unwrap().worker.config().clone();
    assert_eq!(
        (config.max_rows_per_request, config.queue_bytes),
        (2, 1 << 20)
    );
    let audit = AuditLog::open(&dir.path().join("audit.jsonl"), false).unwrap();
    let state = AppState::new(repository, audit, HttpConfig::default(), None);
    state.set_ready(true);
    let f = Fixture { _dir: dir, state };
    let uri = format!("/v2/models/{MODEL}/infer");
    let (s, _) = f
        .post_json(&uri, &json_request(&[vec![1.0; 30], vec![2.0; 30]]))
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = f
        .post_json(
            &uri,
            &json_request(&[vec![1.0; 30], vec![2.0; 30], vec![3.0; 30]]),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        error_of(&v).contains("at most 2 rows per request (max_rows_per_request)"),
        "{v}"
    );
}

/// Triton's model configuration (`GET .../config`) of a bundle with dynamic batching off and
/// a `specific` version policy: `max_batch_size` 0, so `dims` are the whole shapes (the
/// batch dimension included), no `dynamic_batching`; the policy as the bundle states it.
/// (The reference bundle's own configuration, batching on, is checked against its
/// bundle.toml and onnxruntime by tests/peer/test_tritonclient.py.)
#[tokio::test]
async fn model_configuration_without_batching_gives_whole_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join(MODEL);
    copy_dir(&bundles().join(MODEL), &bundle);
    keep_only_version_1(&bundle);
    let manifest = std::fs::read_to_string(bundle.join("bundle.toml")).unwrap();
    let edited = manifest
        .replacen("max_batch_size = 64\n", "max_batch_size = 1\n", 1)
        .replacen(
            "[version_policy]\npolicy = \"all\"\n",
            "[version_policy]\npolicy = \"specific\"\nversions = [1]\n",
            1,
        );
    assert_ne!(edited, manifest);
    std::fs::write(bundle.join("bundle.toml"), edited).unwrap();
    let repository = Arc::new(Repository::new(dir.path(), RepositoryOptions::default()));
    repository.load(MODEL).unwrap();
    let audit = AuditLog::open(&dir.path().join("audit.jsonl"), false).unwrap();
    let state = AppState::new(repository, audit, HttpConfig::default(), None);
    state.set_ready(true);
    let f = Fixture { _dir: dir, state };

    let (s, body) = f.get(&format!("/v2/models/{MODEL}/config")).await;
    assert_eq!(s, StatusCode::OK);
    let config: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        config,
        json!({
            "name": MODEL,
            "platform": "onnx",
            "backend": "tract",
            "version_policy": {"specific": {"versions": [1]}},
            "max_batch_size": 0,
            "input": [{"name": "features", "data_type": "TYPE_FP32", "format": "FORMAT_NONE", "dims": [-1, 30]}],
            "output": [
                {"name": "label", "data_type": "TYPE_INT64", "dims": [-1]},
                {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [-1, 2]},
            ],
            "instance_group": [{"name": MODEL, "kind": "KIND_CPU", "count": 1}],
        })
    );
    let (s, body) = f
        .get(&format!("/v2/models/{MODEL}/versions/1/config"))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), config);
    for (uri, reason) in [
        (
            format!("/v2/models/{MODEL}/versions/7/config"),
            "has no version \"7\" being served",
        ),
        ("/v2/models/nope/config".to_owned(), "unknown model"),
    ] {
        let (s, body) = f.get(&uri).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{uri}");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert!(error_of(&v).contains(reason), "{uri}: {v}");
    }
    // Classification still ranks each row's classes: the output's first dimension is the
    // request's rows (a re-attack's finding: without batching the whole output was ranked,
    // the rows, patients, against each other, and their labels lost).
    let split: Vec<(Vec<f32>, f32)> = test_split().into_iter().take(3).collect();
    let rows: Vec<Vec<f32>> = split.iter().map(|(r, _)| r.clone()).collect();
    let mut req = json_request(&rows);
    req["outputs"] = json!([{"name": "probabilities", "parameters": {"classification": 2}}]);
    let (s, v) = f
        .post_json(&format!("/v2/models/{MODEL}/infer"), &req)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["outputs"][0]["shape"], json!([3, 2]));
    for i in 0..3 {
        let pair: Vec<&str> = (0..2)
            .map(|k| v["outputs"][0]["data"][i * 2 + k].as_str().unwrap())
            .collect();
        assert!(
            pair.iter().any(|t| t.ends_with(":0:malignant"))
                && pair.iter().any(|t| t.ends_with(":1:benign")),
            "row {i}: {pair:?}"
        );
    }
}

/// Requests of any route open at once are capped (`--max-open-requests`) from their headers
/// until their answer has been sent: one client's HTTP/2 streams, never read, held 1.5 GB
/// and kept everyone else waiting (a red-team finding). Beyond the cap a request is refused
/// at once with Retry-After; health checks are answered whatever the count; a place comes
/// back when its answer has been sent (or dropped).
#[tokio::test]
async fn requests_open_at_once_are_capped_until_their_answers_are_sent() {
    let f = Fixture::new(HttpConfig {
        max_open_requests: 1,
        ..HttpConfig::default()
    });
    let open = |uri: &str| {
        http::app(f.state.clone()).oneshot(Request::get(uri).body(Body::empty()).unwrap())
    };
    // An answer not read yet holds its place.
    let held = open("/v2/models/stats").await.unwrap();
    assert_eq!(held.status(), StatusCode::OK);
    let refused = open("/v2").await.unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers().contains_key("retry-after"));
    let body = refused.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("max_open_requests"),
        "{body:?}"
    );
    for health in ["/v2/health/live", "/v2/health/ready"] {
        assert_eq!(open(health).await.unwrap().status(), StatusCode::OK);
    }
    // Read to its end, the answer gives its place back.
    held.into_body().collect().await.unwrap();
    assert_eq!(open("/v2").await.unwrap().status(), StatusCode::OK);
}

/// One client holds at most an eighth of the places (a re-attack: one client without
/// credentials took all 8,192 with unread HTTP/2 streams and every other client was answered
/// 503 for two minutes); its health checks count in its share, not in the server's.
#[tokio::test]
async fn one_client_holds_at_most_its_share_of_the_open_requests() {
    use nightingale::http::clients::ClientAddr;
    let f = Fixture::new(HttpConfig {
        max_open_requests: 16,
        max_open_requests_per_client: Some(2),
        ..HttpConfig::default()
    });
    let from = |ip: [u8; 4], uri: &str| {
        let mut req = Request::get(uri).body(Body::empty()).unwrap();
        req.extensions_mut()
            .insert(ClientAddr(std::net::IpAddr::from(ip)));
        http::app(f.state.clone()).oneshot(req)
    };
    let mut held = vec![];
    for _ in 0..2 {
        let r = from([10, 0, 0, 1], "/v2/models/stats").await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        held.push(r);
    }
    let refused = from([10, 0, 0, 1], "/v2").await.unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = refused.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("this client"),
        "{body:?}"
    );
    // Its health checks count apart (a busy proxy's probe is answered), up to their own
    // bound per client.
    let mut probes = vec![];
    for _ in 0..http::HEALTH_CHECKS_PER_CLIENT {
        let r = from([10, 0, 0, 1], "/v2/health/ready").await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        probes.push(r);
    }
    let refused = from([10, 0, 0, 1], "/v2/health/live").await.unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    drop(probes);
    // Another client is served.
    assert_eq!(
        from([10, 0, 0, 2], "/v2").await.unwrap().status(),
        StatusCode::OK
    );
    drop(held);
    assert_eq!(
        from([10, 0, 0, 1], "/v2").await.unwrap().status(),
        StatusCode::OK
    );
}
