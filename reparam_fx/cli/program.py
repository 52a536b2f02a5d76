"""``reparam-fx``: fuse a saved ``torch.export`` program, or lower it to a deployment format.

    reparam-fx fuse IN.pt2 -o OUT.pt2 [--verify] [--rtol 1e-4] [--report] [--in-place]
                   [--target float|int8] [--calibration CAL]
    reparam-fx export IN.pt2 --to onnx|coreml|xnnpack|coreml-pte -o OUT
    reparam-fx export IN.pt2 --to xnnpack-int8|onnx-int8|coreml-int8 --calibration CAL -o OUT
    python -m reparam_fx.cli ...

``fuse`` loads ``IN.pt2`` (``torch.export.save`` format) with ``torch.export.load``, fuses
it with :func:`reparam_fx.fuse` and saves the result as a program again: the fused graph
is re-exported at example inputs built from the program's own input placeholders
(random tensors of their shapes and dtypes), keeping every dynamic dimension dynamic with
the range the original program gave it. ``--verify`` runs the original program and the
fused one on those inputs in float64 (:func:`reparam_fx.verify`) and fails above
``--rtol``; ``--report`` prints the full :meth:`FusionReport.table`. ``--target int8``
fuses with the int8 policy (``reparam_fx.fuse(target="int8")``: the result is still exact
in float), calibrated on ``--calibration CAL`` if given (only with ``--target int8``).

``export`` lowers the program's ``module()`` with :mod:`reparam_fx.export`: ``onnx``
(:func:`~reparam_fx.export.to_onnx` with the ``torch.export``-based exporter, the one
that takes aten graphs), ``coreml`` (an ``.mlpackage``), ``xnnpack`` and ``coreml-pte``
(ExecuTorch ``.pte`` programs for the XNNPACK and Core ML delegates); the int8 targets
``xnnpack-int8`` (an int8 ``.pte``, :func:`~reparam_fx.export.to_executorch_int8`),
``onnx-int8`` (a QDQ ``.onnx`` from ONNX Runtime's static quantization,
:func:`~reparam_fx.export.to_onnx_int8`) and ``coreml-int8`` (a W8A8 ``.mlpackage`` for
iOS 17+, :func:`~reparam_fx.export.to_coreml_int8`) need ``--calibration CAL``, which the
float targets refuse.

``CAL`` (:mod:`reparam_fx.cli.calibration`): a ``torch.save`` file holding one tensor
whose first dimension indexes samples (split into inputs of the program's batch size; a
remainder is an error) or a list of inputs (tensors or tuples of tensors, of the
program's input shapes); or ``random:N``, N random inputs of the program's input shapes,
with a warning on stderr: the activation ranges then come from noise. The int8 programs
are exported at the program's example input shapes (batch size included).

Exit status (:mod:`reparam_fx.cli.errors`, as ``reparam-fx-onnx``)
    0  done; the output was written.
    1  fusion, re-export or verification failed; nothing was written.
    2  bad usage or bad input (missing / corrupt / non-program file, output equal to the
       input without ``--in-place``, unwritable output, a dynamic dimension without a
       hint, a lowering the backend refused, a missing / corrupt / ill-shaped calibration
       file, ``--calibration`` missing for an int8 target or given for a float one); a
       one-line ``reparam-fx: error: ...`` on stderr (after the usage line for a usage
       error), no traceback, nothing written.

``REPARAM_FX_DEBUG=1`` lets an unexpected exception (a bug) show its traceback.

Every check on the input and the output location runs before any work is done; the
output is staged next to itself and moved into place with ``os.replace``, so a failure
never leaves a partial file. An existing output is replaced (as ``reparam-fx-onnx`` does);
the input is never written to unless ``fuse --in-place``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import zipfile

from reparam_fx.cli import calibration as cal
from reparam_fx.cli.errors import (EXIT_FAILED, EXIT_OK, EXIT_STATUSES, CliError, Parser,
                                   add_fuse_arguments, run_command, unexpected)
from reparam_fx.cli.files import (check_input_file, check_output_folder, describe_foreign,
                                  output_path, same_path, staged)
from reparam_fx.cli.logs import quiet
from reparam_fx.core.text import one_line

PROG = "reparam-fx"
TARGETS = {  # --to -> (what it writes, the file name it suggests)
    "onnx": ("an ONNX model", "model.onnx"),
    "coreml": ("a Core ML ML Program package", "model.mlpackage"),
    "xnnpack": ("an ExecuTorch program for the XNNPACK delegate", "model.xnnpack.pte"),
    "coreml-pte": ("an ExecuTorch program for the Core ML delegate", "model.coreml.pte"),
    "xnnpack-int8": ("an int8 ExecuTorch program for the XNNPACK delegate", "model.int8.pte"),
    "onnx-int8": ("an int8 QDQ ONNX model", "model.int8.onnx"),
    "coreml-int8": ("a W8A8 Core ML ML Program package, iOS 17+", "model.int8.mlpackage"),
}
INT8_TARGETS = ("xnnpack-int8", "onnx-int8", "coreml-int8")
PACKAGES = ("coreml", "coreml-int8")  # targets that write an .mlpackage folder
CALIBRATION_HELP = ("int8 calibration inputs: a torch.save file holding a tensor whose first "
                    "dimension indexes samples (split into the program's batch size) or a list "
                    "of inputs; or random:N (N random inputs: a smoke run, the activation "
                    "ranges then come from noise)")


# ---- arguments -----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="Fold re-parameterizable blocks of a saved torch.export program "
                    "(torch.export.save, .pt2) into single convs, exactly, or lower the "
                    "program to ONNX, Core ML or ExecuTorch.",
        epilog=EXIT_STATUSES + " See also reparam-fx-onnx for .onnx files.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True

    fuse = commands.add_parser(
        "fuse", help="fuse a saved program and save the fused program",
        description="Load IN.pt2 (torch.export.save), fuse it with reparam_fx.fuse and save "
                    "the fused graph, re-exported with torch.export, to OUT.pt2. Dynamic "
                    "dimensions stay dynamic.",
        epilog="exit status: 0 ok, 1 fusion, re-export or verification failed, 2 bad usage "
               "or input. Nothing is written unless the status is 0.")
    add_fuse_arguments(fuse, ".pt2", "program",
                       "run both programs on the same random inputs in float64", 1e-4)
    fuse.add_argument("--target", choices=["float", "int8"], default="float",
                      help="what the fused program is for: float (default) or int8 (the int8 "
                           "fusion policy; the result is still exact in float)")
    fuse.add_argument("--calibration", metavar="CAL",
                      help=CALIBRATION_HELP + "; only with --target int8")

    export = commands.add_parser(
        "export", help="lower a saved program to ONNX, Core ML or ExecuTorch",
        description="Lower the program saved in IN.pt2 to " + "; ".join(
            f"{name}: {what} ({example})" for name, (what, example) in TARGETS.items()) + ".",
        epilog="exit status: 0 ok, 2 bad usage, bad input or a lowering the backend refused. "
               "Nothing is written unless the status is 0.")
    export.add_argument("input", metavar="IN.pt2", help="the saved program to lower")
    export.add_argument("--to", required=True, choices=list(TARGETS), help="the format to write")
    export.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="where to write it (a .mlpackage folder for --to coreml and "
                             "coreml-int8)")
    export.add_argument("--calibration", metavar="CAL",
                        help=CALIBRATION_HELP + f"; required for {', '.join(INT8_TARGETS)}, "
                             "refused for the float targets")
    return parser


def _output_path(args) -> str:
    """The output file, checked against the input (before anything is read)."""
    return output_path(args.input, args.output, getattr(args, "in_place", False), "OUT.pt2",
                       "pass --in-place" if args.command == "fuse" else "choose another -o")


# ---- input ---------------------------------------------------------------------------

def _check_input_file(path: str) -> None:
    check_input_file(path, "a .pt2 program",
                     "give the path of the .pt2 file (saved with torch.export.save)",
                     "save the program again with torch.export.save")


def _describe_non_program(path: str) -> str | None:
    """What a file that torch.export.load refused looks like, for the error message; None
    for what looks like a torch.export archive."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (OSError, zipfile.BadZipFile):
            names = []
        if any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
            return ("it is a torch.save checkpoint (a state dict or pickled module), not a "
                    "program; export the model with torch.export.export and save it with "
                    "torch.export.save")
        if any(name.endswith("/archive_format") for name in names):
            return None
        return "it is a zip archive that holds no torch.export program"
    if _looks_like_onnx(path):
        return "it is an ONNX model; fuse it with reparam-fx-onnx"
    foreign = describe_foreign(path)
    if foreign is not None and not foreign.startswith("a zip archive"):
        return f"it looks like {foreign.split(' (')[0]}"
    return "it is not a zip archive (corrupt, truncated or another format)"


def _looks_like_onnx(path: str) -> bool:
    try:
        import onnx
        with quiet():
            model = onnx.load_model(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - not ONNX either (or onnx not installed)
        return False
    return model.HasField("graph") and model.ir_version > 0 and len(model.graph.node) > 0


def load_program(path: str):
    """The ExportedProgram saved at ``path``, or a CliError saying what the file is. What
    is plainly no program (not a zip archive, a ``torch.save`` checkpoint) is refused before
    torch is imported."""
    what = _describe_non_program(path)
    if what is not None and not what.startswith("it is a zip archive"):
        raise CliError(f"{path} is not a readable torch.export program: {what}")
    import torch
    try:
        with quiet() as log, open(path, "rb") as file:  # any file name, not only *.pt2
            program = torch.export.load(file)
    except Exception as error:  # noqa: BLE001 - any failure: the file is not a program
        what = _describe_non_program(path)
        if what is None:  # a torch.export archive that does not load: say what failed
            detail = log.messages[0] if log.messages else f"{type(error).__name__}: {error}"
            what = (f"the archive is corrupt, truncated or from an incompatible torch version "
                    f"({one_line(detail).split('. ')[0][:200]})")
        raise CliError(f"{path} is not a readable torch.export program: {what}") from None
    if not isinstance(program, torch.export.ExportedProgram):
        raise CliError(f"{path} holds a {type(program).__name__}, not a torch.export program")
    return program


# ---- example inputs ------------------------------------------------------------------

def example_inputs(program, path: str, seed: int = 0):
    """``(inputs, dynamic_shapes)``: random tensors shaped like the program's user inputs
    (a dynamic dimension takes the size the program was exported at) and, for
    ``torch.export.export``, a ``Dim`` per dynamic dimension with the program's range
    (None when every dimension is static)."""
    import torch
    from torch.utils import _pytree as pytree

    user_inputs = program.graph_signature.user_inputs
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    in_spec = program.call_spec.in_spec
    if in_spec is not None:
        args_spec, kwargs_spec = in_spec.children() if hasattr(in_spec, "children") \
            else in_spec.children_specs
        if kwargs_spec.num_leaves:
            raise CliError(f"{path}: the program takes keyword inputs; reparam-fx handles "
                           f"programs whose inputs are positional tensors")
    ranges = {str(symbol): bounds for symbol, bounds in program.range_constraints.items()}
    generator = torch.Generator().manual_seed(seed)
    dims: dict[str, object] = {}
    inputs, shapes = [], []
    for name in user_inputs:
        fake = placeholders[name].meta.get("val") if name in placeholders else None
        if not isinstance(fake, torch.Tensor):
            raise CliError(f"{path}: input {name!r} is not a tensor ({type(fake).__name__}); "
                           f"reparam-fx handles programs whose inputs are tensors")
        sizes, spec = [], {}
        for axis, size in enumerate(fake.shape):
            if isinstance(size, int):
                sizes.append(size)
                continue
            hint = size.node.hint
            if hint is None:
                raise CliError(f"{path}: input {name!r} has a dynamic dimension {size} (axis "
                               f"{axis}) with no example size in the program; export it with "
                               f"example inputs of that size")
            sizes.append(int(hint))
            spec[axis] = _dim(str(size.node.expr), ranges, dims)
        inputs.append(_random_tensor(torch, sizes, fake.dtype, generator))
        shapes.append(spec or None)
    dynamic = tuple(shapes) if any(shapes) else None
    if in_spec is not None:  # nested positional inputs (tuples/lists of tensors)
        args, _ = pytree.tree_unflatten(inputs, in_spec)
        if dynamic is not None:
            dynamic = pytree.tree_unflatten(list(shapes), args_spec)
        return tuple(args), dynamic
    return tuple(inputs), dynamic


def _dim(expr: str, ranges: dict, dims: dict):
    """One ``Dim`` per symbol (shared by every axis that had it); ``Dim.AUTO`` for a
    derived dimension (``2*s0``), which torch.export works out again."""
    from torch.export import Dim
    if expr not in ranges or not expr.isidentifier():
        return Dim.AUTO
    if expr not in dims:
        bounds = ranges[expr]
        lower = int(bounds.lower) if bounds.lower.is_Integer else 0
        upper = int(bounds.upper) if bounds.upper.is_Integer else None
        dims[expr] = Dim(expr, min=lower, max=upper)
    return dims[expr]


def _random_tensor(torch, sizes, dtype, generator):
    if dtype.is_floating_point:
        return torch.randn(sizes, generator=generator).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, sizes, generator=generator).bool()
    if dtype.is_complex:
        return torch.randn(sizes, dtype=dtype, generator=generator)
    return torch.randint(0, 8, sizes, generator=generator).to(dtype)


def inference_module(program):
    """``program.module()`` marked as in inference mode. Its graph is fixed (a BatchNorm in
    it already is the eval or training op it was exported as) and ``.eval()`` is not
    supported on it, so the flag is set directly; the lowering functions check it."""
    module = program.module()
    for submodule in module.modules():
        submodule.training = False
    return module


# ---- output --------------------------------------------------------------------------

def _check_output_location(output: str, package: bool = False) -> str:
    """The output's folder exists and is writable (an existing ``.mlpackage`` may be
    replaced); returns the folder."""
    return check_output_folder(
        output, "model.mlpackage" if package else "model_fused.pt2",
        folder_output_ok=package and os.path.isfile(os.path.join(output, "Manifest.json")))


def save_program_atomically(program, output: str, mode_from: str | None = None) -> None:
    """``torch.export.save`` staged next to ``output`` (under the output's own name, which
    the archive records), then moved into place (:func:`reparam_fx.cli.files.staged`)."""
    import torch
    try:
        with staged(output, mode_from) as path, quiet():
            torch.export.save(program, path)
    except OSError as error:
        raise CliError(f"cannot write {output}: {one_line(error)}; choose another -o") from None


# ---- calibration ---------------------------------------------------------------------

def _check_calibration_file(spec, output: str) -> None:
    """The calibration file exists, is readable and is not the output."""
    cal.check_file(spec)
    if isinstance(spec, str) and same_path(spec, output):
        raise CliError(f"-o {output} is the calibration file; refusing to overwrite it; "
                       f"choose another -o")


def _calibration(spec, inputs: tuple):
    """The calibration inputs (None without ``--calibration``); ``random:N`` warns."""
    if spec is None:
        return None
    items = cal.load(spec, inputs)
    if isinstance(spec, int):
        cal.warn_random(spec, PROG)
    return items


# ---- commands ------------------------------------------------------------------------

def run_fuse(args) -> int:
    if not (args.rtol >= 0 and math.isfinite(args.rtol)):
        raise CliError(f"--rtol {args.rtol} must be a finite number >= 0", usage=True)
    if args.calibration is not None and args.target != "int8":
        raise CliError("--calibration is only for --target int8 (the float fusion needs no "
                       "data)", usage=True)
    spec = cal.parse(args.calibration)
    output = _output_path(args)
    _check_input_file(args.input)
    _check_calibration_file(spec, output)
    _check_output_location(output)
    program = load_program(args.input)
    inputs, dynamic_shapes = example_inputs(program, args.input)
    calibration = _calibration(spec, inputs)

    import torch

    import reparam_fx
    from reparam_fx.int8.calibration import CalibrationError
    try:
        with quiet():
            fused = reparam_fx.fuse(program, target=args.target, calibration=calibration)
    except CalibrationError as error:
        raise CliError(f"cannot fuse {args.input} for int8: {one_line(error)}") from None
    except reparam_fx.FusionError as error:
        raise CliError(f"cannot fuse {args.input}: {one_line(error)}") from None
    except Exception as error:  # noqa: BLE001 - any failure is reported in one line
        raise unexpected(f"fusing {args.input}", error) from None
    report = fused.fusion_report
    print(report.table() if args.report else report.summary(args.input))

    if args.verify:
        try:
            with quiet():
                error = reparam_fx.verify(inference_module(program), fused, inputs, rtol=math.inf)
        except reparam_fx.VerificationError as failure:
            raise CliError(f"verification failed: {one_line(failure)}; nothing written",
                           EXIT_FAILED) from None
        except Exception as failure:  # noqa: BLE001
            raise unexpected("verification", failure) from None
        if not error <= args.rtol:  # also catches NaN
            raise CliError(f"verification failed: max relative error {error:.3g} is above "
                           f"--rtol {args.rtol:g}; nothing written", EXIT_FAILED)
        print(f"verify: max relative error {error:.3g} (rtol {args.rtol:g}) ok")

    try:
        with quiet():
            fused_program = torch.export.export(fused, inputs, dynamic_shapes=dynamic_shapes)
    except Exception as error:  # noqa: BLE001
        raise unexpected(f"re-exporting the fused {args.input} with torch.export", error) \
            from None
    save_program_atomically(fused_program, output, mode_from=args.input if args.in_place else None)
    print(f"wrote {output}")
    return EXIT_OK


def run_export(args) -> int:
    if args.to in INT8_TARGETS and args.calibration is None:
        raise CliError(f"--to {args.to} needs --calibration CAL (a torch.save file of real "
                       f"inputs; random:N for a smoke run)", usage=True)
    if args.to not in INT8_TARGETS and args.calibration is not None:
        raise CliError(f"--calibration is only for the int8 targets ({', '.join(INT8_TARGETS)}); "
                       f"--to {args.to} needs no data", usage=True)
    spec = cal.parse(args.calibration)
    output = _output_path(args)
    package = args.to in PACKAGES
    if package and not output.rstrip("/" + os.sep).endswith(".mlpackage"):
        raise CliError(f"-o {output}: --to {args.to} writes an .mlpackage folder; give a name "
                       f"ending in .mlpackage, such as {os.path.splitext(output)[0]}.mlpackage")
    output = output.rstrip("/" + os.sep) if package else output
    _check_input_file(args.input)
    _check_calibration_file(spec, output)
    _check_output_location(output, package=package)
    program = load_program(args.input)
    inputs, _ = example_inputs(program, args.input)
    calibration = _calibration(spec, inputs)

    from reparam_fx import export as lower
    model = inference_module(program)
    try:
        with quiet():
            if args.to == "onnx":  # the TorchScript exporter cannot take an aten graph
                lower.to_onnx(model, inputs, output, dynamo=True)
            elif args.to == "coreml":
                lower.to_coreml(model, inputs, output)
            elif args.to == "xnnpack-int8":
                lower.to_executorch_int8(model, inputs, output, calibration=calibration)
            elif args.to == "onnx-int8":
                lower.to_onnx_int8(model, inputs, output, calibration=calibration, dynamo=True)
            elif args.to == "coreml-int8":
                lower.to_coreml_int8(model, inputs, output, calibration=calibration)
            else:
                lower.to_executorch(model, inputs, output,
                                    backend="xnnpack" if args.to == "xnnpack" else "coreml")
    except lower.ExportError as error:
        raise CliError(f"cannot export {args.input} to {args.to}: "
                       f"{one_line(error).rstrip(':')}") from None
    except Exception as error:  # noqa: BLE001
        raise unexpected(f"exporting {args.input} to {args.to}", error) from None
    print(f"wrote {output} ({TARGETS[args.to][0]})")
    return EXIT_OK


# ---- main ----------------------------------------------------------------------------

def main(argv=None) -> int:
    """Entry point of ``reparam-fx`` and ``python -m reparam_fx.cli``; returns the exit status."""
    return run_command(PROG, build_parser(), lambda args: (
        run_fuse(args) if args.command == "fuse" else run_export(args)), argv)


if __name__ == "__main__":
    sys.exit(main())
