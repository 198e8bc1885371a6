//! The command line as a user runs it: `models check` passes on every shipped bundle (naming
//! the engine and the self-test result of each version) and fails (exit code 1, the file
//! named) on a tampered copy; `audit verify` on a missing log fails.

use std::path::PathBuf;
use std::process::Command;

mod support;
use support::copy_dir;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nightingale"))
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn models_check_passes_on_every_shipped_bundle() {
    let out = bin()
        .args(["models", "check"])
        .arg(root().join("models/bundles"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Each version: the engine that ran it and its self-test against onnxruntime's outputs.
    for (name, rows) in [
        ("wdbc-malignancy version 1", 20),
        ("wdbc-malignancy version 2", 20),
        ("icu-mortality version 1", 20),
        ("pima-diabetes version 1", 20),
        ("image-orientation version 1", 2),
        ("lesion-detection version 1", 4),
        ("lesion-detection-candle version 1", 4),
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("ok   {name}:")))
            .unwrap_or_else(|| panic!("{name} missing from:\n{stdout}"));
        // The candle bundle runs its (onnxruntime-made) self-test on the candle engine.
        let engine = if name.contains("candle") {
            "candle"
        } else {
            "tract"
        };
        assert!(
            line.contains(&format!(
                "checksums verified, self-test {rows} rows within atol 1e-5 rtol 1e-4"
            )) && line.contains(&format!(") on {engine} (")),
            "{line}"
        );
    }
}

/// `models check PATHS...`: its exit code and what it printed.
fn models_check(paths: &[&std::path::Path]) -> (Option<i32>, String) {
    let out = bin()
        .args(["models", "check"])
        .args(paths)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn models_check_fails_on_a_tampered_file_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("pima-diabetes");
    copy_dir(&root().join("models/bundles/pima-diabetes"), &bundle);
    let model = bundle.join("1/model.onnx");
    let mut bytes = std::fs::read(&model).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&model, bytes).unwrap();
    let (code, stdout) = models_check(&[&bundle]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL")
            && stdout.contains("checksum mismatch")
            && stdout.contains("1/model.onnx"),
        "{stdout}"
    );
}

/// Red-team finding: `models check` said ok on a bundle that no server with the default
/// `--max-engine-threads` (256) serves: 5 versions of 64 instances.
#[test]
fn models_check_fails_on_a_bundle_over_the_default_engine_thread_cap() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("pima-diabetes");
    copy_dir(&root().join("models/bundles/pima-diabetes"), &bundle);
    let manifest = std::fs::read_to_string(bundle.join("bundle.toml")).unwrap();
    let first = manifest.split("[versions.1]").nth(1).unwrap().to_owned();
    let mut manifest = manifest
        .replace("policy = \"latest\"\nlatest = 1", "policy = \"all\"")
        .replace("instances = 1\n", "instances = 64\n");
    for v in 2..=5 {
        copy_dir(&bundle.join("1"), &bundle.join(v.to_string()));
        manifest.push_str(&format!(
            "\n[versions.{v}]{}",
            first.replace("[versions.1.files]", &format!("[versions.{v}.files]"))
        ));
    }
    std::fs::write(bundle.join("bundle.toml"), manifest).unwrap();
    let (code, stdout) = models_check(&[&bundle]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL") && stdout.contains("320 engine threads"),
        "{stdout}"
    );
}

/// Red-team finding: a 7-node graph whose constant `Pad` asks tract for 4 TB aborted
/// `models check` and the server (Rust aborts on an allocation that fails; no panic to
/// catch), at every start while the bundle was in the repository. Each model now loads in a
/// probe process first: the one it stops is refused, and the check goes on to the next.
#[test]
fn a_model_that_aborts_its_loader_is_refused_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("pima-diabetes");
    copy_dir(&root().join("models/bundles/pima-diabetes"), &bundle);
    let model = bundle.join("1/model.onnx");
    let old = nightingale_models::sha256_file(&model).unwrap();
    std::fs::copy(
        root().join("models/tests/fixtures/alloc-abort.onnx"),
        &model,
    )
    .unwrap();
    let new = nightingale_models::sha256_file(&model).unwrap();
    let manifest = bundle.join("bundle.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    assert!(text.contains(&old));
    std::fs::write(&manifest, text.replace(&old, &new)).unwrap();
    let (code, stdout) = models_check(&[&bundle, &root().join("models/bundles/wdbc-malignancy")]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL")
            && stdout.contains("stopped a probe process (signal 6 (SIGABRT)")
            && stdout.contains("memory allocation of"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok   wdbc-malignancy version 1:"),
        "the next bundle is checked: {stdout}"
    );
    // Re-attack finding: a model whose Pad aborts only with the manifest's pinned shape (the
    // file leaves the dimension open, so a warm-up on the file's own shapes ran nothing)
    // passed the probe and aborted the server's warm-up. The probe prepares the version as
    // the server does; and a run of tract is now bounded in working memory (808 GB asked),
    // so the warm-up is refused before the Pad allocates.
    let pinned = root().join("models/tests/fixtures/bundles/pinned-pad");
    let (code, stdout) = models_check(&[&pinned]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL")
            && stdout.contains("needs at least 808000000408 bytes of working memory"),
        "{stdout}"
    );
}

#[test]
fn audit_verify_fails_on_a_missing_log() {
    let out = bin()
        .args(["audit", "verify", "/nonexistent/audit.jsonl"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAIL"));
}

/// A PATH and a PostgreSQL trail named together (its variable set for `serve`): refused,
/// exit 2, where the file was ignored and an intact database said "ok" (a review's finding).
#[test]
fn audit_verify_refuses_a_path_and_a_database_together() {
    let out = bin()
        .args(["audit", "verify", "/nonexistent/audit.jsonl"])
        .env(
            "NIGHTINGALE_AUDIT_POSTGRES_URL",
            "host=127.0.0.1 port=1 user=u dbname=d",
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("check one at a time"),
        "{out:?}"
    );
}

/// Starts `serve` in `dir` (on its folder `repository`, HTTP on a free loopback port, info
/// log, no config file or admin token from the environment) with `args`; its log lines come
/// on the receiver.
fn spawn_serve(
    dir: &std::path::Path,
    args: &[&str],
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = bin()
        .current_dir(dir)
        .args([
            "serve",
            "--repository",
            "repository",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .args(args)
        .env("NIGHTINGALE_LOG", "info")
        .env_remove("NIGHTINGALE_CONFIG")
        .env_remove("NIGHTINGALE_ADMIN_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// Runs `serve` in a temporary folder until it logs that it listens (or exits), then stops
/// it. Returns whether it was listening, and its log.
fn serve_until_listening(args: &[&str], envs: &[(&str, &str)]) -> (bool, String) {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("repository")).unwrap();
    let mut cmd = bin();
    cmd.current_dir(dir.path())
        .args(["serve", "--repository", "repository"])
        .args(args)
        .env("NIGHTINGALE_LOG", "info")
        .env_remove("NIGHTINGALE_INSECURE")
        .env_remove("NIGHTINGALE_HTTP_ADDR")
        .env_remove("NIGHTINGALE_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut log = String::new();
    let mut listening = false;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                log.push_str(&line);
                log.push('\n');
                if line.contains("listening") {
                    listening = true;
                    break;
                }
            }
            // The process ended (its stderr closed) or the minute is up.
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    (listening, log)
}

/// One server with a DICOM spool a data folder: a second on the same folder is refused at
/// start, naming it, even with an audit trail and a spool of its own (two shared the
/// pipeline's results store and routed series twice: a red-team finding); and one a spool.
#[test]
fn a_second_server_on_one_data_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(dir.path().join("repository")).unwrap();
    let first_spool = dir.path().join("spool-1");
    let (mut first, lines) = spawn_serve(
        dir.path(),
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "--dicom-spool",
            first_spool.to_str().unwrap(),
        ],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !lines
        .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
        .expect("the first server listens")
        .contains("listening")
    {}
    let audit = dir.path().join("own-audit.jsonl");
    let spool = dir.path().join("spool-2");
    let data_arg = data.to_str().unwrap();
    let audit_arg = audit.to_str().unwrap();
    let spool_arg = spool.to_str().unwrap();
    let (listening, log) = serve_until_listening(
        &[
            "--data-dir",
            data_arg,
            "--audit-log",
            audit_arg,
            "--dicom-spool",
            spool_arg,
            "--http-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    // Its own data folder, the first server's spool: refused too (both routed every series
    // and sent their results to PACS: a review's finding).
    let other_data = dir.path().join("data-2");
    let (spool_listening, spool_log) = serve_until_listening(
        &[
            "--data-dir",
            other_data.to_str().unwrap(),
            "--dicom-spool",
            first_spool.to_str().unwrap(),
            "--http-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    let _ = first.kill();
    let _ = first.wait();
    assert!(!listening, "{log}");
    assert!(log.contains("in use by another server"), "{log}");
    assert!(!spool_listening, "{spool_log}");
    assert!(
        spool_log.contains("the DICOM spool")
            && spool_log.contains("in use by another server")
            && spool_log.contains("--dicom-spool"),
        "{spool_log}"
    );
    // Once the first has stopped, the folder is free.
    let (listening, log) = serve_until_listening(
        &[
            "--data-dir",
            data_arg,
            "--dicom-spool",
            spool_arg,
            "--http-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert!(listening, "{log}");
}

#[test]
fn a_network_address_without_credentials_refuses_to_start_unless_insecure() {
    let (listening, log) = serve_until_listening(&["--http-addr", "0.0.0.0:0"], &[]);
    assert!(!listening, "{log}");
    assert!(
        log.contains("refusing to listen on 0.0.0.0:0")
            && log.contains("not a loopback address")
            && log.contains("--insecure"),
        "{log}"
    );
    // --admin-token alone leaves inference open to anonymous callers: refused too.
    let (listening, log) = serve_until_listening(
        &[
            "--http-addr",
            "0.0.0.0:0",
            "--admin-token",
            "0123456789abcdef-admin",
        ],
        &[],
    );
    assert!(!listening, "{log}");

    for (args, envs) in [
        (vec!["--http-addr", "0.0.0.0:0", "--insecure"], vec![]),
        (
            vec!["--http-addr", "0.0.0.0:0"],
            vec![("NIGHTINGALE_INSECURE", "true")],
        ),
    ] {
        let (listening, log) = serve_until_listening(&args, &envs);
        assert!(listening, "{args:?} {envs:?}: {log}");
        assert!(
            log.contains("INSECURE") && log.contains("without credentials"),
            "{log}"
        );
    }
    // Loopback needs nothing.
    let (listening, log) = serve_until_listening(&["--http-addr", "127.0.0.1:0"], &[]);
    assert!(listening && !log.contains("INSECURE"), "{log}");

    // A FHIR server's user information is not shown, in the refusal nor in the INSECURE
    // warning (both printed the password: a review's finding).
    let fhir = "http://alice:S3cretPW@fhir.example.org/fhir";
    let (listening, log) = serve_until_listening(
        &["--http-addr", "127.0.0.1:0", "--cds-fhir-server", fhir],
        &[],
    );
    assert!(!listening, "{log}");
    assert!(
        log.contains("cds_fhir_servers") && log.contains("http://…@fhir.example.org/fhir"),
        "{log}"
    );
    assert!(!log.contains("S3cretPW") && !log.contains("alice"), "{log}");
    let (listening, log) = serve_until_listening(
        &[
            "--http-addr",
            "127.0.0.1:0",
            "--cds-fhir-server",
            fhir,
            "--insecure",
        ],
        &[],
    );
    assert!(listening, "{log}");
    assert!(
        log.contains("INSECURE: FHIR fetches to http://…@fhir.example.org/fhir"),
        "{log}"
    );
    assert!(!log.contains("S3cretPW") && !log.contains("alice"), "{log}");
}

#[test]
fn a_network_address_with_credentials_starts() {
    let config = root().join("tests/fixtures/auth/nightingale.toml");
    let (listening, log) = serve_until_listening(
        &[
            "--http-addr",
            "0.0.0.0:0",
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
    );
    assert!(listening, "{log}");
    // The start-up log says who may do what, and never a key or digest.
    assert!(
        log.contains("access control") && log.contains("infer-client (infer)"),
        "{log}"
    );
    let toml = std::fs::read_to_string(&config).unwrap();
    let digest = toml
        .lines()
        .find_map(|l| l.strip_prefix("sha256 = \""))
        .unwrap()
        .trim_end_matches('"');
    assert!(!log.contains(digest), "{log}");
    // A config naming a JWKS file that is not there stops the start, naming it.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("n.toml");
    std::fs::write(
        &bad,
        "[auth.jwt]\nissuer = \"i\"\naudience = \"a\"\njwks_file = \"missing.json\"\n",
    )
    .unwrap();
    let (listening, log) = serve_until_listening(&["--config", bad.to_str().unwrap()], &[]);
    assert!(!listening, "{log}");
    assert!(
        log.contains("cannot read the JWKS file") && log.contains("missing.json"),
        "{log}"
    );
}

fn demo_pub() -> PathBuf {
    root().join("keys/demo/nightingale-demo.pub")
}

#[test]
fn models_check_and_list_report_the_signature_of_every_shipped_bundle() {
    let out = bin()
        .args(["models", "check", "--require-signatures", "--trusted-key"])
        .arg(demo_pub())
        .arg(root().join("models/bundles"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for name in [
        "wdbc-malignancy",
        "icu-mortality",
        "pima-diabetes",
        "image-orientation",
        "lesion-detection",
        "lesion-detection-candle",
    ] {
        assert!(
            stdout.contains(&format!(
                "ok   {name}: signature by trusted key B98C67AF02AD8F31 verified"
            )),
            "{name}: {stdout}"
        );
    }
    let out = bin()
        .args(["models", "list", "--trusted-key"])
        .arg(demo_pub())
        .arg("--repository")
        .arg(root().join("models/bundles"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with("wdbc-malignancy\t2\t"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        row.contains("\tVERIFIED\tverified B98C67AF02AD8F31\t"),
        "{row}"
    );
}

/// A review's finding: folders of a repository that are not bundles (a name with a space, a
/// `bundle.toml` that is a dangling link) were passed over without a word, and `models list`
/// and `models check` exited 0 on the bundles left. They are named, and both exit 1.
#[test]
fn models_list_and_check_name_folders_that_are_not_bundles() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(
        &root().join("models/bundles/pima-diabetes"),
        &dir.path().join("pima-diabetes"),
    );
    copy_dir(
        &root().join("models/bundles/icu-mortality"),
        &dir.path().join("icu mortality"),
    );
    std::fs::create_dir(dir.path().join("wdbc-malignancy")).unwrap();
    std::os::unix::fs::symlink(
        "nowhere.toml",
        dir.path().join("wdbc-malignancy/bundle.toml"),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join(".git")).unwrap();
    let out = bin()
        .args(["models", "list", "--repository"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("icu mortality\t-\tNOT A BUNDLE\t-\t-\tnot a bundle name"),
        "{stdout}"
    );
    assert!(
        stdout.contains("wdbc-malignancy\t-\tNOT A BUNDLE\t-\t-\tno bundle.toml file in it"),
        "{stdout}"
    );
    assert!(stdout.contains("pima-diabetes\t1\tVERIFIED"), "{stdout}");
    assert!(!stdout.contains(".git"), "{stdout}");
    let (code, stdout) = models_check(&[dir.path()]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("icu mortality: not a bundle: not a bundle name"),
        "{stdout}"
    );
    assert!(
        stdout.contains("wdbc-malignancy: not a bundle: no bundle.toml file in it"),
        "{stdout}"
    );
    assert!(stdout.contains("ok   pima-diabetes"), "{stdout}");
}

/// A review's finding: `validate --quiet` printed nothing at all, so a failing gate exited 1
/// without a word. The gate's criteria and the report's path are printed under --quiet.
#[test]
fn validate_quiet_still_says_why_the_gate_failed() {
    let dir = tempfile::tempdir().unwrap();
    // Scores that rank every benign row above every malignant one.
    let mut csv = String::from("label,score\n");
    for i in 0..60 {
        csv.push_str(&format!(
            "malignant,0.{:02}\nbenign,0.{:02}\n",
            i,
            60 + i / 2
        ));
    }
    let predictions = dir.path().join("pred.csv");
    std::fs::write(&predictions, csv).unwrap();
    let out = bin()
        .args(["validate", "--quiet", "--bootstrap", "0", "--repository"])
        .arg(root().join("models/bundles"))
        .args(["--model", "wdbc-malignancy@1", "--predictions"])
        .arg(&predictions)
        .arg("--out")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("gate      FAIL auroc"), "{stdout}");
    assert!(stdout.contains("report    "), "{stdout}");
    assert!(!stdout.contains("dataset   "), "{stdout}");
}

#[test]
fn models_list_exits_1_when_a_bundle_is_refused() {
    // A manifest changed after it was signed: listed REFUSED, and the exit code says so (it
    // was 0, and a script checking the repository with `list` was told all was well).
    let dir = tempfile::tempdir().unwrap();
    copy_dir(
        &root().join("models/bundles/pima-diabetes"),
        &dir.path().join("pima-diabetes"),
    );
    let manifest = dir.path().join("pima-diabetes/bundle.toml");
    let mut text = std::fs::read_to_string(&manifest).unwrap();
    text.push_str("# changed after signing\n");
    std::fs::write(&manifest, text).unwrap();
    let out = bin()
        .args(["models", "list", "--require-signatures", "--trusted-key"])
        .arg(demo_pub())
        .arg("--repository")
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("pima-diabetes\t-\tREFUSED"), "{stdout}");
}

#[test]
fn models_sign_refuses_an_encrypted_key_without_its_password_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("pima-diabetes");
    copy_dir(&root().join("models/bundles/pima-diabetes"), &bundle);
    std::fs::remove_file(bundle.join("bundle.toml.minisig")).unwrap();
    let out = bin()
        .args(["models", "sign", "--key"])
        .arg(root().join("models/tests/fixtures/keys/encrypted.key"))
        .arg(&bundle)
        .env_remove("NIGHTINGALE_SIGNING_PASSWORD")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NIGHTINGALE_SIGNING_PASSWORD"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!bundle.join("bundle.toml.minisig").exists());
}

#[test]
fn serve_refuses_bad_signature_settings_before_listening() {
    for (args, want) in [
        (
            vec!["--require-signatures".to_owned()],
            "needs at least one trusted key",
        ),
        (
            vec![
                "--trusted-key".to_owned(),
                "/nonexistent/key.pub".to_owned(),
            ],
            "/nonexistent/key.pub",
        ),
        (
            vec![
                "--trusted-key".to_owned(),
                root()
                    .join("keys/demo/nightingale-demo.key")
                    .display()
                    .to_string(),
            ],
            "not a minisign public key file",
        ),
    ] {
        // Bounded: were the settings accepted, the server would listen until killed.
        let out = Command::new("timeout")
            .arg("60")
            .arg(env!("CARGO_BIN_EXE_nightingale"))
            .args(["serve", "--http-addr", "127.0.0.1:0"])
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}

#[test]
fn dicom_store_with_nothing_to_send_fails() {
    // A red-team finding: an empty folder, or one of nothing but non-DICOM files, reported
    // "stored 0 of 0 files" and exit 0, without contacting the peer (nothing listens here).
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let notes = dir.path().join("notes");
    std::fs::create_dir(&notes).unwrap();
    std::fs::write(notes.join("readme.txt"), "not DICOM").unwrap();
    for folder in [&empty, &notes] {
        let out = bin()
            .args(["dicom", "store", "--addr", "127.0.0.1:9"])
            .arg(folder)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{stdout}");
        assert!(stdout.contains("nothing was sent"), "{stdout}");
    }
}

/// Flags win over the environment across a pair where one overrides the other (a red-team
/// finding: `NIGHTINGALE_REQUEST_TIMEOUT_MS` beat `--request-timeout-secs`, and
/// `NIGHTINGALE_DICOM_ADDR` beat `--dicom-port`).
#[test]
fn a_flag_beats_the_environment_of_the_flag_that_overrides_it() {
    // An invalid timeout in the environment, a valid one on the command line: it starts.
    let (listening, log) = serve_until_listening(
        &["--http-addr", "127.0.0.1:0", "--request-timeout-secs", "5"],
        &[("NIGHTINGALE_REQUEST_TIMEOUT_MS", "0")],
    );
    assert!(listening, "{log}");
    // A network address in the environment (refused without an allowlist), a loopback
    // port on the command line: it starts, on loopback.
    let (listening, log) = serve_until_listening(
        &["--http-addr", "127.0.0.1:0", "--dicom-port", "0"],
        &[("NIGHTINGALE_DICOM_ADDR", "0.0.0.0:0")],
    );
    assert!(listening, "{log}");
    assert!(!log.contains("0.0.0.0"), "{log}");
}

/// A FIFO or a device named where a file is read is refused at once (a red-team finding:
/// `models sign --key`, `models check --trusted-key`, `audit verify --anchor` and `serve
/// --config` blocked for ever on a FIFO, and `serve --config /dev/zero` read until memory
/// ran out).
#[test]
fn a_fifo_or_a_device_where_a_file_is_read_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let fifo = fifo.to_str().unwrap();
    let bundle = root().join("models/bundles/wdbc-malignancy");
    let bundle = bundle.to_str().unwrap();
    let trail = dir.path().join("audit.jsonl");
    std::fs::write(&trail, "").unwrap();
    let trail = trail.to_str().unwrap();
    let trust = format!("https://ehr.example={fifo}");
    for args in [
        vec!["models", "sign", "--key", fifo, bundle],
        vec!["models", "check", "--trusted-key", fifo, bundle],
        vec!["audit", "verify", trail, "--anchor", fifo],
        vec!["serve", "--config", fifo],
        vec!["serve", "--repository", bundle, "--cds-trust", &trust],
        vec!["serve", "--config", "/dev/zero"],
    ] {
        let mut child = bin()
            .args(&args)
            .current_dir(dir.path())
            .env_remove("NIGHTINGALE_CONFIG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{args:?} did not end within 30 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        // What it says, on either stream (`audit verify` reports on stdout).
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut err).unwrap();
        assert!(!status.success(), "{args:?}: {err}");
        assert!(err.contains("not a regular file"), "{args:?}: {err}");
    }
}

/// Every refusal for credentials is logged, the anonymous caller's too (anonymous tries at
/// model control left no line: a review's finding), without the credential. Read from the
/// server's own log: an in-process capture depends on `tracing`'s per-callsite interest,
/// which the test binary's other threads share.
#[test]
fn refusals_for_credentials_are_logged_anonymous_ones_too() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("repository")).unwrap();
    let (mut child, rx) = spawn_serve(dir.path(), &["--admin-token", "the-admin-token-0123456789"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let addr = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx.recv_timeout(left).expect("the server listens");
        if line.contains("listening (KServe v2 HTTP)") {
            let at = line.find("addr=").unwrap() + "addr=".len();
            break line[at..].split_whitespace().next().unwrap().to_owned();
        }
    };
    // The status line of one request.
    let status = |method: &str, path: &str, authorization: Option<&str>| {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let auth = authorization
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        )
        .unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer.lines().next().unwrap_or_default().to_owned()
    };
    // Ready (the listener answers 503 "starting" before).
    while !status("GET", "/v2/health/ready", None).contains(" 200 ") {
        assert!(std::time::Instant::now() < deadline, "not ready");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let unload = |authorization: Option<&str>| {
        status("POST", "/v2/repository/models/m/unload", authorization)
    };
    let anonymous = unload(None);
    assert!(anonymous.contains(" 401 "), "{anonymous}");
    assert!(unload(Some("Bearer not-a-token-of-this-server")).contains(" 401 "));
    let mut log = Vec::new();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while log
        .iter()
        .filter(|l: &&String| l.contains("/unload"))
        .count()
        < 2
    {
        let left = until.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => log.push(line),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let lines: Vec<&String> = log.iter().filter(|l| l.contains("/unload")).collect();
    assert_eq!(lines.len(), 2, "{log:#?}");
    assert!(
        lines[0].contains("credentials missing") && lines[0].contains("caller=\"anonymous\""),
        "{log:#?}"
    );
    assert!(lines[1].contains("credentials refused"), "{log:#?}");
    assert!(
        !log.iter().any(|l| l.contains("not-a-token-of-this-server")),
        "{log:#?}"
    );
}

/// An empty `NIGHTINGALE_ADMIN_TOKEN` (a deployment template whose secret was not filled in)
/// is no token, and the start says so as a warning.
#[test]
fn an_empty_admin_token_variable_is_named_at_start() {
    let (listening, log) = serve_until_listening(
        &["--http-addr", "127.0.0.1:0", "--data-dir", "data"],
        &[("NIGHTINGALE_ADMIN_TOKEN", "")],
    );
    assert!(listening, "{log}");
    assert!(
        log.contains("NIGHTINGALE_ADMIN_TOKEN is set but empty"),
        "{log}"
    );
}

/// The data folder is the server's own, with DICOM on or not: one made 0755 beforehand is
/// narrowed to 0700, a shared one (sticky, or writable by every user: `/tmp` given by
/// mistake) refused unchanged (without DICOM it was taken as it was: a re-attack's finding).
#[test]
fn a_shared_data_folder_is_refused_and_an_open_one_narrowed() {
    use std::os::unix::fs::PermissionsExt as _;
    let base = tempfile::tempdir().unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    for (made, listens, after) in [
        (0o755, true, 0o700),
        (0o1777, false, 0o1777),
        (0o777, false, 0o777),
    ] {
        let data = base.path().join(format!("data-{made:o}"));
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(made)).unwrap();
        let (listening, log) = serve_until_listening(&["--data-dir", data.to_str().unwrap()], &[]);
        assert_eq!(listening, listens, "{made:o}: {log}");
        if !listens {
            assert!(log.contains("shared folder"), "{made:o}: {log}");
        }
        assert_eq!(mode(&data), after, "{made:o}");
    }
}
