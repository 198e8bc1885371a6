//! `nightingale`: the server and its command-line tools.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nightingale::audit::AuditLog;
use nightingale::config::{AuditConfig, LogFormat, ServeArgs, ServeConfig};
use nightingale::http::{self, AppState, HttpConfig};
use nightingale_models::{Bundle, Repository, RepositoryOptions};
use tracing_subscriber::EnvFilter;

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
    },
}

#[derive(Subcommand, Debug)]
enum ModelsCommand {
    /// List the bundles of a repository, their versions and whether they verify.
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = args.resolve()?;
            init_tracing(config.log_format);
            // Opened before the async runtime starts: the database clients block.
            let audit = open_audit(&config.audit)?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("ng-http")
                .build()?
                .block_on(serve(config, audit))
        }
        Command::Audit {
            command: AuditCommand::Verify { path, postgres_url },
        } => {
            let (what, result) = match (&postgres_url, &path) {
                (Some(url), _) => (
                    nightingale::audit::postgres::redact(url),
                    nightingale::audit::postgres::verify(url),
                ),
                (None, Some(path)) => {
                    (path.display().to_string(), nightingale::audit::verify(path))
                }
                (None, None) => unreachable!("clap requires a path or --postgres-url"),
            };
            match result {
                Ok(summary) => {
                    let from = match summary.first_seq {
                        Some(s) if s > 0 => {
                            format!(" (from sequence {s}: the files before it are not here)")
                        }
                        _ => String::new(),
                    };
                    let files = match summary.files.len() {
                        0 | 1 => String::new(),
                        n => format!(" in {n} files"),
                    };
                    println!(
                        "ok   {what}: {} records{files}, hash chain intact{from}",
                        summary.records
                    );
                    Ok(())
                }
                Err(e) => {
                    println!("FAIL {e}");
                    std::process::exit(1)
                }
            }
        }
        Command::Models { command } => {
            init_tracing(LogFormat::Text);
            match command {
                ModelsCommand::List { repository, trust } => list(&repository, &trust.policy()?),
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
            }
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter =
        EnvFilter::try_from_env("NIGHTINGALE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal: logs written to a file or a pipe carry no escape codes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
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

async fn serve(config: ServeConfig, audit: AuditLog) -> anyhow::Result<()> {
    tracing::info!(
        ?config,
        "starting nightingale {}",
        env!("CARGO_PKG_VERSION")
    );
    let repository = Arc::new(Repository::new(
        config.repository.clone(),
        RepositoryOptions {
            backend: config.backend,
            intra_op_threads: config.intra_op_threads,
            execution_provider: config.execution_provider,
            ort_library: config.ort_library.clone(),
            signatures: config.signatures.clone(),
        },
    ));
    tracing::info!(store = %audit.location(), "audit trail open");
    let state = AppState::new(
        repository.clone(),
        audit,
        HttpConfig {
            max_body_bytes: config.max_body_bytes,
            admin_token: config.admin_token.clone(),
            request_timeout: config.request_timeout,
            max_inflight_bytes: config.max_inflight_bytes,
            max_inflight_requests: config.max_inflight_requests,
        },
        Some(http::install_recorder()),
    );
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.http_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "listening (KServe v2 HTTP)");

    // ---- DICOM ingest (issue 8): the SCP runs beside HTTP until shutdown ----
    let dicom = match config.dicom.clone() {
        None => None,
        Some(dicom) => {
            let path = dicom.spool.clone();
            let (spool, recovery) = tokio::task::spawn_blocking(move || {
                nightingale_dicom::Spool::open(&path, dicom.spool_options.clone())
            })
            .await?
            .with_context(|| format!("cannot open the DICOM spool {}", dicom.spool.display()))?;
            tracing::info!(spool = %spool.root().display(), ?recovery, "DICOM spool open");
            let scp = nightingale_dicom::Scp::bind(dicom.scp.clone(), Arc::new(spool)).await?;
            tracing::info!(
                addr = %scp.local_addr()?,
                ae_title = %dicom.scp.ae_title,
                "listening (DICOM)"
            );
            Some(tokio::spawn(scp.serve(std::future::pending())))
        }
    };
    // ---- end DICOM ----

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
    axum::serve(listener, http::app(state))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    loader.abort();
    if let Some(dicom) = dicom {
        dicom.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

fn list(
    root: &std::path::Path,
    policy: &nightingale_models::SignaturePolicy,
) -> anyhow::Result<()> {
    let repository = Repository::new(root, RepositoryOptions::default());
    let names = repository.scan()?;
    if names.is_empty() {
        println!("no bundles under {}", root.display());
    }
    println!("MODEL\tVERSION\tSTATE\tSIGNATURE\tSELF-TEST\tDESCRIPTION");
    for name in names {
        let bundle = match Bundle::open_with(&root.join(&name), policy) {
            Ok(bundle) => bundle,
            Err(e) => {
                println!("{name}\t-\tREFUSED\t-\t-\t{e}");
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
                        Err(e) => format!("REFUSED: {e}"),
                    };
                    println!(
                        "{name}\t{v}\t{state}\t{signature}\t{selftest}\t{}",
                        bundle.manifest.description
                    );
                }
            }
            Ok(_) => println!("{name}\t-\tNO VERSIONS\t{signature}\t-\t-"),
            Err(e) => println!("{name}\t-\tREFUSED\t{signature}\t-\t{e}"),
        }
    }
    Ok(())
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
                    println!("FAIL {}: {e}", dir.display());
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
        if bundles.is_empty() {
            println!("FAIL {}: no bundle.toml found", path.display());
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
                for v in versions {
                    let loaded = bundle.load_version(v, &RepositoryOptions::default())?;
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
                Ok(lines)
            });
            match result {
                Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
                Err(e) => {
                    all_ok = false;
                    println!("FAIL {}: {e}", dir.display());
                }
            }
        }
    }
    Ok(all_ok)
}
