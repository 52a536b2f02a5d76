"""ONNX moves: nodes that move values without computing new ones, read as :class:`Layout`.

    Transpose(perm)                       y[..., j, ...] = x[..., perm[j], ...]
    Reshape(shape) / Flatten(axis)        the same values in row-major order, other sizes
    Squeeze(axes) / Unsqueeze(axes)       size-1 axes removed / inserted
    ReduceMean(axes) / GlobalAveragePool  the mean over axes (here: never the channel axis)

A pointwise op ``P`` (channel affine, linear, 1x1 conv) acts on each position's channel
vector alone, so ``P(move(x)) == move(P(x))`` whenever the move keeps the channel axis
whole (the mean too: ``P`` is affine). That is what lets a BatchNormalization between
``Reshape``s fold into the MatMul before it (LeViT's ``LinearNorm``), or a layer scale after
a channels-last MatMul fold into it.

Each move maps axes (negative indices) from its input to its output and back; an axis it
merges with another, splits, or averages maps to None. The maps are proven from sizes,
never guessed: a reshape keeps input axis ``i`` whole as output axis ``j`` iff

    prod(in[:i]) == prod(out[:j])  and  in[i] == out[j]

(row-major order then puts the same elements there). Sizes are products of known integers
and named dimensions (``"batch"``: one dim_param is one size throughout a graph); a
dimension without a value or a name equals nothing but itself. Output sizes come from the
node's constant inputs and attributes (``Reshape``'s ``0`` copies the input's size, ``-1``
takes what is left, ``Flatten`` always gives rank 2), or else from the graph's shapes.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from reparam_fx.core.layout import (Layout, average_maps, permutation_maps,
                                    permutations_cancel, reshape_maps, tail_merge_map)

from reparam_fx.core.regions import Region

PERMUTES = frozenset({"Transpose"})
RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
AVERAGES = frozenset({"ReduceMean", "GlobalAveragePool"})
MOVE_OPS = PERMUTES | RESHAPES | AVERAGES

# a size: coefficient * product of named dimensions, e.g. (5, ("batch",)) is 5 * batch
Size = tuple[int, tuple[str, ...]]
_UNKNOWN = itertools.count()  # numbers the names of dims that equal nothing else
_CANCEL_CHECK_LIMIT = 1 << 20  # elements: a mixed permute/reshape chain is replayed on indices


@dataclass
class OnnxMove(Layout):
    """A :class:`Layout` with what the ONNX writer needs to decide whether moves cancel."""

    kind: str = ""  # "permute", "reshape" or "average"
    in_sizes: tuple = ()  # Size per input axis
    out_sizes: tuple = ()  # Size per output axis


def interpret_move(node, sizes_of: Callable, constant_of: Callable) -> OnnxMove | None:
    """``node`` as a move, or None if it is none or its axis map is not proven.
    ``sizes_of(var)``: what the graph proves about ``var``'s sizes (a tuple of sizes, see
    :func:`graph_sizes`) or None; ``constant_of(var)``: a constant input's value or None."""
    if node.op not in MOVE_OPS or len(node.outputs) != 1 or not node.inputs:
        return None
    x = node.inputs[0]
    in_sizes = sizes_of(x)
    if in_sizes is None:
        return None
    if node.op == "Transpose":
        return _transpose(node, x, in_sizes)
    if node.op in AVERAGES:
        return _average(node, x, in_sizes, constant_of)
    out_sizes = _reshaped(node, in_sizes, constant_of)
    if out_sizes is None:
        return None
    # written again on another channel count (placement "before"), a Reshape's shape may
    # spell out the old one, and a Squeeze without axes would drop a channel axis of size 1
    channel_free = node.op in ("Flatten", "Unsqueeze") or (
        node.op == "Squeeze" and bool(_axes(node, constant_of)))
    return _by_sizes(x, in_sizes, out_sizes, channel_free=channel_free)


def graph_sizes(shape) -> tuple | None:
    """A graph shape (ints, dim_param names, None) as sizes; every dimension without a
    value or a name gets a name of its own. Call it once per tensor."""
    return None if shape is None else tuple(_size(d) for d in shape)


def _size(dim) -> Size:
    if isinstance(dim, (int, np.integer)) and dim >= 0:
        return int(dim), ()
    if isinstance(dim, str) and dim:
        return 1, (dim,)
    return 1, (f"\0unknown{next(_UNKNOWN)}",)


def _product(sizes) -> Size:
    coefficient = math.prod(c for c, _ in sizes)
    return coefficient, tuple(sorted(itertools.chain.from_iterable(n for _, n in sizes)))


def _quotient(total: Size, part: Size) -> Size | None:
    """``total / part`` if it is a size for every value of the named dimensions."""
    if part[0] == 0 or total[0] % part[0]:
        return None
    left = Counter(total[1])
    left.subtract(part[1])
    if any(count < 0 for count in left.values()):
        return None
    return total[0] // part[0], tuple(sorted(left.elements()))


def as_dims(sizes) -> list:
    """Sizes as ONNX dims: an int, a dim_param name, or None."""
    return [c if not names else (names[0] if c == 1 and len(names) == 1
                                 and not names[0].startswith("\0") else None)
            for c, names in sizes]


def _ints(value) -> list[int] | None:
    if value is None:
        return None
    return [int(v) for v in np.asarray(value).reshape(-1)]


def _axes(node, constant_of) -> list[int] | None:
    """``axes`` from the second input (Squeeze/Unsqueeze opset >= 13, ReduceMean >= 18) or
    the attribute (older opsets); [] if neither is given; None if the input is no constant."""
    if len(node.inputs) > 1 and node.inputs[1].name:
        return _ints(constant_of(node.inputs[1]))
    return list(node.attrs.get("axes", []))


def _transpose(node, x, in_sizes) -> OnnxMove | None:
    rank = len(in_sizes)
    perm = [int(p) for p in node.attrs.get("perm", range(rank - 1, -1, -1))]
    if sorted(perm) != list(range(rank)):
        return None
    forward, backward = permutation_maps(perm)
    return OnnxMove(x, forward, backward, kind="permute", in_sizes=in_sizes,
                    out_sizes=tuple(in_sizes[p] for p in perm))


def _average(node, x, in_sizes, constant_of) -> OnnxMove | None:
    rank = len(in_sizes)
    if node.op == "GlobalAveragePool":
        averaged, keep = set(range(2, rank)), True
    else:
        axes = _axes(node, constant_of)
        if axes is None or not all(-rank <= a < rank for a in axes):
            return None
        if not axes and node.attrs.get("noop_with_empty_axes", 0):
            return None  # the identity: nothing to move
        averaged = {a % rank for a in axes} if axes else set(range(rank))
        keep = bool(node.attrs.get("keepdims", 1))
    forward, backward = average_maps(rank, averaged, keep)
    out_sizes = tuple((1, ()) if a in averaged else in_sizes[a]
                      for a in range(rank) if keep or a not in averaged)
    return OnnxMove(x, forward, backward, reduces=True, kind="average", in_sizes=in_sizes,
                    out_sizes=out_sizes)


def _reshaped(node, in_sizes, constant_of) -> tuple | None:
    """The output sizes of a reshape-like node."""
    rank = len(in_sizes)
    if node.op == "Flatten":
        axis = int(node.attrs.get("axis", 1))
        if not -rank <= axis <= rank:
            return None
        axis += rank if axis < 0 else 0
        return _product(in_sizes[:axis]), _product(in_sizes[axis:])
    if node.op == "Squeeze":
        axes = _axes(node, constant_of)
        if axes is None:
            return None
        if not axes:  # every size-1 axis: all sizes must be known
            if any(names for _, names in in_sizes):
                return None
            axes = [a for a, s in enumerate(in_sizes) if s == (1, ())]
        axes = {a % rank for a in axes}
        if any(in_sizes[a] != (1, ()) for a in axes):
            return None  # a size-1 axis the graph does not prove
        return tuple(s for a, s in enumerate(in_sizes) if a not in axes)
    if node.op == "Unsqueeze":
        axes = _axes(node, constant_of)
        out_rank = rank + len(axes or ())
        if not axes or len({a % out_rank for a in axes}) != len(axes):
            return None
        inserted = {a % out_rank for a in axes}
        sizes = iter(in_sizes)
        return tuple((1, ()) if a in inserted else next(sizes) for a in range(out_rank))
    shape = _ints(constant_of(node.inputs[1])) if len(node.inputs) > 1 else None
    if shape is None:  # sizes computed in the graph: its shape inference may know them
        return graph_sizes(getattr(node.outputs[0], "shape", None))
    allow_zero = bool(node.attrs.get("allowzero", 0))
    sizes = []
    for j, size in enumerate(shape):
        if size == 0 and not allow_zero:
            if j >= rank:
                return None
            sizes.append(in_sizes[j])
        elif size == -1:
            sizes.append(None)
        elif size > 0:
            sizes.append((size, ()))
        else:
            return None  # an empty tensor, or more than one -1
    if sizes.count(None) > 1:
        return None
    if None in sizes:
        rest = _quotient(_product(in_sizes), _product([s for s in sizes if s is not None]))
        if rest is None:
            return None
        sizes[sizes.index(None)] = rest
    if _product(sizes) != _product(in_sizes):
        return None  # not provably the same number of values (or not a valid reshape)
    return tuple(sizes)


def _by_sizes(x, in_sizes, out_sizes, channel_free: bool) -> OnnxMove:
    """A reshape between ``in_sizes`` and ``out_sizes``
    (:func:`reparam_fx.core.layout.reshape_maps`); an axis merged with every axis after it
    into the last output axis (``Flatten(axis=1)`` on ``(B, C, H, W)``) is described by
    ``tail_merge``, the repetition ``block = H * W`` None where a size is only named."""
    forward, backward = reshape_maps(in_sizes, out_sizes, _product)
    tail_merge = tail_merge_map(in_sizes, out_sizes, _product,
                                block=lambda size: None if size[1] else size[0])
    return OnnxMove(x, forward, backward, channel_free=channel_free, tail_merge=tail_merge,
                    kind="reshape", in_sizes=in_sizes, out_sizes=out_sizes)


# ---- moves that cancel ---------------------------------------------------------------------

def moves_cancel(region: Region) -> bool:
    """Whether the region's moves, written again where its placement puts them, together
    leave every value where it was: transposes whose permutations compose to the identity;
    reshapes (squeezes ...) from a shape back to the same shape; a mixed chain replayed on
    an index tensor of the (static) shape. Reshapes are judged on the graph's sizes, so they
    cancel only where the copies see those sizes (the op written after the moves, or ops
    that keep the shape)."""
    moves = [move for _, move in region.layouts]
    if not moves or not all(isinstance(m, OnnxMove) for m in moves) \
            or any(m.kind == "average" for m in moves):
        return False
    start, end = moves[0].in_sizes, moves[-1].out_sizes
    if all(m.kind == "permute" for m in moves):
        return permutations_cancel(moves, len(start))
    same_sizes = region.placement == "after" or region.post_kept
    if start != end or not same_sizes:
        return False
    if all(m.kind == "reshape" for m in moves):
        return True
    dims = as_dims(start)
    if not all(isinstance(d, int) for m in moves for d in as_dims(m.out_sizes)) \
            or not all(isinstance(d, int) for d in dims) \
            or math.prod(dims) > _CANCEL_CHECK_LIMIT:
        return False
    index = np.arange(math.prod(dims)).reshape(dims)
    values = index
    for move in moves:
        if move.kind == "permute":
            rank = values.ndim
            values = values.transpose([move.backward(j - rank) % rank for j in range(rank)])
        else:
            values = values.reshape(as_dims(move.out_sizes))
    return values.shape == index.shape and bool(np.array_equal(values, index))
