"""Measured backend preferences for ``backend="auto"`` on CUDA devices.

``MEASURED`` says, per op, which backend was fastest up to a size of call, as measured by
the kernel benchmarks (``benchmarks/bench_ops.py``; for ``factored_scores_grouped``, its
grouped section) on the device named in ``SOURCE``. The
size of a call is its FLOP count (``work``; the formulas of DESIGN.md section 2), and a rule
``(bound, backend)`` applies to calls of at most ``bound`` FLOP (None: any size); the first
rule that applies wins. An empty table means nothing has been measured yet, and auto uses
the registry's default order (fused Triton first).

``EIGH_WORKERS`` is the fit's default number of eigendecompositions run at once on CUDA
(:mod:`pyinf.eigen`), from the same run's ``eigh`` benchmark; None until measured.

Do not edit the table by hand: ``python -m benchmarks.preferences RESULTS_JSON --write`` writes it
from a GPU run's ``results.json`` (bounds halfway, geometrically, between the measured
shapes where the winner changes). Keep entries only for what was measured.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

# >>> measured table (written by benchmarks/preferences.py)
# Where the table comes from: device, versions, date, results file. Empty: no measurement.
SOURCE = ""
# op -> [(upper bound on the call's FLOP or None, backend)]; first applicable rule wins.
MEASURED: Dict[str, List[Tuple[Optional[float], str]]] = {}
# The fit's eigh_workers on CUDA (pyinf.eigen) when not given; None: not measured (1).
EIGH_WORKERS: Optional[int] = None
# <<< measured table


def work(op: str, shape: Dict[str, int]) -> float:
    """FLOP of one call of `op` with the dispatcher's shape dict (DESIGN.md section 2)."""
    n, t = shape.get("n", 1), shape.get("t", 1)
    if op == "covariance":
        return 2.0 * n * t * shape.get("d", 0) ** 2
    d_in, d_out = shape.get("d_in", 0), shape.get("d_out", 0)
    if op in ("eigen_correction", "self_influence"):
        return 2.0 * n * t * (d_in * d_in + d_out * d_out + d_in * d_out)
    if op == "factored_scores":
        return 2.0 * n * t * (d_in + d_out) * shape.get("q", 0) * shape.get("r", 0)
    if op == "dense_scores":
        return 2.0 * n * (t * d_in * d_out + d_in * d_out * shape.get("q", 0))
    return 0.0


def preferred(op: str, shape: Dict[str, int], table: Optional[Dict[str, List[Tuple[Optional[float], str]]]] = None
              ) -> Optional[str]:
    rules = (MEASURED if table is None else table).get(op, [])
    if not rules:
        return None
    size = work(op, shape)
    for bound, backend in rules:
        if bound is None or size <= bound:
            return backend
    return None
