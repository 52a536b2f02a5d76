"""The int8 policy's algebra (``reparam_fx.core.quantization``), against torch itself.

Identity extraction is checked as real convs in float64 (dense, grouped, depthwise; 1-3
spatial dims; dilated), each refusal of :func:`holds_identity` by a case it refuses,
the choice of the scalar by its gains, and the scale solver by its contradictions.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from reparam_fx.core.quantization import (IdentityTaps, ScaleSolver, best_identity_scale,
                                          extract_identity, holds_identity, identity_index,
                                          identity_taps, modelled_gain_db, modelled_noise,
                                          range_gain_db)

D = torch.float64
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("dims,channels,groups,kernel,dilation", [
    (2, 6, 1, 3, 1), (2, 6, 3, 3, 1), (2, 6, 6, 3, 1), (2, 4, 1, 1, 1), (2, 4, 4, 5, 2),
    (1, 5, 1, 3, 1), (3, 4, 2, 3, 1), (2, 8, 8, 7, 1)])
def test_extraction_is_exact(dims, channels, groups, kernel, dilation):
    g = torch.Generator().manual_seed(dims * 100 + channels * 10 + groups)
    weight = torch.randn(channels, channels // groups, *[kernel] * dims, generator=g, dtype=D)
    bias = torch.randn(channels, generator=g, dtype=D)
    x = torch.randn(2, channels, *[7] * dims, generator=g, dtype=D)
    padding = dilation * (kernel - 1) // 2
    assert holds_identity(tuple(weight.shape), groups, [1] * dims, [padding] * dims,
                          [dilation] * dims) is None
    conv = CONV[dims]
    expected = conv(x, weight, bias, 1, padding, dilation, groups)
    for delta in (0.7, torch.randn(channels, generator=g, dtype=D)):
        rest = extract_identity(weight, groups, delta)
        scale = delta if isinstance(delta, float) else delta.view(-1, *[1] * dims)
        got = conv(x, rest, bias, 1, padding, dilation, groups) + scale * x
        assert _relative(got, expected) < 1e-13
        assert not torch.equal(rest, weight)  # (it did take something out)


@pytest.mark.parametrize("shape,groups,stride,padding,dilation,transposed,reason", [
    ((8, 4, 3, 3), 1, [1, 1], [1, 1], [1, 1], False, "output has 8 channels, its input 4"),
    ((4, 4, 3, 3), 1, [2, 2], [1, 1], [1, 1], False, "stride"),
    ((4, 4, 2, 2), 1, [1, 1], [1, 1], [1, 1], False, "even kernel"),
    ((4, 4, 3, 3), 1, [1, 1], [0, 0], [1, 1], False, "does not centre"),
    ((4, 4, 3, 3), 1, [1, 1], [1, 1], [2, 2], False, "does not centre"),
    ((4, 4, 3, 3), 1, [1, 1], "same", [1, 1], False, "does not centre"),
    ((4, 4, 3, 3), 1, [1, 1], [1, 1], [1, 1], True, "transposed"),
])
def test_holds_identity_refusals(shape, groups, stride, padding, dilation, transposed, reason):
    found = holds_identity(shape, groups, stride, padding, dilation, transposed)
    assert found is not None and reason in found


def test_taps_and_gains():
    weight = torch.zeros(3, 3, 3, 3, dtype=D)
    weight[:, :, 0, 0] = 0.1  # every row's largest other tap: 0.1
    weight[0, 0, 1, 1], weight[1, 1, 1, 1], weight[2, 2, 1, 1] = 2.0, 1.0, 0.05
    taps = identity_taps(weight, 1)
    assert taps.diagonal.tolist() == [2.0, 1.0, 0.05]
    assert taps.others.tolist() == pytest.approx([0.1, 0.1, 0.1])
    # taking 1.0 out: row 0 goes from 2.0 to 1.0 (6 dB), row 1 from 1.0 to 0.1 (20 dB),
    # row 2 widens from 0.1 to 0.95 (-19.6 dB)
    gains = range_gain_db(taps, 1.0)
    assert gains.tolist() == pytest.approx([20 * math.log10(2), 20.0,
                                            20 * math.log10(0.1 / 0.95)])
    delta, gain = best_identity_scale(taps)
    assert delta > 0 and gain == pytest.approx(float(range_gain_db(taps, delta).mean()))
    for other in torch.linspace(0.01, 3, 300).tolist():  # nothing on a grid does better
        assert float(range_gain_db(taps, other).mean()) <= gain + 1e-9


def test_no_scale_when_the_identity_taps_are_small():
    taps = IdentityTaps(torch.tensor([0.01, -0.02], dtype=D), torch.tensor([0.5, 0.4], dtype=D))
    assert best_identity_scale(taps) == (0.0, 0.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-5, 5), st.floats(0.01, 2)), min_size=1, max_size=12))
def test_best_scale_never_loses(rows):
    taps = IdentityTaps(torch.tensor([d for d, _ in rows], dtype=D),
                        torch.tensor([m for _, m in rows], dtype=D))
    delta, gain = best_identity_scale(taps)
    assert gain >= 0 and (delta > 0 or gain == 0)
    assert gain == pytest.approx(float(range_gain_db(taps, delta).mean()) if delta else 0.0)


# ---- the scale solver ------------------------------------------------------------------

def test_solver_moves_scales_along_a_chain():
    solver = ScaleSolver()
    solver.fix("input", "a graph input")
    solver.tie("relu1", "conv1")  # relu(conv1)
    solver.tie("relu2", "conv2")
    solver.fix("head", "a graph output")
    assert solver.relate("conv1", "input", math.log(2.0)) is None
    assert solver.relate("conv2", "relu1", math.log(3.0)) is None
    assert math.exp(solver.log_scale("relu1")) == pytest.approx(2.0)
    assert math.exp(solver.log_scale("relu2")) == pytest.approx(6.0)
    assert solver.log_scale("head") == 0.0 and solver.log_scale("input") == 0.0


def test_solver_refuses_a_residual_around_the_extraction():
    solver = ScaleSolver()
    solver.tie("sum", "relu")  # relu(conv(x)) + x: the sum ties the conv's output and x
    solver.tie("sum", "x")
    solver.tie("relu", "conv")
    reason = solver.relate("conv", "x", math.log(2.0))
    assert reason is not None and "residual" in reason
    assert solver.relate("conv", "x", 0.0) is None  # (a factor 1 contradicts nothing)


def test_solver_refuses_when_both_ends_are_fixed():
    solver = ScaleSolver()
    solver.fix("x", "x is a graph input")
    solver.fix("y", "it reaches silu")
    reason = solver.relate("y", "x", math.log(2.0))
    assert "x is a graph input" in reason and "silu" in reason
    assert solver.log_scale("y") == 0.0  # a refused relation changes nothing


def test_solver_keeps_the_fixed_scale_when_joining():
    solver = ScaleSolver()
    solver.tie("a", "b")
    solver.fix("b", "fixed")
    assert solver.relate("c", "a", math.log(5.0)) is None
    solver.tie("c", "d")
    assert math.exp(solver.log_scale("d")) == pytest.approx(5.0)
    assert solver.log_scale("a") == 0.0


# ---- the data-free error model -----------------------------------------------------------

def _weight_with_identity(identity: float, seed: int = 0, channels: int = 32, spread=1.0):
    """Random taps ~0.05 and identity taps ``identity * U(1, 1 + spread)``."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, channels, 3, 3, generator=g, dtype=D) * 0.05
    weight[identity_index(weight, 1)] += identity * (1 + spread * torch.rand(
        channels, generator=g, dtype=D))
    return weight


@pytest.mark.parametrize("identity,spread,winner", [(1.0, 1.0, "scalar"), (0.2, 20.0, "channel")])
def test_modelled_gain_of_a_dominant_identity(identity, spread, winner):
    """Identity taps far above the other taps: keeping them apart wins. Alike across
    channels, one scalar takes nearly all of them out and costs no multiply's rounding;
    spread over 20x, the scalar leaves most of them in the rows and "channel" wins."""
    weight = _weight_with_identity(identity, spread=spread)
    taps = identity_taps(weight, 1)
    delta, _ = best_identity_scale(taps)
    gains = {"scalar": modelled_gain_db(weight, 1, delta),
             "channel": modelled_gain_db(weight, 1, taps.diagonal)}
    assert min(gains.values()) > 3 and max(gains, key=gains.get) == winner, gains


def test_modelled_gain_without_an_identity_is_a_loss():
    """No identity in the taps: keeping "it" apart only adds a quantized output."""
    weight = _weight_with_identity(0.0)
    taps = identity_taps(weight, 1)
    assert modelled_gain_db(weight, 1, taps.diagonal) < 0
    assert modelled_gain_db(weight, 1, 0.01) < 0


def test_modelled_noise_grows_with_the_outlier():
    noises = [modelled_noise(_weight_with_identity(identity), 1) for identity in (0.5, 1, 2, 4)]
    assert noises == sorted(noises) and noises[-1] > 10 * noises[0]
