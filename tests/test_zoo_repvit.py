"""RepViT zoo: the official cfg rows, parameter counts, exact fusion, the fused topology.

After fusing, every ``Conv2d_BN`` is one conv with bias, every ``RepVGGDW`` token mixer
(``BN(BN(dw3x3(x)) + dw1x1(x) + x)``) is one depthwise 3x3 conv, and the two
``BN1d -> Linear`` heads averaged in eval mode are one linear. What stays: the residual
adds of the channel mixers, the SE blocks (two 1x1 convs with bias and a ``x * gate``
mul each), GELUs and the pooling.
"""

from __future__ import annotations


import pytest
import torch

import reparam_fx
import zoo
import zoo.repvit  # noqa: F401  (registers the variants)
from zoo.repvit import VARIANTS, block_rows
from zoo_checks import check_parameter_counts, fuse_and_check, randomized

# Official figures (millions): training form (with the distillation head) -> inference
# form (one conv per Conv2d_BN / RepVGGDW, both heads merged into one linear), 1000 classes.
OFFICIAL = {
    "repvit_m0_9": (5.49, 5.07),
    "repvit_m1_0": (7.30, 6.81),
    "repvit_m1_1": (8.80, 8.24),
    "repvit_m1_5": (14.64, 14.05),
    "repvit_m2_3": (23.69, 22.93),
}

# The SE column of the official cfgs (THU-MIG/RepViT model/repvit.py), one group per stage;
# stages 2-4 start with their stride-2 row.
OFFICIAL_SE_COLUMN = {
    "repvit_m0_9": "100 0100 0101010101010100 010",
    "repvit_m1_0": "100 0100 0101010101010100 010",
    "repvit_m1_1": "100 0100 01010101010100 010",
    "repvit_m1_5": "10100 010100 01010101010101010101010100 01010",
    "repvit_m2_3": "1010100 01010100 0" + "10" * 17 + "0 010",
}

# The official repvit_m0_9 cfgs, verbatim: kernel, expansion, channels, SE, HS, stride.
OFFICIAL_M0_9_CFGS = [
    (3, 2, 48, 1, 0, 1), (3, 2, 48, 0, 0, 1), (3, 2, 48, 0, 0, 1),
    (3, 2, 96, 0, 0, 2), (3, 2, 96, 1, 0, 1), (3, 2, 96, 0, 0, 1), (3, 2, 96, 0, 0, 1),
    (3, 2, 192, 0, 1, 2),
    (3, 2, 192, 1, 1, 1), (3, 2, 192, 0, 1, 1), (3, 2, 192, 1, 1, 1), (3, 2, 192, 0, 1, 1),
    (3, 2, 192, 1, 1, 1), (3, 2, 192, 0, 1, 1), (3, 2, 192, 1, 1, 1), (3, 2, 192, 0, 1, 1),
    (3, 2, 192, 1, 1, 1), (3, 2, 192, 0, 1, 1), (3, 2, 192, 1, 1, 1), (3, 2, 192, 0, 1, 1),
    (3, 2, 192, 1, 1, 1), (3, 2, 192, 0, 1, 1), (3, 2, 192, 0, 1, 1),
    (3, 2, 384, 0, 1, 2), (3, 2, 384, 1, 1, 1), (3, 2, 384, 0, 1, 1),
]


def test_every_variant_is_registered():
    assert set(OFFICIAL) == set(VARIANTS)
    assert set(OFFICIAL) <= set(zoo.names())


def test_block_rows_are_the_official_cfgs():
    assert [tuple(int(v) for v in row) for row in block_rows(**VARIANTS["repvit_m0_9"])] \
        == OFFICIAL_M0_9_CFGS
    for name, column in OFFICIAL_SE_COLUMN.items():
        rows = block_rows(**VARIANTS[name])
        assert "".join(str(int(row[3])) for row in rows) == column.replace(" ", ""), name
        assert all(row[0] == 3 and row[1] == 2 for row in rows), name
        # HS (GELU either way in the official code) is set from stage 3 on
        stage = 0
        for row in rows:
            stage += row[5] == 2
            assert row[4] == (stage >= 2), name


def se_reduced(channels: int) -> int:
    """timm's make_divisible(channels / 4, 8) with round_limit 0."""
    return max(8, int(channels / 4 + 4) // 8 * 8)


def expected_counts(name: str, num_classes: int = 1000) -> tuple[int, int]:
    """Exact (training, inference-form) parameter counts, from the architecture alone."""

    def conv_bn(cin, cout, k=1, groups=1):  # -> (training, folded)
        weights = cout * (cin // groups) * k * k
        return weights + 2 * cout, weights + cout

    def add(counts, pair):
        counts[0] += pair[0]
        counts[1] += pair[1]

    widths = VARIANTS[name]["widths"]
    counts = [0, 0]
    add(counts, conv_bn(3, widths[0] // 2, 3))
    add(counts, conv_bn(widths[0] // 2, widths[0], 3))
    c = widths[0]
    for _, _, width, use_se, _, stride in block_rows(**VARIANTS[name]):
        if stride == 2:
            add(counts, conv_bn(c, c, 3, groups=c))
            add(counts, conv_bn(c, width))
        else:
            # RepVGGDW: dw3x3+BN, dw1x1 with bias, BN after the sum -> one dw3x3 with bias
            add(counts, (9 * c + 2 * c + 2 * c + 2 * c, 10 * c))
        c = width
        if use_se:
            rd = se_reduced(c)
            add(counts, (2 * c * rd + rd + c,) * 2)
        add(counts, conv_bn(c, 2 * c))
        add(counts, conv_bn(2 * c, c))
    head = c * num_classes + num_classes
    add(counts, (2 * (2 * c + head), head))  # two BN1d+Linear heads -> one linear
    return counts[0], counts[1]


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_parameter_counts(name):
    train_m, fused_m = OFFICIAL[name]
    train, after = check_parameter_counts(name, train_m, fused_m)
    exact_train, exact_fused = expected_counts(name)
    assert round(train * 1e6) == exact_train
    assert round(after * 1e6) == exact_fused


def test_exact_counts_agree_with_published_figures():
    for name, (train_m, fused_m) in OFFICIAL.items():
        exact_train, exact_fused = expected_counts(name)
        assert abs(exact_train / 1e6 - train_m) <= 0.005, name
        assert abs(exact_fused / 1e6 - fused_m) <= 0.005, name


def check_topology(fused, stride1: int, se: int, stride2: int = 3):
    """Counts from the architecture: 2 stem convs; per stride-1 block one dw3x3 (RepVGGDW)
    plus two channel-mixer 1x1s; per stride-2 block dw3x3 + pw1x1 + two channel-mixer 1x1s;
    two convs and one mul per SE; one residual add per block; one linear."""
    ops = reparam_fx.op_counts(fused)
    convs = 2 + 3 * stride1 + 4 * stride2 + 2 * se
    assert {k: v for k, v in ops.items() if v} == \
        {"conv": convs, "add": stride1 + stride2, "mul": se, "linear": 1}, \
        fused.fusion_report.table()
    assert fused.fusion_report.pattern_counts() == {
        "conv+bn": 2 + 2 * stride1 + 4 * stride2,
        "repvgg": stride1,
        "linear heads": 1,
    }, fused.fusion_report.table()
    dw = [m for m in fused.modules() if isinstance(m, torch.nn.Conv2d)
          and m.kernel_size == (3, 3) and m.groups == m.in_channels > 3]
    assert len(dw) == stride1 + stride2 and all(m.bias is not None for m in dw)


def test_repvit_m0_9_fuses_exactly():
    _, fused = fuse_and_check("repvit_m0_9", size=64)
    # stride-1 blocks 3 + 3 + 15 + 2 = 23, SE 1 + 1 + 7 + 1 = 10, stride-2 blocks 3:
    # convs 2 + 69 + 12 + 20 = 103, adds 26, muls 10; regions: conv+bn 2 + 46 + 12 = 60
    check_topology(fused, stride1=23, se=10)
    ops = reparam_fx.op_counts(fused)
    assert (ops["conv"], ops["add"], ops["mul"], ops["batch_norm"], ops["linear"]) \
        == (103, 26, 10, 0, 1)


def test_repvit_m1_1_topology():
    # One plain fuse (exactness is covered by repvit_m0_9, which has every block type).
    fused = reparam_fx.fuse(zoo.create("repvit_m1_1", num_classes=10).eval())
    # stride-1 blocks 3 + 3 + 13 + 2 = 21, SE 1 + 1 + 6 + 1 = 9, stride-2 blocks 3:
    # convs 2 + 63 + 12 + 18 = 95, adds 24, muls 9; regions: conv+bn 2 + 42 + 12 = 56
    check_topology(fused, stride1=21, se=9)


def test_classifier_heads_in_training_and_eval_mode():
    model = zoo.create("repvit_m0_9", num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    logits, logits_dist = model.train()(x)
    assert logits.shape == logits_dist.shape == (2, 5)
    model.eval()
    features = model.features
    y = x
    for layer in features:
        y = layer(y)
    pooled = y.mean((2, 3))
    heads = model.classifier
    expected = (heads.classifier(pooled) + heads.classifier_dist(pooled)) / 2
    torch.testing.assert_close(model(x), expected)


def test_without_distillation_head():
    model = randomized(zoo.create("repvit_m0_9", num_classes=10, distillation=False).eval())
    fused = reparam_fx.fuse(model)
    assert fused.fusion_report.pattern_counts()["bn+linear"] == 1
    assert "linear heads" not in fused.fusion_report.pattern_counts()
    assert reparam_fx.op_counts(fused)["linear"] == 1
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert reparam_fx.verify(model, fused, (x,), precision="model", rtol=1e-5) <= 1e-5


def test_matches_the_hand_written_reference():
    """Same weights in tests/reference (the official block code with its per-module
    reparameterize): equal outputs in training form, and the hand-reparameterized model has
    exactly as many parameters as reparam_fx's fused one."""
    from reference.models import RepViT as ReferenceRepViT, reparameterize_model

    model = randomized(zoo.create("repvit_m0_9", num_classes=10).eval()).double()
    cfgs = [(k, t, c, se, s) for k, t, c, se, _, s in block_rows(**VARIANTS["repvit_m0_9"])]
    reference = ReferenceRepViT(cfgs, num_classes=10, distillation=True).double().eval()
    renamed = {key.replace(".fc1.", ".conv_reduce.").replace(".fc2.", ".conv_expand."): value
               for key, value in model.state_dict().items()}
    reference.load_state_dict(renamed)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(x), reference(x), rtol=1e-12, atol=1e-12)
    by_hand = reparameterize_model(reference)
    fused = reparam_fx.fuse(model)
    assert reparam_fx.parameter_count(fused) == reparam_fx.parameter_count(by_hand)
    torch.testing.assert_close(fused(x), by_hand(x), rtol=1e-10, atol=1e-10)


def test_traces_and_runs_at_other_multiples_of_32():
    model = zoo.create("repvit_m0_9", num_classes=7).eval()
    traced = torch.fx.symbolic_trace(model)
    for size in (32, 96):
        x = torch.randn(1, 3, size, size)
        out = traced(x)
        assert out.shape == (1, 7)
        torch.testing.assert_close(out, model(x), rtol=0, atol=0)
