"""Rules that third-party blocks need: transposed conv + BatchNorm, crops (ACNet's cropped
side branches), padding whose border is then written (DiverseBranchBlock's BNAndPadLayer),
compositions that only pay off inside a sum, reads after an in-place write.

Each rule: a positive test (fold happened, float64 equal, randomised BatchNorm), a negative
test (refused, with its reason), and a hypothesis property over its parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

import reparam_fx
from fx_checks import assert_ops, fuse_exactly, fuse_refused
from rules.rule_table import image


# ---- transposed conv + BatchNorm ------------------------------------------------------

class DeconvBN(nn.Module):
    def __init__(self, cin=4, cout=6, kernel=3, stride=2, padding=1, output_padding=1,
                 groups=1, dilation=1, bias=False, bn_first=False):
        super().__init__()
        self.bn_first = bn_first
        self.deconv = nn.ConvTranspose2d(cin, cout, kernel, stride, padding, output_padding,
                                         groups, bias, dilation)
        self.bn = nn.BatchNorm2d(cin if bn_first else cout)

    def forward(self, x):
        return self.deconv(self.bn(x)) if self.bn_first else self.bn(self.deconv(x))


@pytest.mark.parametrize("groups", [1, 2])
def test_transposed_conv_folds_the_batchnorm_after_it(groups):
    fused = fuse_exactly(DeconvBN(groups=groups), image(), ops={"conv": 1, "batch_norm": 0},
                         patterns={"conv+bn": 1})
    (deconv,) = [m for m in fused.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert deconv.groups == groups and deconv.output_padding == (1, 1)


def test_batchnorm_before_a_transposed_conv_is_refused():
    # its shift would reach output positions through different numbers of taps
    fuse_refused(DeconvBN(bn_first=True), image(), unchanged=("batch_norm",),
                 reason="transposed conv", pass_inputs=True)


@given(kernel=st.integers(1, 4), stride=st.integers(1, 3), padding=st.integers(0, 2),
       groups=st.sampled_from([1, 2]), dilation=st.integers(1, 2), bias=st.booleans(),
       size=st.integers(3, 6))
def test_transposed_conv_bn_property(kernel, stride, padding, groups, dilation, bias, size):
    output_padding = min(stride - 1, 1)  # must be below stride or dilation
    out = (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1
    assume(out >= 1)
    model = DeconvBN(4, 6, kernel, stride, padding, output_padding, groups, dilation, bias)
    fuse_exactly(model, image(4, size), ops={"conv": 1, "batch_norm": 0})


# ---- crops ----------------------------------------------------------------------------

class CroppedBranches(nn.Module):
    """ACNet: a kxk conv with padding p < k // 2 summed with 1xk and kx1 convs on inputs
    cropped by k // 2 - p along the dim they do not pad."""

    def __init__(self, kernel=3, padding=0, crop_form="slices", pad_cropped=False):
        super().__init__()
        # pad_cropped: crop by 1, then pad the cropped dim by 1 again (same size, but the
        # border now reads zeros where the square conv reads the input): must not merge
        self.crop = 1 if pad_cropped else kernel // 2 - padding
        self.form = crop_form
        self.square = nn.Conv2d(4, 4, kernel, padding=padding, bias=False)
        self.hor = nn.Conv2d(4, 4, (1, kernel), padding=(int(pad_cropped), padding), bias=False)
        self.ver = nn.Conv2d(4, 4, (kernel, 1), padding=(padding, int(pad_cropped)), bias=False)
        self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(3))

    def forward(self, x):
        c = self.crop
        if self.form == "slices":
            hor_in, ver_in = x[:, :, c:-c, :], x[:, :, :, c:-c]
        else:
            hor_in, ver_in = x[..., c:-c, :], x[..., c:-c]
        return (self.bns[0](self.square(x)) + self.bns[1](self.hor(hor_in))
                + self.bns[2](self.ver(ver_in)))


@pytest.mark.parametrize("form", ["slices", "ellipsis"])
@pytest.mark.parametrize("kernel, padding", [(3, 0), (5, 1)])
def test_cropped_side_branches_merge(kernel, padding, form):
    # x[:, :, c:-c, :] counts dims from the front: the BatchNorm2d modules prove the rank
    fuse_exactly(CroppedBranches(kernel, padding, form), image(size=9),
                 ops={"conv": 1, "add": 0, "batch_norm": 0})


def test_crop_before_a_conv_that_pads_that_dim_is_refused():
    fused = fuse_refused(CroppedBranches(3, 1, pad_cropped=True), image(size=9),
                         unchanged=(), reason="crop")
    assert reparam_fx.op_counts(fused)["conv"] >= 2


@given(kernel=st.sampled_from([3, 5, 7]), padding=st.integers(0, 2), size=st.integers(8, 11))
def test_cropped_branches_property(kernel, padding, size):
    if padding >= kernel // 2:
        return
    fuse_exactly(CroppedBranches(kernel, padding), image(size=size),
                 ops={"conv": 1, "add": 0, "batch_norm": 0})


# ---- padding with a written border ----------------------------------------------------

class BNAndPad(nn.Module):
    """DiverseBranchBlock's BNAndPadLayer: BN, zero padding, and the border overwritten
    with BN(0) through item assignment (``value`` picks another number, for the refusal)."""

    def __init__(self, pad, channels, value="bn"):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad, self.value = pad, value

    def forward(self, x):
        out = self.bn(x)
        std = torch.sqrt(self.bn.running_var + self.bn.eps)
        fill = self.bn.bias - self.bn.running_mean * self.bn.weight / std
        if self.value != "bn":
            fill = fill + 1.0
        out = F.pad(out, [self.pad] * 4)
        fill = fill.view(1, -1, 1, 1)
        p = self.pad
        out[:, :, 0:p, :] = fill
        out[:, :, -p:, :] = fill
        out[:, :, :, 0:p] = fill
        out[:, :, :, -p:] = fill
        return out


class OneByOneThenKxK(nn.Module):
    """DBB's 1x1 -> BNAndPad -> kxk (no padding) -> BN branch, beside a kxk conv + BN."""

    def __init__(self, kernel=3, value="bn"):
        super().__init__()
        p = kernel // 2
        self.dense = nn.Conv2d(4, 4, kernel, padding=p, bias=False)
        self.dense_bn = nn.BatchNorm2d(4)
        self.one = nn.Conv2d(4, 4, 1, bias=False)
        self.pad = BNAndPad(p, 4, value)
        self.kxk = nn.Conv2d(4, 4, kernel, bias=False)
        self.kxk_bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.dense_bn(self.dense(x)) + self.kxk_bn(self.kxk(self.pad(self.one(x))))


def test_bn_and_pad_branch_merges_into_one_conv():
    fuse_exactly(OneByOneThenKxK(), image(), ops={"conv": 1, "batch_norm": 0, "add": 0})
    model, x = OneByOneThenKxK().double().eval(), image().double()
    fused = reparam_fx.fuse(torch.export.export(model, (x,)))  # slices and copy_ there
    assert_ops(fused, {"conv": 1, "batch_norm": 0})  # (randomised through export: corpus dbb.*)
    reparam_fx.verify(model, fused, (x,), rtol=1e-10)


def test_a_border_other_than_bn_of_zero_is_refused():
    fused = fuse_refused(OneByOneThenKxK(value="other"), image(), unchanged=("pad",),
                         reason="padding after a 1x1 conv")
    assert reparam_fx.op_counts(fused)["conv"] >= 2


@given(kernel=st.sampled_from([3, 5]), size=st.integers(5, 9))
def test_bn_and_pad_property(kernel, size):
    fuse_exactly(OneByOneThenKxK(kernel), image(size=size),
                 ops={"conv": 1, "batch_norm": 0, "add": 0})


# ---- reads after an in-place write ----------------------------------------------------

class GainInPlace(nn.Module):
    """NF-net style: ``out.mul_(gain)`` whose result is not used; ``out`` is read after."""

    def __init__(self, read_before=False):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.gain = nn.Parameter(torch.tensor(0.7))
        self.read_before = read_before

    def forward(self, x):
        out = self.conv(x)
        view = out.view(-1) if self.read_before else None
        out.mul_(self.gain)
        out = out * 0.2 + 1.0
        return out if view is None else out + view.sum()


def test_reads_after_an_in_place_write_see_it():
    fuse_exactly(GainInPlace(), image(), ops={"conv": 1, "mul": 0, "add": 0})


def test_a_view_taken_before_an_in_place_write_keeps_the_graph():
    fused = fuse_refused(GainInPlace(read_before=True), image(), unchanged=("mul",),
                         reason=None)
    assert_ops(fused, {"conv": 1})


# ---- found in review ------------------------------------------------------------------

class CropFromTheFront(nn.Module):
    """``y[:, :, 1:-1]`` on a 4-D tensor crops H: the dims not indexed are whole."""

    def __init__(self):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(4)  # proves the rank
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(self.bn0(x))[:, :, 1:-1])


def test_a_crop_indexed_from_the_front_crops_the_dim_it_names():
    x = torch.randn(2, 4, 8, 10)
    fused = fuse_exactly(CropFromTheFront(), x, ops={"batch_norm": 1},
                         patterns={"crop": 1})
    assert fused(x.double()).shape == (2, 4, 6, 10)


class PaddedOneByOne(nn.Module):
    def __init__(self):
        super().__init__()
        self.one = nn.Conv2d(8, 8, 1, bias=False)

    def forward(self, x):
        return torch.relu(F.pad(self.one(x), [3, 3, 3, 3]))


def test_padding_after_a_lone_1x1_conv_is_not_moved_into_it():
    # as the conv's padding it would run on the padded border too: more MACs
    fuse_refused(PaddedOneByOne(), image(8), unchanged=("conv", "pad"), reason=None)


def test_a_border_that_is_almost_bn_of_zero_is_refused():
    class Fill(BNAndPad):
        def forward(self, x):
            out = F.pad(self.bn(x), [self.pad] * 4)
            fill = (self.bn.bias - self.bn.running_mean * self.bn.weight
                    / torch.sqrt(self.bn.running_var + self.bn.eps * 10)).view(1, -1, 1, 1)
            p = self.pad
            out[:, :, 0:p, :] = fill
            out[:, :, -p:, :] = fill
            out[:, :, :, 0:p] = fill
            out[:, :, :, -p:] = fill
            return out
    model = OneByOneThenKxK()
    model.pad = Fill(1, 4)
    fused = fuse_refused(model, image(), unchanged=("pad",), reason="padding after a 1x1 conv")
    assert reparam_fx.op_counts(fused)["conv"] >= 2


def test_a_fixed_slice_in_a_dynamic_export_is_no_crop():
    class FixedSlice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)[..., 1:7])
    model = FixedSlice().double().eval()
    width = torch.export.Dim("W", min=8)
    program = torch.export.export(model, (image(size=8).double(),),
                                  dynamic_shapes=({3: width},))
    fused = reparam_fx.fuse(program)
    x = torch.randn(2, 4, 8, 12, dtype=torch.float64)
    assert fused(x).shape == model(x).shape == (2, 4, 8, 6)
    reparam_fx.verify(model, fused, (x,), rtol=1e-10)


# ---- the BatchNorm family: SyncBatchNorm, lazy, frozen-in-place subclasses --------------
# A BatchNorm of any class that runs torch's own forward is one op: in eval mode every one
# of them is ``F.batch_norm`` on its running statistics (SyncBatchNorm synchronises only in
# training). A subclass whose forward calls ``super().forward(x)`` is traced through.

def _world_size() -> int:
    """detectron2 ``comm.get_world_size()``: 1 without an initialised process group."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class NaiveSyncBatchNorm(nn.BatchNorm2d):
    """facebookresearch/detectron2 detectron2/layers/batch_norm.py: NaiveSyncBatchNorm — its
    own forward returns ``super().forward(input)`` with one process or in eval mode."""

    def __init__(self, *args, stats_mode="", **kwargs):
        super().__init__(*args, **kwargs)
        assert stats_mode in ("", "N")
        self._stats_mode = stats_mode

    def forward(self, input):
        if _world_size() == 1 or not self.training:
            return super().forward(input)
        raise NotImplementedError("all-reduce of the batch statistics across processes")


class RegisteredBatchNorm(nn.BatchNorm2d):
    """A subclass that adds nothing (as registries wrap norms)."""


class RegisteredSyncBatchNorm(nn.SyncBatchNorm):
    pass


class BatchNormXd(nn.modules.batchnorm._BatchNorm):
    """open-mmlab/mmengine mmengine/model/utils.py: _BatchNormXd — what
    ``revert_sync_batchnorm`` puts in place of a SyncBatchNorm: no input check at all."""

    def _check_input_dim(self, input):
        return


class AnyRankBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose own check accepts 3-D input too: its class proves no rank."""

    def _check_input_dim(self, input):
        if input.dim() not in (3, 4):
            raise ValueError("expected 3D or 4D input")


class SuperForwardBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x)


class ScaledBatchNorm(nn.BatchNorm2d):
    """A forward of its own that does not trace (control flow on a size): not read as a
    BatchNorm, whatever its class."""

    def forward(self, x):
        if x.shape[1] != self.num_features:
            raise ValueError("channels")
        return super().forward(x) * 2.0


def _lazy(channels):
    return nn.LazyBatchNorm2d()


BATCHNORMS = {
    "BatchNorm2d": nn.BatchNorm2d, "SyncBatchNorm": nn.SyncBatchNorm,
    "LazyBatchNorm2d (run once)": _lazy, "subclass": RegisteredBatchNorm,
    "SyncBatchNorm subclass": RegisteredSyncBatchNorm, "NaiveSyncBatchNorm": NaiveSyncBatchNorm,
    "super().forward": SuperForwardBatchNorm, "_BatchNormXd": BatchNormXd,
}


class ConvNormClassifier(nn.Module):
    """conv -> norm -> ReLU -> AdaptiveAvgPool2d(1) -> flatten(1) -> Linear (the classifier
    head proves the conv's input batched, whatever the norm's class proves)."""

    def __init__(self, norm, cin=3, cout=8, kernel=3, stride=1, groups=1, bias=False,
                 classes=5, head=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=bias)
        self.bn = norm(cout)
        self.head = head
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cout, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        if not self.head:
            return x
        return self.fc(torch.flatten(self.pool(x), 1))


def _materialised(model, x):
    """Lazy modules take their shapes from their first input."""
    with torch.no_grad():
        model(x)
    return model


@pytest.mark.parametrize("norm", list(BATCHNORMS), ids=list(BATCHNORMS))
def test_every_batchnorm_class_folds_into_the_conv_before_it(norm):
    x = image(3, 8)
    model = _materialised(ConvNormClassifier(BATCHNORMS[norm]), x)
    fused = fuse_exactly(model, x, ops={"conv": 1, "batch_norm": 0, "linear": 1},
                         patterns={"conv+bn": 1})
    assert not fused.fusion_report.skipped, fused.fusion_report.table()
    program = torch.export.export(model.double().eval(), (x.double(),))
    exported = reparam_fx.fuse(program)
    assert_ops(exported, {"conv": 1, "batch_norm": 0, "linear": 1})
    assert reparam_fx.verify(model, exported, (x.double(),), rtol=1e-10) <= 1e-10


@pytest.mark.parametrize("norm", ["BatchNorm2d", "subclass", "NaiveSyncBatchNorm",
                                  "super().forward"])
def test_a_batchnorm2d_class_proves_its_input_rank(norm):
    # no head: BatchNorm2d's own check (4-D, kept by subclasses, traced as an assert
    # through super().forward) is the proof
    fuse_exactly(ConvNormClassifier(BATCHNORMS[norm], head=False), image(3, 8),
                 ops={"conv": 1, "batch_norm": 0})


@pytest.mark.parametrize("norm", [nn.SyncBatchNorm, BatchNormXd, AnyRankBatchNorm2d],
                         ids=["SyncBatchNorm", "_BatchNormXd", "own 3-D/4-D check"])
def test_a_batchnorm_that_takes_several_ranks_needs_a_proof(norm):
    # after a conv, which also takes unbatched (C, H, W) input, axis 1 may be H
    model = ConvNormClassifier(norm, head=False)
    fuse_refused(model, image(3, 8), unchanged=("batch_norm",), reason="pass example_inputs")
    fuse_exactly(model, image(3, 8), pass_inputs=True, ops={"conv": 1, "batch_norm": 0})


class NormLinearHead(nn.Module):
    """conv -> SyncBatchNorm, then timm's EfficientViT/LeViT head written functionally:
    ``adaptive_avg_pool2d(x, 1).flatten(1)`` -> BatchNorm1d -> Dropout -> Linear."""

    def __init__(self, pooled=1):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.SyncBatchNorm(8)
        self.pooled = pooled
        self.head = nn.Sequential(nn.BatchNorm1d(8 * pooled * pooled), nn.Dropout(0.1),
                                  nn.Linear(8 * pooled * pooled, 5))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.bn(self.conv(x)), self.pooled).flatten(1)
        return self.head(x)


@pytest.mark.parametrize("pooled", [1, 2])
def test_a_functional_head_through_batchnorm1d_proves_the_rank(pooled):
    # a 3-D input would give flatten(1) a (C, pooled**2) tensor: the head rejects it
    fuse_exactly(NormLinearHead(pooled), image(3, 8), ops={"conv": 1, "batch_norm": 0})


def test_a_head_whose_width_matches_the_pooled_size_proves_nothing():
    # Linear(1, k) after flatten(pool(x, 1), 1): a 3-D (1, H, W) input would reach it as
    # (1, 1) too, so the head does not prove the input batched
    model = ConvNormClassifier(nn.SyncBatchNorm, cout=1)
    fuse_refused(model, image(3, 8), unchanged=("batch_norm",), reason="pass example_inputs")


@pytest.mark.parametrize("norm", ["SyncBatchNorm", "NaiveSyncBatchNorm", "subclass",
                                  "super().forward"])
def test_a_batchnorm_in_training_mode_is_refused(norm):
    from fx_checks import randomized, snapshot, assert_state_unchanged
    model = randomized(ConvNormClassifier(BATCHNORMS[norm])).double()
    model.bn.train()  # the rest of the model in eval mode
    before = snapshot(model)
    fused = reparam_fx.fuse(model)
    assert_state_unchanged(before, model)  # tracing super().forward counts no batch
    assert_ops(fused, {"batch_norm": 1})
    assert any("training mode" in s.reason for s in fused.fusion_report.skipped)
    if hasattr(fused, "bn"):  # (a leaf; a subclass traced through is F.batch_norm)
        assert fused.bn.training
    assert reparam_fx.verify(model, fused, (image(3, 8).double(),), rtol=1e-10) <= 1e-10


def test_a_batchnorm_without_running_statistics_is_refused():
    model = ConvNormClassifier(lambda c: nn.SyncBatchNorm(c, track_running_stats=False))
    fuse_refused(model, image(3, 8), unchanged=("batch_norm",),
                 reason="without running statistics")


def test_a_batchnorm_subclass_with_a_forward_of_its_own_is_not_read_as_one():
    model = ConvNormClassifier(ScaledBatchNorm)
    fuse_refused(model, image(3, 8), unchanged=("batch_norm",),
                 reason="overrides BatchNorm's forward")


def test_an_uninitialised_lazy_batchnorm_is_a_clear_error():
    model = ConvNormClassifier(_lazy).eval()
    with pytest.raises(reparam_fx.FusionError, match="not yet initialised.*LazyBatchNorm2d"):
        reparam_fx.fuse(model)
    assert isinstance(model.bn, nn.LazyBatchNorm2d)  # nor did fuse initialise it


@given(kernel=st.sampled_from([1, 3, 5]), stride=st.integers(1, 2),
       groups=st.sampled_from([1, 2, 4]), bias=st.booleans(), channels=st.sampled_from([4, 8]),
       norm=st.sampled_from(sorted(BATCHNORMS)), size=st.integers(5, 9))
def test_batchnorm_family_property(kernel, stride, groups, bias, channels, norm, size):
    x = image(4, size)
    model = _materialised(ConvNormClassifier(BATCHNORMS[norm], 4, channels, kernel, stride,
                                             groups, bias), x)
    fuse_exactly(model, x, ops={"conv": 1, "batch_norm": 0, "linear": 1})
