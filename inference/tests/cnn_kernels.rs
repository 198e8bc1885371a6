//! Nightingale's convolution and max-pool kernels on tract (`TractKernels::Nightingale`, the
//! default) against ONNX Runtime, on small graphs covering the geometries they take and the
//! ones they must leave to tract (`models/train/make_cnn_fixtures.py` writes the graphs, a
//! batch of three random images each and ONNX Runtime's outputs into `tests/data/cnn/`).
//!
//! Each fixture also runs on tract's own kernels (the same tolerance holds), and each image
//! run alone must give exactly the bits it gave inside the batch.

#![cfg(feature = "tract")]

use std::path::{Path, PathBuf};

use nightingale_inference::{
    Backend, BackendKind, LoadOptions, NamedTensor, Tensor, TractKernels, load,
    use_nightingale_kernels,
};
use serde_json::Value;
use tract_onnx::prelude::{Framework, InferenceModelExt};

/// Fixtures, with how many of their nodes Nightingale's kernels take.
const FIXTURES: &[(&str, usize)] = &[
    ("conv3x3_pad1_relu", 1),
    ("conv_stride2_asymmetric_pads", 1),
    ("conv_dilation2", 1),
    ("conv_same_upper_stride2", 1),
    ("conv_1x5_no_bias", 1),
    // Two groups: tract's own convolution.
    ("conv_grouped_left_to_tract", 0),
    // Its output feeds a ReLU and a sigmoid: the convolution is taken, the ReLU is not fused.
    ("conv_read_twice", 1),
    ("maxpool_2x2", 1),
    ("maxpool_3x3_stride2_pad1", 1),
    ("maxpool_ceil_mode", 1),
    ("maxpool_dilated", 1),
    // Three convolutions and two pools; the first plane (70 × 70) is wider than one product.
    ("small_cnn", 5),
    // The direct convolution's geometries (strides 1 and 2, no dilation).
    ("conv_stride_1x2_co7", 1),
    ("conv7x7_stride2_pad3", 1),
    ("conv_pads_wider_than_kernel", 1),
    ("conv_many_channels", 1),
    // im2col + product: dilated on a plane wider than one product, and a stride of 3.
    ("conv_dilation2_wide_plane", 1),
    ("conv_stride3", 1),
    // Slices with steps (tract's Downsample): two flips, a flip after a transpose, every
    // second row, every third column; the flip by two steps stays tract's, and tract runs the
    // flip that starts inside the axis as a slice of the first flip.
    ("slice_steps", 5),
    // A ResNet bottleneck declared for one image: tract makes the 1 × 1 convolutions matrix
    // products and drops the batch axis of 1 through them; the 3 × 3 convolution is taken on
    // its CHW planes.
    ("bottleneck_chw", 1),
    // 1 × 1 convolutions, tract's EinSums by then: 12 → 20 (with its ReLU), 12 → 70 → 260 → 9,
    // 12 → 24 with a batch norm and a ReLU (folded into it).
    ("conv1x1", 5),
];

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

fn shape(v: &Value) -> Vec<usize> {
    v.as_array()
        .expect("a shape")
        .iter()
        .map(|d| d.as_u64().expect("a dimension") as usize)
        .collect()
}

fn run(backend: &mut dyn Backend, shape: Vec<usize>, data: Vec<f32>) -> Vec<NamedTensor> {
    let x = Tensor::from_vec(shape, data).expect("input tensor");
    backend
        .infer(vec![NamedTensor::new("x", x)])
        .expect("inference")
}

fn values(t: &Tensor) -> Vec<f32> {
    match t {
        Tensor::Fp32(a) => a.iter().copied().collect(),
        other => panic!("an FP32 output, got {:?}", other.datatype()),
    }
}

/// ONNX Runtime's value `want` against ours: 1e-5, relative above 1 (the engines sum in
/// another order).
fn allowed(want: f32) -> f32 {
    1e-5 * want.abs().max(1.0)
}

#[test]
fn the_kernels_take_the_nodes_they_should() {
    for (name, expected) in FIXTURES {
        let path = data_dir().join(format!("{name}.onnx"));
        let model = tract_onnx::onnx()
            .model_for_path(&path)
            .and_then(|m| m.into_typed())
            .and_then(|m| m.into_decluttered())
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let mut model = model;
        let taken = use_nightingale_kernels(&mut model).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(taken, *expected, "{name}");
    }
}

#[test]
fn both_kernel_sets_match_onnx_runtime_and_a_row_is_the_same_alone_or_batched() {
    for (name, _) in FIXTURES {
        let doc: Value = serde_json::from_str(
            &std::fs::read_to_string(data_dir().join(format!("{name}.json"))).unwrap(),
        )
        .unwrap();
        assert!(
            doc["producer"]
                .as_str()
                .unwrap()
                .starts_with("onnxruntime ")
        );
        let input_shape = shape(&doc["shape"]);
        let input = floats(&doc["input"]);
        let expected = doc["outputs"].as_object().unwrap();
        for kernels in [TractKernels::Nightingale, TractKernels::Tract] {
            let options = LoadOptions {
                backend: BackendKind::Tract,
                tract_kernels: kernels,
                ..Default::default()
            };
            let mut backend = load(&data_dir().join(format!("{name}.onnx")), &options)
                .unwrap_or_else(|e| panic!("{name} ({kernels:?}): {e}"));
            let batch = run(backend.as_mut(), input_shape.clone(), input.clone());
            assert_eq!(batch.len(), expected.len(), "{name}");
            for out in &batch {
                let want = &expected[&out.name];
                assert_eq!(
                    out.tensor.shape(),
                    shape(&want["shape"]),
                    "{name} {}",
                    out.name
                );
                let got = values(&out.tensor);
                let want = floats(&want["data"]);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= allowed(*w),
                        "{name} ({kernels:?}) {}[{i}]: {g} against onnxruntime's {w}",
                        out.name
                    );
                }
            }
            // Each image alone: the same bits as in the batch.
            let rows = input_shape[0];
            let per_image: usize = input_shape[1..].iter().product();
            for r in 0..rows {
                let mut one = input_shape.clone();
                one[0] = 1;
                let alone = run(
                    backend.as_mut(),
                    one,
                    input[r * per_image..(r + 1) * per_image].to_vec(),
                );
                for (a, b) in alone.iter().zip(&batch) {
                    let all = values(&b.tensor);
                    let per_row = all.len() / rows;
                    let row: Vec<u32> = all[r * per_row..(r + 1) * per_row]
                        .iter()
                        .map(|v| v.to_bits())
                        .collect();
                    let alone: Vec<u32> = values(&a.tensor).iter().map(|v| v.to_bits()).collect();
                    assert_eq!(alone, row, "{name} ({kernels:?}) {} image {r}", a.name);
                }
            }
        }
    }
}

/// ONNX Runtime's CUDA execution provider, asked for with `ExecutionProvider::Cuda`, on
/// `small_cnn`. Where ONNX Runtime can register it, the backend says the model runs on the
/// GPU; where it cannot (the CPU-only `onnxruntime` wheel CI uses, or no GPU) the model still
/// loads, runs on the CPU and says so, instead of falling back silently. Either way the
/// answers are ONNX Runtime's own on the CPU (the fixture): within 1e-5 on the CPU, 1e-4 on
/// the GPU (cuDNN's FP32 convolutions sum in another order; TF32 is off).
///
/// `NIGHTINGALE_EXPECT_GPU=1` (for a machine with a GPU and the `onnxruntime-gpu` library)
/// requires the GPU; without it the test requires the CPU, which is what every machine
/// without that library gets.
#[cfg(feature = "ort")]
#[test]
fn the_cuda_provider_says_where_the_model_runs_and_answers_as_onnx_runtime_on_the_cpu() {
    let expect_gpu = std::env::var("NIGHTINGALE_EXPECT_GPU").is_ok_and(|v| v == "1");
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(data_dir().join("small_cnn.json")).expect("fixture"),
    )
    .expect("fixture JSON");
    let options = LoadOptions {
        backend: BackendKind::Ort,
        execution_provider: nightingale_inference::ExecutionProvider::Cuda { device_id: 0 },
        ..Default::default()
    };
    let mut backend = load(&data_dir().join("small_cnn.onnx"), &options)
        .expect("a model asked onto the GPU loads even where there is none");
    assert_eq!(
        backend.on_gpu(),
        expect_gpu,
        "NIGHTINGALE_EXPECT_GPU={expect_gpu}"
    );
    let forked = backend.fork().expect("a second instance");
    assert_eq!(
        forked.on_gpu(),
        expect_gpu,
        "a fork registers the provider again"
    );
    let outputs = run(
        backend.as_mut(),
        shape(&doc["shape"]),
        floats(&doc["input"]),
    );
    let expected = doc["outputs"].as_object().unwrap();
    assert_eq!(outputs.len(), expected.len());
    let tolerance = if expect_gpu { 1e-4 } else { 1e-5 };
    for out in &outputs {
        let want = floats(&expected[&out.name]["data"]);
        let got = values(&out.tensor);
        assert_eq!(got.len(), want.len(), "{}", out.name);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
            .fold(0f32, f32::max);
        assert!(
            worst <= tolerance,
            "{}: {worst:e} > {tolerance:e}",
            out.name
        );
    }
}
