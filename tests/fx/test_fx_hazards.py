"""Graphs that tempt a folding pass into a wrong rewrite: shared modules, non-zero padding
modes, values used outside a region, in-place mutation, and the caller's own model,
graph module or exported program (which must never change, nor share storage with the
result). Outputs must stay equal and MACs must never increase (``fx_checks``).
"""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

import reparam_fx
from fx_checks import (RTOL, assert_ops, assert_state_unchanged, fuse_exactly,
                       fuse_refused, fused_modules, randomized, snapshot)
from rules.rule_table import ConvBN, RepVGGBlock, image


# ---- 15. hazards ----------------------------------------------------------------------

class SharedConv(nn.Module):
    """One conv module called on two inputs, each call followed by its own BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.conv(x)) + self.bn2(self.conv(torch.relu(x)))


def test_shared_conv_module_folds_each_call_separately():
    model = randomized(SharedConv())
    fused = fuse_exactly(model, image(), ops={"conv": 2, "batch_norm": 0, "add": 1},
                         patterns={"conv+bn": 2}, already_randomized=True)
    first, second = fused_modules(fused)
    assert not torch.equal(first.weight, second.weight)  # each has its own BN folded in
    assert model.conv.weight.data_ptr() not in {first.weight.data_ptr(), second.weight.data_ptr()}


def test_reflect_padded_conv_folds_its_bn():
    fuse_exactly(ConvBN(4, 4, 3, padding_mode="reflect"), image(),
                 ops={"conv": 1, "batch_norm": 0}, patterns={"conv+bn": 1})
    (conv,) = fused_modules(reparam_fx.fuse(randomized(ConvBN(4, 4, 3, padding_mode="reflect"))))
    assert conv.padding_mode == "reflect"


class ReflectPlusIdentity(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch = ConvBN(4, 4, 3, padding_mode="reflect")

    def forward(self, x):
        return self.branch(x) + x


def test_reflect_padded_conv_does_not_merge_with_identity():
    fused = fuse_refused(ReflectPlusIdentity(), image(), unchanged=("conv", "add"),
                         reason="padding_mode")
    assert "repvgg" not in fused.fusion_report.pattern_counts()


def test_reflect_padded_conv_folds_its_bn_even_when_its_sum_does_not_merge():
    fused = fuse_refused(ReflectPlusIdentity(), image(), unchanged=("conv", "add"),
                         ops={"batch_norm": 0}, reason="never merge")
    assert fused.fusion_report.pattern_counts() == {"conv+bn": 1}


class ValueUsedTwice(nn.Module):
    """``y = bn(conv(x)); out = y + relu(y)``: y is used outside any region."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y + torch.relu(y)


def test_value_used_outside_region_is_materialised_not_duplicated():
    fused = fuse_exactly(ValueUsedTwice(), image(), ops={"conv": 1, "batch_norm": 0, "add": 1},
                         patterns={"conv+bn": 1})
    (conv_node,) = [n for n in fused.graph.nodes if n.op == "call_module"]
    assert len(conv_node.users) == 2  # the relu and the add both read the one conv


class MutatedInput(nn.Module):
    """``y = conv(x); x.mul_(2.0); out = y + x``: the add reads the *mutated* x."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        x.mul_(2.0)
        return y + x


def test_in_place_mutation_blocks_the_merge():
    model = randomized(MutatedInput()).double()
    before = snapshot(model)
    fused = reparam_fx.fuse(model)
    assert_state_unchanged(before, model)
    assert_ops(fused, {"conv": 1, "add": 1, "mul": 1})
    assert not fused.fusion_report.fused
    x = image().double()
    with torch.no_grad():  # the model mutates its input: give each run a fresh copy
        expected, got = model(x.clone()), fused(x.clone())
    assert reparam_fx.relative_error(expected, got) <= RTOL
    # and the value really is conv(x) + 2x, not conv(x) + x
    with torch.no_grad():
        assert reparam_fx.relative_error(model.conv(x) + 2 * x, got) <= RTOL


class MutatedClone(nn.Module):
    """The same hazard on an internal tensor, so ``verify`` can run it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.bn(x.clone())
        y = self.conv(x)
        x.mul_(2.0)
        return y + x


def test_in_place_mutation_of_an_internal_tensor_blocks_the_merge():
    fuse_refused(MutatedClone(), image(), unchanged=("conv", "add", "mul", "batch_norm"),
                 reason=None)


class InPlaceAddOnFreshTensor(nn.Module):
    """``out = conv(x); out += bn(x)``: the mutated tensor has no other reader."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        out = self.conv(x)
        out += self.bn(x)
        return out


def test_in_place_add_on_a_fresh_tensor_merges():
    fuse_exactly(InPlaceAddOnFreshTensor(), image(), ops={"conv": 1, "batch_norm": 0, "add": 0},
                 patterns={"repvgg": 1})


class KeptTermWrittenBeforeTheSum(nn.Module):
    """``y = x + x`` before ``x += x``: in ``y + conv(x) + x`` the conv and the last ``x``
    merge (both read the written ``x``), but ``y``'s terms are the ``x`` before the write
    (fuzzer seed 30589, export)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1, bias=False)

    def forward(self, x):
        y = x + x
        x += x
        return y + self.conv(x) + x


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_partial_sum_keeps_no_term_written_in_place_after_its_inner_sum(capture):
    model = randomized(KeptTermWrittenBeforeTheSum()).double()
    x = image().double()
    if capture == "export":
        model = torch.export.export(model, (x.clone(),))
    fused = reparam_fx.fuse(model)
    reference = model.module() if capture == "export" else model
    with torch.no_grad():  # the model writes its input: give each run a fresh copy
        expected, got = reference(x.clone()), fused(x.clone())
        conv = F.conv2d(2 * x, reference.get_submodule("conv").weight)
    assert reparam_fx.relative_error(expected, got) <= RTOL
    assert reparam_fx.relative_error(2 * x + conv + 2 * x, got) <= RTOL  # the value itself
    assert not fused.fusion_report.fused  # (the rebuilt sum would read x after the write)
    assert_ops(fused, {"conv": 1, "add": 4})
    assert any("modified in place" in s.reason for s in fused.fusion_report.skipped)


# ---- 19. the caller's graph module / exported program never change --------------------

class MixedModel(nn.Module):
    """A foldable RepVGG block, then a conv nothing folds into (kept as it was)."""

    def __init__(self):
        super().__init__()
        self.block = RepVGGBlock(4, 4)
        self.act = nn.ReLU()
        self.head = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        return self.head(self.act(self.block(x)))


def _storage(module_or_state) -> set[int]:
    state = module_or_state if isinstance(module_or_state, dict) else module_or_state.state_dict()
    return {t.untyped_storage().data_ptr() for t in state.values() if t.numel()}


def _assert_shares_no_storage(fused, original_state):
    shared = _storage(fused) & _storage(original_state)
    assert not shared, "the fused model shares parameter storage with its input"


def test_fuse_leaves_a_graph_module_unchanged():
    model = randomized(MixedModel()).double()
    traced = torch.fx.symbolic_trace(model)
    code, graph_text, before = traced.code, str(traced.graph), snapshot(traced)
    fused = reparam_fx.fuse(traced)
    assert traced.code == code and str(traced.graph) == graph_text
    assert_state_unchanged(before, traced)
    assert_ops(fused, {"conv": 2, "batch_norm": 0, "add": 0})
    _assert_shares_no_storage(fused, traced.state_dict())
    _assert_shares_no_storage(fused, model.state_dict())
    reparam_fx.verify(traced, fused, (image().double(),), rtol=RTOL)


def test_fuse_leaves_an_exported_program_unchanged():
    model = randomized(MixedModel()).double()
    x = image().double()
    program = torch.export.export(model, (x,))
    code = program.graph_module.code
    before = {key: value.detach().clone() for key, value in program.state_dict.items()}
    fused = reparam_fx.fuse(program)
    assert program.graph_module.code == code
    assert before.keys() == program.state_dict.keys()
    assert all(torch.equal(value, program.state_dict[key]) for key, value in before.items())
    assert_ops(fused, {"conv": 2, "batch_norm": 0, "add": 0})
    _assert_shares_no_storage(fused, program.state_dict)
    reparam_fx.verify(program, fused, (x,), rtol=RTOL)


def test_fuse_shares_no_storage_with_a_plain_module():
    model = randomized(MixedModel())
    fused = reparam_fx.fuse(model)
    _assert_shares_no_storage(fused, model.state_dict())
    (head,) = [m for m in fused.modules() if isinstance(m, nn.Conv2d) and m.out_channels == 3]
    with torch.no_grad():
        head.weight.add_(1.0)  # editing the result must not reach the input
    assert not torch.equal(head.weight, model.head.weight)


# ---- 20. dtypes -----------------------------------------------------------------------

def test_float64_model_fuses_to_float64_parameters():
    model = randomized(RepVGGBlock()).double()
    fused = reparam_fx.fuse(model)
    assert {p.dtype for p in fused.parameters()} == {torch.float64}
    reparam_fx.verify(model, fused, (image().double(),), rtol=RTOL, precision="model")


def test_float32_model_fuses_within_fp32_round_off():
    model = randomized(nn.Sequential(RepVGGBlock(), nn.ReLU(), RepVGGBlock()))
    fused = reparam_fx.fuse(model)
    assert {p.dtype for p in fused.parameters()} == {torch.float32}
    assert_ops(fused, {"conv": 2, "batch_norm": 0, "add": 0})
    x = image()
    error = reparam_fx.verify(model, fused, (x,), rtol=1e-5, precision="model")
    assert error > 0.0  # really compared in fp32, not float64


# ---- 21. models symbolic_trace cannot capture -----------------------------------------

class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = ConvBN(4, 4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.block(x)
        return -self.block(x)


class ShapeDependent(nn.Module):
    """Python control flow on a shape: symbolic_trace fails, torch.export specialises."""

    def __init__(self):
        super().__init__()
        self.block = RepVGGBlock()

    def forward(self, x):
        if x.shape[-1] % 2 == 0:
            return self.block(x)
        return self.block(x[..., :-1])


def _leaf_reasons(fused) -> str:
    return " ".join(leaf.reason for leaf in fused.fusion_report.leaves)


@pytest.mark.parametrize("pass_inputs", [False, True])
def test_data_dependent_control_flow_fuses_the_blocks_inside(pass_inputs):
    # neither symbolic_trace nor torch.export captures the model's own forward: its
    # children are fused on their own, in a copy of the model
    model = randomized(DataDependent()).double()
    x = image().double()
    fused = reparam_fx.fuse(model, (x,) if pass_inputs else None)
    assert type(fused) is DataDependent and fused is not model
    assert isinstance(fused.block, torch.fx.GraphModule)
    assert_ops(fused.block, {"conv": 1, "batch_norm": 0})
    assert fused.fusion_report.pattern_counts() == {"conv+bn": 1}
    assert "does not trace" in _leaf_reasons(fused)
    for sign in (1, -1):  # both branches of the model's own code
        reparam_fx.verify(model, fused, (sign * x.abs(),), rtol=RTOL)
    assert isinstance(model.block.bn, nn.BatchNorm2d)  # the input is untouched


def test_shape_dependent_control_flow_is_captured_with_export():
    model = randomized(ShapeDependent())
    fused = reparam_fx.fuse(model.double())  # without inputs: the block inside is fused
    assert type(fused) is ShapeDependent and fused.fusion_report.pattern_counts() == {"repvgg": 1}
    for size in (8, 9):
        reparam_fx.verify(model, fused, (image(size=size).double(),), rtol=RTOL)
    fused = fuse_exactly(model, image(), pass_inputs=True, already_randomized=True,
                         ops={"conv": 1, "batch_norm": 0, "add": 0}, patterns={"repvgg": 1})
    assert fused.fusion_report.frontend == "aten"


class KernelFromShape(nn.Module):
    """Global average pooling whose kernel size is ``x.shape[-1]``: computed at run time."""

    def __init__(self):
        super().__init__()
        self.block = ConvBN(4, 4, 3)

    def forward(self, x):
        y = self.block(x)
        return F.avg_pool2d(y, y.shape[-1])


def test_kernel_size_from_a_shape_is_left_alone():
    fused = fuse_refused(KernelFromShape(), image(), unchanged=("avg_pool",),
                         ops={"conv": 1, "batch_norm": 0}, reason="run time")
    assert fused.fusion_report.pattern_counts() == {"conv+bn": 1}


class WriteThroughAView(nn.Module):
    """``y[:, :2].mul_(2)`` (or through an ``nn.Identity``) writes ``y`` itself."""

    def __init__(self, through):
        super().__init__()
        self.through = through
        self.conv0 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv1, self.conv2 = ConvBN(4, 4, 3), ConvBN(4, 4, 1)
        self.ident = nn.Identity()

    def forward(self, x):
        y = torch.relu(self.conv0(x))
        a = self.conv1(y)
        if self.through == "view":
            y[:, :2].mul_(2.0)
        else:
            self.ident(y).mul_(2.0)
        return a + self.conv2(y)


@pytest.mark.parametrize("through", ["view", "identity"])
def test_an_in_place_write_through_a_view_or_alias_keeps_the_merge_apart(through):
    fused = fuse_refused(WriteThroughAView(through), image(), unchanged=("add",), reason=None)
    assert reparam_fx.op_counts(fused)["conv"] == 3
