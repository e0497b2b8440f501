"""Measured backend preferences for ``backend="auto"`` on CUDA devices.

Each entry says which backend was faster for an op in a range of shapes, as measured by
``benchmarks/bench_ops.py`` on the device named in ``benchmarks/RESULTS.md``. An empty
table means no measurement has been recorded yet, and auto uses the registry's default
order (fused Triton first). Keep entries only for what was measured.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

# op -> list of (predicate on the shape dict, backend). First match wins.
PREFERENCES: Dict[str, List[Tuple[object, str]]] = {}


def preferred(op: str, shape: Dict[str, int]) -> Optional[str]:
    for predicate, backend in PREFERENCES.get(op, []):
        if predicate(shape):
            return backend
    return None
