"""The torch.fx graph as the region builder reads it (:class:`FxView`).

:class:`FxView` implements the view protocol of :mod:`reparam_fx.core.regions` on a
workspace graph: the facts the graph proves (:mod:`.facts`: users that read values, not
metadata; ranks and shapes; in-place writes) and what each node computes (:mod:`.ops`).
It is the torch twin of :class:`reparam_fx.onnx.view.OnnxView`.
"""

from __future__ import annotations

import torch
import torch.fx

from reparam_fx.fx.facts import GraphFacts
from reparam_fx.fx.ops import interpret
from reparam_fx.fx.values import tensor_shape


class FxView:
    """The graph view :mod:`reparam_fx.core.regions` walks (see its docstring)."""

    convs_are_batched = False  # torch convs also take unbatched (C, *spatial) input

    def __init__(self, facts: GraphFacts):
        self.facts = facts
        self.mutated = facts.mutated
        self._ops: dict = {}

    def values(self):
        return self.facts.ws.graph.nodes

    def users(self, node):
        return self.facts.value_users.get(node, ())

    def metadata_readers(self, node):
        return self.facts.metadata_users.get(node, ())

    def reads_shape(self, node) -> bool:
        return node in self.facts.shape_read

    def inplace_target(self, node):
        return node.args[0] if self.facts.is_inplace(node) else None

    def read_before_written(self, source, nodes) -> bool:
        return self.facts.read_before_written(source, nodes)

    def writes_shared(self, node) -> bool:
        return self.facts.writes_shared(node)

    def interpret(self, node):
        if node not in self._ops:
            self._ops[node] = interpret(node, self.facts)
        return self._ops[node]

    @staticmethod
    def shape(node):
        return tensor_shape(node)

    def rank(self, node):
        return self.facts.rank(node)

    def channels(self, node, axis: int) -> int | None:
        return self.facts.channels(node, axis)

    @staticmethod
    def is_value(value) -> bool:
        return isinstance(value, torch.fx.Node)

    def describe(self, node) -> tuple[str, str]:
        if node.op == "call_module":
            return node.name, type(self.facts.modules.get(node.target)).__name__
        if node.op == "call_function":
            return node.name, getattr(node.target, "__name__", str(node.target))
        return node.name, str(node.target)
