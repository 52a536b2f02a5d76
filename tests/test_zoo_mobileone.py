"""MobileOne zoo: parameter counts against the official figures, exact fusion, topology."""


import pytest
import torch

import reparam_fx
import zoo
import zoo.mobileone  # registers the variants
from zoo_checks import check_parameter_counts, fuse_and_check

# Official parameter counts in millions (training form -> single-conv inference form).
OFFICIAL = {
    "mobileone_s0": (5.29, 2.08),
    "mobileone_s1": (4.83, 4.77),
    "mobileone_s2": (7.88, 7.81),
    "mobileone_s3": (10.17, 10.08),
    "mobileone_s4": (14.95, 14.84),
}

UNITS = 2 + 8 + 10 + 1  # depthwise/pointwise block pairs in stages 1-4
BLOCKS = 1 + 2 * UNITS  # stage0 + two MobileOne blocks per unit = 43


def test_every_variant_is_registered():
    assert set(OFFICIAL) <= set(zoo.names())
    assert OFFICIAL == zoo.mobileone.OFFICIAL_PARAMS_M


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_parameter_counts(name):
    check_parameter_counts(name, *OFFICIAL[name])


def test_mobileone_s0_fuses_exactly_to_one_conv_per_block():
    _, fused = fuse_and_check("mobileone_s0", size=64)
    ops = reparam_fx.op_counts(fused)
    # Every MobileOne block becomes one conv; the head linear stays; no sums remain.
    assert ops["conv"] == BLOCKS == 43
    assert ops["linear"] == 1
    assert ops["add"] == 0 and ops["batch_norm"] == 0 and ops["mul"] == 0
    # 21 depthwise blocks (four 3x3 conv branches + 1x1 scale + skip) and 21 pointwise
    # blocks (four 1x1 branches, + skip where C_in == C_out) are over-parameterised with
    # repeated branches -> "mobileone"; stage0 (one 3x3 + 1x1 scale) -> "repvgg".
    assert fused.fusion_report.pattern_counts() == {"mobileone": 2 * UNITS, "repvgg": 1}


def test_mobileone_s1_fuses_exactly_to_one_conv_per_block():
    _, fused = fuse_and_check("mobileone_s1", size=64)
    ops = reparam_fx.op_counts(fused)
    assert ops["conv"] == BLOCKS
    assert ops["linear"] == 1
    assert ops["add"] == 0 and ops["batch_norm"] == 0 and ops["mul"] == 0
    # One conv branch per block. The first pointwise block of each stage changes the
    # width (64->96, 96->192, 192->512, 512->1280): a lone 1x1 conv+BN, no skip.
    # Every other block has a second branch (scale or skip) -> "repvgg".
    assert fused.fusion_report.pattern_counts() == {"conv+bn": 4, "repvgg": BLOCKS - 4}


def test_mobileone_s4_squeeze_excite_stays_and_the_rest_fuses_exactly():
    _, fused = fuse_and_check("mobileone_s4", size=64)
    ops = reparam_fx.op_counts(fused)
    se_blocks = 2 * (10 // 2) + 2 * 1  # both blocks of the last 5 units of stage 3 and of stage 4
    assert ops["conv"] == BLOCKS + 2 * se_blocks  # SE reduce/expand 1x1 convs are left alone
    assert ops["mul"] == se_blocks  # the sigmoid gate
    assert ops["add"] == 0 and ops["batch_norm"] == 0 and ops["linear"] == 1
    assert fused.fusion_report.pattern_counts() == {"conv+bn": 4, "repvgg": BLOCKS - 4}


def test_traces_and_runs_at_any_multiple_of_32():
    model = zoo.create("mobileone_s0", num_classes=10).eval()
    graph = torch.fx.symbolic_trace(model)
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        assert torch.equal(graph(x), model(x))
        assert model(x).shape == (1, 10)


def test_official_state_dict_names():
    keys = set(zoo.create("mobileone_s4").state_dict())
    for key in ("stage0.rbr_conv.0.conv.weight", "stage0.rbr_scale.bn.running_var",
                "stage1.0.rbr_scale.conv.weight", "stage1.3.rbr_skip.weight",
                "stage3.19.se.expand.bias", "stage4.1.se.reduce.weight", "linear.weight"):
        assert key in keys, key
    assert "stage3.9.se.reduce.weight" not in keys  # SE only in the last 5 units of stage 3
    assert "stage0.rbr_skip.weight" not in keys
    s0 = set(zoo.create("mobileone_s0").state_dict())
    assert "stage2.5.rbr_conv.3.bn.weight" in s0 and "stage0.rbr_conv.1.conv.weight" not in s0
