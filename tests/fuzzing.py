"""Seeded differential fuzzing of ``reparam_fx.fuse`` and ``reparam_fx.fuse_onnx_model``.

The method
----------
1. **Programs.** A seed picks a small program: a list of :class:`Statement` s (an IR), each
   one op written in one of several *code styles* — the shapes other people's code takes:
   ``nn.Conv2d`` or ``F.conv2d`` on raw parameters (or on weights computed in ``forward``,
   timm's ``StdConv2d``, a conv with a forward hook), ``nn.BatchNorm2d``, ``F.batch_norm``
   on buffers, a timm-style ``BatchNormAct2d`` subclass, ``SyncBatchNorm``, a
   ``BatchNorm1d`` over flattened channels-last tokens; a layer scale as
   ``x * self.gamma.view(1, -1, 1, 1)`` or an in-place ``x.mul_(...)``; sums as ``a + b``,
   ``out = 0; out += ...``, ``sum([...])``, ``out = self.id(x); out += ...`` (an in-place
   add through an *alias*); ``Linear`` over channels-last tensors reached by ``movedim`` /
   ``permute``; average pools, zero pads, crops, shape reads, MobileOne-style branch
   lists, shared modules (:data:`OPS`). Tensors keep their channel count, except that
   convs and linears now and then double or halve it. Some statements are moved into a
   child module (:class:`Block`), sometimes one that symbolic tracing cannot read. The
   program is rendered to the Python source of an ``nn.Module`` subclass
   (:meth:`Program.source`) and executed, so every program is also a printable reproducer.

   *Whole programs* (:class:`Frame`, about a third of the programs) are written as
   detectors are: ``forward(x, augment=False, profile=False, visualize=False)``,
   ``forward(x, *args, **kwargs)`` passed on to ``predict(...)`` or a subclass calling
   ``super().forward(x)``; often shape control flow at the top (so ``fuse`` reads the
   source instead of tracing); mostly the statements split into layers (``Layer<n>``, or
   a head itself) in an ``nn.Sequential`` / ``nn.ModuleList`` run by a routing loop reading
   ``m.f`` (int or list) and ``m.i``, with ``isinstance`` tests, a ``profile`` /
   ``visualize`` branch that hands the layer to a function (dead, or live), items taken by
   index or slice (``head = self.model[-1]``, called with a literal ``None``). The
   :class:`Head` op is a detection head over 1-3 feature maps that does not trace
   (anchors or grids cached by shape): per-level children in ``ModuleList`` s called in a
   row (YOLOv7's ``ImplicitA`` -> conv -> BN -> ``ImplicitM``), handed out by a property
   (``**self.one2many``), zipped, called with a literal ``None``, plus uses ``fuse`` must
   respect: a child passed to a function, a chain member called twice, an ``isinstance``
   test, the input list changed before the chain, the head called again on unbatched maps
   or its list read by the caller after the call.
2. **Captures.** Each program is handed to ``fuse`` in each capture (:data:`CAPTURES`):
   symbolic tracing without and with example inputs, ``torch.export`` (training IR and
   core ATen; spatial dims sometimes dynamic) and ONNX (``torch.onnx.export(dynamo=False)``
   with a random opset, constant folding, dynamic spatial axes, sometimes
   ``TrainingMode.TRAINING``). Each fused result is compared with *the program it was
   given* — the eager model, ``program.module()``, or the exported ONNX run in ONNX
   Runtime — in float64 for torch (relative error ``<= 1e-9``) and float32 for ONNX
   (``<= 1e-5``), at two input sizes where the capture allows (and, for ``fuse(model)``,
   which saw no input, on an unbatched ``(C, *S)`` input when the program accepts one).
   Also checked: ``fuse`` leaves its argument (and the example inputs) unchanged — its
   state and, for a module, what it computes (its Python state: caches, routing) — and
   the result costs no more MACs (``reparam_fx.mac_count``; :func:`onnx_mac_count`). With
   the fx capture option ``export_fused``, a fused whole program must also export with
   ``torch.export`` whenever the program does, and compute the same.
3. **Shrinking.** A failure (:class:`Failure`: wrong-values, wrong-shape, crash-fuse,
   crash-fused, mac-increase, mutated-input; crash-process when native code kills the
   process) is shrunk by delta debugging: delete a statement (its uses rewired to an
   earlier tensor of the same type), simplify a statement's style and options, unwrap
   blocks, drop outputs, simplify the capture's options — keeping each change while the
   same kind of failure still reproduces (a frame: dropped, its options set to their
   defaults, its layers merged). The result is printed as a self-contained script
   (:func:`reproducer`) that raises while the bug is there.

Everything is a function of the seed: ``random.Random`` seeded from it picks the
structure, ``torch.manual_seed(seed)`` the weights and inputs (the reproducer does the
same), and BatchNorm statistics and layer scales are randomised
(:func:`reparam_fx.testing.randomize_batchnorm_`,
:func:`~reparam_fx.testing.randomize_parameters_`) so that none is the identity or ~0.

Entry points: :func:`generate_program`, :func:`check_capture`, :func:`shrink`,
:func:`reproducer`, :func:`fuzz` (the loop), ``tools/fuzz.py`` (the command line),
``tests/test_fuzz.py`` (a bounded run and tests of the fuzzer itself).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import io
import linecache
import math
import os
import random
import sys
import time
import types
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch

import reparam_fx
from reparam_fx.testing import changed_entries, randomize_batchnorm_, randomize_parameters_

CAPTURES = ("fx", "fx-inputs", "export", "core", "onnx")
FAILURE_KINDS = ("wrong-values", "wrong-shape", "crash-fuse", "crash-fused", "mac-increase",
                 "mutated-input", "crash-process")
RTOL_FLOAT64 = 1e-9  # torch captures, compared in float64
RTOL_ONNX = 1e-5  # ONNX Runtime, float32, relative to max |reference|
BATCH = 2

FIRST, LAST, VECTOR = "channels-first", "channels-last", "vector"  # (N, C, *S), (N, *S, C), (N, C)


# ---- the program IR --------------------------------------------------------------------

@dataclass(frozen=True)
class Statement:
    """One line (or a few) of ``forward``: ``output = <kind in style>(inputs)``.

    ``options`` are the op's parameters as sorted ``(name, value)`` pairs. The statement's
    submodules and parameters are named after its output (``v3`` -> ``self.conv3``)."""

    kind: str
    output: str
    inputs: tuple[str, ...]
    style: str
    options: tuple[tuple[str, object], ...] = ()

    def get(self, name, default=None):
        return dict(self.options).get(name, default)

    def with_options(self, **changes) -> "Statement":
        merged = dict(self.options)
        merged.update(changes)
        return replace(self, options=tuple(sorted(merged.items())))

    @property
    def number(self) -> str:
        return self.output[1:]


def options(**values) -> tuple[tuple[str, object], ...]:
    return tuple(sorted(values.items()))


@dataclass(frozen=True)
class Program:
    """A generated module: statements over the input ``x``, returning ``outputs``.

    ``dims`` is the number of spatial dims (2: images ``(N, C, H, W)``; 1: ``Conv1d``
    programs on ``(N, C, L)``); ``sizes`` the two spatial sizes it is run at."""

    seed: int
    dims: int
    channels: int
    sizes: tuple[tuple[int, ...], ...]
    statements: tuple[Statement, ...]
    outputs: tuple[str, ...]
    blocks: tuple["Block", ...] = ()
    frame: "Frame | None" = None

    def input_shapes(self) -> list[tuple[int, ...]]:
        return [(BATCH, self.channels, *size) for size in self.sizes]

    def source(self) -> str:
        return render_source(self)

    def types(self) -> dict[str, "TensorType"]:
        """The layout and shapes of every variable; raises :class:`InvalidProgram`."""
        return infer_types(self)

    def summary(self) -> str:
        text = ", ".join(f"{s.kind}/{s.style}" for s in self.statements) or "(no statements)"
        text += "".join(f"; {b.kind} block of {len(b.members)}" for b in self.blocks)
        return text + (f"; {self.frame.summary()}" if self.frame else "")

    def features(self) -> set[str]:
        """The whole-program styles the program uses (counted by :class:`FuzzResult`)."""
        found = set()
        for s in self.statements:
            if s.kind == "head":
                found |= {"head", f"head:{s.style}", f"head-guard:{s.get('guard')}"}
                if s.get("hazard") != "none":
                    found.add(f"head-hazard:{s.get('hazard')}")
                if s.get("stem"):
                    found.add("head-stem")
                if s.get("call", "plain") != "plain":
                    found.add(f"head-call:{s.get('call')}")
        if self.frame:
            found |= {"frame", f"signature:{self.frame.signature}"}
            if self.frame.guard != "none":
                found.add("frame-untraceable")
            if self.frame.layers:
                found |= {"routed", f"loop:{self.frame.loop}"}
                if self.frame.profile != "none":
                    found.add(f"profile:{self.frame.profile}")
                if self.frame.check != "none":
                    found.add(f"isinstance:{self.frame.check}")
        return found


@dataclass(frozen=True)
class Block:
    """Consecutive statements (named by their outputs) written as a child module of their
    own, as models nest blocks. ``kind``: ``traceable``; ``untraceable`` (its forward
    branches on a shape, so symbolic tracing keeps it whole: a leaf, fused inside on its
    own); ``hooked`` (a forward hook keeps it whole too)."""

    members: tuple[str, ...]
    kind: str = "traceable"


@dataclass(frozen=True)
class Frame:
    """The whole program around the statements: how a detector's ``Model`` is written.

    ``signature``: the top-level ``forward`` (``plain``: ``forward(self, x)``; ``augment``:
    ``forward(x, augment=False, profile=False, visualize=False)``; ``args-kwargs``:
    ``forward(x, *args, **kwargs)`` passed on to ``predict(x, profile=False, ...)``;
    ``super``: a base class holds the code, the subclass calls ``super().forward(x)``).
    ``guard``: shape control flow at the top (``none``: the top traces; ``too-large``,
    ``odd-noop``, ``shape-cache``: it does not, and ``fuse`` reads its source).
    ``layers``: the statements split into layers (each a ``Layer<n>`` module, or a head
    itself when ``direct``) run by a routing loop reading ``m.f`` / ``m.i``, or ``()``.
    ``profile``: ``none``; ``dead`` (``if profile: self._profile_one_layer(m, x, dt)``);
    ``visualize`` (``if visualize: feature_visualization(m, x)``); ``live`` (``profile`` is
    passed True and the branch hands ``m`` to ``count_parameters``, which scales ``x``).
    ``loop``: ``for m in self.model``, ``enumerate``, ``index`` (``m = self.model[i]``),
    ``slice-head`` (``for m in self.model[:-1]``, then ``head = self.model[-1]``, called
    with a literal ``None`` when ``head_none``). ``check``: ``isinstance`` in the loop
    (``absent``: a class no layer is; ``module``: ``nn.Module``; ``layer``: a layer's own
    class, whose fused form would answer differently)."""

    signature: str = "plain"
    guard: str = "none"
    layers: tuple[tuple[str, ...], ...] = ()
    profile: str = "none"
    container: str = "sequential"
    loop: str = "for"
    check: str = "none"
    head_none: bool = False
    direct: bool = False

    DEFAULTS = (("signature", "plain"), ("guard", "none"), ("profile", "none"),
                ("container", "sequential"), ("loop", "for"), ("check", "none"),
                ("head_none", False), ("direct", False))

    def summary(self) -> str:
        text = f"frame {self.signature}"
        if self.guard != "none":
            text += f", guard {self.guard}"
        if self.layers:
            text += f", {len(self.layers)} layers ({self.container}, loop {self.loop}"
            text += "".join(f", {name} {getattr(self, name)}" for name in ("profile", "check")
                            if getattr(self, name) != "none")
            text += ", head(x, None)" if self.head_none and self.loop == "slice-head" else ""
            text += ", direct heads" if self.direct else ""
            text += ")"
        return text

    def without(self, name: str) -> "Frame":
        """The frame with one of its members removed (a statement's output) from its layers."""
        layers = tuple(tuple(m for m in layer if m != name) for layer in self.layers)
        return replace(self, layers=tuple(layer for layer in layers if layer))


@dataclass(frozen=True)
class TensorType:
    """A variable's layout and its shape at each of the program's input sizes."""

    layout: str
    shapes: tuple[tuple[int, ...], ...]

    @property
    def rank(self) -> int:
        return len(self.shapes[0])

    @property
    def channels(self) -> int:
        return self.shapes[0][-1] if self.layout == LAST else self.shapes[0][1]

    def spatial(self) -> list[tuple[int, ...]]:
        if self.layout == FIRST:
            return [shape[2:] for shape in self.shapes]
        if self.layout == LAST:
            return [shape[1:-1] for shape in self.shapes]
        return [() for _ in self.shapes]


class InvalidProgram(Exception):
    """A statement does not apply to its inputs (wrong layout, shape, too small)."""


def tensor_type(layout: str, channels: int, spatial_sizes) -> TensorType:
    if layout == FIRST:
        shapes = tuple((BATCH, channels, *s) for s in spatial_sizes)
    elif layout == LAST:
        shapes = tuple((BATCH, *s, channels) for s in spatial_sizes)
    else:
        shapes = tuple((BATCH, channels) for _ in spatial_sizes)
    return TensorType(layout, shapes)


MIN_SIZE = 2  # spatial sizes a shape-changing statement may produce


def checked_sizes(sizes) -> list[tuple[int, ...]]:
    sizes = [tuple(s) for s in sizes]
    if any(n < MIN_SIZE for size in sizes for n in size):
        raise InvalidProgram(f"spatial size {sizes} too small")
    return sizes


def infer_types(program: Program) -> dict[str, TensorType]:
    types_ = {"x": tensor_type(FIRST, program.channels, program.sizes)}
    for statement in program.statements:
        try:
            inputs = [types_[name] for name in statement.inputs]
        except KeyError as missing:
            raise InvalidProgram(f"{statement.output} reads undefined {missing}") from None
        op = OPS[statement.kind]
        if inputs[0].layout not in op.layouts:
            raise InvalidProgram(f"{statement.kind} does not take {inputs[0].layout}")
        if statement.output in types_:
            raise InvalidProgram(f"{statement.output} assigned twice")
        types_[statement.output] = op.output_type(statement, inputs, program)
    for name in program.outputs:
        if name not in types_:
            raise InvalidProgram(f"output {name} undefined")
    return types_


# ---- rendering to source ---------------------------------------------------------------

class SourceWriter:
    """Collects ``__init__`` lines (deduplicated by attribute), ``forward`` lines and
    helper classes while the statements render themselves."""

    def __init__(self, program: Program, types_: dict[str, TensorType]):
        self.program = program
        self.types = types_
        self.dims = program.dims
        self.init_lines: list[str] = []
        self.forward_lines: list[str] = []
        self.helpers: list[str] = []
        self.init_calls: list[tuple[str, tuple[str, ...]]] = []
        self.classes: dict[str, list[str]] = {}  # classes a statement defines (heads), by name
        self._attributes: set[str] = set()

    def init(self, attribute: str, *lines: str) -> None:
        if attribute not in self._attributes:
            self._attributes.add(attribute)
            self.init_lines.extend(lines)
            self.init_calls.append((attribute, lines))

    def forward(self, *lines: str) -> None:
        self.forward_lines.extend(lines)

    def helper(self, name: str) -> None:
        if name not in self.helpers:
            self.helpers.append(name)

    def klass(self, name: str, lines: list[str]) -> None:
        self.classes.setdefault(name, lines)

    def adopt(self, child: "SourceWriter") -> None:
        """The helpers and classes a child module's writer needed."""
        for helper in child.helpers:
            self.helper(helper)
        for name, lines in child.classes.items():
            self.klass(name, lines)

    # spelling helpers
    @property
    def nd(self) -> str:
        return f"{self.dims}d"

    def rank(self, name: str) -> int:
        return self.types[name].rank

    def channel_view(self) -> str:
        """The shape a per-channel vector takes to broadcast over ``(N, C, *S)``."""
        return "(1, -1" + ", 1" * self.dims + ")"

    def c(self, name: str) -> int:
        """The channel count of tensor ``name``."""
        return self.types[name].channels

    def channel_column(self, channels: int) -> str:
        return "(" + ", ".join([str(channels)] + ["1"] * self.dims) + ")"

    def to_last(self, name: str) -> str:
        return f"{name}.movedim(1, -1)"

    def to_first(self, expression: str) -> str:
        return f"{expression}.movedim(-1, 1)"

    def permute_last(self) -> str:
        if self.dims == 1:
            return "transpose(1, 2)"
        return f"permute(0, {', '.join(str(d) for d in range(2, self.dims + 2))}, 1)"

    def permute_first(self) -> str:
        if self.dims == 1:
            return "transpose(1, 2)"
        return f"permute(0, {self.dims + 1}, {', '.join(str(d) for d in range(1, self.dims + 1))})"

    def shape_names(self) -> str:
        return {1: "B, C, L", 2: "B, C, H, W", 3: "B, C, D, H, W"}[self.dims]

    def spatial_axes(self) -> str:
        return "2" if self.dims == 1 else f"({', '.join(str(d) for d in range(2, self.dims + 2))})"


HELPER_SOURCES = {
    "BatchNormAct": '''\
class BatchNormAct{dims}d(nn.BatchNorm{dims}d):
    """timm's BatchNormAct2d: a BatchNorm subclass whose forward calls F.batch_norm itself."""

    def __init__(self, num_features, eps=1e-5, apply_act=False):
        super().__init__(num_features, eps=eps)
        self.act = nn.ReLU() if apply_act else nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == {rank}, f"expected {rank}D input (got {{x.ndim}}D input)")
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, bn_training, exponential_average_factor, self.eps)
        return self.act(x)
''',
    "FrozenBatchNorm": '''\
class FrozenBatchNorm{dims}d(nn.Module):
    """torchvision's FrozenBatchNorm2d: statistics as buffers, scale and shift computed."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.rand(num_features) + 0.5)
        self.register_buffer("bias", torch.randn(num_features))
        self.register_buffer("running_mean", torch.randn(num_features))
        self.register_buffer("running_var", torch.rand(num_features) + 0.5)

    def forward(self, x):
        w = self.weight.reshape({view})
        b = self.bias.reshape({view})
        rv = self.running_var.reshape({view})
        rm = self.running_mean.reshape({view})
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias
''',
    "StdConv": '''\
class StdConv{dims}d(nn.Conv{dims}d):
    """timm's StdConv2d: weights standardised in forward by F.batch_norm(training=True)."""

    def __init__(self, *args, eps=1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None,
            training=True, momentum=0., eps=self.eps).reshape_as(self.weight)
        return F.conv{dims}d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
''',
    "LayerScaleNd": '''\
class LayerScale{dims}d(nn.Module):
    """timm's LayerScale2d: a per-channel scale, in place if asked."""

    def __init__(self, dim, init_values=1e-5, inplace=False):
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        gamma = self.gamma.view{view}
        return x.mul_(gamma) if self.inplace else x * gamma
''',
    "LayerScale": '''\
class LayerScale(nn.Module):
    """timm's LayerScale, on channels-last tokens."""

    def __init__(self, dim, init_values=1e-5, inplace=False):
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x.mul_(self.gamma) if self.inplace else x * self.gamma
''',
    "Implicit": '''\
class ImplicitA(nn.Module):
    """YOLOv7's ImplicitA: a learned shift, shaped (1, C, 1, 1) (it adds a batch dim)."""

    def __init__(self, channel, mean=0.0, std=0.5):
        super().__init__()
        self.channel = channel
        self.implicit = nn.Parameter(torch.zeros(1, channel{ones}))
        nn.init.normal_(self.implicit, mean=mean, std=std)

    def forward(self, x):
        return self.implicit + x


class ImplicitM(nn.Module):
    """YOLOv7's ImplicitM: a learned scale, shaped (1, C, 1, 1)."""

    def __init__(self, channel, mean=1.0, std=0.5):
        super().__init__()
        self.channel = channel
        self.implicit = nn.Parameter(torch.ones(1, channel{ones}))
        nn.init.normal_(self.implicit, mean=mean, std=std)

    def forward(self, x):
        return self.implicit * x
''',
    "count_parameters": '''\
def count_parameters(module):
    """A function a module is handed to: it reads the module's parameters."""
    return sum(p.numel() for p in module.parameters())
''',
    "scaled": '''\
def scaled(x, factor):
    """x (a tensor, or a list or tuple of them) times factor."""
    if isinstance(x, (list, tuple)):
        return [scaled(t, factor) for t in x]
    return x * factor
''',
    "feature_visualization": '''\
def feature_visualization(module, x):
    """What a visualize branch hands its layer to (the branch never runs here)."""
    raise RuntimeError(f"visualize {{type(module).__name__}}")
''',
    "Detect": '''\
class Detect(nn.Module):
    """A head class no layer of the program is: isinstance(m, Detect) is False for all."""


class Segment(Detect):
    pass
''',
    "observe": '''\
def observe(module, inputs, output):
    """A forward hook that only looks."""
    module.calls = getattr(module, "calls", 0) + 1
''',
    "double_output": '''\
def double_output(module, inputs, output):
    """A forward hook that changes the module's output."""
    return output * 2.0
''',
}


def render_source(program: Program) -> str:
    types_ = infer_types(program)
    writer = SourceWriter(program, types_)
    if program.frame is not None:
        block_classes, program_lines = _render_framed(program, types_, writer)
    else:
        block_classes = _render_range(program, 0, len(program.statements), types_, writer)
        program_lines = _class_lines("Program", writer, ("x",), program.outputs)
    lines = ["import torch", "import torch.nn as nn", "import torch.nn.functional as F", "", ""]
    for helper in writer.helpers:
        lines += HELPER_SOURCES[helper].format(
            dims=program.dims, rank=program.dims + 2, view=writer.channel_view(),
            ones=", 1" * program.dims).splitlines()
        lines += ["", ""]
    for class_lines in writer.classes.values():
        lines += class_lines + ["", ""]
    lines += block_classes
    lines += program_lines
    return "\n".join(lines)


def _render_range(program: Program, start: int, stop: int, types_, writer: SourceWriter) -> list[str]:
    """Render ``program.statements[start:stop]`` into ``writer``; returns the classes of the
    blocks among them."""
    block_of = {name: block for block in program.blocks for name in block.members}
    block_classes: list[str] = []
    statements = program.statements
    index = start
    while index < stop:
        block = block_of.get(statements[index].output)
        if block is None:
            OPS[statements[index].kind].render(statements[index], writer)
            index += 1
            continue
        members = []
        while index < stop and statements[index].output in block.members:
            members.append(statements[index])
            index += 1
        if len(members) != len(block.members):
            raise InvalidProgram("a block's statements are not consecutive (or span layers)")
        block_classes += _render_block(program, block, members, statements[index:], types_, writer)
    return block_classes


def _class_lines(name: str, writer: SourceWriter, arguments, returned, guard=()) -> list[str]:
    lines = [f"class {name}(nn.Module):", "    def __init__(self):", "        super().__init__()"]
    lines += ["        " + line for line in writer.init_lines]
    lines += ["", f"    def forward(self, {', '.join(arguments)}):"]
    lines += ["        " + line for line in list(guard) + writer.forward_lines]
    if returned:
        lines.append(f"        return {', '.join(returned)}")
    return lines + ["", ""]


def _render_block(program, block, members, after, types_, parent: SourceWriter) -> list[str]:
    """Write ``members`` as ``class Block<n>``; call it from ``parent``."""
    writer = SourceWriter(program, types_)
    for statement in members:
        OPS[statement.kind].render(statement, writer)
    parent.adopt(writer)
    defined = {s.output for s in members}
    arguments = list(dict.fromkeys(n for s in members for n in s.inputs if n not in defined))
    read_after = {n for s in after for n in s.inputs} | set(program.outputs)
    returned = [s.output for s in members if s.output in read_after]
    name = f"Block{members[0].number}"
    attribute = f"block{members[0].number}"
    guard = ()
    if block.kind == "untraceable":  # control flow on a shape: symbolic tracing fails here
        guard = (f"if {arguments[0]}.shape[-1] > 4096:", '    raise ValueError("input too large")')
    parent.init(attribute, f"self.{attribute} = {name}()")
    if block.kind == "hooked":
        parent.helper("observe")
        parent.init(f"{attribute}_hook", f"self.{attribute}.register_forward_hook(observe)")
    call = f"self.{attribute}({', '.join(arguments)})"
    parent.forward(f"{', '.join(returned)} = {call}" if returned else call)
    return _class_lines(name, writer, arguments, returned, guard)


# ---- whole programs: the frame around the statements --------------------------------------

@dataclass
class _Layer:
    """One entry of a routed program's layer list: its position, ``m.f``, what it returns,
    and how it is built (``Layer<n>()``, a head class, or ``nn.Identity()`` for the input)."""

    position: int
    f: object
    outputs: list
    build: str
    members: tuple = ()
    single: bool = True  # returns one tensor (not a tuple)


def _layer_plan(program: Program, types_, writer: SourceWriter) -> tuple[list[_Layer], list[str]]:
    """The layers of a routed program, their classes rendered (``writer`` adopts what they
    need); returns ``(layers, class source lines)``."""
    frame = program.frame
    order = [s.output for s in program.statements]
    if [m for layer in frame.layers for m in layer] != order:
        raise InvalidProgram("the layers do not split the statements in order")
    by_output = {s.output: s for s in program.statements}
    defined = {m: k for k, layer in enumerate(frame.layers) for m in layer}
    count = len(frame.layers)
    needs = []
    for k, layer in enumerate(frame.layers):
        names = [n for m in layer for n in by_output[m].inputs if defined.get(n) != k]
        if k == count - 1:
            names += [n for n in program.outputs if defined.get(n) != k]
        needs.append(list(dict.fromkeys(names)))
    offset = 1 if any("x" in needs[k] for k in range(1, count)) else 0
    outputs = []
    for k, layer in enumerate(frame.layers):
        if k == count - 1:
            outputs.append(list(program.outputs))
        else:
            later = {n for j in range(k + 1, count) for n in needs[j]}
            outputs.append([m for m in layer if m in later] or [layer[-1]])

    def producer(name: str) -> int:  # a position in the layer list (-1: the loop's input)
        return (0 if offset else -1) if name == "x" else offset + defined[name]

    def produced(position: int) -> list:
        return ["x"] if position < offset else outputs[position - offset]

    layers = [_Layer(0, -1, ["x"], "nn.Identity()")] if offset else []
    classes: list[str] = []
    start = 0
    block_of = {name for block in program.blocks for name in block.members}
    for k, members in enumerate(frame.layers):
        position = offset + k
        producers = list(dict.fromkeys(producer(n) for n in needs[k]))
        if producers == [position - 1]:
            f = -1
        elif len(producers) == 1:
            f = producers[0]
        else:
            f = [-1 if j == position - 1 else j for j in producers]
        statement = by_output[members[0]]
        last = k == count - 1
        if (frame.direct and len(members) == 1 and statement.kind == "head"
                and statement.get("call", "plain") == "plain"
                and members[0] not in block_of and len(statement.inputs) >= 2
                and needs[k] == list(statement.inputs)
                and producers == [producer(n) for n in statement.inputs]
                and all(len(produced(j)) == 1 for j in producers)
                and outputs[k] == [statement.output]):
            scratch = SourceWriter(program, types_)
            OPS["head"].render(statement, scratch)  # (its class; the call is the loop's)
            writer.adopt(scratch)
            layers.append(_Layer(position, f, outputs[k], f"Head{statement.number}()", members))
        else:
            inner = SourceWriter(program, types_)
            stop = start + len(members)
            classes += _render_range(program, start, stop, types_, inner)
            writer.adopt(inner)
            prologue = []
            for name in sorted(needs[k], key=lambda n: n == "x"):  # x (the argument) last
                j = producer(name)
                base = "x" if len(producers) == 1 else f"x[{producers.index(j)}]"
                expression = base if len(produced(j)) == 1 else f"{base}[{produced(j).index(name)}]"
                if expression != name:
                    prologue.append(f"{name} = {expression}")
            arguments = ["x"]
            takes_none = last and frame.loop == "slice-head" and frame.head_none
            if takes_none:
                arguments.append("batch=None")
                prologue = ["if batch is not None:", "    return batch"] + prologue
            name = f"Layer{position}"
            classes += _class_lines(name, inner, arguments, outputs[k], guard=prologue)
            layers.append(_Layer(position, f, outputs[k], f"{name}()", members, len(outputs[k]) == 1))
        start += len(members)
    return layers, classes


def _routing_loop(program: Program, layers: list[_Layer], writer: SourceWriter) -> list[str]:
    """The body of a routed program's forward: the loop over ``self.model``."""
    frame = program.frame
    sliced = frame.loop == "slice-head" and len(layers) >= 2
    looped = layers[:-1] if sliced else layers
    lines = ["y, dt = [], []" if frame.profile == "dead" else "y = []"]
    counter = "m.i"
    if frame.loop == "enumerate":
        lines.append("for i, m in enumerate(self.model):")
        counter = "i"
    elif frame.loop == "index":
        lines += ["for i in range(len(self.model)):", "    m = self.model[i]"]
    elif sliced:
        lines.append("for m in self.model[:-1]:")
    else:
        lines.append("for m in self.model:")
    route = "x = y[{m}.f] if isinstance({m}.f, int) else [x if j == -1 else y[j] for j in {m}.f]"
    lines += ["    if m.f != -1:", "        " + route.format(m="m")]
    if frame.check == "absent":
        writer.helper("Detect")
        lines += ["    if isinstance(m, (Detect, Segment)):", "        break"]
    elif frame.check == "module":
        lines += ["    if not isinstance(m, nn.Module):", '        raise TypeError("a layer is no module")']
    if frame.profile == "dead":
        lines += ["    if profile:", "        self._profile_one_layer(m, x, dt)"]
    elif frame.profile == "live":
        writer.helper("scaled")
        writer.helper("count_parameters")
        lines += ["    if profile:", "        x = scaled(x, 1.0 + 1e-4 * count_parameters(m))"]
    checked = next((layer for layer in looped if layer.single and layer.build.startswith("Layer")), None)
    if frame.check == "layer" and checked is not None:
        lines.append(f"    x = m(x) * 2.0 if isinstance(m, {checked.build[:-2]}) else m(x)")
    else:
        lines.append("    x = m(x)")
    lines.append(f"    y.append(x if {counter} in self.save else None)")
    if frame.profile == "visualize":
        writer.helper("feature_visualization")
        lines += ["    if visualize:", "        feature_visualization(m, x)"]
    if sliced:
        call = "head(x, None)" if frame.head_none and (
            layers[-1].build.startswith("Layer") or _zip_head(program, layers[-1])) else "head(x)"
        lines += ["head = self.model[-1]", "if head.f != -1:", "    " + route.format(m="head"),
                  f"return {call}"]
    else:
        lines.append("return x")
    return lines


def _zip_head(program: Program, layer: _Layer) -> bool:
    """Whether a layer is a head whose forward takes ``batch=None``."""
    if not layer.build.startswith("Head"):
        return False
    statement = next(s for s in program.statements if s.output == layer.members[0])
    return statement.style == "zip"


_GUARDS = {"too-large": ["if x.shape[-1] > 4096:", '    raise ValueError("input too large")'],
           "odd-noop": ["if x.shape[-1] % 2:", "    x = x.contiguous()"],
           "shape-cache": ["if self.input_shape != x.shape:", "    self.input_shape = x.shape"]}


def _render_framed(program: Program, types_, writer: SourceWriter) -> tuple[list[str], list[str]]:
    """``(classes, Program class lines)`` of a program with a :class:`Frame`."""
    frame = program.frame
    classes: list[str] = []
    if frame.layers:
        layers, classes = _layer_plan(program, types_, writer)
        init = [f"layers = [{', '.join(layer.build for layer in layers)}]",
                f"froms = {[layer.f for layer in layers]!r}",
                "for i, (f, m) in enumerate(zip(froms, layers)):",
                "    m.f, m.i, m.type = f, i, type(m).__name__",
                "self.model = nn.Sequential(*layers)" if frame.container == "sequential"
                else "self.model = nn.ModuleList(layers)"]
        save = sorted({j for layer in layers for j in ([layer.f] if isinstance(layer.f, int) else layer.f)
                       if j >= 0})
        init.append(f"self.save = {save!r}")
        body = _routing_loop(program, layers, writer)
    else:
        classes = _render_range(program, 0, len(program.statements), types_, writer)
        init = list(writer.init_lines)
        body = list(writer.forward_lines) + [f"return {', '.join(program.outputs)}"]
    body = _GUARDS.get(frame.guard, []) + body
    live = frame.profile == "live" and bool(frame.layers)
    methods = []  # (signature, body lines)
    once = "_forward_once(self, x, profile=False, visualize=False)"
    forward_call = "self._forward_once(x, True)" if live else "self._forward_once(x)"
    if frame.signature == "plain":
        if frame.profile == "none" or not frame.layers:
            methods.append(("forward(self, x)", body))
        else:
            methods += [("forward(self, x)", [f"return {forward_call}"]), (once, body)]
    elif frame.signature == "augment":
        default = "True" if live else "False"
        methods += [(f"forward(self, x, augment=False, profile={default}, visualize=False)",
                     ["if augment:", "    return self._forward_augment(x)",
                      "return self._forward_once(x, profile, visualize)"]),
                    ("_forward_augment(self, x)", ["return self._forward_once(x.flip(-1))"]),
                    (once, body)]
    elif frame.signature == "args-kwargs":
        passed = "*args, profile=True, **kwargs" if live else "*args, **kwargs"
        methods += [("forward(self, x, *args, **kwargs)",
                     ["if isinstance(x, dict):", "    return self.loss(x, *args, **kwargs)",
                      f"return self.predict(x, {passed})"]),
                    ("loss(self, batch, *args, **kwargs)", ['raise NotImplementedError("training only")']),
                    ("predict(self, x, profile=False, visualize=False, augment=False, embed=None)",
                     ["if augment:", "    return self._predict_augment(x)",
                      "return self._predict_once(x, profile, visualize, embed)"]),
                    ("_predict_augment(self, x)", ["return self._predict_once(x.flip(-1))"]),
                    ("_predict_once(self, x, profile=False, visualize=False, embed=None)", body)]
    elif frame.signature == "super":
        methods += [("forward(self, x, profile=False, visualize=False)",
                     ["return self._forward_once(x, profile, visualize)"]), (once, body)]
    else:
        raise ValueError(frame.signature)
    if frame.profile == "dead" and frame.layers:
        writer.helper("count_parameters")
        methods.append(("_profile_one_layer(self, m, x, dt)", ["dt.append(count_parameters(m))"]))
    attributes = ["input_shape = None"] if frame.guard == "shape-cache" else []
    if frame.signature == "super":
        lines = _program_class("ProgramBase", "nn.Module", attributes, init, methods)
        lines += _program_class("Program", "ProgramBase", [], None, [(
            "forward(self, x)", ["return super().forward(x, True)" if live else "return super().forward(x)"])])
    else:
        lines = _program_class("Program", "nn.Module", attributes, init, methods)
    return classes, lines


def _program_class(name: str, base: str, attributes, init, methods) -> list[str]:
    lines = [f"class {name}({base}):"] + ["    " + line for line in attributes]
    if attributes:
        lines.append("")
    if init is not None:
        lines += ["    def __init__(self):", "        super().__init__()"] + ["        " + line for line in init]
        lines.append("")
    for signature, body in methods:
        lines += [f"    def {signature}:"] + ["        " + line for line in body] + [""]
    return lines + [""]


# ---- the ops ---------------------------------------------------------------------------

class Op:
    """A statement kind: how it is generated, its output type, its source, simpler forms."""

    name = ""
    layouts: tuple[str, ...] = (FIRST,)  # layouts its (first) input may have
    arity = 1  # 1, 2 (same type), or "n" (2..4 inputs of one type)
    weight = 1.0
    default_style = ""

    def styles(self, layout: str, dims: int) -> list[tuple[float, str]]:
        raise NotImplementedError

    def generate(self, gen: "Generator", inputs: tuple[str, ...]) -> Statement:
        layout = gen.types[inputs[0]].layout
        return Statement(self.name, gen.next_name(), inputs,
                         gen.weighted(self.styles(layout, gen.dims)), self.random_options(gen, inputs))

    def random_options(self, gen: "Generator", inputs) -> tuple:
        return ()

    def output_type(self, statement: Statement, inputs: list[TensorType], program: Program) -> TensorType:
        """Default: same type as the input (and all inputs must agree)."""
        if any(t != inputs[0] for t in inputs[1:]):
            raise InvalidProgram(f"{statement.kind}: inputs of different shapes")
        return inputs[0]

    def render(self, statement: Statement, out: SourceWriter) -> None:
        raise NotImplementedError

    def simpler(self, statement: Statement, program: Program) -> Iterator[Statement]:
        """Simpler variants of ``statement`` (the shrinker keeps those that still fail)."""
        default = self.default_style
        if default and statement.style != default:
            yield replace(statement, style=default)
        if statement.get("bias"):
            yield statement.with_options(bias=False)


def _spatial_out(size, kernel, stride, padding_total, dilation=1):
    span = dilation * (kernel - 1) + 1
    if size + padding_total < span:
        raise InvalidProgram("kernel larger than its padded input")
    return (size + padding_total - span) // stride + 1


class Conv(Op):
    name, weight, default_style = "conv", 7.0, "module"

    def styles(self, layout, dims):
        return [(8, "module"), (3, "functional"), (3, "sequential-bn"), (1, "forward-hook"),
                (1, "computed-weight"), (1, "std-conv")]

    def generate(self, gen, inputs):
        statement = super().generate(gen, inputs)
        fan_in = gen.types[inputs[0]].channels // statement.get("groups") * statement.get("kernel") ** gen.dims
        if statement.style == "std-conv" and fan_in == 1:  # nothing to standardise over
            statement = replace(statement, style="module")
        padding = statement.get("padding")
        if (statement.style in ("module", "sequential-bn") and padding != "same" and padding > 0
                and gen.rng.random() < 0.08):
            statement = statement.with_options(padding_mode=gen.rng.choice(("reflect", "replicate", "circular")))
        return statement

    def random_options(self, gen, inputs):
        rng, channels = gen.rng, gen.types[inputs[0]].channels
        kernel = rng.choice((1, 1, 2, 3, 3, 3, 3, 5))
        stride = 2 if rng.random() < 0.1 else 1
        dilation = 2 if kernel > 1 and rng.random() < 0.15 else 1
        out_channels = _random_out_channels(gen, inputs[0])
        groups = gen.weighted([(5, 1)] + [(3 if g == channels else 1, g) for g in (2, channels)
                                         if 1 < g and channels % g == 0 and out_channels % g == 0])
        centred = dilation * (kernel - 1) // 2
        if stride == 1 and rng.random() < 0.2:
            padding = "same"
        elif rng.random() < 0.75:
            padding = centred
        else:
            padding = rng.randint(0, centred + 1)
        return options(kernel=kernel, stride=stride, dilation=dilation, groups=groups,
                       bias=rng.random() < 0.4, padding=padding, out_channels=out_channels)

    def output_type(self, s, inputs, program):
        k, stride, d, p = s.get("kernel"), s.get("stride"), s.get("dilation"), s.get("padding")
        channels = s.get("out_channels") or inputs[0].channels
        if p == "same":
            if stride != 1:
                raise InvalidProgram("padding='same' needs stride 1")
            return tensor_type(FIRST, channels, inputs[0].spatial())
        sizes = [[_spatial_out(n, k, stride, 2 * p, d) for n in size] for size in inputs[0].spatial()]
        return tensor_type(FIRST, channels, checked_sizes(sizes))

    @staticmethod
    def channels(s, out) -> tuple[int, int]:
        cin = out.c(s.inputs[0])
        return cin, s.get("out_channels") or cin

    def arguments(self, s, out, functional=False) -> str:
        k, stride, d, g, p = (s.get(n) for n in ("kernel", "stride", "dilation", "groups", "padding"))
        if functional:
            return f"{stride}, {p!r}, {d}, {g}"
        cin, cout = self.channels(s, out)
        text = f"{cin}, {cout}, {k}"
        if stride != 1:
            text += f", stride={stride}"
        if p != 0:
            text += f", padding={p!r}"
        if d != 1:
            text += f", dilation={d}"
        if g != 1:
            text += f", groups={g}"
        if not s.get("bias"):
            text += ", bias=False"
        if s.get("padding_mode", "zeros") != "zeros":
            text += f", padding_mode={s.get('padding_mode')!r}"
        return text

    def render(self, s, out):
        n, a = s.number, s.inputs[0]
        if s.style in ("functional", "computed-weight"):
            k, g = s.get("kernel"), s.get("groups")
            cin, c = self.channels(s, out)
            fan_in = (cin // g) * k ** out.dims
            shape = ", ".join(map(str, (c, cin // g) + (k,) * out.dims))
            out.init(f"conv{n}_weight",
                     f"self.conv{n}_weight = nn.Parameter(torch.randn({shape}) * {fan_in ** -0.5:.4f})")
            bias = f"self.conv{n}_bias" if s.get("bias") else "None"
            if s.get("bias"):
                out.init(f"conv{n}_bias", f"self.conv{n}_bias = nn.Parameter(torch.randn({c}) * 0.1)")
            weight = f"self.conv{n}_weight"
            if s.style == "computed-weight":  # a weight computed from parameters in forward
                out.init(f"gamma{n}", f"self.gamma{n} = nn.Parameter(torch.ones({c}))")
                weight = f"self.conv{n}_weight * self.gamma{n}.reshape(-1{', 1' * (out.dims + 1)})"
            out.forward(f"{s.output} = F.conv{out.nd}({a}, {weight}, {bias}, "
                        f"{self.arguments(s, out, functional=True)})")
            return
        klass = f"nn.Conv{out.nd}"
        if s.style == "std-conv":
            out.helper("StdConv")
            klass = f"StdConv{out.nd}"
        conv = f"{klass}({self.arguments(s, out)})"
        if s.style == "sequential-bn":
            conv = f"nn.Sequential({conv}, nn.BatchNorm{out.nd}({self.channels(s, out)[1]}))"
        out.init(f"conv{n}", f"self.conv{n} = {conv}")
        if s.style == "forward-hook":
            out.helper("double_output")
            out.init(f"conv{n}_hook", f"self.conv{n}.register_forward_hook(double_output)")
        out.forward(f"{s.output} = self.conv{n}({a})")

    def simpler(self, s, program):
        yield from super().simpler(s, program)
        if s.get("padding_mode", "zeros") != "zeros":
            yield s.with_options(padding_mode="zeros")
        if s.get("groups") != 1:
            yield s.with_options(groups=1)
        if s.get("dilation") != 1:
            k = s.get("kernel")
            padding = s.get("padding")
            yield s.with_options(dilation=1, padding=padding if padding == "same"
                                 else max(0, padding - (k - 1) // 2 * (s.get("dilation") - 1)))
        if s.get("padding") == "same":
            yield s.with_options(padding=(s.get("kernel") - 1) * s.get("dilation") // 2)
        if s.get("kernel") != 1:
            yield s.with_options(kernel=1, padding=0, dilation=1)
            yield s.with_options(kernel=1, padding=0, dilation=1, stride=1)


class BatchNorm(Op):
    name, weight, default_style = "batchnorm", 6.0, "module"

    def styles(self, layout, dims):
        styles = [(6, "module"), (1, "affine-false"), (2, "functional"), (1, "functional-training-flag"),
                  (2, "subclass-act"), (1, "sync"), (1, "frozen"), (2, "tokens-1d"), (1, "tokens-1d-reshape")]
        return styles

    def random_options(self, gen, inputs):
        return options(eps=gen.rng.choice((1e-5, 1e-5, 1e-3, 0.1)), act=gen.rng.random() < 0.25)

    def render(self, s, out):
        n, a, c, eps = s.number, s.inputs[0], out.c(s.inputs[0]), s.get("eps")
        eps_argument = "" if eps == 1e-5 else f", eps={eps}"
        style = s.style
        if style in ("module", "affine-false", "sync"):
            klass = "nn.SyncBatchNorm" if style == "sync" else f"nn.BatchNorm{out.nd}"
            affine = ", affine=False" if style == "affine-false" else ""
            out.init(f"bn{n}", f"self.bn{n} = {klass}({c}{eps_argument}{affine})")
            out.forward(f"{s.output} = self.bn{n}({a})")
        elif style in ("functional", "functional-training-flag"):
            out.init(f"bn{n}",
                     f'self.register_buffer("bn{n}_mean", torch.randn({c}))',
                     f'self.register_buffer("bn{n}_var", torch.rand({c}) + 0.5)',
                     f"self.bn{n}_weight = nn.Parameter(torch.randn({c}))",
                     f"self.bn{n}_bias = nn.Parameter(torch.randn({c}))")
            training = "self.training" if style == "functional-training-flag" else "False"
            out.forward(f"{s.output} = F.batch_norm({a}, self.bn{n}_mean, self.bn{n}_var, "
                        f"self.bn{n}_weight, self.bn{n}_bias, {training}, 0.1, {eps})")
        elif style == "subclass-act":
            out.helper("BatchNormAct")
            act = ", apply_act=True" if s.get("act") else ""
            out.init(f"bn{n}", f"self.bn{n} = BatchNormAct{out.nd}({c}{eps_argument}{act})")
            out.forward(f"{s.output} = self.bn{n}({a})")
        elif style == "frozen":
            out.helper("FrozenBatchNorm")
            out.init(f"bn{n}", f"self.bn{n} = FrozenBatchNorm{out.nd}({c}{eps_argument})")
            out.forward(f"{s.output} = self.bn{n}({a})")
        elif style in ("tokens-1d", "tokens-1d-reshape"):
            out.init(f"bn{n}", f"self.bn{n} = nn.BatchNorm1d({c}{eps_argument})")
            out.forward(f"t{n} = {out.to_last(a)}")
            if style == "tokens-1d":
                out.forward(f"{s.output} = self.bn{n}(t{n}.flatten(0, -2)).reshape_as(t{n}).movedim(-1, 1)")
            else:
                out.forward(f"{s.output} = self.bn{n}(t{n}.reshape(-1, {c})).reshape(t{n}.shape).movedim(-1, 1)")
        else:
            raise ValueError(style)

    def simpler(self, s, program):
        yield from super().simpler(s, program)
        if s.get("eps") != 1e-5:
            yield s.with_options(eps=1e-5)
        if s.get("act"):
            yield s.with_options(act=False)


class Identity(Op):
    name, weight, default_style = "identity", 3.0, "alias"
    layouts = (FIRST, LAST, VECTOR)

    def styles(self, layout, dims):
        styles = [(3, "module"), (3, "dropout"), (1, "functional-dropout"), (2, "alias")]
        if layout == FIRST:
            styles.append((1, "assert-alias"))
        return styles

    def random_options(self, gen, inputs):
        return options(p=gen.rng.choice((0.1, 0.5)))

    def render(self, s, out):
        n, a = s.number, s.inputs[0]
        if s.style == "module":
            out.init(f"id{n}", f"self.id{n} = nn.Identity()")
            out.forward(f"{s.output} = self.id{n}({a})")
        elif s.style == "dropout":
            out.init(f"drop{n}", f"self.drop{n} = nn.Dropout({s.get('p')})")
            out.forward(f"{s.output} = self.drop{n}({a})")
        elif s.style == "functional-dropout":
            out.forward(f"{s.output} = F.dropout({a}, {s.get('p')}, self.training)")
        elif s.style == "alias":
            out.forward(f"{s.output} = {a}")
        elif s.style == "assert-alias":
            rank = out.rank(a)
            out.forward(f'torch._assert({a}.ndim == {rank}, "expected a {rank}D input")',
                        f"{s.output} = {a}")
        else:
            raise ValueError(s.style)


class Scale(Op):
    """Per-channel or scalar scale / shift, out of place or in place."""

    name, weight, default_style = "scale", 4.0, "scalar-mul"
    layouts = (FIRST, LAST, VECTOR)

    def styles(self, layout, dims):
        styles = [(2, "scalar-mul"), (1, "scalar-rmul"), (1, "scalar-div"), (1, "scalar-add"),
                  (1, "scalar-rsub"), (1, "neg"), (3, "param-mul"), (1, "param-shift"),
                  (2, "param-mul_"), (1, "scalar-imul"), (1, "scalar-idiv"), (1, "param-imul-then-alias")]
        if layout == FIRST:
            styles += [(2, "param-column"), (1, "buffer-column"), (1, "param-unsqueeze")]
        if layout in (FIRST, LAST):
            styles += [(1, "layerscale-module"), (1, "layerscale-module-inplace")]
        return styles

    def random_options(self, gen, inputs):
        return options(value=gen.rng.choice((0.5, 2.0, -1.5, 3.0)))

    def render(self, s, out):
        n, a, c, value = s.number, s.inputs[0], out.c(s.inputs[0]), s.get("value")
        layout = out.types[a].layout
        view = f".view{out.channel_view()}" if layout == FIRST else ""
        o = s.output
        style = s.style
        if style.startswith("layerscale-module"):
            helper = "LayerScaleNd" if layout == FIRST else "LayerScale"
            out.helper(helper)
            klass = f"LayerScale{out.nd}" if layout == FIRST else "LayerScale"
            inplace = ", inplace=True" if style.endswith("inplace") else ""
            out.init(f"ls{n}", f"self.ls{n} = {klass}({c}{inplace})")
            out.forward(f"{o} = self.ls{n}({a})")
            return
        if style.startswith("param") or style.startswith("buffer"):
            name = f"beta{n}" if style == "param-shift" else f"gamma{n}"
            if style in ("param-column", "buffer-column"):
                shape, view = out.channel_column(c), ""
            else:
                shape = f"{c}"
            if style == "buffer-column":
                out.init(name, f'self.register_buffer("{name}", torch.rand{shape} + 0.5)')
            else:
                out.init(name, f"self.{name} = nn.Parameter(1e-5 * torch.ones({shape}))")
            factor = f"self.{name}{view}"
            if style == "param-unsqueeze":
                factor = f"self.{name}" + ".unsqueeze(-1)" * out.dims
            if style in ("param-mul", "param-unsqueeze"):
                out.forward(f"{o} = {a} * {factor}")
            elif style in ("param-column", "buffer-column"):
                out.forward(f"{o} = {factor} * {a}")
            elif style == "param-shift":
                out.forward(f"{o} = {a} + {factor}")
            elif style == "param-mul_":
                out.forward(f"{o} = {a}.mul_({factor})")
            elif style == "param-imul-then-alias":
                out.forward(f"{a} *= {factor}", f"{o} = {a}")
            else:
                raise ValueError(style)
            return
        if style == "scalar-mul":
            out.forward(f"{o} = {a} * {value}")
        elif style == "scalar-rmul":
            out.forward(f"{o} = {value} * {a}")
        elif style == "scalar-div":
            out.forward(f"{o} = {a} / {value}")
        elif style == "scalar-add":
            out.forward(f"{o} = {a} + {value}")
        elif style == "scalar-rsub":
            out.forward(f"{o} = {value} - {a}")
        elif style == "neg":
            out.forward(f"{o} = -{a}")
        elif style == "scalar-imul":
            out.forward(f"{o} = {a}", f"{o} *= {value}")
        elif style == "scalar-idiv":
            out.forward(f"{a} /= {value}", f"{o} = {a}")
        else:
            raise ValueError(style)


class AvgPool(Op):
    name, weight, default_style = "avgpool", 2.0, "module"

    def styles(self, layout, dims):
        return [(3, "module"), (2, "functional"), (2, "padded-module")]

    def random_options(self, gen, inputs):
        rng = gen.rng
        kernel = rng.choice((2, 3, 3))
        count = 2 if gen.dims == 1 or rng.random() < 0.5 else 4
        return options(kernel=kernel, stride=2 if rng.random() < 0.1 else 1,
                       padding=rng.choice((0, kernel // 2, kernel // 2)),
                       count_include_pad=rng.random() < 0.85,
                       pads=tuple(rng.randint(0, 2) for _ in range(count)))

    def output_type(self, s, inputs, program):
        k, stride, p = s.get("kernel"), s.get("stride"), s.get("padding")
        spatial = [list(size) for size in inputs[0].spatial()]
        if s.style == "padded-module":  # F.pad first (last dim first, as F.pad reads pads)
            pads = s.get("pads")
            for size in spatial:
                for i in range(len(pads) // 2):
                    size[len(size) - 1 - i] += pads[2 * i] + pads[2 * i + 1]
        sizes = [[_spatial_out(n, k, stride, 2 * p) for n in size] for size in spatial]
        return tensor_type(FIRST, inputs[0].channels, checked_sizes(sizes))

    def render(self, s, out):
        n, a = s.number, s.inputs[0]
        k, stride, p = s.get("kernel"), s.get("stride"), s.get("padding")
        extra = "" if s.get("count_include_pad") else ", count_include_pad=False"
        if s.style in ("module", "padded-module"):
            out.init(f"pool{n}", f"self.pool{n} = nn.AvgPool{out.nd}({k}, {stride}, {p}{extra})")
            argument = f"F.pad({a}, {s.get('pads')})" if s.style == "padded-module" else a
            out.forward(f"{s.output} = self.pool{n}({argument})")
        else:
            out.forward(f"{s.output} = F.avg_pool{out.nd}({a}, {k}, {stride}, {p}{extra})")

    def simpler(self, s, program):
        yield from super().simpler(s, program)
        if not s.get("count_include_pad"):
            yield s.with_options(count_include_pad=True)
        if s.get("stride") != 1:
            yield s.with_options(stride=1)


class Pad(Op):
    """``F.pad`` / ``nn.ZeroPad2d`` / ``nn.ConstantPad2d``: zero, constant or reflect padding,
    negative pads crop."""

    name, weight, default_style = "pad", 1.5, "functional"

    def styles(self, layout, dims):
        return [(3, "functional"), (2, "module")]

    def random_options(self, gen, inputs):
        rng = gen.rng
        mode = gen.weighted([(12, "constant"), (1, "reflect"), (1, "replicate")])
        if mode == "constant":  # F.pad reads pads from the last dim backwards: any prefix will do
            count = 2 * rng.randint(1, gen.dims)
        else:
            count = 2 * gen.dims
        low = -1 if mode == "constant" and rng.random() < 0.15 else 0
        pads = tuple(rng.randint(low, 2) for _ in range(count))
        value = 0.0 if mode != "constant" or rng.random() < 0.85 else 0.5
        return options(pads=pads, mode=mode, value=value)

    def output_type(self, s, inputs, program):
        pads = s.get("pads")
        sizes = []
        for size in inputs[0].spatial():
            size = list(size)
            for i in range(len(pads) // 2):
                dim = len(size) - 1 - i
                if s.get("mode") != "constant" and max(pads[2 * i], pads[2 * i + 1]) >= size[dim]:
                    raise InvalidProgram("reflect padding wider than its input")
                size[dim] += pads[2 * i] + pads[2 * i + 1]
            sizes.append(size)
        return tensor_type(FIRST, inputs[0].channels, checked_sizes(sizes))

    def render(self, s, out):
        n, a, pads, mode, value = s.number, s.inputs[0], s.get("pads"), s.get("mode"), s.get("value")
        if s.style == "module" and mode == "constant" and len(pads) == 2 * out.dims:
            if value == 0.0:
                out.init(f"pad{n}", f"self.pad{n} = nn.ZeroPad{out.nd}({pads})")
            else:
                out.init(f"pad{n}", f"self.pad{n} = nn.ConstantPad{out.nd}({pads}, {value})")
            out.forward(f"{s.output} = self.pad{n}({a})")
            return
        extra = f", mode={mode!r}" if mode != "constant" else (f", value={value}" if value else "")
        out.forward(f"{s.output} = F.pad({a}, {pads}{extra})")

    def simpler(self, s, program):
        yield from super().simpler(s, program)
        if s.get("mode") != "constant" or s.get("value") != 0.0:
            yield s.with_options(mode="constant", value=0.0)


class Crop(Op):
    """Slicing the borders off: ``x[:, :, 1:-1, 1:]`` (ACNet-style cropped branches)."""

    name, weight, default_style = "crop", 0.7, "slice"

    def styles(self, layout, dims):
        return [(1, "slice")]

    def random_options(self, gen, inputs):
        return options(crops=tuple(gen.rng.randint(0, 1) for _ in range(2 * gen.dims)))

    def output_type(self, s, inputs, program):
        crops = s.get("crops")
        sizes = [[n - crops[2 * i] - crops[2 * i + 1] for i, n in enumerate(size)]
                 for size in inputs[0].spatial()]
        return tensor_type(FIRST, inputs[0].channels, checked_sizes(sizes))

    def render(self, s, out):
        crops = s.get("crops")
        slices = []
        for i in range(out.dims):
            begin, end = crops[2 * i], crops[2 * i + 1]
            slices.append(f"{begin or ''}:{-end if end else ''}")
        out.forward(f"{s.output} = {s.inputs[0]}[:, :, {', '.join(slices)}]")


def _random_out_channels(gen: "Generator", name: str) -> int:
    """Mostly the input's channel count; now and then twice or half of it."""
    channels = gen.types[name].channels
    return gen.weighted([(8, channels)] + ([(1, 2 * channels)] if channels <= 8 else [])
                        + ([(1, channels // 2)] if channels % 2 == 0 and channels > 2 else []))


def _linear_init(out: SourceWriter, n: str, cin: int, cout: int, bias: bool, functional: bool) -> None:
    if functional:
        out.init(f"fc{n}", f"self.fc{n}_weight = nn.Parameter(torch.randn({cout}, {cin}) * {cin ** -0.5:.4f})",
                 f"self.fc{n}_bias = nn.Parameter(torch.randn({cout}) * 0.1)" if bias else f"self.fc{n}_bias = None")
    else:
        out.init(f"fc{n}", f"self.fc{n} = nn.Linear({cin}, {cout}{'' if bias else ', bias=False'})")


class LinearChannels(Op):
    """A ``Linear`` over the channels of an ``(N, C, *S)`` tensor, moved there and back in
    one statement."""

    name, weight, default_style = "linear-channels", 2.0, "movedim"

    def styles(self, layout, dims):
        styles = [(3, "movedim"), (2, "permute"), (1, "functional"), (1, "as-conv")]
        if dims == 2:
            styles.append((2, "tokens"))
        return styles

    def random_options(self, gen, inputs):
        return options(bias=gen.rng.random() < 0.6, out_channels=_random_out_channels(gen, inputs[0]))

    def output_type(self, s, inputs, program):
        return tensor_type(FIRST, s.get("out_channels") or inputs[0].channels, inputs[0].spatial())

    def render(self, s, out):
        n, a = s.number, s.inputs[0]
        cin = out.c(a)
        cout = s.get("out_channels") or cin
        _linear_init(out, n, cin, cout, s.get("bias"), functional=s.style == "functional")
        if s.style == "functional":
            out.forward(f"{s.output} = F.linear({out.to_last(a)}, self.fc{n}_weight, self.fc{n}_bias).movedim(-1, 1)")
        elif s.style == "movedim":
            out.forward(f"{s.output} = self.fc{n}({out.to_last(a)}).movedim(-1, 1)")
        elif s.style == "permute":
            out.forward(f"{s.output} = self.fc{n}({a}.{out.permute_last()}).{out.permute_first()}")
        elif s.style == "tokens":
            out.forward(f"{out.shape_names()} = {a}.shape",
                        f"t{n} = {a}.flatten(2).transpose(1, 2)",
                        f"{s.output} = self.fc{n}(t{n}).transpose(1, 2).reshape(B, {'C' if cin == cout else -1}, H, W)")
        elif s.style == "as-conv":
            weight = f"self.fc{n}.weight" + "[..., None]" * out.dims
            out.forward(f"{s.output} = F.conv{out.nd}({a}, {weight}, self.fc{n}.bias)")
        else:
            raise ValueError(s.style)



class ToLast(Op):
    name, weight, default_style = "to-last", 2.0, "movedim"

    def styles(self, layout, dims):
        return [(3, "movedim"), (2, "permute"), (1, "moveaxis"), (1, "permute-contiguous")]

    def output_type(self, s, inputs, program):
        return tensor_type(LAST, inputs[0].channels, inputs[0].spatial())

    def render(self, s, out):
        a = s.inputs[0]
        text = {"movedim": out.to_last(a), "permute": f"{a}.{out.permute_last()}",
                "moveaxis": f"torch.moveaxis({a}, 1, -1)",
                "permute-contiguous": f"{a}.{out.permute_last()}.contiguous()"}[s.style]
        out.forward(f"{s.output} = {text}")


class ToFirst(Op):
    name, weight, default_style = "to-first", 3.0, "movedim"
    layouts = (LAST,)

    def styles(self, layout, dims):
        return [(3, "movedim"), (2, "permute"), (1, "permute-contiguous")]

    def output_type(self, s, inputs, program):
        return tensor_type(FIRST, inputs[0].channels, inputs[0].spatial())

    def render(self, s, out):
        a = s.inputs[0]
        text = {"movedim": out.to_first(a), "permute": f"{a}.{out.permute_first()}",
                "permute-contiguous": f"{a}.{out.permute_first()}.contiguous()"}[s.style]
        out.forward(f"{s.output} = {text}")


class Linear(Op):
    """``Linear`` on a channels-last tensor or an ``(N, C)`` vector."""

    name, weight, default_style = "linear", 3.0, "module"
    layouts = (LAST, VECTOR)

    def styles(self, layout, dims):
        styles = [(3, "module"), (1, "functional"), (2, "reshape-shape")]
        if layout == LAST:
            styles.append((1, "flatten-tokens"))
        return styles

    def random_options(self, gen, inputs):
        return options(bias=gen.rng.random() < 0.6, out_channels=_random_out_channels(gen, inputs[0]))

    def output_type(self, s, inputs, program):
        return tensor_type(inputs[0].layout, s.get("out_channels") or inputs[0].channels, inputs[0].spatial())

    def render(self, s, out):
        n, a = s.number, s.inputs[0]
        cin = out.c(a)
        cout = s.get("out_channels") or cin
        _linear_init(out, n, cin, cout, s.get("bias"), functional=s.style == "functional")
        if s.style == "functional":
            out.forward(f"{s.output} = F.linear({a}, self.fc{n}_weight, self.fc{n}_bias)")
        elif s.style == "module":
            out.forward(f"{s.output} = self.fc{n}({a})")
        elif s.style == "reshape-shape":
            out.forward(f"{s.output} = self.fc{n}({a}.reshape({a}.shape))")
        elif s.style == "flatten-tokens":
            back = f"reshape_as({a})" if cin == cout else f"reshape(*{a}.shape[:-1], -1)"
            out.forward(f"{s.output} = self.fc{n}({a}.flatten(0, -2)).{back}")
        else:
            raise ValueError(s.style)



class BatchNorm1d(Op):
    """``BatchNorm1d`` on channels-last tokens (flattened) or on an ``(N, C)`` vector."""

    name, weight, default_style = "batchnorm1d", 2.0, "module"
    layouts = (LAST, VECTOR)

    def styles(self, layout, dims):
        if layout == LAST:
            return [(3, "flatten-reshape_as"), (2, "reshape")]
        return [(3, "module"), (1, "functional")]

    def render(self, s, out):
        n, a, c = s.number, s.inputs[0], out.c(s.inputs[0])
        if s.style == "functional":
            out.init(f"bn{n}",
                     f'self.register_buffer("bn{n}_mean", torch.randn({c}))',
                     f'self.register_buffer("bn{n}_var", torch.rand({c}) + 0.5)',
                     f"self.bn{n}_weight = nn.Parameter(torch.randn({c}))",
                     f"self.bn{n}_bias = nn.Parameter(torch.randn({c}))")
            out.forward(f"{s.output} = F.batch_norm({a}, self.bn{n}_mean, self.bn{n}_var, "
                        f"self.bn{n}_weight, self.bn{n}_bias, False, 0.1, 1e-5)")
            return
        out.init(f"bn{n}", f"self.bn{n} = nn.BatchNorm1d({c})")
        if s.style == "module":
            out.forward(f"{s.output} = self.bn{n}({a})")
        elif s.style == "flatten-reshape_as":
            out.forward(f"{s.output} = self.bn{n}({a}.flatten(0, -2)).reshape_as({a})")
        elif s.style == "reshape":
            out.forward(f"{s.output} = self.bn{n}({a}.reshape(-1, {c})).reshape({a}.shape)")
        else:
            raise ValueError(s.style)

    def simpler(self, s, program):
        return iter(())  # the default style depends on the layout


class Activation(Op):
    name, weight, default_style = "activation", 2.5, "functional-relu"
    layouts = (FIRST, LAST, VECTOR)

    STYLES = {
        "relu-module": ("self.act{n} = nn.ReLU()", "self.act{n}({a})"),
        "relu-inplace-module": ("self.act{n} = nn.ReLU(inplace=True)", "self.act{n}({a})"),
        "functional-relu": (None, "F.relu({a})"),
        "functional-relu-inplace": (None, "F.relu({a}, inplace=True)"),
        "relu_": (None, "{a}.relu_()"),
        "silu-module": ("self.act{n} = nn.SiLU()", "self.act{n}({a})"),
        "gelu": (None, "F.gelu({a})"),
        "hardswish-module": ("self.act{n} = nn.Hardswish()", "self.act{n}({a})"),
    }

    def styles(self, layout, dims):
        return [(3, "relu-module"), (2, "relu-inplace-module"), (2, "functional-relu"),
                (1, "functional-relu-inplace"), (1, "relu_"), (1, "silu-module"), (1, "gelu"),
                (1, "hardswish-module")]

    def render(self, s, out):
        init, expression = self.STYLES[s.style]
        if init:
            out.init(f"act{s.number}", init.format(n=s.number))
        out.forward(f"{s.output} = " + expression.format(n=s.number, a=s.inputs[0]))


class ShapeRead(Op):
    """Metadata reads and round trips that change nothing: ``reshape(x.shape)``,
    ``B, C, H, W = x.shape``, ``torch._assert(x.ndim == 4)``, permute there and back."""

    name, weight, default_style = "shape", 2.0, "reshape-shape"
    layouts = (FIRST, LAST, VECTOR)

    def styles(self, layout, dims):
        if layout == FIRST:
            styles = [(2, "unpack-reshape"), (2, "reshape-shape"), (1, "view-shape"), (2, "reshape_as"),
                      (1, "flatten-unflatten"), (1, "permute-roundtrip"), (1, "movedim-roundtrip"),
                      (1, "contiguous"), (2, "assert-dim-alias"), (1, "size-reshape")]
            if dims == 2:
                styles.append((1, "tokens-roundtrip"))
            return styles
        if layout == LAST:
            return [(2, "reshape-shape"), (2, "flatten-reshape_as"), (1, "contiguous"), (1, "reshape_as")]
        return [(2, "reshape-shape"), (1, "flatten"), (1, "reshape_as")]

    def generate(self, gen, inputs):
        statement = super().generate(gen, inputs)
        if statement.style == "reshape_as":  # read the shape of another tensor of the same type
            like = gen.pick_same_type(inputs[0])
            statement = replace(statement, inputs=(inputs[0], like))
        return statement

    def render(self, s, out):
        a, o, rank = s.inputs[0], s.output, out.rank(s.inputs[0])
        like = s.inputs[1] if len(s.inputs) > 1 else a
        style = s.style
        if style == "unpack-reshape":
            out.forward(f"{out.shape_names()} = {a}.shape",
                        f"{o} = {a}.reshape({out.shape_names()})")
            return
        if style == "tokens-roundtrip":
            out.forward(f"B, C, H, W = {a}.shape",
                        f"{o} = {a}.flatten(2).transpose(1, 2).transpose(1, 2).reshape(B, C, H, W)")
            return
        if style == "assert-dim-alias":
            out.forward(f'torch._assert({a}.dim() == {rank}, "expected a {rank}D input")', f"{o} = {a}")
            return
        permute = ", ".join(map(str, [0] + list(range(2, rank)) + [1]))
        inverse = ", ".join(map(str, [0, rank - 1] + list(range(1, rank - 1))))
        text = {
            "reshape-shape": f"{a}.reshape({a}.shape)",
            "view-shape": f"{a}.contiguous().view({a}.shape)",
            "reshape_as": f"{a}.reshape_as({like})",
            "flatten-unflatten": f"{a}.flatten(2).unflatten(2, {a}.shape[2:])",
            "permute-roundtrip": f"{a}.permute({permute}).permute({inverse})",
            "movedim-roundtrip": f"{a}.movedim(1, -1).movedim(-1, 1)",
            "contiguous": f"{a}.contiguous()",
            "size-reshape": f"{a}.reshape({a}.size(0), {a}.size(1), -1).reshape({a}.shape)",
            "flatten-reshape_as": f"{a}.flatten(0, -2).reshape_as({a})",
            "flatten": f"{a}.flatten(1)",
        }[style]
        out.forward(f"{o} = {text}")

    def simpler(self, s, program):
        if s.style != "reshape-shape":
            yield replace(s, style="reshape-shape", inputs=s.inputs[:1])


class PoolHead(Op):
    """Global average pooling to an ``(N, C)`` vector (the start of a classifier head)."""

    name, weight, default_style = "pool-head", 0.8, "mean"

    def styles(self, layout, dims):
        return [(3, "mean"), (1, "mean-keepdim-flatten"), (1, "adaptive-functional"), (1, "adaptive-module")]

    def output_type(self, s, inputs, program):
        return tensor_type(VECTOR, inputs[0].channels, inputs[0].spatial())

    def render(self, s, out):
        n, a = s.number, s.inputs[0]
        axes = out.spatial_axes()
        if s.style == "mean":
            out.forward(f"{s.output} = {a}.mean({axes})")
        elif s.style == "mean-keepdim-flatten":
            out.forward(f"{s.output} = {a}.mean({axes}, keepdim=True).flatten(1)")
        elif s.style == "adaptive-functional":
            out.forward(f"{s.output} = F.adaptive_avg_pool{out.nd}({a}, 1).flatten(1)")
        else:
            out.init(f"pool{n}", f"self.pool{n} = nn.AdaptiveAvgPool{out.nd}(1)")
            out.forward(f"{s.output} = torch.flatten(self.pool{n}({a}), 1)")


class Add(Op):
    name, weight, default_style, arity = "add", 4.0, "plus", 2
    layouts = (FIRST, LAST, VECTOR)

    def styles(self, layout, dims):
        return [(4, "plus"), (1, "torch-add"), (1, "torch-add-alpha"), (1, "method-add")]

    def random_options(self, gen, inputs):
        return options(alpha=gen.rng.choice((0.5, 2.0, -1.0)))

    def render(self, s, out):
        a, b = s.inputs
        text = {"plus": f"{a} + {b}", "torch-add": f"torch.add({a}, {b})",
                "torch-add-alpha": f"torch.add({a}, {b}, alpha={s.get('alpha')})",
                "method-add": f"{a}.add({b})"}[s.style]
        out.forward(f"{s.output} = {text}")


class Sub(Op):
    name, weight, default_style, arity = "sub", 1.5, "minus", 2
    layouts = (FIRST, LAST, VECTOR)

    def styles(self, layout, dims):
        return [(3, "minus"), (1, "torch-sub"), (1, "method-sub")]

    def render(self, s, out):
        a, b = s.inputs
        text = {"minus": f"{a} - {b}", "torch-sub": f"torch.sub({a}, {b})",
                "method-sub": f"{a}.sub({b})"}[s.style]
        out.forward(f"{s.output} = {text}")


class InplaceAdd(Op):
    """``out += b`` where ``out`` is whatever tensor ``a`` is — often an alias of another."""

    name, weight, default_style, arity = "inplace-add", 4.0, "alias-iadd", 2
    layouts = (FIRST, LAST, VECTOR)

    def styles(self, layout, dims):
        return [(4, "alias-iadd"), (3, "add_"), (2, "iadd-then-alias"), (1, "alias-isub"), (1, "sub_"),
                (1, "add_-alpha")]

    def random_options(self, gen, inputs):
        return options(alpha=gen.rng.choice((0.5, 2.0, -1.0)))

    def render(self, s, out):
        a, b, o = s.inputs[0], s.inputs[1], s.output
        lines = {"alias-iadd": [f"{o} = {a}", f"{o} += {b}"],
                 "alias-isub": [f"{o} = {a}", f"{o} -= {b}"],
                 "add_": [f"{o} = {a}.add_({b})"],
                 "sub_": [f"{o} = {a}.sub_({b})"],
                 "add_-alpha": [f"{o} = {a}.add_({b}, alpha={s.get('alpha')})"],
                 "iadd-then-alias": [f"{a} += {b}", f"{o} = {a}"]}[s.style]
        out.forward(*lines)


class Sum(Op):
    """A sum of 2-4 tensors: ``out = 0; out += t`` (a literal-zero seed), ``sum([...])``..."""

    name, weight, default_style, arity = "sum", 2.0, "chain", "n"
    layouts = (FIRST, LAST, VECTOR)

    def styles(self, layout, dims):
        return [(3, "literal-zero-iadd"), (2, "literal-zero-add"), (2, "sum-list"), (1, "sum-generator"),
                (1, "chain"), (1, "stack-sum")]

    def render(self, s, out):
        o, terms = s.output, s.inputs
        if s.style == "literal-zero-iadd":
            out.forward(f"{o} = 0", *[f"{o} += {t}" for t in terms])
        elif s.style == "literal-zero-add":
            out.forward(f"{o} = 0", *[f"{o} = {o} + {t}" for t in terms])
        elif s.style == "sum-list":
            out.forward(f"{o} = sum([{', '.join(terms)}])")
        elif s.style == "sum-generator":
            out.forward(f"{o} = sum(t for t in ({', '.join(terms)},))")
        elif s.style == "chain":
            out.forward(f"{o} = {' + '.join(terms)}")
        elif s.style == "stack-sum":
            out.forward(f"{o} = torch.stack([{', '.join(terms)}]).sum(0)")
        else:
            raise ValueError(s.style)

    def simpler(self, s, program):
        yield from super().simpler(s, program)
        if len(s.inputs) > 2:
            for i in range(len(s.inputs)):
                yield replace(s, inputs=s.inputs[:i] + s.inputs[i + 1:])


class MultiBranch(Op):
    """MobileOne / RepVGG: ``nn.ModuleList`` of conv+BN branches over one input, summed in
    a loop, plus an optional identity BatchNorm."""

    name, weight, default_style = "multibranch", 1.5, "loop-add"

    def styles(self, layout, dims):
        return [(2, "loop-add"), (2, "loop-iadd"), (1, "sum-generator"), (1, "stack-sum")]

    def random_options(self, gen, inputs):
        count = gen.rng.choice((1, 2, 2, 3))
        kernels = tuple(sorted((gen.rng.choice((1, 3, 3, 5)) for _ in range(count)), reverse=True))
        return options(kernels=kernels, identity=gen.rng.random() < 0.5,
                       groups=1 if gen.rng.random() < 0.7 else gen.types[inputs[0]].channels)

    def render(self, s, out):
        n, a, o, c, nd = s.number, s.inputs[0], s.output, out.c(s.inputs[0]), out.nd
        groups = s.get("groups")
        group_text = f", groups={groups}" if groups != 1 else ""
        branches = [f"    nn.Sequential(nn.Conv{nd}({c}, {c}, {k}, padding={k // 2}{group_text}, bias=False), "
                    f"nn.BatchNorm{nd}({c}))," for k in s.get("kernels")]
        out.init(f"branches{n}", f"self.branches{n} = nn.ModuleList([", *branches, "])")
        identity = s.get("identity")
        if identity:
            out.init(f"identity{n}", f"self.identity{n} = nn.BatchNorm{nd}({c})")
        if s.style in ("loop-add", "loop-iadd"):
            start = f"self.identity{n}({a})" if identity else "0"
            step = f"{o} = {o} + branch({a})" if s.style == "loop-add" else f"{o} += branch({a})"
            out.forward(f"{o} = {start}", f"for branch in self.branches{n}:", f"    {step}")
            return
        extra = f" + self.identity{n}({a})" if identity else ""
        if s.style == "sum-generator":
            out.forward(f"{o} = sum(branch({a}) for branch in self.branches{n}){extra}")
        else:
            out.forward(f"{o} = torch.stack([branch({a}) for branch in self.branches{n}]).sum(0){extra}")

    def simpler(self, s, program):
        yield from super().simpler(s, program)
        if s.get("identity"):
            yield s.with_options(identity=False)
        kernels = s.get("kernels")
        if len(kernels) > 1:
            for i in range(len(kernels)):
                yield s.with_options(kernels=kernels[:i] + kernels[i + 1:])
        if s.get("groups") != 1:
            yield s.with_options(groups=1)
        if len(kernels) == 1 and not s.get("identity"):  # one branch: a conv and its BN
            k = kernels[0]
            yield Statement("conv", s.output, s.inputs, "sequential-bn",
                            options(kernel=k, stride=1, dilation=1, groups=s.get("groups"), bias=False,
                                    padding=k // 2))


class ConvTranspose(Op):
    """``nn.ConvTranspose2d`` / ``F.conv_transpose2d`` (ultralytics, decoder heads)."""

    name, weight, default_style = "conv-transpose", 1.0, "module"

    def styles(self, layout, dims):
        return [(3, "module"), (1, "functional"), (1, "sequential-bn")]

    def random_options(self, gen, inputs):
        rng, channels = gen.rng, gen.types[inputs[0]].channels
        kernel = rng.choice((1, 2, 2, 3, 3))
        stride = rng.choice((1, 1, 2))
        out_channels = _random_out_channels(gen, inputs[0])
        groups = gen.weighted([(4, 1)] + ([(1, channels)] if out_channels % channels == 0 else []))
        padding = rng.randint(0, (kernel - 1) // 2 + (1 if kernel > 1 and rng.random() < 0.3 else 0))
        return options(kernel=kernel, stride=stride, padding=padding, groups=groups, bias=rng.random() < 0.4,
                       output_padding=1 if stride == 2 and rng.random() < 0.3 else 0, out_channels=out_channels)

    def output_type(self, s, inputs, program):
        k, stride, p, extra = s.get("kernel"), s.get("stride"), s.get("padding"), s.get("output_padding")
        sizes = [[(n - 1) * stride - 2 * p + k + extra for n in size] for size in inputs[0].spatial()]
        if any(n > 24 for size in sizes for n in size):
            raise InvalidProgram("too large")
        return tensor_type(FIRST, s.get("out_channels"), checked_sizes(sizes))

    def render(self, s, out):
        n, a = s.number, s.inputs[0]
        cin, cout = out.c(a), s.get("out_channels")
        k, stride, p, g, extra = (s.get(o) for o in ("kernel", "stride", "padding", "groups", "output_padding"))
        if s.style == "functional":
            shape = ", ".join(map(str, (cin, cout // g) + (k,) * out.dims))
            out.init(f"deconv{n}", f"self.deconv{n}_weight = nn.Parameter(torch.randn({shape}) * 0.3)",
                     f"self.deconv{n}_bias = nn.Parameter(torch.randn({cout}) * 0.1)" if s.get("bias")
                     else f"self.deconv{n}_bias = None")
            out.forward(f"{s.output} = F.conv_transpose{out.nd}({a}, self.deconv{n}_weight, self.deconv{n}_bias, "
                        f"{stride}, {p}, {extra}, {g})")
            return
        arguments = f"{cin}, {cout}, {k}, stride={stride}, padding={p}"
        if extra:
            arguments += f", output_padding={extra}"
        if g != 1:
            arguments += f", groups={g}"
        if not s.get("bias"):
            arguments += ", bias=False"
        deconv = f"nn.ConvTranspose{out.nd}({arguments})"
        if s.style == "sequential-bn":
            deconv = f"nn.Sequential({deconv}, nn.BatchNorm{out.nd}({cout}))"
        out.init(f"deconv{n}", f"self.deconv{n} = {deconv}")
        out.forward(f"{s.output} = self.deconv{n}({a})")

    def simpler(self, s, program):
        yield from super().simpler(s, program)
        if s.get("groups") != 1:
            yield s.with_options(groups=1)


class Upsample(Op):
    """Nearest-neighbour upsampling by 2: linear, but no convolution."""

    name, weight, default_style = "upsample", 0.6, "functional"

    def styles(self, layout, dims):
        return [(2, "functional"), (1, "module")]

    def output_type(self, s, inputs, program):
        sizes = [[2 * n for n in size] for size in inputs[0].spatial()]
        if any(n > 24 for size in sizes for n in size):
            raise InvalidProgram("too large")
        return tensor_type(FIRST, inputs[0].channels, sizes)

    def render(self, s, out):
        if s.style == "module":
            out.init(f"up{s.number}", f'self.up{s.number} = nn.Upsample(scale_factor=2, mode="nearest")')
            out.forward(f"{s.output} = self.up{s.number}({s.inputs[0]})")
        else:
            out.forward(f'{s.output} = F.interpolate({s.inputs[0]}, scale_factor=2, mode="nearest")')


class Concat(Op):
    """Two tensors joined along the channels (CSP, GhostNet)."""

    name, weight, default_style, arity = "concat", 1.0, "cat-list", 2

    def styles(self, layout, dims):
        return [(2, "cat-list"), (1, "cat-tuple")]

    def output_type(self, s, inputs, program):
        a, b = inputs
        if a.layout != b.layout or a.spatial() != b.spatial():
            raise InvalidProgram("concat of different spatial shapes")
        if a.channels + b.channels > 16:
            raise InvalidProgram("too many channels")
        return tensor_type(FIRST, a.channels + b.channels, a.spatial())

    def render(self, s, out):
        a, b = s.inputs
        text = f"torch.cat([{a}, {b}], dim=1)" if s.style == "cat-list" else f"torch.cat(({a}, {b}), 1)"
        out.forward(f"{s.output} = {text}")


class ChannelSlice(Op):
    """Some of the channels: ``x[:, :k]``, ``x.chunk(2, dim=1)[1]``, ``x.narrow(1, i, k)``."""

    name, weight, default_style = "channel-slice", 0.8, "index"

    def styles(self, layout, dims):
        return [(2, "index"), (2, "chunk"), (1, "narrow"), (1, "split")]

    def random_options(self, gen, inputs):
        channels = gen.types[inputs[0]].channels
        if channels < 2 or channels % 2:
            return options(start=0, length=channels)
        return options(start=gen.rng.choice((0, channels // 2)), length=channels // 2)

    def output_type(self, s, inputs, program):
        start, length, channels = s.get("start"), s.get("length"), inputs[0].channels
        if start + length > channels or length < 1:
            raise InvalidProgram("channels out of range")
        if s.style in ("chunk", "split") and (2 * length != channels or start % length):
            raise InvalidProgram("not a half")
        return tensor_type(FIRST, length, inputs[0].spatial())

    def render(self, s, out):
        a, start, length = s.inputs[0], s.get("start"), s.get("length")
        channels = out.c(a)
        text = {"index": f"{a}[:, {start or ''}:{start + length}]",
                "chunk": f"{a}.chunk(2, dim=1)[{start // max(length, 1)}]",
                "narrow": f"{a}.narrow(1, {start}, {length})",
                "split": f"torch.split({a}, [{length}, {channels - length}], dim=1)[{start // max(length, 1)}]"}[s.style]
        out.forward(f"{s.output} = {text}")


class Gate(Op):
    """A product of two tensors (not linear: must never be folded)."""

    name, weight, default_style, arity = "gate", 0.5, "product", 2
    layouts = (FIRST, LAST, VECTOR)

    def styles(self, layout, dims):
        return [(1, "product"), (1, "sigmoid-gate")]

    def render(self, s, out):
        a, b = s.inputs
        text = f"{a} * {b}" if s.style == "product" else f"{a} * torch.sigmoid({b})"
        out.forward(f"{s.output} = {text}")


class Reuse(Op):
    """A module called a second time, on another tensor: a shared block. The statement
    carries the module's ``__init__`` lines, so it stands alone when the first call is
    shrunk away."""

    name, weight, default_style = "reuse", 1.0, "call"
    layouts = (FIRST, LAST, VECTOR)
    REUSABLE = {("conv", "module"), ("conv", "sequential-bn"), ("conv", "forward-hook"), ("conv", "std-conv"),
                ("batchnorm", "module"), ("batchnorm", "affine-false"), ("batchnorm", "sync"),
                ("batchnorm", "subclass-act"), ("batchnorm", "frozen"), ("linear", "module"),
                ("identity", "module"), ("identity", "dropout"), ("scale", "layerscale-module"),
                ("scale", "layerscale-module-inplace"), ("activation", "relu-inplace-module")}

    def styles(self, layout, dims):
        return [(1, "call")]

    def generate(self, gen, inputs):
        owners = [s for s in gen.statements if (s.kind, s.style) in self.REUSABLE
                  and s.kind != "reuse" and gen.types[s.inputs[0]] == gen.types[s.output]]
        if not owners:
            return None
        owner = gen.rng.choice(owners)
        first = gen.pick_same_type(owner.inputs[0], exclude=(owner.inputs[0],))
        program = Program(0, gen.dims, gen.channels, gen.sizes, (), ())
        writer = SourceWriter(program, gen.types)
        OPS[owner.kind].render(owner, writer)
        attribute = writer.forward_lines[-1].split("self.", 1)[1].split("(", 1)[0]
        input_type = gen.types[owner.inputs[0]]
        return Statement(self.name, gen.next_name(), (first,), "call", options(
            attribute=attribute, init=tuple(writer.init_calls), helpers=tuple(writer.helpers),
            layout=input_type.layout, shapes=input_type.shapes))

    def output_type(self, s, inputs, program):
        if inputs[0] != TensorType(s.get("layout"), s.get("shapes")):
            raise InvalidProgram("a shared module called on a tensor of another shape")
        return inputs[0]

    def render(self, s, out):
        for helper in s.get("helpers"):
            out.helper(helper)
        for attribute, lines in s.get("init"):
            out.init(attribute, *lines)
        out.forward(f"{s.output} = self.{s.get('attribute')}({s.inputs[0]})")


class Head(Op):
    """A detection head over 1-3 feature maps (a list it may write into), as detectors write
    them: per-level children in ``ModuleList`` s, and shape-keyed caches that keep symbolic
    tracing out (``guard``), so ``fuse`` keeps the head whole and fuses its children.

    Styles: ``chain`` (YOLOv7 ``IDetect``: ``x[i] = self.m[i](self.ia[i](x[i]))``, then
    ``x[i] = self.bn[i](x[i])``, ``x[i] = self.im[i](x[i])``: children in a row, fused as
    one); ``property`` (ultralytics ``Detect``: ``dict(box_head=self.cv2, cls_head=self.cv3)``
    returned by a property and passed as ``**self.one2many``); ``zip`` (``p(t) for p, t in
    zip(self.proj, x)``, ``forward(x, batch=None)``, called with a literal ``None`` when
    ``none_call``); ``enumerate``; ``branch`` (children called as ``self.branch[i](x[i], None)``
    whose forward tests ``scale is not None``). ``stem``: children called in a row on the
    first level (``s = self.stem_conv(x[0])``, ``s = self.stem_bn(s)``). ``guard``:
    ``shape-cache`` (ultralytics' anchors), ``grid`` (YOLOv7's grids), ``odd``, ``none``
    (the head traces). ``hazard``: a use ``fuse`` must respect: ``passed`` (a child handed
    to ``count_parameters``, which scales the output), ``reused`` (a child, a chain member,
    called a second time), ``isinstance`` (a child tested against its own class), ``append``
    / ``rewrite`` / ``unbatch`` (the input list changed before the chain: appended to, an item
    scaled, or an item replaced by its first sample, which has another rank). ``call``, how
    the caller calls it: ``plain``; ``read-after`` (the caller reads its list after the call,
    which the head may have written into); ``twice`` (called again on the maps' first
    samples: unbatched, another rank).

    The output is level 0's result (``(N, out_channels, *S)``) plus the spatial means of the
    other levels (and the stem's result)."""

    name, weight, default_style, arity = "head", 1.2, "zip", "levels"

    STYLES = ("chain", "property", "zip", "enumerate", "branch")

    def styles(self, layout, dims):
        return [(3, "chain"), (2, "property"), (2, "zip"), (1, "enumerate"), (2, "branch")]

    def generate(self, gen, inputs):
        statement = super().generate(gen, inputs)
        if statement.get("hazard") == "unbatch" or statement.get("call") == "twice":
            # children that take an unbatched map (BatchNorm2d does not)
            statement = replace(statement, style="chain").with_options(
                bn=False, stem=tuple(m for m in statement.get("stem") if m != "bn"))
        return statement

    def random_options(self, gen, inputs):
        rng = gen.rng
        channels = [gen.types[name].channels for name in inputs]
        out_channels = rng.choice((channels[0], gen.channels, 6))
        kernel = rng.choice((1, 1, 3, 3, 2))
        padding = kernel // 2 if rng.random() < 0.7 else rng.randint(0, kernel // 2)
        common = functools.reduce(math.gcd, channels + [out_channels])
        groups = gen.weighted([(5, 1)] + ([(2, common)] if common > 1 else []))
        hazards = [(6, "none"), (1, "passed"), (1, "reused"), (1, "isinstance"), (1, "append"),
                   (1, "rewrite")]
        if len(inputs) > 1:
            hazards.append((2, "unbatch"))
        stem = ()
        if rng.random() < 0.3:
            stem = tuple(m for m in ("ia", "conv", "bn", "im") if m == "conv" or rng.random() < 0.5)
        return options(out_channels=out_channels, kernel=kernel, padding=padding, groups=groups,
                       bias=rng.random() < 0.5, ia=rng.random() < 0.7, im=rng.random() < 0.6,
                       bn=rng.random() < 0.6, stem=stem, none_call=rng.random() < 0.5,
                       guard=gen.weighted([(4, "shape-cache"), (3, "grid"), (2, "odd"), (1, "none")]),
                       hazard=gen.weighted(hazards), target=rng.random(),
                       call=gen.weighted([(6, "plain"), (2, "read-after"), (2, "twice")]))

    def output_type(self, s, inputs, program):
        if any(t.layout != FIRST for t in inputs):
            raise InvalidProgram("a head takes channels-first feature maps")
        k, p, g, cout = s.get("kernel"), s.get("padding"), s.get("groups"), s.get("out_channels")
        if any(t.channels % g for t in inputs) or cout % g:
            raise InvalidProgram("groups do not divide the channels")
        sizes = [[_spatial_out(n, k, 1, 2 * p) for n in size] for t in inputs for size in t.spatial()]
        checked_sizes(sizes)
        return tensor_type(FIRST, cout, [[_spatial_out(n, k, 1, 2 * p) for n in size]
                                         for size in inputs[0].spatial()])

    def render(self, s, out):
        n = s.number
        name = f"Head{n}"
        out.klass(name, self.class_lines(s, out))
        out.init(f"head{n}", f"self.head{n} = {name}()")
        none = ", None" if s.style == "zip" and s.get("none_call") else ""
        call = s.get("call", "plain")
        if call == "read-after":  # the caller reads the list it handed over, after the call
            out.forward(f"feats{n} = [{', '.join(s.inputs)}]", f"{s.output} = self.head{n}(feats{n}{none})",
                        f"{s.output} = {s.output} + feats{n}[0].mean()")
            return
        out.forward(f"{s.output} = self.head{n}([{', '.join(s.inputs)}]{none})")
        if call == "twice":  # again, on the first samples: unbatched maps
            out.forward(f"{s.output} = {s.output} + self.head{n}([{', '.join(f'{a}[0]' for a in s.inputs)}]{none})")

    def class_lines(self, s, out) -> list[str]:
        n, nd, dims = s.number, out.nd, out.dims
        channels = [out.c(a) for a in s.inputs]
        cout, k, p, g = (s.get(o) for o in ("out_channels", "kernel", "padding", "groups"))
        style, guard, hazard = s.style, s.get("guard"), s.get("hazard")
        bn_on = s.get("bn")

        def conv(c):
            text = f"nn.Conv{nd}({c}, {cout}, {k}"
            text += f", padding={p}" if p else ""
            text += f", groups={g}" if g != 1 else ""
            return text + ("" if s.get("bias") else ", bias=False") + ")"

        def module_list(items):
            return f"nn.ModuleList([{', '.join(items)}])"

        bn = f"nn.BatchNorm{nd}({cout})"
        init = [f"self.nl = {len(channels)}"]
        if guard == "grid":
            init.append("self.grid = [torch.zeros(1)] * self.nl")
        children: dict[str, str] = {}  # name -> the class of its items (or its own class)
        methods: list[tuple[str, list[str]]] = []
        arguments = "x, batch=None" if style == "zip" else "x"
        body: list[str] = []
        if style == "zip":
            body += ["if batch is not None:", "    return batch"]
        if hazard == "append":
            body.append("x.append(x[-1])")
        elif hazard == "rewrite":
            body.append("x[0] = x[0] * 2.0")
        elif hazard == "unbatch":
            body.append("x[-1] = x[-1][0]")
        if hazard == "reused":
            body.append("first = x[0]")
        stem = s.get("stem")
        if stem:
            source = "x[0]"
            for member in stem:
                attribute = f"stem_{member}"
                if member == "ia":
                    out.helper("Implicit")
                    init.append(f"self.{attribute} = ImplicitA({channels[0]})")
                    children[attribute] = "ImplicitA"
                elif member == "conv":
                    init.append(f"self.{attribute} = {conv(channels[0])}")
                    children[attribute] = f"nn.Conv{nd}"
                elif member == "bn":
                    init.append(f"self.{attribute} = {bn}")
                    children[attribute] = f"nn.BatchNorm{nd}"
                else:
                    out.helper("Implicit")
                    init.append(f"self.{attribute} = ImplicitM({cout})")
                    children[attribute] = "ImplicitM"
                body.append(f"s = self.{attribute}({source})")
                source = "s"
        if style == "chain":
            init.append(f"self.m = {module_list(conv(c) for c in channels)}")
            children["m"] = f"nn.Conv{nd}"
            if s.get("ia"):
                out.helper("Implicit")
                init.append(f"self.ia = {module_list(f'ImplicitA({c})' for c in channels)}")
                children["ia"] = "ImplicitA"
            if bn_on:
                init.append(f"self.bn = {module_list(bn for _ in channels)}")
                children["bn"] = f"nn.BatchNorm{nd}"
            if s.get("im"):
                out.helper("Implicit")
                init.append(f"self.im = {module_list(f'ImplicitM({cout})' for _ in channels)}")
                children["im"] = "ImplicitM"
            first = "self.m[i](self.ia[i](x[i]))" if s.get("ia") else "self.m[i](x[i])"
            body += ["z = []", "for i in range(self.nl):", f"    x[i] = {first}"]
            if bn_on:
                body.append("    x[i] = self.bn[i](x[i])")
            if s.get("im"):
                body.append("    x[i] = self.im[i](x[i])")
            body.append("    z.append(x[i])")
        elif style == "property":
            sequential = [f"nn.Sequential({conv(c)}, {bn})" if bn_on else f"nn.Sequential({conv(c)})"
                          for c in channels]
            init += [f"self.cv2 = {module_list(sequential)}", f"self.cv3 = {module_list(conv(c) for c in channels)}"]
            children.update(cv2="nn.Sequential", cv3=f"nn.Conv{nd}")
            methods += [("@property", []), ("one2many(self)", ["return dict(box_head=self.cv2, cls_head=self.cv3)"]),
                        ("forward_head(self, x, box_head=None, cls_head=None)",
                         ["if box_head is None or cls_head is None:", "    return dict()",
                          "boxes = [box_head[i](x[i]) for i in range(self.nl)]",
                          "scores = [cls_head[i](x[i]) for i in range(self.nl)]",
                          "return dict(boxes=boxes, scores=scores)"])]
            body += ["preds = self.forward_head(x, **self.one2many)",
                     'z = [b + c for b, c in zip(preds["boxes"], preds["scores"])]']
        elif style in ("zip", "enumerate"):
            sequential = [f"nn.Sequential({conv(c)}, {bn})" if bn_on else f"nn.Sequential({conv(c)})"
                          for c in channels]
            init.append(f"self.proj = {module_list(sequential)}")
            children["proj"] = "nn.Sequential"
            if style == "zip":
                body.append("z = [p(t) for p, t in zip(self.proj, x)]")
            else:
                body += ["z = []", "for i, p in enumerate(self.proj):", "    z.append(p(x[i]))"]
        elif style == "branch":
            branch = f"Branch{n}"
            lines = [f"class {branch}(nn.Module):",
                     '    """A child whose forward takes an optional scale (its parent passes None)."""', "",
                     "    def __init__(self, c):", "        super().__init__()",
                     f"        self.conv = nn.Conv{nd}(c, {cout}, {k}" + (f", padding={p}" if p else "")
                     + (f", groups={g}" if g != 1 else "") + ("" if s.get("bias") else ", bias=False") + ")",
                     f"        self.bn = {bn}", "",
                     "    def forward(self, x, scale=None):", "        y = self.conv(x)",
                     "        if scale is not None:", "            y = y * scale", "        return self.bn(y)"]
            out.klass(branch, lines)
            init.append(f"self.branch = {module_list(f'{branch}({c})' for c in channels)}")
            children["branch"] = branch
            body.append("z = [self.branch[i](x[i], None) for i in range(self.nl)]")
        else:
            raise ValueError(style)
        if guard == "grid":
            body += ["for i in range(self.nl):", "    if self.grid[i].shape != z[i].shape[-1:]:",
                     "        self.grid[i] = torch.linspace(0.0, 1.0, z[i].shape[-1], dtype=z[i].dtype)",
                     "    z[i] = z[i] + self.grid[i]"]
        axes = "(" + ", ".join(str(-d) for d in range(dims, 0, -1)) + ("," if dims == 1 else "") + ")"
        body += ["out = z[0]", "for t in z[1:]:", f"    out = out + t.mean({axes}, keepdim=True)"]
        if stem:
            body.append("out = out + s")
        names = sorted(children)
        target = names[min(int(s.get("target") * len(names)), len(names) - 1)] if names else None
        indexed = target is not None and not target.startswith("stem_")
        item = f"self.{target}[0]" if indexed else f"self.{target}"
        if hazard == "passed" and target:
            out.helper("count_parameters")
            body.append(f"out = out * (1.0 + 1e-4 * count_parameters(self.{target}))")
        elif hazard == "isinstance" and target:
            body += [f"if isinstance({item}, {children[target]}):", "    out = out * 2.0"]
        elif hazard == "reused" and target:
            takes_out = target.endswith(("bn", "im")) or target == "stem_im"
            argument = "out" if takes_out else ("first, None" if target == "branch" else "first")
            body.append(f"out = out + {item}({argument}).mean()")
        if guard == "shape-cache":
            body += ["shape = out.shape", "if self.shape != shape:",
                     "    self.anchors = torch.linspace(0.0, 1.0, shape[-1], dtype=out.dtype)",
                     "    self.shape = shape", "out = out + self.anchors"]
        elif guard == "odd":
            body += ["if out.shape[-1] % 2:", "    out = out.clone()"]
        body.append("return out")
        lines = [f"class Head{n}(nn.Module):", f'    """A {style} head over {len(channels)} level(s)."""', ""]
        if guard == "shape-cache":
            lines += ["    shape = None", ""]
        lines += ["    def __init__(self):", "        super().__init__()"]
        lines += ["        " + line for line in init] + [""]
        for signature, method_body in methods:
            if signature.startswith("@"):
                lines.append(f"    {signature}")
                continue
            lines += [f"    def {signature}:"] + ["        " + line for line in method_body] + [""]
        lines += [f"    def forward(self, {arguments}):"] + ["        " + line for line in body]
        return lines

    def simpler(self, s, program):
        if s.style != self.default_style:
            yield replace(s, style=self.default_style)
        if s.get("hazard") != "none":
            yield s.with_options(hazard="none")
        if s.get("call", "plain") != "plain":
            yield s.with_options(call="plain")
        if s.get("stem"):
            yield s.with_options(stem=())
        if len(s.inputs) > 1:
            for i in range(1, len(s.inputs)):
                yield replace(s, inputs=s.inputs[:i] + s.inputs[i + 1:])
        if s.get("guard") != "shape-cache":
            yield s.with_options(guard="shape-cache")
        for name in ("ia", "im", "bn", "bias", "none_call"):
            if s.get(name):
                yield s.with_options(**{name: False})
        if s.get("groups") != 1:
            yield s.with_options(groups=1)
        if s.get("kernel") != 1:
            yield s.with_options(kernel=1, padding=0)
        if s.get("padding") != s.get("kernel") // 2:
            yield s.with_options(padding=s.get("kernel") // 2)


OPS: dict[str, Op] = {op.name: op for op in (
    Conv(), BatchNorm(), Identity(), Scale(), AvgPool(), Pad(), Crop(), LinearChannels(), ToLast(),
    ToFirst(), Linear(), BatchNorm1d(), Activation(), ShapeRead(), PoolHead(), Add(), Sub(),
    InplaceAdd(), Sum(), MultiBranch(), Gate(), Reuse(), ConvTranspose(), Upsample(), Concat(),
    ChannelSlice(), Head())}

_ALIASING_KINDS = {"identity", "inplace-add"}


# ---- generation ------------------------------------------------------------------------

class Generator:
    """Random choices for one program, all from ``random.Random(seed)``."""

    def __init__(self, seed: int, dims: int, channels: int, sizes):
        self.rng = random.Random(seed)
        self.dims, self.channels, self.sizes = dims, channels, sizes
        self.types: dict[str, TensorType] = {"x": tensor_type(FIRST, channels, sizes)}
        self.order = ["x"]
        self.producers: dict[str, str] = {}
        self.used: set[str] = set()
        self.statements: list[Statement] = []
        self.count = 0
        self.boost: dict[str, float] = {}  # op name -> weight factor (heads in whole programs)

    def next_name(self) -> str:
        return f"v{self.count + 1}"

    def weighted(self, choices):
        total = sum(w for w, _ in choices)
        point = self.rng.random() * total
        for weight, value in choices:
            point -= weight
            if point < 0:
                return value
        return choices[-1][1]

    def pick(self, layouts) -> str | None:
        """An input: usually the newest tensor, otherwise one not read yet, or any."""
        names = [n for n in self.order if self.types[n].layout in layouts]
        if not names:
            return None
        if self.rng.random() < 0.5:
            return names[-1]
        return self._prefer_unused(names)

    def _prefer_unused(self, names: list[str]) -> str:
        return self.weighted([(1.0 if n in self.used else 4.0, n) for n in names])

    def pick_same_type(self, name: str, exclude=()) -> str:
        same = [n for n in self.order if self.types[n] == self.types[name] and n not in exclude]
        return self._prefer_unused(same) if same else name

    def pick_same_spatial(self, name: str) -> str:
        kind = self.types[name]
        same = [n for n in self.order if self.types[n].layout == kind.layout
                and self.types[n].spatial() == kind.spatial()]
        return self._prefer_unused(same)

    def unused(self) -> list[str]:
        return [n for n in self.order[1:] if n not in self.used]

    def pick_inplace_target(self, layouts) -> str | None:
        """In-place ops through aliases are a known bug class: prefer aliases and ``x``."""
        names = [n for n in self.order if self.types[n].layout in layouts]
        if not names:
            return None
        weights = [(4.0 if n == "x" or self.producers.get(n) in _ALIASING_KINDS else 1.0, n) for n in names]
        weights[-1] = (weights[-1][0] + 2.0, names[-1])
        return self.weighted(weights)


SIZES = {3: (((5, 5, 5), (4, 6, 5)), ((6, 6, 6), (5, 7, 6))),
         2: (((8, 8), (7, 9)), ((8, 8), (7, 9)), ((10, 10), (9, 11)), ((6, 6), (7, 5))),
         1: (((10,), (9,)), ((12,), (11,)))}


@functools.lru_cache(maxsize=1024)
def generate_program(seed: int) -> Program:
    """The program of ``seed``: same seed, same program (valid in eager mode)."""
    for attempt in range(50):
        program = _generate(seed, attempt)
        if eager_error(program) is None:
            return program
    raise RuntimeError(f"seed {seed}: no valid program in 50 attempts")  # a generator bug


FRAMED = 0.3  # the share of programs written as a whole program (a Frame)


def _generate(seed: int, attempt: int) -> Program:
    rng = random.Random(f"program:{seed}:{attempt}")
    frame_rng = random.Random(f"frame:{seed}:{attempt}")
    framed = frame_rng.random() < FRAMED
    draw = rng.random()
    dims = 1 if draw < 0.12 else 3 if draw < 0.18 else 2
    channels = rng.choice((4, 4, 4, 4, 2, 6, 8))
    sizes = rng.choice(SIZES[dims])
    gen = Generator(rng.getrandbits(64), dims, channels, sizes)
    if framed:
        gen.boost["head"] = 4.0
    statements: list[Statement] = gen.statements
    length = gen.weighted([(1, 1), (2, 2), (3, 3), (3, 4), (3, 5), (3, 6), (2, 7), (2, 8), (1, 10), (1, 12)])
    while len(statements) < length:
        _generate_statement(gen, statements)
    last = statements[-1].output
    if gen.types[last].layout == LAST:
        statement = Statement("to-first", gen.next_name(), (last,), gen.rng.choice(("movedim", "permute")))
        _accept(gen, statements, statement)
    # most tensors left unread join the result: a sum (or an extra output)
    last = statements[-1].output
    dangling = [n for n in gen.unused() if n != last and gen.types[n] == gen.types[last]]
    if dangling and gen.rng.random() < 0.8:
        terms = (last,) + tuple(dangling[-3:])
        style = gen.weighted(OPS["sum"].styles(gen.types[last].layout, dims))
        _accept(gen, statements, Statement("sum", gen.next_name(), terms, style))
    outputs = (statements[-1].output,)
    others = [n for n in gen.unused() if n != outputs[0]]
    if others and gen.rng.random() < 0.3 or len(statements) > 1 and gen.rng.random() < 0.08:
        outputs += (gen.rng.choice(others or gen.order[:-1]),)
    blocks = ()
    if gen.rng.random() < 0.3:  # some statements in a child module
        length = gen.rng.randint(1, min(4, len(statements)))
        start = gen.rng.randint(0, len(statements) - length)
        kind = gen.weighted([(2, "traceable"), (2, "untraceable"), (1, "hooked")])
        blocks = (Block(tuple(s.output for s in statements[start:start + length]), kind),)
    frame = _generate_frame(frame_rng, statements, blocks) if framed else None
    return Program(seed, dims, channels, tuple(sizes), tuple(statements), outputs, blocks, frame)


def _generate_frame(rng: random.Random, statements: list[Statement], blocks) -> Frame:
    """A whole program around ``statements``: a signature, maybe shape control flow, and
    mostly a routing loop over layers (cut between statements, never inside a block; heads
    mostly a layer of their own)."""
    def weighted(choices):
        return Generator.weighted(types.SimpleNamespace(rng=rng), choices)

    inside = {name: index for index, block in enumerate(blocks) for name in block.members}
    layers: list[list[str]] = [[statements[0].output]]
    for previous, statement in zip(statements, statements[1:]):
        block = inside.get(statement.output)
        same_block = block is not None and inside.get(previous.output) == block
        head = "head" in (statement.kind, previous.kind)
        if not same_block and rng.random() < (0.8 if head else 0.35):
            layers.append([])
        layers[-1].append(statement.output)
    routed = rng.random() < 0.8
    loop = weighted([(3, "for"), (1, "enumerate"), (1, "index"), (2, "slice-head")])
    return Frame(signature=weighted([(2, "plain"), (2, "augment"), (2, "args-kwargs"), (1, "super")]),
                 guard=weighted([(3, "none"), (1, "too-large"), (1, "odd-noop"), (1, "shape-cache")]),
                 layers=tuple(tuple(layer) for layer in layers) if routed else (),
                 profile=weighted([(3, "none"), (2, "dead"), (1, "visualize"), (1, "live")]) if routed else "none",
                 container=weighted([(2, "sequential"), (1, "modulelist")]),
                 loop=loop, check=weighted([(3, "none"), (1, "absent"), (1, "module"), (1, "layer")]),
                 head_none=rng.random() < 0.5, direct=rng.random() < 0.7)


def _generate_statement(gen: Generator, statements: list) -> Statement | None:
    present = {t.layout for t in gen.types.values()}
    candidates = [(op.weight * gen.boost.get(op.name, 1.0), op) for op in OPS.values()
                  if present & set(op.layouts)]
    newest = gen.types[gen.order[-1]].layout
    if newest != FIRST and gen.rng.random() < 0.6:  # mostly stay on channels-last tokens a while
        candidates = [(w * (3 if FIRST not in op.layouts else 1), op) for w, op in candidates
                      if newest in op.layouts]
    op = gen.weighted(candidates)
    if op.arity == 1:
        first = gen.pick(op.layouts)
        inputs = (first,)
    elif op.arity == "levels":  # a head: 1-3 feature maps of any sizes
        first = gen.pick(op.layouts)
        inputs = (first,)
        count = gen.weighted([(2, 1), (3, 2), (2, 3)])
        for _ in range(count - 1):
            rest = [n for n in gen.order if gen.types[n].layout in op.layouts and n not in inputs]
            if rest:
                inputs += (gen._prefer_unused(rest),)
    elif op.name == "concat":
        first = gen.pick(op.layouts)
        if first is None:
            return None
        inputs = (first, gen.pick_same_spatial(first))
    elif op.name == "inplace-add":
        first = gen.pick_inplace_target(op.layouts)
        if first is None:
            return None
        inputs = (first, gen.pick_same_type(first, exclude=(first,) if gen.rng.random() < 0.8 else ()))
    else:
        first = gen.pick(op.layouts)
        count = 2 if op.arity == 2 else gen.rng.choice((2, 2, 3, 4))
        inputs = (first,)
        for _ in range(count - 1):
            # a - a and a * a are degenerate; a + a is fine now and then
            repeat_ok = op.name in ("add", "sum") and gen.rng.random() < 0.2
            inputs += (gen.pick_same_type(first, exclude=() if repeat_ok else inputs),)
    if first is None:
        return None
    if op.name in ("sub", "gate") and len(set(inputs)) == 1:  # a - a, a * a
        return None
    statement = op.generate(gen, inputs)
    if statement is None:
        return None
    if statement.kind == "inplace-add" and "sub" in statement.style and len(set(inputs)) == 1:
        return None
    return _accept(gen, statements, statement)


def _accept(gen: Generator, statements: list, statement: Statement) -> Statement | None:
    op = OPS[statement.kind]
    try:
        inputs = [gen.types[n] for n in statement.inputs]
        if inputs[0].layout not in op.layouts:
            return None
        program = Program(0, gen.dims, gen.channels, gen.sizes, (), ())
        result = op.output_type(statement, inputs, program)
    except InvalidProgram:
        return None
    gen.types[statement.output] = result
    gen.order.append(statement.output)
    gen.producers[statement.output] = statement.kind
    gen.used.update(statement.inputs)
    statements.append(statement)
    gen.count += 1
    return statement


# ---- building and running --------------------------------------------------------------

_MODULES: "OrderedDict[str, types.ModuleType]" = OrderedDict()
_MODULES_KEPT = 256


def program_namespace(source: str) -> dict:
    """Execute a program's source as a module whose source ``inspect`` can read (fuse reads
    the source of blocks that do not trace); the latest few are cached by source text."""
    digest = hashlib.sha1(source.encode()).hexdigest()[:16]
    if digest in _MODULES:
        _MODULES.move_to_end(digest)
        return _MODULES[digest].__dict__
    module = types.ModuleType(f"reparam_fuzz_{digest}")
    module.__file__ = f"<reparam-fuzz-{digest}>"
    linecache.cache[module.__file__] = (len(source), None, source.splitlines(True), module.__file__)
    sys.modules[module.__name__] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    _MODULES[digest] = module
    while len(_MODULES) > _MODULES_KEPT:  # models built from it keep working; only inspect forgets
        _, old = _MODULES.popitem(last=False)
        sys.modules.pop(old.__name__, None)
        linecache.cache.pop(old.__file__, None)
    return module.__dict__


def build_code(program: Program, dtype: str) -> str:
    """The lines that build the model and its inputs (the engine runs exactly these, and so
    does every reproducer)."""
    cast = "\nmodel = model.double()" if dtype == "float64" else ""
    dtype_argument = ", dtype=torch.float64" if dtype == "float64" else ""
    shapes = ", ".join(f"torch.randn({', '.join(map(str, shape))}{dtype_argument})"
                       for shape in program.input_shapes())
    return (f"torch.manual_seed({program.seed})\n"
            f"model = Program().eval()\n"
            f"randomize_batchnorm_(model, seed={program.seed})\n"
            f'randomize_parameters_(model, names=("gamma", "beta"), seed={program.seed}){cast}\n'
            f"inputs = [{shapes}]\n")


def build(program: Program, dtype: str = "float64"):
    """``(model, inputs)`` for ``program``: seeded weights, BatchNorm statistics and layer
    scales randomised, eval mode, in ``dtype``. The global RNG is left as it was."""
    namespace = dict(program_namespace(program.source()))
    namespace.update(randomize_batchnorm_=randomize_batchnorm_, randomize_parameters_=randomize_parameters_)
    with torch.random.fork_rng(devices=[]):
        exec(build_code(program, dtype), namespace)
    return namespace["model"], namespace["inputs"]


@functools.lru_cache(maxsize=4096)
def eager_error(program: Program) -> str | None:
    """Why the program does not run eagerly at both sizes (None if it does)."""
    try:
        types_ = infer_types(program)
        model, inputs = build(program, "float32")
        with torch.no_grad(), warnings.catch_warnings(), one_thread():
            warnings.simplefilter("ignore")
            for x in inputs:
                outputs = _as_list(model(x.clone()))
                for name, value in zip(program.outputs, outputs):
                    expected = types_[name].shapes[program.input_shapes().index(tuple(x.shape))]
                    if tuple(value.shape) != expected:
                        return f"{name}: shape {tuple(value.shape)}, inferred {expected}"
        return None
    except Exception as error:  # noqa: BLE001 - any error makes the program invalid
        return f"{type(error).__name__}: {error}"


@contextlib.contextmanager
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and fairer to a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=4096)
def runs_unbatched(program: Program) -> bool:
    """Whether the program also runs on one unbatched ``(C, *S)`` input (convs do): then
    ``fuse(model)``, which was shown no input, must be right for it too."""
    try:
        model, inputs = build(program, "float32")
        with torch.no_grad(), warnings.catch_warnings(), one_thread():
            warnings.simplefilter("ignore")
            model(inputs[0][0].clone())
        return True
    except Exception:  # noqa: BLE001
        return False


def _as_list(output) -> list:
    return list(output) if isinstance(output, (tuple, list)) else [output]


# ---- captures and checks ---------------------------------------------------------------

@dataclass(frozen=True)
class Finding:
    """What a check observed: a failure ``kind`` and a message (``error_type`` for crashes)."""

    kind: str
    message: str
    error_type: str = ""

    def same_as(self, other: "Finding | None") -> bool:
        return (isinstance(other, Finding) and other.kind == self.kind
                and other.error_type == self.error_type)


class Skip(Exception):
    """The capture does not apply (the exporter failed, the reference is random ...)."""


def capture_options(seed: int, capture: str) -> tuple[tuple[str, object], ...]:
    """Random options of one capture for one seed (deterministic)."""
    rng = random.Random(f"capture:{seed}:{capture}")
    if capture in ("export", "core"):
        return options(dynamic=rng.random() < 0.3)
    if capture == "onnx":
        return options(opset=rng.choice((13, 14, 17)), constant_folding=rng.random() < 0.6,
                       dynamic=rng.random() < 0.3, training=rng.random() < 0.15)
    if capture in ("fx", "fx-inputs") and rng.random() < EXPORT_FUSED:
        return options(export_fused=True)  # (whole programs only: see _check_exported_fused)
    return ()


EXPORT_FUSED = 0.35  # the share of fx captures whose fused whole program is also exported


def _error_text(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def _specialised(fused) -> bool:
    """Whether ``fuse`` captured the model with ``torch.export`` (an aten graph)."""
    report = getattr(fused, "fusion_report", None)
    return getattr(report, "frontend", "") == "aten"


def _snapshot(state: dict) -> dict:
    return {key: value.detach().clone() for key, value in state.items()}


def _compare(reference_outputs, candidate_outputs, rtol: float, where: str) -> Finding | None:
    reference_outputs, candidate_outputs = _as_list(reference_outputs), _as_list(candidate_outputs)
    if len(reference_outputs) != len(candidate_outputs):
        return Finding("wrong-shape", f"{where}: {len(reference_outputs)} outputs, fused gives "
                                      f"{len(candidate_outputs)}")
    for index, (a, b) in enumerate(zip(reference_outputs, candidate_outputs)):
        if tuple(a.shape) != tuple(b.shape):
            return Finding("wrong-shape", f"{where}: output {index} has shape {tuple(a.shape)}, "
                                          f"fused gives {tuple(b.shape)}")
    error = reparam_fx.relative_error(reference_outputs, candidate_outputs)
    if not error <= rtol:  # also NaN
        return Finding("wrong-values", f"{where}: relative error {error:.3g} > {rtol:g}")
    return None


def check_capture(program: Program, capture: str, capture_opts=None) -> Finding | None:
    """Fuse ``program`` in ``capture`` and compare with what ``fuse`` was given.

    Returns None when all is well, a :class:`Finding` on a failure; raises :class:`Skip`
    when the capture does not apply and :class:`InvalidProgram` when the program itself
    does not run (the shrinker's rejected candidates)."""
    if capture_opts is None:
        capture_opts = capture_options(program.seed, capture)
    problem = eager_error(program)
    if problem is not None:
        raise InvalidProgram(problem)
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]), one_thread():
        warnings.simplefilter("ignore")
        if capture == "onnx":
            return _check_onnx(program, dict(capture_opts))
        return _check_torch(program, capture, dict(capture_opts))


def _state(given) -> dict:
    """The tensors of what ``fuse`` was given: a module's state_dict, or an exported
    program's state_dict and constants."""
    if isinstance(given, torch.export.ExportedProgram):
        state = dict(given.state_dict)
        state.update({f"constant:{k}": v for k, v in given.constants.items() if isinstance(v, torch.Tensor)})
        return state
    return given.state_dict()


def _export_dynamic_shapes(program: Program):
    """Spatial dims dynamic where the program lets them be (``Dim.AUTO`` specialises the
    others; the size the result rejects is then skipped)."""
    return ({axis: torch.export.Dim.AUTO for axis in range(2, 2 + program.dims)},)


def _check_torch(program: Program, capture: str, capture_opts: dict) -> Finding | None:
    model, inputs = build(program, "float64")
    sizes = inputs
    if capture in ("fx", "fx-inputs"):
        given, reference = model, model
        if capture == "fx" and runs_unbatched(program):  # nothing proved the rank: (C, *S) too
            sizes = inputs + [inputs[0][0]]
        example = (inputs[0].clone(),)
        example_before = example[0].clone()
    else:
        try:
            dynamic = _export_dynamic_shapes(program) if capture_opts.get("dynamic") else None
            given = torch.export.export(model, (inputs[0].clone(),), dynamic_shapes=dynamic)
            if capture == "core":
                given = given.run_decompositions()
            reference = given.module()
        except Exception as error:  # noqa: BLE001 - torch.export's limits are not our failures
            raise Skip(f"torch.export: {_error_text(error)}") from None
        if not capture_opts.get("dynamic"):
            sizes = inputs[:1]
    given_outputs = {}  # what the model computes before fuse (fx captures: it is the reference),
    if capture in ("fx", "fx-inputs"):  # run on a copy: fuse gets the model as it was built
        import copy
        twin = copy.deepcopy(model)
        with torch.no_grad():
            for index, x in enumerate(sizes):
                try:
                    given_outputs[index] = [t.clone() for t in _as_list(twin(x.clone()))]
                except Exception:  # noqa: BLE001 - then it is not compared after fuse either
                    pass
    before = _snapshot(_state(given))
    try:
        if capture == "fx-inputs":
            fused = reparam_fx.fuse(given, example)
        else:
            fused = reparam_fx.fuse(given)
    except Exception as error:  # noqa: BLE001 - the model is in eval mode: any error is a failure
        return Finding("crash-fuse", _error_text(error), type(error).__name__)
    changed = changed_entries(before, _state(given))
    if changed:
        return Finding("mutated-input", f"fuse changed its argument: {', '.join(changed[:5])}")
    if capture == "fx-inputs" and not torch.equal(example[0], example_before):
        return Finding("mutated-input", "fuse changed its example input")
    with torch.no_grad():
        runnable = []
        for index, x in enumerate(sizes):
            where = f"input {tuple(x.shape)}"
            try:
                expected = reference(x.clone())
            except Exception as error:  # noqa: BLE001 - an exported program's guards
                if index in given_outputs:
                    return Finding("mutated-input", f"{where}: the model given no longer runs after fuse: "
                                                    f"{_error_text(error)}")
                if x is sizes[0]:
                    raise Skip(f"the program given does not run at {where}: {_error_text(error)}") from None
                continue
            if index in given_outputs and not _same_outputs(given_outputs[index], expected):
                return Finding("mutated-input", f"{where}: the model given computes something else after fuse")
            try:
                actual = fused(x.clone())
            except Exception as error:  # noqa: BLE001
                if capture == "fx-inputs" and x is not sizes[0] and _specialised(fused) \
                        and "Guard failed" in str(error):
                    continue  # a forward that does not trace, captured by torch.export at the
                    #           example inputs (documented): its guards refuse other sizes
                return Finding("crash-fused", f"{where}: {_error_text(error)}", type(error).__name__)
            runnable.append(x)
            finding = _compare(expected, actual, RTOL_FLOAT64, where)
            if finding is not None:
                return finding
        for x in runnable:
            macs_before = reparam_fx.mac_count(reference, (x.clone(),))
            macs_after = reparam_fx.mac_count(fused, (x.clone(),))
            if macs_after > macs_before:
                return Finding("mac-increase", f"input {tuple(x.shape)}: {macs_before} MACs -> {macs_after}")
    if capture_opts.get("export_fused") and capture in ("fx", "fx-inputs") and program.features():
        return _check_exported_fused(model, fused, inputs[0])
    return None


def _same_outputs(before: list, after) -> bool:
    after = _as_list(after)
    return len(before) == len(after) and all(
        a.shape == b.shape and torch.equal(a, b) for a, b in zip(before, after))


def _check_exported_fused(model, fused, x) -> Finding | None:
    """A fused whole program exports with ``torch.export`` whenever the program does (a
    kept-whole head that writes into its input list must be given a list it may write
    into), and the exported program computes what the model does."""
    import copy
    try:
        with torch.no_grad():
            torch.export.export(copy.deepcopy(model), (x.clone(),))
    except Exception:  # noqa: BLE001 - the program itself does not export: nothing to hold fuse to
        return None
    where = f"exported fused model, input {tuple(x.shape)}"
    try:
        with torch.no_grad():
            exported = torch.export.export(fused, (x.clone(),)).module()
            actual = exported(x.clone())
    except Exception as error:  # noqa: BLE001
        return Finding("crash-fused", f"{where}: {_error_text(error)}", f"export-fused:{type(error).__name__}")
    with torch.no_grad():
        expected = model(x.clone())
    finding = _compare(expected, actual, RTOL_FLOAT64, where)
    return replace(finding, error_type="export-fused") if finding else None


def export_onnx(program: Program, capture_opts: dict) -> bytes:
    """The program exported by ``torch.onnx.export(dynamo=False)`` with ``capture_opts``
    (raises :class:`Skip` when the exporter fails)."""
    if "movedim(-1" in program.source():
        # the TorchScript exporter writes movedim(-1, 1) as a Transpose whose perm holds -1
        # or uninitialised memory; ONNX Runtime and onnx's checker then fail or crash the process
        raise Skip("torch.onnx.export(dynamo=False) does not export movedim(-1, ...)")
    model, inputs = build(program, "float32")
    kwargs = dict(dynamo=False, opset_version=capture_opts["opset"],
                  do_constant_folding=capture_opts["constant_folding"], input_names=["x"],
                  output_names=[f"y{i}" for i in range(len(program.outputs))])
    if capture_opts.get("dynamic"):
        kwargs["dynamic_axes"] = {"x": {axis: f"s{axis}" for axis in range(2, 2 + program.dims)}}
    if capture_opts.get("training"):
        kwargs["training"] = torch.onnx.TrainingMode.TRAINING
    buffer = io.BytesIO()
    try:
        with quiet_output():
            torch.onnx.export(model, (inputs[0].clone(),), buffer, **kwargs)
    except Exception as error:  # noqa: BLE001 - the exporter's limits are not our failures
        raise Skip(f"torch.onnx.export: {_error_text(error)}") from None
    return buffer.getvalue()


@contextlib.contextmanager
def quiet_output():
    """Silence stdout and stderr, also what C++ writes to them (the TorchScript exporter
    prints whole graphs when it fails; onnx-graphsurgeon warns)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        os.dup2(devnull.fileno(), 1)
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _onnx_session(model_bytes: bytes):
    import onnxruntime as ort
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session_options.intra_op_num_threads = 1
    session_options.log_severity_level = 4  # fatal only: the exporter's models may warn
    return ort.InferenceSession(model_bytes, session_options, providers=["CPUExecutionProvider"])


_RANDOM_OPS = {"Dropout", "RandomNormal", "RandomNormalLike", "RandomUniform",
               "RandomUniformLike", "Bernoulli", "Multinomial"}


def _check_onnx(program: Program, capture_opts: dict) -> Finding | None:
    import numpy as np
    import onnx
    exported = export_onnx(program, capture_opts)
    _, inputs = build(program, "float32")
    original = onnx.load_from_string(exported)
    random = sorted({node.op_type for node in original.graph.node if node.op_type in _RANDOM_OPS})
    if capture_opts.get("training") and random:
        # (two equal runs of the reference prove nothing: a small dropout mask repeats often)
        raise Skip(f"the exported model is not deterministic (training-mode {', '.join(random)})")
    try:
        reference = _onnx_session(exported)
    except Exception as error:  # noqa: BLE001
        raise Skip(f"ONNX Runtime does not load the exported model: {_error_text(error)}") from None
    try:
        with quiet_output():
            fused, _report = reparam_fx.fuse_onnx_model(original)
    except Exception as error:  # noqa: BLE001
        return Finding("crash-fuse", _error_text(error), type(error).__name__)
    if original.SerializeToString() != exported:
        return Finding("mutated-input", "fuse_onnx_model changed its argument")
    try:
        onnx.checker.check_model(original)
    except Exception:  # noqa: BLE001 - the exporter's model is not valid: nothing to hold fuse to
        pass
    else:
        try:
            onnx.checker.check_model(fused)
        except Exception as error:  # noqa: BLE001
            return Finding("crash-fused", f"onnx.checker: {_error_text(error)}", type(error).__name__)
    try:
        candidate = _onnx_session(fused.SerializeToString())
    except Exception as error:  # noqa: BLE001
        return Finding("crash-fused", f"ONNX Runtime: {_error_text(error)}", type(error).__name__)
    sizes = inputs if capture_opts.get("dynamic") else inputs[:1]
    for x in sizes:
        where = f"input {tuple(x.shape)}"
        feeds = {"x": x.numpy()}
        try:
            expected = reference.run(None, feeds)
            again = reference.run(None, feeds)
        except Exception as error:  # noqa: BLE001 - shapes the exporter hard-coded
            if x is sizes[0]:
                raise Skip(f"the exported model does not run at {where}: {_error_text(error)}") from None
            continue
        if any(not np.array_equal(a, b, equal_nan=True) for a, b in zip(expected, again)):
            raise Skip("the exported model is not deterministic (training-mode dropout)")
        try:
            actual = candidate.run(None, feeds)
        except Exception as error:  # noqa: BLE001
            return Finding("crash-fused", f"{where}: {_error_text(error)}", type(error).__name__)
        finding = _compare([torch.from_numpy(a) for a in expected], [torch.from_numpy(b) for b in actual],
                           RTOL_ONNX, where)
        if finding is not None:
            return finding
    feeds = {"x": inputs[0].numpy()}
    macs_before, macs_after = onnx_mac_count(original, feeds), onnx_mac_count(fused, feeds)
    if macs_after > macs_before:
        return Finding("mac-increase", f"input {tuple(inputs[0].shape)}: {macs_before} MACs -> {macs_after}")
    return None


def onnx_mac_count(model, feeds) -> int:
    """Multiply-accumulates of the Conv, Gemm and MatMul nodes, and ``prod(kernel)`` per
    output of AveragePool (as ``reparam_fx.mac_count`` counts), with the shapes the
    tensors have when ONNX Runtime runs ``model`` on ``feeds``."""
    import math
    import onnx
    import onnxruntime as ort
    model = onnx.ModelProto.FromString(model.SerializeToString())
    counted = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul", "AveragePool")]
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    wanted = [name for node in counted for name in (node.output[0], node.input[1] if len(node.input) > 1 else "")]
    outputs = {o.name for o in model.graph.output}
    for name in dict.fromkeys(wanted):
        if name and name not in shapes and name not in outputs:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session_options.log_severity_level = 4
    session = ort.InferenceSession(model.SerializeToString(), session_options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    shapes.update((name, list(value.shape)) for name, value in zip(names, session.run(None, feeds)))
    total = 0
    for node in counted:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        outputs_count = math.prod(shapes[node.output[0]])
        if node.op_type == "AveragePool":
            total += outputs_count * math.prod(attributes["kernel_shape"])
        elif node.op_type == "Conv":
            total += outputs_count * math.prod(shapes[node.input[1]][1:])
        elif node.op_type == "Gemm":
            weight = shapes[node.input[1]]
            total += outputs_count * (weight[1] if attributes.get("transB") else weight[0])
        else:
            weight = shapes[node.input[1]]
            total += outputs_count * (weight[-2] if len(weight) > 1 else 1)
    return total


# ---- shrinking -------------------------------------------------------------------------

def _rename(statements, old: str, new: str):
    return tuple(replace(s, inputs=tuple(new if n == old else n for n in s.inputs)) for s in statements)


def shrink_candidates(program: Program, capture_opts) -> Iterator[tuple[Program, tuple]]:
    """Smaller or simpler variants of a failing program (and of its capture options)."""
    if len(program.outputs) > 1:
        for name in program.outputs:
            yield replace(program, outputs=(name,)), capture_opts
    types_ = infer_types(program)
    statements = program.statements
    for index in reversed(range(len(statements))):
        statement = statements[index]
        removed = statement.output
        earlier = ["x"] + [s.output for s in statements[:index]]
        replacements = [n for n in statement.inputs if n in earlier]
        replacements += [n for n in reversed(earlier) if n not in replacements]
        for replacement in replacements:
            if types_[replacement] != types_[removed] and removed in _used_names(program, index):
                continue
            rest = _rename(statements[index + 1:], removed, replacement)
            outputs = tuple(dict.fromkeys(replacement if n == removed else n for n in program.outputs))
            blocks = tuple(replace(b, members=tuple(m for m in b.members if m != removed)) for b in program.blocks)
            frame = program.frame.without(removed) if program.frame else None
            yield replace(program, statements=statements[:index] + rest, outputs=outputs,
                          blocks=tuple(b for b in blocks if b.members), frame=frame), capture_opts
            break
    if program.frame is not None:
        yield from ((candidate, capture_opts) for candidate in _simpler_frames(program))
    for index, block in enumerate(program.blocks):
        others = program.blocks[:index] + program.blocks[index + 1:]
        yield replace(program, blocks=others), capture_opts
        if block.kind != "traceable":
            yield replace(program, blocks=others + (replace(block, kind="traceable"),)), capture_opts
    for index, statement in enumerate(statements):
        for simpler in OPS[statement.kind].simpler(statement, program):
            yield replace(program, statements=statements[:index] + (simpler,) + statements[index + 1:]), capture_opts
    opts = dict(capture_opts)
    for name, simple in (("dynamic", False), ("training", False), ("constant_folding", True), ("opset", 17)):
        if name in opts and opts[name] != simple:
            yield program, tuple(sorted({**opts, name: simple}.items()))
    if opts.get("export_fused"):
        yield program, tuple(sorted((k, v) for k, v in opts.items() if k != "export_fused"))


def _simpler_frames(program: Program) -> Iterator[Program]:
    """The program without its frame, or with a simpler one: each option at its default,
    two adjacent layers merged, no routing loop."""
    frame = program.frame
    yield replace(program, frame=None)
    for name, default in Frame.DEFAULTS:
        if getattr(frame, name) != default:
            yield replace(program, frame=replace(frame, **{name: default}))
    if frame.layers:
        yield replace(program, frame=replace(frame, layers=()))
        for k in range(len(frame.layers) - 1):
            merged = frame.layers[:k] + (frame.layers[k] + frame.layers[k + 1],) + frame.layers[k + 2:]
            yield replace(program, frame=replace(frame, layers=merged))


def renumbered(program: Program) -> Program:
    """The same program with its variables numbered ``v1, v2, ...`` again."""
    names = {"x": "x"}
    statements = []
    for index, statement in enumerate(program.statements, 1):
        names[statement.output] = f"v{index}"
        statements.append(replace(statement, output=f"v{index}",
                                  inputs=tuple(names[n] for n in statement.inputs)))
    blocks = tuple(replace(b, members=tuple(names[m] for m in b.members)) for b in program.blocks)
    frame = program.frame
    if frame is not None:
        frame = replace(frame, layers=tuple(tuple(names[m] for m in layer) for layer in frame.layers))
    return replace(program, statements=tuple(statements), outputs=tuple(names[n] for n in program.outputs),
                   blocks=blocks, frame=frame)


def _used_names(program: Program, index: int) -> set[str]:
    used = set(program.outputs)
    for statement in program.statements[index + 1:]:
        used.update(statement.inputs)
    return used


def shrink(program: Program, capture: str, capture_opts, finding: Finding, *,
           max_checks: int = 300, time_limit: float = 120.0,
           check: Callable | None = None) -> tuple[Program, tuple, Finding, int]:
    """Delta debugging: apply the first candidate that still fails the same way, repeat to a
    fixpoint. Returns the smallest program, its capture options, its finding and the number
    of checks run."""
    check = check or check_capture
    deadline = time.monotonic() + time_limit
    checks = 0
    seen = set()
    improved = True
    while improved and checks < max_checks and time.monotonic() < deadline:
        improved = False
        for candidate, candidate_opts in shrink_candidates(program, capture_opts):
            key = (candidate.statements, candidate.outputs, candidate.blocks, candidate.frame, candidate_opts)
            if key in seen:
                continue
            seen.add(key)
            try:
                infer_types(candidate)
            except InvalidProgram:
                continue
            checks += 1
            try:
                outcome = check(candidate, capture, candidate_opts)
            except (Skip, InvalidProgram):
                outcome = None
            if finding.same_as(outcome):
                program, capture_opts, finding, improved = candidate, candidate_opts, outcome, True
                break
            if checks >= max_checks or time.monotonic() >= deadline:
                break
    compact = renumbered(program)
    # (a shared module keeps its first call's attribute name: not renamed)
    if compact != program and not any(s.kind == "reuse" for s in program.statements):  # renaming attributes should change nothing; keep it if so
        try:
            outcome = check(compact, capture, capture_opts)
        except (Skip, InvalidProgram):
            outcome = None
        checks += 1
        if finding.same_as(outcome):
            program, finding = compact, outcome
    return program, capture_opts, finding, checks


# ---- reproducers -----------------------------------------------------------------------

def reproducer(program: Program, capture: str, capture_opts, finding: Finding | None) -> str:
    """A self-contained script: the module, how it is built, the capture, and the check
    that fails (``assert``) while the bug is there."""
    opts = dict(capture_opts)
    kind = finding.kind if finding else "wrong-values"
    header = [f"# reparam_fx fuzz reproducer: seed {program.seed}, capture {capture!r}"
              + (f", options {opts}" if opts else "")]
    if finding:
        header.append(f"# {finding.kind}: {finding.message}")
    lines = header + [program.source().rstrip(), "", "",
                      "import reparam_fx",
                      "from reparam_fx.testing import randomize_batchnorm_, randomize_parameters_", ""]
    if capture == "onnx":
        lines += _onnx_reproducer(program, opts, kind)
    else:
        lines += _torch_reproducer(program, capture, opts, kind, finding)
    return "\n".join(lines) + "\n"


def _torch_reproducer(program: Program, capture: str, opts: dict, kind: str,
                      finding: Finding | None = None) -> list[str]:
    lines = build_code(program, "float64").rstrip().splitlines()
    sizes = "inputs"
    exported = finding is not None and finding.error_type.startswith("export-fused")
    if capture in ("fx", "fx-inputs"):
        given, reference = "model", "model"
        if capture == "fx" and runs_unbatched(program) and not exported:
            sizes = "inputs + [inputs[0][0]]"
            lines.append("# the model runs on an unbatched (C, *S) input too, and fuse(model) saw no input")
        if exported:
            sizes = "inputs[:1]"
    else:
        dynamic = ""
        if opts.get("dynamic"):
            axes = ", ".join(f"{a}: torch.export.Dim.AUTO" for a in range(2, 2 + program.dims))
            dynamic = f", dynamic_shapes=({{{axes}}},)"
        else:
            sizes = "inputs[:1]"
        decompose = ".run_decompositions()" if capture == "core" else ""
        lines.append(f"program = torch.export.export(model, (inputs[0].clone(),){dynamic}){decompose}")
        given, reference = "program", "program.module()"
    behaviour = kind == "mutated-input" and given == "model"  # what the model computes, too
    if kind == "mutated-input":
        state = "model.state_dict()" if given == "model" else "{**program.state_dict, **program.constants}"
        lines.append(f"before = {{k: v.clone() for k, v in {state}.items()}}")
        if behaviour:
            lines = ["import copy"] + lines + [
                "twin = copy.deepcopy(model)  # what the model computes, before fuse",
                "with torch.no_grad():", f"    outputs_before = [twin(x.clone()) for x in {sizes}]"]
    if capture == "fx-inputs":
        lines += ["example = inputs[0].clone()", f"fused = reparam_fx.fuse({given}, (example,))"]
    else:
        lines.append(f"fused = reparam_fx.fuse({given})")
    if kind == "crash-fuse":
        return lines
    if kind == "mutated-input":
        lines.append(f"after = {state}")
        lines.append('assert all(torch.equal(v, after[k]) for k, v in before.items()), "fuse changed its argument"')
        if capture == "fx-inputs":
            lines.append('assert torch.equal(example, inputs[0]), "fuse changed its example input"')
        if behaviour:
            lines += ["with torch.no_grad():",
                      f"    for x, expected in zip({sizes}, outputs_before):",
                      "        actual = model(x.clone())  # the model given, after fuse",
                      "        expected = list(expected) if isinstance(expected, (tuple, list)) else [expected]",
                      "        actual = list(actual) if isinstance(actual, (tuple, list)) else [actual]",
                      "        assert all(torch.equal(a, b) for a, b in zip(expected, actual)), "
                      '"fuse changed what the model computes"']
        return lines
    if exported:
        lines = ["import copy"] + lines + [
            "torch.export.export(copy.deepcopy(model), (inputs[0].clone(),))  # the program itself exports",
            "fused = torch.export.export(fused, (inputs[0].clone(),)).module()  # the fused one must too"]
    if reference != "model":
        lines.append(f"reference = {reference}")
        reference = "reference"
    if kind == "mac-increase":
        lines += [f"for x in {sizes}:",
                  f"    before, after = reparam_fx.mac_count({reference}, (x,)), reparam_fx.mac_count(fused, (x,))",
                  '    print(tuple(x.shape), "MACs", before, "->", after)',
                  '    assert after <= before, "fuse increased the MACs"']
        return lines
    lines += ["with torch.no_grad():",
              f"    for x in {sizes}:",
              f"        expected, actual = {reference}(x.clone()), fused(x.clone())",
              "        error = reparam_fx.relative_error(expected, actual)  # raises on a shape mismatch",
              '        print(tuple(x.shape), "relative error", error)',
              f'        assert error <= {RTOL_FLOAT64:g}, "fuse changed the values"']
    return lines


def _onnx_reproducer(program: Program, opts: dict, kind: str) -> list[str]:
    lines = ["import io", "import onnx", "import onnxruntime as ort", ""]
    lines += build_code(program, "float32").rstrip().splitlines()
    arguments = (f"dynamo=False, opset_version={opts['opset']}, do_constant_folding={opts['constant_folding']}, "
                 f'input_names=["x"]')
    if opts.get("dynamic"):
        axes = ", ".join(f'{a}: "s{a}"' for a in range(2, 2 + program.dims))
        arguments += f', dynamic_axes={{"x": {{{axes}}}}}'
    if opts.get("training"):
        arguments += ", training=torch.onnx.TrainingMode.TRAINING"
    lines += ["buffer = io.BytesIO()",
              f"torch.onnx.export(model, (inputs[0].clone(),), buffer, {arguments})",
              "original = onnx.load_from_string(buffer.getvalue())",
              "fused, report = reparam_fx.fuse_onnx_model(original)"]
    if kind == "crash-fuse":
        return lines
    if kind == "mutated-input":
        lines.append('assert original.SerializeToString() == buffer.getvalue(), "fuse_onnx_model changed its argument"')
        return lines
    if kind == "mac-increase":
        lines += ["", ""] + inspect.getsource(onnx_mac_count).rstrip().splitlines() + ["", "",
                  'feeds = {"x": inputs[0].numpy()}',
                  "before, after = onnx_mac_count(original, feeds), onnx_mac_count(fused, feeds)",
                  'print("MACs", before, "->", after)',
                  'assert after <= before, "fuse_onnx_model increased the MACs"']
        return lines
    sizes = "inputs" if opts.get("dynamic") else "inputs[:1]"
    lines += ["",
              "def run(model, x):",
              "    options = ort.SessionOptions()",
              "    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL",
              '    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])',
              '    return [torch.from_numpy(y) for y in session.run(None, {"x": x.numpy()})]',
              "",
              "",
              f"for x in {sizes}:",
              "    error = reparam_fx.relative_error(run(original, x), run(fused, x))  # raises on a shape mismatch",
              '    print(tuple(x.shape), "relative error", error)',
              f'    assert error <= {RTOL_ONNX:g}, "fuse_onnx_model changed the values"']
    return lines


# ---- the loop --------------------------------------------------------------------------

@dataclass
class Failure:
    """One failing (seed, capture), shrunk."""

    seed: int
    capture: str
    kind: str
    message: str
    program: Program  # the shrunk program
    capture_options: tuple
    original_statements: int
    shrink_checks: int
    reproducer: str

    @property
    def statements(self) -> int:
        return len(self.program.statements)

    def line(self) -> str:
        opts = f" {dict(self.capture_options)}" if self.capture_options else ""
        return (f"FAIL seed={self.seed} capture={self.capture}{opts} kind={self.kind}: {self.message} "
                f"[{self.original_statements} -> {self.statements} statements: {self.program.summary()}]")

    def signature(self) -> tuple:
        """Failures with the same signature are most likely one bug: the frontend, the kind,
        and for a crash its message without numbers and names, else the shrunk program's ops."""
        if self.kind.startswith("crash"):
            detail = _normalised_message(self.message)
        else:
            detail = ", ".join(sorted({s.kind for s in self.program.statements}))
        if dict(self.capture_options).get("training"):
            detail += " (training-mode export)"
        return (frontend(self.capture), self.kind, detail)


@dataclass
class FuzzResult:
    programs: int = 0
    captures_run: Counter = field(default_factory=Counter)
    captures_skipped: Counter = field(default_factory=Counter)
    skip_reasons: Counter = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    seeds_done: list[int] = field(default_factory=list)
    shrunk: set = field(default_factory=set)  # early signatures of the failures shrunk so far
    features: Counter = field(default_factory=Counter)  # programs per whole-program style

    def merge(self, other: "FuzzResult") -> None:
        self.shrunk.update(other.shrunk)
        self.features.update(other.features)
        self.programs += other.programs
        self.captures_run.update(other.captures_run)
        self.captures_skipped.update(other.captures_skipped)
        self.skip_reasons.update(other.skip_reasons)
        self.failures.extend(other.failures)
        self.seeds_done.extend(other.seeds_done)

    def summary(self) -> str:
        kinds = Counter(f.kind for f in self.failures)
        by_capture = Counter(f.capture for f in self.failures)
        classes = len({f.signature() for f in self.failures})
        lines = [f"programs: {self.programs} (seeds {min(self.seeds_done, default='-')}.."
                 f"{max(self.seeds_done, default='-')}), time {self.seconds:.1f} s",
                 "captures run: " + ", ".join(f"{c} {self.captures_run[c]}" for c in CAPTURES if c in self.captures_run)
                 + f" (total {sum(self.captures_run.values())})",
                 "captures skipped: " + (", ".join(f"{c} {n}" for c, n in sorted(self.captures_skipped.items()))
                                         or "none"),
                 "whole-program styles (programs): " + (", ".join(
                     f"{name} {count}" for name, count in sorted(self.features.items())) or "none"),
                 f"failures: {len(self.failures)}"
                 + (" (" + ", ".join(f"{k} {n}" for k, n in kinds.most_common()) + "; by capture: "
                    + ", ".join(f"{c} {n}" for c, n in by_capture.most_common()) + f"; {classes} distinct)"
                    if self.failures else "")]
        return "\n".join(lines)


def frontend(capture: str) -> str:
    return "onnx" if capture == "onnx" else "torch"


def _normalised_message(message: str) -> str:
    """A crash message without input sizes, numbers and quoted names."""
    import re
    message = re.sub(r"^input \([0-9, ]+\): ", "", message)
    message = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", message)
    return re.sub(r"\d+", "N", message)[:200]


def early_signature(capture: str, finding: Finding) -> tuple:
    """What is known of a failure before shrinking it (to shrink repeats less)."""
    detail = _normalised_message(finding.message) if finding.kind.startswith("crash") else ""
    return (frontend(capture), finding.kind, detail)


def fuzz_seed(seed: int, captures=CAPTURES, *, shrink_failures: bool = True,
              shrink_time_limit: float = 120.0, shrunk_before: frozenset = frozenset(),
              repeat_shrink_checks: int = 40) -> FuzzResult:
    """Generate the program of ``seed`` and check it in every capture. A failure whose
    :func:`early_signature` is in ``shrunk_before`` is shrunk with a smaller budget
    (``repeat_shrink_checks``)."""
    result = FuzzResult(programs=1, seeds_done=[seed])
    program = generate_program(seed)
    result.features.update(program.features())
    for capture in captures:
        capture_opts = capture_options(seed, capture)
        try:
            finding = check_capture(program, capture, capture_opts)
        except Skip as skip:
            result.captures_skipped[capture] += 1
            result.skip_reasons[f"{capture}: {str(skip)[:80]}"] += 1
            continue
        result.captures_run[capture] += 1
        if finding is None:
            continue
        small, small_opts, small_finding, checks = program, capture_opts, finding, 0
        if shrink_failures:
            repeat = early_signature(capture, finding) in shrunk_before
            small, small_opts, small_finding, checks = shrink(
                program, capture, capture_opts, finding, time_limit=shrink_time_limit,
                max_checks=repeat_shrink_checks if repeat else 300)
        result.shrunk.add(early_signature(capture, finding))
        result.failures.append(Failure(seed, capture, small_finding.kind, small_finding.message, small,
                                       small_opts, len(program.statements), checks,
                                       reproducer(small, capture, small_opts, small_finding)))
    return result


def parse_seeds(text: str) -> range:
    """``"0:500"`` -> range(0, 500); ``"7"`` -> range(7, 8)."""
    if ":" in text:
        start, stop = text.split(":", 1)
        return range(int(start), int(stop))
    return range(int(text), int(text) + 1)


def fuzz(seeds, captures=CAPTURES, *, time_budget: float | None = None, jobs: int = 1,
         isolate: bool = False, shrink_failures: bool = True,
         on_failure: Callable[[Failure], None] | None = None,
         on_progress: Callable[[FuzzResult], None] | None = None) -> FuzzResult:
    """Run :func:`fuzz_seed` over ``seeds`` (until ``time_budget`` seconds have passed).

    ``jobs > 1`` or ``isolate`` runs seeds in ``jobs`` worker processes, so that a crash of
    the process itself (a segfault in a kernel run on a fused model) is a failure of its
    seed (``crash-process``, found again capture by capture in fresh processes), not the
    end of the run."""
    start = time.monotonic()
    total = FuzzResult()

    def done(result: FuzzResult) -> None:
        total.merge(result)
        for failure in result.failures:
            if on_failure:
                on_failure(failure)
        if on_progress:
            on_progress(total)

    def out_of_time() -> bool:
        return time_budget is not None and time.monotonic() - start > time_budget

    if jobs <= 1 and not isolate:
        for seed in seeds:
            if out_of_time():
                break
            done(fuzz_seed(seed, captures, shrink_failures=shrink_failures,
                           shrunk_before=frozenset(total.shrunk)))
    else:
        _fuzz_in_workers(seeds, tuple(captures), max(1, jobs), shrink_failures, total, done, out_of_time)
    total.seeds_done.sort()
    total.seconds = time.monotonic() - start
    return total


def _process_pool(jobs: int):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)


def _fuzz_in_workers(seeds, captures, jobs, shrink_failures, total, done, out_of_time) -> None:
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool
    seed_iterator = iter(seeds)
    pool = _process_pool(jobs)
    running: dict = {}  # future -> seed; at most ``jobs``, so a dead worker names its seed
    try:
        while True:
            while len(running) < jobs and not out_of_time():
                seed = next(seed_iterator, None)
                if seed is None:
                    break
                running[pool.submit(fuzz_seed, seed, captures, shrink_failures=shrink_failures,
                                    shrunk_before=frozenset(total.shrunk))] = seed
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            if not any(isinstance(f.exception(), BrokenProcessPool) for f in finished):
                for future in finished:
                    running.pop(future)
                    done(future.result())
                continue
            wait(running)  # the pool is broken: every running future ends now
            for future, seed in running.items():
                if future.exception() is None:
                    done(future.result())
                else:
                    done(_seed_in_fresh_processes(seed, captures))
            running.clear()
            pool.shutdown(wait=False, cancel_futures=True)
            pool = _process_pool(jobs)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _seed_in_fresh_processes(seed: int, captures) -> FuzzResult:
    """A worker died on ``seed``: check each capture in a process of its own; a capture
    that kills its process is a ``crash-process`` failure (not shrunk: each check would
    need a fresh process)."""
    from concurrent.futures.process import BrokenProcessPool
    result = FuzzResult(programs=1, seeds_done=[seed])
    for capture in captures:
        with _process_pool(1) as pool:
            try:
                single = pool.submit(fuzz_seed, seed, (capture,)).result()
            except BrokenProcessPool:
                program, opts = generate_program(seed), capture_options(seed, capture)
                finding = Finding("crash-process", "the process died (a crash in native code)")
                result.captures_run[capture] += 1
                result.failures.append(Failure(seed, capture, finding.kind, finding.message, program, opts,
                                               len(program.statements), 0,
                                               reproducer(program, capture, opts, finding)))
                continue
        single.programs, single.seeds_done = 0, []
        result.merge(single)
    return result


def _worker_init() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
