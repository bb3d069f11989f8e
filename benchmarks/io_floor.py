"""The I/O floor of a merge: read T+1 safetensors checkpoints and write one, doing nothing else.

    python benchmarks/io_floor.py OUT_FILE BASE_DIR FT_DIR [FT_DIR ...] [--mode safetensors|raw]

safetensors: every tensor of every input through `safetensors.safe_open(...).get_tensor` (one handle
    per file and layer, as a merge tool reads) and copied once, the base's tensor written to OUT at its
    offset; this is "a merge that does no arithmetic". The copy matters: `get_tensor` returns a tensor
    backed by the file's memory map, read from disk only where it is touched (measured on a cold
    938 MiB file: 0.59 s for every `get_tensor`, 76 % of the file in the page cache afterwards,
    RSS 229 MiB). Until 2026-11-30 this floor did not touch the fine-tunes' tensors, so it skipped
    most of their reads (1B float32: 11.9 s against 23.6 s for the raw floor).
raw: every input file read front to back in 16 MiB chunks into one reused buffer, and the base
    file's bytes written to OUT: the bytes that must move, with no per-tensor work at all.

Run as a child process by bench_speed.py, which measures its wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

CHUNK = 16 << 20


def header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def raw(out: Path, folders: list[Path]) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(out, "wb") as w:
        for v, folder in enumerate(folders):
            with open(folder / "model.safetensors", "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    if v == 0:
                        w.write(view[:n])


def with_safetensors(out: Path, folders: list[Path]) -> None:
    import torch
    from safetensors import safe_open

    start, head = header(folders[0] / "model.safetensors")
    head.pop("__metadata__", None)
    names = sorted(head, key=lambda k: head[k]["data_offsets"][0])
    layers: dict[str, list[str]] = {}
    for n in names:  # group by layer, as a streaming merge reads
        key = n.split(".")[2] if n.startswith("model.layers.") else n
        layers.setdefault(key, []).append(n)
    with open(folders[0] / "model.safetensors", "rb") as f, open(out, "wb") as w:
        w.write(f.read(start))
        for group in layers.values():
            tensors = []
            for folder in folders:
                with safe_open(str(folder / "model.safetensors"), framework="pt") as st:
                    tensors.append({n: st.get_tensor(n).clone() for n in group})  # every byte read
            for n in group:
                w.seek(start + head[n]["data_offsets"][0])
                w.write(tensors[0][n].reshape(-1).view(torch.uint8).numpy().data)
            del tensors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--mode", choices=["safetensors", "raw"], default="safetensors")
    a = ap.parse_args()
    folders = [Path(f) for f in a.folders]
    (raw if a.mode == "raw" else with_safetensors)(Path(a.out), folders)


if __name__ == "__main__":
    main()
