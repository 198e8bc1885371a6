//! The HTTP ceiling of this machine (issue 13; a benchmark tool, not a test): a minimal axum
//! server on the same tokio runtime, axum and hyper as `nightingale serve`, that reads each
//! POST body whole and answers a fixed KServe v2-shaped JSON of the size Nightingale answers a
//! 1-row WDBC infer asking for `probabilities`. No model, no decode, no audit: what HTTP
//! alone costs under the same load, the bound `benches/load/targets.sh` compares the server
//! against.
//!
//! ```sh
//! cargo build --release --bench http_ceiling
//! target/release/deps/http_ceiling-* --serve 127.0.0.1:8099   # then wrk/curl any POST path
//! ```
//!
//! Without `--serve ADDR` it prints this usage and exits, so that `cargo bench` (which runs
//! every bench target) is not held by a server that never ends.

use axum::Router;
use axum::body::Bytes;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::{get, post};

/// What Nightingale answers a 1-row infer of wdbc-malignancy@1 asking for `probabilities`
/// (same keys and the same number of bytes, give or take a digit).
const ANSWER: &str = r#"{"model_name":"wdbc-malignancy","model_version":"1","outputs":[{"name":"probabilities","datatype":"FP32","shape":[1,2],"data":[0.00012345678,0.99987655878]}]}"#;

async fn answer(body: Bytes) -> impl IntoResponse {
    // The body is read whole, as the server's extractor does; its length keeps it used.
    std::hint::black_box(body.len());
    ([(CONTENT_TYPE, "application/json")], ANSWER)
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(addr) = args
        .iter()
        .position(|a| a == "--serve")
        .and_then(|i| args.get(i + 1))
    else {
        eprintln!("usage: http_ceiling --serve ADDR:PORT   (a minimal axum server; see the file)");
        return Ok(());
    };
    // The same runtime as `nightingale serve`: multi-threaded, one worker per core.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let app = Router::new()
                .route("/v2/health/ready", get(|| async { "" }))
                .fallback(post(answer));
            let listener = tokio::net::TcpListener::bind(addr.as_str()).await?;
            eprintln!("http_ceiling listening on {}", listener.local_addr()?);
            axum::serve(listener, app).await
        })
}
