//! `Binarizer` (`ai.onnx.ml`), as ONNX Runtime evaluates it (its `binarizer.cc`); tract 0.23.9
//! parses the node but cannot run it. scikit-learn's `Binarizer`: `1` where `x > threshold`
//! (default 1.0), else `0`, FP32 in and out. A NaN input is an error, as in ONNX Runtime.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

pub(super) fn binarizer(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let threshold: f32 = node.get_attr_opt("threshold")?.unwrap_or(1.0);
    Ok((
        expand(BinarizerNode {
            threshold: threshold.to_bits(),
        }),
        vec![],
    ))
}

/// The threshold is kept as its bit pattern so the op can derive `Hash`.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct BinarizerNode {
    threshold: u32,
}

impl Expansion for BinarizerNode {
    fn name(&self) -> StaticName {
        "Binarizer".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, DatumType::F32)?;
        s.equals(&outputs[0].datum_type, DatumType::F32)?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(
            prefix,
            BinarizerOp {
                threshold: self.threshold,
            },
            &[inputs[0]],
        )
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(1)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct BinarizerOp {
    threshold: u32,
}

impl Op for BinarizerOp {
    fn name(&self) -> StaticName {
        "Binarizer".into()
    }

    op_as_typed_op!();
}

impl EvalOp for BinarizerOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let threshold = f32::from_bits(self.threshold);
        let mut output = input.into_tensor();
        let mut plain = output.try_as_plain_ram_mut()?;
        for (i, v) in plain.as_slice_mut::<f32>()?.iter_mut().enumerate() {
            ensure!(!v.is_nan(), "Binarizer: input value {i} is NaN");
            *v = if *v > threshold { 1.0 } else { 0.0 };
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for BinarizerOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs[0].datum_type == f32::datum_type(),
            "Binarizer takes FP32 input, got {:?}",
            inputs[0].datum_type
        );
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}
