//! The secondary capture: an already rendered 8-bit image of one source instance with the
//! result burned in on a band below it (Secondary Capture Image Storage).

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use super::burn::{MAX_LINES, ascii_line, burn_band};
use super::common::{
    all_ascii, copy_source, date_time, ds, put, put_code, put_equipment, put_multi, put_seq,
    put_sop_common, short, to_part10,
};
use super::source::SourceSeries;
use super::sr::sop_ref;
use super::{
    AI_RESULT_LABEL, Code, Finding, MANUFACTURER, ResultContext, ResultError, ResultObject,
    SC_SERIES_NUMBER, SECONDARY_CAPTURE, Uid, check_findings,
};

/// The rendered pixels, row by row, 8 bits per sample.
#[derive(Debug, Clone)]
pub enum RenderedPixels {
    /// One byte per pixel, 0 = black (written as MONOCHROME2).
    Grey(Vec<u8>),
    /// Three bytes per pixel, R G B interleaved (written as RGB, planar configuration 0).
    Rgb(Vec<u8>),
}

/// An image of one source instance, already rendered for display (windowed, 8-bit).
#[derive(Debug, Clone)]
pub struct RenderedImage {
    pub rows: usize,
    pub columns: usize,
    pub pixels: RenderedPixels,
    /// The source instance it shows (must be one of the series').
    pub source_sop_instance_uid: Uid,
    /// The frame it shows, for a multi-frame source (1-based, as DICOM numbers frames).
    pub frame: Option<u32>,
    /// A saliency heatmap laid over the image (RGB pixels only): named in the burned-in
    /// text, its colour bar drawn under it, and declared in the derivation description.
    pub heatmap: Option<Heatmap>,
}

/// What a heatmap overlaid on a [`RenderedImage`] shows.
#[derive(Debug, Clone)]
pub struct Heatmap {
    /// One line of ASCII saying what the colours mean, e.g.
    /// `HEATMAP: occlusion saliency for "present" (evidence for it)`.
    pub caption: String,
    /// The colour map from low to high, for the legend.
    pub colours: Vec<[u8; 3]>,
}

impl RenderedImage {
    fn check(&self) -> Result<(), ResultError> {
        let max = usize::from(u16::MAX);
        if !(1..=max).contains(&self.rows) || !(1..=max).contains(&self.columns) {
            return Err(ResultError::ImageSize {
                rows: self.rows,
                columns: self.columns,
            });
        }
        let (samples, actual) = match &self.pixels {
            RenderedPixels::Grey(p) => (1, p.len()),
            RenderedPixels::Rgb(p) => (3, p.len()),
        };
        let expected = self.rows * self.columns * samples;
        if actual != expected {
            return Err(ResultError::PixelCount {
                rows: self.rows,
                columns: self.columns,
                samples,
                expected,
                actual,
            });
        }
        Ok(())
    }
}

/// The lines burned in: the warning, one line per finding (at most [`MAX_LINES`] in all),
/// the model, and what a heatmap shows.
fn lines(ctx: &ResultContext, findings: &[Finding], heatmap: Option<&Heatmap>) -> Vec<String> {
    let mut out = vec![AI_RESULT_LABEL.to_owned()];
    let room = MAX_LINES - 2 - usize::from(heatmap.is_some());
    let shown = if findings.len() > room {
        room - 1
    } else {
        findings.len()
    };
    for f in &findings[..shown] {
        out.push(ascii_line(&format!(
            "{}: p={} threshold={} {}",
            f.label.meaning,
            ds(f.probability),
            ds(f.threshold),
            if f.positive { "POSITIVE" } else { "NEGATIVE" }
        )));
    }
    if shown < findings.len() {
        out.push(format!(
            "... {} more findings in the structured report",
            findings.len() - shown
        ));
    }
    out.push(ascii_line(&format!(
        "{} {} - {MANUFACTURER} {}",
        ctx.bundle_name, ctx.bundle_version, ctx.nightingale_version
    )));
    if let Some(h) = heatmap {
        out.push(ascii_line(&h.caption));
    }
    out
}

/// The Secondary Capture of `image` with `findings` burned in, as Part 10 bytes.
pub fn build_sc(
    source: &SourceSeries,
    ctx: &ResultContext,
    findings: &[Finding],
    image: RenderedImage,
) -> Result<ResultObject, ResultError> {
    check_findings(source, findings)?;
    image.check()?;
    let index = source
        .position(&image.source_sop_instance_uid)
        .ok_or(ResultError::UnknownSourceInstance)?;
    let referenced = &source.instances[index];
    let sop_instance_uid = Uid::generate();
    let series_instance_uid = Uid::generate();
    let (date, time) = date_time(ctx, source);
    let ascii = all_ascii([
        ctx.bundle_name.as_str(),
        &ctx.bundle_version,
        &ctx.nightingale_version,
    ]);

    let mut obj = InMemDicomObject::new_empty();
    put_sop_common(&mut obj, SECONDARY_CAPTURE, &sop_instance_uid, ctx, source);
    copy_source(&mut obj, source, ascii);

    // General Series: "OT", not the source's modality, so routing rules on modality never
    // send a result back into the pipeline.
    put(&mut obj, tags::MODALITY, VR::CS, "OT");
    put(
        &mut obj,
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        series_instance_uid.as_str(),
    );
    put(
        &mut obj,
        tags::SERIES_NUMBER,
        VR::IS,
        &SC_SERIES_NUMBER.to_string(),
    );
    put(&mut obj, tags::SERIES_DATE, VR::DA, &date);
    put(&mut obj, tags::SERIES_TIME, VR::TM, &time);
    put(
        &mut obj,
        tags::SERIES_DESCRIPTION,
        VR::LO,
        &short(&format!("{} ({})", AI_RESULT_LABEL, ctx.bundle_name), 64),
    );
    // Laterality (Type 2C, on the source's body part) and Body Part Examined as the source
    // has them; with neither, Laterality is empty (unknown), as a paired body part needs it.
    for e in &source.series_attributes {
        obj.put(e.clone());
    }
    if source.series_attributes.is_empty() {
        obj.put(DataElement::new(
            tags::LATERALITY,
            VR::CS,
            PrimitiveValue::Empty,
        ));
    }
    let mut related = InMemDicomObject::new_empty();
    put(
        &mut related,
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        source.study_instance_uid.as_str(),
    );
    put(
        &mut related,
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        source.series_instance_uid.as_str(),
    );
    put_seq(
        &mut related,
        tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
        vec![],
    );
    put_seq(&mut obj, tags::RELATED_SERIES_SEQUENCE, vec![related]);

    put_equipment(&mut obj, ctx);

    // SC Equipment
    put(&mut obj, tags::CONVERSION_TYPE, VR::CS, "WSD");
    put(
        &mut obj,
        tags::SECONDARY_CAPTURE_DEVICE_ID,
        VR::LO,
        ctx.device_uid.as_str(),
    );
    put(
        &mut obj,
        tags::SECONDARY_CAPTURE_DEVICE_MANUFACTURER,
        VR::LO,
        MANUFACTURER,
    );
    put(
        &mut obj,
        tags::SECONDARY_CAPTURE_DEVICE_MANUFACTURER_MODEL_NAME,
        VR::LO,
        &short(&ctx.bundle_name, 64),
    );
    put_multi(
        &mut obj,
        tags::SECONDARY_CAPTURE_DEVICE_SOFTWARE_VERSIONS,
        VR::LO,
        &[
            short(&ctx.bundle_version, 64),
            short(&format!("{MANUFACTURER} {}", ctx.nightingale_version), 64),
        ],
    );

    // General Image and General Reference
    put(&mut obj, tags::INSTANCE_NUMBER, VR::IS, "1");
    match &source.orientations[index] {
        Some(o) => {
            obj.put(o.clone());
        }
        None => {
            obj.put(DataElement::new(
                tags::PATIENT_ORIENTATION,
                VR::CS,
                PrimitiveValue::Empty,
            ));
        }
    }
    put(&mut obj, tags::CONTENT_DATE, VR::DA, &date);
    put(&mut obj, tags::CONTENT_TIME, VR::TM, &time);
    put_multi(
        &mut obj,
        tags::IMAGE_TYPE,
        VR::CS,
        &["DERIVED".to_owned(), "SECONDARY".to_owned()],
    );
    put(
        &mut obj,
        tags::DERIVATION_DESCRIPTION,
        VR::ST,
        if image.heatmap.is_some() {
            "Rendered for display, AI saliency heatmap overlaid, AI result burned in"
        } else {
            "Rendered for display, AI result burned in"
        },
    );
    put(&mut obj, tags::BURNED_IN_ANNOTATION, VR::CS, "YES");
    for e in &source.lossy[index] {
        obj.put(e.clone());
    }
    let mut reference = sop_ref(&referenced.sop_class_uid, &referenced.sop_instance_uid);
    if let Some(frame) = image.frame {
        put(
            &mut reference,
            tags::REFERENCED_FRAME_NUMBER,
            VR::IS,
            &frame.to_string(),
        );
    }
    put_code(
        &mut reference,
        tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
        &Code::new(
            "121322",
            "DCM",
            "Source image for image processing operation",
        ),
    );
    put_seq(&mut obj, tags::SOURCE_IMAGE_SEQUENCE, vec![reference]);

    // SC Image
    put(&mut obj, tags::DATE_OF_SECONDARY_CAPTURE, VR::DA, &date);
    put(&mut obj, tags::TIME_OF_SECONDARY_CAPTURE, VR::TM, &time);

    // Image Pixel, with the band burned in
    let (samples, photometric, mut pixels) = match image.pixels {
        RenderedPixels::Grey(p) => (1u16, "MONOCHROME2", p),
        RenderedPixels::Rgb(p) => (3u16, "RGB", p),
    };
    let heatmap = image.heatmap.as_ref().filter(|_| samples == 3);
    let rows = burn_band(
        &mut pixels,
        image.rows,
        image.columns,
        usize::from(samples),
        &lines(ctx, findings, heatmap),
        heatmap.map(|h| h.colours.as_slice()),
    );
    if pixels.len() % 2 == 1 {
        pixels.push(0);
    }
    let us = |v: u16| PrimitiveValue::from(v);
    // Both fit: `check` bounded them to 65535 and `burn` never goes past it.
    let rows = u16::try_from(rows).unwrap_or(u16::MAX);
    let columns = u16::try_from(image.columns).unwrap_or(u16::MAX);
    obj.put(DataElement::new(
        tags::SAMPLES_PER_PIXEL,
        VR::US,
        us(samples),
    ));
    put(
        &mut obj,
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        photometric,
    );
    if samples == 3 {
        obj.put(DataElement::new(tags::PLANAR_CONFIGURATION, VR::US, us(0)));
    }
    obj.put(DataElement::new(tags::ROWS, VR::US, us(rows)));
    obj.put(DataElement::new(tags::COLUMNS, VR::US, us(columns)));
    obj.put(DataElement::new(tags::BITS_ALLOCATED, VR::US, us(8)));
    obj.put(DataElement::new(tags::BITS_STORED, VR::US, us(8)));
    obj.put(DataElement::new(tags::HIGH_BIT, VR::US, us(7)));
    obj.put(DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, us(0)));
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::U8(pixels.into()),
    ));

    let study_instance_uid = source.study_instance_uid.clone();
    Ok(ResultObject {
        sop_class_uid: SECONDARY_CAPTURE,
        sop_instance_uid,
        series_instance_uid,
        study_instance_uid,
        bytes: to_part10(obj)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> ResultContext {
        ResultContext::new("demo-bundle", "1.2.0", "abc", "Research use.")
    }

    fn finding(i: usize) -> Finding {
        Finding {
            label: Code::local(&format!("o{i}"), &format!("Output {i}")),
            probability: 0.25,
            threshold: 0.5,
            positive: false,
            measured_on: None,
        }
    }

    #[test]
    fn lines_are_bounded_and_summarised() {
        let many: Vec<_> = (0..100).map(finding).collect();
        let l = lines(&ctx(), &many, None);
        assert_eq!(l.len(), MAX_LINES);
        assert_eq!(l[0], AI_RESULT_LABEL);
        assert_eq!(
            l[MAX_LINES - 2],
            "... 79 more findings in the structured report"
        );
        let few = lines(&ctx(), &[finding(1)], None);
        assert_eq!(
            few,
            vec![
                AI_RESULT_LABEL.to_owned(),
                "Output 1: p=0.25 threshold=0.5 NEGATIVE".to_owned(),
                format!(
                    "demo-bundle 1.2.0 - Nightingale {}",
                    env!("CARGO_PKG_VERSION")
                ),
            ]
        );
        // With a heatmap: its caption last, and still at most MAX_LINES.
        let h = Heatmap {
            caption: "HEATMAP: occlusion saliency for present".into(),
            colours: vec![[0, 0, 0], [255, 255, 255]],
        };
        let l = lines(&ctx(), &many, Some(&h));
        assert_eq!(l.len(), MAX_LINES);
        assert_eq!(l[MAX_LINES - 1], h.caption);
        assert_eq!(
            l[MAX_LINES - 3],
            "... 80 more findings in the structured report"
        );
    }

    #[test]
    fn bad_images_are_refused() {
        let img = |rows, columns, pixels| RenderedImage {
            rows,
            columns,
            pixels,
            source_sop_instance_uid: Uid::generate(),
            frame: None,
            heatmap: None,
        };
        assert!(matches!(
            img(0, 5, RenderedPixels::Grey(vec![])).check(),
            Err(ResultError::ImageSize { .. })
        ));
        assert!(matches!(
            img(70_000, 1, RenderedPixels::Grey(vec![0; 70_000])).check(),
            Err(ResultError::ImageSize { .. })
        ));
        assert!(matches!(
            img(2, 2, RenderedPixels::Rgb(vec![0; 4])).check(),
            Err(ResultError::PixelCount {
                expected: 12,
                actual: 4,
                ..
            })
        ));
        assert!(img(2, 2, RenderedPixels::Rgb(vec![0; 12])).check().is_ok());
    }
}
