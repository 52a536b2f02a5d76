"""Linear heads and small random graphs described by specs (see :mod:`reparam_fx.testing`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from reparam_fx.testing.blocks import BATCHNORM, CONV, FUNCTIONAL_CONV
from reparam_fx.testing.checks import seeded_generator, randomized




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
        return randomized(LinearHeads(self), seed)

    def example_input(self, batch: int = 4, *, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
        return torch.randn((batch, self.in_features), generator=seeded_generator(seed),
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
                layers[name] = CONV[spec.dims](channels, channels, op.kernel_size,
                                                padding=op.dilation * (op.kernel_size - 1) // 2,
                                                dilation=op.dilation, groups=op.groups, bias=op.bias,
                                                padding_mode=op.padding_mode)
            elif op.kind == "bn":
                layers[name] = BATCHNORM[spec.dims](channels)
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
                y = FUNCTIONAL_CONV[self.dims](a, conv.weight, conv.bias, conv.stride,
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
        return randomized(SmallGraph(self), seed)

    def example_input(self, batch: int = 2, *, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
        return torch.randn((batch, self.channels) + tuple(self.size), generator=seeded_generator(seed),
                           dtype=torch.float64).to(dtype)

    def describe(self) -> str:
        lines = [f"{self.dims}d C={self.channels} size={self.size}"]
        lines += [op.describe(index) for index, op in enumerate(self.ops)]
        lines.append("return " + ", ".join(f"v{i}" for i in self.outputs))
        return "\n".join(lines)
