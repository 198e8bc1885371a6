//! Shared by the tract examples: an ONNX model typed with its batch as the symbol `N`.

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::DimLike;

/// The model at `path` typed with its first input's batch dimension as the symbol `N`: the
/// model, the symbol, and the first input's dimensions after the batch.
pub fn typed_with_symbolic_batch(path: &str) -> TractResult<(TypedModel, Symbol, Vec<usize>)> {
    let bytes = std::fs::read(path)?;
    let mut model = tract_onnx::onnx().model_for_read(&mut &bytes[..])?;
    let n = model.symbols.sym("N");
    let mut fact: InferenceFact = model.input_fact(0)?.clone();
    fact.shape.set_dim(0, TDim::Sym(n.clone()));
    model.set_input_fact(0, fact)?;
    let typed = model.into_typed()?;
    let item: Vec<usize> = typed
        .input_fact(0)?
        .shape
        .iter()
        .skip(1)
        .map(|d| d.to_usize())
        .collect::<Result<_, _>>()?;
    Ok((typed, n, item))
}
