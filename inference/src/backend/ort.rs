//! The ONNX Runtime backend (cargo feature `ort`), through the `ort` crate with its
//! `load-dynamic` feature: the ONNX Runtime shared library is loaded at run time (the
//! `onnxruntime` / `onnxruntime-gpu` PyPI wheels ship it), so the build downloads nothing.
//!
//! One process-wide ONNX Runtime environment; one session per instance (`Session::run` needs
//! `&mut`). The CUDA execution provider is registered when configured; where it cannot be
//! (no GPU, no CUDA library, a CPU-only ONNX Runtime) the session runs on the CPU, the load
//! logs a warning with ONNX Runtime's reason, and [`Backend::on_gpu`] says so (the model's
//! configuration then shows `KIND_CPU`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ort::environment::Environment;
use ort::session::Session;
use ort::value::{DynValue, Tensor as OrtTensor, TensorElementType, ValueType};

use super::{Backend, ExecutionProvider, LoadOptions, ModelMetadata, TensorSpec, Zeros, zeros};
use crate::error::InferenceError;
use crate::tensor::{DataType, NamedTensor, Tensor};

const NAME: &str = "ort";

/// The process-wide environment, created on first use.
fn environment(library: Option<&Path>) -> Result<Environment, String> {
    static ENV: Mutex<Option<Environment>> = Mutex::new(None);
    let mut env = ENV.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = env.as_ref() {
        return Ok(e.clone());
    }
    let builder = match library {
        Some(path) => ort::init_from(path)
            .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", path.display()))?,
        None => ort::init(),
    };
    let built = builder.with_name("nightingale").build().map_err(|e| {
        format!("cannot start ONNX Runtime (set ORT_DYLIB_PATH to libonnxruntime.so >= 1.31): {e}")
    })?;
    *env = Some(built.clone());
    Ok(built)
}

/// An ONNX Runtime session and the model bytes it was loaded from (to open more instances
/// without reading the file again).
pub struct OrtBackend {
    session: Session,
    metadata: Arc<ModelMetadata>,
    model: Arc<[u8]>,
    name: PathBuf,
    options: LoadOptions,
    /// The CUDA execution provider was registered on the session.
    on_gpu: bool,
}

impl OrtBackend {
    /// Opens a session on the model held in `model` (`name` only labels errors).
    pub fn load_bytes(
        model: &[u8],
        name: &Path,
        options: &LoadOptions,
    ) -> Result<Self, InferenceError> {
        Self::load_shared(Arc::from(model), name, options)
    }

    fn load_shared(
        model: Arc<[u8]>,
        name: &Path,
        options: &LoadOptions,
    ) -> Result<Self, InferenceError> {
        let path = name;
        let load_err = |e: String| InferenceError::load(path, e);
        let env = environment(options.ort_library.as_deref()).map_err(load_err)?;
        let mut builder = Session::builder(&env).map_err(|e| load_err(e.to_string()))?;
        if options.intra_op_threads > 0 {
            builder = builder
                .with_intra_threads(options.intra_op_threads)
                .map_err(|e| load_err(e.to_string()))?;
        }
        let mut on_gpu = false;
        if let ExecutionProvider::Cuda { device_id } = options.execution_provider {
            // Registered with `error_on_failure` so that a failure is known here (ort's default
            // is to fall back to the CPU without telling anyone). TF32 off: on Ampere and later
            // ONNX Runtime's default rounds convolution and matrix operands to 10 mantissa
            // bits, which moved the image bundles' probabilities by up to 1.5e-4 on an H200
            // and failed their self-tests (docs/performance.md §21). Heuristic cuDNN algorithm
            // choice: the default exhaustive search benchmarks every algorithm again for each
            // new input shape, and dynamic batching makes a new shape of every batch size
            // (ResNet-50 at 4 connections: 5 requests/s and 0.85 s p50 while it searched).
            builder = match builder.with_execution_providers([ort::ep::CUDA::default()
                .with_device_id(device_id)
                .with_tf32(false)
                .with_conv_algorithm_search(ort::ep::cuda::ConvAlgorithmSearch::Heuristic)
                .build()
                .error_on_failure()])
            {
                Ok(builder) => {
                    on_gpu = true;
                    builder
                }
                Err(e) => {
                    tracing::warn!(model = %path.display(), device_id, reason = %e,
                        "the CUDA execution provider could not be registered; the model runs on the CPU");
                    e.recover()
                }
            };
        }
        let session = builder
            .commit_from_memory(&model)
            .map_err(|e| load_err(e.to_string()))?;
        let spec = |o: &ort::value::Outlet| -> Result<TensorSpec, String> {
            match o.dtype() {
                ValueType::Tensor { ty, shape, .. } => Ok(TensorSpec {
                    name: o.name().to_owned(),
                    datatype: datatype_of(*ty).ok_or_else(|| {
                        format!(
                            "{:?} has element type {ty:?}, which KServe v2 cannot carry",
                            o.name()
                        )
                    })?,
                    shape: shape.iter().map(|&d| if d < 0 { -1 } else { d }).collect(),
                }),
                other => Err(format!(
                    "{:?} is a {other:?}, not a tensor; KServe v2 carries tensors only",
                    o.name()
                )),
            }
        };
        let metadata = ModelMetadata {
            inputs: session
                .inputs()
                .iter()
                .map(spec)
                .collect::<Result<_, _>>()
                .map_err(load_err)?,
            outputs: session
                .outputs()
                .iter()
                .map(spec)
                .collect::<Result<_, _>>()
                .map_err(load_err)?,
        };
        let mut backend = OrtBackend {
            session,
            metadata: Arc::new(metadata),
            model,
            name: name.to_owned(),
            options: options.clone(),
            on_gpu,
        };
        if on_gpu && options.gpu_warm_up_rows > 0 {
            backend.warm_up_batch_sizes(options.gpu_warm_up_rows)?;
        }
        Ok(backend)
    }

    /// Runs the model on zeros ([`zeros`]) at every batch size from 1 to `rows`. On the CUDA
    /// provider the first run of each input shape plans it (cuDNN's algorithm choice and
    /// execution plans, the memory arena's growth): 0.3 to 0.7 s for ResNet-50 on an H200, so
    /// under dynamic batching, which makes every batch size from 1 to the bundle's largest,
    /// the requests that met a new size waited that long (docs/performance.md §21). Skipped,
    /// with a log line, when an input has another open dimension or a datatype without a
    /// fixed size; stops before a batch whose zeros would pass [`super::PROBE_MAX_BYTES`].
    fn warm_up_batch_sizes(&mut self, rows: usize) -> Result<(), InferenceError> {
        let started = std::time::Instant::now();
        let mut warmed = 0;
        for batch in 1..=rows {
            match zeros(&self.metadata, batch) {
                Zeros::Ready(inputs) => self.infer(inputs)?,
                Zeros::Open => {
                    tracing::info!(model = %self.name.display(),
                        "not warmed up per batch size: an input has an open dimension besides the batch, or no fixed element size");
                    return Ok(());
                }
                Zeros::TooLarge(_) => {
                    tracing::info!(model = %self.name.display(), batch,
                        "warm-up per batch size stopped: the zeros would pass 256 MiB");
                    return Ok(());
                }
            };
            warmed = batch;
        }
        tracing::info!(model = %self.name.display(), batch_sizes = warmed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "warmed up on the GPU at every batch size");
        Ok(())
    }
}

fn datatype_of(ty: TensorElementType) -> Option<DataType> {
    Some(match ty {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::Uint8,
        TensorElementType::Uint16 => DataType::Uint16,
        TensorElementType::Uint32 => DataType::Uint32,
        TensorElementType::Uint64 => DataType::Uint64,
        TensorElementType::Int8 => DataType::Int8,
        TensorElementType::Int16 => DataType::Int16,
        TensorElementType::Int32 => DataType::Int32,
        TensorElementType::Int64 => DataType::Int64,
        TensorElementType::Float16 => DataType::Fp16,
        TensorElementType::Float32 => DataType::Fp32,
        TensorElementType::Float64 => DataType::Fp64,
        TensorElementType::String => DataType::Bytes,
        _ => return None,
    })
}

fn to_ort(tensor: Tensor) -> Result<DynValue, ort::Error> {
    Ok(match tensor {
        Tensor::Bool(a) => OrtTensor::from_array(a)?.into_dyn(),
        Tensor::Uint8(a) => OrtTensor::from_array(a)?.into_dyn(),
        Tensor::Uint16(a) => OrtTensor::from_array(a)?.into_dyn(),
        Tensor::Uint32(a) => OrtTensor::from_array(a)?.into_dyn(),
        Tensor::Uint64(a) => OrtTensor::from_array(a)?.into_dyn(),
        Tensor::Int8(a) => OrtTensor::from_array(a)?.into_dyn(),
        Tensor::Int16(a) => OrtTensor::from_array(a)?.into_dyn(),
        Tensor::Int32(a) => OrtTensor::from_array(a)?.into_dyn(),
        Tensor::Int64(a) => OrtTensor::from_array(a)?.into_dyn(),
        Tensor::Fp16(a) => OrtTensor::from_array(a)?.into_dyn(),
        Tensor::Fp32(a) => OrtTensor::from_array(a)?.into_dyn(),
        Tensor::Fp64(a) => OrtTensor::from_array(a)?.into_dyn(),
        Tensor::Bytes(a) => {
            let strings = a.mapv(|b| String::from_utf8_lossy(&b).into_owned());
            OrtTensor::from_string_array(&strings)?.into_dyn()
        }
    })
}

fn from_ort(value: &DynValue, datatype: DataType) -> Result<Tensor, ort::Error> {
    macro_rules! arr {
        ($t:ty, $variant:ident) => {
            Tensor::$variant(value.try_extract_array::<$t>()?.to_owned())
        };
    }
    Ok(match datatype {
        DataType::Bool => arr!(bool, Bool),
        DataType::Uint8 => arr!(u8, Uint8),
        DataType::Uint16 => arr!(u16, Uint16),
        DataType::Uint32 => arr!(u32, Uint32),
        DataType::Uint64 => arr!(u64, Uint64),
        DataType::Int8 => arr!(i8, Int8),
        DataType::Int16 => arr!(i16, Int16),
        DataType::Int32 => arr!(i32, Int32),
        DataType::Int64 => arr!(i64, Int64),
        DataType::Fp16 => arr!(half::f16, Fp16),
        DataType::Fp32 => arr!(f32, Fp32),
        DataType::Fp64 => arr!(f64, Fp64),
        DataType::Bytes => {
            let (shape, strings) = value.try_extract_strings()?;
            let shape: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
            let bytes: Vec<Vec<u8>> = strings.into_iter().map(String::into_bytes).collect();
            Tensor::Bytes(
                ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&shape), bytes)
                    .map_err(|e| ort::Error::new(e.to_string()))?,
            )
        }
    })
}

impl Backend for OrtBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    fn on_gpu(&self) -> bool {
        self.on_gpu
    }

    fn infer(&mut self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, InferenceError> {
        let err = |e: ort::Error| InferenceError::backend(NAME, e.to_string());
        let values: Vec<(String, DynValue)> = inputs
            .into_iter()
            .map(|t| Ok((t.name, to_ort(t.tensor).map_err(err)?)))
            .collect::<Result<_, InferenceError>>()?;
        let outputs = self.session.run(values).map_err(err)?;
        self.metadata
            .outputs
            .iter()
            .map(|spec| {
                let value = outputs.get(spec.name.as_str()).ok_or_else(|| {
                    InferenceError::backend(NAME, format!("output {:?} missing", spec.name))
                })?;
                Ok(NamedTensor::new(
                    spec.name.clone(),
                    from_ort(value, spec.datatype).map_err(err)?,
                ))
            })
            .collect()
    }

    fn fork(&self) -> Result<Box<dyn Backend>, InferenceError> {
        Ok(Box::new(OrtBackend::load_shared(
            self.model.clone(),
            &self.name,
            &self.options,
        )?))
    }
}
