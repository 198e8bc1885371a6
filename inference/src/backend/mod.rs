//! The synchronous [`Backend`] trait and the engines that implement it.

use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::InferenceError;
use crate::explain::{GradientRequest, GradientSaliency};
use crate::tensor::{DataType, NamedTensor, Tensor};

#[cfg(feature = "candle")]
pub mod candle;
mod onnx_guard;
#[cfg(feature = "ort")]
pub mod ort;
#[cfg(feature = "tract")]
pub mod tract;

/// Name, datatype and shape of one model input or output. `-1` marks a dimension of any size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
}

impl TensorSpec {
    /// Whether a concrete shape fits this spec (same rank, fixed dimensions equal).
    pub fn accepts_shape(&self, shape: &[usize]) -> bool {
        self.shape.len() == shape.len()
            && self
                .shape
                .iter()
                .zip(shape)
                .all(|(&want, &got)| want < 0 || want as u64 == got as u64)
    }

    /// Whether the first dimension is variable, so requests can be stacked along it.
    pub fn has_dynamic_batch(&self) -> bool {
        self.shape.first().is_some_and(|&d| d < 0)
    }
}

/// What a loaded model takes and gives, as the backend read it from the model file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelMetadata {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

impl ModelMetadata {
    /// True when every input and output has a variable first dimension: the model can run
    /// several requests stacked along axis 0.
    pub fn supports_batching(&self) -> bool {
        !self.inputs.is_empty()
            && self.inputs.iter().all(TensorSpec::has_dynamic_batch)
            && self.outputs.iter().all(TensorSpec::has_dynamic_batch)
    }

    pub fn input(&self, name: &str) -> Option<&TensorSpec> {
        self.inputs.iter().find(|s| s.name == name)
    }

    pub fn output(&self, name: &str) -> Option<&TensorSpec> {
        self.outputs.iter().find(|s| s.name == name)
    }
}

/// A loaded model, ready to run. One instance is owned by one worker thread, so `infer`
/// takes `&mut self` and needs no locking; the plan an engine compiled at load time is shared
/// between instances where the engine allows it.
pub trait Backend: Send {
    /// The engine's name (`"tract"`, `"ort"`).
    fn name(&self) -> &'static str;

    /// Inputs and outputs as the model file declares them.
    fn metadata(&self) -> &ModelMetadata;

    /// Whether the model runs on a GPU: the CUDA execution provider was registered (ONNX
    /// Runtime) or the tensors live on a CUDA device (candle). `false` where a configured GPU
    /// was not usable and the engine fell back to the CPU.
    fn on_gpu(&self) -> bool {
        false
    }

    /// Cheap liveness check of the engine.
    fn health(&self) -> Result<(), InferenceError> {
        Ok(())
    }

    /// The largest batch this backend can run in one call: `usize::MAX` where the model has a
    /// variable batch dimension, `0` where it has none (requests run one by one, unbatched).
    fn max_batch_size(&self) -> usize {
        if self.metadata().supports_batching() {
            usize::MAX
        } else {
            0
        }
    }

    /// Runs the model. `inputs` are already checked against [`Backend::metadata`] and come in
    /// the order of `metadata().inputs`; the outputs come in the order of `metadata().outputs`.
    fn infer(&mut self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, InferenceError>;

    /// Whether [`Backend::gradients`] works: the engine can differentiate the model (the
    /// native candle backend; tract and ONNX Runtime run inference graphs only).
    fn supports_gradients(&self) -> bool {
        false
    }

    /// Gradient saliency maps (Grad-CAM, integrated gradients) of the request's rows.
    ///
    /// `cancelled` is asked before each forward/backward pass (each chunk of rows or of path
    /// points): once it answers `true` (the caller has gone: the HTTP layer gave up on the
    /// request and dropped its answer), the backend stops and returns
    /// [`InferenceError::Cancelled`]. A long explanation nobody waits for would otherwise hold
    /// the model's instance, and every request queued behind it, to its end. It never changes
    /// a result: a job that is not cancelled computes exactly what it would without it.
    fn gradients(
        &mut self,
        request: &GradientRequest,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<GradientSaliency, InferenceError> {
        let _ = (request, cancelled);
        Err(InferenceError::GradientsUnsupported {
            backend: self.name(),
        })
    }

    /// Another instance of the same loaded model for another worker thread, sharing what the
    /// engine compiled at load time where it can.
    fn fork(&self) -> Result<Box<dyn Backend>, InferenceError>;

    /// Whether [`Backend::fork`] shares the loaded model (no second copy of the weights): a
    /// worker then keeps one more fork to run lone requests of small models on the caller's
    /// thread (see [`crate::ModelWorker`]).
    fn forks_share_the_model(&self) -> bool {
        false
    }

    /// Whether a run on inputs of `shapes` keeps within the engine's working-memory limit
    /// (`Some(true)` where the engine has none; `None` when the shapes cannot tell, the
    /// sizes depending on values): a batcher runs joined requests one by one rather than
    /// have the joined batch refused ([`InferenceError::WorkingMemory`]).
    fn fits_working_memory(&self, _shapes: &[Vec<usize>]) -> Option<bool> {
        Some(true)
    }
}

/// Which engine runs a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// tract: pure Rust, always available in the default build.
    #[default]
    Tract,
    /// ONNX Runtime through the `ort` crate (cargo feature `ort`).
    Ort,
    /// Native candle models (`platform = "candle"` bundles; cargo feature `candle`, default).
    /// It runs architectures written in Rust, not ONNX files.
    Candle,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Tract => "tract",
            BackendKind::Ort => "ort",
            BackendKind::Candle => "candle",
        }
    }

    /// Whether this build was compiled with the engine.
    pub fn is_compiled(self) -> bool {
        match self {
            BackendKind::Tract => cfg!(feature = "tract"),
            BackendKind::Ort => cfg!(feature = "ort"),
            BackendKind::Candle => cfg!(feature = "candle"),
        }
    }
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tract" => Ok(BackendKind::Tract),
            "ort" | "onnxruntime" => Ok(BackendKind::Ort),
            other => Err(format!("unknown backend {other:?}; expected tract or ort")),
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where ONNX Runtime runs a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    #[default]
    Cpu,
    /// CUDA on the given device. ONNX Runtime falls back to the CPU (with a warning) where no
    /// GPU or CUDA library is usable; candle refuses to load.
    Cuda { device_id: i32 },
}

/// Which kernels run 2-D convolutions and max pooling on the tract engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TractKernels {
    /// Nightingale's (im2col + one matrix product per group of images; a plain max pool):
    /// 2–2.4× faster on the image bundles (docs/performance.md §16.2).
    #[default]
    Nightingale,
    /// tract's own.
    Tract,
}

/// How to load a model file.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub backend: BackendKind,
    /// Threads one inference may use inside the engine (`0` = the engine's default).
    pub intra_op_threads: usize,
    /// ONNX Runtime only.
    pub execution_provider: ExecutionProvider,
    /// ONNX Runtime only: the shared library to load (`libonnxruntime.so.*`). `None`: ort's own
    /// lookup (its `ORT_DYLIB_PATH` variable, then the system library path). Only the first
    /// ort load in a process chooses the library.
    pub ort_library: Option<std::path::PathBuf>,
    /// tract only: whose convolution, max-pool and strided-slice kernels run.
    pub tract_kernels: TractKernels,
    /// ONNX Runtime on a GPU only: run the model once on zeros at every batch size from 1 to
    /// this when a session opens (each instance), so that no request waits for cuDNN to
    /// plan its shape (`0`: none).
    pub gpu_warm_up_rows: usize,
    /// tract only: the most bytes of tensors one run may keep alive at once (`0`: 4 GiB,
    /// [`DEFAULT_MAX_WORKING_BYTES`]). A
    /// run that would pass it stops before the node that would, with
    /// [`InferenceError::WorkingMemory`], where an allocation that cannot be made would abort
    /// the process.
    pub max_working_bytes: u64,
}

/// The default limit of the tensors one run of a tract plan keeps alive at once
/// ([`LoadOptions::max_working_bytes`]).
pub const DEFAULT_MAX_WORKING_BYTES: u64 = 4 << 30;

/// The most bytes of zeros a warm-up or a probe gives a model (all its inputs together): a
/// bundle declaring an input of 2^31 values per row would otherwise have the server allocate
/// (and the engine compute on) gigabytes before it serves, whatever the request limits allow.
pub const PROBE_MAX_BYTES: u64 = 256 << 20;

/// Zeros for every input of `metadata`, the batch (a leading `-1`) set to `batch`.
pub enum Zeros {
    Ready(Vec<NamedTensor>),
    /// An input has another open dimension, or a datatype without a fixed size.
    Open,
    /// They would take this many bytes, more than [`PROBE_MAX_BYTES`].
    TooLarge(u64),
}

pub fn zeros(metadata: &ModelMetadata, batch: usize) -> Zeros {
    let mut shapes = Vec::with_capacity(metadata.inputs.len());
    let mut total: u64 = 0;
    for spec in &metadata.inputs {
        let mut shape = vec![];
        for (i, &d) in spec.shape.iter().enumerate() {
            match d {
                -1 if i == 0 => shape.push(batch),
                d if d >= 0 => shape.push(d as usize),
                _ => return Zeros::Open,
            }
        }
        let Some(size) = spec.datatype.element_size() else {
            return Zeros::Open;
        };
        let bytes = shape
            .iter()
            .try_fold(size as u64, |n, &d| n.checked_mul(d as u64))
            .unwrap_or(u64::MAX);
        total = total.saturating_add(bytes);
        shapes.push((spec, shape, bytes as usize));
    }
    if total > PROBE_MAX_BYTES {
        return Zeros::TooLarge(total);
    }
    let mut inputs = Vec::with_capacity(shapes.len());
    for (spec, shape, bytes) in shapes {
        let tensor = Tensor::from_raw(spec.datatype, shape, &vec![0u8; bytes])
            .expect("zeros of a size checked above");
        inputs.push(NamedTensor::new(spec.name.clone(), tensor));
    }
    Zeros::Ready(inputs)
}

/// Loads an ONNX model file with the chosen backend: reads it once, then [`load_bytes`].
pub fn load(path: &Path, options: &LoadOptions) -> Result<Box<dyn Backend>, InferenceError> {
    let model = std::fs::read(path).map_err(|e| InferenceError::load(path, e))?;
    load_bytes(&model, path, options)
}

/// Loads an ONNX model from its bytes with the chosen backend: parse, optimise and plan once,
/// here. Neither engine reads anything else from disk: a model whose tensors live in external
/// data files is refused (bundles ship self-contained models, so what was checksummed is
/// exactly what runs). `name` only labels errors.
pub fn load_bytes(
    model: &[u8],
    name: &Path,
    options: &LoadOptions,
) -> Result<Box<dyn Backend>, InferenceError> {
    onnx_guard::check(model, name)?;
    match options.backend {
        #[cfg(feature = "tract")]
        BackendKind::Tract => Ok(Box::new(tract::TractBackend::load_bytes(
            model, name, options,
        )?)),
        #[cfg(feature = "ort")]
        BackendKind::Ort => Ok(Box::new(ort::OrtBackend::load_bytes(model, name, options)?)),
        BackendKind::Candle => Err(InferenceError::load(
            name,
            "the candle backend runs native architectures (platform = \"candle\" bundles), not ONNX files",
        )),
        #[allow(unreachable_patterns)]
        other => Err(InferenceError::BackendNotCompiled {
            backend: other.as_str(),
        }),
    }
}

/// Loads a native candle model: `architecture` (a name this build implements, e.g.
/// `conv-classifier`), its architecture file's bytes and its safetensors weights. Everything
/// is checked before anything runs (see the candle backend's docs). `config_name` and
/// `name` (the weights') only label errors.
pub fn load_candle(
    architecture: &str,
    config: &[u8],
    config_name: &Path,
    weights: &[u8],
    name: &Path,
    options: &LoadOptions,
) -> Result<Box<dyn Backend>, InferenceError> {
    #[cfg(feature = "candle")]
    {
        Ok(Box::new(candle::CandleBackend::load(
            architecture,
            config,
            config_name,
            weights,
            name,
            options,
        )?))
    }
    #[cfg(not(feature = "candle"))]
    {
        let _ = (architecture, config, config_name, weights, name, options);
        Err(InferenceError::BackendNotCompiled { backend: "candle" })
    }
}
