"""Masked covariance ``x^T x`` over token rows, fp32 accumulate, exactly symmetric.

Design: only upper-triangle tiles (ti <= tj) are computed (half the FLOPs of a full GEMM);
each program owns one tile and loops over a range of row blocks (documents x token
blocks), then stores the tile and its transpose. Diagonal tiles are symmetrised as
(acc + acc^T) / 2, which is exactly symmetric in IEEE arithmetic, so the result is
bitwise symmetric. When there are few tiles (small d) the rows are split over SPLITS
programs per tile that write fp32 partials [SPLITS, d, d], summed afterwards by torch in a
fixed order: deterministic, no atomics.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._shared import block_sizes, dot_flags, launch, launch_options, mma, pick_config, to_device

# H100 configs (reasoned, not measured: see benchmarks/RESULTS.md). BLOCK_D is the tile
# edge of the d x d output, BLOCK_T the rows per tl.dot (the reduction dimension).
H100 = {
    torch.bfloat16: dict(BLOCK_D=128, BLOCK_T=64, num_warps=8, num_stages=4),
    torch.float32: dict(BLOCK_D=64, BLOCK_T=32, num_warps=4, num_stages=3),
}
INTERPRETER = dict(BLOCK_D=16, BLOCK_T=16)


@triton.jit
def _covariance_kernel(x_ptr, m_ptr, out_ptr, tiles_ptr,
                       T, D, n_row_blocks, blocks_per_split,
                       s_xn, s_xt, s_xd, s_mn, s_mt, s_os,
                       HAS_MASK: tl.constexpr, EDGE: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_T: tl.constexpr, IEEE: tl.constexpr, INTERP_FIX: tl.constexpr):
    """EDGE=False: the launch's tiles lie inside D, so loads are masked by row only (constant
    along d: 16-byte, pipelined loads even when D is 769 or 3073); EDGE=True: the tiles
    that cross D, masked by column too."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    ti = tl.load(tiles_ptr + 2 * tile)
    tj = tl.load(tiles_ptr + 2 * tile + 1)
    offs_i = ti * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_j = tj * BLOCK_D + tl.arange(0, BLOCK_D)
    if EDGE:
        i_ok = offs_i < D
        j_ok = offs_j < D
    else:
        i_ok = tl.full((BLOCK_D,), 1, tl.int1)
        j_ok = tl.full((BLOCK_D,), 1, tl.int1)
    t_blocks = tl.cdiv(T, BLOCK_T)
    rb_start = split * blocks_per_split
    rb_end = tl.minimum(rb_start + blocks_per_split, n_row_blocks)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for rb in range(rb_start, rb_end):
        n = (rb // t_blocks).to(tl.int64)
        offs_t = (rb % t_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = offs_t < T
        if HAS_MASK:
            row_ok &= tl.load(m_ptr + n * s_mn + offs_t * s_mt, mask=row_ok, other=0) != 0
        rows = x_ptr + n * s_xn + offs_t.to(tl.int64)[:, None] * s_xt
        xi = tl.load(rows + offs_i[None, :] * s_xd, mask=row_ok[:, None] & i_ok[None, :], other=0.0)
        xj = tl.load(rows + offs_j[None, :] * s_xd, mask=row_ok[:, None] & j_ok[None, :], other=0.0)
        acc = mma(tl.trans(xi), xj, acc, IEEE, INTERP_FIX)
    out = out_ptr + split.to(tl.int64) * s_os
    if ti == tj:
        acc = (acc + tl.trans(acc)) * 0.5  # exactly symmetric: a + b == b + a
    tl.store(out + offs_i[:, None] * D + offs_j[None, :], acc, mask=i_ok[:, None] & j_ok[None, :])
    if ti != tj:
        tl.store(out + offs_j[:, None] * D + offs_i[None, :], tl.trans(acc), mask=j_ok[:, None] & i_ok[None, :])


@functools.lru_cache(maxsize=256)
def _tile_lists(n_tiles: int, full: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (i, j) tiles with i <= j, [n, 2] int32 on `device`: those inside the first `full`
    whole tiles, and those crossing d. Built and copied once per (layer width, device), not
    once per call (a fit calls this twice per layer per batch). Split on the host: a device
    tensor's boolean index reads back."""
    ti, tj = torch.triu_indices(n_tiles, n_tiles)
    tiles = torch.stack([ti, tj], 1).to(torch.int32)
    inside = (tiles < full).all(1)
    return (to_device(tiles[inside].contiguous(), device), to_device(tiles[~inside].contiguous(), device))


def covariance(x: torch.Tensor, mask: Optional[torch.Tensor],
               splits: Optional[int] = None, target_programs: int = 1) -> torch.Tensor:
    """[d, d] fp32: sum over unmasked rows of x[n, t] x[n, t]^T. x: [N, T, d], any strides.
    `splits` row splits per tile (default: enough programs to reach `target_programs`)."""
    n, t, d = x.shape
    compute_dtype = x.dtype  # one input: its own dtype feeds the tensor cores
    cfg = pick_config(H100, compute_dtype, INTERPRETER)
    n_tiles = triton.cdiv(d, cfg["BLOCK_D"])
    # tiles inside d and tiles crossing it go to two launches (an odd d, e.g. 769 with a bias
    # column, would otherwise put column masks on every load)
    full = d // cfg["BLOCK_D"]
    inside, crossing = _tile_lists(n_tiles, full, x.device)
    n_row_blocks = n * triton.cdiv(t, cfg["BLOCK_T"])
    if n_row_blocks == 0 or d == 0:
        return torch.zeros(d, d, dtype=torch.float32, device=x.device)
    if splits is None:
        splits = triton.cdiv(target_programs, n_tiles * (n_tiles + 1) // 2)
    splits = max(1, min(splits, n_row_blocks, 64))
    per_split = triton.cdiv(n_row_blocks, splits)
    splits = triton.cdiv(n_row_blocks, per_split)  # no empty splits
    out = torch.empty(splits, d, d, dtype=torch.float32, device=x.device)
    m = mask.view(torch.uint8) if mask is not None else out
    for edge, sel in ((False, inside), (True, crossing)):
        if sel.shape[0] == 0:
            continue
        launch(_covariance_kernel, (sel.shape[0], splits),
            x, m, out, sel, t, d, n_row_blocks, per_split,
            x.stride(0), x.stride(1), x.stride(2),
            m.stride(0) if mask is not None else 0, m.stride(1) if mask is not None else 0, out.stride(0),
            HAS_MASK=mask is not None, EDGE=edge, **block_sizes(cfg), **dot_flags(compute_dtype),
            **launch_options(cfg))
    if splits == 1:
        return out[0]
    total = out.sum(0)
    # torch's reduction order may differ between (i, j) and (j, i); mirror the upper
    # triangle so the result stays bitwise symmetric.
    return total.triu() + total.triu(1).T
