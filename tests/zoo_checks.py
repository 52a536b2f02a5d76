"""Shared checks for zoo models: parameter counts before/after fusing, and exact fusion.

Every family's test file uses these, so the five families are held to one standard:

- ``check_parameter_counts(name, train_m, deployed_m)``: the training-form count matches
  the official figure within 0.5%, and after ``reparam_fx.fuse`` the count is at most the
  official deployed figure (as published: two decimals, rounded or truncated — RepVGG-B1g4's
  36,125,416 is published as 36.12) and not absurdly lower (at least 95% of it).
- ``fuse_and_check(name, size=64)``: randomised BatchNorm statistics and affine
  parameters and layer scales; fused equals the training form in eval mode, in float64
  (tight) and in fp32 (<= 1e-5 relative); no BatchNorm left; no more MACs; the input
  untouched.
  Returns the fused model for topology assertions.
"""

from __future__ import annotations

import copy

import torch

import reparam_fx
import zoo
from reparam_fx.testing import randomize_batchnorm_, randomize_parameters_

RTOL_F64 = 1e-9
RTOL_FP32 = 1e-5
TRAIN_TOLERANCE = 0.005  # relative, against the official training-form figure
PUBLISHED_STEP = 0.01  # millions: published figures have two decimals, rounded or truncated


def millions(model) -> float:
    return reparam_fx.parameter_count(model) / 1e6


def check_parameter_counts(name: str, train_m: float, deployed_m: float) -> tuple[float, float]:
    model = zoo.create(name).eval()
    train = millions(model)
    assert abs(train - train_m) <= TRAIN_TOLERANCE * train_m, \
        f"{name}: {train:.3f} M parameters in training form, official {train_m} M"
    fused = reparam_fx.fuse(model)
    after = millions(fused)
    assert after < deployed_m + PUBLISHED_STEP, \
        f"{name}: {after:.3f} M parameters after fuse, official deployed {deployed_m} M"
    assert after >= 0.95 * deployed_m, f"{name}: {after:.3f} M after fuse, far below {deployed_m} M"
    return train, after


def randomized(model):
    randomize_batchnorm_(model, seed=21)
    randomize_parameters_(model, names=("layer_scale", "gamma"), seed=22)
    return model


def fuse_and_check(name: str, size: int = 64, batch: int = 2, **kwargs):
    """Fuse ``zoo.create(name)`` and check it exactly; returns ``(model, fused)``."""
    model = randomized(zoo.create(name, **kwargs).eval())
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    fused = reparam_fx.fuse(model)
    assert reparam_fx.verify(model, fused, (x,), precision="model", rtol=RTOL_FP32) <= RTOL_FP32
    assert reparam_fx.op_counts(fused)["batch_norm"] == 0, fused.fusion_report.table()
    assert reparam_fx.mac_count(fused, (x,)) <= reparam_fx.mac_count(model, (x,))  # never more
    assert not any(module.training for module in fused.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"fuse changed {key}"
    model64 = copy.deepcopy(model).double()
    fused64 = reparam_fx.fuse(model64)
    assert reparam_fx.verify(model64, fused64, (x.double(),), rtol=RTOL_F64) <= RTOL_F64
    return model, fused
