//! The release ledger: the highest `release` of each bundle's manifest a server has
//! accepted, kept in its data folder, so that an older manifest put back in the repository
//! (its signature still verifies: it was signed once) is not served again unless an
//! operator asks for it.
//!
//! A signature says who wrote a manifest, not that it is the newest: restoring an earlier
//! `bundle.toml`, its `.minisig` and a withdrawn version's folder made the poller serve the
//! withdrawn version again, "signature verified" (a red-team finding). A manifest's
//! `release` (a number its author raises with every release; covered by the signature)
//! orders them: the ledger refuses a lower one than it has accepted, and a manifest without
//! one once the model has had one. An operator's rollback to an older release is explicit
//! ([`ReleaseLedger::allow`], the load parameter `release`) and audited.
//!
//! The file is small JSON (`{"model": {"release": N, "manifest_sha256": "…"}}`), written
//! whole to a temporary file, fsynced and renamed, readable by its owner only. Bundles that
//! never declare a `release` are not tracked (as before).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// What the ledger holds of one model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub release: u64,
    pub manifest_sha256: String,
}

#[derive(Debug, Default)]
struct State {
    accepted: BTreeMap<String, Accepted>,
    /// An operator's leave to serve this release of the model, lower or not (one load).
    allowed: BTreeMap<String, u64>,
}

/// The highest release accepted per model; see the module docs.
#[derive(Debug)]
pub struct ReleaseLedger {
    path: PathBuf,
    state: Mutex<State>,
}

/// Files larger than this are not a ledger (one holds a line per model).
const MAX_LEDGER_BYTES: u64 = 4 << 20;

impl ReleaseLedger {
    /// Opens the ledger at `path` (none yet: empty). A file that cannot be read as a
    /// ledger is an error: serving on without it would forget every release accepted.
    pub fn open(path: &Path) -> Result<ReleaseLedger, String> {
        let accepted = match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
            Ok(m) if !m.is_file() || m.len() > MAX_LEDGER_BYTES => {
                return Err(format!(
                    "{}: not a release ledger (a regular file of at most {MAX_LEDGER_BYTES} bytes)",
                    path.display()
                ));
            }
            Ok(_) => {
                let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
                serde_json::from_slice(&bytes)
                    .map_err(|e| format!("{}: not a release ledger: {e}", path.display()))?
            }
        };
        Ok(ReleaseLedger {
            path: path.to_owned(),
            state: Mutex::new(State {
                accepted,
                allowed: BTreeMap::new(),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the ledger holds of `name`.
    pub fn accepted(&self, name: &str) -> Option<Accepted> {
        self.state().accepted.get(name).cloned()
    }

    /// Whether a manifest of `name` with `release` may serve: not lower than the release
    /// accepted before, unless an operator allowed exactly it.
    pub fn check(&self, name: &str, release: Option<u64>) -> Result<(), String> {
        let state = self.state();
        let Some(accepted) = state.accepted.get(name) else {
            return Ok(());
        };
        if release.is_some() && state.allowed.get(name) == release.as_ref() {
            return Ok(());
        }
        match release {
            Some(r) if r >= accepted.release => Ok(()),
            Some(r) => Err(format!(
                "its manifest is release {r}, older than release {} which this server has \
                 served: an older manifest put back is not served again (to roll back to it, \
                 load with {{\"parameters\": {{\"release\": \"{r}\"}}}} as an admin)",
                accepted.release
            )),
            None => Err(format!(
                "its manifest declares no release, and this server has served release {} of \
                 it: a manifest from before releases were numbered is not served again",
                accepted.release
            )),
        }
    }

    /// An operator's leave to serve release `release` of `name` at its next load, even if
    /// older than the one accepted.
    pub fn allow(&self, name: &str, release: u64) {
        self.state().allowed.insert(name.to_owned(), release);
    }

    /// Records that `release` of `name` (its manifest's SHA-256) now serves: the ledger
    /// keeps the higher of it and what it held, or exactly it when an operator allowed it.
    /// Written durably before it returns.
    pub fn record(
        &self,
        name: &str,
        release: Option<u64>,
        manifest_sha256: &str,
    ) -> Result<(), String> {
        let Some(release) = release else {
            return Ok(());
        };
        let mut state = self.state();
        let allowed = state.allowed.remove(name) == Some(release);
        let keep = state
            .accepted
            .get(name)
            .is_some_and(|a| a.release > release && !allowed);
        if keep {
            return Ok(());
        }
        let before = state.accepted.insert(
            name.to_owned(),
            Accepted {
                release,
                manifest_sha256: manifest_sha256.to_owned(),
            },
        );
        if before
            .as_ref()
            .is_some_and(|b| b.release == release && b.manifest_sha256 == manifest_sha256)
        {
            return Ok(());
        }
        write_durably(&self.path, &state.accepted).map_err(|e| {
            // Not kept in memory either: what is held is what is on disk.
            match before {
                Some(b) => state.accepted.insert(name.to_owned(), b),
                None => state.accepted.remove(name),
            };
            format!("the release ledger {}: {e}", self.path.display())
        })
    }
}

fn write_durably(path: &Path, accepted: &BTreeMap<String, Accepted>) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("json.tmp");
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(accepted).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_release_is_refused_unless_allowed_and_the_floor_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("releases.json");
        let ledger = ReleaseLedger::open(&path).unwrap();
        // Nothing recorded: anything goes, and a manifest without a release is not tracked.
        assert!(ledger.check("m", None).is_ok());
        ledger.record("m", None, "aa").unwrap();
        assert!(ledger.accepted("m").is_none());
        ledger.record("m", Some(3), "c3").unwrap();
        assert!(ledger.check("m", Some(3)).is_ok());
        assert!(ledger.check("m", Some(4)).is_ok());
        let e = ledger.check("m", Some(2)).unwrap_err();
        assert!(e.contains("release 2, older than release 3"), "{e}");
        let e = ledger.check("m", None).unwrap_err();
        assert!(e.contains("declares no release"), "{e}");
        assert!(ledger.check("other", Some(1)).is_ok());
        // A lower record does not lower the floor.
        ledger.record("m", Some(2), "c2").unwrap();
        assert_eq!(ledger.accepted("m").unwrap().release, 3);
        // Across a restart.
        drop(ledger);
        let ledger = ReleaseLedger::open(&path).unwrap();
        assert_eq!(
            ledger.accepted("m"),
            Some(Accepted {
                release: 3,
                manifest_sha256: "c3".into()
            })
        );
        assert!(ledger.check("m", Some(2)).is_err());
        // An operator's rollback: exactly the release allowed, which becomes the floor.
        ledger.allow("m", 2);
        assert!(ledger.check("m", Some(1)).is_err());
        assert!(ledger.check("m", Some(2)).is_ok());
        ledger.record("m", Some(2), "c2").unwrap();
        assert_eq!(ledger.accepted("m").unwrap().release, 2);
        assert!(ledger.check("m", Some(1)).is_err());
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn a_file_that_is_not_a_ledger_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("releases.json");
        std::fs::write(&path, b"not json").unwrap();
        assert!(ReleaseLedger::open(&path).is_err());
        assert!(ReleaseLedger::open(dir.path()).is_err());
    }
}
