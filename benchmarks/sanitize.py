"""One small launch of every op on every CUDA backend, for compute-sanitizer:

    compute-sanitizer --tool memcheck   python3 -m benchmarks.sanitize
    compute-sanitizer --tool racecheck  python3 -m benchmarks.sanitize native native-fma

``native`` runs the native backend's default kernels, on tensor cores for these bf16 inputs;
``native-fma`` its fp32 FMA kernels (PYINF_NATIVE_TC=0: factored_scores, eigen_correction,
self_influence); ``native-sm90`` its Hopper factored-scores kernel (PYINF_NATIVE_SM90=1, TMA +
wgmma; on other GPUs the call falls back to the default kernel), ``native-sm90-wait0`` and
``native-sm90-ws`` that kernel's other K-loop modes.

Odd sizes, a mask with a fully padded document, bf16 inputs; each result is checked against
the torch reference so that a launch that wrote nothing is caught too.
"""
from __future__ import annotations

import sys

import torch

import pyinf.ops as ops
from pyinf.ops import _registry

from .bench_ops import TENSOR_CORE_OPS, _with_env


def _problem(device, d_in=49, d_out=70):
    torch.manual_seed(0)
    n, t, q, r = 3, 37, 5, 7
    bf = torch.bfloat16
    mask = torch.rand(n, t, device=device) > 0.3
    mask[-1] = False
    q_a = torch.linalg.qr(torch.randn(d_in, d_in, device=device))[0]
    q_s = torch.linalg.qr(torch.randn(d_out, d_out, device=device))[0]
    return dict(acts=torch.randn(n, t, d_in, device=device, dtype=bf),
                grads=torch.randn(n, t, d_out, device=device, dtype=bf), mask=mask, q_a=q_a, q_s=q_s,
                lambdas=torch.rand(d_out, d_in, device=device), left=torch.randn(q, d_out, r, device=device, dtype=bf),
                right=torch.randn(q, d_in, r, device=device, dtype=bf),
                dense=torch.randn(q, d_out, d_in, device=device, dtype=bf),
                logits=torch.randn(2 * t, 1000, device=device, dtype=bf),
                labels=torch.randint(0, 1000, (2 * t,), device=device))


def _grouped(p):
    """Three layers for one grouped launch: the problem, a shorter one (T=20) and one with a
    strided rank slice (r=3), so the table's offsets and per-layer strides all differ."""
    t, k = 20, 3
    return [dict(acts=p["acts"], grads=p["grads"], left=p["left"], right=p["right"], mask=p["mask"]),
            dict(acts=p["acts"][:, :t], grads=p["grads"][:, :t], left=p["left"], right=p["right"],
                 mask=p["mask"][:, :t]),
            dict(acts=p["acts"], grads=p["grads"], left=p["left"][..., :k], right=p["right"][..., :k], mask=None)]


def _calls(p):
    layers = _grouped(p)
    return {
        "covariance": lambda b: ops.covariance(p["acts"], mask=p["mask"], backend=b),
        "eigen_correction": lambda b: ops.eigen_correction(p["acts"], p["grads"], p["q_a"], p["q_s"], mask=p["mask"],
                                                           backend=b),
        "self_influence": lambda b: ops.self_influence(p["acts"], p["grads"], p["q_a"], p["q_s"], p["lambdas"], 0.1,
                                                       mask=p["mask"], backend=b),
        "factored_scores": lambda b: ops.factored_scores(p["acts"], p["grads"], p["left"], p["right"],
                                                         mask=p["mask"], backend=b),
        "factored_scores_per_token": lambda b: ops.factored_scores(p["acts"], p["grads"], p["left"], p["right"],
                                                                   mask=p["mask"], per_token=True, backend=b),
        "factored_scores_grouped": lambda b: torch.cat(
            [o.flatten() for o in ops.factored_scores_grouped(layers, backend=b)]),
        "dense_scores": lambda b: ops.dense_scores(p["acts"], p["grads"], p["dense"], mask=p["mask"], backend=b),
        "dense_scores_per_token": lambda b: ops.dense_scores(p["acts"], p["grads"], p["dense"], mask=p["mask"],
                                                             per_token=True, backend=b),
        # in place: each call gets its own copy of the logits; the loss is what is compared
        "cross_entropy_rows": lambda b: ops.cross_entropy_rows(p["logits"].clone(), p["labels"], backend=b),
    }


# label -> PYINF_NATIVE_SM90 for the native Hopper kernel's K-loop modes
SM90_MODES = {"native-sm90": "1", "native-sm90-wait0": "wait0", "native-sm90-ws": "ws"}
LABELS = ("triton", "native", "native-fma", *SM90_MODES)


def parse_args(argv) -> list:
    """The backends to launch (default all); an unknown label is an error before any launch."""
    unknown = [a for a in argv if a not in LABELS]
    if unknown:
        raise SystemExit(f"python -m benchmarks.sanitize: unknown backend label(s) {unknown}; choose from {LABELS}")
    return list(argv) or list(LABELS)


def main(argv) -> int:
    backends = parse_args(argv)
    p = _problem(torch.device("cuda"))
    # The Hopper kernel reads token rows by TMA: rows of a multiple of 8 elements.
    aligned = _calls(_problem(torch.device("cuda"), d_in=48, d_out=72))
    failures = 0
    for name, call in _calls(p).items():
        refs = {}  # the torch result, once per problem
        for label in backends:
            op = name.replace("_per_token", "")
            backend = "native" if label.startswith("native") else label
            if label == "native-fma" and op.replace("_grouped", "") not in TENSOR_CORE_OPS:
                continue
            sm90 = label in SM90_MODES
            if sm90 and op != "factored_scores":
                continue
            run = aligned[name] if sm90 else call
            if sm90 not in refs:
                refs[sm90] = run("torch")
            ref = refs[sm90]
            reason = _registry.unsupported_reason(backend, op, [p["logits"]] if op == "cross_entropy_rows"
                                                  else [p["acts"], p["grads"]])
            if reason is not None:
                print(f"{name:28s} {label:9s} skipped: {reason}")
                continue
            env = "0" if label == "native-fma" else ""  # "": the default rule (any value but "0"/"1")
            out = _with_env("PYINF_NATIVE_SM90", SM90_MODES.get(label, ""),
                            _with_env("PYINF_NATIVE_TC", env, lambda: run(backend)))()
            torch.cuda.synchronize()
            err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
            ok = torch.isfinite(out).all().item() and err < 2e-2
            failures += not ok
            print(f"{name:28s} {label:9s} rel err {err:.2e} {'ok' if ok else 'FAILED'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
