"""TODO selection"""

from __future__ import annotations


from reparam_fx.core import affine
from reparam_fx.core.builder import RegionBuilder
from reparam_fx.core.regions import Region


def select_rewrites(view, builder: RegionBuilder, worth_writing=None) -> tuple[list, list]:
    """``(regions, partial_sums)`` to write back: ``[(value, Region)]`` and
    ``[PartialSum]``. Downstream rewrites first: one is taken only if no rewrite after it
    already covers its value (its ops then live on inside that rewrite).
    ``worth_writing(region)`` (default: ``region.emittable``) lets a frontend refuse
    rewrites that would not save ops in its own op set."""
    worth_writing = worth_writing or (lambda region: region.emittable)
    candidates = {}
    for value, region in builder.regions.items():
        if not worth_writing(region) and region.fallback is not None:
            region = region.fallback  # a costly composition no sum paid for
        if worth_writing(region):
            candidates[value] = region
    candidates.update(builder.partial_sums)
    emit, partial_sums, covered = [], [], set()
    for value in reversed(list(view.values())):
        item = candidates.get(value)
        if item is None and value not in covered:
            region = builder.regions.get(value)
            if region is not None and region.fallback is None and len(region.nodes) > 1 \
                    and affine.adds_macs(region.term):
                builder.skip(value, "folding it with the ops before it would increase MACs "
                                    f"({region.term.weight.numel():,} > {region.term.macs:,.0f} "
                                    "per output position)")
        if item is None or value in covered:
            continue
        if isinstance(item, Region):
            emit.append((value, item))
            covered.update(item.nodes)
        else:
            partial_sums.append(item)
            covered.update(item.inner)
            for term, _ in item.terms:
                if isinstance(term, Region):
                    covered.update(term.nodes)
    return _whole_absorptions(view, emit, partial_sums)


def _whole_absorptions(view, emit: list, partial_sums: list) -> tuple[list, list]:
    """Drop the rewrites that absorb a value another op still reads (an affine shared by
    q, k and v where one reader did not fold it): the value would be computed anyway, and
    the moves before it written twice. What is left absorbs every value it takes."""
    while True:
        absorbed, outputs = set(), set()
        for value, region in emit:
            absorbed.update(region.nodes)
            outputs.add(value)
        for partial in partial_sums:
            absorbed.update((*partial.inner, partial.root))
            outputs.add(partial.root)
            for term, _ in partial.terms:
                if isinstance(term, Region):
                    absorbed.update(term.nodes)
        read_elsewhere = {node for node in absorbed - outputs
                          if any(user not in absorbed for user in view.users(node))}
        if not read_elsewhere:
            return emit, partial_sums
        emit = [(value, region) for value, region in emit
                if read_elsewhere.isdisjoint(region.nodes)]
        partial_sums = [partial for partial in partial_sums if all(
            read_elsewhere.isdisjoint(term.nodes) for term, _ in partial.terms
            if isinstance(term, Region))]
