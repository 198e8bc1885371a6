"""Image preprocessing as a bundle declares it in `[preprocessing]`, in numpy.

This is the reference for `nightingale_models::preprocess` (Rust): the same steps in
the same order, computed in float64 and returned as float32. The fixtures written by
`make_preprocess_fixtures.py` hold both implementations to each other. The steps
(docs/bundle-format.md, "Preprocessing"):

  1. colour (RGB) pixels become luma, 0.299 R + 0.587 G + 0.114 B; a 2-D image is used as is;
  2. modality values: stored * RescaleSlope + RescaleIntercept;
  3. window to [0, 1]: `percentile` (low/high percentiles of this image, numpy's default
     linear interpolation) or `fixed` (center/width, e.g. a CT window in HU); values
     outside are clipped; a window of zero width maps everything to 0;
  4. MONOCHROME1 (white = low values) is inverted: x = 1 - x;
  5. aspect `pad`: centred on a square of side max(rows, cols) filled with `pad_value`
     (left/top padding = floor(excess / 2)); `stretch`: no padding;
  6. resize to [height, width] by area averaging: output pixel i along an axis of
     N input pixels and n output pixels averages inputs floor(i N / n) to
     ceil((i + 1) N / n) - 1 (exact box filter for downsampling, pixel replication for
     upsampling); done along rows, then along columns;
  7. normalise: (x - mean) / std; the result has shape [1, height, width].

`preprocess_volume` is the same for a volume (`[dicom] inference = "volume"`): the slices, in
volume order, share ONE window (the percentiles of all their modality values together, or the
fixed window), each slice then goes through steps 4-7, and
  8. the stack of slices is resized along the slice axis to the model's depth by the area
     rule of step 6 (no resize when the model takes any depth).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Preprocessing:
    height: int = 224
    width: int = 224
    window: str = "percentile"  # percentile | fixed
    low: float = 0.5  # percentile window
    high: float = 99.5
    window_center: float = 0.0  # fixed window
    window_width: float = 1.0
    aspect: str = "pad"  # pad | stretch
    pad_value: float = 0.0
    mean: float = 0.5
    std: float = 0.25

    def toml(self, input_name: str) -> str:
        lines = [
            "[preprocessing]",
            'kind = "image"',
            f'input = "{input_name}"',
            f"size = [{self.height}, {self.width}]",
            f'aspect = "{self.aspect}"',
            f"pad_value = {self.pad_value!r}",
            'resize = "area"',
            f"mean = {self.mean!r}",
            f"std = {self.std!r}",
            "",
            "[preprocessing.window]",
            f'method = "{self.window}"',
        ]
        if self.window == "percentile":
            lines += [f"low = {self.low!r}", f"high = {self.high!r}"]
        else:
            lines += [f"center = {self.window_center!r}", f"width = {self.window_width!r}"]
        return "\n".join(lines) + "\n"


def luma(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float64)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def percentile(values: np.ndarray, q: float) -> float:
    """numpy's default ('linear') percentile: with the values sorted ascending as a[0..n),
    position q / 100 * (n - 1) interpolated linearly between its two neighbours. The Rust
    side computes the same."""
    return float(np.percentile(values.astype(np.float64), q, method="linear"))


def window_bounds(v: np.ndarray, spec: Preprocessing) -> tuple[float, float]:
    """The window's (low, high) in modality units for the values `v` (any shape)."""
    if spec.window == "percentile":
        return percentile(v, spec.low), percentile(v, spec.high)
    if spec.window == "fixed":
        return spec.window_center - spec.window_width / 2.0, spec.window_center + spec.window_width / 2.0
    raise ValueError(spec.window)


def window01(v: np.ndarray, spec: Preprocessing, bounds: tuple[float, float] | None = None) -> np.ndarray:
    lo, hi = bounds if bounds is not None else window_bounds(v, spec)
    if not hi > lo:
        return np.zeros_like(v, dtype=np.float64)
    return np.clip((v - lo) / (hi - lo), 0.0, 1.0)


def area_resize_axis(a: np.ndarray, n: int, axis: int) -> np.ndarray:
    big_n = a.shape[axis]
    i = np.arange(n, dtype=np.int64)
    start = (i * big_n) // n
    end = -((-(i + 1) * big_n) // n)
    c = np.cumsum(a, axis=axis, dtype=np.float64)
    zero_shape = list(a.shape)
    zero_shape[axis] = 1
    c = np.concatenate([np.zeros(zero_shape), c], axis=axis)
    s = np.take(c, end, axis=axis) - np.take(c, start, axis=axis)
    count = (end - start).astype(np.float64)
    shape = [1] * a.ndim
    shape[axis] = n
    return s / count.reshape(shape)


def pad_square(x: np.ndarray, value: float) -> np.ndarray:
    rows, cols = x.shape
    side = max(rows, cols)
    out = np.full((side, side), value, dtype=np.float64)
    top, left = (side - rows) // 2, (side - cols) // 2
    out[top : top + rows, left : left + cols] = x
    return out


def preprocess(
    pixels: np.ndarray,
    spec: Preprocessing,
    slope: float = 1.0,
    intercept: float = 0.0,
    monochrome1: bool = False,
) -> np.ndarray:
    """A 2-D stored-value image (or rows x cols x 3 RGB) -> float32 [1, height, width]."""
    v = luma(pixels) if pixels.ndim == 3 else pixels.astype(np.float64)
    if v.ndim != 2 or v.size == 0:
        raise ValueError(f"expected a non-empty 2-D image, got shape {pixels.shape}")
    v = v * slope + intercept
    y = after_window(window01(v, spec), spec, monochrome1)
    return y.astype(np.float32)[None, :, :]


def after_window(x: np.ndarray, spec: Preprocessing, monochrome1: bool) -> np.ndarray:
    """Steps 4-7 on a windowed 0-1 image: MONOCHROME1 inversion, pad, area resize, normalise."""
    if monochrome1:
        x = 1.0 - x
    if spec.aspect == "pad":
        x = pad_square(x, spec.pad_value)
    x = area_resize_axis(x, spec.height, 0)
    x = area_resize_axis(x, spec.width, 1)
    return (x - spec.mean) / spec.std


def preprocess_volume(
    slices: list[np.ndarray],
    spec: Preprocessing,
    depth: int | None = None,
    slopes: list[float] | None = None,
    intercepts: list[float] | None = None,
    monochrome1: bool = False,
) -> np.ndarray:
    """Grey 2-D stored-value slices, in volume order, with each slice's rescale -> float32
    [depth, height, width] (depth None: one output slice per input slice)."""
    n = len(slices)
    if n == 0:
        raise ValueError("a volume needs at least one slice")
    slopes = slopes if slopes is not None else [1.0] * n
    intercepts = intercepts if intercepts is not None else [0.0] * n
    modality = [s.astype(np.float64) * a + b for s, a, b in zip(slices, slopes, intercepts)]
    if any(m.ndim != 2 or m.shape != modality[0].shape for m in modality):
        raise ValueError("the slices must be 2-D and of one size")
    bounds = window_bounds(np.concatenate([m.ravel() for m in modality]), spec)
    out = []
    for v in modality:
        out.append(after_window(window01(v, spec, bounds), spec, monochrome1))
    vol = np.stack(out)
    if depth is not None:
        vol = area_resize_axis(vol, depth, 0)
    return vol.astype(np.float32)


# --- the dihedral group D4: the eight ways an image can be displayed ------------------

ORIENTATION_LABELS = [
    "correct",
    "rotated-90-ccw",
    "rotated-180",
    "rotated-90-cw",
    "mirrored",
    "mirrored-rotated-90-ccw",
    "mirrored-rotated-180",
    "mirrored-rotated-90-cw",
]


def d4(img: np.ndarray, k: int) -> np.ndarray:
    """Transform k of ORIENTATION_LABELS applied to an image's last two axes: mirror
    left-right first when k >= 4, then rotate (k mod 4) x 90 degrees counter-clockwise."""
    if k >= 4:
        img = np.flip(img, axis=-1)
    return np.ascontiguousarray(np.rot90(img, k % 4, axes=(-2, -1)))
