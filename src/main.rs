//! `nightingale`: the server and its command-line tools.

use nightingale::log_line::printable;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nightingale::audit::AuditLog;
use nightingale::config::{AuditConfig, LogFormat, ServeArgs, ServeConfig};
use nightingale::http::{self, AppState, HttpConfig};
use nightingale_models::{Bundle, Repository, RepositoryOptions};
use tracing_subscriber::EnvFilter;

mod dicom_cli; // issue 8, OPS slice: `dicom echo|store`, `spool check|purge`
mod results_cli; // issue 9: `results reprocess`

/// Nightingale: a clinical AI inference server (KServe v2 / Open Inference Protocol).
#[derive(Parser, Debug)]
#[command(name = "nightingale", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the models of a repository over HTTP.
    Serve(Box<ServeArgs>),
    /// Check the audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Inspect model bundles without serving them.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    // ---- DICOM operator tools (issue 8, OPS slice) ----
    /// A small DICOM SCU: C-ECHO and C-STORE to a PACS or any storage SCP.
    Dicom {
        #[command(subcommand)]
        command: dicom_cli::DicomCommand,
    },
    /// Maintain the DICOM spool: check the index against the files, purge old instances.
    Spool {
        #[command(subcommand)]
        command: dicom_cli::SpoolCommand,
    },
    // ---- end DICOM ----
    /// Validate a model on a labelled dataset: metrics with confidence intervals,
    /// calibration, subgroups, decision curve; report.json + report.html in --out; exit 0
    /// when the bundle's gate passes, 1 when a criterion fails, 2 on a usage or data error.
    Validate(Box<nightingale::validate::ValidateArgs>),
    /// The DICOM pipeline's results: list what needs looking at, reprocess a study, send again
    /// results given up.
    Results {
        #[command(subcommand)]
        command: results_cli::ResultsCommand,
    },
    /// Internal: loads the model given on stdin (ONNX, or a candle bundle's weights and
    /// architecture) and runs it once on zeros, in a process of its own, before the server (or
    /// `models check`, `validate`) loads it in its own.
    #[command(name = "__probe-model", hide = true)]
    ProbeModel(ProbeArgs),
}

#[derive(clap::Args, Debug)]
struct ProbeArgs {
    #[arg(long)]
    backend: String,
    #[arg(long, default_value_t = 0)]
    intra_op_threads: usize,
    #[arg(long, default_value = "nightingale")]
    tract_kernels: String,
    #[arg(long)]
    ort_library: Option<PathBuf>,
    #[arg(long)]
    version: u64,
    #[arg(long, default_value_t = 0)]
    max_inference_bytes: u64,
}

/// `__probe-model`: prepares the version given on stdin as the server would (load, warm-up
/// with the manifest's shapes, self-test: [`nightingale_models::probe_load`]); exit 0, or 1
/// with the error.
fn probe_model(args: ProbeArgs) -> ! {
    // `candle` is no `--backend` of `serve` (a bundle's platform chooses it), but its bundles
    // are probed too: a probe that cannot name its engine proves nothing (it exits 1, which
    // is no verdict).
    let backend: nightingale_inference::BackendKind = match args.backend.as_str() {
        "candle" => nightingale_inference::BackendKind::Candle,
        other => match other.parse() {
            Ok(b) => b,
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1)
            }
        },
    };
    let options = RepositoryOptions {
        backend,
        intra_op_threads: args.intra_op_threads,
        ort_library: args.ort_library,
        tract_kernels: if args.tract_kernels == "tract" {
            nightingale_inference::TractKernels::Tract
        } else {
            nightingale_inference::TractKernels::Nightingale
        },
        max_working_bytes: args.max_inference_bytes,
        ..RepositoryOptions::default()
    };
    match nightingale_models::probe_load(&mut std::io::stdin().lock(), args.version, &options) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1)
        }
    }
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Verify an audit trail's hash chain; exit code 1 at the first broken record. PATH is the
    /// live JSON-lines file (its rotated files beside it are checked too), the folder holding
    /// it, or an SQLite audit database.
    Verify {
        #[arg(required_unless_present = "postgres_url")]
        path: Option<PathBuf>,
        /// Check the PostgreSQL audit table instead.
        #[arg(long, env = "NIGHTINGALE_AUDIT_POSTGRES_URL", hide_env_values = true)]
        postgres_url: Option<String>,
        /// A file holding the last record the previous check saw (created on the first check,
        /// moved on after each good one): that record must still be there, unchanged, so
        /// records cut from the end of the trail are found. Keep it where the server cannot
        /// write.
        #[arg(long, value_name = "FILE")]
        anchor: Option<PathBuf>,
        /// Older files were archived away on purpose since the anchor was taken: a trail that
        /// starts later than it did then is accepted (without it that fails: records removed
        /// from the start), and the anchor records where it starts now.
        #[arg(long, requires = "anchor")]
        archived: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ModelsCommand {
    /// List the bundles of a repository, their versions and whether they verify. Exit code
    /// 1 if any is refused.
    List {
        /// Model repository folder.
        #[arg(long, env = "NIGHTINGALE_REPOSITORY", default_value = "models/bundles")]
        repository: PathBuf,
        #[command(flatten)]
        trust: TrustArgs,
    },
    /// Validate bundles: manifest, signature, checksums of every file, and that each version
    /// loads and passes its self-test. PATH is a bundle folder or a repository of them. Exit
    /// code 1 if any fails. A signature by a trusted key that does not verify always fails.
    Check {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        trust: TrustArgs,
    },
    /// Sign bundles: check every version folder against the manifest's checksums, then write
    /// `bundle.toml.minisig` (minisign format, Ed25519) over bundle.toml. PATH is a bundle
    /// folder or a repository of them. The same key and manifest always give the same bytes.
    Sign {
        /// minisign secret key file (`minisign -G`, `rsign generate`). An encrypted key's
        /// password is read from NIGHTINGALE_SIGNING_PASSWORD, or asked on a terminal.
        #[arg(long)]
        key: PathBuf,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Scaffold a bundle around an ONNX file: inputs and outputs as the engine runs them,
    /// version 1 with checksums, a self-test from sample rows, and TODO fields to fill in.
    Init(Box<InitArgs>),
}

/// Which signing keys `models check`/`models list` trust.
#[derive(clap::Args, Debug)]
struct TrustArgs {
    /// A minisign public key file trusted to sign bundles (repeatable).
    #[arg(
        long = "trusted-key",
        env = "NIGHTINGALE_TRUSTED_KEYS",
        value_delimiter = ','
    )]
    trusted_keys: Vec<PathBuf>,
    /// Fail bundles that are unsigned or signed by an untrusted key.
    #[arg(long, env = "NIGHTINGALE_REQUIRE_SIGNATURES")]
    require_signatures: bool,
}

impl TrustArgs {
    fn policy(&self) -> anyhow::Result<nightingale_models::SignaturePolicy> {
        Ok(nightingale_models::SignaturePolicy::load(
            &self.trusted_keys,
            self.require_signatures,
        )?)
    }
}

#[derive(clap::Args, Debug)]
struct InitArgs {
    /// The ONNX model file (copied into <repository>/<name>/1/model.onnx).
    model: PathBuf,
    /// The bundle's name (its folder): 1-128 of A-Z a-z 0-9 . _ -
    #[arg(long)]
    name: String,
    /// Model repository folder (created when missing).
    #[arg(long, env = "NIGHTINGALE_REPOSITORY", default_value = "models/bundles")]
    repository: PathBuf,
    /// Sample rows (CSV, a header naming the features) for the self-test of a tabular model.
    #[arg(long)]
    sample: Option<PathBuf>,
    /// The bundle's task (tabular-risk, image-classification, regression, ...).
    #[arg(long, default_value = "other", value_parser = parse_task)]
    task: nightingale_models::TaskKind,
    /// The engine that loads the model and computes the self-test's outputs.
    #[arg(long, env = "NIGHTINGALE_BACKEND", value_enum, default_value = "tract")]
    backend: nightingale::config::BackendArg,
    /// ONNX Runtime shared library for --backend ort (default: ORT_DYLIB_PATH).
    #[arg(long, env = "NIGHTINGALE_ORT_LIBRARY")]
    ort_library: Option<PathBuf>,
    /// Add this version to the existing bundle --name instead of scaffolding a new one: the
    /// model as version N with checksums, a self-test (--sample, else the newest earlier
    /// version's self-test inputs through the new model), `[versions.N]` appended to
    /// bundle.toml and its release raised; sign again afterwards.
    #[arg(long, value_name = "N")]
    version: Option<u64>,
}

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long a shutting-down server waits for stopped validation runs to reach their next row.
const VALIDATION_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Raises the soft limit on open files to the hard one, as servers do (nginx's
/// `worker_rlimit_nofile`): every connection, spooled instance and streamed WADO-RS answer
/// holds a descriptor, and the usual soft limit of 1,024 ran out under 1,000 stalled
/// streams, after which the server accepted nothing and failed series it could not open (a
/// red-team finding).
fn raise_open_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return;
    }
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::debug!(
            from = ?limit.current,
            to = ?limit.maximum,
            "open file limit raised to the hard limit"
        ),
        Err(e) => tracing::warn!(error = %e, soft = ?limit.current, "open file limit not raised"),
    }
}

/// A write past a file-size limit (`ulimit -f`) raises SIGXFSZ, whose default action ends the
/// process: the audit trail was left with a torn last line and the server down (a review's
/// finding). With a handler installed (tokio's, which only notes the signal; it stays
/// installed for the life of the process), the write fails with EFBIG instead, which the
/// audit store handles like a full disk: the request fails closed, the server stays up.
fn catch_file_size_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::from_raw(libc::SIGXFSZ)) {
        Ok(stream) => drop(stream),
        Err(e) => {
            tracing::warn!(error = %e, "SIGXFSZ not caught: a file-size limit would stop the server")
        }
    }
}

/// Panics the server survives (an engine's kernel on a caller's input, caught and answered
/// 500) are logged as one line of the log, at most one a second with the rest counted: the
/// default hook wrote each with its backtrace, 212 KB for 14 requests anyone could send,
/// outside the log format (a re-attack's finding). The message is cut to 160 characters.
fn log_panics() {
    static LIMIT: nightingale::log_limit::LogLimit = nightingale::log_limit::LogLimit::new();
    std::panic::set_hook(Box::new(|info| {
        let Some(not_logged) = LIMIT.allow() else {
            return;
        };
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let message: String = message.chars().take(160).collect();
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_owned();
        tracing::error!(thread, location, message = ?message, not_logged, "panic");
    }));
}

fn main() -> anyhow::Result<()> {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let mut cli =
        <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let (Command::Serve(args), Some(serve)) =
        (&mut cli.command, matches.subcommand_matches("serve"))
    {
        args.prefer_flags_over_env(serve);
    }
    match cli.command {
        Command::Serve(args) => {
            let config_file = args.config.clone().or_else(|| {
                let default = std::path::PathBuf::from("nightingale.toml");
                default.is_file().then_some(default)
            });
            let config = args.resolve()?;
            init_tracing(config.log_format);
            log_panics();
            // Which file was read, if any: a `./nightingale.toml` that is a dangling link or a
            // folder was passed over without a word (a review's finding).
            match &config_file {
                Some(path) => tracing::info!(path = %path.display(), "config file read"),
                None if std::fs::symlink_metadata("nightingale.toml").is_ok() => {
                    tracing::warn!(
                        "./nightingale.toml is not a readable file (a dangling link or a folder): not read; built-in defaults and flags apply"
                    )
                }
                None => {}
            }
            // The file may hold secrets: the admin token, a database password (that one was
            // not warned about: a review's finding).
            if let Some(path) = &config_file
                && let Ok(bytes) = nightingale::files::read_regular(path, 1 << 20)
                && ["admin_token", "audit_postgres_url"]
                    .iter()
                    .any(|key| String::from_utf8_lossy(&bytes).contains(key))
            {
                nightingale::files::warn_if_others_can_read(
                    path,
                    "the config file, which sets admin_token or audit_postgres_url,",
                );
            }
            raise_open_file_limit();
            // TLS files are read now, so that a bad certificate or key fails before anything
            // else starts, naming the file.
            let tls = match &config.tls {
                Some(settings) => {
                    nightingale::tls::install_crypto_provider();
                    let loaded = nightingale::tls::load_server_config(settings)?;
                    // Served all the same (clients will refuse it; a restart must not be an
                    // outage of its own), and said loudly.
                    if let Some(problem) = nightingale::tls::validity_problem(&settings.cert) {
                        tracing::error!(
                            cert = %settings.cert.display(),
                            problem = %problem,
                            "the TLS certificate is not valid now: clients will refuse it; replace it and send SIGHUP"
                        );
                    }
                    Some(loaded)
                }
                None => None,
            };
            // One server with a DICOM spool a data folder, and one a spool: two shared the
            // pipeline's results store (with an audit trail of their own each) and routed
            // series twice (a red-team finding), and two on one spool given with
            // --dicom-spool outside their data folders each routed every series and sent
            // its results to PACS (a review's finding). Held for the process's life.
            let _locks = match &config.dicomweb {
                Some(web) => Some((
                    lock_folder(&config.data_dir, "serve.lock", "data folder", "--data-dir")?,
                    lock_folder(&web.spool, ".serve.lock", "DICOM spool", "--dicom-spool")?,
                )),
                None => {
                    // Its own, narrowed, without DICOM too: it holds the audit trail and
                    // the CDS store (a shared folder was taken as it was: a re-attack's
                    // finding).
                    own_folder(&config.data_dir, "data folder", "--data-dir")?;
                    None
                }
            };
            // Opened before the async runtime starts: the database clients block.
            let audit = open_audit(&config.audit)?;
            // The tensor digests of every record are sealed with the deployment's key.
            let existed = std::fs::symlink_metadata(&config.audit_digest_key).is_ok();
            let key = nightingale::audit::DigestKey::load_or_create(&config.audit_digest_key)
                .with_context(|| {
                    format!("audit digest key {}", config.audit_digest_key.display())
                })?;
            tracing::info!(key_id = %key.id(), path = %config.audit_digest_key.display(), made = !existed, "audit digests keyed");
            let start = start_record(&key, !existed);
            let audit = audit.with_digest_key(key);
            // DICOM records the trail cannot take are held (fsynced) and written to it later
            // (nightingale::audit::held); those an earlier run held are checked here.
            // Those of an earlier run are written to the trail even when DICOM is off now (they
            // lay unnoticed: a review's finding).
            let held_path = nightingale::audit::held::path_in(&config.data_dir);
            let audit = if config.dicomweb.is_some()
                || std::fs::symlink_metadata(&held_path).is_ok()
            {
                let held = nightingale::audit::held::Held::open(&held_path)
                    .with_context(|| format!("held DICOM audit records {}", held_path.display()))?;
                audit.with_held(Arc::new(held))
            } else {
                audit
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("ng-http")
                .build()?;
            let served = runtime.block_on(serve(config, audit, tls, start));
            match served {
                // A start-up step still running on the blocking pool (a spool indexed again)
                // is left to the process's end: it went on for seconds after the stop,
                // holding the data folder (a review's finding). Nothing it does needs
                // finishing: the spool and the stores are crash-safe.
                Ok(Stopped::DuringStartUp) => runtime.shutdown_background(),
                // Dropping the runtime would wait for every blocking task (a validation run's
                // bootstrap: hours): the process exits once what it must finish has.
                _ => runtime.shutdown_timeout(std::time::Duration::from_secs(5)),
            }
            served.map(|_| ())
        }
        Command::Audit {
            command:
                AuditCommand::Verify {
                    path,
                    postgres_url,
                    anchor,
                    archived,
                },
        } => {
            use nightingale::audit::anchor as anchors;
            // Both named: the file was ignored for the database (whose variable a `serve`
            // environment sets), and a tampered file passed unseen (a review's finding).
            if path.is_some() && postgres_url.is_some() {
                eprintln!(
                    "error: both a PATH and a PostgreSQL trail (--postgres-url or NIGHTINGALE_AUDIT_POSTGRES_URL) are named: check one at a time (unset the variable to check the file)"
                );
                std::process::exit(2)
            }
            let anchored = match &anchor {
                Some(file) => match anchors::read(file) {
                    Ok(a) => a,
                    Err(e) => {
                        println!("FAIL {}", printable(&e.to_string()));
                        std::process::exit(1)
                    }
                },
                None => None,
            };
            let watch = anchored.as_ref().map(|a| a.seq);
            // A folder of several logs: each checked and reported on its own line.
            if let (None, None, Some(folder)) = (&anchor, &postgres_url, &path)
                && folder.is_dir()
                && let Ok(logs) = nightingale::audit::jsonl::logs_in(folder)
                && logs.len() > 1
            {
                let mut failed = false;
                for log in logs {
                    match nightingale::audit::verify_watching(&log, None) {
                        Ok(summary) => {
                            println!(
                                "{}",
                                printable(&verified_line(&log.display().to_string(), &summary, ""))
                            )
                        }
                        Err(e) => {
                            println!("FAIL {}", printable(&e.to_string()));
                            failed = true;
                        }
                    }
                }
                if failed {
                    std::process::exit(1)
                }
                return Ok(());
            }
            let (what, result) = match (&postgres_url, &path) {
                (Some(url), _) => (
                    nightingale::audit::postgres::redact(url),
                    nightingale::audit::postgres::verify_watching(url, watch),
                ),
                (None, Some(path)) => (
                    path.display().to_string(),
                    nightingale::audit::verify_watching_archived(path, watch, archived),
                ),
                (None, None) => unreachable!("clap requires a path or --postgres-url"),
            };
            let result = result.map_err(|e| e.to_string()).and_then(|summary| {
                if let Some(a) = &anchored {
                    anchors::check(a, &summary, archived)
                        .map_err(|e| format!("audit trail {what}: {e}"))?;
                }
                if let Some(file) = &anchor {
                    anchors::write(file, &summary)
                        .map_err(|e| format!("cannot write the anchor {}: {e}", file.display()))?;
                }
                Ok(summary)
            });
            match result {
                Ok(summary) => {
                    let anchored = match (&anchored, &anchor) {
                        (Some(a), _) => format!("; anchored record {} still there", a.seq),
                        (None, Some(_)) if summary.tail.is_some() => "; anchor written".to_owned(),
                        (None, Some(_)) => "; no record to anchor yet".to_owned(),
                        (None, None) => String::new(),
                    };
                    println!("{}", printable(&verified_line(&what, &summary, &anchored)));
                    // Verified from its rotated files alone: said (it was silent, a
                    // re-attack's finding).
                    if postgres_url.is_none()
                        && let Some(p) = &path
                        && !p.exists()
                    {
                        println!(
                            "{}",
                            printable(&format!(
                                "note {}: the live file is absent; the trail ends at its last rotated file (a server stopped while it rotated; records written after it would be gone: keep an --anchor)",
                                p.display()
                            ))
                        );
                    }
                    Ok(())
                }
                Err(e) => {
                    println!("FAIL {}", printable(&e.to_string()));
                    std::process::exit(1)
                }
            }
        }
        Command::Models { command } => {
            init_tracing(LogFormat::Text);
            match command {
                ModelsCommand::List { repository, trust } => {
                    if list(&repository, &trust.policy()?)? {
                        Ok(())
                    } else {
                        std::process::exit(1)
                    }
                }
                ModelsCommand::Check { paths, trust } => {
                    if check(&paths, &trust.policy()?)? {
                        Ok(())
                    } else {
                        std::process::exit(1)
                    }
                }
                ModelsCommand::Sign { key, paths } => {
                    if sign(&key, &paths)? {
                        Ok(())
                    } else {
                        std::process::exit(1)
                    }
                }
                ModelsCommand::Init(args) => init_bundle(*args),
            }
        }
        // ---- DICOM operator tools (issue 8, OPS slice) ----
        Command::Dicom { command } => {
            init_tracing(LogFormat::Text);
            dicom_cli::dicom(command)
        }
        Command::Spool { command } => {
            init_tracing(LogFormat::Text);
            dicom_cli::spool(command)
        } // ---- end DICOM ----
        Command::Validate(args) => {
            // --quiet: warnings and errors only (the report's path and the gate's verdict
            // are printed anyway), unless NIGHTINGALE_LOG asks for more.
            init_tracing_at(LogFormat::Text, if args.quiet { "warn" } else { "info" });
            std::process::exit(nightingale::validate::run(&args))
        }
        Command::ProbeModel(args) => probe_model(args),
        Command::Results { command } => {
            init_tracing(LogFormat::Text);
            results_cli::results(command)
        }
    }
}

fn init_tracing(format: LogFormat) {
    init_tracing_at(format, "info");
}

/// Logging at `level` unless `NIGHTINGALE_LOG` names a filter.
fn init_tracing_at(format: LogFormat, level: &str) {
    let filter =
        EnvFilter::try_from_env("NIGHTINGALE_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    // Colour only on a terminal: logs written to a file or a pipe carry no escape codes.
    // A log line that cannot be written is dropped: by default the formatter reports it with
    // `eprintln!`, which panics when stderr is a pipe whose reader has gone (a red-team
    // finding: the server then died at start-up, or over TLS ignored SIGTERM for good, the
    // shutdown's log line panicking before the graceful shutdown began).
    // One event, one line: a value a peer sent cannot start a line of its own (log_line.rs).
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colours)
        .log_internal_errors(false)
        .with_writer(nightingale::log_line::OneLineStderr { colours });
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Takes `<data-dir>/serve.lock` (created owner-only), exclusively (`flock`); the file is
/// returned and must be kept open.
/// Locks `dir` (`what`, set by `flag`) for this server: the lock is the file `name` in it,
/// held exclusive until the file is dropped. The folder is made if missing (owner only).
fn lock_folder(
    dir: &std::path::Path,
    name: &str,
    what: &str,
    flag: &str,
) -> anyhow::Result<std::fs::File> {
    own_folder(dir, what, flag)?;
    let path = dir.join(name);
    let file = nightingale_models::open_lock_file(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "the {what} {} is in use by another server (it holds {}): give each server its own {flag}",
            dir.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(anyhow::anyhow!(e).context(format!("cannot lock {}", path.display())))
        }
    }
}

/// Makes `dir` (0700) where it is missing and narrows it to its owner where it is there;
/// a shared folder (sticky, writable by all) is refused.
fn own_folder(dir: &std::path::Path, what: &str, flag: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the {what} {}", dir.display()))?;
    // One made beforehand (a package's `mkdir /var/lib/nightingale`, 0755) is its owner's
    // alone too: it holds patient data (a review found the results store readable by all).
    // The folder a link names (the link itself has no mode of its own to narrow).
    let real = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    nightingale_dicom::spool::narrow(&real, 0o700).with_context(|| {
        format!(
            "cannot make the {what} {} its owner's alone ({flag})",
            dir.display()
        )
    })
}

fn open_audit(config: &AuditConfig) -> anyhow::Result<AuditLog> {
    use nightingale::audit::{jsonl, postgres::PostgresStore, sqlite::SqliteStore};
    let store: Box<dyn nightingale::audit::AuditStore> = match config {
        AuditConfig::Jsonl {
            path,
            rotate_bytes,
            fsync,
        } => Box::new(jsonl::JsonLinesStore::open(
            path,
            jsonl::Options {
                fsync: *fsync,
                rotate_bytes: *rotate_bytes,
            },
        )?),
        AuditConfig::Sqlite { path, fsync } => Box::new(SqliteStore::open(path, *fsync)?),
        AuditConfig::Postgres { url } => Box::new(PostgresStore::open(url)?),
    };
    Ok(AuditLog::start(store)?)
}

async fn serve(
    config: ServeConfig,
    audit: AuditLog,
    tls: Option<Arc<rustls::ServerConfig>>,
    start: nightingale::audit::AuditEvent,
) -> anyhow::Result<Stopped> {
    tracing::info!(
        ?config,
        "starting nightingale {}",
        env!("CARGO_PKG_VERSION")
    );
    catch_file_size_signal();
    // SIGTERM, Ctrl-C and SIGHUP are handled from here on, start-up included: they were
    // handled only once start-up had done its slow steps, so a SIGHUP then ended the server
    // (its default action) and a SIGTERM waited for the end of a re-indexing (a review's
    // finding). Without TLS there is nothing to reload, but a SIGHUP (a `systemctl reload`, a
    // log rotation hook) must not end the server either.
    let stop = Stop::install();
    // Held DICOM records (an earlier run's, or this one's) go to the trail once it can
    // take them; a record cut short by the stop is written again at the next start.
    if let Some(held) = audit.held() {
        tokio::spawn(held.clone().replay_forever(audit.clone()));
    }
    #[cfg(unix)]
    let _ignore_hangups = log_sighup(tls.is_some());
    let load_options = RepositoryOptions {
        backend: config.backend,
        intra_op_threads: config.intra_op_threads,
        execution_provider: config.execution_provider,
        ort_library: config.ort_library.clone(),
        tract_kernels: config.tract_kernels,
        max_working_bytes: config.max_inference_bytes,
        max_engine_threads: config.max_engine_threads,
        instance_limit: 0,
        signatures: config.signatures.clone(),
        promotion: None,
        releases: None,
        pins: None,
        metrics_purpose: None,
        probe: nightingale::probe_command(),
    };
    // Validation runs load versions that have no report yet: without the deployment policy,
    // and without the release ledger (a validation run serves nothing).
    let validation_options = load_options.clone();
    let ledger_path = config.data_dir.join("releases.json");
    let ledger = nightingale_models::releases::ReleaseLedger::open(&ledger_path)
        .map_err(|e| anyhow::anyhow!("cannot read the release ledger: {e}"))?;
    let pins = nightingale_models::releases::PinLedger::open(&config.data_dir.join("pins.json"))
        .map_err(|e| anyhow::anyhow!("cannot read the rollback pins: {e}"))?;
    let load_options = RepositoryOptions {
        promotion: config.require_validation.clone().map(|dir| {
            tracing::info!(reports = %dir.display(), "versions serve only with a passing validation report");
            nightingale::validate::require_validation(dir)
        }),
        releases: Some(Arc::new(ledger)),
        pins: Some(Arc::new(pins)),
        ..load_options
    };
    let repository = Arc::new(Repository::new(
        config.repository.clone(),
        load_options.clone(),
    ));
    tracing::info!(store = %audit.location(), "audit trail open");
    // The trail says which key seals the digests of the records after this one. A trail that
    // cannot be written now is not fatal: readiness says so, and every request is refused
    // until it can be.
    if let Err(e) = audit.record(start).await {
        tracing::warn!(error = %e, "the start record could not be written to the audit trail");
    }
    log_access(&config);
    let state = AppState::new(
        repository.clone(),
        audit,
        HttpConfig {
            max_body_bytes: config.max_body_bytes,
            admin_token: config.admin_token.clone(),
            auth: config.auth.clone(),
            request_timeout: config.request_timeout,
            max_inflight_bytes: config.max_inflight_bytes,
            max_inflight_requests: config.max_inflight_requests,
            max_open_requests: config.max_open_requests,
            max_open_requests_per_client: Some(config.max_open_requests_per_client),
            explain: config.explain,
        },
        Some(http::install_recorder()),
    );
    // The listeners serve from here on, while the stores open: until they are, every route
    // but the health checks and the metrics answers 503 "starting" (liveness probes timed out
    // while a spool of thousands of files found without its index was indexed again, and an
    // orchestrator restarting the server on them never let it finish: a review's finding).
    state.set_starting(true);
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.http_addr))?;
    let local_addr = listener.local_addr()?;
    match tls {
        None => tracing::info!(addr = %local_addr, "listening (KServe v2 HTTP)"),
        Some(_) => tracing::info!(addr = %local_addr, "listening (KServe v2 HTTPS)"),
    }
    // KServe v2 gRPC (issue 13) on its own port, with the same TLS settings as HTTP.
    #[cfg(not(feature = "grpc"))]
    if config.grpc_addr.is_some() {
        anyhow::bail!(
            "--grpc-addr: this nightingale was built without gRPC (cargo build --features grpc)"
        );
    }
    #[cfg(feature = "grpc")]
    let grpc_listener = match config.grpc_addr {
        None => None,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--grpc-addr)"))?;
            let at = listener.local_addr()?;
            match tls {
                None => tracing::info!(addr = %at, "listening (KServe v2 gRPC, plaintext h2c)"),
                Some(_) => tracing::info!(addr = %at, "listening (KServe v2 gRPC over TLS)"),
            }
            Some(listener)
        }
    };
    // One TLS configuration for both listeners, and one reload task for it: each listener
    // reloaded on its own, so a SIGHUP during a CA file's rewrite could leave one listener on
    // the old CAs while the log said they were reloaded (a re-attack's finding).
    let tls = tls.map(axum_server::tls_rustls::RustlsConfig::from_config);
    #[cfg(unix)]
    let _reload = match (&tls, &config.tls) {
        (Some(rustls), Some(settings)) => Some(tokio::spawn(nightingale::tls::reload_on_sighup(
            settings.clone(),
            rustls.clone(),
        ))),
        _ => None,
    };
    // A response the client takes nothing of is dropped after the stall timeout, or the
    // request deadline when shorter (a client holding a large answer unread held its
    // budget for 120 s whatever `--request-timeout-secs` said: a review's finding).
    let send_stall = config
        .request_timeout
        .min(http::idle::SEND_STALL_TIMEOUT)
        .max(std::time::Duration::from_secs(1));
    let max_connections = (
        config.max_connections,
        config.max_connections_per_client,
        send_stall,
    );
    let http_server = tokio::spawn(serve_router(
        listener,
        http::app(state.clone()),
        tls.clone(),
        false,
        max_connections,
        stop.clone(),
    ));
    #[cfg(feature = "grpc")]
    let grpc_server = grpc_listener.map(|listener| {
        tokio::spawn(serve_router(
            listener,
            http::grpc::router(state.clone()),
            tls,
            true,
            max_connections,
            stop.clone(),
        ))
    });
    #[cfg(not(feature = "grpc"))]
    let grpc_server: Option<tokio::task::JoinHandle<anyhow::Result<()>>> = None;
    // Either server failing ends the process, as it did when both ran in one `try_join!`.
    let servers = async move {
        let http = async { http_server.await? };
        let grpc = async {
            match grpc_server {
                Some(server) => server.await?,
                None => Ok(()),
            }
        };
        tokio::try_join!(http, grpc).map(|_| ())
    };
    tokio::pin!(servers);

    // The slow steps (stores checked and opened, a spool indexed again, validation runs
    // listed again, JWKS fetched), each on the blocking pool where it blocks; a stop asked
    // meanwhile ends the server without waiting for them (the spool and the stores are
    // crash-safe: a re-indexing cut short starts again at the next start).
    let running = tokio::select! {
        // The stop first: the listeners end on it too (or on an error of their own).
        biased;
        () = stop.requested() => {
            servers.await?;
            tracing::info!("stopped during start-up");
            return Ok(Stopped::DuringStartUp);
        }
        served = &mut servers => {
            served?;
            tracing::info!("stopped during start-up");
            return Ok(Stopped::DuringStartUp);
        }
        started = start_services(&config, &state, validation_options, &stop) => started?,
    };

    // Live at once; ready when the initial load is done (failed bundles are reported, not
    // fatal). The poller starts from what the initial load saw.
    let loader = {
        let state = state.clone();
        let poll = config.repository_poll;
        tokio::spawn(async move {
            let repository = state.repository.clone();
            let seen = tokio::task::spawn_blocking(move || repository.fingerprints())
                .await
                .unwrap_or_default();
            nightingale::deploy::load_all(&state).await;
            state.set_ready(true);
            if let Some(interval) = poll {
                tracing::info!(
                    interval_ms = interval.as_millis() as u64,
                    "watching the model repository"
                );
                nightingale::deploy::poll(state, interval, seen).await;
            }
        })
    };
    servers.await?;
    // The DICOM SCP and the pipeline stop with the listeners (each within its grace, from
    // the same signal): their associations' ends and the deliveries under way are recorded
    // before the audit trail's last records below.
    let running = running.drained().await;
    // The last second's unauthenticated CDS refusals, counted and not yet written.
    state.flush_held_audit().await;
    // Validation runs write inference records to the audit trail: they stop before the
    // server says it has (a run left going kept a "stopped" process writing the trail
    // beside the next server's, forking the chain). A run in a bootstrap gets a bounded
    // wait; the process then exits without it (`main`'s runtime shutdown is bounded too).
    if let Some(validation) = state.validation() {
        let stopped = validation.stop_all();
        let deadline = tokio::time::Instant::now() + VALIDATION_STOP_GRACE;
        while validation.working() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        if stopped > 0 || validation.working() > 0 {
            tracing::info!(
                stopped,
                still_working = validation.working(),
                "validation runs stopped for shutdown"
            );
        }
    }
    loader.abort();
    running.abort();
    tracing::info!("stopped");
    Ok(Stopped::Serving)
}

/// When `serve` stopped.
enum Stopped {
    /// Before start-up was done (a step may still run on the blocking pool).
    DuringStartUp,
    /// After serving.
    Serving,
}

/// The tasks that [`start_services`] started beside the listeners, stopped at shutdown:
/// `draining` end by themselves on the stop signal (the DICOM SCP, the pipeline), `tasks`
/// are aborted.
struct Running {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    draining: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Waits for the tasks that end by themselves (each bounds its own wait).
    async fn drained(mut self) -> Running {
        for task in self.draining.drain(..) {
            let _ = task.await;
        }
        self
    }

    fn abort(self) {
        for task in self.tasks {
            task.abort();
        }
    }
}

/// Runs `step` on the blocking pool (start-up's steps that read files or databases: a spool
/// indexed again took seconds on the async runtime's threads, which answer the health
/// checks meanwhile).
async fn blocking<T: Send + 'static>(
    step: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(step).await?
}

/// Start-up's slow steps, while the listeners answer "starting": CDS Hooks and its store,
/// validation runs, the DICOM spool, DICOMweb, retention, the pipeline and the SCP.
async fn start_services(
    config: &ServeConfig,
    state: &Arc<AppState>,
    validation_options: RepositoryOptions,
    stop: &Stop,
) -> anyhow::Result<Running> {
    let mut tasks = vec![];
    let mut draining = vec![];
    // CDS Hooks (issue 10): the services, the trusted EHRs' keys.
    let cds = {
        let settings = config.cds.clone();
        let repository = state.repository.clone();
        let store = config.data_dir.join("cds");
        blocking(move || {
            nightingale::cds::Cds::new(&settings, &repository)
                .context("cannot start the CDS Hooks service")?
                .with_store(nightingale::cds_store::CdsStore::open(&store)?)
                .context("cannot open the CDS feedback store")
        })
        .await?
    };
    tracing::info!(
        services = cds.services.iter().count(),
        trusted_issuers = config.cds.trust.len(),
        "CDS Hooks at /cds-services{}",
        if config.cds.trust.is_empty() {
            " (no --cds-trust: every call answers 401)"
        } else {
            ""
        }
    );
    state.set_cds(cds);
    // JWKS by URL: fetched before serving (a failure is logged; its tokens are refused until
    // a later fetch works), then every JWKS_REFRESH, and when a token names an unknown key.
    if state.cds().verifier.urls().next().is_some() {
        state.cds().refresh_jwks().await;
        let st = state.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(nightingale::cds::JWKS_REFRESH).await;
                st.cds().refresh_jwks().await;
            }
        }));
    }
    // Validation runs (issue 11): role researcher; each run loads its own copy of the bundle.
    let validation = {
        let root = config.validation_root.clone();
        let data_dir = config.data_dir.clone();
        let max_upload = config.validation_max_upload_bytes;
        let max_run = config.validation_max_run;
        blocking(move || {
            let validation =
                http::validation::Validation::new(root, &data_dir, max_upload, validation_options)
                    .with_max_run(max_run);
            validation.remove_abandoned_uploads();
            validation.restore_runs();
            Ok(validation)
        })
        .await?
    };
    state.set_validation(validation);

    // ---- DICOM ingest (issue 8): the SCP runs beside HTTP until shutdown; DICOMweb shares
    // its spool (or has one of its own with --dicom-spool alone) ----
    // DICOMweb's settings exist whenever a spool is configured (with or without the SCP) and
    // carry the spool's path, options, retention and audit settings.
    let spool = match &config.dicomweb {
        None => None,
        Some(web) => {
            let (path, options) = (web.spool.clone(), web.spool_options.clone());
            let (spool, recovery) = blocking(move || {
                nightingale_dicom::Spool::open(&path, options)
                    .with_context(|| format!("cannot open the DICOM spool {}", path.display()))
            })
            .await?;
            tracing::info!(spool = %spool.root().display(), ?recovery, "DICOM spool open");
            // From the start, not only once something is stored: a spool already near its
            // high-water mark after a restart can alert before a store is refused.
            if let Ok(free) = spool.free_bytes() {
                metrics::gauge!("nightingale_dicom_spool_free_bytes").set(free as f64);
            }
            Some(Arc::new(spool))
        }
    };
    if let (Some(web), Some(spool)) = (config.dicomweb.clone(), spool.clone()) {
        state.set_dicomweb(http::dicomweb::DicomWeb::new(
            spool,
            web.limits,
            web.audit_uids,
        ));
        tracing::info!("DICOMweb on: STOW-RS and QIDO-RS at /dicomweb");
    }
    // Retention (OPS slice) runs on the spool whichever way it was opened; every purge's
    // record reaches the audit trail through the spool's index.
    if let (Some(spool), Some(w)) = (&spool, &config.dicomweb) {
        if let Some(retention) = dicom_cli::retention_task(spool.clone(), w.retention) {
            tasks.push(retention);
        }
        tasks.push(dicom_cli::purge_audit_task(
            spool.clone(),
            state.audit.clone(),
            w.audit_uids,
        ));
    }
    // ---- DICOM pipeline (issue 9): series in the spool → routed bundles → SR/SC to PACS ----
    if let (Some(settings), Some(spool)) = (&config.pipeline, &spool) {
        let mut pc = nightingale::pipeline::PipelineConfig::new(config.data_dir.join("results"));
        pc.destinations = settings.destinations.clone();
        pc.quiet = settings.quiet;
        pc.complete_at = settings.complete_at;
        pc.late = settings.late;
        pc.calling_ae_title = settings.calling_ae_title.clone();
        pc.routes = settings.routes.clone();
        pc.retention = config.dicomweb.as_ref().and_then(|w| w.retention);
        if let Some(w) = &config.dicomweb {
            pc.audit_uids = w.audit_uids;
        }
        // -- results delivery retries (issue 9, PEERS slice) --
        if let Some(retry) = settings.retry {
            pc.backoff = retry;
        }
        if let Some(n) = settings.max_attempts {
            pc.max_attempts = n;
        }
        if let Some(t) = settings.exchange_timeout {
            pc.exchange_timeout = t;
        }
        let pipeline = {
            let (spool, state) = (spool.clone(), state.clone());
            blocking(move || {
                nightingale::pipeline::Pipeline::open(pc, spool, state)
                    .context("cannot start the DICOM pipeline")
            })
            .await?
        };
        state.set_results(http::results::Results {
            store: pipeline.store.clone(),
            dir: pipeline.config.results_dir.clone(),
        });
        tracing::info!(
            destinations = settings.destinations.len(),
            quiet_secs = settings.quiet.as_secs_f64(),
            "DICOM pipeline on: results at /results/studies/{{study}}"
        );
        draining.push(tokio::spawn(pipeline.run(stop.clone().requested_owned())));
    }
    // ---- end DICOM pipeline ----
    // Every route's store is open: the HTTP routes serve from here (before the SCP says it
    // listens, so that a client waiting for that line finds them open).
    state.set_starting(false);
    if let (Some(dicom), Some(spool)) = (config.dicom.clone(), spool) {
        // Every association and instance is audited (OPS slice).
        let sink =
            nightingale::audit::dicom::DicomAuditSink::new(state.audit.clone(), dicom.audit_uids);
        let scp = nightingale_dicom::Scp::bind(dicom.scp.clone(), spool)
            .await
            .context("the DICOM SCP (dicom_addr, --dicom-addr, --dicom-port)")?
            .with_events(sink.clone());
        tracing::info!(
            addr = %scp.local_addr()?,
            ae_title = %dicom.scp.ae_title,
            "listening (DICOM)"
        );
        let stopped = stop.clone().requested_owned();
        draining.push(tokio::spawn(async move {
            scp.serve(stopped).await;
            // The refusals of the last second, held back, are not lost with the process.
            sink.flush_refused().await;
        }));
    }
    // ---- end DICOM ----
    Ok(Running { tasks, draining })
}

/// The audit record of this start ([`nightingale::audit::EventKind::ServerStart`]).
fn start_record(key: &nightingale::audit::DigestKey, made: bool) -> nightingale::audit::AuditEvent {
    let mut event = nightingale::audit::AuditEvent::blank(
        nightingale::audit::EventKind::ServerStart,
        uuid::Uuid::new_v4().to_string(),
        Some("startup".to_owned()),
    );
    event.detail = Some(format!(
        "nightingale {}; tensor digests sealed with audit digest key {} ({})",
        env!("CARGO_PKG_VERSION"),
        key.id(),
        if made {
            "made at this start"
        } else {
            "read from its file"
        }
    ));
    event
}

/// Says at start-up who may do what (never a key or token), and warns loudly when
/// `--insecure` opened a network address to anonymous callers.
fn log_access(config: &ServeConfig) {
    use nightingale::http::auth::{AuthConfig, Role, Roles, is_loopback};
    let auth: &AuthConfig = &config.auth;
    let anonymous = auth.anonymous_roles();
    let keys: Vec<String> = auth
        .api_keys
        .iter()
        .map(|k| format!("{} ({})", k.name, k.roles))
        .chain(
            config
                .admin_token
                .as_ref()
                .map(|_| "admin-token (admin)".to_owned()),
        )
        .collect();
    tracing::info!(
        anonymous_roles = %anonymous,
        api_keys = %keys.join(", "),
        jwt_issuer = auth.jwt.as_ref().map(|j| j.issuer.as_str()).unwrap_or("-"),
        jwt_keys = %auth.jwt.as_ref().map(|j| j.key_ids().join(", ")).unwrap_or_default(),
        "access control"
    );
    let admin_possible = auth.jwt.is_some()
        || config.admin_token.is_some()
        || auth.api_keys.iter().any(|k| k.roles.contains(Role::Admin));
    if !admin_possible {
        tracing::info!("model control (admin) is disabled: no admin key configured");
    }
    // An empty variable is no token (a deployment template whose secret was not filled in
    // disabled model control with nothing said but the line above).
    if config.admin_token.is_none()
        && std::env::var_os("NIGHTINGALE_ADMIN_TOKEN").is_some_and(|v| v.is_empty())
    {
        tracing::warn!(
            "NIGHTINGALE_ADMIN_TOKEN is set but empty: it is no admin token (model load/unload needs an admin key)"
        );
    }
    // What else --insecure relaxed, each said at every start (only the HTTP and gRPC
    // listeners were: a DICOM SCP open to any calling AE, an EHR's token sent in clear text,
    // went unsaid, a review's finding).
    if let Some(dicom) = &config.dicom
        && !dicom.scp.addr.ip().is_loopback()
        && dicom.scp.allowed.is_none()
    {
        tracing::warn!(
            addr = %dicom.scp.addr,
            "INSECURE: the DICOM SCP on {} accepts associations from any calling AE on the network (--insecure, no --dicom-allowed-ae): anyone who can connect can store instances",
            dicom.scp.addr
        );
    }
    for url in config
        .cds
        .fhir_servers
        .iter()
        .filter(|u| u.starts_with("http://") && !nightingale::config::url_is_loopback(u))
    {
        let url = nightingale::cds::without_userinfo(url);
        tracing::warn!(
            fhir_server = %url,
            "INSECURE: FHIR fetches to {url} send the EHR's access token in clear text (--insecure)"
        );
    }
    // (`any_host`: trusted issuers on a network address without --cds-base-url.)
    if config.cds.any_host {
        tracing::warn!(
            "INSECURE: CDS Hooks on a network address without --cds-base-url: a token's audience is checked against the Host header (--insecure), so a token minted for another service may be replayed here"
        );
    }
    // Every listener facing the network where anyone who connects holds roles (only
    // `metrics` is allowed there without --insecure: see AuthConfig::check_bind).
    for addr in std::iter::once(config.http_addr).chain(config.grpc_addr) {
        if !is_loopback(addr) && anonymous != Roles::NONE {
            tracing::warn!(
                %addr,
                anonymous_roles = %anonymous,
                insecure = config.insecure,
                "{addr} is reachable from the network and anyone who can connect has the roles {anonymous} without credentials{}",
                if config.insecure {
                    " (INSECURE: --insecure is set). Configure [[auth.api_keys]] or [auth.jwt] before serving patient data."
                } else {
                    ""
                }
            );
        }
    }
}

/// Serves `app` until the shutdown signal: over TLS when it is configured, else plaintext
/// (HTTP/1.1, or HTTP/2 with prior knowledge: gRPC's h2c), with TCP_NODELAY when `nodelay`
/// (gRPC: a response is headers, data and trailers frames, which Nagle's algorithm could hold
/// back behind a delayed ACK).
async fn serve_router(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    tls: Option<axum_server::tls_rustls::RustlsConfig>,
    nodelay: bool,
    (max_connections, max_per_client, send_stall): (usize, usize, std::time::Duration),
    stop: Stop,
) -> anyhow::Result<()> {
    match tls {
        Some(rustls_config) => {
            serve_tls(
                listener,
                app,
                rustls_config,
                (max_connections, max_per_client, send_stall),
                stop,
            )
            .await
        }
        None => {
            let limits = http::serve::ConnectionLimits {
                nodelay,
                max_connections,
                max_per_client,
                send_stall,
                ..Default::default()
            };
            Ok(http::serve::serve(listener, app, limits, stop.requested_owned()).await?)
        }
    }
}

/// HTTPS (HTTP/2 by ALPN, else HTTP/1.1) on `rustls_config` (reloaded on SIGHUP by `serve`'s
/// one reload task) with the client certificate, when verified, in each request's
/// extensions.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    rustls_config: axum_server::tls_rustls::RustlsConfig,
    (max_connections, max_per_client, send_stall): (usize, usize, std::time::Duration),
    stop: Stop,
) -> anyhow::Result<()> {
    let handle = axum_server::Handle::new();
    let shutdown = {
        let handle = handle.clone();
        tokio::spawn(async move {
            stop.requested().await;
            handle.graceful_shutdown(None);
        })
    };
    let mut server = axum_server::from_tcp(listener.into_std()?)?;
    // The plaintext loop's header deadline and HTTP/2 keep-alive (src/http/serve.rs); the
    // TLS handshake has its own deadline in the acceptor.
    http::serve::ConnectionLimits::default().configure(server.http_builder());
    let result = server
        .acceptor(
            nightingale::tls::ClientCertAcceptor::new(rustls_config)
                .with_connection_cap(handle.clone(), max_connections)
                .with_client_cap(max_per_client)
                .with_send_stall(send_stall),
        )
        .accept_error_handler(nightingale::tls::connection_refused)
        .handle(handle)
        .serve(app.into_make_service())
        .await;
    shutdown.abort();
    Ok(result?)
}

/// `audit verify`'s line for a verified trail: records, files, where it starts when older
/// files are not here, its last record, and `anchored` (what the anchor says).
fn verified_line(what: &str, summary: &nightingale::audit::ChainSummary, anchored: &str) -> String {
    let from = match summary.first_seq {
        Some(s) if s > 0 => format!(" (from sequence {s}: the files before it are not here)"),
        _ => String::new(),
    };
    let files = match summary.files.len() {
        0 | 1 => String::new(),
        n => format!(" in {n} files"),
    };
    let last = match &summary.tail {
        Some(t) => format!("; last record {} {}", t.seq, t.hash),
        None => String::new(),
    };
    format!(
        "ok   {what}: {} records{files}, hash chain intact{from}{last}{anchored}",
        summary.records
    )
}

/// Keeps a SIGHUP from ending the server (its default action) from the moment this returns:
/// without TLS each is logged (nothing to reload); with TLS `serve`'s reload task takes them
/// once it runs (tokio's handler stays installed for the life of the process, so one in
/// between is ignored).
#[cfg(unix)]
fn log_sighup(tls: bool) -> Option<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(_) if tls => None,
        Ok(mut hangups) => Some(tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                tracing::info!("SIGHUP: no TLS configured, nothing to reload; serving on");
            }
        })),
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP");
            None
        }
    }
}

/// The request to stop (SIGTERM, or Ctrl-C / SIGINT), shared by the listeners and start-up.
#[derive(Clone)]
struct Stop(tokio::sync::watch::Receiver<bool>);

impl Stop {
    /// Installs the handlers; they are in place when this returns.
    fn install() -> Stop {
        let (asked, stop) = tokio::sync::watch::channel(false);
        let signals = Self::signals();
        tokio::spawn(async move {
            match signals {
                Ok(signals) => {
                    signals.await;
                    tracing::info!(
                        "shutting down: finishing in-flight requests (a second SIGTERM or Ctrl-C stops at once)"
                    );
                    let _ = asked.send(true);
                    // A second signal ends the process without waiting for the drain (a
                    // slow client held a stop for its whole grace, and a second Ctrl-C was
                    // ignored: a review's finding). What was answered is on disk: records
                    // are durable before their answers, the spool before its acknowledgement.
                    if let Ok(again) = Self::signals() {
                        again.await;
                        tracing::warn!(
                            "second stop signal: exiting now, without waiting for in-flight work"
                        );
                        std::process::exit(1);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM and SIGINT");
                }
            }
            // The sender stays: a closed channel would read as a stop.
            std::future::pending::<()>().await;
        });
        Stop(stop)
    }

    /// The first SIGTERM or SIGINT, its handlers installed before this returns.
    #[cfg(unix)]
    fn signals() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = interrupt.recv() => {}
            }
        })
    }

    #[cfg(not(unix))]
    fn signals() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }

    /// Resolves once a stop was asked (at once if it already was).
    async fn requested(&self) {
        let mut stop = self.0.clone();
        if stop.wait_for(|asked| *asked).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// [`Stop::requested`] for a listener that keeps the future.
    async fn requested_owned(self) {
        self.requested().await;
    }
}

/// Whether every bundle and version listed verifies (a refused one makes the command exit 1,
/// as `models check` does: it exited 0, and a script using it as a health check was told all
/// was well).
fn list(
    root: &std::path::Path,
    policy: &nightingale_models::SignaturePolicy,
) -> anyhow::Result<bool> {
    let mut all_verified = true;
    let repository = Repository::new(root, RepositoryOptions::default());
    let names = repository.scan()?;
    let passed_over = repository.passed_over();
    if names.is_empty() {
        println!(
            "{}",
            printable(&format!("no bundles under {}", root.display()))
        );
    }
    println!("MODEL\tVERSION\tSTATE\tSIGNATURE\tSELF-TEST\tDESCRIPTION");
    for (name, reason) in &passed_over {
        println!(
            "{}",
            printable(&format!("{name}\t-\tNOT A BUNDLE\t-\t-\t{reason}"))
        );
        all_verified = false;
    }
    for name in names {
        let bundle = match Bundle::open_with(&root.join(&name), policy) {
            Ok(bundle) => bundle,
            Err(e) => {
                println!("{}", printable(&format!("{name}\t-\tREFUSED\t-\t-\t{e}")));
                all_verified = false;
                continue;
            }
        };
        let signature = signature_column(&bundle.signature);
        let selftest = match &bundle.manifest.selftest {
            Some(_) => "declared (models check runs it)",
            None => "none",
        };
        match bundle.versions_on_disk() {
            Ok(versions) if !versions.is_empty() => {
                for v in versions {
                    let state = match bundle.verify(v) {
                        Ok(()) => "VERIFIED".to_owned(),
                        Err(e) => {
                            all_verified = false;
                            format!("REFUSED: {e}")
                        }
                    };
                    println!(
                        "{}",
                        printable(&format!(
                            "{name}\t{v}\t{state}\t{signature}\t{selftest}\t{}",
                            bundle.manifest.description
                        ))
                    );
                }
            }
            Ok(_) => println!("{name}\t-\tNO VERSIONS\t{signature}\t-\t-"),
            Err(e) => {
                all_verified = false;
                println!(
                    "{}",
                    printable(&format!("{name}\t-\tREFUSED\t{signature}\t-\t{e}"))
                );
            }
        }
    }
    Ok(all_verified)
}

fn signature_column(status: &nightingale_models::SignatureStatus) -> String {
    use nightingale_models::SignatureStatus;
    match status {
        SignatureStatus::Unsigned => "unsigned".into(),
        SignatureStatus::Verified { key_id, .. } => format!("verified {key_id}"),
        SignatureStatus::UntrustedKey { key_id } => format!("untrusted {key_id}"),
    }
}

/// The bundle folders a path names: itself, or the bundles of a repository.
fn bundle_dirs(path: &std::path::Path) -> anyhow::Result<Vec<PathBuf>> {
    if path.join(nightingale_models::MANIFEST_FILE).is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let repository = Repository::new(path, RepositoryOptions::default());
    Ok(repository
        .scan()?
        .into_iter()
        .map(|n| path.join(n))
        .collect())
}

/// Signs each bundle. Returns whether all were signed.
fn sign(key: &std::path::Path, paths: &[PathBuf]) -> anyhow::Result<bool> {
    let password = std::env::var("NIGHTINGALE_SIGNING_PASSWORD").ok();
    let key = nightingale_models::SigningKey::from_file(key, password)?;
    let mut all_ok = true;
    for path in paths {
        let bundles = bundle_dirs(path)?;
        if bundles.is_empty() {
            println!("FAIL {}: no bundle.toml found", path.display());
            all_ok = false;
        }
        for dir in bundles {
            match Bundle::open(&dir).and_then(|b| b.sign(&key)) {
                Ok(written) => println!("ok   {}: signed by key {}", written.display(), key.id()),
                Err(e) => {
                    all_ok = false;
                    println!("{}", printable(&format!("FAIL {}: {e}", dir.display())));
                }
            }
        }
    }
    Ok(all_ok)
}

/// Checks each bundle; prints one line per version. Returns whether all passed.
fn check(paths: &[PathBuf], policy: &nightingale_models::SignaturePolicy) -> anyhow::Result<bool> {
    let mut all_ok = true;
    for path in paths {
        let bundles = bundle_dirs(path)?;
        if !path.join(nightingale_models::MANIFEST_FILE).is_file() {
            for (name, reason) in Repository::new(path, RepositoryOptions::default()).passed_over()
            {
                println!(
                    "{}",
                    printable(&format!(
                        "FAIL {}: not a bundle: {reason}",
                        path.join(name).display()
                    ))
                );
                all_ok = false;
            }
        }
        if bundles.is_empty() {
            println!(
                "{}",
                printable(&format!("FAIL {}: no bundle.toml found", path.display()))
            );
            all_ok = false;
        }
        for dir in bundles {
            let result = Bundle::open_with(&dir, policy).and_then(|bundle| {
                let mut lines = vec![format!(
                    "ok   {}: {}",
                    bundle.manifest.name, bundle.signature
                )];
                let versions = bundle.versions_on_disk()?;
                if versions.is_empty() {
                    return Err(nightingale_models::BundleError::NoVersions { path: dir.clone() });
                }
                // What `serve` would refuse by its default thread cap, for this bundle alone
                // (`check` said ok on a bundle no server with the default cap serves: a
                // red-team finding).
                let selected = bundle.selected_versions()?.len();
                let instances = bundle.manifest.batching.instances;
                let limit = nightingale_models::DEFAULT_MAX_ENGINE_THREADS;
                if selected.saturating_mul(instances) > limit {
                    return Err(nightingale_models::BundleError::EngineThreads {
                        path: dir.join(nightingale_models::MANIFEST_FILE),
                        versions: selected,
                        instances,
                        asked: selected.saturating_mul(instances),
                        others: 0,
                        limit,
                    });
                }
                for v in versions {
                    let options = RepositoryOptions {
                        probe: nightingale::probe_command(),
                        ..RepositoryOptions::default()
                    };
                    let loaded = bundle.load_version(v, &options)?;
                    let meta = loaded.worker.metadata();
                    let selftest = match &loaded.selftest {
                        Some(report) => report.to_string(),
                        None => format!("no self-test, runs on {}", loaded.worker.backend()),
                    };
                    lines.push(format!(
                        "ok   {} version {v}: checksums verified, {selftest} ({} inputs, {} outputs)",
                        bundle.manifest.name,
                        meta.inputs.len(),
                        meta.outputs.len()
                    ));
                }
                lines.extend(todo_warnings(&bundle.manifest));
                Ok(lines)
            });
            match result {
                Ok(lines) => lines.iter().for_each(|l| println!("{}", printable(l))),
                Err(e) => {
                    all_ok = false;
                    println!("{}", printable(&format!("FAIL {}: {e}", dir.display())));
                }
            }
        }
    }
    Ok(all_ok)
}

/// `models check`'s warning per documentation field still holding a `TODO` placeholder.
fn todo_warnings(manifest: &nightingale_models::Manifest) -> Vec<String> {
    manifest
        .unfilled_fields()
        .into_iter()
        .map(|f| {
            format!(
                "warn {}: {f} is still a TODO placeholder: fill it in",
                manifest.name
            )
        })
        .collect()
}

fn parse_task(s: &str) -> Result<nightingale_models::TaskKind, String> {
    use serde::Deserialize;
    use serde::de::IntoDeserializer;
    nightingale_models::TaskKind::deserialize(s.into_deserializer())
        .map_err(|e: serde::de::value::Error| e.to_string())
}

/// `nightingale models init`: scaffolds the bundle, then prints what it wrote and what to do.
fn init_bundle(args: InitArgs) -> anyhow::Result<()> {
    use nightingale::config::BackendArg;
    use nightingale_inference::BackendKind;
    let backend = match args.backend {
        BackendArg::Tract => BackendKind::Tract,
        BackendArg::Ort => BackendKind::Ort,
    };
    if !backend.is_compiled() {
        anyhow::bail!(
            "backend {backend} is not compiled into this build (rebuild with --features {backend})"
        );
    }
    let options = nightingale_models::InitOptions {
        name: args.name,
        repository: args.repository,
        sample: args.sample,
        task: args.task,
        load: RepositoryOptions {
            backend,
            ort_library: args.ort_library,
            probe: nightingale::probe_command(),
            ..RepositoryOptions::default()
        },
    };
    if args.version.is_some() {
        return add_version(&args.model, &options, args.version);
    }
    let report = match nightingale_models::init(&args.model, &options) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1)
        }
    };
    for d in &report.disagreements {
        eprintln!("warning: {d}");
    }
    for note in &report.notes {
        eprintln!("note: {note}");
    }
    println!(
        "wrote {} (version 1, loaded on {}; model from {})",
        report.bundle_dir.display(),
        report.engine,
        if report.producer.is_empty() {
            "an unnamed producer"
        } else {
            &report.producer
        }
    );
    for (kind, specs) in [
        ("input ", &report.metadata.inputs),
        ("output", &report.metadata.outputs),
    ] {
        for s in specs {
            println!("  {kind} {:?} {} {:?}", s.name, s.datatype, s.shape);
        }
    }
    match &report.selftest {
        Some(st) => {
            println!("  {st}");
            // The rows ship with the bundle to every server that loads it (a review's
            // finding: the docs said self-test inputs hold no patient data).
            eprintln!(
                "note: the sample rows are stored as they are in {}/1/selftest.json and ship with the bundle: use synthetic or de-identified rows, never a patient's",
                report.bundle_dir.display()
            );
            println!(
                "hint: the self-test's reference outputs come from {} itself; for an independent \
                 reference run: models/train/selftest.py {} 1 --reuse-inputs --update-manifest \
                 (onnxruntime)",
                report.engine,
                report.bundle_dir.display()
            );
        }
        None => println!(
            "  no self-test (give --sample rows.csv, or add one with models/train/selftest.py)"
        ),
    }
    if !report.unfilled.is_empty() {
        println!(
            "todo: fill in {} in {}/bundle.toml; `nightingale models check` reports them until then",
            report.unfilled.join(", "),
            report.bundle_dir.display()
        );
    }
    println!(
        "next: once bundle.toml is final, sign it (the signature covers its text): \
         nightingale models sign --key KEY {}",
        report.bundle_dir.display()
    );
    Ok(())
}

/// `models init --version N`: a version added to an existing bundle.
fn add_version(
    model: &std::path::Path,
    options: &nightingale_models::InitOptions,
    version: Option<u64>,
) -> anyhow::Result<()> {
    let added = match nightingale_models::init::add_version(model, options, version) {
        Ok(added) => added,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1)
        }
    };
    let report = &added.report;
    for d in &report.disagreements {
        eprintln!("warning: {d}");
    }
    for note in &report.notes {
        eprintln!("note: {note}");
    }
    println!(
        "added version {} to {} (loaded on {})",
        added.version,
        report.bundle_dir.display(),
        report.engine
    );
    match (&report.selftest, added.selftest_from) {
        (Some(st), Some(from)) => println!("  {st}, on version {from}'s self-test inputs"),
        (Some(st), None) => println!("  {st}, on the sample rows"),
        (None, _) => println!("  no self-test"),
    }
    if let Some((from, to)) = added.release {
        println!("  release raised from {from} to {to}");
    }
    println!(
        "next: sign the new manifest (the signature covers its text{}): nightingale models sign --key KEY {}",
        if added.was_signed {
            "; the old signature no longer verifies, so servers that check signatures keep serving the earlier versions until then"
        } else {
            ""
        },
        report.bundle_dir.display()
    );
    println!(
        "next: under --require-validation, validate version {} (and every version that may serve or be rolled back to) against the new manifest",
        added.version
    );
    Ok(())
}
