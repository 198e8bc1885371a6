//! Hostile input: thousands of mutated, truncated and oversized requests through the router.
//! Every answer must be a well-formed JSON error with a 4xx status (or a 200 where the mutation
//! happened to stay valid), never a 5xx or a panic, and the model must still answer correctly
//! afterwards.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use nightingale::audit::AuditLog;
use nightingale::http::{self, AppState, HttpConfig};
use nightingale_models::{Repository, RepositoryOptions};
use serde_json::{Value, json};
use tower::ServiceExt;

const MODEL: &str = "wdbc-malignancy";

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn state(dir: &tempfile::TempDir) -> Arc<AppState> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/bundles");
    let repository = Arc::new(Repository::new(root, RepositoryOptions::default()));
    repository.load(MODEL).unwrap();
    let audit = AuditLog::open(&dir.path().join("audit.jsonl"), false).unwrap();
    let s = AppState::new(
        repository,
        audit,
        HttpConfig {
            max_body_bytes: 1 << 20,
            ..HttpConfig::default()
        },
        None,
    );
    s.set_ready(true);
    s
}

async fn send(
    state: &Arc<AppState>,
    body: Vec<u8>,
    header_len: Option<String>,
) -> (StatusCode, Vec<u8>) {
    let mut req = Request::post(format!("/v2/models/{MODEL}/infer"));
    if let Some(n) = header_len {
        req = req.header("Inference-Header-Content-Length", n);
    }
    let res = http::app(state.clone())
        .oneshot(req.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = res.status();
    (
        status,
        res.into_body().collect().await.unwrap().to_bytes().to_vec(),
    )
}

fn valid_json(rows: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({"id": "x", "inputs": [{"name": "features", "shape": [rows, 30], "datatype": "FP32",
        "data": vec![0.25f32; rows * 30]}], "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}]}))
    .unwrap()
}

fn valid_binary(rows: usize) -> (Vec<u8>, usize) {
    let raw: Vec<u8> = vec![0.25f32; rows * 30]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let mut body = serde_json::to_vec(
        &json!({"inputs": [{"name": "features", "shape": [rows, 30], "datatype": "FP32",
        "parameters": {"binary_data_size": raw.len()}}]}),
    )
    .unwrap();
    let n = body.len();
    body.extend_from_slice(&raw);
    (body, n)
}

fn mutate(rng: &mut Rng, mut body: Vec<u8>) -> Vec<u8> {
    const TOKENS: [&[u8]; 12] = [
        b"-1",
        b"1e309",
        b"18446744073709551616",
        b"null",
        b"[[[[[[",
        b"\"BYTES\"",
        b"\"FP16\"",
        b"{}",
        b"\xff\xfe",
        b"9999999999",
        b"\"binary_data_size\":4",
        b"0",
    ];
    for _ in 0..=rng.below(4) {
        if body.is_empty() {
            break;
        }
        let at = rng.below(body.len());
        match rng.below(5) {
            0 => body[at] = rng.next() as u8,
            1 => body.truncate(at),
            2 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                body.splice(at..at, t.iter().copied());
            }
            3 => {
                let end = (at + rng.below(16)).min(body.len());
                body.drain(at..end);
            }
            _ => {
                let chunk = body[at..(at + rng.below(32)).min(body.len())].to_vec();
                body.splice(at..at, chunk);
            }
        }
    }
    body
}

#[tokio::test]
async fn mutated_requests_never_crash_or_500() {
    let dir = tempfile::tempdir().unwrap();
    let state = state(&dir);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..3000 {
        let (body, header_len) = if i % 2 == 0 {
            {
                let rows = 1 + rng.below(3);
                (mutate(&mut rng, valid_json(rows)), None)
            }
        } else {
            let (b, n) = valid_binary(1 + rng.below(3));
            let n = match rng.below(4) {
                0 => n.to_string(),
                1 => rng.below(b.len() * 2).to_string(),
                2 => format!("{}", rng.next()),
                _ => n.to_string(),
            };
            (mutate(&mut rng, b), Some(n))
        };
        let (status, answer) = send(&state, body, header_len).await;
        *statuses.entry(status.as_u16()).or_insert(0) += 1;
        assert!(
            status == StatusCode::OK || status.is_client_error(),
            "case {i}: {status} {}",
            String::from_utf8_lossy(&answer)
        );
        if status != StatusCode::OK {
            let v: Value = serde_json::from_slice(&answer)
                .unwrap_or_else(|_| panic!("case {i}: error body is not JSON"));
            assert!(
                v["error"].as_str().is_some_and(|e| !e.is_empty()),
                "case {i}: {v}"
            );
        }
    }
    assert!(
        statuses.get(&400).copied().unwrap_or(0) > 1000,
        "{statuses:?}"
    );
    // Still serving, and right.
    let (status, _) = send(&state, valid_json(2), None).await;
    assert_eq!(status, StatusCode::OK);
    nightingale::audit::verify(&dir.path().join("audit.jsonl")).unwrap();
}

#[tokio::test]
async fn pathological_payloads_are_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let state = state(&dir);
    let deep = format!(
        "{{\"inputs\":[{{\"name\":\"features\",\"shape\":[1,30],\"datatype\":\"FP32\",\"data\":{}{}}}]}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let huge_shape = serde_json::to_vec(&json!({"inputs": [{"name": "features", "shape": [1u64 << 40, 1u64 << 40], "datatype": "FP32", "parameters": {"binary_data_size": 0}}]})).unwrap();
    let many_inputs = serde_json::to_vec(&json!({"inputs": (0..5000).map(|i| json!({"name": format!("in{i}"), "shape": [1], "datatype": "FP32", "data": [1.0]})).collect::<Vec<_>>()})).unwrap();
    let bytes_bomb = serde_json::to_vec(&json!({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "BYTES", "parameters": {"binary_data_size": 8}}]})).unwrap();
    let mut bytes_bomb_body = bytes_bomb.clone();
    bytes_bomb_body.extend_from_slice(&[0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0]);
    let cases: Vec<(Vec<u8>, Option<String>, StatusCode)> = vec![
        (deep.into_bytes(), None, StatusCode::BAD_REQUEST),
        (huge_shape, None, StatusCode::BAD_REQUEST),
        (many_inputs, None, StatusCode::BAD_REQUEST),
        (
            bytes_bomb_body,
            Some(bytes_bomb.len().to_string()),
            StatusCode::BAD_REQUEST,
        ),
        (vec![b' '; 2 << 20], None, StatusCode::PAYLOAD_TOO_LARGE),
        (vec![], None, StatusCode::BAD_REQUEST),
        (
            b"\x00\x01\x02".to_vec(),
            Some("2".into()),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (i, (body, header_len, want)) in cases.into_iter().enumerate() {
        let (status, answer) = send(&state, body, header_len).await;
        assert_eq!(
            status,
            want,
            "case {i}: {}",
            String::from_utf8_lossy(&answer[..answer.len().min(300)])
        );
        let v: Value = serde_json::from_slice(&answer).unwrap();
        assert!(v["error"].is_string());
    }
}
