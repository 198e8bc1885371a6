//! gRPC vs HTTP requests/s against one running server: a load generator, not a criterion
//! bench (benches/load/grpc.sh starts the server and runs it). Guards: KServe v2 gRPC
//! answering at least as many requests/s as HTTP at the same concurrency (issue 13).
//!
//! Each client is one connection (one HTTP/1.1 connection, or one HTTP/2 connection for
//! gRPC) sending 1-row inferences on wdbc-malignancy@1 asking for `probabilities`, one after
//! the other. Three request kinds, the same row:
//! - `http-json`: a JSON body, as wrk posts it in docs/performance.md;
//! - `http-binary`: Triton's binary tensor extension (tritonclient.http with binary data);
//! - `grpc`: `ModelInfer` with `raw_input_contents` (what tritonclient.grpc sends), tonic's
//!   client;
//! - `grpc-hyper`: the same message framed by hand over hyper's HTTP/2 client (no tonic
//!   `Channel` buffer task), to tell the client's share of the latency from the server's.
//!
//! Rounds are interleaved (every kind at every concurrency, then again) and medians reported.
//!
//! ```text
//! cargo bench --features grpc --bench grpc_http_load -- \
//!     --http 127.0.0.1:8000 --grpc 127.0.0.1:8001 [--seconds 5] [--rounds 3] [--clients 1,16]
//! ```

#[cfg(feature = "grpc")]
fn main() -> anyhow::Result<()> {
    load::main()
}

#[cfg(not(feature = "grpc"))]
fn main() {
    eprintln!("grpc_http_load needs --features grpc");
}

#[cfg(feature = "grpc")]
mod load {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use anyhow::{Context, bail};
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::Request;
    use nightingale::http::grpc::proto::ModelInferRequest;
    use nightingale::http::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
    use nightingale::http::grpc::proto::model_infer_request::{
        InferInputTensor, InferRequestedOutputTensor,
    };
    use tonic::transport::Channel;

    const MODEL: &str = "wdbc-malignancy";
    const PATH: &str = "/v2/models/wdbc-malignancy/versions/1/infer";

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Kind {
        HttpJson,
        HttpBinary,
        Grpc,
        /// The same `ModelInfer` framed by hand over hyper's HTTP/2 client: no tonic
        /// `Channel` (and its buffer task) on the client side.
        GrpcHyper,
    }

    impl Kind {
        fn name(self) -> &'static str {
            match self {
                Kind::HttpJson => "http-json",
                Kind::HttpBinary => "http-binary",
                Kind::Grpc => "grpc",
                Kind::GrpcHyper => "grpc-hyper",
            }
        }
    }

    struct Args {
        http: SocketAddr,
        grpc: SocketAddr,
        seconds: f64,
        rounds: usize,
        clients: Vec<usize>,
        threads: usize,
        /// Request kinds to run (by name); all when empty.
        kinds: Vec<String>,
    }

    fn args() -> anyhow::Result<Args> {
        let mut a = Args {
            http: "127.0.0.1:8000".parse()?,
            grpc: "127.0.0.1:8001".parse()?,
            seconds: 5.0,
            rounds: 3,
            clients: vec![1, 16],
            threads: 2,
            kinds: vec![],
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            // `cargo bench` passes --bench to harness = false targets.
            if flag == "--bench" {
                continue;
            }
            let value = it.next().with_context(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--http" => a.http = value.parse()?,
                "--grpc" => a.grpc = value.parse()?,
                "--seconds" => a.seconds = value.parse()?,
                "--rounds" => a.rounds = value.parse()?,
                "--threads" => a.threads = value.parse()?,
                "--kinds" => a.kinds = value.split(',').map(str::to_owned).collect(),
                "--clients" => {
                    a.clients = value.split(',').map(str::parse).collect::<Result<_, _>>()?
                }
                other => bail!("unknown flag {other}"),
            }
        }
        Ok(a)
    }

    /// The first row of the bundle's test split.
    fn row() -> anyhow::Result<Vec<f32>> {
        let csv = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("models/bundles")
                .join(MODEL)
                .join("testdata/test.csv"),
        )?;
        let line = csv.lines().nth(1).context("empty test split")?;
        Ok(line
            .split(',')
            .take(30)
            .map(str::parse)
            .collect::<Result<_, _>>()?)
    }

    fn le_bytes(row: &[f32]) -> Vec<u8> {
        row.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn http_body(kind: Kind, row: &[f32]) -> (Bytes, Option<usize>) {
        match kind {
            Kind::HttpJson => (
                Bytes::from(
                    serde_json::json!({
                        "inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": row}],
                        "outputs": [{"name": "probabilities"}],
                    })
                    .to_string(),
                ),
                None,
            ),
            _ => {
                let header = serde_json::json!({
                    "inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32",
                                "parameters": {"binary_data_size": 120}}],
                    "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}],
                })
                .to_string();
                let mut body = header.clone().into_bytes();
                body.extend_from_slice(&le_bytes(row));
                (Bytes::from(body), Some(header.len()))
            }
        }
    }

    fn grpc_request(row: &[f32]) -> ModelInferRequest {
        ModelInferRequest {
            model_name: MODEL.into(),
            model_version: "1".into(),
            inputs: vec![InferInputTensor {
                name: "features".into(),
                datatype: "FP32".into(),
                shape: vec![1, 30],
                parameters: Default::default(),
                contents: None,
            }],
            outputs: vec![InferRequestedOutputTensor {
                name: "probabilities".into(),
                parameters: Default::default(),
            }],
            raw_input_contents: vec![Bytes::from(le_bytes(row))],
            ..Default::default()
        }
    }

    /// One client until `until`: latencies in microseconds (after `warm_until`), errors.
    async fn client(
        kind: Kind,
        args: &Args,
        row: &[f32],
        warm_until: Instant,
        until: Instant,
    ) -> anyhow::Result<Vec<u32>> {
        let mut lat = Vec::with_capacity(1 << 16);
        match kind {
            Kind::Grpc => {
                let channel = Channel::from_shared(format!("http://{}", args.grpc))?
                    .tcp_nodelay(true)
                    .connect()
                    .await?;
                let mut c = GrpcInferenceServiceClient::new(channel);
                let req = grpc_request(row);
                loop {
                    let t = Instant::now();
                    if t >= until {
                        break;
                    }
                    let r = c.model_infer(req.clone()).await?.into_inner();
                    anyhow::ensure!(r.raw_output_contents.len() == 1, "no output");
                    if t >= warm_until {
                        lat.push(t.elapsed().as_micros() as u32);
                    }
                }
            }
            Kind::GrpcHyper => {
                use prost::Message;
                let msg = grpc_request(row).encode_to_vec();
                let mut framed = vec![0u8];
                framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
                framed.extend_from_slice(&msg);
                let framed = Bytes::from(framed);
                let tcp = tokio::net::TcpStream::connect(args.grpc).await?;
                tcp.set_nodelay(true)?;
                let (mut sender, conn) = hyper::client::conn::http2::handshake(
                    hyper_util::rt::TokioExecutor::new(),
                    hyper_util::rt::TokioIo::new(tcp),
                )
                .await?;
                let conn = tokio::spawn(conn);
                let uri = format!(
                    "http://{}/inference.GRPCInferenceService/ModelInfer",
                    args.grpc
                );
                loop {
                    let t = Instant::now();
                    if t >= until {
                        break;
                    }
                    let req = Request::post(uri.as_str())
                        .header("content-type", "application/grpc")
                        .header("te", "trailers")
                        .body(Full::new(framed.clone()))?;
                    let res = sender.send_request(req).await?;
                    let body = res.into_body().collect().await?;
                    let ok = body
                        .trailers()
                        .and_then(|t| t.get("grpc-status"))
                        .is_some_and(|v| v == "0");
                    anyhow::ensure!(ok, "gRPC call failed");
                    if t >= warm_until {
                        lat.push(t.elapsed().as_micros() as u32);
                    }
                }
                drop(sender);
                conn.abort();
            }
            Kind::HttpJson | Kind::HttpBinary => {
                let (body, header_len) = http_body(kind, row);
                let tcp = tokio::net::TcpStream::connect(args.http).await?;
                tcp.set_nodelay(true)?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                        .await?;
                let conn = tokio::spawn(conn);
                loop {
                    let t = Instant::now();
                    if t >= until {
                        break;
                    }
                    let mut req = Request::post(PATH)
                        .header("host", args.http.to_string())
                        .header("content-type", "application/json");
                    if let Some(n) = header_len {
                        req = req.header("inference-header-content-length", n);
                    }
                    let req = req.body(Full::new(body.clone()))?;
                    let res = sender.send_request(req).await?;
                    anyhow::ensure!(res.status().is_success(), "HTTP {}", res.status());
                    res.into_body().collect().await?;
                    if t >= warm_until {
                        lat.push(t.elapsed().as_micros() as u32);
                    }
                }
                drop(sender);
                conn.abort();
            }
        }
        Ok(lat)
    }

    struct Run {
        rps: f64,
        p50_us: u32,
        p99_us: u32,
    }

    async fn run(
        kind: Kind,
        clients: usize,
        args: &Arc<Args>,
        row: &Arc<Vec<f32>>,
    ) -> anyhow::Result<Run> {
        let start = Instant::now();
        let warm_until = start + Duration::from_secs(1);
        let until = warm_until + Duration::from_secs_f64(args.seconds);
        // One task per client, spread over the runtime's worker threads.
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let (args, row) = (args.clone(), row.clone());
                tokio::spawn(async move { client(kind, &args, &row, warm_until, until).await })
            })
            .collect();
        let mut all = vec![];
        for t in tasks {
            all.extend(t.await??);
        }
        all.sort_unstable();
        let pick = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
        Ok(Run {
            rps: all.len() as f64 / args.seconds,
            p50_us: pick(0.50),
            p99_us: pick(0.99),
        })
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    pub fn main() -> anyhow::Result<()> {
        let args = Arc::new(args()?);
        let row = Arc::new(row()?);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads.max(1))
            .enable_all()
            .build()?;
        let kinds = [
            Kind::HttpJson,
            Kind::HttpBinary,
            Kind::Grpc,
            Kind::GrpcHyper,
        ];
        let mut results: Vec<(Kind, usize, Vec<Run>)> = vec![];
        for &c in &args.clients {
            for &k in &kinds {
                if !args.kinds.is_empty() && !args.kinds.iter().any(|n| n == k.name()) {
                    continue;
                }
                results.push((k, c, vec![]));
            }
        }
        for round in 1..=args.rounds {
            for (kind, clients, runs) in results.iter_mut() {
                let r = rt.block_on(run(*kind, *clients, &args, &row))?;
                println!(
                    "round={round} kind={} clients={clients} rps={:.0} p50_us={} p99_us={}",
                    kind.name(),
                    r.rps,
                    r.p50_us,
                    r.p99_us
                );
                runs.push(r);
            }
        }
        println!();
        println!(
            "| clients | kind | req/s (median of {}) | p50 µs | p99 µs | vs http-json | vs http-binary |",
            args.rounds
        );
        println!("|---|---|---|---|---|---|---|");
        let med = |k: Kind, c: usize| -> Option<(f64, f64, f64)> {
            let (_, _, runs) = results
                .iter()
                .find(|(kind, clients, _)| *kind == k && *clients == c)?;
            Some((
                median(runs.iter().map(|r| r.rps).collect()),
                median(runs.iter().map(|r| r.p50_us as f64).collect()),
                median(runs.iter().map(|r| r.p99_us as f64).collect()),
            ))
        };
        let ratio = |rps: f64, of: Option<(f64, f64, f64)>| match of {
            Some((base, _, _)) => format!("{:.2}×", rps / base),
            None => "-".to_owned(),
        };
        for &c in &args.clients {
            let json = med(Kind::HttpJson, c);
            let binary = med(Kind::HttpBinary, c);
            for &k in &kinds {
                let Some((rps, p50, p99)) = med(k, c) else {
                    continue;
                };
                println!(
                    "| {c} | {} | {rps:.0} | {p50:.0} | {p99:.0} | {} | {} |",
                    k.name(),
                    ratio(rps, json),
                    ratio(rps, binary)
                );
            }
        }
        Ok(())
    }
}
