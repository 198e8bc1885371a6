//! The JWT an EHR sends with every CDS Hooks call (`Authorization: Bearer <JWT>`), checked as
//! the CDS Hooks 2.0 specification asks (<https://cds-hooks.hl7.org/2.0/#trusting-cds-clients>).
//!
//! A token is accepted only when all of these hold:
//! - it is at most [`JwtOptions::max_token_bytes`] long (16 KiB by default);
//! - its `alg` is asymmetric: ES256, ES384, RS256, RS384, RS512, PS256, PS384, PS512
//!   (`none` and the HMAC algorithms are refused before any key is looked at: an HMAC
//!   "verified" with a public key would let anyone who has the public key forge tokens);
//! - it has no `crit` header, and a `jku` header only if that URL is in
//!   [`JwtOptions::allowed_jku`] (empty by default) or is the very URL the issuer's JWKS is
//!   configured to come from ([`Verifier::trust_url`]); keys are never fetched from a `jku`
//!   the token names: they always come from the issuer's configured JWKS (a file, or a URL
//!   the server refreshes them from, [`Verifier::refresh`]);
//! - its `iss` is a trusted issuer ([`Verifier::trust`]) and its `kid` names a signing key
//!   of that issuer's JWKS that fits the algorithm; the signature verifies
//!   (`jsonwebtoken`, aws-lc-rs);
//! - `aud` is the service's URL as called;
//! - `exp` and `iat` are present; `exp` is not past and `iat` and `nbf` (when present) not
//!   in the future, each with [`JwtOptions::leeway`] (60 s by default); `exp − iat` is at
//!   most [`JwtOptions::max_lifetime`] (the specification recommends five minutes);
//! - `jti` is present and has not been seen from this issuer before the token expires. The
//!   replay cache holds [`JwtOptions::max_replay_entries`] tokens of each issuer; entries
//!   leave it when their token expires; when an issuer's share is full of live tokens a new
//!   one of that issuer is refused, never a remembered one forgotten (one share for all let
//!   one trusted EHR lock every other out: a red-team finding).
//!
//! Every refusal is a [`JwtError`] whose message is safe to log (header values it quotes are
//! cut to 64 printable ASCII characters; no claim other than `iss` is quoted).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

/// Options of a [`Verifier`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtOptions {
    /// The longest token accepted, in bytes (default 16 KiB).
    pub max_token_bytes: usize,
    /// Clock skew allowed on `exp`, `iat`, `nbf`, in seconds (default 60).
    pub leeway: u64,
    /// The longest `exp − iat` accepted, in seconds (default 3600).
    pub max_lifetime: u64,
    /// `jku` URLs tolerated in a header (default none: a token with `jku` is refused).
    pub allowed_jku: Vec<String>,
    /// How many unexpired `jti` of each issuer the replay cache holds (default 100,000).
    pub max_replay_entries: usize,
}

impl Default for JwtOptions {
    fn default() -> Self {
        JwtOptions {
            max_token_bytes: 16 * 1024,
            leeway: 60,
            max_lifetime: 3600,
            allowed_jku: vec![],
            max_replay_entries: 100_000,
        }
    }
}

/// Why a token was refused. The message is safe to log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    #[error("no Authorization header")]
    MissingHeader,
    #[error("the Authorization header is not \"Bearer <token>\"")]
    Scheme,
    #[error("the token is {size} bytes, over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("the token is not a compact JWS")]
    Malformed,
    #[error("algorithm {alg:?} is not accepted (asymmetric algorithms only)")]
    Algorithm { alg: String },
    #[error("the token has a \"crit\" header")]
    Critical,
    #[error("the token's jku {jku:?} is not allow-listed")]
    Jku { jku: String },
    #[error("issuer {iss:?} is not trusted")]
    UntrustedIssuer { iss: String },
    #[error("the token has no kid")]
    NoKid,
    #[error("kid {kid:?} is not a key of the issuer's JWKS")]
    UnknownKid { kid: String },
    #[error("key {kid:?} does not verify {alg:?}")]
    KeyMismatch { kid: String, alg: Algorithm },
    #[error("the signature does not verify")]
    Signature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf in the future)")]
    NotYetValid,
    #[error("the token was issued in the future (iat)")]
    IssuedInFuture,
    #[error("the token's lifetime (exp - iat) is over {limit} s")]
    LifetimeTooLong { limit: u64 },
    #[error("the audience is not this service's URL")]
    Audience,
    #[error("the claim {claim} is missing")]
    MissingClaim { claim: &'static str },
    #[error("the claim {claim} has the wrong type")]
    ClaimType { claim: &'static str },
    #[error("the token's jti was already used")]
    Replayed,
    #[error("the replay cache is full of this issuer's unexpired tokens")]
    ReplayCacheFull,
    #[error("rejected by the JWT library ({kind})")]
    Other { kind: String },
}

/// Why a JWKS could not be trusted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwksError {
    #[error("cannot read the JWKS {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the JWKS {path} is over {limit} bytes")]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("the JWKS of {issuer:?} is not a JWK Set")]
    Parse {
        issuer: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the JWKS of {issuer:?}, key {key}: {reason}")]
    Key {
        issuer: String,
        key: String,
        reason: &'static str,
    },
    #[error("the JWKS of {issuer:?} has no key that can verify a token (ignored: {ignored})")]
    Empty { issuer: String, ignored: String },
    #[error("issuer {issuer:?} is empty or trusted twice")]
    Issuer { issuer: String },
}

/// The largest JWKS file read.
pub const MAX_JWKS_BYTES: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    P256,
    P384,
}

impl KeyKind {
    fn verifies(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            KeyKind::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            KeyKind::P256 => alg == ES256,
            KeyKind::P384 => alg == ES384,
        }
    }
}

#[derive(Clone)]
struct Key {
    kid: String,
    alg: Option<Algorithm>,
    kind: KeyKind,
    key: DecodingKey,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

fn key_kind(jwk: &Jwk) -> Result<KeyKind, &'static str> {
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Ok(KeyKind::Rsa),
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => Ok(KeyKind::P256),
            EllipticCurve::P384 => Ok(KeyKind::P384),
            _ => Err("unsupported elliptic curve (P-256 and P-384 only)"),
        },
        AlgorithmParameters::OctetKey(_) => {
            Err("a symmetric (HMAC) key: only asymmetric keys are accepted")
        }
        _ => Err("unsupported key type (RSA or EC only)"),
    }
}

/// Who sent a verified token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// `iss`: the EHR.
    pub issuer: String,
    /// `sub`, when present (the EHR's client id).
    pub subject: Option<String>,
    /// The `kid` of the key that verified it.
    pub kid: String,
    pub algorithm: Algorithm,
    /// `exp`, seconds since the epoch.
    pub expires_at: u64,
}

#[derive(Debug, Default)]
struct ReplayCache {
    seen: HashSet<(String, String)>,
    by_expiry: BTreeSet<(u64, String, String)>,
    /// Entries of each issuer in `seen`.
    per_issuer: HashMap<String, usize>,
}

/// Verifies CDS Hooks JWTs against trusted issuers' JWKS. `Send + Sync`: share one.
#[derive(Debug)]
pub struct Verifier {
    options: JwtOptions,
    /// Each trusted issuer's signing keys (replaced whole by [`Verifier::refresh`]).
    issuers: RwLock<HashMap<String, Vec<Key>>>,
    /// Issuers whose JWKS comes from a URL: that URL (a `jku` equal to it is accepted).
    urls: HashMap<String, String>,
    replay: Mutex<ReplayCache>,
}

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    kid: Option<String>,
    jku: Option<String>,
    crit: Option<Value>,
}

fn printable(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(64)
        .collect()
}

fn algorithm(name: &str) -> Option<Algorithm> {
    use Algorithm::*;
    Some(match name {
        "RS256" => RS256,
        "RS384" => RS384,
        "RS512" => RS512,
        "PS256" => PS256,
        "PS384" => PS384,
        "PS512" => PS512,
        "ES256" => ES256,
        "ES384" => ES384,
        _ => return None,
    })
}

/// A JWK Set read key by key: a key this server cannot read as a JWK (a `kty` it does not
/// know) is ignored, not an error for the whole set (RFC 7517, 5).
#[derive(Deserialize)]
struct RawJwkSet {
    keys: Vec<Value>,
}

/// The keys of the JWKS `bytes`, each read on its own.
fn read_set(issuer: &str, bytes: &[u8]) -> Result<Vec<Result<Jwk, String>>, JwksError> {
    let raw: RawJwkSet = serde_json::from_slice(bytes).map_err(|source| JwksError::Parse {
        issuer: issuer.to_owned(),
        source,
    })?;
    Ok(raw
        .keys
        .into_iter()
        .map(|key| serde_json::from_value::<Jwk>(key).map_err(|e| e.to_string()))
        .collect())
}

/// The signature keys of a JWKS. Keys that cannot verify a CDS Hooks token are ignored, as
/// RFC 7517 (5) asks of a JWK Set's keys a reader does not understand or support, each
/// named in a warning: encryption keys, keys of another type or curve (Ed25519, P-521, an
/// HMAC secret), without a `kid`, with an `alg` that is not a signature algorithm or does not
/// fit the key, or whose `kid` is shared with another key (which one a token means cannot be
/// told). One such key failed the whole set: an EHR publishing an Ed25519 key beside its new
/// ES384 key was locked out after a rotation, while its withdrawn key stayed trusted (a
/// review's finding). A set with no usable key is an error.
fn parse_keys(issuer: &str, jwks: &[Result<Jwk, String>]) -> Result<Vec<Key>, JwksError> {
    let mut keys: Vec<Key> = vec![];
    let mut ignored: Vec<(String, &'static str)> = vec![];
    let mut kids: HashMap<String, usize> = HashMap::new();
    for (index, jwk) in jwks.iter().enumerate() {
        let jwk = match jwk {
            Ok(jwk) => jwk,
            Err(_) => {
                ignored.push((
                    format!("#{index}"),
                    "not a JWK this server can read (its kty?)",
                ));
                continue;
            }
        };
        let name = jwk
            .common
            .key_id
            .clone()
            .unwrap_or_else(|| format!("#{index}"));
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let Some(kid) = jwk.common.key_id.clone() else {
            ignored.push((name, "it has no kid (CDS Hooks tokens name their key)"));
            continue;
        };
        let kind = match key_kind(jwk) {
            Ok(kind) => kind,
            Err(reason) => {
                ignored.push((name, reason));
                continue;
            }
        };
        let alg = match jwk.common.key_algorithm {
            None => None,
            Some(a) => match Algorithm::try_from(a) {
                Err(_) => {
                    ignored.push((name, "its alg is not a signature algorithm"));
                    continue;
                }
                Ok(alg) if !kind.verifies(alg) => {
                    ignored.push((name, "its alg does not fit its key type"));
                    continue;
                }
                Ok(alg) => Some(alg),
            },
        };
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            ignored.push((name, "its key material is invalid"));
            continue;
        };
        // Only keys that can verify count for a shared kid: RFC 7517 (4.5) lets keys of
        // other types share one, and an Ed25519 key sharing the new ES384 key's kid had both
        // ignored, locking the EHR out (a re-attack's finding).
        *kids.entry(kid.clone()).or_default() += 1;
        keys.push(Key {
            kid,
            alg,
            kind,
            key,
        });
    }
    keys.retain(|k| {
        let shared = kids.get(&k.kid).is_some_and(|n| *n > 1);
        if shared {
            ignored.push((k.kid.clone(), "its kid is another key's too"));
        }
        !shared
    });
    // One line for the set, naming the first few (a 1 MiB set of unusable keys made 24,000
    // lines a fetch, and a token with an unknown kid makes a fetch every 30 s).
    if !ignored.is_empty() {
        let named: Vec<String> = ignored
            .iter()
            .take(8)
            .map(|(key, reason)| format!("{}: {reason}", printable(key)))
            .collect();
        tracing::warn!(
            issuer = %printable(issuer),
            ignored = ignored.len(),
            keys = %named.join("; "),
            "JWKS keys that cannot verify a token ignored"
        );
    }
    if keys.is_empty() {
        let mut named: Vec<String> = ignored
            .iter()
            .take(8)
            .map(|(key, reason)| format!("{}: {reason}", printable(key)))
            .collect();
        if ignored.len() > 8 {
            named.push(format!("and {} more", ignored.len() - 8));
        }
        return Err(JwksError::Empty {
            issuer: issuer.to_owned(),
            ignored: named.join("; "),
        });
    }
    Ok(keys)
}

fn number_claim(claims: &Value, claim: &'static str) -> Result<Option<u64>, JwtError> {
    match claims.get(claim) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            .map(Some)
            .ok_or(JwtError::ClaimType { claim }),
    }
}

impl Verifier {
    /// A verifier that trusts no issuer yet (every token is refused until
    /// [`Verifier::trust`]).
    pub fn new(options: JwtOptions) -> Verifier {
        Verifier {
            options,
            issuers: RwLock::new(HashMap::new()),
            urls: HashMap::new(),
            replay: Mutex::new(ReplayCache::default()),
        }
    }

    /// Whether any issuer is trusted.
    pub fn has_issuers(&self) -> bool {
        !self.read_issuers().is_empty() || !self.urls.is_empty()
    }

    fn read_issuers(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Vec<Key>>> {
        self.issuers.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Trusts `issuer` with the JWKS at `url`, which has no keys until the caller fetches it
    /// and hands it to [`Verifier::refresh`] (tokens are refused as naming an unknown key
    /// until then). A token's `jku` equal to `url` is accepted.
    pub fn trust_url(&mut self, issuer: &str, url: &str) -> Result<(), JwksError> {
        if issuer.is_empty()
            || self.read_issuers().contains_key(issuer)
            || self.urls.contains_key(issuer)
        {
            return Err(JwksError::Issuer {
                issuer: issuer.to_owned(),
            });
        }
        self.urls.insert(issuer.to_owned(), url.to_owned());
        Ok(())
    }

    /// The issuers whose JWKS comes from a URL, with the URL.
    pub fn urls(&self) -> impl Iterator<Item = (&str, &str)> {
        self.urls.iter().map(|(i, u)| (i.as_str(), u.as_str()))
    }

    /// Replaces the keys of `issuer` (trusted by [`Verifier::trust_url`]) with those of the
    /// JWKS `bytes` (at most [`MAX_JWKS_BYTES`]); on any error the keys it had stay.
    pub fn refresh(&self, issuer: &str, bytes: &[u8]) -> Result<usize, JwksError> {
        let Some(url) = self.urls.get(issuer) else {
            return Err(JwksError::Issuer {
                issuer: issuer.to_owned(),
            });
        };
        if bytes.len() as u64 > MAX_JWKS_BYTES {
            return Err(JwksError::TooLarge {
                path: PathBuf::from(url),
                limit: MAX_JWKS_BYTES,
            });
        }
        let keys = parse_keys(issuer, &read_set(issuer, bytes)?)?;
        let n = keys.len();
        self.issuers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(issuer.to_owned(), keys);
        Ok(n)
    }

    /// Trusts `issuer` with the signature keys of `jwks` (keys that cannot verify a token are
    /// ignored: see `parse_keys`; a set without any usable key is an error).
    pub fn trust(&mut self, issuer: &str, jwks: &JwkSet) -> Result<(), JwksError> {
        let keys: Vec<Result<Jwk, String>> = jwks.keys.iter().cloned().map(Ok).collect();
        self.trust_keys(issuer, &keys)
    }

    fn trust_keys(&mut self, issuer: &str, jwks: &[Result<Jwk, String>]) -> Result<(), JwksError> {
        if issuer.is_empty()
            || self.read_issuers().contains_key(issuer)
            || self.urls.contains_key(issuer)
        {
            return Err(JwksError::Issuer {
                issuer: issuer.to_owned(),
            });
        }
        let keys = parse_keys(issuer, jwks)?;
        self.issuers
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .insert(issuer.to_owned(), keys);
        Ok(())
    }

    /// Trusts `issuer` with the JWKS in the file `path` (at most [`MAX_JWKS_BYTES`]).
    pub fn trust_file(&mut self, issuer: &str, path: &Path) -> Result<(), JwksError> {
        use std::io::Read;
        let read = |source| JwksError::Read {
            path: path.to_owned(),
            source,
        };
        // A regular file only: opening a FIFO blocked the start for ever (a re-attack's
        // finding); a device is cut by the size cap below.
        if !std::fs::metadata(path).map_err(read)?.is_file() {
            return Err(read(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
        let file = std::fs::File::open(path).map_err(read)?;
        let mut text = vec![];
        file.take(MAX_JWKS_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(|source| JwksError::Read {
                path: path.to_owned(),
                source,
            })?;
        if text.len() as u64 > MAX_JWKS_BYTES {
            return Err(JwksError::TooLarge {
                path: path.to_owned(),
                limit: MAX_JWKS_BYTES,
            });
        }
        let keys = read_set(issuer, &text)?;
        self.trust_keys(issuer, &keys)
    }

    /// Verifies the value of an `Authorization` header (`Bearer <JWT>`), for the service
    /// at `audience` (its URL as called), at `now` (seconds since the epoch).
    pub fn verify_header(
        &self,
        authorization: Option<&str>,
        audience: &str,
        now: u64,
    ) -> Result<Verified, JwtError> {
        self.verify_header_for(authorization, &[audience], now)
    }

    /// [`Verifier::verify_header`] for a token whose `aud` may name any of `audiences`
    /// (a feedback endpoint's token may name the service's URL or the endpoint's own).
    pub fn verify_header_for(
        &self,
        authorization: Option<&str>,
        audiences: &[&str],
        now: u64,
    ) -> Result<Verified, JwtError> {
        let value = authorization.ok_or(JwtError::MissingHeader)?.trim();
        let (scheme, token) = value.split_once(' ').ok_or(JwtError::Scheme)?;
        if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
            return Err(JwtError::Scheme);
        }
        self.verify_for(token.trim(), audiences, now)
    }

    /// Verifies a token for the service at `audience`, at `now` (seconds since the epoch);
    /// records its `jti` when it is accepted.
    pub fn verify(&self, token: &str, audience: &str, now: u64) -> Result<Verified, JwtError> {
        self.verify_for(token, &[audience], now)
    }

    /// [`Verifier::verify`] for a token whose `aud` may name any of `audiences`.
    pub fn verify_for(
        &self,
        token: &str,
        audiences: &[&str],
        now: u64,
    ) -> Result<Verified, JwtError> {
        let o = &self.options;
        if token.len() > o.max_token_bytes {
            return Err(JwtError::TooLarge {
                size: token.len(),
                limit: o.max_token_bytes,
            });
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let header: RawHeader = URL_SAFE_NO_PAD
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(JwtError::Malformed)?;
        let alg = algorithm(&header.alg).ok_or_else(|| JwtError::Algorithm {
            alg: printable(&header.alg),
        })?;
        if header.crit.is_some() {
            return Err(JwtError::Critical);
        }
        // The issuer picks the keys, so it is read before the signature is checked; it is
        // checked again, verified, by the library below.
        let unverified: Value = URL_SAFE_NO_PAD
            .decode(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(JwtError::Malformed)?;
        let iss = match unverified.get("iss") {
            None => return Err(JwtError::MissingClaim { claim: "iss" }),
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err(JwtError::ClaimType { claim: "iss" }),
        };
        if let Some(jku) = &header.jku
            && !o.allowed_jku.iter().any(|a| a == jku)
            && self.urls.get(iss) != Some(jku)
        {
            return Err(JwtError::Jku {
                jku: printable(jku),
            });
        }
        let issuers = self.read_issuers();
        let keys: &[Key] = match issuers.get(iss) {
            Some(keys) => keys,
            // Trusted by URL, its JWKS not fetched yet.
            None if self.urls.contains_key(iss) => &[],
            None => {
                return Err(JwtError::UntrustedIssuer {
                    iss: printable(iss),
                });
            }
        };
        let kid = header.kid.as_deref().ok_or(JwtError::NoKid)?;
        let key = keys
            .iter()
            .find(|k| k.kid == kid)
            .ok_or_else(|| JwtError::UnknownKid {
                kid: printable(kid),
            })?;
        if !key.kind.verifies(alg) || key.alg.is_some_and(|a| a != alg) {
            return Err(JwtError::KeyMismatch {
                kid: printable(kid),
                alg,
            });
        }
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[iss]);
        validation.set_audience(audiences);
        validation.set_required_spec_claims(&["iss", "aud", "exp"]);
        // Times are checked below against the caller's clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        let data = jsonwebtoken::decode::<Value>(token, &key.key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.into_kind() {
                K::InvalidSignature => JwtError::Signature,
                K::InvalidIssuer => JwtError::UntrustedIssuer {
                    iss: printable(iss),
                },
                K::InvalidAudience => JwtError::Audience,
                K::MissingRequiredClaim(c) => match c.as_str() {
                    "aud" => JwtError::MissingClaim { claim: "aud" },
                    "exp" => JwtError::MissingClaim { claim: "exp" },
                    _ => JwtError::MissingClaim { claim: "iss" },
                },
                K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => JwtError::Malformed,
                other => JwtError::Other {
                    kind: printable(&format!("{other:?}")),
                },
            }
        })?;
        let claims = data.claims;
        let exp = number_claim(&claims, "exp")?.ok_or(JwtError::MissingClaim { claim: "exp" })?;
        let iat = number_claim(&claims, "iat")?.ok_or(JwtError::MissingClaim { claim: "iat" })?;
        let nbf = number_claim(&claims, "nbf")?;
        if exp.saturating_add(o.leeway) < now {
            return Err(JwtError::Expired);
        }
        if iat > now.saturating_add(o.leeway) {
            return Err(JwtError::IssuedInFuture);
        }
        if nbf.is_some_and(|n| n > now.saturating_add(o.leeway)) {
            return Err(JwtError::NotYetValid);
        }
        if exp.saturating_sub(iat) > o.max_lifetime {
            return Err(JwtError::LifetimeTooLong {
                limit: o.max_lifetime,
            });
        }
        let jti = match claims.get("jti") {
            None | Some(Value::Null) => return Err(JwtError::MissingClaim { claim: "jti" }),
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => s.clone(),
            Some(_) => return Err(JwtError::ClaimType { claim: "jti" }),
        };
        let subject = claims.get("sub").and_then(Value::as_str).map(str::to_owned);
        self.remember(iss, &jti, exp, now)?;
        Ok(Verified {
            issuer: iss.to_owned(),
            subject,
            kid: kid.to_owned(),
            algorithm: alg,
            expires_at: exp,
        })
    }

    /// Records `jti` of `iss` until `exp` (+ leeway); refuses a replay, and refuses a new
    /// token when the cache is full of unexpired ones.
    fn remember(&self, iss: &str, jti: &str, exp: u64, now: u64) -> Result<(), JwtError> {
        let mut cache = self.replay.lock().unwrap_or_else(|e| e.into_inner());
        let leeway = self.options.leeway;
        while let Some(first) = cache.by_expiry.first() {
            if first.0.saturating_add(leeway) >= now {
                break;
            }
            if let Some((_, i, j)) = cache.by_expiry.pop_first() {
                if let Some(n) = cache.per_issuer.get_mut(&i) {
                    *n -= 1;
                    if *n == 0 {
                        cache.per_issuer.remove(&i);
                    }
                }
                cache.seen.remove(&(i, j));
            }
        }
        let key = (iss.to_owned(), jti.to_owned());
        if cache.seen.contains(&key) {
            return Err(JwtError::Replayed);
        }
        if cache.per_issuer.get(iss).copied().unwrap_or(0) >= self.options.max_replay_entries {
            return Err(JwtError::ReplayCacheFull);
        }
        cache.by_expiry.insert((exp, key.0.clone(), key.1.clone()));
        *cache.per_issuer.entry(key.0.clone()).or_insert(0) += 1;
        cache.seen.insert(key);
        Ok(())
    }
}
