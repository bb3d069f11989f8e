"""The package's layout: no import cycle among slta's modules, and no module over MAX_LINES lines.

Imports are read from the source with `ast`, at every level (module, function, class, and under
`if TYPE_CHECKING:`), so an import deferred into a function to dodge a cycle still counts. A
package's own `__init__` importing its submodules (the method registry, `slta.methods`) is how a
package exposes its children, not a dependency between stages, so those edges are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import slta

ROOT = Path(slta.__file__).resolve().parent
MAX_LINES = 420  # the "about 400"


def module_name(path: Path) -> str:
    parts = ("slta", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """slta modules that `name` imports anywhere in its source."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` depends on pkg.mod when that is a module, else on pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:  # `import slta.methods.params` -> the deepest known module
                t = t.rpartition(".")[0]
            if t and t != name and not (is_pkg and t.startswith(name + ".")):
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                cyc = visit(m)
                if cyc:
                    return cyc
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            cyc = visit(n)
            if cyc:
                return cyc
    return None


def test_no_import_cycle_among_slta_modules():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_function_level_imports_count(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from slta.merge import run_merge\n    import slta.engine\n")
    assert imports_of("slta.x", p, {"slta", "slta.merge", "slta.engine"}) == {"slta.merge", "slta.engine"}


def test_engine_clients_do_not_import_the_cli_driver():
    g = graph()
    for client in ("slta.closed_form", "slta.data_free", "slta.regmean_stream", "slta.methods.regmean",
                   "slta.linearity", "slta.linearity_stream", "slta.stats", "slta.engine"):
        assert "slta.merge" not in g[client], client


def test_no_module_over_max_lines():
    long = {name: n for name, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"
