//! ONNX-ML operators that tract 0.23 lacks or gets wrong, registered into its ONNX front end.
//!
//! scikit-learn models exported by skl2onnx use them; users bring such models, so Nightingale
//! serves them rather than asking for re-exports. Every operator here is checked against ONNX
//! Runtime's outputs on real skl2onnx exports (`inference/tests/onnx_ml.rs`).
//!
//! - `ArrayFeatureExtractor` (replacing tract's): ONNX Runtime's output shape, which skl2onnx's
//!   exports rely on (`ml_ops/array_feature_extractor.rs`).
//! - `Binarizer`: `1` above the threshold, else `0` (`ml_ops/binarizer.rs`).
//! - `Imputer`: scikit-learn's `SimpleImputer`, NaN or a numeric missing value replaced by the
//!   fitted per-feature values (`ml_ops/imputer.rs`).
//! - `Scan` (replacing tract's): tract's own parser, but the loop state restarts from the
//!   node's inputs on every run, as ONNX specifies; tract carried it over from the previous run,
//!   which made k-nearest-neighbours models answer with the first request's neighbours
//!   (`ml_ops/scan.rs`).
//! - `SVMClassifier` and `SVMRegressor`: scikit-learn's SVC, NuSVC, SVR, NuSVR and OneClassSVM,
//!   with ONNX Runtime's one-vs-one voting and Platt probabilities (`ml_ops/svm.rs`).
//! - `Scaler`: `Y = (X - offset) * scale`, per feature or broadcast. An `Expansion`: rewritten
//!   at load into tract's own `Sub` and `Mul`, which tract then optimises like any other graph.
//! - `TreeEnsembleRegressor` and `TreeEnsembleClassifier` (replacing tract's own classifier):
//!   decision-tree ensembles (gradient boosting, random forests) evaluated with ONNX Runtime's
//!   semantics, including its binary single-score layout, base values and post-transforms.
//!   `ml_ops/tree_ensemble.rs` says what exactly is reproduced and where Nightingale differs.
//! - `ZipMap`: an identity on the dense probability tensor. ONNX's `ZipMap` turns the `[N, C]`
//!   class probabilities into a sequence of `N` maps from class label to probability. tract has
//!   no sequence or map values and KServe v2 has no map datatype, so Nightingale deliberately
//!   serves the probabilities dense: the output keeps ZipMap's name and is FP32 `[N, C]`, its
//!   columns in the order of ZipMap's `classlabels_*` attribute (the classifier's class order).
//!   Clients read column `j` as the probability of the model's `j`-th class label.

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::cast::cast;
use tract_onnx::tract_core::ops::math::{mul, sub};
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops::logic::wire_with_rank_broadcast;

mod array_feature_extractor;
mod binarizer;
mod imputer;
mod scan;
mod svm;
mod tree_ensemble;

/// Adds Nightingale's ONNX-ML operators to a tract ONNX operator register, replacing tract's
/// own `ArrayFeatureExtractor`, `Scan` and `TreeEnsembleClassifier`.
pub fn register_onnx_ml_ops(register: &mut OnnxOpRegister) {
    register.insert(
        "ArrayFeatureExtractor",
        array_feature_extractor::array_feature_extractor,
    );
    register.insert("Binarizer", binarizer::binarizer);
    register.insert("Imputer", imputer::imputer);
    register.insert("Scaler", scaler);
    register.insert("Scan", scan::scan);
    register.insert("SVMClassifier", svm::svm_classifier);
    register.insert("SVMRegressor", svm::svm_regressor);
    register.insert(
        "TreeEnsembleClassifier",
        tree_ensemble::tree_ensemble_classifier,
    );
    register.insert(
        "TreeEnsembleRegressor",
        tree_ensemble::tree_ensemble_regressor,
    );
    register.insert("ZipMap", zip_map);
}

#[derive(Debug, Clone, Hash, PartialEq)]
struct Scaler {
    offset: Vec<u32>,
    scale: Vec<u32>,
}

fn scaler(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let offset: Vec<f32> = node
        .get_attr_opt_vec("offset")?
        .unwrap_or_else(|| vec![0.0]);
    let scale: Vec<f32> = node.get_attr_opt_vec("scale")?.unwrap_or_else(|| vec![1.0]);
    ensure!(
        !offset.is_empty() && !scale.is_empty(),
        "Scaler: offset and scale must not be empty"
    );
    // Stored as bit patterns so the op can derive Hash.
    Ok((
        expand(Scaler {
            offset: offset.iter().map(|f| f.to_bits()).collect(),
            scale: scale.iter().map(|f| f.to_bits()).collect(),
        }),
        vec![],
    ))
}

impl Expansion for Scaler {
    fn name(&self) -> StaticName {
        "Scaler".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
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
        let fact = model.outlet_fact(inputs[0])?.clone();
        let rank = fact.rank();
        ensure!(rank >= 1, "Scaler expects an input of rank 1 or more");
        let features = fact.shape[rank - 1].to_usize().ok();
        for (what, v) in [("offset", &self.offset), ("scale", &self.scale)] {
            if let Some(c) = features {
                ensure!(
                    v.len() == 1 || v.len() == c,
                    "Scaler: {what} has {} values for {c} features",
                    v.len()
                );
            }
        }
        let mut x = inputs[0];
        if fact.datum_type != f32::datum_type() {
            x = model.wire_node(format!("{prefix}.to_f32"), cast(f32::datum_type()), &[x])?[0];
        }
        let constant = |v: &[u32]| -> TractResult<Arc<Tensor>> {
            let floats: Vec<f32> = v.iter().map(|&b| f32::from_bits(b)).collect();
            let mut shape = vec![1usize; rank];
            shape[rank - 1] = floats.len();
            Ok(tensor1(&floats).into_shape(&shape)?.into_arc_tensor())
        };
        let offset = model.add_const(format!("{prefix}.offset"), constant(&self.offset)?)?;
        let scale = model.add_const(format!("{prefix}.scale"), constant(&self.scale)?)?;
        let centred =
            wire_with_rank_broadcast(format!("{prefix}.sub"), model, sub(), &[x, offset])?[0];
        wire_with_rank_broadcast(format!("{prefix}.mul"), model, mul(), &[centred, scale])
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(1)
    }
}

/// `ZipMap`, served as the identity on its dense `[N, C]` FP32 input (see the module docs).
#[derive(Debug, Clone, Hash, PartialEq)]
struct ZipMap {
    /// How many class labels the node names: the width of its input.
    classes: usize,
}

fn zip_map(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let ints = node.get_attr_opt_vec::<i64>("classlabels_int64s")?;
    let strings = node.get_attr_opt_vec::<String>("classlabels_strings")?;
    let classes = match (ints, strings) {
        (Some(v), None) => v.len(),
        (None, Some(v)) => v.len(),
        (None, None) => {
            bail!("ZipMap: one of classlabels_int64s and classlabels_strings is required")
        }
        (Some(_), Some(_)) => {
            bail!("ZipMap: only one of classlabels_int64s and classlabels_strings may be set")
        }
    };
    ensure!(classes > 0, "ZipMap: no class labels");
    Ok((expand(ZipMap { classes }), vec![]))
}

impl Expansion for ZipMap {
    fn name(&self) -> StaticName {
        "ZipMap".into()
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
        s.equals(&inputs[0].rank, 2)?;
        s.equals(&inputs[0].shape[1], self.classes.to_dim())?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        Ok(())
    }

    fn wire(
        &self,
        _prefix: &str,
        _model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        // The dense probabilities are the output; the graph output's name moves onto them.
        Ok(tvec!(inputs[0]))
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(1)
    }
}
