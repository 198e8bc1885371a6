//! The attributes the spool's index keeps beside the UIDs, for QIDO-RS to match on and
//! answer with: what a PACS or a research tool searches a DICOM node by (modality, study
//! date and time, series and instance numbers, image size). No patient attribute (name,
//! ID, birth date, sex) and no free text (descriptions, accession number, physicians) is
//! indexed: those stay in the files alone.
//!
//! Each value is taken from the data set's top level as received and kept only when it is
//! well formed for its VR (PS3.5 6.2); anything else is left out (`None`), never guessed.

use crate::structure::Found;

/// The attributes' tags, in the order [`Attributes::from_found`] expects them.
pub const TAGS: [(u16, u16); 8] = [
    (0x0008, 0x0060), // Modality, CS
    (0x0008, 0x0020), // Study Date, DA
    (0x0008, 0x0030), // Study Time, TM
    (0x0020, 0x0011), // Series Number, IS
    (0x0020, 0x0013), // Instance Number, IS
    (0x0028, 0x0010), // Rows, US
    (0x0028, 0x0011), // Columns, US
    (0x0028, 0x0008), // Number of Frames, IS
];

/// What the index knows of an instance beyond its UIDs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    /// Modality (0008,0060): upper-case letters, digits, `_` (PS3.5 CS), at most 16.
    pub modality: Option<String>,
    /// Study Date (0008,0020) as `YYYYMMDD` (the ACR-NEMA `YYYY.MM.DD` form is read too).
    pub study_date: Option<String>,
    /// Study Time (0008,0030) as sent (`HH[MM[SS[.F{1,6}]]]`, ACR-NEMA colons removed).
    pub study_time: Option<String>,
    pub series_number: Option<i64>,
    pub instance_number: Option<i64>,
    pub rows: Option<u32>,
    pub columns: Option<u32>,
    pub number_of_frames: Option<u32>,
}

impl Attributes {
    /// The attributes from what [`crate::structure::walk`] found for [`TAGS`], `big_endian`
    /// the data set's byte order.
    pub fn from_found(found: &[Option<Found>], big_endian: bool) -> Attributes {
        let value = |i: usize| match found.get(i) {
            Some(Some(Found::Value(bytes))) => Some(bytes.as_slice()),
            _ => None,
        };
        let text = |i: usize| value(i).and_then(first_text);
        Attributes {
            modality: text(0).and_then(code_string),
            study_date: text(1).and_then(date),
            study_time: text(2).and_then(time),
            series_number: text(3).and_then(integer_string),
            instance_number: text(4).and_then(integer_string),
            rows: value(5).and_then(|b| unsigned_short(b, big_endian)),
            columns: value(6).and_then(|b| unsigned_short(b, big_endian)),
            number_of_frames: text(7)
                .and_then(integer_string)
                .and_then(|n| u32::try_from(n).ok()),
        }
    }
}

impl Attributes {
    /// The index columns `modality, study_date, study_time, series_number,
    /// instance_number, rows, columns, number_of_frames` of a row, from column `first` on.
    pub(crate) fn from_row(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Attributes> {
        Ok(Attributes {
            modality: r.get(first)?,
            study_date: r.get(first + 1)?,
            study_time: r.get(first + 2)?,
            series_number: r.get(first + 3)?,
            instance_number: r.get(first + 4)?,
            rows: r.get(first + 5)?,
            columns: r.get(first + 6)?,
            number_of_frames: r.get(first + 7)?,
        })
    }
}

/// The first value of a text element: ASCII, up to the first backslash, without the
/// padding (spaces, NULs) around it; `None` when empty or not ASCII.
fn first_text(bytes: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(bytes).ok()?;
    if !text.is_ascii() {
        return None;
    }
    let first = text.split('\\').next()?;
    let trimmed = first.trim_matches(|c: char| c == ' ' || c == '\0');
    (!trimmed.is_empty()).then_some(trimmed)
}

/// A CS value: `A-Z`, `0-9`, `_` and space, at most 16 characters (PS3.5 6.2).
fn code_string(s: &str) -> Option<String> {
    (s.len() <= 16
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_' || b == b' '))
    .then(|| s.to_owned())
}

/// A DA value as `YYYYMMDD`: eight digits forming a calendar date, or the ACR-NEMA
/// `YYYY.MM.DD` that PS3.5 asks readers to accept.
fn date(s: &str) -> Option<String> {
    let digits: String = match s.len() {
        8 => s.to_owned(),
        10 if s.as_bytes()[4] == b'.' && s.as_bytes()[7] == b'.' => s.replace('.', ""),
        _ => return None,
    };
    valid_date(&digits).then_some(digits)
}

/// `YYYYMMDD` with a month 01–12 and a day that month has.
pub fn valid_date(d: &str) -> bool {
    if d.len() != 8 || !d.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let year: u32 = d[..4].parse().unwrap_or(0);
    let month: u32 = d[4..6].parse().unwrap_or(0);
    let day: u32 = d[6..].parse().unwrap_or(0);
    let leap = (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400);
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&day)
}

/// A TM value: `HH`, `HHMM`, `HHMMSS` or `HHMMSS.F{1,6}` in range (ACR-NEMA colons
/// removed, a leap second allowed).
fn time(s: &str) -> Option<String> {
    let s = s.replace(':', "");
    let (whole, fraction) = match s.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (s.as_str(), None),
    };
    if !matches!(whole.len(), 2 | 4 | 6) || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if let Some(f) = fraction
        && (whole.len() != 6
            || f.is_empty()
            || f.len() > 6
            || !f.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    let part = |i: usize| whole.get(i..i + 2).map(|p| p.parse::<u32>().unwrap_or(99));
    let in_range = part(0).is_some_and(|h| h < 24)
        && part(2).is_none_or(|m| m < 60)
        && part(4).is_none_or(|sec| sec < 61);
    in_range.then_some(s)
}

/// An IS value: an optionally signed integer of at most 12 characters (PS3.5 6.2).
fn integer_string(s: &str) -> Option<i64> {
    if s.len() > 12 {
        return None;
    }
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// A US value of one 16-bit number in the data set's byte order.
fn unsigned_short(bytes: &[u8], big_endian: bool) -> Option<u32> {
    let two: [u8; 2] = bytes.get(..2)?.try_into().ok()?;
    let n = if big_endian {
        u16::from_be_bytes(two)
    } else {
        u16::from_le_bytes(two)
    };
    Some(u32::from(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(values: &[Option<&[u8]>]) -> Vec<Option<Found>> {
        values
            .iter()
            .map(|v| v.map(|b| Found::Value(b.to_vec())))
            .collect()
    }

    #[test]
    fn well_formed_values_are_kept_and_normalised() {
        let f = found(&[
            Some(b"CT"),
            Some(b"2024.02.29"),
            Some(b"10:20:30"),
            Some(b" 3 "),
            Some(b"+12"),
            Some(&[0x00, 0x02]),
            Some(&[0x00, 0x01]),
            Some(b"24\0"),
        ]);
        let a = Attributes::from_found(&f, false);
        assert_eq!(a.modality.as_deref(), Some("CT"));
        assert_eq!(a.study_date.as_deref(), Some("20240229"));
        assert_eq!(a.study_time.as_deref(), Some("102030"));
        assert_eq!(a.series_number, Some(3));
        assert_eq!(a.instance_number, Some(12));
        assert_eq!(a.rows, Some(512));
        assert_eq!(a.columns, Some(256));
        assert_eq!(a.number_of_frames, Some(24));
        let big = Attributes::from_found(&f, true);
        assert_eq!((big.rows, big.columns), (Some(2), Some(1)));
    }

    #[test]
    fn malformed_values_are_left_out() {
        let f = found(&[
            Some(b"ct; DROP"),
            Some(b"20230229"),
            Some(b"256000"),
            Some(b"1e3"),
            Some(b"1234567890123"),
            Some(&[0x01]),
            None,
            Some(b"-1"),
        ]);
        assert_eq!(Attributes::from_found(&f, false), Attributes::default());
        for bad in ["20241301", "20240431", "2024-01-01", "2024010", "ABCDEFGH"] {
            assert_eq!(date(bad), None, "{bad}");
        }
        for good in ["20000229", "19991231", "00010101"] {
            assert_eq!(date(good).as_deref(), Some(good));
        }
        for bad in ["24", "1260", "126000.", "126000.1234567", "1.5", "12a0"] {
            assert_eq!(time(bad), None, "{bad}");
        }
        assert_eq!(time("235960.123456").as_deref(), Some("235960.123456"));
        // Only the first of several values; a value that is not ASCII is dropped.
        assert_eq!(first_text(b"MR\\CT"), Some("MR"));
        assert_eq!(first_text("É".as_bytes()), None);
        assert_eq!(first_text(b"  \0"), None);
    }
}
