"""Moves: ops that move values without computing new ones, read as :class:`Layout`.

``permute``, ``transpose``, ``movedim``, ``flatten``, ``unflatten``, ``view``,
``reshape``, ``view_as``, ``reshape_as``, ``squeeze``, ``unsqueeze`` (tensor methods, torch
functions, ``nn.Flatten`` and aten forms), and averages over axes other than the channel
axis (``mean``, adaptive average pooling to 1): pointwise ops (channel affines, linears,
1x1 convs) commute with all of them as long as the channel axis stays whole, so a
BatchNorm before ``flatten(0, 1)`` folds into the Linear after it.

Each move maps axes (negative indices) from its input to its output and back; an axis it
merges with another, splits or averages maps to None. A map is proven, never guessed:

* permutations from their arguments and the input's proven rank;
* ``flatten`` / ``squeeze`` / ``unsqueeze`` from their dims and ranks (an axis merged only
  with axes of size 1 stays whole);
* ``view`` / ``reshape`` from the sizes on both sides: static shapes (export graphs,
  ``example_inputs``), or sizes read from the input itself (``x.reshape(B, C, -1)`` with
  ``B, C, H, W = x.shape``); ``reshape_as(t)`` keeps a last axis that ``t`` also ends with.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx
import torch.nn as nn

from reparam_fx.fx.capture import runs_standard_forward
from reparam_fx.fx.values import schema_name, tensor_shape
from reparam_fx.regions import Layout

_PERMUTES = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t"}
_RESHAPES = {"view", "reshape", "_unsafe_view", "view_as", "reshape_as", "flatten",
             "unflatten", "squeeze", "unsqueeze"}
_REDUCTIONS = {"mean", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"}


def interpret_move(node: torch.fx.Node, facts) -> Layout | None:
    """The node as a :class:`Layout`, or None if it is no move (or its map is unproven)."""
    name, args, kwargs = _call(node, facts)
    if name is None or not args or not isinstance(args[0], torch.fx.Node):
        return None
    x = args[0]
    if x in facts.scalars:
        return None
    rank = facts.rank(x)
    out_rank = facts.rank(node)
    try:
        if name in _PERMUTES:
            return _permutation(x, name, args, kwargs, rank)
        if name in _REDUCTIONS:
            return _reduction(x, node, name, args, kwargs, rank, facts)
        if name in _RESHAPES:
            return _reshape(x, node, name, args, kwargs, rank, out_rank, facts)
    except (TypeError, ValueError, IndexError):
        return None
    return None


def _call(node, facts):
    """``(name, args, kwargs)`` of a move in any form; modules as their functional form."""
    if node.op == "call_method":
        return node.target, node.args, node.kwargs
    if node.op == "call_function":
        if node.target is operator.getitem:
            return None, (), {}
        name = schema_name(node.target) or getattr(node.target, "__name__", None)
        return name, node.args, node.kwargs
    if node.op == "call_module" and node.args:
        module = facts.modules.get(node.target)
        if not runs_standard_forward(module):
            return None, (), {}
        if type(module) is nn.Flatten:
            return "flatten", (node.args[0], module.start_dim, module.end_dim), {}
        if type(module) is nn.Unflatten:
            return "unflatten", (node.args[0], module.dim, module.unflattened_size), {}
        if isinstance(module, nn.modules.pooling._AdaptiveAvgPoolNd):
            size = module.output_size
            spatial = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2,
                       nn.AdaptiveAvgPool3d: 3}[type(module)]
            return f"adaptive_avg_pool{spatial}d", (node.args[0], size), {}
    return None, (), {}


def _ints(values) -> tuple[int, ...] | None:
    values = values[0] if len(values) == 1 and isinstance(values[0], (tuple, list)) else values
    return tuple(values) if all(isinstance(v, int) and not isinstance(v, bool)
                                for v in values) else None


def _moved(order: list[int]) -> Layout:
    """The move that puts input axis ``order[j]`` at output position ``j``."""
    rank = len(order)

    def forward(axis):
        return order.index(axis % rank) - rank

    def backward(axis):
        return order[axis % rank] - rank
    return (forward, backward)


def _permutation(x, name, args, kwargs, rank) -> Layout | None:
    if rank is None:
        return None
    order = list(range(rank))
    if name == "permute":
        dims = _ints(args[1:] or (kwargs.get("dims"),))
        if dims is None or len(dims) != rank:
            return None
        order = [d % rank for d in dims]
    elif name == "t":
        if rank != 2:
            return None
        order = [1, 0]
    elif name in ("transpose", "swapaxes", "swapdims"):
        dims = _ints(args[1:3])
        if dims is None:
            return None
        a, b = (d % rank for d in dims)
        order[a], order[b] = order[b], order[a]
    else:  # movedim / moveaxis with single ints
        dims = _ints(args[1:3])
        if dims is None:
            return None
        source, destination = (d % rank for d in dims)
        order.remove(source)
        order.insert(destination, source)
    forward, backward = _moved(order)
    return Layout(x, forward, backward)


def _reduction(x, node, name, args, kwargs, rank, facts) -> Layout | None:
    """``x.mean(dims, keepdim)`` and adaptive average pooling to size 1: the channel axis
    survives if it is not averaged."""
    if rank is None:
        return None
    found = _averaged(name, args, kwargs, rank)
    if found is None:
        return None
    averaged, keepdim = found
    kept = [a for a in range(rank) if a not in averaged]
    out_rank = rank if keepdim else len(kept)

    def forward(axis):
        position = axis % rank
        if position in averaged:
            return None
        return (position if keepdim else kept.index(position)) - out_rank

    def backward(axis):
        position = axis % out_rank
        if keepdim:
            return None if position in averaged else position - rank
        return kept[position] - rank
    return Layout(x, forward, backward, reduces=True)


def _averaged(name, args, kwargs, rank) -> tuple[set, bool] | None:
    """``(averaged input axes, keepdim)`` of a mean or adaptive average pooling to 1."""
    if name == "mean":
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        dims = (dims,) if isinstance(dims, int) else dims
        if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims) \
                or not isinstance(keepdim, bool):
            return None
        return {d % rank for d in dims}, keepdim
    spatial = int(name[-2])
    size = args[1] if len(args) > 1 else kwargs.get("output_size")
    sizes = (size,) * spatial if isinstance(size, int) else tuple(size)
    if any(s != 1 for s in sizes) or rank < spatial + 1:
        return None
    return set(range(rank - spatial, rank)), True


def _unit_axes(x, rank, facts) -> set:
    """Axes of ``x`` proven to have size 1: from its shape, or because an average made
    them (``AdaptiveAvgPool2d(1)``, ``mean(dims, keepdim=True)``)."""
    shape = tensor_shape(x)
    if shape is not None:
        return {p for p, size in enumerate(shape) if isinstance(size, int) and size == 1}
    name, args, kwargs = _call(x, facts) if isinstance(x, torch.fx.Node) else (None, (), {})
    if name in _REDUCTIONS and args and isinstance(args[0], torch.fx.Node):
        found = _averaged(name, args, kwargs, rank)
        if found is not None and found[1]:
            return found[0]
    return set()


def _reshape(x, node, name, args, kwargs, rank, out_rank, facts) -> Layout | None:
    in_shape, out_shape = tensor_shape(x), tensor_shape(node)
    if name == "flatten":
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        if rank is None or not isinstance(start, int) or not isinstance(end, int):
            return None
        layout = _merging(x, rank, start % rank, end % rank, _unit_axes(x, rank, facts))
        if end % rank == rank - 1:
            layout.tail_merge = _tail_merge(start % rank, rank, in_shape)
        return layout
    if name in ("squeeze", "unsqueeze"):
        dims = _ints(args[1:] or (kwargs.get("dim"),))
        if rank is None or out_rank is None or dims is None or len(dims) != 1:
            return None
        if name == "unsqueeze":
            return _unsqueezed(x, rank, dims[0] % (rank + 1))
        if out_rank == rank:  # the axis was not of size 1: nothing moved
            return Layout(x, lambda axis: axis, lambda axis: axis)
        return _merging(x, rank, dims[0] % rank, dims[0] % rank, set(), drop=True)
    if in_shape is not None and out_shape is not None and _static(in_shape) and _static(out_shape):
        layout = _by_sizes(x, in_shape, out_shape)
        if out_shape and math.prod(out_shape[:-1]) > 0:
            start = [j for j in range(len(in_shape))
                     if math.prod(in_shape[:j]) == math.prod(out_shape[:-1])]
            if start and start[0] < len(in_shape) - 1:
                layout.tail_merge = _tail_merge(start[0], len(in_shape), in_shape)
        return layout
    if name in ("view_as", "reshape_as"):
        return _as_last_axis(x, args[1], facts)
    sizes = args[1:] if node.op == "call_method" else args[1:2]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    return _by_read_sizes(x, list(sizes), rank, facts)


def _static(shape) -> bool:
    return all(isinstance(s, int) for s in shape)


def _merging(x, rank, start, end, unit: set, drop=False) -> Layout:
    """Axes ``start..end`` merged into one (or, ``drop``: one axis of size 1 removed). An
    axis merged with axes of size 1 (``unit``) only stays whole."""
    out_rank = rank - (end - start) - (1 if drop else 0)

    def whole(position):
        return all(p in unit for p in range(start, end + 1) if p != position)

    def forward(axis):
        position = axis % rank
        if position < start:
            return position - out_rank
        if position > end:
            return position - (end - start) - (1 if drop else 0) - out_rank
        return None if drop or not whole(position) else start - out_rank

    def backward(axis):
        position = axis % out_rank
        if position < start:
            return position - rank
        if drop:
            return position + 1 - rank
        if position > start:
            return position + (end - start) - rank
        kept = [p for p in range(start, end + 1) if p not in unit]
        return kept[0] - rank if len(kept) == 1 else None
    return Layout(x, forward, backward)


def _tail_merge(start: int, rank: int, in_shape):
    """The map of a move that merges input axes ``start ..`` into its last axis."""
    trailing = in_shape[start + 1:] if in_shape is not None else None
    block = math.prod(trailing) if trailing is not None and _static(trailing) else None

    def tail_merge(axis):
        return (-1, block) if axis % rank == start else None
    return tail_merge


def _unsqueezed(x, rank, dim) -> Layout:
    def forward(axis):
        position = axis % rank
        return (position if position < dim else position + 1) - (rank + 1)

    def backward(axis):
        position = axis % (rank + 1)
        if position == dim:
            return None
        return (position if position < dim else position - 1) - rank
    return Layout(x, forward, backward)


def _by_sizes(x, in_shape, out_shape, channel_free=False) -> Layout:
    """A reshape between known sizes: an axis stays whole where the sizes before it (and
    its own) match on both sides, as row-major order keeps it then."""
    def prefix(shape, position):
        return math.prod(shape[:position])

    def forward(axis):
        position = axis % len(in_shape)
        before, size = prefix(in_shape, position), in_shape[position]
        for j in range(len(out_shape)):
            if prefix(out_shape, j) == before and out_shape[j] == size:
                return j - len(out_shape)
        return None

    def backward(axis):
        position = axis % len(out_shape)
        before, size = prefix(out_shape, position), out_shape[position]
        for j in range(len(in_shape)):
            if prefix(in_shape, j) == before and in_shape[j] == size:
                return j - len(in_shape)
        return None
    return Layout(x, forward, backward, channel_free=channel_free)


def _read_dim(value, x):
    """The input axis a size argument reads (``x.shape[i]``, ``x.size(i)``), else None."""
    if not isinstance(value, torch.fx.Node):
        return None
    if value.op == "call_method" and value.target == "size" and value.args[0] is x \
            and len(value.args) == 2 and isinstance(value.args[1], int):
        return value.args[1]
    if value.op == "call_function" and value.target is operator.getitem \
            and isinstance(value.args[1], int):
        shape = value.args[0]
        if isinstance(shape, torch.fx.Node) and shape.args and shape.args[0] is x and (
                (shape.op == "call_function" and shape.target is getattr
                 and shape.args[1] == "shape")
                or (shape.op == "call_method" and shape.target == "size"
                    and len(shape.args) == 1)):
            return value.args[1]
    return None


def _by_read_sizes(x, sizes, rank, facts) -> Layout | None:
    """``x.reshape(B, C, -1)`` with sizes read from ``x``: the leading output axes that are
    exactly ``x``'s leading axes, in order, stay whole (and keep their place)."""
    if rank is None or not sizes:
        return None
    out_rank = len(sizes)
    kept = 0
    for j, size in enumerate(sizes):
        read = _read_dim(size, x)
        if read is None or read % rank != j:
            break
        kept += 1

    def forward(axis):
        position = axis % rank
        if position < kept and not (position == kept - 1 and kept == out_rank and kept < rank):
            return position - out_rank
        return None

    def backward(axis):
        position = axis % out_rank
        return position - rank if position < kept and not (
            position == kept - 1 and kept == out_rank and kept < rank) else None
    layout = Layout(x, forward, backward, channel_free=False) if kept else None
    if layout is not None and kept == out_rank - 1 and kept < rank - 1 \
            and isinstance(sizes[-1], int) and sizes[-1] == -1:  # x.view(B, -1)
        layout.tail_merge = _tail_merge(kept, rank, None)
    return layout


def _as_last_axis(x, like, facts) -> Layout | None:
    """``z.reshape_as(t)`` / ``z.view_as(t)``: row-major order keeps ``z``'s last axis
    whole if ``t``'s last axis has its size; the region builder proves that (``like``: the
    channel axis was ``t``'s last axis and no op since changed its size)."""
    rank, like_rank = facts.rank(x), facts.rank(like)
    if rank is None or like_rank is None:
        return None

    def forward(axis):
        return -1 if axis % rank == rank - 1 else None

    def backward(axis):
        return -1 if axis % like_rank == like_rank - 1 else None
    return Layout(x, forward, backward, channel_free=False, like=like)
