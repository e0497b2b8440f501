"""Scores against full-rank query matrices ``P [Q, d_out, d_in]`` (``rank=None`` queries, and
layers where DESIGN.md's cost model prefers the dense route):

    pairwise   out[n, q]    = <P_q, DW_n>,   DW_n = sum_t mask[n,t] g[n,t] a[n,t]^T
    per token  out[n, t, q] = mask[n,t] * g[n,t]^T P_q a[n,t]

Pairwise: one program per (d_out tile, d_in tile) takes the documents in turn: it builds
its tile of ``DW_n`` with tensor-core dots over token blocks (fp32 accumulate; the
per-document gradient exists only as this register tile), dots it with every query's tile
of ``P`` and writes one partial per (document, query, tile); torch sums the partials in a
fixed order. ``P`` is read from HBM about once (per document it comes from L2); its Q dot
products per tile run on CUDA cores, ~Q/T of the tensor-core work. Per token: one
program per (token block, query, document) computes ``a P_q^T`` block by block over d_out and
reduces each block against ``g`` at once, writing its scores directly. Masks are applied on
load (masked tokens read as zeros, so NaN in padding never enters). Deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _shared
from ._shared import TL_DTYPE, block_sizes, dot_flags, launch, launch_options, mma, pick_config

# H100 configs (reasoned, not measured; compiled for sm_90a without spills).
H100_PAIRWISE = {  # 64 x 64 tiles: a program's Q query tiles stay small enough for L2
    torch.bfloat16: dict(BLOCK_I=64, BLOCK_J=64, BLOCK_T=64, num_warps=4, num_stages=3),
    torch.float32: dict(BLOCK_I=64, BLOCK_J=64, BLOCK_T=16, num_warps=8, num_stages=3),
}
H100_PER_TOKEN = {
    torch.bfloat16: dict(BLOCK_T=128, BLOCK_I=128, BLOCK_K=64, num_warps=8, num_stages=3),
    torch.float32: dict(BLOCK_T=64, BLOCK_I=64, BLOCK_K=32, num_warps=4, num_stages=3),
}
INTERPRETER_PAIRWISE = dict(BLOCK_I=16, BLOCK_J=16, BLOCK_T=16)
INTERPRETER_PER_TOKEN = dict(BLOCK_T=16, BLOCK_I=16, BLOCK_K=16)


@triton.jit
def _dense_pairwise_kernel(g_ptr, a_ptr, p_ptr, m_ptr, part_ptr, N, T, D_OUT, D_IN, Q,
                           s_gn, s_gt, s_gd, s_an, s_at, s_ad, s_pq, s_pi, s_pj, s_mn, s_mt, s_pn, s_pqq,
                           HAS_MASK: tl.constexpr, COMPUTE: tl.constexpr,
                           BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr,
                           IEEE: tl.constexpr, INTERP_FIX: tl.constexpr):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    i_ok = offs_i < D_OUT
    j_ok = offs_j < D_IN
    ok = i_ok[:, None] & j_ok[None, :]
    tile_id = pid_i * tl.num_programs(1) + pid_j
    p_tile = p_ptr + offs_i.to(tl.int64)[:, None] * s_pi + offs_j[None, :] * s_pj
    # Documents in sequence: this program's Q tiles of P are reread once per document, from
    # L2 while it runs (Q x BLOCK_I x BLOCK_J x 2 bytes, 128 KB at Q=16), not from HBM.
    for n32 in range(0, N):
        n = tl.cast(n32, tl.int64)  # n * s_gn passes 2^31 elements once N * T * d_out does
        g_doc = g_ptr + n * s_gn
        a_doc = a_ptr + n * s_an
        dw = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_ok = offs_t < T
            rows = offs_t.to(tl.int64)[:, None]  # strided views: T * s_gt can pass 2^31 too
            if HAS_MASK:
                t_ok &= tl.load(m_ptr + n * s_mn + offs_t * s_mt, mask=offs_t < T, other=0) != 0
            g = tl.load(g_doc + rows * s_gt + offs_i[None, :] * s_gd, mask=t_ok[:, None] & i_ok[None, :],
                        other=0.0).to(COMPUTE)
            a = tl.load(a_doc + rows * s_at + offs_j[None, :] * s_ad, mask=t_ok[:, None] & j_ok[None, :],
                        other=0.0).to(COMPUTE)
            dw = mma(tl.trans(g), a, dw, IEEE, INTERP_FIX)
        p_q = p_tile
        for q in range(0, Q):
            p = tl.load(p_q, mask=ok, other=0.0).to(tl.float32)
            tl.store(part_ptr + n * s_pn + q * s_pqq + tile_id, tl.sum(tl.sum(dw * p, axis=1), axis=0))
            p_q += s_pq  # pointer steps: q * s_pq can pass 2^31 (Q * d_out * d_in elements)


@triton.jit
def _dense_per_token_kernel(g_ptr, a_ptr, p_ptr, m_ptr, out_ptr, T, D_OUT, D_IN,
                            s_gn, s_gt, s_gd, s_an, s_at, s_ad, s_pq, s_pi, s_pj, s_mn, s_mt, s_on, s_ot,
                            HAS_MASK: tl.constexpr, COMPUTE: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
                            IEEE: tl.constexpr, INTERP_FIX: tl.constexpr):
    pid_t = tl.program_id(0)
    q = tl.program_id(1).to(tl.int64)
    n = tl.program_id(2).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    if HAS_MASK:
        t_ok &= tl.load(m_ptr + n * s_mn + offs_t * s_mt, mask=offs_t < T, other=0) != 0
    g_rows = g_ptr + n * s_gn + offs_t.to(tl.int64) * s_gt
    a_rows = a_ptr + n * s_an + offs_t.to(tl.int64) * s_at
    p_q = p_ptr + q * s_pq
    scores = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for i0 in range(0, D_OUT, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        i_ok = offs_i < D_OUT
        pa = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)  # (a P_q^T)[tokens, i block]
        for k0 in range(0, D_IN, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < D_IN
            a = tl.load(a_rows[:, None] + offs_k[None, :] * s_ad, mask=t_ok[:, None] & k_ok[None, :],
                        other=0.0).to(COMPUTE)
            p = tl.load(p_q + offs_k[:, None] * s_pj + offs_i.to(tl.int64)[None, :] * s_pi,
                        mask=k_ok[:, None] & i_ok[None, :], other=0.0).to(COMPUTE)
            pa = mma(a, p, pa, IEEE, INTERP_FIX)
        g = tl.load(g_rows[:, None] + offs_i[None, :] * s_gd, mask=t_ok[:, None] & i_ok[None, :],
                    other=0.0).to(tl.float32)
        scores += tl.sum(pa * g, axis=1)
    tl.store(out_ptr + n * s_on + offs_t * s_ot + q, scores, mask=offs_t < T)  # masked tokens: exact 0


def compute_dtype_of(acts: torch.Tensor, grads: torch.Tensor, dense: torch.Tensor) -> torch.dtype:
    """bf16/fp16 tensor-core dots when every input has that dtype, else fp32 (IEEE)."""
    if acts.dtype == grads.dtype == dense.dtype and acts.dtype in (torch.bfloat16, torch.float16):
        return acts.dtype
    return torch.float32


def _mask_args(mask: Optional[torch.Tensor], like: torch.Tensor):
    if mask is None:
        return like, 0, 0  # dummy pointer, never read when HAS_MASK=False
    m = mask.view(torch.uint8)
    return m, m.stride(0), m.stride(1)


def dense_scores(acts, grads, dense, mask: Optional[torch.Tensor] = None, per_token: bool = False) -> torch.Tensor:
    """``[N, Q]`` (``[N, T, Q]`` per token), fp32. Any strides; bool mask or None."""
    n, t, d_in = acts.shape
    d_out = grads.shape[2]
    q = dense.shape[0]
    compute = compute_dtype_of(acts, grads, dense)
    m, s_mn, s_mt = _mask_args(mask, acts)
    common = (acts.stride(0), acts.stride(1), acts.stride(2))
    strides = (grads.stride(0), grads.stride(1), grads.stride(2)) + common + (dense.stride(0), dense.stride(1),
                                                                             dense.stride(2), s_mn, s_mt)
    flags = dict(HAS_MASK=mask is not None, COMPUTE=TL_DTYPE[compute], **dot_flags(compute))
    if per_token:
        out = torch.zeros(n, t, q, dtype=torch.float32, device=acts.device)
        if out.numel() == 0 or d_in == 0 or d_out == 0:
            return out
        cfg = pick_config(H100_PER_TOKEN, compute, INTERPRETER_PER_TOKEN)
        step = _shared.GRID_YZ_LIMIT  # grid y and z: queries and documents in pieces
        for n0 in range(0, n, step):
            n1 = min(n, n0 + step)
            for q0 in range(0, q, step):
                q1 = min(q, q0 + step)
                grid = (triton.cdiv(t, cfg["BLOCK_T"]), q1 - q0, n1 - n0)
                launch(_dense_per_token_kernel, grid, grads[n0:n1], acts[n0:n1], dense[q0:q1],
                                              m[n0:n1] if mask is not None else m, out[n0:n1, :, q0:q1], t, d_out,
                                              d_in, *strides, out.stride(0), out.stride(1),
                                              **flags, **block_sizes(cfg), **launch_options(cfg))
        return out
    if n == 0 or q == 0 or t == 0 or d_in == 0 or d_out == 0:
        return torch.zeros(n, q, dtype=torch.float32, device=acts.device)
    cfg = pick_config(H100_PAIRWISE, compute, INTERPRETER_PAIRWISE)
    n_ti, n_tj = triton.cdiv(d_out, cfg["BLOCK_I"]), triton.cdiv(d_in, cfg["BLOCK_J"])
    partial = torch.empty(n, q, n_ti * n_tj, dtype=torch.float32, device=acts.device)  # each slot written once
    launch(_dense_pairwise_kernel, (n_ti, n_tj),
        grads, acts, dense, m, partial, n, t, d_out, d_in, q, *strides, partial.stride(0), partial.stride(1),
        **flags, **block_sizes(cfg), **launch_options(cfg))
    return partial.sum(2)
