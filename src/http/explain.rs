//! `POST /v2/models/{m}[/versions/{v}]/explain`: a Nightingale extension of the KServe v2
//! protocol. The body is an `/infer` body whose `parameters` name the method and its options;
//! the answer is the `/infer` answer plus one attribution tensor, `<output>_saliency`
//! (images: `[N, H, W]`, FP32) or `<output>_attribution` (tables: `[N, F]`, FP64, the
//! features in the input's order), in JSON or binary as the request asks. See
//! `docs/explain.md`.
//!
//! The explanation is made by the very model version that made the prediction: its forward
//! passes go through the model's worker in batches of its `max_batch_size`, like any other
//! request, and the whole request is audited once (event `explain`, with the method and the
//! number of forward passes).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use nightingale_inference::explain::{
    Explanation, GradientMethod, GradientRequest, ImageShape, KernelShap, KernelShapOptions, Link,
    Occlusion, OcclusionOptions, Perturber, Rise, RiseOptions, logit,
};
use nightingale_inference::{DataType, NamedTensor, Tensor};
use nightingale_models::LoadedModel;
use nightingale_models::manifest::EXPLAIN_METHODS;
use serde_json::Value;

use super::codec::{self, InferResponse, JsonData, OutputTensor};
use super::v2::{Op, header_length, respond, run_model_request, select_outputs};
use super::{ApiPath as Path, AppError, AppState, RequestDeadline, read_body_admitted};
use crate::audit::{AuditEvent, tensors_sha256};

pub async fn explain(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    deadline: Option<Extension<RequestDeadline>>,
    caller: Option<Extension<super::auth::Caller>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run_model_request(
        Op::Explain,
        state,
        (model, None),
        deadline.map(|d| d.0),
        caller.map(|c| c.0.id),
        headers,
        body,
    )
    .await
}

pub async fn explain_version(
    State(state): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
    deadline: Option<Extension<RequestDeadline>>,
    caller: Option<Extension<super::auth::Caller>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run_model_request(
        Op::Explain,
        state,
        (model, Some(version)),
        deadline.map(|d| d.0),
        caller.map(|c| c.0.id),
        headers,
        body,
    )
    .await
}

/// The methods (`parameters.method`, kept stable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Occlusion,
    Rise,
    KernelShap,
    Linear,
    GradCam,
    IntegratedGradients,
}

impl Method {
    fn parse(s: &str) -> Option<Method> {
        Some(match s {
            "occlusion" => Method::Occlusion,
            "rise" => Method::Rise,
            "kernel_shap" => Method::KernelShap,
            "linear" => Method::Linear,
            "grad_cam" => Method::GradCam,
            "integrated_gradients" => Method::IntegratedGradients,
            _ => return None,
        })
    }

    /// The method-specific parameters it reads (every method also reads `method`,
    /// `target`, `output`, `max_forward_passes` and `heatmap`).
    fn parameters(self) -> &'static [&'static str] {
        match self {
            Method::Occlusion => &["patch", "stride", "baseline"],
            Method::Rise => &["samples", "grid", "p", "baseline", "seed"],
            Method::KernelShap => &["samples", "link", "seed"],
            Method::Linear => &["link"],
            Method::GradCam => &[],
            Method::IntegratedGradients => &["steps", "baseline"],
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Method::Occlusion => "occlusion",
            Method::Rise => "rise",
            Method::KernelShap => "kernel_shap",
            Method::Linear => "linear",
            Method::GradCam => "grad_cam",
            Method::IntegratedGradients => "integrated_gradients",
        }
    }

    /// Whether the method needs the model's gradients (a native candle bundle).
    fn is_gradient(self) -> bool {
        matches!(self, Method::GradCam | Method::IntegratedGradients)
    }

    /// Whether the method explains images (a saliency map) rather than tables.
    fn is_image(self) -> bool {
        matches!(
            self,
            Method::Occlusion | Method::Rise | Method::GradCam | Method::IntegratedGradients
        )
    }
}

/// `parameters.target`.
#[derive(Clone, Debug, PartialEq)]
enum Target {
    Label(String),
    Index(usize),
}

/// What the request asks for (`parameters`).
#[derive(Debug, Default)]
struct Params {
    method: Option<Method>,
    target: Option<Target>,
    output: Option<String>,
    link: Option<Link>,
    patch: Option<usize>,
    stride: Option<usize>,
    baseline: Option<f32>,
    samples: Option<usize>,
    grid: Option<usize>,
    keep: Option<f64>,
    seed: Option<u64>,
    steps: Option<usize>,
    max_forward_passes: Option<usize>,
    /// Also return `<output>_heatmap`: a PNG of each image with its map laid over it.
    heatmap: bool,
}

/// Request parameters of the KServe protocol that `/explain` accepts and leaves to the codec.
const PROTOCOL_PARAMETERS: &[&str] = &[
    "binary_data_output",
    "priority",
    "timeout",
    "sequence_id",
    "sequence_start",
    "sequence_end",
];

const EXPLAIN_PARAMETERS: &[&str] = &[
    "method",
    "target",
    "output",
    "link",
    "patch",
    "stride",
    "baseline",
    "samples",
    "grid",
    "p",
    "seed",
    "steps",
    "max_forward_passes",
    "heatmap",
];

/// Largest count a request may give for sizes and samples (well beyond any budget).
const MAX_COUNT: u64 = 1 << 24;

fn parse_params(map: &HashMap<String, Value>) -> Result<Params, AppError> {
    let bad = |m: String| Err(AppError::bad_request(m));
    let count = |key: &str, v: &Value| -> Result<usize, AppError> {
        match v.as_u64() {
            Some(n) if n <= MAX_COUNT => Ok(n as usize),
            _ => Err(AppError::bad_request(format!(
                "parameters.{key} must be a whole number 0..={MAX_COUNT}, not {v}"
            ))),
        }
    };
    let number = |key: &str, v: &Value| -> Result<f64, AppError> {
        v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| {
            AppError::bad_request(format!("parameters.{key} must be a finite number, not {v}"))
        })
    };
    let text = |key: &str, v: &Value| -> Result<String, AppError> {
        v.as_str().map(str::to_owned).ok_or_else(|| {
            AppError::bad_request(format!("parameters.{key} must be a string, not {v}"))
        })
    };
    let mut p = Params::default();
    for (key, v) in map {
        match key.as_str() {
            "method" => {
                let name = text(key, v)?;
                p.method = Some(Method::parse(&name).ok_or_else(|| {
                    AppError::bad_request(format!(
                        "unknown explanation method {name:?}; the methods are {EXPLAIN_METHODS:?}"
                    ))
                })?);
            }
            "target" => {
                p.target = Some(match v {
                    Value::String(s) => Target::Label(s.clone()),
                    Value::Number(_) => Target::Index(count(key, v)?),
                    _ => {
                        return bad(format!(
                            "parameters.target must be a class label or index, not {v}"
                        ));
                    }
                })
            }
            "output" => p.output = Some(text(key, v)?),
            "link" => {
                p.link = Some(match text(key, v)?.as_str() {
                    "identity" => Link::Identity,
                    "logit" => Link::Logit,
                    other => {
                        return bad(format!(
                            "parameters.link must be \"identity\" or \"logit\", not {other:?}"
                        ));
                    }
                })
            }
            "patch" => p.patch = Some(count(key, v)?),
            "stride" => p.stride = Some(count(key, v)?),
            "samples" => p.samples = Some(count(key, v)?),
            "grid" => p.grid = Some(count(key, v)?),
            "steps" => p.steps = Some(count(key, v)?),
            "max_forward_passes" => p.max_forward_passes = Some(count(key, v)?),
            "seed" => {
                p.seed = Some(v.as_u64().ok_or_else(|| {
                    AppError::bad_request(format!(
                        "parameters.seed must be a non-negative integer, not {v}"
                    ))
                })?)
            }
            "baseline" => {
                let b = number(key, v)?;
                if b.abs() > f64::from(f32::MAX) {
                    return bad("parameters.baseline is out of the FP32 range".into());
                }
                p.baseline = Some(b as f32);
            }
            "p" => p.keep = Some(number(key, v)?),
            "heatmap" => {
                p.heatmap = v.as_bool().ok_or_else(|| {
                    AppError::bad_request(format!(
                        "parameters.heatmap must be true or false, not {v}"
                    ))
                })?
            }
            k if PROTOCOL_PARAMETERS.contains(&k) => {}
            other => {
                return bad(format!(
                    "unknown parameter {other:?}; /explain takes {EXPLAIN_PARAMETERS:?}"
                ));
            }
        }
    }
    // A parameter another method reads is refused, not ignored (a `baseline` sent with
    // `kernel_shap` was dropped and the bundle's background used: a red-team finding).
    if let Some(method) = p.method {
        const COMMON: &[&str] = &[
            "method",
            "target",
            "output",
            "max_forward_passes",
            "heatmap",
        ];
        let mut keys: Vec<&String> = map.keys().collect();
        keys.sort();
        if let Some(key) = keys.into_iter().find(|k| {
            EXPLAIN_PARAMETERS.contains(&k.as_str())
                && !COMMON.contains(&k.as_str())
                && !method.parameters().contains(&k.as_str())
        }) {
            return bad(format!(
                "parameter {key:?} does not apply to method {:?}, which takes {:?}",
                method.as_str(),
                method.parameters()
            ));
        }
    }
    Ok(p)
}

/// The methods and budget this model offers, or why it offers none.
fn allowance(state: &AppState, model: &LoadedModel) -> (Vec<String>, usize) {
    match &model.manifest.explain {
        Some(e) => {
            let mut methods = e.methods.clone();
            if state.config.explain.all_methods {
                methods = EXPLAIN_METHODS.iter().map(|m| (*m).to_owned()).collect();
            }
            (methods, e.max_forward_passes)
        }
        None if state.config.explain.all_methods => (
            EXPLAIN_METHODS.iter().map(|m| (*m).to_owned()).collect(),
            state.config.explain.max_forward_passes,
        ),
        None => (vec![], 0),
    }
}

/// The model's explain offer, for its metadata.
pub(super) fn offer(state: &AppState, model: &LoadedModel) -> Value {
    let (methods, budget) = allowance(state, model);
    serde_json::json!({ "methods": methods, "max_forward_passes": budget })
}

/// What one row's explanation is made from.
enum Plan {
    Perturb(Vec<Box<dyn Perturber>>),
    Linear,
    Gradients(GradientMethod),
}

/// A plan checked before the prediction: what each row's perturber is made from once the
/// model's scores are known.
enum Spec {
    Occlusion(ImageShape, OcclusionOptions),
    Rise(ImageShape, RiseOptions),
    KernelShap(Vec<Vec<f32>>, KernelShapOptions),
    Ready(Plan),
}

/// Turns for explanations across the server: a few run at once and finish, the next wait in
/// line (a bounded one), and the models' queues keep room for `/infer`.
pub(crate) struct Turns {
    slots: tokio::sync::Semaphore,
    concurrent: usize,
    waiting: std::sync::atomic::AtomicUsize,
}

impl Turns {
    pub(crate) fn new(concurrent: usize) -> Self {
        let concurrent = concurrent.max(1);
        Turns {
            slots: tokio::sync::Semaphore::new(concurrent),
            concurrent,
            waiting: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// A turn: at once if one is free, else after those ahead (the request's deadline still
    /// applies); 503 with `Retry-After` when the line is full.
    pub(crate) async fn take(&self) -> Result<tokio::sync::SemaphorePermit<'_>, AppError> {
        use std::sync::atomic::Ordering;
        if let Ok(turn) = self.slots.try_acquire() {
            return Ok(turn);
        }
        let line = self.concurrent * super::EXPLAIN_WAITING_PER_SLOT;
        let ahead = self.waiting.fetch_add(1, Ordering::AcqRel);
        // Leaves the line however the wait ends (a deadline drops this future).
        struct InLine<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for InLine<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _in_line = InLine(&self.waiting);
        if ahead >= line {
            return Err(AppError::overloaded(format!(
                "{} explanations are being computed and {line} wait for a turn (--explain-max-concurrent): try again later",
                self.concurrent
            )));
        }
        self.slots
            .acquire()
            .await
            .map_err(|_| AppError::internal("the explanation turns are closed"))
    }
}

/// Integrated gradients' default path points (captum's default is 50).
const DEFAULT_IG_STEPS: usize = 64;

pub(super) async fn explain_loaded(
    state: &AppState,
    model: &LoadedModel,
    headers: &HeaderMap,
    body: Body,
    audit: &mut AuditEvent,
) -> Result<Response, AppError> {
    let header_len = header_length(headers)?;
    if header_len == Some(0) {
        return Err(AppError::bad_request(
            "/explain needs a JSON request header (its parameters name the method); a raw binary body has none",
        ));
    }
    let mut ticket = state.admission.receiving()?;
    let body = read_body_admitted(headers, body, state.config.max_body_bytes, &mut ticket).await?;
    ticket.take_place(&state.admission)?;
    let request = codec::decode_request(
        &body,
        header_len,
        &model.worker.metadata().inputs,
        &mut |n| ticket.charge(n),
    )?;
    let decoded: usize = request.inputs.iter().map(|t| t.tensor.memory_len()).sum();
    ticket.charge_at_least(body.len().saturating_add(decoded))?;
    drop(body);
    let explained =
        explain_in_turn(state, model, request, audit, state.explain_turns.take()).await?;
    let Explained {
        id,
        wanted,
        binary_default,
        outputs,
        attribution,
        parameters,
        heatmap,
    } = explained;
    let attribution_name = attribution.name.clone();
    let attribution = attribution.tensor;

    // The answer: the outputs asked for (the attribution may be among them), then it.
    let mut wanted = wanted;
    let mut attribution_binary = binary_default;
    if let Some(list) = &mut wanted {
        if let Some(i) = list.iter().position(|o| o.name == attribution_name) {
            attribution_binary = list[i].binary.unwrap_or(binary_default);
            list.remove(i);
        }
        if let Some(h) = &heatmap {
            list.retain(|o| o.name != h.name);
        }
    }
    let (mut tensors, mut flags) = if wanted.as_ref().is_some_and(|w| w.is_empty()) {
        (vec![], vec![])
    } else {
        select_outputs(model, outputs, wanted.as_deref(), binary_default)?
    };
    tensors.push(OutputTensor {
        name: attribution_name,
        datatype: attribution.datatype(),
        shape: attribution.shape().to_vec(),
        parameters: Some(parameters),
        data: Some(JsonData(attribution)),
    });
    flags.push(attribution_binary);
    // PNG bytes are not text: the heatmap always travels as a binary tensor.
    if let Some(h) = heatmap {
        tensors.push(OutputTensor {
            name: h.name,
            datatype: h.tensor.datatype(),
            shape: h.tensor.shape().to_vec(),
            parameters: Some(serde_json::Map::from_iter([(
                "content_type".to_owned(),
                Value::from("image/png"),
            )])),
            data: Some(JsonData(h.tensor)),
        });
        flags.push(true);
    }
    let response = InferResponse {
        model_name: model.name.clone(),
        model_version: model.version.to_string(),
        id,
        outputs: tensors,
    };
    respond(response, &flags, ticket).await
}

/// An explanation made: the prediction's outputs, the attribution tensor and its
/// parameters, and what the request asked for of the answer.
pub(crate) struct Explained {
    id: Option<String>,
    wanted: Option<Vec<codec::OutputChoice>>,
    binary_default: bool,
    pub(crate) outputs: Vec<NamedTensor>,
    /// `<output>_saliency` or `<output>_attribution`.
    pub(crate) attribution: NamedTensor,
    /// method, explained_output, target, forward_passes (and link, base_value).
    pub(crate) parameters: serde_json::Map<String, Value>,
    /// `<output>_heatmap` (BYTES `[N]`, one PNG per row) when the request asked for it.
    pub(crate) heatmap: Option<NamedTensor>,
}

/// `/explain` on a decoded request: checks, the prediction, the explanation's forward
/// passes through the model's worker, the audit fields (`output_sha256`, `detail`). The
/// DICOM pipeline's heatmaps come through here too, with the bundle's `[dicom.heatmap]` as
/// the parameters.
pub(crate) async fn explain_decoded(
    state: &AppState,
    model: &LoadedModel,
    request: codec::DecodedRequest,
    audit: &mut AuditEvent,
) -> Result<Explained, AppError> {
    explain_in_turn(state, model, request, audit, std::future::ready(Ok(()))).await
}

/// [`explain_decoded`], whose model runs once `turn` gives a turn, held until the end: every
/// check that needs no forward pass is made before it is waited for (a request that could
/// never succeed waited for a turn, or was told to try again later: a review's finding).
async fn explain_in_turn<T>(
    state: &AppState,
    model: &LoadedModel,
    request: codec::DecodedRequest,
    audit: &mut AuditEvent,
    turn: impl std::future::Future<Output = Result<T, AppError>>,
) -> Result<Explained, AppError> {
    audit.input_sha256 = Some(tensors_sha256(&request.inputs));
    audit.rows = request
        .inputs
        .first()
        .and_then(|t| t.tensor.shape().first().copied());

    let params = parse_params(&request.parameters)?;
    let method = params.method.ok_or_else(|| {
        AppError::bad_request(format!(
            "parameters.method is missing; the methods are {EXPLAIN_METHODS:?}"
        ))
    })?;
    // The record of an explanation that ends without an answer (refused, stopped at its
    // deadline, its client gone) says what was asked too (a review found it bare); an
    // answered one's says what was done.
    audit.detail = Some(format!("method={}", method.as_str()));
    // The one input, and what kind of data it is.
    let meta = model.worker.metadata();
    let [input_spec] = meta.inputs.as_slice() else {
        return Err(AppError::bad_request(format!(
            "/explain explains models with one input; {} has {}",
            model.name,
            meta.inputs.len()
        )));
    };
    if input_spec.datatype != DataType::Fp32 {
        return Err(AppError::bad_request(format!(
            "/explain perturbs FP32 inputs; {}'s input {:?} is {}",
            model.name,
            input_spec.name,
            input_spec.datatype.as_str()
        )));
    }
    let Some(input) = request.inputs.iter().find(|t| t.name == input_spec.name) else {
        return Err(AppError::bad_request(format!(
            "the request has no input {:?}",
            input_spec.name
        )));
    };
    let shape = input.tensor.shape().to_vec();
    let image = match shape.len() {
        4 => Some(ImageShape {
            channels: shape[1],
            height: shape[2],
            width: shape[3],
        }),
        3 => Some(ImageShape {
            channels: 1,
            height: shape[1],
            width: shape[2],
        }),
        _ => None,
    };
    let tabular = (shape.len() == 2).then(|| shape[1]);
    if method.is_image() && image.is_none() {
        return Err(AppError::bad_request(format!(
            "{} explains images (an input [N, C, H, W]); {}'s input {:?} is {:?}: use kernel_shap or linear",
            method.as_str(),
            model.name,
            input_spec.name,
            input_spec.shape
        )));
    }
    if !method.is_image() && tabular.is_none() {
        return Err(AppError::bad_request(format!(
            "{} explains tables (an input [N, features]); {}'s input {:?} is {:?}: use occlusion or rise",
            method.as_str(),
            model.name,
            input_spec.name,
            input_spec.shape
        )));
    }
    // `linear` contributions are log-odds by construction: it takes `link` only to say so
    // (an identity link was accepted and silently answered in log-odds: a red-team finding).
    if method == Method::Linear && matches!(params.link, Some(Link::Identity)) {
        return Err(AppError::bad_request(
            "linear gives contributions in log-odds (link \"logit\") only; for probabilities use kernel_shap with link \"identity\"",
        ));
    }
    if params.heatmap && !method.is_image() {
        return Err(AppError::bad_request(format!(
            "parameters.heatmap draws an image's saliency map; {} explains tables",
            method.as_str()
        )));
    }
    // Each heatmap is at least its input with the band of the model's line: refused before
    // any forward pass when that alone is too large (the exact size, the caption of the
    // map included, is checked again before drawing).
    if params.heatmap
        && let Some(s) = &image
    {
        let pixels = shape[0].saturating_mul(crate::heatmap::input_png_pixels(
            s.height,
            s.width,
            &[heatmap_model_line(model)],
        ));
        if pixels > MAX_HEATMAP_PIXELS {
            return Err(heatmap_too_large(pixels));
        }
    }
    let (allowed, budget) = allowance(state, model);
    if !allowed.iter().any(|m| m == method.as_str()) {
        return Err(AppError::bad_request(if allowed.is_empty() {
            format!(
                "explanations are off for {}: its bundle has no [explain] section and the server runs without --explain",
                model.name
            )
        } else {
            format!(
                "{} is not enabled for {}; its methods are {allowed:?}",
                method.as_str(),
                model.name
            )
        }));
    }
    let budget = match params.max_forward_passes {
        Some(asked) if asked > budget => {
            return Err(AppError::bad_request(format!(
                "parameters.max_forward_passes {asked} is above {}'s budget of {budget} forward passes",
                model.name
            )));
        }
        Some(asked) => asked,
        None => budget,
    };

    if method.is_gradient() && !model.worker.supports_gradients() {
        return Err(AppError::new(
            StatusCode::NOT_IMPLEMENTED,
            format!(
                "{} needs the model's gradients, which only a native candle bundle (platform = \"candle\") gives; {} runs on {}, which cannot differentiate it: use occlusion or rise",
                method.as_str(),
                model.name,
                model.worker.backend()
            ),
        ));
    }

    // The explained output: named, or the one with a positive label, or the first.
    let output_spec = match &params.output {
        Some(name) => model
            .manifest
            .outputs
            .iter()
            .find(|o| &o.name == name)
            .ok_or_else(|| {
                AppError::bad_request(format!(
                    "parameters.output {name:?} is not an output of {}",
                    model.name
                ))
            })?,
        None => model
            .manifest
            .outputs
            .iter()
            .find(|o| o.positive_label.is_some())
            .unwrap_or(&model.manifest.outputs[0]),
    };
    let out_ix = meta
        .outputs
        .iter()
        .position(|o| o.name == output_spec.name)
        .ok_or_else(|| AppError::internal("the explained output is not served"))?;
    let labels = &output_spec.labels;
    let attribution_name = format!(
        "{}_{}",
        output_spec.name,
        if method.is_image() {
            "saliency"
        } else {
            "attribution"
        }
    );

    // The outputs asked for are known before any forward pass runs (an unknown one was
    // refused only after the whole explanation had run: a red-team finding).
    if let Some(wanted) = &request.outputs {
        let heatmap_name = params
            .heatmap
            .then(|| format!("{}_heatmap", output_spec.name));
        for choice in wanted {
            let known = meta.outputs.iter().any(|o| o.name == choice.name)
                || choice.name == attribution_name
                || heatmap_name.as_deref() == Some(choice.name.as_str());
            if !known {
                return Err(AppError::bad_request(format!(
                    "unknown output {:?}; the outputs are {:?} and {attribution_name:?}{}",
                    choice.name,
                    meta.outputs
                        .iter()
                        .map(|o| o.name.as_str())
                        .collect::<Vec<_>>(),
                    heatmap_name
                        .as_deref()
                        .map(|h| format!(" and {h:?}"))
                        .unwrap_or_default()
                )));
            }
        }
    }

    let rows = shape[0];
    if rows == 0 {
        return Err(AppError::bad_request("/explain needs at least one row"));
    }
    let seed = params.seed.unwrap_or(0);
    let invalid = |e: nightingale_inference::explain::ExplainError| {
        // The engine's reasons may already name the method.
        let text = e.to_string();
        let prefix = format!("{}: ", method.as_str());
        AppError::bad_request(if text.starts_with(&prefix) {
            text
        } else {
            format!("{prefix}{text}")
        })
    };
    // The method's options and forward passes are checked before any pass runs, the
    // prediction's included (an explanation over its budget, or with options its method
    // refuses, ran the prediction of every row first, in a turn: a review's finding).
    let spec = match method {
        Method::Occlusion => {
            let shape = image.expect("checked");
            let defaults = OcclusionOptions::for_image(shape);
            let options = OcclusionOptions {
                patch: params.patch.unwrap_or(defaults.patch),
                stride: params
                    .stride
                    .unwrap_or_else(|| params.patch.map_or(defaults.stride, |p| (p / 2).max(1))),
                baseline: params.baseline.unwrap_or(defaults.baseline),
            };
            options.check().map_err(invalid)?;
            check_budget(method, Occlusion::passes(shape, options), rows, budget)?;
            Spec::Occlusion(shape, options)
        }
        Method::Rise => {
            let shape = image.expect("checked");
            let defaults = RiseOptions::default();
            let options = RiseOptions {
                samples: params.samples.unwrap_or(defaults.samples),
                grid: params.grid.unwrap_or(defaults.grid),
                keep: params.keep.unwrap_or(defaults.keep),
                baseline: params.baseline.unwrap_or(defaults.baseline),
                seed,
            };
            options.check(shape).map_err(invalid)?;
            check_budget(method, options.samples, rows, budget)?;
            Spec::Rise(shape, options)
        }
        Method::KernelShap => {
            let features = tabular.expect("checked");
            let background: Vec<Vec<f32>> = model
                .manifest
                .explain
                .as_ref()
                .map(|e| {
                    e.background
                        .iter()
                        .map(|r| r.iter().map(|&v| v as f32).collect())
                        .collect()
                })
                .unwrap_or_default();
            if background.is_empty() {
                return Err(AppError::bad_request(format!(
                    "kernel_shap needs a background sample, and {}'s bundle declares none ([explain] background)",
                    model.name
                )));
            }
            let options = KernelShapOptions {
                samples: params.samples.unwrap_or(512),
                link: Link::Identity,
                seed,
            };
            options.check(features, &background).map_err(invalid)?;
            check_budget(
                method,
                KernelShap::passes(features, background.len(), options.samples),
                rows,
                budget,
            )?;
            Spec::KernelShap(background, options)
        }
        Method::Linear => Spec::Ready(Plan::Linear),
        Method::GradCam => {
            let gm = GradientMethod::GradCam;
            check_budget(method, gm.passes_per_row(), rows, budget)?;
            Spec::Ready(Plan::Gradients(gm))
        }
        Method::IntegratedGradients => {
            let gm = GradientMethod::IntegratedGradients {
                baseline: params.baseline.unwrap_or(0.0),
                steps: params.steps.unwrap_or(DEFAULT_IG_STEPS),
            };
            if params.steps == Some(0) {
                return Err(AppError::bad_request(
                    "integrated_gradients: parameters.steps must be at least 1",
                ));
            }
            check_budget(method, gm.passes_per_row(), rows, budget)?;
            Spec::Ready(Plan::Gradients(gm))
        }
    };

    // Everything that can be refused without the model is: the turn, then the prediction.
    let _turn = turn.await?;
    let data: Vec<f32> = input
        .tensor
        .view::<f32>()
        .ok_or_else(|| AppError::bad_request("the input is not FP32"))?
        .iter()
        .copied()
        .collect();
    let row_len = data.len() / rows;
    let outputs = model.worker.infer_uncounted(request.inputs).await?;
    let scores = score_table(&outputs[out_ix].tensor, rows)?;
    let classes = scores.len() / rows;
    let fixed_target = match &params.target {
        None => output_spec
            .positive_label
            .as_ref()
            .and_then(|p| labels.iter().position(|l| l == p)),
        Some(Target::Index(i)) => Some(*i),
        Some(Target::Label(l)) => Some(
            labels
                .iter()
                .position(|x| x == l)
                .or_else(|| l.parse::<usize>().ok())
                .ok_or_else(|| {
                    AppError::bad_request(format!(
                        "parameters.target {l:?} is not a label of output {:?} ({labels:?})",
                        output_spec.name
                    ))
                })?,
        ),
    };
    if let Some(t) = fixed_target
        && t >= classes
    {
        return Err(AppError::bad_request(format!(
            "parameters.target {t} is out of range: output {:?} has {classes} classes",
            output_spec.name
        )));
    }
    let targets: Vec<usize> = (0..rows)
        .map(|r| fixed_target.unwrap_or_else(|| argmax(&scores[r * classes..(r + 1) * classes])))
        .collect();
    audit.detail = Some(format!(
        "method={} output={} target={}",
        method.as_str(),
        output_spec.name,
        targets
            .iter()
            .map(|&t| labels.get(t).cloned().unwrap_or_else(|| t.to_string()))
            .collect::<Vec<_>>()
            .join(",")
    ));
    let link = params.link.unwrap_or(if labels.is_empty() {
        Link::Identity
    } else {
        Link::Logit
    });
    // KernelSHAP averages in the link's space: the handler takes the scores there itself
    // (two-class log-odds from both columns, see `Score`) and the method sees the identity.
    let score = match (method, link) {
        (Method::KernelShap, Link::Logit) => Score::LogOdds,
        _ => Score::Value,
    };
    let score_of = |r: usize| score.of(&scores[r * classes..(r + 1) * classes], targets[r]);

    let row = |r: usize| data[r * row_len..(r + 1) * row_len].to_vec();
    let perturbers = |make: &dyn Fn(usize) -> Result<Box<dyn Perturber>, _>| {
        (0..rows)
            .map(make)
            .collect::<Result<Vec<_>, _>>()
            .map(Plan::Perturb)
            .map_err(invalid)
    };
    let plan = match spec {
        Spec::Occlusion(shape, options) => perturbers(&|r| {
            Occlusion::new(row(r), shape, score_of(r), options)
                .map(|m| Box::new(m) as Box<dyn Perturber>)
        })?,
        Spec::Rise(shape, options) => perturbers(&|r| {
            Rise::new(row(r), shape, options).map(|m| Box::new(m) as Box<dyn Perturber>)
        })?,
        Spec::KernelShap(background, options) => perturbers(&|r| {
            KernelShap::new(row(r), background.clone(), score_of(r), options)
                .map(|m| Box::new(m) as Box<dyn Perturber>)
        })?,
        Spec::Ready(plan) => plan,
    };
    let chunk = forward_pass_chunk(
        model,
        row_len.saturating_mul(4),
        state.config.explain.max_concurrent,
    );
    let gradient_method = match &plan {
        Plan::Gradients(gm) => Some(gm.clone()),
        _ => None,
    };
    // Integrated gradients: per row, f(baseline) and the completeness gap.
    let mut completeness: Option<(Vec<f64>, Vec<f64>)> = None;

    // The explanations, row by row, their forward passes through the worker. Perturbation
    // passes are counted as their batches come back, so that an explanation stopped at its
    // deadline or by its client still shows the work it caused (counted only at the end,
    // a timed-out one showed none: a red-team finding); a gradient job's when it returns.
    let pass_counter = metrics::counter!("nightingale_explain_forward_passes_total",
        "model" => model.name.clone(), "version" => model.version.to_string(), "method" => method.as_str());
    let mut explanations = Vec::with_capacity(rows);
    match plan {
        Plan::Gradients(gm) => {
            let per_row = gm.passes_per_row();
            let tensor = Tensor::from_vec(shape.clone(), data.clone())
                .map_err(|e| AppError::internal(e.to_string()))?;
            let saliency = model
                .worker
                .gradients(GradientRequest {
                    input: NamedTensor::new(input_spec.name.clone(), tensor),
                    output: out_ix,
                    targets: targets.clone(),
                    method: gm,
                    max_batch: chunk,
                })
                .await?;
            let pixels = saliency.height * saliency.width;
            pass_counter.increment((per_row * rows) as u64);
            if saliency.values.len() != rows * pixels {
                return Err(AppError::internal(
                    "the backend returned saliency maps of the wrong size",
                ));
            }
            // A baseline (or an input) so large that the model's score or its gradient
            // overflows: there is nothing to explain, as for the perturbation methods.
            if saliency.values.iter().any(|v| !v.is_finite())
                || saliency
                    .baseline_score
                    .iter()
                    .chain(&saliency.completeness_gap)
                    .any(|v| !v.is_finite())
            {
                return Err(AppError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "the gradients or the baseline's score are not finite (the input or the baseline overflows the model); there is nothing to explain",
                ));
            }
            for r in 0..rows {
                explanations.push(Explanation {
                    values: saliency.values[r * pixels..(r + 1) * pixels]
                        .iter()
                        .map(|&v| f64::from(v))
                        .collect(),
                    base_value: None,
                    forward_passes: per_row,
                });
            }
            if method == Method::IntegratedGradients {
                completeness = Some((saliency.baseline_score, saliency.completeness_gap));
            }
        }
        Plan::Perturb(methods) => {
            let row_shape = &shape[1..];
            for (r, m) in methods.into_iter().enumerate() {
                let e = drive(
                    model,
                    &input_spec.name,
                    row_shape,
                    (out_ix, targets[r], score),
                    m,
                    chunk,
                    &pass_counter,
                )
                .await?;
                explanations.push(e);
            }
        }
        Plan::Linear => {
            let features = tabular.expect("checked");
            let means = model
                .manifest
                .attribution
                .as_ref()
                .map(|a| a.means.clone())
                .ok_or_else(|| {
                    AppError::bad_request(format!(
                        "linear measures contributions from the bundle's reference point, and {} declares none ([attribution] means)",
                        model.name
                    ))
                })?;
            for (r, &target) in targets.iter().enumerate() {
                let form = state
                    .cds()
                    .linear_form(state, model, features, target)
                    .ok_or_else(|| {
                        AppError::bad_request(format!(
                            "linear needs a linear-logistic model (an ONNX-ML Scaler then LinearClassifier, logistic, two classes); {} is not one: use kernel_shap",
                            model.name
                        ))
                    })?;
                let x: Vec<f64> = row(r).iter().map(|&v| f64::from(v)).collect();
                explanations.push(Explanation {
                    values: form.contributions(&x, &means),
                    base_value: Some(form.logit(&means)),
                    forward_passes: 0,
                });
            }
        }
    }

    let passes: usize = explanations.iter().map(|e| e.forward_passes).sum();

    // The attribution tensor.
    let attribution = match image {
        Some(s) if method.is_image() => Tensor::from_vec(
            vec![rows, s.height, s.width],
            explanations
                .iter()
                .flat_map(|e| e.values.iter().map(|&v| v as f32))
                .collect::<Vec<f32>>(),
        ),
        _ => Tensor::from_vec(
            vec![rows, tabular.unwrap_or(0)],
            explanations
                .iter()
                .flat_map(|e| e.values.iter().copied())
                .collect::<Vec<f64>>(),
        ),
    }
    .map_err(|e| AppError::internal(e.to_string()))?;
    let mut all = outputs.clone();
    all.push(NamedTensor::new(
        attribution_name.clone(),
        attribution.clone(),
    ));
    audit.output_sha256 = Some(tensors_sha256(&all));
    let target_names: Vec<String> = targets
        .iter()
        .map(|&t| labels.get(t).cloned().unwrap_or_else(|| t.to_string()))
        .collect();
    audit.detail = Some(format!(
        "method={} forward_passes={passes} output={} target={}",
        method.as_str(),
        output_spec.name,
        target_names.join(",")
    ));

    let mut parameters = serde_json::Map::new();
    parameters.insert("method".into(), method.as_str().into());
    parameters.insert("explained_output".into(), output_spec.name.clone().into());
    parameters.insert("target".into(), target_names.join(",").into());
    parameters.insert("forward_passes".into(), passes.into());
    if method == Method::KernelShap || method == Method::Linear {
        parameters.insert(
            "link".into(),
            (if method == Method::Linear {
                "logit"
            } else {
                link.as_str()
            })
            .into(),
        );
        let bases: Vec<String> = explanations
            .iter()
            .filter_map(|e| e.base_value)
            .map(|b| format!("{b:.17e}"))
            .collect();
        parameters.insert("base_value".into(), bases.join(",").into());
    }
    let join = |v: &[f64]| {
        v.iter()
            .map(|b| format!("{b:.9e}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    match method {
        Method::GradCam => {
            parameters.insert("score".into(), "logit".into());
            parameters.insert("interpolation".into(), "bilinear".into());
        }
        Method::IntegratedGradients => {
            parameters.insert("score".into(), "output".into());
            if let Some(GradientMethod::IntegratedGradients { baseline, steps }) = &gradient_method
            {
                parameters.insert("steps".into(), (*steps).into());
                parameters.insert("baseline".into(), f64::from(*baseline).into());
            }
            if let Some((bases, gaps)) = &completeness {
                parameters.insert("baseline_score".into(), join(bases).into());
                parameters.insert("completeness_gap".into(), join(gaps).into());
            }
        }
        _ => {}
    }
    let heatmap = match image {
        Some(s) if params.heatmap => {
            let plane = s.height * s.width;
            // What each image is drawn from, and its size, known before anything is drawn.
            let drawings: Vec<(std::ops::Range<usize>, Vec<f32>, Vec<String>)> = explanations
                .iter()
                .zip(&target_names)
                .enumerate()
                .map(|(r, (e, target))| {
                    let map: Vec<f32> = e.values.iter().map(|&v| v as f32).collect();
                    let lines = [
                        crate::heatmap::caption(method.as_str(), target, &map),
                        heatmap_model_line(model),
                    ];
                    let lines: Vec<String> = lines
                        .iter()
                        .map(|l| {
                            l.chars()
                                .map(|c| if c.is_ascii() { c } else { '?' })
                                .collect()
                        })
                        .collect();
                    let start = r * row_len;
                    (start..start + s.channels * plane, map, lines)
                })
                .collect();
            // A model with open height and width drew any size it was given: 8 MB of a
            // 2,097,152 x 1 image took 3.9 GB and a minute on the async runtime, which
            // stalled every other request (a red-team finding). Bounded, and drawn on the
            // blocking pool.
            let pixels = drawings.iter().fold(0usize, |sum, (_, _, lines)| {
                sum.saturating_add(crate::heatmap::input_png_pixels(s.height, s.width, lines))
            });
            if pixels > MAX_HEATMAP_PIXELS {
                return Err(heatmap_too_large(pixels));
            }
            let inputs: Vec<Vec<f32>> = drawings
                .iter()
                .map(|(range, _, _)| data[range.clone()].to_vec())
                .collect();
            let turn = DRAWING
                .acquire()
                .await
                .map_err(|_| AppError::internal("heatmap drawing is closed"))?;
            let pngs = tokio::task::spawn_blocking(move || {
                // Held by the drawing itself: a request dropped at its deadline leaves the
                // drawing to finish, and its turn with it.
                let _turn = turn;
                drawings
                    .iter()
                    .zip(&inputs)
                    .map(|((_, map, lines), input)| {
                        crate::heatmap::input_png(input, s.channels, s.height, s.width, map, lines)
                            .map_err(|e| AppError::internal(format!("heatmap PNG: {e}")))
                    })
                    .collect::<Result<Vec<Vec<u8>>, AppError>>()
            })
            .await
            .map_err(|e| AppError::internal(format!("heatmap: {e}")))??;
            Some(NamedTensor::new(
                format!("{}_heatmap", output_spec.name),
                Tensor::from_vec(vec![rows], pngs)
                    .map_err(|e| AppError::internal(e.to_string()))?,
            ))
        }
        _ => None,
    };
    Ok(Explained {
        heatmap,
        id: request.id,
        wanted: request.outputs,
        binary_default: request.binary_default,
        outputs,
        attribution: NamedTensor::new(attribution_name, attribution),
        parameters,
    })
}

/// The most pixels the heatmaps of one request may have in all (band and caption included):
/// 2048 x 2048. Drawing takes about 30 bytes a pixel (the plane, its grey and RGB copies,
/// the PNG): ~125 MB at most (at 16 Mi pixels one drawing took 500 MB: a re-attack's
/// finding).
const MAX_HEATMAP_PIXELS: usize = 1 << 22;

/// Requests whose heatmaps are drawn at once (each within [`MAX_HEATMAP_PIXELS`]).
static DRAWING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// The heatmap's second line: the model, its version and the server's.
fn heatmap_model_line(model: &LoadedModel) -> String {
    format!(
        "{} {} - Nightingale {}",
        model.name,
        model.version,
        env!("CARGO_PKG_VERSION")
    )
}

fn heatmap_too_large(pixels: usize) -> AppError {
    AppError::bad_request(format!(
        "the heatmaps of this request would have {pixels} pixels; at most {MAX_HEATMAP_PIXELS} in all: ask for fewer or smaller images, or without parameters.heatmap"
    ))
}

/// Rows per batch an explanation's forward passes go to the model's worker in: its
/// `max_batch_size` (64 without batching), within its rows-per-request limit.
/// The explanations that may run at once (`at_once`), each with two batches in flight,
/// take at most half the model's `queue_bytes` of inputs together (`row_bytes` a row): a
/// chunk of large images over it was refused 503 "retry later" at every try (a 1 x
/// 2,097,152 image's 64 passes of 8 MB against 256 MiB), and two explanations sized for
/// half the queue each filled it, the second refused 503 after its first passes (a
/// review's finding).
pub(crate) fn forward_pass_chunk(model: &LoadedModel, row_bytes: usize, at_once: usize) -> usize {
    let config = model.worker.config();
    let by_queue = (config.queue_bytes / 2) / at_once.max(1).saturating_mul(2) / row_bytes.max(1);
    config
        .batching
        .as_ref()
        .map_or(64, |b| b.max_batch_size)
        .min(by_queue)
        .clamp(1, config.max_rows_per_request.max(1))
}

fn check_budget(
    method: Method,
    per_row: usize,
    rows: usize,
    budget: usize,
) -> Result<(), AppError> {
    let total = per_row.saturating_mul(rows);
    if total > budget {
        return Err(AppError::bad_request(format!(
            "{} would take {total} forward passes ({per_row} per row × {rows} rows); the budget is {budget}: ask for fewer samples, a larger stride, or fewer rows",
            method.as_str()
        )));
    }
    Ok(())
}

/// An output of `rows` rows as f64 scores, row-major.
fn score_table(t: &Tensor, rows: usize) -> Result<Vec<f64>, AppError> {
    let values: Vec<f64> = match t.datatype() {
        DataType::Fp32 => t
            .view::<f32>()
            .map(|v| v.iter().map(|&x| f64::from(x)).collect())
            .unwrap_or_default(),
        DataType::Fp64 => t
            .view::<f64>()
            .map(|v| v.iter().copied().collect())
            .unwrap_or_default(),
        other => {
            return Err(AppError::bad_request(format!(
                "the explained output is {}; /explain explains FP32 or FP64 scores",
                other.as_str()
            )));
        }
    };
    if t.shape().len() != 2 || t.shape()[0] != rows || values.is_empty() {
        return Err(AppError::bad_request(format!(
            "the explained output has shape {:?}; /explain explains scores of shape [N, classes]",
            t.shape()
        )));
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err(AppError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the model's score is not finite; there is nothing to explain",
        ));
    }
    Ok(values)
}

/// What an explanation attributes: the target's score itself, or its log-odds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Score {
    Value,
    /// `logit p`. For two classes it is taken as `ln p_target − ln p_other`: the same value
    /// when the columns sum to 1, but exact where `p_target` is within a few FP32 ulps of 1
    /// (a probability like 1 − 1.5e-7 keeps no digits of its complement, while the other
    /// column, computed by the model on its own, does). Each probability is clamped at 1e-12.
    LogOdds,
}

impl Score {
    fn of(self, row: &[f64], target: usize) -> f64 {
        match self {
            Score::Value => row[target],
            Score::LogOdds if row.len() == 2 => {
                let ln = |p: f64| p.max(1e-12).ln();
                ln(row[target]) - ln(row[1 - target])
            }
            Score::LogOdds => logit(row[target]),
        }
    }
}

fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Runs one explanation's forward passes through the model's worker, two batches in
/// flight, and returns the method's result.
async fn drive(
    model: &LoadedModel,
    input: &str,
    row_shape: &[usize],
    (out_ix, target, score): (usize, usize, Score),
    mut method: Box<dyn Perturber>,
    chunk: usize,
    passes: &metrics::Counter,
) -> Result<Explanation, AppError> {
    let mut pending = FuturesOrdered::new();
    let mut done = false;
    loop {
        while !done && pending.len() < 2 {
            let mut rows = Vec::with_capacity(chunk * method.row_len());
            let n = method.next_rows(chunk, &mut rows);
            if n == 0 {
                done = true;
                break;
            }
            let mut shape = Vec::with_capacity(1 + row_shape.len());
            shape.push(n);
            shape.extend_from_slice(row_shape);
            let tensor =
                Tensor::from_vec(shape, rows).map_err(|e| AppError::internal(e.to_string()))?;
            pending.push_back(
                model
                    .worker
                    .infer_uncounted(vec![NamedTensor::new(input, tensor)]),
            );
        }
        let Some(result) = pending.next().await else {
            break;
        };
        let outputs = result?;
        let t = &outputs[out_ix].tensor;
        let n = t.shape().first().copied().unwrap_or(0);
        passes.increment(n as u64);
        let table = score_table(t, n)?;
        let classes = table.len() / n.max(1);
        let scores: Vec<f64> = (0..n)
            .map(|r| score.of(&table[r * classes..(r + 1) * classes], target))
            .collect();
        method.absorb(&scores);
    }
    method.finish().map_err(|e| match e {
        // Too few samples for the features: the caller can ask for more.
        nightingale_inference::explain::ExplainError::Unsolvable(_) => {
            AppError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
        }
        e => AppError::internal(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A few explanations run at once, the next wait their turn in a line of four per turn,
    /// and one more is refused at once (503 with `Retry-After`), not held to its deadline; a
    /// waiter that gives up (its deadline) leaves the line.
    #[tokio::test]
    async fn explanations_take_turns_in_a_bounded_line() {
        let turns = Arc::new(Turns::new(1));
        let first = turns.take().await.unwrap();
        let mut waiting = Vec::new();
        for _ in 0..crate::http::EXPLAIN_WAITING_PER_SLOT {
            let turns = turns.clone();
            waiting.push(tokio::spawn(async move {
                turns.take().await.map(drop).map_err(|e| e.status)
            }));
        }
        // Every waiter is in line (bounded wait for the spawned tasks to queue).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while turns.waiting.load(std::sync::atomic::Ordering::Acquire)
            < crate::http::EXPLAIN_WAITING_PER_SLOT
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the waiters never queued"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let refused = turns.take().await.unwrap_err();
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(refused.retry_after.is_some());
        assert!(
            refused.message.contains("--explain-max-concurrent"),
            "{}",
            refused.message
        );
        assert_eq!(
            turns.waiting.load(std::sync::atomic::Ordering::Acquire),
            crate::http::EXPLAIN_WAITING_PER_SLOT
        );
        drop(first);
        for w in waiting {
            tokio::time::timeout(std::time::Duration::from_secs(30), w)
                .await
                .expect("each waiter gets its turn")
                .unwrap()
                .expect("a turn");
        }
        assert_eq!(turns.waiting.load(std::sync::atomic::Ordering::Acquire), 0);
        // A waiter whose deadline fires leaves the line.
        let held = turns.take().await.unwrap();
        let gave_up =
            tokio::time::timeout(std::time::Duration::from_millis(10), turns.take()).await;
        assert!(gave_up.is_err(), "no turn while one is held");
        assert_eq!(turns.waiting.load(std::sync::atomic::Ordering::Acquire), 0);
        drop(held);
        assert!(turns.slots.try_acquire().is_ok());
    }

    /// Whatever can be refused without the model is refused before a turn is waited for and
    /// before the prediction runs: a bad request waited for a turn (or was told to try again
    /// later while the turns were taken), and one over its budget ran the prediction of
    /// every row first (a review's findings).
    #[tokio::test]
    async fn refusals_come_before_the_turn_and_the_prediction() {
        let dir = tempfile::tempdir().unwrap();
        let bundles = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/bundles");
        let repo = dir.path().join("repo");
        for model in ["wdbc-malignancy", "lesion-detection"] {
            copy(&bundles.join(model), &repo.join(model));
        }
        let repository = Arc::new(nightingale_models::Repository::new(
            &repo,
            Default::default(),
        ));
        repository.load_all().unwrap();
        let state = crate::http::AppState::new(
            repository.clone(),
            crate::audit::AuditLog::open(&dir.path().join("audit.jsonl"), false).unwrap(),
            crate::http::HttpConfig::default(),
            None,
        );
        let wdbc = repository.get("wdbc-malignancy", None).unwrap();
        let lesion = repository.get("lesion-detection", None).unwrap();
        let decode = |model: &LoadedModel, body: serde_json::Value| {
            codec::decode_request(
                body.to_string().as_bytes(),
                None,
                &model.worker.metadata().inputs,
                &mut |_| Ok(()),
            )
            .unwrap()
        };
        let table = |parameters: serde_json::Value| {
            serde_json::json!({"parameters": parameters, "inputs": [{"name": "features",
                "shape": [2, 30], "datatype": "FP32", "data": vec![1.0f32; 60]}]})
        };
        let image = |parameters: serde_json::Value| {
            let shape = &lesion.worker.metadata().inputs[0].shape;
            let (c, h, w) = (shape[1] as usize, shape[2] as usize, shape[3] as usize);
            serde_json::json!({"parameters": parameters, "inputs": [{"name":
                lesion.worker.metadata().inputs[0].name, "shape": [2, c, h, w],
                "datatype": "FP32", "data": vec![0.5f32; 2 * c * h * w]}]})
        };
        let executions = |model: &LoadedModel| model.worker.stats().snapshot().execution_count;
        let before = (executions(&wdbc), executions(&lesion));
        for (model, body, why) in [
            (
                &wdbc,
                table(serde_json::json!({"method": "bogus"})),
                "unknown explanation method",
            ),
            (
                &wdbc,
                table(serde_json::json!({"method": "kernel_shap", "foo": 1})),
                "unknown parameter",
            ),
            (
                &wdbc,
                table(serde_json::json!({"method": "kernel_shap", "samples": 1_000_000})),
                "forward passes",
            ),
            (
                &wdbc,
                table(serde_json::json!({"method": "kernel_shap", "samples": 0})),
                "samples must be at least 1",
            ),
            (
                &lesion,
                image(serde_json::json!({"method": "rise", "samples": 1_000_000})),
                "forward passes",
            ),
            (
                &lesion,
                image(serde_json::json!({"method": "rise", "grid": 0})),
                "grid must be",
            ),
            (
                &lesion,
                image(serde_json::json!({"method": "rise", "p": 0.0})),
                "keep (p)",
            ),
            (
                &lesion,
                image(serde_json::json!({"method": "occlusion", "patch": 1, "stride": 1})),
                "forward passes",
            ),
            (
                &lesion,
                image(serde_json::json!({"method": "occlusion", "patch": 2, "stride": 3})),
                "must not exceed the patch",
            ),
        ] {
            let mut audit = AuditEvent::blank(crate::audit::EventKind::Explain, "t".into(), None);
            let turn = std::future::poll_fn(|_| -> std::task::Poll<Result<(), AppError>> {
                panic!("waited for a turn: {why}")
            });
            let refused =
                match explain_in_turn(&state, model, decode(model, body), &mut audit, turn).await {
                    Ok(_) => panic!("{why}: explained"),
                    Err(e) => e,
                };
            assert_eq!(
                refused.status,
                StatusCode::BAD_REQUEST,
                "{}",
                refused.message
            );
            assert!(refused.message.contains(why), "{why}: {}", refused.message);
        }
        assert_eq!(
            (executions(&wdbc), executions(&lesion)),
            before,
            "the model ran"
        );
        // A request that passes waits for its turn, then runs.
        let waited = std::sync::atomic::AtomicBool::new(false);
        let mut audit = AuditEvent::blank(crate::audit::EventKind::Explain, "t".into(), None);
        let body = table(serde_json::json!({"method": "kernel_shap", "samples": 64}));
        let turn = async {
            waited.store(true, std::sync::atomic::Ordering::Release);
            Ok::<_, AppError>(())
        };
        let explained = explain_in_turn(&state, &wdbc, decode(&wdbc, body), &mut audit, turn).await;
        assert!(
            explained.is_ok(),
            "{:?}",
            explained.err().map(|e| e.message)
        );
        assert!(waited.load(std::sync::atomic::Ordering::Acquire));
        assert!(executions(&wdbc) > before.0);
    }

    fn copy(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
}
