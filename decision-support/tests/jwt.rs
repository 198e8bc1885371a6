//! CDS Hooks JWTs signed with real ES384 and RS384 keys made by the `openssl` CLI in a
//! temporary directory; the JWKS is derived from them. Every bad token is refused with its
//! reason; valid ES384 and RS384 tokens are accepted once.

use std::path::Path;
use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use nightingale_decision_support::jwt::{JwtError, JwtOptions, Verifier};
use serde_json::{Value, json};

const ISS: &str = "https://ehr.example.org";
const AUD: &str = "http://127.0.0.1:8080/cds-services/nightingale-news2";
const NOW: u64 = 1_714_564_800; // 2024-05-01T12:00:00Z

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl CLI runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Keys {
    ec: EncodingKey,
    rsa: EncodingKey,
    rsa_public_pem: Vec<u8>,
    jwks: JwkSet,
    _dir: tempfile::TempDir,
}

fn keys() -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
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
        d,
        &[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            "ec.pem",
            "-outform",
            "DER",
            "-out",
            "ec.p8.der",
        ],
    );
    openssl(
        d,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "rsa.pem",
        ],
    );
    openssl(
        d,
        &[
            "rsa",
            "-in",
            "rsa.pem",
            "-traditional",
            "-outform",
            "DER",
            "-out",
            "rsa.der",
        ],
    );
    openssl(
        d,
        &["rsa", "-in", "rsa.pem", "-pubout", "-out", "rsa.pub.pem"],
    );
    let ec = EncodingKey::from_ec_der(&std::fs::read(d.join("ec.p8.der")).unwrap());
    let rsa = EncodingKey::from_rsa_der(&std::fs::read(d.join("rsa.der")).unwrap());
    let mut ec_jwk = Jwk::from_encoding_key(&ec, Algorithm::ES384).unwrap();
    ec_jwk.common.key_id = Some("ec-1".into());
    let mut rsa_jwk = Jwk::from_encoding_key(&rsa, Algorithm::RS384).unwrap();
    rsa_jwk.common.key_id = Some("rsa-1".into());
    rsa_jwk.common.key_algorithm = Some(KeyAlgorithm::RS384);
    Keys {
        ec,
        rsa,
        rsa_public_pem: std::fs::read(d.join("rsa.pub.pem")).unwrap(),
        jwks: JwkSet {
            keys: vec![ec_jwk, rsa_jwk],
        },
        _dir: dir,
    }
}

fn claims(jti: &str) -> Value {
    json!({"iss": ISS, "sub": "ehr-client", "aud": AUD, "exp": NOW + 300, "iat": NOW, "jti": jti})
}

fn sign(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

fn verifier(k: &Keys, options: JwtOptions) -> Verifier {
    let mut v = Verifier::new(options);
    v.trust(ISS, &k.jwks).unwrap();
    v
}

#[test]
fn tokens() {
    let k = keys();
    let v = verifier(&k, JwtOptions::default());

    // Valid ES384 and RS384: accepted.
    let es = sign(Algorithm::ES384, "ec-1", &k.ec, &claims("a"));
    let ok = v.verify(&es, AUD, NOW).unwrap();
    assert_eq!(ok.issuer, ISS);
    assert_eq!(ok.kid, "ec-1");
    assert_eq!(ok.algorithm, Algorithm::ES384);
    let rs = sign(Algorithm::RS384, "rsa-1", &k.rsa, &claims("b"));
    assert_eq!(
        v.verify_header(Some(&format!("Bearer {rs}")), AUD, NOW)
            .unwrap()
            .algorithm,
        Algorithm::RS384
    );

    // Replayed jti.
    assert_eq!(v.verify(&es, AUD, NOW + 1), Err(JwtError::Replayed));

    let refused = |token: &str| v.verify(token, AUD, NOW).unwrap_err();

    // Expired (beyond the 60 s leeway).
    let mut c = claims("c");
    c["exp"] = json!(NOW - 61);
    c["iat"] = json!(NOW - 361);
    assert_eq!(
        refused(&sign(Algorithm::ES384, "ec-1", &k.ec, &c)),
        JwtError::Expired
    );
    // Not yet valid: iat, or nbf, in the future.
    let mut c = claims("d");
    c["iat"] = json!(NOW + 120);
    c["exp"] = json!(NOW + 300);
    assert_eq!(
        refused(&sign(Algorithm::ES384, "ec-1", &k.ec, &c)),
        JwtError::IssuedInFuture
    );
    let mut c = claims("e");
    c["nbf"] = json!(NOW + 120);
    assert_eq!(
        refused(&sign(Algorithm::ES384, "ec-1", &k.ec, &c)),
        JwtError::NotYetValid
    );
    // Wrong audience.
    let mut c = claims("f");
    c["aud"] = json!("http://127.0.0.1:8080/cds-services/other");
    assert_eq!(
        refused(&sign(Algorithm::ES384, "ec-1", &k.ec, &c)),
        JwtError::Audience
    );
    // Unknown issuer.
    let mut c = claims("g");
    c["iss"] = json!("https://rogue.example.org");
    assert!(matches!(
        refused(&sign(Algorithm::ES384, "ec-1", &k.ec, &c)),
        JwtError::UntrustedIssuer { .. }
    ));
    // Unknown kid.
    assert!(matches!(
        refused(&sign(Algorithm::ES384, "ec-2", &k.ec, &claims("h"))),
        JwtError::UnknownKid { .. }
    ));
    // A kid whose key does not fit the algorithm (the RSA key named for ES384).
    assert!(matches!(
        refused(&sign(Algorithm::ES384, "rsa-1", &k.ec, &claims("i"))),
        JwtError::KeyMismatch { .. }
    ));
    // HS256 "signed" with the RSA public key as the HMAC secret.
    let hs = sign(
        Algorithm::HS256,
        "rsa-1",
        &EncodingKey::from_secret(&k.rsa_public_pem).unwrap(),
        &claims("j"),
    );
    assert_eq!(
        refused(&hs),
        JwtError::Algorithm {
            alg: "HS256".into()
        }
    );
    // alg none.
    let head = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","kid":"ec-1","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims("k").to_string());
    assert_eq!(
        refused(&format!("{head}.{body}.")),
        JwtError::Algorithm { alg: "none".into() }
    );
    // Oversized token.
    let mut c = claims("l");
    c["padding"] = json!("x".repeat(20_000));
    assert!(matches!(
        refused(&sign(Algorithm::ES384, "ec-1", &k.ec, &c)),
        JwtError::TooLarge { limit: 16384, .. }
    ));
    // Missing jti, iat, exp.
    for claim in ["jti", "iat", "exp"] {
        let mut c = claims("m");
        c.as_object_mut().unwrap().remove(claim);
        assert!(
            matches!(
                refused(&sign(Algorithm::ES384, "ec-1", &k.ec, &c)),
                JwtError::MissingClaim { .. }
            ),
            "{claim}"
        );
    }
    // A bad signature: the ES384 token's signature from another token.
    let other = sign(Algorithm::ES384, "ec-1", &k.ec, &claims("n"));
    let mut forged: Vec<&str> = es.split('.').collect();
    let mut c = claims("o");
    c["sub"] = json!("someone-else");
    let body = URL_SAFE_NO_PAD.encode(c.to_string());
    forged[1] = &body;
    forged[2] = other.rsplit('.').next().unwrap();
    assert_eq!(refused(&forged.join(".")), JwtError::Signature);
    // jku not allow-listed.
    let mut h = Header::new(Algorithm::ES384);
    h.kid = Some("ec-1".into());
    h.jku = Some("https://rogue.example.org/jwks".into());
    let t = jsonwebtoken::encode(&h, &claims("p"), &k.ec).unwrap();
    assert!(matches!(refused(&t), JwtError::Jku { .. }));
    // A lifetime over the limit.
    let mut c = claims("q");
    c["exp"] = json!(NOW + 7200);
    assert!(matches!(
        refused(&sign(Algorithm::ES384, "ec-1", &k.ec, &c)),
        JwtError::LifetimeTooLong { .. }
    ));
    // Headers.
    assert_eq!(
        v.verify_header(None, AUD, NOW),
        Err(JwtError::MissingHeader)
    );
    assert_eq!(
        v.verify_header(Some("Basic abc"), AUD, NOW),
        Err(JwtError::Scheme)
    );
    assert_eq!(refused("not.a.jwt"), JwtError::Malformed);
}

#[test]
fn replay_cache_is_bounded_and_forgets_only_expired_tokens() {
    let k = keys();
    let mut v = verifier(
        &k,
        JwtOptions {
            max_replay_entries: 2,
            ..JwtOptions::default()
        },
    );
    const OTHER: &str = "https://other-ehr.example.org";
    v.trust(OTHER, &k.jwks).unwrap();
    let t = |jti: &str| sign(Algorithm::ES384, "ec-1", &k.ec, &claims(jti));
    v.verify(&t("1"), AUD, NOW).unwrap();
    v.verify(&t("2"), AUD, NOW).unwrap();
    // Full of live tokens: a new one is refused, the old ones are still remembered.
    assert_eq!(v.verify(&t("3"), AUD, NOW), Err(JwtError::ReplayCacheFull));
    assert_eq!(v.verify(&t("1"), AUD, NOW), Err(JwtError::Replayed));
    // Per issuer: another EHR's tokens still pass (one share for all let one trusted EHR
    // lock every other out: a red-team finding), up to their own share.
    let other = |jti: &str| {
        let mut c = claims(jti);
        c["iss"] = json!(OTHER);
        sign(Algorithm::ES384, "ec-1", &k.ec, &c)
    };
    v.verify(&other("1"), AUD, NOW).unwrap();
    v.verify(&other("2"), AUD, NOW).unwrap();
    assert_eq!(
        v.verify(&other("3"), AUD, NOW),
        Err(JwtError::ReplayCacheFull)
    );
    // Once they expire (exp + leeway), room is made — and the expired tokens themselves are
    // refused as expired, not replayed.
    let later = NOW + 300 + 61;
    let mut c = claims("3");
    c["iat"] = json!(later);
    c["exp"] = json!(later + 300);
    v.verify(&sign(Algorithm::ES384, "ec-1", &k.ec, &c), AUD, later)
        .unwrap();
    assert_eq!(v.verify(&t("1"), AUD, later), Err(JwtError::Expired));
}

#[test]
fn jwks_files_and_untrustworthy_keys() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ehr.jwks.json");
    std::fs::write(&path, serde_json::to_vec(&k.jwks).unwrap()).unwrap();
    let mut v = Verifier::new(JwtOptions::default());
    assert!(!v.has_issuers());
    v.trust_file(ISS, &path).unwrap();
    assert!(v.has_issuers());
    let t = sign(Algorithm::RS384, "rsa-1", &k.rsa, &claims("x"));
    v.verify(&t, AUD, NOW).unwrap();
    // Trusting the same issuer twice is a configuration error.
    assert!(v.trust_file(ISS, &path).is_err());
    // An HMAC key in a JWKS is refused.
    let hmac: JwkSet = serde_json::from_value(json!({"keys": [
        {"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]}))
    .unwrap();
    assert!(
        Verifier::new(JwtOptions::default())
            .trust(ISS, &hmac)
            .is_err()
    );
    // No verifier without issuers accepts anything.
    let empty = Verifier::new(JwtOptions::default());
    assert!(matches!(
        empty.verify(&t, AUD, NOW),
        Err(JwtError::UntrustedIssuer { .. })
    ));
}

/// Keys of a JWK Set that cannot verify a CDS Hooks token are ignored (RFC 7517, 5), not a
/// reason to refuse the whole set: an EHR that publishes an Ed25519 or P-521 key, an
/// encryption key without `use`, a key of a `kty` no library knows, beside its signing keys,
/// is still trusted for those (a review's finding: it was locked out after a rotation).
#[test]
fn keys_that_cannot_verify_a_token_are_ignored_not_the_whole_set() {
    let k = keys();
    let mut set = serde_json::to_value(&k.jwks).unwrap();
    let extra = [
        json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed-1",
               "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}),
        json!({"kty": "EC", "crv": "P-521", "kid": "ec-521",
               "x": "AekpBQ8ST8a8VcfVOTNl353vSrDCLLJXmPk06wTjxrrjcBpXp5EOnYG_NjFZ6OvLFV1jSfS9tsz4qUxcWceqwQGk",
               "y": "ADSmRA43Z1DSNx_RvcLI87cdL07l6jQyyBXMoxVg_l2Th-x3S1WDhjDly79ajL4Kkd0AZMaZmh9ubmf63e3kyMj2"}),
        json!({"kty": "oct", "kid": "h", "k": "c2VjcmV0"}),
        json!({"kty": "RSA", "kid": "rsa-enc", "alg": "RSA-OAEP",
               "n": set["keys"][1]["n"], "e": "AQAB"}),
        json!({"kty": "PQC", "kid": "future-1", "pub": "AAAA"}),
        json!({"kty": "RSA", "n": set["keys"][1]["n"], "e": "AQAB"}),
    ];
    set["keys"].as_array_mut().unwrap().extend(extra);
    let bytes = serde_json::to_vec(&set).unwrap();

    // From a file at start-up.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ehr.jwks.json");
    std::fs::write(&path, &bytes).unwrap();
    let mut v = Verifier::new(JwtOptions::default());
    v.trust_file(ISS, &path).unwrap();
    let t = sign(Algorithm::ES384, "ec-1", &k.ec, &claims("a"));
    v.verify(&t, AUD, NOW).unwrap();
    let t = sign(Algorithm::RS384, "rsa-1", &k.rsa, &claims("b"));
    v.verify(&t, AUD, NOW).unwrap();
    // A token naming an ignored key is refused as naming no key of the issuer.
    let t = sign(Algorithm::RS384, "rsa-enc", &k.rsa, &claims("c"));
    assert!(matches!(
        v.verify(&t, AUD, NOW),
        Err(JwtError::UnknownKid { .. })
    ));

    // Fetched from a URL: a rotation to a set with such keys takes effect (the withdrawn key
    // stops verifying, the new one starts).
    let mut v = Verifier::new(JwtOptions::default());
    v.trust_url(ISS, "https://ehr.example.org/jwks.json")
        .unwrap();
    let mut rotated = set.clone();
    rotated["keys"].as_array_mut().unwrap().remove(0); // ec-1 withdrawn
    assert_eq!(
        v.refresh(ISS, &serde_json::to_vec(&rotated).unwrap())
            .unwrap(),
        1
    );
    let t = sign(Algorithm::ES384, "ec-1", &k.ec, &claims("d"));
    assert!(v.verify(&t, AUD, NOW).is_err());
    let t = sign(Algorithm::RS384, "rsa-1", &k.rsa, &claims("e"));
    v.verify(&t, AUD, NOW).unwrap();

    // A key that cannot verify sharing a usable key's kid (RFC 7517 4.5: keys of other types
    // may): the usable one is kept.
    let mut shared = serde_json::to_value(&k.jwks).unwrap();
    shared["keys"]
        .as_array_mut()
        .unwrap()
        .push(json!({"kty": "OKP", "crv": "Ed25519", "kid": "ec-1",
                     "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}));
    let mut v = Verifier::new(JwtOptions::default());
    v.trust_url(ISS, "https://ehr.example.org/jwks.json")
        .unwrap();
    assert_eq!(
        v.refresh(ISS, &serde_json::to_vec(&shared).unwrap())
            .unwrap(),
        2
    );
    let t = sign(Algorithm::ES384, "ec-1", &k.ec, &claims("f"));
    v.verify(&t, AUD, NOW).unwrap();

    // Two usable keys sharing a kid: which one a token means cannot be told, both are ignored.
    let mut twins = serde_json::to_value(&k.jwks).unwrap();
    twins["keys"][1]["kid"] = json!("ec-1");
    let mut v = Verifier::new(JwtOptions::default());
    v.trust_url(ISS, "https://ehr.example.org/jwks.json")
        .unwrap();
    let err = v
        .refresh(ISS, &serde_json::to_vec(&twins).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("another key's too"), "{err}");

    // A set of nothing usable is refused, saying why each key was ignored.
    let useless = json!({"keys": [set["keys"][2], set["keys"][4]]});
    let err = Verifier::new(JwtOptions::default())
        .trust_file(ISS, &{
            let p = dir.path().join("useless.json");
            std::fs::write(&p, serde_json::to_vec(&useless).unwrap()).unwrap();
            p
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("symmetric") && err.contains("ed-1"), "{err}");
}
