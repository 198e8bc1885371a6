//! Image preprocessing as a bundle declares it in `[preprocessing]`: a decoded image
//! (stored pixel values, rescale slope/intercept, photometric interpretation) becomes the
//! float tensor the model was trained on. The steps, in order (docs/bundle-format.md):
//!
//! 1. RGB pixels become luma, 0.299 R + 0.587 G + 0.114 B;
//! 2. modality values: stored × slope + intercept;
//! 3. window to [0, 1] (`percentile` of this image, or `fixed` centre/width), clipped;
//!    a window of zero width maps everything to 0;
//! 4. MONOCHROME1 is inverted: x = 1 − x;
//! 5. `pad`: centred on a square of side max(rows, cols) filled with `pad_value`;
//! 6. area resize: output pixel i of n along an axis of N averages inputs
//!    ⌊iN/n⌋ .. ⌈(i+1)N/n⌉ − 1; rows first, then columns;
//! 7. (x − mean) / std, as a `[1, height, width]` FP32 tensor.
//!
//! `models/train/imaging.py` is the same contract in numpy (the training side); the
//! fixtures in `models/tests/fixtures/preprocess/` hold the two to each other.
//! Arithmetic is in f64. The padding is virtual: a 65535 × 300 image is not materialised
//! as a 65535² square.

use nightingale_inference::Tensor;
use serde::{Deserialize, Serialize};

/// The largest image accepted, in pixels (a 64-megapixel image needs 512 MiB of scratch).
pub const MAX_PIXELS: usize = 64 << 20;
/// The largest output side a manifest may declare.
pub const MAX_SIDE: usize = 4096;

/// A bundle's `[preprocessing]` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocessing {
    pub kind: PreprocessingKind,
    /// The model input the result feeds.
    pub input: String,
    /// Output `[height, width]`.
    pub size: [usize; 2],
    #[serde(default)]
    pub aspect: Aspect,
    /// Value (on the 0–1 scale after windowing) of the padding.
    #[serde(default)]
    pub pad_value: f64,
    #[serde(default)]
    pub resize: Resize,
    pub window: Window,
    #[serde(default)]
    pub mean: f64,
    #[serde(default = "one")]
    pub std: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PreprocessingKind {
    /// One grey-scale 2-D image (RGB is reduced to luma) → `[1, height, width]`.
    Image,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Aspect {
    /// Keep the aspect ratio: pad to a centred square first.
    #[default]
    Pad,
    /// Resize rows and columns independently.
    Stretch,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Resize {
    /// Box-filter averaging (exact for downsampling, replication for upsampling).
    #[default]
    Area,
}

/// How modality values are mapped to 0–1.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase", deny_unknown_fields)]
pub enum Window {
    /// From the `low`th to the `high`th percentile of the image's own values
    /// (linear interpolation, as numpy's default).
    Percentile { low: f64, high: f64 },
    /// A fixed window in modality units (e.g. HU for CT).
    Fixed { center: f64, width: f64 },
}

/// A decoded image frame: stored pixel values, row-major, `samples` (1 or 3, interleaved)
/// per pixel, and what DICOM says about them.
#[derive(Clone, Copy, Debug)]
pub struct Image<'a> {
    pub rows: usize,
    pub cols: usize,
    pub samples: usize,
    pub data: &'a [f32],
    /// Rescale Slope (0028,1053); 1 when absent.
    pub slope: f64,
    /// Rescale Intercept (0028,1052); 0 when absent.
    pub intercept: f64,
    /// Photometric Interpretation MONOCHROME1: low values are white.
    pub monochrome1: bool,
}

impl<'a> Image<'a> {
    /// A grey-scale image with no rescale and MONOCHROME2.
    pub fn grey(rows: usize, cols: usize, data: &'a [f32]) -> Self {
        Image {
            rows,
            cols,
            samples: 1,
            data,
            slope: 1.0,
            intercept: 0.0,
            monochrome1: false,
        }
    }
}

/// Why an image could not be preprocessed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PreprocessError {
    #[error("the image has no pixels ({rows} x {cols})")]
    Empty { rows: usize, cols: usize },
    #[error("the image has {pixels} pixels; at most {MAX_PIXELS} are accepted")]
    TooLarge { pixels: usize },
    #[error("{samples} samples per pixel; 1 (grey) or 3 (RGB) are supported")]
    Samples { samples: usize },
    #[error("{rows} x {cols} x {samples} needs {expected} values, got {got}")]
    Length {
        rows: usize,
        cols: usize,
        samples: usize,
        expected: usize,
        got: usize,
    },
    #[error("rescale slope {slope} / intercept {intercept} must be finite, slope non-zero")]
    Rescale { slope: f64, intercept: f64 },
    #[error("pixel {index} is not a finite number")]
    NonFinite { index: usize },
}

impl Preprocessing {
    /// Checks the numbers a manifest cannot express in its types; `input_shape` is the
    /// shape declared for `self.input`.
    pub fn validate(&self, input_shape: &[i64]) -> Result<(), String> {
        let [h, w] = self.size;
        if !(1..=MAX_SIDE).contains(&h) || !(1..=MAX_SIDE).contains(&w) {
            return Err(format!(
                "preprocessing: size {:?} must be 1 to {MAX_SIDE} on each side",
                self.size
            ));
        }
        let tail = [1, h as i64, w as i64];
        let ok = input_shape.len() >= 3
            && input_shape.len() <= 4
            && input_shape[input_shape.len() - 3..]
                .iter()
                .zip(tail)
                .all(|(&d, t)| d == t || d == -1)
            && (input_shape.len() == 3 || input_shape[0] == -1 || input_shape[0] == 1);
        if !ok {
            return Err(format!(
                "preprocessing: input {:?} has shape {input_shape:?}, but an image of size {:?} needs [-1, 1, {h}, {w}]",
                self.input, self.size
            ));
        }
        if !(self.mean.is_finite() && self.std.is_finite() && self.std > 0.0) {
            return Err("preprocessing: mean must be finite and std finite and positive".into());
        }
        if !self.pad_value.is_finite() {
            return Err("preprocessing: pad_value must be finite".into());
        }
        match self.window {
            Window::Percentile { low, high } => {
                if !(0.0..=100.0).contains(&low) || !(0.0..=100.0).contains(&high) || low >= high {
                    return Err(format!(
                        "preprocessing: percentile window needs 0 <= low < high <= 100, got {low} and {high}"
                    ));
                }
            }
            Window::Fixed { center, width } => {
                if !center.is_finite() || !width.is_finite() || width <= 0.0 {
                    return Err(format!(
                        "preprocessing: fixed window needs a finite center and a positive width, got {center} and {width}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The model input for one image: FP32 `[1, height, width]` (add the batch dimension
    /// with [`Tensor::concat`] or by reshaping).
    pub fn apply(&self, image: &Image<'_>) -> Result<Tensor, PreprocessError> {
        let values = self.apply_to_vec(image)?;
        let [h, w] = self.size;
        Ok(Tensor::from_vec(vec![1, h, w], values).expect("size matches the data"))
    }

    /// As [`apply`](Self::apply), as a row-major `height × width` vector.
    pub fn apply_to_vec(&self, image: &Image<'_>) -> Result<Vec<f32>, PreprocessError> {
        let (rows, cols) = (image.rows, image.cols);
        if rows == 0 || cols == 0 {
            return Err(PreprocessError::Empty { rows, cols });
        }
        let pixels = rows.checked_mul(cols).filter(|&p| p <= MAX_PIXELS).ok_or(
            PreprocessError::TooLarge {
                pixels: rows.saturating_mul(cols),
            },
        )?;
        if image.samples != 1 && image.samples != 3 {
            return Err(PreprocessError::Samples {
                samples: image.samples,
            });
        }
        let expected = pixels * image.samples;
        if image.data.len() != expected {
            return Err(PreprocessError::Length {
                rows,
                cols,
                samples: image.samples,
                expected,
                got: image.data.len(),
            });
        }
        if !(image.slope.is_finite() && image.slope != 0.0 && image.intercept.is_finite()) {
            return Err(PreprocessError::Rescale {
                slope: image.slope,
                intercept: image.intercept,
            });
        }

        // 1–2: luma and modality values.
        let mut v: Vec<f64> = Vec::with_capacity(pixels);
        if image.samples == 1 {
            for (i, &s) in image.data.iter().enumerate() {
                if !s.is_finite() {
                    return Err(PreprocessError::NonFinite { index: i });
                }
                v.push(f64::from(s) * image.slope + image.intercept);
            }
        } else {
            for (i, px) in image.data.chunks_exact(3).enumerate() {
                if !px.iter().all(|s| s.is_finite()) {
                    return Err(PreprocessError::NonFinite { index: i });
                }
                let y =
                    0.299 * f64::from(px[0]) + 0.587 * f64::from(px[1]) + 0.114 * f64::from(px[2]);
                v.push(y * image.slope + image.intercept);
            }
        }

        // 3–4: window, invert.
        let (lo, hi) = match self.window {
            Window::Percentile { low, high } => {
                let mut scratch = v.clone();
                percentiles(&mut scratch, low, high)
            }
            Window::Fixed { center, width } => (center - width / 2.0, center + width / 2.0),
        };
        let span = hi - lo;
        for x in &mut v {
            let mut y = if span > 0.0 {
                ((*x - lo) / span).clamp(0.0, 1.0)
            } else {
                0.0
            };
            if image.monochrome1 {
                y = 1.0 - y;
            }
            *x = y;
        }

        // 5–6: (virtual) padding and area resize, rows then columns.
        let [out_h, out_w] = self.size;
        let (side_r, side_c, top, left) = match self.aspect {
            Aspect::Pad => {
                let side = rows.max(cols);
                (side, side, (side - rows) / 2, (side - cols) / 2)
            }
            Aspect::Stretch => (rows, cols, 0, 0),
        };
        let pad = self.pad_value;
        // Rows: [out_h × cols], each the mean over its bin of padded rows (summed row by
        // row, so memory is read in order).
        let row_bins = bins(side_r, out_h);
        let mut by_rows = vec![0.0f64; out_h * cols];
        for (i, &(start, end)) in row_bins.iter().enumerate() {
            let acc = &mut by_rows[i * cols..(i + 1) * cols];
            let (inside, padded) = split_bin(start, end, top, rows);
            for r in inside {
                let src = &v[r * cols..(r + 1) * cols];
                for (x, &y) in acc.iter_mut().zip(src) {
                    *x += y;
                }
            }
            let outside = padded as f64 * pad;
            let count = (end - start) as f64;
            for x in acc.iter_mut() {
                *x = (*x + outside) / count;
            }
        }
        // Columns: [out_h × out_w].
        let col_bins = bins(side_c, out_w);
        let mut out = Vec::with_capacity(out_h * out_w);
        let mut prefix = vec![0.0f64; cols + 1];
        for i in 0..out_h {
            let row = &by_rows[i * cols..(i + 1) * cols];
            for (c, &x) in row.iter().enumerate() {
                prefix[c + 1] = prefix[c] + x;
            }
            for &(start, end) in &col_bins {
                let m = bin_mean(&prefix, start, end, left, cols, pad);
                // 7: normalise.
                out.push(((m - self.mean) / self.std) as f32);
            }
        }
        Ok(out)
    }
}

/// Bins `[floor(i N / n), ceil((i + 1) N / n))` for i in 0..n.
fn bins(big: usize, n: usize) -> Vec<(usize, usize)> {
    (0..n)
        .map(|i| {
            let start = i * big / n;
            let end = ((i + 1) * big).div_ceil(n);
            (start, end)
        })
        .collect()
}

/// Splits the bin `start..end` of a padded axis, whose positions `offset..offset + len`
/// hold the image: the image indices it covers, and how many padding positions.
fn split_bin(
    start: usize,
    end: usize,
    offset: usize,
    len: usize,
) -> (std::ops::Range<usize>, usize) {
    let a = start.clamp(offset, offset + len);
    let b = end.clamp(offset, offset + len);
    (a - offset..b - offset, (end - start) - (b - a))
}

/// Mean over padded positions `start..end` of an axis (see [`split_bin`]) whose image part
/// has prefix sums `prefix`, the rest being `pad`.
fn bin_mean(prefix: &[f64], start: usize, end: usize, offset: usize, len: usize, pad: f64) -> f64 {
    let (inside, padded) = split_bin(start, end, offset, len);
    let sum = prefix[inside.end] - prefix[inside.start];
    (sum + padded as f64 * pad) / (end - start) as f64
}

/// The `low`th and `high`th percentiles (numpy's linear method) of `v` (reordered);
/// the second selection runs only on the part above the first.
fn percentiles(v: &mut [f64], low: f64, high: f64) -> (f64, f64) {
    if high < low {
        let (h, l) = percentiles(v, high, low);
        return (l, h);
    }
    let n = v.len();
    let position = |q: f64| {
        let idx = q / 100.0 * (n - 1) as f64;
        let i = (idx.floor() as usize).min(n - 1);
        (i, idx - i as f64)
    };
    // The value at sorted position i of `v[start..]` (all of which are >= everything before
    // `start`), interpolated towards the next one by t.
    fn at(v: &mut [f64], i: usize, t: f64) -> f64 {
        let (_, a, right) = v.select_nth_unstable_by(i, f64::total_cmp);
        let a = *a;
        if t == 0.0 || right.is_empty() {
            return a;
        }
        let b = right.iter().copied().fold(f64::INFINITY, f64::min);
        lerp(a, b, t)
    }
    let (il, tl) = position(low);
    let (ih, th) = position(high);
    let l = at(v, il, tl);
    // After selecting il, v[il..] holds the largest n - il values.
    let h = at(&mut v[il..], ih - il, th);
    (l, h)
}

/// numpy's `_lerp`: a + (b − a) t, computed from the nearer end for t ≥ ½.
fn lerp(a: f64, b: f64, t: f64) -> f64 {
    let d = b - a;
    if t >= 0.5 {
        b - d * (1.0 - t)
    } else {
        a + d * t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(window: Window, aspect: Aspect, size: [usize; 2]) -> Preprocessing {
        Preprocessing {
            kind: PreprocessingKind::Image,
            input: "image".into(),
            size,
            aspect,
            pad_value: 0.0,
            resize: Resize::Area,
            window,
            mean: 0.0,
            std: 1.0,
        }
    }

    #[test]
    fn percentiles_match_numpy_linear() {
        // numpy.percentile([1, 2, 3, 4, 10], [0, 25, 90, 100]) = [1, 2, 7.6, 10]
        let mut v = vec![10.0, 3.0, 1.0, 4.0, 2.0];
        assert_eq!(percentiles(&mut v, 0.0, 100.0), (1.0, 10.0));
        let (a, b) = percentiles(&mut v, 25.0, 90.0);
        assert_eq!(a, 2.0);
        assert!((b - 7.6).abs() < 1e-12, "{b}");
        assert_eq!(percentiles(&mut v, 90.0, 25.0), (b, a), "either order");
        let mut one = vec![5.0];
        assert_eq!(percentiles(&mut one, 1.0, 99.0), (5.0, 5.0));
    }

    #[test]
    fn area_resize_averages_whole_blocks_and_replicates_upwards() {
        let s = spec(
            Window::Fixed {
                center: 50.0,
                width: 100.0,
            },
            Aspect::Stretch,
            [1, 2],
        );
        // 2 x 4 image, values 0..100 map to themselves / 100.
        let data = [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0];
        let out = s.apply_to_vec(&Image::grey(2, 4, &data)).unwrap();
        let want = [
            (0.0 + 10.0 + 40.0 + 50.0) / 400.0,
            (20.0 + 30.0 + 60.0 + 70.0) / 400.0,
        ];
        for (o, w) in out.iter().zip(want) {
            assert!((f64::from(*o) - w).abs() < 1e-6, "{out:?}");
        }
        let up = spec(
            Window::Fixed {
                center: 50.0,
                width: 100.0,
            },
            Aspect::Stretch,
            [2, 2],
        )
        .apply_to_vec(&Image::grey(1, 1, &[25.0]))
        .unwrap();
        assert_eq!(up, vec![0.25; 4]);
    }

    #[test]
    fn padding_is_centred_and_monochrome1_inverted() {
        let mut s = spec(
            Window::Fixed {
                center: 0.5,
                width: 1.0,
            },
            Aspect::Pad,
            [4, 4],
        );
        s.pad_value = 0.25;
        // A 2 x 4 all-ones image padded to 4 x 4: one pad row above and one below.
        let out = s.apply_to_vec(&Image::grey(2, 4, &[1.0; 8])).unwrap();
        assert_eq!(&out[0..4], &[0.25; 4]);
        assert_eq!(&out[4..12], &[1.0; 8]);
        assert_eq!(&out[12..16], &[0.25; 4]);
        let mut img = Image::grey(2, 4, &[1.0; 8]);
        img.monochrome1 = true;
        let inv = s.apply_to_vec(&img).unwrap();
        assert_eq!(&inv[4..12], &[0.0; 8]);
        assert_eq!(&inv[0..4], &[0.25; 4], "padding is not inverted");
    }

    #[test]
    fn flat_images_and_rgb() {
        let s = spec(
            Window::Percentile {
                low: 1.0,
                high: 99.0,
            },
            Aspect::Pad,
            [3, 3],
        );
        let flat = s.apply_to_vec(&Image::grey(5, 5, &[7.0; 25])).unwrap();
        assert_eq!(flat, vec![0.0; 9]);
        // An RGB image whose luma equals a grey image gives the same tensor.
        let grey: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let rgb: Vec<f32> = grey.iter().flat_map(|&g| [g, g, g]).collect();
        let a = s.apply_to_vec(&Image::grey(3, 4, &grey)).unwrap();
        let mut img = Image::grey(3, 4, &rgb);
        img.samples = 3;
        let b = s.apply_to_vec(&img).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-6);
        }
    }

    #[test]
    fn hostile_images_are_refused_with_a_reason() {
        let s = spec(
            Window::Percentile {
                low: 1.0,
                high: 99.0,
            },
            Aspect::Pad,
            [8, 8],
        );
        let err = |img: Image<'_>| s.apply_to_vec(&img).unwrap_err();
        assert!(matches!(
            err(Image::grey(0, 5, &[])),
            PreprocessError::Empty { .. }
        ));
        assert!(matches!(
            err(Image::grey(3, 3, &[1.0; 8])),
            PreprocessError::Length { .. }
        ));
        assert!(matches!(
            err(Image::grey(1 << 16, 1 << 16, &[])),
            PreprocessError::TooLarge { .. }
        ));
        assert!(matches!(
            err(Image::grey(usize::MAX, 2, &[])),
            PreprocessError::TooLarge { .. }
        ));
        let mut nan = [1.0f32; 4];
        nan[2] = f32::NAN;
        assert_eq!(
            err(Image::grey(2, 2, &nan)),
            PreprocessError::NonFinite { index: 2 }
        );
        let mut two = Image::grey(2, 2, &[1.0; 8]);
        two.samples = 2;
        assert!(matches!(err(two), PreprocessError::Samples { samples: 2 }));
        let mut zero_slope = Image::grey(2, 2, &[1.0; 4]);
        zero_slope.slope = 0.0;
        assert!(matches!(err(zero_slope), PreprocessError::Rescale { .. }));
    }

    #[test]
    fn a_very_long_thin_image_is_not_materialised_as_a_square() {
        // 60000 x 2: a padded square would be 3.6e9 values; virtual padding needs none.
        let s = spec(
            Window::Percentile {
                low: 0.0,
                high: 100.0,
            },
            Aspect::Pad,
            [4, 4],
        );
        let data: Vec<f32> = (0..120_000).map(|i| (i % 7) as f32).collect();
        let out = s.apply_to_vec(&Image::grey(60_000, 2, &data)).unwrap();
        assert_eq!(out.len(), 16);
        assert!(out.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn validation_of_the_manifest_section() {
        let s = spec(
            Window::Percentile {
                low: 1.0,
                high: 99.0,
            },
            Aspect::Pad,
            [224, 224],
        );
        assert!(s.validate(&[-1, 1, 224, 224]).is_ok());
        assert!(s.validate(&[-1, 1, -1, -1]).is_ok());
        assert!(
            s.validate(&[-1, 3, 224, 224])
                .unwrap_err()
                .contains("[-1, 1, 224, 224]")
        );
        assert!(s.validate(&[-1, 224 * 224]).is_err());
        let mut bad = s.clone();
        bad.window = Window::Percentile {
            low: 99.0,
            high: 1.0,
        };
        assert!(bad.validate(&[-1, 1, 224, 224]).is_err());
        bad.window = Window::Fixed {
            center: 40.0,
            width: 0.0,
        };
        assert!(bad.validate(&[-1, 1, 224, 224]).is_err());
        let mut bad = s.clone();
        bad.std = 0.0;
        assert!(bad.validate(&[-1, 1, 224, 224]).is_err());
        let mut bad = s;
        bad.size = [0, 10_000];
        assert!(bad.validate(&[-1, 1, 224, 224]).is_err());
    }
}
