"""Randomisers and the equivalence checker (see :mod:`reparam_fx.testing`)."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn


from reparam_fx.fx.counts import mac_count, op_counts
from reparam_fx.core.verification import VerificationError, as_inputs, verify


# ---- randomisers -----------------------------------------------------------------------

def seeded_generator(seed: int) -> torch.Generator:
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
    generator = seeded_generator(seed)
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
    generator = seeded_generator(seed)
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


def randomized(module: nn.Module, seed: int) -> nn.Module:
    _init_weights_(module, seeded_generator(seed))
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
