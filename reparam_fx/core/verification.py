"""Numerical equivalence of a model and its fused form, measured in float64.

The error is relative to the reference's largest magnitude::

    err = max|reference(x) - candidate(x)| / max|reference(x)|

taken over every tensor output. Both models run on the same inputs; copies of both are
cast to float64 first, so the comparison measures the rewrite, not the arithmetic's
round-off. A correct fusion of a float64 model gives ~1e-15; of an fp32 model ~1e-7
(the fused weights themselves are rounded to fp32). ``precision="model"`` compares in
the models' own dtype instead.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class VerificationError(AssertionError):
    """The candidate's outputs differ from the reference's by more than the tolerance."""


def _flatten_outputs(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if type(output).__module__ == "numpy" and hasattr(output, "shape"):  # (ONNX Runtime's)
        return [torch.from_numpy(output.__array__())]
    if isinstance(output, dict):  # (in insertion order, as torch's pytree and the exporters)
        return [t for key in output for t in _flatten_outputs(output[key])]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _flatten_outputs(item)]
    return []


def as_inputs(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _run(model, inputs, dtype):
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if dtype is not None:
        model = copy.deepcopy(model).to(dtype)
        inputs = tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                       else t for t in inputs)
    with torch.no_grad():
        return _flatten_outputs(model(*inputs))


def relative_error(reference_outputs, candidate_outputs) -> float:
    """``max|a - b| / max|a|`` over matching output tensors or arrays (float64); outputs
    may be nested in tuples, lists and dicts."""
    ref = _flatten_outputs(reference_outputs)
    cand = _flatten_outputs(candidate_outputs)
    if len(ref) != len(cand):
        raise VerificationError(f"reference returned {len(ref)} tensors, candidate {len(cand)}")
    worst_diff, scale = 0.0, 0.0
    for index, (a, b) in enumerate(zip(ref, cand)):
        if a.shape != b.shape:
            raise VerificationError(
                f"output {index}: shape {tuple(a.shape)} (reference) != {tuple(b.shape)} (candidate)")
        a, b = a.detach().double(), b.detach().double()
        if a.numel():
            worst_diff = max(worst_diff, (a - b).abs().max().item())
            scale = max(scale, a.abs().max().item())
    return worst_diff / scale if scale > 0 else worst_diff


def verify(reference: nn.Module, candidate: nn.Module, example_inputs, rtol: float = 1e-5,
           *, precision: str = "float64") -> float:
    """Run both models on ``example_inputs`` and return the relative error.

    ``precision="float64"`` (default) runs float64 copies of both models;
    ``precision="model"`` runs them as they are. Raises :class:`VerificationError` when the
    error exceeds ``rtol`` or the outputs do not match in number or shape. Neither model
    is modified.
    """
    if precision not in ("float64", "model"):
        raise ValueError(f"precision must be 'float64' or 'model', not {precision!r}")
    inputs = as_inputs(example_inputs)
    dtype = torch.float64 if precision == "float64" else None
    error = relative_error(_run(reference, inputs, dtype), _run(candidate, inputs, dtype))
    return within_tolerance(error, rtol, f"compared in {precision}")


def within_tolerance(error: float, rtol: float, compared: str) -> float:
    """``error``, or :class:`VerificationError` if it exceeds ``rtol`` (or is NaN)."""
    if not error <= rtol:
        raise VerificationError(
            f"fused model differs from the reference: relative error {error:.3e} > rtol "
            f"{rtol:.1e} ({compared}). Check the fusion report for the regions that were "
            "rewritten, and report the model if the error is real.")
    return error
