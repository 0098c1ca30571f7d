"""The safetensors format, read and written with NumPy alone.

A file is three parts (https://github.com/huggingface/safetensors, "Format"):

    8 bytes        N, the header's length, an unsigned little-endian 64-bit integer
    N bytes        a JSON object: {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...}
                   and optionally "__metadata__": {str: str}; offsets count from the data's start
    the rest       the tensors' bytes, row-major, little-endian

Reading memory-maps the file: `read_safetensors` returns read-only views into the map, so nothing
is copied until a caller converts a tensor (gptapp.hf copies each tensor once, straight from the
map into its final dtype and layout). bfloat16 has no NumPy dtype: `widen` shifts its 16 bits
into the high half of a float32, which is exact.
"""
from __future__ import annotations

import json
import math
import os
import struct

import numpy as np

# The format's dtype names and NumPy's little-endian dtypes. BF16 is read as its raw 16 bits.
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
NAMES = {np.dtype(v).str: k for k, v in DTYPES.items() if k not in ("BF16",)}  # for writing
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit on N


class SafetensorsError(ValueError):
    """A file that is not valid safetensors; the message is one line naming the file and the fault."""


class Tensor:
    """One tensor of a file: its format dtype name ("F32", "BF16", ...) and a read-only view
    (raw uint16 bits for BF16) into the file's memory map."""

    __slots__ = ("dtype", "array")

    def __init__(self, dtype: str, array: np.ndarray):
        self.dtype, self.array = dtype, array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape


def read_header(path) -> tuple[dict, dict, int]:
    """(tensor entries {name: {"dtype", "shape", "data_offsets"}}, metadata, data start) of a file,
    every entry checked against the format and the file's size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: truncated header: the file has {size} bytes, fewer than the "
                                   "8 of the header length; the file is incomplete, download or export it again")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_HEADER:
            raise SafetensorsError(f"{path}: header length {n} reaches beyond the file's {size} bytes; the file is "
                                   "truncated or not safetensors, download or export it again")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SafetensorsError(f"{path}: the header is not valid JSON ({' '.join(str(err).split())}); "
                               "the file is damaged, download or export it again") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is a JSON {type(header).__name__}, not an object; "
                               "the file is damaged, download or export it again")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SafetensorsError(f"{path}: __metadata__ is not a JSON object; the file is damaged")
    data_size = size - 8 - n
    spans = []
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsError(f"{where} needs exactly dtype, shape and data_offsets, got "
                                   f"{sorted(entry) if isinstance(entry, dict) else entry!r}; the file is damaged")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise SafetensorsError(f"{where} has dtype {dtype!r}, which this reader does not know; "
                                   f"known: {', '.join(DTYPES)}")
        if (not isinstance(shape, list) or
                not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise SafetensorsError(f"{where} has shape {shape!r}, not a list of sizes >= 0; the file is damaged")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise SafetensorsError(f"{where} has data_offsets {offsets!r}, not [begin, end]; the file is damaged")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise SafetensorsError(f"{where} has data_offsets [{begin}, {end}] outside the file's {data_size} "
                                   "bytes of data; the file is truncated or damaged, download or export it again")
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise SafetensorsError(f"{where}: shape {shape} of {dtype} needs {expected} bytes, data_offsets "
                                   f"[{begin}, {end}] hold {end - begin}; the file is damaged")
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise SafetensorsError(f"{path}: tensors {n0!r} [{b0}, {e0}] and {n1!r} [{b1}, {e1}] overlap; "
                                   "the file is damaged, download or export it again")
    return header, metadata, 8 + n


def read_safetensors(path) -> tuple[dict[str, Tensor], dict]:
    """({name: Tensor}, metadata) of a file, in the header's order. Each Tensor's array is a
    read-only view into one memory map of the file: no tensor is copied."""
    header, metadata, start = read_header(path)
    data_size = os.path.getsize(path) - start
    if data_size:
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(data_size,))
    else:  # mmap cannot map zero bytes
        data = np.zeros(0, dtype=np.uint8)
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = DTYPES[entry["dtype"]]
        array = data[begin:end].view(dtype).reshape(entry["shape"])  # a view: no copy
        tensors[name] = Tensor(entry["dtype"], array)
    return tensors, metadata


def widen(tensor: Tensor, dtype, transpose: bool = False) -> np.ndarray:
    """A floating-point tensor as a fresh C-contiguous array of `dtype` (float32 or float64),
    transposed if asked: one copy out of the map for F64, F32 and F16 (the conversion, if any, is
    that copy); BF16 takes one uint32 copy whose bits are shifted in place into float32 (exact),
    plus the widening to float64 if asked."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise SafetensorsError(f"tensor of dtype {tensor.dtype} is not floating point")
    src = tensor.array.T if transpose else tensor.array
    dtype = np.dtype(dtype)
    if tensor.dtype != "BF16":
        return np.array(src, dtype=dtype, order="C")  # the one copy (converting as it goes)
    bits = np.array(src, dtype=np.uint32, order="C")  # (..) bfloat16 bits, one copy
    bits <<= 16  # bfloat16 is the high half of a float32
    as_f32 = bits.view(np.float32)
    return as_f32 if dtype == np.float32 else as_f32.astype(dtype)


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write {name: ndarray} (in dict order) and string metadata as a safetensors file. Arrays are
    written C-contiguous and little-endian; the header is padded with spaces to a multiple of 8
    bytes so every tensor's data starts 8-byte aligned when the tensors' sizes allow it."""
    header = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise SafetensorsError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    arrays, offset = [], 0
    for name, value in tensors.items():
        a = np.asarray(value)
        key = a.dtype.newbyteorder("<").str if a.dtype.byteorder not in ("|",) else a.dtype.str
        if key not in NAMES:
            raise SafetensorsError(f"tensor {name!r} has dtype {a.dtype}, which safetensors cannot hold")
        a = np.ascontiguousarray(a, dtype=np.dtype(key))
        header[name] = {"dtype": NAMES[key], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(memoryview(a.reshape(-1)).cast("B"))
