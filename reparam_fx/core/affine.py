"""Exact affine algebra of conv-shaped maps. Pure tensor math: no graph code here.

The rules (``compose``, ``merge`` and their exactness and MAC checks) are here; the term
types and constructors are in :mod:`reparam_fx.core.terms`, re-exported here, so that a
frontend needs ``affine.<name>`` only.

Every op the passes remove is an affine, translation-equivariant map of one tensor, and
is one of two kinds of *term*:

``ChannelAffine(scale, shift, padding)``
    ``y = zero_pad(scale * x + shift)`` per channel: eval BatchNorm, identity, layer
    scale, constant mul/div/add/sub, explicit zero padding. ``scale``/``shift`` are
    float64 scalars or ``(C,)`` vectors, so their channel count can stay unknown until
    the term meets a conv.

``ConvTerm(weight, bias, stride, padding, dilation, groups)``
    ``y = conv(x, W, b)`` with zero padding, in 0 (linear), 1, 2 or 3 spatial dims.
    ``macs`` is the cost, per output position, of the *original* ops the term stands
    for: a rewrite is allowed only if the single conv it emits costs no more.

The rules (all exact; each raises :class:`NotExact` with a reason when it is not):

BatchNorm as a channel affine::

    s = gamma / sqrt(var + eps)            t = beta - mean * s
    BN(x) = s * x + t

Channel affine after a conv (``compose(conv, affine)``)::

    W'[o] = W[o] * s[o]                    b' = s[o] * b[o] + t[o]

Channel affine before a conv (``compose(affine, conv)``), with ``in(o, j)`` the input
channel that weight column ``j`` of output ``o`` reads under grouping::

    W'[o, j] = W[o, j] * s[in(o, j)]       b'[o] = b[o] + sum_{j,k} W[o, j, k] * t[in(o, j)]

exact only if ``t == 0`` or the conv has no padding (a zero-padded border would see
``t`` where the original sees 0).

Crops (``x[..., c:-c]``) are zero padding by ``-c``: a crop before a conv that does not pad
that dim, or after any conv (padding ``p - c * stride``), gives a conv with padding
``p - c``, which may be negative until the term is summed with a branch that pads (ACNet's
cropped side branches); a term with negative padding is never written as a conv.

Pointwise conv after a kxk conv (``compose(kxk, 1x1)``), per group::

    W'[o, i, k] = sum_c W2[o, c] W1[c, i, k]        b' = W2 b1 + b2
    stride s1*s2, padding p1, dilation d1 (always exact).

Pointwise conv (stride 1, zero padding p1) before a kxk conv::

    W'[o, i, k] = sum_c W2[o, c, k] W1[c, i]        b'[o] = b2[o] + sum_{c,k} W2[o, c, k] b1[c]
    stride s2, dilation d2, padding p1 + p2; exact iff b1 == 0 or p2 == 0.

Transposed conv (``TransposedConvTerm``, weight ``(in, out/groups, *k)``) composes with a
channel affine after it (``W'[i, j] = W[i, j] * s[o(i, j)]``, ``b' = s * b + t``) and with a
per-channel scale before it (``W'[i] = W[i] * s[i]``). A shift before it is not exact (output
positions are reached by different numbers of taps), nor is a sum with other branches.

Sum of terms over the same input (``merge``): terms must share stride and the *centre
offset* ``padding - dilation*(kernel-1)/2`` per dim (so their outputs have the same
size and alignment for every input size). With ``D`` the gcd of the dilations of
kernels wider than 1 and ``P`` the largest padding, each kernel is zero-embedded on the
common tap lattice of size ``K = 2*(P - c)/D + 1``; groups become the gcd of the
terms' groups (an identity is a grouped dirac kernel); weights and biases add.

Asymmetric windows (``asymmetric_conv``): a conv padded ``(before, after)`` with
``before != after`` (an even kernel with ``padding='same'``, a zero pad with unequal sides
right before a conv) is the symmetric conv with padding ``P = max(before, after)`` whose
kernel has ``(P - before) / d`` zero taps in front and ``(P - after) / d`` behind: every
output reads the same inputs with the same weights, for every size. The zero taps
(``zero_taps``) survive scaling, regrouping, composition with a 1x1 and merging (a merged
kernel keeps the taps no branch reaches), and are trimmed when the conv is written, which
the MAC gates count (``written_kernel``).

Everything is computed in float64; :meth:`ConvTerm.weights_as` casts back.

Weights are recipes (:class:`Weight`): a term's weight is known by its shape at once and
computed only when the term is written. A walk over a graph composes a term for every op
it passes, but writes only the largest regions; so no candidate's weight is ever held,
the model's tensors are read (not copied) until a region is written, and each written
weight is computed once, one region at a time. Biases, scales and shifts (one number per
channel) are computed at once: the exactness checks read them.
"""

from __future__ import annotations

import math
from functools import reduce

import torch

from reparam_fx.core.terms import (
    DOUBLE, IDENTITY, all_close, as_pointwise, asymmetric_conv, avg_pool, batchnorm,
    channel_affine, channel_vector, ChannelAffine, conv, conv_transpose, ConvTerm, identity,
    is_pointwise, is_zero, keeps_shape, linear, NotExact, pointwise_fits, regroup,
    repeat_channels, Term, TransposedConvTerm, Weight, with_fields, zero_pad)

__all__ = [  # the terms (reparam_fx.core.terms) and the rules
    "ChannelAffine", "ConvTerm", "DOUBLE", "IDENTITY", "NotExact", "Term",
    "TransposedConvTerm", "Weight", "adds_macs", "all_close", "as_pointwise",
    "asymmetric_conv", "avg_pool", "batchnorm", "channel_affine", "channel_vector", "compose",
    "conv", "conv_transpose", "identity", "is_pointwise", "is_zero", "keeps_shape", "linear",
    "merge", "pointwise_fits", "regroup", "repeat_channels", "with_fields", "zero_pad"]


# ---- composition: second(first(x)) ---------------------------------------------------

def compose(first: Term, second: Term) -> Term:
    """The single term equal to ``second(first(x))``, or :class:`NotExact`."""
    if first is IDENTITY:
        return second
    if second is IDENTITY:
        return first
    if isinstance(first, TransposedConvTerm) or isinstance(second, TransposedConvTerm):
        return _compose_transposed(first, second)
    if isinstance(first, ChannelAffine) and isinstance(second, ChannelAffine):
        return _affine_then_affine(first, second)
    if isinstance(first, ConvTerm) and isinstance(second, ChannelAffine):
        return _conv_then_affine(first, second)
    if isinstance(first, ChannelAffine):
        return _affine_then_conv(first, second)
    return _conv_then_conv(first, second)


def _affine_then_affine(first: ChannelAffine, second: ChannelAffine) -> ChannelAffine:
    """``s2 * pad_b(s1 x + t1) + t2 == pad_{s2 b + t2}(s2 s1 x + s2 t1 + t2)``."""
    scale = first.scale * second.scale
    shift = None if first.shift is None else first.shift * second.scale
    if second.shift is not None:
        shift = second.shift if shift is None else shift + second.shift
    border, rtol = second.border, max(first.border_rtol, second.border_rtol)
    if any(p > 0 for p in first.padding):
        border = second.scale * (0.0 if first.border is None else first.border)
        if second.shift is not None:
            border = border + second.shift
        if any(p > 0 for p in second.padding) and not all_close(border, second.border, rtol):
            raise NotExact("two paddings with different values")
    return ChannelAffine(scale, shift, _pad_then_pad(first.padding, second.padding),
                         None if is_zero(border) else border, rtol)


def _pad_then_pad(first: tuple[int, ...], second: tuple[int, ...]) -> tuple[int, ...]:
    """Zero padding (> 0) or cropping (< 0) per trailing dim, one after the other: pads
    and crops add up, except a pad after a crop (the crop's border is gone)."""
    if not first or not second:
        return first or second
    size = max(len(first), len(second))
    first, second = (0,) * (size - len(first)) + first, (0,) * (size - len(second)) + second
    if any(a < 0 < b for a, b in zip(first, second)):
        raise NotExact("zero padding after a crop is not a crop")
    return tuple(a + b for a, b in zip(first, second))


def _conv_then_affine(first: ConvTerm, second: ChannelAffine) -> ConvTerm:
    if any(p > 0 for p in second.padding):
        return _pointwise_then_padding(first, second)
    if second.padding:  # a crop by c of the output: the conv with padding p - c*stride
        if len(second.padding) > first.spatial:
            raise NotExact("a crop of more dims than the conv has")
        crop = (0,) * (first.spatial - len(second.padding)) + second.padding
        first = with_fields(first, padding=tuple(p + c * s for p, c, s in
                                           zip(first.padding, crop, first.stride)))
        second = with_fields(second, padding=())
    out = first.out_channels
    scale = channel_vector(second.scale, out, "a per-channel scale")
    weight = first.weight.scaled(scale.reshape(out, *(1,) * (first.spatial + 1)))
    bias = None if first.bias is None else first.bias * scale
    if second.shift is not None:
        shift = channel_vector(second.shift, out, "a per-channel shift")
        bias = shift.clone() if bias is None else bias + shift
    return with_fields(first, weight=weight, bias=bias)


def _pointwise_then_padding(first: ConvTerm, second: ChannelAffine) -> ConvTerm:
    """Padding after a 1x1 conv: ``pad_v(s * conv1x1(x, W, b) + t)`` is the conv of the
    zero-padded ``x`` when the pad value ``v`` is what the conv gives for a zero input,
    ``s * b + t`` (DiverseBranchBlock pads with the BatchNorm's output for zero)."""
    if not first.is_pointwise or any(s != 1 for s in first.stride) or \
            len(second.padding) > first.spatial or any(p < 0 for p in second.padding) or \
            (first.padding_mode != "zeros" and any(first.padding)):
        raise NotExact("zero padding after a conv is not a conv padding")
    unpadded = _conv_then_affine(first, with_fields(second, padding=(), border=None))
    if not all_close(second.border, unpadded.bias, second.border_rtol):
        raise NotExact("padding after a 1x1 conv with values other than its output for a "
                       "zero input is not a conv padding")
    pads = (0,) * (first.spatial - len(second.padding)) + second.padding
    return with_fields(unpadded, padding=tuple(p + q for p, q in zip(first.padding, pads)),
                 padded_grid=True)


def _input_channel_index(term: ConvTerm) -> torch.Tensor:
    """``in(o, j)``: the input channel read by weight column ``j`` of output ``o``."""
    out, cin_g = term.out_channels, term.weight.shape[1]
    group_of_output = torch.arange(out) // (out // term.groups)
    return group_of_output[:, None] * cin_g + torch.arange(cin_g)[None, :]


def _affine_then_conv(first: ChannelAffine, second: ConvTerm) -> ConvTerm:
    spatial = second.spatial
    if second.padding_mode != "zeros" and any(second.padding):
        raise NotExact(f"nothing folds into a conv with padding_mode={second.padding_mode!r}")
    if first.padding:
        # conv(zero_pad(s*x + t, p1), padding p2) == conv(s*x + t, padding p1 + p2); a crop
        # (p1 < 0) folds the same way into a conv that does not pad that dim
        if len(first.padding) > spatial:
            raise NotExact(f"zero padding over {len(first.padding)} dims before a "
                           f"{spatial}-d conv")
        pads = (0,) * (spatial - len(first.padding)) + first.padding
        if any(p1 < 0 and p2 for p1, p2 in zip(pads, second.padding)):
            raise NotExact("a crop before a zero-padded conv: its border would see the "
                           "cropped-away values")
        padded = with_fields(second, padding=tuple(a + b for a, b in zip(pads, second.padding)))
        if first.border is None or not any(p > 0 for p in pads):
            return _affine_then_conv(with_fields(first, padding=(), border=None), padded)
        # pad_b(s x + t) with b == t is s * pad_0(x) + t: the shift reaches the padded
        # positions too, so it folds into the bias if the conv adds no zeros of its own
        if not all_close(first.border, first.shift, first.border_rtol):
            raise NotExact("a border value other than the shift before a conv")
        if any(p > 0 for p in second.padding) and not is_zero(first.shift):
            raise NotExact("a per-channel shift (e.g. BatchNorm) before a zero-padded conv "
                           "changes the border")
        return _fold_affine_into_conv(first, padded)
    if any(p > 0 for p in second.padding) and not is_zero(first.shift):
        raise NotExact("a per-channel shift (e.g. BatchNorm) before a zero-padded conv "
                       "changes the border")
    return _fold_affine_into_conv(first, second)


def _fold_affine_into_conv(first: ChannelAffine, second: ConvTerm) -> ConvTerm:
    spatial = second.spatial
    cin = second.in_channels
    index = _input_channel_index(second)
    view = (*index.shape, *(1,) * spatial)
    scale = channel_vector(first.scale, cin, "a per-channel scale")
    weight = second.weight.scaled(scale[index].reshape(view))
    bias = second.bias
    if first.shift is not None:  # the bias needs the weight's values now
        shift = channel_vector(first.shift, cin, "a per-channel shift")
        extra = second.weight.value().mul_(shift[index].reshape(view)).flatten(1).sum(1)
        bias = extra if bias is None else bias + extra
    return with_fields(second, weight=weight, bias=bias)


def _compose_transposed(first: Term, second: Term) -> TransposedConvTerm:
    """A transposed conv with a channel affine after it, or a channel scale before it."""
    if isinstance(first, TransposedConvTerm) and isinstance(second, ChannelAffine):
        if second.padding:
            raise NotExact("zero padding after a conv is not a conv padding")
        out, cin_g = first.out_channels, first.in_channels // first.groups
        scale = channel_vector(second.scale, out, "a per-channel scale")
        # weight row i (input channel) of group g feeds outputs g*out_g ... (g+1)*out_g - 1
        per_row = scale.reshape(first.groups, 1, out // first.groups).expand(
            first.groups, cin_g, out // first.groups).reshape(first.in_channels, -1)
        weight = first.weight.scaled(per_row.reshape(*per_row.shape, *(1,) * first.spatial))
        bias = None if first.bias is None else first.bias * scale
        if second.shift is not None:
            shift = channel_vector(second.shift, out, "a per-channel shift")
            bias = shift.clone() if bias is None else bias + shift
        return with_fields(first, weight=weight, bias=bias)
    if isinstance(first, ChannelAffine) and isinstance(second, TransposedConvTerm):
        if first.padding:
            raise NotExact("zero padding before a transposed conv is not one of its paddings")
        if not is_zero(first.shift):
            raise NotExact("a per-channel shift (e.g. BatchNorm) before a transposed conv: "
                           "output positions are reached by different numbers of taps")
        scale = channel_vector(first.scale, second.in_channels, "a per-channel scale")
        weight = second.weight.scaled(scale.reshape(-1, *(1,) * (second.spatial + 1)))
        return with_fields(second, weight=weight)
    raise NotExact("a transposed conv composes only with per-channel affines")


def _grouped_product(second_w: torch.Tensor, first_w: torch.Tensor, groups: int,
                     equation: str) -> torch.Tensor:
    """Per-group einsum of two weights already written with ``groups`` groups."""
    a = second_w.reshape(groups, second_w.shape[0] // groups, *second_w.shape[1:])
    b = first_w.reshape(groups, first_w.shape[0] // groups, *first_w.shape[1:])
    product = torch.einsum(equation, a, b)
    return product.reshape(product.shape[0] * product.shape[1], *product.shape[2:])


COMPOSE_HEADROOM = 16  # a composition may cost more than its parts while a sum may pay it back


def _check_macs(cost: int, original_macs: float, what: str, headroom: float = 1.0) -> None:
    """Refuse before any weight is computed: the gate needs only the result's shape.

    Sums are gated exactly (``headroom`` 1). A composition (1x1 then kxk) may cost up to
    ``COMPOSE_HEADROOM`` times its parts: summed with other branches of the same size
    (DiverseBranchBlock's 1x1 -> kxk and 1x1 -> avg-pool branches) it costs nothing extra,
    and a region whose term still costs more than the ops it replaces is never written
    (:func:`adds_macs`)."""
    if cost > original_macs * headroom + 1e-9:
        raise NotExact(f"{what} would increase MACs ({cost:,} > {original_macs:,.0f} "
                       "per output position)")


def adds_macs(term: Term) -> bool:
    """Whether one conv for ``term`` would cost more than the ops it stands for: more per
    output position, or on positions the original did not compute (``padded_grid``: a
    conv after it, or a sum, takes the padding back into a grid it computes anyway)."""
    if not isinstance(term, (ConvTerm, TransposedConvTerm)):
        return False
    cost = term.written_macs if isinstance(term, ConvTerm) else term.weight.numel()
    return cost > term.macs + 1e-9 or getattr(term, "padded_grid", False)


def _fewest_positions_per_output(stride: int, extent: int, fewest: int) -> float:
    """Along one axis, the fewest positions a first op computes per output position of the
    conv after it, over every input size: the composed conv must cost no more than the two
    ops at *any* size, so its cost is compared with the original ops' at the size where the
    first one is cheapest relative to the output.

    With ``n`` outputs the second conv (stride ``s``, window ``extent = d(k-1)+1-2p``)
    needs at least ``s(n-1) + extent`` positions of the first op's output, and the first
    op computes at least ``fewest`` (its own padding). The ratio tends to ``s`` as ``n``
    grows; below that it is smallest at some small ``n``."""
    stride_fixed = max(1, math.ceil((fewest - extent + stride) / stride)) + 1
    ratios = [max(stride * (n - 1) + extent, fewest) / n for n in range(1, stride_fixed + 1)]
    return min(ratios + [float(stride)])


def _conv_then_conv(first: ConvTerm, second: ConvTerm) -> ConvTerm:
    if first.spatial != second.spatial:
        raise NotExact("convs of different dimensionality")
    if first.out_channels != second.in_channels:
        raise NotExact("channel counts do not chain")
    if second.is_pointwise and not any(second.padding):
        return _conv_then_pointwise(first, second)
    if first.is_pointwise and all(s == 1 for s in first.stride):
        return _pointwise_then_conv(first, second)
    raise NotExact("two consecutive convs compose only when one of them is 1x1")


def _conv_then_pointwise(first: ConvTerm, second: ConvTerm) -> ConvTerm:
    groups = math.gcd(first.groups, second.groups)
    # the 1x1 after it reads every s-th position of the first conv's output: at least one
    # of them per output position, and at the smallest sizes exactly one
    original = first.macs + second.macs
    _check_macs(second.out_channels * (first.in_channels // groups) * math.prod(first.written_kernel),
                original, "composing a conv with the 1x1 conv after it", COMPOSE_HEADROOM)
    a, b = regroup(second, groups), regroup(first, groups)
    shape = (second.out_channels, b.weight.shape[1], *first.kernel)
    weight = Weight(shape, lambda: _grouped_product(a.weight.value().flatten(1), b.weight.value(),
                                                    groups, "goc,gc...->go..."))
    bias = second.bias
    if first.bias is not None:
        w2 = a.weight.value().flatten(1)  # (out, c) per group
        carried = _grouped_product(w2, first.bias.reshape(-1, 1), groups, "goc,gcz->goz")[:, 0]
        bias = carried if bias is None else bias + carried
    return ConvTerm(weight, bias, tuple(s1 * s2 for s1, s2 in zip(first.stride, second.stride)),
                    first.padding, first.dilation, groups, macs=original,
                    padding_mode=first.padding_mode, padded_grid=first.padded_grid,
                    zero_taps=first.zero_taps)  # (a zero tap of W1 is one of W2 W1)


def _pointwise_then_conv(first: ConvTerm, second: ConvTerm) -> ConvTerm:
    for term in (first, second):
        if term.padding_mode != "zeros" and any(term.padding):
            raise NotExact(f"a conv with padding_mode={term.padding_mode!r} does not compose "
                           "with the conv after it")
    if any(second.padding) and not is_zero(first.bias):
        raise NotExact("a 1x1 conv with bias before a zero-padded conv: the border would "
                       "see the bias")
    if any(p1 < 0 and p2 for p1, p2 in zip(first.padding, second.padding)):
        raise NotExact("a crop before a zero-padded conv: its border would see the "
                       "cropped-away values")
    groups = math.gcd(first.groups, second.groups)
    original = first.macs * math.prod(
        _fewest_positions_per_output(s, d * (k - 1) + 1 - 2 * p2, 1 + 2 * p1)
        for s, d, k, p2, p1 in zip(second.stride, second.dilation, second.kernel,
                                   second.padding, first.padding)) + second.macs
    _check_macs(second.out_channels * (first.in_channels // groups) * math.prod(second.written_kernel),
                original, "composing a 1x1 conv with the conv after it", COMPOSE_HEADROOM)
    a, b = regroup(second, groups), regroup(first, groups)
    shape = (second.out_channels, b.weight.shape[1], *second.kernel)
    weight = Weight(shape, lambda: _grouped_product(a.weight.value(), b.weight.value().flatten(1),
                                                    groups, "goc...,gci->goi..."))
    bias = second.bias
    if first.bias is not None:
        per_tap = a.weight.value().flatten(2).sum(2)  # (out, c/groups)
        bias_g = first.bias.reshape(groups, -1)
        carried = torch.einsum("goc,gc->go", per_tap.reshape(groups, -1, per_tap.shape[1]), bias_g)
        carried = carried.reshape(-1)
        bias = carried if bias is None else bias + carried
    padding = tuple(p1 + p2 for p1, p2 in zip(first.padding, second.padding))
    return ConvTerm(weight, bias, second.stride, padding, second.dilation, groups, macs=original,
                    zero_taps=second.zero_taps)


# ---- sums of terms over one input ----------------------------------------------------

def merge(terms: list[Term], signs: list[float]) -> Term:
    """``sum_i signs[i] * terms[i](x)`` as one term, or :class:`NotExact`."""
    if any(isinstance(t, TransposedConvTerm) for t in terms):
        raise NotExact("transposed convs are not merged with other branches")
    if all(isinstance(t, ChannelAffine) for t in terms):
        if any(t.padding or t.border is not None for t in terms):
            raise NotExact("zero padding cannot be summed with other branches")
        scale = sum(sign * t.scale for t, sign in zip(terms, signs))
        shifts = [sign * t.shift for t, sign in zip(terms, signs) if t.shift is not None]
        return ChannelAffine(scale, sum(shifts) if shifts else None)
    convs = [t for t in terms if isinstance(t, ConvTerm)]
    spatial, cin = convs[0].spatial, convs[0].in_channels
    if any(t.spatial != spatial for t in convs):
        raise NotExact("branches of different dimensionality")
    if any(t.in_channels != cin for t in convs):
        raise NotExact("branches read different channel counts")
    modes = {t.padding_mode for t in convs if any(t.padding)} - {"zeros"}
    if modes:
        raise NotExact(f"branches with padding_mode={modes.pop()!r} never merge")
    for t in terms:
        if isinstance(t, ChannelAffine) and t.padding:
            raise NotExact("zero padding cannot be summed with other branches")
    # a channel affine is a 1x1, stride-1, unpadded grouped dirac: y[c] = s[c] x[c] + t[c]
    out = convs[0].out_channels
    if any(t.out_channels != out for t in convs) or (len(convs) < len(terms) and out != cin):
        sizes = sorted({t.out_channels for t in convs} | ({cin} if len(convs) < len(terms) else set()))
        raise NotExact(f"branches have different output channel counts ({sizes})")
    stride = convs[0].stride
    strides = {t.stride for t in convs} | ({(1,) * spatial} if len(convs) < len(terms) else set())
    if len(strides) > 1:
        raise NotExact(f"branches have different strides ({sorted(strides)})")
    identity_taps = (1, 0, 1)  # kernel, padding, dilation of a dirac

    lattice = [_common_lattice([(t.kernel[d], t.padding[d], t.dilation[d])
                                if isinstance(t, ConvTerm) else identity_taps for t in terms])
               for d in range(spatial)]
    padding = tuple(p for p, _, _ in lattice)
    dilation = tuple(dil for _, dil, _ in lattice)
    kernel = tuple(k for _, _, k in lattice)
    groups = reduce(math.gcd, (t.groups for t in convs))
    zero_taps = _merged_zero_taps(terms, padding, dilation, kernel)
    written = tuple(k - a - b for k, (a, b) in zip(kernel, zero_taps))
    # a padded-grid branch's cost per output position is below its macs: count it as 0;
    # a term summed twice (``y + y``) was computed once
    original = sum(0.0 if t.padded_grid else t.macs for t in {id(t): t for t in convs}.values())
    _check_macs(out * (cin // groups) * math.prod(written), original, "merging these branches")

    centre = tuple(p // dil for p, dil in zip(padding, dilation))
    parts, bias = [], None  # (term with ``groups`` groups, sign, window); (affine, scale, None)
    for term, sign in zip(terms, signs):
        if isinstance(term, ChannelAffine):
            parts.append((term, sign * channel_vector(term.scale, out, "a per-channel scale"), None))
            if term.shift is not None:
                shift = sign * channel_vector(term.shift, out, "a per-channel shift")
                bias = shift if bias is None else bias + shift
            continue
        term = regroup(term, groups)
        window = [slice(None), slice(None)]
        for d in range(spatial):
            step = term.dilation[d] // dilation[d] if term.kernel[d] > 1 else 1
            start = (padding[d] - term.padding[d]) // dilation[d]
            window.append(slice(start, start + step * (term.kernel[d] - 1) + 1, step))
        parts.append((term, sign, tuple(window)))
        if term.bias is not None:
            bias = sign * term.bias if bias is None else bias + sign * term.bias
    shape = (out, cin // groups, *kernel)
    weight = Weight(shape, lambda: _summed_weights(parts, shape, centre))
    return ConvTerm(weight, bias, stride, padding, dilation, groups, macs=original,
                    zero_taps=zero_taps if any(a or b for a, b in zero_taps) else ())


def _merged_zero_taps(terms: list[Term], padding, dilation, kernel) -> tuple:
    """``(leading, trailing)`` taps of the merged kernel that no branch reaches, per dim:
    branches of asymmetric windows (2x2, 3x3 and 4x4 ``padding='same'``) nest in a
    symmetric lattice whose outer taps may all stay zero."""
    taps = []
    for d in range(len(kernel)):
        first, last = kernel[d], -1
        for term in terms:
            if isinstance(term, ChannelAffine):  # a dirac on the centre tap
                start = stop = padding[d] // dilation[d]
            else:
                step = term.dilation[d] // dilation[d] if term.kernel[d] > 1 else 1
                offset = (padding[d] - term.padding[d]) // dilation[d]
                lead, trail = term.taps[d]
                start, stop = offset + step * lead, offset + step * (term.kernel[d] - 1 - trail)
            first, last = min(first, start), max(last, stop)
        taps.append((first, kernel[d] - 1 - last))
    return tuple(taps)


def _summed_weights(parts: list, shape: tuple, centre: tuple) -> torch.Tensor:
    """The merged kernel: each branch's weight added into its window of the common tap
    lattice, a channel affine on the centre tap of each channel's own column. A branch
    that fills the whole lattice (a 3x3 among 1x1s) is computed first and the others are
    added into it, so the kernel costs no zero-filled tensor and no extra pass."""
    first = next((i for i, (term, _, window) in enumerate(parts)
                  if window is not None and term.weight.shape == shape and all(
                      w.start in (0, None) and w.step in (1, None) for w in window[2:])), None)
    if first is None:
        weight = torch.zeros(shape, dtype=DOUBLE)
    else:
        term, sign, _ = parts[first]
        weight = term.weight.value()
        if sign != 1:
            weight.mul_(sign)
    out, cin_g = shape[0], shape[1]
    for index, (term, sign, window) in enumerate(parts):
        if index == first:
            continue
        if window is None:  # y[c] = s[c] x[c]: the centre tap of column c mod (cin / groups)
            channel = torch.arange(out)
            weight[(channel, channel % cin_g, *centre)] += sign  # the signed scale vector
        elif sign == 1:
            weight[window].add_(term.weight.value())
        else:
            weight[window].add_(term.weight.value(), alpha=sign)
    return weight


def _common_lattice(taps: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    """(padding, dilation, kernel) of the one kernel that holds every branch's taps in
    one spatial dim, given each branch's (kernel, padding, dilation)."""
    twice_centre = {2 * p - d * (k - 1) for k, p, d in taps}
    if len(twice_centre) != 1:
        raise NotExact("branches are not aligned: different centre offsets "
                       "(padding - dilation*(kernel-1)/2) would shift their outputs")
    dilation = reduce(math.gcd, (d for k, p, d in taps if k > 1), 0) or 1
    padding = max(p for _, p, _ in taps)
    for k, p, d in taps:
        if (padding - p) % dilation or (k > 1 and d % dilation):
            raise NotExact("branch taps do not share a common dilation lattice")
    span = 2 * padding - twice_centre.pop()
    if span % dilation:
        raise NotExact("branch taps do not share a common dilation lattice")
    return padding, dilation, span // dilation + 1
