"""Our own safetensors reader and writer: numpy only, memory-mapped, no pickle, no torch.

The format (https://huggingface.co/docs/safetensors):

    [8 bytes]  n, the header length, unsigned 64-bit little-endian
    [n bytes]  a JSON object {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...}
               and optionally "__metadata__": {str: str}; may end in spaces (padding)
    [rest]     the data section; each tensor's bytes lie at [begin, end) of it, little-endian, C order

Like the reference implementation, the reader insists the tensors tile the data section exactly:
no overlaps, no holes, nothing after the last tensor, so a truncated or spliced file cannot pass.
"""
import json
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import MinisftError

# The dtypes GPT-2 checkpoints come in. BF16 has no numpy type: it is read as raw uint16 bits.
DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit; a larger length means garbage


def _fail(path, what: str):
    raise MinisftError(f"{path}: not a valid safetensors file: {what}")


def read_header(path) -> tuple[dict, int, dict]:
    """Parse and validate the header -> ({name: (dtype, shape, begin, end)}, data start, metadata).

    Tensors are listed in data order. Every problem names the file and, where there is one, the tensor.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            _fail(path, f"{size} bytes is too short to hold the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n < 2 or n > MAX_HEADER_BYTES:
            _fail(path, f"header length {n} is not plausible (the file may be corrupt or not safetensors)")
        if 8 + n > size:
            _fail(path, f"header length {n} runs past the end of the file ({size} bytes): truncated?")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        _fail(path, f"header is not valid UTF-8 JSON ({e})")
    except RecursionError:  # a header is two levels deep; thousands of nested brackets are an attack
        _fail(path, "header nests JSON deeper than Python can parse (a crafted file?)")
    if not isinstance(header, dict):
        _fail(path, "header is not a JSON object")

    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        _fail(path, "__metadata__ must map strings to strings")

    data_size = size - 8 - n
    tensors = {}
    for name, info in header.items():
        where = f"tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            _fail(path, f"{where}: entry must have exactly dtype, shape and data_offsets, got {info!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            _fail(path, f"{where}: dtype {dtype!r} is not supported (only {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            _fail(path, f"{where}: shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
            _fail(path, f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
        begin, end = offsets
        if end > data_size:
            _fail(path, f"{where}: data_offsets [{begin}, {end}] run past the end of the data section "
                        f"({data_size} bytes): the file is truncated")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != nbytes:
            _fail(path, f"{where}: shape {shape} in {dtype} needs {nbytes} bytes but data_offsets "
                        f"[{begin}, {end}] hold {end - begin}")
        tensors[name] = (dtype, tuple(shape), begin, end)

    # The tensors, in data order, must tile [0, data_size) exactly.
    tensors = dict(sorted(tensors.items(), key=lambda kv: (kv[1][2], kv[1][3])))
    pos, prev = 0, None
    for name, (_, _, begin, end) in tensors.items():
        if begin < pos:
            _fail(path, f"tensor {name!r} at [{begin}, {end}] overlaps tensor {prev!r} (which ends at {pos})")
        if begin > pos:
            _fail(path, f"tensor {name!r} starts at {begin}, leaving a gap of {begin - pos} unclaimed bytes "
                        f"after {prev!r}")
        pos, prev = end, name
    if pos != data_size:
        _fail(path, f"the tensors end at byte {pos} of the data section but it holds {data_size} bytes")
    return tensors, 8 + n, metadata


def load(path) -> tuple[dict, dict]:
    """-> ({name: array}, metadata). F32 and F16 tensors are read-only views of a memory map (nothing
    is read until used); BF16 tensors are widened to float32 copies, which is exact."""
    tensors, read, metadata = open_lazily(path)
    return {name: read(name) for name in tensors}, metadata


def open_lazily(path) -> tuple[dict, Callable[[str], np.ndarray], dict]:
    """-> (read_header's {name: (dtype, shape, begin, end)}, read(name) -> array, metadata): load()
    one tensor at a time, so a BF16 file is widened tensor by tensor, never all at once."""
    tensors, start, metadata = read_header(path)
    data_size = Path(path).stat().st_size - start
    # One map of the whole data section; np.memmap cannot map zero bytes.
    buf = np.memmap(path, dtype=np.uint8, mode="r", offset=start) if data_size else np.empty(0, np.uint8)

    def read(name: str) -> np.ndarray:
        dtype, shape, begin, end = tensors[name]
        a = buf[begin:end].view(DTYPES[dtype]).reshape(shape)
        if dtype == "BF16":  # bf16 is the top half of a float32: shift the 16 bits into place
            a = (a.astype(np.uint32) << 16).view(np.float32)
        return a
    return tensors, read, metadata


def save(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write {name: float array} as F32 safetensors, atomically: a temp file beside `path`, renamed
    over it only once every byte is on disk."""
    arrays = {name: np.asarray(a, dtype="<f4", order="C") for name, a in tensors.items()}
    save_streamed(path, {name: a.shape for name, a in arrays.items()}, arrays.__getitem__, metadata)


def save_streamed(path, shapes: dict, array_of, metadata: dict | None = None) -> None:
    """save() for arrays made one at a time: {name: shape} gives the header, array_of(name) each
    array as it is written, so at most one is on the host at once (a model on another device, or in
    another dtype, is never copied whole)."""
    path = Path(path)
    header, pos = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, shape in shapes.items():
        nbytes = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so the data section starts 8-byte aligned
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name, shape in shapes.items():
                a = np.asarray(array_of(name), dtype="<f4", order="C")
                if a.shape != tuple(shape):
                    raise ValueError(f"safetensors: {name} has shape {a.shape}, the header says {tuple(shape)}")
                f.write(a.data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
