//! A direct 2-D convolution for NCHW f32 planes with explicit SIMD: no im2col matrix, no
//! packing per call, for strides of 1 and 2 without dilation.
//!
//! Two layouts of the same sum, chosen per convolution when the model is planned (its planes'
//! sizes are known then), both holding 12 vector accumulators (two vectors × six, within
//! AVX2's 16 registers; the channels layout on AVX-512: one vector × twelve points) and
//! doing, per input channel and tap, 12 fused multiply-adds:
//!
//! - **points** (`points.rs`): vectors along a row's output points, six output channels at a
//!   time, stored straight into the output rows; the padding columns of every row are computed
//!   too (a 7-wide plane computes 9 or more per row) and channels are taken six at a time;
//! - **channels** (`channels.rs`): vectors along 16 output channels, six output points at a
//!   time (twelve on AVX-512); nothing outside the output is computed, but the accumulators
//!   go back into the output planes transposed, one value at a time.
//!
//! [`Packed::new`] takes channels, but for a convolution of stride 1 whose outputs sum fewer
//! than [`FEW_TAPS`] taps (a first layer over a one- or three-channel image), where the
//! transposed stores cost more than the points layout's padding columns: measured node by
//! node on the bundles and ResNet-50 (docs/performance.md §20).
//!
//! The SIMD is `pulp`'s (safe, dispatched at run time to AVX-512 (16 lanes: one vector per
//! 16 channels, its `x86-v4` feature, stable Rust since 1.89), AVX2/FMA, NEON, or plain
//! scalar code; the workspace forbids `unsafe`), already in the dependency graph through
//! candle's `gemm`. AVX-512 where the CPU has it: 3–11 % less time than AVX2 on the bundles
//! and ResNet-50 (docs/performance.md §20.2). Every image is computed on its own, with the same order of additions whatever the
//! batch, so an image's answer is the same bits alone or batched.

mod channels;
mod points;

use super::Plane;

/// The geometry the direct path takes: strides of 1 or 2, no dilation.
pub fn applies(strides: (usize, usize), dilations: (usize, usize)) -> bool {
    dilations == (1, 1) && (1..=2).contains(&strides.0) && (1..=2).contains(&strides.1)
}

/// Which SIMD the kernel runs on: the best the CPU has (pulp's run-time dispatch: AVX-512 on
/// a CPU that has it, AVX2 on one that has only that), or, for the tests, AVX2 where the best
/// is wider, and plain scalar code (one lane: the path of a CPU without AVX2) on any CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Best,
    #[cfg(all(test, target_arch = "x86_64"))]
    Avx2,
    #[cfg_attr(not(test), allow(dead_code))]
    Scalar,
}

impl Isa {
    /// Runs `kernel` on this SIMD.
    fn run<K: pulp::WithSimd>(self, kernel: K) -> K::Output {
        match self {
            Isa::Best => pulp::Arch::new().dispatch(kernel),
            #[cfg(all(test, target_arch = "x86_64"))]
            Isa::Avx2 => {
                let v3 = pulp::x86::V3::try_new()
                    .expect("the test asks for AVX2 only where the CPU has it");
                // `Simd`'s `vectorize` (V3's own takes a closure): with AVX2 enabled.
                <pulp::x86::V3 as pulp::Simd>::vectorize(v3, kernel)
            }
            Isa::Scalar => kernel.with_simd(pulp::Scalar::new()),
        }
    }

    /// The `f32` lanes of this SIMD's vectors.
    fn lanes(self) -> usize {
        struct Lanes;
        impl pulp::WithSimd for Lanes {
            type Output = usize;
            fn with_simd<S: pulp::Simd>(self, _: S) -> usize {
                S::F32_LANES
            }
        }
        self.run(Lanes)
    }
}

/// Below this many taps per output (input channels × kernel taps), a stride-1 convolution
/// runs in the points layout.
pub const FEW_TAPS: usize = 64;

/// How a convolution's outputs are held in the vector registers (the module's notes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Points,
    Channels,
}

/// The weights and bias of one convolution, packed for its layout: weights `[co / block][ci ×
/// taps][block]`, bias `[co rounded up to block]`, where a block is the output channels the
/// layout computes at once; the last block's missing channels zero.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    layout: Layout,
    values: Vec<f32>,
    bias: Vec<f32>,
    ci: usize,
    co: usize,
}

impl Packed {
    /// Packs `weights` (`[co, ci × taps]`, row-major) and `bias` (`co` values) for the layout
    /// that suits a convolution of geometry `p` (the module's notes).
    pub fn new(weights: &[f32], bias: &[f32], ci: usize, co: usize, p: &Plane) -> Packed {
        let taps = p.kh * p.kw;
        let layout = if p.sy > 1 || p.sx > 1 || ci * taps >= FEW_TAPS {
            Layout::Channels
        } else {
            Layout::Points
        };
        Packed::for_layout(layout, weights, bias, ci, co, taps)
    }

    fn for_layout(
        layout: Layout,
        weights: &[f32],
        bias: &[f32],
        ci: usize,
        co: usize,
        taps: usize,
    ) -> Packed {
        let block = match layout {
            Layout::Points => points::OCB,
            Layout::Channels => channels::OCB,
        };
        let k = ci * taps;
        let blocks = co.div_ceil(block);
        let mut values = vec![0f32; blocks * k * block];
        for c in 0..co {
            let (b, j) = (c / block, c % block);
            for t in 0..k {
                values[(b * k + t) * block + j] = weights[c * k + t];
            }
        }
        let mut padded_bias = vec![0f32; blocks * block];
        padded_bias[..co].copy_from_slice(&bias[..co]);
        Packed {
            layout,
            values,
            bias: padded_bias,
            ci,
            co,
        }
    }
}

/// The padded input rows and columns of `p` that are read.
fn padded(p: &Plane) -> (usize, usize) {
    ((p.oh - 1) * p.sy + p.kh, (p.ow - 1) * p.sx + p.kw)
}

/// Convolves the images of `input` (`[batch, ci, h, w]`) into `out` (`[batch, co, oh, ow]`),
/// one at a time: the packed bias first, then the ReLU when `relu`. `p` has no dilation and
/// strides of 1 or 2 ([`applies`]).
pub fn convolve(isa: Isa, p: &Plane, packed: &Packed, relu: bool, input: &[f32], out: &mut [f32]) {
    match packed.layout {
        Layout::Points => points::convolve(isa, p, packed, relu, input, out),
        Layout::Channels => channels::convolve(isa, p, packed, relu, input, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The convolution by its definition (zero padding, one output at a time, f64 sums).
    fn reference(
        p: &Plane,
        (ci, co): (usize, usize),
        weights: &[f32],
        bias: &[f32],
        relu: bool,
        x: &[f32],
    ) -> Vec<f32> {
        let mut out = vec![0f32; co * p.oh * p.ow];
        for c in 0..co {
            for oy in 0..p.oh {
                for ox in 0..p.ow {
                    let mut sum = bias[c] as f64;
                    for i in 0..ci {
                        for ky in 0..p.kh {
                            for kx in 0..p.kw {
                                let y = (oy * p.sy + ky) as isize - p.pad_top as isize;
                                let xx = (ox * p.sx + kx) as isize - p.pad_left as isize;
                                if y < 0 || xx < 0 || y >= p.h as isize || xx >= p.w as isize {
                                    continue;
                                }
                                let w = weights[((c * ci + i) * p.kh + ky) * p.kw + kx];
                                let v = x[(i * p.h + y as usize) * p.w + xx as usize];
                                sum += w as f64 * v as f64;
                            }
                        }
                    }
                    let v = sum as f32;
                    out[(c * p.oh + oy) * p.ow + ox] = if relu { v.max(0.0) } else { v };
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
            // More input channels than one pass of the channels layout takes (28 of 3 × 3).
            (61, 17, 9, 8, 3, 3, 1, 1, 1, 1, 1, 1, true),
            (45, 16, 8, 9, 3, 3, 2, 2, 1, 1, 1, 1, false),
            // Rows of several blocks (29 points: 10 + 10 + 9 on AVX-512, five on AVX2).
            (8, 16, 4, 29, 3, 3, 1, 1, 1, 1, 1, 1, true),
            // 1 × 1, stride 1, no padding: the planes as one row of panels; in one pass and
            // in two (more than 256 input channels).
            (70, 20, 5, 7, 1, 1, 1, 1, 0, 0, 0, 0, true),
            (300, 17, 3, 5, 1, 1, 1, 1, 0, 0, 0, 0, false),
        ];
        for (ci, co, h, w, kh, kw, sy, sx, pt, pl, pb, pr, relu) in cases {
            let oh = (h + pt + pb - kh) / sy + 1;
            let ow = (w + pl + pr - kw) / sx + 1;
            let p = Plane {
                h,
                w,
                oh,
                ow,
                kh,
                kw,
                sy,
                sx,
                dy: 1,
                dx: 1,
                pad_top: pt,
                pad_left: pl,
            };
            let k = ci * kh * kw;
            let weights: Vec<f32> = (0..co * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let bias: Vec<f32> = (0..co).map(|_| rng.random_range(-1.0..1.0)).collect();
            let x: Vec<f32> = (0..ci * h * w)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let expected = reference(&p, (ci, co), &weights, &bias, relu, &x);
            let layouts = [Layout::Points, Layout::Channels]
                .map(|layout| Packed::for_layout(layout, &weights, &bias, ci, co, kh * kw));
            let mut isas = vec![Isa::Best, Isa::Scalar];
            // The AVX2 path too where the best is AVX-512.
            #[cfg(target_arch = "x86_64")]
            if pulp::x86::V3::try_new().is_some() {
                isas.push(Isa::Avx2);
            }
            for isa in isas {
                let outputs = layouts.each_ref().map(|packed| {
                    let mut out = vec![f32::NAN; co * oh * ow];
                    convolve(isa, &p, packed, relu, &x, &mut out);
                    out
                });
                for (i, (a, e)) in outputs[0].iter().zip(&expected).enumerate() {
                    assert!(
                        (a - e).abs() <= 1e-5 * (1.0 + e.abs() * k as f32),
                        "{p:?} {isa:?}: output {i} is {a}, expected {e}"
                    );
                }
                // The same multiply-adds in the same order: the same bits in either layout,
                // whichever one the plan picks.
                assert_eq!(outputs[0], outputs[1], "{p:?} {isa:?}");
            }
        }
    }
}
