"""How a module's own code uses its children: may a child be replaced by its fused form?

A module kept whole (its ``forward`` does not trace) is fused inside by replacing children
(:mod:`reparam_fx.fx.leaves`). That is exact only if the module's code uses each replaced
child as a function. This module reads the class source (``ast``) of the module and its
non-torch bases, from ``forward`` and the methods and properties it reaches through
``self``, and tells, per child, how it is used:

* called: ``self.conv(x)``, ``self.attn.forward(x)``, and the call's shape (positional
  count, keywords), or None for ``*args`` / ``**kwargs``;
* its *items* called (a container): ``self.blocks[i](x)``, ``for m in self.model: x = m(x)``,
  ``head = self.model[-1]; head(x)``, ``for i, blk in enumerate(self.blocks)``;
* counted, tested for truth or against ``None``;
* a *plain attribute* read of it or of its items (``m.f``, ``m.i``, ``self.attn.num_heads``,
  ``getattr(self.attn, "key_dim")``): a hyperparameter its fused form is given;
* tested with ``isinstance`` (of it or of its items): a fused form may replace it only if the
  test gives the same answer for both;
* handed out by a property and passed on by name: ``dict(box_head=self.cv2, ...)`` returned
  by ``one2many``, called as ``self.forward_head(x, **self.one2many)``, whose parameter
  ``box_head`` is then only indexed and called (ultralytics ``Detect``).

Any other use (passing it to a function, storing it, reading its parameters or methods)
*blocks* it: it stays the object it is, with the reason.

Code that cannot run is not read. A parameter whose value is known (the caller does not
pass it: its default, and what every call in the class passes on for it) and falsy makes
``if profile:`` and ``if visualize and ...:`` dead; their bodies (``thop.profile(m, ...)``,
``self._profile_one_layer(m, x, dt)``) are skipped, and so are methods only they reach
(:mod:`reparam_fx.fx.live`).

*Chains* are children called one after another, each one's result the next one's only
input: ``self.m[i](self.ia[i](x[i]))`` then ``x[i] = self.im[i](x[i])`` (YOLOv7's
``IDetect``), or ``x = self.conv(x)`` then ``x = self.bn(x)``. A chain whose members are used
nowhere else may be fused as one function (a conv with the implicit add and multiply
folded in), the others replaced by identities.

Length: about 710 lines, one reader. Definitions, calls, items, chains, properties and
dead code are walked over the same syntax tree with the same name bindings; split, each
part would need the others' bindings.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import sys
import textwrap
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from reparam_fx.fx.live import falsy_defaults, live_nodes, passed_parameters

_ITERATING = {"enumerate", "zip", "reversed", "list", "tuple", "iter"}
_PLAIN = (int, float, str, bool, type(None))


@dataclass
class ChildUse:
    """How the parent's code uses one child (module docstring). ``calls``, ``reads`` and
    ``classes`` are of the child itself; ``item_*`` of its items (a container's)."""

    calls: set = field(default_factory=set)
    reads: set = field(default_factory=set)
    classes: list = field(default_factory=list)
    # of its items: ``[(which, value)]``, ``which`` an index or a slice of the items
    # (``self.model[-1]``, ``for m in self.model[:-1]``; ``slice(None)``: all of them)
    item_calls: list = field(default_factory=list)
    item_reads: list = field(default_factory=list)
    item_classes: list = field(default_factory=list)
    items: bool = False  # indexed or iterated: its items are what is called
    sites: int = 0  # uses counted (a chain needs its members used at one site only)
    blocked: str | None = None

    def block(self, reason: str) -> None:
        if self.blocked is None:
            self.blocked = reason

    def record(self, kind: str, which, value) -> None:
        """A call shape, attribute read or isinstance classes (``kind``) of the child
        (``which`` None) or of the items ``which`` selects."""
        if which is None:
            target = getattr(self, kind)
            target.add(value) if isinstance(target, set) else target.append(value)
        else:
            getattr(self, f"item_{kind}").append((which, value))

    def of_item(self, position: int, count: int) -> "ChildUse":
        """How the item at ``position`` (of ``count``) is used."""
        def chosen(which):
            if isinstance(which, slice):
                return position in range(count)[which]
            return which % count == position if count else False
        return ChildUse(calls={v for w, v in self.item_calls if chosen(w)},
                        reads={v for w, v in self.item_reads if chosen(w)},
                        classes=[v for w, v in self.item_classes if chosen(w)],
                        blocked=self.blocked)


@dataclass(frozen=True)
class Chain:
    """Children called in a row, innermost first: ``members`` are child names; ``indexed``
    when each is a container indexed by the same expression (one chain per index)."""

    members: tuple[str, ...]
    indexed: bool
    # the position of ``forward``'s argument whose items the chain's input provably is
    # (``for i in range(n): x[i] = chain(x[i])``, with ``x`` written nowhere else), or None
    argument: int | None = None


def is_plain(value) -> bool:
    """A number, string, bool, None, or a tuple or list of those (nested too): a value that
    cannot hold or alias a tensor."""
    return isinstance(value, _PLAIN) or (isinstance(value, (tuple, list))
                                         and all(is_plain(v) for v in value))


def children_uses(module: nn.Module, call=None) -> tuple[dict[str, ChildUse], list[Chain]]:
    """``({child name: ChildUse}, [Chain])`` for ``module``'s code. ``call``: how the module
    is called (``(positional count, keyword names)``), which fixes the arguments it does not
    pass at their defaults; None when unknown."""
    names = set(module._modules)
    uses = {name: ChildUse() for name in names}
    if not names:
        return uses, []
    source = _ClassSource.of(type(module))
    if source is None:
        for use in uses.values():
            use.block("the source code of its parent is not available")
        return uses, []
    reader = _Reader(module, source, names, uses, call)
    reader.read()
    return uses, [chain for chain in reader.chains if reader.chain_ok(chain)]


# ---- the class's source ---------------------------------------------------------------

@dataclass
class _Method:
    node: ast.FunctionDef
    globals: dict
    is_property: bool
    depth: int  # the defining class's place in the MRO (0: the module's own class)


class _ClassSource:
    """The methods of a class and its non-torch bases, by name (most derived first)."""

    def __init__(self, methods: dict[str, list[_Method]]):
        self.methods = methods

    @classmethod
    def of(cls, klass: type) -> _ClassSource | None:
        methods: dict[str, list[_Method]] = {}
        for depth, base in enumerate(klass.__mro__):
            if base is object or base.__module__.startswith("torch."):
                continue
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(base)))
            except (OSError, TypeError, SyntaxError, IndentationError):
                return None
            body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
            module_globals = vars(sys.modules[base.__module__]) \
                if base.__module__ in sys.modules else {}
            for item in body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    is_property = any(isinstance(d, ast.Name) and d.id == "property"
                                      for d in item.decorator_list)
                    methods.setdefault(item.name, []).append(
                        _Method(item, module_globals, is_property, depth))
        return cls(methods)


def class_trees(klass: type) -> list | None:
    """The parsed source of ``klass`` and of its non-torch bases; None when a source is not
    available."""
    trees = []
    for base in klass.__mro__:
        if base is object or base.__module__.startswith("torch."):
            continue
        try:
            trees.append(ast.parse(textwrap.dedent(inspect.getsource(base))))
        except (OSError, TypeError, SyntaxError, IndentationError):
            return None
    return trees


# ---- reading ----------------------------------------------------------------------------

class _Reader:
    """One pass over the live code of a parent's reachable methods (module docstring)."""

    def __init__(self, module, source: _ClassSource, names: set, uses: dict, call):
        self.module, self.source, self.names, self.uses, self.call = \
            module, source, names, uses, call
        self.chains: list[Chain] = []
        self.chain_sites: dict[str, int] = {}

    # which methods run, and which of their parameters are known to be falsy
    def read(self) -> None:
        known = self._known_parameters()
        methods = self._reachable(known)
        for _ in range(3):  # known parameters depend on the calls in reachable code
            known = self._known_parameters(methods)
            again = self._reachable(known)
            if [id(m) for _, m in again] == [id(m) for _, m in methods]:
                break
            methods = again
        self.known = known
        for _, method in methods:
            self._read_method(method, known.get(id(method), set()))

    def _resolve(self, attribute: ast.Attribute, caller: _Method | None) -> _Method | None:
        """The definition ``self.f`` (the most derived) or ``super().f`` (the next one after
        the caller's class) runs; None for anything else."""
        definitions = self.source.methods.get(attribute.attr, ())
        if not definitions:
            return None
        if _is_self(attribute.value):
            return definitions[0]
        value = attribute.value
        if caller is not None and isinstance(value, ast.Call) and isinstance(value.func, ast.Name) \
                and value.func.id == "super":
            return next((d for d in definitions if d.depth > caller.depth), None)
        return None

    def _reachable(self, known) -> list[tuple[str, _Method]]:
        entry = self.source.methods.get("forward", ())[:1]
        found, todo, seen = [], list(entry), set()
        while todo:
            method = todo.pop()
            if id(method) in seen:
                continue
            seen.add(id(method))
            found.append((method.node.name, method))
            for node in live_nodes(method.node, known.get(id(method), set())):
                if isinstance(node, ast.Attribute):
                    target = self._resolve(node, method)
                    if target is not None:
                        todo.append(target)
        return found

    def _known_parameters(self, methods=None) -> dict[int, set]:
        """``{id(method): {parameter}}``: parameters with a falsy default, never assigned,
        that no live call passes a value to (or only a known falsy one)."""
        candidates: dict[int, set] = {}
        for definitions in self.source.methods.values():
            for definition in definitions:
                candidates[id(definition)] = falsy_defaults(definition.node)
        forward = self.source.methods.get("forward", ())[:1]
        if forward:
            arguments = forward[0].node.args
            known = candidates[id(forward[0])]
            if self.call is None:
                known.clear()
            else:
                positional, keywords = self.call[:2]
                names = [a.arg for a in (arguments.posonlyargs + arguments.args)[1:]]
                known -= set(names[:positional]) | set(keywords)
                if positional > len(names) and arguments.vararg:
                    known.discard("*" + arguments.vararg.arg)
                if arguments.kwarg and set(keywords) - set(names) - {
                        a.arg for a in arguments.kwonlyargs}:
                    known.discard("**" + arguments.kwarg.arg)
        if methods is None:
            return candidates
        changed = True
        while changed:
            changed = False
            for _, method in methods:
                caller_known = candidates[id(method)]
                live = list(live_nodes(method.node, caller_known))
                called = {id(n.func) for n in live if isinstance(n, ast.Call)}
                for node in live:
                    if not isinstance(node, ast.Attribute):
                        continue
                    target = self._resolve(node, method)
                    if target is None or not candidates[id(target)]:
                        continue
                    call = next((n for n in live if isinstance(n, ast.Call) and n.func is node), None) \
                        if id(node) in called else None
                    # a method used as a value (``f = self.predict``) may get anything
                    passed = passed_parameters(target.node, call, caller_known) if call is not None \
                        else set(candidates[id(target)])
                    if passed & candidates[id(target)]:
                        candidates[id(target)] -= passed
                        changed = True
        return candidates

    # uses of children in one method
    def _read_method(self, method: _Method, known: set) -> None:
        live = list(live_nodes(method.node, known))
        parents = {child: node for node in live for child in ast.iter_child_nodes(node)}
        scope = _Scope(method, parents, live)
        for node in live:
            if isinstance(node, ast.Attribute) and _is_self(node.value) and \
                    node.attr in self.names and isinstance(node.ctx, ast.Load):
                self.uses[node.attr].sites += 1
                self._use(node.attr, node, scope, None, f"{method.node.name}")
            elif isinstance(node, ast.Attribute) and _is_self(node.value) and \
                    isinstance(node.ctx, (ast.Store, ast.Del)) and node.attr in self.names:
                self.uses[node.attr].block(f"{type(self.module).__name__}.{method.node.name} "
                                           f"assigns self.{node.attr}")
        self._find_chains(method, live)

    def _use(self, child: str, expr: ast.expr, scope: "_Scope", items, how: str) -> None:
        """Record one use of ``child``: ``expr`` evaluates to it (``items`` None), or to one
        of the items ``items`` selects (an index, or a slice)."""
        use = self.uses[child]
        parent = scope.parents.get(expr)
        where = f"{type(self.module).__name__}.{how}"

        def blocked(what: str = "") -> None:
            use.block(f"{where} uses self.{child} as an object{what}, not only by calling it")

        if isinstance(parent, ast.Attribute) and parent.value is expr and isinstance(parent.ctx, ast.Load):
            if parent.attr in ("forward", "__call__"):
                call = scope.parents.get(parent)
                if isinstance(call, ast.Call) and call.func is parent:
                    use.record("calls", items, _shape(call))
                    return
                return blocked()
            use.record("reads", items, parent.attr)
            return
        if isinstance(parent, ast.Call):
            if parent.func is expr:
                use.record("calls", items, _shape(parent))
                return
            function = parent.func.id if isinstance(parent.func, ast.Name) else None
            if function == "len" and items is None:
                return
            if function == "getattr" and parent.args[0] is expr and len(parent.args) == 2 and \
                    isinstance(parent.args[1], ast.Constant) and isinstance(parent.args[1].value, str):
                use.record("reads", items, parent.args[1].value)
                return
            if function == "isinstance" and len(parent.args) == 2 and parent.args[0] is expr:
                classes = _evaluate_classes(parent.args[1], scope.method.globals)
                if classes is None:
                    return blocked(" (isinstance of a class it cannot resolve)")
                use.record("classes", items, classes)
                return
            if function in _ITERATING and items is None:
                return self._loop(child, expr, scope, how, slice(None))
            return blocked()
        if isinstance(parent, ast.Subscript) and parent.value is expr and items is None:
            use.items = True
            which = _selection(parent.slice)
            if isinstance(parent.slice, ast.Slice):  # self.model[:-1]: still the container's items
                grand = scope.parents.get(parent)
                if isinstance(grand, (ast.For, ast.comprehension)) and grand.iter is parent:
                    return self._loop(child, parent, scope, how, which)
                return blocked()
            return self._use(child, parent, scope, which, how)
        if isinstance(parent, ast.Compare):
            others = [parent.left, *parent.comparators]
            if all(isinstance(op, (ast.Is, ast.IsNot)) for op in parent.ops) and all(
                    other is expr or (isinstance(other, ast.Constant) and other.value is None)
                    for other in others):
                return
            return blocked()
        if isinstance(parent, (ast.If, ast.IfExp, ast.While, ast.Assert)) and parent.test is expr:
            return
        if isinstance(parent, ast.BoolOp) or (isinstance(parent, ast.UnaryOp)
                                              and isinstance(parent.op, ast.Not)):
            return
        if isinstance(parent, (ast.For, ast.comprehension)) and parent.iter is expr and items is None:
            return self._loop(child, expr, scope, how, slice(None))
        if isinstance(parent, ast.Assign) and parent.value is expr and len(parent.targets) == 1 \
                and isinstance(parent.targets[0], ast.Name):
            return self._names(child, {parent.targets[0].id}, scope, items, how, parent)
        if scope.method.is_property and isinstance(parent, (ast.Return, ast.keyword, ast.Dict)):
            return self._handed_out(child, expr, scope, items, how)
        return blocked()

    def _loop(self, child, iterable, scope, how, which) -> None:
        """``for m in self.model`` (through ``enumerate``/``zip``...): ``m`` is an item. Of
        ``for i, (p, t) in enumerate(zip(self.proj, x))`` only ``p`` is."""
        path = []  # which element of each level of the loop target holds the item
        loop = scope.parents.get(iterable)
        while isinstance(loop, ast.Call):
            name = loop.func.id if isinstance(loop.func, ast.Name) else None
            if name == "enumerate":
                path.append(1)
            elif name == "zip":
                path.append(next(k for k, a in enumerate(loop.args) if a is iterable))
            iterable, loop = loop, scope.parents.get(loop)
        if not isinstance(loop, (ast.For, ast.comprehension)) or loop.iter is not iterable:
            self.uses[child].block(f"{type(self.module).__name__}.{how} passes self.{child} "
                                   "to a function")
            return
        self.uses[child].items = True
        target = loop.target
        for index in reversed(path):  # the outermost wrapper's element first
            if not isinstance(target, ast.Tuple) or index >= len(target.elts):
                break
            target = target.elts[index]
        bound = {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        self._names(child, bound - _counters(loop), scope, which, how, loop)

    def _names(self, child, bound: set, scope, items, how, binding) -> None:
        """Every use of the local names ``bound`` (to the child or its items) in the scope."""
        for use in scope.loads(bound):
            self.uses[child].sites += 1
            self._use(child, use, scope, items, how)

    def _handed_out(self, child, expr, scope, items, how) -> None:
        """A property that returns the child, or a dict of children by key; its callers must
        pass it on with ``**self.prop`` to a method that only calls what it gets."""
        parent = scope.parents.get(expr)
        key = None
        if isinstance(parent, ast.keyword):
            key, holder = parent.arg, scope.parents.get(parent)
            ok = isinstance(holder, ast.Call) and isinstance(holder.func, ast.Name) and \
                holder.func.id == "dict" and isinstance(scope.parents.get(holder), ast.Return)
        elif isinstance(parent, ast.Dict):
            index = next((i for i, v in enumerate(parent.values) if v is expr), None)
            constant = parent.keys[index] if index is not None else None
            key = constant.value if isinstance(constant, ast.Constant) else None
            ok = key is not None and isinstance(scope.parents.get(parent), ast.Return)
        else:
            ok = isinstance(parent, ast.Return)
        prop = scope.method.node.name
        reason = (f"{type(self.module).__name__}.{prop} hands out self.{child} to code that "
                  "does more than call it")
        if not ok or scope.method is not self.source.methods[prop][0]:  # (not overridden)
            return self.uses[child].block(reason)
        for name, method in self._reachable(self.known):
            if method.is_property:
                continue
            live = list(live_nodes(method.node, self.known.get(id(method), set())))
            parents = {c: n for n in live for c in ast.iter_child_nodes(n)}
            for node in live:
                if not (isinstance(node, ast.Attribute) and _is_self(node.value) and node.attr == prop):
                    continue
                if key is None:  # the property is the child
                    self.uses[child].sites += 1
                    self._use(child, node, _Scope(method, parents, live), items, name)
                    continue
                spread = parents.get(node)
                call = parents.get(spread)
                target = self._resolve(call.func, method) if isinstance(call, ast.Call) and \
                    isinstance(call.func, ast.Attribute) else None
                if not (isinstance(spread, ast.keyword) and spread.arg is None and target):
                    return self.uses[child].block(reason)
                arguments = target.node.args
                if key not in {a.arg for a in arguments.args + arguments.kwonlyargs}:
                    return self.uses[child].block(reason)
                inner = _Scope(target, None, list(live_nodes(
                    target.node, self.known.get(id(target), set()))))
                self._names(child, {key}, inner, items, f"{call.func.attr}", target.node)

    # chains
    def _find_chains(self, method: _Method, live: list) -> None:
        for node in live:
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.For, ast.If, ast.While,
                                 ast.With)) and hasattr(node, "body"):
                for body in (node.body, getattr(node, "orelse", [])):
                    self._chains_in(body, node, method)

    def _chains_in(self, body: list, owner: ast.AST, method: _Method) -> None:
        run: list = []  # [(members, index, target, input)], as source text
        start = 0
        for position, statement in enumerate(body + [None]):
            link = self._link(statement) if statement is not None else None
            if link is not None and run and link[2] == run[-1][2] and link[3] == run[-1][2] \
                    and link[1] == run[-1][1]:
                run.append(link)
                continue
            if run:
                members = tuple(m for link_ in run for m in link_[0])
                if len(members) > 1:
                    entry = method is self.source.methods["forward"][0]
                    argument = _argument_item(run[0][3], body[:start], owner, method) \
                        if entry else None
                    self.chains.append(Chain(members, run[0][1] is not None, argument))
                    for member in members:
                        self.chain_sites[member] = self.chain_sites.get(member, 0) + 1
            run = [link] if link is not None else []
            start = position

    def _link(self, statement):
        """``T = self.a(self.b(U))`` (or with ``[i]`` on each): ``(members innermost first,
        index, dump of T, dump of U)``, or None."""
        if not (isinstance(statement, ast.Assign) and len(statement.targets) == 1):
            return None
        members, index, expr = [], None, statement.value
        while isinstance(expr, ast.Call) and len(expr.args) == 1 and not expr.keywords \
                and not isinstance(expr.args[0], ast.Starred):
            func, this_index = expr.func, None
            if isinstance(func, ast.Subscript) and not isinstance(func.slice, ast.Slice):
                this_index, func = ast.unparse(func.slice), func.value
            if not (isinstance(func, ast.Attribute) and _is_self(func.value) and func.attr in self.names):
                return None
            if members and this_index != index:
                return None
            members.append(func.attr)
            index = this_index
            expr = expr.args[0]
        if not members:
            return None
        return tuple(reversed(members)), index, ast.unparse(statement.targets[0]), ast.unparse(expr)

    def chain_ok(self, chain: Chain) -> bool:
        """Each member used at this one site only, and each a container when indexed."""
        for member in chain.members:
            use = self.uses[member]
            if use.blocked or use.sites != 1 or self.chain_sites.get(member) != 1:
                return False
            child = self.module._modules[member]
            if chain.indexed != isinstance(child, (nn.ModuleList, nn.Sequential)):
                return False
        if chain.indexed:
            lengths = {len(self.module._modules[m]) for m in chain.members}
            return len(lengths) == 1
        return True


def _argument_item(source: str, before: list, loop: ast.AST, method: _Method) -> int | None:
    """The position of ``forward``'s argument ``P`` if ``source`` (a chain's input) is
    (``method`` is the module's own ``forward``, the one its caller's graph calls)
    ``P[i]`` in ``for i in range(...)``, and that item is still the one the caller passed:
    no statement of the loop before the chain writes into ``P``, and the whole method writes
    into ``P`` only as ``P[i] = ...`` inside this loop (each iteration its own item), never
    rebinds, extends or hands ``P`` to other code."""
    function = method.node
    if function.name != "forward" or not (
            isinstance(loop, ast.For) and isinstance(loop.target, ast.Name)
            and isinstance(loop.iter, ast.Call) and isinstance(loop.iter.func, ast.Name)
            and loop.iter.func.id == "range"):
        return None
    index = loop.target.id
    names = [a.arg for a in function.args.posonlyargs + function.args.args][1:]
    argument = next((n for n in names if source == f"{n}[{index}]"), None)
    if argument is None:
        return None
    inside = {id(n) for statement in loop.body for n in ast.walk(statement)}
    earlier = {id(n) for statement in before for n in ast.walk(statement)}
    parents = {child: node for node in ast.walk(function) for child in ast.iter_child_nodes(node)}
    top = next((k for k, statement in enumerate(function.body)
                if any(n is loop for n in ast.walk(statement))), None)
    after = {id(n) for statement in function.body[top + 1:] for n in ast.walk(statement)} \
        if top is not None else set()
    for node in ast.walk(function):
        if not (isinstance(node, ast.Name) and node.id == argument) or (
                id(node) in after and isinstance(node.ctx, ast.Load)):
            continue  # (``return x`` after the loop cannot change what the loop read)
        parent = parents.get(node)
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            return None  # rebound
        if isinstance(parent, ast.Subscript) and parent.value is node:
            if isinstance(parent.ctx, ast.Load):
                continue
            if id(parent) in inside and id(parent) not in earlier and \
                    ast.unparse(parent.slice) == index and isinstance(parent.ctx, ast.Store):
                continue
            return None
        if isinstance(parent, ast.Call) and isinstance(parent.func, ast.Name) and \
                parent.func.id == "len":
            continue
        if isinstance(parent, (ast.For, ast.comprehension)) and parent.iter is node:
            continue
        return None  # a method call (append), an argument of a call, an alias ...
    if index in {n.id for n in ast.walk(loop) if isinstance(n, ast.Name)
                 and isinstance(n.ctx, ast.Store) and n is not loop.target}:
        return None  # the counter is reassigned in the loop
    return names.index(argument)


class _Scope:
    """A method's live nodes and their parents."""

    def __init__(self, method: _Method, parents: dict | None, live: list):
        self.method, self.live = method, live
        self.parents = parents if parents is not None else {
            child: node for node in live for child in ast.iter_child_nodes(node)}

    def loads(self, names: set) -> list[ast.Name]:
        return [n for n in self.live if isinstance(n, ast.Name) and n.id in names
                and isinstance(n.ctx, ast.Load)]


def _is_self(expr: ast.expr) -> bool:
    return isinstance(expr, ast.Name) and expr.id == "self"


def _selection(index: ast.expr):
    """Which items ``container[index]`` may be: a constant index or slice, else all."""
    def constant(e):
        if e is None:
            return None
        if isinstance(e, ast.Constant) and type(e.value) is int:
            return e.value
        if isinstance(e, ast.UnaryOp) and isinstance(e.op, ast.USub) and \
                isinstance(e.operand, ast.Constant) and type(e.operand.value) is int:
            return -e.operand.value
        raise ValueError
    try:
        if isinstance(index, ast.Slice):
            return slice(constant(index.lower), constant(index.upper), constant(index.step))
        value = constant(index)
        return slice(None) if value is None else value
    except ValueError:
        return slice(None)


def _counters(loop) -> set:
    """The counter of ``for i, m in enumerate(...)``: a number, not an item."""
    iterable = loop.iter
    if isinstance(iterable, ast.Call) and isinstance(iterable.func, ast.Name) and \
            iterable.func.id == "enumerate" and isinstance(loop.target, ast.Tuple) and \
            isinstance(loop.target.elts[0], ast.Name):
        return {loop.target.elts[0].id}
    return set()


def _evaluate_classes(expr: ast.expr, module_globals: dict):
    """The classes of an ``isinstance`` test (a name, a dotted name, or a tuple of them),
    looked up in the defining module's globals; None if any is not found."""
    if isinstance(expr, ast.Tuple):
        found = [_evaluate_classes(e, module_globals) for e in expr.elts]
        return None if any(f is None for f in found) else tuple(c for f in found for c in f)
    parts = []
    while isinstance(expr, ast.Attribute):
        parts.append(expr.attr)
        expr = expr.value
    if not isinstance(expr, ast.Name):
        return None
    value = module_globals.get(expr.id, getattr(builtins, expr.id, None))
    for part in reversed(parts):
        value = getattr(value, part, None)
    if isinstance(value, type):
        return (value,)
    if isinstance(value, tuple) and all(isinstance(v, type) for v in value):
        return value
    return None


def _shape(call: ast.Call):
    """``(positional count, keyword names, arguments passed as a literal None)`` (positions
    and names), or None for a call with ``*args`` / ``**kwargs``."""
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return None
    nones = {k for k, a in enumerate(call.args) if _is_none(a)} | {
        k.arg for k in call.keywords if _is_none(k.value)}
    return len(call.args), frozenset(k.arg for k in call.keywords), frozenset(nones)


def _is_none(expr: ast.expr) -> bool:
    return isinstance(expr, ast.Constant) and expr.value is None


def plain_attribute(child: nn.Module, name: str) -> bool:
    """Whether ``child.name`` is a hyperparameter: a plain value (:func:`is_plain`) found
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
    return is_plain(value) and not _assigned_after_init(type(child), name)


def _assigned_after_init(cls: type, name: str) -> bool:
    """Whether a method of ``cls`` (or of its non-torch bases) other than ``__init__``
    assigns or deletes ``self.<name>`` (state, not a hyperparameter); True when a source
    is not available."""
    trees = class_trees(cls)
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


def tested_against_none(function) -> set[str]:
    """The parameters of ``function`` its code compares with ``None`` (``if mask is None``).
    A traced value is never ``None``, so such a parameter must not be traced as an input
    that may be ``None`` at run time: the trace would follow one branch silently."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return set()
    definition = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef,
                                                                   ast.AsyncFunctionDef))), None)
    if definition is None:
        return set()
    arguments = definition.args
    names = {a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs}
    found = set()
    for node in ast.walk(definition):
        if isinstance(node, ast.Compare) and any(_is_none(e) for e in [node.left, *node.comparators]):
            found |= {e.id for e in [node.left, *node.comparators]
                      if isinstance(e, ast.Name) and e.id in names}
    return found

