//! The lesion-detection CNN (128 × 128, 5 convolutions) on every engine this build has, in one
//! run: tract and ONNX Runtime (`--features ort`) on the ONNX bundle, candle on
//! `lesion-detection-candle` (the same weights), at batch 1 and 32, straight through
//! `Backend::infer`; then candle's gradient explanations (Grad-CAM of 32 rows, integrated
//! gradients of one row at 32 steps).
//!
//! Guards the candle engine's speed against the ONNX engines and the cost of its gradients
//! (docs/performance.md section 15). One thread per engine: tract is single-threaded, ort gets
//! `intra_op_threads = 1`, and candle's CPU kernels take `RAYON_NUM_THREADS` (all cores when
//! unset), so run it as
//! `RAYON_NUM_THREADS=1 ORT_DYLIB_PATH=… cargo bench -p nightingale-inference --features ort --bench lesion`.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use nightingale_inference::explain::{GradientMethod, GradientRequest};
use nightingale_inference::{Backend, BackendKind, LoadOptions, NamedTensor, Tensor};

/// Deterministic N(0,1)-ish images (sum of uniforms), the scale the preprocessing produces.
fn images(n: usize) -> NamedTensor {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut uniform = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f32 / (1u64 << 53) as f32
    };
    let data: Vec<f32> = (0..n * 128 * 128)
        .map(|_| (0..4).map(|_| uniform()).sum::<f32>() - 2.0)
        .collect();
    NamedTensor::new(
        "image",
        Tensor::from_vec(vec![n, 1, 128, 128], data).unwrap(),
    )
}

fn engines() -> Vec<(&'static str, Box<dyn Backend>)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/bundles");
    let onnx = root.join("lesion-detection/1/model.onnx");
    let candle = root.join("lesion-detection-candle/1");
    let options = |backend| LoadOptions {
        backend,
        intra_op_threads: 1,
        ..LoadOptions::default()
    };
    let mut engines: Vec<(&'static str, Box<dyn Backend>)> = vec![];
    if cfg!(feature = "tract") {
        engines.push((
            "tract",
            nightingale_inference::load(&onnx, &options(BackendKind::Tract)).expect("tract loads"),
        ));
    }
    if cfg!(feature = "ort") {
        engines.push((
            "ort",
            nightingale_inference::load(&onnx, &options(BackendKind::Ort)).expect("ort loads"),
        ));
    }
    let read = |f: &str| std::fs::read(candle.join(f)).expect("candle bundle file");
    engines.push((
        "candle",
        nightingale_inference::load_candle(
            "conv-classifier",
            &read("architecture.json"),
            &candle.join("architecture.json"),
            &read("model.safetensors"),
            &candle,
            &options(BackendKind::Candle),
        )
        .expect("candle loads"),
    ));
    engines
}

fn lesion(c: &mut Criterion) {
    let mut engines = engines();
    let mut group = c.benchmark_group("lesion-detection");
    group.sample_size(20);
    for (name, backend) in &mut engines {
        for batch in [1usize, 32] {
            let x = vec![images(batch)];
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_with_input(BenchmarkId::new(*name, batch), &x, |b, x| {
                b.iter(|| black_box(backend.infer(x.clone()).unwrap()))
            });
        }
    }
    group.finish();

    let (_, candle) = engines.last_mut().expect("candle");
    let mut group = c.benchmark_group("lesion-gradients");
    group.sample_size(10);
    let request = |rows: usize, method| GradientRequest {
        input: images(rows),
        output: 0,
        targets: vec![1; rows],
        method,
        max_batch: 32,
    };
    let cam = request(32, GradientMethod::GradCam);
    group.throughput(Throughput::Elements(32));
    group.bench_function("candle-grad_cam/32", |b| {
        b.iter(|| black_box(candle.gradients(&cam, &|| false).unwrap()))
    });
    let ig = request(
        1,
        GradientMethod::IntegratedGradients {
            baseline: 0.0,
            steps: 32,
        },
    );
    group.throughput(Throughput::Elements(33));
    group.bench_function("candle-integrated_gradients-32-steps/1", |b| {
        b.iter(|| black_box(candle.gradients(&ig, &|| false).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, lesion);
criterion_main!(benches);
