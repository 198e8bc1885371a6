//! Per-node time of a model on tract (the optimised plan the tract backend runs), one thread.
//!
//! ```sh
//! cargo run --release -p nightingale-inference --example tract_profile -- MODEL.onnx [BATCH] [REPS]
//! ```

use std::collections::HashMap;
use std::time::Instant;

use tract_onnx::prelude::tract_ndarray::{ArrayD, Dimension};
use tract_onnx::prelude::*;

#[path = "common/symbolic.rs"]
mod symbolic;

fn main() -> TractResult<()> {
    // On a thread of its own, as the server runs a model on its instance thread (see the
    // cnn_kernels example: on the main thread glibc trims its heap between runs and the
    // tensors are faulted in again every run).
    std::thread::Builder::new()
        .name("ng-model".into())
        .spawn(run)?
        .join()
        .map_err(|_| anyhow::anyhow!("the profiling thread panicked"))?
}

fn run() -> TractResult<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: MODEL.onnx [BATCH] [REPS]"))?;
    let batch: usize = args.next().map(|r| r.parse()).transpose()?.unwrap_or(1);
    let reps: usize = args.next().map(|r| r.parse()).transpose()?.unwrap_or(30);
    let (typed, n, item) = symbolic::typed_with_symbolic_batch(&path)?;
    // FIXED=1: plan with the batch dimension fixed to BATCH instead of the symbol N.
    let typed = if std::env::var("FIXED").is_ok_and(|v| v == "1") {
        typed.set_symbols(&HashMap::from([(n.clone(), TDim::Val(batch as i64))]))?
    } else {
        typed
    };
    // KERNELS=nightingale: Nightingale's convolution and max pool instead of tract's.
    let mut typed = typed;
    if std::env::var("PASS").is_ok_and(|v| v == "first") {
        let n = nightingale_inference::use_nightingale_kernels(&mut typed)?;
        println!("{n} nodes on Nightingale's kernels before declutter");
    }
    let mut typed = typed.into_decluttered()?;
    if std::env::var("KERNELS").is_ok_and(|v| v == "nightingale") {
        let n = nightingale_inference::use_nightingale_kernels(&mut typed)?;
        println!("{n} nodes on Nightingale's kernels");
    }
    let plan = typed.into_optimized()?.into_runnable()?;
    let shape: Vec<usize> = std::iter::once(batch).chain(item.iter().copied()).collect();
    let input: Tensor =
        ArrayD::<f32>::from_shape_fn(shape, |ix| (ix.as_array_view().sum() % 7) as f32 / 7.0)
            .into();
    let mut state = TypedSimpleState::new(&plan)?;
    for _ in 0..3 {
        state.run(tvec!(input.clone().into()))?;
    }
    let mut per_node: HashMap<usize, f64> = HashMap::new();
    let started = Instant::now();
    for _ in 0..reps {
        state.run_plan_with_eval(tvec!(input.clone().into()), |ctx, st, node, inputs| {
            let t = Instant::now();
            let out = tract_onnx::tract_core::plan::eval(ctx, st, node, inputs);
            *per_node.entry(node.id).or_default() += t.elapsed().as_secs_f64();
            out
        })?;
    }
    let total = started.elapsed().as_secs_f64() * 1e3 / reps as f64;
    let model = plan.model();
    let mut rows: Vec<_> = per_node.into_iter().collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!("total {total:.3} ms per run (batch {batch})");
    for (id, secs) in rows {
        let node = model.node(id);
        let ms = secs * 1e3 / reps as f64;
        if ms < 0.005 {
            continue;
        }
        let facts: Vec<String> = node
            .outputs
            .iter()
            .map(|o| format!("{:?}", o.fact))
            .collect();
        println!(
            "{ms:8.3} ms {:5.1}% #{id} {} {} -> {}",
            100.0 * ms / total,
            node.op().name(),
            node.name,
            facts.join(", ")
        );
    }
    Ok(())
}
