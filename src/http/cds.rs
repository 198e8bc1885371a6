//! CDS Hooks 2.0 (issue 10): `GET /cds-services` (discovery, open), `POST /cds-services/{id}`
//! (a hook call) and `POST /cds-services/{id}/feedback`, both with the EHR's JWT, checked by
//! the auth layer against the trusted issuers (`--cds-trust`) with `aud` = the service's URL
//! as called (`audience`).
//!
//! A call is answered within the EHR's patience: what the EHR did not prefetch is fetched
//! from its `fhirServer` (only an allow-listed one, `--cds-fhir-server`) within a deadline,
//! and whatever is still missing is said on an info card, never guessed. Every call and
//! every feedback is audited (service, hookInstance, cards, latency; no patient data).

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use nightingale_decision_support::hooks::{
    CdsResponse, FeedbackRequest, HookRequest, Outcome as Feedback,
};
use nightingale_decision_support::news2::Assessment;
use nightingale_decision_support::service::{Fetched, ServiceError, ServiceKind};
use sha2::{Digest, Sha256};

use super::auth::Caller;
use super::{AppError, AppState};
use crate::audit::{AuditEvent, EventKind, Outcome};
use crate::cds::{FetchBudget, next_link};

/// The largest hook request or feedback body, in bytes (a prefetch of a few hundred
/// Observations is well under 1 MiB).
pub const MAX_BODY_BYTES: usize = 8 << 20;

/// The NEWS2 "model" cards and feedback are counted under.
const NEWS2_MODEL: (&str, &str) = ("news2", "rcp-2017");

/// The service URL a JWT's `aud` must name: `--cds-base-url` or `http(s)://<Host>`, then
/// `/cds-services/{id}` (the feedback endpoint's tokens name the service's URL too).
pub(crate) fn audience(state: &AppState, req: &Request) -> Result<String, String> {
    let path = req.uri().path();
    let service_path = path.strip_suffix("/feedback").unwrap_or(path);
    let cds = state.cds();
    if let Some(base) = &cds.base_url {
        return Ok(format!("{base}{service_path}"));
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .ok_or("the request names no Host")?;
    if !super::is_plain_host(&host) {
        return Err("the Host header is not a host name".into());
    }
    if !cds.any_host && !is_loopback_host(&host) {
        return Err(
            "without --cds-base-url only a loopback Host (localhost, 127.0.0.1, [::1]) gives the token's audience; set --cds-base-url to the URL EHRs call"
                .into(),
        );
    }
    let scheme = if cds.https { "https" } else { "http" };
    Ok(format!("{scheme}://{host}{service_path}"))
}

/// `host` (a Host header: name or address, optional port) names this machine's loopback.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    // `name` or `name:port`, `[v6]` or `[v6]:port`, the port digits only: anything else
    // (`[::1]evil.com`, `localhost:abc`) is not a Host naming this machine (a re-attack's
    // finding; RFC 9110 7.2).
    let port_ok = |port: &str| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
    let name = match host.strip_prefix('[') {
        Some(rest) => {
            let Some((ip, after)) = rest.split_once(']') else {
                return false;
            };
            if !(after.is_empty() || after.strip_prefix(':').is_some_and(port_ok)) {
                return false;
            }
            ip
        }
        None => match host.rsplit_once(':') {
            Some((name, port)) if port_ok(port) => name,
            Some(_) => return false,
            None => host,
        },
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// `GET /cds-services`.
pub(crate) async fn discovery(State(state): State<Arc<AppState>>) -> Response {
    Json(state.cds().services.discovery()).into_response()
}

/// How much memory a JSON body takes once parsed, at most, per byte of its text: a number
/// or an empty array of one or two bytes becomes a 32-byte `serde_json::Value`, an object's
/// short key its own allocation and map entry (about 16x at worst).
const PARSED_JSON_FACTOR: usize = 16;

/// A CDS Hooks body, read under the server's in-flight memory budget like an `/infer` body
/// (charged as it arrives, then for what parsing it may take), so that concurrent calls with
/// large prefetches cannot take more memory than `--max-inflight-bytes`. The ticket goes
/// with the body until the answer is built.
async fn body_of(
    state: &AppState,
    headers: &axum::http::HeaderMap,
    body: Body,
) -> Result<(Bytes, super::Ticket), AppError> {
    let mut ticket = state.admission.receiving()?;
    let bytes = super::read_body_admitted(headers, body, MAX_BODY_BYTES, &mut ticket)
        .await
        .map_err(|e| {
            if e.status == StatusCode::PAYLOAD_TOO_LARGE {
                AppError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("a CDS Hooks body is at most {MAX_BODY_BYTES} bytes"),
                )
            } else {
                e
            }
        })?;
    ticket.take_place(&state.admission)?;
    ticket.charge_at_least(bytes.len().saturating_mul(PARSED_JSON_FACTOR))?;
    Ok((bytes, ticket))
}

fn caller_id(caller: &Option<Extension<Caller>>) -> String {
    caller
        .as_ref()
        .map_or_else(|| "anonymous".to_owned(), |c| c.0.id.clone())
}

/// An audit record of a CDS call or feedback that was refused (4xx, or 5xx before an
/// answer): the service named, the status, the caller; no body, no message (the answer's
/// message is for the caller). An answered call has its own record. Refusals of the EHR's
/// token are recorded by the auth layer ([`audit_refusal`] too).
pub(crate) async fn audit_refusal(
    state: &AppState,
    kind: EventKind,
    path: &str,
    actor: String,
    status: StatusCode,
    request_id: &str,
) {
    let mut detail = format!("path={} refused", printable(path));
    if actor == UNAUTHENTICATED {
        // Anyone can send these: a burst is recorded one by one, then one a second; the
        // rest are counted, named by the next record and summarised a second later.
        use crate::audit::throttle::{Decision, SUMMARY_AFTER};
        let throttle = state.held_audit_of(kind);
        match throttle.decide() {
            Decision::Record { held_before: 0 } => {}
            Decision::Record { held_before } => {
                detail.push_str(&format!(
                    " (after {held_before} more unauthenticated refusals not recorded one by one)"
                ));
            }
            Decision::Hold { schedule_summary } => {
                metrics::counter!("nightingale_audit_refusals_summarised_total").increment(1);
                if schedule_summary {
                    let audit = state.audit.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(SUMMARY_AFTER).await;
                        write_held_summary(&audit, &throttle, kind).await;
                    });
                }
                return;
            }
        }
    }
    let event = AuditEvent {
        status: status.as_u16(),
        outcome: Outcome::from_status(status.as_u16()),
        detail: Some(detail),
        // The id the log and the response carry (it was "-": a review's finding).
        ..AuditEvent::blank(kind, request_id.chars().take(128).collect(), Some(actor))
    };
    if let Err(e) = state.audit.record(event).await {
        tracing::error!(error = %e, "audit record of a refused request not written");
    }
}

/// One record for the unauthenticated refusals of `kind` held back and not yet named by a
/// record (none when there are none).
pub(crate) async fn write_held_summary(
    audit: &crate::audit::AuditLog,
    throttle: &crate::audit::throttle::Throttle,
    kind: EventKind,
) {
    let held = throttle.take_held();
    if held == 0 {
        return;
    }
    let status = StatusCode::UNAUTHORIZED;
    let what = if kind == EventKind::AccessRefused {
        "admin-endpoint"
    } else {
        "CDS Hooks"
    };
    let event = AuditEvent {
        status: status.as_u16(),
        outcome: Outcome::from_status(status.as_u16()),
        detail: Some(format!(
            "{held} unauthenticated {what} requests refused, not recorded one by one (more than one a second)"
        )),
        ..AuditEvent::blank(kind, "-".to_owned(), Some(UNAUTHENTICATED.to_owned()))
    };
    if let Err(e) = audit.record(event).await {
        tracing::error!(error = %e, "audit summary of refused requests not written");
    }
}

/// The actor of a refusal without credentials.
pub(crate) const UNAUTHENTICATED: &str = "unauthenticated";

/// `POST /cds-services/{id}`: the answer, or a refusal, audited either way.
pub(crate) async fn call(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Response {
    let actor = caller_id(&caller);
    let request_id = super::request_id_of(&headers);
    let response = answer_call(state.clone(), caller, &id, headers, body).await;
    // Every refusal of a served service is counted, whatever refused it (counted at each
    // refusal, some were audited and never counted: a red-team finding); an unknown
    // service's id is not a label.
    if response.status() != StatusCode::OK && state.cds().services.get(&id).is_some() {
        let outcome = if response.status().is_server_error() {
            "error"
        } else {
            "rejected"
        };
        metrics::counter!("nightingale_cds_requests_total", "service" => id.clone(), "outcome" => outcome).increment(1);
    }
    if response.status() != StatusCode::OK {
        let path = format!("/cds-services/{id}");
        let status = response.status();
        audit_refusal(
            &state,
            EventKind::CdsHook,
            &path,
            actor,
            status,
            &request_id,
        )
        .await;
    }
    response
}

async fn answer_call(
    state: Arc<AppState>,
    caller: Option<Extension<Caller>>,
    id: &str,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let cds = state.cds();
    let Some(service) = cds.services.get(id) else {
        return AppError::not_found("no such CDS service (GET /cds-services lists them)")
            .into_response();
    };
    let (bytes, mut ticket) = match body_of(&state, &headers, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let request: HookRequest = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            return AppError::bad_request(format!("not a CDS Hooks request: {}", serde_error(&e)))
                .into_response();
        }
    };
    if let Err(e) = nightingale_decision_support::json::check(&bytes) {
        return AppError::bad_request(format!("not a CDS Hooks request: {e}")).into_response();
    }
    if let Err(e) = request.validate(&service.config().hook) {
        return AppError::bad_request(e.to_string()).into_response();
    }

    // What the EHR did not prefetch, and the rest of the searches it prefetched one page of,
    // from its FHIR server when it may be asked.
    let mut request = request;
    let mut fetched = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    let missing = match service.missing_prefetch(&request) {
        Ok(m) => m,
        Err(e) => return AppError::bad_request(e.to_string()).into_response(),
    };
    let paged = request.prefetch.as_ref().map_or(0, |p| {
        p.iter()
            .filter(|(k, v)| service.prefetch().contains_key(*k) && next_link(v).is_some())
            .count()
    });
    // CDS Hooks 2.0: the service may use the FHIR server when the client gives both
    // `fhirServer` and `fhirAuthorization` (it was read without a token too).
    if (!missing.is_empty() || paged > 0)
        && let (Some(server), Some(authorization)) = (
            request.fhir_server.as_deref(),
            request.fhir_authorization.as_ref(),
        )
    {
        if cds.may_fetch(server) {
            let token = Some(authorization.access_token.as_str());
            // What is fetched is held, parsed, with the body until the answer is built:
            // charged to the call's ticket as the body was.
            let budget = FetchBudget::new(cds.fetch_max_bytes, |n| {
                ticket
                    .charge(n.saturating_mul(PARSED_JSON_FACTOR))
                    .map_err(|e| e.message)
            });
            let prefetch = &mut request.prefetch;
            let rest = async {
                if let Some(prefetch) = prefetch {
                    cds.read_rest_of_prefetch(server, token, prefetch, service.prefetch(), &budget)
                        .await;
                }
            };
            (fetched, ()) =
                futures_util::future::join(cds.fetch(server, token, &missing, &budget), rest).await;
            // A search asked for and not read is not "nothing recorded": what it would have
            // held is unknown (a consciousness search that failed let an older "Alert" from
            // the vitals be scored: a red-team finding).
            failed = missing
                .iter()
                .map(|(key, _)| key)
                .filter(|key| !fetched.iter().any(|(k, _)| k == *key))
                .cloned()
                .collect();
        } else {
            tracing::info!(
                service = %service.id(),
                missing = missing.len(),
                paged,
                "prefetch incomplete and fhirServer not allow-listed (--cds-fhir-server): not fetched"
            );
        }
    }

    let now = chrono::Utc::now();
    let client = caller_id(&caller);
    let mut shown = String::new();
    let (response, kind, models): (CdsResponse, &'static str, Vec<(String, String)>) = match service
        .kind()
    {
        ServiceKind::News2 => {
            let fetched = Fetched {
                resources: fetched,
                failed,
            };
            let outcome = match service.evaluate_news2(&request, fetched, now, &cds.limits) {
                Ok(o) => o,
                Err(ServiceError::Request(e)) => {
                    return AppError::bad_request(e.to_string()).into_response();
                }
                Err(e) => return AppError::internal(e.to_string()).into_response(),
            };
            let kind = match &outcome.assessment {
                Assessment::Scored(s) => match s.score.risk.name() {
                    "low–medium" => "low-medium",
                    other => other,
                },
                Assessment::Incomplete(_) => "incomplete",
                Assessment::NotApplicable(_) => "not-applicable",
            };
            cds.remember_cards(
                &outcome.response.cards.iter().collect::<Vec<_>>(),
                service.id(),
                Some(NEWS2_MODEL),
                &client,
                now,
            );
            (
                outcome.response,
                kind,
                vec![(NEWS2_MODEL.0.to_owned(), NEWS2_MODEL.1.to_owned())],
            )
        }
        // The imaging pipeline's results of this patient: one service of their own (every
        // patient-view service carried them, so an EHR calling each showed every finding
        // several times: a review's finding).
        ServiceKind::Imaging => {
            // patient-view names its patient (it answered one found some other way).
            if request.patient_id().is_none() {
                return AppError::bad_request("the hook context has no patientId").into_response();
            }
            let imaging = imaging_cards(&state, service, &request, &fetched, &headers).await;
            let mut models: Vec<(String, String)> = Vec::new();
            let mut jobs = Vec::new();
            for (card, (bundle, version), job) in &imaging {
                // The "more results" card is of no model; feedback on it is taken all the
                // same (refused, it failed the EHR's whole batch: a re-attack's finding).
                let model = (!bundle.is_empty()).then_some((bundle.as_str(), version.as_str()));
                cds.remember_cards(&[card], service.id(), model, &client, now);
                if !bundle.is_empty() && !models.iter().any(|m| &m.0 == bundle && &m.1 == version) {
                    models.push((bundle.clone(), version.clone()));
                }
                if let Some(job) = job
                    && !jobs.contains(job)
                {
                    jobs.push(*job);
                }
            }
            // Which results were shown: their jobs, as the pipeline's records name them
            // (`pipeline-job-N`, with the study and series).
            shown = jobs
                .iter()
                .map(|j| format!("pipeline-job-{j}"))
                .collect::<Vec<_>>()
                .join(",");
            let kind = if imaging.iter().any(|(c, _, _)| {
                c.indicator == nightingale_decision_support::hooks::Indicator::Warning
            }) {
                "warning"
            } else if imaging.is_empty() {
                "empty"
            } else {
                "info"
            };
            (
                CdsResponse {
                    cards: imaging.into_iter().map(|(card, _, _)| card).collect(),
                    system_actions: vec![],
                },
                kind,
                models,
            )
        }
        ServiceKind::Risk => {
            if request.patient_id().is_none() {
                return AppError::bad_request("the hook context has no patientId").into_response();
            }
            let fetched = Fetched {
                resources: fetched,
                failed,
            };
            let (resources, conditions_read) = match service.collect(&request, fetched, &cds.limits)
            {
                Ok(r) => r,
                Err(e) => {
                    return AppError::bad_request(e.to_string()).into_response();
                }
            };
            let answers = match cds
                .evaluate_risk(
                    &state,
                    service,
                    &request,
                    &resources,
                    conditions_read,
                    &caller_id(&caller),
                )
                .await
            {
                Ok(a) => a,
                Err(e) => {
                    tracing::error!(error = %e, "audit record of a CDS risk inference not written");
                    return AppError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the audit trail cannot be written",
                    )
                    .into_response();
                }
            };
            for a in &answers {
                cds.remember_cards(
                    &[&a.card],
                    service.id(),
                    Some((a.model.0.as_str(), a.model.1.as_str())),
                    &client,
                    now,
                );
            }
            // The most urgent outcome names the call.
            let kind = ["warning", "info", "missing", "unavailable"]
                .into_iter()
                .find(|k| answers.iter().any(|a| a.outcome == *k))
                .unwrap_or("empty");
            let models = answers.iter().map(|a| a.model.clone()).collect();
            (
                CdsResponse {
                    cards: answers.into_iter().map(|a| a.card).collect(),
                    system_actions: vec![],
                },
                kind,
                models,
            )
        }
    };
    let body = match serde_json::to_vec(&response) {
        Ok(b) => b,
        Err(e) => return AppError::internal(e.to_string()).into_response(),
    };
    let elapsed = started.elapsed();
    metrics::counter!("nightingale_cds_requests_total", "service" => service.id().to_owned(), "outcome" => kind).increment(1);
    metrics::histogram!("nightingale_cds_request_seconds", "service" => service.id().to_owned())
        .record(elapsed.as_secs_f64());
    let cards: Vec<&str> = response.cards.iter().map(|c| c.uuid.as_str()).collect();
    let event = AuditEvent {
        kind: EventKind::CdsHook,
        request_id: printable(&request.hook_instance),
        model: models
            .iter()
            .map(|m| m.0.as_str())
            .collect::<Vec<_>>()
            .join(","),
        version: models
            .iter()
            .map(|m| m.1.as_str())
            .collect::<Vec<_>>()
            .join(","),
        model_sha256: String::new(),
        input_sha256: Some(hex::encode(Sha256::digest(&bytes))),
        output_sha256: Some(hex::encode(Sha256::digest(&body))),
        rows: None,
        status: 200,
        outcome: Outcome::Ok,
        actor: Some(caller_id(&caller)),
        detail: Some(format!(
            "service={} hook={} outcome={kind} cards={} latency_ms={:.1}{}",
            service.id(),
            service.config().hook,
            cards.join(","),
            elapsed.as_secs_f64() * 1e3,
            if shown.is_empty() {
                String::new()
            } else {
                format!(" results={shown}")
            }
        )),
    };
    if let Err(e) = state.audit.record(event).await {
        // Fail closed: an answer that cannot be audited is not given.
        tracing::error!(error = %e, "audit record of a CDS call not written");
        return AppError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the audit trail cannot be written",
        )
        .into_response();
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// `POST /cds-services/{id}/feedback`: accepted, or refused, audited either way.
pub(crate) async fn feedback(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Response {
    let actor = caller_id(&caller);
    let request_id = super::request_id_of(&headers);
    let response = answer_feedback(state.clone(), caller, &id, headers, body).await;
    if response.status() != StatusCode::OK {
        let path = format!("/cds-services/{id}/feedback");
        audit_refusal(
            &state,
            EventKind::CdsFeedback,
            &path,
            actor,
            response.status(),
            &request_id,
        )
        .await;
    }
    response
}

async fn answer_feedback(
    state: Arc<AppState>,
    caller: Option<Extension<Caller>>,
    id: &str,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Response {
    let cds = state.cds();
    let Some(service) = cds.services.get(id) else {
        return AppError::not_found("no such CDS service (GET /cds-services lists them)")
            .into_response();
    };
    let (bytes, _ticket) = match body_of(&state, &headers, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let request: FeedbackRequest = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            return AppError::bad_request(format!(
                "not a CDS Hooks feedback request: {}",
                serde_error(&e)
            ))
            .into_response();
        }
    };
    if let Err(e) = nightingale_decision_support::json::check(&bytes) {
        return AppError::bad_request(format!("not a CDS Hooks feedback request: {e}"))
            .into_response();
    }
    let actor = caller_id(&caller);
    let events = {
        let ledger = cds.ledger.lock().unwrap_or_else(|p| p.into_inner());
        ledger.accept(service.id(), &actor, &request)
    };
    let events = match events {
        Ok(e) => e,
        Err(e) => {
            metrics::counter!("nightingale_cds_feedback_refused_total", "service" => service.id().to_owned()).increment(1);
            return AppError::bad_request(e.to_string()).into_response();
        }
    };
    let mut recorded = Vec::with_capacity(events.len());
    for e in &events {
        let (model, version) = e.model.clone().unwrap_or_default();
        let outcome = match e.outcome {
            Feedback::Accepted => "accepted",
            Feedback::Overridden => "overridden",
        };
        let event = AuditEvent {
            kind: EventKind::CdsFeedback,
            request_id: e.card.clone(),
            model: model.clone(),
            version: version.clone(),
            model_sha256: String::new(),
            input_sha256: Some(hex::encode(Sha256::digest(&bytes))),
            output_sha256: None,
            rows: None,
            status: 200,
            outcome: Outcome::Ok,
            actor: Some(actor.clone()),
            detail: Some(format!(
                "service={} outcome={outcome} accepted_suggestions={} override_reason={} comment={} outcome_timestamp={}",
                e.service,
                e.accepted_suggestions.len(),
                e.override_reason
                    .as_ref()
                    .map(|c| printable(&format!(
                        "{}|{}",
                        c.system.as_deref().unwrap_or(""),
                        c.code.as_deref().unwrap_or("")
                    )))
                    .unwrap_or_else(|| "-".into()),
                e.has_comment,
                e.outcome_timestamp.to_rfc3339()
            )),
        };
        if let Err(err) = state.audit.record(event.clone()).await {
            tracing::error!(error = %err, "audit record of CDS feedback not written");
            // The items recorded before it are not stored either: the trail says so where
            // it can (an "ok" record stood alone for a 503: a re-attack's finding).
            not_stored(&state, recorded).await;
            return AppError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the audit trail cannot be written",
            )
            .into_response();
        }
        recorded.push(event);
    }
    // A transaction on the store's file: on the blocking pool (written on the async runtime,
    // concurrent posts stalled every other request for seconds: a red-team finding).
    let stored = {
        let (state, events) = (state.clone(), events.clone());
        tokio::task::spawn_blocking(move || match &state.cds().store {
            Some(store) => store.record_feedback(&events).map_err(|e| e.to_string()),
            None => Ok(()),
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
    };
    if let Err(e) = stored {
        tracing::error!(error = %e, "CDS feedback not stored");
        // Each record above said the feedback was taken: the trail says it was not kept
        // (an audit record "ok" stood alone for feedback answered 503: a review's finding).
        not_stored(&state, recorded).await;
        return AppError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the feedback could not be stored; retry later",
        )
        .into_response();
    }
    // Counted once stored (feedback refused by the store was counted, and counted again when
    // the EHR sent it again).
    for e in &events {
        let (model, version) = e.model.clone().unwrap_or_default();
        metrics::counter!(
            "nightingale_cds_feedback_total",
            "service" => e.service.clone(),
            "model" => model,
            "version" => version,
            "outcome" => match e.outcome {
                Feedback::Accepted => "accepted",
                Feedback::Overridden => "overridden",
            }
        )
        .increment(1);
    }
    let previous = cds
        .ledger
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .settle(&events);
    let mut stats = cds.stats.lock().unwrap_or_else(|p| p.into_inner());
    stats.settle(&events, &previous);
    for e in &events {
        let model = e.model.as_ref().map(|(m, v)| (m.as_str(), v.as_str()));
        if let Some(rate) = stats.override_rate(&e.service, model) {
            let (m, v) = e.model.clone().unwrap_or_default();
            metrics::gauge!(
                "nightingale_cds_override_rate",
                "service" => e.service.clone(),
                "model" => m,
                "version" => v
            )
            .set(rate);
        }
    }
    StatusCode::OK.into_response()
}

/// Records that the feedback items of `recorded` (each recorded as taken) were not stored.
async fn not_stored(state: &AppState, recorded: Vec<AuditEvent>) {
    for mut event in recorded {
        event.status = 503;
        event.outcome = Outcome::Failed;
        event.detail = event.detail.map(|d| format!("{d} stored=false"));
        if let Err(err) = state.audit.record(event).await {
            tracing::error!(error = %err, "the record of CDS feedback not stored cannot be written");
        }
    }
}

/// The imaging-results service's cards: the pipeline's results of the patient whose
/// identifier (`--cds-imaging-identifier-system`, every one in use) is the images' Patient
/// ID, found from the service's declared prefetch and what was fetched from the FHIR server
/// (cards were missing where the EHR fetched nothing: a review's finding). Each card comes
/// with its (bundle, version) and its job's id.
async fn imaging_cards(
    state: &Arc<AppState>,
    service: &nightingale_decision_support::service::Service,
    request: &HookRequest,
    fetched: &[(String, nightingale_decision_support::fhir::Resource)],
    headers: &axum::http::HeaderMap,
) -> Vec<(
    nightingale_decision_support::hooks::Card,
    (String, String),
    Option<i64>,
)> {
    use crate::cds_imaging::{Delivery, MAX_CARDS};
    let cds = state.cds();
    let (Some(system), Some(results)) = (&cds.imaging_identifier_system, state.results()) else {
        return Vec::new();
    };
    let mut resources = nightingale_decision_support::fhir::Resources::new();
    for r in crate::cds_imaging::prefetched_patients(
        request,
        |k| service.prefetch().contains_key(k),
        &cds.limits,
    ) {
        resources.add(r);
    }
    for (_, r) in fetched {
        resources.add(r.clone());
    }
    let ids = crate::cds_imaging::patient_identifiers(
        &resources,
        request.patient_id(),
        system,
        chrono::Utc::now(),
    );
    // Each ID without an issuer, and with each issuer configured as this system's.
    let keys: Vec<String> = ids
        .iter()
        .flat_map(|id| {
            std::iter::once(nightingale_dicom::series::patient_id_sha256(id)).chain(
                cds.imaging_issuers
                    .iter()
                    .map(|i| nightingale_dicom::series::patient_key(id, Some(i))),
            )
        })
        .collect();
    if keys.is_empty() {
        return Vec::new();
    }
    let store = results.store.clone();
    let found = tokio::task::spawn_blocking(move || {
        let store = store.lock().unwrap_or_else(|p| p.into_inner());
        let mut jobs = vec![];
        for key in &keys {
            jobs.extend(store.done_jobs_of_patient(key, MAX_CARDS + 1)?);
        }
        jobs.sort_by(|a, b| b.updated_ms.cmp(&a.updated_ms).then(b.id.cmp(&a.id)));
        jobs.dedup_by_key(|j| j.id);
        let more = jobs.len() > MAX_CARDS;
        jobs.truncate(MAX_CARDS);
        let mut with_delivery = Vec::with_capacity(jobs.len());
        for job in jobs {
            let objects = store.objects_of_job(job.id)?;
            let delivery = Delivery::of(
                objects
                    .iter()
                    .map(|o| (o.kind.as_str(), o.destination.as_str(), o.delivery.as_str())),
            );
            with_delivery.push((job, delivery));
        }
        Ok::<_, rusqlite::Error>((with_delivery, more))
    })
    .await;
    let (jobs, more) = match found {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "results store: imaging results not read");
            return Vec::new();
        }
        Err(e) => {
            tracing::error!(error = %e, "imaging results lookup panicked");
            return Vec::new();
        }
    };
    let base = match &cds.base_url {
        Some(b) => b.clone(),
        None => {
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .filter(|h| {
                    !h.is_empty()
                        && h.len() <= 255
                        && h.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b))
                })
                .unwrap_or("localhost");
            format!("{}://{host}", if cds.https { "https" } else { "http" })
        }
    };
    crate::cds_imaging::cards(&jobs, &base, more)
}

/// A serde error without the input's text (it may hold patient data): where it failed.
fn serde_error(e: &serde_json::Error) -> String {
    let message = e.to_string();
    let what = match e.classify() {
        serde_json::error::Category::Io => "cannot be read".to_owned(),
        serde_json::error::Category::Syntax if message.starts_with("recursion limit exceeded") => {
            "JSON nested too deeply".to_owned()
        }
        serde_json::error::Category::Syntax => "malformed JSON".to_owned(),
        // serde's own wording names the field or the expected type, never the value sent
        // (which may be patient data): "missing field `hookInstance`", "invalid type,
        // expected a string".
        serde_json::error::Category::Data => {
            match nightingale_decision_support::fhir::sanitise(&message) {
                m if m == "malformed" => "a field is missing or has the wrong type".to_owned(),
                m => m,
            }
        }
        serde_json::error::Category::Eof => "the JSON ends early".to_owned(),
    };
    format!("{what} (line {}, column {})", e.line(), e.column())
}

/// Text from a client, safe in a log line or an audit field: printable, at most 100 chars.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(100)
        .collect()
}
