//! Operator tools of DICOM ingest (issue 8): `nightingale dicom echo|store` (a small SCU) and
//! `nightingale spool check|purge`, and the retention task of `serve`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};
use nightingale_dicom::maintenance::CheckOptions;
use nightingale_dicom::scu::{self, FileError, Part10File, ScuOptions, StoreFailure};

#[derive(Subcommand, Debug)]
pub enum DicomCommand {
    /// C-ECHO: check that a DICOM node answers (exit code 1 if not).
    Echo {
        #[command(flatten)]
        peer: PeerArgs,
    },
    /// C-STORE Part 10 files (folders are searched recursively; files in them that are not
    /// DICOM are skipped) over one association, each with its own SOP class and transfer
    /// syntax, sent as they are. One line per file; exit code 1 if any was not stored.
    Store {
        #[command(flatten)]
        peer: PeerArgs,
        /// Files and folders to send.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

/// Where and as whom to connect.
#[derive(Args, Debug)]
pub struct PeerArgs {
    /// The peer, HOST:PORT.
    #[arg(long)]
    addr: String,
    /// The peer's AE title.
    #[arg(long, default_value = "ANY-SCP")]
    called_ae: String,
    /// This node's AE title.
    #[arg(long, default_value = "NIGHTINGALE")]
    calling_ae: String,
    /// Largest PDU this node receives.
    #[arg(long, default_value_t = 65_536)]
    max_pdu: u32,
    /// Seconds to connect and associate.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout_secs: f64,
    /// Seconds to wait for each whole response (and each write).
    #[arg(long, default_value_t = 60.0)]
    timeout_secs: f64,
    /// Seconds for one whole C-STORE: the request, the data set and the response (`store`
    /// only; an echo is bounded by --timeout-secs).
    #[arg(long, default_value_t = 300.0)]
    exchange_timeout_secs: f64,
}

impl PeerArgs {
    fn options(&self) -> anyhow::Result<ScuOptions> {
        let secs = |v: f64, what: &str| {
            anyhow::ensure!(
                v.is_finite() && v > 0.0 && v <= 86_400.0,
                "{what} must be more than 0 and at most 86400 seconds"
            );
            Ok(Duration::from_secs_f64(v))
        };
        anyhow::ensure!(
            (4096..=16 << 20).contains(&self.max_pdu),
            "--max-pdu must be between 4096 and 16777216"
        );
        Ok(ScuOptions {
            calling_ae_title: self.calling_ae.clone(),
            called_ae_title: self.called_ae.clone(),
            max_pdu_length: self.max_pdu,
            connect_timeout: secs(self.connect_timeout_secs, "--connect-timeout-secs")?,
            dimse_timeout: secs(self.timeout_secs, "--timeout-secs")?,
            exchange_timeout: secs(self.exchange_timeout_secs, "--exchange-timeout-secs")?,
        })
    }
}

/// The least `spool purge --older-than` without `--force`.
const MIN_PURGE_AGE: Duration = Duration::from_secs(24 * 3600);

#[derive(Subcommand, Debug)]
pub enum SpoolCommand {
    /// Check the spool's index against its files: rows whose file is missing or differs,
    /// .dcm files without a row, leftover temporary files. Exit code 1 if anything was
    /// found (and, with --repair, not repaired).
    Check {
        #[command(flatten)]
        spool: SpoolArgs,
        /// Repair: drop rows whose file is missing, index files without a row that pass the
        /// same checks as a received instance (quarantine the others and files whose content
        /// changed), delete leftover temporary files. Files changed in the last minute (a
        /// running server may be storing them) are left alone.
        #[arg(long)]
        repair: bool,
    },
    /// Delete instances received before a cutoff (file, then index row) and quarantined
    /// objects older than it.
    Purge {
        #[command(flatten)]
        spool: SpoolArgs,
        /// Age of what is deleted: 30d, 12h, 90m, ...
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Duration,
        /// Say what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Purge with --older-than under one day: deletes studies that may still be
        /// arriving, waiting for their series to complete, or being processed.
        #[arg(long)]
        force: bool,
    },
}

/// Which spool.
#[derive(Args, Debug)]
pub struct SpoolArgs {
    /// The spool folder (as `serve --dicom-spool`).
    #[arg(long, env = "NIGHTINGALE_DICOM_SPOOL", conflicts_with = "data_dir")]
    spool: Option<PathBuf>,
    /// The data folder of `serve`; the spool is its `spool` folder. [default:
    /// nightingale-data, in the working directory, when --spool is not given either]
    #[arg(long, env = "NIGHTINGALE_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

impl SpoolArgs {
    /// The pipeline's results folder of the same data folder, when it has one (issue 9).
    fn results(&self) -> Option<PathBuf> {
        let dir = match (&self.spool, &self.data_dir) {
            (_, Some(data)) => data.join("results"),
            (Some(_), None) => return None,
            (None, None) => PathBuf::from("nightingale-data").join("results"),
        };
        dir.join(nightingale::pipeline::STORE_FILE)
            .is_file()
            .then_some(dir)
    }

    fn path(&self) -> PathBuf {
        match (&self.spool, &self.data_dir) {
            (Some(spool), _) => spool.clone(),
            (None, Some(data)) => data.join("spool"),
            (None, None) => PathBuf::from("nightingale-data").join("spool"),
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// `nightingale dicom ...`
pub fn dicom(command: DicomCommand) -> anyhow::Result<()> {
    match command {
        DicomCommand::Echo { peer } => {
            let options = peer.options()?;
            match runtime()?.block_on(scu::echo(&peer.addr, &options)) {
                Ok(status) if status.is_success() => {
                    println!(
                        "ok   C-ECHO {} ({}): status {status}",
                        peer.addr, options.called_ae_title
                    );
                    Ok(())
                }
                Ok(status) => {
                    println!(
                        "FAIL C-ECHO {} ({}): status {status}",
                        peer.addr, options.called_ae_title
                    );
                    std::process::exit(1)
                }
                Err(e) => {
                    println!("FAIL C-ECHO {}: {e}", peer.addr);
                    std::process::exit(1)
                }
            }
        }
        DicomCommand::Store { peer, paths } => {
            let options = peer.options()?;
            let mut files = Vec::new();
            let mut failures = 0usize;
            let mut skipped = 0usize;
            for (found, from_dir) in paths.iter().flat_map(|p| {
                let in_dir = p.is_dir();
                scu::collect_files(std::slice::from_ref(p))
                    .into_iter()
                    .map(move |f| (f, in_dir))
            }) {
                match found {
                    Err(e) => {
                        println!("FAIL {}", text(&e));
                        failures += 1;
                    }
                    Ok(path) => {
                        // In a folder, what is not DICOM (a README, a DICOMDIR's notes) is
                        // skipped; a file named on the command line must be DICOM.
                        if from_dir
                            && matches!(Part10File::open(&path), Err(FileError::NotPart10 { .. }))
                        {
                            println!("skip {}: not a DICOM Part 10 file", shown(&path));
                            skipped += 1;
                            continue;
                        }
                        files.push(path);
                    }
                }
            }
            let total = files.len();
            // Nothing to send is not a success: a script pointed at a wrong or still-empty
            // folder was told all went well (dcmtk's storescu says "no input files").
            if total == 0 && failures == 0 {
                println!(
                    "FAIL no DICOM file to send ({skipped} skipped): nothing was sent to {}",
                    peer.addr
                );
                std::process::exit(1)
            }
            let outcomes = runtime()?.block_on(scu::store_files(&peer.addr, &options, files));
            let mut stored = 0usize;
            for o in &outcomes {
                match &o.result {
                    Ok(status) if o.is_stored() => {
                        stored += 1;
                        println!("ok   {}: status {status}", shown(&o.path));
                    }
                    Ok(status) => {
                        failures += 1;
                        println!("FAIL {}: status {status}", shown(&o.path));
                    }
                    Err(StoreFailure::File(e)) => {
                        failures += 1;
                        println!("FAIL {}", text(&e));
                    }
                    Err(e) => {
                        failures += 1;
                        println!("FAIL {}: {}", shown(&o.path), text(&e));
                    }
                }
            }
            println!(
                "stored {stored} of {total} files to {} ({skipped} skipped, {failures} failed)",
                peer.addr
            );
            if failures > 0 {
                std::process::exit(1)
            }
            Ok(())
        }
    }
}

/// `nightingale spool ...`
pub fn spool(command: SpoolCommand) -> anyhow::Result<()> {
    match command {
        SpoolCommand::Check { spool, repair } => {
            let path = spool.path();
            let opened = nightingale_dicom::Spool::open_for_maintenance(&path)?;
            let report = opened.check(&CheckOptions {
                repair,
                ..CheckOptions::default()
            })?;
            for bad in &report.bad_rows {
                println!("bad-row   {}: {}", shown(&bad.path), text(&bad.problem));
            }
            for f in &report.unindexed {
                println!("unindexed {}", shown(f));
            }
            for f in &report.temp_files {
                println!("temp-file {}", shown(f));
            }
            for f in &report.links {
                println!("link      {}", shown(f));
            }
            for f in &report.in_progress {
                println!(
                    "recent    {} (a store may be under way: not checked)",
                    shown(f)
                );
            }
            for f in &report.other_files {
                println!(
                    "other     {} (not a spool file: neither checked nor purged)",
                    shown(f)
                );
            }
            println!(
                "{} {}: {} index rows, {} files; {} bad rows, {} unindexed files, {} temporary files, {} links; {} recent files not checked; {} other files",
                if report.is_consistent() {
                    "ok  "
                } else {
                    "FAIL"
                },
                shown(&path),
                report.rows,
                report.files,
                report.bad_rows.len(),
                report.unindexed.len(),
                report.temp_files.len(),
                report.links.len(),
                report.in_progress.len(),
                report.other_files.len()
            );
            if let Some(r) = &report.repaired {
                println!(
                    "repaired: {} rows dropped, {} rows made again from their files, {} files indexed, {} files quarantined, {} temporary files deleted, {} links deleted; {} problems left (their files changed in the last minute), {} files left that could not be read, {} recent files not checked",
                    r.rows_dropped,
                    r.rows_reindexed,
                    r.files_indexed,
                    r.files_quarantined,
                    r.temp_files_deleted,
                    r.links_deleted,
                    r.skipped_recent,
                    r.left_unreadable,
                    report.in_progress.len()
                );
            }
            if report.is_clean_now() {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        SpoolCommand::Purge {
            spool,
            older_than,
            dry_run,
            force,
        } => {
            // `--older-than 0` deleted a series acknowledged seconds before, whose results
            // were never made (a red-team finding): a short age is asked for by name.
            anyhow::ensure!(
                dry_run || force || older_than >= MIN_PURGE_AGE,
                "--older-than {} would delete studies received in the last day, which may \
                 still be arriving or waiting for their results; give --force to purge them \
                 (or --dry-run to see what it would delete)",
                humantime::format_duration(older_than)
            );
            let path = spool.path();
            let opened = nightingale_dicom::Spool::open_for_maintenance(&path)?;
            let cutoff = SystemTime::now()
                .checked_sub(older_than)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let report = opened.purge(cutoff, dry_run)?;
            println!(
                "{} {}: {} instances ({} bytes) and {} quarantine files older than {}",
                if dry_run { "would purge" } else { "purged" },
                shown(&path),
                report.instances,
                report.bytes,
                report.quarantine_files,
                humantime::format_duration(older_than)
            );
            if dry_run && report.foreign_rows > 0 {
                println!(
                    "  {} index rows naming paths the spool never writes would be dropped (nothing deleted for them)",
                    report.foreign_rows
                );
            } else if report.foreign_rows > 0 || report.kept > 0 {
                println!(
                    "  {} index rows naming paths the spool never writes dropped (nothing deleted for them); {} instances kept: their files could not be deleted (see the log)",
                    report.foreign_rows, report.kept
                );
            }
            // The pipeline's results follow the same retention (issue 9).
            if spool.spool.is_some() {
                println!(
                    "  the pipeline's results were not looked for: --spool names the spool only; \
                     give --data-dir to purge the results of the same data folder with it"
                );
            }
            // What this deleted is kept in the spool's index until the server writes it to
            // the audit trail (it holds the trail; at its next start if it is not running):
            // a purge left no record anywhere (a review's finding).
            let mut also = format!(
                "command=spool-purge older_than={} force={force}",
                humantime::format_duration(older_than)
                    .to_string()
                    .replace(' ', "")
            );
            let mut results_deleted = false;
            let results = spool.results().map_or(Ok(()), |results| {
                nightingale::pipeline::purge_results(&results, cutoff, dry_run).map(|counts| {
                    println!(
                        "{} {}: {} jobs, {} result objects ({} files), {} series",
                        if dry_run { "would purge" } else { "purged" },
                        shown(&results),
                        counts.jobs,
                        counts.objects,
                        counts.files.len(),
                        counts.series
                    );
                    if counts.jobs + counts.objects + counts.series > 0 {
                        results_deleted = true;
                        also.push_str(&format!(
                            " result_jobs={} result_objects={} result_series={}",
                            counts.jobs, counts.objects, counts.series
                        ));
                    }
                })
            });
            // A purge that deleted nothing is not recorded (its words alone would be).
            let deleted = results_deleted || report.instances > 0 || report.quarantine_files > 0;
            let recorded = opened.record_purge(
                &operator(),
                cutoff,
                &report,
                if deleted { &also } else { "" },
            );
            if let Err(e) = recorded {
                eprintln!(
                    "error: the purge is not recorded for the audit trail: {}",
                    text(&e)
                );
                results?;
                std::process::exit(1);
            }
            results?;
            Ok(())
        }
    }
}

/// Who runs a purge from the command line, as its audit record names it: `operator`, and
/// the login name where the environment gives one (printable, at most 64 characters).
pub(crate) fn operator() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_default();
    let user: String = user
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect();
    if user.is_empty() {
        "operator".to_owned()
    } else {
        format!("operator:{user}")
    }
}

/// Writes the purges the spool has kept ([`nightingale_dicom::Spool::record_purge`]: the
/// retention task's, an operator's `nightingale spool purge`) to the audit trail, at
/// start-up and every 5 s. A purge whose records the trail refuses stays kept and is tried
/// again (its records already written are then written again).
pub fn purge_audit_task(
    spool: Arc<nightingale_dicom::Spool>,
    audit: nightingale::audit::AuditLog,
    uids: nightingale::audit::dicom::UidAudit,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let kept = {
                let spool = spool.clone();
                tokio::task::spawn_blocking(move || spool.purges_to_audit(64)).await
            };
            let entries = match kept {
                Ok(Ok(entries)) => entries,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "spool purges not read for the audit trail");
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "spool purge audit panicked");
                    continue;
                }
            };
            'entries: for entry in entries {
                for record in nightingale::audit::dicom::purge_records(&entry, uids) {
                    if let Err(e) = audit.record(record).await {
                        tracing::warn!(error = %e,
                            "a spool purge is not in the audit trail yet: tried again later");
                        break 'entries;
                    }
                }
                let spool = spool.clone();
                match tokio::task::spawn_blocking(move || spool.purge_audited(entry.id)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e,
                        "a spool purge audited is not marked so: its records may be written again"),
                    Err(e) => tracing::error!(error = %e, "spool purge audit panicked"),
                }
            }
        }
    })
}

/// The retention task of `serve`: purges what is older than `retention` at start-up, then
/// every hour (or every quarter of the retention period, if shorter). `None` when data is
/// kept forever.
pub fn retention_task(
    spool: Arc<nightingale_dicom::Spool>,
    retention: Option<Duration>,
) -> Option<tokio::task::JoinHandle<()>> {
    let retention = retention?;
    let every = (retention / 4).clamp(Duration::from_millis(100), Duration::from_secs(3600));
    tracing::info!(
        retention = %humantime::format_duration(retention),
        "DICOM retention: older instances are purged"
    );
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let spool = spool.clone();
            let purged = tokio::task::spawn_blocking(move || {
                let cutoff = SystemTime::now()
                    .checked_sub(retention)
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                let report = spool.purge(cutoff, false)?;
                spool.record_purge("retention", cutoff, &report, "")?;
                Ok::<_, nightingale_dicom::maintenance::MaintenanceError>(report)
            })
            .await;
            match purged {
                Ok(Ok(report)) => {
                    metrics::counter!("nightingale_dicom_purged_instances_total")
                        .increment(report.instances as u64);
                }
                Ok(Err(e)) => tracing::error!(error = %e, "DICOM retention purge failed"),
                Err(e) => tracing::error!(error = %e, "DICOM retention task failed"),
            }
        }
    }))
}

/// A path as printed: control, line-separator and bidi characters escaped, so that a file
/// named with a line break and an `ok   …` after it cannot print a forged line (a review's
/// finding: `dicom store` and `spool check` printed names as they were).
fn shown(path: &Path) -> String {
    text(&path.display())
}

/// Any text printed from outside (file names in errors) with the same escapes.
fn text(value: &impl std::fmt::Display) -> String {
    nightingale::log_line::printable(&value.to_string()).into_owned()
}
