//! Peak memory of decoding a 1,000-frame object frame by frame vs as one volume (issue 9):
//! run under `/usr/bin/time -v` and read "Maximum resident set size".
//!
//!   cargo run -p nightingale-dicom --example decode_peak -- {frames|volume|none}
//!
//! The object: 1,000 frames of 256 × 256 16-bit values (125 MiB of pixel data) in memory.

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use nightingale_dicom::pixels::{DecodeOptions, Limits, PixelSource};

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "frames".into());
    let (rows, cols, frames) = (256u16, 256u16, 1000u32);
    let n = usize::from(rows) * usize::from(cols) * frames as usize;
    let words: Vec<u16> = (0..n).map(|i| (i % 4096) as u16).collect();
    let mut obj = InMemDicomObject::new_empty();
    let put = |obj: &mut InMemDicomObject, tag, vr, v: PrimitiveValue| {
        obj.put(DataElement::new(tag, vr, v));
    };
    put(
        &mut obj,
        tags::SOP_CLASS_UID,
        VR::UI,
        "1.2.840.10008.5.1.4.1.1.7".into(),
    );
    put(&mut obj, tags::SOP_INSTANCE_UID, VR::UI, "1.2.3.4".into());
    put(&mut obj, tags::ROWS, VR::US, rows.into());
    put(&mut obj, tags::COLUMNS, VR::US, cols.into());
    put(
        &mut obj,
        tags::NUMBER_OF_FRAMES,
        VR::IS,
        frames.to_string().into(),
    );
    put(&mut obj, tags::SAMPLES_PER_PIXEL, VR::US, 1u16.into());
    put(
        &mut obj,
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        "MONOCHROME2".into(),
    );
    put(&mut obj, tags::BITS_ALLOCATED, VR::US, 16u16.into());
    put(&mut obj, tags::BITS_STORED, VR::US, 12u16.into());
    put(&mut obj, tags::PIXEL_REPRESENTATION, VR::US, 0u16.into());
    put(
        &mut obj,
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::U16(words.into()),
    );
    let obj = obj
        .with_meta(FileMetaTableBuilder::new().transfer_syntax("1.2.840.10008.1.2.1"))
        .expect("meta");
    let limits = Limits {
        max_volume_pixels: 1 << 30,
        ..Limits::default()
    };
    let source = PixelSource::from_object(obj, &limits).expect("header");
    let options = DecodeOptions {
        limits,
        ..Default::default()
    };
    let mut sum = 0f64;
    match mode.as_str() {
        "frames" => {
            for frame in source.frames(&options) {
                sum += frame
                    .expect("frame")
                    .data
                    .iter()
                    .map(|&v| f64::from(v))
                    .sum::<f64>();
            }
        }
        "volume" => {
            let v = source.volume(&options).expect("volume");
            sum = v.data.iter().map(|&v| f64::from(v)).sum();
        }
        _ => {}
    }
    println!("{mode}: sum {sum}");
}
