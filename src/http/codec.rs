//! The KServe v2 inference wire format: JSON tensors (flat or nested `data`) and Triton's
//! binary tensor extension (`Inference-Header-Content-Length`, `binary_data_size`,
//! `binary_data`, `binary_data_output`).

use std::collections::HashMap;

use bytes::Bytes;
use nightingale_inference::{DataType, Element, NamedTensor, Tensor, element_count};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::error::AppError;

/// Deepest nesting accepted in a JSON `data` array.
const MAX_NESTING: usize = 32;

#[derive(Debug, Deserialize)]
pub struct InferRequest {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub parameters: Option<HashMap<String, serde_json::Value>>,
    pub inputs: Vec<InputTensor>,
    #[serde(default)]
    pub outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Debug, Deserialize)]
pub struct InputTensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    #[serde(default)]
    pub parameters: Option<HashMap<String, serde_json::Value>>,
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
}

#[derive(Debug, Deserialize)]
pub struct RequestedOutput {
    pub name: String,
    #[serde(default)]
    pub parameters: Option<HashMap<String, serde_json::Value>>,
}

/// A parsed request: tensors, the outputs wanted and how to encode them.
#[derive(Debug)]
pub struct DecodedRequest {
    pub id: Option<String>,
    pub inputs: Vec<NamedTensor>,
    /// `None`: every output. Each: (name, binary?, classification top-k).
    pub outputs: Option<Vec<OutputChoice>>,
    /// Request-level `binary_data_output`.
    pub binary_default: bool,
}

#[derive(Debug, Clone)]
pub struct OutputChoice {
    pub name: String,
    pub binary: Option<bool>,
    pub classification: Option<usize>,
}

fn param_bool(
    params: &Option<HashMap<String, serde_json::Value>>,
    key: &str,
) -> Result<Option<bool>, AppError> {
    match params.as_ref().and_then(|p| p.get(key)) {
        None => Ok(None),
        Some(serde_json::Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(AppError::bad_request(format!(
            "parameter {key:?} must be a boolean"
        ))),
    }
}

fn param_usize(
    params: &Option<HashMap<String, serde_json::Value>>,
    key: &str,
) -> Result<Option<usize>, AppError> {
    match params.as_ref().and_then(|p| p.get(key)) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| {
                AppError::bad_request(format!("parameter {key:?} must be a non-negative integer"))
            }),
    }
}

/// Splits a body into its JSON header and binary tail, given the header length from
/// `Inference-Header-Content-Length` (absent: the whole body is JSON).
pub fn decode_request(body: &Bytes, header_len: Option<usize>) -> Result<DecodedRequest, AppError> {
    let (json, mut binary) = match header_len {
        None => (&body[..], &body[body.len()..]),
        Some(n) if n <= body.len() => (&body[..n], &body[n..]),
        Some(n) => {
            return Err(AppError::bad_request(format!(
                "Inference-Header-Content-Length is {n} but the body has only {} bytes",
                body.len()
            )));
        }
    };
    let request: InferRequest = serde_json::from_slice(json)
        .map_err(|e| AppError::bad_request(format!("malformed inference request JSON: {e}")))?;
    if request.inputs.is_empty() {
        return Err(AppError::bad_request("the request has no inputs"));
    }
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in request.inputs {
        let datatype: DataType = input
            .datatype
            .parse()
            .map_err(|e| AppError::bad_request(format!("input {:?}: {e}", input.name)))?;
        let shape = input
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| {
                AppError::bad_request(format!(
                    "input {:?}: shape {:?} has a negative dimension",
                    input.name, input.shape
                ))
            })?;
        let count = element_count(&shape).map_err(|_| {
            AppError::bad_request(format!(
                "input {:?}: shape {:?} is too large",
                input.name, input.shape
            ))
        })?;
        let binary_size = param_usize(&input.parameters, "binary_data_size")?;
        let tensor = match (binary_size, input.data) {
            (Some(_), Some(_)) => {
                return Err(AppError::bad_request(format!(
                    "input {:?} has both binary_data_size and JSON data",
                    input.name
                )));
            }
            (Some(size), None) => {
                if size > binary.len() {
                    return Err(AppError::bad_request(format!(
                        "input {:?}: binary_data_size {size} runs past the end of the body ({} bytes left)",
                        input.name,
                        binary.len()
                    )));
                }
                let (raw, rest) = binary.split_at(size);
                binary = rest;
                Tensor::from_raw(datatype, shape, raw)
                    .map_err(|e| AppError::bad_request(format!("input {:?}: {e}", input.name)))?
            }
            (None, Some(data)) => parse_json_data(datatype, shape, count, data.get())
                .map_err(|e| AppError::bad_request(format!("input {:?}: {e}", input.name)))?,
            (None, None) => {
                return Err(AppError::bad_request(format!(
                    "input {:?} has neither data nor binary_data_size",
                    input.name
                )));
            }
        };
        inputs.push(NamedTensor::new(input.name, tensor));
    }
    if !binary.is_empty() {
        return Err(AppError::bad_request(format!(
            "{} bytes of binary data follow the inputs' binary_data_size total",
            binary.len()
        )));
    }
    let binary_default = param_bool(&request.parameters, "binary_data_output")?.unwrap_or(false);
    let outputs = match request.outputs {
        None => None,
        Some(list) => Some(
            list.into_iter()
                .map(|o| {
                    Ok(OutputChoice {
                        binary: param_bool(&o.parameters, "binary_data")?,
                        classification: param_usize(&o.parameters, "classification")?,
                        name: o.name,
                    })
                })
                .collect::<Result<Vec<_>, AppError>>()?,
        ),
    };
    Ok(DecodedRequest {
        id: request.id,
        inputs,
        outputs,
        binary_default,
    })
}

/// Parses JSON `data`: a flat array of the right element type (the fast path), else nested
/// arrays flattened in row-major order.
fn parse_json_data(
    datatype: DataType,
    shape: Vec<usize>,
    count: usize,
    json: &str,
) -> Result<Tensor, String> {
    fn typed<T: Element + for<'de> Deserialize<'de>>(
        shape: Vec<usize>,
        count: usize,
        json: &str,
        from_value: fn(&serde_json::Value) -> Option<T>,
    ) -> Result<Tensor, String> {
        let values: Vec<T> = match serde_json::from_str::<Vec<T>>(json) {
            Ok(v) => v,
            Err(_) => {
                let value: serde_json::Value =
                    serde_json::from_str(json).map_err(|e| format!("malformed data: {e}"))?;
                let mut out = Vec::with_capacity(count.min(1 << 20));
                flatten(&value, 0, &mut out, from_value)?;
                out
            }
        };
        if values.len() != count {
            return Err(format!(
                "shape {shape:?} needs {count} {} elements but data has {}",
                T::DATATYPE,
                values.len()
            ));
        }
        Tensor::from_vec(shape, values).map_err(|e| e.to_string())
    }
    fn flatten<T>(
        v: &serde_json::Value,
        depth: usize,
        out: &mut Vec<T>,
        from_value: fn(&serde_json::Value) -> Option<T>,
    ) -> Result<(), String> {
        if depth > MAX_NESTING {
            return Err(format!("data is nested deeper than {MAX_NESTING} levels"));
        }
        match v {
            serde_json::Value::Array(items) => {
                for item in items {
                    flatten(item, depth + 1, out, from_value)?;
                }
                Ok(())
            }
            other => {
                out.push(from_value(other).ok_or_else(|| {
                    "data holds a value of the wrong type for the datatype".to_string()
                })?);
                Ok(())
            }
        }
    }
    fn int<T: TryFrom<i64> + TryFrom<u64>>(v: &serde_json::Value) -> Option<T> {
        v.as_i64()
            .and_then(|i| T::try_from(i).ok())
            .or_else(|| v.as_u64().and_then(|u| T::try_from(u).ok()))
    }
    match datatype {
        DataType::Bool => typed::<bool>(shape, count, json, |v| v.as_bool()),
        DataType::Uint8 => typed::<u8>(shape, count, json, int),
        DataType::Uint16 => typed::<u16>(shape, count, json, int),
        DataType::Uint32 => typed::<u32>(shape, count, json, int),
        DataType::Uint64 => typed::<u64>(shape, count, json, int),
        DataType::Int8 => typed::<i8>(shape, count, json, int),
        DataType::Int16 => typed::<i16>(shape, count, json, int),
        DataType::Int32 => typed::<i32>(shape, count, json, int),
        DataType::Int64 => typed::<i64>(shape, count, json, int),
        DataType::Fp16 => {
            let t = typed::<f32>(shape, count, json, |v| v.as_f64().map(|f| f as f32))?;
            let a = t
                .view::<f32>()
                .expect("f32 tensor")
                .mapv(half::f16::from_f32);
            Ok(Tensor::Fp16(a))
        }
        DataType::Fp32 => typed::<f32>(shape, count, json, |v| v.as_f64().map(|f| f as f32)),
        DataType::Fp64 => typed::<f64>(shape, count, json, |v| v.as_f64()),
        DataType::Bytes => {
            let strings = typed_strings(count, json)?;
            Tensor::from_vec(shape, strings).map_err(|e| e.to_string())
        }
    }
}

fn typed_strings(count: usize, json: &str) -> Result<Vec<Vec<u8>>, String> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("malformed data: {e}"))?;
    let mut out = Vec::with_capacity(count.min(1 << 20));
    fn walk(v: &serde_json::Value, depth: usize, out: &mut Vec<Vec<u8>>) -> Result<(), String> {
        if depth > MAX_NESTING {
            return Err(format!("data is nested deeper than {MAX_NESTING} levels"));
        }
        match v {
            serde_json::Value::Array(items) => {
                items.iter().try_for_each(|i| walk(i, depth + 1, out))
            }
            serde_json::Value::String(s) => {
                out.push(s.as_bytes().to_vec());
                Ok(())
            }
            _ => Err("BYTES data must be strings".into()),
        }
    }
    walk(&value, 0, &mut out)?;
    if out.len() != count {
        return Err(format!(
            "shape needs {count} BYTES elements but data has {}",
            out.len()
        ));
    }
    Ok(out)
}

#[derive(Debug, Serialize)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub outputs: Vec<OutputTensor>,
}

#[derive(Debug, Serialize)]
pub struct OutputTensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<JsonData>,
}

/// Output elements as JSON, without an intermediate `serde_json::Value` per element.
#[derive(Debug)]
pub struct JsonData(pub Tensor);

impl Serialize for JsonData {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        macro_rules! each {
            ($a:expr) => {
                for x in $a.iter() {
                    seq.serialize_element(x)?;
                }
            };
        }
        match &self.0 {
            Tensor::Bool(a) => each!(a),
            Tensor::Uint8(a) => each!(a),
            Tensor::Uint16(a) => each!(a),
            Tensor::Uint32(a) => each!(a),
            Tensor::Uint64(a) => each!(a),
            Tensor::Int8(a) => each!(a),
            Tensor::Int16(a) => each!(a),
            Tensor::Int32(a) => each!(a),
            Tensor::Int64(a) => each!(a),
            Tensor::Fp16(a) => {
                for x in a.iter() {
                    seq.serialize_element(&x.to_f32())?;
                }
            }
            Tensor::Fp32(a) => {
                for x in a.iter() {
                    // JSON has no NaN or infinity; Triton writes them as null too.
                    if x.is_finite() {
                        seq.serialize_element(x)?
                    } else {
                        seq.serialize_element(&())?
                    }
                }
            }
            Tensor::Fp64(a) => {
                for x in a.iter() {
                    if x.is_finite() {
                        seq.serialize_element(x)?
                    } else {
                        seq.serialize_element(&())?
                    }
                }
            }
            Tensor::Bytes(a) => {
                for x in a.iter() {
                    seq.serialize_element(&String::from_utf8_lossy(x))?;
                }
            }
        }
        seq.end()
    }
}

/// An encoded response body and, for binary outputs, the JSON header length.
pub struct EncodedResponse {
    pub body: Vec<u8>,
    pub header_len: Option<usize>,
}

/// Encodes outputs; those flagged binary go after the JSON header as raw bytes.
pub fn encode_response(
    mut response: InferResponse,
    binary_flags: &[bool],
) -> Result<EncodedResponse, AppError> {
    let mut tail: Vec<u8> = vec![];
    for (out, &binary) in response.outputs.iter_mut().zip(binary_flags) {
        if binary && let Some(JsonData(tensor)) = out.data.take() {
            let raw = tensor.to_raw();
            let mut params = out.parameters.take().unwrap_or_default();
            params.insert("binary_data_size".into(), raw.len().into());
            out.parameters = Some(params);
            tail.extend_from_slice(&raw);
        }
    }
    let mut body = serde_json::to_vec(&response)
        .map_err(|e| AppError::internal(format!("cannot encode response: {e}")))?;
    if binary_flags.iter().any(|&b| b) {
        let header_len = body.len();
        body.extend_from_slice(&tail);
        Ok(EncodedResponse {
            body,
            header_len: Some(header_len),
        })
    } else {
        Ok(EncodedResponse {
            body,
            header_len: None,
        })
    }
}

/// Triton's classification extension: the top `k` classes along the last axis of each row,
/// as BYTES `"<score>:<index>[:<label>]"`, shape `[rows, k]`.
pub fn classify(tensor: &Tensor, k: usize, labels: &[String]) -> Result<Tensor, AppError> {
    let values: ndarray::ArrayD<f64> = match tensor {
        Tensor::Fp32(a) => a.mapv(f64::from),
        Tensor::Fp64(a) => a.clone(),
        Tensor::Fp16(a) => a.mapv(|x| f64::from(x.to_f32())),
        Tensor::Int32(a) => a.mapv(f64::from),
        Tensor::Int64(a) => a.mapv(|x| x as f64),
        other => {
            return Err(AppError::bad_request(format!(
                "classification needs a numeric output, not {}",
                other.datatype()
            )));
        }
    };
    let shape = values.shape().to_vec();
    let classes = *shape.last().unwrap_or(&1);
    let k = k.min(classes).max(1);
    let rows = values.len() / classes.max(1);
    let flat: Vec<f64> = values.iter().copied().collect();
    let mut out = Vec::with_capacity(rows * k);
    for row in flat.chunks(classes.max(1)) {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        for &i in order.iter().take(k) {
            let text = match labels.get(i) {
                Some(label) => format!("{}:{i}:{label}", row[i]),
                None => format!("{}:{i}", row[i]),
            };
            out.push(text.into_bytes());
        }
    }
    let mut out_shape: Vec<usize> = shape[..shape.len().saturating_sub(1)].to_vec();
    out_shape.push(k);
    Tensor::from_vec(out_shape, out).map_err(|e| AppError::internal(e.to_string()))
}
