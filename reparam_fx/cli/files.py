"""Files for the commands and for :mod:`reparam_fx.export`: checks before any work, and
writes that never leave half a file.

Checks (raising :class:`~reparam_fx.cli.errors.CliError` with what to do): the input is an
existing, readable, non-empty regular file (:func:`check_input_file`); the output is not
the input unless asked (:func:`output_path`); its folder exists and takes a new file
(:func:`check_output_folder`, a real probe: ``os.access`` says yes to root on a read-only
file system). :func:`describe_foreign` names what a file that is not a model looks like.

Writes are *staged* (:func:`staged`): made in a fresh temporary folder next to the
destination (the same file system, so the last step is an atomic rename), fsynced, moved
into place with ``os.replace`` and the folder fsynced; the temporary folder is removed
whatever happens. A destination that is a folder (an ``.mlpackage``) is replaced only once
the new one is complete, and put back if the rename fails. A reader never sees half a
file, and a failure leaves what was there before.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from reparam_fx.cli.errors import CliError

_FOREIGN_FORMATS = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"PK\x03\x04", "a zip archive (a PyTorch checkpoint? export it with torch.onnx.export first)"),
    (b"\x80\x02", "a Python pickle (a PyTorch checkpoint? export it with torch.onnx.export first)"),
    (b"\x7fELF", "an executable"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive (decompress it first)"),
)


# ---- checks ---------------------------------------------------------------------------

def same_path(a: str, b: str) -> bool:
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def output_path(input_path: str, output: str | None, in_place: bool, example: str,
                overwrite_hint: str = "pass --in-place") -> str:
    """The output file (``-o``, or the input with ``--in-place``), checked against the
    input before anything is read; ``example`` names a typical output (``OUT.onnx``)."""
    if output is None and not in_place:
        raise CliError(f"give the output with -o {example}, or pass --in-place to replace "
                       f"the input", usage=True)
    if output is not None and output == "":
        raise CliError("-o needs a file name", usage=True)
    target = output if output is not None else input_path
    if in_place and output is not None and not same_path(output, input_path):
        raise CliError(f"-o {output} and --in-place disagree; pass one of them")
    if not in_place and same_path(target, input_path):
        raise CliError(f"-o {target} is the input file; refusing to overwrite the input; "
                       f"{overwrite_hint}")
    return target


def check_input_file(path: str, what: str, directory_hint: str, empty_hint: str) -> int:
    """The input is an existing, readable, non-empty regular file; returns its size.
    ``what``: the file the user should name (``an .onnx file``)."""
    if not os.path.lexists(path):
        raise CliError(f"{path}: no such file; check the path to {what}")
    if os.path.isdir(path):
        raise CliError(f"{path} is a directory; {directory_hint}")
    if not os.path.isfile(path):
        raise CliError(f"{path} is not a regular file (a broken link or a device); "
                       f"give the path of {what}")
    if not os.access(path, os.R_OK):
        raise CliError(f"{path}: permission denied; make the file readable")
    size = os.path.getsize(path)
    if size == 0:
        raise CliError(f"{path} is empty (0 bytes); {empty_hint}")
    return size


def describe_foreign(path: str) -> str | None:
    """What the file looks like if it is plainly something else (an image, a zip archive,
    a pickle, a text file ...), from its first bytes; None if nothing is recognised."""
    with open(path, "rb") as f:
        head = f.read(512)
    for magic, what in _FOREIGN_FORMATS:
        if head.startswith(magic):
            return what
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:
            return None
        text = head[:error.start].decode("utf-8")  # a character cut at the 512-byte mark
    if text.strip() and all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        if text.lstrip().startswith("<"):
            return "a text file (HTML/XML? a download that saved an error page?)"
        return "a text file"
    return None


def check_output_folder(output: str, example: str, folder_output_ok: bool = False) -> str:
    """``output`` names a file (or, ``folder_output_ok``, an existing package folder) in an
    existing folder that takes new files; returns that folder."""
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.basename(output) or output.endswith(("/", os.sep)):
        raise CliError(f"-o {output} names a folder; give a file name such as "
                       f"{os.path.join(output, example)}")
    if os.path.isdir(output) and not folder_output_ok:
        raise CliError(f"-o {output} is a directory; give a file name such as "
                       f"{os.path.join(output, example)}")
    if not os.path.isdir(folder):
        what = "is not a directory" if os.path.exists(folder) else "does not exist"
        raise CliError(f"cannot write {output}: the output folder {folder} {what}; create it "
                       f"or choose another -o")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{os.path.basename(output)}.", suffix=".probe",
                                     dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError:
        raise CliError(f"cannot write {output}: the output folder {folder} is not writable; "
                       f"choose another -o") from None
    return folder


# ---- staged writes ----------------------------------------------------------------------

def fsync(path: str) -> None:
    """Flush a file, or every file of a folder, to disk."""
    if os.path.isdir(path):
        for root, _, files in os.walk(path):
            for name in files:
                fsync(os.path.join(root, name))
        return
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_folder(folder: str) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the platform can."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def staging_folder(output: str) -> str:
    """A fresh temporary folder next to ``output`` (the caller removes it); OSError if
    none can be made there."""
    folder = os.path.dirname(os.path.abspath(output))
    return tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.", suffix=".tmp", dir=folder)


@contextlib.contextmanager
def staged(output, mode_from: str | None = None):
    """Yield a path (under ``output``'s own name, in a staging folder next to it) to
    write; on a normal exit it is fsynced and moved over ``output`` (see the module
    docstring). ``mode_from``: a file whose permission bits the output takes. Raises
    OSError if the staging or the move fails; nothing is left behind then."""
    output = str(output)
    staging = staging_folder(output)
    try:
        path = os.path.join(staging, os.path.basename(output))
        yield path
        if mode_from is not None:
            shutil.copymode(mode_from, path)
        fsync(path)
        replace(path, output, os.path.join(staging, ".previous"))
        fsync_folder(os.path.dirname(os.path.abspath(output)))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace(staged_path: str, output: str, previous: str) -> None:
    """``os.replace``; a folder at ``output`` is first moved to ``previous`` (next to the
    staged files) and put back if the rename fails."""
    if not os.path.isdir(output) or os.path.islink(output):
        os.replace(staged_path, output)
        return
    os.replace(output, previous)
    try:
        os.replace(staged_path, output)
    except BaseException:
        os.replace(previous, output)
        raise


def write_bytes(path, data: bytes) -> None:
    """``data`` written to ``path`` through :func:`staged`; OSError on failure."""
    with staged(path) as target:
        Path(target).write_bytes(data)
