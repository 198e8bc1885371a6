//! The direct convolution with vectors along the output channels (`super`'s "channels"
//! layout).
//!
//! Each image's input channels are copied once into zero-padded planes (the rows and columns
//! the convolution reads, one row pitch for all). The kernel computes blocks of up to `PX`
//! neighbouring outputs of one output row for `OCB` (16) output channels at once: the
//! accumulators hold, per output point, the 16 channels in vectors (one of AVX-512's, so
//! twelve points × one vector = 12 of its 32 registers; two of AVX2's, so six points × two
//! vectors = 12 of its 16), and per input channel and tap it loads the 16 packed weights of
//! that tap (one or two vectors), broadcasts the input value each point reads, and does 12
//! fused multiply-adds. Nothing is computed for points outside the output (a row's last
//! block is as wide as what is left of it) and no channel is wasted when the output channels
//! are a multiple of 16; a stride only changes which input values are broadcast. The price: the accumulators go back into the output planes transposed, one
//! value at a time.
//!
//! A block streams its 16 channels' weights of every input channel and tap (64 bytes a tap):
//! with many input channels (ResNet-50's 3 × 3 layers read 36–295 KB) they would not stay in
//! the L1 cache from one block to the next, so such a convolution runs in passes over groups
//! of input channels whose weights fit in [`WEIGHT_BYTES`], the sums of every point kept
//! between passes in the layout of the accumulators (the same additions in the same order).

use std::cell::RefCell;

use pulp::{Simd, WithSimd};

use super::{Isa, Packed, Plane, padded};

/// Output points per block, at most: 12 accumulators, whatever the vectors' width (16
/// channels in one vector of AVX-512: twelve points; in two of AVX2: six, within its 16
/// registers). With fewer, AVX-512's fused multiply-adds wait on each other (four cycles of
/// latency on two ports want eight in flight): twelve points instead of six took
/// less time there (docs/performance.md §20.3).
const fn points_per_block(lanes: usize) -> usize {
    if lanes == OCB { 12 } else { 6 }
}

/// Output channels per block: one vector of AVX-512, two of AVX2, four of NEON.
pub(super) const OCB: usize = 16;

/// The packed weights one pass over the output points reads, at most (with the input rows
/// it reads beside them, within a 32 KiB L1 data cache): a convolution with more input
/// channels runs in passes over groups of them, the sums so far kept in `partial`.
const WEIGHT_BYTES: usize = 16 * 1024;

thread_local! {
    /// The padded input planes and the partial sums (`[point][OCB]`) of the convolution
    /// running on this thread.
    static BUFFERS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// [`super::convolve`] in the channels layout.
pub fn convolve(isa: Isa, p: &Plane, packed: &Packed, relu: bool, input: &[f32], out: &mut [f32]) {
    let (ci, co) = (packed.ci, packed.co);
    debug_assert!(p.oh > 0 && p.ow > 0 && co > 0 && (p.dy, p.dx) == (1, 1));
    // A 1 × 1 convolution of stride 1 without padding reads point q of every input plane for
    // output point q: its planes are one long row, cut into blocks without row ends.
    let pointwise = (p.kh, p.kw, p.sy, p.sx, p.pad_top, p.pad_left) == (1, 1, 1, 1, 0, 0)
        && (p.oh, p.ow) == (p.h, p.w);
    let flat;
    let p = if pointwise {
        let n = p.h * p.w;
        flat = Plane {
            h: 1,
            w: n,
            oh: 1,
            ow: n,
            ..*p
        };
        &flat
    } else {
        p
    };
    let (hp, wp) = padded(p);
    // Nothing to pad (no padding, and the planes end where the kernel's reach does): the
    // images are read where they are.
    let unpadded = p.pad_top == 0 && p.pad_left == 0 && (hp, wp) == (p.h, p.w);
    let plane = hp * wp;
    let taps = p.kh * p.kw;
    let group = (WEIGHT_BYTES / (taps * OCB * size_of::<f32>())).clamp(1, ci);
    // The pointwise panels are cut as the kernel will cut the row.
    let px = if pointwise {
        points_per_block(isa.lanes())
    } else {
        0
    };
    BUFFERS.with_borrow_mut(|(buffer, partial)| {
        if group < ci {
            partial.resize(p.oh * p.ow * OCB, 0.0);
        }
        for (image, out) in input
            .chunks_exact(ci * p.h * p.w)
            .zip(out.chunks_exact_mut(co * p.oh * p.ow))
        {
            let src: &[f32] = if pointwise {
                as_panels(image, ci, p.ow, px, buffer);
                buffer
            } else if unpadded {
                image
            } else {
                pad(image, ci, p, buffer);
                buffer
            };
            let kernel = Kernel {
                src,
                panels: pointwise,
                partial,
                group,
                p,
                wp,
                plane,
                ci,
                co,
                packed: &packed.values,
                biases: &packed.bias,
                relu,
                out,
            };
            isa.run(kernel);
        }
    });
}

/// Copies one image's `ci` planes of `n` points (a pointwise convolution's) into `buffer` as
/// panels: each block's points side by side, channel after channel (`[ci][width]` per block,
/// the blocks as the kernel cuts the row: up to `px` points), so that the kernel reads them
/// in order instead of one value per channel plane.
fn as_panels(image: &[f32], ci: usize, n: usize, px: usize, buffer: &mut Vec<f32>) {
    buffer.clear();
    buffer.resize(ci * n, 0.0);
    let blocks = n.div_ceil(px);
    let mut x0 = 0;
    for block in 0..blocks {
        let width = n / blocks + usize::from(block < n % blocks);
        let panel = &mut buffer[ci * x0..][..ci * width];
        for (c, values) in panel.chunks_exact_mut(width).enumerate() {
            values.copy_from_slice(&image[c * n + x0..][..width]);
        }
        x0 += width;
    }
}

/// Copies one image's `ci` planes into `buffer` as the zero-padded planes (the rows and
/// columns of [`padded`]) the kernel reads.
fn pad(image: &[f32], ci: usize, p: &Plane, buffer: &mut Vec<f32>) {
    let (hp, wp) = padded(p);
    let plane = hp * wp;
    buffer.clear();
    buffer.resize(ci * plane, 0.0);
    if p.pad_left >= wp {
        return;
    }
    for c in 0..ci {
        let image = &image[c * p.h * p.w..][..p.h * p.w];
        for y in 0..p.h.min(hp.saturating_sub(p.pad_top)) {
            let line = &image[y * p.w..][..p.w.min(wp - p.pad_left)];
            buffer[c * plane + (y + p.pad_top) * wp + p.pad_left..][..line.len()]
                .copy_from_slice(line);
        }
    }
}

struct Kernel<'a> {
    /// The padded planes of one image: `ci` planes of `plane` values, rows of `wp`.
    src: &'a [f32],
    /// Whether `src` holds a pointwise convolution's input as panels (`[ci][width]` per
    /// block of points) rather than planes.
    panels: bool,
    /// The sums so far of every output point (`[oh × ow][OCB]`) between passes over groups
    /// of input channels.
    partial: &'a mut [f32],
    /// Input channels per pass.
    group: usize,
    p: &'a Plane,
    wp: usize,
    plane: usize,
    ci: usize,
    co: usize,
    packed: &'a [f32],
    /// `co` rounded up to OCB.
    biases: &'a [f32],
    relu: bool,
    /// `[co, oh, ow]`.
    out: &'a mut [f32],
}

impl WithSimd for Kernel<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        // Vectors per block of OCB channels, the horizontal stride, points per block.
        const WIDE: usize = points_per_block(16);
        const NARROW: usize = points_per_block(8);
        const { assert!(points_per_block(4) == NARROW && points_per_block(1) == NARROW) };
        match (S::F32_LANES, self.p.sx) {
            (16, 1) => self.run::<S, 1, 1, WIDE>(simd),
            (16, _) => self.run::<S, 1, 2, WIDE>(simd),
            (8, 1) => self.run::<S, 2, 1, NARROW>(simd),
            (8, _) => self.run::<S, 2, 2, NARROW>(simd),
            (4, 1) => self.run::<S, 4, 1, NARROW>(simd),
            (4, _) => self.run::<S, 4, 2, NARROW>(simd),
            (1, 1) => self.run::<S, 16, 1, NARROW>(simd),
            (1, _) => self.run::<S, 16, 2, NARROW>(simd),
            // No pulp target has another width; plain scalar code if one ever does.
            _ => self.with_simd(pulp::Scalar::new()),
        }
    }
}

impl Kernel<'_> {
    /// The whole image, `NV` vectors per OCB channels, horizontal stride `SX`, up to `PX`
    /// points per block: 3 × 3 kernels (nearly every convolution of the bundles and
    /// ResNet-50) and 1 × 1 ones with the kernel's size known to the compiler (tap loops
    /// unrolled, no bounds checks inside them), others not.
    #[inline(always)]
    fn run<S: Simd, const NV: usize, const SX: usize, const PX: usize>(self, simd: S) {
        match (self.p.kh, self.p.kw) {
            (3, 3) => self.image::<S, NV, SX, 3, PX>(simd),
            (1, 1) => self.image::<S, NV, SX, 1, PX>(simd),
            _ => self.image::<S, NV, SX, 0, PX>(simd),
        }
    }

    /// The whole image, with a `K` × `K` kernel (0: the plane's own size).
    #[inline(always)]
    fn image<S: Simd, const NV: usize, const SX: usize, const K: usize, const PX: usize>(
        mut self,
        simd: S,
    ) {
        let p = *self.p;
        let k = self.ci * p.kh * p.kw;
        for (b, (weights, bias)) in self
            .packed
            .chunks_exact(k * OCB)
            .zip(self.biases.chunks_exact(OCB))
            .enumerate()
        {
            let bias = S::as_simd_f32s(bias).0;
            let bias: [S::f32s; NV] = std::array::from_fn(|i| bias[i]);
            let channels = (self.co - b * OCB).min(OCB);
            for from in (0..self.ci).step_by(self.group) {
                let inputs = from..(from + self.group).min(self.ci);
                for oy in 0..p.oh {
                    // The row in blocks of as equal widths as can be: a block of one or two
                    // points has too few accumulators to hide the multiply-adds' latency (a
                    // 7-wide row, six points per block, as 4 + 3, not 6 + 1).
                    let blocks = p.ow.div_ceil(PX);
                    let mut x0 = 0;
                    for block in 0..blocks {
                        let at = At {
                            oy,
                            x0,
                            first: b * OCB,
                            channels,
                            inputs: inputs.clone(),
                        };
                        let n = p.ow / blocks + usize::from(block < p.ow % blocks);
                        match n {
                            12 => self.block::<S, NV, SX, K, 12>(simd, weights, bias, at.clone()),
                            11 => self.block::<S, NV, SX, K, 11>(simd, weights, bias, at.clone()),
                            10 => self.block::<S, NV, SX, K, 10>(simd, weights, bias, at.clone()),
                            9 => self.block::<S, NV, SX, K, 9>(simd, weights, bias, at.clone()),
                            8 => self.block::<S, NV, SX, K, 8>(simd, weights, bias, at.clone()),
                            7 => self.block::<S, NV, SX, K, 7>(simd, weights, bias, at.clone()),
                            6 => self.block::<S, NV, SX, K, 6>(simd, weights, bias, at.clone()),
                            5 => self.block::<S, NV, SX, K, 5>(simd, weights, bias, at.clone()),
                            4 => self.block::<S, NV, SX, K, 4>(simd, weights, bias, at.clone()),
                            3 => self.block::<S, NV, SX, K, 3>(simd, weights, bias, at.clone()),
                            2 => self.block::<S, NV, SX, K, 2>(simd, weights, bias, at.clone()),
                            _ => self.block::<S, NV, SX, K, 1>(simd, weights, bias, at.clone()),
                        }
                        x0 += n;
                    }
                }
            }
        }
    }

    /// `N` neighbouring outputs of row `at.oy` from column `at.x0`, for the OCB channels from
    /// `at.first` whose packed weights are `weights` (`[ci × taps][OCB]`).
    #[inline(always)]
    fn block<S: Simd, const NV: usize, const SX: usize, const K: usize, const N: usize>(
        &mut self,
        simd: S,
        weights: &[f32],
        bias: [S::f32s; NV],
        at: At,
    ) {
        let p = self.p;
        let (kh, kw) = if K > 0 { (K, K) } else { (p.kh, p.kw) };
        // The values of a row that the block's taps read: (x0 + N - 1) × SX + kw - 1 is at
        // most the padded width's last column.
        let span = (N - 1) * SX + kw;
        // The sums so far: the bias on the first pass over the input channels, what the last
        // pass left on the others (the same additions in the same order either way).
        let point = at.oy * p.ow + at.x0;
        let mut acc = [bias; N];
        if at.inputs.start > 0 {
            let partial = &self.partial[point * OCB..][..N * OCB];
            for (acc, partial) in acc.iter_mut().zip(partial.chunks_exact(OCB)) {
                let partial = S::as_simd_f32s(partial).0;
                *acc = std::array::from_fn(|i| partial[i]);
            }
        }
        if K == 1 && self.panels {
            let panel = &self.src[self.ci * at.x0..][..self.ci * N];
            let inputs = at.inputs.len();
            let xs = &panel[at.inputs.start * N..][..inputs * N];
            let ws = &weights[at.inputs.start * OCB..][..inputs * OCB];
            for (x, w) in xs.chunks_exact(N).zip(ws.chunks_exact(OCB)) {
                tap(simd, &mut acc, w, x.iter().copied());
            }
        } else {
            for c in at.inputs.clone() {
                let channel = &self.src[c * self.plane..][..self.plane];
                let weights = &weights[c * kh * kw * OCB..][..kh * kw * OCB];
                for ky in 0..kh {
                    let row = &channel[(at.oy * p.sy + ky) * self.wp + at.x0 * SX..][..span];
                    let w = &weights[ky * kw * OCB..][..kw * OCB];
                    for (kx, w) in w.chunks_exact(OCB).enumerate() {
                        let x = &row[kx..][..(N - 1) * SX + 1];
                        tap(simd, &mut acc, w, (0..N).map(|j| x[j * SX]));
                    }
                }
            }
        }
        if at.inputs.end < self.ci {
            let partial = &mut self.partial[point * OCB..][..N * OCB];
            for (acc, partial) in acc.iter().zip(partial.chunks_exact_mut(OCB)) {
                let partial = S::as_mut_simd_f32s(partial).0;
                for (d, &a) in partial.iter_mut().zip(acc) {
                    *d = a;
                }
            }
            return;
        }
        // Transposed into the output planes: point j of channel `first + i` is lane i of the
        // point's accumulators.
        let zero = simd.splat_f32s(0.0);
        let mut lanes = [[0f32; OCB]; N];
        for (point, acc) in lanes.iter_mut().zip(&acc) {
            let point = S::as_mut_simd_f32s(point).0;
            for (d, &a) in point.iter_mut().zip(acc) {
                *d = if self.relu { simd.max_f32s(a, zero) } else { a };
            }
        }
        let plane = p.oh * p.ow;
        for i in 0..at.channels {
            let out = &mut self.out[(at.first + i) * plane + at.oy * p.ow + at.x0..][..N];
            for (o, point) in out.iter_mut().zip(&lanes) {
                *o = point[i];
            }
        }
    }
}

/// One tap of a block: for every point j, `acc[j] += w × x_j`, where `w` is the tap's OCB
/// weights and `x` yields the points' input values.
#[inline(always)]
fn tap<S: Simd, const NV: usize, const N: usize>(
    simd: S,
    acc: &mut [[S::f32s; NV]; N],
    w: &[f32],
    x: impl Iterator<Item = f32>,
) {
    let w = S::as_simd_f32s(w).0;
    let w: [S::f32s; NV] = std::array::from_fn(|i| w[i]);
    for (acc, xj) in acc.iter_mut().zip(x) {
        let xj = simd.splat_f32s(xj);
        for (a, &wv) in acc.iter_mut().zip(&w) {
            *a = simd.mul_add_f32s(wv, xj, *a);
        }
    }
}

/// Where a block's outputs go: row `oy` from column `x0`, channels `first..first + channels`,
/// summed over the input channels `inputs` in this pass.
#[derive(Clone)]
struct At {
    oy: usize,
    x0: usize,
    first: usize,
    channels: usize,
    inputs: std::ops::Range<usize>,
}
