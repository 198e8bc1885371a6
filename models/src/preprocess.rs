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
//!
//! Volumes (`[dicom] inference = "volume"`, docs/bundle-format.md): the same steps per slice,
//! with ONE window for the whole volume ([`VolumeValues`]: the percentiles of every voxel's
//! modality value, exactly as numpy's over the stacked slices; or the fixed window), then
//! 8. the slices, in volume order, resampled along the slice axis to the model's depth by the
//!    same area rule as step 6 ([`VolumeInput`], which takes one slice at a time, so a volume
//!    never needs more than the model input and one slice in memory).
//!
//! `imaging.preprocess_volume` is the numpy side. Arithmetic is in f64. The padding is virtual: a 65535 × 300 image is not materialised
//! as a 65535² square. Nor are the modality values: they are computed row by row from the
//! stored values, and the percentile window selects on the stored values (a histogram when
//! they are integers, else one f32 copy; luma: one f64 copy), so the scratch at the
//! 64 Mi-pixel limit is megabytes, not the 1 GiB of an f64 copy plus a scratch copy.

use nightingale_inference::Tensor;
use serde::{Deserialize, Serialize};

/// The largest image accepted, in pixels (a 64-megapixel grey image of integer values needs
/// a few MiB of scratch; of fractional values, a 256 MiB f32 copy; RGB, a 512 MiB f64 luma copy).
pub const MAX_PIXELS: usize = 64 << 20;
/// The largest output side a manifest may declare.
pub const MAX_SIDE: usize = 4096;
/// The most values a volume model input may hold (64 Mi f32 values: 256 MiB).
pub const MAX_VOLUME_VALUES: usize = 64 << 20;
/// The most distinct (rescale, stored value) pairs [`VolumeValues`] keeps (16 Mi: 256 MiB).
pub const MAX_VOLUME_DISTINCT: usize = 16 << 20;

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

/// How one source image maps onto the model input ([`Preprocessing::geometry`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InputGeometry {
    /// The model input's `height × width`.
    pub height: usize,
    pub width: usize,
    scale_r: f64,
    scale_c: f64,
    top: f64,
    left: f64,
}

impl InputGeometry {
    /// The geometry of an image that is the model input itself (`height × width`).
    pub fn identity(height: usize, width: usize) -> InputGeometry {
        InputGeometry {
            height,
            width,
            scale_r: 1.0,
            scale_c: 1.0,
            top: 0.0,
            left: 0.0,
        }
    }

    /// The continuous model-input position (row, column; pixel centres at integers) of the
    /// centre of source pixel (`r`, `c`).
    pub fn input_position(&self, r: usize, c: usize) -> (f64, f64) {
        (
            (r as f64 + 0.5 + self.top) * self.scale_r - 0.5,
            (c as f64 + 0.5 + self.left) * self.scale_c - 0.5,
        )
    }

    /// `map` (`height × width`, row-major, on the model input) resampled bilinearly onto the
    /// source's `rows × cols` pixel grid (edges clamped), one source row at a time: `each`
    /// gets the row index and its `cols` values (so a large source never needs the whole
    /// resampled map in memory).
    pub fn for_each_source_row(
        &self,
        map: &[f32],
        rows: usize,
        cols: usize,
        mut each: impl FnMut(usize, &[f32]),
    ) {
        let (h, w) = (self.height, self.width);
        assert_eq!(map.len(), h * w, "a map of the model input's size");
        let axis = |p: f64, n: usize| -> (usize, usize, f32) {
            let p = p.clamp(0.0, (n - 1) as f64);
            let i = p.floor() as usize;
            let j = (i + 1).min(n - 1);
            (i, j, (p - i as f64) as f32)
        };
        let columns: Vec<(usize, usize, f32)> = (0..cols)
            .map(|c| axis(self.input_position(0, c).1, w))
            .collect();
        let mut row = vec![0.0f32; cols];
        for r in 0..rows {
            let (i0, i1, fy) = axis(self.input_position(r, 0).0, h);
            let (a, b) = (&map[i0 * w..(i0 + 1) * w], &map[i1 * w..(i1 + 1) * w]);
            for (x, &(j0, j1, fx)) in row.iter_mut().zip(&columns) {
                let top = a[j0] + (a[j1] - a[j0]) * fx;
                let bottom = b[j0] + (b[j1] - b[j0]) * fx;
                *x = top + (bottom - top) * fy;
            }
            each(r, &row);
        }
    }

    /// [`for_each_source_row`](Self::for_each_source_row) collected into one row-major vector.
    pub fn to_source(&self, map: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(rows * cols);
        self.for_each_source_row(map, rows, cols, |_, row| out.extend_from_slice(row));
        out
    }
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
    #[error("a volume of {slices} slices was given slice {index}")]
    VolumeSlices { slices: usize, index: usize },
    #[error(
        "a {depth} x {height} x {width} volume input is {values} values; at most {MAX_VOLUME_VALUES} are accepted"
    )]
    VolumeTooLarge {
        depth: usize,
        height: usize,
        width: usize,
        values: usize,
    },
    #[error(
        "a volume's percentile window counts grey integer values (within a range of 2^20 per rescale, at most {MAX_VOLUME_DISTINCT} distinct); these are not"
    )]
    VolumeValues,
}

impl Preprocessing {
    /// Checks the numbers a manifest cannot express in its types; `input_shape` is the
    /// shape declared for `self.input`.
    pub fn validate(&self, input_shape: &[i64]) -> Result<(), String> {
        self.validate_numbers()?;
        let [h, w] = self.size;
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
        Ok(())
    }

    /// For a volume bundle (`[dicom] inference = "volume"`): checks the section as
    /// [`validate`](Self::validate) does, with the input a volume of slices of `size`:
    /// `[-1, 1, D, height, width]` or `[-1, D, height, width]` (batch -1 or 1). Returns the
    /// depth the model takes: `Some(D)` (the slices are resampled to D), or `None` for
    /// `D = -1` (any: the series' own slices).
    pub fn volume_depth(&self, input_shape: &[i64]) -> Result<Option<usize>, String> {
        self.validate_numbers()?;
        let [h, w] = self.size;
        let bad = || {
            Err(format!(
                "preprocessing: input {:?} has shape {input_shape:?}, but a volume of {h}x{w} slices needs [-1, 1, D, {h}, {w}] or [-1, D, {h}, {w}] (D fixed, or -1 for any)",
                self.input
            ))
        };
        let (batch, depth, plane) = match input_shape {
            [b, 1, d, y, x] | [b, d, y, x] => (*b, *d, [*y, *x]),
            _ => return bad(),
        };
        let plane_ok = plane
            .iter()
            .zip([h as i64, w as i64])
            .all(|(&d, t)| d == t || d == -1);
        if !(batch == -1 || batch == 1) || !plane_ok || depth == 0 {
            return bad();
        }
        Ok(usize::try_from(depth).ok())
    }

    fn validate_numbers(&self) -> Result<(), String> {
        let [h, w] = self.size;
        if !(1..=MAX_SIDE).contains(&h) || !(1..=MAX_SIDE).contains(&w) {
            return Err(format!(
                "preprocessing: size {:?} must be 1 to {MAX_SIDE} on each side",
                self.size
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

    /// Where a `rows × cols` source image's pixels land in the model input: the inverse of
    /// the padding and resize steps, for drawing what was computed on the model input (a
    /// saliency map) back over the source.
    pub fn geometry(&self, rows: usize, cols: usize) -> InputGeometry {
        let [out_h, out_w] = self.size;
        let (side_r, side_c, top, left) = match self.aspect {
            Aspect::Pad => {
                let side = rows.max(cols).max(1);
                (side, side, (side - rows) / 2, (side - cols) / 2)
            }
            Aspect::Stretch => (rows.max(1), cols.max(1), 0, 0),
        };
        InputGeometry {
            height: out_h,
            width: out_w,
            scale_r: out_h as f64 / side_r as f64,
            scale_c: out_w as f64 / side_c as f64,
            top: top as f64,
            left: left as f64,
        }
    }

    /// As [`apply`](Self::apply), as a row-major `height × width` vector.
    pub fn apply_to_vec(&self, image: &Image<'_>) -> Result<Vec<f32>, PreprocessError> {
        let pixels = check_image(image)?;
        let window = self.image_window(image, pixels);
        Ok(self.windowed(image, window))
    }

    /// As [`apply_to_vec`](Self::apply_to_vec) with the window given (`(low, high)` in
    /// modality units) instead of taken from the image: a volume's slices share one.
    pub fn apply_windowed(
        &self,
        image: &Image<'_>,
        window: (f64, f64),
    ) -> Result<Vec<f32>, PreprocessError> {
        check_image(image)?;
        Ok(self.windowed(image, window))
    }

    /// The window of `self.window` for one image (checked by [`check_image`]).
    fn image_window(&self, image: &Image<'_>, pixels: usize) -> (f64, f64) {
        let (data, slope, intercept) = (image.data, image.slope, image.intercept);
        let rgb = image.samples == 3;
        let luma = |i: usize| {
            let px = &data[3 * i..3 * i + 3];
            0.299 * f64::from(px[0]) + 0.587 * f64::from(px[1]) + 0.114 * f64::from(px[2])
        };
        match self.window {
            Window::Percentile { low, high } => {
                // Selection on the stored values (or luma): modality values are a monotonic
                // map of them, so the same ranks give numpy's percentiles of the modality
                // values exactly; the scratch is a histogram for integer values, else one
                // f32 (grey) or f64 (luma) copy.
                let to_modality = |x: f64| x * slope + intercept;
                if rgb {
                    let mut scratch: Vec<f64> = (0..pixels).map(luma).collect();
                    modality_percentiles(
                        &mut Selection::new(&mut scratch),
                        slope,
                        low,
                        high,
                        to_modality,
                    )
                } else if let Some(mut hist) = Histogram::new(data) {
                    modality_percentiles(&mut hist, slope, low, high, to_modality)
                } else {
                    let mut scratch = data.to_vec();
                    modality_percentiles(
                        &mut Selection::new(&mut scratch),
                        slope,
                        low,
                        high,
                        to_modality,
                    )
                }
            }
            Window::Fixed { center, width } => (center - width / 2.0, center + width / 2.0),
        }
    }

    /// The fixed window's `(low, high)`, or None for a percentile window.
    pub fn fixed_window(&self) -> Option<(f64, f64)> {
        match self.window {
            Window::Fixed { center, width } => Some((center - width / 2.0, center + width / 2.0)),
            Window::Percentile { .. } => None,
        }
    }

    /// Steps 1 and 3–7 of one checked image with the window `(lo, hi)`.
    fn windowed(&self, image: &Image<'_>, (lo, hi): (f64, f64)) -> Vec<f32> {
        let (rows, cols) = (image.rows, image.cols);
        let (data, slope, intercept) = (image.data, image.slope, image.intercept);
        let rgb = image.samples == 3;
        let luma = |i: usize| {
            let px = &data[3 * i..3 * i + 3];
            0.299 * f64::from(px[0]) + 0.587 * f64::from(px[1]) + 0.114 * f64::from(px[2])
        };
        let span = hi - lo;
        let monochrome1 = image.monochrome1;
        // Row r of windowed values into `row`.
        let window_row = |r: usize, row: &mut [f64]| {
            for (c, y) in row.iter_mut().enumerate() {
                let i = r * cols + c;
                let s = if rgb { luma(i) } else { f64::from(data[i]) };
                let x = s * slope + intercept;
                let mut v = if span > 0.0 {
                    ((x - lo) / span).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                if monochrome1 {
                    v = 1.0 - v;
                }
                *y = v;
            }
        };

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
        // row, so memory is read in order; a row shared by neighbouring bins is windowed once).
        let row_bins = bins(side_r, out_h);
        let mut by_rows = vec![0.0f64; out_h * cols];
        let mut row = vec![0.0f64; cols];
        let mut row_index = usize::MAX;
        for (i, &(start, end)) in row_bins.iter().enumerate() {
            let acc = &mut by_rows[i * cols..(i + 1) * cols];
            let (inside, padded) = split_bin(start, end, top, rows);
            for r in inside {
                if r != row_index {
                    window_row(r, &mut row);
                    row_index = r;
                }
                for (x, &y) in acc.iter_mut().zip(&row) {
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
        out
    }
}

/// Checks an image for preprocessing; returns its pixel count.
fn check_image(image: &Image<'_>) -> Result<usize, PreprocessError> {
    let (rows, cols) = (image.rows, image.cols);
    if rows == 0 || cols == 0 {
        return Err(PreprocessError::Empty { rows, cols });
    }
    let pixels =
        rows.checked_mul(cols)
            .filter(|&p| p <= MAX_PIXELS)
            .ok_or(PreprocessError::TooLarge {
                pixels: rows.saturating_mul(cols),
            })?;
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
    // 1–2: luma and modality values are computed where they are needed (never stored: at
    // the 64 Mi-pixel limit an f64 copy alone would be 512 MiB).
    if let Some(index) = image.data.iter().position(|s| !s.is_finite()) {
        return Err(PreprocessError::NonFinite {
            index: index / image.samples,
        });
    }
    Ok(pixels)
}

/// The modality values of a volume's grey slices, counted, for a percentile window over the
/// whole volume: the `low`th and `high`th percentiles of every voxel (numpy's linear method
/// over the stacked slices, exactly). Slices are added one at a time and not kept: the
/// counts of stored values per rescale (slope, intercept) are.
#[derive(Debug, Default, Clone)]
pub struct VolumeValues {
    groups: Vec<ValueGroup>,
    voxels: u64,
    /// Non-zero counts over all groups.
    distinct: usize,
}

#[derive(Debug, Clone)]
struct ValueGroup {
    slope: f64,
    intercept: f64,
    /// Counts of stored values `min ..= min + counts.len() - 1`.
    min: i64,
    counts: Vec<u64>,
}

impl VolumeValues {
    /// No values yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Voxels counted so far.
    pub fn voxels(&self) -> u64 {
        self.voxels
    }

    /// Counts one grey slice's values (stored values with their rescale): integers within a
    /// range of 2^20 per rescale, as decoded DICOM stored values are.
    pub fn add(&mut self, image: &Image<'_>) -> Result<(), PreprocessError> {
        check_image(image)?;
        if image.samples != 1 {
            return Err(PreprocessError::Samples {
                samples: image.samples,
            });
        }
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for &v in image.data {
            if v.fract() != 0.0 {
                return Err(PreprocessError::VolumeValues);
            }
            lo = lo.min(v);
            hi = hi.max(v);
        }
        let (lo, hi) = (lo as i64, hi as i64);
        let group = match self
            .groups
            .iter()
            .position(|g| g.slope == image.slope && g.intercept == image.intercept)
        {
            Some(i) => &mut self.groups[i],
            None => {
                self.groups.push(ValueGroup {
                    slope: image.slope,
                    intercept: image.intercept,
                    min: lo,
                    counts: Vec::new(),
                });
                self.groups.last_mut().expect("just pushed")
            }
        };
        // Widen the group's range to [min(lo), max(hi)].
        let old_max = group.min + group.counts.len() as i64 - 1;
        let new_min = group.min.min(lo);
        let new_max = if group.counts.is_empty() {
            hi
        } else {
            old_max.max(hi)
        };
        if new_max - new_min >= 1 << 20 {
            return Err(PreprocessError::VolumeValues);
        }
        let len = (new_max - new_min + 1) as usize;
        if new_min < group.min || len > group.counts.len() {
            let mut counts = vec![0u64; len];
            let shift = (group.min - new_min) as usize;
            counts[shift..shift + group.counts.len()].copy_from_slice(&group.counts);
            group.counts = counts;
            group.min = new_min;
        }
        for &v in image.data {
            let c = &mut group.counts[(v as i64 - group.min) as usize];
            if *c == 0 {
                self.distinct += 1;
            }
            *c += 1;
        }
        self.voxels += image.data.len() as u64;
        if self.distinct > MAX_VOLUME_DISTINCT {
            return Err(PreprocessError::VolumeValues);
        }
        Ok(())
    }

    /// numpy's linear `low`th and `high`th percentiles of all the modality values
    /// (stored × slope + intercept, in f64) counted; None before any slice.
    pub fn percentiles(&self, low: f64, high: f64) -> Option<(f64, f64)> {
        if self.voxels == 0 {
            return None;
        }
        // Every distinct modality value with its count, ascending.
        let mut entries: Vec<(f64, u64)> = self
            .groups
            .iter()
            .flat_map(|g| {
                g.counts
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| **c > 0)
                    .map(move |(i, &c)| ((g.min + i as i64) as f64 * g.slope + g.intercept, c))
            })
            .collect();
        entries.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut ranked = SortedCounts {
            entries,
            n: self.voxels as usize,
            pos: 0,
            below: 0,
        };
        Some(modality_percentiles(&mut ranked, 1.0, low, high, |x| x))
    }
}

/// Ascending values with their counts, ranked by walking the counts.
struct SortedCounts {
    entries: Vec<(f64, u64)>,
    n: usize,
    pos: usize,
    below: u64,
}

impl Ranked for SortedCounts {
    fn len(&self) -> usize {
        self.n
    }

    fn at_rank(&mut self, k: usize) -> f64 {
        while self.below + self.entries[self.pos].1 <= k as u64 {
            self.below += self.entries[self.pos].1;
            self.pos += 1;
        }
        self.entries[self.pos].0
    }
}

impl Preprocessing {
    /// The window of a volume: the fixed window, or the percentiles of `values` (every slice
    /// counted); None for a percentile window with no values.
    pub fn volume_window(&self, values: &VolumeValues) -> Option<(f64, f64)> {
        match self.window {
            Window::Fixed { .. } => self.fixed_window(),
            Window::Percentile { low, high } => values.percentiles(low, high),
        }
    }

    /// How many values the model input of a volume of `slices` slices resampled to `depth`
    /// (`None`: kept) holds; refused over [`MAX_VOLUME_VALUES`].
    pub fn volume_values(
        &self,
        slices: usize,
        depth: Option<usize>,
    ) -> Result<usize, PreprocessError> {
        let [height, width] = self.size;
        let depth = depth.unwrap_or(slices);
        if slices == 0 || depth == 0 {
            return Err(PreprocessError::VolumeSlices { slices, index: 0 });
        }
        depth
            .checked_mul(height * width)
            .filter(|&v| v <= MAX_VOLUME_VALUES)
            .ok_or(PreprocessError::VolumeTooLarge {
                depth,
                height,
                width,
                values: depth.saturating_mul(height).saturating_mul(width),
            })
    }

    /// A volume input of `slices` slices (given one at a time, in volume order, to
    /// [`VolumeInput::push`]) resampled to `depth` slices (`None`: kept as they are), each
    /// slice preprocessed with the volume's `window`.
    pub fn volume_input(
        &self,
        slices: usize,
        depth: Option<usize>,
        window: (f64, f64),
    ) -> Result<VolumeInput, PreprocessError> {
        let [height, width] = self.size;
        let values = self.volume_values(slices, depth)?;
        let depth = depth.unwrap_or(slices);
        Ok(VolumeInput {
            pre: self.clone(),
            window,
            slices,
            bins: bins(slices, depth),
            plane: height * width,
            data: vec![0.0; values],
            next: 0,
        })
    }
}

/// A volume model input being filled slice by slice ([`Preprocessing::volume_input`]): each
/// slice is preprocessed (steps 1–7 with the volume's window) and added to every output
/// slice whose bin holds it: output slice `i` of `D` from `N` slices is the mean of slices
/// `⌊iN/D⌋ .. ⌈(i+1)N/D⌉ − 1` (step 6's area rule along the slice axis: averaging when
/// `N > D`, replication when `N < D`, the slices themselves when `N = D`).
#[derive(Debug)]
pub struct VolumeInput {
    pre: Preprocessing,
    window: (f64, f64),
    slices: usize,
    bins: Vec<(usize, usize)>,
    plane: usize,
    data: Vec<f32>,
    next: usize,
}

impl VolumeInput {
    /// Slices of the model input (`D`).
    pub fn depth(&self) -> usize {
        self.bins.len()
    }

    /// Slices given so far.
    pub fn pushed(&self) -> usize {
        self.next
    }

    /// The next slice, in volume order.
    pub fn push(&mut self, image: &Image<'_>) -> Result<(), PreprocessError> {
        let k = self.next;
        if k >= self.slices {
            return Err(PreprocessError::VolumeSlices {
                slices: self.slices,
                index: k,
            });
        }
        let slice = self.pre.apply_windowed(image, self.window)?;
        for (i, &(start, end)) in self.bins.iter().enumerate() {
            if (start..end).contains(&k) {
                let weight = 1.0 / (end - start) as f64;
                let out = &mut self.data[i * self.plane..(i + 1) * self.plane];
                for (o, &v) in out.iter_mut().zip(&slice) {
                    *o += (f64::from(v) * weight) as f32;
                }
            }
        }
        self.next += 1;
        Ok(())
    }

    /// The model input, `D × height × width` row-major, once every slice is given.
    pub fn finish(self) -> Result<Vec<f32>, PreprocessError> {
        if self.next != self.slices {
            return Err(PreprocessError::VolumeSlices {
                slices: self.slices,
                index: self.next,
            });
        }
        Ok(self.data)
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

/// Values that can be ranked: the value at ascending rank `k`, for ranks asked in
/// increasing order.
trait Ranked {
    fn len(&self) -> usize;
    /// The value at ascending rank `k`; `k` never decreases between calls.
    fn at_rank(&mut self, k: usize) -> f64;
}

/// An f32 copy (grey) or f64 copy (luma), reordered by selection: after selecting rank k,
/// `v[k..]` holds the ranks from k up (in some order), so a later rank selects in there.
struct Selection<'a, T> {
    v: &'a mut [T],
    start: usize,
}

impl<'a, T> Selection<'a, T> {
    fn new(v: &'a mut [T]) -> Self {
        Selection { v, start: 0 }
    }
}

macro_rules! ranked_selection {
    ($ty:ty) => {
        impl Ranked for Selection<'_, $ty> {
            fn len(&self) -> usize {
                self.v.len()
            }

            fn at_rank(&mut self, k: usize) -> f64 {
                let start = self.start;
                if k == start + 1 && start > 0 {
                    // The next rank: the least of those above the last selected.
                    let x = self.v[k..]
                        .iter()
                        .copied()
                        .fold(<$ty>::INFINITY, <$ty>::min);
                    // v[..k] are the k least, v[k..] the rest: later ranks select in there.
                    let (i, _) = self.v[k..]
                        .iter()
                        .enumerate()
                        .find(|(_, y)| y.total_cmp(&x).is_eq())
                        .expect("the minimum is present");
                    self.v.swap(k, k + i);
                    self.start = k;
                    return f64::from(x);
                }
                let (_, x, _) = self.v[start..].select_nth_unstable_by(k - start, <$ty>::total_cmp);
                let x = *x;
                self.start = k;
                f64::from(x)
            }
        }
    };
}
ranked_selection!(f32);
ranked_selection!(f64);

/// Counts of integer values over `[min, max]` (at most 2^20 bins, 4 MiB).
struct Histogram {
    min: i64,
    counts: Vec<u32>,
    n: usize,
    // The walk's position: bins before `bin` hold `below` values.
    bin: usize,
    below: usize,
}

impl Histogram {
    const MAX_BINS: i64 = 1 << 20;

    /// None when the values are not integers in a small enough range.
    fn new(data: &[f32]) -> Option<Self> {
        let (mut min, mut max) = (f32::INFINITY, f32::NEG_INFINITY);
        for &v in data {
            min = min.min(v);
            max = max.max(v);
        }
        if data.is_empty() || f64::from(max) - f64::from(min) >= Self::MAX_BINS as f64 {
            return None;
        }
        let min = min as i64;
        let mut counts = vec![0u32; (max as i64 - min + 1) as usize];
        for &v in data {
            if v.fract() != 0.0 {
                return None;
            }
            counts[(v as i64 - min) as usize] += 1;
        }
        Some(Histogram {
            min,
            counts,
            n: data.len(),
            bin: 0,
            below: 0,
        })
    }
}

impl Ranked for Histogram {
    fn len(&self) -> usize {
        self.n
    }

    fn at_rank(&mut self, k: usize) -> f64 {
        while self.below + self.counts[self.bin] as usize <= k {
            self.below += self.counts[self.bin] as usize;
            self.bin += 1;
        }
        (self.min + self.bin as i64) as f64
    }
}

/// numpy's linear `low`th and `high`th percentiles of the modality values
/// `to_modality(v)` of the ranked stored values `v`, `to_modality` being `x · slope +
/// intercept` (increasing for a positive slope, decreasing for a negative one): the
/// modality value at ascending rank j is `to_modality` of the stored value at rank j, or at
/// rank n − 1 − j when the slope is negative. Equal, value for value, to selecting on the
/// modality values themselves.
fn modality_percentiles(
    v: &mut impl Ranked,
    slope: f64,
    low: f64,
    high: f64,
    to_modality: impl Fn(f64) -> f64,
) -> (f64, f64) {
    if high < low {
        let (h, l) = modality_percentiles(v, slope, high, low, to_modality);
        return (l, h);
    }
    let n = v.len();
    let position = |q: f64| {
        let idx = q / 100.0 * (n - 1) as f64;
        let i = (idx.floor() as usize).min(n - 1);
        (i, idx - i as f64)
    };
    let (il, tl) = position(low);
    let (ih, th) = position(high);
    // Modality ranks needed: il (+1 when interpolating), ih (+1).
    let mut ranks: Vec<usize> = vec![il, ih];
    if tl != 0.0 && il + 1 < n {
        ranks.push(il + 1);
    }
    if th != 0.0 && ih + 1 < n {
        ranks.push(ih + 1);
    }
    let stored_rank = |j: usize| if slope < 0.0 { n - 1 - j } else { j };
    let mut stored: Vec<usize> = ranks.iter().map(|&j| stored_rank(j)).collect();
    stored.sort_unstable();
    stored.dedup();
    let values: Vec<(usize, f64)> = stored.iter().map(|&k| (k, v.at_rank(k))).collect();
    let modality_at = |j: usize| {
        let k = stored_rank(j);
        let x = values
            .iter()
            .find(|(r, _)| *r == k)
            .expect("rank selected")
            .1;
        to_modality(x)
    };
    let at = |i: usize, t: f64| {
        let a = modality_at(i);
        if t == 0.0 || i + 1 >= n {
            return a;
        }
        lerp(a, modality_at(i + 1), t)
    };
    (at(il, tl), at(ih, th))
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

    /// The model input mapped back over the source lands where it came from: a linear ramp
    /// preprocessed (pad + area resize) and resampled onto the source grid is the ramp again
    /// (to the resize's averaging), padding and all, for both aspects.
    #[test]
    fn geometry_maps_the_model_input_back_onto_the_source() {
        for (aspect, rows, cols) in [
            (Aspect::Pad, 40, 80),
            (Aspect::Pad, 80, 40),
            (Aspect::Stretch, 40, 80),
        ] {
            let p = spec(
                Window::Fixed {
                    center: 0.5,
                    width: 1.0,
                },
                aspect,
                [20, 20],
            );
            // Value = column fraction + row fraction / 4, on the 0-1 display scale.
            let data: Vec<f32> = (0..rows * cols)
                .map(|i| {
                    ((i % cols) as f32 + 0.5) / cols as f32 * 0.75
                        + ((i / cols) as f32 + 0.5) / rows as f32 * 0.25
                })
                .collect();
            let image = Image::grey(rows, cols, &data);
            let input = p.apply_to_vec(&image).unwrap();
            let g = p.geometry(rows, cols);
            assert_eq!((g.height, g.width), (20, 20));
            let back = g.to_source(&input, rows, cols);
            assert_eq!(back.len(), rows * cols);
            // Away from the edges (where clamping and the padding's zeros enter), back = data
            // within the resize's half-bin of blur on a linear ramp (exact for a linear ramp).
            let margin_r = rows / 5;
            let margin_c = cols / 5;
            for r in margin_r..rows - margin_r {
                for c in margin_c..cols - margin_c {
                    let (got, want) = (back[r * cols + c], data[r * cols + c]);
                    assert!(
                        (got - want).abs() < 0.02,
                        "{aspect:?} {rows}x{cols} at ({r},{c}): {got} vs {want}"
                    );
                }
            }
        }
    }

    /// numpy.percentile's linear method by a full sort (the definition).
    fn numpy_percentile(v: &[f64], q: f64) -> f64 {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let idx = q / 100.0 * (s.len() - 1) as f64;
        let i = idx.floor() as usize;
        let t = idx - i as f64;
        if t == 0.0 || i + 1 >= s.len() {
            s[i]
        } else {
            lerp(s[i], s[i + 1], t)
        }
    }

    #[test]
    fn percentiles_match_numpy_linear() {
        // numpy.percentile([1, 2, 3, 4, 10], [0, 25, 90, 100]) = [1, 2, 7.6, 10]
        let id = |x: f64| x;
        let data = [10.0f32, 3.0, 1.0, 4.0, 2.0];
        let mut v = data.to_vec();
        assert_eq!(
            modality_percentiles(&mut Selection::new(&mut v), 1.0, 0.0, 100.0, id),
            (1.0, 10.0)
        );
        let mut v = data.to_vec();
        let (a, b) = modality_percentiles(&mut Selection::new(&mut v), 1.0, 25.0, 90.0, id);
        assert_eq!(a, 2.0);
        assert!((b - 7.6).abs() < 1e-12, "{b}");
        let mut h = Histogram::new(&data).unwrap();
        assert_eq!(modality_percentiles(&mut h, 1.0, 25.0, 90.0, id), (a, b));
        let mut v = data.to_vec();
        assert_eq!(
            modality_percentiles(&mut Selection::new(&mut v), 1.0, 90.0, 25.0, id),
            (b, a),
            "either order"
        );
        let mut one = vec![5.0f32];
        assert_eq!(
            modality_percentiles(&mut Selection::new(&mut one), 1.0, 1.0, 99.0, id),
            (5.0, 5.0)
        );
    }

    #[test]
    fn selecting_on_stored_values_equals_selecting_on_modality_values() {
        // Integer and fractional values, positive and negative slopes, ties: every way of
        // selecting equals numpy's definition on the modality values, bit for bit.
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = |m: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % m
        };
        for n in [1usize, 2, 3, 10, 999, 4096] {
            let ints: Vec<f32> = (0..n).map(|_| next(300) as f32 - 100.0).collect();
            let fracs: Vec<f32> = ints.iter().map(|&x| x + 0.37).collect();
            for (slope, intercept) in [(1.0, 0.0), (2.5, -1024.0), (-0.7, 33.0), (-1.0, 0.0)] {
                let f = |x: f64| x * slope + intercept;
                for (low, high) in [(0.5, 99.5), (0.0, 100.0), (25.0, 75.0), (1.0, 2.0)] {
                    for data in [&ints, &fracs] {
                        let modality: Vec<f64> = data.iter().map(|&x| f(f64::from(x))).collect();
                        let want = (
                            numpy_percentile(&modality, low),
                            numpy_percentile(&modality, high),
                        );
                        let mut copy = data.clone();
                        let got = modality_percentiles(
                            &mut Selection::new(&mut copy),
                            slope,
                            low,
                            high,
                            f,
                        );
                        assert_eq!(got, want, "select n={n} slope={slope} q={low},{high}");
                        if let Some(mut h) = Histogram::new(data) {
                            let got = modality_percentiles(&mut h, slope, low, high, f);
                            assert_eq!(got, want, "histogram n={n} slope={slope}");
                        }
                        let mut wide: Vec<f64> = data.iter().map(|&x| f64::from(x)).collect();
                        let got = modality_percentiles(
                            &mut Selection::new(&mut wide),
                            slope,
                            low,
                            high,
                            f,
                        );
                        assert_eq!(got, want, "f64 n={n} slope={slope}");
                    }
                }
            }
        }
        assert!(Histogram::new(&[0.5, 1.0]).is_none(), "fractions");
        assert!(Histogram::new(&[0.0, 2e6]).is_none(), "too wide");
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
