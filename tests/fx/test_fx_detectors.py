"""Whole detectors: the idioms of YOLO-style programs, each in a small model.

* a top-level ``forward`` with non-tensor arguments (``forward(x, augment=False,
  profile=False)``, ``forward(x, *args, **kwargs)`` passed on to ``predict``): bound to their
  defaults, the result guards them;
* a layer list run by a routing loop reading ``m.f`` / ``m.i`` (and ``isinstance(m, ...)``,
  and a ``profile`` branch that cannot run): fused item by item when the loop does not trace;
* heads that do not trace (a grid cache keyed by the input's shape): their children fused,
  children called in a row (``ImplicitA`` -> conv -> ``ImplicitM``) fused as one, and
  branches handed out by a property (``**self.one2many``);
* a kept-whole head that writes into its input list still exports.

Every check is in float64 against the model, with the folds counted.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import reparam_fx
from reparam_fx.testing import randomize_batchnorm_

RTOL = 1e-12


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = model.double().eval()
    randomize_batchnorm_(model, seed=seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.rand_like(parameter) * 0.5 + 0.25)
    return model


def image(channels=3, size=16, seed=0):
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


class ConvBN(nn.Module):
    def __init__(self, c1, c2, k=1, s=1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Implicit(nn.Module):
    def __init__(self, channels, multiply=False):
        super().__init__()
        self.multiply = multiply
        self.implicit = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        return self.implicit * x if self.multiply else self.implicit + x


class GridHead(nn.Module):
    """YOLOv7 ``IDetect``'s shape: ``x[i] = self.m[i](self.ia[i](x[i]))``, then
    ``x[i] = self.im[i](x[i])``, a grid cached by shape (does not trace), writes into its
    input list."""

    def __init__(self, channels=(8, 16), outputs=6, kernel=1):
        super().__init__()
        self.nl = len(channels)
        self.grid = [torch.zeros(1)] * self.nl
        self.m = nn.ModuleList(nn.Conv2d(c, outputs, kernel, padding=kernel // 2) for c in channels)
        self.ia = nn.ModuleList(Implicit(c) for c in channels)
        self.im = nn.ModuleList(Implicit(outputs, multiply=True) for _ in channels)

    def forward(self, x):
        z = []
        for i in range(self.nl):
            x[i] = self.m[i](self.ia[i](x[i]))
            x[i] = self.im[i](x[i])
            bs, _, ny, nx = x[i].shape
            if self.grid[i].shape[2:4] != x[i].shape[2:4]:
                yv, xv = torch.meshgrid([torch.arange(ny), torch.arange(nx)], indexing="ij")
                self.grid[i] = torch.stack((xv, yv), 0).view(1, 2, ny, nx).to(x[i])
            z.append((x[i][:, :2] + self.grid[i]).flatten(2))
        return torch.cat(z, 2), x


class Routed(nn.Module):
    """A layer list run by a routing loop (YOLOv7 / ultralytics): ``m.f`` (int or list),
    ``m.i``, ``self.save``; ``forward(x, augment=False, profile=False)``."""

    def __init__(self, head=None, traceable=True):
        super().__init__()
        layers = [(-1, ConvBN(3, 8, 3, 2)), (-1, ConvBN(8, 8, 3)), (-1, ConvBN(8, 16, 3, 2)),
                  ([1, -1], Concat()), (-1, ConvBN(16 + 8, 16, 1)),
                  ([1, 4], head or GridHead())]
        for i, (f, m) in enumerate(layers):
            m.f, m.i, m.type = f, i, type(m).__name__
        self.model = nn.Sequential(*(m for _, m in layers))
        self.save = [1, 4]
        self.traceable = traceable

    def forward(self, x, augment=False, profile=False):
        if augment:
            return self.forward_once(x.flip(3), profile)
        return self.forward_once(x, profile)

    def forward_once(self, x, profile=False):
        y = []
        if not self.traceable and x.shape[-1] % 2:  # shape control flow: does not trace
            x = x[..., :-1]
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            if isinstance(m, (GridHead, PropertyHead)) and getattr(self, "stop_at_head", False):
                break
            if profile:
                print(profile_layer(m, x), m.type)
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x


def profile_layer(m, x):  # a function the loop hands its layer to (under ``if profile``)
    return sum(p.numel() for p in m.parameters())


class Concat(nn.Module):
    def forward(self, x):
        return torch.cat([t if t.shape[-1] == x[-1].shape[-1] else
                          nn.functional.interpolate(t, size=x[-1].shape[2:]) for t in x], 1)


class PropertyHead(nn.Module):
    """ultralytics ``Detect``'s shape: branches handed out by a property and called through
    ``**self.one2many``; decoding cached by shape (``self.shape != shape``: does not trace)."""

    shape = None

    def __init__(self, channels=(8, 16), outputs=5):
        super().__init__()
        self.nl, self.nc = len(channels), outputs
        self.cv2 = nn.ModuleList(nn.Sequential(ConvBN(c, 8, 3), nn.Conv2d(8, 4, 1)) for c in channels)
        self.cv3 = nn.ModuleList(nn.Sequential(ConvBN(c, 8, 3), nn.Conv2d(8, outputs, 1))
                                 for c in channels)

    @property
    def one2many(self):
        return dict(box_head=self.cv2, cls_head=self.cv3)

    def forward_head(self, x, box_head=None, cls_head=None):
        if box_head is None or cls_head is None:
            return dict()
        bs = x[0].shape[0]
        boxes = torch.cat([box_head[i](x[i]).view(bs, 4, -1) for i in range(self.nl)], dim=-1)
        scores = torch.cat([cls_head[i](x[i]).view(bs, self.nc, -1) for i in range(self.nl)],
                           dim=-1)
        return dict(boxes=boxes, scores=scores, feats=x)

    def forward(self, x):
        preds = self.forward_head(x, **self.one2many)
        shape = x[0].shape
        if self.shape != shape:
            self.anchors = torch.arange(preds["boxes"].shape[-1], dtype=x[0].dtype)
            self.shape = shape
        return torch.cat((preds["boxes"] + self.anchors, preds["scores"].sigmoid()), 1), preds


def _counts(model, x):
    return reparam_fx.op_counts(torch.export.export(model, (x,)))


# ---- forward's non-tensor arguments -------------------------------------------------------

class ArgsKwargs(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = ConvBN(3, 8, 3)

    def forward(self, x, *args, **kwargs):
        if isinstance(x, dict):
            return self.loss(x, *args, **kwargs)
        return self.predict(x, *args, **kwargs)

    def predict(self, x, profile=False, visualize=False, augment=False, embed=None):
        if augment:
            return self.block(x.flip(3))
        embed = frozenset(embed) if embed is not None else {-1}
        return self.block(x) * max(embed)


def test_forward_arguments_not_passed_are_bound_to_their_defaults():
    model = randomized(Routed())
    x = image()
    fused = reparam_fx.fuse(model)
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL) <= RTOL
    counts = reparam_fx.op_counts(fused)
    assert counts.get("batch_norm", 0) == 0, fused.fusion_report.table()
    with pytest.raises(TypeError):
        fused(x, True)  # an argument the trace did not see is refused, not ignored


def test_empty_args_and_kwargs_are_empty():
    model = randomized(ArgsKwargs())
    x = image()
    fused = reparam_fx.fuse(model)
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL) <= RTOL
    assert reparam_fx.op_counts(fused).get("batch_norm", 0) == 0
    with pytest.raises(TypeError):
        fused(x, True)  # an argument the trace did not see is refused, not ignored


def test_example_inputs_make_the_next_argument_an_input():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = ConvBN(3, 8, 3)

        def forward(self, x, scale=None):
            y = self.block(x)
            return y if scale is None else y * scale

    model = randomized(Scaled())
    x, scale = image(), torch.tensor(3.0, dtype=torch.float64)
    fused = reparam_fx.fuse(model, (x, scale))  # (``scale is None``: captured by torch.export)
    assert reparam_fx.verify(model, fused, (x, scale), rtol=RTOL) <= RTOL
    bound = reparam_fx.fuse(model)
    assert reparam_fx.verify(model, bound, (x,), rtol=RTOL) <= RTOL
    for each in (fused, bound):
        assert reparam_fx.op_counts(each).get("batch_norm", 0) == 0, each.fusion_report.table()
    with pytest.raises(TypeError):
        bound(x, scale)


# ---- the routing loop, when the loop itself does not trace --------------------------------

def test_routing_loop_items_are_fused_one_by_one():
    model = randomized(Routed(traceable=False))
    x = image(size=17)
    fused = reparam_fx.fuse(model)
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL) <= RTOL
    layers = fused.model
    assert isinstance(layers, nn.Sequential)  # the loop still iterates it
    assert [m.f for m in layers] == [m.f for m in model.model] and layers[3].f == [1, -1]
    assert all(isinstance(layers[k], torch.fx.GraphModule) for k in (0, 1, 2, 4))
    assert isinstance(layers[5], GridHead)  # isinstance(m, GridHead) still true
    assert _counts(fused, x).get("batch_norm", 0) == 0, fused.fusion_report.table()


def test_routing_loop_isinstance_of_a_fused_class_keeps_that_item():
    class Checks(Routed):
        def forward_once(self, x, profile=False):
            y = []
            if x.shape[-1] % 2:
                x = x[..., :-1]
            for m in self.model:
                if m.f != -1:
                    x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
                x = m(x) * 2 if isinstance(m, ConvBN) else m(x)
                y.append(x if m.i in self.save else None)
            return x

    model = randomized(Checks())
    x = image(size=17)
    fused = reparam_fx.fuse(model)
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL) <= RTOL
    assert isinstance(fused.model[0], ConvBN)  # a fused form would not be a ConvBN
    assert any("isinstance(..., ConvBN)" in leaf.reason for leaf in fused.fusion_report.leaves)


def test_a_live_profile_branch_blocks_the_list():
    class Profiles(Routed):
        def forward(self, x):
            return self.forward_once(x, profile=x.shape[-1] > 100)

    model = randomized(Profiles())
    fused = reparam_fx.fuse(model)
    x = image()
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL) <= RTOL
    assert any("model" == leaf.module and "passes self.model" not in leaf.reason and
               "as an object" in leaf.reason for leaf in fused.fusion_report.leaves), \
        fused.fusion_report.table()


# ---- heads kept whole -------------------------------------------------------------------

def test_implicit_add_and_multiply_fold_into_the_head_conv():
    model = randomized(Routed())
    x = image()
    fused = reparam_fx.fuse(model)
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL) <= RTOL
    head = fused.get_submodule("model_5") if hasattr(fused, "model_5") else None
    head = head or next(m for m in fused.modules() if isinstance(m, GridHead))
    assert all(isinstance(m, nn.Identity) for m in [*head.ia, *head.im]), fused.fusion_report.table()
    counts = _counts(fused, x)
    original = _counts(model, x)
    assert counts["conv"] == original["conv"]
    assert counts.get("mul", 0) == original.get("mul", 0) - 2
    assert counts.get("add", 0) <= original.get("add", 0) - 2


def test_implicit_add_before_a_padded_conv_stays():
    model = randomized(Routed(head=GridHead(kernel=3)))
    x = image()
    fused = reparam_fx.fuse(model)
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL) <= RTOL
    # the add before a zero-padded conv is not exact at the borders: the add stays (inside
    # the chain's fused form); the multiply after it folds
    counts, original = _counts(fused, x), _counts(model, x)
    assert counts.get("add", 0) == original.get("add", 0), fused.fusion_report.table()
    assert counts.get("mul", 0) == original.get("mul", 0) - 2
    assert any("before a zero-padded conv changes the border" in s.reason
               for s in fused.fusion_report.skipped)


def test_branches_handed_out_by_a_property_are_fused():
    model = randomized(Routed(head=PropertyHead()))
    x = image()
    fused = reparam_fx.fuse(model)
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL) <= RTOL
    assert _counts(fused, x).get("batch_norm", 0) == 0, fused.fusion_report.table()


def test_fused_detector_exports_and_keeps_the_input_list_writable():
    model = randomized(Routed())
    x = image()
    fused = reparam_fx.fuse(model)
    program = torch.export.export(fused, (x,))
    assert reparam_fx.verify(model, program.module(), (x,), rtol=RTOL) <= RTOL


def test_export_capture_leaves_the_callers_caches_alone():
    """``torch.export`` runs ``forward`` with fake tensors: a head caching anchors on
    ``self`` by input shape must not keep them (its next real call would fail)."""
    model = randomized(Routed(head=PropertyHead()))
    head = model.model[-1]
    assert "anchors" not in vars(head) and head.shape is None
    x = image()
    fused = reparam_fx.fuse(model, (x,), capture="export")
    assert "anchors" not in vars(head) and head.shape is None
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL) <= RTOL


def hand_out(module):  # a function a loop hands its layer to: the layer must stay itself
    return module


class Profiled(nn.Module):
    """A routing loop whose ``profile`` branch hands each layer to a function."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(ConvBN(3, 8, 3), ConvBN(8, 8, 3))

    def forward(self, x, profile=False):
        return self.run(x, profile)

    def run(self, x, profile=False):
        if x.shape[-1] % 2:  # does not trace
            x = x[..., :-1]
        for m in self.layers:
            if profile:
                hand_out(m)
            x = m(x)
        return x


class ProfiledByDefault(Profiled):
    def forward(self, x):  # the base's forward, reached through super(), with profile=True
        return super().forward(x, True)


@pytest.mark.parametrize("cls, fused_layers", [(Profiled, True), (ProfiledByDefault, False)])
def test_a_branch_is_dead_only_when_every_call_passes_nothing_to_it(cls, fused_layers):
    model = randomized(cls())
    x = image(size=17)
    fused = reparam_fx.fuse(model)
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL) <= RTOL
    assert isinstance(fused.layers[0], torch.fx.GraphModule) == fused_layers, \
        fused.fusion_report.table()


class HeadByIndex(Routed):
    """RT-DETR in ultralytics: the loop runs ``self.model[:-1]``, then ``head =
    self.model[-1]`` is called with two arguments."""

    def __init__(self):
        super().__init__(head=TwoArgumentHead())

    def forward_once(self, x, profile=False):
        y = []
        if x.shape[-1] % 2:
            x = x[..., :-1]
        for m in self.model[:-1]:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        head = self.model[-1]
        return head([y[j] for j in head.f], None)


class TwoArgumentHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.ModuleList(nn.Sequential(nn.Conv2d(c, 8, 1, bias=False), nn.BatchNorm2d(8))
                                  for c in (8, 16))

    def forward(self, x, batch=None):
        if batch is not None or x[0].shape[-1] == 0:
            return x
        return torch.cat([p(t).flatten(2) for p, t in zip(self.proj, x)], 2)


def test_items_chosen_by_index_and_slice_are_called_as_each_is():
    model = randomized(HeadByIndex())
    x = image(size=17)
    fused = reparam_fx.fuse(model)
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL) <= RTOL
    assert _counts(fused, x).get("batch_norm", 0) == 0, fused.fusion_report.table()


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = ConvBN(8, 8, 3), ConvBN(8, 8, 1)

    def forward(self, x, mask):
        return self.a(x) if mask is None else self.b(x) * mask


class CallsWithMaybeNone(nn.Module):
    """A parent that does not trace and passes its child an argument that may be None: a
    trace of the child would follow the ``mask is not None`` branch for every call."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBN(3, 8, 3)
        self.block = Masked()

    def forward(self, x, mask=None):
        if x.shape[-1] % 2:
            x = x[..., :-1]
        return self.block(self.stem(x), mask)


def test_a_child_that_compares_an_argument_with_none_is_not_traced_with_it():
    model = randomized(CallsWithMaybeNone())
    x = image(size=17)
    fused = reparam_fx.fuse(model)
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL) <= RTOL
    mask = torch.rand(2, 8, 17, 16, dtype=torch.float64)
    assert reparam_fx.verify(model, fused, (x, mask), rtol=RTOL) <= RTOL
    assert not isinstance(fused.block, torch.fx.GraphModule)
    assert isinstance(fused.stem, torch.fx.GraphModule)
    assert any("compares its argument 'mask' with None" in leaf.reason
               for leaf in fused.fusion_report.leaves), fused.fusion_report.table()


class PropertyReadAsDict(PropertyHead):
    """The property's dict is iterated, not spread into a call: its values escape."""

    def forward(self, x):
        heads = [head for _, head in self.one2many.items()]
        outs = [torch.cat([h[i](x[i]).flatten(2) for i in range(self.nl)], 2) for h in heads]
        if self.shape != x[0].shape:
            self.shape = x[0].shape
        return torch.cat(outs, 1)


def test_branches_handed_out_other_than_by_spreading_stay():
    model = randomized(Routed(head=PropertyReadAsDict()))
    x = image()
    fused = reparam_fx.fuse(model)
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL) <= RTOL
    head = next(m for m in fused.modules() if isinstance(m, PropertyReadAsDict))
    assert not any(isinstance(m, torch.fx.GraphModule) for m in head.cv2)
    assert any("hands out self.cv2" in leaf.reason for leaf in fused.fusion_report.leaves)


class MutatedBeforeTheChain(GridHead):
    """The input list is extended before the loop: its items are no longer proven to be
    what the caller passed, so the implicit add before the conv keeps its rank question."""

    def forward(self, x):
        x.append(x[-1])
        x.pop()
        return super().forward(x)


class ChainMemberUsedTwice(GridHead):
    def forward(self, x):
        z = []
        for i in range(self.nl):
            x[i] = self.m[i](self.ia[i](x[i]))
            x[i] = self.im[i](x[i])
            if self.grid[i].shape[2:4] != x[i].shape[2:4]:
                self.grid[i] = torch.zeros(1, 2, *x[i].shape[2:]).to(x[i])
            z.append((x[i][:, :2] + self.grid[i]).flatten(2) * self.im[i](x[i]).sum())
        return torch.cat(z, 2), x


@pytest.mark.parametrize("head, adds_left", [(MutatedBeforeTheChain, 2), (ChainMemberUsedTwice, 4)])
def test_chains_are_refused_without_their_proofs(head, adds_left):
    model = randomized(Routed(head=head()))
    x = image()
    fused = reparam_fx.fuse(model)
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL) <= RTOL
    found = next(m for m in fused.modules() if isinstance(m, head))
    assert not any(isinstance(m, nn.Identity) for m in found.ia) or head is MutatedBeforeTheChain
    counts = _counts(fused, x)
    assert counts.get("add", 0) >= adds_left, fused.fusion_report.table()


# ---- found by the fuzzer's whole-program styles ------------------------------------------

class GridCache(nn.Module):
    """A list of tensors rewritten by ``forward`` (YOLOv7's ``self.grid``); does not trace."""

    def __init__(self):
        super().__init__()
        self.block = ConvBN(3, 4, 1)
        self.grid = [torch.zeros(1)]

    def forward(self, x):
        y = self.block(x)
        if self.grid[0].shape != y.shape[-1:]:
            self.grid[0] = torch.linspace(0.0, 1.0, y.shape[-1], dtype=y.dtype)
        return y + self.grid[0]


@pytest.mark.parametrize("capture", ["export", "auto"])
def test_export_of_a_module_keeping_a_list_of_tensors(capture):
    model = randomized(GridCache())
    x = image()
    fused = reparam_fx.fuse(model, (x,), capture=capture)  # (restoring its state compared tensors)
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL) <= RTOL


class WritesIntoItsList(nn.Module):
    def __init__(self):
        super().__init__()
        self.m = nn.ModuleList([nn.Conv2d(4, 6, 1)])

    def forward(self, x):
        if x[0].shape[-1] > 4096:  # does not trace: kept whole
            raise ValueError("too large")
        x[0] = self.m[0](x[0])
        return x[0].sum()


class ReadsTheListAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.head = WritesIntoItsList()

    def forward(self, x):
        feats = [self.bn(x)]
        score = self.head(feats)
        return feats[0], score  # the item the head wrote


def test_a_list_read_after_a_kept_whole_module_wrote_into_it():
    model = randomized(ReadsTheListAfter())
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    for fused in (reparam_fx.fuse(model), reparam_fx.fuse(model, (x,))):
        assert fused(x)[0].shape == (2, 6, 8, 8)
        assert reparam_fx.verify(model, fused, (x,), rtol=RTOL) <= RTOL


class TwiceWithOtherRanks(Routed):
    """The head called on batched maps and again on unbatched ones: the rank its chain is
    fused for must hold for every call."""

    def forward(self, x):
        out, _ = self.forward_once(x)
        feats = [self.model[1](self.model[0](x))[0], self.model[4](self.model[3](
            [self.model[1](self.model[0](x)), self.model[2](self.model[1](self.model[0](x)))]))[0]]
        again, _ = self.model[5](feats)
        return out, again


def test_a_rank_proof_for_a_kept_whole_module_holds_for_every_call():
    model = randomized(TwiceWithOtherRanks())
    x = image()
    fused = reparam_fx.fuse(model)
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL) <= RTOL


class AddsItsArgumentToItself(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = ConvBN(4, 4, 3)

    def forward(self, x):
        v = x
        v += x  # the caller's tensor changes
        return self.block(v)


class ReadsItsInputAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.child = AddsItsArgumentToItself()

    def forward(self, x):
        if x.shape[-1] > 4096:  # does not trace: the child is fused on its own
            raise ValueError("too large")
        return self.child(x) + x


@pytest.mark.parametrize("model", [ReadsItsInputAfter, AddsItsArgumentToItself])
def test_a_write_into_a_graph_input_is_kept(model):
    model = randomized(model())
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    fused = reparam_fx.fuse(model)
    given, expected_input = x.clone(), x.clone()
    with torch.no_grad():
        expected = model(expected_input)
        got = fused(given)
    assert reparam_fx.relative_error(expected, got) <= RTOL
    assert torch.equal(given, expected_input)  # the same write into the input


class UnbatchedConv(nn.Module):
    def __init__(self, fold):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 1, bias=False)
        self.fold = fold

    def forward(self, x):
        y = self.conv(x[0])  # (4, H, W)
        return y * 2.0 if self.fold == "scale" else y + 1.0


@pytest.mark.parametrize("fold", ["scale", "bias"])
def test_an_exported_unbatched_conv_with_a_fold_runs(fold):
    model = UnbatchedConv(fold).double().eval()
    x = torch.randn(2, 4, 10, 10, dtype=torch.float64)
    program = torch.export.export(model, (x,))
    fused = reparam_fx.fuse(program)
    assert reparam_fx.verify(model, fused, (x,), rtol=RTOL) <= RTOL
    assert reparam_fx.op_counts(fused).get("mul", 0) + reparam_fx.op_counts(fused).get("add", 0) == 0
