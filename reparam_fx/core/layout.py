"""Channel axes through moves: where a reshape, permute or average puts each axis.

A *move* changes where values are, not what they are (``permute``, ``flatten``,
``reshape``, ``squeeze`` ...), or averages over axes other than the channel axis. A
pointwise op (a channel affine, a linear, a 1x1 conv) commutes with a move that keeps
its channel axis whole, so the region builder (:mod:`reparam_fx.core.builder`) carries a
region across moves by following the channel axis through each one's :class:`Layout`.
Axes are negative (counted from the last), so a batch axis in front changes nothing.

Both frontends describe their moves with the maps here:

* :func:`permutation_maps` - ``permute(order)``;
* :func:`average_maps` - a mean over some axes (kept as size 1 or dropped);
* :func:`reshape_maps` - a reshape between known sizes. Row-major order keeps input axis
  ``i`` whole as output axis ``j`` iff the values before them and their own sizes match::

      prod(in[:i]) == prod(out[:j])  and  in[i] == out[j]

  taken only where the pairing is one-to-one (size-1 axes next to size-1 axes match
  each other, and which is which is not known);
* :func:`tail_merge_map` - axes merged with every axis after them into the last output
  axis (``flatten(1)`` on ``(B, C, H, W)``): a channel affine before such a move is the
  affine repeated ``H * W`` times on the merged axis;
* :func:`permutations_cancel` - whether a chain of moves puts every axis back.

Sizes are ints for torch graphs; the ONNX frontend's sizes are symbolic products
(:mod:`reparam_fx.onnx.moves`), so the functions take the ``product`` to use.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence



@dataclass
class Layout:
    """``node = move(input)``: the same values moved to other positions (``permute``,
    ``transpose``, ``flatten``, ``reshape``, ``squeeze`` ...) or averaged over axes other
    than the channel axis (``mean``, ``reduces``). Pointwise ops (channel affines, linears,
    1x1 convs) commute with it as long as it keeps the channel axis whole."""

    input: object
    forward: Callable  # input axis (negative) -> output axis (negative), or None if the
    #                    op merges, splits or averages that axis
    backward: Callable  # output axis -> input axis, or None
    channel_free: bool = True  # its arguments do not depend on the channel axis's size
    reduces: bool = False  # it averages over axes (cheaper after it than before)
    like: object = None  # reshape_as(like): keeps the last axis if it is ``like``'s
    #                      channel axis with the same size (the region builder checks)
    tail_merge: Callable | None = None  # input axis -> (-1, block or None) if the move
    #     merges it with every axis after it into the last output axis (``flatten(1)``):
    #     a channel affine before it is the affine repeated ``block`` times (block: the
    #     trailing size, None if it is known only from the op after it)


def permutation_maps(order: list[int]) -> tuple[Callable, Callable]:
    """``(forward, backward)`` axis maps of the move that puts input axis ``order[j]`` at
    output position ``j`` (``permute(order)``; negative axes)."""
    rank = len(order)
    return (lambda axis: order.index(axis % rank) - rank,
            lambda axis: order[axis % rank] - rank)


def average_maps(rank: int, averaged: set, keep: bool) -> tuple[Callable, Callable]:
    """``(forward, backward)`` axis maps of a mean over the ``averaged`` axes of a rank
    ``rank`` tensor (kept as size 1 if ``keep``): those map to None, the others stay."""
    kept = [a for a in range(rank) if a not in averaged]
    out_rank = rank if keep else len(kept)

    def forward(axis):
        position = axis % rank
        if position in averaged:
            return None
        return (position if keep else kept.index(position)) - out_rank

    def backward(axis):
        position = axis % out_rank
        if keep:
            return None if position in averaged else position - rank
        return kept[position] - rank
    return forward, backward


def reshape_maps(in_sizes: Sequence, out_sizes: Sequence,
                 product: Callable = math.prod) -> tuple[Callable, Callable]:
    """``(forward, backward)`` axis maps of a reshape from ``in_sizes`` to ``out_sizes``
    (see the module docstring); an axis the reshape merges or splits maps to None."""
    before_in = [product(in_sizes[:i]) for i in range(len(in_sizes))]
    before_out = [product(out_sizes[:j]) for j in range(len(out_sizes))]
    pairs = [(i, j) for i in range(len(in_sizes)) for j in range(len(out_sizes))
             if before_in[i] == before_out[j] and in_sizes[i] == out_sizes[j]]
    ins, outs = Counter(i for i, _ in pairs), Counter(j for _, j in pairs)
    to_out = {i: j for i, j in pairs if ins[i] == 1 and outs[j] == 1}
    to_in = {j: i for i, j in to_out.items()}
    in_rank, out_rank = len(in_sizes), len(out_sizes)

    def forward(axis):
        j = to_out.get(axis % in_rank)
        return None if j is None else j - out_rank

    def backward(axis):
        i = to_in.get(axis % out_rank)
        return None if i is None else i - in_rank
    return forward, backward


def tail_merge_map(in_sizes: Sequence, out_sizes: Sequence, product: Callable = math.prod,
                   block: Callable = lambda size: size) -> Callable | None:
    """``axis -> (-1, block)`` for the input axes a reshape merges with every axis after
    them (and nothing before them but what comes before its last output axis) into its
    last output axis, else None; ``block(size)`` turns the trailing size into the
    repetition count (None where it is only named). None if no axis is merged so."""
    if not out_sizes:
        return None
    rank = len(in_sizes)
    last_before, last = product(out_sizes[:-1]), out_sizes[-1]
    merged = {i: product(in_sizes[i + 1:]) for i in range(rank - 1)
              if product(in_sizes[:i]) == last_before and product(in_sizes[i:]) == last}
    if not merged:
        return None

    def tail_merge(axis):
        trailing = merged.get(axis % rank)
        return None if trailing is None else (-1, block(trailing))
    return tail_merge


def followed(layouts: Sequence[Layout], axis: int) -> int | None:
    """Where the moves ``layouts``, in order, put input axis ``axis`` (None: merged away)."""
    for layout in layouts:
        axis = layout.forward(axis)
        if axis is None:
            return None
    return axis


def permutations_cancel(layouts: Sequence[Layout], rank: int) -> bool:
    """Whether the moves put every axis of a rank ``rank`` tensor back where it was."""
    return all(followed(layouts, axis) == axis for axis in range(-rank, 0))
