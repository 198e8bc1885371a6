//! `GET /metrics`: Prometheus text format, every name prefixed `nightingale_`.

use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::AppState;

/// Installs the process-wide metrics recorder once and returns its handle.
pub fn install_recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Up to the default request deadline (120 s): explanations, DICOM pipeline jobs
            // and requests near their deadline take longer than 10 s, and sat in +Inf alone
            // (a red-team finding).
            let latency = [
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
            ];
            let rows = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full("nightingale_batch_rows".into()), &rows)
                })
                // Without buckets the exporter writes a summary of approximate quantiles (a
                // median of 0.9999 below a minimum of 1 was shown: a red-team finding).
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("nightingale_dicom_spool_group_size".into()),
                        &rows,
                    )
                })
                .expect("bucket lists are not empty")
                .install_recorder()
                .inspect(|_| describe())
                .expect("no other metrics recorder is installed")
        })
        .clone()
}

/// The `# HELP` text of every metric (promtool and Prometheus UIs show it; without it each
/// family lacked one: a red-team finding).
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    for (name, help) in [
        (
            "nightingale_inference_requests_total",
            "KServe v2 inference requests (HTTP and gRPC) by model, version and outcome",
        ),
        (
            "nightingale_explain_requests_total",
            "explanation requests by model, version and outcome",
        ),
        (
            "nightingale_explain_forward_passes_total",
            "forward passes run for explanations",
        ),
        ("nightingale_audit_records_total", "audit records written"),
        (
            "nightingale_audit_write_failures_total",
            "audit group writes that failed (their requests were refused)",
        ),
        (
            "nightingale_audit_lost_records_total",
            "detached audit records given up after their group could not be written",
        ),
        (
            "nightingale_audit_refusals_summarised_total",
            "unauthenticated refusals counted into a summary record instead of one record each",
        ),
        (
            "nightingale_http_connections_refused_total",
            "connections closed at accept: over the connection limits",
        ),
        (
            "nightingale_http_requests_refused_total",
            "requests refused before anything was done for them (503), by reason: open_requests (over max_open_requests), open_requests_per_client (over a client's share of it)",
        ),
        (
            "nightingale_tls_handshake_failures_total",
            "TLS handshakes that failed, by reason (a client certificate refused: unknown_issuer, expired, not_yet_valid, wrong_purpose, ...; handshake: other)",
        ),
        (
            "nightingale_cds_requests_total",
            "CDS Hooks service calls by service and outcome",
        ),
        (
            "nightingale_cds_feedback_total",
            "CDS Hooks feedback entries by service and outcome",
        ),
        (
            "nightingale_cds_feedback_refused_total",
            "CDS Hooks feedback entries refused",
        ),
        (
            "nightingale_cds_unauthorized_total",
            "CDS Hooks calls refused for their token",
        ),
        (
            "nightingale_cds_fhir_fetches_total",
            "FHIR searches made for CDS Hooks calls by outcome",
        ),
        (
            "nightingale_cds_jwks_fetch_failures_total",
            "failed fetches of a trusted EHR's JWKS",
        ),
        (
            "nightingale_cds_store_dropped_cards_total",
            "issued cards the feedback store could not keep",
        ),
        (
            "nightingale_dicom_associations_total",
            "DICOM associations by outcome",
        ),
        (
            "nightingale_dicom_instances_stored_total",
            "instances stored by C-STORE (duplicate or not)",
        ),
        (
            "nightingale_dicom_instances_failed_total",
            "C-STOREs refused, by reason",
        ),
        (
            "nightingale_dicom_received_bytes_total",
            "data set bytes received and held by C-STORE, stored or refused (not those read past a limit and discarded)",
        ),
        (
            "nightingale_dicom_purged_instances_total",
            "instances deleted by retention",
        ),
        (
            "nightingale_dicom_stow_requests_total",
            "STOW-RS requests by HTTP status",
        ),
        (
            "nightingale_dicom_stow_instances_stored_total",
            "instances stored by STOW-RS",
        ),
        (
            "nightingale_dicom_stow_instances_failed_total",
            "STOW-RS parts refused, by reason",
        ),
        (
            "nightingale_dicom_stow_received_bytes_total",
            "STOW-RS body bytes read",
        ),
        (
            "nightingale_dicom_stow_busy_total",
            "STOW-RS requests or parts refused for the STOW memory budget (--dicom-max-inflight-bytes)",
        ),
        (
            "nightingale_dicomweb_retrieved_total",
            "instances sent by WADO-RS, by source",
        ),
        (
            "nightingale_pipeline_series_total",
            "series assembled by the DICOM pipeline, by outcome",
        ),
        (
            "nightingale_pipeline_jobs_total",
            "pipeline jobs ended, by outcome and reason",
        ),
        (
            "nightingale_pipeline_objects_sent_total",
            "result objects sent to a destination, by kind",
        ),
        (
            "nightingale_pipeline_objects_sent_with_warning_total",
            "result objects a destination took with a warning status",
        ),
        (
            "nightingale_pipeline_send_failures_total",
            "result sends that failed (retried)",
        ),
        (
            "nightingale_pipeline_dead_letters_total",
            "result objects given up on after their retries",
        ),
        (
            "nightingale_pipeline_heatmaps_failed_total",
            "heatmaps that could not be made (the job went on without)",
        ),
        (
            "nightingale_pipeline_results_not_indexed_total",
            "result objects the spool could not take",
        ),
        (
            "nightingale_model_load_refusals_total",
            "loads of a model refused (bad bundle, signature, release, validation gate, ...), by model",
        ),
    ] {
        describe_counter!(name, help);
    }
    for (name, help) in [
        ("nightingale_models_loaded", "model versions being served"),
        (
            "nightingale_queue_depth",
            "requests waiting for a model version's worker",
        ),
        (
            "nightingale_cds_override_rate",
            "share of a CDS service's cards overridden, per model version",
        ),
        (
            "nightingale_dicom_associations_active",
            "DICOM associations open now",
        ),
        (
            "nightingale_dicom_spool_free_bytes",
            "free bytes on the DICOM spool's file system",
        ),
        (
            "nightingale_audit_held_records",
            "DICOM audit records held while the trail could not be written, not in it yet",
        ),
    ] {
        describe_gauge!(name, help);
    }
    for (name, help) in [
        (
            "nightingale_request_duration_seconds",
            "KServe v2 inference requests' time in the server",
        ),
        (
            "nightingale_queue_duration_seconds",
            "time requests waited for their batch",
        ),
        (
            "nightingale_compute_duration_seconds",
            "time batches ran on the engine",
        ),
        ("nightingale_batch_rows", "rows per batch run"),
        (
            "nightingale_explain_duration_seconds",
            "explanation requests' time in the server",
        ),
        (
            "nightingale_cds_request_seconds",
            "CDS Hooks calls' time in the server",
        ),
        (
            "nightingale_dicom_store_seconds",
            "C-STORE time from the data set to the durable store",
        ),
        (
            "nightingale_dicom_spool_group_size",
            "instances committed together in one spool group commit",
        ),
        (
            "nightingale_dicom_stow_request_seconds",
            "STOW-RS requests' time in the server",
        ),
        (
            "nightingale_dicom_stow_store_seconds",
            "STOW-RS time to store one part",
        ),
        (
            "nightingale_pipeline_job_seconds",
            "pipeline jobs' time from start to end",
        ),
        (
            "nightingale_pipeline_stage_seconds",
            "pipeline job stages' time, by stage",
        ),
    ] {
        describe_histogram!(name, help);
    }
}

pub async fn render(State(state): State<Arc<AppState>>) -> Response {
    let Some(handle) = &state.metrics else {
        return (StatusCode::NOT_FOUND, "metrics are disabled").into_response();
    };
    let loaded = state.repository.loaded();
    metrics::gauge!("nightingale_models_loaded").set(loaded.len() as f64);
    for m in &loaded {
        metrics::gauge!("nightingale_queue_depth", "model" => m.name.clone(), "version" => m.version.to_string())
            .set(m.worker.queue_depth() as f64);
    }
    let loaded: Vec<(&str, String)> = loaded
        .iter()
        .map(|m| (m.name.as_str(), m.version.to_string()))
        .collect();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        without_unloaded_queues(handle.render(), &loaded),
    )
        .into_response()
}

/// The recorder keeps a gauge once it is set, and the `metrics` facade cannot remove one: the
/// `nightingale_queue_depth` series of a version no longer loaded would stay at its last
/// value for the process's life. Such series are left out of the text here; a version
/// loaded again reappears (its gauge set above before each render).
fn without_unloaded_queues(text: String, loaded: &[(&str, String)]) -> String {
    const SERIES: &str = "nightingale_queue_depth{";
    if !text.lines().any(|l| l.starts_with(SERIES)) {
        return text;
    }
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        if let Some(rest) = line.strip_prefix(SERIES) {
            let labels = rest.split_once('}').map_or("", |(l, _)| l);
            let label = |key: &str| {
                labels.split(',').find_map(|kv| {
                    kv.strip_prefix(key)
                        .and_then(|v| v.strip_prefix("=\""))
                        .and_then(|v| v.strip_suffix('"'))
                })
            };
            let serving = match (label("model"), label("version")) {
                (Some(model), Some(version)) => {
                    loaded.iter().any(|(m, v)| *m == model && v == version)
                }
                _ => true,
            };
            if !serving {
                continue;
            }
        }
        out.push_str(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::without_unloaded_queues;

    #[test]
    fn queue_depth_series_of_unloaded_versions_are_left_out() {
        let text = "# TYPE nightingale_queue_depth gauge\n\
            nightingale_queue_depth{model=\"a\",version=\"1\"} 0\n\
            nightingale_queue_depth{model=\"a\",version=\"2\"} 3\n\
            nightingale_queue_depth{model=\"a-b\",version=\"1\"} 1\n\
            \n\
            # TYPE nightingale_models_loaded gauge\n\
            nightingale_models_loaded 2\n";
        let loaded = [("a", "2".to_owned()), ("a-b", "1".to_owned())];
        assert_eq!(
            without_unloaded_queues(text.to_owned(), &loaded),
            "# TYPE nightingale_queue_depth gauge\n\
            nightingale_queue_depth{model=\"a\",version=\"2\"} 3\n\
            nightingale_queue_depth{model=\"a-b\",version=\"1\"} 1\n\
            \n\
            # TYPE nightingale_models_loaded gauge\n\
            nightingale_models_loaded 2\n"
        );
        // Nothing loaded: no queue series at all; other lines untouched.
        let none = without_unloaded_queues(text.to_owned(), &[]);
        assert!(!none.contains("nightingale_queue_depth{"), "{none}");
        assert!(none.contains("nightingale_models_loaded 2\n"));
    }
}
