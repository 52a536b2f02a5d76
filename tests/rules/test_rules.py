"""Every folding rule of the rule table (``rule_table.py``), through every frontend.

Each case of :data:`rule_table.CASES` runs three ways:

* ``fx``: ``reparam_fx.fuse(module)`` (symbolic tracing; ``example_inputs`` only where the
  case says why they are needed),
* ``export``: ``reparam_fx.fuse(torch.export.export(module, args))``,
* ``onnx``: ``reparam_fx.fuse_onnx_model`` on ``torch.onnx.export(module, dynamo=False,
  opset_version=17, do_constant_folding=False)``. Without constant folding the exporter
  keeps every BatchNormalization (with it, it folds a conv's BN itself and the rule would
  never reach the frontend); its shape arithmetic (``F.pad``) is still there to clean up.

The torch frontends run a float64 copy and compare with the module at ``RTOL`` (1e-10);
the ONNX one runs the float32 export and its fused form in ONNX Runtime at ``RTOL32``
(1e-5), with the invariants of ``onnx_checks.fuse_checked`` (input unchanged, graph
inputs/outputs kept, ``onnx.checker`` with ``full_check``). Every case randomises conv
weights, BatchNorm statistics and affine parameters and layer scales first
(``fx_checks.randomized``): a fresh BatchNorm is the identity and hides folding bugs.

Positive cases check that the fold happened: the whole op histogram after fusion, the
report's patterns and the geometry of the conv left. Negative cases check that the ops in
question are still there, outputs still equal, and the report's reason.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import onnx
import pytest
import torch
import torch.nn as nn

import reparam_fx
from fx_checks import RTOL, assert_reason, assert_state_unchanged, randomized, snapshot
from onnx_checks import assert_reason as assert_onnx_reason
from onnx_checks import (assert_same_outputs, export_torch, fuse_checked, initializer,
                         op_counts as onnx_op_counts)
from reparam_fx.testing import count_macs
from rules.rule_table import CASES, FRONTENDS, Case, Folds, Refused

OP_CATEGORIES = ("conv", "batch_norm", "linear", "add", "sub", "mul", "div", "avg_pool", "pad")
# torch op category -> the ONNX op types that spell it (a Linear on a rank-3 input is a
# MatMul, and its bias an Add)
ONNX_OPS = {"conv": ("Conv",), "batch_norm": ("BatchNormalization",), "linear": ("Gemm", "MatMul"),
            "add": ("Add",), "sub": ("Sub",), "mul": ("Mul",), "div": ("Div",),
            "avg_pool": ("AveragePool",), "pad": ("Pad",)}
# ONNX ops of the modules around the rules, which no rule touches: they stay as exported
ONNX_BYSTANDERS = ("Relu", "Flatten")


@dataclass
class Subject:
    """One case's module, randomised, in float32 (for ONNX) and as a float64 copy (for the
    torch frontends), its example input, and the float64 module's MACs: made once and
    shared by the three frontends (none may change them: each run checks)."""

    model: nn.Module
    model64: nn.Module
    x: torch.Tensor
    x64: torch.Tensor
    state: dict = field(init=False)
    state64: dict = field(init=False)
    _macs: int | None = None

    def __post_init__(self):
        self.state, self.state64 = snapshot(self.model), snapshot(self.model64)

    @property
    def macs(self) -> int:
        if self._macs is None:
            self._macs = count_macs(self.model64, (self.x64,))
        return self._macs

    def assert_unchanged(self) -> None:
        assert_state_unchanged(self.state, self.model)
        assert_state_unchanged(self.state64, self.model64)


_latest: dict[tuple[str, str], Subject] = {}  # the frontends of a case run one after another


def subject(case: Case) -> Subject:
    key = (case.rule, case.name)
    if key not in _latest:
        _latest.clear()
        model = randomized(case.build())
        x = torch.randn(case.input_shape, generator=torch.Generator().manual_seed(0))
        _latest[key] = Subject(model, copy.deepcopy(model).double(), x, x.double())
    return _latest[key]


# ---- checks shared by the frontends ------------------------------------------------------

def assert_counts(got: dict[str, int], want: dict[str, int], context) -> None:
    wrong = {op: (got.get(op, 0), n) for op, n in want.items() if got.get(op, 0) != n}
    assert not wrong, f"op counts (got, expected): {wrong}\n{context()}"


def expected_counts(outcome, before: dict[str, int], categories) -> dict[str, int]:
    """The counts the fused graph must have, by category (all of them for a positive)."""
    if isinstance(outcome, Folds):
        return {op: outcome.ops.get(op, 0) for op in categories}
    return {**{op: before.get(op, 0) for op in outcome.unchanged}, **outcome.ops}


def assert_patterns(report, outcome, context) -> None:
    patterns = report.pattern_counts()
    if outcome.patterns is not None:
        assert patterns == Counter(outcome.patterns), f"patterns {dict(patterns)}\n{context()}"
    elif isinstance(outcome, Refused):
        assert not report.fused, f"a refused case fused something\n{context()}"


def assert_geometry(convs: list[dict], outcome, context) -> None:
    if not isinstance(outcome, Folds) or outcome.conv is None:
        return
    assert len(convs) == 1, f"expected one conv, found {convs}\n{context()}"
    wrong = {key: (convs[0][key], want) for key, want in outcome.conv.items()
             if convs[0][key] != want}
    assert not wrong, f"fused conv (got, expected): {wrong}\n{context()}"


# ---- torch frontends: fuse(module), fuse(torch.export.export(module, args)) ----------------

def _torch_convs(fused: torch.fx.GraphModule) -> list[dict]:
    """Geometry of every conv of a fused GraphModule: conv modules, and aten / functional
    convolutions on weights held as attributes."""
    modules = dict(fused.named_modules())
    convs = []
    for node in fused.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.modules.conv._ConvNd):
            conv = modules[node.target]
            weight, stride, padding = conv.weight, conv.stride, conv.padding
            dilation, groups = conv.dilation, conv.groups
        elif node.op == "call_function" and node.target in (torch.ops.aten.convolution.default,
                                                            torch.ops.aten.conv2d.default,
                                                            torch.nn.functional.conv2d):
            args = list(node.args) + [None] * 9
            assert args[1].op == "get_attr", node.format_node()
            weight = fused
            for name in args[1].target.split("."):
                weight = getattr(weight, name)
            stride, padding, dilation = args[3] or (1, 1), args[4] or (0, 0), args[5] or (1, 1)
            groups = args[8] if node.target is torch.ops.aten.convolution.default else args[6]
            groups = groups or 1
        else:
            continue
        assert not isinstance(padding, str), f"padding={padding!r}"
        convs.append({"kernel": tuple(weight.shape[2:]), "stride": tuple(stride),
                      "pads": tuple(padding) * 2, "dilation": tuple(dilation), "groups": groups,
                      "out_channels": weight.shape[0]})
    return convs


def _program_state(program) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in program.state_dict.items()}


def run_torch(case: Case, frontend: str) -> None:
    outcome = case.outcome_for(frontend)
    subj = subject(case)
    model64, x64 = subj.model64, subj.x64
    if frontend == "fx":
        captured = model64
        fused = reparam_fx.fuse(model64, (x64,) if case.fx_example_inputs else None)
    else:
        captured = torch.export.export(model64, (x64,))
        program_state = _program_state(captured)
        fused = reparam_fx.fuse(captured)
        assert _program_state(captured).keys() == program_state.keys() and all(
            torch.equal(value, captured.state_dict[key]) for key, value in program_state.items()), \
            "fuse mutated the exported program"
    subj.assert_unchanged()
    report = fused.fusion_report
    context = lambda: f"{report}\n{fused.graph}"

    assert reparam_fx.verify(model64, fused, (x64,), rtol=RTOL) <= RTOL
    assert count_macs(fused, (x64,)) <= subj.macs, "fusion added MACs"
    if isinstance(outcome, Refused):  # (an ExportedProgram's graph counts as its module())
        before = reparam_fx.op_counts(captured if frontend == "fx" else captured.graph_module)
    else:
        before = {}
    assert_counts(reparam_fx.op_counts(fused), expected_counts(outcome, before, OP_CATEGORIES),
                  context)
    assert_patterns(report, outcome, context)
    assert_geometry(_torch_convs(fused), outcome, context)
    if isinstance(outcome, Refused) and outcome.reason is not None:
        assert_reason(fused, outcome.reason)


# ---- ONNX frontend -------------------------------------------------------------------------

def _onnx_convs(model: onnx.ModelProto) -> list[dict]:
    convs = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight = initializer(model, node.input[1])
        spatial = weight.ndim - 2
        convs.append({"kernel": tuple(weight.shape[2:]),
                      "stride": tuple(attrs.get("strides", [1] * spatial)),
                      "pads": tuple(attrs.get("pads", [0] * 2 * spatial)),
                      "dilation": tuple(attrs.get("dilations", [1] * spatial)),
                      "groups": attrs.get("group", 1), "out_channels": weight.shape[0]})
    return convs


def _by_category(counts: Counter) -> dict[str, int]:
    return {op: sum(counts.get(t, 0) for t in types) for op, types in ONNX_OPS.items()}


def run_onnx(case: Case) -> None:
    outcome = case.outcome_for("onnx")
    subj = subject(case)
    model = export_torch(subj.model, subj.x)
    subj.assert_unchanged()
    fused, report = fuse_checked(model)
    before, after = onnx_op_counts(model), onnx_op_counts(fused)
    context = lambda: (f"{report.table()}\nexported: {dict(before)}\nfused: "
                       f"{[(n.op_type, list(n.input)) for n in fused.graph.node]}")
    assert_counts(_by_category(after), expected_counts(outcome, _by_category(before), ONNX_OPS),
                  context)
    if isinstance(outcome, Folds):  # and nothing else is left but the bystanders
        rest = {op: n for op, n in after.items()
                if not any(op in types for types in ONNX_OPS.values())}
        assert rest == {op: before[op] for op in ONNX_BYSTANDERS if before[op]}, \
            f"left in the fused graph: {rest}\n{context()}"
    assert_patterns(report, outcome, context)
    assert_geometry(_onnx_convs(fused), outcome, context)
    if isinstance(outcome, Refused) and outcome.reason is not None:
        assert_onnx_reason(report, outcome.reason)
    assert_same_outputs(model, fused)  # float32: ONNX Runtime, RTOL32


# ---- the table -----------------------------------------------------------------------------

def _params():
    for case in CASES:
        for frontend in FRONTENDS:
            note = " (differs)" if frontend in case.differs else ""
            yield pytest.param(case, frontend, id=f"{case.rule}: {case.name} [{frontend}]{note}")


@pytest.mark.parametrize("case, frontend", list(_params()))
def test_rule(case: Case, frontend: str):
    if frontend == "onnx":
        run_onnx(case)
    else:
        run_torch(case, frontend)


def test_the_table_is_complete():
    """Every rule has a positive and a negative case; every exception is explained."""
    rules = {}
    for case in CASES:
        rules.setdefault(case.rule, set()).add(case.positive)
        assert set(case.differs) <= set(FRONTENDS), case.name
        for frontend, differs in case.differs.items():
            assert differs.why.strip(), f"{case.name} [{frontend}]: say why it differs"
        for frontend in FRONTENDS:
            outcome = case.outcome_for(frontend)
            if isinstance(outcome, Refused) and outcome.reason is None:
                assert outcome.no_reason.strip(), f"{case.name} [{frontend}]: why no reason?"
            if isinstance(outcome, Folds):
                assert set(outcome.ops) <= set(OP_CATEGORIES), case.name
    assert len({(case.rule, case.name) for case in CASES}) == len(CASES), "duplicate names"
    missing = {rule: kinds for rule, kinds in rules.items() if kinds != {True, False}}
    assert not missing, f"rules without a positive (True) or negative (False) case: {missing}"
