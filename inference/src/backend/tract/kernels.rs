//! Nightingale's own kernels for the operators that dominate small image CNNs on tract: 2-D
//! convolution (a direct convolution with explicit SIMD for strides of 1 and 2 without
//! dilation, `direct.rs`; im2col into a plain matrix and one `gemm` product per image for the
//! rest), 2-D max pooling, and the strided and reversed slices (tract's `Downsample`) a model
//! uses to look at an image in several orientations. They replace tract's nodes in the typed
//! model before tract optimises it ([`use_nightingale_kernels`]); everything else stays
//! tract's.
//!
//! Why by hand: tract 0.23.9 plans a model with a symbolic batch `N` through its eager im2col,
//! which packs one element at a time (2.6 ns per element on the image-orientation model), its
//! `MaxPool` walks a generic patch iterator (0.7 ms for one 16 × 128 × 128 plane set on the
//! lesion model, 20 % of the whole model), and its `Downsample` copies through a strided
//! ndarray view element by element (80 µs for a 56 × 56 flip). The im2col path's product is
//! ndarray's (`matrixmultiply`, 35–45 GMAC/s on these shapes on one core here; the direct
//! convolution avoids its matrix and its packing, docs/performance.md §16.2, §19).
//!
//! Each image of a batch is computed on its own, with the same shapes whatever the batch
//! size, so a row's answer is the same bits whether it runs alone or batched with others.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::Arc;

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2, ShapeBuilder};
use tract_onnx::tract_core::ops::Downsample;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cnn::conv::Conv;
use tract_onnx::tract_core::ops::cnn::{MaxPool, PaddingSpec, PoolSpec};
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::nn::DataFormat;
use tract_onnx::tract_hir::internal::*;

mod direct;

/// Replaces every 2-D f32 NCHW `Conv` (one group, constant kernel and bias) and every 2-D f32
/// NCHW `MaxPool` without index output of `model` with Nightingale's kernels. Returns how many
/// nodes were replaced.
pub fn use_nightingale_kernels(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        if id >= model.nodes().len() {
            continue;
        }
        let node = model.node(id);
        let patch = if let Some(conv) = node.op_as::<Conv>() {
            GemmConv::for_node(model, node, conv)?.map(|op| conv_patch(model, node, op))
        } else if let Some(einsum) = node.op_as::<EinSum>() {
            GemmConv::for_einsum(model, node, einsum)?.map(|op| conv_patch(model, node, op))
        } else if let Some(pool) = node.op_as::<MaxPool>() {
            PlaneMaxPool::for_node(model, node, pool)?
                .map(|op| TypedModelPatch::replace_single_op(model, node, &node.inputs[0..1], op))
        } else if let Some(down) = node.op_as::<Downsample>() {
            AxisStep::for_node(model, node, down)?
                .map(|op| TypedModelPatch::replace_single_op(model, node, &node.inputs[0..1], op))
        } else {
            None
        };
        if let Some(patch) = patch {
            patch?.apply(model)?;
            replaced += 1;
        }
    }
    Ok(replaced)
}

/// The patch that puts `op` in place of the convolution `node`, with what follows it folded
/// in while `node`'s output (then each folded node's) goes to one node only: multiplications
/// and additions by one constant per output channel (a batch norm after a 1 × 1 convolution,
/// which tract leaves as such; the bias tract splits off it) into its weights and bias, then a
/// ReLU into the kernel. The folded nodes' output is then the convolution's.
fn conv_patch(
    model: &TypedModel,
    node: &TypedNode,
    mut op: GemmConv,
) -> TractResult<TypedModelPatch> {
    let mut last = node.id;
    while let Some((next, fold)) = channel_op_after(model, last, &op)? {
        op.fold(fold);
        last = next;
    }
    if let Some(relu) = relu_after(model, model.node(last))? {
        op.relu = true;
        last = relu;
    }
    if last == node.id {
        return TypedModelPatch::replace_single_op(model, node, &node.inputs[0..1], op);
    }
    let mut patch = TypedModelPatch::new("nightingale conv + what follows it");
    let input = patch.tap_model(model, node.inputs[0])?;
    let wire = patch.wire_node(&*node.name, op, &[input])?[0];
    patch.shunt_outside(model, OutletId::new(last, 0), wire)?;
    patch.obliterate(node.id)?;
    Ok(patch)
}

/// A multiplication or addition by one constant per output channel.
enum Fold {
    Scale(Vec<f32>),
    Shift(Vec<f32>),
}

/// The node after `id` (its only reader, not a model output) when it multiplies or adds a
/// constant of one value per output channel of `conv` (or one value for all), that value.
fn channel_op_after(
    model: &TypedModel,
    id: usize,
    conv: &GemmConv,
) -> TractResult<Option<(usize, Fold)>> {
    let node = model.node(id);
    let [only] = &node.outputs[..] else {
        return Ok(None);
    };
    let [next] = &only.successors[..] else {
        return Ok(None);
    };
    if model.output_outlets()?.contains(&OutletId::new(id, 0)) {
        return Ok(None);
    }
    let next = model.node(next.node);
    let Some(op) = next.op_as::<TypedBinOp>() else {
        return Ok(None);
    };
    let name = op.0.name();
    if !matches!(name, "Mul" | "Add") || op.1.is_some() || next.inputs.len() != 2 {
        return Ok(None);
    }
    let Some(other) = next.inputs.iter().find(|i| i.node != id) else {
        return Ok(None);
    };
    let Some(constant) = model.outlet_fact(*other)?.konst.clone() else {
        return Ok(None);
    };
    let ours = model.outlet_fact(OutletId::new(id, 0))?;
    let out = model.outlet_fact(OutletId::new(next.id, 0))?;
    let co = conv.pool_spec.output_channels;
    let c_axis = if conv.pool_spec.data_format == DataFormat::CHW {
        0
    } else {
        1
    };
    // One value per channel along the channel axis, or one for all; nothing that broadcasts
    // the convolution's output to a larger shape.
    let per_channel = constant.rank() == ours.rank()
        && constant
            .shape()
            .iter()
            .enumerate()
            .all(|(axis, &d)| d == 1 || (axis == c_axis && d == co));
    if constant.datum_type() != f32::datum_type()
        || !per_channel
        || out.shape != ours.shape
        || out.datum_type != f32::datum_type()
    {
        return Ok(None);
    }
    let values = constant.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    let values = if values.len() == co {
        values
    } else {
        vec![values[0]; co]
    };
    let fold = if name == "Mul" {
        Fold::Scale(values)
    } else {
        Fold::Shift(values)
    };
    Ok(Some((next.id, fold)))
}

/// The node that applies ReLU (`Max` with a constant 0, as tract's ONNX front end wires it)
/// to `node`'s only output and is its only reader, if there is one.
fn relu_after(model: &TypedModel, node: &TypedNode) -> TractResult<Option<usize>> {
    let [only] = &node.outputs[..] else {
        return Ok(None);
    };
    let [next] = &only.successors[..] else {
        return Ok(None);
    };
    if model.output_outlets()?.contains(&OutletId::new(node.id, 0)) {
        return Ok(None);
    }
    let next = model.node(next.node);
    let Some(op) = next.op_as::<TypedBinOp>() else {
        return Ok(None);
    };
    if op.0.name() != "Max" || next.inputs.len() != 2 || op.1.is_some() {
        return Ok(None);
    }
    let other = next.inputs.iter().find(|i| i.node != node.id);
    let zero = match other {
        Some(o) => model.outlet_fact(*o)?.konst.clone(),
        None => None,
    };
    let is_zero = zero.is_some_and(|t| {
        t.datum_type() == f32::datum_type()
            && t.try_as_plain_ram()
                .ok()
                .and_then(|p| {
                    p.as_slice::<f32>()
                        .ok()
                        .map(|v| v.iter().all(|x| *x == 0.0))
                })
                .unwrap_or(false)
    });
    let out = model.outlet_fact(OutletId::new(next.id, 0))?;
    let input = model.outlet_fact(OutletId::new(node.id, 0))?;
    Ok(
        (is_zero && out.shape == input.shape && out.datum_type == f32::datum_type())
            .then_some(next.id),
    )
}

/// Whether `spec` describes a 2-D NCHW pooling or convolution geometry these kernels take:
/// a kernel of at least one tap, strides and dilations of at least one (anything else is
/// left to tract, which refuses or handles it). `CHW` is NCHW without its batch axis (tract
/// drops an axis of 1 when the batch is fixed at one row).
fn is_nchw_2d(spec: &PoolSpec) -> bool {
    matches!(spec.data_format, DataFormat::NCHW | DataFormat::CHW)
        && spec.rank() == 2
        && spec.kernel_shape.len() == 2
        && spec.kernel_shape.iter().all(|&k| k >= 1)
        && [spec.strides(), spec.dilations()]
            .iter()
            .all(|v| v.len() == 2 && v.iter().all(|&x| x >= 1))
}

/// Whether `fact` is an f32 input of `format` (NCHW or CHW) with known planes.
fn has_planes(fact: &TypedFact, format: DataFormat) -> bool {
    let rank = if format == DataFormat::CHW { 3 } else { 4 };
    fact.datum_type == f32::datum_type()
        && fact.rank() == rank
        && fact.shape[rank - 2].to_usize().is_ok()
        && fact.shape[rank - 1].to_usize().is_ok()
}

/// `[batch, channels, h, w]` of an input of `format` (NCHW, or CHW as a batch of one).
fn nchw(shape: &[usize], format: DataFormat) -> TractResult<[usize; 4]> {
    match (format, shape) {
        (DataFormat::CHW, &[c, h, w]) => Ok([1, c, h, w]),
        (DataFormat::NCHW, &[n, c, h, w]) => Ok([n, c, h, w]),
        _ => bail!("a {format:?} input of shape {shape:?}"),
    }
}

/// An output tensor of `format` for `[batch, channels, h, w]`, zeroed.
fn planes_zeroed(format: DataFormat, [n, c, h, w]: [usize; 4]) -> TractResult<Tensor> {
    if format == DataFormat::CHW {
        Tensor::zero::<f32>(&[c, h, w])
    } else {
        Tensor::zero::<f32>(&[n, c, h, w])
    }
}

/// The concrete geometry of one image: input and output planes, the kernel, strides,
/// dilations and the padding before each axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plane {
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    kh: usize,
    kw: usize,
    sy: usize,
    sx: usize,
    dy: usize,
    dx: usize,
    pad_top: usize,
    pad_left: usize,
}

impl Plane {
    fn of(spec: &PoolSpec, h: usize, w: usize) -> TractResult<Plane> {
        let padding = spec.computed_padding(&[h, w]);
        Ok(Plane {
            h,
            w,
            oh: padding[0].convoluted,
            ow: padding[1].convoluted,
            kh: spec.kernel_shape[0],
            kw: spec.kernel_shape[1],
            sy: spec.stride(0),
            sx: spec.stride(1),
            dy: spec.dilation(0),
            dx: spec.dilation(1),
            pad_top: padding[0].pad_before,
            pad_left: padding[1].pad_before,
        })
    }

    /// The output columns `ox` whose input column `ox * sx + kx * dx - pad_left` lies inside
    /// the image, as a half-open range.
    fn valid_x(&self, kx: usize) -> (usize, usize) {
        let offset = kx * self.dx;
        // ox * sx + offset >= pad_left
        let start = self
            .pad_left
            .saturating_sub(offset)
            .div_ceil(self.sx)
            .min(self.ow);
        // ox * sx + offset < w + pad_left
        let end = (self.w + self.pad_left)
            .saturating_sub(offset)
            .div_ceil(self.sx)
            .min(self.ow);
        (start, end.max(start))
    }

    /// The input row read by output row `oy` for kernel row `ky`, if inside the image.
    fn input_y(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy * self.sy + ky * self.dy)
            .checked_sub(self.pad_top)
            .filter(|&y| y < self.h)
    }
}

/// A 2-D convolution as im2col + one matrix product per image.
#[derive(Debug, Clone, PartialEq)]
pub struct GemmConv {
    pool_spec: PoolSpec,
    /// `[output channels, input channels × kh × kw]`, row-major.
    weights: Arc<Vec<f32>>,
    /// One value per output channel.
    bias: Arc<Vec<f32>>,
    /// Whether a ReLU follows (fused here).
    relu: bool,
    /// The weights packed for the direct convolution, when its geometry is one it takes
    /// (`direct.rs`); otherwise im2col + a product.
    direct: Option<Arc<direct::Packed>>,
    /// The geometry the model was planned with (the weights are packed for it).
    plane: Plane,
}

impl Eq for GemmConv {}

impl GemmConv {
    /// tract's declutter turns a 1 × 1 convolution of stride 1 without padding into an
    /// `EinSum` of the input planes and the `[co, ci]` filters (its bias into an `Add` after
    /// it): taken back as a convolution when the sum is exactly that one, on NCHW or CHW.
    fn for_einsum(
        model: &TypedModel,
        node: &TypedNode,
        einsum: &EinSum,
    ) -> TractResult<Option<Self>> {
        if einsum.q_params.is_some()
            || einsum.operating_dt != f32::datum_type()
            || node.inputs.len() != 2
        {
            return Ok(None);
        }
        let input = model.outlet_fact(node.inputs[0])?;
        let Some(filters) = model.outlet_fact(node.inputs[1])?.konst.clone() else {
            return Ok(None);
        };
        // The sum's axes, lettered in order of appearance: `nihw,oi->nohw` (NCHW) or
        // `ihw,oi->ohw` (CHW), whatever letters tract gave them.
        let mut letters = std::collections::HashMap::new();
        let canonical: String = einsum
            .axes
            .to_string()
            .chars()
            .map(|c| match c {
                ',' | '-' | '>' => c,
                _ => {
                    let next = (b'a' + letters.len() as u8) as char;
                    *letters.entry(c).or_insert(next)
                }
            })
            .collect();
        let format = match canonical.as_str() {
            "abcd,eb->aecd" => DataFormat::NCHW,
            "abc,da->dbc" => DataFormat::CHW,
            _ => return Ok(None),
        };
        if !has_planes(input, format)
            || filters.datum_type() != f32::datum_type()
            || filters.rank() != 2
        {
            return Ok(None);
        }
        let (co, ci) = (filters.shape()[0], filters.shape()[1]);
        let c_axis = if format == DataFormat::CHW { 0 } else { 1 };
        if input.shape[c_axis].to_usize().ok() != Some(ci) {
            return Ok(None);
        }
        let spec = PoolSpec {
            data_format: format,
            kernel_shape: tvec![1, 1],
            padding: PaddingSpec::Valid,
            dilations: None,
            strides: None,
            input_channels: ci,
            output_channels: co,
        };
        let weights = filters.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        Self::new(spec, input, weights, vec![0.0; co]).map(Some)
    }

    /// The convolution of `spec` on `input` (its facts) with `weights` (`[co, ci × kh ×
    /// kw]`, row-major) and `bias` (one value per output channel).
    fn new(
        spec: PoolSpec,
        input: &TypedFact,
        weights: Vec<f32>,
        bias: Vec<f32>,
    ) -> TractResult<GemmConv> {
        let rank = input.rank();
        let (h, w) = (
            input.shape[rank - 2].to_usize()?,
            input.shape[rank - 1].to_usize()?,
        );
        let plane = Plane::of(&spec, h, w)?;
        let mut conv = GemmConv {
            pool_spec: spec,
            weights: Arc::new(weights),
            bias: Arc::new(bias),
            relu: false,
            direct: None,
            plane,
        };
        conv.pack();
        Ok(conv)
    }

    /// Packs the weights for the direct convolution when the planned geometry is one it takes.
    fn pack(&mut self) {
        let p = &self.plane;
        let (co, ci) = (
            self.pool_spec.output_channels,
            self.pool_spec.input_channels,
        );
        self.direct = (direct::applies((p.sy, p.sx), (p.dy, p.dx)) && p.oh > 0 && p.ow > 0)
            .then(|| Arc::new(direct::Packed::new(&self.weights, &self.bias, ci, co, p)));
    }

    /// Folds a per-channel multiplication or addition of the output into the weights and bias.
    fn fold(&mut self, fold: Fold) {
        let k = self.k();
        let weights = Arc::make_mut(&mut self.weights);
        let bias = Arc::make_mut(&mut self.bias);
        match fold {
            Fold::Scale(scale) => {
                for ((row, b), s) in weights.chunks_exact_mut(k).zip(bias.iter_mut()).zip(scale) {
                    row.iter_mut().for_each(|w| *w *= s);
                    *b *= s;
                }
            }
            Fold::Shift(shift) => {
                for (b, t) in bias.iter_mut().zip(shift) {
                    *b += t;
                }
            }
        }
        self.pack();
    }

    fn for_node(model: &TypedModel, node: &TypedNode, conv: &Conv) -> TractResult<Option<Self>> {
        let spec = &conv.pool_spec;
        if conv.q_params.is_some() || conv.group != 1 || !is_nchw_2d(spec) || node.inputs.len() != 3
        {
            return Ok(None);
        }
        let input = model.outlet_fact(node.inputs[0])?;
        let (Some(kernel), Some(bias)) = (
            model.outlet_fact(node.inputs[1])?.konst.clone(),
            model.outlet_fact(node.inputs[2])?.konst.clone(),
        ) else {
            return Ok(None);
        };
        if !has_planes(input, spec.data_format)
            || kernel.datum_type() != f32::datum_type()
            || bias.datum_type() != f32::datum_type()
        {
            return Ok(None);
        }
        let (co, ci) = (spec.output_channels, spec.input_channels);
        let (kh, kw) = (spec.kernel_shape[0], spec.kernel_shape[1]);
        // The kernel as [1, O, I × H × W] (one group), whatever its stored format.
        let o_ihw = conv.kernel_fmt.kernel_as_group_o_ihw(&kernel, 1)?;
        ensure!(
            o_ihw.shape() == [1, co, ci * kh * kw],
            "unexpected kernel shape {:?}",
            o_ihw.shape()
        );
        let weights = o_ihw.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        let bias_values = bias.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        let bias = match bias_values.len() {
            0 => vec![0.0; co],
            1 => vec![bias_values[0]; co],
            n if n == co => bias_values,
            n => bail!("bias has {n} values for {co} output channels"),
        };
        Self::new(spec.clone(), input, weights, bias).map(Some)
    }

    fn k(&self) -> usize {
        self.pool_spec.input_channels * self.pool_spec.kernel_shape.iter().product::<usize>()
    }

    /// The bytes a run on an input of `shape` holds besides its input and output: the
    /// im2col column buffer and the scratch of a grouped product (none on the direct path).
    /// `k` grows with the kernel, the columns with the batch up to [`GROUP_COLUMNS`]: the
    /// working-memory bound counts them (a red-team finding: 32 GiB for an output of a few
    /// KB aborted the server).
    pub(crate) fn scratch_bytes(&self, shape: &[usize]) -> Option<u64> {
        if self.direct.is_some() {
            return Some(0);
        }
        let [batch, _, h, w] = nchw(shape, self.pool_spec.data_format).ok()?;
        let p = Plane::of(&self.pool_spec, h, w).ok()?;
        let (k, n) = (self.k() as u64, p.oh * p.ow);
        let co = self.pool_spec.output_channels as u64;
        let floats = if n > GROUP_COLUMNS {
            let width = (GROUP_COLUMNS / p.ow.max(1)).max(1) * p.ow;
            k.saturating_mul(column_stride(width) as u64)
        } else {
            let width = (GROUP_COLUMNS / n.max(1)).clamp(1, batch.max(1)) * n;
            k.saturating_mul(column_stride(width) as u64)
                .saturating_add(co.saturating_mul(width as u64))
        };
        Some(floats.saturating_mul(4))
    }
}

thread_local! {
    /// The im2col matrix of the convolution running on this thread, reused between calls.
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The row stride of an im2col matrix of `n` columns: `n`, moved off multiples of 128 floats,
/// whose rows would all map to the same cache sets (a 4096-column matrix ran at 24 instead
/// of 38 GMAC/s).
fn column_stride(n: usize) -> usize {
    if n >= 128 && n.is_multiple_of(128) {
        n + 16
    } else {
        n
    }
}

/// A tensor of `shape` owning `values` (no copy).
fn tensor(shape: &[usize], values: Vec<f32>) -> TractResult<Tensor> {
    Ok(tract_ndarray::ArrayD::from_shape_vec(shape, values)?.into_tensor())
}

/// The columns of one product: up to this many output points (of one or more images, or a
/// band of rows of one large image).
const GROUP_COLUMNS: usize = 4096;

/// The most floats of column buffer a thread keeps between convolutions (64 MiB).
const KEEP_COLUMNS: usize = 16 << 20;

/// Writes the im2col columns of output rows `rows` of one image (`[ci, h, w]`) into the first
/// `rows.len() × ow` columns of `cols` (`k` rows, one every `ld` values).
fn im2col(image: &[f32], ci: usize, p: &Plane, rows: Range<usize>, cols: &mut [f32], ld: usize) {
    let n = rows.len() * p.ow;
    let mut row = 0;
    for c in 0..ci {
        let channel = &image[c * p.h * p.w..(c + 1) * p.h * p.w];
        for ky in 0..p.kh {
            for kx in 0..p.kw {
                let out = &mut cols[row * ld..row * ld + n];
                let (x0, x1) = p.valid_x(kx);
                for (oy, dst) in rows.clone().zip(out.chunks_exact_mut(p.ow)) {
                    let Some(y) = p.input_y(oy, ky) else {
                        dst.fill(0.0);
                        continue;
                    };
                    dst[..x0].fill(0.0);
                    dst[x1..].fill(0.0);
                    if x1 > x0 {
                        let line = &channel[y * p.w..(y + 1) * p.w];
                        let first = x0 * p.sx + kx * p.dx - p.pad_left;
                        if p.sx == 1 {
                            dst[x0..x1].copy_from_slice(&line[first..first + (x1 - x0)]);
                        } else {
                            for (i, d) in dst[x0..x1].iter_mut().enumerate() {
                                *d = line[first + i * p.sx];
                            }
                        }
                    }
                }
                row += 1;
            }
        }
    }
}

/// Frees a column buffer over [`KEEP_COLUMNS`]: one of a large kernel is not kept between
/// calls (each engine thread would hold its own for good).
fn forget_large(cols: &mut Vec<f32>) {
    if cols.capacity() > KEEP_COLUMNS {
        *cols = Vec::new();
    }
}

/// The floats of column buffer this thread keeps between convolutions.
#[cfg(test)]
pub(crate) fn kept_columns() -> usize {
    COLUMNS.with_borrow(|cols| cols.capacity())
}

/// Makes `cols` at least `len` long.
fn grow(cols: &mut Vec<f32>, len: usize) {
    if cols.len() < len {
        cols.resize(len, 0.0);
    }
}

impl GemmConv {
    /// `width` output points of every channel from their im2col columns (`k` rows of `ld` in
    /// `cols`): bias, the product, then the ReLU if fused; channel `c`'s points go to
    /// `out[c * stride..][..width]`.
    fn multiply(&self, cols: &[f32], ld: usize, width: usize, out: &mut [f32], stride: usize) {
        let (k, co) = (self.k(), self.pool_spec.output_channels);
        for (c, b) in self.bias.iter().enumerate() {
            out[c * stride..][..width].fill(*b);
        }
        if k > 0 {
            // The product transposed, outputᵀ = columnsᵀ · weightsᵀ, on the same memory
            // (views with swapped strides): matrixmultiply runs these shapes 3–70 % faster
            // that way round, most where k is small (performance §16.2). A column's value
            // does not depend on the columns beside it, so neither an image's nor a band's
            // answer depends on what shares its product.
            let columns = ArrayView2::from_shape((width, k).strides((1, ld)), cols)
                .expect("the column buffer holds k rows of ld");
            let weights = ArrayView2::from_shape((k, co).strides((1, k)), &self.weights[..])
                .expect("co × k weights");
            let mut product = ArrayViewMut2::from_shape((width, co).strides((1, stride)), out)
                .expect("co rows of width outputs, one every stride");
            general_mat_mul(1.0, &columns, &weights, 1.0, &mut product);
        }
        if self.relu {
            for c in 0..co {
                out[c * stride..][..width]
                    .iter_mut()
                    .for_each(|v| *v = v.max(0.0));
            }
        }
    }
}

impl Op for GemmConv {
    fn name(&self) -> StaticName {
        "NightingaleConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{}x{} kernel, {} -> {} channels, strides {:?}, dilations {:?}, padding {:?}, relu {}",
            self.pool_spec.kernel_shape[0],
            self.pool_spec.kernel_shape[1],
            self.pool_spec.input_channels,
            self.pool_spec.output_channels,
            self.pool_spec.strides(),
            self.pool_spec.dilations(),
            self.pool_spec.padding,
            self.relu
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for GemmConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let format = self.pool_spec.data_format;
        let [batch, ci, h, w] = nchw(input.shape(), format)?;
        ensure!(ci == self.pool_spec.input_channels, "{ci} input channels");
        let p = Plane::of(&self.pool_spec, h, w)?;
        let co = self.pool_spec.output_channels;
        let (k, n) = (self.k(), p.oh * p.ow);
        ensure!(
            ci * h * w > 0,
            "convolution of an empty {ci} x {h} x {w} image"
        );
        let out_shape = [batch, co, p.oh, p.ow];
        if batch == 0 || n == 0 || co == 0 {
            let output = planes_zeroed(format, out_shape)?;
            return Ok(tvec!(output.into_tvalue()));
        }
        let input = input.try_as_plain_ram()?;
        let input = input.as_slice::<f32>()?;
        if let Some(packed) = &self.direct {
            // Written straight into the output tensor (no second copy).
            let mut output = planes_zeroed(format, out_shape)?;
            let mut view = output.try_as_plain_ram_mut()?;
            let out = view.as_slice_mut::<f32>()?;
            direct::convolve(direct::Isa::Best, &p, packed, self.relu, input, out);
            return Ok(tvec!(output.into_tvalue()));
        }
        let mut output = vec![0f32; batch * co * n];
        // No product has more than GROUP_COLUMNS columns (output points), so the column
        // buffer stays under k × GROUP_COLUMNS values (or k × one output row) whatever the
        // plane and the batch.
        let image_len = ci * h * w;
        let mut scratch = Vec::new();
        COLUMNS.with_borrow_mut(|cols| {
            if n > GROUP_COLUMNS {
                // A large plane: bands of output rows, each multiplied straight into its
                // columns of the output, so that the column buffer stays small.
                let band_rows = (GROUP_COLUMNS / p.ow).max(1);
                for (image, out) in input
                    .chunks_exact(image_len)
                    .zip(output.chunks_exact_mut(co * n))
                {
                    for first in (0..p.oh).step_by(band_rows) {
                        let rows = first..(first + band_rows).min(p.oh);
                        let width = rows.len() * p.ow;
                        let ld = column_stride(width);
                        grow(cols, k * ld);
                        im2col(image, ci, &p, rows, cols, ld);
                        self.multiply(cols, ld, width, &mut out[first * p.ow..], n);
                    }
                }
                forget_large(cols);
                return;
            }
            // Small planes: several images side by side in one product of up to
            // GROUP_COLUMNS columns (thin products run at half speed), through a scratch
            // matrix whose row holds each image's plane of that channel in turn.
            let per_group = (GROUP_COLUMNS / n).clamp(1, batch);
            for (images, outputs) in input
                .chunks(per_group * image_len)
                .zip(output.chunks_mut(per_group * co * n))
            {
                let g = outputs.len() / (co * n);
                let width = g * n;
                let ld = column_stride(width);
                grow(cols, k * ld);
                for (j, image) in images.chunks_exact(image_len).enumerate() {
                    im2col(image, ci, &p, 0..p.oh, &mut cols[j * n..], ld);
                }
                if g == 1 {
                    self.multiply(cols, ld, width, outputs, n);
                    continue;
                }
                scratch.resize(co * width, 0.0);
                self.multiply(cols, ld, width, &mut scratch, width);
                for (c, row) in scratch.chunks_exact(width).enumerate() {
                    for (j, plane) in row.chunks_exact(n).enumerate() {
                        outputs[(j * co + c) * n..][..n].copy_from_slice(plane);
                    }
                }
            }
            forget_large(cols);
        });
        let output = if format == DataFormat::CHW {
            tensor(&[co, p.oh, p.ow], output)?
        } else {
            tensor(&out_shape, output)?
        };
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for GemmConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == f32::datum_type());
        let shape = self.pool_spec.output_shape(&inputs[0].shape)?;
        Ok(tvec!(f32::fact(shape.shape)))
    }

    as_op!();
}

/// 2-D max pooling over NCHW planes; the padding is never the maximum (as in ONNX).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaneMaxPool {
    pool_spec: PoolSpec,
}

impl PlaneMaxPool {
    fn for_node(model: &TypedModel, node: &TypedNode, pool: &MaxPool) -> TractResult<Option<Self>> {
        let input = model.outlet_fact(node.inputs[0])?;
        if pool.with_index_outputs.is_some()
            || !is_nchw_2d(&pool.pool_spec)
            || node.inputs.len() != 1
            || !has_planes(input, pool.pool_spec.data_format)
        {
            return Ok(None);
        }
        Ok(Some(PlaneMaxPool {
            pool_spec: pool.pool_spec.clone(),
        }))
    }
}

/// Max-pools one plane (`h × w`) into `out` (`oh × ow`).
fn max_pool_plane(plane: &[f32], p: &Plane, out: &mut [f32]) {
    if p.kh == 2
        && p.kw == 2
        && p.sy == 2
        && p.sx == 2
        && p.pad_top == 0
        && p.pad_left == 0
        && p.dy == 1
        && p.dx == 1
    {
        for (oy, dst) in out.chunks_exact_mut(p.ow).enumerate() {
            let a = &plane[2 * oy * p.w..][..2 * p.ow];
            let b = &plane[(2 * oy + 1) * p.w..][..2 * p.ow];
            for ((d, a), b) in dst.iter_mut().zip(a.chunks_exact(2)).zip(b.chunks_exact(2)) {
                *d = a[0].max(a[1]).max(b[0].max(b[1]));
            }
        }
        return;
    }
    for oy in 0..p.oh {
        let dst = &mut out[oy * p.ow..(oy + 1) * p.ow];
        dst.fill(f32::NEG_INFINITY);
        for ky in 0..p.kh {
            let Some(y) = p.input_y(oy, ky) else { continue };
            let line = &plane[y * p.w..(y + 1) * p.w];
            for kx in 0..p.kw {
                let (x0, x1) = p.valid_x(kx);
                for ox in x0..x1 {
                    let v = line[ox * p.sx + kx * p.dx - p.pad_left];
                    dst[ox] = dst[ox].max(v);
                }
            }
        }
    }
}

impl Op for PlaneMaxPool {
    fn name(&self) -> StaticName {
        "NightingaleMaxPool".into()
    }

    op_as_typed_op!();
}

impl EvalOp for PlaneMaxPool {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let format = self.pool_spec.data_format;
        let [batch, c, h, w] = nchw(input.shape(), format)?;
        let p = Plane::of(&self.pool_spec, h, w)?;
        let input = input.try_as_plain_ram()?;
        let input = input.as_slice::<f32>()?;
        let mut output = planes_zeroed(format, [batch, c, p.oh, p.ow])?;
        if p.oh * p.ow > 0 && h * w > 0 {
            let mut view = output.try_as_plain_ram_mut()?;
            for (plane, out) in input
                .chunks_exact(h * w)
                .zip(view.as_slice_mut::<f32>()?.chunks_exact_mut(p.oh * p.ow))
            {
                max_pool_plane(plane, &p, out);
            }
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for PlaneMaxPool {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == f32::datum_type());
        let shape = self.pool_spec.output_shape(&inputs[0].shape)?;
        Ok(tvec!(f32::fact(shape.shape)))
    }

    as_op!();
}

/// tract's `Downsample` (every `stride`-th element of one axis from `modulo`, or the axis
/// reversed: how its ONNX front end runs a `Slice` with steps, e.g. the flips of a model that
/// looks at an image in several orientations) on f32, as block copies: tract's own goes
/// through a strided ndarray view element by element (about 25 ns an element on a 56 × 56
/// plane, performance §19).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AxisStep {
    axis: usize,
    /// At least 1, or -1 (with `modulo` 0: the axis reversed).
    stride: isize,
    modulo: usize,
}

impl AxisStep {
    fn for_node(
        model: &TypedModel,
        node: &TypedNode,
        down: &Downsample,
    ) -> TractResult<Option<Self>> {
        let input = model.outlet_fact(node.inputs[0])?;
        let taken = input.datum_type == f32::datum_type()
            && down.axis < input.rank()
            && (down.stride >= 1 || (down.stride == -1 && down.modulo == 0));
        Ok(taken.then_some(AxisStep {
            axis: down.axis,
            stride: down.stride,
            modulo: down.modulo,
        }))
    }

    /// How many elements of an axis of `d` are kept.
    fn kept(&self, d: usize) -> usize {
        if self.stride < 0 {
            d
        } else {
            d.saturating_sub(self.modulo).div_ceil(self.stride as usize)
        }
    }

    /// The input index of output index `j` along the axis (of `d` elements).
    fn source(&self, j: usize, d: usize) -> usize {
        if self.stride < 0 {
            d - 1 - j
        } else {
            self.modulo + j * self.stride as usize
        }
    }
}

impl Op for AxisStep {
    fn name(&self) -> StaticName {
        "NightingaleDownsample".into()
    }

    op_as_typed_op!();
}

impl EvalOp for AxisStep {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let shape: TVec<usize> = input.shape().into();
        ensure!(
            self.axis < shape.len(),
            "axis {} of a rank {} tensor",
            self.axis,
            shape.len()
        );
        let d = shape[self.axis];
        let outer: usize = shape[..self.axis].iter().product();
        let inner: usize = shape[self.axis + 1..].iter().product();
        let kept = self.kept(d);
        let mut out_shape = shape.clone();
        out_shape[self.axis] = kept;
        let mut output = Tensor::zero::<f32>(&out_shape)?;
        if kept * outer * inner > 0 {
            let input = input.try_as_plain_ram()?;
            let input = input.as_slice::<f32>()?;
            let mut view = output.try_as_plain_ram_mut()?;
            let out = view.as_slice_mut::<f32>()?;
            for (src, dst) in input
                .chunks_exact(d * inner)
                .zip(out.chunks_exact_mut(kept * inner))
            {
                if inner == 1 && self.stride == -1 {
                    dst.copy_from_slice(src);
                    dst.reverse();
                    continue;
                }
                for (j, block) in dst.chunks_exact_mut(inner).enumerate() {
                    let i = self.source(j, d);
                    block.copy_from_slice(&src[i * inner..][..inner]);
                }
            }
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for AxisStep {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == f32::datum_type());
        let mut shape: TVec<TDim> = inputs[0].shape.iter().cloned().collect();
        let d = shape[self.axis].clone();
        shape[self.axis] = if self.stride < 0 {
            d
        } else {
            (d - self.modulo as i64).div_ceil(self.stride as u64)
        };
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}
