"""Hypothesis properties of reparam_fx.fuse over generated blocks, heads and small graphs.

Every property checks both halves: the fused model computes the same function (float64,
rtol 1e-9; fp32 within 1e-5) AND the fold that the oracle in :mod:`reparam_fx.testing`
predicts happened (or did not). The oracle is written independently of the engine.
"""

import copy

import pytest
import torch
from hypothesis import event, given, note
from hypothesis import strategies as st

import reparam_fx
from reparam_fx.testing import (
    BlockSpec, BranchSpec, assert_fuses_exactly, block_specs, conv_batchnorm_pairs, count_macs,
    linear_head_specs, small_graphs,
)

conv, identity, batchnorm = BranchSpec.conv, BranchSpec.identity, BranchSpec.batchnorm
seeds = st.integers(0, 2**16 - 1)


def _state(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def _assert_same_state(before, model):
    after = model.state_dict()
    assert before.keys() == after.keys(), "fuse changed the input model's state_dict keys"
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"fuse mutated the input model: {key}"


def _check_fp32(model, inputs):
    """fp32 fused model within 1e-5 (relative) of the fp32 original; input untouched."""
    before = _state(model)
    fused = reparam_fx.fuse(model, inputs)
    reparam_fx.verify(model, fused, inputs, rtol=1e-5, precision="model")
    _assert_same_state(before, model)
    return fused


def _describe(spec: BlockSpec):
    note(spec.describe())
    event("merges" if spec.merges else f"does not merge: {spec.merge_reason}")


def _check_block(spec: BlockSpec, seed: int):
    model = spec.build(seed=seed)
    x = spec.example_input(seed=seed)
    fused = assert_fuses_exactly(model, (x,), rtol=1e-9, expect_ops=spec.expected_ops())
    assert conv_batchnorm_pairs(fused) == []
    assert count_macs(fused, (x.double(),)) <= count_macs(model, (x,))
    _check_fp32(model, (x,))


# ---- the oracle itself, on blocks from the papers -----------------------------------------

# name: (spec, merges, convs, batch_norms)
NAMED_BLOCKS = {
    "repvgg": (BlockSpec(2, 4, 4, (conv(3), conv(1), batchnorm())), True, 1, 0),
    "repvgg stride 2": (BlockSpec(2, 4, 8, (conv(3), conv(1)), stride=2), True, 1, 0),
    "mobileone depthwise": (BlockSpec(2, 4, 4, (conv(3, groups=4), conv(3, groups=4), conv(1, groups=4),
                                                batchnorm())), True, 1, 0),
    "acnet": (BlockSpec(2, 4, 6, (conv(3), conv((1, 3)), conv((3, 1)))), True, 1, 0),
    "repmixer": (BlockSpec(2, 4, 4, (conv(3, groups=4), batchnorm(subtract=True)), layer_scale=True,
                           residual=True), True, 1, 0),
    "cpe": (BlockSpec(2, 4, 4, (conv(3, groups=4, bias=True, bn=False),), residual=True), True, 1, 0),
    "large+small kernel": (BlockSpec(2, 4, 4, (conv(5), conv(3, dilation=2))), True, 1, 0),
    "post bn and scale": (BlockSpec(2, 3, 3, (conv(3), identity()), post_bn=True, layer_scale=True,
                                    post_act="relu"), True, 1, 0),
    "reflect chain": (BlockSpec(2, 4, 4, (conv(3, padding_mode="reflect"),), post_bn=True, layer_scale=True),
                      True, 1, 0),
    "conv1d": (BlockSpec(1, 4, 4, (conv(5), conv(1), identity())), True, 1, 0),
    "conv3d": (BlockSpec(3, 2, 2, (conv(3), conv(1))), True, 1, 0),
    # negatives
    "dense+depthwise": (BlockSpec(2, 4, 4, (conv(3, groups=4), conv(1))), False, 2, 0),
    # (the post BN distributes over the two convs that do not merge)
    "reflect branch": (BlockSpec(2, 4, 4, (conv(3, padding_mode="reflect"), conv(1)), post_bn=True),
                       False, 2, 0),
    "relu branch, post BN": (BlockSpec(2, 4, 4, (conv(3, act="relu"), conv(1)), post_bn=True),
                             False, 2, 1),
    "dilation mix": (BlockSpec(2, 4, 4, (conv(3, dilation=2), conv(3))), False, 2, 0),
    "relu inside a branch": (BlockSpec(2, 4, 4, (conv(3, act="relu"), conv(1), batchnorm())), False, 2, 0),
    "stride 2, centres differ": (BlockSpec(2, 4, 4, (conv(2, padding=0), conv(1)), stride=2, size=(6, 6)),
                                 False, 2, 0),
    "taps off the lattice": (BlockSpec(2, 4, 4, (conv(3, dilation=2), conv(2, dilation=2, padding=1))),
                             False, 2, 0),
    "reflect + residual": (BlockSpec(2, 4, 4, (conv(3, groups=4, padding_mode="reflect"),), residual=True,
                                     layer_scale=True), False, 1, 0),
}


@pytest.mark.parametrize("name", sorted(NAMED_BLOCKS))
def test_oracle_on_named_blocks(name):
    spec, merges, convs, batch_norms = NAMED_BLOCKS[name]
    assert (spec.merges, spec.expected_convs(), spec.expected_batch_norms()) == (merges, convs, batch_norms), \
        spec.merge_reason
    traced = torch.fx.symbolic_trace(spec.build())
    assert reparam_fx.op_counts(traced)["conv"] == spec.original_ops()["conv"]


def test_oracle_reflect_residual_keeps_only_the_add():
    spec = NAMED_BLOCKS["reflect + residual"][0]
    assert spec.expected_ops() == {"conv": 1, "batch_norm": 0, "add": 1, "sub": 0, "mul": 0}


@pytest.mark.parametrize("name", sorted(NAMED_BLOCKS))
def test_named_block_fuses_as_predicted(name):
    _check_block(NAMED_BLOCKS[name][0], seed=0)


# ---- properties ----------------------------------------------------------------------------

@given(spec=block_specs(dims=(1,), max_channels=8), seed=seeds)
def test_block_1d_fuses_exactly(spec, seed):
    _describe(spec)
    _check_block(spec, seed)


@given(spec=block_specs(dims=(2,), max_channels=8), seed=seeds)
def test_block_2d_fuses_exactly(spec, seed):
    _describe(spec)
    _check_block(spec, seed)


@given(spec=block_specs(dims=(3,), max_channels=4, max_branches=3, sizes={3: (2, 4)}), seed=seeds)
def test_block_3d_fuses_exactly(spec, seed):
    _describe(spec)
    _check_block(spec, seed)


@given(spec=linear_head_specs(), seed=seeds)
def test_linear_heads_fuse_to_one_linear(spec, seed):
    note(repr(spec))
    model = spec.build(seed=seed)
    x = spec.example_input(seed=seed)
    assert_fuses_exactly(model, (x,), rtol=1e-9, expect_ops=spec.expected_ops())
    _check_fp32(model, (x,))


@given(spec=small_graphs(), seed=seeds)
def test_small_graphs_fuse_exactly(spec, seed):
    note(spec.describe())
    model = spec.build(seed=seed)
    x = spec.example_input(seed=seed)
    fused = assert_fuses_exactly(model, (x,), rtol=1e-9)
    assert conv_batchnorm_pairs(fused) == [], "a BatchNorm directly after a single-use conv was not folded"
    before, after = reparam_fx.op_counts(model), reparam_fx.op_counts(fused)
    assert after["conv"] <= before["conv"] and after["batch_norm"] <= before["batch_norm"], (before, after)
    assert count_macs(fused, (x.double(),)) <= count_macs(model, (x,))
    _check_fp32(model, (x,))


def test_fuse_does_not_touch_a_graph_module_input():
    """A GraphModule passed in is not edited in place either."""
    spec = NAMED_BLOCKS["repvgg"][0]
    traced = torch.fx.symbolic_trace(spec.build())
    code, state = traced.code, _state(traced)
    snapshot = copy.deepcopy(traced)
    fused = reparam_fx.fuse(traced)
    assert traced.code == code
    _assert_same_state(state, traced)
    reparam_fx.verify(snapshot, fused, (spec.example_input(),), rtol=1e-6)


# ---- sums merge whatever the branch order ---------------------------------------------------

# Add chains are flattened before merging, so a branch that cannot merge (nonlinear,
# reflect-padded) does not stop the branches after it, and the MAC gate is judged on the
# whole sum. Each entry: (block, convs left after fusing).
REASSOCIATION = {
    "nonlinear branch first": (BlockSpec(2, 4, 4, (conv(3, act="relu"), conv(3), conv(1), batchnorm())), 2),
    "reflect branch second": (BlockSpec(2, 4, 4, (conv(3), conv(3, padding_mode="reflect"), conv(1),
                                                  batchnorm())), 2),
    "MAC gate passes only for the whole sum": (BlockSpec(2, 4, 4, (conv(3, groups=4), conv(1), conv(3))), 1),
}



@pytest.mark.parametrize("name", sorted(REASSOCIATION))
def test_sum_merges_in_any_branch_order(name):
    """The linear branches merge around a branch that cannot, in any position."""
    spec, convs = REASSOCIATION[name]
    x = spec.example_input()
    fused = assert_fuses_exactly(spec.build(), (x,))
    assert reparam_fx.op_counts(fused)["conv"] == convs
