//! `TreeEnsembleClassifier` and `TreeEnsembleRegressor` (`ai.onnx.ml`, opsets 1 and 3),
//! evaluated the way ONNX Runtime evaluates them.
//!
//! Nightingale replaces tract's own `TreeEnsembleClassifier` rather than building on it:
//! - tract 0.23 rejects `base_values` of length 1 for two classes, which is what skl2onnx writes
//!   for every binary `GradientBoostingClassifier`;
//! - its binary layout rule and its post-processing (tract's approximate `Sigmoid`, argmax over
//!   transformed scores) differ from ONNX Runtime's, which is the reference users compare with;
//! - tract's tree evaluator starts MIN/MAX aggregation from 0 rather than from the first vote,
//!   divides AVERAGE by the number of votes rather than of trees, and reads `BRANCH_GTE` nodes
//!   as leaves (its `Cmp::try_from` accepts 1..=5 while `GreaterEqual` is 6);
//! - it has no `TreeEnsembleRegressor` at all, and its attribute parser (`parse_nodes_data`) is
//!   private to tract-onnx.
//!
//! So the attributes are parsed here into a small flat forest, and one tract `TypedOp` per
//! operator evaluates it row by row. Each row is computed independently and always in the
//! same order (trees in model order, votes sorted by tree and node id), so a row gives the
//! same bits whether it runs alone or in a batch.
//!
//! ONNX Runtime's behaviour that is reproduced, including its quirks (read in its
//! `tree_ensemble_aggregator.h` and `ml_common.h`; `tests/onnx_ml.rs` checks skl2onnx exports
//! and hand-built ensembles (`te_*`: NaN routing, every aggregate, one and two targets, the
//! base-value lengths and post-transforms, binary and multi-class) against onnxruntime's
//! outputs, which `models/train/make_op_fixtures.py` regenerates):
//! - Trees are the runs of equal `nodes_treeids` in attribute order; a tree's root is its first
//!   listed node. Votes on a leaf are summed in (tree id, node id, attribute index) order; votes
//!   on branch nodes are ignored; a leaf without a vote is an error.
//! - A branch goes to its true child when the comparison holds, or when the feature is NaN and
//!   `nodes_missing_value_tracks_true` is set (so NaN takes the true branch of `BRANCH_NEQ`).
//! - Regressor, one target: each tree adds the *first* vote of its leaf; `base_values[0]` (when
//!   it is the only base value) is added after aggregation. More targets: `base_values` are
//!   added per target, but a target no tree voted for is 0, base value or not. AVERAGE
//!   divides by the number of trees.
//! - Classifier with more than two classes: base values are added, the label is the first
//!   class with the highest raw score among classes that received a vote or a base value, and
//!   the post-transform applies to every class score (classes without a score count as 0).
//! - Classifier with two classes where every vote is for one class id (the "binary case", how
//!   skl2onnx writes binary gradient boosting and random forests): a single score `s` (plus
//!   `base_values[0]` when there is one base value) becomes the row `[1 - s, s]` when all
//!   weights are non-negative (random forests: `s` is already the positive-class probability;
//!   with `LOGISTIC`, `[1 - sigmoid(s), sigmoid(s)]`; the label is positive when `s > 0.5`), or
//!   `[sigmoid(-s), sigmoid(s)]` with `LOGISTIC` and `[-s, s]` otherwise when some weights are
//!   negative (gradient boosting; the label is positive when `s > 0`). The positive label is
//!   `class_labels[1]`. If the votes are all for class 1 instead, both class scores are
//!   transformed as for more classes, class 0 reading 0.
//!
//! Where Nightingale deliberately differs from ONNX Runtime:
//! - Two classes with votes for both class ids and integer labels: ONNX Runtime answers the
//!   literal labels `1`/`0` whatever `classlabels_int64s` holds; Nightingale answers
//!   `class_labels[1]`/`class_labels[0]` (the same for the usual labels `[0, 1]`).
//! - Where ONNX Runtime leaves an output value unwritten (two classes, votes for both ids, one
//!   base value, and a row whose trees only voted for class 0) the second column is 0.
//! - Malformed models that ONNX Runtime accepts silently are rejected at load: unknown node
//!   modes or transforms, base values of the wrong length, out-of-range class or target ids,
//!   cycles. `PROBIT` and the double-precision `*_as_tensor` attributes are not supported; the
//!   regressor supports `post_transform` `NONE` only. Inputs of other types are cast to f32.

use std::collections::{HashMap, VecDeque};
use std::fmt;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::cast::cast;
use tract_onnx::tract_hir::internal::*;

// ---------------------------------------------------------------------------------------------
// The forest
// ---------------------------------------------------------------------------------------------

/// How a branch compares the feature with its threshold.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Rule {
    Leq,
    Lt,
    Gte,
    Gt,
    Eq,
    Neq,
}

impl Rule {
    fn parse(mode: &str) -> TractResult<Option<Rule>> {
        Ok(Some(match mode {
            "BRANCH_LEQ" => Rule::Leq,
            "BRANCH_LT" => Rule::Lt,
            "BRANCH_GTE" => Rule::Gte,
            "BRANCH_GT" => Rule::Gt,
            "BRANCH_EQ" => Rule::Eq,
            "BRANCH_NEQ" => Rule::Neq,
            "LEAF" => return Ok(None),
            other => bail!("unknown node mode {other:?}"),
        }))
    }

    #[inline]
    fn holds(self, x: f32, threshold: f32) -> bool {
        match self {
            Rule::Leq => x <= threshold,
            Rule::Lt => x < threshold,
            Rule::Gte => x >= threshold,
            Rule::Gt => x > threshold,
            Rule::Eq => x == threshold,
            Rule::Neq => x != threshold,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Node {
    Branch {
        feature: usize,
        threshold: f32,
        rule: Rule,
        missing_true: bool,
        on_true: usize,
        on_false: usize,
    },
    /// The leaf's votes are `Forest::votes[first..first + count]`.
    Leaf { first: usize, count: usize },
}

/// One leaf vote: the class (or target) index and its weight.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Vote {
    to: usize,
    weight: f32,
}

#[derive(Clone, Debug, PartialEq)]
struct Forest {
    nodes: Vec<Node>,
    /// Index in `nodes` of each tree's root, in evaluation order.
    roots: Vec<usize>,
    votes: Vec<Vote>,
    /// Rows need more features than this.
    max_feature: usize,
    /// Every vote weight, including those ignored on branch nodes, is non-negative.
    weights_all_non_negative: bool,
    /// The distinct class (or target) ids the votes name.
    distinct_ids: usize,
}

impl Forest {
    /// The votes of the leaf `row` reaches in the tree rooted at `root`.
    #[inline]
    fn leaf_votes(&self, root: usize, row: &[f32]) -> &[Vote] {
        let mut ix = root;
        loop {
            match self.nodes[ix] {
                Node::Branch {
                    feature,
                    threshold,
                    rule,
                    missing_true,
                    on_true,
                    on_false,
                } => {
                    let x = row[feature];
                    ix = if rule.holds(x, threshold) || (missing_true && x.is_nan()) {
                        on_true
                    } else {
                        on_false
                    };
                }
                Node::Leaf { first, count } => return &self.votes[first..first + count],
            }
        }
    }
}

/// Reads a required list attribute and checks its length.
fn ints<'a>(node: &'a NodeProto, name: &str, len: Option<usize>) -> TractResult<&'a [i64]> {
    let v = node.get_attr_slice::<i64>(name)?;
    if let Some(n) = len {
        ensure!(
            v.len() == n,
            "attribute {name} has {} values, expected {n}",
            v.len()
        );
    }
    Ok(v)
}

fn floats<'a>(node: &'a NodeProto, name: &str, len: usize) -> TractResult<&'a [f32]> {
    let v = node.get_attr_slice::<f32>(name)?;
    ensure!(
        v.len() == len,
        "attribute {name} has {} values, expected {len}",
        v.len()
    );
    Ok(v)
}

fn index(v: i64, what: &str) -> TractResult<usize> {
    usize::try_from(v).map_err(|_| format_err!("{what} {v} is negative"))
}

/// Parses the `nodes_*` attributes and the `{prefix}_*` leaf votes (`class` for the
/// classifier, `target` for the regressor) into a [`Forest`] whose votes name ids below
/// `n_outputs`.
fn parse_forest(node: &NodeProto, prefix: &str, n_outputs: usize) -> TractResult<Forest> {
    for attr in [
        "base_values_as_tensor".to_string(),
        "nodes_values_as_tensor".to_string(),
        "nodes_hitrates_as_tensor".to_string(),
        format!("{prefix}_weights_as_tensor"),
    ] {
        ensure!(
            !node.attribute.iter().any(|a| a.name == attr),
            "attribute {attr} (double-precision trees) is not supported"
        );
    }

    let tree_ids = ints(node, "nodes_treeids", None)?;
    let n = tree_ids.len();
    ensure!(n > 0, "the ensemble has no nodes");
    let node_ids = ints(node, "nodes_nodeids", Some(n))?;
    let feature_ids = ints(node, "nodes_featureids", Some(n))?;
    let true_ids = ints(node, "nodes_truenodeids", Some(n))?;
    let false_ids = ints(node, "nodes_falsenodeids", Some(n))?;
    let values = floats(node, "nodes_values", n)?;
    let modes: TVec<&str> = node.get_attr_tvec("nodes_modes")?;
    ensure!(
        modes.len() == n,
        "attribute nodes_modes has {} values, expected {n}",
        modes.len()
    );
    let missing: &[i64] = node
        .get_attr_opt_slice("nodes_missing_value_tracks_true")?
        .unwrap_or(&[]);
    ensure!(
        missing.len() <= n,
        "attribute nodes_missing_value_tracks_true has {} values for {n} nodes",
        missing.len()
    );

    let mut by_id: HashMap<(i64, i64), usize> = HashMap::with_capacity(n);
    for i in 0..n {
        if by_id.insert((tree_ids[i], node_ids[i]), i).is_some() {
            bail!(
                "node {} of tree {} is listed twice",
                node_ids[i],
                tree_ids[i]
            );
        }
    }
    let child = |i: usize, id: i64, which: &str| -> TractResult<usize> {
        let c = *by_id.get(&(tree_ids[i], id)).ok_or_else(|| {
            format_err!(
                "node {} of tree {}: {which} node {id} does not exist",
                node_ids[i],
                tree_ids[i]
            )
        })?;
        ensure!(
            c != i,
            "node {} of tree {} points to itself",
            node_ids[i],
            tree_ids[i]
        );
        Ok(c)
    };

    let mut nodes = Vec::with_capacity(n);
    let mut max_feature = 0;
    for i in 0..n {
        nodes.push(match Rule::parse(modes[i])? {
            Some(rule) => {
                let feature = index(feature_ids[i], "feature id")?;
                max_feature = max_feature.max(feature);
                Node::Branch {
                    feature,
                    threshold: values[i],
                    rule,
                    missing_true: missing.get(i) == Some(&1),
                    on_true: child(i, true_ids[i], "true")?,
                    on_false: child(i, false_ids[i], "false")?,
                }
            }
            None => Node::Leaf { first: 0, count: 0 },
        });
    }
    ensure_acyclic(&nodes)?;

    // Leaf votes, sorted by (tree id, node id) and, within a leaf, by attribute order.
    let v_ids = ints(node, &format!("{prefix}_ids"), None)?;
    let m = v_ids.len();
    let v_nodes = ints(node, &format!("{prefix}_nodeids"), Some(m))?;
    let v_trees = ints(node, &format!("{prefix}_treeids"), Some(m))?;
    let v_weights = floats(node, &format!("{prefix}_weights"), m)?;
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by_key(|&k| (v_trees[k], v_nodes[k]));
    let mut votes = Vec::with_capacity(m);
    for k in order {
        let &leaf = by_id.get(&(v_trees[k], v_nodes[k])).ok_or_else(|| {
            format_err!(
                "a weight names node {} of tree {}, which does not exist",
                v_nodes[k],
                v_trees[k]
            )
        })?;
        let Node::Leaf { first, count } = &mut nodes[leaf] else {
            continue; // ONNX Runtime ignores weights on branch nodes (old onnxmltools exports).
        };
        let to = index(v_ids[k], "class or target id")?;
        ensure!(
            to < n_outputs,
            "a weight is for id {to}, but there are {n_outputs}"
        );
        if *count == 0 {
            *first = votes.len();
        }
        *count += 1;
        votes.push(Vote {
            to,
            weight: v_weights[k],
        });
    }
    for (i, node) in nodes.iter().enumerate() {
        if let Node::Leaf { count: 0, .. } = node {
            bail!("leaf {} of tree {} has no weight", node_ids[i], tree_ids[i]);
        }
    }

    // A tree is a run of equal tree ids; its root is its first listed node.
    let mut roots = vec![];
    for i in 0..n {
        if i == 0 || tree_ids[i] != tree_ids[i - 1] {
            roots.push(i);
        }
    }

    let mut ids: Vec<i64> = v_ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    Ok(Forest {
        nodes,
        roots,
        votes,
        max_feature,
        weights_all_non_negative: !v_weights.iter().any(|&w| w < 0.0),
        distinct_ids: ids.len(),
    })
}

/// Refuses node graphs with a cycle, which would never reach a leaf (Kahn's algorithm).
fn ensure_acyclic(nodes: &[Node]) -> TractResult<()> {
    let children = |node: &Node| match *node {
        Node::Branch {
            on_true, on_false, ..
        } => [Some(on_true), Some(on_false)],
        Node::Leaf { .. } => [None, None],
    };
    let mut parents = vec![0usize; nodes.len()];
    for node in nodes {
        for c in children(node).into_iter().flatten() {
            parents[c] += 1;
        }
    }
    let mut ready: VecDeque<usize> = (0..nodes.len()).filter(|&i| parents[i] == 0).collect();
    let mut seen = 0;
    while let Some(i) = ready.pop_front() {
        seen += 1;
        for c in children(&nodes[i]).into_iter().flatten() {
            parents[c] -= 1;
            if parents[c] == 0 {
                ready.push_back(c);
            }
        }
    }
    ensure!(seen == nodes.len(), "the trees contain a cycle");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Post-transforms
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PostTransform {
    None,
    Logistic,
    Softmax,
    SoftmaxZero,
}

impl PostTransform {
    pub(super) fn parse(node: &NodeProto) -> TractResult<PostTransform> {
        Ok(
            match node
                .get_attr_opt::<&str>("post_transform")?
                .unwrap_or("NONE")
            {
                "NONE" => PostTransform::None,
                "LOGISTIC" => PostTransform::Logistic,
                "SOFTMAX" => PostTransform::Softmax,
                "SOFTMAX_ZERO" => PostTransform::SoftmaxZero,
                "PROBIT" => bail!("post_transform PROBIT is not supported"),
                other => bail!("unknown post_transform {other:?}"),
            },
        )
    }
}

/// ONNX Runtime's logistic function (`ComputeLogistic`), in f32.
#[inline]
pub(super) fn logistic(x: f32) -> f32 {
    let v = 1.0 / (1.0 + (-x.abs()).exp());
    if x < 0.0 { 1.0 - v } else { v }
}

/// ONNX Runtime's `write_scores` for two or more scores: `scores` already reads 0 for classes
/// without a score.
pub(super) fn transform_scores(post: PostTransform, scores: &mut [f32]) {
    match post {
        PostTransform::None => {}
        PostTransform::Logistic => scores.iter_mut().for_each(|s| *s = logistic(*s)),
        PostTransform::Softmax => {
            let max = scores.iter().copied().fold(-f32::MAX, f32::max);
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            scores.iter_mut().for_each(|s| *s /= sum);
        }
        PostTransform::SoftmaxZero => {
            let max = scores.iter().copied().fold(-f32::MAX, f32::max);
            let exp_neg_max = (-max).exp();
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                if *s > 0.000_000_1 || *s < -0.000_000_1 {
                    *s = (*s - max).exp();
                    sum += *s;
                } else {
                    *s *= exp_neg_max;
                }
            }
            scores.iter_mut().for_each(|s| *s /= sum);
        }
    }
}

/// Base values: absent, or one per class/target (`also_one`: a single value is allowed too).
fn parse_base_values(node: &NodeProto, n: usize, also_one: bool) -> TractResult<Vec<f32>> {
    let base: Vec<f32> = node.get_attr_opt_vec("base_values")?.unwrap_or_default();
    ensure!(
        base.is_empty() || base.len() == n || (also_one && base.len() == 1),
        "base_values has {} values for {n} classes or targets",
        base.len()
    );
    Ok(base)
}

/// Rows of a 2-D f32 input as slices, copying only when a row is not contiguous.
pub(super) fn for_each_row(
    input: &TValue,
    mut f: impl FnMut(usize, &[f32]) -> TractResult<()>,
) -> TractResult<usize> {
    let view = input.to_plain_array_view::<f32>()?;
    let view = view.into_dimensionality::<tract_ndarray::Ix2>()?;
    let mut buffer = vec![];
    for (r, row) in view.outer_iter().enumerate() {
        let row: &[f32] = match row.as_slice() {
            Some(s) => s,
            None => {
                buffer.clear();
                buffer.extend(row.iter().copied());
                &buffer
            }
        };
        f(r, row)?;
    }
    Ok(view.shape()[0])
}

/// Wires the shared part of both operators: the input as f32, with enough features.
fn wire_input(
    prefix: &str,
    model: &mut TypedModel,
    input: OutletId,
    forest: &Forest,
) -> TractResult<OutletId> {
    let fact = model.outlet_fact(input)?.clone();
    ensure!(
        fact.rank() == 2,
        "tree ensembles take a 2-D input [N, features], got rank {}",
        fact.rank()
    );
    if let Ok(features) = fact.shape[1].to_usize() {
        ensure!(
            features > forest.max_feature,
            "the trees read feature {} but the input has {features} features",
            forest.max_feature
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

fn check_features(forest: &Forest, input: &TValue) -> TractResult<()> {
    let features = input.shape().get(1).copied().unwrap_or(0);
    ensure!(
        input.rank() == 2 && features > forest.max_feature,
        "the trees read feature {} but the input has shape {:?}",
        forest.max_feature,
        input.shape()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// TreeEnsembleClassifier
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
pub(super) enum Labels {
    Int(Vec<i64>),
    Str(Vec<String>),
}

impl Labels {
    pub(super) fn len(&self) -> usize {
        match self {
            Labels::Int(v) => v.len(),
            Labels::Str(v) => v.len(),
        }
    }

    pub(super) fn datum_type(&self) -> DatumType {
        match self {
            Labels::Int(_) => i64::datum_type(),
            Labels::Str(_) => String::datum_type(),
        }
    }

    /// The labels at the given class indices, as a 1-D tensor.
    pub(super) fn pick(&self, winners: &[usize]) -> Tensor {
        match self {
            Labels::Int(v) => tensor1(&winners.iter().map(|&w| v[w]).collect::<Vec<_>>()),
            Labels::Str(v) => tensor1(&winners.iter().map(|&w| v[w].clone()).collect::<Vec<_>>()),
        }
    }
}

/// What a classifier node holds once parsed.
#[derive(Clone, Debug, PartialEq)]
struct Classifier {
    forest: Forest,
    labels: Labels,
    base_values: Vec<f32>,
    post: PostTransform,
    /// Two classes and every vote for the same class id: one score makes both columns.
    binary_case: bool,
}

/// How ONNX Runtime widens a single binary score into two columns (its `add_second_class`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SecondColumn {
    /// Non-negative weights: `[1 - s, s]`, or `[1 - sigmoid(s), sigmoid(s)]` with LOGISTIC.
    Complement,
    /// Some negative weights: `[-s, s]`, or `[sigmoid(-s), sigmoid(s)]` with LOGISTIC.
    Mirror,
}

impl Classifier {
    fn parse(node: &NodeProto) -> TractResult<Classifier> {
        let ints = node.get_attr_opt_vec::<i64>("classlabels_int64s")?;
        let strings = node.get_attr_opt_vec::<String>("classlabels_strings")?;
        let labels = match (ints, strings) {
            (Some(v), None) => Labels::Int(v),
            (None, Some(v)) => Labels::Str(v),
            (None, None) => bail!("one of classlabels_int64s and classlabels_strings is required"),
            (Some(_), Some(_)) => {
                bail!("only one of classlabels_int64s and classlabels_strings may be set")
            }
        };
        let n = labels.len();
        ensure!(
            n >= 2,
            "a classifier needs at least two class labels, got {n}"
        );
        let forest = parse_forest(node, "class", n)?;
        let base_values = parse_base_values(node, n, n == 2)?;
        let post = PostTransform::parse(node)?;
        let binary_case = n == 2 && forest.distinct_ids == 1;
        Ok(Classifier {
            forest,
            labels,
            base_values,
            post,
            binary_case,
        })
    }

    /// Finishes one row: `scores`/`scored` hold the summed votes per class. Writes the class
    /// scores into `out` and returns the index of the winning label.
    fn finish(&self, scores: &mut [f32], scored: &mut [bool], out: &mut [f32]) -> usize {
        let base = &self.base_values;
        let value =
            |scores: &[f32], scored: &[bool], k: usize| if scored[k] { scores[k] } else { 0.0 };
        if scores.len() > 2 {
            for (k, &b) in base.iter().enumerate() {
                scores[k] = if scored[k] { scores[k] + b } else { b };
                scored[k] = true;
            }
            let mut best: Option<usize> = None;
            for k in 0..scores.len() {
                if scored[k] && best.is_none_or(|b| scores[k] > scores[b]) {
                    best = Some(k);
                }
            }
            for (k, o) in out.iter_mut().enumerate() {
                *o = value(scores, scored, k);
            }
            transform_scores(self.post, out);
            return best.unwrap_or(0);
        }

        // Two classes.
        let mut second: Option<SecondColumn> = None;
        let mut single = false; // ONNX Runtime drops the second score and widens the first.
        match base.len() {
            2 if scored[1] => {
                // ONNX Runtime: class 1 becomes base[1] + score[0], class 0 its opposite.
                scores[1] = base[1] + scores[0];
                scores[0] = -scores[1];
            }
            2 => {
                scores[0] += base[0];
                scores[1] += base[1]; // still unscored, so it reads 0 below, as in ONNX Runtime
            }
            1 => {
                scores[0] += base[0];
                single = !scored[1];
            }
            _ => {
                second = Some(SecondColumn::Mirror);
                single = !scored[1];
            }
        }
        let pos = if !single && scored[1] {
            scores[1]
        } else {
            value(scores, scored, 0)
        };
        let positive = if self.binary_case {
            if self.forest.weights_all_non_negative {
                second = Some(SecondColumn::Complement);
                pos > 0.5
            } else {
                second = Some(SecondColumn::Mirror);
                pos > 0.0
            }
        } else {
            pos > 0.0
        };

        if single {
            let s = value(scores, scored, 0);
            let (a, b) = match second {
                Some(SecondColumn::Complement) if self.post == PostTransform::Logistic => {
                    let p = logistic(s);
                    (1.0 - p, p)
                }
                Some(SecondColumn::Complement) => (1.0 - s, s),
                Some(SecondColumn::Mirror) if self.post == PostTransform::Logistic => {
                    (logistic(-s), logistic(s))
                }
                Some(SecondColumn::Mirror) => (-s, s),
                None => (s, 0.0), // ONNX Runtime leaves the second value unwritten.
            };
            out[0] = a;
            out[1] = b;
        } else {
            out[0] = value(scores, scored, 0);
            out[1] = value(scores, scored, 1);
            transform_scores(self.post, out);
        }
        usize::from(positive)
    }

    fn eval(&self, input: &TValue) -> TractResult<(Tensor, Tensor)> {
        check_features(&self.forest, input)?;
        let c = self.labels.len();
        let rows = input.shape()[0];
        let mut probabilities = vec![0f32; rows * c];
        let mut winners = Vec::with_capacity(rows);
        let mut scores = vec![0f32; c];
        let mut scored = vec![false; c];
        for_each_row(input, |r, row| {
            scores.fill(0.0);
            scored.fill(false);
            for &root in &self.forest.roots {
                for vote in self.forest.leaf_votes(root, row) {
                    scores[vote.to] += vote.weight;
                    scored[vote.to] = true;
                }
            }
            winners.push(self.finish(
                &mut scores,
                &mut scored,
                &mut probabilities[r * c..(r + 1) * c],
            ));
            Ok(())
        })?;
        Ok((
            self.labels.pick(&winners),
            Tensor::from_shape(&[rows, c], &probabilities)?,
        ))
    }
}

/// The parsed `TreeEnsembleClassifier` node (an `Expansion` into [`ClassifierOp`]).
#[derive(Clone, Debug)]
struct ClassifierNode(Arc<Classifier>);

pub(super) fn tree_ensemble_classifier(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let classifier = Classifier::parse(node)
        .with_context(|| format!("TreeEnsembleClassifier {:?}", node.name))?;
    Ok((expand(ClassifierNode(Arc::new(classifier))), vec![]))
}

impl Expansion for ClassifierNode {
    fn name(&self) -> StaticName {
        "TreeEnsembleClassifier".into()
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
        s.equals(&outputs[1].shape[1], self.0.labels.len().to_dim())?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let x = wire_input(prefix, model, inputs[0], &self.0.forest)?;
        model.wire_node(prefix, ClassifierOp(self.0.clone()), &[x])
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(2)
    }
}

/// Evaluates a [`Classifier`]: f32 `[N, F]` in, labels `[N]` and class scores `[N, C]` out.
#[derive(Clone)]
struct ClassifierOp(Arc<Classifier>);

impl fmt::Debug for ClassifierOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TreeEnsembleClassifier({} trees, {} classes)",
            self.0.forest.roots.len(),
            self.0.labels.len()
        )
    }
}

impl PartialEq for ClassifierOp {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

// Thresholds are never NaN in a useful model; equality is only used to deduplicate nodes.
impl Eq for ClassifierOp {}

impl Op for ClassifierOp {
    fn name(&self) -> StaticName {
        "TreeEnsembleClassifier".into()
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
            TypedFact::dt_shape(f32::datum_type(), tvec!(n, self.0.labels.len().to_dim())),
        ))
    }

    as_op!();
}

// ---------------------------------------------------------------------------------------------
// TreeEnsembleRegressor
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Aggregate {
    Sum,
    Average,
    Min,
    Max,
}

#[derive(Clone, Debug, PartialEq)]
struct Regressor {
    forest: Forest,
    n_targets: usize,
    aggregate: Aggregate,
    base_values: Vec<f32>,
}

impl Regressor {
    fn parse(node: &NodeProto) -> TractResult<Regressor> {
        let n_targets: i64 = node.get_attr("n_targets")?;
        ensure!(
            n_targets >= 1,
            "n_targets must be at least 1, got {n_targets}"
        );
        let n_targets = n_targets as usize;
        let aggregate = match node
            .get_attr_opt::<&str>("aggregate_function")?
            .unwrap_or("SUM")
        {
            "SUM" => Aggregate::Sum,
            "AVERAGE" => Aggregate::Average,
            "MIN" => Aggregate::Min,
            "MAX" => Aggregate::Max,
            other => bail!("unknown aggregate_function {other:?}"),
        };
        let post = PostTransform::parse(node)?;
        ensure!(
            post == PostTransform::None,
            "TreeEnsembleRegressor supports post_transform NONE only, got {post:?}"
        );
        let forest = parse_forest(node, "target", n_targets)?;
        let base_values = parse_base_values(node, n_targets, false)?;
        Ok(Regressor {
            forest,
            n_targets,
            aggregate,
            base_values,
        })
    }

    /// ONNX Runtime's one-target path: each tree adds the first vote of its leaf.
    fn one_target(&self, row: &[f32]) -> f32 {
        let origin = self.base_values.first().copied().unwrap_or(0.0);
        let mut score = 0f32;
        let mut scored = false;
        for &root in &self.forest.roots {
            let w = self.forest.leaf_votes(root, row)[0].weight;
            match self.aggregate {
                Aggregate::Sum | Aggregate::Average => score += w,
                Aggregate::Min => score = if !scored || w < score { w } else { score },
                Aggregate::Max => score = if !scored || w > score { w } else { score },
            }
            scored = true;
        }
        match self.aggregate {
            Aggregate::Sum => score + origin,
            Aggregate::Average => score / self.forest.roots.len() as f32 + origin,
            Aggregate::Min | Aggregate::Max if scored => score + origin,
            Aggregate::Min | Aggregate::Max => origin,
        }
    }

    fn targets(&self, row: &[f32], out: &mut [f32], scored: &mut [bool]) {
        out.fill(0.0);
        scored.fill(false);
        for &root in &self.forest.roots {
            for vote in self.forest.leaf_votes(root, row) {
                let (s, w) = (&mut out[vote.to], vote.weight);
                match self.aggregate {
                    Aggregate::Sum | Aggregate::Average => *s += w,
                    Aggregate::Min => *s = if !scored[vote.to] || w < *s { w } else { *s },
                    Aggregate::Max => *s = if !scored[vote.to] || w > *s { w } else { *s },
                }
                scored[vote.to] = true;
            }
        }
        // A target no tree voted for is 0, without its base value, as in ONNX Runtime.
        let n_trees = self.forest.roots.len() as f32;
        for (t, s) in out.iter_mut().enumerate() {
            let base = self.base_values.get(t).copied().unwrap_or(0.0);
            *s = match self.aggregate {
                _ if !scored[t] => 0.0,
                Aggregate::Average => *s / n_trees + base,
                Aggregate::Sum | Aggregate::Min | Aggregate::Max => *s + base,
            };
        }
    }

    fn eval(&self, input: &TValue) -> TractResult<Tensor> {
        check_features(&self.forest, input)?;
        let t = self.n_targets;
        let rows = input.shape()[0];
        let mut values = vec![0f32; rows * t];
        let mut scored = vec![false; t];
        for_each_row(input, |r, row| {
            if t == 1 {
                values[r] = self.one_target(row);
            } else {
                self.targets(row, &mut values[r * t..(r + 1) * t], &mut scored);
            }
            Ok(())
        })?;
        Tensor::from_shape(&[rows, t], &values)
    }
}

/// The parsed `TreeEnsembleRegressor` node (an `Expansion` into [`RegressorOp`]).
#[derive(Clone, Debug)]
struct RegressorNode(Arc<Regressor>);

pub(super) fn tree_ensemble_regressor(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let regressor =
        Regressor::parse(node).with_context(|| format!("TreeEnsembleRegressor {:?}", node.name))?;
    Ok((expand(RegressorNode(Arc::new(regressor))), vec![]))
}

impl Expansion for RegressorNode {
    fn name(&self) -> StaticName {
        "TreeEnsembleRegressor".into()
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
        s.equals(&outputs[0].shape[1], self.0.n_targets.to_dim())?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let x = wire_input(prefix, model, inputs[0], &self.0.forest)?;
        model.wire_node(prefix, RegressorOp(self.0.clone()), &[x])
    }
}

/// Evaluates a [`Regressor`]: f32 `[N, F]` in, values `[N, targets]` out.
#[derive(Clone)]
struct RegressorOp(Arc<Regressor>);

impl fmt::Debug for RegressorOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TreeEnsembleRegressor({} trees, {} targets, {:?})",
            self.0.forest.roots.len(),
            self.0.n_targets,
            self.0.aggregate
        )
    }
}

impl PartialEq for RegressorOp {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

// See `ClassifierOp`.
impl Eq for RegressorOp {}

impl Op for RegressorOp {
    fn name(&self) -> StaticName {
        "TreeEnsembleRegressor".into()
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
            tvec!(n, self.0.n_targets.to_dim())
        )))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    //! ONNX Runtime's semantics are checked end to end by `tests/onnx_ml.rs`, against fixtures
    //! that `models/train/make_op_fixtures.py` regenerates from onnxruntime (the hand-built
    //! `te_*` ensembles cover the corners skl2onnx exports do not reach). What stays here
    //! needs no reference runtime.

    use super::*;

    #[test]
    fn cycles_are_refused() {
        let leaf = Node::Leaf { first: 0, count: 1 };
        let branch = |on_true, on_false| Node::Branch {
            feature: 0,
            threshold: 0.0,
            rule: Rule::Leq,
            missing_true: false,
            on_true,
            on_false,
        };
        assert!(ensure_acyclic(&[branch(1, 2), leaf, leaf]).is_ok());
        assert!(ensure_acyclic(&[branch(1, 2), branch(0, 2), leaf]).is_err());
    }
}
