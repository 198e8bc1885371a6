//! The native candle backend (cargo feature `candle`, in the default build): models written
//! in Rust with `candle-nn`, their weights from a safetensors file, their layers from an
//! architecture file (`architecture.json`), and gradients by candle's autograd for Grad-CAM
//! and integrated gradients.
//!
//! One architecture so far, [`CONV_CLASSIFIER`]: a sequential image classifier of 2-D
//! convolutions (each with an optional ReLU and 2×2-style max pool), a global average pool,
//! a linear layer and an optional softmax — the lesion-detection reference model. The
//! architecture file is checked strictly at load, before anything runs: unknown keys or layer
//! types, a layer whose input does not match the previous layer's output, a declared output
//! shape the arithmetic does not give, a weight missing from the safetensors file or of
//! another shape or dtype, and a tensor of the file that no layer uses are load errors that
//! name the layer.
//!
//! CPU by default (candle's own kernels, pure Rust); with the opt-in `cuda` feature (needs
//! nvcc at build time) the `cuda` execution provider runs it on an NVIDIA GPU.
//!
//! Two forward paths compute the same values. Inference uses candle's `relu` and
//! `max_pool2d` kernels. Gradients use a path whose backward pass is PyTorch's: candle 0.11's
//! `max_pool2d` backward scales the gradient of a window's single maximum by
//! `ties / window` (¼ for 2×2) instead of passing it whole, and its `relu` passes the
//! gradient at exactly 0; the gradient path pools by reshaping each window into its own axis
//! and selecting its first maximum with a constant one-hot mask (PyTorch's routing, ties
//! included) and applies ReLU as `x · [x > 0]`.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use candle_core::{D, DType, Device, Module, Tensor as CTensor, Var};
use candle_nn::{Conv2d, Conv2dConfig, Linear};
use serde::Deserialize;
use serde_json::Value;

use super::{Backend, ExecutionProvider, LoadOptions, ModelMetadata, TensorSpec};
use crate::error::InferenceError;
use crate::explain::{GradientMethod, GradientRequest, GradientSaliency};
use crate::tensor::{DataType, NamedTensor, Tensor};

const NAME: &str = "candle";

/// The architecture names this build implements (`[candle] architecture` in bundle.toml).
pub const ARCHITECTURES: &[&str] = &[CONV_CLASSIFIER];
/// Convolutions → global average pool → linear → softmax (see the module docs).
pub const CONV_CLASSIFIER: &str = "conv-classifier";

/// The architecture file, as written by `models/train/lesion_detection.py`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ArchitectureFile {
    format: u32,
    dtype: String,
    input: IoSpec,
    output: IoSpec,
    layers: Vec<Layer>,
    // Descriptive keys: read, not used.
    #[serde(default)]
    model: Option<Value>,
    #[serde(default)]
    version: Option<Value>,
    #[serde(default)]
    generated_by: Option<Value>,
    #[serde(default)]
    batchnorm: Option<Value>,
    #[serde(default)]
    tensor_layouts: Option<Value>,
    #[serde(default)]
    files: Option<Value>,
    #[serde(default)]
    same_as_onnx: Option<Value>,
    #[serde(default)]
    versions: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IoSpec {
    name: String,
    shape: Vec<i64>,
    #[serde(default)]
    layout: Option<String>,
    #[serde(default)]
    preprocessing: Option<Value>,
    #[serde(default)]
    labels: Option<Vec<String>>,
    #[serde(default)]
    positive_label: Option<String>,
    #[serde(default)]
    activation: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Layer {
    Conv2d(Box<ConvSpec>),
    GlobalAvgPool(GapSpec),
    Linear(LinearSpec),
    Softmax(SoftmaxSpec),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConvSpec {
    name: String,
    in_channels: usize,
    out_channels: usize,
    kernel_size: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
    bias: bool,
    weight: String,
    weight_shape: Vec<usize>,
    #[serde(default)]
    bias_tensor: Option<String>,
    activation: Option<String>,
    pool: Option<PoolSpec>,
    output_shape: Vec<i64>,
    #[serde(default)]
    alias: Option<String>,
    #[serde(default)]
    gradcam_target: bool,
    #[serde(default)]
    onnx_tensor: Option<String>,
    #[serde(default)]
    lesion_map_channel: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolSpec {
    #[serde(rename = "type")]
    kind: String,
    kernel_size: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GapSpec {
    name: String,
    output_shape: Vec<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinearSpec {
    name: String,
    in_features: usize,
    out_features: usize,
    bias: bool,
    weight: String,
    weight_shape: Vec<usize>,
    #[serde(default)]
    bias_tensor: Option<String>,
    output_shape: Vec<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SoftmaxSpec {
    name: String,
    dim: usize,
    output_shape: Vec<i64>,
}

/// One built layer.
#[derive(Clone)]
enum Built {
    Conv {
        conv: Conv2d,
        relu: bool,
        /// Max pool with this square window (= stride).
        pool: Option<usize>,
    },
    GlobalAvgPool,
    Linear(Linear),
    Softmax,
}

/// The built network, shared by every instance.
struct Net {
    layers: Vec<Built>,
    /// Index of the layer whose output Grad-CAM explains.
    gradcam: Option<usize>,
    device: Device,
    /// `[C, H, W]` of one input row.
    input: [usize; 3],
    classes: usize,
    /// The largest tensor one row makes in a forward pass, in bytes (a convolution's output
    /// or its unfolded input): rows are run in passes that keep it within
    /// [`MAX_PASS_ACTIVATION_BYTES`].
    row_bytes: usize,
    /// What one row's forward pass keeps for a backward pass, in bytes: the input, every
    /// layer's output (a convolution's before and after its pool) and a convolution's
    /// unfolded input.
    kept_bytes: usize,
    /// The bytes of its weights and biases.
    weight_bytes: usize,
}

impl Net {
    /// What one row's forward and backward pass is estimated to keep, in bytes.
    fn gradient_row_bytes(&self) -> usize {
        self.row_bytes
            .saturating_mul(GRADIENT_ROW_FACTOR)
            .max(self.kept_bytes.saturating_mul(GRADIENT_KEPT_FACTOR))
    }

    /// What any gradient pass keeps whatever its rows (the weights' gradients), in bytes.
    fn gradient_pass_bytes(&self) -> usize {
        self.weight_bytes.saturating_mul(WEIGHT_GRADIENT_FACTOR)
    }
}

/// The most one row's largest forward tensor may take for a model to load: an architecture
/// whose layers are consistent but huge (a padding of 99,945) asked for 2.5 TB at warm-up,
/// an allocation failure no `catch_unwind` catches.
const MAX_ROW_ACTIVATION_BYTES: usize = 512 << 20;
/// The most the rows of one forward pass may take together (rows beyond run in further
/// passes): 32 rows of a model of 860 MB per row asked for 27.5 GB and aborted the server.
const MAX_PASS_ACTIVATION_BYTES: usize = 1 << 30;

/// The most one gradient pass (forward and backward) may keep, estimated as
/// [`GRADIENT_ROW_FACTOR`] times each row's largest forward tensor.
const MAX_GRADIENT_PASS_BYTES: usize = 256 << 20;
/// The most one row's gradient pass may keep: a model whose row alone passes it has no
/// gradients here (its requests are refused as over the working-memory limit).
const MAX_GRADIENT_ROW_BYTES: usize = 1 << 30;
/// The largest architecture file read.
const MAX_ARCHITECTURE_BYTES: usize = 4 << 20;

/// What a row's forward and backward pass keep, in units of its largest forward tensor
/// (measured on the lesion model: about 34 MB a row, 14.5 times its largest, conv2's 2.4 MB
/// unfolded input; rounded up).
const GRADIENT_ROW_FACTOR: usize = 16;
/// What a gradient pass keeps for the weights, in units of their bytes, whatever its rows:
/// candle's backward pass makes each weight's gradient (a linear layer of 256 MiB of weights
/// took ~560 MB in one row's pass, estimated at 64 MiB: a re-attack's finding).
const WEIGHT_GRADIENT_FACTOR: usize = 3;
/// The same in units of what its forward pass keeps for the backward one (every layer's
/// output, a convolution's unfolded input; [`Net::kept_bytes`]): the activations, their
/// gradients and the autograd's own copies. The largest tensor alone misses the depth: 100
/// small layers took 3.4 GB for a pass estimated at 256 MiB, 300 aborted the server (a
/// red-team finding).
const GRADIENT_KEPT_FACTOR: usize = 3;

/// A candle model ready to run. Instances share the weights (candle tensors are
/// reference-counted and immutable).
pub struct CandleBackend {
    net: Arc<Net>,
    metadata: Arc<ModelMetadata>,
}

fn invalid(name: &Path, reason: impl Into<String>) -> InferenceError {
    InferenceError::load(name, reason.into())
}

fn dims(shape: &[i64]) -> String {
    format!("{shape:?}")
}

impl CandleBackend {
    /// Builds `architecture` from its architecture file (`config`, named `config_name`) and
    /// safetensors weights (named `name`). The names only label errors: an error in the
    /// architecture file names it, not the weights (a review's finding).
    pub fn load(
        architecture: &str,
        config: &[u8],
        config_name: &Path,
        weights: &[u8],
        name: &Path,
        options: &LoadOptions,
    ) -> Result<Self, InferenceError> {
        if architecture != CONV_CLASSIFIER {
            return Err(invalid(
                name,
                format!(
                    "unknown candle architecture {architecture:?}; this build implements {ARCHITECTURES:?}"
                ),
            ));
        }
        // A few KiB in practice; parsed whole, a 400 MB one took 7 GB (a red-team finding).
        if config.len() > MAX_ARCHITECTURE_BYTES {
            return Err(invalid(
                config_name,
                format!(
                    "architecture file of {} bytes; at most {} MiB",
                    config.len(),
                    MAX_ARCHITECTURE_BYTES >> 20
                ),
            ));
        }
        let file: ArchitectureFile = serde_json::from_slice(config)
            .map_err(|e| invalid(config_name, format!("architecture file: {e}")))?;
        let device = device(options).map_err(|e| invalid(name, e))?;
        let tensors = candle_core::safetensors::load_buffer(weights, &device)
            .map_err(|e| invalid(name, format!("not a valid safetensors file: {e}")))?;
        // Its checks are of the architecture, against itself and the weights.
        let (net, metadata) = build(&file, tensors, device).map_err(|e| invalid(config_name, e))?;
        Ok(CandleBackend {
            net: Arc::new(net),
            metadata: Arc::new(metadata),
        })
    }
}

fn device(options: &LoadOptions) -> Result<Device, String> {
    match options.execution_provider {
        ExecutionProvider::Cpu => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        ExecutionProvider::Cuda { device_id } => Device::new_cuda(device_id.max(0) as usize)
            .map_err(|e| format!("cannot open CUDA device {device_id}: {e}")),
        #[cfg(not(feature = "cuda"))]
        ExecutionProvider::Cuda { .. } => Err(
            "the candle backend was built without its `cuda` feature; it runs on the CPU only"
                .into(),
        ),
    }
}

/// Checks the architecture against itself and the weights, and builds the layers.
fn build(
    file: &ArchitectureFile,
    mut tensors: HashMap<String, CTensor>,
    device: Device,
) -> Result<(Net, ModelMetadata), String> {
    if file.format != 1 {
        return Err(format!(
            "architecture format {} is not supported (this build reads 1)",
            file.format
        ));
    }
    if file.dtype != "F32" {
        return Err(format!(
            "dtype {:?} is not supported (F32 only)",
            file.dtype
        ));
    }
    if file.input.layout.as_deref().is_some_and(|l| l != "NCHW") {
        return Err(format!(
            "input layout {:?} is not supported (NCHW only)",
            file.input.layout
        ));
    }
    let [-1, c, h, w] = file.input.shape[..] else {
        return Err(format!(
            "input shape {} must be [-1, C, H, W]",
            dims(&file.input.shape)
        ));
    };
    if c <= 0 || h <= 0 || w <= 0 {
        return Err(format!(
            "input shape {} must have positive C, H, W",
            dims(&file.input.shape)
        ));
    }
    let input = [c as usize, h as usize, w as usize];
    // The shape of one row after each layer: [C, H, W] or [F].
    let mut shape: Vec<usize> = input.to_vec();
    let mut used: HashSet<String> = HashSet::new();
    let mut take = |name: &str, want: &[usize], layer: &str| -> Result<CTensor, String> {
        if !used.insert(name.to_owned()) {
            return Err(format!(
                "layer {layer:?}: tensor {name:?} is used by another layer too"
            ));
        }
        let t = tensors.remove(name).ok_or_else(|| {
            format!("layer {layer:?}: tensor {name:?} is not in the weights file")
        })?;
        if t.dtype() != DType::F32 {
            return Err(format!(
                "layer {layer:?}: tensor {name:?} is {:?}; the architecture is F32",
                t.dtype()
            ));
        }
        if t.dims() != want {
            return Err(format!(
                "layer {layer:?}: tensor {name:?} has shape {:?}, expected {want:?}",
                t.dims()
            ));
        }
        // A NaN or infinite weight makes every answer meaningless (NaN weights behind a ReLU
        // gave one plausible probability for every input).
        let finite = t
            .flatten_all()
            .and_then(|v| v.to_vec1::<f32>())
            .map_err(|e| format!("layer {layer:?}: tensor {name:?}: {e}"))?
            .iter()
            .all(|v| v.is_finite());
        if !finite {
            return Err(format!(
                "layer {layer:?}: tensor {name:?} holds NaN or infinite values"
            ));
        }
        Ok(t)
    };
    // The largest tensor one row makes (elements), over the layers.
    let Some(mut row_elements) = input
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|n| n.saturating_mul(4) <= MAX_ROW_ACTIVATION_BYTES)
    else {
        return Err(format!(
            "input shape {} takes more than {} MiB per row",
            dims(&file.input.shape),
            MAX_ROW_ACTIVATION_BYTES >> 20
        ));
    };
    let mut kept_elements = row_elements;
    let mut weight_elements = 0usize;
    let mut layers = Vec::with_capacity(file.layers.len());
    let mut gradcam = None;
    let mut seen_names = HashSet::new();
    let n_layers = file.layers.len();
    for (i, layer) in file.layers.iter().enumerate() {
        let (lname, declared) = match layer {
            Layer::Conv2d(s) => (&s.name, &s.output_shape),
            Layer::GlobalAvgPool(s) => (&s.name, &s.output_shape),
            Layer::Linear(s) => (&s.name, &s.output_shape),
            Layer::Softmax(s) => (&s.name, &s.output_shape),
        };
        if !seen_names.insert(lname.clone()) {
            return Err(format!("layer name {lname:?} appears twice"));
        }
        let fail = |m: String| Err(format!("layer {lname:?}: {m}"));
        match layer {
            Layer::Conv2d(s) => {
                let [ci, hh, ww] = shape[..] else {
                    return fail(format!(
                        "a conv2d needs an image [C, H, W]; the previous layer gives {shape:?}"
                    ));
                };
                if s.in_channels != ci {
                    return fail(format!(
                        "in_channels {} but its input has {ci} channels",
                        s.in_channels
                    ));
                }
                if s.groups != 1 || s.dilation != [1, 1] {
                    return fail("only groups = 1 and dilation [1, 1] are supported".into());
                }
                if s.stride[0] != s.stride[1] || s.padding[0] != s.padding[1] {
                    return fail("stride and padding must be the same along both axes".into());
                }
                let [kh, kw] = s.kernel_size;
                let (stride, pad) = (s.stride[0], s.padding[0]);
                if kh == 0 || kw == 0 || stride == 0 || s.out_channels == 0 {
                    return fail("kernel, stride and out_channels must be at least 1".into());
                }
                let want = [s.out_channels, s.in_channels, kh, kw];
                if s.weight_shape != want {
                    return fail(format!(
                        "weight_shape {:?} does not match [out, in, kh, kw] = {want:?}",
                        s.weight_shape
                    ));
                }
                let out = |len: usize, k: usize| {
                    pad.checked_mul(2)
                        .and_then(|p| len.checked_add(p))
                        .and_then(|v| v.checked_sub(k))
                        .map(|v| v / stride + 1)
                        .filter(|&v| v > 0)
                };
                let (Some(mut oh), Some(mut ow)) = (out(hh, kh), out(ww, kw)) else {
                    return fail(format!("a {kh}×{kw} kernel does not fit a {hh}×{ww} input"));
                };
                // Its output and its unfolded input (candle's convolution unfolds each
                // kernel window: C·kh·kw values per output position).
                let positions = oh.checked_mul(ow);
                let sizes = positions.and_then(|p| {
                    let output = p.checked_mul(s.out_channels)?;
                    let unfolded = p.checked_mul(ci)?.checked_mul(kh)?.checked_mul(kw)?;
                    Some((output, unfolded))
                });
                match sizes {
                    Some((output, unfolded))
                        if output.max(unfolded).saturating_mul(4) <= MAX_ROW_ACTIVATION_BYTES =>
                    {
                        row_elements = row_elements.max(output.max(unfolded));
                        // Its output (and its activation's), its unfolded input.
                        kept_elements = kept_elements
                            .saturating_add(output.saturating_mul(2))
                            .saturating_add(unfolded);
                    }
                    _ => {
                        return fail(format!(
                            "its output ({} x {oh} x {ow}) or unfolded input takes more than {} MiB per row",
                            s.out_channels,
                            MAX_ROW_ACTIVATION_BYTES >> 20
                        ));
                    }
                }
                let weight = take(&s.weight, &want, lname)?;
                weight_elements = weight_elements
                    .saturating_add(want.iter().product::<usize>())
                    .saturating_add(s.out_channels);
                let bias = match (s.bias, &s.bias_tensor) {
                    (true, Some(b)) => Some(take(b, &[s.out_channels], lname)?),
                    (false, None) => None,
                    _ => return fail("bias and bias_tensor disagree".into()),
                };
                let relu = match s.activation.as_deref() {
                    Some("relu") => true,
                    None | Some("none") => false,
                    Some(other) => return fail(format!("activation {other:?} is not supported")),
                };
                let pool = match &s.pool {
                    None => None,
                    Some(p) => {
                        if p.kind != "max" {
                            return fail(format!("pool type {:?} is not supported", p.kind));
                        }
                        let k = p.kernel_size[0];
                        if p.kernel_size != [k, k]
                            || p.stride != [k, k]
                            || p.padding != [0, 0]
                            || k == 0
                        {
                            return fail(
                                "only a square max pool with stride = kernel and no padding is supported"
                                    .into(),
                            );
                        }
                        if oh % k != 0 || ow % k != 0 {
                            return fail(format!(
                                "a {k}×{k} pool does not tile its {oh}×{ow} input"
                            ));
                        }
                        oh /= k;
                        ow /= k;
                        kept_elements = kept_elements
                            .saturating_add(oh.saturating_mul(ow).saturating_mul(s.out_channels));
                        Some(k)
                    }
                };
                if s.gradcam_target || s.alias.as_deref() == Some("features_last") {
                    if gradcam.is_some() {
                        return fail("a second Grad-CAM target layer".into());
                    }
                    gradcam = Some(i);
                }
                let _ = (&s.onnx_tensor, s.lesion_map_channel);
                shape = vec![s.out_channels, oh, ow];
                layers.push(Built::Conv {
                    conv: Conv2d::new(
                        weight,
                        bias,
                        Conv2dConfig {
                            padding: pad,
                            stride,
                            dilation: 1,
                            groups: 1,
                            cudnn_fwd_algo: None,
                        },
                    ),
                    relu,
                    pool,
                });
            }
            Layer::GlobalAvgPool(_) => {
                let [ci, _, _] = shape[..] else {
                    return fail(format!(
                        "a global average pool needs an image [C, H, W]; the previous layer gives {shape:?}"
                    ));
                };
                shape = vec![ci];
                layers.push(Built::GlobalAvgPool);
            }
            Layer::Linear(s) => {
                let [f] = shape[..] else {
                    return fail(format!(
                        "a linear layer needs features [F]; the previous layer gives {shape:?}"
                    ));
                };
                if s.in_features != f {
                    return fail(format!(
                        "in_features {} but its input has {f} features",
                        s.in_features
                    ));
                }
                let want = [s.out_features, s.in_features];
                if s.weight_shape != want {
                    return fail(format!(
                        "weight_shape {:?} does not match [out, in] = {want:?}",
                        s.weight_shape
                    ));
                }
                let weight = take(&s.weight, &want, lname)?;
                weight_elements = weight_elements
                    .saturating_add(want.iter().product::<usize>())
                    .saturating_add(s.out_features);
                let bias = match (s.bias, &s.bias_tensor) {
                    (true, Some(b)) => Some(take(b, &[s.out_features], lname)?),
                    (false, None) => None,
                    _ => return fail("bias and bias_tensor disagree".into()),
                };
                // Its output counts as a convolution's does (a linear layer of 10 million
                // outputs passed as 64 KB a row and took 5 GB for 32 rows: a red-team
                // finding).
                if s.out_features.saturating_mul(4) > MAX_ROW_ACTIVATION_BYTES {
                    return fail(format!(
                        "its output of {} features takes more than {} MiB per row",
                        s.out_features,
                        MAX_ROW_ACTIVATION_BYTES >> 20
                    ));
                }
                row_elements = row_elements.max(s.out_features);
                kept_elements = kept_elements.saturating_add(s.out_features);
                shape = vec![s.out_features];
                layers.push(Built::Linear(Linear::new(weight, bias)));
            }
            Layer::Softmax(s) => {
                if shape.len() != 1 || s.dim != 1 {
                    return fail("softmax is supported over the features (dim 1) of [N, F]".into());
                }
                if i + 1 != n_layers {
                    return fail("softmax must be the last layer".into());
                }
                layers.push(Built::Softmax);
            }
        }
        let got: Vec<i64> = std::iter::once(-1)
            .chain(shape.iter().map(|&d| d as i64))
            .collect();
        if declared != &got {
            return fail(format!(
                "output_shape {} but the layers give {}",
                dims(declared),
                dims(&got)
            ));
        }
    }
    if !matches!(layers.last(), Some(Built::Linear(_) | Built::Softmax)) || shape.len() != 1 {
        return Err("a conv-classifier ends in a linear layer (and an optional softmax)".into());
    }
    let out_shape: Vec<i64> = vec![-1, shape[0] as i64];
    if file.output.shape != out_shape {
        return Err(format!(
            "output shape {} but the layers give {}",
            dims(&file.output.shape),
            dims(&out_shape)
        ));
    }
    if let Some(labels) = &file.output.labels
        && labels.len() != shape[0]
    {
        return Err(format!(
            "{} output labels for {} classes",
            labels.len(),
            shape[0]
        ));
    }
    // The output's activation is the layers' own: "sigmoid" over a softmax layer was taken
    // without a word (a review's finding).
    let softmax = matches!(layers.last(), Some(Built::Softmax));
    match file.output.activation.as_deref() {
        None => {}
        Some("softmax") if softmax => {}
        Some("none" | "identity" | "logits") if !softmax => {}
        Some(other) => {
            return Err(format!(
                "output activation {other:?} but the layers end in {}",
                if softmax {
                    "a softmax (\"softmax\")"
                } else {
                    "a linear layer (\"none\")"
                }
            ));
        }
    }
    // Compared with bundle.toml's by the repository (Manifest::check_candle_output).
    let _ = (
        &file.input.preprocessing,
        &file.output.positive_label,
        &file.output.layout,
        &file.model,
        &file.version,
        &file.generated_by,
        &file.batchnorm,
        &file.tensor_layouts,
        &file.files,
        &file.same_as_onnx,
        &file.versions,
    );
    if !tensors.is_empty() {
        let mut left: Vec<&String> = tensors.keys().collect();
        left.sort();
        // Named up to ten (300,000 names made a 7.8 MB answer to every index request).
        let shown: Vec<&&String> = left.iter().take(10).collect();
        return Err(format!(
            "the weights file holds {} tensors no layer uses: {shown:?}{}",
            left.len(),
            if left.len() > shown.len() { " ..." } else { "" }
        ));
    }
    if gradcam.is_none() {
        // Default: the last convolution.
        gradcam = layers.iter().rposition(|l| matches!(l, Built::Conv { .. }));
    }
    let metadata = ModelMetadata {
        inputs: vec![TensorSpec {
            name: file.input.name.clone(),
            datatype: DataType::Fp32,
            shape: file.input.shape.clone(),
        }],
        outputs: vec![TensorSpec {
            name: file.output.name.clone(),
            datatype: DataType::Fp32,
            shape: out_shape,
        }],
    };
    Ok((
        Net {
            layers,
            gradcam,
            device,
            input,
            classes: shape[0],
            row_bytes: row_elements.saturating_mul(4),
            kept_bytes: kept_elements.saturating_mul(4),
            weight_bytes: weight_elements.saturating_mul(4),
        },
        metadata,
    ))
}

type CResult<T> = candle_core::Result<T>;

/// ReLU whose gradient at 0 is 0 (PyTorch's), for the gradient path.
fn relu_grad_path(x: &CTensor) -> CResult<CTensor> {
    let mask = x.gt(0f64)?.to_dtype(x.dtype())?;
    x.mul(&mask)
}

/// A `k×k`, stride-`k` max pool whose backward passes each window's gradient to the window's
/// first maximum in row-major order, as PyTorch's `max_pool2d` does (the sizes were checked
/// to tile at load). Each window becomes its own axis; a one-hot mask of its first arg-max
/// (computed on detached values, so it is a constant to autograd) selects the maximum:
/// `Σ window·mask` is exactly the maximum (the others are multiplied by 0) and its gradient is
/// the mask. Ties are common on real images (constant or padded areas give equal activations)
/// and are where routing matters: candle's own backward splits or scales the gradient there.
fn max_pool_grad_path(x: &CTensor, k: usize) -> CResult<CTensor> {
    let (n, c, h, w) = x.dims4()?;
    let windows = x
        .reshape((n, c, h / k, k, w / k, k))?
        .permute((0, 1, 2, 4, 3, 5))?
        .contiguous()?
        .reshape((n, c, h / k, w / k, k * k))?;
    let first = windows.detach().argmax_keepdim(4)?;
    let ids = CTensor::arange(0u32, (k * k) as u32, x.device())?.reshape((1, 1, 1, 1, k * k))?;
    let mask = ids.broadcast_eq(&first)?.to_dtype(x.dtype())?;
    windows.mul(&mask)?.sum(4)
}

impl Net {
    /// Runs layers `from..to` on `x`. `grad`: take the gradient path (see the module docs).
    fn run(&self, mut x: CTensor, from: usize, to: usize, grad: bool) -> CResult<CTensor> {
        for layer in &self.layers[from..to] {
            x = match layer {
                Built::Conv { conv, relu, pool } => {
                    let mut y = conv.forward(&x)?;
                    if *relu {
                        y = if grad { relu_grad_path(&y)? } else { y.relu()? };
                    }
                    match pool {
                        Some(k) if grad => max_pool_grad_path(&y, *k)?,
                        Some(k) => y.max_pool2d(*k)?,
                        None => y,
                    }
                }
                Built::GlobalAvgPool => x.mean(D::Minus1)?.mean(D::Minus1)?,
                Built::Linear(l) => l.forward(&x)?,
                Built::Softmax => candle_nn::ops::softmax(&x, 1)?,
            };
        }
        Ok(x)
    }

    /// Layers up to (not including) the softmax: the logits.
    fn logits_end(&self) -> usize {
        match self.layers.last() {
            Some(Built::Softmax) => self.layers.len() - 1,
            _ => self.layers.len(),
        }
    }

    fn rows_tensor(&self, data: &[f32], rows: usize) -> CResult<CTensor> {
        let [c, h, w] = self.input;
        CTensor::from_slice(data, (rows, c, h, w), &self.device)
    }

    /// A `[rows, classes]` one-hot mask of `targets`.
    fn one_hot(&self, targets: &[usize]) -> CResult<CTensor> {
        let mut m = vec![0f32; targets.len() * self.classes];
        for (r, &t) in targets.iter().enumerate() {
            m[r * self.classes + t] = 1.0;
        }
        CTensor::from_slice(&m, (targets.len(), self.classes), &self.device)
    }

    /// Grad-CAM maps `[rows, H, W]` of `rows` images.
    fn grad_cam(&self, data: &[f32], targets: &[usize]) -> CResult<Vec<f32>> {
        let layer = self
            .gradcam
            .ok_or_else(|| candle_core::Error::Msg("the model has no convolution".into()))?;
        let rows = targets.len();
        let x = self.rows_tensor(data, rows)?;
        // Activations A of the Grad-CAM layer, then the rest of the network from A as a leaf.
        let a = self.run(x, 0, layer + 1, false)?;
        let a = Var::from_tensor(&a)?;
        let logits = self.run(a.as_tensor().clone(), layer + 1, self.logits_end(), true)?;
        let score = logits.mul(&self.one_hot(targets)?)?.sum_all()?;
        let grads = score.backward()?;
        let g = grads
            .get(a.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("no gradient reached the layer".into()))?;
        // α_k: spatial mean of the gradient; map: ReLU(Σ_k α_k A_k).
        let alpha = g.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?;
        let cam = a
            .as_tensor()
            .broadcast_mul(&alpha)?
            .sum_keepdim(1)?
            .relu()?;
        let [_, h, w] = self.input;
        let up = cam.upsample_bilinear2d(h, w, false)?;
        up.flatten_all()?.to_vec1::<f32>()
    }

    /// Rows one forward pass may take ([`MAX_PASS_ACTIVATION_BYTES`]), at least one.
    fn rows_per_pass(&self) -> usize {
        (MAX_PASS_ACTIVATION_BYTES / self.row_bytes.max(1)).max(1)
    }

    /// The served output's `[rows, classes]` values (no gradient), in passes of at most
    /// [`Net::rows_per_pass`] rows.
    fn outputs(&self, data: &[f32], rows: usize) -> CResult<Vec<f32>> {
        let [c, h, w] = self.input;
        let len = c * h * w;
        let mut out = Vec::with_capacity(rows * self.classes);
        let mut start = 0;
        while start < rows {
            let end = (start + self.rows_per_pass()).min(rows);
            let x = self.rows_tensor(&data[start * len..end * len], end - start)?;
            out.extend(
                self.run(x, 0, self.layers.len(), false)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
            start = end;
        }
        Ok(out)
    }

    /// Integrated gradients of one image (`C·H·W` values) for `target`: the attribution
    /// map `[H, W]` (summed over channels) and `f(baseline)`. The path points run in chunks
    /// of `chunk`; `cancelled` is asked before each (see [`Backend::gradients`]).
    fn integrated_gradients(
        &self,
        x: &[f32],
        target: usize,
        baseline: f32,
        steps: usize,
        chunk: usize,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(Vec<f32>, f64), InferenceError> {
        let [c, h, w] = self.input;
        let len = c * h * w;
        let mut grad_sum = vec![0f64; len];
        let mut k = 0;
        while k < steps {
            if cancelled() {
                return Err(InferenceError::Cancelled);
            }
            let n = chunk.min(steps - k);
            let g = self
                .path_gradients(x, target, baseline, steps, k..k + n)
                .map_err(engine)?;
            for chunk in g.chunks_exact(len) {
                for (s, &v) in grad_sum.iter_mut().zip(chunk) {
                    *s += f64::from(v);
                }
            }
            k += n;
        }
        // Summed over channels: value i of the row is pixel i mod (h·w).
        let mut map = vec![0f64; h * w];
        for (i, (&xi, &g)) in x.iter().zip(&grad_sum).enumerate() {
            map[i % (h * w)] += (f64::from(xi) - f64::from(baseline)) * g / steps as f64;
        }
        let map: Vec<f32> = map.into_iter().map(|v| v as f32).collect();
        let base = vec![baseline; len];
        let f0 = self.outputs(&base, 1).map_err(engine)?[target];
        Ok((map, f64::from(f0)))
    }

    /// The gradients of `target`'s score at the path points `points` of `steps` (one forward
    /// and one backward pass of `points.len()` rows): `C·H·W` values per point, in order.
    fn path_gradients(
        &self,
        x: &[f32],
        target: usize,
        baseline: f32,
        steps: usize,
        points: std::ops::Range<usize>,
    ) -> CResult<Vec<f32>> {
        let n = points.len();
        let mut path = Vec::with_capacity(n * x.len());
        for j in points {
            let alpha = (j as f64 + 0.5) / steps as f64;
            path.extend(x.iter().map(|&v| {
                (f64::from(baseline) + alpha * (f64::from(v) - f64::from(baseline))) as f32
            }));
        }
        let input = Var::from_tensor(&self.rows_tensor(&path, n)?)?;
        let out = self.run(input.as_tensor().clone(), 0, self.layers.len(), true)?;
        let score = out.mul(&self.one_hot(&vec![target; n])?)?.sum_all()?;
        let grads = score.backward()?;
        grads
            .get(input.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("no gradient reached the input".into()))?
            .flatten_all()?
            .to_vec1::<f32>()
    }
}

fn to_tensor(values: Vec<f32>, shape: Vec<usize>) -> Result<Tensor, InferenceError> {
    Tensor::from_vec(shape, values).map_err(InferenceError::from)
}

fn engine(e: candle_core::Error) -> InferenceError {
    InferenceError::backend(NAME, e.to_string())
}

impl Backend for CandleBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    fn on_gpu(&self) -> bool {
        self.net.device.is_cuda()
    }

    fn infer(&mut self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, InferenceError> {
        let [input] = inputs.as_slice() else {
            return Err(InferenceError::backend(NAME, "the model takes one input"));
        };
        let spec = &self.metadata.inputs[0];
        let values = input
            .tensor
            .view::<f32>()
            .ok_or(InferenceError::UnsupportedDataType {
                backend: NAME,
                datatype: input.tensor.datatype(),
            })?;
        if !spec.accepts_shape(input.tensor.shape()) {
            return Err(InferenceError::ShapeMismatch {
                name: input.name.clone(),
                expected: spec.shape.clone(),
                got: input.tensor.shape().to_vec(),
            });
        }
        let rows = input.tensor.shape()[0];
        let data: Vec<f32> = values.iter().copied().collect();
        let out = self.net.outputs(&data, rows).map_err(engine)?;
        Ok(vec![NamedTensor::new(
            self.metadata.outputs[0].name.clone(),
            to_tensor(out, vec![rows, self.net.classes])?,
        )])
    }

    fn supports_gradients(&self) -> bool {
        true
    }

    fn gradients(
        &mut self,
        request: &GradientRequest,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<GradientSaliency, InferenceError> {
        let spec = &self.metadata.inputs[0];
        let input = &request.input;
        if input.name != spec.name || !spec.accepts_shape(input.tensor.shape()) {
            return Err(InferenceError::ShapeMismatch {
                name: input.name.clone(),
                expected: spec.shape.clone(),
                got: input.tensor.shape().to_vec(),
            });
        }
        let rows = input.tensor.shape()[0];
        if request.output != 0 {
            return Err(InferenceError::backend(NAME, "the model has one output"));
        }
        if request.targets.len() != rows || request.targets.iter().any(|&t| t >= self.net.classes) {
            return Err(InferenceError::backend(
                NAME,
                "one target class per row, each below the class count",
            ));
        }
        let data: Vec<f32> = input
            .tensor
            .view::<f32>()
            .ok_or(InferenceError::UnsupportedDataType {
                backend: NAME,
                datatype: input.tensor.datatype(),
            })?
            .iter()
            .copied()
            .collect();
        let [c, h, w] = self.net.input;
        let len = c * h * w;
        // One row whose pass alone would keep far more than a pass may is refused, not run
        // in a chunk of one (integrated gradients on a model of 536 MB a row took 9 GB: a
        // red-team finding).
        let fixed = self.net.gradient_pass_bytes();
        let row_pass = self.net.gradient_row_bytes().saturating_add(fixed);
        if row_pass > MAX_GRADIENT_ROW_BYTES {
            return Err(InferenceError::WorkingMemory {
                needed: row_pass as u64,
                limit: MAX_GRADIENT_ROW_BYTES as u64,
            });
        }
        // A forward and backward pass keeps every layer's activations and their gradients:
        // about 15 times a row's largest forward tensor (chunks of 32 path points on the
        // lesion model peaked at 1.2 GB, none of it charged to the server's memory budget:
        // a red-team finding). Chunks are sized to keep that within MAX_GRADIENT_PASS_BYTES.
        let chunk = request.max_batch.max(1).min(
            (MAX_GRADIENT_PASS_BYTES.saturating_sub(fixed) / self.net.gradient_row_bytes().max(1))
                .max(1),
        );
        let mut values = Vec::with_capacity(rows * h * w);
        let mut gaps = vec![];
        let mut bases = vec![];
        match request.method {
            GradientMethod::GradCam => {
                for start in (0..rows).step_by(chunk) {
                    if cancelled() {
                        return Err(InferenceError::Cancelled);
                    }
                    let end = (start + chunk).min(rows);
                    let maps = self
                        .net
                        .grad_cam(&data[start * len..end * len], &request.targets[start..end])
                        .map_err(engine)?;
                    values.extend(maps);
                }
            }
            GradientMethod::IntegratedGradients { baseline, steps } => {
                if steps == 0 || !baseline.is_finite() {
                    return Err(InferenceError::backend(
                        NAME,
                        "integrated gradients need steps >= 1 and a finite baseline",
                    ));
                }
                let scores = self.net.outputs(&data, rows).map_err(engine)?;
                for r in 0..rows {
                    let target = request.targets[r];
                    let (map, f0) = self.net.integrated_gradients(
                        &data[r * len..(r + 1) * len],
                        target,
                        baseline,
                        steps,
                        chunk,
                        cancelled,
                    )?;
                    let fx = f64::from(scores[r * self.net.classes + target]);
                    let sum: f64 = map.iter().map(|&v| f64::from(v)).sum();
                    gaps.push(sum - (fx - f0));
                    bases.push(f0);
                    values.extend(map);
                }
            }
        }
        Ok(GradientSaliency {
            values,
            height: h,
            width: w,
            forward_passes: request.method.passes_per_row() * rows,
            completeness_gap: gaps,
            baseline_score: bases,
        })
    }

    fn forks_share_the_model(&self) -> bool {
        true
    }

    fn fork(&self) -> Result<Box<dyn Backend>, InferenceError> {
        Ok(Box::new(CandleBackend {
            net: self.net.clone(),
            metadata: self.metadata.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-scale, scale).
    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// A safetensors file, written by hand from its specification (8-byte little-endian
    /// header length, JSON header, data).
    fn safetensors(tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in tensors {
            header.insert(
                (*name).into(),
                serde_json::json!({"dtype": dtype, "shape": shape,
                    "data_offsets": [data.len(), data.len() + bytes.len()]}),
            );
            data.extend_from_slice(bytes);
        }
        let mut h = serde_json::to_vec(&header).unwrap();
        while !h.len().is_multiple_of(8) {
            h.push(b' ');
        }
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend(h);
        out.extend(data);
        out
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// A small conv-classifier: [1, 8, 8] → conv 3 (ReLU, pool 2) → conv 4 (ReLU, Grad-CAM
    /// layer) → GAP → linear 2 → softmax.
    fn architecture() -> serde_json::Value {
        serde_json::json!({
            "format": 1, "dtype": "F32",
            "input": {"name": "image", "shape": [-1, 1, 8, 8], "layout": "NCHW"},
            "output": {"name": "p", "shape": [-1, 2], "labels": ["a", "b"]},
            "layers": [
                {"name": "c1", "type": "conv2d", "in_channels": 1, "out_channels": 3,
                 "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1],
                 "groups": 1, "bias": true, "weight": "c1.weight", "weight_shape": [3, 1, 3, 3],
                 "bias_tensor": "c1.bias", "activation": "relu",
                 "pool": {"type": "max", "kernel_size": [2, 2], "stride": [2, 2], "padding": [0, 0]},
                 "output_shape": [-1, 3, 4, 4]},
                {"name": "c2", "type": "conv2d", "in_channels": 3, "out_channels": 4,
                 "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1],
                 "groups": 1, "bias": true, "weight": "c2.weight", "weight_shape": [4, 3, 3, 3],
                 "bias_tensor": "c2.bias", "activation": "relu", "pool": null,
                 "output_shape": [-1, 4, 4, 4], "gradcam_target": true},
                {"name": "gap", "type": "global_avg_pool", "output_shape": [-1, 4]},
                {"name": "fc", "type": "linear", "in_features": 4, "out_features": 2, "bias": true,
                 "weight": "fc.weight", "weight_shape": [2, 4], "bias_tensor": "fc.bias",
                 "output_shape": [-1, 2]},
                {"name": "sm", "type": "softmax", "dim": 1, "output_shape": [-1, 2]}
            ]
        })
    }

    fn weights() -> Vec<(&'static str, &'static str, Vec<usize>, Vec<u8>)> {
        let t = |name, shape: Vec<usize>, seed, scale| {
            let n = shape.iter().product();
            (name, "F32", shape, f32_bytes(&values(n, seed, scale)))
        };
        vec![
            t("c1.weight", vec![3, 1, 3, 3], 1, 0.8),
            t("c1.bias", vec![3], 2, 0.2),
            t("c2.weight", vec![4, 3, 3, 3], 3, 0.5),
            t("c2.bias", vec![4], 4, 0.2),
            t("fc.weight", vec![2, 4], 5, 1.5),
            t("fc.bias", vec![2], 6, 0.1),
        ]
    }

    fn load(
        arch: &serde_json::Value,
        w: &[(&str, &str, Vec<usize>, Vec<u8>)],
    ) -> Result<CandleBackend, String> {
        CandleBackend::load(
            CONV_CLASSIFIER,
            &serde_json::to_vec(arch).unwrap(),
            Path::new("test/1/architecture.json"),
            &safetensors(w),
            Path::new("test/1/model.safetensors"),
            &LoadOptions::default(),
        )
        .map_err(|e| {
            let mut m = e.to_string();
            let mut s = std::error::Error::source(&e);
            while let Some(x) = s {
                m.push_str(": ");
                m.push_str(&x.to_string());
                s = x.source();
            }
            m
        })
    }

    fn image(rows: usize, seed: u64) -> NamedTensor {
        NamedTensor::new(
            "image",
            Tensor::from_vec(vec![rows, 1, 8, 8], values(rows * 64, seed, 1.5)).unwrap(),
        )
    }

    fn probabilities(b: &mut CandleBackend, x: &[f32]) -> Vec<f32> {
        let out = b
            .infer(vec![NamedTensor::new(
                "image",
                Tensor::from_vec(vec![x.len() / 64, 1, 8, 8], x.to_vec()).unwrap(),
            )])
            .unwrap();
        out[0]
            .tensor
            .view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect()
    }

    /// An architecture file over 4 MiB is refused before it is parsed (a 400 MB one took 7 GB
    /// to parse and loaded: a red-team finding); an input shape whose size overflows is
    /// refused with a reason (it panicked).
    #[test]
    fn oversized_architectures_and_inputs_are_refused_with_a_reason() {
        let mut a = architecture();
        a["model"] = serde_json::Value::from("x".repeat(5 << 20));
        let e = load(&a, &weights()).err().unwrap();
        assert!(e.contains("at most 4 MiB"), "{e}");
        let mut a = architecture();
        a["input"]["shape"] = serde_json::json!([-1, 1_i64 << 40, 1_i64 << 40, 1_i64 << 40]);
        let e = load(&a, &weights()).err().unwrap();
        assert!(e.contains("per row"), "{e}");
    }

    #[test]
    fn a_valid_architecture_loads_and_runs() {
        let mut b = load(&architecture(), &weights()).unwrap();
        assert_eq!(b.metadata().inputs[0].shape, vec![-1, 1, 8, 8]);
        assert_eq!(b.metadata().outputs[0].shape, vec![-1, 2]);
        let out = b.infer(vec![image(3, 9)]).unwrap();
        assert_eq!(out[0].tensor.shape(), &[3, 2]);
        for row in out[0].tensor.view::<f32>().unwrap().outer_iter() {
            assert!((row.sum() - 1.0).abs() < 1e-6);
        }
        assert!(b.supports_gradients());
    }

    /// Rows run in passes bounded by their activations give exactly the one-pass answer.
    #[test]
    fn rows_in_several_passes_answer_as_one_pass() {
        let mut one = load(&architecture(), &weights()).unwrap();
        let mut split = load(&architecture(), &weights()).unwrap();
        Arc::get_mut(&mut split.net).unwrap().row_bytes = MAX_PASS_ACTIVATION_BYTES / 2;
        assert_eq!(split.net.rows_per_pass(), 2);
        let x = image(5, 21);
        let a = one.infer(vec![x.clone()]).unwrap();
        let b = split.infer(vec![x]).unwrap();
        assert_eq!(a[0].tensor, b[0].tensor);
    }

    #[test]
    fn malformed_architectures_and_weights_are_load_errors() {
        let arch = architecture();
        let edit = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut a = arch.clone();
            f(&mut a);
            a
        };
        let w = weights();
        let cases: Vec<(serde_json::Value, Vec<_>, &str)> = vec![
            (
                edit(&|a| a["layers"][2]["type"] = "attention".into()),
                w.clone(),
                "unknown variant `attention`",
            ),
            (
                edit(&|a| a["layers"][1]["in_channels"] = 5.into()),
                w.clone(),
                "in_channels 5 but its input has 3 channels",
            ),
            (
                edit(&|a| a["layers"][0]["output_shape"] = serde_json::json!([-1, 3, 8, 8])),
                w.clone(),
                "output_shape [-1, 3, 8, 8] but the layers give [-1, 3, 4, 4]",
            ),
            (
                edit(&|a| a["layers"][0]["kernel"] = 3.into()),
                w.clone(),
                "unknown field `kernel`",
            ),
            (
                edit(&|a| a["layers"][3]["in_features"] = 8.into()),
                w.clone(),
                "in_features 8 but its input has 4 features",
            ),
            (
                edit(&|a| a["output"]["shape"] = serde_json::json!([-1, 3])),
                w.clone(),
                "output shape [-1, 3]",
            ),
            (
                edit(&|a| a["output"]["activation"] = "sigmoid".into()),
                w.clone(),
                "output activation \"sigmoid\" but the layers end in a softmax",
            ),
            (
                edit(&|a| a["output"]["activation"] = "none".into()),
                w.clone(),
                "output activation \"none\" but the layers end in a softmax",
            ),
            (
                edit(&|a| a["layers"][0]["pool"]["stride"] = serde_json::json!([1, 1])),
                w.clone(),
                "stride = kernel",
            ),
            (
                edit(&|a| {
                    a["layers"].as_array_mut().unwrap().remove(2);
                }),
                w.clone(),
                "a linear layer needs features",
            ),
            (
                edit(&|a| {
                    let sm = a["layers"][4].clone();
                    a["layers"].as_array_mut().unwrap().insert(3, sm);
                }),
                w.clone(),
                "softmax must be the last layer",
            ),
            (
                arch.clone(),
                w.iter().filter(|t| t.0 != "c2.bias").cloned().collect(),
                "tensor \"c2.bias\" is not in the weights file",
            ),
            (
                arch.clone(),
                w.iter()
                    .cloned()
                    .chain([("extra", "F32", vec![1], f32_bytes(&[1.0]))])
                    .collect(),
                "tensors no layer uses: [\"extra\"]",
            ),
            (
                arch.clone(),
                w.iter()
                    .map(|t| {
                        if t.0 == "fc.weight" {
                            ("fc.weight", "F32", vec![4, 2], t.3.clone())
                        } else {
                            t.clone()
                        }
                    })
                    .collect(),
                "has shape [4, 2], expected [2, 4]",
            ),
            (
                arch.clone(),
                w.iter()
                    .map(|t| {
                        if t.0 == "fc.bias" {
                            ("fc.bias", "F64", vec![2], vec![0u8; 16])
                        } else {
                            t.clone()
                        }
                    })
                    .collect(),
                "is F64; the architecture is F32",
            ),
            // Red team: consistent but huge (2.5 TB at warm-up, an abort), and a padding
            // whose doubling overflows (a panic in a debug build).
            (
                edit(&|a| a["layers"][0]["padding"] = serde_json::json!([99945, 99945])),
                w.clone(),
                "MiB per row",
            ),
            (
                edit(&|a| a["layers"][0]["padding"] = serde_json::json!([1u64 << 63, 1u64 << 63])),
                w.clone(),
                "does not fit",
            ),
            // NaN or infinite weights (NaN behind a ReLU answered one probability for all).
            (
                arch.clone(),
                w.iter()
                    .map(|t| {
                        if t.0 == "c2.weight" {
                            let mut v = values(4 * 3 * 3 * 3, 3, 0.5);
                            v[7] = f32::NAN;
                            ("c2.weight", "F32", t.2.clone(), f32_bytes(&v))
                        } else {
                            t.clone()
                        }
                    })
                    .collect(),
                "tensor \"c2.weight\" holds NaN or infinite values",
            ),
            (
                arch.clone(),
                w.iter()
                    .map(|t| {
                        if t.0 == "fc.bias" {
                            ("fc.bias", "F32", vec![2], f32_bytes(&[f32::INFINITY, 0.0]))
                        } else {
                            t.clone()
                        }
                    })
                    .collect(),
                "tensor \"fc.bias\" holds NaN or infinite values",
            ),
        ];
        // Unused tensors are counted and named up to ten.
        let names: Vec<String> = (0..300).map(|i| format!("unused{i:03}")).collect();
        let many: Vec<_> = w
            .iter()
            .cloned()
            .chain(
                names
                    .iter()
                    .map(|n| (n.as_str(), "F32", vec![1], f32_bytes(&[1.0]))),
            )
            .collect();
        let e = load(&arch, &many).err().expect("unused tensors refused");
        assert!(e.contains("300 tensors no layer uses"), "{e}");
        assert!(e.len() < 600, "{}", e.len());
        for (a, w, why) in cases {
            let e = load(&a, &w)
                .err()
                .unwrap_or_else(|| panic!("{why}: loaded"));
            assert!(e.contains(why), "expected {why:?} in {e:?}");
        }
        // Bytes that are not a safetensors file, or a truncated one.
        let good = safetensors(&weights());
        for bytes in [
            b"not safetensors".to_vec(),
            good[..good.len() - 10].to_vec(),
            vec![],
        ] {
            let e = CandleBackend::load(
                CONV_CLASSIFIER,
                &serde_json::to_vec(&arch).unwrap(),
                Path::new("test/1/architecture.json"),
                &bytes,
                Path::new("m"),
                &LoadOptions::default(),
            )
            .err()
            .expect("refused");
            assert!(
                format!("{:?}", e).contains("not a valid safetensors file"),
                "{e:?}"
            );
        }
        // Not JSON, an unknown architecture name.
        let e = CandleBackend::load(
            CONV_CLASSIFIER,
            b"{",
            Path::new("test/1/architecture.json"),
            &good,
            Path::new("m"),
            &LoadOptions::default(),
        )
        .err()
        .unwrap();
        assert!(format!("{e:?}").contains("architecture file"), "{e:?}");
        // named by its own name, not the weights'
        assert!(e.to_string().contains("test/1/architecture.json"), "{e}");
        let e = CandleBackend::load(
            "transformer",
            &[],
            Path::new("test/1/architecture.json"),
            &good,
            Path::new("m"),
            &LoadOptions::default(),
        )
        .err()
        .unwrap();
        assert!(
            format!("{e:?}").contains("unknown candle architecture"),
            "{e:?}"
        );
    }

    fn ig(
        b: &mut CandleBackend,
        x: NamedTensor,
        targets: Vec<usize>,
        steps: usize,
        batch: usize,
    ) -> GradientSaliency {
        b.gradients(
            &GradientRequest {
                input: x,
                output: 0,
                targets,
                method: GradientMethod::IntegratedGradients {
                    baseline: 0.0,
                    steps,
                },
                max_batch: batch,
            },
            &|| false,
        )
        .unwrap()
    }

    /// Completeness (Sundararajan et al., axiom): the attributions sum to f(x) − f(baseline);
    /// f is read from plain inference, not from the gradient code.
    #[test]
    fn integrated_gradients_are_complete() {
        let mut b = load(&architecture(), &weights()).unwrap();
        let x = image(3, 21);
        let data: Vec<f32> = x.tensor.view::<f32>().unwrap().iter().copied().collect();
        let p = probabilities(&mut b, &data);
        let p0 = probabilities(&mut b, &[0.0; 64]);
        let targets = vec![0, 1, 1];
        let s = ig(&mut b, x, targets.clone(), 2000, 64);
        assert_eq!(s.values.len(), 3 * 64);
        assert_eq!(s.forward_passes, 3 * 2001);
        for r in 0..3 {
            let t = targets[r];
            let sum: f64 = s.values[r * 64..(r + 1) * 64]
                .iter()
                .map(|&v| f64::from(v))
                .sum();
            let want = f64::from(p[r * 2 + t]) - f64::from(p0[t]);
            assert!((sum - want).abs() < 1e-3, "row {r}: {sum} vs {want}");
            assert!((s.baseline_score[r] - f64::from(p0[t])).abs() < 1e-6);
            assert!((s.completeness_gap[r] - (sum - want)).abs() < 1e-5);
        }
    }

    /// Equal activations in a pooling window (constant areas of real images) must pass the
    /// gradient once, to one of them, or completeness breaks.
    #[test]
    fn integrated_gradients_are_complete_where_pools_tie() {
        let mut b = load(&architecture(), &weights()).unwrap();
        // Four constant quadrants.
        let data: Vec<f32> = (0..64)
            .map(|i| [1.5f32, -0.5, 0.75, 2.0][(i / 32) * 2 + (i % 8) / 4])
            .collect();
        let p = probabilities(&mut b, &data);
        let p0 = probabilities(&mut b, &[0.0; 64]);
        let x = NamedTensor::new("image", Tensor::from_vec(vec![1, 1, 8, 8], data).unwrap());
        for t in [0, 1] {
            let s = ig(&mut b, x.clone(), vec![t], 2000, 64);
            let sum: f64 = s.values.iter().map(|&v| f64::from(v)).sum();
            let want = f64::from(p[t]) - f64::from(p0[t]);
            assert!((sum - want).abs() < 1e-3, "target {t}: {sum} vs {want}");
        }
    }

    #[test]
    fn gradients_do_not_depend_on_the_chunk_size() {
        let mut b = load(&architecture(), &weights()).unwrap();
        let a = ig(&mut b, image(2, 5), vec![1, 0], 10, 64);
        let c = ig(&mut b, image(2, 5), vec![1, 0], 10, 3);
        for (x, y) in a.values.iter().zip(&c.values) {
            assert!((x - y).abs() < 1e-6);
        }
        let cam = |b: &mut CandleBackend, batch| {
            b.gradients(
                &GradientRequest {
                    input: image(5, 8),
                    output: 0,
                    targets: vec![1, 1, 0, 1, 0],
                    method: GradientMethod::GradCam,
                    max_batch: batch,
                },
                &|| false,
            )
            .unwrap()
        };
        let a = cam(&mut b, 5);
        let c = cam(&mut b, 2);
        assert_eq!(a.forward_passes, 5);
        for (x, y) in a.values.iter().zip(&c.values) {
            assert!((x - y).abs() < 1e-6);
        }
    }

    /// The gradient job was refused for the working memory it would keep.
    fn assert_over_working_memory(result: Result<GradientSaliency, InferenceError>) {
        assert!(
            matches!(result, Err(InferenceError::WorkingMemory { .. })),
            "{:?}",
            result.map(|o| o.forward_passes)
        );
    }

    /// A gradient pass keeps its weights' gradients whatever its rows: a model whose weights
    /// alone would keep over the row limit has its gradients refused, and heavy weights leave
    /// fewer rows a pass (a linear layer of 256 MiB of weights took ~560 MB in one row's
    /// pass, estimated at 64 MiB: a re-attack's finding).
    #[test]
    fn a_gradient_pass_is_charged_for_its_weights_gradients() {
        let mut b = load(&architecture(), &weights()).unwrap();
        // c1 3x1x3x3 + 3, c2 4x3x3x3 + 4, fc 2x4 + 2, f32.
        assert_eq!(b.net.weight_bytes, (27 + 3 + 108 + 4 + 8 + 2) * 4);
        let plain = ig(&mut b, image(3, 5), vec![1, 0, 1], 8, 64);
        // Weights heavy enough that a pass has room for one row: the same answer, in more
        // passes.
        let room = MAX_GRADIENT_PASS_BYTES - b.net.gradient_row_bytes() / 2;
        Arc::get_mut(&mut b.net).unwrap().weight_bytes = room / WEIGHT_GRADIENT_FACTOR;
        let heavy = ig(&mut b, image(3, 5), vec![1, 0, 1], 8, 64);
        assert_eq!(plain.values, heavy.values);
        // Weights whose gradients alone pass the row limit: refused.
        Arc::get_mut(&mut b.net).unwrap().weight_bytes = MAX_GRADIENT_ROW_BYTES / 2;
        let refused = b.gradients(
            &GradientRequest {
                input: image(1, 5),
                output: 0,
                targets: vec![1],
                method: GradientMethod::GradCam,
                max_batch: 16,
            },
            &|| false,
        );
        assert_over_working_memory(refused);
    }

    /// A model of many small layers: its gradient pass keeps every layer's activations,
    /// which its largest tensor alone does not tell (100 such layers took 3.4 GB for a pass
    /// estimated at 256 MiB, 300 aborted the server: a red-team finding). Its rows then run
    /// one at a time, and a model too deep for one row's pass has its gradients refused.
    #[test]
    fn a_deep_model_is_charged_for_every_layer_of_its_gradient_pass() {
        let deep = |n: usize| {
            let mut layers: Vec<serde_json::Value> = (0..n)
                .map(|i| {
                    serde_json::json!({"name": format!("c{i}"), "type": "conv2d",
                        "in_channels": 4, "out_channels": 4, "kernel_size": [1, 1],
                        "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1,
                        "bias": false, "weight": format!("c{i}.weight"),
                        "weight_shape": [4, 4, 1, 1], "activation": "relu",
                        "output_shape": [-1, 4, 64, 64]})
                })
                .collect();
            layers.push(serde_json::json!({"name": "gap", "type": "global_avg_pool",
                "output_shape": [-1, 4]}));
            layers.push(
                serde_json::json!({"name": "fc", "type": "linear", "in_features": 4,
                "out_features": 2, "bias": false, "weight": "fc.weight", "weight_shape": [2, 4],
                "output_shape": [-1, 2]}),
            );
            let arch = serde_json::json!({
                "format": 1, "dtype": "F32",
                "input": {"name": "image", "shape": [-1, 4, 64, 64], "layout": "NCHW"},
                "output": {"name": "p", "shape": [-1, 2], "labels": ["a", "b"]},
                "layers": layers,
            });
            let names: Vec<String> = (0..n).map(|i| format!("c{i}.weight")).collect();
            let mut w: Vec<(&str, &str, Vec<usize>, Vec<u8>)> = names
                .iter()
                .map(|name| {
                    (
                        name.as_str(),
                        "F32",
                        vec![4, 4, 1, 1],
                        f32_bytes(&values(16, 1, 0.5)),
                    )
                })
                .collect();
            w.push((
                "fc.weight",
                "F32",
                vec![2, 4],
                f32_bytes(&values(8, 2, 0.5)),
            ));
            load(&arch, &w).unwrap()
        };
        let layer = 3 * 4 * 64 * 64 * 4; // output, activation, unfolded input; f32
        let b = deep(100);
        assert!(b.net.gradient_row_bytes() >= 100 * layer * GRADIENT_KEPT_FACTOR);
        assert!(b.net.row_bytes * GRADIENT_ROW_FACTOR < 100 * layer);
        // A few rows a pass (at most 4 within the pass budget; the largest tensor alone
        // made it 256).
        assert!(MAX_GRADIENT_PASS_BYTES / b.net.gradient_row_bytes() <= 4);
        // Deep enough that one row's pass is over the limit: refused.
        let mut b = deep(2000);
        let refused = b.gradients(
            &GradientRequest {
                input: NamedTensor::new(
                    "image",
                    Tensor::from_vec(vec![1, 4, 64, 64], vec![0.5f32; 4 * 64 * 64]).unwrap(),
                ),
                output: 0,
                targets: vec![1],
                method: GradientMethod::IntegratedGradients {
                    baseline: 0.0,
                    steps: 4,
                },
                max_batch: 16,
            },
            &|| false,
        );
        assert_over_working_memory(refused);
    }

    /// A cancelled job stops before its next pass: the check runs between chunks, and the
    /// answer says why. Asking it changes nothing otherwise.
    #[test]
    fn cancellation_is_asked_between_passes_and_stops_the_job() {
        let mut b = load(&architecture(), &weights()).unwrap();
        let polls = std::cell::Cell::new(0usize);
        let after_three = || {
            polls.set(polls.get() + 1);
            polls.get() > 3
        };
        let request = |steps, max_batch| GradientRequest {
            input: image(1, 5),
            output: 0,
            targets: vec![1],
            method: GradientMethod::IntegratedGradients {
                baseline: 0.0,
                steps,
            },
            max_batch,
        };
        let e = b
            .gradients(&request(1_000_000, 1), &after_three)
            .unwrap_err();
        assert!(matches!(e, InferenceError::Cancelled), "{e:?}");
        assert_eq!(
            polls.get(),
            4,
            "three chunks ran, the fourth was not started"
        );

        let cam = GradientRequest {
            method: GradientMethod::GradCam,
            ..request(1, 1)
        };
        let e = b.gradients(&cam, &|| true).unwrap_err();
        assert!(matches!(e, InferenceError::Cancelled), "{e:?}");

        // Never cancelled: asked once per chunk, and the same bits as without asking.
        polls.set(0);
        let counting = || {
            polls.set(polls.get() + 1);
            false
        };
        let asked = b.gradients(&request(10, 3), &counting).unwrap();
        assert_eq!(polls.get(), 4, "chunks of 3, 3, 3 and 1 path points");
        let plain = b.gradients(&request(10, 3), &|| false).unwrap();
        assert_eq!(asked, plain);
    }

    /// Grad-CAM of this head has a closed form: the logit is Σ_k fc[c,k]·mean(A_k) + b, so
    /// α_k = fc[c,k] / (h·w) and the map is ReLU(Σ_k fc[c,k]·A_k)/(h·w) before upsampling.
    /// Bilinear upsampling by 2 (half-pixel centres, edges clamped) preserves the mean, so
    /// the 8×8 map's mean equals the 4×4 map's (the upsampling itself is checked against
    /// numpy in `tests/candle.rs`).
    #[test]
    fn grad_cam_weights_are_the_head_weights() {
        let mut b = load(&architecture(), &weights()).unwrap();
        let x = image(2, 13);
        let data: Vec<f32> = x.tensor.view::<f32>().unwrap().iter().copied().collect();
        let net = b.net.clone();
        let a = net
            .run(net.rows_tensor(&data, 2).unwrap(), 0, 2, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let fc = values(8, 5, 1.5);
        let s = b
            .gradients(
                &GradientRequest {
                    input: x,
                    output: 0,
                    targets: vec![1, 0],
                    method: GradientMethod::GradCam,
                    max_batch: 8,
                },
                &|| false,
            )
            .unwrap();
        for (r, t) in [(0usize, 1usize), (1, 0)] {
            let mut small = [0f64; 16];
            for (p, v) in small.iter_mut().enumerate() {
                let z: f64 = (0..4)
                    .map(|k| f64::from(fc[t * 4 + k]) * f64::from(a[r * 64 + k * 16 + p]))
                    .sum();
                *v = z.max(0.0) / 16.0;
            }
            let want = small.iter().sum::<f64>() / 16.0;
            let got = s.values[r * 64..(r + 1) * 64]
                .iter()
                .map(|&v| f64::from(v))
                .sum::<f64>()
                / 64.0;
            assert!(
                (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                "row {r}: {got} vs {want}"
            );
        }
    }
}
