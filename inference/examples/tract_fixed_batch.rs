//! tract with a symbolic batch dimension (as the tract backend plans models) against the
//! same model planned with the batch fixed, on one thread (docs/performance.md §16.1).
//!
//! ```sh
//! cargo run --release -p nightingale-inference --example tract_fixed_batch -- \
//!     models/bundles/lesion-detection/1/model.onnx [REPS]
//! ```

use std::collections::HashMap;
use std::time::Instant;

use tract_onnx::prelude::tract_ndarray::{ArrayD, Dimension};
use tract_onnx::prelude::*;

#[path = "common/symbolic.rs"]
mod symbolic;

fn main() -> TractResult<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: MODEL.onnx [REPS]"))?;
    let reps: usize = args.next().map(|r| r.parse()).transpose()?.unwrap_or(30);
    let (typed, n, item) = symbolic::typed_with_symbolic_batch(&path)?;
    let symbolic = typed.clone().into_optimized()?.into_runnable()?;
    println!("| batch | symbolic N ms | fixed N ms | fixed / symbolic | max |difference| |");
    println!("|---|---|---|---|---|");
    for batch in [1usize, 8] {
        let subs = HashMap::from([(n.clone(), TDim::Val(batch as i64))]);
        let fixed = typed
            .set_symbols(&subs)?
            .into_optimized()?
            .into_runnable()?;
        let shape: Vec<usize> = std::iter::once(batch).chain(item.iter().copied()).collect();
        let input: Tensor =
            ArrayD::<f32>::from_shape_fn(shape, |ix| (ix.as_array_view().sum() % 7) as f32 / 7.0)
                .into();
        let mut times = vec![];
        let mut outputs = vec![];
        for plan in [&symbolic, &fixed] {
            let mut state = TypedSimpleState::new(plan)?;
            for _ in 0..3 {
                state.run(tvec!(input.clone().into()))?;
            }
            let started = Instant::now();
            let mut out = tvec![];
            for _ in 0..reps {
                out = state.run(tvec!(input.clone().into()))?;
            }
            times.push(started.elapsed().as_secs_f64() * 1e3 / reps as f64);
            outputs.push(out[0].to_plain_array_view::<f32>()?.to_owned());
        }
        let diff = outputs[0]
            .iter()
            .zip(outputs[1].iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!(
            "| {batch} | {:.2} | {:.2} | {:.2}× | {diff:e} |",
            times[0],
            times[1],
            times[1] / times[0]
        );
    }
    Ok(())
}
