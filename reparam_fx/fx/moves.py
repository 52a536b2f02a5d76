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
from reparam_fx.fx.values import is_size_int, schema_name, tensor_shape, whole_shape_of
from reparam_fx.core.layout import (Layout, average_maps, permutation_maps, reshape_maps,
                                    tail_merge_map)

PERMUTES = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t"}
RESHAPES = {"view", "reshape", "_unsafe_view", "view_as", "reshape_as", "flatten",
             "unflatten", "squeeze", "unsqueeze"}
COPIES = {"clone", "contiguous"}
_REDUCTIONS = {"mean", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"}


def interpret_move(node: torch.fx.Node, facts) -> Layout | None:
    """The node as a :class:`Layout` (one that keeps no axis if its map is unproven), or
    None if it is no move."""
    name, args, kwargs = _call(node, facts)
    if name is None or not args or not isinstance(args[0], torch.fx.Node):
        return None
    x = args[0]
    if x in facts.scalars:
        return None
    if name in COPIES and set(kwargs) <= {"memory_format"} and len(args) <= 2:
        # the values unchanged, in a new (contiguous) memory layout that a ``view`` after it
        # may need: written again with the moves around it, never dropped
        return Layout(x, lambda axis: axis, lambda axis: axis)
    rank = _rank(x, facts)
    out_rank = facts.rank(node)
    if name not in PERMUTES and name not in _REDUCTIONS and name not in RESHAPES:
        return None
    try:
        if name in PERMUTES:
            layout = _permutation(x, name, args, kwargs, rank)
        elif name in _REDUCTIONS:
            layout = _reduction(x, node, name, args, kwargs, rank, facts)
        else:
            layout = _reshape(x, node, name, args, kwargs, rank, out_rank, facts)
    except (TypeError, ValueError, IndexError):
        layout = None
    return layout if layout is not None else _unproven(x)


def _unproven(x) -> Layout:
    """A move whose map the graph does not prove: it keeps no axis (a region before it
    ends there, and the report says so)."""
    return Layout(x, lambda axis: None, lambda axis: None, channel_free=False)


def move_name(node: torch.fx.Node, facts) -> str | None:
    """The functional name of a move node (``permute``, ``flatten``, ``mean`` ...)."""
    return _call(node, facts)[0]


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
    forward, backward = permutation_maps(order)
    return Layout(x, forward, backward)


def _reduction(x, node, name, args, kwargs, rank, facts) -> Layout | None:
    """``x.mean(dims, keepdim)`` and adaptive average pooling to size 1: the channel axis
    survives if it is not averaged."""
    if rank is None:
        return None
    found = _averaged(name, args, kwargs, rank)
    if found is None:
        return None
    forward, backward = average_maps(rank, *found)
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


def _rank(x, facts) -> int | None:
    """``x``'s proven rank; also after squeezing an axis an average made of size 1."""
    rank = facts.rank(x)
    if rank is None and isinstance(x, torch.fx.Node) and x.op == "call_method" \
            and x.target == "squeeze" and len(x.args) == 2 and isinstance(x.args[1], int) \
            and isinstance(x.args[0], torch.fx.Node):
        before = _rank(x.args[0], facts)
        if before is not None and x.args[1] % before in _unit_axes(x.args[0], before, facts):
            return before - 1
    return rank


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
    if name == "squeeze" and len(args) == 2 and isinstance(args[0], torch.fx.Node) \
            and isinstance(args[1], int) and _rank(args[0], facts) == rank + 1:
        dim = args[1] % (rank + 1)  # x.squeeze(-1).squeeze(-1)
        before = _unit_axes(args[0], rank + 1, facts)
        if dim in before:
            return {p if p < dim else p - 1 for p in before if p != dim}
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
        if rank is None or dims is None or len(dims) != 1:
            return None
        if name == "unsqueeze":
            return _unsqueezed(x, rank, dims[0] % (rank + 1))
        if dims[0] % rank in _unit_axes(x, rank, facts):
            out_rank = rank - 1  # (shapes or an average made that axis)
        if out_rank is None:
            return None
        if out_rank == rank:  # the axis was not of size 1: nothing moved
            return Layout(x, lambda axis: axis, lambda axis: axis)
        return _merging(x, rank, dims[0] % rank, dims[0] % rank, set(), drop=True)
    if name == "unflatten" and (in_shape is None or not _static(in_shape)):
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        sizes = args[2] if len(args) > 2 else kwargs.get("sizes")
        if rank is None or not isinstance(dim, int) or not isinstance(sizes, (tuple, list)):
            return None
        return _split(x, rank, dim % rank, len(sizes))
    if in_shape is not None and out_shape is not None and _static(in_shape) and _static(out_shape):
        # (its sizes spell the channel count: written again on another one, they break)
        layout = Layout(x, *reshape_maps(in_shape, out_shape), channel_free=False)
        if math.prod(out_shape[:-1]) > 0:
            layout.tail_merge = tail_merge_map(in_shape, out_shape)
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


def _split(x, rank, dim, parts) -> Layout:
    """Axis ``dim`` split into ``parts`` axes (``unflatten``); the others keep their order."""
    out_rank = rank + parts - 1

    def forward(axis):
        position = axis % rank
        if position == dim:
            return None
        return (position if position < dim else position + parts - 1) - out_rank

    def backward(axis):
        position = axis % out_rank
        if dim <= position < dim + parts:
            return None
        return (position if position < dim else position - parts + 1) - rank
    return Layout(x, forward, backward)


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


def _read_dim(value, same: set):
    """The input axis a size argument reads (``t.shape[i]``, ``t.size(i)`` of a tensor ``t``
    in ``same``: the input or one of the same shape), else None."""
    if not isinstance(value, torch.fx.Node):
        return None
    if value.op == "call_method" and value.target == "size" and value.args[0] in same \
            and len(value.args) == 2 and isinstance(value.args[1], int):
        return value.args[1]
    if value.op == "call_function" and value.target is operator.getitem \
            and isinstance(value.args[1], int):
        shape = value.args[0]
        if isinstance(shape, torch.fx.Node) and shape.args and shape.args[0] in same and (
                (shape.op == "call_function" and shape.target is getattr
                 and shape.args[1] == "shape")
                or (shape.op == "call_method" and shape.target == "size"
                    and len(shape.args) == 1)):
            return value.args[1]
    return None


_SAME_SHAPE_MODULES = (nn.modules.batchnorm._BatchNorm, nn.Identity, nn.ReLU, nn.ReLU6,
                       nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                       nn.LeakyReLU, nn.modules.dropout._DropoutNd)


def _same_shape(x, facts) -> set:
    """``x`` and the tensors before it that have its shape for sure: the inputs of
    standard BatchNorm, activation and dropout modules (``B, C, H, W = x.shape`` read
    before ``out = norm(x)``, then ``out.reshape(B, C, -1)``)."""
    same = {x}
    while isinstance(x, torch.fx.Node) and x.op == "call_module" and len(x.args) == 1:
        module = facts.modules.get(x.target)
        if not isinstance(module, _SAME_SHAPE_MODULES) or not runs_standard_forward(module):
            break
        x = x.args[0]
        same.add(x)
    return same


def _by_read_sizes(x, sizes, rank, facts) -> Layout | None:
    """``x.reshape(B, C, -1)`` / ``y.view(-1, y.shape[-1])`` with sizes read from ``x`` (or
    a tensor of its shape): output axes that read ``x``'s leading axes, in order, from the
    front, or its trailing axes, in order, from the back, are those axes whole. Axes of
    size 1 (after an average to 1) do not count: ``x.view(x.size(0), -1)`` of a pooled
    ``(B, C, 1, 1)`` keeps C whole."""
    if rank is None or not sizes:
        return None
    if len(sizes) == 1 and isinstance(sizes[0], torch.fx.Node) and not is_size_int(sizes[0]):
        # one value holding every size: ``x.reshape(t.shape)`` of a ``t`` shaped like ``x``
        # changes nothing; any other (``y.shape[:2] + (-1,)``, a tuple built at run time)
        # is unproven
        if whole_shape_of(sizes[0]) in _same_shape(x, facts):
            return Layout(x, lambda axis: axis, lambda axis: axis)
        return None
    out_rank = len(sizes)
    same, unit = _same_shape(x, facts), _unit_axes(x, rank, facts)
    reads = [_read_dim(size, same) for size in sizes]
    head = next((j for j, read in enumerate(reads) if read is None or read % rank != j),
                len(reads))
    tail = next((i for i in range(out_rank) if reads[out_rank - 1 - i] is None
                 or reads[out_rank - 1 - i] % rank != rank - 1 - i), out_rank)
    head, tail = min(head, rank), min(tail, rank - head, out_rank - head)
    if head == out_rank and head < rank and not all(p in unit for p in range(head, rank)):
        head -= 1  # the last output axis also holds the axes after it
    squeezed = head == out_rank - 1 and tail == 0 and head < rank \
        and all(p in unit for p in range(head + 1, rank)) \
        and isinstance(sizes[-1], int) and sizes[-1] == -1 and head not in unit

    def forward(axis):
        position = axis % rank
        if position < head:
            return position - out_rank
        if position >= rank - tail:
            return position - rank
        return -1 if squeezed and position == head else None

    def backward(axis):
        position = axis % out_rank
        if position < head:
            return position - rank
        if position >= out_rank - tail:
            return position - out_rank
        return head - rank if squeezed and position == out_rank - 1 else None
    if not (head or tail or squeezed):
        return None
    layout = Layout(x, forward, backward, channel_free=False)
    if head == out_rank - 1 and head < rank - 1 and not squeezed \
            and isinstance(sizes[-1], int) and sizes[-1] == -1:  # x.view(B, -1)
        layout.tail_merge = _tail_merge(head, rank, None)
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
