//! Roles on every route, driven from the role table itself (`http::auth::ROUTES`): each route
//! is called without credentials, with a credential holding another role and with one
//! holding its role; JWTs signed by openssl (tests/fixtures/auth/make_fixtures.py) are
//! accepted or refused with their reason; TLS client certificates get their configured roles.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use nightingale::audit::AuditLog;
use nightingale::config::ServeArgs;
use nightingale::http::auth::{
    Access, AuthConfig, GRPC_METHODS, JwtConfig, ROUTES, Role, RouteRule,
};
use nightingale::http::identity::ClientCertificate;
use nightingale::http::{self, AppState, HttpConfig};
use nightingale_models::{Repository, RepositoryOptions};
use serde_json::{Value, json};
use tower::ServiceExt;

mod support;
use support::copy_dir;
#[path = "support/dicom.rs"]
mod dicom;

const MODEL: &str = "wdbc-malignancy";
const STUDY: &str = "1.2.826.0.1.3680043.10.1383.8.1";
const SERIES: &str = "1.2.826.0.1.3680043.10.1383.8.1.1";
const SOP: &str = "1.2.826.0.1.3680043.10.1383.8.1.1.1";

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/auth")
}

/// role → its test API key (plain text; nightingale.toml holds their SHA-256).
fn api_keys() -> HashMap<String, String> {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("api_keys.json")).unwrap())
        .unwrap()
}

fn key(role: Role) -> String {
    api_keys()[role.as_str()].clone()
}

/// name → {token, status, reason, roles}, as make_fixtures.py wrote them.
fn tokens() -> serde_json::Map<String, Value> {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokens.json")).unwrap()).unwrap()
}

fn token(name: &str) -> String {
    tokens()[name]["token"].as_str().unwrap().to_owned()
}

/// The fixture's `[auth]` (a key per role, JWT), read the way the server reads it.
fn fixture_auth() -> AuthConfig {
    ServeArgs {
        config: Some(fixtures().join("nightingale.toml")),
        ..ServeArgs::default()
    }
    .resolve()
    .unwrap()
    .auth
}

struct Server {
    _dir: tempfile::TempDir,
    _spool: tempfile::TempDir,
    state: Arc<AppState>,
}

impl Server {
    fn new(config: HttpConfig) -> Server {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(
            &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("models/bundles")
                .join(MODEL),
            &dir.path().join(MODEL),
        );
        let repository = Arc::new(Repository::new(dir.path(), RepositoryOptions::default()));
        repository.load_all().unwrap();
        let audit = AuditLog::open(&dir.path().join("audit.jsonl"), false).unwrap();
        let state = AppState::new(repository, audit, config, Some(http::install_recorder()));
        state.set_ready(true);
        // DICOMweb over a spool of its own, so that its routes answer 200 with their role.
        let spool_dir = tempfile::tempdir().unwrap();
        let (spool, _) = nightingale_dicom::Spool::open(
            spool_dir.path(),
            nightingale_dicom::SpoolOptions {
                min_free_bytes: 0,
                ..Default::default()
            },
        )
        .unwrap();
        state.set_dicomweb(http::dicomweb::DicomWeb::new(
            Arc::new(spool),
            http::dicomweb::DicomWebConfig::default(),
            Default::default(),
        ));
        // The pipeline's results, knowing STUDY, so that `/results/...` answers 200 too.
        let results =
            nightingale::pipeline::store::ResultsStore::open(&dir.path().join("results.sqlite3"))
                .unwrap();
        results.note_series(STUDY, SERIES, 1, 0).unwrap();
        // ... and one result object of it, so that WADO-RS retrieve answers 200.
        let job = results.add_job(STUDY, SERIES, "r", MODEL, 1, "").unwrap();
        std::fs::write(dir.path().join("result.dcm"), b"DICM").unwrap();
        results
            .add_object(&nightingale::pipeline::store::ResultObject {
                sop_instance_uid: SOP.into(),
                job_id: job,
                kind: "SR".into(),
                series_uid: SERIES.into(),
                sop_class_uid: "1.2.840.10008.5.1.4.1.1.88.33".into(),
                path: "result.dcm".into(),
                destination: String::new(),
                delivery: "local".into(),
                attempts: 0,
                next_attempt_ms: 0,
                last_error: None,
            })
            .unwrap();
        state.set_results(http::results::Results {
            store: Arc::new(std::sync::Mutex::new(results)),
            dir: dir.path().to_path_buf(),
        });
        // Validation runs over a root holding the model's test split.
        let root = dir.path().join("datasets");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::copy(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("models/bundles")
                .join(MODEL)
                .join("testdata/test.csv"),
            root.join("test.csv"),
        )
        .unwrap();
        state.set_validation(http::validation::Validation::new(
            Some(root),
            &dir.path().join("data"),
            1 << 20,
            RepositoryOptions::default(),
        ));
        Server {
            _dir: dir,
            _spool: spool_dir,
            state,
        }
    }

    fn with_auth(auth: AuthConfig) -> Server {
        Server::new(HttpConfig {
            auth,
            ..HttpConfig::default()
        })
    }

    async fn send(&self, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
        let req = if req.uri().path().contains(RUN_ID) {
            // a finished validation run of this server stands for {id}
            let id = self.finished_run().await;
            let (mut parts, body) = req.into_parts();
            parts.uri = parts.uri.path().replace(RUN_ID, &id).parse().unwrap();
            Request::from_parts(parts, body)
        } else {
            req
        };
        let res = http::app(self.state.clone()).oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
        (status, headers, body)
    }
}

impl Server {
    /// Starts a validation run (as the researcher) and waits, bounded, until it is done; on a
    /// server where the researcher role is disabled, a placeholder id.
    async fn finished_run(&self) -> String {
        let req = Request::post("/validation/runs")
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", key(Role::Researcher)),
            )
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(
                json!({"model": MODEL, "dataset": "test.csv", "bootstrap": 0}).to_string(),
            ))
            .unwrap();
        let res = http::app(self.state.clone()).oneshot(req).await.unwrap();
        if res.status() != StatusCode::ACCEPTED {
            // a server without a researcher key: any id (the route refuses before it looks)
            assert_eq!(res.status(), StatusCode::FORBIDDEN);
            return "00000000-0000-0000-0000-000000000000".to_owned();
        }
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let id = serde_json::from_slice::<Value>(&body).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let req = Request::get(format!("/validation/runs/{id}"))
                .header(
                    header::AUTHORIZATION,
                    format!("Bearer {}", key(Role::Researcher)),
                )
                .body(Body::empty())
                .unwrap();
            let res = http::app(self.state.clone()).oneshot(req).await.unwrap();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            let v: Value = serde_json::from_slice(&body).unwrap();
            if v["status"] == "done" {
                return id;
            }
            assert_eq!(v["status"], "running", "{v}");
            assert!(
                std::time::Instant::now() < deadline,
                "validation run not done: {v}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// Stands for a finished validation run's id in a path (see `Server::send`).
const RUN_ID: &str = "RUN_ID";

/// The status a request with the right credentials gets: 200, 202 where the route starts
/// work (a validation run), 409 for cancelling the finished run.
fn success_of(rule: &RouteRule) -> StatusCode {
    match (rule.method, rule.path) {
        ("POST", "/validation/runs") => StatusCode::ACCEPTED,
        // The run in the path has finished: past the role check, the handler refuses to
        // cancel it.
        ("DELETE", "/validation/runs/{id}") => StatusCode::CONFLICT,
        _ => StatusCode::OK,
    }
}

/// A request for a row of the table: path parameters filled with the served model and
/// version 1, a valid body where the route takes one. A route added to the table gets one
/// here, or this test fails.
fn example(rule: &RouteRule, credential: Credential<'_>) -> Request<Body> {
    let path = rule
        .path
        .replace("{model}", MODEL)
        .replace("{version}", "1")
        .replace("{study}", STUDY)
        .replace("{series}", SERIES)
        .replace("{sop}", SOP);
    let path = if path.starts_with("/validation/runs/") {
        path.replace("{id}", RUN_ID)
    } else {
        path.replace("{id}", "nightingale-news2")
    };
    let method = Method::from_bytes(rule.method.as_bytes()).unwrap();
    let mut req = Request::builder().method(method).uri(path);
    match credential {
        Credential::None => {}
        Credential::Bearer(k) => req = req.header(header::AUTHORIZATION, format!("Bearer {k}")),
        Credential::ApiKeyHeader(k) => req = req.header("X-API-Key", k),
    }
    if rule.method == "POST" && rule.path.starts_with("/dicomweb/studies") {
        // STOW-RS: one instance of STUDY (stored again each time: a duplicate, 200).
        let file = dicom::part10(STUDY, SERIES, "1.2.826.0.1.3680043.10.1383.8.1.1.1", 1);
        return req
            .header(header::CONTENT_TYPE, dicom::content_type())
            .body(Body::from(dicom::multipart(&[(
                "application/dicom",
                &file,
            )])))
            .unwrap();
    }
    if rule.method == "POST" && rule.path == "/validation/runs" {
        return req
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(
                json!({"model": MODEL, "dataset": "test.csv", "bootstrap": 0}).to_string(),
            ))
            .unwrap();
    }
    let body = if rule.path.ends_with("/infer") {
        let row: Vec<f32> = vec![1.0; 30];
        json!({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": row}]})
            .to_string()
    } else if rule.path.ends_with("/explain") {
        let row: Vec<f32> = vec![1.0; 30];
        json!({"parameters": {"method": "kernel_shap", "samples": 64},
               "inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": row}]})
        .to_string()
    } else if rule.method == "POST" {
        "{}".to_owned()
    } else {
        String::new()
    };
    req.body(Body::from(body)).unwrap()
}

#[derive(Clone, Copy)]
enum Credential<'a> {
    None,
    Bearer(&'a str),
    ApiKeyHeader(&'a str),
}

fn error_of(v: &Value) -> &str {
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {v}"))
}

#[tokio::test]
async fn every_route_without_credentials_with_a_wrong_role_and_with_its_role() {
    let keys = api_keys();
    for rule in ROUTES {
        let what = format!("{} {}", rule.method, rule.path);
        let server = Server::with_auth(fixture_auth());
        match rule.access {
            Access::CdsHooks => {
                // Only a trusted EHR's JWT opens it (tests/cds.rs): no credentials, any API
                // key, a JWT of this server's own [auth.jwt] issuer: 401.
                let (s, _, v) = server.send(example(rule, Credential::None)).await;
                assert_eq!(s, StatusCode::UNAUTHORIZED, "{what}: {v}");
                for role in Role::ALL {
                    let (s, _, v) = server
                        .send(example(rule, Credential::Bearer(&keys[role.as_str()])))
                        .await;
                    assert_eq!(s, StatusCode::UNAUTHORIZED, "{what} as {role}: {v}");
                    assert!(error_of(&v).contains("trusted EHR"), "{what}: {v}");
                }
            }
            Access::Public => {
                let (s, _, v) = server.send(example(rule, Credential::None)).await;
                assert_eq!(s, StatusCode::OK, "{what}: {v}");
                // Credentials do not matter there, not even wrong ones (probes carry none).
                let (s, _, v) = server
                    .send(example(rule, Credential::Bearer("not-a-key")))
                    .await;
                assert_eq!(s, StatusCode::OK, "{what}: {v}");
            }
            Access::Role(_) | Access::AnyOf(_) => {
                let roles = rule.access.roles();
                let needs = match roles {
                    [role] => format!("the {role} role"),
                    _ => format!(
                        "one of the roles {}",
                        roles
                            .iter()
                            .map(|r| r.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                let (s, h, v) = server.send(example(rule, Credential::None)).await;
                assert_eq!(s, StatusCode::UNAUTHORIZED, "{what}: {v}");
                assert!(
                    h[header::WWW_AUTHENTICATE]
                        .to_str()
                        .unwrap()
                        .starts_with("Bearer"),
                    "{what}"
                );
                assert!(
                    error_of(&v).contains(&format!("needs {needs}")),
                    "{what}: {v}"
                );
                for other in Role::ALL.into_iter().filter(|r| !roles.contains(r)) {
                    let (s, _, v) = server
                        .send(example(rule, Credential::Bearer(&keys[other.as_str()])))
                        .await;
                    assert_eq!(s, StatusCode::FORBIDDEN, "{what} as {other}: {v}");
                    assert_eq!(
                        error_of(&v),
                        format!("api-key:{other}-client does not hold {needs} this endpoint needs"),
                        "{what}"
                    );
                }
                for role in roles {
                    let server = Server::with_auth(fixture_auth());
                    let (s, _, v) = server
                        .send(example(rule, Credential::Bearer(&keys[role.as_str()])))
                        .await;
                    assert_eq!(s, success_of(rule), "{what} as {role}: {v}");
                    // The same key in X-API-Key (a fresh server: load/unload change state).
                    let server = Server::with_auth(fixture_auth());
                    let (s, _, v) = server
                        .send(example(
                            rule,
                            Credential::ApiKeyHeader(&keys[role.as_str()]),
                        ))
                        .await;
                    assert_eq!(s, success_of(rule), "{what} as {role} (X-API-Key): {v}");
                }
            }
        }
    }
}

/// The stable interface: on loopback with no keys configured, infer, metrics and pacs are
/// open and admin and researcher closed (403, saying how to open them).
#[tokio::test]
async fn zero_config_opens_infer_metrics_pacs_and_closes_admin_and_researcher() {
    for rule in ROUTES {
        let what = format!("{} {}", rule.method, rule.path);
        let server = Server::new(HttpConfig::default());
        let (s, _, v) = server.send(example(rule, Credential::None)).await;
        match rule.access {
            // QIDO-RS: pacs (open) or admin or researcher.
            Access::Public
            | Access::Role(Role::Infer)
            | Access::Role(Role::Metrics)
            | Access::Role(Role::Pacs)
            | Access::AnyOf(_) => assert_eq!(s, StatusCode::OK, "{what}: {v}"),
            // No --cds-trust: every CDS call is 401.
            Access::CdsHooks => assert_eq!(s, StatusCode::UNAUTHORIZED, "{what}: {v}"),
            Access::Role(role @ (Role::Admin | Role::Researcher)) => {
                assert_eq!(s, StatusCode::FORBIDDEN, "{what}: {v}");
                assert!(
                    error_of(&v).starts_with(&format!("{role} is disabled: configure a key")),
                    "{what}: {v}"
                );
            }
        }
    }
    // --admin-token alone opens admin to its holder and leaves the open roles open.
    let server = Server::new(HttpConfig {
        admin_token: Some("legacy-admin-token-0123456789".into()),
        ..HttpConfig::default()
    });
    let unload = ROUTES.iter().find(|r| r.path.ends_with("/unload")).unwrap();
    let (s, _, v) = server.send(example(unload, Credential::None)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert!(error_of(&v).contains("token"), "{v}");
    let (s, _, v) = server
        .send(example(
            unload,
            Credential::Bearer("legacy-admin-token-0123456789"),
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let infer = ROUTES
        .iter()
        .find(|r| r.path == "/v2/models/{model}/ready")
        .unwrap();
    // Unloaded just now: 503, not 401 (no credential was needed, and the admin token's
    // holder may call what anyone may).
    let (s, _, v) = server.send(example(infer, Credential::None)).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    let (s, _, v) = server
        .send(example(
            infer,
            Credential::Bearer("legacy-admin-token-0123456789"),
        ))
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
}

/// Red-team finding: on the default loopback server a web page that rebinds its own name to
/// 127.0.0.1 reached the open `pacs` role from the browser on this machine (it listed,
/// retrieved and stored studies). An anonymous request must name a loopback Host there; a
/// credential, a public route or a server listening on the network is not held to it.
#[tokio::test]
async fn an_anonymous_request_under_a_foreign_host_name_is_refused_on_a_loopback_server() {
    let with_host = |path: &str, host: &str, bearer: Option<&str>| {
        let mut req = get(path, bearer);
        req.headers_mut()
            .insert(header::HOST, host.parse().unwrap());
        req
    };
    let server = Server::new(HttpConfig {
        admin_token: Some("legacy-admin-token-0123456789".into()),
        auth: AuthConfig {
            loopback_listener: true,
            ..AuthConfig::default()
        },
        ..HttpConfig::default()
    });
    for (path, host, bearer, status) in [
        (
            "/dicomweb/studies",
            "rebind.attacker.example:8000",
            None,
            StatusCode::FORBIDDEN,
        ),
        ("/dicomweb/studies", "localhost:8000", None, StatusCode::OK),
        ("/dicomweb/studies", "127.0.0.1:8000", None, StatusCode::OK),
        ("/dicomweb/studies", "[::1]:8000", None, StatusCode::OK),
        ("/dicomweb/studies", "LOCALHOST", None, StatusCode::OK),
        (
            "/dicomweb/studies",
            "127.0.0.1.attacker.example",
            None,
            StatusCode::FORBIDDEN,
        ),
        // Not a Host naming this machine (a re-attack's findings).
        (
            "/dicomweb/studies",
            "[::1]evil.example",
            None,
            StatusCode::FORBIDDEN,
        ),
        (
            "/dicomweb/studies",
            "[::1]:evil",
            None,
            StatusCode::FORBIDDEN,
        ),
        (
            "/dicomweb/studies",
            "localhost:abc",
            None,
            StatusCode::FORBIDDEN,
        ),
        (
            "/dicomweb/studies",
            "localhost:",
            None,
            StatusCode::FORBIDDEN,
        ),
        (
            &format!("/v2/models/{MODEL}/ready"),
            "evil.example",
            None,
            StatusCode::FORBIDDEN,
        ),
        ("/metrics", "evil.example", None, StatusCode::FORBIDDEN),
        // Public routes (health) answer anyone.
        ("/v2/health/ready", "evil.example", None, StatusCode::OK),
        // A credential is not a browser's ambient authority.
        (
            "/dicomweb/studies",
            "ehr-proxy.example",
            Some("legacy-admin-token-0123456789"),
            StatusCode::OK,
        ),
    ] {
        let (s, _, v) = server.send(with_host(path, host, bearer)).await;
        assert_eq!(s, status, "{path} Host {host}: {v}");
        if s == StatusCode::FORBIDDEN {
            assert!(error_of(&v).contains("DNS rebinding"), "{v}");
        }
    }
    // A request without a Host (HTTP/1.0) is not refused for it.
    let (s, _, v) = server.send(get("/dicomweb/studies", None)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Two Host fields: neither is taken as this machine's name.
    let mut twice = with_host("/dicomweb/studies", "localhost", None);
    twice
        .headers_mut()
        .append(header::HOST, "evil.example".parse().unwrap());
    let (s, _, v) = server.send(twice).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    // An absolute target naming another host than a loopback Host (HTTP/2's :authority).
    let other = Request::get("http://evil.example/dicomweb/studies")
        .header(header::HOST, "localhost")
        .body(Body::empty())
        .unwrap();
    let (s, _, v) = server.send(other).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    // A server listening on the network (with --insecure) is called by its network name.
    let open = Server::new(HttpConfig::default());
    let (s, _, v) = open
        .send(with_host(
            "/dicomweb/studies",
            "pacs-gateway.example:8000",
            None,
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

/// A review's finding: a web page of another origin, open in a browser on this machine,
/// ran inferences and explanations on the default loopback server through simple
/// `text/plain` POSTs (it cannot read the answers; the server ran them). An anonymous request
/// that a browser marks as coming from another origin is refused; one from the server's own
/// origin, one typed into the address bar, a client that is not a browser, or a caller with a
/// credential is not.
#[tokio::test]
async fn an_anonymous_request_from_a_web_page_of_another_origin_is_refused() {
    let server = Server::new(HttpConfig {
        admin_token: Some("legacy-admin-token-0123456789".into()),
        auth: AuthConfig {
            loopback_listener: true,
            ..AuthConfig::default()
        },
        ..HttpConfig::default()
    });
    let body = r#"{"inputs":[{"name":"features","datatype":"FP32","shape":[1,30],"data":[0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5]}]}"#;
    let infer = |headers: &[(&str, &str)]| {
        let mut req = Request::post(format!("/v2/models/{MODEL}/infer"))
            .header(header::HOST, "127.0.0.1:8000")
            .header(header::CONTENT_TYPE, "text/plain");
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.body(Body::from(body)).unwrap()
    };
    for (headers, status) in [
        (
            &[
                ("origin", "http://evil.example"),
                ("sec-fetch-site", "cross-site"),
            ][..],
            StatusCode::FORBIDDEN,
        ),
        (
            &[("origin", "http://evil.example")][..],
            StatusCode::FORBIDDEN,
        ),
        (&[("origin", "null")][..], StatusCode::FORBIDDEN),
        (
            &[("sec-fetch-site", "same-site")][..],
            StatusCode::FORBIDDEN,
        ),
        // Another port of this machine is another origin.
        (
            &[("origin", "http://127.0.0.1:3000")][..],
            StatusCode::FORBIDDEN,
        ),
        (
            &[
                ("origin", "http://127.0.0.1:8000"),
                ("sec-fetch-site", "same-origin"),
            ][..],
            StatusCode::OK,
        ),
        (&[("sec-fetch-site", "none")][..], StatusCode::OK),
        (&[][..], StatusCode::OK),
        (
            &[
                ("origin", "http://evil.example"),
                ("authorization", "Bearer legacy-admin-token-0123456789"),
            ][..],
            StatusCode::OK,
        ),
    ] {
        let (s, _, v) = server.send(infer(headers)).await;
        assert_eq!(s, status, "{headers:?}: {v}");
        if s == StatusCode::FORBIDDEN {
            assert!(error_of(&v).contains("another origin"), "{v}");
        }
    }
}

fn get(path: &str, bearer: Option<&str>) -> Request<Body> {
    let mut req = Request::get(path);
    if let Some(b) = bearer {
        req = req.header(header::AUTHORIZATION, format!("Bearer {b}"));
    }
    req.body(Body::empty()).unwrap()
}

#[tokio::test]
async fn jwts_signed_by_openssl_are_accepted_or_refused_with_their_reason() {
    let server = Server::with_auth(fixture_auth());
    let all = tokens();
    assert!(all.len() >= 20, "{}", all.len());
    for (name, t) in &all {
        let tok = t["token"].as_str().unwrap();
        match t["status"].as_u64().unwrap() {
            401 => {
                let (s, h, v) = server.send(get("/v2", Some(tok))).await;
                assert_eq!(s, StatusCode::UNAUTHORIZED, "{name}: {v}");
                assert_eq!(
                    h[header::WWW_AUTHENTICATE],
                    "Bearer realm=\"nightingale\", error=\"invalid_token\"",
                    "{name}"
                );
                let reason = t["reason"].as_str().unwrap();
                assert!(
                    error_of(&v).starts_with("invalid token: ") && error_of(&v).contains(reason),
                    "{name}: expected {reason:?} in {v}"
                );
                // The message never repeats the token.
                assert!(!v.to_string().contains(tok.split('.').nth(1).unwrap()));
            }
            200 => {
                let roles: Vec<&str> = t["roles"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap())
                    .collect();
                // The scope token carries its roles in `scope`, read only when configured.
                let roles = if name == "rs256_scope" { vec![] } else { roles };
                for (path, role) in [("/v2", "infer"), ("/metrics", "metrics")] {
                    let (s, _, v) = server.send(get(path, Some(tok))).await;
                    if roles.contains(&role) {
                        assert_eq!(s, StatusCode::OK, "{name} on {path}: {v}");
                    } else {
                        assert_eq!(s, StatusCode::FORBIDDEN, "{name} on {path}: {v}");
                        assert!(
                            error_of(&v)
                                .starts_with("jwt:https://idp.test.invalid/realms/nightingale#"),
                            "{v}"
                        );
                    }
                }
            }
            other => panic!("{name}: status {other}"),
        }
    }
    // The admin token's caller may unload; its id names the issuer and subject.
    let unload = format!("/v2/repository/models/{MODEL}/unload");
    let req = Request::post(&unload)
        .header(
            header::AUTHORIZATION,
            format!("Bearer {}", token("rs256_admin")),
        )
        .body(Body::empty())
        .unwrap();
    let (s, _, v) = server.send(req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let req = Request::post(&unload)
        .header(
            header::AUTHORIZATION,
            format!("Bearer {}", token("ps256_infer")),
        )
        .body(Body::empty())
        .unwrap();
    let (s, _, v) = server.send(req).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(
        error_of(&v),
        "jwt:https://idp.test.invalid/realms/nightingale#bob does not hold the admin role this endpoint needs"
    );
}

#[tokio::test]
async fn roles_from_a_space_separated_scope_claim() {
    let mut auth = fixture_auth();
    let jwt = auth.jwt.as_ref().unwrap();
    auth.jwt = Some(Arc::new(
        JwtConfig::new(
            jwt.issuer.clone(),
            jwt.audience.clone(),
            jwt.jwks_file.clone(),
            "scope".into(),
            jwt.leeway_secs,
        )
        .unwrap(),
    ));
    let server = Server::with_auth(auth);
    let (s, _, v) = server.send(get("/v2", Some(&token("rs256_scope")))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // `roles` is not read any more.
    let (s, _, v) = server.send(get("/v2", Some(&token("rs256_infer")))).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
}

#[tokio::test]
async fn a_verified_client_certificate_gets_its_configured_roles() {
    let server = Server::with_auth(fixture_auth());
    let cert = ClientCertificate {
        subject: "CN=pacs-gateway,O=Hospital".into(),
        sha256: "00".repeat(32),
        chain: std::sync::Arc::from(vec![]),
        not_after: std::sync::Arc::new(std::sync::atomic::AtomicI64::new(i64::MAX)),
        checked: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(
            nightingale::tls::client_ca_generation(),
        )),
    };
    let with_cert = |path: &str, method: Method| {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .unwrap();
        req.extensions_mut().insert(cert.clone());
        req
    };
    let (s, _, v) = server.send(with_cert("/v2", Method::GET)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // A browser sends its client certificate by itself: a request of a page of another
    // origin is refused even with one (a re-attack's finding); with an API key beside it, or
    // from no page, it is answered.
    let mut cross = with_cert("/v2", Method::GET);
    cross
        .headers_mut()
        .insert("sec-fetch-site", "cross-site".parse().unwrap());
    let (s, _, v) = server.send(cross).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(error_of(&v).contains("another origin"), "{v}");
    let mut keyed = with_cert("/v2", Method::GET);
    keyed
        .headers_mut()
        .insert("sec-fetch-site", "cross-site".parse().unwrap());
    keyed.headers_mut().insert(
        header::AUTHORIZATION,
        format!("Bearer {}", key(Role::Infer)).parse().unwrap(),
    );
    let (s, _, v) = server.send(keyed).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _, v) = server.send(with_cert("/metrics", Method::GET)).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(
        error_of(&v),
        "tls:CN=pacs-gateway,O=Hospital does not hold the metrics role this endpoint needs"
    );
    let (s, _, v) = server
        .send(with_cert(
            &format!("/v2/repository/models/{MODEL}/unload"),
            Method::POST,
        ))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    // A key sent beside the certificate speaks for the caller.
    let mut req = with_cert("/metrics", Method::GET);
    req.headers_mut().insert(
        header::AUTHORIZATION,
        format!("Bearer {}", key(Role::Metrics)).parse().unwrap(),
    );
    let (s, _, v) = server.send(req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Configured roles replace the default ones.
    let mut auth = fixture_auth();
    auth.client_certificate_roles = [Role::Metrics].into();
    let server = Server::with_auth(auth);
    let (s, _, _) = server.send(with_cert("/metrics", Method::GET)).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = server.send(with_cert("/v2", Method::GET)).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn anonymous_roles_open_what_the_file_says_once_credentials_exist() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("nightingale.toml");
    let text = std::fs::read_to_string(fixtures().join("nightingale.toml")).unwrap();
    std::fs::copy(fixtures().join("jwks.json"), dir.path().join("jwks.json")).unwrap();
    std::fs::write(
        &config,
        text.replace(
            "[auth.jwt]",
            "[auth]\nanonymous_roles = [\"metrics\"]\n\n[auth.jwt]",
        ),
    )
    .unwrap();
    let auth = ServeArgs {
        config: Some(config),
        ..ServeArgs::default()
    }
    .resolve()
    .unwrap()
    .auth;
    let server = Server::with_auth(auth);
    let (s, _, v) = server.send(get("/metrics", None)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _, v) = server.send(get("/v2", None)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    // An identified caller holds what is open to everyone, besides its own roles.
    let (s, _, v) = server.send(get("/metrics", Some(&key(Role::Infer)))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _, v) = server.send(get("/v2", Some(&key(Role::Pacs)))).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
}

#[tokio::test]
async fn bad_credentials_are_refused_with_a_helpful_reason() {
    let server = Server::with_auth(fixture_auth());
    let req = Request::get("/v2")
        .header(header::AUTHORIZATION, "Basic dXNlcjpwYXNz")
        .body(Body::empty())
        .unwrap();
    let (s, _, v) = server.send(req).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(
        error_of(&v),
        "the Authorization header must be \"Bearer <API key or token>\""
    );
    let (s, _, v) = server
        .send(get("/v2", Some("test-infer-key-but-wrong")))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(error_of(&v), "invalid API key or token");
    // A JWT where none is configured says so.
    let keys_only = Server::with_auth(AuthConfig {
        jwt: None,
        ..fixture_auth()
    });
    let (s, _, v) = keys_only
        .send(get("/v2", Some(&token("rs256_infer"))))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(error_of(&v).contains("[auth.jwt] is not configured"), "{v}");
    // Routing answers stay as they were: unknown path 404, wrong method 405, unknown model
    // 404 (with the right role).
    let (s, _, _) = server.send(get("/v2/nothing/here", None)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, v) = server
        .send(get(&format!("/v2/models/{MODEL}/infer"), None))
        .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{v}");
    let (s, _, v) = server
        .send(get("/v2/models/nope", Some(&key(Role::Infer))))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
}

/// docs/security.md shows the role table: every row, with its role, is there.
#[test]
fn the_documented_role_table_matches_the_code() {
    let doc =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/security.md"))
            .unwrap();
    for rule in ROUTES {
        let access = match rule.access {
            Access::Public => "public".to_owned(),
            Access::CdsHooks => "a trusted EHR's JWT (`--cds-trust`)".to_owned(),
            Access::Role(r) => format!("`{r}`"),
            Access::AnyOf(roles) => roles
                .iter()
                .map(|r| format!("`{r}`"))
                .collect::<Vec<_>>()
                .join(" or "),
        };
        let row = format!("| `{} {}` | {access} |", rule.method, rule.path);
        assert!(doc.contains(&row), "docs/security.md lacks the row {row}");
    }
    for rule in GRPC_METHODS {
        let access = match rule.access {
            Access::Public => "public".to_owned(),
            Access::Role(r) => format!("`{r}`"),
            other => panic!("gRPC method {} has access {other:?}", rule.method),
        };
        let row = format!("| `gRPC {}` | {access} |", rule.method);
        assert!(doc.contains(&row), "docs/security.md lacks the row {row}");
    }
}

/// Red-team finding: inference and explanation records carried no actor, so the trail could
/// not say which key or user ran a model on patient data. Now every model request's record
/// names its caller (never the credential itself), as model control's records do.
#[tokio::test]
async fn a_model_request_is_audited_with_its_caller() {
    let server = Server::with_auth(fixture_auth());
    let infer_key = key(Role::Infer);
    let row: Vec<f32> = vec![1.0; 30];
    let req = Request::post(format!("/v2/models/{MODEL}/infer"))
        .header(header::AUTHORIZATION, format!("Bearer {infer_key}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": row}]})
                .to_string(),
        ))
        .unwrap();
    let (s, _, v) = server.send(req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let trail = std::fs::read_to_string(server._dir.path().join("audit.jsonl")).unwrap();
    let record: Value = trail
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .rfind(|r| r["kind"] == "inference")
        .expect("an inference record");
    let actor = record["actor"].as_str().expect("an actor");
    assert!(actor.starts_with("api-key:"), "{record}");
    assert!(
        !trail.contains(&infer_key),
        "the key itself is in the trail"
    );
}

/// A review's observation: refused attempts at model control (load, unload) were only
/// logged. Each is audited (`access-refused`): the path, the status, the caller with a key
/// but not the role, or `unauthenticated`; the key itself is not in the trail.
#[tokio::test]
async fn refused_model_control_is_audited() {
    let server = Server::with_auth(fixture_auth());
    let infer_key = key(Role::Infer);
    let load = format!("/v2/repository/models/{MODEL}/load");
    for (i, authorization_want) in [
        (None, StatusCode::UNAUTHORIZED),
        (Some(format!("Bearer {infer_key}")), StatusCode::FORBIDDEN),
        (
            Some("Bearer not-a-key".to_owned()),
            StatusCode::UNAUTHORIZED,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let (authorization, want) = authorization_want;
        // Each record carries the request's id, as the log and the response do (it was
        // "-": a review's finding).
        let mut req = Request::post(&load).header("x-request-id", format!("refused-{i}"));
        if let Some(a) = &authorization {
            req = req.header(header::AUTHORIZATION, a);
        }
        let (s, _, v) = server.send(req.body(Body::empty()).unwrap()).await;
        assert_eq!(s, want, "{v}");
    }
    // Records are written on the audit writer's thread: wait for them (bounded).
    let path = server._dir.path().join("audit.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let refused = loop {
        let trail = std::fs::read_to_string(&path).unwrap_or_default();
        let refused: Vec<Value> = trail
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|r| r["kind"] == "access-refused")
            .collect();
        if refused.len() >= 3 || std::time::Instant::now() > deadline {
            assert!(
                !trail.contains(&infer_key),
                "the key itself is in the trail"
            );
            break refused;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let seen: Vec<(u64, String)> = refused
        .iter()
        .map(|r| {
            (
                r["status"].as_u64().unwrap(),
                r["actor"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(seen.len(), 3, "{refused:?}");
    assert_eq!(seen[0], (401, "unauthenticated".to_owned()));
    assert_eq!(seen[1].0, 403);
    assert!(seen[1].1.starts_with("api-key:"), "{seen:?}");
    assert_eq!(seen[2], (401, "unauthenticated".to_owned()));
    let ids: Vec<&str> = refused
        .iter()
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["refused-0", "refused-1", "refused-2"]);
    assert!(refused.iter().all(|r| {
        r["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("path={load}"))
    }));
}
