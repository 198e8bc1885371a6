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

/// A red-team finding: a name that is not UTF-8 was read lossily (`x\xff` as `x\u{FFFD}`),
/// so an unlisted file passed beside a listed file of the lossy name.
#[test]
fn a_file_whose_name_is_not_utf8_is_unlisted_whatever_the_manifest_lists() {
    use std::os::unix::ffi::OsStrExt as _;
    let (_dir, bundle) = repo_with_copy();
    let listed = "x\u{FFFD}";
    std::fs::write(bundle.join("1").join(listed), b"listed").unwrap();
    let sha = nightingale_models::sha256_file(&bundle.join("1").join(listed)).unwrap();
    let manifest = std::fs::read_to_string(bundle.join("bundle.toml")).unwrap();
    let manifest = manifest.replace(
        "[versions.1.files]\n",
        &format!("[versions.1.files]\n\"{listed}\" = \"{sha}\"\n"),
    );
    std::fs::write(bundle.join("bundle.toml"), manifest).unwrap();
    Bundle::open(&bundle).unwrap().verify(1).unwrap();
    let stray = bundle.join("1").join(std::ffi::OsStr::from_bytes(b"x\xff"));
    std::fs::write(&stray, b"not listed").unwrap();
    let err = Bundle::open(&bundle).unwrap().verify(1).unwrap_err();
    assert!(matches!(err, BundleError::UnlistedFile { .. }), "{err}");
    // In a folder below the version's too.
    std::fs::remove_file(&stray).unwrap();
    let folder = bundle.join("1").join(std::ffi::OsStr::from_bytes(b"d\xff"));
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("a"), b"not listed").unwrap();
    let err = Bundle::open(&bundle).unwrap().verify(1).unwrap_err();
    assert!(matches!(err, BundleError::UnlistedFile { .. }), "{err}");
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
    // Named like a number without being a version: refused, not skipped.
    std::fs::remove_dir_all(bundle.join("2")).unwrap();
    for name in ["01", "1 ", " 2"] {
        std::fs::create_dir(bundle.join(name)).unwrap();
        let err = Bundle::open(&bundle)
            .unwrap()
            .versions_on_disk()
            .unwrap_err();
        assert!(
            matches!(&err, BundleError::UnlistedVersion { version, .. } if version == name),
            "{name:?}: {err}"
        );
        std::fs::remove_dir(bundle.join(name)).unwrap();
    }
    assert_eq!(
        Bundle::open(&bundle).unwrap().versions_on_disk().unwrap(),
        vec![1]
    );
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

/// A secret-looking line written outside the repository, for links to point at.
const SECRET: &str = "root:x:0:0:secret-7f3a91:/root:/bin/bash";

fn outside_file(dir: &tempfile::TempDir) -> PathBuf {
    let path = dir.path().join("outside-passwd");
    std::fs::write(&path, format!("{SECRET}\n")).unwrap();
    path
}

/// The reason the index gives for the model's refused load.
fn refused_reason(repo: &Repository, version: Option<u64>) -> String {
    let index = repo.index();
    let row = index
        .iter()
        .find(|e| e.name == MODEL && e.state != ModelState::Ready)
        .unwrap_or_else(|| panic!("no refused row: {index:?}"));
    assert_eq!(row.version, version, "{index:?}");
    match &row.state {
        ModelState::Unavailable { reason } => reason.clone(),
        other => panic!("{other:?}"),
    }
}

#[cfg(unix)]
#[test]
fn a_symlinked_manifest_is_refused_unread() {
    let (dir, bundle) = repo_with_copy();
    let outside = tempfile::tempdir().unwrap();
    let target = outside_file(&outside);
    std::fs::remove_file(bundle.join("bundle.toml")).unwrap();
    std::os::unix::fs::symlink(&target, bundle.join("bundle.toml")).unwrap();

    let err = Bundle::open(&bundle).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("not a regular file"), "{message}");
    assert!(!message.contains("secret-7f3a91"), "{message}");

    // Through the repository: the load error and the index both name the problem, relative
    // to the repository, and neither quotes the file linked to.
    let repo = Repository::new(dir.path(), RepositoryOptions::default());
    let err = repo.load(MODEL).unwrap_err().to_string();
    let reason = refused_reason(&repo, None);
    for text in [&err, &reason] {
        assert!(
            text.contains(&format!("{MODEL}/bundle.toml is not a regular file")),
            "{text}"
        );
        assert!(!text.contains("secret-7f3a91"), "{text}");
        assert!(!text.contains(&*dir.path().to_string_lossy()), "{text}");
    }
}

#[test]
fn a_malformed_manifest_error_gives_its_place_not_its_text() {
    let (_dir, bundle) = repo_with_copy();
    let manifest = std::fs::read_to_string(bundle.join("bundle.toml")).unwrap();
    std::fs::write(bundle.join("bundle.toml"), format!("{SECRET}\n{manifest}")).unwrap();
    let err = Bundle::open(&bundle).unwrap_err();
    assert!(matches!(err, BundleError::Manifest { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("line 1, column"), "{message}");
    assert!(!message.contains("secret-7f3a91"), "{message}");
    assert!(!message.contains("root:x"), "{message}");

    // A type error deep in the file: its line, and the message, still without the line.
    let wrong = manifest.replacen("format_version = 1", "format_version = \"one\"", 1);
    assert_ne!(wrong, manifest);
    std::fs::write(bundle.join("bundle.toml"), &wrong).unwrap();
    let message = Bundle::open(&bundle).unwrap_err().to_string();
    let line = wrong
        .lines()
        .position(|l| l.starts_with("format_version"))
        .unwrap()
        + 1;
    assert!(
        message.contains(&format!("line {line}, column")),
        "{message}"
    );
    assert!(!message.contains("format_version = "), "{message}");
}

/// The bundle with versions 1 and 2 (the same files), policy `all`.
fn repo_with_two_versions() -> (tempfile::TempDir, PathBuf) {
    let (dir, bundle) = repo_with_copy();
    copy_dir(&bundle.join("1"), &bundle.join("2"));
    let manifest = std::fs::read_to_string(bundle.join("bundle.toml")).unwrap();
    let v1 = manifest.split("[versions.1]").nth(1).unwrap();
    let with_v2 = format!(
        "{manifest}\n[versions.2]{}",
        v1.replace("[versions.1.files]", "[versions.2.files]")
    )
    .replace("policy = \"latest\"\nlatest = 1", "policy = \"all\"");
    std::fs::write(bundle.join("bundle.toml"), with_v2).unwrap();
    (dir, bundle)
}

/// Red-team finding: a bundle folder that was a link to a folder outside the repository
/// served, where its manifest, version folders and files may not be links (docs/
/// bundle-format.md). It is refused, with the reason in the index.
#[cfg(unix)]
#[test]
fn a_symlinked_bundle_folder_is_refused() {
    let (outside, bundle) = repo_with_copy();
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&bundle, dir.path().join(MODEL)).unwrap();
    let repo = Repository::new(dir.path(), RepositoryOptions::default());
    assert_eq!(
        repo.scan().unwrap(),
        vec![MODEL.to_owned()],
        "listed, to say why"
    );
    let err = repo.load(MODEL).unwrap_err().to_string();
    assert!(
        err.contains(&format!("{MODEL} is a symbolic link")),
        "{err}"
    );
    assert!(!err.contains(&*dir.path().to_string_lossy()), "{err}");
    assert!(repo.get(MODEL, None).is_err());
    let reason = refused_reason(&repo, None);
    assert!(reason.contains("symbolic link"), "{reason}");
    // The same folder in the repository itself serves.
    let real = Repository::new(outside.path(), RepositoryOptions::default());
    assert_eq!(real.load(MODEL).unwrap(), vec![1]);
}

#[cfg(unix)]
#[test]
fn a_symlinked_version_folder_is_refused_not_skipped() {
    let (dir, bundle) = repo_with_two_versions();
    let repo = Repository::new(dir.path(), RepositoryOptions::default());
    assert_eq!(repo.load(MODEL).unwrap(), vec![1, 2], "real folders serve");

    // Version 2's folder becomes a link to the same files kept elsewhere.
    let outside = tempfile::tempdir().unwrap();
    let moved = outside.path().join("v2");
    copy_dir(&bundle.join("2"), &moved);
    std::fs::remove_dir_all(bundle.join("2")).unwrap();
    std::os::unix::fs::symlink(&moved, bundle.join("2")).unwrap();

    let err = Bundle::open(&bundle)
        .unwrap()
        .versions_on_disk()
        .unwrap_err();
    assert!(err.to_string().contains("not a folder of its own"), "{err}");

    // The reload is refused: what served keeps serving, and the index says why, on a row
    // for version 2.
    let err = repo.load(MODEL).unwrap_err().to_string();
    assert!(
        err.contains(&format!("{MODEL}/2: version 2 is not a folder of its own")),
        "{err}"
    );
    assert!(!err.contains(&*dir.path().to_string_lossy()), "{err}");
    assert_eq!(repo.get(MODEL, None).unwrap().version, 2);
    let reason = refused_reason(&repo, Some(2));
    assert!(reason.contains("not a folder of its own"), "{reason}");

    // A rollback to it is refused the same way.
    let err = repo
        .load_target(MODEL, nightingale_models::LoadTarget::Version(2))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a folder of its own"), "{err}");

    // Loaded fresh, the model is unavailable with the reason (not served as version 1 alone).
    let fresh = Repository::new(dir.path(), RepositoryOptions::default());
    assert!(fresh.load(MODEL).is_err());
    assert!(matches!(
        fresh.get(MODEL, None),
        Err(RepositoryError::NotReady { .. })
    ));
    let reason = refused_reason(&fresh, Some(2));
    assert!(reason.contains("not a folder of its own"), "{reason}");

    // A plain file named like a version is refused too.
    std::fs::remove_file(bundle.join("2")).unwrap();
    std::fs::write(bundle.join("2"), b"not a folder").unwrap();
    let err = fresh.load(MODEL).unwrap_err().to_string();
    assert!(err.contains("not a folder of its own"), "{err}");
}

/// Red-team finding: a load's or an unload's commit (the server writes its audit record
/// there, which may wait on a slow audit store) ran under the lock every request reads, so
/// while it waited no request could find its model (on a 2-core server, liveness and every
/// infer stalled). Now requests read what serves meanwhile: here the unload's commit waits
/// until a request has found the model; before, that request waited for the commit, which
/// then gave up (bounded) and the unload was refused.
#[test]
fn requests_find_their_model_while_a_commit_waits() {
    let (dir, _) = repo_with_copy();
    let repo = std::sync::Arc::new(Repository::new(dir.path(), RepositoryOptions::default()));
    repo.load(MODEL).unwrap();
    let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
    let (found_tx, found_rx) = std::sync::mpsc::channel::<()>();
    let found_rx = std::sync::Mutex::new(found_rx);
    let unloading = {
        let repo = repo.clone();
        std::thread::spawn(move || {
            repo.unload_committed(MODEL, true, &|_| {
                entered_tx.send(()).unwrap();
                found_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(std::time::Duration::from_secs(20))
                    .map_err(|_| "no request found its model while the commit waited".to_owned())
            })
        })
    };
    entered_rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .unwrap();
    // The commit is waiting: the model still serves, and is found.
    assert!(repo.get(MODEL, None).is_ok());
    found_tx.send(()).unwrap();
    unloading.join().unwrap().unwrap();
    assert!(repo.get(MODEL, None).is_err(), "unloaded after its commit");
    // The same for a load's commit.
    let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
    let (found_tx, found_rx) = std::sync::mpsc::channel::<()>();
    let found_rx = std::sync::Mutex::new(found_rx);
    let entered_tx = std::sync::Mutex::new(entered_tx);
    let loading = {
        let repo = repo.clone();
        std::thread::spawn(move || {
            repo.load_target_committed(MODEL, nightingale_models::LoadTarget::Policy, &|_, _| {
                entered_tx.lock().unwrap().send(()).unwrap();
                found_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(std::time::Duration::from_secs(20))
                    .map_err(|_| "no request was answered while the commit waited".to_owned())
            })
        })
    };
    entered_rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .unwrap();
    // Not serving yet (it was unloaded), and the answer comes at once.
    assert!(repo.get(MODEL, None).is_err());
    found_tx.send(()).unwrap();
    loading.join().unwrap().unwrap();
    assert!(repo.get(MODEL, None).is_ok());
}

/// An unload without a hold (the poller's, for a bundle gone from disk) keeps a rollback's
/// pin and an operator's hold (a red-team finding: a bundle folder moved away and back undid
/// both), and tells its commit which versions stop serving; one that finds nothing serving
/// commits nothing.
#[test]
fn an_unload_without_a_hold_keeps_a_pin_and_a_hold() {
    use nightingale_models::LoadTarget;
    let (dir, _) = repo_with_copy();
    let repo = Repository::new(dir.path(), RepositoryOptions::default());
    let served = repo.load_target(MODEL, LoadTarget::Version(1)).unwrap();
    assert_eq!(served.len(), 1);
    assert_eq!(repo.pinned(MODEL), Some(1));
    let stopped = std::sync::Mutex::new(Vec::new());
    repo.unload_committed(MODEL, false, &|stopping| {
        stopped
            .lock()
            .unwrap()
            .extend(stopping.iter().map(|m| m.version));
        Ok(())
    })
    .unwrap();
    assert_eq!(*stopped.lock().unwrap(), [1]);
    assert!(repo.get(MODEL, None).is_err());
    assert_eq!(repo.pinned(MODEL), Some(1), "the pin was lost");
    // The bundle back: a poller-style load honours the pin, serving the pinned version
    // alone; once it serves, the poller leaves it alone.
    let served = repo
        .load_target(MODEL, LoadTarget::PolicyUnlessPinned)
        .unwrap();
    assert_eq!(served.iter().map(|m| m.version).collect::<Vec<_>>(), [1]);
    assert_eq!(repo.pinned(MODEL), Some(1));
    let err = repo
        .load_target(MODEL, LoadTarget::PolicyUnlessPinned)
        .unwrap_err();
    assert!(err.to_string().contains("pinned"), "{err}");

    // An operator's unload holds; a later unload without a hold keeps the hold and, with
    // nothing serving, commits nothing.
    repo.load_target(MODEL, LoadTarget::Policy).unwrap();
    repo.unload(MODEL).unwrap();
    assert!(repo.held(MODEL));
    repo.unload_committed(MODEL, false, &|_| Err("no commit expected".into()))
        .unwrap();
    assert!(repo.held(MODEL), "the hold was lost");
}

/// Red-team finding: a bundle's engine threads are its served versions times its
/// `instances`, and a repository had no cap across its models (40 versions of 64 instances
/// ran 2,568 threads). A load that would pass `max_engine_threads` is refused with the reason
/// in the index, what served before serves on, and a model's own versions being replaced do
/// not count against it.
#[test]
fn a_load_over_the_repository_engine_thread_cap_is_refused() {
    let (dir, _) = repo_with_two_versions();
    let other = "pima-diabetes";
    copy_dir(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("bundles")
            .join(other),
        &dir.path().join(other),
    );
    let repo = Repository::new(
        dir.path(),
        RepositoryOptions {
            max_engine_threads: 2,
            ..RepositoryOptions::default()
        },
    );
    // two versions of one instance: at the cap; loaded again, its own two do not count
    assert_eq!(repo.load(MODEL).unwrap(), vec![1, 2]);
    assert_eq!(repo.load(MODEL).unwrap(), vec![1, 2]);
    let err = repo.load(other).unwrap_err().to_string();
    assert!(
        err.contains("would run 1 engine threads")
            && err.contains("other models run 2")
            && err.contains("limit of 2 (max_engine_threads)"),
        "{err}"
    );
    assert!(!err.contains(&*dir.path().to_string_lossy()), "{err}");
    assert!(repo.get(other, None).is_err());
    assert!(repo.get(MODEL, Some("2")).is_ok(), "what served serves on");
    let row = repo
        .index()
        .into_iter()
        .find(|e| e.name == other)
        .expect("a row for the refused model");
    match row.state {
        ModelState::Unavailable { reason } => assert!(reason.contains("max_engine_threads")),
        s => panic!("{s:?}"),
    }
    // once the first model is unloaded, the second fits
    repo.unload(MODEL).unwrap();
    assert_eq!(repo.load(other).unwrap(), vec![1]);
}

/// A validation run's copies run one instance of each version (`instance_limit`), and are
/// counted so: researchers' runs of 64-instance models doubled the server's engine threads
/// past its cap (a re-attack's finding).
#[test]
fn an_instance_limit_caps_what_each_version_runs() {
    let (dir, bundle) = repo_with_copy();
    let manifest = std::fs::read_to_string(bundle.join("bundle.toml")).unwrap();
    assert!(manifest.contains("instances = 1"));
    std::fs::write(
        bundle.join("bundle.toml"),
        manifest.replace("instances = 1", "instances = 64"),
    )
    .unwrap();
    let options = |instance_limit| RepositoryOptions {
        max_engine_threads: 2,
        instance_limit,
        ..RepositoryOptions::default()
    };
    let err = Repository::new(dir.path(), options(0))
        .load(MODEL)
        .unwrap_err()
        .to_string();
    assert!(err.contains("would run 64 engine threads"), "{err}");
    let limited = Repository::new(dir.path(), options(1));
    assert_eq!(limited.load(MODEL).unwrap(), vec![1]);
    let opened = Bundle::open(&bundle).unwrap();
    assert_eq!(opened.instances(&options(1)), 1);
    assert_eq!(opened.instances(&options(0)), 64);
}

/// A version folder's files may lie up to 16 folders deep, each of them watched by the
/// poller's fingerprint; deeper is refused with a reason. A file at depth 9 was read by loads
/// and not watched, so a fix in place was never loaded (a review's finding); a folder nested
/// 2,025 deep was walked whole.
#[test]
fn files_deeper_than_the_limit_are_refused_and_every_file_read_is_watched() {
    let (dir, bundle) = repo_with_copy();
    let repo = Repository::new(dir.path(), RepositoryOptions::default());
    let mut folder = bundle.join("1");
    let mut relative = Vec::new();
    for level in 0..16 {
        let name = format!("d{level}");
        folder.push(&name);
        relative.push(name);
    }
    std::fs::create_dir_all(&folder).unwrap();
    let deep = folder.join("x.txt");
    std::fs::write(&deep, b"first").unwrap();
    let listed = format!("{}/x.txt", relative.join("/"));
    let sha = nightingale_models::sha256_file(&deep).unwrap();
    let manifest = std::fs::read_to_string(bundle.join("bundle.toml")).unwrap();
    std::fs::write(
        bundle.join("bundle.toml"),
        manifest.replace(
            "[versions.1.files]\n",
            &format!("[versions.1.files]\n\"{listed}\" = \"{sha}\"\n"),
        ),
    )
    .unwrap();
    Bundle::open(&bundle).unwrap().verify(1).unwrap();
    // A change there changes the bundle's fingerprint (the poller reloads on it).
    let before = repo.fingerprints()[MODEL];
    std::fs::write(&deep, b"other").unwrap();
    assert_ne!(repo.fingerprints()[MODEL], before);
    std::fs::write(&deep, b"first").unwrap();
    // One folder deeper: refused, naming where.
    let deeper = folder.join("d16");
    std::fs::create_dir(&deeper).unwrap();
    std::fs::write(deeper.join("y.txt"), b"y").unwrap();
    let err = Bundle::open(&bundle).unwrap().verify(1).unwrap_err();
    assert!(matches!(err, BundleError::TooDeep { .. }), "{err}");
    assert!(err.to_string().contains("d16"), "{err}");
    let before = repo.fingerprints()[MODEL];
    std::fs::write(deeper.join("y.txt"), b"z").unwrap();
    assert_ne!(repo.fingerprints()[MODEL], before);
}
