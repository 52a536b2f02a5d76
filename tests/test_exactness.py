"""Exact or untouched, by class: programs that fusion once got silently wrong or crashed on.

Each test is parametrised over the members of its class (every way a name can alias
another, every in-place operator, every capture) rather than one example, and checks the
fused program against the program it was given, in float64, at two input sizes where the
capture allows it, and that the folds that are still exact did happen.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn as nn
import torch.nn.functional as F

import reparam_fx
from reparam_fx.testing import randomize_batchnorm_

RTOL64 = 1e-12
SIZES = ((2, 4, 6, 6), (2, 4, 5, 7))


def _error(reference, candidate, x) -> float:
    reference, candidate = copy.deepcopy(reference).double(), copy.deepcopy(candidate).double()
    with torch.no_grad():
        # (clones: a program that writes through an alias of its input changes it)
        a, b = reference(x.double().clone()), candidate(x.double().clone())
    assert a.shape == b.shape
    return ((a - b).abs().max() / a.abs().max()).item()


def _fused_ways(model, x):
    """``(name, program given, fused)`` for each capture of ``model`` at ``x``."""
    program = torch.export.export(model, (x,))
    core = torch.export.export(model, (x,)).run_decompositions()
    return [("fx", model, reparam_fx.fuse(model)),
            ("fx+inputs", model, reparam_fx.fuse(model, (x,))),
            ("export", program.module(), reparam_fx.fuse(program)),
            ("core aten", core.module(), reparam_fx.fuse(core))]


def _assert_exact_everywhere(model, sizes=SIZES):
    model = randomize_batchnorm_(model.eval().double(), seed=5)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(sizes[0], dtype=torch.float64)
    results = {}
    for name, given, fused in _fused_ways(model, x):
        # symbolic captures hold for every size; export programs for the size they saw
        for size in (sizes if name.startswith("fx") else sizes[:1]):
            xs = torch.randn(size, dtype=torch.float64)
            assert _error(given, fused, xs) <= RTOL64, (name, size)
        results[name] = fused
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    return results


# ---- in-place arithmetic through an alias ---------------------------------------------

class _ReturnsInput(nn.Module):
    def forward(self, x):
        return x


ALIASES = {
    "nn.Identity": lambda m, x: m.identity(x),
    "eval Dropout": lambda m, x: m.dropout(x),
    "F.dropout(training=False)": lambda m, x: F.dropout(x, 0.5, training=False),
    "name bound twice": lambda m, x: x,
    "module returning its input": lambda m, x: m.passthrough(x),
    "view": lambda m, x: x.view(x.shape),
    "contiguous": lambda m, x: x.contiguous(),
    "to(its own dtype)": lambda m, x: x.to(x.dtype),
}
IN_PLACE = {"+=": lambda a, b: a.__iadd__(b), "-=": lambda a, b: a.__isub__(b),
            "*=": lambda a, b: a.__imul__(b), "/=": lambda a, b: a.__itruediv__(b)}


class AliasWrittenInPlace(nn.Module):
    """``out = alias(x); out op= bn(conv(x)); return out + x``: the write changes ``x`` too."""

    def __init__(self, alias, operator_name):
        super().__init__()
        self.alias, self.operator_name = alias, operator_name
        self.identity, self.dropout, self.passthrough = nn.Identity(), nn.Dropout(), _ReturnsInput()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        out = ALIASES[self.alias](self, x)
        branch = self.bn(self.conv(x))
        if self.operator_name == "+=":
            out += branch
        elif self.operator_name == "-=":
            out -= branch
        elif self.operator_name == "*=":
            out *= branch
        else:
            out /= branch.abs() + 1
        return out + x


@pytest.mark.parametrize("operator_name", IN_PLACE)
@pytest.mark.parametrize("alias", ALIASES)
def test_in_place_arithmetic_through_an_alias_is_exact(alias, operator_name):
    results = _assert_exact_everywhere(AliasWrittenInPlace(alias, operator_name))
    # the conv+BN pair itself does not touch the alias: it still folds
    assert reparam_fx.op_counts(results["fx"])["batch_norm"] == 0


def test_in_place_operators_are_traced_as_in_place():
    """Symbolic tracing records ``out += e`` as ``operator.iadd``, not as ``out + e``."""
    fused = reparam_fx.fuse(AliasWrittenInPlace("nn.Identity", "+=").eval())
    assert any(n.target.__name__ == "iadd" for n in fused.graph.nodes if n.op == "call_function")


class FreshSumInPlace(nn.Module):
    """``out = bn0(x); out += bn(conv(x)); out += conv1(x)``: no alias, so the sum merges."""

    def __init__(self):
        super().__init__()
        self.bn0, self.bn = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.conv, self.conv1 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        out = self.bn0(x)
        out += self.bn(self.conv(x))
        out += self.conv1(x)
        return out


def test_in_place_sum_of_fresh_tensors_still_merges():
    for name, fused in _assert_exact_everywhere(FreshSumInPlace()).items():
        counts = reparam_fx.op_counts(fused)
        assert counts["conv"] == 1 and counts["batch_norm"] == 0 and counts["add"] == 0, name


class ExportAlias(nn.Module):
    """Issue example B: eval Dropout returns ``y`` itself, so ``out.add_(y)`` doubles ``y``
    and the conv after it reads ``2y`` (the training IR keeps ``aten.dropout``)."""

    def __init__(self, alias):
        super().__init__()
        self.alias = alias
        self.drop, self.identity = nn.Dropout(), nn.Identity()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(x)
        out = self.drop(y) if self.alias == "dropout" else y.to(y.dtype) \
            if self.alias == "to" else y.contiguous()
        out.add_(y)
        return out + self.conv(y)


@pytest.mark.parametrize("alias", ["dropout", "to", "contiguous"])
def test_in_place_write_through_an_exported_alias_is_exact(alias):
    model = randomize_batchnorm_(ExportAlias(alias).eval().double(), seed=2)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    program = torch.export.export(model, (x,))
    assert _error(program.module(), reparam_fx.fuse(program), x) <= RTOL64
    assert _error(model, reparam_fx.fuse(model), x) <= RTOL64


# ---- reshapes to a whole shape ----------------------------------------------------------

SHAPE_ARGUMENTS = {
    "reshape(t.shape)": lambda t: t.reshape(t.shape),
    "view(t.size())": lambda t: t.view(t.size()),
    "reshape(t.shape[:-1] + t.shape[-1:])": lambda t: t.reshape(t.shape[:-1] + t.shape[-1:]),
}


class ChannelsLastLinear(nn.Module):
    """Issue example E: a trailing move after a Linear on a tensor reshaped to a shape."""

    def __init__(self, shape_argument):
        super().__init__()
        self.shape_argument = shape_argument
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        t = x.movedim(1, -1)
        return (self.fc(SHAPE_ARGUMENTS[self.shape_argument](t)) * 2.0).movedim(-1, 1)


@pytest.mark.parametrize("shape_argument", SHAPE_ARGUMENTS)
def test_reshape_to_a_whole_shape_is_no_rank_proof(shape_argument):
    results = _assert_exact_everywhere(ChannelsLastLinear(shape_argument), ((2, 4, 4, 4), (2, 4, 3, 5)))
    for name, fused in results.items():  # the scale folds into the Linear; the moves stay
        assert reparam_fx.op_counts(fused)["mul"] == 0, name


def test_a_whole_shape_proves_its_tensors_rank():
    from reparam_fx.fx.capture import FaithfulTracer, Workspace
    from reparam_fx.fx.facts import GraphFacts

    class Model(nn.Module):
        def forward(self, x):
            torch._assert(x.ndim == 4, "4-D")
            return x.reshape(x.shape) + 1, x.reshape(x.size(0)), x.reshape(x.shape[1:])

    model = Model()
    graph = FaithfulTracer().trace(model)
    facts = GraphFacts(Workspace(model, graph, "fx", "Model"))
    ranks = {n.name: facts.rank(n) for n in graph.nodes if n.target == "reshape"}
    assert ranks == {"reshape": 4, "reshape_1": 1, "reshape_2": None}


# ---- copies that make a view legal ----------------------------------------------------

class TokensBatchNorm(nn.Module):
    """Issue example C: BatchNorm1d over flattened channels-last tokens, in core ATen a
    ``clone`` (contiguous) makes the ``view`` after the permute legal."""

    def __init__(self, style):
        super().__init__()
        self.style = style
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm1d(4)

    def forward(self, x):
        t = self.conv(x).movedim(1, -1)
        if self.style == "flatten":
            tokens = t.flatten(0, -2)
        else:
            tokens = t.contiguous().view(-1, t.shape[-1])
        return self.bn(tokens).reshape_as(t).movedim(-1, 1)


@pytest.mark.parametrize("style", ["flatten", "contiguous view"])
def test_copies_between_moves_are_written_again(style):
    results = _assert_exact_everywhere(TokensBatchNorm(style))
    # without shapes the conv may take unbatched (C, H, W) input, where the BatchNorm's
    # axis is not the channel axis: only captures with shapes fold it
    assert reparam_fx.op_counts(results["fx"])["batch_norm"] == 1
    for name in ("fx+inputs", "export", "core aten"):
        assert reparam_fx.op_counts(results[name])["batch_norm"] == 0, name


# ---- the no-more-MACs contract, as mac_count counts -------------------------------------

def test_pool_turned_depthwise_conv_costs_what_the_pool_did():
    model = randomize_batchnorm_(nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(4)).eval(), 1)
    x = torch.randn(1, 4, 8, 8)
    fused = reparam_fx.fuse(model, (x,))
    assert reparam_fx.op_counts(fused)["conv"] == 1 and reparam_fx.op_counts(fused)["avg_pool"] == 0
    for size in (3, 8, 11):
        x = torch.randn(1, 4, size, size)
        assert reparam_fx.mac_count(fused, x) <= reparam_fx.mac_count(model, x)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_composition_never_adds_macs_at_any_size(stride):
    """A conv then a strided 1x1: the first conv runs at s(n-1)+1 positions for n outputs,
    not s*n; at the smallest sizes at one per output."""
    model = randomize_batchnorm_(nn.Sequential(
        nn.Conv1d(4, 4, 3), nn.BatchNorm1d(4), nn.Conv1d(4, 8, 1, stride=stride, groups=4)
    ).eval().double(), 1)
    fused = reparam_fx.fuse(model, (torch.randn(1, 4, 9, dtype=torch.float64),))
    for length in range(3, 24):
        x = torch.randn(1, 4, length, dtype=torch.float64)
        assert reparam_fx.mac_count(fused, x) <= reparam_fx.mac_count(model, x), length
        assert _error(model, fused, x) <= RTOL64


def test_cheap_composition_still_happens():
    """A 3x3 conv, BN, then a 1x1 reducing 16 channels to 2: composing costs 2*16*9 per
    position, less than 16*16*9 + 2*16 - so it folds."""
    model = randomize_batchnorm_(nn.Sequential(
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Conv2d(16, 2, 1, stride=2)
    ).eval().double(), 1)
    fused = reparam_fx.fuse(model, (torch.randn(1, 16, 8, 8, dtype=torch.float64),))
    assert reparam_fx.op_counts(fused)["conv"] == 1
    for size in (1, 2, 5, 8):
        x = torch.randn(1, 16, size, size, dtype=torch.float64)
        assert reparam_fx.mac_count(fused, x) <= reparam_fx.mac_count(model, x)
        assert _error(model, fused, x) <= RTOL64


# ---- a channel affine after a sum whose branches do not merge ---------------------------

class BatchNormAfterSum(nn.Module):
    """``bn(a(x) + b(y) - c(x))``: convs over two inputs (or of windows that do not merge)
    - the BatchNorm distributes over the sum, into every conv."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1, bias=False)
        self.c = nn.Conv2d(4, 4, 3, padding=3, dilation=3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = torch.relu(x)
        if self.kind == "two inputs":
            return self.bn(self.a(x) - self.b(y))
        if self.kind == "unmergeable windows":  # merging a with c would cost a 7x7 kernel
            return self.bn(self.a(x) + self.c(x) + self.b(x))
        if self.kind == "rank asserted":  # timm's BatchNormAct2d reads the sum's ndim
            total = self.a(x) + self.b(y)
            torch._assert(total.ndim == 4, f"wants a 4D input, got {total.ndim}D")
            return self.bn(total)
        return self.bn(self.a(x) + x)  # an identity term has no conv to absorb it


@pytest.mark.parametrize("kind, convs", [("two inputs", 2), ("unmergeable windows", 2),
                                         ("rank asserted", 2), ("identity term", 1)])
def test_batchnorm_after_a_sum_distributes_over_its_convs(kind, convs):
    results = _assert_exact_everywhere(BatchNormAfterSum(kind))
    for name, fused in results.items():
        counts = reparam_fx.op_counts(fused)
        assert counts["conv"] == convs, name
        # a + x merges into one conv (the BN with it); two convs each absorb the BN
        assert counts["batch_norm"] == 0, name
        x = torch.randn(SIZES[0], dtype=torch.float64)
        model = BatchNormAfterSum(kind).eval().double()
        assert reparam_fx.mac_count(fused, x) <= reparam_fx.mac_count(model, x)


def test_batchnorm_after_a_sum_with_an_identity_of_another_input_stays():
    """``bn(conv(x) + y)``: y would need an op of its own to take the scale."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x) + torch.relu(x))
    for name, fused in _assert_exact_everywhere(Model()).items():
        assert reparam_fx.op_counts(fused)["batch_norm"] == 1, name


# ---- asymmetric windows: even kernels with padding='same', explicit pads ---------------

class SameKernels(nn.Module):
    """2x2, 3x3 (padding 1) and 4x4 convs, all "same": the 2x2 and 4x4 pad one more after
    than before, so their windows nest in the 4x4's and the three are one 4x4 conv."""

    def __init__(self, kernels, explicit_pad=False):
        super().__init__()
        self.explicit_pad = explicit_pad
        self.branches = nn.ModuleList(
            nn.Conv2d(4, 4, k, padding=0 if explicit_pad and k % 2 == 0 else "same")
            for k in kernels)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        out = 0
        for conv in self.branches:
            k = conv.kernel_size[0]
            if self.explicit_pad and k % 2 == 0:  # the TF-"same" idiom with static sizes
                before = (k - 1) // 2
                out = out + conv(F.pad(x, (before, k - 1 - before, before, k - 1 - before)))
            else:
                out = out + conv(x)
        return self.bn(out)


@pytest.mark.parametrize("explicit_pad", [False, True], ids=["padding='same'", "F.pad"])
@pytest.mark.parametrize("kernels, written", [((2, 3, 4), 4), ((2,), 2), ((2, 3), 3),
                                              ((4, 1), 4)])
def test_even_same_kernels_fold_and_nest(kernels, written, explicit_pad):
    results = _assert_exact_everywhere(SameKernels(kernels, explicit_pad))
    model = SameKernels(kernels, explicit_pad).eval().double()
    for name, fused in results.items():
        counts = reparam_fx.op_counts(fused)
        assert counts["conv"] == 1 and counts["batch_norm"] == 0, name
        convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
        shapes = [tuple(t.shape[2:]) for n, t in fused.named_parameters() if t.dim() == 4]
        assert shapes == [(written, written)], (name, shapes, convs)
        for size in (SIZES if name.startswith("fx") else SIZES[:1]):
            x = torch.randn(size, dtype=torch.float64)
            assert reparam_fx.mac_count(fused, x) <= reparam_fx.mac_count(model, x), name


def test_asymmetric_pad_read_elsewhere_is_not_absorbed():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 2), nn.BatchNorm2d(4)

        def forward(self, x):
            padded = F.pad(x, (0, 1, 0, 1))
            return self.bn(self.conv(padded)) + padded[..., 1:, 1:]
    results = _assert_exact_everywhere(Model())
    counts = reparam_fx.op_counts(results["fx"])
    assert counts["batch_norm"] == 0 and counts["pad"] == 1  # conv+bn folds, the pad stays


@settings(max_examples=25, deadline=None)
@given(kernel=st.integers(1, 5), dilation=st.integers(1, 3), before=st.integers(0, 3),
       after=st.integers(0, 3), stride=st.integers(1, 2),
       size=st.tuples(st.integers(1, 9), st.integers(1, 9)))
def test_asymmetric_conv_equals_padded_conv(kernel, dilation, before, after, stride, size):
    """The algebra's asymmetric window: the zero-tap kernel with symmetric padding equals
    pad-then-conv at every size, and trims back to the original kernel."""
    from reparam_fx.core import affine
    weight = torch.randn(3, 2, kernel, kernel, dtype=torch.float64)
    pads = ((before, after), (after, before))
    try:
        term = affine.asymmetric_conv(weight, None, (stride, stride), pads, (dilation,) * 2, 1)
    except affine.NotExact:
        assert (after - before) % dilation
        return
    assert term.written_kernel == (kernel, kernel) and term.macs == weight.numel()
    x = torch.randn(1, 2, *size, dtype=torch.float64)
    padded = F.pad(x, (after, before, before, after))
    if any(s < dilation * (kernel - 1) + 1 for s in padded.shape[2:]):
        return
    expected = F.conv2d(padded, weight, stride=stride, dilation=dilation)
    got = F.conv2d(x, term.weight.value(), stride=stride, padding=term.padding, dilation=dilation)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)


def test_functional_even_same_conv_folds_its_batchnorm():
    """``F.conv2d(x, w, padding='same')`` with a 2x2 ``w`` (once refused as asymmetric)."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4, 2, 2))
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(F.conv2d(x, self.weight, padding="same"))
    for name, fused in _assert_exact_everywhere(Model()).items():
        assert reparam_fx.op_counts(fused)["batch_norm"] == 0, name


def test_even_same_conv_with_reflect_padding_is_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 2, padding="same", padding_mode="reflect"),
                          nn.BatchNorm2d(4))
    fused = _assert_exact_everywhere(model)["fx"]
    assert reparam_fx.op_counts(fused)["batch_norm"] == 1
    assert any("padding_mode='reflect'" in r for r in fused.fusion_report.skip_reasons())


def test_out_argument_is_a_write():
    """``torch.add(y, e, out=y)`` writes ``y`` (and ``x``, which ``y`` aliases)."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.identity = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Identity()

        def forward(self, x):
            y = self.identity(x)
            z = torch.add(y, self.bn(self.conv(x)), out=y)
            return z + x
    model = randomize_batchnorm_(Model().eval().double(), seed=1)
    fused = reparam_fx.fuse(model)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():  # (out= arguments do not take part in autograd)
        expected, got = model(x.clone()), fused(x.clone())
    assert ((expected - got).abs().max() / expected.abs().max()).item() <= RTOL64
    assert reparam_fx.op_counts(fused)["batch_norm"] == 0


@pytest.mark.parametrize("kind", ["two inputs", "unmergeable windows"])
def test_batchnorm_distributes_over_a_sum_in_onnx(kind):
    """The same distribution through the ONNX frontend, checked in ONNX Runtime (a
    subtracted term keeps its sign in its weights)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import io
    model = randomize_batchnorm_(BatchNormAfterSum(kind).eval(), seed=2)
    x = torch.randn(2, 4, 8, 8)
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=17)
    original = onnx.load_from_string(buffer.getvalue())
    fused, _ = reparam_fx.fuse_onnx_model(original)
    assert [n.op_type for n in fused.graph.node].count("BatchNormalization") == 0
    assert [n.op_type for n in fused.graph.node].count("Conv") == 2
    run = lambda m: ort.InferenceSession(m.SerializeToString()).run(
        None, {m.graph.input[0].name: x.numpy()})[0]
    expected, got = run(original), run(fused)
    assert abs(expected - got).max() / abs(expected).max() <= 1e-5


class CropScaleTokensLinear(nn.Module):
    """Found by the fuzzer (seed 1008, core ATen): ``x * 2`` on a cropped, permuted tensor
    keeps its permuted layout dense, so core ATen's ``view`` after the next permute was
    legal; with the scale folded into the Linear the ``view`` reads the crop itself."""

    def __init__(self):
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(4), nn.Linear(4, 4, bias=False)

    def forward(self, x):
        t = x.movedim(1, -1)
        v = self.bn(t.flatten(0, -2)).reshape_as(t).movedim(-1, 1)
        return self.fc((v[:, :, :, 1:] * 2.0).movedim(1, -1)).movedim(-1, 1)


def test_views_after_absorbed_ops_are_written_as_reshapes():
    results = _assert_exact_everywhere(CropScaleTokensLinear(), ((2, 4, 8, 8), (2, 4, 7, 9)))
    assert reparam_fx.op_counts(results["core aten"])["mul"] == 0


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("explicit_pad", [False, True], ids=["padding='same'", "F.pad"])
def test_even_same_kernels_nest_in_onnx(explicit_pad, dynamo):
    """ONNX Conv ``pads`` with unequal sides (and a zero Pad right before a Conv) read as
    zero-tap kernels; the merged conv is written trimmed, with asymmetric ``pads``."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import io
    model = randomize_batchnorm_(SameKernels((2, 3, 4), explicit_pad).eval(), seed=2)
    x = torch.randn(2, 4, 8, 8)
    buffer = io.BytesIO()
    if dynamo:
        torch.onnx.export(model, (x,), buffer, dynamo=True, verbose=False)
    else:
        torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=17)
    original = onnx.load_from_string(buffer.getvalue())
    fused, _ = reparam_fx.fuse_onnx_model(original)
    convs = [n for n in fused.graph.node if n.op_type == "Conv"]
    assert len(convs) == 1 and not any(n.op_type in ("Pad", "BatchNormalization", "Add")
                                       for n in fused.graph.node)
    pads = next(a.ints for a in convs[0].attribute if a.name == "pads")
    assert list(pads) == [1, 1, 2, 2]  # one 4x4 "same" conv
    run = lambda m: ort.InferenceSession(m.SerializeToString()).run(
        None, {m.graph.input[0].name: x.numpy()})[0]
    expected, got = run(original), run(fused)
    assert abs(expected - got).max() / abs(expected).max() <= 1e-5


class SummedTwice(nn.Module):
    """Found by the fuzzer (seed 3611): ``v += v`` (or ``v + v``) of a depthwise conv, then
    a Linear: the sum's MAC gate counted the conv twice, which paid for composing it with
    the Linear into a dense conv."""

    def __init__(self, in_place):
        super().__init__()
        self.in_place = in_place
        self.conv = nn.Conv1d(4, 4, 2, stride=2, padding=1, groups=4, bias=False)
        self.fc = nn.Linear(4, 4, bias=False)

    def forward(self, x):
        v = self.conv(x)
        if self.in_place:
            w = v
            w += v
        else:
            w = v + v
        return self.fc(w.movedim(1, -1)).movedim(-1, 1)


@pytest.mark.parametrize("in_place", [False, True])
def test_a_term_summed_twice_pays_once(in_place):
    model = SummedTwice(in_place)
    results = _assert_exact_everywhere(model, ((2, 4, 12), (2, 4, 11)))
    for name, fused in results.items():
        x = torch.randn(2, 4, 12, dtype=torch.float64)
        assert reparam_fx.mac_count(fused, (x,)) <= reparam_fx.mac_count(model.double(), (x,)), name


# ---- found by the fuzzer ----------------------------------------------------------------

class WriteThroughAViewOfTheInput(nn.Module):
    """``v = x.movedim(1, -1); v *= g`` writes ``x``, which is returned: the scale is a
    write, not a value the Linear may absorb."""

    def __init__(self, view):
        super().__init__()
        self.view = view
        self.gamma = nn.Parameter(torch.rand(4) + 0.5)
        self.fc = nn.Linear(4, 4, bias=False)

    def forward(self, x):
        if self.view == "movedim":
            v = x.movedim(1, -1)
            v *= self.gamma
            y = self.fc(v)
        else:
            v = x[:, :, :, 1:-1]
            v *= 2.0
            y = self.fc(v.movedim(1, -1))
        return x, y


@pytest.mark.parametrize("view", ["movedim", "crop"])
def test_a_write_through_a_view_of_a_value_read_later_is_kept(view):
    model = WriteThroughAViewOfTheInput(view).eval().double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    for fused in (reparam_fx.fuse(model), reparam_fx.fuse(model, (x,)),
                  reparam_fx.fuse(torch.export.export(model, (x.clone(),)))):
        with torch.no_grad():
            expected, got = model(x.clone()), fused(x.clone())
        for a, b in zip(expected, got):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)
        assert reparam_fx.op_counts(fused)["mul"] == 1  # the write stays a write


class GroupedConvTwiceThenMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1, groups=2, bias=False)

    def forward(self, x):
        return self.conv(self.conv(x)).mean((2, 3))


def test_grouped_pointwise_is_not_written_after_a_mean():
    """A grouped 1x1 conv is no Linear: it is written before the mean, not after it."""
    results = _assert_exact_everywhere(GroupedConvTwiceThenMean())
    for name, fused in results.items():
        assert reparam_fx.op_counts(fused)["conv"] == 1, name


class CancellingPermutesBeforeAnAssertingBatchNorm(nn.Module):
    """conv, BN, two permutes that cancel, a BatchNorm subclass asserting ``x.ndim``."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.bn_act = nn.BatchNorm2d(4)

    def forward(self, x):
        v = self.bn(self.conv(x)).permute(0, 2, 3, 1).permute(0, 3, 1, 2)
        torch._assert(v.ndim == 4, "expected 4D input")
        return F.interpolate(self.bn_act(v), scale_factor=2, mode="nearest")


def test_rank_read_after_cancelling_moves():
    for name, fused in _assert_exact_everywhere(CancellingPermutesBeforeAnAssertingBatchNorm()).items():
        assert reparam_fx.op_counts(fused)["batch_norm"] == 0, name


class TransposedSummedTwiceThenBatchNorm(nn.Module):
    """Found by the fuzzer (seeds 10481, 10564): ``w = v; w += v`` of a transposed conv
    (which merges with nothing), then a BatchNorm: distributing the BN over ``v + v`` wrote
    the transposed conv twice. A value summed twice is one term, twice the coefficient."""

    def __init__(self):
        super().__init__()
        self.up, self.bn = nn.ConvTranspose2d(4, 4, 2, stride=2), nn.BatchNorm2d(4)

    def forward(self, x):
        v = self.up(x)
        w = v
        w += v
        return self.bn(w)


def test_a_value_summed_twice_is_distributed_over_once():
    results = _assert_exact_everywhere(TransposedSummedTwiceThenBatchNorm())
    model = TransposedSummedTwiceThenBatchNorm().eval().double()
    for name, fused in results.items():
        x = torch.randn(SIZES[0], dtype=torch.float64)
        assert reparam_fx.mac_count(fused, (x,)) <= reparam_fx.mac_count(model, (x,)), name
        assert reparam_fx.op_counts(fused)["conv"] == 1, name
