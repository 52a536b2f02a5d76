"""The steps of a fusion that do not depend on the graph type, in the order they run.

A frontend's fusion is the same loop over its own graph (:mod:`reparam_fx.fx.driver`,
:mod:`reparam_fx.onnx.driver`)::

    report = FusionReport(frontend=...)
    run_passes(lambda: one_pass(graph, report), after_pass=cleanup)  # to a fixpoint

and each pass (:func:`reparam_fx.fx.rewrite.fusion_pass`,
:func:`reparam_fx.onnx.rewrite.fusion_pass`) is::

    emit, partial_sums = find_rewrites(view, report, worth_writing)
    for value, region in emit:          # the frontend writes one op per region
        ...
        report.fused.append(fused_region(region, output, op_name, nodes, categories, params))

:func:`find_rewrites` walks the region builder (:mod:`reparam_fx.core.builder`) over the
frontend's view and selects what to write (:mod:`reparam_fx.core.selection`); the pass's
skips replace the report's, so the report describes the graph of the last pass.
:func:`leftover_batchnorms` gives every BatchNorm still in the result a line in the report.

Region patterns
---------------
    Pattern names are *outcomes* of the affine algebra, not separate matchers: once a region
    has been folded into one conv, :func:`region_pattern` looks at the ops it absorbed and
    names it after the block it resembles:

    =====================  =====================================================
    pattern                region absorbed
    =====================  =====================================================
    ``conv+bn``            one conv followed by BatchNorm (and nothing else)
    ``repvgg``             sum of a kxk conv branch, a 1x1 conv branch and/or an identity
    ``mobileone``          sum with two or more conv branches of the same kernel shape
    ``large+small kernel`` sum of conv branches with different kernel sizes > 1
    ``repmixer``           ``x + scale * (f(x) - g(x))``: a difference plus an identity
    ``cpe``                identity plus one conv, no BatchNorm (``x + dwconv(x)``)
    ``bn+linear``          BatchNorm1d folded into a Linear (before or after it)
    ``linear heads``       sum/average of several Linear heads on one input
    ``layer scale``        per-channel constant scale folded into a conv/linear
    ``avgpool``            average pooling folded as a depthwise conv
    ``zero-pad``           explicit zero padding folded into a conv
    ``crop``               a crop (``x[..., c:-c]``) folded into a conv
    ``conv composition``   two convs (kxk then 1x1, or 1x1 then kxk) composed
    ``computed weights``   one conv whose weights ``forward`` computes, now precomputed
    ``affine``             any other exactly-foldable region
    =====================  =====================================================
"""

from __future__ import annotations

import contextlib
import gc
from collections import Counter
from typing import Callable, Iterable

from reparam_fx.core.builder import RegionBuilder
from reparam_fx.core.regions import Region
from reparam_fx.core.report import FusedRegion, FusionReport, Skipped
from reparam_fx.core.selection import select_rewrites

MAX_PASSES = 4  # one pass usually finds everything; a rewrite may expose one more fold
NO_PARTNER = "no conv or linear next to it to fold into"


def run_passes(one_pass: Callable[[], bool], after_pass: Callable[[], object] | None = None,
               max_passes: int = MAX_PASSES) -> None:
    """Run ``one_pass`` until it reports that nothing more may fold (at most ``max_passes``
    times); ``after_pass`` tidies the graph after each pass that rewrote something."""
    for _ in range(max_passes):
        if not one_pass():
            return
        if after_pass is not None:
            after_pass()


def find_rewrites(view, report: FusionReport, worth_writing=None) -> tuple[list, list]:
    """One walk of the region builder over ``view``; returns what to write back,
    ``([(value, Region)], [PartialSum])`` (:func:`select_rewrites`). The pass's skips and
    move refusals replace the report's."""
    builder = RegionBuilder(view)
    builder.walk()
    emit, partial_sums = select_rewrites(view, builder, worth_writing)
    report.skipped, report.move_refusals = builder.skipped, builder.move_refusals
    return emit, partial_sums


def rewritten_values(emit: list, partial_sums: list) -> list:
    """The graph values the rewrites absorb (their ops go once nothing else reads them)."""
    values = [value for _, region in emit for value in region.nodes]
    values += [value for partial in partial_sums for value in partial.inner]
    values += [value for partial in partial_sums for term, _ in partial.terms
               if isinstance(term, Region) for value in term.nodes]
    return values


def sum_steps(values: list) -> list:
    """``sum(coeff * value)`` as the steps a frontend writes: ``(value, scale, join)`` per
    term, ``scale`` a factor to multiply the value by first (None: none) and ``join`` how
    it meets the terms before it (``"first"``, ``"add"`` or ``"sub"``)."""
    steps = []
    for value, coeff in values:
        first = not steps
        if coeff not in (1, -1) or (first and coeff != 1):
            steps.append((value, coeff, "first" if first else "add"))
        else:
            steps.append((value, None, "first" if first else ("add" if coeff == 1 else "sub")))
    return steps


def fused_region(region: Region, output: str, op_name: str, node_names: Iterable[str],
                 categories: Iterable[str | None], params_before: int) -> FusedRegion:
    """The report's line for ``region``, written as the op ``op_name`` whose output is
    ``output``: the absorbed nodes, their op categories, parameters before and after."""
    term = region.term
    return FusedRegion(
        pattern=region_pattern(region), output=output, module=op_name,
        nodes=tuple(node_names),
        ops=tuple(sorted(Counter(c for c in categories if c).items())),
        params_before=params_before,
        params_after=term.weight.numel() + (0 if term.bias is None else term.bias.numel()))


def leftover_batchnorms(report: FusionReport, batchnorms: Iterable[tuple[str, str]],
                        reason_of: Callable[[str], str | None] = lambda name: None) -> None:
    """Give every BatchNorm ``(name, op)`` left in the result a line in ``report.skipped``
    if it has none yet: ``reason_of(name)``, or that nothing next to it folds it."""
    explained = {item.node for item in report.skipped}
    report.skipped.extend(Skipped(name, op, reason_of(name) or NO_PARTNER)
                          for name, op in batchnorms if name not in explained)


def region_pattern(region: Region) -> str:
    """Name a folded region after the block it resembles, from the ops it absorbed (the
    table above): ``region.kinds`` counts them by role (conv, bn, linear, scale, avgpool,
    pad, crop, computed), ``region.kernels`` lists the absorbed convs' kernel sizes,
    ``region.branches`` the summed terms (1 for a chain)."""
    kinds, conv_kernels = region.kinds, region.kernels
    n_conv, n_linear = kinds["conv"], kinds["linear"]
    if n_linear and not n_conv:
        if n_linear > 1 and region.branches > 1:
            return "linear heads"
        if kinds["bn"]:
            return "bn+linear"
        if kinds["scale"]:
            return "layer scale"
        return "affine"
    if region.branches > 1:
        if region.has_sub and region.has_identity:
            return "repmixer"
        spatial = [tuple(k) for k in conv_kernels if any(size > 1 for size in k)]
        if len(set(spatial)) > 1:
            return "large+small kernel"
        if len(conv_kernels) > len({tuple(k) for k in conv_kernels}):
            return "mobileone"  # over-parameterised: several branches of one kernel shape
        if region.has_identity and n_conv == 1 and not kinds["bn"]:
            return "cpe"
        return "repvgg"
    if n_conv >= 2:
        return "conv composition"
    for kind, pattern in (("crop", "crop"), ("pad", "zero-pad"), ("avgpool", "avgpool"),
                          ("bn", "conv+bn"), ("scale", "layer scale"),
                          ("computed", "computed weights")):
        if kinds[kind]:
            return pattern
    return "affine"


@contextlib.contextmanager
def gc_paused():
    """Pause the cyclic garbage collector while a fusion runs: its collections would
    traverse the whole (growing) graph again and again, making fusion superlinear."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
