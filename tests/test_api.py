"""The Python API (issue #14): `import slta` gives the CLI's commands under their names, stays cheap,
and `slta.merge.run_merge` & co. work without importing the submodules first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tiny import make_family, write_config

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)


def test_import_slta_then_submodules_by_attribute():
    r = _python("import slta\n"
                "slta.merges.stats.run_solve; slta.analysis.linearity.run_analyze; slta.io.checkpoint.Checkpoint\n"
                "slta.merge.run_merge; slta.evaluate.evaluate; slta.solve.solve_module\n"
                "assert all(callable(f) for f in (slta.merge, slta.solve, slta.analyze, slta.evaluate))\n"
                "print('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_import_slta_is_cheap():
    r = _python("import sys, slta\nprint([m for m in ('torch', 'transformers', 'numpy', 'slta.merge') if m in sys.modules])")
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-2000:])


def test_api_names_are_the_cli_functions(tmp_path):
    import slta
    from slta.analysis.linearity import run_analyze
    from slta.evaluate import evaluate
    from slta.merge import run_merge
    from slta.merges.stats import run_solve

    assert slta.COMMANDS == {"merge": run_merge, "solve": run_solve, "analyze": run_analyze, "evaluate": evaluate}
    for name in slta.COMMANDS:
        assert getattr(slta, name).__call__.__doc__ or getattr(slta, name).__doc__
    base, tuned = make_family(tmp_path, "llama", T=2)
    cfg = write_config(tmp_path / "ta.yml", base, tuned, None, method="task_arithmetic", weight=0.5)
    a = slta.merge(cfg, tmp_path / "a", progress=False)
    b = run_merge(cfg, tmp_path / "b", progress=False)
    assert (Path(a) / "model.safetensors").read_bytes() == (Path(b) / "model.safetensors").read_bytes()


def test_top_level_help_lists_every_command_without_importing_them():
    """`slta --help` lists the subcommands defined in their own modules from slta.cli.COMMAND_HELP (no
    import of torch or those modules); the text is the modules' own, and running a command imports only
    its module."""
    import argparse
    import importlib
    import subprocess
    import sys

    from slta.cli import COMMAND_HELP, COMMAND_MODULES

    assert set(COMMAND_HELP) == set(COMMAND_MODULES)
    for name, mod in COMMAND_MODULES.items():
        p = argparse.ArgumentParser()
        sub = p.add_subparsers()
        importlib.import_module(mod).add_cli(sub)
        assert {a.dest: a.help for a in sub._choices_actions} == {name: COMMAND_HELP[name]}
    probe = ("import sys; from slta.cli import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print('LOADED', ' '.join(sorted(m for m in sys.modules if m in "
             "('torch', 'slta.demo', 'slta.analysis.linearity', 'slta.analysis.figures',"
             " 'slta.analysis.diagnostics'))))")
    run = lambda *a: subprocess.run([sys.executable, "-c", probe, *a], capture_output=True, text=True)  # noqa: E731
    top = run("--help")
    assert all(name in top.stdout for name in (*COMMAND_MODULES, "merge", "solve", "eval", "zoo")), top.stdout
    assert top.stdout.strip().endswith("LOADED"), top.stdout[-300:]
    demo = run("demo", "--help")
    assert "--zoo-seeds" in demo.stdout and "slta.demo" in demo.stdout.split("LOADED")[-1]
    assert "slta.analysis.linearity" not in demo.stdout.split("LOADED")[-1]
    bad = run("nonsense")
    assert "invalid choice" in bad.stderr and "diagnose" in bad.stderr
