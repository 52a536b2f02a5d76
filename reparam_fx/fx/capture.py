"""Capture: from what the caller holds to a graph the passes may rewrite.

``fuse`` takes an ``nn.Module``, a ``torch.fx.GraphModule`` (read as it is: module-level,
functional or aten) or a ``torch.export.ExportedProgram`` (its aten graph). A plain module
is captured by symbolic tracing with :class:`FaithfulTracer`.

A module means its forward
--------------------------
fx's default tracer records every ``torch.nn`` module as one ``call_module`` node without
looking inside, and the passes read such a node by the module's class ("a Conv2d"). That is
only true when the module runs its class's standard forward. So the tracer:

* traces *through* a module whose ``forward`` was replaced on the instance
  (``conv.forward = partial(fn, conv, bn)``, ``m.forward = m.forward_fuse``): the graph then
  holds what the module really computes;
* keeps a module with forward hooks or pre-hooks as a leaf: its hooks keep running on it, and
  its children are fused on their own (:mod:`reparam_fx.fx.leaves`);
* keeps TorchScript modules as leaves (their code is not Python to trace);
* traces a ``torch.compile``d module's original module (compiling does not change what it
  computes; compile the fused model again);
* reads parameter shapes as constants (fx's ``param_shapes_constant``), so code like
  ``len(conv.weight.shape)`` traces;
* traces a module whose forward fails again with its parameters as real tensors: weights
  computed from parameters (OREPA's kernels, ``int(w.size(0) / g)``) are then computed
  once, as constants of the graph; any write to a tensor stops that attempt;
* records item assignment on tensors (``y[..., :p] = v``) as an in-place op;
* makes a module whose forward still fails to trace (shape control flow, ``math.ceil`` on a
  size, iterating a tensor ...) a leaf and goes on. The first trace notes every
  such module, innermost first; a second trace, with those as leaves, gives the graph.

Subclasses of conv or BatchNorm with their own ``forward`` are traced through as fx always
does (their module is not in ``torch.nn``).

BatchNorm is read as a family (:func:`standard_batchnorm`): every ``_BatchNorm`` whose class
runs torch's own ``forward`` is one op, a leaf, whatever its class: ``BatchNorm1d/2d/3d``,
their lazy forms once initialised, ``SyncBatchNorm`` (in eval mode it never synchronises: it
calls ``F.batch_norm`` with its running statistics exactly as ``BatchNorm2d`` does; in
training it uses batch statistics and is refused like any BatchNorm), and subclasses that
do not override ``forward`` (mmengine's ``_BatchNormXd``). A subclass whose own ``forward``
calls ``super().forward(x)`` (detectron2's ``NaiveSyncBatchNorm`` in eval) is traced
through: while tracing, torch's own input-rank checks (``_check_input_dim``: ``if
input.dim() != 4: raise``, control flow on a traced value) are recorded as the
``torch._assert`` they amount to, which also proves the rank.

Which capture first
-------------------
Symbolic tracing, even when ``example_inputs`` are given. The fused model then works for
every input size (``torch.export`` specialises the sizes a model branches on and guards
them), keeps the model's module names and structure, needs no inputs, and an untraceable
block costs that block only. ``torch.export`` (PyTorch's recommended capture) is taken when
the caller passes an ``ExportedProgram``, asks for it (``capture="export"``), or when the
model's own ``forward`` does not trace and ``example_inputs`` are given. Both captures fold
the same models to the same op counts (tested on the third-party corpus).

Length: about 680 lines, one tracer. Each Python idiom the capture must record faithfully
(replaced forwards, hooks, item assignment, in-place operators, shape reads, kept-whole
blocks, ``forward``'s arguments) is a short method of :class:`FaithfulTracer` sharing its
state; split across modules, each would reach back into the others.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import inspect
import itertools
import operator
import sys

import torch
import torch.fx
import torch.nn as nn

from reparam_fx.fx.values import RANDOM_NAMES as _RANDOM
from reparam_fx.core.report import Leaf
from reparam_fx.core.text import first_line


class FusionError(ValueError):
    """The model cannot be fused as given; the message says what to do instead."""


class Workspace:
    """The graph being rewritten and where its attributes live.

    ``root`` is the caller's module (or a trace of it, sharing its submodules): it is
    only ever read. The pass edits ``graph`` (a private copy) and puts what it creates in
    ``added``; :meth:`build` assembles the result from deep copies of the attributes the
    final graph still uses, so the result shares no state with the caller's model.
    """

    def __init__(self, root: nn.Module, graph: torch.fx.Graph, frontend: str, class_name: str,
                 leaves: list[Leaf] | None = None):
        self.root, self.graph, self.frontend, self.class_name = root, graph, frontend, class_name
        self.leaves = leaves or []  # modules kept as call_module leaves for a reason
        self.private = False  # True once ``graph`` is ours to edit (not the caller's)
        self.added: dict[str, object] = {}  # qualified name -> new module or tensor
        self._added_parents: set[str] = set()  # every proper prefix of an added name
        self._modules: dict[str, nn.Module | None] = {}

    def add(self, qualified: str, value) -> None:
        self.added[qualified] = value
        self._modules.pop(qualified, None)
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
            self.graph, self.private = copy_sharing_specs(self.graph, self.graph), True

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


def copy_sharing_specs(value, graph: torch.fx.Graph):
    """A deep copy of ``value`` (a graph, or its codegen) that shares ``graph``'s input and
    output pytree specs: they are immutable, and copying one makes torch 2.13 warn that
    ``LeafSpec`` is deprecated (``torch.export`` graphs carry them)."""
    info = getattr(getattr(graph, "_codegen", None), "pytree_info", None)
    memo = {id(spec): spec for spec in (getattr(info, "in_spec", None),
                                         getattr(info, "out_spec", None)) if spec is not None}
    return copy.deepcopy(value, memo)


# ---- what a module computes ----------------------------------------------------------

def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward hooks or pre-hooks of its own."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def has_global_hooks() -> bool:
    from torch.nn.modules import module as module_globals
    return bool(module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks)


def replaced_forward(module: nn.Module) -> bool:
    """Whether ``module.forward`` was replaced on the instance (a function, a
    ``functools.partial``, a bound method of another name ...)."""
    return "forward" in module.__dict__


def runs_standard_forward(module) -> bool:
    """A ``torch.nn`` class's own forward: no subclass, no replaced instance forward (or a
    BatchNorm of any class running torch's own forward, :func:`standard_batchnorm`)."""
    return module is not None and (type(module).__module__.startswith("torch.nn") and
                                   not replaced_forward(module) or standard_batchnorm(module))


def is_op_module(module: nn.Module) -> bool:
    """A ``torch.nn`` module that is one op (Conv2d, ReLU ...), not a container of others;
    and a BatchNorm of any class that runs torch's own forward."""
    return standard_batchnorm(module) or type(module).__module__.startswith("torch.nn") and \
        not isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


# ---- the BatchNorm family -------------------------------------------------------------

_BN = nn.modules.batchnorm
# torch's two BatchNorm forwards. ``SyncBatchNorm.forward`` differs from ``_BatchNorm``'s
# only where ``self.training`` is True (it synchronises batch statistics across processes);
# in eval mode both return ``F.batch_norm(x, running_mean, running_var, weight, bias,
# running_mean is None and running_var is None, momentum, eps)``.
_STANDARD_BATCHNORM_FORWARDS = (_BN._BatchNorm.forward, _BN.SyncBatchNorm.forward)
# the rank each class's own ``_check_input_dim`` requires (the others allow several)
_BATCHNORM_INPUT_RANKS = ((_BN.BatchNorm2d, 4), (_BN.LazyBatchNorm2d, 4), (_BN.BatchNorm3d, 5),
                          (_BN.LazyBatchNorm3d, 5))


def standard_batchnorm(module) -> bool:
    """Whether ``module`` is a BatchNorm (``_BatchNorm``: ``BatchNorm1d/2d/3d``, the lazy
    ones, ``SyncBatchNorm``, any subclass) whose computation is torch's own ``forward``: its
    class does not override it and the instance did not replace it."""
    return isinstance(module, _BN._BatchNorm) and not replaced_forward(module) and \
        type(module).forward in _STANDARD_BATCHNORM_FORWARDS


def batchnorm_input_rank(module) -> int | None:
    """The one rank a standard BatchNorm's own input check accepts (4 for ``BatchNorm2d``
    and its subclasses that keep its check, 5 for ``BatchNorm3d``), else None
    (``BatchNorm1d``: 2 or 3; ``SyncBatchNorm``: any from 2; a subclass with its own check,
    like mmengine's ``_BatchNormXd``, which checks nothing)."""
    if not standard_batchnorm(module):
        return None
    for cls, rank in _BATCHNORM_INPUT_RANKS:
        if isinstance(module, cls) and type(module)._check_input_dim is cls._check_input_dim:
            return rank
    return None


def uninitialised_modules(model: nn.Module) -> list[str]:
    """The lazy modules (``LazyBatchNorm2d``, ``LazyConv2d`` ...) of ``model`` that have not
    been run yet, as ``"name (class)"``: their parameters and statistics do not exist."""
    from torch.nn.modules.lazy import LazyModuleMixin
    return [f"{name or 'the model'} ({type(module).__name__})"
            for name, module in model.named_modules()
            if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()]


def _traced_input_check(cls, original):
    """``cls._check_input_dim`` that, given a traced tensor, records the check as the
    ``torch._assert`` it amounts to instead of branching on it."""
    def check(self, input):
        if not isinstance(input, torch.fx.Proxy):
            return original(self, input)
        dims = input.dim()
        if issubclass(cls, _BN.SyncBatchNorm):
            condition, expected = dims >= 2, "at least 2D"
        elif issubclass(cls, (_BN.BatchNorm1d, _BN.LazyBatchNorm1d)):
            condition, expected = (dims == 2) | (dims == 3), "2D or 3D"
        else:
            rank = dict(_BATCHNORM_INPUT_RANKS)[cls]
            condition, expected = dims == rank, f"{rank}D"
        torch._assert(condition, f"expected {expected} input")
    return check


_INPUT_CHECKS = {cls: cls.__dict__["_check_input_dim"] for cls in (
    _BN.BatchNorm1d, _BN.BatchNorm2d, _BN.BatchNorm3d, _BN.LazyBatchNorm1d,
    _BN.LazyBatchNorm2d, _BN.LazyBatchNorm3d, _BN.SyncBatchNorm)}
_traced_checks_depth = 0


@contextlib.contextmanager
def _traceable_batchnorm_checks():
    """While tracing: torch's BatchNorm input checks on traced tensors become asserts in the
    graph (``SyncBatchNorm``'s non-zero channel check, which reads no rank and guards no
    value, is skipped). Only a ``forward`` that calls ``super().forward(x)`` reaches them:
    standard BatchNorms are leaves."""
    global _traced_checks_depth
    if _traced_checks_depth == 0:
        for cls, original in _INPUT_CHECKS.items():
            cls._check_input_dim = _traced_input_check(cls, original)
        _BN.SyncBatchNorm._check_non_zero_input_channels = _skip_on_proxies(
            _SYNC_CHANNEL_CHECK)
    _traced_checks_depth += 1
    try:
        yield
    finally:
        _traced_checks_depth -= 1
        if _traced_checks_depth == 0:
            for cls, original in _INPUT_CHECKS.items():
                cls._check_input_dim = original
            _BN.SyncBatchNorm._check_non_zero_input_channels = _SYNC_CHANNEL_CHECK


_SYNC_CHANNEL_CHECK = _BN.SyncBatchNorm.__dict__["_check_non_zero_input_channels"]


def _skip_on_proxies(original):
    def check(self, input):
        if not isinstance(input, torch.fx.Proxy):
            original(self, input)
    return check


def _compiled_original(module: nn.Module) -> nn.Module | None:
    """The original module of a ``torch.compile``d one, else None. (Until something
    compiled, dynamo is not even imported: importing it here would cost a second.)"""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    optimized = getattr(eval_frame, "OptimizedModule", None)
    return module._orig_mod if optimized is not None and isinstance(module, optimized) else None


class _ParameterProxy(torch.fx.proxy.ParameterProxy):
    """A parameter whose sizes are constants while tracing: ``w.size(0)`` too."""

    def size(self, dim=None):
        return self.param.size() if dim is None else self.param.size(dim)


class _Proxy(torch.fx.Proxy):
    """A traced tensor that records item assignment (``y[:, :, 0:p] = v``) as an in-place
    ``operator.setitem`` op, as it runs, instead of failing."""

    def __setitem__(self, key, value):
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


def _record_in_place(operator_function):
    """``out += e`` on a traced tensor as the in-place op it is.

    ``torch.fx.Proxy`` has no ``__iadd__``, so Python falls back to ``out = out + e`` and
    the trace computes a new tensor where the program wrote into ``out``: every alias of
    ``out`` (``nn.Identity``'s input, eval ``Dropout``'s, ``out = x``, a view) would keep its
    old value in the graph while the model changes it. Recording ``operator.iadd`` keeps the
    write (the graph runs ``out.__iadd__(e)``, as the model does), and the passes see it."""
    def in_place(self, other):
        return self.tracer.create_proxy("call_function", operator_function, (self, other), {})
    in_place.__name__ = f"__{operator_function.__name__}__"
    return in_place


for _function in (operator.iadd, operator.isub, operator.imul, operator.itruediv,
                  operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                  operator.ior, operator.ixor, operator.ilshift, operator.irshift,
                  operator.imatmul):
    setattr(_Proxy, f"__{_function.__name__}__", _record_in_place(_function))


class _WriteRefused(RuntimeError):
    """A module traced with real parameters tried to write to a tensor."""


class _NoWrites(torch.overrides.TorchFunctionMode):
    """While a module is traced with real parameters, its weight arithmetic runs for real:
    any write to a tensor (in-place op, ``out=``, item assignment, BatchNorm updating its
    statistics) would change the caller's model, so it stops the attempt instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        writes = (name.endswith("_") and not name.startswith("__")) or "out" in kwargs \
            or kwargs.get("inplace") is True \
            or name in ("__set__", "__setitem__", "__iadd__", "__isub__", "__imul__",
                        "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__", "__iand__",
                        "__ior__", "__ixor__")
        if func is torch.nn.functional.batch_norm:
            bound = dict(zip(("input", "running_mean", "running_var", "weight", "bias",
                              "training"), args), **kwargs)
            writes = bool(bound.get("training")) and bound.get("running_mean") is not None
        real = any(isinstance(a, torch.Tensor) and not isinstance(a, torch.fx.Proxy)
                   for a in torch.utils._pytree.tree_leaves((args, kwargs)))
        if writes and real:
            raise _WriteRefused(f"{name} writes to a tensor")
        if _RANDOM.search(name):  # (random values would be frozen into the graph)
            raise _WriteRefused(f"{name} draws random numbers")
        return func(*args, **kwargs)


class FaithfulTracer(torch.fx.Tracer):
    """Symbolic tracing that records what each module really computes (module docstring).

    ``failed`` maps ``id(module)`` to the reason its forward did not trace; such modules
    are leaves. After :meth:`trace`, ``kept`` maps the qualified name of every module kept
    as a leaf for a reason (not for being a ``torch.nn`` op) to that reason.
    """

    def __init__(self, failed: dict[int, str] | None = None):
        super().__init__(param_shapes_constant=True)
        self.failed: dict[int, str] = dict(failed or {})
        self.kept: dict[str, str] = {}
        self._concrete = 0  # > 0 while a failed module is traced again with real parameters

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _Proxy(node, self)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._concrete and isinstance(attr_val, nn.Parameter):
            return attr_val  # computed with now; results become constants of the graph
        proxy = super().getattr(attr, attr_val, parameter_proxy_cache)
        if type(proxy) is torch.fx.proxy.ParameterProxy:
            proxy.__class__ = _ParameterProxy  # fx's own takes no ``dim`` in ``size()``
        return proxy

    def _leaf_reason(self, module: nn.Module) -> str | None:
        if id(module) in self.failed:
            return self.failed[id(module)]
        if isinstance(module, torch.jit.ScriptModule):
            return "a TorchScript module: its code is not Python to trace"
        if has_hooks(module):
            return "it has forward hooks or pre-hooks, which keep running on it"
        return None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        reason = self._leaf_reason(m)
        if reason is not None:
            self.kept[module_qualified_name] = reason
            return True
        if replaced_forward(m):
            return False  # trace what the instance computes, not what its class says
        return standard_batchnorm(m) or super().is_leaf_module(m, module_qualified_name)

    def trace(self, root, concrete_args=None, call: tuple | None = None):
        """``call`` (``(positional count, keyword names)``): how ``root`` is called; the
        arguments it does not pass are bound to their defaults (:meth:`create_args_for_root`)."""
        self._call = call
        with _traceable_batchnorm_checks():
            return super().trace(root, concrete_args)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        """The graph's inputs when ``root`` is called as ``self._call`` says
        (``(positional count, keyword names[, arguments its callers pass as a literal
        None])``).

        A parameter it passes, or one without a default, is an input (a placeholder).
        Every other parameter has a known value, its default: the trace runs with that
        value (so ``if augment:`` and ``predict(x, *args, **kwargs)`` trace), and an
        empty ``*args`` / ``**kwargs`` is empty. An argument every caller passes as a literal
        ``None`` is an input the trace runs with ``None`` (``if batch is not None`` must not
        see a traced value, which is never ``None``). The result takes only the inputs: passing
        anything else is a ``TypeError``, never silently ignored. (A guarded parameter, as
        ``concrete_args`` makes, would stop the TorchScript ONNX exporter, which passes
        every default as a tensor.)"""
        call = getattr(self, "_call", None)
        if call is None or not is_module or concrete_args is not None:
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        function = inspect.unwrap(root_fn)
        parameters = list(inspect.signature(function).parameters.values())[1:]  # self
        positional, keywords = call[:2]
        nones = call[2] if len(call) > 2 else frozenset()
        from reparam_fx.fx.uses import tested_against_none
        tested = tested_against_none(function)
        kinds = inspect.Parameter
        args, kwargs = [self.root], {}
        for index, parameter in enumerate(parameters):
            if parameter.kind in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD):
                continue
            passed = parameter.name in keywords or (
                index < positional and parameter.kind != kinds.KEYWORD_ONLY)
            if passed or parameter.default is parameter.empty:
                value = self.create_proxy("placeholder", parameter.name, (), {})
                if index in nones or parameter.name in nones:
                    value = None  # every caller passes a literal None (``head(feats, None)``)
                elif parameter.name in tested:
                    raise FusionError(
                        f"{type(self.root).__name__}.forward compares its argument "
                        f"{parameter.name!r} with None, and a traced input is never None: "
                        "the trace would take one branch for every call")
            else:
                value = parameter.default
            if parameter.kind == kinds.KEYWORD_ONLY:
                kwargs[parameter.name] = value
            else:
                args.append(value)

        def bound_forward(*inputs):
            return root_fn(*inputs, **kwargs)
        return bound_forward, args

    def call_module(self, m, forward, args, kwargs):
        original = _compiled_original(m)
        if original is not None:
            return original(*args, **kwargs)  # traced through the patched Module.__call__
        if self._leaf_reason(m) is not None:
            return self._kept_whole(m, forward, args, kwargs)
        if not replaced_forward(m) and (standard_batchnorm(m) or super().is_leaf_module(m, "")):
            return super().call_module(m, forward, args, kwargs)
        try:
            return self._attempt(m, forward, args, kwargs)
        except Exception as error:  # noqa: BLE001 - try again with constant parameters
            if not self._concrete:
                try:
                    self._concrete += 1
                    with _NoWrites():
                        return self._attempt(m, forward, args, kwargs)
                except Exception:  # noqa: BLE001 - then it is a leaf
                    pass
                finally:
                    self._concrete -= 1
            self.failed[id(m)] = f"its forward does not trace ({first_line(error)})"
            return self._kept_whole(m, forward, args, kwargs)

    def _kept_whole(self, m, forward, args, kwargs):
        """A module kept whole: one node. A list it is given is handed over as a new list
        made in the graph (``list([a, b])``): the module may write into it (``x[i] = ...``,
        YOLOv7's ``IDetect``), and the caller's list then holds that list's items, read
        after the call (a read of ``feats[0]`` after ``head(feats)`` sees what the module
        wrote there; the trace never runs the module, so it would see the old item)."""
        handed = []

        def hand_over(value):
            if type(value) is list:
                made = self.create_proxy("call_function", list, (value,), {})
                handed.append((value, made))
                return made
            return value
        result = super().call_module(m, forward, tuple(hand_over(a) for a in args),
                                     {key: hand_over(v) for key, v in kwargs.items()})
        for value, made in handed:
            value[:] = [made[k] for k in range(len(value))]
        return result

    def _attempt(self, m, forward, args, kwargs):
        """Trace through ``m``; on failure, leave the graph and module stack as before."""
        depth, last = len(self.module_stack), next(reversed(self.graph.nodes), None)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            while len(self.module_stack) > depth:
                self.module_stack.popitem(last=True)
            # nodes of the failed attempt (but parameter reads, which fx caches and reuses)
            for node in list(itertools.takewhile(lambda n: n is not last,
                                                 reversed(self.graph.nodes))):
                if node.op != "get_attr" and not node.users:
                    self.graph.erase_node(node)
            raise


class _PythonState:
    """The plain Python state of every module of a model, restored after tracing: a
    forward may write to it (caches keyed by device, patched-then-deleted ``forward``s),
    and tracing runs forward with proxies, which must not stay in the caller's model.
    Likewise the batch counters of BatchNorms in training mode."""

    def __init__(self, model: nn.Module):
        self._saved = [(module, dict(module.__dict__),
                        {key: _contents(value) for key, value in module.__dict__.items()})
                       for module in model.modules()]
        # a BatchNorm subclass in training mode traced through (``super().forward(x)``)
        # counts the batch for real: ``num_batches_tracked.add_(1)`` on a plain buffer
        self._counters = [(module.num_batches_tracked, module.num_batches_tracked.clone())
                          for module in model.modules()
                          if isinstance(module, _BN._BatchNorm) and module.training
                          and isinstance(module.num_batches_tracked, torch.Tensor)]

    def restore(self) -> None:
        with torch.no_grad():
            for counter, saved in self._counters:
                if not torch.equal(counter, saved):
                    counter.copy_(saved)
        for module, attributes, contents in self._saved:
            current = module.__dict__  # compared by identity: values may be tensors
            if current.keys() != attributes.keys() or any(
                    current[key] is not value for key, value in attributes.items()):
                module.__dict__.clear()
                module.__dict__.update(attributes)
            for key, saved in contents.items():
                value = attributes[key]
                if saved is not None and _contents(value) != saved:
                    value.clear()
                    if isinstance(value, dict):
                        value.update((k, item.value) for k, item in saved.items())
                    else:
                        value.extend(item.value for item in saved)


def _contents(value):
    """A shallow copy of a dict or list attribute, compared by identity of its items."""
    if type(value) in (dict, collections.OrderedDict):
        return {k: _Same(v) for k, v in value.items()}
    if type(value) is list:
        return [_Same(v) for v in value]
    return None


class _Same:
    """Compares by identity (tensors and proxies have no usable ``==``)."""

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, _Same) and other.value is self.value


def trace(model: nn.Module, call: tuple | None = None) -> tuple[torch.fx.GraphModule, list[Leaf]]:
    """``model`` traced by :class:`FaithfulTracer`, and the modules it kept as leaves.
    ``call`` is how the model is called, ``(positional count, keyword names)``: the
    arguments it does not pass are bound to their defaults (None: every argument is an
    input, as fx does).

    Raises whatever symbolic tracing raises when ``model``'s own forward does not trace.
    The result shares (never copies) the model's submodules and tensors; the model's
    Python state is as it was before."""
    model = _compiled_original(model) or model
    failed: dict[int, str] = {}
    state = _PythonState(model)
    for _ in range(4):  # the second trace normally finds no new failure
        tracer = FaithfulTracer(failed)
        try:
            graph = tracer.trace(model, call=call)
            _drop_unread_items(graph)
            done = tracer.failed.keys() == failed.keys()
            if done:  # before the restore: it takes the constants tracing set on the root
                traced = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
        finally:
            state.restore()
        if done:
            break
        failed = tracer.failed
    else:
        raise FusionError(f"tracing {type(model).__name__} kept finding new untraceable "
                          "modules; pass example_inputs to capture it with torch.export")
    leaves = [Leaf(name, reason) for name, reason in tracer.kept.items()]
    return traced, leaves


def _drop_unread_items(graph: torch.fx.Graph) -> None:
    """The reads of a handed-over list's items (:meth:`FaithfulTracer._kept_whole`) that
    the caller never made."""
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and node.target is operator.getitem and not node.users \
                and isinstance(node.args[0], torch.fx.Node) and node.args[0].target is list:
            graph.erase_node(node)


def as_tuple(example_inputs) -> tuple:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def is_aten_graph(graph: torch.fx.Graph) -> bool:
    return any(isinstance(n.target, torch._ops.OpOverload) for n in graph.nodes)


def export(model: nn.Module, example_inputs) -> torch.fx.GraphModule:
    """``model`` captured by ``torch.export`` at ``example_inputs``, as an aten GraphModule.
    The model's Python state is as it was before: ``torch.export`` runs ``forward`` with
    fake tensors, and a forward that caches tensors on ``self`` (a detection head's anchors
    keyed by the input shape) would otherwise keep them, and fail on its next real call."""
    state = _PythonState(model)
    try:
        program = torch.export.export(model, as_tuple(example_inputs))
    except Exception as error:  # noqa: BLE001
        raise FusionError(f"torch.export could not capture {type(model).__name__}: "
                          f"{first_line(error, 300)}") from error
    finally:
        state.restore()
    return program.module()


def propagate_shapes(ws: Workspace, example_inputs) -> None:
    """Record tensor shapes on the workspace graph (``meta['tensor_meta']``) by running
    it once on clones of ``example_inputs``. Skipped when a BatchNorm is in training mode
    (running it would update its statistics); shapes are a help, not a need."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
           for m in ws.root.modules()):
        return
    from torch.fx.passes.shape_prop import ShapeProp
    ws.make_private()  # shapes are written onto nodes
    try:
        runner = torch.fx.GraphModule(ws.root, ws.graph)  # shares, does not copy, attributes
        with torch.no_grad():
            ShapeProp(runner).propagate(*(t.clone() if isinstance(t, torch.Tensor) else t
                                          for t in as_tuple(example_inputs)))
    except Exception:  # noqa: BLE001 - fusion works without shapes
        pass
