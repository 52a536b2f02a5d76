"""TODO builder"""

from __future__ import annotations

from dataclasses import replace

from reparam_fx.core import affine
from reparam_fx.core.affine import ChannelAffine, ConvTerm, NotExact
from reparam_fx.core.report import Skipped
from reparam_fx.core.layout import Layout
from reparam_fx.core.regions import (PartialSum, Refused, Region, Sum, TermGroup, Unary,
                                     group_terms, merged_axis)


_MOVE_REFUSED = ("it merges or splits the channel axis with another one, or the graph does "
                 "not prove it keeps it whole")


class _StartAfterMoves(NotExact):
    """Not a refusal: a region of moves alone is not extended by an op that changes the
    shape (written after them, they would have to be written again); the op starts anew."""


class RegionBuilder:
    """One forward walk over the graph that assigns regions to nodes."""

    def __init__(self, view):
        self.view = view
        self.skipped: list[Skipped] = []  # ops that look foldable but are not, and why
        self.move_refusals: dict = {}  # name of a move that ended a region -> why
        self.regions: dict = {}
        self.sums: dict = {}  # sum nodes seen, for flattening
        self.partial_sums: dict = {}

    def skip(self, node, reason):
        self.skipped.append(Skipped(*self.view.describe(node), reason))

    def operand(self, node, shared: bool = False) -> Region:
        """``node``'s region if it can be absorbed by its (single) user, else identity(node).
        ``shared``: also a channel affine that every one of several users absorbs (see
        :meth:`_absorbed_by_all`)."""
        region = self.regions.get(node)
        if region is not None and node not in self.view.mutated and (
                len(self.view.users(node)) == 1
                or (shared and self._absorbed_by_all(node, region))):
            if self.view.reads_shape(node) and not region.shape_bound:
                region = replace(region, shape_bound=True)
            return region
        return Region(node, affine.identity(), has_identity=True)

    def _absorbed_by_all(self, node, region: Region) -> bool:
        """A channel affine (a pre-norm BatchNorm, moved to tokens) read by several linear
        maps (the q, k and v projections): each takes it into its own weights, which costs
        no MACs, and the affine goes once every reader has it."""
        term = region.term
        if not isinstance(term, ChannelAffine) or term.padding or term.border is not None \
                or not region.nodes or region.merged:
            return False
        for user in self.view.users(node):
            op = self.view.interpret(user) if self.view.is_value(user) else None
            if isinstance(op, (Layout, Unary)) and op.input is node \
                    and user not in self.view.mutated and (
                        isinstance(op, Layout) or self._pool_as_move(region, op, user)):
                continue  # moves on to more readers (select_rewrites checks they all fold)
            if not isinstance(op, Unary) or op.input is not node or callable(op.term) \
                    or isinstance(op.term, ChannelAffine) or not affine.is_pointwise(op.term) \
                    or user in self.view.mutated:
                return False
        return True

    def usable_source(self, region, sum_nodes=()) -> bool:
        """A source written in place while other ops read it is usable only when the
        region's ops (and the ``sum_nodes`` that read its terms) all read it before the
        write (and the region has no moves, so its op is written where its first op was)."""
        if region.source not in self.view.mutated:
            return True
        parts = [part for part, _, _ in region.members] if isinstance(region, TermGroup) \
            else [region]
        return not any(part.layouts for part in parts) and self.view.read_before_written(
            region.source, [node for part in parts for node in part.nodes] + list(sum_nodes))

    def walk(self):
        for node in self.view.values():
            op = self.view.interpret(node)
            if isinstance(op, Refused):
                if op.asymmetric_pad is None:  # (a conv after such a pad takes it)
                    self.skip(node, op.reason)
            elif isinstance(op, Unary):
                self.extend(node, op)
            elif isinstance(op, Sum):
                self.sum(node, op)
            elif isinstance(op, Layout):
                self.move(node, op)
        return self.regions

    # a move (reshape, permute ...) ------------------------------------------------------
    def move(self, node, op: Layout):
        """Carry the input's region through a move of its values: the term stays in the
        source's coordinates; the channel axis is followed to where the move puts it."""
        if node in self.view.mutated or not self.view.is_value(op.input):
            return
        base = self.operand(op.input, shared=True)
        axis_now = base.axis_now if base.layouts else base.axis
        if base.merged or base.linear_after_moves:  # its op goes after its moves: none follows
            if base.merged and base.term_is_affine:
                self.skip(node, _MOVE_REFUSED if op.forward(-1) is None else
                          "a reshape or permute after the flatten of the channel axis")
            return
        if not base.layouts:  # the value before the first move: its channel axis, as is
            base = replace(base, marks={op.input: (base.axis, 0)}, changes=0)
        like = base.marks.get(op.like)
        if op.like is base.source:  # (its channel axis may have been found since)
            like = (base.axis, 0)
        if op.like is not None and like != (-1, base.changes):
            axis_now = None if axis_now is None else "unproven"  # see Layout.like
        if axis_now is not None and axis_now != "unproven" and op.forward(axis_now) is None \
                and self._mergeable(base, op, axis_now):
            self.regions[node] = self._merged(base, node, op, axis_now)
            return
        if axis_now is not None:
            axis_now = op.forward(axis_now) if axis_now != "unproven" else None
            if axis_now is None:
                if base.term_is_affine and len(base.nodes) > len(base.layouts) + \
                        base.kinds["identity"]:  # an affine that waited for a linear
                    self.skip(node, _MOVE_REFUSED)
                elif base.nodes:  # told to an affine after it that stays (the report)
                    self.move_refusals[self.view.describe(node)[0]] = _MOVE_REFUSED
                return
        region = replace(base, nodes=[*base.nodes, node], layouts=(*base.layouts, (node, op)),
                         axis_now=axis_now, reduces=base.reduces or op.reduces,
                         macs_before_reduce=base.macs_before_reduce if base.reduces else (
                             base.term.macs if isinstance(base.term, ConvTerm) else 0.0),
                         phases={**base.phases, node: len(base.layouts) + 1},
                         now_spatial=self._now_spatial(node, axis_now), fallback=None,
                         shape_bound=False, shape_reads=base.shape_reads or base.shape_bound,
                         marks={**base.marks, node: (axis_now, base.changes)})
        if not base.layouts:  # the ops so far come before every move
            region.phases.update({n: 0 for n in base.nodes})
        region.moves_see_source = base.moves_see_source and affine.keeps_shape(base.term)
        self.regions[node] = region

    @staticmethod
    def _mergeable(base: Region, op: Layout, axis) -> bool:
        """A channel affine (no moves before) flattened with the axes after its channel
        axis: ``BatchNorm2d`` then ``flatten(1)`` before a classifier's ``Linear``."""
        return op.tail_merge is not None and op.tail_merge(axis) is not None \
            and bool(base.nodes) and not base.layouts and not base.merged \
            and isinstance(base.term, ChannelAffine) and not base.term.padding \
            and base.term.border is None

    def _merged(self, base: Region, node, op: Layout, axis) -> Region:
        axis_now, block = op.tail_merge(axis)
        region = replace(base, nodes=[*base.nodes, node], layouts=((node, op),),
                         axis_now=axis_now, merged=True, merge_pending=block is None,
                         phases={**{n: 0 for n in base.nodes}, node: 1},
                         now_spatial=0, fallback=None, shape_bound=False,
                         shape_reads=base.shape_reads or base.shape_bound,
                         marks={base.source: (base.axis, 0), node: (axis_now, 0)})
        if block is not None:
            region.term = affine.repeat_channels(base.term, block)
        return region

    def _compose_merged(self, base: Region, op: Unary, node) -> Region:
        """A pointwise op on the merged axis after a flattened channel affine: the affine,
        repeated over its blocks (their size read from the op if the shapes did not give
        it: a ``Linear`` with ``C * H * W`` inputs), composed with the op."""
        term, first = op.term, base.term
        if callable(term) or not affine.is_pointwise(term):
            raise NotExact(f"a {op.role} after a flatten of the channel axis")
        axis = op.axis
        if axis == "bn":
            axis = 1 - self.view.rank(op.input) if self.view.rank(op.input) else None
        if axis != -1 and not (axis is None and isinstance(term, ChannelAffine)):
            raise NotExact("the op after the flatten does not act on the flattened axis")
        pending = base.merge_pending
        width = term.channels if isinstance(term, ChannelAffine) else (
            term.weight.shape[1] if term.groups == 1 and term.spatial == 0 else None)
        if pending and width is not None:
            channels = first.channels
            if channels is not None:
                if width % channels:
                    raise NotExact(f"{width} features are no whole number of blocks of "
                                   f"{channels} channels")
                first = affine.repeat_channels(first, width // channels)
            pending = False
        if not isinstance(term, ChannelAffine) and pending:
            raise NotExact("the flattened block size is not known")
        region = replace(base, term=affine.compose(first, term), merge_pending=pending,
                         nodes=[*base.nodes, *op.extra_nodes, node],
                         kinds=base.kinds.copy(), kernels=list(base.kernels), fallback=None,
                         phases={**base.phases, node: 1, **{n: 1 for n in op.extra_nodes}},
                         dtypes=base.dtypes | ({op.dtype} if op.dtype is not None else set()),
                         marks={**base.marks, node: (-1, base.changes)}, has_identity=False)
        region.kinds[op.role] += 1
        return region

    def _now_spatial(self, node, axis) -> int | None:
        """Axes after the channel axis ``axis`` of ``node``, if a linear (0) or a 1x1 conv
        can act there: no more than one axis before the channel axis."""
        if axis is None:
            return None
        if axis == -1:
            return 0
        rank = self.view.rank(node)
        return -axis - 1 if rank is not None and rank <= -axis + 1 else None

    # a unary op -------------------------------------------------------------------------
    def extend(self, node, op: Unary):
        if node in self.view.mutated:
            return
        if not self.view.is_value(op.input):
            return
        if self.view.writes_shared(node):
            self.skip(node, "it writes in place into a tensor that other ops read")
            return
        if (op.input in self.sums or op.input in self.partial_sums) \
                and op.input not in self.regions and self._distribute_over_sum(node, op):
            return
        base = self.operand(op.input, shared=True)
        pooled = self._pool_as_move(base, op, node)
        if pooled is not None:
            self.move(node, pooled)
            return
        try:
            region = self._compose(base, op, node)
        except NotExact as reason:
            if base.nodes:  # retry with the input as the source
                try:
                    region = self._compose(Region(op.input, affine.identity(), has_identity=True),
                                           op, node)
                except NotExact as again:
                    self.skip(node, str(again))
                    return
                if not isinstance(reason, _StartAfterMoves):
                    self.skip(node, f"not folded into the ops before it: {reason}")
            else:
                self.skip(node, str(reason))
                return
        if not self.usable_source(region):
            self.skip(node, "its input is modified in place by another op")
            return
        if affine.adds_macs(region.term):
            region.fallback = self._fallback(base, op, node)
        self.regions[node] = region

    def _distribute_over_sum(self, node, op: Unary) -> bool:
        """A channel affine after a sum whose terms do not merge into one (convs over
        different inputs, or of windows that do not align) distributes over it::

            s * (c1 A(x) + c2 B(y)) + t  ==  (c1 s A + t)(x) + (c2 s B)(y)

        each term's conv absorbs the scale and the first one the shift, at no cost: the
        affine (BatchNorm after ``a + b + c``) is gone and the sum is rebuilt from the
        scaled convs. Only when every term is a conv-shaped region (an identity term would
        need an op of its own)."""
        term = op.term
        total = op.input
        if not isinstance(term, ChannelAffine) or term.padding or term.border is not None \
                or len(self.view.users(total)) != 1 or total in self.view.mutated \
                or self.view.inplace_target(node) is not None:
            return False
        partial = self.partial_sums.get(total)
        if partial is not None:
            inner, terms = [*partial.inner, total], partial.terms
        else:
            terms, inner = self._flatten(self.sums[total])
            inner = [*inner, total]
        coefficients: dict = {}  # a value summed twice (y + y) is one term, its conv once
        for value, coeff in terms:
            key = id(value) if isinstance(value, Region) else value
            coefficients[key] = (value, coefficients.get(key, (value, 0))[1] + coeff)
        if any(coeff == 0 for _, coeff in coefficients.values()):
            return False
        summands = [(value if isinstance(value, Region) else self.operand(value), coeff)
                    for value, coeff in coefficients.values()]
        # (the sum goes: reads of its rank or dtype read a term's source instead, which
        # has both; reads of its sizes would need the sum itself)
        if any(self.view.reads_shape(n) for n in inner) or any(
                not part.nodes or part.layouts or isinstance(part.term, ChannelAffine)
                or not self.usable_source(part, inner) for part, _ in summands):
            return False
        terms = []
        for index, (part, coeff) in enumerate(summands):
            # (the term's sign goes into its weights: a merged term is always added)
            shift = None if index else term.shift
            scaled = replace(op, input=total, term=ChannelAffine(coeff * term.scale, shift))
            try:
                region = self._compose(part, scaled, node)
            except NotExact:
                return False
            if index:  # the affine's node is reported once, with the first term
                region.nodes.remove(node)
            terms.append((region, 1.0))
        self.partial_sums[node] = PartialSum(node, inner, terms)
        return True

    def _pool_as_move(self, base: Region, op: Unary, node) -> Layout | None:
        """Average pooling with no padding after a channel affine that moves carried (a
        pre-norm on tokens, ``AvgPool1d`` over them: Next-ViT's k/v path) averages other
        axes: the affine commutes with it, so the pool is one more move (a composition
        into a depthwise conv would end the region there). Not where the pool feeds a sum,
        whose branches merge as convs."""
        if op.role != "avgpool" or not base.layouts or not base.term_is_affine \
                or base.merged or base.linear_after_moves or base.term.channels is None \
                or self._feeds_a_sum(node):
            return None
        pool = op.term(base.term.channels)
        if any(pool.padding) or base.axis_now is None:
            return None
        channel = op.axis
        return Layout(op.input, lambda axis: axis if axis == channel else None,
                      lambda axis: axis if axis == channel else None, channel_free=False,
                      reduces=True)

    def _fallback(self, base: Region, op: Unary, node) -> Region | None:
        """For a region that costs more than its ops while it waits for a sum to pay it
        back: the region that starts after the costly composition, used if the sum does
        not merge it (its inputs' own regions are then written on their own)."""
        try:
            if base.fallback is not None:
                return self._compose(base.fallback, op, node)
            if not affine.adds_macs(base.term):
                return self._compose(Region(op.input, affine.identity(), has_identity=True),
                                     op, node)
        except NotExact:
            pass
        return None

    def _compose(self, base: Region, op: Unary, node) -> Region:
        if base.layouts:
            return self._compose_after_moves(base, op, node)
        axis = op.axis
        term = op.term
        if axis == "bn":  # BatchNorm on a tensor of unproven rank
            axis = self._assumed_axis(base)
        if callable(term):  # average pooling needs the channel count
            channels = self._channels(base, op.input, op.axis)
            if channels is None:
                raise NotExact("channel count unknown: pass example_inputs")
            term = term(channels)
        self._check_constant_and_sizes(base, op, term)
        region_axis = merged_axis(base.axis, axis)
        new_term = affine.compose(base.term, term)
        if affine.adds_macs(new_term) and not affine.adds_macs(base.term) \
                and not self._feeds_a_sum(node):
            raise NotExact(f"composing it with the ops before it would increase MACs "
                           f"({new_term.weight.numel():,} > {new_term.macs:,.0f} per output "
                           "position)")
        # a region started on an input is not an identity branch once an op follows it
        region = Region(base.source, new_term, region_axis, [*base.nodes, *op.extra_nodes, node],
                        base.kinds.copy(), list(base.kernels), base.branches,
                        base.has_identity and bool(base.nodes), base.has_sub, base.shape_bound,
                        dtypes=base.dtypes | ({op.dtype} if op.dtype is not None else set()))
        region.kinds[op.role] += 1
        if op.computed:
            region.kinds["computed"] += 1
        if op.role == "conv":
            region.kernels.append(term.kernel)
        return region

    def _compose_after_moves(self, base: Region, op: Unary, node) -> Region:
        """A pointwise op after moves acts on the channel axis wherever the moves put it:
        in the source's coordinates it is the same map (a linear on the last axis of a
        ``(B, N, C)`` source, a 1x1 conv on a ``(B, C, H, W)`` one)."""
        if base.merged:
            return self._compose_merged(base, op, node)
        term = op.term
        if callable(term) or not affine.is_pointwise(term):
            raise NotExact(f"a {op.role} after a reshape or permute that moved its axes")
        if len(base.nodes) - base.kinds["identity"] == len(base.layouts) \
                and not isinstance(term, ChannelAffine):
            # moves alone before a linear: it starts after them (a channel affine keeps
            # them: a reshape back, ``reshape_as(x)``, may cancel them later)
            raise _StartAfterMoves("nothing to fold before it but moves")
        axis = op.axis
        if axis == "bn":
            rank = self.view.rank(op.input)
            axis = 1 - rank if rank else None
            if axis is None:
                raise NotExact("BatchNorm normalises axis 1 of a tensor whose rank the graph "
                               "does not prove: pass example_inputs")
        source_axis, axis_now = base.axis, base.axis_now
        if axis is not None:
            if axis_now is not None and axis != axis_now:
                raise NotExact(f"the ops act on different tensor axes ({axis_now} and {axis})")
            if axis_now is None:  # the first op with an axis: find it in the source
                axis_now = axis
                source_axis = self._source_axis(base, axis)
        if not isinstance(term, ChannelAffine):
            if source_axis is None:
                raise NotExact("the channel axis of the source is not known")
            spatial = self._now_spatial(base.source, source_axis)
            if spatial is None:
                raise NotExact("the source has more than one axis before its channel axis")
            term = affine.as_pointwise(term, spatial)
        self._check_constant_and_sizes(base, op, term)
        new_term = affine.compose(base.term, term)
        changes = base.changes + (0 if affine.keeps_shape(term) else 1)
        region = replace(base, term=new_term, axis=source_axis, axis_now=axis_now,
                         shape_reads=base.shape_reads or base.shape_bound, changes=changes,
                         marks={**base.marks, node: (axis_now, changes)},
                         nodes=[*base.nodes, *op.extra_nodes, node],
                         kinds=base.kinds.copy(), kernels=list(base.kernels), fallback=None,
                         post_kept=base.post_kept and affine.keeps_shape(term),
                         phases={**base.phases, node: len(base.layouts)},
                         dtypes=base.dtypes | ({op.dtype} if op.dtype is not None else set()),
                         now_spatial=self._now_spatial(node, axis_now),
                         linear_after_moves=base.linear_after_moves or not isinstance(
                             op.term, ChannelAffine),
                         has_identity=False)
        region.phases.update({n: len(base.layouts) for n in op.extra_nodes})
        region.kinds[op.role] += 1
        if region.costs_more_before_reduce:
            raise NotExact(f"written before the average over other axes, it would increase "
                           f"MACs ({new_term.written_macs:,} > "
                           f"{region.macs_before_reduce:,.0f} per position there)")
        if region.placement is None and not (region.moves_see_source and
                                             region.now_spatial is None):
            # no op added later can place it again: the op starts its own region
            raise _StartAfterMoves("the ops before and after the moves make no one op")
        return region

    def _check_constant_and_sizes(self, base: Region, op: Unary, term) -> None:
        if op.const_rank and not self._constant_fits(base, op):
            raise NotExact("the constant would broadcast the tensor to a higher rank, or "
                           "the graph does not prove it would not (pass example_inputs)")
        if base.shape_bound and not affine.keeps_shape(term):
            raise NotExact("the sizes of a tensor before it are read (x.shape), and it "
                           "changes them")

    def _source_axis(self, base: Region, axis):
        """The source axis that the moves of ``base`` take to ``axis``."""
        for _, move in reversed(base.layouts):
            axis = move.backward(axis)
            if axis is None:
                raise NotExact("the channel axis is merged or split by a reshape before it")
        return axis

    def _feeds_a_sum(self, node, steps: int = 8) -> bool:
        """Whether ``node``'s value goes, through single-use unary ops, into a sum: a
        composition that costs more than its parts (``affine.COMPOSE_HEADROOM``) can pay
        off only once merged with the other branches there."""
        for _ in range(steps):
            users = self.view.users(node)
            if len(users) != 1:
                return False
            node = next(iter(users))
            if not self.view.is_value(node):
                return False
            op = self.view.interpret(node)
            if op is None and len(self.view.users(node)) == 1:  # a BN's tuple in core ATen
                after = next(iter(self.view.users(node)))
                op = self.view.interpret(after) if self.view.is_value(after) else None
                if isinstance(op, Unary) and node in op.extra_nodes:
                    node = after
            if isinstance(op, Sum):
                return True
            if not isinstance(op, Unary):
                return False
        return False

    def _assumed_axis(self, base: Region) -> int:
        """BatchNorm's axis 1 where the rank is not proven: only after a conv in a graph
        whose convs always take batched input (ONNX)."""
        if self.view.convs_are_batched and isinstance(base.term, ConvTerm) and base.term.spatial:
            return -(base.term.spatial + 1)
        raise NotExact("BatchNorm normalises axis 1 of a tensor whose rank the graph does "
                       "not prove, so axis 1 may not be its channel axis: pass example_inputs")

    def _channels(self, base: Region, node, axis: int) -> int | None:
        """The size of ``node``'s channel axis: from the region's conv, its shape, or the
        convs that read it (``view.channels``)."""
        if isinstance(base.term, ConvTerm):
            return base.term.out_channels
        shape = self.view.shape(node)
        if shape and len(shape) >= -axis:
            return shape[axis]
        return self.view.channels(node, axis)

    def _constant_fits(self, base: Region, op: Unary) -> bool:
        """Whether ``x op c`` keeps ``x``'s shape: ``c`` has no more dims than ``x`` and,
        along its channel axis, ``x``'s size (a known shape is checked exactly)."""
        shape = self.view.shape(op.input)
        if shape is not None:
            channels = op.term.channels if isinstance(op.term, ChannelAffine) else None
            return op.const_rank <= len(shape) and (
                channels is None or not isinstance(op.axis, int)
                or (-op.axis <= len(shape) and shape[op.axis] == channels))
        rank = self.view.rank(op.input)
        if rank is None and isinstance(base.term, ConvTerm) and base.term.spatial > 0:
            # a conv's output has a channel axis and its spatial axes, and maybe a batch axis
            rank = base.term.spatial + (2 if self.view.convs_are_batched else 1)
        # a constant acting on axis -k can only meet terms on that axis, whose tensors
        # have at least k dims
        allowed = rank if rank is not None else (-op.axis if isinstance(op.axis, int) else 0)
        return op.const_rank <= allowed

    # a sum -------------------------------------------------------------------------------
    def sum(self, node, op: Sum):
        """A sum of any number of terms: add/sub chains are flattened first, so the order
        in which branches were added does not matter."""
        if node in self.view.mutated:
            return
        target = self.view.inplace_target(node)
        if target is not None and (len(self.view.users(target)) > 1
                                   or self.view.writes_shared(node)):
            self.skip(node, "in-place add on a tensor that is read elsewhere")
            return
        self.sums[node] = op
        if self._flattened_by_user(node):
            return  # its terms are merged once, with the whole tree, at the user
        leaves, inner = self._flatten(op)
        parts = [(self.operand(leaf), coeff, leaf) for leaf, coeff in leaves]
        groups, refusal = group_terms(parts)
        unpaid = {id(g.members[0][0]) for g in groups
                  if len(g.members) == 1 and affine.adds_macs(g.members[0][0].term)}
        if unpaid:  # costly compositions the sum did not merge: their cheaper alternatives
            parts = [(part.fallback if id(part) in unpaid and part.fallback else part, c, leaf)
                     for part, c, leaf in parts]
            groups, refusal = group_terms(parts)
        if len(groups) == 1 and len(groups[0].members) == len(parts):
            region = groups[0].region(self, inner + [node])
            region.shape_bound |= any(self.view.reads_shape(n) for n in inner)
            if not self.usable_source(region):
                self.skip(node, "its input is modified in place by another op")
                return
            self.regions[node] = region
            return
        if refusal:
            self.skip(node, refusal)
        merged = [g for g in groups if len(g.members) > 1 and isinstance(g.term, ConvTerm)]
        if not merged or any(not self.usable_source(g, inner + [node]) for g in merged):
            return
        if any(self.view.metadata_readers(n) for n in inner):
            return  # the rebuilt sum exists only at its root, after those reads
        kept = [leaf for group in groups if not any(group is g for g in merged)
                for _, _, leaf in group.members]
        if any(not self._read_at_root(leaf, inner, node) for leaf in kept):
            self.skip(node, "a term it keeps is modified in place between its sum and this one")
            return
        # some branches merge, others do not: rewrite the sum as merged convs + the rest
        terms = []
        for group in groups:
            if len(group.members) > 1 and isinstance(group.term, ConvTerm):
                terms.append((group.region(self, []), 1.0))
            else:
                terms.extend((leaf, coeff) for _, coeff, leaf in group.members)
        self.partial_sums[node] = PartialSum(node, inner, terms)

    def _read_at_root(self, leaf, inner, root) -> bool:
        """Whether a term that a partial sum keeps as it is, read again at the ``root``
        where the rebuilt sum goes, has the values that the inner sums read: always, unless
        an in-place op writes it; then only if no inner sum reads it, or the root reads it
        too before the write (``y = x + x; x += x; y + conv(x) + x``: ``y``'s ``x`` is
        not the ``x`` after the write)."""
        if leaf not in self.view.mutated:
            return True
        users = self.view.users(leaf)
        if not any(n in users for n in inner):
            return True
        return root in users and self.view.read_before_written(leaf, [*inner, root])

    def _flattened_by_user(self, node) -> bool:
        """True if ``node``'s only user is a sum that will flatten it into its own tree."""
        if len(self.view.users(node)) != 1 or node in self.view.mutated:
            return False
        user = next(iter(self.view.users(node)))
        if not self.view.is_value(user) or user in self.view.mutated \
                or not isinstance(self.view.interpret(user), Sum):
            return False
        target = self.view.inplace_target(user)
        return target is None or len(self.view.users(target)) == 1

    def _flatten(self, op: Sum):
        """Leaves ``[(node, coeff)]`` of the add/sub tree under ``op`` and the inner sum
        nodes that only this tree reads."""
        leaves, inner = [], []
        stack = list(reversed(op.operands))
        while stack:
            operand, coeff = stack.pop()
            child = self.sums.get(operand)
            if child is not None and len(self.view.users(operand)) == 1 and operand not in self.view.mutated:
                inner.append(operand)
                stack.extend((n, coeff * c) for n, c in reversed(child.operands))
            else:
                leaves.append((operand, coeff))
        return leaves, inner
