//! Peak memory of `Preprocessing::apply` at its 64 Mi-pixel limit (issue 9): run under
//! `/usr/bin/time -v` and read "Maximum resident set size".
//!
//!   cargo run -p nightingale-models --example preprocess_peak -- {int|float|rgb|none}
//!
//! `int`: an 8192 × 8192 frame of 16-bit integer values (what DICOM decodes to); `float`:
//! the same with fractional values; `rgb`: 4096 × 4096 RGB; `none`: the int frame only,
//! not preprocessed (the baseline: the input itself).

use nightingale_models::preprocess::{Aspect, PreprocessingKind, Resize, Window};
use nightingale_models::{Image, Preprocessing};

fn main() {
    let kind = std::env::args().nth(1).unwrap_or_else(|| "int".into());
    let (side, samples) = if kind == "rgb" { (4096, 3) } else { (8192, 1) };
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let data: Vec<f32> = (0..side * side * samples)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let v = (state % 4096) as f32;
            if kind == "float" { v + 0.25 } else { v }
        })
        .collect();
    let spec = Preprocessing {
        kind: PreprocessingKind::Image,
        input: "image".into(),
        size: [224, 224],
        aspect: Aspect::Pad,
        pad_value: 0.0,
        resize: Resize::Area,
        window: Window::Percentile {
            low: 0.5,
            high: 99.5,
        },
        mean: 0.5,
        std: 0.25,
    };
    let mut image = Image::grey(side, side, &data);
    image.samples = samples;
    image.slope = 1.0;
    if kind == "none" {
        println!("input only: {} values", data.len());
        return;
    }
    let out = spec.apply_to_vec(&image).expect("preprocess");
    println!("{kind}: {} outputs, first {}", out.len(), out[0]);
}
