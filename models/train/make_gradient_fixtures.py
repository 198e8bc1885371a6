"""Reference values for the candle backend's gradient explanations (tests/candle.rs), computed
by peers, never by Nightingale:

* tests/fixtures/gradients/gradcam-numpy.json -- Grad-CAM of lesion-detection from onnxruntime
  and numpy alone. The ONNX graph's `features_last` tensor A (made a graph output) comes from
  onnxruntime; the head after it is GlobalAveragePool -> Gemm (transB) -> Softmax, so the
  gradient of the target's logit with respect to A_k is the constant W[c, k] / (h*w) and
  Grad-CAM's map is ReLU(sum_k W[c, k] / (h*w) * A_k), exactly. Upsampled to 128x128 by a
  numpy bilinear interpolation written from PyTorch's definition (align_corners=False:
  source = (dst + 0.5) * in/out - 0.5, clamped at 0, the upper neighbour clamped at the edge).
  Needs numpy, onnx, onnxruntime (the peer-test venv).
* tests/fixtures/gradients/gradients-torch.json -- Grad-CAM and integrated gradients by torch's
  autograd on a torch re-implementation of the network from the candle bundle's safetensors
  (F.conv2d, F.relu, F.max_pool2d, mean, F.linear, softmax; F.interpolate bilinear for the
  map). Integrated gradients: baseline 0, the midpoint Riemann sum (captum's riemann_middle),
  on the served output (softmax probabilities). When captum is importable its
  IntegratedGradients must agree with these numbers (checked here). Written
  only where torch is importable (e.g. /work/main/.venv-train); CI reads the committed file.

Inputs: the 4 reference rows of models/bundles/lesion-detection/1/selftest.json (committed).

    python models/train/make_gradient_fixtures.py        # rewrites what its peers allow
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "models" / "bundles" / "lesion-detection"
CANDLE = REPO / "models" / "bundles" / "lesion-detection-candle" / "1"
OUT = REPO / "tests" / "fixtures" / "gradients"
IG_STEPS = 32
IG_ROWS = 2


def b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode()


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def selftest_inputs() -> np.ndarray:
    st = json.loads((BUNDLE / "1" / "selftest.json").read_text())
    inp = st["inputs"][0]
    return np.frombuffer(base64.b64decode(inp["data_base64"]), dtype="<f4").reshape(inp["shape"]).copy()


def bilinear(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """[N, h, w] -> [N, out_h, out_w], PyTorch's bilinear with align_corners=False."""

    def axis(n_in: int, n_out: int):
        scale = n_in / n_out
        src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i0 = np.minimum(i0, n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        frac = src - i0
        return i0, i1, frac

    y0, y1, fy = axis(x.shape[1], out_h)
    x0, x1, fx = axis(x.shape[2], out_w)
    top = x[:, y0][:, :, x0] * (1 - fx) + x[:, y0][:, :, x1] * fx
    bot = x[:, y1][:, :, x0] * (1 - fx) + x[:, y1][:, :, x1] * fx
    return top * (1 - fy)[None, :, None] + bot * fy[None, :, None]


def numpy_fixture(x: np.ndarray) -> dict:
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    path = BUNDLE / "1" / "model.onnx"
    m = onnx.load(str(path))
    gemm = next(n for n in m.graph.node if n.op_type == "Gemm")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs.get("transB") == 1 and attrs.get("alpha", 1.0) == 1.0, attrs
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    w = inits[gemm.input[1]].astype(np.float64)  # [classes, 64]
    m.graph.output.append(onnx.helper.make_tensor_value_info("features_last", onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    p, a = sess.run(["lesion", "features_last"], {"image": x})
    a = a.astype(np.float64)
    hw = a.shape[2] * a.shape[3]
    cams = {}
    for c in range(w.shape[0]):
        cams[c] = np.maximum(np.einsum("k,nkhw->nhw", w[c] / hw, a), 0.0)
    up = bilinear(cams[1][:1], x.shape[2], x.shape[3])
    return {
        "what": "Grad-CAM of lesion-detection on features_last, from onnxruntime + numpy (closed form of the GAP-Gemm head)",
        "script": "models/train/make_gradient_fixtures.py",
        "model_sha256": sha256(path),
        "inputs": "models/bundles/lesion-detection/1/selftest.json inputs[0] (4 rows)",
        "inputs_sha256": sha256(BUNDLE / "1" / "selftest.json"),
        "onnxruntime": ort.__version__,
        "probabilities": p.astype(float).tolist(),
        "cam_8x8": {str(c): cams[c].astype(float).tolist() for c in cams},
        "cam_128_row0_target1_f32_base64": b64(up[0]),
    }


def torch_fixture(x: np.ndarray) -> dict | None:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    from safetensors.numpy import load_file

    arch = json.loads((CANDLE / "architecture.json").read_text())
    t = {k: torch.from_numpy(v.astype(np.float64)) for k, v in load_file(str(CANDLE / "model.safetensors")).items()}
    convs = [layer for layer in arch["layers"] if layer["type"] == "conv2d"]

    def features(h):
        for layer in convs:
            h = F.relu(F.conv2d(h, t[layer["weight"]], t[layer["bias_tensor"]], padding=layer["padding"][0]))
            if layer["pool"]:
                h = F.max_pool2d(h, layer["pool"]["kernel_size"][0])
        return h

    def head(a):
        return F.linear(a.mean(dim=(2, 3)), t["fc.weight"], t["fc.bias"])

    def probs(h):
        return torch.softmax(head(features(h)), dim=1)

    xt = torch.from_numpy(x.astype(np.float64))
    # Grad-CAM: d logit_c / d A, with A = features_last.
    cams = {}
    for c in (0, 1):
        a = features(xt).detach().requires_grad_(True)
        head(a)[:, c].sum().backward()
        alpha = a.grad.mean(dim=(2, 3), keepdim=True)
        cams[c] = torch.relu((alpha * a).sum(dim=1, keepdim=True)).detach()
    up = F.interpolate(cams[1][:1], size=x.shape[2:], mode="bilinear", align_corners=False)[0, 0]
    # Integrated gradients, baseline 0, midpoint rule, target "present" (1).
    ig = []
    f_x = probs(xt)[:, 1].detach().numpy()
    f_0 = float(probs(torch.zeros_like(xt[:1]))[0, 1])
    for r in range(IG_ROWS):
        alphas = (torch.arange(IG_STEPS, dtype=torch.float64) + 0.5) / IG_STEPS
        path = (alphas[:, None, None, None] * xt[r : r + 1]).requires_grad_(True)
        probs(path)[:, 1].sum().backward()
        attr = (xt[r] * path.grad.mean(dim=0)).sum(dim=0)
        ig.append(attr.detach().numpy())
    ig = np.stack(ig)
    out = {
        "what": "Grad-CAM (features_last, logit) and integrated gradients (baseline 0, riemann_middle, probability of 'present') by torch autograd on the candle bundle's safetensors, float64",
        "script": "models/train/make_gradient_fixtures.py",
        "torch": torch.__version__,
        "weights_sha256": sha256(CANDLE / "model.safetensors"),
        "inputs_sha256": sha256(BUNDLE / "1" / "selftest.json"),
        "cam_8x8": {str(c): cams[c][:, 0].numpy().tolist() for c in cams},
        "cam_128_row0_target1_f32_base64": b64(up.numpy()),
        "ig": {"steps": IG_STEPS, "baseline": 0.0, "target": 1, "rows": IG_ROWS,
               "f_x": f_x[:IG_ROWS].tolist(), "f_baseline": f_0,
               "attributions_f32_base64": b64(ig)},
    }
    try:
        from captum.attr import IntegratedGradients
    except ImportError:
        out["captum"] = "not installed: torch autograd only"
        return out
    import captum

    got = IntegratedGradients(probs).attribute(xt[:IG_ROWS], baselines=0.0, target=1, n_steps=IG_STEPS,
                                                method="riemann_middle").sum(dim=1).detach().numpy()
    assert np.allclose(got, ig, atol=1e-9), np.abs(got - ig).max()
    out["captum"] = f"{captum.__version__}: IntegratedGradients(method='riemann_middle') equal within 1e-9"
    return out


def main() -> int:
    x = selftest_inputs()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gradcam-numpy.json").write_text(json.dumps(numpy_fixture(x), indent=1) + "\n")
    print(f"wrote {OUT / 'gradcam-numpy.json'}")
    tf = torch_fixture(x)
    if tf is None:
        print("torch is not importable: gradients-torch.json left as it is")
    else:
        (OUT / "gradients-torch.json").write_text(json.dumps(tf, indent=1) + "\n")
        print(f"wrote {OUT / 'gradients-torch.json'} ({tf.get('captum')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
