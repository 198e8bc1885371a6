"""The pointing game of every image explanation method on the lesion-detection test split,
through `/explain` of a running server (docs/explain.md, "Pointing game").

For each held-out test image with an inserted lesion (150), the method's saliency map of
P(present) is asked from the server, and a hit is its maximum inside the lesion's mask dilated
by 2 px (the plateau pixel nearest the centroid of the maximal pixels: the training script's
rule, `lesion_detection.saliency_peak`). The reference is a point drawn uniformly over the
image, whose hit probability is the dilated mask's area fraction exactly; the P-value is the
exact Poisson-binomial tail of the observed hits under it.

Methods: `occlusion` (patch 16, stride 8, baseline 0: the card's) on the ONNX bundle,
`rise` (500 masks, grid 8) on the ONNX bundle, `grad_cam` and `integrated_gradients`
(baseline 0, --steps) on the candle bundle of the same weights. Nothing here is an expected
value: occlusion and Grad-CAM maps are held to onnxruntime + numpy by tests/peer/test_lesion.py
and tests/peer/test_candle.py; this measures what the maps point at.

    cargo build --release
    .venv/bin/python benches/explain/pointing_game.py [--steps 32] [--methods grad_cam,...]

Starts its own release server on models/bundles (`--explain`).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import tritonclient.http as httpclient

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "peer"))
sys.path.insert(0, str(REPO / "models" / "train"))
sys.path.insert(0, str(REPO / "benches" / "explain"))
from bench import explain_server  # noqa: E402
import lesion_detection as ld  # noqa: E402

ONNX_BUNDLE = "lesion-detection"
CANDLE_BUNDLE = "lesion-detection-candle"


def method_parameters(method: str, steps: int) -> tuple[str, dict]:
    """The bundle that computes `method`, and its /explain parameters (target: present)."""
    if method == "occlusion":
        return ONNX_BUNDLE, {"method": "occlusion", "patch": ld.OCC_PATCH, "stride": ld.OCC_STRIDE,
                             "baseline": ld.OCC_BASELINE}
    if method == "rise":
        return ONNX_BUNDLE, {"method": "rise", "samples": 500, "grid": 8, "seed": 0}
    if method == "grad_cam":
        return CANDLE_BUNDLE, {"method": "grad_cam"}
    if method == "integrated_gradients":
        return CANDLE_BUNDLE, {"method": "integrated_gradients", "steps": steps, "baseline": 0.0}
    raise ValueError(method)


def saliency(url: str, model: str, x: np.ndarray, parameters: dict, timeout: float = 1800) -> np.ndarray:
    """`lesion_saliency` [N, 128, 128] of P(present) for the images x [N, 1, 128, 128]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    inp = httpclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    outs = [httpclient.InferRequestedOutput("lesion_saliency", binary_data=True)]
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [inp], outputs=outs, parameters={**parameters, "target": "present"})
    r = requests.post(f"http://{url}/v2/models/{model}/explain", data=body,
                      headers={"Inference-Header-Content-Length": str(json_size)}, timeout=timeout)
    assert r.status_code == 200, r.text
    res = httpclient.InferResult.from_response_body(
        r.content, header_length=int(r.headers["Inference-Header-Content-Length"]))
    sal = res.as_numpy("lesion_saliency")
    assert sal.shape == (len(x), 128, 128), sal.shape
    return sal.astype(np.float64)


def load_split(folder: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    if folder is None:
        folder = REPO / "models" / "bundles" / ONNX_BUNDLE / "testdata"
    if not (folder / "images.npy").exists():
        folder = Path(tempfile.mkdtemp(prefix="lesion-testdata-"))
        subprocess.run([sys.executable, str(REPO / "models/train/lesion_detection.py"), "--testdata-only",
                        "--out", str(folder)], cwd=REPO, check=True, timeout=900)
    with open(folder / "meta.csv", newline="") as f:
        meta = list(csv.DictReader(f))
    return np.load(folder / "images.npy"), np.load(folder / "labels.npy"), np.load(folder / "masks.npy"), meta


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(REPO / "target" / "release" / "nightingale"))
    ap.add_argument("--methods", default="occlusion,rise,grad_cam,integrated_gradients")
    ap.add_argument("--steps", type=int, default=32, help="integrated gradients' path points")
    ap.add_argument("--batch", type=int, default=8, help="images per /explain request")
    ap.add_argument("--testdata", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()
    x, y, masks, meta = load_split(args.testdata)
    positives = np.flatnonzero(y == 1)

    results = {}
    with explain_server(args.bin, 1000000) as url:
        for method in args.methods.split(","):
            model, params = method_parameters(method, args.steps)
            started = time.perf_counter()
            maps = []
            for i in range(0, len(positives), args.batch):
                maps.extend(saliency(url, model, x[positives[i:i + args.batch]], params))
            r = ld.pointing_score(maps, masks[positives])
            r["seconds"] = time.perf_counter() - started
            r["parameters"] = params
            r["model"] = model
            per_source = {}
            for s in sorted({meta[i]["source"] for i in positives}):
                sel = [j for j, i in enumerate(positives) if meta[i]["source"] == s]
                per_source[s] = int(sum(r["per_image_hit"][j] for j in sel)), len(sel)
            r["per_source"] = per_source
            results[method] = r
            print(f"{method} on {model}: {r['hits']}/{r['n']} hits ({100 * r['hit_rate']:.1f}%), random points expect "
                  f"{r['random_expected_hits']:.2f}, P(>= {r['hits']}) = {r['p_random_at_least']:.1e}; per source "
                  + ", ".join(f"{s} {h}/{n}" for s, (h, n) in per_source.items())
                  + f" ({r['seconds']:.0f} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
