//! `nightingale results …` (issue 9): operator commands on the DICOM pipeline's results.
//!
//! `reprocess` queues a study again, e.g. after a new model version: a new job per
//! (series, bundle) with the same route and destinations, picked up by the running server
//! within a second; the earlier results are kept and marked superseded.

use std::path::PathBuf;

use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub enum ResultsCommand {
    /// List the series not routed (still assembling, unmatched, failed), or routed without
    /// a bundle their routes name, the jobs not done (queued, among them those waiting
    /// for their bundle; processing; failed), and the result objects not delivered (given
    /// up, `dead`; or being retried), with their Study and Series Instance UIDs and
    /// reasons: what to look at, to `reprocess`, or to `resend`.
    List {
        /// Only this state (series: assembling, unmatched, failed, routed; jobs: queued,
        /// processing, failed, done, superseded; result objects: dead, retrying).
        #[arg(long, value_parser = [
            "assembling", "unmatched", "failed", "routed",
            "queued", "processing", "done", "superseded",
            "dead", "retrying",
        ])]
        state: Option<String>,
        /// At most this many series, and this many jobs.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
        #[command(flatten)]
        results: ResultsArgs,
    },
    /// Queue a study again through the pipeline (new result series; the old ones are kept,
    /// marked superseded), and route again its series that no route took. The running
    /// server picks the jobs up.
    Reprocess {
        /// The Study Instance UID.
        #[arg(long)]
        study: String,
        /// Only this bundle's results (default: every bundle that processed the study); a
        /// series routed without it is routed again (its other bundles run again too).
        #[arg(long)]
        model: Option<String>,
        #[command(flatten)]
        results: ResultsArgs,
    },
    /// Send again the result objects given up (`dead`: a destination down or refusing for
    /// longer than the attempts allow), from the dead-letter folder, once the destination
    /// is back: each is tried anew (`--results-max-attempts`). The running server picks
    /// them up within a second. Objects of superseded jobs are not sent again.
    Resend {
        /// Only this study's (Study Instance UID).
        #[arg(long)]
        study: Option<String>,
        /// Only those for this destination (as `results list` shows it: AE@host:port).
        #[arg(long)]
        destination: Option<String>,
        #[command(flatten)]
        results: ResultsArgs,
    },
}

/// Which results folder.
#[derive(Args, Debug)]
pub struct ResultsArgs {
    /// The data folder of `serve`; the results are its `results` folder.
    #[arg(long, env = "NIGHTINGALE_DATA_DIR", default_value = "nightingale-data")]
    data_dir: PathBuf,
    /// The DICOM spool the server reads series from (as `serve --dicom-spool`; default:
    /// the data folder's `spool`).
    #[arg(long, env = "NIGHTINGALE_DICOM_SPOOL")]
    spool: Option<PathBuf>,
}

pub fn results(command: ResultsCommand) -> anyhow::Result<()> {
    match command {
        ResultsCommand::List {
            state,
            limit,
            results,
        } => {
            let store = open_store(&results)?;
            let state = state.as_deref().map(str::trim);
            let objects_only = matches!(state, Some("dead" | "retrying"));
            let (series, jobs) = if objects_only {
                (Vec::new(), Vec::new())
            } else {
                (
                    store.series_in_state(state, limit as usize)?,
                    store.jobs_in_state(state, limit as usize)?,
                )
            };
            let objects = match state {
                None => store.undelivered(None, limit as usize)?,
                Some("dead") => store.undelivered(Some("dead"), limit as usize)?,
                Some("retrying") => store.undelivered(Some("pending"), limit as usize)?,
                Some(_) => Vec::new(),
            };
            if series.is_empty() && jobs.is_empty() && objects.is_empty() {
                println!("nothing listed");
                return Ok(());
            }
            // Tab-separated, one line per series or job; texts cut to one line.
            let text = |s: Option<&str>| s.unwrap_or("-").replace(['\t', '\n', '\r'], " ");
            for s in &series {
                println!(
                    "series\t{}\t{}\t{}\t{} instances\t{}",
                    s.study_uid,
                    s.series_uid,
                    s.state,
                    s.instances,
                    text(s.reason.as_deref())
                );
            }
            for j in &jobs {
                println!(
                    "job {}\t{}\t{}\t{}\t{}\t{}",
                    j.id,
                    j.study_uid,
                    j.series_uid,
                    j.bundle,
                    j.state.as_str(),
                    text(j.reason.as_deref())
                );
            }
            for (study, o) in &objects {
                let state = if o.delivery == "dead" {
                    "dead".to_owned()
                } else {
                    format!("retrying (attempt {} next)", o.attempts + 1)
                };
                println!(
                    "object {}	{}	{}	{}	{}	{}	{}	{}",
                    o.kind,
                    study,
                    o.series_uid,
                    o.sop_instance_uid,
                    text(Some(&o.destination)),
                    state,
                    o.attempts,
                    text(o.last_error.as_deref())
                );
            }
            Ok(())
        }
        ResultsCommand::Resend {
            study,
            destination,
            results,
        } => {
            let mut store = open_store(&results)?;
            let dir = results.data_dir.join("results");
            let (queued, missing) = store.resend_dead(
                study.as_deref().map(str::trim),
                destination.as_deref().map(str::trim),
                |path| {
                    let relative = std::path::Path::new(path);
                    relative.is_relative()
                        && relative
                            .components()
                            .all(|c| matches!(c, std::path::Component::Normal(_)))
                        && dir.join(relative).is_file()
                },
            )?;
            if missing > 0 {
                println!(
                    "not sent again: {missing} object(s) whose file is no longer in {} (retention?)",
                    dir.display()
                );
            }
            if queued == 0 {
                anyhow::bail!("nothing to send again: no result object given up{}", {
                    let mut which = String::new();
                    if study.is_some() {
                        which.push_str(" for that study");
                    }
                    if destination.is_some() {
                        which.push_str(" to that destination");
                    }
                    which
                });
            }
            log_operator(
                &store,
                &format!(
                    "command=results-resend study_sha256={} destination={} objects={queued}",
                    study.as_deref().map_or("*".to_owned(), |s| {
                        nightingale::audit::dicom::uid_sha256(s.trim())
                    }),
                    destination.as_deref().map_or("*".to_owned(), clean)
                ),
            );
            println!("queued {queued} result object(s) to be sent again");
            Ok(())
        }
        ResultsCommand::Reprocess {
            study,
            model,
            results,
        } => {
            let store = open_store(&results)?;
            let study = study.trim();
            // A series the spool no longer holds (retention, a purge) cannot be processed
            // again: its new job would fail and supersede the results it has (a red-team
            // finding: the study's only findings were hidden, "queued" and exit 0).
            let spool_path = results
                .spool
                .clone()
                .unwrap_or_else(|| results.data_dir.join("spool"));
            let spool = nightingale_dicom::Spool::open_for_maintenance(&spool_path)
                .map_err(|e| anyhow::anyhow!("the DICOM spool: {e}"))?;
            let gone = std::cell::RefCell::new(Vec::new());
            let held = |series: &str| {
                let held = spool
                    .series_instances(study, series)
                    .map(|i| !i.is_empty())
                    .unwrap_or(false);
                // Asked once per (series, bundle): named once (a purged study of 1,000 series
                // printed 2,000 lines with two bundles: a review's finding).
                let mut gone = gone.borrow_mut();
                if !held && !gone.iter().any(|s| s == series) {
                    gone.push(series.to_owned());
                }
                held
            };
            // Series no route took, or routed without a bundle their routes name (they
            // arrived while it was not in the repository, or before their route was
            // configured): routed again by the running server, as if they had just arrived
            // (they had no job to repeat: a review's finding), their other jobs with them.
            let rerouted = store.reroute_unmatched(study, model.as_deref(), held)?;
            let jobs = store.reprocess_series(study, model.as_deref(), |s| {
                !rerouted.iter().any(|r| r == s) && held(s)
            })?;
            let gone = gone.into_inner();
            for series in &gone {
                println!(
                    "not queued: series {series} is no longer in the spool {} (purged?); its results are kept",
                    spool_path.display()
                );
            }
            if !rerouted.is_empty() {
                println!(
                    "routed again: {} series that no route took, or that missed a bundle (the server routes them as it does a series that has just arrived)",
                    rerouted.len()
                );
            }
            if !jobs.is_empty() || !rerouted.is_empty() {
                log_operator(
                    &store,
                    &format!(
                        "command=results-reprocess study_sha256={} model={} jobs={} rerouted={}",
                        nightingale::audit::dicom::uid_sha256(study),
                        model.as_deref().map_or("*".to_owned(), clean),
                        jobs.len(),
                        rerouted.len()
                    ),
                );
            }
            if jobs.is_empty() && !rerouted.is_empty() {
                return Ok(());
            }
            if jobs.is_empty() {
                anyhow::bail!(
                    "nothing to reprocess: {}",
                    if gone.is_empty() {
                        format!(
                            "no earlier job, and no series no route took, for that study{}",
                            model.map(|m| format!(" and model {m}")).unwrap_or_default()
                        )
                    } else {
                        "none of its series is in the spool".to_owned()
                    }
                );
            }
            println!(
                "queued {} job(s): {}",
                jobs.len(),
                jobs.iter()
                    .map(|j| j.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(())
        }
    }
}

/// Keeps the command for the audit trail (the server writes it); a failure is said, not
/// fatal: what was queued stays queued.
fn log_operator(store: &nightingale::pipeline::store::ResultsStore, detail: &str) {
    if let Err(e) = store.log_operator(&crate::dicom_cli::operator(), detail) {
        eprintln!("warning: the command is not kept for the audit trail: {e}");
    }
}

/// A name given on the command line as a record quotes it: printable ASCII, no spaces, at
/// most 128 characters.
fn clean(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(128)
        .collect()
}

/// The results store of `serve`'s data folder (refused when there is none).
fn open_store(results: &ResultsArgs) -> anyhow::Result<nightingale::pipeline::store::ResultsStore> {
    let path = results
        .data_dir
        .join("results")
        .join(nightingale::pipeline::STORE_FILE);
    if !path.is_file() {
        anyhow::bail!(
            "no pipeline results at {} (has `serve` run with this --data-dir and a DICOM spool?)",
            path.display()
        );
    }
    Ok(nightingale::pipeline::store::ResultsStore::open(&path)?)
}
