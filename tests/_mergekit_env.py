"""mergekit as a test peer: its venv, running `mergekit-yaml`, and the tiny models both tools merge.

mergekit lives in its own venv (tests/setup_peer.sh mergekit creates it); slta never imports it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("MERGEKIT_VENV", ROOT / ".venv-mergekit"))
MERGEKIT_YAML = VENV / "bin" / "mergekit-yaml"

NUM_LAYERS = 3  # three layers so gradients are also evaluated between their end points (t = 0.5)


def require_mergekit() -> Path:
    """Path of `mergekit-yaml`; FAILS (does not skip) when the venv is missing, so CI cannot pass silently."""
    if not MERGEKIT_YAML.exists():
        pytest.fail(f"mergekit's venv is missing ({MERGEKIT_YAML} not found): run tests/setup_peer.sh mergekit", pytrace=False)
    return MERGEKIT_YAML


def run_mergekit(config: dict[str, Any], workdir: Path, name: str) -> Path:
    """Run `mergekit-yaml` on ``config`` on the CPU; return the output folder."""
    exe = require_mergekit()
    cfg_path = workdir / f"{name}.yml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = workdir / f"mergekit_{name}"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [str(exe), str(cfg_path), str(out), "--no-copy-tokenizer", "--no-cuda", "--quiet",
           "--no-write-model-card", "--random-seed", "0"]
    res = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise AssertionError(f"mergekit-yaml failed ({res.returncode}) on {cfg_path}:\n{res.stderr[-4000:]}")
    return out


def build_models(root: Path, num_tuned: int = 3, seed: int = 0) -> tuple[Path, list[Path]]:
    """A tiny Llama base and ``num_tuned`` "fine-tunes" = base + random perturbations, as float32 safetensors.

    Perturbation sizes differ per model and per entry (heavy-tailed) so magnitude-based trimming has work
    to do; they stay well under the driver's "is this a fine-tune of the base" distance limit.
    Edge cases on purpose: fine-tune 0 leaves one norm untouched (an all-zero task vector), fine-tune 1
    changes only ~70% of each tensor (exact zeros, i.e. ties at zero magnitude). No exactly equal
    NONZERO magnitudes: mergekit breaks such ties by an unstable argsort, slta by position.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    base = LlamaForCausalLM(config)
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2)
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    sd0 = {k: v.clone() for k, v in base.state_dict().items()}
    tuned_dirs = []
    for t in range(num_tuned):
        g = torch.Generator().manual_seed(1000 + 17 * seed + t)
        sd = {}
        for k, v in sd0.items():
            scale = 0.005 * (1 + t) * torch.exp(torch.randn(v.shape, generator=g))  # heavy-tailed sizes
            delta = scale * torch.randn(v.shape, generator=g)
            if t == 0 and k == "model.layers.0.input_layernorm.weight":
                delta.zero_()
            if t == 1:
                delta *= torch.rand(v.shape, generator=g) < 0.7
            sd[k] = v + delta
        ft = LlamaForCausalLM(config)
        ft.load_state_dict(sd)
        d = root / f"ft{t}"
        ft.save_pretrained(d)
        tuned_dirs.append(d)
    return base_dir, tuned_dirs


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder's safetensors shards."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out
