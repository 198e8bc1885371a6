//! `nightingale results …` (issue 9): operator commands on the DICOM pipeline's results.
//!
//! `reprocess` queues a study again, e.g. after a new model version: a new job per
//! (series, bundle) with the same route and destinations, picked up by the running server
//! within a second; the earlier results are kept and marked superseded.

use std::path::PathBuf;

use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub enum ResultsCommand {
    /// Queue a study again through the pipeline (new result series; the old ones are kept,
    /// marked superseded). The running server picks the jobs up.
    Reprocess {
        /// The Study Instance UID.
        #[arg(long)]
        study: String,
        /// Only this bundle's results (default: every bundle that processed the study).
        #[arg(long)]
        model: Option<String>,
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
}

pub fn results(command: ResultsCommand) -> anyhow::Result<()> {
    match command {
        ResultsCommand::Reprocess {
            study,
            model,
            results,
        } => {
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
            let store = nightingale::pipeline::store::ResultsStore::open(&path)?;
            let jobs = store.reprocess(study.trim(), model.as_deref())?;
            if jobs.is_empty() {
                anyhow::bail!(
                    "nothing to reprocess: no earlier job for that study{}",
                    model.map(|m| format!(" and model {m}")).unwrap_or_default()
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
