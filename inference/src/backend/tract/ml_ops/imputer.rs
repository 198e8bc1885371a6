//! `Imputer` (`ai.onnx.ml`, opset 1), as ONNX Runtime evaluates it (its `imputer.cc`); tract
//! 0.23 has none. skl2onnx writes every `SimpleImputer` (mean, median, most frequent, constant)
//! as one `Imputer` whose `imputed_value_floats` already hold the fitted statistics.
//!
//! A value is replaced when it equals `replaced_value_float` (`replaced_value_int64` for INT64
//! inputs), or when both it and the replaced value are NaN (scikit-learn's default
//! `missing_values=np.nan`). The imputed values are one per feature (the last axis) or a single
//! value for all. Everything else passes through unchanged, bit for bit.
//!
//! Where Nightingale differs: ONNX Runtime silently uses the first imputed value when their
//! count is neither 1 nor the feature count; Nightingale refuses such a model at load (when the
//! feature count is known) or the input at run time.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

#[derive(Clone, Debug, PartialEq)]
enum Values {
    /// Replaced value and imputed values for f32 inputs (bit patterns, so the op can hash).
    F32 {
        replaced: u32,
        imputed: Vec<u32>,
    },
    I64 {
        replaced: i64,
        imputed: Vec<i64>,
    },
}

impl Values {
    fn len(&self) -> usize {
        match self {
            Values::F32 { imputed, .. } => imputed.len(),
            Values::I64 { imputed, .. } => imputed.len(),
        }
    }

    fn datum_type(&self) -> DatumType {
        match self {
            Values::F32 { .. } => f32::datum_type(),
            Values::I64 { .. } => i64::datum_type(),
        }
    }
}

pub(super) fn imputer(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let floats: Option<Vec<f32>> = node.get_attr_opt_vec("imputed_value_floats")?;
    let ints: Option<Vec<i64>> = node.get_attr_opt_vec("imputed_value_int64s")?;
    let values = match (floats, ints) {
        (Some(f), None) if !f.is_empty() => Values::F32 {
            replaced: node
                .get_attr_opt::<f32>("replaced_value_float")?
                .unwrap_or(0.0)
                .to_bits(),
            imputed: f.iter().map(|v| v.to_bits()).collect(),
        },
        (None, Some(i)) if !i.is_empty() => Values::I64 {
            replaced: node
                .get_attr_opt::<i64>("replaced_value_int64")?
                .unwrap_or(0),
            imputed: i,
        },
        _ => bail!(
            "Imputer {:?}: exactly one of imputed_value_floats and imputed_value_int64s must be \
             set and not empty",
            node.name
        ),
    };
    Ok((expand(ImputerNode(values)), vec![]))
}

/// The parsed node (an `Expansion` into [`ImputerOp`]).
#[derive(Clone, Debug, PartialEq)]
struct ImputerNode(Values);

impl Expansion for ImputerNode {
    fn name(&self) -> StaticName {
        "Imputer".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, self.0.datum_type())?;
        s.equals(&outputs[0].datum_type, self.0.datum_type())?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, ImputerOp(self.0.clone()), &[inputs[0]])
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(1)
    }
}

/// Replaces the missing values of its input.
#[derive(Clone, Debug, PartialEq)]
struct ImputerOp(Values);

impl Eq for ImputerOp {}

impl ImputerOp {
    fn check_width(&self, shape: &[usize]) -> TractResult<()> {
        ensure!(
            (1..=2).contains(&shape.len()),
            "Imputer takes inputs of rank 1 or 2, got shape {shape:?}"
        );
        let width = shape[shape.len() - 1];
        let n = self.0.len();
        ensure!(
            n == 1 || n == width,
            "Imputer has {n} imputed values but the input has {width} features"
        );
        Ok(())
    }
}

impl Op for ImputerOp {
    fn name(&self) -> StaticName {
        "Imputer".into()
    }

    op_as_typed_op!();
}

impl EvalOp for ImputerOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        self.check_width(input.shape())?;
        let width = input.shape()[input.rank() - 1].max(1);
        let mut output = input.into_tensor();
        let mut plain = output.try_as_plain_ram_mut()?;
        self.replace(&mut plain, width)?;
        Ok(tvec!(output.into_tvalue()))
    }
}

impl ImputerOp {
    /// Replaces the missing values in place; `width` is the length of the last axis.
    fn replace(&self, plain: &mut PlainViewMut<'_>, width: usize) -> TractResult<()> {
        match &self.0 {
            Values::F32 { replaced, imputed } => {
                let replaced = f32::from_bits(*replaced);
                for (i, v) in plain.as_slice_mut::<f32>()?.iter_mut().enumerate() {
                    if (v.is_nan() && replaced.is_nan()) || *v == replaced {
                        *v =
                            f32::from_bits(imputed[if imputed.len() == 1 { 0 } else { i % width }]);
                    }
                }
            }
            Values::I64 { replaced, imputed } => {
                for (i, v) in plain.as_slice_mut::<i64>()?.iter_mut().enumerate() {
                    if *v == *replaced {
                        *v = imputed[if imputed.len() == 1 { 0 } else { i % width }];
                    }
                }
            }
        }
        Ok(())
    }
}

impl TypedOp for ImputerOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let fact = inputs[0];
        ensure!(
            fact.datum_type == self.0.datum_type(),
            "Imputer with {:?} values got a {:?} input",
            self.0.datum_type(),
            fact.datum_type
        );
        ensure!(
            (1..=2).contains(&fact.rank()),
            "Imputer takes inputs of rank 1 or 2, got rank {}",
            fact.rank()
        );
        if let Ok(width) = fact.shape[fact.rank() - 1].to_usize() {
            let n = self.0.len();
            ensure!(
                n == 1 || n == width,
                "Imputer has {n} imputed values but the input has {width} features"
            );
        }
        Ok(tvec!(fact.datum_type.fact(fact.shape.clone())))
    }

    as_op!();
}
