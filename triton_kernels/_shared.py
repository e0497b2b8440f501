"""Pieces shared by the pyinf Triton kernels: the dot helper, config selection, the
projection GEMM (factored scores and the rotation), and the masked rotation used by
eigen_correction and self_influence.

Two workarounds for Triton 3.6's interpreter (TRITON_INTERPRET=1, how these kernels are
tested on CPU), switched on by the INTERP_FIX constexpr, which is True only when
interpreting with bf16/fp16 operands; on a GPU it is False and the code is the plain one:
- it stores bf16 as raw uint16 and its ``tl.dot`` multiplies those integers, so bf16
  operands are widened to fp32 before the dot (:func:`mma`);
- its fp32 -> bf16 cast truncates instead of rounding to nearest even (a systematic bias,
  about 1% on eigen-corrections), so :func:`cast_rne` rounds by hand first.
bf16/fp16 tiles go to the tensor cores with fp32 accumulation; fp32 operands use
``input_precision="ieee"`` (IEEE) so fp32 results stay within 1e-4 of float64 (no tf32).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

# Decided once, at import, exactly as triton.jit decides whether to interpret.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Multiplies the interpreter's block sizes. The small default (16) puts block edges where
# the op tests' small shapes cross them; a whole-pipeline test raises it, since the
# interpreter's cost grows with the number of programs and loop steps, not with block size.
# Except BLOCK_K for 16-bit operands: there a biased layer's K (49 in the demo model) goes
# through whole K blocks and then a column-by-column tail (project's SPLIT_K_TAIL), so a
# K block of 64 would leave all 49 columns to the tail, one interpreted step each.
INTERPRETER_BLOCK_SCALE = 1

TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
            torch.uint8: tl.uint8}


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host-built table (tile lists, problem descriptors) on `device` without blocking
    the host: a copy from pageable memory synchronises the stream, which in a pass would drain
    the GPU's queue once per layer per batch. Pinned memory lets the copy run in order on the
    current stream (torch keeps the pinned buffer until the copy is done)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def dot_flags(compute_dtype: torch.dtype) -> dict:
    """IEEE / INTERP_FIX constexprs for :func:`mma` and :func:`cast_rne`."""
    fix = INTERPRETING and compute_dtype != torch.float32
    return dict(IEEE=compute_dtype == torch.float32 or fix, INTERP_FIX=fix)


def pick_config(table: dict, compute_dtype: torch.dtype, interpreter_config: dict) -> dict:
    """The launch config: one fixed small config under the interpreter (no autotuning on
    CPU), else the H100 entry for this operand dtype. The tables are explicit so that a
    first call never spends time autotuning."""
    if INTERPRETING:
        scaled = [k for k in interpreter_config
                  if k.startswith("BLOCK") and (k != "BLOCK_K" or compute_dtype == torch.float32)]
        return {k: v * INTERPRETER_BLOCK_SCALE if k in scaled else v for k, v in interpreter_config.items()}
    return dict(table[torch.float32 if compute_dtype == torch.float32 else torch.bfloat16])


def launch_options(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}


# The pipeline depth that fits each (kernel, device, launch) whose config asked for more shared
# memory than the device has per block (found once, then used directly).
_STAGES_THAT_FIT: dict = {}
# Kernels launched at exactly their config's stages: benchmarks.tune adds the kernel it
# sweeps, whose candidate configs must fail when they do not fit, not be timed with fewer
# stages under their names (the other kernels of the op keep retrying).
EXACT_STAGES: set = set()


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, with fewer pipeline stages on a GPU with less shared
    memory per block than the H100 the configs were written for (99 KiB on sm_86 / sm_89
    against 227 KiB: a 4-stage bf16 covariance tile needs 128 KiB). Triton refuses such a
    config when it loads the compiled kernel, before anything runs, so retrying is safe. On a
    GPU where every config fits (an H100), a launch costs one empty-dict check more."""
    if _STAGES_THAT_FIT:  # some config did not fit this process's GPU: maybe this one
        key = _stages_key(kernel, kwargs)
        if key in _STAGES_THAT_FIT:
            kwargs["num_stages"] = _STAGES_THAT_FIT[key]
    while True:
        try:
            kernel[grid](*args, **kwargs)
            return
        except OutOfResources:
            stages = kwargs.get("num_stages")
            if stages is None or stages <= 1 or INTERPRETING or kernel in EXACT_STAGES:
                raise
            kwargs["num_stages"] = stages - 1
            _STAGES_THAT_FIT[_stages_key(kernel, kwargs)] = stages - 1


def _stages_key(kernel, kwargs) -> tuple:
    """A launch's kernel, device and constexprs (what decides its shared memory), stages aside."""
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    return kernel, device, tuple(sorted((k, str(v)) for k, v in kwargs.items() if k != "num_stages"))


def block_sizes(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k.startswith("BLOCK")}


@triton.jit
def round_tf32(x):
    """fp32 -> the nearest tf32 value (10 mantissa bits, ties to even), kept in fp32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0xFFF + ((bits >> 13) & 1)
    return ((bits >> 13) << 13).to(tl.float32, bitcast=True)


@triton.jit
def mma(a, b, acc, IEEE: tl.constexpr, INTERP_FIX: tl.constexpr):
    """acc + a @ b, fp32 accumulate (see module docstring for IEEE / INTERP_FIX). INTERP_FIX
    without IEEE (the interpreter only): a tf32 dot as a GPU computes it, emulated, the
    operands rounded to tf32 (the interpreter's own tl.dot is an fp32 product)."""
    if INTERP_FIX:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        if not IEEE:
            a = round_tf32(a)
            b = round_tf32(b)
    if IEEE or INTERP_FIX:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def cast_rne(x, DT: tl.constexpr, INTERP_FIX: tl.constexpr):
    """x.to(DT), rounding fp32 -> bf16 to nearest even also under the interpreter."""
    if INTERP_FIX and (DT == tl.bfloat16 and x.dtype == tl.float32):  # no A and B and C in triton
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)  # exact in bf16 now
    return x.to(DT)


# ---------------------------------------------------------------------------------------
# The projection GEMM of the rotation and of the factored scores
# ---------------------------------------------------------------------------------------

@triton.jit
def _project_step(acc, x_rows, row_ok, s_xk, f_ptr, f_cols, col_ok, s_fd, k0, K, K_MASK: tl.constexpr,
                  COMPUTE: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, INTERP_FIX: tl.constexpr):
    """acc + x[rows, k0:k0+BLOCK_K] @ F[k0:k0+BLOCK_K, cols]. K_MASK=False: the slice lies
    inside K, so the loads carry row / column masks only, which are constant along k (the
    compiler can then vectorise and pipeline them)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if K_MASK:
        k_ok = offs_k < K
        x = tl.load(x_rows[:, None] + offs_k[None, :] * s_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        f = tl.load(f_ptr + f_cols[None, :] + offs_k.to(tl.int64)[:, None] * s_fd,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
    else:
        x = tl.load(x_rows[:, None] + offs_k[None, :] * s_xk, mask=row_ok[:, None], other=0.0)
        f = tl.load(f_ptr + f_cols[None, :] + offs_k.to(tl.int64)[:, None] * s_fd, mask=col_ok[None, :], other=0.0)
    return mma(cast_rne(x, COMPUTE, INTERP_FIX), cast_rne(f, COMPUTE, INTERP_FIX), acc, IEEE, INTERP_FIX)


@triton.jit
def project(x_rows, row_ok, s_xk, f_ptr, f_cols, col_ok, s_fd, K,
            COMPUTE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
            BLOCK_K: tl.constexpr, SPLIT_K_TAIL: tl.constexpr, IEEE: tl.constexpr, INTERP_FIX: tl.constexpr):
    """[BLOCK_T, BLOCK_C] = x[rows, :K] @ F[:K, cols], fp32 accumulate, operands cast to
    COMPUTE; masked rows are 0. x_rows: pointers to the rows' first elements; F's column c
    starts at f_ptr + f_cols[c], its rows s_fd apart.
    SPLIT_K_TAIL: whole BLOCK_K slices first without a k mask, then the rest column by column
    (K = 769 or 3073 for a layer with a bias column); else every slice is k-masked."""
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    if SPLIT_K_TAIL:
        k_main = (K // BLOCK_K) * BLOCK_K
        for k0 in range(0, k_main, BLOCK_K):
            acc = _project_step(acc, x_rows, row_ok, s_xk, f_ptr, f_cols, col_ok, s_fd, k0, K, False,
                                COMPUTE, BLOCK_K, IEEE, INTERP_FIX)
        # The rest (< BLOCK_K columns; one for a bias column) as rank-1 updates on CUDA cores:
        # a second tensor-core dot site here spills the factored kernel's two [128, 128] accumulators.
        for k in range(k_main, K):
            xk = tl.load(x_rows + k * s_xk, mask=row_ok, other=0.0).to(tl.float32)
            fk = tl.load(f_ptr + f_cols + k * s_fd, mask=col_ok, other=0.0).to(tl.float32)
            acc += xk[:, None] * fk[None, :]
    else:
        for k0 in range(0, K, BLOCK_K):
            acc = _project_step(acc, x_rows, row_ok, s_xk, f_ptr, f_cols, col_ok, s_fd, k0, K, True,
                                COMPUTE, BLOCK_K, IEEE, INTERP_FIX)
    return acc


# ---------------------------------------------------------------------------------------
# Rotation into an eigenbasis: out[n, t, c] = sum_k where(mask[n,t], x[n,t,k], 0) * q[k, col0 + c]
# An ordinary GEMM; the mask is applied on the load (tl.where semantics via `other=0`), so
# NaN/Inf in padding rows never enters the product and rotated padding rows are exactly 0.
# ---------------------------------------------------------------------------------------

ROTATE_H100 = {
    # bf16 / fp16 operands, fp32 rotated tokens out: one warpgroup on a 128 x 64 tile. Two
    # warpgroups on 128 x 128 (the tile of a bf16 output) have ptxas serialise their wgmma
    # (C7515) once the stores are fp32 (benchmarks/compiled.py; not yet timed on a GPU).
    torch.bfloat16: dict(BLOCK_T=128, BLOCK_C=64, BLOCK_K=64, num_warps=4, num_stages=4),
    torch.float32: dict(BLOCK_T=64, BLOCK_C=64, BLOCK_K=32, num_warps=4, num_stages=3),
}
ROTATE_INTERPRETER = dict(BLOCK_T=16, BLOCK_C=16, BLOCK_K=16)


@triton.jit
def _rotate_kernel(x_ptr, m_ptr, q_ptr, out_ptr,
                   T, K, C, col0,
                   s_xn, s_xt, s_xk, s_mn, s_mt, s_qk, s_qc, s_on, s_ot,
                   HAS_MASK: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_K: tl.constexpr, SPLIT_K_TAIL: tl.constexpr, IEEE: tl.constexpr,
                   INTERP_FIX: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = offs_t < T
    if HAS_MASK:
        row_ok &= tl.load(m_ptr + n * s_mn + offs_t * s_mt, mask=row_ok, other=0) != 0
    col_ok = offs_c < C
    x_rows = x_ptr + n * s_xn + offs_t.to(tl.int64) * s_xt
    acc = project(x_rows, row_ok, s_xk, q_ptr, (col0 + offs_c).to(tl.int64) * s_qc, col_ok, s_qk, K,
                  COMPUTE, BLOCK_T, BLOCK_C, BLOCK_K, SPLIT_K_TAIL, IEEE, INTERP_FIX)
    out = out_ptr + n * s_on + offs_t.to(tl.int64)[:, None] * s_ot + offs_c[None, :]
    tl.store(out, cast_rne(acc, out_ptr.dtype.element_ty, INTERP_FIX), mask=(offs_t < T)[:, None] & col_ok[None, :])


def rotate(x: torch.Tensor, mask, q: torch.Tensor, col0: int, width: int, out: torch.Tensor) -> torch.Tensor:
    """out[n, t, :width] = masked(x)[n, t] @ q[:, col0:col0+width]. x is [n, T, K] with any
    strides and dtype; q [K, K] is already in the compute dtype; out [n, T, width] has
    unit inner stride and the compute dtype (it is the rotated-token temporary)."""
    n, t, k = x.shape
    cfg = pick_config(ROTATE_H100, q.dtype, ROTATE_INTERPRETER)
    m = mask if mask is not None else out  # dummy pointer, never read when HAS_MASK=False
    grid = (triton.cdiv(t, cfg["BLOCK_T"]), triton.cdiv(width, cfg["BLOCK_C"]), n)
    launch(_rotate_kernel, grid,
        x, m, q, out, t, k, width, col0,
        x.stride(0), x.stride(1), x.stride(2),
        m.stride(0) if mask is not None else 0, m.stride(1) if mask is not None else 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        HAS_MASK=mask is not None, COMPUTE=TL_DTYPE[q.dtype],
        # K = 769 / 3073 (a bias column): whole unmasked slices, then the tail (bf16/fp16).
        SPLIT_K_TAIL=k % 16 != 0 and q.dtype != torch.float32, **block_sizes(cfg),
        **dot_flags(q.dtype), **launch_options(cfg))
    return out


# Bytes the rotated-token temporaries (a @ Q_A and g @ Q_S for a chunk of documents) may
# take. 32 MiB is under 5% of the 720 MB [N, d_out, d_in] fp32 temporary the unfused route
# builds at Llama-7B up_proj size (N=4). Tests lower it to exercise chunking and slabs.
ROTATED_TEMP_BYTES = 32 << 20
# A CUDA grid's y and z dimensions hold at most this many programs.
GRID_YZ_LIMIT = 65535


def rotation_plan(n: int, t: int, d_in: int, d_out: int, elsize: int, block_i: int, budget: int):
    """(documents per chunk, d_out columns per slab) so that the rotated temporaries of one
    step, a~ [docs, T, d_in] + g~ [docs, T, slab], fit in `budget` bytes. When one
    document's rotated tokens do not fit, g~ is produced in slabs of d_out columns (whole
    BLOCK_I tiles) and each slab is contracted against the same a~; rotation work is not
    repeated. If a~ of one document alone exceeds the budget, the budget is exceeded
    (one document, one BLOCK_I slab is the smallest step)."""
    per_doc = t * (d_in + d_out) * elsize
    if per_doc <= budget or t == 0:
        # documents are the rotation's and self-influence's grid z: at most 65535 on a GPU
        return max(1, min(n, budget // max(1, per_doc), GRID_YZ_LIMIT)), d_out
    spare_cols = (budget - t * d_in * elsize) // (t * elsize)
    slab = max(block_i, spare_cols // block_i * block_i)
    return 1, min(slab, d_out)
