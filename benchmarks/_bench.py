"""Shared pieces of the benchmark scripts: synthetic Llama checkpoints, calibration files, and
measuring a command as a child process (wall time, and peak RSS from the kernel via wait4).

Not part of the test suite and not part of the package: the benchmarks build their own world.
"""

from __future__ import annotations

import json
import random
import string
import subprocess
import sys
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def llama_shapes(hidden: int, layers: int, vocab: int, inter: int, kv_heads: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of an untied Llama, in checkpoint order."""
    kv = kv_heads * 64
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,)),
                   (p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (kv, hidden)),
                   (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inter))]
    return shapes + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def llama_config(hidden: int, layers: int, vocab: int, dtype: str):
    from transformers import LlamaConfig

    # head_dim 64, one key/value head per 4 query heads (GQA), SwiGLU MLP of 2.75 x hidden
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(2.75 * hidden),
                       num_hidden_layers=layers, num_attention_heads=hidden // 64,
                       num_key_value_heads=max(1, hidden // 256), max_position_embeddings=1024,
                       tie_word_embeddings=False, dtype=dtype, architectures=["LlamaForCausalLM"])


def build_models(root: Path, T: int, hidden: int, layers: int, seed: int = 0, vocab: int = 8000,
                 dtype: str = "float32") -> tuple[Path, list[Path], int]:
    """A random Llama base and T 'fine-tunes' (base + 2% noise), cached under root (built.json marks
    a finished build). Returns (base folder, fine-tune folders, bytes of one checkpoint)."""
    from tiny import make_tokenizer

    from slta.io.checkpoint import ShardedWriter, parse_dtype

    config = llama_config(hidden, layers, vocab, dtype)
    shapes = llama_shapes(hidden, layers, vocab, config.intermediate_size, config.num_key_value_heads)
    tdtype = parse_dtype(dtype)
    item = torch.empty((), dtype=tdtype).element_size()
    nbytes = sum(torch.Size(s).numel() * item for _, s in shapes)
    folders = [root / "base"] + [root / f"ft{t}" for t in range(T)]
    marker = root / "built.json"
    spec = {"T": T, "hidden": hidden, "layers": layers}
    if (vocab, dtype) != (8000, "float32"):  # the older benchmarks' markers stay valid
        spec.update(vocab=vocab, dtype=dtype)
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return folders[0], folders[1:], nbytes
    marker.unlink(missing_ok=True)
    tok = make_tokenizer()
    for v, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
        tok.save_pretrained(folder)
        w = ShardedWriter(folder, shapes, tdtype, 10 ** 10)
        for name, shape in shapes:  # one tensor at a time: building needs no more memory than merging
            g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            base = (1 + 0.1 * torch.randn(shape, generator=g)) if "norm" in name else \
                torch.randn(shape, generator=g) / shape[-1] ** 0.5
            if v:
                gv = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}:{v}".encode()))
                base += 0.02 * base.abs().mean() * torch.randn(shape, generator=gv)
            w.write(name, base)
        w.finish()
    marker.write_text(json.dumps(spec))
    return folders[0], folders[1:], nbytes


def make_data(root: Path, T: int, n: int, chars: int) -> list[Path]:
    """T calibration files of n random lowercase samples; the test tokenizer gives one token per character."""
    rng = random.Random(0)
    paths = []
    for t in range(T):
        p = root / f"task{t}.jsonl"
        with open(p, "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(chars))}) + "\n")
        paths.append(p)
    return paths


# A fork carries the parent's resident pages into the child until exec, and the kernel's peak-RSS
# record (ru_maxrss) keeps them. So children are started by this small launcher process (a few MiB),
# never by the benchmark itself, which holds torch and test tensors.
LAUNCHER = """
import json, os, subprocess, sys, time
cmd, err = json.loads(sys.argv[1]), sys.argv[2]
t0 = time.perf_counter()
with open(err, "wb") as f:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f)
    _, status, usage = os.wait4(proc.pid, 0)
print(json.dumps([time.perf_counter() - t0, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)]))
"""


def run(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[float, float, int]:
    """Run a command as a grandchild process: wall seconds, its peak RSS (MiB, from wait4), exit code."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".stderr") as err:
        res = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, json.dumps(cmd), err.name], env=env, cwd=cwd,
                             capture_output=True, text=True, check=True)
        wall, rss, code = json.loads(res.stdout)
        if code:
            print(f"{' '.join(cmd)} exited {code}:\n{Path(err.name).read_text(errors='replace')[-3000:]}",
                  file=sys.stderr)
    return wall, rss, code
