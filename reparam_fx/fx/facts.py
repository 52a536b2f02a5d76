"""Graph facts: what a torch.fx graph proves about its values before any op is read.

:class:`GraphFacts` answers, per pass:

users
    A node's *value users* read its values; *metadata reads* (:func:`.values.metadata_read`)
    read only what any value of the same shape has. Metadata reads never stop a node from
    being absorbed into a region; the rewrite points them at the region's output, which is
    allowed only while that output has the same shape (``rank``/``type`` reads: always).

constants
    The value of a node computed from parameters, buffers and literals alone by pure ops
    (``self.weight + self.id_tensor``, ``F.batch_norm(weight, None, None, training=True)``
    weight standardisation, BatchNorm statistics folded in ``forward``): evaluated once.

ranks
    Proven tensor ranks (:mod:`.ranks`).

mutations
    Nodes whose value an in-place op changes while another op still reads it.

border fills
    Zero padding whose whole border is then overwritten with one per-channel constant
    (DiverseBranchBlock's ``BNAndPadLayer``, by item assignment, ``copy_`` into slices, or
    core ATen's ``slice_scatter`` chains): one op, padding with that value.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from reparam_fx.fx.capture import runs_standard_forward
from reparam_fx.fx.ranks import RankFacts
from reparam_fx.fx.values import (INPLACE_OPERATORS, hashable_in, metadata_read, pure_call,
                                  schema_name, shape_values, tensor_shape, view_base)

if TYPE_CHECKING:
    from reparam_fx.fx.capture import Workspace


# ---- padding with a written border ---------------------------------------------------

@dataclass(frozen=True)
class BorderFill:
    """Zero padding whose border is then set to ``value`` (0-d or one per channel)."""

    padding: tuple[int, ...]  # per trailing dim
    value: torch.Tensor
    writers: tuple  # the item assignments (and slices) that write the border
    source: torch.fx.Node  # the padded tensor


def _per_channel(value: torch.Tensor, axis: int) -> torch.Tensor | None:
    """``value`` as one number per index of ``axis`` (0-d if it is one number), when it
    holds the same number everywhere else (``(1, C, 1, 1)``, or expanded to a strip)."""
    value = value.detach()
    if value.numel() == 1:
        return value.reshape(())
    if value.dim() < -axis:
        return None
    moved = value.movedim(axis, 0).reshape(value.shape[axis], -1)
    if not bool((moved == moved[:, :1]).all()):
        return None
    return moved[:, 0].clone()


def _symmetric_zero_pad(node: torch.fx.Node) -> tuple[int, ...] | None:
    """``F.pad(x, [p, p, q, q])`` / ``aten.pad`` / ``aten.constant_pad_nd`` with zeros and
    the same amount on both sides of each dim: the padding per trailing dim."""
    name = schema_name(node.target)
    if node.op != "call_function" or not (node.target is F.pad or name in ("pad", "constant_pad_nd")):
        return None
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    mode = node.args[2] if len(node.args) > 2 and name != "constant_pad_nd" else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
    if name == "constant_pad_nd":
        value, mode = (node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)), "constant"
    if mode != "constant" or value not in (None, 0, 0.0) or not isinstance(pad, (list, tuple)) \
            or len(pad) % 2 or not all(isinstance(p, int) for p in pad):
        return None
    pairs = [(pad[i], pad[i + 1]) for i in range(0, len(pad), 2)][::-1]  # outermost first
    if any(a != b or a < 0 for a, b in pairs):
        return None
    return tuple(a for a, _ in pairs)


def _strip(index, rank: int, pads: tuple[int, ...]):
    """``(dim, side)`` if ``index`` selects one whole border strip of the padding."""
    items = index if isinstance(index, tuple) else (index,)
    if Ellipsis in items:
        position = items.index(Ellipsis)
        items = items[:position] + (slice(None),) * (rank - len(items) + 1) + items[position + 1:]
    if len(items) != rank or not all(isinstance(i, slice) for i in items):
        return None
    cut = [(d, i) for d, i in enumerate(items) if i != slice(None)]
    if len(cut) != 1:
        return None
    dim, item = cut[0]
    width = pads[dim - (rank - len(pads))] if dim >= rank - len(pads) else 0
    if not width or item.step not in (None, 1):
        return None
    if item.start in (None, 0) and item.stop == width:
        return dim, 0
    if item.start == -width and item.stop is None:
        return dim, 1
    return None


def _aten_strip(node: torch.fx.Node, rank: int, pads: tuple[int, ...]):
    """``aten.slice.Tensor(padded, dim, start, end)`` as a border strip (see :func:`_strip`)."""
    args = list(node.args) + [None] * (5 - len(node.args))
    _, dim, start, end, step = args[:5]
    if not isinstance(dim, int):
        return None
    dim %= rank
    end = None if end is None or (isinstance(end, int) and end >= 2 ** 62) else end
    return _strip((slice(None),) * dim + (slice(start, end, step),) +
                  (slice(None),) * (rank - dim - 1), rank, pads)


# ---- the facts of one pass -----------------------------------------------------------

class ModuleLookup:
    """``modules.get(target)`` over a workspace's attributes."""

    def __init__(self, ws: Workspace):
        self.ws = ws

    def get(self, target, default=None):
        found = self.ws.module(target)
        return default if found is None else found

    def __getitem__(self, target):
        return self.ws.module(target)


class GraphFacts:
    """Per-pass facts over a workspace graph (see the module docstring)."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self.frontend = ws.frontend
        self.modules = ModuleLookup(ws)
        # attribute paths in use: new modules must not be nested under them
        self.attribute_targets = {n.target for n in ws.graph.nodes
                                  if n.op in ("call_module", "get_attr")} | set(ws.added)
        self._constants: dict[torch.fx.Node, torch.Tensor | None] = {}
        self.scalars = shape_values(ws.graph)
        self.fill_writers: set = set()
        self.written = self._find_written()  # (for constants: a value written later is none)
        self.border_fills = self._find_border_fills()
        self.fill_writers = writers = {w for fill in self.border_fills.values()
                                       for w in fill.writers}
        # core ATen: the padded tensor's reader is the pad, inside the fill; count the fill
        filled_by = {fill.writers[0]: output for output, fill in self.border_fills.items()
                     if fill.writers and fill.writers[0].args and
                     fill.writers[0].args[0] is fill.source}
        self.value_users: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        self.metadata_users: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        self.shape_read: set[torch.fx.Node] = set()  # nodes whose sizes a metadata read needs
        for node in ws.graph.nodes:
            values, reads = [], []
            for user in node.users:
                if user in filled_by:
                    values.append(filled_by[user])
                    continue
                if user in writers:
                    continue  # part of the padding that writes its border
                kind = metadata_read(user, node)
                if kind is None:
                    values.append(user)
                else:
                    reads.append(user)
                    if kind == "shape":
                        self.shape_read.add(node)
            self.value_users[node] = values
            if reads:
                self.metadata_users[node] = reads
        self.written = self._find_written(exclude=self.fill_writers)
        self.mutated = self._find_mutated()
        self.ranks = RankFacts(ws.graph, self.modules, self.constant)

    def rank(self, node) -> int | None:
        return self.ranks.rank(node)

    def channels(self, node, axis: int) -> int | None:
        """The size of ``node``'s channel axis ``axis`` (``-(spatial + 1)``), proven by a
        conv module that reads it: its ``in_channels`` (batched or not)."""
        for user in self.value_users.get(node, ()):
            if user.op != "call_module" or not user.args or user.args[0] is not node:
                continue
            module = self.modules.get(user.target)
            if isinstance(module, nn.modules.conv._ConvNd) and runs_standard_forward(module) \
                    and not module.transposed and module.weight.dim() == 1 - axis:
                return module.in_channels
        return None

    # in-place ops --------------------------------------------------------------------
    def is_inplace(self, node: torch.fx.Node) -> bool:
        if node.kwargs.get("out") is not None:  # torch.add(a, b, out=a)
            return True
        if node.op == "call_method":
            return node.target.endswith("_") and not node.target.startswith("__")
        if node.op == "call_function":
            if hashable_in(node.target, INPLACE_OPERATORS) or node.kwargs.get("inplace") is True:
                return True
            if isinstance(node.target, torch._ops.OpOverload):
                return node.target._schema.is_mutable
            name = getattr(node.target, "__name__", "")  # torch.relu_, F.elu_, ...
            return name.endswith("_") and not name.startswith("__")
        if node.op == "call_module":
            return getattr(self.modules.get(node.target), "inplace", False) is True
        return False

    # padding whose border is then written ------------------------------------------------
    def _find_border_fills(self) -> dict:
        """Zero padding whose whole border is then overwritten with one per-channel
        constant (DiverseBranchBlock's ``BNAndPadLayer``): ``{pad node: BorderFill}``.

        The writes are item assignments (``y[:, :, 0:p, :] = v`` on all four sides, fx) or
        ``copy_`` into ``slice``s of the padded tensor (export's training IR); all of them
        come before any other read of the padded tensor."""
        fills = {}
        for node in self.ws.graph.nodes:
            pads = _symmetric_zero_pad(node)
            if pads is None or not node.args or not isinstance(node.args[0], torch.fx.Node):
                continue
            fill = self._border_fill(node, pads)
            if fill is not None:
                fills[node] = fill
                continue
            output, fill = self._scattered_border_fill(node, pads)
            if fill is not None:
                fills[output] = fill
        return fills

    def _scattered_border_fill(self, pad: torch.fx.Node, pads: tuple[int, ...]):
        """Core ATen's form of the border writes: a chain of ``slice_scatter``s, each
        putting ``copy(slice(t, dim, a, b), value)`` back into ``t``. The fill's value is
        the last one's output: ``(that node, BorderFill)``, or ``(None, None)``."""
        shape = tensor_shape(pad)
        if shape is None:
            return None, None
        current, writers, strips, values = pad, [pad], set(), []
        while True:
            users = list(current.users)
            scatter = [u for u in users if schema_name(u.target) == "slice_scatter"
                       and u.args[0] is current]
            if len(users) != 2 or len(scatter) != 1:
                break
            scatter = scatter[0]
            piece = scatter.args[1]
            if not (isinstance(piece, torch.fx.Node) and schema_name(piece.target) == "copy"):
                break
            window = piece.args[0]
            if window not in users or schema_name(window.target) != "slice" or \
                    list(window.args[1:]) != list(scatter.args[2:]) or len(window.users) != 1:
                break
            strip = _aten_strip(window, len(shape), pads)
            value = self.constant(piece.args[1])
            if strip is None or value is None:
                break
            strips.add(strip)
            values.append(value)
            writers.extend([window, piece, scatter])
            current = scatter
        wanted = {(len(shape) - len(pads) + i, side) for i, p in enumerate(pads) if p
                  for side in (0, 1)}
        per_channel = [_per_channel(v, -(len(pads) + 1)) for v in values]
        if not values or strips != wanted or any(v is None or not torch.equal(v, per_channel[0])
                                                 for v in per_channel):
            return None, None
        writers.remove(current)
        return current, BorderFill(pads, per_channel[0], tuple(writers), pad.args[0])

    def _border_fill(self, pad: torch.fx.Node, pads: tuple[int, ...]):
        shape = tensor_shape(pad)
        rank = len(shape) if shape is not None else self._rank_from_writes(pad)
        if rank is None:
            return None
        strips, writers, values = set(), [], []
        order = {n: i for i, n in enumerate(self.ws.graph.nodes)}
        for user in pad.users:
            strip = None
            if user.op == "call_function" and user.target is operator.setitem and \
                    user.args[0] is pad:
                strip = _strip(user.args[1], rank, pads)
                value, group = user.args[2], [user]
            elif schema_name(user.target) == "slice" and len(user.users) == 1:
                copy = next(iter(user.users))
                if schema_name(copy.target) == "copy_" and copy.args[0] is user:
                    strip = _aten_strip(user, rank, pads)
                    value, group = copy.args[1], [user, copy]
            if strip is None:
                continue
            constant = self.constant(value)
            if constant is None:
                return None
            strips.add(strip)
            writers.extend(group)
            values.append(constant)
        wanted = {(rank - len(pads) + i, side) for i, p in enumerate(pads) if p for side in (0, 1)}
        if strips != wanted or not values:
            return None
        others = [u for u in pad.users if u not in writers]
        if any(order[u] < max(order[w] for w in writers) for u in others):
            return None  # read before the border is written
        per_channel = [_per_channel(v, -(len(pads) + 1)) for v in values]
        if any(v is None or v.shape != per_channel[0].shape or not torch.equal(v, per_channel[0])
               for v in per_channel):
            return None  # not one value per channel, the same on every side
        return BorderFill(pads, per_channel[0], tuple(writers), pad.args[0])

    @staticmethod
    def _rank_from_writes(pad) -> int | None:
        """``y[:, :, 0:p, :] = v`` names every dim of ``y``."""
        for user in pad.users:
            if user.op == "call_function" and user.target is operator.setitem:
                index = user.args[1]
                if isinstance(index, tuple) and Ellipsis not in index:
                    return len(index)
        return None

    def _find_written(self, exclude=frozenset()) -> set[torch.fx.Node]:
        """Every node an in-place op writes to, directly or through views and aliases
        (``y[:, :2].mul_(2)`` writes ``y``), but by the ops in ``exclude`` (the border
        writes of :meth:`_find_border_fills`, part of their padding). ``first_write`` maps
        each to the position of the first op that writes it."""
        written, self.first_write, self.positions = set(), {}, {}
        for position, node in enumerate(self.ws.graph.nodes):
            self.positions[node] = position
            if node in exclude or not self.is_inplace(node) or not node.args:
                continue
            target = node.kwargs.get("out", node.args[0])
            while isinstance(target, torch.fx.Node) and target not in written:
                written.add(target)
                self.first_write[target] = position
                target = view_base(target, self.modules)
        return written

    def writes_shared(self, node: torch.fx.Node) -> bool:
        """Whether ``node`` writes in place into a tensor (or the tensor it is a view or
        alias of) that an op other than the write itself reads, or that the graph's caller
        holds (an input: ``v = x; v += x`` changes the caller's tensor): then it is a write,
        not a value a region may absorb (``v = x.movedim(1, -1); v *= g; ...; return x``)."""
        if not self.is_inplace(node) or not node.args:
            return False
        chain, target = {node}, node.kwargs.get("out", node.args[0])
        while isinstance(target, torch.fx.Node):
            if target.op == "placeholder" or any(
                    user not in chain for user in self.value_users.get(target, ())):
                return True
            chain.add(target)
            target = view_base(target, self.modules)
        return False

    def read_before_written(self, source: torch.fx.Node, nodes) -> bool:
        """Whether every op of ``nodes`` that reads ``source`` runs before any op writes
        into ``source`` (directly or through an alias), and none of them writes: one op put
        in the place of the first of them reads the same values they read."""
        if source not in self.first_write:
            return True
        if any(self.is_inplace(node) for node in nodes):
            return False
        return all(self.positions[node] < self.first_write[source]
                   for node in nodes if source in node.all_input_nodes)

    def _find_mutated(self) -> set[torch.fx.Node]:
        """Nodes whose value an in-place op changes (directly, or through a view or an
        alias) while another op still reads it."""
        return {target for target in self.written if len(self.value_users[target]) > 1}

    # constants -----------------------------------------------------------------------
    def constant(self, value) -> torch.Tensor | None:
        """The tensor value of a graph-constant argument (number, get_attr, or pure op on
        constants), else None."""
        if isinstance(value, bool):
            return None
        if isinstance(value, (int, float)):
            return torch.tensor(float(value), dtype=torch.float64)
        if isinstance(value, torch.Tensor):
            return value
        if not isinstance(value, torch.fx.Node):
            return None
        found = self._value(value)
        return found if isinstance(found, torch.Tensor) else None

    def is_constant(self, node) -> bool:
        """Whether parameters, buffers and literals alone determine ``node``'s value (a
        tensor, or e.g. the tuple a BatchNorm on weights returns)."""
        return isinstance(node, torch.fx.Node) and self._value(node) is not _NOT_CONSTANT

    def is_computed_constant(self, value) -> bool:
        """A constant computed by ops in the graph (not a plain attribute or literal)."""
        return isinstance(value, torch.fx.Node) and value.op in ("call_function", "call_method") \
            and self.constant(value) is not None

    def _value(self, node: torch.fx.Node):
        """The value of ``node`` if parameters, buffers and literals alone determine it
        (a tensor, or e.g. the ``torch.Size`` of a constant), else ``_NOT_CONSTANT``."""
        if node not in self._constants:
            self._constants[node] = self._evaluate(node)
        return self._constants[node]

    def _evaluate(self, node: torch.fx.Node):
        if node in self.written:  # written in place later: its value here is not final
            return _NOT_CONSTANT
        if node.op == "get_attr":
            attr = self.ws.resolve(node.target)
            return attr.detach() if isinstance(attr, torch.Tensor) else _NOT_CONSTANT
        if not node.all_input_nodes or not pure_call(node):
            return _NOT_CONSTANT
        inputs = {arg: self._value(arg) for arg in node.all_input_nodes}
        if any(value is _NOT_CONSTANT for value in inputs.values()):
            return _NOT_CONSTANT
        args = torch.fx.node.map_arg(node.args, inputs.__getitem__)
        kwargs = torch.fx.node.map_arg(node.kwargs, inputs.__getitem__)
        try:
            with torch.no_grad():
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                return node.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 - not evaluable: not a constant
            return _NOT_CONSTANT


_NOT_CONSTANT = object()
