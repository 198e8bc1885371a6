//! Occlusion sensitivity (Zeiler & Fergus, "Visualizing and Understanding Convolutional
//! Networks", ECCV 2014): slide a square patch over the image, replace what it covers (all
//! channels) with a baseline value, and see how much the score drops.
//!
//! Windows start at `0, stride, 2·stride, …` along each axis while they fit, plus one
//! window flush with the far edge when the stride does not land there, so every pixel is
//! covered. The saliency of a pixel is the mean, over the windows covering it, of
//! `score(image) − score(occluded image)`: positive where hiding the pixel lowers the score.

use super::{ExplainError, Explanation, ImageShape, Perturber};

/// How to occlude.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OcclusionOptions {
    /// Side of the square patch, in pixels (clamped to the image).
    pub patch: usize,
    /// Step between windows, in pixels.
    pub stride: usize,
    /// The value put in place of the occluded pixels (in the model's input space).
    pub baseline: f32,
}

impl OcclusionOptions {
    /// A patch of 1/8 of the longer side (at least 1 pixel), half of it as the stride,
    /// and 0 as the baseline (the mean of a standardised input).
    pub fn for_image(shape: ImageShape) -> Self {
        let patch = (shape.height.max(shape.width) / 8).max(1);
        OcclusionOptions {
            patch,
            stride: (patch / 2).max(1),
            baseline: 0.0,
        }
    }

    /// What [`Occlusion::new`] refuses of the options themselves, checked before any forward
    /// pass (the prediction included).
    pub fn check(&self) -> Result<(), ExplainError> {
        if self.patch == 0 || self.stride == 0 {
            return Err(ExplainError::Invalid(
                "occlusion: patch and stride must be at least 1 pixel".into(),
            ));
        }
        // A stride over the patch leaves pixels no window covers, whose saliency would read
        // as 0 — "occluding this changes nothing" — where nothing was measured (a red-team
        // finding).
        if self.stride > self.patch {
            return Err(ExplainError::Invalid(format!(
                "occlusion: the stride ({}) must not exceed the patch ({}): every pixel is covered by a window",
                self.stride, self.patch
            )));
        }
        if !self.baseline.is_finite() {
            return Err(ExplainError::Invalid(
                "occlusion: the baseline must be finite".into(),
            ));
        }
        Ok(())
    }
}

/// Window starts along an axis of `len` pixels.
fn starts(len: usize, patch: usize, stride: usize) -> Vec<usize> {
    let last = len - patch;
    let mut v: Vec<usize> = (0..=last).step_by(stride).collect();
    if v.last() != Some(&last) {
        v.push(last);
    }
    v
}

/// Occlusion of one image: [`OcclusionOptions`] windows, one forward pass each.
pub struct Occlusion {
    x: Vec<f32>,
    shape: ImageShape,
    patch_h: usize,
    patch_w: usize,
    baseline: f32,
    windows: Vec<(usize, usize)>,
    score: f64,
    handed: usize,
    absorbed: usize,
    sum: Vec<f64>,
    count: Vec<u32>,
}

impl Occlusion {
    /// `x`: the image (`C·H·W` values); `score`: the model's score of it.
    pub fn new(
        x: Vec<f32>,
        shape: ImageShape,
        score: f64,
        options: OcclusionOptions,
    ) -> Result<Self, ExplainError> {
        shape.check(&x)?;
        options.check()?;
        let patch_h = options.patch.min(shape.height);
        let patch_w = options.patch.min(shape.width);
        let ys = starts(shape.height, patch_h, options.stride);
        let xs = starts(shape.width, patch_w, options.stride);
        let windows = ys
            .iter()
            .flat_map(|&y| xs.iter().map(move |&x| (y, x)))
            .collect();
        Ok(Occlusion {
            x,
            shape,
            patch_h,
            patch_w,
            baseline: options.baseline,
            windows,
            score,
            handed: 0,
            absorbed: 0,
            sum: vec![0.0; shape.pixels()],
            count: vec![0; shape.pixels()],
        })
    }

    /// Forward passes `options` would take on an image of `shape` (before building one).
    pub fn passes(shape: ImageShape, options: OcclusionOptions) -> usize {
        if options.patch == 0 || options.stride == 0 || shape.is_empty() {
            return 0;
        }
        starts(
            shape.height,
            options.patch.min(shape.height),
            options.stride,
        )
        .len()
            * starts(shape.width, options.patch.min(shape.width), options.stride).len()
    }
}

impl Perturber for Occlusion {
    fn row_len(&self) -> usize {
        self.shape.len()
    }

    fn forward_passes(&self) -> usize {
        self.windows.len()
    }

    fn next_rows(&mut self, rows: usize, out: &mut Vec<f32>) -> usize {
        let n = rows.min(self.windows.len() - self.handed);
        let (h, w) = (self.shape.height, self.shape.width);
        for &(y0, x0) in &self.windows[self.handed..self.handed + n] {
            let start = out.len();
            out.extend_from_slice(&self.x);
            let img = &mut out[start..];
            for c in 0..self.shape.channels {
                for y in y0..y0 + self.patch_h {
                    let row = c * h * w + y * w;
                    img[row + x0..row + x0 + self.patch_w].fill(self.baseline);
                }
            }
        }
        self.handed += n;
        n
    }

    fn absorb(&mut self, scores: &[f64]) {
        let w = self.shape.width;
        for &s in scores {
            let Some(&(y0, x0)) = self.windows.get(self.absorbed) else {
                break;
            };
            let drop = self.score - s;
            for y in y0..y0 + self.patch_h {
                for x in x0..x0 + self.patch_w {
                    self.sum[y * w + x] += drop;
                    self.count[y * w + x] += 1;
                }
            }
            self.absorbed += 1;
        }
    }

    fn finish(self: Box<Self>) -> Result<Explanation, ExplainError> {
        if self.absorbed != self.windows.len() {
            return Err(ExplainError::Incomplete {
                absorbed: self.absorbed,
                expected: self.windows.len(),
            });
        }
        let values = self
            .sum
            .iter()
            .zip(&self.count)
            .map(|(&s, &c)| if c == 0 { 0.0 } else { s / f64::from(c) })
            .collect();
        Ok(Explanation {
            values,
            base_value: None,
            forward_passes: self.windows.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{argmax, region_mean};
    use super::super::{ImageShape, run};
    use super::*;

    #[test]
    fn windows_cover_every_pixel() {
        assert_eq!(starts(10, 4, 3), vec![0, 3, 6]);
        assert_eq!(starts(10, 4, 4), vec![0, 4, 6]);
        assert_eq!(starts(4, 4, 2), vec![0]);
        let shape = ImageShape {
            channels: 1,
            height: 10,
            width: 7,
        };
        let o = OcclusionOptions {
            patch: 4,
            stride: 3,
            baseline: 0.0,
        };
        assert_eq!(Occlusion::passes(shape, o), 3 * 2);
    }

    #[test]
    fn the_map_peaks_on_the_region_that_decides_the_score() {
        let shape = ImageShape {
            channels: 2,
            height: 32,
            width: 24,
        };
        let region = (20, 26, 4, 9);
        // A textured image: the score is the mean of one region of channel 0.
        let x: Vec<f32> = (0..shape.len())
            .map(|i| 1.0 + ((i * 7919) % 13) as f32 / 13.0)
            .collect();
        let score = region_mean(&x, 1, shape, region)[0];
        let options = OcclusionOptions {
            patch: 4,
            stride: 2,
            baseline: 0.0,
        };
        let method = Box::new(Occlusion::new(x, shape, score, options).unwrap());
        assert_eq!(method.forward_passes(), Occlusion::passes(shape, options));
        let e = run(method, 7, |rows, n| region_mean(rows, n, shape, region)).unwrap();
        assert_eq!(e.values.len(), 32 * 24);
        let top = argmax(&e.values);
        let (y, x) = (top / 24, top % 24);
        assert!(
            (20..26).contains(&y) && (4..9).contains(&x),
            "peak at {y},{x}"
        );
        // Far from the region nothing changes the score.
        assert_eq!(e.values[0], 0.0);
        assert!(e.values.iter().all(|v| *v >= 0.0));
    }

    #[test]
    fn bad_options_are_refused() {
        let shape = ImageShape {
            channels: 1,
            height: 4,
            width: 4,
        };
        let o = OcclusionOptions {
            patch: 0,
            stride: 1,
            baseline: 0.0,
        };
        assert!(Occlusion::new(vec![0.0; 16], shape, 0.5, o).is_err());
        let o = OcclusionOptions { patch: 2, ..o };
        assert!(Occlusion::new(vec![0.0; 15], shape, 0.5, o).is_err());
        let o = OcclusionOptions {
            baseline: f32::NAN,
            ..o
        };
        assert!(Occlusion::new(vec![0.0; 16], shape, 0.5, o).is_err());
        // A stride over the patch would leave pixels no window covers.
        let o = OcclusionOptions {
            patch: 1,
            stride: 3,
            baseline: 0.0,
        };
        let e = Occlusion::new(vec![0.0; 16], shape, 0.5, o).err().unwrap();
        assert!(e.to_string().contains("must not exceed the patch"), "{e}");
        let o = OcclusionOptions { stride: 1, ..o };
        assert!(Occlusion::new(vec![0.0; 16], shape, 0.5, o).is_ok());
    }
}
