//! Explanations of a prediction: which inputs made the model say what it said.
//!
//! - [`linear`]: exact contributions of linear-logistic models, read from the ONNX graph
//!   (the definition the CDS risk cards use).
//! - Model-agnostic methods that need only forward passes, on every backend:
//!   [`Occlusion`] and [`Rise`] for images (a saliency map at input resolution), and
//!   [`KernelShap`] for tabular models (one attribution per feature).
//!
//! - Gradient methods, where the backend can differentiate its model (the native candle
//!   backend): Grad-CAM and integrated gradients ([`GradientRequest`], computed by
//!   [`crate::Backend::gradients`] on the model's worker thread).
//!
//! The model-agnostic methods are [`Perturber`]s: they hand out perturbed copies of the
//! input in batches, take the model's score of each back (in the order handed out), and
//! turn the scores into an [`Explanation`]. They never call a model themselves, so the
//! caller decides how the forward passes run: through a model's worker (batched with its
//! other requests, in the server), or by a closure ([`run`], in tests and tools).

mod gradients;
mod kernel_shap;
mod linear;
mod occlusion;
mod rise;

pub use gradients::{GradientMethod, GradientRequest, GradientSaliency};
pub use kernel_shap::{KernelShap, KernelShapOptions, Link};
pub use linear::{LinearLogistic, logit};
pub use occlusion::{Occlusion, OcclusionOptions};
pub use rise::{Rise, RiseOptions};

/// Why an explanation could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExplainError {
    /// The bytes are not an ONNX model.
    #[error("not an ONNX model: {reason}")]
    NotOnnx { reason: String },
    /// A method's option (or the input it was given) cannot be used; the reason says why.
    #[error("{0}")]
    Invalid(String),
    /// KernelSHAP's weighted least-squares system has no unique solution (too few distinct
    /// coalitions for the features that vary).
    #[error(
        "the KernelSHAP system could not be solved ({0}); ask for more samples or use fewer features"
    )]
    Unsolvable(String),
    /// `finish` was called before every score was absorbed (a bug in the caller).
    #[error("{absorbed} of {expected} forward passes were scored")]
    Incomplete { absorbed: usize, expected: usize },
}

/// An attribution: one value per feature (tabular) or per pixel (images, row-major `H×W`).
#[derive(Clone, Debug, PartialEq)]
pub struct Explanation {
    pub values: Vec<f64>,
    /// What the values are measured from, where the method has one (KernelSHAP: the
    /// expected score over the background, in the link's space).
    pub base_value: Option<f64>,
    /// Forward passes the explanation took (model rows).
    pub forward_passes: usize,
}

/// A model-agnostic attribution method driven by forward passes.
pub trait Perturber: Send {
    /// Values of one model input row (`C·H·W` for an image, the feature count for a table).
    fn row_len(&self) -> usize;
    /// Forward passes (rows) the explanation takes in all.
    fn forward_passes(&self) -> usize;
    /// Appends the next (at most `rows`) perturbed inputs, each [`Perturber::row_len`]
    /// values, to `out`; returns how many it appended (0 once all were handed out).
    fn next_rows(&mut self, rows: usize, out: &mut Vec<f32>) -> usize;
    /// The model's scores of rows handed out, in the order they were handed out (any
    /// number at a time).
    fn absorb(&mut self, scores: &[f64]);
    /// The attribution, once every row's score has been absorbed.
    fn finish(self: Box<Self>) -> Result<Explanation, ExplainError>;
}

/// Runs `method` to the end with `model` scoring each batch of at most `batch` rows
/// (`model(rows, n)` gets `n` rows of [`Perturber::row_len`] values and returns `n` scores).
pub fn run(
    mut method: Box<dyn Perturber>,
    batch: usize,
    mut model: impl FnMut(&[f32], usize) -> Vec<f64>,
) -> Result<Explanation, ExplainError> {
    let mut rows = Vec::new();
    loop {
        rows.clear();
        let n = method.next_rows(batch.max(1), &mut rows);
        if n == 0 {
            break;
        }
        let scores = model(&rows, n);
        method.absorb(&scores);
    }
    method.finish()
}

/// The shape of one image row: channels, height, width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageShape {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl ImageShape {
    /// Values of one image.
    pub fn len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Whether the image has no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn pixels(&self) -> usize {
        self.height * self.width
    }

    fn check(&self, x: &[f32]) -> Result<(), ExplainError> {
        if self.is_empty() {
            return Err(ExplainError::Invalid("the image has no pixels".into()));
        }
        if x.len() != self.len() {
            return Err(ExplainError::Invalid(format!(
                "the image has {} values; {}×{}×{} needs {}",
                x.len(),
                self.channels,
                self.height,
                self.width,
                self.len()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod testing {
    /// A model of an image whose score is the mean of one rectangle: `[y0, y1) × [x0, x1)`.
    pub fn region_mean(
        rows: &[f32],
        n: usize,
        shape: super::ImageShape,
        (y0, y1, x0, x1): (usize, usize, usize, usize),
    ) -> Vec<f64> {
        (0..n)
            .map(|r| {
                let img = &rows[r * shape.len()..(r + 1) * shape.len()];
                let mut sum = 0.0;
                for y in y0..y1 {
                    for x in x0..x1 {
                        sum += f64::from(img[y * shape.width + x]);
                    }
                }
                sum / ((y1 - y0) * (x1 - x0)) as f64
            })
            .collect()
    }

    /// Index of the largest value.
    pub fn argmax(v: &[f64]) -> usize {
        v.iter()
            .enumerate()
            .fold((0, f64::NEG_INFINITY), |best, (i, &x)| {
                if x > best.1 { (i, x) } else { best }
            })
            .0
    }
}
