//! The direct convolution with vectors along the output points (`super`'s "points" layout).
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
//! multiply-adds for 8 loads, and the accumulators are stored straight into the output rows.

use std::cell::RefCell;

use pulp::{Simd, WithSimd};

use super::{Isa, Packed, Plane, padded};

/// Vectors of outputs per block.
const V: usize = 2;

/// Output channels per block (six: with two vectors of outputs, 12 accumulators; blocks of
/// four, which waste no channel on 16 or 32 of them, were not faster: performance §19).
pub(super) const OCB: usize = 6;

/// Rows and row pitch of every phase plane.
fn phase_dims(p: &Plane) -> (usize, usize) {
    let (hp, wp) = padded(p);
    (hp.div_ceil(p.sy), wp.div_ceil(p.sx))
}

thread_local! {
    /// The phase planes and the flat output of the convolution running on this thread.
    static BUFFERS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// [`super::convolve`] in the points layout.
pub fn convolve(isa: Isa, p: &Plane, packed: &Packed, relu: bool, input: &[f32], out: &mut [f32]) {
    let (ci, co) = (packed.ci, packed.co);
    debug_assert!(p.oh > 0 && p.ow > 0 && co > 0 && (p.dy, p.dx) == (1, 1));
    let (rows, pitch) = phase_dims(p);
    let phases = p.sy * p.sx;
    let plane = rows * pitch;
    // The flat output space that holds every output point, in whole blocks of V vectors of
    // the widest SIMD type (they read past its end).
    let flat = (p.oh - 1) * pitch + p.ow;
    let block = V * 16;
    let flat_padded = flat.div_ceil(block) * block;
    let taps = p.kh * p.kw;
    let offsets: Vec<usize> = (0..taps)
        .map(|t| {
            let (ky, kx) = (t / p.kw, t % p.kw);
            let phase = (ky % p.sy) * p.sx + kx % p.sx;
            phase * plane + (ky / p.sy) * pitch + kx / p.sx
        })
        .collect();
    let max_offset = offsets.iter().copied().max().unwrap_or(0);
    let channel = phases * plane;
    // Every read stays inside the buffer: the last input channel's last tap reads up to
    // `max_offset + flat_padded` past its start.
    let needed = ((ci - 1) * channel + max_offset + flat_padded).max(ci * channel);
    let (hp, wp) = padded(p);
    BUFFERS.with_borrow_mut(|(src, dst)| {
        // Every value of `dst` read back below is written by the kernel first.
        let len = co.div_ceil(OCB) * OCB * flat_padded;
        if dst.len() < len {
            dst.resize(len, 0.0);
        }
        for (image, out) in input
            .chunks_exact(ci * p.h * p.w)
            .zip(out.chunks_exact_mut(co * p.oh * p.ow))
        {
            src.clear();
            src.resize(needed, 0.0);
            for c in 0..ci {
                let image = &image[c * p.h * p.w..][..p.h * p.w];
                let base = c * channel;
                for y in 0..p.h {
                    let py = y + p.pad_top;
                    if py >= hp {
                        break;
                    }
                    // The columns that land inside the padded plane, and where each phase's
                    // share of them starts.
                    let line = &image[y * p.w..][..p.w.min(wp - p.pad_left)];
                    let row = base + (py % p.sy) * p.sx * plane + (py / p.sy) * pitch;
                    if p.sx == 1 {
                        src[row + p.pad_left..][..line.len()].copy_from_slice(line);
                        continue;
                    }
                    for phase in 0..p.sx {
                        // Input columns x with (x + pad_left) mod sx == phase.
                        let first = (phase + p.sx - p.pad_left % p.sx) % p.sx;
                        if first >= line.len() {
                            continue;
                        }
                        let at = row + phase * plane + (first + p.pad_left) / p.sx;
                        let values = line[first..].iter().step_by(p.sx);
                        for (d, &v) in src[at..].iter_mut().zip(values) {
                            *d = v;
                        }
                    }
                }
            }
            let kernel = Kernel {
                src,
                channel,
                ci,
                offsets: &offsets,
                packed: &packed.values,
                bias: &packed.bias,
                co,
                relu,
                dst: &mut dst[..len],
                flat_padded,
            };
            isa.run(kernel);
            for c in 0..co {
                let from = &dst[c * flat_padded..];
                let to = &mut out[c * p.oh * p.ow..][..p.oh * p.ow];
                for (oy, row) in to.chunks_exact_mut(p.ow).enumerate() {
                    row.copy_from_slice(&from[oy * pitch..][..p.ow]);
                }
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
    /// `co` rounded up to OCB.
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
                    let v = self.bias[b * OCB + j];
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
