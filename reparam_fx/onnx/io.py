"""ONNX files read and written tensor by tensor: weights stay on disk until a region needs them.

An ONNX model is one protobuf message. ``onnx.load`` reads the whole file and parses it
(the file's bytes and the parsed tensors: twice its size in memory), and ``onnx.save``
serializes all of it again. Fusing changes some tensors and only copies the others, so the
command line works on a *weightless* model instead:

Reading (:func:`load_weightless`)
    The file is scanned at the protobuf wire level through ``mmap``; only the bytes of the
    message structure are read. Every initializer whose ``raw_data`` holds at least
    ``STUB_BYTES`` becomes a *stub*: the same TensorProto without its data, pointing at
    where the data lie the way ONNX external data does (``location``: the model file
    itself, ``offset``, ``length``). Tensors that already have external data are stubs as
    they are. The weightless model holds kilobytes.

Values (:class:`WeightStore`, :class:`StoredValues`)
    A stub's values are read from disk when a rewrite asks for them, and not kept.
    Fused weights go the other way: stubs too, their bytes appended to the output's
    (staged) external-data file as soon as they are computed, so they are written once;
    or, for an output without external data, held in memory until written (at most the
    model's size), and for :func:`reparam_fx.onnx.fuse_onnx_model`'s in-memory result
    moved into it one at a time.

Writing (:func:`save_streaming`)
    With external data, each tensor's bytes are copied into the data file one at a time
    (in chunks, from wherever they are) and the small model is saved. Without, the model
    is written as its small parts followed by its initializers one at a time: protobuf's
    wire format allows that, since a message is a sequence of fields in any order
    (``tag = field number << 3 | wire type``, then for wire type 2 a varint length and
    that many bytes), and repeated fields are concatenated by the reader.

Memory is then the weightless model, one region's weights, one copy buffer and (without
external data) the fused weights.
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx_graphsurgeon.ir.tensor import LazyValues

STUB_BYTES = 1024  # smaller tensors stay in the model (shape inference reads such constants)
COPY_CHUNK = 1 << 24

# field numbers of onnx.proto3 used here
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 9, 13, 14
_LENGTH_DELIMITED = 2


# ---- wire format --------------------------------------------------------------------

def _read_varint(buffer, position: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= end or shift > 63:
            raise DecodeError("truncated or malformed varint")
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _fields(buffer, start: int, end: int):
    """``(number, wire_type, field_start, value_start, value_end)`` for each field of the
    message in ``buffer[start:end]``; for wire type 2 the value is the payload."""
    position = start
    while position < end:
        field_start = position
        key, position = _read_varint(buffer, position, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise DecodeError("field number 0")
        if wire_type == 0:
            _, value_end = _read_varint(buffer, position, end)
        elif wire_type == 1:
            value_end = position + 8
        elif wire_type == 2:
            length, position = _read_varint(buffer, position, end)
            value_end = position + length
        elif wire_type == 5:
            value_end = position + 4
        else:
            raise DecodeError(f"wire type {wire_type} (groups or a corrupt file)")
        if value_end > end:
            raise DecodeError("a field runs past the end of its message (truncated file?)")
        yield number, wire_type, field_start, position, value_end
        position = value_end


def _external_entries(location: str, offset: int, length: int) -> bytes:
    entries = bytearray()
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = _tag(1, 2) + _varint(len(key)) + key.encode() + \
            _tag(2, 2) + _varint(len(value.encode())) + value.encode()
        entries += _tag(_TENSOR_EXTERNAL_DATA, 2) + _varint(len(entry)) + entry
    return bytes(entries)


def _stub_tensor(buffer, start: int, end: int, location: str) -> bytes:
    """The TensorProto in ``buffer[start:end]``, its ``raw_data`` replaced by a pointer to
    it (when large enough); other fields byte for byte."""
    kept, data = bytearray(), None
    for number, wire_type, field_start, value_start, value_end in _fields(buffer, start, end):
        if number == _TENSOR_RAW_DATA and wire_type == _LENGTH_DELIMITED and \
                value_end - value_start >= STUB_BYTES:
            data = (value_start, value_end - value_start)
        else:
            kept += buffer[field_start:value_end]
    if data is None:
        return bytes(kept)
    return bytes(kept) + _tag(_TENSOR_DATA_LOCATION, 0) + _varint(onnx.TensorProto.EXTERNAL) + \
        _external_entries(location, *data)


def _weightless_graph(buffer, start: int, end: int, location: str) -> bytes:
    out = bytearray()
    for number, wire_type, field_start, value_start, value_end in _fields(buffer, start, end):
        if number == _GRAPH_INITIALIZER and wire_type == _LENGTH_DELIMITED:
            tensor = _stub_tensor(buffer, value_start, value_end, location)
            out += _tag(number, 2) + _varint(len(tensor)) + tensor
        else:
            out += buffer[field_start:value_end]
    return bytes(out)


def load_weightless(path: str) -> onnx.ModelProto:
    """The model at ``path`` with each large initializer a stub pointing into the file
    (``location`` is the file's own name, relative to its folder as ONNX external data
    is). Raises ``DecodeError`` for a file that is not a protobuf message."""
    location = os.path.basename(path)
    with open(path, "rb") as file, \
            mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        out = bytearray()
        for number, wire_type, field_start, value_start, value_end in \
                _fields(buffer, 0, len(buffer)):
            if number == _MODEL_GRAPH and wire_type == _LENGTH_DELIMITED:
                graph = _weightless_graph(buffer, value_start, value_end, location)
                out += _tag(number, 2) + _varint(len(graph)) + graph
            else:
                out += buffer[field_start:value_end]
    model = onnx.ModelProto()
    model.ParseFromString(bytes(out))
    return model


# ---- stored values --------------------------------------------------------------------

def is_stored(tensor: onnx.TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL


def _entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


_PACKED = frozenset(getattr(onnx.TensorProto, name) for name in
                    ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
                    if hasattr(onnx.TensorProto, name))  # several elements per byte


def raw_itemsize(data_type: int) -> int | None:
    """Bytes per element of a type whose ``raw_data`` is its little-endian array (float16,
    bfloat16 and float8 too); None for strings and types packed below a byte."""
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))
    return None if data_type in _PACKED or dtype.kind in "OSU" else dtype.itemsize


def stored_bytes(tensor: onnx.TensorProto) -> int:
    """The byte size of a stub's data (its ``length``, else its element count)."""
    entries = _entries(tensor)
    if "length" in entries:
        return int(entries["length"])
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


class WeightStore:
    """Where the stubs' bytes are, and where fused weights go.

    A stub's ``location`` is a file in ``folder`` (the model's own file, or its external
    data), or :data:`FUSED` for a fused weight: appended to the file ``spill`` as it is
    computed, or, with ``spill=None``, kept in memory (one array per weight, no copy).
    """

    def __init__(self, folder: str, spill: str | None = None):
        self.folder, self.spill = folder, spill
        self._arrays: list[np.ndarray] = []
        self._file = open(spill, "wb") if spill else None  # noqa: SIM115 - see close()

    # fused weights
    def stub(self, name: str, values: np.ndarray) -> onnx.TensorProto:
        values = np.ascontiguousarray(values)
        if self._file is not None:
            offset = self._file.tell()
            self._file.write(values.data)  # no bytes copy
        else:
            offset = len(self._arrays)  # (an index, for arrays held in memory)
            self._arrays.append(values)
        tensor = onnx.TensorProto(name=name, dims=values.shape,
                                  data_type=onnx.helper.np_dtype_to_tensor_dtype(values.dtype))
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", FUSED), ("offset", str(offset)),
                           ("length", str(values.nbytes))):
            tensor.external_data.add(key=key, value=value)
        return tensor

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._arrays.clear()

    # reading
    def values(self, tensor: onnx.TensorProto) -> "StoredValues":
        return StoredValues(tensor, self)

    def path(self, tensor: onnx.TensorProto) -> str:
        location = _entries(tensor).get("location", "")
        if location == FUSED:
            return self.spill
        if os.path.isabs(location) or ".." in location.replace("\\", "/").split("/"):
            raise ValueError(f"tensor {tensor.name!r}: external data location {location!r} "
                             "is not a plain path inside the model's folder")
        return os.path.join(self.folder, location)

    def _in_memory(self, tensor) -> np.ndarray | None:
        """The fused weight held in memory for ``tensor``; else None (and a spill file
        about to be read is flushed first)."""
        entries = _entries(tensor)
        if entries.get("location") != FUSED:
            return None
        if self._file is None:
            return self._arrays[int(entries["offset"])]
        if not self._file.closed:
            self._file.flush()
        return None

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        """A stub's values: a new writable array (or the fused weight held in memory)."""
        held = self._in_memory(tensor)
        if held is not None:
            return held
        if raw_itemsize(tensor.data_type) is None:  # strings, packed 4-bit types
            return np.array(onnx.numpy_helper.to_array(tensor, self.folder))
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        buffer = bytearray(stored_bytes(tensor))
        with open(self.path(tensor), "rb") as file:
            file.seek(int(_entries(tensor).get("offset", 0)))
            if file.readinto(buffer) != len(buffer):
                raise OSError(f"{self.path(tensor)} ends before the tensor {tensor.name!r} "
                              "does")
        return np.frombuffer(buffer, dtype=dtype.newbyteorder("<")).reshape(tuple(tensor.dims))

    def copy(self, tensor: onnx.TensorProto, write) -> None:
        """Copy a stub's bytes through ``write``, in chunks."""
        held = self._in_memory(tensor)
        if held is not None:
            write(held.data)
            return
        path, remaining = self.path(tensor), stored_bytes(tensor)
        with open(path, "rb") as source:
            source.seek(int(_entries(tensor).get("offset", 0)))
            while remaining:
                chunk = source.read(min(COPY_CHUNK, remaining))
                if not chunk:
                    raise OSError(f"{path} ends before the tensor {tensor.name!r} does")
                write(chunk)
                remaining -= len(chunk)

    def inline(self, tensor: onnx.TensorProto, release: bool = False) -> None:
        """Read a stub's data into it (it is a stub no more); ``release``: and let go of
        a fused weight held in memory (no other stub may read it afterwards)."""
        chunks = []
        self.copy(tensor, lambda chunk: chunks.append(bytes(chunk)))
        if release and self._in_memory(tensor) is not None:
            self._arrays[int(_entries(tensor)["offset"])] = None
        del tensor.external_data[:]
        tensor.ClearField("data_location")
        tensor.raw_data = b"".join(chunks)

    def inline_fused(self, model: onnx.ModelProto) -> None:
        """Inline every fused weight held in memory, releasing each as it goes: the model
        then holds them once, and this store none."""
        for tensor in _all_tensors(model.graph):
            if is_stored(tensor) and _entries(tensor).get("location") == FUSED:
                self.inline(tensor, release=True)


FUSED = "(reparam_fx: fused)"  # the location of fused weights' stubs


class StoredValues(LazyValues):
    """onnx-graphsurgeon's lazy values for a stub: read from its store on each ``load``
    (never cached in the graph), written back as the stub itself."""

    def __init__(self, tensor: onnx.TensorProto, store: WeightStore):
        super().__init__(tensor)
        self.store = store

    def load(self):
        return self.store.read(self.tensor)


# ---- writing --------------------------------------------------------------------------

def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _all_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_tensors(subgraph)


def _point(tensor: onnx.TensorProto, location: str, offset: int, size: int) -> None:
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(size))):
        tensor.external_data.add(key=key, value=value)


def save_streaming(model: onnx.ModelProto, path: str, store: WeightStore, *,
                   external_data: bool, data_name: str, size_threshold: int) -> None:
    """Write ``model`` (its stubs' bytes in ``store``) to ``path``; with ``external_data``
    every tensor of at least ``size_threshold`` bytes goes to ``data_name`` next to it
    (the store's spill file, when it is that file: its fused weights are already in it).
    ``model`` is changed (its stubs end up pointing at ``data_name``, or inline)."""
    if external_data:
        data_path = os.path.join(os.path.dirname(path), data_name)
        spilled = store.spill is not None and os.path.abspath(store.spill) == \
            os.path.abspath(data_path)
        if spilled:
            store.close()
        with open(data_path, "ab" if spilled else "wb") as data:
            for tensor in _all_tensors(model.graph):
                if is_stored(tensor):
                    size = stored_bytes(tensor)
                    if spilled and _entries(tensor).get("location") == FUSED:
                        _point(tensor, data_name, int(_entries(tensor)["offset"]), size)
                        continue
                    if size < size_threshold:
                        store.inline(tensor)
                        continue
                    offset = data.tell()
                    store.copy(tensor, data.write)
                elif tensor.HasField("raw_data") and len(tensor.raw_data) >= size_threshold:
                    offset, size = data.tell(), len(tensor.raw_data)
                    data.write(tensor.raw_data)
                    tensor.ClearField("raw_data")
                else:
                    continue
                _point(tensor, data_name, offset, size)
        with open(path, "wb") as out:
            out.write(model.SerializeToString())
        return
    initializers = list(model.graph.initializer)
    for tensor in _all_tensors(model.graph):  # stubs in subgraphs: inline (small, rare)
        if is_stored(tensor) and not any(tensor is t for t in initializers):
            store.inline(tensor)
    if not any(is_stored(t) for t in initializers):
        with open(path, "wb") as out:
            out.write(model.SerializeToString())
        return
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    del graph.initializer[:]
    head = onnx.ModelProto()
    head.CopyFrom(model)
    head.ClearField("graph")
    parts = []  # (tensor, its serialization up to its data, data size)
    for tensor in initializers:
        if is_stored(tensor):
            bare = onnx.TensorProto()
            bare.CopyFrom(tensor)
            bare.ClearField("data_location")
            del bare.external_data[:]
            size = stored_bytes(tensor)
            parts.append((tensor, bare.SerializeToString() + _tag(_TENSOR_RAW_DATA, 2)
                          + _varint(size), size))
        else:
            parts.append((tensor, tensor.SerializeToString(), 0))
    graph_bytes = graph.SerializeToString()
    graph_size = len(graph_bytes) + sum(
        len(_tag(_GRAPH_INITIALIZER, 2)) + len(_varint(len(prefix) + size)) + len(prefix) + size
        for _, prefix, size in parts)
    with open(path, "wb") as out:
        out.write(head.SerializeToString())
        out.write(_tag(_MODEL_GRAPH, 2) + _varint(graph_size) + graph_bytes)
        for tensor, prefix, size in parts:
            out.write(_tag(_GRAPH_INITIALIZER, 2) + _varint(len(prefix) + size) + prefix)
            if size:
                store.copy(tensor, out.write)

