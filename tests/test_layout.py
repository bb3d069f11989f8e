"""The package's layout: no import cycle among slta's modules, no module over MAX_LINES lines, and no
import that reaches upward through the pipeline's layers (LAYERS).

Imports are read from the source with `ast`, at every level (module, function, class, and under
`if TYPE_CHECKING:`), so an import deferred into a function to dodge a cycle still counts. A
package's own `__init__` importing its submodules (the method registry, `slta.methods`; the demo's
driver, `slta.demo`) is how a package exposes its children, not a dependency between stages, so those
edges are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import slta

ROOT = Path(slta.__file__).resolve().parent
MAX_LINES = 420  # the "about 400"

# The layers, bottom first. A module may import modules of its own component, and of components in
# lower layers; never one of a higher layer, nor a sibling component in its own layer (siblings are
# independent). A component is named by module prefixes: "slta.io" is slta.io and all under it;
# "slta" alone is the package's face (slta/__init__.py: the version and the lazy API, which imports
# nothing of slta itself). Every module must fall in one component: a new top-level module is placed
# here by hand.
LAYERS: list[dict[str, tuple[str, ...]]] = [
    {"face": ("slta",)},
    # the formulas: data-free merge methods, their parameters and registry; the closed form's solver
    {"methods": ("slta.methods",), "solver": ("slta.solve",)},
    # the config (parsed and checked, hub ids resolved to folders); it opens no model
    {"config": ("slta.config", "slta.hub")},
    # models in and out: what a config names, opened lazily and cross-checked; the output folder
    {"io": ("slta.io",)},
    # the streaming walk and what its data-driven clients share (calibration, tokens, features)
    {"engine": ("slta.engine",)},
    # the merges: every method as an engine client, writing α, the statistics file, the dry run
    {"merges": ("slta.merges",)},
    # the analysis: linearity, diagnostics (which re-solve closed-form merges), figures
    {"analysis": ("slta.analysis",)},
    # the commands that drive them, and the zoo, which only writes model folders
    {"merge": ("slta.merge",), "evaluate": ("slta.evaluate",), "zoo": ("slta.zoo",)},
    {"demo": ("slta.demo",)},
    {"cli": ("slta.cli",)},
]


def component_of(module: str, layers: list[dict[str, tuple[str, ...]]] = LAYERS) -> tuple[int, str] | None:
    """(layer index, component name) of a module: its longest matching prefix; None if it has none."""
    best = None
    for i, layer in enumerate(layers):
        for name, prefixes in layer.items():
            for pre in prefixes:
                hit = module == pre if pre == "slta" else module == pre or module.startswith(pre + ".")
                if hit and (best is None or len(pre) > best[0]):
                    best = (len(pre), i, name)
    return best and best[1:]


def upward_imports(g: dict[str, set[str]], layers: list[dict[str, tuple[str, ...]]] = LAYERS) -> list[str]:
    """Every edge that breaks LAYERS, as "A (component, layer) -> B (component, layer)"; and every module
    that no component holds."""
    bad = [f"{m}: in no component of LAYERS" for m in sorted(g) if component_of(m, layers) is None]
    for a in sorted(g):
        ca = component_of(a, layers)
        for b in sorted(g[a]):
            cb = component_of(b, layers)
            if ca is None or cb is None or ca[1] == cb[1]:
                continue
            if cb[0] >= ca[0]:  # a higher layer, or a sibling in the same layer
                why = "a sibling in its own layer" if cb[0] == ca[0] else "a higher layer"
                bad.append(f"{a} ({ca[1]}, layer {ca[0]}) imports {b} ({cb[1]}, layer {cb[0]}): {why}")
    return bad


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = ("slta", *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


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


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = modules(root)
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
    p.write_text("def f():\n    from slta.merge import run_merge\n    import slta.engine.walk\n")
    assert imports_of("slta.x", p, {"slta", "slta.merge", "slta.engine.walk"}) == {"slta.merge", "slta.engine.walk"}


def test_no_import_reaches_upward():
    """The layers of LAYERS hold: the engine imports no merge, no merge imports the analysis, nothing
    below the demo imports it, the io imports no engine, every module is placed."""
    bad = upward_imports(graph())
    assert not bad, "imports against LAYERS (tests/test_layout.py):\n" + "\n".join(bad)


def test_every_component_has_modules():
    """A component of LAYERS that holds no module is a stale name (a package renamed or removed)."""
    held = {component_of(m) for m in modules()}
    named = {(i, name) for i, layer in enumerate(LAYERS) for name in layer}
    assert named <= held, f"components of LAYERS with no module: {sorted(named - held)}"


def test_the_layer_check_finds_an_upward_import(tmp_path):
    """A package tree on disk with the layout's shape, where the engine imports a merge (deferred into
    a function), a merge imports the demo, and the zoo imports a sibling command: each is reported,
    and the same tree without them passes."""
    files = {
        "__init__.py": "",
        "config.py": "from slta import hub\n", "hub.py": "",
        "io/__init__.py": "", "io/checkpoint.py": "", "io/inputs.py": "import slta.config\n",
        "engine/__init__.py": "",
        "engine/walk.py": "from slta.io.checkpoint import x\n\ndef f():\n    from slta.merges.write import y\n",
        "merges/__init__.py": "", "merges/write.py": "",
        "merges/closed_form.py": "from slta.engine import walk\nfrom slta.demo.table import z\n",
        "zoo/__init__.py": "", "zoo/build.py": "from slta.io.checkpoint import x\nimport slta.merge\n",
        "merge.py": "from slta.merges.closed_form import y\n",
        "demo/__init__.py": "from slta.demo import table\nfrom slta import merge\n", "demo/table.py": "",
    }
    for rel, text in files.items():
        (tmp_path / "slta" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "slta" / rel).write_text(text)
    bad = upward_imports(graph(tmp_path / "slta"))
    assert bad == [
        "slta.engine.walk (engine, layer 4) imports slta.merges.write (merges, layer 5): a higher layer",
        "slta.merges.closed_form (merges, layer 5) imports slta.demo.table (demo, layer 8): a higher layer",
        "slta.zoo.build (zoo, layer 7) imports slta.merge (merge, layer 7): a sibling in its own layer",
    ], bad
    assert find_cycle(graph(tmp_path / "slta")) is None  # no cycle: only the layers catch these
    # the same tree with the three imports taken out passes
    (tmp_path / "slta/engine/walk.py").write_text("from slta.io.checkpoint import x\n")
    (tmp_path / "slta/merges/closed_form.py").write_text("from slta.engine import walk\n")
    (tmp_path / "slta/zoo/build.py").write_text("from slta.io.checkpoint import x\n")
    assert upward_imports(graph(tmp_path / "slta")) == []
    # a module that no component holds is reported too
    (tmp_path / "slta/extra.py").write_text("")
    assert upward_imports(graph(tmp_path / "slta")) == ["slta.extra: in no component of LAYERS"]


def test_no_module_over_max_lines():
    long = {name: n for name, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"
