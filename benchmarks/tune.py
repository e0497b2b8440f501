"""Sweep the launch configs of the Triton kernels on this GPU: ``python -m benchmarks.tune``.

The Triton kernels launch with explicit per-dtype tables (``H100`` in each file of
``triton_kernels/``, ``ROTATE_H100`` in ``_shared.py``), so that a user's first call never
spends minutes autotuning. This script measures a short list of candidates for each table
at the benchmark shapes (``benchmarks/shapes.py``): each candidate is checked against the
torch reference (a wrong config is rejected, not timed), timed (median after warm-up,
CUDA events), and the fastest per kernel is printed as the table entry to keep in the
source, with its time next to the current entry's. Results go to ``--out``/tune.json.

It edits nothing: copy a winner into the kernel file with the figures in the commit message
and in ``benchmarks/RESULTS.md``. ``--max-seconds`` bounds the sweep (a GPU session is
short); candidates left when it is spent are reported as not measured. On a CPU the Triton
interpreter ignores the tables, so ``--smoke`` only exercises the harness.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import default_device, environment
from .bench_ops import _first_call_ms, _measure, _rel_err, make_inputs
from .shapes import OpWorkload, op_workloads, unmatched_workload_filters

HERE = os.path.dirname(os.path.abspath(__file__))
BF16 = torch.bfloat16

# Candidates per table (bf16 entries: the precision the pipeline runs in on a GPU). The
# first of each list is the entry in the source today. Two fp32 accumulators of
# BLOCK_T x BLOCK_C must fit the register file at num_warps, hence no 256-wide tiles for
# factored_scores; stages are bounded by 228 KB of shared memory per SM. The factored_scores
# list holds the configs that compile for sm_90a without spills (ptxas, 2026-11-30), and the
# old entry for comparison.
CANDIDATES: Dict[str, List[dict]] = {
    "factored_scores": [
        dict(BLOCK_T=128, BLOCK_C=128, BLOCK_K=32, num_warps=8, num_stages=5),
        dict(BLOCK_T=128, BLOCK_C=128, BLOCK_K=32, num_warps=8, num_stages=4),
        dict(BLOCK_T=128, BLOCK_C=128, BLOCK_K=32, num_warps=8, num_stages=6),
        dict(BLOCK_T=128, BLOCK_C=64, BLOCK_K=32, num_warps=4, num_stages=4),
        dict(BLOCK_T=64, BLOCK_C=64, BLOCK_K=64, num_warps=4, num_stages=4),
        dict(BLOCK_T=128, BLOCK_C=128, BLOCK_K=64, num_warps=8, num_stages=3),  # the old entry (spills 24 B now)
    ],
    "eigen_correction": [
        dict(BLOCK_I=128, BLOCK_J=128, BLOCK_T=64, num_warps=8, num_stages=4),
        dict(BLOCK_I=128, BLOCK_J=128, BLOCK_T=64, num_warps=8, num_stages=3),
        dict(BLOCK_I=128, BLOCK_J=256, BLOCK_T=64, num_warps=8, num_stages=3),
        dict(BLOCK_I=128, BLOCK_J=64, BLOCK_T=64, num_warps=4, num_stages=4),
        dict(BLOCK_I=64, BLOCK_J=64, BLOCK_T=64, num_warps=4, num_stages=4),
    ],
    "rotate": [
        dict(BLOCK_T=128, BLOCK_C=128, BLOCK_K=64, num_warps=8, num_stages=4),
        dict(BLOCK_T=128, BLOCK_C=256, BLOCK_K=64, num_warps=8, num_stages=3),
        dict(BLOCK_T=128, BLOCK_C=128, BLOCK_K=64, num_warps=4, num_stages=4),
        dict(BLOCK_T=64, BLOCK_C=128, BLOCK_K=64, num_warps=4, num_stages=4),
    ],
    "covariance": [
        dict(BLOCK_D=128, BLOCK_T=64, num_warps=8, num_stages=4),
        dict(BLOCK_D=128, BLOCK_T=64, num_warps=8, num_stages=3),
        dict(BLOCK_D=128, BLOCK_T=32, num_warps=4, num_stages=4),
        dict(BLOCK_D=64, BLOCK_T=64, num_warps=4, num_stages=4),
    ],
}
KERNELS = tuple(CANDIDATES)


def _source(kernel: str):
    """(the dict in the source that holds this kernel's per-dtype launch configs, its Triton kernel)."""
    import triton_kernels.covariance as cov
    import triton_kernels.eigen_correction as eig
    import triton_kernels.factored_scores as fs
    from triton_kernels import _shared

    return {"factored_scores": (fs.H100, fs._factored_scores_kernel),
            "eigen_correction": (eig.H100, eig._eigen_correction_kernel),
            "rotate": (_shared.ROTATE_H100, _shared._rotate_kernel),
            "covariance": (cov.H100, cov._covariance_kernel)}[kernel]


def _table(kernel: str) -> dict:
    return _source(kernel)[0]


def _calls(kernel: str, w: OpWorkload, device) -> Tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor], float]:
    """(Triton call, torch reference call, FLOP) for one kernel at one workload."""
    import pyinf.ops as ops
    from triton_kernels import _shared

    from .shapes import flops

    op = "eigen_correction" if kernel == "rotate" else kernel
    x = make_inputs(op, w, BF16, device)
    if kernel == "rotate":
        # One rotation of the acts into the bf16 eigenbasis, as eigen_correction does it.
        q = x["q_a"].to(BF16)
        out = torch.empty(w.n, w.t, w.d_in, dtype=BF16, device=device)
        fn = lambda: _shared.rotate(x["acts"], x.get("mask"), q, 0, w.d_in, out)  # noqa: E731
        ref = lambda: torch.einsum("ntk,kc->ntc", x["acts"].float(), q.float())  # noqa: E731
        return fn, ref, 2.0 * w.n * w.t * w.d_in * w.d_in
    if kernel == "covariance":
        return (lambda: ops.covariance(x["acts"], backend="triton"),
                lambda: ops.covariance(x["acts"], backend="torch"), w.n * 2.0 * w.t * w.d_in * w.d_in)
    if kernel == "eigen_correction":
        args = (x["acts"], x["grads"], x["q_a"], x["q_s"])
        return (lambda: ops.eigen_correction(*args, backend="triton"),
                lambda: ops.eigen_correction(*args, backend="torch"), flops(op, w))
    args = (x["acts"], x["grads"], x["left"], x["right"])
    return (lambda: ops.factored_scores(*args, backend="triton"),
            lambda: ops.factored_scores(*args, backend="torch"), flops(op, w))


def _op_of(kernel: str) -> str:
    """The op whose benchmark shapes a kernel is swept on."""
    return "eigen_correction" if kernel in ("rotate", "covariance") else kernel


def sweep(kernels=KERNELS, preset: str = "full", workloads: Optional[List[str]] = None, max_seconds: float = 240.0,
          tolerance: float = 2e-2, log=print) -> Dict[str, object]:
    from triton_kernels import _shared

    device = default_device()
    deadline = time.perf_counter() + max_seconds
    # a candidate that does not fit the device must fail, not run with fewer stages under its
    # name (only the swept kernels: the others an op launches keep adapting)
    swept = {_jitted(kernel) for kernel in kernels} - _shared.EXACT_STAGES
    _shared.EXACT_STAGES.update(swept)
    try:
        return _sweep(kernels, preset, workloads, deadline, tolerance, device, log)
    finally:
        _shared.EXACT_STAGES.difference_update(swept)


def _jitted(kernel: str):
    return _source(kernel)[1]


def _sweep(kernels, preset, workloads, deadline, tolerance, device, log) -> Dict[str, object]:
    results: Dict[str, object] = dict(env=environment(device), preset=preset, kernels={})
    for kernel in kernels:
        table = _table(kernel)
        original = dict(table[BF16])
        op = _op_of(kernel)
        entries = []
        try:
            for w in op_workloads(op, preset):
                if workloads and not any(k in w.name for k in workloads):
                    continue
                fn, ref_fn, f = _calls(kernel, w, device)
                ref = ref_fn()
                for i, cfg in enumerate(CANDIDATES[kernel]):
                    rec = dict(workload=w.to_dict(), config=cfg, current=(cfg == original))
                    if time.perf_counter() > deadline:
                        rec["skipped"] = "time budget spent"
                        entries.append(rec)
                        continue
                    table[BF16] = dict(cfg)
                    try:
                        # a synchronised call after an untimed one: each candidate's first call
                        # compiles it, and that time must not stand for (or choose how to time) the kernel
                        first_ms, out = _first_call_ms(fn, device)
                        rec["rel_err"] = _rel_err(out, ref)
                        del out
                        if rec["rel_err"] is None or not rec["rel_err"] < tolerance:
                            rec["rejected"] = f"relative error {rec['rel_err']} vs the torch reference"
                        else:
                            rec.update(_measure(fn, device, preset, f, None, "triton", first_ms))
                    except Exception as exc:  # e.g. out of shared memory: that config is out
                        rec["rejected"] = f"{type(exc).__name__}: {exc}"[:300]
                    entries.append(rec)
                    state = (f"{rec['ms']:9.3f} ms {rec['tflops']:7.1f} TFLOP/s" if "ms" in rec
                             else rec.get("rejected") or rec.get("skipped"))
                    log(f"[tune] {kernel:<16} {w.name:<30} {json.dumps(cfg)} {state}")
                del fn, ref_fn, ref
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        finally:
            table[BF16] = original
        results["kernels"][kernel] = dict(current=original, entries=entries, best=_best(entries, original))
    return results


def _best(entries: List[dict], original: dict) -> Optional[dict]:
    """The candidate with the smallest total time over the workloads where every candidate
    that is compared was measured (so a config is not favoured for skipping a slow shape)."""
    timed: Dict[str, Dict[str, float]] = {}
    for e in entries:
        if "ms" in e:
            timed.setdefault(json.dumps(e["config"], sort_keys=True), {})[e["workload"]["name"]] = e["ms"]
    if not timed:
        return None
    shapes = set.intersection(*(set(v) for v in timed.values()))
    if not shapes:
        return None
    totals = {k: sum(v[s] for s in shapes) for k, v in timed.items()}
    best = min(totals, key=totals.get)
    current = totals.get(json.dumps(original, sort_keys=True))
    return dict(config=json.loads(best), total_ms=totals[best], current_total_ms=current,
                speedup_vs_current=(current / totals[best]) if current else None, workloads=sorted(shapes))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line, checked before anything runs; ``kernel_list`` and
    ``workload_filters`` come back parsed."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {','.join(KERNELS)}")
    ap.add_argument("--workloads", default=None, help="keep workloads whose name contains one of these strings")
    ap.add_argument("--max-seconds", type=float, default=240.0)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: the harness only)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "tune"))
    args = ap.parse_args(argv)
    args.kernel_list = tuple(k.strip() for k in args.kernels.split(",") if k.strip())
    unknown = set(args.kernel_list) - set(KERNELS)
    if unknown:
        ap.error(f"unknown kernel(s) {sorted(unknown)}; choose from {KERNELS}")
    args.workload_filters = [w.strip() for w in args.workloads.split(",") if w.strip()] if args.workloads else None
    unmatched = unmatched_workload_filters(args.workload_filters, {_op_of(k) for k in args.kernel_list},
                                           "smoke" if args.smoke else "full")
    if unmatched:
        ap.error(f"--workloads {','.join(unmatched)} matches no workload of these kernels")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    res = sweep(args.kernel_list, "smoke" if args.smoke else "full", args.workload_filters, args.max_seconds)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tune.json"), "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    for kernel, r in res["kernels"].items():
        b = r["best"]
        if b is None:
            print(f"[tune] {kernel}: nothing measured")
            continue
        gain = f"{b['speedup_vs_current']:.2f}x the current entry" if b["speedup_vs_current"] else "current not measured"
        print(f"[tune] {kernel}: best bf16 entry {b['config']} ({b['total_ms']:.3f} ms over {b['workloads']}; {gain})")
    print(f"[tune] wrote {os.path.join(args.out, 'tune.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
