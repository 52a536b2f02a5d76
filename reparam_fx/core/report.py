"""What a fusion did: the regions it collapsed (by pattern name) and what it left alone, and why.

Each fused region carries a pattern name (``conv+bn``, ``repvgg``, ``repmixer``, ...),
given by :func:`reparam_fx.core.pipeline.region_pattern`.

This module holds data only: the frontends fill the report in through
:mod:`reparam_fx.core.pipeline` (op histograms come from
:mod:`reparam_fx.fx.counts` and the ONNX frontend's own counter).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FusedRegion:
    """One region of the graph replaced by a single conv or linear."""

    pattern: str
    output: str  # name of the original node whose value the new module computes
    module: str  # qualified name of the new module (or of its weight, in aten graphs)
    nodes: tuple[str, ...]  # the original nodes absorbed
    ops: tuple[tuple[str, int], ...]  # op-category histogram of the absorbed nodes
    params_before: int
    params_after: int


@dataclass(frozen=True)
class Skipped:
    """A node that looked foldable but was left as it was."""

    node: str
    op: str
    reason: str


@dataclass(frozen=True)
class Leaf:
    """A module kept whole in the graph (fused inside on its own where it traces)."""

    module: str  # qualified name in the model
    reason: str


@dataclass
class FusionReport:
    """Everything :func:`reparam_fx.fuse` did. Reachable as ``fused.fusion_report``."""

    fused: list[FusedRegion] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    leaves: list[Leaf] = field(default_factory=list)
    ops_before: Counter = field(default_factory=Counter)
    ops_after: Counter = field(default_factory=Counter)
    params_before: int = 0
    params_after: int = 0
    nodes_before: int = 0
    nodes_after: int = 0
    frontend: str = ""
    # moves that ended a region because of the channel axis (node name -> reason): what a
    # BatchNorm after them that stayed is told (see ``reparam_fx.fx.driver``)
    move_refusals: dict = field(default_factory=dict, repr=False, compare=False)

    def pattern_counts(self) -> Counter:
        return Counter(region.pattern for region in self.fused)

    def skip_reasons(self) -> Counter:
        """Skip reasons without their per-node details (numbers in parentheses)."""
        return Counter(re.sub(r"\s*\([^)]*\)", "", item.reason) for item in self.skipped)

    def table(self) -> str:
        """A plain-text summary: totals, one row per pattern, one row per skip reason."""
        lines = [
            f"reparam_fx fusion report ({self.frontend} graph)",
            f"  nodes   {self.nodes_before:>10} -> {self.nodes_after}",
            f"  params  {self.params_before:>10,} -> {self.params_after:,}",
        ]
        for category in dict.fromkeys([*self.ops_before, *self.ops_after]):
            before, after = self.ops_before.get(category, 0), self.ops_after.get(category, 0)
            if before or after:
                lines.append(f"  {category:<10}{before:>8} -> {after}")
        if self.fused:
            lines.append(f"  fused {len(self.fused)} region(s):")
            lines.append(f"    {'pattern':<22}{'count':>6}{'ops absorbed':>14}")
            absorbed = Counter()
            for region in self.fused:
                absorbed[region.pattern] += len(region.nodes)
            for pattern, count in sorted(self.pattern_counts().items()):
                lines.append(f"    {pattern:<22}{count:>6}{absorbed[pattern]:>14}")
        else:
            lines.append("  nothing fused")
        if self.skipped:
            lines.append(f"  left alone {len(self.skipped)} node(s):")
            for reason, count in sorted(self.skip_reasons().items(), key=lambda kv: -kv[1]):
                lines.append(f"    {count:>4} x {reason}")
        if self.leaves:
            lines.append(f"  kept {len(self.leaves)} module(s) whole (fused inside where they trace):")
            for leaf in self.leaves:
                lines.append(f"    {leaf.module}: {leaf.reason}")
        hint = self.example_inputs_hint()
        if hint:
            lines.append(f"  {hint}")
        return "\n".join(lines)

    def summary(self, path: str) -> str:
        """A few lines for a command line: nodes before and after, regions per pattern,
        how many nodes were left alone (``table()`` says why)."""
        lines = [f"{path}: nodes {self.nodes_before} -> {self.nodes_after}"]
        counts = self.pattern_counts()
        if counts:
            lines.append(f"  fused {sum(counts.values())} region(s):")
            width = max(len(pattern) for pattern in counts)
            for pattern, count in sorted(counts.items()):
                lines.append(f"    {pattern:<{width}}  {count:>5}")
        else:
            lines.append("  nothing fused")
        if self.skipped:
            lines.append(f"  left alone {len(self.skipped)} node(s); --report shows why")
        return "\n".join(lines)

    def example_inputs_hint(self) -> str:
        """What passing ``example_inputs`` would add, for a symbolically traced model that
        kept blocks whole because their code does not trace (empty otherwise)."""
        untraced = [leaf for leaf in self.leaves if "does not trace" in leaf.reason]
        if self.frontend != "fx" or not untraced:
            return ""
        unproven = sum(1 for item in self.skipped if "example_inputs" in item.reason)
        norms = self.ops_after.get("batch_norm", 0)
        left = [f"{norms} BatchNorm(s)"] if norms else []
        left += [f"{unproven} node(s) left alone for lack of a proven shape"] if unproven else []
        gain = (f"{' and '.join(left)} might then fold" if left else
                "no BatchNorm is left and no fold waits on a proven shape")
        return (f"with example_inputs: {len(untraced)} module(s) whose code does not trace could "
                f"be captured whole by torch.export (the result then holds for those input "
                f"sizes only); {gain}")

    __str__ = table
