//! A direct 2-D convolution for NCHW f32 planes: no im2col matrix, no packing per call.
//!
//! Each image's input channels are copied once into zero-padded planes, split into the
//! stride's phases (one plane per row and column parity for a stride of 2), all with the same
//! row pitch `P`. Output point `(oy, ox)` then sits at `o = oy × P + ox` of a flat output
//! space, and kernel tap `(ky, kx)` reads phase `(ky mod sy, kx mod sx)` at `o + (ky / sy) × P
//! + kx / sx`: for every tap, a run of consecutive outputs reads a run of consecutive inputs,
//! so the kernel is a sum of shifted vectors. The points of the flat space past a row's last
//! output (`ox ≥ ow`, `P - ow` of each row) are computed and thrown away.
//!
//! The inner loop keeps `OCB × V` vector accumulators (six output channels × two vectors of
//! outputs: 12 of AVX2's 16 registers, leaving room for the inputs and the weight without
//! spilling, which three vectors of four channels did) and, per input channel and tap, loads
//! two vectors of input and broadcasts six weights from a layout packed for it: 12 fused
//! multiply-adds for 8 loads. The SIMD is `pulp`'s (safe, dispatched at run time to AVX2/FMA or other targets; the
//! workspace forbids `unsafe`), already in the dependency graph through candle's `gemm`.
//!
//! Every image is computed on its own, with the same order of additions whatever the batch, so
//! an image's answer is the same bits alone or batched.

use std::cell::RefCell;

use pulp::{Simd, WithSimd};

/// Vectors of outputs per block.
const V: usize = 2;

/// The geometry the direct path takes: strides of 1 or 2, no dilation.
pub fn applies(strides: (usize, usize), dilations: (usize, usize)) -> bool {
    dilations == (1, 1) && (1..=2).contains(&strides.0) && (1..=2).contains(&strides.1)
}

/// Output channels per block (six: with two vectors of outputs, 12 accumulators; blocks of
/// four, which waste no channel on 16 or 32 of them, were not faster: performance §19).
const OCB: usize = 6;

/// Weights packed for the kernel: `[co / OCB][ci × kh × kw][OCB]`, the last block's missing
/// channels zero.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed(Vec<f32>);

impl Packed {
    /// Packs `weights`, `[co, k]` row-major.
    pub fn new(weights: &[f32], co: usize, k: usize) -> Packed {
        let blocks = co.div_ceil(OCB);
        let mut values = vec![0f32; blocks * k * OCB];
        for c in 0..co {
            let (b, j) = (c / OCB, c % OCB);
            for t in 0..k {
                values[(b * k + t) * OCB + j] = weights[c * k + t];
            }
        }
        Packed(values)
    }
}

/// One image's convolution geometry (see [`super::kernels`]' `Plane`), reduced to what the
/// direct path needs.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub ci: usize,
    pub co: usize,
    pub h: usize,
    pub w: usize,
    pub oh: usize,
    pub ow: usize,
    pub kh: usize,
    pub kw: usize,
    pub sy: usize,
    pub sx: usize,
    pub pad_top: usize,
    pub pad_left: usize,
}

impl Geometry {
    /// The padded input rows and columns that are read.
    fn padded(&self) -> (usize, usize) {
        (
            (self.oh - 1) * self.sy + self.kh,
            (self.ow - 1) * self.sx + self.kw,
        )
    }

    /// Rows and row pitch of every phase plane.
    fn phase_dims(&self) -> (usize, usize) {
        let (hp, wp) = self.padded();
        (hp.div_ceil(self.sy), wp.div_ceil(self.sx))
    }

    /// Length of the flat output space that holds every output point.
    fn flat_len(&self) -> usize {
        let (_, pitch) = self.phase_dims();
        (self.oh - 1) * pitch + self.ow
    }
}

thread_local! {
    /// The phase planes and the flat output of the convolution running on this thread.
    static BUFFERS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Which SIMD the kernel runs on: the best the CPU has (pulp's run-time dispatch), or plain
/// scalar code (one lane: the path of a CPU without AVX2, checked by the tests on any CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Best,
    #[cfg_attr(not(test), allow(dead_code))]
    Scalar,
}

/// Convolves one image `input` (`[ci, h, w]`) into `out` (`[co, oh, ow]`): bias first, then the
/// ReLU when `relu`.
pub fn convolve(
    isa: Isa,
    g: &Geometry,
    packed: &Packed,
    bias: &[f32],
    relu: bool,
    input: &[f32],
    out: &mut [f32],
) {
    debug_assert!(g.oh > 0 && g.ow > 0 && g.co > 0);
    let (rows, pitch) = g.phase_dims();
    let phases = g.sy * g.sx;
    let plane = rows * pitch;
    let flat = g.flat_len();
    // Whole blocks of V vectors of the widest SIMD type read past the flat space's end.
    let block = V * 16;
    let flat_padded = flat.div_ceil(block) * block;
    let taps = g.kh * g.kw;
    let offsets: Vec<usize> = (0..taps)
        .map(|t| {
            let (ky, kx) = (t / g.kw, t % g.kw);
            let phase = (ky % g.sy) * g.sx + kx % g.sx;
            phase * plane + (ky / g.sy) * pitch + kx / g.sx
        })
        .collect();
    let max_offset = offsets.iter().copied().max().unwrap_or(0);
    let channel = phases * plane;
    // Every read stays inside the buffer: the last input channel's last tap reads up to
    // `max_offset + flat_padded` past its start.
    let needed = (g.ci - 1) * channel + max_offset + flat_padded;
    BUFFERS.with_borrow_mut(|(src, dst)| {
        src.clear();
        src.resize(needed.max(g.ci * channel), 0.0);
        let (hp, wp) = g.padded();
        for c in 0..g.ci {
            let image = &input[c * g.h * g.w..][..g.h * g.w];
            let base = c * channel;
            for y in 0..g.h {
                let py = y + g.pad_top;
                if py >= hp {
                    break;
                }
                // The columns that land inside the padded plane, and where each phase's
                // share of them starts.
                let line = &image[y * g.w..][..g.w.min(wp - g.pad_left)];
                let row = base + (py % g.sy) * g.sx * plane + (py / g.sy) * pitch;
                if g.sx == 1 {
                    src[row + g.pad_left..][..line.len()].copy_from_slice(line);
                    continue;
                }
                for phase in 0..g.sx {
                    // Input columns x with (x + pad_left) mod sx == phase.
                    let first = (phase + g.sx - g.pad_left % g.sx) % g.sx;
                    if first >= line.len() {
                        continue;
                    }
                    let at = row + phase * plane + (first + g.pad_left) / g.sx;
                    let values = line[first..].iter().step_by(g.sx);
                    for (d, &v) in src[at..].iter_mut().zip(values) {
                        *d = v;
                    }
                }
            }
        }
        // Every value read back below is written by the kernel first.
        let len = g.co.div_ceil(OCB) * OCB * flat_padded;
        if dst.len() < len {
            dst.resize(len, 0.0);
        }
        let kernel = Kernel {
            src,
            channel,
            ci: g.ci,
            offsets: &offsets,
            packed: &packed.0,
            bias,
            co: g.co,
            relu,
            dst: &mut dst[..len],
            flat_padded,
        };
        match isa {
            Isa::Best => pulp::Arch::new().dispatch(kernel),
            Isa::Scalar => kernel.with_simd(pulp::Scalar::new()),
        }
        for c in 0..g.co {
            let from = &dst[c * flat_padded..];
            let to = &mut out[c * g.oh * g.ow..][..g.oh * g.ow];
            for (oy, row) in to.chunks_exact_mut(g.ow).enumerate() {
                row.copy_from_slice(&from[oy * pitch..][..g.ow]);
            }
        }
    });
}

struct Kernel<'a> {
    src: &'a [f32],
    /// Values per input channel in `src` (all its phases).
    channel: usize,
    ci: usize,
    /// Per tap: where its reads start in an input channel's phases.
    offsets: &'a [usize],
    packed: &'a [f32],
    bias: &'a [f32],
    co: usize,
    relu: bool,
    /// `[co rounded up to OCB][flat_padded]`.
    dst: &'a mut [f32],
    flat_padded: usize,
}

impl WithSimd for Kernel<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let lanes = S::F32_LANES;
        let width = V * lanes;
        let taps = self.offsets.len();
        let k = self.ci * taps;
        let zero = simd.splat_f32s(0.0);
        let mut o = 0;
        while o < self.flat_padded {
            for (b, weights) in self.packed.chunks_exact(k * OCB).enumerate() {
                let mut acc = [[zero; V]; OCB];
                for (j, row) in acc.iter_mut().enumerate() {
                    let v = self.bias.get(b * OCB + j).copied().unwrap_or(0.0);
                    *row = [simd.splat_f32s(v); V];
                }
                for c in 0..self.ci {
                    let channel = &self.src[c * self.channel + o..];
                    let w = &weights[c * taps * OCB..][..taps * OCB];
                    for (&offset, w) in self.offsets.iter().zip(w.chunks_exact(OCB)) {
                        let x = S::as_simd_f32s(&channel[offset..][..width]).0;
                        let x: [S::f32s; V] = std::array::from_fn(|i| x[i]);
                        for (row, &wj) in acc.iter_mut().zip(w) {
                            let wj = simd.splat_f32s(wj);
                            for (a, &xv) in row.iter_mut().zip(&x) {
                                *a = simd.mul_add_f32s(wj, xv, *a);
                            }
                        }
                    }
                }
                for (j, row) in acc.iter().enumerate() {
                    let c = b * OCB + j;
                    if c >= self.co {
                        break;
                    }
                    let out =
                        S::as_mut_simd_f32s(&mut self.dst[c * self.flat_padded + o..][..width]).0;
                    for (d, &a) in out.iter_mut().zip(row) {
                        *d = if self.relu { simd.max_f32s(a, zero) } else { a };
                    }
                }
            }
            o += width;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The convolution by its definition (zero padding, one output at a time, f64 sums).
    fn reference(g: &Geometry, weights: &[f32], bias: &[f32], relu: bool, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; g.co * g.oh * g.ow];
        for c in 0..g.co {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let mut sum = bias[c] as f64;
                    for i in 0..g.ci {
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                let y = (oy * g.sy + ky) as isize - g.pad_top as isize;
                                let xx = (ox * g.sx + kx) as isize - g.pad_left as isize;
                                if y < 0 || xx < 0 || y >= g.h as isize || xx >= g.w as isize {
                                    continue;
                                }
                                let w = weights[((c * g.ci + i) * g.kh + ky) * g.kw + kx];
                                let v = x[(i * g.h + y as usize) * g.w + xx as usize];
                                sum += w as f64 * v as f64;
                            }
                        }
                    }
                    let v = sum as f32;
                    out[(c * g.oh + oy) * g.ow + ox] = if relu { v.max(0.0) } else { v };
                }
            }
        }
        out
    }

    #[test]
    fn every_geometry_equals_the_definition_on_the_best_simd_and_on_scalar_code() {
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(19);
        // (ci, co, h, w, kh, kw, sy, sx, pad_top, pad_left, pad_bottom, pad_right, relu)
        let cases = [
            (1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, false),
            (3, 7, 10, 9, 3, 3, 1, 1, 1, 1, 1, 1, true),
            (4, 6, 11, 10, 3, 3, 2, 2, 1, 0, 0, 1, false),
            (2, 13, 17, 23, 7, 7, 2, 2, 3, 3, 3, 3, true),
            (5, 5, 9, 12, 3, 2, 1, 2, 0, 1, 2, 0, false),
            (2, 3, 5, 4, 3, 3, 2, 2, 4, 3, 4, 5, false),
            (33, 12, 6, 5, 1, 1, 1, 1, 0, 0, 0, 0, true),
            (6, 4, 40, 3, 5, 1, 2, 1, 2, 0, 2, 0, false),
        ];
        for (ci, co, h, w, kh, kw, sy, sx, pt, pl, pb, pr, relu) in cases {
            let oh = (h + pt + pb - kh) / sy + 1;
            let ow = (w + pl + pr - kw) / sx + 1;
            let g = Geometry {
                ci,
                co,
                h,
                w,
                oh,
                ow,
                kh,
                kw,
                sy,
                sx,
                pad_top: pt,
                pad_left: pl,
            };
            let k = ci * kh * kw;
            let weights: Vec<f32> = (0..co * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let bias: Vec<f32> = (0..co).map(|_| rng.random_range(-1.0..1.0)).collect();
            let x: Vec<f32> = (0..ci * h * w)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let packed = Packed::new(&weights, co, k);
            let expected = reference(&g, &weights, &bias, relu, &x);
            for isa in [Isa::Best, Isa::Scalar] {
                let mut out = vec![f32::NAN; co * oh * ow];
                convolve(isa, &g, &packed, &bias, relu, &x, &mut out);
                for (i, (a, e)) in out.iter().zip(&expected).enumerate() {
                    assert!(
                        (a - e).abs() <= 1e-5 * (1.0 + e.abs() * k as f32),
                        "{g:?} {isa:?}: output {i} is {a}, expected {e}"
                    );
                }
            }
        }
    }
}
