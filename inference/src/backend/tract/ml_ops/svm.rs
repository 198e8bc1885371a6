//! `SVMClassifier` and `SVMRegressor` (`ai.onnx.ml`, opset 1), evaluated the way ONNX Runtime
//! evaluates them. tract 0.23 has neither.
//!
//! skl2onnx writes `SVC`/`NuSVC` as `SVMClassifier` and `SVR`/`NuSVR`/`OneClassSVM` as
//! `SVMRegressor`, always with support vectors (libsvm's layout). What is reproduced (read in
//! ONNX Runtime's `svmclassifier.cc`, `svmregressor.cc`, `svmclassifier.h` and `ml_common.h`):
//!
//! - Kernels: `LINEAR` `x·v`, `POLY` `(gamma x·v + coef0)^degree`, `RBF`
//!   `exp(-gamma |x - v|²)`, `SIGMOID` `tanh(gamma x·v + coef0)`, with `kernel_params` =
//!   `[gamma, coef0, degree]`.
//! - Classifier, one-vs-one: for classes `i < j` (in label order) the pair's score is
//!   `Σ_{v in i} coef[j-1][v] k_v + Σ_{v in j} coef[i][v] k_v + rho[pair]`; the pair votes for
//!   `i` when its score is `> 0`, otherwise for `j`. The label is the first class with the most
//!   votes, with or without probabilities.
//! - Without `prob_a`/`prob_b` the scores output holds the pair scores (`C (C-1) / 2` columns)
//!   after the post-transform; with two classes it is `[-s, s]` (post-transform `NONE`) or
//!   `[1 - s, s]` (any other post-transform, which ONNX Runtime then does not apply).
//! - With `prob_a`/`prob_b` (scikit-learn's `probability=True`): each pair's Platt probability
//!   `1 - logistic(s a + b)`, clamped to `[1e-7, 1 - 1e-7]`, fills the pairwise matrix, and
//!   libsvm's iterative method (Wu, Lin and Weng 2004; at most 100 iterations, stopping at
//!   `0.005 / C`) turns it into `C` class probabilities, then the post-transform.
//! - Without support vectors (`vectors_per_class` empty, liblinear's layout) the scores are
//!   `x·coef[c] + rho[0]` per class and the label is the highest score (with two classes,
//!   ONNX Runtime's rules on the sign and the weights).
//! - Regressor: `Σ coef[v] k_v + rho[0]` (or `x·coef + rho[0]` without support vectors);
//!   `one_class` maps the value to `1` when `> 0`, otherwise `-1`. ONNX Runtime ignores the
//!   regressor's `post_transform`, and so does Nightingale.
//!
//! Dot products and kernel sums are accumulated in f64 and rounded once, as near as f32 allows
//! to the exact value; ONNX Runtime's f32 GEMM rounds differently in the last bits, which is
//! within the conformance tolerance. Each row is computed on its own, so a row gives the same
//! bits alone or in a batch.
//!
//! Where Nightingale differs: malformed models are rejected at load (array lengths that do not
//! match the class, vector and feature counts, unknown kernels, `PROBIT`), where ONNX Runtime
//! would read out of its arrays or pick a default.

use std::fmt;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::cast::cast;
use tract_onnx::tract_hir::internal::*;

use super::tree_ensemble::{Labels, PostTransform, for_each_row, logistic, transform_scores};

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum KernelType {
    Linear,
    Poly,
    Rbf,
    Sigmoid,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Kernel {
    kind: KernelType,
    gamma: f32,
    coef0: f32,
    degree: f32,
}

impl Kernel {
    fn parse(node: &NodeProto) -> TractResult<Kernel> {
        let kind = match node
            .get_attr_opt::<&str>("kernel_type")?
            .unwrap_or("LINEAR")
        {
            "LINEAR" => KernelType::Linear,
            "POLY" => KernelType::Poly,
            "RBF" => KernelType::Rbf,
            "SIGMOID" => KernelType::Sigmoid,
            other => bail!("unknown kernel_type {other:?}"),
        };
        let params: Vec<f32> = node.get_attr_opt_vec("kernel_params")?.unwrap_or_default();
        let (gamma, coef0, degree) = match params.as_slice() {
            [] => (0.0, 0.0, 0.0),
            [g, c, d, ..] => (*g, *c, *d),
            _ => bail!("kernel_params has {} values, expected 3", params.len()),
        };
        Ok(Kernel {
            kind,
            gamma,
            coef0,
            degree,
        })
    }

    /// `k(x, v)` for one input row and one vector of the same length.
    fn eval(&self, x: &[f32], v: &[f32]) -> f32 {
        match self.kind {
            KernelType::Rbf => {
                let d2: f64 = x
                    .iter()
                    .zip(v)
                    .map(|(&a, &b)| {
                        let d = a as f64 - b as f64;
                        d * d
                    })
                    .sum();
                (-self.gamma * d2 as f32).exp()
            }
            KernelType::Linear => dot(x, v),
            KernelType::Poly | KernelType::Sigmoid => {
                let t = (self.gamma as f64 * dot64(x, v) + self.coef0 as f64) as f32;
                if self.kind == KernelType::Sigmoid {
                    t.tanh()
                } else if self.degree == 2.0 {
                    t * t
                } else if self.degree == 3.0 {
                    t * t * t
                } else {
                    t.powf(self.degree)
                }
            }
        }
    }
}

fn dot64(x: &[f32], v: &[f32]) -> f64 {
    x.iter().zip(v).map(|(&a, &b)| a as f64 * b as f64).sum()
}

fn dot(x: &[f32], v: &[f32]) -> f32 {
    dot64(x, v) as f32
}

/// Support vectors (or, in liblinear's layout, one weight row per class), `count` rows of
/// `features` values.
#[derive(Clone, Debug, PartialEq)]
struct Vectors {
    data: Vec<f32>,
    features: usize,
}

impl Vectors {
    fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.features..(i + 1) * self.features]
    }

    fn count(&self) -> usize {
        self.data.len() / self.features
    }
}

fn floats(node: &NodeProto, name: &str) -> TractResult<Vec<f32>> {
    Ok(node.get_attr_opt_vec(name)?.unwrap_or_default())
}

// ---------------------------------------------------------------------------------------------
// SVMClassifier
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum ClassifierMode {
    /// libsvm: support vectors grouped by class, one-vs-one pairs.
    Svc {
        vectors: Vectors,
        /// First support vector of each class, and how many it has.
        starts: Vec<usize>,
        counts: Vec<usize>,
        /// `[C - 1, V]`.
        coefficients: Vec<f32>,
        rho: Vec<f32>,
        /// Platt scaling per pair, when the model has probabilities.
        platt: Option<(Vec<f32>, Vec<f32>)>,
    },
    /// liblinear: one weight row per class and a single intercept.
    Linear { weights: Vectors, rho: f32 },
}

#[derive(Clone, Debug, PartialEq)]
struct Classifier {
    kernel: Kernel,
    labels: Labels,
    mode: ClassifierMode,
    post: PostTransform,
    weights_all_non_negative: bool,
}

impl Classifier {
    fn parse(node: &NodeProto) -> TractResult<Classifier> {
        let ints = node.get_attr_opt_vec::<i64>("classlabels_ints")?;
        let strings = node.get_attr_opt_vec::<String>("classlabels_strings")?;
        let labels = match (ints, strings) {
            (Some(v), None) => Labels::Int(v),
            (None, Some(v)) => Labels::Str(v),
            (None, None) => bail!("one of classlabels_ints and classlabels_strings is required"),
            (Some(_), Some(_)) => {
                bail!("only one of classlabels_ints and classlabels_strings may be set")
            }
        };
        let c = labels.len();
        ensure!(
            c >= 2,
            "a classifier needs at least two class labels, got {c}"
        );
        let kernel = Kernel::parse(node)?;
        let post = PostTransform::parse(node)?;
        let coefficients = floats(node, "coefficients")?;
        ensure!(!coefficients.is_empty(), "coefficients are empty");
        let rho = floats(node, "rho")?;
        let prob_a = floats(node, "prob_a")?;
        let prob_b = floats(node, "prob_b")?;
        ensure!(
            prob_a.len() == prob_b.len(),
            "prob_a has {} values but prob_b {}",
            prob_a.len(),
            prob_b.len()
        );
        let weights_all_non_negative = coefficients.iter().all(|&w| w >= 0.0);
        let per_class: Vec<i64> = node
            .get_attr_opt_vec("vectors_per_class")?
            .unwrap_or_default();
        let counts = per_class
            .iter()
            .map(|&n| usize::try_from(n).map_err(|_| format_err!("vectors_per_class holds {n}")))
            .collect::<TractResult<Vec<usize>>>()?;
        let total: usize = counts.iter().sum();
        let mode = if total > 0 {
            ensure!(
                counts.len() == c,
                "vectors_per_class has {} values for {c} classes",
                counts.len()
            );
            let support = floats(node, "support_vectors")?;
            ensure!(
                !support.is_empty() && support.len() % total == 0,
                "support_vectors has {} values for {total} vectors",
                support.len()
            );
            let pairs = c * (c - 1) / 2;
            ensure!(
                coefficients.len() == (c - 1) * total,
                "coefficients has {} values, expected {} ({} classes, {total} vectors)",
                coefficients.len(),
                (c - 1) * total,
                c
            );
            ensure!(
                rho.len() == pairs,
                "rho has {} values for {pairs} class pairs",
                rho.len()
            );
            ensure!(
                prob_a.is_empty() || prob_a.len() == pairs,
                "prob_a has {} values for {pairs} class pairs",
                prob_a.len()
            );
            let mut starts = Vec::with_capacity(c);
            let mut at = 0;
            for &n in &counts {
                starts.push(at);
                at += n;
            }
            ClassifierMode::Svc {
                vectors: Vectors {
                    features: support.len() / total,
                    data: support,
                },
                starts,
                counts,
                coefficients,
                rho,
                platt: (!prob_a.is_empty()).then_some((prob_a, prob_b)),
            }
        } else {
            ensure!(
                coefficients.len() % c == 0,
                "coefficients has {} values for {c} classes",
                coefficients.len()
            );
            ensure!(!rho.is_empty(), "rho is empty");
            ClassifierMode::Linear {
                weights: Vectors {
                    features: coefficients.len() / c,
                    data: coefficients,
                },
                rho: rho[0],
            }
        };
        Ok(Classifier {
            kernel,
            labels,
            mode,
            post,
            weights_all_non_negative,
        })
    }

    fn features(&self) -> usize {
        match &self.mode {
            ClassifierMode::Svc { vectors, .. } => vectors.features,
            ClassifierMode::Linear { weights, .. } => weights.features,
        }
    }

    /// Columns of the scores output.
    fn score_columns(&self) -> usize {
        let c = self.labels.len();
        match &self.mode {
            ClassifierMode::Svc { platt: None, .. } if c > 2 => c * (c - 1) / 2,
            _ => c,
        }
    }

    /// One row: writes the scores into `out` and returns the winning class index.
    fn row(&self, x: &[f32], kernels: &mut Vec<f32>, votes: &mut [u32], out: &mut [f32]) -> usize {
        let c = self.labels.len();
        match &self.mode {
            ClassifierMode::Linear { weights, rho } => {
                for (k, o) in out.iter_mut().enumerate() {
                    *o = (dot64(x, weights.row(k)) + *rho as f64) as f32;
                }
                // First maximum, as `std::max_element`.
                let mut best = 0;
                for k in 1..c {
                    if out[k] > out[best] {
                        best = k;
                    }
                }
                let max = out[best];
                let winner = if c == 2 {
                    if (self.weights_all_non_negative && max >= 0.5)
                        || (max > 0.0 && !self.weights_all_non_negative)
                    {
                        1
                    } else {
                        best
                    }
                } else {
                    best
                };
                transform_scores(self.post, out);
                winner
            }
            ClassifierMode::Svc {
                vectors,
                starts,
                counts,
                coefficients,
                rho,
                platt,
            } => {
                let total = vectors.count();
                kernels.clear();
                kernels.extend((0..total).map(|v| self.kernel.eval(x, vectors.row(v))));
                votes.fill(0);
                let mut pair_scores = Vec::with_capacity(c * (c - 1) / 2);
                let mut pair = 0;
                for i in 0..c - 1 {
                    for j in i + 1..c {
                        let mut sum = 0f64;
                        let row_j = &coefficients[(j - 1) * total..j * total];
                        for v in starts[i]..starts[i] + counts[i] {
                            sum += (row_j[v] * kernels[v]) as f64;
                        }
                        let row_i = &coefficients[i * total..(i + 1) * total];
                        for v in starts[j]..starts[j] + counts[j] {
                            sum += (row_i[v] * kernels[v]) as f64;
                        }
                        sum += rho[pair] as f64;
                        pair += 1;
                        pair_scores.push(sum as f32);
                        votes[if sum > 0.0 { i } else { j }] += 1;
                    }
                }
                let mut winner = 0;
                for k in 1..c {
                    if votes[k] > votes[winner] {
                        winner = k;
                    }
                }
                match platt {
                    Some((a, b)) => {
                        let mut r = vec![0f32; c * c];
                        let mut index = 0;
                        for i in 0..c - 1 {
                            for j in i + 1..c {
                                let p = 1.0 - logistic(pair_scores[index] * a[index] + b[index]);
                                let p = p.clamp(1.0e-7, 1.0 - 1.0e-7);
                                r[i * c + j] = p;
                                r[j * c + i] = 1.0 - p;
                                index += 1;
                            }
                        }
                        multiclass_probability(c, &r, out);
                        transform_scores(self.post, out);
                    }
                    None if c == 2 => {
                        let s = pair_scores[0];
                        if self.post == PostTransform::None {
                            out[0] = -s;
                        } else {
                            out[0] = 1.0 - s;
                        }
                        out[1] = s;
                    }
                    None => {
                        out.copy_from_slice(&pair_scores);
                        transform_scores(self.post, out);
                    }
                }
                winner
            }
        }
    }

    fn eval(&self, input: &TValue) -> TractResult<(Tensor, Tensor)> {
        check_features(self.features(), input)?;
        let width = self.score_columns();
        let rows = input.shape()[0];
        let mut scores = vec![0f32; rows * width];
        let mut winners = Vec::with_capacity(rows);
        let mut kernels = Vec::new();
        let mut votes = vec![0u32; self.labels.len()];
        for_each_row(input, |r, row| {
            let out = &mut scores[r * width..(r + 1) * width];
            winners.push(self.row(row, &mut kernels, &mut votes, out));
            Ok(())
        })?;
        Ok((
            self.labels.pick(&winners),
            Tensor::from_shape(&[rows, width], &scores)?,
        ))
    }
}

/// libsvm's pairwise coupling (`multiclass_probability`, method 2 of Wu, Lin and Weng), in f32
/// and in ONNX Runtime's operation order: `r[i * c + j]` is P(i | i or j); writes `p`.
fn multiclass_probability(c: usize, r: &[f32], p: &mut [f32]) {
    let mut q = vec![0f32; c * c];
    let mut qp = vec![0f32; c];
    let eps = 0.005f32 / c as f32;
    for i in 0..c {
        p[i] = 1.0 / c as f32;
        for j in 0..i {
            q[i * c + i] += r[j * c + i] * r[j * c + i];
            q[i * c + j] = q[j * c + i];
        }
        for j in i + 1..c {
            q[i * c + i] += r[j * c + i] * r[j * c + i];
            q[i * c + j] = -r[j * c + i] * r[i * c + j];
        }
    }
    for _ in 0..100 {
        let mut pqp = 0f32;
        for i in 0..c {
            qp[i] = 0.0;
            for j in 0..c {
                qp[i] += q[i * c + j] * p[j];
            }
            pqp += p[i] * qp[i];
        }
        let mut max_error = 0f32;
        for &v in qp.iter() {
            let error = (v - pqp).abs();
            if error > max_error {
                max_error = error;
            }
        }
        if max_error < eps {
            break;
        }
        for i in 0..c {
            let diff = (-qp[i] + pqp) / q[i * c + i];
            p[i] += diff;
            pqp = (pqp + diff * (diff * q[i * c + i] + 2.0 * qp[i])) / (1.0 + diff) / (1.0 + diff);
            for j in 0..c {
                qp[j] = (qp[j] + diff * q[i * c + j]) / (1.0 + diff);
                p[j] /= 1.0 + diff;
            }
        }
    }
}

fn check_features(features: usize, input: &TValue) -> TractResult<()> {
    ensure!(
        input.rank() == 2 && input.shape()[1] == features,
        "the model expects [N, {features}] inputs, got shape {:?}",
        input.shape()
    );
    Ok(())
}

fn wire_input(
    prefix: &str,
    model: &mut TypedModel,
    input: OutletId,
    features: usize,
) -> TractResult<OutletId> {
    let fact = model.outlet_fact(input)?.clone();
    ensure!(
        fact.rank() == 2,
        "SVMs take a 2-D input [N, features], got rank {}",
        fact.rank()
    );
    if let Ok(f) = fact.shape[1].to_usize() {
        ensure!(
            f == features,
            "the model has {features} features but the input has {f}"
        );
    }
    if fact.datum_type == f32::datum_type() {
        Ok(input)
    } else {
        Ok(model.wire_node(
            format!("{prefix}.to_f32"),
            cast(f32::datum_type()),
            &[input],
        )?[0])
    }
}

#[derive(Clone, Debug)]
struct ClassifierNode(Arc<Classifier>);

pub(super) fn svm_classifier(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let classifier =
        Classifier::parse(node).with_context(|| format!("SVMClassifier {:?}", node.name))?;
    Ok((expand(ClassifierNode(Arc::new(classifier))), vec![]))
}

impl Expansion for ClassifierNode {
    fn name(&self) -> StaticName {
        "SVMClassifier".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 2)?;
        s.equals(&inputs[0].rank, 2)?;
        s.equals(&outputs[0].datum_type, self.0.labels.datum_type())?;
        s.equals(&outputs[1].datum_type, DatumType::F32)?;
        s.equals(&outputs[0].rank, 1)?;
        s.equals(&outputs[1].rank, 2)?;
        s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
        s.equals(&outputs[1].shape[0], &inputs[0].shape[0])?;
        s.equals(&outputs[1].shape[1], self.0.score_columns().to_dim())?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let x = wire_input(prefix, model, inputs[0], self.0.features())?;
        model.wire_node(prefix, ClassifierOp(self.0.clone()), &[x])
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(2)
    }
}

/// Evaluates a [`Classifier`]: f32 `[N, F]` in, labels `[N]` and scores out.
#[derive(Clone)]
struct ClassifierOp(Arc<Classifier>);

impl fmt::Debug for ClassifierOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SVMClassifier({:?}, {} classes)",
            self.0.kernel.kind,
            self.0.labels.len()
        )
    }
}

impl PartialEq for ClassifierOp {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl Eq for ClassifierOp {}

impl Op for ClassifierOp {
    fn name(&self) -> StaticName {
        "SVMClassifier".into()
    }

    op_as_typed_op!();
}

impl EvalOp for ClassifierOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let (labels, scores) = self.0.eval(&input)?;
        Ok(tvec!(labels.into_tvalue(), scores.into_tvalue()))
    }
}

impl TypedOp for ClassifierOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let n = inputs[0].shape[0].clone();
        Ok(tvec!(
            TypedFact::dt_shape(self.0.labels.datum_type(), tvec!(n.clone())),
            TypedFact::dt_shape(f32::datum_type(), tvec!(n, self.0.score_columns().to_dim())),
        ))
    }

    as_op!();
}

// ---------------------------------------------------------------------------------------------
// SVMRegressor
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
struct Regressor {
    kernel: Kernel,
    /// Support vectors, or `None` in liblinear's layout (`coefficients` are then the weights).
    vectors: Option<Vectors>,
    coefficients: Vec<f32>,
    rho: f32,
    one_class: bool,
}

impl Regressor {
    fn parse(node: &NodeProto) -> TractResult<Regressor> {
        let kernel = Kernel::parse(node)?;
        // ONNX Runtime reads but never applies the regressor's post_transform; refuse
        // anything a model could expect to be applied.
        let post = node
            .get_attr_opt::<&str>("post_transform")?
            .unwrap_or("NONE");
        ensure!(
            post == "NONE",
            "post_transform {post:?} is not supported on SVMRegressor"
        );
        let n_supports: i64 = node.get_attr_opt("n_supports")?.unwrap_or(0);
        let n_supports =
            usize::try_from(n_supports).map_err(|_| format_err!("n_supports is {n_supports}"))?;
        let coefficients = floats(node, "coefficients")?;
        ensure!(!coefficients.is_empty(), "coefficients are empty");
        let rho = floats(node, "rho")?;
        ensure!(!rho.is_empty(), "rho is empty");
        let one_class = node.get_attr_opt::<i64>("one_class")?.unwrap_or(0) != 0;
        let vectors = if n_supports > 0 {
            let support = floats(node, "support_vectors")?;
            ensure!(
                !support.is_empty() && support.len() % n_supports == 0,
                "support_vectors has {} values for {n_supports} vectors",
                support.len()
            );
            ensure!(
                coefficients.len() == n_supports,
                "coefficients has {} values for {n_supports} vectors",
                coefficients.len()
            );
            Some(Vectors {
                features: support.len() / n_supports,
                data: support,
            })
        } else {
            None
        };
        Ok(Regressor {
            kernel,
            vectors,
            coefficients,
            rho: rho[0],
            one_class,
        })
    }

    fn features(&self) -> usize {
        match &self.vectors {
            Some(v) => v.features,
            None => self.coefficients.len(),
        }
    }

    fn row(&self, x: &[f32]) -> f32 {
        let value = match &self.vectors {
            Some(vectors) => {
                let mut sum = 0f64;
                for (v, &coef) in self.coefficients.iter().enumerate() {
                    sum += (coef * self.kernel.eval(x, vectors.row(v))) as f64;
                }
                (sum + self.rho as f64) as f32
            }
            None => (dot64(x, &self.coefficients) + self.rho as f64) as f32,
        };
        if self.one_class {
            if value > 0.0 { 1.0 } else { -1.0 }
        } else {
            value
        }
    }

    fn eval(&self, input: &TValue) -> TractResult<Tensor> {
        check_features(self.features(), input)?;
        let rows = input.shape()[0];
        let mut out = vec![0f32; rows];
        for_each_row(input, |r, row| {
            out[r] = self.row(row);
            Ok(())
        })?;
        Tensor::from_shape(&[rows, 1], &out)
    }
}

#[derive(Clone, Debug)]
struct RegressorNode(Arc<Regressor>);

pub(super) fn svm_regressor(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let regressor =
        Regressor::parse(node).with_context(|| format!("SVMRegressor {:?}", node.name))?;
    Ok((expand(RegressorNode(Arc::new(regressor))), vec![]))
}

impl Expansion for RegressorNode {
    fn name(&self) -> StaticName {
        "SVMRegressor".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].rank, 2)?;
        s.equals(&outputs[0].datum_type, DatumType::F32)?;
        s.equals(&outputs[0].rank, 2)?;
        s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
        s.equals(&outputs[0].shape[1], 1.to_dim())?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let x = wire_input(prefix, model, inputs[0], self.0.features())?;
        model.wire_node(prefix, RegressorOp(self.0.clone()), &[x])
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(1)
    }
}

/// Evaluates a [`Regressor`]: f32 `[N, F]` in, f32 `[N, 1]` out.
#[derive(Clone)]
struct RegressorOp(Arc<Regressor>);

impl fmt::Debug for RegressorOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SVMRegressor({:?}, {} coefficients)",
            self.0.kernel.kind,
            self.0.coefficients.len()
        )
    }
}

impl PartialEq for RegressorOp {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl Eq for RegressorOp {}

impl Op for RegressorOp {
    fn name(&self) -> StaticName {
        "SVMRegressor".into()
    }

    op_as_typed_op!();
}

impl EvalOp for RegressorOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        Ok(tvec!(self.0.eval(&input)?.into_tvalue()))
    }
}

impl TypedOp for RegressorOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let n = inputs[0].shape[0].clone();
        Ok(tvec!(TypedFact::dt_shape(
            f32::datum_type(),
            tvec!(n, 1.to_dim())
        )))
    }

    as_op!();
}
