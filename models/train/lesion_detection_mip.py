"""The `lesion-detection-mip` reference VOLUME bundle: the lesion-detection CNN on the
maximum-intensity projection (MIP) of a volume, for Nightingale's per-volume DICOM pipeline
(`[dicom] inference = "volume"`, docs/bundle-format.md).

Nothing is trained. The ONNX graph is built with the `onnx` helper from the committed
lesion-detection model (`models/bundles/lesion-detection/1/model.onnx`, its SHA-256 checked
against that bundle's manifest): one node in front of it,

    volume [N, 1, D, 128, 128]  --ReduceMax(axis 2)-->  image [N, 1, 128, 128]  --> the lesion CNN

so the model takes a preprocessed volume (every slice windowed with ONE window over the whole
volume, padded, area-resized to 128 x 128 and normalised, then resampled along the slice axis
to D slices when D is fixed) and answers P(simulated nodule present) on its MIP. MIP over a
slab is a real radiology technique (nodules stand out as bright dots on CT slab MIPs); the
weights have never seen a MIP, which the model card says.

The bundle is NOT shipped in models/bundles (a shipped bundle gets every CT/MR series with no
configuration, next to lesion-detection itself: two results from the same weights). It is
written to a repository folder of your choice (default models/volume/, git-ignored), checked
with onnxruntime, given its load-time self-test (selftest.py) and checksums, and signed with
the demonstration key like the shipped bundles (NIGHTINGALE_BIN=<built nightingale> to skip
`cargo run`; --no-sign to leave it unsigned):

    .venv/bin/python models/train/lesion_detection_mip.py [--out models/volume]
        [--depth D] [--name lesion-detection-mip]
    nightingale serve --repository models/volume ...

--depth -1 (the default) takes any number of slices (the MIP is over the series' own slices,
none resampled); a fixed --depth D makes the pipeline resample every volume to D slices
(area rule along the slice axis) before the MIP. Everything is deterministic: the same
lesion model gives the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import selftest  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LESION = REPO / "models" / "bundles" / "lesion-detection"
SCRIPT = "models/train/lesion_detection_mip.py"
NAME = "lesion-detection-mip"
INPUT = "volume"
SEED = 20261203
SELFTEST_ROWS = 2
SELFTEST_ANY_DEPTH = 5  # slices of the self-test volumes when the model takes any depth
MIN_SLICES = 2
MAX_SLICES = 1024


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def lesion_manifest() -> dict:
    manifest = tomllib.loads((LESION / "bundle.toml").read_text(encoding="utf-8"))
    digest = sha256(LESION / "1" / "model.onnx")
    if manifest["versions"]["1"]["files"]["model.onnx"] != digest:
        raise SystemExit("models/bundles/lesion-detection/1/model.onnx does not match its manifest")
    return manifest


def build_model(depth: int) -> onnx.ModelProto:
    """The lesion model with a ReduceMax over the slice axis in front of it."""
    model = onnx.load(str(LESION / "1" / "model.onnx"))
    graph = model.graph
    [image] = [i for i in graph.input if i.name == "image"]
    dims = image.type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [1, 128, 128], dims
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    d = depth if depth > 0 else "D"
    volume = helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", 1, d, 128, 128])
    if opset >= 18:
        axes = helper.make_tensor("mip_axes", TensorProto.INT64, [1], [2])
        graph.initializer.append(axes)
        mip = helper.make_node("ReduceMax", [INPUT, "mip_axes"], ["image"], keepdims=0, name="mip")
    else:
        mip = helper.make_node("ReduceMax", [INPUT], ["image"], axes=[2], keepdims=0, name="mip")
    graph.input.remove(image)
    graph.input.insert(0, volume)
    graph.node.insert(0, mip)
    model.producer_name = f"nightingale {SCRIPT}"
    model.doc_string = ("lesion-detection version 1 on the maximum-intensity projection over the slice axis of a "
                        "preprocessed volume (ReduceMax, axis 2)")
    onnx.checker.check_model(model, full_check=True)
    return model


def check_model(path: Path, depth: int) -> dict:
    """onnxruntime: the MIP model equals the lesion model on numpy's max over the slice axis."""
    mip = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    lesion = ort.InferenceSession(str(LESION / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(SEED)
    worst = 0.0
    depths = [depth] if depth > 0 else [1, 2, 7]
    for d in depths:
        x = rng.standard_normal((3, 1, d, 128, 128)).astype(np.float32)
        got = mip.run(None, {INPUT: x})[0]
        want = lesion.run(None, {"image": x.max(axis=2)})[0]
        worst = max(worst, float(np.abs(got - want).max()))
    if worst > 1e-6:
        raise SystemExit(f"the MIP model differs from lesion-detection on the numpy MIP by {worst}")
    print(f"  onnxruntime: the MIP model equals lesion-detection on numpy's MIP (depths {depths}, max |diff| {worst:.1e})")
    return {"depths_checked": depths, "max_abs_difference": worst}


def write_selftest(vdir: Path, depth: int) -> None:
    d = depth if depth > 0 else SELFTEST_ANY_DEPTH
    rng = np.random.default_rng(selftest.SEED)
    x = rng.standard_normal((SELFTEST_ROWS, 1, d, 128, 128)).astype(np.float32)
    selftest.write_selftest(vdir / "model.onnx", {INPUT: x}, vdir / "selftest.json")


def preprocessing_toml(pre: dict) -> str:
    w = pre["window"]
    window = (f'method = "percentile"\nlow = {w["low"]!r}\nhigh = {w["high"]!r}' if w["method"] == "percentile"
              else f'method = "fixed"\ncenter = {w["center"]!r}\nwidth = {w["width"]!r}')
    return f"""[preprocessing]
kind = "image"
input = "{INPUT}"
size = [{pre["size"][0]}, {pre["size"][1]}]
aspect = "{pre.get("aspect", "pad")}"
pad_value = {float(pre.get("pad_value", 0.0))!r}
resize = "area"
mean = {float(pre.get("mean", 0.0))!r}
std = {float(pre.get("std", 1.0))!r}

[preprocessing.window]
{window}
"""


def limitations(lesion: dict, depth: int) -> list[str]:
    mine = [
        "A technical reference for the per-volume DICOM pipeline, NOT a clinical detector: the lesion-detection "
        "weights, unchanged, on the maximum-intensity projection of a volume; nothing was trained or validated on MIPs",
        "The weights have only seen single 2-D images windowed on their own; a MIP is brighter and flatter (the brightest "
        "voxel along each ray, e.g. bone on CT), its window is the whole volume's, and how the model's output, its "
        "calibration and its operating threshold change on MIPs is unknown",
        "The MIP is over the preprocessed slices (each already area-resized to 128 x 128), not over the full-resolution "
        "slices: a small bright focus is averaged in-plane before the maximum is taken",
        (f"The pipeline resamples every volume to {depth} slices (area rule along the slice axis: thin slices are averaged "
         "before the maximum, which lowers small bright foci)" if depth > 0 else
         "Any number of slices (2 to 1024) is taken as it is: a longer volume projects more anatomy onto one image"),
        "The threshold is lesion-detection's, chosen on single images; it is carried over, not re-chosen",
    ]
    theirs = [f"lesion-detection: {item}" for item in lesion["intended_use"]["limitations"]]
    return mine + theirs


def write_bundle(out: Path, name: str, depth: int) -> Path:
    lesion = lesion_manifest()
    bundle = out / name
    vdir = bundle / "1"
    vdir.mkdir(parents=True, exist_ok=True)
    onnx.save(build_model(depth), str(vdir / "model.onnx"))
    check = check_model(vdir / "model.onnx", depth)
    write_selftest(vdir, depth)
    (vdir / "check.json").write_text(json.dumps({
        "script": SCRIPT,
        "source_model": {"bundle": "lesion-detection", "version": 1, "sha256": sha256(LESION / "1" / "model.onnx")},
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        **check,
    }, indent=2) + "\n")
    files = {f: sha256(vdir / f) for f in ("model.onnx", "check.json", "selftest.json")}
    [thr] = [t for t in lesion["thresholds"] if t["output"] == "lesion"]
    d = depth if depth > 0 else -1
    depth_text = (f"{depth} slices (every volume resampled to {depth} along the slice axis)" if depth > 0
                  else "any number of slices (no resampling)")
    text = f"""# Generated by {SCRIPT} -- edit the script, not this file.
format_version = 1
name = "{name}"
task = "image-classification"
description = {toml_str("Technical reference for per-volume inference: lesion-detection's CNN on the maximum-intensity projection (MIP) over the slices of a CT or MR volume; a simulated-nodule detector that has never seen a MIP. NOT a clinical detector.")}
platform = "onnx"
backend = "any"

[version_policy]
policy = "latest"
latest = 1

# Volumes are large inputs: few per batch, short queue.
[batching]
max_batch_size = 4
max_queue_delay_us = 1000
preferred_batch_sizes = [4]
instances = 1
queue_capacity = 16

[[inputs]]
name = "{INPUT}"
datatype = "FP32"
shape = [-1, 1, {d}, 128, 128]
description = {toml_str(f"one grey-scale volume of {depth_text}, preprocessed as [preprocessing] declares with one window over the whole volume, in slice order")}

[[outputs]]
name = "lesion"
datatype = "FP32"
shape = [-1, 2]
description = "softmax [P(absent), P(present)] of a simulated nodule anywhere in the volume's MIP"
labels = ["absent", "present"]
positive_label = "present"
# the concept the SR codes the finding as (pydicom: codes.SCT.Nodule); a simulated one here
finding_code = {{ scheme = "SCT", value = "27925004", meaning = "Nodule" }}

[[thresholds]]
name = "{thr["name"]}"
output = "lesion"
label = "present"
value = {thr["value"]!r}
description = {toml_str("lesion-detection's threshold, carried over unchanged (chosen on single images, never on MIPs): " + thr["description"])}

{preprocessing_toml(lesion["preprocessing"]).rstrip()}

# What the DICOM pipeline sends it: a CT or MR series as ONE volume (the frames of one
# multi-frame object, or single-frame instances in slice order), one inference per series.
[dicom]
modalities = ["CT", "MR"]
photometric = ["MONOCHROME1", "MONOCHROME2"]
inference = "volume"
min_slices = {MIN_SLICES}
max_slices = {MAX_SLICES}
report = ["lesion"]

[intended_use]
summary = "A technical reference whose model is known (lesion-detection on a MIP), for testing Nightingale's per-volume DICOM pipeline. NOT a clinical detector; never use it on patients."
users = "Developers testing the per-volume imaging pipeline"
limitations = [
{chr(10).join("  " + toml_str(item) + "," for item in limitations(lesion, depth))}
]

[provenance]
training_data = "None: not trained. The weights are lesion-detection version 1's (see its provenance), with a ReduceMax over the slice axis in front"
data_licence = "MIT (pydicom, pydicom-data, deid-data packages, through lesion-detection); no images here"
model_licence = "Apache-2.0"
training_script = "{SCRIPT}"

{chr(10).join(selftest.selftest_toml())}

[versions.1]
description = {toml_str(f"ReduceMax over the slice axis (the MIP) + lesion-detection version 1 (sha256 {sha256(LESION / '1' / 'model.onnx')[:16]}...), ONNX opset 17; input depth {depth_text}")}
created = "2026-12-02"

[versions.1.files]
{chr(10).join(f'"{f}" = "{h}"' for f, h in files.items())}
"""
    parsed = tomllib.loads(text)
    assert parsed["dicom"]["inference"] == "volume" and parsed["preprocessing"]["input"] == INPUT
    (bundle / "bundle.toml").write_text(text, encoding="utf-8")
    write_model_card(bundle, name, depth, lesion, thr)
    return bundle


def write_model_card(bundle: Path, name: str, depth: int, lesion: dict, thr: dict) -> None:
    pre = lesion["preprocessing"]
    w = pre["window"]
    card = f"""# {name}

Generated by `{SCRIPT}` -- edit the script, not this file.

**A technical reference for Nightingale's per-volume DICOM pipeline, NOT a clinical
detector.** It is the [`lesion-detection`](../../bundles/lesion-detection/MODEL_CARD.md) model
(a small CNN that finds simulated "designer nodules" inserted into a handful of real images;
read its card first: every limitation there applies here) applied to the
**maximum-intensity projection (MIP)** of a volume. Nothing was trained.

## The model

`1/model.onnx` is built with the `onnx` helper from lesion-detection's `1/model.onnx`
(SHA-256 checked against its manifest): one `ReduceMax` node over the slice axis in front of
the unchanged CNN:

    volume [N, 1, {depth if depth > 0 else "D"}, 128, 128] --ReduceMax(axis 2)--> [N, 1, 128, 128] --> lesion CNN --> lesion [N, 2]

onnxruntime checks, when the script runs, that it equals lesion-detection on numpy's
maximum over the slice axis (`1/check.json`). The load-time self-test (`1/selftest.json`,
{SELFTEST_ROWS} seeded random volumes through onnxruntime) runs on every load.

## What the pipeline feeds it

`[dicom] inference = "volume"`: a CT or MR series of {MIN_SLICES} to {MAX_SLICES} slices (the
frames of one multi-frame object, or single-frame instances) becomes ONE input, in slice
order (positions projected on the slice normal; see docs/bundle-format.md, "Volumes"):

1. one window for the whole volume: the {w.get("low")}th to {w.get("high")}th percentiles of
   every voxel's modality value (lesion-detection's `[preprocessing]`, which windows each
   image on its own, applied to the volume as a radiologist windows a series);
2. each slice padded to a square, area-resized to 128 x 128, normalised ((x - {pre.get("mean")}) / {pre.get("std")});
3. {"resampled along the slice axis to " + str(depth) + " slices (area rule)" if depth > 0 else "no resampling: the model takes any number of slices"};
4. the model takes the maximum over the slices and runs the CNN on it.

One finding per series: P(present), with lesion-detection's threshold ({thr["value"]}),
carried over unchanged. The secondary capture shows the volume's middle slice.

## What MIP changes (and why this is not validated)

- The CNN saw single images, each windowed on its own range. A MIP is the brightest voxel
  along each ray: on CT, bone and contrast dominate it; its grey levels and textures are not
  those of any training image. Its output, calibration and the threshold's meaning on MIPs
  are unknown: no sensitivity, specificity or AUROC is claimed.
- The MIP is taken after each slice is downsampled to 128 x 128, so a nodule smaller than a
  few source pixels is averaged with its surroundings before the maximum.
- {"Resampling " + str(depth) + " slices from thin slices averages neighbouring slices before the maximum." if depth > 0 else "A longer volume projects more anatomy (and more bright structures) onto the one image the CNN sees."}

## Why not a trained 3-D model

No labelled volumes ship in the packages this project builds its references from: the only
real volumes there are a 2-frame Enhanced CT and a 10-frame 64 x 64 Enhanced MR (pydicom's
test files). A 3-D CNN trained on simulated nodules in those would be no better a reference
than this one, whose answer is known exactly (lesion-detection on numpy's MIP).

## Build and serve

    .venv/bin/python {SCRIPT} --out models/volume{"" if depth <= 0 else f" --depth {depth}"}
    nightingale serve --repository models/volume --dicom-port 11112 --results-destination AE@HOST:PORT

It is not shipped in `models/bundles`: there it would get every CT and MR series with no
configuration, beside lesion-detection (two results from the same weights per series).
"""
    (bundle / "MODEL_CARD.md").write_text(card, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "models" / "volume",
                    help="the repository folder to write the bundle into (default models/volume)")
    ap.add_argument("--depth", type=int, default=-1, help="slices the model takes (-1: any; default)")
    ap.add_argument("--name", default=NAME)
    ap.add_argument("--no-sign", action="store_true", help="leave bundle.toml unsigned")
    args = ap.parse_args(argv)
    if args.depth == 0 or args.depth < -1 or args.depth > MAX_SLICES:
        raise SystemExit(f"--depth must be -1 or 1 to {MAX_SLICES}")
    bundle = write_bundle(args.out, args.name, args.depth)
    print(f"  wrote {bundle}")
    if not args.no_sign:
        from signing import sign_bundle

        sign_bundle(bundle)
        print(f"  signed {bundle / 'bundle.toml.minisig'} (demonstration key)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
