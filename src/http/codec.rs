//! The KServe v2 inference wire format: JSON tensors (flat or nested `data`) and Triton's
//! binary tensor extension (`Inference-Header-Content-Length`, `binary_data_size`,
//! `binary_data`, `binary_data_output`).

use std::collections::HashMap;

use nightingale_inference::{
    DataType, Element, InferenceError, NamedTensor, Tensor, TensorSpec, element_count,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::error::AppError;

/// Deepest nesting accepted in a JSON `data` array.
const MAX_NESTING: usize = 100;

/// A `parameters` object whose keys are each given once: `{"classification": 2,
/// "classification": 0}` is refused (serde_json keeps the last silently), as a repeated
/// field anywhere else in a request is.
fn unique_parameters<'de, D>(
    deserializer: D,
) -> Result<Option<HashMap<String, serde_json::Value>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Unique;
    impl<'de> serde::de::Visitor<'de> for Unique {
        type Value = Option<HashMap<String, serde_json::Value>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a parameters object")
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = HashMap::new();
            while let Some(key) = map.next_key::<String>()? {
                if out.len() == MAX_PARAMETERS {
                    return Err(serde::de::Error::custom(format!(
                        "more than {MAX_PARAMETERS} parameters"
                    )));
                }
                let value = map.next_value::<ParameterValue>()?.0;
                if out.contains_key(&key) {
                    return Err(serde::de::Error::custom(format!(
                        "parameter {key:?} is given more than once"
                    )));
                }
                out.insert(key, value);
            }
            Ok(Some(out))
        }
    }
    deserializer.deserialize_option(Unique)
}

/// Most parameters in one `parameters` object.
pub(crate) const MAX_PARAMETERS: usize = 256;
/// Most inputs, or outputs, one request may list (a model's own are far fewer: each is
/// checked against the model's after parsing, so the parse itself is bounded here).
const MAX_TENSORS: usize = 4096;
/// Most dimensions of one input's shape (ONNX models stay far below).
pub(crate) const MAX_DIMS: usize = 64;

/// A parameter's value: a boolean, a number or a string, as the KServe v2 protocol defines
/// them (`null` too, as absent). An array or object is refused as it is read, before any of
/// it is built: a parameter of millions of elements would otherwise become a
/// `serde_json::Value` tree of ten to twenty times its text, outside the in-flight budget.
struct ParameterValue(serde_json::Value);

impl<'de> Deserialize<'de> for ParameterValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Scalar;
        impl<'de> serde::de::Visitor<'de> for Scalar {
            type Value = ParameterValue;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a boolean, number or string parameter")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(ParameterValue(v.into()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(ParameterValue(v.into()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(ParameterValue(v.into()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(ParameterValue(v.into()))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ParameterValue(v.into()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(ParameterValue(v.into()))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(ParameterValue(serde_json::Value::Null))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                _: A,
            ) -> Result<Self::Value, A::Error> {
                Err(serde::de::Error::custom(
                    "a parameter is a boolean, number or string, not an array",
                ))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                _: A,
            ) -> Result<Self::Value, A::Error> {
                Err(serde::de::Error::custom(
                    "a parameter is a boolean, number or string, not an object",
                ))
            }
        }
        d.deserialize_any(Scalar)
    }
}

/// The inference request in `json`: one JSON object ([`ObjectOnly`]) and nothing after it.
fn parse_request(json: &[u8]) -> serde_json::Result<InferRequest<'_>> {
    use serde::de::DeserializeSeed as _;
    let mut de = serde_json::Deserializer::from_slice(json);
    let request = ObjectOnly::<InferRequest>::new().deserialize(&mut de)?;
    de.end()?;
    Ok(request)
}

/// A JSON array of at most `N` elements, refused at the `N + 1`th (before it is built).
fn at_most<'de, D, T, const N: usize>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    d.deserialize_seq(Bounded::<T, N, false>(std::marker::PhantomData))
}

/// The visitor of [`at_most`] and, each element an object, [`objects_at_most`].
struct Bounded<T, const N: usize, const OBJECTS: bool>(std::marker::PhantomData<T>);

impl<'de, T: Deserialize<'de>, const N: usize, const OBJECTS: bool> serde::de::Visitor<'de>
    for Bounded<T, N, OBJECTS>
{
    type Value = Vec<T>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "an array of at most {N} elements")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut out = Vec::new();
        loop {
            let x = if OBJECTS {
                seq.next_element_seed(ObjectOnly::<T>::new())?
            } else {
                seq.next_element()?
            };
            let Some(x) = x else {
                return Ok(out);
            };
            if out.len() == N {
                return Err(serde::de::Error::custom(format!(
                    "an array of more than {N} elements where at most {N} are taken"
                )));
            }
            out.push(x);
        }
    }
}

/// A `T` (a derived struct) from a JSON object only: serde's derive also takes an array of
/// the fields in order, so `[null, null, [...]]` was served as a request and `["x", [1, 30],
/// "FP32", null, [...]]` as an input (a review's finding; the protocol's are objects).
struct ObjectOnly<T>(std::marker::PhantomData<T>);

impl<T> ObjectOnly<T> {
    fn new() -> Self {
        ObjectOnly(std::marker::PhantomData)
    }
}

impl<'de, T: Deserialize<'de>> serde::de::DeserializeSeed<'de> for ObjectOnly<T> {
    type Value = T;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for ObjectOnly<T> {
    type Value = T;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
    }
}

/// [`at_most`] `N` elements, each a JSON object ([`ObjectOnly`]).
fn objects_at_most<'de, D, T, const N: usize>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    d.deserialize_seq(Bounded::<T, N, true>(std::marker::PhantomData))
}

/// The requested outputs: [`at_most`] [`MAX_TENSORS`], or `None` (`null` or absent).
fn outputs_at_most<'de, D>(d: D) -> Result<Option<Vec<RequestedOutput>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    struct Listed(
        #[serde(deserialize_with = "objects_at_most::<_, _, MAX_TENSORS>")] Vec<RequestedOutput>,
    );
    Ok(Option::<Listed>::deserialize(d)?.map(|l| l.0))
}

/// The longest request `id`, in bytes. The id is echoed in the response: unbounded, a 58 KB
/// gzip body with a 60 MB id made a 60 MB response, held in memory while its client did not
/// read it (a red-team finding). Triton's clients send short ids.
pub const MAX_REQUEST_ID_BYTES: usize = 1024;

fn bounded_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let id = Option::<String>::deserialize(d)?;
    match id {
        Some(id) if id.len() > MAX_REQUEST_ID_BYTES => Err(serde::de::Error::custom(format!(
            "an id of {} bytes where at most {MAX_REQUEST_ID_BYTES} are taken",
            id.len()
        ))),
        id => Ok(id),
    }
}

#[derive(Debug, Deserialize)]
pub struct InferRequest<'a> {
    #[serde(default, deserialize_with = "bounded_id")]
    pub id: Option<String>,
    #[serde(default, deserialize_with = "unique_parameters")]
    pub parameters: Option<HashMap<String, serde_json::Value>>,
    #[serde(borrow, deserialize_with = "objects_at_most::<_, _, MAX_TENSORS>")]
    pub inputs: Vec<InputTensor<'a>>,
    #[serde(default, deserialize_with = "outputs_at_most")]
    pub outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Debug, Deserialize)]
pub struct InputTensor<'a> {
    pub name: String,
    #[serde(deserialize_with = "at_most::<_, _, MAX_DIMS>")]
    pub shape: Vec<i64>,
    pub datatype: String,
    #[serde(default, deserialize_with = "unique_parameters")]
    pub parameters: Option<HashMap<String, serde_json::Value>>,
    /// The `data` text, borrowed from the body: decoded once the datatype and shape are known.
    #[serde(default, borrow)]
    pub data: Option<&'a RawValue>,
}

#[derive(Debug, Deserialize)]
pub struct RequestedOutput {
    pub name: String,
    #[serde(default, deserialize_with = "unique_parameters")]
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
    /// The request's `parameters` (`/explain` reads its method and options from them).
    pub parameters: HashMap<String, serde_json::Value>,
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

/// Checks each input of a request against the model's inputs as it comes, before its data is
/// decoded: an input the model does not have, one given twice or one of another datatype is
/// refused at once (with the worker's own messages). So a request cannot make the server
/// decode data the model would refuse anyway (BYTES elements cost far more in memory than on
/// the wire), and the work per request is bounded by the model's input count, however many
/// inputs the request lists.
pub(super) struct InputCheck<'a> {
    specs: &'a [TensorSpec],
    seen: Vec<bool>,
}

impl<'a> InputCheck<'a> {
    pub(super) fn new(specs: &'a [TensorSpec]) -> Self {
        InputCheck {
            specs,
            seen: vec![false; specs.len()],
        }
    }

    pub(super) fn admit(&mut self, name: &str, datatype: DataType) -> Result<(), AppError> {
        let Some(ix) = self.specs.iter().position(|s| s.name == name) else {
            return Err(InferenceError::UnknownInput {
                name: name.to_owned(),
                expected: self.specs.iter().map(|s| s.name.clone()).collect(),
            }
            .into());
        };
        if std::mem::replace(&mut self.seen[ix], true) {
            return Err(InferenceError::DuplicateInput {
                name: name.to_owned(),
            }
            .into());
        }
        let spec = &self.specs[ix];
        if spec.datatype != datatype {
            return Err(InferenceError::DataTypeMismatch {
                name: name.to_owned(),
                expected: spec.datatype,
                got: datatype,
            }
            .into());
        }
        Ok(())
    }
}

/// Refuses an output requested twice (a set: a request may list very many).
pub(super) fn check_unique_outputs<'n>(
    names: impl Iterator<Item = &'n str>,
) -> Result<(), AppError> {
    let mut seen = std::collections::HashSet::new();
    for name in names {
        if !seen.insert(name) {
            return Err(AppError::bad_request(format!(
                "output {name:?} is requested more than once"
            )));
        }
    }
    Ok(())
}

/// What one `BYTES` element takes in memory at least, however short (see
/// [`Tensor::memory_len`]): reserved for each element a `BYTES` input declares before its data
/// is decoded.
pub(super) const BYTES_ELEMENT_MIN: usize = std::mem::size_of::<Vec<u8>>() + 16;

/// Splits a body into its JSON header and binary tail, given the header length from
/// `Inference-Header-Content-Length` (absent: the whole body is JSON), and decodes the inputs
/// the model (`specs`) has. Before a `BYTES` input's data is decoded, `reserve` is asked for
/// the least memory its elements will take (the caller's admission budget: an error refuses
/// the request before anything is allocated).
pub fn decode_request(
    body: &[u8],
    header_len: Option<usize>,
    specs: &[TensorSpec],
    reserve: &mut dyn FnMut(usize) -> Result<(), AppError>,
) -> Result<DecodedRequest, AppError> {
    let (json, mut binary) = match header_len {
        None => (body, &body[body.len()..]),
        Some(n) if n <= body.len() => (&body[..n], &body[n..]),
        Some(n) => {
            return Err(AppError::bad_request(format!(
                "Inference-Header-Content-Length is {n} but the body has only {} bytes",
                body.len()
            )));
        }
    };
    let request = parse_request(json)
        .map_err(|e| AppError::bad_request(format!("malformed inference request JSON: {e}")))?;
    if request.inputs.is_empty() {
        return Err(AppError::bad_request("the request has no inputs"));
    }
    let mut check = InputCheck::new(specs);
    let mut inputs: Vec<NamedTensor> = Vec::with_capacity(request.inputs.len().min(specs.len()));
    for input in request.inputs {
        // No shared-memory extension: an input in a region is refused, as an output asked
        // into one is (its inline data was used and the region parameters dropped: a
        // red-team finding).
        if let Some(key) = input
            .parameters
            .as_ref()
            .and_then(|p| p.keys().find(|k| k.starts_with("shared_memory_")))
        {
            return Err(AppError::bad_request(format!(
                "input {:?}: parameter {key:?}: shared memory is not supported by this server; send the input inline",
                input.name
            )));
        }
        let (datatype, shape, count) = input_header(&input.name, &input.datatype, &input.shape)?;
        check.admit(&input.name, datatype)?;
        if datatype == DataType::Bytes {
            reserve(count.saturating_mul(BYTES_ELEMENT_MIN))?;
        }
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
    if let Some(list) = &request.outputs {
        check_unique_outputs(list.iter().map(|o| o.name.as_str()))?;
    }
    let outputs = match request.outputs {
        // An empty list asks for no output in particular: every output, as Triton answers.
        None => None,
        Some(list) if list.is_empty() => None,
        Some(list) => Some(
            list.into_iter()
                .map(|o| {
                    // Triton's shared-memory extension is not served (not listed in the
                    // server metadata): an output asked into a region is refused, not
                    // answered inline while the client reads its region (a red-team finding).
                    if let Some(key) = o.parameters.as_ref().and_then(|p| {
                        p.keys().find(|k| k.starts_with("shared_memory_"))
                    }) {
                        return Err(AppError::bad_request(format!(
                            "output {:?}: parameter {key:?}: shared memory is not supported by this server; ask for the output inline",
                            o.name
                        )));
                    }
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
        parameters: request.parameters.unwrap_or_default(),
    })
}

/// An input's datatype, shape and element count as the wire gives them (JSON or gRPC): an
/// unknown datatype, a negative dimension or a shape too large is a 400.
pub(super) fn input_header(
    name: &str,
    datatype: &str,
    wire_shape: &[i64],
) -> Result<(DataType, Vec<usize>, usize), AppError> {
    let datatype: DataType = datatype
        .parse()
        .map_err(|e| AppError::bad_request(format!("input {name:?}: {e}")))?;
    let shape = wire_shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| {
            AppError::bad_request(format!(
                "input {name:?}: shape {wire_shape:?} has a negative dimension"
            ))
        })?;
    let count = element_count(&shape).map_err(|_| {
        AppError::bad_request(format!("input {name:?}: shape {wire_shape:?} is too large"))
    })?;
    Ok((datatype, shape, count))
}

/// What is said when a tensor's data holds `got` elements where its shape needs `count`.
pub(super) fn element_count_mismatch(
    shape: &[usize],
    count: usize,
    datatype: DataType,
    got: usize,
) -> String {
    format!("shape {shape:?} needs {count} {datatype} elements but data has {got}")
}

/// Triton's raw binary request (`Inference-Header-Content-Length: 0`): the whole body is the
/// one input's tensor in the binary layout, its datatype the model's, its shape the model's
/// with the one variable dimension deduced from the byte count. Every output comes back binary.
pub fn decode_raw(body: &[u8], inputs: &[TensorSpec]) -> Result<DecodedRequest, AppError> {
    let [spec] = inputs else {
        return Err(AppError::bad_request(format!(
            "a raw binary request (Inference-Header-Content-Length: 0) needs a model with exactly one input; this model has {}",
            inputs.len()
        )));
    };
    let variable = spec.shape.iter().filter(|&&d| d < 0).count();
    // A declared shape whose size overflows (2^31 three times) holds no body: refused, not
    // multiplied past usize (a panic in a debug build, a wrapped size in a release one).
    let too_large = || {
        AppError::bad_request(format!(
            "raw input {:?}: the model's input shape {:?} is too large",
            spec.name, spec.shape
        ))
    };
    let fixed: usize = spec
        .shape
        .iter()
        .filter(|&&d| d >= 0)
        .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
        .ok_or_else(too_large)?;
    let deduce = |variable_dim: usize| -> Vec<usize> {
        spec.shape
            .iter()
            .map(|&d| if d < 0 { variable_dim } else { d as usize })
            .collect()
    };
    let tensor = match spec.datatype.element_size() {
        None => {
            // BYTES: the body is one element (no length prefix), so the shape must hold one.
            if fixed != 1 {
                return Err(AppError::bad_request(format!(
                    "raw BYTES input {:?}: the model's input shape {:?} must hold exactly one element",
                    spec.name, spec.shape
                )));
            }
            Tensor::from_vec(deduce(1), vec![body.to_vec()])
                .map_err(|e| AppError::bad_request(format!("input {:?}: {e}", spec.name)))?
        }
        Some(size) => {
            let shape = match variable {
                0 => deduce(0),
                1 => {
                    let row = fixed.checked_mul(size).ok_or_else(too_large)?;
                    if row == 0 || !body.len().is_multiple_of(row) {
                        return Err(AppError::bad_request(format!(
                            "raw input {:?}: {} bytes are not a whole number of {} elements of shape {:?}",
                            spec.name,
                            body.len(),
                            spec.datatype,
                            spec.shape
                        )));
                    }
                    deduce(body.len() / row)
                }
                _ => {
                    return Err(AppError::bad_request(format!(
                        "the shape of raw input {:?} cannot be deduced: {:?} has more than one variable dimension",
                        spec.name, spec.shape
                    )));
                }
            };
            Tensor::from_raw(spec.datatype, shape, body)
                .map_err(|e| AppError::bad_request(format!("input {:?}: {e}", spec.name)))?
        }
    };
    Ok(DecodedRequest {
        id: None,
        inputs: vec![NamedTensor::new(spec.name.clone(), tensor)],
        outputs: None,
        binary_default: true,
        parameters: HashMap::new(),
    })
}

/// Parses JSON `data` (a flat array, nested arrays of any depth up to [`MAX_NESTING`], or a
/// lone scalar) straight into the tensor's element vector: no `serde_json::Value` tree, and
/// decoding stops at the first element beyond what the shape holds.
fn parse_json_data(
    datatype: DataType,
    shape: Vec<usize>,
    count: usize,
    json: &str,
) -> Result<Tensor, String> {
    fn typed<T: Scalar + Element>(
        shape: Vec<usize>,
        count: usize,
        json: &str,
    ) -> Result<Tensor, String> {
        let values = decode_elements::<T>(&shape, count, json)?;
        Tensor::from_vec(shape, values).map_err(|e| e.to_string())
    }
    match datatype {
        DataType::Bool => typed::<bool>(shape, count, json),
        DataType::Uint8 => typed::<u8>(shape, count, json),
        DataType::Uint16 => typed::<u16>(shape, count, json),
        DataType::Uint32 => typed::<u32>(shape, count, json),
        DataType::Uint64 => typed::<u64>(shape, count, json),
        DataType::Int8 => typed::<i8>(shape, count, json),
        DataType::Int16 => typed::<i16>(shape, count, json),
        DataType::Int32 => typed::<i32>(shape, count, json),
        DataType::Int64 => typed::<i64>(shape, count, json),
        DataType::Fp16 => typed::<half::f16>(shape, count, json),
        DataType::Fp32 => typed::<f32>(shape, count, json),
        DataType::Fp64 => typed::<f64>(shape, count, json),
        DataType::Bytes => typed::<Vec<u8>>(shape, count, json),
    }
}

/// A tensor element as JSON carries it; `None`: the JSON value is of the wrong kind or out of
/// range for the datatype.
trait Scalar: Sized {
    /// The JSON values this datatype takes, for the error naming one it does not.
    const TAKES: &'static str;
    /// The fewest JSON characters one element takes (`1`, `true`, `""`): bounds the vector
    /// reserved up front by what the text can hold.
    const MIN_CHARS: usize = 1;
    fn from_bool(_: bool) -> Option<Self> {
        None
    }
    fn from_i64(_: i64) -> Option<Self> {
        None
    }
    fn from_u64(_: u64) -> Option<Self> {
        None
    }
    fn from_f64(_: f64) -> Option<Self> {
        None
    }
    fn from_string(_: &str) -> Option<Self> {
        None
    }
}

impl Scalar for bool {
    const TAKES: &'static str = "true or false";
    const MIN_CHARS: usize = 4;
    fn from_bool(b: bool) -> Option<Self> {
        Some(b)
    }
}

macro_rules! int_scalar {
    ($($t:ty),*) => {$(
        impl Scalar for $t {
            const TAKES: &'static str = concat!("integers from ", stringify!($t), "::MIN to ", stringify!($t), "::MAX");
            fn from_i64(i: i64) -> Option<Self> {
                <$t>::try_from(i).ok()
            }
            fn from_u64(u: u64) -> Option<Self> {
                <$t>::try_from(u).ok()
            }
        }
    )*};
}
int_scalar!(u8, u16, u32, u64, i8, i16, i32, i64);

// Integers and decimals both convert, as serde_json converts them for `f32`/`f64`.
impl Scalar for f32 {
    const TAKES: &'static str = "numbers";
    fn from_i64(i: i64) -> Option<Self> {
        Some(i as f32)
    }
    fn from_u64(u: u64) -> Option<Self> {
        Some(u as f32)
    }
    fn from_f64(f: f64) -> Option<Self> {
        Some(f as f32)
    }
}

impl Scalar for f64 {
    const TAKES: &'static str = "numbers";
    fn from_i64(i: i64) -> Option<Self> {
        Some(i as f64)
    }
    fn from_u64(u: u64) -> Option<Self> {
        Some(u as f64)
    }
    fn from_f64(f: f64) -> Option<Self> {
        Some(f)
    }
}

// FP16 rounds once, from the f64 JSON gives (as numpy's `np.float16(x)` does): through f32
// first, 2049.0000000001 became 2048 instead of 2050 (a red-team finding).
impl Scalar for half::f16 {
    const TAKES: &'static str = "numbers";
    fn from_i64(i: i64) -> Option<Self> {
        Some(f16_nearest(i as f64))
    }
    fn from_u64(u: u64) -> Option<Self> {
        Some(f16_nearest(u as f64))
    }
    fn from_f64(f: f64) -> Option<Self> {
        Some(f16_nearest(f))
    }
}

/// The f16 nearest to `x` (ties to even), as IEEE 754 rounds: `half::f16::from_f64` may go
/// through f32 (with F16C), rounding twice, so its answer is checked against its neighbours.
fn f16_nearest(x: f64) -> half::f16 {
    use half::f16;
    let c = f16::from_f64(x);
    if x.is_nan() {
        return c;
    }
    // Past the largest finite f16 plus half an ulp (65520) is infinity; below it, the
    // largest finite value of its sign.
    if c.is_infinite() {
        return if x.abs() >= 65520.0 {
            c
        } else {
            f16::MAX.copysign(c)
        };
    }
    let error = |v: f16| (v.to_f64() - x).abs();
    let mut best = c;
    for bits in [c.to_bits().wrapping_add(1), c.to_bits().wrapping_sub(1)] {
        let n = f16::from_bits(bits);
        if n.is_finite()
            && (n.is_sign_negative() == c.is_sign_negative())
            && (error(n) < error(best) || (error(n) == error(best) && bits & 1 == 0))
        {
            best = n;
        }
    }
    best
}

impl Scalar for Vec<u8> {
    const TAKES: &'static str = "strings";
    const MIN_CHARS: usize = 2;
    fn from_string(s: &str) -> Option<Self> {
        Some(s.as_bytes().to_vec())
    }
}

/// What a decode builds, and the reason it stopped, if it was ours rather than the JSON's.
struct Sink<'a, T> {
    out: Vec<T>,
    count: usize,
    shape: &'a [usize],
    fail: Option<String>,
    /// The length of the first array seen at each depth (0 = `data` itself): nested data
    /// must be rectangular, every array at one depth of one length.
    lens: Vec<Option<usize>>,
    /// The depth of the elements (that of the first seen: [`Sink::same_kind`] keeps them at
    /// one depth).
    leaf_depth: Option<usize>,
    /// Per depth, whether what sits there is an array (`true`) or an element: an empty
    /// array where elements are (`[[], 1, 2]`) is as ragged as one of another length.
    kinds: Vec<Option<bool>>,
}

impl<T> Sink<'_, T> {
    /// Records that an array (`array`) or an element sits at `depth`; `false` when another
    /// kind sits there already.
    fn same_kind(&mut self, depth: usize, array: bool) -> bool {
        if self.kinds.len() <= depth {
            self.kinds.resize(depth + 1, None);
        }
        *self.kinds[depth].get_or_insert(array) == array
    }
}

/// One JSON value inside `data` at a nesting depth: an array (recursed into) or an element.
struct Node<'s, 'a, T> {
    sink: &'s mut Sink<'a, T>,
    depth: usize,
}

/// Decodes `data` into exactly `count` elements of `T`, row-major.
fn decode_elements<T: Scalar + Element>(
    shape: &[usize],
    count: usize,
    json: &str,
) -> Result<Vec<T>, String> {
    let mut sink = Sink {
        out: Vec::with_capacity(count.min(json.len() / (T::MIN_CHARS + 1) + 1)),
        count,
        shape,
        fail: None,
        lens: Vec::new(),
        leaf_depth: None,
        kinds: Vec::new(),
    };
    let mut de = serde_json::Deserializer::from_str(json);
    let parsed = serde::de::DeserializeSeed::deserialize(
        Node {
            sink: &mut sink,
            depth: 0,
        },
        &mut de,
    )
    .and_then(|()| de.end());
    if let Err(e) = parsed {
        return Err(sink
            .fail
            .take()
            .unwrap_or_else(|| format!("malformed data: {e}")));
    }
    if sink.out.len() != count {
        return Err(element_count_mismatch(
            shape,
            count,
            T::DATATYPE,
            sink.out.len(),
        ));
    }
    // Nested data is read row-major, so its innermost arrays must be the shape's last
    // dimension: `[[20 values] x 3]` for a shape of [2, 30] would put a row boundary inside
    // an array (a red-team finding). Extra levels of one element (Triton's QA nests a row
    // 100 deep) and flat data are fine.
    if let (Some(depth), Some(&last)) = (sink.leaf_depth, shape.last())
        && depth >= 2
        && let Some(Some(innermost)) = sink.lens.get(depth - 1)
        && *innermost != last
    {
        return Err(format!(
            "data is nested in arrays of {innermost} elements, but the last dimension of shape {shape:?} is {last}"
        ));
    }
    Ok(sink.out)
}

impl<T: Scalar + Element> Node<'_, '_, T> {
    fn stop<E: serde::de::Error>(self, reason: String) -> Result<(), E> {
        let e = E::custom(&reason);
        self.sink.fail = Some(reason);
        Err(e)
    }

    /// Adds an element; `None` (`seen` says what the JSON held) is refused with the
    /// element's index, what it was and what the datatype takes (every refusal said "the
    /// wrong type", an integer out of range included: a review's finding).
    fn push<E: serde::de::Error>(self, value: Option<T>, seen: Seen<'_>) -> Result<(), E> {
        let Some(value) = value else {
            let index = self.sink.out.len();
            let what = match seen {
                Seen::Number(n) => format!("{n}"),
                Seen::Kind(kind) => kind.to_owned(),
            };
            return self.stop(format!(
                "data element {index} is {what}: {} data takes {}",
                T::DATATYPE,
                T::TAKES
            ));
        };
        if !self.sink.same_kind(self.depth, false) {
            let here = self.depth;
            return self.stop(format!(
                "data is ragged: an element and an array both {here} levels deep"
            ));
        }
        // Elements at two depths are refused above (an array sits at the shallower one on
        // the way to the deeper), so the first element's depth is every element's.
        self.sink.leaf_depth.get_or_insert(self.depth);
        if self.sink.out.len() == self.sink.count {
            let reason = format!(
                "shape {:?} needs {} {} elements but data has more",
                self.sink.shape,
                self.sink.count,
                T::DATATYPE
            );
            return self.stop(reason);
        }
        self.sink.out.push(value);
        Ok(())
    }
}

impl<'de, T: Scalar + Element> serde::de::DeserializeSeed<'de> for Node<'_, '_, T> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, T: Scalar + Element> serde::de::Visitor<'de> for Node<'_, '_, T> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{} tensor data", T::DATATYPE)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.depth >= MAX_NESTING {
            return self.stop(format!("data is nested deeper than {MAX_NESTING} levels"));
        }
        if !self.sink.same_kind(self.depth, true) {
            let here = self.depth;
            return self.stop(format!(
                "data is ragged: an element and an array both {here} levels deep"
            ));
        }
        let depth = self.depth + 1;
        let mut len = 0usize;
        while seq
            .next_element_seed(Node {
                sink: &mut *self.sink,
                depth,
            })?
            .is_some()
        {
            len += 1;
        }
        // Triton flattens nested data whatever its structure; `[[1, 2], [3]]` for a shape of
        // [1, 3] is refused here rather than read as one row.
        if self.sink.lens.len() <= self.depth {
            self.sink.lens.resize(self.depth + 1, None);
        }
        match self.sink.lens[self.depth] {
            None => self.sink.lens[self.depth] = Some(len),
            Some(first) if first != len => {
                let level = self.depth + 1;
                return self.stop(format!(
                    "data is ragged: arrays {level} levels deep hold {first} and {len} elements"
                ));
            }
            Some(_) => {}
        }
        Ok(())
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        self.push(
            T::from_bool(v),
            Seen::Kind(if v { "true" } else { "false" }),
        )
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.push(T::from_i64(v), Seen::Number(&v))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.push(T::from_u64(v), Seen::Number(&v))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        self.push(T::from_f64(v), Seen::Number(&v))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.push(T::from_string(v), Seen::Kind("a string"))
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.push(None, Seen::Kind("null"))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        self.push(None, Seen::Kind("an object"))
    }
}

/// What a refused element was, for its error: a number (quoted as read: no data of a
/// string is echoed back) or a kind of value.
enum Seen<'a> {
    Number(&'a dyn std::fmt::Display),
    Kind(&'static str),
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

/// Encodes outputs; those flagged binary go after the JSON header as raw bytes, written
/// straight into the body (no per-tensor copy).
/// Outputs of at least this many bytes have their answer's exact length counted before it
/// is written (a pass of the JSON encoder without a buffer), for the in-flight budget.
const COUNTED_ANSWER_BYTES: usize = 256 << 10;

/// Whether the answer's outputs hold [`COUNTED_ANSWER_BYTES`] or more.
pub fn is_large(response: &InferResponse) -> bool {
    response
        .outputs
        .iter()
        .filter_map(|o| o.data.as_ref())
        .map(|d| d.0.raw_len())
        .fold(0usize, usize::saturating_add)
        >= COUNTED_ANSWER_BYTES
}

/// What [`encode_response`] writes at least, without a pass over the values: the binary
/// outputs' bytes, and two characters (a digit and a comma) per element written as JSON.
pub fn answer_len_at_least(response: &InferResponse, binary_flags: &[bool]) -> usize {
    response
        .outputs
        .iter()
        .zip(binary_flags.iter().chain(std::iter::repeat(&false)))
        .filter_map(|(o, &binary)| o.data.as_ref().map(|d| (&d.0, binary)))
        .map(|(t, binary)| {
            if binary {
                t.raw_len()
            } else {
                t.len().saturating_mul(2)
            }
        })
        .fold(0usize, usize::saturating_add)
}

/// The answer: JSON, or JSON then the binary outputs. `admit` is asked for the answer's
/// exact length before the answer is written when its outputs hold [`COUNTED_ANSWER_BYTES`] or more (a 659-byte
/// request's 369 MB JSON answer was built before the in-flight budget was asked: a
/// review's finding); a refusal is returned, nothing written. The buffer is then made to
/// that length at once (it grew by doubling).
pub fn encode_response(
    mut response: InferResponse,
    binary_flags: &[bool],
    admit: impl FnOnce(usize) -> Result<(), AppError>,
) -> Result<EncodedResponse, AppError> {
    let large = is_large(&response);
    let mut binary: Vec<Tensor> = vec![];
    for (out, &flag) in response.outputs.iter_mut().zip(binary_flags) {
        if flag && let Some(JsonData(tensor)) = out.data.take() {
            let mut params = out.parameters.take().unwrap_or_default();
            params.insert("binary_data_size".into(), tensor.raw_len().into());
            out.parameters = Some(params);
            binary.push(tensor);
        }
    }
    let tail: usize = binary.iter().map(Tensor::raw_len).sum();
    let mut capacity = 4096 + tail;
    if large {
        let mut count = Count(0);
        serde_json::to_writer(&mut count, &response)
            .map_err(|e| AppError::internal(format!("cannot encode response: {e}")))?;
        let total = count.0.saturating_add(tail);
        admit(total)?;
        capacity = total;
    }
    let mut body = Vec::with_capacity(capacity);
    serde_json::to_writer(&mut body, &response)
        .map_err(|e| AppError::internal(format!("cannot encode response: {e}")))?;
    if binary_flags.iter().any(|&b| b) {
        let header_len = body.len();
        for tensor in &binary {
            tensor.write_raw(&mut body);
        }
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

/// Triton's classification extension, as Triton's HTTP and gRPC frontends make it: for a
/// model that batches, the top `k` of each batch entry's elements (all of them, whatever the
/// entry's rank; an index counts through the entry's elements), shape `[batch, k]`; for one
/// that does not (`batched` false), the top `k` of the whole tensor, shape `[k]`. Each as
/// BYTES `"<score>:<index>[:<label>]"`, the score printed as C++'s `std::to_string` prints
/// it (`%f`, six decimals, for floating point; the exact integer otherwise), `k` at most
/// the elements there are.
pub fn classify(
    tensor: &Tensor,
    k: usize,
    labels: &[String],
    batched: bool,
) -> Result<Tensor, AppError> {
    // Integers are ranked and printed in their own values (as Triton's AddClassResults<T>
    // does): through f64, UINT64 values above 2^53 tied and printed as values not in the
    // tensor (a red-team finding). i128 holds every i64 and u64 exactly.
    let flat: Scores = match tensor {
        Tensor::Fp32(a) => Scores::Float(a.iter().map(|&x| f64::from(x)).collect()),
        Tensor::Fp64(a) => Scores::Float(a.iter().copied().collect()),
        Tensor::Fp16(a) => Scores::Float(a.iter().map(|x| f64::from(x.to_f32())).collect()),
        Tensor::Int8(a) => Scores::Int(a.iter().map(|&x| i128::from(x)).collect()),
        Tensor::Int16(a) => Scores::Int(a.iter().map(|&x| i128::from(x)).collect()),
        Tensor::Int32(a) => Scores::Int(a.iter().map(|&x| i128::from(x)).collect()),
        Tensor::Int64(a) => Scores::Int(a.iter().map(|&x| i128::from(x)).collect()),
        Tensor::Uint8(a) => Scores::Int(a.iter().map(|&x| i128::from(x)).collect()),
        Tensor::Uint16(a) => Scores::Int(a.iter().map(|&x| i128::from(x)).collect()),
        Tensor::Uint32(a) => Scores::Int(a.iter().map(|&x| i128::from(x)).collect()),
        Tensor::Uint64(a) => Scores::Int(a.iter().map(|&x| i128::from(x)).collect()),
        other => {
            return Err(AppError::bad_request(format!(
                "classification needs a numeric output, not {}",
                other.datatype()
            )));
        }
    };
    let shape = tensor.shape().to_vec();
    let (rows, classes) = match shape.split_first() {
        Some((&rows, rest)) if batched => (rows, rest.iter().product::<usize>()),
        _ => (1, flat.len()),
    };
    if classes == 0 {
        return Err(AppError::bad_request(format!(
            "classification needs at least one value to rank in each {}; the output's shape is {shape:?}",
            if batched { "batch entry" } else { "output" }
        )));
    }
    let k = k.min(classes).max(1);
    let mut out = Vec::with_capacity(rows * k);
    for r in 0..rows {
        let range = r * classes..(r + 1) * classes;
        let mut order: Vec<usize> = (0..classes).collect();
        match &flat {
            Scores::Float(v) => {
                let row = &v[range.clone()];
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            }
            Scores::Int(v) => {
                let row = &v[range.clone()];
                order.sort_by(|&a, &b| row[b].cmp(&row[a]));
            }
        }
        for &i in order.iter().take(k) {
            let value = match &flat {
                Scores::Float(v) => c_fixed(v[range.start + i]),
                Scores::Int(v) => v[range.start + i].to_string(),
            };
            let text = match labels.get(i) {
                Some(label) => format!("{value}:{i}:{label}"),
                None => format!("{value}:{i}"),
            };
            out.push(text.into_bytes());
        }
    }
    let out_shape = if batched { vec![rows, k] } else { vec![k] };
    Tensor::from_vec(out_shape, out).map_err(|e| AppError::internal(e.to_string()))
}

/// `x` as C's `printf("%f")` (C++'s `std::to_string`) writes it: six decimals, `nan`,
/// `inf`, `-inf`.
fn c_fixed(x: f64) -> String {
    if x.is_nan() {
        if x.is_sign_negative() { "-nan" } else { "nan" }.to_owned()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.to_owned()
    } else {
        format!("{x:.6}")
    }
}

/// An output's values for [`classify`], in a type that keeps them exact.
enum Scores {
    Float(Vec<f64>),
    Int(Vec<i128>),
}

impl Scores {
    fn len(&self) -> usize {
        match self {
            Scores::Float(v) => v.len(),
            Scores::Int(v) => v.len(),
        }
    }
}

/// [`decode_request`] for the codec benchmark (benches/codec.rs): the number of input
/// elements decoded, or the error message.
/// The model has one input, `features`, of `datatype` and any shape of rank 2.
pub fn decode_request_for_bench(
    body: &[u8],
    header_len: Option<usize>,
    datatype: DataType,
) -> Result<usize, String> {
    let specs = [TensorSpec {
        name: "features".into(),
        datatype,
        shape: vec![-1, -1],
    }];
    decode_request(body, header_len, &specs, &mut |_| Ok(()))
        .map(|r| r.inputs.iter().map(|t| t.tensor.len()).sum())
        .map_err(|e| e.message)
}

/// [`parse_json_data`] for the codec benchmark: the number of elements decoded.
pub fn parse_json_data_for_bench(
    datatype: DataType,
    shape: Vec<usize>,
    json: &str,
) -> Result<usize, String> {
    let count = element_count(&shape).map_err(|e| e.to_string())?;
    parse_json_data(datatype, shape, count, json).map(|t| t.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(name: &str, datatype: DataType) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            datatype,
            shape: vec![-1, -1],
        }
    }

    fn decode(body: serde_json::Value, specs: &[TensorSpec]) -> Result<DecodedRequest, String> {
        decode_request(
            &serde_json::to_vec(&body).unwrap(),
            None,
            specs,
            &mut |_| Ok(()),
        )
        .map_err(|e| e.message)
    }

    /// Red-team finding: the JSON around the tensors was parsed whole before any check, and
    /// outside the in-flight budget: a shape of 30 million dimensions, 6 million parameters
    /// or 5 million requested outputs in a 60 MB body took 0.8–1.6 GB each. Now each list is
    /// refused at the first element past its bound, and a parameter is a scalar (KServe v2).
    #[test]
    fn the_json_around_the_tensors_is_bounded_as_it_is_parsed() {
        let specs = [spec("x", DataType::Fp32)];
        let input = |shape: Vec<i64>| json!({"name": "x", "shape": shape, "datatype": "FP32", "data": [1.0]});
        let ok = decode(json!({"inputs": [input(vec![1; 64])]}), &specs);
        assert!(ok.is_ok(), "{ok:?}");
        for (body, needle) in [
            (
                json!({"inputs": [input(vec![1; 65])]}),
                "more than 64 elements",
            ),
            (
                json!({"inputs": [input(vec![1])], "parameters": {"a": [1, 2, 3]}}),
                "not an array",
            ),
            (
                json!({"inputs": [input(vec![1])], "parameters": {"a": {"b": 1}}}),
                "not an object",
            ),
            (
                json!({"inputs": [input(vec![1])],
                    "parameters": serde_json::Map::from_iter((0..257).map(|i| (i.to_string(), json!(i))))}),
                "more than 256 parameters",
            ),
            (
                json!({"inputs": [input(vec![1])], "outputs": vec![json!({"name": "y"}); 4097]}),
                "more than 4096 elements",
            ),
            (
                json!({"inputs": vec![input(vec![1]); 4097]}),
                "more than 4096 elements",
            ),
        ] {
            let e = decode(body, &specs).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
        // Scalars of every kind, and null, are parameters.
        let ok = decode(
            json!({"inputs": [input(vec![1])],
                "parameters": {"b": true, "i": -1, "u": 1, "f": 0.5, "s": "x", "n": null}}),
            &specs,
        )
        .unwrap();
        assert_eq!(ok.parameters.len(), 6);
    }

    /// Red-team finding: a raw binary request to a model whose declared input shape's size
    /// overflows (three dimensions of 2^31) panicked on the multiplication in a debug build
    /// (the connection dropped, no answer). Now a 400 naming the shape, with or without a
    /// variable dimension.
    #[test]
    fn a_raw_request_to_a_shape_too_large_to_count_is_refused() {
        let big = 1i64 << 31;
        for shape in [vec![big, big, big], vec![-1, big, big, big]] {
            let spec = [TensorSpec {
                name: "x".into(),
                datatype: DataType::Fp32,
                shape: shape.clone(),
            }];
            let e = decode_raw(&[0u8; 16], &spec).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{shape:?}");
            assert!(e.message.contains("too large"), "{shape:?}: {}", e.message);
        }
    }

    /// Red-team findings: a key repeated inside `parameters` (request, input or output
    /// level) was kept last-wins where every other repeated field is refused; and an empty
    /// `outputs` list answered no output where Triton answers every one.
    #[test]
    fn repeated_parameters_are_refused_and_no_outputs_listed_means_all() {
        let specs = [spec("features", DataType::Fp32)];
        let decode_text = |body: &str| {
            decode_request(body.as_bytes(), None, &specs, &mut |_| Ok(())).map_err(|e| e.message)
        };
        let input = r#"{"name": "features", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]"#;
        for body in [
            format!(
                r#"{{"parameters": {{"binary_data_output": true, "binary_data_output": false}}, "inputs": [{input}}}]}}"#
            ),
            format!(r#"{{"inputs": [{input}, "parameters": {{"x": 1, "x": 1}}}}]}}"#),
            format!(
                r#"{{"inputs": [{input}}}], "outputs": [{{"name": "p", "parameters": {{"classification": 2, "classification": 0}}}}]}}"#
            ),
        ] {
            let e = decode_text(&body).unwrap_err();
            assert!(e.contains("is given more than once"), "{body}: {e}");
        }
        let ok = decode_text(&format!(
            r#"{{"parameters": {{"a": 1, "b": null}}, "inputs": [{input}}}], "outputs": []}}"#
        ))
        .unwrap();
        assert!(ok.outputs.is_none(), "an empty list is every output");
        assert_eq!(ok.parameters.len(), 2);
        let ok = decode_text(&format!(r#"{{"parameters": null, "inputs": [{input}}}]}}"#)).unwrap();
        assert!(ok.parameters.is_empty());
        // An output asked into a shared-memory region: refused (it was answered inline).
        let e = decode_text(&format!(
            r#"{{"inputs": [{input}}}], "outputs": [{{"name": "p", "parameters": {{"shared_memory_region": "r", "shared_memory_byte_size": 8}}}}]}}"#
        ))
        .unwrap_err();
        assert!(e.contains("shared memory is not supported"), "{e}");
        // An input in a region, with inline data or without: refused (the region was
        // dropped and the inline data used: a red-team finding).
        for input in [
            r#"{"name": "x", "datatype": "FP32", "shape": [1], "data": [1], "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 4}}"#,
            r#"{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"shared_memory_region": "r"}}"#,
        ] {
            let e = decode_text(&format!(r#"{{"inputs": [{input}]}}"#)).unwrap_err();
            assert!(
                e.contains("input \"x\"") && e.contains("shared memory is not supported"),
                "{e}"
            );
        }
    }

    /// The model's inputs are checked before any data is decoded: the error is the unknown
    /// name, the duplicate or the datatype, never the (malformed) data behind it.
    #[test]
    fn inputs_are_checked_against_the_model_before_their_data() {
        let specs = [spec("features", DataType::Fp32)];
        let good = serde_json::json!({"name": "features", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]});
        let junk = |name: &str, datatype: &str| serde_json::json!({"name": name, "shape": [1, 2], "datatype": datatype, "data": "not an array"});
        let e = decode(
            serde_json::json!({"inputs": [good, junk("other", "FP32")]}),
            &specs,
        )
        .unwrap_err();
        assert!(e.starts_with("unknown input \"other\""), "{e}");
        let e = decode(
            serde_json::json!({"inputs": [good, junk("features", "FP32")]}),
            &specs,
        )
        .unwrap_err();
        assert_eq!(e, "input \"features\" is given more than once");
        let e = decode(
            serde_json::json!({"inputs": [junk("features", "BYTES")]}),
            &specs,
        )
        .unwrap_err();
        assert!(e.contains("datatype"), "{e}");
        assert!(!e.contains("not an array"), "{e}");
        // Many inputs: refused at the first the model does not have; very many (more than
        // any model takes) as the list is read.
        let many: Vec<_> = std::iter::once(good.clone())
            .chain((1..4_000).map(|i| junk(&format!("in{i}"), "FP32")))
            .collect();
        let e = decode(serde_json::json!({"inputs": many}), &specs).unwrap_err();
        assert!(e.starts_with("unknown input \"in1\""), "{e}");
        let very_many: Vec<_> = std::iter::once(good)
            .chain((1..50_000).map(|i| junk(&format!("in{i}"), "FP32")))
            .collect();
        let e = decode(serde_json::json!({"inputs": very_many}), &specs).unwrap_err();
        assert!(e.contains("more than 4096 elements"), "{e}");
    }

    /// A BYTES input reserves what its declared elements take at least before its data is
    /// decoded; a refused reservation refuses the request with nothing decoded.
    #[test]
    fn bytes_inputs_reserve_their_elements_before_decoding() {
        let specs = [spec("text", DataType::Bytes)];
        let body = serde_json::to_vec(&serde_json::json!({"inputs": [
            {"name": "text", "shape": [1000, 1000], "datatype": "BYTES", "data": ["a", "b"]}]}))
        .unwrap();
        let mut asked = vec![];
        let e = decode_request(&body, None, &specs, &mut |n| {
            asked.push(n);
            Err(AppError::overloaded("over budget"))
        })
        .unwrap_err();
        assert_eq!(e.message, "over budget");
        assert_eq!(asked, vec![1_000_000 * BYTES_ELEMENT_MIN]);
        // Within the budget, the data is decoded (and its own errors reported).
        let e = decode(serde_json::from_slice(&body).unwrap(), &specs).unwrap_err();
        assert!(e.contains("text"), "{e}");
        let ok = decode(
            serde_json::json!({"inputs": [{"name": "text", "shape": [1, 2], "datatype": "BYTES", "data": ["", "abc"]}]}),
            &specs,
        )
        .unwrap();
        assert_eq!(ok.inputs[0].tensor.memory_len(), 2 * BYTES_ELEMENT_MIN + 16);
    }

    /// Elements of the wrong kind, in each decoder.
    /// Red-team finding: FP16 from JSON rounded twice (f64 → f32 → f16), one unit off near
    /// a tie. The expected bits are numpy's `np.float16(x)` (round to nearest, once).
    #[test]
    fn fp16_from_json_rounds_once() {
        let t = parse_json_data(
            DataType::Fp16,
            vec![1, 3],
            3,
            "[2049.0000000001, 1.0004882812500002, 65519.99]",
        )
        .unwrap();
        let Tensor::Fp16(a) = t else { panic!("FP16") };
        let bits: Vec<u16> = a.iter().map(|x| x.to_bits()).collect();
        // np.float16(2049.0000000001) = 2050 (0x6801), np.float16(1.0004882812500002) =
        // 1.0009766 (0x3c01), np.float16(65519.99) = 65504 (0x7bff).
        assert_eq!(bits, [0x6801, 0x3c01, 0x7bff]);
    }

    #[test]
    fn each_decoder_refuses_elements_of_the_wrong_kind() {
        for (datatype, data, needle) in [
            (
                DataType::Fp32,
                "[[true]]",
                "data element 0 is true: FP32 data takes numbers",
            ),
            (
                DataType::Int64,
                "[[1.5]]",
                "data element 0 is 1.5: INT64 data takes integers from i64::MIN to i64::MAX",
            ),
            (
                DataType::Uint8,
                "[[256]]",
                "data element 0 is 256: UINT8 data takes integers from u8::MIN to u8::MAX",
            ),
            (
                DataType::Int8,
                "[[-129]]",
                "data element 0 is -129: INT8 data takes integers from i8::MIN to i8::MAX",
            ),
            (
                DataType::Int64,
                "[9223372036854775808]",
                "data element 0 is 9223372036854775808: INT64",
            ),
            (
                DataType::Bool,
                "[[1]]",
                "data element 0 is 1: BOOL data takes true or false",
            ),
            (
                DataType::Bytes,
                "[[1]]",
                "data element 0 is 1: BYTES data takes strings",
            ),
            (
                DataType::Fp32,
                "[[null]]",
                "data element 0 is null: FP32 data takes numbers",
            ),
            (
                DataType::Fp32,
                "[{\"a\": 1}]",
                "data element 0 is an object: FP32",
            ),
            (
                DataType::Uint8,
                "[\"secret\"]",
                "data element 0 is a string: UINT8",
            ),
        ] {
            let e = parse_json_data(datatype, vec![1, 1], 1, data).unwrap_err();
            assert!(e.starts_with(needle), "{datatype:?} {data}: {e}");
        }
        // The element's index in row-major order.
        let e = parse_json_data(DataType::Uint8, vec![1, 3], 3, "[[1, 2, 300]]").unwrap_err();
        assert!(e.starts_with("data element 2 is 300: UINT8"), "{e}");
    }

    /// The request, its inputs and its outputs are JSON objects: serde's derive took arrays
    /// of their fields in order too (a review's finding).
    #[test]
    fn requests_inputs_and_outputs_are_objects_not_arrays() {
        let specs = [TensorSpec {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![-1, 2],
        }];
        let ok = decode(
            serde_json::json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}], "outputs": [{"name": "y"}]}),
            &specs,
        );
        assert!(ok.is_ok(), "{ok:?}");
        for body in [
            serde_json::json!([null, null, [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]]),
            serde_json::json!({"inputs": [["x", [1, 2], "FP32", null, [1, 2]]]}),
            serde_json::json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}], "outputs": [["y"]]}),
        ] {
            let e = decode(body.clone(), &specs).unwrap_err();
            assert!(e.contains("expected a JSON object"), "{body}: {e}");
        }
        // Nothing after the object.
        let e = decode_request(
            br#"{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]} {}"#,
            None,
            &specs,
            &mut |_| Ok(()),
        )
        .unwrap_err();
        assert!(e.message.contains("trailing characters"), "{}", e.message);
    }

    #[test]
    fn outputs_requested_twice_are_refused() {
        assert!(check_unique_outputs(["a", "b", "c"].into_iter()).is_ok());
        let e = check_unique_outputs(["a", "b", "a"].into_iter()).unwrap_err();
        assert_eq!(e.message, "output \"a\" is requested more than once");
    }
}

#[cfg(test)]
mod classify_tests {
    use super::*;

    /// Red-team finding: UINT64 scores went through f64, so 2^53 and 2^53 + 1 tied (the
    /// larger ranked second) and u64::MAX printed as 18446744073709552000. Ranked and printed
    /// in their own values, as Triton does.
    #[test]
    fn integer_outputs_are_ranked_and_printed_exactly() {
        let big = 1u64 << 53;
        let t = Tensor::from_vec(vec![1, 4], vec![big, big + 1, 0, u64::MAX]).unwrap();
        let out = classify(&t, 3, &[], true).unwrap();
        let Tensor::Bytes(a) = out else {
            panic!("not BYTES")
        };
        let texts: Vec<String> = a
            .iter()
            .map(|b| String::from_utf8(b.clone()).unwrap())
            .collect();
        assert_eq!(
            texts,
            [
                "18446744073709551615:3",
                "9007199254740993:1",
                "9007199254740992:0"
            ]
        );
        let t = Tensor::from_vec(vec![1, 2], vec![i64::MIN, -1]).unwrap();
        let Tensor::Bytes(a) = classify(&t, 2, &["a".into(), "b".into()], true).unwrap() else {
            panic!("not BYTES")
        };
        let texts: Vec<&[u8]> = a.iter().map(Vec::as_slice).collect();
        assert_eq!(texts, [&b"-1:1:b"[..], &b"-9223372036854775808:0:a"[..]]);
    }

    /// Red-team finding: an output with no classes along its last axis (shape [2, 0]) made
    /// a top-1 tensor of the wrong size: a 500. Now a 400 naming the shape; ordinary outputs
    /// are classified as before (top k by score, label when there is one).
    #[test]
    fn an_output_without_classes_is_a_client_error() {
        let empty = Tensor::from_vec(vec![2, 0], Vec::<f32>::new()).unwrap();
        let e = classify(&empty, 1, &[], true).unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        assert!(e.message.contains("[2, 0]"), "{}", e.message);
        let scores = Tensor::from_vec(vec![2, 3], vec![0.1f32, 0.7, 0.2, 0.5, 0.3, 0.2]).unwrap();
        let top = classify(&scores, 2, &["a".into(), "b".into(), "c".into()], true).unwrap();
        assert_eq!(top.shape(), &[2, 2]);
        let Tensor::Bytes(a) = top else {
            panic!("BYTES");
        };
        let got: Vec<String> = a
            .iter()
            .map(|b| String::from_utf8(b.clone()).unwrap())
            .collect();
        assert_eq!(
            got,
            [
                "0.700000:1:b",
                "0.200000:2:c",
                "0.500000:0:a",
                "0.300000:1:b"
            ]
        );
        // Integer outputs of every width are classified too (Triton classifies any
        // numeric output).
        for t in [
            Tensor::from_vec(vec![1, 3], vec![1i8, 9, 4]).unwrap(),
            Tensor::from_vec(vec![1, 3], vec![1u16, 9, 4]).unwrap(),
            Tensor::from_vec(vec![1, 3], vec![1u64, 9, 4]).unwrap(),
        ] {
            let Tensor::Bytes(a) = classify(&t, 1, &[], true).unwrap() else {
                panic!("BYTES");
            };
            assert_eq!(a.iter().next().unwrap(), b"9:1");
        }
    }

    /// A review's finding: classes were ranked along the last axis only, where Triton's
    /// frontends rank every element of a batch entry (a model that batches: shape
    /// `[batch, k]`) or of the whole output (one that does not: shape `[k]`), and print a
    /// floating-point score as `std::to_string` does (six decimals). Expected values as
    /// Triton's `TopkClassifications` gives them.
    #[test]
    fn batch_entries_or_the_whole_output_are_ranked_as_triton_ranks_them() {
        let t = Tensor::from_vec(vec![2, 3], vec![0.1f64, 0.9, 0.5, 0.7, 0.2, 0.3]).unwrap();
        let texts = |t: Tensor| -> (Vec<usize>, Vec<String>) {
            let shape = t.shape().to_vec();
            let Tensor::Bytes(a) = t else { panic!("BYTES") };
            (
                shape,
                a.iter()
                    .map(|b| String::from_utf8(b.clone()).unwrap())
                    .collect(),
            )
        };
        assert_eq!(
            texts(classify(&t, 2, &[], false).unwrap()),
            (vec![2], vec!["0.900000:1".into(), "0.700000:3".into()])
        );
        // A batch of two entries of shape [2, 2]: each ranked over its four elements.
        let t = Tensor::from_vec(
            vec![2, 2, 2],
            vec![1.0f32, 4.0, 3.0, 2.0, -1.0, -4.0, -3.0, -2.0],
        )
        .unwrap();
        assert_eq!(
            texts(classify(&t, 2, &[], true).unwrap()),
            (
                vec![2, 2],
                vec![
                    "4.000000:1".into(),
                    "3.000000:2".into(),
                    "-1.000000:0".into(),
                    "-2.000000:3".into()
                ]
            )
        );
        // k past the elements there are: all of them. Non-finite scores as printf writes them.
        let t = Tensor::from_vec(vec![1, 3], vec![f32::NAN, f32::NEG_INFINITY, 1e20]).unwrap();
        assert_eq!(
            texts(classify(&t, 9, &[], true).unwrap()),
            (
                vec![1, 3],
                vec![
                    "nan:0".into(),
                    "100000002004087734272.000000:2".into(),
                    "-inf:1".into()
                ]
            )
        );
    }
}

/// A writer that only counts what it is given.
struct Count(usize);

impl std::io::Write for Count {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
