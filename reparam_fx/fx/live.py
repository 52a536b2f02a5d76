"""Which code of a method can run: dead branches from parameters of known falsy value.

A parameter with a falsy constant default (``profile=False``, ``visualize=None``), never
assigned in its method, is *known* when no call that can run passes it a value (or passes a
known one on): every call leaves it at its default. ``if profile:``, ``if visualize and
...:`` bodies and ``if not profile:`` else-branches are then dead, and so is code only they
reach. ``*args`` / ``**kwargs`` are known empty when no call passes anything into them.
Used by :mod:`reparam_fx.fx.uses` to read only the live code of a kept-whole module.
"""

from __future__ import annotations

import ast


def falsy_constant(value) -> bool:
    return value is None or value is False or (type(value) in (int, float, str) and not value)


def falsy_defaults(function: ast.FunctionDef) -> set:
    """The parameters of ``function`` with a falsy constant default that its body never
    assigns, and its ``*args`` / ``**kwargs`` (as ``*name`` / ``**name``: empty unless
    passed)."""
    args = function.args
    positional = args.posonlyargs + args.args
    defaults = dict(zip([a.arg for a in positional[len(positional) - len(args.defaults):]],
                        args.defaults))
    defaults.update({a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults) if d})
    assigned = {n.id for n in ast.walk(function) if isinstance(n, ast.Name)
                and isinstance(n.ctx, (ast.Store, ast.Del))}
    found = {arg for arg, default in defaults.items() if isinstance(default, ast.Constant)
             and arg not in assigned and falsy_constant(default.value)}
    if args.vararg:
        found.add("*" + args.vararg.arg)
    if args.kwarg:
        found.add("**" + args.kwarg.arg)
    return found


def passed_parameters(callee: ast.FunctionDef, call: ast.Call, caller_known: set) -> set:
    """The parameters of ``callee`` this call may pass a value (not known falsy) to."""
    arguments = callee.args
    positional = [a.arg for a in (arguments.posonlyargs + arguments.args)[1:]]
    everything = set(positional) | {a.arg for a in arguments.kwonlyargs} | {
        "*" + arguments.vararg.arg if arguments.vararg else "", "**" + arguments.kwarg.arg
        if arguments.kwarg else ""}
    passed: set = set()
    index = 0
    for argument in call.args:
        if isinstance(argument, ast.Starred):
            if isinstance(argument.value, ast.Name) and "*" + argument.value.id in caller_known:
                continue  # an empty *args passes nothing
            return everything
        if not known_falsy(argument, caller_known):
            passed.add(positional[index] if index < len(positional)
                       else "*" + (arguments.vararg.arg if arguments.vararg else ""))
        index += 1
    for keyword in call.keywords:
        if keyword.arg is None:
            if isinstance(keyword.value, ast.Name) and "**" + keyword.value.id in caller_known:
                continue
            return everything
        if not known_falsy(keyword.value, caller_known):
            passed.add(keyword.arg if keyword.arg in everything
                       else "**" + (arguments.kwarg.arg if arguments.kwarg else ""))
    return passed


def live_nodes(function: ast.FunctionDef, known: set):
    """The nodes of ``function`` that may run when the parameters in ``known`` are falsy:
    ``if p:`` / ``if p and q:`` bodies and ``if not p:`` else-branches are skipped."""
    todo = [function]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and known:
            dead = _dead_when(node.test, known)
            children = [node.test] + (node.orelse if dead == "body" else
                                      node.body if dead == "orelse" else node.body + node.orelse)
            todo.extend(reversed(children))
            continue
        todo.extend(reversed(list(ast.iter_child_nodes(node))))


def _dead_when(test: ast.expr, known: set) -> str | None:
    if known_falsy(test, known):
        return "body"
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And) and \
            any(known_falsy(value, known) for value in test.values):
        return "body"
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not) and \
            known_falsy(test.operand, known):
        return "orelse"
    return None


def known_falsy(expr: ast.expr, known: set) -> bool:
    return (isinstance(expr, ast.Name) and expr.id in known) or (
        isinstance(expr, ast.Constant) and falsy_constant(expr.value))
