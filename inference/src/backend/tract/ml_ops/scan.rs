//! ONNX `Scan`, parsed by tract's own front end but with its loop state reset on every run.
//!
//! ONNX `Scan` is a pure function: every run starts its state variables from the node's
//! initial-state inputs. tract 0.23.9's ONNX front end builds a `Scan` whose
//! `reset_every_turn` is `false`, tract's mode for streaming models: the state is seeded from
//! the inputs on the *first* run of a model state only and afterwards carried over from the
//! previous run. A model state serves many requests, so the second request computed with the
//! first request's state.
//!
//! skl2onnx's k-nearest-neighbours export (`KNeighborsClassifier`, `KNeighborsRegressor`)
//! passes the scaled input rows through such a state variable and scans the training set, so
//! on tract every request after the first was answered with the neighbours of the *first*
//! request's rows: wrong labels and probabilities off by up to 1, or a panic in `TopK` (NaN
//! distances read from a buffer of another batch size). `tests/onnx_ml.rs` runs every fixture
//! batched and then row by row on the same instance, which is what caught it.
//!
//! The fix: the node is parsed by tract (`tract_onnx::ops::rec::scan::scan`), and once tract
//! has made it a typed `Scan`, `reset_every_turn` is set, which gives ONNX's semantics (and
//! lets tract inline single-iteration scans).

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::scan::Scan;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops::scan::InferenceScan;

pub(super) fn scan(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let (op, closure_inputs) = tract_onnx::ops::rec::scan::scan(ctx, node)?;
    let inner = op
        .as_op()
        .downcast_ref::<InferenceScan>()
        .cloned()
        .ok_or_else(|| format_err!("Scan {:?}: tract did not parse it as a Scan", node.name))?;
    Ok((Box::new(OnnxScan(inner)), closure_inputs))
}

/// tract's `InferenceScan`, made into a typed `Scan` that resets its state on every run.
#[derive(Debug, Clone)]
struct OnnxScan(InferenceScan);

impl PartialEq for OnnxScan {
    fn eq(&self, _other: &Self) -> bool {
        false // as tract's InferenceScan: two scans are never merged
    }
}

impl Eq for OnnxScan {}

impl Op for OnnxScan {
    fn name(&self) -> StaticName {
        "Scan".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        self.0.info()
    }

    not_a_typed_op!();
}

impl EvalOp for OnnxScan {
    not_out_of_plan!();

    // Only reached when an inference (untyped) model is run directly, which Nightingale never
    // does: it always plans the typed model, whose Scan `to_typed` below fixes.
    fn state(&self, ctx: &EvalContext) -> TractResult<Option<Box<dyn OpState>>> {
        self.0.state(ctx)
    }
}

impl InferenceOp for OnnxScan {
    fn infer_facts(
        &mut self,
        inputs: TVec<&InferenceFact>,
        outputs: TVec<&InferenceFact>,
        observed: TVec<&InferenceFact>,
    ) -> TractResult<(
        TVec<InferenceFact>,
        TVec<InferenceFact>,
        TVec<InferenceFact>,
    )> {
        self.0.infer_facts(inputs, outputs, observed)
    }

    fn to_typed(
        &self,
        source: &InferenceModel,
        node: &InferenceNode,
        target: &mut TypedModel,
        mapping: &HashMap<OutletId, OutletId>,
    ) -> TractResult<TVec<OutletId>> {
        let before = target.nodes.len();
        let outlets = self.0.to_typed(source, node, target, mapping)?;
        let mut found = false;
        for id in before..target.nodes.len() {
            if let Some(scan) = target.node_mut(id).op_as_mut::<Scan>() {
                scan.reset_every_turn = true;
                found = true;
            }
        }
        ensure!(found, "Scan {:?}: tract wired no Scan node", node.name);
        Ok(outlets)
    }

    fn nboutputs(&self) -> TractResult<usize> {
        self.0.nboutputs()
    }

    as_op!();
}
