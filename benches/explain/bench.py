"""Cost of an explanation vs the batched inference of as many rows (docs/performance.md §13).

Starts a release `serve --explain` on models/bundles (tract), then for each case times
`/explain` (median of --reps) and, in the same run, `/infer` of the same number of rows sent
as the explanation sends them: batches of the model's max_batch_size, two in flight, binary
tensors; and the engine time spent inside each explanation (the statistics extension's
compute_input + compute_infer + compute_output of batch_stats, before and after). The overhead is
explain ÷ engine − 1 (target < 20 %): what the explanation costs beyond its forward passes.

    cargo build --release
    .venv/bin/python benches/explain/bench.py [--reps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import concurrent.futures as cf
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np
import requests
import tritonclient.http as httpclient

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "peer"))
from conftest import _free_port, wait_ready  # noqa: E402


@contextlib.contextmanager
def explain_server(binary: str, max_forward_passes: int):
    """A `serve --explain` on models/bundles on a free port, its data in a temporary folder;
    yields its address and stops it afterwards."""
    url = f"127.0.0.1:{_free_port()}"
    tmp = Path(tempfile.mkdtemp(prefix="nightingale-explain-bench-"))
    log = tmp / "server.log"
    cmd = [binary, "serve", "--repository", "models/bundles", "--http-addr", url,
           "--audit-log", str(tmp / "audit.jsonl"), "--data-dir", str(tmp / "data"),
           "--explain", "--explain-max-forward-passes", str(max_forward_passes)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, url, log)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def body(name: str, x: np.ndarray, parameters: dict | None, outputs: list[str] | None):
    inp = httpclient.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    outs = [httpclient.InferRequestedOutput(o, binary_data=True) for o in outputs] if outputs else None
    b, n = httpclient.InferenceServerClient.generate_request_body([inp], outputs=outs, parameters=parameters)
    return b, {"Inference-Header-Content-Length": str(n)}


def engine_ns(session, url, model) -> int:
    """The model's engine time so far: its executions' compute input + infer + output, from
    the statistics extension's batch_stats (one entry per execution; inference_stats charges
    every request of a batch the batch's time, as Triton does)."""
    st = session.get(f"http://{url}/v2/models/{model}/stats", timeout=30).json()["model_stats"]
    return sum(b[k]["ns"] for s in st for b in s["batch_stats"]
               for k in ("compute_input", "compute_infer", "compute_output"))


def time_explain(session, url, model, name, x, parameters, reps):
    b, h = body(name, x, parameters, None)
    times, engine, passes = [], [], None
    for _ in range(reps):
        before = engine_ns(session, url, model)
        t = time.perf_counter()
        r = session.post(f"http://{url}/v2/models/{model}/explain", data=b, headers=h, timeout=600)
        times.append(time.perf_counter() - t)
        engine.append((engine_ns(session, url, model) - before) / 1e9)
        assert r.status_code == 200, r.text
        hl = int(r.headers["Inference-Header-Content-Length"])
        res = httpclient.InferResult.from_response_body(r.content, header_length=hl)
        out = [o for o in res.get_response()["outputs"] if o["name"].endswith(("_saliency", "_attribution"))][0]
        passes = out["parameters"]["forward_passes"]
    return statistics.median(times), statistics.median(engine), passes


def time_infer(url, model, name, row, rows, batch, output, reps):
    """`rows` rows in batches of `batch`, two requests in flight (as /explain drives them)."""
    x = np.repeat(row[None], batch, axis=0)
    full = body(name, x, None, [output])
    last = rows % batch
    tail = body(name, x[:last], None, [output]) if last else None
    n_full = rows // batch
    times = []
    with requests.Session() as s1, requests.Session() as s2, cf.ThreadPoolExecutor(2) as pool:
        sessions = [s1, s2]

        def post(i, b):
            r = sessions[i % 2].post(f"http://{url}/v2/models/{model}/infer", data=b[0], headers=b[1], timeout=600)
            assert r.status_code == 200, r.text

        for _ in range(reps):
            t = time.perf_counter()
            jobs = [pool.submit(post, i, full) for i in range(n_full)]
            if tail:
                jobs.append(pool.submit(post, n_full, tail))
            for j in jobs:
                j.result()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--bin", default=str(REPO / "target" / "release" / "nightingale"))
    args = ap.parse_args()
    with explain_server(args.bin, 100000) as url:
        wdbc = tomllib.loads((REPO / "models/bundles/wdbc-malignancy/bundle.toml").read_text())
        bg = np.array(wdbc["explain"]["background"], dtype=np.float32)
        x_tab = bg[:1] * np.float32(1.1)
        rng = np.random.default_rng(0)
        x_img = rng.normal(0, 1, (1, 1, 224, 224)).astype(np.float32)
        x_les = rng.normal(0, 1, (1, 1, 128, 128)).astype(np.float32)
        cases = [
            ("wdbc-malignancy", "features", x_tab, {"method": "kernel_shap", "samples": 512}, 64, "probabilities"),
            ("image-orientation", "image", x_img, {"method": "occlusion", "patch": 16, "stride": 16}, 16, "misoriented"),
            ("image-orientation", "image", x_img, {"method": "rise", "samples": 500, "grid": 8}, 16, "misoriented"),
            # The lesion model (128×128): occlusion as its card's pointing game and the DICOM
            # heatmap (patch 16, stride 8: a 15×15 grid), and RISE.
            ("lesion-detection", "image", x_les, {"method": "occlusion", "patch": 16, "stride": 8}, 32, "lesion"),
            ("lesion-detection", "image", x_les, {"method": "rise", "samples": 500, "grid": 8}, 32, "lesion"),
        ]
        print("| model | method | forward passes | explain (median) | passes/s | engine time in it | explain ÷ engine | /infer of as many rows (Python client) | explain ÷ infer |")
        print("|---|---|---|---|---|---|---|---|---|")
        with requests.Session() as s:
            for model, name, x, params, batch, output in cases:
                t_exp, t_eng, passes = time_explain(s, url, model, name, x, params, args.reps)
                t_inf = time_infer(url, model, name, x[0], passes, batch, output, args.reps)
                label = params["method"] + "".join(f" {k}={v}" for k, v in params.items() if k != "method")
                print(f"| {model} | {label} | {passes} | {t_exp * 1000:.1f} ms | {passes / t_exp:,.0f} | "
                      f"{t_eng * 1000:.1f} ms | {t_exp / t_eng:.2f}× | {t_inf * 1000:.1f} ms | {t_exp / t_inf:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
