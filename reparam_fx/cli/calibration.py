"""``--calibration CAL`` of ``reparam-fx``: int8 calibration inputs from a file, or noise.

``CAL`` is either

* a file saved with ``torch.save`` holding
    - one tensor whose first dimension indexes samples, for a program with one input: it
      is split into inputs of the program's batch size (the size the program was exported
      at), so the sample count must be a multiple of it; or
    - a list (or tuple) of inputs, each one tensor or a tuple of tensors, each of the
      program's input shapes exactly; or
* ``random:N``: N standard-normal inputs of the program's input shapes. The activation
  ranges then come from noise, not data, so the command prints a warning; only real data
  gives a real int8 accuracy.

Files are read with ``torch.load(weights_only=True)`` (tensors and containers, no code).
Everything wrong (a missing, empty, corrupt or foreign file, another shape or dtype than
the program's, a remainder) is a :class:`~reparam_fx.cli.errors.CliError` (exit 2) that
says what, raised before any quantization.
"""

from __future__ import annotations

import re

from reparam_fx.cli.errors import CliError
from reparam_fx.cli.files import check_input_file, describe_foreign
from reparam_fx.core.text import one_line

RANDOM = re.compile(r"random:(.*)", re.DOTALL)


def parse(value: str | None) -> int | str | None:
    """``random:N`` as the count N (a positive integer); a path as itself; None as None.
    A malformed ``random:`` is a usage error, raised before any file is read."""
    if value is None:
        return None
    match = RANDOM.fullmatch(value)
    if match is None:
        if value == "":
            raise CliError("--calibration needs a file name or random:N", usage=True)
        return value
    count = match.group(1)
    if not count.isdigit() or int(count) < 1:
        raise CliError(f"--calibration {value}: random:N takes a positive whole number of "
                       f"inputs, such as random:8", usage=True)
    return int(count)


def check_file(spec: int | str | None) -> None:
    """A calibration file exists and is readable (before the program is loaded)."""
    if isinstance(spec, str):
        check_input_file(spec, "the calibration file (saved with torch.save)",
                         "give the path of a file saved with torch.save",
                         "save the calibration inputs again with torch.save")


def _shapes(item) -> str:
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in item)


def load(spec: int | str, inputs: tuple) -> list[tuple]:
    """The calibration inputs for a program whose example inputs are ``inputs``."""
    import torch

    from reparam_fx.int8.calibration import (CalibrationError, calibration_inputs,
                                             random_calibration)

    if not all(isinstance(t, torch.Tensor) for t in inputs):
        raise CliError("int8 calibration needs a program whose inputs are tensors")
    if not all(t.dtype.is_floating_point for t in inputs):
        raise CliError(f"int8 calibration needs a program with floating-point inputs; it "
                       f"takes {_shapes(inputs)}")
    if isinstance(spec, int):
        return random_calibration(inputs, spec, seed=0)

    path = spec
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure: not a calibration file
        raise CliError(f"{path} is not a readable calibration file: "
                       f"{_unreadable(path, error)}; save a tensor or a list of tensors with "
                       f"torch.save") from None
    if isinstance(content, torch.Tensor):
        items = _split(content, inputs, path)
    elif isinstance(content, (list, tuple)):
        try:
            items = calibration_inputs(content)
        except CalibrationError as error:
            raise CliError(f"{path}: {error}") from None
    else:
        raise CliError(f"{path} holds {type(content).__name__}, not calibration inputs; save "
                       f"one tensor (samples along the first dimension) or a list of inputs")
    expected = [(tuple(t.shape), t.dtype) for t in inputs]
    got = [(tuple(t.shape), t.dtype) for t in items[0]]
    if got != expected:
        raise CliError(f"{path}: the calibration inputs are {_shapes(items[0])}, the program "
                       f"takes {_shapes(inputs)}")
    return items


def _unreadable(path: str, error: Exception) -> str:
    """What a file that ``torch.load(weights_only=True)`` refused looks like."""
    import zipfile
    refused = "Weights only load failed" in str(error)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (OSError, zipfile.BadZipFile):
            names = []
        if any(name.endswith("/archive_format") for name in names):
            return "it is a torch.export program (.pt2), not calibration inputs"
        if not any(name.endswith("data.pkl") for name in names):
            return "it is a zip archive that holds no torch.save data"
    else:
        with open(path, "rb") as file:
            head = file.read(4)
        if head.startswith(b"PK"):
            return "the torch.save archive is truncated or corrupt"
        if not head.startswith(b"\x80"):  # neither torch.save format (a zip, a pickle)
            foreign = describe_foreign(path)
            return ("it is not a torch.save file" +
                    (f" (it looks like {foreign.split(' (')[0]})" if foreign else
                     " (corrupt, truncated or another format)"))
    if refused:
        return ("it holds objects other than tensors and lists / tuples / dicts of them "
                "(read with torch.load(weights_only=True), which runs no code)")
    return f"the torch.save data is corrupt or truncated ({one_line(error)[:160]})"


def _split(tensor, inputs: tuple, path: str) -> list[tuple]:
    """One tensor of samples, split into inputs of the program's batch size."""
    if len(inputs) != 1:
        raise CliError(f"{path} holds one tensor, but the program takes {len(inputs)} inputs; "
                       f"save a list of tuples of {len(inputs)} tensors")
    (example,) = inputs
    if example.dim() == 0 or tensor.dim() != example.dim() or \
            tuple(tensor.shape[1:]) != tuple(example.shape[1:]):
        sample = tuple(example.shape[1:])
        raise CliError(f"{path} holds a tensor of shape {tuple(tensor.shape)}; the program "
                       f"takes {tuple(example.shape)}, so give samples of shape {sample} "
                       f"stacked along the first dimension: (N, {', '.join(map(str, sample))})")
    batch, count = example.shape[0], tensor.shape[0]
    if count == 0:
        raise CliError(f"{path} holds no samples (shape {tuple(tensor.shape)})")
    if count % batch:
        raise CliError(f"{path} holds {count} samples, not a multiple of the program's batch "
                       f"size {batch}; give {count - count % batch or batch} samples, or "
                       f"export the program at another batch size")
    if tensor.dtype != example.dtype:
        raise CliError(f"{path} holds {str(tensor.dtype).replace('torch.', '')} samples, the "
                       f"program takes {str(example.dtype).replace('torch.', '')}; convert "
                       f"them before saving (e.g. .float())")
    return [(chunk.contiguous(),) for chunk in tensor.split(batch)]


def warn_random(count: int, prog: str) -> None:
    """The warning ``random:N`` prints (one line on stderr)."""
    import sys
    print(f"{prog}: warning: --calibration random:{count}: the int8 activation ranges come "
          f"from random noise, not data; give real inputs for a real int8 accuracy",
          file=sys.stderr)
