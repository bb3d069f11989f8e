"""Print pip constraints pinning every runtime requirement of slta to its lower bound in pyproject.toml.

CI's low-end venv installs with these (`make test-lowest`), so each `>=` bound in pyproject.toml is a
version the core tests have run on, not a guess. A requirement without one `>=` bound is an error:
every runtime requirement states the lowest version tested. Standard library only, so it runs
before anything is installed. `--check`: confirm the running venv holds exactly those versions.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def lowest_pins(pyproject: Path) -> list[str]:
    """`name==lower bound` for each of [project].dependencies (plain `name>=x,<y` requirements)."""
    pins = []
    for line in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*([^;\[]*)", line.strip())
        specs = [s.strip() for s in m.group(2).split(",")] if m else []
        lows = [s[2:].strip() for s in specs if s.startswith(">=")]
        if m is None or len(lows) != 1:
            raise SystemExit(f"lowest_pins: {line!r} is not `name>=low[,<high]` with one lower bound")
        pins.append(f"{m.group(1)}=={lows[0]}")
    return pins


def check_installed(pins: list[str]) -> None:
    """Exit non-zero unless this Python's environment holds exactly the pinned versions (a reused venv
    may hold newer ones: then the low end would not have been tested)."""
    wrong = []
    for pin in pins:
        name, want = pin.split("==")
        try:
            have = version(name).split("+")[0]  # torch's local tag: 2.13.0+cpu
        except PackageNotFoundError:
            have = "missing"
        if have != want:
            wrong.append(f"{name} {have} (want {want})")
    if wrong:
        raise SystemExit("lowest_pins: this venv is not at the lower bounds: " + ", ".join(wrong))
    print("lower bounds installed: " + ", ".join(p.replace("==", " ") for p in pins))


if __name__ == "__main__":
    pins = lowest_pins(Path(__file__).resolve().parents[1] / "pyproject.toml")
    if sys.argv[1:] == ["--check"]:
        check_installed(pins)
    else:
        print("\n".join(pins))
