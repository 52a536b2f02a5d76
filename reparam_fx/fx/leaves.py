"""Leaves: fusing inside the modules a graph keeps whole.

A module stays one ``call_module`` node (a *leaf*) when its ``forward`` does not trace,
when it has hooks, or when the graph came that way (a ``GraphModule`` traced with custom
leaves). The rest of the graph fuses around it, and its children are fused on their own:
in the result's private copy of the leaf, each child that fuses is replaced by its fused
``GraphModule``. The same happens to a model whose own ``forward`` does not trace.

Replacing a child is safe only if the leaf's code uses it as a function: how it does is
read from the class source by :mod:`reparam_fx.fx.uses`. A child is replaced when every
(live) use is a call with one set of arguments (the child is traced with the others at
their defaults: ``forward(x, scale=None)`` called as ``self.block(x)`` is traced with
``scale=None``), a ``len``, a truth or ``None`` test, a read of one of its *plain
attributes*, or an ``isinstance`` test its fused form answers the same way. A container
whose items are called (``self.blocks[i](x)``, ``for m in self.model: ... m(x)``) is fused
item by item, with the same rules for the items (``m.f`` and ``m.i`` of a routing loop are
plain attributes). Children called in a row, each one's result only the next one's input
(``self.m[i](self.ia[i](x[i]))``), are fused as one.

A plain attribute (``self.attn.resolution``, ``m.f``, ``self.conv.stride[0]``,
``self.attn.training``, ``getattr(self.attn, "key_dim")``) is a number, string, ``None``, or
a tuple or list of those, held by the child object itself (not a parameter, buffer,
submodule, method or property) and assigned by its class in ``__init__`` only (or,
``training``, by ``train()``): a hyperparameter, which no parameter of the child changes.
The fused child is given the same value (copied onto it when it lacks one) and is put in
place only if it then reads the same; otherwise the child stays. Anything else
(``self.conv.weight``, ``self.attn.some_method(x)``, ``fn(self.attn)``, calls with
different arguments) leaves that child's subtree as it is, with a reason. TorchScript
modules are never changed.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn as nn

from reparam_fx.fx.capture import is_op_module
from reparam_fx.fx.uses import ChildUse, children_uses, is_plain, plain_attribute
from reparam_fx.core.report import FusionReport, Leaf



def fuse_inside(module: nn.Module, path: str, fuse_child: Callable, report: FusionReport,
                call=None, item_use: ChildUse | None = None,
                argument_ranks: dict | None = None) -> None:
    """Fuse the children of ``module`` (a private copy, changed in place) with
    ``fuse_child(child, call) -> (fused GraphModule | None, its report)``, adding what
    happened to ``report``. ``call`` is how ``module`` is called (``(positional count,
    keywords)``, None if unknown); each child is traced as its parent calls it, its other
    arguments at their defaults. ``item_use``: ``module`` is a container whose items are
    used as that says (how its owner's code uses them). ``argument_ranks``: ``{position:
    rank}`` for the arguments of ``module`` that are lists of tensors of one rank, proven by
    the graph that calls it (a chain fed from their items is fused for that rank)."""
    if isinstance(module, torch.jit.ScriptModule):
        return
    if item_use is None:
        uses, chains = children_uses(module, call)
    else:
        count = len(module._modules)
        uses = {name: item_use.of_item(position, count)
                for position, name in enumerate(module._modules)}
        chains = []
    done = _fuse_chains(module, path, chains, fuse_child, report, argument_ranks or {})
    for name, child in list(module.named_children()):
        where = f"{path}.{name}" if path else name
        use = uses[name]
        if name in done:
            continue
        if use.blocked:
            report.leaves.append(Leaf(where, f"left as it is: {use.blocked}"))
            continue
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)) or (
                use.items and isinstance(child, nn.Sequential)):  # item by item
            if use.calls and isinstance(child, nn.Sequential):  # (it calls them with one input)
                use.item_calls.append((slice(None), (1, frozenset())))
            fuse_inside(child, where, fuse_child, report, item_use=use)
            continue
        if is_op_module(child) or not use.calls:
            continue  # (never called by the leaf's code: nothing to gain)
        if len(use.calls) != 1 or None in use.calls:
            report.leaves.append(Leaf(where, "left as it is: its parent calls it with "
                                             "different or unknown arguments"))
            continue
        unplain = [a for a in sorted(use.reads) if not plain_attribute(child, a)]
        if unplain:
            report.leaves.append(Leaf(where, f"left as it is: {type(module).__name__} reads "
                                             f"self.{name}.{unplain[0]}, which is no plain "
                                             "attribute"))
            continue
        fused, child_report = fuse_child(child, next(iter(use.calls)))
        if fused is not None:
            _carry_plain_attributes(child, fused, use.reads)
            lost = [a for a in sorted(use.reads) if not _reads_the_same(child, fused, a)]
            if lost:
                report.leaves.append(Leaf(where, f"left as it is: {type(module).__name__} reads "
                                                 f"self.{name}.{lost[0]}, which its fused form "
                                                 "would not give"))
                continue
            tested = [c for c in use.classes if isinstance(child, c) != isinstance(fused, c)]
            if tested:
                report.leaves.append(Leaf(where, f"left as it is: {type(module).__name__} tests "
                                                 f"it with isinstance(..., {tested[0][0].__name__}),"
                                                 " which its fused form would answer differently"))
                continue
        if child_report is not None:
            merge_report(report, child_report, where)
        if fused is not None:
            setattr(module, name, fused)


def _fuse_chains(module: nn.Module, path: str, chains, fuse_child, report,
                 argument_ranks: dict) -> set[str]:
    """Fuse each chain of children (:class:`reparam_fx.fx.uses.Chain`) as one function: the
    fused form goes in the place of the member with the most parameters, the others become
    ``nn.Identity``. A chain fed from the items of an argument of proven rank is traced
    behind an assert of that rank (which the fused form keeps). Returns the children
    (names) all of whose chains were fused."""
    done: set[str] = set()
    for chain in chains:
        containers = [module._modules[name] for name in chain.members]
        indices = range(len(containers[0])) if chain.indexed else [None]
        fused_all = True
        for index in indices:
            members = [c[index] if index is not None else c for c in containers]
            rank = argument_ranks.get(chain.argument)
            composite = _RankChecked(rank, members) if rank else nn.Sequential(*members)
            fused, inner = fuse_child(composite, (1, frozenset()))
            if fused is None:
                fused_all = False
                continue
            slot = max(range(len(members)), key=lambda k: (sum(p.numel() for p in
                                                                members[k].parameters()), k))
            suffix = f".{index}" if index is not None else ""
            where = f"{path}.{chain.members[slot]}{suffix}" if path else \
                f"{chain.members[slot]}{suffix}"
            merge_report(report, inner, where)  # (its regions absorb the others' ops)
            for k, name in enumerate(chain.members):
                value = fused if k == slot else nn.Identity()
                if index is None:
                    setattr(module, name, value)
                else:
                    module._modules[name][index] = value
        if fused_all:
            done.update(chain.members)
    return done


class _RankChecked(nn.Sequential):
    """Children called in a row on a tensor whose rank the caller's graph proves: the
    assert hands that proof to the fusion of the chain (and checks it at run time)."""

    def __init__(self, rank: int, members):
        super().__init__(*members)
        self.rank = rank

    def forward(self, x):
        torch._assert(x.dim() == self.rank, f"expected a {self.rank}-D input")
        return super().forward(x)


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
               and is_plain(value)}
    carried.update({key: inspect.getattr_static(original, key) for key in read
                    if not hasattr(fused, key)})
    for key, value in carried.items():
        setattr(fused, key, value)
    # ``copy.deepcopy`` of a GraphModule rebuilds it from its graph: it keeps only the
    # attributes named in its meta (``torch.fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY``)
    key = getattr(torch.fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", None)
    if carried and key is not None and isinstance(fused, torch.fx.GraphModule):
        fused.meta.setdefault(key, {}).update(carried)


def _reads_the_same(original: nn.Module, fused: nn.Module, name: str) -> bool:
    before, after = getattr(original, name), getattr(fused, name, _MISSING)
    return type(before) is type(after) and before == after


_MISSING = object()
