"""Hypothesis strategies that draw the specs (see :mod:`reparam_fx.testing`)."""

from __future__ import annotations

import math
from dataclasses import replace
from fractions import Fraction

from reparam_fx.testing.blocks import BlockSpec, BranchSpec, PADDING_MODES
from reparam_fx.testing.graphs import GraphOp, GraphSpec, HeadSpec, LinearHeadSpec

try:
    from hypothesis import assume
    from hypothesis import strategies as st
except ImportError as error:  # pragma: no cover
    raise ImportError("reparam_fx.testing needs hypothesis: pip install 'reparam-fx[test]'") from error



# ---- strategies ------------------------------------------------------------------------

def _weighted(draw, choices):
    """Draw from ``[(weight, value), ...]``; shrinks towards the first entry."""
    total = sum(weight for weight, _ in choices)
    pick = draw(st.integers(0, total - 1))
    for weight, value in choices:
        if pick < weight:
            return value
        pick -= weight
    raise AssertionError("unreachable")


def _chance(draw, percent: int) -> bool:
    """True with probability ``percent``/100; shrinks towards False."""
    return draw(st.integers(0, 99)) >= 100 - percent


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _kernel_options(centre: Fraction, kernel_sizes, dilations, max_padding) -> list[tuple[int, int, int]]:
    """(kernel, dilation, padding) triples with centre offset ``centre``."""
    options = []
    for k in kernel_sizes:
        for d in (dilations if k > 1 else (1,)):
            p = centre + Fraction(d * (k - 1), 2)
            if p.denominator == 1 and 0 <= p <= max_padding:
                options.append((k, d, int(p)))
    return options


def _draw_kernel(draw, options, dilated_percent: int):
    plain = [o for o in options if o[1] == 1]
    dilated = [o for o in options if o[1] > 1]
    pool = dilated if dilated and (not plain or _chance(draw, dilated_percent)) else plain
    return draw(st.sampled_from(pool))


_DEFAULT_SIZES = {1: (4, 12), 2: (3, 8), 3: (2, 5)}


@st.composite
def block_specs(draw, dims=(2,), max_channels: int = 8, *, max_branches: int = 4,
                kernel_sizes=(1, 2, 3, 5), dilations=(1, 2, 3), strides=(1, 2),
                padding_modes=PADDING_MODES, nonlinearities=("relu",), max_padding: int = 4,
                sizes: dict | None = None):
    """Hypothesis strategy for :class:`BlockSpec`: RepVGG / MobileOne / ACNet / RepMixer /
    CPE-like sums, tuned so that roughly half merge and half do not (mixed groups, dilation
    mixes, reflect padding, nonlinear branches, stride-2 branches with different centres).

    ``sizes`` maps dims to an inclusive ``(low, high)`` range of example spatial sizes.
    """
    dim = draw(st.sampled_from(tuple(dims)))
    low, high = (sizes or {}).get(dim, _DEFAULT_SIZES[dim])
    stride = draw(st.sampled_from(tuple(strides))) if len(strides) > 1 and _chance(draw, 35) else min(strides)
    in_channels = draw(st.integers(1, max_channels))
    out_channels = in_channels if _chance(draw, 80) else draw(st.integers(1, max_channels))

    # Centre offsets: stride 1 forces one shared centre per dim (else output sizes differ);
    # with stride > 1 some branches may sit half a pixel off, for suitable input sizes.
    centres = tuple(Fraction(0) if not _chance(draw, 20) else
                    draw(st.sampled_from((Fraction(-1, 2), Fraction(1, 2), Fraction(1), Fraction(-1))))
                    for _ in range(dim))
    offsets = tuple(Fraction(0) for _ in range(dim))
    if stride > 1 and _chance(draw, 60):
        offsets = tuple(Fraction(1, 2) if _chance(draw, 70) else Fraction(0) for _ in range(dim))
    identity_ok = stride == 1 and in_channels == out_channels and not any(centres)

    n_branches = _weighted(draw, [(2, 2), (2, 3), (1, 1), (1, 4)])
    n_branches = min(n_branches, max_branches)
    kinds = [_weighted(draw, [(6, "conv"), (2, "identity"), (2, "bn")]) if identity_ok else "conv"
             for _ in range(n_branches)]
    if "conv" not in kinds:
        kinds[0] = "conv"

    common = math.gcd(in_channels, out_channels)
    group_choices = [(3, 1), (2, common)] + [(1, g) for g in _divisors(common)[1:-1]]
    isotropic = _chance(draw, 75)
    branches = []
    for kind in kinds:
        if kind == "identity":
            branches.append(BranchSpec.identity())
            continue
        if kind == "bn":
            branches.append(BranchSpec.batchnorm())
            continue
        shifted = any(offsets) and _chance(draw, 50)
        branch_centres = [c + (o if shifted else 0) for c, o in zip(centres, offsets)]
        per_dim_options = [_kernel_options(c, kernel_sizes, dilations, max_padding) for c in branch_centres]
        common_options = sorted(set.intersection(*(set(o) for o in per_dim_options)))
        if isotropic and common_options:
            choice = _draw_kernel(draw, common_options, 20)
            kernel_dims = [choice] * dim
        else:
            kernel_dims = [_draw_kernel(draw, options, 20) for options in per_dim_options]
        kernel = tuple(k for k, _, _ in kernel_dims)
        dilation = tuple(d for _, d, _ in kernel_dims)
        padding = tuple(p for _, _, p in kernel_dims)
        # dilated pointwise kernels: torch accepts them, the engine must treat them as 1x1
        if all(k == 1 for k in kernel) and len(dilations) > 1 and _chance(draw, 10):
            dilation = (max(dilations),) * dim
        mode = "zeros"
        if any(padding) and len(padding_modes) > 1 and _chance(draw, 10):
            mode = draw(st.sampled_from(tuple(m for m in padding_modes if m != "zeros")))
        elif not any(padding) and "zeros" not in padding_modes:
            mode = padding_modes[0]
        act = None
        if nonlinearities and _chance(draw, 10):
            act = draw(st.sampled_from(tuple(nonlinearities)))
        branches.append(BranchSpec.conv(kernel, padding=padding, dilation=dilation,
                                        groups=_weighted(draw, group_choices), bias=draw(st.booleans()),
                                        bn=_chance(draw, 70), act=act, padding_mode=mode))

    if n_branches > 1 and _chance(draw, 20):
        index = draw(st.integers(1, n_branches - 1))
        branches[index] = replace(branches[index], subtract=True)

    post_bn = _chance(draw, 25)
    layer_scale = _chance(draw, 30)
    residual = identity_ok and _chance(draw, 25)
    post_act = draw(st.sampled_from(tuple(nonlinearities))) if nonlinearities and _chance(draw, 15) else None

    partial = BlockSpec(dim, in_channels, out_channels, tuple(branches), stride=stride,
                        post_bn=post_bn, layer_scale=layer_scale, residual=residual, post_act=post_act)
    size = []
    for axis in range(dim):
        valid = [n for n in range(low, high + 1) if partial.valid_size(axis, n)]
        assume(valid)
        size.append(draw(st.sampled_from(valid)))
    return replace(partial, size=tuple(size))


@st.composite
def linear_head_specs(draw, max_features: int = 16, max_heads: int = 3):
    """Hypothesis strategy for :class:`LinearHeadSpec`: BN1d before / after Linear, sums
    of heads, the average of two heads (distillation)."""
    n_heads = _weighted(draw, [(2, 2), (2, 1), (1, 3)])
    n_heads = min(n_heads, max_heads)
    heads = tuple(HeadSpec(bn_before=draw(st.booleans()), bias=_chance(draw, 70), bn_after=_chance(draw, 40))
                  for _ in range(n_heads))
    combine = "mean" if n_heads > 1 and _chance(draw, 50) else "sum"
    return LinearHeadSpec(draw(st.integers(1, max_features)), draw(st.integers(1, max_features)),
                          heads, combine=combine, shared_bn=_chance(draw, 25))


@st.composite
def small_graphs(draw, dims=(2,), max_channels: int = 6, max_ops: int = 8, padding_modes=PADDING_MODES):
    """Hypothesis strategy for :class:`GraphSpec`: chains and sums of conv / BN / identity /
    relu / layer-scale nodes over a few tensors, with shared intermediates and two outputs."""
    dim = draw(st.sampled_from(tuple(dims)))
    channels = draw(st.integers(1, max_channels))
    size = tuple(draw(st.integers(5, 7 if dim < 3 else 5)) for _ in range(dim))
    kinds = [(6, "conv"), (4, "bn"), (3, "add"), (1, "sub"), (2, "relu"), (2, "scale"), (1, "identity")]
    ops = []
    for index in range(draw(st.integers(1, max_ops))):
        latest = index  # values 0..index exist
        kind = _weighted(draw, kinds)
        first = latest - draw(st.integers(0, latest))
        if kind in ("add", "sub"):
            second = latest - draw(st.integers(0, latest))
            if kind == "sub" and second == first:
                kind = "add"
            ops.append(GraphOp(kind, (first, second), functional=kind == "add" and _chance(draw, 25)))
        elif kind == "conv":
            kernel = draw(st.sampled_from((1, 3, 1, 3, 5)))
            dilation = 2 if kernel > 1 and _chance(draw, 20) else 1
            padding = dilation * (kernel - 1) // 2
            mode = "zeros"
            if padding and padding < min(size) and len(padding_modes) > 1 and _chance(draw, 15):
                mode = draw(st.sampled_from(tuple(m for m in padding_modes if m != "zeros")))
            groups = _weighted(draw, [(3, 1), (2, channels)] + [(1, g) for g in _divisors(channels)[1:-1]])
            functional = mode == "zeros" and _chance(draw, 20)
            ops.append(GraphOp("conv", (first,), kernel, dilation, groups, draw(st.booleans()), mode,
                               functional))
        else:
            ops.append(GraphOp(kind, (first,), functional=kind != "identity" and _chance(draw, 20)))
    outputs = (len(ops),)
    if len(ops) > 1 and _chance(draw, 30):
        outputs += (draw(st.integers(1, len(ops) - 1)),)
    return GraphSpec(dim, channels, tuple(ops), outputs, size)
