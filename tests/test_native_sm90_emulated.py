"""The native Hopper kernel (csrc/cuda/factored_scores_sm90.cu), UNMODIFIED, run on the CPU in
the CUDA emulation (tests/cuda_emu/) and checked against the float64 reference.

Until a GPU session runs it, this is the only execution of the kernel. The emulation of
test_native_emulated.py (the launch, block threads, barriers, shared memory poisoning, the
device-pointer checks) is extended by emu_sm90.cpp with the Hopper instructions the kernel
issues through CuTe: TMA tensor loads from tensor maps made by CUTLASS's own host code
(cuTensorMapEncodeTiled is emulated with the driver's documented checks), mbarriers with
arrival counts, transaction bytes and phases, wgmma with both operands in shared memory, and
named barriers. sm90_overlay.py replaces CuTe's inline-PTX branches by calls of those; every
layout, partition, swizzle atom and descriptor is CuTe's code, and the emulation decodes the
descriptors and places the accumulator fragments from the PTX ISA, not from CuTe.

What it shows: the kernel's index arithmetic (tiles, K steps of both products, rank padding,
partials and their sum, per-token output), its use of CuTe (TMA boxes, the 128-byte swizzle
both ways, wgmma descriptors, accumulator coordinates in the epilogue), its barrier protocol
under real concurrency (a wgmma reads its stage only when waited for, so releasing a stage
early reads the next step's data; a wgmma issued before its thread waited for the stage's TMA
load is an error), masking (NaN / Inf in masked rows), and the host's
workspace layout, alignment and applicability checks. What it cannot show: speed, register
or shared-memory bank behaviour, and anything the hardware does that the PTX ISA leaves
unspecified (the emulated wgmma accumulates K in order, with fmaf).
tests/cuda_emu/mutants.py (the sm90 entries) breaks the kernel on purpose: each must fail here.
"""
from __future__ import annotations

import ctypes
import os

import pytest
import torch

from pyinf.ops import reference

from .test_native_emulated import (
    FMA_KERNEL,
    FP32_ACC_TOL,
    SEED,
    TC_KERNEL,
    Out,
    check_call,
    _SIGNATURES,
    PyinfTensor,
    _ctx,
    _desc,
    _f64,
    _gen,
    _problem,
    assert_close,
    emulate,
    env,
    factored_scores_split,
    guarded,
)

_why = emulate.missing_sm90_prerequisites()
if _why:
    pytest.skip(f"Hopper kernel emulation unavailable: {_why}", allow_module_level=True)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ["1", "wait0", "ws"]  # PYINF_NATIVE_SM90: the three K-loop variants

# (n, t, d_in, d_out, q, r). Contiguous rows need d % 8 == 0 (16-byte TMA strides); odd widths
# come as padded rows (test_sm90_padded_rows).
SHAPES = {
    "token-tiles": (2, 150, 72, 200, 3, 5),  # 2 token tiles (partials + sum), K tails in both loops
    "column-tiles": (1, 40, 64, 136, 20, 16),  # rank 16 (no padding): 8 queries a tile, 3 column tiles, the last partial
    "rank-128": (1, 17, 24, 16, 2, 100),  # rank 100 -> 128: one query per column tile
    "T=1": (3, 1, 8, 8, 1, 1),  # one token, rank 1 -> 8
}


@pytest.fixture(scope="module")
def lib():
    root = os.environ.get("PYINF_EMU_BUILD_ROOT")
    try:
        info = emulate.build(root, sm90=True)
    except emulate.EmulationError as exc:
        pytest.fail(f"the emulated CUDA build with the Hopper kernel failed:\n{exc}")
    print(f"\nemulated libpyinf with sm90: {info['lib']} "
          f"({'cached' if info['cached'] else 'built in %.1f s' % info['seconds']}), seed {SEED}")
    handle = ctypes.CDLL(info["lib"])
    sigs = dict(_SIGNATURES)
    sigs["pyinf_cuda_sm90_compiled"] = (ctypes.c_int, [])
    t = ctypes.POINTER(PyinfTensor)
    sigs["pyinf_cuda_factored_scores_kernel"] = (
        ctypes.c_int, [t, t, t, t, ctypes.c_int, ctypes.c_size_t, ctypes.POINTER(ctypes.c_char_p)])
    sigs["pyinf_cuda_factored_scores_pack_size"] = (ctypes.c_int, [t, t, ctypes.POINTER(ctypes.c_size_t)])
    sigs["pyinf_cuda_factored_scores_pack"] = (ctypes.c_int, [t, t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p])
    sigs["pyinf_cuda_factored_scores_packed_workspace_size"] = sigs["pyinf_cuda_factored_scores_workspace_size"]
    sigs["pyinf_cuda_factored_scores_split_packed"] = (
        ctypes.c_int, [t, t, t, t, ctypes.c_void_p, ctypes.c_size_t, t, ctypes.c_int, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p])
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(handle, name)
        fn.restype, fn.argtypes = restype, argtypes
    assert handle.pyinf_cuda_compiled() == 1
    assert handle.pyinf_cuda_sm90_compiled() == 1, "the emulated build did not compile the Hopper kernel in"
    return handle


def kernel_name(lib, acts, grads, left, right, per_token, workspace_bytes):
    name = ctypes.c_char_p()
    s = lib.pyinf_cuda_factored_scores_kernel(_desc(lib, acts), _desc(lib, grads), _desc(lib, left),
                                              _desc(lib, right), 1 if per_token else 0, workspace_bytes,
                                              ctypes.byref(name))
    assert s == 0, lib.pyinf_last_error().decode()
    return name.value.decode()


def sm90_problem(key, shape, dtype):
    """A random problem with NaN / Inf in the masked token rows (never to be read into a
    score), all inputs surrounded by NaN; (inputs, clean acts, clean grads)."""
    n, t, d_in, d_out, q, r = shape
    g = _gen("sm90", *key)
    acts, grads, left, right, mask = _problem(g, n, t, d_in, d_out, q, r, dtype)
    clean_a, clean_g = acts.clone(), grads.clone()
    acts[~mask] = float("nan")
    grads[~mask] = float("inf")
    return [guarded(x) for x in (acts, grads, left, right)] + [guarded(mask)], clean_a, clean_g


def run_sm90(lib, args, per_token, ctx, mode="1"):
    """One call through pyinf_cuda_factored_scores_split that must run the Hopper kernel."""
    with env(PYINF_NATIVE_SM90=mode):
        out, log, nbytes = factored_scores_split(lib, *args, per_token, ctx, expect_kernels=["sm90_kernel"],
                                                 forbid_kernels=[TC_KERNEL, FMA_KERNEL])
    return out, log


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_sm90_matches_the_reference(lib, shape, dtype):
    """Default mode: document and per-token scores against float64; masked tokens score exactly
    0; the second call (another block order) is bit-identical."""
    args, clean_a, clean_g = sm90_problem((shape, dtype), SHAPES[shape], DTYPES[dtype])
    left, right, mask = args[2], args[3], args[4]
    for per_token in (False, True):
        ctx = _ctx("sm90", shape, dtype, "per_token" if per_token else "document")
        out, _ = run_sm90(lib, args, per_token, ctx)
        ref = reference.factored_scores(*_f64(clean_a, clean_g, left, right), mask=mask, per_token=per_token)
        assert_close(out, ref, FP32_ACC_TOL, ctx)
        if per_token:
            assert (out[~mask] == 0).all(), f"masked tokens must score exactly 0 {ctx}"
        else:
            again, _ = run_sm90(lib, args, per_token, ctx)
            assert torch.equal(out, again), f"two calls differ {ctx}"


@pytest.mark.parametrize("mode", ["wait0", "ws"])
def test_sm90_modes_agree_with_the_default(lib, mode):
    """wait0 and ws run the same wgmma sequence and epilogue: bit-identical to mode 1."""
    shape = SHAPES["token-tiles"]
    args, clean_a, clean_g = sm90_problem(("modes", mode), shape, torch.bfloat16)
    for per_token in (False, True):
        ctx = _ctx("sm90 modes", mode, per_token)
        default, _ = run_sm90(lib, args, per_token, ctx)
        out, _ = run_sm90(lib, args, per_token, ctx, mode=mode)
        assert torch.equal(out, default), f"mode {mode} differs from mode 1 {ctx}"


@pytest.mark.parametrize("ctas", ["1", "3"])
def test_sm90_persistent_grid(lib, ctas):
    """ws on a capped persistent grid: each CTA takes several tiles in turn, its pipeline
    running on across them (the next tile's loads during this tile's epilogue)."""
    shape = (3, 150, 72, 200, 9, 16)  # 3 documents x 2 token tiles x 2 column tiles = 12 tiles
    args, clean_a, clean_g = sm90_problem(("persistent", ctas), shape, torch.bfloat16)
    ctx = _ctx("sm90 persistent", ctas)
    default, _ = run_sm90(lib, args, False, ctx)
    with env(PYINF_NATIVE_SM90_CTAS=ctas):
        out, log = run_sm90(lib, args, False, ctx, mode="ws")
    assert f"sm90_kernel grid=({ctas},1,1) block=(384,1,1)" in log, (log, ctx)
    assert torch.equal(out, default), f"persistent grid of {ctas} differs from one CTA per tile {ctx}"
    ref = reference.factored_scores(*_f64(clean_a, clean_g, args[2], args[3]), mask=args[4])
    assert_close(out, ref, FP32_ACC_TOL, ctx)


def test_sm90_padded_rows(lib):
    """Odd widths as the capture stores them (rows padded to 8 elements; a biased layer's
    [acts, 1]): TMA reads d_in = 73 of each 80-element row, the padding (NaN here) stays out."""
    n, t, d_in, d_out, q, r = 2, 70, 73, 40, 4, 7
    g = _gen("sm90 padded", SEED)
    acts_buf = torch.full((n, t, 80), float("nan")).to(torch.bfloat16)
    acts_buf[..., :d_in] = torch.randn(n, t, d_in, generator=g).to(torch.bfloat16)
    acts = acts_buf[..., :d_in]
    grads = torch.randn(n, t, d_out, generator=g).to(torch.bfloat16)
    left = torch.randn(q, d_out, r, generator=g).to(torch.bfloat16)
    right = torch.randn(q, d_in, r, generator=g).to(torch.bfloat16)
    mask = torch.rand(n, t, generator=g) > 0.2
    ctx = _ctx("sm90 padded rows")
    out, _ = run_sm90(lib, [acts, grads, left, right, mask], False, ctx)
    ref = reference.factored_scores(*_f64(acts, grads, left, right), mask=mask)
    assert_close(out, ref, FP32_ACC_TOL, ctx)


def test_sm90_applicability(lib):
    """Where the Hopper kernel does not apply, the call takes the WMMA kernel and still agrees
    with the reference: rows TMA cannot read (d_out = 100: 200-byte rows), mixed dtypes,
    fp32, a workspace too small, rank over 128, and the opt-in unset."""
    g = _gen("sm90 fallbacks", SEED)
    n, t, d_in, d_out, q, r = 1, 20, 16, 24, 2, 4
    acts, grads, left, right, mask = _problem(g, n, t, d_in, d_out, q, r, torch.bfloat16)
    nbytes = ctypes.c_size_t(0)
    with env(PYINF_NATIVE_SM90="1"):  # the size asked for includes the Hopper kernel's workspace when it applies
        s = lib.pyinf_cuda_factored_scores_workspace_size(_desc(lib, acts), _desc(lib, grads), _desc(lib, left),
                                                          _desc(lib, right), 0, ctypes.byref(nbytes))
        assert s == 0
        assert kernel_name(lib, acts, grads, left, right, False, nbytes.value) == "sm90"
        assert kernel_name(lib, acts, grads, left, right, False, nbytes.value - 1) == "wmma"
        assert kernel_name(lib, acts, grads, left, right, False, 0) == "wmma"
        assert kernel_name(lib, acts.float(), grads.float(), left.float(), right.float(), False, 1 << 30) == "fma"
        assert kernel_name(lib, acts, grads, left.half(), right, False, 1 << 30) == "fma"
        wide = torch.randn(1, 20, 100).to(torch.bfloat16)
        assert kernel_name(lib, acts, wide, torch.randn(2, 100, 4).to(torch.bfloat16), right, False,
                           1 << 30) == "wmma"
        big_r = torch.randn(2, 24, 129).to(torch.bfloat16), torch.randn(2, 16, 129).to(torch.bfloat16)
        assert kernel_name(lib, acts, grads, *big_r, False, 1 << 30) == "wmma"
        misaligned = torch.empty(n * t * d_in + 1, dtype=torch.bfloat16)[1:].view(n, t, d_in)
        misaligned.copy_(acts)
        assert kernel_name(lib, misaligned, grads, left, right, False, 1 << 30) == "wmma"
        ctx = _ctx("sm90 fallback: rows TMA cannot read")
        right_w = torch.randn(q, 100, r).to(torch.bfloat16)
        acts_w = torch.randn(n, t, 100).to(torch.bfloat16)
        out, _, _ = factored_scores_split(lib, acts_w, grads, left, right_w, mask, False, ctx,
                                          forbid_kernels=["sm90_kernel"])
        assert_close(out, reference.factored_scores(*_f64(acts_w, grads, left, right_w), mask=mask),
                     FP32_ACC_TOL, ctx)
    for off in (None, "0", "yes"):
        with env(PYINF_NATIVE_SM90=off):
            assert kernel_name(lib, acts, grads, left, right, False, nbytes.value) == "wmma", off


def _pack_size(lib, left, right):
    nbytes = ctypes.c_size_t(0)
    s = lib.pyinf_cuda_factored_scores_pack_size(_desc(lib, left), _desc(lib, right), ctypes.byref(nbytes))
    assert s == 0, lib.pyinf_last_error().decode()
    return nbytes.value


def _workspace_size(lib, acts, grads, left, right, per_token, packed):
    nbytes = ctypes.c_size_t(0)
    size = (lib.pyinf_cuda_factored_scores_packed_workspace_size if packed
            else lib.pyinf_cuda_factored_scores_workspace_size)
    s = size(_desc(lib, acts), _desc(lib, grads), _desc(lib, left), _desc(lib, right), 1 if per_token else 0,
             ctypes.byref(nbytes))
    assert s == 0, lib.pyinf_last_error().decode()
    return nbytes.value


def _split_packed(lib, acts, grads, left, right, packed, mask, per_token, ctx, workspace=True, packed_bytes=None):
    """pyinf_cuda_factored_scores_split_packed with the workspace the packed call asks for;
    (status, scores, launch log)."""
    n, t = acts.shape[:2]
    q = left.shape[0]
    nbytes = ctypes.c_size_t(_workspace_size(lib, acts, grads, left, right, per_token, True) if workspace else 0)
    ws = Out(None, nbytes=nbytes.value) if nbytes.value else None
    out = Out((n, t, q) if per_token else (n, q))
    lib.pyinf_emu_reset()
    out.register(lib)
    packed.register(lib)
    if ws is not None:
        ws.t.view(torch.uint8).fill_(0x7F)
        ws.register(lib)
    s = lib.pyinf_cuda_factored_scores_split_packed(
        _desc(lib, acts), _desc(lib, grads), _desc(lib, left), _desc(lib, right), packed.ptr,
        packed.nbytes if packed_bytes is None else packed_bytes, _desc(lib, mask), 1 if per_token else 0, out.ptr,
        ws.ptr if ws is not None else None, nbytes.value, None)
    log = lib.pyinf_emu_launch_log().decode()
    if s == 0:
        check_call(lib, s, ctx)
        out.check_canaries(ctx)
        packed.check_canaries(ctx)
        if ws is not None:
            ws.check_canaries(ctx)
    return s, out.t.clone(), log


def test_sm90_packed_factors(lib):
    """Factors packed once (pyinf_cuda_factored_scores_pack) serve several batches of documents:
    those calls launch no factor copy and give the bits of the unpacked call; per-token scores
    then need no workspace at all; sizes and misuse are checked before anything is launched."""
    n, t, d_in, d_out, q, r = 2, 150, 72, 200, 3, 5
    g = _gen("sm90 packed", SEED)
    left = guarded(torch.randn(q, d_out, r, generator=g).to(torch.bfloat16))
    right = guarded(torch.randn(q, d_in, r, generator=g).to(torch.bfloat16))
    with env(PYINF_NATIVE_SM90="1"):
        nbytes = _pack_size(lib, left, right)
        cp, rp = 128, 8  # 3 queries of rank 5 -> 8: one column tile
        assert nbytes == (cp * d_out * 2 + 127) // 128 * 128 + (cp * d_in * 2 + 127) // 128 * 128, nbytes
        packed = Out(None, nbytes=nbytes)
        lib.pyinf_emu_reset()
        packed.register(lib)
        s = lib.pyinf_cuda_factored_scores_pack(_desc(lib, left), _desc(lib, right), packed.ptr, nbytes, None)
        check_call(lib, s, _ctx("sm90 pack"), expect_kernels=["pad_factor_kernel<T>"])
        packed.check_canaries("pack")
        for batch in range(2):
            args, clean_a, clean_g = sm90_problem(("packed", batch), (n, t, d_in, d_out, q, r), torch.bfloat16)
            args[2], args[3] = left, right
            # with packed factors the workspace no longer holds a copy of them: the partial sums
            # (2 documents x 2 token tiles x 3 queries) or the WMMA fallback's split, whichever is larger
            partials = n * 2 * q * 4
            with_packed = _workspace_size(lib, *args[:4], False, True)
            assert partials <= with_packed < nbytes, (with_packed, nbytes)
            assert _workspace_size(lib, *args[:4], False, False) >= nbytes + partials
            for per_token in (False, True):
                ctx = _ctx("sm90 packed", batch, per_token)
                s, out, log = _split_packed(lib, *args[:4], packed, args[4], per_token, ctx)
                assert s == 0 and "sm90_kernel" in log and "pad_factor_kernel" not in log, (s, log, ctx)
                unpacked, _ = run_sm90(lib, args, per_token, ctx)
                assert torch.equal(out, unpacked), f"packed and unpacked calls differ {ctx}"
                ref = reference.factored_scores(*_f64(clean_a, clean_g, left, right), mask=args[4],
                                                per_token=per_token)
                assert_close(out, ref, FP32_ACC_TOL, ctx)
        ctx = _ctx("sm90 packed, per token, no workspace")
        s, out, log = _split_packed(lib, *args[:4], packed, args[4], True, ctx, workspace=False)
        assert s == 0 and "sm90_kernel" in log, (s, log)
        s, _, log = _split_packed(lib, *args[:4], packed, args[4], False, ctx, packed_bytes=nbytes - 1)
        assert s == 5 and "packed factors have" in lib.pyinf_last_error().decode() and log == "", (s, log)
        s = lib.pyinf_cuda_factored_scores_pack(_desc(lib, left), _desc(lib, right), packed.ptr, nbytes - 1, None)
        assert s == 5 and f"needs {nbytes} bytes" in lib.pyinf_last_error().decode()
        s = lib.pyinf_cuda_factored_scores_pack(_desc(lib, left), _desc(lib, right.half()), packed.ptr, nbytes, None)
        assert s == 1 and "cannot take these factors" in lib.pyinf_last_error().decode()  # mixed dtypes
        assert _pack_size(lib, left.float(), right.float()) == 0  # fp32: the Hopper kernel does not apply
    assert _pack_size(lib, left, right) == 0  # not opted in
    s = lib.pyinf_cuda_factored_scores_pack(_desc(lib, left), _desc(lib, right), packed.ptr, nbytes, None)
    assert s == 1 and "cannot take these factors" in lib.pyinf_last_error().decode()


def test_sm90_workspace_misuse_is_refused_before_any_launch(lib):
    """A workspace or packed buffer not 16-byte aligned was handed to TMA, whose failed encoding
    CuTe only asserts (nothing in a release build): the kernel launched with a zeroed
    descriptor. Packed factors with a NULL workspace and a nonzero size put the partial sums at
    address 0. A misaligned buffer is refused with PYINF_ERROR_WORKSPACE (5) before anything is
    launched; the NULL workspace keeps the call off the Hopper kernel."""
    shape = (2, 150, 72, 200, 3, 5)  # two token tiles: document scores need partial sums
    args, clean_a, clean_g = sm90_problem(("misuse", 0), shape, torch.bfloat16)
    acts, grads, left, right, mask = args
    n, q = acts.shape[0], left.shape[0]
    with env(PYINF_NATIVE_SM90="1"):
        need = _workspace_size(lib, acts, grads, left, right, False, False)
        ws, out = Out(None, nbytes=need + 16), Out((n, q))
        lib.pyinf_emu_reset()
        ws.register(lib)
        out.register(lib)
        s = lib.pyinf_cuda_factored_scores_split(_desc(lib, acts), _desc(lib, grads), _desc(lib, left),
                                                 _desc(lib, right), _desc(lib, mask), 0, out.ptr, ws.ptr + 2, need,
                                                 None)
        assert s == 5 and "'workspace' must be 16-byte aligned" in lib.pyinf_last_error().decode()
        assert lib.pyinf_emu_launch_log().decode() == ""
        nbytes = _pack_size(lib, left, right)
        packed = Out(None, nbytes=nbytes + 16)
        lib.pyinf_emu_reset()
        packed.register(lib)
        s = lib.pyinf_cuda_factored_scores_pack(_desc(lib, left), _desc(lib, right), packed.ptr + 8, nbytes, None)
        assert s == 5 and "'packed' must be 16-byte aligned" in lib.pyinf_last_error().decode()
        s = lib.pyinf_cuda_factored_scores_pack(_desc(lib, left), _desc(lib, right), packed.ptr, nbytes, None)
        assert s == 0
        lib.pyinf_emu_reset()
        packed.register(lib)
        out.register(lib)
        s = lib.pyinf_cuda_factored_scores_split_packed(
            _desc(lib, acts), _desc(lib, grads), _desc(lib, left), _desc(lib, right), packed.ptr, nbytes,
            _desc(lib, mask), 0, out.ptr, None, _workspace_size(lib, acts, grads, left, right, False, True), None)
        log = lib.pyinf_emu_launch_log().decode()
        if s == 0:  # the portable kernel, without partial sums
            ctx = _ctx("sm90 packed, NULL workspace")
            check_call(lib, s, ctx)
            assert "sm90_kernel" not in log, log
            ref = reference.factored_scores(*_f64(clean_a, clean_g, left, right), mask=mask, per_token=False)
            assert_close(out.t, ref, FP32_ACC_TOL, ctx)
        else:
            assert s == 5 and "needs a workspace" in lib.pyinf_last_error().decode() and log == "", (s, log)


@pytest.mark.parametrize("per_token", [False, True])
def test_sm90_kernel_query_for_a_packed_call(lib, per_token):
    """The kernel query describes the unpacked call, whose workspace also holds the packed
    factors: asked with the packed call's workspace plus the packed bytes (what
    tests/test_native_sm90.py's recorder does on the GPU) it names the kernel the packed call
    runs, "sm90"; with the packed call's workspace alone it would say "wmma"."""
    for n, t, d_in, d_out, q, r in [(12, 32, 64, 64, 3, 32), (2, 70, 48, 40, 3, 16)]:
        acts, grads = torch.randn(n, t, d_in).bfloat16(), torch.randn(n, t, d_out).bfloat16()
        left, right = torch.randn(q, d_out, r).bfloat16(), torch.randn(q, d_in, r).bfloat16()
        with env(PYINF_NATIVE_SM90="1"):
            packed_ws = _workspace_size(lib, acts, grads, left, right, per_token, True)
            pack = _pack_size(lib, left, right)
            assert pack > 0
            assert _workspace_size(lib, acts, grads, left, right, per_token, False) <= packed_ws + pack
            assert kernel_name(lib, acts, grads, left, right, per_token, packed_ws + pack) == "sm90"
