//! `GET /results/studies/{study}`: what the DICOM pipeline did with a study, per series:
//! its assembly state, and per (series, bundle) job its state, bundle and version, findings
//! and result objects with their delivery (roles `pacs`, `admin`, `researcher`).

use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::json;

use super::AppState;
use super::error::AppError;
use crate::pipeline::store::ResultsStore;

/// The results API's view of the pipeline's store.
#[derive(Clone)]
pub struct Results {
    pub store: Arc<Mutex<ResultsStore>>,
    /// The results folder (the objects' paths are relative to it).
    pub dir: std::path::PathBuf,
}

/// The most jobs a study's answer lists: the newest (older ones are counted in
/// `jobs_left_out`).
pub const MAX_JOBS: usize = 1000;

/// The study's results, audited as a read of received DICOM before they are answered (they
/// were not: a red-team finding; WADO-RS and QIDO-RS reads of the same study were).
pub async fn study(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<super::auth::Caller>>,
    Path(study): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(results) = state.results().cloned() else {
        return AppError::new(
            StatusCode::NOT_FOUND,
            "the DICOM pipeline is off (serve --dicom-port or --dicom-spool turns it on)",
        )
        .into_response();
    };
    if !nightingale_dicom::sop::is_url_safe_uid(&study) {
        return AppError::bad_request(
            "a Study Instance UID is 1-64 letters, digits, dots, '-' or '_'",
        )
        .into_response();
    }
    let uid = study.clone();
    let answer = tokio::task::spawn_blocking(move || -> rusqlite::Result<serde_json::Value> {
        // The rows are read under the store's lock, the answer built after it (the lock
        // was held while every job's objects were read and the JSON built: a study of
        // 60,000 jobs stalled every CDS call and the pipeline for 17 s, a review's finding).
        let (series, jobs, left_out, objects, any_jobs) = {
            let store = results.store.lock().unwrap_or_else(|p| p.into_inner());
            let series = store.series(&study)?;
            let (jobs, left_out, objects, any_jobs) = store.study_results(&study, MAX_JOBS)?;
            (series, jobs, left_out, objects, any_jobs)
        };
        if series.is_empty() && jobs.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        let mut by_job: std::collections::HashMap<i64, Vec<&crate::pipeline::store::ResultObject>> =
            std::collections::HashMap::new();
        for o in &objects {
            by_job.entry(o.job_id).or_default().push(o);
        }
        // The series whose jobs are listed, then those with jobs left out (marked), then
        // the others, at most MAX_JOBS in all (a study of 20,000 series listed them all,
        // most with no job, and then series with jobs as if they had none: re-attacks'
        // findings).
        let with_jobs: std::collections::HashSet<&str> =
            jobs.iter().map(|j| j.series_uid.as_str()).collect();
        let rank = |s: &&crate::pipeline::store::SeriesRow| {
            if with_jobs.contains(s.series_uid.as_str()) {
                0
            } else if any_jobs.contains(&s.series_uid) {
                1
            } else {
                2
            }
        };
        let mut listed: Vec<_> = series.iter().collect();
        listed.sort_by_key(rank);
        let series_left_out = listed.len().saturating_sub(MAX_JOBS);
        listed.truncate(MAX_JOBS);
        let mut out = Vec::new();
        for s in listed {
            let mut job_list = Vec::new();
            for j in jobs.iter().filter(|j| j.series_uid == s.series_uid) {
                let objects = by_job.get(&j.id).map(Vec::as_slice).unwrap_or_default();
                job_list.push(json!({
                    "job": j.id,
                    "state": j.state,
                    "reason": j.reason,
                    "route": j.route,
                    "bundle": j.bundle,
                    "version": j.bundle_version,
                    "instances": j.instances,
                    "created_ms": j.created_ms,
                    "updated_ms": j.updated_ms,
                    "findings": j.findings,
                    "objects": objects.iter().map(|o| json!({
                        "kind": o.kind,
                        "retrieve_url": format!(
                            "/dicomweb/studies/{}/series/{}/instances/{}",
                            study, o.series_uid, o.sop_instance_uid
                        ),
                        "sop_instance_uid": o.sop_instance_uid,
                        "series_instance_uid": o.series_uid,
                        "sop_class_uid": o.sop_class_uid,
                        "destination": o.destination,
                        "delivery": o.delivery,
                        "attempts": o.attempts,
                        "last_error": o.last_error,
                    })).collect::<Vec<_>>(),
                }));
            }
            let mut entry = json!({
                "series_instance_uid": s.series_uid,
                "instances": s.instances,
                "state": s.state,
                "reason": s.reason,
                "jobs": job_list,
            });
            // Jobs, none of them among those listed.
            if rank(&s) == 1 {
                entry["jobs_left_out"] = true.into();
            }
            out.push(entry);
        }
        let mut body = json!({ "study_instance_uid": study, "series": out });
        if left_out > 0 {
            body["jobs_left_out"] = left_out.into();
        }
        if series_left_out > 0 {
            body["series_left_out"] = series_left_out.into();
        }
        Ok(body)
    })
    .await;
    match answer {
        Ok(Ok(serde_json::Value::Null)) => {
            AppError::new(StatusCode::NOT_FOUND, "no such study in the pipeline").into_response()
        }
        Ok(Ok(body)) => {
            let series = body["series"].as_array().map_or(0, Vec::len);
            let jobs: usize = body["series"].as_array().map_or(0, |s| {
                s.iter()
                    .map(|s| s["jobs"].as_array().map_or(0, Vec::len))
                    .sum()
            });
            if let Err(e) = super::wado::audit_read(
                &state,
                caller.as_ref().map(|c| &c.0),
                &headers,
                "results",
                "study",
                &[("study", uid.as_str())],
                &[("series", series.to_string()), ("jobs", jobs.to_string())],
            )
            .await
            {
                return e.into_response();
            }
            Json(body).into_response()
        }
        Ok(Err(e)) => AppError::internal(format!("results store: {e}")).into_response(),
        Err(e) => AppError::internal(e.to_string()).into_response(),
    }
}
