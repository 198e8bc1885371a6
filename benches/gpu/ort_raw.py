#!/usr/bin/env python3
"""Raw ONNX Runtime in-process, the peer of benches/gpu/run.sh: each bundle's model.onnx on
the CUDA execution provider and on the CPU one (one intra-op thread per logical CPU),
at the given batch sizes, the same random rows the server is sent afterwards. Prints one JSON
line per (bundle, provider, batch): rows/s and latency of back-to-back `run` calls (input
copied from host memory and output back, as the server does), and, per bundle, the largest
difference between the CUDA and CPU outputs. Writes each bundle's rows and CPU outputs to
DIR/<bundle>.npz for benches/gpu/kserve_load.py to check the server's answers against.

    python3 benches/gpu/ort_raw.py --out DIR --seconds 2 models/bench/resnet50-arch:1,8,64 ...
"""

import argparse
import json
import os
import time
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort


def bundle_io(bundle: Path) -> tuple[str, list[int], str]:
    manifest = tomllib.loads((bundle / "bundle.toml").read_text())
    inp = manifest["inputs"][0]
    # The first FP32 output (wdbc's first is its INT64 label).
    out = next(o for o in manifest["outputs"] if o["datatype"] == "FP32")
    return inp["name"], inp["shape"][1:], out["name"]


def timed(session, name: str, x: np.ndarray, seconds: float) -> dict:
    for _ in range(3):
        session.run(None, {name: x})
    lat = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(lat) < 5:
        t = time.perf_counter()
        session.run(None, {name: x})
        lat.append(time.perf_counter() - t)
    lat_ms = np.array(lat) * 1e3
    total = float(np.sum(lat))
    return {"calls": len(lat), "rows_per_s": len(lat) * x.shape[0] / total,
            "p50_ms": float(np.percentile(lat_ms, 50)), "p99_ms": float(np.percentile(lat_ms, 99))}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("bundles", nargs="+", help="BUNDLE_DIR:BATCH,BATCH,...")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"onnxruntime": ort.__version__, "available": ort.get_available_providers(),
                      "device": ort.get_device()}), flush=True)
    for spec in a.bundles:
        path, batches = spec.split(":")
        bundle = Path(path)
        batches = [int(b) for b in batches.split(",")]
        name, dims, output = bundle_io(bundle)
        # The version the server answers with: the highest (wdbc-malignancy has two).
        version = max(int(d.name) for d in bundle.iterdir() if d.is_dir() and d.name.isdigit())
        model = str(bundle / str(version) / "model.onnx")
        rng = np.random.default_rng(0)
        x = rng.random((max(batches), *dims), dtype=np.float32)
        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        cpu = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        # The server's CUDA options (inference/src/backend/ort.rs): FP32, heuristic cuDNN choice.
        cuda_options = {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}
        cuda = ort.InferenceSession(model, providers=[("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"])
        if cuda.get_providers()[0] != "CUDAExecutionProvider" and not os.environ.get("NG_GPU_DRY_RUN"):
            raise SystemExit(f"{bundle.name}: the CUDA execution provider did not register: {cuda.get_providers()}")
        out_names = [o.name for o in cpu.get_outputs()]
        ref = cpu.run(None, {name: x})[out_names.index(output)]
        got = cuda.run(None, {name: x})[out_names.index(output)]
        np.savez(a.out / f"{bundle.name}.npz", x=x, y=ref, output=output)
        print(json.dumps({"bundle": bundle.name, "rows": int(x.shape[0]),
                          "max_abs_diff_cuda_vs_cpu": float(np.max(np.abs(got - ref)))}), flush=True)
        for provider, session in (("cuda", cuda), ("cpu", cpu)):
            for b in batches:
                r = timed(session, name, x[:b], a.seconds)
                print(json.dumps({"bundle": bundle.name, "engine": "raw-onnxruntime", "provider": provider,
                                  "batch": b, **r}), flush=True)


if __name__ == "__main__":
    main()
