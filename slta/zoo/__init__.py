"""The demo model zoo: a small Llama base and three full fine-tunes (math, code, translate)
built from scratch on synthetic data, with held-out exact-match sets and calibration files."""

from slta.zoo.build import SIZES, build_zoo
from slta.zoo.tasks import TASKS

__all__ = ["SIZES", "TASKS", "build_zoo"]
