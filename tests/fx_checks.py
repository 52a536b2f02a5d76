"""Shared checks for the torch.fx rule tests (``test_fx_rules.py``, ``test_fx_hazards.py``,
``test_fx_frontends.py``).

Every positive test goes through :func:`fuse_exactly` and every negative one through
:func:`fuse_refused`. Both

* randomise conv weights, BatchNorm statistics and affine parameters, and every
  ``layer_scale`` parameter (a fresh BN is the identity and hides folding bugs),
* fuse a float64 copy and compare outputs with an explicit tight tolerance (``RTOL``),
* check that neither the caller's model nor the float64 copy handed to ``fuse`` changed
  (``state_dict`` before and after),
* check that the fused model does not cost more MACs than the original.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
import torch.nn as nn

import reparam_fx
from reparam_fx.testing import count_macs, randomize_batchnorm_, randomize_parameters_

RTOL = 1e-10  # float64 relative error allowed for an exact rewrite


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with seeded conv/linear weights, BatchNorm statistics and
    affine parameters, and layer scales all randomised (in place; returns it)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                module.weight.uniform_(-1.0, 1.0)
                if module.bias is not None:
                    module.bias.uniform_(-1.0, 1.0)
    randomize_batchnorm_(model, seed=seed + 1)
    randomize_parameters_(model, names=("layer_scale",), seed=seed + 2)
    return model.eval()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_state_unchanged(before: dict[str, torch.Tensor], model) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys(), "fuse changed the input model's state_dict keys"
    for key, value in before.items():
        other = after[key]
        assert value.dtype == other.dtype and torch.equal(value, other.detach()), \
            f"fuse mutated the input model: {key}"


def as_inputs(x) -> tuple:
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def double_inputs(x) -> tuple:
    return tuple(t.double() if t.is_floating_point() else t for t in as_inputs(x))


def pattern_counts(fused) -> Counter:
    return fused.fusion_report.pattern_counts()


def reasons(fused) -> list[str]:
    return [item.reason for item in fused.fusion_report.skipped]


def assert_reason(fused, phrase: str) -> None:
    found = reasons(fused)
    assert any(phrase in reason for reason in found), \
        f"no skip reason mentions {phrase!r}; reasons: {found}\n{fused.fusion_report}"


def assert_ops(fused, expect: dict[str, int]) -> None:
    counts = reparam_fx.op_counts(fused)
    wrong = {op: (counts.get(op, 0), want) for op, want in expect.items()
             if counts.get(op, 0) != want}
    assert not wrong, (f"op counts (got, expected): {wrong}\n{fused.fusion_report}\n"
                       f"{fused.graph}")


def _fuse64(model: nn.Module, x, pass_inputs: bool, rtol: float, already_randomized: bool,
            check_macs: bool = True):
    if not already_randomized:
        randomized(model)
    model = model.eval()
    before = snapshot(model)
    model64 = copy.deepcopy(model).double()
    inputs64 = double_inputs(x)
    before64 = snapshot(model64)
    fused = reparam_fx.fuse(model64, inputs64 if pass_inputs else None)
    assert_state_unchanged(before64, model64)
    error = reparam_fx.verify(model64, fused, inputs64, rtol=rtol)
    assert error <= rtol
    if check_macs:  # convs, linears, matmuls and average pools (what a pool becomes)
        assert count_macs(fused, inputs64) <= count_macs(model64, inputs64), "fusion added MACs"
    assert_state_unchanged(before, model)
    return model64, fused


def fuse_exactly(model: nn.Module, x, *, ops: dict[str, int] | None = None,
                 patterns: dict[str, int] | None = None, pass_inputs: bool = False,
                 rtol: float = RTOL, already_randomized: bool = False, check_macs: bool = True):
    """Positive check: fused outputs equal (float64, ``rtol``), ``op_counts`` match
    ``ops`` on the keys given, ``pattern_counts()`` equals ``patterns`` exactly."""
    _, fused = _fuse64(model, x, pass_inputs, rtol, already_randomized, check_macs)
    if ops is not None:
        assert_ops(fused, ops)
    if patterns is not None:
        assert pattern_counts(fused) == Counter(patterns), fused.fusion_report.table()
    return fused


def fuse_refused(model: nn.Module, x, *, unchanged: tuple[str, ...], reason: str | None,
                 ops: dict[str, int] | None = None, pass_inputs: bool = False,
                 rtol: float = RTOL, already_randomized: bool = False):
    """Negative check: outputs still equal; the ``unchanged`` op categories have the same
    count as in the original graph; some skip reason contains ``reason`` (if given)."""
    model64, fused = _fuse64(model, x, pass_inputs, rtol, already_randomized)
    original = reparam_fx.op_counts(model64)
    assert_ops(fused, {op: original.get(op, 0) for op in unchanged})
    if ops is not None:
        assert_ops(fused, ops)
    if reason is not None:
        assert_reason(fused, reason)
    return fused


def fused_modules(fused, kind=nn.Conv2d) -> list[nn.Module]:
    return [m for m in fused.modules() if isinstance(m, kind)]
