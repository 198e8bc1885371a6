//! Gradient-based saliency (Grad-CAM, integrated gradients): what a request asks of a
//! backend that can differentiate its model (today the native candle backend; tract and ONNX
//! Runtime run inference graphs without gradients).
//!
//! Unlike the [`Perturber`](super::Perturber) methods, these need the model's internals, so
//! the backend computes them itself, on its worker thread ([`crate::Backend::gradients`],
//! reached through [`crate::ModelWorker::gradients`]).

/// Which gradient method, with its options.
#[derive(Clone, Debug, PartialEq)]
pub enum GradientMethod {
    /// Grad-CAM (Selvaraju et al., ICCV 2017) on the model's Grad-CAM layer (for the candle
    /// CNNs: the layer the architecture marks `gradcam_target`, `features_last` for the lesion
    /// model). The score differentiated is the target class's pre-softmax logit, as in the
    /// paper. Map: `ReLU(Σ_k α_k A_k)` with `α_k` the spatial mean of `∂logit/∂A_k`,
    /// upsampled bilinearly to the input's height and width (half-pixel centres,
    /// `align_corners = false`: PyTorch's `F.interpolate(mode="bilinear")`).
    GradCam,
    /// Integrated gradients (Sundararajan et al., ICML 2017) from a constant baseline image
    /// along the straight path, by the midpoint Riemann sum of `steps` points
    /// (`α_k = (k + ½)/steps`, captum's `riemann_middle`). The score is the explained output's
    /// value for the target (what the model serves: probabilities for a softmax head). The
    /// attribution of a pixel is summed over the input's channels.
    IntegratedGradients {
        /// The baseline image's value at every position (in the model's input space).
        baseline: f32,
        /// Points on the path (each a forward and a backward pass).
        steps: usize,
    },
}

impl GradientMethod {
    /// Forward passes (model rows, each with its backward pass) one row's explanation takes:
    /// Grad-CAM 1; integrated gradients `steps` plus one forward pass of the baseline (for
    /// the completeness check).
    pub fn passes_per_row(&self) -> usize {
        match self {
            GradientMethod::GradCam => 1,
            GradientMethod::IntegratedGradients { steps, .. } => steps.saturating_add(1),
        }
    }
}

/// A request for gradient saliency maps of some rows of the model's one image input.
#[derive(Clone, Debug, PartialEq)]
pub struct GradientRequest {
    /// The model's image input, `[N, C, H, W]` FP32 (already checked against the metadata).
    pub input: crate::NamedTensor,
    /// Which output's scores are explained (its index in the model's outputs).
    pub output: usize,
    /// The explained class of each row (`N` values, each below the output's class count).
    pub targets: Vec<usize>,
    pub method: GradientMethod,
    /// Rows one forward/backward pass may hold (bounds memory; integrated gradients run
    /// their path points in chunks of this many).
    pub max_batch: usize,
}

/// Saliency maps, one `H×W` map per row, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct GradientSaliency {
    /// `N·H·W` values.
    pub values: Vec<f32>,
    pub height: usize,
    pub width: usize,
    /// Forward (+ backward) passes taken, all rows together.
    pub forward_passes: usize,
    /// Integrated gradients: per row, `Σ attributions − (f(x) − f(baseline))`, the
    /// completeness gap of the Riemann sum (0 for an exact integral). Empty for Grad-CAM.
    pub completeness_gap: Vec<f64>,
    /// Integrated gradients: per row, `f(baseline)`, the target's score of the baseline image.
    pub baseline_score: Vec<f64>,
}
