"""The built-in demo: Ruis et al. (2024)'s experiment in miniature, on a CPU in minutes.

``pyinf demo`` (or :func:`run_demo`) trains a tiny GPT on a synthetic corpus of procedural
and factual documents, fits EK-FAC factors, scores every document for factual and
reasoning queries and reports where the influence comes from.
"""
from .run import DEFAULT_OUT, add_demo_arguments, run_demo, run_from_args

__all__ = ["run_demo", "add_demo_arguments", "run_from_args", "DEFAULT_OUT"]
