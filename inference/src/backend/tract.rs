//! The tract backend: pure Rust, the default engine.
//!
//! Loading parses the ONNX file with Nightingale's extra ONNX-ML operators registered
//! ([`register_onnx_ml_ops`]), turns unknown leading input dimensions into the symbol `N` so the
//! model accepts any batch, puts Nightingale's convolution, max-pool and strided-slice kernels in
//! place of tract's ([`use_nightingale_kernels`], unless [`TractKernels::Tract`] is asked for), then
//! optimises and plans it once. Each instance owns only its
//! per-call state; the plan is shared.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::{
    DatumType, Framework, InferenceModelExt, TValue, TVec, Tensor as TractTensor, TractError,
};
use tract_onnx::prelude::{OutletId, Symbol, TypedModel};
use tract_onnx::tract_core::model::{IntoRunnable, TypedRunnableModel, TypedSimpleState};
use tract_onnx::tract_hir::infer::{GenericFactoid, InferenceFact};
use tract_onnx::tract_hir::internal::TDim;

use super::{Backend, LoadOptions, ModelMetadata, TensorSpec, TractKernels};
use crate::error::InferenceError;
use crate::tensor::{DataType, NamedTensor, Tensor};

mod declared;
mod kernels;
mod memory;
mod ml_ops;

pub use declared::{DeclaredDim, DeclaredModel, DeclaredTensor, DeclaredType, declared_model};
pub use kernels::use_nightingale_kernels;
use memory::MemoryBound;
pub use memory::{SizeUnknown, TooMuchMemory};
pub use ml_ops::register_onnx_ml_ops;

const NAME: &str = "tract";

/// A model planned by tract, with this instance's run state.
pub struct TractBackend {
    plan: Arc<TypedRunnableModel>,
    state: TypedSimpleState,
    metadata: Arc<ModelMetadata>,
    /// The plan was made for a batch of one row, and a batch runs one row at a time (see
    /// [`runs_row_by_row`]).
    per_row: bool,
    /// The working memory a run may take ([`memory`]).
    memory: Arc<MemoryBound>,
    /// This instance's sizes: the last inputs' plan, and a run's live tensors.
    sizes: RunSizes,
}

/// An instance's working-memory bookkeeping ([`memory`]).
#[derive(Debug, Default)]
struct RunSizes {
    /// Per node: the bytes of its outputs while a run keeps them.
    alive: Vec<u64>,
    /// The plan's sizes for the last inputs' shapes.
    planned: memory::Sizes,
    /// Runs in which a node made more than its typed facts said (then sized from actual
    /// inputs, node by node): none for a model tract types right.
    facts_failed: u64,
}

impl RunSizes {
    fn new(nodes: usize) -> Self {
        RunSizes {
            alive: vec![0; nodes],
            ..Default::default()
        }
    }
}

impl std::fmt::Debug for TractBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TractBackend")
            .field("metadata", &self.metadata)
            .finish_non_exhaustive()
    }
}

/// The ONNX front end with Nightingale's ONNX-ML operators added.
pub fn onnx() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    register_onnx_ml_ops(&mut onnx.op_register);
    onnx
}

impl TractBackend {
    /// Parses, optimises and plans the model held in `model` (`name` only labels errors).
    pub fn load_bytes(
        model: &[u8],
        name: &Path,
        options: &LoadOptions,
    ) -> Result<Self, InferenceError> {
        let load_err = |e: TractError| InferenceError::load(name, e);
        let mut model = onnx().model_for_read(&mut &model[..]).map_err(load_err)?;
        let batch = model.symbols.sym("N");
        for ix in 0..model.inputs.len() {
            let mut fact: InferenceFact = model.input_fact(ix).map_err(load_err)?.clone();
            let dims: Vec<_> = fact.shape.dims().cloned().collect();
            if dims.is_empty() {
                continue;
            }
            let mut changed = false;
            for (d, dim) in dims.iter().enumerate() {
                if matches!(dim, GenericFactoid::Any) {
                    let sym = if d == 0 {
                        batch.clone()
                    } else {
                        model.symbols.sym(&format!("input{ix}_dim{d}"))
                    };
                    fact.shape.set_dim(d, TDim::Sym(sym));
                    changed = true;
                }
            }
            if changed {
                model.set_input_fact(ix, fact).map_err(load_err)?;
            }
        }
        let mut typed = model
            .into_typed()
            .and_then(|m| m.into_decluttered())
            .map_err(load_err)?;
        let nightingale = options.tract_kernels == TractKernels::Nightingale;
        let per_row = nightingale && runs_row_by_row(&typed, &batch).map_err(load_err)?;
        // Row by row, the model answers as declared (the batch open), from a plan for one row.
        let declared = if per_row {
            let declared = metadata(&typed).map_err(load_err)?;
            let one = HashMap::from([(batch.clone(), TDim::Val(1))]);
            typed = typed.set_symbols(&one).map_err(load_err)?;
            Some(declared)
        } else {
            None
        };
        if nightingale {
            use_nightingale_kernels(&mut typed).map_err(load_err)?;
        }
        let typed = typed.into_optimized().map_err(load_err)?;
        let metadata = match declared {
            Some(declared) => declared,
            None => metadata(&typed).map_err(load_err)?,
        };
        let plan = typed.into_runnable().map_err(load_err)?;
        let state = TypedSimpleState::new(&plan).map_err(load_err)?;
        let limit = match options.max_working_bytes {
            0 => super::DEFAULT_MAX_WORKING_BYTES,
            limit => limit,
        };
        let memory =
            Arc::new(MemoryBound::new(&plan, limit).map_err(|e| InferenceError::load(name, e))?);
        Ok(TractBackend {
            plan,
            state,
            metadata: Arc::new(metadata),
            per_row,
            sizes: RunSizes::new(memory.nodes()),
            memory,
        })
    }
}

/// Whether `model` (decluttered, its batch the symbol `batch`) is planned for one row and run a
/// row at a time: when it has a convolution, and every input and output has the batch as its
/// first dimension and nowhere else. tract plans a symbolic batch with generic element-wise
/// operations and layout moves around its matrix products; with the batch fixed it fuses them
/// (ResNet-50: 195 → 120 ms per image, docs/performance.md §16.3). A CNN gains nothing from
/// batching on one thread (§16.1), and a row computed alone is the same bits whatever batch it
/// came in.
fn runs_row_by_row(model: &TypedModel, batch: &Symbol) -> Result<bool, TractError> {
    let has_conv = model.nodes().iter().any(|n| {
        n.op_as::<tract_onnx::tract_core::ops::cnn::Conv>()
            .is_some()
    });
    if !has_conv {
        return Ok(false);
    }
    let leading = |outlet: OutletId| -> Result<bool, TractError> {
        let shape = &model.outlet_fact(outlet)?.shape;
        Ok(shape.rank() > 0
            && shape[0] == TDim::Sym(batch.clone())
            && shape.iter().skip(1).all(|d| !d.symbols().contains(batch)))
    };
    for outlet in model.input_outlets()?.iter().chain(model.output_outlets()?) {
        if !leading(*outlet)? {
            return Ok(false);
        }
    }
    Ok(true)
}

fn metadata(model: &tract_onnx::prelude::TypedModel) -> Result<ModelMetadata, TractError> {
    // An input is named by its source node (the graph input's own name): its outlet's label
    // may be another tensor's once decluttering has removed what followed it (x -> Identity
    // -> y reported its input as "y", so requests naming "x" were refused).
    let spec =
        |outlet: tract_onnx::prelude::OutletId, input: bool| -> Result<TensorSpec, TractError> {
            let fact = model.outlet_fact(outlet)?;
            let label = if input {
                None
            } else {
                model.outlet_label(outlet)
            };
            let name = label
                .map(str::to_owned)
                .unwrap_or_else(|| model.node(outlet.node).name.clone());
            let datatype = datatype_of(fact.datum_type).ok_or_else(|| {
                tract_onnx::tract_core::internal::format_err!(
                    "{name:?} has datatype {:?}, which KServe v2 cannot carry",
                    fact.datum_type
                )
            })?;
            let shape = fact
                .shape
                .iter()
                .map(|d| d.to_i64().unwrap_or(-1))
                .collect();
            Ok(TensorSpec {
                name,
                datatype,
                shape,
            })
        };
    Ok(ModelMetadata {
        inputs: model
            .input_outlets()?
            .iter()
            .map(|&o| spec(o, true))
            .collect::<Result<_, _>>()?,
        outputs: model
            .output_outlets()?
            .iter()
            .map(|&o| spec(o, false))
            .collect::<Result<_, _>>()?,
    })
}

fn datatype_of(dt: DatumType) -> Option<DataType> {
    Some(match dt {
        DatumType::Bool => DataType::Bool,
        DatumType::U8 => DataType::Uint8,
        DatumType::U16 => DataType::Uint16,
        DatumType::U32 => DataType::Uint32,
        DatumType::U64 => DataType::Uint64,
        DatumType::I8 => DataType::Int8,
        DatumType::I16 => DataType::Int16,
        DatumType::I32 => DataType::Int32,
        // tract parses ONNX `Cast(to=INT64)` as a cast to TDim (its integer type for shape
        // arithmetic): at run time such values are plain integers, served as INT64.
        DatumType::I64 | DatumType::TDim => DataType::Int64,
        DatumType::F16 => DataType::Fp16,
        DatumType::F32 => DataType::Fp32,
        DatumType::F64 => DataType::Fp64,
        DatumType::String => DataType::Bytes,
        _ => return None,
    })
}

fn to_tract(tensor: Tensor) -> Result<TValue, InferenceError> {
    let t: TractTensor = match tensor {
        Tensor::Bool(a) => a.into(),
        Tensor::Uint8(a) => a.into(),
        Tensor::Uint16(a) => a.into(),
        Tensor::Uint32(a) => a.into(),
        Tensor::Uint64(a) => a.into(),
        Tensor::Int8(a) => a.into(),
        Tensor::Int16(a) => a.into(),
        Tensor::Int32(a) => a.into(),
        Tensor::Int64(a) => a.into(),
        Tensor::Fp16(a) => a.into(),
        Tensor::Fp32(a) => a.into(),
        Tensor::Fp64(a) => a.into(),
        Tensor::Bytes(a) => a.mapv(|b| String::from_utf8_lossy(&b).into_owned()).into(),
    };
    Ok(t.into())
}

fn from_tract(value: &TractTensor) -> Result<Tensor, InferenceError> {
    let err = |e: TractError| InferenceError::backend(NAME, e);
    macro_rules! arr {
        ($t:ty, $variant:ident) => {
            Tensor::$variant(value.to_plain_array_view::<$t>().map_err(err)?.to_owned())
        };
    }
    Ok(match value.datum_type() {
        DatumType::Bool => arr!(bool, Bool),
        DatumType::U8 => arr!(u8, Uint8),
        DatumType::U16 => arr!(u16, Uint16),
        DatumType::U32 => arr!(u32, Uint32),
        DatumType::U64 => arr!(u64, Uint64),
        DatumType::I8 => arr!(i8, Int8),
        DatumType::I16 => arr!(i16, Int16),
        DatumType::I32 => arr!(i32, Int32),
        DatumType::I64 => arr!(i64, Int64),
        DatumType::TDim => Tensor::Int64(
            value
                .cast_to::<i64>()
                .map_err(err)?
                .to_plain_array_view::<i64>()
                .map_err(err)?
                .to_owned(),
        ),
        DatumType::F16 => arr!(half::f16, Fp16),
        DatumType::F32 => arr!(f32, Fp32),
        DatumType::F64 => arr!(f64, Fp64),
        DatumType::String => Tensor::Bytes(
            value
                .to_plain_array_view::<String>()
                .map_err(err)?
                .mapv(|s| s.into_bytes()),
        ),
        other => {
            return Err(InferenceError::backend(
                NAME,
                tract_onnx::tract_core::internal::format_err!(
                    "output datatype {other:?} cannot be returned"
                ),
            ));
        }
    })
}

/// Runs `values` through `state`'s plan, each node's outputs sized against `memory` before
/// it runs; the state is reset after a failed run (tract keeps a failed run's symbols, and
/// the next request of another batch size would clash with them).
fn run_bounded(
    state: &mut TypedSimpleState,
    memory: &MemoryBound,
    run: &mut RunSizes,
    values: TVec<TValue>,
) -> Result<TVec<TValue>, InferenceError> {
    let RunSizes {
        alive: sizes,
        planned,
        facts_failed,
    } = run;
    sizes.fill(0);
    planned.keep_if_for(&values);
    let shapes: Option<Vec<Vec<usize>>> = match planned.is_sized() {
        true => None,
        false => Some(values.iter().map(|v| v.shape().to_vec()).collect()),
    };
    let mut shapes = shapes;
    let plan = state.plan().clone();
    let mut live = 0u64;
    // Once a node made more than its typed facts said, the rest is sized from actual inputs.
    let mut concrete = false;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        state.run_plan_with_eval(values, |ctx, op_state, node, inputs| {
            if let Some(shapes) = shapes.take() {
                // The first node: tract has resolved the inputs' symbols.
                memory.size(plan.model(), ctx.symbols, shapes, planned);
            }
            let expected = memory.before(node, ctx.symbols, &inputs, live, concrete, planned)?;
            let outputs = tract_onnx::tract_core::plan::eval(ctx, op_state, node, inputs)?;
            let (now, over) = memory.after(node.id, &outputs, expected, live, sizes);
            live = now;
            concrete |= over;
            Ok::<_, TractError>(outputs)
        })
    }));
    let outcome = match outcome {
        Ok(outcome) => outcome,
        // A panic leaves the state as it was mid-run (a failed run's symbols: the next
        // request failed with a clash, a review's finding): a new one from the same plan.
        Err(panic) => {
            match TypedSimpleState::new(&plan) {
                Ok(fresh) => *state = fresh,
                Err(_) => {
                    let _ = state.reset_turn();
                }
            }
            std::panic::resume_unwind(panic);
        }
    };
    if concrete {
        *facts_failed += 1;
        tracing::debug!("a node made more than its typed facts said: sized from actual inputs");
    }
    outcome.map_err(|e| {
        let _ = state.reset_turn();
        if let Some(unknown) = e.chain().find_map(|c| c.downcast_ref::<SizeUnknown>()) {
            return InferenceError::backend(NAME, unknown.clone());
        }
        match e.chain().find_map(|c| c.downcast_ref::<TooMuchMemory>()) {
            Some(too_much) => InferenceError::WorkingMemory {
                needed: too_much.needed,
                limit: too_much.limit,
            },
            // Inputs whose sizes each fit their declared shape but not one another (one
            // symbol given two values): the caller's to fix, 400 with tract's reason (it
            // names the symbols and their values, no data), not a server error.
            None if e
                .chain()
                .any(|c| c.to_string().starts_with("Clashing resolution")) =>
            {
                let reason = e
                    .chain()
                    .map(|c| c.to_string())
                    .find(|m| m.starts_with("Clashing resolution"))
                    .unwrap_or_default();
                InferenceError::DimensionsDisagree {
                    reason: reason.chars().take(300).collect(),
                }
            }
            None => InferenceError::backend(NAME, e),
        }
    })
}

impl TractBackend {
    fn run(&mut self, values: TVec<TValue>) -> Result<TVec<TValue>, InferenceError> {
        run_bounded(&mut self.state, &self.memory, &mut self.sizes, values)
    }

    /// Runs each row of the batch on the one-row plan and stacks the rows' outputs.
    fn run_row_by_row(&mut self, values: TVec<TValue>) -> Result<TVec<TValue>, InferenceError> {
        let err = |e: TractError| InferenceError::backend(NAME, e);
        let sizes: Vec<usize> = values
            .iter()
            .map(|v| v.shape().first().copied().unwrap_or(0))
            .collect();
        let rows = sizes.first().copied().unwrap_or(0);
        if sizes.iter().any(|&s| s != rows) {
            return Err(InferenceError::InconsistentBatch { sizes });
        }
        if rows == 0 {
            return Err(InferenceError::EmptyBatch);
        }
        if rows == 1 {
            return self.run(values);
        }
        // The rows' outputs are kept until they are stacked, with the stack itself.
        let mut kept = 0u64;
        let mut per_output: Vec<Vec<TValue>> = vec![];
        for r in 0..rows {
            let row: TVec<TValue> = values
                .iter()
                .map(|v| v.slice(0, r, r + 1).map(TValue::from))
                .collect::<Result<_, _>>()
                .map_err(err)?;
            let outputs = self.run(row)?;
            kept = kept.saturating_add(outputs.iter().fold(0u64, |sum, v| {
                sum.saturating_add((v.len() as u64).saturating_mul(v.datum_type().size_of() as u64))
            }));
            let needed = kept.saturating_mul(2);
            if needed > self.memory.limit {
                return Err(InferenceError::WorkingMemory {
                    needed,
                    limit: self.memory.limit,
                });
            }
            per_output.resize_with(outputs.len(), Vec::new);
            for (all, out) in per_output.iter_mut().zip(outputs) {
                all.push(out);
            }
        }
        per_output
            .iter()
            .map(|rows| {
                let rows: Vec<&TractTensor> = rows.iter().map(|v| &**v).collect();
                TractTensor::stack_tensors(0, &rows).map(TValue::from)
            })
            .collect::<Result<_, _>>()
            .map_err(err)
    }
}

impl Backend for TractBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    fn infer(&mut self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, InferenceError> {
        let values: TVec<TValue> = inputs
            .into_iter()
            .map(|t| to_tract(t.tensor))
            .collect::<Result<_, _>>()?;
        let outputs = if self.per_row {
            self.run_row_by_row(values)?
        } else {
            self.run(values)?
        };
        outputs
            .iter()
            .zip(&self.metadata.outputs)
            .map(|(value, spec)| Ok(NamedTensor::new(spec.name.clone(), from_tract(value)?)))
            .collect()
    }

    fn forks_share_the_model(&self) -> bool {
        true
    }

    fn fork(&self) -> Result<Box<dyn Backend>, InferenceError> {
        let state =
            TypedSimpleState::new(&self.plan).map_err(|e| InferenceError::backend(NAME, e))?;
        Ok(Box::new(TractBackend {
            plan: self.plan.clone(),
            state,
            metadata: self.metadata.clone(),
            per_row: self.per_row,
            sizes: RunSizes::new(self.memory.nodes()),
            memory: self.memory.clone(),
        }))
    }

    fn fits_working_memory(&self, shapes: &[Vec<usize>]) -> Option<bool> {
        let model = self.plan.model();
        if !self.per_row {
            return self
                .memory
                .estimate(model, shapes)
                .map(|peak| peak <= self.memory.limit);
        }
        // A row at a time on the one-row plan; the rows' outputs kept, then stacked.
        let rows = shapes.first().and_then(|s| s.first()).copied().unwrap_or(0) as u64;
        let one: Vec<Vec<usize>> = shapes
            .iter()
            .map(|s| {
                s.iter()
                    .enumerate()
                    .map(|(i, &d)| if i == 0 { 1 } else { d })
                    .collect()
            })
            .collect();
        let peak = self.memory.estimate(model, &one)?;
        let outputs = model
            .output_outlets()
            .map(|outlets| {
                outlets.iter().fold(0u64, |sum, o| {
                    let bytes = model.outlet_fact(*o).ok().and_then(|f| {
                        f.shape
                            .as_concrete()
                            .map(|s| (s.iter().product::<usize>() * f.datum_type.size_of()) as u64)
                    });
                    sum.saturating_add(bytes.unwrap_or(0))
                })
            })
            .unwrap_or(0);
        Some(peak.max(outputs.saturating_mul(rows).saturating_mul(2)) <= self.memory.limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(path: &str, kernels: TractKernels) -> TractBackend {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
        let bytes = std::fs::read(&path).unwrap();
        let options = LoadOptions {
            tract_kernels: kernels,
            ..Default::default()
        };
        TractBackend::load_bytes(&bytes, &path, &options).unwrap()
    }

    /// A graph of more nodes than [`MAX_NODES`] is refused before tract plans it (its
    /// optimiser is quadratic in the node count); one at the limit loads.
    #[test]
    fn graphs_over_the_node_limit_are_refused_before_planning() {
        use crate::backend::onnx_guard::MAX_NODES;
        use tract_onnx::pb;
        let chain = |n: usize| {
            let value = |name: &str| pb::ValueInfoProto {
                name: name.into(),
                r#type: Some(pb::TypeProto {
                    value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                        elem_type: pb::tensor_proto::DataType::Float as i32,
                        shape: Some(pb::TensorShapeProto {
                            dim: vec![pb::tensor_shape_proto::Dimension {
                                value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(4)),
                                ..Default::default()
                            }],
                        }),
                    })),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let node = |i: usize| pb::NodeProto {
                op_type: "Identity".into(),
                input: vec![if i == 0 { "x".into() } else { format!("t{i}") }],
                output: vec![if i + 1 == n {
                    "y".into()
                } else {
                    format!("t{}", i + 1)
                }],
                ..Default::default()
            };
            opset17(pb::GraphProto {
                node: (0..n).map(node).collect(),
                input: vec![value("x")],
                output: vec![value("y")],
                ..Default::default()
            })
        };
        let name = Path::new("chain.onnx");
        let err = crate::backend::onnx_guard::check(&chain(MAX_NODES + 1), name).unwrap_err();
        let why = std::error::Error::source(&err).map(|s| s.to_string());
        assert!(
            why.as_deref()
                .is_some_and(|w| w.contains(&format!("{} nodes", MAX_NODES + 1))),
            "{err}: {why:?}"
        );
        crate::backend::onnx_guard::check(&chain(MAX_NODES), name).unwrap();
        let small = TractBackend::load_bytes(&chain(3), name, &LoadOptions::default()).unwrap();
        assert_eq!(small.metadata.inputs[0].shape, vec![4]);
        assert_eq!(
            (
                &small.metadata.inputs[0].name,
                &small.metadata.outputs[0].name
            ),
            (&"x".to_owned(), &"y".to_owned())
        );
    }

    #[test]
    fn cnns_run_row_by_row_on_a_one_row_plan_and_declare_an_open_batch() {
        let cnn = load("tests/data/cnn/small_cnn.onnx", TractKernels::Nightingale);
        assert!(cnn.per_row);
        assert_eq!(cnn.metadata.inputs[0].shape, vec![-1, 1, 70, 70]);
        assert_eq!(cnn.metadata.outputs[0].shape, vec![-1, 8, 1, 1]);
        // tract's own kernels: tract's own symbolic plan.
        let tract = load("tests/data/cnn/small_cnn.onnx", TractKernels::Tract);
        assert!(!tract.per_row);
        assert_eq!(tract.metadata, cnn.metadata);
        // No convolution (a pool alone), or a tabular model: one plan for any batch.
        assert!(!load("tests/data/cnn/maxpool_2x2.onnx", TractKernels::Nightingale).per_row);
        assert!(
            !load(
                "../models/bundles/wdbc-malignancy/1/model.onnx",
                TractKernels::Nightingale
            )
            .per_row
        );
    }

    fn rows(n: usize, row: [f32; 4]) -> Vec<NamedTensor> {
        vec![NamedTensor::new(
            "x",
            Tensor::from_vec(vec![n, 4], row.repeat(n)).unwrap(),
        )]
    }

    fn fp32(out: &[NamedTensor]) -> Vec<f32> {
        match &out[0].tensor {
            Tensor::Fp32(a) => a.iter().copied().collect(),
            other => panic!("{other:?}"),
        }
    }

    /// Models whose tensors grow with a request (fixtures of models/train/make_load_fixtures.py,
    /// whose small answers onnxruntime gives there): the request that would have tract
    /// allocate past the limit is refused before the node (tract aborts the process on an
    /// allocation that cannot be made), and the instance serves the next request, of another
    /// batch size too.
    #[test]
    fn a_request_whose_tensors_would_pass_the_limit_is_refused_before_tract_allocates() {
        let limit = crate::backend::DEFAULT_MAX_WORKING_BYTES;
        // Slice(x, 1:) then a Pad by 2e9 columns: empty at batch 1, 8 GB a row after it.
        let mut pad = load(
            "../models/tests/fixtures/bundles/batch-pad/1/model.onnx",
            TractKernels::Nightingale,
        );
        assert_eq!(
            fp32(&pad.infer(rows(1, [1., 2., 3., 4.])).unwrap()),
            [1., 2., 3., 4.]
        );
        assert_eq!(pad.fits_working_memory(&[vec![1, 4]]), Some(true));
        assert_eq!(pad.fits_working_memory(&[vec![2, 4]]), Some(false));
        match pad.infer(rows(101, [1., 2., 3., 4.])) {
            Err(InferenceError::WorkingMemory { needed, limit: l }) => {
                assert_eq!(l, limit);
                assert!(needed >= 800_000_000_000, "{needed}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            fp32(&pad.infer(rows(1, [5., 6., 7., 8.])).unwrap()),
            [5., 6., 7., 8.]
        );

        // A Range to the request's largest value: 1e12 asks for 4 TB.
        let mut range = load(
            "../models/tests/fixtures/bundles/range-from-input/1/model.onnx",
            TractKernels::Nightingale,
        );
        let x = [0.5, 1., 2., 3.];
        assert_eq!(fp32(&range.infer(rows(1, x)).unwrap()), [6.5, 7., 8., 9.]);
        // Its size is a value: the shapes cannot tell.
        assert_eq!(range.fits_working_memory(&[vec![1, 4]]), None);
        let err = range.infer(rows(1, [1e12, 0., 0., 0.])).unwrap_err();
        assert!(
            matches!(err, InferenceError::WorkingMemory { needed, .. } if needed >= 3_999_000_000_000),
            "{err:?}"
        );
        assert!(err.is_client_error());
        // The failed run left no resolved batch behind: a batch of 3 runs.
        assert_eq!(
            fp32(&range.infer(rows(3, x)).unwrap()),
            [6.5, 7., 8., 9.].repeat(3)
        );
        // The batch Pad inside a Scan body (tract runs bodies with plans of their own).
        let mut scan = load(
            "../models/tests/fixtures/bundles/scan-pad/1/model.onnx",
            TractKernels::Nightingale,
        );
        assert_eq!(
            fp32(&scan.infer(rows(1, [1., 2., 3., 4.])).unwrap()),
            [1., 2., 3., 4.]
        );
        assert_eq!(scan.fits_working_memory(&[vec![101, 4]]), Some(false));
        let err = scan.infer(rows(101, [1., 2., 3., 4.])).unwrap_err();
        assert!(
            matches!(err, InferenceError::WorkingMemory { needed, .. } if needed >= 800_000_000_000),
            "{err:?}"
        );
        // A forked instance has the same limit.
        let mut fork = range.fork().unwrap();
        assert!(matches!(
            fork.infer(rows(2, [1e12, 0., 0., 0.])),
            Err(InferenceError::WorkingMemory { .. })
        ));
    }

    fn load_limited(path: &str, limit: u64) -> Result<TractBackend, InferenceError> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
        let bytes = std::fs::read(&path).unwrap();
        let options = LoadOptions {
            max_working_bytes: limit,
            ..Default::default()
        };
        TractBackend::load_bytes(&bytes, &path, &options)
    }

    /// Red-team findings on the first cut of the bound: a branch (or loop body) whose sizes
    /// depend on values ran unchecked in tract's own plan for it and aborted the server; a
    /// `NonZero`, sized only by running, was counted as 0 and allocated 64 times a checked
    /// tensor; an op's shape rule panicked in the check.
    #[test]
    fn bodies_sized_by_values_are_refused_and_nonzero_is_bounded_before_it_runs() {
        let err = load_limited("../models/tests/fixtures/if-range-pad.onnx", 0).unwrap_err();
        let why = std::error::Error::source(&err).map(|s| s.to_string());
        assert!(
            why.as_deref()
                .is_some_and(|w| w.contains("depend on values")
                    && w.contains("If")
                    && w.contains("ONNX Runtime")),
            "{err}: {why:?}"
        );
        // Range(1, 2^20 + 1) (4 MiB) reshaped to rank 32, then NonZero: [32, 2^20] int64,
        // 256 MiB, over a 64 MiB limit before it is allocated.
        let mut nonzero =
            load_limited("../models/tests/fixtures/nonzero-amplified.onnx", 64 << 20).unwrap();
        let x = [3., 1., 2., 0.5];
        assert_eq!(fp32(&nonzero.infer(rows(1, x)).unwrap()), x);
        match nonzero.infer(rows(1, [1048576., 0., 0., 0.])) {
            Err(InferenceError::WorkingMemory { needed, .. }) => {
                assert!(needed >= 32 * 8 * 1048576, "{needed}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(fp32(&nonzero.infer(rows(2, x)).unwrap()), x.repeat(2));
    }

    /// Re-attack findings: tract's `Resize` holds far more than its output between axes
    /// (164 GB for a 164 MB output aborted the server); a `Range` whose typed fact tract gets
    /// wrong (0 elements where it makes 2e8) passed a 64 MiB limit with 1.6 GB.
    #[test]
    fn resize_scratch_and_wrong_typed_facts_are_bounded() {
        let mut resize = load_limited("../models/tests/fixtures/resize-amplified.onnx", 0).unwrap();
        let x = [3., 1., 2., 0.5];
        assert_eq!(fp32(&resize.infer(rows(1, x)).unwrap()), x);
        match resize.infer(rows(4096, x)) {
            Err(InferenceError::WorkingMemory { needed, .. }) => {
                // [4096 × 10000, 1000] f32 between the axes.
                assert!(needed >= 4096 * 10000 * 1000 * 4, "{needed}")
            }
            other => panic!("{other:?}"),
        }
        let mut range = load_limited("../models/tests/fixtures/ceil-range.onnx", 64 << 20).unwrap();
        let one = vec![NamedTensor::new(
            "x",
            Tensor::from_vec(vec![1, 2], vec![1f32; 2]).unwrap(),
        )];
        match range.infer(one) {
            // Range(0, 2e8) of i64, sized from its actual inputs.
            Err(InferenceError::WorkingMemory { needed, .. }) => {
                assert!(needed >= 1_600_000_000, "{needed}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// Third-pass finding: Nightingale's own convolution keeps an im2col column buffer of
    /// `k` rows by up to 4096 images' points, uncounted (32 GiB with a larger kernel at 4096
    /// rows aborted the server). Here k = 4 × 32 × 32 = 4096 rows: 2048 rows of 1 × 1 images
    /// take 32 MiB of columns, over a 16 MiB limit; one row takes 16 KiB.
    #[test]
    fn the_convolution_column_buffer_is_counted() {
        let mut conv =
            load_limited("../models/tests/fixtures/conv-columns.onnx", 16 << 20).unwrap();
        assert!(
            !conv.per_row,
            "its output is not batch-first: the rows run together"
        );
        let x = |n: usize| {
            vec![NamedTensor::new(
                "x",
                Tensor::from_vec(vec![n, 4], vec![0.25f32; n * 4]).unwrap(),
            )]
        };
        assert_eq!(conv.infer(x(3)).unwrap()[0].tensor.shape(), &[1, 3]);
        match conv.infer(x(2048)) {
            Err(InferenceError::WorkingMemory { needed, .. }) => {
                assert!(needed >= 4096 * 2048 * 4, "{needed}")
            }
            other => panic!("{other:?}"),
        }
        // The batcher's estimate counts it too.
        assert_eq!(conv.fits_working_memory(&[vec![3, 4]]), Some(true));
        assert_eq!(conv.fits_working_memory(&[vec![2048, 4]]), Some(false));
    }

    /// Re-attack finding: the banded path (more than 4096 output points an image) returned
    /// before its thread freed a column buffer over 64 MiB, so each engine thread kept one.
    #[test]
    fn a_large_column_buffer_is_not_kept_after_the_call() {
        let mut conv = load_limited("../models/tests/fixtures/conv-plane.onnx", 0).unwrap();
        let x = Tensor::from_vec(vec![1, 4, 65, 65], vec![0.5f32; 4 * 65 * 65]).unwrap();
        let out = conv.infer(vec![NamedTensor::new("x", x)]).unwrap();
        assert_eq!(out[0].tensor.shape(), &[1, 1, 65, 65]);
        assert!(
            kernels::kept_columns() <= 16 << 20,
            "{}",
            kernels::kept_columns()
        );
    }

    /// The shipped models' runs are sized from their typed facts: none makes more than they
    /// say (which would size every later node from its actual inputs, a slower path).
    #[test]
    fn shipped_models_make_what_their_facts_say() {
        let mut wdbc = load(
            "../models/bundles/wdbc-malignancy/1/model.onnx",
            TractKernels::Nightingale,
        );
        for n in [1, 7, 64] {
            let x = Tensor::from_vec(vec![n, 30], vec![0.5f32; n * 30]).unwrap();
            wdbc.infer(vec![NamedTensor::new("features", x)]).unwrap();
        }
        assert_eq!(wdbc.sizes.facts_failed, 0);
        for kernels in [TractKernels::Nightingale, TractKernels::Tract] {
            let mut cnn = load("tests/data/cnn/small_cnn.onnx", kernels);
            let x = Tensor::from_vec(vec![2, 1, 70, 70], vec![0.5f32; 2 * 70 * 70]).unwrap();
            cnn.infer(vec![NamedTensor::new("x", x)]).unwrap();
            assert_eq!(cnn.sizes.facts_failed, 0, "{kernels:?}");
        }
    }

    #[test]
    fn row_by_row_refuses_an_empty_batch_and_stacks_the_rows() {
        let mut cnn = load("tests/data/cnn/small_cnn.onnx", TractKernels::Nightingale);
        let empty = vec![NamedTensor::new(
            "x",
            Tensor::from_vec(vec![0, 1, 70, 70], Vec::<f32>::new()).unwrap(),
        )];
        assert!(matches!(cnn.infer(empty), Err(InferenceError::EmptyBatch)));
        let two = vec![NamedTensor::new(
            "x",
            Tensor::from_vec(vec![2, 1, 70, 70], vec![0.5f32; 2 * 70 * 70]).unwrap(),
        )];
        let out = cnn.infer(two).unwrap();
        assert_eq!(out[0].tensor.shape(), &[2, 8, 1, 1]);
    }

    /// `a: [N, M]` and `b: [N, M]` (symbolic), `sum = ReduceSum(a, axis 1)` and `y = a + b`.
    fn two_symbolic_inputs() -> Vec<u8> {
        use tract_onnx::pb;
        use tract_onnx::pb::tensor_shape_proto::{Dimension, dimension::Value};
        let value = |name: &str, dims: &[&str]| pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: pb::tensor_proto::DataType::Float as i32,
                    shape: Some(pb::TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|d| Dimension {
                                value: Some(Value::DimParam((*d).into())),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        };
        let node = |op: &str, inputs: &[&str], output: &str| pb::NodeProto {
            op_type: op.into(),
            input: inputs.iter().map(|i| (*i).into()).collect(),
            output: vec![output.into()],
            attribute: match op {
                "ReduceSum" => vec![pb::AttributeProto {
                    name: "keepdims".into(),
                    r#type: pb::attribute_proto::AttributeType::Int as i32,
                    i: 0,
                    ..Default::default()
                }],
                _ => vec![],
            },
            ..Default::default()
        };
        let axes = pb::TensorProto {
            name: "axes".into(),
            dims: vec![1],
            data_type: pb::tensor_proto::DataType::Int64 as i32,
            int64_data: vec![1],
            ..Default::default()
        };
        opset17(pb::GraphProto {
            node: vec![
                node("ReduceSum", &["a", "axes"], "sum"),
                node("Add", &["a", "b"], "y"),
            ],
            initializer: vec![axes],
            input: vec![value("a", &["N", "M"]), value("b", &["N", "M"])],
            output: vec![value("sum", &["N"]), value("y", &["N", "M"])],
            ..Default::default()
        })
    }

    /// `graph` as an ONNX model of opset 17, encoded.
    fn opset17(graph: tract_onnx::pb::GraphProto) -> Vec<u8> {
        use prost::Message;
        tract_onnx::pb::ModelProto {
            ir_version: 8,
            opset_import: vec![tract_onnx::pb::OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            graph: Some(graph),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn ab(a: [usize; 2], b: [usize; 2]) -> Vec<NamedTensor> {
        let t = |s: [usize; 2]| Tensor::from_vec(s.to_vec(), vec![1.0f32; s[0] * s[1]]).unwrap();
        vec![NamedTensor::new("a", t(a)), NamedTensor::new("b", t(b))]
    }

    /// Two inputs whose sizes each fit `[N, M]` but not each other are the caller's error
    /// (400 with tract's reason), not a server error, and the next request runs (a review's
    /// finding: 500 "inference failed" with the reason only in the log).
    #[test]
    fn inputs_whose_symbols_clash_are_a_client_error_and_the_next_request_runs() {
        let model = two_symbolic_inputs();
        let mut backend =
            TractBackend::load_bytes(&model, Path::new("ab.onnx"), &LoadOptions::default())
                .unwrap();
        let err = backend.infer(ab([1, 3], [1, 4])).unwrap_err();
        assert!(
            matches!(&err, InferenceError::DimensionsDisagree { reason } if reason.contains("Clashing")),
            "{err:?}"
        );
        assert!(err.is_client_error());
        let out = backend.infer(ab([2, 3], [2, 3])).unwrap();
        assert_eq!(fp32(&out), [3.0, 3.0]);
        assert_eq!(out[1].tensor.shape(), &[2, 3]);
    }

    /// A panic inside tract (it panicked on a zero-sized dimension, which the worker now
    /// refuses before the engine) leaves the state of the failed run behind: the next
    /// request, another caller's, failed with a clash. The state is made anew.
    #[test]
    fn after_a_panic_in_tract_the_next_request_runs() {
        let model = two_symbolic_inputs();
        let mut backend =
            TractBackend::load_bytes(&model, Path::new("ab.onnx"), &LoadOptions::default())
                .unwrap();
        assert_eq!(fp32(&backend.infer(ab([1, 3], [1, 3])).unwrap()), [3.0]);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            backend.infer(ab([1, 0], [1, 0]))
        }));
        // tract 0.23 panics here; should a later version not, it must at least answer.
        if let Ok(answer) = panicked {
            drop(answer);
        }
        assert_eq!(fp32(&backend.infer(ab([3, 2], [3, 2])).unwrap()), [2.0; 3]);
        assert_eq!(fp32(&backend.infer(ab([1, 3], [1, 3])).unwrap()), [3.0]);
    }

    /// The worker refuses a zero-sized dimension before the engine (400 naming the input),
    /// the batch's own as an empty batch, and serves the next request.
    #[tokio::test]
    async fn the_worker_refuses_a_zero_sized_dimension_before_the_engine() {
        let model = two_symbolic_inputs();
        let backend =
            TractBackend::load_bytes(&model, Path::new("ab.onnx"), &LoadOptions::default())
                .unwrap();
        let worker =
            crate::worker::ModelWorker::spawn(Box::new(backend), Default::default()).unwrap();
        let err = worker.infer(ab([1, 0], [1, 0])).await.unwrap_err();
        assert!(
            matches!(&err, InferenceError::EmptyDimension { name, shape } if name == "a" && shape == &[1, 0]),
            "{err:?}"
        );
        assert!(err.is_client_error());
        let out = worker.infer(ab([1, 3], [1, 3])).await.unwrap();
        assert_eq!(fp32(&out), [3.0]);
    }
}
