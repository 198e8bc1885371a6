//! KServe v2 gRPC (`serve --grpc-addr`) driven by a tonic client over a real loopback port:
//! health, metadata, inference with typed and raw contents (answers equal to the HTTP JSON
//! path's), errors with the HTTP path's messages and their gRPC codes, roles, the audit trail.
#![cfg(feature = "grpc")]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use nightingale::audit::AuditLog;
use nightingale::config::ServeArgs;
use nightingale::http::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use nightingale::http::grpc::proto::model_config::SchedulingChoice;
use nightingale::http::grpc::proto::model_infer_request::{
    InferInputTensor, InferRequestedOutputTensor,
};
use nightingale::http::grpc::proto::{
    InferTensorContents, ModelConfigRequest, ModelInferRequest, ModelInferResponse,
    ModelMetadataRequest, ModelReadyRequest, ModelStatisticsRequest, RepositoryIndexRequest,
    RepositoryModelLoadRequest, RepositoryModelUnloadRequest, ServerLiveRequest,
    ServerMetadataRequest, ServerReadyRequest,
};
use nightingale::http::{self, AppState, HttpConfig};
use nightingale_models::{Repository, RepositoryOptions};
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;
use tower::ServiceExt;

mod support;
use support::copy_dir;

const MODEL: &str = "wdbc-malignancy";

struct Server {
    dir: tempfile::TempDir,
    state: Arc<AppState>,
    client: GrpcInferenceServiceClient<Channel>,
    _serve: tokio::task::JoinHandle<()>,
}

/// A channel to `addr`, connected within 30 s.
async fn connect(addr: std::net::SocketAddr) -> Channel {
    tokio::time::timeout(
        Duration::from_secs(30),
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect(),
    )
    .await
    .expect("connects within 30 s")
    .unwrap()
}

impl Server {
    async fn start(config: HttpConfig) -> Server {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(
            &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("models/bundles")
                .join(MODEL),
            &dir.path().join(MODEL),
        );
        let repository = Arc::new(Repository::new(dir.path(), RepositoryOptions::default()));
        repository.load_all().unwrap();
        let audit = AuditLog::open(&dir.path().join("audit.jsonl"), false).unwrap();
        let state = AppState::new(repository, audit, config, Some(http::install_recorder()));
        state.set_ready(true);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = http::grpc::router(state.clone());
        let serve = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        let channel = connect(addr).await;
        Server {
            dir,
            state,
            client: GrpcInferenceServiceClient::new(channel),
            _serve: serve,
        }
    }

    fn client(&self) -> GrpcInferenceServiceClient<Channel> {
        self.client.clone()
    }

    /// The same request over HTTP (the router, no socket): status and JSON body.
    async fn http(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let req = Request::post(path)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let res = http::app(self.state.clone()).oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }
}

/// Rows of the bundle's test split (30 features each).
fn rows(n: usize) -> Vec<Vec<f32>> {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("models/bundles")
            .join(MODEL)
            .join("testdata/test.csv"),
    )
    .unwrap();
    text.lines()
        .skip(1)
        .take(n)
        .map(|l| l.split(',').take(30).map(|v| v.parse().unwrap()).collect())
        .collect()
}

fn typed_request(rows: &[Vec<f32>], shape: Vec<i64>) -> ModelInferRequest {
    ModelInferRequest {
        model_name: MODEL.into(),
        model_version: "1".into(),
        id: "grpc-typed".into(),
        inputs: vec![InferInputTensor {
            name: "features".into(),
            datatype: "FP32".into(),
            shape,
            parameters: Default::default(),
            contents: Some(InferTensorContents {
                fp32_contents: rows.iter().flatten().copied().collect(),
                ..Default::default()
            }),
        }],
        ..Default::default()
    }
}

fn raw_request(rows: &[Vec<f32>]) -> ModelInferRequest {
    let mut raw = Vec::new();
    for x in rows.iter().flatten() {
        raw.extend_from_slice(&x.to_le_bytes());
    }
    ModelInferRequest {
        model_name: MODEL.into(),
        model_version: "1".into(),
        inputs: vec![InferInputTensor {
            name: "features".into(),
            datatype: "FP32".into(),
            shape: vec![rows.len() as i64, 30],
            parameters: Default::default(),
            contents: None,
        }],
        outputs: vec![
            InferRequestedOutputTensor {
                name: "probabilities".into(),
                parameters: Default::default(),
            },
            InferRequestedOutputTensor {
                name: "label".into(),
                parameters: Default::default(),
            },
        ],
        raw_input_contents: vec![raw.into()],
        ..Default::default()
    }
}

fn json_request(rows: &[Vec<f32>], shape: Vec<i64>) -> Value {
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    json!({"inputs": [{"name": "features", "shape": shape, "datatype": "FP32", "data": flat}]})
}

/// An output's elements as f64, from typed contents or raw bytes.
fn output_values(r: &ModelInferResponse, name: &str) -> Vec<f64> {
    let i = r.outputs.iter().position(|o| o.name == name).unwrap();
    let o = &r.outputs[i];
    if let Some(raw) = r.raw_output_contents.get(i) {
        return match o.datatype.as_str() {
            "FP32" => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            "INT64" => raw
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            other => panic!("unexpected datatype {other}"),
        };
    }
    let c = o.contents.as_ref().unwrap();
    match o.datatype.as_str() {
        "FP32" => c.fp32_contents.iter().map(|&x| x as f64).collect(),
        "INT64" => c.int64_contents.iter().map(|&x| x as f64).collect(),
        other => panic!("unexpected datatype {other}"),
    }
}

fn json_values(v: &Value, name: &str) -> Vec<f64> {
    v["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == name)
        .unwrap()["data"]
        .as_array()
        .unwrap()
        .iter()
        // JSON writes an FP32 in its shortest form: back to f32, it is the same bits.
        .map(|x| x.as_f64().unwrap() as f32 as f64)
        .collect()
}

#[tokio::test]
async fn health_and_metadata() {
    let server = Server::start(HttpConfig::default()).await;
    let mut c = server.client();
    assert!(
        c.server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        c.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let meta = c
        .server_metadata(ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.name, "nightingale");
    assert!(meta.extensions.iter().any(|e| e == "model_repository"));
    // `/explain` is HTTP's alone.
    assert!(!meta.extensions.iter().any(|e| e == "nightingale_explain"));
    let ready = |name: &str, version: &str| ModelReadyRequest {
        name: name.into(),
        version: version.into(),
    };
    assert!(
        c.model_ready(ready(MODEL, "1"))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        !c.model_ready(ready("nope", ""))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let m = c
        .model_metadata(ModelMetadataRequest {
            name: MODEL.into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.name, MODEL);
    assert_eq!(m.versions, vec!["1", "2"]);
    assert_eq!(m.inputs[0].name, "features");
    assert_eq!(m.inputs[0].datatype, "FP32");
    assert_eq!(m.inputs[0].shape, vec![-1, 30]);
    // Triton's model configuration: the bundle's [batching] (max_batch_size = 64, preferred
    // [64], 200 µs), so the batch dimension is left out of `dims`.
    let config = c
        .model_config(ModelConfigRequest {
            name: MODEL.into(),
            version: "1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!((config.name.as_str(), config.max_batch_size), (MODEL, 64));
    assert_eq!(config.input[0].dims, vec![30]);
    assert_eq!(config.output[1].dims, vec![2]);
    match config.scheduling_choice {
        Some(SchedulingChoice::DynamicBatching(b)) => {
            assert_eq!(
                (b.preferred_batch_size, b.max_queue_delay_microseconds),
                (vec![64], 200)
            );
        }
        other => panic!("no dynamic batching: {other:?}"),
    }
    let e = c
        .model_config(ModelConfigRequest {
            name: "nope".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let index = c
        .repository_index(RepositoryIndexRequest {
            repository_name: String::new(),
            ready: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        index
            .models
            .iter()
            .any(|m| m.name == MODEL && m.state == "READY")
    );
}

#[tokio::test]
async fn typed_and_raw_contents_answer_as_the_http_json_path() {
    let server = Server::start(HttpConfig::default()).await;
    let mut c = server.client();
    let x = rows(5);
    let (status, body) = server
        .http(
            &format!("/v2/models/{MODEL}/versions/1/infer"),
            json_request(&x, vec![5, 30]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Typed contents in, raw contents out (as Triton answers, and as tritonclient.grpc
    // reads), every output.
    let typed = c
        .model_infer(typed_request(&x, vec![5, 30]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(typed.id, "grpc-typed");
    assert_eq!(typed.model_version, "1");
    assert_eq!(typed.raw_output_contents.len(), 2);
    assert!(typed.outputs.iter().all(|o| o.contents.is_none()));
    for name in ["label", "probabilities"] {
        assert_eq!(
            output_values(&typed, name),
            json_values(&body, name),
            "{name}"
        );
    }
    let p = typed
        .outputs
        .iter()
        .find(|o| o.name == "probabilities")
        .unwrap();
    assert_eq!(p.shape, vec![5, 2]);

    // Raw in, raw out (as tritonclient does), in the order asked.
    let raw = c.model_infer(raw_request(&x)).await.unwrap().into_inner();
    assert_eq!(raw.outputs.len(), 2);
    assert_eq!(raw.outputs[0].name, "probabilities");
    assert_eq!(raw.raw_output_contents.len(), 2);
    for name in ["label", "probabilities"] {
        assert_eq!(
            output_values(&raw, name),
            json_values(&body, name),
            "{name}"
        );
    }

    // Statistics count them, as over HTTP.
    let stats = c
        .model_statistics(ModelStatisticsRequest {
            name: MODEL.into(),
            version: "1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let s = &stats.model_stats[0];
    assert_eq!(s.version, "1");
    assert!(s.inference_count >= 15, "{s:?}");
    assert!(s.inference_stats.as_ref().unwrap().success.unwrap().count >= 3);
}

#[tokio::test]
async fn errors_carry_the_http_message_and_their_grpc_code() {
    let server = Server::start(HttpConfig::default()).await;
    let mut c = server.client();
    let x = rows(1);
    let short: Vec<Vec<f32>> = vec![x[0][..29].to_vec()];

    // Wrong shape: INVALID_ARGUMENT with HTTP's 400 message.
    let (status, body) = server
        .http(
            &format!("/v2/models/{MODEL}/versions/1/infer"),
            json_request(&short, vec![1, 29]),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let e = c
        .model_infer(typed_request(&short, vec![1, 29]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(e.message(), body["error"].as_str().unwrap());

    // Data that does not fill the shape.
    let e = c
        .model_infer(typed_request(&short, vec![1, 30]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "input \"features\": shape [1, 30] needs 30 FP32 elements but data has 29"
    );

    // Unknown model: NOT_FOUND with HTTP's 404 message.
    let (status, body) = server
        .http("/v2/models/nope/infer", json_request(&x, vec![1, 30]))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let mut req = typed_request(&x, vec![1, 30]);
    req.model_name = "nope".into();
    req.model_version.clear();
    let e = c.model_infer(req).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(e.message(), body["error"].as_str().unwrap());

    // An unknown requested output.
    let mut req = raw_request(&x);
    req.outputs[0].name = "nope".into();
    let e = c.model_infer(req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("unknown output \"nope\""), "{e:?}");

    // raw_input_contents that do not match the inputs.
    let mut req = raw_request(&x);
    req.raw_input_contents.push(Vec::new().into());
    let e = c.model_infer(req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // An id over 1,024 bytes (echoed in the answer: a red-team finding over HTTP).
    let mut req = raw_request(&x);
    req.id = "i".repeat(1025);
    let e = c.model_infer(req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("an id of 1025 bytes"), "{e:?}");
    let mut req = raw_request(&x);
    req.id = "i".repeat(1024);
    assert_eq!(
        c.model_infer(req).await.unwrap().into_inner().id.len(),
        1024
    );
}

/// The test configuration with API keys (tests/fixtures/auth), and the keys by role.
fn auth_fixture() -> (
    nightingale::http::auth::AuthConfig,
    std::collections::HashMap<String, String>,
) {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/auth");
    let auth = ServeArgs {
        config: Some(fixtures.join("nightingale.toml")),
        ..ServeArgs::default()
    }
    .resolve()
    .unwrap()
    .auth;
    let keys =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("api_keys.json")).unwrap())
            .unwrap();
    (auth, keys)
}

#[tokio::test]
async fn roles_are_the_http_routes_and_inferences_are_audited() {
    let (auth, keys) = auth_fixture();
    let server = Server::start(HttpConfig {
        auth,
        ..HttpConfig::default()
    })
    .await;
    let mut c = server.client();
    let x = rows(1);
    let with = |key: Option<(&'static str, String)>, id: &str| {
        let mut r = tonic::Request::new(raw_request(&x));
        r.metadata_mut().insert("x-request-id", id.parse().unwrap());
        if let Some((name, value)) = key {
            r.metadata_mut().insert(name, value.parse().unwrap());
        }
        r
    };

    // Health is public; inference needs `infer`.
    assert!(
        c.server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    let e = c.model_infer(with(None, "anon-1")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("needs the infer role"), "{e:?}");
    let e = c
        .model_infer(with(
            Some(("authorization", "Bearer not-a-key".into())),
            "bad-1",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = c
        .model_infer(with(
            Some(("authorization", format!("Bearer {}", keys["metrics"]))),
            "metrics-1",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let ok = c
        .model_infer(with(
            Some(("authorization", format!("Bearer {}", keys["infer"]))),
            "grpc-infer-1",
        ))
        .await
        .unwrap();
    assert_eq!(
        ok.metadata().get("x-request-id").unwrap().to_str().unwrap(),
        "grpc-infer-1"
    );
    c.model_infer(with(
        Some(("x-api-key", keys["infer"].clone())),
        "grpc-infer-2",
    ))
    .await
    .unwrap();

    // Model control needs `admin`.
    let mut load = tonic::Request::new(RepositoryModelLoadRequest {
        repository_name: String::new(),
        model_name: MODEL.into(),
        parameters: Default::default(),
    });
    load.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", keys["infer"]).parse().unwrap(),
    );
    let e = c.repository_model_load(load).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // A repository this server does not serve is refused by name, not taken for its own.
    let admin = format!("Bearer {}", keys["admin"]);
    let mut load = tonic::Request::new(RepositoryModelLoadRequest {
        repository_name: "other".into(),
        model_name: MODEL.into(),
        parameters: Default::default(),
    });
    load.metadata_mut()
        .insert("authorization", admin.parse().unwrap());
    let e = c.repository_model_load(load).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("repository_name \"other\""), "{e:?}");
    let mut unload = tonic::Request::new(RepositoryModelUnloadRequest {
        repository_name: "other".into(),
        model_name: MODEL.into(),
        parameters: Default::default(),
    });
    unload
        .metadata_mut()
        .insert("authorization", admin.parse().unwrap());
    let e = c.repository_model_unload(unload).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let infer = format!("Bearer {}", keys["infer"]);
    let mut index = tonic::Request::new(RepositoryIndexRequest {
        repository_name: "other".into(),
        ready: false,
    });
    index
        .metadata_mut()
        .insert("authorization", infer.parse().unwrap());
    let e = c.repository_index(index).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let mut index = tonic::Request::new(RepositoryIndexRequest {
        repository_name: String::new(),
        ready: true,
    });
    index
        .metadata_mut()
        .insert("authorization", infer.parse().unwrap());
    assert!(
        c.repository_index(index)
            .await
            .unwrap()
            .into_inner()
            .models
            .iter()
            .any(|m| m.name == MODEL)
    );

    // The two inferences that reached the model are in the audit trail, with their ids; the
    // refused ones are not (as over HTTP).
    let log = std::fs::read_to_string(server.dir.path().join("audit.jsonl")).unwrap();
    let records: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for id in ["grpc-infer-1", "grpc-infer-2"] {
        let r = records
            .iter()
            .find(|r| r["request_id"] == id)
            .unwrap_or_else(|| panic!("no audit record for {id}: {log}"));
        assert_eq!(r["model"], MODEL);
        assert_eq!(r["status"], 200);
        assert!(r["input_sha256"].is_string() && r["output_sha256"].is_string());
    }
    assert!(!log.contains("anon-1") && !log.contains("metrics-1"));
}

/// A body that never ends (a stream that declared a message and stalls).
struct Stalled;

impl http_body::Body for Stalled {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        std::task::Poll::Pending
    }
}

/// A call's gRPC status and message: in the answer's headers (a trailers-only answer) or
/// in the trailers of its body (an answer with a message), collected within 30 s.
async fn grpc_outcome(r: axum::http::Response<axum::body::Body>) -> (i32, String) {
    let field = |h: &axum::http::HeaderMap, name: &str| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.replace("%20", " "))
    };
    if let Some(code) = field(r.headers(), "grpc-status") {
        let message = field(r.headers(), "grpc-message").unwrap_or_default();
        return (code.parse().unwrap(), message);
    }
    let body = tokio::time::timeout(
        Duration::from_secs(30),
        http_body_util::BodyExt::collect(r.into_body()),
    )
    .await
    .expect("the answer's body ends")
    .unwrap();
    let trailers = body.trailers().cloned().unwrap_or_default();
    let code = field(&trailers, "grpc-status").expect("a grpc-status in the trailers");
    (
        code.parse().unwrap(),
        field(&trailers, "grpc-message").unwrap_or_default(),
    )
}

fn stalled_infer(authorization: Option<String>) -> axum::http::Request<axum::body::Body> {
    let mut r = axum::http::Request::post("/inference.GRPCInferenceService/ModelInfer")
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(a) = authorization {
        r = r.header("authorization", a);
    }
    r.body(axum::body::Body::new(Stalled)).unwrap()
}

#[tokio::test]
async fn a_caller_without_the_role_is_refused_before_its_message_is_read_and_a_stalled_message_times_out()
 {
    let (auth, keys) = auth_fixture();
    let server = Server::start(HttpConfig {
        auth,
        request_timeout: Duration::from_secs(1),
        ..HttpConfig::default()
    })
    .await;
    // No credentials, a message that never arrives: refused at once, nothing read.
    let app = http::grpc::router(server.state.clone());
    let r = tokio::time::timeout(Duration::from_secs(30), app.oneshot(stalled_infer(None)))
        .await
        .expect("answered without reading the message")
        .unwrap();
    assert_eq!(grpc_outcome(r).await.0, Code::Unauthenticated as i32);
    // With the role, a message that stalls ends in an error at the deadline (1 s here), not
    // never.
    let app = http::grpc::router(server.state.clone());
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        app.oneshot(stalled_infer(Some(format!("Bearer {}", keys["infer"])))),
    )
    .await
    .expect("the stalled message is cut off at its deadline")
    .unwrap();
    // (tonic may answer in the trailers of a streamed body)
    assert_eq!(grpc_outcome(r).await.0, Code::DeadlineExceeded as i32);
}

/// A `ModelInfer` message is charged for what decoding it allocates before it is decoded: a
/// message of empty `inputs` entries (two bytes each on the wire, ~150 times that decoded),
/// plain or gzip-compressed (a few KiB on the wire), is refused with the budget named, and
/// the server answers the next call. A unary call carrying two messages is refused, not
/// answered for the first alone.
#[tokio::test]
async fn a_message_is_charged_for_its_decoded_size_before_it_is_decoded() {
    use futures_util::StreamExt;
    let server = Server::start(HttpConfig {
        max_body_bytes: 1 << 20,
        max_inflight_bytes: 8 << 20,
        ..HttpConfig::default()
    })
    .await;
    let amplifying = ModelInferRequest {
        model_name: MODEL.into(),
        inputs: vec![InferInputTensor::default(); 200_000],
        ..Default::default()
    };
    assert!(prost::Message::encoded_len(&amplifying) < 420_000);
    for gzip in [false, true] {
        let mut client = server.client();
        if gzip {
            client = client.send_compressed(tonic::codec::CompressionEncoding::Gzip);
        }
        let e = client.model_infer(amplifying.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "gzip {gzip}: {e:?}");
        assert!(e.message().contains("max_inflight_bytes"), "{e:?}");
    }
    // Ordinary calls are answered, compressed or not.
    for gzip in [false, true] {
        let mut client = server.client();
        if gzip {
            client = client.send_compressed(tonic::codec::CompressionEncoding::Gzip);
        }
        let r = client
            .model_infer(raw_request(&rows(3)))
            .await
            .expect("answered");
        assert_eq!(output_values(r.get_ref(), "probabilities").len(), 6);
    }

    // Two messages in one unary call; a message cut short; a compressed flag without an
    // encoding.
    let one = prost::Message::encode_to_vec(&raw_request(&rows(1)));
    let frame = |flag: u8, m: &[u8]| {
        let mut f = vec![flag];
        f.extend_from_slice(&(m.len() as u32).to_be_bytes());
        f.extend_from_slice(m);
        f
    };
    let grpc_status = |r: axum::http::Response<axum::body::Body>| async move {
        if let Some(s) = r.headers().get("grpc-status") {
            return (
                s.to_str().unwrap().parse::<i32>().unwrap(),
                r.headers()["grpc-message"].to_str().unwrap().to_owned(),
            );
        }
        let t = r
            .into_body()
            .collect()
            .await
            .unwrap()
            .trailers()
            .cloned()
            .unwrap();
        (
            t["grpc-status"].to_str().unwrap().parse().unwrap(),
            t.get("grpc-message")
                .map(|m| m.to_str().unwrap().to_owned())
                .unwrap_or_default(),
        )
    };
    let two = [frame(0, &one), frame(0, &one)].concat();
    let cut = frame(0, &one)[..one.len()].to_vec();
    // An input whose name is not UTF-8 (prost refused it inside tonic: INTERNAL, unaudited,
    // a red-team finding).
    let mut not_utf8 = prost::Message::encode_to_vec(&ModelInferRequest {
        model_name: MODEL.into(),
        ..Default::default()
    });
    not_utf8.extend_from_slice(&[0x2a, 3, 0x0a, 1, 0xff]);
    for (body, why) in [
        (two, "one request message"),
        (cut, "cut short"),
        (frame(1, &one), "no grpc-encoding"),
        (frame(0, &not_utf8), "not UTF-8"),
    ] {
        let req = axum::http::Request::post("/inference.GRPCInferenceService/ModelInfer")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(axum::body::Body::from(body))
            .unwrap();
        let r = http::grpc::router(server.state.clone())
            .oneshot(req)
            .await
            .unwrap();
        let (code, message) = grpc_status(r).await;
        // grpc-message is percent-encoded.
        let message = message.replace("%20", " ");
        assert_eq!(code, Code::InvalidArgument as i32, "{why}: {message}");
        assert!(message.contains(why), "{why}: {message}");
    }
    // A length over the limit is refused from the prefix, the rest never read.
    let declared_big =
        futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(vec![
            0u8, 0x7f, 0xff, 0xff, 0xff,
        ]))])
        .chain(futures_util::stream::pending());
    let req = axum::http::Request::post("/inference.GRPCInferenceService/ModelInfer")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(axum::body::Body::from_stream(declared_big))
        .unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        http::grpc::router(server.state.clone()).oneshot(req),
    )
    .await
    .expect("refused from the prefix")
    .unwrap();
    let (code, message) = grpc_status(r).await;
    assert_eq!(code, Code::ResourceExhausted as i32, "{message}");
    assert!(
        message.replace("%20", " ").contains("declares"),
        "{message}"
    );
    let r = server.client().model_infer(raw_request(&rows(1))).await;
    assert!(r.is_ok(), "{r:?}");

    // Refused before decoding, and audited as HTTP audits the same refusals when the call's
    // first bytes name the model (a red-team finding: none was): the uncompressed amplifying
    // message (over the budget), two messages, a message cut short, a string not UTF-8. The
    // compressed ones and the bare prefix name no model that can be read: not audited.
    let refused: Vec<(u64, String)> =
        std::fs::read_to_string(server.dir.path().join("audit.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|r| r["kind"] == "inference" && r["status"] != 200)
            .map(|r| {
                assert_eq!(r["model"], MODEL, "{r}");
                (
                    r["status"].as_u64().unwrap(),
                    r["outcome"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
    // The amplifying message's decoded bound is over the whole 8 MiB budget: 413.
    assert_eq!(
        refused,
        [
            (413, "rejected".to_owned()),
            (400, "rejected".to_owned()),
            (400, "rejected".to_owned()),
            (400, "rejected".to_owned())
        ]
    );
}

/// Red-team finding: behind the server's own accept loop (hyper's HTTP/2 defaults), one call
/// with more than 16 KiB of metadata got a bare 431, and above 64 KiB a GOAWAY that failed
/// every other call on the connection. The HTTP/2 header list now has HTTP/1's budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_with_large_metadata_is_answered_on_the_servers_own_listener() {
    use nightingale::http::serve::{ConnectionLimits, serve};
    let server = Server::start(HttpConfig::default()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = http::grpc::router(server.state.clone());
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, app, ConnectionLimits::default(), async {
        let _ = stopped.await;
    }));
    let mut c = GrpcInferenceServiceClient::new(connect(addr).await);
    for size in [20_000, 100_000] {
        let mut r = tonic::Request::new(ServerLiveRequest {});
        r.metadata_mut()
            .insert("x-trace", "a".repeat(size).parse().unwrap());
        let live = tokio::time::timeout(Duration::from_secs(30), c.server_live(r))
            .await
            .expect("answered within 30 s");
        assert!(live.unwrap().into_inner().live, "{size} bytes of metadata");
    }
}

/// As over HTTP, a `ModelInfer` answer holds its call's admission budget until its body has
/// been sent: hyper drops the response head (and its extensions, where the ticket was kept)
/// once written, while the encoded message waits for a client that may read nothing.
#[tokio::test]
async fn an_answer_holds_its_budget_until_its_body_is_sent() {
    let server = Server::start(HttpConfig::default()).await;
    let free = || server.state.inflight_bytes_free();
    let all = free();
    let message = prost::Message::encode_to_vec(&raw_request(&rows(50)));
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    let req = axum::http::Request::post("/inference.GRPCInferenceService/ModelInfer")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(axum::body::Body::from(framed))
        .unwrap();
    let r = http::grpc::router(server.state.clone())
        .oneshot(req)
        .await
        .unwrap();
    // The head goes (as hyper drops it after writing it); the body is not read yet.
    let (head, body) = r.into_parts();
    drop(head);
    assert!(
        free() < all,
        "the budget was given back before the answer was sent"
    );
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );
    let bytes = collected.to_bytes();
    let answer: ModelInferResponse = prost::Message::decode(&bytes[5..]).unwrap();
    assert_eq!(output_values(&answer, "probabilities").len(), 100);
    assert_eq!(free(), all);
}

/// Calls this server does not serve are UNIMPLEMENTED with the reason (tonic's own answer
/// had an empty message: a red-team finding).
#[tokio::test]
async fn a_call_not_served_is_unimplemented_with_its_reason() {
    let server = Server::start(HttpConfig::default()).await;
    for method in [
        "ModelStreamInfer",
        "TraceSetting",
        "SystemSharedMemoryStatus",
    ] {
        let req = axum::http::Request::post(format!("/inference.GRPCInferenceService/{method}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(axum::body::Body::from(vec![0u8; 5]))
            .unwrap();
        let r = http::grpc::router(server.state.clone())
            .oneshot(req)
            .await
            .unwrap();
        assert_eq!(r.headers()["grpc-status"], "12", "{method}");
        let message = r.headers()["grpc-message"]
            .to_str()
            .unwrap()
            .replace("%20", " ");
        assert!(
            message.contains(&format!("{method} is not served")),
            "{message}"
        );
    }
    // A served method's name under another service or path is no call of this service
    // (it was read, charged and audited as an inference: a re-attack's finding).
    for path in [
        "/other.Service/ModelInfer",
        "/x/y/ModelInfer",
        "/inference.GRPCInferenceService/ServerLive/",
    ] {
        let req = axum::http::Request::post(path)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("x-request-id", "probe")
            .body(axum::body::Body::from(vec![0u8; 5]))
            .unwrap();
        let r = http::grpc::router(server.state.clone())
            .oneshot(req)
            .await
            .unwrap();
        assert_eq!(r.headers()["grpc-status"], "12", "{path}");
        let message = r.headers()["grpc-message"]
            .to_str()
            .unwrap()
            .replace("%20", " ");
        assert!(message.contains("is not served"), "{path}: {message}");
    }
    let audit = std::fs::read_to_string(server.dir.path().join("audit.jsonl")).unwrap_or_default();
    assert!(!audit.contains("\"probe\""), "{audit}");
}

/// Red-team finding: the DNS-rebinding check of a loopback server (an anonymous request
/// must name a loopback Host) was HTTP's only: a browser's gRPC-over-HTTP/1.1 fetch under a
/// page's own name got `RepositoryIndex` and `ModelInfer` answered. The gRPC listener on a
/// loopback address refuses it too; a loopback name, a credential or a public method
/// (health) is not held to it.
#[tokio::test]
async fn an_anonymous_call_under_a_foreign_host_name_is_refused_on_a_loopback_listener() {
    use nightingale::http::auth::AuthConfig;
    let (with_keys, keys) = auth_fixture();
    let call = |method: &str, host: &str, bearer: Option<&str>| {
        let mut r = axum::http::Request::post(format!("/inference.GRPCInferenceService/{method}"))
            .header("content-type", "application/grpc")
            .header("host", host);
        if let Some(b) = bearer {
            r = r.header("authorization", format!("Bearer {b}"));
        }
        // one empty message: flag 0, length 0
        r.body(axum::body::Body::from(vec![0u8; 5])).unwrap()
    };
    for (auth, bearer) in [
        (
            AuthConfig {
                loopback_grpc_listener: true,
                ..AuthConfig::default()
            },
            None,
        ),
        (
            AuthConfig {
                loopback_grpc_listener: true,
                ..with_keys.clone()
            },
            Some(keys["infer"].clone()),
        ),
    ] {
        let anonymous = bearer.is_none();
        let server = Server::start(HttpConfig {
            auth,
            ..HttpConfig::default()
        })
        .await;
        for (method, host, refused) in [
            ("RepositoryIndex", "rebind.attacker.example:8001", anonymous),
            ("ModelReady", "evil.example", anonymous),
            ("RepositoryIndex", "127.0.0.1:8001", false),
            ("RepositoryIndex", "localhost", false),
            ("ServerLive", "evil.example", false),
        ] {
            let app = http::grpc::router(server.state.clone());
            let r = tokio::time::timeout(
                Duration::from_secs(30),
                app.oneshot(call(method, host, bearer.as_deref())),
            )
            .await
            .expect("answered")
            .unwrap();
            let (code, message) = grpc_outcome(r).await;
            if refused {
                assert_eq!(code, Code::PermissionDenied as i32, "{method} Host {host}");
                assert!(message.contains("rebinding"), "{message}");
            } else {
                assert_eq!(
                    code,
                    Code::Ok as i32,
                    "{method} Host {host} credential {}: {message}",
                    !anonymous
                );
            }
        }
        // the tonic client names the listener by its loopback address: served
        let index = server
            .client()
            .repository_index(RepositoryIndexRequest::default())
            .await;
        if anonymous {
            assert!(index.is_ok(), "{index:?}");
        }
    }
}

/// A unary call other than `ModelInfer` that carries two messages was answered for its first
/// (tonic reads one): refused as gRPC says, and one message is still answered.
#[tokio::test]
async fn a_unary_call_with_two_messages_is_refused_for_every_method() {
    let server = Server::start(HttpConfig::default()).await;
    let call = |messages: usize| {
        axum::http::Request::post("/inference.GRPCInferenceService/RepositoryIndex")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(axum::body::Body::from(vec![0u8; 5 * messages]))
            .unwrap()
    };
    let app = http::grpc::router(server.state.clone());
    let r = tokio::time::timeout(Duration::from_secs(30), app.oneshot(call(2)))
        .await
        .expect("answered")
        .unwrap();
    let (code, message) = grpc_outcome(r).await;
    assert_eq!(code, Code::InvalidArgument as i32);
    assert!(message.contains("one request message"), "{message}");
    let app = http::grpc::router(server.state.clone());
    let r = tokio::time::timeout(Duration::from_secs(30), app.oneshot(call(1)))
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(grpc_outcome(r).await.0, Code::Ok as i32);
    // and through a real client, as before
    let index = server
        .client()
        .repository_index(RepositoryIndexRequest::default())
        .await
        .unwrap();
    assert!(!index.into_inner().models.is_empty());
}

/// A message of a call other than `ModelInfer` that does not decode (a name that is not
/// UTF-8, a field cut short) is INVALID_ARGUMENT with the reason: tonic answered INTERNAL,
/// which blames the server (a README known issue).
#[tokio::test]
async fn a_malformed_message_of_any_method_is_invalid_argument() {
    let server = Server::start(HttpConfig::default()).await;
    for (method, message) in [
        // field 1 (name), length 2, bytes that are not UTF-8
        ("ModelMetadata", vec![0x0A, 0x02, 0xC3, 0x28]),
        ("ModelReady", vec![0x0A, 0x02, 0xFF, 0xFE]),
        // field 1 declares 9 bytes, 1 follows
        ("RepositoryIndex", vec![0x0A, 0x09, b'a']),
        // a varint of 11 bytes
        (
            "ModelStatistics",
            vec![
                0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01,
            ],
        ),
    ] {
        let (code, text) = raw_call(&server, method, &message).await;
        assert_eq!(code, Code::InvalidArgument as i32, "{method}: {text}");
        assert!(
            text.contains("request message is malformed"),
            "{method}: {text}"
        );
        // The same, gzip-compressed: checked once inflated (a re-attack: INTERNAL still)
        let (code, text) = raw_gzip_call(&server, method, &message).await;
        assert_eq!(code, Code::InvalidArgument as i32, "{method} gzip: {text}");
        assert!(text.contains("request message is malformed"), "{text}");
    }
    // A sound compressed message is answered.
    let sound = prost::Message::encode_to_vec(&ModelMetadataRequest {
        name: MODEL.into(),
        version: String::new(),
    });
    assert_eq!(
        raw_gzip_call(&server, "ModelMetadata", &sound).await.0,
        Code::Ok as i32
    );
    // Frames that are no whole message (none, a short prefix, a message cut short, a
    // compressed flag of 2): INVALID_ARGUMENT with the reason, as for ModelInfer (tonic
    // answered INTERNAL "Missing request message", "Unexpected EOF": a review's finding).
    // Not a gRPC call (a plain HTTP health probe at this port): 415, not 200.
    let app = http::grpc::router(server.state.clone());
    let probe = axum::http::Request::get("/v2/health/ready")
        .body(axum::body::Body::empty())
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(30), app.oneshot(probe))
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(r.status(), axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE);
    for (method, body, reason) in [
        ("ServerLive", vec![], "carries no request message"),
        ("ServerLive", vec![0, 0], "carries no request message"),
        ("ModelMetadata", vec![0, 0, 0, 0, 9, 0x0A], "cut short"),
        ("ServerLive", vec![2, 0, 0, 0, 0], "compressed flag"),
    ] {
        let (code, text) = bytes_call(&server, method, body, None).await;
        assert_eq!(code, Code::InvalidArgument as i32, "{method}: {text}");
        assert!(text.contains(reason), "{method}: {text}");
    }
}

/// [`raw_call`] with the message gzip-compressed (flag 1, `grpc-encoding: gzip`).
async fn raw_gzip_call(server: &Server, method: &str, message: &[u8]) -> (i32, String) {
    use std::io::Write as _;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(message).unwrap();
    framed_call(server, method, &gz.finish().unwrap(), Some("gzip")).await
}

/// A compressed message of a call other than `ModelInfer` is held to the same 1 MiB once
/// inflated (tonic inflated it up to `max_body_bytes`: a 61 KB gzip `ServerLive` of 60 MB
/// took seconds of CPU before credentials were read, a red-team finding); a small one is
/// answered. A `ModelInfer` message of thousands of unknown fields is refused before prost
/// decodes it.
#[tokio::test]
async fn compressed_and_field_flooded_messages_are_bounded_before_they_are_decoded() {
    let server = Server::start(HttpConfig::default()).await;
    let gzip = || {
        server
            .client()
            .send_compressed(tonic::codec::CompressionEncoding::Gzip)
    };
    let metadata = |name: String| ModelMetadataRequest {
        name,
        version: String::new(),
    };
    let e = gzip()
        .model_metadata(metadata("a".repeat(2 << 20)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("decompresses to more than"), "{e:?}");
    let answer = gzip()
        .model_metadata(metadata(MODEL.into()))
        .await
        .expect("a small compressed call is answered");
    assert_eq!(answer.get_ref().name, MODEL);

    // 2,000 unknown fields (two bytes each) after an ordinary request.
    let mut wire = prost::Message::encode_to_vec(&raw_request(&rows(1)));
    for _ in 0..2000 {
        wire.extend_from_slice(&[0x52, 0x00]); // field 10, empty
    }
    let (code, message) = raw_call(&server, "ModelInfer", &wire).await;
    assert_eq!(code, Code::InvalidArgument as i32, "{message}");
    assert!(message.contains("fields of no known number"), "{message}");
}

/// One uncompressed `message` sent as a call of `method` through the gRPC router, and the
/// call's status and message (within 30 s).
async fn raw_call(server: &Server, method: &str, message: &[u8]) -> (i32, String) {
    framed_call(server, method, message, None).await
}

/// One message framed as gRPC does (compressed, flag 1, when `encoding` names how).
async fn framed_call(
    server: &Server,
    method: &str,
    message: &[u8],
    encoding: Option<&str>,
) -> (i32, String) {
    let mut framed = vec![u8::from(encoding.is_some())];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    bytes_call(server, method, framed, encoding).await
}

/// A call of `method` whose body is `framed` as it is (within 30 s).
async fn bytes_call(
    server: &Server,
    method: &str,
    framed: Vec<u8>,
    encoding: Option<&str>,
) -> (i32, String) {
    let mut call = axum::http::Request::post(format!("/inference.GRPCInferenceService/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(encoding) = encoding {
        call = call.header("grpc-encoding", encoding);
    }
    let call = call.body(axum::body::Body::from(framed)).unwrap();
    let app = http::grpc::router(server.state.clone());
    let r = tokio::time::timeout(Duration::from_secs(30), app.oneshot(call))
        .await
        .expect("answered")
        .unwrap();
    grpc_outcome(r).await
}

/// Refusals made before tonic sees a call (start-up, the open-request limits) are gRPC
/// statuses with their message and `retry-after` in the trailers-only answer, as the other
/// refusals are: they were an HTTP 503 with a JSON body, which tritonclient.grpc reported as
/// "Received http2 header with status: 503", message and Retry-After lost (a review's
/// finding). The health checks are answered while starting (live, not ready).
#[tokio::test]
async fn refusals_before_the_service_are_grpc_statuses() {
    let server = Server::start(HttpConfig {
        max_open_requests: 1,
        max_open_requests_per_client: Some(1),
        request_timeout: Duration::from_secs(30),
        ..HttpConfig::default()
    })
    .await;
    server.state.set_starting(true);
    let mut c = server.client();
    assert!(
        c.server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        !c.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let e = c
        .server_metadata(ServerMetadataRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("the server is starting"), "{e:?}");
    assert_eq!(e.metadata().get("retry-after").unwrap(), "5");
    let e = c.model_infer(raw_request(&rows(1))).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    server.state.set_starting(false);
    assert!(
        c.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );

    // One place among the open requests: a call whose message never arrives holds it, and
    // the next call is refused as gRPC.
    let app = http::grpc::router(server.state.clone());
    let held = tokio::spawn(app.oneshot(stalled_infer(None)));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match c.server_metadata(ServerMetadataRequest {}).await {
            Err(e) if e.code() == Code::Unavailable => {
                assert!(e.message().contains("max_open_requests"), "{e:?}");
                assert_eq!(e.metadata().get("retry-after").unwrap(), "1");
                break;
            }
            // The stalled call has not taken its place yet.
            Ok(_) => {
                assert!(tokio::time::Instant::now() < deadline, "never refused");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    held.abort();
}
