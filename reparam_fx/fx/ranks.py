"""Ranks: tensor ranks the graph proves, never assumed.

A rank is *proven* by shape metadata (export graphs, ``example_inputs``), by a
``BatchNorm2d``/``3d`` module's class (its input is 4-/5-D; also for a subclass whose
``forward`` is traced through, read from ``meta['nn_module_stack']``), by a
``torch._assert(x.ndim == k)`` or ``x.dim() == k`` in the graph, and by the arguments of
``flatten`` / ``view`` / ``reshape`` / ``permute`` / ``unsqueeze`` / ``mean``, and by a
classifier head ``linear(flatten(adaptive_avg_pool2d(x, 1), 1))`` (3-D input would reach the
Linear with the wrong width: the model only runs on batched input). Ops that keep
the rank (conv: ``(C, H, W)`` stays 3-D and ``(N, C, H, W)`` 4-D; BatchNorm; linear;
pooling; activations; dropout; scalar arithmetic; ``cat``) join their input and output
into one class (a union-find), so one proof holds for the whole class. A conv bounds its
class's rank by its weight's (``(1, C, 1, 1) * conv2d(x)`` is then 4-D). Classes with
conflicting proofs prove nothing.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from networkx.utils import UnionFind

from reparam_fx.fx.capture import batchnorm_input_rank, runs_standard_forward
from reparam_fx.fx.values import (hashable_in, is_size_int, schema_name, tensor_shape,
                                  whole_shape_of)


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
    "movedim", "moveaxis", "swapaxes", "swapdims",
    "_native_batch_norm_legit_no_training", "alias", "identity",
}
_BATCHNORM_RANKS = ((nn.BatchNorm2d, 4), (nn.BatchNorm3d, 5))
_IN_PLACE_ARITHMETIC = {"iadd", "isub", "imul", "itruediv", "add_", "sub_", "mul_", "div_"}
_BINARY_ARITHMETIC = {"add", "sub", "mul", "truediv", "div"}


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
        self._join_same_rank_arithmetic(nodes)
        for node in nodes:
            self._prove_from_node(node)
            bound = self._conv_rank_bound(node)
            if bound is not None:
                root = self._classes[node]
                self._upper[root] = min(bound, self._upper.get(root, bound))
        for _ in range(self.MAX_SWEEPS):  # ranks derived from other ranks, to a fixpoint
            if not any([self._derive(node) for node in self._derived]):
                break

    def _join_same_rank_arithmetic(self, nodes) -> None:
        """``a + b`` (``-``, ``*``, ``/``) of two tensors of one class has their rank:
        broadcasting equal ranks keeps it (the residual ``x + f(x)``). Joining may put the
        operands of a later op in one class, so this runs to a fixpoint."""
        pending = [node for node in nodes if self._name(node) in _BINARY_ARITHMETIC
                   and len(node.args) == 2 and not node.kwargs
                   and all(isinstance(a, torch.fx.Node) for a in node.args)]
        for _ in range(self.MAX_SWEEPS):
            waiting = []
            for node in pending:
                a, b = node.args
                if self._classes[a] == self._classes[b]:
                    self._classes.union(node, a)
                else:
                    waiting.append(node)
            if len(waiting) == len(pending):
                break
            pending = waiting

    def rank(self, node) -> int | None:
        if not isinstance(node, torch.fx.Node):
            return None
        return self._rank.get(self._classes[node])

    def _conv_rank_bound(self, node: torch.fx.Node) -> int | None:
        """A conv's input and output have at most ``weight.dim()`` dims (batched), one
        fewer if unbatched."""
        if node.op == "call_module":
            module = self._modules.get(node.target)
            if isinstance(module, nn.modules.conv._ConvNd) and runs_standard_forward(module):
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
            keeps = runs_standard_forward(module) and (
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
            if name in _IN_PLACE_ARITHMETIC:
                return first  # ``out += e`` writes into ``out``: ``e`` broadcasts to its shape
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
            rank = batchnorm_input_rank(module)  # its class checks it (BatchNorm2d: 4-D)
            if rank is not None and isinstance(first, torch.fx.Node):
                self._prove(first, rank)
        elif node.op == "call_function" and node.target is F.batch_norm:
            self._prove_batchnorm_subclass_input(node)
        elif node.op == "call_function" and node.target is torch._assert:
            self._prove_from_assert(node)
        self._prove_from_classifier_head(node)
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

    def _prove_from_classifier_head(self, node: torch.fx.Node) -> None:
        """``linear(flatten(adaptive_pool(x, (oh, ow)), 1))``, the classifier head of most
        CNNs, proves ``x`` batched: an adaptive 2-D pool takes a 3-D or 4-D tensor, and
        ``flatten(1)`` makes ``(B, C*oh*ow)`` of a 4-D one but ``(C, oh*ow)`` of a 3-D one,
        which a Linear with ``in_features != oh*ow`` rejects. So on every input the model
        accepts, the pool's input is 4-D (1-D and 3-D pools alike: spatial dims + 2)."""
        features = self._linear_in_features(node)
        if features is None or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return
        flat = node.args[0]
        while flat.op == "call_module" and isinstance(self._modules.get(flat.target), (
                nn.Identity, nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)) \
                and runs_standard_forward(self._modules.get(flat.target)) and \
                isinstance(flat.args[0] if flat.args else None, torch.fx.Node):
            flat = flat.args[0]  # (a head's dropout or BatchNorm1d keeps the shape)
        pooled = _flattened_from_dim_one(flat, self._modules)
        found = _adaptive_pool(pooled, self._modules) if pooled is not None else None
        if found is None:
            return
        spatial, sizes = found
        if len(sizes) == spatial and all(isinstance(s, int) for s in sizes) and \
                math.prod(sizes) != features:
            self._prove(pooled, spatial + 2)

    def _linear_in_features(self, node: torch.fx.Node) -> int | None:
        if node.op == "call_module":
            module = self._modules.get(node.target)
            if isinstance(module, nn.Linear) and runs_standard_forward(module):
                return module.in_features
        elif node.op == "call_function" and node.target is F.linear and len(node.args) > 1:
            weight = self._constant(node.args[1])
            if weight is not None and weight.dim() == 2:
                return weight.shape[1]
        return None

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
                                    "unflatten", "add", "sub", "mul", "truediv", "div", "mean",
                                    "sum", "amax", "amin", "view_as", "reshape_as",
                                    "expand_as") \
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
            if len(sizes) == 1 and isinstance(sizes[0], torch.fx.Node):
                return self._sizes_in(sizes[0])
            return len(sizes) if sizes else None
        if name == "unsqueeze":
            rank = self.rank(first)
            return None if rank is None else rank + 1
        if name in ("view_as", "reshape_as", "expand_as") and len(args) > 1:
            return self.rank(args[1])
        if name == "unflatten":
            sizes = args[2] if len(args) > 2 else node.kwargs.get("sizes")
            rank = self.rank(first)
            return None if rank is None or not isinstance(sizes, (tuple, list)) \
                else rank + len(sizes) - 1
        if name in ("mean", "sum", "amax", "amin"):
            return self._reduced(node)
        if len(args) == 2:  # broadcasting arithmetic: the larger rank
            return self._broadcast_rank(args)
        return None

    def _sizes_in(self, value: torch.fx.Node) -> int | None:
        """How many sizes one graph value passed to ``reshape``/``view``/``permute`` holds:
        one for an int (``x.size(0)``, ``h * w``), the rank of ``y`` for a whole shape
        (``y.shape``, ``y.size()``), else unknown (a slice ``y.shape[:2]``, a tuple built at
        run time)."""
        meta = value.meta.get("val")
        if isinstance(meta, (int, torch.SymInt)) and not isinstance(meta, bool):
            return 1
        if isinstance(meta, (tuple, list, torch.Size)):
            return len(meta)
        if whole_shape_of(value) is not None:
            return self.rank(whole_shape_of(value))
        return 1 if is_size_int(value) else None

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
        if start >= 0 and end < 0:  # axes start..end-from-the-back become one
            return start - end
        rank = self.rank(x)
        if rank is None:
            return None
        start, end = start % rank, end % rank
        return rank - (end - start) if end >= start else None


_ADAPTIVE_POOL_FUNCTIONS = {F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2,
                            F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1,
                            F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3}


def _flattened_from_dim_one(node: torch.fx.Node, modules):
    """``x`` if ``node`` is ``torch.flatten(x, 1)``, ``x.flatten(1)`` or ``nn.Flatten()``
    (every dim from 1 to the last), else None."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(x, torch.fx.Node):
        return None
    if node.op == "call_module":
        module = modules.get(node.target)
        if type(module) is nn.Flatten and (module.start_dim, module.end_dim) == (1, -1):
            return x
        return None
    if (node.op == "call_function" and node.target is torch.flatten) or \
            (node.op == "call_method" and node.target == "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return x if (start, end) == (1, -1) else None
    return None


def _adaptive_pool(node: torch.fx.Node, modules):
    """``(spatial dims, output sizes)`` of an adaptive average or max pool, else None."""
    if node.op == "call_module":
        module = modules.get(node.target)
        if not isinstance(module, (nn.modules.pooling._AdaptiveAvgPoolNd,
                                   nn.modules.pooling._AdaptiveMaxPoolNd)) \
                or not runs_standard_forward(module):
            return None
        spatial, size = int(type(module).__name__[-2]), module.output_size
    elif node.op == "call_function" and hashable_in(node.target, _ADAPTIVE_POOL_FUNCTIONS):
        spatial = _ADAPTIVE_POOL_FUNCTIONS[node.target]
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
    else:
        return None
    sizes = tuple(size) if isinstance(size, (tuple, list)) else (size,) * spatial
    return spatial, sizes
