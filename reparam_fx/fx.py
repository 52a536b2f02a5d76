"""torch.fx frontend: find every exactly-foldable linear region of a graph and write it
back as one conv (or linear).

:mod:`reparam_fx.fx_nodes` says what one node computes; :mod:`reparam_fx.regions` (shared
with the ONNX frontend) walks the graph once, in topological order, and gives each node
it understands a *region*:
``node == term(source)`` where ``term`` is an :mod:`reparam_fx.affine` term and ``source``
an earlier node. A node's region extends the regions of its inputs:

    conv / bn / linear / avgpool / zero-pad / x*c / x+c / x/c / -x:
        region(node) = compose(region(input), op)                (same source)
    sums: a + b - c + ... (add/sub/iadd/add_/torch.add(alpha=k) chains, flattened):
        region(node) = merge(regions of all the terms)          (if they share a source)

An input's region is extended only if that input has no other user (so no value is
computed twice) and is never mutated in place; otherwise the input itself becomes the
source (``identity(input)``). When the algebra declines (``NotExact``), the op starts a
new region at its input, or is left alone, and the reason goes to the report. A sum whose
terms do not all merge is partitioned into mergeable groups (by source; the MAC gate is
judged per group) and rewritten as the merged convs plus the remaining terms.

The rewrite builds a new graph: each region becomes one op where its first op was, as
``nn.ConvNd`` / ``nn.Linear`` modules in module-level and functional graphs, and as
``aten.convolution`` / ``aten.linear`` on ``get_attr`` weights in aten graphs
(``torch.export``). Regions that absorbed fewer than two ops (identities such as eval
Dropout do not count), or whose term has no conv (a pure per-channel affine), are left
as they are. Another pass runs only when a rewrite
left a region's source with a single user that is itself an affine op.

The caller's model is only read: the result is assembled from the new modules and deep
copies of the attributes the final graph still uses.

Channel axes: a conv term acts on axis ``-(spatial + 1)``, a linear on axis ``-1``;
BatchNorm normalises axis 1 and a constant ``(C, 1, 1)`` acts on axis ``-3``. Terms meet
only on the same axis, which needs tensor ranks: they come from shape metadata (aten
graphs, or ``example_inputs``), from ``flatten``/``view`` and BatchNorm2d/3d, and
otherwise a conv's input is taken to be batched (``N, C, *spatial``).
"""

from __future__ import annotations

import copy
import itertools
import operator
import re
from collections import Counter
from dataclasses import replace

import torch
import torch.fx
import torch.nn as nn

from reparam_fx.affine import ConvTerm
from reparam_fx.fx_nodes import GraphFacts, ModuleLookup, Sum, Unary, interpret
from reparam_fx.regions import Region, RegionBuilder, gc_paused, select_rewrites
from reparam_fx.report import (FusedRegion, FusionReport, Skipped, classify_region,
                               counts_as_parameter, node_category, op_counts, parameter_count,
                               shape_values)

MAX_PASSES = 4
aten = torch.ops.aten


class FusionError(ValueError):
    """The model cannot be fused as given; the message says what to do instead."""


# ---- capture -------------------------------------------------------------------------

class Workspace:
    """The graph being rewritten and where its attributes live.

    ``root`` is the caller's module (or a trace of it, sharing its submodules): it is
    only ever read. The pass edits ``graph`` (a private copy) and puts what it creates in
    ``added``; :meth:`build` assembles the result from deep copies of the attributes the
    final graph still uses, so the result shares no state with the caller's model.
    """

    def __init__(self, root: nn.Module, graph: torch.fx.Graph, frontend: str, class_name: str):
        self.root, self.graph, self.frontend, self.class_name = root, graph, frontend, class_name
        self.private = False  # True once ``graph`` is ours to edit (not the caller's)
        self.added: dict[str, object] = {}  # qualified name -> new module or tensor
        self._added_parents: set[str] = set()  # every proper prefix of an added name
        self._modules: dict[str, nn.Module | None] = {}

    def add(self, qualified: str, value) -> None:
        self.added[qualified] = value
        parts = qualified.split(".")
        self._added_parents.update(".".join(parts[:i]) for i in range(1, len(parts)))

    def resolve(self, qualified: str):
        """The module or tensor at ``qualified`` (new attributes first), or None."""
        if qualified in self.added:
            return self.added[qualified]
        head, _, leaf = qualified.rpartition(".")
        owner = self.added.get(head) if head else None
        if owner is not None:
            return getattr(owner, leaf, None)
        obj = self.root
        for part in qualified.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        return obj

    def module(self, target: str) -> nn.Module | None:
        if target not in self._modules:
            found = self.resolve(target)
            self._modules[target] = found if isinstance(found, nn.Module) else None
        return self._modules[target]

    def taken(self, qualified: str) -> bool:
        return qualified in self._added_parents or self.resolve(qualified) is not None

    def make_private(self) -> None:
        if not self.private:
            self.graph, self.private = copy.deepcopy(self.graph), True

    def build(self) -> tuple[torch.fx.GraphModule, dict[str, str]]:
        """The result module and the renaming of attribute paths it applied.

        Attributes get flat names (``stages.0.1.fused`` -> ``stages_0_1_fused``): the
        generated ``forward`` then reaches each module with one attribute lookup instead
        of one per path component, which is measurable on small models."""
        self.make_private()
        memo: dict = {}
        attributes: dict[str, object] = {}
        flat: dict[str, str] = {}
        for node in self.graph.nodes:
            if node.op not in ("call_module", "get_attr"):
                continue
            if node.target not in flat:
                name = base = node.target.replace(".", "_")
                index = 1
                while name in attributes:
                    index += 1
                    name = f"{base}_{index}"
                value = self.resolve(node.target)
                new = node.target in self.added or node.target.rpartition(".")[0] in self.added
                if new:
                    attributes[name] = value.eval() if isinstance(value, nn.Module) else value
                else:  # a copy: the result shares no tensors, hooks or buffers with the input
                    try:
                        attributes[name] = copy.deepcopy(value, memo)
                    except RuntimeError as error:  # e.g. legacy nn.utils.weight_norm
                        raise FusionError(
                            f"cannot copy {node.target} ({type(value).__name__}): "
                            f"{str(error).splitlines()[0]}") from error
                flat[node.target] = name
            node.target = flat[node.target]
        result = torch.fx.GraphModule(attributes, self.graph, self.class_name)
        # An inference graph, so not in training mode; surviving submodules keep their own
        # mode (a BatchNorm left alone because it is in training mode stays so).
        result.training = False
        return result, flat


def _module_tensors(module: nn.Module):
    """``(name, tensor)`` for a module's parameters and buffers; leaves read their own
    dicts (``named_parameters`` walks ``named_modules``, slow over 10k modules)."""
    if module._modules:
        yield from module.named_parameters()
        yield from module.named_buffers()
        return
    for table in (module._parameters, module._buffers):
        for name, tensor in table.items():
            if tensor is not None:
                yield name, tensor


def _capture(model, example_inputs) -> Workspace:
    """A workspace over ``model``: a private graph, the model itself only read."""
    name = f"Fused{type(model).__name__}"
    if isinstance(model, torch.export.ExportedProgram):
        gm = model.module()  # a new module, but its graph may share nodes' meta: copy
        return Workspace(gm, gm.graph, "aten", "FusedExportedProgram")
    if isinstance(model, torch.fx.GraphModule):
        frontend = "aten" if _is_aten_graph(model.graph) else "fx"
        return Workspace(model, model.graph, frontend, name)  # read; rewritten into a copy
    if not isinstance(model, nn.Module):
        raise FusionError(f"fuse() takes an nn.Module, a torch.fx.GraphModule or a "
                          f"torch.export.ExportedProgram, not {type(model).__name__}")
    if model.training:
        raise FusionError(
            f"{type(model).__name__} is in training mode: BatchNorm would use batch "
            "statistics, which cannot be folded. Call model.eval() before fuse().")
    try:
        traced = torch.fx.symbolic_trace(model)  # shares submodules; never written to
        return Workspace(traced, traced.graph, "fx", name)
    except Exception as trace_error:  # noqa: BLE001 - any tracing failure falls back
        if example_inputs is None:
            raise FusionError(
                f"torch.fx.symbolic_trace could not trace {type(model).__name__} "
                f"({type(trace_error).__name__}: {str(trace_error).splitlines()[0][:200]}). "
                "Pass example_inputs=(x,) so fuse() can capture it with torch.export "
                "instead.") from trace_error
    try:
        program = torch.export.export(model, _as_tuple(example_inputs))
    except Exception as export_error:  # noqa: BLE001
        raise FusionError(
            f"neither torch.fx.symbolic_trace nor torch.export could capture "
            f"{type(model).__name__}: {str(export_error).splitlines()[0][:300]}") from export_error
    gm = program.module()
    return Workspace(gm, gm.graph, "aten", name)


def _as_tuple(example_inputs) -> tuple:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def _is_aten_graph(graph: torch.fx.Graph) -> bool:
    return any(isinstance(n.target, torch._ops.OpOverload) for n in graph.nodes)


def _propagate_shapes(ws: Workspace, example_inputs) -> None:
    """Record tensor shapes on the workspace graph (``meta['tensor_meta']``) by running
    it once. Skipped when a BatchNorm is in training mode (running would update its
    statistics)."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
           for m in ws.root.modules()):
        return
    from torch.fx.passes.shape_prop import ShapeProp
    ws.make_private()  # shapes are written onto nodes
    try:
        runner = torch.fx.GraphModule(ws.root, ws.graph)  # shares, does not copy, attributes
        with torch.no_grad():
            ShapeProp(runner).propagate(*(t.clone() if isinstance(t, torch.Tensor) else t
                                          for t in _as_tuple(example_inputs)))  # never mutated
    except Exception:  # noqa: BLE001 - shapes are a hint; fusion works without them
        pass


# ---- writing regions back ------------------------------------------------------------

def _reference_tensor(region: Region, facts: GraphFacts) -> torch.Tensor:
    """A tensor whose dtype/device the new weights take: a floating-point parameter of the
    region; for a region without any (e.g. ``pool(x) - x``), the recorded value of its
    input, else any floating-point parameter or buffer of the model, else the default."""
    for node in region.nodes:
        if node.op == "call_module":
            for _, tensor in _module_tensors(facts.modules[node.target]):
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


def _make_module(term: ConvTerm, like: torch.Tensor) -> nn.Module:
    """An ``nn.ConvNd``/``nn.Linear`` holding the term's weights in ``like``'s dtype/device.

    Large modules are built on the meta device, so no random initialisation is computed
    and thrown away; small ones on the CPU, where that is cheaper than meta dispatch."""
    weight, bias = term.weights_as(like)
    device = "meta" if weight.numel() > _META_INIT_ABOVE else "cpu"
    if term.spatial == 0:
        module = nn.Linear(term.in_channels, term.out_channels, bias=False, device=device)
    else:
        conv_cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[term.spatial - 1]
        module = conv_cls(term.in_channels, term.out_channels, term.kernel, term.stride,
                          term.padding, term.dilation, term.groups, bias=False,
                          padding_mode=term.padding_mode, device=device)
    module.weight = nn.Parameter(weight.contiguous())
    module.bias = None if bias is None else nn.Parameter(bias.contiguous())
    return module.eval()


def _emit(graph: torch.fx.Graph, region: Region, output: torch.fx.Node, source,
          facts: GraphFacts) -> tuple[str, torch.fx.Node]:
    """Append the region's single op (reading ``source``) to ``graph``: an
    ``nn.ConvNd``/``nn.Linear`` module in fx graphs, ``aten.convolution``/``aten.linear``
    on new weights in aten graphs."""
    ws, term = facts.ws, region.term
    like = _reference_tensor(region, facts)
    name = _new_name(region, facts)
    module = _make_module(term, like)
    if ws.frontend == "aten" and term.padding_mode == "zeros":
        ws.add(f"{name}.weight", module.weight)
        w = graph.create_node("get_attr", f"{name}.weight")
        b = None
        if module.bias is not None:
            ws.add(f"{name}.bias", module.bias)
            b = graph.create_node("get_attr", f"{name}.bias")
        if term.spatial == 0:
            target, args = aten.linear.default, (source, w, b)
        else:
            target, args = aten.convolution.default, (
                source, w, b, list(term.stride), list(term.padding), list(term.dilation),
                False, [0] * term.spatial, term.groups)
        new = graph.create_node("call_function", target, args, name=name.replace(".", "_"))
    else:
        ws.add(name, module)
        new = graph.create_node("call_module", name, (source,))
    new.meta.update({k: v for k, v in output.meta.items()
                     if k in ("val", "tensor_meta", "stack_trace")})
    return name, new


def _rewrite(facts: GraphFacts, emit: list, partial_sums: list,
             report: FusionReport) -> torch.fx.Graph:
    """A new graph: the old one with each emitted region replaced by its single op,
    placed where the region's first op was, and each partial sum rebuilt from its merged
    regions and remaining terms. Absorbed ops, and constants only they read, are not
    copied."""
    old = facts.ws.graph
    order = {n: i for i, n in enumerate(old.nodes)}
    dead, starts = set(), {}

    sources = set()  # read by the new ops: never swept away, even if constant

    def schedule(key, output, region):
        dead.update(region.nodes)
        sources.add(region.source)
        first = min(region.nodes, key=order.__getitem__)
        starts.setdefault(first, []).append((key, output, region))

    for output, region in emit:
        schedule(output, output, region)
    roots = {}
    for partial in partial_sums:
        dead.update(partial.inner)
        dead.add(partial.root)
        roots[partial.root] = partial
        for index, (term, _) in enumerate(partial.terms):
            if isinstance(term, Region):
                schedule((partial.root, index), partial.root, term)
    for node in reversed(old.nodes):  # users come later, so they are decided first
        if (node not in dead and node not in sources and node.users
                and all(u in dead for u in node.users)
                and (node.op == "get_attr" or facts.constant(node) is not None)):
            dead.add(node)
    new = torch.fx.Graph()
    new._codegen = copy.deepcopy(old._codegen)
    env: dict = {}
    for node in old.nodes:
        for key, output, region in starts.get(node, ()):
            name, env[key] = _emit(new, region, output, env[region.source], facts)
            report.fused.append(_fused_region(output, name, region, facts))
        if node in roots:
            partial = roots[node]
            values = [(env[(node, i)] if isinstance(term, Region) else env[term], coeff)
                      for i, (term, coeff) in enumerate(partial.terms)]
            env[node] = _emit_sum(new, values, node, facts.ws.frontend)
        elif node not in dead:
            env[node] = new.node_copy(node, env.__getitem__)
    return new


def _emit_sum(graph: torch.fx.Graph, values: list, like: torch.fx.Node, frontend: str):
    """``sum(coeff * value)`` as a chain of add/sub (and mul for other coefficients)."""
    aten_graph = frontend == "aten"
    add, sub, mul = ((aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor) if aten_graph
                     else (operator.add, operator.sub, operator.mul))
    result = None
    for value, coeff in values:
        if result is None:
            result = value if coeff == 1 else graph.call_function(mul, (value, coeff))
        elif coeff in (1, -1):
            result = graph.call_function(add if coeff == 1 else sub, (result, value))
        else:
            result = graph.call_function(add, (result, graph.call_function(mul, (value, coeff))))
    result.meta.update({k: v for k, v in like.meta.items() if k in ("val", "tensor_meta")})
    return result


def _fused_region(output: torch.fx.Node, name: str, region: Region,
                  facts: GraphFacts) -> FusedRegion:
    term = region.term
    return FusedRegion(
        pattern=classify_region(region.kinds, region.kernels, region.branches,
                                region.has_identity, region.has_sub),
        output=output.name, module=name,
        nodes=tuple(n.name for n in region.nodes),
        ops=tuple(sorted(Counter(c for c in (_category(n, facts) for n in region.nodes)
                                 if c).items())),
        params_before=_region_params(region, facts),
        params_after=term.weight.numel() + (0 if term.bias is None else term.bias.numel()))


def _fusion_pass(facts: GraphFacts, report: FusionReport) -> bool:
    """One walk, then one rewrite into a new graph; returns whether another pass may
    find more. ``report.skipped`` is rebuilt each pass: it describes the graph of the
    last pass."""
    report.skipped = []
    builder = RegionBuilder(facts, report)
    builder.walk()
    emit, partial_sums = select_rewrites(facts, builder)
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
        if node is not None and len(node.users) == 1 and node.op.startswith("call_"):
            if isinstance(interpret(node, facts), (Unary, Sum)):
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
            total += sum(t.numel() for name, t in _module_tensors(facts.modules[node.target])
                         if counts_as_parameter(name, t))
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and not arg.target.endswith(("running_mean", "running_var")):
                value = facts.constant(arg)
                total += value.numel() if value is not None else 0
    return total


def fuse(model, example_inputs=None) -> torch.fx.GraphModule:
    """Collapse every exactly-foldable linear region of ``model`` into one conv/linear.

    ``model``: an ``nn.Module`` in eval mode (traced with ``torch.fx.symbolic_trace``;
    if that fails and ``example_inputs`` is given, captured with ``torch.export`` and
    fused at the aten level), a ``torch.fx.GraphModule`` (module-level, functional or
    aten) or a ``torch.export.ExportedProgram``. ``example_inputs`` (a tensor or tuple)
    also gives the pass tensor shapes, which lets it prove ranks for BatchNorm1d and
    broadcast constants.

    Returns a new ``GraphModule`` sharing no state with ``model``, which is never
    modified. ``result.fusion_report`` lists the regions fused (by pattern) and the nodes
    left alone, with reasons.
    """
    with gc_paused():  # collections would traverse the growing graph again and again
        return _fuse(model, example_inputs)


def _fuse(model, example_inputs) -> torch.fx.GraphModule:
    ws = _capture(model, example_inputs)
    if example_inputs is not None and ws.frontend == "fx":
        _propagate_shapes(ws, example_inputs)
    report = FusionReport(frontend=ws.frontend)
    report.ops_before = _graph_op_counts(ws)
    report.params_before = _graph_parameter_count(ws)
    report.nodes_before = _count_ops(ws.graph)
    for _ in range(MAX_PASSES):  # to a fixpoint; one pass usually finds everything
        if not _fusion_pass(GraphFacts(ws), report):
            break
    ws.make_private()
    for node in list(ws.graph.nodes):  # e.g. BatchNorm counters export left unread
        if node.op == "get_attr" and not node.users:
            ws.graph.erase_node(node)
    result, renamed = ws.build()
    result.graph.lint()
    report.fused = [replace(region, module=renamed.get(region.module, region.module.replace(".", "_")))
                    for region in report.fused]
    report.ops_after = op_counts(result)
    report.params_after = parameter_count(result)
    report.nodes_after = _count_ops(result.graph)
    report.skipped = _dedupe(report.skipped + _unfolded_batchnorms(result, report))
    result.fusion_report = report
    return result


def _unfolded_batchnorms(result: torch.fx.GraphModule, report: FusionReport) -> list[Skipped]:
    """Every BatchNorm still in the graph gets a line in the report, if it has none yet."""
    explained = {item.node for item in report.skipped}
    modules = dict(result.named_modules())
    missing = []
    for node in result.graph.nodes:
        if node_category(node, modules) == "batch_norm" and node.name not in explained:
            missing.append(Skipped(node.name, "batch_norm",
                                   "no conv or linear next to it to fold into"))
    return missing


def _graph_op_counts(ws: Workspace) -> Counter:
    lookup = ModuleLookup(ws)
    scalars = shape_values(ws.graph)
    return Counter(c for c in (node_category(n, lookup, scalars) for n in ws.graph.nodes) if c)


def _graph_parameter_count(ws: Workspace) -> int:
    """Parameters the graph uses (as ``parameter_count`` counts them), read in place."""
    seen, total = set(), 0
    for node in ws.graph.nodes:
        if node.op == "call_module":
            tensors = _module_tensors(ws.module(node.target))
        elif node.op == "get_attr":
            value = ws.resolve(node.target)
            tensors = [(node.target, value)] if isinstance(value, torch.Tensor) else []
        else:
            continue
        for name, tensor in tensors:
            if id(tensor) not in seen and counts_as_parameter(name, tensor):
                seen.add(id(tensor))
                total += tensor.numel()
    return total


def _count_ops(graph: torch.fx.Graph) -> int:
    return sum(1 for n in graph.nodes if n.op.startswith("call_"))


def _dedupe(skipped):
    seen, result = set(), []
    for item in skipped:
        if (item.node, item.reason) not in seen:
            seen.add((item.node, item.reason))
            result.append(item)
    return result
