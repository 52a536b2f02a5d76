"""The two kinds of affine term, their constructors and the helpers the rules share.

``ChannelAffine(scale, shift, padding)`` is a per-channel map (with optional zero padding
or crop), ``ConvTerm`` a conv with zero padding in 0 (linear) to 3 spatial dims,
``TransposedConvTerm`` a transposed conv. Everything is float64; a term's weight is a
:class:`Weight`, a recipe computed only when the term is written. The rules that combine
terms (``compose``, ``merge``) and their math are in :mod:`reparam_fx.core.affine`, which
also re-exports every name here: frontends use ``affine.<name>`` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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


def all_close(a: torch.Tensor | None, b: torch.Tensor | None, rtol: float) -> bool:
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
    return with_fields(term, macs=float(weight.numel()), zero_taps=tuple(taps))


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

def with_fields(term, **changes):
    """A copy of a (frozen) term with some fields changed; ``dataclasses.replace``
    re-runs ``__init__`` and is ~10x slower, which shows on 100k-node graphs."""
    new = object.__new__(type(term))
    new.__dict__.update(term.__dict__)
    new.__dict__.update(changes)
    return new


def is_zero(t: torch.Tensor | None) -> bool:
    return t is None or not bool(t.any())


def channel_vector(t: torch.Tensor, channels: int, what: str) -> torch.Tensor:
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
    return with_fields(term, weight=Weight((out, ratio * cin_g, *kernel), compute), groups=groups)


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


