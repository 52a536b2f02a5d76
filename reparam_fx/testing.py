"""Property-test your own re-parameterizable blocks against :func:`reparam_fx.fuse`.

Three things live here, all public:

1. **Randomisers.** A freshly initialised BatchNorm is the identity map and a freshly
   initialised layer scale is ~0, which hides folding bugs. Randomise them first::

       model = MyBlock().eval()
       randomize_batchnorm_(model, seed=0)       # mean ~ N(0,1), var ~ U(0.5,2),
                                                 # gamma ~ +-U(0.5,1.5), beta ~ N(0,1)
       randomize_parameters_(model, seed=0)      # every "layer_scale" / "gamma" parameter

2. **A checker.** :func:`assert_fuses_exactly` fuses a float64 copy, compares outputs,
   optionally checks the op histogram of the result and that nothing was mutated::

       fused = assert_fuses_exactly(model, (x,), expect_ops={"conv": 1, "batch_norm": 0})

3. **Block descriptions, an oracle and hypothesis strategies.** :class:`BlockSpec` describes
   a multi-branch block over one input (RepVGG, MobileOne, ACNet, RepMixer, CPE, ...);
   ``spec.build()`` makes it, and ``spec.expected_ops()`` says — independently of the
   engine — what the fused block must contain. :func:`block_specs`,
   :func:`linear_head_specs` and :func:`small_graphs` generate them::

       from hypothesis import given, settings
       from reparam_fx.testing import assert_fuses_exactly, block_specs

       @settings(deadline=None)  # the first fuse of a process is slow (imports, warm-up)
       @given(block_specs(dims=(2,), max_channels=8))
       def test_blocks_fuse(spec):
           model = spec.build(seed=0)
           assert_fuses_exactly(model, (spec.example_input(),), expect_ops=spec.expected_ops())

   Hand-written specs work too::

       repvgg = BlockSpec(dims=2, in_channels=4, out_channels=4, branches=(
           BranchSpec.conv(3, bn=True), BranchSpec.conv(1, bn=True), BranchSpec.batchnorm()))
       assert repvgg.merges and repvgg.expected_convs() == 1

The oracle's merge rule
-----------------------
A sum of terms over one input merges into one conv iff

(a) every conv term has ``padding_mode='zeros'``;
(b) all terms have the same stride (identity / BN-only = 1x1 kernel, stride 1, padding 0);
(c) all terms have the same centre offset per spatial dim, ``c = p - d*(k - 1)/2``;
(d) all terms have the same output channels (identity: ``in_channels``);
(e) no term contains a nonlinearity;
(f) the MAC gate (sums of identities and BN-only branches alone are a per-channel affine
    and always merge): per dim, ``D`` = gcd of the dilations of terms whose kernel > 1 there
    (1 if none), ``P`` = max padding; every term's taps lie on the merged lattice
    (``(P - p_i) % D == 0``); merged kernel ``K = 2*(P - c)/D + 1``; merged groups
    ``g`` = gcd of the conv terms' groups; then ``C_out*(C_in/g)*prod(K)`` must not exceed
    ``sum_i C_out*(C_in/g_i)*prod(k_i)`` over the conv terms.

A single linear term is a chain and always folds whatever follows it (BN, layer scale),
whatever its padding mode. A conv folds its own BN even when its sum does not merge; a BN
or layer scale after a sum that does not merge stays.

The rule applies to the whole sum: add/sub chains are flattened, so branch order does
not matter. When the whole sum does not merge, the branches are partitioned into
mergeable groups; each group that holds a conv becomes one conv and the sum of the rest
stays (:meth:`BlockSpec.merged_groups`).

Requires ``hypothesis`` (``pip install reparam-fx[test]``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from fractions import Fraction

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from hypothesis import assume
    from hypothesis import strategies as st
except ImportError as error:  # pragma: no cover
    raise ImportError("reparam_fx.testing needs hypothesis: pip install 'reparam-fx[test]'") from error

from reparam_fx.fx.counts import mac_count, op_counts
from reparam_fx.core.verification import VerificationError, as_inputs, verify

__all__ = [
    "randomize_batchnorm_", "randomize_parameters_", "assert_fuses_exactly",
    "count_macs", "conv_batchnorm_pairs",
    "BranchSpec", "BlockSpec", "MultiBranchBlock",
    "HeadSpec", "LinearHeadSpec", "LinearHeads",
    "GraphOp", "GraphSpec", "SmallGraph",
    "block_specs", "linear_head_specs", "small_graphs",
]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_NONLINEARITIES = {"relu": nn.ReLU, "gelu": nn.GELU}
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_FUNCTIONAL_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# ---- randomisers -----------------------------------------------------------------------

def _generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def _signed_uniform(shape, generator) -> torch.Tensor:
    """U(0.5, 1.5) magnitudes with random signs: never near zero, never all positive."""
    magnitude = torch.rand(shape, generator=generator, dtype=torch.float64) + 0.5
    sign = torch.randint(0, 2, shape, generator=generator).double() * 2 - 1
    return magnitude * sign


@torch.no_grad()
def randomize_batchnorm_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Randomise every BatchNorm with running statistics in ``module``, in place.

    ``running_mean ~ N(0, 1)``, ``running_var ~ U(0.5, 2)``, ``weight ~ U(0.5, 1.5)`` with
    a random sign, ``bias ~ N(0, 1)``. BatchNorms without running statistics are left as
    they are (they never fold). Returns ``module``.
    """
    generator = _generator(seed)
    for submodule in module.modules():
        if not isinstance(submodule, nn.modules.batchnorm._BatchNorm):
            continue
        if submodule.running_mean is None or submodule.running_var is None:
            continue
        shape = submodule.running_mean.shape
        submodule.running_mean.copy_(torch.randn(shape, generator=generator, dtype=torch.float64))
        submodule.running_var.copy_(torch.rand(shape, generator=generator, dtype=torch.float64) * 1.5 + 0.5)
        if submodule.weight is not None:
            submodule.weight.copy_(_signed_uniform(submodule.weight.shape, generator))
        if submodule.bias is not None:
            submodule.bias.copy_(torch.randn(submodule.bias.shape, generator=generator, dtype=torch.float64))
    return module


@torch.no_grad()
def randomize_parameters_(module: nn.Module, names=("layer_scale", "gamma"), seed: int = 0) -> nn.Module:
    """Set every parameter whose name contains one of ``names`` to ``U(0.5, 1.5)`` with a
    random sign, in place (layer scales are initialised near 0 and would hide errors).
    Returns ``module``."""
    generator = _generator(seed)
    for name, parameter in module.named_parameters():
        if any(part in name for part in names):
            parameter.copy_(_signed_uniform(parameter.shape, generator))
    return module


@torch.no_grad()
def _init_weights_(module: nn.Module, generator: torch.Generator) -> None:
    """Seeded uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) weights and biases for convs/linears."""
    for submodule in module.modules():
        if isinstance(submodule, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            fan_in = submodule.weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            submodule.weight.copy_((torch.rand(submodule.weight.shape, generator=generator,
                                               dtype=torch.float64) * 2 - 1) * bound)
            if submodule.bias is not None:
                submodule.bias.copy_((torch.rand(submodule.bias.shape, generator=generator,
                                                 dtype=torch.float64) * 2 - 1) * bound)


def _randomized(module: nn.Module, seed: int) -> nn.Module:
    _init_weights_(module, _generator(seed))
    randomize_batchnorm_(module, seed=seed + 1)
    randomize_parameters_(module, seed=seed + 2)
    return module.eval()


# ---- checks ----------------------------------------------------------------------------

def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _changed_entries(before: dict, model: nn.Module) -> list[str]:
    return changed_entries(before, model.state_dict())


def changed_entries(before: dict, after: dict) -> list[str]:
    """The keys of two state dicts whose tensors differ (or that only one has)."""
    changed = sorted(set(before) ^ set(after))
    for key in set(before) & set(after):
        a, b = before[key], after[key]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b.detach()):
            changed.append(key)
    return sorted(changed)


count_macs = mac_count  # multiply-accumulates of one forward pass (reparam_fx.mac_count)


def conv_batchnorm_pairs(graph_module: torch.fx.GraphModule) -> list[str]:
    """Names of BatchNorm nodes that directly follow a conv used by nothing else.

    After a correct fusion of an eval-mode model this list is empty: such a BN always folds.
    """
    from reparam_fx.fx.counts import node_category

    modules = dict(graph_module.named_modules())
    pairs = []
    for node in graph_module.graph.nodes:
        if node_category(node, modules) != "batch_norm" or not node.args:
            continue
        source = node.args[0]
        if (isinstance(source, torch.fx.Node) and node_category(source, modules) == "conv"
                and len(source.users) == 1):
            pairs.append(node.name)
    return pairs


def assert_fuses_exactly(model: nn.Module, example_inputs, *, rtol: float = 1e-9,
                         expect_ops: dict[str, int] | None = None) -> torch.fx.GraphModule:
    """Fuse a float64 copy of ``model`` and check the result; return the fused model.

    Checks, raising ``AssertionError`` with the fusion report attached:

    * outputs equal within ``rtol`` (relative, float64) on ``example_inputs``;
    * ``op_counts(fused)`` equals ``expect_ops`` on every key it names (a subset);
    * neither ``model`` nor the float64 copy handed to ``fuse`` was mutated.
    """
    from reparam_fx import fuse

    inputs = as_inputs(example_inputs)
    original_state = _snapshot(model)
    model64 = copy.deepcopy(model).double()
    inputs64 = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                     for t in inputs)
    copy_state = _snapshot(model64)
    fused = fuse(model64, inputs64)
    report = getattr(fused, "fusion_report", None)
    details = f"\nfusion report:\n{report}\nfused graph:\n{fused.graph}"
    changed = _changed_entries(copy_state, model64)
    if changed:
        raise AssertionError(f"fuse mutated its input model: {changed}{details}")
    try:
        verify(model64, fused, inputs64, rtol=rtol)
    except VerificationError as error:
        raise AssertionError(f"{error}{details}") from error
    if expect_ops:
        counts = op_counts(fused)
        wrong = {op: (counts.get(op, 0), want) for op, want in expect_ops.items()
                 if counts.get(op, 0) != want}
        if wrong:
            listing = ", ".join(f"{op}: got {got}, expected {want}" for op, (got, want) in sorted(wrong.items()))
            raise AssertionError(f"op counts of the fused model differ: {listing}{details}")
    changed = _changed_entries(original_state, model)
    if changed:
        raise AssertionError(f"the input model was mutated: {changed}")
    return fused


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
        if self.act is not None and self.act not in _NONLINEARITIES:
            raise ValueError(f"unknown nonlinearity {self.act!r}; use one of {sorted(_NONLINEARITIES)}")
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
                branches.append(_BATCHNORM[spec.dims](spec.in_channels))
            else:
                layers = [_CONV[spec.dims](spec.in_channels, spec.out_channels, branch.kernel_size,
                                           stride=spec.stride, padding=branch.padding,
                                           dilation=branch.dilation, groups=branch.groups,
                                           bias=branch.bias, padding_mode=branch.padding_mode)]
                if branch.bn:
                    layers.append(_BATCHNORM[spec.dims](spec.out_channels))
                if branch.act:
                    layers.append(_NONLINEARITIES[branch.act]())
                branches.append(nn.Sequential(*layers))
        self.branches = nn.ModuleList(branches)
        self.post_bn = _BATCHNORM[spec.dims](spec.out_channels) if spec.post_bn else None
        if spec.layer_scale:
            self.layer_scale = nn.Parameter(torch.ones((spec.out_channels,) + (1,) * spec.dims))
        else:
            self.layer_scale = None
        self.residual = spec.residual
        self.act = _NONLINEARITIES[spec.post_act]() if spec.post_act else None

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
        if self.post_act is not None and self.post_act not in _NONLINEARITIES:
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
        return torch.randn(shape, generator=_generator(seed), dtype=torch.float64).to(dtype)

    def build(self, seed: int = 0) -> MultiBranchBlock:
        """The block in eval mode with seeded random weights, BN statistics and layer scale."""
        return _randomized(MultiBranchBlock(self), seed)

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
        if all(g in conv_groups or (len(g) == 1 and is_conv(g[0]) and not summands[g[0]].act)
               for g in groups):
            ops["batch_norm"] -= int(self.post_bn)
            ops["mul"] -= int(self.layer_scale)
        if not conv_groups:  # no partial rewrite: every conv folds its own BN, adds stay
            ops["conv"] += sum(b.is_conv for b in summands)
            ops["batch_norm"] += sum(b.kind == "bn" for b in summands)
            for branch in summands[1:]:
                ops["sub" if branch.subtract else "add"] += 1
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
                signs.append(-1 if summands[i].subtract else 1)
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


# ---- linear heads ----------------------------------------------------------------------

@dataclass(frozen=True)
class HeadSpec:
    """One head: optional BatchNorm1d, Linear, optional BatchNorm1d."""

    bn_before: bool = False
    bias: bool = True
    bn_after: bool = False


class LinearHeads(nn.Module):
    """``combine_i head_i(bn?(x))`` over a 2-D input, built by :meth:`LinearHeadSpec.build`."""

    def __init__(self, spec: "LinearHeadSpec"):
        super().__init__()
        self.shared_bn = nn.BatchNorm1d(spec.in_features) if spec.shared_bn else None
        heads = []
        for head in spec.heads:
            layers = []
            if head.bn_before:
                layers.append(nn.BatchNorm1d(spec.in_features))
            layers.append(nn.Linear(spec.in_features, spec.out_features, bias=head.bias))
            if head.bn_after:
                layers.append(nn.BatchNorm1d(spec.out_features))
            heads.append(nn.Sequential(*layers))
        self.heads = nn.ModuleList(heads)
        self.mean = spec.combine == "mean"

    def forward(self, x):
        if self.shared_bn is not None:
            x = self.shared_bn(x)
        out = None
        for head in self.heads:
            y = head(x)
            out = y if out is None else out + y
        if self.mean:
            out = out / len(self.heads)
        return out


@dataclass(frozen=True)
class LinearHeadSpec:
    """Linear heads on one 2-D input, summed or averaged (``combine="mean"``, as in
    distillation heads ``(head(x) + head_dist(x)) / 2``). Always folds to one Linear."""

    in_features: int
    out_features: int
    heads: tuple[HeadSpec, ...]
    combine: str = "sum"
    shared_bn: bool = False

    def __post_init__(self):
        if not self.heads:
            raise ValueError("at least one head")
        if self.combine not in ("sum", "mean"):
            raise ValueError(f"combine must be 'sum' or 'mean', not {self.combine!r}")

    def build(self, seed: int = 0) -> LinearHeads:
        return _randomized(LinearHeads(self), seed)

    def example_input(self, batch: int = 4, *, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
        return torch.randn((batch, self.in_features), generator=_generator(seed),
                           dtype=torch.float64).to(dtype)

    def original_ops(self) -> dict[str, int]:
        return {"linear": len(self.heads),
                "batch_norm": self.shared_bn + sum(h.bn_before + h.bn_after for h in self.heads),
                "add": len(self.heads) - 1, "div": int(self.combine == "mean"), "mul": 0}

    def expected_ops(self) -> dict[str, int]:
        return {"linear": 1, "batch_norm": 0, "add": 0, "div": 0, "mul": 0}


# ---- small random graphs -----------------------------------------------------------------

@dataclass(frozen=True)
class GraphOp:
    """One node of a :class:`GraphSpec`. ``inputs`` index the values computed so far
    (0 is the graph input, op ``i`` produces value ``i + 1``)."""

    kind: str  # conv, bn, identity, relu, scale, add, sub
    inputs: tuple[int, ...]
    kernel_size: int = 1
    dilation: int = 1
    groups: int = 1
    bias: bool = False
    padding_mode: str = "zeros"
    functional: bool = False  # functional form: torch.add, F.conv*, F.batch_norm, F.relu, x * scale

    def describe(self, index: int) -> str:
        args = ", ".join(f"v{i}" for i in self.inputs)
        extra = " (functional)" if self.functional else ""
        if self.kind == "conv":
            extra = f" k{self.kernel_size}" + (f" d{self.dilation}" if self.dilation > 1 else "")
            extra += (f" g{self.groups}" if self.groups > 1 else "") + (" bias" if self.bias else "")
            extra += f" {self.padding_mode}" if self.padding_mode != "zeros" else ""
        return f"v{index + 1} = {self.kind}({args}){extra}"


class SmallGraph(nn.Module):
    """The module of a :class:`GraphSpec`; ``forward`` unrolls into a flat fx graph."""

    def __init__(self, spec: "GraphSpec"):
        super().__init__()
        self.ops = spec.ops
        self.outputs = spec.outputs
        self.dims = spec.dims
        layers = {}
        channels = spec.channels
        for index, op in enumerate(spec.ops):
            name = f"op{index}"
            if op.kind == "conv":
                layers[name] = _CONV[spec.dims](channels, channels, op.kernel_size,
                                                padding=op.dilation * (op.kernel_size - 1) // 2,
                                                dilation=op.dilation, groups=op.groups, bias=op.bias,
                                                padding_mode=op.padding_mode)
            elif op.kind == "bn":
                layers[name] = _BATCHNORM[spec.dims](channels)
            elif op.kind == "identity":
                layers[name] = nn.Identity()
            elif op.kind == "relu":
                layers[name] = nn.ReLU()
            elif op.kind == "scale":
                self.register_parameter(f"layer_scale{index}",
                                        nn.Parameter(torch.ones((channels,) + (1,) * spec.dims)))
        self.layers = nn.ModuleDict(layers)

    def forward(self, x):
        values = [x]
        for index, op in enumerate(self.ops):
            a = values[op.inputs[0]]
            if op.functional and op.kind == "conv":
                conv = self.layers[f"op{index}"]
                y = _FUNCTIONAL_CONV[self.dims](a, conv.weight, conv.bias, conv.stride,
                                                             conv.padding, conv.dilation, conv.groups)
            elif op.functional and op.kind == "bn":
                bn = self.layers[f"op{index}"]
                y = F.batch_norm(a, bn.running_mean, bn.running_var, bn.weight, bn.bias, False,
                                 bn.momentum, bn.eps)
            elif op.functional and op.kind == "relu":
                y = F.relu(a)
            elif op.kind in ("conv", "bn", "identity", "relu"):
                y = self.layers[f"op{index}"](a)
            elif op.kind == "scale":
                scale = getattr(self, f"layer_scale{index}")
                y = a * scale if op.functional else scale * a
            elif op.kind == "add":
                b = values[op.inputs[1]]
                y = torch.add(a, b) if op.functional else a + b
            elif op.kind == "sub":
                y = a - values[op.inputs[1]]
            else:
                raise ValueError(f"unknown op kind {op.kind!r}")
            values.append(y)
        outputs = tuple(values[index] for index in self.outputs)
        return outputs[0] if len(outputs) == 1 else outputs


@dataclass(frozen=True)
class GraphSpec:
    """A small random graph of conv / BN / identity / relu / layer-scale / add / sub nodes
    over one input; every value has shape ``(N, channels, *size)``. Oracle: outputs equal
    and no BN left directly after a single-use conv (:func:`conv_batchnorm_pairs`)."""

    dims: int
    channels: int
    ops: tuple[GraphOp, ...]
    outputs: tuple[int, ...]
    size: tuple[int, ...]

    def build(self, seed: int = 0) -> SmallGraph:
        return _randomized(SmallGraph(self), seed)

    def example_input(self, batch: int = 2, *, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
        return torch.randn((batch, self.channels) + tuple(self.size), generator=_generator(seed),
                           dtype=torch.float64).to(dtype)

    def describe(self) -> str:
        lines = [f"{self.dims}d C={self.channels} size={self.size}"]
        lines += [op.describe(index) for index, op in enumerate(self.ops)]
        lines.append("return " + ", ".join(f"v{i}" for i in self.outputs))
        return "\n".join(lines)


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
