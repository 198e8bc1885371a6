//! What the SR and the SC share: element helpers, the copied patient/study attributes, the
//! equipment (IHE AIR), dates, and Part 10 serialisation.

use chrono::{DateTime, FixedOffset, Utc};
use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::text::SpecificCharacterSet;
use dicom_object::InMemDicomObject;
use dicom_object::meta::FileMetaTableBuilder;

use super::source::SourceSeries;
use super::{Code, EXPLICIT_VR_LITTLE_ENDIAN, MANUFACTURER, ResultContext, ResultError, Uid};
use crate::spool::{IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME};

/// Put a single string value.
pub(crate) fn put(obj: &mut InMemDicomObject, tag: Tag, vr: VR, value: &str) {
    obj.put(DataElement::new(tag, vr, PrimitiveValue::from(value)));
}

/// Put a multi-valued string.
pub(crate) fn put_multi(obj: &mut InMemDicomObject, tag: Tag, vr: VR, values: &[String]) {
    obj.put(DataElement::new(
        tag,
        vr,
        PrimitiveValue::Strs(values.iter().cloned().collect()),
    ));
}

/// Put a sequence (possibly empty, for Type 2 sequences).
pub(crate) fn put_seq(obj: &mut InMemDicomObject, tag: Tag, items: Vec<InMemDicomObject>) {
    obj.put(DataElement::new(tag, VR::SQ, DataSetSequence::from(items)));
}

/// A Long String (LO) or Short String value of at most `max` characters: backslashes
/// (value separators) and control characters replaced, then cut.
pub(crate) fn short(text: &str, max: usize) -> String {
    text.chars()
        .map(|c| if c == '\\' || c.is_control() { ' ' } else { c })
        .take(max)
        .collect::<String>()
        .trim_end()
        .to_owned()
}

/// One item of a Code Sequence (Code Sequence Macro): a value over 16 characters goes to
/// Long Code Value.
pub(crate) fn code_item(code: &Code) -> InMemDicomObject {
    let mut item = InMemDicomObject::new_empty();
    let value = short(&code.value, 64);
    if value.chars().count() > 16 {
        put(&mut item, tags::LONG_CODE_VALUE, VR::UC, &value);
    } else {
        put(&mut item, tags::CODE_VALUE, VR::SH, &value);
    }
    put(
        &mut item,
        tags::CODING_SCHEME_DESIGNATOR,
        VR::SH,
        &short(&code.scheme, 16),
    );
    put(
        &mut item,
        tags::CODE_MEANING,
        VR::LO,
        &short(&code.meaning, 64),
    );
    item
}

pub(crate) fn put_code(obj: &mut InMemDicomObject, tag: Tag, code: &Code) {
    put_seq(obj, tag, vec![code_item(code)]);
}

/// The object's creation date and time (DA, and TM to the microsecond) in the source's time
/// zone (its Timezone Offset From UTC, which the result copies: PS3.3 C.12.1.1.8 applies one
/// offset to every date and time of an instance, the copied study date and time included),
/// else in this host's local time (no offset written: a source without one is in the site's
/// local time). It was UTC with "+0000" whatever the source: a study at 08:30 +0100 read as
/// 08:30 UTC (a review's finding).
pub(crate) fn date_time(ctx: &ResultContext, source: &SourceSeries) -> (String, String) {
    let t: DateTime<Utc> = ctx.created.into();
    let local = t.with_timezone(&offset_of(source));
    (
        local.format("%Y%m%d").to_string(),
        local.format("%H%M%S%.6f").to_string(),
    )
}

/// The source's offset, or this host's at the creation time.
fn offset_of(source: &SourceSeries) -> FixedOffset {
    source
        .timezone
        .unwrap_or_else(|| *chrono::Local::now().offset())
}

/// `+HHMM` / `-HHMM`, as Timezone Offset From UTC (SH) and a DT's suffix write it.
pub(crate) fn offset_text(offset: FixedOffset) -> String {
    let seconds = offset.local_minus_utc();
    let sign = if seconds < 0 { '-' } else { '+' };
    let minutes = seconds.unsigned_abs() / 60;
    format!("{sign}{:02}{:02}", minutes / 60, minutes % 60)
}

/// Specific Character Set, the copied patient/study attributes, and empty values for the
/// Type 2 ones the source lacks (unknown, not invented).
///
/// The source's character set is kept when this build can encode it and everything this
/// object adds is ASCII; otherwise the object is written in UTF-8 (ISO_IR 192): dicom-rs
/// decoded the source's text to Unicode, so the copied values keep their characters.
pub(crate) fn copy_source(obj: &mut InMemDicomObject, source: &SourceSeries, ascii: bool) {
    let keep = source
        .charset
        .as_deref()
        .filter(|c| ascii && !c.contains('\\') && SpecificCharacterSet::from_code(c).is_some())
        // JIS X 0208 is written by dicom-rs without the return to the default repertoire at
        // the end of a value (PS3.5 6.1.2.5.3; a red-team finding): such text is written in
        // UTF-8 instead, the same characters.
        .filter(|c| !matches!(c.trim(), "ISO_IR 87" | "ISO_IR_87" | "ISO 2022 IR 87"));
    match (keep, &source.charset, ascii) {
        (Some(c), _, _) => put(obj, tags::SPECIFIC_CHARACTER_SET, VR::CS, c),
        (None, None, true) => {}
        _ => put(obj, tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192"),
    }
    for e in &source.copied {
        obj.put(e.clone());
    }
    for (tag, vr) in [
        (tags::PATIENT_NAME, VR::PN),
        (tags::PATIENT_ID, VR::LO),
        (tags::PATIENT_BIRTH_DATE, VR::DA),
        (tags::PATIENT_SEX, VR::CS),
        (tags::STUDY_DATE, VR::DA),
        (tags::STUDY_TIME, VR::TM),
        (tags::REFERRING_PHYSICIAN_NAME, VR::PN),
        (tags::STUDY_ID, VR::SH),
        (tags::ACCESSION_NUMBER, VR::SH),
    ] {
        if obj.element_opt(tag).ok().flatten().is_none() {
            obj.put(DataElement::new(tag, vr, PrimitiveValue::Empty));
        }
    }
}

/// Software Versions: the bundle's version, then Nightingale's.
fn software_versions(ctx: &ResultContext) -> Vec<String> {
    vec![
        short(&ctx.bundle_version, 64),
        short(&format!("{MANUFACTURER} {}", ctx.nightingale_version), 64),
    ]
}

/// General Equipment module: the bundle on Nightingale as the equipment. (Its Device UID
/// goes in the Contributing Equipment Sequence only: dicom3tools' General Equipment has none.)
pub(crate) fn put_equipment(obj: &mut InMemDicomObject, ctx: &ResultContext) {
    put(obj, tags::MANUFACTURER, VR::LO, MANUFACTURER);
    put(
        obj,
        tags::MANUFACTURER_MODEL_NAME,
        VR::LO,
        &short(&ctx.bundle_name, 64),
    );
    put_multi(
        obj,
        tags::SOFTWARE_VERSIONS,
        VR::LO,
        &software_versions(ctx),
    );
    put(obj, tags::DEVICE_UID, VR::UI, ctx.device_uid.as_str());
}

/// SOP Common: class, instance, creation date/time (UTC), and the IHE AIR Contributing
/// Equipment Sequence (the bundle as processing equipment, 109102 DCM).
pub(crate) fn put_sop_common(
    obj: &mut InMemDicomObject,
    sop_class: &str,
    sop_instance: &Uid,
    ctx: &ResultContext,
    source: &SourceSeries,
) {
    let (date, time) = date_time(ctx, source);
    put(obj, tags::SOP_CLASS_UID, VR::UI, sop_class);
    put(obj, tags::SOP_INSTANCE_UID, VR::UI, sop_instance.as_str());
    put(obj, tags::INSTANCE_CREATION_DATE, VR::DA, &date);
    put(obj, tags::INSTANCE_CREATION_TIME, VR::TM, &time);
    if let Some(offset) = source.timezone {
        put(
            obj,
            tags::TIMEZONE_OFFSET_FROM_UTC,
            VR::SH,
            &offset_text(offset),
        );
    }

    let mut equipment = InMemDicomObject::new_empty();
    put(&mut equipment, tags::MANUFACTURER, VR::LO, MANUFACTURER);
    put(
        &mut equipment,
        tags::MANUFACTURER_MODEL_NAME,
        VR::LO,
        &short(&ctx.bundle_name, 64),
    );
    put_multi(
        &mut equipment,
        tags::SOFTWARE_VERSIONS,
        VR::LO,
        &software_versions(ctx),
    );
    put(
        &mut equipment,
        tags::DEVICE_UID,
        VR::UI,
        ctx.device_uid.as_str(),
    );
    put_code(
        &mut equipment,
        tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
        &Code::new("109102", "DCM", "Processing Equipment"),
    );
    put(
        &mut equipment,
        tags::CONTRIBUTION_DATE_TIME,
        VR::DT,
        &format!("{date}{time}{}", offset_text(offset_of(source))),
    );
    put(
        &mut equipment,
        tags::CONTRIBUTION_DESCRIPTION,
        VR::ST,
        "AI inference result",
    );
    put_seq(obj, tags::CONTRIBUTING_EQUIPMENT_SEQUENCE, vec![equipment]);
}

/// Every string this object adds from the context and the findings is ASCII.
pub(crate) fn all_ascii<'a>(texts: impl IntoIterator<Item = &'a str>) -> bool {
    texts.into_iter().all(|t| t.is_ascii())
}

/// Part 10 bytes in Explicit VR Little Endian.
pub(crate) fn to_part10(obj: InMemDicomObject) -> Result<Vec<u8>, ResultError> {
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(EXPLICIT_VR_LITTLE_ENDIAN)
                .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
                .implementation_version_name(IMPLEMENTATION_VERSION_NAME),
        )
        .map_err(|e| ResultError::Meta(Box::new(e)))?;
    let mut out = Vec::new();
    file.write_all(&mut out)
        .map_err(|e| ResultError::Write(Box::new(e)))?;
    Ok(out)
}

/// A Decimal String (at most 16 characters) for a value in [0, 1]: the shortest text that
/// reads back as the same `f32`, in exponent form when the plain form is too long.
pub(crate) fn ds(value: f32) -> String {
    let plain = format!("{value}");
    if plain.len() <= 16 {
        plain
    } else {
        format!("{value:e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ds_fits_and_round_trips() {
        for v in [0.0f32, 1.0, 0.873, 1e-45, 0.1, 1.0 / 3.0, f32::EPSILON] {
            let s = ds(v);
            assert!(s.len() <= 16, "{s}");
            assert_eq!(s.parse::<f32>().unwrap(), v);
        }
    }

    #[test]
    fn short_strips_separators_and_cuts() {
        assert_eq!(short("a\\b\nc", 64), "a b c");
        assert_eq!(short(&"x".repeat(100), 64).len(), 64);
        assert_eq!(short("ééé", 2), "éé");
    }
}
