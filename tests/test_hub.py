"""Hub ids (org/name[@revision]) as model paths, with no network.

The tests lay tiny models out in huggingface_hub's on-disk cache (models--org--name/{blobs, snapshots/
<commit>/, refs/<branch>}) under a temporary HF_HOME and resolve them offline, as huggingface_hub
itself does from a cache that a previous download filled. `acme/ft1` has two commits: refs/main holds
a decoy (ft0's files) and refs/v1 the real ft1, so a revision that is ignored gives the wrong weights.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from slta.hub import HubError, parse_hub_id, resolve_model_path
from tiny import make_data, make_family

ROOT = Path(__file__).resolve().parents[1]
COMMIT_MAIN = "a" * 40
COMMIT_V1 = "b" * 40


def add_to_cache(hub_cache: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Copy ``folder``'s files into the cache as huggingface_hub stores a download: content-addressed
    blobs, a snapshot of relative symlinks to them, and refs naming the commit."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir(exist_ok=True)
    for r in refs:
        (repo / "refs" / r).write_text(commit)
    return snap


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("hub")
    base, tuned = make_family(root / "local", T=2, scale=0.05, seed=3)
    data = make_data(root, T=2, n=6)
    cache = root / "hf_home" / "hub"  # HF_HUB_CACHE defaults to $HF_HOME/hub
    add_to_cache(cache, "acme/base", base, COMMIT_MAIN)
    add_to_cache(cache, "acme/ft0", tuned[0], COMMIT_MAIN)
    add_to_cache(cache, "acme/ft1", tuned[0], COMMIT_MAIN)  # decoy on main
    add_to_cache(cache, "acme/ft1", tuned[1], COMMIT_V1, refs=("v1",))
    return {"root": root, "base": base, "tuned": tuned, "data": data, "home": root / "hf_home", "cache": cache}


@pytest.fixture
def offline_cache(world: dict, monkeypatch: pytest.MonkeyPatch) -> Path:
    """In-process: huggingface_hub reads HF_HOME/HF_HUB_OFFLINE at import, so patch its constants."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(world["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return world["cache"]


def _config(path: Path, base: str, models: list[str], data: list[Path]) -> Path:
    cfg = {"merge_method": "slta", "base_model": base,
           "models": [{"model": m, "data": str(d)} for m, d in zip(models, data)],
           "parameters": {"granularity": "attn_mlp", "num_samples": 6}, "dtype": "float32"}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(args: list[str], home: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("HF_HUB_CACHE", None)  # so HF_HOME decides, as for a user who sets only HF_HOME
    return subprocess.run([sys.executable, "-m", "slta.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name != "slta_stats.safetensors":
            out.update(load_file(f))
    return out


def test_parse_hub_id() -> None:
    assert parse_hub_id("meta-llama/Llama-3.2-1B") == ("meta-llama/Llama-3.2-1B", None)
    assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_id("org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    for local in ("./org/name", "/abs/name", "~/models/x", "name", "a/b/c", "org/name@"):
        assert parse_hub_id(local) is None, local


def test_merge_by_hub_id_offline_equals_local_merge(world: dict) -> None:
    """`slta merge` with HF_HOME + HF_HUB_OFFLINE=1 reads the cached snapshots (the revision's one for
    acme/ft1@v1) and writes the same tensors as the merge of the local folders."""
    from slta.merge import run_merge

    root = world["root"]
    local_cfg = _config(root / "local.yml", str(world["base"]), [str(t) for t in world["tuned"]], world["data"])
    run_merge(local_cfg, root / "out_local")
    hub_cfg = _config(root / "hub.yml", "acme/base", ["acme/ft0", "acme/ft1@v1"], world["data"])
    res = _cli(["merge", str(hub_cfg), "-o", str(root / "out_hub")], world["home"], root)
    assert res.returncode == 0, res.stderr[-3000:]
    local, hub = _tensors(root / "out_local"), _tensors(root / "out_hub")
    assert local.keys() == hub.keys() and local
    for k in local:
        assert torch.equal(local[k], hub[k]), k
    # the decoy on main would have given other weights: the revision was used
    decoy_cfg = _config(root / "decoy.yml", "acme/base", ["acme/ft0", "acme/ft1"], world["data"])
    res = _cli(["merge", str(decoy_cfg), "-o", str(root / "out_decoy")], world["home"], root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert any(not torch.equal(local[k], v) for k, v in _tensors(root / "out_decoy").items())


def test_uncached_hub_id_is_a_one_line_error(world: dict) -> None:
    root = world["root"]
    cfg = _config(root / "missing.yml", "acme/base", ["acme/ft0", "acme/not-there"], world["data"])
    res = _cli(["merge", str(cfg), "-o", str(root / "out_missing")], world["home"], root)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "'acme/not-there'" in lines[0] and "HF_HUB_OFFLINE" in lines[0] and "Traceback" not in res.stderr
    assert not (root / "out_missing").exists()


def test_revisions_resolve_from_refs_and_commits(world: dict, offline_cache: Path) -> None:
    snaps = offline_cache / "models--acme--ft1" / "snapshots"
    assert resolve_model_path("acme/ft1") == snaps / COMMIT_MAIN
    assert resolve_model_path("acme/ft1@v1") == snaps / COMMIT_V1
    assert resolve_model_path(f"acme/ft1@{COMMIT_V1}") == snaps / COMMIT_V1
    with pytest.raises(HubError, match=r"'acme/ft1@nope'.*revision 'nope'.*HF_HUB_OFFLINE"):
        resolve_model_path("acme/ft1@nope")


def test_local_paths_win_over_hub_ids(world: dict, offline_cache: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "acme" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("acme/base") == Path("acme/base")  # an existing folder is never looked up
    assert resolve_model_path("./acme/other") == Path("./acme/other")  # not id-shaped: left to the caller


def test_config_error_names_the_id(world: dict, offline_cache: Path) -> None:
    from slta.config import ConfigError, load_config

    raw = {"merge_method": "task_arithmetic", "base_model": "acme/base", "models": [{"model": "acme/typo"}]}
    with pytest.raises(ConfigError, match=r"^'acme/typo' is not a local folder.*not found in the local cache"):
        load_config(raw)  # at load, before any heavy work


def test_eval_loads_a_hub_id(world: dict, offline_cache: Path) -> None:
    """`slta eval MODEL` loads through slta.evaluate.load_model: same weights and tokenizer as the folder."""
    from slta.evaluate import load_model

    model, tok = load_model("acme/ft1@v1")
    local, local_tok = load_model(world["tuned"][1])
    decoy, _ = load_model(world["tuned"][0])
    ids = tok("12+34=?", return_tensors="pt").input_ids
    assert ids.tolist() == local_tok("12+34=?", return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(logits, local(ids).logits)
        assert not torch.equal(logits, decoy(ids).logits)
