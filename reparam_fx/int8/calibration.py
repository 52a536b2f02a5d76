"""Calibration inputs: what the int8 quantizers observe to choose their activation ranges.

    inputs = calibration_inputs(loader_of_batches)     # [(x0,), (x1,), ...], checked
    inputs = calibration_inputs([(a0, b0), (a1, b1)])  # a two-input model
    smoke = random_calibration((x,), 4)                # noise: for smoke runs only

A calibration set is an iterable (a list, a generator, a DataLoader-like object) whose
items are each the model's positional inputs: one tensor, or a tuple/list of tensors.
:func:`calibration_inputs` reads it once and checks it: at least one item, every item
the same number of floating-point tensors with the same shapes and dtypes as the first
(the quantized program is exported at the first item's shapes, batch size included).
What is wrong raises :class:`CalibrationError` (a ``ValueError``) saying which item and
what differs.

The quantizer's activation ranges come from these inputs alone, so they must be real
data (a few hundred samples of what the model will see, preprocessed the same way) for
the int8 model's accuracy to mean anything; :func:`random_calibration` exists for smoke
runs, where the ranges then come from noise.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["CalibrationError", "calibration_inputs", "random_calibration"]


class CalibrationError(ValueError):
    """The calibration (or evaluation) inputs are missing or malformed; the message says
    which item and what is wrong."""


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _item(item, index: int, what: str) -> tuple[torch.Tensor, ...]:
    """One item as a tuple of detached tensors."""
    if isinstance(item, torch.Tensor):
        tensors = (item,)
    elif isinstance(item, (tuple, list)):
        if not item:
            raise CalibrationError(f"{what} item {index} is an empty {type(item).__name__}; "
                                   "each item holds the model's inputs (one tensor or a tuple "
                                   "of tensors)")
        tensors = tuple(item)
    else:
        hint = (" (a DataLoader of dicts: pass the model's inputs, e.g. "
                "(batch['image'] for batch in loader))" if isinstance(item, dict) else "")
        raise CalibrationError(f"{what} item {index} is {_describe(item)}, not a tensor or a "
                               f"tuple of tensors{hint}")
    for position, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise CalibrationError(f"{what} item {index}: input {position} is "
                                   f"{_describe(tensor)}, not a tensor")
        if not tensor.dtype.is_floating_point:
            label = (" (a DataLoader of (input, label) pairs? pass the inputs alone, e.g. "
                     "(x for x, _ in loader))" if position > 0 else "")
            raise CalibrationError(f"{what} item {index}: input {position} is {tensor.dtype}, "
                                   f"not floating point; int8 calibration observes the "
                                   f"model's float inputs{label}")
    return tuple(tensor.detach() for tensor in tensors)


def _signature(item: tuple[torch.Tensor, ...]):
    return [(tuple(t.shape), t.dtype) for t in item]


def _difference(first, item, index: int, what: str) -> str | None:
    """What differs between item ``index`` and item 0, or None."""
    if len(item) != len(first):
        return (f"{what} item {index} holds {len(item)} tensor{'s' * (len(item) != 1)}, item 0 "
                f"holds {len(first)}; every item must hold the same inputs")
    for position, (a, b) in enumerate(zip(first, item)):
        if a.shape != b.shape:
            return (f"{what} item {index}: input {position} has shape {tuple(b.shape)}, item 0 "
                    f"has {tuple(a.shape)}; every item must have the same shapes (batch size "
                    f"included: the program is exported at item 0's shapes)")
        if a.dtype != b.dtype:
            return (f"{what} item {index}: input {position} is {b.dtype}, item 0 is {a.dtype}; "
                    f"every item must have the same dtypes")
    return None


def calibration_inputs(calibration, what: str = "calibration") -> list[tuple[torch.Tensor, ...]]:
    """``calibration`` read once and checked: a list of input tuples, each the model's
    positional inputs (see the module docstring). ``what`` names the data in messages
    (``"inputs"`` for evaluation inputs). Raises :class:`CalibrationError`."""
    if calibration is None:
        raise CalibrationError(f"no {what} data: pass an iterable of the model's inputs (a "
                               f"list of tensors or of tuples of tensors, or a DataLoader)")
    if isinstance(calibration, torch.Tensor):
        raise CalibrationError(
            f"{what} is a single tensor of shape {tuple(calibration.shape)}, not an iterable "
            f"of inputs: wrap it in a list ([x]) for one input, or iterate over batches "
            f"(list(x.split(batch_size))) for many")
    if isinstance(calibration, (str, bytes, dict)) or not isinstance(calibration, Iterable):
        raise CalibrationError(f"{what} is {_describe(calibration)}, not an iterable of inputs "
                               f"(a list of tensors or of tuples of tensors, or a DataLoader)")
    items = []
    for index, raw in enumerate(calibration):
        item = _item(raw, index, what)
        if items:
            difference = _difference(items[0], item, index, what)
            if difference:
                raise CalibrationError(difference)
        items.append(item)
    if not items:
        raise CalibrationError(f"{what} is empty: it must hold at least one input (a few "
                               f"hundred real samples give representative activation ranges)")
    return items


def random_calibration(example_inputs, count: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """``count`` standard-normal inputs shaped (and typed) like ``example_inputs`` (a
    tensor or a tuple of tensors), from ``seed``.

    For smoke runs only: the quantizer's activation ranges come from the calibration
    inputs, so with noise they fit noise, not the data the model will see. Real data is
    needed for a real int8 accuracy."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise CalibrationError(f"count must be a positive integer, not {count!r}")
    example = _item(example_inputs, 0, "example inputs") if isinstance(
        example_inputs, (torch.Tensor, tuple, list)) else None
    if example is None:
        raise CalibrationError(f"example inputs are {_describe(example_inputs)}, not a tensor "
                               f"or a tuple of tensors")
    generator = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(t.shape, generator=generator).to(t.dtype) for t in example)
            for _ in range(count)]
