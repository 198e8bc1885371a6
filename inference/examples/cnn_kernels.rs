//! Time per call of a model through `Backend::infer` on tract with Nightingale's convolution and
//! max-pool kernels and with tract's own, one thread (docs/performance.md §16.2).
//!
//! ```sh
//! cargo run --release -p nightingale-inference --example cnn_kernels -- MODEL.onnx [BATCH...]
//! ```
//! Prints one line per kernel set and batch: the median and the mean of 30 (`REPS`) timed calls after
//! 3 warm-up calls, and the largest difference between the two kernel sets' outputs.

use std::time::Instant;

use nightingale_inference::{BackendKind, LoadOptions, NamedTensor, Tensor, TractKernels, load};

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    // On a thread of its own, as the server runs a model on its instance thread: glibc then
    // serves the run's tensors from that thread's arena. On the main thread its heap is
    // trimmed between runs and every run faults its multi-megabyte tensors in again
    // (~185 page faults per run of the lesion model, twice its time).
    std::thread::Builder::new()
        .name("ng-model".into())
        .spawn(run)?
        .join()
        .map_err(|_| "the timing thread panicked")?
}

fn run() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let path = std::path::PathBuf::from(args.next().ok_or("usage: MODEL.onnx [BATCH...]")?);
    let batches: Vec<usize> = args.map(|a| a.parse()).collect::<Result<_, _>>()?;
    let batches = if batches.is_empty() {
        vec![1, 8]
    } else {
        batches
    };
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(30);
    for batch in batches {
        let mut outputs = vec![];
        // NIGHTINGALE_ONLY=1: Nightingale's kernels alone (no comparison with tract's).
        let only = std::env::var("NIGHTINGALE_ONLY").is_ok_and(|v| v == "1");
        let sets: &[TractKernels] = if only {
            &[TractKernels::Nightingale]
        } else {
            &[TractKernels::Nightingale, TractKernels::Tract]
        };
        for &kernels in sets {
            let options = LoadOptions {
                backend: BackendKind::Tract,
                tract_kernels: kernels,
                ..Default::default()
            };
            let mut backend = load(&path, &options)?;
            let spec = backend.metadata().inputs[0].clone();
            let shape: Vec<usize> = std::iter::once(batch)
                .chain(spec.shape[1..].iter().map(|&d| d as usize))
                .collect();
            let len: usize = shape.iter().product();
            let data: Vec<f32> = (0..len).map(|i| (i % 7) as f32 / 7.0).collect();
            let input = || {
                vec![NamedTensor::new(
                    spec.name.clone(),
                    Tensor::from_vec(shape.clone(), data.clone()).expect("input"),
                )]
            };
            for _ in 0..3 {
                backend.infer(input())?;
            }
            let mut times = vec![];
            let mut last = vec![];
            for _ in 0..reps {
                let x = input();
                let started = Instant::now();
                last = backend.infer(x)?;
                times.push(started.elapsed().as_secs_f64() * 1e3);
            }
            times.sort_by(f64::total_cmp);
            let mean = times.iter().sum::<f64>() / reps as f64;
            println!(
                "{} batch {batch} {kernels:?}: median {:.3} ms, mean {mean:.3} ms, min {:.3} ms",
                path.display(),
                times[reps / 2],
                times[0]
            );
            outputs.push(match &last[0].tensor {
                Tensor::Fp32(a) => a.iter().copied().collect::<Vec<f32>>(),
                _ => vec![],
            });
        }
        if only {
            continue;
        }
        let diff = outputs[0]
            .iter()
            .zip(&outputs[1])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("  largest difference between the kernel sets: {diff:e}");
    }
    Ok(())
}
