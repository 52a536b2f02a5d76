"""FastViT zoo: parameter counts, exact fusion and the fused topology.

The expected inference-form topology is derived from the architecture (see
``zoo/fastvit.py``), block by block, not read off a run of the engine.
"""

from __future__ import annotations


import pytest
import torch

import reparam_fx
import zoo
import zoo.fastvit  # noqa: F401  (registers the fastvit variants)
from zoo_checks import RTOL_F64, check_parameter_counts, fuse_and_check, randomized
from zoo.fastvit import VARIANTS, FastViT

# Official figures (millions of parameters), training form -> deployed, 1000 classes.
OFFICIAL = {
    "fastvit_t8": (4.03, 4.00),
    "fastvit_t12": (7.55, 7.51),
    "fastvit_s12": (9.47, 9.43),
    "fastvit_sa12": (11.58, 11.55),
    "fastvit_sa24": (21.55, 21.50),
    "fastvit_sa36": (31.53, 31.46),
    "fastvit_ma36": (44.07, 43.99),
}


def test_every_variant_is_registered():
    assert set(OFFICIAL) == set(VARIANTS)
    assert set(OFFICIAL) <= set(zoo.names())


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_parameter_counts(name):
    check_parameter_counts(name, *OFFICIAL[name])


# ---- fused topology of the RepMixer-only variants ------------------------------------
#
# What each part of a T/S FastViT becomes after fusing (no activation separates the
# branches listed on one line, a GELU / the attention separates the lines):
#
#   stem            3 MobileOneBlocks, each a branch sum              -> 3 convs  "repvgg"
#   RepMixerBlock   RepMixer x + ls*(mixer(x) - norm(x))              -> 1 conv   "repmixer"
#                   ConvFFN dw7x7 + BN                                -> 1 conv   "conv+bn"
#                   ConvFFN fc1 (1x1 after dw7x7: composing it would   -> 1 conv   (as is)
#                   multiply the MACs, so it stays)
#                   ConvFFN fc2, times the block's layer scale        -> 1 conv   "layer scale"
#                   residual x + ls*ConvFFN(x) (two sources)          -> 1 add
#   PatchEmbed      large 7x7 + small 3x3 kernel, stride 2, no act    -> 1 conv "large+small kernel"
#                   1x1 MobileOneBlock BN(conv1x1(y)) + BN(y)         -> 1 conv   "repvgg"
#   head            conv_exp 3x3 + 1x1 scale branch                   -> 1 conv   "repvgg"
#                   SE reduce/expand convs, x * gate                  -> 2 convs, 1 mul
#                   classifier                                        -> 1 linear

def expected_repmixer_topology(name: str) -> tuple[dict, dict]:
    spec = VARIANTS[name]
    assert not spec["attention"]
    blocks = sum(spec["layers"])
    patch_embeds = len(spec["layers"]) - 1
    ops = {
        "conv": 3 + 4 * blocks + 2 * patch_embeds + 3,
        "add": blocks, "mul": 1, "linear": 1,
        "sub": 0, "div": 0, "batch_norm": 0, "avg_pool": 0, "pad": 0,
    }
    patterns = {
        "repvgg": 3 + patch_embeds + 1,
        "repmixer": blocks,
        "conv+bn": blocks,
        "layer scale": blocks,
        "large+small kernel": patch_embeds,
    }
    return ops, patterns


def test_expected_topology_of_t8_by_hand():
    # fastvit_t8: 2+2+4+2 = 10 RepMixerBlocks, 3 PatchEmbeds.
    ops, patterns = expected_repmixer_topology("fastvit_t8")
    assert ops["conv"] == 3 + 40 + 6 + 3 == 52
    assert patterns == {"repvgg": 7, "repmixer": 10, "conv+bn": 10, "layer scale": 10,
                        "large+small kernel": 3}


def test_t8_fuses_exactly_into_the_expected_topology():
    _, fused = fuse_and_check("fastvit_t8", size=64)
    ops, patterns = expected_repmixer_topology("fastvit_t8")
    counts = reparam_fx.op_counts(fused)
    assert {key: counts[key] for key in ops} == ops, fused.fusion_report.table()
    assert dict(fused.fusion_report.pattern_counts()) == patterns, fused.fusion_report.table()
    assert counts["sub"] == 0  # every RepMixer collapsed into its single depthwise conv
    assert {"repmixer", "large+small kernel"} <= set(fused.fusion_report.pattern_counts())


# ---- the attention path (RepCPE, AttentionBlock) on a narrow SA-shaped model ------------

def small_sa_model() -> FastViT:
    """SA12-shaped (RepMixer stages, RepCPE + AttentionBlock last) but one block per stage."""
    return FastViT(layers=(1, 1, 1, 1), embed_dims=(32, 32, 64, 64), mlp_ratio=2.0,
                   attention=True, num_classes=10)


def test_attention_variant_fuses_exactly():
    model = randomized(small_sa_model().double().eval())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fused = reparam_fx.fuse(model)
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL_F64) <= RTOL_F64
    counts, patterns = reparam_fx.op_counts(fused), fused.fusion_report.pattern_counts()
    # RepMixer stages as above (3 blocks, 3 PatchEmbeds), then RepCPE -> 1 conv "cpe" and
    # one AttentionBlock: its BN before MHSA (kept by the official inference form) folds
    # into the qkv Linear across flatten(2).transpose(-2, -1); qkv and proj Linears,
    # ConvFFN as in a RepMixerBlock, two residual adds.
    assert counts["batch_norm"] == 0 and counts["sub"] == 0
    assert counts["conv"] == 3 + 4 * 3 + 2 * 3 + 1 + 3 + 3
    assert counts["linear"] == 2 + 1
    assert counts["add"] == 3 + 2
    assert patterns["cpe"] == 1 and patterns["repmixer"] == 3
    assert patterns["conv+bn"] == patterns["layer scale"] == 4
    assert patterns["large+small kernel"] == 3
    assert patterns["bn+linear"] == 1


@pytest.mark.parametrize("name, size", [("fastvit_t8", 96), ("fastvit_sa12", 64)])
def test_traces_and_runs_at_multiples_of_32(name, size):
    # (t8 at 64 is covered by the exact-fusion test above.)
    model = zoo.create(name, num_classes=7).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
        assert expected.shape == (1, 7)
        torch.testing.assert_close(traced(x), expected, rtol=0, atol=0)
