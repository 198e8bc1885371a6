//! Triton's model configuration extension (`GET /v2/models/{model}[/versions/{v}]/config`,
//! gRPC `ModelConfig`): how a served version is set up, in Triton's `ModelConfig` form, so
//! that clients written for Triton (which read `max_batch_size`, the inputs' `dims` and
//! `format`, `dynamic_batching`) work unchanged. Built from what serves: the model's tensors
//! as the worker checks them, the bundle's `[batching]` and `[version_policy]`, the engine,
//! the instance count. Read-only: a configuration cannot be changed through it.
//!
//! Triton's rule for `dims`: with `max_batch_size > 0` the model batches along its first
//! dimension and `dims` leave that dimension out; with 0, `dims` are the whole shape.

use nightingale_inference::{DataType, ExecutionProvider, TensorSpec};
use nightingale_models::LoadedModel;
use nightingale_models::manifest::PolicyKind;
use serde::Serialize;

use super::AppState;

#[derive(Debug, Serialize)]
pub(super) struct ModelConfig {
    pub name: String,
    pub platform: String,
    pub backend: String,
    pub version_policy: VersionPolicy,
    pub max_batch_size: i32,
    pub input: Vec<TensorConfig>,
    pub output: Vec<TensorConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dynamic_batching: Option<DynamicBatching>,
    pub instance_group: Vec<InstanceGroup>,
}

/// Triton's `ModelVersionPolicy`: exactly one of the three is set.
#[derive(Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum VersionPolicy {
    Latest { num_versions: u32 },
    All {},
    Specific { versions: Vec<i64> },
}

/// An input (`format` set) or an output (`format` absent) of Triton's config.
#[derive(Debug, Serialize)]
pub(super) struct TensorConfig {
    pub name: String,
    /// `TYPE_FP32`, `TYPE_STRING` (KServe's `BYTES`), ...
    pub data_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<&'static str>,
    pub dims: Vec<i64>,
}

#[derive(Debug, Serialize)]
pub(super) struct DynamicBatching {
    pub preferred_batch_size: Vec<i32>,
    pub max_queue_delay_microseconds: u64,
}

#[derive(Debug, Serialize)]
pub(super) struct InstanceGroup {
    pub name: String,
    /// `KIND_GPU` where the model runs on a GPU (ONNX Runtime's CUDA execution provider was
    /// registered, or candle holds its tensors on a CUDA device), else `KIND_CPU` (also where
    /// `--execution-provider cuda` was asked for but ONNX Runtime fell back to the CPU).
    pub kind: &'static str,
    pub count: i32,
    /// The CUDA device, for `KIND_GPU`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<i32>,
}

/// Triton's name of a datatype (`DataType` in model_config.proto).
pub(super) fn triton_type(datatype: DataType) -> &'static str {
    match datatype {
        DataType::Bool => "TYPE_BOOL",
        DataType::Uint8 => "TYPE_UINT8",
        DataType::Uint16 => "TYPE_UINT16",
        DataType::Uint32 => "TYPE_UINT32",
        DataType::Uint64 => "TYPE_UINT64",
        DataType::Int8 => "TYPE_INT8",
        DataType::Int16 => "TYPE_INT16",
        DataType::Int32 => "TYPE_INT32",
        DataType::Int64 => "TYPE_INT64",
        DataType::Fp16 => "TYPE_FP16",
        DataType::Fp32 => "TYPE_FP32",
        DataType::Fp64 => "TYPE_FP64",
        DataType::Bytes => "TYPE_STRING",
    }
}

/// The configuration of one served version.
pub(super) fn of(state: &AppState, model: &LoadedModel) -> ModelConfig {
    let config = model.worker.config();
    let batching = config.batching.as_ref();
    // Bounded at parse (`[batching]` sizes <= 2^20), so these conversions never saturate.
    let to_i32 = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    let max_batch_size = batching.map_or(0, |b| to_i32(b.max_batch_size));
    let meta = model.worker.metadata();
    let tensor = |s: &TensorSpec, format: Option<&'static str>| TensorConfig {
        name: s.name.clone(),
        data_type: triton_type(s.datatype),
        format,
        dims: if max_batch_size > 0 {
            s.shape.get(1..).unwrap_or_default().to_vec()
        } else {
            s.shape.clone()
        },
    };
    let policy = &model.manifest.version_policy;
    let version_policy = match state.repository.pinned(&model.name) {
        // A rollback pinned the model: that version serves whatever the bundle's policy says.
        Some(v) => VersionPolicy::Specific {
            versions: vec![i64::try_from(v).unwrap_or(i64::MAX)],
        },
        None => match policy.policy {
            PolicyKind::Latest => VersionPolicy::Latest {
                num_versions: u32::try_from(policy.latest.max(1)).unwrap_or(u32::MAX),
            },
            PolicyKind::All => VersionPolicy::All {},
            PolicyKind::Specific => VersionPolicy::Specific {
                versions: policy
                    .versions
                    .iter()
                    .map(|&v| i64::try_from(v).unwrap_or(i64::MAX))
                    .collect(),
            },
        },
    };
    let backend = model.worker.backend();
    let gpu = match state.repository.options().execution_provider {
        ExecutionProvider::Cuda { device_id } if model.worker.on_gpu() => Some(device_id),
        _ => None,
    };
    ModelConfig {
        name: model.name.clone(),
        platform: model.manifest.platform.clone(),
        backend: backend.to_owned(),
        version_policy,
        max_batch_size,
        input: meta
            .inputs
            .iter()
            .map(|s| tensor(s, Some("FORMAT_NONE")))
            .collect(),
        output: meta.outputs.iter().map(|s| tensor(s, None)).collect(),
        dynamic_batching: batching.map(|b| DynamicBatching {
            preferred_batch_size: b.preferred_batch_sizes.iter().map(|&n| to_i32(n)).collect(),
            max_queue_delay_microseconds: u64::try_from(b.max_queue_delay.as_micros())
                .unwrap_or(u64::MAX),
        }),
        instance_group: vec![InstanceGroup {
            name: model.name.clone(),
            kind: if gpu.is_some() {
                "KIND_GPU"
            } else {
                "KIND_CPU"
            },
            count: to_i32(config.instances),
            gpus: gpu.into_iter().collect(),
        }],
    }
}
