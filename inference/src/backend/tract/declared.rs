//! What an ONNX file *declares* about its graph inputs and outputs (names, element types,
//! shapes with their symbolic dimensions), read from the protobuf without building the graph.
//!
//! The engines report what they *run* ([`crate::Backend::metadata`]); the two can differ (a
//! symbolic dimension the engine fixes, an output declared with the wrong or no shape, a
//! ZipMap output declared as a sequence of maps that Nightingale serves dense). `nightingale
//! models init` compares them and writes what runs.

use std::path::Path;

use tract_onnx::pb::tensor_proto::DataType as OnnxType;
use tract_onnx::pb::tensor_shape_proto::dimension::Value as DimValue;
use tract_onnx::pb::type_proto::Value as TypeValue;
use tract_onnx::pb::{GraphProto, ValueInfoProto};
use tract_onnx::prelude::Framework;

use crate::error::InferenceError;
use crate::tensor::DataType;

/// One dimension as the file declares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeclaredDim {
    /// A fixed size.
    Fixed(i64),
    /// A named symbolic size (`batch_size`, `N`): any size at run time.
    Symbol(String),
    /// Neither a size nor a name.
    Unknown,
}

/// The declared type of a graph input or output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeclaredType {
    /// A tensor. `datatype` is `None` for an element type KServe v2 cannot carry (e.g.
    /// bfloat16, complex; `elem_type` holds ONNX's code); `shape` is `None` when the file
    /// declares no shape (not even a rank).
    Tensor {
        datatype: Option<DataType>,
        elem_type: i32,
        shape: Option<Vec<DeclaredDim>>,
    },
    /// Not a tensor: a sequence, a map (ZipMap's `seq(map(...))`), an optional or sparse
    /// tensor, or no type at all.
    NotTensor,
}

/// A graph input or output as declared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeclaredTensor {
    pub name: String,
    pub ty: DeclaredType,
}

impl DeclaredTensor {
    /// The declared shape with every symbolic or unknown dimension as `-1` (`None`: no shape
    /// or not a tensor).
    pub fn shape(&self) -> Option<Vec<i64>> {
        match &self.ty {
            DeclaredType::Tensor {
                shape: Some(dims), ..
            } => Some(
                dims.iter()
                    .map(|d| match d {
                        DeclaredDim::Fixed(n) if *n >= 0 => *n,
                        _ => -1,
                    })
                    .collect(),
            ),
            _ => None,
        }
    }

    /// The declared datatype, where it is a tensor of a KServe v2 datatype.
    pub fn datatype(&self) -> Option<DataType> {
        match &self.ty {
            DeclaredType::Tensor { datatype, .. } => *datatype,
            DeclaredType::NotTensor => None,
        }
    }

    /// The declaration as a person reads it: `FP32 [batch_size, 30]`, `FP32 (no shape)`,
    /// `not a tensor (sequence or map)`.
    pub fn describe(&self) -> String {
        match &self.ty {
            DeclaredType::NotTensor => {
                "not a tensor (a sequence or map, e.g. ZipMap's output)".into()
            }
            DeclaredType::Tensor {
                datatype,
                elem_type,
                shape,
            } => {
                let dt = match datatype {
                    Some(d) => d.as_str().to_owned(),
                    None => format!("ONNX element type {elem_type}"),
                };
                match shape {
                    None => format!("{dt} (no shape)"),
                    Some(dims) => {
                        let dims: Vec<String> = dims
                            .iter()
                            .map(|d| match d {
                                DeclaredDim::Fixed(n) => n.to_string(),
                                DeclaredDim::Symbol(s) => s.clone(),
                                DeclaredDim::Unknown => "?".into(),
                            })
                            .collect();
                        format!("{dt} [{}]", dims.join(", "))
                    }
                }
            }
        }
    }
}

/// The declared graph inputs (initializers excluded) and outputs, and who wrote the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeclaredModel {
    pub inputs: Vec<DeclaredTensor>,
    pub outputs: Vec<DeclaredTensor>,
    /// `producer_name producer_version` (e.g. `skl2onnx 1.19.1`, `pytorch 2.5.0`).
    pub producer: String,
    /// The opsets the file imports: (domain, version); `""` is the default ONNX domain.
    pub opsets: Vec<(String, i64)>,
}

fn datatype_of(code: i32) -> Option<DataType> {
    Some(match OnnxType::try_from(code).ok()? {
        OnnxType::Float => DataType::Fp32,
        OnnxType::Uint8 => DataType::Uint8,
        OnnxType::Int8 => DataType::Int8,
        OnnxType::Uint16 => DataType::Uint16,
        OnnxType::Int16 => DataType::Int16,
        OnnxType::Int32 => DataType::Int32,
        OnnxType::Int64 => DataType::Int64,
        OnnxType::String => DataType::Bytes,
        OnnxType::Bool => DataType::Bool,
        OnnxType::Float16 => DataType::Fp16,
        OnnxType::Double => DataType::Fp64,
        OnnxType::Uint32 => DataType::Uint32,
        OnnxType::Uint64 => DataType::Uint64,
        _ => return None,
    })
}

fn declared(v: &ValueInfoProto) -> DeclaredTensor {
    let ty = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(TypeValue::TensorType(t)) => DeclaredType::Tensor {
            datatype: datatype_of(t.elem_type),
            elem_type: t.elem_type,
            shape: t.shape.as_ref().map(|s| {
                s.dim
                    .iter()
                    .map(|d| match &d.value {
                        Some(DimValue::DimValue(n)) if *n >= 0 => DeclaredDim::Fixed(*n),
                        Some(DimValue::DimParam(p)) if !p.is_empty() => {
                            DeclaredDim::Symbol(p.clone())
                        }
                        _ => DeclaredDim::Unknown,
                    })
                    .collect()
            }),
        },
        // tract's protobuf schema knows only the tensor type: sequences, maps, optionals and
        // sparse tensors decode as no type at all.
        None => DeclaredType::NotTensor,
    };
    DeclaredTensor {
        name: v.name.clone(),
        ty,
    }
}

/// Reads the declared inputs and outputs of the ONNX model in `model` (`name` only labels
/// errors). Fails on bytes that are not an ONNX model (not protobuf, or no graph, or a graph
/// without inputs or outputs).
pub fn declared_model(model: &[u8], name: &Path) -> Result<DeclaredModel, InferenceError> {
    let proto = super::onnx()
        .proto_model_for_read(&mut &model[..])
        .map_err(|e| InferenceError::load(name, e))?;
    let not_onnx = |what: &str| InferenceError::load(name, format!("not an ONNX model: {what}"));
    let graph: &GraphProto = proto
        .graph
        .as_ref()
        .ok_or_else(|| not_onnx("it has no graph"))?;
    let initializers: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<DeclaredTensor> = graph
        .input
        .iter()
        .filter(|v| !initializers.contains(v.name.as_str()))
        .map(declared)
        .collect();
    let outputs: Vec<DeclaredTensor> = graph.output.iter().map(declared).collect();
    if inputs.is_empty() || outputs.is_empty() {
        return Err(not_onnx("its graph has no inputs or no outputs"));
    }
    let producer = format!("{} {}", proto.producer_name, proto.producer_version)
        .trim()
        .to_owned();
    Ok(DeclaredModel {
        inputs,
        outputs,
        producer,
        opsets: proto
            .opset_import
            .iter()
            .map(|o| (o.domain.clone(), o.version))
            .collect(),
    })
}
