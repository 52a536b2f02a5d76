"""RepVGG zoo: parameter counts against the paper, exact fusion, the single-conv topology.

Every RepVGG block (3x3 conv+BN, 1x1 conv+BN, optional identity BN, summed, then ReLU)
must become exactly one 3x3 conv with bias, so RepVGG-A has 1 + (2 + 4 + 14 + 1) = 22
convs and RepVGG-B has 1 + (4 + 6 + 16 + 1) = 28 after fusing, plus the linear head, and
no BatchNorm or add left.
"""

from __future__ import annotations


import pytest
import torch

import reparam_fx
import zoo
import zoo.repvgg  # noqa: F401  (registers the variants)
from zoo.repvgg import GROUPWISE_LAYERS, VARIANTS
from zoo_checks import check_parameter_counts, fuse_and_check

# Official figures (millions): training form -> single-conv inference form, 1000 classes.
OFFICIAL = {
    "repvgg_a0": (9.11, 8.31),
    "repvgg_a1": (14.09, 12.79),
    "repvgg_a2": (28.21, 25.50),
    "repvgg_b0": (15.82, 14.34),
    "repvgg_b1": (57.42, 51.83),
    "repvgg_b1g2": (45.78, 41.36),
    "repvgg_b1g4": (39.97, 36.12),
    "repvgg_b2": (89.02, 80.32),
    "repvgg_b2g4": (61.76, 55.78),
    "repvgg_b3": (123.09, 110.96),
    "repvgg_b3g4": (83.83, 75.63),
}
# The published 36.12 M for RepVGG-B1g4 truncates the exact count of the official
# inference-time network (28 grouped 3x3 convs with bias + the linear head), 36,125,416;
# check_parameter_counts accepts truncated figures, and test_exact_counts holds the
# fused model to the exact integer.


def layer_specs(num_blocks, width_multiplier, groups):
    """(in_channels, out_channels, stride, groups) of every block, from the paper's rules."""
    a = width_multiplier
    widths = [int(64 * a[0]), int(128 * a[1]), int(256 * a[2]), int(512 * a[3])]
    in_planes = min(64, int(64 * a[0]))
    specs = [(3, in_planes, 2, 1)]
    for width, count in zip(widths, num_blocks):
        for stride in [2] + [1] * (count - 1):
            layer = len(specs)
            specs.append((in_planes, width, stride, groups if layer in GROUPWISE_LAYERS else 1))
            in_planes = width
    return specs, widths[-1]


def expected_counts(name: str, num_classes: int = 1000) -> tuple[int, int]:
    """Exact (training, single-conv) parameter counts, from the architecture alone."""
    specs, features = layer_specs(**VARIANTS[name])
    head = features * num_classes + num_classes
    train = single = head
    for cin, cout, stride, groups in specs:
        per_position = cout * (cin // groups)
        single += 9 * per_position + cout                           # 3x3 conv with bias
        train += 9 * per_position + 2 * cout + per_position + 2 * cout  # 3x3+BN, 1x1+BN
        if cin == cout and stride == 1:
            train += 2 * cin                                        # identity BN
    return train, single


def test_every_variant_is_registered():
    assert set(OFFICIAL) == set(VARIANTS)
    assert set(OFFICIAL) <= set(zoo.names())


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_parameter_counts(name):
    train_m, single_m = OFFICIAL[name]
    train, after = check_parameter_counts(name, train_m, single_m)
    exact_train, exact_single = expected_counts(name)
    assert round(train * 1e6) == exact_train
    assert round(after * 1e6) == exact_single


def test_exact_counts_agree_with_published_figures():
    for name, (train_m, single_m) in OFFICIAL.items():
        exact_train, exact_single = expected_counts(name)
        assert abs(exact_train / 1e6 - train_m) <= 0.005 + 1e-9, name
        assert abs(exact_single / 1e6 - single_m) <= 0.01, name
    assert expected_counts("repvgg_b1g4")[1] == 36_125_416


def check_topology(fused, n_blocks: int):
    ops = reparam_fx.op_counts(fused)
    assert {k: v for k, v in ops.items() if v} == {"conv": n_blocks, "linear": 1}, \
        fused.fusion_report.table()
    assert fused.fusion_report.pattern_counts() == {"repvgg": n_blocks}


def test_repvgg_a0_fuses_exactly_to_22_convs():
    _, fused = fuse_and_check("repvgg_a0", size=64)
    check_topology(fused, n_blocks=1 + 2 + 4 + 14 + 1)
    convs = [m for m in fused.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.kernel_size == (3, 3) and c.bias is not None for c in convs)


def test_narrow_repvgg_b1g4_fuses_exactly_to_28_grouped_convs():
    # RepVGG-B depths (1 + 4 + 6 + 16 + 1 blocks) with 4 groups in layers 2, 4, ..., 26,
    # narrowed to widths 16/32/64/128 so the grouped 3x3, 1x1 and identity branches are
    # checked exactly at little cost.
    _, fused = fuse_and_check("repvgg_b1g4", size=64, num_classes=10,
                              width_multiplier=(0.25, 0.25, 0.25, 0.25))
    check_topology(fused, n_blocks=1 + 4 + 6 + 16 + 1)
    convs = [m for m in fused.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.groups for c in convs] == [4 if i in GROUPWISE_LAYERS else 1 for i in range(28)]


def test_traces_and_runs_at_other_multiples_of_32():
    model = zoo.create("repvgg_a0", num_classes=7).eval()
    traced = torch.fx.symbolic_trace(model)
    for size in (32, 96):
        x = torch.randn(1, 3, size, size)
        out = traced(x)
        assert out.shape == (1, 7)
        torch.testing.assert_close(out, model(x), rtol=0, atol=0)
