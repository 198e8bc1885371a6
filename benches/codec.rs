//! Decoding KServe v2 JSON inference requests (src/http/codec.rs): the wdbc-malignancy
//! shape (64 rows of 30 FP32, from the bundle's test split) and a 1 M-element FP32 tensor,
//! each with `data` flat and nested by row, plus 64 K BYTES strings. The whole request is
//! decoded (envelope, then tensor data) through the same function the server calls.
//!
//!   cargo bench --bench codec
//!
//! Throughput is counted in body bytes.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use nightingale::http::decode_request_for_bench;
use nightingale_inference::DataType;
use serde_json::json;

/// The test split's feature rows, repeated to `n` rows.
fn wdbc_rows(n: usize) -> Vec<Vec<f32>> {
    let csv = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("models/bundles/wdbc-malignancy/testdata/test.csv"),
    )
    .expect("test.csv");
    let rows: Vec<Vec<f32>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').take(30).map(|v| v.parse().unwrap()).collect())
        .collect();
    (0..n).map(|i| rows[i % rows.len()].clone()).collect()
}

fn request(shape: [usize; 2], datatype: &str, data: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&json!({"inputs": [{"name": "features", "shape": shape, "datatype": datatype, "data": data}]}))
        .unwrap()
}

fn codec(c: &mut Criterion) {
    let wdbc = wdbc_rows(64);
    let flat64: Vec<f32> = wdbc.iter().flatten().copied().collect();
    // 1 M elements: 1000 rows of 1000 values spread like real features.
    let big: Vec<Vec<f32>> = (0..1000)
        .map(|r| {
            (0..1000)
                .map(|c| ((r * 1000 + c) as f32 * 0.618_034).fract() * 100.0)
                .collect()
        })
        .collect();
    let flat_big: Vec<f32> = big.iter().flatten().copied().collect();
    let strings: Vec<String> = (0..65536).map(|i| format!("token-{i:05}")).collect();
    let cases: Vec<(&str, Vec<u8>, usize)> = vec![
        (
            "wdbc_64x30_flat",
            request([64, 30], "FP32", json!(flat64)),
            1920,
        ),
        (
            "wdbc_64x30_nested",
            request([64, 30], "FP32", json!(wdbc)),
            1920,
        ),
        (
            "fp32_1M_flat",
            request([1000, 1000], "FP32", json!(flat_big)),
            1_000_000,
        ),
        (
            "fp32_1M_nested",
            request([1000, 1000], "FP32", json!(big)),
            1_000_000,
        ),
        (
            "bytes_64K",
            request([256, 256], "BYTES", json!(strings)),
            65536,
        ),
    ];
    let mut group = c.benchmark_group("decode_json");
    group.sample_size(20);
    for (name, body, elements) in &cases {
        let datatype = &if name.starts_with("bytes") {
            DataType::Bytes
        } else {
            DataType::Fp32
        };
        assert_eq!(
            decode_request_for_bench(body, None, *datatype),
            Ok(*elements),
            "{name}"
        );
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), body, |b, body| {
            b.iter(|| decode_request_for_bench(black_box(body), None, *datatype))
        });
    }
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
