"""Acceptance: third-party-style implementations (tests/reference: RepVGG, MobileOne,
FastViT, RepViT, a LeViT-style BN+Linear head, a MobileViT-style model, and a model mixing
BN-with-activation subclasses, DropPath, functional convs and in-place adds) fuse with no
model-specific code to no more ops than their own hand-written reparameterization, exact,
and leave the input untouched — through symbolic_trace and through torch.export."""

import copy
from pathlib import Path

import pytest
import torch

import reparam_fx
from reference.models import ALL_BUILDERS, reparameterize_model
from reparam_fx.testing import randomize_batchnorm_, randomize_parameters_

RTOL_FP32 = 1e-5
RTOL_F64 = 1e-10
FOLDED_OPS = ("conv", "batch_norm", "linear", "add", "sub", "mul", "div")


def _model(name):
    model = ALL_BUILDERS[name]().eval()
    randomize_batchnorm_(model, seed=11)
    randomize_parameters_(model, seed=12)
    return model


def _check(model, fused, hand, x):
    assert reparam_fx.verify(model, fused, (x,), precision="model", rtol=RTOL_FP32) <= RTOL_FP32
    ops_fused, ops_hand = reparam_fx.op_counts(fused), reparam_fx.op_counts(hand)
    for op in FOLDED_OPS:
        assert ops_fused[op] <= ops_hand[op], (op, dict(ops_fused), dict(ops_hand))
    assert ops_fused["batch_norm"] == 0
    assert reparam_fx.parameter_count(fused) <= reparam_fx.parameter_count(hand)


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_traced_model_fuses_like_its_own_reparameterize(name):
    model = _model(name)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    fused = reparam_fx.fuse(model)
    _check(model, fused, reparameterize_model(model), x)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    model64 = copy.deepcopy(model).double()
    fused64 = reparam_fx.fuse(model64)
    assert reparam_fx.verify(model64, fused64, (x.double(),), rtol=RTOL_F64) <= RTOL_F64
    assert fused.fusion_report.fused, "nothing was fused"


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_exported_model_fuses_like_its_own_reparameterize(name):
    model = _model(name)
    x = torch.randn(2, 3, 64, 64)
    program = torch.export.export(model, (x,))
    fused = reparam_fx.fuse(program)
    hand = torch.export.export(reparameterize_model(model), (x,)).module()
    _check(model, fused, hand, x)


def test_library_has_no_model_specific_code():
    """The passes know ops, not models: no per-architecture names or deploy switches."""
    package = Path(reparam_fx.__file__).parent
    forbidden = ("reparameterize(", "switch_to_deploy", "inference_mode =", "rbr_",
                 "RepVGGBlock", "MobileOneBlock", "RepMixer(", "token_mixer")
    for path in package.glob("*.py"):
        text = path.read_text()
        for word in forbidden:
            assert word not in text, f"{path.name} mentions {word!r}"
