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
//! (the load parameter `release`), holds for that one load only, and is audited.
//!
//! The file is small JSON (`{"model": {"release": N, "manifest_sha256": "…"}}`), written
//! whole to a temporary file, fsynced and renamed, readable by its owner only. It is read
//! and written afresh under an exclusive lock on `releases.lock` beside it at every check
//! and record: two servers on one data folder each rewrote it from memory and erased the
//! other's floors (a red-team finding). Bundles that never declare a `release` are not
//! tracked.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// What the ledger holds of one model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub release: u64,
    pub manifest_sha256: String,
}

/// The highest release accepted per model; see the module docs.
#[derive(Debug)]
pub struct ReleaseLedger {
    path: PathBuf,
}

/// What [`ReleaseLedger::record`] changed, to put back with [`ReleaseLedger::undo`] when the
/// load it was for does not go through.
#[derive(Debug)]
#[must_use]
pub struct Recorded {
    name: String,
    /// `None`: nothing changed. `Some(before)`: the entry before (`None`: there was none).
    before: Option<Option<Accepted>>,
}

/// Files larger than this are not a ledger (one holds a line per model).
const MAX_LEDGER_BYTES: u64 = 4 << 20;

/// Why [`ReleaseLedger::check`] refused a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Older than the release served before (for good, until an operator chooses it).
    Older(String),
    /// The ledger could not be read (for the moment: the load is tried again).
    Unreadable(String),
}

impl ReleaseLedger {
    /// Opens the ledger at `path` (none yet: empty). A file that cannot be read as a ledger,
    /// or a symbolic link (a volume not mounted behind it would read as "no ledger" and
    /// forget every floor), is an error: serving on without it would forget every release
    /// accepted.
    pub fn open(path: &Path) -> Result<ReleaseLedger, String> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // Absolute, so that its errors name it by a path that [`ReleaseLedger::locked`] can
        // take out whole.
        let ledger = ReleaseLedger {
            path: std::path::absolute(path).unwrap_or_else(|_| path.to_owned()),
        };
        ledger.locked(|_| Ok(()))?;
        Ok(ledger)
    }

    /// Runs `f` on the ledger as the file holds it now, under an exclusive lock on
    /// `releases.lock` (other servers on the data folder wait). What `f` changes is kept
    /// only where it writes the file. An error is logged whole and returned with the data
    /// folder's path left out: it reaches answers over HTTP (the repository index, a load's
    /// error), which never show where the server keeps its files (a red-team finding).
    fn locked<T>(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, Accepted>) -> Result<T, String>,
    ) -> Result<T, String> {
        locked_map(&self.path, "release ledger", f)
    }

    /// What the ledger holds of `name` (`None` also when it cannot be read).
    pub fn accepted(&self, name: &str) -> Option<Accepted> {
        self.locked(|map| Ok(map.get(name).cloned())).ok().flatten()
    }

    /// Whether a manifest of `name` with `release` may serve: not lower than the release
    /// accepted before, unless this load's operator chose exactly it (`allowed`).
    pub fn check(
        &self,
        name: &str,
        release: Option<u64>,
        allowed: Option<u64>,
    ) -> Result<(), Refusal> {
        let Some(accepted) = self
            .locked(|map| Ok(map.get(name).cloned()))
            .map_err(Refusal::Unreadable)?
        else {
            return Ok(());
        };
        if release.is_some() && allowed == release {
            return Ok(());
        }
        match release {
            Some(r) if r >= accepted.release => Ok(()),
            Some(r) => Err(Refusal::Older(format!(
                "its manifest is release {r}, older than release {} which this server has \
                 served: an older manifest put back is not served again (to roll back to it, \
                 load with {{\"parameters\": {{\"release\": \"{r}\"}}}} as an admin)",
                accepted.release
            ))),
            None => Err(Refusal::Older(format!(
                "its manifest declares no release, and this server has served release {} of \
                 it: a manifest from before releases were numbered is not served again",
                accepted.release
            ))),
        }
    }

    /// Records that `release` of `name` (its manifest's SHA-256) is about to serve: the
    /// ledger keeps the higher of it and what it held, or exactly it when this load's
    /// operator chose it (`allowed`). Written durably before it returns; what it changed
    /// is returned for [`ReleaseLedger::undo`].
    pub fn record(
        &self,
        name: &str,
        release: Option<u64>,
        manifest_sha256: &str,
        allowed: Option<u64>,
    ) -> Result<Recorded, String> {
        let unchanged = Recorded {
            name: name.to_owned(),
            before: None,
        };
        let Some(release) = release else {
            return Ok(unchanged);
        };
        let path = self.path.clone();
        self.locked(|map| {
            let chosen = allowed == Some(release);
            let current = map.get(name).cloned();
            if current.as_ref().is_some_and(|a| {
                (a.release > release && !chosen)
                    || (a.release == release && a.manifest_sha256 == manifest_sha256)
            }) {
                return Ok(unchanged);
            }
            map.insert(
                name.to_owned(),
                Accepted {
                    release,
                    manifest_sha256: manifest_sha256.to_owned(),
                },
            );
            write_durably(&path, map).map_err(|e| format!("the release ledger {e}"))?;
            Ok(Recorded {
                name: name.to_owned(),
                before: Some(current),
            })
        })
    }

    /// Puts back what `recorded` changed (its load did not go through). An error leaves the
    /// file as the record made it (its floor may then be higher than what serves) and says so.
    pub fn undo(&self, recorded: Recorded) -> Result<(), String> {
        let Some(before) = recorded.before else {
            return Ok(());
        };
        let path = self.path.clone();
        self.locked(|map| {
            match before {
                Some(b) => map.insert(recorded.name.clone(), b),
                None => map.remove(&recorded.name),
            };
            write_durably(&path, map).map_err(|e| format!("the release ledger {e}"))
        })
    }
}

/// Runs `f` on the JSON map at `path` (`what` names it in errors) as the file holds it now,
/// under an exclusive lock on the `.lock` file beside it; an error is logged whole and
/// returned with the data folder's path left out (see [`ReleaseLedger`]'s `locked`). The
/// release ledger and the pins ([`PinLedger`]) share it.
fn locked_map<V: DeserializeOwned, T>(
    path: &Path,
    what: &str,
    f: impl FnOnce(&mut BTreeMap<String, V>) -> Result<T, String>,
) -> Result<T, String> {
    locked_inner(path, what, f).map_err(|e| {
        tracing::warn!(error = %e, "the {what} cannot be read or written");
        // The folder's whole absolute path before a name in it: a short relative data
        // folder (`a`) replaced as a bare substring garbled every "a" of the message (a
        // re-attack's finding).
        match path.parent().map(|d| d.display().to_string()) {
            Some(dir) if dir.len() > 1 => e.replace(&format!("{dir}/"), "<data folder>/"),
            _ => e,
        }
    })
}

fn locked_inner<V: DeserializeOwned, T>(
    path: &Path,
    what: &str,
    f: impl FnOnce(&mut BTreeMap<String, V>) -> Result<T, String>,
) -> Result<T, String> {
    let lock_path = path.with_extension("lock");
    let lock = {
        let mut options = std::fs::OpenOptions::new();
        options.create(true).truncate(false).write(true);
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options
            .open(&lock_path)
            .map_err(|e| format!("{}: {e}", lock_path.display()))?
    };
    lock.lock()
        .map_err(|e| format!("{}: {e}", lock_path.display()))?;
    let mut map: BTreeMap<String, V> = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => return Err(format!("{}: {e}", path.display())),
        Ok(m) if !m.is_file() || m.len() > MAX_LEDGER_BYTES => {
            return Err(format!(
                "{}: not a {what} (a regular file, not a link, of at most {MAX_LEDGER_BYTES} bytes)",
                path.display()
            ));
        }
        Ok(_) => {
            let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            serde_json::from_slice(&bytes)
                .map_err(|e| format!("{}: not a {what}: {e}", path.display()))?
        }
    };
    f(&mut map)
}

/// Writes the ledger whole ([`crate::write_atomic`]: a new file no link can redirect,
/// fsynced, renamed over `path`, the folder fsynced), readable by its owner only. The error
/// names the file it failed on.
fn write_durably<V: Serialize>(path: &Path, accepted: &BTreeMap<String, V>) -> Result<(), String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let bytes =
        serde_json::to_vec_pretty(accepted).map_err(|e| format!("{}: {e}", path.display()))?;
    crate::write_atomic(dir, path, &bytes, 0o600)
        .map_err(|(at, e)| format!("{}: {e}", at.display()))
}

/// The versions rollbacks pinned, kept in the data folder (`pins.json`: `{"model": N}`) so
/// that a restart serves what the operator rolled back to, not the version rolled back from
/// (the pin lived in memory only, and a restart quietly put the bad version back: a
/// red-team finding). Written like the release ledger (whole, fsynced, renamed, owner
/// only, under its lock). A plain load removes a model's pin, as it lifts it while serving.
#[derive(Debug)]
pub struct PinLedger {
    path: PathBuf,
}

impl PinLedger {
    /// Opens the pins at `path` (none yet: empty); a file that cannot be read as pins is an
    /// error (starting without them would serve versions rolled back from).
    pub fn open(path: &Path) -> Result<PinLedger, String> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let pins = PinLedger {
            path: std::path::absolute(path).unwrap_or_else(|_| path.to_owned()),
        };
        locked_map::<u64, _>(&pins.path, "pin file", |_| Ok(()))?;
        Ok(pins)
    }

    /// The version `name` is pinned to (`None` also when the file cannot be read: then the
    /// error is logged).
    pub fn pinned(&self, name: &str) -> Option<u64> {
        locked_map::<u64, _>(&self.path, "pin file", |map| Ok(map.get(name).copied()))
            .ok()
            .flatten()
            // Versions are numbered from 1: a 0 (an edited file) pins nothing.
            .filter(|v| *v >= 1)
    }

    /// Pins `name` to `version`, or (`None`) removes its pin; written durably before it
    /// returns.
    pub fn set(&self, name: &str, version: Option<u64>) -> Result<(), String> {
        let path = self.path.clone();
        locked_map::<u64, _>(&self.path, "pin file", |map| {
            let before = map.get(name).copied();
            if before == version {
                return Ok(());
            }
            match version {
                Some(v) => map.insert(name.to_owned(), v),
                None => map.remove(name),
            };
            write_durably(&path, map).map_err(|e| format!("the pin file {e}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_survive_a_reopen_and_a_plain_load_removes_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pins.json");
        let pins = PinLedger::open(&path).unwrap();
        assert_eq!(pins.pinned("m"), None);
        pins.set("m", Some(1)).unwrap();
        pins.set("other", Some(3)).unwrap();
        let again = PinLedger::open(&path).unwrap();
        assert_eq!(
            (again.pinned("m"), again.pinned("other")),
            (Some(1), Some(3))
        );
        again.set("m", None).unwrap();
        assert_eq!(PinLedger::open(&path).unwrap().pinned("m"), None);
        std::fs::write(&path, b"not json").unwrap();
        assert!(PinLedger::open(&path).is_err());
    }

    #[test]
    fn an_older_release_is_refused_unless_chosen_and_the_floor_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("releases.json");
        let ledger = ReleaseLedger::open(&path).unwrap();
        // Nothing recorded: anything goes, and a manifest without a release is not tracked.
        assert!(ledger.check("m", None, None).is_ok());
        let _ = ledger.record("m", None, "aa", None).unwrap();
        assert!(ledger.accepted("m").is_none());
        let _ = ledger.record("m", Some(3), "c3", None).unwrap();
        assert!(ledger.check("m", Some(3), None).is_ok());
        assert!(ledger.check("m", Some(4), None).is_ok());
        let Err(Refusal::Older(e)) = ledger.check("m", Some(2), None) else {
            panic!("not refused as older")
        };
        assert!(e.contains("release 2, older than release 3"), "{e}");
        let Err(Refusal::Older(e)) = ledger.check("m", None, None) else {
            panic!("not refused as older")
        };
        assert!(e.contains("declares no release"), "{e}");
        assert!(ledger.check("other", Some(1), None).is_ok());
        // A lower record does not lower the floor.
        let _ = ledger.record("m", Some(2), "c2", None).unwrap();
        assert_eq!(ledger.accepted("m").unwrap().release, 3);
        // Across a restart (the lock goes with the first ledger).
        drop(ledger);
        let ledger = ReleaseLedger::open(&path).unwrap();
        assert_eq!(
            ledger.accepted("m"),
            Some(Accepted {
                release: 3,
                manifest_sha256: "c3".into()
            })
        );
        assert!(ledger.check("m", Some(2), None).is_err());
        // An operator's rollback: exactly the release chosen for that load.
        assert!(ledger.check("m", Some(1), Some(2)).is_err());
        assert!(ledger.check("m", Some(2), Some(2)).is_ok());
        // Undone (the load did not go through): the floor is as before.
        let recorded = ledger.record("m", Some(2), "c2", Some(2)).unwrap();
        assert_eq!(ledger.accepted("m").unwrap().release, 2);
        ledger.undo(recorded).unwrap();
        assert_eq!(ledger.accepted("m").unwrap().release, 3);
        drop(ledger);
        let ledger = ReleaseLedger::open(&path).unwrap();
        assert_eq!(ledger.accepted("m").unwrap().release, 3);
        let _ = ledger.record("m", Some(2), "c2", Some(2)).unwrap();
        assert_eq!(ledger.accepted("m").unwrap().release, 2);
        assert!(ledger.check("m", Some(1), None).is_err());
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    /// Red-team finding: two servers on one data folder each rewrote the ledger from memory
    /// and erased the other's floors. Each reads it afresh under the lock.
    #[test]
    fn servers_sharing_a_ledger_see_each_other_and_a_file_that_is_not_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("releases.json");
        let a = ReleaseLedger::open(&path).unwrap();
        let b = ReleaseLedger::open(&path).unwrap();
        let _ = a.record("m", Some(4), "c4", None).unwrap();
        let _ = b.record("other", Some(1), "o1", None).unwrap();
        assert!(b.check("m", Some(3), None).is_err());
        assert_eq!(a.accepted("m").unwrap().release, 4);
        drop(ReleaseLedger::open(&path).unwrap());
        let c = ReleaseLedger::open(&path).unwrap();
        assert!(c.check("m", Some(3), None).is_err());
        assert!(c.check("other", None, None).is_err());
        drop((a, b, c));
        std::fs::write(&path, b"not json").unwrap();
        assert!(ReleaseLedger::open(&path).is_err());
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/nonexistent/releases.json", &path).unwrap();
        let e = ReleaseLedger::open(&path).unwrap_err();
        assert!(e.contains("not a link"), "{e}");
    }

    #[test]
    fn a_ledger_that_cannot_be_written_changes_nothing_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("releases.json");
        let ledger = ReleaseLedger::open(&path).unwrap();
        let _ = ledger.record("m", Some(3), "c3", None).unwrap();
        let before = std::fs::read(&path).unwrap();
        // A folder gone from under the ledger: the write fails, names it, and leaves
        // nothing behind (the tests run as root here, so permissions cannot refuse it).
        let gone = dir.path().join("gone").join("releases.json");
        let e = write_durably(&gone, &BTreeMap::<String, Accepted>::new()).unwrap_err();
        assert!(e.contains("gone"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert_eq!(ledger.accepted("m").unwrap().release, 3);
        // A link planted where a predictable temporary name would be is not written
        // through: the temporary name is unpredictable and created exclusively.
        let target = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&target, path.with_extension("json.tmp")).unwrap();
        let _ = ledger.record("m", Some(4), "c4", None).unwrap();
        assert!(!target.exists());
        assert_eq!(ledger.accepted("m").unwrap().release, 4);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o077, 0, "{mode:o}");
    }

    /// Red-team findings: a ledger that could not be read refused the load as if it were
    /// older, for good (the poller retries only reasons of the moment), and its error showed
    /// the data folder's absolute path in the repository index.
    #[test]
    fn an_unreadable_ledger_is_a_reason_of_the_moment_and_hides_the_data_folder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("releases.json");
        let ledger = ReleaseLedger::open(&path).unwrap();
        let _ = ledger.record("m", Some(3), "c3", None).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        let shown = dir.path().display().to_string();
        let Err(Refusal::Unreadable(e)) = ledger.check("m", Some(3), None) else {
            panic!("not unreadable")
        };
        assert!(e.contains("<data folder>/releases.json"), "{e}");
        assert!(e.contains("not a release ledger (a regular file"), "{e}");
        assert!(!e.contains(&shown), "{e}");
        let e = ledger.record("m", Some(4), "c4", None).unwrap_err();
        assert!(!e.contains(&shown), "{e}");
    }
}
