//! The working memory one run of a tract plan may take.
//!
//! tract allocates each node's outputs with no fallible path, and Rust aborts the whole process
//! on an allocation that cannot be made: a model whose sizes grow with a request's inputs (a
//! `Pad` by 2e8 after `Slice(x, 1:)` is empty at batch 1 and 800 GB at batch 2; a `Range` to a
//! value of the request) would stop the server on one `/infer`. So each node's outputs are
//! sized before the node runs, from its typed facts with the run's symbols (the batch `N` and
//! the other open dimensions, as tract resolved them from the inputs) or, where they depend on
//! values (`Range`; and every node once one made more than its facts said, tract's typed
//! facts being a simplification that can be wrong), from the op's own shape rules applied
//! to the actual inputs; the run stops
//! with [`TooMuchMemory`] before a node whose outputs would take the tensors alive past the
//! limit. Tensors are counted as the plan keeps them: a node's outputs are alive until the
//! last node that reads them has run (tract frees them then); constants are the model's own.
//!
//! A node with nested bodies (`Scan`, `If`), which tract runs with plans of its own, is
//! counted with every tensor of its bodies alive at once (an upper bound); a body whose sizes
//! depend on values (a `Range` to a value, in a branch) cannot be bounded that way, so such a
//! model is refused at load ([`MemoryBound::new`]). Where a size cannot be known before the
//! node runs even from the actual inputs, the op's own bound counts (`NonZero`: a coordinate
//! of every element of its input; `NonMaxSuppression`: one index triple per score), and any
//! other such node stops the run. Scratch space is counted where it can grow past the
//! tensors: tract's `Resize` between its axes, Nightingale's convolution's column buffer.
//! Not counted: tract's own kernels' scratch (its lazy im2col, matrix packing: measured
//! within a few MiB of the counted tensors by a red-team pass).

use tract_onnx::prelude::{IntoArcTensor, TValue, TVec, TypedFact, TypedModel};
use tract_onnx::tract_core::internal::{SymbolValues, TDim};
use tract_onnx::tract_core::model::{TypedNode, TypedRunnableModel};

/// The size of a node's outputs cannot be known before it runs: the run stopped before it.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the size of node {node:?}'s outputs ({op}) cannot be known before it runs, so its working memory cannot be bounded"
)]
pub struct SizeUnknown {
    pub node: String,
    pub op: String,
}

/// A node would take the tensors alive past the limit: the run stopped before it.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "running the model needs at least {needed} bytes of tensors at once (at node {node:?}), more than the limit of {limit} bytes"
)]
pub struct TooMuchMemory {
    pub needed: u64,
    pub limit: u64,
    pub node: String,
}

/// A plan's sizes, worked out once at load.
#[derive(Debug)]
pub(super) struct MemoryBound {
    pub(super) limit: u64,
    /// Per node id: the bytes of its outputs when they are known at load (no symbol).
    fixed: Vec<Option<u64>>,
    /// Per node id: the nodes whose outputs are no longer read once it has run.
    frees: Vec<Vec<usize>>,
    /// The plan's nodes in the order they run.
    order: Vec<usize>,
    /// Per node id: the facts of every node of its nested bodies (`Scan`, `If`), nested
    /// bodies' own included.
    nested: Vec<Vec<TypedFact>>,
    /// Per node id: sized while it runs, from its actual inputs (a model input; an op that
    /// sizes its outputs by values; a `Resize`, for its scratch).
    at_run: Vec<bool>,
    /// Per node id: a `Resize`.
    resize: Vec<bool>,
    /// Per node id: Nightingale's convolution (its column buffer).
    conv: Vec<bool>,
}

/// A plan's sizes for one set of input shapes (an instance keeps the last: most requests
/// come in the shapes of the one before), so that a run looks its sizes up rather than
/// evaluates each node's shape.
#[derive(Debug, Default)]
pub(super) struct Sizes {
    /// The inputs' shapes these sizes are for (`None`: none yet).
    shapes: Option<Vec<Vec<usize>>>,
    /// Per node id: its outputs' bytes (`None`: sized while it runs).
    outputs: Vec<Option<u64>>,
    /// Per node id: its nested bodies' bytes.
    bodies: Vec<u64>,
}

impl Sizes {
    pub(super) fn is_sized(&self) -> bool {
        self.shapes.is_some()
    }

    /// Forgets the sizes unless they are for inputs of these shapes.
    pub(super) fn keep_if_for(&mut self, inputs: &[TValue]) {
        let same = self.shapes.as_ref().is_some_and(|shapes| {
            shapes.len() == inputs.len()
                && shapes
                    .iter()
                    .zip(inputs)
                    .all(|(s, v)| s.as_slice() == v.shape())
        });
        if !same {
            self.shapes = None;
        }
    }
}

/// The facts of every node of the bodies nested in `node`, and in theirs.
fn nested_facts(node: &TypedNode, facts: &mut Vec<TypedFact>) {
    use tract_onnx::tract_core::ops::logic::IfThenElse;
    use tract_onnx::tract_core::ops::scan::{OptScan, Scan};
    let mut bodies: Vec<&TypedModel> = vec![];
    if let Some(scan) = node.op_as::<OptScan>() {
        bodies.push(scan.plan.model());
    }
    if let Some(scan) = node.op_as::<Scan>() {
        bodies.push(&scan.body);
    }
    if let Some(ite) = node.op_as::<IfThenElse>() {
        bodies.push(&ite.then_body);
        bodies.push(&ite.else_body);
    }
    for body in bodies {
        for inner in body.nodes() {
            facts.extend(inner.outputs.iter().map(|o| o.fact.clone()));
            nested_facts(inner, facts);
        }
    }
}

/// Bytes of `shape` × `size` once every dimension is a number; `None` when one is not
/// (symbols not resolved). Saturates: a product past `u64` is over any limit anyway.
fn bytes_of(shape: &[TDim], size: usize, symbols: Option<&SymbolValues>) -> Option<u64> {
    let mut total = size as u64;
    for dim in shape {
        let value = match symbols {
            Some(values) => dim.eval(values).to_i64().ok()?,
            None => dim.to_i64().ok()?,
        };
        // A negative size is a wrong fact (tract's simplification), not an empty tensor.
        total = total.saturating_mul(u64::try_from(value).ok()?);
    }
    Some(total)
}

/// The bytes of tensors of `facts`: their elements, and the buffers of packed (exotic) ones.
fn facts_bytes<'a>(
    facts: impl IntoIterator<Item = &'a TypedFact>,
    symbols: Option<&SymbolValues>,
) -> Option<u64> {
    facts.into_iter().try_fold(0u64, |sum, fact| {
        // A packed (exotic) element holds its buffers besides its own bytes.
        let mut element = fact.datum_type.size_of() as u64;
        if let Some(exotic) = fact.exotic_fact() {
            for buffer in exotic.buffer_sizes() {
                element = element.saturating_add(bytes_of(&[buffer], 1, symbols)?);
            }
        }
        let volume = bytes_of(fact.shape.dims(), 1, symbols)?;
        Some(sum.saturating_add(volume.saturating_mul(element)))
    })
}

/// The bytes `value` holds: its elements, or a packed tensor's buffers (a string's heap text
/// is not counted).
fn value_bytes(value: &TValue) -> u64 {
    let mut bytes = (value.len() as u64).saturating_mul(value.datum_type().size_of() as u64);
    if !value.is_plain()
        && let Ok(Some(exotic)) = value.exotic_fact()
    {
        for buffer in exotic.buffer_sizes() {
            bytes = bytes.saturating_add(bytes_of(&[buffer], 1, None).unwrap_or(0));
        }
    }
    bytes
}

/// The output facts `node`'s op gives for the actual `inputs` (small inputs with their
/// values). An op's shape rules may panic on values its eval refuses (a `Range` of step 0 on
/// TDim divides by zero): `None`, and the op's own eval then says what is wrong.
fn concrete_outputs(node: &TypedNode, inputs: &[TValue]) -> Option<TVec<TypedFact>> {
    let facts: Vec<TypedFact> = inputs
        .iter()
        .map(|value| {
            if value.len() <= 64
                && let Ok(fact) = TypedFact::try_from(value.clone().into_arc_tensor())
            {
                fact
            } else {
                TypedFact::shape_and_dt_of(value)
            }
        })
        .collect();
    let refs: Vec<&TypedFact> = facts.iter().collect();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| node.op.output_facts(&refs)))
        .ok()?
        .ok()
}

/// What tract's `Resize` holds besides its output: the input cast to f32, and while it
/// resamples one axis after the other, the last axis's result and the next's (f32 each): an
/// axis scaled up before another is scaled down holds far more than the output (a red-team
/// finding: 164 GB for an output of 164 MB).
fn resize_scratch(node: &TypedNode, inputs: &[TValue]) -> Option<u64> {
    let input: Vec<u64> = inputs.first()?.shape().iter().map(|&d| d as u64).collect();
    let outputs = concrete_outputs(node, inputs)?;
    let output: Vec<u64> = outputs
        .first()?
        .shape
        .iter()
        .map(|d| d.to_i64().ok().and_then(|v| u64::try_from(v).ok()))
        .collect::<Option<_>>()?;
    if output.len() != input.len() {
        return None;
    }
    let volume = |shape: &[u64]| shape.iter().fold(1u64, |p, &d| p.saturating_mul(d));
    let mut shape = input.clone();
    let mut previous = volume(&shape);
    let mut peak = 0u64;
    for axis in 0..shape.len() {
        shape[axis] = output[axis];
        let next = volume(&shape);
        peak = peak.max(previous.saturating_add(next));
        previous = next;
    }
    Some(volume(&input).saturating_add(peak).saturating_mul(4))
}

impl MemoryBound {
    /// Sizes `plan`'s nodes; refuses a model with a nested body (`Scan`, `If`) whose tensor
    /// sizes depend on more than the model's inputs' shapes (tract runs bodies with plans of
    /// its own, which no check sees node by node).
    pub(super) fn new(plan: &TypedRunnableModel, limit: u64) -> Result<Self, String> {
        let model: &TypedModel = plan.model();
        let order = plan.order_without_consts().to_vec();
        let n = model.nodes().len();
        let mut fixed = vec![None; n];
        let mut step_of = vec![usize::MAX; n];
        for (step, &id) in order.iter().enumerate() {
            step_of[id] = step;
            fixed[id] = facts_bytes(model.node(id).outputs.iter().map(|o| &o.fact), None);
        }
        // A node's outputs are freed once the last node of the plan that reads them has run;
        // the model's outputs never are.
        let outputs: Vec<usize> = model
            .output_outlets()
            .map(|o| o.iter().map(|o| o.node).collect())
            .unwrap_or_default();
        let mut last_reader = vec![None::<usize>; n];
        for &id in &order {
            for input in &model.node(id).inputs {
                if step_of[input.node] != usize::MAX {
                    let last = last_reader[input.node].get_or_insert(id);
                    if step_of[id] > step_of[*last] {
                        *last = id;
                    }
                }
            }
        }
        let mut frees = vec![Vec::new(); n];
        for (id, last) in last_reader.iter().enumerate() {
            if let Some(last) = last
                && !outputs.contains(&id)
            {
                frees[*last].push(id);
            }
        }
        let nested: Vec<Vec<TypedFact>> = (0..n)
            .map(|id| {
                let mut facts = vec![];
                nested_facts(model.node(id), &mut facts);
                facts
            })
            .collect();
        let mut known = std::collections::HashSet::new();
        for outlet in model.input_outlets().map_err(|e| e.to_string())? {
            let fact = model.outlet_fact(*outlet).map_err(|e| e.to_string())?;
            known.extend(fact.shape.iter().flat_map(|d| d.symbols()));
        }
        for (id, facts) in nested.iter().enumerate() {
            for fact in facts {
                let unknown = fact
                    .shape
                    .iter()
                    .flat_map(|d| d.symbols())
                    .find(|s| !known.contains(s));
                if let Some(symbol) = unknown {
                    return Err(format!(
                        "node {:?} ({}) runs a body whose tensor sizes depend on values (symbol {symbol}), which the tract engine cannot bound in working memory; serve this model on ONNX Runtime",
                        model.node(id).name,
                        model.node(id).op.name()
                    ));
                }
            }
        }
        let resize: Vec<bool> = model
            .nodes()
            .iter()
            .map(|n| n.op.name() == "Resize")
            .collect();
        let at_run = model
            .nodes()
            .iter()
            .map(|n| {
                n.inputs.is_empty()
                    || (n.op.mints_runtime_symbols() && nested[n.id].is_empty())
                    || resize[n.id]
            })
            .collect();
        let conv = model
            .nodes()
            .iter()
            .map(|n| n.op_as::<super::kernels::GemmConv>().is_some())
            .collect();
        Ok(MemoryBound {
            limit,
            fixed,
            frees,
            order,
            nested,
            at_run,
            resize,
            conv,
        })
    }

    /// The bytes `node`'s outputs will take: from its typed facts with the run's `symbols`,
    /// unless `concrete` (a node of this run made more than its facts said: tract's facts
    /// are not to be trusted further) or the op sizes its outputs by values (`Range`, `Tile`
    /// by a computed count, `TopK`…: tract's typed fact for them can be a wrong
    /// simplification); else from the op's shape rules applied to `inputs` (small inputs
    /// with their values); else the op's own bound. `None`: not known before it runs.
    fn predict(
        &self,
        node: &TypedNode,
        symbols: &SymbolValues,
        inputs: &[TValue],
        concrete: bool,
    ) -> Option<u64> {
        if node.inputs.is_empty() {
            // A model input: the request's own tensors.
            return Some(
                inputs
                    .iter()
                    .fold(0u64, |sum, v| sum.saturating_add(value_bytes(v))),
            );
        }
        let by_values = node.op.mints_runtime_symbols() && self.nested[node.id].is_empty();
        if !concrete && !by_values {
            if let Some(bytes) = self.fixed[node.id] {
                return Some(bytes);
            }
            if let Some(bytes) = facts_bytes(node.outputs.iter().map(|o| &o.fact), Some(symbols)) {
                return Some(bytes);
            }
        }
        if let Some(outputs) = concrete_outputs(node, inputs)
            && let Some(bytes) = facts_bytes(outputs.iter(), Some(symbols))
        {
            return Some(bytes);
        }
        // Sizes found only by running: the op's own bound.
        let elements = |value: &TValue| value.len() as u64;
        match &*node.op.name() {
            // A coordinate (i64) per input axis for every element that is not zero.
            "NonZero" => inputs.first().map(|input| {
                elements(input)
                    .saturating_mul(input.rank() as u64)
                    .saturating_mul(8)
            }),
            // An index triple (i64) per selected box: at most one per score.
            "NonMaxSuppression" => inputs
                .get(1)
                .map(|scores| elements(scores).saturating_mul(24)),
            _ => None,
        }
    }

    /// Fills `sizes` for a run whose symbols (from its inputs, `shapes`) are `symbols`.
    pub(super) fn size(
        &self,
        model: &TypedModel,
        symbols: &SymbolValues,
        shapes: Vec<Vec<usize>>,
        sizes: &mut Sizes,
    ) {
        let n = self.fixed.len();
        sizes.outputs.clear();
        sizes.outputs.resize(n, None);
        sizes.bodies.clear();
        sizes.bodies.resize(n, 0);
        for &id in &self.order {
            if !self.at_run[id] {
                sizes.outputs[id] = self.fixed[id].or_else(|| {
                    facts_bytes(
                        model.node(id).outputs.iter().map(|o| &o.fact),
                        Some(symbols),
                    )
                });
            }
            sizes.bodies[id] = self.bodies_bytes(id, symbols);
        }
        sizes.shapes = Some(shapes);
    }

    /// Checks `node` before it runs: `live` (the bytes alive now) plus its outputs, the
    /// tensors of its nested bodies and its known scratch space within the limit. Returns
    /// the bytes its outputs are expected to take.
    pub(super) fn before(
        &self,
        node: &TypedNode,
        symbols: &SymbolValues,
        inputs: &[TValue],
        live: u64,
        concrete: bool,
        sizes: &Sizes,
    ) -> Result<u64, tract_onnx::prelude::TractError> {
        let known = if concrete {
            None
        } else {
            sizes.outputs.get(node.id).copied().flatten()
        };
        let Some(outputs) = known.or_else(|| self.predict(node, symbols, inputs, concrete)) else {
            return Err(SizeUnknown {
                node: node.name.clone(),
                op: node.op.name().to_string(),
            }
            .into());
        };
        let mut extra = sizes.bodies.get(node.id).copied().unwrap_or(0);
        if self.conv[node.id] {
            let scratch = node
                .op_as::<super::kernels::GemmConv>()
                .zip(inputs.first())
                .and_then(|(conv, input)| conv.scratch_bytes(input.shape()));
            extra = extra.saturating_add(scratch.unwrap_or(u64::MAX));
        }
        if self.resize[node.id] {
            extra = extra.saturating_add(resize_scratch(node, inputs).unwrap_or(u64::MAX));
        }
        let needed = live.saturating_add(outputs).saturating_add(extra);
        if needed > self.limit {
            return Err(TooMuchMemory {
                needed,
                limit: self.limit,
                node: node.name.clone(),
            }
            .into());
        }
        Ok(outputs)
    }

    /// After `node` ran with `outputs` (expected to take `expected` bytes): the bytes alive
    /// now, from `live` before it, and whether the node made more than expected (tract's
    /// facts were wrong: the rest of the run is sized from actual inputs). `sizes` keeps
    /// each node's outputs' bytes until they are freed.
    pub(super) fn after(
        &self,
        node: usize,
        outputs: &[TValue],
        expected: u64,
        live: u64,
        sizes: &mut [u64],
    ) -> (u64, bool) {
        // A packed (exotic) output is taken at its expected size: its buffers are its facts'.
        let made = if outputs.iter().all(|v| v.is_plain()) {
            outputs.iter().fold(0u64, |sum, v| {
                sum.saturating_add((v.len() as u64).saturating_mul(v.datum_type().size_of() as u64))
            })
        } else {
            expected
        };
        sizes[node] = made;
        let mut live = live.saturating_add(made);
        for &freed in &self.frees[node] {
            live = live.saturating_sub(std::mem::take(&mut sizes[freed]));
        }
        (live, made > expected)
    }

    /// The most bytes a run on inputs of `shapes` keeps alive at once, from the facts alone
    /// (the symbols bound from the inputs' open dimensions); `None` when a size depends on
    /// more than the inputs' shapes.
    pub(super) fn estimate(&self, model: &TypedModel, shapes: &[Vec<usize>]) -> Option<u64> {
        let mut symbols = SymbolValues::default();
        let inputs = model.input_outlets().ok()?;
        for (outlet, shape) in inputs.iter().zip(shapes) {
            let fact = model.outlet_fact(*outlet).ok()?;
            for (dim, &value) in fact.shape.iter().zip(shape) {
                if let TDim::Sym(sym) = dim {
                    symbols.set(sym, value as i64);
                }
            }
        }
        let mut sizes = vec![0u64; self.fixed.len()];
        let (mut live, mut peak) = (0u64, 0u64);
        for &id in &self.order {
            let node = model.node(id);
            if self.at_run[id] && !node.inputs.is_empty() {
                // Sized by values, or with scratch found only from actual sizes.
                return None;
            }
            let made = match self.fixed[id] {
                Some(bytes) => bytes,
                None => facts_bytes(node.outputs.iter().map(|o| &o.fact), Some(&symbols))?,
            };
            let mut extra = self.bodies_bytes(id, &symbols);
            if self.conv[id] {
                let input = model.outlet_fact(*node.inputs.first()?).ok()?;
                let shape: Vec<usize> = input
                    .shape
                    .iter()
                    .map(|d| usize::try_from(d.eval(&symbols).to_i64().ok()?).ok())
                    .collect::<Option<_>>()?;
                let conv = node.op_as::<super::kernels::GemmConv>()?;
                extra = extra.saturating_add(conv.scratch_bytes(&shape)?);
            }
            peak = peak.max(live.saturating_add(made).saturating_add(extra));
            sizes[id] = made;
            live = live.saturating_add(made);
            peak = peak.max(live);
            for &freed in &self.frees[id] {
                live = live.saturating_sub(std::mem::take(&mut sizes[freed]));
            }
        }
        Some(peak)
    }

    /// The bytes of every tensor of node `id`'s nested bodies with `symbols` (a body's own
    /// symbols count 0).
    fn bodies_bytes(&self, id: usize, symbols: &SymbolValues) -> u64 {
        self.nested[id].iter().fold(0u64, |sum, fact| {
            let bytes = facts_bytes(std::iter::once(fact), Some(symbols)).unwrap_or(0);
            sum.saturating_add(bytes)
        })
    }

    pub(super) fn nodes(&self) -> usize {
        self.fixed.len()
    }
}
