//! Burned-in text: ASCII lines in the public-domain 8×8 bitmap font of the `font8x8` crate,
//! white on a black band added below the image, scaled to the image's width.
//!
//! The band is appended (the image itself is not covered) unless that would take the image
//! past 65535 rows; then it covers the bottom rows. Text that does not fit is clipped: a
//! 2-pixel-wide image gets an illegible but valid band, never a panic.

use font8x8::legacy::BASIC_LEGACY;

/// At most this many text lines; more findings are summarised on the last line.
pub(crate) const MAX_LINES: usize = 24;
/// Glyph size of the font in pixels, before scaling.
const GLYPH: usize = 8;
/// The widest scale used (64-pixel glyphs), whatever the image's width.
const MAX_SCALE: usize = 8;

/// The scale for `lines` on an image `columns` wide: one glyph pixel per 512 image columns
/// (a 2000-pixel radiograph gets 24-pixel glyphs), reduced until the longest line fits, never
/// under 1.
pub(crate) fn scale_for(columns: usize, lines: &[String]) -> usize {
    let longest = lines.iter().map(|l| l.len()).max().unwrap_or(0).max(1);
    let wanted = (columns / 512).clamp(1, MAX_SCALE);
    // Width of the longest line at scale s, with a glyph's width of margin on each side.
    let fits = columns / (GLYPH * (longest + 2));
    wanted.min(fits).max(1)
}

/// Fewer characters than this per line is too narrow to wrap into: lines are clipped.
const MIN_WRAP: usize = 8;
/// At most this many lines after wrapping (the band stays a band on narrow images).
pub(crate) const MAX_WRAPPED: usize = 64;

/// The scale and the lines to draw: on an image too narrow for a line at scale 1, lines are
/// wrapped at spaces (long words cut) so the warning stays whole; under [`MIN_WRAP`]
/// characters per line they are clipped instead.
pub(crate) fn layout(columns: usize, lines: &[String]) -> (usize, Vec<String>) {
    let s = scale_for(columns, lines);
    let room = (columns / (GLYPH * s)).saturating_sub(2);
    if room < MIN_WRAP {
        return (s, lines.iter().take(MAX_WRAPPED).cloned().collect());
    }
    let mut out = Vec::new();
    for line in lines {
        let mut current = String::new();
        for word in line.split(' ') {
            let mut word = word;
            loop {
                let sep = usize::from(!current.is_empty());
                if current.len() + sep + word.len() <= room {
                    if sep == 1 {
                        current.push(' ');
                    }
                    current.push_str(word);
                    break;
                }
                if !current.is_empty() {
                    out.push(std::mem::take(&mut current));
                    continue;
                }
                // A word longer than a line: cut it.
                let (head, tail) = word.split_at(room);
                out.push(head.to_owned());
                word = tail;
            }
        }
        out.push(current);
    }
    out.truncate(MAX_WRAPPED);
    (s, out)
}

/// Rows the band takes at scale `s`: a glyph-high margin above and below the text, and
/// lines 10 glyph pixels apart.
pub(crate) fn band_rows(lines: usize, s: usize) -> usize {
    s * (GLYPH + lines * (GLYPH + 2))
}

/// ASCII only (the font's basic block): anything else becomes `?`.
pub(crate) fn ascii_line(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// Burn `lines` into `pixels` (`rows`×`columns`, `samples` bytes per pixel, interleaved).
/// Returns the new row count; `pixels` grows by the band when it is appended.
#[cfg(test)]
pub(crate) fn burn(
    pixels: &mut Vec<u8>,
    rows: usize,
    columns: usize,
    samples: usize,
    lines: &[String],
) -> usize {
    burn_band(pixels, rows, columns, samples, lines, None)
}

/// [`burn`], and under the text, where the image is RGB and `bar` is given, a colour bar:
/// `LOW`, the colours of `bar` from left to right across the band, `HIGH` (the legend of a
/// heatmap). A grey image gets no bar. This is the band of every Nightingale result image,
/// public so that the heatmap PNG of `/explain` carries the same legend.
/// The rows [`burn_band`] makes an image of `rows` × `columns` (in all, band included), to
/// size an image before it is drawn.
pub fn band_height(rows: usize, columns: usize, lines: &[String], bar: bool) -> usize {
    let (s, lines) = layout(columns, lines);
    let band = band_rows(lines.len() + usize::from(bar), s);
    if rows + band <= usize::from(u16::MAX) {
        rows + band
    } else {
        rows
    }
}

pub fn burn_band(
    pixels: &mut Vec<u8>,
    rows: usize,
    columns: usize,
    samples: usize,
    lines: &[String],
    bar: Option<&[[u8; 3]]>,
) -> usize {
    let bar = bar.filter(|b| samples == 3 && !b.is_empty());
    let (s, lines) = layout(columns, lines);
    let band = band_rows(lines.len() + usize::from(bar.is_some()), s);
    let stride = columns * samples;
    let (top, total) = if rows + band <= usize::from(u16::MAX) {
        pixels.resize((rows + band) * stride, 0);
        (rows, rows + band)
    } else {
        let top = rows.saturating_sub(band);
        pixels[top * stride..].fill(0);
        (top, rows)
    };
    let canvas = Canvas {
        columns,
        samples,
        total,
        s,
    };
    for (n, line) in lines.iter().enumerate() {
        let y0 = top + s * (GLYPH / 2 + n * (GLYPH + 2));
        canvas.text(pixels, s * GLYPH, y0, line);
    }
    if let Some(bar) = bar {
        let y0 = top + s * (GLYPH / 2 + lines.len() * (GLYPH + 2));
        let (low, high) = ("LOW", "HIGH");
        let x_bar = s * GLYPH * (low.len() + 2);
        let x_end = columns.saturating_sub(s * GLYPH * (high.len() + 2));
        canvas.text(pixels, s * GLYPH, y0, low);
        if x_end > x_bar {
            let width = x_end - x_bar;
            for x in x_bar..x_end {
                let colour = bar[((x - x_bar) * bar.len() / width).min(bar.len() - 1)];
                for y in y0..(y0 + s * GLYPH).min(total) {
                    let at = y * columns * 3 + x * 3;
                    pixels[at..at + 3].copy_from_slice(&colour);
                }
            }
            canvas.text(pixels, x_end + s * GLYPH, y0, high);
        }
    }
    total
}

/// Where text is drawn: the image's geometry and the glyph scale.
struct Canvas {
    columns: usize,
    samples: usize,
    total: usize,
    s: usize,
}

impl Canvas {
    /// White `text` with its top-left corner at (`x0`, `y0`), clipped to the image.
    fn text(&self, pixels: &mut [u8], x0: usize, y0: usize, text: &str) {
        let (s, columns, samples) = (self.s, self.columns, self.samples);
        let stride = columns * samples;
        for (k, ch) in text.bytes().enumerate() {
            let x0 = x0 + s * GLYPH * k;
            if x0 >= columns {
                break;
            }
            let glyph = BASIC_LEGACY[usize::from(ch & 0x7f)];
            for (gy, bits) in glyph.iter().enumerate() {
                for gx in 0..GLYPH {
                    if bits & (1 << gx) == 0 {
                        continue;
                    }
                    for dy in 0..s {
                        let y = y0 + gy * s + dy;
                        if y >= self.total {
                            break;
                        }
                        for dx in 0..s {
                            let x = x0 + gx * s + dx;
                            if x >= columns {
                                break;
                            }
                            let at = y * stride + x * samples;
                            pixels[at..at + samples].fill(255);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(texts: &[&str]) -> Vec<String> {
        texts.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn scale_follows_width_and_fits_the_longest_line() {
        let l = lines(&["AI RESULT - NOT FOR DIAGNOSIS WITHOUT REVIEW"]);
        assert_eq!(scale_for(1841, &l), 3);
        assert_eq!(scale_for(128, &l), 1);
        // 44 characters + 2 margins at scale 2 need 736 columns.
        assert_eq!(scale_for(1100, &l), 2);
        assert_eq!(scale_for(735, &l), 1);
        assert_eq!(scale_for(100_000, &l), MAX_SCALE);
    }

    #[test]
    fn band_is_appended_black_with_white_text() {
        let l = lines(&["I"]);
        let (rows, columns) = (4, 40);
        let mut px = vec![100u8; rows * columns];
        let total = burn(&mut px, rows, columns, 1, &l);
        assert_eq!(total, rows + band_rows(1, 1));
        assert_eq!(px.len(), total * columns);
        // The image is untouched; the band holds only 0 and 255, and some 255.
        assert!(px[..rows * columns].iter().all(|&v| v == 100));
        let band = &px[rows * columns..];
        assert!(band.iter().all(|&v| v == 0 || v == 255));
        assert!(band.contains(&255));
    }

    #[test]
    fn tiny_and_tall_images_do_not_panic() {
        let l = lines(&[
            "AI RESULT - NOT FOR DIAGNOSIS WITHOUT REVIEW",
            &"x".repeat(5000),
        ]);
        for (rows, columns, samples) in [
            (1, 1, 1),
            (1, 1, 3),
            (2, 3, 3),
            (65535, 2, 1),
            (65530, 1, 3),
        ] {
            let mut px = vec![7u8; rows * columns * samples];
            let total = burn(&mut px, rows, columns, samples, &l);
            assert!(total <= 65535);
            assert_eq!(px.len(), total * columns * samples);
        }
    }

    #[test]
    fn narrow_images_wrap_lines_at_spaces() {
        let l = lines(&[
            "AI RESULT - NOT FOR DIAGNOSIS WITHOUT REVIEW",
            "abcdefghijklmnopqrstuvwxyz",
        ]);
        // 128 columns at scale 1: 16 glyphs, 14 characters between the margins.
        let (s, wrapped) = layout(128, &l);
        assert_eq!(s, 1);
        assert_eq!(
            wrapped,
            [
                "AI RESULT -",
                "NOT FOR",
                "DIAGNOSIS",
                "WITHOUT REVIEW",
                "abcdefghijklmn",
                "opqrstuvwxyz"
            ]
        );
        // Too narrow to wrap into: clipped, as given.
        assert_eq!(layout(40, &l).1, l);
        // Wide enough: untouched.
        assert_eq!(layout(2000, &l).1, l);
        assert!(layout(128, &lines(&[&"word ".repeat(1000)])).1.len() <= MAX_WRAPPED);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Any size, either sample count, any printable text: no panic, a whole image back,
        /// never over 65535 rows, the image untouched when the band is appended.
        #[test]
        fn burn_never_panics(
            rows in 1usize..400,
            columns in 1usize..400,
            rgb in proptest::bool::ANY,
            texts in proptest::collection::vec("[ -~]{0,120}", 0..30),
        ) {
            let samples = if rgb { 3 } else { 1 };
            let mut px = vec![9u8; rows * columns * samples];
            let total = burn(&mut px, rows, columns, samples, &texts);
            proptest::prop_assert!(total >= rows && total <= 65535);
            proptest::prop_assert_eq!(px.len(), total * columns * samples);
            if total > rows {
                proptest::prop_assert!(px[..rows * columns * samples].iter().all(|&v| v == 9));
            }
        }
    }

    #[test]
    fn a_colour_bar_runs_low_to_high_under_the_text_of_an_rgb_image() {
        let l = lines(&["HEATMAP"]);
        let bar: Vec<[u8; 3]> = (0..=255u8).map(|v| [v, 0, 255 - v]).collect();
        let (rows, columns) = (10, 300);
        let mut px = vec![50u8; rows * columns * 3];
        let total = burn_band(&mut px, rows, columns, 3, &l, Some(&bar));
        assert_eq!(total, rows + band_rows(2, 1));
        assert!(px[..rows * columns * 3].iter().all(|&v| v == 50));
        // The bar's row: its first coloured pixel is the low end, its last the high end.
        let y = rows + GLYPH / 2 + (GLYPH + 2) + GLYPH / 2;
        let row = &px[y * columns * 3..(y + 1) * columns * 3];
        let coloured: Vec<&[u8]> = row.chunks(3).filter(|p| p[2] > 0 && p[0] != 255).collect();
        assert!(coloured.len() > 200, "{}", coloured.len());
        assert_eq!(coloured.first().unwrap(), &&[0u8, 0, 255][..]);
        assert_eq!(coloured.last().unwrap(), &&[254u8, 0, 1][..]);
        // A grey image gets no bar (and no extra line).
        let mut grey = vec![50u8; rows * columns];
        assert_eq!(
            burn_band(&mut grey, rows, columns, 1, &l, Some(&bar)),
            rows + band_rows(1, 1)
        );
    }

    #[test]
    fn non_ascii_becomes_question_marks() {
        assert_eq!(ascii_line("Lésion\tx"), "L?sion?x");
    }
}
