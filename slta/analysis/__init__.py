"""Looking at merges and fine-tunes: the linearity analysis (`slta analyze`: scores, its engine passes,
the CLI), the per-module diagnostics of a closed-form merge (`slta diagnose`) and the paper's figures
(`slta report`).
"""

import slta


def __getattr__(name: str) -> object:
    """Every submodule of this package, imported on first use (as in slta/__init__.py)."""
    return slta._submodule(__name__, name)
