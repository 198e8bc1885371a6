//! How ONNX Runtime's CUDA execution provider takes batch sizes that change from one run to
//! the next, as dynamic batching makes them: a diagnostic for the GPU machine
//! (benches/gpu/run.sh `shapes`; docs/performance.md §21-22). Not a benchmark of the server.
//!
//! For each session variant (CUDA provider options), on one thread: the first run of each
//! batch size, then median milliseconds per batch size run back to back at a fixed size, then
//! the same sizes taken in turn (1, 2, 3, 4, 1, 2, ...), then sizes 1 and 4 in turn, then the
//! turns again on a second thread (ONNX Runtime keeps cuBLAS/cuDNN handles per thread).
//! The `server` variant is the server's own backend (`nightingale_inference::load`, warmed up
//! at every size on the loading thread, as the server does). One JSON line per measurement.
//!
//!     ORT_DYLIB_PATH=.../libonnxruntime.so.1.31.1 \
//!       cargo run --release --features ort -p nightingale-inference --example gpu_shapes -- \
//!       models/bench/resnet50-arch/1/model.onnx image 3,224,224 [PROFILE_PREFIX]

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use nightingale_inference::{
    Backend, BackendKind, ExecutionProvider, LoadOptions, NamedTensor, Tensor,
};
use ort::ep::cuda::ConvAlgorithmSearch;
use ort::session::Session;

const SIZES: [usize; 4] = [1, 2, 3, 4];

/// Turns through the sizes (`REPEATS`, default 15).
fn repeats() -> usize {
    std::env::var("REPEATS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(15)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Something that runs the model on `batch` rows.
trait Runner {
    fn run(&mut self, batch: usize) -> Result<()>;
}

/// `batch` rows of `dims`, every value 0.5: the shape and the values.
fn rows(batch: usize, dims: &[usize]) -> (Vec<usize>, Vec<f32>) {
    let shape: Vec<usize> = std::iter::once(batch).chain(dims.iter().copied()).collect();
    let n = shape.iter().product();
    (shape, vec![0.5; n])
}

struct Raw {
    session: Session,
    input: String,
    dims: Vec<usize>,
}

impl Runner for Raw {
    fn run(&mut self, batch: usize) -> Result<()> {
        let x = ort::value::Tensor::from_array(rows(batch, &self.dims))?;
        let out = self.session.run(ort::inputs![self.input.as_str() => x])?;
        std::hint::black_box(out.len());
        Ok(())
    }
}

struct Server {
    backend: Box<dyn Backend>,
    input: String,
    dims: Vec<usize>,
}

impl Runner for Server {
    fn run(&mut self, batch: usize) -> Result<()> {
        let (shape, values) = rows(batch, &self.dims);
        let a = ndarray::ArrayD::from_shape_vec(shape, values)?;
        let out = self
            .backend
            .infer(vec![NamedTensor::new(self.input.clone(), Tensor::Fp32(a))])?;
        std::hint::black_box(out.len());
        Ok(())
    }
}

fn timed(r: &mut dyn Runner, batch: usize) -> Result<f64> {
    let t = Instant::now();
    r.run(batch)?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// Median ms per size over [`repeats`] turns through `order`.
fn turns(r: &mut dyn Runner, order: &[usize]) -> Result<Vec<(usize, f64)>> {
    let mut per: Vec<Vec<f64>> = vec![vec![]; order.len()];
    for _ in 0..repeats() {
        for (i, &b) in order.iter().enumerate() {
            per[i].push(timed(r, b)?);
        }
    }
    Ok(order
        .iter()
        .copied()
        .zip(per.into_iter().map(median))
        .collect())
}

fn line(variant: &str, what: &str, v: &[(usize, f64)]) {
    let cells: Vec<String> = v
        .iter()
        .map(|(b, ms)| format!("\"{b}\": {ms:.3}"))
        .collect();
    println!(
        "{{\"variant\": \"{variant}\", \"what\": \"{what}\", \"ms\": {{{}}}}}",
        cells.join(", ")
    );
}

fn measure(variant: &str, r: &mut (dyn Runner + Send)) -> Result<()> {
    let first: Vec<(usize, f64)> = SIZES
        .iter()
        .map(|&b| Ok((b, timed(r, b)?)))
        .collect::<Result<_>>()?;
    line(variant, "first run", &first);
    let mut fixed = vec![];
    for &b in &SIZES {
        for _ in 0..3 {
            r.run(b)?;
        }
        let v: Vec<f64> = (0..repeats()).map(|_| timed(r, b)).collect::<Result<_>>()?;
        fixed.push((b, median(v)));
    }
    line(variant, "fixed size", &fixed);
    line(variant, "sizes 1-4 in turn", &turns(r, &SIZES)?);
    line(variant, "sizes 1,4 in turn", &turns(r, &[1, 4])?);
    std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            line(
                variant,
                "sizes 1-4 in turn, second thread",
                &turns(r, &SIZES)?,
            );
            Ok(())
        })
        .join()
        .expect("thread")
    })?;
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model = Path::new(
        args.get(1)
            .context("MODEL.onnx INPUT DIMS [PROFILE_PREFIX]")?,
    );
    let input = args.get(2).context("INPUT")?.clone();
    let dims: Vec<usize> = args
        .get(3)
        .context("DIMS")?
        .split(',')
        .map(|d| d.parse().context("DIMS"))
        .collect::<Result<_>>()?;
    let profile = args.get(4);
    let only = std::env::var("VARIANTS").ok();
    let wanted = |v: &str| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == v));

    // ONNX Runtime allows one environment per process: the server's backend (which makes
    // its own) is measured in a run of its own, `VARIANTS=server`.
    if only.as_deref() == Some("server") {
        let options = LoadOptions {
            backend: BackendKind::Ort,
            execution_provider: ExecutionProvider::Cuda { device_id: 0 },
            gpu_warm_up_rows: SIZES.len(),
            ..Default::default()
        };
        let started = Instant::now();
        let backend = nightingale_inference::load(model, &options)?;
        println!(
            "{{\"variant\": \"server\", \"what\": \"load with warm-up\", \"on_gpu\": {}, \"ms\": {:.1}}}",
            backend.on_gpu(),
            started.elapsed().as_secs_f64() * 1e3
        );
        let mut s = Server {
            backend,
            input: input.clone(),
            dims: dims.clone(),
        };
        // Warmed up on this thread at load; measured on another, as an instance thread is.
        return std::thread::scope(|sc| {
            sc.spawn(|| measure("server", &mut s))
                .join()
                .expect("thread")
        });
    }
    let library = std::env::var("ORT_DYLIB_PATH").context("ORT_DYLIB_PATH")?;
    let env = ort::init_from(&library)?.with_name("gpu_shapes").build()?;

    type Ep = ort::ep::CUDA;
    let base = || {
        Ep::default()
            .with_device_id(0)
            .with_tf32(false)
            .with_conv_algorithm_search(ConvAlgorithmSearch::Heuristic)
    };
    let variants: Vec<(&str, Ep, bool)> = vec![
        ("heuristic", base(), true),
        ("heuristic, no memory pattern", base(), false),
        (
            "heuristic, no conv bias fusion",
            base().with_fuse_conv_bias(false),
            true,
        ),
        (
            "heuristic, conv workspace 32 MB",
            base().with_conv_max_workspace(false),
            true,
        ),
        ("heuristic, NHWC", base().with_prefer_nhwc(true), true),
        (
            "default search",
            base().with_conv_algorithm_search(ConvAlgorithmSearch::Default),
            true,
        ),
        (
            "exhaustive",
            base().with_conv_algorithm_search(ConvAlgorithmSearch::Exhaustive),
            true,
        ),
    ];
    for (name, ep, mem_pattern) in variants {
        if !wanted(name) {
            continue;
        }
        // A variant this ONNX Runtime refuses is reported and the others still run.
        if let Err(e) = raw_variant(&env, model, &input, &dims, profile, name, ep, mem_pattern) {
            println!(
                "{{\"variant\": \"{name}\", \"error\": {:?}}}",
                format!("{e:#}")
            );
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn raw_variant(
    env: &ort::environment::Environment,
    model: &Path,
    input: &str,
    dims: &[usize],
    profile: Option<&String>,
    name: &str,
    ep: ort::ep::CUDA,
    mem_pattern: bool,
) -> Result<()> {
    let mut builder = Session::builder(env)?
        .with_memory_pattern(mem_pattern)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // NG_GPU_DRY_RUN=1 rehearses the run on a machine without a GPU (the CPU provider).
    if std::env::var("NG_GPU_DRY_RUN").is_err() {
        builder = builder
            .with_execution_providers([ep.build().error_on_failure()])
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    if let (Some(prefix), "heuristic") = (profile, name) {
        builder = builder
            .with_profiling(prefix)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let session = builder.commit_from_file(model)?;
    let mut raw = Raw {
        session,
        input: input.to_owned(),
        dims: dims.to_vec(),
    };
    measure(name, &mut raw)?;
    if profile.is_some() && name == "heuristic" {
        let file = raw.session.end_profiling()?;
        println!("{{\"variant\": \"{name}\", \"profile\": \"{file}\"}}");
    }
    Ok(())
}
