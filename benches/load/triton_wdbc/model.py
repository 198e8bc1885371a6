"""Triton Python-backend model serving the WDBC bundle's ONNX file with onnxruntime (one
thread), for the side-by-side load of benches/load/targets.sh: the same model, inputs and
outputs as `nightingale serve` answers for wdbc-malignancy@1. Triton's dynamic batcher hands
`execute` several requests at once; they run as one onnxruntime call and are split again."""

import os
import sys

# Triton's Python stub does not pass PYTHONPATH on: targets.sh writes the site-packages of
# the venv that holds numpy and onnxruntime into this file beside the model.
_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "site_packages.txt")
if os.path.exists(_SITE):
    with open(_SITE) as f:
        sys.path.insert(0, f.read().strip())

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

# benches/load/targets.sh copies the bundle's model.onnx next to this file's version folder.
MODEL_FILE = "model.onnx"


class TritonPythonModel:
    def initialize(self, args):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        path = os.path.join(args["model_repository"], args["model_version"], MODEL_FILE)
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        features = [
            pb_utils.get_input_tensor_by_name(r, "features").as_numpy().astype(np.float32, copy=False)
            for r in requests
        ]
        label, probabilities = self.session.run(
            ["label", "probabilities"], {"features": np.concatenate(features)}
        )
        responses, start = [], 0
        for f in features:
            end = start + f.shape[0]
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("label", label[start:end].reshape(-1, 1)),
                        pb_utils.Tensor("probabilities", probabilities[start:end]),
                    ]
                )
            )
            start = end
        return responses
