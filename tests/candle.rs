//! The native candle backend on the lesion-detection reference model (issue 12, item 3), as
//! the server loads it: the `lesion-detection-candle` bundle (platform = "candle") beside the
//! ONNX bundle `lesion-detection` on tract, both through `Bundle::load_version` (checksums,
//! warm-up, the self-test against onnxruntime's outputs) and their model workers.
//!
//! Expected values come from peers, never from the code under test:
//! - candle vs tract on the same weights, within 1e-4, on the bundle's self-test rows and, when
//!   it has been rebuilt (`python models/train/lesion_detection.py --testdata-only`), on the
//!   whole test split (300 images); `tests/peer/test_candle.py` compares with onnxruntime.
//! - Grad-CAM vs `tests/fixtures/gradients/gradcam-numpy.json` (onnxruntime + numpy, the
//!   closed form of the head) and `gradients-torch.json` (torch autograd);
//!   integrated gradients vs torch autograd, and their completeness against the probabilities
//!   onnxruntime computed. Both fixtures are written by `models/train/make_gradient_fixtures.py`.

use std::path::{Path, PathBuf};

use base64::Engine;
use nightingale_inference::explain::{GradientMethod, GradientRequest};
use nightingale_inference::{NamedTensor, Tensor};
use nightingale_models::{Bundle, LoadedModel, RepositoryOptions};
use serde_json::Value;

const SIDE: usize = 128;
const PIXELS: usize = SIDE * SIDE;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn load(name: &str) -> LoadedModel {
    Bundle::open(&repo().join("models/bundles").join(name))
        .unwrap()
        .load_version(1, &RepositoryOptions::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A review's finding: candle bundles were loaded in the server's own process only (a load
/// of hundreds of large layers took minutes and gigabytes there). They now go through the
/// probe process as ONNX models do: the server's own binary loads the candle bundle there
/// first (the architecture file passed with the weights: `__probe-model` exits 0, which this
/// test reads from its own run of it), and a probe that a signal stops refuses the bundle.
#[test]
fn candle_bundles_are_loaded_in_the_probe_process_first() {
    let bundle = repo().join("models/bundles/lesion-detection-candle");
    // The real probe, as the server runs it: the bundle loads.
    let real = RepositoryOptions {
        probe: Some(nightingale_models::ProbeCommand {
            program: env!("CARGO_BIN_EXE_nightingale").into(),
            args: vec!["__probe-model".into()],
        }),
        ..RepositoryOptions::default()
    };
    Bundle::open(&bundle)
        .unwrap()
        .load_version(1, &real)
        .unwrap();
    // A probe that records what it was given and is then stopped by the kernel's OOM
    // killer's signal: refused, with the signal.
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("input");
    let killed = RepositoryOptions {
        probe: Some(nightingale_models::ProbeCommand {
            program: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                format!("cat > '{}'; kill -KILL $$", seen.display()),
            ],
        }),
        ..RepositoryOptions::default()
    };
    let Err(err) = Bundle::open(&bundle).unwrap().load_version(1, &killed) else {
        panic!("a candle bundle whose probe was killed must be refused");
    };
    assert!(
        matches!(err, nightingale_models::BundleError::Crashed { .. })
            && err.to_string().contains("SIGKILL"),
        "{err}"
    );
    // What the probe was given ends with the architecture file, which the real probe run
    // below loads from: it exits 0 (it exits 1 on a bundle it cannot load).
    let input = std::fs::read(&seen).unwrap();
    let architecture = std::fs::read(bundle.join("1/architecture.json")).unwrap();
    assert!(input.ends_with(&architecture));
    let (ok, said) = probe_candle(&input);
    assert!(ok, "{said}");
    // Without the architecture file (the last part marked absent) the probe cannot load it.
    let mut cut = input[..input.len() - architecture.len() - 8].to_vec();
    cut.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(!probe_candle(&cut).0);
}

/// Runs `nightingale __probe-model --backend candle` on `input` (at most two minutes):
/// whether it exited 0, and what it wrote to stderr.
fn probe_candle(input: &[u8]) -> (bool, String) {
    use std::io::{Read, Write};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nightingale"))
        .args(["__probe-model", "--backend", "candle", "--version", "1"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    drop(stdin);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the probe did not end within two minutes");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut said = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut said);
    (status.success(), said)
}

fn f32s(b64: &str) -> Vec<f32> {
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The self-test's reference inputs (4 rows of `[1, 128, 128]`).
fn selftest_rows() -> Vec<f32> {
    let st = json(&repo().join("models/bundles/lesion-detection/1/selftest.json"));
    f32s(st["inputs"][0]["data_base64"].as_str().unwrap())
}

/// A little-endian FP32 C-order `.npy` file's values and shape.
fn read_npy(path: &Path) -> (Vec<f32>, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
    };
    let header = std::str::from_utf8(&bytes[start..start + len]).unwrap();
    assert!(header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"));
    let shape_text = header.split("'shape': (").nth(1).unwrap();
    let shape: Vec<usize> = shape_text[..shape_text.find(')').unwrap()]
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let values: Vec<f32> = bytes[start + len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(values.len(), shape.iter().product::<usize>());
    (values, shape)
}

fn image(rows: &[f32]) -> NamedTensor {
    NamedTensor::new(
        "image",
        Tensor::from_vec(vec![rows.len() / PIXELS, 1, SIDE, SIDE], rows.to_vec()).unwrap(),
    )
}

async fn probabilities(model: &LoadedModel, rows: &[f32]) -> Vec<f32> {
    let out = model.worker.infer(vec![image(rows)]).await.unwrap();
    out[0]
        .tensor
        .view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

#[tokio::test]
async fn candle_equals_tract_on_the_lesion_test_split() {
    let candle = load("lesion-detection-candle");
    let tract = load("lesion-detection");
    assert_eq!(candle.worker.backend(), "candle");
    assert_eq!(tract.worker.backend(), "tract");
    assert!(candle.worker.supports_gradients() && !tract.worker.supports_gradients());
    // The load-time self-test compared candle with onnxruntime's outputs.
    let report = candle
        .selftest
        .as_ref()
        .expect("the bundle declares a self-test");
    assert_eq!((report.engine, report.rows), ("candle", 4));

    let mut images = selftest_rows();
    let testdata = repo().join("models/bundles/lesion-detection/testdata/images.npy");
    if testdata.exists() {
        let (values, shape) = read_npy(&testdata);
        assert_eq!(&shape[1..], &[1, SIDE, SIDE]);
        images.extend(values);
    } else {
        eprintln!(
            "note: {} is absent (rebuild it with models/train/lesion_detection.py --testdata-only); comparing the self-test rows only",
            testdata.display()
        );
    }
    let n = images.len() / PIXELS;
    let mut worst = 0f32;
    for start in (0..n).step_by(32) {
        let end = (start + 32).min(n);
        let rows = &images[start * PIXELS..end * PIXELS];
        let a = probabilities(&candle, rows).await;
        let b = probabilities(&tract, rows).await;
        for (x, y) in a.iter().zip(&b) {
            worst = worst.max((x - y).abs());
        }
    }
    eprintln!("candle vs tract on {n} images: max |diff| {worst:.2e}");
    assert!(worst <= 1e-4, "max |candle - tract| = {worst}");
}

async fn saliency(
    model: &LoadedModel,
    rows: &[f32],
    targets: Vec<usize>,
    method: GradientMethod,
) -> nightingale_inference::explain::GradientSaliency {
    model
        .worker
        .gradients(GradientRequest {
            input: image(rows),
            output: 0,
            targets,
            method,
            max_batch: 32,
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn grad_cam_equals_numpy_and_torch() {
    let candle = load("lesion-detection-candle");
    let x = selftest_rows();
    let fixtures = repo().join("tests/fixtures/gradients");
    let numpy = json(&fixtures.join("gradcam-numpy.json"));
    let torch = json(&fixtures.join("gradients-torch.json"));
    for target in [0usize, 1] {
        let s = saliency(&candle, &x, vec![target; 4], GradientMethod::GradCam).await;
        assert_eq!(
            (s.height, s.width, s.values.len()),
            (SIDE, SIDE, 4 * PIXELS)
        );
        assert_eq!(s.forward_passes, 4);
        for reference in [&numpy, &torch] {
            let maps = reference["cam_8x8"][target.to_string()].as_array().unwrap();
            for (r, map) in maps.iter().enumerate() {
                // Bilinear upsampling (half-pixel centres, clamped edges) keeps the mean.
                let small: Vec<f64> = map
                    .as_array()
                    .unwrap()
                    .iter()
                    .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
                    .collect();
                let want = small.iter().sum::<f64>() / small.len() as f64;
                let got = s.values[r * PIXELS..(r + 1) * PIXELS]
                    .iter()
                    .map(|&v| f64::from(v))
                    .sum::<f64>()
                    / PIXELS as f64;
                assert!(
                    (got - want).abs() < 1e-6 + 1e-4 * want.abs(),
                    "target {target} row {r}: mean {got} vs {want}"
                );
            }
        }
        if target == 1 {
            // The whole upsampled map of row 0, pixel by pixel.
            for reference in [&numpy, &torch] {
                let want = f32s(
                    reference["cam_128_row0_target1_f32_base64"]
                        .as_str()
                        .unwrap(),
                );
                let worst = want
                    .iter()
                    .zip(&s.values[..PIXELS])
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                let peak = want.iter().copied().fold(0f32, f32::max);
                assert!(
                    worst < 1e-6 + 1e-4 * peak,
                    "max |diff| {worst} (peak {peak})"
                );
            }
        }
    }
}

#[tokio::test]
async fn integrated_gradients_equal_torch_and_are_complete() {
    let candle = load("lesion-detection-candle");
    let x = selftest_rows();
    let torch = json(&repo().join("tests/fixtures/gradients/gradients-torch.json"));
    let numpy = json(&repo().join("tests/fixtures/gradients/gradcam-numpy.json"));
    let ig = &torch["ig"];
    let steps = ig["steps"].as_u64().unwrap() as usize;
    let rows = ig["rows"].as_u64().unwrap() as usize;
    let want = f32s(ig["attributions_f32_base64"].as_str().unwrap());
    let s = saliency(
        &candle,
        &x[..rows * PIXELS],
        vec![1; rows],
        GradientMethod::IntegratedGradients {
            baseline: 0.0,
            steps,
        },
    )
    .await;
    assert_eq!(s.forward_passes, rows * (steps + 1));
    let peak = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
    let worst = want
        .iter()
        .zip(&s.values)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("integrated gradients vs torch: max |diff| {worst:.2e} (peak {peak:.2e})");
    assert!(
        worst < 1e-4 * peak.max(1e-3),
        "max |diff| {worst} (peak {peak})"
    );
    // f(baseline) as torch computed it; the completeness gap against onnxruntime's f(x).
    let f0 = ig["f_baseline"].as_f64().unwrap();
    for r in 0..rows {
        assert!((s.baseline_score[r] - f0).abs() < 1e-5);
        let fx = numpy["probabilities"][r][1].as_f64().unwrap();
        let sum: f64 = s.values[r * PIXELS..(r + 1) * PIXELS]
            .iter()
            .map(|&v| f64::from(v))
            .sum();
        assert!(
            (s.completeness_gap[r] - (sum - (fx - f0))).abs() < 1e-4,
            "row {r}: gap {} vs {}",
            s.completeness_gap[r],
            sum - (fx - f0)
        );
    }

    // Completeness: with more steps the sum approaches f(x) − f(baseline) (onnxruntime's).
    let s = saliency(
        &candle,
        &x[..PIXELS],
        vec![1],
        GradientMethod::IntegratedGradients {
            baseline: 0.0,
            steps: 256,
        },
    )
    .await;
    let fx = numpy["probabilities"][0][1].as_f64().unwrap();
    let sum: f64 = s.values.iter().map(|&v| f64::from(v)).sum();
    eprintln!(
        "completeness with 256 steps: sum {sum:.6} vs f(x) - f(0) {:.6}",
        fx - f0
    );
    assert!((sum - (fx - f0)).abs() < 2e-3 * (fx - f0).abs().max(0.01));
}

/// The audit trail names a candle model by its architecture file and weights together (the
/// SHA-256 of the one's bytes followed by the other's): the weights' checksum alone named two
/// networks alike (a review changed the architecture file under the same weights). And the
/// architecture file's output labels must be bundle.toml's: swapped, they were served with
/// bundle.toml's without a word (a review's finding).
#[test]
fn a_candle_model_is_named_by_its_architecture_and_weights_and_its_labels_are_checked() {
    use sha2::Digest;
    let bundle = repo().join("models/bundles/lesion-detection-candle");
    let architecture = std::fs::read(bundle.join("1/architecture.json")).unwrap();
    let weights = std::fs::read(bundle.join("1/model.safetensors")).unwrap();
    let mut both = architecture.clone();
    both.extend_from_slice(&weights);
    let loaded = load("lesion-detection-candle");
    assert_eq!(
        loaded.model_sha256,
        hex::encode(sha2::Sha256::digest(&both))
    );
    assert_ne!(
        loaded.model_sha256,
        hex::encode(sha2::Sha256::digest(&weights))
    );

    // A copy whose architecture file lists the labels the other way round (checksum
    // updated, unsigned): refused, naming both lists.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("lesion-detection-candle");
    std::fs::create_dir_all(copy.join("1")).unwrap();
    for f in ["1/model.safetensors", "1/selftest.json", "MODEL_CARD.md"] {
        std::fs::copy(bundle.join(f), copy.join(f)).unwrap();
    }
    let mut file: Value = serde_json::from_slice(&architecture).unwrap();
    file["output"]["labels"] = serde_json::json!(["present", "absent"]);
    let swapped = serde_json::to_vec_pretty(&file).unwrap();
    std::fs::write(copy.join("1/architecture.json"), &swapped).unwrap();
    let manifest = std::fs::read_to_string(bundle.join("bundle.toml"))
        .unwrap()
        .replace(
            &hex::encode(sha2::Sha256::digest(&architecture)),
            &hex::encode(sha2::Sha256::digest(&swapped)),
        );
    std::fs::write(copy.join("bundle.toml"), manifest).unwrap();
    let Err(err) = Bundle::open(&copy)
        .unwrap()
        .load_version(1, &RepositoryOptions::default())
    else {
        panic!("labels that contradict bundle.toml must be refused");
    };
    let said = format!("{err}: {:?}", std::error::Error::source(&err));
    assert!(
        said.contains("labels") && said.contains("\"present\", \"absent\""),
        "{said}"
    );
}
