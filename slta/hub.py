"""Hugging Face hub ids as model paths: ``org/name`` or ``org/name@revision``.

A model spec that is an existing local path stays a local path. One that is not, and looks like a
hub id, is fetched with ``huggingface_hub.snapshot_download`` into huggingface_hub's own cache, so
``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and tokens (``HF_TOKEN``, ``hf auth login``) work as
they do for transformers; the snapshot folder is then read like any local model folder. Only the
files a merge reads are downloaded: configs, tokenizer files and the weights (safetensors, or the
.bin shards when the repo has no safetensors).

Every failure (offline and not cached, no such repo or revision, gated, no network) is a
:class:`HubError` with one line that names the id.
"""

from __future__ import annotations

import re
from pathlib import Path

# org/name with the hub's characters; '@' then a branch, tag or commit (branches may hold '/').
# A leading '.', '/' or '~' never matches, so "./x/y" and "/abs/path" always stay local paths.
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")

# What a merge, `slta eval` and `slta analyze` read from a model folder. "*.json" covers config.json,
# generation_config.json, the shard indexes, tokenizer_config.json, tokenizer.json, adapter_config.json.
META_PATTERNS = ["*.json", "*.jinja", "tokenizer.model", "*.tiktoken", "vocab.txt", "merges.txt"]
# model-00001-of-00004.safetensors, model.safetensors, adapter_model.safetensors; not e.g. Mistral's
# extra consolidated.safetensors, which would double the download.
SAFETENSORS_PATTERNS = ["model*.safetensors", "adapter_model.safetensors"]
BIN_PATTERNS = ["pytorch_model*.bin", "adapter_model.bin"]  # not training_args.bin, optimizer.bin

_resolved: dict[tuple[str, str, bool], Path] = {}  # one look-up per id and cache per process


class HubError(ValueError):
    """A hub id that cannot be resolved; the message is one line naming the id."""


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo_id, revision or None) when ``spec`` has the form of a hub id, else None."""
    m = HUB_ID.fullmatch(spec.strip())
    return (m["repo"], m["revision"]) if m else None


def resolve_model_path(spec: str | Path) -> Path:
    """A local folder for ``spec``: the path itself when it exists (or is not id-shaped), else the
    hub snapshot folder of ``org/name[@revision]``, downloaded or found in the cache."""
    local = Path(spec).expanduser()
    parsed = parse_hub_id(str(spec)) if isinstance(spec, str) else None
    if parsed is None or local.exists():
        return local
    from huggingface_hub import constants

    key = (str(spec), str(constants.HF_HUB_CACHE), bool(constants.HF_HUB_OFFLINE))
    if key not in _resolved:
        _resolved[key] = _download(str(spec), *parsed)
    return _resolved[key]


def _download(spec: str, repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = f"{spec!r} is not a local folder, and as a Hugging Face hub id"
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=META_PATTERNS + SAFETENSORS_PATTERNS))
        if not any(folder.glob("*.safetensors")):  # an older repo with .bin weights only
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=META_PATTERNS + BIN_PATTERNS))
    except RevisionNotFoundError:
        raise HubError(f"{where}: revision {revision!r} does not exist") from None
    except GatedRepoError:
        raise HubError(f"{where}: the repository is gated; accept its terms on the hub and set HF_TOKEN "
                       f"(or run `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise HubError(f"{where}: no such repository (or it is private: set HF_TOKEN or run `hf auth login`)") from None
    except LocalEntryNotFoundError as e:
        if type(e).__name__ == "IncompleteSnapshotError":  # cached, but an interrupted download
            raise HubError(f"{where}: {_one_line(e)}") from None
        state = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        rev = f" at revision {revision!r}" if revision else ""
        raise HubError(f"{where}: not found{rev} in the local cache ({constants.HF_HUB_CACHE}) and {state}") from None
    except HFValidationError as e:
        raise HubError(f"{where}: {_one_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - HTTP, proxy, disk, permissions: one line, the reason's first
        raise HubError(f"{where}: {type(e).__name__}: {_one_line(e)}") from None
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise HubError(f"{spec!r}: the hub snapshot {folder} has no config.json: not a transformers model")
    return folder


def _one_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return lines[0] if lines else type(e).__name__
