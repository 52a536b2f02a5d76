"""``reparam-fx-onnx``: fold the re-parameterizable blocks of an ``.onnx`` file into single convs.

    python tools/fuse_onnx.py IN.onnx -o OUT.onnx [--verify] [--rtol 1e-5]
                              [--input-shape NAME:1,3,224,224 ...] [--report] [--in-place]

A thin command line over :func:`reparam_fx.onnx.fuse_onnx_model` and
:func:`reparam_fx.onnx.verify_onnx`. It prints the node count before and after and one
line per fused pattern; ``--report`` prints the full :meth:`FusionReport.table` with the
reasons nodes were left alone.

Exit status
    0  fused (and verified, with ``--verify``); the output was written.
    1  fusion or verification failed; nothing was written.
    2  bad usage or bad input (missing / corrupt / truncated / non-ONNX file, opset < 13,
       missing or unsafe external data, unwritable output, a symbolic input dimension
       without ``--input-shape``); a one-line ``reparam-fx-onnx: error: ...`` on stderr,
       no traceback, nothing written.

``REPARAM_FX_DEBUG=1`` lets an unexpected exception (a bug) show its traceback.

Every check on the input runs before any work is done, and the output is written last:

1. the input is a readable, non-empty regular file that parses as an ONNX ``ModelProto``
   with a graph and a default-domain opset >= 13, read *weightless*
   (:func:`reparam_fx.onnx.io.load_weightless`: each large tensor's data stays in the file
   and is read only where a region needs it);
2. every external-data ``location`` is a relative path inside the model's folder (no
   absolute path, no ``..`` component, no symbolic link), and the file it names exists
   and holds the bytes the tensor claims — all checked *before* any data is read;
3. ``onnx.checker`` accepts the model;
4. the fused graph keeps the input/output names, element types and shapes;
5. the output goes to a fresh temporary folder next to it (where the fused weights are
   also kept as they are computed) and is moved into place with ``os.replace`` (the
   external-data file first, then the model), so a crash never leaves a partial
   ``OUT.onnx``; the temporary folder is removed whatever happens. The output is written
   tensor by tensor (:func:`reparam_fx.onnx.io.save_streaming`).

Memory: the weightless model, one region's weights and a copy buffer (and the fused
weights, for an output without external data). ``--verify`` runs the input file and the
staged output in ONNX Runtime, which reads them itself, before the output is moved into
place.

A model that had external data, or whose tensors exceed the 2 GB protobuf limit, is saved
with its tensors in ``OUT.onnx.data`` next to ``OUT.onnx``. The input (and its external
data) is never written to unless ``--in-place``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass

from reparam_fx.cli.errors import (EXIT_FAILED, EXIT_OK, CliError, Parser, add_fuse_arguments,
                                   run_command)
from reparam_fx.cli.files import (check_input_file, check_output_folder, describe_foreign,
                                  fsync, fsync_folder, output_path, staging_folder)
from reparam_fx.cli.logs import quiet_onnxruntime
from reparam_fx.core.text import one_line

PROG = "reparam-fx-onnx"
DESCRIPTION = ("Fold re-parameterizable blocks (conv+BN, RepVGG/MobileOne branches, FastViT "
               "RepMixer/CPE, layer scales) of an ONNX model into single convs, exactly.")
MIN_OPSET = 13
DEFAULT_DOMAINS = ("", "ai.onnx")
# Tensor bytes above which the output is saved with external data. The protobuf limit is
# 2 GiB for the whole model; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27
# Tensors of at least this many bytes go to the external-data file (onnx's default).
EXTERNAL_DATA_SIZE_THRESHOLD = 1024

# ---- arguments -----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description=DESCRIPTION)
    add_fuse_arguments(parser, ".onnx", "model",
                       "run both models in ONNX Runtime on the same random inputs", 1e-5)
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME:d0,d1,...",
                        help="shape of a graph input for --verify, needed when the model's "
                             "shape has symbolic dimensions; repeat per input")
    return parser


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"images:1,3,224,224"`` -> ``("images", (1, 3, 224, 224))``. The name may itself
    contain ``:`` (``input:0``); the shape is what follows the last one."""
    name, sep, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d <= 0 for d in shape):
        raise CliError(f"--input-shape {text!r} is not NAME:d0,d1,... with positive integer "
                       f"dimensions (e.g. --input-shape images:1,3,224,224)")
    return name, shape


@dataclass
class _Paths:
    input: str
    output: str
    in_place: bool


def _resolve_paths(args) -> _Paths:
    output = output_path(args.input, args.output, args.in_place, "OUT.onnx")
    return _Paths(args.input, output, args.in_place)


# ---- input checks --------------------------------------------------------------------

def _check_input_file(path: str) -> int:
    """The input is an existing, readable, non-empty regular file; returns its size."""
    return check_input_file(path, "an .onnx file",
                            "give the path of the .onnx file inside it",
                            "re-export or re-download the model")


def _read_model(onnx, path: str):
    """Parse the ModelProto without its external data."""
    from google.protobuf.message import DecodeError

    foreign = describe_foreign(path)
    if foreign is not None:
        raise CliError(f"{path} is not an ONNX model, it looks like {foreign}; "
                       f"give an .onnx file")
    from reparam_fx.onnx.io import load_weightless
    try:
        model = load_weightless(path)
    except DecodeError as error:
        raise CliError(f"{path} is not a readable ONNX model: the file is corrupt, truncated "
                       f"or not ONNX ({one_line(error)}); re-export or re-download it") from None
    except (OSError, ValueError) as error:
        raise CliError(f"cannot read {path}: {one_line(error)}") from None
    if not model.HasField("graph") or model.ir_version <= 0:
        raise CliError(f"{path} is not an ONNX model (no graph or IR version in it: corrupt, "
                       f"truncated or another format); re-export or re-download it")
    return model


def _check_opset(model, path: str) -> int:
    versions = [op.version for op in model.opset_import if op.domain in DEFAULT_DOMAINS]
    if not versions:
        raise CliError(f"{path} declares no opset for the default ONNX domain (opset_import); "
                       f"the file is incomplete or truncated; re-export it")
    opset = max(versions)
    if opset < MIN_OPSET:
        raise CliError(f"{path} uses opset {opset}; reparam-fx-onnx needs opset {MIN_OPSET} or "
                       f"later: re-export with opset_version>={MIN_OPSET}, or convert it with "
                       f"onnx.version_converter.convert_version(model, 17)")
    return opset


def _graph_tensors(graph):
    """Every TensorProto a graph holds: initializers, sparse initializers and attribute
    tensors, recursively through subgraphs."""
    for tensor in graph.initializer:
        yield tensor
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _node_tensors(graph.node)


def _node_tensors(nodes):
    for node in nodes:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("sparse_tensor"):
                yield attribute.sparse_tensor.values
                yield attribute.sparse_tensor.indices
            for sparse in attribute.sparse_tensors:
                yield sparse.values
                yield sparse.indices
            if attribute.HasField("g"):
                yield from _graph_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _graph_tensors(subgraph)


def _model_tensors(model):
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node)


def _external_data(model) -> list[tuple[object, dict[str, str]]]:
    from onnx import TensorProto
    return [(tensor, {entry.key: entry.value for entry in tensor.external_data})
            for tensor in _model_tensors(model)
            if tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL]


def _unsafe_location(location: str) -> str | None:
    """Why an external-data location may not be followed, or None."""
    if not location:
        return "is empty"
    if "\0" in location:
        return "contains a NUL character"
    if os.path.isabs(location) or location.startswith(("/", "\\")) or \
            re.match(r"^[A-Za-z]:", location):
        return "is an absolute path"
    if ".." in re.split(r"[\\/]+", location):
        return "has a '..' component"
    return None


def _check_external_data(model, path: str) -> set[str]:
    """Refuse unsafe or missing external data *before* reading any of it; returns the real
    paths of the data files."""
    entries = _external_data(model)
    if not entries:
        return set()
    model_dir = os.path.dirname(os.path.abspath(path))
    real_dir = os.path.realpath(model_dir)
    sizes: dict[str, int] = {}
    for tensor, info in entries:
        location = info.get("location", "")
        why = _unsafe_location(location)
        if why is not None:
            raise CliError(f"{path}: external data location {location!r} of tensor "
                           f"{tensor.name!r} {why}; only files inside the model's folder are "
                           f"read, so refusing to load it. Keep the data file next to the "
                           f"model and record its plain name as the location")
        data_path = os.path.join(model_dir, location)
        if os.path.islink(data_path):
            raise CliError(f"{path}: external data file {location!r} is a symbolic link; "
                           f"onnx refuses to read those. Replace it with the file itself")
        real = os.path.realpath(data_path)
        if os.path.commonpath([real, real_dir]) != real_dir:
            raise CliError(f"{path}: external data location {location!r} of tensor "
                           f"{tensor.name!r} resolves outside the model's folder (through a "
                           f"linked folder); refusing to read it. Copy the data file next to "
                           f"the model")
        if real not in sizes:
            if not os.path.exists(data_path):
                raise CliError(f"{path}: external data file {location!r} (tensor "
                               f"{tensor.name!r}) is missing from {model_dir}; copy it next "
                               f"to the model")
            if not os.path.isfile(data_path):
                raise CliError(f"{path}: external data {location!r} of tensor {tensor.name!r} "
                               f"is not a regular file")
            if not os.access(data_path, os.R_OK):
                raise CliError(f"{path}: external data file {location!r}: permission denied")
            sizes[real] = os.path.getsize(data_path)
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") else None
        except ValueError:
            raise CliError(f"{path}: tensor {tensor.name!r} has a malformed external data "
                           f"offset/length; re-export the model") from None
        expected = _data_bytes(tensor)
        if length is not None and expected is not None and length != expected:
            raise CliError(f"{path}: tensor {tensor.name!r} claims {length} bytes of external "
                           f"data but its shape and type need {expected}; re-export the model")
        end = offset + (length if length is not None else 0)
        if offset < 0 or (length is not None and length < 0) or end > sizes[real]:
            raise CliError(f"{path}: external data file {location!r} is shorter than tensor "
                           f"{tensor.name!r} needs (bytes {offset}..{end}, file has "
                           f"{sizes[real]}): it is truncated; copy it again")
    return set(sizes) - {os.path.realpath(path)}  # not its own tensors, read in place


def _data_bytes(tensor) -> int | None:
    """The bytes a tensor of fixed-size elements holds (None for strings, 4-bit types)."""
    from reparam_fx.onnx.io import raw_itemsize
    itemsize = raw_itemsize(tensor.data_type)
    return None if itemsize is None else math.prod(tensor.dims) * itemsize


def _check_model(onnx, model, path: str) -> None:
    """onnx.checker on the weightless model, its large initializers (whose bytes
    :func:`_check_external_data` found in place) made graph inputs of the same type and
    shape: the checker sees every node, name and type without reading the weights. (A
    model with external data elsewhere, in a subgraph or an attribute, is checked from
    its file.)"""
    from reparam_fx.onnx.io import is_stored
    top = [t for t in model.graph.initializer if is_stored(t)]
    whole_file = sum(1 for tensor in _model_tensors(model) if is_stored(tensor)) > len(top)
    checked = onnx.ModelProto()
    if not whole_file:
        checked.CopyFrom(model)
        kept = [t for t in checked.graph.initializer if not is_stored(t)]
        del checked.graph.initializer[:]
        checked.graph.initializer.extend(kept)
        declared = {value.name for value in checked.graph.input}
        checked.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                                   for t in top if t.name not in declared)
    try:
        onnx.checker.check_model(path if whole_file else checked)
    except onnx.checker.ValidationError as error:
        raise CliError(f"{path} is not a valid ONNX model: {one_line(error)}") from None
    except Exception as error:  # noqa: BLE001 - the checker raises a few unrelated types
        raise CliError(f"{path} is not a valid ONNX model: {type(error).__name__}: "
                       f"{one_line(error)}") from None


# ---- graph interface -----------------------------------------------------------------

def _value_signature(value_info) -> tuple:
    tensor = value_info.type.tensor_type if value_info.type.HasField("tensor_type") else None
    if tensor is None:
        return (value_info.name, value_info.type.SerializeToString(deterministic=True))
    shape = None
    if tensor.HasField("shape"):
        shape = tuple(dim.dim_value if dim.HasField("dim_value") else
                      (dim.dim_param or None) for dim in tensor.shape.dim)
    return (value_info.name, tensor.elem_type, shape)


def _format_signature(signature: tuple) -> str:
    if len(signature) == 2:
        return f"{signature[0]}: (non-tensor)"
    from onnx import TensorProto
    name, elem_type, shape = signature
    dims = "?" if shape is None else ",".join("?" if d is None else str(d) for d in shape)
    return f"{name}: {TensorProto.DataType.Name(elem_type).lower()}[{dims}]"


def graph_interface(model) -> tuple[list[tuple], list[tuple]]:
    """The graph's inputs (initializers excluded) and outputs: (name, elem_type, shape)."""
    constants = {t.name for t in model.graph.initializer}
    constants |= {s.values.name for s in model.graph.sparse_initializer}
    inputs = [_value_signature(v) for v in model.graph.input if v.name not in constants]
    outputs = [_value_signature(v) for v in model.graph.output]
    return inputs, outputs


def _check_interface_kept(original, fused) -> None:
    before, after = graph_interface(original), graph_interface(fused)
    for kind, old, new in (("inputs", before[0], after[0]), ("outputs", before[1], after[1])):
        if old != new:
            raise CliError(
                f"internal error: fusing changed the graph {kind} from "
                f"[{'; '.join(map(_format_signature, old))}] to "
                f"[{'; '.join(map(_format_signature, new))}]; nothing written. Please report "
                f"this with the model", EXIT_FAILED)


def _verification_shapes(model, requested: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Check every graph input has a concrete shape for --verify, from the model or from
    --input-shape; returns the shapes to pass to verify_onnx."""
    inputs, _ = graph_interface(model)
    names = [signature[0] for signature in inputs]
    for name in requested:
        if name not in names:
            raise CliError(f"--input-shape names {name!r}, which is not a graph input; the "
                           f"inputs are: {', '.join(names) or '(none)'}")
    for signature in inputs:
        if len(signature) == 2:
            continue  # not a tensor; verify_onnx decides
        name, _, shape = signature
        given = requested.get(name)
        if given is not None:
            if shape is not None and (len(shape) != len(given) or any(
                    isinstance(d, int) and d > 0 and d != g for d, g in zip(shape, given))):
                model_dims = ",".join("?" if not isinstance(d, int) or d <= 0 else str(d)
                                      for d in shape)
                raise CliError(f"--input-shape {name}:{','.join(map(str, given))} does not "
                               f"match the model's shape [{model_dims}] for input {name!r}")
            continue
        if shape is None:
            raise CliError(f"--verify: input {name!r} has no shape in the model; pass "
                           f"--input-shape {name}:d0,d1,...")
        symbolic = [(axis, d) for axis, d in enumerate(shape) if not isinstance(d, int) or d <= 0]
        if symbolic:
            axis, dim = symbolic[0]
            example = ",".join("N" if not isinstance(d, int) or d <= 0 else str(d) for d in shape)
            label = f"symbolic dimension {dim!r}" if dim else "an unknown dimension"
            raise CliError(f"--verify: input {name!r} has {label} (axis {axis}); pass "
                           f"--input-shape NAME:d0,d1,... e.g. --input-shape {name}:{example} "
                           f"with N filled in")
    return dict(requested)


# ---- output --------------------------------------------------------------------------

def _check_output_location(paths: _Paths, input_data_files: set[str]) -> tuple[str, str]:
    """The output's folder exists and is writable, and writing there touches no input file
    (unless --in-place); returns (folder, data file name)."""
    output = paths.output
    folder = check_output_folder(output, "model_fused.onnx")
    data_name = os.path.basename(output) + ".data"
    if not paths.in_place:
        for candidate in (output, os.path.join(folder, data_name)):
            if os.path.realpath(candidate) in input_data_files:
                raise CliError(f"writing {output} would overwrite the input's external data "
                               f"file {candidate}; choose another -o, or pass --in-place")
    return folder, data_name


def _tensor_bytes(model) -> int:
    from reparam_fx.onnx.io import is_stored, stored_bytes
    total = 0
    for tensor in _model_tensors(model):
        total += stored_bytes(tensor) if is_stored(tensor) else len(tensor.raw_data)
        total += 8 * (len(tensor.float_data) + len(tensor.int32_data) + len(tensor.int64_data)
                      + len(tensor.double_data) + len(tensor.uint64_data))
        total += sum(len(s) for s in tensor.string_data)
    return total


def make_staging(output: str) -> str:
    """A fresh temporary folder next to ``output`` (the caller removes it)."""
    try:
        return staging_folder(output)
    except OSError as error:
        raise CliError(f"cannot write {output}: {one_line(error)}; choose another -o") from None


def write_model_atomically(onnx, model, output: str, *, external_data: bool,
                           data_name: str, mode_from: str | None = None,
                           staging: str | None = None, store=None,
                           before_commit=None) -> list[str]:
    """Save ``model`` to ``output`` through a temporary folder next to it (``staging``, or
    a new one removed afterwards), then move the files into place with ``os.replace``: the
    external-data file first, the model last (the model's rename is the commit). If that
    fails, the data file is rolled back to what was there before. Returns the paths
    written. ``model`` may be changed (tensors move out of it into the data file). Its
    stubs' data are in ``store`` (default: files next to ``output``).
    ``before_commit(staged_model_path)`` runs once the files are staged (``--verify``);
    an error from it leaves nothing written."""
    from reparam_fx.onnx.io import WeightStore, save_streaming
    folder = os.path.dirname(os.path.abspath(output))
    name = os.path.basename(output)
    owned = staging is None
    staging = make_staging(output) if owned else staging
    has_data = False
    try:
        staged_model = os.path.join(staging, name)
        staged_data = os.path.join(staging, data_name)
        try:
            save_streaming(model, staged_model, store or WeightStore(folder),
                           external_data=external_data, data_name=data_name,
                           size_threshold=EXTERNAL_DATA_SIZE_THRESHOLD)
            if before_commit is not None:
                before_commit(staged_model)
            if mode_from is not None:
                shutil.copymode(mode_from, staged_model)
            has_data = os.path.exists(staged_data)
            if has_data:
                shutil.copymode(staged_model, staged_data)  # onnx creates it 0600
                fsync(staged_data)
            fsync(staged_model)
            if has_data:
                _replace_pair(staged_data, os.path.join(folder, data_name), staged_model, output)
            else:
                os.replace(staged_model, output)
        except (OSError, ValueError) as error:  # ValueError: onnx's 2 GB protobuf limit
            raise CliError(f"cannot write {output}: {one_line(error)}") from None
        fsync_folder(folder)
    finally:
        if owned:
            shutil.rmtree(staging, ignore_errors=True)
    if has_data:
        return [output, os.path.join(os.path.dirname(output), data_name)]
    return [output]


def _replace_pair(staged_data: str, data: str, staged_model: str, model: str) -> None:
    """Move the data file, then the model, into place; on failure put back the data file
    that was there before (kept next to the staged files meanwhile)."""
    previous = None
    if os.path.lexists(data):
        previous = staged_data + ".previous"
        os.replace(data, previous)
    try:
        os.replace(staged_data, data)
        os.replace(staged_model, model)
    except BaseException:
        if not os.path.lexists(staged_data) and os.path.lexists(data):
            os.remove(data)  # ours: it was moved in before the model failed
        if previous is not None:
            os.replace(previous, data)
        raise


# ---- main ----------------------------------------------------------------------------

def _imported(modules: tuple[str, ...], missing: str):
    """The first of ``modules`` imported (the others along), or a CliError naming what to
    install."""
    try:
        return [importlib.import_module(name) for name in modules][0]
    except ImportError as error:
        raise CliError(f"{missing} ({one_line(error)}); pip install 'reparam-fx[onnx]'") from None


def run(args) -> int:
    onnx = _imported(("onnx", "onnx.checker", "onnx.external_data_helper"),
                     "the ONNX tools are not installed")
    if not (args.rtol >= 0 and math.isfinite(args.rtol)):
        raise CliError(f"--rtol {args.rtol} must be a finite number >= 0", usage=True)
    requested_shapes = dict(parse_input_shape(text) for text in args.input_shape)
    paths = _resolve_paths(args)

    _check_input_file(paths.input)
    model = _read_model(onnx, paths.input)
    _check_opset(model, paths.input)
    data_files = _check_external_data(model, paths.input)
    _check_model(onnx, model, paths.input)
    _, data_name = _check_output_location(paths, data_files)
    shapes = _verification_shapes(model, requested_shapes) if args.verify else None
    frontend = _imported(("reparam_fx.onnx",), "the ONNX frontend cannot be imported")
    staging = make_staging(paths.output)
    try:
        return _fuse_and_write(onnx, frontend, args, paths, model, data_files, data_name,
                               shapes, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fuse_and_write(onnx, frontend, args, paths: _Paths, model, data_files: set[str],
                    data_name: str, shapes, staging: str) -> int:
    """Fuse, verify, write (fused weights go straight to ``staging``'s data file when
    the output has external data)."""
    from reparam_fx.onnx.io import WeightStore
    # external data out: fused weights go straight into the staged data file (written
    # once); else they stay in memory until the model is written (at most its size)
    external = bool(data_files) or _tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    store = WeightStore(os.path.dirname(os.path.abspath(paths.input)),
                        os.path.join(staging, data_name) if external else None)
    try:
        return _fuse_verify_write(onnx, frontend, args, paths, model, data_files, data_name,
                                  shapes, staging, store, external)
    finally:
        store.close()


def _fuse_verify_write(onnx, frontend, args, paths: _Paths, model, data_files: set[str],
                       data_name: str, shapes, staging: str, store, external: bool) -> int:
    unsupported = getattr(frontend, "OnnxFusionError", ())
    try:
        fused, report = frontend.fuse_onnx_model(model, store=store)
    except unsupported as error:  # the model is outside what the frontend handles
        raise CliError(f"cannot fuse {paths.input}: {one_line(error)}") from None
    except Exception as error:  # noqa: BLE001 - any failure is reported in one line
        if os.environ.get("REPARAM_FX_DEBUG"):
            raise
        raise CliError(f"fusing {paths.input} failed: {type(error).__name__}: "
                       f"{one_line(error)}", EXIT_FAILED) from None
    _check_interface_kept(model, fused)
    print(report.table() if args.report else report.summary(paths.input))

    def verify(staged: str) -> None:  # the staged output against the input, in ORT
        _verify(frontend, paths.input, staged, shapes, args.rtol)

    written = write_model_atomically(onnx, fused, paths.output, external_data=external,
                                     data_name=data_name,
                                     mode_from=paths.input if paths.in_place else None,
                                     staging=staging, store=store,
                                     before_commit=verify if args.verify else None)
    print(f"wrote {' and '.join(written)}")
    if paths.in_place:
        kept = sorted(f for f in data_files if f not in {os.path.realpath(w) for w in written})
        if kept:
            print(f"note: {', '.join(kept)} held the input's external data and is no longer "
                  f"used by {paths.output}")
    return EXIT_OK


def _verify(frontend, reference: str, candidate: str, shapes, rtol: float) -> None:
    """``--verify``: both files run in ONNX Runtime (which reads them, external data and
    all, itself) on the same random inputs; a CliError above ``rtol``."""
    from reparam_fx.core.verification import VerificationError
    quiet_onnxruntime()
    try:
        error = frontend.verify_onnx(reference, candidate, input_shapes=shapes or None,
                                     rtol=math.inf)
    except ValueError as failure:
        raise CliError(f"--verify: {one_line(failure)}; pass --input-shape "
                       f"NAME:d0,d1,...") from None
    except VerificationError as failure:
        raise CliError(f"verification failed: {one_line(failure)}; nothing written",
                       EXIT_FAILED) from None
    except Exception as failure:  # noqa: BLE001 - ONNX Runtime errors
        raise CliError(f"verification could not run: {type(failure).__name__}: "
                       f"{one_line(failure)}; nothing written", EXIT_FAILED) from None
    if not error <= rtol:  # also catches NaN
        raise CliError(f"verification failed: max relative error {error:.3g} is above "
                       f"--rtol {rtol:g}; nothing written", EXIT_FAILED)
    print(f"verify: max relative error {error:.3g} (rtol {rtol:g}) ok")


def main(argv=None) -> int:
    """Entry point of ``reparam-fx-onnx`` and ``tools/fuse_onnx.py``; returns the exit status."""
    return run_command(PROG, build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
