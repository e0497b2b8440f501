"""Turn a GPU run's kernel benchmarks into ``backend="auto"``'s table:
``python -m benchmarks.preferences benchmarks/results/cuda-full/results.json [--write]``.

For each op, the backends (torch, triton, native; not the literal unfused code, which is no
backend) are ranked per measured shape by median time, among those whose result agreed with
the torch reference (relative error under ``--tolerance``). Shapes are ordered by the size
of one call (its FLOP, ``pyinf.ops._preferences.work``), and where the winner changes from
one shape to the next the rule's bound is put halfway between them (geometric mean). The
result replaces ``SOURCE`` and ``MEASURED`` in ``pyinf/ops/_preferences.py`` with
``--write``; without it, the new text is printed. Commit it with the run it came from.

The run's ``grouped`` section gives ``factored_scores_grouped`` its rule (:func:`grouped_rule`),
and its ``eigh`` section (``benchmarks/bench_eigh.py``) sets ``EIGH_WORKERS``, the fit's
default number of eigendecompositions at once on CUDA (:func:`eigh_workers`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Optional, Tuple

from pyinf.ops import BACKENDS

from .shapes import dispatched_op

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = os.path.join(os.path.dirname(HERE), "pyinf", "ops", "_preferences.py")


def call_size(rec: Dict[str, object]) -> float:
    """FLOP of one dispatcher call in a benchmark record (the covariance benchmark makes two
    calls, A and S: their mean)."""
    return rec["flops"] / (2.0 if rec["op"] == "covariance" else 1.0)


# DESIGN.md sec. 5: bf16 inputs within 1e-2 of the reference; eigen_correction and
# self_influence square rotated values, which doubles the relative error (tests/oracle.py's
# SQUARED_TOLERANCE).
TOLERANCE = 1e-2
SQUARED_OPS = ("eigen_correction", "self_influence")


def op_tolerance(op: str, tolerance: Optional[float] = None) -> float:
    base = TOLERANCE if tolerance is None else tolerance
    return 2 * base if op in SQUARED_OPS else base


def disqualified(records: List[Dict[str, object]], failures: List[Dict[str, object]] = (),
                 tolerance: Optional[float] = None) -> set:
    """(op, backend) pairs that auto must never choose: a record of the op off the reference
    (any workload, a biased layout included) or a failed call."""
    out = set()
    for r in records:
        err = r.get("rel_err_vs_torch")
        if r["backend"] in BACKENDS and r["backend"] != "torch" and (
                err is None or not err < op_tolerance(r["op"], tolerance)):
            out.add((dispatched_op(r["op"]), r["backend"]))  # wrong per token: wrong for factored_scores
    for f in failures:
        if str(f.get("reason", "")).startswith("failed") and f.get("backend") in BACKENDS:
            out.add((dispatched_op(str(f.get("op"))), f["backend"]))
    return out


def rules(records: List[Dict[str, object]], tolerance: Optional[float] = None,
          failures: List[Dict[str, object]] = ()) -> Tuple[Dict[str, List[Tuple[Optional[float], str]]], List[str]]:
    """(table, evidence lines) from the ``ops`` records (and ``skipped`` entries) of one run."""
    bad = disqualified(records, failures, tolerance)
    times: Dict[str, Dict[str, Dict[str, float]]] = {}  # op -> workload -> backend -> ms
    sizes: Dict[Tuple[str, str], float] = {}
    for r in records:
        if r["backend"] not in BACKENDS:
            continue  # "unfused" (no backend) and variants such as "native-fma" (an environment switch)
        if r["op"] != dispatched_op(r["op"]):
            continue  # a benchmark-only op (the per-token variant): auto dispatches factored_scores
        if r["workload"].get("bias"):
            continue  # a layout variant of a shape measured plainly: size rules cannot tell them apart
        if (r["op"], r["backend"]) in bad:
            continue
        name = r["workload"]["name"]
        times.setdefault(r["op"], {}).setdefault(name, {})[r["backend"]] = float(r["ms"])
        sizes[(r["op"], name)] = call_size(r)
    table: Dict[str, List[Tuple[Optional[float], str]]] = {}
    evidence: List[str] = []
    for op, by_shape in sorted(times.items()):
        ranked = sorted(((sizes[(op, name)], name, min(ms, key=ms.get), ms) for name, ms in by_shape.items()),
                        key=lambda x: x[0])
        out: List[Tuple[Optional[float], str]] = []
        for i, (size, name, winner, ms) in enumerate(ranked):
            evidence.append(f"{op} {name} ({size:.3g} FLOP): " + ", ".join(
                f"{b} {v:.4g} ms" for b, v in sorted(ms.items(), key=lambda x: x[1])))
            if i + 1 < len(ranked) and ranked[i + 1][2] != winner:
                out.append((float(f"{math.sqrt(size * ranked[i + 1][0]):.3g}"), winner))
            elif i + 1 == len(ranked):
                out.append((None, winner))
        table[op] = out
    return table, evidence


def grouped_rule(grouped: Optional[Dict[str, object]], tolerance: float = TOLERANCE
                 ) -> Tuple[Dict[str, List[Tuple[Optional[float], str]]], List[str]]:
    """``factored_scores_grouped``'s rule from the ``grouped`` section: the fastest backend's
    single grouped call (variants ``grouped:<backend>``; the per-layer loops are no backend's
    grouped call) among those that agreed with the torch reference. One workload is measured
    (a model's MLP layers), so the rule holds for any size."""
    ms: Dict[str, float] = {}
    for r in ((grouped or {}).get("records") or []):
        kind, _, backend = str(r.get("variant", "")).partition(":")
        err = r.get("rel_err_vs_torch")
        if kind != "grouped" or backend not in BACKENDS:
            continue
        if backend != "torch" and (err is None or not err < op_tolerance("factored_scores", tolerance)):
            continue
        ms[backend] = float(r["ms"])
    if not ms:
        return {}, []
    name = ((grouped or {}).get("workload") or {}).get("name", "grouped")
    evidence = [f"factored_scores_grouped {name}: " + ", ".join(
        f"{b} {v:.4g} ms" for b, v in sorted(ms.items(), key=lambda x: x[1]))]
    return {"factored_scores_grouped": [(None, min(ms, key=ms.get))]}, evidence


MIN_EIGH_GAIN = 1.1  # more eigh workers than one only when it measured at least this much faster


def eigh_workers(eigh: Optional[Dict[str, object]]) -> Tuple[Optional[int], List[str]]:
    """The fit's default ``eigh_workers`` on this device from the ``eigh`` section: the fastest
    worker count whose output matched one-after-another bit for bit, if it beat one worker by
    ``MIN_EIGH_GAIN``; else 1. None when the section is missing (nothing measured)."""
    runs = [r for r in ((eigh or {}).get("runs") or []) if r.get("identical")]
    if not runs or not any(r["workers"] == 1 for r in runs):
        return None, []
    one = next(r for r in runs if r["workers"] == 1)
    best = min(runs, key=lambda r: r["s"])
    chosen = best["workers"] if one["s"] >= MIN_EIGH_GAIN * best["s"] else 1
    return chosen, ["eigh of the fit's factors: " + ", ".join(f"{r['workers']} workers {r['s']:.4g} s" for r in runs)]


BEGIN = "# >>> measured table (written by benchmarks/preferences.py)\n"
END = "# <<< measured table\n"


def render(table, evidence: List[str], source: str, eigh: Optional[int] = None) -> str:
    """The text between the markers of pyinf/ops/_preferences.py."""
    lines = ["# Where the table comes from: device, versions, date, results file.", f"SOURCE = {source!r}",
             "# Measured (median ms per call, fastest first):"]
    lines += [f"#   {e}" for e in evidence]
    lines.append("# op -> [(upper bound on the call's FLOP or None, backend)]; first applicable rule wins.")
    lines.append("MEASURED: Dict[str, List[Tuple[Optional[float], str]]] = {")
    for op, rs in table.items():
        lines.append(f"    {op!r}: [" + ", ".join(f"({b!r}, {n!r})" for b, n in rs) + "],")
    lines.append("}")
    lines.append("# The fit's eigh_workers on CUDA (pyinf.eigen) when not given; None: not measured (1).")
    lines.append(f"EIGH_WORKERS: Optional[int] = {eigh!r}")
    return "\n".join(lines) + "\n"


def rewrite(text: str, block: str) -> str:
    """`text` (the _preferences module) with what lies between its markers replaced."""
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < i:
        raise ValueError("pyinf/ops/_preferences.py: the measured-table markers are missing")
    return text[:i + len(BEGIN)] + block + text[j:]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.preferences", description=__doc__.splitlines()[0])
    ap.add_argument("results", help="results.json of a GPU run of the kernel benchmarks")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE,
                    help="relative error allowed against the torch reference (doubled for the squared ops)")
    ap.add_argument("--write", action="store_true", help=f"rewrite {os.path.relpath(TARGET)}")
    return ap.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    with open(args.results) as fh:
        res = json.load(fh)
    records = (res.get("ops") or {}).get("records") or []
    env = res.get("env") or {}
    if env.get("device_type") != "cuda":
        print(f"[preferences] {args.results} is not a GPU run (device {env.get('device_name')}): "
              f"auto's table is for CUDA devices", file=sys.stderr)
        return 2
    workers, eigh_evidence = eigh_workers(res.get("eigh"))
    grouped_table, grouped_evidence = grouped_rule(res.get("grouped"), args.tolerance)
    if not records and workers is None and not grouped_table:
        print(f"[preferences] {args.results} has neither ops records, a grouped section nor an eigh section",
              file=sys.stderr)
        return 2
    table, evidence = rules(records, args.tolerance, (res.get("ops") or {}).get("skipped") or [])
    table.update(grouped_table)
    evidence += grouped_evidence
    source = (f"{env.get('device_name')}, torch {env.get('torch')}, triton {env.get('triton')}, "
              f"pyinf git {env.get('git')}, {res.get('started')}, {os.path.basename(args.results)}")
    block = render(table, evidence + eigh_evidence, source, workers)
    if not args.write:
        print(block)
        return 0
    with open(TARGET) as fh:
        text = fh.read()
    with open(TARGET, "w") as fh:
        fh.write(rewrite(text, block))
    print(f"[preferences] wrote {TARGET}: " + "; ".join(f"{op}: {rs}" for op, rs in table.items())
          + f"; eigh_workers: {workers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
