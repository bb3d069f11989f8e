"""Show that `pip install` of slta into a venv holding the newest transformers keeps that transformers.

Run with the venv's Python after it holds slta's newest dependencies (`make test` sets it up):
1. asks the registry for the newest transformers in slta's range and fails unless this venv holds it
   (so the check below is about the newest release, not whatever a reused venv happens to have);
2. resolves `pip install -e .[test]` with `--dry-run --report` and fails if pip would install, upgrade
   or downgrade anything but slta itself (a too-narrow pin would show up as a transformers downgrade).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pip_report(*args: str) -> list[dict]:
    """The `install` list of `pip install --dry-run --report -` with `args`."""
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", *args],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["install"]


def main() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    requirement = next(d for d in deps if d.startswith("transformers"))
    [newest] = [i["metadata"]["version"] for i in pip_report("--ignore-installed", "--no-deps", requirement)]
    have = version("transformers")
    if have != newest:
        raise SystemExit(f"install_keeps: this venv holds transformers {have}, the newest in {requirement!r} "
                         f"is {newest}: install it first")
    would = [f'{i["metadata"]["name"]} {i["metadata"]["version"]}' for i in pip_report("-e", f"{ROOT}[test]")]
    others = [w for w in would if not w.startswith("slta ")]
    if others:
        raise SystemExit(f"install_keeps: pip install -e .[test] would change {others} (transformers {have} held)")
    print(f"install_keeps: pip install -e .[test] beside transformers {have} (newest in {requirement!r}) "
          f"installs only {would} and keeps everything else")


if __name__ == "__main__":
    main()
