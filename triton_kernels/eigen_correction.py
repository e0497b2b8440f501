"""EK-FAC eigenvalue correction without the [N, d_out, d_in] temporary:

    Lambda[i, j] = sum_n ( sum_t g~[n,t,i] a~[n,t,j] )^2,  a~ = mask(a) Q_A,  g~ = mask(g) Q_S

Kernel 1 (triton_kernels._shared.rotate) rotates the tokens of a chunk of documents into
the eigenbases (plain masked GEMMs into a bounded temporary, see rotation_plan), and each
document's rotated activations are centred, their mean one more row (rotated_chunks). Kernel 2
(below) owns one [BLOCK_I, BLOCK_J] tile of Lambda: for each document of the chunk it
computes that tile of g~_n^T a~_n with tl.dot over token blocks (fp32 accumulate), squares
it and accumulates in registers, then writes the tile once (adding to the previous chunk's
value). Every tile is owned by one program and chunks run in order, so the result is
deterministic: there are no atomics and no split-over-documents variant.

Precision: with bf16/fp16 inputs the eigenbases are rounded to that dtype and the rotated
tokens are stored in fp32, their Gram tiles taken on tf32 tensor cores (see
rotated_dtype_of); fp32 inputs stay fp32 throughout with IEEE dots.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _shared
from ._shared import block_sizes, dot_flags, launch, launch_options, mma, pick_config, rotate, rotation_plan

# H100 configs (reasoned, not measured). BLOCK_T is the reduction (token) dimension.
H100 = {  # keyed by the rotated tokens' dtype: fp32 for every input (rotated_dtype_of)
    torch.float32: dict(BLOCK_I=64, BLOCK_J=64, BLOCK_T=32, num_warps=8, num_stages=3),
}
INTERPRETER = dict(BLOCK_I=16, BLOCK_J=16, BLOCK_T=16)


@triton.jit
def doc_gradient_tile(g_rows, a_rows, offs_i, offs_j, i_ld, j_ld, T, s_gt, s_at,
                      BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr,
                      IEEE: tl.constexpr, INTERP_FIX: tl.constexpr):
    """[BLOCK_I, BLOCK_J] tile of one document's rotated gradient g~^T a~ (fp32). i_ld / j_ld
    mask the loads on the rotated buffers' padded widths (multiples of 16, see
    rotated_chunks): constant along 16-element groups, so loads stay 16-byte and pipelined.
    Rows / columns past the true widths are garbage or zeros; callers mask them."""
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    block = tl.arange(0, BLOCK_T)[:, None]
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        # the block's first row in int64 (one long document's rotated rows can pass 2^31
        # elements), the offsets within it in int32 (fewer registers than int64 vectors)
        t64 = tl.full((), t0, tl.int64)
        g = tl.load(g_rows + t64 * s_gt + (block * s_gt + offs_i[None, :]), mask=t_ok[:, None] & i_ld[None, :],
                    other=0.0)
        a = tl.load(a_rows + t64 * s_at + (block * s_at + offs_j[None, :]), mask=t_ok[:, None] & j_ld[None, :],
                    other=0.0)
        acc = mma(tl.trans(g), a, acc, IEEE, INTERP_FIX)
    return acc


@triton.jit
def _eigen_correction_kernel(g_ptr, a_ptr, out_ptr, n_docs, T, D_IN, SLAB, D_IN_LD, SLAB_LD, row0,
                             s_gn, s_gt, s_an, s_at, s_oi,
                             ACCUMULATE: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                             BLOCK_T: tl.constexpr, IEEE: tl.constexpr, INTERP_FIX: tl.constexpr):
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)  # within the d_out slab
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    i_ok = offs_i < SLAB
    j_ok = offs_j < D_IN
    squares = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for n in range(0, n_docs):
        # The rotated buffers are bounded (ROTATED_TEMP_BYTES), so n * stride fits in int32.
        tile = doc_gradient_tile(g_ptr + n * s_gn, a_ptr + n * s_an,
                                 offs_i, offs_j, offs_i < SLAB_LD, offs_j < D_IN_LD, T, s_gt, s_at,
                                 BLOCK_I, BLOCK_J, BLOCK_T, IEEE, INTERP_FIX)
        squares += tile * tile
    dst = out_ptr + (row0 + offs_i).to(tl.int64)[:, None] * s_oi + offs_j[None, :]
    ok = i_ok[:, None] & j_ok[None, :]
    if ACCUMULATE:
        squares += tl.load(dst, mask=ok, other=0.0)
    tl.store(dst, squares, mask=ok)


def compute_dtype_of(acts: torch.Tensor, grads: torch.Tensor) -> torch.dtype:
    if acts.dtype == grads.dtype and acts.dtype in (torch.bfloat16, torch.float16):
        return acts.dtype
    return torch.float32


def rotated_dtype_of(compute: torch.dtype) -> torch.dtype:
    """The rotated temporaries' dtype (and so the Gram kernels' operand dtype): fp32 for every
    input. A document's gradient tile sums its tokens' rotated outer products, and where those
    cancel (activations with a large component shared by the tokens, gradients whose sum over
    the tokens nearly vanishes) a rounding of each token's rotated values is magnified by the
    cancellation: bf16 rotated tokens gave Lambda 15% off float64 on such input, fp32 ones
    2.7e-3 with fp32 dots (the interpreter) and, emulated, 2.3e-2 with the tf32 dots a GPU
    takes (benchmarks/eigen_numerics.py), where the unfused op, which rounds the summed gradient once,
    stays exact to bf16 (centring each document's activations would remove the magnification:
    benchmarks/RESULTS.md row 34). fp16
    would also overflow: a rotation can gather a token's whole norm into one coordinate, and
    ||a||_2 can pass fp16's 65504 where no single entry of `a` does. (The fp32 Gram operands
    go through tf32 tensor cores on a GPU: rotated_dot_flags.)"""
    return torch.float32


def rotated_dot_flags(compute: torch.dtype) -> dict:
    """IEEE / INTERP_FIX of the Gram kernels. The fp32 operands of bf16 / fp16 inputs go through
    tf32 (not IEEE): 10 mantissa bits, 8x finer than bf16's rounding of the rotated tokens,
    though still magnified where tokens' products cancel (rotated_dtype_of)."""
    if compute in (torch.float16, torch.bfloat16):  # under the interpreter: tf32 emulated (_shared.mma)
        return dict(IEEE=False, INTERP_FIX=_shared.INTERPRETING)
    return dot_flags(compute)


def load_width(width: int) -> int:
    """Padded row width of a rotated temporary: the Gram kernels' load masks use it. The same
    16-element rows as pyinf._padding (not imported: this package does not depend on pyinf)."""
    return -(-width // 16) * 16


def rotated_chunks(acts, grads, q_a, q_s, mask, block_i: int):
    """Yields (docs slice, a~ [docs, T + 1, d_in], g~ slab [docs, T + 1, width], first row of
    the slab) with the rotated temporaries bounded by _shared.ROTATED_TEMP_BYTES.

    Each document's rotated activations are centred on their mean over its tokens, and the
    mean is one more row, against the sum of the rotated output gradients:
    ``sum_t g~_t a~_t^T = sum_t g~_t (a~_t - mean)^T + (sum_t g~_t) mean^T``. The same
    gradient, but the per-token products the Gram tiles round (tf32 on a GPU) no longer
    carry a component the tokens share, which the sum would cancel and their rounding not:
    on such input Lambda's error fell from 2.3e-2 to 2.7e-3 (benchmarks/eigen_numerics.py,
    emulated). Padding rows are 0 in g~, so whatever a~ holds there adds nothing."""
    n, t, d_in = acts.shape
    d_out = grads.shape[2]
    rotated = rotated_dtype_of(q_a.dtype)
    elsize = torch.finfo(rotated).bits // 8
    docs, slab = rotation_plan(n, t + 1, d_in, d_out, elsize, block_i, _shared.ROTATED_TEMP_BYTES)
    # Rows padded to 16 elements (zeros): a biased layer's d_in = 769 keeps aligned rows, and
    # the Gram kernels load whole padded rows (load_width).
    a_buf = torch.zeros(docs, t + 1, load_width(d_in), dtype=rotated, device=acts.device)[..., :d_in]
    g_buf = torch.zeros(docs, t + 1, load_width(slab), dtype=rotated, device=acts.device)[..., :slab]
    for start in range(0, n, docs):
        sl = slice(start, min(n, start + docs))
        m = None if mask is None else mask[sl]
        k = sl.stop - sl.start
        a_rot = a_buf[:k]
        rotate(acts[sl], m, q_a, 0, d_in, a_rot[:, :t])
        tokens = m.sum(1, dtype=rotated) if m is not None else torch.full((k,), t, dtype=rotated, device=acts.device)
        mean = a_rot[:, :t].sum(1) / tokens.clamp(min=1)[:, None]  # padding rows are 0 in a~
        a_rot[:, :t] -= mean[:, None]
        a_rot[:, t] = mean
        for row0 in range(0, d_out, slab):
            width = min(slab, d_out - row0)
            g_rot = g_buf[:k, :, :width]
            rotate(grads[sl], m, q_s, row0, width, g_rot[:, :t])
            g_rot[:, t] = g_rot[:, :t].sum(1)
            yield sl, a_rot, g_rot, row0


def eigen_correction(acts, grads, q_a, q_s, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[d_out, d_in] fp32. q_a / q_s must already be in compute_dtype_of(acts, grads)."""
    n, t, d_in = acts.shape
    d_out = grads.shape[2]
    compute = q_a.dtype
    cfg = pick_config(H100, rotated_dtype_of(compute), INTERPRETER)
    if n == 0 or t == 0 or d_in == 0 or d_out == 0:
        return torch.zeros(d_out, d_in, dtype=torch.float32, device=acts.device)
    # Rows padded to 16 (d_in = 769 for a biased layer): an unaligned row stride here costs
    # the kernel its registers (spills at the H100 config); the result is returned dense.
    out = torch.empty(d_out, load_width(d_in), dtype=torch.float32, device=acts.device)[:, :d_in]  # chunk 1 writes all
    mask = mask.view(torch.uint8) if mask is not None else None
    seen_rows = set()
    for sl, a_rot, g_rot, row0 in rotated_chunks(acts, grads, q_a, q_s, mask, cfg["BLOCK_I"]):
        width = g_rot.shape[2]
        grid = (triton.cdiv(width, cfg["BLOCK_I"]), triton.cdiv(d_in, cfg["BLOCK_J"]))
        launch(_eigen_correction_kernel, grid,  # T + 1 rows: the tokens and their centre (rotated_chunks)
            g_rot, a_rot, out, a_rot.shape[0], a_rot.shape[1], d_in, width, load_width(d_in), load_width(width), row0,
            g_rot.stride(0), g_rot.stride(1), a_rot.stride(0), a_rot.stride(1), out.stride(0),
            ACCUMULATE=row0 in seen_rows, **block_sizes(cfg), **rotated_dot_flags(compute), **launch_options(cfg))
        seen_rows.add(row0)
    return out if out.is_contiguous() else out.contiguous()
