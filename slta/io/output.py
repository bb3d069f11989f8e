"""The output folder: checked before any work, written beside OUT, moved into place only when complete.

What a user can type wrong here costs files, so every command that writes a folder (`merge`,
`solve`, `analyze`, `zoo build`) goes through these checks:

- OUT must not be, contain, or lie inside any input (base, fine-tunes, calibration files,
  statistics): `--overwrite` would otherwise delete the inputs before the merge reads them.
- OUT must not be the working directory or one of its parents.
- `--overwrite` replaces only an empty folder or one that an earlier run wrote (a model or report
  folder); anything else is refused, so `-o ~ --overwrite` cannot delete a home folder.
- One run at a time per OUT (an advisory lock beside it), so two runs never mix their files.
- Leftovers of killed runs to the same OUT (`.OUT.tmp-PID`, `.OUT.old-PID`, a stale
  `.OUT.partial`) are removed at the next run, with one line saying so.
- Disk full and read-only targets are one-line errors that name OUT and the space needed.

`finish_folder` completes a merged model's folder: config.json, tokenizer files, slta_report.json
(with the inputs' fingerprints), the model card and, for slta, the α as a mergekit config.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

if TYPE_CHECKING:
    from slta.config import MergeConfig
    from slta.io.inputs import Inputs

log = logging.getLogger("slta")

# Files whose presence marks a folder as one an earlier run (or a model save) wrote; --overwrite
# replaces such a folder, or an empty one, and nothing else.
OUTPUT_MARKERS = ("slta_report.json", "config.json", "linearity.json", "zoo.json", "model.safetensors",
                  "model.safetensors.index.json")
SAMPLE_BLOCKS, SAMPLE_BYTES = 8, 1 << 16  # input_fingerprint: blocks of each weight file hashed
SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT)
ACCESS_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS)


class OutputError(ValueError):
    """The output folder cannot be written safely; the message names it and says what to do."""


def _resolve(p: str | Path) -> Path:
    return Path(p).expanduser().resolve()  # follows symlinks, so a link to an input is caught too


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def partial_folder(out: str | Path) -> Path:
    """Where a resumable run (`--resume`) works: `.OUT.partial` beside OUT."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def check_output(out: str | Path, overwrite: bool = False, inputs: Mapping[str, str | Path] | None = None) -> Path:
    """Refuse an OUT that would destroy an input, the working directory or foreign files.

    `inputs` maps a label ("base_model ./zoo/base", "data of model ./math", ...) to a path. Runs
    before any heavy work; returns OUT resolved."""
    shown = str(out)
    target = _resolve(out)
    for label, path in (inputs or {}).items():
        p = _resolve(path)
        if _within(p, target):
            what = "is" if p == target else "contains"
            raise OutputError(f"output {shown} {what} the input {label} ({p}): writing there would delete it; "
                              f"choose another output folder")
        if _within(target, p):
            raise OutputError(f"output {shown} lies inside the input {label} ({p}); choose a folder outside "
                              f"every input")
    cwd = Path.cwd().resolve()
    if _within(cwd, target):
        raise OutputError(f"output {shown} is the working directory or one of its parents ({target}); "
                          f"choose a new folder, e.g. -o ./merged")
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise OutputError(f"output {shown} exists and is not a folder; choose another path")
        if not overwrite:
            raise FileExistsError(f"output {shown} already exists (pass --overwrite to replace it)")
        entries = sorted(p.name for p in target.iterdir())
        if entries and not any(m in entries for m in OUTPUT_MARKERS):
            raise OutputError(f"output {shown} holds files slta did not write (e.g. {entries[0]}) and no model "
                              f"or report; --overwrite replaces only such folders: choose a new or empty folder")
    return target


def check_free_space(out: str | Path, needed: int) -> None:
    """Refuse before any work when the filesystem of OUT cannot hold `needed` bytes."""
    parent = _resolve(out).parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise OutputError(f"not enough disk space for output {out}: it needs {_size(needed)}, the filesystem "
                          f"of {parent} has {_size(free)} free")


def _size(n: int) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n} bytes"


def _os_error(e: OSError, out: str | Path, needed: int | None, doing: str) -> OutputError | None:
    """A one-line OutputError for the OS errors a user can fix (full disk, read-only target)."""
    if e.errno in SPACE_ERRORS:
        need = f"; the output needs {_size(needed)}" if needed else ""
        return OutputError(f"disk full while {doing} output {out}{need}; free space on its filesystem or choose "
                           f"another -o (nothing was left behind)")
    if e.errno in ACCESS_ERRORS:
        return OutputError(f"cannot write output {out}: {os.strerror(e.errno).lower()} "
                           f"({e.filename or Path(out).parent}); choose a writable folder")
    return None


@contextmanager
def _lock(out: Path, shown: str) -> Iterator[None]:
    """An advisory lock `.OUT.lock` beside OUT for the whole run: a second run to the same OUT stops
    at once instead of interleaving its files (the kernel drops the lock when a run dies, even by
    kill -9)."""
    path = out.parent / f".{out.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise (_os_error(e, shown, None, "creating") or e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"another slta run is writing output {shown} ({path} is locked); wait for it to "
                              f"finish or choose another -o") from None
        try:  # the file may have been removed by the run that just finished: lock the live one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)


def _clean_leftovers(out: Path, shown: str, keep_partial: bool) -> None:
    """Remove what killed runs to this OUT left beside it (safe: we hold OUT's lock)."""
    pattern = [f".{out.name}.tmp-", f".{out.name}.old-"]
    found = [p for p in out.parent.iterdir() if any(p.name.startswith(s) for s in pattern)]
    partial = partial_folder(out)
    if not keep_partial and partial.exists():
        found.append(partial)
    for p in found:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    if found:
        log.warning("removed %d leftover(s) of an interrupted earlier run to %s: %s", len(found), shown,
                    ", ".join(p.name for p in found))


@contextmanager
def atomic_output(out: str | Path, overwrite: bool = False, resume: bool = False,
                  inputs: Mapping[str, str | Path] | None = None, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; move it to `out` only if the block completes.

    A crash, Ctrl-C or error leaves no `out` and no temporary folder. A resumable run (`resume`)
    works in `.OUT.partial` instead, which survives an interruption and is picked up by the next
    run with `resume`. `inputs` and `needed` (bytes to be written) are checked first."""
    shown = str(out)
    target = check_output(out, overwrite, inputs)
    if needed is not None:
        check_free_space(target, needed)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise (_os_error(e, shown, needed, "creating") or e) from None
    with _lock(target, shown):
        check_output(out, overwrite, inputs)  # again: a run that held the lock may have just written OUT
        _clean_leftovers(target, shown, keep_partial=resume)
        tmp = partial_folder(target) if resume else target.parent / f".{target.name}.tmp-{os.getpid()}"
        try:
            try:  # inside the cleanup's try: a SIGTERM just after the folder exists still removes it
                tmp.mkdir(exist_ok=True)
            except OSError as e:
                raise (_os_error(e, shown, needed, "creating") or e) from None
            yield tmp
            _replace(tmp, target)
        except BaseException as e:
            if not resume or isinstance(e, OSError) and e.errno in SPACE_ERRORS + ACCESS_ERRORS:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                err = _os_error(e, shown, needed, "writing")
                if err is not None:
                    raise err from None
            raise


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an existing OUT (checked by check_output) is replaced."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)  # put the previous output back rather than leave none
        raise
    shutil.rmtree(old)


# -- the finished folder: config, tokenizer, report, model card, input fingerprints -------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def finish_folder(tmp: Path, ins: Inputs, cfg: MergeConfig, report: dict[str, Any]) -> None:
    """config.json (dtype updated), tokenizer and generation files, report and model card."""
    import numpy as np
    import torch

    import slta
    from slta.config import ConfigError
    from slta.io.architecture import read_config_json
    from slta.io.checkpoint import dtype_name

    if cfg.tokenizer_source not in (None, "base"):
        raise ConfigError(f"tokenizer_source: only 'base' is supported, got {cfg.tokenizer_source!r}")
    conf = read_config_json(ins.base.folder)
    conf["dtype"] = dtype_name(ins.out_dtype)
    conf.pop("torch_dtype", None)
    (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES:
        if (ins.base.folder / name).exists():
            shutil.copy2(ins.base.folder / name, tmp / name)
    full = {
        "slta_version": slta.__version__,
        "versions": {"torch": torch.__version__, "transformers": _version("transformers"),
                     "safetensors": _version("safetensors"), "numpy": np.__version__,
                     "python": platform.python_version()},
        "config": cfg.model_dump(mode="json"),
        "base_model": str(ins.base.folder),
        "models": [str(ck.folder) for ck in ins.tuned],
        "inputs": {
            "fingerprint_rule": "sha256 of config.json, file names, sizes and safetensors headers",
            "checkpoints": {str(ck.folder): fingerprint(ck.folder) for ck in ins.all},
            "calibration_sha256": {str(cfg.path(m.data)): file_sha256(cfg.path(m.data)) for m in cfg.models if m.data},
        },
        "dtype": dtype_name(ins.out_dtype),
        **report,
        "warnings": [*ins.warnings, *report.get("warnings", [])],
    }
    (tmp / "slta_report.json").write_text(json.dumps(full, indent=2) + "\n")
    from slta.io.report import mergekit_config, model_card

    (tmp / "README.md").write_text(model_card(full))
    if full.get("modules") and full.get("method") == "slta":
        mk = mergekit_config(full, ins.hf_config.num_hidden_layers, bool(getattr(ins.hf_config, "tie_word_embeddings", False)))
        if mk is not None:  # the solved α as a mergekit task_arithmetic config, for mergekit pipelines
            import yaml

            (tmp / "mergekit_config.yml").write_text(yaml.safe_dump(mk, sort_keys=False))


def fingerprint(folder: Path) -> str:
    """sha256 of a checkpoint's config.json, file names, sizes and safetensors headers (which hold every
    tensor's name, dtype, shape and byte range). Not of the full content: that would mean reading
    every checkpoint a second time."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        if f.suffix == ".safetensors":
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                h.update(fh.read(n))
        elif f.name == "config.json" or f.name.endswith(".index.json"):
            h.update(f.read_bytes())
    return h.hexdigest()


def input_fingerprint(path: str | Path) -> str:
    """What a saved result depends on, cheaply: for a model folder its `fingerprint` plus the sha256 of
    SAMPLE_BLOCKS evenly spaced blocks of every weight file (a retrained fine-tune keeps its
    safetensors header, not its bytes); for a file (calibration data, statistics) its sha256."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256(fingerprint(path).encode())
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix in (".safetensors", ".bin"):
            size = f.stat().st_size
            with open(f, "rb") as fh:
                for k in range(SAMPLE_BLOCKS):
                    fh.seek(max(0, size - SAMPLE_BYTES) * k // (SAMPLE_BLOCKS - 1))
                    h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()


def input_fingerprints(paths: Iterable[str | Path]) -> dict[str, str]:
    """Resolved path -> `input_fingerprint`, for every path that exists."""
    return {str(Path(p).resolve()): input_fingerprint(p) for p in paths if Path(p).exists()}


def changed_inputs(saved: Mapping[str, str], paths: Iterable[str | Path] | None = None) -> list[str]:
    """The paths among `saved` (or only those in `paths`) whose fingerprint differs now."""
    wanted = None if paths is None else {str(Path(p).resolve()) for p in paths}
    todo = [p for p in saved if wanted is None or p in wanted]
    now = input_fingerprints(todo)
    return [p for p in todo if p in now and now[p] != saved[p]]


def file_sha256(path: Path) -> str:
    """sha256 of a file's content (calibration files are small)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)
