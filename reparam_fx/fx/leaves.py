"""Leaves: fusing inside the modules a graph keeps whole.

A module stays one ``call_module`` node (a *leaf*) when its ``forward`` does not trace,
when it has hooks, or when the graph came that way (a ``GraphModule`` traced with custom
leaves). The rest of the graph fuses around it, and its children are fused on their own:
in the result's private copy of the leaf, each child that fuses is replaced by its fused
``GraphModule``. The same happens to a model whose own ``forward`` does not trace.

Replacing a child is safe only if the leaf's code uses it as a function. So the leaf's
class source is read (``ast``), from ``forward`` and the methods it calls: a child may be
replaced when every use is a call (``self.conv(x)``, ``self.blocks[i](x)``,
``for blk in self.blocks: x = blk(x)``), a ``len``, a truth test or a comparison with
``None``. Anything else (``self.conv.weight``, ``isinstance(self.attn, ...)``,
``getattr(self.proj, ...)``, keeping it in a variable) leaves that child's subtree as it
is, with a reason. The replacement carries the child's plain attributes (numbers,
strings, tuples: hyperparameters a parent may read). TorchScript modules are never
changed.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Callable

import torch
import torch.nn as nn

from reparam_fx.fx.capture import is_op_module
from reparam_fx.report import FusionReport, Leaf

_PLAIN = (int, float, str, bool, type(None))
_ITERATING = {"enumerate", "zip", "reversed", "list", "tuple", "iter"}


def fuse_inside(module: nn.Module, path: str, fuse_child: Callable, report: FusionReport) -> None:
    """Fuse the children of ``module`` (a private copy, changed in place) with
    ``fuse_child(child) -> (fused GraphModule | None, its report)``, adding what happened
    to ``report``."""
    if isinstance(module, torch.jit.ScriptModule):
        return
    blocked = _children_read_as_objects(module)
    for name, child in list(module.named_children()):
        where = f"{path}.{name}" if path else name
        if name in blocked:
            report.leaves.append(Leaf(where, f"left as it is: {blocked[name]}"))
            continue
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            fuse_inside(child, where, fuse_child, report)  # no forward: its items one by one
            continue
        if is_op_module(child):
            continue
        fused, child_report = fuse_child(child)
        if child_report is not None:
            merge_report(report, child_report, where)
        if fused is not None:
            _carry_plain_attributes(child, fused)
            setattr(module, name, fused)


def merge_report(report: FusionReport, inner: FusionReport, path: str) -> None:
    """Add a child's report to its parent's, names prefixed with the child's path."""
    from dataclasses import replace
    report.fused += [replace(region, module=f"{path}.{region.module}",
                             output=f"{path}:{region.output}",
                             nodes=tuple(f"{path}:{n}" for n in region.nodes))
                     for region in inner.fused]
    report.skipped += [replace(item, node=f"{path}:{item.node}") for item in inner.skipped]
    report.leaves += [Leaf(f"{path}.{leaf.module}" if leaf.module else path, leaf.reason)
                      for leaf in inner.leaves]
    if inner.fused:
        report.nodes_before += inner.nodes_before
        report.nodes_after += inner.nodes_after


def _carry_plain_attributes(original: nn.Module, fused: nn.Module) -> None:
    for key, value in vars(original).items():
        if key.startswith("_") or key == "training" or hasattr(fused, key):
            continue
        if isinstance(value, _PLAIN) or (isinstance(value, tuple)
                                         and all(isinstance(v, _PLAIN) for v in value)):
            setattr(fused, key, value)


# ---- how a module's own code uses its children ---------------------------------------

def _children_read_as_objects(module: nn.Module) -> dict[str, str]:
    """``{child name: reason}`` for the children that ``module``'s code uses other than by
    calling them (those must stay the objects they are)."""
    names = set(module._modules)
    if not names:
        return {}
    methods = _reachable_methods(type(module))
    if methods is None:
        return {name: "the source code of its parent is not available" for name in names}
    blocked: dict[str, str] = {}
    for method in methods:
        parents = {child: node for node in ast.walk(method) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(method):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "self" and node.attr in names
                    and isinstance(node.ctx, ast.Load) and not _used_as_function(node, parents)):
                blocked.setdefault(node.attr, f"{type(module).__name__}.{method.name} reads "
                                              f"self.{node.attr} as an object, not only by "
                                              "calling it")
    return blocked


def _reachable_methods(cls: type) -> list[ast.FunctionDef] | None:
    """``forward`` and the methods it calls on ``self``, over the class and its non-torch
    bases; None when a source is not available."""
    definitions: dict[str, list[ast.FunctionDef]] = {}
    for klass in cls.__mro__:
        if klass is object or klass.__module__.startswith("torch."):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError, IndentationError):
            return None
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for item in body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                definitions.setdefault(item.name, []).append(item)
    reachable, todo = [], ["forward"]
    seen = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for method in definitions.get(name, ()):
            reachable.append(method)
            for node in ast.walk(method):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
                        (isinstance(node.func.value, ast.Name) and node.func.value.id == "self")
                        or isinstance(node.func.value, ast.Call)):  # self.f(), super().f()
                    todo.append(node.func.attr)
    return reachable


def _used_as_function(expr: ast.expr, parents: dict) -> bool:
    """Whether this use of ``self.<child>`` only calls it, counts it, tests it or iterates
    it to call its items."""
    parent = parents.get(expr)
    if isinstance(parent, ast.Call):
        if parent.func is expr:
            return True
        if isinstance(parent.func, ast.Name) and parent.func.id == "len":
            return True
        if isinstance(parent.func, ast.Name) and parent.func.id in _ITERATING:
            return _iterated_to_call(parent, parents)
        return False
    if isinstance(parent, ast.Subscript) and parent.value is expr:
        return _used_as_function(parent, parents)  # self.blocks[i](x)
    if isinstance(parent, ast.Compare):
        others = [parent.left, *parent.comparators]
        return all(isinstance(op, (ast.Is, ast.IsNot)) for op in parent.ops) and all(
            other is expr or (isinstance(other, ast.Constant) and other.value is None)
            for other in others)
    if isinstance(parent, (ast.If, ast.IfExp, ast.While, ast.Assert)) and parent.test is expr:
        return True
    if isinstance(parent, ast.BoolOp) or (isinstance(parent, ast.UnaryOp)
                                          and isinstance(parent.op, ast.Not)):
        return True
    if isinstance(parent, (ast.For, ast.comprehension)) and parent.iter is expr:
        return _iterated_to_call(expr, parents)
    return False


def _iterated_to_call(iterable: ast.expr, parents: dict) -> bool:
    """``for blk in <iterable>: ... blk(x)``: the loop's names are only called (or are
    loop counters from ``enumerate``)."""
    loop = parents.get(iterable)
    while isinstance(loop, ast.Call):  # enumerate(zip(...)) and the like
        iterable, loop = loop, parents.get(loop)
    if not isinstance(loop, (ast.For, ast.comprehension)) or loop.iter is not iterable:
        return False
    bound = {n.id for n in ast.walk(loop.target) if isinstance(n, ast.Name)}
    scope = loop if isinstance(loop, ast.For) else parents.get(loop)
    uses = [n for n in ast.walk(scope) if isinstance(n, ast.Name) and n.id in bound
            and isinstance(n.ctx, ast.Load)]
    scope_parents = {child: node for node in ast.walk(scope) for child in ast.iter_child_nodes(node)}
    for use in uses:
        parent = scope_parents.get(use)
        called = isinstance(parent, ast.Call) and parent.func is use
        as_number = isinstance(parent, (ast.BinOp, ast.Compare, ast.Subscript)) and \
            getattr(parent, "value", None) is not use
        if not (called or as_number):
            return False
    return True
