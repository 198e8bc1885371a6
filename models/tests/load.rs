//! Loading under faults: an engine that panics on a model, a self-test the engine does not
//! reproduce, and errors that must not show where the server keeps its files. Real bundles
//! (wdbc-malignancy, and the `gather-out-of-range` fixture written by
//! `models/train/make_panic_fixture.py`) copied into temporary repositories.

use std::path::{Path, PathBuf};

use nightingale_models::{
    Bundle, BundleError, ModelState, Repository, RepositoryError, RepositoryOptions, SelfTestError,
    sha256_file,
};

// The one folder-copy helper of the workspace's integration tests.
#[path = "../../tests/support/mod.rs"]
mod support;
use support::copy_dir;

const GOOD: &str = "wdbc-malignancy";
const PANICS: &str = "gather-out-of-range";

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A repository holding the good bundle and the one whose engine panics at warm-up.
fn repository_with_panicking_bundle() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(
        &manifest_dir().join("bundles").join(GOOD),
        &dir.path().join(GOOD),
    );
    copy_dir(
        &manifest_dir().join("tests/fixtures/bundles").join(PANICS),
        &dir.path().join(PANICS),
    );
    dir
}

#[test]
fn a_bundle_whose_engine_panics_in_warm_up_is_unavailable_and_the_others_serve() {
    let dir = repository_with_panicking_bundle();
    let repository = Repository::new(dir.path(), RepositoryOptions::default());
    let outcomes = repository.load_all().unwrap();
    assert_eq!(outcomes.len(), 2);
    let (name, result) = &outcomes[0];
    assert_eq!(name, PANICS);
    let err = result.as_ref().unwrap_err();
    assert!(
        matches!(
            err,
            RepositoryError::Bundle(BundleError::Panicked {
                engine: "tract",
                stage: "warming up",
                ..
            })
        ),
        "{err:?}"
    );
    assert_eq!(outcomes[1].0, GOOD);
    assert_eq!(outcomes[1].1.as_ref().unwrap(), &vec![1, 2]);

    let index = repository.index();
    let bad = index.iter().find(|e| e.name == PANICS).unwrap();
    let ModelState::Unavailable { reason } = &bad.state else {
        panic!("{bad:?}");
    };
    assert!(
        reason.starts_with("gather-out-of-range/1/model.onnx: the tract engine panicked while warming up: index out of bounds"),
        "{reason}"
    );
    assert!(!reason.contains(dir.path().to_str().unwrap()), "{reason}");
    let good: Vec<_> = index.iter().filter(|e| e.name == GOOD).collect();
    assert_eq!(good.len(), 2);
    assert!(
        good.iter()
            .all(|e| e.state == ModelState::Ready && e.backend == Some("tract"))
    );

    // The good bundle serves (and passed its self-test); the panicking one says why it does not.
    let model = repository.get(GOOD, None).unwrap();
    assert_eq!(model.version, 2);
    assert_eq!(model.selftest.as_ref().unwrap().rows, 20);
    match repository.get(PANICS, None).unwrap_err() {
        RepositoryError::NotReady { reason, .. } => {
            assert!(reason.contains("panicked"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

/// The version 1 copy of the good bundle, alone in a repository.
fn repository_with_v1() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join(GOOD);
    copy_dir(&manifest_dir().join("bundles").join(GOOD), &bundle);
    std::fs::remove_dir_all(bundle.join("2")).unwrap();
    let manifest = std::fs::read_to_string(bundle.join("bundle.toml")).unwrap();
    std::fs::write(
        bundle.join("bundle.toml"),
        manifest.split("[versions.2]").next().unwrap(),
    )
    .unwrap();
    (dir, bundle)
}

/// Rewrites `file`'s checksum in the bundle's manifest to its current digest.
fn fix_checksum(bundle: &Path, file: &str) {
    let manifest_path = bundle.join("bundle.toml");
    let manifest = std::fs::read_to_string(&manifest_path).unwrap();
    let digest = sha256_file(&bundle.join("1").join(file)).unwrap();
    let key = format!("\"{file}\" = \"");
    let start = manifest.find(&key).unwrap() + key.len();
    let mut fixed = manifest.clone();
    fixed.replace_range(start..start + 64, &digest);
    std::fs::write(&manifest_path, fixed).unwrap();
}

#[test]
fn the_shipped_self_tests_pass_on_tract() {
    for (bundle, versions) in [
        ("wdbc-malignancy", vec![1, 2]),
        ("icu-mortality", vec![1]),
        ("pima-diabetes", vec![1]),
        ("image-orientation", vec![1]),
        ("lesion-detection", vec![1]),
    ] {
        let b = Bundle::open(&manifest_dir().join("bundles").join(bundle)).unwrap();
        for v in versions {
            let loaded = b.load_version(v, &RepositoryOptions::default()).unwrap();
            let report = loaded
                .selftest
                .as_ref()
                .unwrap_or_else(|| panic!("{bundle} {v}: no self-test"));
            assert_eq!(report.engine, "tract");
            let rows = match bundle {
                "image-orientation" => 2,
                "lesion-detection" => 4,
                _ => 20,
            };
            assert_eq!(report.rows, rows, "{bundle} {v}");
            assert!(report.producer.starts_with("onnxruntime "), "{report:?}");
        }
    }
}

#[test]
fn a_self_test_mismatch_refuses_the_version_naming_output_element_and_difference() {
    let (dir, bundle) = repository_with_v1();
    // Change one reference value: probabilities[3, 0] (the 7th number of the output's data).
    let path = bundle.join("1/selftest.json");
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let outputs = doc["outputs"].as_array_mut().unwrap();
    let probs = outputs
        .iter_mut()
        .find(|o| o["name"] == "probabilities")
        .unwrap();
    let original = probs["data"][6].as_f64().unwrap();
    let edited = if original > 0.5 {
        original - 0.25
    } else {
        original + 0.25
    };
    probs["data"][6] = serde_json::json!(edited);
    std::fs::write(&path, serde_json::to_vec(&doc).unwrap()).unwrap();
    fix_checksum(&bundle, "selftest.json");

    let repository = Repository::new(dir.path(), RepositoryOptions::default());
    let err = repository.load(GOOD).unwrap_err();
    let RepositoryError::Bundle(BundleError::SelfTest {
        path,
        engine,
        source,
    }) = &err
    else {
        panic!("{err:?}");
    };
    assert_eq!(path, Path::new("wdbc-malignancy/1/selftest.json"));
    // The bundle allows any engine: where the build has ONNX Runtime, a tract failure falls
    // back to it, and ONNX Runtime (which wrote the reference) refuses the edited value too.
    let want_engine = if cfg!(feature = "ort") {
        "ort"
    } else {
        "tract"
    };
    assert_eq!(*engine, want_engine);
    let SelfTestError::Mismatch {
        output,
        index,
        expected,
        actual,
        diff,
        failing,
        total,
        ..
    } = source.as_ref()
    else {
        panic!("{source:?}");
    };
    assert_eq!(output, "probabilities");
    assert_eq!(index, &vec![3, 0]);
    assert_eq!(*expected, edited);
    // tract reproduces the original onnxruntime value within the tolerance, so it is off the
    // edited one by about 0.25.
    assert!(
        (actual - original).abs() <= 1e-5 + 1e-4 * original.abs(),
        "{err}"
    );
    assert!((diff - 0.25).abs() < 1e-4, "{diff}");
    assert_eq!((*failing, *total), (1, 40));
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("wdbc-malignancy/1/selftest.json: refused, self-test failed on {want_engine}: output \"probabilities\" element [3, 0]")),
        "{message}"
    );
    let ModelState::Unavailable { reason } = &repository
        .index()
        .into_iter()
        .find(|e| e.name == GOOD)
        .unwrap()
        .state
    else {
        panic!()
    };
    assert_eq!(reason, &message);
}

#[test]
fn errors_answered_name_files_relative_to_the_repository() {
    let (dir, bundle) = repository_with_v1();
    let model = bundle.join("1/model.onnx");
    let mut bytes = std::fs::read(&model).unwrap();
    bytes[10] ^= 0x01;
    std::fs::write(&model, bytes).unwrap();
    let repository = Repository::new(dir.path(), RepositoryOptions::default());
    let message = repository.load(GOOD).unwrap_err().to_string();
    assert!(
        message.starts_with("checksum mismatch for wdbc-malignancy/1/model.onnx: "),
        "{message}"
    );
    assert!(!message.contains(dir.path().to_str().unwrap()), "{message}");
}

/// The error of loading a bundle whose version 1 is the fixture model `fixture` (written by
/// models/train/make_load_fixtures.py), and its text.
fn load_error(fixture: &str) -> (BundleError, String) {
    let (_dir, bundle) = repository_with_v1();
    let src = manifest_dir().join("tests/fixtures").join(fixture);
    std::fs::copy(&src, bundle.join("1/model.onnx")).unwrap();
    fix_checksum(&bundle, "model.onnx");
    let err = Bundle::open(&bundle)
        .unwrap()
        .load_version(1, &RepositoryOptions::default())
        .unwrap_err();
    let message = err.to_string();
    (err, message)
}

#[test]
fn a_model_with_external_data_is_refused() {
    // A model whose initializer points at an external file.
    let (err, message) = load_error("external-data.onnx");
    assert!(
        matches!(err, BundleError::Inference { .. })
            && message.contains("external data file")
            && message.contains("\"weights\""),
        "{message}"
    );
}

/// Red-team finding: an external tensor where tract's protobuf reader does not look (a
/// `Constant` in a model-local function, a `Constant`'s `sparse_value`) passed the check, and
/// ONNX Runtime read the file it names (the audit digest key, under the working directory).
/// Refused like an initializer's, whichever engine the bundle names.
#[test]
fn external_data_hidden_in_a_function_or_a_sparse_constant_is_refused() {
    for fixture in [
        "external-data-in-function.onnx",
        "external-data-in-sparse.onnx",
    ] {
        let (err, message) = load_error(fixture);
        assert!(
            matches!(err, BundleError::Inference { .. })
                && message.contains("external data file")
                && message.contains("\"k\""),
            "{fixture}: {message}"
        );
    }
}

/// Red-team finding: a symbolic dimension of a few KB of nested parentheses overflowed the
/// stack in tract's recursive expression parser, which aborts the whole process (at every
/// start while the bundle was in the repository). Refused by its length before tract reads it.
#[test]
fn a_model_with_a_very_long_symbolic_dimension_is_refused() {
    let (err, message) = load_error("long-dim-param.onnx");
    assert!(
        matches!(err, BundleError::Inference { .. })
            && message.contains("symbolic dimension's name is 8001 bytes long"),
        "{message}"
    );
}

/// A model is loaded in the probe process first: one that a signal stopped there is refused
/// (with the signal and the probe's last words), one whose probe merely failed is loaded
/// here, which says why it fails (or serves it).
#[test]
fn a_probe_stopped_by_a_signal_refuses_the_model() {
    let (_dir, bundle) = repository_with_v1();
    let probe = |script: &str| RepositoryOptions {
        probe: Some(nightingale_models::ProbeCommand {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
        }),
        ..RepositoryOptions::default()
    };
    let err = Bundle::open(&bundle)
        .unwrap()
        .load_version(
            1,
            &probe(
                "cat > /dev/null; echo 'memory allocation of 4 bytes failed' >&2; kill -ABRT $$",
            ),
        )
        .unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, BundleError::Crashed { .. })
            && message.contains("signal 6 (SIGABRT): memory allocation of 4 bytes failed"),
        "{message}"
    );
    // The probe reads nothing and exits with an error: no verdict, the load goes on here.
    Bundle::open(&bundle)
        .unwrap()
        .load_version(1, &probe("echo no >&2; exit 1"))
        .unwrap();
}

#[test]
fn unload_while_loaded_then_reload() {
    let (dir, _) = repository_with_v1();
    let repository = Repository::new(dir.path(), RepositoryOptions::default());
    // Unloading a model on disk that never loaded is fine, and a later load serves it.
    repository.unload(GOOD).unwrap();
    assert_eq!(repository.load(GOOD).unwrap(), vec![1]);
    repository.unload(GOOD).unwrap();
    assert!(matches!(
        repository.get(GOOD, None).unwrap_err(),
        RepositoryError::NotReady { .. }
    ));
    assert_eq!(repository.load(GOOD).unwrap(), vec![1]);
    assert!(matches!(
        repository.unload("nope").unwrap_err(),
        RepositoryError::UnknownModel { .. }
    ));
}

/// A bundle whose one row is 2^31 FP32 values (8 GiB, the `huge-input` fixture) loads and
/// serves without a warm-up on zeros of that size: the repository allocated them at load
/// before, and the process was killed. Peak resident memory of this test process stays far
/// below one such row.
#[test]
fn a_bundle_declaring_a_huge_row_loads_without_allocating_one() {
    const HUGE: &str = "huge-input";
    let dir = tempfile::tempdir().unwrap();
    copy_dir(
        &manifest_dir().join("tests/fixtures/bundles").join(HUGE),
        &dir.path().join(HUGE),
    );
    let repository = Repository::new(dir.path(), RepositoryOptions::default());
    assert_eq!(repository.load(HUGE).unwrap(), vec![1]);
    let model = repository.get(HUGE, None).unwrap();
    assert_eq!(
        model.worker.metadata().inputs[0].shape,
        vec![-1, 1i64 << 31]
    );
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(peak_kib < 2 << 20, "peak RSS {peak_kib} KiB");
}

/// A listed file over the limit (2 GiB) is refused before it is read: it was read whole into
/// memory before its checksum was compared. The file is sparse: no disk is used.
#[test]
fn a_bundle_file_over_the_limit_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let big = std::fs::File::create(dir.path().join("model.onnx")).unwrap();
    big.set_len(nightingale_models::FILE_LIMIT + 1).unwrap();
    let files = std::collections::BTreeMap::from([("model.onnx".to_owned(), "0".repeat(64))]);
    let err = nightingale_models::read_verified(dir.path(), &files).unwrap_err();
    assert!(
        matches!(err, BundleError::FileTooLarge { limit, .. } if limit == 2 << 30),
        "{err}"
    );
}
