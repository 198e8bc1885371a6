"""Write the loading-fault fixtures of models/tests/load.rs:

  * models/tests/fixtures/bundles/gather-out-of-range: a test bundle with a real ONNX graph on
    which tract 0.23.9 panics at run time (not at load), so the tests can show that a bundle
    whose engine panics in warm-up is reported UNAVAILABLE while the others serve;
  * models/tests/fixtures/bundles/huge-input: a Relu whose one row is 2^31 FP32 values (8 GiB):
    the server must load it without allocating a warm-up input of that size;
  * models/tests/fixtures/external-data.onnx: a model whose initializer `weights` lives in an
    external data file (`weights.bin`, not written), which loading must refuse;
  * models/tests/fixtures/external-data-in-function.onnx and external-data-in-sparse.onnx:
    the same external tensor where tract's protobuf reader does not look (a `Constant` in a
    model-local function; a `Constant` whose `sparse_value` holds it): onnxruntime reads the
    file from its working directory (checked here), so loading must refuse them too;
  * models/tests/fixtures/alloc-abort.onnx: a constant `Pad` to 10^12 elements that tract
    0.23.9 folds while it loads: its allocation of 4 TB fails, and Rust aborts the process on
    a failed allocation (no panic to catch), so loading must happen in a probe process first;
  * models/tests/fixtures/bundles/pinned-pad: a bundle whose manifest pins the dimension its
    model leaves open (x [N, K], declared [-1, 1]) and whose `Pad` then asks for 808 GB: a
    probe that warmed up with the file's own shapes ran nothing, and the server's warm-up
    with the manifest's aborted (a re-attack's finding); the probe now prepares the version
    as the server does;
  * models/tests/fixtures/bundles/batch-pad and range-from-input: models whose allocations
    grow with a request (a `Pad` after `Slice(x, 1:)`: nothing at batch 1, 8 GB a row after it;
    a `Range` to the request's largest value; scan-pad: the Pad inside a `Scan` body): the
    server must refuse such a request before
    tract allocates (it aborts the process on an allocation that cannot be made);
  * models/tests/fixtures/if-range-pad.onnx, nonzero-amplified.onnx, batch-range.onnx: a
    branch whose sizes depend on values (refused at load on tract), a `NonZero` 64 times the
    bytes of its input, a model whose working memory grows with the batch and a value (y = x
    for all three, checked here with onnxruntime); resize-amplified.onnx, a Resize holding
    1000 times its output between its axes; ceil-range.onnx, a Range whose typed fact tract
    gets wrong (0 elements for 2e8); conv-columns.onnx, a dilated Conv whose im2col buffer
    grows with the rows; conv-plane.onnx, one whose banded path's
    buffer (68 MiB) a thread must not keep;
  * models/tests/fixtures/bundles/row-tile (with row-tile.csv and row-tile.expected.json): a
    two-class model whose working memory is 256 KiB a row (a `Tile` of its 2 features to
    65,536 values, averaged back): `validate` with a 1 MiB working-memory limit must split
    its batches of 64 rows rather than fail; the expected AUROC is scikit-learn's on
    onnxruntime's probabilities;
  * models/tests/fixtures/long-dim-param.onnx: an input whose symbolic dimension is 4,000
    nested parentheses around `N` (tract's recursive expression parser overflowed the stack
    on it, which aborts the process), which loading must refuse.

    .venv/bin/python models/train/make_load_fixtures.py

The graph: features FP32 [N, 3] -> ReduceSum (all axes) -> Cast to INT64 -> Add 7 ->
Gather(features, that index, axis=1) -> out FP32 [N, 1]. On the warm-up input (zeros) the
index is 7, outside the 3 columns. onnxruntime refuses that with an error
("indices element out of data bounds"); tract 0.23.9's Gather copies blocks without a bounds
check and panics (index out of bounds). The index depends on the input, so no engine can
fold it away at load time.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "models" / "tests" / "fixtures"
BUNDLE = FIXTURES / "bundles" / "gather-out-of-range"
HUGE = FIXTURES / "bundles" / "huge-input"
HUGE_ROW = 1 << 31


def build() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 1])
    seven = helper.make_tensor("seven", TensorProto.INT64, [1], [7])
    nodes = [
        helper.make_node("ReduceSum", ["features"], ["total"], keepdims=0),
        helper.make_node("Cast", ["total"], ["total_i"], to=TensorProto.INT64),
        helper.make_node("Add", ["total_i", "seven"], ["index"]),
        helper.make_node("Gather", ["features", "index"], ["out"], axis=1),
    ]
    graph = helper.make_graph(nodes, "gather_out_of_range", [x], [y], [seven])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="make_load_fixtures.py")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def external_data_model() -> onnx.ModelProto:
    """features [N, 30] x weights [30, 2] (external) -> probabilities [N, 2]."""
    from onnx import external_data_helper

    x = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 30])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])
    w = helper.make_tensor("weights", TensorProto.FLOAT, [30, 2], np.linspace(-1, 1, 60, dtype=np.float32).tobytes(), raw=True)
    graph = helper.make_graph([helper.make_node("MatMul", ["features", "weights"], ["probabilities"])],
                              "external_data", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="make_load_fixtures.py")
    model.ir_version = 8
    # Point the initializer at weights.bin (offset 0, 240 bytes) instead of holding its data.
    t = model.graph.initializer[0]
    external_data_helper.set_external_data(t, location="weights.bin", offset=0, length=240)
    t.data_location = TensorProto.EXTERNAL
    t.ClearField("float_data")
    t.ClearField("raw_data")
    # Only the model file is committed: the loader must refuse before looking for weights.bin.
    return model


def _external_int32(name: str, n: int, location: str) -> onnx.TensorProto:
    """An INT32 [n] tensor whose values are the first 4n bytes of `location`."""
    t = onnx.TensorProto(name=name, data_type=TensorProto.INT32, dims=[n])
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(4 * n))):
        t.external_data.add(key=key, value=value)
    return t


def hidden_external_models(location: str) -> dict[str, onnx.ModelProto]:
    """x INT32 [4] + (an external INT32 [4] constant) -> y, the constant inside a model-local
    function, or as a Constant's sparse_value."""
    x = helper.make_tensor_value_info("x", TensorProto.INT32, [4])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, [4])
    function = helper.make_function(
        "fixtures", "AddHidden", ["a"], ["b"],
        [helper.make_node("Constant", [], ["k"], value=_external_int32("k", 4, location)),
         helper.make_node("Add", ["a", "k"], ["b"])],
        opset_imports=[helper.make_opsetid("", 17)])
    in_function = helper.make_model(
        helper.make_graph([helper.make_node("AddHidden", ["x"], ["y"], domain="fixtures")], "in_function", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("fixtures", 1)],
        functions=[function], producer_name="make_load_fixtures.py")
    sparse = helper.make_sparse_tensor(_external_int32("k", 4, location),
                                       helper.make_tensor("k_idx", TensorProto.INT64, [4], [0, 1, 2, 3]), [4])
    in_sparse = helper.make_model(
        helper.make_graph([helper.make_node("Constant", [], ["k"], sparse_value=sparse),
                           helper.make_node("Add", ["x", "k"], ["y"])], "in_sparse", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17)], producer_name="make_load_fixtures.py")
    for m in (in_function, in_sparse):
        m.ir_version = 8
    return {"external-data-in-function.onnx": in_function, "external-data-in-sparse.onnx": in_sparse}


def check_onnxruntime_reads_them(models: dict[str, onnx.ModelProto]) -> None:
    """The fixtures are real: onnxruntime adds the bytes of the file their constant names
    (beside the model) to the input. (A red-team pass had Nightingale's ort backend, loading
    from memory, read such a file under its working directory.)"""
    import tempfile

    secret = np.array([11, 22, 33, 44], np.int32)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "weights.bin").write_bytes(secret.tobytes())
        for name, m in models.items():
            path = Path(d) / name
            path.write_bytes(m.SerializeToString())
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            (y,) = sess.run(None, {"x": np.zeros(4, np.int32)})
            assert (y == secret).all(), (name, y)
            print(f"onnxruntime read weights.bin through {name}: {y.tolist()}")


def alloc_abort_model() -> onnx.ModelProto:
    """x FP32 [N, 4] + (the sum of a constant padded to 10^12 + 1 elements) -> y."""
    from onnx import numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    constants = [numpy_helper.from_array(np.array([1.0], np.float32), "one"),
                 numpy_helper.from_array(np.array([0, 10**12], np.int64), "pads")]
    nodes = [helper.make_node("Pad", ["one", "pads"], ["big"]),
             helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
             helper.make_node("Add", ["x", "total"], ["y"])]
    m = helper.make_model(helper.make_graph(nodes, "alloc_abort", [x], [y], constants),
                          opset_imports=[helper.make_opsetid("", 17)], producer_name="make_load_fixtures.py")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


PINNED = FIXTURES / "bundles" / "pinned-pad"


def pinned_pad_model() -> onnx.ModelProto:
    """x FP32 [N, K] -> Pad by (100, 2e9) at the end of its two axes -> sum of all -> + x."""
    from onnx import numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "K"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "K"])
    pads = numpy_helper.from_array(np.array([0, 0, 100, 2_000_000_000], np.int64), "pads")
    nodes = [helper.make_node("Pad", ["x", "pads"], ["big"]),
             helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
             helper.make_node("Add", ["x", "total"], ["y"])]
    m = helper.make_model(helper.make_graph(nodes, "pinned_pad", [x], [y], [pads]),
                          opset_imports=[helper.make_opsetid("", 17)], producer_name="make_load_fixtures.py")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


BATCH_PAD = FIXTURES / "bundles" / "batch-pad"
RANGE_FROM_INPUT = FIXTURES / "bundles" / "range-from-input"


def batch_pad_model() -> onnx.ModelProto:
    """x FP32 [N, 4] -> Slice(x, 1:) -> Pad its columns by 2e9 -> sum of all -> + x.

    Empty at batch 1 (the warm-up's), 8 GB for each further row (800 GB at batch 101): an
    allocation that cannot be made, and tract (Rust) aborts the process on that, or one the
    kernel's OOM killer answers; the server must refuse the request instead. (2e9: tract
    0.23.9 reads pads as 32-bit numbers while it types the graph.)"""
    from onnx import numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    constants = [numpy_helper.from_array(np.array([1], np.int64), "starts"),
                 numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), "ends"),
                 numpy_helper.from_array(np.array([0], np.int64), "axes"),
                 numpy_helper.from_array(np.array([0, 0, 0, 2_000_000_000], np.int64), "pads")]
    nodes = [helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["rest"]),
             helper.make_node("Pad", ["rest", "pads"], ["big"]),
             helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
             helper.make_node("Add", ["x", "total"], ["y"])]
    m = helper.make_model(helper.make_graph(nodes, "batch_pad", [x], [y], constants),
                          opset_imports=[helper.make_opsetid("", 17)], producer_name="make_load_fixtures.py")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def range_from_input_model() -> onnx.ModelProto:
    """x FP32 [N, 4] -> Range(0, max(x) + 1, 1) -> sum of all -> + x.

    The Range's length is a value of the request: 1e12 asks for 4 TB. (The + 1: tract 0.23.9
    divides by zero summing the empty range of the warm-up's zeros.)"""
    from onnx import numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    constants = [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                 numpy_helper.from_array(np.array(1.0, np.float32), "step")]
    nodes = [helper.make_node("ReduceMax", ["x"], ["largest"], keepdims=0),
             helper.make_node("Add", ["largest", "step"], ["limit"]),
             helper.make_node("Range", ["zero", "limit", "step"], ["counts"]),
             helper.make_node("ReduceSum", ["counts"], ["total"], keepdims=0),
             helper.make_node("Add", ["x", "total"], ["y"])]
    m = helper.make_model(helper.make_graph(nodes, "range_from_input", [x], [y], constants),
                          opset_imports=[helper.make_opsetid("", 17)], producer_name="make_load_fixtures.py")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


SCAN_PAD = FIXTURES / "bundles" / "scan-pad"


def scan_pad_model() -> onnx.ModelProto:
    """x FP32 [N, 4] -> Scan over its 4 columns, whose body pads Slice(column, 1:) by 2e9 and
    sums it -> the 4 sums (all 0) + x.

    The batch Pad of `batch_pad_model`, inside a loop body that tract runs on its own."""
    from onnx import numpy_helper

    col = helper.make_tensor_value_info("col", TensorProto.FLOAT, ["N"])
    total = helper.make_tensor_value_info("total", TensorProto.FLOAT, [])
    body_constants = [numpy_helper.from_array(np.array([1], np.int64), "b_axes1"),
                      numpy_helper.from_array(np.array([1], np.int64), "b_starts"),
                      numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), "b_ends"),
                      numpy_helper.from_array(np.array([0], np.int64), "b_axes0"),
                      numpy_helper.from_array(np.array([0, 0, 0, 2_000_000_000], np.int64), "b_pads")]
    body = helper.make_graph(
        [helper.make_node("Unsqueeze", ["col", "b_axes1"], ["col2"]),
         helper.make_node("Slice", ["col2", "b_starts", "b_ends", "b_axes0"], ["rest"]),
         helper.make_node("Pad", ["rest", "b_pads"], ["big"]),
         helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0)],
        "body", [col], [total], body_constants)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    nodes = [helper.make_node("Scan", ["x"], ["sums"], body=body, num_scan_inputs=1,
                              scan_input_axes=[1]),
             helper.make_node("Add", ["x", "sums"], ["y"])]
    m = helper.make_model(helper.make_graph(nodes, "scan_pad", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 17)], producer_name="make_load_fixtures.py")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _c(name: str, value) -> onnx.TensorProto:
    from onnx import numpy_helper
    return numpy_helper.from_array(np.asarray(value), name)


def _xy_model(nodes, name: str, constants) -> onnx.ModelProto:
    """A model of `nodes` from x FP32 [N, 4] to y FP32 [N, 4]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    m = helper.make_model(helper.make_graph(nodes, name, [x], [y], constants),
                          opset_imports=[helper.make_opsetid("", 17)], producer_name="make_load_fixtures.py")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def if_range_pad_model() -> onnx.ModelProto:
    """An `If` whose then-branch pads Range(0, max(x)) by 2e9 columns (a red-team finding:
    tract runs a branch with a plan of its own, where no node is checked, and the branch's
    sizes depend on the request's values): the tract engine must refuse it at load."""
    then_out = helper.make_tensor_value_info("t", TensorProto.FLOAT, [])
    then_branch = helper.make_graph(
        [helper.make_node("Range", ["zero", "largest", "one"], ["r"]),
         helper.make_node("Unsqueeze", ["r", "axis1"], ["r2"]),
         helper.make_node("Pad", ["r2", "pads"], ["big"]),
         helper.make_node("ReduceSum", ["big"], ["t"], keepdims=0)],
        "then", [], [then_out])
    else_out = helper.make_tensor_value_info("e", TensorProto.FLOAT, [])
    else_branch = helper.make_graph([helper.make_node("Identity", ["zero"], ["e"])], "else", [], [else_out])
    nodes = [helper.make_node("ReduceMax", ["x"], ["largest"], keepdims=0),
             helper.make_node("Greater", ["largest", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["v"], then_branch=then_branch, else_branch=else_branch),
             helper.make_node("Min", ["v", "zero"], ["z"]),
             helper.make_node("Add", ["x", "z"], ["y"])]
    return _xy_model(nodes, "if_range_pad", [
        _c("zero", np.float32(0)), _c("one", np.float32(1)), _c("axis1", np.array([1], np.int64)),
        _c("pads", np.array([0, 0, 0, 2_000_000_000], np.int64))])


NONZERO_RANK = 32


def nonzero_amplified_model() -> onnx.ModelProto:
    """Range(1, max(x) + 1) reshaped to rank 32, then NonZero: its output, int64 [32, L], is
    64 times the Range's bytes and its size is known only once it has run (a red-team
    finding: the guard counted it as 0 until then). y = x."""
    nodes = [helper.make_node("ReduceMax", ["x"], ["largest"], keepdims=0),
             helper.make_node("Add", ["largest", "one"], ["limit"]),
             helper.make_node("Range", ["one", "limit", "one"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["high"]),
             helper.make_node("NonZero", ["high"], ["nz"]),
             helper.make_node("ReduceMin", ["nz"], ["s"], keepdims=0),
             helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
             helper.make_node("Min", ["sf", "zero"], ["z"]),
             helper.make_node("Add", ["x", "z"], ["y"])]
    return _xy_model(nodes, "nonzero_amplified", [
        _c("one", np.float32(1)), _c("zero", np.float32(0)),
        _c("shape", np.array([-1] + [1] * (NONZERO_RANK - 1), np.int64))])


def batch_range_model() -> onnx.ModelProto:
    """x [N, 4] times Range(0, max(x) + 1) -> [N, 4, L], reduced back: y = x. Its working
    memory grows with the batch and with a value, so the shapes alone cannot tell whether
    joined requests fit (a red-team finding: the joined batch was refused whole)."""
    nodes = [helper.make_node("ReduceMax", ["x"], ["largest"], keepdims=0),
             helper.make_node("Add", ["largest", "one"], ["limit"]),
             helper.make_node("Range", ["zero", "limit", "one"], ["r"]),
             helper.make_node("Unsqueeze", ["x", "axis2"], ["x3"]),
             helper.make_node("Mul", ["x3", "r"], ["outer"]),
             helper.make_node("ReduceMin", ["outer"], ["m"], axes=[2], keepdims=0),
             helper.make_node("Min", ["m", "zero"], ["z"]),
             helper.make_node("Add", ["x", "z"], ["y"])]
    return _xy_model(nodes, "batch_range", [
        _c("zero", np.float32(0)), _c("one", np.float32(1)), _c("axis2", np.array([2], np.int64))])


def resize_amplified_model() -> onnx.ModelProto:
    """x [N, 4] tiled to [N, 1000], then Resize by (10000, 0.001) to [N * 10000, 1]: tract
    resamples one axis after the other and holds [N * 10000, 1000] in between, 1000 times its
    output (a red-team finding: 164 GB at N = 4096). y = x."""
    nodes = [helper.make_node("Tile", ["x", "repeats"], ["wide"]),
             helper.make_node("Resize", ["wide", "", "scales"], ["tall"], mode="linear"),
             helper.make_node("ReduceMax", ["tall"], ["largest"], keepdims=0),
             helper.make_node("Min", ["largest", "zero"], ["z"]),
             helper.make_node("Add", ["x", "z"], ["y"])]
    return _xy_model(nodes, "resize_amplified", [
        _c("repeats", np.array([1, 250], np.int64)),
        _c("scales", np.array([10000, 0.001], np.float32)), _c("zero", np.float32(0))])


def ceil_range_model(k: int) -> onnx.ModelProto:
    """Range(0, ceil(N / 2) * k - k / 2) from the batch N: tract 0.23.9 types ceil(N * 0.5) as
    N / 2 rounded down, so its fact for the Range says 0 elements at N = 1 where the Range
    makes k / 2 (a red-team finding: a typed fact that is wrong). y = x + the Range's max."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "D"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "D"])
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "i0"], ["n"], axis=0),
             helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["nf", "half"], ["h"]),
             helper.make_node("Ceil", ["h"], ["c"]),
             helper.make_node("Cast", ["c"], ["ci"], to=TensorProto.INT64),
             helper.make_node("Mul", ["ci", "k"], ["ck"]),
             helper.make_node("Sub", ["ck", "half_k"], ["limit"]),
             helper.make_node("Range", ["i0", "limit", "i1"], ["r"]),
             helper.make_node("Concat", ["r", "zeros"], ["rc"], axis=0),
             helper.make_node("ReduceMax", ["rc"], ["largest"], keepdims=0),
             helper.make_node("Cast", ["largest"], ["lf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["x", "lf"], ["y"])]
    m = helper.make_model(helper.make_graph(nodes, "ceil_range", [x], [y], [
        _c("i0", np.array(0, np.int64)), _c("zeros", np.array([0], np.int64)),
        _c("half", np.float32(0.5)), _c("i1", np.array(1, np.int64)),
        _c("k", np.array(k, np.int64)), _c("half_k", np.array(k // 2, np.int64))]),
        opset_imports=[helper.make_opsetid("", 17)], producer_name="make_load_fixtures.py")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


CEIL_RANGE_K = 400_000_000
CONV_K = 32


def conv_columns_model() -> onnx.ModelProto:
    """x [N, 4] as N images of 4 channels and 1 x 1 pixel, a Conv of a 32 x 32 kernel with
    dilation 2 padded back to 1 x 1, answered as y [1, N] (not batch-first, so the rows run
    together): Nightingale's convolution goes through im2col (dilation), whose column buffer
    is 4 x 32 x 32 rows by up to 4096 images (a red-team finding: uncounted, 32 GiB with a
    larger kernel at 4096 rows aborted the server)."""
    rng = np.random.default_rng(7)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "N"])
    nodes = [helper.make_node("Reshape", ["x", "image"], ["images"]),
             helper.make_node("Conv", ["images", "w"], ["c"], dilations=[2, 2],
                              pads=[CONV_K - 1] * 4, kernel_shape=[CONV_K, CONV_K]),
             helper.make_node("Reshape", ["c", "row"], ["y"])]
    m = helper.make_model(helper.make_graph(nodes, "conv_columns", [x], [y], [
        _c("image", np.array([-1, 4, 1, 1], np.int64)), _c("row", np.array([1, -1], np.int64)),
        _c("w", rng.standard_normal((1, 4, CONV_K, CONV_K)).astype(np.float32))]),
        opset_imports=[helper.make_opsetid("", 17)], producer_name="make_load_fixtures.py")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def conv_plane_model() -> onnx.ModelProto:
    """x [N, 4, 65, 65] -> a Conv of a 33 x 33 kernel with dilation 2, padded to 65 x 65:
    more than 4096 output points an image, so Nightingale's convolution takes its
    banded im2col path, whose column buffer (4 x 33 x 33 rows of 4095 points: 68 MiB) a
    thread must not keep after the call (a red-team finding: that path returned before the
    buffer was freed)."""
    rng = np.random.default_rng(11)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 65, 65])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 65, 65])
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], dilations=[2, 2], pads=[32] * 4,
                              kernel_shape=[33, 33])]
    m = helper.make_model(helper.make_graph(nodes, "conv_plane", [x], [y], [
        _c("w", rng.standard_normal((1, 4, 33, 33)).astype(np.float32))]),
        opset_imports=[helper.make_opsetid("", 17)], producer_name="make_load_fixtures.py")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def check_request_sizes_with_onnxruntime() -> None:
    """The two models' answers on small requests, by onnxruntime (the tests' expectations)."""
    batch = ort.InferenceSession(batch_pad_model().SerializeToString())
    x = np.array([[1, 2, 3, 4]], np.float32)
    assert (batch.run(None, {"x": x})[0] == x).all()
    positive = np.array([[3, 1, 2, 0.5], [1, 2, 3, 4]], np.float32)
    plane = ort.InferenceSession(conv_plane_model().SerializeToString())
    assert plane.run(None, {"x": np.ones((1, 4, 65, 65), np.float32)})[0].shape == (1, 1, 65, 65)
    conv = ort.InferenceSession(conv_columns_model().SerializeToString())
    assert conv.run(None, {"x": positive})[0].shape == (1, 2)
    resize = ort.InferenceSession(resize_amplified_model().SerializeToString())
    assert (resize.run(None, {"x": positive[:1]})[0] == positive[:1]).all()
    # The committed model's k makes a Range of 2e8 at N = 1 (1.6 GB): its small sibling
    # shows what the graph computes, ceil(N / 2) * k - k / 2 - 1 added to x.
    small = ort.InferenceSession(ceil_range_model(2000).SerializeToString())
    for n, added in ((1, 999), (2, 999), (3, 2999)):
        x = np.ones((n, 2), np.float32)
        assert (small.run(None, {"x": x})[0] == x + added).all(), n
    # The If's then-branch takes 8 GB a unit of max(x): its else-branch only.
    for build, x in ((if_range_pad_model, -positive), (nonzero_amplified_model, positive),
                     (batch_range_model, positive)):
        session = ort.InferenceSession(build().SerializeToString())
        assert (session.run(None, {"x": x})[0] == x).all(), build.__name__
    scan = ort.InferenceSession(scan_pad_model().SerializeToString())
    x = np.array([[1, 2, 3, 4]], np.float32)
    assert (scan.run(None, {"x": x})[0] == x).all()
    ranged = ort.InferenceSession(range_from_input_model().SerializeToString())
    x = np.array([[0.5, 1, 2, 3]], np.float32)
    # Range(0, 4) = [0, 1, 2, 3], sum 6.
    assert (ranged.run(None, {"x": x})[0] == x + 6).all()


def long_dim_param_model() -> onnx.ModelProto:
    depth = 4000
    dim = "(" * depth + "N" + ")" * depth
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [dim, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [dim, 2])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "long_dim", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 17)], producer_name="make_load_fixtures.py")
    m.ir_version = 8
    return m


def huge_input_model() -> onnx.ModelProto:
    """features FP32 [N, 2^31] -> Relu -> out, same shape: valid, and never warmed up."""
    x = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", HUGE_ROW])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", HUGE_ROW])
    graph = helper.make_graph([helper.make_node("Relu", ["features"], ["out"])], "huge_input", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="make_load_fixtures.py")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _write_version(folder: Path, model: onnx.ModelProto) -> tuple[Path, str]:
    """`model` as version 1 of the bundle in `folder`: its path and SHA-256."""
    vdir = folder / "1"
    vdir.mkdir(parents=True, exist_ok=True)
    path = vdir / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


ROW_TILE = FIXTURES / "bundles" / "row-tile"
ROW_TILE_REPEATS = 32768


def row_tile_model() -> onnx.ModelProto:
    """probabilities = Softmax(mean over a Tile of the row): Softmax(features), row by row,
    holding 2 x 32768 floats (256 KiB) for each row while it runs."""
    x = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 2])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])
    constants = [_c("repeats", np.array([1, ROW_TILE_REPEATS], np.int64)),
                 _c("split", np.array([0, ROW_TILE_REPEATS, 2], np.int64))]
    nodes = [
        helper.make_node("Tile", ["features", "repeats"], ["tiled"]),
        helper.make_node("Reshape", ["tiled", "split"], ["copies"]),
        helper.make_node("ReduceMean", ["copies"], ["mean"], axes=[1], keepdims=0),
        helper.make_node("Softmax", ["mean"], ["probabilities"], axis=-1),
    ]
    m = helper.make_model(helper.make_graph(nodes, "row_tile", [x], [y], constants),
                          opset_imports=[helper.make_opsetid("", 17)],
                          producer_name="make_load_fixtures.py")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def write_row_tile() -> None:
    """The bundle, a labelled CSV of 300 rows (seeded), and the AUROC scikit-learn gives
    onnxruntime's P(positive) on it."""
    import json

    from sklearn.metrics import roc_auc_score

    path, digest = _write_version(ROW_TILE, row_tile_model())
    (ROW_TILE / "bundle.toml").write_text(
        f"""# Generated by models/train/make_load_fixtures.py -- a test fixture, not a model.
format_version = 1
name = "row-tile"
task = "other"
description = "Test fixture: Softmax of two features through a Tile of 256 KiB a row; validate must split its batches under a 1 MiB working-memory limit."
backend = "tract"

[batching]
max_batch_size = 64

[[inputs]]
name = "features"
datatype = "FP32"
shape = [-1, 2]

[[inputs.features]]
name = "a"

[[inputs.features]]
name = "b"

[[outputs]]
name = "probabilities"
datatype = "FP32"
shape = [-1, 2]
labels = ["negative", "positive"]
positive_label = "positive"

[versions.1]
description = "the Tile"

[versions.1.files]
"model.onnx" = "{digest}"
""",
        encoding="utf-8",
    )
    rng = np.random.default_rng(20261206)
    n = 300
    label = rng.integers(0, 2, n)
    a = rng.normal(0.0, 1.0, n)
    b = a + label * 0.8 + rng.normal(0.0, 1.0, n)
    features = np.stack([a, b], axis=1).astype(np.float32)
    lines = ["a,b,label"] + [f"{r[0]!r},{r[1]!r},{l}" for r, l in zip(features.tolist(), label.tolist())]
    (FIXTURES / "row-tile.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # the CSV's values as read back (text -> float32), scored by onnxruntime one row at a time
    sess = ort.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
    p = np.concatenate([sess.run(None, {"features": features[i:i + 1]})[0][:, 1] for i in range(n)])
    auroc = float(roc_auc_score(label, p.astype(np.float64)))
    (FIXTURES / "row-tile.expected.json").write_text(
        json.dumps({"rows": n, "positives": int(label.sum()), "auroc": auroc}, indent=2) + "\n",
        encoding="utf-8")
    print(f"wrote {ROW_TILE} (model.onnx sha256 {digest}), row-tile.csv, AUROC {auroc:.6f}")


def write_fixture_bundle(folder: Path, model: onnx.ModelProto, description: str, version: str,
                         inputs: tuple[str, list[int]], outputs: tuple[str, list[int]]) -> None:
    """A one-version test bundle (FP32 in, FP32 out) around `model`, with its checksum."""
    _, digest = _write_version(folder, model)
    (folder / "bundle.toml").write_text(
        f"""# Generated by models/train/make_load_fixtures.py -- a test fixture, not a model.
format_version = 1
name = "{folder.name}"
task = "other"
description = "{description}"
backend = "tract"

[[inputs]]
name = "{inputs[0]}"
datatype = "FP32"
shape = {inputs[1]}

[[outputs]]
name = "{outputs[0]}"
datatype = "FP32"
shape = {outputs[1]}

[versions.1]
description = "{version}"

[versions.1.files]
"model.onnx" = "{digest}"
""",
        encoding="utf-8",
    )
    print(f"wrote {folder} (model.onnx sha256 {digest})")


def main() -> None:
    write_fixture_bundle(HUGE, huge_input_model(),
                         "Test fixture: a Relu whose one row is 2^31 FP32 values (8 GiB); loads without a warm-up.",
                         "one Relu", ("features", [-1, HUGE_ROW]), ("out", [-1, HUGE_ROW]))
    write_fixture_bundle(PINNED, pinned_pad_model(),
                         "Test fixture: the manifest pins x to [-1, 1], and the model's Pad then asks tract for 808 GB in the warm-up.",
                         "the pinned Pad", ("x", [-1, 1]), ("y", [-1, 1]))
    check_request_sizes_with_onnxruntime()
    write_fixture_bundle(BATCH_PAD, batch_pad_model(),
                         "Test fixture: Slice(x, 1:) then a Pad by 2e9 columns: empty at batch 1, 8 GB for each further row.",
                         "the batch Pad", ("x", [-1, 4]), ("y", [-1, 4]))
    write_fixture_bundle(RANGE_FROM_INPUT, range_from_input_model(),
                         "Test fixture: a Range to the request's largest value (1e12 asks for 4 TB).",
                         "the Range", ("x", [-1, 4]), ("y", [-1, 4]))
    write_fixture_bundle(SCAN_PAD, scan_pad_model(),
                         "Test fixture: the batch Pad inside a Scan body: empty at batch 1, 8 GB a row after it.",
                         "the Scan", ("x", [-1, 4]), ("y", [-1, 4]))
    write_row_tile()
    ext = external_data_model()
    (FIXTURES / "external-data.onnx").write_bytes(ext.SerializeToString())
    print(f"wrote {FIXTURES / 'external-data.onnx'}")
    hidden = hidden_external_models("weights.bin")
    check_onnxruntime_reads_them(hidden)
    hidden["long-dim-param.onnx"] = long_dim_param_model()
    hidden["alloc-abort.onnx"] = alloc_abort_model()
    hidden["if-range-pad.onnx"] = if_range_pad_model()
    hidden["nonzero-amplified.onnx"] = nonzero_amplified_model()
    hidden["batch-range.onnx"] = batch_range_model()
    hidden["resize-amplified.onnx"] = resize_amplified_model()
    hidden["ceil-range.onnx"] = ceil_range_model(CEIL_RANGE_K)
    hidden["conv-columns.onnx"] = conv_columns_model()
    hidden["conv-plane.onnx"] = conv_plane_model()
    for name, m in hidden.items():
        (FIXTURES / name).write_bytes(m.SerializeToString())
        print(f"wrote {FIXTURES / name}")
    model = build()
    vdir = BUNDLE / "1"
    vdir.mkdir(parents=True, exist_ok=True)
    path = vdir / "model.onnx"
    path.write_bytes(model.SerializeToString())
    # onnxruntime, the reference, refuses the warm-up input with an error (no panic):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    try:
        sess.run(None, {"features": np.zeros((1, 3), np.float32)})
        raise SystemExit("onnxruntime accepted the out-of-range index; the fixture is wrong")
    except ort.capi.onnxruntime_pybind11_state.InvalidArgument as e:
        print(f"onnxruntime refuses it as expected: {str(e).splitlines()[0][:160]}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (BUNDLE / "bundle.toml").write_text(
        f"""# Generated by models/train/make_load_fixtures.py -- a test fixture, not a model.
format_version = 1
name = "gather-out-of-range"
task = "other"
description = "Test fixture: a Gather whose index (7) is outside its 3 columns on the warm-up input; tract 0.23.9 panics running it."
backend = "tract"

[[inputs]]
name = "features"
datatype = "FP32"
shape = [-1, 3]

[[outputs]]
name = "out"
datatype = "FP32"
shape = [-1, 1]

[versions.1]
description = "the panicking graph"

[versions.1.files]
"model.onnx" = "{digest}"
""",
        encoding="utf-8",
    )
    print(f"wrote {BUNDLE} (model.onnx sha256 {digest})")


if __name__ == "__main__":
    main()
