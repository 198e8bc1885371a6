"""The numpy reference preprocessing (models/train/imaging.py) on frames of the same sizes and
value range as benches/preprocess.rs, for a side-by-side ratio:
    cargo bench --bench preprocess && .venv/bin/python benches/preprocess_numpy.py
"""

import sys
import timeit
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "models" / "train"))
from imaging import Preprocessing, preprocess  # noqa: E402

# As declared in models/bundles/image-orientation/bundle.toml.
SPEC = Preprocessing(height=224, width=224, window="percentile", low=0.5, high=99.5,
                     aspect="pad", pad_value=0.0, mean=0.5, std=0.25)

for name, rows, cols in [("cr-1955x1841", 1955, 1841), ("ct-512x512", 512, 512)]:
    img = np.random.default_rng(0).integers(6000, 16000, (rows, cols)).astype(np.float32)
    t = min(timeit.repeat(lambda: preprocess(img, SPEC, 1.0, 0.0, True), number=1, repeat=7))
    print(f"numpy preprocess {name}: {t * 1e3:.2f} ms (best of 7)")
