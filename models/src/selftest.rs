//! The load-time self-test: a version folder ships reference inputs and the outputs the
//! exporting runtime (onnxruntime) produced for them (`selftest.json`, written by
//! `models/train/selftest.py`); at load the engine runs the inputs and must reproduce every
//! output element within the tolerance `bundle.toml` declares, or the version is refused.
//! See `docs/bundle-format.md`.

use std::collections::BTreeMap;

use nightingale_inference::{
    Backend, DataType, InferenceError, ModelMetadata, NamedTensor, Tensor,
};
use serde::Deserialize;

use crate::manifest::{SelfTestSpec, Tolerance};

/// The `selftest.json` format this build reads.
pub const SELFTEST_FORMAT: u32 = 1;

/// Why a self-test did not pass.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SelfTestError {
    #[error("the self-test file is not valid: {reason}")]
    Invalid { reason: String },
    #[error("running the reference inputs failed: {}", crate::error::chain(source))]
    Run {
        #[source]
        source: InferenceError,
    },
    #[error("the engine gave no output {output:?}")]
    MissingOutput { output: String },
    #[error("output {output:?} has shape {got:?}, the reference has {expected:?}")]
    Shape {
        output: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error(
        "output {output:?} element {index:?} is {actual} where the reference runtime gave {expected} \
         (difference {diff:e}, allowed {allowed:e} = atol {atol:e} + rtol {rtol:e} x |reference|; \
         {failing} of {total} elements outside the tolerance)"
    )]
    Mismatch {
        output: String,
        /// Multi-dimensional index of the worst element.
        index: Vec<usize>,
        expected: f64,
        actual: f64,
        diff: f64,
        allowed: f64,
        atol: f64,
        rtol: f64,
        failing: usize,
        total: usize,
    },
}

/// What a passing self-test measured.
#[derive(Clone, Debug, PartialEq)]
pub struct SelfTestReport {
    /// Rows (first dimension of the first input) run.
    pub rows: usize,
    /// Output elements compared.
    pub elements: usize,
    /// Largest absolute difference over every output element.
    pub max_diff: f64,
    /// The output holding `max_diff`.
    pub max_diff_output: String,
    /// The bundle-wide default tolerance (per-output overrides may differ).
    pub atol: f64,
    pub rtol: f64,
    /// The engine that ran it.
    pub engine: &'static str,
    /// Who wrote the reference outputs, as the file says (e.g. `onnxruntime 1.23.2`).
    pub producer: String,
}

impl std::fmt::Display for SelfTestReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "self-test {} rows within atol {:e} rtol {:e} (max diff {:.1e}) on {}",
            self.rows, self.atol, self.rtol, self.max_diff, self.engine
        )
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    format: u32,
    #[serde(default)]
    producer: String,
    #[serde(default)]
    #[allow(dead_code)]
    script: String,
    inputs: Vec<FileTensor>,
    outputs: Vec<FileTensor>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTensor {
    name: String,
    datatype: DataType,
    shape: Vec<usize>,
    /// The values as JSON numbers, row-major (integers, or each float's exact decimal form) ...
    #[serde(default)]
    data: Option<Vec<serde_json::Number>>,
    /// ... or the raw little-endian bytes, base64 (compact, for large inputs such as images).
    #[serde(default)]
    data_base64: Option<String>,
}

fn invalid(reason: impl Into<String>) -> SelfTestError {
    SelfTestError::Invalid {
        reason: reason.into(),
    }
}

impl FileTensor {
    fn to_tensor(&self) -> Result<Tensor, SelfTestError> {
        use base64::Engine as _;
        let data = match (&self.data, &self.data_base64) {
            (Some(data), None) => data,
            (None, Some(b64)) => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| invalid(format!("{:?}: data_base64: {e}", self.name)))?;
                return Tensor::from_raw(self.datatype, self.shape.clone(), &raw)
                    .map_err(|e| invalid(format!("{:?}: {e}", self.name)));
            }
            _ => {
                return Err(invalid(format!(
                    "{:?} needs exactly one of data and data_base64",
                    self.name
                )));
            }
        };
        let n = nightingale_inference::element_count(&self.shape)
            .map_err(|e| invalid(format!("{:?}: {e}", self.name)))?;
        if n != data.len() {
            return Err(invalid(format!(
                "{:?} has shape {:?} ({n} elements) but {} values",
                self.name,
                self.shape,
                data.len()
            )));
        }
        let bad = || {
            invalid(format!(
                "{:?}: a value does not fit {}",
                self.name, self.datatype
            ))
        };
        macro_rules! ints {
            ($t:ty) => {{
                let v = data
                    .iter()
                    .map(|x| {
                        x.as_i64()
                            .and_then(|i| <$t>::try_from(i).ok())
                            .or_else(|| x.as_u64().and_then(|u| <$t>::try_from(u).ok()))
                            .ok_or_else(bad)
                    })
                    .collect::<Result<Vec<$t>, _>>()?;
                Tensor::from_vec(self.shape.clone(), v)
            }};
        }
        let floats = || -> Result<Vec<f64>, SelfTestError> {
            data.iter().map(|x| x.as_f64().ok_or_else(bad)).collect()
        };
        let t = match self.datatype {
            DataType::Uint8 => ints!(u8),
            DataType::Uint16 => ints!(u16),
            DataType::Uint32 => ints!(u32),
            DataType::Uint64 => ints!(u64),
            DataType::Int8 => ints!(i8),
            DataType::Int16 => ints!(i16),
            DataType::Int32 => ints!(i32),
            DataType::Int64 => ints!(i64),
            // The file holds each value's shortest decimal form, which parses back to the
            // same float32 / float16.
            DataType::Fp16 => Tensor::from_vec(
                self.shape.clone(),
                floats()?.into_iter().map(half::f16::from_f64).collect(),
            ),
            DataType::Fp32 => Tensor::from_vec(
                self.shape.clone(),
                floats()?.into_iter().map(|x| x as f32).collect(),
            ),
            DataType::Fp64 => Tensor::from_vec(self.shape.clone(), floats()?),
            other => {
                return Err(invalid(format!(
                    "{:?}: datatype {other} is not supported in self-tests (numbers only)",
                    self.name
                )));
            }
        };
        t.map_err(|e| invalid(format!("{:?}: {e}", self.name)))
    }
}

/// Every element of a numeric tensor as f64 (row-major), or `None` for BOOL/BYTES.
fn as_f64(t: &Tensor) -> Option<Vec<f64>> {
    Some(match t {
        Tensor::Uint8(a) => a.iter().map(|&x| f64::from(x)).collect(),
        Tensor::Uint16(a) => a.iter().map(|&x| f64::from(x)).collect(),
        Tensor::Uint32(a) => a.iter().map(|&x| f64::from(x)).collect(),
        Tensor::Uint64(a) => a.iter().map(|&x| x as f64).collect(),
        Tensor::Int8(a) => a.iter().map(|&x| f64::from(x)).collect(),
        Tensor::Int16(a) => a.iter().map(|&x| f64::from(x)).collect(),
        Tensor::Int32(a) => a.iter().map(|&x| f64::from(x)).collect(),
        Tensor::Int64(a) => a.iter().map(|&x| x as f64).collect(),
        Tensor::Fp16(a) => a.iter().map(|&x| x.to_f64()).collect(),
        Tensor::Fp32(a) => a.iter().map(|&x| f64::from(x)).collect(),
        Tensor::Fp64(a) => a.iter().copied().collect(),
        Tensor::Bool(_) | Tensor::Bytes(_) => return None,
    })
}

fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (i, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            index[i] = flat % d;
            flat /= d;
        }
    }
    index
}

/// Parses a self-test file and checks it names the model's inputs and outputs.
fn parse(bytes: &[u8], metadata: &ModelMetadata) -> Result<File, SelfTestError> {
    let file: File = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
    if file.format != SELFTEST_FORMAT {
        return Err(invalid(format!(
            "format {} (this build reads {SELFTEST_FORMAT})",
            file.format
        )));
    }
    for t in &file.inputs {
        if metadata.input(&t.name).is_none() {
            return Err(invalid(format!(
                "{:?} is not an input of the model",
                t.name
            )));
        }
    }
    for spec in &metadata.inputs {
        if !file.inputs.iter().any(|t| t.name == spec.name) {
            return Err(invalid(format!("no values for input {:?}", spec.name)));
        }
    }
    if file.outputs.is_empty() {
        return Err(invalid("no reference outputs"));
    }
    for t in &file.outputs {
        if metadata.output(&t.name).is_none() {
            return Err(invalid(format!(
                "{:?} is not an output of the model",
                t.name
            )));
        }
    }
    Ok(file)
}

/// The reference inputs of a `selftest.json` (`bytes`) for a model of `metadata`, in its
/// inputs' order: `models init --version` runs another version's through a new model.
pub(crate) fn reference_inputs(
    bytes: &[u8],
    metadata: &ModelMetadata,
) -> Result<Vec<NamedTensor>, SelfTestError> {
    inputs_of(&parse(bytes, metadata)?, metadata)
}

fn inputs_of(file: &File, metadata: &ModelMetadata) -> Result<Vec<NamedTensor>, SelfTestError> {
    let by_name: BTreeMap<&str, &FileTensor> =
        file.inputs.iter().map(|t| (t.name.as_str(), t)).collect();
    metadata
        .inputs
        .iter()
        .map(|s| {
            Ok(NamedTensor::new(
                s.name.clone(),
                by_name[s.name.as_str()].to_tensor()?,
            ))
        })
        .collect()
}

/// Runs the reference inputs through `backend` and compares every reference output.
pub fn run(
    backend: &mut dyn Backend,
    metadata: &ModelMetadata,
    spec: &SelfTestSpec,
    bytes: &[u8],
) -> Result<SelfTestReport, SelfTestError> {
    let file = parse(bytes, metadata)?;
    let inputs = inputs_of(&file, metadata)?;
    let rows = inputs
        .first()
        .and_then(|t| t.tensor.shape().first().copied())
        .unwrap_or(1);
    let outputs = backend
        .infer(inputs)
        .map_err(|source| SelfTestError::Run { source })?;
    let mut report = SelfTestReport {
        rows,
        elements: 0,
        max_diff: 0.0,
        max_diff_output: String::new(),
        atol: spec.atol,
        rtol: spec.rtol,
        engine: backend.name(),
        producer: file.producer.clone(),
    };
    for reference in &file.outputs {
        let expected_tensor = reference.to_tensor()?;
        let expected = as_f64(&expected_tensor).unwrap_or_default();
        let got = outputs
            .iter()
            .find(|o| o.name == reference.name)
            .ok_or_else(|| SelfTestError::MissingOutput {
                output: reference.name.clone(),
            })?;
        if got.tensor.shape() != reference.shape.as_slice() {
            return Err(SelfTestError::Shape {
                output: reference.name.clone(),
                expected: reference.shape.clone(),
                got: got.tensor.shape().to_vec(),
            });
        }
        let actual = as_f64(&got.tensor).ok_or_else(|| {
            invalid(format!(
                "output {:?} has datatype {}, which a self-test cannot compare",
                reference.name,
                got.tensor.datatype()
            ))
        })?;
        let Tolerance { atol, rtol } = spec.tolerance(&reference.name);
        // The worst element: the one furthest beyond its allowance.
        let mut worst: Option<(usize, f64, f64)> = None;
        let mut failing = 0;
        for (i, (&e, &a)) in expected.iter().zip(&actual).enumerate() {
            let both_nan = e.is_nan() && a.is_nan();
            let diff = if both_nan || e == a {
                0.0
            } else {
                (a - e).abs()
            };
            let allowed = atol + rtol * e.abs();
            if diff.is_nan() || diff > allowed {
                failing += 1;
                let excess = if diff.is_nan() {
                    f64::INFINITY
                } else {
                    diff - allowed
                };
                if worst.is_none_or(|(_, _, w)| excess > w) {
                    worst = Some((i, diff, excess));
                }
            }
            if diff > report.max_diff || (diff.is_nan() && !report.max_diff.is_nan()) {
                report.max_diff = diff;
                report.max_diff_output = reference.name.clone();
            }
        }
        if let Some((i, diff, _)) = worst {
            return Err(SelfTestError::Mismatch {
                output: reference.name.clone(),
                index: unravel(i, &reference.shape),
                expected: expected[i],
                actual: actual[i],
                diff,
                allowed: atol + rtol * expected[i].abs(),
                atol,
                rtol,
                failing,
                total: expected.len(),
            });
        }
        report.elements += expected.len();
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::unravel;

    #[test]
    fn unravel_row_major() {
        assert_eq!(unravel(0, &[3, 2]), vec![0, 0]);
        assert_eq!(unravel(5, &[3, 2]), vec![2, 1]);
        assert_eq!(unravel(7, &[2, 2, 2]), vec![1, 1, 1]);
        assert_eq!(unravel(0, &[]), Vec::<usize>::new());
    }
}
