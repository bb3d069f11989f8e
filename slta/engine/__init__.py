"""The streaming engine (walk.py): one walk over the model's tensor groups, the T+1 versions of one layer
in memory at a time, and what its data-driven clients share: calibration data, response-token
positions, feature differences and Grams, transformers' mask functions across releases.

The engine's clients live above it, in slta.merges and slta.analysis; the engine imports none of them
(tests/test_layout.py).
"""

import slta


def __getattr__(name: str) -> object:
    """Every submodule of this package, imported on first use (as in slta/__init__.py)."""
    return slta._submodule(__name__, name)
