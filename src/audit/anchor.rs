//! An anchor kept outside the trail: the last record `nightingale audit verify --anchor FILE`
//! saw (its sequence number and hash). A hash chain by itself cannot show that records were
//! cut from its end (what is left is still a valid chain); with an anchor, a later check
//! finds the anchored record still there with the same hash, or says that the trail was cut
//! or rewritten, then moves the anchor on to the new last record. The anchor is only as good
//! as the place it is kept: somewhere the server's account cannot write (another machine,
//! write-once storage), or an attacker who cuts the trail rewrites the anchor too.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ChainSummary;

/// What the anchor file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anchor {
    pub seq: u64,
    pub hash: String,
    /// The sequence number the trail started at when the anchor was taken (0 unless older
    /// files had been archived away). Without it, every record before the anchored one
    /// could be removed, the rest put in a file named for where it now starts, and the
    /// check passed (a red-team finding). Anchors from before it have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first: Option<u64>,
    /// The sequence numbers the trail's files began at when the anchor was taken: what
    /// archiving (whole files) can make the trail's new start. A start inside a file passed
    /// `--archived` (a re-attack's finding: records cut from the live file's start).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub starts: Vec<u64>,
}

/// The largest anchor file read (one small JSON object, with the start of each file: 50,000
/// rotated files fit).
const MAX_ANCHOR_BYTES: u64 = 1 << 20;

/// Reads an anchor file; `Ok(None)` when there is none yet (the first check).
pub fn read(path: &Path) -> Result<Option<Anchor>, String> {
    // A regular file only (a FIFO would block the open for ever: a red-team finding), of
    // bounded size.
    let text = match crate::files::read_regular(path, MAX_ANCHOR_BYTES) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read the anchor {}: {e}", path.display())),
        Ok(bytes) => String::from_utf8(bytes)
            .map_err(|_| format!("the anchor {} is not UTF-8 text", path.display()))?,
    };
    let anchor: Anchor = serde_json::from_str(&text).map_err(|e| {
        format!(
            "the anchor {} is not an audit anchor ({{\"seq\": N, \"hash\": \"…\"}}): {e}",
            path.display()
        )
    })?;
    if anchor.hash.len() != 64 || !anchor.hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "the anchor {}: hash is not a SHA-256 in hex",
            path.display()
        ));
    }
    Ok(Some(anchor))
}

/// Whether a verified chain still holds the anchored record, unchanged, and starts where it
/// started then (unless `archived`: older files were archived away on purpose). `summary`
/// must come from a verification watching `anchor.seq`.
pub fn check(anchor: &Anchor, summary: &ChainSummary, archived: bool) -> Result<(), String> {
    // An anchor from before `first` was kept is read as taken on a trail starting at its
    // genesis (a re-attack's finding: read as "unknown", a cut start passed and the anchor
    // then recorded the cut start as the trail's); one archived earlier says so once with
    // --archived.
    if let (then, Some(now)) = (anchor.first.unwrap_or(0), summary.first_seq)
        && now > then
    {
        if !archived {
            return Err(format!(
                "the trail now starts at record {now}, but it started at record {then} when the anchor was taken: records were removed from its start (if older files were archived on purpose, check with --archived)"
            ));
        }
        if !anchor.starts.is_empty() && !anchor.starts.contains(&now) {
            return Err(format!(
                "the trail now starts at record {now}, where no file began when the anchor was taken: records were removed from inside a file, which archiving whole files does not do"
            ));
        }
    }
    if let Some(w) = &summary.watched {
        if w.hash.eq_ignore_ascii_case(&anchor.hash) {
            return Ok(());
        }
        return Err(format!(
            "record {} differs from the anchor's: the trail was rewritten since the anchor was taken",
            anchor.seq
        ));
    }
    match (summary.first_seq, summary.last_seq()) {
        (_, None) => Err(format!(
            "the trail is empty, but the anchor was taken at record {}: its records were removed",
            anchor.seq
        )),
        (_, Some(last)) if last < anchor.seq => Err(format!(
            "the trail ends at record {last}, but the anchor was taken at record {}: records were removed from its end",
            anchor.seq
        )),
        (Some(first), _) if archived => Err(format!(
            "the trail now starts at record {first}, after the anchor's record {}: it was archived away (keep a new anchor for what is left)",
            anchor.seq
        )),
        (Some(first), _) => Err(format!(
            "the trail now starts at record {first}, after the anchor's record {}: records were removed from its start (if they were archived on purpose, keep a new anchor for what is left)",
            anchor.seq
        )),
        (None, Some(_)) => Err(format!("record {} is not in the trail", anchor.seq)),
    }
}

/// Writes the anchor for the last record of `summary` (a temporary file beside it, synced,
/// renamed over it); nothing when it has none.
pub fn write(path: &Path, summary: &ChainSummary) -> std::io::Result<()> {
    let Some(tail) = &summary.tail else {
        return Ok(());
    };
    let anchor = Anchor {
        seq: tail.seq,
        hash: tail.hash.clone(),
        first: summary.first_seq,
        starts: summary.file_starts.clone(),
    };
    // An anchor named through a link is written where the link points (it was replaced by
    // a regular file, the target, where the operator keeps it, never moved on: a
    // re-attack's finding).
    let resolved;
    let path = if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        resolved = std::fs::canonicalize(path)?;
        resolved.as_path()
    } else {
        path
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    serde_json::to_writer(&mut tmp, &anchor)?;
    tmp.write_all(b"\n")?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
