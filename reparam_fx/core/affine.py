"""Exact affine algebra of conv-shaped maps. Pure tensor math: no graph code here.

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
from dataclasses import dataclass, field
from functools import reduce

import torch

DOUBLE = torch.float64


class NotExact(Exception):
    """A rewrite was declined; ``str(exc)`` says why, in words a user understands."""


def _as_double(value) -> torch.Tensor:
    """A float64 CPU *copy* (never an alias: the algebra may work in place on it)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", DOUBLE, copy=True)
    return torch.tensor(value, dtype=DOUBLE)


class Weight:
    """A float64 weight: its ``shape`` now, its values when :meth:`value` is called.

    ``value()`` computes them from the model's own tensor through the steps recorded
    (scalings, regroupings, products, sums) and returns a fresh CPU tensor that the caller
    owns and may change in place; nothing is cached, so a weight no region writes is never
    computed and a written one lives only until its module holds the cast result."""

    __slots__ = ("shape", "_compute", "_source")

    def __init__(self, shape, compute, source=None):
        self.shape = torch.Size(shape)
        self._compute = compute
        self._source = source  # () -> the model's tensor, if this weight is no more than it

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "Weight":
        """The weight ``tensor`` holds (read, never copied, until computed)."""
        tensor = tensor.detach()
        return cls.loaded(tensor.shape, lambda: tensor)

    @classmethod
    def loaded(cls, shape, load) -> "Weight":
        """The weight ``load()`` returns (in the model's dtype), e.g. read from a file."""
        return cls(shape, lambda: load().to("cpu", DOUBLE, copy=True), load)

    def value(self) -> torch.Tensor:
        return self._compute()

    def numel(self) -> int:
        return math.prod(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def scaled(self, factor: torch.Tensor) -> "Weight":
        """``weight * factor`` (``factor``: float64, broadcast to the weight's shape). On
        the model's tensor it is one pass: the product of a float32 and a float64 tensor
        is computed in float64 (an exact widening), so no float64 copy comes first."""
        load = self._source
        if load is not None and factor.dim() > 0 and factor.dtype == DOUBLE:
            return Weight(self.shape, lambda: torch.mul(load().to("cpu"), factor))
        return Weight(self.shape, lambda: self.value().mul_(factor))

    def reshaped(self, shape) -> "Weight":
        return Weight(shape, lambda: self.value().reshape(shape))


# ---- the two kinds of term -----------------------------------------------------------

@dataclass(frozen=True)
class ChannelAffine:
    """``y = pad(scale * x + shift, padding, value=border)`` along the channel axis."""

    scale: torch.Tensor  # 0-d or (C,)
    shift: torch.Tensor | None = None  # 0-d or (C,), None means 0
    padding: tuple[int, ...] = ()  # symmetric padding (> 0) or crop (< 0) per trailing dim
    border: torch.Tensor | None = None  # 0-d or (C,): the padded positions' value, None: 0
    border_rtol: float = field(default=0.0, compare=False)  # the model's rounding of it

    @property
    def channels(self) -> int | None:
        sizes = {t.numel() for t in (self.scale, self.shift, self.border)
                 if t is not None and t.dim() > 0}
        return sizes.pop() if len(sizes) == 1 else None


class _Kernel:
    """What convs and transposed convs share: ``weight`` is ``(.., .., *kernel)``."""

    weight: Weight
    bias: torch.Tensor | None

    @property
    def spatial(self) -> int:
        return self.weight.dim() - 2

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    def weights_as(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight (computed now) and bias cast to ``like``'s dtype and device."""
        cast = lambda t: None if t is None else t.to(dtype=like.dtype, device=like.device)
        return cast(self.weight.value()), cast(self.bias)


@dataclass(frozen=True)
class ConvTerm(_Kernel):
    """``y = conv(x, weight, bias)`` with zero padding; ``macs`` is the original ops' cost."""

    weight: Weight  # (out, in/groups, *kernel), float64
    bias: torch.Tensor | None
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    macs: float = field(default=0.0, compare=False)
    padding_mode: str = "zeros"  # non-zero modes fold what follows them, never merge
    padded_grid: bool = False  # a 1x1 conv whose padding came after it: it now runs on
    #                            border positions the original did not compute (more MACs)
    zero_taps: tuple = ()  # per spatial dim, (leading, trailing) kernel taps known to be 0
    #     for every channel pair: an asymmetric window (an even kernel with
    #     ``padding='same'``) held in a symmetric one (see :func:`asymmetric_conv`)

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def taps(self) -> tuple[tuple[int, int], ...]:
        """``(leading, trailing)`` zero taps per spatial dim (``(0, 0)`` if none known)."""
        return self.zero_taps or ((0, 0),) * self.spatial

    @property
    def written_kernel(self) -> tuple[int, ...]:
        """The kernel that is written: without its known zero taps."""
        return tuple(k - a - b for k, (a, b) in zip(self.kernel, self.taps))

    @property
    def written_padding(self) -> tuple[tuple[int, int], ...]:
        """``(before, after)`` padding per dim of the written kernel: symmetric unless
        zero taps were trimmed from one side only."""
        return tuple((p - a * d, p - b * d) for p, (a, b), d in
                     zip(self.padding, self.taps, self.dilation))

    @property
    def written_macs(self) -> int:
        """What the written conv costs per output position."""
        return self.weight.shape[0] * self.weight.shape[1] * math.prod(self.written_kernel)

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def is_pointwise(self) -> bool:
        return all(k == 1 for k in self.kernel)


@dataclass(frozen=True)
class TransposedConvTerm(_Kernel):
    """``y = conv_transpose(x, weight, bias)``; ``weight`` is ``(in, out/groups, *kernel)``."""

    weight: Weight  # (in, out/groups, *kernel), float64
    bias: torch.Tensor | None
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    output_padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    macs: float = field(default=0.0, compare=False)

    @property
    def in_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[1] * self.groups


Term = ChannelAffine | ConvTerm | TransposedConvTerm


# ---- constructors --------------------------------------------------------------------

IDENTITY = ChannelAffine(torch.tensor(1.0, dtype=DOUBLE))  # terms are never changed in place


def identity() -> ChannelAffine:
    return IDENTITY


def channel_affine(scale=1.0, shift=None) -> ChannelAffine:
    return ChannelAffine(_as_double(scale), None if shift is None else _as_double(shift))


def batchnorm(mean, var, weight, bias, eps: float) -> ChannelAffine:
    """Eval-mode BatchNorm: ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s``."""
    scale = (_as_double(var) + eps).rsqrt_()
    if weight is not None:
        scale.mul_(_as_double(weight))
    shift = _as_double(mean).mul_(scale).neg_()
    if bias is not None:
        shift.add_(_as_double(bias))
    return ChannelAffine(scale, shift)


def zero_pad(padding: tuple[int, ...], border=None) -> ChannelAffine:
    """Padding (> 0) with zeros, or with ``border`` per channel; cropping (< 0). A border
    the model computed is known to 8 ulps of its dtype (``border_rtol``)."""
    if border is None:
        return ChannelAffine(_as_double(1.0), None, tuple(padding))
    ulps = 8 * torch.finfo(border.dtype).eps if border.is_floating_point() else 0.0
    return ChannelAffine(_as_double(1.0), None, tuple(padding), _as_double(border), ulps)


def _close(a: torch.Tensor | None, b: torch.Tensor | None, rtol: float) -> bool:
    """Equal up to the model's rounding (``rtol`` of the largest value; 0: exactly): a
    border value the model computed (``beta - mean * gamma / std`` in its dtype) against
    the same expression computed here in float64."""
    a = torch.zeros((), dtype=DOUBLE) if a is None else a
    b = torch.zeros((), dtype=DOUBLE) if b is None else b
    scale = max(float(a.abs().max()), float(b.abs().max()))
    return bool(((a - b).abs() <= rtol * scale).all())


def conv(weight, bias, stride, padding, dilation, groups: int,
         padding_mode: str = "zeros") -> ConvTerm:
    weight = weight if isinstance(weight, Weight) else Weight.of(weight)
    spatial = weight.dim() - 2
    expand = lambda v: tuple(int(i) for i in v) if isinstance(v, (tuple, list)) else (int(v),) * spatial
    return ConvTerm(weight, None if bias is None else _as_double(bias), expand(stride),
                    expand(padding), expand(dilation), int(groups), macs=float(weight.numel()),
                    padding_mode=padding_mode)


def asymmetric_conv(weight, bias, stride, pads: tuple[tuple[int, int], ...], dilation,
                    groups: int) -> ConvTerm:
    """A conv padded by ``(before, after)`` per dim (``padding='same'`` with an even
    kernel pads one more after than before) as a symmetric conv: the kernel is extended
    with zero taps on the side that pads less, by ``|after - before| / dilation`` taps, so
    that every output position reads the same inputs with the same weights, for every
    input size. The zero taps are recorded (``zero_taps``) and trimmed again when the conv
    is written; its cost stays the original kernel's."""
    weight = weight if isinstance(weight, Weight) else Weight.of(weight)
    spatial = weight.dim() - 2
    dilation = tuple(int(d) for d in dilation)
    padding, taps = [], []
    for (before, after), d in zip(pads, dilation):
        if (after - before) % d:
            raise NotExact("an asymmetric padding that is no whole number of dilated taps")
        padding.append(max(before, after))
        taps.append(((max(before, after) - before) // d, (max(before, after) - after) // d))
    kernel = [k + a + b for k, (a, b) in zip(weight.shape[2:], taps)]
    shape = (*weight.shape[:2], *kernel)
    if tuple(shape) == tuple(weight.shape):
        return conv(weight, bias, stride, tuple(padding), dilation, groups)

    def embedded():
        full = torch.zeros(shape, dtype=DOUBLE)
        window = (slice(None), slice(None), *(slice(a, k - b) for k, (a, b) in zip(kernel, taps)))
        full[window] = weight.value()
        return full
    term = conv(Weight(shape, embedded), bias, stride, tuple(padding), dilation, groups)
    return _with(term, macs=float(weight.numel()), zero_taps=tuple(taps))


def conv_transpose(weight, bias, stride, padding, output_padding, dilation,
                   groups: int) -> TransposedConvTerm:
    weight = weight if isinstance(weight, Weight) else Weight.of(weight)
    spatial = weight.dim() - 2
    expand = lambda v: tuple(int(i) for i in v) if isinstance(v, (tuple, list)) else (int(v),) * spatial
    return TransposedConvTerm(weight, None if bias is None else _as_double(bias), expand(stride),
                              expand(padding), expand(output_padding), expand(dilation),
                              int(groups), macs=float(weight.numel()))


def linear(weight, bias) -> ConvTerm:
    """``F.linear`` is a conv with no spatial dims (channel axis last)."""
    return conv(weight, bias, (), (), (), 1)


def avg_pool(channels: int, kernel: tuple[int, ...], stride: tuple[int, ...],
             padding: tuple[int, ...]) -> ConvTerm:
    """Average pooling that counts padded zeros is a depthwise conv with ``1/prod(k)`` taps."""
    shape = (channels, 1, *kernel)
    weight = Weight(shape, lambda: torch.full(shape, 1.0 / math.prod(kernel), dtype=DOUBLE))
    return conv(weight, None, stride, padding, (1,) * len(kernel), channels)


# ---- helpers -------------------------------------------------------------------------

def _with(term, **changes):
    """A copy of a (frozen) term with some fields changed; ``dataclasses.replace``
    re-runs ``__init__`` and is ~10x slower, which shows on 100k-node graphs."""
    new = object.__new__(type(term))
    new.__dict__.update(term.__dict__)
    new.__dict__.update(changes)
    return new


def _is_zero(t: torch.Tensor | None) -> bool:
    return t is None or not bool(t.any())


def _vector(t: torch.Tensor, channels: int, what: str) -> torch.Tensor:
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape(()).expand(channels)
    if t.numel() != channels:
        raise NotExact(f"{what} has {t.numel()} channels, the conv has {channels}")
    return t.reshape(channels)


def regroup(term: ConvTerm, groups: int) -> ConvTerm:
    """The same conv written with fewer groups (``groups`` must divide ``term.groups``).

    Weight columns of group ``q`` land in block ``q mod (G/g)`` of the coarser group's
    input range, zeros elsewhere (block-diagonal expansion).
    """
    G = term.groups
    if groups == G:
        return term
    if G % groups:
        raise ValueError(f"cannot regroup {G} groups into {groups}")
    ratio = G // groups
    out, cin_g = term.out_channels, term.weight.shape[1]
    kernel = term.kernel

    def compute():
        w5 = term.weight.value().reshape(groups, ratio, out // G, cin_g, *kernel)
        w6 = w5.new_zeros(groups, ratio, out // G, ratio, cin_g, *kernel)
        index = torch.arange(ratio)
        # w6[:, r, :, r] = w5[:, r]  for every r (advanced indexing puts r first)
        w6[:, index, :, index] = w5.transpose(0, 1)
        return w6.reshape(out, ratio * cin_g, *kernel)
    return _with(term, weight=Weight((out, ratio * cin_g, *kernel), compute), groups=groups)


def keeps_shape(term: Term) -> bool:
    """Whether ``term`` maps every input to an output of the same shape."""
    if isinstance(term, ChannelAffine):
        return not any(term.padding)
    if term.out_channels != term.in_channels or any(s != 1 for s in term.stride):
        return False
    if isinstance(term, TransposedConvTerm):
        return all(d * (k - 1) + op == 2 * p for k, p, op, d in
                   zip(term.kernel, term.padding, term.output_padding, term.dilation))
    return all(d * (k - 1) == 2 * p for k, p, d in zip(term.kernel, term.padding, term.dilation))


def is_pointwise(term: Term) -> bool:
    """A map of each position's channel vector alone (a channel affine, a linear, a 1x1 conv
    with stride 1 and no padding): it commutes with any move of the other axes."""
    if isinstance(term, ChannelAffine):
        return not term.padding and term.border is None
    return isinstance(term, ConvTerm) and term.is_pointwise and \
        all(s == 1 for s in term.stride) and not any(term.padding)


def pointwise_fits(term: Term, spatial: int) -> bool:
    """Whether :func:`as_pointwise` can write ``term`` for ``spatial`` trailing axes."""
    return isinstance(term, ChannelAffine) or term.spatial == spatial or spatial != 0 \
        or term.groups == 1


def as_pointwise(term: Term, spatial: int) -> Term:
    """A pointwise term written for a tensor with ``spatial`` axes after its channel axis:
    a linear (0) or a 1x1 conv. A grouped 1x1 conv is no linear."""
    if isinstance(term, ChannelAffine) or term.spatial == spatial:
        return term
    if spatial == 0 and term.groups != 1:
        raise NotExact("a grouped 1x1 conv on the last axis is no linear")
    weight = term.weight.reshaped((*term.weight.shape[:2], *(1,) * spatial))
    return ConvTerm(weight, term.bias, (1,) * spatial, (0,) * spatial, (1,) * spatial,
                    term.groups, macs=term.macs)


def repeat_channels(term: ChannelAffine, block: int) -> ChannelAffine:
    """The affine of ``flatten`` applied after it: channel ``c``'s scale and shift on the
    ``block`` positions ``c * block ... c * block + block - 1`` of the merged axis
    (``BatchNorm2d`` then ``flatten(1)``: ``block = H * W``)."""
    if term.padding or term.border is not None:
        raise NotExact("a padded affine cannot be flattened")
    repeat = lambda t: None if t is None or t.dim() == 0 else t.repeat_interleave(block)
    return ChannelAffine(term.scale if term.scale.dim() == 0 else repeat(term.scale),
                         repeat(term.shift) if term.shift is not None else None)


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
        if any(p > 0 for p in second.padding) and not _close(border, second.border, rtol):
            raise NotExact("two paddings with different values")
    return ChannelAffine(scale, shift, _pad_then_pad(first.padding, second.padding),
                         None if _is_zero(border) else border, rtol)


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
        first = _with(first, padding=tuple(p + c * s for p, c, s in
                                           zip(first.padding, crop, first.stride)))
        second = _with(second, padding=())
    out = first.out_channels
    scale = _vector(second.scale, out, "a per-channel scale")
    weight = first.weight.scaled(scale.reshape(out, *(1,) * (first.spatial + 1)))
    bias = None if first.bias is None else first.bias * scale
    if second.shift is not None:
        shift = _vector(second.shift, out, "a per-channel shift")
        bias = shift.clone() if bias is None else bias + shift
    return _with(first, weight=weight, bias=bias)


def _pointwise_then_padding(first: ConvTerm, second: ChannelAffine) -> ConvTerm:
    """Padding after a 1x1 conv: ``pad_v(s * conv1x1(x, W, b) + t)`` is the conv of the
    zero-padded ``x`` when the pad value ``v`` is what the conv gives for a zero input,
    ``s * b + t`` (DiverseBranchBlock pads with the BatchNorm's output for zero)."""
    if not first.is_pointwise or any(s != 1 for s in first.stride) or \
            len(second.padding) > first.spatial or any(p < 0 for p in second.padding) or \
            (first.padding_mode != "zeros" and any(first.padding)):
        raise NotExact("zero padding after a conv is not a conv padding")
    unpadded = _conv_then_affine(first, _with(second, padding=(), border=None))
    if not _close(second.border, unpadded.bias, second.border_rtol):
        raise NotExact("padding after a 1x1 conv with values other than its output for a "
                       "zero input is not a conv padding")
    pads = (0,) * (first.spatial - len(second.padding)) + second.padding
    return _with(unpadded, padding=tuple(p + q for p, q in zip(first.padding, pads)),
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
        padded = _with(second, padding=tuple(a + b for a, b in zip(pads, second.padding)))
        if first.border is None or not any(p > 0 for p in pads):
            return _affine_then_conv(_with(first, padding=(), border=None), padded)
        # pad_b(s x + t) with b == t is s * pad_0(x) + t: the shift reaches the padded
        # positions too, so it folds into the bias if the conv adds no zeros of its own
        if not _close(first.border, first.shift, first.border_rtol):
            raise NotExact("a border value other than the shift before a conv")
        if any(p > 0 for p in second.padding) and not _is_zero(first.shift):
            raise NotExact("a per-channel shift (e.g. BatchNorm) before a zero-padded conv "
                           "changes the border")
        return _fold_affine_into_conv(first, padded)
    if any(p > 0 for p in second.padding) and not _is_zero(first.shift):
        raise NotExact("a per-channel shift (e.g. BatchNorm) before a zero-padded conv "
                       "changes the border")
    return _fold_affine_into_conv(first, second)


def _fold_affine_into_conv(first: ChannelAffine, second: ConvTerm) -> ConvTerm:
    spatial = second.spatial
    cin = second.in_channels
    index = _input_channel_index(second)
    view = (*index.shape, *(1,) * spatial)
    scale = _vector(first.scale, cin, "a per-channel scale")
    weight = second.weight.scaled(scale[index].reshape(view))
    bias = second.bias
    if first.shift is not None:  # the bias needs the weight's values now
        shift = _vector(first.shift, cin, "a per-channel shift")
        extra = second.weight.value().mul_(shift[index].reshape(view)).flatten(1).sum(1)
        bias = extra if bias is None else bias + extra
    return _with(second, weight=weight, bias=bias)


def _compose_transposed(first: Term, second: Term) -> TransposedConvTerm:
    """A transposed conv with a channel affine after it, or a channel scale before it."""
    if isinstance(first, TransposedConvTerm) and isinstance(second, ChannelAffine):
        if second.padding:
            raise NotExact("zero padding after a conv is not a conv padding")
        out, cin_g = first.out_channels, first.in_channels // first.groups
        scale = _vector(second.scale, out, "a per-channel scale")
        # weight row i (input channel) of group g feeds outputs g*out_g ... (g+1)*out_g - 1
        per_row = scale.reshape(first.groups, 1, out // first.groups).expand(
            first.groups, cin_g, out // first.groups).reshape(first.in_channels, -1)
        weight = first.weight.scaled(per_row.reshape(*per_row.shape, *(1,) * first.spatial))
        bias = None if first.bias is None else first.bias * scale
        if second.shift is not None:
            shift = _vector(second.shift, out, "a per-channel shift")
            bias = shift.clone() if bias is None else bias + shift
        return _with(first, weight=weight, bias=bias)
    if isinstance(first, ChannelAffine) and isinstance(second, TransposedConvTerm):
        if first.padding:
            raise NotExact("zero padding before a transposed conv is not one of its paddings")
        if not _is_zero(first.shift):
            raise NotExact("a per-channel shift (e.g. BatchNorm) before a transposed conv: "
                           "output positions are reached by different numbers of taps")
        scale = _vector(first.scale, second.in_channels, "a per-channel scale")
        weight = second.weight.scaled(scale.reshape(-1, *(1,) * (second.spatial + 1)))
        return _with(second, weight=weight)
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
    if any(second.padding) and not _is_zero(first.bias):
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
            parts.append((term, sign * _vector(term.scale, out, "a per-channel scale"), None))
            if term.shift is not None:
                shift = sign * _vector(term.shift, out, "a per-channel shift")
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
