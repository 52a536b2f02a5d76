"""Trained-like BatchNorm statistics for int8 experiments without trained weights.

A random model is useless for int8 work: its BatchNorms are the identity (or, randomised
as for the float tests, statistics unrelated to the data), so neither the weight ranges
that hurt a fused RepVGG in int8 nor realistic activation ranges appear. Trained
re-parameterizable networks have two properties that matter here (QARepVGG, arXiv
2212.01593, analyses trained RepVGG-A0 this way: outlier weights in the fused kernels
come from the identity branch's BatchNorm, ``gamma / sqrt(var + eps)``, and the
activation variance grows along a stage because each block adds its branches to an
identity that is not shrunk):

- **running statistics match the data** each BatchNorm sees: here they are measured on
  the model's own activations (train-mode passes over random inputs with cumulative
  averaging), so every normalised value is ~N(0, 1) before ``gamma`` and ``beta``;
- **branch roles differ**: a BatchNorm fed by a conv (a conv branch, or a plain conv+BN)
  gets a modest ``gamma``; an identity-branch BatchNorm (fed by anything else: the
  block's input) gets a larger one, so that the identity dominates the block's output.
  Its per-channel factor ``gamma / sigma`` then lands on one tap of each fused row.

:func:`trained_like` draws ``gamma`` log-uniformly in ``conv_gamma`` / ``identity_gamma``
and ``beta ~ N(0, (beta_scale * gamma)^2)``. The defaults are a stand-in, not measured
values: they reproduce the phenomena above, and results on them (int8 SQNR, what the int8
policy keeps apart) are indications. With a real checkpoint and real calibration images
the statistics, the activation ranges and so the int8 errors change; measure there.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def batchnorm_roles(model: nn.Module, example_inputs) -> dict[str, str]:
    """``{batchnorm name: "conv" | "identity"}``: whether each BatchNorm's input, in a
    run on ``example_inputs``, was a conv's (or linear's) output. Works on any code
    style (module hooks, no tracing)."""
    produced: dict[int, torch.Tensor] = {}  # the outputs are kept alive: a freed tensor's
    roles: dict[str, str] = {}              # id() may come back on another tensor
    handles = []

    def remember(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            produced[id(output)] = output

    def classify(name):
        def hook(_module, inputs):
            if inputs and isinstance(inputs[0], torch.Tensor):
                fed = produced.get(id(inputs[0])) is inputs[0]
                roles.setdefault(name, "conv" if fed else "identity")
        return hook

    for name, module in model.named_modules():
        if isinstance(module, _CONVS):
            handles.append(module.register_forward_hook(remember))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_pre_hook(classify(name)))
    try:
        with torch.no_grad():
            model(*_as_tuple(example_inputs))
    finally:
        for handle in handles:
            handle.remove()
    return roles


def trained_like(model: nn.Module, example_inputs, *, seed: int = 0,
                 conv_gamma=(0.1, 0.6), identity_gamma=(0.8, 2.5), beta_scale: float = 0.3,
                 batches: int = 4) -> nn.Module:
    """A copy of ``model`` (in eval mode) with trained-like BatchNorm statistics (see the
    module docstring). ``example_inputs``: one input batch (a tensor or tuple); the
    running statistics are measured on ``batches`` random batches of its shape (batch
    size 8 at least)."""
    inputs = _as_tuple(example_inputs)
    model = copy.deepcopy(model).eval()
    roles = batchnorm_roles(model, inputs)
    generator = torch.Generator().manual_seed(seed)
    norms = {name: m for name, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    for name, norm in norms.items():
        low, high = identity_gamma if roles.get(name) == "identity" else conv_gamma
        with torch.no_grad():
            if norm.weight is not None:
                norm.weight.copy_(_log_uniform(norm.num_features, low, high, generator))
            if norm.bias is not None:
                scale = norm.weight.abs() if norm.weight is not None else 1.0
                norm.bias.copy_(torch.randn(norm.num_features, generator=generator) *
                                beta_scale * scale)
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches below
        norm.train()
    with torch.no_grad():  # batches of 8 at least: a head's BatchNorm1d needs more than 1
        for _ in range(batches):
            model(*(torch.randn((max(8, x.shape[0]),) + tuple(x.shape[1:]), generator=generator,
                                dtype=x.dtype)
                    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() else x
                    for x in inputs))
    for norm in norms.values():
        norm.momentum = 0.1
    return model.eval()


def _log_uniform(n: int, low: float, high: float, generator) -> torch.Tensor:
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return torch.exp(math.log(low) + u * (math.log(high) - math.log(low))).float()


def _as_tuple(inputs) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
