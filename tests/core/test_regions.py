"""The region builder and the selection of rewrites, on a small fake graph view.

``FakeGraph`` is a pure-Python graph (a few dataclass nodes, each with the op the
frontends would interpret it as and a torch function that computes it) implementing the
view protocol of :mod:`reparam_fx.core.regions`. Every region the builder makes is checked
against the graph itself: its term run on its source's value (float64) equals the value of
the node it stands for, and its term equals the one composed / merged by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from reparam_fx.core import affine
from reparam_fx.core.builder import RegionBuilder
from reparam_fx.core.regions import (PartialSum, Refused, Region, Sum, TermGroup, Unary,
                                     group_terms, try_merge)
from reparam_fx.core.report import Skipped
from reparam_fx.core.selection import select_rewrites


D = torch.float64
RTOL = 1e-12
OUTPUT = "graph output"  # what users() returns for a graph output, as the frontends do


# ---- the fake view ------------------------------------------------------------------------

@dataclass(eq=False)  # (hashed by identity, as graph nodes are)
class Node:
    name: str
    kind: str  # the op name the report shows
    inputs: tuple = ()
    op: object = None  # what interpret() answers: Unary / Sum / Refused / None
    fn: Callable | None = None  # computes the value from the inputs' values

    def __repr__(self):
        return self.name


@dataclass
class FakeGraph:
    """A graph and the view protocol over it (``view.<name>`` as regions.py describes)."""

    nodes: list = field(default_factory=list)
    outputs: set = field(default_factory=set)
    mutated: set = field(default_factory=set)
    shape_read: set = field(default_factory=set)
    shapes: dict = field(default_factory=dict)
    inplace: dict = field(default_factory=dict)
    written_after: bool = False  # read_before_written answers False: a write comes first
    convs_are_batched = True

    # building ------------------------------------------------------------------------
    def add_node(self, name, kind, inputs, op, fn) -> Node:
        node = Node(name, kind, tuple(inputs), op, fn)
        self.nodes.append(node)
        return node

    def input(self, name="x", channels=4) -> Node:
        node = self.add_node(name, "placeholder", (), None, None)
        self.shapes[node] = (2, channels, 7, 7)
        return node

    def conv(self, name, x, weight, bias=None, stride=1, padding=0, groups=1) -> Node:
        term = affine.conv(weight, bias, stride, padding, 1, groups)
        return self.add_node(name, "Conv2d", [x], Unary(x, term, "conv", -3, dtype=D),
                             lambda v: F.conv2d(v, weight, bias, stride, padding, 1, groups))

    def bn(self, name, x, stats) -> Node:
        mean, var, gamma, beta = stats
        return self.add_node(name, "BatchNorm2d", [x],
                             Unary(x, affine.batchnorm(mean, var, gamma, beta, 1e-5), "bn", -3,
                                   dtype=D),
                             lambda v: F.batch_norm(v, mean, var, gamma, beta, False, 0.0, 1e-5))

    def add(self, name, *operands) -> Node:
        """``sum(coeff * operand)``; an operand is a node or ``(node, coeff)``."""
        pairs = [o if isinstance(o, tuple) else (o, 1.0) for o in operands]
        return self.add_node(name, "add", [n for n, _ in pairs], Sum(pairs),
                             lambda *vs: sum(c * v for (_, c), v in zip(pairs, vs)))

    def refused(self, name, x, reason, fn=torch.relu) -> Node:
        return self.add_node(name, "relu", [x], Refused(reason), fn)

    def output(self, *nodes):
        self.outputs.update(nodes)

    # the view protocol ------------------------------------------------------------------
    def values(self):
        return list(self.nodes)

    def users(self, v):
        users = [n for n in self.nodes if v in n.inputs]
        return users + ([OUTPUT] if v in self.outputs else [])

    def metadata_readers(self, v):
        return ["x.shape"] if v in self.shape_read else []

    def reads_shape(self, v) -> bool:
        return v in self.shape_read

    def channels(self, v, axis):
        shape = self.shapes.get(v)
        return shape[axis] if shape else None

    def inplace_target(self, v):
        return self.inplace.get(v)

    def read_before_written(self, v, ops) -> bool:
        return not self.written_after

    def writes_shared(self, v) -> bool:
        return False

    def interpret(self, v):
        return v.op

    def rank(self, v):
        shape = self.shapes.get(v)
        return None if shape is None else len(shape)

    def shape(self, v):
        return self.shapes.get(v)

    @staticmethod
    def is_value(x) -> bool:
        return isinstance(x, Node)

    @staticmethod
    def describe(v):
        return v.name, v.kind

    # running it --------------------------------------------------------------------------
    def run(self, **inputs) -> dict:
        env = {}
        for node in self.nodes:
            env[node] = inputs[node.name] if node.fn is None else node.fn(
                *(env[i] for i in node.inputs))
        return env


class R:
    """Seeded float64 tensors."""

    def __init__(self, seed=0):
        self.g = torch.Generator().manual_seed(seed)

    def t(self, *shape):
        return torch.randn(*shape, generator=self.g, dtype=D)

    def bn(self, c):
        return (self.t(c), torch.rand(c, generator=self.g, dtype=D) + 0.5, self.t(c), self.t(c))


def run_term(term, x):
    """A term as one op (the conv the frontends would write)."""
    if isinstance(term, affine.ChannelAffine):
        assert not term.padding
        y = x * (term.scale if term.scale.dim() == 0 else term.scale[:, None, None])
        return y if term.shift is None else y + term.shift[:, None, None]
    return F.conv2d(x, term.weight.value(), term.bias, term.stride, term.padding,
                    term.dilation, term.groups)


def rel_err(a, b):
    assert a.shape == b.shape
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_region_computes(graph: FakeGraph, value: Node, region: Region, env: dict):
    """``value == region.term(region.source)`` on the graph's own values."""
    err = rel_err(run_term(region.term, env[region.source]), env[value])
    assert err <= RTOL, f"{value}: relative error {err:.3g}"


def assert_same_term(actual, expected):
    assert type(actual) is type(expected)
    if isinstance(expected, affine.ChannelAffine):
        torch.testing.assert_close(actual.scale, expected.scale, rtol=RTOL, atol=0)
        torch.testing.assert_close(actual.shift, expected.shift, rtol=RTOL, atol=0)
        return
    assert (actual.stride, actual.padding, actual.dilation, actual.groups) == \
        (expected.stride, expected.padding, expected.dilation, expected.groups)
    torch.testing.assert_close(actual.weight.value(), expected.weight.value(), rtol=RTOL, atol=1e-14)
    torch.testing.assert_close(actual.bias, expected.bias, rtol=RTOL, atol=1e-14)


def build(graph: FakeGraph) -> RegionBuilder:
    builder = RegionBuilder(graph)
    builder.walk()
    return builder


# ---- chains -----------------------------------------------------------------------------------

def test_conv_bn_chain_is_one_region():
    r = R(1)
    g = FakeGraph()
    x = g.input()
    w, b, stats = r.t(5, 4, 3, 3), r.t(5), r.bn(5)
    c = g.conv("conv", x, w, b, padding=1)
    y = g.bn("bn", c, stats)
    g.output(y)
    builder = build(g)
    region = builder.regions[y]
    assert region.source is x and region.nodes == [c, y]
    assert region.kinds == {"conv": 1, "bn": 1} and region.emittable
    expected = affine.compose(affine.conv(w, b, 1, 1, 1, 1), affine.batchnorm(*stats, 1e-5))
    assert_same_term(region.term, expected)
    assert_region_computes(g, y, region, g.run(x=r.t(2, 4, 7, 7)))
    assert builder.skipped == []
    emit, partial = select_rewrites(g, builder)
    assert emit == [(y, region)] and partial == []


def test_repvgg_sum_is_one_region_with_the_merged_term():
    """``bn(conv3x3(x)) + bn(conv1x1(x)) + bn(x)``, added as ``(a + b) + c``."""
    r = R(2)
    g = FakeGraph()
    x = g.input()
    w3, w1 = r.t(4, 4, 3, 3), r.t(4, 4, 1, 1)
    s3, s1, s0 = r.bn(4), r.bn(4), r.bn(4)
    c3 = g.conv("conv3", x, w3, padding=1)
    b3 = g.bn("bn3", c3, s3)
    c1 = g.conv("conv1", x, w1)
    b1 = g.bn("bn1", c1, s1)
    b0 = g.bn("bn0", x, s0)
    inner = g.add("add", b3, b1)
    y = g.add("add_1", inner, b0)
    g.output(y)
    builder = build(g)
    region = builder.regions[y]
    assert region.source is x
    assert set(region.nodes) == {c3, b3, c1, b1, b0, inner, y}
    assert region.branches == 3 and region.has_identity and not region.has_sub
    bn = lambda s: affine.batchnorm(*s, 1e-5)
    expected = affine.merge([affine.compose(affine.conv(w3, None, 1, 1, 1, 1), bn(s3)),
                             affine.compose(affine.conv(w1, None, 1, 0, 1, 1), bn(s1)), bn(s0)],
                            [1.0, 1.0, 1.0])
    assert_same_term(region.term, expected)
    env = g.run(x=r.t(2, 4, 7, 7))
    assert_region_computes(g, y, region, env)
    assert inner not in builder.regions  # (flattened into the sum that reads it)
    emit, partial = select_rewrites(g, builder)
    assert emit == [(y, region)] and partial == []


def test_a_difference_is_a_signed_term():
    """RepMixer-like ``x + (bn1(x) - bn0(x))`` with a conv: signs reach the merged term."""
    r = R(3)
    g = FakeGraph()
    x = g.input()
    w, s1, s0 = r.t(4, 4, 3, 3), r.bn(4), r.bn(4)
    c = g.conv("conv", x, w, padding=1)
    b1 = g.bn("bn1", c, s1)
    b0 = g.bn("bn0", x, s0)
    y = g.add("sub", (b1, 1.0), (b0, -1.0), (x, 1.0))
    g.output(y)
    builder = build(g)
    region = builder.regions[y]
    assert region.has_sub and region.source is x
    assert_region_computes(g, y, region, g.run(x=r.t(2, 4, 7, 7)))


# ---- what is not absorbed ----------------------------------------------------------------------

def _chain(r: R, g: FakeGraph):
    """x -> conv3x3 -> bn -> conv1x1 (a kxk then 1x1 composition)."""
    x = g.input()
    c = g.conv("conv", x, r.t(4, 4, 3, 3), r.t(4), padding=1)
    b = g.bn("bn", c, r.bn(4))
    p = g.conv("pw", b, r.t(4, 4, 1, 1), r.t(4))
    return x, c, b, p


def test_single_user_chain_is_absorbed_whole():
    r = R(4)
    g = FakeGraph()
    x, c, b, p = _chain(r, g)
    g.output(p)
    builder = build(g)
    region = builder.regions[p]
    assert region.source is x and region.nodes == [c, b, p]
    assert_region_computes(g, p, region, g.run(x=r.t(2, 4, 7, 7)))


def test_a_value_read_twice_is_the_source():
    r = R(4)
    g = FakeGraph()
    x, c, b, p = _chain(r, g)
    g.output(p, b)  # bn's value is read by the 1x1 conv and by the graph output
    builder = build(g)
    assert builder.regions[b].nodes == [c, b]
    region = builder.regions[p]
    assert region.source is b and region.nodes == [p]  # not absorbed: it is computed anyway
    env = g.run(x=r.t(2, 4, 7, 7))
    assert_region_computes(g, p, region, env)
    assert_region_computes(g, b, builder.regions[b], env)
    emit, _ = select_rewrites(g, builder)
    assert emit == [(b, builder.regions[b])]  # the 1x1 alone is no rewrite


def test_a_mutated_value_is_not_absorbed():
    r = R(4)
    g = FakeGraph()
    x, c, b, p = _chain(r, g)
    g.output(p)
    g.mutated.add(b)  # an in-place op changes bn's value while the 1x1 conv reads it
    builder = build(g)
    assert b not in builder.regions  # (nor is the mutated op itself folded)
    region = builder.regions[p]
    assert region.source is b and region.nodes == [p]
    assert_region_computes(g, p, region, g.run(x=r.t(2, 4, 7, 7)))


def test_a_source_written_before_it_is_read_is_refused():
    r = R(4)
    g = FakeGraph(written_after=True)
    x, c, b, p = _chain(r, g)
    g.output(p)
    g.mutated.add(b)
    builder = build(g)
    assert p not in builder.regions
    assert Skipped("pw", "Conv2d", "its input is modified in place by another op") in builder.skipped


def test_refused_op_stops_the_region_and_is_reported():
    r = R(5)
    g = FakeGraph()
    x = g.input()
    c = g.conv("conv", x, r.t(4, 4, 3, 3), padding=1)
    bad = g.refused("bn_train", c, "BatchNorm in training mode uses batch statistics")
    p = g.conv("pw", bad, r.t(4, 4, 1, 1))
    q = g.bn("bn", p, r.bn(4))
    g.output(q)
    builder = build(g)
    assert bad not in builder.regions
    assert builder.regions[c].nodes == [c]
    region = builder.regions[q]
    assert region.source is bad and region.nodes == [p, q]
    assert builder.skipped == [Skipped("bn_train", "relu",
                                       "BatchNorm in training mode uses batch statistics")]
    assert_region_computes(g, q, region, g.run(x=r.t(2, 4, 7, 7)))
    emit, _ = select_rewrites(g, builder)
    assert emit == [(q, region)]


def test_not_exact_composition_restarts_at_its_input_and_says_why():
    """A BatchNorm before a zero-padded conv does not fold into it: the conv's region
    starts at the BatchNorm's output, and the reason reaches the skip list."""
    r = R(6)
    g = FakeGraph()
    x = g.input()
    b = g.bn("bn", x, r.bn(4))
    c = g.conv("conv", b, r.t(4, 4, 3, 3), padding=1)
    g.output(c)
    builder = build(g)
    region = builder.regions[c]
    assert region.source is b and region.nodes == [c]
    assert builder.regions[b].nodes == [b] and builder.regions[b].source is x
    assert builder.skipped == [Skipped(
        "conv", "Conv2d", "not folded into the ops before it: a per-channel shift (e.g. "
        "BatchNorm) before a zero-padded conv changes the border")]
    assert select_rewrites(g, builder) == ([], [])
    # a conv+bn before it: the same refusal (its bias), and conv+bn is still written
    g = FakeGraph()
    x = g.input()
    c0 = g.conv("conv0", x, r.t(4, 4, 1, 1))
    b = g.bn("bn", c0, r.bn(4))
    c = g.conv("conv", b, r.t(4, 4, 3, 3), padding=1)
    g.output(c)
    builder = build(g)
    assert builder.regions[c].source is b
    assert "1x1 conv with bias before a zero-padded conv" in builder.skipped[0].reason
    assert select_rewrites(g, builder) == ([(b, builder.regions[b])], [])


def test_a_size_read_keeps_the_shape():
    """``c.shape`` is read: c may be absorbed while the ops after it keep its shape, not
    by a strided 1x1 that changes it."""
    r = R(7)
    g = FakeGraph()
    x = g.input()
    c = g.conv("conv", x, r.t(4, 4, 3, 3), padding=1)
    b = g.bn("bn", c, r.bn(4))
    p = g.conv("pw", b, r.t(4, 4, 1, 1), stride=2)
    g.output(p)
    g.shape_read.add(c)
    builder = build(g)
    assert builder.regions[b].nodes == [c, b] and builder.regions[b].shape_bound
    assert builder.regions[p].source is b
    assert any("sizes of a tensor before it are read" in s.reason for s in builder.skipped)


# ---- sums that do not merge whole -------------------------------------------------------------

def test_sum_partitioned_into_groups_per_source():
    """``conv3(x) + conv1(x) + conv3(z) + conv1(z)``: one merged conv per source."""
    r = R(8)
    g = FakeGraph()
    x, z = g.input("x"), g.input("z")
    ws = [r.t(4, 4, 3, 3), r.t(4, 4, 1, 1), r.t(4, 4, 3, 3), r.t(4, 4, 1, 1)]
    a3 = g.conv("a3", x, ws[0], padding=1)
    a1 = g.conv("a1", x, ws[1])
    b3 = g.conv("b3", z, ws[2], padding=1)
    b1 = g.conv("b1", z, ws[3])
    s1 = g.add("add", a3, b3)
    s2 = g.add("add_1", s1, a1)
    y = g.add("add_2", s2, (b1, -1.0))
    g.output(y)
    builder = build(g)
    assert y not in builder.regions
    partial = builder.partial_sums[y]
    assert isinstance(partial, PartialSum) and partial.root is y
    assert set(partial.inner) == {s1, s2}
    regions = [term for term, coeff in partial.terms]
    assert all(isinstance(t, Region) and c == 1.0 for t, c in partial.terms)
    assert [t.source for t in regions] == [x, z]
    assert set(regions[0].nodes) == {a3, a1} and set(regions[1].nodes) == {b3, b1}
    conv = lambda w, p: affine.conv(w, None, 1, p, 1, 1)
    assert_same_term(regions[0].term, affine.merge([conv(ws[0], 1), conv(ws[1], 0)], [1.0, 1.0]))
    assert_same_term(regions[1].term, affine.merge([conv(ws[2], 1), conv(ws[3], 0)], [1.0, -1.0]))
    env = g.run(x=r.t(2, 4, 7, 7), z=r.t(2, 4, 7, 7))
    total = sum(run_term(t.term, env[t.source]) for t in regions)
    assert rel_err(total, env[y]) <= RTOL
    emit, partials = select_rewrites(g, builder)
    assert emit == [] and partials == [partial]


def test_sum_whose_terms_do_not_all_merge_keeps_the_rest():
    """``dw3x3(x) + pw(x) + x``: the dense 1x1 would make the merged conv dense (MAC gate);
    the depthwise conv and the identity merge, the 1x1 stays a term of its own."""
    r = R(9)
    g = FakeGraph()
    x = g.input(channels=8)
    wd, wp = r.t(8, 1, 3, 3), r.t(8, 8, 1, 1)
    dw = g.conv("dw", x, wd, padding=1, groups=8)
    pw = g.conv("pw", x, wp)
    y = g.add("add", dw, pw, x)
    g.output(y)
    builder = build(g)
    assert y not in builder.regions
    assert [s.reason for s in builder.skipped] == [
        "merging these branches would increase MACs (576 > 136 per output position)"]
    partial = builder.partial_sums[y]
    merged = [t for t, _ in partial.terms if isinstance(t, Region)]
    rest = [(t, c) for t, c in partial.terms if not isinstance(t, Region)]
    assert len(merged) == 1 and rest == [(pw, 1.0)]
    assert merged[0].source is x and merged[0].nodes == [dw] and merged[0].term.groups == 8
    expected = affine.merge([affine.conv(wd, None, 1, 1, 1, 8), affine.identity()], [1.0, 1.0])
    assert_same_term(merged[0].term, expected)
    env = g.run(x=r.t(2, 8, 7, 7))
    assert rel_err(run_term(merged[0].term, env[x]) + env[pw], env[y]) <= RTOL


def test_group_terms_and_try_merge():
    r = R(10)
    x, z = Node("x", "placeholder"), Node("z", "placeholder")
    part = lambda source, term: Region(source, term, -3, nodes=[Node("n", "Conv2d")])
    k3 = part(x, affine.conv(r.t(4, 4, 3, 3), None, 1, 1, 1, 1))
    k1 = part(x, affine.conv(r.t(4, 4, 1, 1), None, 1, 0, 1, 1))
    off = part(x, affine.conv(r.t(4, 4, 1, 1), None, 1, 1, 1, 1))  # padded 1x1: not aligned
    kz = part(z, affine.conv(r.t(4, 4, 1, 1), None, 1, 0, 1, 1))
    group = try_merge([(k3, 1.0, None), (k1, 1.0, None)])
    assert isinstance(group, TermGroup) and group.source is x and group.axis == -3
    reason = try_merge([(k3, 1.0, None), (off, 1.0, None)])
    assert isinstance(reason, str) and "different centre offsets" in reason
    groups, refusal = group_terms([(k3, 1.0, "a"), (off, 1.0, "b"), (k1, 1.0, "c"),
                                   (kz, 1.0, "d")])
    assert "different centre offsets" in refusal
    members = sorted(sorted(leaf for _, _, leaf in g.members) for g in groups)
    assert members == [["a", "c"], ["b"], ["d"]]


# ---- selection ------------------------------------------------------------------------------------

def _two_blocks(r: R, g: FakeGraph):
    """x -> conv -> bn -> conv1x1 -> bn: every prefix is a region."""
    x = g.input()
    c1 = g.conv("conv1", x, r.t(4, 4, 3, 3), padding=1)
    b1 = g.bn("bn1", c1, r.bn(4))
    c2 = g.conv("conv2", b1, r.t(4, 4, 1, 1))
    b2 = g.bn("bn2", c2, r.bn(4))
    g.output(b2)
    return x, c1, b1, c2, b2


def test_select_rewrites_takes_the_downstream_region_first():
    r = R(11)
    g = FakeGraph()
    x, c1, b1, c2, b2 = _two_blocks(r, g)
    builder = build(g)
    assert [builder.regions[n].nodes for n in (c1, b1, c2, b2)] == [
        [c1], [c1, b1], [c1, b1, c2], [c1, b1, c2, b2]]
    emit, partial = select_rewrites(g, builder)
    assert emit == [(b2, builder.regions[b2])] and partial == []  # it covers the others
    assert_region_computes(g, b2, builder.regions[b2], g.run(x=r.t(2, 4, 7, 7)))


def test_select_rewrites_writes_only_what_is_worth_writing():
    r = R(11)
    g = FakeGraph()
    x, c1, b1, c2, b2 = _two_blocks(r, g)
    builder = build(g)
    short = lambda region: region.emittable and len(region.nodes) <= 2
    emit, _ = select_rewrites(g, builder, short)
    assert emit == [(b1, builder.regions[b1])]  # b2's and c2's regions are refused
    nothing = lambda region: False
    assert select_rewrites(g, builder, nothing) == ([], [])


def test_a_lone_conv_or_affine_is_not_written():
    r = R(12)
    g = FakeGraph()
    x = g.input()
    c = g.conv("conv", x, r.t(4, 4, 3, 3), padding=1)
    relu = g.refused("relu", c, "not affine")
    b = g.bn("bn", relu, r.bn(4))
    g.output(b)
    builder = build(g)
    assert not builder.regions[c].emittable and not builder.regions[b].emittable
    assert select_rewrites(g, builder) == ([], [])


def test_a_composition_that_adds_macs_is_not_taken():
    """A 4 -> 1 conv then a 1 -> 64 1x1: one conv would cost more than both (no sum to
    pay it back): the 1x1 starts its own region and the reason is reported."""
    r = R(13)
    g = FakeGraph()
    x = g.input()
    c = g.conv("narrow", x, r.t(1, 4, 3, 3))
    p = g.conv("wide", c, r.t(64, 1, 1, 1))
    g.output(p)
    builder = build(g)
    assert builder.regions[p].source is c and builder.regions[p].nodes == [p]
    [skip] = builder.skipped
    assert skip.node == "wide" and "would increase MACs" in skip.reason
    assert select_rewrites(g, builder) == ([], [])
