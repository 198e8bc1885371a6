//! The CDS Hooks service's state in the server (issue 10): the configured services
//! (`nightingale_decision_support::service`), the JWT verifier of the trusted EHRs, the
//! ledger of issued cards that feedback is joined to, and the FHIR client that fetches what
//! an EHR did not prefetch.
//!
//! HTTP meaning (routes, status codes) is in `http/cds.rs`; the rules (NEWS2, cards, JWT
//! checks) are in the `decision-support` crate.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use nightingale_decision_support::feedback::{CardLedger, OverrideStats};
use nightingale_decision_support::fhir::{Limits, Resource};
use nightingale_decision_support::jwt::{JwtOptions, Verifier};
use nightingale_decision_support::service::{CdsSection, Services};

/// `--cds-trust ISSUER=JWKS_FILE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedIssuer {
    pub issuer: String,
    pub jwks: PathBuf,
}

impl std::str::FromStr for TrustedIssuer {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // The issuer is a URL (it has `=` only in a query, rarely): split at the last `=`.
        let (issuer, file) = s
            .rsplit_once('=')
            .ok_or_else(|| format!("{s:?}: expected ISSUER=JWKS_FILE"))?;
        if issuer.trim().is_empty() || file.trim().is_empty() {
            return Err(format!("{s:?}: expected ISSUER=JWKS_FILE"));
        }
        Ok(TrustedIssuer {
            issuer: issuer.trim().to_owned(),
            jwks: PathBuf::from(file.trim()),
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
    /// `--cds-fhir-server`: the FHIR servers (URL prefixes) the service may fetch missing
    /// prefetch from; empty: it never fetches.
    pub fhir_servers: Vec<String>,
    /// Deadline of the whole fetch from `fhirServer`.
    pub fetch_timeout: Duration,
    /// Largest FHIR response accepted, in bytes.
    pub fetch_max_bytes: usize,
    /// The server speaks HTTPS (the service URLs start `https://`).
    pub https: bool,
    /// `--cds-imaging-identifier-system`: the FHIR Patient identifier system whose value is
    /// the DICOM Patient ID; set, patient-view answers carry the imaging pipeline's results.
    pub imaging_identifier_system: Option<String>,
}

impl Default for CdsSettings {
    fn default() -> Self {
        CdsSettings {
            section: CdsSection::default(),
            trust: Vec::new(),
            base_url: None,
            fhir_servers: Vec::new(),
            fetch_timeout: Duration::from_millis(1500),
            fetch_max_bytes: 4 << 20,
            https: false,
            imaging_identifier_system: None,
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
    pub https: bool,
    pub imaging_identifier_system: Option<String>,
    pub fhir_servers: Vec<String>,
    pub fetch_timeout: Duration,
    pub fetch_max_bytes: usize,
    pub limits: Limits,
    /// Cards issued, for feedback (bounded; the oldest are forgotten first).
    pub ledger: Mutex<CardLedger>,
    pub stats: Mutex<OverrideStats>,
    client: reqwest::Client,
}

/// Cards remembered for feedback.
const LEDGER_CAPACITY: usize = 100_000;

impl Cds {
    /// The service as configured.
    pub fn new(settings: &CdsSettings) -> Result<Cds, CdsError> {
        let services = settings.section.clone().validate()?;
        if let Some(s) = services
            .iter()
            .find(|s| s.kind() != nightingale_decision_support::service::ServiceKind::News2)
        {
            return Err(CdsError::Unsupported(format!(
                "service {:?}: risk-model services are not served yet (only kind = \"news2\")",
                s.id()
            )));
        }
        let mut verifier = Verifier::new(JwtOptions::default());
        for t in &settings.trust {
            verifier
                .trust_file(&t.issuer, &t.jwks)
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
            https: settings.https,
            imaging_identifier_system: settings.imaging_identifier_system.clone(),
            fhir_servers: settings.fhir_servers.clone(),
            fetch_timeout: settings.fetch_timeout,
            fetch_max_bytes: settings.fetch_max_bytes,
            limits: Limits::default(),
            ledger: Mutex::new(CardLedger::new(LEDGER_CAPACITY)),
            stats: Mutex::new(OverrideStats::default()),
            client,
        })
    }

    /// The built-in services and no trusted issuer: discovery answers, every call is 401.
    pub fn builtin() -> Cds {
        Cds::new(&CdsSettings::default()).expect("the built-in CDS configuration is valid")
    }

    /// Whether the service may fetch from this `fhirServer`.
    pub fn may_fetch(&self, fhir_server: &str) -> bool {
        self.fhir_servers.iter().any(|allowed| {
            let allowed = allowed.trim_end_matches('/');
            fhir_server == allowed
                || fhir_server
                    .strip_prefix(allowed)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
    }

    /// Fetches FHIR queries (relative to `fhir_server`) with the EHR's bearer token, all at
    /// once, within the fetch deadline. Returns what could be read; each failure is logged
    /// (without the query: it holds the patient's id) and counted, and left for the
    /// assessment to report as missing data.
    pub async fn fetch(
        &self,
        fhir_server: &str,
        token: Option<&str>,
        queries: &[(String, String)],
    ) -> Vec<Resource> {
        let base = fhir_server.trim_end_matches('/');
        let fetches = queries.iter().map(|(key, query)| {
            let url = format!("{base}/{}", query.trim_start_matches('/'));
            async move {
                let outcome = tokio::time::timeout(self.fetch_timeout, self.get(&url, token)).await;
                match outcome {
                    Ok(Ok(r)) => {
                        metrics::counter!("nightingale_cds_fhir_fetches_total", "outcome" => "ok")
                            .increment(1);
                        Some(r)
                    }
                    Ok(Err(why)) => {
                        tracing::warn!(prefetch = %key, reason = %why, "FHIR fetch failed");
                        metrics::counter!("nightingale_cds_fhir_fetches_total", "outcome" => "failed")
                            .increment(1);
                        None
                    }
                    Err(_) => {
                        tracing::warn!(prefetch = %key, timeout_ms = self.fetch_timeout.as_millis() as u64, "FHIR fetch timed out");
                        metrics::counter!("nightingale_cds_fhir_fetches_total", "outcome" => "timeout")
                            .increment(1);
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

    async fn get(&self, url: &str, token: Option<&str>) -> Result<Resource, String> {
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
        if res
            .content_length()
            .is_some_and(|n| n > self.fetch_max_bytes as u64)
        {
            return Err(format!(
                "the response is over {} bytes",
                self.fetch_max_bytes
            ));
        }
        let mut body = Vec::new();
        while let Some(chunk) = res
            .chunk()
            .await
            .map_err(|_| "the response broke off".to_owned())?
        {
            if body.len() + chunk.len() > self.fetch_max_bytes {
                return Err(format!(
                    "the response is over {} bytes",
                    self.fetch_max_bytes
                ));
            }
            body.extend_from_slice(&chunk);
        }
        Resource::from_json(&body, &self.limits).map_err(|e| format!("not FHIR JSON: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_issuers_parse() {
        let t: TrustedIssuer = "https://ehr.example.org=/etc/jwks.json".parse().unwrap();
        assert_eq!(t.issuer, "https://ehr.example.org");
        assert_eq!(t.jwks, PathBuf::from("/etc/jwks.json"));
        let t: TrustedIssuer = "https://ehr.example.org/?a=b=keys.json".parse().unwrap();
        assert_eq!(t.issuer, "https://ehr.example.org/?a=b");
        for bad in ["no-equals", "=file", "issuer=", " = "] {
            assert!(bad.parse::<TrustedIssuer>().is_err(), "{bad}");
        }
    }

    #[test]
    fn only_allow_listed_fhir_servers_are_fetched_from() {
        let cds = Cds::new(&CdsSettings {
            fhir_servers: vec!["https://fhir.example.org/r4/".into()],
            ..CdsSettings::default()
        })
        .unwrap();
        assert!(cds.may_fetch("https://fhir.example.org/r4"));
        assert!(cds.may_fetch("https://fhir.example.org/r4/sub"));
        for bad in [
            "https://fhir.example.org/r4evil",
            "https://fhir.example.org",
            "https://fhir.example.org.evil.com/r4",
            "http://169.254.169.254/latest",
        ] {
            assert!(!cds.may_fetch(bad), "{bad}");
        }
        assert!(!Cds::builtin().may_fetch("https://fhir.example.org/r4"));
    }
}
