//! CDS Hooks through the router: discovery, a NEWS2 call with a real ES384 JWT (keys made
//! by the `openssl` CLI), the token's audience and replay, feedback joined to the card, the
//! fetch of missing prefetch from an allow-listed FHIR server (a real HTTP server on port 0:
//! answering, slow, failing), hostile bodies, and the audit records. Expected NEWS2 values
//! are read off the RCP 2017 chart by hand in each test, not computed by the code.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use nightingale::audit::AuditLog;
use nightingale::cds::{Cds, CdsSettings, JwksSource, TrustedIssuer};
use nightingale::cds_store::CdsStore;
use nightingale::http::{self, AppState, HttpConfig};
use nightingale_models::{Repository, RepositoryOptions};
use serde_json::{Value, json};
use tower::ServiceExt;

mod support;
use support::copy_dir;

const ISS: &str = "https://ehr.example.nhs.uk";
const HOST: &str = "127.0.0.1:8000";
const SERVICE: &str = "nightingale-news2";
const PATIENT: &str = "1288992";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl CLI runs");
    assert!(out.status.success(), "openssl {args:?}");
}

struct Ehr {
    key: EncodingKey,
    jwks: std::path::PathBuf,
    kid: String,
}

impl Ehr {
    fn new(dir: &Path) -> Ehr {
        Ehr::keyed(dir, "ec-1")
    }

    /// A fresh P-384 key named `kid`, its JWKS in `dir/jwks.json`.
    fn keyed(dir: &Path, kid: &str) -> Ehr {
        openssl(
            dir,
            &[
                "ecparam",
                "-name",
                "secp384r1",
                "-genkey",
                "-noout",
                "-out",
                "ec.pem",
            ],
        );
        openssl(
            dir,
            &[
                "pkcs8", "-topk8", "-nocrypt", "-in", "ec.pem", "-outform", "DER", "-out", "ec.der",
            ],
        );
        let key = EncodingKey::from_ec_der(&std::fs::read(dir.join("ec.der")).unwrap());
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES384).unwrap();
        jwk.common.key_id = Some(kid.into());
        let jwks = dir.join("jwks.json");
        std::fs::write(
            &jwks,
            serde_json::to_vec(&JwkSet { keys: vec![jwk] }).unwrap(),
        )
        .unwrap();
        Ehr {
            key,
            jwks,
            kid: kid.into(),
        }
    }

    fn token(&self, aud: &str) -> String {
        self.token_with_jku(aud, None)
    }

    fn token_with_jku(&self, aud: &str, jku: Option<&str>) -> String {
        self.token_of(aud, jku, "ehr-client")
    }

    fn token_of(&self, aud: &str, jku: Option<&str>, sub: &str) -> String {
        let now = jsonwebtoken::get_current_timestamp();
        let mut header = Header::new(Algorithm::ES384);
        header.kid = Some(self.kid.clone());
        header.jku = jku.map(str::to_owned);
        let claims = json!({"iss": ISS, "sub": sub, "aud": aud, "iat": now,
                            "exp": now + 300, "jti": uuid()});
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
    }
}

fn uuid() -> String {
    // A v4-shaped UUID from the clock and a counter (unique within the test run).
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        t as u32,
        (t >> 32) as u16,
        n & 0xfff,
        (n >> 12) & 0xfff,
        (t ^ n) & 0xffff_ffff_ffff
    )
}

struct Server {
    dir: tempfile::TempDir,
    state: Arc<AppState>,
    ehr: Ehr,
}

impl Server {
    fn new(fhir_servers: Vec<String>, fetch_timeout: Duration) -> Server {
        Server::with_bundles(fhir_servers, fetch_timeout, &[])
    }

    /// A server whose repository holds copies of these reference bundles, loaded.
    fn with_bundles(
        fhir_servers: Vec<String>,
        fetch_timeout: Duration,
        bundles: &[&str],
    ) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let ehr = Ehr::new(dir.path());
        std::fs::create_dir(dir.path().join("models")).unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for b in bundles {
            // A reference bundle, or a test fixture bundle (tests/fixtures/attribution).
            let shipped = root.join("models/bundles").join(b);
            let from = if shipped.is_dir() {
                shipped
            } else {
                root.join("tests/fixtures/attribution").join(b)
            };
            copy_dir(&from, &dir.path().join("models").join(b));
        }
        let state = Server::state(
            dir.path(),
            &ehr,
            fhir_servers,
            fetch_timeout,
            bundles,
            HttpConfig::default(),
        );
        Server { dir, state, ehr }
    }

    /// A server with no bundle and this HTTP configuration.
    fn with_http(http: HttpConfig) -> Server {
        Server::with_fhir_and_http(vec![], Duration::from_secs(1), http)
    }

    /// A server with no bundle, these FHIR servers and this HTTP configuration.
    fn with_fhir_and_http(
        fhir_servers: Vec<String>,
        fetch_timeout: Duration,
        http: HttpConfig,
    ) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let ehr = Ehr::new(dir.path());
        std::fs::create_dir(dir.path().join("models")).unwrap();
        let state = Server::state(dir.path(), &ehr, fhir_servers, fetch_timeout, &[], http);
        Server { dir, state, ehr }
    }

    /// The server's state over the folder `dir` (models, audit trail, CDS store).
    fn state(
        dir: &Path,
        ehr: &Ehr,
        fhir_servers: Vec<String>,
        fetch_timeout: Duration,
        bundles: &[&str],
        http: HttpConfig,
    ) -> Arc<AppState> {
        let repository = Arc::new(Repository::new(
            dir.join("models"),
            RepositoryOptions::default(),
        ));
        for b in bundles {
            repository.load(b).unwrap();
        }
        let audit = AuditLog::open(&dir.join("audit.jsonl"), false).unwrap();
        let state = AppState::new(repository, audit, http, None);
        let cds = Cds::new(
            &CdsSettings {
                trust: vec![TrustedIssuer {
                    issuer: ISS.into(),
                    jwks: JwksSource::File(ehr.jwks.clone()),
                }],
                fhir_servers,
                fetch_timeout,
                ..CdsSettings::default()
            },
            &state.repository,
        )
        .unwrap()
        .with_store(CdsStore::open(&dir.join("cds")).unwrap())
        .unwrap();
        assert!(state.set_cds(cds));
        state
    }

    /// The same server stopped and started again (same folder, same EHR keys).
    fn restart(self) -> Server {
        let Server { dir, state, ehr } = self;
        drop(state);
        let state = Server::state(
            dir.path(),
            &ehr,
            vec![],
            Duration::from_secs(1),
            &[],
            HttpConfig::default(),
        );
        Server { dir, state, ehr }
    }

    async fn send(&self, req: Request<Body>) -> (StatusCode, Value) {
        let res = http::app(self.state.clone()).oneshot(req).await.unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
        (status, v)
    }

    fn post(&self, path: &str, token: Option<&str>, body: Vec<u8>) -> Request<Body> {
        let mut req = Request::post(path)
            .header(header::HOST, HOST)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        req.body(Body::from(body)).unwrap()
    }

    /// Posts CDS feedback on the NEWS2 service with a fresh valid token.
    async fn feedback(&self, body: &Value) -> (StatusCode, Value) {
        let token = self
            .ehr
            .token(&format!("http://{HOST}/cds-services/{SERVICE}"));
        self.send(self.post(
            &format!("/cds-services/{SERVICE}/feedback"),
            Some(&token),
            body.to_string().into_bytes(),
        ))
        .await
    }

    /// A hook call with a fresh valid token.
    async fn call(&self, request: &Value) -> (StatusCode, Value) {
        self.call_service(SERVICE, request).await
    }

    /// A call of service `id` with a fresh valid token.
    async fn call_service(&self, id: &str, request: &Value) -> (StatusCode, Value) {
        let token = self.ehr.token(&format!("http://{HOST}/cds-services/{id}"));
        self.send(self.post(
            &format!("/cds-services/{id}"),
            Some(&token),
            request.to_string().into_bytes(),
        ))
        .await
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn when(minutes_ago: i64) -> String {
    (chrono::Utc::now() - chrono::Duration::minutes(minutes_ago)).to_rfc3339()
}

fn obs(n: u32, code: &str, value: Value) -> Value {
    let mut o = json!({
        "resourceType": "Observation", "id": format!("obs-{n}"), "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": format!("Patient/{PATIENT}")},
        "effectiveDateTime": when(30),
    });
    o.as_object_mut()
        .unwrap()
        .extend(value.as_object().unwrap().clone());
    o
}

fn qty(v: f64, unit: &str) -> Value {
    json!({"valueQuantity": {"value": v, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}})
}

/// RR 22 (2), SpO2 94 (scale 1: 1), air (0), systolic 105 (1), pulse 115 (2), alert (0),
/// 38.5 °C (1): NEWS2 7, high clinical risk (RCP 2017 Charts 1 and 3).
fn vitals_bundle() -> Value {
    let entries = vec![
        obs(1, "9279-1", qty(22.0, "/min")),
        obs(2, "59408-5", qty(94.0, "%")),
        obs(3, "3151-8", qty(0.0, "L/min")),
        obs(4, "8480-6", qty(105.0, "mm[Hg]")),
        obs(5, "8867-4", qty(115.0, "/min")),
        obs(
            6,
            "67775-7",
            json!({"valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "248234008"}]}}),
        ),
        // 101.3 °F = 38.5 °C
        obs(7, "8310-5", qty(101.3, "[degF]")),
    ];
    // One set charted at one time (`when` reads the clock at each call).
    let t = when(30);
    let entries: Vec<Value> = entries
        .into_iter()
        .map(|mut o| {
            o["effectiveDateTime"] = json!(t);
            o
        })
        .collect();
    json!({"resourceType": "Bundle", "type": "searchset",
           "entry": entries.into_iter().map(|r| json!({"resource": r})).collect::<Vec<_>>()})
}

fn patient() -> Value {
    json!({"resourceType": "Patient", "id": PATIENT, "gender": "male", "birthDate": "1955-12-23"})
}

/// The specification's patient-view example, with this service's prefetch.
fn patient_view(prefetch: Option<Value>, fhir_server: Option<&str>) -> Value {
    let mut r = json!({
        "hookInstance": uuid(),
        "hook": "patient-view",
        "context": {"userId": "Practitioner/example", "patientId": PATIENT, "encounterId": "89284"},
    });
    if let Some(p) = prefetch {
        r["prefetch"] = p;
    }
    if let Some(s) = fhir_server {
        r["fhirServer"] = json!(s);
        r["fhirAuthorization"] = json!({"access_token": "opaque-fhir-token", "token_type": "Bearer",
            "expires_in": 300, "scope": "user/Patient.read user/Observation.read", "subject": "cds-service4"});
    }
    r
}

#[tokio::test]
async fn discovery_is_open_and_lists_the_news2_service() {
    let server = Server::new(vec![], Duration::from_secs(1));
    let (s, v) = server
        .send(Request::get("/cds-services").body(Body::empty()).unwrap())
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let services = v["services"].as_array().unwrap();
    let news2 = services
        .iter()
        .find(|s| s["id"].as_str().unwrap().contains("news2"))
        .unwrap();
    assert_eq!(news2["hook"], "patient-view");
    assert_eq!(
        news2["prefetch"]["patient"],
        "Patient/{{context.patientId}}"
    );
    assert!(
        news2["description"].as_str().unwrap().contains("NEWS2")
            || news2["title"].as_str().unwrap().contains("NEWS2")
    );
}

#[tokio::test]
async fn a_patient_view_call_gets_its_news2_card_and_feedback_is_joined_to_it() {
    let server = Server::new(vec![], Duration::from_secs(1));
    let request = patient_view(
        Some(json!({"patient": patient(), "vitals": vitals_bundle(), "conditions": null})),
        None,
    );
    let (s, v) = server.call(&request).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let cards = v["cards"].as_array().unwrap();
    assert_eq!(cards.len(), 1, "{v}");
    let card = &cards[0];
    assert!(
        card["summary"].as_str().unwrap().starts_with("NEWS2 7 "),
        "{card}"
    );
    assert_eq!(card["indicator"], "critical");
    assert!(card["summary"].as_str().unwrap().chars().count() < 140);
    assert!(card["source"]["label"].as_str().unwrap().contains("NEWS2"));
    let detail = card["detail"].as_str().unwrap();
    assert!(detail.contains("38.5"), "{detail}");
    assert!(v["systemActions"].is_array(), "{v}");

    // The audit record: service, hookInstance, card, no patient id.
    let audit = server.audit();
    let record = audit.iter().find(|r| r["kind"] == "cds-hook").unwrap();
    assert_eq!(record["request_id"], request["hookInstance"]);
    assert!(
        record["detail"]
            .as_str()
            .unwrap()
            .contains(card["uuid"].as_str().unwrap())
    );
    assert!(record["actor"].as_str().unwrap().starts_with("cds:"));
    assert!(!record.to_string().contains(PATIENT));

    // Feedback: overridden, with a reason.
    let fb = json!({"feedback": [{"card": card["uuid"], "outcome": "overridden",
        "overrideReason": {"reason": {"system": "http://example.org/reasons", "code": "not-relevant"}, "userComment": "post-op"},
        "outcomeTimestamp": chrono::Utc::now().to_rfc3339()}]});
    let (s, v) = server.feedback(&fb).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let stats = server.state.cds().stats.lock().unwrap().clone();
    assert_eq!(
        stats.override_rate(SERVICE, Some(("news2", "rcp-2017"))),
        Some(1.0)
    );
    assert!(
        server
            .audit()
            .iter()
            .any(|r| r["kind"] == "cds-feedback" && r["request_id"] == card["uuid"])
    );
    // Feedback on a card never issued: 400.
    let unknown = json!({"feedback": [{"card": "0b5f0c1e-8a7e-4b1e-9d5c-1b2c3d4e5f60", "outcome": "overridden",
        "outcomeTimestamp": chrono::Utc::now().to_rfc3339()}]});
    let (s, v) = server.feedback(&unknown).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // Refused calls and feedback are audited too (a red-team finding: only answered ones
    // were): the refused feedback above, a malformed call, and a call without a token.
    let (s, _) = server
        .send(
            server.post(
                &format!("/cds-services/{SERVICE}"),
                Some(
                    &server
                        .ehr
                        .token(&format!("http://{HOST}/cds-services/{SERVICE}")),
                ),
                b"{not json".to_vec(),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = server
        .send(server.post(&format!("/cds-services/{SERVICE}"), None, b"{}".to_vec()))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let refused: Vec<(String, u64, String, String)> = server
        .audit()
        .iter()
        .filter(|r| r["outcome"] == "rejected")
        .map(|r| {
            (
                r["kind"].as_str().unwrap().to_owned(),
                r["status"].as_u64().unwrap(),
                r["actor"].as_str().unwrap().to_owned(),
                r["detail"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let feedback_path = format!("path=/cds-services/{SERVICE}/feedback refused");
    let call_path = format!("path=/cds-services/{SERVICE} refused");
    assert_eq!(refused.len(), 3, "{refused:?}");
    assert_eq!(
        (refused[0].0.as_str(), refused[0].1, refused[0].3.as_str()),
        ("cds-feedback", 400, feedback_path.as_str())
    );
    assert!(refused[0].2.starts_with("cds:"), "{refused:?}");
    assert_eq!(
        (refused[1].0.as_str(), refused[1].1, refused[1].3.as_str()),
        ("cds-hook", 400, call_path.as_str())
    );
    assert_eq!(
        (refused[2].0.as_str(), refused[2].1, refused[2].2.as_str()),
        ("cds-hook", 401, "unauthenticated")
    );

    // After a restart the card is still known (the store), and the counts carry on.
    let server = server.restart();
    let stats = server.state.cds().stats.lock().unwrap().clone();
    assert_eq!(stats.counts(SERVICE, Some(("news2", "rcp-2017"))), (0, 1));
    let again = json!({"feedback": [{"card": card["uuid"], "outcome": "overridden",
        "outcomeTimestamp": chrono::Utc::now().to_rfc3339()}]});
    let (s, v) = server.feedback(&again).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The same card's feedback again, after the restart: it replaces the card's outcome
    // (each card counts once, as its latest feedback says; it was counted twice).
    let stats = server.state.cds().stats.lock().unwrap().clone();
    assert_eq!(stats.counts(SERVICE, Some(("news2", "rcp-2017"))), (0, 1));
    // Another client of the EHR (another `sub`) cannot replace it: the card was issued to
    // the first (a red-team finding: a second EHR's feedback replaced the first's), also
    // after the restart (the store keeps the card's client).
    let other = server.ehr.token_of(
        &format!("http://{HOST}/cds-services/{SERVICE}"),
        None,
        "another-client",
    );
    let accepted = json!({"feedback": [{"card": card["uuid"], "outcome": "overridden",
        "outcomeTimestamp": chrono::Utc::now().to_rfc3339()}]});
    let (s, v) = server
        .send(server.post(
            &format!("/cds-services/{SERVICE}/feedback"),
            Some(&other),
            accepted.to_string().into_bytes(),
        ))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v.to_string().contains("issued to another client"), "{v}");
    let stats = server.state.cds().stats.lock().unwrap().clone();
    assert_eq!(stats.counts(SERVICE, Some(("news2", "rcp-2017"))), (0, 1));
    // The store holds no comment text and no patient identifier.
    let db = std::fs::read(server.dir.path().join("cds/feedback.sqlite3")).unwrap();
    let text = String::from_utf8_lossy(&db);
    assert!(!text.contains("post-op") && !text.contains(PATIENT));
}

#[tokio::test]
async fn tokens_for_another_url_replayed_or_absent_are_401() {
    let server = Server::new(vec![], Duration::from_secs(1));
    let body = patient_view(Some(json!({"patient": patient()})), None).to_string();
    let path = format!("/cds-services/{SERVICE}");
    let (s, _) = server
        .send(server.post(&path, None, body.clone().into_bytes()))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // aud: another host, another service.
    for aud in [
        format!("http://other.host:8000/cds-services/{SERVICE}"),
        format!("http://{HOST}/cds-services/other"),
        format!("https://{HOST}/cds-services/{SERVICE}"),
    ] {
        let t = server.ehr.token(&aud);
        let (s, v) = server
            .send(server.post(&path, Some(&t), body.clone().into_bytes()))
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{aud}: {v}");
    }
    // A token the EHR minted for another service, sent with that service's Host: without
    // --cds-base-url only a loopback Host gives the audience, so it is not taken.
    let other = "other-vendor.example:8000";
    let t = server.ehr.token(&format!("http://{other}{path}"));
    let req = Request::post(&path)
        .header(header::HOST, other)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, format!("Bearer {t}"))
        .body(Body::from(body.clone()))
        .unwrap();
    let (s, v) = server.send(req).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    // Accepted once, then replayed.
    let t = server.ehr.token(&format!("http://{HOST}{path}"));
    let (s, v) = server
        .send(server.post(&path, Some(&t), body.clone().into_bytes()))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = server
        .send(server.post(&path, Some(&t), body.clone().into_bytes()))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert!(v["error"].as_str().unwrap().contains("already used"), "{v}");
    // A service that does not exist (with a token for it): 404.
    let t = server
        .ehr
        .token(&format!("http://{HOST}/cds-services/nope"));
    let (s, _) = server
        .send(server.post("/cds-services/nope", Some(&t), body.into_bytes()))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// Red-team finding: each call without a token appended a record to the hash-chained
/// trail, 0.5 MB/s from one client, whose disk audit writes (failing closed) need. A burst
/// is recorded one by one, the rest counted: named by the next record let through, or
/// summarised a second after the first held back. Every refusal is accounted for.
#[tokio::test]
async fn a_flood_of_calls_without_a_token_is_audited_in_bounded_records() {
    let server = Server::new(vec![], Duration::from_secs(1));
    let path = format!("/cds-services/{SERVICE}");
    const CALLS: u64 = 60;
    for _ in 0..CALLS {
        let (s, _) = server.send(server.post(&path, None, b"{}".to_vec())).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    let counted = |records: &[Value]| -> (usize, u64) {
        let refused: Vec<&Value> = records
            .iter()
            .filter(|r| r["actor"] == "unauthenticated")
            .collect();
        let total = refused
            .iter()
            .map(|r| {
                let d = r["detail"].as_str().unwrap();
                if let Some(n) = d.strip_suffix(
                    " unauthenticated CDS Hooks requests refused, not recorded one by one (more than one a second)",
                ) {
                    n.parse::<u64>().unwrap()
                } else if let Some((_, after)) = d.split_once("(after ") {
                    1 + after.split(' ').next().unwrap().parse::<u64>().unwrap()
                } else {
                    1
                }
            })
            .sum();
        (refused.len(), total)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (records, total) = counted(&server.audit());
        // One by one up to the burst (a slow machine refills a few more meanwhile).
        assert!(records < 40, "{records} records for {CALLS} refusals");
        if total == CALLS {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{total} of {CALLS} refusals accounted for in the trail"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The summary is a record of the hook's kind, like those it stands for.
    let last = server.audit().last().cloned().unwrap();
    assert_eq!(last["kind"], "cds-hook");
    // Feedback is counted on its own, and a shutdown writes what is held at once (a
    // re-attack's finding: the last second's refusals were lost with the process, and the
    // summary named one kind for both).
    let feedback = format!("/cds-services/{SERVICE}/feedback");
    for _ in 0..CALLS {
        let (s, _) = server
            .send(server.post(&feedback, None, b"{}".to_vec()))
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    server.state.flush_held_audit().await;
    let of_feedback: Vec<Value> = server
        .audit()
        .into_iter()
        .filter(|r| r["kind"] == "cds-feedback")
        .collect();
    assert_eq!(counted(&of_feedback).1, CALLS, "{of_feedback:?}");
}

#[tokio::test]
async fn hostile_bodies_are_400_or_413_and_say_nothing_of_their_content() {
    // Every refusal counts as `rejected` (a red-team finding: a 413 and a prefetch that is
    // not FHIR were audited and never counted). Other tests of this binary may add to the
    // same series meanwhile: at least this test's refusals.
    let metrics = nightingale::http::install_recorder();
    let rejected = || {
        let series = format!(
            "nightingale_cds_requests_total{{service=\"{SERVICE}\",outcome=\"rejected\"}} "
        );
        metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(&series).map(|v| v.parse::<u64>().unwrap()))
            .unwrap_or(0)
    };
    let before = rejected();
    let server = Server::new(vec![], Duration::from_secs(1));
    let cases: Vec<(Vec<u8>, StatusCode)> = vec![
        (b"not json".to_vec(), StatusCode::BAD_REQUEST),
        (b"{}".to_vec(), StatusCode::BAD_REQUEST),
        (
            json!({"hook": "order-sign", "hookInstance": uuid(), "context": {"patientId": PATIENT}})
                .to_string()
                .into_bytes(),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"hook": "patient-view", "hookInstance": "not-a-uuid", "context": {"patientId": PATIENT}})
                .to_string()
                .into_bytes(),
            StatusCode::BAD_REQUEST,
        ),
        (
            // A prefetch that is not FHIR: 400 with where, not what.
            json!({"hook": "patient-view", "hookInstance": uuid(), "context": {"patientId": PATIENT},
                   "prefetch": {"patient": {"resourceType": "Patient", "birthDate": 19551223}}})
                .to_string()
                .into_bytes(),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(),
            StatusCode::BAD_REQUEST,
        ),
        (
            vec![b' '; nightingale::http::cds::MAX_BODY_BYTES + 1],
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (body, want) in cases {
        let t = server
            .ehr
            .token(&format!("http://{HOST}/cds-services/{SERVICE}"));
        let (s, v) = server
            .send(server.post(&format!("/cds-services/{SERVICE}"), Some(&t), body))
            .await;
        assert_eq!(s, want, "{v}");
        assert!(!v.to_string().contains("19551223"), "{v}");
    }
    // The 400 says which field, or that the JSON is nested too deeply; never the value.
    for (body, says) in [
        (
            json!({"hook": "patient-view", "context": {"patientId": "DOE-12345"}}).to_string(),
            "missing field `hookInstance`",
        ),
        (
            json!({"hook": "patient-view", "hookInstance": 12345, "context": {"patientId": "DOE-12345"}})
                .to_string(),
            "invalid type, expected a string",
        ),
        (
            format!(
                r#"{{"hook": "patient-view", "context": {{"x": {}{}}}}}"#,
                "[".repeat(200),
                "]".repeat(200)
            ),
            "nested too deeply",
        ),
        (
            // A key named twice (a review's finding: the last one was read, so a reading
            // that one copy retracts was scored): refused whole, the key named.
            format!(
                r#"{{"hook": "patient-view", "hookInstance": "{}", "context": {{"patientId": "DOE-12345"}},
                    "prefetch": {{"vitals": {{"resourceType": "Observation", "status": "entered-in-error",
                    "status": "final"}}}}}}"#,
                uuid()
            ),
            "names the key `status` twice",
        ),
    ] {
        let t = server
            .ehr
            .token(&format!("http://{HOST}/cds-services/{SERVICE}"));
        let (s, v) = server
            .send(server.post(&format!("/cds-services/{SERVICE}"), Some(&t), body.into_bytes()))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(v.to_string().contains(says), "{says}: {v}");
        assert!(!v.to_string().contains("DOE-12345") && !v.to_string().contains("12345"), "{v}");
    }
    assert!(rejected() >= before + 11, "{before} then {}", rejected());
}

#[tokio::test]
async fn cds_bodies_are_read_under_the_in_flight_memory_budget() {
    // 4 MiB of budget: a 300 KB prefetch may take 16x its text once parsed (a number of one
    // or two bytes is a 32-byte JSON value), more than the budget: refused before parsing,
    // as an /infer body would be; a call with an ordinary prefetch is answered.
    let server = Server::with_http(HttpConfig {
        max_inflight_bytes: 4 << 20,
        ..HttpConfig::default()
    });
    let url = format!("/cds-services/{SERVICE}");
    let prefetch = json!({"patient": patient(), "vitals": vitals_bundle()});
    let mut big = patient_view(Some(prefetch.clone()), None);
    big["prefetch"]["padding"] = json!(vec![0; 150_000]);
    let body = big.to_string().into_bytes();
    assert!(body.len() > 300_000);
    let t = server.ehr.token(&format!("http://{HOST}{url}"));
    let (s, v) = server.send(server.post(&url, Some(&t), body)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("max_inflight_bytes"),
        "{v}"
    );
    let t = server.ehr.token(&format!("http://{HOST}{url}"));
    let body = patient_view(Some(prefetch), None).to_string().into_bytes();
    let (s, v) = server.send(server.post(&url, Some(&t), body)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(
        v["cards"][0]["summary"].as_str().unwrap().contains("NEWS2"),
        "{v}"
    );
}

#[tokio::test]
async fn missing_vitals_or_a_child_get_an_info_card_not_a_score() {
    let server = Server::new(vec![], Duration::from_secs(1));
    let (s, v) = server
        .call(&patient_view(Some(json!({"patient": patient()})), None))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let card = &v["cards"][0];
    assert_eq!(card["indicator"], "info");
    assert!(
        card["summary"]
            .as_str()
            .unwrap()
            .starts_with("NEWS2 not calculated"),
        "{card}"
    );
    let child = json!({"resourceType": "Patient", "id": PATIENT, "birthDate": (chrono::Utc::now() - chrono::Duration::days(365 * 10)).format("%Y-%m-%d").to_string()});
    let (s, v) = server
        .call(&patient_view(
            Some(json!({"patient": child, "vitals": vitals_bundle()})),
            None,
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["cards"][0]["indicator"], "info");
    assert!(
        v["cards"][0]["summary"]
            .as_str()
            .unwrap()
            .contains("under 16"),
        "{v}"
    );
}

/// What the FHIR server was asked: (URI, Authorization header).
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// A FHIR server on port 0: answers the service's queries, slowly, or with 500, or from
/// `pages` (path and query → body; a path alone matches any query of that path that `pages`
/// does not name; an empty searchset otherwise).
#[derive(Clone)]
enum Fhir {
    Answers,
    Slow,
    Fails,
    Pages(Pages),
}

type Pages = Arc<Mutex<std::collections::BTreeMap<String, Value>>>;

async fn fhir_server(mode: Fhir, seen: Seen) -> String {
    use axum::extract::State;
    async fn any(
        State((mode, seen)): State<(Fhir, Seen)>,
        uri: axum::http::Uri,
        headers: axum::http::HeaderMap,
    ) -> (StatusCode, String) {
        let auth = headers
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        seen.lock().unwrap().push((uri.to_string(), auth));
        match mode {
            Fhir::Fails => return (StatusCode::INTERNAL_SERVER_ERROR, "{}".into()),
            Fhir::Slow => tokio::time::sleep(Duration::from_secs(5)).await,
            Fhir::Answers => {}
            Fhir::Pages(pages) => {
                let pages = pages.lock().unwrap();
                let body = pages
                    .get(&uri.to_string())
                    .or_else(|| pages.get(uri.path()))
                    .cloned()
                    .unwrap_or_else(
                        || json!({"resourceType": "Bundle", "type": "searchset", "entry": []}),
                    );
                return (StatusCode::OK, body.to_string());
            }
        }
        let path = uri.path();
        let body = if path.ends_with(&format!("/Patient/{PATIENT}")) {
            patient()
        } else if path.ends_with("/Observation") {
            vitals_bundle()
        } else {
            json!({"resourceType": "Bundle", "type": "searchset", "entry": []})
        };
        (StatusCode::OK, body.to_string())
    }
    let app = axum::Router::new().fallback(any).with_state((mode, seen));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/fhir")
}

#[tokio::test]
async fn what_is_not_prefetched_is_fetched_from_an_allow_listed_fhir_server() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let fhir = fhir_server(Fhir::Answers, seen.clone()).await;
    let server = Server::new(vec![fhir.clone()], Duration::from_secs(5));
    let (s, v) = server.call(&patient_view(None, Some(&fhir))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(
        v["cards"][0]["summary"]
            .as_str()
            .unwrap()
            .starts_with("NEWS2 7 "),
        "{v}"
    );
    let seen = seen.lock().unwrap().clone();
    // The Patient, the vital signs, the Conditions, the level of consciousness and the
    // pregnancy status.
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert!(
        seen.iter()
            .all(|(_, auth)| auth == "Bearer opaque-fhir-token")
    );
    assert!(
        seen.iter()
            .any(|(uri, _)| uri.starts_with("/fhir/Observation?patient=1288992")),
        "{seen:?}"
    );

    // Not allow-listed: not fetched, an info card says what is missing.
    let other = Server::new(vec![], Duration::from_secs(5));
    let (s, v) = other.call(&patient_view(None, Some(&fhir))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["cards"][0]["indicator"], "info", "{v}");
}

#[tokio::test]
async fn a_slow_or_failing_fhir_server_ends_in_a_missing_data_card_in_bounded_time() {
    for mode in [Fhir::Slow, Fhir::Fails] {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let fhir = fhir_server(mode, seen.clone()).await;
        let server = Server::new(vec![fhir.clone()], Duration::from_millis(300));
        let (s, v) = tokio::time::timeout(
            Duration::from_secs(4),
            server.call(&patient_view(None, Some(&fhir))),
        )
        .await
        .expect("answered before the slow server would have");
        assert_eq!(s, StatusCode::OK, "{v}");
        let card = &v["cards"][0];
        assert_eq!(card["indicator"], "info", "{v}");
        assert!(
            card["summary"]
                .as_str()
                .unwrap()
                .starts_with("NEWS2 not calculated"),
            "{v}"
        );
        assert_eq!(seen.lock().unwrap().len(), 5);
    }
}

/// The vital signs of [`vitals_bundle`] as a search answered in pages: the first `split`
/// entries on the first page, whose `next` link is `next`, the rest on the page `rest`.
fn vitals_pages(split: usize, next: &str) -> (Value, Value) {
    let all = vitals_bundle()["entry"].as_array().unwrap().clone();
    let first = json!({"resourceType": "Bundle", "type": "searchset", "total": all.len(),
        "link": [{"relation": "next", "url": next}], "entry": all[..split]});
    let rest = json!({"resourceType": "Bundle", "type": "searchset", "total": all.len(),
        "entry": all[split..]});
    (first, rest)
}

/// A NEWS2 prefetch whose vital signs are the first `split` of [`vitals_bundle`] as the first
/// page of a search, its `next` link `next`.
fn paged_prefetch(split: usize, next: &str) -> Value {
    let (first, _) = vitals_pages(split, next);
    json!({"patient": patient(), "vitals": first, "conditions": no_conditions(),
        "consciousness": no_pregnancy_status(), "pregnancy": no_pregnancy_status()})
}

/// The NEWS2 service's pregnancy-status (or consciousness) search, answered with none.
fn no_pregnancy_status() -> Value {
    json!({"resourceType": "Bundle", "type": "searchset", "total": 0, "entry": []})
}

/// The NEWS2 service's Condition search, answered with none (not `null`: a null prefetch
/// entry is fetched).
fn no_conditions() -> Value {
    json!({"resourceType": "Bundle", "type": "searchset", "total": 0, "entry": []})
}

fn news2_summary(v: &Value) -> &str {
    v["cards"][0]["summary"].as_str().unwrap()
}

#[tokio::test]
async fn a_search_answered_in_pages_is_read_to_its_end_on_the_fhir_server_only() {
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let pages: Pages = Arc::default();
    let fhir = fhir_server(Fhir::Pages(pages.clone()), seen.clone()).await;
    let other_seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let other = fhir_server(Fhir::Pages(Arc::default()), other_seen.clone()).await;
    let page2 = format!("{fhir}/Observation?patient={PATIENT}&_page=2");
    let (first, rest) = vitals_pages(3, &page2);
    {
        let mut p = pages.lock().unwrap();
        p.insert(format!("/fhir/Patient/{PATIENT}"), patient());
        p.insert("/fhir/Observation".into(), first);
        p.insert(
            format!("/fhir/Observation?patient={PATIENT}&_page=2"),
            rest.clone(),
        );
    }
    let server = Server::new(vec![fhir.clone()], Duration::from_secs(5));

    // Fetched: the search's second page is read too (with the EHR's token), so all seven
    // vital signs score.
    let (s, v) = server.call(&patient_view(None, Some(&fhir))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(news2_summary(&v).starts_with("NEWS2 7 "), "{v}");
    let requests = seen.lock().unwrap().clone();
    assert!(
        requests
            .iter()
            .any(|(uri, auth)| uri.ends_with("&_page=2") && auth == "Bearer opaque-fhir-token"),
        "{requests:?}"
    );

    // Prefetched: the EHR sent the first page; the service reads the rest.
    seen.lock().unwrap().clear();
    let prefetch = paged_prefetch(3, &page2);
    let (s, v) = server
        .call(&patient_view(Some(prefetch.clone()), Some(&fhir)))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(news2_summary(&v).starts_with("NEWS2 7 "), "{v}");
    let requests = seen.lock().unwrap().clone();
    assert_eq!(requests.len(), 1, "only the second page: {requests:?}");
    assert!(requests[0].0.ends_with("&_page=2"), "{requests:?}");

    // A paged entry under a key the service does not declare is not read on (any number of
    // them would each cost up to 20 fetches).
    seen.lock().unwrap().clear();
    let (first_again, _) = vitals_pages(3, &page2);
    let prefetch_extra = json!({"patient": patient(), "vitals": vitals_bundle(), "conditions": no_conditions(),
        "consciousness": no_pregnancy_status(), "pregnancy": no_pregnancy_status(),
        "extra-1": first_again.clone(), "extra-2": first_again});
    let (s, v) = server
        .call(&patient_view(Some(prefetch_extra), Some(&fhir)))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(
        seen.lock().unwrap().is_empty(),
        "{:?}",
        seen.lock().unwrap()
    );

    // Without an allow-listed fhirServer the first page is all there is: not scored.
    let closed = Server::new(vec![], Duration::from_secs(5));
    let (s, v) = closed
        .call(&patient_view(Some(prefetch), Some(&fhir)))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(news2_summary(&v).starts_with("NEWS2 not calculated"), "{v}");

    // A next link elsewhere (another server, a path beside the FHIR base, a dot segment) is
    // never followed: the EHR's token goes to the allow-listed server only.
    let addr = fhir.trim_end_matches("/fhir");
    for elsewhere in [
        format!("{other}/Observation?_page=2"),
        format!("{addr}/fhirx/Observation?_page=2"),
        format!("{fhir}/../admin?_page=2"),
        format!("{fhir}/Observation#?_page=2"),
    ] {
        seen.lock().unwrap().clear();
        let prefetch = paged_prefetch(3, &elsewhere);
        let (s, v) = server
            .call(&patient_view(Some(prefetch), Some(&fhir)))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert!(
            news2_summary(&v).starts_with("NEWS2 not calculated"),
            "{elsewhere}: {v}"
        );
        assert!(
            seen.lock().unwrap().is_empty(),
            "{elsewhere}: {:?}",
            seen.lock().unwrap()
        );
    }
    assert!(other_seen.lock().unwrap().is_empty());

    // A page the FHIR reader refuses (entries that are not resources, a link that is not a
    // list) is left out whole: the call still answers, the search is one part of the result.
    for bad in [
        json!({"resourceType": "Bundle", "type": "searchset", "entry": [1, 2]}),
        json!({"resourceType": "Bundle", "type": "searchset",
               "link": {"relation": "next", "url": "x"}, "entry": []}),
    ] {
        pages
            .lock()
            .unwrap()
            .insert("/fhir/Observation?_page=bad".into(), bad.clone());
        seen.lock().unwrap().clear();
        let prefetch = paged_prefetch(3, &format!("{fhir}/Observation?_page=bad"));
        let (s, v) = server
            .call(&patient_view(Some(prefetch), Some(&fhir)))
            .await;
        assert_eq!(s, StatusCode::OK, "{bad}: {v}");
        assert!(
            news2_summary(&v).starts_with("NEWS2 not calculated"),
            "{bad}: {v}"
        );
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    // A server that pages for ever (each page links to a new one) or in a loop: bounded.
    {
        let mut p = pages.lock().unwrap();
        p.clear();
        for n in 2..100 {
            p.insert(
                format!("/fhir/Observation?_page={n}"),
                json!({"resourceType": "Bundle", "type": "searchset",
                       "link": [{"relation": "next", "url": format!("{fhir}/Observation?_page={}", n + 1)}],
                       "entry": []}),
            );
        }
        p.insert(
            "/fhir/Observation?_page=loop".into(),
            json!({"resourceType": "Bundle", "type": "searchset",
                   "link": [{"relation": "next", "url": format!("{fhir}/Observation?_page=loop")}]}),
        );
    }
    for (start, most) in [("2", 19), ("loop", 1)] {
        seen.lock().unwrap().clear();
        let prefetch = paged_prefetch(7, &format!("{fhir}/Observation?_page={start}"));
        let (s, v) = tokio::time::timeout(
            Duration::from_secs(20),
            server.call(&patient_view(Some(prefetch), Some(&fhir))),
        )
        .await
        .expect("answered");
        assert_eq!(s, StatusCode::OK, "{v}");
        // Never read to its end, and the page read ends at its values' own time: what is
        // not read may be as new, so no score (a call answered in bounded time).
        assert!(news2_summary(&v).starts_with("NEWS2 not calculated"), "{v}");
        let n = seen.lock().unwrap().len();
        assert_eq!(n, most, "pages read after the first (start {start})");
    }
}

#[tokio::test]
async fn what_is_fetched_from_fhir_is_charged_to_the_in_flight_memory_budget() {
    // 4 MiB of budget; the FHIR server's Observation search answers 300 KB, which parsed may
    // take 16x that: more than the budget, so it is refused as it arrives and the vital
    // signs count as missing (the call is still answered). The same search at its ordinary
    // size is read and scored.
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let pages: Pages = Arc::default();
    let fhir = fhir_server(Fhir::Pages(pages.clone()), seen.clone()).await;
    let mut big = vitals_bundle();
    big["entry"][0]["resource"]["note"] = json!([{"text": "x".repeat(300_000)}]);
    {
        let mut p = pages.lock().unwrap();
        p.insert(format!("/fhir/Patient/{PATIENT}"), patient());
        p.insert("/fhir/Observation".into(), big);
    }
    let server = Server::with_fhir_and_http(
        vec![fhir.clone()],
        Duration::from_secs(5),
        HttpConfig {
            max_inflight_bytes: 4 << 20,
            ..HttpConfig::default()
        },
    );
    let (s, v) = server.call(&patient_view(None, Some(&fhir))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(news2_summary(&v).starts_with("NEWS2 not calculated"), "{v}");
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .any(|(uri, _)| uri.starts_with("/fhir/Observation")),
        "the search was sent"
    );
    // Everything the call held is given back: the ordinary search now scores.
    pages
        .lock()
        .unwrap()
        .insert("/fhir/Observation".into(), vitals_bundle());
    let (s, v) = server.call(&patient_view(None, Some(&fhir))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(news2_summary(&v).starts_with("NEWS2 7 "), "{v}");
}

// ---- Risk-model cards (issue 10 item 4) ----------------------------------------------------
//
// Expected values come from tests/fixtures/attribution/*.json, written by
// models/train/make_attribution_fixtures.py: numpy float64 from the ONNX graph's own
// attributes (the `onnx` package), and onnxruntime's probability, not from the code under test.

fn fixture(bundle: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/attribution")
        .join(format!("{bundle}.json"));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn logit(p: f64) -> f64 {
    (p / (1.0 - p)).ln()
}

#[tokio::test]
async fn linear_contributions_equal_the_graph_weights_in_f64_and_sum_to_the_logit_change() {
    let server = Server::with_bundles(
        vec![],
        Duration::from_secs(1),
        &["icu-mortality", "pima-diabetes"],
    );
    for bundle in ["icu-mortality", "pima-diabetes"] {
        let f = fixture(bundle);
        let model = server.state.repository.get(bundle, None).unwrap();
        let bytes = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("models/bundles")
                .join(bundle)
                .join("1/model.onnx"),
        )
        .unwrap();
        let reference = floats(&f["reference"]);
        let column = f["positive_column"].as_u64().unwrap() as usize;
        let linear = nightingale_inference::explain::LinearLogistic::from_onnx(
            &bytes,
            reference.len(),
            column,
        )
        .unwrap()
        .expect("a Scaler + LinearClassifier graph");
        let reference_logit = f["reference_logit"].as_f64().unwrap();
        assert!((linear.logit(&reference) - reference_logit).abs() < 1e-9);
        for case in f["cases"].as_array().unwrap() {
            let x = floats(&case["x"]);
            let expected = floats(&case["contributions"]);
            let got = linear.contributions(&x, &reference);
            for (g, e) in got.iter().zip(&expected) {
                assert!((g - e).abs() < 1e-4, "{bundle}: {got:?} vs {expected:?}");
            }
            // The model's own output, through the engine (the served worker).
            let tensor = nightingale_inference::Tensor::from_vec(
                vec![1, x.len()],
                x.iter().map(|&v| v as f32).collect(),
            )
            .unwrap();
            let out = model
                .worker
                .infer(vec![nightingale_inference::NamedTensor::new(
                    "features", tensor,
                )])
                .await
                .unwrap();
            let p = out
                .iter()
                .find(|o| o.name == "probabilities")
                .unwrap()
                .tensor
                .view::<f32>()
                .unwrap()
                .iter()
                .nth(column)
                .copied()
                .unwrap() as f64;
            let ort = case["onnxruntime_probability"].as_f64().unwrap();
            assert!(
                (p - ort).abs() < 1e-5,
                "{bundle}: engine {p} vs onnxruntime {ort}"
            );
            let sum: f64 = got.iter().sum();
            assert!(
                (sum - (logit(p) - reference_logit)).abs() < 1e-4,
                "{bundle}: Σ {sum} vs logit(p) − logit(reference) {}",
                logit(p) - reference_logit
            );
        }
    }
}

/// The FHIR data of the first icu-mortality fixture case: 81 years, systolic 88 mmHg (as
/// 11.7324 kPa), pulse 124/min, female, sepsis, an emergency encounter.
fn icu_prefetch(with_conditions: bool) -> Value {
    let today = chrono::Utc::now().date_naive();
    // Born 81 years and 40 days ago: 81 whole years today.
    let born = today
        .checked_sub_months(chrono::Months::new(81 * 12))
        .unwrap()
        - chrono::Duration::days(40);
    let patient = json!({"resourceType": "Patient", "id": PATIENT, "gender": "female",
        "birthDate": born.format("%Y-%m-%d").to_string()});
    let observations = json!({"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": obs(1, "8480-6", qty(88.0 / 7.500617, "kPa"))},
        {"resource": obs(2, "8867-4", qty(124.0, "/min"))},
    ]});
    let conditions = json!({"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": {"resourceType": "Condition", "id": "c1",
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "91302008"}]},
            "subject": {"reference": format!("Patient/{PATIENT}")}}}]});
    let encounters = json!({"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": {"resourceType": "Encounter", "id": "89284", "status": "in-progress",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "EMER"},
            "subject": {"reference": format!("Patient/{PATIENT}")}}}]});
    let mut p = json!({"patient": patient, "observations": observations, "encounters": encounters});
    if with_conditions {
        p["conditions"] = conditions;
    }
    p
}

/// The number right after `key` in a card's detail.
fn number_after(detail: &str, key: &str) -> f64 {
    let at = detail
        .find(key)
        .unwrap_or_else(|| panic!("{key:?} in {detail}"))
        + key.len();
    detail[at..]
        .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The six-decimal numbers of a risk card's detail: p, and the contribution table.
fn card_numbers(detail: &str) -> (f64, f64, Vec<f64>) {
    let p = number_after(detail, "(p = ");
    let reference = number_after(detail, "training mean of every input: p = ");
    (p, reference, contribution_table(detail))
}

/// The contribution column of a risk card's table.
fn contribution_table(detail: &str) -> Vec<f64> {
    detail
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| Factor"))
        .map(|l| {
            l.trim_end_matches(" |")
                .rsplit("| ")
                .next()
                .unwrap()
                .trim()
                .parse::<f64>()
                .unwrap()
        })
        .collect()
}

#[tokio::test]
async fn a_risk_service_answers_with_the_risk_its_reasons_and_the_model_version() {
    let server = Server::with_bundles(
        vec![],
        Duration::from_secs(1),
        &["icu-mortality", "pima-diabetes"],
    );
    // Built-in: NEWS2 plus one risk service per reference bundle with FHIR sources.
    let (s, v) = server
        .send(Request::get("/cds-services").body(Body::empty()).unwrap())
        .await;
    assert_eq!(s, StatusCode::OK);
    let ids: Vec<&str> = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "nightingale-news2",
            "nightingale-icu-mortality",
            "nightingale-pima-diabetes"
        ]
    );
    let icu = &v["services"][1];
    assert_eq!(icu["hook"], "patient-view");
    assert_eq!(icu["prefetch"]["patient"], "Patient/{{context.patientId}}");
    assert_eq!(
        icu["prefetch"]["observations"],
        "Observation?patient={{context.patientId}}&code=http://loinc.org|55284-4,http://loinc.org|76534-7,http://loinc.org|8459-0,http://loinc.org|8460-8,http://loinc.org|8461-6,http://loinc.org|8480-6,http://loinc.org|85354-9,http://loinc.org|8867-4,http://loinc.org|8889-8,http://loinc.org|8893-0&_sort=-date&_count=100"
    );
    assert!(
        icu["prefetch"]["conditions"]
            .as_str()
            .unwrap()
            .starts_with("Condition?")
    );
    assert!(
        icu["prefetch"]["encounters"]
            .as_str()
            .unwrap()
            .starts_with("Encounter?")
    );

    let request = patient_view(Some(icu_prefetch(true)), None);
    let (s, v) = server
        .call_service("nightingale-icu-mortality", &request)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let cards = v["cards"].as_array().unwrap();
    assert_eq!(cards.len(), 1);
    let card = &cards[0];
    let f = fixture("icu-mortality");
    let case = &f["cases"][0];
    let expected_p = case["onnxruntime_probability"].as_f64().unwrap();
    // The detail is markdown with its special characters escaped: read it unescaped.
    let detail = &card["detail"].as_str().unwrap().replace('\\', "");
    let (p, reference, contributions) = card_numbers(detail);
    assert!(
        (p - expected_p).abs() < 1e-5,
        "{p} vs onnxruntime {expected_p}"
    );
    // Above the bundle's Youden threshold (0.183632): a warning.
    assert!(expected_p >= 0.183632);
    assert_eq!(card["indicator"], "warning");
    assert!(
        card["summary"]
            .as_str()
            .unwrap()
            .contains("icu-mortality 1"),
        "{card}"
    );
    assert!(detail.contains("model icu-mortality version 1"));
    assert!(detail.contains("NOT for clinical use without local validation"));
    assert!(detail.contains("Stat2Data ICU"));
    // The top factors in words: systolic 88 mmHg (converted from kPa) raised the risk most.
    assert!(
        detail.contains("- systolic bp 88 mm[Hg] raised the risk (+1.07 logit)"),
        "{detail}"
    );
    let expected = floats(&case["contributions"]);
    assert_eq!(contributions.len(), expected.len());
    for (g, e) in contributions.iter().zip(&expected) {
        assert!((g - e).abs() < 1e-4, "{contributions:?} vs {expected:?}");
    }
    let reference_logit = f["reference_logit"].as_f64().unwrap();
    assert!((logit(reference) - reference_logit).abs() < 1e-4);
    let sum: f64 = contributions.iter().sum();
    assert!((sum - (logit(p) - reference_logit)).abs() < 1e-4);

    // One inference audit record, by the CDS caller, and the hook record naming the model.
    let audit = server.audit();
    let inference = audit
        .iter()
        .find(|e| e["kind"] == "inference" && e["model"] == "icu-mortality")
        .expect("an inference record");
    assert_eq!(inference["version"], "1");
    assert!(
        inference["request_id"]
            .as_str()
            .unwrap()
            .starts_with("cds-")
    );
    assert!(
        inference["actor"].as_str().unwrap().starts_with("cds:"),
        "{inference}"
    );
    let hook = audit.iter().find(|e| e["kind"] == "cds-hook").unwrap();
    assert_eq!(hook["model"], "icu-mortality");

    // Feedback is counted per model version.
    let token = server.ehr.token(&format!(
        "http://{HOST}/cds-services/nightingale-icu-mortality"
    ));
    let fb = json!({"feedback": [{"card": card["uuid"], "outcome": "overridden",
        "overrideReason": {"reason": {"system": "http://example.org/reasons", "code": "not-relevant"}},
        "outcomeTimestamp": chrono::Utc::now().to_rfc3339()}]});
    let (s, v) = server
        .send(server.post(
            "/cds-services/nightingale-icu-mortality/feedback",
            Some(&token),
            fb.to_string().into_bytes(),
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let fb = server
        .audit()
        .into_iter()
        .find(|e| e["kind"] == "cds-feedback")
        .unwrap();
    assert_eq!(
        (fb["model"].as_str(), fb["version"].as_str()),
        (Some("icu-mortality"), Some("1"))
    );
}

/// A model that is not linear-logistic (a gradient-boosting test bundle with the ICU inputs
/// and a KernelSHAP background): the card's factors are its Shapley values in logit space
/// against the background, every coalition evaluated. Expected: numpy's enumeration of every
/// coalition with onnxruntime scoring each row (tests/fixtures/attribution/icu-mortality-gbm.json,
/// models/train/make_attribution_fixtures.py).
#[tokio::test]
async fn a_non_linear_model_card_gets_kernel_shap_factors_against_its_background() {
    let server = Server::with_bundles(vec![], Duration::from_secs(1), &["icu-mortality-gbm"]);
    let f = fixture("icu-mortality-gbm");
    let case = &f["cases"][0];
    let (s, v) = server
        .call_service(
            "nightingale-icu-mortality-gbm",
            &patient_view(Some(icu_prefetch(true)), None),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let card = &v["cards"][0];
    let detail = card["detail"].as_str().unwrap().replace('\\', "");
    let p = number_after(&detail, "(p = ");
    let expected_p = case["onnxruntime_probability"].as_f64().unwrap();
    assert!(
        (p - expected_p).abs() < 1e-5,
        "{p} vs onnxruntime {expected_p}"
    );
    let base = number_after(&detail, "32 training rows: mean logit ");
    let expected_base = f["background_mean_logit"].as_f64().unwrap();
    assert!(
        (base - expected_base).abs() < 1e-4,
        "{base} vs {expected_base}"
    );
    assert!(
        detail.contains("KernelSHAP with every coalition of the inputs evaluated"),
        "{detail}"
    );
    assert!(!detail.contains("training mean"), "{detail}");
    let contributions = contribution_table(&detail);
    let expected = floats(&case["shapley_logit"]);
    assert_eq!(contributions.len(), expected.len());
    for (g, e) in contributions.iter().zip(&expected) {
        assert!((g - e).abs() < 1e-4, "{contributions:?} vs {expected:?}");
    }
    // They sum to logit(p) minus the background's mean logit.
    let sum: f64 = contributions.iter().sum();
    assert!((sum - (logit(p) - expected_base)).abs() < 1e-4, "{sum}");

    // The patient's inference and the attribution's forward passes (2^6 − 2 coalitions and
    // the background itself, over 32 rows) are both audited, by the CDS caller.
    let audit = server.audit();
    let inference = audit
        .iter()
        .find(|e| e["kind"] == "inference" && e["model"] == "icu-mortality-gbm")
        .expect("an inference record");
    assert_eq!(inference["rows"], 1);
    let explain = audit
        .iter()
        .find(|e| e["kind"] == "explain" && e["model"] == "icu-mortality-gbm")
        .expect("an explain record for the attribution");
    assert_eq!(explain["rows"], 32 * 63);
    assert_eq!(explain["outcome"], "ok", "{explain}");
    assert_eq!(explain["input_sha256"], inference["input_sha256"]);
    assert!(explain["actor"].as_str().unwrap().starts_with("cds:"));
}

#[tokio::test]
async fn missing_inputs_are_named_on_an_info_card_never_imputed() {
    let server = Server::with_bundles(
        vec![],
        Duration::from_secs(1),
        &["icu-mortality", "pima-diabetes"],
    );
    // No Condition search in the prefetch: infection is unknown, not 0.
    let (s, v) = server
        .call_service(
            "nightingale-icu-mortality",
            &patient_view(Some(icu_prefetch(false)), None),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let card = &v["cards"][0];
    assert_eq!(card["indicator"], "info");
    let summary = card["summary"].as_str().unwrap();
    assert!(summary.contains("not calculated"), "{summary}");
    assert!(summary.contains("infection"), "{summary}");
    assert!(!card["detail"].as_str().unwrap().contains("p = "));
    // Pima: the pedigree function has no FHIR source; it is always named missing.
    let (s, v) = server
        .call_service(
            "nightingale-pima-diabetes",
            &patient_view(Some(icu_prefetch(true)), None),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let card = &v["cards"][0];
    assert_eq!(card["indicator"], "info");
    let detail = card["detail"].as_str().unwrap().replace('\\', "");
    assert!(
        detail.contains("pedigree (no FHIR source declared by the model)"),
        "{detail}"
    );
    assert!(detail.contains("triceps skinfold"), "{detail}");
    // No inference was run for a missing card.
    assert!(!server.audit().iter().any(|e| e["kind"] == "inference"));
}

/// A risk service's searches left out by the EHR (and not fetched: no FHIR server to ask)
/// leave their features not known: the card said "no recent result" of the blood pressure
/// and heart rate, and "no current encounter", as if the searches had found nothing (a
/// review's finding). A search answered `null` (no data) still reads "no recent result".
#[tokio::test]
async fn a_risk_search_left_out_is_not_known_and_one_answered_null_is_no_result() {
    let server = Server::with_bundles(vec![], Duration::from_secs(1), &["icu-mortality"]);
    let mut prefetch = icu_prefetch(true);
    let map = prefetch.as_object_mut().unwrap();
    map.remove("observations");
    map.remove("encounters");
    let (s, v) = server
        .call_service(
            "nightingale-icu-mortality",
            &patient_view(Some(prefetch.clone()), None),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let card = &v["cards"][0];
    assert_eq!(card["indicator"], "info", "{card}");
    let detail = card["detail"].as_str().unwrap().replace('\\', "");
    assert!(!detail.contains("no recent result"), "{detail}");
    assert!(!detail.contains("no current encounter"), "{detail}");
    for name in ["systolic bp", "heart rate"] {
        let line = detail
            .lines()
            .find(|l| l.to_lowercase().contains(name))
            .unwrap_or_else(|| panic!("{name} in {detail}"));
        assert!(line.contains("was not answered"), "{line}");
    }
    assert!(
        detail.contains("encounters were not available (the search was not answered"),
        "{detail}"
    );
    // Answered `null`: the EHR has none of them.
    let map = prefetch.as_object_mut().unwrap();
    map.insert("observations".into(), Value::Null);
    map.insert("encounters".into(), Value::Null);
    let (s, v) = server
        .call_service(
            "nightingale-icu-mortality",
            &patient_view(Some(prefetch), None),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let detail = v["cards"][0]["detail"].as_str().unwrap().replace('\\', "");
    assert!(detail.contains("no recent result"), "{detail}");
    // The call names its encounter, which a search that found none does not hold.
    assert!(
        detail.contains("context.encounterId) was not among the encounters read"),
        "{detail}"
    );
    assert!(!detail.contains("was not answered"), "{detail}");
    assert!(!server.audit().iter().any(|e| e["kind"] == "inference"));
}

/// `--cds-trust ISSUER=URL`: the JWKS is fetched when a token names a key not yet known (keys
/// rotate), and a `jku` header is accepted only when it is that very URL.
#[tokio::test]
async fn a_jwks_url_is_fetched_again_when_keys_rotate_and_is_the_only_accepted_jku() {
    let dir = tempfile::tempdir().unwrap();
    let first = Ehr::new(dir.path());
    std::fs::create_dir(dir.path().join("rotated")).unwrap();
    let rotated = Ehr::keyed(&dir.path().join("rotated"), "ec-2");
    // The EHR's JWKS endpoint: what it serves can change; it counts its fetches.
    let served = Arc::new(std::sync::Mutex::new(std::fs::read(&first.jwks).unwrap()));
    let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get({
            let (served, fetches) = (served.clone(), fetches.clone());
            move || async move {
                fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                served.lock().unwrap().clone()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    std::fs::create_dir(dir.path().join("models")).unwrap();
    let repository = Arc::new(Repository::new(
        dir.path().join("models"),
        RepositoryOptions::default(),
    ));
    let audit = AuditLog::open(&dir.path().join("audit.jsonl"), false).unwrap();
    let state = AppState::new(repository, audit, HttpConfig::default(), None);
    let trust: TrustedIssuer = format!("{ISS}={url}").parse().unwrap();
    assert_eq!(trust.jwks, JwksSource::Url(url.clone()));
    let cds = Cds::new(
        &CdsSettings {
            trust: vec![trust],
            jwks_min_refetch: Duration::ZERO,
            ..CdsSettings::default()
        },
        &state.repository,
    )
    .unwrap();
    assert!(state.set_cds(cds));
    let server = Server {
        dir,
        state,
        ehr: first,
    };
    let body = patient_view(Some(json!({"patient": patient()})), None).to_string();
    let path = format!("/cds-services/{SERVICE}");
    let aud = format!("http://{HOST}{path}");
    let call = |token: String| {
        let req = server.post(&path, Some(&token), body.clone().into_bytes());
        server.send(req)
    };
    let count = || fetches.load(std::sync::atomic::Ordering::SeqCst);

    // Nothing fetched yet: the key is unknown, so the JWKS is fetched, then the token passes.
    let (s, v) = call(server.ehr.token(&aud)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(count(), 1);
    let (s, _) = call(server.ehr.token(&aud)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(count(), 1, "a known key needs no fetch");

    // The EHR rotates its key: the new kid prompts a fetch; the old key is gone with it.
    *served.lock().unwrap() = std::fs::read(&rotated.jwks).unwrap();
    let (s, v) = call(rotated.token(&aud)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(count(), 2);
    let (s, v) = call(server.ehr.token(&aud)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");

    // jku: the configured URL is accepted, any other refused before any key is looked at.
    let (s, v) = call(rotated.token_with_jku(&aud, Some(&url))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) =
        call(rotated.token_with_jku(&aud, Some("https://attacker.example/jwks.json"))).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(v["error"].as_str().unwrap().contains("jku"), "{v}");

    // A JWKS that turns bad keeps the keys it had.
    *served.lock().unwrap() =
        b"{\"keys\": [{\"kty\": \"oct\", \"k\": \"c2VjcmV0\", \"kid\": \"h\"}]}".to_vec();
    let fetched = server.state.cds().refresh_jwks().await;
    assert_eq!(fetched, 0);
    let (s, v) = call(rotated.token(&aud)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

/// Red-team finding: a CDS caller's subject was cleaned or shortened for the audit actor
/// without a digest, so two EHR clients ("A\nx" and "A?x", or two long ones differing at
/// their end) shared one actor. Changed subjects now carry a digest of the whole.
#[tokio::test]
async fn ehr_clients_whose_subjects_differ_never_share_an_audit_actor() {
    let server = Server::new(vec![], Duration::from_secs(5));
    let long = "B".repeat(300);
    for sub in ["A\nx", "A?x", &format!("{long}1"), &format!("{long}2")] {
        let token =
            server
                .ehr
                .token_of(&format!("http://{HOST}/cds-services/{SERVICE}"), None, sub);
        let (s, v) = server
            .send(server.post(
                &format!("/cds-services/{SERVICE}"),
                Some(&token),
                patient_view(None, None).to_string().into_bytes(),
            ))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let actors: Vec<String> = server
        .audit()
        .iter()
        .filter(|r| r["kind"] == "cds-hook")
        .map(|r| r["actor"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(actors.len(), 4, "{actors:?}");
    let distinct: std::collections::BTreeSet<&String> = actors.iter().collect();
    assert_eq!(distinct.len(), 4, "{actors:?}");
    assert!(actors.iter().all(|a| !a.contains('\n')), "{actors:?}");
}

/// Red-team finding: a device's preliminary SpO2 of 84 % five minutes after the final set
/// (94 %) was left out without a word. The score is still made of final results, and the
/// card says a newer reading is not yet final, with its time, in its summary and detail.
#[tokio::test]
async fn a_newer_reading_not_yet_final_is_named_on_the_card() {
    let server = Server::new(vec![], Duration::from_secs(1));
    let mut vitals = vitals_bundle();
    let mut preliminary = obs(8, "59408-5", qty(84.0, "%"));
    preliminary["status"] = json!("preliminary");
    preliminary["effectiveDateTime"] = json!(when(5));
    vitals["entry"]
        .as_array_mut()
        .unwrap()
        .push(json!({"resource": preliminary}));
    let (s, v) = server
        .call(&patient_view(
            Some(json!({"patient": patient(), "vitals": vitals})),
            None,
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let card = &v["cards"][0];
    let summary = card["summary"].as_str().unwrap();
    assert!(summary.starts_with("NEWS2 7 — high"), "{card}");
    assert!(summary.contains("newer readings not yet final"), "{card}");
    assert!(summary.chars().count() <= 140, "{summary}");
    let detail = card["detail"].as_str().unwrap();
    assert!(detail.contains("- SpO2: a reading at "), "{detail}");
}

/// Feedback the store cannot take (its database locked by another writer) is answered 503,
/// and the trail says so: the record of each item, written before the store was tried, is
/// followed by one saying it was not stored, and the override statistics do not move (a
/// review's finding: the trail held the item as taken, "ok", alone, and it was counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_the_store_cannot_take_is_503_and_recorded_as_not_stored() {
    let server = Server::new(vec![], Duration::from_secs(1));
    let request = patient_view(
        Some(json!({"patient": patient(), "vitals": vitals_bundle(), "conditions": null})),
        None,
    );
    let (s, v) = server.call(&request).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let card = v["cards"][0]["uuid"].as_str().unwrap().to_owned();
    let lock = rusqlite::Connection::open(server.dir.path().join("cds/feedback.sqlite3")).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let fb = json!({"feedback": [{"card": card, "outcome": "overridden",
        "overrideReason": {"reason": {"system": "http://example.org/reasons", "code": "known"}},
        "outcomeTimestamp": chrono::Utc::now().to_rfc3339()}]});
    let (s, v) = server.feedback(&fb).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    lock.execute_batch("ROLLBACK").unwrap();
    let records: Vec<Value> = server
        .audit()
        .into_iter()
        .filter(|r| r["kind"] == "cds-feedback" && r["request_id"] == card.as_str())
        .collect();
    assert_eq!(records.len(), 2, "{records:#?}");
    assert_eq!(records[0]["outcome"], "ok");
    assert_eq!(records[1]["outcome"], "failed");
    assert_eq!(records[1]["status"], 503);
    assert!(
        records[1]["detail"]
            .as_str()
            .unwrap()
            .ends_with("stored=false")
    );
    let stats = server.state.cds().stats.lock().unwrap().clone();
    assert_eq!(
        stats.override_rate(SERVICE, Some(("news2", "rcp-2017"))),
        None
    );
    // Sent again once the store can take it: stored, counted once.
    let (s, v) = server.feedback(&fb).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let stats = server.state.cds().stats.lock().unwrap().clone();
    assert_eq!(
        stats.override_rate(SERVICE, Some(("news2", "rcp-2017"))),
        Some(1.0)
    );
}

/// CDS Hooks 2.0: a prefetch key answered `null` means the EHR has no data for it (a search
/// that found nothing), while a key left out was not fetched. `null` Conditions are "none"
/// (they were read as not fetched: no risk score for a patient without Conditions); vitals
/// left out, with no FHIR server to ask, are not "no value recorded" of every parameter; a
/// template naming an optional context field the call lacks (encounterId) leaves its key
/// unread instead of failing the call with 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_prefetch_is_no_data_and_a_key_left_out_is_not_read() {
    let server = Server::new(vec![], Duration::from_secs(1));
    // Vitals left out, no fhirServer.
    let (s, v) = server
        .call(&patient_view(
            Some(json!({"patient": patient(), "conditions": null})),
            None,
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let detail = v["cards"][0]["detail"].as_str().unwrap();
    assert!(!detail.contains("no value recorded"), "{detail}");
    assert!(detail.contains("was not answered"), "{detail}");
    // Vitals `null`: the EHR has none: "no value recorded" is then what it says.
    let (s, v) = server
        .call(&patient_view(
            Some(json!({"patient": patient(), "vitals": null, "conditions": null})),
            None,
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let detail = v["cards"][0]["detail"].as_str().unwrap();
    assert!(detail.contains("no value recorded"), "{detail}");
    // Conditions `null`: none, so the score says nothing of Conditions not checked.
    let (s, v) = server
        .call(&patient_view(
            Some(json!({"patient": patient(), "vitals": vitals_bundle(), "conditions": null})),
            None,
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let detail = v["cards"][0]["detail"].as_str().unwrap();
    assert!(
        !detail.contains("conditions were not available"),
        "{detail}"
    );
    // Left out: not checked, and the card says so.
    let (s, v) = server
        .call(&patient_view(
            Some(json!({"patient": patient(), "vitals": vitals_bundle()})),
            None,
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let detail = v["cards"][0]["detail"].as_str().unwrap();
    assert!(detail.contains("conditions were not available"), "{detail}");
}
