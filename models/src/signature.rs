//! Bundle signatures in the minisign format (Ed25519).
//!
//! A bundle is signed by `bundle.toml.minisig` beside its `bundle.toml`. The signature covers
//! the manifest's exact bytes, and the manifest pins the SHA-256 of every file of every
//! version: one signature vouches for the whole bundle, including its own descriptive text.
//!
//! The files are minisign's, so MLOps can sign with `minisign -Sm bundle.toml` or `rsign sign`
//! and Nightingale verifies, and `minisign -Vm bundle.toml -p key.pub` verifies what
//! `nightingale models sign` wrote. Verification and key parsing use the `minisign` crate (by
//! minisign's author). Signing is done here with `ed25519-dalek` because the `minisign` crate
//! adds random noise to each signature; plain RFC 8032 Ed25519 is deterministic, so re-signing
//! an unchanged manifest with the same key gives the same bytes (reproducible bundles). Both
//! are valid Ed25519 signatures to any verifier.

use std::fmt;
use std::fs;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use blake2::Digest as _;

use crate::checksum::{NotRegular, open_regular};
use crate::error::BundleError;

/// The signature file of a bundle, beside `bundle.toml`.
pub const SIGNATURE_FILE: &str = "bundle.toml.minisig";
/// Signature and key files are a few lines; anything larger is not one.
const SMALL_FILE_LIMIT: u64 = 16 << 10;
const SIGALG_PREHASHED: [u8; 2] = *b"ED";
const SIGALG: [u8; 2] = *b"Ed";
const KDF_NONE: [u8; 2] = [0, 0];
const KDF_SCRYPT: [u8; 2] = *b"Sc";

/// A minisign key id as minisign prints it: the 8-byte key number read as a little-endian
/// integer, in 16 upper-case hex digits.
pub fn key_id(keynum: &[u8]) -> String {
    let mut bytes = [0u8; 8];
    let n = keynum.len().min(8);
    bytes[..n].copy_from_slice(&keynum[..n]);
    format!("{:016X}", u64::from_le_bytes(bytes))
}

/// Why a key file cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error("{path}: not a minisign {what} key file: {reason}")]
    Malformed {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("{path}: cannot decrypt the secret key: {reason}")]
    Decrypt { path: PathBuf, reason: String },
    #[error("trusted key {id} is given twice ({first} and {second})")]
    Duplicate {
        id: String,
        first: PathBuf,
        second: PathBuf,
    },
}

/// Why a small file (a key or a signature) could not be read. Its reasons name no path: a
/// signature's reason is answered over HTTP, where the server's paths must not show.
enum SmallFileError {
    Io(std::io::Error),
    NotUtf8,
    TooLarge,
}

impl SmallFileError {
    fn reason(&self) -> String {
        match self {
            SmallFileError::Io(e) => e.to_string(),
            SmallFileError::NotUtf8 => "not UTF-8 text".into(),
            SmallFileError::TooLarge => format!("larger than {SMALL_FILE_LIMIT} bytes"),
        }
    }
}

/// Reads at most [`SMALL_FILE_LIMIT`] bytes of UTF-8 text; more is an error.
fn read_limited(file: fs::File) -> Result<String, SmallFileError> {
    let mut text = String::new();
    file.take(SMALL_FILE_LIMIT + 1)
        .read_to_string(&mut text)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => SmallFileError::NotUtf8,
            _ => SmallFileError::Io(e),
        })?;
    if text.len() as u64 > SMALL_FILE_LIMIT {
        return Err(SmallFileError::TooLarge);
    }
    Ok(text)
}

/// Reads a key file the operator named (it may be a symbolic link: mounted secrets often are).
fn read_small(path: &Path, what: &'static str) -> Result<String, KeyError> {
    let io = |e: std::io::Error| KeyError::Io {
        path: path.to_owned(),
        source: Arc::new(e),
    };
    // A regular file only: opening a FIFO blocks for ever (a red-team finding), and a
    // device is refused by the size cap anyway.
    if !fs::metadata(path).map_err(io)?.is_file() {
        return Err(KeyError::Malformed {
            path: path.to_owned(),
            what,
            reason: "not a regular file".into(),
        });
    }
    read_limited(fs::File::open(path).map_err(io)?).map_err(|e| match e {
        SmallFileError::Io(e) => io(e),
        other => KeyError::Malformed {
            path: path.to_owned(),
            what,
            reason: other.reason(),
        },
    })
}

/// A public key trusted to sign bundles (a minisign `.pub` file).
#[derive(Clone)]
pub struct TrustedKey {
    id: String,
    source: PathBuf,
    key: minisign::PublicKey,
}

impl fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustedKey")
            .field("id", &self.id)
            .field("source", &self.source)
            .finish()
    }
}

impl TrustedKey {
    /// Reads a minisign public key file holding one key (`untrusted comment: …` then the
    /// base64 key; a bare base64 line, as `minisign -P` takes, is accepted too). A file with
    /// several keys is refused here (this returns one): [`TrustedKey::all_from_file`] reads
    /// them all, as [`SignaturePolicy::load`] does.
    pub fn from_file(path: &Path) -> Result<TrustedKey, KeyError> {
        let mut keys = TrustedKey::all_from_file(path)?;
        if keys.len() > 1 {
            return Err(KeyError::Malformed {
                path: path.to_owned(),
                what: "public",
                reason: format!(
                    "holds {} keys where one was expected ({})",
                    keys.len(),
                    keys.iter()
                        .map(|k| k.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        Ok(keys.remove(0))
    }

    /// Reads every key of a minisign public key file: each `untrusted comment: …` line
    /// followed by its base64 key (or bare base64 lines). Every other non-empty line must be
    /// a key: one that does not parse fails the whole file (no key is silently skipped), and
    /// so does a file without any.
    pub fn all_from_file(path: &Path) -> Result<Vec<TrustedKey>, KeyError> {
        let text = read_small(path, "public")?;
        let malformed = |reason: String| KeyError::Malformed {
            path: path.to_owned(),
            what: "public",
            reason,
        };
        let mut keys = vec![];
        for (n, line) in text.lines().map(str::trim).enumerate() {
            if line.is_empty() || line.starts_with("untrusted comment:") {
                continue;
            }
            let key = minisign::PublicKey::from_base64(line)
                .map_err(|e| malformed(format!("line {}: {e}", n + 1)))?;
            keys.push(TrustedKey {
                id: key_id(key.keynum()),
                source: path.to_owned(),
                key,
            });
        }
        if keys.is_empty() {
            return Err(malformed("no key line".into()));
        }
        Ok(keys)
    }

    /// The key id, as minisign prints it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The file it came from.
    pub fn source(&self) -> &Path {
        &self.source
    }
}

/// Which signatures a repository accepts.
#[derive(Clone, Debug, Default)]
pub struct SignaturePolicy {
    /// Keys whose signatures are checked and accepted.
    pub trusted: Vec<TrustedKey>,
    /// Refuse bundles that are unsigned or signed by a key not in `trusted`.
    pub require: bool,
}

impl SignaturePolicy {
    /// Reads the trusted key files, every key of each (a file may hold several, one after
    /// the other, as `cat a.pub b.pub` makes); a key given twice, in one file or two, is an
    /// error (it is a config mistake).
    pub fn load(paths: &[PathBuf], require: bool) -> Result<SignaturePolicy, KeyError> {
        let mut trusted: Vec<TrustedKey> = vec![];
        for path in paths {
            for key in TrustedKey::all_from_file(path)? {
                if let Some(first) = trusted.iter().find(|k| k.id == key.id) {
                    return Err(KeyError::Duplicate {
                        id: key.id,
                        first: first.source.clone(),
                        second: path.clone(),
                    });
                }
                trusted.push(key);
            }
        }
        Ok(SignaturePolicy { trusted, require })
    }

    fn find(&self, id: &str) -> Option<&TrustedKey> {
        self.trusted.iter().find(|k| k.id == id)
    }
}

/// What a bundle's signature established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignatureStatus {
    /// No `bundle.toml.minisig` (allowed: signatures are not required).
    Unsigned,
    /// Signed by a trusted key, and the signature verifies over the manifest served.
    Verified {
        key_id: String,
        trusted_comment: String,
    },
    /// Signed by a key this server does not trust, so not checked (allowed: signatures are
    /// not required).
    UntrustedKey { key_id: String },
}

impl SignatureStatus {
    /// The signer's key id, when the signature verified.
    pub fn verified_key(&self) -> Option<&str> {
        match self {
            SignatureStatus::Verified { key_id, .. } => Some(key_id),
            _ => None,
        }
    }
}

impl fmt::Display for SignatureStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignatureStatus::Unsigned => f.write_str("unsigned"),
            SignatureStatus::Verified { key_id, .. } => {
                write!(f, "signature by trusted key {key_id} verified")
            }
            SignatureStatus::UntrustedKey { key_id } => {
                write!(
                    f,
                    "signed by key {key_id}, which is not trusted here (not checked)"
                )
            }
        }
    }
}

/// Checks `manifest` (the exact bytes of `dir/bundle.toml`) against `dir/bundle.toml.minisig`
/// under `policy`. A signature by a trusted key that does not verify is refused whatever the
/// policy says.
pub fn check_manifest(
    dir: &Path,
    manifest: &[u8],
    policy: &SignaturePolicy,
) -> Result<SignatureStatus, BundleError> {
    let path = dir.join(SIGNATURE_FILE);
    // Part of the bundle, so a regular file in its folder, like the manifest (never a link
    // out of it). Errors name the file by `path` alone, which the repository makes relative
    // to its root before answering.
    let file = match open_regular(&path) {
        Ok(file) => file,
        Err(NotRegular::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return if policy.require {
                Err(BundleError::SignatureMissing { path })
            } else {
                Ok(SignatureStatus::Unsigned)
            };
        }
        Err(NotRegular::Io(e)) => return Err(BundleError::io(&path, e)),
        Err(NotRegular::Kind) => return Err(BundleError::NotRegularFile { path }),
    };
    let text = read_limited(file).map_err(|e| match e {
        SmallFileError::Io(e) => BundleError::io(&path, e),
        other => BundleError::SignatureMalformed {
            path: path.clone(),
            reason: other.reason(),
        },
    })?;
    let signature = minisign::SignatureBox::from_string(&text).map_err(|e| {
        BundleError::SignatureMalformed {
            path: path.clone(),
            reason: e.to_string(),
        }
    })?;
    // A legacy (not prehashed) signature is refused whatever the key, as docs/bundle-format.md
    // says, and said to be one: it read "does not verify (bundle.toml changed …)" under a
    // trusted key and "untrusted" under another (a red-team finding).
    if !signature.is_prehashed() {
        return Err(BundleError::SignatureMalformed {
            path,
            reason: "a legacy (not prehashed) minisign signature: sign again with prehashing \
                     (`nightingale models sign`, or minisign without -l)"
                .to_owned(),
        });
    }
    let id = key_id(signature.keynum());
    let Some(key) = policy.find(&id) else {
        return if policy.require {
            Err(BundleError::SignatureUntrusted { path, key_id: id })
        } else {
            Ok(SignatureStatus::UntrustedKey { key_id: id })
        };
    };
    let verified = minisign::verify(
        &key.key,
        &signature,
        Cursor::new(manifest),
        true,
        false,
        false,
    );
    if let Err(e) = verified {
        return Err(BundleError::SignatureInvalid {
            path,
            key_id: id,
            reason: e.to_string(),
        });
    }
    let trusted_comment = signature.trusted_comment().unwrap_or_default();
    Ok(SignatureStatus::Verified {
        key_id: id,
        trusted_comment,
    })
}

/// A minisign secret key, decrypted, ready to sign.
pub struct SigningKey {
    keynum: [u8; 8],
    key: ed25519_dalek::SigningKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Reads a minisign secret key file. An unencrypted key (`minisign -G -W`) needs no
    /// password; an encrypted one is decrypted with `password` (minisign's scrypt scheme), or
    /// with one asked on the terminal when `password` is `None`.
    pub fn from_file(path: &Path, password: Option<String>) -> Result<SigningKey, KeyError> {
        let text = read_small(path, "secret")?;
        let malformed = |reason: &str| KeyError::Malformed {
            path: path.to_owned(),
            what: "secret",
            reason: reason.to_owned(),
        };
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))
            .ok_or_else(|| malformed("no key line"))?;
        let mut bytes = BASE64
            .decode(line)
            .map_err(|_| malformed("the key line is not base64"))?;
        // sig_alg(2) kdf_alg(2) chk_alg(2) salt(32) opslimit(8) memlimit(8) keynum(8) sk(64) chk(32)
        if bytes.len() != 158 || bytes[0..2] != SIGALG {
            return Err(malformed("not an Ed25519 minisign secret key"));
        }
        match [bytes[2], bytes[3]] {
            KDF_NONE => {}
            KDF_SCRYPT => {
                // No password given: minisign asks for it on a terminal; elsewhere that
                // would hang, so refuse.
                if password.is_none() && !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                    return Err(KeyError::Decrypt {
                        path: path.to_owned(),
                        reason:
                            "the key is encrypted: give its password (NIGHTINGALE_SIGNING_PASSWORD)"
                                .into(),
                    });
                }
                let boxed = minisign::SecretKeyBox::from_string(&text)
                    .and_then(|b| minisign::SecretKey::from_box(b, password))
                    .map_err(|e| KeyError::Decrypt {
                        path: path.to_owned(),
                        reason: e.to_string(),
                    })?;
                bytes = boxed.to_bytes();
            }
            _ => return Err(malformed("unknown key encryption")),
        }
        let mut keynum = [0u8; 8];
        keynum.copy_from_slice(&bytes[54..62]);
        let mut seed = [0u8; 32];
        seed.copy_from_slice(&bytes[62..94]);
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        // The stored key is seed || public key: a mismatch means a corrupt (or wrongly
        // decrypted) key.
        if key.verifying_key().as_bytes()[..] != bytes[94..126] {
            return Err(KeyError::Malformed {
                path: path.to_owned(),
                what: "secret",
                reason: "corrupt key (its public half does not match)".into(),
            });
        }
        Ok(SigningKey { keynum, key })
    }

    /// The key id, as minisign prints it.
    pub fn id(&self) -> String {
        key_id(&self.keynum)
    }

    /// The matching public key in minisign's `.pub` format.
    pub fn public_key_file(&self) -> String {
        let mut bin = SIGALG.to_vec();
        bin.extend_from_slice(&self.keynum);
        bin.extend_from_slice(self.key.verifying_key().as_bytes());
        format!(
            "untrusted comment: minisign public key {}\n{}\n",
            self.id(),
            BASE64.encode(bin)
        )
    }

    /// A minisign signature file over `data` with the given trusted comment (one line).
    pub fn sign(&self, data: &[u8], trusted_comment: &str) -> String {
        use ed25519_dalek::Signer as _;
        let trusted_comment: String = trusted_comment
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let prehash = blake2::Blake2b512::digest(data);
        let signature = self.key.sign(&prehash).to_bytes();
        let mut global = signature.to_vec();
        global.extend_from_slice(trusted_comment.as_bytes());
        let global_signature = self.key.sign(&global).to_bytes();
        let mut bin = SIGALG_PREHASHED.to_vec();
        bin.extend_from_slice(&self.keynum);
        bin.extend_from_slice(&signature);
        format!(
            "untrusted comment: signature from nightingale models sign, key {}\n{}\ntrusted comment: {}\n{}\n",
            self.id(),
            BASE64.encode(bin),
            trusted_comment,
            BASE64.encode(global_signature)
        )
    }

    /// A [`TrustedKey`] for this key's public half (tests, and checking what was just signed).
    pub fn trusted_key(&self) -> TrustedKey {
        let mut bin = SIGALG.to_vec();
        bin.extend_from_slice(&self.keynum);
        bin.extend_from_slice(self.key.verifying_key().as_bytes());
        let key = minisign::PublicKey::from_bytes(&bin).expect("42 bytes with the Ed algorithm");
        TrustedKey {
            id: self.id(),
            source: PathBuf::from("<the signing key>"),
            key,
        }
    }
}

/// The trusted comment `nightingale models sign` writes: fixed for a bundle, so re-signing an
/// unchanged manifest gives identical bytes.
pub fn bundle_trusted_comment(name: &str) -> String {
    format!("nightingale bundle {name}")
}
