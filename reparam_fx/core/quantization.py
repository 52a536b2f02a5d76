"""The algebra of the int8 policy: identity taps out of convs, scales moved between layers.

Why fusion costs int8 accuracy
    A merged RepVGG-style conv computes ``W = K + D`` where ``K`` holds the conv
    branches and ``D`` the identity branch: ``D[o, o, centre] = d_o`` (BatchNorm's
    ``gamma / sqrt(var + eps)``, often several times the conv taps). Per-channel
    symmetric int8 gives output channel ``o`` the step ``max|W[o]| / 127``: one large
    centre tap sets the step for every small tap of its row, which then round to a few
    levels. The training form never has that row: each branch is quantized apart.

Identity extraction (exact for every input size)
    A conv whose input and output have the same channels (``C_in == C_out``), stride 1,
    and "same" zero padding (``padding == dilation * (k - 1) / 2`` on every spatial
    axis) holds the identity map as a conv: ``I[o, o mod (C/groups), centre] = 1``. So
    for every ``delta``::

        conv(x; W, b) == conv(x; W - delta * I, b) + delta * x

    The first term's row ``o`` then has the range ``max(|d_o - delta|, m_o)`` instead
    of ``max(|d_o|, m_o)``, where ``d_o`` is the row's identity tap and ``m_o`` the
    largest of its other taps. :func:`best_identity_scale` picks the one ``delta`` for
    the whole conv that maximises the mean per-row gain in dB, ``20 log10`` of the
    ratio of the two ranges (rounding noise power scales with the range squared).
    ``delta`` may also be the vector of identity taps ``d`` itself ("channel": the
    whole identity kept apart as ``x * d``, a multiply the next layers cannot absorb).

Whether it pays (data-free)
    Narrower rows are not the whole story: the kept-apart form quantizes the conv's
    own output before the add, and "channel" quantizes ``x * d`` per tensor (channels
    with small ``d_o`` then round coarsely). :func:`modelled_noise` adds these up for
    unit-variance inputs; :func:`modelled_gain_db` compares the forms. It ranks the
    forms as int8 runs do on the models measured in ``docs/int8.md``; calibration data
    replaces it with a measurement.

Scales moved between layers (exact)
    ``delta`` is one positive number, not a per-channel vector, so the extracted form
    needs no multiply::

        conv(x; W - delta I, b) + delta x == delta * (conv(x; (W - delta I)/delta, b/delta) + x)

    and the outer ``delta`` travels with the value: a positive scalar passes through
    every positively homogeneous op (``relu(s z) = s relu(z)`` for ``s > 0``; max and
    average pooling, zero padding, reshapes, sums of values carrying the same scale)
    and is absorbed by the next conv or linear (``conv(s z; V, c) == conv(z; s V, c)``,
    exact with zero padding too). A value stored as ``x / s_x`` feeding a conv whose
    output is stored as ``y / s_y`` needs that conv's ``V`` scaled by ``s_x / s_y`` and
    its bias by ``1 / s_y``. It never passes through ReLU6, SiLU, GELU, hardswish, a
    sigmoid, a constant added, a graph output or an op this module does not know: those
    values keep scale 1.

    :class:`ScaleSolver` holds the constraints as a weighted union-find over values
    (``log s``): homogeneous ops tie values (equal scales), an extraction relates its
    output to its input (``log s_y = log s_x + log delta``), and a fixed value has
    ``log s = 0``. An extraction that contradicts the others (its output comes back to
    its input's scale through a residual add, or both ends are fixed) is refused.

Per-tensor activation quantization is blind to a scalar scale (its step scales with
it), and per-channel weight quantization of a row is blind to a scalar on the row; so
moving a scalar changes nothing in int8 but where the identity lives. (A per-channel
scale moved the same way would spread channels' activation ranges apart, which costs
what the extraction gains; measured in ``docs/int8.md``.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class IdentityTaps:
    """A square conv weight's identity taps ``d`` (one per output channel) and the
    largest magnitude ``m`` of each row's other taps."""

    diagonal: torch.Tensor  # (C,)
    others: torch.Tensor  # (C,)


def identity_index(weight: torch.Tensor, groups: int) -> tuple:
    """The index of the identity taps ``I[o, o mod (C/groups), centre]`` in ``weight``
    (``(C, C/groups, k...)`` with odd ``k``)."""
    out_channels, per_group = weight.shape[:2]
    rows = torch.arange(out_channels)
    centre = tuple(k // 2 for k in weight.shape[2:])
    return (rows, rows % per_group, *centre)


def identity_taps(weight: torch.Tensor, groups: int) -> IdentityTaps:
    index = identity_index(weight, groups)
    diagonal = weight[index].detach().double()
    rest = weight.detach().double().clone()
    rest[index] = 0
    return IdentityTaps(diagonal, rest.flatten(1).abs().amax(1))


def holds_identity(weight_shape, groups: int, stride, padding, dilation,
                   transposed: bool = False) -> str | None:
    """``None`` when the conv can hold the identity map exactly (square, stride 1, odd
    kernel, "same" zero padding), else why not."""
    out_channels, per_group, *kernel = weight_shape
    if transposed:
        return "a transposed conv"
    if out_channels != per_group * groups:
        return f"its output has {out_channels} channels, its input {per_group * groups}"
    if any(s != 1 for s in stride):
        return f"stride {tuple(stride)}"
    if any(k % 2 == 0 for k in kernel):
        return f"an even kernel {tuple(kernel)}"
    if isinstance(padding, str) or list(padding) != [d * (k - 1) // 2
                                                     for k, d in zip(kernel, dilation)]:
        return f"padding {padding} does not centre the kernel"
    return None


def range_gain_db(taps: IdentityTaps, delta: float) -> torch.Tensor:
    """Per output channel, how much extracting ``delta`` narrows the row's weight range,
    in dB (``20 log10(old / new)``; negative where it widens)."""
    tiny = torch.finfo(torch.float64).tiny
    old = torch.maximum(taps.diagonal.abs(), taps.others).clamp_min(tiny)
    new = torch.maximum((taps.diagonal - delta).abs(), taps.others).clamp_min(tiny)
    return 20 * torch.log10(old / new)


def best_identity_scale(taps: IdentityTaps) -> tuple[float, float]:
    """The positive ``delta`` with the largest mean :func:`range_gain_db`, and that mean.
    Returns ``(0.0, 0.0)`` when no positive ``delta`` gains. The mean gain is piecewise
    monotone in ``delta`` between the points ``d_o`` and ``d_o +- m_o``: those are the
    candidates."""
    d, m = taps.diagonal, taps.others
    candidates = torch.cat([d, d - m, d + m]).unique()
    candidates = candidates[candidates > 0]
    best, best_gain = 0.0, 0.0
    for delta in candidates.tolist():
        gain = float(range_gain_db(taps, delta).mean())
        if gain > best_gain + 1e-12:
            best, best_gain = delta, gain
    return best, best_gain


ACTIVATION_RANGE = 4.0  # an activation's int8 range, in standard deviations each side


def modelled_noise(weight: torch.Tensor, groups: int, delta=None) -> float:
    """The int8 error power of a conv's output in a data-free model, relative units.

    Inputs: unit variance, independent, range +-``ACTIVATION_RANGE`` (per tensor);
    weights: per output channel symmetric (row range / 127); rounding noise ``step^2 / 12``.
    Counted: the input's and the output's quantization (every form has them), the rounded
    weights, and for a kept-apart identity (``delta`` a float: "scalar"; a tensor of the
    identity taps: "channel") the conv's own output quantized before the add and, for
    "channel", the product ``x * d`` quantized too. ``delta=None``: the merged conv."""
    w = weight.detach().double().flatten(1)
    channels, taps = w.shape
    step = 2 * ACTIVATION_RANGE / 255  # of a unit-variance activation

    def requantized(rows: torch.Tensor) -> torch.Tensor:  # an output of these rows, per tensor
        return channels * (rows.pow(2).sum(1).sqrt().max() * step) ** 2 / 12

    def rounded(rows: torch.Tensor) -> torch.Tensor:  # per-row weight rounding
        return (taps * (rows.abs().amax(1) / 127) ** 2 / 12).sum()

    noise = requantized(w) + w.pow(2).sum() * step ** 2 / 12  # output and input
    if delta is None:
        return float(noise + rounded(w))
    apart = extract_identity(weight.detach().double(), groups, delta).flatten(1)
    noise = noise + rounded(apart) + requantized(apart)
    if isinstance(delta, torch.Tensor):
        noise = noise + channels * (delta.abs().max() * step) ** 2 / 12
    return float(noise)


def modelled_gain_db(weight: torch.Tensor, groups: int, delta) -> float:
    """``10 log10`` of :func:`modelled_noise` merged over kept apart (positive: apart wins)."""
    return 10 * math.log10(modelled_noise(weight, groups) / modelled_noise(weight, groups, delta))


def extract_identity(weight: torch.Tensor, groups: int, delta: float) -> torch.Tensor:
    """``weight - delta * I`` (a new tensor, same dtype)."""
    result = weight.detach().clone()
    result[identity_index(weight, groups)] -= delta
    return result


class ScaleSolver:
    """Positive scalar scales of graph values, as a weighted union-find on ``log s``.

    ``tie(a, b)``: equal scales. ``fix(a, why)``: scale 1. ``relate(y, x, log_delta)``:
    ``log s_y = log s_x + log_delta``, refused (the reason is returned) when it
    contradicts what is known. Make every ``tie`` and ``fix`` first: they never
    contradict each other. ``log_scale(a)`` at the end: a component nothing fixed takes
    scale 1 at its root."""

    def __init__(self):
        self._parent: dict = {}
        self._offset: dict = {}  # log s(value) - log s(parent)
        self._root_scale: dict = {}  # root -> its log scale, where something fixed it
        self._why: dict = {}  # root -> why its component keeps a fixed scale

    def _find(self, value) -> tuple[object, float]:
        if value not in self._parent:
            self._parent[value], self._offset[value] = value, 0.0
        path = []
        while self._parent[value] is not value:
            path.append(value)
            value = self._parent[value]
        root, total = value, 0.0
        for item in reversed(path):  # compress: each offset straight to the root
            total += self._offset[item]
            self._offset[item], self._parent[item] = total, root
        return root, (self._offset[path[0]] if path else 0.0)

    def _union(self, a, b, log_ratio: float) -> str | None:
        """Make ``log s_a - log s_b == log_ratio``; ``None`` or why that contradicts."""
        root_a, off_a = self._find(a)
        root_b, off_b = self._find(b)
        if root_a is root_b:
            if math.isclose(off_a - off_b, log_ratio, abs_tol=1e-9):
                return None
            return "its output comes back to its input's scale (a residual around it)"
        scale_a, scale_b = self._root_scale.get(root_a), self._root_scale.get(root_b)
        if scale_a is not None and scale_b is not None:
            if math.isclose(scale_a + off_a - scale_b - off_b, log_ratio, abs_tol=1e-9):
                return None  # (both fixed and consistent: nothing to join)
            return f"its input and its output both keep scale 1 ({self._why[root_b]}; " \
                   f"{self._why[root_a]})"
        # hang b's tree under a's root: log s(root_b) - log s(root_a) = off_a - log_ratio - off_b
        self._parent[root_b], self._offset[root_b] = root_a, off_a - log_ratio - off_b
        if scale_b is not None:
            self._root_scale[root_a] = scale_b - self._offset[root_b]
            self._why[root_a] = self._why[root_b]
        return None

    def tie(self, a, b) -> None:
        reason = self._union(a, b, 0.0)
        assert reason is None, reason  # (equalities alone never contradict)

    def fix(self, value, why: str) -> None:
        root, offset = self._find(value)
        if root not in self._root_scale:
            self._root_scale[root], self._why[root] = -offset, why

    def relate(self, output, input_, log_delta: float) -> str | None:
        """``log s_output = log s_input + log_delta``; ``None``, or why it cannot hold."""
        return self._union(output, input_, log_delta)

    def why_fixed(self, value) -> str | None:
        root, _ = self._find(value)
        return self._why.get(root)

    def log_scale(self, value) -> float:
        root, offset = self._find(value)
        return self._root_scale.get(root, 0.0) + offset
