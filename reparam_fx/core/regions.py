"""Regions: which ops of a graph collapse into one affine term, whatever the graph type.

A frontend (torch.fx in :mod:`reparam_fx.fx`, ONNX) supplies a *view* of its graph:

    view.values()            every value, in topological order, each made by one op
    view.users(v)            the values whose ops read ``v``'s values (a graph output
                             counts); reads of its metadata only are not uses
    view.metadata_readers(v) the ops that read only ``v``'s metadata (sizes, rank, dtype)
    view.reads_shape(v)      whether one of those needs ``v``'s sizes
    view.channels(v, axis)   the size of ``v``'s axis ``axis`` if the graph proves it, or None
    view.convs_are_batched   True if every conv input has a batch axis (ONNX), False if a
                             conv may also take an unbatched tensor (torch: ``(C, H, W)``)
    view.mutated             values an in-place op changes while another op reads them
    view.inplace_target(v)   the value ``v``'s op writes into in place, or None
    view.read_before_written(v, ops)  whether ``ops`` read ``v`` before it is written
    view.writes_shared(v)    whether ``v``'s op writes in place into a tensor others read
    view.interpret(v)        ``Unary`` / ``Sum`` / ``Layout`` / ``Refused`` / None: what
                             ``v``'s op computes (``Layout``: it only moves values)
    view.rank(v), view.shape(v)   what the graph proves about ``v`` (or None)
    view.is_value(x)         whether ``x`` is a graph value (not a constant)
    view.describe(v)         ``(name, op name)`` for the report

:class:`RegionBuilder` walks the values once. Each value it understands gets a *region*
``v == term(source)``: unary ops compose onto their input's region, sums merge the
regions of their terms (add/sub chains flattened, terms partitioned into mergeable
groups when they do not all merge). An input's region is absorbed only when nothing else
reads it and it is not mutated in place; otherwise the input becomes the source. A value
whose sizes are read (``x.shape``) may be absorbed while every op after it keeps the shape:
the read then moves to the region's output.

Moves (reshapes, permutes, flattens, averages over other axes) carry a region along:
its term stays in the coordinates of its source, the builder follows the channel axis to
where each move puts it, and a pointwise op after them (a channel affine, a linear, a
1x1 conv) is the same map in the source's coordinates. The frontend writes the one op
before the moves (on the source) or after them (the moves written again on the source),
whichever ``Region.placement`` allows. Two special cases: a channel affine flattened with
the axes after it (``BatchNorm2d`` then ``flatten(1)``) becomes the affine repeated per
block on the merged axis; and a channel affine whose readers are all linear maps (q, k,
v) is absorbed by each of them (:func:`select_rewrites` keeps such rewrites only if every
reader took it).
:func:`select_rewrites` then picks, downstream first, the regions and partial sums to
write back; writing them is the frontend's job.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from reparam_fx.core import affine
from reparam_fx.core.affine import ChannelAffine, ConvTerm, NotExact, TransposedConvTerm

if TYPE_CHECKING:  # (the builder makes regions)
    from reparam_fx.core.builder import RegionBuilder


# ---- what one op computes (frontends produce these) ---------------------------------

@dataclass
class Unary:
    """``node = term(input)``; ``term`` may need the channel count (average pooling)."""

    input: object  # a graph value (fx Node, ONNX tensor)
    term: object  # affine term, or callable(channels) -> term
    role: str  # conv, bn, linear, scale, avgpool, pad, identity
    axis: int | str | None  # channel axis the term acts on (negative), None: any, "bn":
    #                         BatchNorm's axis 1 on a tensor whose rank is not proven
    extra_nodes: tuple = ()  # nodes absorbed along (aten BN tuple producers)
    const_rank: int = 0  # rank of a broadcast constant (must not raise the tensor's rank)
    computed: bool = False  # reads weights computed in forward (worth precomputing alone)
    dtype: object = None  # dtype of its weights or (non-scalar) constant, None: not known


@dataclass
class Sum:
    """``node = sum_i coeff_i * operand_i``."""

    operands: list  # [(node, coeff)]


@dataclass
class Refused:
    """The node looks foldable but is not; ``reason`` goes to the report."""

    reason: str
    # an asymmetric zero pad ``(input, ((before, after), ...) per spatial dim)``: no term
    # of its own, but a conv right after it takes it as its own padding
    asymmetric_pad: tuple | None = None


# ---- regions -------------------------------------------------------------------------

@dataclass
class Region:
    """``value == term(source)``, built from the original ``nodes``."""

    source: object
    term: object
    axis: int | None = None  # channel axis of the term (negative), None: any
    nodes: list = field(default_factory=list)
    kinds: Counter = field(default_factory=Counter)
    kernels: list = field(default_factory=list)
    branches: int = 1
    has_identity: bool = False
    has_sub: bool = False
    shape_bound: bool = False  # an absorbed value's sizes are read: keep the shape
    fallback: Region | None = None  # see RegionBuilder._fallback
    dtypes: frozenset = frozenset()  # of the absorbed ops' weights and constants
    # moves between the ops (Layout): the term is in the source's coordinates, the moves
    # are written again around the one op (see ``placement``)
    layouts: tuple = ()  # (node, Layout) of the moves, in order
    axis_now: int | None = None  # the channel axis after the moves
    moves_see_source: bool = True  # the ops before the last move keep the shape
    post_kept: bool = True  # the ops after the first move keep the shape
    phases: dict = field(default_factory=dict)  # node -> 0 before the moves, k after move k
    reduces: bool = False  # a move averages (the op is cheaper written after it)
    macs_before_reduce: float = 0.0  # per position, the ops before the first such move: all
    #                                  that the op may cost written before it
    now_spatial: int | None = None  # spatial axes after the channel axis, after the moves
    shape_reads: bool = False  # an absorbed value of an earlier phase has its sizes read
    marks: dict = field(default_factory=dict)  # node -> (channel axis there, changes so far)
    changes: int = 0  # ops so far that changed the shape
    # a channel affine flattened with the axes after its channel axis (``tail_merge``):
    # the term is then in the coordinates after the moves, each channel repeated
    # ``block`` times (None until the op after it tells), and is written after the moves
    linear_after_moves: bool = False  # its linear / 1x1 conv came after the moves: write
    #                                   it there, as it was (not as a conv before them)
    merged: bool = False
    merge_pending: bool = False  # the term is still per channel: its block size unknown

    @property
    def emittable(self) -> bool:
        """A conv term that replaces at least two ops doing something (identities such
        as eval-mode Dropout do not count: rewriting conv+Dropout would only copy the
        conv), or one conv whose weights ``forward`` computes (precomputed once)."""
        return isinstance(self.term, (ConvTerm, TransposedConvTerm)) and (
            len(self.nodes) - self.kinds["identity"] - len(self.layouts) >= 2
            or self.kinds["computed"] > 0) \
            and all(p >= 0 for p in self.term.padding) \
            and not affine.adds_macs(self.term) \
            and len(self.dtypes) <= 1 \
            and (not self.layouts or self.placement is not None) \
            and not self.costs_more_before_reduce

    @property
    def costs_more_before_reduce(self) -> bool:
        """A conv term written before a move that averages (``conv -> mean -> linear``,
        placed ``"before"``) runs on every position the average reads, the ops after the
        average too: it may cost no more per position than the ops before the average did."""
        return self.reduces and isinstance(self.term, ConvTerm) \
            and self.placement != "after" \
            and self.term.written_macs > self.macs_before_reduce + 1e-9

    @property
    def term_is_affine(self) -> bool:
        return isinstance(self.term, ChannelAffine)

    @property
    def placement(self) -> str | None:
        """Where the one op goes among the moves: ``"before"`` them (the term in the
        source's coordinates; the moves then apply to its output, which needs the ops after
        them to keep the shape, or moves that do not depend on the channel count) or
        ``"after"`` them (the moves apply to the source; needs a pointwise term, no op
        before the last move that changes the shape, and the op expressible where the
        channel axis now is)."""
        after = self.moves_see_source and affine.is_pointwise(self.term) \
            and self.now_spatial is not None \
            and affine.pointwise_fits(self.term, self.now_spatial)
        if self.merged:
            return "after" if after and not self.merge_pending else None
        before = self.post_kept or (
            all(move.channel_free for _, move in self.layouts)
            and not (self.shape_reads or self.shape_bound))  # (their shapes would change)
        if after and (self.reduces or self.linear_after_moves or not before):
            return "after"
        return "before" if before else ("after" if after else None)


def merged_axis(a, b):
    if a is None or b is None or a == b:
        return a if b is None else b
    raise NotExact(f"the ops act on different tensor axes ({a} and {b})")


@dataclass
class TermGroup:
    """Summed terms over one source that merge into one term."""

    members: list  # [(part region, coeff, leaf node)]
    term: object
    axis: int | None

    @property
    def source(self):
        return self.members[0][0].source

    def region(self, builder: RegionBuilder, extra_nodes: list) -> Region:
        region = Region(self.source, self.term, self.axis)
        for part, coeff, leaf in self.members:
            if part.nodes and part.nodes[-1] in region.nodes:
                continue  # the same operand twice (x + x): its ops count once
            region.nodes.extend(part.nodes)
            region.kinds.update(part.kinds)
            region.kernels.extend(part.kernels)
            region.has_identity |= part.has_identity or isinstance(part.term, ChannelAffine)
            region.has_sub |= part.has_sub or coeff < 0
            region.shape_bound |= part.shape_bound
            region.dtypes |= part.dtypes
        region.branches = sum(max(part.branches, 1) for part, _, _ in self.members)
        region.nodes.extend(extra_nodes)
        return region


def try_merge(members) -> TermGroup | None | str:
    """The members merged into one group, or the reason they do not merge."""
    if len(members) > 1 and any(part.layouts for part, _, _ in members):
        return "a branch moved by a reshape or permute is not merged with others"
    try:
        axis = None
        for part, _, _ in members:
            axis = merged_axis(axis, part.axis)
        term = affine.merge([p.term for p, _, _ in members], [c for _, c, _ in members])
    except NotExact as reason:
        return str(reason)
    return TermGroup(list(members), term, axis)


def group_terms(parts) -> tuple[list[TermGroup], str | None]:
    """Partition summed terms into as few mergeable groups as possible.

    Terms merge only with terms of the same source. Per source: the whole set if it
    merges (the MAC gate is judged on the whole sum); else greedily, each term joining
    the first group it merges with, then groups merging pairwise until nothing changes.
    Returns the groups and the reason the whole set did not merge (None if it did)."""
    by_source: dict = {}
    for part in parts:
        by_source.setdefault(part[0].source, []).append(part)
    groups, refusal = [], None
    for members in by_source.values():
        whole = try_merge(members)
        if isinstance(whole, TermGroup):
            groups.append(whole)
            continue
        refusal = refusal or whole
        local: list[TermGroup] = []
        for member in members:
            for index, group in enumerate(local):
                joined = try_merge(group.members + [member])
                if isinstance(joined, TermGroup):
                    local[index] = joined
                    break
            else:
                single = try_merge([member])
                local.append(single if isinstance(single, TermGroup)
                             else TermGroup([member], None, member[0].axis))
        changed = True
        while changed:
            changed = False
            for i in range(len(local)):
                for j in range(i + 1, len(local)):
                    joined = try_merge(local[i].members + local[j].members)
                    if isinstance(joined, TermGroup):
                        local[i] = joined
                        del local[j]
                        changed = True
                        break
                if changed:
                    break
        groups.extend(local)
    return groups, refusal


@dataclass
class PartialSum:
    """A sum rewritten as ``sum(coeff * value)`` where some values are merged regions."""

    root: object
    inner: list  # inner add/sub nodes of the flattened tree
    terms: list  # [(Region | leaf node, coeff)]; a Region's coeff is 1 (its sign is in its term)

