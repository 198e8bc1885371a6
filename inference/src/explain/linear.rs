//! Exact attributions of linear-logistic models, read from the ONNX graph.
//!
//! The model is `p = σ(b + Σᵢ wᵢ·zᵢ)` with `zᵢ = (xᵢ − oᵢ)·sᵢ` (an ONNX-ML `Scaler`, optional,
//! then a `LinearClassifier` with a logistic post-transform, as scikit-learn's
//! `StandardScaler + LogisticRegression` is exported by skl2onnx). The contribution of input
//! `i` is `wᵢ·(zᵢ − z̄ᵢ) = wᵢ·sᵢ·(xᵢ − x̄ᵢ)`: exact, and the contributions sum to
//! `logit(p(x)) − logit(p(x̄))`. The weights are read from the ONNX graph itself
//! ([`LinearLogistic::from_onnx`]), never from a copy that could drift from it.

#[cfg(feature = "tract")]
use super::ExplainError;

/// A binary linear-logistic model on the model's own inputs: optional scaler, then weights.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearLogistic {
    /// Per input: `zᵢ = (xᵢ − offset[i])·scale[i]`.
    pub offset: Vec<f64>,
    pub scale: Vec<f64>,
    /// Per input, the weight of `zᵢ` in the positive class's logit.
    pub weights: Vec<f64>,
    /// The positive class's intercept.
    pub intercept: f64,
}

impl LinearLogistic {
    /// The number of inputs.
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// Whether the model has no inputs.
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// The positive class's logit at `x` (f64).
    pub fn logit(&self, x: &[f64]) -> f64 {
        self.intercept
            + (0..self.len())
                .map(|i| self.weights[i] * (x[i] - self.offset[i]) * self.scale[i])
                .sum::<f64>()
    }

    /// Each input's contribution to `logit(x) − logit(reference)`:
    /// `wᵢ·sᵢ·(xᵢ − referenceᵢ)`.
    pub fn contributions(&self, x: &[f64], reference: &[f64]) -> Vec<f64> {
        (0..self.len())
            .map(|i| self.weights[i] * self.scale[i] * (x[i] - reference[i]))
            .collect()
    }

    /// Reads the model from ONNX bytes when the graph is exactly a linear-logistic model
    /// of `n_features` inputs on one input tensor: an optional `ai.onnx.ml` `Scaler` feeding
    /// an `ai.onnx.ml` `LinearClassifier` with `post_transform = LOGISTIC`, one coefficient
    /// row per class (or one row, for class 1 of two). `positive` is the index of the
    /// positive class among the classifier's class labels (the column of its probability
    /// output). `Ok(None)`: the graph is another kind of model.
    #[cfg(feature = "tract")]
    pub fn from_onnx(
        bytes: &[u8],
        n_features: usize,
        positive: usize,
    ) -> Result<Option<LinearLogistic>, ExplainError> {
        use tract_onnx::pb::{AttributeProto, NodeProto};
        use tract_onnx::prelude::Framework;

        let proto = tract_onnx::onnx()
            .proto_model_for_read(&mut &bytes[..])
            .map_err(|e| ExplainError::NotOnnx {
                reason: e.to_string().chars().take(200).collect(),
            })?;
        let Some(graph) = proto.graph else {
            return Ok(None);
        };
        let attr = |node: &NodeProto, name: &str| -> Option<AttributeProto> {
            node.attribute.iter().find(|a| a.name == name).cloned()
        };
        let ml = |node: &NodeProto, op: &str| node.domain == "ai.onnx.ml" && node.op_type == op;
        let initialisers: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let inputs: Vec<&str> = graph
            .input
            .iter()
            .map(|i| i.name.as_str())
            .filter(|n| !initialisers.contains(n))
            .collect();
        let [input] = inputs.as_slice() else {
            return Ok(None);
        };
        let (scaler, classifier) = match graph.node.as_slice() {
            [s, c] if ml(s, "Scaler") && ml(c, "LinearClassifier") => (Some(s), c),
            [c] if ml(c, "LinearClassifier") => (None, c),
            _ => return Ok(None),
        };
        // Wiring: input → [Scaler →] LinearClassifier.
        let classifier_input = match scaler {
            Some(s) => {
                if s.input.as_slice() != [input.to_string()] || s.output.len() != 1 {
                    return Ok(None);
                }
                s.output[0].as_str()
            }
            None => input,
        };
        if classifier.input.as_slice() != [classifier_input.to_owned()] {
            return Ok(None);
        }
        let (offset, scale) = match scaler {
            Some(s) => {
                let offset = attr(s, "offset").map(|a| a.floats).unwrap_or_default();
                let scale = attr(s, "scale").map(|a| a.floats).unwrap_or_default();
                let widen = |v: Vec<f32>| -> Option<Vec<f64>> {
                    match v.len() {
                        1 => Some(vec![f64::from(v[0]); n_features]),
                        n if n == n_features => Some(v.into_iter().map(f64::from).collect()),
                        _ => None,
                    }
                };
                match (widen(offset), widen(scale)) {
                    (Some(o), Some(s)) => (o, s),
                    _ => return Ok(None),
                }
            }
            None => (vec![0.0; n_features], vec![1.0; n_features]),
        };
        let post = attr(classifier, "post_transform").map(|a| a.s);
        if post.as_deref() != Some(b"LOGISTIC".as_slice()) {
            return Ok(None);
        }
        if attr(classifier, "multi_class").is_some_and(|a| a.i != 0) {
            return Ok(None);
        }
        let classes = attr(classifier, "classlabels_ints")
            .map(|a| a.ints.len())
            .or_else(|| attr(classifier, "classlabels_strings").map(|a| a.strings.len()))
            .unwrap_or(0);
        let coefficients = attr(classifier, "coefficients")
            .map(|a| a.floats)
            .unwrap_or_default();
        let intercepts = attr(classifier, "intercepts")
            .map(|a| a.floats)
            .unwrap_or_default();
        if n_features == 0 || coefficients.len() % n_features != 0 || classes != 2 || positive > 1 {
            return Ok(None);
        }
        let rows = coefficients.len() / n_features;
        let row = match rows {
            2 => positive,
            // One row: the score of class 1.
            1 if positive == 1 => 0,
            _ => return Ok(None),
        };
        if intercepts.len() != rows {
            return Ok(None);
        }
        let weights = coefficients[row * n_features..(row + 1) * n_features]
            .iter()
            .map(|&w| f64::from(w))
            .collect();
        Ok(Some(LinearLogistic {
            offset,
            scale,
            weights,
            intercept: f64::from(intercepts[row]),
        }))
    }
}

/// `ln(p / (1 − p))`, with `p` clamped into `[1e-12, 1 − 1e-12]`.
pub fn logit(p: f64) -> f64 {
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    (p / (1.0 - p)).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contributions_sum_to_the_change_of_the_logit() {
        let m = LinearLogistic {
            offset: vec![10.0, 0.0],
            scale: vec![0.5, 1.0],
            weights: vec![0.8, -1.5],
            intercept: 0.3,
        };
        let x = [14.0, 1.0];
        let r = [12.0, 0.25];
        let c = m.contributions(&x, &r);
        // By hand: 0.8·0.5·(14 − 12) = 0.8; −1.5·1·(1 − 0.25) = −1.125.
        assert!((c[0] - 0.8).abs() < 1e-12 && (c[1] + 1.125).abs() < 1e-12);
        let total: f64 = c.iter().sum();
        assert!((total - (m.logit(&x) - m.logit(&r))).abs() < 1e-12);
        assert!((logit(0.5)).abs() < 1e-15);
        assert!((logit(0.880_797_077_977_882_3) - 2.0).abs() < 1e-9);
    }
}
