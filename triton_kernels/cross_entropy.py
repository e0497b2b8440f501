"""Softmax cross-entropy of a chunk of logit rows, with its gradient written in place:

    loss[r]    = logsumexp(x[r]) - x[r, y_r]
    x[r, :]   <- softmax(x[r]) - onehot(y_r)          (in x's dtype)

The fused linear cross-entropy (pyinf.fused_ce) calls this between its two GEMMs
(``h @ W^T`` -> this -> ``dx @ W``). Unfused, the same step upcasts the bf16 logits to
fp32 and makes four more passes over them (logsumexp, exp, the one-hot update, the cast
back), about 28 bytes of memory traffic per logit; here one program streams its row
twice (online max and sum, then the gradient), about 6 bytes per logit, and nothing of
size ``rows x vocab`` is allocated (the approach of Liger-Kernel's cross-entropy).

With ``SAMPLE`` (the true Fisher) the target is drawn from the row's softmax by the
Gumbel-max trick during the first sweep, from Philox streams seeded per row.

A label outside ``[0, V)`` gives a NaN loss and a plain softmax row (no one-hot), never an
out-of-bounds read; the pipeline then stops on the non-finite loss.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._shared import INTERPRETING, cast_rne, launch

# One program per row; a block of columns per step. Not autotuned: a 50k-column bf16 row
# is ~100 KB, so 8192-column steps with 16 warps keep 16 fp32 values per thread in flight.
H100 = dict(BLOCK_V=8192, num_warps=16)
INTERPRETER = dict(BLOCK_V=16)  # several steps per row at the tests' vocabulary sizes


@triton.jit
def _cross_entropy_rows_kernel(x_ptr, labels_ptr, loss_ptr, V, s_x, s_label, seed,
                               SAMPLE: tl.constexpr, BLOCK_V: tl.constexpr, INTERP_FIX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * s_x
    # Sweep 1: running max and sum of exponentials (and, when sampling, the Gumbel argmax).
    m = float("-inf")
    s = 0.0
    best = float("-inf")
    best_col = 0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = cols < V
        x = tl.load(x_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # while every column so far is -inf (a vocabulary masked by a -inf bias), exp(-inf - -inf)
        # would be NaN: shift by 0 instead, which adds exactly 0 to s
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
        m = m_new
        if SAMPLE:
            u = tl.rand(seed + row, cols)
            z = tl.where(ok, x - tl.log(-tl.log(u)), float("-inf"))
            z_max = tl.max(z, axis=0)
            z_col = v0 + tl.argmax(z, axis=0)
            best_col = tl.where(z_max > best, z_col, best_col)
            best = tl.maximum(best, z_max)
    lse = m + tl.log(s)
    if SAMPLE:
        target = best_col.to(tl.int64)
    else:
        target = tl.load(labels_ptr + row * s_label).to(tl.int64)
    valid = (target >= 0) & (target < V)
    x_target = tl.load(x_row + tl.where(valid, target, 0)).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - x_target, float("nan")))
    # Sweep 2: the gradient, over the same row (mostly from L2).
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = cols < V
        x = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
        tl.store(x_row + cols, cast_rne(grad, x_ptr.dtype.element_ty, INTERP_FIX), mask=ok)


def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, *, sample: bool) -> torch.Tensor:
    """loss [R] fp32; ``logits [R, V]`` (unit column stride) is overwritten by the gradient.
    With ``sample``, labels are ignored and the Philox seed is drawn from torch's CPU
    generator, so ``torch.manual_seed`` makes the draws reproducible."""
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss
    cfg = INTERPRETER if INTERPRETING else H100
    # Row r draws from Philox key seed + r: the keys of two calls overlap only when their
    # seeds are closer than their row counts, which a 62-bit seed makes negligible (a 31-bit
    # one did not: about 1e5 calls of 1.3k rows share a few percent of their draws). Always
    # >= 2^32, so the kernel is compiled for one (int64) seed type.
    seed = int(torch.randint(2**32, 2**62, (1,))) if sample else 2**32
    fix = INTERPRETING and logits.dtype != torch.float32
    launch(_cross_entropy_rows_kernel, (rows,),
        logits, labels, loss, vocab, logits.stride(0), labels.stride(0), seed, SAMPLE=sample, BLOCK_V=cfg["BLOCK_V"],
        INTERP_FIX=fix, **({"num_warps": cfg["num_warps"]} if "num_warps" in cfg else {}))
    return loss
