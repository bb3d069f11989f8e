"""slta: submodule-linearity task arithmetic for merging fine-tuned LLMs.

The Python API is the command line's, under the same names (SPEC section 1)::

    import slta
    slta.merge("merge.yml", "./merged")                 # slta merge CONFIG -o OUT   (slta.merge.run_merge)
    slta.solve("./merged", "./subset", models=[0, 1])   # slta solve STATS -o OUT    (slta.merges.stats.run_solve)
    slta.analyze("merge.yml", "./linearity")            # slta analyze CONFIG -o DIR
                                                        #                 (slta.analysis.linearity.run_analyze)
    slta.evaluate("./merged", ["math.jsonl"])           # slta eval MODEL --tasks .. (slta.evaluate.evaluate)

Each takes the arguments of the function named on its right (see its docstring). `slta.merge`,
`slta.solve` and `slta.evaluate` are also the modules of those names (`slta.merge.run_merge`,
`slta.solve.solve_module`, ...), and every submodule is reachable as an attribute after a plain
`import slta`, in the subpackages too (`slta.merges.stats`, `slta.io.checkpoint`). Importing slta itself is cheap: nothing (torch, transformers) is loaded until used.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# API name -> (module, function): the function behind each command.
_COMMANDS = {"merge": ("slta.merge", "run_merge"), "solve": ("slta.merges.stats", "run_solve"),
             "analyze": ("slta.analysis.linearity", "run_analyze"), "evaluate": ("slta.evaluate", "evaluate")}


def _command(name: str) -> object:
    module, function = _COMMANDS[name]
    return getattr(importlib.import_module(module), function)


class _Command(types.ModuleType):
    """A module that is also its command: `slta.merge(...)` is `slta.merge.run_merge(...)`."""

    def __call__(self, *args: object, **kwargs: object) -> object:
        """Run the command this module is named after (see `slta.COMMANDS`)."""
        return _command(self.__name__.rpartition(".")[2])(*args, **kwargs)


def _as_command(module_name: str) -> None:
    """Make module `slta.NAME` callable as the command NAME (called at the end of that module)."""
    sys.modules[module_name].__class__ = _Command


def analyze(*args: object, **kwargs: object) -> object:
    """`slta analyze CONFIG -o DIR`: see slta.analysis.linearity.run_analyze (same arguments)."""
    return _command("analyze")(*args, **kwargs)


def _submodule(package: str, name: str) -> types.ModuleType:
    """`package.name` imported on first use (the subpackages' `__getattr__` too); AttributeError if none."""
    if name.startswith("_"):
        raise AttributeError(name)
    try:
        return importlib.import_module(f"{package}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{package}.{name}":
            raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}") from None


def __getattr__(name: str) -> object:
    """`slta.COMMANDS` and every submodule (`slta.merge`, `slta.merges`, ...), imported on first use."""
    if name == "COMMANDS":
        return {k: _command(k) for k in _COMMANDS}
    return _submodule(__name__, name)
