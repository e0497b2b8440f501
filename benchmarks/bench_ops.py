"""Kernel benchmarks: every pyinf op x backend (torch, triton, native) x layer shape.

For each call: median milliseconds, TFLOP/s (FLOP formulas of DESIGN.md section 2, see
``benchmarks.shapes.flops``), percent of the matmul peak measured in the same run (bf16
8192^3 on a GPU, fp32 on a CPU), the speed-up over the torch reference backend and over
the literal unfused PyTorch code of DESIGN.md section 3 (two matmuls, multiply, sum), the
peak extra device memory, and the relative error against the torch reference.

Two ways to run it:

- ``python -m benchmarks.run`` (``run_ops``/``run_grouped`` below, own timing loop);
- ``pytest benchmarks/bench_ops.py`` (pytest-benchmark, one test per op x backend x shape;
  preset from ``PYINF_BENCH_PRESET`` = ``full`` | ``smoke``, default ``full`` on a GPU).
"""
from __future__ import annotations

import gc
import os
import time
from typing import Callable, Dict, List, Optional

import torch

import pyinf.ops as ops
from pyinf.ops import _registry

from . import default_device, peak_extra_bytes, sync, time_fn, until_out_of_time
from .shapes import (OPS, PER_TOKEN_OP, GroupedWorkload, OpWorkload, dispatched_op, flops, grouped_workload,
                     op_workloads, peak_matmul_size)

BACKENDS = tuple(ops.BACKENDS)  # ("torch", "triton", "native")
# Ops whose native CUDA kernels run on tensor cores for 16-bit inputs (the default, see
# csrc/include/pyinf/pyinf.h); their fp32 FMA kernels (PYINF_NATIVE_TC=0) are benchmarked
# beside them as the extra variant "native-fma".
TENSOR_CORE_OPS = ("factored_scores", PER_TOKEN_OP, "eigen_correction", "self_influence")


def bench_dtype(device: torch.device) -> torch.dtype:
    """bf16 inputs on a GPU (what the engine feeds the kernels); fp32 on a CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# --------------------------------------------------------------------------------------
# Inputs and calls
# --------------------------------------------------------------------------------------
def make_inputs(op: str, w: OpWorkload, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random inputs of the op's documented shapes. Eigenbases are random matrices scaled
    to unit-ish columns (timing does not depend on orthonormality, and a QR of 11008^2 is
    slow); lambdas are positive."""
    # Generated on the device itself: the Llama dense query tensor alone is 3.6e9 values.
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype).mul_(scale)

    x: Dict[str, torch.Tensor] = {}
    if w.bias:  # the capture's layout for a biased layer: a ones column, rows padded to 16
        from pyinf.capture import _append_ones

        x["acts"] = _append_ones(randn(w.n, w.t, w.d_in - 1))
    else:
        x["acts"] = randn(w.n, w.t, w.d_in)
    x["grads"] = randn(w.n, w.t, w.d_out)
    if op in ("eigen_correction", "self_influence"):
        x["q_a"] = randn(w.d_in, w.d_in, scale=w.d_in ** -0.5)
        x["q_s"] = randn(w.d_out, w.d_out, scale=w.d_out ** -0.5)
    if op == "self_influence":
        x["lambdas"] = torch.rand(w.d_out, w.d_in, generator=g, device=device, dtype=torch.float32).add_(0.1)
    if dispatched_op(op) == "factored_scores":
        x["left"] = randn(w.q, w.d_out, w.r, scale=w.d_out ** -0.5)
        x["right"] = randn(w.q, w.d_in, w.r, scale=w.d_in ** -0.5)
    if op == "dense_scores":
        x["dense"] = randn(w.q, w.d_out, w.d_in, scale=(w.d_in * w.d_out) ** -0.25)
    return x


def tensors_of(op: str, x: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
    """The tensors the registry's capability check looks at for `op`."""
    if op == "covariance":
        return [x["acts"]]
    keys = {"eigen_correction": ("acts", "grads", "q_a", "q_s"),
            "self_influence": ("acts", "grads", "q_a", "q_s", "lambdas"),
            "factored_scores": ("acts", "grads", "left", "right"),
            "dense_scores": ("acts", "grads", "dense")}[dispatched_op(op)]
    return [x[k] for k in keys]


def op_call(op: str, backend: str, x: Dict[str, torch.Tensor]) -> Callable[[], object]:
    """A no-argument callable running `op` on `backend` (through the public dispatcher,
    so input checks are part of what is timed, as in real use)."""
    if op == "covariance":
        # Both factors of one layer: A from the activations, S from the gradients.
        return lambda: (ops.covariance(x["acts"], backend=backend), ops.covariance(x["grads"], backend=backend))
    if op == "eigen_correction":
        return lambda: ops.eigen_correction(x["acts"], x["grads"], x["q_a"], x["q_s"], backend=backend)
    if op == "self_influence":
        return lambda: ops.self_influence(x["acts"], x["grads"], x["q_a"], x["q_s"], x["lambdas"], 0.1,
                                          backend=backend)
    if dispatched_op(op) == "factored_scores":
        per_token = op == PER_TOKEN_OP
        return lambda: ops.factored_scores(x["acts"], x["grads"], x["left"], x["right"], per_token=per_token,
                                           backend=backend)
    if op == "dense_scores":
        return lambda: ops.dense_scores(x["acts"], x["grads"], x["dense"], backend=backend)
    raise ValueError(op)


def sm90_kernel_available(device: torch.device) -> bool:
    """Whether the native Hopper factored-scores kernel is built and this device can run it
    (and gpu_session.sh has not switched it off with PYINF_BENCH_SKIP_SM90=1 after its tests
    failed)."""
    if os.environ.get("PYINF_BENCH_SKIP_SM90") == "1":
        return False
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return False
    try:
        from pyinf import _C
    except ImportError:
        return False
    return bool(getattr(_C, "cuda_sm90_compiled", lambda: False)())


def _unpacked(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with the native backend's packed query factors forgotten before every call, so
    the Hopper kernel packs (copies) them on each call, as it did before they were kept."""
    def run():
        from pyinf.ops import _native

        _native._PACKED.clear()
        return fn()
    return run


def _with_env(key: str, value: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with the environment variable ``key`` set to ``value`` (restored after)."""
    def run():
        old = os.environ.get(key)
        os.environ[key] = value
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
    return run


def unfused_call(op: str, x: Dict[str, torch.Tensor]) -> Optional[Callable[[], torch.Tensor]]:
    """The literal unfused PyTorch code of DESIGN.md section 3, in the inputs' dtype with an
    fp32 product (None for ops where the torch reference already is that code)."""
    acts, grads = x["acts"], x["grads"]
    n, t, d_in = acts.shape
    d_out = grads.shape[-1]
    if dispatched_op(op) == "factored_scores":
        q, _, r = x["left"].shape
        left_cols = x["left"].permute(1, 0, 2).reshape(d_out, q * r).contiguous()
        right_cols = x["right"].permute(1, 0, 2).reshape(d_in, q * r).contiguous()
        summed = (3,) if op == PER_TOKEN_OP else (1, 3)  # per token: over the rank only

        def run():
            gl = grads @ left_cols  # two matmuls ...
            ar = acts @ right_cols
            return (gl.float() * ar.float()).view(n, t, q, r).sum(summed)  # ... multiply, sum
        return run
    if op == "dense_scores":
        p_flat = x["dense"].reshape(x["dense"].shape[0], -1)

        def run():
            dw = torch.bmm(grads.transpose(1, 2), acts)  # the N x d_out x d_in temporary, input dtype
            return (dw.reshape(n, -1) @ p_flat.T).float()
        return run
    if op in ("eigen_correction", "self_influence"):
        q_a, q_s = x["q_a"], x["q_s"]
        inv = (1.0 / (x["lambdas"] + 0.1)) if op == "self_influence" else None

        def run():
            a_rot = acts @ q_a  # rotate
            g_rot = grads @ q_s
            dw = torch.bmm(g_rot.transpose(1, 2), a_rot).float()  # bmm: the N x d_out x d_in temporary
            if inv is None:
                return dw.square().sum(0)  # square, sum
            return (dw.square() * inv).sum((1, 2))
        return run
    return None


def _rel_err(out, ref) -> Optional[float]:
    if isinstance(out, (tuple, list)):
        errs = [_rel_err(o, r) for o, r in zip(out, ref)]
        return max(e for e in errs if e is not None) if errs else None
    if not isinstance(out, torch.Tensor):
        return None
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    if not torch.isfinite(out).all():
        return float("nan")
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------
# The matmul peak
# --------------------------------------------------------------------------------------
def measure_peak(device: torch.device, preset: str, log=print) -> Dict[str, object]:
    """bf16 8192^3 matmul on a GPU (the denominator of '% of peak'); fp32 on a CPU."""
    size = peak_matmul_size(device.type, preset)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timing = time_fn(lambda: a @ b, device, warmup=5 if device.type == "cuda" else 1, min_reps=5 if device.type == "cuda" else 3,
                     target_s=1.0 if device.type == "cuda" else 0.2)
    tflops = 2.0 * size ** 3 / (timing["ms"] * 1e-3) / 1e12
    log(f"[peak] {dtype} matmul {size}^3: {timing['ms']:.3f} ms = {tflops:.1f} TFLOP/s")
    del a, b
    _free(device)
    return dict(size=size, dtype=str(dtype).replace("torch.", ""), ms=timing["ms"], tflops=tflops)


# --------------------------------------------------------------------------------------
# The op suite
# --------------------------------------------------------------------------------------
def _interpreted(device, backend) -> bool:
    """Triton on a CPU runs in its interpreter: exercised for correctness, timed once."""
    return device.type == "cpu" and backend == "triton"


def _timing_kwargs(device, preset, backend=None):
    if device.type == "cuda":
        return dict(warmup=3, min_reps=10, max_reps=200, target_s=0.5)
    if preset == "smoke":
        return dict(warmup=1, min_reps=3, max_reps=20, target_s=0.02)
    return dict(warmup=2, min_reps=5, max_reps=50, target_s=0.3)


# A call slower than this is timed once more instead of a dozen times (a GPU session has a
# few minutes in all: the fp32-FMA native kernel at the Llama scoring shape takes tens of
# seconds per call, and its order of magnitude is what matters there).
SLOW_CALL_MS = 3000.0
# On a GPU, a call of more than 0.3 s is timed with one warm-up and three repetitions (its
# launch overhead is nothing next to it, and the Llama shapes would otherwise take minutes).
LONG_CALL_MS = 300.0
# A variant whose call is predicted (from its FLOP rate at an earlier, smaller workload of
# the same op) to take longer than this is skipped with the prediction as the reason.
MAX_PREDICTED_S = 30.0


def _first_call_ms(fn, device):
    """(ms, result) of one synchronised call after an untimed one on a GPU: the first call of
    a shape compiles (Triton JIT) and an unsynchronised one times only the launches, and this
    time chooses how the variant is timed (LONG_CALL_MS, SLOW_CALL_MS)."""
    if device.type == "cuda":
        fn()
        sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3, out


def _result_bytes(out) -> int:
    if isinstance(out, (tuple, list)):
        return sum(_result_bytes(o) for o in out)
    return out.numel() * out.element_size() if isinstance(out, torch.Tensor) else 0


def _measure(fn, device, preset, label_flops, peak_tflops, backend=None, first_ms=None):
    if first_ms is not None and (_interpreted(device, backend) or first_ms > SLOW_CALL_MS):
        # the first call's own (synchronised, on a GPU warm) time: one more slow call buys nothing
        timing = dict(ms=first_ms, p20_ms=first_ms, p80_ms=first_ms, min_ms=first_ms, reps=1)
    elif device.type == "cuda" and first_ms is not None and first_ms > LONG_CALL_MS:
        timing = time_fn(fn, device, warmup=0, min_reps=3, max_reps=3, target_s=0.0)  # _first_call_ms warmed it
    else:
        timing = time_fn(fn, device, **_timing_kwargs(device, preset, backend))
    rec = dict(timing)
    rec["tflops"] = label_flops / (timing["ms"] * 1e-3) / 1e12
    rec["pct_peak"] = 100.0 * rec["tflops"] / peak_tflops if peak_tflops else None
    rec["peak_extra_mb"] = rec["temp_mb"] = None
    mem = peak_extra_bytes(fn, device, with_result=True) if timing["reps"] > 1 else None  # not one more slow call
    if mem is not None:
        peak, result = mem
        rec["peak_extra_mb"] = peak / 2**20
        rec["temp_mb"] = (peak - _result_bytes(result)) / 2**20  # the temporaries: the op's own output left out
    return rec


def run_ops(preset: str, device: Optional[torch.device] = None, *, peak: Optional[Dict[str, object]] = None,
            backends=BACKENDS, ops_to_run=OPS, workloads: Optional[List[str]] = None, log=print) -> Dict[str, object]:
    """Every op x backend x workload that can run here. Returns ``records`` (one per timed
    call, the torch reference and the literal unfused code included) and ``skipped``
    (backend, op, workload, why). ``workloads``: keep only workloads whose name contains
    one of these strings (all when None)."""
    device = device or default_device()
    dtype = bench_dtype(device)
    peak = peak or measure_peak(device, preset, log)
    peak_tflops = float(peak["tflops"])
    records, skipped = [], []
    rate: Dict[tuple, float] = {}  # (op, variant) -> FLOP/s measured at an earlier workload
    with until_out_of_time(skipped, op="-", backend="(the rest)", workload="-"):
        for op in ops_to_run:
            for w in op_workloads(op, preset):
                if workloads and not any(k in w.name for k in workloads):
                    continue
                x = make_inputs(op, w, dtype, device)
                f = flops(op, w)
                ref_out = op_call(op, "torch", x)()
                variants = [("torch", op_call(op, "torch", x))]
                unf = unfused_call(op, x)
                if unf is not None:
                    variants.append(("unfused", unf))
                for name in backends:
                    if name == "torch":
                        continue
                    reason = _registry.unsupported_reason(name, dispatched_op(op), tensors_of(op, x))
                    if reason is None and device.type == "cpu" and name == "triton" and preset != "smoke":
                        reason = "Triton on CPU runs in the interpreter; only the smoke preset exercises it"
                    if reason is not None:
                        skipped.append(dict(op=op, backend=name, workload=w.name, reason=reason))
                        continue
                    variants.append((name, op_call(op, name, x)))
                    if name == "native" and op in TENSOR_CORE_OPS and device.type == "cuda":
                        # The FMA kernels (PYINF_NATIVE_TC=0), side by side with the tensor-core default.
                        variants.append(("native-fma", _with_env("PYINF_NATIVE_TC", "0", op_call(op, name, x))))
                    if name == "native" and dispatched_op(op) == "factored_scores" and sm90_kernel_available(device):
                        # The Hopper TMA + wgmma kernel, opt-in until these numbers say it wins.
                        variants.append(("native-sm90", _with_env("PYINF_NATIVE_SM90", "1", op_call(op, name, x))))
                        # its other K-loop modes: waiting for every K step's wgmma (what keeping one in
                        # flight buys), and TMA from a producer warpgroup (what warp specialisation buys)
                        for mode in ("wait0", "ws"):
                            variants.append((f"native-sm90-{mode}",
                                             _with_env("PYINF_NATIVE_SM90", mode, op_call(op, name, x))))
                        # the factor copy on every call, as before packed factors (RESULTS row 27)
                        variants.append(("native-sm90-copy",
                                         _with_env("PYINF_NATIVE_SM90", "1", _unpacked(op_call(op, name, x)))))
                for name, fn in variants:
                    if (op, name) in rate and f / rate[(op, name)] > MAX_PREDICTED_S:
                        why = (f"predicted {f / rate[(op, name)]:.0f} s per call from its rate at a smaller shape "
                               f"(over the {MAX_PREDICTED_S:.0f} s budget of one call)")
                        skipped.append(dict(op=op, backend=name, workload=w.name, reason=why))
                        log(f"[ops] {op:<17} {w.name:<30} {name:<8} skipped: {why}")
                        continue
                    try:
                        first_ms, out = _first_call_ms(fn, device)
                        err = _rel_err(out, ref_out)
                        del out
                        rec = _measure(fn, device, preset, f, peak_tflops, name, first_ms)
                    except Exception as exc:  # a backend failing must not stop the suite
                        skipped.append(dict(op=op, backend=name, workload=w.name,
                                            reason=f"failed: {type(exc).__name__}: {exc}"[:500]))
                        log(f"[ops] {op:<17} {w.name:<30} {name:<8} FAILED {type(exc).__name__}: {exc}")
                        _free(device)
                        continue
                    rate[(op, name)] = f / (rec["ms"] * 1e-3)
                    rec.update(op=op, backend=name, workload=w.to_dict(), dtype=str(dtype).replace("torch.", ""),
                               flops=f, rel_err_vs_torch=err)
                    records.append(rec)
                    log(f"[ops] {op:<17} {w.name:<30} {name:<8} {rec['ms']:9.3f} ms {rec['tflops']:8.2f} TFLOP/s"
                        f"  err {err if err is not None else float('nan'):.1e}")
                del x, ref_out, variants
                _free(device)
    _add_speedups(records, dict(speedup_vs_torch="torch", speedup_vs_unfused="unfused"),
                  lambda r: (r["op"], r["workload"]["name"], r["backend"]))
    # the peak this section's "% peak" divides by (sections of separate runs have their own)
    return dict(dtype=str(dtype).replace("torch.", ""), records=records, skipped=skipped, peak=peak)


def _add_speedups(records, baselines: Dict[str, str], key) -> None:
    """For each ``field: baseline`` of `baselines`, ``rec[field]`` = the baseline's ms over
    the record's. ``key(rec)`` is (what is compared..., variant): records that agree on all
    but the variant are compared. None where the baseline was not measured (or the run was
    stopped before it)."""
    ms = {key(r): r["ms"] for r in records}
    for rec in records:
        for field, baseline in baselines.items():
            base = ms.get(key(rec)[:-1] + (baseline,))
            rec[field] = base / rec["ms"] if base else None


# --------------------------------------------------------------------------------------
# Grouped scoring: all MLP layers of a model in one call vs a per-layer loop
# --------------------------------------------------------------------------------------
def _grouped_problems(gw: GroupedWorkload, dtype, device):
    problems = []
    for i, w in enumerate(gw.per_layer()):
        x = make_inputs("factored_scores", w, dtype, device, seed=i)
        problems.append(dict(acts=x["acts"], grads=x["grads"], left=x["left"], right=x["right"]))
    return problems


def run_grouped(preset: str, device: Optional[torch.device] = None, *, peak=None, backends=BACKENDS,
                log=print) -> Dict[str, object]:
    """``factored_scores_grouped`` on each backend, against per-layer loops: the torch
    reference per layer (the baseline), the literal unfused code per layer, and each fused
    backend's single-layer ``factored_scores`` per layer."""
    device = device or default_device()
    dtype = bench_dtype(device)
    peak = peak or measure_peak(device, preset, log)
    gw = grouped_workload(preset)
    problems = _grouped_problems(gw, dtype, device)
    f = gw.flops()
    ref = ops.factored_scores_grouped(problems, backend="torch")
    variants = [("loop:torch", lambda: [ops.factored_scores(p["acts"], p["grads"], p["left"], p["right"], backend="torch")
                                        for p in problems])]
    unfused = [unfused_call("factored_scores", p) for p in problems]
    variants.append(("loop:unfused", lambda: [u() for u in unfused]))
    skipped = []
    all_tensors = [t for p in problems for t in (p["acts"], p["grads"], p["left"], p["right"])]
    for name in backends:
        reason = _registry.unsupported_reason(name, "factored_scores_grouped", all_tensors)
        if reason is None and device.type == "cpu" and name == "triton" and preset != "smoke":
            reason = "Triton on CPU runs in the interpreter; only the smoke preset exercises it"
        if reason is not None:
            skipped.append(dict(op="factored_scores_grouped", backend=name, workload=gw.name, reason=reason))
        else:
            variants.append((f"grouped:{name}", (lambda n: lambda: ops.factored_scores_grouped(problems, backend=n))(name)))
        if name != "torch":
            reason1 = _registry.unsupported_reason(name, "factored_scores", all_tensors[:4])
            if reason1 is None and not (device.type == "cpu" and name == "triton" and preset != "smoke"):
                variants.append((f"loop:{name}", (lambda n: lambda: [
                    ops.factored_scores(p["acts"], p["grads"], p["left"], p["right"], backend=n) for p in problems])(name)))
    records = []
    with until_out_of_time(skipped, op="factored_scores_grouped", backend="(the rest)", workload=gw.name):
        for name, fn in variants:
            try:
                first_ms, out = _first_call_ms(fn, device)
                err = _rel_err(list(out), list(ref))
                del out
                rec = _measure(fn, device, preset, f, float(peak["tflops"]), name.split(":")[-1], first_ms)
            except Exception as exc:
                skipped.append(dict(op="factored_scores_grouped", backend=name, workload=gw.name,
                                    reason=f"failed: {type(exc).__name__}: {exc}"[:500]))
                log(f"[grouped] {name:<16} FAILED {type(exc).__name__}: {exc}")
                continue
            rec.update(variant=name, flops=f, rel_err_vs_torch=err, dtype=str(dtype).replace("torch.", ""))
            records.append(rec)
            log(f"[grouped] {gw.name} {name:<16} {rec['ms']:9.3f} ms {rec['tflops']:8.2f} TFLOP/s")
    # the unfused loop is issue 3's baseline ("the per-layer PyTorch loop"); the fp32 reference
    # loop is slower still, and each fused backend's own loop shows what grouping alone buys
    _add_speedups(records, dict(speedup_vs_torch_loop="loop:torch", speedup_vs_unfused_loop="loop:unfused"),
                  lambda r: (r["variant"],))
    for rec in records:
        kind, _, backend = rec["variant"].partition(":")
        own = next((o for o in records if o["variant"] == f"loop:{backend}"), None)
        rec["speedup_vs_own_loop"] = own["ms"] / rec["ms"] if kind == "grouped" and own is not None else None
    workload = dict(name=gw.name, layers=[list(x) for x in gw.layers], n=gw.n, t=gw.t, q=gw.q, r=gw.r)
    del problems, ref
    _free(device)
    return dict(workload=workload, records=records, skipped=skipped, peak=peak)


# --------------------------------------------------------------------------------------
# pytest-benchmark entry points: pytest benchmarks/bench_ops.py [--benchmark-json=...]
# --------------------------------------------------------------------------------------
def _preset() -> str:
    return os.environ.get("PYINF_BENCH_PRESET", "full" if torch.cuda.is_available() else "smoke")


def _params():
    import pytest

    out = []
    for op in OPS:
        for w in op_workloads(op, _preset()):
            for backend in BACKENDS + ("unfused",):
                if backend == "unfused" and op not in ("factored_scores", "eigen_correction", "self_influence"):
                    continue
                out.append(pytest.param(op, w, backend, id=f"{op}-{w.name.replace(' ', '_')}-{backend}"))
    return out


try:
    import pytest

    @pytest.mark.parametrize("op,workload,backend", _params())
    def test_op(benchmark, op, workload, backend):
        device = default_device()
        x = make_inputs(op, workload, bench_dtype(device), device)
        if backend == "unfused":
            call = unfused_call(op, x)
        else:
            reason = _registry.unsupported_reason(backend, op, tensors_of(op, x))
            if reason is not None:
                pytest.skip(reason)
            call = op_call(op, backend, x)

        def run():
            out = call()
            sync(device)
            return out

        run()
        benchmark.extra_info.update(op=op, backend=backend, workload=workload.to_dict(), flops=flops(op, workload))
        benchmark.pedantic(run, rounds=20 if device.type == "cuda" else 3, warmup_rounds=3 if device.type == "cuda" else 1)
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)  # None under --benchmark-disable
        if stats is not None and stats.median > 0:
            benchmark.extra_info["tflops"] = flops(op, workload) / stats.median / 1e12
except ImportError:  # pytest is a dev dependency; run.py does not need it
    pass
