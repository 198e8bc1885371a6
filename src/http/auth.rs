//! Roles and credentials: who may call which route.
//!
//! Every route of the router is declared once, in [`ROUTES`], with the role it needs (or as
//! public, for the health probes). The router is built through [`Routes`], which refuses a
//! route that has no row there (and a row whose route is gone), and [`enforce`] checks each
//! request against that table, keyed on axum's [`MatchedPath`]: a route without a row is
//! refused at run time, never silently open.
//!
//! A caller proves who they are with one of:
//! - an API key, `Authorization: Bearer <key>` or `X-API-Key: <key>`, configured by its SHA-256
//!   in `[[auth.api_keys]]` (`--admin-token` is a shorthand for one admin key);
//! - an OIDC/JWT bearer token signed by a key of the configured JWKS file (`[auth.jwt]`),
//!   asymmetric algorithms only, `iss`, `aud` and `exp` checked, roles from a claim;
//! - a TLS client certificate the TLS layer verified ([`ClientCertificate`]), which gets the
//!   roles of `auth.client_certificate_roles`.
//!
//! Anyone else is anonymous, with the roles [`AuthConfig::anonymous_roles`] resolves to.
//! The authenticated [`Caller`] goes into the request's extensions: handlers take it as
//! `Extension<Caller>` (its `id` is the actor of audit events).

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::identity::ClientCertificate;
use super::{AppError, AppState};

/// The log lines of refusals anyone can cause at will, without credentials (a CDS token,
/// credentials refused or missing, a cross-site or rebinding request), each at most one a
/// second ([`crate::log_limit`]): a client sending bad tokens in a loop wrote 3 MB of log
/// lines in 15 s (a review's finding). The audit trail and the metrics count every one.
static STRANGER_LOGS: [crate::log_limit::LogLimit; 5] =
    [const { crate::log_limit::LogLimit::new() }; 5];

/// What a caller may do. Each route needs one role (or none, see [`Access::Public`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Inference, model metadata, readiness and statistics, server metadata, the repository
    /// index.
    Infer,
    /// Changing what is served: model load and unload (and, as they land, signing and
    /// configuration).
    Admin,
    /// Validation runs; listing what DICOM ingest received (QIDO-RS).
    Researcher,
    /// DICOMweb (STOW-RS, QIDO-RS) and DICOM ingest.
    Pacs,
    /// The Prometheus scrape endpoint.
    Metrics,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Infer,
        Role::Admin,
        Role::Researcher,
        Role::Pacs,
        Role::Metrics,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Infer => "infer",
            Role::Admin => "admin",
            Role::Researcher => "researcher",
            Role::Pacs => "pacs",
            Role::Metrics => "metrics",
        }
    }

    fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == name)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of roles.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Roles(u8);

impl Roles {
    pub const NONE: Roles = Roles(0);

    pub fn contains(self, role: Role) -> bool {
        self.0 & role.bit() != 0
    }

    pub fn insert(&mut self, role: Role) {
        self.0 |= role.bit();
    }

    pub fn union(self, other: Roles) -> Roles {
        Roles(self.0 | other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Role> {
        Role::ALL.into_iter().filter(move |r| self.contains(*r))
    }

    /// Whether every role here is `admin` (or there is none).
    fn only_admin(self) -> bool {
        self.iter().all(|r| r == Role::Admin)
    }
}

impl FromIterator<Role> for Roles {
    fn from_iter<I: IntoIterator<Item = Role>>(iter: I) -> Self {
        let mut roles = Roles::NONE;
        for r in iter {
            roles.insert(r);
        }
        roles
    }
}

impl<const N: usize> From<[Role; N]> for Roles {
    fn from(roles: [Role; N]) -> Self {
        roles.into_iter().collect()
    }
}

impl fmt::Debug for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.iter().map(Role::as_str))
            .finish()
    }
}

impl fmt::Display for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self.iter().map(Role::as_str).collect();
        f.write_str(&names.join(", "))
    }
}

/// Who is calling, as the auth middleware established it; in every routed request's
/// extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// A stable, non-secret identifier: `api-key:<name>`, `admin-token`, `jwt:<iss>#<sub>`,
    /// `tls:<subject>` or `anonymous`. The actor of audit events.
    pub id: String,
    pub roles: Roles,
}

impl Caller {
    pub const ANONYMOUS: &'static str = "anonymous";

    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(role)
    }

    pub fn is_anonymous(&self) -> bool {
        self.id == Self::ANONYMOUS
    }

    fn anonymous(roles: Roles) -> Caller {
        Caller {
            id: Self::ANONYMOUS.to_owned(),
            roles,
        }
    }
}

/// What a route needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone, with or without credentials (the health probes).
    Public,
    /// Callers holding this role.
    Role(Role),
    /// Callers holding any of these roles (QIDO-RS: `pacs`, `admin` or `researcher`).
    AnyOf(&'static [Role]),
    /// An EHR calling a CDS Hooks service: a JWT signed by a trusted issuer, for this
    /// service's URL (`aud`), checked by `decision-support`'s rules (no role: API keys and
    /// the other credentials do not open it).
    CdsHooks,
}

impl Access {
    /// The roles that open the route (none for a public one).
    pub fn roles(self) -> &'static [Role] {
        match self {
            Access::Public => &[],
            Access::Role(Role::Infer) => &[Role::Infer],
            Access::Role(Role::Admin) => &[Role::Admin],
            Access::Role(Role::Researcher) => &[Role::Researcher],
            Access::Role(Role::Pacs) => &[Role::Pacs],
            Access::Role(Role::Metrics) => &[Role::Metrics],
            Access::AnyOf(roles) => roles,
            Access::CdsHooks => &[],
        }
    }
}

/// One row of the route table.
#[derive(Clone, Copy, Debug)]
pub struct RouteRule {
    pub method: &'static str,
    /// The route as the router declares it (axum's [`MatchedPath`]).
    pub path: &'static str,
    pub access: Access,
}

const fn rule(method: &'static str, path: &'static str, access: Access) -> RouteRule {
    RouteRule {
        method,
        path,
        access,
    }
}

const PUBLIC: Access = Access::Public;
const INFER: Access = Access::Role(Role::Infer);
const ADMIN: Access = Access::Role(Role::Admin);
const METRICS: Access = Access::Role(Role::Metrics);
// ---- DICOMweb (issue 8, STOW-RS/QIDO-RS) ----
const PACS: Access = Access::Role(Role::Pacs);
/// Validation runs: researchers.
const RESEARCHER: Access = Access::Role(Role::Researcher);
/// QIDO-RS: what was received is listed to PACS, operators and researchers.
const QIDO: Access = Access::AnyOf(&[Role::Pacs, Role::Admin, Role::Researcher]);
// ---- end DICOMweb ----

/// Who may do what: every route of the router and the role it needs. This is the one place
/// to read it (docs/security.md shows the same table; a test keeps the two equal).
///
/// `researcher` runs validations; `pacs` stores DICOM; `infer` covers reading what is served (`POST /v2/repository/index`
/// included: Triton's clients call it, and it changes nothing).
pub const ROUTES: &[RouteRule] = &[
    rule("GET", "/v2/health/live", PUBLIC),
    rule("GET", "/v2/health/ready", PUBLIC),
    rule("GET", "/v2", INFER),
    rule("GET", "/v2/models/stats", INFER),
    rule("GET", "/v2/models/{model}", INFER),
    rule("GET", "/v2/models/{model}/config", INFER),
    rule("GET", "/v2/models/{model}/ready", INFER),
    rule("POST", "/v2/models/{model}/infer", INFER),
    rule("POST", "/v2/models/{model}/explain", INFER),
    rule("GET", "/v2/models/{model}/stats", INFER),
    rule("GET", "/v2/models/{model}/versions/{version}", INFER),
    rule("GET", "/v2/models/{model}/versions/{version}/config", INFER),
    rule("GET", "/v2/models/{model}/versions/{version}/ready", INFER),
    rule("POST", "/v2/models/{model}/versions/{version}/infer", INFER),
    rule(
        "POST",
        "/v2/models/{model}/versions/{version}/explain",
        INFER,
    ),
    rule("GET", "/v2/models/{model}/versions/{version}/stats", INFER),
    rule("POST", "/v2/repository/index", INFER),
    rule("POST", "/v2/repository/models/{model}/load", ADMIN),
    rule("POST", "/v2/repository/models/{model}/unload", ADMIN),
    rule("GET", "/metrics", METRICS),
    // ---- DICOMweb (issue 8): STOW-RS and QIDO-RS ----
    rule("POST", "/dicomweb/studies", PACS),
    rule("POST", "/dicomweb/studies/{study}", PACS),
    rule("GET", "/dicomweb/studies", QIDO),
    rule("GET", "/dicomweb/studies/{study}/series", QIDO),
    rule("GET", "/dicomweb/studies/{study}/instances", QIDO),
    rule(
        "GET",
        "/dicomweb/studies/{study}/series/{series}/instances",
        QIDO,
    ),
    rule("GET", "/dicomweb/series", QIDO),
    rule("GET", "/dicomweb/instances", QIDO),
    // WADO-RS retrieve of a study, a series, one instance (received or made by the pipeline).
    rule("GET", "/dicomweb/studies/{study}", QIDO),
    rule("GET", "/dicomweb/studies/{study}/series/{series}", QIDO),
    rule(
        "GET",
        "/dicomweb/studies/{study}/series/{series}/instances/{sop}",
        QIDO,
    ),
    // ---- end DICOMweb ----
    // The DICOM pipeline's results (issue 9): PACS, operators and researchers.
    rule("GET", "/results/studies/{study}", QIDO),
    // CDS Hooks (issue 10): discovery is open; services and feedback need the EHR's JWT.
    rule("GET", "/cds-services", PUBLIC),
    rule("POST", "/cds-services/{id}", Access::CdsHooks),
    rule("POST", "/cds-services/{id}/feedback", Access::CdsHooks),
    // Validation runs (issue 11).
    rule("POST", "/validation/runs", RESEARCHER),
    rule("GET", "/validation/runs", RESEARCHER),
    rule("GET", "/validation/runs/{id}", RESEARCHER),
    rule("DELETE", "/validation/runs/{id}", RESEARCHER),
    rule("GET", "/validation/runs/{id}/report.json", RESEARCHER),
    rule("GET", "/validation/runs/{id}/report.html", RESEARCHER),
];

/// The row of `method path`, if the table has one (`HEAD` is served by `GET` routes).
pub fn rule_for(method: &Method, path: &str) -> Option<&'static RouteRule> {
    let method = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    ROUTES.iter().find(|r| r.path == path && r.method == method)
}

/// One method of the gRPC service (`inference.GRPCInferenceService`, `serve --grpc-addr`) and
/// what it needs: the role of the HTTP route that does the same.
#[derive(Clone, Copy, Debug)]
pub struct GrpcRule {
    pub method: &'static str,
    pub access: Access,
}

const fn grpc(method: &'static str, access: Access) -> GrpcRule {
    GrpcRule { method, access }
}

/// Who may call which gRPC method (docs/security.md shows the same table; a test keeps the two
/// equal). A method without a row is refused (`http::grpc` looks every call up here).
pub const GRPC_METHODS: &[GrpcRule] = &[
    grpc("ServerLive", PUBLIC),
    grpc("ServerReady", PUBLIC),
    grpc("ServerMetadata", INFER),
    grpc("ModelReady", INFER),
    grpc("ModelMetadata", INFER),
    grpc("ModelConfig", INFER),
    grpc("ModelInfer", INFER),
    grpc("ModelStatistics", INFER),
    grpc("RepositoryIndex", INFER),
    grpc("RepositoryModelLoad", ADMIN),
    grpc("RepositoryModelUnload", ADMIN),
];

/// The row of a gRPC method, if the table has one.
pub fn grpc_rule_for(method: &str) -> Option<&'static GrpcRule> {
    GRPC_METHODS.iter().find(|r| r.method == method)
}

/// Builds the router from routes that each have a row in [`ROUTES`]: a route without one (or
/// a row without its route) is a programming error that fails every test that builds the
/// router, before it can ship.
pub(crate) struct Routes<S> {
    router: axum::Router<S>,
    seen: Vec<&'static str>,
}

impl<S: Clone + Send + Sync + 'static> Routes<S> {
    pub(crate) fn new() -> Self {
        Routes {
            router: axum::Router::new(),
            seen: vec![],
        }
    }

    pub(crate) fn route(mut self, path: &'static str, method_router: MethodRouter<S>) -> Self {
        assert!(
            ROUTES.iter().any(|r| r.path == path),
            "route {path} has no row in http::auth::ROUTES: declare the role it needs"
        );
        self.seen.push(path);
        self.router = self.router.route(path, method_router);
        self
    }

    pub(crate) fn finish(self) -> axum::Router<S> {
        for r in ROUTES {
            assert!(
                self.seen.contains(&r.path),
                "http::auth::ROUTES lists {} {} but the router has no such route",
                r.method,
                r.path
            );
        }
        self.router
    }
}

// ---------------------------------------------------------------------------------------
// Configuration

/// Default `auth.client_certificate_roles`.
pub const DEFAULT_CLIENT_CERTIFICATE_ROLES: [Role; 2] = [Role::Infer, Role::Pacs];
/// What anonymous callers get while no credential grants anything but `admin`.
pub const OPEN_ROLES: [Role; 3] = [Role::Infer, Role::Metrics, Role::Pacs];
/// Default clock leeway for `exp` and `nbf`, in seconds.
pub const DEFAULT_JWT_LEEWAY_SECS: u64 = 30;

/// The resolved auth settings (see docs/security.md).
#[derive(Clone, Debug)]
pub struct AuthConfig {
    pub api_keys: Vec<ApiKey>,
    pub jwt: Option<Arc<JwtConfig>>,
    /// Roles of callers that present a verified TLS client certificate.
    pub client_certificate_roles: Roles,
    /// `auth.anonymous_roles` when the file sets it; `None`: see [`Self::anonymous_roles`].
    pub anonymous_roles: Option<Roles>,
    /// Whether the TLS layer verifies client certificates (a credential for the start-up
    /// check and the anonymous default). Set by whoever configures TLS.
    pub client_certificates_verified: bool,
    /// Whether the HTTP listener is on a loopback address. There, an anonymous caller's
    /// request must name a loopback Host: a web page that rebinds its own name to 127.0.0.1
    /// reaches the server from the browser on this machine, as anonymous, under its own
    /// name (a red-team finding: it listed, retrieved and stored studies through the
    /// default `pacs` role). Set by whoever knows the address.
    pub loopback_listener: bool,
    /// The same for the gRPC listener (`--grpc-addr`): a browser's fetch reaches it as
    /// gRPC-over-HTTP/1.1 under the page's own name (a red-team finding: `ModelInfer` and
    /// `RepositoryIndex` answered an anonymous request naming another host).
    pub loopback_grpc_listener: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            api_keys: vec![],
            jwt: None,
            client_certificate_roles: DEFAULT_CLIENT_CERTIFICATE_ROLES.into(),
            anonymous_roles: None,
            client_certificates_verified: false,
            loopback_listener: false,
            loopback_grpc_listener: false,
        }
    }
}

impl AuthConfig {
    /// Whether some credential (API key, JWT, verified client certificate) can grant a role
    /// other than `admin`: from then on the server is doing access control, and anonymous
    /// callers get only what `auth.anonymous_roles` gives them.
    pub fn controls_access(&self) -> bool {
        self.jwt.is_some()
            || self.api_keys.iter().any(|k| !k.roles.only_admin())
            || (self.client_certificates_verified && !self.client_certificate_roles.is_empty())
    }

    /// The roles of anonymous callers: `auth.anonymous_roles` when set; otherwise `infer`,
    /// `metrics` and `pacs` while no credential grants anything but `admin` (zero-config on
    /// loopback, `--admin-token` alone included), and none once one does.
    pub fn anonymous_roles(&self) -> Roles {
        match self.anonymous_roles {
            Some(roles) => roles,
            None if self.controls_access() => Roles::NONE,
            None => OPEN_ROLES.into(),
        }
    }

    /// The start-up rule: on an address other than loopback, refuse to serve when anyone
    /// who can reach the port would hold a role other than `metrics` without a credential,
    /// unless the operator said `--insecure`. Credentials for other callers do not change
    /// that (a key for Prometheus alone let `anonymous_roles = ["infer", "pacs"]` start on
    /// 0.0.0.0 without a word: a red-team finding).
    pub fn check_bind(&self, addr: SocketAddr, insecure: bool) -> Result<(), AuthConfigError> {
        if is_loopback(addr) || insecure {
            return Ok(());
        }
        let open = self.anonymous_roles();
        if open.iter().any(|r| r != Role::Metrics) {
            return Err(AuthConfigError::OpenOnNetwork { addr, open });
        }
        Ok(())
    }
}

/// Whether the server only answers this machine.
pub fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// An API key, known by the SHA-256 of its text.
#[derive(Clone)]
pub struct ApiKey {
    pub name: String,
    pub roles: Roles,
    pub sha256: [u8; 32],
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("roles", &self.roles)
            .finish_non_exhaustive()
    }
}

/// OIDC/JWT bearer tokens: who issues them, for whom, and the keys that sign them.
#[derive(Clone, Debug)]
pub struct JwtConfig {
    pub issuer: String,
    pub audience: Vec<String>,
    pub jwks_file: PathBuf,
    /// Claim holding the roles: an array of strings or a space-separated string (`scope`);
    /// dots walk into objects (`realm_access.roles`).
    pub roles_claim: String,
    pub leeway_secs: u64,
    keys: Vec<JwtKey>,
}

impl JwtConfig {
    /// Reads and checks the JWKS file now, so that a bad one stops the start, not a request.
    pub fn new(
        issuer: String,
        audience: Vec<String>,
        jwks_file: PathBuf,
        roles_claim: String,
        leeway_secs: u64,
    ) -> Result<JwtConfig, AuthConfigError> {
        if issuer.is_empty() {
            return Err(AuthConfigError::JwtField { field: "issuer" });
        }
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(AuthConfigError::JwtField { field: "audience" });
        }
        if roles_claim.is_empty() {
            return Err(AuthConfigError::JwtField {
                field: "roles_claim",
            });
        }
        if leeway_secs > 300 {
            return Err(AuthConfigError::JwtField {
                field: "leeway_secs (at most 300)",
            });
        }
        let keys = load_jwks(&jwks_file)?;
        Ok(JwtConfig {
            issuer,
            audience,
            jwks_file,
            roles_claim,
            leeway_secs,
            keys,
        })
    }

    /// Key ids of the signing keys, for the start-up log.
    pub fn key_ids(&self) -> Vec<&str> {
        self.keys
            .iter()
            .map(|k| k.kid.as_deref().unwrap_or("-"))
            .collect()
    }
}

/// The kind of key, which decides the algorithms it verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl KeyKind {
    fn verifies(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            KeyKind::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            KeyKind::P256 => alg == ES256,
            KeyKind::P384 => alg == ES384,
            KeyKind::Ed25519 => alg == EdDSA,
        }
    }
}

#[derive(Clone)]
struct JwtKey {
    kid: Option<String>,
    /// The JWK's `alg`, when it names one: tokens must use exactly it.
    alg: Option<Algorithm>,
    kind: KeyKind,
    key: DecodingKey,
}

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

fn load_jwks(path: &Path) -> Result<Vec<JwtKey>, AuthConfigError> {
    let text = std::fs::read(path).map_err(|source| AuthConfigError::ReadJwks {
        path: path.to_owned(),
        source,
    })?;
    let set: JwkSet =
        serde_json::from_slice(&text).map_err(|source| AuthConfigError::ParseJwks {
            path: path.to_owned(),
            source,
        })?;
    let mut keys = vec![];
    let mut kids = HashSet::new();
    for (index, jwk) in set.keys.iter().enumerate() {
        let name = jwk
            .common
            .key_id
            .clone()
            .unwrap_or_else(|| format!("#{index}"));
        let bad = |reason: &'static str| AuthConfigError::JwksKey {
            path: path.to_owned(),
            key: name.clone(),
            reason,
        };
        // Encryption keys of the same set are not ours to use.
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        if let Some(kid) = &jwk.common.key_id
            && !kids.insert(kid.clone())
        {
            return Err(bad("the key id appears twice"));
        }
        let kind = key_kind(jwk).map_err(bad)?;
        let alg = match jwk.common.key_algorithm {
            None => None,
            Some(a) => {
                let alg = Algorithm::try_from(a)
                    .map_err(|_| bad("its \"alg\" is not a signature algorithm"))?;
                if !kind.verifies(alg) {
                    return Err(bad("its \"alg\" does not fit its key type"));
                }
                Some(alg)
            }
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|_| bad("its key material is invalid"))?;
        keys.push(JwtKey {
            kid: jwk.common.key_id.clone(),
            alg,
            kind,
            key,
        });
    }
    if keys.is_empty() {
        return Err(AuthConfigError::EmptyJwks {
            path: path.to_owned(),
        });
    }
    Ok(keys)
}

fn key_kind(jwk: &Jwk) -> Result<KeyKind, &'static str> {
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Ok(KeyKind::Rsa),
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => Ok(KeyKind::P256),
            EllipticCurve::P384 => Ok(KeyKind::P384),
            _ => Err("unsupported elliptic curve (P-256 and P-384 only)"),
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Ok(KeyKind::Ed25519)
        }
        AlgorithmParameters::OctetKeyPair(_) => Err("unsupported OKP curve (Ed25519 only)"),
        AlgorithmParameters::OctetKey(_) => Err(
            "it is a symmetric (HMAC) key: only asymmetric keys are accepted, a shared secret would let anyone who verifies tokens forge them",
        ),
        _ => Err("unsupported key type (RSA, EC or OKP only)"),
    }
}

/// The `[auth]` table of `nightingale.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    #[serde(default)]
    pub api_keys: Vec<ApiKeySection>,
    pub jwt: Option<JwtSection>,
    pub client_certificate_roles: Option<Vec<Role>>,
    pub anonymous_roles: Option<Vec<Role>>,
}

/// One `[[auth.api_keys]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySection {
    pub name: String,
    pub role: Option<Role>,
    pub roles: Option<Vec<Role>>,
    /// Lowercase or uppercase hex SHA-256 of the key: `printf %s "$KEY" | sha256sum`.
    pub sha256: String,
}

/// `[auth.jwt]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSection {
    pub issuer: String,
    pub audience: OneOrMany,
    /// Relative paths are read from the config file's folder.
    pub jwks_file: PathBuf,
    pub roles_claim: Option<String>,
    pub leeway_secs: Option<u64>,
}

/// A string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl AuthSection {
    /// Checks the section and resolves it; `base` is the folder relative paths start from.
    pub fn resolve(self, base: &Path) -> Result<AuthConfig, AuthConfigError> {
        let mut api_keys: Vec<ApiKey> = vec![];
        for k in self.api_keys {
            let valid_name = !k.name.is_empty()
                && k.name.len() <= 64
                && k.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !valid_name {
                return Err(AuthConfigError::KeyName { name: k.name });
            }
            if api_keys.iter().any(|o| o.name == k.name) {
                return Err(AuthConfigError::DuplicateName { name: k.name });
            }
            // One or the other: a leftover `roles` line beside `role` granted both silently
            // (a review's finding).
            if k.role.is_some() && k.roles.is_some() {
                return Err(AuthConfigError::RoleAndRoles { name: k.name });
            }
            let roles: Roles = k
                .role
                .into_iter()
                .chain(k.roles.into_iter().flatten())
                .collect();
            if roles.is_empty() {
                return Err(AuthConfigError::NoRoles { name: k.name });
            }
            let mut sha256 = [0u8; 32];
            if k.sha256.len() != 64 || hex::decode_to_slice(&k.sha256, &mut sha256).is_err() {
                return Err(AuthConfigError::Digest { name: k.name });
            }
            if let Some(other) = api_keys.iter().find(|o| o.sha256 == sha256) {
                return Err(AuthConfigError::DuplicateKey {
                    a: other.name.clone(),
                    b: k.name,
                });
            }
            api_keys.push(ApiKey {
                name: k.name,
                roles,
                sha256,
            });
        }
        let jwt = match self.jwt {
            None => None,
            Some(j) => {
                let audience = match j.audience {
                    OneOrMany::One(a) => vec![a],
                    OneOrMany::Many(a) => a,
                };
                Some(Arc::new(JwtConfig::new(
                    j.issuer,
                    audience,
                    base.join(j.jwks_file),
                    j.roles_claim.unwrap_or_else(|| "roles".to_owned()),
                    j.leeway_secs.unwrap_or(DEFAULT_JWT_LEEWAY_SECS),
                )?))
            }
        };
        let anonymous_roles = self
            .anonymous_roles
            .map(|r| r.into_iter().collect::<Roles>());
        if anonymous_roles.is_some_and(|r| r.contains(Role::Admin)) {
            return Err(AuthConfigError::AnonymousAdmin);
        }
        Ok(AuthConfig {
            api_keys,
            jwt,
            client_certificate_roles: self
                .client_certificate_roles
                .map(|r| r.into_iter().collect())
                .unwrap_or_else(|| DEFAULT_CLIENT_CERTIFICATE_ROLES.into()),
            anonymous_roles,
            client_certificates_verified: false,
            loopback_listener: false,
            loopback_grpc_listener: false,
        })
    }
}

/// The auth configuration makes no sense, or a file it names cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error(
        "auth.api_keys: name {name:?} must be 1 to 64 characters of letters, digits, '-', '_' or '.'"
    )]
    KeyName { name: String },
    #[error("auth.api_keys: the name {name:?} is used twice")]
    DuplicateName { name: String },
    #[error("auth.api_keys: {name:?} has no role (set role = \"infer\" or roles = [...])")]
    NoRoles { name: String },
    #[error(
        "auth.api_keys: {name:?}: sha256 must be 64 hex characters, the SHA-256 of the key (printf %s \"$KEY\" | sha256sum)"
    )]
    Digest { name: String },
    #[error("auth.api_keys: {a:?} and {b:?} have the same key")]
    DuplicateKey { a: String, b: String },
    #[error("auth.api_keys: {name:?} sets both role and roles: give one")]
    RoleAndRoles { name: String },
    #[error(
        "auth.anonymous_roles cannot hold admin: model control needs a key (--admin-token or [[auth.api_keys]])"
    )]
    AnonymousAdmin,
    #[error("auth.jwt: {field} is missing or empty")]
    JwtField { field: &'static str },
    #[error("auth.jwt: cannot read the JWKS file {path}: {source}")]
    ReadJwks {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("auth.jwt: the JWKS file {path} is not a JSON Web Key Set: {source}")]
    ParseJwks {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("auth.jwt: key {key} of {path} cannot be used: {reason}")]
    JwksKey {
        path: PathBuf,
        key: String,
        reason: &'static str,
    },
    #[error("auth.jwt: the JWKS file {path} holds no signature key")]
    EmptyJwks { path: PathBuf },
    #[error(
        "refusing to listen on {addr}, which is not a loopback address: anyone who can reach it would have the roles {open} without a key. Configure [[auth.api_keys]] or [auth.jwt] in nightingale.toml and leave auth.anonymous_roles empty or [\"metrics\"] (see docs/security.md), listen on 127.0.0.1, or pass --insecure (NIGHTINGALE_INSECURE=true) to accept the risk"
    )]
    OpenOnNetwork { addr: SocketAddr, open: Roles },
}

// ---------------------------------------------------------------------------------------
// Authentication

/// Checks credentials; built once from the configuration, shared by every request.
pub struct Authenticator {
    keys: Vec<KeyEntry>,
    jwt: Option<Arc<JwtConfig>>,
    client_certificate_roles: Roles,
    anonymous: Roles,
    /// Roles some credential (or anonymity) can grant; the others are disabled.
    grantable: Roles,
    /// [`AuthConfig::loopback_listener`].
    loopback_listener: bool,
    /// [`AuthConfig::loopback_grpc_listener`].
    loopback_grpc_listener: bool,
    /// Tokens already verified: SHA-256 of the token → its caller and `exp`. A token's bytes
    /// fix its signature and claims and the JWKS does not change while serving, so only the
    /// clock can change the answer: an entry serves until `exp` (plus leeway), then the token
    /// is verified again (and refused as expired). Saves a signature check per request.
    jwt_cache: std::sync::Mutex<std::collections::HashMap<[u8; 32], (Caller, u64)>>,
}

/// Most verified tokens remembered (the cache is emptied when full).
const JWT_CACHE_ENTRIES: usize = 4096;

struct KeyEntry {
    id: String,
    roles: Roles,
    sha256: [u8; 32],
}

/// Why credentials were refused (401). The texts never repeat the credential.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the Authorization header must be \"Bearer <API key or token>\"")]
    Scheme,
    #[error("invalid API key or token")]
    Invalid,
    #[error("more than one {0} header: a request presents one credential")]
    Repeated(&'static str),
    #[error("invalid API key or token (this server accepts no JWT: [auth.jwt] is not configured)")]
    JwtNotConfigured,
    #[error("invalid token: {0}")]
    Jwt(#[from] JwtError),
    #[error("the TLS client certificate {0}: connect again")]
    StaleCertificate(&'static str),
}

/// Why a JWT was refused.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("not a well-formed JWT")]
    Malformed,
    #[error(
        "algorithm {alg:?} is refused: only asymmetric signatures (RS*, PS*, ES256, ES384, EdDSA) are accepted"
    )]
    Algorithm { alg: String },
    #[error("the header has critical extensions this server does not understand")]
    Critical,
    #[error("the header names no key (kid) and the JWKS holds more than one")]
    NoKid,
    #[error("unknown key id {kid:?}")]
    UnknownKid { kid: String },
    #[error("the key {kid:?} does not verify {alg:?} signatures")]
    KeyMismatch { kid: String, alg: Algorithm },
    #[error("bad signature")]
    Signature,
    #[error("expired")]
    Expired,
    #[error("not valid yet (nbf)")]
    NotYetValid,
    #[error("wrong issuer")]
    Issuer,
    #[error("wrong audience")]
    Audience,
    #[error("the claim {claim} is missing")]
    MissingClaim { claim: String },
    #[error("the claim {claim} has the wrong type")]
    ClaimType { claim: String },
    #[error("rejected ({0:?})")]
    Other(jsonwebtoken::errors::ErrorKind),
}

impl Authenticator {
    /// Whether the gRPC listener is on a loopback address ([`AuthConfig::loopback_grpc_listener`]).
    pub(crate) fn loopback_grpc_listener(&self) -> bool {
        self.loopback_grpc_listener
    }

    /// `admin_token` is `--admin-token`: one more key, with the admin role.
    pub fn new(config: &AuthConfig, admin_token: Option<&str>) -> Authenticator {
        let mut keys: Vec<KeyEntry> = config
            .api_keys
            .iter()
            .map(|k| KeyEntry {
                id: format!("api-key:{}", k.name),
                roles: k.roles,
                sha256: k.sha256,
            })
            .collect();
        if let Some(token) = admin_token {
            keys.push(KeyEntry {
                id: "admin-token".to_owned(),
                roles: [Role::Admin].into(),
                sha256: Sha256::digest(token.as_bytes()).into(),
            });
        }
        let anonymous = config.anonymous_roles();
        let mut grantable = keys.iter().fold(anonymous, |acc, k| acc.union(k.roles));
        if config.jwt.is_some() {
            grantable = Role::ALL.into();
        }
        if config.client_certificates_verified {
            grantable = grantable.union(config.client_certificate_roles);
        }
        Authenticator {
            keys,
            jwt: config.jwt.clone(),
            client_certificate_roles: config.client_certificate_roles,
            anonymous,
            grantable,
            loopback_listener: config.loopback_listener,
            loopback_grpc_listener: config.loopback_grpc_listener,
            jwt_cache: Default::default(),
        }
    }

    fn verify_jwt_cached(&self, jwt: &JwtConfig, token: &str) -> Result<Caller, JwtError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = jsonwebtoken::get_current_timestamp();
        let mut cache = self.jwt_cache.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(&digest) {
            Some((caller, exp)) if now <= exp.saturating_add(jwt.leeway_secs) => {
                return Ok(caller.clone());
            }
            Some(_) => {
                cache.remove(&digest);
            }
            None => {}
        }
        drop(cache);
        let (caller, exp) = verify_jwt(jwt, token)?;
        let mut cache = self.jwt_cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= JWT_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(digest, (caller.clone(), exp));
        Ok(caller)
    }

    /// Roles of callers without credentials.
    pub fn anonymous_roles(&self) -> Roles {
        self.anonymous
    }

    /// Who sent this request: the holder of its API key or token, of its verified client
    /// certificate, or anonymous. Credentials that are present but wrong are an error (not
    /// anonymous): a client with a stale key learns so.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        extensions: &axum::http::Extensions,
    ) -> Result<Caller, AuthError> {
        if let Some(secret) = presented(headers)? {
            let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
            // Every key is compared, in constant time, whichever matches.
            let mut found: Option<&KeyEntry> = None;
            for k in &self.keys {
                if bool::from(k.sha256.ct_eq(&digest)) {
                    found = Some(k);
                }
            }
            // An identified caller also holds what is open to everyone.
            if let Some(k) = found {
                return Ok(Caller {
                    id: k.id.clone(),
                    roles: k.roles.union(self.anonymous),
                });
            }
            if looks_like_jwt(secret) {
                return match &self.jwt {
                    Some(jwt) => {
                        let mut caller = self.verify_jwt_cached(jwt, secret)?;
                        caller.roles = caller.roles.union(self.anonymous);
                        Ok(caller)
                    }
                    None => Err(AuthError::JwtNotConfigured),
                };
            }
            return Err(AuthError::Invalid);
        }
        if let Some(cert) = extensions.get::<ClientCertificate>() {
            if let Some(why) = cert.stale() {
                return Err(AuthError::StaleCertificate(why));
            }
            return Ok(Caller {
                id: format!("tls:{}", identity_text(&cert.subject)),
                roles: self.client_certificate_roles.union(self.anonymous),
            });
        }
        Ok(Caller::anonymous(self.anonymous))
    }
}

/// The API key or token of a request: `Authorization: Bearer <x>`, else `X-API-Key: <x>`.
fn presented(headers: &HeaderMap) -> Result<Option<&str>, AuthError> {
    // A single-value field given twice (RFC 9110 5.3): which one counts would be up to
    // whoever reads it (a proxy may append its own), so neither does.
    for name in ["authorization", "x-api-key"] {
        if headers.get_all(name).iter().nth(1).is_some() {
            return Err(AuthError::Repeated(if name == "authorization" {
                "Authorization"
            } else {
                "X-API-Key"
            }));
        }
    }
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| AuthError::Scheme)?.trim();
        let (scheme, rest) = value.split_once(' ').ok_or(AuthError::Scheme)?;
        let secret = rest.trim();
        if !scheme.eq_ignore_ascii_case("bearer") || secret.is_empty() {
            return Err(AuthError::Scheme);
        }
        return Ok(Some(secret));
    }
    if let Some(value) = headers.get("x-api-key") {
        let secret = value.to_str().map_err(|_| AuthError::Invalid)?.trim();
        if secret.is_empty() {
            return Err(AuthError::Invalid);
        }
        return Ok(Some(secret));
    }
    Ok(None)
}

/// Three base64url segments, the first decoding to a JSON object: a JWS in compact form.
fn looks_like_jwt(token: &str) -> bool {
    let mut parts = token.split('.');
    let (Some(h), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    URL_SAFE_NO_PAD
        .decode(h)
        .ok()
        .is_some_and(|b| b.first() == Some(&b'{'))
}

/// The header fields read before verifying (so that `alg: none` and HMAC are refused here,
/// with a reason, whatever the JWT library would do with them).
#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    kid: Option<String>,
    crit: Option<serde_json::Value>,
}

/// Verifies a token; returns its caller and its `exp`.
/// Whether a token's payload (its second segment, base64url) names `claim` at all.
fn claim_present(token: &str, claim: &str) -> bool {
    use base64::Engine as _;
    token
        .split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        })
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v.get(claim).is_some())
}

fn verify_jwt(jwt: &JwtConfig, token: &str) -> Result<(Caller, u64), JwtError> {
    let header = token.split('.').next().ok_or(JwtError::Malformed)?;
    let header: RawHeader = URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(JwtError::Malformed)?;
    use Algorithm::*;
    let alg = match header.alg.as_str() {
        "RS256" => RS256,
        "RS384" => RS384,
        "RS512" => RS512,
        "PS256" => PS256,
        "PS384" => PS384,
        "PS512" => PS512,
        "ES256" => ES256,
        "ES384" => ES384,
        "EdDSA" => EdDSA,
        other => {
            return Err(JwtError::Algorithm {
                alg: printable(other),
            });
        }
    };
    if header.crit.is_some() {
        return Err(JwtError::Critical);
    }
    let key = match &header.kid {
        Some(kid) => jwt
            .keys
            .iter()
            .find(|k| k.kid.as_deref() == Some(kid.as_str()))
            .ok_or_else(|| JwtError::UnknownKid {
                kid: printable(kid),
            })?,
        None if jwt.keys.len() == 1 => &jwt.keys[0],
        None => return Err(JwtError::NoKid),
    };
    if !key.kind.verifies(alg) || key.alg.is_some_and(|a| a != alg) {
        return Err(JwtError::KeyMismatch {
            kid: key.kid.clone().unwrap_or_default(),
            alg,
        });
    }
    let mut validation = Validation::new(alg);
    validation.set_issuer(&[&jwt.issuer]);
    validation.set_audience(&jwt.audience);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.leeway = jwt.leeway_secs;
    let data =
        jsonwebtoken::decode::<serde_json::Value>(token, &key.key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.into_kind() {
                K::InvalidSignature => JwtError::Signature,
                K::ExpiredSignature => JwtError::Expired,
                K::ImmatureSignature => JwtError::NotYetValid,
                K::InvalidIssuer => JwtError::Issuer,
                K::InvalidAudience => JwtError::Audience,
                // jsonwebtoken reads a claim it cannot parse (`"exp": "1796..."`, `1e30`) as
                // missing: told apart here, so the reason names what is wrong with it.
                K::MissingRequiredClaim(claim) if claim_present(token, &claim) => {
                    JwtError::ClaimType { claim }
                }
                K::MissingRequiredClaim(claim) => JwtError::MissingClaim { claim },
                K::InvalidClaimFormat(claim) => JwtError::ClaimType { claim },
                K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => JwtError::Malformed,
                other => JwtError::Other(other),
            }
        })?;
    let claims = data.claims;
    let sub = claims
        .get("sub")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| JwtError::ClaimType {
            claim: "sub".into(),
        })?;
    // Checked present and numeric by the validation above.
    let exp = claims
        .get("exp")
        .and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f as u64)))
        .ok_or_else(|| JwtError::ClaimType {
            claim: "exp".into(),
        })?;
    let mut value = Some(&claims);
    for part in jwt.roles_claim.split('.') {
        value = value.and_then(|v| v.get(part));
    }
    let roles: Roles = match value {
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(serde_json::Value::as_str)
            .filter_map(Role::parse)
            .collect(),
        Some(serde_json::Value::String(s)) => {
            s.split_whitespace().filter_map(Role::parse).collect()
        }
        _ => Roles::NONE,
    };
    Ok((
        Caller {
            id: issuer_subject("jwt", &jwt.issuer, Some(sub)),
            roles,
        },
        exp,
    ))
}

/// Text from a client, made safe for a log line or an actor field: characters that read as
/// themselves, at most 200 of them. Control characters, and those that are invisible or
/// reorder the text around them (bidirectional overrides and isolates, zero-width and other
/// format characters, combining marks: what Rust's `escape_debug` escapes), are shown as `?`:
/// `CN=alice\u{200b}` read as `CN=alice`, and a right-to-left override turned the text after
/// it around, in the audit trail and the logs (red-team findings).
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if reads_as_itself(c) { c } else { '?' })
        .take(200)
        .collect()
}

/// Whether `c` is shown as itself (see [`printable`]).
fn reads_as_itself(c: char) -> bool {
    // Blank letters (Hangul fillers, the braille blank) print as nothing, as a zero-width
    // character does, though Rust counts them printable (a re-attack finding).
    if matches!(
        c,
        '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}' | '\u{2800}'
    ) {
        return false;
    }
    matches!(c, '\\' | '"' | '\'') || (!c.is_control() && c.escape_debug().count() == 1)
}

/// [`printable`] for an identity (a JWT's subject, a certificate's subject): when making it
/// printable changed it (cut at 200 characters, a character shown as `?`), or when it holds
/// the `~` this suffix starts with, a digest of the whole value follows, so that two
/// identities never share an id (an id owns validation runs: a 255-character OIDC subject
/// cut to 200 read another's run; a subject written as another's printable text and digest,
/// `x?~9ab6…` for `x\n`, took that one's id).
/// The id of a token's caller: `prefix:<issuer>#<subject>` (no subject: nothing after the
/// `#`; a token's `sub` is never empty). An issuer or subject holding `#` (or changed for
/// printing) carries a digest of the whole, so that no two (issuer, subject) pairs share an
/// id (`A` with `x#y` and `A#x` with `y` did; so did no subject and the subject `-`: the
/// id owns a CDS card's feedback, a red-team finding).
fn issuer_subject(prefix: &str, issuer: &str, subject: Option<&str>) -> String {
    let part = |s: &str| {
        if s.contains('#') {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(s.as_bytes());
            format!("{}~{}", printable(s), hex::encode(&digest[..8]))
        } else {
            identity_text(s)
        }
    };
    format!(
        "{prefix}:{}#{}",
        part(issuer),
        subject.map(part).unwrap_or_default()
    )
}

fn identity_text(s: &str) -> String {
    use sha2::Digest;
    let shown = printable(s);
    if shown == s && !s.contains('~') {
        return shown;
    }
    let digest = sha2::Sha256::digest(s.as_bytes());
    format!("{shown}~{}", hex::encode(&digest[..8]))
}

// ---------------------------------------------------------------------------------------
// Enforcement

/// The middleware: finds the route's row, authenticates the caller, checks the role, and
/// puts the [`Caller`] in the request's extensions. Runs after routing (`route_layer`).
pub(crate) async fn enforce(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(path) = req.extensions().get::<MatchedPath>().cloned() else {
        // Not a route: the fallback answers 404.
        return next.run(req).await;
    };
    let Some(rule) = rule_for(req.method(), path.as_str()) else {
        if ROUTES.iter().any(|r| r.path == path.as_str()) {
            // Another method of a declared route: what the router would answer, and a method
            // added to a route without its row is refused, not open.
            return AppError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint",
            )
            .into_response();
        }
        tracing::error!(method = %req.method(), path = path.as_str(), "route without a row in the role table: refused");
        return AppError::new(
            StatusCode::FORBIDDEN,
            format!(
                "{} {} declares no role, so it is refused (a server bug: please report it)",
                req.method(),
                path.as_str()
            ),
        )
        .into_response();
    };
    let auth = &state.auth;
    let caller = match rule.access {
        Access::CdsHooks => {
            let audience = match super::cds::audience(&state, &req) {
                Ok(a) => a,
                Err(why) => {
                    return unauthorized(
                        format!(
                            "CDS Hooks needs a JWT from a trusted EHR for this service's URL, which cannot be told: {why}"
                        ),
                        false,
                    );
                }
            };
            if req
                .headers()
                .get_all(header::AUTHORIZATION)
                .iter()
                .nth(1)
                .is_some()
            {
                return unauthorized(
                    "more than one Authorization header: a request presents one credential"
                        .to_owned(),
                    false,
                );
            }
            let header = req
                .headers()
                .get(header::AUTHORIZATION)
                .map(|v| v.to_str().unwrap_or("\u{fffd}"));
            // CDS Hooks 2.0: `aud` is "the CDS Service endpoint that is being called": a
            // feedback call's token may name the feedback endpoint or its service.
            let feedback_audience = format!("{audience}/feedback");
            let audiences: &[&str] = if req.uri().path().ends_with("/feedback") {
                &[&audience, &feedback_audience]
            } else {
                &[&audience]
            };
            let verify = || {
                state.cds().verifier.verify_header_for(
                    header,
                    audiences,
                    jsonwebtoken::get_current_timestamp(),
                )
            };
            let mut verified = verify();
            // An issuer trusted by URL may have rotated its keys: fetch them again (rate
            // limited) and try once more.
            if matches!(
                verified,
                Err(nightingale_decision_support::jwt::JwtError::UnknownKid { .. })
            ) && state.cds().refetch_jwks().await
            {
                verified = verify();
            }
            match verified {
                Ok(v) => Caller {
                    // Shortened or cleaned subjects carry a digest of the whole, as other
                    // callers' do: two EHR clients never share an audit actor (red-team).
                    id: issuer_subject("cds", &v.issuer, v.subject.as_deref()),
                    roles: Roles::NONE,
                },
                Err(e) => {
                    if let Some(not_logged) = STRANGER_LOGS[0].allow() {
                        tracing::warn!(reason = %e, path = path.as_str(), not_logged, "CDS Hooks token refused");
                    }
                    metrics::counter!("nightingale_cds_unauthorized_total").increment(1);
                    let kind = if path.as_str().ends_with("/feedback") {
                        crate::audit::EventKind::CdsFeedback
                    } else {
                        crate::audit::EventKind::CdsHook
                    };
                    super::cds::audit_refusal(
                        &state,
                        kind,
                        req.uri().path(),
                        super::cds::UNAUTHENTICATED.to_owned(),
                        StatusCode::UNAUTHORIZED,
                        &super::request_id_of(req.headers()),
                    )
                    .await;
                    return unauthorized(
                        format!("CDS Hooks needs a JWT from a trusted EHR: {e}"),
                        header.is_some(),
                    );
                }
            }
        }
        Access::Public | Access::Role(_) | Access::AnyOf(_) => {
            match authorize(
                auth,
                rule.access,
                req.headers(),
                req.extensions(),
                path.as_str(),
            ) {
                Ok(caller) => caller,
                Err(denied) => {
                    denied
                        .audit_if_admin(
                            &state,
                            rule.access,
                            req.uri().path(),
                            &super::request_id_of(req.headers()),
                        )
                        .await;
                    return denied.into_response();
                }
            }
        }
    };
    if let Some(refused) = refuse_rebinding(
        rule.access,
        auth.loopback_listener,
        &caller,
        &req,
        path.as_str(),
    ) {
        return refused.into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// An anonymous caller's request to a listener on a loopback address must name it by a
/// loopback Host (or authority): another name is how a web page reaches the server from a
/// browser on this machine (DNS rebinding). Nor may it come from a web page of another
/// origin: a browser sends such a page's simple requests (a `text/plain` POST to `/infer`
/// or `/explain`) without asking first, and the page cannot read the answer but makes the
/// server run it (cross-site request forgery: a review's finding). A browser says where a
/// request comes from (`Sec-Fetch-Site`, `Origin`); other clients send neither. HTTP
/// ([`enforce`]) and gRPC (`http::grpc`, with its own listener's flag) both ask it; a public
/// endpoint (`access`) is not held to it.
pub(crate) fn refuse_rebinding(
    access: Access,
    loopback_listener: bool,
    caller: &Caller,
    req: &Request,
    endpoint: &str,
) -> Option<AppError> {
    if access == Access::Public {
        return None;
    }
    // A credential the browser sends by itself is ambient too: a client certificate it
    // holds goes with a page's request as no API key or token does (a re-attack's finding:
    // a cross-site page ran inferences audited under the user's certificate).
    let ambient = (loopback_listener && caller.is_anonymous()) || caller.id.starts_with("tls:");
    if !ambient {
        return None;
    }
    if let Some(origin) = cross_origin(req) {
        if let Some(not_logged) = STRANGER_LOGS[1].allow() {
            tracing::warn!(origin = %printable(&origin), endpoint, not_logged, "anonymous request from a web page of another origin refused");
        }
        return Some(AppError::new(
            StatusCode::FORBIDDEN,
            "a request from a web page of another origin, without credentials or with only a client certificate (which a browser sends by itself), is refused (cross-site request forgery); call the server directly or present an API key or token",
        ));
    }
    if !(loopback_listener && caller.is_anonymous()) {
        return None;
    }
    let host = foreign_host(req)?;
    if let Some(not_logged) = STRANGER_LOGS[2].allow() {
        tracing::warn!(host = %printable(&host), endpoint, not_logged, "anonymous request under another host name refused");
    }
    Some(AppError::new(
        StatusCode::FORBIDDEN,
        "a request without credentials to this loopback server must name it by a loopback Host (localhost, 127.0.0.1, [::1]): another name is how a web page reaches it from a browser (DNS rebinding); call it by its loopback name or present a credential",
    ))
}

/// Where a browser says a request comes from, when that is another origin than the server
/// (`Sec-Fetch-Site` other than `same-origin` or `none`, or an `Origin` whose authority is
/// not the request's Host, or `null`); `None` for a request no browser marked so.
fn cross_origin(req: &Request) -> Option<String> {
    let headers = req.headers();
    let fetch_sites = headers.get_all("sec-fetch-site");
    if let Some(site) = fetch_sites
        .iter()
        .find(|s| !matches!(s.as_bytes(), b"same-origin" | b"none"))
    {
        return Some(format!(
            "Sec-Fetch-Site: {}",
            String::from_utf8_lossy(site.as_bytes())
        ));
    }
    let origin = headers.get(header::ORIGIN)?;
    let origin = String::from_utf8_lossy(origin.as_bytes()).into_owned();
    let authority = origin
        .split_once("://")
        .map(|(_, rest)| rest.trim_end_matches('/'));
    let host = headers
        .get(header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    match (authority, host) {
        (Some(a), Some(h)) if a.eq_ignore_ascii_case(h.trim()) => None,
        _ => Some(format!("Origin: {origin}")),
    }
}

/// The host a request names (its Host header, else the URI's authority: HTTP/2's
/// `:authority`) when that is not this machine's loopback; `None` for a loopback name or
/// none at all (HTTP/1.0).
fn foreign_host(req: &Request) -> Option<String> {
    // Two Host fields (RFC 9112 3.2: a 400; removed before this by `host_from_authority`,
    // which marks the request): neither is taken as this machine's name.
    let hosts = req.headers().get_all(header::HOST);
    if req.extensions().get::<super::SeveralHosts>().is_some() || hosts.iter().nth(1).is_some() {
        return Some("(several Host fields)".to_owned());
    }
    // The Host field, and the authority (HTTP/2's `:authority`, an absolute target): each
    // must name this machine.
    hosts
        .iter()
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        .chain(req.uri().authority().map(|a| a.to_string()))
        .find(|name| !super::cds::is_loopback_host(name.trim()))
}

/// Why a caller may not use an endpoint: the error to answer and, for 401, the
/// `WWW-Authenticate` challenge (`invalid`: credentials were sent and refused).
#[derive(Debug)]
pub(crate) struct Denied {
    pub(crate) error: AppError,
    pub(crate) challenge: Option<bool>,
    /// The caller, when it was authenticated (and lacks the role).
    pub(crate) caller: Option<String>,
}

impl Denied {
    /// Audits the refusal when `access` is the admin role's: refused attempts at model
    /// control (load, unload, rollback) were only logged (a review's observation). The
    /// caller, or `unauthenticated` (throttled: anyone can send these).
    pub(crate) async fn audit_if_admin(
        &self,
        state: &AppState,
        access: Access,
        path: &str,
        request_id: &str,
    ) {
        if access != ADMIN {
            return;
        }
        super::cds::audit_refusal(
            state,
            crate::audit::EventKind::AccessRefused,
            path,
            self.caller
                .clone()
                .unwrap_or_else(|| super::cds::UNAUTHENTICATED.to_owned()),
            self.error.status,
            request_id,
        )
        .await;
    }
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        match self.challenge {
            Some(invalid) => unauthorized(self.error.message, invalid),
            None => self.error.into_response(),
        }
    }
}

/// The check behind every endpoint that needs a role (or none): authenticates the caller from
/// the request's headers (HTTP headers or gRPC metadata) and extensions (a verified client
/// certificate), and checks it holds one of the roles `access` names. HTTP ([`enforce`]) and
/// gRPC (`http::grpc`) both call it, so the two answer alike. `endpoint` names the route or
/// method in the log.
pub(crate) fn authorize(
    auth: &Authenticator,
    access: Access,
    headers: &HeaderMap,
    extensions: &axum::http::Extensions,
    endpoint: &str,
) -> Result<Caller, Denied> {
    match access {
        Access::Public => Ok(auth
            .authenticate(headers, extensions)
            .unwrap_or_else(|_| Caller::anonymous(auth.anonymous))),
        Access::CdsHooks => Err(Denied {
            error: AppError::new(
                StatusCode::FORBIDDEN,
                "CDS Hooks services are checked by their own rules",
            ),
            challenge: None,
            caller: None,
        }),
        Access::Role(_) | Access::AnyOf(_) => {
            let roles = access.roles();
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
            if !roles.iter().any(|r| auth.grantable.contains(*r)) {
                return Err(Denied {
                    error: AppError::new(StatusCode::FORBIDDEN, disabled(roles[0])),
                    challenge: None,
                    caller: None,
                });
            }
            let caller = match auth.authenticate(headers, extensions) {
                Ok(caller) => caller,
                Err(e) => {
                    if let Some(not_logged) = STRANGER_LOGS[3].allow() {
                        tracing::warn!(reason = %e, endpoint, not_logged, "credentials refused");
                    }
                    return Err(Denied {
                        error: AppError::new(StatusCode::UNAUTHORIZED, e.to_string()),
                        challenge: Some(true),
                        caller: None,
                    });
                }
            };
            if !roles.iter().any(|r| caller.has(*r)) {
                if caller.is_anonymous() {
                    // Logged as the other refusals are (anonymous tries at model control left
                    // no trace: a review's finding).
                    if let Some(not_logged) = STRANGER_LOGS[4].allow() {
                        tracing::warn!(
                            caller = "anonymous",
                            needs,
                            endpoint,
                            not_logged,
                            "credentials missing"
                        );
                    }
                    return Err(Denied {
                        error: AppError::new(
                            StatusCode::UNAUTHORIZED,
                            format!(
                                "this endpoint needs {needs}: send Authorization: Bearer <API key or token>"
                            ),
                        ),
                        challenge: Some(false),
                        caller: None,
                    });
                }
                tracing::warn!(caller = %caller.id, needs, endpoint, "role missing");
                return Err(Denied {
                    error: AppError::new(
                        StatusCode::FORBIDDEN,
                        format!("{} does not hold {needs} this endpoint needs", caller.id),
                    ),
                    challenge: None,
                    caller: Some(caller.id.clone()),
                });
            }
            Ok(caller)
        }
    }
}

fn disabled(role: Role) -> String {
    match role {
        Role::Admin => "admin is disabled: configure a key ([[auth.api_keys]] with role = \"admin\" in nightingale.toml, or --admin-token / NIGHTINGALE_ADMIN_TOKEN)".to_owned(),
        role => format!(
            "{role} is disabled: configure a key ([[auth.api_keys]] with role = \"{role}\"), [auth.jwt], or auth.anonymous_roles in nightingale.toml"
        ),
    }
}

/// 401 with `WWW-Authenticate: Bearer` (RFC 6750; `error="invalid_token"` when credentials
/// were sent and refused).
fn unauthorized(message: String, invalid: bool) -> Response {
    let mut response = AppError::new(StatusCode::UNAUTHORIZED, message).into_response();
    let challenge = if invalid {
        "Bearer realm=\"nightingale\", error=\"invalid_token\""
    } else {
        "Bearer realm=\"nightingale\""
    };
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Identities that [`printable`] alone would make equal (cut at 200 characters, a
    /// control character shown as `?`) keep distinct ids; a plain one is left as it is.
    #[test]
    fn identities_changed_for_printing_stay_distinct() {
        let long = |tail: &str| format!("{}{tail}", "A".repeat(200));
        assert_ne!(
            identity_text(&long("-attacker")),
            identity_text(&long("-victim"))
        );
        assert_ne!(identity_text("carol?"), identity_text("carol\u{7}"));
        assert_eq!(identity_text("carol?"), "carol?");
        assert_eq!(identity_text("dr-alice"), "dr-alice");
        assert!(!identity_text("carol\u{7}").contains('\u{7}'));
        // A token's (issuer, subject): `#` in either, or no subject, never lands on another
        // pair's id (a re-attack's finding).
        let ids = [
            issuer_subject("cds", "https://a.example", Some("x#y")),
            issuer_subject("cds", "https://a.example#x", Some("y")),
            issuer_subject("cds", "https://a.example", None),
            issuer_subject("cds", "https://a.example", Some("-")),
        ];
        for (i, a) in ids.iter().enumerate() {
            for b in &ids[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(
            issuer_subject("cds", "https://a.example", Some("ehr-client")),
            "cds:https://a.example#ehr-client"
        );
        // A subject written as another's id (its printable text and digest) is not that id.
        let victim = identity_text("x\n");
        assert!(victim.starts_with("x?~"), "{victim}");
        assert_ne!(identity_text(&victim), victim);
        // Invisible and reordering characters are not shown as they are.
        for sneaky in [
            "alice\u{3164}",
            "alice\u{2800}",
            "alice\u{200b}",
            "alice\u{202e}gnp.exe",
            "al\u{2066}ice",
            "\u{feff}alice",
        ] {
            let id = identity_text(sneaky);
            assert!(
                id.starts_with("alice") || id.starts_with("al?") || id.starts_with('?'),
                "{id}"
            );
            assert!(id.is_ascii(), "{id:?}");
            assert_ne!(id, "alice");
        }
        // Letters of any script, quotes and backslashes read as themselves.
        for plain in ["José Müller", "鈴木", "O'Brien \"Dr\"", r"DOMAIN\user"] {
            assert_eq!(identity_text(plain), plain);
        }
    }

    #[test]
    fn every_route_has_one_row_and_the_router_builds() {
        let mut seen = HashSet::new();
        for r in ROUTES {
            assert!(
                seen.insert((r.method, r.path)),
                "{} {} twice",
                r.method,
                r.path
            );
            assert!(
                matches!(r.method, "GET" | "POST" | "DELETE"),
                "{}",
                r.method
            );
        }
        // Builds the real router: a route without a row (or a row without a route) panics.
        let dir = tempfile::tempdir().unwrap();
        let state = crate::http::AppState::new(
            Arc::new(nightingale_models::Repository::new(
                dir.path(),
                Default::default(),
            )),
            crate::audit::AuditLog::open(&dir.path().join("audit.jsonl"), false).unwrap(),
            Default::default(),
            None,
        );
        let _ = crate::http::app(state);
    }

    #[test]
    #[should_panic(expected = "has no row")]
    fn a_route_without_a_row_fails() {
        let _ = Routes::<()>::new().route("/v2/new-thing", axum::routing::get(|| async {}));
    }

    #[test]
    #[should_panic(expected = "no such route")]
    fn a_row_without_a_route_fails() {
        let _ = Routes::<()>::new().finish();
    }

    #[test]
    fn anonymous_defaults_and_the_bind_rule() {
        let local: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:8000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:8000".parse().unwrap();
        let zero = AuthConfig::default();
        assert_eq!(zero.anonymous_roles(), OPEN_ROLES.into());
        assert!(zero.check_bind(local, false).is_ok());
        assert!(zero.check_bind(mapped, false).is_ok());
        let err = zero.check_bind(any, false).unwrap_err();
        assert!(err.to_string().contains("--insecure"), "{err}");
        assert!(zero.check_bind(any, true).is_ok());
        // Admin keys alone protect model control and leave the open roles open.
        let admin_only = AuthConfig {
            api_keys: vec![ApiKey {
                name: "ops".into(),
                roles: [Role::Admin].into(),
                sha256: [1; 32],
            }],
            ..AuthConfig::default()
        };
        assert_eq!(admin_only.anonymous_roles(), OPEN_ROLES.into());
        assert!(admin_only.check_bind(any, false).is_err());
        // A key for anything else: anonymous gets nothing unless the file says so.
        let mut keyed = admin_only.clone();
        keyed.api_keys[0].roles = [Role::Infer].into();
        assert_eq!(keyed.anonymous_roles(), Roles::NONE);
        assert!(keyed.check_bind(any, false).is_ok());
        keyed.anonymous_roles = Some([Role::Metrics].into());
        assert_eq!(keyed.anonymous_roles(), [Role::Metrics].into());
        // Anonymous metrics alone may face the network (Prometheus without a key) ...
        assert!(keyed.check_bind(any, false).is_ok());
        // ... but a key for someone else does not make anonymous inference safe there.
        keyed.anonymous_roles = Some([Role::Infer, Role::Metrics, Role::Pacs].into());
        let err = keyed.check_bind(any, false).unwrap_err();
        assert!(err.to_string().contains("--insecure"), "{err}");
        assert!(keyed.check_bind(any, true).is_ok());
        assert!(keyed.check_bind(local, false).is_ok());
        // Nothing open to anyone: nothing to refuse.
        let closed = AuthConfig {
            anonymous_roles: Some(Roles::NONE),
            ..AuthConfig::default()
        };
        assert!(closed.check_bind(any, false).is_ok());
        // Verified client certificates are a credential.
        let mtls = AuthConfig {
            client_certificates_verified: true,
            ..AuthConfig::default()
        };
        assert_eq!(mtls.anonymous_roles(), Roles::NONE);
        assert!(mtls.check_bind(any, false).is_ok());
    }

    #[test]
    fn api_key_sections_are_checked() {
        let parse = |toml_text: &str| {
            toml::from_str::<AuthSection>(toml_text)
                .map_err(|e| e.to_string())
                .and_then(|s| s.resolve(Path::new(".")).map_err(|e| e.to_string()))
        };
        let digest = "a".repeat(64);
        let ok = parse(&format!(
            "[[api_keys]]\nname = \"ci\"\nrole = \"infer\"\nsha256 = \"{digest}\"\n[[api_keys]]\nname = \"ops\"\nroles = [\"admin\", \"metrics\"]\nsha256 = \"{}\"\n",
            "B".repeat(64)
        ))
        .unwrap();
        assert_eq!(ok.api_keys[0].roles, [Role::Infer].into());
        assert_eq!(ok.api_keys[1].roles, [Role::Admin, Role::Metrics].into());
        assert_eq!(ok.api_keys[1].sha256, [0xbb; 32]);
        for (bad, expect) in [
            (
                format!("[[api_keys]]\nname = \"x\"\nrole = \"root\"\nsha256 = \"{digest}\"\n"),
                "unknown variant",
            ),
            (
                "[[api_keys]]\nname = \"x\"\nrole = \"infer\"\nsha256 = \"abc\"\n".to_owned(),
                "64 hex",
            ),
            (
                format!(
                    "[[api_keys]]\nname = \"x\"\nrole = \"infer\"\nsha256 = \"{}\"\n",
                    "g".repeat(64)
                ),
                "64 hex",
            ),
            (
                format!("[[api_keys]]\nname = \"x\"\nsha256 = \"{digest}\"\n"),
                "no role",
            ),
            (
                format!("[[api_keys]]\nname = \"x y\"\nrole = \"infer\"\nsha256 = \"{digest}\"\n"),
                "must be 1 to 64",
            ),
            (
                format!(
                    "[[api_keys]]\nname = \"x\"\nrole = \"infer\"\nsha256 = \"{digest}\"\n[[api_keys]]\nname = \"x\"\nrole = \"admin\"\nsha256 = \"{}\"\n",
                    "b".repeat(64)
                ),
                "used twice",
            ),
            (
                format!(
                    "[[api_keys]]\nname = \"x\"\nrole = \"infer\"\nsha256 = \"{digest}\"\n[[api_keys]]\nname = \"y\"\nrole = \"admin\"\nsha256 = \"{digest}\"\n"
                ),
                "same key",
            ),
            (
                format!(
                    "[[api_keys]]\nname = \"x\"\nrole = \"infer\"\nroles = [\"admin\"]\nsha256 = \"{digest}\"\n"
                ),
                "both role and roles",
            ),
            (
                format!("[[api_keys]]\nname = \"x\"\nrole = \"infer\"\nsha = \"{digest}\"\n"),
                "unknown field",
            ),
            (
                "anonymous_roles = [\"admin\"]\n".to_owned(),
                "cannot hold admin",
            ),
            (
                "[jwt]\nissuer = \"i\"\naudience = \"a\"\njwks_file = \"/nonexistent/jwks.json\"\n"
                    .to_owned(),
                "cannot read the JWKS file",
            ),
        ] {
            let err = parse(&bad).unwrap_err();
            assert!(err.contains(expect), "{bad}: {err}");
        }
    }

    #[test]
    fn symmetric_and_mismatched_jwks_keys_are_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        let load = |json: &str| {
            std::fs::write(&path, json).unwrap();
            JwtConfig::new(
                "i".into(),
                vec!["a".into()],
                path.clone(),
                "roles".into(),
                30,
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        let err = load(r#"{"keys":[{"kty":"oct","kid":"h","k":"c2VjcmV0"}]}"#).unwrap_err();
        assert!(err.contains("symmetric (HMAC)"), "{err}");
        let err = load(r#"{"keys":[]}"#).unwrap_err();
        assert!(err.contains("no signature key"), "{err}");
        let err = load("not json").unwrap_err();
        assert!(err.contains("not a JSON Web Key Set"), "{err}");
        let err = load(r#"{"keys":[{"kty":"RSA","kid":"r","alg":"ES256","n":"AQAB","e":"AQAB"}]}"#)
            .unwrap_err();
        assert!(err.contains("does not fit its key type"), "{err}");
    }

    #[test]
    fn a_remembered_token_serves_until_its_exp_and_is_verified_again_after() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/auth");
        let tokens: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixtures.join("tokens.json")).unwrap()).unwrap();
        let jwt = Arc::new(
            JwtConfig::new(
                "https://idp.test.invalid/realms/nightingale".into(),
                vec!["nightingale".into()],
                fixtures.join("jwks.json"),
                "roles".into(),
                30,
            )
            .unwrap(),
        );
        let auth = Authenticator::new(
            &AuthConfig {
                jwt: Some(jwt.clone()),
                ..AuthConfig::default()
            },
            None,
        );
        let good = tokens["rs256_infer"]["token"].as_str().unwrap();
        let caller = auth.verify_jwt_cached(&jwt, good).unwrap();
        assert_eq!(caller.roles, [Role::Infer].into());
        let digest: [u8; 32] = Sha256::digest(good.as_bytes()).into();
        // Remembered with the token's own exp (2100-01-01, from make_fixtures.py).
        assert_eq!(auth.jwt_cache.lock().unwrap()[&digest].1, 4102444800);
        assert_eq!(auth.verify_jwt_cached(&jwt, good).unwrap(), caller);
        // An entry past its exp is never served: the token is verified again and refused.
        let expired = tokens["expired"]["token"].as_str().unwrap();
        let digest: [u8; 32] = Sha256::digest(expired.as_bytes()).into();
        auth.jwt_cache.lock().unwrap().insert(
            digest,
            (
                Caller {
                    id: "jwt:stale".into(),
                    roles: [Role::Admin].into(),
                },
                1,
            ),
        );
        assert!(matches!(
            auth.verify_jwt_cached(&jwt, expired),
            Err(JwtError::Expired)
        ));
        assert!(!auth.jwt_cache.lock().unwrap().contains_key(&digest));
    }

    #[test]
    fn credentials_are_read_from_bearer_or_x_api_key() {
        let mut h = HeaderMap::new();
        assert!(presented(&h).unwrap().is_none());
        h.insert(header::AUTHORIZATION, "bearer  abc ".parse().unwrap());
        assert_eq!(presented(&h).unwrap(), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic dXNlcjpwYXNz".parse().unwrap());
        assert!(matches!(presented(&h), Err(AuthError::Scheme)));
        let mut twice = HeaderMap::new();
        twice.append(header::AUTHORIZATION, "Bearer good".parse().unwrap());
        twice.append(header::AUTHORIZATION, "Bearer nope".parse().unwrap());
        assert!(matches!(
            presented(&twice),
            Err(AuthError::Repeated("Authorization"))
        ));
        let mut twice = HeaderMap::new();
        twice.append("x-api-key", "good".parse().unwrap());
        twice.append("x-api-key", "nope".parse().unwrap());
        assert!(matches!(
            presented(&twice),
            Err(AuthError::Repeated("X-API-Key"))
        ));
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "k".parse().unwrap());
        assert_eq!(presented(&h).unwrap(), Some("k"));
        assert!(!looks_like_jwt("a.b"));
        assert!(!looks_like_jwt("plain-api-key"));
        assert!(looks_like_jwt("eyJhbGciOiJub25lIn0.e30."));
    }
}
