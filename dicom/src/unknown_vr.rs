//! Standard attributes that an archive wrote as UN, read with their dictionary's VR.
//!
//! An archive or converter whose dictionary did not know an attribute writes it as UN
//! (PS3.5 §6.2.2), and dicom-rs then keeps its bytes: a Modality of `CT` reads as the
//! numbers `67\84` (the router then matched no bundle), Rows as two bytes, a Patient's Name
//! as bytes a result could not copy as a name. pydicom and dcmtk read such an element by
//! their dictionaries; so does this module, for every object the pipeline and the results
//! read ([`crate::meta::open_file`]).
//!
//! A UN value is encoded as in Implicit VR Little Endian (PS3.5 §6.2.2, and CP-246 for
//! sequences), so each such element whose tag the standard dictionary knows is read again
//! as the one element of an Implicit VR Little Endian data set, by dicom-rs's own reader,
//! with the data set's character set: the dictionary gives its VR, a sequence's items are
//! parsed, text is decoded and split as any other element's. An element that does not read
//! as its VR (a length the VR cannot have) stays as it was. Private attributes, bulk data
//! (pixel, overlay, waveform data: OB/OW and the like) and values over 16 MiB are left as
//! they are; in a Big Endian data set (retired) only text and sequences are read again,
//! since a binary value's byte order there is the sender's guess.
//!
//! Nothing here writes: the file stored in the spool stays as it was received.

use std::io::Cursor;

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
use dicom_core::{DataElement, DicomValue, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::{StandardDataDictionary, tags};
use dicom_encoding::text::SpecificCharacterSet;
use dicom_object::InMemDicomObject;
use dicom_object::mem::InMemElement;

/// The largest UN value read again.
const MAX_VALUE_BYTES: usize = 16 << 20;

/// The deepest sequence nesting looked into (real objects nest a few levels).
const MAX_DEPTH: usize = 16;

/// Reads again every UN element of `obj` (and of its sequences' items) whose tag the
/// standard dictionary knows, with the dictionary's VR. `big_endian`: the data set is in
/// Explicit VR Big Endian.
pub fn restore_standard_vrs(obj: &mut InMemDicomObject, big_endian: bool) {
    restore(obj, SpecificCharacterSet::default(), big_endian, 0);
}

/// Whether `obj` (or an item of its sequences) holds an element of VR UN.
fn has_unknown(obj: &InMemDicomObject, depth: usize) -> bool {
    depth < MAX_DEPTH
        && obj.iter().any(|e| {
            e.vr() == VR::UN
                || e.items()
                    .is_some_and(|items| items.iter().any(|i| has_unknown(i, depth + 1)))
        })
}

fn restore(
    obj: &mut InMemDicomObject,
    inherited: SpecificCharacterSet,
    big_endian: bool,
    depth: usize,
) {
    if !has_unknown(obj, depth) {
        return;
    }
    // The character set first (it may be UN itself); an item without one has its data
    // set's (PS3.5 §7.5.3).
    restore_element(
        obj,
        tags::SPECIFIC_CHARACTER_SET,
        SpecificCharacterSet::default(),
        big_endian,
        depth,
    );
    let charset = obj
        .element_opt(tags::SPECIFIC_CHARACTER_SET)
        .ok()
        .flatten()
        .and_then(|e| e.to_multi_str().ok().map(|v| v.to_vec()))
        .and_then(|values| {
            // Code extensions (several values) are not switched by dicom-rs: the first
            // value is the repertoire it decodes with.
            let first = values.first()?.trim().to_owned();
            if first.is_empty() {
                Some(SpecificCharacterSet::default())
            } else {
                SpecificCharacterSet::from_code(&first)
            }
        })
        .unwrap_or(inherited);
    // Pixel Representation before the attributes whose VR it decides (US or SS).
    restore_element(
        obj,
        tags::PIXEL_REPRESENTATION,
        charset.clone(),
        big_endian,
        depth,
    );
    let tags: Vec<Tag> = obj.tags().collect();
    for tag in tags {
        restore_element(obj, tag, charset.clone(), big_endian, depth);
    }
}

/// Reads element `tag` of `obj` again if it is UN and known, and looks into its items.
fn restore_element(
    obj: &mut InMemDicomObject,
    tag: Tag,
    charset: SpecificCharacterSet,
    big_endian: bool,
    depth: usize,
) {
    let Some(element) = obj.get(tag) else {
        return;
    };
    if element.vr() == VR::UN
        && let Some(replacement) = reread(obj, element, &charset, big_endian)
    {
        obj.put(replacement);
    }
    let nested = obj.get(tag).is_some_and(|e| {
        e.items()
            .is_some_and(|items| items.iter().any(|i| has_unknown(i, depth + 1)))
    });
    if nested && let Some(mut element) = obj.take(tag) {
        if let Some(items) = element.items_mut() {
            for item in items.iter_mut() {
                restore(item, charset.clone(), big_endian, depth + 1);
            }
        }
        obj.put(element);
    }
}

/// The VR the dictionary gives `tag` where a UN element of it can be read again as that VR.
fn dictionary_vr(obj: &InMemDicomObject, tag: Tag) -> Option<VR> {
    // Private attributes, and bulk data that UN holds as well as its own VR would.
    if tag.group() % 2 == 1 || tag.group() == 0x7FE0 || tag.group() == 0xFFFE {
        return None;
    }
    match StandardDataDictionary.by_tag(tag)?.vr() {
        VirtualVr::Exact(VR::UN | VR::OB | VR::OW | VR::OF | VR::OD | VR::OL | VR::OV) => None,
        VirtualVr::Exact(vr) => Some(vr),
        // Pixel sample values: signed where Pixel Representation is 1 (PS3.5 §6.2).
        VirtualVr::Xs => {
            let signed = obj
                .get(tags::PIXEL_REPRESENTATION)
                .filter(|e| e.vr() != VR::UN)
                .and_then(|e| e.to_int::<u16>().ok())
                == Some(1);
            Some(if signed { VR::SS } else { VR::US })
        }
        _ => None,
    }
}

/// Bytes per value of a binary VR (0: text, or a sequence).
fn binary_width(vr: VR) -> usize {
    match vr {
        VR::US | VR::SS => 2,
        VR::UL | VR::SL | VR::FL | VR::AT => 4,
        VR::FD | VR::SV | VR::UV => 8,
        _ => 0,
    }
}

/// `element` (of VR UN) read again with its dictionary VR; `None` where it cannot be.
fn reread(
    obj: &InMemDicomObject,
    element: &InMemElement,
    charset: &SpecificCharacterSet,
    big_endian: bool,
) -> Option<InMemElement> {
    let tag = element.header().tag;
    let vr = dictionary_vr(obj, tag)?;
    match element.value() {
        // A UN of undefined length: dicom-rs read its items already (CP-246).
        DicomValue::Sequence(seq) => {
            (vr == VR::SQ).then(|| DataElement::new(tag, VR::SQ, DicomValue::from(seq.clone())))
        }
        DicomValue::Primitive(PrimitiveValue::U8(bytes)) => {
            let width = binary_width(vr);
            if bytes.len() > MAX_VALUE_BYTES
                || (width > 0 && (big_endian || bytes.len() % width != 0))
                || u32::try_from(bytes.len()).is_err()
            {
                return None;
            }
            if matches!(vr, VR::SS | VR::US) {
                // Xs resolved above; read by hand so that the VR is the one chosen.
                let values = bytes.chunks_exact(2).map(|c| [c[0], c[1]]);
                let value = if vr == VR::SS {
                    PrimitiveValue::I16(values.map(i16::from_le_bytes).collect())
                } else {
                    PrimitiveValue::U16(values.map(u16::from_le_bytes).collect())
                };
                return Some(DataElement::new(tag, vr, value));
            }
            let len = u32::try_from(bytes.len()).ok()?;
            let mut encoded = Vec::with_capacity(bytes.len() + 8);
            encoded.extend_from_slice(&tag.group().to_le_bytes());
            encoded.extend_from_slice(&tag.element().to_le_bytes());
            encoded.extend_from_slice(&len.to_le_bytes());
            encoded.extend_from_slice(bytes);
            // Its structure first, by the walker that checks every received data set (items
            // nested at most 64 deep): dicom-object's reader recurses without a bound, and
            // a UN value of 1,500 nested items overflowed the stack of the thread reading it
            // and stopped the server, at every restart (a re-attack's finding).
            let implicit_le = crate::structure::Encoding {
                explicit_vr: false,
                big_endian: false,
                deflated: false,
            };
            crate::structure::check(&encoded, implicit_le).ok()?;
            let ts = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
            let mut read = InMemDicomObject::read_dataset_with_ts_cs(
                Cursor::new(encoded),
                &ts,
                charset.clone(),
            )
            .ok()?;
            let element = read.take(tag)?;
            (element.vr() == vr && read.iter().next().is_none()).then_some(element)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn un(obj: &mut InMemDicomObject, tag: Tag, bytes: &[u8]) {
        obj.put(DataElement::new(
            tag,
            VR::UN,
            PrimitiveValue::from(bytes.to_vec()),
        ));
    }

    /// An Implicit VR Little Endian item holding one element.
    fn implicit_item(tag: Tag, value: &[u8]) -> Vec<u8> {
        let mut element = Vec::new();
        element.extend_from_slice(&tag.group().to_le_bytes());
        element.extend_from_slice(&tag.element().to_le_bytes());
        element.extend_from_slice(&(value.len() as u32).to_le_bytes());
        element.extend_from_slice(value);
        let mut item = vec![0xFE, 0xFF, 0x00, 0xE0];
        item.extend_from_slice(&(element.len() as u32).to_le_bytes());
        item.extend_from_slice(&element);
        item
    }

    #[test]
    fn standard_attributes_written_as_un_read_as_the_dictionary_says() {
        let mut obj = InMemDicomObject::new_empty();
        un(&mut obj, tags::SPECIFIC_CHARACTER_SET, b"ISO_IR 100");
        un(&mut obj, tags::MODALITY, b"CT");
        // "Müller^Zoë" in Latin-1.
        un(&mut obj, tags::PATIENT_NAME, b"M\xfcller^Zo\xeb ");
        un(&mut obj, tags::ROWS, &512u16.to_le_bytes());
        un(&mut obj, tags::PIXEL_REPRESENTATION, &1u16.to_le_bytes());
        un(
            &mut obj,
            tags::PIXEL_PADDING_VALUE,
            &(-2000i16).to_le_bytes(),
        );
        un(&mut obj, tags::IMAGE_TYPE, b"ORIGINAL\\PRIMARY\\AXIAL ");
        un(&mut obj, tags::SLICE_THICKNESS, b"1.25");
        let sequence = implicit_item(tags::REFERENCED_SOP_INSTANCE_UID, b"1.2.3.4\0");
        un(&mut obj, tags::REFERENCED_IMAGE_SEQUENCE, &sequence);
        // Private and bulk data stay.
        un(&mut obj, Tag(0x0029, 0x1010), b"CT");
        un(&mut obj, tags::PIXEL_DATA, &[1, 2, 3, 4]);
        restore_standard_vrs(&mut obj, false);

        let text = |tag| obj.element(tag).unwrap().to_str().unwrap().into_owned();
        assert_eq!(obj.element(tags::MODALITY).unwrap().vr(), VR::CS);
        assert_eq!(text(tags::MODALITY), "CT");
        assert_eq!(obj.element(tags::PATIENT_NAME).unwrap().vr(), VR::PN);
        assert_eq!(text(tags::PATIENT_NAME).trim_end(), "Müller^Zoë");
        assert_eq!(
            obj.element(tags::ROWS).unwrap().to_int::<u16>().unwrap(),
            512
        );
        assert_eq!(obj.element(tags::ROWS).unwrap().vr(), VR::US);
        let padding = obj.element(tags::PIXEL_PADDING_VALUE).unwrap();
        assert_eq!(padding.vr(), VR::SS);
        assert_eq!(padding.to_int::<i32>().unwrap(), -2000);
        assert_eq!(
            obj.element(tags::IMAGE_TYPE)
                .unwrap()
                .to_multi_str()
                .unwrap()
                .len(),
            3
        );
        assert_eq!(obj.element(tags::SLICE_THICKNESS).unwrap().vr(), VR::DS);
        let items = obj
            .element(tags::REFERENCED_IMAGE_SEQUENCE)
            .unwrap()
            .items()
            .unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(
            items[0]
                .element(tags::REFERENCED_SOP_INSTANCE_UID)
                .unwrap()
                .to_str()
                .unwrap()
                .trim_end_matches('\0'),
            "1.2.3.4"
        );
        assert_eq!(obj.element(Tag(0x0029, 0x1010)).unwrap().vr(), VR::UN);
        assert_eq!(obj.element(tags::PIXEL_DATA).unwrap().vr(), VR::UN);
    }

    #[test]
    fn a_value_its_vr_cannot_have_stays_un() {
        let mut obj = InMemDicomObject::new_empty();
        un(&mut obj, tags::ROWS, &[1, 2, 3]); // US: 3 bytes
        un(&mut obj, tags::PIXEL_SPACING, b"");
        // A sequence whose bytes are not items.
        un(&mut obj, tags::REFERENCED_IMAGE_SEQUENCE, b"not an item");
        restore_standard_vrs(&mut obj, false);
        assert_eq!(obj.element(tags::ROWS).unwrap().vr(), VR::UN);
        assert_eq!(
            obj.element(tags::REFERENCED_IMAGE_SEQUENCE).unwrap().vr(),
            VR::UN
        );
        // An empty value is a valid empty DS.
        assert_eq!(obj.element(tags::PIXEL_SPACING).unwrap().vr(), VR::DS);
    }

    /// A re-attack's finding: a UN value of items nested 1,500 deep overflowed the stack of
    /// the thread re-reading it. Nested deeper than the ingest check allows, it stays UN.
    #[test]
    fn a_un_sequence_nested_too_deep_stays_un() {
        let nested = |depth: usize| {
            let mut bytes = Vec::new();
            for _ in 0..depth {
                bytes.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
                bytes.extend_from_slice(&[0x08, 0x00, 0x40, 0x11, 0xFF, 0xFF, 0xFF, 0xFF]);
            }
            for _ in 0..depth {
                bytes.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
                bytes.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
            }
            bytes
        };
        // Run on a thread with a small stack: an unbounded reader would overflow it.
        let outcome = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let mut obj = InMemDicomObject::new_empty();
                un(&mut obj, tags::REFERENCED_IMAGE_SEQUENCE, &nested(5_000));
                restore_standard_vrs(&mut obj, false);
                let deep = obj.element(tags::REFERENCED_IMAGE_SEQUENCE).unwrap().vr();
                let mut obj = InMemDicomObject::new_empty();
                un(&mut obj, tags::REFERENCED_IMAGE_SEQUENCE, &nested(8));
                restore_standard_vrs(&mut obj, false);
                (
                    deep,
                    obj.element(tags::REFERENCED_IMAGE_SEQUENCE).unwrap().vr(),
                )
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(outcome, (VR::UN, VR::SQ));
    }

    #[test]
    fn big_endian_data_sets_read_only_text_again() {
        let mut obj = InMemDicomObject::new_empty();
        un(&mut obj, tags::MODALITY, b"MR");
        un(&mut obj, tags::ROWS, &[0, 2]);
        restore_standard_vrs(&mut obj, true);
        assert_eq!(obj.element(tags::MODALITY).unwrap().to_str().unwrap(), "MR");
        assert_eq!(obj.element(tags::ROWS).unwrap().vr(), VR::UN);
    }

    #[test]
    fn items_inherit_the_character_set_and_are_read_again_too() {
        let mut obj = InMemDicomObject::new_empty();
        obj.put(DataElement::new(
            tags::SPECIFIC_CHARACTER_SET,
            VR::CS,
            PrimitiveValue::from("ISO_IR 100"),
        ));
        let mut item = InMemDicomObject::new_empty();
        un(&mut item, tags::CODE_MEANING, b"Gew\xfcrz");
        obj.put(DataElement::new(
            tags::PROCEDURE_CODE_SEQUENCE,
            VR::SQ,
            DicomValue::new_sequence(vec![item], dicom_core::Length::UNDEFINED),
        ));
        restore_standard_vrs(&mut obj, false);
        let items = obj
            .element(tags::PROCEDURE_CODE_SEQUENCE)
            .unwrap()
            .items()
            .unwrap();
        let meaning = items[0].element(tags::CODE_MEANING).unwrap();
        assert_eq!(meaning.vr(), VR::LO);
        assert_eq!(meaning.to_str().unwrap(), "Gewürz");
    }
}
