"""The affine algebra (``reparam_fx.core.affine``), rule by rule, against torch itself.

Every rule of the module docstring gets

* a positive test: terms built with ``affine.<constructor>`` from random float64 tensors
  (random BatchNorm statistics, never an identity), the composed / merged term run as a
  real conv (``F.conv{1,2,3}d`` / ``F.conv_transpose*`` / ``F.linear`` with the term's
  weight, bias, stride, padding, dilation and groups) and compared with the original ops
  run one after another, in float64, to a relative error of ``RTOL``;
* a negative test: where the rule is not exact, ``affine.NotExact`` with its reason;
* hypothesis properties for the two families (composition, merging): whatever the terms,
  the result is exact or ``NotExact``, and the cases the docstring calls always exact
  never raise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

from reparam_fx.core import affine

D = torch.float64
RTOL = 1e-12  # max|fused - reference| / max|reference|, float64

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


# ---- random inputs ---------------------------------------------------------------------

class Rand:
    """Seeded float64 tensors."""

    def __init__(self, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)

    def t(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g, dtype=D)

    def positive(self, *shape) -> torch.Tensor:
        return torch.rand(*shape, generator=self.g, dtype=D) + 0.5

    def bn(self, channels: int, affine_params: bool = True) -> "BN":
        return BN(self.t(channels), self.positive(channels),
                  self.t(channels) if affine_params else None,
                  self.t(channels) if affine_params else None, 1e-3)

    def conv(self, cin, cout, kernel, stride=1, padding=0, dilation=1, groups=1,
             bias=True) -> "Conv":
        kernel = (kernel,) * 2 if isinstance(kernel, int) else tuple(kernel)  # int: 2-d
        return Conv(self.t(cout, cin // groups, *kernel), self.t(cout) if bias else None,
                    stride, padding, dilation, groups)


@dataclass
class BN:
    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float

    def term(self):
        return affine.batchnorm(self.mean, self.var, self.weight, self.bias, self.eps)

    def __call__(self, x):
        return F.batch_norm(x, self.mean, self.var, self.weight, self.bias, False, 0.0, self.eps)


@dataclass
class Conv:
    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    groups: int = 1

    def term(self):
        return affine.conv(self.weight, self.bias, self.stride, self.padding, self.dilation,
                           self.groups)

    def __call__(self, x):
        return CONV[self.weight.dim() - 2](x, self.weight, self.bias, self.stride, self.padding,
                                           self.dilation, self.groups)


def channel_view(t: torch.Tensor, rank: int) -> torch.Tensor:
    """A 0-d or (C,) tensor broadcast along axis 1 of a rank-``rank`` tensor."""
    return t if t.dim() == 0 else t.reshape(-1, *(1,) * (rank - 2))


def pad_arg(padding) -> list[int]:
    """``F.pad``'s argument (last dim first) for symmetric per-dim padding (< 0: crop)."""
    return [p for q in reversed(tuple(padding)) for p in (q, q)]


def crop(x: torch.Tensor, crops) -> torch.Tensor:
    """``x[..., c:-c]`` on the trailing dims (``crops`` per trailing dim, >= 0)."""
    return F.pad(x, pad_arg([-c for c in crops]))


def apply(term, x: torch.Tensor) -> torch.Tensor:
    """Run ``term`` on ``x`` with torch's own ops (the term's weight computed now)."""
    if isinstance(term, affine.ChannelAffine):
        y = x * channel_view(term.scale, x.dim())
        if term.shift is not None:
            y = y + channel_view(term.shift, x.dim())
        if term.padding:
            border = torch.zeros((), dtype=D) if term.border is None \
                else channel_view(term.border, x.dim())
            y = F.pad(y - border, pad_arg(term.padding)) + border
        return y
    weight = term.weight.value()
    assert weight.shape == term.weight.shape, "a Weight's value has another shape than it claims"
    assert weight.dtype == D
    if isinstance(term, affine.TransposedConvTerm):
        return CONV_T[term.spatial](x, weight, term.bias, term.stride, term.padding,
                                    term.output_padding, term.groups, term.dilation)
    assert term.padding_mode == "zeros"
    if term.spatial == 0:
        return F.linear(x, weight, term.bias)
    # negative padding is a crop of the input (what a crop before an unpadded conv means)
    cropped = [max(-p, 0) for p in term.padding]
    if any(cropped):
        x = crop(x, cropped)
    return CONV[term.spatial](x, weight, term.bias, term.stride,
                              tuple(max(p, 0) for p in term.padding), term.dilation, term.groups)


def apply_written(term: affine.ConvTerm, x: torch.Tensor) -> torch.Tensor:
    """Run ``term`` as the frontends write it: its known zero taps trimmed, its padding
    ``written_padding`` (before, after) per dim, as an explicit pad then an unpadded conv."""
    weight = term.weight.value()
    window = (slice(None), slice(None), *(slice(a, k - b) for k, (a, b) in
                                          zip(term.kernel, term.taps)))
    trimmed = weight[window]
    assert tuple(trimmed.shape[2:]) == term.written_kernel
    assert torch.count_nonzero(weight).item() == torch.count_nonzero(trimmed).item(), \
        "a tap recorded as zero is not zero"
    pads = [side for before, after in reversed(term.written_padding) for side in (before, after)]
    return CONV[term.spatial](F.pad(x, pads), trimmed, term.bias, term.stride, 0, term.dilation,
                              term.groups)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype == D
    scale = expected.abs().max().item()
    assert scale > 0, "a vacuous comparison: the reference output is all zeros"
    return (actual - expected).abs().max().item() / scale


def assert_exact(term, x, expected):
    err = rel_err(apply(term, x), expected)
    assert err <= RTOL, f"relative error {err:.3g} > {RTOL}"


def not_exact(match: str):
    return pytest.raises(affine.NotExact, match=match)


# ---- BatchNorm as a channel affine -------------------------------------------------------

@pytest.mark.parametrize("spatial", [0, 1, 2, 3])
@pytest.mark.parametrize("affine_params", [True, False])
def test_batchnorm_is_a_channel_affine(spatial, affine_params):
    r = Rand(1)
    bn = r.bn(5, affine_params)
    x = r.t(2, 5, *(4,) * spatial)
    term = bn.term()
    assert isinstance(term, affine.ChannelAffine) and term.channels == 5
    assert_exact(term, x, bn(x))
    s = bn.var.add(bn.eps).rsqrt() * (1 if bn.weight is None else bn.weight)
    torch.testing.assert_close(term.scale, s, rtol=1e-15, atol=0)


def test_batchnorm_of_other_channels_than_the_conv_is_refused():
    r = Rand(2)
    with not_exact("per-channel scale has 5 channels, the conv has 4"):
        affine.compose(r.conv(3, 4, 3).term(), r.bn(5).term())
    with not_exact("per-channel scale has 5 channels, the conv has 3"):
        affine.compose(r.bn(5).term(), r.conv(3, 4, 3).term())


def test_constructors_copy_their_inputs():
    """A term never aliases the model's statistics (the algebra works in place on copies)."""
    r = Rand(3)
    bn = r.bn(4)
    mean = bn.mean.clone()
    term = bn.term()
    x = r.t(2, 4, 3)
    expected = bn(x)
    term.shift.mul_(0)  # (an in-place change of the term's own tensors ...)
    assert torch.equal(bn.mean, mean)  # (... never reaches the model)
    scale = affine.channel_affine(bn.var)
    assert scale.scale is not bn.var and scale.scale.data_ptr() != bn.var.data_ptr()
    assert rel_err(apply(bn.term(), x), expected) <= RTOL


# ---- channel affine after a conv ----------------------------------------------------------

@pytest.mark.parametrize("spatial, groups, stride, padding, dilation, bias", [
    (1, 1, 1, 0, 1, True),
    (2, 1, 2, 1, 1, False),
    (2, 3, 1, 2, 2, True),
    (3, 1, (1, 2, 1), (1, 0, 1), 1, True),
])
def test_affine_after_conv(spatial, groups, stride, padding, dilation, bias):
    r = Rand(4)
    conv = r.conv(6, 9, (3,) * spatial, stride, padding, dilation, groups, bias)
    bn = r.bn(9)
    x = r.t(2, 6, *(7,) * spatial)
    term = affine.compose(conv.term(), bn.term())
    assert isinstance(term, affine.ConvTerm) and term.groups == groups
    assert_exact(term, x, bn(conv(x)))
    # a constant (scalar) scale and shift, as layer scales and `x * 2 + 1` are
    scalar = affine.channel_affine(torch.tensor(0.7, dtype=D), torch.tensor(-1.3, dtype=D))
    assert_exact(affine.compose(conv.term(), scalar), x, conv(x) * 0.7 - 1.3)


def test_zero_padding_after_a_kxk_conv_is_refused():
    r = Rand(5)
    with not_exact("zero padding after a conv is not a conv padding"):
        affine.compose(r.conv(3, 4, 3).term(), affine.zero_pad((1, 1)))
    with not_exact("zero padding after a conv is not a conv padding"):  # strided 1x1
        affine.compose(r.conv(3, 4, 1, stride=2).term(), affine.zero_pad((1, 1)))


# ---- channel affine before a conv ---------------------------------------------------------

@pytest.mark.parametrize("spatial, cin, cout, groups, stride, dilation", [
    (1, 4, 6, 1, 1, 1),
    (2, 6, 4, 2, 2, 1),  # in(o, j) under grouping, out != in
    (2, 6, 6, 6, 1, 2),  # depthwise
    (3, 4, 2, 2, 1, 1),
])
def test_affine_before_unpadded_conv(spatial, cin, cout, groups, stride, dilation):
    r = Rand(6)
    bn, conv = r.bn(cin), r.conv(cin, cout, (3,) * spatial, stride, 0, dilation, groups)
    x = r.t(2, cin, *(8,) * spatial)
    term = affine.compose(bn.term(), conv.term())
    assert isinstance(term, affine.ConvTerm) and term.padding == (0,) * spatial
    assert_exact(term, x, conv(bn(x)))


@pytest.mark.parametrize("groups", [1, 2])
def test_scale_before_padded_conv(groups):
    """A scale alone (no shift) folds into any conv, padded or not."""
    r = Rand(7)
    scale = r.t(4)
    conv = r.conv(4, 6, (3,), padding=1, groups=groups)
    x = r.t(2, 4, 9)
    term = affine.compose(affine.channel_affine(scale), conv.term())
    assert_exact(term, x, conv(x * scale[:, None]))
    # a zero shift tensor is no shift
    zero_shift = affine.channel_affine(scale, torch.zeros(4, dtype=D))
    assert_exact(affine.compose(zero_shift, conv.term()), x, conv(x * scale[:, None]))


def test_shift_before_padded_conv_is_refused():
    r = Rand(8)
    with not_exact("per-channel shift .* before a zero-padded conv changes the border"):
        affine.compose(r.bn(4).term(), r.conv(4, 6, 3, padding=1).term())
    with not_exact("zero-padded conv changes the border"):  # padded in one dim only
        affine.compose(r.bn(4).term(), r.conv(4, 6, (3, 1), padding=(0, 1)).term())


# ---- channel affine then channel affine, pads and crops ----------------------------------------

def test_affine_then_affine():
    r = Rand(9)
    a, b = r.bn(5), r.bn(5)
    x = r.t(2, 5, 4, 4)
    assert_exact(affine.compose(a.term(), b.term()), x, b(a(x)))
    # the identity is neutral on both sides, and returns the other term itself
    t = a.term()
    assert affine.compose(affine.identity(), t) is t and affine.compose(t, affine.identity()) is t


def test_pad_then_affine_pads_with_the_affine_of_zero():
    """``bn(pad(x))``: the border is ``bn(0) = t``, kept as the term's border value."""
    r = Rand(10)
    bn = r.bn(3)
    x = r.t(2, 3, 5, 6)
    term = affine.compose(affine.zero_pad((1, 2)), bn.term())
    assert term.padding == (1, 2) and term.border is not None
    assert_exact(term, x, bn(F.pad(x, (2, 2, 1, 1))))


def test_two_paddings_with_different_values_are_refused():
    r = Rand(11)
    padded_bn = affine.compose(affine.zero_pad((1, 1)), r.bn(3).term())  # border bn(0) != 0
    with not_exact("two paddings with different values"):
        affine.compose(padded_bn, affine.zero_pad((1, 1)))


@pytest.mark.parametrize("first, second, total", [
    ((1, 1), (2, 1), (3, 2)),  # pads add
    ((-1, -2), (-1, 0), (-2, -2)),  # crops add
    ((2, 2), (-1, -2), (1, 0)),  # a crop after a pad takes part of it back
    ((1,), (1, 2), (1, 3)),  # fewer dims: the trailing ones
])
def test_pad_then_pad(first, second, total):
    r = Rand(12)
    x = r.t(2, 3, 8, 8)
    term = affine.compose(affine.zero_pad(first), affine.zero_pad(second))
    assert term.padding == total and term.border is None
    assert_exact(term, x, F.pad(F.pad(x, pad_arg(first)), pad_arg(second)))


def test_pad_after_crop_is_refused():
    with not_exact("zero padding after a crop is not a crop"):
        affine.compose(affine.zero_pad((-1, -1)), affine.zero_pad((1, 1)))


@pytest.mark.parametrize("spatial, padding", [(1, (2,)), (2, (1, 2)), (3, (1, 0, 1))])
def test_zero_pad_before_conv_is_conv_padding(spatial, padding):
    r = Rand(13)
    conv = r.conv(3, 4, (3,) * spatial, stride=2, padding=1)
    x = r.t(2, 3, *(7,) * spatial)
    term = affine.compose(affine.zero_pad(padding), conv.term())
    assert term.padding == tuple(p + 1 for p in padding)
    assert_exact(term, x, conv(F.pad(x, pad_arg(padding))))
    # a pad of the last dims only, before a 3-d conv
    if spatial == 3:
        term = affine.compose(affine.zero_pad((2,)), conv.term())
        assert term.padding == (1, 1, 3)
        assert_exact(term, x, conv(F.pad(x, [2, 2])))


def test_zero_pad_before_conv_then_bn_and_pad_after_bn():
    """BN then a pad whose border is BN's shift (DiverseBranchBlock's BNAndPad), then a
    conv: ``pad_t(s x + t) == s pad_0(x) + t``, so the shift folds into the bias."""
    r = Rand(14)
    bn, conv = r.bn(4), r.conv(4, 5, 3)
    x = r.t(2, 4, 6, 6)
    t = bn.term().shift
    pad_t = affine.zero_pad((1, 1), t)
    bn_pad = affine.compose(bn.term(), pad_t)
    reference = conv(F.pad(bn(x) - t[:, None, None], [1] * 4) + t[:, None, None])
    assert_exact(bn_pad, x, F.pad(bn(x) - t[:, None, None], [1] * 4) + t[:, None, None])
    term = affine.compose(bn_pad, conv.term())
    assert term.padding == (1, 1)
    assert_exact(term, x, reference)


def test_zero_pad_refusals():
    r = Rand(15)
    bn = r.bn(4)
    other = affine.zero_pad((1, 1), r.t(4))  # a border that is not the shift
    with not_exact("border value other than the shift before a conv"):
        affine.compose(affine.compose(bn.term(), other), r.conv(4, 5, 3).term())
    pad_t = affine.compose(bn.term(), affine.zero_pad((1, 1), bn.term().shift))
    with not_exact("zero-padded conv changes the border"):  # the conv pads again
        affine.compose(pad_t, r.conv(4, 5, 3, padding=1).term())
    with not_exact("zero padding over 3 dims before a 2-d conv"):
        affine.compose(affine.zero_pad((1, 1, 1)), r.conv(4, 5, 3).term())


# ---- crops as negative padding --------------------------------------------------------------

@pytest.mark.parametrize("stride, padding, crops", [(1, 2, 1), (2, 3, 1), (1, 1, 1), (2, 2, 2)])
def test_crop_after_conv(stride, padding, crops):
    """A crop by ``c`` of a conv's output is the conv with padding ``p - c * stride``."""
    r = Rand(16)
    conv, bn = r.conv(3, 4, 3, stride=stride, padding=padding), r.bn(4)
    x = r.t(2, 3, 11, 12)
    term = affine.compose(affine.compose(conv.term(), bn.term()), affine.zero_pad((-crops, -crops)))
    assert term.padding == (padding - crops * stride,) * 2
    assert_exact(term, x, crop(bn(conv(x)), (crops, crops)))


def test_crop_before_unpadded_conv_is_negative_padding():
    r = Rand(17)
    conv = r.conv(3, 4, (1, 3), padding=(0, 1))
    x = r.t(2, 3, 7, 7)
    term = affine.compose(affine.zero_pad((-1, 0)), conv.term())
    assert term.padding == (-1, 1)  # (never written as a conv alone)
    assert_exact(term, x, conv(x[:, :, 1:-1, :]))


def test_acnet_cropped_branches_merge_into_the_square_conv():
    """ACNet with padding 0: a 3x3 conv, a 1x3 conv on ``x[:, :, 1:-1]`` and a 3x1 conv on
    ``x[..., 1:-1]``, each with BN: the crops' negative padding lines up with the 3x3."""
    r = Rand(18)
    square, hor, ver = r.conv(3, 4, 3), r.conv(3, 4, (1, 3)), r.conv(3, 4, (3, 1))
    bns = [r.bn(4) for _ in range(3)]
    x = r.t(2, 3, 8, 9)
    terms = [affine.compose(square.term(), bns[0].term()),
             affine.compose(affine.compose(affine.zero_pad((-1, 0)), hor.term()), bns[1].term()),
             affine.compose(affine.compose(affine.zero_pad((0, -1)), ver.term()), bns[2].term())]
    merged = affine.merge(terms, [1.0, 1.0, 1.0])
    assert merged.kernel == (3, 3) and merged.padding == (0, 0)
    expected = bns[0](square(x)) + bns[1](hor(x[:, :, 1:-1, :])) + bns[2](ver(x[..., 1:-1]))
    assert_exact(merged, x, expected)


def test_crop_refusals():
    r = Rand(19)
    with not_exact("a crop before a zero-padded conv"):
        affine.compose(affine.zero_pad((-1, -1)), r.conv(3, 4, 3, padding=1).term())
    with not_exact("a crop before a zero-padded conv"):  # 1x1 conv then a padded conv
        affine.compose(affine.compose(affine.zero_pad((-1, -1)), r.conv(3, 4, 1, bias=False).term()),
                       r.conv(4, 4, 3, padding=1).term())
    with not_exact("crop of more dims than the conv has"):
        affine.compose(r.conv(3, 4, 3).term(), affine.zero_pad((-1, -1, -1)))


# ---- kxk conv then 1x1 conv ---------------------------------------------------------------

@pytest.mark.parametrize("spatial, g1, g2, s1, s2, dilation, bias1", [
    (1, 1, 1, 1, 1, 1, True),
    (2, 2, 1, 2, 1, 1, True),  # grouped then dense: groups gcd 1
    (2, 2, 2, 1, 2, 2, False),  # grouped both: groups 2, strides multiply
    (3, 1, 1, 1, 1, 1, True),
])
def test_kxk_then_1x1(spatial, g1, g2, s1, s2, dilation, bias1):
    r = Rand(20)
    first = r.conv(4, 6, (3,) * spatial, s1, 1, dilation, g1, bias1)
    second = r.conv(6, 4, (1,) * spatial, s2, 0, 1, g2)
    x = r.t(2, 4, *(9,) * spatial)
    term = affine.compose(first.term(), second.term())
    assert term.kernel == (3,) * spatial and term.stride == (s1 * s2,) * spatial
    assert term.groups == math.gcd(g1, g2)
    assert_exact(term, x, second(first(x)))


def test_conv_compositions_refused():
    r = Rand(21)
    with not_exact("compose only when one of them is 1x1"):
        affine.compose(r.conv(4, 4, 3).term(), r.conv(4, 4, 3).term())
    with not_exact("compose only when one of them is 1x1"):  # a 1x1 that pads is no 1x1 here
        affine.compose(r.conv(4, 4, 3).term(), r.conv(4, 4, 1, padding=1).term())
    with not_exact("channel counts do not chain"):
        affine.compose(r.conv(4, 5, 3).term(), r.conv(4, 4, 1).term())
    with not_exact("convs of different dimensionality"):
        affine.compose(r.conv(4, 4, (3, 3)).term(), r.conv(4, 4, (1,)).term())
    # the MAC gate: a 4 -> 1 bottleneck then 1 -> 64 costs far more as one conv
    with not_exact("composing a conv with the 1x1 conv after it would increase MACs"):
        affine.compose(r.conv(4, 1, 3).term(), r.conv(1, 64, 1).term())


def test_composition_within_headroom_is_flagged_as_adding_macs():
    """Up to COMPOSE_HEADROOM the composition is allowed (and exact), but ``adds_macs``
    tells: a region whose term costs more than its ops is never written alone."""
    r = Rand(22)
    cheap = affine.compose(r.conv(8, 8, 3).term(), r.conv(8, 8, 1).term())
    assert not affine.adds_macs(cheap)
    first, second = r.conv(4, 2, 3), r.conv(2, 8, 1)
    costly = affine.compose(first.term(), second.term())  # 8*4*9 = 288 > 2*4*9 + 8*2 = 88
    assert costly.written_macs == 288 and costly.macs == 88 and affine.adds_macs(costly)
    x = r.t(1, 4, 6, 6)
    assert_exact(costly, x, second(first(x)))


# ---- 1x1 conv then kxk conv ---------------------------------------------------------------

@pytest.mark.parametrize("bias1, p1, p2, groups, stride2", [
    (True, 0, 0, 1, 1),  # a bias, no padding after it: exact
    (True, 1, 0, 1, 2),  # a 1x1 conv that pads: its border is its bias, still exact
    (False, 0, 1, 1, 1),  # no bias: the kxk conv may pad
    (False, 1, 1, 2, 1),
])
def test_1x1_then_kxk(bias1, p1, p2, groups, stride2):
    r = Rand(23)
    first = r.conv(4, 4, (1, 1), 1, p1, 1, groups, bias1)
    second = r.conv(4, 6, (3, 3), stride2, p2, 1, groups)
    x = r.t(2, 4, 8, 8)
    term = affine.compose(first.term(), second.term())
    assert term.padding == (p1 + p2,) * 2 and term.kernel == (3, 3)
    assert_exact(term, x, second(first(x)))


def test_1x1_with_bias_then_padded_kxk_is_refused():
    r = Rand(24)
    with not_exact("1x1 conv with bias before a zero-padded conv"):
        affine.compose(r.conv(4, 4, 1).term(), r.conv(4, 6, 3, padding=1).term())
    # a zero bias is no bias
    zero_bias = Conv(r.t(4, 4, 1, 1), torch.zeros(4, dtype=D))
    affine.compose(zero_bias.term(), r.conv(4, 6, 3, padding=1).term())
    with not_exact("composing a 1x1 conv with the conv after it would increase MACs"):
        affine.compose(r.conv(64, 1, 1, bias=False).term(), r.conv(1, 64, 3).term())


# ---- transposed convs ---------------------------------------------------------------------

def _conv_t(r: Rand, cin, cout, kernel, stride, padding, output_padding, groups, spatial=2):
    weight = r.t(cin, cout // groups, *(kernel,) * spatial)
    bias = r.t(cout)
    term = affine.conv_transpose(weight, bias, stride, padding, output_padding, 1, groups)
    ref = lambda x: CONV_T[spatial](x, weight, bias, stride, padding, output_padding, groups)
    return term, ref


@pytest.mark.parametrize("spatial, groups, stride, padding, output_padding", [
    (1, 1, 2, 1, 1), (2, 2, 2, 0, 0), (3, 1, 1, 1, 0)])
def test_transposed_conv_with_affine_after_and_scale_before(spatial, groups, stride, padding,
                                                           output_padding):
    r = Rand(25)
    term, ref = _conv_t(r, 4, 6, 3, stride, padding, output_padding, groups, spatial)
    bn, scale = r.bn(6), r.t(4)
    x = r.t(2, 4, *(5,) * spatial)
    after = affine.compose(term, bn.term())
    assert isinstance(after, affine.TransposedConvTerm)
    assert_exact(after, x, bn(ref(x)))
    before = affine.compose(affine.channel_affine(scale), term)
    assert_exact(before, x, ref(x * channel_view(scale, x.dim())))


def test_transposed_conv_refusals():
    r = Rand(26)
    term, _ = _conv_t(r, 4, 6, 3, 2, 1, 1, 1)
    with not_exact("shift .* before a transposed conv: output positions are reached by "
                   "different numbers of taps"):
        affine.compose(r.bn(4).term(), term)
    with not_exact("transposed convs are not merged"):
        affine.merge([term, term], [1.0, 1.0])
    with not_exact("a transposed conv composes only with per-channel affines"):
        affine.compose(term, r.conv(6, 6, 1).term())
    with not_exact("zero padding after a conv is not a conv padding"):
        affine.compose(term, affine.zero_pad((1, 1)))
    with not_exact("zero padding before a transposed conv"):
        affine.compose(affine.zero_pad((1, 1)), term)


# ---- merging terms over one input ----------------------------------------------------------

def test_repvgg_merge_3x3_1x1_identity():
    r = Rand(27)
    c = 4
    k3, k1 = r.conv(c, c, 3, padding=1), r.conv(c, c, 1)
    bn3, bn1, bn0 = r.bn(c), r.bn(c), r.bn(c)
    x = r.t(2, c, 6, 7)
    terms = [affine.compose(k3.term(), bn3.term()), affine.compose(k1.term(), bn1.term()),
             bn0.term()]
    merged = affine.merge(terms, [1.0, 1.0, 1.0])
    assert merged.kernel == (3, 3) and merged.padding == (1, 1) and merged.groups == 1
    assert_exact(merged, x, bn3(k3(x)) + bn1(k1(x)) + bn0(x))
    # signs: x + g * (a(x) - b(x)) (RepMixer) as signed terms
    diff = affine.merge(terms, [1.0, -1.0, -0.5])
    assert_exact(diff, x, bn3(k3(x)) - bn1(k1(x)) - 0.5 * bn0(x))


def test_merge_of_channel_affines_is_a_channel_affine():
    r = Rand(28)
    a, b = r.bn(3), r.bn(3)
    x = r.t(2, 3, 5)
    merged = affine.merge([a.term(), b.term(), affine.identity()], [1.0, -1.0, 2.0])
    assert isinstance(merged, affine.ChannelAffine)
    assert_exact(merged, x, a(x) - b(x) + 2 * x)


@pytest.mark.parametrize("stride", [1, 2])
def test_merge_same_stride(stride):
    r = Rand(29)
    a = r.conv(3, 4, (5, 5), stride, 2)
    b = r.conv(3, 4, (1, 3), stride, (0, 1))
    x = r.t(2, 3, 9, 8)
    merged = affine.merge([a.term(), b.term()], [1.0, 1.0])
    assert merged.stride == (stride, stride) and merged.kernel == (5, 5)
    assert_exact(merged, x, a(x) + b(x))


def test_merge_common_dilation_lattice():
    r = Rand(30)
    dense = r.conv(3, 3, 5, padding=2)
    dilated = r.conv(3, 3, 3, padding=2, dilation=2)  # taps 0, 2, 4 of the 5x5
    x = r.t(2, 3, 9, 9)
    merged = affine.merge([dense.term(), dilated.term()], [1.0, 1.0])
    assert merged.dilation == (1, 1) and merged.kernel == (5, 5)
    assert_exact(merged, x, dense(x) + dilated(x))
    # dilated kernels with a 1x1: the lattice keeps their dilation
    point = r.conv(3, 3, 1)
    both = affine.merge([dilated.term(), point.term(), affine.identity()], [1.0, 1.0, 1.0])
    assert both.dilation == (2, 2) and both.kernel == (3, 3) and both.padding == (2, 2)
    assert_exact(both, x, dilated(x) + point(x) + x)
    # dilations 6, 4, 6: the lattice is their gcd 2 (not the smallest, 4), 13 taps wide
    wide = [r.conv(3, 3, (5,), padding=12, dilation=6), r.conv(3, 3, (7,), padding=12, dilation=4),
            r.conv(3, 3, (3,), padding=6, dilation=6)]
    x1 = r.t(2, 3, 20)
    merged = affine.merge([c.term() for c in wide], [1.0, 1.0, -1.0])
    assert merged.dilation == (2,) and merged.kernel == (13,) and merged.padding == (12,)
    assert_exact(merged, x1, wide[0](x1) + wide[1](x1) - wide[2](x1))


def test_merge_groups_gcd():
    r = Rand(31)
    a, b = r.conv(8, 8, 3, padding=1, groups=2), r.conv(8, 8, 3, padding=1, groups=4)
    x = r.t(2, 8, 5, 5)
    merged = affine.merge([a.term(), b.term(), affine.identity()], [1.0, 1.0, 1.0])
    assert merged.groups == 2
    assert_exact(merged, x, a(x) + b(x) + x)
    depthwise = [r.conv(8, 8, 3, padding=1, groups=8), r.conv(8, 8, 1, groups=8)]
    merged = affine.merge([t.term() for t in depthwise] + [r.bn(8).term()], [1.0, 1.0, 1.0])
    assert merged.groups == 8


@pytest.mark.parametrize("spatial", [1, 3])
def test_merge_other_dims(spatial):
    r = Rand(32)
    a, b = r.conv(2, 3, (3,) * spatial, 1, 1), r.conv(2, 3, (1,) * spatial)
    x = r.t(2, 2, *(5,) * spatial)
    assert_exact(affine.merge([a.term(), b.term()], [1.0, -1.0]), x, a(x) - b(x))


def test_merge_refusals():
    r = Rand(33)
    with not_exact(r"different strides"):
        affine.merge([r.conv(3, 3, 3, 2, 1).term(), r.conv(3, 3, 1, 1).term()], [1.0, 1.0])
    with not_exact("different strides"):  # an identity has stride 1
        affine.merge([r.conv(3, 3, 3, 2, 1).term(), affine.identity()], [1.0, 1.0])
    with not_exact("different centre offsets"):
        affine.merge([r.conv(3, 3, 3, padding=1).term(), r.conv(3, 3, 1, padding=1).term()],
                     [1.0, 1.0])
    with not_exact("different centre offsets"):  # an unpadded 3x3 with an identity
        affine.merge([r.conv(3, 3, 3).term(), affine.identity()], [1.0, 1.0])
    with not_exact("common dilation lattice"):  # a 2-tap dilated kernel around a 1x1
        affine.merge([r.conv(3, 3, 2, padding=1, dilation=2).term(), r.conv(3, 3, 1).term()],
                     [1.0, 1.0])
    with not_exact(r"merging these branches would increase MACs"):  # depthwise + dense
        affine.merge([r.conv(8, 8, 3, padding=1, groups=8).term(), r.conv(8, 8, 1).term()],
                     [1.0, 1.0])
    with not_exact(r"different output channel counts \(\[3, 4\]\)"):
        affine.merge([r.conv(3, 4, 1).term(), affine.identity()], [1.0, 1.0])
    with not_exact("read different channel counts"):
        affine.merge([r.conv(3, 4, 1).term(), r.conv(2, 4, 1).term()], [1.0, 1.0])
    with not_exact("different dimensionality"):
        affine.merge([r.conv(3, 4, (1,)).term(), r.conv(3, 4, (1, 1)).term()], [1.0, 1.0])
    with not_exact("zero padding cannot be summed"):
        affine.merge([affine.zero_pad((1,)), affine.identity()], [1.0, 1.0])
    with not_exact("zero padding cannot be summed"):
        affine.merge([r.conv(3, 3, 3, padding=1).term(), affine.zero_pad((1, 1))], [1.0, 1.0])


def test_merge_counts_a_term_summed_twice_once():
    """``y + y``: one conv computed once; merging must not double its MAC budget."""
    r = Rand(34)
    t = r.conv(4, 4, 3, padding=1).term()
    merged = affine.merge([t, t], [1.0, 1.0])
    assert merged.macs == t.macs
    x = r.t(1, 4, 5, 5)
    assert_exact(merged, x, 2 * apply(t, x))


# ---- regroup, repeat_channels, as_pointwise ------------------------------------------------

@pytest.mark.parametrize("groups, to", [(4, 2), (4, 1), (6, 3), (2, 2)])
def test_regroup(groups, to):
    r = Rand(35)
    conv = r.conv(12, 12, 3, padding=1, groups=groups)
    x = r.t(2, 12, 5, 5)
    term = affine.regroup(conv.term(), to)
    assert term.groups == to and term.weight.shape == (12, 12 // to, 3, 3)
    assert_exact(term, x, conv(x))


def test_regroup_refused_for_a_non_divisor():
    r = Rand(36)
    with pytest.raises(ValueError, match="cannot regroup 4 groups into 3"):
        affine.regroup(r.conv(12, 12, 3, groups=4).term(), 3)


def test_repeat_channels_is_bn_then_flatten():
    r = Rand(37)
    bn = r.bn(3)
    x = r.t(2, 3, 4, 5)
    term = affine.repeat_channels(bn.term(), 4 * 5)
    assert term.channels == 60
    flat = x.flatten(1)
    assert_exact(term, flat, bn(x).flatten(1))
    # then a Linear on the flattened features: one linear
    fc = r.t(7, 60), r.t(7)
    head = affine.compose(term, affine.linear(*fc))
    assert_exact(head, flat, F.linear(bn(x).flatten(1), *fc))
    scalar = affine.channel_affine(2.0, 1.0)
    assert affine.repeat_channels(scalar, 20).scale.dim() == 0


def test_repeat_channels_refuses_padding():
    with not_exact("a padded affine cannot be flattened"):
        affine.repeat_channels(affine.zero_pad((1, 1)), 4)


def test_as_pointwise():
    r = Rand(38)
    conv = r.conv(4, 6, (1, 1))
    x = r.t(2, 4, 3, 5)
    as_linear = affine.as_pointwise(conv.term(), 0)
    assert as_linear.spatial == 0 and as_linear.weight.shape == (6, 4)
    channels_last = apply(as_linear, x.permute(0, 2, 3, 1))
    assert rel_err(channels_last.permute(0, 3, 1, 2), conv(x)) <= RTOL
    w, b = r.t(6, 4), r.t(6)
    as_conv = affine.as_pointwise(affine.linear(w, b), 2)
    assert as_conv.kernel == (1, 1)
    assert_exact(as_conv, x, F.linear(x.permute(0, 2, 3, 1), w, b).permute(0, 3, 1, 2))
    bn = r.bn(4).term()
    assert affine.as_pointwise(bn, 0) is bn


def test_grouped_1x1_is_no_linear():
    r = Rand(39)
    grouped = r.conv(4, 4, (1, 1), groups=2).term()
    assert not affine.pointwise_fits(grouped, 0) and affine.pointwise_fits(grouped, 1)
    with not_exact("grouped 1x1 conv on the last axis is no linear"):
        affine.as_pointwise(grouped, 0)


# ---- linear terms --------------------------------------------------------------------------

def test_linear_terms():
    r = Rand(40)
    w1, b1, w2, b2 = r.t(6, 5), r.t(6), r.t(3, 6), r.t(3)
    bn_in, bn_out = r.bn(5), r.bn(6)
    x = r.t(4, 5)
    lin = affine.linear(w1, b1)
    assert lin.spatial == 0 and lin.is_pointwise
    # BatchNorm1d before (its shift folds: a linear has no padding) and after
    term = affine.compose(affine.compose(bn_in.term(), lin), bn_out.term())
    assert_exact(term, x, bn_out(F.linear(bn_in(x), w1, b1)))
    # linear then linear (a 1x1 then 1x1 composition) and linear heads summed
    chain = affine.compose(lin, affine.linear(w2, b2))
    assert_exact(chain, x, F.linear(F.linear(x, w1, b1), w2, b2))
    w3, b3 = r.t(6, 5), r.t(6)
    heads = affine.merge([lin, affine.linear(w3, b3)], [0.5, 0.5])
    assert_exact(heads, x, (F.linear(x, w1, b1) + F.linear(x, w3, b3)) / 2)
    # a residual around a linear (tokens + mlp(tokens)): the identity is a dirac matrix
    w4, b4 = r.t(5, 5), r.t(5)
    residual = affine.merge([affine.linear(w4, b4), affine.identity(), bn_in.term()],
                            [1.0, 1.0, -1.0])
    assert residual.spatial == 0
    assert_exact(residual, x, F.linear(x, w4, b4) + x - bn_in(x))
    # on tokens (B, N, C), the channel axis last
    tokens = r.t(2, 3, 5)
    reference = bn_out(F.linear(bn_in(tokens.reshape(6, 5)), w1, b1)).reshape(2, 3, 6)
    assert_exact(term, tokens, reference)


def test_linear_refusals():
    r = Rand(41)
    with not_exact("composing a conv with the 1x1 conv after it would increase MACs"):
        affine.compose(affine.linear(r.t(1, 64), None), affine.linear(r.t(64, 1), None))
    with not_exact("channel counts do not chain"):
        affine.compose(affine.linear(r.t(3, 4), None), affine.linear(r.t(2, 5), None))
    with not_exact("per-channel shift has 5 channels, the conv has 4"):
        affine.compose(affine.channel_affine(1.0, r.t(5)), affine.linear(r.t(3, 4), None))


# ---- average pooling -------------------------------------------------------------------------

@pytest.mark.parametrize("spatial, kernel, stride, padding", [
    (1, 3, 1, 1), (2, 3, 2, 1), (2, 2, 2, 0), (3, 3, 1, 1)])
def test_avg_pool_is_a_depthwise_conv(spatial, kernel, stride, padding):
    r = Rand(42)
    x = r.t(2, 3, *(6,) * spatial)
    k, s, p = (kernel,) * spatial, (stride,) * spatial, (padding,) * spatial
    term = affine.avg_pool(3, k, s, p)
    assert term.groups == 3 and term.weight.shape == (3, 1, *k)
    assert_exact(term, x, AVG[spatial](x, kernel, stride, padding, count_include_pad=True))


def test_avg_pool_merges_and_composes():
    """PoolFormer ``pool(x) - x`` and a 1x1 before a pool, with BN after."""
    r = Rand(43)
    x = r.t(2, 3, 6, 6)
    pool = affine.avg_pool(3, (3, 3), (1, 1), (1, 1))
    ref_pool = lambda t: F.avg_pool2d(t, 3, 1, 1, count_include_pad=True)
    mixer = affine.merge([pool, affine.identity()], [1.0, -1.0])
    assert_exact(mixer, x, ref_pool(x) - x)
    point, bn = r.conv(3, 3, 1, bias=False), r.bn(3)
    chain = affine.compose(affine.compose(point.term(), pool), bn.term())
    assert_exact(chain, x, bn(ref_pool(point(x))))


def test_avg_pool_refusals():
    r = Rand(44)
    pool = affine.avg_pool(3, (3, 3), (1, 1), (1, 1))
    with not_exact("zero-padded conv changes the border"):
        affine.compose(r.bn(3).term(), pool)
    with not_exact("compose only when one of them is 1x1"):
        affine.compose(r.conv(3, 3, 3).term(), pool)


# ---- asymmetric windows ------------------------------------------------------------------------

@pytest.mark.parametrize("kernel, dilation", [((2, 2), 1), ((4, 3), 1), ((2, 4), 2)])
def test_asymmetric_conv_same_padding(kernel, dilation):
    r = Rand(45)
    weight, bias = r.t(4, 3, *kernel), r.t(4)
    pads = tuple((dilation * (k - 1) // 2, dilation * (k - 1) - dilation * (k - 1) // 2)
                 for k in kernel)
    term = affine.asymmetric_conv(weight, bias, (1, 1), pads, (dilation,) * 2, 1)
    x = r.t(2, 3, 7, 8)
    expected = F.conv2d(x, weight, bias, 1, "same", dilation)
    assert term.padding == tuple(max(p) for p in pads)
    assert term.written_kernel == kernel and term.macs == weight.numel()
    assert_exact(term, x, expected)  # the symmetric conv with zero taps
    assert rel_err(apply_written(term, x), expected) <= RTOL  # as it is written: trimmed
    # BN after it and a 1x1 after that keep the zero taps
    bn, point = r.bn(4), r.conv(4, 5, (1, 1))
    chain = affine.compose(affine.compose(term, bn.term()), point.term())
    assert chain.zero_taps == term.zero_taps
    assert rel_err(apply_written(chain, x), point(bn(expected))) <= RTOL


def test_asymmetric_convs_merge_keeping_unreached_taps():
    """A 2x2 and a 4x4 ``padding='same'`` conv: the merged 5x5 lattice keeps its first
    row and column of zero taps, so it is written as a 4x4 with pads (1, 2)."""
    r = Rand(46)
    w2, w4 = r.t(3, 3, 2, 2), r.t(3, 3, 4, 4)
    t2 = affine.asymmetric_conv(w2, None, (1, 1), ((0, 1), (0, 1)), (1, 1), 1)
    t4 = affine.asymmetric_conv(w4, r.t(3), (1, 1), ((1, 2), (1, 2)), (1, 1), 1)
    merged = affine.merge([t2, t4, affine.identity()], [1.0, 1.0, 1.0])
    assert merged.kernel == (5, 5) and merged.written_kernel == (4, 4)
    assert merged.written_padding == ((1, 2), (1, 2))
    x = r.t(2, 3, 6, 7)
    expected = F.conv2d(x, w2, None, 1, "same") + F.conv2d(x, w4, t4.bias, 1, "same") + x
    assert_exact(merged, x, expected)
    assert rel_err(apply_written(merged, x), expected) <= RTOL
    assert merged.written_macs <= merged.macs + 3 * 3  # (the identity's taps)


def test_asymmetric_padding_off_the_dilation_lattice_is_refused():
    r = Rand(47)
    with not_exact("no whole number of dilated taps"):
        affine.asymmetric_conv(r.t(3, 3, 2), None, (1,), ((0, 1),), (2,), 1)


def test_symmetric_pads_give_a_plain_conv():
    r = Rand(48)
    term = affine.asymmetric_conv(r.t(3, 3, 3, 3), None, (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    assert term.zero_taps == () and term.padding == (1, 1)


# ---- zero_pad after a 1x1 conv (the padded grid) ----------------------------------------------

def test_pad_after_1x1_conv_with_its_zero_response():
    """DiverseBranchBlock: 1x1 conv, BN, pad with BN(bias) (what the conv gives for 0):
    one 1x1 conv that pads its input, running on border positions the original did not
    compute (``padded_grid``: more MACs until a conv or sum takes the padding back)."""
    r = Rand(49)
    point, bn = r.conv(3, 4, 1), r.bn(4)
    x = r.t(2, 3, 5, 5)
    conv_bn = affine.compose(point.term(), bn.term())
    border = conv_bn.bias  # conv_bn(0)
    term = affine.compose(conv_bn, affine.zero_pad((1, 1), border))
    assert term.padded_grid and term.padding == (1, 1) and affine.adds_macs(term)
    y = bn(point(x))
    expected = F.pad(y - border[:, None, None], [1] * 4) + border[:, None, None]
    assert_exact(term, x, expected)
    # the kxk conv after it takes the padding back: 1x1 then kxk, exact (the 1x1's border
    # is its bias), and no longer on a padded grid
    k3 = r.conv(4, 5, 3)
    whole = affine.compose(term, k3.term())
    assert not whole.padded_grid and whole.padding == (1, 1)
    assert_exact(whole, x, k3(expected))


def test_pad_after_1x1_conv_with_other_values_is_refused():
    r = Rand(50)
    conv_bn = affine.compose(r.conv(3, 4, 1).term(), r.bn(4).term())
    with not_exact("values other than its output for a zero input"):
        affine.compose(conv_bn, affine.zero_pad((1, 1)))


# ---- padding modes other than zeros ---------------------------------------------------------

def test_reflect_padded_conv_takes_what_follows_it_only():
    r = Rand(54)
    weight, bias, bn = r.t(4, 3, 3, 3), r.t(4), r.bn(4)
    term = affine.conv(weight, bias, 1, 1, 1, 1, padding_mode="reflect")
    x = r.t(2, 3, 6, 6)
    after = affine.compose(term, bn.term())
    assert after.padding_mode == "reflect"
    expected = bn(F.conv2d(F.pad(x, [1] * 4, mode="reflect"), weight, bias))
    got = F.conv2d(F.pad(x, [1] * 4, mode="reflect"), after.weight.value(), after.bias)
    assert rel_err(got, expected) <= RTOL
    with not_exact("nothing folds into a conv with padding_mode='reflect'"):
        affine.compose(affine.channel_affine(r.t(3)), term)
    with not_exact("padding_mode='reflect'"):
        affine.compose(r.conv(3, 3, 1, bias=False).term(), term)
    with not_exact("branches with padding_mode='reflect' never merge"):
        affine.merge([term, r.conv(3, 4, 1).term()], [1.0, 1.0])


# ---- lazy weights ----------------------------------------------------------------------------

class Counting:
    """A weight whose computations are counted."""

    def __init__(self, tensor):
        self.tensor, self.calls = tensor, 0

    def __call__(self):
        self.calls += 1
        return self.tensor.clone()


def test_weights_are_computed_only_when_written():
    r = Rand(51)
    w3, w1 = Counting(r.t(4, 4, 3, 3)), Counting(r.t(4, 4, 1, 1))
    b3, b1, scale, w_out = r.t(4), r.t(4), r.t(4), r.t(6, 4, 1, 1)
    t3 = affine.conv(affine.Weight(w3.tensor.shape, w3), b3, 1, 1, 1, 1)
    t1 = affine.conv(affine.Weight(w1.tensor.shape, w1), b1, 1, 0, 1, 1)
    bn3, bn1, bn0 = r.bn(4), r.bn(4), r.bn(4)
    scaled = affine.compose(affine.channel_affine(scale), t3)
    merged = affine.merge([affine.compose(scaled, bn3.term()), affine.compose(t1, bn1.term()),
                           bn0.term()], [1.0, 1.0, 1.0])
    whole = affine.compose(merged, affine.conv(w_out, None, 1, 0, 1, 1))
    assert (w3.calls, w1.calls) == (0, 0)  # shapes only, so far
    assert whole.weight.shape == (6, 4, 3, 3)
    x = r.t(2, 4, 5, 5)
    expected = F.conv2d(bn3(F.conv2d(x * scale[:, None, None], w3.tensor, b3, padding=1))
                        + bn1(F.conv2d(x, w1.tensor, b1)) + bn0(x), w_out)
    assert_exact(whole, x, expected)
    assert (w3.calls, w1.calls) == (1, 1)  # each computed once, when written
    whole.weight.value()
    assert (w3.calls, w1.calls) == (2, 2)  # nothing cached


def test_weight_value_is_a_fresh_float64_copy():
    r = Rand(52)
    model_tensor = r.t(3, 2, 3).float()
    weight = affine.Weight.of(model_tensor)
    first = weight.value()
    assert first.dtype == D and torch.equal(first, model_tensor.double())
    first.mul_(0)  # the caller owns it
    assert weight.value().abs().sum() > 0 and model_tensor.abs().sum() > 0
    # scaled on the model's float32 tensor: computed in float64 (an exact widening)
    factor = r.t(3, 1, 1)
    assert torch.equal(weight.scaled(factor).value(), model_tensor.double() * factor)
    loaded = affine.Weight.loaded((3, 2, 3), lambda: model_tensor)
    assert loaded.value().dtype == D and loaded.shape == (3, 2, 3) and loaded.numel() == 18
    assert weight.reshaped((3, 6)).value().shape == (3, 6)


def test_refusals_compute_no_weight():
    """The MAC gates and alignment checks read shapes only: a refused merge or
    composition never computes a weight."""
    r = Rand(53)

    def never():
        raise AssertionError("a weight was computed for a refused rewrite")
    dw = affine.conv(affine.Weight((8, 1, 3, 3), never), None, 1, 1, 1, 8)
    dense = affine.conv(affine.Weight((8, 8, 1, 1), never), None, 1, 0, 1, 1)
    with not_exact("would increase MACs"):
        affine.merge([dw, dense], [1.0, 1.0])
    with not_exact("different centre offsets"):
        affine.merge([dw, affine.conv(affine.Weight((8, 8, 1, 1), never), None, 1, 1, 1, 1)],
                     [1.0, 1.0])
    narrow = affine.conv(affine.Weight((1, 8, 3, 3), never), None, 1, 0, 1, 1)
    with not_exact("would increase MACs"):
        affine.compose(narrow, affine.conv(affine.Weight((64, 1, 1, 1), never), None, 1, 0, 1, 1))
    with not_exact("changes the border"):
        affine.compose(r.bn(8).term(), dw)


# ---- hypothesis: composition ------------------------------------------------------------------

KINDS = ("conv", "pointwise", "bn", "scale", "pad", "crop", "conv_t")


AFFINE_KINDS = ("bn", "scale", "pad", "crop")


@st.composite
def composable(draw, kinds: tuple[str, str]):
    """Two ops of ``kinds`` that chain on channel count, and a seed for their tensors."""
    spatial = draw(st.sampled_from([1, 2]))
    cin = draw(st.sampled_from([1, 2, 4]))
    specs = []
    for kind in kinds:
        cout = cin if kind in AFFINE_KINDS else draw(st.sampled_from([1, 2, 4]))
        pointwise = kind == "pointwise"
        specs.append(dict(
            kind=kind, cin=cin, cout=cout,
            groups=draw(st.sampled_from([g for g in (1, 2) if cin % g == 0 and cout % g == 0])),
            k=1 if pointwise else draw(st.sampled_from([1, 3])),
            stride=draw(st.sampled_from([1, 1, 2] if pointwise else [1, 2])),
            padding=draw(st.sampled_from([0, 0, 1] if pointwise else [0, 1, 2])),
            dilation=1 if pointwise else draw(st.sampled_from([1, 2])),
            output_padding=draw(st.booleans()),
            bias=draw(st.booleans()), pad=draw(st.integers(1, 2))))
        cin = cout
    return spatial, specs, draw(st.integers(0, 2**16 - 1))


def _build(spec: dict, spatial: int, r: Rand):
    """(term, reference function) of one spec."""
    kind, cin, cout, g = spec["kind"], spec["cin"], spec["cout"], spec["groups"]
    if kind in ("conv", "pointwise"):
        conv = r.conv(cin, cout, (spec["k"],) * spatial, spec["stride"], spec["padding"],
                      spec["dilation"], g, spec["bias"])
        return conv.term(), conv
    if kind == "bn":
        bn = r.bn(cin)
        return bn.term(), bn
    if kind == "scale":
        s = r.t(cin)
        return affine.channel_affine(s), lambda x: x * channel_view(s, x.dim())
    if kind == "pad":
        p = (spec["pad"],) * spatial
        return affine.zero_pad(p), lambda x: F.pad(x, pad_arg(p))
    if kind == "crop":
        return affine.zero_pad((-1,) * spatial), lambda x: crop(x, (1,) * spatial)
    weight, bias = r.t(cin, cout // g, *(spec["k"],) * spatial), r.t(cout)
    stride, padding = spec["stride"], min(spec["padding"], spec["k"] - 1)
    out_pad = stride - 1 if spec["output_padding"] else 0
    term = affine.conv_transpose(weight, bias, stride, padding, out_pad, 1, g)
    return term, lambda x: CONV_T[spatial](x, weight, bias, stride, padding, out_pad, g)


# what the docstring says may refuse a composition (anything else is a bug)
COMPOSE_REASONS = ("changes the border", "is not a conv padding", "crop before a zero-padded",
                   "would increase MACs", "compose only when one of them is 1x1",
                   "1x1 conv with bias before a zero-padded conv", "transposed conv",
                   "zero padding after a crop", "values other than its output",
                   "border value other than the shift", "two paddings with different values")


# pairs the docstring calls always exact: they never raise
ALWAYS_EXACT = {(a, b) for a in ("conv", "pointwise", "conv_t") for b in ("bn", "scale")} | {
    (a, b) for a in AFFINE_KINDS for b in AFFINE_KINDS if (a, b) != ("crop", "pad")} | {
    ("scale", b) for b in ("conv", "pointwise", "conv_t")} | {
    ("pad", b) for b in ("conv", "pointwise")}


@pytest.mark.parametrize("second", KINDS)
@pytest.mark.parametrize("first", KINDS)
@settings(deadline=None)
@given(data=st.data())
def test_property_compose_is_exact_or_refused(first, second, data):
    spatial, specs, seed = data.draw(composable((first, second)))
    note(f"spatial={spatial} {specs} seed={seed}")
    r = Rand(seed)
    (t1, f1), (t2, f2) = (_build(s, spatial, r) for s in specs)
    kinds = tuple(s["kind"] for s in specs)
    x = r.t(2, specs[0]["cin"], *(9,) * spatial)
    try:
        expected = f2(f1(x))
    except RuntimeError:  # (the original ops do not run on this size: nothing to compare)
        return
    if expected.numel() == 0:
        return
    try:
        term = affine.compose(t1, t2)
    except affine.NotExact as reason:
        event(f"refused: {kinds}")
        assert any(why in str(reason) for why in COMPOSE_REASONS), str(reason)
        assert kinds not in ALWAYS_EXACT, f"{kinds} is always exact, refused: {reason}"
        if kinds == ("bn", "conv") and specs[1]["padding"] == 0:
            raise AssertionError(f"BN before an unpadded conv is always exact: {reason}")
        return
    event(f"composed: {kinds}")
    if isinstance(term, affine.ConvTerm):  # (the gate allows a composition some headroom)
        assert term.written_macs <= affine.COMPOSE_HEADROOM * term.macs
    err = rel_err(apply(term, x), expected)
    assert err <= RTOL, f"relative error {err:.3g}"


# ---- hypothesis: merging ----------------------------------------------------------------------

@st.composite
def mergeable(draw, layout: str):
    """Branches over one input (convs, identities, BatchNorms, average pools) with random
    signs. ``layout``: "aligned" (stride 1, every window centred), "strided" (stride 2, a
    common centre offset) or "misaligned" (some branches off by one)."""
    spatial = draw(st.sampled_from([1, 2]))
    channels = draw(st.sampled_from([2, 4]))
    stride = 2 if layout == "strided" else 1
    centre = draw(st.sampled_from([0, 1])) if layout == "strided" else 0
    dilation = draw(st.sampled_from([1, 2]))
    kinds = ["conv", "conv", "avgpool"] + (["identity", "bn"] if stride == 1 else [])
    branches = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(kinds))
        k = draw(st.sampled_from([1, 3, 5] if kind == "conv" else [1, 3]))
        d = 1 if kind == "avgpool" else draw(st.sampled_from([dilation, dilation, 1]))
        padding = centre + d * (k - 1) // 2
        if layout == "misaligned":
            padding += draw(st.sampled_from([0, 1]))
        branches.append(dict(kind=kind, k=k, dilation=d, padding=padding,
                             groups=draw(st.sampled_from([1, 2, channels])),
                             bias=draw(st.booleans()),
                             sign=draw(st.sampled_from([1.0, -1.0, 0.5]))))
    return spatial, channels, stride, branches, draw(st.integers(0, 2**16 - 1))


MERGE_REASONS = ("different strides", "different centre offsets", "common dilation lattice",
                 "would increase MACs")


@pytest.mark.parametrize("layout", ["aligned", "strided", "misaligned"])
@settings(deadline=None)
@given(data=st.data())
def test_property_merge_is_exact_or_refused(layout, data):
    spatial, c, stride, branches, seed = data.draw(mergeable(layout))
    note(f"spatial={spatial} c={c} stride={stride} {branches} seed={seed}")
    r = Rand(seed)
    terms, refs = [], []
    for b in branches:
        if b["kind"] == "conv":
            conv = r.conv(c, c, (b["k"],) * spatial, stride, b["padding"], b["dilation"],
                          b["groups"], b["bias"])
            terms.append(conv.term())
            refs.append(conv)
        elif b["kind"] == "identity":
            terms.append(affine.identity())
            refs.append(lambda x: x)
        elif b["kind"] == "bn":
            bn = r.bn(c)
            terms.append(bn.term())
            refs.append(bn)
        else:
            k, p = b["k"], min(b["padding"], b["k"] // 2)
            terms.append(affine.avg_pool(c, (k,) * spatial, (stride,) * spatial, (p,) * spatial))
            refs.append(lambda x, k=k, p=p: AVG[spatial](x, k, stride, p, count_include_pad=True))
    x = r.t(2, c, *(9,) * spatial)
    signs = [b["sign"] for b in branches]
    outputs = [ref(x) for ref in refs]
    same_size = len({out.shape for out in outputs}) == 1
    try:
        merged = affine.merge(terms, signs)
    except affine.NotExact as reason:
        event(f"refused: {str(reason)[:40]}")
        assert any(why in str(reason) for why in MERGE_REASONS), str(reason)
        convs = [t for t in terms if isinstance(t, affine.ConvTerm)]
        one_shape = len({(t.groups, t.dilation if max(t.kernel) > 1 else None)
                         for t in convs}) <= 1
        centred = all(2 * t.padding[0] == t.dilation[0] * (t.kernel[0] - 1) for t in convs)
        assert not (stride == 1 and centred and one_shape), \
            f"centred branches of one grouping and dilation refused: {reason}"
        return
    event("merged")
    assert not affine.adds_macs(merged), "a merge that costs more than its branches"
    assert same_size, "merged branches whose outputs have different sizes"
    expected = sum(sign * out for sign, out in zip(signs, outputs))
    actual = apply(merged, x)
    # (relative to the branches' outputs: their sum may cancel, as pool(x) - pool(x) does)
    scale = max(out.abs().max().item() for out in outputs)
    assert actual.shape == expected.shape
    err = (actual - expected).abs().max().item() / scale
    assert err <= RTOL, f"relative error {err:.3g}"
