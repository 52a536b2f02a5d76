"""Hand-written baseline implementations of re-parameterizable blocks (tests only, not library code)."""

from . import blocks, models
from .models import ALL_BUILDERS, reparameterize_model

__all__ = ["ALL_BUILDERS", "blocks", "models", "reparameterize_model"]
