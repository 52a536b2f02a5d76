"""Reading a node without running it: the helpers every part of the fx frontend shares.

* :func:`tensor_shape` - a node's shape from metadata (export graphs, ``example_inputs``);
* :func:`schema_name` - ``"conv2d"`` for ``aten.conv2d.default``;
* :func:`shape_values` - shape arithmetic (``h // p``, ``x.shape[1]``): Python numbers, not
  tensor ops;
* :func:`metadata_read` - whether a user reads only a tensor's metadata (``x.shape``,
  ``x.ndim``, ``x.dtype``, ``torch.zeros_like(x)``, ``reshape_as``'s shape argument,
  ``aten.sym_size`` ...), and which: sizes, rank, or type;
* :func:`pure_call` - whether an op computes its result from its arguments alone (no
  randomness, no writes), so that it may be evaluated once on constants.
"""

from __future__ import annotations

import inspect
import operator
import re

import torch
import torch.fx
import torch.nn.functional as F


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


def whole_shape_of(value: torch.fx.Node) -> torch.fx.Node | None:
    """``y`` if ``value`` is ``y.shape`` or ``y.size()`` (every size of ``y``), else None."""
    args = value.args
    if value.op == "call_function" and value.target is getattr and len(args) == 2 \
            and args[1] == "shape" and isinstance(args[0], torch.fx.Node):
        return args[0]
    if value.op == "call_method" and value.target == "size" and len(args) == 1 \
            and "dim" not in value.kwargs and isinstance(args[0], torch.fx.Node):
        return args[0]
    return None


def is_size_int(value) -> bool:
    """Whether ``value`` is proven to be one int: ``y.shape[i]``, ``y.size(i)``, ``y.numel()``,
    ``aten.sym_size``, or arithmetic on those and literals."""
    if isinstance(value, int) and not isinstance(value, bool):
        return True
    if not isinstance(value, torch.fx.Node):
        return False
    args = value.args
    if value.target is operator.getitem and len(args) == 2 and isinstance(args[1], int) \
            and isinstance(args[0], torch.fx.Node) and whole_shape_of(args[0]) is not None:
        return True
    if value.op == "call_method" and value.target in ("size", "numel", "dim") and \
            (value.target != "size" or len(args) == 2 or "dim" in value.kwargs):
        return True
    if (schema_name(value.target) or "") in ("sym_size", "sym_numel"):
        return True
    if value.target in (operator.add, operator.sub, operator.mul, operator.floordiv,
                        operator.mod, operator.neg):
        return all(is_size_int(a) for a in args)
    return False


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
            if name in _SHAPE_OF_SECOND and first is not node and len(args) == 2 \
                    and args[1] is node:
                return _SHAPE_OF_SECOND[name]
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

RANDOM_NAMES = _RANDOM = re.compile(r"rand|bernoulli|multinomial|normal|uniform|poisson|exponential|"
                     r"geometric|cauchy|dropout|gumbel|rrelu|noise|sample|shuffle")
_NOT_PURE_METHODS = {"register_hook", "retain_grad", "backward", "record_stream",
                     "share_memory_", "tolist", "item", "numpy", "apply_", "map_"}
INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                      operator.ior, operator.ixor, operator.imatmul, operator.setitem,
                      operator.delitem}


def pure_call(node: torch.fx.Node) -> bool:
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
        return not hashable_in(target, INPLACE_OPERATORS)
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
    return not _writes_in_place(target, node)


def _writes_in_place(target, node: torch.fx.Node) -> bool:
    """``F.relu(w, inplace=True)``, by keyword or by position."""
    if node.kwargs.get("inplace") is True:
        return True
    try:
        bound = inspect.signature(target).bind_partial(*node.args, **node.kwargs).arguments
    except (TypeError, ValueError):  # builtins without a signature take no ``inplace``
        return False
    return bound.get("inplace") is True


# ---- views: ops whose result shares its input's memory -------------------------------

VIEW_NAMES = {"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "t", "narrow",
              "select", "expand", "expand_as", "squeeze", "unsqueeze", "flatten", "unflatten",
              "detach", "alias", "contiguous", "as_strided", "movedim", "unfold", "diagonal",
              "slice", "chunk", "split", "unbind", "__getitem__", "getitem", "real", "imag",
              "view_as_real", "view_as_complex", "_reshape_alias", "T", "mT"}

# ops that return their input itself in some mode or for some arguments: dropout outside
# training, ``.to``/``.type``/``.float()`` to the dtype and device it has, ``.data``
MAYBE_SELF_NAMES = {"dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout",
                    "alpha_dropout", "feature_alpha_dropout", "native_dropout", "to", "type",
                    "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda", "data",
                    "lift_fresh", "requires_grad_"}


def view_base(node: torch.fx.Node, modules) -> torch.fx.Node | None:
    """The tensor ``node`` may be a view or an alias of (writing to ``node`` in place
    writes to it), or None: ``x.view(...)``, ``x[:, :2]``, ``x.transpose(...)``, pieces of
    ``x.chunk(...)``, aten views, in-place ops (which return ``x``), ``nn.Identity``, eval
    ``Dropout`` and modules of unknown code (which may return ``x``)."""
    first = node.args[0] if node.args else None
    if not isinstance(first, torch.fx.Node):
        return None
    if node.op == "call_module":
        module = modules.get(node.target)
        fresh = module is not None and type(module).__module__.startswith("torch.nn") and \
            not isinstance(module, (torch.nn.Identity, torch.nn.modules.dropout._DropoutNd,
                                    torch.nn.Sequential)) and \
            getattr(module, "inplace", False) is not True and "forward" not in module.__dict__
        return None if fresh else first
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        if node.target is getattr:
            return first if node.args[1] in VIEW_NAMES or node.args[1] in MAYBE_SELF_NAMES else None
        name = schema_name(node.target) or getattr(node.target, "__name__", "")
        if node.kwargs.get("inplace") is True:
            return first
    else:
        return None
    in_place = name.endswith("_") and not name.startswith("__")
    return first if name in VIEW_NAMES or name in MAYBE_SELF_NAMES or in_place else None
