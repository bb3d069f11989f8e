"""Models in and out: checkpoints and LoRA adapters read lazily, the model's architecture and
module cut, the checked inputs of a merge; the output folder, its model card and the resume journal.

Below the engine: nothing here imports slta.engine, slta.merges, slta.analysis or the demo
(tests/test_layout.py).
"""

import slta


def __getattr__(name: str) -> object:
    """Every submodule of this package, imported on first use (as in slta/__init__.py)."""
    return slta._submodule(__name__, name)
