"""The model zoo: RepVGG, MobileOne, FastViT, RepViT and MobileViT in training form only.

    import zoo
    zoo.names()                                  # every registered variant
    model = zoo.create("repvgg_a0", num_classes=1000)

The inference form comes from ``reparam_fx.fuse(model.eval())`` alone: no model here
can switch itself to it. Each architecture file registers its variant table with
:func:`register_variants`.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Decorator: make ``builder(num_classes=..., **kwargs)`` available as ``name``."""
    def decorate(builder):
        if name in _REGISTRY:
            raise ValueError(f"zoo model {name!r} is registered twice")
        _REGISTRY[name] = builder
        return builder
    return decorate


def register_variants(table: dict[str, dict], build: Callable[..., nn.Module]) -> None:
    """Register every row of a variant table: ``create(name, num_classes, **kwargs)``
    calls ``build(**table[name], num_classes=num_classes, **kwargs)`` (kwargs override
    the row)."""
    for name, row in table.items():
        def builder(num_classes: int = 1000, _row=row, **kwargs) -> nn.Module:
            return build(**{**_row, "num_classes": num_classes, **kwargs})
        builder.__name__ = builder.__qualname__ = name
        register(name)(builder)


def names() -> list[str]:
    """Every model variant, sorted."""
    return sorted(_REGISTRY)


def create(name: str, num_classes: int = 1000, **kwargs) -> nn.Module:
    """Build variant ``name`` in training form (randomly initialised)."""
    if name not in _REGISTRY:
        known = ", ".join(names()) or "none registered yet"
        raise ValueError(f"unknown zoo model {name!r}; valid names: {known}")
    return _REGISTRY[name](num_classes=num_classes, **kwargs)


# Each family registers its variants on import.
from zoo import fastvit, mobileone, mobilevit, repvgg, repvit  # noqa: E402

__all__ = ["create", "names", "register", "fastvit", "mobileone", "mobilevit", "repvgg", "repvit"]
