//! Running one job: the series' instances decoded (`nightingale_dicom::pixels`), each frame
//! preprocessed as the bundle declares and run through the same model worker as the KServe
//! API (same batching, one audit record per inference), the findings taken from the
//! reported outputs, and one SR and one SC written (`nightingale_dicom::results`) into the
//! results folder and queued for their destinations.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nightingale_dicom::pixels::{
    self, Colour, DecodeOptions, Limits, PixelSource, RenderWindow, Voi, render8,
};
use nightingale_dicom::results::{
    self, Code, Finding, MeasuredOn, RenderedImage, RenderedPixels, ResultContext, SourceSeries,
    Uid,
};
use nightingale_dicom::volume::{self, InstanceGeometry, VolumePlan};
use nightingale_inference::{NamedTensor, Tensor};
use nightingale_models::manifest::DicomAccepts;
use nightingale_models::{Image, LoadedModel, PreprocessError, Preprocessing, VolumeValues};

use super::Pipeline;
use super::outbox::OBJECTS_DIR;
use super::store::{Job, JobState, ResultObject, now_ms};
use crate::audit::{AuditEvent, EventKind, Outcome, tensors_sha256};
use nightingale_dicom::series::SeriesHeader;

/// The most instances one job reads (a larger series fails with a reason).
pub const MAX_SERIES_INSTANCES: usize = 5_000;

/// The most source pixels (rows × columns × frames, summed over its instances) one series
/// may have for per-frame inference: 2 Gi, e.g. 5,000 CT slices of 512 × 512 (1.3 Gi) or
/// 16 mammograms of 4,096 × 3,328 (0.2 Gi). Checked from the headers before any frame is
/// decoded: frames are decoded one at a time, so this bounds the work one job may take (a
/// PACS sending 30 compressed 8,192 × 8,192 frames of a few KB each would otherwise hold
/// the job runner for minutes), not memory.
pub const MAX_SERIES_SOURCE_PIXELS: u64 = 2 << 30;

/// Source pixels of a series: its instances' pixels (each instance's header checked, so each
/// term is bounded), summed saturating.
fn series_source_pixels(instances: impl IntoIterator<Item = u64>) -> u64 {
    instances.into_iter().fold(0u64, u64::saturating_add)
}

/// The most source pixels (slices × rows × columns) one volume may have: 256 Mi, e.g. 1,024
/// slices of 512 × 512. Checked from the headers before any slice is decoded. The slices are
/// decoded one at a time into the model input, so memory is the model input plus one slice
/// (plus, for a multi-frame object, the object itself, which is read whole: at most 512 MiB
/// of 16-bit pixel data at this limit).
pub const MAX_VOLUME_SOURCE_PIXELS: u64 = 256 << 20;

/// Why a job failed: a stable code (metrics, API) and a detail without patient data.
#[derive(Debug, Clone)]
pub struct JobFailure {
    pub code: &'static str,
    pub detail: String,
}

impl JobFailure {
    fn new(code: &'static str, detail: impl Into<String>) -> JobFailure {
        JobFailure {
            code,
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for JobFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.detail)
    }
}

/// One reported output, aggregated over the series' frames (the highest probability).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SeriesFinding {
    pub output: String,
    pub label: String,
    pub probability: f32,
    pub threshold: f32,
    pub positive: bool,
    /// Which instance (its position in the series, by arrival) and frame had it (a volume:
    /// the middle slice, the one the SC shows).
    pub instance_index: usize,
    pub frame: u32,
    /// A volume bundle's input: how the series became one volume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeSummary>,
}

/// How a series became a volume model input (`[dicom] inference = "volume"`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct VolumeSummary {
    /// Slices of the series.
    pub slices: usize,
    /// Slices of the model input (after resampling along the slice axis).
    pub depth: usize,
    /// `position`, `instance-number` or `frame-order`.
    pub order: &'static str,
    /// The median gap between slices (ordered by position).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spacing_mm: Option<f64>,
}

/// What a volume bundle's input is: its rank (5: `[N, 1, D, H, W]`, 4: `[N, D, H, W]`) and
/// depth (None: any, the series' own slice count).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct VolumeShape {
    pub rank: usize,
    pub depth: Option<usize>,
}

/// What one frame's inference said for each reported output.
struct FrameResult {
    instance_index: usize,
    frame: u32,
    probabilities: Vec<f32>,
}

/// A saliency map on the model input (`[preprocessing] size`, row-major) and its caption.
struct HeatmapMap {
    map: Vec<f32>,
    caption: String,
}

/// A reported output: where its probability is in the model's outputs.
struct Reported {
    output: String,
    label: String,
    /// Position among the model's outputs, and of the positive label within it.
    position: usize,
    label_index: usize,
    threshold: f32,
}

impl Pipeline {
    /// Runs a job to its end (done or failed) and records it.
    pub(crate) async fn run_job(self: Arc<Self>, job: Job) {
        let started = Instant::now();
        let series = super::uid_tag(&job.series_uid);
        // The version a failed job records (a done one records the version it ran).
        let version = self
            .state
            .repository
            .get(&job.bundle, None)
            .map(|m| m.version.to_string())
            .unwrap_or_default();
        let outcome = self.clone().process(&job).await;
        match outcome {
            Ok((findings, objects, version)) => {
                self.audit_retries
                    .store(0, std::sync::atomic::Ordering::Relaxed);
                let json = serde_json::to_value(&findings).ok();
                tracing::info!(
                    job = job.id,
                    %series,
                    bundle = %job.bundle,
                    ms = started.elapsed().as_millis() as u64,
                    "series processed"
                );
                metrics::counter!("nightingale_pipeline_jobs_total", "outcome" => "done")
                    .increment(1);
                metrics::histogram!("nightingale_pipeline_job_seconds")
                    .record(started.elapsed().as_secs_f64());
                // Whose result it is: the patient of the instances it processed (one
                // patient: `check_series`), recorded with its end.
                let patient = {
                    let first = self
                        .series_instances(&job)
                        .ok()
                        .and_then(|i| i.into_iter().next());
                    blocking(move || {
                        Ok(first.and_then(|f| {
                            nightingale_dicom::series::SeriesHeader::read(&f.path)
                                .ok()
                                .and_then(|h| h.patient_id_sha256)
                        }))
                    })
                    .await
                    .ok()
                    .flatten()
                };
                let completed = {
                    let store = self.store();
                    store
                        .set_job_patient(job.id, patient.as_deref())
                        .and_then(|()| {
                            store.complete_job(job.id, &version, json.as_ref(), &objects)
                        })
                };
                match completed {
                    Ok(true) => self.keep_in_spool(&objects).await,
                    Ok(false) => {
                        tracing::warn!(
                            job = job.id,
                            "the job was superseded while it ran (a rerun is queued): its results are discarded"
                        );
                        self.discard_unrecorded_objects(&job);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "results store: job end not recorded");
                    }
                }
            }
            // The audit trail failing is transient: the job waits for it to be writable and
            // runs again (it ended failed, and a few seconds of a database outage cost its
            // series the result for good: a review's finding). Nothing else runs meanwhile;
            // it would fail the same way. A stop leaves it processing: queued again at the
            // next start.
            Err(failure) if failure.code == "audit" && !self.state.audit.is_writable() => {
                tracing::warn!(
                    job = job.id,
                    %series,
                    bundle = %job.bundle,
                    detail = %failure.detail,
                    "series not processed: the audit trail cannot be written; it runs again once it can"
                );
                self.discard_unrecorded_objects(&job);
                // A trail that says it is writable again and still refuses (a database that
                // answers its check but not an insert) ran the job every 1.5 s: each retry
                // in a row waits twice as long, up to a minute (a re-attack's finding).
                let retries = self
                    .audit_retries
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let backoff = std::time::Duration::from_secs(1 << retries.min(6));
                let not_before = tokio::time::Instant::now() + backoff;
                while !self.state.audit.is_writable() || tokio::time::Instant::now() < not_before {
                    if self.stopping() {
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                if let Err(e) = self.store().requeue_job(job.id) {
                    tracing::error!(error = %e, "results store: job not queued again");
                }
            }
            // Its bundle not serving (unloaded by an operator, a recall; moved aside for a
            // deployment), or another version serving than the one it began on (a rollback,
            // a new version): the job goes back to the queue, and runs (again, whole) once
            // its bundle serves, for at most JOB_WAIT after it was made. It failed for good
            // and kept inferring on a recalled version: a review's findings.
            Err(failure)
                if matches!(failure.code, "bundle_unavailable" | "bundle_changed")
                    && super::store::now_ms() - job.created_ms
                        < super::JOB_WAIT.as_millis() as i64 =>
            {
                tracing::info!(
                    job = job.id,
                    %series,
                    bundle = %job.bundle,
                    reason = failure.code,
                    detail = %failure.detail,
                    "series not processed now: it runs again once its bundle serves"
                );
                metrics::counter!("nightingale_pipeline_jobs_requeued_total", "reason" => failure.code)
                    .increment(1);
                self.discard_unrecorded_objects(&job);
                let waiting =
                    (failure.code == "bundle_unavailable").then(|| super::waiting_for(&job.bundle));
                let store = self.store();
                if let Err(e) = store
                    .requeue_job(job.id)
                    .and_then(|_| store.set_job_reason(job.id, waiting.as_deref()))
                {
                    tracing::error!(error = %e, "results store: job not queued again");
                }
            }
            Err(failure) => {
                let failure = self.purged_instead(&job, failure).await;
                tracing::warn!(
                    job = job.id,
                    %series,
                    bundle = %job.bundle,
                    reason = failure.code,
                    detail = %failure.detail,
                    "series failed"
                );
                metrics::counter!(
                    "nightingale_pipeline_jobs_total",
                    "outcome" => "failed",
                    "reason" => failure.code
                )
                .increment(1);
                self.discard_unrecorded_objects(&job);
                if let Err(e) = self.store().finish_job(
                    job.id,
                    JobState::Failed,
                    &version,
                    Some(&failure.to_string()),
                    None,
                ) {
                    tracing::error!(error = %e, "results store: job end not recorded");
                }
            }
        }
    }

    /// Stores a done job's result objects in the spool too (once each, whatever the number
    /// of destinations), so that QIDO-RS lists them with the study's instances (it searches
    /// the spool's index) and WADO-RS serves them from there; not routed again (the spool
    /// keeps them under [`nightingale_dicom::spool::OWN_RESULTS_SENDER`]). One that cannot be
    /// stored (a full spool) is logged: its delivery to PACS does not depend on it.
    async fn keep_in_spool(self: &Arc<Self>, objects: &[ResultObject]) {
        let mut files: Vec<PathBuf> = Vec::new();
        for o in objects {
            let path = self.config.results_dir.join(&o.path);
            if !files.contains(&path) {
                files.push(path);
            }
        }
        let spool = self.spool.clone();
        let stored = blocking(move || {
            for file in files {
                if let Err(e) = keep_result_file(&spool, &file) {
                    metrics::counter!("nightingale_pipeline_results_not_indexed_total")
                        .increment(1);
                    tracing::warn!(error = %e,
                        "a result object was not kept in the spool: QIDO-RS will not list it");
                }
            }
            Ok(())
        })
        .await;
        if let Err(e) = stored {
            tracing::warn!(error = %e.detail, "result objects not kept in the spool");
        }
    }

    /// Deletes the result files of `job` that no object row records (made by this run
    /// before it failed, or by an earlier run of the job that a stop interrupted before its
    /// end was recorded): nothing refers to them, nothing sends them.
    fn discard_unrecorded_objects(&self, job: &Job) {
        let dir = self
            .config
            .results_dir
            .join(OBJECTS_DIR)
            .join(job.id.to_string());
        if !dir.exists() {
            return;
        }
        match self.store().objects_of_job(job.id) {
            Ok(rows) if rows.is_empty() => {
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    tracing::warn!(job = job.id, error = %e, "unrecorded result files not deleted");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(job = job.id, error = %e, "results store unreadable"),
        }
    }

    /// The job's findings and its result objects' rows (one per object and destination),
    /// written but not yet recorded: [`Pipeline::run_job`] records them with the job's end.
    async fn process(
        self: Arc<Self>,
        job: &Job,
    ) -> Result<(Vec<SeriesFinding>, Vec<ResultObject>, String), JobFailure> {
        let model = self
            .state
            .repository
            .get(&job.bundle, None)
            .map_err(|e| JobFailure::new("bundle_unavailable", e.to_string()))?;
        let manifest = model.manifest.clone();
        let (Some(pre), Some(accepts)) = (manifest.preprocessing.clone(), manifest.dicom.clone())
        else {
            return Err(JobFailure::new(
                "bundle_not_imaging",
                "the bundle declares no [preprocessing] or [dicom]",
            ));
        };
        // The series' instances, listed once for the job.
        let instances = self.series_instances(job)?;
        // The bundle's `[dicom]` as it serves now has the last word: a job made while it
        // was not serving (or before a new version) was routed without it, or by an older one.
        {
            let first = instances.first().map(|i| i.path.clone());
            let header = blocking(move || {
                first
                    .map(|p| SeriesHeader::read(&p))
                    .transpose()
                    .map_err(|e| JobFailure::new("unreadable_header", e.detail))
            })
            .await?;
            if let Some(header) = header
                && let Some(why) = super::bundle_refuses(&accepts, &header, &instances)
            {
                return Err(JobFailure::new(
                    "bundle_refuses",
                    format!("the bundle's [dicom] refuses the series: {why}"),
                ));
            }
        }
        // The route's `report` list, where it has one, else the bundle's.
        let route_report = self
            .config
            .routes
            .iter()
            .find(|r| r.name == job.route && !r.report.is_empty())
            .map(|r| r.report.clone());
        let reported = reported_outputs(&model, route_report.as_ref().unwrap_or(&accepts.report))?;
        if accepts.is_volume() {
            return self
                .process_volume(job, model, pre, &accepts, reported, instances)
                .await;
        }
        let input_shape = model_input_shape(&model, &pre)?;

        // The series' headers, and one check that it is one kind of image.
        let paths: Vec<PathBuf> = instances.iter().map(|s| s.path.clone()).collect();
        let max_frames = accepts.max_frames.unwrap_or(u32::MAX);
        let limits = Limits::default();
        {
            let (paths, limits) = (paths.clone(), limits.clone());
            blocking(move || {
                let headers = paths
                    .iter()
                    .map(|p| pixels::read_header(p, &limits))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(pixel_failure)?;
                pixels::check_series(&headers).map_err(pixel_failure)?;
                if let Some(h) = headers.iter().find(|h| h.frames > max_frames) {
                    return Err(JobFailure::new(
                        "too_many_frames",
                        format!(
                            "an instance has {} frames; the bundle takes at most {max_frames}",
                            h.frames
                        ),
                    ));
                }
                let pixels =
                    series_source_pixels(headers.iter().map(pixels::ImageHeader::total_pixels));
                if pixels > MAX_SERIES_SOURCE_PIXELS {
                    return Err(JobFailure::new(
                        "series_too_large",
                        format!(
                            "the series has {pixels} source pixels in {} instances; a job takes at most {MAX_SERIES_SOURCE_PIXELS}",
                            headers.len()
                        ),
                    ));
                }
                Ok(())
            })
            .await?;
        }

        // Each frame: decode, preprocess, infer (the worker batches with other callers).
        let mut results: Vec<FrameResult> = Vec::new();
        let (mut decode_time, mut infer_time) = (Duration::ZERO, Duration::ZERO);
        // Frames holding no picture (blank: a 1 x 1 image, a constant one, one with a noise
        // floor or a burned-in label only; see `is_blank`) hold nothing to read, and a model
        // stretched over one made a confident finding of it (a review's finding:
        // "misoriented, p = 0.875" of a 1-pixel CT): left out of the series' finding, and a
        // series of nothing else fails.
        let (mut blank_frames, mut noise_frames) = (0usize, 0usize);
        for (index, path) in paths.iter().enumerate() {
            let (path, preprocessing, limits, shape) = (
                path.clone(),
                pre.clone(),
                limits.clone(),
                input_shape.clone(),
            );
            let started = Instant::now();
            let tensors = blocking(move || {
                let pre = preprocessing;
                let source = PixelSource::open(&path, &limits).map_err(pixel_failure)?;
                source
                    .refuse_modality_lut_sequence()
                    .map_err(pixel_failure)?;
                let options = DecodeOptions {
                    colour: Colour::Grey,
                    limits: limits.clone(),
                    ..DecodeOptions::default()
                };
                let mut out = Vec::new();
                let (mut blank, mut noise) = (0usize, 0usize);
                for frame in source.frames(&options) {
                    let frame = frame.map_err(pixel_failure)?;
                    match no_picture(&frame) {
                        Some(NoPicture::Blank) => blank += 1,
                        Some(NoPicture::Noise) => noise += 1,
                        None => out.push((frame.index, model_input(&pre, &frame, &shape)?)),
                    }
                }
                Ok((out, blank, noise))
            })
            .await?;
            let (tensors, blank, noise) = tensors;
            blank_frames += blank;
            noise_frames += noise;
            decode_time += started.elapsed();
            for (frame, tensor) in tensors {
                let started = Instant::now();
                let probabilities = self
                    .infer(job, &model, &pre.input, tensor, &reported)
                    .await?;
                infer_time += started.elapsed();
                results.push(FrameResult {
                    instance_index: index,
                    frame,
                    probabilities,
                });
            }
        }
        if results.is_empty() && noise_frames > 0 {
            return Err(JobFailure::new(
                "noise_image",
                format!(
                    "{noise_frames} frame(s) read as noise (neighbouring pixels uncorrelated, r < {NOISE_CORRELATION}){}: nothing for the model to read",
                    if blank_frames > 0 {
                        format!(", the other {blank_frames} blank")
                    } else {
                        String::new()
                    }
                ),
            ));
        }
        if results.is_empty() && blank_frames > 0 {
            return Err(JobFailure::new(
                "blank_image",
                format!(
                    "every frame ({blank_frames}) holds one pixel value only, or nearly (all but at most 0.5 % and 256 pixels within {NEAR_BLANK_LEVELS} stored levels), or is under {MIN_FRAME_SIDE} pixels on a side (a blank image): nothing for the model to read"
                ),
            ));
        }
        if results.is_empty() {
            return Err(JobFailure::new("no_frames", "no frame was decoded"));
        }
        if blank_frames + noise_frames > 0 {
            tracing::info!(
                job = job.id,
                blank_frames,
                noise_frames,
                "frames holding no picture (blank, or noise) left out of the series' finding"
            );
        }

        // The series' finding per reported output: its highest probability.
        let findings: Vec<SeriesFinding> = reported
            .iter()
            .enumerate()
            .map(|(k, r)| {
                let best = results
                    .iter()
                    .max_by(|a, b| a.probabilities[k].total_cmp(&b.probabilities[k]))
                    .expect("at least one frame");
                let probability = best.probabilities[k];
                SeriesFinding {
                    output: r.output.clone(),
                    label: r.label.clone(),
                    probability,
                    threshold: r.threshold,
                    positive: probability >= r.threshold,
                    instance_index: best.instance_index,
                    frame: best.frame,
                    volume: None,
                }
            })
            .collect();

        stage("decode_preprocess", decode_time);
        stage("inference", infer_time);

        // The heatmap of the first finding on the frame the SC shows, where the bundle asks
        // for one. A heatmap that cannot be made is logged and left out: the result stands.
        let heatmap = match &accepts.heatmap {
            Some(spec) => {
                let started = Instant::now();
                let shown = &findings[0];
                let made = self
                    .heatmap(
                        job,
                        &model,
                        &pre,
                        &input_shape,
                        &paths[shown.instance_index],
                        shown,
                        spec,
                    )
                    .await;
                stage("heatmap", started.elapsed());
                match made {
                    Ok(h) => Some(h),
                    Err(e) => {
                        metrics::counter!("nightingale_pipeline_heatmaps_failed_total", "reason" => e.code)
                            .increment(1);
                        tracing::warn!(job = job.id, bundle = %model.name, reason = e.code, detail = %e.detail,
                            "the heatmap could not be made; the results go without it");
                        None
                    }
                }
            }
            None => None,
        };

        let objects = self
            .deliver(job, &model, &instances, paths, &findings, heatmap)
            .await?;
        Ok((findings, objects, model.version.to_string()))
    }

    /// The series' instances in the spool (arrival order), bounded: the first
    /// `job.instances`, those the job was made for. One that arrived after (as the job
    /// started) is the late instance its rerun takes: processed here too, the job's record
    /// (one instance) disagreed with its SR (two), and the rerun sent the same result again
    /// (a red-team finding).
    fn series_instances(&self, job: &Job) -> Result<Vec<nightingale_dicom::Stored>, JobFailure> {
        let mut instances = self
            .spool
            .series_instances(&job.study_uid, &job.series_uid)
            .map_err(|e| JobFailure::new("spool", e.to_string()))?;
        if instances.is_empty() {
            return Err(JobFailure::new(
                "no_instances",
                "the series is no longer in the spool",
            ));
        }
        made_for(&mut instances, job.instances);
        if instances.len() > MAX_SERIES_INSTANCES {
            return Err(JobFailure::new(
                "too_many_instances",
                format!(
                    "{} instances; at most {MAX_SERIES_INSTANCES} per series",
                    instances.len()
                ),
            ));
        }
        Ok(instances)
    }

    /// `failure`, or `purged` where instances the job was made for left the spool while it
    /// ran (a `spool purge --force`, retention): a file gone mid-job made it fail
    /// `unreadable`, which reads as a corrupt file from the modality (a review's finding).
    async fn purged_instead(&self, job: &Job, failure: JobFailure) -> JobFailure {
        if matches!(failure.code, "no_instances" | "purged") {
            return failure;
        }
        let spool = self.spool.clone();
        let (study, series) = (job.study_uid.clone(), job.series_uid.clone());
        let count = job.instances;
        let missing = blocking(move || {
            let mut listed = spool
                .series_instances(&study, &series)
                .map_err(|e| JobFailure::new("spool", e.to_string()))?;
            made_for(&mut listed, count);
            let gone = listed.iter().filter(|i| !i.path.exists()).count() as u64;
            Ok(count.saturating_sub(listed.len() as u64) + gone)
        })
        .await
        .unwrap_or(0);
        if missing == 0 {
            return failure;
        }
        JobFailure::new(
            "purged",
            format!(
                "{missing} of the {} instances it was made for were deleted from the spool while it ran (a purge); it then failed {failure}",
                job.instances
            ),
        )
    }

    /// The result objects, written durably, and their audit records; returns their rows,
    /// which [`Pipeline::run_job`] records (queues) with the job's end.
    async fn deliver(
        self: &Arc<Self>,
        job: &Job,
        model: &Arc<LoadedModel>,
        instances: &[nightingale_dicom::Stored],
        paths: Vec<PathBuf>,
        findings: &[SeriesFinding],
        heatmap: Option<HeatmapMap>,
    ) -> Result<Vec<ResultObject>, JobFailure> {
        self.still_serving(job, model)?;
        let started = Instant::now();
        let objects = {
            let me = self.clone();
            let job = job.clone();
            let findings = findings.to_vec();
            let model = model.clone();
            let sop_uids: Vec<String> = instances
                .iter()
                .map(|s| s.sop_instance_uid.clone())
                .collect();
            blocking(move || me.write_results(&job, &model, &paths, &sop_uids, &findings, heatmap))
                .await?
        };
        stage("results", started.elapsed());
        let mut rows = Vec::new();
        for (object_rows, kind) in objects {
            self.audit_result(job, model, &object_rows[0], kind).await;
            rows.extend(object_rows);
        }
        Ok(rows)
    }

    /// A volume bundle's job: the series assembled into one volume (slice order, one window,
    /// resampled to the model's depth; [`assemble_volume`]), ONE inference, and the results
    /// as for frames (the SC shows the volume's middle slice; the SR references every
    /// instance).
    async fn process_volume(
        self: &Arc<Self>,
        job: &Job,
        model: Arc<LoadedModel>,
        pre: Preprocessing,
        accepts: &DicomAccepts,
        reported: Vec<Reported>,
        instances: Vec<nightingale_dicom::Stored>,
    ) -> Result<(Vec<SeriesFinding>, Vec<ResultObject>, String), JobFailure> {
        let shape = model_volume_shape(&model, &pre)?;
        let paths: Vec<PathBuf> = instances.iter().map(|s| s.path.clone()).collect();
        let (min, max) = accepts.slices();
        let started = Instant::now();
        let (tensor, plan) = {
            let (paths, pre) = (paths.clone(), pre.clone());
            blocking(move || assemble_volume(&paths, &pre, shape, min, max)).await?
        };
        stage("decode_preprocess", started.elapsed());
        let depth = match tensor.shape() {
            [_, _, d, _, _] | [_, d, _, _] => *d,
            _ => 0,
        };
        let started = Instant::now();
        let probabilities = self
            .infer(job, &model, &pre.input, tensor, &reported)
            .await?;
        stage("inference", started.elapsed());
        let shown = plan.middle();
        let summary = VolumeSummary {
            slices: plan.slices.len(),
            depth,
            order: plan.order.as_str(),
            spacing_mm: plan.spacing_mm,
        };
        let findings: Vec<SeriesFinding> = reported
            .iter()
            .zip(&probabilities)
            .map(|(r, &probability)| SeriesFinding {
                output: r.output.clone(),
                label: r.label.clone(),
                probability,
                threshold: r.threshold,
                positive: probability >= r.threshold,
                instance_index: shown.instance,
                frame: shown.frame,
                volume: Some(summary.clone()),
            })
            .collect();
        let objects = self
            .deliver(job, &model, &instances, paths, &findings, None)
            .await?;
        Ok((findings, objects, model.version.to_string()))
    }

    /// Whether `model`, which the job began on, still serves its bundle: an unload (a
    /// recall) or another version stops the job before its next inference and before its
    /// results are made (it went on inferring on a recalled version, and sent its SR after
    /// the recall: a review's finding).
    /// The same files loaded again (a plain load of what serves, the poller after a touch)
    /// are the same version: the job goes on with them (it started over at every such load,
    /// and a load repeated every second held it and the queue: a re-attack's finding).
    fn still_serving(
        &self,
        job: &Job,
        model: &Arc<LoadedModel>,
    ) -> Result<Arc<LoadedModel>, JobFailure> {
        match self.state.repository.get(&job.bundle, None) {
            Ok(now)
                if Arc::ptr_eq(&now, model)
                    || (now.version == model.version
                        && now.model_sha256 == model.model_sha256
                        && now.manifest_sha256 == model.manifest_sha256) =>
            {
                Ok(now)
            }
            Ok(now) => Err(JobFailure::new(
                "bundle_changed",
                format!(
                    "version {} serves now; the job began on version {}",
                    now.version, model.version
                ),
            )),
            Err(e) => Err(JobFailure::new("bundle_unavailable", e.to_string())),
        }
    }

    /// One inference, audited like a KServe request; returns the reported probabilities.
    async fn infer(
        &self,
        job: &Job,
        model: &Arc<LoadedModel>,
        input: &str,
        tensor: Tensor,
        reported: &[Reported],
    ) -> Result<Vec<f32>, JobFailure> {
        let model = &self.still_serving(job, model)?;
        let inputs = vec![NamedTensor::new(input, tensor)];
        let mut event = AuditEvent {
            kind: EventKind::Inference,
            request_id: format!("pipeline-job-{}", job.id),
            model: model.name.clone(),
            version: model.version.to_string(),
            model_sha256: model.model_sha256.clone(),
            input_sha256: Some(tensors_sha256(&inputs)),
            output_sha256: None,
            rows: Some(1),
            status: 500,
            outcome: Outcome::Failed,
            actor: Some("dicom-pipeline".into()),
            detail: Some(super::audit_uids(
                self.config.audit_uids,
                &[("study", &job.study_uid), ("series", &job.series_uid)],
            ))
            .filter(|d| !d.is_empty()),
        };
        let outputs = model.worker.infer(inputs).await;
        if let Ok(outputs) = &outputs {
            event.output_sha256 = Some(tensors_sha256(outputs));
            event.status = 200;
            event.outcome = Outcome::Ok;
        }
        // Without its audit record a prediction is not used.
        self.state
            .audit
            .record(event)
            .await
            .map_err(|e| JobFailure::new("audit", e.to_string()))?;
        let outputs = outputs.map_err(|e| JobFailure::new("inference", e.to_string()))?;
        reported
            .iter()
            .map(|r| {
                let value = outputs
                    .get(r.position)
                    .and_then(|o| o.tensor.view::<f32>())
                    .and_then(|v| v.iter().nth(r.label_index).copied())
                    .filter(|p| p.is_finite())
                    .ok_or_else(|| {
                        JobFailure::new(
                            "output",
                            format!("output {:?} has no finite FP32 value there", r.output),
                        )
                    })?;
                Ok(value.clamp(0.0, 1.0))
            })
            .collect()
    }

    /// The saliency map of `shown`'s finding on its frame: the frame preprocessed again, and
    /// `/explain` run on it (same methods, budget and worker) with the bundle's
    /// `[dicom.heatmap]` as parameters; audited as an `explain` event of the pipeline.
    #[allow(clippy::too_many_arguments)]
    async fn heatmap(
        &self,
        job: &Job,
        model: &Arc<LoadedModel>,
        pre: &nightingale_models::Preprocessing,
        input_shape: &[usize],
        path: &Path,
        shown: &SeriesFinding,
        spec: &nightingale_models::manifest::DicomHeatmap,
    ) -> Result<HeatmapMap, JobFailure> {
        let tensor = {
            let (path, pre, shape, frame) = (
                path.to_path_buf(),
                pre.clone(),
                input_shape.to_vec(),
                shown.frame,
            );
            blocking(move || {
                let limits = Limits::default();
                let source = PixelSource::open(&path, &limits).map_err(pixel_failure)?;
                source
                    .refuse_modality_lut_sequence()
                    .map_err(pixel_failure)?;
                let options = DecodeOptions {
                    colour: Colour::Grey,
                    limits: limits.clone(),
                    ..DecodeOptions::default()
                };
                let frame = source.frame(frame, &options).map_err(pixel_failure)?;
                model_input(&pre, &frame, &shape)
            })
            .await?
        };
        let mut parameters = std::collections::HashMap::new();
        let mut put = |k: &str, v: serde_json::Value| {
            parameters.insert(k.to_owned(), v);
        };
        put("method", spec.method.clone().into());
        put("output", shown.output.clone().into());
        put("target", shown.label.clone().into());
        if let Some(v) = spec.patch {
            put("patch", v.into());
        }
        if let Some(v) = spec.stride {
            put("stride", v.into());
        }
        if let Some(v) = spec.baseline {
            put("baseline", v.into());
        }
        if let Some(v) = spec.samples {
            put("samples", v.into());
        }
        if let Some(v) = spec.grid {
            put("grid", v.into());
        }
        if let Some(v) = spec.p {
            put("p", v.into());
        }
        if let Some(v) = spec.seed {
            put("seed", v.into());
        }
        let request = crate::http::codec::DecodedRequest {
            id: None,
            inputs: vec![NamedTensor::new(pre.input.clone(), tensor)],
            outputs: Some(vec![]),
            binary_default: false,
            parameters,
        };
        let mut event = AuditEvent {
            kind: EventKind::Explain,
            request_id: format!("pipeline-job-{}", job.id),
            model: model.name.clone(),
            version: model.version.to_string(),
            model_sha256: model.model_sha256.clone(),
            input_sha256: None,
            output_sha256: None,
            rows: Some(1),
            status: 500,
            outcome: Outcome::Failed,
            actor: Some("dicom-pipeline".into()),
            detail: None,
        };
        let started = std::time::Instant::now();
        let explained =
            crate::http::explain::explain_decoded(&self.state, model, request, &mut event).await;
        // One explanation request, as over HTTP, in the statistics and the metrics (audited
        // but never counted, its forward passes were: a red-team finding).
        crate::http::count_call(
            model,
            crate::http::Op::Explain,
            explained.is_ok(),
            crate::http::outcome_of(&explained),
            started.elapsed(),
        );
        if explained.is_ok() {
            event.status = 200;
            event.outcome = Outcome::Ok;
        }
        let uids = super::audit_uids(
            self.config.audit_uids,
            &[("study", &job.study_uid), ("series", &job.series_uid)],
        );
        event.detail = match (uids.is_empty(), event.detail.take()) {
            (true, d) => d,
            (false, Some(d)) => Some(format!("{uids} {d}")),
            (false, None) => Some(uids),
        };
        self.state
            .audit
            .record(event)
            .await
            .map_err(|e| JobFailure::new("audit", e.to_string()))?;
        let explained = explained.map_err(|e| JobFailure::new("heatmap", e.message))?;
        let t = &explained.attribution.tensor;
        let (&[1, h, w], Some(values)) = (t.shape(), t.view::<f32>()) else {
            return Err(JobFailure::new(
                "heatmap",
                format!(
                    "the saliency map has shape {:?}, not [1, H, W] FP32",
                    t.shape()
                ),
            ));
        };
        if [h, w] != pre.size {
            return Err(JobFailure::new(
                "heatmap",
                format!(
                    "the saliency map is {h}x{w}, the model input {:?}",
                    pre.size
                ),
            ));
        }
        let map: Vec<f32> = values.iter().copied().collect();
        let caption = crate::heatmap::caption(&spec.method, &shown.label, &map);
        Ok(HeatmapMap { map, caption })
    }

    /// Builds the SR and the SC, writes them durably into the results folder and queues
    /// them for every destination of the job. Runs on a blocking thread.
    fn write_results(
        &self,
        job: &Job,
        model: &LoadedModel,
        paths: &[PathBuf],
        sop_uids: &[String],
        findings: &[SeriesFinding],
        heatmap: Option<HeatmapMap>,
    ) -> Result<Vec<(Vec<ResultObject>, &'static str)>, JobFailure> {
        let headers = paths
            .iter()
            .map(|p| {
                nightingale_dicom::meta::open_file(p, Some(dicom_dictionary_std::tags::PIXEL_DATA))
                    .map_err(|e| JobFailure::new("unreadable", e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut source =
            SourceSeries::from_instances(headers.iter().map(|h| &**h)).map_err(|e| match e {
                nightingale_dicom::results::ResultError::UnsupportedCharset => {
                    JobFailure::new("unsupported_charset", e.to_string())
                }
                e => JobFailure::new("source_attributes", e.to_string()),
            })?;
        for (index, h) in headers.iter().enumerate() {
            source.note_transfer_syntax(index, h.meta().transfer_syntax());
        }
        let ctx = ResultContext::new(
            &model.name,
            &model.version.to_string(),
            &model.model_sha256,
            &model.manifest.intended_use.summary,
        );
        let coded: Vec<Finding> = findings
            .iter()
            .map(|f| {
                let declared = model
                    .manifest
                    .outputs
                    .iter()
                    .find(|o| o.name == f.output)
                    .and_then(|o| o.finding_code.as_ref());
                Finding {
                    label: match declared {
                        Some(c) => Code::new(&c.value, &c.scheme, &c.meaning),
                        None => finding_code(&model.name, &f.output, &f.label),
                    },
                    probability: f.probability,
                    threshold: f.threshold,
                    positive: f.positive,
                    // A per-frame finding names the image (and frame) it was measured on;
                    // a volume's is the whole series'.
                    measured_on: f.volume.is_none().then(|| MeasuredOn {
                        instance: f.instance_index,
                        frame: (frame_count(&headers[f.instance_index]) > 1).then_some(f.frame + 1),
                    }),
                }
            })
            .collect();
        // The SC shows the frame with the first reported output's highest probability.
        let shown = &findings[0];
        let pixels_source = PixelSource::open(&paths[shown.instance_index], &Limits::default())
            .map_err(pixel_failure)?;
        let frame = pixels_source
            .frame(
                shown.frame,
                &DecodeOptions {
                    voi: Voi::None,
                    ..DecodeOptions::default()
                },
            )
            .map_err(pixel_failure)?;
        let mut rendered = render8(&frame, RenderWindow::Auto).map_err(pixel_failure)?;
        // The heatmap over the rendered frame (the map resampled from the model input onto
        // the frame's pixels through the bundle's preprocessing geometry).
        let legend = match (&heatmap, &model.manifest.preprocessing) {
            (Some(h), Some(pre)) => {
                let geometry = pre.geometry(rendered.rows, rendered.cols);
                rendered.data = crate::heatmap::overlay(
                    &rendered.data,
                    rendered.samples,
                    rendered.rows,
                    rendered.cols,
                    &geometry,
                    &h.map,
                );
                rendered.samples = 3;
                Some(results::Heatmap {
                    caption: h.caption.clone(),
                    colours: crate::heatmap::colours(),
                })
            }
            _ => None,
        };
        let multi_frame = pixels_source.header().frames > 1;
        let source_uid = Uid::parse(&sop_uids[shown.instance_index]).ok_or_else(|| {
            JobFailure::new("source_attributes", "the shown instance's UID is not valid")
        })?;
        // A narrow image (a 60000 x 8 sliver) is widened with black columns so that the
        // burned-in warning is legible on one line.
        let (columns, data) = widen(
            rendered.rows,
            rendered.cols,
            rendered.samples,
            rendered.data,
            SC_MIN_COLUMNS,
        );
        let image = RenderedImage {
            rows: rendered.rows,
            columns,
            pixels: if rendered.samples == 3 {
                RenderedPixels::Rgb(data)
            } else {
                RenderedPixels::Grey(data)
            },
            source_sop_instance_uid: source_uid,
            frame: multi_frame.then_some(shown.frame + 1),
            heatmap: legend,
        };
        let illustrated = image.heatmap.is_some();
        let sc = results::build_sc(&source, &ctx, &coded, image)
            .map_err(|e| JobFailure::new("result_sc", e.to_string()))?;
        // The SR refers to the SC as the illustration of its first finding when the SC
        // shows that finding's heatmap.
        // The SR an earlier job of this series, bundle and route sent (the series grew, or
        // was processed again) is named as this one's predecessor: both stay at the PACS,
        // which can tell which is current (a red-team finding: two COMPLETE reports, the
        // newer not naming the older).
        let predecessor = self
            .store()
            .predecessor_sr(job)
            .map_err(|e| JobFailure::new("results_store", e.to_string()))?
            .and_then(|(series, class, instance)| {
                Some(results::Predecessor {
                    series_instance_uid: Uid::parse(&series)?,
                    sop_class_uid: Uid::parse(&class)?,
                    sop_instance_uid: Uid::parse(&instance)?,
                })
            });
        let sr = results::build_sr_with(
            &source,
            &ctx,
            &coded,
            illustrated.then_some(&sc),
            predecessor.as_ref(),
        )
        .map_err(|e| JobFailure::new("result_sr", e.to_string()))?;

        let dir = Path::new(OBJECTS_DIR).join(job.id.to_string());
        // What an interrupted earlier run of this job wrote (never recorded, never sent).
        self.discard_unrecorded_objects(job);
        let stored: Vec<&str> = job
            .destinations
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .collect();
        // The destinations configured now for the job's route (or, its route gone, those of
        // the job's that are still configured), not those of the configuration it was made
        // under.
        let destinations: Vec<String> = match self.route_destinations(&job.route) {
            Some(now) => now,
            None => {
                let configured = self.configured_destinations();
                stored
                    .iter()
                    .filter(|d| configured.contains(**d))
                    .map(|d| (*d).to_owned())
                    .collect()
            }
        };
        if destinations
            .iter()
            .map(String::as_str)
            .ne(stored.iter().copied())
        {
            tracing::info!(
                job = job.id,
                made_for = stored.len(),
                now = destinations.len(),
                "the job's results go to the destinations configured now, not those of when it was queued"
            );
        }
        let mut out = Vec::new();
        for (object, kind) in [(sr, "SR"), (sc, "SC")] {
            let relative = dir.join(format!("{kind}-{}.dcm", object.sop_instance_uid));
            write_durably(&self.config.results_dir, &relative, &object.bytes)
                .map_err(|e| JobFailure::new("write", e.to_string()))?;
            let row = |destination: &str| ResultObject {
                sop_instance_uid: object.sop_instance_uid.to_string(),
                job_id: job.id,
                kind: kind.to_owned(),
                series_uid: object.series_instance_uid.to_string(),
                sop_class_uid: object.sop_class_uid.to_owned(),
                path: relative.to_string_lossy().into_owned(),
                destination: destination.to_owned(),
                delivery: if destination.is_empty() {
                    "local".into()
                } else {
                    "pending".into()
                },
                attempts: 0,
                next_attempt_ms: now_ms(),
                last_error: None,
            };
            let rows: Vec<ResultObject> = if destinations.is_empty() {
                vec![row("")]
            } else {
                destinations.iter().map(|d| row(d)).collect()
            };
            out.push((rows, kind));
        }
        Ok(out)
    }

    async fn audit_result(
        &self,
        job: &Job,
        model: &LoadedModel,
        object: &ResultObject,
        kind: &str,
    ) {
        let event = AuditEvent {
            kind: EventKind::DicomResult,
            request_id: format!("pipeline-job-{}", job.id),
            model: model.name.clone(),
            version: model.version.to_string(),
            model_sha256: model.model_sha256.clone(),
            input_sha256: None,
            output_sha256: None,
            rows: None,
            status: 200,
            outcome: Outcome::Ok,
            actor: Some("dicom-pipeline".into()),
            detail: Some(
                format!(
                    "kind={kind} {}",
                    super::audit_uids(
                        self.config.audit_uids,
                        &[
                            ("sop_instance", &object.sop_instance_uid),
                            ("study", &job.study_uid),
                            ("series", &job.series_uid),
                        ],
                    )
                )
                .trim_end()
                .to_owned(),
            ),
        };
        if let Err(e) = self.state.audit.record(event).await {
            tracing::error!(error = %e, "audit record of a result object not written");
        }
    }
}

/// Stores a result file in the spool as this node's own result object.
pub(super) fn keep_result_file(
    spool: &nightingale_dicom::Spool,
    file: &Path,
) -> Result<(), String> {
    let bytes = std::fs::read(file).map_err(|e| e.to_string())?;
    spool
        .store_own_result(&bytes)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Number of Frames (0028,0008) of an instance's header; 1 when absent or unreadable (the
/// pixel decoder has already read the frame a finding names, so a count is there when it
/// matters).
fn frame_count(header: &dicom_object::DefaultDicomObject) -> u32 {
    header
        .element_opt(dicom_dictionary_std::tags::NUMBER_OF_FRAMES)
        .ok()
        .flatten()
        .and_then(|e| e.to_int::<u32>().ok())
        .unwrap_or(1)
}

/// The coded concept of a bundle's finding (where its output declares none): the local scheme, a value of its own for the
/// bundle, output and label (SH, 16 characters: `N` and 15 hex digits of their SHA-256; the
/// output's name alone was shared by two bundles with outputs of one name), and a meaning
/// that names the output and the label ("lesion: present"; the label alone, "present",
/// named no finding: a review's finding). The SR cuts the meaning to 64 characters.
fn finding_code(bundle: &str, output: &str, label: &str) -> Code {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(format!("{bundle}\0{output}\0{label}").as_bytes());
    let value = format!("N{}", &hex::encode(digest)[..15]);
    Code::local(&value, &format!("{output}: {label}"))
}

/// The outputs a bundle reports, with their positive label and threshold.
fn reported_outputs(model: &LoadedModel, wanted: &[String]) -> Result<Vec<Reported>, JobFailure> {
    let manifest = &model.manifest;
    let names: Vec<String> = if wanted.is_empty() {
        let mut n: Vec<String> = manifest
            .thresholds
            .iter()
            .map(|t| t.output.clone())
            .collect();
        n.dedup();
        n
    } else {
        wanted.to_vec()
    };
    if names.is_empty() {
        return Err(JobFailure::new(
            "bundle_not_imaging",
            "the bundle reports no output ([dicom] report or [[thresholds]])",
        ));
    }
    let order = &model.worker.metadata().outputs;
    names
        .iter()
        .map(|name| {
            let spec = manifest
                .outputs
                .iter()
                .find(|o| &o.name == name)
                .ok_or_else(|| {
                    JobFailure::new("bundle_not_imaging", format!("no output {name:?}"))
                })?;
            let position = order.iter().position(|o| &o.name == name).ok_or_else(|| {
                JobFailure::new(
                    "bundle_not_imaging",
                    format!("the model has no output {name:?}"),
                )
            })?;
            let label = spec
                .positive_label
                .clone()
                .or_else(|| spec.labels.last().cloned())
                .unwrap_or_else(|| name.clone());
            let label_index = spec
                .labels
                .iter()
                .position(|l| *l == label)
                .unwrap_or(spec.labels.len().saturating_sub(1));
            let threshold = manifest
                .thresholds
                .iter()
                .find(|t| &t.output == name)
                .map(|t| t.value)
                .unwrap_or(0.5) as f32;
            Ok(Reported {
                output: name.clone(),
                label,
                position,
                label_index,
                threshold: threshold.clamp(0.0, 1.0),
            })
        })
        .collect()
}

/// The model's input that the bundle's `[preprocessing]` fills.
fn preprocessed_input<'m>(
    model: &'m LoadedModel,
    pre: &Preprocessing,
) -> Result<&'m nightingale_inference::TensorSpec, JobFailure> {
    model
        .worker
        .metadata()
        .inputs
        .iter()
        .find(|i| i.name == pre.input)
        .ok_or_else(|| JobFailure::new("bundle_not_imaging", "the preprocessed input is unknown"))
}

/// The model input's shape for one image (batch 1), checked against the preprocessing.
fn model_input_shape(
    model: &LoadedModel,
    pre: &nightingale_models::Preprocessing,
) -> Result<Vec<usize>, JobFailure> {
    let spec = preprocessed_input(model, pre)?;
    let shape: Vec<usize> = spec
        .shape
        .iter()
        .map(|&d| if d < 0 { 1 } else { d as usize })
        .collect();
    let [h, w] = pre.size;
    if shape.iter().product::<usize>() != h * w {
        return Err(JobFailure::new(
            "bundle_not_imaging",
            format!(
                "input shape {:?} does not hold one {h}x{w} image",
                spec.shape
            ),
        ));
    }
    Ok(shape)
}

/// A volume bundle's input shape, from the model itself (the engine's metadata).
fn model_volume_shape(model: &LoadedModel, pre: &Preprocessing) -> Result<VolumeShape, JobFailure> {
    let spec = preprocessed_input(model, pre)?;
    let depth = pre
        .volume_depth(&spec.shape)
        .map_err(|e| JobFailure::new("bundle_not_imaging", e))?;
    Ok(VolumeShape {
        rank: spec.shape.len(),
        depth,
    })
}

/// The series (`paths`, arrival order) as one volume model input: every header read and
/// checked (one size and grey photometric interpretation, the slices' geometry and count:
/// [`volume::plan_volume`], the source pixels under [`MAX_VOLUME_SOURCE_PIXELS`]) before any
/// pixel is decoded; then the window (fixed, or the percentiles of every voxel, counted in a
/// first pass over the slices), and the slices decoded one at a time, in volume order, into
/// the resampled input ([`Preprocessing::volume_input`]). Runs on a blocking thread.
pub(crate) fn assemble_volume(
    paths: &[PathBuf],
    pre: &Preprocessing,
    shape: VolumeShape,
    min_slices: u32,
    max_slices: u32,
) -> Result<(Tensor, VolumePlan), JobFailure> {
    let limits = Limits::default();
    let mut headers = Vec::with_capacity(paths.len());
    let mut geometry = Vec::with_capacity(paths.len());
    for path in paths {
        let obj =
            nightingale_dicom::meta::open_file(path, Some(dicom_dictionary_std::tags::PIXEL_DATA))
                .map_err(|e| {
                    pixel_failure(pixels::PixelError::Open {
                        source: Box::new(e),
                    })
                })?;
        let header = pixels::ImageHeader::from_object(&obj, &limits).map_err(pixel_failure)?;
        geometry.push(InstanceGeometry::read(&obj, header.frames).map_err(pixel_failure)?);
        headers.push(header);
    }
    pixels::check_series(&headers).map_err(pixel_failure)?;
    let first = &headers[0];
    if !matches!(
        first.photometric,
        pixels::Photometric::Monochrome1 | pixels::Photometric::Monochrome2
    ) {
        return Err(JobFailure::new(
            "unsupported_photometric",
            format!(
                "a volume is grey-scale (MONOCHROME1 or MONOCHROME2); the series is {}",
                first.photometric.as_str()
            ),
        ));
    }
    let plan = volume::plan_volume(&geometry, min_slices, max_slices)
        .map_err(|e| JobFailure::new(e.reason(), e.to_string()))?;
    let source_pixels = first.frame_pixels() * plan.slices.len() as u64;
    if source_pixels > MAX_VOLUME_SOURCE_PIXELS {
        return Err(JobFailure::new(
            "volume_too_large",
            format!(
                "{} slices of {} x {} are {source_pixels} pixels; at most {MAX_VOLUME_SOURCE_PIXELS} per volume",
                plan.slices.len(),
                first.rows,
                first.cols
            ),
        ));
    }
    let preprocess_failure = |e: PreprocessError| match e {
        PreprocessError::VolumeTooLarge { .. } => {
            JobFailure::new("volume_too_large", e.to_string())
        }
        e => JobFailure::new("preprocess", e.to_string()),
    };
    let options = DecodeOptions {
        colour: Colour::Grey,
        limits: limits.clone(),
        ..DecodeOptions::default()
    };
    // Each slice of the plan, decoded in order; an instance stays open while its frames are
    // read (a multi-frame object is opened once).
    let each_slice = |f: &mut dyn FnMut(&Image<'_>) -> Result<(), JobFailure>| {
        let mut open: Option<(usize, PixelSource)> = None;
        for slice in &plan.slices {
            if open.as_ref().is_none_or(|(i, _)| *i != slice.instance) {
                drop(open.take());
                let source =
                    PixelSource::open(&paths[slice.instance], &limits).map_err(pixel_failure)?;
                source
                    .refuse_modality_lut_sequence()
                    .map_err(pixel_failure)?;
                open = Some((slice.instance, source));
            }
            let (_, source) = open.as_ref().expect("opened above");
            let frame = source.frame(slice.frame, &options).map_err(pixel_failure)?;
            let (slope, intercept) = slice.rescale.unwrap_or((frame.slope, frame.intercept));
            f(&Image {
                rows: frame.rows,
                cols: frame.cols,
                samples: frame.samples,
                data: &frame.data,
                slope,
                intercept,
                monochrome1: frame.monochrome1,
            })?;
        }
        Ok::<(), JobFailure>(())
    };
    // The model input's size, checked before anything is decoded.
    pre.volume_values(plan.slices.len(), shape.depth)
        .map_err(preprocess_failure)?;
    let window = match pre.fixed_window() {
        Some(w) => w,
        None => {
            let mut values = VolumeValues::new();
            each_slice(&mut |image| values.add(image).map_err(preprocess_failure))?;
            pre.volume_window(&values)
                .ok_or_else(|| JobFailure::new("no_frames", "no slice was decoded"))?
        }
    };
    let mut input = pre
        .volume_input(plan.slices.len(), shape.depth, window)
        .map_err(preprocess_failure)?;
    each_slice(&mut |image| input.push(image).map_err(preprocess_failure))?;
    let depth = input.depth();
    let data = input.finish().map_err(preprocess_failure)?;
    let [h, w] = pre.size;
    let dims = if shape.rank == 5 {
        vec![1, 1, depth, h, w]
    } else {
        vec![1, depth, h, w]
    };
    let tensor =
        Tensor::from_vec(dims, data).map_err(|e| JobFailure::new("input_shape", e.to_string()))?;
    Ok((tensor, plan))
}

/// A frame with fewer rows or columns than this holds no picture a model can read (a 1 x 2
/// image was stretched to the model's input and given a finding).
pub(crate) const MIN_FRAME_SIDE: usize = 8;

/// Stored levels within which all but a few of a frame's values lie (at 8 bits stored or
/// more) for it to count as holding no picture: a constant with a noise floor of a level or
/// two, or with a burned-in label, was stretched by a percentile window into a picture.
pub(crate) const NEAR_BLANK_LEVELS: f32 = 4.0;

/// The most pixels outside those levels a blank frame may hold: 0.5 % of the frame, and at
/// most 256 (a small label or marker). A share alone read a small real anatomy on a large
/// shuttered background (64 x 64 of 1280 x 1280: 0.25 %) as blank (a re-attack's finding).
pub(crate) const NEAR_BLANK_OUTSIDE: (f64, f64) = (0.005, 256.0);

/// Below this correlation of neighbouring pixels (the larger of the row and the column
/// neighbours') a frame reads as noise: 0.54 and more in every real image of pydicom's,
/// pydicom-data's and deid-data's test files (16 x 16 thumbnails the lowest), about 0 for
/// white noise (and for compressed bytes taken as native pixels); one direction alone goes
/// to -0.88 in some of those files (`scripts/picture_stats.py`).
pub(crate) const NOISE_CORRELATION: f64 = 0.2;

/// Why a decoded frame holds no picture for a model to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NoPicture {
    /// One value, or nearly, or too small: see [`is_blank`].
    Blank,
    /// Neighbouring pixels uncorrelated: see [`reads_as_noise`].
    Noise,
}

/// Whether a decoded frame holds no picture (a model stretched over a blank or a noise image
/// made a confident finding of it), and why. Not a test of whether a picture is one the
/// model knows.
pub(crate) fn no_picture(frame: &pixels::Frame) -> Option<NoPicture> {
    if is_blank(frame) {
        Some(NoPicture::Blank)
    } else if reads_as_noise(frame) {
        Some(NoPicture::Noise)
    } else {
        None
    }
}

/// Whether a grey frame's neighbouring pixels are uncorrelated: the Pearson correlation of
/// each pixel with its right neighbour, and with the one below, both under
/// [`NOISE_CORRELATION`] (from at most ~65,536 pairs each, on evenly spaced rows).
fn reads_as_noise(frame: &pixels::Frame) -> bool {
    let (rows, cols) = (frame.rows, frame.cols);
    if frame.samples != 1 || rows < 2 || cols < 2 || frame.data.len() != rows * cols {
        return false;
    }
    let step = (rows * cols / 65_536).max(1);
    // Sums of (u, v, uu, vv, uv) over pairs, shifted by the first value (no cancellation
    // on large values).
    let offset = f64::from(frame.data[0]);
    let mut sums = [[0f64; 5]; 2];
    let mut n = 0f64;
    for r in (0..rows - 1).step_by(step) {
        let row = &frame.data[r * cols..(r + 1) * cols];
        let below = &frame.data[(r + 1) * cols..(r + 2) * cols];
        for c in 0..cols - 1 {
            let x = f64::from(row[c]) - offset;
            for (s, y) in sums
                .iter_mut()
                .zip([f64::from(row[c + 1]), f64::from(below[c])])
            {
                let y = y - offset;
                s[0] += x;
                s[1] += y;
                s[2] += x * x;
                s[3] += y * y;
                s[4] += x * y;
            }
            n += 1.0;
        }
    }
    sums.iter().all(|s| {
        let cov = s[4] - s[0] * s[1] / n;
        let (vu, vv) = (s[2] - s[0] * s[0] / n, s[3] - s[1] * s[1] / n);
        // A pair set of one value: not noise (a blank is told apart first).
        vu > 0.0 && vv > 0.0 && cov / (vu * vv).sqrt() < NOISE_CORRELATION
    })
}

/// Whether a decoded frame holds nothing for a model to read: one value only (a constant
/// image), fewer than [`MIN_FRAME_SIDE`] rows or columns, or, in stored values of 8 bits or
/// more, all its values within [`NEAR_BLANK_LEVELS`] levels but [`NEAR_BLANK_OUTSIDE`] (the
/// densest such band of at most 65,536 evenly spaced values, scaled to the frame).
fn is_blank(frame: &pixels::Frame) -> bool {
    let data = &frame.data;
    let Some((first, rest)) = data.split_first() else {
        return true;
    };
    if rest.iter().all(|v| v == first) || frame.rows.min(frame.cols) < MIN_FRAME_SIDE {
        return true;
    }
    if frame.values != pixels::Values::Stored || frame.bits_stored < 8 {
        return false;
    }
    let step = (data.len() / 65_536).max(1);
    let mut sample: Vec<f32> = data.iter().step_by(step).copied().collect();
    sample.sort_unstable_by(f32::total_cmp);
    // The most sampled values within one band of NEAR_BLANK_LEVELS.
    let (mut start, mut densest) = (0, 0);
    for end in 0..sample.len() {
        while sample[end] - sample[start] >= NEAR_BLANK_LEVELS {
            start += 1;
        }
        densest = densest.max(end + 1 - start);
    }
    let n = data.len() as f64;
    let outside = (sample.len() - densest) as f64 / sample.len() as f64 * n;
    let (share, most) = NEAR_BLANK_OUTSIDE;
    outside <= (share * n).min(most)
}

/// One decoded frame preprocessed as the bundle declares, as the model's input tensor.
fn model_input(
    pre: &nightingale_models::Preprocessing,
    frame: &pixels::Frame,
    shape: &[usize],
) -> Result<Tensor, JobFailure> {
    let image = Image {
        rows: frame.rows,
        cols: frame.cols,
        samples: frame.samples,
        data: &frame.data,
        slope: frame.slope,
        intercept: frame.intercept,
        monochrome1: frame.monochrome1,
    };
    let values = pre
        .apply_to_vec(&image)
        .map_err(|e| JobFailure::new("preprocess", e.to_string()))?;
    Tensor::from_vec(shape.to_vec(), values)
        .map_err(|e| JobFailure::new("input_shape", e.to_string()))
}

/// Per-stage latency of the pipeline (`nightingale_pipeline_stage_seconds{stage}`; the
/// series' quiet time is not a stage).
pub(crate) fn stage(name: &'static str, took: Duration) {
    metrics::histogram!("nightingale_pipeline_stage_seconds", "stage" => name)
        .record(took.as_secs_f64());
}

/// The narrowest Secondary Capture: the warning label in the 8-pixel font with a glyph of
/// margin on each side, so it is never clipped or wrapped.
const SC_MIN_COLUMNS: usize = 8 * (results::AI_RESULT_LABEL.len() + 2);

/// `data` (`rows` x `cols`, `samples` bytes per pixel) centred on black columns up to `min`
/// columns; unchanged when it is already that wide. Returns the new width and pixels.
fn widen(rows: usize, cols: usize, samples: usize, data: Vec<u8>, min: usize) -> (usize, Vec<u8>) {
    if cols >= min {
        return (cols, data);
    }
    let left = (min - cols) / 2;
    let (from, to) = (cols * samples, min * samples);
    let mut out = vec![0u8; rows * to];
    for (dst, src) in out.chunks_exact_mut(to).zip(data.chunks_exact(from)) {
        dst[left * samples..left * samples + from].copy_from_slice(src);
    }
    (min, out)
}

fn pixel_failure(e: pixels::PixelError) -> JobFailure {
    JobFailure::new(e.reason(), e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, JobFailure> + Send + 'static,
) -> Result<T, JobFailure> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| JobFailure::new("panic", e.to_string()))?
}

/// Temporary file, fsync, rename, directory fsync: a queued object is on disk.
fn write_durably(root: &Path, relative: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let path = root.join(relative);
    let dir = path.parent().expect("result paths have a folder");
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(&path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Keeps the first `count` of a series' instances (arrival order): those its job was made
/// for. 0 (a job recorded without a count) keeps all.
fn made_for<T>(instances: &mut Vec<T>, count: u64) {
    if let Ok(count) = usize::try_from(count)
        && count > 0
    {
        instances.truncate(count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    use dicom_object::InMemDicomObject;
    use dicom_object::meta::FileMetaTableBuilder;

    /// Red-team finding: an instance that arrived as its series' job started was processed
    /// by the job made for one instance (its SR named two) and again by the rerun.
    #[test]
    fn a_job_takes_the_instances_it_was_made_for() {
        let mut v = vec![1, 2, 3];
        made_for(&mut v, 2);
        assert_eq!(v, [1, 2]);
        let mut v = vec![1, 2];
        made_for(&mut v, 5);
        assert_eq!(v, [1, 2]);
        let mut v = vec![1, 2];
        made_for(&mut v, 0);
        assert_eq!(v, [1, 2]);
    }

    /// A grey 16-bit CT slice of `rows x cols`, every pixel `value` in each of `frames` frames,
    /// at `z` (axial) unless `z` is None.
    fn slice(
        dir: &Path,
        name: &str,
        z: Option<f64>,
        size: (u32, u32),
        frames: u32,
        value: u16,
    ) -> PathBuf {
        let mut obj = InMemDicomObject::new_empty();
        let mut put = |tag, vr, v: PrimitiveValue| obj.put(DataElement::new(tag, vr, v));
        // The names differ in length: one UID each.
        let sop = format!("1.2.826.0.1.3680043.10.1234.3.{}", name.len());
        put(
            tags::SOP_CLASS_UID,
            VR::UI,
            "1.2.840.10008.5.1.4.1.1.2".into(),
        );
        put(tags::SOP_INSTANCE_UID, VR::UI, sop.as_str().into());
        put(
            tags::STUDY_INSTANCE_UID,
            VR::UI,
            "1.2.826.0.1.3680043.10.1234.1".into(),
        );
        put(
            tags::SERIES_INSTANCE_UID,
            VR::UI,
            "1.2.826.0.1.3680043.10.1234.2".into(),
        );
        put(tags::MODALITY, VR::CS, "CT".into());
        put(tags::ROWS, VR::US, PrimitiveValue::from(size.0 as u16));
        put(tags::COLUMNS, VR::US, PrimitiveValue::from(size.1 as u16));
        put(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16));
        put(
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            "MONOCHROME2".into(),
        );
        put(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16u16));
        put(tags::BITS_STORED, VR::US, PrimitiveValue::from(16u16));
        put(tags::HIGH_BIT, VR::US, PrimitiveValue::from(15u16));
        put(
            tags::PIXEL_REPRESENTATION,
            VR::US,
            PrimitiveValue::from(0u16),
        );
        if frames > 1 {
            put(
                tags::NUMBER_OF_FRAMES,
                VR::IS,
                frames.to_string().as_str().into(),
            );
        }
        if let Some(z) = z {
            put(
                tags::IMAGE_POSITION_PATIENT,
                VR::DS,
                format!("-10\\-10\\{z}").as_str().into(),
            );
            put(
                tags::IMAGE_ORIENTATION_PATIENT,
                VR::DS,
                "1\\0\\0\\0\\1\\0".into(),
            );
        }
        // At most 64 Ki values: a larger header is a giant whose pixels are never read.
        let n = ((size.0 * size.1 * frames) as usize).min(1 << 16);
        put(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::U16(vec![value; n].into()),
        );
        let file = obj
            .with_meta(FileMetaTableBuilder::new().transfer_syntax("1.2.840.10008.1.2.1"))
            .unwrap();
        let path = dir.join(name);
        file.write_to_file(&path).unwrap();
        path
    }

    fn fixed(size: usize) -> Preprocessing {
        toml::from_str(&format!(
            "kind = \"image\"\ninput = \"volume\"\nsize = [{size}, {size}]\n\
             [window]\nmethod = \"fixed\"\ncenter = 200.0\nwidth = 400.0\n"
        ))
        .unwrap()
    }

    /// Three slices arriving out of order are stacked by position, windowed with the fixed
    /// window and resampled to two: bins {0, 1} and {1, 2} of the sorted slices (arithmetic:
    /// values 100, 200, 300 over the window 0-400 are 0.25, 0.5, 0.75).
    #[test]
    fn a_series_becomes_one_resampled_volume_in_slice_order() {
        let dir = tempfile::tempdir().unwrap();
        let paths = vec![
            slice(dir.path(), "a", Some(10.0), (4, 4), 1, 300),
            slice(dir.path(), "bb", Some(0.0), (4, 4), 1, 100),
            slice(dir.path(), "ccc", Some(5.0), (4, 4), 1, 200),
        ];
        let shape = VolumeShape {
            rank: 5,
            depth: Some(2),
        };
        let (tensor, plan) = assemble_volume(&paths, &fixed(4), shape, 2, 10).unwrap();
        assert_eq!(tensor.shape(), &[1, 1, 2, 4, 4]);
        let values: Vec<f32> = tensor.view::<f32>().unwrap().iter().copied().collect();
        assert!(
            values[..16].iter().all(|v| (v - 0.375).abs() < 1e-6),
            "{values:?}"
        );
        assert!(
            values[16..].iter().all(|v| (v - 0.625).abs() < 1e-6),
            "{values:?}"
        );
        let order: Vec<usize> = plan.slices.iter().map(|s| s.instance).collect();
        assert_eq!(order, vec![1, 2, 0]);
        assert_eq!(plan.middle().instance, 2);
        // Any depth, as [N, D, H, W]: the slices themselves.
        let (tensor, _) = assemble_volume(
            &paths,
            &fixed(4),
            VolumeShape {
                rank: 4,
                depth: None,
            },
            2,
            10,
        )
        .unwrap();
        assert_eq!(tensor.shape(), &[1, 3, 4, 4]);
    }

    /// Red-team finding: the volume path stacked slices of two patients (same Study/Series
    /// UIDs, another PatientID) into one input. Every slice must share the patient,
    /// modality and SOP class; the failure names the attribute, never the value.
    #[test]
    fn a_volume_of_two_patients_or_modalities_fails_as_mixed_series() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let shape = VolumeShape {
            rank: 5,
            depth: None,
        };
        let with = |path: PathBuf, tag, vr, value: &str| {
            let mut obj = dicom_object::open_file(&path).unwrap();
            obj.put(DataElement::new(tag, vr, PrimitiveValue::from(value)));
            obj.write_to_file(&path).unwrap();
            path
        };
        let a = with(
            slice(d, "a", Some(0.0), (4, 4), 1, 1),
            tags::PATIENT_ID,
            VR::LO,
            "PID-ALPHA-111",
        );
        let same = with(
            slice(d, "bb", Some(1.0), (4, 4), 1, 1),
            tags::PATIENT_ID,
            VR::LO,
            "PID-ALPHA-111",
        );
        assert!(assemble_volume(&[a.clone(), same], &fixed(4), shape, 2, 10).is_ok());
        for (name, tag, vr, value, attribute) in [
            (
                "ccc",
                tags::PATIENT_ID,
                VR::LO,
                "PID-BRAVO-222",
                "PatientID",
            ),
            ("dddd", tags::MODALITY, VR::CS, "MR", "Modality"),
        ] {
            let mut other = slice(d, name, Some(1.0), (4, 4), 1, 1);
            if attribute != "PatientID" {
                other = with(other, tags::PATIENT_ID, VR::LO, "PID-ALPHA-111");
            }
            let other = with(other, tag, vr, value);
            let err = assemble_volume(&[a.clone(), other], &fixed(4), shape, 2, 10).unwrap_err();
            assert_eq!(err.code, "mixed_series", "{err}");
            assert!(err.detail.contains(attribute), "{err}");
            assert!(
                !err.detail.contains(value) && !err.detail.contains("ALPHA"),
                "{err}"
            );
        }
    }

    #[test]
    fn series_that_cannot_be_a_volume_fail_with_their_reason() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let shape = VolumeShape {
            rank: 5,
            depth: None,
        };
        let code = |paths: &[PathBuf], min: u32, max: u32| {
            assemble_volume(paths, &fixed(4), shape, min, max)
                .unwrap_err()
                .code
        };
        let a = slice(d, "a", Some(0.0), (4, 4), 1, 1);
        let b = slice(d, "bb", Some(0.0), (4, 4), 1, 1);
        assert_eq!(code(&[a.clone(), b], 2, 10), "duplicate_position");
        let wide = slice(d, "ccc", Some(1.0), (4, 6), 1, 1);
        assert_eq!(code(&[a.clone(), wide], 2, 10), "mixed_series");
        let multi = slice(d, "dddd", None, (4, 4), 3, 1);
        assert_eq!(code(&[a.clone(), multi.clone()], 2, 10), "multiframe_mixed");
        assert_eq!(code(std::slice::from_ref(&multi), 4, 10), "too_few_slices");
        assert_eq!(code(&[multi], 1, 2), "too_many_slices");
        let unplaced = slice(d, "eeeee", None, (4, 4), 1, 1);
        assert_eq!(code(&[a.clone(), unplaced], 2, 10), "incomplete_geometry");
        // Over 256 Mi source pixels (5 slices of 8192 x 8192, from their headers): refused
        // before any slice is decoded (their pixel data is not even there).
        let giants: Vec<PathBuf> = (0..5)
            .map(|k| {
                let name = "g".repeat(10 + k);
                slice(d, &name, Some(k as f64), (8192, 8192), 1, 1)
            })
            .collect();
        let err = assemble_volume(&giants, &fixed(4), shape, 2, 10).unwrap_err();
        assert_eq!(err.code, "volume_too_large");
        assert!(
            err.detail.contains("5 slices of 8192 x 8192"),
            "{}",
            err.detail
        );
        // A model input over the value limit is refused before anything is decoded.
        let big: Preprocessing = toml::from_str(
            "kind = \"image\"\ninput = \"volume\"\nsize = [4096, 4096]\n\
             [window]\nmethod = \"fixed\"\ncenter = 0.0\nwidth = 1.0\n",
        )
        .unwrap();
        let c = slice(d, "ffffff", Some(1.0), (4, 4), 1, 1);
        let err = assemble_volume(
            &[a, c],
            &big,
            VolumeShape {
                rank: 5,
                depth: Some(8),
            },
            2,
            10,
        )
        .unwrap_err();
        assert_eq!(err.code, "volume_too_large");
    }

    #[test]
    fn a_series_is_bounded_by_its_source_pixels_before_decoding() {
        // 5,000 CT slices of 512 x 512: within the bound.
        let ct = series_source_pixels(std::iter::repeat_n(512 * 512, MAX_SERIES_INSTANCES));
        assert_eq!(ct, 5_000 * 512 * 512);
        assert!(ct <= MAX_SERIES_SOURCE_PIXELS);
        // A 1,000-frame XA run of 1,024 x 1,024 is too.
        assert!(series_source_pixels([1024 * 1024 * 1000]) <= MAX_SERIES_SOURCE_PIXELS);
        // 40 frames of 8,192 x 8,192 (a few KB each when compressed) are not.
        assert!(
            series_source_pixels(std::iter::repeat_n(8192 * 8192, 40)) > MAX_SERIES_SOURCE_PIXELS
        );
        // The sum saturates instead of wrapping.
        assert_eq!(series_source_pixels([u64::MAX, 1]), u64::MAX);
    }

    #[test]
    fn a_finding_is_coded_per_bundle_and_named_by_its_output_and_label() {
        let a = finding_code("lesion-detection", "lesion", "present");
        let b = finding_code("other-bundle", "lesion", "present");
        assert_eq!(a.meaning, "lesion: present");
        assert_eq!(a.scheme, "99NIGHTINGALE");
        assert_ne!(a.value, b.value);
        assert_eq!(a.value.len(), 16);
        assert_eq!(a, finding_code("lesion-detection", "lesion", "present"));
    }

    #[test]
    fn narrow_images_are_centred_on_black_columns() {
        // 3 rows x 2 columns, RGB: each row's pixels land in columns 3 and 4 of 8.
        let data: Vec<u8> = (1..=18).collect();
        let (cols, out) = widen(3, 2, 3, data.clone(), 8);
        assert_eq!(cols, 8);
        assert_eq!(out.len(), 3 * 8 * 3);
        for row in 0..3 {
            let line = &out[row * 24..(row + 1) * 24];
            assert_eq!(&line[9..15], &data[row * 6..(row + 1) * 6]);
            assert!(line[..9].iter().chain(&line[15..]).all(|&v| v == 0));
        }
        assert_eq!(widen(1, 8, 1, vec![7; 8], 8), (8, vec![7; 8]));
        assert!(SC_MIN_COLUMNS >= 8 * results::AI_RESULT_LABEL.len());
    }

    /// A grey frame of stored values (`bits` stored).
    fn grey_frame(rows: usize, cols: usize, bits: u16, data: Vec<f32>) -> pixels::Frame {
        pixels::Frame {
            index: 0,
            rows,
            cols,
            samples: 1,
            data,
            slope: 1.0,
            intercept: 0.0,
            monochrome1: false,
            values: pixels::Values::Stored,
            window: None,
            bits_stored: bits,
        }
    }

    /// A review's finding: only exactly blank frames were left out; a constant with a noise
    /// floor, a label burned into a blank, or a 1 x 2 image was stretched into a picture and
    /// given a confident finding.
    #[test]
    fn frames_holding_no_picture_are_blank() {
        let blank = |f: &pixels::Frame| no_picture(f) == Some(NoPicture::Blank);
        let frame = grey_frame;
        // A deterministic noise floor of -1, 0, +1 levels around 1024.
        let noisy = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|i| 1024.0 + ((i * 7919 % 3) as f32 - 1.0))
                .collect()
        };
        assert!(blank(&frame(1, 1, 16, vec![5.0])));
        assert!(blank(&frame(0, 0, 16, vec![])));
        assert!(blank(&frame(64, 64, 16, vec![1024.0; 64 * 64])));
        assert!(blank(&frame(1, 2, 16, vec![0.0, 4095.0])));
        assert!(blank(&frame(64, 64, 12, noisy(64 * 64))));
        // A label of 16 pixels (0.4 %) at full white burned into a constant.
        let mut labelled = vec![0.0; 64 * 64];
        labelled[..16].fill(4095.0);
        assert!(blank(&frame(64, 64, 12, labelled.clone())));
        // Real anatomy small against a large shuttered background is a picture: 4,096
        // pixels of it (0.25 % of 1280 x 1280) are more than a label (a re-attack's finding).
        let mut shuttered = vec![0.0; 1280 * 1280];
        for r in 0..64 {
            for c in 0..64 {
                shuttered[(600 + r) * 1280 + 600 + c] = 100.0 + ((r * 7 + c * 13) % 50) as f32;
            }
        }
        assert!(!blank(&frame(1280, 1280, 12, shuttered)));
        // Large frames are judged from a sample of their values, the same way.
        assert!(blank(&frame(1024, 1024, 16, noisy(1024 * 1024))));

        // Pictures: a gradient, a low-contrast 8-bit image, a 2 % label, a 1-bit image
        // (two levels are its whole range), values not in stored levels.
        let gradient: Vec<f32> = (0..64 * 64).map(|i| (i % 64) as f32).collect();
        assert!(!blank(&frame(64, 64, 8, gradient)));
        let low: Vec<f32> = (0..64 * 64).map(|i| 100.0 + (i % 8) as f32).collect();
        assert!(!blank(&frame(64, 64, 8, low)));
        labelled[..82].fill(4095.0);
        assert!(!blank(&frame(64, 64, 12, labelled)));
        let bits: Vec<f32> = (0..64 * 64).map(|i| (i % 2) as f32).collect();
        assert!(!blank(&frame(64, 64, 1, bits)));
        let voi = pixels::Frame {
            values: pixels::Values::Voi,
            ..frame(8, 8, 16, (0..64).map(|i| i as f32 / 1000.0).collect())
        };
        assert!(!blank(&voi));
        assert!(!blank(&frame(8, 8, 8, (0..64).map(|i| i as f32).collect())));
    }

    /// A frame of noise reads as no picture; a picture with noise in it does not.
    #[test]
    fn frames_of_noise_hold_no_picture() {
        let frame = |rows, cols, data| grey_frame(rows, cols, 16, data);
        // A xorshift generator: deterministic white noise.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 48) as f32
        };
        let noise: Vec<f32> = (0..256 * 256).map(|_| next()).collect();
        assert_eq!(
            no_picture(&frame(256, 256, noise.clone())),
            Some(NoPicture::Noise)
        );
        // A smooth picture (a disc on a ramp) with that noise at a tenth of its contrast.
        let picture: Vec<f32> = (0..256 * 256)
            .map(|i| {
                let (r, c) = ((i / 256) as f32 - 128.0, (i % 256) as f32 - 100.0);
                let disc = if r * r + c * c < 40.0 * 40.0 {
                    40_000.0
                } else {
                    0.0
                };
                disc + 50.0 * (i % 256) as f32 + noise[i] / 10.0
            })
            .collect();
        assert_eq!(no_picture(&frame(256, 256, picture)), None);
        // Large frames: judged on evenly spaced rows, the same way.
        let big_noise: Vec<f32> = (0..2048 * 1024).map(|_| next()).collect();
        assert_eq!(
            no_picture(&frame(2048, 1024, big_noise)),
            Some(NoPicture::Noise)
        );
        // Colour frames are not judged (the pipeline reads grey).
        let colour = pixels::Frame {
            samples: 3,
            ..frame(16, 16, (0..768).map(|_| next()).collect())
        };
        assert_eq!(no_picture(&colour), None);
    }
}
