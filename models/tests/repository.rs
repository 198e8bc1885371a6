//! Bundles on disk: checksums, version folders and policies, hot reload, on the real
//! wdbc-malignancy bundle copied into a temporary repository.

use std::path::PathBuf;

use nightingale_models::{
    Bundle, BundleError, ModelState, Repository, RepositoryError, RepositoryOptions,
};

// The one folder-copy helper of the workspace's integration tests.
#[path = "../../tests/support/mod.rs"]
mod support;
use support::copy_dir;

const MODEL: &str = "wdbc-malignancy";

fn source() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("bundles")
        .join(MODEL)
}

/// A copy of the bundle holding version 1 only, served under the `latest 1` policy.
fn repo_with_copy() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join(MODEL);
    copy_dir(&source(), &bundle);
    std::fs::remove_dir_all(bundle.join("2")).unwrap();
    let manifest = std::fs::read_to_string(bundle.join("bundle.toml")).unwrap();
    let v1_only = manifest
        .split("[versions.2]")
        .next()
        .unwrap()
        .replace("policy = \"all\"", "policy = \"latest\"\nlatest = 1");
    std::fs::write(bundle.join("bundle.toml"), v1_only).unwrap();
    (dir, bundle)
}

#[test]
fn the_shipped_bundle_verifies_and_loads() {
    let bundle = Bundle::open(&source()).unwrap();
    assert_eq!(bundle.versions_on_disk().unwrap(), vec![1, 2]);
    assert_eq!(
        bundle.selected_versions().unwrap(),
        vec![1, 2],
        "policy all"
    );
    for v in [1, 2] {
        bundle.verify(v).unwrap();
        let loaded = bundle
            .load_version(v, &RepositoryOptions::default())
            .unwrap();
        assert_eq!(loaded.worker.metadata().inputs[0].shape, vec![-1, 30]);
        assert_eq!(loaded.model_sha256.len(), 64);
    }
}

#[test]
fn a_changed_file_is_refused_naming_it() {
    let (_dir, bundle) = repo_with_copy();
    let path = bundle.join("1/metrics.json");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.push(b' ');
    std::fs::write(&path, bytes).unwrap();
    let err = Bundle::open(&bundle).unwrap().verify(1).unwrap_err();
    assert!(matches!(err, BundleError::ChecksumMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("metrics.json") && msg.contains("checksum mismatch"),
        "{msg}"
    );
}

#[test]
fn unlisted_and_missing_files_are_refused() {
    let (_dir, bundle) = repo_with_copy();
    std::fs::write(bundle.join("1/extra.onnx"), b"not listed").unwrap();
    let err = Bundle::open(&bundle).unwrap().verify(1).unwrap_err();
    assert!(
        matches!(err, BundleError::UnlistedFile { .. }) && err.to_string().contains("extra.onnx"),
        "{err}"
    );
    std::fs::remove_file(bundle.join("1/extra.onnx")).unwrap();
    std::fs::remove_file(bundle.join("1/metrics.json")).unwrap();
    let err = Bundle::open(&bundle).unwrap().verify(1).unwrap_err();
    assert!(
        matches!(err, BundleError::MissingFile { .. }) && err.to_string().contains("metrics.json"),
        "{err}"
    );
}

#[test]
fn a_version_folder_missing_from_the_manifest_is_refused() {
    let (_dir, bundle) = repo_with_copy();
    copy_dir(&bundle.join("1"), &bundle.join("2"));
    let err = Bundle::open(&bundle)
        .unwrap()
        .versions_on_disk()
        .unwrap_err();
    assert!(matches!(err, BundleError::UnlistedVersion { .. }), "{err}");
}

#[test]
fn manifest_name_must_match_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("renamed");
    copy_dir(&source(), &bundle);
    let err = Bundle::open(&bundle).unwrap_err();
    assert!(matches!(err, BundleError::NameMismatch { .. }), "{err}");
}

#[test]
fn second_version_with_policies_and_hot_reload() {
    let (dir, bundle) = repo_with_copy();
    // Version 2: the same files, listed in the manifest.
    copy_dir(&bundle.join("1"), &bundle.join("2"));
    let manifest = std::fs::read_to_string(bundle.join("bundle.toml")).unwrap();
    let v1 = manifest.split("[versions.1]").nth(1).unwrap();
    let with_v2 = format!(
        "{manifest}\n[versions.2]{}",
        v1.replace("[versions.1.files]", "[versions.2.files]")
    );
    std::fs::write(bundle.join("bundle.toml"), &with_v2).unwrap();

    let repo = Repository::new(dir.path(), RepositoryOptions::default());
    assert_eq!(repo.load(MODEL).unwrap(), vec![2], "policy latest 1");
    assert_eq!(repo.get(MODEL, None).unwrap().version, 2);
    assert!(matches!(
        repo.get(MODEL, Some("1")),
        Err(RepositoryError::UnknownVersion { .. })
    ));

    std::fs::write(
        bundle.join("bundle.toml"),
        with_v2.replace("policy = \"latest\"\nlatest = 1", "policy = \"all\""),
    )
    .unwrap();
    assert_eq!(
        repo.load(MODEL).unwrap(),
        vec![1, 2],
        "hot reload picks up the new policy"
    );
    let kept = repo.get(MODEL, Some("1")).unwrap();

    // A broken reload keeps the versions already serving.
    std::fs::write(bundle.join("2/metrics.json"), b"{}").unwrap();
    assert!(repo.load(MODEL).is_err());
    assert_eq!(repo.get(MODEL, None).unwrap().version, 2);
    // The index shows both serving versions and the refused load, with its reason.
    let index = repo.index();
    let ready: Vec<Option<u64>> = index
        .iter()
        .filter(|e| e.state == ModelState::Ready)
        .map(|e| e.version)
        .collect();
    assert_eq!(ready, vec![Some(1), Some(2)], "{index:?}");
    let refused: Vec<&nightingale_models::IndexEntry> = index
        .iter()
        .filter(|e| e.state != ModelState::Ready)
        .collect();
    assert_eq!(refused.len(), 1, "{index:?}");
    assert_eq!(refused[0].version, Some(2));
    let ModelState::Unavailable { reason } = &refused[0].state else {
        panic!("{index:?}");
    };
    assert!(reason.contains("2/metrics.json"), "{reason}");

    repo.unload(MODEL).unwrap();
    assert!(matches!(
        repo.get(MODEL, None),
        Err(RepositoryError::NotReady { .. })
    ));
    assert_eq!(repo.index()[0].state, ModelState::Unloaded);
    // A handle taken before the unload still answers.
    assert_eq!(kept.version, 1);
    assert!(matches!(
        repo.load("../etc"),
        Err(RepositoryError::InvalidName { .. })
    ));
    assert!(matches!(
        repo.load("absent"),
        Err(RepositoryError::UnknownModel { .. })
    ));
}
