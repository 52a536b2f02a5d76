"""The third-party corpus: small models written with the code shapes of public
re-parameterizable implementations (timm, ultralytics, YOLOv6, RT-DETR, OpenMMLab, Apple's
MobileCLIP, ACNet / DiverseBranchBlock), each read from the public file named in its
``source`` and re-written here in our own words — asserts, BatchNorm subclasses, literal-0
sums, in-place adds, patched forwards and untraceable neighbours included.

Every module of this package defines ``IDIOMS: list[Idiom]``; :data:`CORPUS` collects them
by name. ``tests/test_third_party_corpus.py`` fuses every entry (``fuse(model)`` with no
``example_inputs``, and through ``torch.export``) and compares with the entry's own
re-parameterization, ``torch.fx.experimental.optimization.fuse`` and a plain conv+BN fold.

This is test code: nothing under ``reparam_fx/`` may import it.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from reparam_fx.testing import randomize_batchnorm_


@dataclass(frozen=True)
class Idiom:
    """One corpus model.

    ``build()`` returns the training-form model with random weights (any mode; the harness
    calls ``eval()`` and randomises BatchNorm statistics). ``reparameterize(model)`` is the
    library's own deploy conversion written the library's way (per-block methods, its
    ``fuse``/``switch_to_deploy``/``reparameterize`` walk); it gets a deep copy and returns the
    deployed model, or is None where the library has none. ``traceable`` says whether
    ``torch.fx.symbolic_trace`` traces the whole model (False: only with untraceable blocks
    kept as leaves). ``exportable``: whether ``torch.export.export`` captures it.
    ``must_remain``: op categories (see ``reparam_fx.op_counts``) that must still be there
    after fusion, at least this many (the negative cases: a fold that would be wrong).
    ``reason``: a phrase the fusion report must give for that refusal.
    ``proves_rank``: False for a bare block that takes a tensor whose rank nothing in its
    code proves (LeViT's blocks on ``(B, N, C)`` tokens): without ``example_inputs`` its
    BatchNorm1d may normalise another axis, so it is refused ("pass example_inputs"); the
    targets then hold for ``fuse(model, example_inputs)``.
    ``whole_program``: a whole detector (backbone, neck, head, the library's own ``forward``
    signature and routing loop): ``fuse(model)`` with no example inputs must reach at most
    the library's own deploy op counts, and the fused model must export (``torch.export``,
    ONNX).
    """

    name: str
    library: str
    source: str  # "owner/repo path/in/repo.py: ClassName, OtherClass"
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...] = (2, 3, 32, 32)
    reparameterize: Callable[[nn.Module], nn.Module] | None = None
    traceable: bool = True
    exportable: bool = True
    must_remain: dict = field(default_factory=dict)
    reason: str | None = None
    proves_rank: bool = True
    whole_program: bool = False
    notes: str = ""


def randomized_model(idiom: Idiom, seed: int = 3, dtype=torch.float64) -> nn.Module:
    """The entry's model in eval mode with randomised BatchNorm statistics and affines, and
    every parameter initialised to one constant (layer scales at 1e-5, learnable affines at
    1 and 0, branch scales) set to signed ``U(0.5, 1.5)``: identities hide folding bugs."""
    torch.manual_seed(seed)
    model = idiom.build().eval().to(dtype)
    randomize_batchnorm_(model, seed=seed + 1)
    generator = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for _, parameter in model.named_parameters():
            flat = parameter.detach().flatten()
            if flat.numel() and bool((flat == flat[0]).all()):
                sign = torch.randint(0, 2, parameter.shape, generator=generator) * 2 - 1
                value = (torch.rand(parameter.shape, generator=generator, dtype=torch.float64)
                         + 0.5) * sign
                parameter.copy_(value)
    return model


def example_input(idiom: Idiom, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(idiom.input_shape, generator=generator, dtype=torch.float64).to(dtype)


def _collect() -> dict[str, Idiom]:
    corpus: dict[str, Idiom] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for idiom in getattr(module, "IDIOMS", ()):
            if idiom.name in corpus:
                raise ValueError(f"duplicate corpus name {idiom.name!r}")
            corpus[idiom.name] = idiom
    return corpus


CORPUS: dict[str, Idiom] = _collect()
