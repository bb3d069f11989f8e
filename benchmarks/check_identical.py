"""Byte-identity check: the outputs of every method with the code at a git commit vs the working tree.

    OMP_NUM_THREADS=1 python benchmarks/check_identical.py --ref b5ddb66 [--new COMMIT] [--work /tmp/slta_identical]
        [--no-demo]

Builds the fixtures once (the tiny zoo, `slta zoo build DIR --size tiny`, and two tiny test families
from tests/tiny.py: an untied Llama and a tied Qwen2), then runs, in one child process per code
version (PYTHONPATH pointing at a temporary `git worktree` of REF, or at this tree):

- `slta merge` for slta at every granularity (model, layer, attn_mlp, head_mlp, linear) and every
  data-free method and RegMean, on each fixture;
- `slta merge --resume` of the zoo's attn_mlp merge (same bytes as a plain run);
- `slta solve` on the saved statistics (all models and a subset, plain and balanced);
- `slta analyze` (linearity.json);
- the tiny demo, `slta demo --size tiny --ablations --variants --jobs 1` (both zoo kinds): the zoos it
  builds (and the chat zoo's two extra fine-tunes), every merge's evaluation in its cache, and its
  report folders (results, tables, figures, diagnostics). Each code version builds its own zoos, in
  the same folder (moved aside afterwards), so paths hashed into cache keys agree. `--no-demo` skips it.

Then compares every output file's sha256. JSON reports are compared without their timings (`timings`,
the demo's `timings_s`) and with the output roots replaced by a placeholder (they name the statistics
file they were solved from). Exit status 0 when everything is identical. Not part of the test suite
(a few minutes; with the demo about 20 on a busy 2-core machine).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRANULARITIES = ("model", "layer", "attn_mlp", "head_mlp", "linear")
DATA_FREE = {
    "task_arithmetic": {"lambda": 0.8},
    "linear": {},
    "ties": {"density": 0.5},
    "dare_linear": {"density": 0.6},
    "dare_ties": {"density": 0.6},
    "breadcrumbs": {"density": 0.8, "gamma": 0.05},
    "breadcrumbs_ties": {"density": 0.8, "gamma": 0.05},
    "consensus_ta": {"k": 2, "lambda": 0.9},
    "regmean": {"num_samples": 6, "batch_size": 4},
}
WEIGHTED = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties"}


def build_fixtures(work: Path) -> list[tuple[str, Path, list[Path], list[Path]]]:
    """[(name, base, fine-tunes, data files)] for the tiny zoo and two tiny test families."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    zoo = work / "zoo_tiny"
    if not (zoo / "zoo.json").exists():
        subprocess.run([sys.executable, "-m", "slta.cli", "zoo", "build", str(zoo), "--size", "tiny", "-q"],
                       check=True, env=env)
    out = [("zoo", zoo / "base", [zoo / t for t in ("math", "code", "translate")],
            [zoo / "data" / t / "calib.jsonl" for t in ("math", "code", "translate")])]
    fam = work / "families"
    if not (fam / "done").exists():
        code = ("import sys; from pathlib import Path; sys.path.insert(0, 'tests'); import tiny\n"
                f"root = Path({str(fam)!r})\n"
                "for arch in ('llama', 'qwen2'):\n"
                "    (root / arch).mkdir(parents=True, exist_ok=True)\n"
                "    tiny.make_family(root / arch, arch=arch, T=3, layers=2)\n"
                "    tiny.make_data(root / arch, T=3)\n"
                "(root / 'done').write_text('')\n")
        subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)
    for arch in ("llama", "qwen2"):
        d = fam / arch
        out.append((arch, d / "base", [d / f"ft{t}" for t in range(3)], [d / f"task{t}.jsonl" for t in range(3)]))
    return out


def configs(fixtures) -> dict[str, dict]:
    """Every merge the check runs: name -> config dict."""
    cfgs = {}
    for name, base, tuned, data in fixtures:
        for g in GRANULARITIES:
            cfgs[f"{name}-slta-{g}"] = {
                "merge_method": "slta", "base_model": str(base), "dtype": "float32",
                "models": [{"model": str(m), "data": str(d)} for m, d in zip(tuned, data)],
                "parameters": {"granularity": g, "num_samples": 6, "batch_size": 4, "max_length": 96}}
        for method, params in DATA_FREE.items():
            models = []
            for k, (m, d) in enumerate(zip(tuned, data)):
                entry: dict = {"model": str(m)}
                if method == "regmean":
                    entry["data"] = str(d)
                if method in WEIGHTED:
                    entry["parameters"] = {"weight": [0.3, 0.5, 0.7][k]}
                models.append(entry)
            cfgs[f"{name}-{method}"] = {"merge_method": method, "base_model": str(base), "dtype": "float32",
                                        "models": models, "parameters": dict(params)}
    return cfgs


DRIVER = r"""
import json, sys, logging
from pathlib import Path
import slta
root, out = Path(sys.argv[1]), Path(sys.argv[2])
assert Path(slta.__file__).resolve().is_relative_to(root.resolve()), (slta.__file__, root)
from slta.merge import run_merge, run_solve
run_analyze = slta.analyze  # the public name: the module behind it moved (issue #29)
cfgs = json.loads(Path(sys.argv[3]).read_text())
logging.disable(logging.WARNING)
for name, cfg in cfgs.items():
    run_merge(cfg, out / name, progress=False)
    print("merged", name, flush=True)
zoo = cfgs["zoo-slta-attn_mlp"]
run_merge(zoo, out / "zoo-slta-attn_mlp-resume", progress=False, resume=True)
for name in ("zoo-slta-attn_mlp", "llama-slta-head_mlp", "qwen2-slta-layer"):
    stats = out / name / "slta_stats.safetensors"
    run_solve(stats, out / f"{name}-solve", progress=False)
    run_solve(stats, out / f"{name}-solve-01-plain", models=[0, 1], balance=False, progress=False)
    print("solved", name, flush=True)
for fam in ("zoo", "llama"):
    cfg = dict(cfgs[f"{fam}-slta-attn_mlp"])
    run_analyze(cfg, out / f"{fam}-analyze", num_samples=4, steps=4, progress=False)
    print("analyzed", fam, flush=True)
"""


DEMO = ["demo", "--size", "tiny", "--zoo-kind", "both", "--ablations", "--variants", "--jobs", "1", "-q"]


def run_version(code_root: Path, out: Path, cfg_file: Path, demo: Path | None) -> None:
    env = {**os.environ, "PYTHONPATH": str(code_root), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    subprocess.run([sys.executable, "-c", DRIVER, str(code_root), str(out), str(cfg_file)], check=True, env=env,
                   cwd=tempfile.gettempdir())
    if demo is None:
        return
    subprocess.run(["rm", "-rf", str(demo)], check=True)
    subprocess.run([sys.executable, "-m", "slta.cli", *DEMO, "--zoo", str(demo / "zoo"), "--out", str(demo / "out")],
                   check=True, env=env, cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL)
    print("demo", flush=True)
    demo.rename(out / "demo")


def _strip(obj, roots: list[str]):
    if isinstance(obj, dict):
        return {k: _strip(v, roots) for k, v in obj.items() if k not in ("timings", "timings_s")}
    if isinstance(obj, list):
        return [_strip(v, roots) for v in obj]
    if isinstance(obj, str):
        for r in roots:
            obj = obj.replace(r, "<OUT>")
    return obj


def digest(path: Path, root: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".json" and path.name != "config.json":
        data = json.dumps(_strip(json.loads(data), [str(root)]), sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def compare(a: Path, b: Path) -> list[str]:
    problems = []
    names = sorted({p.relative_to(a) for p in a.rglob("*") if p.is_file()}
                   | {p.relative_to(b) for p in b.rglob("*") if p.is_file()})
    for rel in names:
        pa, pb = a / rel, b / rel
        if not pa.exists() or not pb.exists():
            problems.append(f"{rel}: only in {'new' if pb.exists() else 'ref'}")
        elif digest(pa, a) != digest(pb, b):
            problems.append(f"{rel}: differs")
    return problems, len(names)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default="b5ddb66", help="git commit to compare against (default b5ddb66)")
    ap.add_argument("--new", default=None, help="git commit to check (default: the working tree)")
    ap.add_argument("--work", default="/tmp/slta_identical", help="scratch folder (fixtures are reused)")
    ap.add_argument("--no-demo", action="store_true", help="leave out the tiny demo (about 2 x 4 minutes)")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    fixtures = build_fixtures(work)
    cfg_file = work / "configs.json"
    cfg_file.write_text(json.dumps(configs(fixtures), indent=1))
    trees = {"ref": (work / "ref-tree", a.ref), **({"new": (work / "new-tree", a.new)} if a.new else {})}
    for tree, commit in trees.values():
        if tree.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit], check=True,
                       capture_output=True)
    try:
        results = {}
        for label, code in (("ref", trees["ref"][0]), ("new", trees["new"][0] if a.new else ROOT)):
            out = work / "out" / label
            subprocess.run(["rm", "-rf", str(out)], check=True)
            out.mkdir(parents=True)
            run_version(code, out, cfg_file, None if a.no_demo else work / "demo-run")
            results[label] = out
        problems, n = compare(results["ref"], results["new"])
    finally:
        for tree, _ in trees.values():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    runs = len(list(results["ref"].iterdir()))
    if problems:
        print(f"NOT identical: {len(problems)} of {n} files in {runs} output folders differ")
        print("\n".join(problems))
        return 1
    print(f"identical: {n} files in {runs} output folders (ref {a.ref} vs {a.new or 'the working tree'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
