"""Run the whole benchmark suite on this machine: ``python -m benchmarks.run [--smoke] [--out DIR]``.

Writes ``results.json`` and PNG plots under ``--out`` (default ``benchmarks/results/<tag>``,
tag ``cpu-smoke``, ``cuda-full``, ...), and a markdown report into ``benchmarks/RESULTS.md``
between the marker comments ``<!-- pyinf-bench:begin <tag> -->`` and
``<!-- pyinf-bench:end <tag> -->`` (created at the end of the file when missing). Everything
outside the markers, hand-written notes included, is left as it is; each tag has its own
block, so a CPU smoke run never overwrites the GPU numbers. ``results.json`` is also saved
after each section (marked ``"partial": true``), so a run killed in a later section keeps the
sections it finished; sections of an earlier run in the same folder that this one skips (or
has not finished) are carried over.

``--smoke`` runs tiny sizes (seconds on a CPU; the timings mean nothing, the code paths and
the pyinf-vs-kronfluence agreement do). Without it the sizes of the benchmark issue run,
meant for one H100 (the full suite takes several minutes there; ``--only`` runs parts).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time
import warnings
from typing import Dict, List, Optional

import torch

from . import OutOfTime, default_device, environment, out_of_time, stop_on_sigterm
from .bench_e2e import KRONFLUENCE_PRECISION
from .shapes import OPS

HERE = os.path.dirname(os.path.abspath(__file__))
SECTIONS = ("ops", "grouped", "head", "eigh", "e2e", "scaling")
BEGIN = "<!-- pyinf-bench:begin {tag} -->"
END = "<!-- pyinf-bench:end {tag} -->"


def _log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------
def run_all(preset: str, sections=SECTIONS, backends=None, scaling_axes=None, with_kronfluence=True,
            with_floor=True, ops_to_run=None, workloads=None, e2e_quick=False, log=_log,
            after_section=None) -> Dict[str, object]:
    """Runs the sections; ``after_section(res)``, if given, is called after each one (the
    command line saves what is finished, so that a run killed in a later section keeps it)."""
    from . import bench_ops
    from .shapes import e2e_workload, scaling_plan

    device = default_device()
    res: Dict[str, object] = dict(preset=preset, started=_dt.datetime.now().isoformat(timespec="seconds"),
                                  env=environment(device), sections=list(sections), seconds={})
    backends = tuple(backends or bench_ops.BACKENDS)
    from pyinf.ops import available_backends

    res["backends_available"] = available_backends()

    res["section_meta"] = {}

    def timed(name, fn):
        if name in SECTIONS:
            res["section_meta"][name] = dict(at=_dt.datetime.now().isoformat(timespec="seconds"),
                                             git=res["env"].get("git"))
        t0 = time.perf_counter()
        if out_of_time():  # an earlier section was stopped by the time limit: start no other
            out = dict(error="not run: the step's time limit was reached before this section")
        else:
            try:
                out = fn()
            except OutOfTime as exc:  # a section that does not keep partial results itself
                out = dict(error=f"out of time: {exc}")
            except Exception as exc:  # one broken section must not lose the others
                import traceback

                traceback.print_exc()
                out = dict(error=f"{type(exc).__name__}: {exc}"[:1000])
            res["seconds"][name] = time.perf_counter() - t0
        if name in SECTIONS:  # the section's result, in `res` before after_section sees it
            res[name] = out
            if after_section is not None:
                after_section(res)
        return out

    if "ops" in sections or "grouped" in sections:
        res["peak"] = timed("peak", lambda: bench_ops.measure_peak(device, preset, log))
    if "ops" in sections:
        timed("ops", lambda: bench_ops.run_ops(
            preset, device, peak=res["peak"], backends=backends, ops_to_run=tuple(ops_to_run or bench_ops.OPS),
            workloads=workloads, log=log))
    if "grouped" in sections:
        timed("grouped", lambda: bench_ops.run_grouped(preset, device, peak=res["peak"], backends=backends, log=log))
    if "head" in sections:
        from . import bench_head

        timed("head", lambda: bench_head.run_head(preset, device, log=log))
    if "eigh" in sections:
        from . import bench_eigh

        timed("eigh", lambda: bench_eigh.run_eigh(preset, device, log=log))
    if "e2e" in sections:
        from . import bench_e2e

        wl = e2e_workload(preset)
        if e2e_quick:  # what a short GPU session can afford: no fp32 kronfluence row, one floor batch
            from dataclasses import replace

            wl = replace(wl, kronfluence_fp32=False, floor_batch_sizes=wl.floor_batch_sizes[1:2] or wl.floor_batch_sizes)
        timed("e2e", lambda: bench_e2e.run_e2e(wl, device, log=log, with_kronfluence=with_kronfluence,
                                               with_floor=with_floor))
    if "scaling" in sections:
        from . import bench_e2e

        plan = scaling_plan(preset)
        axes = scaling_axes or ("n_docs", "doc_len", "n_queries", "rank")
        timed("scaling", lambda: bench_e2e.run_scaling(plan, device, log=log, axes=axes))
    return res


def read_previous(json_path: str) -> Optional[Dict[str, object]]:
    """The results an earlier run left in the folder, if readable. Read before this run
    starts: this run saves its own over them after each section."""
    try:
        with open(json_path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def carry_over(res: Dict[str, object], prev: Optional[Dict[str, object]], sections) -> List[str]:
    """Sections this run skipped (``--only``) are taken from an earlier run of the same tag
    and preset in the same folder, with their own timestamps, so that a GPU suite can run
    in parts (each under the per-command time limit) and still fill one report. Returns the
    sections carried over."""
    if prev is None or prev.get("tag") != res.get("tag") or prev.get("preset") != res.get("preset"):
        return []
    carried = []
    for sec in SECTIONS:
        if sec in sections or sec not in prev:
            continue
        res[sec] = prev[sec]
        meta = (prev.get("section_meta") or {}).get(sec) or dict(at=prev.get("started"), git=(prev.get("env") or {}).get("git"))
        res["section_meta"][sec] = dict(meta, carried_over=True)
        if sec in (prev.get("seconds") or {}):
            res["seconds"][sec] = prev["seconds"][sec]
        carried.append(sec)
    if "peak" not in res and "peak" in prev and any(s in carried for s in ("ops", "grouped")):
        res["peak"] = prev["peak"]
    if carried:
        res["sections"] = [s for s in SECTIONS if s in res]
    return carried


def save_json(res: Dict[str, object], json_path: str) -> None:
    """Written whole and renamed into place: a run killed while writing leaves the old file."""
    part = json_path + ".part"
    with open(part, "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    os.replace(part, json_path)


# --------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------
def _f(x, digits=3) -> str:
    """A number with `digits` significant digits; '-' for None/NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, int):
        return str(x)
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - mag)
    return f"{x:.{decimals}f}"


def _gb(b) -> str:
    return "-" if b is None else f"{b / 2**30:.2f}"


def _table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _shape(w: Dict[str, object]) -> str:
    s = f"{w['name']}: N={w['n']} T={w['t']} {w['d_in']}->{w['d_out']}"
    if w.get("q"):
        s += f" Q={w['q']} r={w['r']}"
    return s


def _dedupe_skips(skipped: List[Dict[str, str]]) -> List[str]:
    seen, out = set(), []
    for s in skipped:
        reason = s.get("reason", "")
        key = (s.get("backend") or s.get("what"), reason if not reason.startswith("failed") else reason + s.get("op", ""))
        if key in seen:
            continue
        seen.add(key)
        who = s.get("backend") or s.get("what")
        where = f" ({s['op']}, {s.get('workload')})" if reason.startswith("failed") else ""
        out.append(f"- `{who}`{where}: {reason.splitlines()[0][:300]}")
    return out




def _is_reference(r: Dict[str, object], e: Dict[str, object]) -> bool:
    """pyinf's float32 run of a bf16 workload: the accuracy reference (bench_e2e), no speed figure."""
    return r["library"] == "pyinf" and r["precision"] != e["workload"]["dtype"]


def _headline_ratios(e: Dict[str, object], smoke: bool) -> List[str]:
    """Issue 5's headline: pyinf's fastest run of the workload's precision against
    kronfluence's fastest of the same precision (any batch size), for scoring and fitting."""
    dtype = e["workload"]["dtype"]
    mine = [r for r in e["runs"] if r["library"] == "pyinf" and not _is_reference(r, e)]
    theirs = [r for r in e["runs"] if r["library"] == "kronfluence" and r["precision"] == KRONFLUENCE_PRECISION.get(dtype)]
    if not mine or not theirs:
        return []
    lines = []
    for what, key, goal in (("scoring", "score_s", 10.0), ("fit", "fit_s", 5.0)):
        p, k = min(mine, key=lambda r: r[key]), min(theirs, key=lambda r: r[key])
        x = k[key] / p[key]
        verdict = "" if smoke else f" (goal {goal:g}x: {'met' if x >= goal else 'not met'})"
        lines.append(f"- best against best, {what}: pyinf {_f(p[key])} s (batch {p['batch_size']}"
                     f"{', compile=True' if p.get('compile') else ''}{', checkpoint=True' if p.get('checkpoint') else ''}) "
                     f"against kronfluence {_f(k[key])} s (batch {k['batch_size']}): {_f(x)}x{verdict}")
    return lines


def _self_influence_vs_eigen(records: List[Dict[str, object]]) -> List[str]:
    unfused = {r["workload"]["name"]: r for r in records if r["op"] == "eigen_correction" and r["backend"] == "unfused"}
    lines = []
    for r in records:
        base = unfused.get(r["workload"]["name"])
        if r["op"] == "self_influence" and r["backend"] not in ("torch", "unfused") and base is not None:
            lines.append(f"- {r['backend']} {r['workload']['name']}: {_f(r['ms'])} ms against {_f(base['ms'])} ms = "
                         f"{_f(base['ms'] / r['ms'])}x")
    return lines


def _per_token_ratios(records: List[Dict[str, object]]) -> List[str]:
    """One line per (backend, workload) measured both per token and per document."""
    from .shapes import PER_TOKEN_OP

    pairwise = {(r["backend"], r["workload"]["name"]): r for r in records if r["op"] == "factored_scores"}
    lines = []
    for r in (r for r in records if r["op"] == PER_TOKEN_OP):
        p = pairwise.get((r["backend"], r["workload"]["name"]))
        if p is not None:
            lines.append(f"- {r['backend']} {r['workload']['name']}: {_f(r['ms'])} ms vs {_f(p['ms'])} ms = "
                         f"{_f(r['ms'] / p['ms'])}x")
    return lines


def _floor_ratios(e: Dict[str, object], smoke: bool) -> List[str]:
    """One line per pyinf run with a floor at its batch size: its scoring seconds (queries
    included, and the document pass alone) over the floor's forward + input-gradient pass."""
    from .bench_e2e import run_label

    lines = []
    same_model = [r for r in e["runs"] if r["library"] == "pyinf" and not _is_reference(r, e)]
    for r in (r for r in same_model if not r.get("checkpoint")):  # the floor runs the workload's dtype
        floor = [f for f in e.get("floor") or [] if f["batch_size"] == r["batch_size"]
                 and bool(f["compiled"]) == bool(r.get("compile")) and f.get("fwd_inputgrad_s")]
        if not floor:
            continue
        # the e2e runs take the loss through the fused head: held against the floor with the same head
        fused = floor[0].get("fwd_inputgrad_fused_s")
        fs = fused or floor[0]["fwd_inputgrad_s"]
        ratio = r["score_s"] / fs
        goal = "" if smoke else f" (goal: {'met' if ratio <= 1.15 else 'not met'})"
        lines.append(f"- {run_label(r)}: scoring {_f(r['score_s'])} s = {_f(ratio)}x the floor's {_f(fs)} s"
                     f"{' (fused head)' if fused else ''}{goal}; the document pass alone {_f(r['pairwise_s'])} s = "
                     f"{_f(r['pairwise_s'] / fs)}x")
    return lines


def markdown(res: Dict[str, object], plots: Dict[str, str], md_dir: str) -> str:
    env = res["env"]
    smoke = res["preset"] == "smoke"
    out: List[str] = []
    title = "CPU smoke run" if smoke and env["device_type"] == "cpu" else f"{res['preset']} run"
    out.append(f"### Measured: {title} on {env['device_name']} ({res['started']})")
    out.append("")
    if smoke:
        out.append("**CPU smoke (tiny sizes): these timings are meaningless for speed.** They show that every "
                   "benchmark path runs and that pyinf and kronfluence agree (Pearson below).")
        out.append("")
    out.append(_table(["item", "value"], [
        ["device", f"{env['device_name']} ({env['device_type']}" + (f", {env.get('gpu_memory_gb')} GiB" if env.get("gpu_memory_gb") else "")
         + f", {env['cpu_threads']} CPU threads)"],
        ["torch / CUDA", f"{env['torch']} / {env['cuda'] or '-'}"],
        ["triton", f"{env['triton'] or '-'}" + (" (interpreter)" if env.get("triton_interpret") == "1" else "")],
        ["transformers / kronfluence", f"{env['transformers']} / {env['kronfluence']}"],
        ["pyinf (git)", f"{env['pyinf']} ({env['git'] or '-'})"],
        ["suite wall time", f"{sum(res['seconds'].values()):.1f} s (" + ", ".join(f"{k} {v:.1f}" for k, v in res["seconds"].items()) + ")"],
    ]))
    out.append("")
    if res.get("stopped_by_time_limit"):
        out.append("**This run was stopped by its time limit (SIGTERM)**: the section in progress kept what it had "
                   "measured (its 'Not run' list says what it did not reach), and no later section started.")
        out.append("")
    meta = res.get("section_meta") or {}
    if any(m.get("carried_over") for m in meta.values()):
        out.append("Sections measured in separate runs: " + "; ".join(
            f"{k} at {m['at']} (git {m.get('git') or '-'})" for k, m in meta.items()) + ".")
        out.append("")
    avail = res.get("backends_available", {})
    out.append("Backends: " + ", ".join(f"`{k}` " + ("available" if v is None else "unavailable") for k, v in avail.items()) + ".")
    out.append("")
    peak = res.get("peak")
    if peak and "tflops" in peak:
        out.append(f"Matmul peak measured in this run: {peak['dtype']} {peak['size']}^3 = {_f(peak['ms'])} ms = "
                   f"**{_f(peak['tflops'])} TFLOP/s** (the denominator of '% peak').")
        out.append("")

    ops_res = res.get("ops")
    if ops_res and "records" in ops_res:
        out.append(f"#### Kernels ({ops_res['dtype']} inputs, median of many runs after warm-up)")
        out.append("")
        out.append("`unfused` is the literal PyTorch code of DESIGN.md sec. 3 (two matmuls, multiply, sum, in the "
                   "input dtype with an fp32 product; for dense_scores a bmm building the N x d_out x d_in "
                   "per-document gradients, then one GEMM with the flattened queries); `torch` is the reference "
                   "backend (fp32 compute). "
                   "'vs torch' / 'vs unfused' are speed-ups (>1 = faster than that baseline). "
                   "Extra MiB: peak device memory above the inputs, the result included; temp MiB: the same "
                   "without the result (the op's temporaries; CUDA only). Err: relative to the torch backend."
                   + (" Triton here runs in its CPU interpreter and is timed once." if env.get("triton_interpret") == "1"
                      and env["device_type"] == "cpu" else ""))
        out.append("")
        rows = []
        for r in ops_res["records"]:
            rows.append([r["op"], _shape(r["workload"]), r["backend"], _f(r["ms"]), _f(r["tflops"]),
                         _f(r["pct_peak"], 2), _f(r.get("speedup_vs_torch")), _f(r.get("speedup_vs_unfused")),
                         _f(r.get("peak_extra_mb")), _f(r.get("temp_mb")),
                         "-" if r.get("rel_err_vs_torch") is None else f"{r['rel_err_vs_torch']:.1e}"])
        out.append(_table(["op", "shape", "backend", "ms", "TFLOP/s", "% peak", "vs torch", "vs unfused",
                           "extra MiB", "temp MiB", "err"], rows))
        out.append("")
        if (ops_res.get("peak") or {}).get("tflops"):
            pk = ops_res["peak"]
            out.append(f"'% peak' here divides by this section's measured matmul peak: {pk['dtype']} {pk['size']}^3 = "
                       f"{_f(pk['tflops'])} TFLOP/s.")
            out.append("")
        si = _self_influence_vs_eigen(ops_res["records"])
        if si:
            out.append("self_influence against the unfused eigen_correction of the same run (the 5.36 ms baseline "
                       "issue 3 names: its own unfused row also divides by Lambda + damping):")
            out += si
            out.append("")
        per_token = _per_token_ratios(ops_res["records"])
        if per_token:
            out.append("Per-token scores against document scores, same shape and backend (issue 3: at most 1.2x):")
            out += per_token
            out.append("")
        if ops_res.get("skipped"):
            out.append("Not run:")
            out += _dedupe_skips(ops_res["skipped"])
            out.append("")
        if plots.get("ops"):
            out.append(f"![kernel throughput]({os.path.relpath(plots['ops'], md_dir)})")
            out.append("")
    elif ops_res:
        out.append(f"Kernels: section failed: {ops_res.get('error')}")
        out.append("")

    g = res.get("grouped")
    if g and "records" in g:
        w = g["workload"]
        out.append(f"#### Grouped scoring: {w['name']} ({len(w['layers'])} problems, N={w['n']} T={w['t']} "
                   f"Q={w['q']} r={w['r']})")
        out.append("")
        rows = [[r["variant"], _f(r["ms"]), _f(r["tflops"]), _f(r["pct_peak"], 2), _f(r.get("speedup_vs_unfused_loop")),
                 _f(r.get("speedup_vs_own_loop")), _f(r.get("speedup_vs_torch_loop")), _f(r.get("peak_extra_mb")),
                 "-" if r.get("rel_err_vs_torch") is None else f"{r['rel_err_vs_torch']:.1e}"]
                for r in g["records"]]
        out.append("'vs unfused loop' is issue 3's target (>= 3x the per-layer PyTorch loop); 'vs own loop' the same "
                   "backend's single-layer calls one after another; the torch loop is the fp32 reference's.")
        out.append("")
        out.append(_table(["variant", "ms", "TFLOP/s", "% peak", "vs unfused loop", "vs own loop", "vs torch loop",
                           "extra MiB", "err"], rows))
        out.append("")
        if g.get("skipped"):
            out.append("Not run:")
            out += _dedupe_skips(g["skipped"])
            out.append("")

    h = res.get("head")
    if h and "records" in h:
        w = h["workload"]
        out.append(f"#### LM head: {w['name']} (hidden {w['hidden']}, vocabulary {w['vocab']}, {h['dtype']})")
        out.append("")
        out.append(f"`cross_entropy_rows` on one chunk of {w['chunk_rows']} x {w['vocab']} logits (the softmax step "
                   f"of the fused head, in place); GB/s over its ideal traffic (2 reads + 1 write), against a "
                   f"device-to-device copy measured at {_f(h['copy_gbps'])} GB/s. Then the whole head for "
                   f"{w['rows']} rows, forward + backward to the hidden states.")
        out.append("")
        rows = []
        for r in h["records"]:
            err = r.get("loss_rel_err", r.get("rel_err_vs_plain"))
            rows.append([r["what"], r["backend"], _f(r["ms"]), _f(r.get("gbps")), _f(r.get("pct_copy_bw"), 2),
                         _f(r.get("speedup_vs_plain")), _f(r.get("peak_extra_mb")), "-" if err is None else f"{err:.1e}"])
        out.append(_table(["what", "variant", "ms", "GB/s", "% copy bw", "vs plain", "extra MB", "err"], rows))
        out.append("")
        if h.get("skipped"):
            out.append("Not run: " + "; ".join(f"{x['what']} {x['backend']}: {x['reason'][:160]}" for x in h["skipped"]))
            out.append("")
    elif h:
        out.append(f"LM head: section failed: {h.get('error')}")
        out.append("")

    ei = res.get("eigh")
    if ei and "runs" in ei:
        sizes = sorted(set(ei["sizes"]))
        out.append(f"#### Eigendecompositions of a fit ({ei['n_matrices']} float64 matrices of sizes "
                   f"{', '.join(map(str, sizes))}: the e2e model's factors)")
        out.append("")
        out.append("`pyinf.eigen.eigendecompose` with the matrices split over `workers` threads (one CUDA stream "
                   "each on a GPU), wall clock, device synchronised; one eigh of each size alone: "
                   + ", ".join(f"{n}: {_f(ms)} ms" for n, ms in ei["per_size_ms"].items())
                   + f" (sum over the {ei['n_matrices']}: {_f(ei['sum_of_single_s'])} s).")
        out.append("")
        rows = [[r["workers"], _f(r["s"]), r["reps"], _f(r.get("speedup")), "yes" if r["identical"] else "NO"]
                for r in ei["runs"]]
        out.append(_table(["workers", "s", "runs", "vs one after another", "same bits"], rows))
        out.append("")
    elif ei:
        out.append(f"Eigendecompositions: section failed: {ei.get('error')}")
        out.append("")

    e = res.get("e2e")
    if e and "runs" in e:
        wl = e["workload"]
        m = wl["model"]
        out.append(f"#### End to end: GPT-NeoX hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, "
                   f"vocab {m['vocab_size']}, {e['tracked_modules']} MLP modules tracked; {wl['n_docs']} docs x "
                   f"{wl['doc_len']} tokens, {wl['n_queries']} queries x {wl['query_len']} tokens, rank {wl['rank']}, "
                   f"{wl['fisher']} Fisher, damping 0.1 x mean(Lambda)")
        out.append("")
        out.append("Both libraries' 'score s' include query preparation. kronfluence's also includes loading its "
                   "factors from disk, which its API requires; pyinf keeps them in memory.")
        out.append("")
        rows = []
        for r in e["runs"]:
            extra = f" (queries {_f(r['prepare_queries_s'])} s)" if "prepare_queries_s" in r else ""
            phases = r.get("fit_phases_s") or {}
            workers = f" [{r['eigh_workers']} at once]" if (r.get("eigh_workers") or 1) != 1 else ""
            fit_extra = (f" (cov {_f(phases['covariance_pass'])} + eigh {_f(phases['eigendecomposition'])}{workers} + "
                         f"Lambda {_f(phases['lambda_pass'])})") if len(phases) == 3 else ""
            library = r["library"] + (" (compile=True)" if r.get("compile") else "") + (
                " (checkpoint=True)" if r.get("checkpoint") else "") + (
                " (accuracy reference: not warmed up)" if _is_reference(r, e) else "")
            rows.append([library, r["precision"], r["batch_size"], _f(r["fit_s"]) + fit_extra, _f(r["fit_docs_per_s"]),
                         _f(r["score_s"]) + extra, _f(r["score_docs_per_s"]), _gb(r.get("fit_peak_bytes")),
                         _gb(r.get("score_peak_bytes"))])
        out.append(_table(["library", "precision", "batch", "fit s", "fit docs/s", "score s", "score docs/s",
                           "fit peak GB", "score peak GB"], rows))
        out.append("")
        ratios = _headline_ratios(e, smoke)
        for p in (r for r in e["runs"] if r["library"] == "pyinf" and not _is_reference(r, e)):
            for k in (r for r in e["runs"] if r["library"] == "kronfluence" and r["batch_size"] == p["batch_size"]):
                fit_x, score_x = k["fit_s"] / p["fit_s"], k["score_s"] / p["score_s"]
                if KRONFLUENCE_PRECISION.get(p["precision"]) != k["precision"]:  # a reference row: no verdict
                    ratios.append(f"- batch {p['batch_size']}: pyinf {p['precision']} vs kronfluence {k['precision']} "
                                  f"(other precisions, no verdict): fit {_f(fit_x)}x, scoring {_f(score_x)}x")
                    continue
                mem = ""
                if p.get("score_peak_bytes") is not None and k.get("score_peak_bytes") is not None:
                    pm = max(p["score_peak_bytes"], p.get("fit_peak_bytes") or 0)
                    km = max(k["score_peak_bytes"], k.get("fit_peak_bytes") or 0)
                    mem = f"; peak memory {_gb(pm)} vs {_gb(km)} GB ({'met' if pm <= km else 'NOT met'})"
                who = (f"pyinf {p['precision']}{' compile=True' if p.get('compile') else ''}"
                       f"{' checkpoint=True' if p.get('checkpoint') else ''}")
                if smoke:  # no goal verdicts from tiny CPU runs
                    ratios.append(f"- batch {p['batch_size']}: {who} vs kronfluence {k['precision']}: "
                                  f"fit {_f(fit_x)}x, scoring {_f(score_x)}x")
                    continue
                ratios.append(
                    f"- batch {p['batch_size']}: {who} vs kronfluence {k['precision']}: "
                    f"fit {_f(fit_x)}x (goal 5x: {'met' if fit_x >= 5 else 'not met'}), scoring {_f(score_x)}x "
                    f"(milestone 5x: {'met' if score_x >= 5 else 'not met'}; goal 10x: "
                    f"{'met' if score_x >= 10 else 'not met'}){mem}")
        for p in (r for r in e["runs"] if r["library"] == "pyinf" and not _is_reference(r, e)
                  and r.get("score_peak_bytes") is not None):
            # The memory goal: a batch 4x kronfluence's fits in kronfluence's memory.
            for k in (r for r in e["runs"] if r["library"] == "kronfluence" and r.get("score_peak_bytes") is not None
                      and p["batch_size"] == 4 * r["batch_size"]):
                pm, km = p["score_peak_bytes"], k["score_peak_bytes"]
                who = (f"pyinf{' compile=True' if p.get('compile') else ''}"
                       f"{' checkpoint=True' if p.get('checkpoint') else ''}")
                ratios.append(f"- 4x the batch: {who} scoring at batch {p['batch_size']} peaks at {_gb(pm)} GB, "
                              f"kronfluence at batch {k['batch_size']} {_gb(km)} GB"
                              + ("" if smoke else f" (goal: {'met' if pm <= km else 'not met'})"))
        for p in (r for r in e["runs"] if r.get("chunked")):
            c = p["chunked"]
            ratios.append(f"- resumable scoring (`pyinf.score_corpus`: {c['chunks']} chunks of {c['chunk_size']} "
                          f"documents, each hashed, scored and saved, then joined), batch {p['batch_size']}: "
                          f"{_f(c['seconds'])} s against {_f(p['pairwise_s'])} s in one call "
                          f"({_f(c['seconds'] / p['pairwise_s'])}x); largest difference {c['max_rel_diff']:.1e} "
                          f"of the largest score")
        if e.get("pyinf_compile_warmup_s") is not None:
            ratios.append(f"- compile=True: compilation (an untimed warm-up on a few batches) took "
                          f"{_f(e['pyinf_compile_warmup_s'])} s")
        if ratios:
            out.append("Speed-ups (kronfluence seconds / pyinf seconds, same batch size, same run)"
                       + (" - CPU smoke, meaningless for speed:" if smoke else ":"))
            out += ratios
            out.append("")
        floor_ratios = _floor_ratios(e, smoke)
        if floor_ratios:
            out.append("Scoring against the model's own passes (goal: at most 1.15x the forward + input-gradient "
                       "backward at the same batch; compiled runs against the compiled floor)"
                       + (" - CPU smoke, meaningless for speed:" if smoke else ":"))
            out += floor_ratios
            out.append("")
        if e.get("pearson"):
            def verdict(p):  # the accuracy goal: >= 0.99 for every query, against both references
                if smoke or p.get("kind") == "kronfluence itself":
                    return "-"
                return "met" if p["min"] >= 0.99 else "NOT met"

            rows = [[p["run"], p["against"], f"{p['min']:.6f}", f"{p['median']:.6f}", f"{p['mean']:.6f}",
                     f"{1.0 - p['min']:.1e}", verdict(p)] for p in e["pearson"]]
            out.append("Per-query Pearson correlation of the score matrices:")
            out.append("")
            out.append(_table(["run", "against", "min", "median", "mean", "1 - min", "goal: min >= 0.99"], rows))
            out.append("")
        if e.get("floor"):
            rows = [[f["batch_size"], "yes" if f["compiled"] else "no", _f(f.get("train_step_s")),
                     _f(f.get("fwd_inputgrad_s")), _f(f.get("fwd_inputgrad_fused_s")),
                     _gb(f.get("fwd_inputgrad_peak_bytes"))] for f in e["floor"]]
            out.append("Floor: the same model over the same documents (no influence work); 'fused head' takes the "
                       "loss as pyinf's runs do (pyinf.fused_ce, no fp32 logits):")
            out.append("")
            out.append(_table(["batch", "compiled", "training step s", "fwd + input-grad bwd s", "same, fused head s",
                               "peak GB"], rows))
            out.append("")
        if e.get("skipped"):
            out.append("Not run:")
            out += _dedupe_skips(e["skipped"])
            out.append("")
    elif e:
        out.append(f"End to end: section failed: {e.get('error')}")
        out.append("")

    s = res.get("scaling")
    if s and s.get("points"):
        out.append(f"#### Scaling (pyinf, batch {s['batch_size']}; one axis at a time from the base point)")
        out.append("")
        rows = [[p["axis"], p["value"], p["n_docs"], p["doc_len"], p["n_queries"], p["rank"], _f(p.get("fit_s")),
                 _f(p["prepare_queries_s"]), _f(p["pairwise_s"]), _f(p["score_docs_per_s"]),
                 _gb(max([b for b in (p.get("fit_peak_bytes"), p.get("prepare_queries_peak_bytes"),
                                      p.get("pairwise_peak_bytes")) if b is not None], default=None))]
                for p in s["points"]]
        out.append(_table(["axis", "value", "docs", "tokens", "queries", "rank", "fit s", "queries s", "pairwise s",
                           "score docs/s", "peak GB"], rows))
        out.append("")
        if plots.get("scaling"):
            out.append(f"![scaling]({os.path.relpath(plots['scaling'], md_dir)})")
            out.append("")
    if s and s.get("skipped"):
        out.append("Scaling not run: " + "; ".join(f"{x['what']}: {x['reason'][:200]}" for x in s["skipped"]))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def write_markdown_block(path: str, tag: str, body: str) -> None:
    """Replace the block between this tag's markers (or append one); keep the rest."""
    begin, end = BEGIN.format(tag=tag), END.format(tag=tag)
    text = open(path).read() if os.path.exists(path) else "# pyinf benchmark results\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text and text.index(begin) < text.index(end):
        i, j = text.index(begin), text.index(end) + len(end)
        text = text[:i] + block + text[j:]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------
def make_plots(res: Dict[str, object], out_dir: str, tag: str) -> Dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # plots are a nicety; the tables are the record
        _log(f"[plots] skipped: {exc}")
        return {}
    plots: Dict[str, str] = {}
    ops_res = res.get("ops") or {}
    recs = ops_res.get("records") or []
    if recs:
        labels = sorted({(r["op"], r["workload"]["name"]) for r in recs}, key=lambda x: (x[0], x[1]))
        order = ["unfused", "torch", "triton", "native", "native-fma"]
        backends = sorted({r["backend"] for r in recs}, key=lambda b: order.index(b) if b in order else 9)
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 4))
        width = 0.8 / max(1, len(backends))
        for i, b in enumerate(backends):
            vals = []
            for lab in labels:
                r = next((r for r in recs if (r["op"], r["workload"]["name"]) == lab and r["backend"] == b), None)
                vals.append(r["tflops"] if r else 0.0)
            ax.bar([k + i * width for k in range(len(labels))], vals, width, label=b)
        peak = (res.get("peak") or {}).get("tflops")
        if peak:
            ax.axhline(peak, color="k", lw=0.8, ls="--", label=f"matmul peak {peak:.3g}")
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(labels))])
        ax.set_xticklabels([f"{o}\n{w}" for o, w in labels], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("TFLOP/s")
        ax.set_yscale("log")
        ax.set_title(f"pyinf kernels ({tag})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        plots["ops"] = os.path.join(out_dir, f"ops-{tag}.png")
        fig.savefig(plots["ops"], dpi=110)
        plt.close(fig)
    pts = (res.get("scaling") or {}).get("points") or []
    if pts:
        axes_names = [a for a in ("n_docs", "doc_len", "n_queries", "rank") if any(p["axis"] == a for p in pts)]
        fig, axs = plt.subplots(1, len(axes_names), figsize=(3.6 * len(axes_names), 3.2), squeeze=False)
        for ax, name in zip(axs[0], axes_names):
            ps = sorted((p for p in pts if p["axis"] == name), key=lambda p: p["value"])
            xs = [p["value"] for p in ps]
            for key, lab in (("fit_s", "fit"), ("prepare_queries_s", "queries"), ("pairwise_s", "pairwise")):
                ys = [p.get(key) for p in ps]
                if any(y is not None for y in ys):
                    ax.plot(xs, [y if y is not None else float("nan") for y in ys], "o-", label=lab)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(name)
            ax.set_ylabel("seconds")
            mem = [max([b for b in (p.get("fit_peak_bytes"), p.get("prepare_queries_peak_bytes"),
                                    p.get("pairwise_peak_bytes")) if b is not None], default=None) for p in ps]
            if any(m is not None for m in mem):
                ax2 = ax.twinx()
                ax2.plot(xs, [m / 2**30 if m is not None else float("nan") for m in mem], "k--", lw=0.8, label="peak GB")
                ax2.set_ylabel("peak GB")
            ax.legend(fontsize=7)
        fig.suptitle(f"pyinf scaling ({tag})")
        fig.tight_layout()
        plots["scaling"] = os.path.join(out_dir, f"scaling-{tag}.png")
        fig.savefig(plots["scaling"], dpi=110)
        plt.close(fig)
    return plots


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line, checked (sections, ops, backends, scaling axes, workload filters)
    before anything runs: on a GPU session a typo must fail in a second, not after the build.
    Lists come back parsed: ``sections``, ``ops_to_run``, ``backend_list``, ``axes``,
    ``workload_filters`` (None where not given)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU smoke test; timings meaningless)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<tag>)")
    ap.add_argument("--results-md", default=os.path.join(HERE, "RESULTS.md"),
                    help="markdown file to update between this run's markers ('none' to skip)")
    ap.add_argument("--tag", default=None, help="marker tag / file suffix (default <device>-<preset>)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--backends", default=None, help="comma-separated subset of torch,triton,native")
    ap.add_argument("--ops", default=None, help="ops section: comma-separated subset of " + ",".join(OPS))
    ap.add_argument("--workloads", default=None,
                    help="ops section: keep workloads whose name contains one of these comma-separated strings")
    ap.add_argument("--scaling-axes", default=None, help="comma-separated subset of n_docs,doc_len,n_queries,rank")
    ap.add_argument("--fresh", action="store_true",
                    help="do not carry over sections of an earlier results.json in --out that this run skips")
    ap.add_argument("--no-kronfluence", action="store_true")
    ap.add_argument("--no-floor", action="store_true")
    ap.add_argument("--e2e-quick", action="store_true",
                    help="e2e section without kronfluence's fp32 row and with one floor batch size (short GPU sessions)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: 1 for --smoke on a CPU, which avoids oversubscription "
                         "on shared machines; torch's default otherwise)")
    ap.add_argument("--splice", default=None, metavar="DIR",
                    help="run nothing: put the block of a results folder (DIR/results.md, written by a run "
                         "elsewhere, e.g. a GPU session) into --results-md under its tag")
    args = ap.parse_args(argv)

    def items(text):
        return tuple(x.strip() for x in text.split(",") if x.strip()) if text else None

    def check(what, got, allowed):
        if got and set(got) - set(allowed):
            ap.error(f"unknown {what} {sorted(set(got) - set(allowed))}; choose from {tuple(allowed)}")

    from .bench_ops import BACKENDS as bench_backends
    from .shapes import unmatched_workload_filters

    args.sections = items(args.only) or ()
    check("section(s)", args.sections, SECTIONS)
    args.ops_to_run = items(args.ops)
    check("op(s)", args.ops_to_run, OPS)
    args.backend_list = items(args.backends)
    check("backend(s)", args.backend_list, bench_backends)
    args.axes = items(args.scaling_axes)
    check("scaling axis/axes", args.axes, ("n_docs", "doc_len", "n_queries", "rank"))
    args.workload_filters = items(args.workloads)
    unmatched = unmatched_workload_filters(args.workload_filters, args.ops_to_run or OPS,
                                           "smoke" if args.smoke else "full")
    if unmatched:
        ap.error(f"--workloads {','.join(unmatched)} matches no workload of the ops run")
    return args


def splice(results_dir: str, results_md: str) -> str:
    """Puts the block that a run elsewhere wrote into ``results_dir`` (its results.md, linked
    as seen from RESULTS.md's folder) into ``results_md`` under the run's tag; returns the tag."""
    body_path = os.path.join(results_dir, "results.md")
    if not os.path.exists(body_path):
        raise SystemExit(f"--splice: no results.md in {results_dir}")
    prev = read_previous(os.path.join(results_dir, "results.json")) or {}
    tag = prev.get("tag") or os.path.basename(os.path.normpath(results_dir))
    with open(body_path) as fh:
        write_markdown_block(results_md, tag, fh.read())
    return tag


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.splice is not None:
        tag = splice(args.splice, args.results_md)
        _log(f"[run] block {tag} of {args.splice} -> {args.results_md}")
        return 0
    stop_on_sigterm()  # under `timeout`: keep and write what was measured (see OutOfTime)
    preset = "smoke" if args.smoke else "full"
    device = default_device()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.smoke and device.type == "cpu":
        torch.set_num_threads(1)
    tag = args.tag or f"{device.type}-{preset}"
    out_dir = os.path.abspath(args.out or os.path.join(HERE, "results", tag))
    os.makedirs(out_dir, exist_ok=True)
    sections, ops_to_run = args.sections, args.ops_to_run
    warnings.filterwarnings("ignore", category=FutureWarning)  # kronfluence's GradScaler deprecation notices

    json_path = os.path.join(out_dir, "results.json")
    previous = None if args.fresh else read_previous(json_path)

    def finish(res, sections=sections):  # the tag and the carried-over sections (partial saves too)
        res["tag"] = tag
        return carry_over(res, previous, sections)

    def save_finished_sections(res):
        """A process killed in a later section (a hang in a CUDA call outlives SIGTERM, and
        `timeout -k` kills it) keeps these in results.json, marked partial."""
        partial = dict(res, partial=True)
        partial["seconds"], partial["section_meta"] = dict(res["seconds"]), dict(res["section_meta"])
        finish(partial, sections=[s for s in SECTIONS if s in res])  # an unfinished one keeps its old results
        save_json(partial, json_path)

    t0 = time.perf_counter()
    res = run_all(preset, sections=sections, backends=args.backend_list, scaling_axes=args.axes,
                  with_kronfluence=not args.no_kronfluence, with_floor=not args.no_floor,
                  ops_to_run=ops_to_run, e2e_quick=args.e2e_quick,
                  workloads=list(args.workload_filters) if args.workload_filters else None,
                  after_section=save_finished_sections)
    res["total_seconds"] = time.perf_counter() - t0
    res["stopped_by_time_limit"] = out_of_time()
    carried = finish(res)
    if carried:
        _log(f"[run] carried over from {json_path}: {', '.join(carried)}")
    plots = make_plots(res, out_dir, tag)
    res["plots"] = plots
    save_json(res, json_path)
    md_body = markdown(res, plots, os.path.dirname(os.path.abspath(args.results_md))
                       if args.results_md != "none" else out_dir)
    with open(os.path.join(out_dir, "results.md"), "w") as fh:
        fh.write(md_body)
    if args.results_md != "none":
        write_markdown_block(args.results_md, tag, md_body)
    _log(f"[run] {preset} suite done in {res['total_seconds']:.1f} s: {json_path}"
         + (f", {args.results_md} [{tag}]" if args.results_md != "none" else ""))
    if res["stopped_by_time_limit"]:  # what was measured is written; the exit status says it is partial
        _log("[run] stopped by the time limit: the section in progress kept what it measured, later ones did not run")
        return 124  # what `timeout` itself returns
    errors = [k for k in SECTIONS if isinstance(res.get(k), dict) and "error" in res[k]]
    if errors:
        _log(f"[run] sections that failed: {errors}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
