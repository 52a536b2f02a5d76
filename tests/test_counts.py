"""reparam_fx.mac_count: multiply-accumulates as papers count them, checked against
closed-form figures (and a fused model never has more than its training form)."""

import pytest
import torch
import torch.nn as nn

import reparam_fx


@pytest.mark.parametrize("module, shape, expected", [
    (nn.Conv2d(3, 8, 3, padding=1), (1, 3, 16, 16), 8 * 3 * 9 * 16 * 16),
    (nn.Conv2d(8, 8, 3, padding=1, groups=4), (2, 8, 16, 16), 2 * 8 * 2 * 9 * 16 * 16),
    (nn.Conv2d(4, 6, 3, stride=2), (1, 4, 9, 9), 6 * 4 * 9 * 4 * 4),
    (nn.Conv1d(4, 5, 3), (1, 4, 10), 5 * 4 * 3 * 8),
    (nn.Linear(5, 7), (3, 5), 3 * 5 * 7),
])
def test_mac_count_of_single_layers(module, shape, expected):
    assert reparam_fx.mac_count(module.eval(), torch.randn(shape)) == expected


def test_mac_count_ignores_elementwise_ops_and_counts_matmuls():
    class Attention(nn.Module):
        def forward(self, q):
            weights = torch.softmax(q @ q.transpose(-2, -1), dim=-1)
            return nn.functional.relu(weights @ q)
    q = torch.randn(2, 6, 4)  # two (6 x 4) @ (4 x 6) and two (6 x 6) @ (6 x 4) products
    assert reparam_fx.mac_count(Attention(), (q,)) == 2 * (6 * 4 * 6 + 6 * 6 * 4)
    bn = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()).eval()
    assert reparam_fx.mac_count(bn, torch.randn(1, 3, 8, 8)) == 0


@pytest.mark.parametrize("pool, shape, expected", [
    (nn.AvgPool2d(2), (1, 3, 8, 8), 3 * 4 * 4 * 4),               # each output adds 2x2 values
    (nn.AvgPool2d(3, 1, 1), (2, 4, 5, 7), 2 * 4 * 5 * 7 * 9),
    (nn.AvgPool1d(3, 2), (1, 4, 9), 4 * 4 * 3),
    (nn.AvgPool3d(2), (1, 2, 4, 4, 4), 2 * 8 * 8),
])
def test_mac_count_counts_average_pools_as_their_additions(pool, shape, expected):
    """A pool costs what the depthwise conv ``fuse`` may write in its place costs."""
    assert reparam_fx.mac_count(pool, torch.randn(shape)) == expected
    depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
    if isinstance(pool, nn.AvgPool2d) and pool.kernel_size == 3:
        assert reparam_fx.mac_count(depthwise, torch.randn(shape)) == expected


def test_fused_repvgg_block_has_fewer_macs():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense, self.bn3 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.one, self.bn1 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)

        def forward(self, x):
            return self.bn3(self.dense(x)) + self.bn1(self.one(x)) + x
    model, x = Block().eval(), torch.randn(1, 8, 12, 12)
    fused = reparam_fx.fuse(model)
    assert reparam_fx.mac_count(model, x) == 8 * 8 * (9 + 1) * 144
    assert reparam_fx.mac_count(fused, x) == 8 * 8 * 9 * 144
