//! Runs one ONNX model on Nightingale's tract backend and prints its outputs, for
//! `models/train/sweep_skl2onnx.py`, which compares them with onnxruntime's.
//!
//! ```text
//! cargo run -p nightingale-inference --example onnx_ml_run -- MODEL.onnx INPUT.json [INPUT.json...]
//! ```
//!
//! Each `INPUT.json` is `{"shape": [...], "data": [...]}` (FP32, `null` for NaN), fed to the
//! model's first input; several run one after the other on the same loaded instance. Each
//! output is printed as one JSON line `{"call", "name", "shape", "data"}`; a model that fails
//! to load or run prints `{"stage": "load" | "run", "error"}` (with its causes) instead.

use std::path::Path;

use anyhow::Context;
use nightingale_inference::{BackendKind, DataType, LoadOptions, NamedTensor, Tensor, load};
use serde_json::{Value, json};

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

fn number(v: f64) -> Value {
    if v.is_nan() { Value::Null } else { json!(v) }
}

fn values(t: &Tensor) -> Option<Vec<Value>> {
    Some(match t.datatype() {
        DataType::Fp32 => t.view::<f32>()?.iter().map(|&v| number(v as f64)).collect(),
        DataType::Fp64 => t.view::<f64>()?.iter().map(|&v| number(v)).collect(),
        DataType::Int64 => t.view::<i64>()?.iter().map(|&v| json!(v)).collect(),
        DataType::Int32 => t.view::<i32>()?.iter().map(|&v| json!(v)).collect(),
        DataType::Bool => t
            .view::<bool>()?
            .iter()
            .map(|&v| json!(u8::from(v)))
            .collect(),
        DataType::Bytes => t
            .view::<Vec<u8>>()?
            .iter()
            .map(|v| json!(String::from_utf8_lossy(v)))
            .collect(),
        _ => return None,
    })
}

fn read_input(path: &str) -> anyhow::Result<Tensor> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let input: Value = serde_json::from_str(&text)?;
    let shape: Vec<usize> = input["shape"]
        .as_array()
        .context("shape")?
        .iter()
        .map(|v| v.as_u64().map(|d| d as usize).context("dimension"))
        .collect::<anyhow::Result<_>>()?;
    let data: Vec<f32> = input["data"]
        .as_array()
        .context("data")?
        .iter()
        .map(|v| v.as_f64().map_or(f32::NAN, |f| f as f32))
        .collect();
    Ok(Tensor::from_vec(shape, data)?)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() >= 3,
        "usage: onnx_ml_run MODEL.onnx INPUT.json [INPUT.json...]"
    );
    let options = LoadOptions {
        backend: BackendKind::Tract,
        ..Default::default()
    };
    let mut backend = match load(Path::new(&args[1]), &options) {
        Ok(b) => b,
        Err(e) => {
            println!("{}", json!({"stage": "load", "error": chain(&e)}));
            return Ok(());
        }
    };
    let name = backend
        .metadata()
        .inputs
        .first()
        .context("the model has no input")?
        .name
        .clone();
    // Several inputs run one after the other on the same instance, as a worker runs them.
    for (call, path) in args[2..].iter().enumerate() {
        let x = NamedTensor::new(name.clone(), read_input(path)?);
        let outputs = match backend.infer(vec![x]) {
            Ok(o) => o,
            Err(e) => {
                println!(
                    "{}",
                    json!({"call": call, "stage": "run", "error": chain(&e)})
                );
                continue;
            }
        };
        for o in outputs {
            match values(&o.tensor) {
                Some(data) => println!(
                    "{}",
                    json!({"call": call, "name": o.name, "shape": o.tensor.shape(), "data": data})
                ),
                None => println!(
                    "{}",
                    json!({"call": call, "stage": "run", "error": format!("output {} has datatype {:?}", o.name, o.tensor.datatype())})
                ),
            }
        }
    }
    Ok(())
}
