"""Multi-branch blocks described by specs, and the oracle of their merge rule (see
:mod:`reparam_fx.testing`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction

import torch
import torch.nn as nn
import torch.nn.functional as F
from reparam_fx.testing.checks import seeded_generator, randomized




PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
NONLINEARITIES = {"relu": nn.ReLU, "gelu": nn.GELU}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
FUNCTIONAL_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}



# ---- multi-branch blocks ---------------------------------------------------------------

def _per_dim(value, dims: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    value = tuple(int(v) for v in value)
    if len(value) != dims:
        raise ValueError(f"{name} {value} does not have {dims} entries")
    return value


@dataclass(frozen=True)
class BranchSpec:
    """One branch of a :class:`BlockSpec`.

    ``kind`` is ``"conv"`` (conv, then BN if ``bn``, then ``act`` if given), ``"identity"``
    (``nn.Identity``) or ``"bn"`` (a BatchNorm alone: an identity with BN). ``subtract``
    makes the block subtract this branch instead of adding it (RepMixer). Sizes may be ints
    or per-dim tuples; ``padding=None`` means centred (``d*(k-1)//2``); ``padding_mode=None``
    inherits the block's.
    """

    kind: str = "conv"
    kernel_size: int | tuple[int, ...] = 1
    padding: int | tuple[int, ...] | None = None
    dilation: int | tuple[int, ...] = 1
    groups: int = 1
    bias: bool = False
    bn: bool = True
    act: str | None = None
    padding_mode: str | None = None
    subtract: bool = False

    @classmethod
    def conv(cls, kernel_size, *, padding=None, dilation=1, groups=1, bias=False, bn=True,
             act=None, padding_mode=None, subtract=False) -> "BranchSpec":
        return cls("conv", kernel_size, padding, dilation, groups, bias, bn, act, padding_mode, subtract)

    @classmethod
    def identity(cls, *, subtract=False) -> "BranchSpec":
        return cls("identity", bn=False, subtract=subtract)

    @classmethod
    def batchnorm(cls, *, subtract=False) -> "BranchSpec":
        return cls("bn", bn=True, subtract=subtract)

    @property
    def is_conv(self) -> bool:
        return self.kind == "conv"

    def _normalised(self, dims: int, padding_mode: str) -> "BranchSpec":
        if self.kind not in ("conv", "identity", "bn"):
            raise ValueError(f"unknown branch kind {self.kind!r}")
        if not self.is_conv:
            return replace(self, kernel_size=(1,) * dims, padding=(0,) * dims, dilation=(1,) * dims,
                           groups=1, bias=False, bn=self.kind == "bn", act=None, padding_mode="zeros")
        kernel = _per_dim(self.kernel_size, dims, "kernel_size")
        dilation = _per_dim(self.dilation, dims, "dilation")
        if self.padding is None:
            padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
        else:
            padding = _per_dim(self.padding, dims, "padding")
        mode = self.padding_mode or padding_mode
        if mode not in PADDING_MODES:
            raise ValueError(f"unknown padding_mode {mode!r}")
        if self.act is not None and self.act not in NONLINEARITIES:
            raise ValueError(f"unknown nonlinearity {self.act!r}; use one of {sorted(NONLINEARITIES)}")
        return replace(self, kernel_size=kernel, padding=padding, dilation=dilation, padding_mode=mode)

    def centre(self, dim: int) -> Fraction:
        """Centre offset ``p - d*(k-1)/2`` in spatial dim ``dim`` (normalised specs only)."""
        k, p, d = self.kernel_size[dim], self.padding[dim], self.dilation[dim]
        return Fraction(p) - Fraction(d * (k - 1), 2)

    def output_size(self, dim: int, size: int, stride: int) -> int:
        if not self.is_conv:
            return size
        k, p, d = self.kernel_size[dim], self.padding[dim], self.dilation[dim]
        return (size + 2 * p - d * (k - 1) - 1) // stride + 1

    def fits(self, dim: int, size: int) -> bool:
        """Whether torch accepts this branch's padding at input size ``size``."""
        if not self.is_conv:
            return True
        p = self.padding[dim]
        if self.padding_mode == "reflect":
            return p < size
        if self.padding_mode == "circular":
            return p <= size
        return True

    def describe(self) -> str:
        sign = "-" if self.subtract else "+"
        if not self.is_conv:
            return f"{sign}{self.kind}"
        k = "x".join(map(str, self.kernel_size))
        text = f"{sign}conv{k}"
        if any(p for p in self.padding):
            text += f" p{','.join(map(str, self.padding))}"
        if any(d > 1 for d in self.dilation):
            text += f" d{','.join(map(str, self.dilation))}"
        if self.groups > 1:
            text += f" g{self.groups}"
        if self.padding_mode != "zeros":
            text += f" {self.padding_mode}"
        if self.bias:
            text += " bias"
        if self.bn:
            text += " +bn"
        if self.act:
            text += f" +{self.act}"
        return text


@dataclass(frozen=True)
class _Term:
    """A linear term of a sum, as the merge rule sees it."""

    kernel: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: int
    groups: int
    out_channels: int
    padding_mode: str
    is_conv: bool
    act: bool

    def centre(self, dim: int) -> Fraction:
        return Fraction(self.padding[dim]) - Fraction(self.dilation[dim] * (self.kernel[dim] - 1), 2)


def merge_refusal(terms: list[_Term], in_channels: int) -> str | None:
    """Why a sum of ``terms`` over one input does NOT merge into one conv (None: it does).

    The rule of the module docstring, written independently of the engine.
    """
    if any(term.act for term in terms):
        return "a branch contains a nonlinearity"
    if len(terms) <= 1 or not any(term.is_conv for term in terms):
        return None  # one term is a chain; identities and BNs sum to a per-channel affine
    if any(term.is_conv and term.padding_mode != "zeros" for term in terms):
        return "a conv branch has a non-zeros padding_mode"
    if len({term.stride for term in terms}) > 1:
        return "branches have different strides"
    dims = len(terms[0].kernel)
    if any(len({term.centre(dim) for term in terms}) > 1 for dim in range(dims)):
        return "branches have different centre offsets"
    if len({term.out_channels for term in terms}) > 1:
        return "branches have different output channels"
    merged_kernel = []
    for dim in range(dims):
        dilations = [term.dilation[dim] for term in terms if term.kernel[dim] > 1]
        lattice = math.gcd(*dilations) if dilations else 1
        top = max(term.padding[dim] for term in terms)
        for term in terms:
            if (top - term.padding[dim]) % lattice or (term.kernel[dim] > 1 and term.dilation[dim] % lattice):
                return "kernel taps do not lie on one dilated lattice"
        span = 2 * (top - terms[0].centre(dim))
        if span.denominator != 1 or span.numerator % lattice:
            return "kernel taps do not lie on one dilated lattice"
        merged_kernel.append(span.numerator // lattice + 1)
    convs = [term for term in terms if term.is_conv]
    out_channels = terms[0].out_channels
    groups = math.gcd(*[term.groups for term in convs])
    merged = out_channels * (in_channels // groups) * math.prod(merged_kernel)
    separate = sum(out_channels * (in_channels // term.groups) * math.prod(term.kernel) for term in convs)
    if merged > separate:
        return "would increase MACs"
    return None


class MultiBranchBlock(nn.Module):
    """``act(x? + layer_scale * post_bn(sum_i +-branch_i(x)))``, built by :meth:`BlockSpec.build`."""

    def __init__(self, spec: "BlockSpec"):
        super().__init__()
        self.signs = tuple(not branch.subtract for branch in spec.branches)
        branches = []
        for branch in spec.branches:
            if branch.kind == "identity":
                branches.append(nn.Identity())
            elif branch.kind == "bn":
                branches.append(BATCHNORM[spec.dims](spec.in_channels))
            else:
                layers = [CONV[spec.dims](spec.in_channels, spec.out_channels, branch.kernel_size,
                                           stride=spec.stride, padding=branch.padding,
                                           dilation=branch.dilation, groups=branch.groups,
                                           bias=branch.bias, padding_mode=branch.padding_mode)]
                if branch.bn:
                    layers.append(BATCHNORM[spec.dims](spec.out_channels))
                if branch.act:
                    layers.append(NONLINEARITIES[branch.act]())
                branches.append(nn.Sequential(*layers))
        self.branches = nn.ModuleList(branches)
        self.post_bn = BATCHNORM[spec.dims](spec.out_channels) if spec.post_bn else None
        if spec.layer_scale:
            self.layer_scale = nn.Parameter(torch.ones((spec.out_channels,) + (1,) * spec.dims))
        else:
            self.layer_scale = None
        self.residual = spec.residual
        self.act = NONLINEARITIES[spec.post_act]() if spec.post_act else None

    def forward(self, x):
        out = None
        for branch, positive in zip(self.branches, self.signs):
            y = branch(x)
            if out is None:
                out = y
            elif positive:
                out = out + y
            else:
                out = out - y
        if self.post_bn is not None:
            out = self.post_bn(out)
        if self.layer_scale is not None:
            out = self.layer_scale * out
        if self.residual:
            out = x + out
        if self.act is not None:
            out = self.act(out)
        return out


@dataclass(frozen=True)
class BlockSpec:
    """A multi-branch block over one input, and what its fusion must produce.

    ``out = post_act(x [if residual] + layer_scale * post_bn(sum of +-branches(x)))`` where
    every bracketed part is optional. All conv branches share ``stride``; ``padding_mode``
    is the default for conv branches that do not set their own. ``size`` is the spatial size
    :meth:`example_input` uses (None: the smallest valid size >= 6, >= 4 in 3d).
    """

    dims: int
    in_channels: int
    out_channels: int
    branches: tuple[BranchSpec, ...]
    stride: int = 1
    padding_mode: str = "zeros"
    post_bn: bool = False
    layer_scale: bool = False
    residual: bool = False
    post_act: str | None = None
    size: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1, 2 or 3, not {self.dims}")
        branches = tuple(branch._normalised(self.dims, self.padding_mode) for branch in self.branches)
        object.__setattr__(self, "branches", branches)
        if not branches:
            raise ValueError("a block needs at least one branch")
        if branches[0].subtract:
            raise ValueError("the first branch cannot be subtracted (reorder the branches)")
        same_shape = self.stride == 1 and self.in_channels == self.out_channels
        if (any(not branch.is_conv for branch in branches) or self.residual) and not same_shape:
            raise ValueError("identity / BN-only branches and residuals need stride 1 and in == out channels")
        for branch in branches:
            if branch.is_conv and (self.in_channels % branch.groups or self.out_channels % branch.groups):
                raise ValueError(f"groups={branch.groups} does not divide the channels")
        if self.post_act is not None and self.post_act not in NONLINEARITIES:
            raise ValueError(f"unknown nonlinearity {self.post_act!r}")
        if self.size is not None:
            size = _per_dim(self.size, self.dims, "size")
            object.__setattr__(self, "size", size)
            for dim, length in enumerate(size):
                if not self.valid_size(dim, length):
                    raise ValueError(f"branches do not fit or disagree on the output size at size {length} "
                                     f"in dim {dim}")

    # ---- shapes ----

    def valid_size(self, dim: int, size: int) -> bool:
        """Whether input size ``size`` in spatial dim ``dim`` gives every branch (and the
        residual) the same, non-empty output size."""
        if not all(branch.fits(dim, size) for branch in self.branches):
            return False
        sizes = {branch.output_size(dim, size, self.stride) for branch in self.branches}
        if self.residual:
            sizes.add(size)
        return len(sizes) == 1 and min(sizes) >= 1

    def default_size(self) -> tuple[int, ...]:
        if self.size is not None:
            return self.size
        start = 4 if self.dims == 3 else 6
        size = []
        for dim in range(self.dims):
            length = next((n for n in range(start, start + 64) if self.valid_size(dim, n)), None)
            if length is None:
                raise ValueError(f"no input size makes the branches agree in dim {dim}")
            size.append(length)
        return tuple(size)

    def example_input(self, batch: int = 2, size=None, *, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A seeded ``N(0, 1)`` input of shape ``(batch, in_channels, *size)``."""
        size = self.default_size() if size is None else _per_dim(size, self.dims, "size")
        shape = (batch, self.in_channels) + tuple(size)
        return torch.randn(shape, generator=seeded_generator(seed), dtype=torch.float64).to(dtype)

    def build(self, seed: int = 0) -> MultiBranchBlock:
        """The block in eval mode with seeded random weights, BN statistics and layer scale."""
        return randomized(MultiBranchBlock(self), seed)

    # ---- the oracle ----

    def _terms(self, branches) -> list[_Term]:
        return [_Term(branch.kernel_size, branch.padding, branch.dilation,
                      self.stride if branch.is_conv else 1, branch.groups,
                      self.out_channels if branch.is_conv else self.in_channels,
                      branch.padding_mode, branch.is_conv, branch.act is not None)
                for branch in branches]

    def _identity_term(self) -> _Term:
        return self._terms([BranchSpec.identity()._normalised(self.dims, "zeros")])[0]

    @property
    def _residual_in_sum(self) -> bool:
        """``x + (b0 + b1 + ...)`` with nothing between: one flattened sum."""
        return self.residual and not self.post_bn and not self.layer_scale

    @property
    def _summands(self) -> tuple:
        """The terms of the flattened sum: the branches, and the residual identity first
        when it joins the same sum."""
        if self._residual_in_sum:
            return (BranchSpec.identity()._normalised(self.dims, "zeros"),) + tuple(self.branches)
        return tuple(self.branches)

    def merged_groups(self) -> tuple[list[list[int]], str | None]:
        """``(groups, reason)``: how the branches of the sum partition into mergeable groups
        (lists of branch indices), and why the whole sum does not merge (None: it does).

        The sum is flattened, so branch order does not matter: the whole set if the rule
        allows it; else each branch joins the first group it merges with, then groups
        merge pairwise until nothing changes."""
        terms = self._terms(self._summands)
        refusal = merge_refusal(terms, self.in_channels)
        if refusal is None:
            return [list(range(len(terms)))], None
        mergeable = lambda idx: merge_refusal([terms[i] for i in idx], self.in_channels) is None
        groups: list[list[int]] = []
        for index in range(len(terms)):
            for group in groups:
                if mergeable(group + [index]):
                    group.append(index)
                    break
            else:
                groups.append([index])
        changed = True
        while changed:
            changed = False
            for i in range(len(groups)):
                for j in range(i + 1, len(groups)):
                    if mergeable(groups[i] + groups[j]):
                        groups[i] += groups.pop(j)
                        changed = True
                        break
                if changed:
                    break
        return groups, refusal

    @property
    def sum_refusal(self) -> str | None:
        """Why the sum of the branches does not merge (None: it merges)."""
        return self.merged_groups()[1]

    @property
    def merge_reason(self) -> str | None:
        """Why the whole block does not collapse into one conv (None: it does)."""
        refusal = self.sum_refusal
        if refusal is None and self.residual and not self._residual_in_sum:
            refusal = merge_refusal(self._terms(self.branches) + [self._identity_term()], self.in_channels)
        return refusal

    @property
    def merges(self) -> bool:
        """The whole linear part (branches, post BN, layer scale, residual) is one conv."""
        return self.merge_reason is None

    def original_ops(self) -> dict[str, int]:
        """Op histogram of the unfused block (the keys of :meth:`expected_ops`)."""
        n_sub = sum(branch.subtract for branch in self.branches)
        return {
            "conv": sum(branch.is_conv for branch in self.branches),
            "batch_norm": sum(branch.bn for branch in self.branches) + self.post_bn,
            "add": len(self.branches) - 1 - n_sub + self.residual,
            "sub": n_sub,
            "mul": int(self.layer_scale),
        }

    def expected_ops(self) -> dict[str, int]:
        """Op histogram the fused block must have (conv, batch_norm, add, sub, mul).

        Whole sum merges: one conv absorbing the post BN and layer scale, plus the residual
        add if the residual does not merge. Otherwise the merged prefix (if it holds a conv)
        is one conv, every other conv folds its own BN, BN-only branches, the residual and
        the adds joining the unmerged branches stay; the post BN and the layer scale stay
        unless every term of the rewritten sum is a conv, which then absorbs them.
        """
        groups, refusal = self.merged_groups()
        if refusal is None:
            residual_stays = self.residual and not self.merges
            return {"conv": 1, "batch_norm": 0, "add": int(residual_stays), "sub": 0, "mul": 0}
        summands = self._summands
        ops = {"conv": 0, "batch_norm": int(self.post_bn),
               "add": int(self.residual and not self._residual_in_sum), "sub": 0,
               "mul": int(self.layer_scale)}
        is_conv = lambda i: summands[i].is_conv
        conv_groups = [g for g in groups if len(g) > 1 and any(is_conv(i) for i in g)]
        # the post BN and layer scale distribute over the sum when every term of it is
        # then a conv (a merged group, or one conv branch with no nonlinearity)
        distributed = all(g in conv_groups or (len(g) == 1 and is_conv(g[0])
                                               and not summands[g[0]].act) for g in groups)
        if distributed:
            ops["batch_norm"] -= int(self.post_bn)
            ops["mul"] -= int(self.layer_scale)
        # a post BN / layer scale distributed over the sum makes each conv branch a term of
        # the rewritten sum whose sign is in its weights: it is joined by an add
        signs_in_terms = distributed and (self.post_bn or self.layer_scale)
        if not conv_groups:  # no partial rewrite: every conv folds its own BN, adds stay
            ops["conv"] += sum(b.is_conv for b in summands)
            ops["batch_norm"] += sum(b.kind == "bn" for b in summands)
            # a post BN / layer scale distributed over the sum makes each branch a term
            # whose sign is in its weights: the branches are then joined by adds
            for branch in summands[1:]:
                ops["sub" if branch.subtract and not signs_in_terms else "add"] += 1
            return ops
        signs = []  # the rewritten sum: one term per merged conv group, the rest as they were
        for group in groups:
            if group in conv_groups:
                ops["conv"] += 1
                signs.append(1)
                continue
            for i in group:
                ops["conv"] += int(is_conv(i))
                ops["batch_norm"] += int(summands[i].kind == "bn")
                signs.append(-1 if summands[i].subtract and not (
                    signs_in_terms and is_conv(i)) else 1)
        for sign in signs[1:]:
            ops["add" if sign == 1 else "sub"] += 1
        return ops

    def expected_convs(self) -> int:
        return self.expected_ops()["conv"]

    def expected_batch_norms(self) -> int:
        return self.expected_ops()["batch_norm"]

    def describe(self) -> str:
        text = f"{self.dims}d {self.in_channels}->{self.out_channels}"
        if self.stride > 1:
            text += f" s{self.stride}"
        text += " [" + " ".join(branch.describe() for branch in self.branches) + "]"
        for flag, name in ((self.post_bn, "bn"), (self.layer_scale, "scale"), (self.residual, "+x")):
            if flag:
                text += f" {name}"
        if self.post_act:
            text += f" {self.post_act}"
        return text
