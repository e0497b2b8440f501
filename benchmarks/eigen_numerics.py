"""The eigen ops' rounding on bf16 tokens whose per-token products cancel, emulated on a CPU.

A document's gradient ``G = sum_t g_t a_t^T`` is a small difference of large terms when the
activations share a large component and the gradients nearly sum to zero over the tokens;
rounding each token's rotated values before the sum is then magnified. This script emulates
the Triton kernels' arithmetic for bf16 inputs (bases rounded to bf16, rotated tokens kept in
fp32 and rounded to tf32 by the GPU's Gram dots, or rounded to bf16 as before 2026-12-02) and
the remedy of centring each document's activations first,
``G = sum_t g_t (a_t - mean a)^T + (sum_t g_t) (mean a)^T`` (the rank-one term as one more
token row, its ``sum_t g_t`` rotated unrounded), against float64. No GPU: it rounds operands
as the hardware would (tf32: round to nearest, 10 mantissa bits). Prints the relative error
of Lambda for that input and for iid inputs (benchmarks/RESULTS.md, row 34)::

    python -m benchmarks.eigen_numerics
"""
from __future__ import annotations

import torch

from tests import oracle


def tf32(x: torch.Tensor) -> torch.Tensor:
    bits = x.float().contiguous().view(torch.int32)
    bits = bits + 0xFFF + ((bits >> 13) & 1)
    return (bits & ~0x1FFF).view(torch.float32)


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.bfloat16().float()


def inputs(case: str, n=2, t=64, d_in=32, d_out=24):
    if case == "cancelling":
        acts = (4 * torch.randn(d_in) + 0.05 * torch.randn(n, t, d_in)).bfloat16()
        v = torch.randn(n, t, d_out)
        grads = (v - v.mean(1, keepdim=True) + 1e-3 * torch.randn(n, 1, d_out)).bfloat16()
    else:
        acts, grads = torch.randn(n, t, d_in).bfloat16(), torch.randn(n, t, d_out).bfloat16()
    q_a = torch.linalg.qr(torch.randn(d_in, d_in, dtype=torch.float64))[0].float()
    q_s = torch.linalg.qr(torch.randn(d_out, d_out, dtype=torch.float64))[0].float()
    return acts, grads, q_a, q_s


def main(seeds: int = 10) -> None:
    for case in ("cancelling", "iid"):
        errors = {k: [] for k in ("tf32", "tf32 centred", "bf16", "bf16 centred")}
        for seed in range(seeds):
            torch.manual_seed(seed)
            acts, grads, q_a, q_s = inputs(case)
            want = oracle.eigen_correction(acts, grads, q_a, q_s)
            a_rot, g_rot = acts.float() @ bf16(q_a), grads.float() @ bf16(q_s)
            mean = a_rot.mean(1, keepdim=True)
            a_centred = torch.cat([a_rot - mean, mean], 1)
            g_centred = torch.cat([g_rot, g_rot.sum(1, keepdim=True)], 1)
            for name, (g, a, rounded) in {"tf32": (g_rot, a_rot, tf32), "tf32 centred": (g_centred, a_centred, tf32),
                                          "bf16": (g_rot, a_rot, bf16),
                                          "bf16 centred": (g_centred, a_centred, bf16)}.items():
                grad = torch.einsum("nto,nti->noi", rounded(g).double(), rounded(a).double())
                errors[name].append(oracle.rel_err(grad.square().sum(0), want))
        for name, e in errors.items():
            e = sorted(e)
            print(f"{case:10s} {name:13s} Lambda relative error vs float64: median {e[len(e) // 2]:.2e}, max {e[-1]:.2e}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
