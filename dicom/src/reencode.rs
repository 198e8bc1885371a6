//! A Part 10 file in Implicit VR Little Endian re-encoded in Explicit VR Little Endian, for
//! DICOMweb, where Implicit VR Little Endian is not used (PS3.18 8.7.3.5.2).
//!
//! Written by hand, on the bytes: a decode/encode pass through dicom-rs (tried first, and
//! withdrawn) changed text whose bytes were not valid in its character set and could not
//! write values over 64 KiB in a VR with a 16-bit length. Here every value is copied as it
//! is; only element headers change: each gets the VR of the data dictionary (PS3.6), with the
//! context PS3.5 A.1 gives for the ambiguous ones (US or SS by Pixel Representation, OW for
//! pixel, overlay and LUT data), LO for private creators, UN for what the dictionary does not
//! know and for a value too long for its VR's 16-bit length (PS3.5 6.2.2). Sequences and items
//! are written with undefined length and their delimiters (the lengths of defined-length ones
//! change with their contents' headers). The meta group is kept as written except for its
//! Transfer Syntax UID and group length.

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;

use crate::structure::long_length;

/// Implicit VR Little Endian.
pub const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
/// Explicit VR Little Endian.
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";

/// How deep sequences may nest (a hostile file could otherwise exhaust the stack).
const MAX_DEPTH: usize = 64;

const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_END: (u16, u16) = (0xFFFE, 0xE00D);
const SEQUENCE_END: (u16, u16) = (0xFFFE, 0xE0DD);
const UNDEFINED: u32 = 0xFFFF_FFFF;

/// Why a file could not be re-encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReencodeError(pub String);

impl std::fmt::Display for ReencodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ReencodeError {}

fn err<T>(what: impl Into<String>) -> Result<T, ReencodeError> {
    Err(ReencodeError(what.into()))
}

/// The transfer syntax of a Part 10 file (preamble, "DICM", meta group), as written without
/// its padding; `None` when `file` does not start so.
pub fn transfer_syntax_of(file: &[u8]) -> Option<String> {
    let mut found = None;
    walk_meta(file, |tag, _, value| {
        if tag == 0x0010 {
            found = Some(trim(value));
        }
    })
    .ok()?;
    found
}

fn trim(value: &[u8]) -> String {
    String::from_utf8_lossy(value)
        .trim_end_matches(['\0', ' '])
        .to_owned()
}

/// Walks the meta group (explicit VR little endian) of a Part 10 file, calling `each` with
/// each element's element number, its whole encoding and its value; returns where the data
/// set starts.
fn walk_meta(file: &[u8], mut each: impl FnMut(u16, &[u8], &[u8])) -> Result<usize, ReencodeError> {
    if file.len() < 132 || &file[128..132] != b"DICM" {
        return err("not a Part 10 file");
    }
    let mut at = 132;
    while file.len() >= at + 8 {
        let group = u16::from_le_bytes([file[at], file[at + 1]]);
        if group != 0x0002 {
            break;
        }
        let element = u16::from_le_bytes([file[at + 2], file[at + 3]]);
        let vr = [file[at + 4], file[at + 5]];
        let (header, len) = if long_length(vr) {
            let Some(b) = file.get(at + 8..at + 12) else {
                return err("the meta group is cut short");
            };
            (12, u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        } else {
            (8, u16::from_le_bytes([file[at + 6], file[at + 7]]) as usize)
        };
        let end = at
            .checked_add(header)
            .and_then(|v| v.checked_add(len))
            .filter(|&end| end <= file.len());
        let Some(end) = end else {
            return err("a meta group element runs past the file");
        };
        each(element, &file[at..end], &file[at + header..end]);
        at = end;
    }
    Ok(at)
}

/// `file`, a Part 10 file in Implicit VR Little Endian, in Explicit VR Little Endian: the
/// same preamble, the meta group as written but for its Transfer Syntax UID (and group
/// length), and the data set's elements with their values as they are (see the module's
/// documentation). An error where the data set is not well formed (an element or item
/// running past its container, an item where an element belongs, nesting deeper than 64).
pub fn implicit_to_explicit(file: &[u8]) -> Result<Vec<u8>, ReencodeError> {
    let mut out = Vec::with_capacity(file.len() + file.len() / 16 + 512);
    implicit_to_explicit_into(file, &mut out)?;
    Ok(out)
}

/// [`implicit_to_explicit`], appending to `out` (which may hold, say, a multipart part's
/// header already); on an error, `out` holds part of the file after what it held.
pub fn implicit_to_explicit_into(file: &[u8], out: &mut Vec<u8>) -> Result<(), ReencodeError> {
    let mut meta: Vec<u8> = Vec::with_capacity(256);
    let mut syntax = None;
    let start = walk_meta(file, |element, whole, value| match element {
        0x0000 => {}
        0x0010 => {
            syntax = Some(trim(value));
            let mut uid = EXPLICIT_VR_LE.as_bytes().to_vec();
            if uid.len() % 2 == 1 {
                uid.push(0);
            }
            meta.extend_from_slice(&[0x02, 0x00, 0x10, 0x00, b'U', b'I']);
            meta.extend_from_slice(&(uid.len() as u16).to_le_bytes());
            meta.extend_from_slice(&uid);
        }
        _ => meta.extend_from_slice(whole),
    })?;
    if syntax.as_deref() != Some(IMPLICIT_VR_LE) {
        return err("not in Implicit VR Little Endian");
    }
    out.reserve(file.len() + file.len() / 16 + 512);
    out.extend_from_slice(&file[..132]);
    out.extend_from_slice(&[0x02, 0x00, 0x00, 0x00, b'U', b'L', 4, 0]);
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta);
    let mut reader = Reader {
        bytes: file,
        at: start,
    };
    convert_dataset(&mut reader, file.len(), out, 0, None, false)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    /// The next element header: tag and length.
    fn header(&mut self, end: usize) -> Result<((u16, u16), u32), ReencodeError> {
        let Some(b) = self
            .bytes
            .get(self.at..self.at + 8)
            .filter(|_| self.at + 8 <= end)
        else {
            return err("an element header is cut short");
        };
        let group = u16::from_le_bytes([b[0], b[1]]);
        let element = u16::from_le_bytes([b[2], b[3]]);
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        self.at += 8;
        Ok(((group, element), len))
    }

    fn value(&mut self, len: u32, end: usize) -> Result<&[u8], ReencodeError> {
        let stop = self
            .at
            .checked_add(len as usize)
            .filter(|&stop| stop <= end);
        let Some(stop) = stop else {
            return err("a value runs past its container");
        };
        let value = &self.bytes[self.at..stop];
        self.at = stop;
        Ok(value)
    }
}

/// Converts the elements of one data set, from the reader's position to `end` (a defined
/// length), or, when `delimited`, to its Item Delimitation Item (bounded by `end`).
///
/// Two things are settled only once the data set has been read: an element whose VR is US
/// or SS by Pixel Representation and that comes before (0028,0103) (Zero Velocity Pixel
/// Value, Mapped Pixel Value) gets its VR patched then; and a Group Length's value, which
/// counts the group's bytes as re-encoded (headers grow, sequences gain delimiters), is
/// written once its group has ended.
fn convert_dataset(
    r: &mut Reader<'_>,
    end: usize,
    out: &mut Vec<u8>,
    depth: usize,
    inherited_pixel_representation: Option<u16>,
    delimited: bool,
) -> Result<(), ReencodeError> {
    let mut own_pixel_representation: Option<u16> = None;
    // Where the VRs of US-or-SS elements written before this level's Pixel Representation are.
    let mut pending_xs: Vec<usize> = Vec::new();
    // The open group's length element: its group, where its value is, where the group starts.
    let mut group_length: Option<(u16, usize, usize)> = None;
    let finish = |out: &mut Vec<u8>,
                  group_length: &mut Option<(u16, usize, usize)>,
                  next_group: Option<u16>| {
        if let Some((group, at, start)) = *group_length
            && next_group != Some(group)
        {
            let len = u32::try_from(out.len() - start).unwrap_or(u32::MAX);
            out[at..at + 4].copy_from_slice(&len.to_le_bytes());
            *group_length = None;
        }
    };
    let settle = |out: &mut Vec<u8>, pending: &[usize], own: Option<u16>| {
        if let Some(pr) = own {
            let vr: &[u8; 2] = if pr == 1 { b"SS" } else { b"US" };
            for &at in pending {
                out[at..at + 2].copy_from_slice(vr);
            }
        }
    };
    loop {
        if r.at >= end {
            if delimited {
                return err("an item of undefined length has no delimiter");
            }
            finish(out, &mut group_length, None);
            settle(out, &pending_xs, own_pixel_representation);
            return Ok(());
        }
        let (tag, len) = r.header(end)?;
        if tag == ITEM_END && delimited {
            if len != 0 {
                return err("an item delimiter with a length");
            }
            finish(out, &mut group_length, None);
            settle(out, &pending_xs, own_pixel_representation);
            return Ok(());
        }
        if tag.0 == 0xFFFE {
            return err("an item or delimiter where an element belongs");
        }
        finish(out, &mut group_length, Some(tag.0));
        let pixel_representation = own_pixel_representation.or(inherited_pixel_representation);
        let (vr, by_pixel_representation) = vr_of(tag, len, pixel_representation);
        if len == UNDEFINED {
            if tag == (0x7FE0, 0x0010) {
                return err("encapsulated pixel data in Implicit VR");
            }
            // Undefined length outside pixel data is a sequence (PS3.5 7.5.1, 6.2.2 for UN).
            write_header(out, tag, VR::SQ, UNDEFINED);
            convert_sequence(r, end, None, out, depth + 1, pixel_representation)?;
            continue;
        }
        if vr == VR::SQ {
            let stop = r.at + len as usize;
            if stop > end {
                return err("a sequence runs past its container");
            }
            write_header(out, tag, VR::SQ, UNDEFINED);
            convert_sequence(r, stop, Some(stop), out, depth + 1, pixel_representation)?;
            continue;
        }
        let value = r.value(len, end)?;
        if tag == (0x0028, 0x0103) && value.len() >= 2 {
            own_pixel_representation = Some(u16::from_le_bytes([value[0], value[1]]));
        }
        // A value too long for a 16-bit length: UN (PS3.5 6.2.2).
        let vr = if !long_length(vr.to_bytes()) && value.len() > 0xFFFF {
            VR::UN
        } else {
            vr
        };
        if by_pixel_representation && vr != VR::UN && own_pixel_representation.is_none() {
            pending_xs.push(out.len() + 4);
        }
        if tag.1 == 0x0000 && vr == VR::UL && value.len() == 4 {
            // Its value is written when the group ends.
            write_header(out, tag, vr, 4);
            let at = out.len();
            out.extend_from_slice(&[0; 4]);
            group_length = Some((tag.0, at, out.len()));
            continue;
        }
        write_header(out, tag, vr, value.len() as u32);
        out.extend_from_slice(value);
    }
}

/// Converts the items of a sequence, up to `end` (defined length, `Some`) or to its Sequence
/// Delimitation Item (`None`, bounded by `outer`), writing them with undefined lengths.
fn convert_sequence(
    r: &mut Reader<'_>,
    outer: usize,
    end: Option<usize>,
    out: &mut Vec<u8>,
    depth: usize,
    pixel_representation: Option<u16>,
) -> Result<(), ReencodeError> {
    if depth > MAX_DEPTH {
        return err("sequences nested too deep");
    }
    let limit = end.unwrap_or(outer);
    loop {
        if end.is_some_and(|e| r.at >= e) {
            out.extend_from_slice(&delimiter(SEQUENCE_END));
            return Ok(());
        }
        let (tag, len) = r.header(limit)?;
        match tag {
            SEQUENCE_END if end.is_none() => {
                if len != 0 {
                    return err("a sequence delimiter with a length");
                }
                out.extend_from_slice(&delimiter(SEQUENCE_END));
                return Ok(());
            }
            ITEM => {
                out.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
                if len == UNDEFINED {
                    convert_dataset(r, limit, out, depth, pixel_representation, true)?;
                } else {
                    let stop = r.at + len as usize;
                    if stop > limit {
                        return err("an item runs past its sequence");
                    }
                    convert_dataset(r, stop, out, depth, pixel_representation, false)?;
                    if r.at != stop {
                        return err("an item's elements run past it");
                    }
                }
                out.extend_from_slice(&delimiter(ITEM_END));
            }
            _ => return err("an element where a sequence item belongs"),
        }
    }
}

fn delimiter(tag: (u16, u16)) -> [u8; 8] {
    let g = tag.0.to_le_bytes();
    let e = tag.1.to_le_bytes();
    [g[0], g[1], e[0], e[1], 0, 0, 0, 0]
}

fn write_header(out: &mut Vec<u8>, tag: (u16, u16), vr: VR, len: u32) {
    out.extend_from_slice(&tag.0.to_le_bytes());
    out.extend_from_slice(&tag.1.to_le_bytes());
    let code = vr.to_bytes();
    out.extend_from_slice(&code);
    if long_length(code) {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&len.to_le_bytes());
    } else {
        out.extend_from_slice(&(len as u16).to_le_bytes());
    }
}

/// The explicit VR of an element read in Implicit VR (PS3.5 A.1, PS3.6), and whether it is
/// one that Pixel Representation decides (US or SS).
fn vr_of(tag: (u16, u16), len: u32, pixel_representation: Option<u16>) -> (VR, bool) {
    let (group, element) = tag;
    if element == 0x0000 {
        return (VR::UL, false); // group length
    }
    if group % 2 == 1 {
        // Private: creators are LO (PS3.5 7.8.1); the rest is unknown here.
        let vr = if (0x0010..=0x00FF).contains(&element) {
            VR::LO
        } else {
            VR::UN
        };
        return (vr, false);
    }
    let Some(entry) = StandardDataDictionary.by_tag(Tag(group, element)) else {
        return (VR::UN, false);
    };
    let vr = match entry.vr() {
        VirtualVr::Exact(vr) => vr,
        VirtualVr::Xs => {
            let vr = if pixel_representation == Some(1) {
                VR::SS
            } else {
                VR::US
            };
            return (vr, true);
        }
        VirtualVr::Ox | VirtualVr::Px => VR::OW,
        // LUT Data: US where it holds one value (a LUT of one entry), else OW.
        VirtualVr::Lt => {
            if len == 2 {
                VR::US
            } else {
                VR::OW
            }
        }
        // A kind of ambiguity dicom-core may add later: the value as it is, unknown.
        _ => VR::UN,
    };
    (vr, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn element(out: &mut Vec<u8>, group: u16, element: u16, value: &[u8]) {
        out.extend_from_slice(&group.to_le_bytes());
        out.extend_from_slice(&element.to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
    }

    fn part10(dataset: &[u8]) -> Vec<u8> {
        let mut meta = Vec::new();
        let mut meta_element = |element: u16, vr: &[u8; 2], value: &[u8]| {
            meta.extend_from_slice(&2u16.to_le_bytes());
            meta.extend_from_slice(&element.to_le_bytes());
            meta.extend_from_slice(vr);
            if long_length(*vr) {
                meta.extend_from_slice(&[0, 0]);
                meta.extend_from_slice(&(value.len() as u32).to_le_bytes());
            } else {
                meta.extend_from_slice(&(value.len() as u16).to_le_bytes());
            }
            meta.extend_from_slice(value);
        };
        meta_element(0x0001, b"OB", &[0, 1]);
        meta_element(0x0002, b"UI", b"1.2.840.10008.5.1.4.1.1.7\0");
        meta_element(0x0003, b"UI", b"1.2.3.4\0");
        meta_element(0x0010, b"UI", b"1.2.840.10008.1.2\0");
        let mut file = vec![0u8; 128];
        file.extend_from_slice(b"DICM");
        file.extend_from_slice(&[2, 0, 0, 0, b'U', b'L', 4, 0]);
        file.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        file.extend_from_slice(&meta);
        file.extend_from_slice(dataset);
        file
    }

    /// Reads an explicit VR little endian data set back: (tag, VR, value) in order, items
    /// flattened with their depth.
    fn read_explicit(bytes: &[u8]) -> Vec<(u16, u16, String, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at + 8 <= bytes.len() {
            let g = u16::from_le_bytes([bytes[at], bytes[at + 1]]);
            let e = u16::from_le_bytes([bytes[at + 2], bytes[at + 3]]);
            if g == 0xFFFE {
                out.push((g, e, String::new(), Vec::new()));
                at += 8;
                continue;
            }
            let vr = [bytes[at + 4], bytes[at + 5]];
            let (header, len) = if long_length(vr) {
                (
                    12,
                    u32::from_le_bytes([
                        bytes[at + 8],
                        bytes[at + 9],
                        bytes[at + 10],
                        bytes[at + 11],
                    ]),
                )
            } else {
                (8, u16::from_le_bytes([bytes[at + 6], bytes[at + 7]]) as u32)
            };
            let vr = String::from_utf8_lossy(&vr).into_owned();
            if len == UNDEFINED {
                out.push((g, e, vr, Vec::new()));
                at += header;
                continue;
            }
            let value = bytes[at + header..at + header + len as usize].to_vec();
            out.push((g, e, vr, value));
            at += header + len as usize;
        }
        assert_eq!(at, bytes.len(), "trailing bytes");
        out
    }

    fn dataset_of(file: &[u8]) -> &[u8] {
        let start = walk_meta(file, |_, _, _| {}).unwrap();
        &file[start..]
    }

    #[test]
    fn values_are_copied_and_headers_take_the_dictionarys_vrs() {
        let mut ds = Vec::new();
        element(&mut ds, 0x0008, 0x0016, b"1.2.840.10008.5.1.4.1.1.7\0");
        // Latin-1 bytes that are not UTF-8, in a PN: copied as they are.
        element(&mut ds, 0x0010, 0x0010, b"M\xfcller^J\xf6rg ");
        element(&mut ds, 0x0028, 0x0103, &1u16.to_le_bytes());
        element(&mut ds, 0x0028, 0x0106, &(-5i16).to_le_bytes());
        element(&mut ds, 0x0029, 0x0010, b"ACME 1.0");
        element(&mut ds, 0x0029, 0x1001, &[1, 2, 3, 4]);
        element(&mut ds, 0x0044, 0x9999, &[9, 9]); // not in the dictionary: UN
        element(&mut ds, 0x0040, 0xA160, &vec![b'x'; 70_000]); // UT, long form
        element(&mut ds, 0x0020, 0x4000, &vec![b'y'; 70_000]); // LT over 64 KiB: UN
        element(&mut ds, 0x7FE0, 0x0010, &[0, 1, 2, 3]);
        let out = implicit_to_explicit(&part10(&ds)).unwrap();
        assert_eq!(transfer_syntax_of(&out).as_deref(), Some(EXPLICIT_VR_LE));
        let read = read_explicit(dataset_of(&out));
        let got: Vec<(u16, u16, &str, usize)> = read
            .iter()
            .map(|(g, e, vr, v)| (*g, *e, vr.as_str(), v.len()))
            .collect();
        assert_eq!(
            got,
            [
                (0x0008, 0x0016, "UI", 26),
                (0x0010, 0x0010, "PN", 12),
                (0x0028, 0x0103, "US", 2),
                (0x0028, 0x0106, "SS", 2),
                (0x0029, 0x0010, "LO", 8),
                (0x0029, 0x1001, "UN", 4),
                (0x0044, 0x9999, "UN", 2),
                (0x0040, 0xA160, "UT", 70_000),
                (0x0020, 0x4000, "UN", 70_000),
                (0x7FE0, 0x0010, "OW", 4),
            ]
        );
        assert_eq!(read[1].3, b"M\xfcller^J\xf6rg ");
    }

    #[test]
    fn sequences_of_either_length_become_delimited_with_their_contents_converted() {
        let mut item = Vec::new();
        element(&mut item, 0x0008, 0x1150, b"1.2.3\0");
        // A defined-length sequence with one defined-length item.
        let mut seq = Vec::new();
        seq.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
        seq.extend_from_slice(&(item.len() as u32).to_le_bytes());
        seq.extend_from_slice(&item);
        let mut ds = Vec::new();
        element(&mut ds, 0x0008, 0x1140, &seq);
        // An undefined-length sequence with an undefined-length item.
        ds.extend_from_slice(&[0x08, 0x00, 0x15, 0x11, 0xFF, 0xFF, 0xFF, 0xFF]);
        ds.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        ds.extend_from_slice(&item);
        ds.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        ds.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        // An empty sequence.
        element(&mut ds, 0x0040, 0x0275, &[]);
        element(&mut ds, 0x0020, 0x000D, b"1.2.4\0");
        let out = implicit_to_explicit(&part10(&ds)).unwrap();
        let read = read_explicit(dataset_of(&out));
        let got: Vec<(u16, u16, &str)> = read
            .iter()
            .map(|(g, e, vr, _)| (*g, *e, vr.as_str()))
            .collect();
        let one_sequence = |g, e| {
            vec![
                (g, e, "SQ"),
                (0xFFFE, 0xE000, ""),
                (0x0008, 0x1150, "UI"),
                (0xFFFE, 0xE00D, ""),
                (0xFFFE, 0xE0DD, ""),
            ]
        };
        let mut want = one_sequence(0x0008, 0x1140);
        want.extend(one_sequence(0x0008, 0x1115));
        want.extend([
            (0x0040, 0x0275, "SQ"),
            (0xFFFE, 0xE0DD, ""),
            (0x0020, 0x000D, "UI"),
        ]);
        assert_eq!(got, want);
    }

    /// Red-team findings: a US-or-SS element before Pixel Representation took US whatever
    /// its value, and Group Length values were copied though their groups grew.
    #[test]
    fn late_pixel_representation_and_group_lengths_are_settled_at_the_end() {
        let mut ds = Vec::new();
        element(&mut ds, 0x0018, 0x0000, &0u32.to_le_bytes()); // group length, wrong on purpose
        element(&mut ds, 0x0018, 0x9810, &(-100i16).to_le_bytes()); // Zero Velocity Pixel Value
        element(&mut ds, 0x0028, 0x0000, &12u32.to_le_bytes());
        element(&mut ds, 0x0028, 0x0103, &1u16.to_le_bytes());
        element(&mut ds, 0x7FE0, 0x0000, &12u32.to_le_bytes());
        element(&mut ds, 0x7FE0, 0x0010, &[1, 2, 3, 4]);
        let out = implicit_to_explicit(&part10(&ds)).unwrap();
        let read = read_explicit(dataset_of(&out));
        let vrs: Vec<(u16, u16, &str)> = read
            .iter()
            .map(|(g, e, vr, _)| (*g, *e, vr.as_str()))
            .collect();
        assert_eq!(
            vrs,
            [
                (0x0018, 0x0000, "UL"),
                (0x0018, 0x9810, "SS"),
                (0x0028, 0x0000, "UL"),
                (0x0028, 0x0103, "US"),
                (0x7FE0, 0x0000, "UL"),
                (0x7FE0, 0x0010, "OW"),
            ]
        );
        let length = |i: usize| u32::from_le_bytes(read[i].3[..4].try_into().unwrap());
        // (0018,9810) SS: 8 + 2; (0028,0103) US: 8 + 2; (7FE0,0010) OW: 12 + 4.
        assert_eq!((length(0), length(2), length(4)), (10, 10, 16));
        // A Pixel Representation of 0 (or none) keeps US.
        let mut unsigned = ds.clone();
        // Pixel Representation's value: before the two Pixel Data group elements (12 bytes
        // each).
        let at = unsigned.len() - 12 - 12 - 2;
        assert_eq!(&unsigned[at - 8..at - 4], &[0x28, 0x00, 0x03, 0x01]);
        unsigned[at..at + 2].copy_from_slice(&0u16.to_le_bytes());
        let out = implicit_to_explicit(&part10(&unsigned)).unwrap();
        let read = read_explicit(dataset_of(&out));
        assert_eq!((read[1].2.as_str(), read[3].2.as_str()), ("US", "US"));
    }

    #[test]
    fn malformed_data_sets_are_errors_not_panics() {
        let mut ds = Vec::new();
        element(&mut ds, 0x0010, 0x0010, b"A^B ");
        let good = part10(&ds);
        // Cut anywhere inside the data set.
        for cut in 133..good.len() {
            let _ = implicit_to_explicit(&good[..cut]);
        }
        // A length past the end.
        let mut bad = ds.clone();
        bad[4..8].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        assert!(implicit_to_explicit(&part10(&bad)).is_err());
        // Undefined-length sequences nested past the limit.
        let mut deep = Vec::new();
        for _ in 0..200 {
            deep.extend_from_slice(&[0x08, 0x00, 0x15, 0x11, 0xFF, 0xFF, 0xFF, 0xFF]);
            deep.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        }
        assert!(implicit_to_explicit(&part10(&deep)).is_err());
        // An item where an element belongs.
        let stray = [0xFE, 0xFF, 0x00, 0xE0, 0, 0, 0, 0];
        assert!(implicit_to_explicit(&part10(&stray)).is_err());
        // Not implicit.
        let mut explicit = part10(&ds);
        let at = explicit
            .windows(18)
            .position(|w| w == b"1.2.840.10008.1.2\0")
            .unwrap();
        explicit[at + 16] = b'5';
        assert!(implicit_to_explicit(&explicit).is_err());
    }
}
