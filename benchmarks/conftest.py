"""pytest configuration for ``pytest benchmarks/bench_ops.py`` (pytest-benchmark).

The preset comes from ``PYINF_BENCH_PRESET`` (``full`` on a GPU by default, ``smoke``
otherwise). Triton runs through its interpreter on a machine without CUDA; that choice must
be made before triton is imported, hence here and in ``benchmarks/__init__.py``.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("PYINF_BENCH_PRESET", "smoke")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
