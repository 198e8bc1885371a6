"""Fixtures for Nightingale's convolution and max-pool kernels on tract
(inference/tests/cnn_kernels.rs): small ONNX graphs covering the geometries the kernels take
(strides, dilations, asymmetric and SAME padding, non-square kernels, no bias, ceil mode, a
fused and an unfused ReLU, a grouped convolution they leave to tract, planes above and below
the product's column group), each with a batch of three random images and the outputs ONNX
Runtime computes for them.

    .venv/bin/python models/train/make_cnn_fixtures.py

writes inference/tests/data/cnn/<name>.onnx and <name>.json ({"input": [...], "shape": [...],
"outputs": {name: {"shape": [...], "data": [...]}}, "producer": "onnxruntime X"}).
"""

import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OUT = pathlib.Path(__file__).resolve().parents[2] / "inference" / "tests" / "data" / "cnn"
RNG = np.random.default_rng(20261202)
BATCH = 3


def weights(name, shape):
    return numpy_helper.from_array(RNG.normal(0, 0.5, shape).astype(np.float32), name)


class Graph:
    def __init__(self, channels, h, w):
        self.nodes, self.inits, self.outputs = [], [], []
        self.input = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, h, w])
        self.count = 0

    def name(self, prefix):
        self.count += 1
        return f"{prefix}{self.count}"

    def conv(self, x, cin, cout, kernel, bias=True, group=1, **attrs):
        w = self.name("w")
        self.inits.append(weights(w, [cout, cin // group, *kernel]))
        inputs = [x, w]
        if bias:
            b = self.name("b")
            self.inits.append(weights(b, [cout]))
            inputs.append(b)
        y = self.name("conv")
        self.nodes.append(
            helper.make_node("Conv", inputs, [y], kernel_shape=list(kernel), group=group, **attrs)
        )
        return y

    def op(self, kind, x, **attrs):
        y = self.name(kind.lower())
        self.nodes.append(helper.make_node(kind, [x], [y], **attrs))
        return y

    def output(self, y):
        self.outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", "C", "H", "W"]))

    def model(self, name):
        graph = helper.make_graph(self.nodes, name, [self.input], self.outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        # The output shapes as ONNX infers them (batch stays N).
        return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def cases():
    # Small planes: several images share one product.
    g = Graph(3, 10, 9)
    g.output(g.op("Relu", g.conv("x", 3, 8, (3, 3), pads=[1, 1, 1, 1])))
    yield "conv3x3_pad1_relu", g, (3, 10, 9)

    g = Graph(4, 11, 10)
    g.output(g.conv("x", 4, 6, (3, 3), strides=[2, 2], pads=[1, 0, 0, 1]))
    yield "conv_stride2_asymmetric_pads", g, (4, 11, 10)

    g = Graph(2, 12, 12)
    g.output(g.conv("x", 2, 5, (3, 3), dilations=[2, 2], pads=[2, 2, 2, 2]))
    yield "conv_dilation2", g, (2, 12, 12)

    g = Graph(3, 9, 7)
    g.output(g.conv("x", 3, 4, (4, 4), strides=[2, 2], auto_pad="SAME_UPPER"))
    yield "conv_same_upper_stride2", g, (3, 9, 7)

    g = Graph(6, 5, 13)
    g.output(g.conv("x", 6, 3, (1, 5), bias=False))
    yield "conv_1x5_no_bias", g, (6, 5, 13)

    g = Graph(4, 8, 8)
    g.output(g.op("Relu", g.conv("x", 4, 6, (3, 3), group=2, pads=[1, 1, 1, 1])))
    yield "conv_grouped_left_to_tract", g, (4, 8, 8)

    # The convolution's output read twice: the ReLU must not be fused into it.
    g = Graph(3, 6, 6)
    y = g.conv("x", 3, 4, (3, 3), pads=[1, 1, 1, 1])
    g.output(g.op("Relu", y))
    g.output(g.op("Sigmoid", y))
    yield "conv_read_twice", g, (3, 6, 6)

    g = Graph(3, 8, 10)
    g.output(g.op("MaxPool", "x", kernel_shape=[2, 2], strides=[2, 2]))
    yield "maxpool_2x2", g, (3, 8, 10)

    g = Graph(3, 9, 11)
    g.output(g.op("MaxPool", "x", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    yield "maxpool_3x3_stride2_pad1", g, (3, 9, 11)

    g = Graph(2, 10, 10)
    g.output(g.op("MaxPool", "x", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1))
    yield "maxpool_ceil_mode", g, (2, 10, 10)

    g = Graph(2, 7, 9)
    g.output(g.op("MaxPool", "x", kernel_shape=[2, 3], strides=[1, 2], dilations=[2, 1]))
    yield "maxpool_dilated", g, (2, 7, 9)

    # A small CNN: a first plane wider than one product's column group (70 x 70 > 4096).
    g = Graph(1, 70, 70)
    y = g.op("Relu", g.conv("x", 1, 4, (3, 3), pads=[1, 1, 1, 1]))
    y = g.op("MaxPool", y, kernel_shape=[2, 2], strides=[2, 2])
    y = g.op("Relu", g.conv(y, 4, 8, (3, 3), pads=[1, 1, 1, 1]))
    y = g.op("MaxPool", y, kernel_shape=[2, 2], strides=[2, 2])
    y = g.op("Relu", g.conv(y, 8, 8, (3, 3), strides=[2, 2], pads=[1, 1, 1, 1]))
    g.output(g.op("GlobalAveragePool", y))
    yield "small_cnn", g, (1, 70, 70)


def short(v):
    """An f32 as the shortest decimal that reads back as the same f32 (9 significant digits)."""
    return float(f"{float(v):.9g}")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, graph, item in cases():
        model = graph.model(name)
        onnx.save(model, OUT / f"{name}.onnx")
        x = RNG.normal(0, 1, (BATCH, *item)).astype(np.float32)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        names = [o.name for o in session.get_outputs()]
        outputs = session.run(names, {"x": x})
        doc = {
            "producer": f"onnxruntime {ort.__version__}",
            "shape": list(x.shape),
            "input": [short(v) for v in x.ravel()],
            "outputs": {
                n: {"shape": list(o.shape), "data": [short(v) for v in o.ravel()]}
                for n, o in zip(names, outputs)
            },
        }
        (OUT / f"{name}.json").write_text(json.dumps(doc) + "\n")
        print(name, {n: o.shape for n, o in zip(names, outputs)})


if __name__ == "__main__":
    main()
