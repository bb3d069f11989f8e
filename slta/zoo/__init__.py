"""The demo model zoo: a small Llama base and three full fine-tunes (math, code, translate)
built from scratch on synthetic data, with held-out exact-match sets and calibration files.
Two kinds: ``hard`` (a prompt format per task) and ``chat`` (one chat template, fixed epochs)."""

from slta.zoo.build import KINDS, SIZES, build_zoo
from slta.zoo.tasks import TASKS

__all__ = ["KINDS", "SIZES", "TASKS", "build_zoo"]
