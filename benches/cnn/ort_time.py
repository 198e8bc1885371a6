"""Raw onnxruntime (1 intra-op thread, CPU) on an ONNX model: the median, mean and minimum of REPS
calls after 5 warm-up calls, with the same input values as inference/examples/cnn_kernels.rs.

    .venv/bin/python benches/cnn/ort_time.py MODEL.onnx BATCH [REPS]
"""

import sys
import time

import numpy as np
import onnxruntime as ort

path, batch = sys.argv[1], int(sys.argv[2])
reps = int(sys.argv[3]) if len(sys.argv) > 3 else 30
options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
spec = session.get_inputs()[0]
shape = [batch] + list(spec.shape[1:])
x = (np.arange(np.prod(shape)) % 7 / 7.0).astype(np.float32).reshape(shape)
for _ in range(5):
    session.run(None, {spec.name: x})
times = []
for _ in range(reps):
    started = time.perf_counter()
    session.run(None, {spec.name: x})
    times.append((time.perf_counter() - started) * 1e3)
print(
    f"{path} batch {batch} onnxruntime {ort.__version__}: "
    f"median {np.median(times):.3f} ms, mean {np.mean(times):.3f} ms, min {np.min(times):.3f} ms"
)
