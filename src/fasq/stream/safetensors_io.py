"""Just enough safetensors to stream: parse and check a header, read one tensor, and write tensors in any
order into a file whose layout (header and every offset) is fixed before the first tensor is computed.

Why not ``safetensors.safe_open``: it maps the whole file, and every page a read touches stays in the
process's RSS until the handle is closed (measured: reading each tensor of a 512 MiB shard through one
handle raised RSS by 512 MiB).  ``pread`` into a buffer of the tensor's size makes the memory exactly the
tensors in flight.  The library also writes only whole files, while a resumable run must fill a
preallocated file tensor by tensor, in the order the workers finish.  The format is the one in
https://github.com/huggingface/safetensors: an 8-byte little-endian header length, a JSON header
(padded with spaces to a multiple of 8), then the tensors' bytes with no holes.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

# safetensors dtype names -> torch dtypes (those this torch knows)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {name: (1 if dt == torch.bool else dt.itemsize) for name, dt in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000   # the limit the safetensors library enforces
COPY_CHUNK_BYTES = 64 << 20      # unquantized tensors are copied in pieces of this size

if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian; so are our targets
    raise ImportError("fasq.stream reads safetensors on little-endian machines only")


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt, or holds something fasq cannot stream."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: ``file`` (a name inside the checkpoint directory), dtype name, shape, and
    the absolute byte range ``[begin, end)`` of its data in that file."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict]:
    """(entries by tensor name, ``__metadata__``) of a safetensors file, after checking that the header
    is well formed and that the file holds exactly the bytes it describes (so a truncated download is
    caught here, before any work)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: shard is missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short to be a safetensors file (truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header length {n} is not plausible; not a safetensors file")
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated: the header needs {8 + n} bytes, the file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    start = 8 + n
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        try:
            dtype, shape, (b, e) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}: {info!r}") from None
        if dtype not in ITEMSIZE:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype!r}, which this fasq cannot read "
                                  f"(known: {sorted(ITEMSIZE)})")
        ent = TensorEntry(name, path.name, dtype, shape, start + int(b), start + int(e))
        if any(s < 0 for s in shape) or ent.nbytes != ent.numel * ITEMSIZE[dtype] or b < 0:
            raise CheckpointError(f"{path}: tensor {name!r}: offsets {[b, e]} do not fit {dtype} {list(shape)}")
        entries[name] = ent
    end = start
    for ent in sorted(entries.values(), key=lambda t: (t.begin, t.end)):
        if ent.begin != end:
            raise CheckpointError(f"{path}: tensor {ent.name!r} starts at byte {ent.begin}, expected {end} "
                                  "(overlapping or gapped data: corrupt file)")
        end = ent.end
    if end > size:
        raise CheckpointError(f"{path}: truncated: the header describes {end} bytes, the file has {size}")
    if end < size:
        raise CheckpointError(f"{path}: {size - end} bytes after the last tensor (corrupt file)")
    return entries, meta


def _pread_into(fd: int, view: memoryview, offset: int, path) -> None:
    done = 0
    while done < len(view):
        k = os.preadv(fd, [view[done:]], offset + done)
        if k == 0:
            raise CheckpointError(f"{path}: file ended at byte {offset + done} while reading (changed since it "
                                  "was checked?)")
        done += k


def read_tensor(root: Path, entry: TensorEntry) -> torch.Tensor:
    """The tensor's data, read into its own buffer (no mapping of the file)."""
    path = Path(root) / entry.file
    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        _pread_into(fd, memoryview(buf.numpy()), entry.begin, path)
    finally:
        os.close(fd)
    return buf.view(DTYPES[entry.dtype]).reshape(entry.shape)


def iter_chunks(root: Path, entry: TensorEntry, chunk_bytes: int = COPY_CHUNK_BYTES) -> Iterator[torch.Tensor]:
    """The tensor's data as flat pieces of at most ``chunk_bytes`` (whole elements), in order."""
    path = Path(root) / entry.file
    item = ITEMSIZE[entry.dtype]
    step = max(item, chunk_bytes // item * item)
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in range(entry.begin, entry.end, step):
            n = min(step, entry.end - off)
            buf = torch.empty(n, dtype=torch.uint8)
            _pread_into(fd, memoryview(buf.numpy()), off, path)
            yield buf.view(DTYPES[entry.dtype])
    finally:
        os.close(fd)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


# ----------------------------------------------------------------------------------------------
@dataclass
class FileLayout:
    """A safetensors file planned before its data exists: the header bytes and each tensor's range."""

    file: str
    header: bytes
    entries: dict[str, TensorEntry]
    size: int


def plan_file(file: str, tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> FileLayout:
    """Lay out ``(name, dtype name, shape)`` tensors in one file.  Wider dtypes come first (stable within a
    width) so every tensor starts aligned to its element size, as ``safetensors.save_file`` does."""
    order = sorted(tensors, key=lambda t: -ITEMSIZE[t[1]])
    header: dict = {"__metadata__": dict(metadata)}
    offsets = []
    pos = 0
    for name, dtype, shape in order:
        n = ITEMSIZE[dtype]
        for s in shape:
            n *= s
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets.append((name, dtype, tuple(shape), pos, pos + n))
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    entries = {name: TensorEntry(name, file, dtype, shape, start + b, start + e)
               for name, dtype, shape, b, e in offsets}
    return FileLayout(file, struct.pack("<Q", len(raw)) + raw, entries, start + pos)


class FileWriter:
    """Fill a planned file: create (space reserved up front) or reopen it, then write tensors at their
    ranges from any thread.  ``os.pwrite`` at fixed offsets needs no lock."""

    def __init__(self, path: Path, layout: FileLayout, *, fresh: bool):
        self.path = Path(path)
        self.layout = layout
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | (os.O_TRUNC if fresh else 0), 0o666)
        try:
            if os.fstat(self.fd).st_size != layout.size:
                os.ftruncate(self.fd, 0)
                # Reserve the whole file now: a disk too small fails here, before hours of work.
                if hasattr(os, "posix_fallocate") and layout.size:
                    os.posix_fallocate(self.fd, 0, layout.size)
                else:
                    os.ftruncate(self.fd, layout.size)
            self._pwrite(memoryview(layout.header), 0)  # idempotent: rewritten on every resume
        except BaseException:
            os.close(self.fd)
            raise

    def _pwrite(self, data: memoryview, offset: int) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)

    def write(self, name: str, t: torch.Tensor) -> str:
        """Write tensor ``name`` (dtype and shape must match the plan); returns the sha256 of its bytes."""
        ent = self.layout.entries[name]
        if DTYPE_NAMES.get(t.dtype) != ent.dtype or tuple(t.shape) != ent.shape:
            raise RuntimeError(f"internal: {name} is {t.dtype} {tuple(t.shape)}, planned {ent.dtype} {ent.shape}")
        data = tensor_bytes(t)
        self._pwrite(data, ent.begin)
        return hashlib.sha256(data).hexdigest()

    def write_at(self, data: memoryview, offset: int) -> None:
        self._pwrite(data, offset)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def hash_ranges(path: Path, ranges: list[tuple[int, int]], chunk: int = 1 << 22) -> list[str]:
    """sha256 of each byte range of a file."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for b, e in ranges:
            h = hashlib.sha256()
            for off in range(b, e, chunk):
                data = os.pread(fd, min(chunk, e - off), off)
                if not data:
                    break
                h.update(data)
            out.append(h.hexdigest())
    finally:
        os.close(fd)
    return out


def hash_file_and_ranges(path: Path, ranges: list[tuple[int, int]], chunk: int = 1 << 22) -> tuple[str, list[str]]:
    """sha256 of the whole file and of each byte range, in one sequential pass (ranges must not overlap)."""
    whole = hashlib.sha256()
    order = sorted(range(len(ranges)), key=lambda i: ranges[i])
    hashes = [hashlib.sha256() for _ in ranges]
    k = 0
    pos = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk)
            if not data:
                break
            whole.update(data)
            end = pos + len(data)
            j = k  # feed every range that overlaps [pos, end); ranges before k are complete
            while j < len(order) and ranges[order[j]][0] < end:
                b, e = ranges[order[j]]
                lo, hi = max(b, pos), min(e, end)
                if lo < hi:
                    hashes[order[j]].update(memoryview(data)[lo - pos: hi - pos])
                j += 1
            while k < len(order) and ranges[order[k]][1] <= end:
                k += 1
            pos = end
    return whole.hexdigest(), [h.hexdigest() for h in hashes]
