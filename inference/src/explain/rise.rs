//! RISE (Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of
//! Black-box Models", BMVC 2018): score the image under many random smooth masks and weigh
//! each mask by the score it kept.
//!
//! Mask `i`: a `(g+1)×(g+1)` grid of cells kept with probability `p`, upsampled bilinearly
//! (cell centres at `(k + ½)·C`, `C = ⌈H/g⌉` by `⌈W/g⌉` pixels) and shifted by a random
//! offset in `[0, C)` before being cropped to `H×W`. The masked image is
//! `x·M + baseline·(1 − M)` on every channel. The saliency is
//! `S = Σᵢ score(masked image i)·Mᵢ / (N·p)` (the paper's estimator of
//! `E[score | pixel kept]`). Each mask comes from its own seeded generator, so a map is
//! reproducible from `(seed, samples, grid, p)`.

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use super::{ExplainError, Explanation, ImageShape, Perturber};

/// How to sample masks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RiseOptions {
    /// Number of masks (forward passes).
    pub samples: usize,
    /// Cells per side of the low-resolution grid.
    pub grid: usize,
    /// Probability that a cell is kept.
    pub keep: f64,
    /// The value the masked-out pixels fade to.
    pub baseline: f32,
    pub seed: u64,
}

impl Default for RiseOptions {
    fn default() -> Self {
        RiseOptions {
            samples: 1000,
            grid: 8,
            keep: 0.5,
            baseline: 0.0,
            seed: 0,
        }
    }
}

impl RiseOptions {
    /// What [`Rise::new`] refuses of the options for an image of `shape`, checked before any
    /// forward pass (the prediction included).
    pub fn check(&self, shape: ImageShape) -> Result<(), ExplainError> {
        if self.samples == 0 {
            return Err(ExplainError::Invalid(
                "rise: samples must be at least 1".into(),
            ));
        }
        if self.grid == 0 || self.grid > shape.height.min(shape.width) {
            return Err(ExplainError::Invalid(format!(
                "rise: grid must be 1..={} cells for a {}×{} image",
                shape.height.min(shape.width),
                shape.height,
                shape.width
            )));
        }
        if !(self.keep > 0.0 && self.keep <= 1.0) {
            return Err(ExplainError::Invalid(
                "rise: keep (p) must be in (0, 1]".into(),
            ));
        }
        if !self.baseline.is_finite() {
            return Err(ExplainError::Invalid(
                "rise: the baseline must be finite".into(),
            ));
        }
        Ok(())
    }
}

/// RISE of one image.
pub struct Rise {
    x: Vec<f32>,
    shape: ImageShape,
    options: RiseOptions,
    handed: usize,
    absorbed: usize,
    sum: Vec<f64>,
    mask: Vec<f32>,
    /// Masks of the rows handed out and not yet scored (at most the rows in flight).
    pending: std::collections::VecDeque<Vec<f32>>,
}

impl Rise {
    /// `x`: the image (`C·H·W` values).
    pub fn new(x: Vec<f32>, shape: ImageShape, options: RiseOptions) -> Result<Self, ExplainError> {
        shape.check(&x)?;
        options.check(shape)?;
        Ok(Rise {
            x,
            shape,
            options,
            handed: 0,
            absorbed: 0,
            sum: vec![0.0; shape.pixels()],
            mask: vec![0.0; shape.pixels()],
            pending: std::collections::VecDeque::new(),
        })
    }

    /// Writes mask `i` into `self.mask`.
    fn make_mask(&mut self, i: usize) {
        let g = self.options.grid;
        let (h, w) = (self.shape.height, self.shape.width);
        // One generator per mask: masks do not depend on how the rows were batched.
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(
            self.options
                .seed
                .wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        );
        let cells: Vec<f32> = (0..(g + 1) * (g + 1))
            .map(|_| f32::from(u8::from(rng.random_bool(self.options.keep))))
            .collect();
        let (ch, cw) = (h.div_ceil(g), w.div_ceil(g));
        let dy = rng.random_range(0..ch);
        let dx = rng.random_range(0..cw);
        // Position of pixel p (shifted) in grid units, between the centres of two cells.
        let axis = |p: usize, d: usize, c: usize| -> (usize, f32) {
            let u = ((p + d) as f32 + 0.5) / c as f32 - 0.5;
            let u = u.clamp(0.0, g as f32);
            let k = (u.floor() as usize).min(g - 1);
            (k, u - k as f32)
        };
        let xs: Vec<(usize, f32)> = (0..w).map(|x| axis(x, dx, cw)).collect();
        for y in 0..h {
            let (ky, fy) = axis(y, dy, ch);
            for (x, &(kx, fx)) in xs.iter().enumerate() {
                let at = |r: usize, c: usize| cells[r * (g + 1) + c];
                let top = at(ky, kx) * (1.0 - fx) + at(ky, kx + 1) * fx;
                let bottom = at(ky + 1, kx) * (1.0 - fx) + at(ky + 1, kx + 1) * fx;
                self.mask[y * w + x] = top * (1.0 - fy) + bottom * fy;
            }
        }
    }
}

impl Perturber for Rise {
    fn row_len(&self) -> usize {
        self.shape.len()
    }

    fn forward_passes(&self) -> usize {
        self.options.samples
    }

    fn next_rows(&mut self, rows: usize, out: &mut Vec<f32>) -> usize {
        let n = rows.min(self.options.samples - self.handed);
        let pixels = self.shape.pixels();
        let b = self.options.baseline;
        for i in self.handed..self.handed + n {
            self.make_mask(i);
            for c in 0..self.shape.channels {
                let plane = &self.x[c * pixels..(c + 1) * pixels];
                out.extend(
                    plane
                        .iter()
                        .zip(&self.mask)
                        .map(|(&v, &m)| v * m + b * (1.0 - m)),
                );
            }
            self.pending.push_back(self.mask.clone());
        }
        self.handed += n;
        n
    }

    fn absorb(&mut self, scores: &[f64]) {
        for &s in scores {
            let Some(mask) = self.pending.pop_front() else {
                break;
            };
            for (acc, &m) in self.sum.iter_mut().zip(&mask) {
                *acc += s * f64::from(m);
            }
            self.absorbed += 1;
        }
    }

    fn finish(self: Box<Self>) -> Result<Explanation, ExplainError> {
        if self.absorbed != self.options.samples {
            return Err(ExplainError::Incomplete {
                absorbed: self.absorbed,
                expected: self.options.samples,
            });
        }
        let norm = self.options.samples as f64 * self.options.keep;
        Ok(Explanation {
            values: self.sum.iter().map(|s| s / norm).collect(),
            base_value: None,
            forward_passes: self.options.samples,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{argmax, region_mean};
    use super::super::{ImageShape, run};
    use super::*;

    #[test]
    fn the_map_is_highest_on_the_region_that_decides_the_score() {
        let shape = ImageShape {
            channels: 1,
            height: 40,
            width: 40,
        };
        let region = (4, 10, 26, 34);
        let x = vec![1.0f32; shape.len()];
        let options = RiseOptions {
            samples: 600,
            grid: 6,
            seed: 7,
            ..RiseOptions::default()
        };
        let method = Box::new(Rise::new(x.clone(), shape, options).unwrap());
        let e = run(method, 32, |rows, n| region_mean(rows, n, shape, region)).unwrap();
        let top = argmax(&e.values);
        let (y, x0) = (top / 40, top % 40);
        // Smooth masks blur the map by about a cell (7 px): the peak is at the region.
        assert!(
            (0..14).contains(&y) && (22..38).contains(&x0),
            "peak at {y},{x0}"
        );
        let inside = e.values[7 * 40 + 30];
        let far = e.values[35 * 5];
        assert!(inside > far + 0.1, "{inside} vs {far}");
        // The same seed gives the same map whatever the batching.
        let again = run(
            Box::new(Rise::new(x, shape, options).unwrap()),
            5,
            |rows, n| region_mean(rows, n, shape, region),
        )
        .unwrap();
        assert_eq!(e, again);
    }

    #[test]
    fn masks_are_in_the_unit_interval_and_keep_about_p() {
        let shape = ImageShape {
            channels: 1,
            height: 30,
            width: 20,
        };
        let mut r = Rise::new(vec![0.0; 600], shape, RiseOptions::default()).unwrap();
        let mut mean = 0.0;
        for i in 0..200 {
            r.make_mask(i);
            assert!(r.mask.iter().all(|m| (0.0..=1.0).contains(m)));
            mean += r.mask.iter().map(|&m| f64::from(m)).sum::<f64>() / 600.0;
        }
        mean /= 200.0;
        assert!((mean - 0.5).abs() < 0.05, "{mean}");
    }

    #[test]
    fn bad_options_are_refused() {
        let shape = ImageShape {
            channels: 1,
            height: 8,
            width: 8,
        };
        for o in [
            RiseOptions {
                samples: 0,
                ..RiseOptions::default()
            },
            RiseOptions {
                grid: 9,
                ..RiseOptions::default()
            },
            RiseOptions {
                keep: 0.0,
                ..RiseOptions::default()
            },
            RiseOptions {
                keep: f64::NAN,
                ..RiseOptions::default()
            },
        ] {
            assert!(Rise::new(vec![0.0; 64], shape, o).is_err(), "{o:?}");
        }
    }
}
