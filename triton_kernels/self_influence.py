"""EK-FAC self-influence without the [N, d_out, d_in] temporary:

    I(n, n) = sum_ij (sum_t g~[n,t,i] a~[n,t,j])^2 / (Lambda[i,j] + damping)

Same contraction as eigen_correction (tokens rotated into the eigenbases by the masked
rotation GEMM in bounded chunks, then tl.dot over token blocks per output tile), with a
different epilogue: the squared tile is divided by (Lambda + damping) and reduced to one
scalar. One program per (tile, document) writes its scalar into a [N, n_tiles] fp32
buffer; torch sums each row. Deterministic, no atomics.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._shared import block_sizes, dot_flags, launch, launch_options, pick_config
from .eigen_correction import (H100, INTERPRETER, doc_gradient_tile, load_width, rotated_chunks, rotated_dot_flags,
                               rotated_dtype_of)


@triton.jit
def _self_influence_kernel(g_ptr, a_ptr, lam_ptr, part_ptr, damping, T, D_IN, SLAB, D_IN_LD, SLAB_LD, row0, doc0,
                           n_tj,
                           s_gn, s_gt, s_an, s_at, s_li, s_lj, s_pn,
                           BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr,
                           IEEE: tl.constexpr, INTERP_FIX: tl.constexpr):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)  # within the d_out slab
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    i_ok = offs_i < SLAB
    j_ok = offs_j < D_IN
    tile = doc_gradient_tile(g_ptr + n * s_gn, a_ptr + n * s_an, offs_i, offs_j, offs_i < SLAB_LD,
                             offs_j < D_IN_LD, T, s_gt, s_at, BLOCK_I, BLOCK_J, BLOCK_T, IEEE, INTERP_FIX)
    tile = tl.where(i_ok[:, None] & j_ok[None, :], tile, 0.0)  # padded rows / columns: not the matrix
    lam = tl.load(lam_ptr + (row0 + offs_i).to(tl.int64)[:, None] * s_li + offs_j[None, :] * s_lj,
                  mask=i_ok[:, None] & j_ok[None, :], other=1.0).to(tl.float32)
    # Outside the matrix the tile is exactly 0 and lam is 1, so the padding adds 0. One reduction
    # over the whole tile: summed row by row (two tl.sum), ptxas serialised the loop's wgmma
    # instructions (C7515) and the kernel took all 255 registers; this way neither (161 registers).
    value = tl.sum(tile * tile / (lam + damping))
    tile_id = (row0 // BLOCK_I + pid_i) * n_tj + pid_j  # slabs are whole BLOCK_I tiles
    tl.store(part_ptr + (doc0 + n) * s_pn + tile_id, value)


def self_influence(acts, grads, q_a, q_s, lambdas, damping: float, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[N] fp32. q_a / q_s must already be in eigen_correction.compute_dtype_of(acts, grads)."""
    n, t, d_in = acts.shape
    d_out = grads.shape[2]
    compute = q_a.dtype
    cfg = pick_config(H100, rotated_dtype_of(compute), INTERPRETER)
    if n == 0 or t == 0 or d_in == 0 or d_out == 0:
        return torch.zeros(n, dtype=torch.float32, device=acts.device)
    n_ti = triton.cdiv(d_out, cfg["BLOCK_I"])
    n_tj = triton.cdiv(d_in, cfg["BLOCK_J"])
    partial = torch.empty(n, n_ti * n_tj, dtype=torch.float32, device=acts.device)  # every slot written once
    mask = mask.view(torch.uint8) if mask is not None else None
    for sl, a_rot, g_rot, row0 in rotated_chunks(acts, grads, q_a, q_s, mask, cfg["BLOCK_I"]):
        width = g_rot.shape[2]
        grid = (triton.cdiv(width, cfg["BLOCK_I"]), n_tj, a_rot.shape[0])
        launch(_self_influence_kernel, grid,  # T + 1 rows: the tokens and their centre (rotated_chunks)
            g_rot, a_rot, lambdas, partial, float(damping), a_rot.shape[1], d_in, width, load_width(d_in),
            load_width(width), row0,
            sl.start, n_tj,
            g_rot.stride(0), g_rot.stride(1), a_rot.stride(0), a_rot.stride(1),
            lambdas.stride(0), lambdas.stride(1), partial.stride(0),
            **block_sizes(cfg), **rotated_dot_flags(compute), **launch_options(cfg))
    return partial.sum(1)
