"""Tiny Hugging Face model families built inside the tests (a few thousand parameters)."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

CHARS = list(string.ascii_lowercase + string.digits + " .,+-=?:")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def make_config(arch: str = "llama", layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
                vocab: int | None = None, tied: bool | None = None):
    vocab = vocab or len(SPECIAL) + len(CHARS)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=bool(tied))
    if arch == "qwen2":  # q/k/v biases; tied embeddings like the small Qwen2 models
        return Qwen2Config(**common, tie_word_embeddings=True if tied is None else tied)
    if arch == "qwen3":  # q/k norms, explicit head_dim
        return Qwen3Config(**common, head_dim=hidden // heads, tie_word_embeddings=bool(tied))
    if arch == "mistral":  # sliding-window attention, window shorter than the samples
        return MistralConfig(**common, sliding_window=8, tie_word_embeddings=bool(tied))
    raise ValueError(arch)


def save_model(model, folder: Path, tokenizer=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    (tokenizer or make_tokenizer()).save_pretrained(folder)
    return folder


def make_family(root: Path, arch: str = "llama", T: int = 3, scale: float = 0.05, seed: int = 0,
                same: tuple[int, int] | None = None, **cfg_kw) -> tuple[Path, list[Path]]:
    """A base with random weights and T 'fine-tunes' = base + random perturbations of each tensor.

    `same=(i, j)` makes fine-tune j an exact copy of fine-tune i.
    """
    torch.manual_seed(seed)
    config = make_config(arch, **cfg_kw)
    base = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger-than-default init so that layers do real work
        for n, p in base.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2)
    tok = make_tokenizer()
    base_dir = save_model(base, root / "base", tok)
    tuned_dirs, tuned_sds = [], []
    sd0 = base.state_dict()
    for t in range(T):
        g = torch.Generator().manual_seed(1000 * (seed + 1) + t)
        # every fine-tune moves every tensor, with a task-specific magnitude
        sd = {k: v + scale * (1 + t) ** 0.5 * torch.randn(v.shape, generator=g) * (v.abs().mean() + 1e-3)
              for k, v in sd0.items()}
        if same and t == same[1]:
            sd = {k: v.clone() for k, v in tuned_sds[same[0]].items()}
        ft = AutoModelForCausalLM.from_config(config).eval()
        ft.load_state_dict(sd, strict=False)
        if getattr(config, "tie_word_embeddings", False):
            ft.tie_weights()
        tuned_sds.append({k: v.clone() for k, v in ft.state_dict().items()})
        tuned_dirs.append(save_model(ft, root / f"ft{t}", tok))
    return base_dir, tuned_dirs


def make_data(root: Path, T: int = 3, n: int = 12, seed: int = 0) -> list[Path]:
    """One JSONL per task in the three accepted forms (text, prompt/response)."""
    rng = random.Random(seed)
    paths = []
    for t in range(T):
        p = root / f"task{t}.jsonl"
        with open(p, "w") as f:
            for _ in range(n):
                a, b = rng.randint(0, 99), rng.randint(0, 99)
                length = rng.randint(3, 20)
                filler = "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(length))
                if t % 2 == 0:
                    f.write(json.dumps({"prompt": f"{a}+{b}=?", "response": f" {a + b}. {filler}"}) + "\n")
                else:
                    f.write(json.dumps({"text": f"task {t}: {filler} {a}-{b}"}) + "\n")
        paths.append(p)
    return paths


def write_config(path: Path, base: Path, tuned: list[Path], data: list[Path] | None, method: str = "slta",
                 **params) -> Path:
    import yaml

    cfg = {"merge_method": method, "base_model": str(base),
           "models": [{"model": str(m), **({"data": str(d)} if data else {})}
                      for m, d in zip(tuned, data or [None] * len(tuned))],
           "parameters": params, "dtype": "float32"}
    path.write_text(yaml.safe_dump(cfg))
    return path


def calibration_samples(tok, data: list[Path], n: int, seed: int = 0) -> list[tuple[int, torch.Tensor]]:
    """(task, ids) for n samples per task file drawn like the loaders' sampler, whole text (prompt +
    response), for the tests' hook-based references."""
    out = []
    for t, path in enumerate(data):
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        for i in sorted(random.Random(seed).sample(range(len(rows)), n)):
            r = rows[i]
            text = r["text"] if "text" in r else r["prompt"] + r["response"]
            out.append((t, torch.tensor([tok(text)["input_ids"]])))
    return out


def module_inputs(base, ids):
    """{layer i: (input, kwargs), ("mid", i): attention residual, ("out", i): output} of each decoder
    layer when `base` runs on one sample, captured with hooks."""
    cap = {}
    hooks = []
    for i, lay in enumerate(base.model.layers):
        hooks.append(lay.register_forward_pre_hook(
            lambda m, a, kw, i=i: cap.__setitem__(i, (a[0] if a else kw["hidden_states"], {
                k: v for k, v in kw.items() if k in ("attention_mask", "position_embeddings", "position_ids")})),
            with_kwargs=True))
        hooks.append(lay.post_attention_layernorm.register_forward_pre_hook(
            lambda m, a, i=i: cap.__setitem__(("mid", i), a[0])))
        hooks.append(lay.register_forward_hook(
            lambda m, a, out, i=i: cap.__setitem__(("out", i), out[0] if isinstance(out, tuple) else out)))
    with torch.no_grad():
        base(ids)
    for h in hooks:
        h.remove()
    return cap


def module_out(lay, kind, cap, i):
    """Module `kind` of decoder layer `lay` (whole layer, attention block or MLP block, residual
    excluded for the blocks) on the inputs captured by `module_inputs`."""
    if kind == "layer":
        h, kw = cap[i]
        return lay(h, **kw)
    if kind == "attn":
        h, kw = cap[i]
        return lay.self_attn(lay.input_layernorm(h), **kw)[0]
    return lay.mlp(lay.post_attention_layernorm(cap[("mid", i)]))
