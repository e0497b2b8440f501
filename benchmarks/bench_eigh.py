"""The eigendecompositions of a fit, one after another and split over workers (:mod:`pyinf.eigen`).

The matrices have the end-to-end workload's factor shapes: per layer, A and S of the two MLP
linears (``dense_h_to_4h``: A ``(h+1)^2`` with the bias column, S ``(4h)^2``;
``dense_4h_to_h``: A ``(4h+1)^2``, S ``h^2``), float64, built like covariances
(``x^T x / rows`` with decaying column scales). Each variant is timed on the wall clock,
device synchronised, because ``eigh`` waits for the host itself; the first call of each size
is left out (cuSOLVER set-up). Every variant's output is compared bit for bit with the
one-after-another run.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import torch

from . import sync, until_out_of_time
from .shapes import ModelConfig, e2e_workload

WORKERS_FULL = (1, 2, 4, 8)
WORKERS_SMOKE = (1, 2)
LONG_RUN_S = 5.0  # a variant slower than this is timed once


def factor_sizes(model: ModelConfig) -> List[int]:
    h, f = model.hidden_size, model.intermediate_size
    return [h + 1, f, f + 1, h] * model.num_hidden_layers


def _matrices(sizes: List[int], device: torch.device, seed: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for i, n in enumerate(sizes):
        rows = 2 * n
        x = torch.randn(rows, n, generator=g, device=device, dtype=torch.float64)
        x *= torch.logspace(0, -3, n, device=device, dtype=torch.float64)
        out[f"factor {i} ({n}x{n})"] = x.T @ x / rows
    return out


def _wall(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def run_eigh(preset: str, device: torch.device, log=print) -> Dict[str, object]:
    from pyinf.eigen import eigendecompose

    model = e2e_workload(preset).model
    sizes = factor_sizes(model)
    mats = _matrices(sizes, device, seed=0)
    workers_list = WORKERS_FULL if preset == "full" else WORKERS_SMOKE
    reps = 3

    per_size = {}
    for n in sorted(set(sizes)):  # first call of each size: set-up, untimed; then one timed
        m = next(v for v in mats.values() if v.shape[0] == n)
        torch.linalg.eigh(m)
        per_size[n] = _wall(lambda: torch.linalg.eigh(m), device) * 1e3
    log(f"[eigh] {len(sizes)} float64 matrices, one eigh each: " + ", ".join(
        f"{n}: {ms:.1f} ms" for n, ms in per_size.items()))

    serial = eigendecompose(mats, workers=1)
    runs: List[Dict[str, object]] = []
    skipped: List[Dict[str, object]] = []
    # the step's time limit keeps the worker counts measured so far (1 first: the base)
    with until_out_of_time(skipped, what="the remaining worker counts"):
        for workers in workers_list:
            got = None

            def call():
                nonlocal got
                got = eigendecompose(mats, workers=workers)

            samples = [_wall(call, device)]
            while len(samples) < reps and samples[0] < LONG_RUN_S:
                samples.append(_wall(call, device))
            same = all(torch.equal(got[k][0], serial[k][0]) and torch.equal(got[k][1], serial[k][1]) for k in mats)
            runs.append(dict(workers=workers, s=statistics.median(samples), min_s=min(samples), reps=len(samples),
                             identical=same))
            log(f"[eigh] workers={workers}: {runs[-1]['s']:.3f} s (median of {len(samples)}), same bits: {same}")
    base = runs[0]["s"] if runs else None
    for r in runs:
        r["speedup"] = base / r["s"] if r["s"] > 0 else None
    return dict(sizes=sizes, n_matrices=len(sizes), per_size_ms={str(k): v for k, v in per_size.items()},
                sum_of_single_s=sum(per_size[n] for n in sizes) / 1e3, runs=runs, skipped=skipped)
