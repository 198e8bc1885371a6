//! Whole-model inference per backend, straight through `Backend::infer` (no HTTP, no queue):
//! the tabular reference bundle (wdbc-malignancy) at batch 1 and 64, and the image bundle
//! (image-orientation, eight CNN passes per 224 × 224 image) at batch 1 and 16.
//!
//! Guards against regressions in the engines' per-call overhead and in the tensor conversions
//! at the backend boundary. `cargo bench --bench backends` (tract);
//! `ORT_DYLIB_PATH=… cargo bench --features ort --bench backends` adds ONNX Runtime.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use nightingale_inference::{BackendKind, LoadOptions, NamedTensor, Tensor};

fn rows(n: usize) -> Vec<NamedTensor> {
    let csv = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("models/bundles/wdbc-malignancy/testdata/test.csv"),
    )
    .expect("test split");
    let all: Vec<f32> = csv
        .lines()
        .skip(1)
        .flat_map(|l| {
            l.split(',')
                .take(30)
                .map(|v| v.parse::<f32>().unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    let data: Vec<f32> = all.iter().cycle().take(n * 30).copied().collect();
    vec![NamedTensor::new(
        "features",
        Tensor::from_vec(vec![n, 30], data).unwrap(),
    )]
}

/// Every engine this build has, on one bundle's model file, at each batch size: one
/// criterion group named after the bundle, one benchmark per engine and batch.
fn bench_model(
    c: &mut Criterion,
    bundle: &str,
    batches: &[usize],
    sample_size: Option<usize>,
    input: fn(usize) -> Vec<NamedTensor>,
) {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models/bundles")
        .join(bundle)
        .join("1/model.onnx");
    let mut kinds = vec![BackendKind::Tract];
    if cfg!(feature = "ort") {
        kinds.push(BackendKind::Ort);
    }
    let mut group = c.benchmark_group(bundle);
    if let Some(n) = sample_size {
        group.sample_size(n);
    }
    for kind in kinds {
        let mut backend = nightingale_inference::load(
            &model,
            &LoadOptions {
                backend: kind,
                intra_op_threads: 1,
                ..LoadOptions::default()
            },
        )
        .expect("model loads");
        for &batch in batches {
            let input = input(batch);
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_with_input(
                BenchmarkId::new(kind.as_str(), batch),
                &input,
                |b, input| b.iter(|| black_box(backend.infer(input.clone()).unwrap())),
            );
        }
    }
    group.finish();
}

fn backends(c: &mut Criterion) {
    bench_model(c, "wdbc-malignancy", &[1, 64], None, rows);
}

/// Deterministic N(0,1)-ish images (sum of uniforms), the scale the preprocessing produces.
fn images(n: usize) -> Vec<NamedTensor> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut uniform = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f32 / (1u64 << 53) as f32
    };
    let data: Vec<f32> = (0..n * 224 * 224)
        .map(|_| (0..4).map(|_| uniform()).sum::<f32>() - 2.0)
        .collect();
    vec![NamedTensor::new(
        "image",
        Tensor::from_vec(vec![n, 1, 224, 224], data).unwrap(),
    )]
}

fn image_model(c: &mut Criterion) {
    bench_model(c, "image-orientation", &[1, 16], Some(20), images);
}

criterion_group!(benches, backends, image_model);
criterion_main!(benches);
