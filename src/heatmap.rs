//! Saliency heatmaps for people: a saliency map drawn over the image it explains.
//!
//! The map is shown in d3's *inferno* colour map (perceptually uniform and readable in grey
//! scale; the `colorous` crate's port of d3-scale-chromatic), laid over the image in grey.
//! What is drawn is the **positive evidence for the explained class only**: a saliency value
//! is divided by the map's largest value, negative values (regions whose removal *raises*
//! the score) count as zero, and the colour's opacity rises linearly from 0 at 15 % of the
//! maximum to [`MAX_ALPHA`] at the maximum, so weak evidence leaves the anatomy visible.
//! A map with no positive value draws nothing (and says so in its caption).
//!
//! Two users: the DICOM pipeline's Secondary Capture (the map resampled onto the source
//! frame through [`InputGeometry`]) and `/explain`'s `heatmap` parameter (a PNG of the model
//! input, the same legend band as the Secondary Capture under it).

use nightingale_models::preprocess::InputGeometry;

/// Opacity of the colour at the map's maximum.
pub const MAX_ALPHA: f32 = 0.7;
/// Fraction of the maximum under which nothing is drawn.
pub const FLOOR: f32 = 0.15;
/// Steps of the colour map in the legend.
const STEPS: usize = 256;

/// The colour map, low to high, for the legend.
pub fn colours() -> Vec<[u8; 3]> {
    (0..STEPS)
        .map(|i| {
            let c = colorous::INFERNO.eval_rational(i, STEPS);
            [c.r, c.g, c.b]
        })
        .collect()
}

/// How saliency values become colours: relative to the map's largest (positive) value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scale {
    max: f32,
}

impl Scale {
    /// The scale of `map`; `None` when it has no positive finite value (nothing to draw).
    pub fn of(map: &[f32]) -> Option<Scale> {
        let max = map
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .fold(0.0f32, f32::max);
        (max > 0.0).then_some(Scale { max })
    }

    /// A value's level in `[0, 1]` (0 for negative, non-finite or absent evidence).
    pub fn level(&self, v: f32) -> f32 {
        if v.is_finite() {
            (v / self.max).clamp(0.0, 1.0)
        } else {
            0.0
        }
    }
}

/// `grey` (one byte per pixel) with colour `level` blended over it.
fn blend(grey: u8, level: f32, lut: &[[u8; 3]]) -> [u8; 3] {
    let alpha = MAX_ALPHA * ((level - FLOOR) / (1.0 - FLOOR)).clamp(0.0, 1.0);
    if alpha == 0.0 {
        return [grey; 3];
    }
    let colour = lut[((level * (lut.len() - 1) as f32).round() as usize).min(lut.len() - 1)];
    let g = f32::from(grey);
    colour.map(|c| (g + (f32::from(c) - g) * alpha).round().clamp(0.0, 255.0) as u8)
}

/// The grey value of an 8-bit pixel of `samples` bytes (RGB: ITU-R BT.601 luma).
fn grey_of(px: &[u8]) -> u8 {
    match px {
        [r, g, b] => (0.299 * f32::from(*r) + 0.587 * f32::from(*g) + 0.114 * f32::from(*b))
            .round()
            .clamp(0.0, 255.0) as u8,
        [v, ..] => *v,
        [] => 0,
    }
}

/// `map` (on the model input, `geometry.height × geometry.width`) resampled onto and laid
/// over `image` (`rows × cols` 8-bit pixels of `samples` 1 or 3 bytes, interleaved), as RGB.
/// The image is shown in grey beneath, whatever its colours.
pub fn overlay(
    image: &[u8],
    samples: usize,
    rows: usize,
    cols: usize,
    geometry: &InputGeometry,
    map: &[f32],
) -> Vec<u8> {
    assert_eq!(image.len(), rows * cols * samples, "an image of its size");
    let mut out = vec![0u8; rows * cols * 3];
    let Some(scale) = Scale::of(map) else {
        for (o, px) in out.chunks_exact_mut(3).zip(image.chunks_exact(samples)) {
            o.fill(grey_of(px));
        }
        return out;
    };
    let lut = colours();
    geometry.for_each_source_row(map, rows, cols, |r, row| {
        let src = &image[r * cols * samples..(r + 1) * cols * samples];
        let dst = &mut out[r * cols * 3..(r + 1) * cols * 3];
        for ((o, px), &v) in dst
            .chunks_exact_mut(3)
            .zip(src.chunks_exact(samples))
            .zip(row)
        {
            o.copy_from_slice(&blend(grey_of(px), scale.level(v), &lut));
        }
    });
    out
}

/// A model input (one image plane, any value range) as 8-bit grey: its minimum black, its
/// maximum white.
pub fn plane_to_grey(plane: &[f32]) -> Vec<u8> {
    let (lo, hi) = plane
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    let span = hi - lo;
    plane
        .iter()
        .map(|&v| {
            if span > 0.0 && v.is_finite() {
                ((v - lo) / span * 255.0).round().clamp(0.0, 255.0) as u8
            } else {
                0
            }
        })
        .collect()
}

/// The caption of a heatmap of `method` explaining `target`.
pub fn caption(method: &str, target: &str, map: &[f32]) -> String {
    if Scale::of(map).is_some() {
        format!("HEATMAP: {method} saliency for {target} (evidence for it; none drawn below 15%)")
    } else {
        format!("HEATMAP: {method} found no evidence for {target} (nothing drawn)")
    }
}

/// The pixels of the image [`input_png`] draws for an input of `height` × `width` with
/// `lines`, before it draws it.
pub fn input_png_pixels(height: usize, width: usize, lines: &[String]) -> usize {
    let cols = width.max(min_columns(lines));
    cols.saturating_mul(nightingale_dicom::results::band_height(
        height, cols, lines, true,
    ))
}

/// At least wide enough for the caption at the font's scale 1 (centred on black).
fn min_columns(lines: &[String]) -> usize {
    8 * (lines.iter().map(String::len).max().unwrap_or(0) + 2)
}

/// The heatmap PNG of one model-input image (`/explain`'s `heatmap` parameter): the image
/// (its first channel, or the mean of its channels, black to white over its own range) with
/// `map` laid over it, and under it the band of every Nightingale result image: `lines`
/// and the colour bar.
pub fn input_png(
    input: &[f32],
    channels: usize,
    height: usize,
    width: usize,
    map: &[f32],
    lines: &[String],
) -> Result<Vec<u8>, image::ImageError> {
    let plane_len = height * width;
    let plane: Vec<f32> = if channels <= 1 {
        input[..plane_len].to_vec()
    } else {
        (0..plane_len)
            .map(|i| (0..channels).map(|c| input[c * plane_len + i]).sum::<f32>() / channels as f32)
            .collect()
    };
    let grey = plane_to_grey(&plane);
    let geometry = InputGeometry::identity(height, width);
    let mut rgb = overlay(&grey, 1, height, width, &geometry, map);
    let min = min_columns(lines);
    let (cols, mut rgb) = if width < min {
        let left = (min - width) / 2;
        let mut out = vec![0u8; height * min * 3];
        for (dst, src) in out
            .chunks_exact_mut(min * 3)
            .zip(rgb.chunks_exact(width * 3))
        {
            dst[left * 3..(left + width) * 3].copy_from_slice(src);
        }
        (min, out)
    } else {
        (width, std::mem::take(&mut rgb))
    };
    let rows =
        nightingale_dicom::results::burn_band(&mut rgb, height, cols, 3, lines, Some(&colours()));
    png(&rgb, rows, cols)
}

/// An RGB image (`rows × cols × 3`) as PNG bytes.
pub fn png(rgb: &[u8], rows: usize, cols: usize) -> Result<Vec<u8>, image::ImageError> {
    let mut out = std::io::Cursor::new(Vec::new());
    let too_large = || {
        image::ImageError::Parameter(image::error::ParameterError::from_kind(
            image::error::ParameterErrorKind::DimensionMismatch,
        ))
    };
    let w = u32::try_from(cols).map_err(|_| too_large())?;
    let h = u32::try_from(rows).map_err(|_| too_large())?;
    image::write_buffer_with_format(
        &mut out,
        rgb,
        w,
        h,
        image::ExtendedColorType::Rgb8,
        image::ImageFormat::Png,
    )?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nightingale_models::Preprocessing;

    fn geometry(size: usize, rows: usize, cols: usize) -> InputGeometry {
        let p: Preprocessing = toml::from_str(&format!(
            "kind = \"image\"\ninput = \"x\"\nsize = [{size}, {size}]\n[window]\nmethod = \"percentile\"\nlow = 0.0\nhigh = 100.0\n"
        ))
        .unwrap();
        p.geometry(rows, cols)
    }

    #[test]
    fn the_colour_map_runs_dark_to_bright() {
        let c = colours();
        assert_eq!(c.len(), STEPS);
        let luma = |p: [u8; 3]| grey_of(&p);
        assert!(
            luma(c[0]) < 20 && luma(c[255]) > 200,
            "{:?} {:?}",
            c[0],
            c[255]
        );
        // Perceptual maps rise monotonically in lightness; check the luma does, in steps of 16.
        for k in (16..STEPS).step_by(16) {
            assert!(luma(c[k]) >= luma(c[k - 16]), "{k}");
        }
    }

    #[test]
    fn only_positive_evidence_is_drawn_and_where_it_lies() {
        // A 4 x 4 model input over an 8 x 8 grey source: evidence in the top-left quarter,
        // counter-evidence in the bottom-right.
        let mut map = vec![0.0f32; 16];
        map[0] = 1.0;
        map[1] = 1.0;
        map[4] = 1.0;
        map[5] = 1.0;
        map[15] = -5.0;
        let image = vec![100u8; 64];
        let g = geometry(4, 8, 8);
        let rgb = overlay(&image, 1, 8, 8, &g, &map);
        assert_eq!(rgb.len(), 8 * 8 * 3);
        let px = |r: usize, c: usize| &rgb[(r * 8 + c) * 3..(r * 8 + c) * 3 + 3];
        // Coloured (not grey) at the evidence, plain grey at the counter-evidence and away.
        assert!(px(1, 1)[0] != px(1, 1)[2], "{:?}", px(1, 1));
        assert_eq!(px(7, 7), [100, 100, 100]);
        assert_eq!(px(0, 7), [100, 100, 100]);
        // No evidence at all: the image in grey, unchanged.
        let none = overlay(&image, 1, 8, 8, &g, &[-1.0; 16]);
        assert!(none.iter().all(|&v| v == 100));
        assert!(caption("occlusion", "present", &[-1.0; 16]).contains("no evidence"));
    }

    #[test]
    fn non_finite_saliency_draws_nothing_and_does_not_panic() {
        let g = geometry(2, 3, 5);
        let rgb = overlay(
            &[7u8; 45],
            3,
            3,
            5,
            &g,
            &[f32::NAN, f32::INFINITY, -0.0, 1.0],
        );
        assert_eq!(rgb.len(), 45);
        assert_eq!(Scale::of(&[f32::NAN, f32::NEG_INFINITY]), None);
    }

    #[test]
    fn png_round_trips_through_the_image_decoder() {
        let rgb: Vec<u8> = (0..(5 * 3 * 3)).map(|i| (i * 5) as u8).collect();
        let bytes = png(&rgb, 3, 5).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let back = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
            .unwrap()
            .to_rgb8();
        assert_eq!((back.width(), back.height()), (5, 3));
        assert_eq!(back.into_raw(), rgb);
    }

    #[test]
    fn an_input_png_has_the_image_the_map_and_the_legend() {
        let (h, w) = (16, 16);
        let input: Vec<f32> = (0..h * w).map(|i| i as f32).collect();
        let mut map = vec![0.0f32; h * w];
        map[5 * w + 5] = 1.0;
        let lines = vec!["HEATMAP: occlusion saliency for present".to_owned()];
        let bytes = input_png(&input, 1, h, w, &map, &lines).unwrap();
        let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
            .unwrap()
            .to_rgb8();
        // Widened for the caption, taller by the band.
        assert_eq!(img.width() as usize, 8 * (lines[0].len() + 2));
        assert!(img.height() as usize > h);
        let left = (img.width() as usize - w) / 2;
        let p = img.get_pixel((left + 5) as u32, 5).0;
        assert!(p[0] != p[2], "coloured at the evidence: {p:?}");
        let q = img.get_pixel((left + 12) as u32, 12).0;
        assert!(q[0] == q[1] && q[1] == q[2], "grey elsewhere: {q:?}");
    }

    #[test]
    fn a_plane_spans_black_to_white() {
        assert_eq!(plane_to_grey(&[-2.0, 0.0, 2.0]), [0, 128, 255]);
        assert_eq!(plane_to_grey(&[1.0, 1.0]), [0, 0]);
    }
}
