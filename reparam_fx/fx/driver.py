"""The ``fuse`` pipeline: capture, passes to a fixpoint, result, leaves, report.

    capture (capture.py)  ->  passes (rewrite.py, to a fixpoint)  ->  result (Workspace.build)
        ->  leaves fused inside (leaves.py)  ->  report totals

The caller's model is only read; the result is assembled from the new modules and deep
copies of what the final graph still uses.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx
import torch.nn as nn

from reparam_fx.fx.capture import (FusionError, Workspace, as_tuple, export, has_hooks,
                                   is_aten_graph, is_op_module, propagate_shapes, trace,
                                   uninitialised_modules)
from reparam_fx.fx.counts import graph_op_counts, node_category, op_counts, parameter_count
from reparam_fx.fx.facts import GraphFacts, ModuleLookup
from reparam_fx.fx.values import shape_values
from reparam_fx.fx.leaves import fuse_inside, merge_report
from reparam_fx.fx.rewrite import fusion_pass, redirect_reads_after_inplace
from reparam_fx.core.text import first_line
from reparam_fx.core.pipeline import gc_paused, leftover_batchnorms, run_passes
from reparam_fx.core.report import FusionReport, Leaf

CAPTURES = ("auto", "fx", "export")
TARGETS = ("float", "int8")


def fuse(model, example_inputs=None, *, capture: str = "auto", target: str = "float",
         calibration=None) -> nn.Module:
    """Collapse every exactly-foldable linear region of ``model`` into one conv/linear.

    ``model``: an ``nn.Module`` in eval mode, a ``torch.fx.GraphModule`` (module-level,
    functional or aten) or a ``torch.export.ExportedProgram``.

    ``capture`` (for a plain module): ``"auto"`` traces it symbolically, keeping blocks
    whose ``forward`` does not trace as leaves (fused inside on their own); only if the
    model's own ``forward`` does not trace and ``example_inputs`` are given is it captured
    with ``torch.export`` instead. ``"fx"``: symbolic tracing only. ``"export"``:
    ``torch.export`` at ``example_inputs`` (the result then holds for those input sizes).
    ``example_inputs`` (a tensor or tuple) also give the pass tensor shapes, which prove
    ranks where the code does not.

    Returns a new ``GraphModule`` sharing no state with ``model``, which is never
    modified; if the model's own ``forward`` cannot be traced and there are no
    ``example_inputs``, a copy of the model whose traceable blocks are fused.
    ``result.fusion_report`` lists the regions fused (by pattern), the nodes left alone
    and the modules kept whole, with reasons.

    ``target``: ``"float"`` (the default) merges everything exactly foldable. ``"int8"``
    (or an :class:`reparam_fx.int8.policy.Int8Policy` with other settings) then applies
    the int8 policy: exact rewrites that keep merged identity taps out of the convs'
    int8 weight ranges where that pays for its cost; the result is still exact in
    float, and ``result.fusion_report.int8`` says per conv what was done and why.
    ``calibration`` (int8 only): an iterable of model inputs (each a tensor or a tuple);
    the policy then measures each choice's int8 error instead of estimating it.
    """
    if capture not in CAPTURES:
        raise FusionError(f"capture must be one of {', '.join(CAPTURES)}, not {capture!r}")
    policy = _int8_policy(target, calibration)
    if isinstance(model, nn.Module) and not isinstance(model, torch.fx.GraphModule) \
            and model.training:
        raise FusionError(
            f"{type(model).__name__} is in training mode: BatchNorm would use batch "
            "statistics, which cannot be folded. Call model.eval() before fuse().")
    lazy = uninitialised_modules(model) if isinstance(model, nn.Module) else []
    if lazy:
        raise FusionError(
            f"{type(model).__name__} has lazy modules not yet initialised: "
            f"{', '.join(lazy[:3])}{' ...' if len(lazy) > 3 else ''} (a lazy module takes its "
            "shapes from its first input): run the model once on an example input before fuse()")
    with gc_paused():  # collections would traverse the growing graph again and again
        fused = _fuse(model, example_inputs, capture)
    if policy is not None:
        from reparam_fx.int8.policy import apply_int8_policy
        fused = apply_int8_policy(fused, calibration=calibration, policy=policy,
                                  example_inputs=example_inputs)
    return fused


def _int8_policy(target, calibration):
    """The int8 policy ``target`` asks for (None for float), or a clear error."""
    from reparam_fx.int8.policy import Int8Policy
    if isinstance(target, Int8Policy):
        return target
    if not isinstance(target, str) or target not in TARGETS:
        raise FusionError(f"target must be one of {', '.join(map(repr, TARGETS))} or an "
                          f"Int8Policy, not {target!r}")
    if target == "float":
        if calibration is not None:
            raise FusionError("calibration= is for target='int8' only: float fusion needs "
                              "no data")
        return None
    return Int8Policy()


def _fuse(model, example_inputs, capture: str, call: tuple | None = None) -> nn.Module:
    """``call``: how the model is called (``(positional count, keyword names)``); by default,
    with its required arguments, or as many positional ones as ``example_inputs`` holds."""
    if isinstance(model, torch.export.ExportedProgram):
        gm = model.module()  # a new module, but its graph may share nodes' meta: copied later
        return _fuse_workspace(Workspace(gm, gm.graph, "aten", "FusedExportedProgram"), gm)
    if isinstance(model, torch.fx.GraphModule):
        frontend = "aten" if is_aten_graph(model.graph) else "fx"
        return _fuse_workspace(Workspace(model, model.graph, frontend, f"Fused{type(model).__name__}"),
                               model, example_inputs)
    if not isinstance(model, nn.Module):
        raise FusionError(f"fuse() takes an nn.Module, a torch.fx.GraphModule or a "
                          f"torch.export.ExportedProgram, not {type(model).__name__}")
    name = f"Fused{type(model).__name__}"
    if capture == "export":
        if example_inputs is None:
            raise FusionError("capture='export' needs example_inputs=(x,)")
        gm = export(model, example_inputs)
        return _fuse_workspace(Workspace(gm, gm.graph, "aten", name), model)
    if has_hooks(model):  # kept whole like any hooked module: its hooks keep running
        return _fuse_children(model, "it has forward hooks or pre-hooks, which keep running on it",
                              _default_call(example_inputs, call))
    try:
        call = _default_call(example_inputs, call)
        traced, leaves = trace(model, call)
    except Exception as error:  # noqa: BLE001 - the model's own forward does not trace
        reason = f"its own forward does not trace ({first_line(error)})"
        if capture == "auto" and example_inputs is not None:
            try:
                gm = export(model, example_inputs)
            except FusionError as export_error:
                reason += f"; {export_error}"
            else:
                return _fuse_workspace(Workspace(gm, gm.graph, "aten", name), model)
        return _fuse_children(model, reason, call)
    return _fuse_workspace(Workspace(traced, traced.graph, "fx", name, leaves), model,
                           example_inputs)


def _fuse_workspace(ws: Workspace, original: nn.Module, example_inputs=None) -> torch.fx.GraphModule:
    """Fuse the graph of ``ws``, captured from ``original`` (the caller's module, only read)."""
    if example_inputs is not None and ws.frontend == "fx":
        propagate_shapes(ws, example_inputs)
    report = FusionReport(frontend=ws.frontend)
    lookup = ModuleLookup(ws)
    report.ops_before = graph_op_counts(ws.graph, lookup)
    report.params_before = parameter_count(original)
    report.nodes_before = _count_ops(ws.graph)
    leaf_ranks = _leaf_argument_ranks(ws)  # (before the passes: BatchNorms still prove ranks)
    redirect_reads_after_inplace(ws)
    run_passes(lambda: fusion_pass(GraphFacts(ws), report))
    ws.make_private()
    scalars = shape_values(ws.graph)
    for node in reversed(ws.graph.nodes):  # e.g. BatchNorm counters export left unread,
        if not node.users and (node.op == "get_attr" or (  # x.ndim read for a message
                node in scalars and node.target is getattr)):
            ws.graph.erase_node(node)
    result, renamed = ws.build()
    result.graph.lint()
    report.fused = [replace(region, module=renamed.get(region.module, region.module.replace(".", "_")))
                    for region in report.fused]
    report.nodes_after = _count_ops(result.graph)
    leaves = {renamed.get(leaf.module, leaf.module): leaf for leaf in ws.leaves}
    report.skipped = _dedupe(report.skipped)
    _unfolded_batchnorms(result, report, leaves)
    _fuse_leaves(result, ws, renamed, report, leaf_ranks)
    report.ops_after = op_counts(result)
    report.params_after = parameter_count(result)
    result.fusion_report = report
    return result


def _leaf_argument_ranks(ws: Workspace) -> dict[str, dict[int, int]]:
    """``{leaf: {position: rank}}`` for the arguments of kept-whole modules that are lists of
    tensors all of one rank the graph proves (a detection head's list of feature maps)."""
    kept = {leaf.module for leaf in ws.leaves}
    nodes = [n for n in ws.graph.nodes if n.op == "call_module" and n.target in kept]
    if not nodes:
        return {}
    facts = GraphFacts(ws)
    calls: dict[str, list[dict[int, int | None]]] = {}
    for node in nodes:
        ranks = {}
        for position, argument in enumerate(node.args):
            if isinstance(argument, torch.fx.Node) and argument.target is list and argument.args:
                argument = argument.args[0]  # (the fresh list the tracer hands a kept module)
            if isinstance(argument, (list, tuple)) and argument and \
                    all(isinstance(a, torch.fx.Node) for a in argument):
                found = {facts.rank(a) for a in argument}
                ranks[position] = found.pop() if len(found) == 1 else None
        calls.setdefault(node.target, []).append(ranks)
    # a proof holds for a module only if every call of it proves the same rank
    return {target: {position: rank for position, rank in each[0].items()
                     if rank is not None and all(other.get(position) == rank for other in each)}
            for target, each in calls.items()}


def _fuse_leaves(result: torch.fx.GraphModule, ws: Workspace, renamed: dict,
                 report: FusionReport, leaf_ranks: dict) -> None:
    """Fuse inside every module the result keeps whole (its private copies): the children
    of one that does not trace, has hooks or is TorchScript; a leaf of a graph the caller
    traced with a custom tracer (timm's FX helpers keep blocks whole) as a whole."""
    reasons = {renamed.get(leaf.module, leaf.module): leaf for leaf in ws.leaves}
    done = set()
    for node in result.graph.nodes:
        if node.op != "call_module":
            continue
        module = result.get_submodule(node.target)
        if id(module) in done or is_op_module(module):
            continue
        done.add(id(module))
        leaf = reasons.get(node.target)
        if leaf is not None:  # it does not trace, has hooks, or is TorchScript
            report.leaves.append(leaf)
            ranks = {renamed.get(name, name): value for name, value in leaf_ranks.items()}
            fuse_inside(module, leaf.module, _fuse_child, report, _call_of(node),
                        argument_ranks=ranks.get(node.target))
            continue
        if not any(True for _ in module.children()):
            continue  # nothing inside to fuse: a custom op of the graph it came in
        # a leaf of the graph it came in (a custom tracer's): fused as a whole
        report.leaves.append(Leaf(node.target, "kept whole by the graph it came in"))
        fused, inner = _fuse_child(module, _call_of(node))
        merge_report(report, inner, node.target)
        if fused is not None:
            setattr(result, node.target, fused)


def _call_of(node: torch.fx.Node) -> tuple:
    """How a graph calls a module: ``(positional count, keyword names, arguments that are
    None)``."""
    nones = {k for k, a in enumerate(node.args) if a is None} | {
        k for k, a in node.kwargs.items() if a is None}
    return len(node.args), frozenset(node.kwargs), frozenset(nones)


def _fuse_child(child: nn.Module, call=None):
    """A child of a leaf, fused on its own: ``(fused module or None, report)``. ``call``
    (``(positional count, keywords)``) is how its parent calls it: the arguments it does not
    pass are bound to their defaults (the parent's code never passes them)."""
    try:
        fused = _fuse(child, None, "fx", call)
    except FusionError as error:
        return None, FusionReport(leaves=[Leaf("", f"not fused: {error}")])
    report = fused.fusion_report
    return (fused if report.fused else None), report


def _default_call(example_inputs, call):
    """How the model is called: as given, else with as many positional arguments as
    ``example_inputs`` holds (none: its required ones only)."""
    if call is not None:
        return call
    return (len(as_tuple(example_inputs)) if example_inputs is not None else 0, frozenset())


def _fuse_children(model: nn.Module, reason: str, call=None) -> nn.Module:
    """A copy of ``model`` (whose own forward does not trace) with its children fused;
    ``call``: how it is called."""
    result = _private_copy(model)
    report = FusionReport(frontend="fx", leaves=[Leaf("", reason)])
    report.ops_before, report.params_before = op_counts(model), parameter_count(model)
    fuse_inside(result, "", _fuse_child, report, call)
    report.ops_after, report.params_after = op_counts(result), parameter_count(result)
    result.fusion_report = report
    return result


def _private_copy(model: nn.Module) -> nn.Module:
    import copy
    try:
        return copy.deepcopy(model)
    except RuntimeError as error:  # e.g. legacy nn.utils.weight_norm
        raise FusionError(f"cannot copy {type(model).__name__}: "
                          f"{str(error).splitlines()[0]}") from error


def _unfolded_batchnorms(result: torch.fx.GraphModule, report: FusionReport,
                         leaves: dict[str, Leaf]) -> None:
    """Every BatchNorm still in the graph gets a line in the report, if it has none yet:
    the block kept whole its input comes from, or the reshape that ended its region."""
    modules = dict(result.named_modules())
    nodes = {node.name: node for node in result.graph.nodes
             if node_category(node, modules) == "batch_norm"}

    def reason_of(name: str) -> str | None:
        source = nodes[name].args[0] if nodes[name].args else None
        leaf = leaves.get(source.target) if isinstance(source, torch.fx.Node) and \
            source.op == "call_module" else None
        refused = _refused_move_before(source, report.move_refusals)
        return (f"its input comes from {leaf.module}, kept whole: {leaf.reason}" if leaf
                else f"the reshape before it ({refused[0]}): {refused[1]}" if refused else None)
    leftover_batchnorms(report, ((name, "batch_norm") for name in nodes), reason_of)


def _refused_move_before(node, refusals: dict, steps: int = 4):
    """``(name, reason)`` of a move just before ``node`` (through single-input ops) that
    ended the region of the linear or conv before it, or None."""
    for _ in range(steps):
        if not isinstance(node, torch.fx.Node):
            return None
        if node.name in refusals:
            return node.name, refusals[node.name]
        node = node.args[0] if node.args else None
    return None


def _count_ops(graph: torch.fx.Graph) -> int:
    return sum(1 for n in graph.nodes if n.op.startswith("call_"))


def _dedupe(skipped):
    seen, result = set(), []
    for item in skipped:
        if (item.node, item.reason) not in seen:
            seen.add((item.node, item.reason))
            result.append(item)
    return result
