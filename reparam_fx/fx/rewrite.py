"""Rewrite: find every exactly-foldable region of a workspace graph and write each back
as one conv (or linear).

:mod:`reparam_fx.core.regions` (shared with the ONNX frontend) walks the graph once, in
topological order, through :class:`~reparam_fx.fx.view.FxView` (graph facts from :mod:`.facts`, ops read by
:mod:`.ops`), and gives each node it understands a *region* ``node == term(source)``:

    conv / bn / linear / avgpool / zero-pad / x*c / x+c / x/c / -x:
        region(node) = compose(region(input), op)                (same source)
    sums: a + b - c + ... (add/sub/iadd/add_/torch.add(alpha=k) chains, flattened):
        region(node) = merge(regions of all the terms)          (if they share a source)

An input's region is extended only if no other op reads its values and it is never
mutated in place; otherwise the input itself becomes the source. When the algebra
declines (``NotExact``), the op starts a new region at its input, or is left alone, and
the reason goes to the report. A sum whose terms do not all merge is partitioned into
mergeable groups and rewritten as the merged convs plus the remaining terms.

:func:`fusion_pass` builds a new graph: each region becomes one op where its first op
was, as ``nn.ConvNd`` / ``nn.ConvTransposeNd`` / ``nn.Linear`` modules in module-level and
functional graphs, and as ``aten.convolution`` / ``aten.linear`` on ``get_attr`` weights in
aten graphs. Metadata reads of absorbed values (``x.shape``, ``x.ndim``) now read the new
op's output, which has the same shape (the region builder guarantees it). Regions that
absorbed fewer than two ops (identities such as eval Dropout do not count), or whose term
has no conv (a pure per-channel affine), are left as they are, except a conv whose weights
``forward`` computes from parameters: that one is written with its weights precomputed.

Length: about 620 lines: a region is written in each of the three graph forms (module,
functional, aten), with its moves copied around the one op; the plan of one region
(:class:`_Plan`) reads best next to the pass that makes it.
"""

from __future__ import annotations

import itertools
import operator
import re

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from reparam_fx.core import affine
from reparam_fx.core.affine import ConvTerm, TransposedConvTerm
from reparam_fx.fx.capture import copy_sharing_specs
from reparam_fx.fx.counts import counts_as_parameter, module_tensors, node_category
from reparam_fx.fx.facts import GraphFacts
from reparam_fx.fx.values import metadata_read, schema_name
from reparam_fx.fx.moves import COPIES, PERMUTES, RESHAPES, move_name
from reparam_fx.fx.ops import interpret
from reparam_fx.core.regions import Region, Sum, Unary
from reparam_fx.core.layout import permutations_cancel
from reparam_fx.core.pipeline import find_rewrites, fused_region, sum_steps
from reparam_fx.core.report import FusedRegion, FusionReport
from reparam_fx.fx.view import FxView

aten = torch.ops.aten


# ---- writing regions back ------------------------------------------------------------

_FRESH_ACTIVATIONS = {"relu", "relu6", "gelu", "silu", "hardswish", "hardsigmoid", "sigmoid",
                      "tanh", "mish", "elu", "selu", "leaky_relu", "softplus", "hardtanh", "cat"}


def redirect_reads_after_inplace(ws) -> None:
    """Point reads that follow an in-place op at that op's own node.

    Symbolic tracing records ``out.mul_(g); y = out * a`` with ``y`` reading the node of
    ``out`` from before the write; the in-place op's node returns the written tensor. Where
    it is safe, ``y`` is made to read that node, so every op reads the value it really gets
    and the write can fold like any other op:

    * the written tensor is new, made by an op that returns no view or alias of its input
      (conv, BatchNorm, arithmetic, padding, activations ... not ``view``, unknown modules,
      graph inputs or parameters), possibly passed on by identities (``nn.Identity``, eval
      Dropout), which return the same tensor: reads of those are reads of it too;
    * every read of it before the write reads only its metadata or computes a new tensor
      (so no view taken earlier is read after the write).
    """
    if not any(_may_write_in_place(node, ws) for node in ws.graph.nodes):
        return  # (the common case: no graph facts needed)
    ws.make_private()
    view = FxView(GraphFacts(ws))
    order = {node: index for index, node in enumerate(ws.graph.nodes)}
    written = set()  # in-place nodes whose written tensor is new
    for node in list(ws.graph.nodes):
        if not view.facts.is_inplace(node) or not node.args or node.target is operator.setitem:
            continue  # (item assignment returns None, not the tensor)
        aliases = _alias_chain(node.args[0], view)
        if aliases is None or not (aliases[-1] in written or _fresh(aliases[-1], view)):
            continue
        written.add(node)
        readers = [(alias, u) for alias in aliases for u in alias.users
                   if u is not node and u not in aliases]
        if any(order[u] < order[node] and metadata_read(u, alias) is None
               and not _fresh(u, view) for alias, u in readers):
            continue
        for alias, user in readers:
            if order[user] > order[node]:
                user.replace_input_with(alias, node)


def _may_write_in_place(node: torch.fx.Node, ws) -> bool:
    """A cheap first look: tensor methods ending in ``_``, ``operator.i*``, ``inplace=True``,
    mutable aten ops, modules with ``inplace=True``."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (name.startswith("i") and getattr(node.target, "__module__", "") == "_operator") \
            or (name.endswith("_") and not name.startswith("__")) \
            or node.kwargs.get("inplace") is True \
            or (isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable)
    return node.op == "call_module" and getattr(ws.module(node.target), "inplace", False) is True


def _alias_chain(node, view: FxView) -> list | None:
    """``[node, its input, ...]`` back through identities to the op that made the tensor."""
    chain = [node]
    while isinstance(chain[-1], torch.fx.Node):
        op = view.interpret(chain[-1])
        if not (isinstance(op, Unary) and op.role == "identity") or view.facts.is_inplace(chain[-1]):
            return chain
        if len(view.users(op.input)) != 1 and any(
                u not in chain and metadata_read(u, op.input) is None
                for u in op.input.users if u is not chain[-1]):
            return None  # read elsewhere too: those reads would need the same care
        chain.append(op.input)
    return None


def _fresh(node: torch.fx.Node, view: FxView) -> bool:
    """Whether ``node`` returns a new tensor, never a view or an alias of an input."""
    op = view.interpret(node)
    if isinstance(op, Sum) or (isinstance(op, Unary) and op.role != "identity"):
        return not view.facts.is_inplace(node)
    if view.facts.is_inplace(node):
        return False
    if node.op == "call_module":
        module = view.facts.modules.get(node.target)
        return type(module).__module__ == "torch.nn.modules.activation"
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return node.op in ("call_function", "call_method") and name in _FRESH_ACTIVATIONS


def _reference_tensor(region: Region, facts: GraphFacts) -> torch.Tensor:
    """A tensor whose dtype/device the new weights take: a floating-point parameter of the
    region; for a region without any (e.g. ``pool(x) - x``), the recorded value of its
    input, else any floating-point parameter or buffer of the model, else the default."""
    for node in region.nodes:
        if node.op == "call_module":
            for _, tensor in module_tensors(facts.modules[node.target]):
                if tensor.is_floating_point():
                    return tensor
        for arg in node.args:
            value = facts.constant(arg) if isinstance(arg, torch.fx.Node) else None
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim():
                return value
    meta = region.source.meta.get("val", region.source.meta.get("tensor_meta"))
    if meta is not None and getattr(meta, "dtype", None) is not None and meta.dtype.is_floating_point:
        return torch.empty(0, dtype=meta.dtype, device=getattr(meta, "device", "cpu"))
    for tensor in itertools.chain(facts.ws.root.parameters(), facts.ws.root.buffers()):
        if tensor.is_floating_point():
            return tensor
    return torch.empty(0)


def _new_name(region: Region, facts: GraphFacts) -> str:
    """A readable qualified name: the absorbed attributes' common parent + '.fused'."""
    paths = [n.target.split(".") for n in region.nodes if n.op == "call_module"]
    paths += [a.target.split(".")[:-1] for n in region.nodes
              for a in n.all_input_nodes if a.op == "get_attr"]
    prefix = []
    if paths:
        for parts in zip(*paths):
            if len(set(parts)) != 1:
                break
            prefix.append(parts[0])
        # a container path, never an attribute in use (a module called elsewhere)
        while prefix and ".".join(prefix) in facts.attribute_targets:
            prefix.pop()
    base = (".".join(prefix + ["fused"]) if prefix
            else "fused_" + re.sub(r"\W", "_", region.nodes[-1].name))
    name, index = base, 1
    while facts.ws.taken(name):
        index += 1
        name = f"{base}{index}"
    return name


_META_INIT_ABOVE = 1 << 16  # weights larger than this are built on the meta device


def _make_module(term: ConvTerm | TransposedConvTerm, like: torch.Tensor) -> nn.Module:
    """An ``nn.ConvNd``/``nn.ConvTransposeNd``/``nn.Linear`` holding the term's weights in
    ``like``'s dtype/device.

    Large modules are built on the meta device, so no random initialisation is computed
    and thrown away; small ones on the CPU, where that is cheaper than meta dispatch."""
    weight, bias = term.weights_as(like)
    padding = term.padding
    if isinstance(term, ConvTerm) and term.zero_taps:
        weight, padding = _trimmed(term, weight)
    device = "meta" if weight.numel() > _META_INIT_ABOVE else "cpu"
    if isinstance(term, TransposedConvTerm):
        conv_cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[term.spatial - 1]
        module = conv_cls(term.in_channels, term.out_channels, term.kernel, term.stride,
                          term.padding, term.output_padding, term.groups, bias=False,
                          dilation=term.dilation, device=device)
    elif term.spatial == 0:
        module = nn.Linear(term.in_channels, term.out_channels, bias=False, device=device)
    else:
        conv_cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[term.spatial - 1]
        module = conv_cls(term.in_channels, term.out_channels, tuple(weight.shape[2:]),
                          term.stride, padding, term.dilation, term.groups, bias=False,
                          padding_mode=term.padding_mode, device=device)
    module.weight = nn.Parameter(weight.contiguous())
    module.bias = None if bias is None else nn.Parameter(bias.contiguous())
    return module.eval()


def _trimmed(term: ConvTerm, weight: torch.Tensor):
    """The weight without its known zero taps, and the padding its conv module takes."""
    window = (slice(None), slice(None), *(slice(a, k - b) for k, (a, b) in
                                          zip(term.kernel, term.taps)))
    return weight[window], _written_padding(term)[0]


def _written_padding(term: ConvTerm):
    """``(padding argument, explicit pad)`` of the conv written for ``term`` once its zero
    taps are trimmed: symmetric ints; ``"same"`` where PyTorch's rule for it gives the
    same sides (stride 1, ``d*(k-1) // 2`` before, the rest after); else zeros and
    ``F.pad``'s argument (last dim first) for a pad written before the conv."""
    pads = term.written_padding
    if all(before == after for before, after in pads):
        return tuple(before for before, _ in pads), None
    same = tuple((d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
                 for k, d in zip(term.written_kernel, term.dilation))
    if pads == same and all(s == 1 for s in term.stride):
        return "same", None
    return (0,) * term.spatial, [side for before, after in reversed(pads)
                                 for side in (before, after)]


def _worth_writing(region: Region) -> bool:
    """An emittable region, unless it is a zero pad and the conv after it only, written
    again as a pad and a conv (no conv module expresses its padding)."""
    return region.emittable and not (
        _explicit_pad(region.term) is not None
        and len(region.nodes) - region.kinds["identity"] - len(region.layouts) <= 2)


def _rank_of(node) -> int | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value.dim() if isinstance(value, torch.Tensor) else None


def _explicit_pad(term) -> list[int] | None:
    """``F.pad``'s argument for a term whose written padding no conv module expresses."""
    if not isinstance(term, ConvTerm) or not term.zero_taps:
        return None
    return _written_padding(term)[1]


def _emit(graph: torch.fx.Graph, region: Region, output: torch.fx.Node, source,
          facts: GraphFacts, term=None, meta_from=None) -> tuple[str, torch.fx.Node]:
    """Append the region's single op (reading ``source``) to ``graph``: an
    ``nn.ConvNd``/``nn.Linear`` module in fx graphs, ``aten.convolution``/``aten.linear``
    on new weights in aten graphs. ``term`` replaces the region's (written where moves put
    the channel axis); shape metadata comes from ``meta_from`` (default ``output``)."""
    ws, term = facts.ws, (term if term is not None else region.term)
    like = _reference_tensor(region, facts)
    name = _new_name(region, facts)
    module = _make_module(term, like)
    explicit_pad = _explicit_pad(term)
    if explicit_pad is not None:
        pad = (aten.constant_pad_nd.default, (source, explicit_pad, 0.0)) \
            if ws.frontend == "aten" else (F.pad, (source, tuple(explicit_pad)))
        source = graph.create_node("call_function", *pad)
    if ws.frontend == "aten" and getattr(module, "padding", None) == "same":
        total = [d * (k - 1) for k, d in zip(module.kernel_size, module.dilation)]
        source = graph.create_node("call_function", aten.constant_pad_nd.default, (
            source, [side for t in reversed(total) for side in (t // 2, t - t // 2)], 0.0))
        module.padding = (0,) * len(total)
    if ws.frontend == "aten" and getattr(term, "padding_mode", "zeros") == "zeros":
        ws.add(f"{name}.weight", module.weight)
        w = graph.create_node("get_attr", f"{name}.weight")
        b = None
        if module.bias is not None:
            ws.add(f"{name}.bias", module.bias)
            b = graph.create_node("get_attr", f"{name}.bias")
        transposed = isinstance(term, TransposedConvTerm)
        # (C, H, W): ``aten.convolution`` takes batched input only. The rank read is the
        # source's (a conv keeps it), or with moves between, the value the op writes
        read = region.source if not region.layouts else \
            (output if meta_from is None else meta_from)
        unbatched = term.spatial and _rank_of(read) == term.spatial + 1
        if unbatched:
            source = graph.create_node("call_function", aten.unsqueeze.default, (source, 0))
        if term.spatial == 0:
            target, args = aten.linear.default, (source, w, b)
        else:
            target, args = aten.convolution.default, (
                source, w, b, list(term.stride), list(module.padding), list(term.dilation),
                transposed, list(term.output_padding) if transposed else [0] * term.spatial,
                term.groups)
        new = graph.create_node("call_function", target, args, name=name.replace(".", "_"))
        if unbatched:
            new = graph.create_node("call_function", aten.squeeze.dim, (new, 0))
    else:
        ws.add(name, module)
        new = graph.create_node("call_module", name, (source,))
    meta_from = output if meta_from is None else meta_from
    new.meta.update({k: v for k, v in (meta_from.meta if meta_from else {}).items()
                     if k in ("val", "tensor_meta")})
    if "stack_trace" in output.meta:
        new.meta["stack_trace"] = output.meta["stack_trace"]
    return name, new


def _rewrite(facts: GraphFacts, emit: list, partial_sums: list,
             report: FusionReport) -> torch.fx.Graph:
    """A new graph: the old one with each emitted region replaced by its single op, and
    each partial sum rebuilt from its merged regions and remaining terms. Absorbed ops,
    and constants only they read, are not copied.

    The op goes where the region's first op was; a region with moves (reshapes,
    permutes) has its moves written again where they were, applied to the op's output
    (placement ``"before"``) or to the source, the op then written after the last move
    (``"after"``); moves that together change nothing are left out. A metadata read of an
    absorbed value reads the new value of the same shape (its *twin*)."""
    old = facts.ws.graph
    order = {n: i for i, n in enumerate(old.nodes)}
    plans = [_Plan(output, output, region, facts) for output, region in emit]
    roots = {}
    for partial in partial_sums:
        roots[partial.root] = partial
        plans += [_Plan((partial.root, index), partial.root, term, facts)
                  for index, (term, _) in enumerate(partial.terms) if isinstance(term, Region)]
    dead = {n for plan in plans for n in plan.region.nodes}
    dead.update(n for partial in partial_sums for n in (*partial.inner, partial.root))
    sources = {plan.region.source for plan in plans}  # read by new ops: never swept away
    _keep_what_live_ops_read(dead, {plan.output for plan in plans} | set(roots))
    for node in reversed(old.nodes):  # users come later, so they are decided first
        if node in dead or node in sources or not node.users:
            continue
        # unused checks on a constant (export's dtype assert before a .to()) go with it
        checks = {u for u in node.users if not u.users and metadata_read(u, node)}
        if all(u in dead or u in checks for u in node.users) and \
                (node.op == "get_attr" or facts.is_constant(node)):
            dead.add(node)
            dead.update(checks)
    at: dict = {}  # old node -> [(plan, step)]: what to write when reaching it
    for plan in plans:
        for node, step in plan.steps(order):
            at.setdefault(node, []).append((plan, step))
    new = torch.fx.Graph()
    new._codegen = copy_sharing_specs(old._codegen, old)
    env: dict = {}
    copies: dict = {}  # (source, move node) -> its copy on the source (shared by regions)
    # a partial sum's inner sums go; their rank and dtype reads read a source of its terms
    rank_read = {inner: next(term.source for term, _ in partial.terms if isinstance(term, Region))
                 for partial in partial_sums for inner in (*partial.inner, partial.root)
                 if inner in facts.metadata_users}
    for node in old.nodes:
        for plan, step in at.get(node, ()):
            plan.write(step, new, env, copies, dead, report)
        if node in rank_read and node in dead:
            env[node] = env[rank_read[node]]
        if node in roots:
            partial = roots[node]
            values = [(env[(node, i)] if isinstance(term, Region) else env[term], coeff)
                      for i, (term, coeff) in enumerate(partial.terms)]
            env[node] = _emit_sum(new, values, node, facts.ws.frontend)
        elif node not in dead:
            env[node] = new.node_copy(node, env.__getitem__)
            if _view_after_rewritten_values(node, dead.__contains__):
                env[node].target = aten.reshape.default if node.op == "call_function" else "reshape"
    return new


_VIEWS_OF_INPUT = {"permute", "transpose", "slice", "select", "expand", "unsqueeze", "squeeze",
                   "alias", "t", "narrow", "movedim", "getitem", "view", "_unsafe_view"}


def _view_after_rewritten_values(node: torch.fx.Node, rewritten) -> bool:
    """A ``view`` whose input is a view of values a rewrite replaced: the ``view`` was legal
    for the memory layout the replaced op made (an element-wise op keeps a permuted
    layout dense), which the new op need not make. Written as ``reshape``, which views
    where it can and copies where it must: the same values."""
    name = node.target if node.op == "call_method" else schema_name(node.target)
    if name not in ("view", "_unsafe_view") or not node.args:
        return False
    value = node.args[0]
    while isinstance(value, torch.fx.Node):
        if rewritten(value):
            return True
        kind = value.target if value.op == "call_method" else (
            schema_name(value.target) or getattr(value.target, "__name__", ""))
        if kind not in _VIEWS_OF_INPUT or not value.args:
            return False
        value = value.args[0]
    return False


def _keep_what_live_ops_read(dead: set, replaced: set) -> None:
    """A region's nodes go only if nothing left reads their values (the values a rewrite
    ``replaced`` are provided anew): a per-channel affine folded into several readers
    (q, k, v) stays for a reader that did not fold it."""
    changed = True
    while changed:
        changed = False
        for node in list(dead):
            if node in replaced:
                continue
            if any(u not in dead and metadata_read(u, node) is None for u in node.users):
                dead.discard(node)
                changed = True


class _Plan:
    """How one region is written: its op, the copies of its moves, and the twins of its
    absorbed values whose metadata is read later."""

    def __init__(self, key, output, region: Region, facts: GraphFacts):
        self.key, self.output, self.region, self.facts = key, output, region, facts
        self.placement = region.placement if region.layouts else None
        self.moves = [node for node, _ in region.layouts]
        if self.moves and _moves_cancel(self.moves, region, facts):
            self.moves = []  # e.g. flatten(0, 1) ... reshape_as(x): nothing to write again

    def steps(self, order) -> list:
        """``(old node, step)``: the op at the first node (``"before"``) or at the last
        move (``"after"``); each move's copy at the move."""
        region = self.region
        first = min(region.nodes, key=order.__getitem__)
        if self.placement == "after":
            if not self.moves:
                return [(first, "op")]
            return [(first, "start")] + \
                [(move, ("move", i)) for i, move in enumerate(self.moves)] + \
                [(self.moves[-1], "op")]
        return [(first, "op")] + [(move, ("move", i)) for i, move in enumerate(self.moves)]

    def write(self, step, graph, env, copies, dead, report) -> None:
        region, facts = self.region, self.facts
        if step == "start":  # nothing written yet: values before the moves are the source
            pass
        elif step == "op":
            source, term, meta_from = env[region.source], None, None
            if self.placement == "after":
                if self.moves:
                    source = copies[(region.source, self.moves[-1])]
                term = affine.as_pointwise(region.term, region.now_spatial)
            elif self.placement == "before":
                first_move = region.layouts[0][0]
                meta_from = first_move.args[0] if region.post_kept else False
            name, value = _emit(graph, region, self.output, source, facts, term,
                                meta_from if meta_from is not False else None)
            if meta_from is False:
                value.meta.pop("val", None)
                value.meta.pop("tensor_meta", None)
            env[("op", self.key)] = value
            report.fused.append(_fused_region(self.output, name, region, facts))
            if self.placement != "before" or not self.moves:
                env[self.key] = value
        else:
            index = step[1]
            move = self.moves[index]
            if self.placement == "after":
                previous = region.source if index == 0 else self.moves[index - 1]
                if (region.source, move) not in copies:
                    copies[(region.source, move)] = self._copy(
                        graph, move, env, copies[(region.source, previous)] if index else
                        env[region.source], True, dead)
                value = copies[(region.source, move)]
            else:
                previous = env[("op", self.key)] if index == 0 else \
                    env[("move", self.key, index - 1)]
                value = self._copy(graph, move, env, previous, region.post_kept, dead)
                env[("move", self.key, index)] = value
                if index == len(self.moves) - 1:
                    env[self.key] = value
        self._twins(step, env, copies, dead)

    def _copy(self, graph, move, env, input_value, keep_meta, dead):
        """The move written again on ``input_value`` (its other arguments, such as sizes
        read from ``x.shape``, as they are); a ``view`` that followed an absorbed op as a
        ``reshape`` (see :func:`_view_after_rewritten_values`)."""
        first = move.args[0]
        value = graph.node_copy(move, lambda n: input_value if n is first else env[n])
        moves = self.moves
        if _view_after_rewritten_values(move, lambda n: n in dead and n not in moves):
            value.target = aten.reshape.default if move.op == "call_function" else "reshape"
        if not keep_meta:
            value.meta.pop("val", None)
            value.meta.pop("tensor_meta", None)
        return value

    def _twins(self, step, env, copies, dead) -> None:
        """Point absorbed values whose metadata is read at a written value of their shape."""
        region, placement = self.region, self.placement
        # moves that cancel are not written: every value read here has the op's shape
        moved = bool(region.layouts) and bool(self.moves)
        for node in region.nodes:
            if node not in self.facts.metadata_users or node not in dead:
                continue
            phase = region.phases.get(node, 0) if moved else 0
            if not moved or (placement == "before" and phase == 0):
                target = ("op", self.key)
            elif placement == "after" and phase == 0:
                target = region.source
            elif placement == "after" and phase == len(region.layouts) and \
                    node not in self.moves:
                target = ("op", self.key)
            elif 0 < phase <= len(self.moves):
                move = self.moves[phase - 1]
                target = (region.source, move) if placement == "after" else \
                    ("move", self.key, phase - 1)
                if placement == "after":
                    if target in copies:
                        env[node] = copies[target]
                    continue
            else:
                continue
            if target in env:
                env[node] = env[target]


def _moves_cancel(moves: list, region: Region, facts: GraphFacts) -> bool:
    """Whether the moves together change nothing, and no value between them has its
    metadata read: a chain of reshapes ending in ``reshape_as`` / ``view_as`` of the value
    before the first one, or permutations that compose to none."""
    if any(n in facts.metadata_users for n in moves[:-1]) or any(
            n in facts.metadata_users and region.phases.get(n, 0) > 0 and n not in moves
            for n in region.nodes):
        return False
    start, last = moves[0].args[0], moves[-1]
    names = [move_name(n, facts) for n in moves]
    if names[-1] in ("view_as", "reshape_as") and len(last.args) > 1 and \
            last.args[1] is start and all(n in RESHAPES | COPIES for n in names):
        return True
    rank = facts.rank(start)
    return rank is not None and all(n in PERMUTES | COPIES for n in names) and \
        permutations_cancel([move for _, move in region.layouts], rank)


def _emit_sum(graph: torch.fx.Graph, values: list, like: torch.fx.Node, frontend: str):
    """``sum(coeff * value)`` as a chain of add/sub (and mul for other coefficients)."""
    aten_graph = frontend == "aten"
    add, sub, mul = ((aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor) if aten_graph
                     else (operator.add, operator.sub, operator.mul))
    result = None
    for value, scale, join in sum_steps(values):
        if scale is not None:
            value = graph.call_function(mul, (value, scale))
        result = value if join == "first" else \
            graph.call_function(add if join == "add" else sub, (result, value))
    result.meta.update({k: v for k, v in like.meta.items() if k in ("val", "tensor_meta")})
    return result


def _fused_region(output: torch.fx.Node, name: str, region: Region,
                  facts: GraphFacts) -> FusedRegion:
    return fused_region(region, output.name, name, (n.name for n in region.nodes),
                        (_category(n, facts) for n in region.nodes),
                        _region_params(region, facts))


def fusion_pass(facts: GraphFacts, report: FusionReport) -> bool:
    """One walk, then one rewrite into a new graph; returns whether another pass may
    find more. ``report.skipped`` is rebuilt each pass: it describes the graph of the
    last pass."""
    view = FxView(facts)
    emit, partial_sums = find_rewrites(view, report, _worth_writing)
    if not emit and not partial_sums:
        return False
    facts.ws.graph = _rewrite(facts, emit, partial_sums, report)
    facts.ws.private = True
    sources = [region.source for _, region in emit]
    sources += [term.source for partial in partial_sums for term, _ in partial.terms
                if isinstance(term, Region)]
    return _may_grow(facts, sources)


def _may_grow(facts: GraphFacts, sources) -> bool:
    """Whether another pass could fold more. A rewrite changes no node's user count but a
    region source's, which now feeds only the new op: if such a source is itself an
    affine op, the new op may absorb it next pass."""
    rewritten = {n.name: n for n in facts.ws.graph.nodes}
    for source in sources:
        node = rewritten.get(source.name)
        if node is None or not node.op.startswith("call_"):
            continue
        if sum(1 for user in node.users if metadata_read(user, node) is None) == 1 and \
                isinstance(interpret(node, facts), (Unary, Sum)):
            return True
    return False


def _category(node, facts):
    return node_category(node, facts.modules)


def _region_params(region: Region, facts: GraphFacts) -> int:
    """Parameters of the absorbed ops (modules' parameters and get_attr tensors,
    BatchNorm statistics excluded)."""
    total = 0
    for node in region.nodes:
        if node.op == "call_module":
            total += sum(t.numel() for name, t in module_tensors(facts.modules[node.target])
                         if counts_as_parameter(name, t))
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and not arg.target.endswith(("running_mean", "running_var")):
                value = facts.constant(arg)
                total += value.numel() if value is not None else 0
    return total


