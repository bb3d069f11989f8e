"""slta: submodule-linearity task arithmetic for merging fine-tuned LLMs."""

__version__ = "0.1.0"
