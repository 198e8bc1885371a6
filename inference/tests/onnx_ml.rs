//! ONNX-ML conformance: scikit-learn models exported by skl2onnx, run by Nightingale's
//! backends, against the outputs ONNX Runtime gave for the same rows.
//!
//! The fixtures live in `tests/data/onnx-ml/` and are written by
//! `models/train/make_op_fixtures.py`: each `<name>.json` names its `.onnx` model, holds the
//! input `X` (20 rows of a scikit-learn data set, or 16 for the hand-built `te_*` tree
//! ensembles; `null` stands for NaN) and every output as ONNX Runtime computed it.
//! Probabilities and values must match within 1e-5 (relative above 1, see [`allowed`]), labels
//! exactly. Each model must also give bit-identical results whether the rows run as one batch
//! or one at a time, on the same instance after the batch: an engine that keeps anything from
//! one run to the next (tract's `Scan` did) fails here.

use std::path::{Path, PathBuf};

use nightingale_inference::{
    Backend, BackendKind, DataType, LoadOptions, NamedTensor, Tensor, load,
};
use serde_json::Value;

const TOLERANCE: f32 = 1e-5;

/// The largest difference allowed from ONNX Runtime's value `want`: [`TOLERANCE`], relative
/// once `|want|` exceeds 1. Probabilities and scores in [-1, 1] get the absolute 1e-5; values
/// such as regression targets in the hundreds are one f32 step (1.5e-5 at 181.4) away when
/// the engines sum in another order, so they are held to 1e-5 of their size.
fn allowed(want: f32) -> f32 {
    TOLERANCE * want.abs().max(1.0)
}

const ALL_FIXTURES: &[&str] = &[
    "scaler",
    "logreg_pipeline",
    "gbr",
    "gbc_binary",
    "rf_binary",
    "logreg_zipmap",
    "binarizer",
    // Multi-class tree ensembles (gradient boosting: post-transform SOFTMAX).
    "gbc_multiclass",
    "rf_multiclass",
    // Hand-built tree ensembles: ONNX Runtime's corners that skl2onnx exports do not reach.
    "te_binary_mixed_logistic",
    "te_binary_mixed_none",
    "te_binary_positive_none",
    "te_binary_positive_logistic",
    "te_binary_class1_two_base",
    "te_multiclass_softmax",
    "te_multiclass_softmax_zero",
    "te_regressor_two_targets",
    "te_regressor_target_without_votes",
    "te_regressor_average",
    "te_regressor_min",
    "te_regressor_max",
    // k-nearest neighbours: Scan, TopK (largest = 0), ArrayFeatureExtractor, ...
    "knn_binary",
    "knn_multiclass",
    "knn_distance_multiclass",
    "knn_regressor",
    // SVMs: SVMClassifier and SVMRegressor.
    "svc_linear_binary",
    "svc_rbf_binary",
    "svc_poly_binary",
    "svc_sigmoid_binary",
    "svc_rbf_binary_prob",
    "svc_rbf_multiclass",
    "svc_linear_multiclass_prob",
    "svc_rbf_multiclass_prob",
    "svc_poly_multiclass_prob",
    "svc_sigmoid_multiclass_prob",
    "nusvc_multiclass_prob",
    "svr_rbf",
    "svr_poly",
    "nusvr_linear",
    "one_class_svm",
    // Hand-built SVMClassifiers in liblinear's layout (no support vectors).
    "svm_liblinear_binary_mixed",
    "svm_liblinear_binary_positive",
    "svm_liblinear_multiclass",
    // SimpleImputer pipelines: NaN in the rows (and a numeric missing value).
    "imputer_mean",
    "imputer_median",
    "imputer_most_frequent",
    "imputer_constant",
    "imputer_numeric_missing",
];

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/onnx-ml")
}

/// One expected output of a fixture.
struct Expected {
    name: String,
    datatype: DataType,
    shape: Vec<usize>,
    /// FP32 values (also INT64 ones, for the report), in row-major order.
    floats: Vec<f32>,
    /// INT64 values, in row-major order; empty for FP32 outputs.
    ints: Vec<i64>,
}

struct Fixture {
    model: PathBuf,
    input_shape: Vec<usize>,
    input: Vec<f32>,
    outputs: Vec<Expected>,
}

fn shape_of(v: &Value) -> Vec<usize> {
    v.as_array()
        .expect("shape is an array")
        .iter()
        .map(|d| d.as_u64().expect("dimension is an unsigned integer") as usize)
        .collect()
}

/// Floats of a fixture; `null` stands for NaN (JSON has no NaN).
fn floats_of(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("data is an array")
        .iter()
        .map(|x| match x {
            Value::Null => f32::NAN,
            x => x.as_f64().expect("data holds numbers or null") as f32,
        })
        .collect()
}

fn read_fixture(name: &str) -> Fixture {
    let path = data_dir().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let json: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
    let model = data_dir().join(json["model"].as_str().expect("model is a string"));
    let x = &json["inputs"]["X"];
    let input_shape = shape_of(&x["shape"]);
    let input = floats_of(&x["data"]);
    let outputs = json["outputs"]
        .as_object()
        .expect("outputs is an object")
        .iter()
        .map(|(out_name, spec)| {
            let datatype = match spec["datatype"].as_str() {
                Some("FP32") => DataType::Fp32,
                Some("INT64") => DataType::Int64,
                other => panic!("{name}/{out_name}: unexpected datatype {other:?}"),
            };
            let ints = if datatype == DataType::Int64 {
                spec["data"]
                    .as_array()
                    .expect("data is an array")
                    .iter()
                    .map(|x| x.as_i64().expect("INT64 data holds integers"))
                    .collect()
            } else {
                Vec::new()
            };
            Expected {
                name: out_name.clone(),
                datatype,
                shape: shape_of(&spec["shape"]),
                floats: floats_of(&spec["data"]),
                ints,
            }
        })
        .collect();
    Fixture {
        model,
        input_shape,
        input,
        outputs,
    }
}

/// An error with its causes, one per line.
fn report(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(&format!("\n  caused by: {cause}"));
        source = cause.source();
    }
    text
}

fn run(backend: &mut dyn Backend, shape: Vec<usize>, data: Vec<f32>) -> Vec<NamedTensor> {
    let x = Tensor::from_vec(shape, data).expect("input tensor");
    backend
        .infer(vec![NamedTensor::new("X", x)])
        .expect("inference")
}

fn output<'a>(outputs: &'a [NamedTensor], name: &str, fixture: &str) -> &'a Tensor {
    let names: Vec<&str> = outputs.iter().map(|o| o.name.as_str()).collect();
    &outputs
        .iter()
        .find(|o| o.name == name)
        .unwrap_or_else(|| panic!("{fixture}: no output {name:?}; outputs are {names:?}"))
        .tensor
}

/// Compares one output with ONNX Runtime's; returns the largest absolute difference.
fn compare(fixture: &str, got: &Tensor, want: &Expected) -> f32 {
    let what = format!("{fixture}/{}", want.name);
    assert_eq!(got.datatype(), want.datatype, "{what}: datatype");
    assert_eq!(got.shape(), want.shape.as_slice(), "{what}: shape");
    match want.datatype {
        DataType::Fp32 => {
            let view = got.view::<f32>().expect("FP32 view");
            let mut max_diff = 0f32;
            for (i, (&g, &w)) in view.iter().zip(&want.floats).enumerate() {
                if g.is_nan() && w.is_nan() {
                    continue;
                }
                let diff = (g - w).abs();
                assert!(
                    diff <= allowed(w),
                    "{what}[{i}]: got {g}, onnxruntime {w} (diff {diff})"
                );
                max_diff = max_diff.max(diff);
            }
            max_diff
        }
        DataType::Int64 => {
            let view = got.view::<i64>().expect("INT64 view");
            let got: Vec<i64> = view.iter().copied().collect();
            assert_eq!(got, want.ints, "{what}: labels");
            0.0
        }
        other => panic!("{what}: no comparison for {other:?}"),
    }
}

/// How far apart two outputs are: `None` when they are bit for bit the same, otherwise the
/// largest absolute difference (infinite where they differ in anything but float values).
fn difference(a: &Tensor, b: &Tensor) -> Option<f32> {
    if a.datatype() == DataType::Fp32 && a.shape() == b.shape() && b.datatype() == DataType::Fp32 {
        let (a, b) = (a.view::<f32>().unwrap(), b.view::<f32>().unwrap());
        if a.iter()
            .zip(b.iter())
            .all(|(x, y)| x.to_bits() == y.to_bits())
        {
            return None;
        }
        return Some(
            a.iter()
                .zip(b.iter())
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max),
        );
    }
    if a == b { None } else { Some(f32::INFINITY) }
}

/// Whether two FP32 outputs of the same shape agree within [`allowed`] everywhere.
fn within_tolerance(a: &Tensor, b: &Tensor) -> bool {
    match (a.view::<f32>(), b.view::<f32>()) {
        (Some(a), Some(b)) if a.shape() == b.shape() => a
            .iter()
            .zip(b.iter())
            .all(|(&x, &y)| (x - y).abs() <= allowed(y)),
        _ => false,
    }
}

/// Loads every fixture with `kind`, checks each output against ONNX Runtime's, then checks
/// that running the rows one by one gives what the batch gave. tract must give the same bits
/// (each row is computed on its own); ONNX Runtime's own kernels take other code paths for
/// other batch sizes (its linear classifier's GEMM), so for it the rows must agree within the
/// tolerance.
fn conformance(kind: BackendKind, fixtures: &[&str]) {
    // Every fixture is checked, then the failures are listed together.
    let failed: Vec<&str> = fixtures
        .iter()
        .copied()
        .filter(|&name| std::panic::catch_unwind(|| check_fixture(kind, name)).is_err())
        .collect();
    assert!(
        failed.is_empty(),
        "{kind}: fixtures that failed: {failed:?}"
    );
}

fn check_fixture(kind: BackendKind, name: &str) {
    let options = LoadOptions {
        backend: kind,
        ..Default::default()
    };
    {
        let fixture = read_fixture(name);
        let mut backend = load(&fixture.model, &options)
            .unwrap_or_else(|e| panic!("{kind}: loading {name}: {}", report(&e)));

        // The whole batch against ONNX Runtime.
        let batch = run(
            backend.as_mut(),
            fixture.input_shape.clone(),
            fixture.input.clone(),
        );
        for want in &fixture.outputs {
            let got = output(&batch, &want.name, name);
            let max_diff = compare(name, got, want);
            eprintln!("{kind} {name}/{}: max abs diff {max_diff:e}", want.name);
        }

        // Row by row, against the batch.
        let rows = fixture.input_shape[0];
        let width: usize = fixture.input_shape[1..].iter().product();
        let mut row_shape = fixture.input_shape.clone();
        row_shape[0] = 1;
        let mut singles: Vec<Vec<NamedTensor>> = Vec::with_capacity(rows);
        for r in 0..rows {
            let row = fixture.input[r * width..(r + 1) * width].to_vec();
            singles.push(run(backend.as_mut(), row_shape.clone(), row));
        }
        for want in &fixture.outputs {
            let parts: Vec<&Tensor> = singles
                .iter()
                .map(|s| output(s, &want.name, name))
                .collect();
            let stacked = Tensor::concat(&parts).expect("stacking single-row outputs");
            let batched = output(&batch, &want.name, name);
            match difference(&stacked, batched) {
                None => {}
                Some(_) if kind != BackendKind::Tract && within_tolerance(&stacked, batched) => {
                    let d = difference(&stacked, batched).unwrap_or(0.0);
                    eprintln!(
                        "{kind} {name}/{}: row by row vs batched: max abs diff {d:e}",
                        want.name
                    );
                }
                Some(d) => panic!(
                    "{kind} {name}/{}: row-by-row results differ from the batched run (max abs diff {d:e})",
                    want.name
                ),
            }
        }
    }
}

#[test]
fn tract_matches_onnxruntime() {
    conformance(BackendKind::Tract, ALL_FIXTURES);
}

/// ONNX Runtime's ZipMap output is a sequence of maps, not a tensor, so `logreg_zipmap` is
/// left out here.
#[cfg(feature = "ort")]
#[test]
fn ort_matches_onnxruntime() {
    let fixtures: Vec<&str> = ALL_FIXTURES
        .iter()
        .copied()
        .filter(|&f| f != "logreg_zipmap")
        .collect();
    conformance(BackendKind::Ort, &fixtures);
}
