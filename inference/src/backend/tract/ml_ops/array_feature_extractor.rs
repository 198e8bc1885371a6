//! `ArrayFeatureExtractor` (`ai.onnx.ml`) with ONNX Runtime's output shape.
//!
//! The operator picks, on the last axis of `X`, the positions listed in `Y`. ONNX Runtime (its
//! `array_feature_extractor.cc`, which skl2onnx's exports are written against) treats `Y` as a
//! flat list of `n` indices: the output is `X`'s shape with the last axis replaced by `n`, and
//! `[1, n]` for a 1-D `X`. tract 0.23.9 wires a `Gather`, whose output is `X.shape[..-1] ++
//! Y.shape`: for the scalar indices skl2onnx writes when it splits one-vs-one SVM scores
//! (`SVC` without probabilities, more than two classes) that drops the axis (`[N]` instead of
//! `[N, 1]`) and the next `Concat(axis = 1)` fails to load; for 2-D indices it adds one.
//!
//! Here `Y` is flattened first (a scalar becomes `[1]`), then gathered on the last axis of `X`,
//! and a 1-D `X` gets ONNX Runtime's leading axis of 1. Out-of-range indices are an error, as
//! in ONNX Runtime (which, unlike tract's `Gather`, does not wrap negative ones; Nightingale
//! refuses them).

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::array::Gather;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_hir::internal::*;

pub(super) fn array_feature_extractor(
    _ctx: &ParsingContext,
    _node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expand(ArrayFeatureExtractor), vec![]))
}

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct ArrayFeatureExtractor;

impl Expansion for ArrayFeatureExtractor {
    fn name(&self) -> StaticName {
        "ArrayFeatureExtractor".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 2)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        s.equals(&inputs[1].datum_type, i64::datum_type())?;
        s.given_2(
            &inputs[0].shape,
            &inputs[1].shape,
            move |s, data_shape, indices_shape| {
                ensure!(
                    !data_shape.is_empty(),
                    "ArrayFeatureExtractor: X must have at least one axis"
                );
                let count = indices_shape.iter().product::<TDim>();
                let mut shape: TVec<TDim> = if data_shape.len() == 1 {
                    tvec!(1.to_dim())
                } else {
                    data_shape[..data_shape.len() - 1].into()
                };
                shape.push(count);
                s.equals(&outputs[0].shape, shape)
            },
        )
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let data = model.outlet_fact(inputs[0])?.clone();
        let indices = model.outlet_fact(inputs[1])?.clone();
        ensure!(
            data.rank() >= 1,
            "ArrayFeatureExtractor: X must have at least one axis"
        );
        if let Some(konst) = &indices.konst {
            let stride = data.shape[data.rank() - 1].to_i64().ok();
            for &i in konst
                .cast_to::<i64>()?
                .try_as_plain_ram()?
                .as_slice::<i64>()?
            {
                ensure!(
                    i >= 0 && stride.is_none_or(|s| i < s),
                    "ArrayFeatureExtractor: index {i} is out of range for {:?}",
                    data.shape
                );
            }
        }
        let flat_indices = match indices.rank() {
            0 => model.wire_node(format!("{prefix}.flatten"), AxisOp::Add(0), &[inputs[1]])?[0],
            1 => inputs[1],
            _ => {
                let from: TVec<TDim> = indices.shape.iter().cloned().collect();
                let volume = from.iter().product::<TDim>();
                model.wire_node(
                    format!("{prefix}.flatten"),
                    AxisOp::Reshape(0, from, tvec!(volume)),
                    &[inputs[1]],
                )?[0]
            }
        };
        let gather = Gather {
            axis: data.rank() - 1,
            output_type: None,
        };
        let picked = model.wire_node(prefix, gather, &[inputs[0], flat_indices])?[0];
        if data.rank() == 1 {
            model.wire_node(format!("{prefix}.as_row"), AxisOp::Add(0), &[picked])
        } else {
            Ok(tvec!(picked))
        }
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(1)
    }
}
