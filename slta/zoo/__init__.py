"""The demo model zoo: a base and three full fine-tunes (math, code, translate), with held-out
exact-match sets and calibration files. Three kinds: ``hard`` (a small Llama pre-trained here, a
prompt format per task), ``chat`` (the same base, one chat template, fixed epochs) and ``smollm2``
(a real LLM, SmolLM2-135M-Instruct from PyPI, fine-tuned in its own chat template)."""

from slta.zoo.build import KINDS, SIZES, build_zoo
from slta.zoo.tasks import TASKS

__all__ = ["KINDS", "SIZES", "TASKS", "build_zoo"]
