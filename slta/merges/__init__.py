"""Each merge as a client of the streaming engine: the closed form (merge_method slta) with its options
beyond the paper, writing per-module α, the statistics file and `slta solve`; RegMean and RegMean++;
the data-free methods (their formulas are slta.methods); `slta merge --dry-run`'s memory estimate.
"""

import slta


def __getattr__(name: str) -> object:
    """Every submodule of this package, imported on first use (as in slta/__init__.py)."""
    return slta._submodule(__name__, name)
