"""Graph facts: what a torch.fx graph proves about its values before any op is read.

:class:`GraphFacts` answers, per pass:

users
    A node's *value users* read its values. A *metadata read* reads only what any value of
    the same shape has: ``x.shape``, ``x.size()``, ``x.ndim``, ``x.dim()``, ``x.numel()``,
    ``x.dtype``, ``x.device``, ``torch.zeros_like(x)``, the shape argument of
    ``reshape_as`` / ``view_as`` / ``expand_as``, ``aten.sym_size`` and friends (and
    ``torch._assert`` on values computed from those only). Metadata reads never stop a
    node from being absorbed into a region; the rewrite points them at the region's output,
    which is allowed only while that output has the same shape (``rank``/``type`` reads:
    always). See :func:`metadata_read`.

constants
    The value of a node computed from parameters, buffers and literals alone by pure ops
    (``self.weight + self.id_tensor``, ``F.batch_norm(weight, None, None, training=True)``
    weight standardisation, BatchNorm statistics folded in ``forward``): evaluated once.

ranks
    A tensor rank is *proven* by shape metadata (export graphs, ``example_inputs``), by a
    ``BatchNorm2d``/``3d`` module's class (its input is 4-/5-D; also for a subclass whose
    ``forward`` is traced through, read from ``meta['nn_module_stack']``), by a
    ``torch._assert(x.ndim == k)`` or ``x.dim() == k`` in the graph, and by the arguments of
    ``flatten`` / ``view`` / ``reshape`` / ``permute`` / ``unsqueeze``. Ops that keep the rank
    (conv: ``(C, H, W)`` stays 3-D and ``(N, C, H, W)`` 4-D; BatchNorm; linear; pooling;
    activations; dropout; scalar arithmetic ...) join their input and output into one class
    (a union-find), so one proof holds for the whole class. Classes with conflicting proofs
    prove nothing. A rank is never assumed.

mutations
    Nodes whose value an in-place op changes while another op still reads it.

scalars
    Shape arithmetic (``h // p``, ``x.shape[1]``): Python numbers, not tensor ops.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from networkx.utils import UnionFind

if TYPE_CHECKING:
    from reparam_fx.fx.capture import Workspace

aten = torch.ops.aten


def tensor_shape(node) -> tuple[int, ...] | None:
    if not isinstance(node, torch.fx.Node):
        return None
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def schema_name(target) -> str | None:
    """``"conv2d"`` for ``aten.conv2d.default``; None for anything that is not an aten op."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    return None


def hashable_in(target, table) -> bool:
    try:
        return target in table
    except TypeError:
        return False


# ---- scalars: shape arithmetic -------------------------------------------------------

_SHAPE_METHODS = {"size", "dim", "numel", "ndimension", "nelement"}
_SHAPE_ATTRIBUTES = {"shape", "ndim"}


def shape_values(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Nodes that hold Python scalars derived from tensor shapes, not tensors:
    ``x.shape``, ``x.size()``, ``aten.sym_size``, indexing and arithmetic on those
    (``(h + p - 1) // p`` in a traced model), asserts on them. They are not tensor ops."""
    scalars: set[torch.fx.Node] = set()
    for node in graph.nodes:
        value = node.meta.get("val")
        if value is not None and not isinstance(value, torch.Tensor) and \
                isinstance(value, (int, float, torch.SymInt, torch.SymFloat)):
            scalars.add(node)
        elif node.op == "call_method" and node.target in _SHAPE_METHODS:
            scalars.add(node)
        elif node.op == "call_function" and node.target is getattr and \
                len(node.args) > 1 and node.args[1] in _SHAPE_ATTRIBUTES:
            scalars.add(node)
        elif (schema_name(node.target) or "").startswith("sym_"):
            scalars.add(node)
        elif node.op in ("call_function", "call_method") and node.all_input_nodes and \
                all(arg in scalars for arg in node.all_input_nodes):
            scalars.add(node)  # indexing / arithmetic / asserts on shape values
    return scalars


# ---- metadata reads ------------------------------------------------------------------

_ATTRIBUTE_READS = {"shape": "shape", "ndim": "rank", "dtype": "type", "device": "type",
                    "is_cuda": "type", "layout": "type", "is_sparse": "type",
                    "is_quantized": "type"}
_METHOD_READS = {"size": "shape", "numel": "shape", "nelement": "shape", "dim": "rank",
                 "ndimension": "rank", "get_device": "type", "is_floating_point": "type",
                 "is_complex": "type", "element_size": "type", "new_zeros": "type",
                 "new_ones": "type", "new_empty": "type", "new_full": "type",
                 "new_tensor": "type"}
_SHAPE_OF_SECOND = {"reshape_as": "shape", "view_as": "shape", "expand_as": "shape",
                    "type_as": "type"}
_LIKE_FUNCTIONS = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
                   torch.rand_like, torch.randn_like, torch.numel}
_ATEN_READS = {"sym_size", "sym_numel", "sym_stride", "sym_storage_offset",
               "_assert_tensor_metadata", "zeros_like", "ones_like", "empty_like",
               "full_like", "rand_like", "randn_like", "empty_strided"}


def metadata_read(user: torch.fx.Node, node: torch.fx.Node) -> str | None:
    """What ``user`` reads of ``node`` if it reads only metadata: ``"shape"`` (sizes),
    ``"rank"`` (number of dims) or ``"type"`` (dtype/device); None if it reads values."""
    args, kwargs = user.args, user.kwargs
    first = args[0] if args else None
    rest = (*args[1:], *kwargs.values())
    if user.op == "call_function" and user.target is getattr:
        return _ATTRIBUTE_READS.get(args[1]) if first is node and len(args) > 1 else None
    if user.op == "call_method":
        if first is node and user.target in _METHOD_READS and not _mentions(rest, node):
            return _METHOD_READS[user.target]
        if user.target in _SHAPE_OF_SECOND and first is not node and len(args) == 2 \
                and args[1] is node:
            return _SHAPE_OF_SECOND[user.target]
        return None
    if user.op == "call_function":
        name = schema_name(user.target)
        if name is not None:
            return "shape" if name in _ATEN_READS and first is node and \
                not _mentions(rest, node) else None
        if hashable_in(user.target, _LIKE_FUNCTIONS) and first is node and \
                not _mentions(rest, node):
            return "shape"
    return None


def _mentions(values, node) -> bool:
    found = []
    torch.fx.node.map_arg(values, lambda n: found.append(n) if n is node else None)
    return bool(found)


# ---- pure ops on constants -----------------------------------------------------------

_RANDOM = re.compile(r"rand|bernoulli|multinomial|normal|uniform|poisson|exponential|"
                     r"geometric|cauchy|dropout")
_NOT_PURE_METHODS = {"register_hook", "retain_grad", "backward", "record_stream",
                     "share_memory_", "tolist", "item", "numpy", "apply_", "map_"}
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                      operator.ior, operator.ixor, operator.imatmul, operator.setitem,
                      operator.delitem}


def _pure_call(node: torch.fx.Node) -> bool:
    """Whether ``node`` computes its result from its arguments alone: no randomness, no
    in-place writes, no other side effects."""
    target = node.target
    if node.op == "call_method":
        return not (target.endswith("_") and not target.startswith("__")) \
            and target not in _NOT_PURE_METHODS and not _RANDOM.search(target)
    if node.op != "call_function":
        return False
    if isinstance(target, torch._ops.OpOverload):
        return not target._schema.is_mutable and \
            torch.Tag.nondeterministic_seeded not in target.tags
    if getattr(target, "__module__", None) == "_operator":
        return not hashable_in(target, _INPLACE_OPERATORS)
    if target is getattr:
        return True
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", "")
    if not module.startswith("torch") or _RANDOM.search(name) or name.startswith("_") \
            or (name.endswith("_") and not name.startswith("__")) or node.kwargs.get("out") is not None:
        return False
    if target is F.batch_norm:  # pure unless it would update running statistics
        bound = dict(zip(("input", "running_mean", "running_var", "weight", "bias", "training"),
                         node.args))
        bound.update(node.kwargs)
        stats = bound.get("running_mean") is not None or bound.get("running_var") is not None
        return not (stats and bound.get("training", False))
    return True


# ---- ops that keep the rank (for rank classes) ---------------------------------------

_RANK_KEEPING_MODULES = (
    nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.Identity,
    nn.modules.dropout._DropoutNd, nn.Linear, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd, nn.modules.padding._ReplicationPadNd,
    nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.Upsample,
)
_RANK_KEEPING_NAMES = {
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "convolution", "batch_norm", "layer_norm", "group_norm", "instance_norm", "linear",
    "relu", "relu6", "gelu", "silu", "hardswish", "hardsigmoid", "sigmoid", "tanh", "mish",
    "elu", "selu", "leaky_relu", "softplus", "hardtanh", "softmax", "log_softmax", "clamp",
    "clip", "abs", "neg", "dropout", "dropout1d", "dropout2d", "dropout3d", "avg_pool1d",
    "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool2d", "pad", "constant_pad_nd", "interpolate", "contiguous", "clone",
    "detach", "float", "double", "half", "to", "type_as", "transpose", "sqrt", "exp",
    "_native_batch_norm_legit_no_training", "alias", "identity",
}
_BATCHNORM_RANKS = ((nn.BatchNorm2d, 4), (nn.BatchNorm3d, 5))


def _standard(module) -> bool:
    return module is not None and type(module).__module__.startswith("torch.nn") and \
        "forward" not in module.__dict__


class RankFacts:
    """Proven tensor ranks (see the module docstring): union-find classes of nodes that
    share a rank, each with the rank its members' proofs agree on."""

    MAX_SWEEPS = 4

    def __init__(self, graph: torch.fx.Graph, modules, constant):
        self._modules, self._constant = modules, constant
        self._classes = UnionFind()
        self._rank: dict = {}  # class root -> rank, or None after conflicting proofs
        self._derived: list[torch.fx.Node] = []
        self._upper: dict = {}  # class root -> a bound on its rank (a conv's weight rank)
        nodes = list(graph.nodes)
        for node in nodes:
            for keeper in self._rank_keeping_inputs(node):
                self._classes.union(node, keeper)
        for node in nodes:
            self._prove_from_node(node)
            bound = self._conv_rank_bound(node)
            if bound is not None:
                root = self._classes[node]
                self._upper[root] = min(bound, self._upper.get(root, bound))
        for _ in range(self.MAX_SWEEPS):  # ranks derived from other ranks, to a fixpoint
            if not any([self._derive(node) for node in self._derived]):
                break

    def rank(self, node) -> int | None:
        if not isinstance(node, torch.fx.Node):
            return None
        return self._rank.get(self._classes[node])

    def _conv_rank_bound(self, node: torch.fx.Node) -> int | None:
        """A conv's input and output have at most ``weight.dim()`` dims (batched), one
        fewer if unbatched."""
        if node.op == "call_module":
            module = self._modules.get(node.target)
            if isinstance(module, nn.modules.conv._ConvNd) and _standard(module):
                return module.weight.dim()
            return None
        name = schema_name(node.target) if node.op == "call_function" else None
        name = name or (getattr(node.target, "__name__", "") if node.op == "call_function" else "")
        if name.startswith(("conv1d", "conv2d", "conv3d", "conv_transpose", "convolution")) \
                and len(node.args) > 1:
            weight = self._constant(node.args[1])
            return weight.dim() if weight is not None else None
        return None

    def _prove(self, node, rank: int) -> bool:
        root = self._classes[node]
        if root not in self._rank:
            self._rank[root] = rank
            return True
        if self._rank[root] not in (None, rank):
            self._rank[root] = None  # conflicting proofs prove nothing
        return False

    # ops whose output has its input's rank -----------------------------------------------
    def _rank_keeping_inputs(self, node: torch.fx.Node) -> list:
        """The inputs whose rank ``node`` has: its first input for rank-keeping ops, every
        concatenated tensor for ``torch.cat``, the split tensor for a piece of
        ``chunk``/``split``."""
        name = self._name(node)
        if name in ("cat", "concat", "concatenate") and node.args and \
                isinstance(node.args[0], (list, tuple)):
            return [t for t in node.args[0] if isinstance(t, torch.fx.Node)]
        if node.op == "call_function" and node.target is operator.getitem:
            source = node.args[0]
            if isinstance(source, torch.fx.Node) and self._name(source) in ("chunk", "split") \
                    and isinstance(source.args[0], torch.fx.Node):
                return [source.args[0]]
            return []
        keeper = self._rank_keeping_input(node)
        return [] if keeper is None else [keeper]

    def _rank_keeping_input(self, node: torch.fx.Node):
        first = node.args[0] if node.args else None
        if not isinstance(first, torch.fx.Node):
            return None
        if node.op == "call_module":
            module = self._modules.get(node.target)
            keeps = _standard(module) and (
                isinstance(module, _RANK_KEEPING_MODULES)
                or (type(module).__module__ == "torch.nn.modules.activation"
                    and not isinstance(module, nn.MultiheadAttention)))
            return first if keeps else None
        if node.op == "call_method":
            name = node.target
            if name.endswith("_") and not name.startswith("__"):
                return first  # in-place: the tensor keeps its shape
        elif node.op == "call_function":
            name = schema_name(node.target) or getattr(node.target, "__name__", "")
            if name.endswith("_") and not name.startswith("__") and name != "_assert":
                name = name[:-1]
        else:
            return None
        if name in _RANK_KEEPING_NAMES:
            return first
        if name in ("add", "sub", "mul", "truediv", "div", "iadd", "isub", "imul",
                    "itruediv") and len(node.args) == 2:
            other = node.args[1]
            if not isinstance(other, torch.fx.Node):
                return first if isinstance(other, (int, float)) else None
            value = self._constant(other)
            if value is not None and value.dim() <= 1:
                return first  # a scalar or a vector on the last axis keeps the rank
        return None

    # proofs --------------------------------------------------------------------------
    def _prove_from_node(self, node: torch.fx.Node) -> None:
        shape = tensor_shape(node)
        if shape is not None:
            self._prove(node, len(shape))
        first = node.args[0] if node.args else None
        if node.op == "call_module":
            module = self._modules.get(node.target)
            for cls, rank in _BATCHNORM_RANKS:
                if isinstance(module, cls) and _standard(module) and isinstance(first, torch.fx.Node):
                    self._prove(first, rank)
        elif node.op == "call_function" and node.target is F.batch_norm:
            self._prove_batchnorm_subclass_input(node)
        elif node.op == "call_function" and node.target is torch._assert:
            self._prove_from_assert(node)
        if self._derivable(node):
            self._derived.append(node)

    def _prove_batchnorm_subclass_input(self, node: torch.fx.Node) -> None:
        """``F.batch_norm`` traced inside a ``BatchNorm2d``/``3d`` subclass, on a tensor
        from outside that module (the module's input): 4-/5-D by the module's class."""
        stack = node.meta.get("nn_module_stack") or {}
        x = node.args[0] if node.args else node.kwargs.get("input")
        if not stack or not isinstance(x, torch.fx.Node):
            return
        path, cls = list(stack.values())[-1]
        if not isinstance(cls, type):
            return
        outer = x.meta.get("nn_module_stack") or {}
        if any(p == path for p, _ in outer.values()):
            return  # computed inside the module: not its input
        for base, rank in _BATCHNORM_RANKS:
            if issubclass(cls, base):
                self._prove(x, rank)

    def _prove_from_assert(self, node: torch.fx.Node) -> None:
        """``torch._assert(x.ndim == k)`` / ``x.dim() == k`` proves ``rank(x) == k``."""
        condition = node.args[0] if node.args else None
        if not isinstance(condition, torch.fx.Node) or condition.target is not operator.eq:
            return
        a, b = condition.args
        read, value = (a, b) if isinstance(a, torch.fx.Node) else (b, a)
        if not isinstance(read, torch.fx.Node) or not isinstance(value, int):
            return
        tensor = read.args[0] if read.args else None
        if (read.op == "call_function" and read.target is getattr and read.args[1] == "ndim") or \
                (read.op == "call_method" and read.target in ("dim", "ndimension")):
            self._prove(tensor, value)

    # ranks derived from arguments -----------------------------------------------------
    @staticmethod
    def _name(node):
        if node.op == "call_method":
            return node.target
        if node.op == "call_function":
            return getattr(node.target, "__name__", None)
        return None

    def _derivable(self, node) -> bool:
        return self._name(node) in ("flatten", "view", "reshape", "permute", "unsqueeze",
                                    "add", "sub", "mul", "truediv", "div", "mean", "sum",
                                    "amax", "amin") \
            or (node.op == "call_module" and type(self._modules.get(node.target)) is nn.Flatten)

    def _derive(self, node: torch.fx.Node) -> bool:
        if self.rank(node) is not None:
            return False
        rank = self._derived_rank(node)
        return rank is not None and self._prove(node, rank)

    def _derived_rank(self, node: torch.fx.Node) -> int | None:
        name = self._name(node)
        args = node.args
        first = args[0] if args else None
        if node.op == "call_module":  # nn.Flatten
            module = self._modules.get(node.target)
            return self._flattened(first, module.start_dim, module.end_dim)
        if name == "flatten":
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
            return self._flattened(first, start, end)
        if name in ("view", "reshape", "permute"):
            sizes = args[1:] if node.op == "call_method" else args[1:2]
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = sizes[0]
            if name == "view" and len(sizes) == 1 and not isinstance(sizes[0], (int, torch.fx.Node)):
                return None  # view(dtype)
            return len(sizes) if sizes else None
        if name == "unsqueeze":
            rank = self.rank(first)
            return None if rank is None else rank + 1
        if name in ("mean", "sum", "amax", "amin"):
            return self._reduced(node)
        if len(args) == 2:  # broadcasting arithmetic: the larger rank
            return self._broadcast_rank(args)
        return None

    def _reduced(self, node: torch.fx.Node) -> int | None:
        """``x.mean(dims, keepdim)`` and the like."""
        rank = self.rank(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if rank is None or dims is None or not isinstance(keepdim, bool):
            return None
        if keepdim:
            return rank
        dims = (dims,) if isinstance(dims, int) else dims
        return rank - len(dims) if all(isinstance(d, int) for d in dims) else None

    def _broadcast_rank(self, args) -> int | None:
        """The larger of the operands' ranks: known when every operand's rank is, or when
        an unknown one is bounded by a known one (a conv2d output, at most 4-D, times a
        ``(1, C, 1, 1)`` constant is 4-D)."""
        known, bounds = [], []
        for arg in args:
            if isinstance(arg, torch.fx.Node):
                value = self._constant(arg)
                rank = value.dim() if value is not None else self.rank(arg)
                if rank is not None:
                    known.append(rank)
                else:
                    bounds.append(self._upper.get(self._classes[arg]))
            elif isinstance(arg, (int, float)):
                known.append(0)
            else:
                return None
        if not known or any(b is None or b > max(known) for b in bounds):
            return None
        return max(known)

    def _flattened(self, x, start, end) -> int | None:
        if not (isinstance(start, int) and isinstance(end, int)):
            return None
        if start >= 0 and end == -1:
            return start + 1
        rank = self.rank(x)
        if rank is None:
            return None
        start, end = start % rank, end % rank
        return rank - (end - start) if end >= start else None


# ---- padding with a written border ---------------------------------------------------

@dataclass(frozen=True)
class BorderFill:
    """Zero padding whose border is then set to ``value`` (0-d or one per channel)."""

    padding: tuple[int, ...]  # per trailing dim
    value: torch.Tensor
    writers: tuple  # the item assignments (and slices) that write the border


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
        self.border_fills = self._find_border_fills()
        writers = {w for fill in self.border_fills.values() for w in fill.writers}
        self.value_users: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        self.metadata_users: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        self.shape_read: set[torch.fx.Node] = set()  # nodes whose sizes a metadata read needs
        for node in ws.graph.nodes:
            values, reads = [], []
            for user in node.users:
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
            if isinstance(module, nn.modules.conv._ConvNd) and _standard(module) \
                    and not module.transposed and module.weight.dim() == 1 - axis:
                return module.in_channels
        return None

    # in-place ops --------------------------------------------------------------------
    def is_inplace(self, node: torch.fx.Node) -> bool:
        if node.op == "call_method":
            return node.target.endswith("_") and not node.target.startswith("__")
        if node.op == "call_function":
            if hashable_in(node.target, _INPLACE_OPERATORS) or node.kwargs.get("inplace") is True:
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
        return fills

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
        return BorderFill(pads, per_channel[0], tuple(writers))

    @staticmethod
    def _rank_from_writes(pad) -> int | None:
        """``y[:, :, 0:p, :] = v`` names every dim of ``y``."""
        for user in pad.users:
            if user.op == "call_function" and user.target is operator.setitem:
                index = user.args[1]
                if isinstance(index, tuple) and Ellipsis not in index:
                    return len(index)
        return None

    def _find_mutated(self) -> set[torch.fx.Node]:
        """Nodes whose value an in-place op changes while another op still reads it
        (border writes of :meth:`_find_border_fills` are part of their padding)."""
        mutated = set()
        writers = {w for fill in self.border_fills.values() for w in fill.writers}
        for node in self.ws.graph.nodes:
            if node in writers:
                continue
            if self.is_inplace(node) and node.args and isinstance(node.args[0], torch.fx.Node):
                target = node.args[0]
                if len(self.value_users[target]) > 1:
                    mutated.add(target)
        return mutated

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
        if node.op == "get_attr":
            attr = self.ws.resolve(node.target)
            return attr.detach() if isinstance(attr, torch.Tensor) else _NOT_CONSTANT
        if not node.all_input_nodes or not _pure_call(node):
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
