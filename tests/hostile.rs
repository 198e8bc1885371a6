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

/// Rows of the bundle's test split with onnxruntime's P(malignant) for each from the served
/// version (the highest, 2: column `expected_p_malignant_v2`).
fn test_split() -> Vec<(Vec<f32>, f32)> {
    let csv = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("models/bundles")
            .join(MODEL)
            .join("testdata/test.csv"),
    )
    .unwrap();
    let mut lines = csv.lines();
    let col = lines
        .next()
        .unwrap()
        .split(',')
        .position(|h| h == "expected_p_malignant_v2")
        .unwrap();
    lines
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            (
                cells[..30].iter().map(|v| v.parse().unwrap()).collect(),
                cells[col].parse().unwrap(),
            )
        })
        .collect()
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
        // A fixed URI and bodies under the limit: a mutation is either still valid or a 400.
        assert!(
            status == StatusCode::OK || status == StatusCode::BAD_REQUEST,
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
    // Still serving, and right: onnxruntime's probabilities for real rows of the test split.
    let split = test_split();
    let flat: Vec<f32> = split[..2].iter().flat_map(|(r, _)| r.clone()).collect();
    let body = serde_json::to_vec(&json!({"inputs": [{"name": "features", "shape": [2, 30], "datatype": "FP32", "data": flat}],
        "outputs": [{"name": "probabilities"}]}))
    .unwrap();
    let (status, answer) = send(&state, body, None).await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_slice(&answer).unwrap();
    let p = v["outputs"][0]["data"].as_array().unwrap();
    for (i, (_, want)) in split[..2].iter().enumerate() {
        let got = p[2 * i].as_f64().unwrap() as f32;
        assert!(
            (got - want).abs() <= 1e-5,
            "row {i}: {got} vs onnxruntime {want}"
        );
    }
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
    // Red-team finding: the id is echoed in the response, and a 60 MB id (58 KB gzipped)
    // made a 60 MB response. At most 1,024 bytes are taken; 1,024 is.
    let with_id = |id: String| {
        let mut v: Value = serde_json::from_slice(&valid_json(1)).unwrap();
        v["id"] = json!(id);
        serde_json::to_vec(&v).unwrap()
    };
    let cases: Vec<(Vec<u8>, Option<String>, StatusCode)> = vec![
        (with_id("i".repeat(1025)), None, StatusCode::BAD_REQUEST),
        (with_id("i".repeat(1024)), None, StatusCode::OK),
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
        if want == StatusCode::OK {
            continue;
        }
        let v: Value = serde_json::from_slice(&answer).unwrap();
        assert!(v["error"].is_string());
        if i == 0 {
            assert!(
                v["error"].as_str().unwrap().contains("an id of 1025 bytes"),
                "{v}"
            );
        }
    }
}

/// One HTTP/1.1 exchange on a fresh connection, as a client that sends its body only after
/// `100 Continue` (`expect`), or a chunked one that sends it straight away. Returns the final
/// status, the Retry-After header and the body.
fn exchange(
    addr: std::net::SocketAddr,
    body: &[u8],
    chunked: bool,
) -> std::io::Result<(u16, Option<String>, Vec<u8>)> {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(120)))?;
    stream.set_write_timeout(Some(std::time::Duration::from_secs(120)))?;
    let head = if chunked {
        format!(
            "POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {addr}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
    } else {
        format!(
            "POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
            body.len()
        )
    };
    stream.write_all(head.as_bytes())?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let read_head = |reader: &mut BufReader<std::net::TcpStream>| -> std::io::Result<(u16, Vec<(String, String)>)> {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut headers = vec![];
        loop {
            let mut h = String::new();
            reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        Ok((status, headers))
    };
    let (mut status, mut headers) = if chunked {
        for part in body.chunks(1 << 20) {
            stream.write_all(format!("{:x}\r\n", part.len()).as_bytes())?;
            stream.write_all(part)?;
            stream.write_all(b"\r\n")?;
        }
        stream.write_all(b"0\r\n\r\n")?;
        read_head(&mut reader)?
    } else {
        read_head(&mut reader)?
    };
    if status == 100 {
        stream.write_all(body)?;
        (status, headers) = read_head(&mut reader)?;
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mut answer = vec![];
    match header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        Some(n) => {
            answer.resize(n, 0);
            reader.read_exact(&mut answer)?;
        }
        None => {
            reader.read_to_end(&mut answer)?;
        }
    }
    Ok((status, header("retry-after"), answer))
}

/// A kernel-reported figure of a process, in bytes (`VmRSS`, `VmHWM`).
fn proc_status_bytes(pid: u32, field: &str) -> usize {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("{field} missing from /proc/{pid}/status"));
    let kib: usize = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

/// Whether the server at `addr` answers ready.
fn answers_ready(addr: std::net::SocketAddr) -> bool {
    std::net::TcpStream::connect(addr).is_ok_and(|mut s| {
        use std::io::{Read, Write};
        let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
        s.write_all(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .is_ok()
            && {
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                out.starts_with("HTTP/1.1 200")
            }
    })
}

fn free_addr() -> std::net::SocketAddr {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}").parse().unwrap()
}

/// Starts `nightingale serve` on the reference bundles with `args`, its data and audit log in
/// `dir` and its stderr in `dir/stderr.log`, and waits (up to 120 s) until it answers ready.
/// The port is picked free just before the start, so another process (e.g. a client of a test
/// running beside this one) may take it first: a server that exits before it is ready is
/// started again on another port (at most 5 tries); one that exits for another reason fails
/// the test with its log.
fn start_server(
    dir: &std::path::Path,
    args: &[&str],
    log_level: &str,
) -> (Server, std::net::SocketAddr) {
    let log = dir.join("stderr.log");
    for _ in 0..5 {
        let addr = free_addr();
        let mut server = Server(
            std::process::Command::new(env!("CARGO_BIN_EXE_nightingale"))
                .args(["serve", "--repository"])
                .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/bundles"))
                .args(["--http-addr", &addr.to_string()])
                .args(args)
                .arg("--audit-log")
                .arg(dir.join("audit.jsonl"))
                .arg("--data-dir")
                .arg(dir.join("data"))
                .env("NIGHTINGALE_LOG", log_level)
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            if answers_ready(addr) {
                return (server, addr);
            }
            if let Some(status) = server.0.try_wait().unwrap() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                assert!(
                    text.contains("in use"),
                    "the server exited ({status}) before it was ready:\n{text}"
                );
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "server not ready within 120 s:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    panic!("no free port for the server in 5 tries");
}

/// Text logs written to a file (not a terminal) carry no ANSI colour codes.
#[test]
fn logs_to_a_file_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = start_server(dir.path(), &["--log-format", "text"], "info");
    drop(server);
    let text = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap();
    assert!(text.contains("listening"), "{text}");
    assert!(
        !text.contains('\x1b'),
        "escape codes in the log file:\n{text}"
    );
}

/// Stops the server when the test ends, however it ends.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// 32 clients each send a 48 MiB JSON body at once (plus 8 chunked ones) to a real server
/// process whose in-flight budget is 256 MiB: those that do not fit get 503 with Retry-After,
/// the others are decoded and refused for their row count (4096 per request by default), and the
/// server's peak resident memory stays under its resident size before the burst plus the
/// budget plus 64 MiB of fixed overhead (HTTP read buffers of 40 connections, thread stacks,
/// allocator slack).
#[test]
fn concurrent_large_bodies_stay_within_the_memory_budget() {
    const BUDGET: usize = 256 << 20;
    const OVERHEAD: usize = 64 << 20;
    const BODY: usize = 48 << 20;
    let dir = tempfile::tempdir().unwrap();
    let (server, addr) = start_server(
        dir.path(),
        &[
            "--max-inflight-bytes",
            &BUDGET.to_string(),
            "--max-body-bytes",
            &(64usize << 20).to_string(),
        ],
        "warn",
    );
    let pid = server.0.id();
    // One ordinary request first, so the baseline includes a served inference.
    let split = test_split();
    let small = serde_json::to_vec(&json!({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": split[0].0}]})).unwrap();
    let (status, _, _) = exchange(addr, &small, false).unwrap();
    assert_eq!(status, 200);
    let baseline = proc_status_bytes(pid, "VmRSS:");

    // 48 MiB of real rows, repeated: ~150 000 rows of 30 FP32.
    let mut body =
        br#"{"inputs":[{"name":"features","datatype":"FP32","shape":[ROWS,30],"data":["#.to_vec();
    let mut rows = 0usize;
    while body.len() < BODY - 400 {
        let row = &split[rows % split.len()].0;
        if rows > 0 {
            body.push(b',');
        }
        body.extend_from_slice(serde_json::to_string(row).unwrap().as_bytes());
        rows += 1;
    }
    body.extend_from_slice(b"]}]}");
    let text = String::from_utf8(body)
        .unwrap()
        .replacen("ROWS", &rows.to_string(), 1);
    let body = Arc::new(text.into_bytes());

    let clients = 40;
    let barrier = Arc::new(std::sync::Barrier::new(clients));
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let body = body.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                exchange(addr, &body, i >= 32)
            })
        })
        .collect();
    let mut refused = 0;
    let mut decoded = 0;
    for (i, h) in handles.into_iter().enumerate() {
        let (status, retry_after, answer) = h
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("client {i}: {e}"));
        let v: Value = serde_json::from_slice(&answer).unwrap_or_else(|_| {
            panic!("client {i}: {status} {}", String::from_utf8_lossy(&answer))
        });
        let error = v["error"].as_str().unwrap_or_default();
        match status {
            503 => {
                assert_eq!(retry_after.as_deref(), Some("1"), "client {i}");
                assert!(error.contains("max_inflight_bytes"), "client {i}: {error}");
                refused += 1;
            }
            400 => {
                assert_eq!(
                    error,
                    format!(
                        "the request has {rows} rows; this model takes at most 4096 rows per request (max_rows_per_request)"
                    ),
                    "client {i}"
                );
                decoded += 1;
            }
            other => panic!("client {i}: {other} {error}"),
        }
    }
    let peak = proc_status_bytes(pid, "VmHWM:");
    eprintln!(
        "{clients} clients: {decoded} decoded, {refused} refused; baseline RSS {} MiB, peak {} MiB, bound {} MiB",
        baseline >> 20,
        peak >> 20,
        (baseline + BUDGET + OVERHEAD) >> 20
    );
    assert!(
        refused > 0 && decoded > 0,
        "{decoded} decoded, {refused} refused"
    );
    assert!(
        peak <= baseline + BUDGET + OVERHEAD,
        "peak RSS {peak} > baseline {baseline} + budget {BUDGET} + overhead {OVERHEAD}"
    );
    // Still serving, and right.
    let (status, _, answer) = exchange(addr, &small, false).unwrap();
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&answer)
        .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&answer)));
    let p = v["outputs"][1]["data"][0].as_f64().unwrap() as f32;
    assert!(
        (p - split[0].1).abs() <= 1e-5,
        "{p} vs onnxruntime {}",
        split[0].1
    );
    drop(server);
}

/// Models whose tensors grow with a request (models/tests/fixtures/bundles, made by
/// models/train/make_load_fixtures.py): a `Pad` after `Slice(x, 1:)`, empty at batch 1 and 8
/// GB a row after it; a `Range` to the request's largest value; the Pad inside a `Scan`
/// body. tract aborts the process on
/// an allocation that cannot be made, so before the guard one request stopped this test's
/// process (and the server); now it is a 400 naming the limit, and the model goes on serving.
#[tokio::test]
async fn requests_that_would_have_tract_allocate_past_the_limit_are_refused_and_the_model_serves() {
    let dir = tempfile::tempdir().unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tests/fixtures/bundles");
    let repository = Arc::new(Repository::new(root, RepositoryOptions::default()));
    repository.load("batch-pad").unwrap();
    repository.load("range-from-input").unwrap();
    repository.load("scan-pad").unwrap();
    let audit = AuditLog::open(&dir.path().join("audit.jsonl"), false).unwrap();
    let state = AppState::new(repository, audit, HttpConfig::default(), None);
    state.set_ready(true);
    let infer = |model: &str, rows: usize, row: [f32; 4]| {
        let body = serde_json::to_vec(&json!({"inputs": [{"name": "x", "shape": [rows, 4],
            "datatype": "FP32", "data": row.repeat(rows)}]}))
        .unwrap();
        let request = Request::post(format!("/v2/models/{model}/infer"))
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap();
        let app = http::app(state.clone());
        async move {
            let res = app.oneshot(request).await.unwrap();
            let status = res.status();
            let body: Value =
                serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes())
                    .unwrap();
            (status, body)
        }
    };
    for (model, rows, row) in [
        ("batch-pad", 101, [1., 2., 3., 4.]),
        ("batch-pad", 2, [1., 2., 3., 4.]),
        ("range-from-input", 1, [1e12, 0., 0., 0.]),
        ("scan-pad", 101, [1., 2., 3., 4.]),
    ] {
        let (status, body) = infer(model, rows, row).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{model} {rows}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(
            error.contains("working memory") && error.contains("limit of 4294967296 bytes"),
            "{error}"
        );
    }
    // Both serve what fits; the values are onnxruntime's (the fixture script checks them).
    let (status, body) = infer("batch-pad", 1, [1., 2., 3., 4.]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outputs"][0]["data"], json!([1.0, 2.0, 3.0, 4.0]));
    let (status, body) = infer("scan-pad", 1, [1., 2., 3., 4.]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outputs"][0]["data"], json!([1.0, 2.0, 3.0, 4.0]));
    let (status, body) = infer("range-from-input", 2, [0.5, 1., 2., 3.]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["outputs"][0]["data"],
        json!([6.5, 7.0, 8.0, 9.0, 6.5, 7.0, 8.0, 9.0])
    );
}

/// A client that closes its connection before its body ends (a declared length not sent, a
/// chunk cut short) is audited `client-gone` (499), as one gone while the model runs: it
/// was audited and counted as a bad request (400), which is the caller's error (a review's
/// finding). A body that is malformed, not cut, stays a 400.
#[test]
fn a_client_gone_mid_body_is_audited_client_gone() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let (server, addr) = start_server(dir.path(), &[], "warn");
    let path = format!("/v2/models/{MODEL}/infer");
    for head_and_part in [
        format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nx-request-id: cut-length\r\nContent-Length: 1000\r\n\r\n{{\"inputs\":"
        ),
        format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nx-request-id: cut-chunk\r\nTransfer-Encoding: chunked\r\n\r\n100\r\n{{\"inputs\":"
        ),
    ] {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.write_all(head_and_part.as_bytes()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        drop(stream);
    }
    // A whole body that is not JSON: still the caller's error.
    let (status, _, _) = exchange(addr, b"{not json", false).unwrap();
    assert_eq!(status, 400);
    let trail = dir.path().join("audit.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let records = loop {
        let records: Vec<Value> = std::fs::read_to_string(&trail)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|r: &Value| {
                r["request_id"]
                    .as_str()
                    .is_some_and(|i| i.starts_with("cut-"))
            })
            .collect();
        if records.len() >= 2 || std::time::Instant::now() > deadline {
            break records;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    drop(server);
    assert_eq!(records.len(), 2, "{records:?}");
    for r in &records {
        assert_eq!(r["status"], 499, "{r}");
        assert_eq!(r["outcome"], "client-gone", "{r}");
    }
}

/// The same over HTTP/2: a client that resets its stream (CANCEL) before its body ends is
/// audited `client-gone` (it was a 400: a re-attack's finding).
#[test]
fn an_http2_stream_reset_mid_body_is_audited_client_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (server, addr) = start_server(dir.path(), &[], "warn");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        let request = axum::http::Request::post(format!("http://{addr}/v2/models/{MODEL}/infer"))
            .header("content-length", "1000")
            .header("x-request-id", "cut-h2")
            .body(())
            .unwrap();
        let (_response, mut stream) = client.send_request(request, false).unwrap();
        stream
            .send_data(bytes::Bytes::from_static(b"{\"inputs\":"), false)
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        stream.send_reset(h2::Reason::CANCEL);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    });
    let trail = dir.path().join("audit.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let record = loop {
        let found = std::fs::read_to_string(&trail)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|r| r["request_id"] == "cut-h2");
        if let Some(r) = found {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no record of the reset request"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    drop(server);
    assert_eq!(record["status"], 499, "{record}");
    assert_eq!(record["outcome"], "client-gone", "{record}");
}
