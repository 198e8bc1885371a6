//! SHA-256 checks of a version folder against its manifest entry.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::BundleError;

/// Hex SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    sha256_reader(fs::File::open(path)?)
}

/// Hex SHA-256 of what `reader` gives to its end, streamed (an open file, say).
pub fn sha256_reader(mut reader: impl Read) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Why [`open_regular`] did not open a path.
#[derive(Debug)]
pub(crate) enum NotRegular {
    /// The path exists but is not a regular file itself: a symbolic link, a folder, a FIFO,
    /// a socket or a device (or it was swapped for another file while it was opened).
    Kind,
    /// It could not be inspected or opened (`NotFound`: there is nothing there).
    Io(std::io::Error),
}

/// Opens `path` for reading only when it is a regular file itself. A bundle's files are
/// refused when they are anything else: a symbolic link could point anywhere on the server
/// (and a parse error would then quote what it points to), opening a FIFO blocks until a
/// writer comes, and a device never ends. The path is inspected without following links, and
/// the file opened must be the very file inspected, so swapping one in between is refused too.
/// The open itself neither follows a link nor waits for a FIFO's writer: a FIFO swapped in
/// between the two hung the repository poller, and a load under its lock, for good (a
/// review's finding).
pub(crate) fn open_regular(path: &Path) -> Result<fs::File, NotRegular> {
    let inspected = fs::symlink_metadata(path).map_err(NotRegular::Io)?;
    if !inspected.is_file() {
        return Err(NotRegular::Kind);
    }
    let file = open_without_waiting(path).map_err(|e| {
        // A link swapped in: refused by O_NOFOLLOW.
        if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
            NotRegular::Kind
        } else {
            NotRegular::Io(e)
        }
    })?;
    let opened = file.metadata().map_err(NotRegular::Io)?;
    if !opened.is_file() || !same_file(&inspected, &opened) {
        return Err(NotRegular::Kind);
    }
    Ok(file)
}

/// Opens `path` to read, without following a link in its place (`ELOOP`) and without
/// waiting for a FIFO's writer or a device's carrier (a regular file reads as ever).
fn open_without_waiting(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(
            (rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::NONBLOCK
                | rustix::fs::OFlags::NOCTTY)
                .bits() as i32,
        )
        .open(path)
}

/// Opens (creating it, owner only) the lock file `path`, to `flock` it: a link in its place is
/// not followed and a FIFO not waited on (an open of one blocked a server's start for good: a
/// review's finding); anything but a regular file is refused.
pub fn open_lock_file(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

#[cfg(unix)]
fn same_file(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_file(_: &fs::Metadata, _: &fs::Metadata) -> bool {
    true
}

/// The deepest folder a version folder may hold its files in (`1/a/b/.../x`: `a` is at depth
/// 1). The repository's poller watches every file to this depth and one below, so a change
/// at any depth a load reads is seen (a file at depth 9 was read by loads and not watched: a
/// review's finding).
pub const MAX_FOLDER_DEPTH: usize = 16;

/// Every regular file under `dir`, as `/`-separated relative paths, at most
/// [`MAX_FOLDER_DEPTH`] folders deep. A name that is not UTF-8 cannot be listed in a
/// manifest (TOML is UTF-8), so such a file is unlisted whatever the manifest says (its name
/// was read lossily, and matched a listed `x\u{FFFD}`: a red-team finding).
fn list_files(dir: &Path) -> Result<Vec<String>, BundleError> {
    fn walk(
        root: &Path,
        dir: &Path,
        depth: usize,
        out: &mut Vec<String>,
        not_utf8: &mut Option<PathBuf>,
    ) -> Result<(), BundleError> {
        if depth > MAX_FOLDER_DEPTH {
            return Err(BundleError::TooDeep {
                path: dir.to_owned(),
                limit: MAX_FOLDER_DEPTH,
            });
        }
        let io = |source| BundleError::io(dir, source);
        for entry in fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let kind = entry.file_type().map_err(io)?;
            let path = entry.path();
            if entry.file_name().to_str().is_none() {
                not_utf8.get_or_insert(path);
                continue;
            }
            if kind.is_dir() {
                walk(root, &path, depth + 1, out, not_utf8)?;
            } else {
                let rel = path.strip_prefix(root).unwrap_or(&path);
                let parts: Vec<&str> = rel
                    .components()
                    .filter_map(|c| c.as_os_str().to_str())
                    .collect();
                out.push(parts.join("/"));
            }
        }
        Ok(())
    }
    let mut out = vec![];
    let mut not_utf8 = None;
    walk(dir, dir, 0, &mut out, &mut not_utf8)?;
    if let Some(path) = not_utf8 {
        return Err(BundleError::UnlistedFile { path });
    }
    out.sort();
    Ok(out)
}

/// Checks that `dir` holds exactly the listed files with the listed checksums.
pub fn verify_folder(dir: &Path, files: &BTreeMap<String, String>) -> Result<(), BundleError> {
    read_verified_keeping(dir, files, |_| false).map(drop)
}

/// The largest file a bundle's version may list: 2 GiB, ONNX's own limit for a model file
/// held in one protobuf (and what `models init` accepts).
pub const FILE_LIMIT: u64 = crate::init::MODEL_LIMIT;

/// Reads every listed file of `dir` once, checks its SHA-256 against the listing, and returns
/// the bytes that were hashed: the caller loads the model from these, never from the path
/// again, so what runs is exactly what was verified. A file present but not listed, or listed
/// but missing (or not a regular file, e.g. a symbolic link), is an error.
pub fn read_verified(
    dir: &Path,
    files: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, Vec<u8>>, BundleError> {
    read_verified_keeping(dir, files, |_| true)
}

/// [`read_verified`], returning the bytes of the files `keep` names only: the others are
/// hashed as they are read and not held (a load held every listed file at once, so a signed
/// version with ten 1.9 GiB data files beside its model needed ~19 GB: a review's finding).
pub fn read_verified_keeping(
    dir: &Path,
    files: &BTreeMap<String, String>,
    keep: impl Fn(&str) -> bool,
) -> Result<BTreeMap<String, Vec<u8>>, BundleError> {
    for present in list_files(dir)? {
        if !files.contains_key(&present) {
            return Err(BundleError::UnlistedFile {
                path: dir.join(present),
            });
        }
    }
    let mut out = BTreeMap::new();
    for (name, expected) in files {
        let path: PathBuf = dir.join(name);
        let file = match open_regular(&path) {
            Ok(file) => file,
            Err(NotRegular::Io(e)) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(BundleError::io(&path, e));
            }
            Err(_) => return Err(BundleError::MissingFile { path }),
        };
        // Checked before reading, and read no further than the limit (the file may grow):
        // a 50 GiB file listed in a manifest would otherwise be read whole into memory.
        let too_large = || BundleError::FileTooLarge {
            path: path.clone(),
            limit: FILE_LIMIT,
        };
        let len = file
            .metadata()
            .map_err(|source| BundleError::io(&path, source))?
            .len();
        if len > FILE_LIMIT {
            return Err(too_large());
        }
        let kept = keep(name);
        let mut bytes = Vec::with_capacity(if kept { len as usize } else { 0 });
        let mut hasher = Sha256::new();
        let mut read = 0u64;
        let mut chunk = vec![0u8; 1 << 20];
        let mut reader = file.take(FILE_LIMIT + 1);
        loop {
            let n = match reader.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(BundleError::io(&path, source)),
            };
            read += n as u64;
            if read > FILE_LIMIT {
                return Err(too_large());
            }
            hasher.update(&chunk[..n]);
            if kept {
                bytes.extend_from_slice(&chunk[..n]);
            }
        }
        let actual = hex::encode(hasher.finalize());
        if !actual.eq_ignore_ascii_case(expected) {
            return Err(BundleError::ChecksumMismatch {
                path,
                expected: expected.to_ascii_lowercase(),
                actual,
            });
        }
        if kept {
            out.insert(name.clone(), bytes);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{open_without_waiting, read_verified_keeping};

    /// Only the files the load reads are held; the others are checked all the same.
    #[test]
    fn files_not_kept_are_checked_and_not_held() {
        use sha2::Digest as _;
        let dir = tempfile::tempdir().unwrap();
        let model = vec![7u8; 3 << 20];
        let data = vec![9u8; (2 << 20) + 5];
        std::fs::write(dir.path().join("model.onnx"), &model).unwrap();
        std::fs::write(dir.path().join("data.bin"), &data).unwrap();
        let sha = |b: &[u8]| hex::encode(sha2::Sha256::digest(b));
        let mut files = std::collections::BTreeMap::new();
        files.insert("model.onnx".to_owned(), sha(&model));
        files.insert("data.bin".to_owned(), sha(&data));
        let kept = read_verified_keeping(dir.path(), &files, |n| n == "model.onnx").unwrap();
        assert_eq!(kept.keys().collect::<Vec<_>>(), ["model.onnx"]);
        assert_eq!(kept["model.onnx"], model);
        files.insert("data.bin".to_owned(), sha(b"other"));
        let err = read_verified_keeping(dir.path(), &files, |n| n == "model.onnx").unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
    }

    /// What `open_regular` opens after its inspection (where a FIFO or a link may have been
    /// swapped in) is opened without waiting for a writer and without following a link.
    #[test]
    fn a_fifo_or_link_swapped_in_is_opened_without_waiting_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("bundle.toml.minisig");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if !made.is_ok_and(|s| s.success()) {
            eprintln!("mkfifo unavailable; FIFO case skipped");
            return;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let opened = open_without_waiting(&path).map(|f| f.metadata().unwrap().is_file());
            let _ = tx.send(opened);
        });
        // No writer ever comes: a plain open would wait for good.
        let opened = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the open of a FIFO returned");
        assert!(!opened.unwrap(), "a FIFO is not a regular file");

        let target = dir.path().join("real");
        std::fs::write(&target, b"x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = open_without_waiting(&link).unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(rustix::io::Errno::LOOP.raw_os_error())
        );
        assert!(
            open_without_waiting(&target)
                .unwrap()
                .metadata()
                .unwrap()
                .is_file()
        );
    }
}
