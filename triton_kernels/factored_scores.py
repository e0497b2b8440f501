"""Factored (low-rank query) influence scores, fused, several layers per launch.

    score[n, q] = sum_t mask[n,t] sum_k (g[n,t] . L[q][:, k]) (a[n,t] . R[q][:, k])

One program owns (problem, document, token split, column block). A column block is
BLOCK_C = QB * RP columns of the virtual [d, Q*RP] factor matrix (column q*RP + k is
query q's rank-k vector; r is padded to RP, a power of two and at least 8, with zero
columns added on the host), so a tile always holds whole queries. For each token block of its split the program computes
the two [BLOCK_T, BLOCK_C] products g@L and a@R with tl.dot in registers (fp32 accumulate),
multiplies them, sums each query's RP columns (reshape + sum) and then either stores the
[BLOCK_T, QB] per-token scores or adds them over tokens. Nothing of size N x T x Q x r
reaches memory. The pairwise form writes one fp32 partial per (problem, doc, split, query)
and torch sums the splits: deterministic, no atomics.

Grouped launch: problems (layers) are described by rows of an int64 table (base addresses,
sizes, strides) built on the host; program ids decompose as (problem, doc, split, column
block) with the column block fastest, so the programs that share one token block's rows
of g and a run together and hit L2. One launch covers every layer, document and query (of
one dtype combination, and of ranks up to MAX_RANK; higher ranks take one launch per slice).
The query factors are read in place from left [Q, d_out, r] / right [Q, d_in, r] (any
strides) when r is the launch's padded rank (padded_ranks: a power of two, at least 8);
other ranks are padded with zero columns, a copy, which pyinf.ops._triton makes once per
pass and this module otherwise makes per call.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from ._shared import TL_DTYPE, block_sizes, dot_flags, launch, launch_options, pick_config, project, to_device

# H100 configs (reasoned, not measured). Two fp32 [128, 128] accumulators at 8 warps are
# 128 registers/thread. With both operands of both products pipelined (cp.async) and the
# wgmma left in flight across K steps, BLOCK_K=64 spills (24-96 bytes at 3-4 stages, ptxas
# for sm_90a); BLOCK_K=32 does not (252 registers): bf16 operand tiles 2 x 8 KB per stage.
H100 = {
    torch.bfloat16: dict(BLOCK_T=128, BLOCK_C=128, BLOCK_K=32, num_warps=8, num_stages=5),
    # fp32 (IEEE dots on CUDA cores): BLOCK_K=32 spills 20 bytes once the factor tiles are
    # pipelined too; BLOCK_K=16 does not (184 registers).
    torch.float32: dict(BLOCK_T=64, BLOCK_C=64, BLOCK_K=16, num_warps=8, num_stages=3),
}
INTERPRETER = dict(BLOCK_T=16, BLOCK_C=16, BLOCK_K=16)
# The largest rank one launch takes; higher ranks go in slices (see _rank_slices). At 128 the
# bf16 config compiles for sm_90a without spills (80 KB of shared memory per block); a padded
# rank of 256 spilled 1.8 KB of registers, 1024 asked for 360 KB of shared memory.
MAX_RANK = 128

# Columns of the per-problem descriptor table (int64); the kernel reads them by position
# ("r" records the padded rank RP for debugging; the kernel does not need it).
_FIELDS = ("acts", "grads", "left", "right", "mask", "out", "has_mask", "T", "d_in", "d_out", "r",
           "chunk", "s_an", "s_at", "s_ak", "s_gn", "s_gt", "s_gk", "s_lq", "s_ld", "s_lk",
           "s_rq", "s_rd", "s_rk", "s_mn", "s_mt", "s_on", "s_ot")
NF = len(_FIELDS)


@triton.jit
def _factored_scores_kernel(desc_ptr, N, Q, S, n_cb,
                            ACT_T: tl.constexpr, GRAD_T: tl.constexpr, LEFT_T: tl.constexpr,
                            RIGHT_T: tl.constexpr, COMPUTE: tl.constexpr, PER_TOKEN: tl.constexpr,
                            RP: tl.constexpr, NF: tl.constexpr, ALIGNED: tl.constexpr, K_ALIGNED: tl.constexpr,
                            SPLIT_K_TAIL: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                            IEEE: tl.constexpr, INTERP_FIX: tl.constexpr):
    QB: tl.constexpr = BLOCK_C // RP  # whole queries per column block
    pid = tl.program_id(0)
    cb = pid % n_cb
    rest = pid // n_cb
    split = rest % S
    rest = rest // S
    n = (rest % N).to(tl.int64)
    d = desc_ptr + (rest // N) * NF  # this problem's descriptor row (field order: _FIELDS)

    acts = tl.load(d + 0).to(tl.pointer_type(ACT_T))
    grads = tl.load(d + 1).to(tl.pointer_type(GRAD_T))
    left = tl.load(d + 2).to(tl.pointer_type(LEFT_T))
    right = tl.load(d + 3).to(tl.pointer_type(RIGHT_T))
    mask = tl.load(d + 4).to(tl.pointer_type(tl.uint8))
    out = tl.load(d + 5).to(tl.pointer_type(tl.float32))
    has_mask = tl.load(d + 6) != 0
    T = tl.load(d + 7)
    d_in = tl.load(d + 8)
    d_out = tl.load(d + 9)
    chunk = tl.load(d + 11)
    s_an = tl.load(d + 12)
    s_at = tl.load(d + 13)
    s_ak = tl.load(d + 14)
    s_gn = tl.load(d + 15)
    s_gt = tl.load(d + 16)
    s_gk = tl.load(d + 17)
    s_lq = tl.load(d + 18)
    s_ld = tl.load(d + 19)
    s_lk = tl.load(d + 20)
    s_rq = tl.load(d + 21)
    s_rd = tl.load(d + 22)
    s_rk = tl.load(d + 23)
    s_mn = tl.load(d + 24)
    s_mt = tl.load(d + 25)
    s_on = tl.load(d + 26)
    s_ot = tl.load(d + 27)
    if ALIGNED:
        # Values read from the table carry no alignment facts, unlike kernel arguments the
        # JIT specialises. Without them bf16 loads are not vectorised, cp.async cannot be
        # used and the K loops are not software-pipelined. The host checked these facts.
        if K_ALIGNED:
            d_in = tl.multiple_of(d_in, 16)
            d_out = tl.multiple_of(d_out, 16)
        s_ak = 1
        s_gk = 1
        s_lk = 1
        s_rk = 1
        s_an = tl.multiple_of(s_an, 8)
        s_at = tl.multiple_of(s_at, 8)
        s_gn = tl.multiple_of(s_gn, 8)
        s_gt = tl.multiple_of(s_gt, 8)
        s_lq = tl.multiple_of(s_lq, 8)
        s_ld = tl.multiple_of(s_ld, 8)
        s_rq = tl.multiple_of(s_rq, 8)
        s_rd = tl.multiple_of(s_rd, 8)
        acts = tl.multiple_of(acts, 16)
        grads = tl.multiple_of(grads, 16)
        left = tl.multiple_of(left, 16)
        right = tl.multiple_of(right, 16)

    # Columns of this block: query q = cb*QB + c // RP, rank k = c % RP. The host pads the
    # factors' rank to RP, so the column mask is constant over each query's RP columns: the
    # factor tiles then load as 16-byte vectors through cp.async like the token rows. (With a
    # mask on k < r per column, they were plain synchronous loads inside the K loops, and
    # Triton could not keep any wgmma in flight: every K step waited for its product.)
    offs_c = tl.arange(0, BLOCK_C)
    col_q = cb * QB + offs_c // RP
    col_k = offs_c % RP
    col_ok = col_q < Q
    l_cols = col_q.to(tl.int64) * s_lq + col_k * s_lk
    r_cols = col_q.to(tl.int64) * s_rq + col_k * s_rk
    offs_q = cb * QB + tl.arange(0, QB)
    q_ok = offs_q < Q

    t_blocks = tl.cdiv(T, BLOCK_T)
    tb_start = split * chunk
    tb_end = tl.minimum(tb_start + chunk, t_blocks)
    total = tl.zeros((QB,), dtype=tl.float32)
    for tb in range(tb_start, tb_end):
        offs_t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        in_range = offs_t < T
        m = tl.load(mask + n * s_mn + offs_t * s_mt, mask=in_range & has_mask, other=1)
        row_ok = in_range & (m != 0)
        per_q = tl.zeros((BLOCK_T, QB), dtype=tl.float32)
        if tl.max(row_ok.to(tl.int32), axis=0) > 0:  # skip all-padding token blocks
            gl = project(grads + n * s_gn + offs_t.to(tl.int64) * s_gt, row_ok, s_gk, left, l_cols, col_ok,
                          s_ld, d_out, COMPUTE, BLOCK_T, BLOCK_C, BLOCK_K, SPLIT_K_TAIL, IEEE, INTERP_FIX)
            ar = project(acts + n * s_an + offs_t.to(tl.int64) * s_at, row_ok, s_ak, right, r_cols, col_ok,
                          s_rd, d_in, COMPUTE, BLOCK_T, BLOCK_C, BLOCK_K, SPLIT_K_TAIL, IEEE, INTERP_FIX)
            per_q = tl.sum(tl.reshape(gl * ar, (BLOCK_T, QB, RP)), axis=2)  # rank reduction
        if PER_TOKEN:
            dst = out + n * s_on + offs_t.to(tl.int64)[:, None] * s_ot + offs_q[None, :]
            tl.store(dst, per_q, mask=in_range[:, None] & q_ok[None, :])
        else:
            total += tl.sum(per_q, axis=0)
    if not PER_TOKEN:
        tl.store(out + n * s_on + split * s_ot + offs_q, total, mask=q_ok)


def padded_ranks(ranks: Sequence[int]) -> List[int]:
    """The rank each problem's factors are padded to in a launch of problems of these ranks:
    all to RP, the launch's power of two (at least 8), when the largest is at most MAX_RANK;
    else each to whole slices of MAX_RANK (see _rank_slices), whose padded columns then fall
    in its last slice. Callers that keep the factors across calls may pad them once ahead
    (pyinf.ops._triton does); the kernel pads what is not."""
    max_rank = max(ranks)
    if max_rank > MAX_RANK:
        return [triton.cdiv(r, MAX_RANK) * MAX_RANK for r in ranks]
    return [max(8, triton.next_power_of_2(max_rank))] * len(ranks)


def _pad_rank(problem: dict, rp: int) -> dict:
    r = problem["left"].shape[2]
    if r == rp:
        return problem
    pad = (0, rp - r)
    return dict(problem, left=torch.nn.functional.pad(problem["left"], pad),
                right=torch.nn.functional.pad(problem["right"], pad))


def _aligned(problems: Sequence[dict]) -> bool:
    """True when every problem meets the facts the ALIGNED fast path asserts: unit inner
    strides, 16-byte aligned bases, outer strides multiples of 8 elements. The capture
    stores a bias-augmented [.., d + 1] input with rows padded to 16 elements so that
    biased layers qualify too (pyinf.capture._append_ones); the tests cover both paths."""
    for p in problems:
        for name in ("acts", "grads", "left", "right"):
            t = p[name]
            if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s % 8 for s in t.stride()[:-1]):
                return False
    return True


def _k_aligned(problems: Sequence[dict]) -> bool:
    """d_in and d_out multiples of 16 in every problem (the K loops' bounds)."""
    return all(p["acts"].shape[2] % 16 == 0 and p["grads"].shape[2] % 16 == 0 for p in problems)


def _compute_dtype(problem: dict) -> torch.dtype:
    """bf16/fp16 tensor cores when the token tensors are both that dtype, else fp32. fp16
    also needs fp16 factors: rounding fp32 factors to fp16 could overflow (65504) or flush
    small ones, where bf16 has fp32's range."""
    dt = problem["acts"].dtype
    if dt != problem["grads"].dtype or dt not in (torch.bfloat16, torch.float16):
        return torch.float32
    if dt == torch.float16 and not (problem["left"].dtype == problem["right"].dtype == dt):
        return torch.float32
    return dt


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def factored_scores_grouped(problems: Sequence[dict], per_token: bool = False,
                            splits: Optional[int] = None) -> List[torch.Tensor]:
    """Scores for several problems (dicts: acts, grads, left, right, mask) sharing N and Q
    and the dtypes of each of acts / grads / left / right, in one launch. Returns fp32
    [N, Q] (or [N, T, Q]) per problem. `splits` token splits per (problem, doc) (default:
    enough programs to fill the GPU about four times)."""
    max_rank = max(p["left"].shape[2] for p in problems)
    if max_rank > MAX_RANK:
        return _rank_slices(problems, per_token, splits, max_rank)
    first = problems[0]
    device = first["acts"].device
    n, q = first["acts"].shape[0], first["left"].shape[0]
    if n == 0 or q == 0:  # nothing to launch (and no programs to divide the work among)
        return [torch.zeros((n, p["acts"].shape[1], q) if per_token else (n, q), dtype=torch.float32, device=device)
                for p in problems]
    compute = _compute_dtype(first)
    cfg = pick_config(H100, compute, INTERPRETER)
    # Ranks padded with zero columns to RP, a power of two and at least 8 (16-byte rows of
    # bf16): see the kernel's column mask. Zero columns add exactly 0 to every score.
    rp = padded_ranks([max_rank])[0]
    problems = [_pad_rank(p, rp) for p in problems]
    cfg["BLOCK_C"] = max(cfg["BLOCK_C"], rp)
    if rp * q < cfg["BLOCK_C"]:  # do not spend a big tile on few columns
        cfg["BLOCK_C"] = max(16, triton.next_power_of_2(rp * q))
    n_cb = triton.cdiv(q, cfg["BLOCK_C"] // rp)
    t_blocks = [triton.cdiv(p["acts"].shape[1], cfg["BLOCK_T"]) for p in problems]
    if splits is None:
        splits = triton.cdiv(4 * _num_sms(device), len(problems) * n * n_cb)
    splits = max(1, min(splits, max(t_blocks)))

    if per_token:
        outs = [torch.empty(n, p["acts"].shape[1], q, dtype=torch.float32, device=device) for p in problems]
    else:
        partial = torch.empty(len(problems), n, splits, q, dtype=torch.float32, device=device)
        outs = list(partial.unbind(0))

    rows = []
    for p, out, tb in zip(problems, outs, t_blocks):
        acts, grads, left, right, mask = p["acts"], p["grads"], p["left"], p["right"], p["mask"]
        mask_u8 = mask.view(torch.uint8) if mask is not None else None
        m_ptr, (s_mn, s_mt) = (mask_u8.data_ptr(), mask_u8.stride()) if mask is not None else (out.data_ptr(), (0, 0))
        rows.append([acts.data_ptr(), grads.data_ptr(), left.data_ptr(), right.data_ptr(), m_ptr, out.data_ptr(),
                     int(mask is not None), acts.shape[1], acts.shape[2], grads.shape[2], left.shape[2],
                     triton.cdiv(tb, splits) if tb else 0, *acts.stride(), *grads.stride(), *left.stride(),
                     *right.stride(), s_mn, s_mt, out.stride(0), out.stride(1)])
    desc = to_device(torch.tensor(rows, dtype=torch.int64), device)
    aligned, k_aligned = _aligned(problems), _k_aligned(problems)
    grid = (len(problems) * n * splits * n_cb,)
    if grid[0] > 0:
        launch(_factored_scores_kernel, grid,
            desc, n, q, splits, n_cb,
            ACT_T=TL_DTYPE[first["acts"].dtype], GRAD_T=TL_DTYPE[first["grads"].dtype],
            LEFT_T=TL_DTYPE[first["left"].dtype], RIGHT_T=TL_DTYPE[first["right"].dtype],
            COMPUTE=TL_DTYPE[compute], PER_TOKEN=per_token, RP=rp, NF=NF, ALIGNED=aligned, K_ALIGNED=k_aligned,
            # Aligned rows but K = 769 / 3073 (a bias column): whole unmasked slices, then the
            # tail on CUDA cores (bf16/fp16; the fp32 config has no register room for it).
            SPLIT_K_TAIL=aligned and not k_aligned and compute != torch.float32,
            **block_sizes(cfg), **dot_flags(compute), **launch_options(cfg))
    # Keep every tensor the table points at alive until the launch is queued (it is: the
    # problems list holds them); then reduce the token splits in a fixed order.
    if per_token:
        return outs
    if grid[0] == 0:
        return [torch.zeros(n, q, dtype=torch.float32, device=device) for _ in problems]
    # one tensor per layer, each with its own storage (views of one buffer would keep every
    # layer's scores alive, and torch.save of one would write them all)
    return [t.clone() for t in partial.sum(2).unbind(0)]


def _rank_slices(problems: Sequence[dict], per_token: bool, splits: Optional[int],
                 max_rank: int) -> List[torch.Tensor]:
    """Ranks above MAX_RANK, one launch per slice of MAX_RANK ranks, summed in slice order:
    the score is a sum over ranks, so slices of it add up. (One block holding all of a rank
    of 256 or more spills registers, and from 1024 needs more shared memory than an H100 has.)
    The slices are views: factors padded to whole slices (padded_ranks) are not copied."""
    results: List[Optional[torch.Tensor]] = [None] * len(problems)
    for k0 in range(0, max_rank, MAX_RANK):
        members = [i for i, p in enumerate(problems) if k0 == 0 or p["left"].shape[2] > k0]  # rank 0: zeros
        sliced = [dict(problems[i], left=problems[i]["left"][:, :, k0:k0 + MAX_RANK],
                       right=problems[i]["right"][:, :, k0:k0 + MAX_RANK]) for i in members]
        for i, out in zip(members, factored_scores_grouped(sliced, per_token=per_token, splits=splits)):
            results[i] = out if results[i] is None else results[i].add_(out)
    return results


def factored_scores(acts, grads, left, right, mask=None, per_token=False, splits=None) -> torch.Tensor:
    return factored_scores_grouped([dict(acts=acts, grads=grads, left=left, right=right, mask=mask)],
                                   per_token=per_token, splits=splits)[0]
