//! Reading small files an operator names (certificates, keys): only regular files, of
//! bounded size.

use std::io::Read as _;
use std::path::Path;

/// Warns (the log) when `path`, holding `what` (a secret), can be read by others than its
/// owner, as for the audit digest key (a review found a world-readable TLS key and config
/// file with the admin token taken silently).
pub fn warn_if_others_can_read(path: &Path, what: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "{what} can be read by others than its owner: chmod 600 it"
            );
        }
    }
}

/// Reads a regular file (a link is followed) of at most `max` bytes. A FIFO would block the
/// read for ever and a device such as `/dev/zero` never end: both are refused
/// (`InvalidInput`, "not a regular file"), as a file over `max` is ("larger than … bytes").
/// A file that grows while it is read is cut at `max` + 1 bytes and refused too.
pub fn read_regular(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let too_large = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {max} bytes"),
        )
    };
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.len() > max {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(too_large());
    }
    Ok(bytes)
}
