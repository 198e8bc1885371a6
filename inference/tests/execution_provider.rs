//! ONNX Runtime's CUDA execution provider, asked for with `ExecutionProvider::Cuda`. Where
//! ONNX Runtime can register it, the backend says the model runs on the GPU; where it cannot
//! (the CPU-only `onnxruntime` wheel CI uses, or no GPU) the model still loads, runs on the
//! CPU and says so, instead of falling back silently. Either way the answers are ONNX
//! Runtime's own on the CPU (the fixture, written by `models/train/make_cnn_fixtures.py`):
//! within 1e-5 on the CPU, 1e-4 on the GPU (cuDNN's FP32 convolutions sum in another order;
//! TF32 is off).
//!
//! `NIGHTINGALE_EXPECT_GPU=1` (set by `benches/gpu/run.sh` on a machine with a GPU and the
//! `onnxruntime-gpu` library) requires the GPU; without it the test requires the CPU, which
//! is what every machine without that library gets.

#![cfg(feature = "ort")]

use std::path::{Path, PathBuf};

use nightingale_inference::{
    BackendKind, ExecutionProvider, LoadOptions, NamedTensor, Tensor, load,
};
use serde_json::Value;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/cnn")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("an array of numbers")
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

#[test]
fn the_cuda_provider_says_where_the_model_runs_and_answers_as_onnx_runtime_on_the_cpu() {
    let expect_gpu = std::env::var("NIGHTINGALE_EXPECT_GPU").is_ok_and(|v| v == "1");
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(data_dir().join("small_cnn.json")).expect("fixture"),
    )
    .expect("fixture JSON");
    assert!(
        doc["producer"]
            .as_str()
            .unwrap()
            .starts_with("onnxruntime ")
    );
    let shape: Vec<usize> = doc["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let options = LoadOptions {
        backend: BackendKind::Ort,
        execution_provider: ExecutionProvider::Cuda { device_id: 0 },
        ..Default::default()
    };
    let mut backend = load(&data_dir().join("small_cnn.onnx"), &options)
        .expect("a model asked onto the GPU loads even where there is none");
    assert_eq!(
        backend.on_gpu(),
        expect_gpu,
        "NIGHTINGALE_EXPECT_GPU={expect_gpu}, but the backend says on_gpu = {}",
        backend.on_gpu()
    );
    let forked = backend.fork().expect("a second instance");
    assert_eq!(
        forked.on_gpu(),
        expect_gpu,
        "a fork registers the provider again"
    );

    let x = Tensor::from_vec(shape, floats(&doc["input"])).expect("input tensor");
    let outputs = backend
        .infer(vec![NamedTensor::new("x", x)])
        .expect("inference");
    let expected = doc["outputs"].as_object().unwrap();
    assert_eq!(outputs.len(), expected.len());
    let tolerance = if expect_gpu { 1e-4 } else { 1e-5 };
    for out in &outputs {
        let want = floats(&expected[&out.name]["data"]);
        let Tensor::Fp32(got) = &out.tensor else {
            panic!("{}: an FP32 output", out.name)
        };
        assert_eq!(got.len(), want.len(), "{}", out.name);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
            .fold(0f32, f32::max);
        eprintln!(
            "{}: on_gpu = {}, largest difference from ONNX Runtime on the CPU {worst:e}",
            out.name,
            backend.on_gpu()
        );
        assert!(
            worst <= tolerance,
            "{}: {worst:e} > {tolerance:e}",
            out.name
        );
    }
}
