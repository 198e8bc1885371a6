//! Pixel decode (dicom/src/pixels.rs) against pydicom + numpy on real files, and hostile
//! headers built here.
//!
//! The expected values come from `tests/peer/make_pixel_fixtures.py` (pydicom 3.0.2 with the
//! pylibjpeg plug-ins) in `tests/fixtures/pixels/cases.json`; the files themselves are read
//! from the installed pydicom / pydicom-data packages, whose directories scripts/test.sh
//! exports as NIGHTINGALE_PYDICOM_DIR and NIGHTINGALE_PYDICOM_DATA_DIR. Without them the
//! real-file tests are skipped (with a message), unless NIGHTINGALE_PEERS=1 says the peers
//! must be there.
//!
//! Tolerances: lossless data must be equal value for value (stored values are integers);
//! modality and VOI values are computed in f32 here and f64 by numpy: |Δ| ≤ 1e-5 × max(1, |v|);
//! lossy codecs (JPEG baseline, JPEG 2000 irreversible) are decoded by different
//! implementations (jpeg-decoder and OpenJPEG's Rust port vs libjpeg and OpenJPEG), which may
//! round differently (YCbCr → RGB, IDCT): |Δ| ≤ 2 per sample on 8-bit data (seen: ≤ 2 on
//! JPEG baseline, 0 on JPEG 2000) and a mean Δ (through the sums) ≤ 0.5;
//! 8-bit renderings: |Δ| ≤ 1 (f32 vs f64 at a rounding edge).

use std::path::{Path, PathBuf};

use dicom_core::value::PixelFragmentSequence;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, FileMetaTableBuilder, InMemDicomObject};
use nightingale_dicom::pixels::{
    DecodeBudget, DecodeOptions, ImageHeader, Limits, PixelError, PixelSource, RenderWindow,
    Values, Voi, check_series, j2k_size, render8,
};
use serde_json::Value as Json;

const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
const RLE: &str = "1.2.840.10008.1.2.5";
const J2K: &str = "1.2.840.10008.1.2.4.90";
const SC: &str = "1.2.840.10008.5.1.4.1.1.7";

fn fixtures() -> Json {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pixels/cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The package directories, or None (skip) when the peers are not installed.
fn packages() -> Option<(PathBuf, PathBuf)> {
    let dirs = (
        std::env::var_os("NIGHTINGALE_PYDICOM_DIR").map(PathBuf::from),
        std::env::var_os("NIGHTINGALE_PYDICOM_DATA_DIR").map(PathBuf::from),
    );
    match dirs {
        (Some(a), Some(b)) if a.is_dir() && b.is_dir() => Some((a, b)),
        _ if std::env::var("NIGHTINGALE_PEERS").as_deref() == Ok("1") => panic!(
            "NIGHTINGALE_PEERS=1 but NIGHTINGALE_PYDICOM_DIR / NIGHTINGALE_PYDICOM_DATA_DIR do \
             not name the installed pydicom and pydicom-data packages (scripts/test.sh exports them)"
        ),
        _ => {
            eprintln!(
                "skipped: set NIGHTINGALE_PYDICOM_DIR and NIGHTINGALE_PYDICOM_DATA_DIR to the \
                 pydicom and pydicom-data package directories (scripts/test.sh does)"
            );
            None
        }
    }
}

fn file_of(case: &Json, dirs: &(PathBuf, PathBuf)) -> PathBuf {
    let root = match case["package"].as_str().unwrap() {
        "pydicom" => &dirs.0,
        "data_store" => &dirs.1,
        other => panic!("unknown package {other}"),
    };
    root.join(case["path"].as_str().unwrap())
}

fn options_for(values: &str) -> DecodeOptions {
    match values {
        "stored" => DecodeOptions::default(),
        "modality" => DecodeOptions {
            modality_lut: true,
            ..Default::default()
        },
        "voi" => DecodeOptions {
            voi: Voi::FromObject,
            ..Default::default()
        },
        other => panic!("unknown values {other}"),
    }
}

/// Compares decoded values with a fixture record; returns what differs.
fn compare(data: &[f32], record: &Json, tolerance: Tolerance) -> Vec<String> {
    let mut problems = Vec::new();
    let stride = record["stride"].as_u64().unwrap() as usize;
    let sample: Vec<f64> = record["sample"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let n = data.len();
    let got: Vec<f64> = data.iter().step_by(stride).map(|&v| f64::from(v)).collect();
    if got.len() != sample.len() {
        problems.push(format!(
            "{} values sampled, expected {} (size {n})",
            got.len(),
            sample.len()
        ));
        return problems;
    }
    let mut worst = 0f64;
    for (i, (g, e)) in got.iter().zip(&sample).enumerate() {
        let d = (g - e).abs();
        if d > tolerance.sample(*e) && problems.len() < 5 {
            problems.push(format!("value {} is {g}, expected {e}", i * stride));
        }
        worst = worst.max(d);
    }
    let sum: f64 = data.iter().map(|&v| f64::from(v)).sum();
    let sum_sq: f64 = data.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let min = data.iter().copied().fold(f32::INFINITY, f32::min);
    let max = data.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let esum = record["sum"].as_f64().unwrap();
    if (sum - esum).abs() > tolerance.sum(esum, n) {
        problems.push(format!(
            "sum {sum}, expected {esum} (worst sample diff {worst})"
        ));
    }
    let esq = record["sum_sq"].as_f64().unwrap();
    if matches!(tolerance, Tolerance::Exact) && sum_sq != esq {
        problems.push(format!("sum of squares {sum_sq}, expected {esq}"));
    }
    for (what, g, e) in [("min", min, &record["min"]), ("max", max, &record["max"])] {
        let e = e.as_f64().unwrap();
        if (f64::from(g) - e).abs() > tolerance.sample(e) {
            problems.push(format!("{what} {g}, expected {e}"));
        }
    }
    problems
}

#[derive(Clone, Copy, Debug)]
enum Tolerance {
    /// Integers, equal.
    Exact,
    /// f32 vs f64 arithmetic.
    Float,
    /// Different lossy decoders.
    Lossy,
    /// 8-bit rendering: one grey level.
    OneLevel,
}

impl Tolerance {
    fn sample(self, expected: f64) -> f64 {
        match self {
            Tolerance::Exact => 0.0,
            Tolerance::Float => 1e-5 * expected.abs().max(1.0),
            Tolerance::Lossy => 2.0,
            Tolerance::OneLevel => 1.0,
        }
    }

    fn sum(self, expected: f64, n: usize) -> f64 {
        match self {
            Tolerance::Exact => 0.0,
            Tolerance::Float => 1e-5 * expected.abs().max(n as f64),
            Tolerance::Lossy => 0.5 * n as f64,
            Tolerance::OneLevel => n as f64,
        }
    }
}

#[test]
fn real_files_decode_as_pydicom_decodes_them() {
    let Some(dirs) = packages() else { return };
    let fixtures = fixtures();
    let mut failures = Vec::new();
    let mut decoded = 0;
    for case in fixtures["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let path = file_of(case, &dirs);
        let options = options_for(case["values"].as_str().unwrap());
        let result = PixelSource::open(&path, &options.limits).and_then(|source| {
            source
                .frames(&options)
                .map(|f| f.map(|f| (f.index, f)))
                .collect::<Result<Vec<_>, _>>()
                .map(|frames| (source.header().clone(), frames))
        });
        if let Some(reason) = case["error"].as_str() {
            match result {
                Err(e) if e.reason() == reason => {}
                Err(e) => failures.push(format!(
                    "{name}: expected {reason}, got {} ({e})",
                    e.reason()
                )),
                Ok(_) => failures.push(format!("{name}: expected {reason}, but it decoded")),
            }
            continue;
        }
        let (header, frames) = match result {
            Ok(ok) => ok,
            Err(e) => {
                failures.push(format!("{name}: {} ({e}; {e:?})", e.reason()));
                continue;
            }
        };
        decoded += 1;
        assert_eq!(header.rows, case["rows"].as_u64().unwrap() as u32, "{name}");
        assert_eq!(header.cols, case["cols"].as_u64().unwrap() as u32, "{name}");
        assert_eq!(
            frames.len() as u64,
            case["frames"].as_u64().unwrap(),
            "{name}"
        );
        let lossy = case["lossy"].as_bool().unwrap();
        let tolerance = match (lossy, case["values"].as_str().unwrap()) {
            (true, _) => Tolerance::Lossy,
            (false, "stored") => Tolerance::Exact,
            _ => Tolerance::Float,
        };
        for record in case["checked"].as_array().unwrap() {
            let index = record["index"].as_u64().unwrap() as usize;
            let frame = &frames[index].1;
            assert_eq!(
                frame.samples as u64,
                case["samples"].as_u64().unwrap(),
                "{name}"
            );
            for p in compare(&frame.data, record, tolerance) {
                failures.push(format!("{name} frame {index}: {p}"));
            }
        }
        if let Some(record) = case.get("render") {
            let window = match record["window"].as_str().unwrap() {
                "auto" => RenderWindow::Auto,
                _ => RenderWindow::Percentiles {
                    low: 0.5,
                    high: 99.5,
                },
            };
            let stored = PixelSource::open(&path, &Limits::default())
                .and_then(|s| s.frame(0, &DecodeOptions::default()))
                .unwrap();
            let rendered = render8(&stored, window).unwrap();
            assert_eq!(
                (rendered.rows, rendered.cols, rendered.samples),
                (stored.rows, stored.cols, 1)
            );
            let as_f32: Vec<f32> = rendered.data.iter().map(|&b| f32::from(b)).collect();
            for p in compare(&as_f32, record, Tolerance::OneLevel) {
                failures.push(format!("{name} rendered: {p}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(decoded > 20, "only {decoded} files decoded");
}

// --- hostile and synthetic inputs ----------------------------------------------------------

/// An RGB image compressed as JPEG baseline without a colour transform (dcmtk's `+eb +cr`)
/// decodes to the uncompressed image it was made from, sample for sample within the lossy
/// codec's error. The fixtures' samples (every row's first value) and sums could not see
/// each row decoded as all its R, then its G, then its B, which jpeg-decoder's
/// `ColorTransform::None` gives (a red-team finding: every RGB JPEG was so scrambled).
#[test]
fn an_rgb_jpeg_decodes_to_the_image_it_was_made_from() {
    let Some(dirs) = packages() else { return };
    let decode = |path: PathBuf| {
        let options = DecodeOptions::default();
        let source = PixelSource::open(&path, &options.limits).unwrap();
        let frame = source.frames(&options).next().unwrap().unwrap();
        assert_eq!(frame.samples, 3);
        frame.data
    };
    let original = decode(dirs.1.join("data/SC_rgb.dcm"));
    let jpeg = decode(dirs.0.join("data/test_files/SC_rgb_dcmtk_+eb+cr.dcm"));
    assert_eq!(original.len(), jpeg.len());
    let worst = original
        .iter()
        .zip(&jpeg)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let mean = original
        .iter()
        .zip(&jpeg)
        .map(|(a, b)| f64::from((a - b).abs()))
        .sum::<f64>()
        / original.len() as f64;
    assert!(worst <= 16.0 && mean <= 2.0, "worst {worst}, mean {mean}");
}

fn element(tag: dicom_core::Tag, vr: VR, value: PrimitiveValue) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, value)
}

/// A grey native image with the given header and 16-bit (or 8-bit) pixel values.
fn grey(
    rows: u32,
    cols: u32,
    frames: u32,
    bits: u16,
    pixels: PrimitiveValue,
) -> DefaultDicomObject {
    let mut obj = InMemDicomObject::new_empty();
    obj.put(element(tags::SOP_CLASS_UID, VR::UI, SC.into()));
    obj.put(element(tags::SOP_INSTANCE_UID, VR::UI, "1.2.3.4.5".into()));
    obj.put(element(
        tags::ROWS,
        VR::US,
        PrimitiveValue::from(rows as u16),
    ));
    obj.put(element(
        tags::COLUMNS,
        VR::US,
        PrimitiveValue::from(cols as u16),
    ));
    if frames != 1 {
        obj.put(element(
            tags::NUMBER_OF_FRAMES,
            VR::IS,
            frames.to_string().into(),
        ));
    }
    obj.put(element(
        tags::SAMPLES_PER_PIXEL,
        VR::US,
        PrimitiveValue::from(1u16),
    ));
    obj.put(element(
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        "MONOCHROME2".into(),
    ));
    obj.put(element(
        tags::BITS_ALLOCATED,
        VR::US,
        PrimitiveValue::from(bits),
    ));
    obj.put(element(
        tags::BITS_STORED,
        VR::US,
        PrimitiveValue::from(bits),
    ));
    obj.put(element(
        tags::HIGH_BIT,
        VR::US,
        PrimitiveValue::from(bits.saturating_sub(1)),
    ));
    obj.put(element(
        tags::PIXEL_REPRESENTATION,
        VR::US,
        PrimitiveValue::from(0u16),
    ));
    let vr = if bits == 8 { VR::OB } else { VR::OW };
    obj.put(element(tags::PIXEL_DATA, vr, pixels));
    with_ts(obj, EXPLICIT_LE)
}

fn with_ts(obj: InMemDicomObject, ts: &str) -> DefaultDicomObject {
    obj.with_meta(FileMetaTableBuilder::new().transfer_syntax(ts))
        .unwrap()
}

fn put(obj: &mut DefaultDicomObject, tag: dicom_core::Tag, vr: VR, value: PrimitiveValue) {
    obj.put(element(tag, vr, value));
}

/// A re-attack's finding: a "one-frame" image whose Number of Frames (4096) came after its
/// pixel data passed every check made on the header (routing's `max_frames`, validation's
/// one-frame rule: they read up to the pixel data) and then decoded as 4,096 frames. Image
/// attributes given after the pixel data that differ from those before it are refused.
#[test]
fn image_attributes_after_the_pixel_data_must_agree_with_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let obj = grey(1, 2, 1, 16, PrimitiveValue::U16(vec![1u16; 2 * 4].into()));
    let path = dir.path().join("after.dcm");
    obj.write_to_file(&path).unwrap();
    // As written, one frame (the pixel data holds four frames' worth: not read as frames).
    assert_eq!(
        PixelSource::open(&path, &Limits::default())
            .unwrap()
            .header()
            .frames,
        1
    );
    // (0028,0008) Number of Frames, IS "4", appended after the pixel data.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(&[0x28, 0x00, 0x08, 0x00, b'I', b'S', 2, 0, b'4', b' ']);
    std::fs::write(&path, &bytes).unwrap();
    let e = PixelSource::open(&path, &Limits::default()).unwrap_err();
    assert_eq!(e.reason(), "header_after_pixel_data", "{e}");
}

#[test]
fn a_60000_by_2_image_decodes() {
    // Rows is US (at most 65535): 60000 x 2 is a legal, very thin image.
    let values: Vec<u16> = (0..120_000u32).map(|i| (i % 4096) as u16).collect();
    let obj = grey(60_000, 2, 1, 16, PrimitiveValue::U16(values.clone().into()));
    let source = PixelSource::from_object(obj, &Limits::default()).unwrap();
    let frame = source.frame(0, &DecodeOptions::default()).unwrap();
    assert_eq!((frame.rows, frame.cols, frame.samples), (60_000, 2, 1));
    let expected: Vec<f32> = values.iter().map(|&v| f32::from(v)).collect();
    assert_eq!(frame.data, expected);
}

#[test]
fn too_many_pixels_is_refused_from_the_header_before_decoding() {
    // 8192 x 8193 > 64 Mi pixels, with a pixel data element of 4 bytes: refused on the header.
    let obj = grey(8193, 8192, 1, 16, PrimitiveValue::U16(vec![0u16, 0].into()));
    let err = PixelSource::from_object(obj, &Limits::default()).unwrap_err();
    assert!(matches!(err, PixelError::TooManyPixels { .. }), "{err:?}");
    // The same from a file: only the header is read.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.dcm");
    grey(8193, 8192, 1, 16, PrimitiveValue::U16(vec![0u16, 0].into()))
        .write_to_file(&path)
        .unwrap();
    let err = PixelSource::open(&path, &Limits::default()).unwrap_err();
    assert_eq!(err.reason(), "too_many_pixels", "{err}");
    // Exactly 64 Mi pixels in one frame is within the limit (the check is on the header; the
    // pixel data here is then too short).
    let obj = grey(8192, 8192, 1, 8, PrimitiveValue::U8(vec![0u8; 16].into()));
    let err = PixelSource::from_object(obj, &Limits::default()).unwrap_err();
    assert_eq!(err.reason(), "pixel_data_too_short", "{err}");
    // Frames count towards a volume.
    let obj = grey(4096, 4096, 5, 8, PrimitiveValue::U8(vec![0u8; 16].into()));
    let h = ImageHeader::from_object(&obj, &Limits::default()).unwrap();
    assert_eq!(h.total_pixels(), 5 * 4096 * 4096);
}

#[test]
fn a_thousand_frames_decode_one_at_a_time() {
    let (rows, cols, frames) = (16u32, 16u32, 1000u32);
    let per = (rows * cols) as usize;
    let data: Vec<u8> = (0..frames as usize * per)
        .map(|i| ((i / per) % 251) as u8)
        .collect();
    let obj = grey(rows, cols, frames, 8, PrimitiveValue::U8(data.into()));
    let source = PixelSource::from_object(obj, &Limits::default()).unwrap();
    let options = DecodeOptions::default();
    let mut count = 0;
    for frame in source.frames(&options) {
        let frame = frame.unwrap();
        let want = (frame.index % 251) as f32;
        assert_eq!(frame.data.len(), per);
        assert!(
            frame.data.iter().all(|&v| v == want),
            "frame {}",
            frame.index
        );
        count += 1;
    }
    assert_eq!(count, 1000);
    // As a volume only within the volume limit.
    let small = Limits {
        max_volume_pixels: u64::from(rows * cols) * 999,
        ..Limits::default()
    };
    let err = source
        .volume(&DecodeOptions {
            limits: small,
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(err.reason(), "too_many_pixels");
    let volume = source.volume(&options).unwrap();
    assert_eq!(volume.data.len(), per * 1000);
    assert_eq!(volume.data[per * 999], (999 % 251) as f32);
    // A frame limit refuses it from the header.
    let obj = grey(
        rows,
        cols,
        frames,
        8,
        PrimitiveValue::U8(vec![0u8; 4].into()),
    );
    let err = PixelSource::from_object(
        obj,
        &Limits {
            max_frames: 999,
            ..Limits::default()
        },
    )
    .unwrap_err();
    assert!(matches!(
        err,
        PixelError::TooManyFrames {
            frames: 1000,
            limit: 999
        }
    ));
}

#[test]
fn headers_that_cannot_be_decoded_fail_with_their_reason() {
    let ok = || grey(4, 4, 1, 16, PrimitiveValue::U16(vec![1u16; 16].into()));
    let decode = |obj: DefaultDicomObject| {
        PixelSource::from_object(obj, &Limits::default())
            .and_then(|s| s.frame(0, &DecodeOptions::default()))
    };
    let reason = |obj: DefaultDicomObject| decode(obj).unwrap_err().reason();
    let mut obj = ok();
    put(
        &mut obj,
        tags::BITS_ALLOCATED,
        VR::US,
        PrimitiveValue::from(32u16),
    );
    put(
        &mut obj,
        tags::BITS_STORED,
        VR::US,
        PrimitiveValue::from(32u16),
    );
    assert_eq!(reason(obj), "unsupported_bits_allocated");
    let mut obj = ok();
    obj.remove_element(tags::PIXEL_DATA);
    assert_eq!(reason(obj), "no_pixel_data");
    let mut obj = ok();
    obj.remove_element(tags::ROWS);
    assert_eq!(reason(obj), "bad_attribute");
    // Rescale Slope has one value: `1\-1` is refused, not read as 1 (a red-team finding)
    let slope = |value: PrimitiveValue| {
        let mut obj = ok();
        put(&mut obj, tags::RESCALE_SLOPE, VR::DS, value);
        obj
    };
    let two = PrimitiveValue::Strs(["1".to_owned(), "-1".to_owned()].into_iter().collect());
    assert_eq!(reason(slope(two)), "bad_attribute");
    assert!(
        decode(slope(PrimitiveValue::from("-1"))).is_ok(),
        "one value decodes"
    );
    // and the integers: a Pixel Representation of `0\1` is not unsigned
    for tag in [tags::PIXEL_REPRESENTATION, tags::BITS_STORED, tags::ROWS] {
        let mut obj = ok();
        let first = obj
            .element(tag)
            .map_or(0, |e| e.to_int::<u16>().unwrap_or(0));
        put(
            &mut obj,
            tag,
            VR::US,
            PrimitiveValue::U16([first, 1].into_iter().collect()),
        );
        assert_eq!(reason(obj), "bad_attribute", "{tag}");
    }
    let mut obj = ok();
    put(&mut obj, tags::ROWS, VR::US, PrimitiveValue::from(0u16));
    assert_eq!(reason(obj), "bad_attribute");
    let mut obj = ok();
    put(
        &mut obj,
        tags::BITS_STORED,
        VR::US,
        PrimitiveValue::from(17u16),
    );
    assert_eq!(reason(obj), "bad_attribute");
    let mut obj = ok();
    put(
        &mut obj,
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        "CMYK".into(),
    );
    assert_eq!(reason(obj), "unsupported_photometric");
    let mut obj = ok();
    put(
        &mut obj,
        tags::SAMPLES_PER_PIXEL,
        VR::US,
        PrimitiveValue::from(3u16),
    );
    assert_eq!(reason(obj), "unsupported_photometric");
    let mut obj = ok();
    put(&mut obj, tags::NUMBER_OF_FRAMES, VR::IS, "2".into());
    assert_eq!(reason(obj), "pixel_data_too_short");
    let mut obj = ok();
    put(&mut obj, tags::NUMBER_OF_FRAMES, VR::IS, "-1".into());
    assert_eq!(reason(obj), "bad_attribute");
    let mut obj = ok();
    put(&mut obj, tags::RESCALE_SLOPE, VR::DS, "0".into());
    assert_eq!(reason(obj), "bad_attribute");
    // A rescale that takes the stored range out of f32 (every pixel infinite), or maps it to
    // one f32 value (a blank image): refused, where it was processed and reported with a
    // finding (red team). An ordinary CT rescale and a PET-like small slope decode.
    for (slope, intercept, refused) in [
        ("1e308", "-1e308", true),
        ("1", "1e39", true),
        ("1", "1e30", true),
        ("1e35", "0", true),
        ("1", "-1024", false),
        ("0.00123", "0", false),
    ] {
        let mut obj = ok();
        put(&mut obj, tags::RESCALE_SLOPE, VR::DS, slope.into());
        put(&mut obj, tags::RESCALE_INTERCEPT, VR::DS, intercept.into());
        let decoded = PixelSource::from_object(obj, &Limits::default())
            .and_then(|s| s.frame(0, &DecodeOptions::default()));
        match decoded {
            Err(e) => {
                assert!(refused, "{slope} {intercept}: {e}");
                assert_eq!(e.reason(), "bad_attribute");
                assert!(
                    e.to_string().contains("RescaleSlope/RescaleIntercept"),
                    "{e}"
                );
            }
            Ok(_) => assert!(!refused, "{slope} {intercept} decoded"),
        }
    }
    // An undecodable transfer syntax (JPEG-LS has no codec in this build).
    let obj = with_ts(ok().into_inner(), "1.2.840.10008.1.2.4.80");
    assert_eq!(reason(obj), "unsupported_transfer_syntax");
}

/// Encapsulated data that is not what the header says never panics: a typed error.
#[test]
fn corrupt_compressed_frames_are_errors_not_panics() {
    let garbage: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xFF, 0xD8, 0xFF, 0xD9],
        vec![
            0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x11, 0x08, 0x01, 0x00, 0x01, 0x00, 0x01,
        ],
        (0..=255u8).cycle().take(4096).collect(),
        vec![0x01, 0, 0, 0, 64, 0, 0, 0]
            .into_iter()
            .chain(std::iter::repeat_n(0u8, 56))
            .collect(),
        vec![0xFF, 0x4F, 0xFF, 0x51, 0x00, 0x2F, 0x00, 0x00],
    ];
    for ts in [JPEG_BASELINE, RLE, J2K] {
        for (g, bytes) in garbage.iter().enumerate() {
            let mut obj = grey(64, 64, 1, 8, PrimitiveValue::U8(vec![0u8; 2].into()));
            let mut bytes = bytes.clone();
            if bytes.len() % 2 == 1 {
                bytes.push(0);
            }
            obj.put(DataElement::new(
                tags::PIXEL_DATA,
                VR::OB,
                PixelFragmentSequence::new(Vec::<u32>::new(), vec![bytes]),
            ));
            let obj = with_ts(obj.into_inner(), ts);
            let result = PixelSource::from_object(obj, &Limits::default())
                .and_then(|s| s.frame(0, &DecodeOptions::default()));
            let err = result.expect_err(&format!("{ts} garbage {g} decoded"));
            assert!(
                matches!(
                    err.reason(),
                    "decode_failed" | "decoded_size" | "no_pixel_data"
                ),
                "{ts} garbage {g}: {err:?}"
            );
        }
    }
}

#[test]
fn a_series_must_agree_in_size_and_photometric() {
    let h = |rows, pi: &str| {
        let mut obj = grey(
            rows,
            4,
            1,
            8,
            PrimitiveValue::U8(vec![0u8; 4 * rows as usize].into()),
        );
        put(
            &mut obj,
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            pi.into(),
        );
        ImageHeader::from_object(&obj, &Limits::default()).unwrap()
    };
    assert!(check_series(&[h(4, "MONOCHROME2"), h(4, "MONOCHROME2")]).is_ok());
    let err = check_series(&[
        h(4, "MONOCHROME2"),
        h(4, "MONOCHROME2"),
        h(6, "MONOCHROME2"),
    ])
    .unwrap_err();
    assert!(
        matches!(
            err,
            PixelError::MixedSeries {
                index: 2,
                attribute: "Rows",
                ..
            }
        ),
        "{err:?}"
    );
    let err = check_series(&[h(4, "MONOCHROME2"), h(4, "MONOCHROME1")]).unwrap_err();
    assert!(
        matches!(
            err,
            PixelError::MixedSeries {
                attribute: "PhotometricInterpretation",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.reason(), "mixed_series");
}

/// Red-team finding: instances that share Study/Series Instance UIDs but belong to another
/// patient (PatientID, IssuerOfPatientID, PatientName) or are another kind of object
/// (Modality, SOP Class UID) are one series only by mistake; PS3.3 C.7.1.1 and C.7.3.1 make
/// these attributes the patient's and the series', the same for every instance. The error
/// names the attribute and never a value.
#[test]
fn a_series_must_be_one_patient_and_one_kind_of_object() {
    let h = |edit: &dyn Fn(&mut DefaultDicomObject)| {
        let mut obj = grey(4, 4, 1, 8, PrimitiveValue::U8(vec![0u8; 16].into()));
        put(&mut obj, tags::PATIENT_ID, VR::LO, "PID-ALPHA-111".into());
        put(
            &mut obj,
            tags::ISSUER_OF_PATIENT_ID,
            VR::LO,
            "HOSP-A".into(),
        );
        put(&mut obj, tags::PATIENT_NAME, VR::PN, "Alpha^Patient".into());
        put(&mut obj, tags::MODALITY, VR::CS, "CT".into());
        edit(&mut obj);
        ImageHeader::from_object(&obj, &Limits::default()).unwrap()
    };
    let same = h(&|_| {});
    // Padding is not a difference (PS3.5 6.2: trailing spaces are not significant).
    let padded = h(&|o| put(o, tags::PATIENT_ID, VR::LO, "PID-ALPHA-111 ".into()));
    assert!(check_series(&[same.clone(), h(&|_| {}), padded]).is_ok());
    type Edit<'a> = &'a dyn Fn(&mut DefaultDicomObject);
    let cases: [(&str, Edit); 6] = [
        ("PatientID", &|o| {
            put(o, tags::PATIENT_ID, VR::LO, "PID-BRAVO-222".into())
        }),
        ("IssuerOfPatientID", &|o| {
            put(o, tags::ISSUER_OF_PATIENT_ID, VR::LO, "HOSP-B".into())
        }),
        ("IssuerOfPatientID", &|o| {
            o.remove_element(tags::ISSUER_OF_PATIENT_ID);
        }),
        ("PatientName", &|o| {
            put(o, tags::PATIENT_NAME, VR::PN, "Bravo^Patient".into())
        }),
        ("Modality", &|o| put(o, tags::MODALITY, VR::CS, "US".into())),
        ("SOPClassUID", &|o| {
            put(
                o,
                tags::SOP_CLASS_UID,
                VR::UI,
                "1.2.840.10008.5.1.4.1.1.6.1".into(),
            )
        }),
    ];
    for (attribute, edit) in cases {
        let err = check_series(&[same.clone(), same.clone(), h(edit)]).unwrap_err();
        assert!(
            matches!(err, PixelError::MixedIdentity { index: 2, attribute: a } if a == attribute),
            "{attribute}: {err:?}"
        );
        assert_eq!(err.reason(), "mixed_series");
        let text = err.to_string();
        assert!(text.contains(attribute), "{text}");
        for value in ["ALPHA", "BRAVO", "HOSP", "^Patient", "US", "1.2.840"] {
            assert!(!text.contains(value), "{text} shows a value");
        }
        assert!(!format!("{:?}", h(edit)).contains("ALPHA"));
    }
}

#[test]
fn a_top_level_rescale_that_the_functional_groups_contradict_is_refused() {
    // A red-team finding: a classic image with RescaleSlope 1 and a stray per-frame
    // Pixel Value Transformation of slope -1 was decoded with the functional group's slope:
    // inverted, and the model's answer silently wrong. Refused now; one that agrees is not.
    let with = |top: Option<(&str, &str)>, fg: (&str, &str)| {
        let mut obj = grey(1, 3, 1, 8, PrimitiveValue::U8(vec![0u8, 128, 255].into()));
        if let Some((slope, intercept)) = top {
            put(&mut obj, tags::RESCALE_SLOPE, VR::DS, slope.into());
            put(&mut obj, tags::RESCALE_INTERCEPT, VR::DS, intercept.into());
        }
        let mut transformation = InMemDicomObject::new_empty();
        transformation.put(element(tags::RESCALE_SLOPE, VR::DS, fg.0.into()));
        transformation.put(element(tags::RESCALE_INTERCEPT, VR::DS, fg.1.into()));
        let mut group = InMemDicomObject::new_empty();
        group.put(DataElement::new(
            tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE,
            VR::SQ,
            dicom_core::value::DataSetSequence::from(vec![transformation]),
        ));
        obj.put(DataElement::new(
            tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE,
            VR::SQ,
            dicom_core::value::DataSetSequence::from(vec![group]),
        ));
        PixelSource::from_object(obj, &Limits::default())
    };
    let err = with(Some(("1", "0")), ("-1", "0")).err().unwrap();
    assert_eq!(err.reason(), "conflicting_rescale", "{err}");
    assert_eq!(
        with(Some(("1", "-1024")), ("1", "0"))
            .err()
            .unwrap()
            .reason(),
        "conflicting_rescale"
    );
    // Agreeing, or the functional group alone (an enhanced object): decoded.
    assert!(with(Some(("2", "-10")), ("2", "-10")).is_ok());
    assert!(with(None, ("-1", "0")).is_ok());
}

#[test]
fn a_monochrome2_image_whose_presentation_lut_is_inverse_is_inverted_as_monochrome1() {
    // A review's finding: Presentation LUT Shape INVERSE was ignored, so a MONOCHROME2 image
    // so marked was shown (and fed to the model) the other way round from its MONOCHROME1
    // twin. Both now decode alike; with MONOCHROME1, INVERSE is the same inversion, once.
    let frame_of = |photometric: &str, shape: Option<&str>| {
        let mut obj = grey(1, 3, 1, 8, PrimitiveValue::U8(vec![0u8, 128, 255].into()));
        put(
            &mut obj,
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            photometric.into(),
        );
        if let Some(shape) = shape {
            put(&mut obj, tags::PRESENTATION_LUT_SHAPE, VR::CS, shape.into());
        }
        put(&mut obj, tags::WINDOW_CENTER, VR::DS, "128".into());
        put(&mut obj, tags::WINDOW_WIDTH, VR::DS, "256".into());
        let source = PixelSource::from_object(obj, &Limits::default()).unwrap();
        let options = DecodeOptions {
            voi: Voi::FromObject,
            invert_monochrome1: true,
            ..Default::default()
        };
        source.frame(0, &options).unwrap().data
    };
    let monochrome1 = frame_of("MONOCHROME1", None);
    assert!(monochrome1[0] > monochrome1[2], "{monochrome1:?}");
    assert_eq!(frame_of("MONOCHROME2", Some("INVERSE")), monochrome1);
    assert_eq!(frame_of("MONOCHROME1", Some("INVERSE")), monochrome1);
    let plain = frame_of("MONOCHROME2", Some("IDENTITY"));
    assert!(plain[0] < plain[2], "{plain:?}");
    assert_eq!(frame_of("MONOCHROME2", None), plain);
}

/// A caller computing modality values itself (a model's preprocessing, from stored values,
/// slope and intercept) is told of a Modality LUT Sequence it cannot carry: the pipeline
/// scored an image whose LUT inverted it as if it had none (a red-team finding). An image
/// without one passes; the frames themselves still decode as stored.
#[test]
fn a_modality_lut_sequence_is_refused_to_callers_of_stored_values() {
    let plain = grey(1, 4, 1, 16, PrimitiveValue::U16(vec![0u16, 1, 2, 3].into()));
    let mut with_lut = plain.clone();
    let item = InMemDicomObject::from_element_iter([DataElement::new(
        tags::LUT_DESCRIPTOR,
        VR::US,
        PrimitiveValue::U16(vec![4u16, 0, 16].into()),
    )]);
    with_lut.put(DataElement::new(
        tags::MODALITY_LUT_SEQUENCE,
        VR::SQ,
        dicom_core::value::DataSetSequence::from(vec![item]),
    ));
    let source = PixelSource::from_object(plain, &Limits::default()).unwrap();
    source.refuse_modality_lut_sequence().unwrap();
    let source = PixelSource::from_object(with_lut, &Limits::default()).unwrap();
    let e = source.refuse_modality_lut_sequence().unwrap_err();
    assert_eq!(e.reason(), "unsupported_lut");
    assert!(source.frame(0, &DecodeOptions::default()).is_ok());
}

#[test]
fn modality_voi_and_monochrome1_options() {
    // 12-bit stored values 0, 1000, 2000, 4095 with slope 2 and intercept -1000, MONOCHROME1.
    let mut obj = grey(
        1,
        4,
        1,
        16,
        PrimitiveValue::U16(vec![0u16, 1000, 2000, 4095].into()),
    );
    put(
        &mut obj,
        tags::BITS_STORED,
        VR::US,
        PrimitiveValue::from(12u16),
    );
    put(&mut obj, tags::RESCALE_SLOPE, VR::DS, "2".into());
    put(&mut obj, tags::RESCALE_INTERCEPT, VR::DS, "-1000".into());
    put(
        &mut obj,
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        "MONOCHROME1".into(),
    );
    put(&mut obj, tags::WINDOW_CENTER, VR::DS, "1000".into());
    put(&mut obj, tags::WINDOW_WIDTH, VR::DS, "2001".into());
    let source = PixelSource::from_object(obj, &Limits::default()).unwrap();
    let stored = source.frame(0, &DecodeOptions::default()).unwrap();
    assert_eq!(stored.data, vec![0.0, 1000.0, 2000.0, 4095.0]);
    assert_eq!(
        (stored.slope, stored.intercept, stored.monochrome1),
        (2.0, -1000.0, true)
    );
    let modality = source
        .frame(
            0,
            &DecodeOptions {
                modality_lut: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(modality.data, vec![-1000.0, 1000.0, 3000.0, 7190.0]);
    assert_eq!(
        (modality.slope, modality.intercept, modality.values),
        (1.0, 0.0, Values::Modality)
    );
    // LINEAR window c=1000, w=2001: [0, 2000] maps to 0..1 (PS3.3 C.11.2.1.2.1).
    let voi = source
        .frame(
            0,
            &DecodeOptions {
                voi: Voi::FromObject,
                invert_monochrome1: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(voi.values, Values::Voi);
    assert!(!voi.monochrome1);
    // x = 1000: (1000 - 999.5) / 2000 + 0.5 = 0.50025, inverted 0.49975.
    let want = [1.0, 0.49975, 0.0, 0.0];
    for (g, w) in voi.data.iter().zip(want) {
        assert!((f64::from(*g) - w).abs() < 1e-6, "{:?}", voi.data);
    }
    // Inverting modality values reflects them over the rescaled stored range [-1000, 7190].
    let inv = source
        .frame(
            0,
            &DecodeOptions {
                modality_lut: true,
                invert_monochrome1: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(inv.data, vec![7190.0, 5190.0, 3190.0, -1000.0]);
}

#[tokio::test]
async fn the_decode_budget_bounds_pixels_in_flight() {
    let budget = DecodeBudget::new(1 << 20);
    let a = budget
        .acquire(700_000, std::time::Duration::from_secs(1))
        .await
        .unwrap();
    let err = budget
        .acquire(700_000, std::time::Duration::from_millis(50))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "budget_timeout");
    drop(a);
    let b = budget
        .acquire(700_000, std::time::Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(b.pixels(), 700_000);
}

/// Hostile values of the image attributes, one and two at a time, on native and (when the
/// peers are installed) real compressed files: every decode ends in a value or a typed error.
#[test]
fn mutated_headers_never_panic() {
    let us = |v: u16| (VR::US, PrimitiveValue::from(v));
    let mutations: Vec<(dicom_core::Tag, VR, PrimitiveValue)> = [
        (tags::ROWS, us(0)),
        (tags::ROWS, us(1)),
        (tags::ROWS, us(65535)),
        (tags::COLUMNS, us(3)),
        (tags::COLUMNS, us(65535)),
        (tags::BITS_ALLOCATED, us(1)),
        (tags::BITS_ALLOCATED, us(8)),
        (tags::BITS_ALLOCATED, us(12)),
        (tags::BITS_ALLOCATED, us(16)),
        (tags::BITS_STORED, us(0)),
        (tags::BITS_STORED, us(1)),
        (tags::BITS_STORED, us(16)),
        (tags::SAMPLES_PER_PIXEL, us(3)),
        (tags::SAMPLES_PER_PIXEL, us(0)),
        (tags::PIXEL_REPRESENTATION, us(1)),
        (tags::PLANAR_CONFIGURATION, us(1)),
        (tags::NUMBER_OF_FRAMES, (VR::IS, "3".into())),
        (tags::NUMBER_OF_FRAMES, (VR::IS, "0".into())),
        (tags::NUMBER_OF_FRAMES, (VR::IS, "x".into())),
        (tags::PHOTOMETRIC_INTERPRETATION, (VR::CS, "RGB".into())),
        (
            tags::PHOTOMETRIC_INTERPRETATION,
            (VR::CS, "YBR_FULL_422".into()),
        ),
        (
            tags::PHOTOMETRIC_INTERPRETATION,
            (VR::CS, "PALETTE COLOR".into()),
        ),
        (tags::PHOTOMETRIC_INTERPRETATION, (VR::CS, "".into())),
        (
            tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            (VR::US, PrimitiveValue::U16(vec![0, 0, 8].into())),
        ),
        (tags::RESCALE_SLOPE, (VR::DS, "nan".into())),
        (tags::WINDOW_WIDTH, (VR::DS, "0".into())),
    ]
    .into_iter()
    .map(|(t, (vr, v))| (t, vr, v))
    .collect();
    let mut bases: Vec<(String, DefaultDicomObject)> = vec![
        (
            "native 16-bit".into(),
            grey(
                4,
                4,
                1,
                16,
                PrimitiveValue::U16((0..16u16).collect::<Vec<_>>().into()),
            ),
        ),
        (
            "native 8-bit".into(),
            grey(
                4,
                4,
                2,
                8,
                PrimitiveValue::U8((0..32u8).collect::<Vec<_>>().into()),
            ),
        ),
    ];
    if let Some(dirs) = packages() {
        for name in [
            "MR_small_RLE.dcm",
            "SC_rgb_jpeg_dcmtk.dcm",
            "MR_small_jp2klossless.dcm",
            "SC_rgb_rle.dcm",
            "JPGLosslessP14SV1_1s_1f_8b.dcm",
        ] {
            let path = [&dirs.0.join("data/test_files"), &dirs.1.join("data")]
                .into_iter()
                .map(|d| d.join(name))
                .find(|p| p.is_file())
                .unwrap_or_else(|| panic!("{name} not found"));
            bases.push((name.into(), dicom_object::open_file(&path).unwrap()));
        }
    }
    let options = [
        DecodeOptions::default(),
        DecodeOptions {
            voi: Voi::FromObject,
            invert_monochrome1: true,
            colour: nightingale_dicom::pixels::Colour::Grey,
            ..Default::default()
        },
    ];
    let mut panics = Vec::new();
    let mut runs = 0;
    for (name, base) in &bases {
        for (i, a) in mutations.iter().enumerate() {
            for b in std::iter::once(None).chain(mutations[i + 1..].iter().map(Some)) {
                let mut obj = base.clone();
                put(&mut obj, a.0, a.1, a.2.clone());
                if let Some(b) = b {
                    put(&mut obj, b.0, b.1, b.2.clone());
                }
                for o in &options {
                    runs += 1;
                    let result = PixelSource::from_object(obj.clone(), &o.limits).and_then(|s| {
                        s.frames(o)
                            .take(3)
                            .map(|f| f.and_then(|f| render8(&f, RenderWindow::Auto)))
                            .collect::<Result<Vec<_>, _>>()
                    });
                    if let Err(PixelError::CodecPanicked { .. }) = result {
                        panics.push(format!("{name}: {:?} {:?}", a.0, b.map(|b| b.0)));
                    }
                }
            }
        }
    }
    // The codecs run under catch_unwind as the last resort; the checks before them should
    // leave nothing for it to catch on these inputs.
    assert!(
        panics.is_empty(),
        "codec panics caught ({} of {runs}):\n{}",
        panics.len(),
        panics.join("\n")
    );
}

/// A multi-frame JPEG whose frames span several fragments decodes as the one-fragment-per-frame
/// original: through the Basic Offset Table, and without one by the SOI markers.
#[test]
fn frames_split_over_fragments_are_found() {
    let Some(dirs) = packages() else { return };
    let path = dirs.0.join("data/test_files/examples_ybr_color.dcm");
    let path = if path.is_file() {
        path
    } else {
        dirs.1.join("data/examples_ybr_color.dcm")
    };
    let original = dicom_object::open_file(&path).unwrap();
    let options = DecodeOptions::default();
    let want: Vec<_> = {
        let s = PixelSource::from_object(original.clone(), &Limits::default()).unwrap();
        [0u32, 7, 29]
            .map(|i| s.frame(i, &options).unwrap().data)
            .to_vec()
    };
    let fragments: Vec<Vec<u8>> = match original.element(tags::PIXEL_DATA).unwrap().value() {
        dicom_core::value::Value::PixelSequence(seq) => seq.fragments().to_vec(),
        _ => panic!("encapsulated"),
    };
    assert_eq!(fragments.len(), 30);
    // Each frame in two fragments (even lengths), with and without a Basic Offset Table.
    let mut split = Vec::new();
    let mut bot = Vec::new();
    let mut offset = 0u32;
    for f in &fragments {
        bot.push(offset);
        let cut = (f.len() / 2) & !1;
        for part in [&f[..cut], &f[cut..]] {
            split.push(part.to_vec());
            offset += 8 + part.len() as u32;
        }
    }
    for table in [bot, Vec::new()] {
        let mut obj = original.clone();
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PixelFragmentSequence::new(table.clone(), split.clone()),
        ));
        let s = PixelSource::from_object(obj, &Limits::default()).unwrap();
        for (k, i) in [0u32, 7, 29].into_iter().enumerate() {
            let got = s.frame(i, &options).unwrap().data;
            assert!(
                got == want[k],
                "frame {i}, offset table of {} entries",
                table.len()
            );
        }
    }
}

/// A raw JPEG 2000 codestream: SOC, then a SIZ (ITU-T T.800 A.5.1) of `width` x `height`,
/// one tile, `components` 8-bit components of subsampling `sub`, then `tail` (no real
/// packets: a decoder would have to reach them, the size check must not).
fn j2k_codestream(width: u32, height: u32, components: u16, sub: u8, tail: &[u8]) -> Vec<u8> {
    let mut out = vec![0xFF, 0x4F, 0xFF, 0x51];
    out.extend((38 + 3 * components).to_be_bytes()); // Lsiz
    out.extend(0u16.to_be_bytes()); // Rsiz
    for v in [width, height, 0, 0, width, height, 0, 0] {
        out.extend(v.to_be_bytes()); // Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz
    }
    out.extend(components.to_be_bytes());
    for _ in 0..components {
        out.extend([7, sub, sub]); // Ssiz (8 bits, unsigned), XRsiz, YRsiz
    }
    out.extend_from_slice(tail);
    out
}

/// The same codestream in a JP2 file (T.800 Annex I): signature, file type, header (image
/// header box), contiguous codestream box.
fn jp2_file(codestream: &[u8], height: u32, width: u32) -> Vec<u8> {
    let mut out = vec![0, 0, 0, 12, b'j', b'P', b' ', b' ', 0x0D, 0x0A, 0x87, 0x0A];
    out.extend([0, 0, 0, 20]);
    out.extend(b"ftypjp2 \0\0\0\0jp2 ");
    let mut ihdr = vec![0, 0, 0, 22];
    ihdr.extend(b"ihdr");
    ihdr.extend(height.to_be_bytes());
    ihdr.extend(width.to_be_bytes());
    ihdr.extend([0, 1, 7, 7, 0, 0]);
    out.extend((8 + ihdr.len() as u32).to_be_bytes());
    out.extend(b"jp2h");
    out.extend(ihdr);
    out.extend((8 + codestream.len() as u32).to_be_bytes());
    out.extend(b"jp2c");
    out.extend_from_slice(codestream);
    out
}

fn j2k_object(rows: u32, cols: u32, samples: u16, frame: Vec<u8>) -> DefaultDicomObject {
    let mut obj = grey(rows, cols, 1, 8, PrimitiveValue::U8(vec![0u8; 2].into()));
    put(
        &mut obj,
        tags::SAMPLES_PER_PIXEL,
        VR::US,
        PrimitiveValue::from(samples),
    );
    if samples == 3 {
        put(
            &mut obj,
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            "RGB".into(),
        );
    }
    let mut frame = frame;
    if frame.len() % 2 == 1 {
        frame.push(0);
    }
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PixelFragmentSequence::new(Vec::<u32>::new(), vec![frame]),
    ));
    with_ts(obj.into_inner(), J2K)
}

/// Red-team finding (JPEG 2000 decode bomb): a 64 x 64 header over a codestream whose SIZ
/// says 24000 x 24000 was decoded whole (2.4 GB, 36 s) before its size was compared. The
/// SIZ is read first and a codestream that is not the header's Columns x Rows, with
/// SamplesPerPixel components (at most 4) of that size, is refused without decoding.
#[test]
fn a_j2k_codestream_other_than_its_header_is_refused_before_decoding() {
    let tail = [0xFF, 0x90, 0, 10, 0, 0, 0, 0, 0, 12, 0, 1, 0xFF, 0xD9];
    // The parser itself, against the bytes written above.
    let size = j2k_size(&j2k_codestream(24_000, 16_000, 3, 1, &tail)).unwrap();
    assert_eq!((size.width, size.height), (24_000, 16_000));
    assert_eq!(size.components, vec![(24_000, 16_000); 3]);
    // Subsampled components: ceil(64 / 2) x ceil(64 / 2).
    let size = j2k_size(&j2k_codestream(64, 64, 1, 2, &tail)).unwrap();
    assert_eq!(size.components, vec![(32, 32)]);
    let jp2 = jp2_file(&j2k_codestream(300, 200, 1, 1, &tail), 200, 300);
    assert_eq!(j2k_size(&jp2).unwrap().width, 300);
    assert_eq!(j2k_size(&j2k_codestream(64, 64, 1, 1, &[])[..20]), None);

    /// (case, SamplesPerPixel, the frame, what the SIZ says: width, height, components)
    type Case = (&'static str, u16, Vec<u8>, (u32, u32, usize));
    let cases: Vec<Case> = vec![
        (
            "24000 x 24000",
            1,
            j2k_codestream(24_000, 24_000, 1, 1, &tail),
            (24_000, 24_000, 1),
        ),
        ("wide", 1, j2k_codestream(65, 64, 1, 1, &tail), (65, 64, 1)),
        (
            "in a JP2 file",
            1,
            jp2_file(&j2k_codestream(24_000, 24_000, 1, 1, &tail), 64, 64),
            (24_000, 24_000, 1),
        ),
        (
            "subsampled",
            1,
            j2k_codestream(64, 64, 1, 2, &tail),
            (64, 64, 1),
        ),
        (
            "too few components",
            3,
            j2k_codestream(64, 64, 1, 1, &tail),
            (64, 64, 1),
        ),
        (
            "too many components",
            1,
            j2k_codestream(64, 64, 200, 1, &tail),
            (64, 64, 200),
        ),
    ];
    for (case, samples, frame, (width, height, components)) in cases {
        let started = std::time::Instant::now();
        let err = PixelSource::from_object(j2k_object(64, 64, samples, frame), &Limits::default())
            .and_then(|s| s.frame(0, &DecodeOptions::default()))
            .unwrap_err();
        assert!(
            matches!(
                err,
                PixelError::J2kSize { frame: 0, width: w, height: h, components: c, cols: 64, rows: 64, .. }
                    if (w, h, c) == (width, height, components)
            ),
            "{case}: {err:?}"
        );
        assert_eq!(err.reason(), "decoded_size", "{case}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{case}"
        );
    }
    // No whole SIZ: a decode failure, found without the codec.
    let err = PixelSource::from_object(
        j2k_object(
            64,
            64,
            1,
            vec![0xFF, 0x4F, 0xFF, 0x51, 0x00, 0x2F, 0x00, 0x00],
        ),
        &Limits::default(),
    )
    .and_then(|s| s.frame(0, &DecodeOptions::default()))
    .unwrap_err();
    assert!(matches!(err, PixelError::J2kNoSiz { frame: 0 }), "{err:?}");
    assert_eq!(err.reason(), "decode_failed");
}

/// The red-team file itself: pydicom's MR_small_jp2klossless.dcm (64 x 64) with its SIZ
/// patched to 4000 x 4000 (the same packets) is refused without decoding; unpatched it
/// decodes (the real-file test compares it with pydicom).
#[test]
fn a_real_j2k_frame_with_a_patched_siz_is_refused() {
    let Some(dirs) = packages() else {
        return;
    };
    let path = dirs.0.join("data/test_files/MR_small_jp2klossless.dcm");
    let source = PixelSource::open(&path, &Limits::default()).unwrap();
    assert!(source.frame(0, &DecodeOptions::default()).is_ok());
    let mut obj = source.object().clone();
    let element = obj.element(tags::PIXEL_DATA).unwrap();
    let dicom_core::value::Value::PixelSequence(seq) = element.value() else {
        panic!("encapsulated pixel data");
    };
    let mut frame = seq.fragments().concat();
    let siz = frame.windows(2).position(|w| w == [0xFF, 0x51]).unwrap();
    for (k, v) in [4000u32, 4000, 0, 0, 4000, 4000].into_iter().enumerate() {
        frame[siz + 6 + 4 * k..siz + 10 + 4 * k].copy_from_slice(&v.to_be_bytes());
    }
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PixelFragmentSequence::new(Vec::<u32>::new(), vec![frame]),
    ));
    let started = std::time::Instant::now();
    let err = PixelSource::from_object(obj, &Limits::default())
        .and_then(|s| s.frame(0, &DecodeOptions::default()))
        .unwrap_err();
    assert!(
        matches!(
            err,
            PixelError::J2kSize {
                width: 4000,
                height: 4000,
                cols: 64,
                rows: 64,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

/// Red-team finding (JPEG decode bomb): a real JPEG frame whose frame header (SOF) is patched
/// to declare 30000 x 30000 under a DICOM header of the file's own size. jpeg-decoder
/// allocates and fills what the SOF declares whatever data follows (about 1 GB and 30 s for
/// 1 KB), so the frame must be refused from its SOF, before decoding: a `JpegSize` error, not
/// a decode error after the fact. Baseline (8-bit colour) and lossless (16-bit grey).
#[test]
fn a_real_jpeg_frame_with_a_patched_sof_is_refused_before_decoding() {
    let Some(dirs) = packages() else {
        return;
    };
    for (path, sof) in [
        (dirs.0.join("data/test_files/SC_rgb_jpeg_dcmtk.dcm"), 0xC0u8),
        (dirs.1.join("data/JPEG-LL.dcm"), 0xC3u8),
    ] {
        let source = PixelSource::open(&path, &Limits::default()).unwrap();
        assert!(
            source.frame(0, &DecodeOptions::default()).is_ok(),
            "{path:?}"
        );
        let (rows, cols) = (source.header().rows, source.header().cols);
        let mut obj = source.object().clone();
        let element = obj.element(tags::PIXEL_DATA).unwrap();
        let dicom_core::value::Value::PixelSequence(seq) = element.value() else {
            panic!("encapsulated pixel data");
        };
        let mut frame = seq.fragments().concat();
        let at = frame
            .windows(2)
            .position(|w| w == [0xFF, sof])
            .expect("a frame header");
        // FF Cn, length (2), precision (1), height (2), width (2).
        frame[at + 5..at + 7].copy_from_slice(&30000u16.to_be_bytes());
        frame[at + 7..at + 9].copy_from_slice(&30000u16.to_be_bytes());
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PixelFragmentSequence::new(Vec::<u32>::new(), vec![frame]),
        ));
        let err = PixelSource::from_object(obj, &Limits::default())
            .and_then(|s| s.frame(0, &DecodeOptions::default()))
            .unwrap_err();
        assert!(
            matches!(
                err,
                PixelError::JpegSize {
                    width: 30000,
                    height: 30000,
                    ..
                }
            ),
            "{path:?}: {err:?}"
        );
        assert_eq!(err.reason(), "decoded_size");
        assert!(
            err.to_string().contains(&format!("{cols} x {rows}")),
            "{err}"
        );
    }
}
