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


def weights(name, shape, std=0.5):
    return numpy_helper.from_array(RNG.normal(0, std, shape).astype(np.float32), name)


class Graph:
    def __init__(self, channels, h, w, batch="N"):
        self.nodes, self.inits, self.outputs = [], [], []
        self.batch = batch
        self.input = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels, h, w])
        self.count = 0

    def name(self, prefix):
        self.count += 1
        return f"{prefix}{self.count}"

    def conv(self, x, cin, cout, kernel, bias=True, group=1, std=0.5, **attrs):
        w = self.name("w")
        self.inits.append(weights(w, [cout, cin // group, *kernel], std))
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

    def batch_norm(self, x, channels):
        names = []
        for part in ("scale", "bias", "mean", "var"):
            n = self.name(part)
            values = RNG.normal(0, 0.5, [channels]).astype(np.float32)
            if part == "var":
                values = np.abs(values) + 0.5
            self.inits.append(numpy_helper.from_array(values, n))
            names.append(n)
        y = self.name("bn")
        self.nodes.append(helper.make_node("BatchNormalization", [x, *names], [y]))
        return y

    def add(self, a, b):
        y = self.name("add")
        self.nodes.append(helper.make_node("Add", [a, b], [y]))
        return y

    def slice(self, x, start, end, axis, step):
        names = []
        for part, value in (("starts", start), ("ends", end), ("axes", axis), ("steps", step)):
            n = self.name(part)
            self.inits.append(numpy_helper.from_array(np.array([value], dtype=np.int64), n))
            names.append(n)
        y = self.name("slice")
        self.nodes.append(helper.make_node("Slice", [x, *names], [y]))
        return y

    def op(self, kind, x, **attrs):
        y = self.name(kind.lower())
        self.nodes.append(helper.make_node(kind, [x], [y], **attrs))
        return y

    def output(self, y):
        self.outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [self.batch, "C", "H", "W"]))

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

    # The direct convolution (strides 1 and 2, no dilation): one stride per axis, output
    # channels not a multiple of its block, a non-square kernel.
    g = Graph(5, 9, 12)
    g.output(g.conv("x", 5, 7, (3, 2), strides=[1, 2], pads=[0, 1, 2, 0]))
    yield "conv_stride_1x2_co7", g, (5, 9, 12)

    # A ResNet stem: 7 x 7, stride 2, padding 3, with a ReLU.
    g = Graph(3, 23, 19)
    g.output(g.op("Relu", g.conv("x", 3, 13, (7, 7), strides=[2, 2], pads=[3, 3, 3, 3])))
    yield "conv7x7_stride2_pad3", g, (3, 23, 19)

    # Padding wider than the kernel, on a plane smaller than the kernel's reach.
    g = Graph(2, 5, 4)
    g.output(g.conv("x", 2, 3, (3, 3), strides=[2, 2], pads=[4, 4, 3, 5]))
    yield "conv_pads_wider_than_kernel", g, (2, 5, 4)

    # Many channels on a small plane.
    g = Graph(40, 6, 5)
    g.output(g.op("Relu", g.conv("x", 40, 50, (3, 3), pads=[1, 1, 1, 1])))
    yield "conv_many_channels", g, (40, 6, 5)

    # im2col + product (dilated), on a plane wider than one product: bands of rows.
    g = Graph(1, 65, 64)
    g.output(g.conv("x", 1, 1, (3, 3), dilations=[2, 2], pads=[2, 2, 2, 2]))
    yield "conv_dilation2_wide_plane", g, (1, 65, 64)

    # A stride of 3: im2col + product.
    g = Graph(3, 13, 11)
    g.output(g.conv("x", 3, 5, (3, 3), strides=[3, 3], pads=[1, 1, 1, 1]))
    yield "conv_stride3", g, (3, 13, 11)

    # Slices with steps, as tract runs them (Downsample): flips of the last and an inner axis,
    # every second row from the second, every third column; a flip by two steps stays tract's
    # (one that starts inside the axis becomes tract's slice of the first flip).
    big = 2**62
    g = Graph(2, 7, 9)
    g.output(g.slice("x", -1, -big, 3, -1))
    g.output(g.slice("x", -1, -big, 2, -1))
    g.output(g.slice("x", 1, big, 2, 2))
    g.output(g.slice("x", 0, big, 3, 3))
    g.output(g.op("Relu", g.slice(g.op("Transpose", "x", perm=[0, 1, 3, 2]), -1, -big, 3, -1)))
    g.output(g.slice("x", -1, -big, 3, -2))
    g.output(g.slice("x", -3, -big, 3, -1))
    yield "slice_steps", g, (2, 7, 9)

    # A ResNet bottleneck block declared for one image (a fixed batch of 1, as many exports
    # are): 1 x 1, 3 x 3 and 1 x 1 convolutions without bias, each with a batch norm, the sum
    # with the block's input, a ReLU. tract turns the 1 x 1 convolutions into matrix products
    # and drops the batch axis of 1 through them: the 3 x 3 convolution runs on CHW planes.
    g = Graph(16, 12, 11, batch=1)
    y = g.op("Relu", g.batch_norm(g.conv("x", 16, 8, (1, 1), bias=False), 8))
    y = g.op("Relu", g.batch_norm(g.conv(y, 8, 8, (3, 3), bias=False, pads=[1, 1, 1, 1]), 8))
    y = g.batch_norm(g.conv(y, 8, 16, (1, 1), bias=False), 16)
    g.output(g.op("Relu", g.add(y, "x")))
    yield "bottleneck_chw", g, (16, 12, 11)

    # 1 x 1 convolutions, which tract makes matrix products (EinSum) before Nightingale's pass
    # sees them: taken back as convolutions; few input channels, many, and more than one
    # pass of the channels layout takes (256).
    g = Graph(12, 5, 7)
    g.output(g.op("Relu", g.conv("x", 12, 20, (1, 1))))
    y = g.op("Relu", g.conv("x", 12, 70, (1, 1), bias=False))
    # (weights scaled by 1 / sqrt(fan-in), as trained networks' are, so that the sums stay
    # near 1 and 1e-5 measures the kernel, not the cancellation of large terms)
    y = g.op("Relu", g.conv(y, 70, 260, (1, 1), std=70**-0.5))
    g.output(g.conv(y, 260, 9, (1, 1), std=260**-0.5))
    # A batch norm and a ReLU after one (folded into it: tract leaves them after its product).
    g.output(g.op("Relu", g.batch_norm(g.conv("x", 12, 24, (1, 1), bias=False), 24)))
    yield "conv1x1", g, (12, 5, 7)


def short(v):
    """An f32 as the shortest decimal that reads back as the same f32 (9 significant digits)."""
    return float(f"{float(v):.9g}")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, graph, item in cases():
        model = graph.model(name)
        onnx.save(model, OUT / f"{name}.onnx")
        batch = graph.batch if isinstance(graph.batch, int) else BATCH
        x = RNG.normal(0, 1, (batch, *item)).astype(np.float32)
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
