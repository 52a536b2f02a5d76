"""TODO layout"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable



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
