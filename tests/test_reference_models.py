"""Tests of the hand-written baseline in ``tests/reference`` (not of reparam_fx).

The baseline is what reparam_fx is measured against, so it must itself be right: every
model traces with ``torch.fx.symbolic_trace`` in eval mode, and its hand-written deploy
form (``reparameterize_model``) equals the training form in float64 once BatchNorm
statistics and layer scales are randomised (a fresh BN is the identity and a 1e-5 layer
scale hides a branch, so neither would catch a wrong fold).
"""

from __future__ import annotations

import operator
import zlib

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from reference import blocks
from reference.models import ALL_BUILDERS, FULL_SIZE_BUILDERS, reparameterize_model

REL_TOL = 1e-10
BATCHNORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


def randomize_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every BN's running mean/var, weight, bias and every ``layer_scale*`` parameter.

    var in [0.5, 2], mean ~ N(0, 0.5^2), |gamma| in [0.5, 1.5] with random sign,
    beta ~ N(0, 0.5^2), layer scale in +-[0.25, 1.25]. Seeded, so failures reproduce.
    """
    g = torch.Generator().manual_seed(seed)

    def uniform(shape, lo, hi):
        return torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo

    def signed(shape, lo, hi):
        sign = torch.randint(0, 2, shape, generator=g).to(torch.float64) * 2 - 1
        return uniform(shape, lo, hi) * sign

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BATCHNORM_TYPES):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=g, dtype=torch.float64) * 0.5)
                module.running_var.copy_(uniform((n,), 0.5, 2.0))
                if module.affine:
                    module.weight.copy_(signed((n,), 0.5, 1.5))
                    module.bias.copy_(torch.randn(n, generator=g, dtype=torch.float64) * 0.5)
            for name, param in module.named_parameters(recurse=False):
                if name.startswith("layer_scale"):
                    param.copy_(signed(tuple(param.shape), 0.25, 1.25))
    return model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|a - b| / max|b|``."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def prepared(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomize_statistics(model, seed).eval().double()


def example_input(shape, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def batchnorms_in_reparameterized_blocks(model: nn.Module):
    """Names of BN modules still living inside a module that has ``reparameterize``."""
    found = []
    for name, module in model.named_modules():
        if hasattr(module, "reparameterize"):
            for sub_name, sub in module.named_modules():
                if isinstance(sub, BATCHNORM_TYPES):
                    found.append(f"{name}.{sub_name}" if sub_name else name)
    return found


# ---------------------------------------------------------------------------------------
# whole models
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(ALL_BUILDERS))
def model_case(request):
    """(name, training-form model, deploy-form model), built once per builder."""
    name = request.param
    model = prepared(ALL_BUILDERS[name](num_classes=10))
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    deployed = reparameterize_model(model)
    state_after = model.state_dict()
    assert state_before.keys() == state_after.keys(), "reparameterize_model changed the input model's modules"
    for key, value in state_before.items():
        assert torch.equal(value, state_after[key]), f"reparameterize_model mutated {key}"
    return name, model, deployed


@pytest.mark.parametrize("name", sorted(FULL_SIZE_BUILDERS))
def test_full_size_baselines_are_the_zoo_variants(name):
    """The hand-written baselines of tools/bench.py are the same networks as the zoo's:
    equal training-form parameter counts, a deploy form equal to the training form, and
    reparam_fx's fused form no larger than the hand-written one."""
    import reparam_fx
    import zoo
    model = prepared(FULL_SIZE_BUILDERS[name]())
    zoo_model = zoo.create(name)
    assert sum(p.numel() for p in model.parameters()) == \
        sum(p.numel() for p in zoo_model.parameters())
    deployed = reparameterize_model(model)
    assert not batchnorms_in_reparameterized_blocks(deployed)
    x = example_input((1, 3, 64, 64))
    with torch.no_grad():
        assert relative_error(deployed(x), model(x)) <= REL_TOL
    fused = reparam_fx.fuse(zoo_model.eval())
    assert reparam_fx.parameter_count(fused) <= reparam_fx.parameter_count(deployed)
    assert reparam_fx.op_counts(fused)["conv"] == reparam_fx.op_counts(deployed)["conv"]


@pytest.mark.parametrize("size", [64, 32])
def test_deploy_form_equals_training_form(model_case, size):
    name, model, deployed = model_case
    x = example_input((2, 3, size, size))
    with torch.no_grad():
        expected = model(x)
        actual = deployed(x)
    assert expected.shape == (2, 10)
    assert relative_error(actual, expected) <= REL_TOL, name


@pytest.mark.parametrize("size", [64, 32])
def test_training_form_traces(model_case, size):
    name, model, _ = model_case
    traced = torch.fx.symbolic_trace(model)
    x = example_input((2, 3, size, size))
    with torch.no_grad():
        assert relative_error(traced(x), model(x)) <= REL_TOL, name


def test_deploy_form_traces(model_case):
    name, _, deployed = model_case
    traced = torch.fx.symbolic_trace(deployed)
    x = example_input((2, 3, 64, 64))
    with torch.no_grad():
        assert relative_error(traced(x), deployed(x)) <= REL_TOL, name


def test_deploy_form_has_no_batchnorm(model_case):
    name, model, deployed = model_case
    assert any(isinstance(m, BATCHNORM_TYPES) for m in model.modules())
    assert batchnorms_in_reparameterized_blocks(deployed) == [], name
    assert not any(isinstance(m, BATCHNORM_TYPES) for m in deployed.modules()), name


def test_deploy_form_is_idempotent(model_case):
    """Reparameterizing an already deployed model changes nothing."""
    name, _, deployed = model_case
    again = reparameterize_model(deployed)
    x = example_input((1, 3, 32, 32))
    with torch.no_grad():
        assert torch.equal(again(x), deployed(x)), name


def test_mixed_tiny_exercises_functional_patterns():
    """mixed_tiny must show the library the non-module spellings it has to understand."""
    traced = torch.fx.symbolic_trace(ALL_BUILDERS["mixed_tiny"]().eval())
    targets = {node.target for node in traced.graph.nodes if node.op == "call_function"}
    assert F.batch_norm in targets  # BatchNormAct2d traced through
    assert torch.conv2d in targets  # F.conv2d on self.weight
    assert torch.add in targets
    assert operator.add in targets  # `out += ...` and `x + ...`
    assert operator.mul in targets  # layer scale
    drop_paths = [m for m in traced.modules() if isinstance(m, blocks.DropPath)]
    assert drop_paths == [], "DropPath should trace through to nothing in eval"


def test_builders_are_small():
    for name, builder in ALL_BUILDERS.items():
        n_params = sum(p.numel() for p in builder().parameters())
        assert n_params < 400_000, (name, n_params)


# ---------------------------------------------------------------------------------------
# single blocks, including the corner cases the models do not all reach
# ---------------------------------------------------------------------------------------

BLOCK_CASES = {
    "repvgg_identity": (lambda: blocks.RepVGGBlock(8, 8, stride=1), 8),
    "repvgg_identity_groups4": (lambda: blocks.RepVGGBlock(8, 8, stride=1, groups=4), 8),
    "repvgg_stride2": (lambda: blocks.RepVGGBlock(8, 16, stride=2, groups=2), 8),
    "mobileone_k4": (lambda: blocks.MobileOneBlock(8, 8, 3, stride=1, groups=8, num_conv_branches=4), 8),
    "mobileone_pw_se": (lambda: blocks.MobileOneBlock(16, 16, 1, num_conv_branches=2, use_se=True), 16),
    "mobileone_stride2_no_scale": (
        lambda: blocks.MobileOneBlock(8, 8, 3, stride=2, groups=1, use_scale_branch=False), 8),
    "mobileone_bn_only": (
        lambda: blocks.MobileOneBlock(8, 8, 3, groups=8, num_conv_branches=0, use_scale_branch=False,
                                      use_act=False), 8),
    "mobileone_k5": (lambda: blocks.MobileOneBlock(8, 8, 5, groups=2, num_conv_branches=3), 8),
    "large_kernel_grouped": (lambda: blocks.ReparamLargeKernelConv(8, 16, 7, stride=2, groups=8), 8),
    "large_kernel_5_3": (lambda: blocks.ReparamLargeKernelConv(8, 8, 5, stride=1, groups=1), 8),
    "repmixer": (lambda: blocks.RepMixer(8), 8),
    "repmixer_k5": (lambda: blocks.RepMixer(8, kernel_size=5), 8),
    "repmixer_block": (lambda: blocks.RepMixerBlock(8, mlp_ratio=2.0, drop_path=0.2), 8),
    "convffn": (lambda: blocks.ConvFFN(8, 16), 8),
    "repcpe": (lambda: blocks.RepCPE(8, spatial=7), 8),
    "repvggdw": (lambda: blocks.RepVGGDW(8), 8),
    "repvit_block_s1_se": (lambda: blocks.RepViTBlock(16, 32, 16, 3, 1, use_se=True), 16),
    "repvit_block_s2": (lambda: blocks.RepViTBlock(16, 32, 24, 3, 2, use_se=False), 16),
    "conv_bn_act": (lambda: blocks.ConvBnAct(8, 16, 3, stride=2, groups=2), 8),
    "functional_rep_block": (lambda: blocks.FunctionalRepBlock(8, groups=2), 8),
    "residual_ffn": (lambda: blocks.ResidualFFN(8), 8),
    "conv_layer": (lambda: blocks.ConvLayer(8, 16, 3, stride=2), 8),
    "mobilevit_block": (lambda: blocks.MobileViTBlockLite(8, 16, 32), 8),
}


@pytest.mark.parametrize("case", sorted(BLOCK_CASES))
def test_block_reparameterize(case):
    factory, in_ch = BLOCK_CASES[case]
    block = prepared(factory(), seed=zlib.crc32(case.encode()))
    x = example_input((2, in_ch, 12, 12))
    with torch.no_grad():
        expected = block(x)
        assert relative_error(torch.fx.symbolic_trace(block)(x), expected) <= REL_TOL
        deployed = reparameterize_model(block)
        assert relative_error(deployed(x), expected) <= REL_TOL
    assert not any(isinstance(m, BATCHNORM_TYPES) for m in deployed.modules())


@pytest.mark.parametrize("distillation", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_bn_linear_heads(distillation, bias):
    if distillation:
        head = blocks.Classfier(12, 5, distillation=True)
    else:
        head = blocks.BN_Linear(12, 5, bias=bias)
    head = prepared(head, seed=3)
    with torch.no_grad():
        for p in head.parameters():  # trunc_normal(std=0.02) weights are too quiet to test with
            if p.dim() == 2:
                p.copy_(example_input(tuple(p.shape), seed=4))
    x = example_input((4, 12))
    with torch.no_grad():
        expected = head(x)
        head.reparameterize()
        actual = head(x)
    assert relative_error(actual, expected) <= REL_TOL
    assert not any(isinstance(m, BATCHNORM_TYPES) for m in head.modules())


def test_batchnorm_act_matches_batchnorm_then_act():
    bn_act = prepared(blocks.BatchNormAct2d(8, act_layer=nn.GELU), seed=5)
    reference = nn.BatchNorm2d(8).double().eval()
    reference.load_state_dict(bn_act.state_dict())
    x = example_input((2, 8, 5, 5))
    with torch.no_grad():
        assert relative_error(bn_act(x), F.gelu(reference(x))) <= REL_TOL
    assert isinstance(bn_act, nn.BatchNorm2d)
