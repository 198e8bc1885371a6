//! The CDS Hooks service's state in the server (issue 10): the configured services
//! (`nightingale_decision_support::service`), the JWT verifier of the trusted EHRs, the
//! ledger of issued cards that feedback is joined to, and the FHIR client that fetches what
//! an EHR did not prefetch.
//!
//! HTTP meaning (routes, status codes) is in `http/cds.rs`; the rules (NEWS2, cards, JWT
//! checks) are in the `decision-support` crate.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nightingale_decision_support::cards::{
    AttributionMethod, Contribution, RiskCard, risk_card, risk_missing_card,
    risk_not_applicable_card, risk_unavailable_card,
};
use nightingale_decision_support::feedback::{CardLedger, IssuedCard, OverrideStats};
use nightingale_decision_support::fhir::{Limits, Resource, Resources, is_next, sanitise};
use nightingale_decision_support::hooks::{Card, HookRequest, Source};
use nightingale_decision_support::jwt::{JwtOptions, Verifier};
use nightingale_decision_support::news2::find_patient;
use nightingale_decision_support::risk::{MappingContext, map_features, plain_name};
use nightingale_decision_support::service::{
    CdsSection, Service, ServiceKind, Services, builtin_risk_service, risk_prefetch,
};
use nightingale_inference::explain::{
    KernelShap, KernelShapOptions, LinearLogistic, Link, Perturber, logit,
};
use nightingale_inference::{NamedTensor, Tensor};
use nightingale_models::manifest::{FeatureSpec, Manifest, TaskKind};
use nightingale_models::{LoadedModel, Repository};

use serde_json::Value;

use crate::audit::{AuditEvent, EventKind, Outcome, tensors_sha256};
use crate::http::AppState;

/// `--cds-trust ISSUER=JWKS_FILE` or `ISSUER=JWKS_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedIssuer {
    pub issuer: String,
    pub jwks: JwksSource,
}

/// Where a trusted issuer's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// A JWKS file, read once at start-up.
    File(PathBuf),
    /// A JWKS URL (`https://`, or `http://` on a loopback host), fetched at start-up, every
    /// [`JWKS_REFRESH`], and when a token names a key it does not know (at most every
    /// [`JWKS_MIN_REFETCH`]). A token's `jku` equal to it is accepted.
    Url(String),
}

/// How often a JWKS URL is fetched again.
pub const JWKS_REFRESH: Duration = Duration::from_secs(600);
/// The least time between two fetches of a JWKS URL prompted by unknown keys.
pub const JWKS_MIN_REFETCH: Duration = Duration::from_secs(30);

impl std::str::FromStr for TrustedIssuer {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = || format!("{s:?}: expected ISSUER=JWKS_FILE or ISSUER=https://…/jwks.json");
        // A URL after the `=`; otherwise the issuer is a URL (it has `=` only in a query,
        // rarely): split at the last `=`.
        let (issuer, source) = match s.find("=https://").or_else(|| s.find("=http://")) {
            Some(i) => (&s[..i], &s[i + 1..]),
            None => s.rsplit_once('=').ok_or_else(usage)?,
        };
        let (issuer, source) = (issuer.trim(), source.trim());
        if issuer.is_empty() || source.is_empty() {
            return Err(usage());
        }
        let jwks = if source.starts_with("https://") || source.starts_with("http://") {
            let url = reqwest::Url::parse(source).map_err(|e| format!("{source:?}: {e}"))?;
            let loopback = crate::config::host_is_loopback(&url);
            if url.scheme() != "https" && !loopback {
                return Err(format!(
                    "{source:?}: a JWKS URL must be https:// (http:// only on a loopback host)"
                ));
            }
            JwksSource::Url(source.to_owned())
        } else {
            JwksSource::File(PathBuf::from(source))
        };
        Ok(TrustedIssuer {
            issuer: issuer.to_owned(),
            jwks,
        })
    }
}

/// The CDS settings, resolved from flags and the config file.
#[derive(Debug, Clone)]
pub struct CdsSettings {
    /// `[cds]` (services); absent: the built-in NEWS2 service.
    pub section: CdsSection,
    pub trust: Vec<TrustedIssuer>,
    /// `--cds-base-url`: what the service URLs (the JWTs' `aud`) start with, instead of
    /// `http(s)://<Host header>`.
    pub base_url: Option<String>,
    /// Without `base_url`, the audience is taken from the Host header only when it names a
    /// loopback host (localhost, 127.0.0.1, [::1]), unless this is set (`--insecure` on a
    /// non-loopback address): a Host the client chooses would let a token an EHR minted
    /// for another service (`aud` its URL) be replayed here with that Host.
    pub any_host: bool,
    /// `--cds-fhir-server`: the FHIR servers (URL prefixes) the service may fetch missing
    /// prefetch from; empty: it never fetches.
    pub fhir_servers: Vec<String>,
    /// Deadline of the whole fetch from `fhirServer`.
    pub fetch_timeout: Duration,
    /// Most bytes of FHIR JSON one CDS call reads from `fhirServer`, over all its searches
    /// and their pages ([`FetchBudget`]).
    pub fetch_max_bytes: usize,
    /// The server speaks HTTPS (the service URLs start `https://`).
    pub https: bool,
    /// `--cds-imaging-identifier-system`: the FHIR Patient identifier system whose value is
    /// the DICOM Patient ID; set, patient-view answers carry the imaging pipeline's results.
    pub imaging_identifier_system: Option<String>,
    /// `--cds-imaging-issuer`: Issuer of Patient ID values whose Patient IDs are of that
    /// identifier system (e.g. `NHS`); a series with another issuer is never matched.
    pub imaging_issuers: Vec<String>,
    /// No `[cds]` in the configuration: besides NEWS2, offer a risk service for every bundle
    /// in the repository that declares FHIR sources for its features.
    pub builtin_risk: bool,
    /// The least time between two fetches of a JWKS URL prompted by unknown keys
    /// ([`JWKS_MIN_REFETCH`]).
    pub jwks_min_refetch: Duration,
}

impl Default for CdsSettings {
    fn default() -> Self {
        CdsSettings {
            section: CdsSection::default(),
            trust: Vec::new(),
            base_url: None,
            any_host: false,
            fhir_servers: Vec::new(),
            fetch_timeout: Duration::from_millis(1500),
            fetch_max_bytes: 8 << 20,
            https: false,
            imaging_identifier_system: None,
            imaging_issuers: Vec::new(),
            builtin_risk: true,
            jwks_min_refetch: JWKS_MIN_REFETCH,
        }
    }
}

/// The CDS configuration was refused at start-up.
#[derive(Debug, thiserror::Error)]
pub enum CdsError {
    #[error("[cds]: {0}")]
    Config(#[from] nightingale_decision_support::service::ConfigError),
    #[error("--cds-trust {issuer}: {source}")]
    Jwks {
        issuer: String,
        #[source]
        source: nightingale_decision_support::jwt::JwksError,
    },
    #[error("[cds]: {0}")]
    Unsupported(String),
    #[error("the FHIR client: {0}")]
    Client(String),
}

/// The running CDS Hooks service.
pub struct Cds {
    pub services: Services,
    pub verifier: Verifier,
    pub base_url: Option<String>,
    /// See [`CdsSettings::any_host`].
    pub any_host: bool,
    pub https: bool,
    pub imaging_identifier_system: Option<String>,
    pub imaging_issuers: Vec<String>,
    pub fhir_servers: Vec<String>,
    pub fetch_timeout: Duration,
    pub fetch_max_bytes: usize,
    pub limits: Limits,
    /// Cards issued, for feedback (bounded; the oldest are forgotten first).
    pub ledger: Mutex<CardLedger>,
    pub stats: Mutex<OverrideStats>,
    /// Where cards and feedback are kept across restarts (`None`: in memory only).
    pub store: Option<crate::cds_store::CdsStore>,
    client: reqwest::Client,
    /// The linear-logistic form of each served model version, read once from its ONNX file
    /// (`None`: another kind of model, attributed one input at a time).
    linear: Mutex<LinearForms>,
    /// When each JWKS URL was last fetched because a token named an unknown key.
    jwks_refetched: Mutex<BTreeMap<String, std::time::Instant>>,
    jwks_min_refetch: Duration,
}

/// The linear-logistic form of a loaded model for one class, if it has one.
type LinearForms = BTreeMap<LinearKey, Option<Arc<LinearLogistic>>>;

/// What a linear form depends on: the model version, the exact file loaded (a version
/// reloaded with another file is another model), the feature count and the class whose
/// log-odds it gives (the form of one class is the other's negated: keyed by version alone,
/// the first request's class served every later one, a red-team finding).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct LinearKey {
    model: String,
    version: u64,
    model_sha256: String,
    n_features: usize,
    positive: usize,
}

/// The bundles of `root` whose manifests declare a FHIR source for a tabular feature, with
/// their manifests. A manifest is read as the repository reads it (a regular file, bounded,
/// its signature checked under the repository's policy): one the repository refuses (a
/// signature that does not verify, a link out of the folder, an oversized file) is skipped,
/// so that no service is described, nor any prefetch asked for, from unverified text.
fn bundles_with_fhir_sources(repository: &Repository) -> Vec<Manifest> {
    let Ok(names) = repository.scan() else {
        return vec![];
    };
    let policy = &repository.options().signatures;
    names
        .iter()
        .filter_map(|name| {
            let m = nightingale_models::Bundle::open_with(&repository.root().join(name), policy)
                .ok()?
                .manifest;
            (m.task == TaskKind::TabularRisk && !features_of(&m).is_empty() && {
                let f = features_of(&m);
                f.iter().any(|f| f.code.is_some() || f.fhir.is_some())
            })
            .then_some(m)
        })
        .collect()
}

/// The features of a manifest's (first) tabular input.
fn features_of(m: &Manifest) -> &[FeatureSpec] {
    m.inputs
        .iter()
        .find(|i| !i.features.is_empty())
        .map(|i| i.features.as_slice())
        .unwrap_or_default()
}

/// A bundle's answer to a risk service call.
pub struct RiskAnswer {
    pub card: Card,
    /// The bundle and version behind the card (version `-` when none served).
    pub model: (String, String),
    /// `warning`, `info`, `missing` or `unavailable`.
    pub outcome: &'static str,
}

/// A risk call could not be answered at all.
#[derive(Debug, thiserror::Error)]
pub enum RiskError {
    /// An inference's audit record could not be written (fail closed).
    #[error("the audit trail cannot be written: {0}")]
    Audit(String),
}

/// Cards remembered for feedback.
const LEDGER_CAPACITY: usize = 100_000;

impl Cds {
    /// The service as configured. Risk services without `prefetch` get the templates their
    /// bundles' features need (read from the manifests in `repository`); with
    /// `builtin_risk`, every bundle there that declares FHIR sources gets a risk service
    /// `nightingale-{bundle}` on `patient-view`.
    pub fn new(settings: &CdsSettings, repository: &Repository) -> Result<Cds, CdsError> {
        let mut section = settings.section.clone();
        let manifests = bundles_with_fhir_sources(repository);
        if settings.builtin_risk {
            for m in &manifests {
                if m.thresholds.is_empty()
                    || section
                        .services
                        .iter()
                        .any(|s| s.id == format!("nightingale-{}", m.name))
                {
                    continue;
                }
                section.services.push(builtin_risk_service(
                    &m.name,
                    &format!(
                        "Risk from the {} model bundle, with the factors behind it for this patient. {}",
                        m.name, m.description
                    ),
                    risk_prefetch(features_of(m)),
                ));
            }
        }
        // The imaging pipeline's results: a service of their own, built in where a
        // Patient ID's system is given and no `[[cds.services]]` entry of that kind is.
        match (
            &settings.imaging_identifier_system,
            section
                .services
                .iter()
                .any(|s| s.kind == ServiceKind::Imaging),
        ) {
            (Some(_), false) => section
                .services
                .push(nightingale_decision_support::service::builtin_imaging_service()),
            (None, true) => {
                return Err(CdsError::Unsupported(
                    "an imaging service needs --cds-imaging-identifier-system (the FHIR identifier system of the images' Patient ID)".into(),
                ));
            }
            _ => {}
        }
        for s in &mut section.services {
            if s.kind == ServiceKind::Risk && s.prefetch.is_none() {
                let features = s
                    .bundles
                    .iter()
                    .filter_map(|b| manifests.iter().find(|m| &m.name == b))
                    .flat_map(|m| features_of(m).iter());
                s.prefetch = Some(risk_prefetch(features));
            }
        }
        let services = section.validate()?;
        // A risk service naming a bundle the repository does not hold (a typo) starts, its
        // cards saying the model is not serving: said once at start (a review's finding).
        let known: Vec<String> = repository.index().into_iter().map(|e| e.name).collect();
        services.warn_unknown_bundles(|b| known.iter().any(|k| k == b));
        let mut verifier = Verifier::new(JwtOptions::default());
        for t in &settings.trust {
            match &t.jwks {
                JwksSource::File(path) => verifier.trust_file(&t.issuer, path),
                JwksSource::Url(url) => verifier.trust_url(&t.issuer, url),
            }
            .map_err(|source| CdsError::Jwks {
                issuer: t.issuer.clone(),
                source,
            })?;
        }
        let client = reqwest::Client::builder()
            .timeout(settings.fetch_timeout)
            .connect_timeout(settings.fetch_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| CdsError::Client(e.to_string()))?;
        Ok(Cds {
            services,
            verifier,
            base_url: settings
                .base_url
                .as_ref()
                .map(|b| b.trim_end_matches('/').to_owned()),
            any_host: settings.any_host,
            https: settings.https,
            imaging_identifier_system: settings.imaging_identifier_system.clone(),
            imaging_issuers: settings.imaging_issuers.clone(),
            fhir_servers: settings.fhir_servers.clone(),
            fetch_timeout: settings.fetch_timeout,
            fetch_max_bytes: settings.fetch_max_bytes,
            limits: Limits::default(),
            ledger: Mutex::new(CardLedger::new(LEDGER_CAPACITY)),
            stats: Mutex::new(OverrideStats::default()),
            store: None,
            client,
            linear: Mutex::new(BTreeMap::new()),
            jwks_refetched: Mutex::new(BTreeMap::new()),
            jwks_min_refetch: settings.jwks_min_refetch,
        })
    }

    /// Keeps cards and feedback in `store` from now on, after refilling the ledger of issued
    /// cards and the override counts from it.
    pub fn with_store(
        mut self,
        store: crate::cds_store::CdsStore,
    ) -> Result<Cds, crate::cds_store::StoreError> {
        let ledger = self.ledger.get_mut().unwrap_or_else(|p| p.into_inner());
        let stats = self.stats.get_mut().unwrap_or_else(|p| p.into_inner());
        let (cards, feedback) = store.restore(ledger, stats)?;
        for (service, model, accepted, overridden) in stats.iter() {
            let (m, v) = model.unwrap_or_default();
            metrics::gauge!("nightingale_cds_override_rate", "service" => service.to_owned(),
                "model" => m.to_owned(), "version" => v.to_owned())
            .set(overridden as f64 / (accepted + overridden).max(1) as f64);
        }
        tracing::info!(store = %store.path().display(), cards, feedback, "CDS feedback store open");
        self.store = Some(store);
        Ok(self)
    }

    /// Fetches the JWKS of every issuer trusted by URL and replaces its keys; a failed fetch
    /// is logged and counted, and the keys the issuer had stay. Returns how many succeeded.
    pub async fn refresh_jwks(&self) -> usize {
        let urls: Vec<(String, String)> = self
            .verifier
            .urls()
            .map(|(i, u)| (i.to_owned(), u.to_owned()))
            .collect();
        let mut ok = 0;
        for (issuer, url) in urls {
            match self.fetch_jwks(&issuer, &url).await {
                Ok(keys) => {
                    ok += 1;
                    tracing::info!(issuer = %issuer, url = %without_userinfo(&url), keys, "JWKS fetched");
                }
                Err(why) => {
                    metrics::counter!("nightingale_cds_jwks_fetch_failures_total").increment(1);
                    tracing::warn!(issuer = %issuer, url = %without_userinfo(&url), reason = %why, "JWKS not fetched; the keys it had stay");
                }
            }
        }
        ok
    }

    /// A token named a key no trusted issuer has: fetch the JWKS URLs again (keys rotate),
    /// each at most every [`CdsSettings::jwks_min_refetch`]. Whether any was fetched.
    pub async fn refetch_jwks(&self) -> bool {
        let due = {
            let mut last = self
                .jwks_refetched
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let now = std::time::Instant::now();
            let due: Vec<(String, String)> = self
                .verifier
                .urls()
                .filter(|(i, _)| {
                    last.get(*i)
                        .is_none_or(|t| now - *t >= self.jwks_min_refetch)
                })
                .map(|(i, u)| (i.to_owned(), u.to_owned()))
                .collect();
            for (i, _) in &due {
                last.insert(i.clone(), now);
            }
            due
        };
        let mut any = false;
        for (issuer, url) in due {
            match self.fetch_jwks(&issuer, &url).await {
                Ok(_) => any = true,
                Err(why) => {
                    metrics::counter!("nightingale_cds_jwks_fetch_failures_total").increment(1);
                    tracing::warn!(issuer = %issuer, url = %without_userinfo(&url), reason = %why, "JWKS not fetched");
                }
            }
        }
        any
    }

    async fn fetch_jwks(&self, issuer: &str, url: &str) -> Result<usize, String> {
        let limit = nightingale_decision_support::jwt::MAX_JWKS_BYTES as usize;
        let mut res = self
            .client
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    "timed out".to_owned()
                } else {
                    "cannot connect".to_owned()
                }
            })?;
        if !res.status().is_success() {
            return Err(format!("HTTP {}", res.status().as_u16()));
        }
        if res.content_length().is_some_and(|n| n > limit as u64) {
            return Err(format!("the JWKS is over {limit} bytes"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = res
            .chunk()
            .await
            .map_err(|_| "the response broke off".to_owned())?
        {
            if body.len() + chunk.len() > limit {
                return Err(format!("the JWKS is over {limit} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        self.verifier
            .refresh(issuer, &body)
            .map_err(|e| e.to_string())
    }

    /// Remembers the cards of an answer for their feedback (the ledger, and the store).
    /// `client`: the caller they are issued to, the only one whose feedback on them counts.
    pub fn remember_cards(
        &self,
        cards: &[&Card],
        service: &str,
        model: Option<(&str, &str)>,
        client: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) {
        self.ledger
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(cards.iter().copied(), service, model, client, now);
        if let Some(store) = &self.store {
            store.record_cards(cards.iter().map(|c| {
                (
                    c.uuid.clone(),
                    IssuedCard {
                        service: service.to_owned(),
                        model: model.map(|(m, v)| (m.to_owned(), v.to_owned())),
                        client: Some(client.to_owned()),
                        issued_at: now,
                        suggestions: c
                            .suggestions
                            .iter()
                            .filter_map(|s| s.uuid.clone())
                            .collect(),
                    },
                )
            }));
        }
    }

    /// The built-in services of `repository` and no trusted issuer: discovery answers,
    /// every call is 401.
    pub fn builtin(repository: &Repository) -> Cds {
        Cds::new(&CdsSettings::default(), repository)
            .expect("the built-in CDS configuration is valid")
    }

    /// Whether the service may fetch from this `fhirServer`: an allow-listed URL or a path
    /// below one. A URL with a dot segment (`/r4/../other`), a percent-escape (`%2e%2e`), a
    /// backslash, a query or a fragment is refused whatever its prefix: a URL library
    /// resolves those, so the text compared would not be where the request goes.
    pub fn may_fetch(&self, fhir_server: &str) -> bool {
        if !plain_url(fhir_server) {
            return false;
        }
        self.fhir_servers.iter().any(|allowed| {
            let allowed = allowed.trim_end_matches('/');
            fhir_server == allowed
                || fhir_server
                    .strip_prefix(allowed)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
    }

    /// Fetches FHIR queries (relative to `fhir_server`, which [`Cds::may_fetch`] allowed)
    /// with the EHR's bearer token, all at once, within the fetch deadline and the call's
    /// `budget`. A search answered in pages is read to its last page
    /// ([`Cds::read_rest_of_search`]). Returns what could be read; each failure is logged
    /// (without the query: it holds the patient's id) and counted, and left for the
    /// assessment to report as missing data.
    pub async fn fetch(
        &self,
        fhir_server: &str,
        token: Option<&str>,
        queries: &[(String, String)],
        budget: &FetchBudget<'_>,
    ) -> Vec<(String, Resource)> {
        let base = fhir_server.trim_end_matches('/');
        let deadline = tokio::time::Instant::now() + self.fetch_timeout;
        let fetches = queries.iter().map(|(key, query)| {
            let query = query.trim_start_matches('/');
            // A path that a URL library would resolve elsewhere is not sent (the
            // templates are rendered with dot-only values refused; this is the last guard).
            let resolvable = has_space_or_control(query)
                || resolves_elsewhere(query.split(['?', '#']).next().unwrap_or_default());
            let url = format!("{base}/{query}");
            async move {
                if resolvable {
                    tracing::warn!(prefetch = %key, "FHIR fetch refused: its path would resolve elsewhere (a dot segment, an escape, whitespace or a control character)");
                    fetch_outcome("refused");
                    return None;
                }
                let outcome =
                    tokio::time::timeout_at(deadline, self.get_json(&url, token, budget)).await;
                let mut value = match outcome {
                    Ok(Ok(page)) => page,
                    Ok(Err(why)) => {
                        tracing::warn!(prefetch = %key, reason = %why, "FHIR fetch failed");
                        fetch_outcome("failed");
                        return None;
                    }
                    Err(_) => {
                        tracing::warn!(prefetch = %key, timeout_ms = self.fetch_timeout.as_millis() as u64, "FHIR fetch timed out");
                        fetch_outcome("timeout");
                        return None;
                    }
                };
                fetch_outcome("ok");
                self.read_rest_of_search(base, token, key, &mut value, deadline, budget)
                    .await;
                match Resource::from_value(&value, &self.limits) {
                    Ok(r) => Some((key.clone(), r)),
                    Err(e) => {
                        tracing::warn!(prefetch = %key, reason = %format!("not FHIR JSON: {e}"), "FHIR fetch failed");
                        fetch_outcome("failed");
                        None
                    }
                }
            }
        });
        futures_util::future::join_all(fetches)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Reads the rest of the searches the EHR prefetched one page of (a Bundle with a `next`
    /// link), from `fhir_server` ([`Cds::may_fetch`] allowed it) with the EHR's token, all
    /// at once within the fetch deadline: each such prefetch entry becomes its pages'
    /// entries in one Bundle, as if the EHR had sent the whole result. Only the entries
    /// under `declared` keys (the service's prefetch templates) are read on: a request may
    /// carry any number of other keys, and each would cost up to [`MAX_SEARCH_PAGES`]
    /// fetches. The pages are read within the call's `budget`.
    pub async fn read_rest_of_prefetch(
        &self,
        fhir_server: &str,
        token: Option<&str>,
        prefetch: &mut BTreeMap<String, Value>,
        declared: &BTreeMap<String, String>,
        budget: &FetchBudget<'_>,
    ) {
        let base = fhir_server.trim_end_matches('/');
        let deadline = tokio::time::Instant::now() + self.fetch_timeout;
        let searches = prefetch
            .iter_mut()
            .filter(|(k, v)| declared.contains_key(*k) && next_link(v).is_some())
            .map(|(key, value)| {
                self.read_rest_of_search(base, token, key, value, deadline, budget)
            });
        futures_util::future::join_all(searches).await;
    }

    /// Follows `bundle`'s `next` links (FHIR's paging) and appends each page's entries to it,
    /// taking the page's links, until a page has no `next` link. Stops early, leaving the
    /// last `next` link in place (so the Bundle still reads as one part of a longer result
    /// and what it lacks counts as possibly missing, never as absent), when: a link is not on
    /// `base` (the EHR's token goes to the allow-listed FHIR server only), a link was read
    /// already (a server paging in a loop), [`MAX_SEARCH_PAGES`] pages were read, a page
    /// would pass the call's `budget` or the resource limit, a page is not a Bundle, or the
    /// deadline passes.
    async fn read_rest_of_search(
        &self,
        base: &str,
        token: Option<&str>,
        key: &str,
        bundle: &mut Value,
        deadline: tokio::time::Instant,
        budget: &FetchBudget<'_>,
    ) {
        let mut pages = 1;
        let mut read = BTreeSet::new();
        let mut held = resources_in(bundle);
        while let Some(next) = next_link(bundle) {
            let stop = if pages >= MAX_SEARCH_PAGES {
                Some("more pages than are read")
            } else if !on_server(base, next) {
                fetch_outcome("refused");
                Some("a next link that is not on the fhirServer (not followed)")
            } else if !read.insert(next.to_owned()) {
                Some("a next link to a page read already")
            } else {
                None
            };
            if let Some(why) = stop {
                tracing::warn!(prefetch = %key, pages, reason = why,
                    "FHIR search not read to its end; what it lacks counts as possibly missing");
                return;
            }
            let url = next.to_owned();
            let page = match tokio::time::timeout_at(deadline, self.get_json(&url, token, budget))
                .await
            {
                Ok(Ok(page)) => page,
                Ok(Err(why)) => {
                    tracing::warn!(prefetch = %key, pages, reason = %why, "FHIR search page failed");
                    fetch_outcome("failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!(prefetch = %key, pages, timeout_ms = self.fetch_timeout.as_millis() as u64, "FHIR search page timed out");
                    fetch_outcome("timeout");
                    return;
                }
            };
            match accept_page(bundle, page, held, &self.limits) {
                Ok(added) => held += added,
                Err(why) => {
                    tracing::warn!(prefetch = %key, pages, reason = %why, "FHIR search page refused");
                    fetch_outcome("failed");
                    return;
                }
            }
            fetch_outcome("ok");
            pages += 1;
        }
    }

    /// GETs `url` as FHIR JSON, its bytes taken from `budget` as they arrive.
    async fn get_json(
        &self,
        url: &str,
        token: Option<&str>,
        budget: &FetchBudget<'_>,
    ) -> Result<Value, String> {
        let mut req = self
            .client
            .get(url)
            .header(reqwest::header::ACCEPT, "application/fhir+json");
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let mut res = req.send().await.map_err(|e| {
            if e.is_timeout() {
                "timed out".to_owned()
            } else if e.is_connect() {
                "cannot connect".to_owned()
            } else {
                "request failed".to_owned()
            }
        })?;
        if !res.status().is_success() {
            return Err(format!("HTTP {}", res.status().as_u16()));
        }
        if let Some(n) = res.content_length() {
            budget.fits(n)?;
        }
        let mut body = Vec::new();
        while let Some(chunk) = res
            .chunk()
            .await
            .map_err(|_| "the response broke off".to_owned())?
        {
            budget.take(chunk.len())?;
            body.extend_from_slice(&chunk);
        }
        // Parsed on a blocking thread: a page of megabytes takes a runtime thread tens of
        // milliseconds, which every other request on it would wait for.
        // A key named twice in one object is refused ([`nightingale_decision_support::json`]).
        tokio::task::spawn_blocking(move || {
            let value = serde_json::from_slice::<Value>(&body)
                .map_err(|e| format!("not FHIR JSON: {}", sanitise(&e.to_string())))?;
            nightingale_decision_support::json::check(&body)
                .map_err(|e| format!("not FHIR JSON: {e}"))?;
            Ok(value)
        })
        .await
        .map_err(|_| "the page could not be parsed".to_owned())?
    }
}

/// What one CDS call may still read from its FHIR server: [`CdsSettings::fetch_max_bytes`]
/// over all of the call's fetched searches and pages together (they are read at once), each
/// byte also charged, as it arrives, to the server's in-flight memory budget through
/// `charge` (the call's admission ticket; `--max-inflight-bytes`). A response that would
/// pass either is refused where it stands, and its search is left as missing or partial.
/// Bytes read stay taken until the call ends, a refused page's too.
pub struct FetchBudget<'a> {
    cap: usize,
    state: Mutex<(usize, Charge<'a>)>,
}

type Charge<'a> = Box<dyn FnMut(usize) -> Result<(), String> + Send + 'a>;

impl<'a> FetchBudget<'a> {
    /// `cap` bytes for the call, each charged to `charge` as it is read.
    pub fn new(cap: usize, charge: impl FnMut(usize) -> Result<(), String> + Send + 'a) -> Self {
        FetchBudget {
            cap,
            state: Mutex::new((cap, Box::new(charge))),
        }
    }

    fn over(&self) -> String {
        format!(
            "the call's FHIR responses would pass the {} bytes one call may read",
            self.cap
        )
    }

    /// Whether a response of `n` declared bytes fits what is left (nothing is taken).
    fn fits(&self, n: u64) -> Result<(), String> {
        let left = self.state.lock().unwrap_or_else(|p| p.into_inner()).0;
        if n > left as u64 {
            return Err(self.over());
        }
        Ok(())
    }

    /// Takes `n` bytes read: from what the call may read, and from the server's budget.
    fn take(&self, n: usize) -> Result<(), String> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if n > state.0 {
            return Err(self.over());
        }
        (state.1)(n)?;
        state.0 -= n;
        Ok(())
    }
}

/// The most pages of one FHIR search read by following its `next` links, the first
/// included: 20 pages of a server's usual 50 to 100 entries each.
pub const MAX_SEARCH_PAGES: usize = 20;

fn fetch_outcome(outcome: &'static str) {
    metrics::counter!("nightingale_cds_fhir_fetches_total", "outcome" => outcome).increment(1);
}

/// The URL of a Bundle's `next` link (FHIR paging), if it has one.
pub(crate) fn next_link(bundle: &Value) -> Option<&str> {
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return None;
    }
    bundle
        .get("link")?
        .as_array()?
        .iter()
        .find(|l| {
            l.get("relation")
                .and_then(Value::as_str)
                .is_some_and(is_next)
        })?
        .get("url")?
        .as_str()
}

/// Whether a page link is on the FHIR server `base` (the allow-listed `fhirServer`, without
/// its trailing `/`): `base` itself or a path below it, then any query (servers page with
/// `?_getpages=…` on the base, or `Observation?…&_offset=…`). Its path is held to the rules
/// of [`plain_url`] (no dot segment, escape, backslash, whitespace or control character);
/// its query to no whitespace, control character or fragment.
fn on_server(base: &str, url: &str) -> bool {
    let Some(rest) = url.strip_prefix(base) else {
        return false;
    };
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    (path.is_empty() || path.starts_with('/'))
        && !path.contains(['%', '#'])
        && !resolves_elsewhere(path)
        && !has_space_or_control(query)
        && !query.contains('#')
}

/// How many resources `v` holds for [`Limits::max_resources`]: itself and, for a Bundle, its
/// entries' resources, nested Bundles counted through (as the FHIR reader counts them).
fn resources_in(v: &Value) -> usize {
    1 + v
        .get("entry")
        .and_then(Value::as_array)
        .map_or(0, |entries| {
            entries
                .iter()
                .filter_map(|e| e.get("resource"))
                .filter(|r| !r.is_null())
                .map(resources_in)
                .sum()
        })
}

/// An entry's identity for finding a page that repeats what an earlier one gave: its
/// `fullUrl`, else its resource's type and id (`None`: neither, never taken as a repeat).
fn entry_key(entry: &Value) -> Option<String> {
    if let Some(url) = entry.get("fullUrl").and_then(Value::as_str) {
        return Some(url.to_owned());
    }
    let r = entry.get("resource")?;
    Some(format!(
        "{}/{}",
        r.get("resourceType")?.as_str()?,
        r.get("id")?.as_str()?
    ))
}

/// Takes one search page into `into` (a Bundle, holding `held` resources): the page must be a
/// Bundle the FHIR reader accepts on its own, within what is left of `limits.max_resources`;
/// its entries are appended (those an earlier page gave already, by `fullUrl` or type and
/// id, are not counted twice: a server that repeats a result must not make the search look
/// whole), its links replace `into`'s (its `next`, or none on the last page), and its
/// `total` is kept where it is the larger (more matches announced than delivered leaves the
/// search partial). Refused, `into` is unchanged (its `next` link stays: the search reads as
/// partial). Returns the resources added.
fn accept_page(
    into: &mut Value,
    page: Value,
    held: usize,
    limits: &Limits,
) -> Result<usize, String> {
    let left = limits.max_resources.saturating_sub(held);
    let check = Limits {
        max_resources: left,
        ..*limits
    };
    match Resource::from_value(&page, &check) {
        Ok(Resource::Bundle(_)) => {}
        Ok(_) => return Err("a page that is not a Bundle".into()),
        Err(e) => return Err(format!("a page the FHIR reader refuses: {e}")),
    }
    let Value::Object(mut page) = page else {
        return Err("a page that is not a JSON object".into());
    };
    let Some(into) = into.as_object_mut() else {
        return Err("a search that is not a Bundle".into());
    };
    let mut seen: HashSet<String> = match into.get("entry") {
        None | Some(Value::Null) => HashSet::new(),
        Some(Value::Array(a)) => a.iter().filter_map(entry_key).collect(),
        Some(_) => return Err("a search whose entry is not a list".into()),
    };
    let entries: Vec<Value> = match page.remove("entry") {
        Some(Value::Array(entries)) => entries
            .into_iter()
            .filter(|e| entry_key(e).is_none_or(|k| seen.insert(k)))
            .collect(),
        _ => Vec::new(),
    };
    let added: usize = entries
        .iter()
        .filter_map(|e| e.get("resource"))
        .filter(|r| !r.is_null())
        .map(resources_in)
        .sum();
    match into.get_mut("entry") {
        Some(Value::Array(a)) => a.extend(entries),
        _ => {
            into.insert("entry".into(), Value::Array(entries));
        }
    }
    into.insert(
        "link".into(),
        page.remove("link")
            .unwrap_or_else(|| Value::Array(Vec::new())),
    );
    if let Some(total) = page.get("total").and_then(Value::as_u64)
        && into
            .get("total")
            .and_then(Value::as_u64)
            .is_none_or(|t| t < total)
    {
        into.insert("total".into(), Value::from(total));
    }
    Ok(added)
}

/// How many contributing factors a risk card names in words.
const TOP_FACTORS: usize = 3;

/// Most forward passes (model rows) a risk card's KernelSHAP attribution may take; the
/// bundle's `[explain] max_forward_passes` lowers it. With a background of `B` rows that is
/// `⌊4096 / B⌋ − 1` coalitions: every coalition of up to 6 inputs with 32 background rows
/// (2,016 rows), a sampled estimate beyond.
const CARD_SHAP_MAX_PASSES: usize = 4096;

/// KernelSHAP's coalitions for a card: at most this many, as `/explain`'s default.
const CARD_SHAP_MAX_SAMPLES: usize = 512;

/// A risk card's KernelSHAP attribution.
struct CardShap {
    values: Vec<f64>,
    /// The mean logit over the background rows.
    base_logit: f64,
    background_rows: usize,
    coalitions: usize,
    exact: bool,
}

impl Cds {
    /// Answers a risk service call: one card per bundle of the service, each run through the
    /// repository's worker for that model (the same batching as KServe calls) with one audit
    /// record per inference (`actor`: the CDS caller), as the imaging pipeline does.
    pub async fn evaluate_risk(
        &self,
        state: &AppState,
        service: &Service,
        request: &HookRequest,
        resources: &Resources,
        conditions_read: bool,
        actor: &str,
    ) -> Result<Vec<RiskAnswer>, RiskError> {
        let Some(patient_id) = request.patient_id() else {
            return Ok(vec![]);
        };
        let context = MappingContext {
            patient_id,
            encounter_id: request.context_str("encounterId"),
            now: chrono::Utc::now(),
            look_back: service.look_back(),
            future_skew: chrono::Duration::minutes(5),
            conditions_read,
        };
        let mut answers = Vec::with_capacity(service.config().bundles.len());
        for bundle in &service.config().bundles {
            let source = Source {
                label: format!("Nightingale model bundle {bundle}"),
                url: None,
                icon: None,
                topic: None,
            };
            let unavailable = |why: &str| RiskAnswer {
                card: risk_unavailable_card(bundle, bundle, why, source.clone()),
                model: (bundle.clone(), "-".to_owned()),
                outcome: "unavailable",
            };
            let model = match state.repository.get(bundle, None) {
                Ok(m) => m,
                Err(_) => {
                    answers.push(unavailable("the model is not serving"));
                    continue;
                }
            };
            let version = model.version.to_string();
            let manifest = model.manifest.clone();
            let Some(input) = manifest.inputs.iter().find(|i| !i.features.is_empty()) else {
                answers.push(unavailable("the model declares no tabular features"));
                continue;
            };
            let Some((output, column, threshold)) =
                operating_point(&manifest, service.config().thresholds.get(bundle).copied())
            else {
                answers.push(unavailable("the model declares no operating threshold"));
                continue;
            };
            // A patient recorded as deceased gets no risk ("death before discharge" was
            // scored for one: a red-team finding).
            if find_patient(resources, Some(patient_id)).is_some_and(|p| p.is_deceased()) {
                answers.push(RiskAnswer {
                    card: risk_not_applicable_card(
                        bundle,
                        "the patient is recorded as deceased",
                        source.clone(),
                    ),
                    model: (bundle.clone(), version),
                    outcome: "info",
                });
                continue;
            }
            let mapped = map_features(&input.features, resources, &context);
            let Some(values) = mapped.values() else {
                answers.push(RiskAnswer {
                    card: risk_missing_card(
                        bundle,
                        &format!("{bundle} {version}"),
                        &mapped.missing(),
                        &mapped.newer_not_final(),
                        source.clone(),
                    ),
                    model: (bundle.clone(), version),
                    outcome: "missing",
                });
                continue;
            };
            // What the model sees: FP32.
            let x: Vec<f64> = values.iter().map(|&v| f64::from(v as f32)).collect();
            let reference = manifest.attribution.as_ref().map(|a| a.means.clone());
            let linear = self.linear_form(state, &model, input.features.len(), column);
            // Models that are not linear-logistic: KernelSHAP against the bundle's background
            // sample where it declares one ([explain] background), else one input at a time
            // against the reference point.
            let background = match &linear {
                None => manifest
                    .explain
                    .as_ref()
                    .map(|e| &e.background)
                    .filter(|b| !b.is_empty() && b.iter().all(|r| r.len() == x.len())),
                Some(_) => None,
            };
            // One batch: the patient, then (one input at a time only) one row per input
            // with that input at its reference value.
            let mut rows = vec![x.clone()];
            if let (None, None, Some(r)) = (&linear, &background, &reference) {
                for i in 0..x.len() {
                    let mut row = x.clone();
                    row[i] = r[i];
                    rows.push(row);
                }
            }
            let probabilities = match self
                .infer(
                    state,
                    &model,
                    &input.name,
                    &output,
                    column,
                    &rows,
                    request,
                    actor,
                )
                .await?
            {
                Ok(p) => p,
                Err(why) => {
                    answers.push(RiskAnswer {
                        model: (bundle.clone(), version),
                        ..unavailable(&why)
                    });
                    continue;
                }
            };
            let risk = probabilities[0];
            let shap = match &background {
                Some(b) => {
                    let budget = manifest.explain.as_ref().map_or(CARD_SHAP_MAX_PASSES, |e| {
                        e.max_forward_passes.min(CARD_SHAP_MAX_PASSES)
                    });
                    match self
                        .kernel_shap(
                            state,
                            &model,
                            (&input.name, &output, column),
                            (&x, risk),
                            b,
                            budget,
                            request,
                            actor,
                        )
                        .await?
                    {
                        Ok(s) => Some(s),
                        Err(why) => {
                            tracing::warn!(model = %model.name, version = model.version, reason = %why,
                                "no KernelSHAP attribution for the risk card: the card goes without factors");
                            None
                        }
                    }
                }
                None => None,
            };
            let (contributions, reference_risk, method) = match (&linear, &reference, shap) {
                (Some(m), Some(r), _) => (
                    m.contributions(&x, r),
                    Some(sigmoid(m.logit(r))),
                    AttributionMethod::LinearExact,
                ),
                (None, _, Some(s)) => (
                    s.values,
                    Some(sigmoid(s.base_logit)),
                    AttributionMethod::KernelShap {
                        background_rows: s.background_rows,
                        coalitions: s.coalitions,
                        exact: s.exact,
                    },
                ),
                (None, Some(_), None) if background.is_none() => (
                    probabilities[1..]
                        .iter()
                        .map(|&p| logit(risk) - logit(p))
                        .collect(),
                    None,
                    AttributionMethod::OneAtATime,
                ),
                _ => (vec![], None, AttributionMethod::OneAtATime),
            };
            let contributions = contributions
                .into_iter()
                .zip(&mapped.features)
                .map(|(c, f)| Contribution {
                    feature: plain_name(&f.name),
                    value: f.shown.clone(),
                    logit: c,
                })
                .collect();
            let card = risk_card(&RiskCard {
                title: bundle.clone(),
                model_name: bundle.clone(),
                model_version: version.clone(),
                risk,
                threshold,
                contributions,
                top: TOP_FACTORS,
                reference_risk,
                method,
                intended_use: intended_use(&manifest),
                caveat: caveat(&manifest),
                source: source.clone(),
                newer_not_final: mapped.newer_not_final(),
            });
            answers.push(RiskAnswer {
                outcome: if risk >= threshold { "warning" } else { "info" },
                card,
                model: (bundle.clone(), version),
            });
        }
        Ok(answers)
    }

    /// The linear-logistic form of a served model version (read once; `None`: not one).
    pub(crate) fn linear_form(
        &self,
        state: &AppState,
        model: &LoadedModel,
        n_features: usize,
        positive: usize,
    ) -> Option<Arc<LinearLogistic>> {
        let key = LinearKey {
            model: model.name.clone(),
            version: model.version,
            model_sha256: model.model_sha256.clone(),
            n_features,
            positive,
        };
        let mut cache = self.linear.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = cache.get(&key) {
            return v.clone();
        }
        // The forms of a file no longer loaded under this version go.
        cache.retain(|k, _| {
            k.model != key.model || k.version != key.version || k.model_sha256 == key.model_sha256
        });
        let read = || -> Option<Arc<LinearLogistic>> {
            let entry = model.manifest.versions.get(&model.version.to_string())?;
            let path = state
                .repository
                .root()
                .join(&model.name)
                .join(model.version.to_string())
                .join(&entry.model_file);
            let bytes = std::fs::read(&path).ok()?;
            // Only the bytes that were verified and loaded.
            use sha2::Digest;
            if hex::encode(sha2::Sha256::digest(&bytes)) != model.model_sha256 {
                tracing::warn!(model = %model.name, version = model.version,
                    "the model file changed since it was loaded: attributing one input at a time");
                return None;
            }
            match LinearLogistic::from_onnx(&bytes, n_features, positive) {
                Ok(m) => m.map(Arc::new),
                Err(e) => {
                    tracing::warn!(model = %model.name, error = %e, "cannot read the ONNX graph");
                    None
                }
            }
        };
        let value = read();
        cache.insert(key, value.clone());
        value
    }

    /// KernelSHAP of the patient's row `x` (whose risk is `risk`) in logit space against the
    /// background rows, within `budget` forward passes, through the model's worker in
    /// batches of its `max_batch_size`; one audit record (event `explain`: the passes, the
    /// patient's row hashed). `Err(RiskError)` only when the audit fails.
    #[allow(clippy::too_many_arguments)]
    async fn kernel_shap(
        &self,
        state: &AppState,
        model: &LoadedModel,
        (input, output, column): (&str, &str, usize),
        (x, risk): (&[f64], f64),
        background: &[Vec<f64>],
        budget: usize,
        request: &HookRequest,
        actor: &str,
    ) -> Result<Result<CardShap, String>, RiskError> {
        let samples = (budget / background.len())
            .saturating_sub(1)
            .min(CARD_SHAP_MAX_SAMPLES);
        if samples < 2 {
            return Ok(Err(format!(
                "{} background rows leave no coalition within {budget} forward passes",
                background.len()
            )));
        }
        let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let rows_of = |r: &[f64]| r.iter().map(|&v| v as f32).collect::<Vec<f32>>();
        let method = match KernelShap::new(
            x32.clone(),
            background.iter().map(|r| rows_of(r)).collect(),
            risk,
            KernelShapOptions {
                samples,
                link: Link::Logit,
                seed: 0,
            },
        ) {
            Ok(m) => m,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let exact = method.is_exact();
        let passes = method.forward_passes();
        let coalitions = passes / background.len() - 1;
        let mut method: Box<dyn Perturber> = Box::new(method);
        // One explanation (a card's), outside the explanations' turns: its rows are small.
        let chunk = crate::http::explain::forward_pass_chunk(model, x32.len() * 4, 1);
        let patient = match Tensor::from_vec(vec![1, x32.len()], x32) {
            Ok(t) => vec![NamedTensor::new(input, t)],
            Err(e) => return Ok(Err(e.to_string())),
        };
        let mut event = audit_event(
            (EventKind::Explain, request, actor),
            model,
            &patient,
            passes,
            format!(
                "cds risk attribution: kernel_shap, {passes} forward passes, {}",
                if exact { "exact" } else { "sampled" }
            ),
        );
        let width = x.len();
        let mut rows = Vec::with_capacity(chunk * width);
        let mut failure = None;
        loop {
            rows.clear();
            let n = method.next_rows(chunk, &mut rows);
            if n == 0 {
                break;
            }
            let tensor = match Tensor::from_vec(vec![n, width], std::mem::take(&mut rows)) {
                Ok(t) => t,
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            };
            let scores = match model
                .worker
                .infer(vec![NamedTensor::new(input, tensor)])
                .await
            {
                Ok(outputs) => positive_column(&outputs, output, column, n),
                Err(e) => Err(format!("inference failed: {e}")),
            };
            match scores {
                Ok(p) => method.absorb(&p),
                Err(why) => {
                    failure = Some(why);
                    break;
                }
            }
        }
        let explained = match failure {
            Some(why) => Err(why),
            None => method.finish().map_err(|e| e.to_string()),
        };
        if let Ok(e) = &explained {
            let values: Vec<f32> = e.values.iter().map(|&v| v as f32).collect();
            if let Ok(t) = Tensor::from_vec(vec![1, values.len()], values) {
                event.output_sha256 = Some(tensors_sha256(&[NamedTensor::new(
                    format!("{output}_attribution"),
                    t,
                )]));
            }
            event.status = 200;
            event.outcome = Outcome::Ok;
        }
        state
            .audit
            .record(event)
            .await
            .map_err(|e| RiskError::Audit(e.to_string()))?;
        Ok(explained.map(|e| CardShap {
            base_logit: e.base_value.unwrap_or(f64::NAN),
            values: e.values,
            background_rows: background.len(),
            coalitions,
            exact,
        }))
    }

    /// Runs `rows` through the model's worker and returns the positive class's probability
    /// of each row; one audit record. `Err(RiskError)` only when the audit fails.
    #[allow(clippy::too_many_arguments)]
    async fn infer(
        &self,
        state: &AppState,
        model: &LoadedModel,
        input: &str,
        output: &str,
        column: usize,
        rows: &[Vec<f64>],
        request: &HookRequest,
        actor: &str,
    ) -> Result<Result<Vec<f64>, String>, RiskError> {
        let n = rows.first().map_or(0, Vec::len);
        let data: Vec<f32> = rows.iter().flatten().map(|&v| v as f32).collect();
        let tensor = match Tensor::from_vec(vec![rows.len(), n], data) {
            Ok(t) => t,
            Err(e) => return Ok(Err(e.to_string())),
        };
        let inputs = vec![NamedTensor::new(input, tensor)];
        let mut event = audit_event(
            (EventKind::Inference, request, actor),
            model,
            &inputs,
            rows.len(),
            "cds risk".to_owned(),
        );
        let outputs = model.worker.infer(inputs).await;
        if let Ok(outputs) = &outputs {
            event.output_sha256 = Some(tensors_sha256(outputs));
            event.status = 200;
            event.outcome = Outcome::Ok;
        }
        // Without its audit record a prediction is not used.
        state
            .audit
            .record(event)
            .await
            .map_err(|e| RiskError::Audit(e.to_string()))?;
        let outputs = match outputs {
            Ok(o) => o,
            Err(e) => return Ok(Err(format!("inference failed: {e}"))),
        };
        Ok(positive_column(&outputs, output, column, rows.len()))
    }
}

/// A hook call's audit record of `rows` model rows of `inputs`, failed until the caller
/// says otherwise. Its request id is `cds-` and the hookInstance (control characters
/// replaced, at most 100 characters); the actor is the CDS caller.
fn audit_event(
    (kind, request, actor): (EventKind, &HookRequest, &str),
    model: &LoadedModel,
    inputs: &[NamedTensor],
    rows: usize,
    detail: String,
) -> AuditEvent {
    AuditEvent {
        kind,
        request_id: format!(
            "cds-{}",
            request
                .hook_instance
                .chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .take(100)
                .collect::<String>()
        ),
        model: model.name.clone(),
        version: model.version.to_string(),
        model_sha256: model.model_sha256.clone(),
        input_sha256: Some(tensors_sha256(inputs)),
        output_sha256: None,
        rows: Some(rows),
        status: 500,
        outcome: Outcome::Failed,
        actor: Some(actor.to_owned()),
        detail: Some(detail),
    }
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// The probability in `column` of the FP32 output `output` for each of `n` rows.
fn positive_column(
    outputs: &[NamedTensor],
    output: &str,
    column: usize,
    n: usize,
) -> Result<Vec<f64>, String> {
    let view = outputs
        .iter()
        .find(|o| o.name == output)
        .and_then(|o| o.tensor.view::<f32>())
        .ok_or_else(|| format!("no FP32 output {output:?}"))?;
    let width = view.shape().last().copied().unwrap_or(0);
    let flat: Vec<f32> = view.iter().copied().collect();
    (0..n)
        .map(|r| match flat.get(r * width + column) {
            Some(p) if p.is_finite() && (0.0..=1.0).contains(p) => Ok(f64::from(*p)),
            _ => Err("the model returned no probability".to_owned()),
        })
        .collect()
}

/// The output, the positive label's column in it, and the threshold: the service's override,
/// else the bundle's first `[[thresholds]]` on an output's positive label.
fn operating_point(m: &Manifest, over: Option<f64>) -> Option<(String, usize, f64)> {
    let (output, label) = m
        .outputs
        .iter()
        .find_map(|o| o.positive_label.as_ref().map(|p| (o, p)))?;
    let column = output.labels.iter().position(|l| l == label)?;
    let threshold = match over {
        Some(t) => t,
        None => {
            m.thresholds
                .iter()
                .find(|t| t.output == output.name && t.label.as_ref() == Some(label))?
                .value
        }
    };
    Some((output.name.clone(), column, threshold))
}

/// The bundle's intended use and population, from its manifest.
fn intended_use(m: &Manifest) -> String {
    let mut s = m.description.clone();
    if !m.intended_use.users.is_empty() {
        s.push_str(&format!(" Intended users: {}.", m.intended_use.users));
    }
    s
}

/// The bundle's "not for clinical use" line (its intended-use summary).
fn caveat(m: &Manifest) -> String {
    if m.intended_use.summary.is_empty() {
        "NOT for clinical use without local validation.".to_owned()
    } else {
        m.intended_use.summary.clone()
    }
}

/// An http(s) URL with nothing a URL library would rewrite in its path: no `.`/`..`
/// segment, no percent-escape, no backslash, no query, no fragment, no user info, no
/// whitespace or control character (the WHATWG parser drops tabs and newlines anywhere, so
/// `/r4/.<TAB>./admin` would be sent as `/admin`).
fn plain_url(url: &str) -> bool {
    let Some(rest) = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
    else {
        return false;
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    !authority.is_empty()
        && !has_space_or_control(url)
        && !authority.contains('@')
        && !url.contains(['%', '?', '#'])
        && !resolves_elsewhere(path)
}

/// Whether a URL library would resolve `path` to somewhere else than its text: a `.` or `..`
/// segment, a percent-escaped dot, a backslash, whitespace or a control character.
fn resolves_elsewhere(path: &str) -> bool {
    has_space_or_control(path)
        || path.contains('\\')
        || path.split('/').any(|seg| {
            // A path parameter does not hide a dot segment: Tomcat, Jetty and Spring (the
            // usual containers of HAPI FHIR) resolve `..;` as `..` (a red-team finding).
            let name = seg.split(';').next().unwrap_or_default();
            name == "." || name == ".." || seg.to_ascii_lowercase().contains("%2e")
        })
}

/// `url` for a log line or an error: user information (`user:password@`) left out (a JWKS
/// URL's password was logged: a red-team finding; a FHIR server's too: a review's).
pub fn without_userinfo(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            match rest[..end].rfind('@') {
                Some(at) => format!("{scheme}://…@{}", &rest[at + 1..]),
                None => url.to_owned(),
            }
        }
        None => url.to_owned(),
    }
}

fn has_space_or_control(s: &str) -> bool {
    s.chars().any(|c| c.is_whitespace() || c.is_control())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_issuers_parse() {
        let t: TrustedIssuer = "https://ehr.example.org=/etc/jwks.json".parse().unwrap();
        assert_eq!(t.issuer, "https://ehr.example.org");
        assert_eq!(t.jwks, JwksSource::File(PathBuf::from("/etc/jwks.json")));
        let t: TrustedIssuer = "https://ehr.example.org/?a=b=keys.json".parse().unwrap();
        assert_eq!(t.issuer, "https://ehr.example.org/?a=b");
        let t: TrustedIssuer =
            "https://ehr.example.org=https://ehr.example.org/.well-known/jwks.json?v=2"
                .parse()
                .unwrap();
        assert_eq!(t.issuer, "https://ehr.example.org");
        assert_eq!(
            t.jwks,
            JwksSource::Url("https://ehr.example.org/.well-known/jwks.json?v=2".into())
        );
        let t: TrustedIssuer = "ehr=http://127.0.0.1:9000/jwks".parse().unwrap();
        assert_eq!(t.jwks, JwksSource::Url("http://127.0.0.1:9000/jwks".into()));
        for bad in [
            "no-equals",
            "=file",
            "issuer=",
            " = ",
            "ehr=http://ehr.example.org/jwks",
            "ehr=https://",
        ] {
            assert!(bad.parse::<TrustedIssuer>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_call_reads_one_budget_over_all_its_fetches_and_charges_what_it_takes() {
        let mut charged = Vec::new();
        {
            let budget = FetchBudget::new(100, |n| {
                if n > 50 {
                    return Err("the in-flight budget is taken".to_owned());
                }
                charged.push(n);
                Ok(())
            });
            // Two searches' pages draw on the same 100 bytes.
            budget.take(40).unwrap();
            budget.fits(60).unwrap();
            assert!(budget.fits(61).unwrap_err().contains("100 bytes"));
            budget.take(30).unwrap();
            // Refused by the server's budget: nothing is taken from the call's.
            assert_eq!(
                FetchBudget::new(100, |_| Err("taken".into())).take(1),
                Err("taken".to_owned())
            );
            assert!(budget.take(31).unwrap_err().contains("100 bytes"));
            budget.take(30).unwrap();
            assert!(budget.take(1).is_err());
            budget.fits(0).unwrap();
            assert!(budget.fits(u64::MAX).is_err());
        }
        assert_eq!(charged, [40, 30, 30]);
    }

    #[test]
    fn only_allow_listed_fhir_servers_are_fetched_from() {
        let repository = Repository::new("/nonexistent", Default::default());
        let cds = Cds::new(
            &CdsSettings {
                fhir_servers: vec!["https://fhir.example.org/r4/".into()],
                ..CdsSettings::default()
            },
            &repository,
        )
        .unwrap();
        assert!(cds.may_fetch("https://fhir.example.org/r4"));
        assert!(cds.may_fetch("https://fhir.example.org/r4/sub"));
        for bad in [
            "https://fhir.example.org/r4evil",
            "https://fhir.example.org",
            "https://fhir.example.org.evil.com/r4",
            "http://169.254.169.254/latest",
            // Below the allowed prefix as text, elsewhere once a URL library resolves it.
            "https://fhir.example.org/r4/../admin",
            "https://fhir.example.org/r4/%2e%2e/admin",
            "https://fhir.example.org/r4/%2E%2E/admin",
            "https://fhir.example.org/r4/./..",
            "https://fhir.example.org/r4/..",
            "https://fhir.example.org/r4/sub\\..\\..\\admin",
            "https://fhir.example.org/r4?x=/../",
            "https://fhir.example.org/r4#/../",
            "https://user@fhir.example.org/r4",
            "https://fhir.example.org/r4/.\t./admin",
            "https://fhir.example.org/r4/.\n./.\r./internal",
            "https://fhir.example.org/r4/ ",
            "https://fhir.example.org/r4\u{0}",
            // Path parameters: Tomcat, Jetty and Spring resolve `..;` as `..`.
            "https://fhir.example.org/r4/ok/..;/..;/admin",
            "https://fhir.example.org/r4/..;x=1/admin",
            "https://fhir.example.org/r4/.;/x",
        ] {
            assert!(!cds.may_fetch(bad), "{bad}");
        }
        assert!(cds.may_fetch("https://fhir.example.org/r4/a;v=1"));
        assert!(cds.may_fetch("https://fhir.example.org/r4/a..b"));
        // The same rule guards each query sent below an allowed server.
        for bad in [
            "Patient/..",
            "Patient/%2E%2e",
            "a/./b",
            "a\\b",
            "a/.\t./b",
            "a\nb",
            "a/..;/b",
        ] {
            assert!(resolves_elsewhere(bad), "{bad}");
        }
        assert!(!resolves_elsewhere("Observation?patient=a..b"));
        assert_eq!(
            without_userinfo("http://user:pw@127.0.0.1:8/jwks.json?a=b@c"),
            "http://…@127.0.0.1:8/jwks.json?a=b@c"
        );
        assert_eq!(
            without_userinfo("https://ehr.example/jwks.json"),
            "https://ehr.example/jwks.json"
        );
        assert!(!Cds::builtin(&repository).may_fetch("https://fhir.example.org/r4"));
    }

    #[test]
    fn page_links_are_followed_on_the_fhir_server_only() {
        let base = "https://fhir.example.org/r4";
        for ok in [
            "https://fhir.example.org/r4?_getpages=0b1c&_getpagesoffset=20&_count=20",
            "https://fhir.example.org/r4/Observation?patient=1&_page=2",
            "https://fhir.example.org/r4/Observation?code=http%3A%2F%2Floinc.org%7C8867-4",
            "https://fhir.example.org/r4",
        ] {
            assert!(on_server(base, ok), "{ok}");
        }
        for bad in [
            "https://fhir.example.org/r4evil/Observation",
            "https://fhir.example.org/r4@evil.example/Observation",
            "https://fhir.example.org.evil.example/r4/Observation",
            "http://fhir.example.org/r4/Observation",
            "https://fhir.example.org:8443/r4/Observation",
            "https://evil.example/r4/Observation",
            "/r4/Observation?_page=2",
            "Observation?_page=2",
            "https://fhir.example.org/r4/../admin",
            "https://fhir.example.org/r4/%2e%2e/admin",
            "https://fhir.example.org/r4/%2E%2E/admin",
            "https://fhir.example.org/r4/x\\..\\admin",
            "https://fhir.example.org/r4/Obs ervation",
            "https://fhir.example.org/r4/Observation?_page=2#x",
            "https://fhir.example.org/r4/Observation?_page=2\n",
            "https://fhir.example.org/r4/Observation\t?_page=2",
        ] {
            assert!(!on_server(base, bad), "{bad:?}");
        }
    }

    #[test]
    fn a_page_is_taken_whole_or_not_at_all() {
        use serde_json::json;
        let limits = Limits {
            max_resources: 10,
            ..Limits::default()
        };
        let patient =
            |id: u32| json!({"resource": {"resourceType": "Patient", "id": id.to_string()}});
        let complete = |b: &Value| match Resource::from_value(b, &Limits::default()).unwrap() {
            Resource::Bundle(bundle) => bundle.is_complete(),
            _ => panic!("a Bundle"),
        };
        let mut b = json!({"resourceType": "Bundle", "type": "searchset", "total": 3,
            "link": [{"relation": "self", "url": "u1"}, {"relation": "next", "url": "u2"}],
            "entry": [patient(1)]});
        assert_eq!(next_link(&b), Some("u2"));
        assert_eq!(resources_in(&b), 2);
        let page2 = json!({"resourceType": "Bundle", "type": "searchset",
            "link": [{"relation": "next", "url": "u3"}], "entry": [patient(2)]});
        assert_eq!(accept_page(&mut b, page2, 2, &limits), Ok(1));
        assert_eq!(next_link(&b), Some("u3"));

        // Refused whole, the search unchanged (its next link kept: it reads as partial).
        let before = b.clone();
        for bad in [
            json!([]),
            json!({"resourceType": "Patient", "id": "p"}),
            json!({"resourceType": "Bundle", "entry": {"resource": {}}}),
            json!({"resourceType": "Bundle", "entry": [1, 2]}),
            json!({"resourceType": "Bundle", "link": {"relation": "next", "url": "u9"}}),
            json!({"resourceType": "Bundle", "link": null}),
            // (An entry whose resource the reader refuses, an Observation without status or
            // code, is taken as unreadable, not a refused page: decision-support's fhir.rs.)
            // Over the resource limit with what is held already (3).
            json!({"resourceType": "Bundle", "entry": (10..18).map(patient).collect::<Vec<_>>()}),
        ] {
            assert!(
                accept_page(&mut b, bad.clone(), 3, &limits).is_err(),
                "{bad}"
            );
            assert_eq!(b, before);
        }

        // The last page: no links; the search is whole.
        let last = json!({"resourceType": "Bundle", "entry": [patient(3)]});
        assert_eq!(accept_page(&mut b, last, 3, &limits), Ok(1));
        assert_eq!(next_link(&b), None);
        assert_eq!(b["entry"].as_array().unwrap().len(), 3);
        assert!(complete(&b));

        // A later page that announces more matches than were delivered: partial.
        let mut b = json!({"resourceType": "Bundle", "type": "searchset",
            "link": [{"relation": "next", "url": "u2"}], "entry": []});
        let page = json!({"resourceType": "Bundle", "type": "searchset", "total": 3});
        assert_eq!(accept_page(&mut b, page, 1, &limits), Ok(0));
        assert_eq!(b["total"], 3);
        assert!(!complete(&b));

        // A page that repeats an earlier one's result does not make the search whole.
        let mut b = json!({"resourceType": "Bundle", "type": "searchset", "total": 2,
            "link": [{"relation": "next", "url": "u2"}], "entry": [patient(1)]});
        let again = json!({"resourceType": "Bundle", "type": "searchset", "total": 2, "entry": [patient(1)]});
        assert_eq!(accept_page(&mut b, again, 2, &limits), Ok(0));
        assert_eq!(b["entry"].as_array().unwrap().len(), 1);
        assert!(!complete(&b));

        // Relation types compare without regard to case or surrounding blanks.
        for relation in ["next", "NEXT", " Next "] {
            let b = json!({"resourceType": "Bundle", "link": [{"relation": relation, "url": "u"}]});
            assert_eq!(next_link(&b), Some("u"), "{relation:?}");
        }
        let not_a_bundle =
            json!({"resourceType": "Patient", "link": [{"relation": "next", "url": "u"}]});
        assert_eq!(next_link(&not_a_bundle), None);
    }
}
