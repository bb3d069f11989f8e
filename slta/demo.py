"""`slta demo`: the paper's section 4 on the demo zoo.

Builds (or reuses) the zoo, evaluates the base and the fine-tunes, then for every pair of tasks
and the triple merges with weight averaging and every baseline (hyper-parameters grid-searched on
the validation split, as the paper's A.3.4 does) and with slta at model, layer, attn_mlp and
head_mlp level over 3 calibration seeds. slta measures the Gram statistics once per seed and
level on the triple and re-solves every pair from them (`slta solve`), with no extra forward pass.
Prints the paper's Table 1/3 layout and writes a report folder (markdown, JSON, figures).

Every evaluation is cached under OUT/cache by a hash of what produced it, so a rerun reuses it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

TASKS = ("math", "code", "translate")
COMBOS = [("math", "code"), ("math", "translate"), ("code", "translate"), ("math", "code", "translate")]
LEVELS = ("model", "layer", "attn_mlp", "head_mlp")
LEVEL_NAMES = {"model": "slta Model Level", "layer": "slta Layer Level", "attn_mlp": "slta Attn/MLP Level",
               "head_mlp": "slta Head/MLP Level"}


def baseline_grids(size: str) -> dict[str, list[dict[str, Any]]]:
    """Hyper-parameter grids (top-level `parameters`), after the methods' papers and the paper's A.3.4."""
    lambdas = [round(0.1 * i, 1) for i in range(1, 11)]
    if size == "tiny":  # CI: the same methods, fewer points
        return {
            "weight_average": [{}],
            "task_arithmetic": [{"weight": w} for w in (0.3, 0.6, 1.0)],
            "ties": [{"density": 0.5, "lambda": 1.0}],
            "dare_linear": [{"density": 0.2, "weight": 0.8}],
            "breadcrumbs": [{"density": 0.9, "gamma": 0.01, "weight": 0.6}],
            "consensus_ta": [{"k": 2, "tall_lambda": 0.4, "weight": 0.6}],
            "regmean": [{"alpha": 0.9}],
        }
    return {
        "weight_average": [{}],
        "task_arithmetic": [{"weight": w} for w in lambdas],  # A.3.4: α ∈ {0.1, ..., 1.0}
        "ties": [{"density": d, "lambda": lam} for d in (0.2, 0.5, 0.8) for lam in (0.6, 1.0, 1.4)],
        # A.3.4: drop ratio ∈ {0.6, ..., 0.9} x α ∈ {0.6, 0.8, 1.0}
        "dare_linear": [{"density": round(1 - p, 1), "weight": a} for p in (0.6, 0.7, 0.8, 0.9) for a in (0.6, 0.8, 1.0)],
        "breadcrumbs": [{"density": d, "gamma": g, "weight": w}
                        for d in (0.8, 0.9) for g in (0.01, 0.05) for w in (0.5, 0.8, 1.0)],
        "consensus_ta": [{"k": 2, "tall_lambda": tl, "weight": w} for tl in (0.2, 0.4, 0.6) for w in (0.4, 0.7, 1.0)],
        "regmean": [{"alpha": a} for a in (0.5, 0.9, 1.0)],
    }


METHOD_NAMES = {"weight_average": "Weight Avg", "task_arithmetic": "Task Arithmetic", "ties": "TIES",
                "dare_linear": "DARE", "breadcrumbs": "Breadcrumbs", "consensus_ta": "Consensus TA",
                "regmean": "RegMean"}


def generation_budget(zoo: Path) -> dict[str, int]:
    """Per task, how many tokens a correct completion can need: the longest calibration
    response (training format, with its chain of thought) plus </s> and a 25% + 8 margin. A merged
    model that rambles is cut there instead of at 64 tokens; its answer would be wrong anyway."""
    from transformers import AutoTokenizer

    from slta.evaluate import read_jsonl

    tok = AutoTokenizer.from_pretrained(zoo / "base")
    budget = {}
    for t in TASKS:
        responses = [r["response"] for r in read_jsonl(zoo / "data" / t / "calib.jsonl")]
        longest = max(len(ids) for ids in tok(responses, add_special_tokens=False).input_ids)
        budget[t] = int(1.25 * longest) + 8
    return budget


class Demo:
    def __init__(self, zoo: Path, out: Path, size: str, device: str, seeds: int, progress: bool):
        self.zoo, self.out, self.size, self.device, self.progress = zoo, out, size, device, progress
        self.seeds = list(range(seeds))
        self.cache = out / "cache"
        self.work = out / "work"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.val_limit = None if size == "tiny" else 100
        self.zoo_hash = json.loads((zoo / "zoo.json").read_text())["recipe_hash"]
        self.budget = generation_budget(zoo)

    # -- helpers ---------------------------------------------------------------------------------
    def files(self, tasks: tuple[str, ...], split: str) -> dict[str, Path]:
        return {t: self.zoo / "data" / t / f"{split}.jsonl" for t in tasks}

    def key(self, what: dict[str, Any]) -> str:
        blob = json.dumps({**what, "zoo": self.zoo_hash}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def evaluate(self, model: Path, tasks: tuple[str, ...], split: str, key: str) -> dict[str, float]:
        from slta.evaluate import evaluate

        path = self.cache / f"eval-{key}-{split}.json"
        if path.exists():
            return json.loads(path.read_text())
        limit = self.val_limit if split == "val" else None
        scores = evaluate(model, self.files(tasks, split), batch_size=64, max_new_tokens=self.budget,
                          device=self.device, limit=limit, progress=False)
        path.write_text(json.dumps(scores))
        return scores

    def merge_config(self, method: str, tasks: tuple[str, ...], params: dict[str, Any]) -> dict[str, Any]:
        return {"merge_method": method, "base_model": str(self.zoo / "base"),
                "models": [{"model": str(self.zoo / t), "data": str(self.zoo / "data" / t / "calib.jsonl")}
                           if method in ("slta", "regmean") else {"model": str(self.zoo / t)} for t in tasks],
                "parameters": params, "dtype": "float32"}

    def merged_scores(self, cfg: dict[str, Any], tasks: tuple[str, ...], split: str) -> dict[str, float]:
        from slta.merge import run_merge

        key = self.key({"config": cfg, "limit": self.val_limit if split == "val" else None})
        path = self.cache / f"eval-{key}-{split}.json"
        if path.exists():
            return json.loads(path.read_text())
        folder = self.work / key
        run_merge(cfg, folder, overwrite=True, device=self.device, progress=False)
        try:
            return self.evaluate(folder, tasks, split, key)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # -- the steps --------------------------------------------------------------------------------
    def reference_rows(self) -> dict[str, dict[str, float]]:
        """Base and every fine-tune on every task's test split."""
        return {name: self.evaluate(self.zoo / name, TASKS, "test", self.key({"model": name}))
                for name in ("base", *TASKS)}

    def baselines(self, bar) -> dict[str, dict[str, Any]]:
        results: dict[str, dict[str, Any]] = {}
        for method, grid in baseline_grids(self.size).items():
            for combo in COMBOS:
                best, best_params = -1.0, None
                for params in grid:  # grid search on the validation split (A.3.4)
                    bar.set_postfix_str(f"{method} {'+'.join(combo)} {params}")
                    if len(grid) == 1:  # nothing to choose: no validation run
                        best, best_params = None, params
                        bar.update()
                        break
                    cfg = self.merge_config(method, combo, {**params, "num_samples": 30} if method == "regmean" else params)
                    val = np.mean(list(self.merged_scores(cfg, combo, "val").values()))
                    if val > best:
                        best, best_params = val, params
                    bar.update()
                cfg = self.merge_config(method, combo, {**best_params, "num_samples": 30} if method == "regmean" else best_params)
                test = self.merged_scores(cfg, combo, "test")
                results.setdefault(method, {})["+".join(combo)] = {"params": best_params, "val_avg": best,
                                                                   "test": test}
        return results

    def slta(self, bar) -> dict[str, dict[str, Any]]:
        """Per level and seed: one forward pass on the triple, every pair re-solved from its statistics."""
        from slta.merge import run_merge, run_solve

        results: dict[str, dict[str, Any]] = {}
        triple = COMBOS[-1]
        for level in LEVELS:
            for seed in self.seeds:
                bar.set_postfix_str(f"slta {level} seed {seed}")
                cfg = self.merge_config("slta", triple, {"granularity": level, "num_samples": 30, "seed": seed})
                key = self.key({"config": cfg})
                folder = self.work / f"slta-{key}"
                keep = self.out / "report" / "slta_attn_mlp_triple_seed0" if (level, seed) == ("attn_mlp", 0) else None
                cached = all((self.cache / f"eval-{self.key({'config': cfg, 'combo': c})}-test.json").exists()
                             for c in COMBOS) and (keep is None or keep.exists())
                if not cached:
                    run_merge(cfg, folder, overwrite=True, device=self.device, progress=False)
                for combo in COMBOS:
                    ck = self.key({"config": cfg, "combo": combo})
                    path = self.cache / f"eval-{ck}-test.json"
                    if not path.exists():
                        if combo == triple:
                            scores = self.evaluate(folder, combo, "test", ck)
                        else:
                            sub = folder.with_name(folder.name + "-" + "+".join(combo))
                            run_solve(folder / "slta_stats.safetensors", sub, models=[triple.index(t) for t in combo],
                                      overwrite=True, progress=False)
                            scores = self.evaluate(sub, combo, "test", ck)
                            shutil.rmtree(sub, ignore_errors=True)
                    else:
                        scores = json.loads(path.read_text())
                    results.setdefault(level, {}).setdefault("+".join(combo), []).append(
                        {"seed": seed, "test": scores})
                if keep is not None and not keep.exists() and folder.exists():
                    keep.parent.mkdir(parents=True, exist_ok=True)
                    keep.mkdir()
                    for f in ("slta_report.json", "README.md"):
                        shutil.copy2(folder / f, keep / f)
                shutil.rmtree(folder, ignore_errors=True)
                bar.update()
        return results


def run_demo(zoo: str | Path | None = None, out: str | Path | None = None, size: str = "default",
             device: str = "cpu", seeds: int = 3, progress: bool = True, threads: int = 1) -> dict[str, Any]:
    """Run the demo; returns the results and writes OUT/report.

    ``threads`` sets torch's CPU threads. The default is 1: the zoo's models are so small that
    a second thread gains little, and on a 2-core machine that another process also uses, an
    evaluation measured 55 s with 2 threads against 2.7 s with 1 (threads wait on each other).
    """
    import torch
    from transformers.utils import logging as hf_logging

    from slta.zoo import build_zoo

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per evaluated model is noise here
    torch.set_num_threads(max(1, threads))
    started = time.perf_counter()
    zoo = Path(zoo or f"zoo/{size}")
    out = Path(out or f"demo_out/{size}")
    t = time.perf_counter()
    print(f"slta demo ({size}): building or reusing the zoo in {zoo} ...", flush=True)
    build_zoo(zoo, size=size, progress=progress, threads=threads)
    zoo_s = time.perf_counter() - t
    demo = Demo(zoo, out, size, device, seeds, progress)
    grids = baseline_grids(size)
    steps = len(TASKS) + 1 + sum(len(g) * len(COMBOS) for g in grids.values()) + len(LEVELS) * len(demo.seeds)
    with tqdm(total=steps, desc="slta demo", disable=not progress) as bar:
        bar.set_postfix_str("base and fine-tunes")
        refs = demo.reference_rows()
        bar.update(len(TASKS) + 1)
        base = demo.baselines(bar)
        ours = demo.slta(bar)
    results = {"size": size, "zoo": str(zoo), "zoo_recipe_hash": demo.zoo_hash, "reference": refs,
               "baselines": base, "slta": ours, "seeds": demo.seeds,
               "timings_s": {"zoo": zoo_s, "total": time.perf_counter() - started}}
    write_report(results, out / "report")
    print(results_table(results)["text"])
    print(f"\nreport written to {out / 'report'} ({results['timings_s']['total']:.0f}s)")
    return results


# -- tables and report ---------------------------------------------------------------------------

def _avg(scores: dict[str, float], combo: tuple[str, ...]) -> float:
    return 100 * float(np.mean([scores[t] for t in combo]))


def table_rows(results: dict[str, Any]) -> list[tuple[str, list[tuple[float, float | None]]]]:
    """(row name, [(mean, std or None) per combo]) in the paper's Table 1/3 order."""
    refs = results["reference"]
    rows = [("Base Model", [(_avg(refs["base"], c), None) for c in COMBOS]),
            ("Fine-tuned Model", [(float(np.mean([100 * refs[t][t] for t in c])), None) for c in COMBOS])]
    for method, by_combo in results["baselines"].items():
        rows.append((METHOD_NAMES.get(method, method),
                     [(_avg(by_combo["+".join(c)]["test"], c), None) for c in COMBOS]))
    for level, by_combo in results["slta"].items():
        cells = []
        for c in COMBOS:
            vals = [_avg(r["test"], c) for r in by_combo["+".join(c)]]
            cells.append((float(np.mean(vals)), float(np.std(vals))))
        rows.append((LEVEL_NAMES[level], cells))
    return rows


def results_table(results: dict[str, Any]) -> dict[str, str]:
    rows = table_rows(results)
    merged = [r for r in rows if r[0] not in ("Base Model", "Fine-tuned Model")]
    best = [max(r[1][j][0] for r in merged) for j in range(len(COMBOS))]
    header = ["Method"] + [" & ".join(t.capitalize() for t in c) for c in COMBOS]

    def cell(mean: float, std: float | None, bold: bool, md: bool) -> str:
        s = f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")
        return f"**{s}**" if bold and md else (s + " *" if bold else s)

    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    widths = [max(len(h), 22) for h in header]
    text = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    for name, cells in rows:
        is_merge = name not in ("Base Model", "Fine-tuned Model")
        md.append("| " + " | ".join([name] + [cell(m, s, is_merge and m == best[j], True)
                                             for j, (m, s) in enumerate(cells)]) + " |")
        text.append("  ".join([name.ljust(widths[0])] + [cell(m, s, is_merge and m == best[j], False).ljust(w)
                                                          for j, ((m, s), w) in enumerate(zip(cells, widths[1:]))]))
    text.append("(average exact-match accuracy, %, on the test splits; * = best merge; slta rows: mean ± std "
                "over calibration seeds)")
    return {"markdown": "\n".join(md), "text": "\n".join(text)}


def write_report(results: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tables = results_table(results)
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    detail = ["", "## Per-task accuracy (%)", "", "| Method | Combination | " + " | ".join(TASKS) + " |",
              "|---|---|" + "---|" * len(TASKS)]
    for method, by_combo in results["baselines"].items():
        for combo, r in by_combo.items():
            detail.append(f"| {METHOD_NAMES.get(method, method)} ({r['params']}) | {combo} | "
                          + " | ".join(f"{100 * r['test'][t]:.1f}" if t in r["test"] else "" for t in TASKS) + " |")
    for level, by_combo in results["slta"].items():
        for combo, runs in by_combo.items():
            cells = []
            for t in TASKS:
                vals = [100 * r["test"][t] for r in runs if t in r["test"]]
                cells.append(f"{np.mean(vals):.1f} ± {np.std(vals):.1f}" if vals else "")
            detail.append(f"| {LEVEL_NAMES[level]} | {combo} | " + " | ".join(cells) + " |")
    refs = results["reference"]
    detail += ["", "## Base and fine-tunes on every task (%)", "", "| Model | " + " | ".join(TASKS) + " |",
               "|---|" + "---|" * len(TASKS)]
    for name, scores in refs.items():
        detail.append(f"| {name} | " + " | ".join(f"{100 * scores[t]:.1f}" for t in TASKS) + " |")
    (folder / "results.md").write_text(f"# slta demo ({results['size']} zoo)\n\n" + tables["markdown"] + "\n"
                                       + "\n".join(detail) + "\n")
    accuracy_bars(results, folder / "accuracy.png")
    heat = folder / "slta_attn_mlp_triple_seed0" / "slta_report.json"
    if heat.exists():
        from slta.figures import fig5_alpha

        fig5_alpha(json.loads(heat.read_text()), folder / "alpha_heatmap_attn_mlp_triple.png")


def accuracy_bars(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table_rows(results)
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(rows)
    x = np.arange(len(COMBOS))
    for k, (name, cells) in enumerate(rows):
        means = [m for m, _ in cells]
        stds = [s or 0 for _, s in cells]
        ax.bar(x + k * width, means, width, yerr=stds if any(stds) else None, label=name, capsize=2)
    ax.set_xticks(x + width * (len(rows) - 1) / 2, [" & ".join(c) for c in COMBOS])
    ax.set_ylabel("average exact match (%)")
    ax.set_title(f"slta demo ({results['size']} zoo): merging the fine-tunes")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build the demo zoo, merge it with slta and every baseline, print the table")
    p.add_argument("--zoo", help="zoo folder (default: zoo/SIZE)")
    p.add_argument("--out", help="output folder (default: demo_out/SIZE)")
    p.add_argument("--size", default="default", choices=("tiny", "default"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--seeds", type=int, default=3, help="calibration seeds for slta (mean ± std)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; see run_demo)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=lambda a: run_demo(a.zoo, a.out, a.size, a.device, a.seeds, not a.quiet, a.threads))
