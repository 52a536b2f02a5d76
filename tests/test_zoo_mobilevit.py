"""MobileViT zoo: parameter counts against the paper, exact fusion, the deployed topology.

Fusing folds every conv+BN pair and nothing else that changes the architecture: the
transformer (LayerNorm, attention, FFN), the concat of the fusion conv and the
unfold/fold reshapes stay. MobileViT-XXS has 35 convs in training form,

    stem 1 + layer_1 (1 MV2 x 3) + layer_2 (3 MV2 x 3) + 3 x (MV2 3 + MobileViT block 4)
    + conv_1x1_exp 1 = 1 + 3 + 9 + 21 + 1 = 35,

of which 32 carry a BN (the MobileViT block's ``local_rep.conv_1x1`` has none). No conv
is composed with a neighbour: each MV2 ``red_1x1`` output is either added to a residual
or read by a conv *and* a residual/concat (so composing would add MACs), and
``local_rep.conv_1x1`` sits between a SiLU and the unfold reshape. So 35 convs remain.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import reparam_fx
import zoo
import zoo.mobilevit  # noqa: F401  (registers the variants)
from zoo.mobilevit import VARIANTS, MobileViTBlock
from zoo_checks import RTOL_F64, RTOL_FP32, check_parameter_counts, fuse_and_check

# Official figures (millions, training form, 1000 classes). Folding conv+BN removes only
# the BN affine parameters, so the deployed figure is held to the same number.
OFFICIAL = {
    "mobilevit_xxs": 1.27,
    "mobilevit_xs": 2.32,
    "mobilevit_s": 5.58,
}

# MobileViT-XXS after fusing. Transformer layers: 2 + 4 + 3 = 9.
XXS_LAYERS = 9
XXS_TOPOLOGY = {
    "conv": 35,                       # see the module docstring
    "linear": 4 * XXS_LAYERS + 1,     # qkv, out_proj, 2 FFN per layer + classifier
    "add": 3 + 2 * XXS_LAYERS,        # MV2 residuals (layer_1.0, layer_2.1/2) + 2 per layer
    "mul": XXS_LAYERS,                # query scaling (shape arithmetic is not a tensor op)
}
# conv+bn: every BN. A Linear followed by eval-mode Dropout is left as it is.
XXS_PATTERNS = {"conv+bn": 32}


def test_every_variant_is_registered():
    assert set(OFFICIAL) == set(VARIANTS)
    assert set(OFFICIAL) <= set(zoo.names())


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_parameter_counts(name):
    train, after = check_parameter_counts(name, OFFICIAL[name], OFFICIAL[name])
    model = zoo.create(name)
    bn_channels = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    # each folded BN channel drops gamma and beta and gives its bias-free conv one bias
    assert round(train * 1e6) - round(after * 1e6) == bn_channels


@pytest.fixture(scope="module")
def xxs():
    return fuse_and_check("mobilevit_xxs", size=64)


def test_mobilevit_xxs_fuses_exactly(xxs):
    model, fused = xxs
    ops = reparam_fx.op_counts(fused)
    assert {k: v for k, v in ops.items() if v} == XXS_TOPOLOGY, fused.fusion_report.table()
    assert fused.fusion_report.pattern_counts() == XXS_PATTERNS, fused.fusion_report.table()
    assert not fused.fusion_report.skip_reasons()
    # only batch_norm disappeared from the histogram
    before = reparam_fx.op_counts(model)
    assert before - ops == {"batch_norm": 32}
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert sum(c.bias is not None for c in convs) == 32
    assert sorted({c.kernel_size for c in convs}) == [(1, 1), (3, 3)]


def test_mobilevit_xxs_keeps_the_transformer(xxs):
    model, fused = xxs

    def count(module, kind):
        return sum(isinstance(m, kind) for m in module.modules())

    assert count(fused, nn.BatchNorm2d) == 0
    assert count(fused, nn.LayerNorm) == count(model, nn.LayerNorm) == 2 * XXS_LAYERS + 3
    assert count(fused, nn.Softmax) == XXS_LAYERS
    targets = [n.target for n in fused.graph.nodes]
    assert targets.count(torch.cat) == 3  # one fusion concat per MobileViT block


@pytest.mark.parametrize("side", [96, 128, 224])
def test_mobilevit_xxs_fused_matches_at_other_sides(xxs, side):
    # Any multiple of 32: at 96 and 224 the stride-32 map (3x3, 7x7) is not tiled by 2x2
    # patches and is resized up and back, as in the official code. The fused graph is
    # size-agnostic: fused once (at 64 in the fixture), checked here.
    model, fused = xxs
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1))
    assert reparam_fx.verify(model, fused, (x,), precision="model", rtol=RTOL_FP32) <= RTOL_FP32
    model64 = copy.deepcopy(model).double()
    fused64 = reparam_fx.fuse(model64)
    assert reparam_fx.verify(model64, fused64, (x.double(),), rtol=RTOL_F64) <= RTOL_F64


def test_resize_is_an_exact_copy_when_patches_tile():
    x = torch.randn(2, 5, 8, 6, dtype=torch.float64)
    assert torch.equal(zoo.mobilevit.resize_bilinear(x, 8, 6), x)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_traces_and_matches_eager(name):
    model = zoo.create(name, num_classes=7).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(1, 3, 64, 64)
    out = traced(x)
    assert out.shape == (1, 7)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)


def official_unfold(fm, p_h=2, p_w=2):
    """The official reshape/transpose sequence (mobilevit_block.py), for sizes that tile."""
    b, c, h, w = fm.shape
    n_h, n_w = h // p_h, w // p_w
    x = fm.reshape(b * c * n_h, p_h, n_w, p_w).transpose(1, 2)
    x = x.reshape(b, c, n_h * n_w, p_h * p_w).transpose(1, 3)
    return x.reshape(b * p_h * p_w, n_h * n_w, -1)


def test_unfolding_matches_the_official_order_and_folding_inverts_it():
    block = MobileViTBlock(in_channels=8, transformer_dim=8, ffn_dim=16, n_transformer_blocks=1)
    fm = torch.randn(2, 8, 6, 4)
    patches = block.unfolding(fm)
    assert torch.equal(patches, official_unfold(fm))
    assert torch.equal(block.folding(patches, like=fm), fm)
