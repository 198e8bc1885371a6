#!/usr/bin/env python3
"""Prints, colon-separated, the folders of the running Python's nvidia-* packages (the CUDA 13
wheels PyTorch and JAX bring) that hold the libraries onnxruntime-gpu 1.31 loads."""

import glob
import os
import sys

WANT = ["libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10",
        "libcufft.so.12", "libcudnn.so.9", "libnvrtc.so.13"]
dirs: list[str] = []
for p in sys.path:
    for w in WANT:
        for f in glob.glob(os.path.join(p, "nvidia", "**", w), recursive=True):
            d = os.path.dirname(f)
            if d not in dirs:
                dirs.append(d)
print(":".join(dirs))
