"""Lazy reading of Hugging Face checkpoints and streaming, atomic writing of merged ones.

Reading: a checkpoint folder holds `model.safetensors`, sharded safetensors with
`model.safetensors.index.json`, or `pytorch_model*.bin` (read with `weights_only=True`).
Tensors are read on demand, a group at a time. A safetensors tensor is a private
(copy-on-write) memory map of its own byte range (from the header), whose pages are read in
when it is opened (`madvise(MADV_POPULATE_READ)` through ctypes, which releases the GIL, so a
background thread reads the next layer while the main thread computes). The tensor's memory is
the page cache's: no copy and no freshly zeroed memory (a `readinto` a fresh tensor paid both:
250M float32 task arithmetic spent 4.8 s of system time against 2.3 s mapped). Each map lives
as long as its tensor, so a group's pages leave the process with the group (one long-lived map
of the whole file would keep every page it touched: 990 MB RSS for an 800 MB file).

Writing: all tensor names, shapes and the output dtype are known before the merge starts
(they are the base model's), so the shard layout and every safetensors header can be
planned up front. Each merged tensor is then written straight to its offset in its shard
file by a background thread (at most one tensor in flight, so the next tensor's arithmetic
overlaps this one's write and nothing more is buffered). Files go to a temporary folder
beside the output and are renamed into place only when the whole model is complete.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import mmap
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

# safetensors dtype strings <-> torch dtypes
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the folder, file and tensor."""


class OutputValueError(ValueError):
    """A merged tensor that is not finite in the output dtype (e.g. over 65504 in float16)."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'bfloat16', 'bf16', 'float32', ... or a torch.dtype -> torch.dtype (a ValueError names the choices)."""
    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
    key = str(name).replace("torch.", "")
    if key not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of float32, float16, bfloat16")
    return table[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the name config.json and the report use)."""
    return str(dtype).replace("torch.", "")


def _read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The header's tensor entries and the byte offset where the data section starts."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if n > size - 8:
                raise CheckpointError(f"{path}: corrupt safetensors header (claims {n} bytes, file has {size})")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    header.pop("__metadata__", None)
    end = 8 + n + max((v["data_offsets"][1] for v in header.values()), default=0)
    if end > size:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, tensors need {end})")
    return header, 8 + n


class Checkpoint:
    """A local Hugging Face model folder whose tensors are read lazily."""

    def __init__(self, folder: str | Path, label: str | None = None):
        self.folder = Path(folder)
        self.label = label or str(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.label}: model folder {self.folder} does not exist")
        self.file_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.byte_range: dict[str, tuple[int, int]] = {}  # safetensors: name -> (file offset, nbytes)
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = {}
        self.format = self._index()

    # -- discovery ---------------------------------------------------------------------------
    def _index(self) -> str:
        f = self.folder
        if (f / SAFE_INDEX).exists():
            files = sorted(set(self._read_index(f / SAFE_INDEX).values()))
            fmt = "safetensors"
        elif (f / "model.safetensors").exists():
            files, fmt = ["model.safetensors"], "safetensors"
        elif (f / BIN_INDEX).exists():
            files, fmt = sorted(set(self._read_index(f / BIN_INDEX).values())), "bin"
        elif (f / "pytorch_model.bin").exists():
            files, fmt = ["pytorch_model.bin"], "bin"
        else:
            raise CheckpointError(
                f"{self.label}: no model.safetensors, {SAFE_INDEX}, pytorch_model.bin or {BIN_INDEX} in {f}")
        for name in files:
            path = f / name
            if not path.exists():
                raise CheckpointError(f"{self.label}: shard {path} listed in the index is missing")
            if fmt == "safetensors":
                header, start = _read_safetensors_header(path)
                for key, meta in header.items():
                    self._add(key, path, tuple(meta["shape"]), _ST_DTYPES.get(meta["dtype"]), meta["dtype"])
                    lo, hi = meta["data_offsets"]
                    want = math.prod(meta["shape"]) * _itemsize(self.dtypes[key])
                    if hi - lo != want:
                        raise CheckpointError(f"{self.label}: tensor {key} in {path.name} has {hi - lo} bytes, "
                                              f"its shape and dtype need {want}")
                    self.byte_range[key] = (start + lo, hi - lo)
            else:
                for key, t in self._load_bin(path).items():
                    self._add(key, path, tuple(t.shape), t.dtype, str(t.dtype))
        return fmt

    def _add(self, key: str, path: Path, shape: tuple[int, ...], dtype: torch.dtype | None, raw: str) -> None:
        if dtype is None:
            raise CheckpointError(f"{self.label}: tensor {key} in {path.name} has unsupported dtype {raw}")
        if key in self.file_of:
            raise CheckpointError(f"{self.label}: tensor {key} appears in both {self.file_of[key].name} and {path.name}")
        self.file_of[key], self.shapes[key], self.dtypes[key] = path, shape, dtype

    def _read_index(self, path: Path) -> dict[str, str]:
        try:
            return json.loads(path.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{self.label}: unreadable index {path} ({e})") from e

    def _load_bin(self, path: Path) -> dict[str, torch.Tensor]:
        # Pickle checkpoints are only ever read with weights_only=True (no code execution);
        # mmap keeps them lazy like safetensors.
        if path not in self._bin_cache:
            try:
                self._bin_cache[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - torch raises many types for bad pickles
                raise CheckpointError(f"{self.label}: cannot read {path} with weights_only=True ({e})") from e
        return self._bin_cache[path]

    # -- access ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every tensor name, in the checkpoint's order."""
        return list(self.file_of)

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def nbytes(self) -> int:
        """Total size of the tensors in their stored dtypes."""
        return sum(math.prod(s) * _itemsize(self.dtypes[k]) for k, s in self.shapes.items())

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its file."""
        return self.get_many([name])[name]

    def get_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read several tensors, opening each file once for the group (see module docstring)."""
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self.file_of:
                raise CheckpointError(f"{self.label}: tensor {n} is missing")
            by_file.setdefault(self.file_of[n], []).append(n)
        for path, keys in by_file.items():
            if self.format == "bin":
                sd = self._load_bin(path)
                for k in keys:
                    out[k] = sd[k].clone()
                continue
            with self._open(path, keys[0]) as f:
                for k in keys:
                    out[k] = self._read(f, path, k, self.shapes[k], *self.byte_range[k])
        return out

    def _open(self, path: Path, name: str):
        try:
            return open(path, "rb", buffering=0)
        except OSError as e:
            raise CheckpointError(f"{self.label}: cannot read tensor {name} from {path} ({e})") from e

    def _read(self, f, path: Path, name: str, shape: tuple[int, ...], offset: int, nbytes: int) -> torch.Tensor:
        """`nbytes` bytes at `offset` of the open file `f` as a tensor of `shape` (the checkpoint's
        dtype): a private map of those bytes, read in by this call (see the module docstring). Writing
        to the tensor copies the written pages; the file never changes."""
        dtype = self.dtypes[name]
        if not nbytes:
            return torch.empty(shape, dtype=dtype)
        try:
            if os.fstat(f.fileno()).st_size < offset + nbytes:  # shrunk since opened: a map would fault (SIGBUS)
                raise CheckpointError(f"{self.label}: tensor {name} in {path} is truncated")
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            mapped = mmap.mmap(f.fileno(), offset + nbytes - start, access=mmap.ACCESS_COPY, offset=start)
        except OSError as e:
            raise CheckpointError(f"{self.label}: cannot read tensor {name} from {path} ({e})") from e
        # the tensor holds a reference to the map: it is unmapped when the tensor is freed
        t = torch.frombuffer(mapped, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset - start).view(shape)
        err = _populate(t.data_ptr(), nbytes)
        if err:
            raise CheckpointError(f"{self.label}: cannot read tensor {name} from {path} ({os.strerror(err)})")
        return t

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor, reading only those bytes (for huge embeddings)."""
        path = self.file_of[name]
        if self.format == "bin":
            return self._load_bin(path)[name][start:stop].clone()
        shape = self.shapes[name]
        start, stop = max(0, min(start, shape[0])), max(0, min(stop, shape[0]))
        stop = max(start, stop)
        offset, nbytes = self.byte_range[name]
        row = nbytes // shape[0] if shape[0] else 0
        with self._open(path, name) as f:
            return self._read(f, path, name, (stop - start, *shape[1:]), offset + start * row, (stop - start) * row)


MADV_POPULATE_READ = 22  # Linux 5.14+: fault a range's pages in now, reading them from disk (not in Python's mmap)
_libc: ctypes.CDLL | None = None


def _populate(address: int, nbytes: int) -> int:
    """Read the pages of a mapped range in now, in the calling thread without the GIL (ctypes releases it).
    Returns 0, or the errno of a failed read (EFAULT: the file ended early, EIO: a disk error). Kernels
    without MADV_POPULATE_READ (before 5.14, macOS) get a read-ahead hint instead, and the pages are
    read when first touched."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    start = address - address % mmap.PAGESIZE
    if _libc.madvise(start, address + nbytes - start, MADV_POPULATE_READ) == 0:
        return 0
    err = ctypes.get_errno()
    if err == errno.EINVAL:  # no such advice on this kernel
        _libc.madvise(start, address + nbytes - start, mmap.MADV_WILLNEED)
        return 0
    return err


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _not_finite_message(name: str, source: torch.Tensor, dtype: torch.dtype) -> str:
    src = source.detach().float()
    if not bool(torch.isfinite(src).all()):
        return f"merged tensor {name} has non-finite values (NaN/Inf); nothing was written"
    return (f"merged tensor {name} does not fit in the output dtype {dtype_name(dtype)}: its largest |value| is "
            f"{float(src.abs().max()):.6g}, {dtype_name(dtype)} holds at most {torch.finfo(dtype).max:.6g}; "
            f"nothing was written (choose `dtype: bfloat16` or `float32`)")


# -- writing ---------------------------------------------------------------------------------

def parse_size(size: str | int) -> int:
    """'5GB', '500MB', '2GiB' or an int of bytes -> bytes (Hugging Face's convention: GB = 1e9)."""
    bad = ValueError(f"shard size {size!r}: expected a positive number of bytes or a size such as 5GB, "
                     f"500MB, 2GiB (units B, KB, MB, GB, KiB, MiB, GiB)")
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise bad
        return size
    s = str(size).strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    mult = next((m for unit, m in units.items() if s.endswith(unit)), 1)
    number = next((s[: -len(unit)] for unit in units if s.endswith(unit)), s).strip()
    try:
        n = int(float(number) * mult)
    except (ValueError, OverflowError):
        raise bad from None
    if n < 1:
        raise bad
    return n


class ShardedWriter:
    """Writes a planned set of tensors into safetensors shards, each tensor straight to its offset.

    `plan` is the ordered list of (name, shape); every tensor is written in `dtype`.
    Call `write(name, tensor)` once per name in any order, then `finish()`.
    """

    def __init__(self, folder: Path, plan: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 max_shard_size: int, metadata: dict[str, str] | None = None, resume: bool = False):
        self.folder, self.dtype = Path(folder), dtype
        item = _itemsize(dtype)
        shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        size = 0
        for name, shape in plan:
            n = math.prod(shape) * item
            if shards[-1] and size + n > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append((name, shape))
            size += n
        total = len(shards)
        self.shapes = dict(plan)
        self.files: list[Path] = []
        self.where: dict[str, tuple[int, int, int]] = {}  # name -> (shard index, byte offset, nbytes)
        self.weight_map: dict[str, str] = {}
        self._handles = []
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
            offset = 0
            for name, shape in shard:
                n = math.prod(shape) * item
                header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
                offset += n
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
            start = 8 + len(blob)
            path = self.folder / fname
            head = struct.pack("<Q", len(blob)) + blob
            if resume and path.exists() and path.stat().st_size == start + offset:
                fh = open(path, "r+b")  # same plan, same layout: written tensors stay where they are
                if fh.read(len(head)) != head:
                    raise RuntimeError(f"{path}: the partial output was planned differently; cannot resume")
            else:
                fh = open(path, "wb")
                fh.write(head)
                fh.truncate(start + offset)
            self._handles.append(fh)
            self.files.append(path)
            for name, shape in shard:
                lo, hi = header[name]["data_offsets"]  # type: ignore[index]
                self.where[name] = (i, start + lo, hi - lo)
                self.weight_map[name] = fname
        self.total_size = sum(n for _, _, n in self.where.values())
        self.written: set[str] = set()
        # one background thread does the file writes (they release the GIL); at most one in flight
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slta-writer")
        self._pending: Future | None = None

    def write(self, name: str, tensor: torch.Tensor, row_offset: int = 0) -> None:
        """Write a tensor (or a block of its leading rows, starting at `row_offset`).

        Returns once the bytes are handed to the writer thread, which keeps a reference: the
        caller may drop `tensor` at once but must not modify it in place afterwards."""
        shard, offset, nbytes = self.where[name]
        shape = self.shapes[name]
        t = tensor.detach().to(device="cpu", dtype=self.dtype).contiguous()
        # Checked after the cast: a finite float32 value can become inf in float16.
        if t.is_floating_point() and not (bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())):
            raise OutputValueError(_not_finite_message(name, tensor, self.dtype))
        rows = shape[0] if shape else 1
        if tuple(t.shape) != tuple(shape) and (not shape or tuple(t.shape[1:]) != tuple(shape[1:])):
            raise RuntimeError(f"internal error: {name} has shape {tuple(t.shape)}, planned {shape}")
        position = offset + row_offset * (nbytes // max(rows, 1))
        self._wait()
        self._pending = self._pool.submit(self._write_at, self._handles[shard], position, t)
        if row_offset + (t.shape[0] if t.dim() else 1) >= rows:
            self.written.add(name)

    @staticmethod
    def _write_at(fh, position: int, t: torch.Tensor) -> None:
        fh.seek(position)
        fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B"))  # raw bytes: works for bf16 too

    def _wait(self) -> None:
        """Block until the write in flight is done; re-raise its error here, in the caller's thread."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def flush(self) -> None:
        """Make everything written so far durable (before a resume journal records it)."""
        self._wait()
        for fh in self._handles:
            fh.flush()
            os.fsync(fh.fileno())

    def finish(self) -> None:
        self._wait()
        self._pool.shutdown()
        for fh in self._handles:
            fh.close()
        missing = set(self.where) - self.written
        if missing:
            raise RuntimeError(f"internal error: tensors never written: {sorted(missing)[:5]}")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        try:
            self._wait()
        except Exception:  # noqa: BLE001 - aborting anyway; the first error is the one reported
            pass
        self._pool.shutdown()
        for fh in self._handles:
            try:
                fh.close()
            except OSError:
                pass
