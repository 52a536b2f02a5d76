"""Shared builders and checks for the ONNX rule tests (``test_onnx_rules.py``).

Graphs are built directly with ``onnx.helper`` through :class:`GraphBuilder`, which
randomises every weight, and every BatchNormalization's statistics and affine parameters
(``var`` in [0.5, 2], ``scale`` with a random sign): a fresh BN is the identity and hides
folding bugs.

Every positive test goes through :func:`fuse_exactly` and every negative one through
:func:`fuse_refused`. Both (see :func:`fuse_checked`)

* check that the input ``ModelProto`` is byte-for-byte unchanged after fusing,
* check that graph input / output names, element types and shapes are preserved and that
  the fused model passes ``onnx.checker`` with ``full_check`` (strict type inference:
  e.g. a float32 weight on a float64 input is an error),
* compare outputs with an explicit tight tolerance (:func:`assert_same_outputs`).

Two numerical oracles, because ONNX Runtime (1.32, CPU) has no float64 kernel for
``Conv``, ``AveragePool`` or ``GlobalAveragePool`` ("Could not find an implementation for
Conv(11)"):

* float32 graphs: :func:`reparam_fx.onnx.verify_onnx` (ONNX Runtime), ``rtol=1e-5``;
* float64 graphs: ``onnx.reference.ReferenceEvaluator`` (numpy, float64 throughout) on the
  same seeded inputs, ``rtol=1e-10``, and additionally ``verify_onnx`` at ``1e-10`` when
  neither graph uses an op ONNX Runtime cannot run in float64. (Its BatchNormalization-9,
  opsets below 14, updates the statistics with the batch's whatever the outputs: build
  float64 graphs with a BatchNormalization at opset 14 or later.)
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from reparam_fx.onnx import fuse_onnx_model, random_inputs, verify_onnx

RTOL64 = 1e-10  # float64 graphs: an exact rewrite differs only by rounding
RTOL32 = 1e-5  # float32 graphs in ONNX Runtime
# measured, onnxruntime 1.32 CPU
NO_DOUBLE_KERNEL_IN_ORT = frozenset({"Conv", "AveragePool", "GlobalAveragePool"})

ELEM_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}


# ---- building graphs ------------------------------------------------------------------

def _ints(value, spatial: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * spatial


class GraphBuilder:
    """A small ONNX graph in ``dtype`` with seeded random weights.

    Each method appends node(s) and returns the name of the output tensor. Constants are
    initializers, or ``Constant`` nodes when ``constant_nodes=True``.
    """

    def __init__(self, dtype=np.float64, seed: int = 0, constant_nodes: bool = False):
        self.dtype = np.dtype(dtype)
        self.elem_type = ELEM_TYPES[self.dtype]
        self.rng = np.random.default_rng(seed)
        self.constant_nodes = constant_nodes
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._used: Counter = Counter()

    def fresh(self, prefix: str) -> str:
        self._used[prefix] += 1
        return f"{prefix}_{self._used[prefix]}"

    # -- values
    def input(self, shape, name: str = "x") -> str:
        self.inputs.append(helper.make_tensor_value_info(name, self.elem_type, list(shape)))
        return name

    def constant(self, array, prefix: str = "const") -> str:
        """A constant; floating arrays are cast to the graph's dtype, others kept."""
        array = np.asarray(array)
        if array.dtype.kind == "f":
            array = array.astype(self.dtype)
        name = self.fresh(prefix)
        tensor = numpy_helper.from_array(array, name)
        if self.constant_nodes:
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_node",
                                               value=tensor))
        else:
            self.initializers.append(tensor)
        return name

    def uniform(self, shape, low=-1.0, high=1.0) -> np.ndarray:
        return self.rng.uniform(low, high, shape)

    def node(self, op: str, inputs, prefix: str | None = None, **attrs) -> str:
        output = self.fresh(prefix or op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=f"{output}_node",
                                           **attrs))
        return output

    # -- layers
    def conv(self, x: str, cin: int, cout: int, kernel, *, stride=1, pads=None, dilation=1,
             group: int = 1, bias: bool = False, spatial: int = 2, **attrs) -> str:
        """``pads``: None (``dilation*(k-1)//2`` on both sides), an int (symmetric) or the
        full ``pads`` attribute list (begins then ends)."""
        kernel = _ints(kernel, spatial)
        dilation = _ints(dilation, spatial)
        weight = self.constant(self.uniform((cout, cin // group, *kernel)), "W")
        inputs = [x, weight] + ([self.constant(self.uniform(cout), "B")] if bias else [])
        if "auto_pad" not in attrs:
            if pads is None:
                pads = [d * (k - 1) // 2 for k, d in zip(kernel, dilation)] * 2
            elif not isinstance(pads, (tuple, list)):
                pads = [int(pads)] * (2 * spatial)
            attrs["pads"] = list(pads)
        return self.node("Conv", inputs, "conv", kernel_shape=kernel,
                         strides=_ints(stride, spatial), dilations=dilation, group=group, **attrs)

    def batchnorm(self, x: str, channels: int, epsilon: float = 1e-5, **attrs) -> str:
        """Randomised: mean N(0, 1), var U[0.5, 2], scale +-U[0.5, 1.5], bias N(0, 1)."""
        scale = self.rng.uniform(0.5, 1.5, channels) * self.rng.choice([-1.0, 1.0], channels)
        bias = self.rng.standard_normal(channels)
        mean = self.rng.standard_normal(channels)
        var = self.rng.uniform(0.5, 2.0, channels)
        inputs = [x] + [self.constant(v, p) for v, p in
                        ((scale, "bn_scale"), (bias, "bn_bias"), (mean, "bn_mean"), (var, "bn_var"))]
        return self.node("BatchNormalization", inputs, "bn", epsilon=epsilon, **attrs)

    def conv_bn(self, x: str, cin: int, cout: int, kernel, **conv_args) -> str:
        return self.batchnorm(self.conv(x, cin, cout, kernel, **conv_args), cout)

    def gemm(self, x: str, fin: int, fout: int, *, bias: bool = True, **attrs) -> str:
        """``Gemm`` with ``transB=1`` (the torch export of ``nn.Linear``)."""
        inputs = [x, self.constant(self.uniform((fout, fin)), "W")]
        if bias:
            inputs.append(self.constant(self.uniform(fout), "B"))
        return self.node("Gemm", inputs, "gemm", transB=1, **attrs)

    def binary(self, op: str, a: str, b: str) -> str:
        return self.node(op, [a, b], op.lower())

    def sum(self, terms: list[str], signs: list[int] | None = None) -> str:
        """``terms[0] +- terms[1] +- ...`` as a left-to-right chain of Add / Sub."""
        signs = signs or [1] * len(terms)
        result = terms[0]
        for term, sign in zip(terms[1:], signs[1:]):
            result = self.binary("Add" if sign > 0 else "Sub", result, term)
        return result

    # -- the model
    def build(self, outputs, opset: int = 17) -> onnx.ModelProto:
        """The model with ``outputs`` as graph outputs; their shapes come from ONNX shape
        inference (intermediate ``value_info`` is dropped again)."""
        outputs = [outputs] if isinstance(outputs, str) else list(outputs)
        graph = helper.make_graph(
            self.nodes, "test_graph", self.inputs,
            [helper.make_tensor_value_info(name, self.elem_type, None) for name in outputs],
            self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        del model.graph.value_info[:]
        for value in model.graph.output:
            assert value.type.tensor_type.HasField("shape"), f"no shape inferred for {value.name}"
        onnx.checker.check_model(model)
        return model


# ---- looking at graphs -------------------------------------------------------------------

def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def nodes_of(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == op]


def attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    raise KeyError(name)


def graph_dtype(model: onnx.ModelProto) -> np.dtype:
    elem = model.graph.input[0].type.tensor_type.elem_type
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem))


def io_signature(model: onnx.ModelProto) -> tuple:
    """``(inputs, outputs)``, each ``[(name, elem_type, dims)]`` (initializers excluded)."""
    initializers = {t.name for t in model.graph.initializer}

    def describe(values):
        rows = []
        for value in values:
            if value.name in initializers:
                continue
            tensor_type = value.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param
                         for d in tensor_type.shape.dim)
            rows.append((value.name, tensor_type.elem_type, dims))
        return rows

    return describe(model.graph.input), describe(model.graph.output)


def conv_batchnorm_pairs(model: onnx.ModelProto) -> list[str]:
    """BatchNormalization nodes that read a Conv output read by nothing else (not even a
    graph output). After a correct fusion this list is empty: such a BN always folds."""
    readers = Counter(name for node in model.graph.node for name in node.input)
    readers.update(value.name for value in model.graph.output)
    producers = {out: node for node in model.graph.node for out in node.output}
    pairs = []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        source = producers.get(node.input[0])
        if source is not None and source.op_type == "Conv" and readers[node.input[0]] == 1:
            pairs.append(node.name or node.output[0])
    return pairs


# ---- numerical oracles -------------------------------------------------------------------

def reference_error(reference: onnx.ModelProto, candidate: onnx.ModelProto,
                    seed: int = 0) -> float:
    """``max|a - b| / max|a|`` over all outputs, both models run by the ONNX reference
    evaluator (numpy) on the inputs ``verify_onnx`` would use."""
    feeds = random_inputs(reference, seed=seed)
    expected = ReferenceEvaluator(reference).run(None, feeds)
    actual = ReferenceEvaluator(candidate).run(None, feeds)
    worst, scale = 0.0, 0.0
    for a, b in zip(expected, actual, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, f"output shapes differ: {a.shape} vs {b.shape}"
        assert a.dtype == b.dtype, f"output dtypes differ: {a.dtype} vs {b.dtype}"
        a, b = a.astype(np.float64), b.astype(np.float64)
        if a.size:
            worst = max(worst, float(np.abs(a - b).max()))
            scale = max(scale, float(np.abs(a).max()))
    return worst / scale if scale > 0 else worst


def assert_same_outputs(reference: onnx.ModelProto, candidate: onnx.ModelProto,
                        rtol: float | None = None) -> float:
    """Float64 graphs: reference evaluator within ``rtol`` (default ``RTOL64``), plus ONNX
    Runtime where it has float64 kernels. Float32 graphs: ONNX Runtime within ``rtol``
    (default ``RTOL32``). Returns the error found."""
    if graph_dtype(reference) == np.float64:
        rtol = RTOL64 if rtol is None else rtol
        error = reference_error(reference, candidate)
        assert error <= rtol, f"float64 outputs differ: relative error {error:.3e} > {rtol:.1e}"
        ops = set(op_counts(reference)) | set(op_counts(candidate))
        if not ops & NO_DOUBLE_KERNEL_IN_ORT:
            verify_onnx(reference, candidate, rtol=rtol)
        return error
    rtol = RTOL32 if rtol is None else rtol
    return verify_onnx(reference, candidate, rtol=rtol)


# ---- fusing, with the invariants every test checks ---------------------------------------------

def fuse_checked(model: onnx.ModelProto):
    """``fuse_onnx_model(model)``, checking the input model is unchanged, the graph's
    inputs / outputs keep their names, element types and shapes, and the result is a
    valid ONNX model."""
    before = model.SerializeToString()
    fused, report = fuse_onnx_model(model)
    assert model.SerializeToString() == before, "fuse_onnx_model mutated its input model"
    assert io_signature(fused) == io_signature(model), \
        f"graph inputs/outputs changed:\n{io_signature(model)}\n{io_signature(fused)}"
    onnx.checker.check_model(fused, full_check=True)  # strict types: weights match inputs
    return fused, report


def _context(fused, report) -> str:
    nodes = "\n".join(f"  {n.op_type}({', '.join(n.input)}) -> {', '.join(n.output)}"
                      for n in fused.graph.node)
    return f"{report.table()}\nfused graph:\n{nodes}"


def reasons(report) -> list[str]:
    return [item.reason for item in report.skipped]


def assert_reason(report, phrase: str) -> None:
    found = reasons(report)
    assert any(phrase in reason for reason in found), \
        f"no skip reason mentions {phrase!r}; reasons: {found}\n{report.table()}"


def assert_ops(fused, report, expect: dict[str, int]) -> None:
    counts = op_counts(fused)
    wrong = {op: (counts.get(op, 0), want) for op, want in expect.items()
             if counts.get(op, 0) != want}
    assert not wrong, f"node counts (got, expected): {wrong}\n{_context(fused, report)}"


def fuse_exactly(model: onnx.ModelProto, *, ops: dict[str, int] | None = None,
                 patterns: dict[str, int] | None = None, rtol: float | None = None):
    """Positive check: outputs equal (:func:`assert_same_outputs`), node counts by op
    type match ``ops`` on the keys given, ``pattern_counts()`` equals ``patterns``."""
    fused, report = fuse_checked(model)
    if ops is not None:
        assert_ops(fused, report, ops)
    if patterns is not None:
        assert report.pattern_counts() == Counter(patterns), _context(fused, report)
    assert_same_outputs(model, fused, rtol)
    return fused, report


def fuse_refused(model: onnx.ModelProto, *, unchanged: tuple[str, ...], reason: str | None,
                 ops: dict[str, int] | None = None, rtol: float | None = None):
    """Negative check: outputs still equal; the ``unchanged`` op types have as many nodes
    as in the original; some skip reason contains ``reason`` (if given)."""
    fused, report = fuse_checked(model)
    original = op_counts(model)
    assert_ops(fused, report, {op: original.get(op, 0) for op in unchanged})
    if ops is not None:
        assert_ops(fused, report, ops)
    if reason is not None:
        assert_reason(report, reason)
    assert_same_outputs(model, fused, rtol)
    return fused, report


# ---- torch exports ---------------------------------------------------------------------------

def export_torch(model, x, opset: int = 17, constant_folding: bool = False) -> onnx.ModelProto:
    """``model`` (a torch module in eval mode) exported by the TorchScript exporter
    (``dynamo=False``) at input ``x``, input named "x" and output "y". Without constant
    folding by default: with it, the exporter folds a conv's BatchNorm itself and the
    frontend never sees it."""
    import contextlib
    import io
    import warnings

    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=opset,
                          do_constant_folding=constant_folding, input_names=["x"],
                          output_names=["y"])
    return onnx.load_from_string(buffer.getvalue())


def export(model, x, dynamo: bool) -> onnx.ModelProto:
    """``model`` exported at input ``x`` by the TorchScript exporter (opset 17, its constant
    folding on, as users run it) or, ``dynamo``, by the ``torch.export``-based one."""
    import contextlib
    import io
    import warnings

    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
            return program.model_proto
        torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=17)
    return onnx.load_from_string(buffer.getvalue())
