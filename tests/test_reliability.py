"""Reproducibility, interrupted runs, and a property-based test of the config loader."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slta.config import ConfigError, load_config
from slta.merge import run_merge
from tiny import make_data, make_family, write_config


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("method", ["slta", "ties", "dare_linear"])
def test_same_config_gives_byte_identical_output(tmp_path, method):
    base, tuned = make_family(tmp_path, "llama", T=2)
    data = make_data(tmp_path, T=2)
    params = {"slta": {"granularity": "attn_mlp", "num_samples": 5}, "ties": {"density": 0.3, "weight": 1.0},
              "dare_linear": {"density": 0.5, "weight": 0.8, "seed": 3}}[method]
    cfg = write_config(tmp_path / "c.yml", base, tuned, data if method == "slta" else None, method=method, **params)
    a = files_of(run_merge(cfg, tmp_path / "a", progress=False))
    b = files_of(run_merge(cfg, tmp_path / "b", progress=False))
    assert set(a) == set(b)
    for name in a:
        if name == "slta_report.json":  # identical but for the timings
            ra, rb = json.loads(a[name]), json.loads(b[name])
            ra.pop("timings"), rb.pop("timings")
            assert ra == rb
        else:
            assert a[name] == b[name], name
    report = json.loads(a["slta_report.json"])
    assert {"torch", "transformers", "safetensors"} <= set(report["versions"]) and report["slta_version"]


def test_killed_merge_leaves_no_output(tmp_path):
    """SIGTERM midway: no OUT, and the temporary folder is removed."""
    base, tuned = make_family(tmp_path, "llama", T=3, layers=6, hidden=64)
    data = make_data(tmp_path, T=3, n=30)
    cfg = write_config(tmp_path / "c.yml", base, tuned, data, granularity="head_mlp", num_samples=30, batch_size=1)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "slta.cli", "merge", str(cfg), "-o", str(out), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    # Freeze it the moment its temporary folder exists, so that the signal lands mid-merge however
    # fast the machine is (a fixed sleep let a fast CI machine finish first).
    proc.send_signal(signal.SIGSTOP)
    assert proc.poll() is None and not out.exists(), "the merge finished before it could be interrupted; make it bigger"
    assert list(tmp_path.glob(".out.tmp-*"))
    proc.send_signal(signal.SIGTERM)  # pending until the process runs again
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*"))


# -- the config loader never crashes with anything but a clear ConfigError ---------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)
keys = st.sampled_from(["merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
                        "tokenizer_source", "tokenizer", "chat_template", "slices", "name", "model", "data",
                        "weight", "granularity", "typo"])
configs = st.one_of(
    values,
    st.dictionaries(keys, values, max_size=6),
    st.fixed_dictionaries({"merge_method": st.sampled_from(["slta", "ties", "task_arithmetic", "dare", "regmean",
                                                            "linear", "consensus_ta", "breadcrumbs"]),
                           "base_model": st.text(min_size=1, max_size=5),
                           "models": st.lists(st.fixed_dictionaries({"model": st.text(min_size=1, max_size=5)},
                                                                    optional={"data": values, "parameters": values}),
                                              max_size=3)},
                          optional={"parameters": st.dictionaries(
                              st.sampled_from(["weight", "density", "lambda", "granularity", "num_samples", "balance",
                                               "seed", "gamma", "k", "normalize", "alpha", "epsilon"]),
                              values, max_size=4),
                              "dtype": values}),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_config_loader_only_raises_config_errors(raw):
    try:
        load_config(raw)
    except ConfigError as e:
        assert str(e)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_yaml_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.yml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as e:
        assert str(path) in str(e)


@pytest.mark.parametrize("method", ["slta", "ties"])
def test_resume_after_kill_is_byte_identical(tmp_path, method):
    """SIGKILL a --resume merge after a few layers, run it again with --resume: the output equals an
    uninterrupted run's, byte for byte (report timings aside)."""
    base, tuned = make_family(tmp_path, "llama", T=3, layers=8, hidden=64)
    data = make_data(tmp_path, T=3, n=30)
    params = {"granularity": "attn_mlp", "num_samples": 30, "batch_size": 1} if method == "slta" else \
        {"density": 0.3, "weight": 1.0}
    cfg = write_config(tmp_path / "c.yml", base, tuned, data if method == "slta" else None, method=method, **params)
    ref = run_merge(cfg, tmp_path / "ref", progress=False)

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "slta.cli", "merge", str(cfg), "-o", str(out), "-q", "--resume"]
    journal = tmp_path / ".out.partial" / "slta_progress.json"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and len(json.loads(journal.read_text())["done"]) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be killed; make the model bigger"
    proc.kill()  # no chance to clean up: the worst case
    proc.wait()
    assert not out.exists()
    done = json.loads(journal.read_text())["done"]
    assert 3 <= len(done) < 10, done

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr
    assert not (tmp_path / ".out.partial").exists()
    a, b = files_of(ref), files_of(out)
    assert set(a) == set(b)
    for name in a:
        if name == "slta_report.json":
            ra, rb = json.loads(a[name]), json.loads(b[name])
            ra.pop("timings"), rb.pop("timings")
            assert ra == rb
        else:
            assert a[name] == b[name], name


@pytest.mark.parametrize("raw", ["", "."])
def test_config_path_that_is_a_folder(raw):
    # Found by the property test above: "" is the path "." (a folder), which used to escape as IsADirectoryError.
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(raw)


def test_config_home_of_unknown_user():
    # Found by the property test: "~0" (no such user) escaped as RuntimeError from Path.expanduser.
    with pytest.raises(ConfigError, match="~nosuchuser_slta"):
        load_config({"merge_method": "task_arithmetic", "base_model": "~nosuchuser_slta/base",
                     "models": [{"model": "~nosuchuser_slta/a"}]})


def test_config_path_with_a_nul_character():
    # Found by the property test: base_model '\x00' escaped as a bare ValueError from Path.resolve.
    with pytest.raises(ConfigError, match="NUL character"):
        load_config({"merge_method": "task_arithmetic", "base_model": "\x00", "models": [{"model": "a"}]})


def test_models_that_is_not_a_list():
    # Found by the property test: models: true escaped as TypeError.
    with pytest.raises(ConfigError, match="models"):
        load_config({"merge_method": "task_arithmetic", "models": True})
