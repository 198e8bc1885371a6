//! Image preprocessing (`[preprocessing]` of the image-orientation bundle) on a CR-sized
//! frame, the step between DICOM decoding and inference.
//!
//! The peer is the numpy reference the model was trained with (`models/train/imaging.py`):
//! `benches/preprocess_numpy.py` times it on the same synthetic frame, so the two can be
//! compared side by side in one run:
//!   cargo bench --bench preprocess && .venv/bin/python benches/preprocess_numpy.py

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use nightingale_models::{Image, Manifest};

/// A deterministic frame of integer values uniform in 6000..16000 (xorshift64), as the
/// numpy side uses (sorting cost depends on the spread, not on the exact values).
fn frame(rows: usize, cols: usize) -> Vec<f32> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..rows * cols)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (6000 + state % 10_000) as f32
        })
        .collect()
}

fn preprocess(c: &mut Criterion) {
    let manifest = Manifest::parse(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("models/bundles/image-orientation/bundle.toml"),
        )
        .expect("bundle.toml"),
    )
    .expect("manifest");
    let spec = manifest.preprocessing.expect("[preprocessing]");
    let mut group = c.benchmark_group("preprocess");
    group.sample_size(20);
    for (name, rows, cols) in [("cr-1955x1841", 1955, 1841), ("ct-512x512", 512, 512)] {
        let data = frame(rows, cols);
        let mut image = Image::grey(rows, cols, &data);
        image.monochrome1 = true;
        group.throughput(Throughput::Elements((rows * cols) as u64));
        group.bench_function(name, |b| {
            b.iter(|| black_box(spec.apply(black_box(&image)).unwrap()))
        });
    }
    group.finish();
}

criterion_group!(benches, preprocess);
criterion_main!(benches);
