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
            let latency = [
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0,
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
                .expect("no other metrics recorder is installed")
        })
        .clone()
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
