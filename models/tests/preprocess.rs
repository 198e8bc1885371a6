//! The Rust image preprocessing against the numpy reference the imaging bundles were
//! trained with (fixtures from `models/train/make_preprocess_fixtures.py`), and the
//! shipped image bundle's declared preprocessing.

use std::path::Path;

use nightingale_models::{Image, Manifest, Preprocessing};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixtures {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    preprocessing: Preprocessing,
    rows: usize,
    cols: usize,
    samples: usize,
    slope: f64,
    intercept: f64,
    monochrome1: bool,
    pixels: Vec<f32>,
    expected: Vec<f32>,
}

fn fixtures() -> Fixtures {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preprocess/cases.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn rust_preprocessing_matches_the_numpy_reference() {
    let fixtures = fixtures();
    assert!(fixtures.cases.len() >= 7);
    for case in &fixtures.cases {
        let [h, w] = case.preprocessing.size;
        case.preprocessing
            .validate(&[-1, 1, h as i64, w as i64])
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let image = Image {
            rows: case.rows,
            cols: case.cols,
            samples: case.samples,
            data: &case.pixels,
            slope: case.slope,
            intercept: case.intercept,
            monochrome1: case.monochrome1,
        };
        let tensor = case.preprocessing.apply(&image).unwrap();
        assert_eq!(tensor.shape(), &[1, h, w], "{}", case.name);
        let got = tensor.view::<f32>().unwrap();
        assert_eq!(got.len(), case.expected.len(), "{}", case.name);
        let worst = got
            .iter()
            .zip(&case.expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "{}: max abs difference {worst}", case.name);
        // Not trivially constant (except the flat image, which must be all mean-shifted 0).
        if case.name == "flat image" {
            assert!(got.iter().all(|&v| (v + 2.0).abs() < 1e-6), "{}", case.name);
        } else {
            let (lo, hi) = got
                .iter()
                .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            assert!(hi - lo > 1.0, "{}: output range {lo}..{hi}", case.name);
        }
    }
}

#[test]
fn the_image_bundle_declares_its_preprocessing() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("bundles/image-orientation/bundle.toml");
    let manifest = Manifest::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
    let pre = manifest
        .preprocessing
        .expect("image bundle has [preprocessing]");
    assert_eq!(pre.input, "image");
    assert_eq!(pre.size, [224, 224]);
    let input = manifest.inputs.iter().find(|i| i.name == "image").unwrap();
    assert_eq!(input.shape, vec![-1, 1, 224, 224]);
}

#[test]
fn manifests_with_bad_preprocessing_are_refused() {
    let base = r#"
format_version = 1
name = "m"
task = "image-classification"
[[inputs]]
name = "image"
datatype = "FP32"
shape = [-1, 1, 8, 8]
[[outputs]]
name = "p"
datatype = "FP32"
shape = [-1, 2]
[preprocessing]
kind = "image"
input = "image"
size = [8, 8]
[preprocessing.window]
method = "percentile"
low = 1.0
high = 99.0
[versions.1.files]
"model.onnx" = "0000000000000000000000000000000000000000000000000000000000000000"
"#;
    let m = Manifest::parse(base).unwrap();
    assert_eq!(m.preprocessing.unwrap().std, 1.0);
    let cases = [
        (
            base.replace("input = \"image\"", "input = \"pixels\""),
            "not among the declared inputs",
        ),
        (
            base.replace("size = [8, 8]", "size = [16, 16]"),
            "[-1, 1, 16, 16]",
        ),
        (
            base.replace("method = \"percentile\"", "method = \"magic\""),
            "unknown variant",
        ),
        (
            base.replace("low = 1.0", "low = 1.0\ngamma = 2"),
            "unknown field",
        ),
        (base.replace("high = 99.0", "high = 0.5"), "low < high"),
        (
            base.replace("size = [8, 8]", "size = [8, 8]\nstd = 0.0"),
            "std finite and positive",
        ),
        (
            base.replace(
                "datatype = \"FP32\"\nshape = [-1, 1",
                "datatype = \"UINT8\"\nshape = [-1, 1",
            ),
            "must be FP32",
        ),
    ];
    for (text, needle) in cases {
        let err = Manifest::parse(&text).unwrap_err().to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
}
