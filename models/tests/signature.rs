//! Bundle signatures: what verifies, what is refused and why. The keys under
//! tests/fixtures/keys and keys/demo were made by the real `minisign` tool (0.11, Debian), so
//! their ids (in each `.pub` file's comment) and formats come from a peer, not from this code.
//! Interop with the `minisign` binary both ways is tested in tests/peer/test_signatures.py.

use std::path::{Path, PathBuf};

use nightingale_models::signature::{KeyError, SIGNATURE_FILE};
use nightingale_models::{
    Bundle, BundleError, ModelState, Repository, RepositoryOptions, SignaturePolicy,
    SignatureStatus, SigningKey, TrustedKey, sha256_file,
};

// The one folder-copy helper of the workspace's integration tests.
#[path = "../../tests/support/mod.rs"]
mod support;
use support::copy_dir;

const BUNDLE: &str = "pima-diabetes";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn demo_pub() -> PathBuf {
    repo_root().join("keys/demo/nightingale-demo.pub")
}

fn demo_key() -> PathBuf {
    repo_root().join("keys/demo/nightingale-demo.key")
}

fn fixture_key(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keys")
        .join(name)
}

/// The key id minisign wrote in a public key file's comment.
fn id_from_comment(pub_file: &Path) -> String {
    let text = std::fs::read_to_string(pub_file).unwrap();
    let first = text.lines().next().unwrap();
    first
        .strip_prefix("untrusted comment: minisign public key ")
        .unwrap_or_else(|| panic!("{first:?}"))
        .trim()
        .to_owned()
}

/// A repository holding a copy of the signed reference bundle.
fn repository() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join(BUNDLE);
    copy_dir(&repo_root().join("models/bundles").join(BUNDLE), &bundle);
    (dir, bundle)
}

fn trusting(paths: &[PathBuf], require: bool) -> SignaturePolicy {
    SignaturePolicy::load(paths, require).unwrap()
}

#[test]
fn every_reference_bundle_is_signed_by_the_demo_key_and_verifies() {
    let policy = trusting(&[demo_pub()], true);
    let want = id_from_comment(&demo_pub());
    for repo in ["models/bundles", "models/bench"] {
        let root = repo_root().join(repo);
        for name in Repository::new(&root, RepositoryOptions::default())
            .scan()
            .unwrap()
        {
            let bundle = Bundle::open_with(&root.join(&name), &policy)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                bundle.signature,
                SignatureStatus::Verified {
                    key_id: want.clone(),
                    trusted_comment: format!("nightingale bundle {name}"),
                },
                "{name}"
            );
        }
    }
}

#[test]
fn signing_is_deterministic_and_reproduces_the_committed_signature() {
    let (_dir, bundle) = repository();
    let committed = std::fs::read(bundle.join(SIGNATURE_FILE)).unwrap();
    std::fs::remove_file(bundle.join(SIGNATURE_FILE)).unwrap();
    let key = SigningKey::from_file(&demo_key(), None).unwrap();
    assert_eq!(key.id(), id_from_comment(&demo_pub()));
    Bundle::open(&bundle).unwrap().sign(&key).unwrap();
    let first = std::fs::read(bundle.join(SIGNATURE_FILE)).unwrap();
    Bundle::open(&bundle).unwrap().sign(&key).unwrap();
    let second = std::fs::read(bundle.join(SIGNATURE_FILE)).unwrap();
    assert_eq!(first, second);
    assert_eq!(first, committed);
    // The public key it derives is the one minisign wrote (after the comment line).
    let pub_text = std::fs::read_to_string(demo_pub()).unwrap();
    assert_eq!(
        key.public_key_file().lines().nth(1),
        pub_text.lines().nth(1)
    );
}

#[test]
fn an_edited_manifest_is_refused_even_when_signatures_are_not_required() {
    let (_dir, bundle) = repository();
    let manifest = bundle.join("bundle.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let edited = text.replacen("description = \"", "description = \"Edited: ", 1);
    assert_ne!(text, edited);
    std::fs::write(&manifest, edited).unwrap();
    let err = Bundle::open_with(&bundle, &trusting(&[demo_pub()], false)).unwrap_err();
    match &err {
        BundleError::SignatureInvalid { path, key_id, .. } => {
            assert_eq!(path, &bundle.join(SIGNATURE_FILE));
            assert_eq!(key_id, &id_from_comment(&demo_pub()));
        }
        other => panic!("{other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains(BUNDLE), "{message}");
    assert!(message.contains(&id_from_comment(&demo_pub())), "{message}");
}

#[test]
fn a_tampered_model_file_is_refused_at_load_and_not_signed() {
    let (dir, bundle) = repository();
    let model = bundle.join("1/model.onnx");
    let mut bytes = std::fs::read(&model).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&model, bytes).unwrap();
    let options = RepositoryOptions {
        signatures: trusting(&[demo_pub()], true),
        ..RepositoryOptions::default()
    };
    let repository = Repository::new(dir.path(), options);
    let err = repository.load(BUNDLE).unwrap_err().to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(err.contains(&sha256_file(&model).unwrap()), "{err}");
    let key = SigningKey::from_file(&demo_key(), None).unwrap();
    let signed = Bundle::open(&bundle).unwrap().sign(&key);
    assert!(
        matches!(signed, Err(BundleError::ChecksumMismatch { .. })),
        "{signed:?}"
    );
}

#[test]
fn a_signature_by_an_untrusted_key_is_refused_when_required_and_reported_otherwise() {
    let (_dir, bundle) = repository();
    let other = SigningKey::from_file(&fixture_key("untrusted.key"), None).unwrap();
    let other_id = id_from_comment(&fixture_key("untrusted.pub"));
    assert_eq!(other.id(), other_id);
    Bundle::open(&bundle).unwrap().sign(&other).unwrap();

    let err = Bundle::open_with(&bundle, &trusting(&[demo_pub()], true)).unwrap_err();
    match &err {
        BundleError::SignatureUntrusted { key_id, .. } => assert_eq!(key_id, &other_id),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("not a trusted key"), "{err}");

    let lenient = Bundle::open_with(&bundle, &trusting(&[demo_pub()], false)).unwrap();
    assert_eq!(
        lenient.signature,
        SignatureStatus::UntrustedKey { key_id: other_id }
    );
    // Trusting the other key too: verified.
    let both = trusting(&[demo_pub(), fixture_key("untrusted.pub")], true);
    assert!(Bundle::open_with(&bundle, &both).is_ok());
}

#[test]
fn a_missing_signature_is_refused_only_when_required() {
    let (dir, bundle) = repository();
    std::fs::remove_file(bundle.join(SIGNATURE_FILE)).unwrap();
    let err = Bundle::open_with(&bundle, &trusting(&[demo_pub()], true)).unwrap_err();
    assert!(
        matches!(err, BundleError::SignatureMissing { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("not signed"), "{err}");
    let open = Bundle::open_with(&bundle, &trusting(&[demo_pub()], false)).unwrap();
    assert_eq!(open.signature, SignatureStatus::Unsigned);

    // Through the repository: the model is unavailable and the index says why.
    let repository = Repository::new(
        dir.path(),
        RepositoryOptions {
            signatures: trusting(&[demo_pub()], true),
            ..RepositoryOptions::default()
        },
    );
    assert!(repository.load(BUNDLE).is_err());
    let index = repository.index();
    assert_eq!(index.len(), 1);
    match &index[0].state {
        ModelState::Unavailable { reason } => {
            assert!(reason.contains("not signed"), "{reason}");
            assert!(
                reason.contains(&format!("{BUNDLE}/{SIGNATURE_FILE}")),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn malformed_signature_files_are_refused_with_a_reason() {
    let (_dir, bundle) = repository();
    let policy = trusting(&[demo_pub()], false);
    let sig = bundle.join(SIGNATURE_FILE);
    let committed = std::fs::read_to_string(&sig).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("garbage", b"hello\nworld\n".to_vec()),
        ("binary", vec![0xff, 0xfe, 0x00, 0x80]),
        ("huge", vec![b'a'; 1 << 20]),
        (
            "truncated",
            committed
                .lines()
                .take(2)
                .collect::<Vec<_>>()
                .join("\n")
                .into_bytes(),
        ),
        (
            "bad base64",
            committed.replacen("RUQ", "!!!", 1).into_bytes(),
        ),
    ];
    for (what, bytes) in cases {
        std::fs::write(&sig, &bytes).unwrap();
        let err = Bundle::open_with(&bundle, &policy).unwrap_err();
        assert!(
            matches!(err, BundleError::SignatureMalformed { .. }),
            "{what}: {err:?}"
        );
    }
    // A legacy (not prehashed) signature ("Ed" where "ED" is: base64 `RWQ` for `RUQ`) is
    // refused as one, under a trusted key or another (it read "does not verify" under the
    // first and "untrusted" under the second: a red-team finding).
    std::fs::write(&sig, committed.replacen("RUQ", "RWQ", 1)).unwrap();
    for policy in [policy.clone(), trusting(&[], false)] {
        let err = Bundle::open_with(&bundle, &policy).unwrap_err();
        assert!(
            matches!(&err, BundleError::SignatureMalformed { reason, .. } if reason.contains("legacy")),
            "{err:?}"
        );
    }
    // A signature file that is a directory is an I/O error, not a panic.
    std::fs::remove_file(&sig).unwrap();
    std::fs::create_dir(&sig).unwrap();
    assert!(Bundle::open_with(&bundle, &policy).is_err());
}

#[test]
fn key_files_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.pub");
    std::fs::write(&bad, "untrusted comment: x\nnot base64 at all\n").unwrap();
    assert!(matches!(
        TrustedKey::from_file(&bad),
        Err(KeyError::Malformed { .. })
    ));
    assert!(matches!(
        TrustedKey::from_file(&dir.path().join("missing.pub")),
        Err(KeyError::Io { .. })
    ));
    // A secret key is not a public key, and the reverse.
    assert!(TrustedKey::from_file(&demo_key()).is_err());
    assert!(SigningKey::from_file(&demo_pub(), None).is_err());
    // The same key twice is a configuration mistake.
    assert!(matches!(
        SignaturePolicy::load(&[demo_pub(), demo_pub()], false),
        Err(KeyError::Duplicate { .. })
    ));
    // A bare base64 line (as `minisign -P` takes) is accepted.
    let bare = dir.path().join("bare.pub");
    let line = std::fs::read_to_string(demo_pub())
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .to_owned();
    std::fs::write(&bare, line).unwrap();
    assert_eq!(
        TrustedKey::from_file(&bare).unwrap().id(),
        id_from_comment(&demo_pub())
    );
    // A corrupted secret key (one byte of its public half flipped) is refused.
    let text = std::fs::read_to_string(demo_key()).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    use base64::Engine as _;
    let mut raw = base64::engine::general_purpose::STANDARD
        .decode(&lines[1])
        .unwrap();
    raw[100] ^= 1;
    lines[1] = base64::engine::general_purpose::STANDARD.encode(raw);
    let corrupt = dir.path().join("corrupt.key");
    std::fs::write(&corrupt, lines.join("\n")).unwrap();
    assert!(SigningKey::from_file(&corrupt, None).is_err());
}

#[test]
fn a_key_file_holding_several_keys_trusts_every_one_of_them() {
    // Two keys made by minisign, concatenated as `cat demo.pub untrusted.pub > keys.pub`
    // makes them. Before, only the first was trusted and the second silently ignored.
    let dir = tempfile::tempdir().unwrap();
    let both = dir.path().join("keys.pub");
    let text = format!(
        "{}{}",
        std::fs::read_to_string(demo_pub()).unwrap(),
        std::fs::read_to_string(fixture_key("untrusted.pub")).unwrap()
    );
    std::fs::write(&both, &text).unwrap();
    let policy = trusting(std::slice::from_ref(&both), true);
    let ids: Vec<&str> = policy.trusted.iter().map(TrustedKey::id).collect();
    assert_eq!(
        ids,
        [
            id_from_comment(&demo_pub()),
            id_from_comment(&fixture_key("untrusted.pub"))
        ]
    );
    // A bundle signed by the second key verifies under the file.
    let (_repo, bundle) = repository();
    let second = SigningKey::from_file(&fixture_key("untrusted.key"), None).unwrap();
    Bundle::open(&bundle).unwrap().sign(&second).unwrap();
    assert_eq!(
        Bundle::open_with(&bundle, &policy).unwrap().signature,
        SignatureStatus::Verified {
            key_id: second.id().to_owned(),
            trusted_comment: format!("nightingale bundle {BUNDLE}"),
        }
    );
    // One key asked for, several found: refused, naming them (not the first taken).
    let err = TrustedKey::from_file(&both).unwrap_err().to_string();
    assert!(err.contains("holds 2 keys"), "{err}");
    // A malformed key anywhere in the file fails the file, naming the line.
    let bad = dir.path().join("bad.pub");
    std::fs::write(
        &bad,
        format!("{text}untrusted comment: x\nnot base64 at all\n"),
    )
    .unwrap();
    let err = SignaturePolicy::load(std::slice::from_ref(&bad), false).unwrap_err();
    assert!(matches!(err, KeyError::Malformed { .. }), "{err}");
    assert!(err.to_string().contains("line 6"), "{err}");
    // The same key twice in one file is a duplicate, as in two files.
    let twice = dir.path().join("twice.pub");
    let demo = std::fs::read_to_string(demo_pub()).unwrap();
    std::fs::write(&twice, format!("{demo}{demo}")).unwrap();
    assert!(matches!(
        SignaturePolicy::load(std::slice::from_ref(&twice), false),
        Err(KeyError::Duplicate { .. })
    ));
    assert!(matches!(
        SignaturePolicy::load(&[both, demo_pub()], false),
        Err(KeyError::Duplicate { .. })
    ));
}

#[test]
fn an_encrypted_minisign_key_signs_with_its_password() {
    let (_dir, bundle) = repository();
    let key = SigningKey::from_file(
        &fixture_key("encrypted.key"),
        Some("nightingale-test".into()),
    )
    .unwrap();
    assert_eq!(key.id(), id_from_comment(&fixture_key("encrypted.pub")));
    Bundle::open(&bundle).unwrap().sign(&key).unwrap();
    let policy = trusting(&[fixture_key("encrypted.pub")], true);
    assert!(matches!(
        Bundle::open_with(&bundle, &policy).unwrap().signature,
        SignatureStatus::Verified { .. }
    ));
    // Without a password, off a terminal: refused, not prompted.
    assert!(matches!(
        SigningKey::from_file(&fixture_key("encrypted.key"), None),
        Err(KeyError::Decrypt { .. })
    ));
}

#[test]
fn signature_errors_answered_over_http_name_the_file_relative_to_the_repository() {
    let (dir, bundle) = repository();
    let root = dir.path().to_string_lossy().into_owned();
    let repository = Repository::new(
        dir.path(),
        RepositoryOptions {
            signatures: trusting(&[demo_pub()], true),
            ..RepositoryOptions::default()
        },
    );
    let sig = bundle.join(SIGNATURE_FILE);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("huge", vec![b'a'; 1 << 20]),
        ("binary", vec![0xff, 0xfe, 0x00, 0x80]),
        ("garbage", b"hello\nworld\n".to_vec()),
    ];
    for (what, bytes) in cases {
        std::fs::write(&sig, &bytes).unwrap();
        let err = repository.load(BUNDLE).unwrap_err().to_string();
        let index = repository.index();
        let ModelState::Unavailable { reason } = &index[0].state else {
            panic!("{what}: {index:?}");
        };
        for text in [&err, reason] {
            assert!(
                text.starts_with(&format!("{BUNDLE}/{SIGNATURE_FILE}: refused")),
                "{what}: {text}"
            );
            assert!(!text.contains(&root), "{what}: {text}");
        }
    }
}

#[cfg(unix)]
#[test]
fn a_signature_file_that_is_not_a_regular_file_is_refused_unread() {
    let (dir, bundle) = repository();
    let outside = tempfile::tempdir().unwrap();
    let sig = bundle.join(SIGNATURE_FILE);
    // A link to the bundle's own (valid) signature kept elsewhere: refused all the same.
    let kept = outside.path().join("kept.minisig");
    std::fs::rename(&sig, &kept).unwrap();
    std::os::unix::fs::symlink(&kept, &sig).unwrap();
    for require in [false, true] {
        let err = Bundle::open_with(&bundle, &trusting(&[demo_pub()], require)).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
    let repository = Repository::new(
        dir.path(),
        RepositoryOptions {
            signatures: trusting(&[demo_pub()], true),
            ..RepositoryOptions::default()
        },
    );
    let err = repository.load(BUNDLE).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{BUNDLE}/{SIGNATURE_FILE} is not a regular file")),
        "{err}"
    );

    // A FIFO would block a plain open until a writer came: refused without opening it.
    std::fs::remove_file(&sig).unwrap();
    let made = std::process::Command::new("mkfifo").arg(&sig).status();
    if !made.is_ok_and(|s| s.success()) {
        eprintln!("mkfifo unavailable; FIFO case skipped");
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let policy = trusting(&[demo_pub()], false);
    let bundle_dir = bundle.clone();
    std::thread::spawn(move || {
        let _ = tx.send(Bundle::open_with(&bundle_dir, &policy).map(|_| ()));
    });
    let result = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("opening a bundle whose signature is a FIFO must not block");
    let err = result.unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
}

#[test]
fn signing_never_writes_through_a_planted_link_or_file() {
    // A bundle folder that someone else can write to may hold a link where a fixed temporary
    // name would be (`.bundle.toml.minisig.tmp`, the name `models sign` used): signing must
    // neither write through it nor remove what it points at, and leaves no temporary behind.
    let (dir, bundle) = repository();
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, "IMPORTANT VICTIM CONTENT\n").unwrap();
    let planted = bundle.join(format!(".{SIGNATURE_FILE}.tmp"));
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    let committed = std::fs::read(bundle.join(SIGNATURE_FILE)).unwrap();
    std::fs::remove_file(bundle.join(SIGNATURE_FILE)).unwrap();
    let key = SigningKey::from_file(&demo_key(), None).unwrap();
    let written = Bundle::open(&bundle).unwrap().sign(&key).unwrap();
    assert_eq!(written, bundle.join(SIGNATURE_FILE));
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "IMPORTANT VICTIM CONTENT\n"
    );
    // The planted link is still a link (not replaced, not followed), and the signature is a
    // regular file with the expected bytes.
    assert!(
        std::fs::symlink_metadata(&planted)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let meta = std::fs::symlink_metadata(&written).unwrap();
    assert!(meta.file_type().is_file());
    // With the mode a plain create gives (the server may read it as another user).
    use std::os::unix::fs::PermissionsExt as _;
    let plain = dir.path().join("plain");
    std::fs::write(&plain, b"").unwrap();
    assert_eq!(
        meta.permissions().mode(),
        std::fs::metadata(&plain).unwrap().permissions().mode()
    );
    assert_eq!(std::fs::read(&written).unwrap(), committed);
    // No temporary file of ours is left in the bundle.
    let left: Vec<String> = std::fs::read_dir(&bundle)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n.as_str() != format!(".{SIGNATURE_FILE}.tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // A signature file that is itself a link is never written through: either the bundle is
    // refused, or signing replaces the link with a regular file.
    let sig = bundle.join(SIGNATURE_FILE);
    std::fs::remove_file(&sig).unwrap();
    std::os::unix::fs::symlink(&victim, &sig).unwrap();
    if let Ok(opened) = Bundle::open(&bundle) {
        let _ = opened.sign(&key);
    }
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "IMPORTANT VICTIM CONTENT\n"
    );
}

/// Red-team finding: an older signed manifest put back in the repository (with a version
/// its successor withdrew) served again, "signature verified". With `release` numbers and
/// the server's ledger, an older release is refused while the newer keeps serving, across
/// restarts, unless an operator allows exactly that release.
#[test]
fn an_older_signed_release_put_back_is_refused_unless_the_operator_allows_it() {
    use nightingale_models::LoadTarget;
    use nightingale_models::releases::ReleaseLedger;
    use std::sync::Arc;
    let (dir, bundle) = repository();
    let key = SigningKey::from_file(&demo_key(), None).unwrap();
    let manifest = bundle.join("bundle.toml");
    // The reference manifest declares its release: this test writes its own releases, and
    // `original` is the manifest without one.
    let original: String = std::fs::read_to_string(&manifest)
        .unwrap()
        .split_inclusive('\n')
        .filter(|line| !line.starts_with("release = "))
        .collect();
    let release = |n: u64| {
        // `release` goes right after `name` (a top-level key, before any table).
        let text = original.replacen(
            &format!("name = \"{BUNDLE}\"\n"),
            &format!("name = \"{BUNDLE}\"\nrelease = {n}\n"),
            1,
        );
        assert_ne!(
            text, original,
            "the manifest names its bundle on a line of its own"
        );
        std::fs::write(&manifest, text).unwrap();
        Bundle::open(&bundle).unwrap().sign(&key).unwrap();
        (
            std::fs::read(&manifest).unwrap(),
            std::fs::read(bundle.join(SIGNATURE_FILE)).unwrap(),
        )
    };
    let put_back = |(text, signature): &(Vec<u8>, Vec<u8>)| {
        std::fs::write(&manifest, text).unwrap();
        std::fs::write(bundle.join(SIGNATURE_FILE), signature).unwrap();
    };
    let first = release(1);
    let second = release(2);
    let ledger_path = dir.path().join("data/releases.json");
    let open = || {
        Repository::new(
            dir.path(),
            RepositoryOptions {
                signatures: trusting(&[demo_pub()], true),
                releases: Some(Arc::new(ReleaseLedger::open(&ledger_path).unwrap())),
                ..RepositoryOptions::default()
            },
        )
    };
    let served_release = |r: &Repository| r.get(BUNDLE, None).ok().and_then(|m| m.manifest.release);
    let repository = open();
    repository.load(BUNDLE).unwrap();
    assert_eq!(served_release(&repository), Some(2));
    // Release 1 put back: refused, release 2 keeps serving.
    put_back(&first);
    let err = repository.load(BUNDLE).unwrap_err().to_string();
    assert!(err.contains("release 1, older than release 2"), "{err}");
    assert_eq!(served_release(&repository), Some(2));
    // After a restart too; and a manifest without a release.
    drop(repository);
    let repository = open();
    assert!(repository.load(BUNDLE).is_err());
    std::fs::write(&manifest, &original).unwrap();
    Bundle::open(&bundle).unwrap().sign(&key).unwrap();
    let err = repository.load(BUNDLE).unwrap_err().to_string();
    assert!(err.contains("declares no release"), "{err}");
    // The operator rolls back to release 1, which becomes the floor.
    put_back(&first);
    // Chosen for one load only: a load refused at its commit (the audit trail down) puts
    // the floor back and leaves nothing open for the next load (a red-team finding: the
    // poller later served the chosen release on its own).
    let refused =
        repository.load_release_committed(BUNDLE, LoadTarget::Policy, Some(1), &|_, _| {
            Err("the audit trail is down".to_owned())
        });
    assert!(refused.is_err());
    let err = repository.load(BUNDLE).unwrap_err().to_string();
    assert!(err.contains("release 1, older than release 2"), "{err}");
    repository
        .load_release_committed(BUNDLE, LoadTarget::Policy, Some(1), &|_, _| Ok(()))
        .unwrap();
    assert_eq!(served_release(&repository), Some(1));
    put_back(&second);
    repository.load(BUNDLE).unwrap();
    assert_eq!(served_release(&repository), Some(2));
}
