"""Leaves: fusing inside the modules a graph keeps whole.

A module stays one ``call_module`` node (a *leaf*) when its ``forward`` does not trace,
when it has hooks, or when the graph came that way (a ``GraphModule`` traced with custom
leaves). The rest of the graph fuses around it, and its children are fused on their own:
in the result's private copy of the leaf, each child that fuses is replaced by its fused
``GraphModule``. The same happens to a model whose own ``forward`` does not trace.

Replacing a child is safe only if the leaf's code uses it as a function. So the leaf's
class source is read (``ast``), from ``forward`` and the methods and properties it reaches
through ``self``: a child may be replaced when every use is a call (``self.conv(x)``,
``self.attn.forward(x)``, ``self.blocks[i](x)``, ``for blk in self.blocks: x = blk(x)``), a
``len``, a truth test, a comparison with ``None`` or a read of one of its *plain
attributes*, and every call passes the same arguments (the child is traced with the others
at their defaults: ``forward(x, scale=None)`` called as ``self.block(x)`` is traced with
``scale=None``).

A plain attribute (``self.attn.resolution``, ``self.attn.num_heads``, ``self.conv.stride[0]``,
``self.attn.training``, ``getattr(self.attn, "key_dim")``) is a number, string, ``None`` or a
tuple of those, held by the child object itself (not a parameter, buffer, submodule,
method or property) and assigned by its class in ``__init__`` only (or, ``training``, by
``train()``): a hyperparameter, which no parameter of the child changes. The fused child is
given the same value (copied onto it when it lacks one) and is put in place only if it then
reads the same; otherwise the child stays. Anything else (``self.conv.weight``,
``self.attn.qkv``, ``self.attn.some_method(x)``, ``isinstance(self.attn, ...)``,
``getattr(self.proj, name)``, ``fn(self.attn)``, keeping it in a variable, calls with
different arguments) leaves that child's subtree as it is, with a reason. The replacement
carries the child's plain attributes. TorchScript modules are never changed.
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


def fuse_inside(module: nn.Module, path: str, fuse_child: Callable, report: FusionReport,
                calls: set | None = None) -> None:
    """Fuse the children of ``module`` (a private copy, changed in place) with
    ``fuse_child(child, call) -> (fused GraphModule | None, its report)``, adding what
    happened to ``report``. ``call`` is how the parent calls the child: ``(positional
    count, keywords)``; the child is traced with its other arguments at their defaults."""
    if isinstance(module, torch.jit.ScriptModule):
        return
    if calls is None:
        blocked, calls, reads = _children_uses(module)
    else:  # the items of a container: called the way the container's owner calls them
        blocked, calls, reads = {}, {name: calls for name in module._modules}, {}
    for name, child in list(module.named_children()):
        where = f"{path}.{name}" if path else name
        if name in blocked:
            report.leaves.append(Leaf(where, f"left as it is: {blocked[name]}"))
            continue
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):  # no forward: item by item
            fuse_inside(child, where, fuse_child, report, calls.get(name, set()))
            continue
        if is_op_module(child) or not calls.get(name):
            continue  # (never called by the leaf's code: nothing to gain)
        if len(calls[name]) != 1 or None in calls[name]:
            report.leaves.append(Leaf(where, "left as it is: its parent calls it with "
                                             "different or unknown arguments"))
            continue
        fused, child_report = fuse_child(child, next(iter(calls[name])))
        if fused is not None:
            _carry_plain_attributes(child, fused, reads.get(name, ()))
            lost = [a for a in sorted(reads.get(name, ())) if not _reads_the_same(child, fused, a)]
            if lost:
                report.leaves.append(Leaf(where, f"left as it is: {type(module).__name__} reads "
                                                 f"self.{name}.{lost[0]}, which its fused form "
                                                 "would not give"))
                continue
        if child_report is not None:
            merge_report(report, child_report, where)
        if fused is not None:
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


def _carry_plain_attributes(original: nn.Module, fused: nn.Module, read=()) -> None:
    """Copy ``original``'s plain attributes onto ``fused`` where it has none of that name:
    those it holds itself, and the ones in ``read`` (its parent reads them) wherever
    they are defined (a class-level constant too)."""
    carried = {key: value for key, value in vars(original).items()
               if not key.startswith("_") and key != "training" and not hasattr(fused, key)
               and _is_plain(value)}
    carried.update({key: inspect.getattr_static(original, key) for key in read
                    if not hasattr(fused, key)})
    for key, value in carried.items():
        setattr(fused, key, value)
    # ``copy.deepcopy`` of a GraphModule rebuilds it from its graph: it keeps only the
    # attributes named in its meta (``torch.fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY``)
    key = getattr(torch.fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", None)
    if carried and key is not None and isinstance(fused, torch.fx.GraphModule):
        fused.meta.setdefault(key, {}).update(carried)


def _is_plain(value) -> bool:
    """A number, string, bool, None, or a tuple of those (nested too): an immutable value
    that cannot hold or alias a tensor."""
    return isinstance(value, _PLAIN) or (isinstance(value, tuple)
                                         and all(_is_plain(v) for v in value))


def _reads_the_same(original: nn.Module, fused: nn.Module, name: str) -> bool:
    before, after = getattr(original, name), getattr(fused, name, _MISSING)
    return type(before) is type(after) and before == after


_MISSING = object()


# ---- how a module's own code uses its children ---------------------------------------

def _children_uses(module: nn.Module) -> tuple[dict[str, str], dict[str, set], dict[str, set]]:
    """``(blocked, calls, reads)``: ``{child: reason}`` for the children ``module``'s code
    uses other than as functions (they must stay the objects they are), ``{child: {call
    shape}}`` for the others, a shape being ``(positional count, keywords)`` of a call, or
    None for a call with ``*args`` / ``**kwargs``, and ``{child: {attribute}}`` for the
    plain attributes read of them (:func:`_plain_attribute`)."""
    names = set(module._modules)
    if not names:
        return {}, {}, {}
    methods = _reachable_methods(type(module))
    if methods is None:
        return {name: "the source code of its parent is not available" for name in names}, {}, {}
    blocked: dict[str, str] = {}
    calls: dict[str, set] = {name: set() for name in names}
    reads: dict[str, set] = {name: set() for name in names}
    for method in methods:
        parents = {child: node for node in ast.walk(method) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(method):
            if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "self" and node.attr in names
                    and isinstance(node.ctx, ast.Load)):
                continue
            found = _calls_of(node, parents)
            if found is not None:
                calls[node.attr].update(_shape(call) for call in found)
                continue
            attribute = _attribute_read(node, parents)
            child = module._modules[node.attr]
            if attribute is not None and _plain_attribute(child, attribute):
                reads[node.attr].add(attribute)
                continue
            what = f" (self.{node.attr}.{attribute} is no plain attribute)" \
                if attribute is not None else ""
            blocked.setdefault(node.attr, f"{type(module).__name__}.{method.name} reads "
                                          f"self.{node.attr} as an object{what}, not only by "
                                          "calling it")
    return blocked, calls, reads


def _attribute_read(expr: ast.expr, parents: dict) -> str | None:
    """``name`` if this use of ``self.<child>`` reads ``self.<child>.name`` (or
    ``getattr(self.<child>, "name")``, a literal name), else None."""
    parent = parents.get(expr)
    if isinstance(parent, ast.Attribute) and parent.value is expr and isinstance(parent.ctx, ast.Load):
        return parent.attr
    if isinstance(parent, ast.Call) and isinstance(parent.func, ast.Name) and \
            parent.func.id == "getattr" and len(parent.args) == 2 and not parent.keywords and \
            parent.args[0] is expr and isinstance(parent.args[1], ast.Constant) and \
            isinstance(parent.args[1].value, str):
        return parent.args[1].value
    return None


def _plain_attribute(child: nn.Module, name: str) -> bool:
    """Whether ``child.name`` is a hyperparameter: a plain value (:func:`_is_plain`) found
    on the object or its class without running any code (not a parameter, buffer or
    submodule, which live in ``_parameters``/``_buffers``/``_modules``; not a property or a
    method), that its class's code assigns in ``__init__`` only. ``training`` is one."""
    if name == "training":
        return True
    if name.startswith("__") or isinstance(child, torch.jit.ScriptModule):
        return False
    try:
        value = inspect.getattr_static(child, name)
    except AttributeError:
        return False
    return _is_plain(value) and not _assigned_after_init(type(child), name)


def _class_trees(cls: type) -> list | None:
    """The parsed source of ``cls`` and of its non-torch bases; None when a source is not
    available."""
    trees = []
    for klass in cls.__mro__:
        if klass is object or klass.__module__.startswith("torch."):
            continue
        try:
            trees.append(ast.parse(textwrap.dedent(inspect.getsource(klass))))
        except (OSError, TypeError, SyntaxError, IndentationError):
            return None
    return trees


def _assigned_after_init(cls: type, name: str) -> bool:
    """Whether a method of ``cls`` (or of its non-torch bases) other than ``__init__``
    assigns or deletes ``self.<name>`` (state, not a hyperparameter); True when a source
    is not available."""
    trees = _class_trees(cls)
    if trees is None:
        return True
    for tree in trees:
        for method in ast.walk(tree):
            if not isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef)) or \
                    method.name == "__init__":
                continue
            for node in ast.walk(method):
                if isinstance(node, ast.Attribute) and node.attr == name and \
                        isinstance(node.ctx, (ast.Store, ast.Del)) and \
                        isinstance(node.value, ast.Name) and node.value.id == "self":
                    return True
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                        node.func.id in ("setattr", "delattr") and len(node.args) >= 2 and \
                        isinstance(node.args[1], ast.Constant) and node.args[1].value == name:
                    return True
    return False


def _shape(call: ast.Call):
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return None
    return len(call.args), frozenset(k.arg for k in call.keywords)


def _reachable_methods(cls: type) -> list[ast.FunctionDef] | None:
    """``forward`` and the methods and properties it reaches through ``self`` (called or
    not: ``f = self._head`` counts), over the class and its non-torch bases; None when a
    source is not available."""
    definitions: dict[str, list[ast.FunctionDef]] = {}
    trees = _class_trees(cls)
    if trees is None:
        return None
    for tree in trees:
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
                if isinstance(node, ast.Attribute) and node.attr in definitions and (
                        (isinstance(node.value, ast.Name) and node.value.id == "self")
                        or isinstance(node.value, ast.Call)):  # self.f, super().f
                    todo.append(node.attr)
    return reachable


def _calls_of(expr: ast.expr, parents: dict) -> list[ast.Call] | None:
    """The calls this use of ``self.<child>`` makes of it (or of its items) if it only
    calls it, counts it, tests it or iterates it to call its items; None otherwise."""
    parent = parents.get(expr)
    if isinstance(parent, ast.Attribute) and parent.value is expr and \
            parent.attr in ("forward", "__call__"):  # self.attn.forward(x)
        call = parents.get(parent)
        return [call] if isinstance(call, ast.Call) and call.func is parent else None
    if isinstance(parent, ast.Call):
        if parent.func is expr:
            return [parent]
        if isinstance(parent.func, ast.Name) and parent.func.id == "len":
            return []
        if isinstance(parent.func, ast.Name) and parent.func.id in _ITERATING:
            return _loop_calls(parent, parents)
        return None
    if isinstance(parent, ast.Subscript) and parent.value is expr:
        return _calls_of(parent, parents)  # self.blocks[i](x)
    if isinstance(parent, ast.Compare):
        others = [parent.left, *parent.comparators]
        fine = all(isinstance(op, (ast.Is, ast.IsNot)) for op in parent.ops) and all(
            other is expr or (isinstance(other, ast.Constant) and other.value is None)
            for other in others)
        return [] if fine else None
    if isinstance(parent, (ast.If, ast.IfExp, ast.While, ast.Assert)) and parent.test is expr:
        return []
    if isinstance(parent, ast.BoolOp) or (isinstance(parent, ast.UnaryOp)
                                          and isinstance(parent.op, ast.Not)):
        return []
    if isinstance(parent, (ast.For, ast.comprehension)) and parent.iter is expr:
        return _loop_calls(expr, parents)
    return None


def _loop_calls(iterable: ast.expr, parents: dict) -> list[ast.Call] | None:
    """``for blk in <iterable>: ... blk(x)``: the calls of the loop's names, if they are
    only called (or are loop counters from ``enumerate``)."""
    loop = parents.get(iterable)
    while isinstance(loop, ast.Call):  # enumerate(zip(...)) and the like
        iterable, loop = loop, parents.get(loop)
    if not isinstance(loop, (ast.For, ast.comprehension)) or loop.iter is not iterable:
        return None
    bound = {n.id for n in ast.walk(loop.target) if isinstance(n, ast.Name)}
    scope = loop if isinstance(loop, ast.For) else parents.get(loop)
    uses = [n for n in ast.walk(scope) if isinstance(n, ast.Name) and n.id in bound
            and isinstance(n.ctx, ast.Load)]
    scope_parents = {child: node for node in ast.walk(scope) for child in ast.iter_child_nodes(node)}
    found = []
    for use in uses:
        parent = scope_parents.get(use)
        if isinstance(parent, ast.Call) and parent.func is use:
            found.append(parent)
        elif not (isinstance(parent, (ast.BinOp, ast.Compare, ast.Subscript))
                  and getattr(parent, "value", None) is not use):  # a counter used as a number
            return None
    return found
