"""The fault battery of the output folder: nothing a user types may cost them files.

OUT equal to / inside / above an input, the working directory, a foreign folder; disk full
(simulated at the write, and on a real small tmpfs); a read-only target (simulated, and a real
read-only mount); two runs racing for one OUT; kill -9 midway and a rerun; leftovers cleaned.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import slta.io.output
from slta.io.checkpoint import ShardedWriter
from slta.io.output import OutputError, _lock
from slta.merge import run_merge, run_solve
from tiny import make_data, make_family, write_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def zoo(tmp_path):
    """A folder laid out like a user's: models/{base,ft0,ft1,other}, data/task*.jsonl."""
    models = tmp_path / "models"
    base, tuned = make_family(models, "llama", T=3)
    other = tuned.pop()  # a model that is not in the merge: it must survive too
    (tmp_path / "data").mkdir()
    data = make_data(tmp_path / "data", T=2, n=6)
    cfg = write_config(tmp_path / "c.yml", base, tuned, None, method="task_arithmetic", weight=0.5)
    slta_cfg = write_config(tmp_path / "s.yml", base, tuned, data, granularity="layer", num_samples=4)
    return tmp_path, base, tuned, other, data, cfg, slta_cfg


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "slta.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("slta: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def no_leftovers(parent: Path, name: str) -> None:
    left = [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]
    assert not left, left


# -- OUT equal to, above or inside an input ------------------------------------------------------------

@pytest.mark.parametrize("which", ["base", "model", "data_folder", "parent_of_all", "inside_base", "symlink"])
def test_merge_refuses_out_that_is_contains_or_lies_in_an_input(zoo, which):
    tmp, base, tuned, other, data, cfg, slta_cfg = zoo
    before = snapshot(tmp)
    target = {"base": base, "model": tuned[1], "data_folder": data[0].parent, "parent_of_all": base.parent,
              "inside_base": base / "merged", "symlink": tmp / "link"}[which]
    if which == "symlink":
        target.symlink_to(tuned[0], target_is_directory=True)
        before = snapshot(tmp)
    config = slta_cfg if which == "data_folder" else cfg
    proc = cli("merge", str(config), "-o", str(target), "--overwrite", "-q")
    line = one_line_error(proc, str(target))
    assert "input" in line
    assert snapshot(tmp) == before, "an input changed"
    assert other.exists() and (other / "config.json").exists()


def test_solve_analyze_and_zoo_refuse_an_input_as_output(zoo, tmp_path):
    tmp, base, tuned, other, data, cfg, slta_cfg = zoo
    merged = run_merge(slta_cfg, tmp / "merged", progress=False)
    before = snapshot(tmp)
    # solve into the folder that holds its statistics, or into a model
    one_line_error(cli("solve", str(merged), "-o", str(merged), "--overwrite", "-q"), "statistics")
    one_line_error(cli("solve", str(merged), "-o", str(tuned[0]), "--overwrite", "-q"), str(tuned[0]))
    with pytest.raises(OutputError, match="contains the input"):
        run_solve(merged, tmp, overwrite=True, progress=False)
    # analyze refuses before the analysis starts (it would take long on a real model)
    started = time.perf_counter()
    one_line_error(cli("analyze", str(slta_cfg), "-o", str(base.parent), "--overwrite", "-q"), "base_model")
    assert time.perf_counter() - started < 60
    assert snapshot(tmp) == before
    # zoo build into the working directory
    empty = tmp / "here"
    empty.mkdir()
    one_line_error(cli("zoo", "build", ".", "--size", "tiny", "-q", cwd=empty), "working directory")


def test_out_dot_overwrite_is_a_clean_error(zoo):
    """`-o . --overwrite` crashed with EBUSY and left a complete temporary folder behind."""
    tmp, base, tuned, other, data, cfg, slta_cfg = zoo
    work = tmp / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    one_line_error(cli("merge", str(cfg), "-o", ".", "--overwrite", "-q", cwd=work), "working directory")
    one_line_error(cli("merge", str(cfg), "-o", "..", "--overwrite", "-q", cwd=work), "contains the input")
    assert (work / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]
    assert not [p for p in tmp.iterdir() if p.name.startswith((".work.", ".tmp"))]


def test_overwrite_refuses_a_folder_slta_did_not_write(zoo):
    tmp, base, tuned, other, data, cfg, slta_cfg = zoo
    docs = tmp / "docs"
    docs.mkdir()
    (docs / "thesis.tex").write_text("years of work")
    one_line_error(cli("merge", str(cfg), "-o", str(docs), "--overwrite", "-q"), "did not write")
    assert (docs / "thesis.tex").read_text() == "years of work"
    # a file is not a folder to replace
    f = tmp / "file.txt"
    f.write_text("x")
    one_line_error(cli("merge", str(cfg), "-o", str(f), "--overwrite", "-q"), "not a folder")
    assert f.read_text() == "x"
    no_leftovers(tmp, "file.txt")
    # a previous merge is replaced, as --overwrite promises
    run_merge(cfg, tmp / "m", progress=False)
    run_merge(cfg, tmp / "m", overwrite=True, progress=False)
    no_leftovers(tmp, "m")


# -- disk full, read-only ------------------------------------------------------------------------------

def test_disk_full_at_the_write_names_out_and_the_size(zoo, monkeypatch):
    tmp, base, tuned, other, data, cfg, slta_cfg = zoo

    def full(fh, position, t):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ShardedWriter, "_write_at", staticmethod(full))
    for config in (cfg, slta_cfg):
        with pytest.raises(OutputError, match=r"disk full while writing output .*out.*needs \d+\.\d+ kB"):
            run_merge(config, tmp / "out", progress=False)
        assert not (tmp / "out").exists()
        no_leftovers(tmp, "out")


def test_too_little_free_space_is_refused_before_any_work(zoo, monkeypatch):
    tmp, base, tuned, other, data, cfg, slta_cfg = zoo
    monkeypatch.setattr(slta.io.output.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 5))
    with pytest.raises(OutputError, match=r"not enough disk space for output .*out: it needs .* has 5 bytes free"):
        run_merge(cfg, tmp / "out", progress=False)
    assert not (tmp / "out").exists()
    no_leftovers(tmp, "out")


def test_read_only_target_is_one_line(zoo, monkeypatch):
    tmp, base, tuned, other, data, cfg, slta_cfg = zoo
    real_mkdir = Path.mkdir

    def denied(self, *a, **k):
        if self.name.startswith(".out."):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(OutputError, match="cannot write output .*out: permission denied"):
        run_merge(cfg, tmp / "out", progress=False)
    no_leftovers(tmp, "out")


def _mount(tmp: Path, *options: str) -> Path | None:
    point = tmp / "mnt"
    point.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(point)],
                        capture_output=True).returncode == 0
    return point if ok else None


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.mark.skipif(not _can_mount(), reason="mounting a small tmpfs needs root (CI runs as root)")
def test_real_small_and_read_only_filesystems(zoo):
    """A real 64 kB tmpfs (the output is ~200 kB) and a real read-only mount, through the CLI."""
    tmp, base, tuned, other, data, cfg, slta_cfg = zoo
    point = _mount(tmp, "size=64k")
    if point is None:  # root without CAP_SYS_ADMIN (some containers): the simulated tests above still run
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")
    try:
        proc = cli("merge", str(cfg), "-o", str(point / "out"), "-q")
        one_line_error(proc, str(point / "out"), "needs")
        assert list(point.iterdir()) == []
        # the pre-check passes when the free space is a lie; the write itself then fails cleanly
        code = ("import shutil, sys; import slta.io.output as o; from slta.cli import main;"
                "o.check_free_space = lambda out, needed: None; sys.exit(main(sys.argv[1:]))")
        proc = subprocess.run([sys.executable, "-c", code, "merge", str(cfg), "-o", str(point / "out"), "-q"],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        one_line_error(proc, "disk full while writing output", "needs")
        assert list(point.iterdir()) == []
    finally:
        subprocess.run(["umount", str(point)], check=True)
    ro = tmp / "ro"
    ro.mkdir()
    assert subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)]).returncode == 0, \
        "a read-only tmpfs could not be mounted although a writable one could"
    try:
        one_line_error(cli("merge", str(cfg), "-o", str(ro / "out"), "-q"), "cannot write output", "read-only")
    finally:
        subprocess.run(["umount", str(ro)], check=True)


# -- races, kill -9, leftovers -------------------------------------------------------------------------

def test_a_second_run_to_a_locked_out_stops_at_once(zoo):
    tmp, base, tuned, other, data, cfg, slta_cfg = zoo
    out = tmp / "out"
    with _lock(out.resolve(), str(out)):
        with pytest.raises(OutputError, match="another slta run is writing output"):
            run_merge(cfg, out, progress=False)
    assert not out.exists()
    run_merge(cfg, out, progress=False)  # the lock is gone with its holder
    no_leftovers(tmp, "out")


def test_two_merges_racing_for_one_out_never_mix(zoo):
    tmp, base, tuned, other, data, cfg, slta_cfg = zoo
    ref = snapshot(run_merge(cfg, tmp / "ref", progress=False))
    cfg2 = write_config(tmp / "c2.yml", base, tuned, None, method="task_arithmetic", weight=0.9)
    ref2 = snapshot(run_merge(cfg2, tmp / "ref2", progress=False))
    out = tmp / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for _ in range(2):
        procs = [subprocess.Popen([sys.executable, "-m", "slta.cli", "merge", str(c), "-o", str(out), "--overwrite",
                                   "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for c in (cfg, cfg2)]
        results = [p.communicate(timeout=300) for p in procs]
        codes = [p.returncode for p in procs]
        assert 0 in codes and set(codes) <= {0, 2}, results
        for p, (_, err) in zip(procs, results):
            if p.returncode == 2:
                assert "another slta run is writing output" in err, err
        got = {k: v for k, v in snapshot(out).items() if k != "slta_report.json"}
        want = [{k: v for k, v in r.items() if k != "slta_report.json"} for r in (ref, ref2)]
        assert got in want, "the output mixes two merges"
        no_leftovers(tmp, "out")


def test_kill_9_midway_then_rerun_cleans_up_and_matches(zoo, caplog):
    tmp, base, tuned, other, data, cfg, slta_cfg = zoo
    ref = snapshot(run_merge(cfg, tmp / "ref", progress=False))
    out = tmp / "out"
    # the writer sleeps after each tensor, so the kill lands midway for certain
    code = ("import sys, time; from slta.io.checkpoint import ShardedWriter; w = ShardedWriter._write_at;"
            "ShardedWriter._write_at = staticmethod(lambda *a: (w(*a), time.sleep(0.2)));"
            "from slta.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "merge", str(cfg), "-o", str(out), "-q"],
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 120
    while not list(tmp.glob(".out.tmp-*/*.safetensors")) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    assert proc.poll() is None, "the merge finished before the kill"
    proc.kill()
    proc.wait()
    left = sorted(p.name for p in tmp.iterdir() if p.name.startswith(".out."))
    assert any(n.startswith(".out.tmp-") for n in left), left
    assert not out.exists()
    # a stale .old and .partial from other killed runs, too
    (tmp / ".out.old-999999").mkdir()
    (tmp / ".out.partial").mkdir()
    with caplog.at_level(logging.WARNING, logger="slta"):
        run_merge(cfg, out, progress=False)
    assert snapshot(out).keys() == ref.keys()
    assert {k: v for k, v in snapshot(out).items() if k != "slta_report.json"} == \
           {k: v for k, v in ref.items() if k != "slta_report.json"}
    no_leftovers(tmp, "out")
    lines = [r.getMessage() for r in caplog.records if "leftover" in r.getMessage()]
    assert len(lines) == 1 and "3 leftover(s)" in lines[0] and ".out.partial" in lines[0], lines
    report = json.loads((out / "slta_report.json").read_text())
    assert report["method"] == "task_arithmetic"


def test_signal_just_after_the_temporary_folder_exists_leaves_nothing(tmp_path, monkeypatch):
    """A SIGTERM (raised as KeyboardInterrupt by the CLI's handler) that lands right after the temporary
    folder is made, before anything is written into it, still removes it (a CI run once caught a kill test
    in that window and found `.out.tmp-PID` left behind)."""
    real_mkdir = Path.mkdir

    def mkdir_then_signal(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        if ".tmp-" in self.name:
            raise KeyboardInterrupt

    monkeypatch.setattr(Path, "mkdir", mkdir_then_signal)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with slta.io.output.atomic_output(out):
            raise AssertionError("the block must not run")
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))
