//! The Rust image preprocessing against the numpy reference the imaging bundles were
//! trained with (fixtures from `models/train/make_preprocess_fixtures.py`), and the
//! shipped image bundle's declared preprocessing.

use std::path::Path;

use nightingale_models::{Image, Manifest, PreprocessError, Preprocessing, VolumeValues};
use serde::Deserialize;

/// Each manifest text is refused with an error that says `needle`.
fn assert_each_refused<const N: usize>(cases: [(String, &str); N]) {
    for (text, needle) in cases {
        let err = Manifest::parse(&text).unwrap_err().to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
}

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
    assert_each_refused(cases);
}

#[derive(Deserialize)]
struct VolumeFixtures {
    cases: Vec<VolumeCase>,
}

#[derive(Deserialize)]
struct VolumeCase {
    name: String,
    preprocessing: Preprocessing,
    depth: Option<usize>,
    rows: usize,
    cols: usize,
    slices: Vec<Vec<f32>>,
    slopes: Vec<f64>,
    intercepts: Vec<f64>,
    monochrome1: bool,
    expected_shape: Vec<usize>,
    expected: Vec<f32>,
}

/// Volumes (`[dicom] inference = "volume"`): one window over every slice (counted slice by
/// slice, slices of different rescales mixed), then the slices resampled along the slice
/// axis, against `imaging.preprocess_volume` (numpy).
#[test]
fn rust_volume_preprocessing_matches_the_numpy_reference() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preprocess/volume_cases.json");
    let fixtures: VolumeFixtures = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    assert!(fixtures.cases.len() >= 4);
    for case in &fixtures.cases {
        let pre = &case.preprocessing;
        let [h, w] = pre.size;
        let depth_dim = case.depth.map_or(-1, |d| d as i64);
        assert_eq!(
            pre.volume_depth(&[-1, 1, depth_dim, h as i64, w as i64]),
            Ok(case.depth),
            "{}",
            case.name
        );
        let image = |k: usize| Image {
            rows: case.rows,
            cols: case.cols,
            samples: 1,
            data: &case.slices[k],
            slope: case.slopes[k],
            intercept: case.intercepts[k],
            monochrome1: case.monochrome1,
        };
        let mut values = VolumeValues::new();
        for k in 0..case.slices.len() {
            values.add(&image(k)).unwrap();
        }
        let window = pre.volume_window(&values).expect("a window");
        let mut input = pre
            .volume_input(case.slices.len(), case.depth, window)
            .unwrap();
        for k in 0..case.slices.len() {
            input.push(&image(k)).unwrap();
        }
        assert_eq!(
            vec![input.depth(), h, w],
            case.expected_shape,
            "{}",
            case.name
        );
        // One slice too many is refused.
        assert!(matches!(
            input.push(&image(0)),
            Err(PreprocessError::VolumeSlices { .. })
        ));
        let got = input.finish().unwrap();
        assert_eq!(got.len(), case.expected.len(), "{}", case.name);
        let worst = got
            .iter()
            .zip(&case.expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "{}: max abs difference {worst}", case.name);
        let (lo, hi) = got
            .iter()
            .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
        assert!(hi - lo > 1.0, "{}: output range {lo}..{hi}", case.name);
    }
}

#[test]
fn a_volume_input_is_complete_bounded_and_of_integers() {
    let pre: Preprocessing = toml::from_str(
        r#"
kind = "image"
input = "volume"
size = [4, 4]
[window]
method = "percentile"
low = 0.0
high = 100.0
"#,
    )
    .unwrap();
    let data = vec![1.0f32; 16];
    let image = Image::grey(4, 4, &data);
    let mut input = pre.volume_input(2, Some(3), (0.0, 1.0)).unwrap();
    input.push(&image).unwrap();
    // A slice short: no input.
    assert!(matches!(
        input.finish(),
        Err(PreprocessError::VolumeSlices {
            slices: 2,
            index: 1
        })
    ));
    // Over the value limit: refused before anything is allocated.
    assert!(matches!(
        pre.volume_input(10, Some(5 << 20), (0.0, 1.0)),
        Err(PreprocessError::VolumeTooLarge { .. })
    ));
    // The volume window counts integers only (decoded stored values are).
    let fractional = vec![0.5f32; 16];
    let mut values = VolumeValues::new();
    assert!(values.percentiles(0.0, 100.0).is_none());
    assert_eq!(
        values.add(&Image::grey(4, 4, &fractional)),
        Err(PreprocessError::VolumeValues)
    );
    let rgb = vec![1.0f32; 48];
    let colour = Image {
        samples: 3,
        ..Image::grey(4, 4, &rgb)
    };
    assert!(matches!(
        values.add(&colour),
        Err(PreprocessError::Samples { samples: 3 })
    ));
    // The range of the whole volume: two slices, two rescales.
    let a: Vec<f32> = (0..16).map(|v| v as f32).collect();
    values.add(&Image::grey(4, 4, &a)).unwrap();
    let b = Image {
        slope: 2.0,
        intercept: -100.0,
        ..Image::grey(4, 4, &a)
    };
    values.add(&b).unwrap();
    assert_eq!(values.voxels(), 32);
    assert_eq!(values.percentiles(0.0, 100.0), Some((-100.0, 15.0)));
}

#[test]
fn volume_manifests_declare_a_depth_axis() {
    let base = r#"
format_version = 1
name = "m"
task = "image-classification"
[[inputs]]
name = "volume"
datatype = "FP32"
shape = [-1, 1, 16, 8, 8]
[[outputs]]
name = "p"
datatype = "FP32"
shape = [-1, 2]
[preprocessing]
kind = "image"
input = "volume"
size = [8, 8]
[preprocessing.window]
method = "percentile"
low = 1.0
high = 99.0
[dicom]
inference = "volume"
[versions.1.files]
"model.onnx" = "0000000000000000000000000000000000000000000000000000000000000000"
"#;
    let m = Manifest::parse(base).unwrap();
    let dicom = m.dicom.as_ref().unwrap();
    assert!(dicom.is_volume());
    assert_eq!(dicom.slices(), (2, 1024));
    let pre = m.preprocessing.unwrap();
    assert_eq!(pre.volume_depth(&[-1, 1, 16, 8, 8]), Ok(Some(16)));
    assert_eq!(pre.volume_depth(&[-1, 16, 8, 8]), Ok(Some(16)));
    assert_eq!(pre.volume_depth(&[1, 1, -1, 8, 8]), Ok(None));
    // Any depth, and depth as channels, load.
    for ok in [
        base.replace("[-1, 1, 16, 8, 8]", "[-1, 1, -1, 8, 8]"),
        base.replace("[-1, 1, 16, 8, 8]", "[-1, 16, 8, 8]"),
        base.replace(
            "inference = \"volume\"",
            "inference = \"volume\"\nmin_slices = 3\nmax_slices = 64",
        ),
    ] {
        Manifest::parse(&ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    let cases = [
        (
            base.replace("[-1, 1, 16, 8, 8]", "[-1, 8, 8]"),
            "needs [-1, 1, D, 8, 8] or [-1, D, 8, 8]",
        ),
        (
            base.replace("[-1, 1, 16, 8, 8]", "[-1, 3, 16, 8, 8]"),
            "needs [-1, 1, D, 8, 8]",
        ),
        (
            base.replace("[-1, 1, 16, 8, 8]", "[-1, 1, 16, 9, 8]"),
            "needs [-1, 1, D, 8, 8]",
        ),
        (
            base.replace("[-1, 1, 16, 8, 8]", "[2, 1, 16, 8, 8]"),
            "needs [-1, 1, D, 8, 8]",
        ),
        (
            base.replace("inference = \"volume\"", "inference = \"stack\""),
            "unknown variant",
        ),
        (
            base.replace(
                "inference = \"volume\"",
                "inference = \"volume\"\nmax_frames = 1",
            ),
            "max_frames is for inference = \"frame\"",
        ),
        (
            base.replace("inference = \"volume\"", "min_slices = 2")
                .replace("[-1, 1, 16, 8, 8]", "[-1, 1, 8, 8]"),
            "need inference = \"volume\"",
        ),
        (
            base.replace(
                "inference = \"volume\"",
                "inference = \"volume\"\nmin_slices = 9\nmax_slices = 4",
            ),
            "1 <= min_slices <= max_slices <= 4096",
        ),
        (
            base.replace(
                "inference = \"volume\"",
                "inference = \"volume\"\nmax_slices = 5000",
            ),
            "max_slices <= 4096",
        ),
        (
            base.replace("[-1, 1, 16, 8, 8]", "[-1, 1, -1, 4096, 4096]")
                .replace("size = [8, 8]", "size = [4096, 4096]"),
            "at most",
        ),
        (
            base.replace(
                "inference = \"volume\"",
                "inference = \"volume\"\n[dicom.heatmap]\nmethod = \"occlusion\"",
            ),
            "not available with inference = \"volume\"",
        ),
    ];
    assert_each_refused(cases);
}

/// A heatmap whose occlusion windows would leave pixels uncovered (stride over patch) is
/// refused when the bundle is read, not at each series (a red-team finding on `/explain`).
#[test]
fn a_heatmap_stride_over_its_patch_is_refused() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("bundles/lesion-detection/bundle.toml");
    let text = std::fs::read_to_string(path).unwrap();
    assert!(Manifest::parse(&text).is_ok());
    assert!(text.contains("patch = 16\nstride = 8\n"));
    assert_each_refused([(
        text.replace("patch = 16\nstride = 8\n", "patch = 16\nstride = 32\n"),
        "stride 32 must not exceed patch 16",
    )]);
}
