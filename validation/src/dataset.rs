//! Labelled datasets, streamed: a CSV of features (a tabular bundle's feature names as
//! columns), or a CSV of predictions made elsewhere. Each row is either used or reported as
//! unusable with its row number and the reason; only a problem with the file itself (a
//! missing column, an unreadable file, a prediction that is not a probability) stops the run.
//!
//! Labels are `0`/`1` (1 = the bundle's positive label) or one of the output's class names.
//! Reasons never quote feature, subgroup or patient-id values (they may identify someone).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Seek};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

/// A problem with the dataset as a whole (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a regular file (a folder, FIFO, socket or device)")]
    NotRegular { path: PathBuf },
    #[error("{path}: leads outside the dataset folder")]
    Outside { path: PathBuf },
    #[error("{path}: not a readable CSV file at row {row}: {reason}")]
    Csv {
        path: PathBuf,
        row: u64,
        reason: String,
    },
    #[error("{path}: not a usable .npy file: {reason}")]
    Npy { path: PathBuf, reason: String },
    #[error("{path}: missing column(s) {}", .missing.iter().map(|c| format!("{c:?}")).collect::<Vec<_>>().join(", "))]
    MissingColumns { path: PathBuf, missing: Vec<String> },
    #[error("{path}: column {column:?} appears more than once in the header")]
    DuplicateColumn { path: PathBuf, column: String },
    #[error(
        "{path}: row {row}: the class probabilities sum to {sum}: a row's must sum to 1 (within {CLASS_SUM_TOLERANCE})"
    )]
    NotADistribution { path: PathBuf, row: u64, sum: f64 },
    #[error("{path}: row {row}: the prediction in column {column:?} {reason}")]
    BadPrediction {
        path: PathBuf,
        row: u64,
        column: String,
        reason: String,
    },
}

/// How far a row's class probabilities may sum from 1 (values rounded to a few decimals).
pub const CLASS_SUM_TOLERANCE: f64 = 0.01;

/// Why a relative path was refused by [`path_under`].
#[derive(Debug, PartialEq, Eq)]
pub enum PathRefused {
    /// Empty, too long, absolute, or with `.`/`..` components.
    NotRelative,
    /// The root folder does not exist.
    RootMissing,
    /// Nothing at that path.
    Missing,
    /// It leads out of the root (a symbolic link).
    Outside,
}

/// The canonical path `rel` leads to under `root`, refusing anything that leaves it (an
/// absolute path, `..`, a symbolic link pointing out). Used for datasets named under the
/// server's validation root, the files a DICOM dataset's manifest names, and the files of a
/// dataset folder.
pub fn path_under(root: &Path, rel: &str) -> Result<PathBuf, PathRefused> {
    let relative = plain_relative(rel)?;
    let root = root.canonicalize().map_err(|_| PathRefused::RootMissing)?;
    let joined = root.join(relative);
    let Ok(full) = joined.canonicalize() else {
        // Missing only where what does exist of the path is under the root: a link out of
        // it answers "outside" whether or not the rest exists there (a review's finding:
        // "missing" against "outside" told a caller which paths exist on the server).
        let inside = joined
            .ancestors()
            .skip(1)
            .find_map(|a| a.canonicalize().ok())
            .is_some_and(|a| a.starts_with(&root));
        return Err(if inside {
            PathRefused::Missing
        } else {
            PathRefused::Outside
        });
    };
    if !full.starts_with(&root) {
        return Err(PathRefused::Outside);
    }
    Ok(full)
}

/// Opens a dataset file for reading: it must be a regular file once links are followed (a
/// FIFO would hold the run, and the model's runs queued behind it, forever; a device never
/// ends). Opened without waiting for a writer, so a FIFO swapped in after the check is
/// refused too.
pub fn open_dataset_file(path: &Path) -> Result<File, DatasetError> {
    let io_err = |source| DatasetError::Io {
        path: path.to_owned(),
        source,
    };
    // The path is canonical, so a link met is one swapped in after it was checked (a
    // review's finding: a dataset replaced by a link out of the validation root after the
    // run was accepted was read).
    let file = match open_without_links(path) {
        Ok(fd) => File::from(fd),
        Err(rustix::io::Errno::LOOP | rustix::io::Errno::XDEV) => {
            return Err(DatasetError::Outside {
                path: path.to_owned(),
            });
        }
        Err(e) => return Err(io_err(io::Error::from(e))),
    };
    if !file.metadata().map_err(io_err)?.is_file() {
        return Err(DatasetError::NotRegular {
            path: path.to_owned(),
        });
    }
    Ok(file)
}

/// `rel` in the folder `dir` (canonical: no link along it), resolved (links followed) to a
/// path with no link in it, refused ([`PathRefused::Outside`]) when that is not under `dir`.
/// Unlike [`path_under`], `dir` is not resolved again: resolved, a dataset folder replaced
/// by a link after its run was accepted had the run read the folder the link led to (a
/// review's finding); here such a folder leads outside `dir` as it was.
pub fn path_in(dir: &Path, rel: &str) -> Result<PathBuf, PathRefused> {
    let relative = plain_relative(rel)?;
    let full = dir.join(relative);
    match full.canonicalize() {
        Ok(canonical) if canonical.starts_with(dir) => Ok(canonical),
        Ok(_) => Err(PathRefused::Outside),
        // Missing where what exists of it is in the folder, outside otherwise. A name that
        // is there but does not resolve is a link (dangling, or a loop): not "missing" (a
        // review's finding), and not followed.
        Err(_) if full.symlink_metadata().is_ok() => Err(PathRefused::Outside),
        Err(_) => {
            let inside = full
                .ancestors()
                .skip(1)
                .find_map(|a| a.canonicalize().ok())
                .is_some_and(|a| a.starts_with(dir));
            Err(if inside {
                PathRefused::Missing
            } else {
                PathRefused::Outside
            })
        }
    }
}

/// `rel` when it is a plain relative path: not empty, at most 1,024 bytes, only names (no
/// root, `.` or `..`).
fn plain_relative(rel: &str) -> Result<&Path, PathRefused> {
    let relative = Path::new(rel);
    if rel.is_empty()
        || rel.len() > 1024
        || !relative
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
    {
        return Err(PathRefused::NotRelative);
    }
    Ok(relative)
}

/// Opens `path` to read with no link followed anywhere along it (`openat2`
/// RESOLVE_NO_SYMLINKS; `O_NOFOLLOW` on its last component where the kernel lacks openat2),
/// without blocking (a FIFO does not wait for a writer). A link met is `ELOOP` (or `EXDEV`).
pub fn open_without_links(path: &Path) -> Result<std::os::fd::OwnedFd, rustix::io::Errno> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    match rustix::fs::openat2(
        rustix::fs::CWD,
        path,
        flags,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    ) {
        Err(rustix::io::Errno::NOSYS) => {
            rustix::fs::openat(rustix::fs::CWD, path, flags, Mode::empty())
        }
        other => other,
    }
}

/// `name` in the dataset folder `dir` (canonical), links followed, refused when it leads
/// outside the folder ([`path_in`]: a tensor folder's `images.npy` linking to a file elsewhere
/// on the server).
pub fn in_folder(dir: &Path, name: &str) -> Result<PathBuf, DatasetError> {
    let path = dir.join(name);
    path_in(dir, name).map_err(|e| match e {
        PathRefused::Outside => DatasetError::Outside { path },
        _ => DatasetError::Io {
            path,
            source: io::Error::new(io::ErrorKind::NotFound, "missing"),
        },
    })
}

/// Which columns mean what.
#[derive(Clone, Debug, Default)]
pub struct Columns {
    /// The model's input features, in the input's column order (none for predictions).
    pub features: Vec<String>,
    /// The label column (`label` by default).
    pub label: String,
    /// The positive class's score (predictions files only).
    pub score: Option<String>,
    /// Each class's probability, in the output's label order (multi-class predictions files).
    pub class_scores: Vec<String>,
    /// Columns that define subgroups (each value a subgroup).
    pub subgroups: Vec<String>,
    /// Patient (or other cluster) identifier for the cluster bootstrap.
    pub cluster: Option<String>,
    /// A file each row names (an image dataset's manifest).
    pub file: Option<String>,
}

/// How label values map to the positive class.
#[derive(Clone, Debug)]
pub struct LabelSpec {
    /// The bundle's positive class name.
    pub positive: String,
    /// Every class name of the output.
    pub classes: Vec<String>,
    /// Multi-class: a label is a class index (`0`..K−1) or name, not a 0/1 outcome.
    pub multiclass: bool,
}

impl LabelSpec {
    /// The class index of a label: for a binary output 1 (positive) or 0; for a multi-class
    /// one the index given, or the index of the name given.
    pub fn class_of(&self, s: &str) -> Option<usize> {
        if !self.multiclass {
            return self.parse(s).map(usize::from);
        }
        let s = s.trim();
        if let Ok(i) = s.parse::<usize>() {
            return (i < self.classes.len()).then_some(i);
        }
        self.classes.iter().position(|c| c == s)
    }

    /// `Some(true)` for the positive class, `Some(false)` for another known class.
    pub fn parse(&self, s: &str) -> Option<bool> {
        let s = s.trim();
        match s {
            "1" | "1.0" => return Some(true),
            "0" | "0.0" => return Some(false),
            _ => {}
        }
        if s == self.positive {
            Some(true)
        } else if self.classes.iter().any(|c| c == s) {
            Some(false)
        } else {
            None
        }
    }
}

/// One usable row.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// 1-based data row number (the header is not counted).
    pub row: u64,
    pub features: Vec<f32>,
    /// The given prediction (predictions files).
    pub score: Option<f64>,
    /// The given class probabilities (multi-class predictions files).
    pub class_scores: Vec<f64>,
    /// Binary: the positive class.
    pub label: bool,
    /// The class index (binary: 1 positive, 0 negative).
    pub class: usize,
    /// One value per subgroup column (an empty cell is the subgroup `""`, reported as
    /// "(missing)").
    pub subgroups: Vec<String>,
    pub cluster: Option<String>,
    /// The file the row names (an image dataset's manifest).
    pub file: Option<String>,
}

/// A row that could not be used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Unusable {
    pub row: u64,
    pub reason: String,
}

/// What the reader saw of the file, once it has been read to the end.
#[derive(Clone, Debug, Serialize)]
pub struct DatasetSummary {
    pub path: String,
    /// SHA-256 of the file's bytes.
    pub sha256: String,
    pub bytes: u64,
    pub rows_read: u64,
    /// Columns that were neither features, label, score, subgroup nor cluster: the first
    /// [`MAX_IGNORED_LISTED`], each cut at [`MAX_IGNORED_NAME_CHARS`] characters (a cut name
    /// ends with `…`).
    pub columns_ignored: Vec<String>,
    /// How many columns were ignored (listed or not).
    pub columns_ignored_count: usize,
    /// A tensor dataset's files and their SHA-256 (`sha256` above is that of their
    /// `sha256sum`-style listing).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub files: std::collections::BTreeMap<String, String>,
}

/// Ignored columns listed by name in the report (the rest are counted).
pub const MAX_IGNORED_LISTED: usize = 64;

/// The most columns a CSV dataset may have. Each costs the reader about 140 bytes beyond
/// its name: a 225 MB header of 40 million one-to-five-letter names took 6.3 GB before its
/// missing columns were named (a review's finding); 100,000 is far more than any tabular
/// model's features and their subgroups.
pub const MAX_COLUMNS: usize = 100_000;

/// The longest header row read, in bytes of the file (a header is read whole before its
/// columns can be counted).
pub const MAX_HEADER_BYTES: u64 = 16 << 20;

/// An ignored column's name is cut at this many characters in the report.
pub const MAX_IGNORED_NAME_CHARS: usize = 128;

/// `name`, or its first [`MAX_IGNORED_NAME_CHARS`] characters and `…`.
fn cut_name(name: &str) -> String {
    match name.char_indices().nth(MAX_IGNORED_NAME_CHARS) {
        None => name.to_owned(),
        Some((at, _)) => format!("{}…", &name[..at]),
    }
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
    quotes: QuoteState,
    /// While the header row is read: at most this many bytes of the file
    /// ([`MAX_HEADER_BYTES`]).
    header_limit: Option<u64>,
    /// The header row's field separators seen so far (outside quotes), until its end: a
    /// header of more than [`MAX_COLUMNS`] is refused as it is read, before the CSV reader
    /// keeps a field end for each (16 MiB of commas took 445 MB: a re-attack's finding).
    header_commas: usize,
    /// The header row has begun (a byte other than a line end: the CSV reader skips blank
    /// lines before it, so a leading blank line ended the count before the header: a
    /// re-attack's finding).
    header_started: bool,
    /// The header row has ended (its first line end outside quotes).
    header_ended: bool,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.header_limit.is_some_and(|limit| self.bytes >= limit) {
            return Err(io::Error::other(format!(
                "the header row is longer than {} MiB",
                MAX_HEADER_BYTES >> 20
            )));
        }
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        for (i, &b) in buf[..n].iter().enumerate() {
            // A UTF-8 byte order mark opening the file is no part of a field.
            let offset = self.bytes + i as u64;
            if offset < 3 && b == [0xEF, 0xBB, 0xBF][offset as usize] {
                continue;
            }
            let quoted = self.quotes == QuoteState::Quoted;
            self.quotes = self.quotes.next(b);
            if !self.header_ended && !quoted {
                match b {
                    b'\n' | b'\r' => self.header_ended = self.header_started,
                    b',' => {
                        self.header_started = true;
                        self.header_commas += 1;
                    }
                    _ => self.header_started = true,
                }
            }
        }
        self.bytes += n as u64;
        if self.header_limit.is_some() && self.header_commas >= MAX_COLUMNS {
            return Err(io::Error::other(format!(
                "the header names more than {MAX_COLUMNS} columns"
            )));
        }
        Ok(n)
    }
}

/// Where the bytes read so far end, as RFC 4180 quoting goes (the `csv` reader's own rules:
/// a quote opens a field only at its start; in a quoted field `""` is a quote). The `csv`
/// reader takes a quoted field still open at the end of the file as ending there, so
/// every row after an unclosed quote became part of one field, silently (a red-team
/// finding: three rows of four vanished into a subgroup value).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum QuoteState {
    #[default]
    FieldStart,
    Unquoted,
    Quoted,
    /// A quote inside a quoted field: it closes the field, or is the first of `""`.
    QuoteInQuoted,
}

impl QuoteState {
    fn next(self, b: u8) -> QuoteState {
        let ends_field = matches!(b, b',' | b'\r' | b'\n');
        match self {
            QuoteState::FieldStart if b == b'"' => QuoteState::Quoted,
            QuoteState::FieldStart | QuoteState::Unquoted | QuoteState::QuoteInQuoted
                if ends_field =>
            {
                QuoteState::FieldStart
            }
            QuoteState::FieldStart | QuoteState::Unquoted => QuoteState::Unquoted,
            QuoteState::Quoted if b == b'"' => QuoteState::QuoteInQuoted,
            QuoteState::Quoted => QuoteState::Quoted,
            QuoteState::QuoteInQuoted if b == b'"' => QuoteState::Quoted,
            QuoteState::QuoteInQuoted => QuoteState::Unquoted,
        }
    }
}

/// The rows of a dataset seen so far, by a digest of their contents: a row equal to an
/// earlier one is unusable ("the same record as row N"), so a file listed twice, or rows
/// copied, count once. Copied rows passed the gate's minimum sample and narrowed its
/// intervals (13 rows failed the gate, the same 13 twice passed it: a review's finding), as
/// images named twice did before DICOM datasets counted an image once.
#[derive(Default)]
pub struct SeenRows {
    first: HashMap<[u8; 16], u64>,
}

impl SeenRows {
    /// `Some(first row)` when a row of this `key` was seen before; else remembers it as
    /// `row`'s.
    pub fn repeated(&mut self, row: u64, key: &[u8]) -> Option<u64> {
        let digest: [u8; 32] = Sha256::digest(key).into();
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest[..16]);
        match self.first.entry(key) {
            std::collections::hash_map::Entry::Occupied(first) => Some(*first.get()),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(row);
                None
            }
        }
    }
}

/// What a CSV column is to [`SeenRows`]: rows are compared by their features' values (the
/// numbers the model sees: `14.45` and `14.450`, `1044` and `1044.0`, one record: a
/// re-attack's finding), their label's class, and the other fields' trimmed text.
#[derive(Clone, Copy)]
enum FieldKind {
    Feature(usize),
    Label,
    Text,
}

/// The reason given for a row equal to an earlier one.
pub fn repeated_reason(first: u64, what: &str) -> String {
    let advice = if what == "record" {
        " (give records that are truly identical an id column of their own to keep them apart)"
    } else {
        ""
    };
    format!("the same {what} as row {first}: a row counts once{advice}")
}

/// The bytes a CSV record is compared by ([`FieldKind`]): each field tagged with its kind,
/// a feature as its value's bits (-0 as 0), the label as its class, text trimmed and
/// length-prefixed.
fn record_key(
    rec: &csv::StringRecord,
    kinds: &[FieldKind],
    features: &[f32],
    class: usize,
) -> Vec<u8> {
    let mut key = Vec::with_capacity(16 * kinds.len());
    for (field, kind) in rec.iter().zip(kinds) {
        match *kind {
            FieldKind::Feature(k) => {
                let v = features[k];
                let v = if v == 0.0 { 0.0f32 } else { v };
                key.push(b'f');
                key.extend_from_slice(&v.to_bits().to_le_bytes());
            }
            FieldKind::Label => {
                key.push(b'l');
                key.extend_from_slice(&(class as u64).to_le_bytes());
            }
            FieldKind::Text => {
                let t = field.trim();
                key.push(b't');
                key.extend_from_slice(&(t.len() as u64).to_le_bytes());
                key.extend_from_slice(t.as_bytes());
            }
        }
    }
    key
}

/// A CSV dataset read row by row.
pub struct CsvDataset {
    /// Rows seen, for a dataset of features (not one of predictions, whose rounded scores
    /// and labels repeat in patients of their own, nor one of DICOM files, whose files are
    /// compared by the run).
    seen: Option<SeenRows>,
    /// Each column's kind, for [`SeenRows`].
    kinds: Vec<FieldKind>,
    /// The header's column names (for errors).
    column_names: Vec<String>,
    path: PathBuf,
    reader: csv::Reader<HashingReader<File>>,
    labels: LabelSpec,
    feature_idx: Vec<usize>,
    feature_names: Vec<String>,
    label_idx: usize,
    score: Option<(usize, String)>,
    class_scores: Vec<(usize, String)>,
    subgroup_idx: Vec<usize>,
    cluster_idx: Option<usize>,
    file_idx: Option<usize>,
    columns_ignored: Vec<String>,
    columns_ignored_count: usize,
    record: csv::StringRecord,
    rows: u64,
}

impl CsvDataset {
    pub fn open(path: &Path, columns: &Columns, labels: LabelSpec) -> Result<Self, DatasetError> {
        let file = open_dataset_file(path)?;
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(false)
            .from_reader(HashingReader {
                inner: file,
                hasher: Sha256::new(),
                bytes: 0,
                quotes: QuoteState::default(),
                header_limit: Some(MAX_HEADER_BYTES),
                header_commas: 0,
                header_started: false,
                header_ended: false,
            });
        let header = reader
            .headers()
            .map_err(|e| DatasetError::Csv {
                path: path.to_owned(),
                row: 0,
                reason: e.to_string(),
            })?
            .clone();
        reader.get_mut().header_limit = None;
        if header.len() > MAX_COLUMNS {
            return Err(DatasetError::Csv {
                path: path.to_owned(),
                row: 0,
                reason: format!(
                    "the header names {} columns, more than {MAX_COLUMNS}",
                    header.len()
                ),
            });
        }
        let names: Vec<String> = header.iter().map(|h| h.trim().to_owned()).collect();
        let mut seen = HashSet::new();
        for n in &names {
            if !seen.insert(n.as_str()) {
                return Err(DatasetError::DuplicateColumn {
                    path: path.to_owned(),
                    column: n.clone(),
                });
            }
        }
        let find = |c: &str| names.iter().position(|n| n == c);
        let mut missing = Vec::new();
        let mut need = |c: &str| {
            let i = find(c);
            if i.is_none() {
                missing.push(c.to_owned());
            }
            i.unwrap_or(0)
        };
        let feature_idx: Vec<usize> = columns.features.iter().map(|f| need(f)).collect();
        let label_idx = need(&columns.label);
        let score_idx = columns.score.as_ref().map(|s| need(s));
        let class_score_idx: Vec<usize> = columns.class_scores.iter().map(|c| need(c)).collect();
        let subgroup_idx: Vec<usize> = columns.subgroups.iter().map(|s| need(s)).collect();
        let cluster_idx = columns.cluster.as_ref().map(|c| need(c));
        let file_idx = columns.file.as_ref().map(|c| need(c));
        if !missing.is_empty() {
            return Err(DatasetError::MissingColumns {
                path: path.to_owned(),
                missing,
            });
        }
        let used: HashSet<usize> = feature_idx
            .iter()
            .chain(&subgroup_idx)
            .copied()
            .chain([label_idx])
            .chain(score_idx)
            .chain(class_score_idx.iter().copied())
            .chain(cluster_idx)
            .chain(file_idx)
            .collect();
        // Listed in the report, which is kept (an upload's header included) and read whole by
        // `--require-validation`: a 34 MB column name made a failing report too large to be
        // read, and an older pass decided (a red-team finding).
        let ignored: Vec<&String> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| !used.contains(i))
            .map(|(_, n)| n)
            .collect();
        let columns_ignored_count = ignored.len();
        let columns_ignored = ignored
            .into_iter()
            .take(MAX_IGNORED_LISTED)
            .map(|n| cut_name(n))
            .collect();
        let features_only = score_idx.is_none() && class_score_idx.is_empty() && file_idx.is_none();
        let mut kinds = vec![FieldKind::Text; names.len()];
        for (k, &i) in feature_idx.iter().enumerate() {
            kinds[i] = FieldKind::Feature(k);
        }
        kinds[label_idx] = FieldKind::Label;
        Ok(CsvDataset {
            seen: features_only.then(SeenRows::default),
            kinds,
            column_names: names.clone(),
            path: path.to_owned(),
            reader,
            labels,
            feature_idx,
            feature_names: columns.features.clone(),
            label_idx,
            score: score_idx.zip(columns.score.clone()),
            class_scores: class_score_idx
                .into_iter()
                .zip(columns.class_scores.iter().cloned())
                .collect(),
            subgroup_idx,
            cluster_idx,
            file_idx,
            columns_ignored,
            columns_ignored_count,
            record: csv::StringRecord::new(),
            rows: 0,
        })
    }

    /// The next row: `Ok(None)` at the end of the file.
    pub fn next_row(&mut self) -> Result<Option<Result<Row, Unusable>>, DatasetError> {
        match self.reader.read_record(&mut self.record) {
            Ok(false) if self.reader.get_ref().quotes == QuoteState::Quoted => {
                return Err(DatasetError::Csv {
                    path: self.path.clone(),
                    row: self.rows,
                    reason: "the file ends inside a quoted field: a quote opened on this row or \
                             before is never closed, and every row after it would be read as \
                             part of that field"
                        .to_owned(),
                });
            }
            Ok(false) => return Ok(None),
            Ok(true) => {}
            Err(e) => {
                // an unequal number of fields is the row's problem; anything else the file's
                let row = self.rows + 1;
                if let csv::ErrorKind::UnequalLengths {
                    len, expected_len, ..
                } = e.kind()
                {
                    self.rows += 1;
                    return Ok(Some(Err(Unusable {
                        row,
                        reason: format!("{len} fields where the header has {expected_len}"),
                    })));
                }
                // Not UTF-8: the column by its header's name (the csv crate's message counts
                // fields from 0, which sent an operator to the column before: a review's
                // finding).
                let reason = match e.kind() {
                    csv::ErrorKind::Utf8 { err, .. } => format!(
                        "column {:?} is not UTF-8 (a Latin-1 or Windows-1252 export? convert it: iconv -f latin1 -t utf-8)",
                        self.column_names
                            .get(err.field())
                            .map_or("?", String::as_str)
                    ),
                    _ => e.to_string(),
                };
                return Err(DatasetError::Csv {
                    path: self.path.clone(),
                    row,
                    reason,
                });
            }
        }
        self.rows += 1;
        let row = self.rows;
        let rec = &self.record;
        let label_text = rec.get(self.label_idx).unwrap_or("");
        let Some(class) = self.labels.class_of(label_text) else {
            // Quoted only when it is a short number (a class index gone wrong): any other
            // text may be an identifier (a patient-id column named as the label put MRNs in
            // the report and the server's log: a red-team finding).
            let t = label_text.trim();
            let shown = if t.len() <= 4
                && t.bytes()
                    .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-')
            {
                format!("{t:?}")
            } else {
                format!("of {} characters", t.chars().count())
            };
            let allowed = if self.labels.multiclass {
                format!("a class index below {} or", self.labels.classes.len())
            } else {
                "0, 1 or".to_owned()
            };
            return Ok(Some(Err(Unusable {
                row,
                reason: format!(
                    "label {shown} is not {allowed} one of the bundle's classes ({})",
                    self.labels.classes.join(", ")
                ),
            })));
        };
        let label = class == 1 && !self.labels.multiclass;
        let mut features = Vec::with_capacity(self.feature_idx.len());
        for (k, &i) in self.feature_idx.iter().enumerate() {
            let cell = rec.get(i).unwrap_or("").trim();
            let reason = if cell.is_empty() {
                "is empty"
            } else {
                match cell.parse::<f32>() {
                    Ok(v) if v.is_finite() => {
                        features.push(v);
                        continue;
                    }
                    Ok(_) => "is not finite",
                    Err(_) => "is not a number",
                }
            };
            return Ok(Some(Err(Unusable {
                row,
                reason: format!("feature {:?} {reason}", self.feature_names[k]),
            })));
        }
        let probability = |(i, name): &(usize, String)| {
            let cell = rec.get(*i).unwrap_or("").trim();
            let bad = |reason: &str| DatasetError::BadPrediction {
                path: self.path.clone(),
                row,
                column: name.clone(),
                reason: reason.to_owned(),
            };
            match cell.parse::<f64>() {
                Ok(v) if v.is_nan() => Err(bad("is NaN")),
                Ok(v) if v.is_infinite() => Err(bad("is infinite")),
                Ok(v) if !(0.0..=1.0).contains(&v) => Err(bad("is outside [0, 1]")),
                Ok(v) => Ok(v),
                Err(_) if cell.is_empty() => Err(bad("is empty")),
                Err(_) => Err(bad("is not a number")),
            }
        };
        let score = self.score.as_ref().map(probability).transpose()?;
        let class_scores = self
            .class_scores
            .iter()
            .map(probability)
            .collect::<Result<Vec<f64>, _>>()?;
        // One distribution over the classes: a row of 1.0 in every column (summing to 8) was
        // scored, a Brier of 7 in the report, and shrinking a row's other classes lowers its
        // Brier (a red-team finding). Rounding to a few decimals is allowed for.
        let sum: f64 = class_scores.iter().sum();
        if !class_scores.is_empty() && (sum - 1.0).abs() > CLASS_SUM_TOLERANCE {
            return Err(DatasetError::NotADistribution {
                path: self.path.clone(),
                row,
                sum,
            });
        }
        let subgroups = self
            .subgroup_idx
            .iter()
            .map(|&i| rec.get(i).unwrap_or("").trim().to_owned())
            .collect();
        let cluster = match self.cluster_idx {
            None => None,
            Some(i) => {
                let c = rec.get(i).unwrap_or("").trim();
                if c.is_empty() {
                    return Ok(Some(Err(Unusable {
                        row,
                        reason: "the patient-id (cluster) column is empty".to_owned(),
                    })));
                }
                Some(c.to_owned())
            }
        };
        let file = match self.file_idx {
            None => None,
            Some(i) => {
                let f = rec.get(i).unwrap_or("").trim();
                if f.is_empty() {
                    return Ok(Some(Err(Unusable {
                        row,
                        reason: "the file column is empty".to_owned(),
                    })));
                }
                Some(f.to_owned())
            }
        };
        // Every field of the record, the ignored ones too (an id column keeps apart records
        // that are truly identical otherwise).
        if let Some(seen) = &mut self.seen
            && let Some(first) = seen.repeated(row, &record_key(rec, &self.kinds, &features, class))
        {
            return Ok(Some(Err(Unusable {
                row,
                reason: repeated_reason(first, "record"),
            })));
        }
        Ok(Some(Ok(Row {
            row,
            features,
            score,
            class_scores,
            label,
            class,
            subgroups,
            cluster,
            file,
        })))
    }

    /// Bytes of the file read so far (ahead of the rows returned by the reader's buffer).
    pub fn bytes_read(&self) -> u64 {
        self.reader.get_ref().bytes
    }

    /// Reads whatever is left (so the hash covers the whole file) and sums up.
    pub fn finish(mut self) -> Result<DatasetSummary, DatasetError> {
        let mut rest = Vec::new();
        self.reader
            .get_mut()
            .read_to_end(&mut rest)
            .map_err(|source| DatasetError::Io {
                path: self.path.clone(),
                source,
            })?;
        let inner = self.reader.into_inner();
        Ok(DatasetSummary {
            path: self.path.display().to_string(),
            sha256: hex::encode(inner.hasher.finalize()),
            bytes: inner.bytes,
            rows_read: self.rows,
            columns_ignored: self.columns_ignored,
            columns_ignored_count: self.columns_ignored_count,
            files: std::collections::BTreeMap::new(),
        })
    }
}

/// A tensor dataset: a folder with `images.npy` (float32, C order, `[n, …]`: each row one
/// model input, already preprocessed) and `labels.npy` (int64 or int32 `[n]`: class indices),
/// the layout of the image bundles' test splits. Rows are read one at a time.
pub struct NpyDataset {
    path: PathBuf,
    data: npyz::NpyReader<f32, io::BufReader<File>>,
    labels: Vec<i64>,
    classes: usize,
    multiclass: bool,
    /// Binary: the class index of the positive label (labels.npy holds the output's class
    /// indices, and the positive label need not be index 1: wdbc-malignancy's is 0; taking
    /// 1 as positive inverted such a model's AUROC, a red-team finding). `None` when the
    /// output names no classes: 1 is positive.
    positive_index: Option<usize>,
    /// Elements per row, and the row's shape.
    row_len: usize,
    row_shape: Vec<usize>,
    rows: u64,
    bytes_per_row: u64,
    files: Vec<(String, String)>,
    seen: SeenRows,
}

fn npy_error(path: &Path, reason: impl std::fmt::Display) -> DatasetError {
    DatasetError::Npy {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

impl NpyDataset {
    /// Whether `path` is a folder holding `images.npy` and `labels.npy`.
    pub fn is_npy_folder(path: &Path) -> bool {
        path.join("images.npy").is_file() && path.join("labels.npy").is_file()
    }

    /// `input_shape`: the model input's declared shape (`-1` any size), batch dimension first.
    pub fn open(dir: &Path, input_shape: &[i64], labels: &LabelSpec) -> Result<Self, DatasetError> {
        let images = dir.join("images.npy");
        let label_path = dir.join("labels.npy");
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| DatasetError::Io { path, source }
        };
        // Each file opened once: hashed, then read from the start.
        let open_hashed = |name: &str| -> Result<(File, (String, String)), DatasetError> {
            let path = in_folder(dir, name)?;
            let mut file = open_dataset_file(&path)?;
            let mut hasher = Sha256::new();
            io::copy(&mut file, &mut hasher)
                .and_then(|_| file.rewind())
                .map_err(io_err(&path))?;
            Ok((file, (name.to_owned(), hex::encode(hasher.finalize()))))
        };
        let (image_file, image_hash) = open_hashed("images.npy")?;
        let (label_file, label_hash) = open_hashed("labels.npy")?;
        let files = vec![image_hash, label_hash];
        let lf = npyz::NpyFile::new(io::BufReader::new(label_file))
            .map_err(|e| npy_error(&label_path, e))?;
        if lf.shape().len() != 1 {
            return Err(npy_error(
                &label_path,
                format!("shape {:?}: expected [n]", lf.shape()),
            ));
        }
        let descr = lf.dtype().descr();
        let label_values: Vec<i64> = match descr.trim_matches(|c| c == '\'' || c == '"') {
            "<i8" => lf
                .into_vec::<i64>()
                .map_err(|e| npy_error(&label_path, e))?,
            "<i4" => lf
                .into_vec::<i32>()
                .map_err(|e| npy_error(&label_path, e))?
                .into_iter()
                .map(i64::from)
                .collect(),
            other => {
                return Err(npy_error(
                    &label_path,
                    format!("dtype {other}: expected <i8 or <i4"),
                ));
            }
        };
        let f = npyz::NpyFile::new(io::BufReader::new(image_file))
            .map_err(|e| npy_error(&images, e))?;
        if f.order() != npyz::Order::C {
            return Err(npy_error(&images, "Fortran order: expected C order"));
        }
        let shape: Vec<usize> = f
            .shape()
            .iter()
            .map(|&d| usize::try_from(d).unwrap_or(usize::MAX))
            .collect();
        let Some((&n, row_shape)) = shape.split_first() else {
            return Err(npy_error(&images, "a 0-dimensional array"));
        };
        if n != label_values.len() {
            return Err(npy_error(
                &images,
                format!("{n} rows but labels.npy has {}", label_values.len()),
            ));
        }
        let declared = input_shape.get(1..).unwrap_or(&[]);
        let fits = declared.len() == row_shape.len()
            && declared
                .iter()
                .zip(row_shape)
                .all(|(&d, &r)| d < 0 || usize::try_from(d).is_ok_and(|d| d == r));
        if !fits {
            return Err(npy_error(
                &images,
                format!("rows of shape {row_shape:?} do not fit the model input {input_shape:?}"),
            ));
        }
        let row_len: usize = row_shape.iter().product();
        if row_len == 0 || row_len > 1 << 28 {
            return Err(npy_error(&images, format!("{row_len} elements per row")));
        }
        let data = f.data::<f32>().map_err(|e| npy_error(&images, e))?;
        Ok(NpyDataset {
            path: dir.to_owned(),
            data,
            labels: label_values,
            classes: labels.classes.len(),
            multiclass: labels.multiclass,
            positive_index: labels.classes.iter().position(|c| *c == labels.positive),
            row_len,
            row_shape: row_shape.to_vec(),
            rows: 0,
            bytes_per_row: row_len as u64 * 4,
            files,
            seen: SeenRows::default(),
        })
    }

    /// The shape of one row (the model input without its batch dimension).
    pub fn row_shape(&self) -> &[usize] {
        &self.row_shape
    }

    pub fn next_row(&mut self) -> Result<Option<Result<Row, Unusable>>, DatasetError> {
        let Some(&label) = self.labels.get(self.rows as usize) else {
            return Ok(None);
        };
        let mut features = Vec::with_capacity(self.row_len);
        for _ in 0..self.row_len {
            match self.data.next() {
                Some(Ok(v)) => features.push(v),
                Some(Err(e)) => return Err(npy_error(&self.path, e)),
                None => return Err(npy_error(&self.path, "images.npy ends early")),
            }
        }
        self.rows += 1;
        let row = self.rows;
        // Binary: a class index of the output (any of its classes; the positive one, or
        // another), or 0/1 when it names none.
        let bound = match (self.multiclass, self.positive_index) {
            (true, _) | (false, Some(_)) => self.classes,
            (false, None) => 2,
        };
        let Some(index) = usize::try_from(label).ok().filter(|&c| c < bound) else {
            return Ok(Some(Err(Unusable {
                row,
                reason: format!("label {label} is not a class index below {bound}"),
            })));
        };
        // Binary rows carry 1 for the positive class, 0 for any other (as CSV labels do).
        let class = match (self.multiclass, self.positive_index) {
            (true, _) => index,
            (false, Some(p)) => usize::from(index == p),
            (false, None) => index,
        };
        if features.iter().any(|v| !v.is_finite()) {
            return Ok(Some(Err(Unusable {
                row,
                reason: "the image holds non-finite values".to_owned(),
            })));
        }
        let mut key: Vec<u8> = features.iter().flat_map(|v| v.to_le_bytes()).collect();
        key.extend_from_slice(&label.to_le_bytes());
        if let Some(first) = self.seen.repeated(row, &key) {
            return Ok(Some(Err(Unusable {
                row,
                reason: repeated_reason(first, "image and label"),
            })));
        }
        Ok(Some(Ok(Row {
            row,
            features,
            score: None,
            class_scores: Vec::new(),
            label: !self.multiclass && class == 1,
            class,
            subgroups: Vec::new(),
            cluster: None,
            file: None,
        })))
    }

    pub fn bytes_read(&self) -> u64 {
        self.rows * self.bytes_per_row
    }

    /// The summary: `sha256` is the SHA-256 of the `sha256sum`-style listing of both files
    /// (`<sha256>  images.npy\n<sha256>  labels.npy\n`); each file's own is in `files`.
    pub fn finish(self) -> DatasetSummary {
        let listing: String = self
            .files
            .iter()
            .map(|(name, sha)| format!("{sha}  {name}\n"))
            .collect();
        let bytes = self
            .files
            .iter()
            .filter_map(|(name, _)| std::fs::metadata(self.path.join(name)).ok())
            .map(|m| m.len())
            .sum();
        DatasetSummary {
            path: self.path.display().to_string(),
            sha256: hex::encode(Sha256::digest(listing.as_bytes())),
            bytes,
            rows_read: self.rows,
            columns_ignored: Vec::new(),
            columns_ignored_count: 0,
            files: self.files.into_iter().collect(),
        }
    }
}

/// A version 1.0 `.npy` file of `descr` with `shape` (both as numpy writes them in its
/// header, e.g. `<f4` and `(2, 3)`), `data` as given: for tests and tools that need files a
/// writer would refuse to make (a shape past `u64`, a header that lies about its data).
#[doc(hidden)]
pub fn npy_v1(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(
        &u16::try_from(header.len())
            .unwrap_or(u16::MAX)
            .to_le_bytes(),
    );
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> LabelSpec {
        LabelSpec {
            positive: "malignant".into(),
            classes: vec!["malignant".into(), "benign".into()],
            multiclass: false,
        }
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn read_all(ds: &mut CsvDataset) -> Vec<Result<Row, Unusable>> {
        let mut out = Vec::new();
        while let Some(r) = ds.next_row().unwrap() {
            out.push(r);
        }
        out
    }

    /// A review's finding: the same rows twice passed a gate the rows alone failed. A row
    /// equal to an earlier one in every field is unusable and names it; a field that differs
    /// (an id column, ignored or not) keeps two rows apart; predictions files, whose
    /// rounded scores repeat in patients of their own, are not compared.
    #[test]
    fn a_record_repeated_counts_once() {
        let cols = Columns {
            features: vec!["a".into(), "b".into()],
            label: "label".into(),
            ..Columns::default()
        };
        // rows 3, 6 and 7 repeat rows 1, 2 and 1 (row 7 written otherwise: the same
        // numbers, the same id once trimmed); rows 4 and 5 differ by their id and label
        let text = "a,b,label,id\n1,2,1,p1\n3,4,0,p2\n1,2,1,p1\n1,2,1,p3\n1,2,0,p1\n3,4,0,p2\n1.0,2.00,1, p1 \n";
        let f = write(text);
        let mut ds = CsvDataset::open(f.path(), &cols, labels()).unwrap();
        let rows = read_all(&mut ds);
        let repeated: Vec<(u64, &str)> = rows
            .iter()
            .filter_map(|r| r.as_ref().err())
            .map(|u| (u.row, u.reason.as_str()))
            .collect();
        assert_eq!(repeated.len(), 3, "{repeated:?}");
        assert_eq!(repeated[2].0, 7);
        assert!(
            repeated[2].1.starts_with("the same record as row 1:"),
            "{repeated:?}"
        );
        assert_eq!(repeated[0].0, 3);
        assert!(
            repeated[0].1.starts_with("the same record as row 1:"),
            "{repeated:?}"
        );
        assert_eq!(repeated[1].0, 6);
        assert!(
            repeated[1].1.starts_with("the same record as row 2:"),
            "{repeated:?}"
        );

        let predictions = Columns {
            features: vec![],
            label: "label".into(),
            score: Some("score".into()),
            ..Columns::default()
        };
        let f = write("label,score\n1,0.9\n1,0.9\n0,0.1\n0,0.1\n");
        let mut ds = CsvDataset::open(f.path(), &predictions, labels()).unwrap();
        assert!(read_all(&mut ds).iter().all(Result::is_ok));

        // A byte that is not UTF-8 names its column by the header (a Latin-1 note)
        let mut latin1 = b"a,b,label,note\n1,2,1,ok\n3,4,0,M".to_vec();
        latin1.extend_from_slice(&[0xFC]);
        latin1.extend_from_slice(b"ller\n");
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, &latin1).unwrap();
        let mut ds = CsvDataset::open(f.path(), &cols, labels()).unwrap();
        assert!(ds.next_row().unwrap().unwrap().is_ok());
        let Err(DatasetError::Csv { reason, .. }) = ds.next_row() else {
            panic!("not a CSV error");
        };
        assert!(reason.contains("column \"note\" is not UTF-8"), "{reason}");
    }

    /// Red-team finding: a quote opened and never closed took every later row into one
    /// field, silently (pandas: "EOF inside string"). Quoted fields with commas, line breaks
    /// and `""`, a quote inside an unquoted field, and a byte order mark still read.
    #[test]
    fn a_quote_never_closed_is_an_error_not_rows_swallowed() {
        let cols = Columns {
            features: vec![],
            label: "label".into(),
            score: Some("score".into()),
            subgroups: vec!["site".into()],
            ..Columns::default()
        };
        let f = write("label,score,site\n1,0.9,\"a\n0,0.1,b\n1,0.3,a\n0,0.2,b\n");
        let mut ds = CsvDataset::open(f.path(), &cols, labels()).unwrap();
        let first = ds.next_row().unwrap().unwrap().unwrap();
        assert_eq!(first.subgroups[0].lines().count(), 4);
        let e = ds.next_row().unwrap_err().to_string();
        assert!(e.contains("ends inside a quoted field"), "{e}");
        let f = write(
            "\u{feff}\"label\",score,site\r\n1,0.9,\"a, \"\"b\"\"\nc\"\r\n0,0.1,x\"y\n1,0.3,\"\"\n",
        );
        let mut ds = CsvDataset::open(f.path(), &cols, labels()).unwrap();
        let rows = read_all(&mut ds);
        let sites: Vec<&str> = rows
            .iter()
            .map(|r| r.as_ref().unwrap().subgroups[0].as_str())
            .collect();
        assert_eq!(sites, ["a, \"b\"\nc", "x\"y", ""]);
    }

    /// A review's finding: a 225 MB header of 40 million short column names took 6.3 GB
    /// before its missing columns were named. The header is read to at most 16 MiB and may
    /// name at most 100,000 columns; a wide one within both still reads.
    #[test]
    fn a_header_too_wide_or_too_long_is_refused_before_its_columns_are_kept() {
        let cols = Columns {
            label: "label".into(),
            score: Some("score".into()),
            ..Columns::default()
        };
        let names = |n: usize| (0..n).map(|i| format!(",c{i}")).collect::<String>();
        let f = write(&format!(
            "label,score{}\n1,0.5{}\n",
            names(MAX_COLUMNS),
            ",1".repeat(MAX_COLUMNS)
        ));
        let e = CsvDataset::open(f.path(), &cols, labels())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("more than 100000"), "{e}");
        // Blank lines before the header (the CSV reader skips them) do not end the count.
        let f = write(&format!("\n\r\n{}\n1,2\n", ",".repeat(MAX_COLUMNS + 5)));
        let e = CsvDataset::open(f.path(), &cols, labels())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("the header names more than 100000 columns"),
            "{e}"
        );
        let f = write(&format!(
            "label,score,{}\n1,0.5,1\n",
            "x".repeat(MAX_HEADER_BYTES as usize + 1)
        ));
        let e = CsvDataset::open(f.path(), &cols, labels())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("header row is longer than 16 MiB"), "{e}");
        let wide = MAX_COLUMNS - 2;
        let f = write(&format!(
            "label,score{}\n1,0.5{}\n",
            names(wide),
            ",1".repeat(wide)
        ));
        let mut ds = CsvDataset::open(f.path(), &cols, labels()).unwrap();
        assert_eq!(read_all(&mut ds).len(), 1);
    }

    /// A review's finding: through a link out of the root, "missing" against "outside"
    /// told a caller which paths exist on the server. Both are "outside" now; a path that
    /// is missing under the root is still "missing".
    #[test]
    fn a_path_through_a_link_out_is_outside_whether_or_not_it_exists() {
        let root = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::write(elsewhere.path().join("exists.csv"), "label\n1\n").unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), root.path().join("out")).unwrap();
        std::fs::create_dir(root.path().join("in")).unwrap();
        for rel in ["out/exists.csv", "out/missing.csv", "out/no/such/dir.csv"] {
            assert_eq!(
                path_under(root.path(), rel),
                Err(PathRefused::Outside),
                "{rel}"
            );
        }
        for rel in ["in/missing.csv", "missing/dir/x.csv"] {
            assert_eq!(
                path_under(root.path(), rel),
                Err(PathRefused::Missing),
                "{rel}"
            );
        }
    }

    #[test]
    fn rows_used_and_unusable_with_reasons() {
        let f = write(
            "a,b,label,site,extra\n1,2,1,x,9\n3,,0,y,9\n4,5,2,x,9\n6,nan,benign,y,9\n7,8,malignant,,9\n1,2\n",
        );
        let cols = Columns {
            features: vec!["a".into(), "b".into()],
            label: "label".into(),
            subgroups: vec!["site".into()],
            ..Columns::default()
        };
        let mut ds = CsvDataset::open(f.path(), &cols, labels()).unwrap();
        let rows = read_all(&mut ds);
        assert_eq!(rows.len(), 6);
        assert_eq!(
            rows[0],
            Ok(Row {
                row: 1,
                features: vec![1.0, 2.0],
                score: None,
                class_scores: Vec::new(),
                label: true,
                class: 1,
                subgroups: vec!["x".into()],
                cluster: None,
                file: None
            })
        );
        assert_eq!(
            rows[1].as_ref().unwrap_err().reason,
            "feature \"b\" is empty"
        );
        assert!(
            rows[2]
                .as_ref()
                .unwrap_err()
                .reason
                .starts_with("label \"2\"")
        );
        assert_eq!(
            rows[3].as_ref().unwrap_err().reason,
            "feature \"b\" is not finite"
        );
        assert!(rows[4].as_ref().unwrap().label);
        assert_eq!(rows[5].as_ref().unwrap_err().row, 6);
        let s = ds.finish().unwrap();
        assert_eq!(s.rows_read, 6);
        assert_eq!(s.columns_ignored, vec!["extra".to_owned()]);
        assert_eq!(s.columns_ignored_count, 1);
        assert_eq!(s.sha256.len(), 64);
    }

    /// Red-team finding: an ignored column's name went into the report whole (a 34 MB name
    /// made a failing report too large for `--require-validation` to read). The first 64 are
    /// listed, each cut at 128 characters; all are counted.
    #[test]
    fn ignored_columns_are_listed_within_bounds_and_counted() {
        let long = "é".repeat(300);
        let mut header = vec!["label".to_owned(), long.clone()];
        header.extend((0..100).map(|i| format!("x{i}")));
        let mut row = vec!["1".to_owned(); header.len()];
        row[0] = "1".into();
        let f = write(&format!("{}\n{}\n", header.join(","), row.join(",")));
        let cols = Columns {
            features: vec![],
            label: "label".into(),
            ..Columns::default()
        };
        let mut ds = CsvDataset::open(f.path(), &cols, labels()).unwrap();
        read_all(&mut ds);
        let s = ds.finish().unwrap();
        assert_eq!(s.columns_ignored_count, 101);
        assert_eq!(s.columns_ignored.len(), MAX_IGNORED_LISTED);
        assert_eq!(s.columns_ignored[0], format!("{}…", "é".repeat(128)));
        assert_eq!(s.columns_ignored[1], "x0");
    }

    use super::npy_v1 as npy;

    #[test]
    fn npy_tensor_rows_and_class_labels() {
        let dir = tempfile::tempdir().unwrap();
        let pixels: Vec<u8> = [
            1.0f32,
            2.0,
            3.0,
            4.0,
            f32::NAN,
            6.0,
            7.0,
            8.0,
            9.0,
            1.0,
            2.0,
            3.0,
            1.0,
            2.0,
            3.0,
        ]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
        std::fs::write(
            dir.path().join("images.npy"),
            npy("<f4", "(5, 1, 3)", &pixels),
        )
        .unwrap();
        let labels: Vec<u8> = [2i64, 1, 5, 2, 1]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        std::fs::write(dir.path().join("labels.npy"), npy("<i8", "(5,)", &labels)).unwrap();
        assert!(NpyDataset::is_npy_folder(dir.path()));
        let spec = LabelSpec {
            positive: String::new(),
            classes: vec!["a".into(), "b".into(), "c".into()],
            multiclass: true,
        };
        assert!(NpyDataset::open(dir.path(), &[-1, 1, 4], &spec).is_err());
        let mut ds = NpyDataset::open(dir.path(), &[-1, 1, 3], &spec).unwrap();
        assert_eq!(ds.row_shape(), &[1, 3]);
        let first = ds.next_row().unwrap().unwrap().unwrap();
        assert_eq!((first.features, first.class), (vec![1.0, 2.0, 3.0], 2));
        let second = ds.next_row().unwrap().unwrap().unwrap_err();
        assert_eq!(second.reason, "the image holds non-finite values");
        let third = ds.next_row().unwrap().unwrap().unwrap_err();
        assert!(third.reason.contains("below 3"), "{}", third.reason);
        // the first image and label again: counted once; the same image of another class
        // is a row of its own
        let again = ds.next_row().unwrap().unwrap().unwrap_err();
        assert!(
            again
                .reason
                .starts_with("the same image and label as row 1:"),
            "{}",
            again.reason
        );
        assert!(!again.reason.contains("id column"), "{}", again.reason);
        let other = ds.next_row().unwrap().unwrap().unwrap();
        assert_eq!((other.row, other.class), (5, 1));
        assert!(ds.next_row().unwrap().is_none());
        let s = ds.finish();
        assert_eq!(s.rows_read, 5);
        assert_eq!(s.files.len(), 2);
        // class names and indices in a CSV label column
        assert_eq!(spec.class_of("b"), Some(1));
        assert_eq!(spec.class_of("2"), Some(2));
        assert_eq!(spec.class_of("3"), None);
    }

    /// A tensor folder's files may be links inside the folder, never to a file elsewhere on
    /// the server; a FIFO (or other non-regular file) is refused at once instead of holding
    /// the run until a writer comes. Each file's hash is that of its bytes.
    #[test]
    fn dataset_files_stay_inside_their_folder_and_are_regular() {
        let outside = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pixels: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let label_bytes: Vec<u8> = [0i64, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(
            outside.path().join("images.npy"),
            npy("<f4", "(2, 1)", &pixels),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("labels.npy"),
            npy("<i8", "(2,)", &label_bytes),
        )
        .unwrap();
        let spec = LabelSpec {
            positive: String::new(),
            classes: vec!["a".into(), "b".into()],
            multiclass: true,
        };
        // A link leading out of the folder.
        std::os::unix::fs::symlink(
            outside.path().join("images.npy"),
            dir.path().join("images.npy"),
        )
        .unwrap();
        let e = NpyDataset::open(dir.path(), &[-1, 1], &spec).err().unwrap();
        assert!(matches!(e, DatasetError::Outside { .. }), "{e}");
        // A link inside the folder is followed.
        std::fs::remove_file(dir.path().join("images.npy")).unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        std::fs::write(
            dir.path().join("data/pixels.npy"),
            npy("<f4", "(2, 1)", &pixels),
        )
        .unwrap();
        std::os::unix::fs::symlink("data/pixels.npy", dir.path().join("images.npy")).unwrap();
        let ds = NpyDataset::open(dir.path(), &[-1, 1], &spec).unwrap();
        let summary = ds.finish();
        assert_eq!(
            summary.files["images.npy"],
            nightingale_models::sha256_file(&dir.path().join("data/pixels.npy")).unwrap()
        );
        assert_eq!(
            summary.files["labels.npy"],
            nightingale_models::sha256_file(&dir.path().join("labels.npy")).unwrap()
        );

        // FIFOs: the tensor folder's labels and a CSV dataset, each refused without a writer.
        let fifo = |path: &Path| {
            rustix::fs::mknodat(
                rustix::fs::CWD,
                path,
                rustix::fs::FileType::Fifo,
                rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
                0,
            )
            .unwrap()
        };
        std::fs::remove_file(dir.path().join("labels.npy")).unwrap();
        fifo(&dir.path().join("labels.npy"));
        fifo(&dir.path().join("rows.csv"));
        let (tx, rx) = std::sync::mpsc::channel();
        let folder = dir.path().to_owned();
        std::thread::spawn(move || {
            let npy = NpyDataset::open(&folder, &[-1, 1], &spec).err();
            let csv =
                CsvDataset::open(&folder.join("rows.csv"), &Columns::default(), labels()).err();
            let _ = tx.send((npy, csv));
        });
        let (npy, csv) = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("opening a FIFO returns at once");
        assert!(
            matches!(npy, Some(DatasetError::NotRegular { .. })),
            "{npy:?}"
        );
        assert!(
            matches!(csv, Some(DatasetError::NotRegular { .. })),
            "{csv:?}"
        );
    }

    #[test]
    fn missing_and_duplicate_columns_stop_the_run() {
        let f = write("a,label\n1,1\n");
        let cols = Columns {
            features: vec!["a".into(), "b".into()],
            label: "y".into(),
            ..Columns::default()
        };
        let e = CsvDataset::open(f.path(), &cols, labels()).err().unwrap();
        assert!(e.to_string().contains("\"b\", \"y\""), "{e}");
        let f = write("a,a,label\n1,1,1\n");
        let cols = Columns {
            label: "label".into(),
            ..Columns::default()
        };
        assert!(matches!(
            CsvDataset::open(f.path(), &cols, labels()),
            Err(DatasetError::DuplicateColumn { .. })
        ));
    }

    #[test]
    fn predictions_must_be_probabilities() {
        for (cell, why) in [
            ("nan", "is NaN"),
            ("inf", "is infinite"),
            ("-inf", "is infinite"),
            ("1.5", "outside [0, 1]"),
            ("", "is empty"),
            ("abc", "is not a number"),
        ] {
            let f = write(&format!("label,p\n1,0.5\n0,{cell}\n"));
            let cols = Columns {
                label: "label".into(),
                score: Some("p".into()),
                ..Columns::default()
            };
            let mut ds = CsvDataset::open(f.path(), &cols, labels()).unwrap();
            assert!(ds.next_row().unwrap().unwrap().is_ok());
            let e = ds.next_row().unwrap_err();
            assert!(e.to_string().contains("row 2"), "{e}");
            assert!(e.to_string().contains(why), "{e}");
        }
    }
}
