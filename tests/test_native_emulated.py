"""The CUDA kernels of csrc/cuda/*.cu, UNMODIFIED, executed on the CPU by an emulation
(tests/cuda_emu/) and checked against the float64 reference (pyinf.ops.reference).

What is emulated (tests/cuda_emu/emulate.py, cuda_runtime.h, mma.h, emu_runtime.cpp): the
.cu files are compiled with g++ as C++ after two line-preserving rewrites (each
``kernel<<<grid, block, smem, stream>>>(args)`` becomes a call of the emulated launcher;
each ``__shared__`` array is registered for poisoning), against emulation headers for the
CUDA keywords, built-ins, ``__syncthreads`` and ``nvcuda::wmma``, with the real CUDA
headers for the bf16 / fp16 types and conversions. The library is the same as a CUDA
build of libpyinf (api.cpp, csrc/cpu, the .cu sources, PYINF_WITH_CUDA) with "device
memory" being host memory: the tests pass host pointers of CPU tensors and stream NULL to
the ``pyinf_cuda_*`` entry points of the C API. The blocks of a grid run one after another;
each block runs all its threads as real concurrent threads (pthreads); ``__shared__`` arrays are
function-local statics (shared by the running block's threads), poisoned before every block
(NaN for floating types, 0x7f.. for integers); ``__syncthreads`` is a barrier over the
block; ``wmma::mma_sync`` is a warp collective that exchanges the lanes' fragment elements
through per-warp scratch memory behind a 32-thread barrier; tf32 operands are truncated to
10 mantissa bits inside mma_sync as the hardware does, ``__float_to_tf32`` rounds to nearest
with ties away from zero.

Asynchronous copies (cp.async through cuda_pipeline_primitives.h, the WMMA kernel's double
buffering) are queued per thread and carried out only when __pipeline_wait_prior retires
their group, after checking the real header's rules (size, zfill, alignment, a shared-memory
destination): reading a stage too early sees its old contents.

Faithful: the sources' semantics, i.e. the index arithmetic, staging, masking, bounds
checks, reduction orders and fp32 / tf32 / bf16 / fp16 arithmetic of every kernel and of the
host code that sizes grids and workspaces; the WMMA API contract as far as the kernels use
it (fragment shapes and element counts, row/col-major loads, pointer alignment and ldm
rules, elementwise work on accumulator fragments of one type). Shared-memory races (a
missing or misplaced __syncthreads) are exposed only as far as real concurrent threads
happen to expose them; reads of shared memory the current block did not write are exposed
by the poisoning. Launch configurations are checked like the runtime (block size <= 1024,
grid y/z <= 65535, ...).

Not faithful: timing and performance; real warp scheduling (the threads of a warp are not
in lockstep here, which is at least as strict for code that does not rely on lockstep); the
GPU memory model and caches (every access is a plain host access, barriers are full memory
fences); the real WMMA fragment layout (any consistent mapping; here lane l holds elements
l*E..l*E+E-1 in row-major order) and the exact accumulation order inside one hardware MMA
(k order with fmaf here); resource limits such as registers and the 48 KiB static shared
memory limit (checked by hand: every kernel stays below it); out-of-bounds global accesses
do not fault (the tests surround every input with NaN and every output and workspace with
canaries, which catches what lands within those guards). The accumulation-order point
means a tensor-core result can differ from the GPU in the last bits; tolerances below
cover that.

Also checked on every call: the launch configuration (as the runtime does), the static
shared memory of each block (<= 48 KiB), that every pointer a kernel receives lies in a
buffer the test passed (a host-only pointer would fault on a GPU), divergent barriers (a
thread returning while others wait at __syncthreads, or a barrier reached after some
threads returned), the WMMA pointer / ldm rules, and which kernels ran (the tensor-core
ones exactly when pyinf.h's rule says: 16-bit inputs unless PYINF_NATIVE_TC=0, fp32 eigen
ops too with PYINF_NATIVE_TC=1). The blocks of a grid run in a
shuffled order that changes between launches, so the determinism checks (two calls, bit
for bit) also compare two block orders. tests/test_native_sm90_emulated.py runs the Hopper kernel the same way, with
TMA, mbarriers and wgmma emulated too (tests/cuda_emu/emu_sm90.cpp). tests/cuda_emu/mutants.py shows that deliberate
bugs (missing barriers, an unzeroed shared array, out-of-bounds reads, a wrong WMMA
layout) make these tests fail.

Tolerances: the reference sees the very inputs the kernel reads (bf16 / fp16 values are
exact in float64), so the only error is the kernels' fp32 accumulation (1e-5, tighter than
test_native.py's per-dtype TOLERANCE, which also allows for input rounding) or their TF32
rounding (3e-3; see TF32_TOL). Inputs are random each run; the seed is in
every assertion message and PYINF_EMU_SEED=<seed> reproduces a run.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import random
import zlib

import pytest
import torch

from pyinf.ops import reference

from . import oracle

HERE = os.path.dirname(os.path.abspath(__file__))

_spec = importlib.util.spec_from_file_location("pyinf_cuda_emulate", os.path.join(HERE, "cuda_emu", "emulate.py"))
emulate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(emulate)

_why = emulate.missing_prerequisites()
if _why:
    pytest.skip(f"CUDA emulation unavailable: {_why}", allow_module_level=True)

SEED = int(os.environ.get("PYINF_EMU_SEED") or random.SystemRandom().randrange(2**31))

FP32_ACC_TOL = 1e-5  # fp32 accumulation of exactly represented inputs (measured: <= 7e-7)
# Operands rounded to TF32. For a single token (shape "one") the TF32 error of
# eigen_correction is itself about 1e-3: over 500 seeds, median 7.6e-4, p99 1.6e-3, max
# 2.07e-3. 3e-3 (as test_native.py's TC_TOLERANCE for fp32) keeps this test from flaking; a
# lost token or tile still costs far more (>= 1e-2).
TF32_TOL = 3e-3

PYINF_DTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.bool: 3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_ID = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# PYINF_NATIVE_TC "0" (the fp32 FMA kernels for every call) / "1" (tensor cores, fp32 inputs
# of the eigen ops included). Unset, the default rule (tensor cores for 16-bit inputs) picks
# one of those two paths per call: test_tc_flag_values checks which.
TC_MODES = ["0", "1"]
TC_ID = {None: "tc-unset", "0": "tc0", "1": "tc1"}


class PyinfTensor(ctypes.Structure):  # csrc/include/pyinf/pyinf.h
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("dtype", ctypes.c_int),  # pyinf_dtype (a C enum)
        ("ndim", ctypes.c_int32),
        ("shape", ctypes.c_int64 * 3),
        ("strides", ctypes.c_int64 * 3),
    ]


_T = ctypes.POINTER(PyinfTensor)


class PyinfFactoredProblem(ctypes.Structure):  # pyinf.h: one problem of a grouped call
    _fields_ = [("acts", _T), ("grads", _T), ("left", _T), ("right", _T), ("mask", _T), ("out", ctypes.c_void_p)]

_SIGNATURES = {
    "pyinf_status_string": (ctypes.c_char_p, [ctypes.c_int]),
    "pyinf_last_error": (ctypes.c_char_p, []),
    "pyinf_cuda_compiled": (ctypes.c_int, []),
    "pyinf_cuda_archs": (ctypes.c_char_p, []),
    "pyinf_cuda_covariance": (ctypes.c_int, [_T, _T, ctypes.c_void_p, ctypes.c_void_p]),
    "pyinf_cuda_eigen_correction_workspace_size": (ctypes.c_int, [_T, _T, ctypes.POINTER(ctypes.c_size_t)]),
    "pyinf_cuda_eigen_correction": (ctypes.c_int, [_T, _T, _T, _T, _T, ctypes.c_void_p, ctypes.c_void_p,
                                                   ctypes.c_size_t, ctypes.c_void_p]),
    "pyinf_cuda_self_influence_workspace_size": (ctypes.c_int, [_T, _T, ctypes.POINTER(ctypes.c_size_t)]),
    "pyinf_cuda_self_influence": (ctypes.c_int, [_T, _T, _T, _T, _T, ctypes.c_float, _T, ctypes.c_void_p,
                                                 ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]),
    "pyinf_cuda_factored_scores": (ctypes.c_int, [_T, _T, _T, _T, _T, ctypes.c_int, ctypes.c_void_p,
                                                  ctypes.c_void_p]),
    "pyinf_cuda_factored_scores_workspace_size": (ctypes.c_int, [_T, _T, _T, _T, ctypes.c_int,
                                                                 ctypes.POINTER(ctypes.c_size_t)]),
    "pyinf_cuda_factored_scores_split": (ctypes.c_int, [_T, _T, _T, _T, _T, ctypes.c_int, ctypes.c_void_p,
                                                        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]),
    "pyinf_cuda_factored_scores_grouped_workspace_size": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                                                         ctypes.POINTER(ctypes.c_size_t)]),
    "pyinf_cuda_factored_scores_grouped": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                                          ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]),
    "pyinf_emu_launch_log": (ctypes.c_char_p, []),
    "pyinf_emu_failures": (ctypes.c_char_p, []),
    "pyinf_emu_failure_count": (ctypes.c_longlong, []),
    "pyinf_emu_threads_run": (ctypes.c_longlong, []),
    "pyinf_emu_shared_arrays": (ctypes.c_longlong, []),
    "pyinf_emu_add_device_range": (None, [ctypes.c_void_p, ctypes.c_size_t]),
    "pyinf_emu_reset": (None, []),
    "pyinf_emu_set_last_error": (None, [ctypes.c_int]),
}


@pytest.fixture(scope="module")
def lib():
    root = os.environ.get("PYINF_EMU_BUILD_ROOT")  # default: a cache under the temp dir, keyed by a source hash
    try:
        info = emulate.build(root)
    except emulate.EmulationError as exc:
        pytest.fail(f"the emulated CUDA build failed:\n{exc}")
    print(f"\nemulated libpyinf: {info['lib']} ({'cached' if info['cached'] else 'built in %.1f s' % info['seconds']})"
          f", seed {SEED}")
    handle = ctypes.CDLL(info["lib"])
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(handle, name)
        fn.restype, fn.argtypes = restype, argtypes
    assert handle.pyinf_cuda_compiled() == 1
    _warm_up(handle)
    return handle


WARM_UP_LOG: dict = {}


def _warm_up(lib):
    """One small call of every kernel instantiation, so that every __shared__ array is
    registered, hence poisoned before every block of the tests (check_call then asserts
    that no call meets a new one). Results are checked too."""
    g = _gen("warm-up")
    ctx = _ctx("warm-up")
    lib.shared_arrays_expected = None
    for dtype, tc in ((torch.float32, None), (torch.bfloat16, "1"), (torch.float16, "1")):
        acts, grads, left, right, mask = _problem(g, 1, 3, 5, 4, 2, 2, dtype)
        with native_tc(tc):
            out, log = factored_scores(lib, acts, grads, left, right, mask, False, ctx, **_fs_kernels(tc, [dtype]))
        assert_close(out, reference.factored_scores(*_f64(acts, grads, left, right), mask=mask), FP32_ACC_TOL, ctx)
        WARM_UP_LOG[f"factored_scores {DT_ID[dtype]} {TC_ID[tc]}"] = log
        with native_tc(tc):  # the grouped instantiation of the same kernel
            outs, log, _ = factored_scores_grouped(lib, [(acts, grads, left, right, mask)] * 2, False, ctx)
        for out in outs:
            assert_close(out, reference.factored_scores(*_f64(acts, grads, left, right), mask=mask), FP32_ACC_TOL, ctx)
        WARM_UP_LOG[f"factored_scores_grouped {DT_ID[dtype]} {TC_ID[tc]}"] = log
    acts, grads, _, _, mask = _problem(g, 1, 3, 5, 4, 1, 1, torch.float32)
    q_a, q_s, lambdas = torch.eye(5), torch.eye(4), torch.rand(4, 5, generator=g)
    for tc in ("0", "1"):
        with native_tc(tc):
            _, WARM_UP_LOG[f"eigen_correction {TC_ID[tc]}"] = eigen_correction(lib, acts, grads, q_a, q_s, mask, ctx)
            _, WARM_UP_LOG[f"self_influence {TC_ID[tc]}"] = self_influence(lib, acts, grads, q_a, q_s, lambdas, 0.1,
                                                                            mask, ctx)
    _, WARM_UP_LOG["covariance"] = covariance(lib, acts, mask, ctx)
    lib.shared_arrays_expected = lib.pyinf_emu_shared_arrays()


# ---- helpers ------------------------------------------------------------------------------

def _gen(*key) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(SEED ^ zlib.crc32(repr(key).encode()))
    return g


def _ctx(*key) -> str:
    return f"[seed {SEED}: rerun with PYINF_EMU_SEED={SEED}] case {key}"


@contextlib.contextmanager
def env(**values):
    """The environment variables set (a value of None: unset) for the block, restored after."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def native_tc(mode):
    return env(PYINF_NATIVE_TC=mode)


_GUARD = 64  # elements of NaN before and after every input (a multiple of 8: keeps 16-byte alignment)


def guarded(t: torch.Tensor) -> torch.Tensor:
    """The same values and strides as `t`, in a storage with NaN (or True for masks) around
    it: an out-of-bounds read that reaches a result shows up as NaN."""
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride())) if t.numel() else 0
    fill = True if t.dtype == torch.bool else float("nan")
    buf = torch.full((span + 2 * _GUARD,), fill, dtype=t.dtype)
    view = buf.as_strided(t.shape, t.stride(), _GUARD)
    # zero strides (expanded tensors): write each distinct element once
    unique = [slice(0, 1) if st == 0 else slice(None) for st in t.stride()]
    view[tuple(unique)].copy_(t[tuple(unique)])
    return view


def _desc(lib, t: torch.Tensor | None):
    """The pyinf_tensor of `t`; its storage is registered as "device memory" for the
    kernel-argument pointer check (pyinf_emu_reset clears the registrations)."""
    if t is None:
        return None
    st = t.untyped_storage()
    lib.pyinf_emu_add_device_range(st.data_ptr(), st.nbytes())
    d = PyinfTensor()
    d.data = t.data_ptr() if t.numel() else None
    d.dtype = PYINF_DTYPE.get(t.dtype, 99)  # 99: not a pyinf_dtype (float64 in the error test)
    d.ndim = t.dim()
    for i in range(t.dim()):
        d.shape[i] = t.shape[i]
        d.strides[i] = t.stride(i)
    return ctypes.pointer(d)


class Out:
    """A float32 output (or a byte workspace) filled with NaN / 0xff, with canaries before
    and after it that must survive the call."""

    def __init__(self, shape, nbytes=None):
        self.nbytes = nbytes
        if nbytes is not None:
            self.buf = torch.full((nbytes + 2 * 256,), 0xFF, dtype=torch.uint8)
            self.t = self.buf[256:256 + nbytes]
        else:
            n = 1
            for s in shape:
                n *= s
            self.buf = torch.full((n + 2 * _GUARD,), float("nan"))
            self.buf[:_GUARD] = 12345.0
            self.buf[_GUARD + n:] = 12345.0
            self.t = self.buf[_GUARD:_GUARD + n].view(*shape)

    @property
    def ptr(self):
        return self.t.data_ptr()

    def register(self, lib):
        lib.pyinf_emu_add_device_range(self.buf.data_ptr(), self.buf.numel() * self.buf.element_size())

    def check_canaries(self, ctx):
        if self.nbytes is not None:
            head, tail = self.buf[:256], self.buf[256 + self.nbytes:]
            assert (head == 0xFF).all() and (tail == 0xFF).all(), f"write outside the workspace {ctx}"
        else:
            n = self.t.numel()
            head, tail = self.buf[:_GUARD], self.buf[_GUARD + n:]
            assert (head == 12345.0).all() and (tail == 12345.0).all(), f"write outside the output {ctx}"


def check_call(lib, status, ctx, expect_kernels=(), forbid_kernels=()):
    log = lib.pyinf_emu_launch_log().decode()
    if getattr(lib, "shared_arrays_expected", None) is not None:
        assert lib.pyinf_emu_shared_arrays() == lib.shared_arrays_expected, (
            f"a __shared__ array not seen in the warm-up: its first block was not poisoned {ctx}")
    failures = lib.pyinf_emu_failures().decode()
    assert lib.pyinf_emu_failure_count() == 0, f"emulated kernel failed {ctx}:\n{failures}\nlaunches: {log}"
    assert status == 0, (f"status {status} ({lib.pyinf_status_string(status).decode()}): "
                         f"{lib.pyinf_last_error().decode()} {ctx}")
    launched = [entry.split(" ")[0] for entry in log.split(";") if entry]
    for k in expect_kernels:
        assert k in launched, f"expected a launch of {k}, got {launched} {ctx}"
    for k in forbid_kernels:
        assert k not in launched, f"unexpected launch of {k} in {launched} {ctx}"
    return log


def _problem(g, n, t, d_in, d_out, q, r, dtype):
    acts = torch.randn(n, t, d_in, generator=g).to(dtype)
    grads = torch.randn(n, t, d_out, generator=g).to(dtype)
    left = torch.randn(q, d_out, r, generator=g).to(dtype)
    right = torch.randn(q, d_in, r, generator=g).to(dtype)
    mask = torch.rand(n, t, generator=g) > 0.3
    if n and t:
        mask[0, 0] = True
    return acts, grads, left, right, mask


def _orthonormal(g, d):
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    return q.float()


def _f64(*ts):
    return [None if t is None else t.double() for t in ts]


# ---- the C API calls -------------------------------------------------------------------------

def factored_scores(lib, acts, grads, left, right, mask, per_token, ctx, **kw):
    n, t = acts.shape[:2]
    q = left.shape[0]
    out = Out((n, t, q) if per_token else (n, q))
    lib.pyinf_emu_reset()
    out.register(lib)
    s = lib.pyinf_cuda_factored_scores(_desc(lib, acts), _desc(lib, grads), _desc(lib, left), _desc(lib, right),
                                       _desc(lib, mask), 1 if per_token else 0, out.ptr, None)
    log = check_call(lib, s, ctx, **kw)
    out.check_canaries(ctx)
    return out.t.clone(), log


def factored_scores_split(lib, acts, grads, left, right, mask, per_token, ctx, short_by=0, **kw):
    """pyinf_cuda_factored_scores_split with the workspace its size function asks for (NaN-
    poisoned, canaries around it); (scores, launch log, workspace bytes)."""
    n, t = acts.shape[:2]
    q = left.shape[0]
    nbytes = ctypes.c_size_t(0)
    s = lib.pyinf_cuda_factored_scores_workspace_size(_desc(lib, acts), _desc(lib, grads), _desc(lib, left),
                                                      _desc(lib, right), 1 if per_token else 0, ctypes.byref(nbytes))
    assert s == 0, f"{lib.pyinf_last_error().decode()} {ctx}"
    ws = Out(None, nbytes=nbytes.value)
    ws.t.view(torch.uint8).fill_(0x7F)  # 0x7f7f7f7f: a huge float, wrong if a partial is not written
    out = Out((n, t, q) if per_token else (n, q))
    lib.pyinf_emu_reset()
    out.register(lib)
    ws.register(lib)
    s = lib.pyinf_cuda_factored_scores_split(_desc(lib, acts), _desc(lib, grads), _desc(lib, left),
                                             _desc(lib, right), _desc(lib, mask), 1 if per_token else 0, out.ptr,
                                             ws.ptr if nbytes.value else None, nbytes.value - short_by, None)
    if short_by:
        return s, lib.pyinf_last_error().decode(), lib.pyinf_emu_launch_log().decode()
    log = check_call(lib, s, ctx, **kw)
    out.check_canaries(ctx)
    ws.check_canaries(ctx)
    return out.t.clone(), log, nbytes.value


def _grouped_table(lib, problems, outs=None):
    table = (PyinfFactoredProblem * max(len(problems), 1))()
    for i, p in enumerate(problems):
        d = [_desc(lib, x) for x in p]
        table[i] = PyinfFactoredProblem(d[0], d[1], d[2], d[3], d[4], outs[i].ptr if outs else None)
    return table


def _grouped_workspace(lib, problems, per_token=False):
    nbytes = ctypes.c_size_t(0)
    s = lib.pyinf_cuda_factored_scores_grouped_workspace_size(_grouped_table(lib, problems), len(problems),
                                                              1 if per_token else 0, ctypes.byref(nbytes))
    assert s == 0, lib.pyinf_last_error().decode()
    return nbytes.value


def factored_scores_grouped(lib, problems, per_token, ctx, short_by=0, **kw):
    """pyinf_cuda_factored_scores_grouped over problems (acts, grads, left, right, mask) with
    the workspace its size function asks for (0x7f-filled, canaries around it); (scores per
    problem, launch log, workspace bytes)."""
    outs = [Out((p[0].shape[0], p[0].shape[1], p[2].shape[0]) if per_token else (p[0].shape[0], p[2].shape[0]))
            for p in problems]
    table = _grouped_table(lib, problems, outs)
    nbytes = ctypes.c_size_t(_grouped_workspace(lib, problems, per_token))
    ws = Out(None, nbytes=nbytes.value)
    ws.t.view(torch.uint8).fill_(0x7F)  # a huge float where a partial is not written
    lib.pyinf_emu_reset()
    for o in outs:
        o.register(lib)
    ws.register(lib)
    for p in problems:  # _desc registered the inputs before the reset
        for x in p:
            _desc(lib, x)
    s = lib.pyinf_cuda_factored_scores_grouped(table, len(problems), 1 if per_token else 0,
                                               ws.ptr if nbytes.value else None, nbytes.value - short_by, None)
    if short_by:
        return s, lib.pyinf_last_error().decode(), lib.pyinf_emu_launch_log().decode()
    log = check_call(lib, s, ctx, **kw)
    for o in outs:
        o.check_canaries(ctx)
    ws.check_canaries(ctx)
    return [o.t.clone() for o in outs], log, nbytes.value


def _workspace(lib, fn, acts, grads, ctx):
    nbytes = ctypes.c_size_t(0)
    s = fn(_desc(lib, acts), _desc(lib, grads), ctypes.byref(nbytes))
    assert s == 0, f"{lib.pyinf_last_error().decode()} {ctx}"
    return Out(None, nbytes=nbytes.value)


def eigen_correction(lib, acts, grads, q_a, q_s, mask, ctx, **kw):
    ws = _workspace(lib, lib.pyinf_cuda_eigen_correction_workspace_size, acts, grads, ctx)
    out = Out((grads.shape[-1], acts.shape[-1]))
    lib.pyinf_emu_reset()
    out.register(lib)
    ws.register(lib)
    s = lib.pyinf_cuda_eigen_correction(_desc(lib, acts), _desc(lib, grads), _desc(lib, q_a), _desc(lib, q_s),
                                        _desc(lib, mask), out.ptr, ws.ptr if ws.nbytes else None, ws.nbytes, None)
    log = check_call(lib, s, ctx, **kw)
    out.check_canaries(ctx)
    ws.check_canaries(ctx)
    return out.t.clone(), log


def self_influence(lib, acts, grads, q_a, q_s, lambdas, damping, mask, ctx, **kw):
    ws = _workspace(lib, lib.pyinf_cuda_self_influence_workspace_size, acts, grads, ctx)
    out = Out((acts.shape[0],))
    lib.pyinf_emu_reset()
    out.register(lib)
    ws.register(lib)
    s = lib.pyinf_cuda_self_influence(_desc(lib, acts), _desc(lib, grads), _desc(lib, q_a), _desc(lib, q_s),
                                      _desc(lib, lambdas), damping, _desc(lib, mask), out.ptr,
                                      ws.ptr if ws.nbytes else None, ws.nbytes, None)
    log = check_call(lib, s, ctx, **kw)
    out.check_canaries(ctx)
    ws.check_canaries(ctx)
    return out.t.clone(), log


def covariance(lib, x, mask, ctx, **kw):
    out = Out((x.shape[-1], x.shape[-1]))
    lib.pyinf_emu_reset()
    out.register(lib)
    s = lib.pyinf_cuda_covariance(_desc(lib, x), _desc(lib, mask), out.ptr, None)
    log = check_call(lib, s, ctx, **kw)
    out.check_canaries(ctx)
    return out.t.clone(), log


def assert_close(out, ref, tol, ctx):
    err = oracle.rel_err(out, ref)  # also asserts shape and finiteness
    if os.environ.get("PYINF_EMU_VERBOSE"):
        print(f"rel_err {err:.2e} (tol {tol:.0e}) {ctx}")
    assert err < tol, f"relative error {err:.3e} >= {tol:.0e} {ctx}"
    return err


TC_KERNEL = "factored_scores_tc_kernel<T,kGrouped>"  # names as the launch log gives them
FMA_KERNEL = "factored_scores_kernel<kGrouped>"
SUM_KERNEL = "sum_group_splits_kernel"


def _fs_kernels(tc, dtypes):
    """The kernel a factored_scores call must launch: tensor cores for uniform 16-bit inputs
    unless PYINF_NATIVE_TC is "0" (pyinf.h)."""
    uniform_16bit = len(set(dtypes)) == 1 and dtypes[0] in (torch.bfloat16, torch.float16)
    if tc != "0" and uniform_16bit:
        return dict(expect_kernels=[TC_KERNEL], forbid_kernels=[FMA_KERNEL])
    return dict(expect_kernels=[FMA_KERNEL], forbid_kernels=[TC_KERNEL])


def _eigen_tc(tc, dtype) -> bool:
    """Whether eigen_correction / self_influence run on TF32 tensor cores (pyinf.h): for 16-bit
    acts and grads unless PYINF_NATIVE_TC is "0", and for any inputs when it is "1"."""
    return tc == "1" or (tc != "0" and dtype in (torch.bfloat16, torch.float16))


def _eigen_kernels(tc, self_mode, dtype):
    if _eigen_tc(tc, dtype):
        gram = "gram_tc_kernel<1>" if self_mode else "gram_tc_kernel<0>"
        return dict(expect_kernels=["rotate_tc_kernel", gram], forbid_kernels=["rotate_kernel", "gram_kernel"])
    return dict(expect_kernels=["rotate_kernel", "gram_kernel"],
                forbid_kernels=["rotate_tc_kernel", "gram_tc_kernel<0>", "gram_tc_kernel<1>"])


# ---- factored scores -------------------------------------------------------------------------

# (n, t, d_in, d_out, q, r), small versions of test_native.py's CUDA_SHAPES / TC_SHAPES.
FS_SHAPES = {
    "odd": (3, 7, 13, 11, 3, 5),        # nothing vectorisable, partial everything
    "tiles": (2, 70, 40, 24, 3, 8),     # 2 token tiles of 64, K = 32 + 8 (TC) / 16+16+8 (FMA), vectorisable
    "r>64": (1, 65, 24, 16, 2, 80),     # one query spans two 64-column chunks
    "r=1": (1, 1, 9, 6, 40, 1),         # 16 queries per block, 3 groups (16, 16, 8)
    "groups": (2, 20, 32, 16, 20, 8),   # 8 queries per block, 3 groups (8, 8, 4)
}


@pytest.mark.parametrize("tc", TC_MODES, ids=lambda m: TC_ID[m])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("shape", list(FS_SHAPES), ids=str)
def test_factored_scores(lib, shape, dtype, tc):
    """Document and per-token scores, NaN in the masked padding of acts, determinism."""
    n, t, d_in, d_out, q, r = FS_SHAPES[shape]
    g = _gen("fs", shape, str(dtype))
    acts, grads, left, right, mask = _problem(g, n, t, d_in, d_out, q, r, dtype)
    clean_a, clean_g = acts.clone(), grads.clone()
    acts[~mask] = float("nan")  # masked rows are never read
    grads[~mask] = float("inf")
    args = [guarded(x) for x in (acts, grads, left, right)] + [guarded(mask)]
    kernels = _fs_kernels(tc, [dtype])
    with native_tc(tc):
        for per_token in (False, True):
            ctx = _ctx(shape, DT_ID[dtype], TC_ID[tc], "per_token" if per_token else "document")
            out, _ = factored_scores(lib, *args, per_token, ctx, **kernels)
            ref = reference.factored_scores(*_f64(clean_a, clean_g, left, right), mask=mask, per_token=per_token)
            assert_close(out, ref, FP32_ACC_TOL, ctx)
            if per_token:
                assert (out[~mask] == 0).all(), f"masked tokens must score exactly 0 {ctx}"
            again, _ = factored_scores(lib, *args, per_token, ctx, **kernels)
            assert torch.equal(out, again), f"two calls differ {ctx}"


@pytest.mark.parametrize("tc", TC_MODES, ids=lambda m: TC_ID[m])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DT_ID[d])
def test_factored_scores_strided_and_misaligned(lib, dtype, tc):
    """test_native.py's strided / misaligned / bias-augmented views: element-load paths of
    the TC kernel, strided reads of the FMA kernel."""
    from pyinf.capture import _append_ones

    n, t, d_in, d_out, q, r = 2, 70, 40, 24, 3, 8
    g = _gen("fs-strided", str(dtype))
    acts, grads, left, right, mask = _problem(g, n, t, d_in, d_out, q, r, dtype)
    kernels = _fs_kernels(tc, [dtype])
    with native_tc(tc):
        # misaligned rows (pointer off by one element) and a factor with a non-unit rank stride
        wide = torch.randn(n, t, d_in + 1, generator=g).to(dtype)
        wide[..., 1:] = acts
        left_t = left.transpose(1, 2).contiguous().transpose(1, 2)
        ctx = _ctx("misaligned", DT_ID[dtype], TC_ID[tc])
        out, _ = factored_scores(lib, guarded(wide)[..., 1:], guarded(grads), guarded(left_t), guarded(right),
                                 guarded(mask), False, ctx, **kernels)
        assert_close(out, reference.factored_scores(*_f64(acts, grads, left, right), mask=mask), FP32_ACC_TOL, ctx)
        # bias-augmented input as the capture stores it: padded aligned rows, d_in = 40 + 1 (a
        # partial last 8-element vector per row)
        biased = _append_ones(acts)
        right_b = torch.randn(q, d_in + 1, r, generator=g).to(dtype)
        ctx = _ctx("biased", DT_ID[dtype], TC_ID[tc])
        out, _ = factored_scores(lib, guarded(biased), guarded(grads), guarded(left), guarded(right_b),
                                 guarded(mask), True, ctx, **kernels)
        assert_close(out, reference.factored_scores(*_f64(biased, grads, left, right_b), mask=mask, per_token=True),
                     FP32_ACC_TOL, ctx)
        # test_strided_inputs_are_read_in_place: every input non-contiguous, mask included
        n2, t2, di2, do2, q2, r2 = 3, 9, 11, 6, 4, 3
        a2 = torch.randn(n2, di2, t2, generator=g).to(dtype).transpose(1, 2)
        g2 = torch.randn(t2, n2, do2, generator=g).to(dtype).transpose(0, 1)
        l2 = torch.randn(q2, r2, do2, generator=g).to(dtype).transpose(1, 2)
        r2_ = torch.randn(2 * q2, di2, r2, generator=g).to(dtype)[::2]
        m2 = (torch.rand(t2, n2, generator=g) > 0.3).T
        for per_token in (False, True):
            ctx = _ctx("strided", DT_ID[dtype], TC_ID[tc], per_token)
            out, _ = factored_scores(lib, guarded(a2), guarded(g2), guarded(l2), guarded(r2_), guarded(m2),
                                     per_token, ctx, **kernels)
            ref = reference.factored_scores(*_f64(a2, g2, l2, r2_), mask=m2, per_token=per_token)
            assert_close(out, ref, FP32_ACC_TOL, ctx)
        # zero strides (expanded views, accepted by the C API): one token row repeated, one
        # factor shared by every query; the TC kernel's 16-byte path accepts stride 0 too
        a3 = torch.randn(n, 1, d_in, generator=g).to(dtype).expand(n, t, d_in)
        l3 = torch.randn(1, d_out, r, generator=g).to(dtype).expand(q, d_out, r)
        ctx = _ctx("zero-strides", DT_ID[dtype], TC_ID[tc])
        out, _ = factored_scores(lib, guarded(a3), guarded(grads), guarded(l3), guarded(right), guarded(mask),
                                 True, ctx, **kernels)
        ref = reference.factored_scores(*_f64(a3, grads, l3, right), mask=mask, per_token=True)
        assert_close(out, ref, FP32_ACC_TOL, ctx)


# (n, t, q, r, token ranges per document): few (document, query group) pairs, so the document
# scores split each document's token tiles over several blocks (factored_scores.cu, plan()).
SPLIT_SHAPES = {
    "2 ranges": (2, 300, 3, 8, 2),    # 5 tiles -> ranges of 3 + 2 tiles, the last one partial
    "4 ranges": (1, 512, 2, 16, 4),   # 8 tiles -> 4 ranges of 2
    "no split": (2, 100, 3, 8, 1),    # 2 tiles: a split would leave ranges of 1 tile
}


@pytest.mark.parametrize("tc", TC_MODES, ids=lambda m: TC_ID[m])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("shape", list(SPLIT_SHAPES), ids=str)
def test_factored_scores_token_split(lib, shape, dtype, tc):
    """pyinf_cuda_factored_scores_split: the workspace it asks for, the ranges it makes, the
    scores against the reference and against the unsplit entry point, determinism; per-token
    scores need no workspace; a workspace one byte short is refused before any launch."""
    n, t, q, r, ranges = SPLIT_SHAPES[shape]
    d_in, d_out = 24, 40
    g = _gen("split", shape, str(dtype))
    acts, grads, left, right, mask = _problem(g, n, t, d_in, d_out, q, r, dtype)
    clean = acts.clone()
    acts[~mask] = float("nan")
    args = [guarded(x) for x in (acts, grads, left, right)] + [guarded(mask)]
    kernels = _fs_kernels(tc, [dtype])
    ctx = _ctx("split", shape, DT_ID[dtype], TC_ID[tc])
    with native_tc(tc):
        if ranges > 1:
            kernels = dict(kernels, expect_kernels=kernels["expect_kernels"] + [SUM_KERNEL])
        else:
            kernels = dict(kernels, forbid_kernels=kernels["forbid_kernels"] + [SUM_KERNEL])
        out, log, nbytes = factored_scores_split(lib, *args, False, ctx, **kernels)
        assert nbytes == (n * ranges * q * 4 if ranges > 1 else 0), (nbytes, ctx)
        grid_x = int(log.split("grid=(", 1)[1].split(",", 1)[0])
        assert grid_x == n * ranges, (log, ctx)
        ref = reference.factored_scores(*_f64(clean, grads, left, right), mask=mask)
        assert_close(out, ref, FP32_ACC_TOL, ctx)
        unsplit, _ = factored_scores(lib, *args, False, ctx)
        assert_close(out, unsplit.double(), FP32_ACC_TOL, ctx)
        again, _, _ = factored_scores_split(lib, *args, False, ctx)
        assert torch.equal(out, again), f"two calls differ {ctx}"
        per_token, _, nbytes = factored_scores_split(lib, *args, True, ctx)
        assert nbytes == 0
        assert_close(per_token, reference.factored_scores(*_f64(clean, grads, left, right), mask=mask,
                                                          per_token=True), FP32_ACC_TOL, ctx)
        if ranges > 1:
            status, err, launched = factored_scores_split(lib, *args, False, ctx, short_by=1)
            assert status == 5 and f"needs a workspace of {n * ranges * q * 4} bytes" in err, (status, err)
            assert launched == "", f"launched with a short workspace: {launched} {ctx}"


@pytest.mark.parametrize("tc", TC_MODES, ids=lambda m: TC_ID[m])
def test_factored_scores_mixed_dtypes_take_fma(lib, tc):
    """bf16 tokens with an fp32 factor: never the tensor-core kernel."""
    n, t, d_in, d_out, q, r = 2, 70, 40, 24, 3, 8
    g = _gen("fs-mixed")
    acts, grads, left, right, mask = _problem(g, n, t, d_in, d_out, q, r, torch.bfloat16)
    right = right.float()
    ctx = _ctx("mixed", TC_ID[tc])
    with native_tc(tc):
        out, _ = factored_scores(lib, guarded(acts), guarded(grads), guarded(left), guarded(right), guarded(mask),
                                 True, ctx, **_fs_kernels(tc, [torch.bfloat16, torch.float32]))
    ref = reference.factored_scores(*_f64(acts, grads, left, right), mask=mask, per_token=True)
    assert_close(out, ref, FP32_ACC_TOL, ctx)


# ---- grouped factored scores ----------------------------------------------------------------

# One problem per layer: (n, t, d_in, d_out, q, r, dtype). A model's layers share N and T, but
# the C API takes any mix of sizes, ranks, dtypes and masks; the WMMA problems (bf16, fp16)
# and the FMA ones (fp32, mixed) of one call go to one launch per kernel.
GROUP = [
    (2, 70, 40, 24, 3, 8, torch.bfloat16),  # vectorisable rows and factors, 2 token tiles
    (2, 70, 13, 11, 3, 5, torch.bfloat16),  # odd sizes, nothing vectorisable
    (2, 9, 24, 16, 3, 80, torch.float16),   # r > 64: a query over two column chunks; another T
    (3, 70, 9, 6, 3, 1, torch.float32),     # FMA; another N
    (2, 70, 24, 40, 3, 8, "mixed"),         # bf16 tokens, fp32 right factor: FMA
    (2, 70, 33, 17, 5, 4, torch.bfloat16),  # no mask; another Q
]


def _group_problem(g, i, spec):
    n, t, d_in, d_out, q, r, dtype = spec
    acts, grads, left, right, mask = _problem(g, n, t, d_in, d_out, q, r,
                                              torch.bfloat16 if dtype == "mixed" else dtype)
    if dtype == "mixed":
        right = right.float()
    if i == len(GROUP) - 1:
        mask = None
    clean = (acts.clone(), grads.clone(), left, right, mask)
    if mask is not None:
        acts[~mask] = float("nan")  # masked rows are never read
        grads[~mask] = float("inf")
    return tuple(None if x is None else guarded(x) for x in (acts, grads, left, right, mask)), clean


def _blocks(spec, per_token):
    """Blocks of one unsplit problem (factored_scores.cu, plan())."""
    n, t, _, _, q, r, _ = spec
    qb = max(1, min(64 // r, 16, q))
    return n * (-(-t // 64) if per_token else 1) * -(-q // qb)


def _launches(log):
    return [(e.split(" ")[0], int(e.split("grid=(", 1)[1].split(",", 1)[0])) for e in log.split(";") if e]


@pytest.mark.parametrize("tc", TC_MODES, ids=lambda m: TC_ID[m])
def test_factored_scores_grouped(lib, tc):
    """pyinf_cuda_factored_scores_grouped: every problem's document and per-token scores
    against float64 and bit for bit against its own single call (same blocks, same order);
    one launch per kernel whose grid is the problems' blocks; determinism."""
    g = _gen("grouped", tc)
    problems, cleans = zip(*(_group_problem(g, i, spec) for i, spec in enumerate(GROUP)))
    with native_tc(tc):
        for per_token in (False, True):
            ctx = _ctx("grouped", TC_ID[tc], "per_token" if per_token else "document")
            outs, log, nbytes = factored_scores_grouped(lib, problems, per_token, ctx)
            assert nbytes == 0, f"no split expected (2 token tiles at most) {ctx}"
            for i, (out, clean, args) in enumerate(zip(outs, cleans, problems)):
                ref = reference.factored_scores(*_f64(*clean[:4]), mask=clean[4], per_token=per_token)
                assert_close(out, ref, FP32_ACC_TOL, f"{ctx} problem {i}")
                single, _ = factored_scores(lib, *args, per_token, ctx)
                assert torch.equal(out, single), f"problem {i} differs from its single call {ctx}"
            # which problems each kernel takes, and one launch per kernel
            kinds = {}
            for spec in GROUP:
                dtype = spec[-1]
                kind = TC_KERNEL if tc == "1" and dtype in (torch.bfloat16, torch.float16) else FMA_KERNEL
                key = (kind, dtype if kind == TC_KERNEL else None)
                kinds[key] = kinds.get(key, 0) + _blocks(spec, per_token)
            launched = _launches(log)
            assert sorted(launched) == sorted((kind, blocks) for (kind, _), blocks in kinds.items()), (launched, ctx)
            again, _, _ = factored_scores_grouped(lib, problems, per_token, ctx)
            assert all(torch.equal(a, b) for a, b in zip(outs, again)), f"two calls differ {ctx}"


def test_factored_scores_grouped_in_launches_of_16(lib):
    """20 layers: two launches (16 + 4 problems), every layer scored."""
    g = _gen("grouped-20")
    specs = [(2, 9, 8 + i, 5 + i % 3, 2, 4, torch.bfloat16) for i in range(20)]
    problems = [_problem(g, *spec) for spec in specs]
    ctx = _ctx("grouped-20")
    with native_tc(None):
        outs, log, _ = factored_scores_grouped(lib, problems, False, ctx)
    assert [b for _, b in _launches(log)] == [16 * 2, 4 * 2], (log, ctx)
    for i, (out, p) in enumerate(zip(outs, problems)):
        assert_close(out, reference.factored_scores(*_f64(*p[:4]), mask=p[4]), FP32_ACC_TOL, f"{ctx} problem {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DT_ID[d])
def test_factored_scores_grouped_split(lib, dtype):
    """Few documents and queries in all: every problem's tokens split in 2 ranges (sized for the
    group), partials at 256-byte offsets of the workspace (the last one needs only its own
    size), one sum launch for the group; a workspace one byte short is refused before any
    launch."""
    g = _gen("grouped-split", str(dtype))
    # 1 document x 1 query group each, 5 token tiles -> 2 ranges of 3 + 2 tiles
    specs = [(1, 300, 24, 40, 2, 16, dtype), (1, 300, 17, 9, 2, 8, dtype), (1, 290, 8, 8, 1, 3, dtype)]
    problems = [_problem(g, *spec) for spec in specs]
    ctx = _ctx("grouped-split", DT_ID[dtype])
    outs, log, nbytes = factored_scores_grouped(lib, problems, False, ctx, expect_kernels=[SUM_KERNEL])
    last = 1 * 2 * 1 * 4  # the last layer's partials: 1 document x 2 ranges x 1 query, fp32
    assert nbytes == 2 * 256 + last, (nbytes, ctx)
    assert [b for name, b in _launches(log) if name != SUM_KERNEL] == [3 * 2], (log, ctx)
    for i, (out, p) in enumerate(zip(outs, problems)):
        assert_close(out, reference.factored_scores(*_f64(*p[:4]), mask=p[4]), FP32_ACC_TOL, f"{ctx} problem {i}")
    status, err, launched = factored_scores_grouped(lib, problems, False, ctx, short_by=1)
    assert status == 5 and f"needs a workspace of {2 * 256 + last} bytes" in err, (status, err)
    assert launched == "", f"launched with a short workspace: {launched} {ctx}"
    # six such layers fill 512 blocks no better: still split, each at its own offset
    outs, _, nbytes = factored_scores_grouped(lib, problems * 2, False, ctx)
    assert nbytes == 5 * 256 + last
    for i, (out, p) in enumerate(zip(outs, problems * 2)):
        assert_close(out, reference.factored_scores(*_f64(*p[:4]), mask=p[4]), FP32_ACC_TOL, f"{ctx} problem {i}")
    # 64 documents x 1 query group: one layer alone splits (64 < 512 blocks), eight layers
    # together fill 512 blocks and split none (sizes only: nothing launched)
    layer = _problem(g, 64, 256, 8, 8, 1, 4, dtype)
    assert _grouped_workspace(lib, [layer]) == 64 * 2 * 4
    assert _grouped_workspace(lib, [layer] * 7) == 7 * 512
    assert _grouped_workspace(lib, [layer] * 8) == 0


def test_factored_scores_grouped_empty_problems_and_errors(lib):
    """Empty problems (N, Q or T of 0) among others; a bad problem named by its index, with
    nothing launched; a bad count or table."""
    g = _gen("grouped-errors")
    ok = _problem(g, 2, 9, 8, 5, 2, 4, torch.bfloat16)
    no_docs = _problem(g, 0, 9, 8, 5, 2, 4, torch.bfloat16)
    no_queries = _problem(g, 2, 9, 8, 5, 0, 4, torch.bfloat16)
    no_tokens = _problem(g, 2, 0, 8, 5, 2, 4, torch.bfloat16)
    ctx = _ctx("grouped-empty")
    outs, _, _ = factored_scores_grouped(lib, [no_docs, ok, no_queries, no_tokens], False, ctx)
    assert outs[0].shape == (0, 2) and outs[2].shape == (2, 0)
    assert torch.equal(outs[3], torch.zeros(2, 2)), "no tokens: document scores are exact zeros"
    assert_close(outs[1], reference.factored_scores(*_f64(*ok[:4]), mask=ok[4]), FP32_ACC_TOL, ctx)

    bad = list(ok)
    bad[2] = torch.randn(2, 6, 4).to(torch.bfloat16)  # left's d_out is 6, grads' is 5
    outs = [Out((2, 2)), Out((2, 2))]
    table = _grouped_table(lib, [ok, bad], outs)
    lib.pyinf_emu_reset()
    s = lib.pyinf_cuda_factored_scores_grouped(table, 2, 0, None, 0, None)
    err = lib.pyinf_last_error().decode()
    assert s == 1 and err.startswith("pyinf_cuda_factored_scores_grouped: problem 1: ") and "left" in err, err
    assert lib.pyinf_emu_launch_log().decode() == ""
    nbytes = ctypes.c_size_t(7)
    assert lib.pyinf_cuda_factored_scores_grouped_workspace_size(table, 2, 0, ctypes.byref(nbytes)) == 1
    assert lib.pyinf_cuda_factored_scores_grouped(table, -1, 0, None, 0, None) == 1
    assert "count is negative" in lib.pyinf_last_error().decode()
    assert lib.pyinf_cuda_factored_scores_grouped(None, 1, 0, None, 0, None) == 1
    assert lib.pyinf_cuda_factored_scores_grouped(None, 0, 0, None, 0, None) == 0
    assert lib.pyinf_cuda_factored_scores_grouped_workspace_size(None, 0, 0, ctypes.byref(nbytes)) == 0
    assert nbytes.value == 0


# ---- eigen correction / self-influence ------------------------------------------------------

EIGEN_SHAPES = {
    "odd": (3, 7, 13, 11),
    "tiles": (2, 50, 70, 66),   # 2 row tiles, 2 x 2 column / Gram tiles, partial tiles, T = 32 + 18
    "one": (1, 1, 9, 6),
    "exact": (2, 32, 64, 32),   # exact multiples of the tiles and K slices
}


@pytest.mark.parametrize("tc", TC_MODES, ids=lambda m: TC_ID[m])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("shape", list(EIGEN_SHAPES), ids=str)
def test_eigen_ops(lib, shape, dtype, tc):
    """eigen_correction and self_influence: NaN / Inf in the masked padding, NaN-poisoned
    workspace, determinism; TF32 tolerance for the tensor-core path."""
    n, t, d_in, d_out = EIGEN_SHAPES[shape]
    g = _gen("eigen", shape, str(dtype))
    acts, grads, _, _, mask = _problem(g, n, t, d_in, d_out, 1, 1, dtype)
    clean_a, clean_g = acts.clone(), grads.clone()
    acts[~mask] = float("nan")
    grads[~mask] = float("inf")
    q_a, q_s = _orthonormal(g, d_in), _orthonormal(g, d_out)
    lambdas = torch.rand(d_out, d_in, generator=g)
    tol = TF32_TOL if _eigen_tc(tc, dtype) else FP32_ACC_TOL
    a, gr, qa, qs, lam, m = (guarded(x) for x in (acts, grads, q_a, q_s, lambdas, mask))
    ctx = _ctx("eigen", shape, DT_ID[dtype], TC_ID[tc])
    with native_tc(tc):
        out, _ = eigen_correction(lib, a, gr, qa, qs, m, ctx, **_eigen_kernels(tc, False, dtype))
        ref = reference.eigen_correction(*_f64(clean_a, clean_g, q_a, q_s), mask=mask)
        assert_close(out, ref, tol, ctx)
        again, _ = eigen_correction(lib, a, gr, qa, qs, m, ctx, **_eigen_kernels(tc, False, dtype))
        assert torch.equal(out, again), f"two calls differ {ctx}"
        ctx = _ctx("self_influence", shape, DT_ID[dtype], TC_ID[tc])
        kernels = _eigen_kernels(tc, True, dtype)
        kernels["expect_kernels"] = kernels["expect_kernels"] + ["reduce_partials_kernel"]
        si, _ = self_influence(lib, a, gr, qa, qs, lam, 0.2, m, ctx, **kernels)
        ref = reference.self_influence(*_f64(clean_a, clean_g, q_a, q_s, lambdas), 0.2, mask=mask)
        assert_close(si, ref, tol, ctx)
        again, _ = self_influence(lib, a, gr, qa, qs, lam, 0.2, m, ctx, **kernels)
        assert torch.equal(si, again), f"two calls differ {ctx}"


@pytest.mark.parametrize("tc", TC_MODES, ids=lambda m: TC_ID[m])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DT_ID[d])
def test_eigen_ops_strided(lib, dtype, tc):
    """test_strided_inputs_are_read_in_place: non-contiguous tokens and mask, a transposed
    eigenbasis and zero-stride lambdas."""
    n, t, d_in, d_out = 3, 9, 11, 6
    g = _gen("eigen-strided", str(dtype))
    acts = torch.randn(n, d_in, t, generator=g).to(dtype).transpose(1, 2)
    grads = torch.randn(t, n, d_out, generator=g).to(dtype).transpose(0, 1)
    mask = (torch.rand(t, n, generator=g) > 0.3).T
    q_a = _orthonormal(g, d_in).T
    q_s = _orthonormal(g, d_out)
    lambdas = torch.rand(1, d_in, generator=g).expand(d_out, d_in)
    tol = TF32_TOL if _eigen_tc(tc, dtype) else FP32_ACC_TOL
    a, gr, qa, qs, lam, m = (guarded(x) for x in (acts, grads, q_a, q_s, lambdas, mask))
    with native_tc(tc):
        ctx = _ctx("eigen-strided", DT_ID[dtype], TC_ID[tc])
        out, _ = eigen_correction(lib, a, gr, qa, qs, m, ctx, **_eigen_kernels(tc, False, dtype))
        assert_close(out, reference.eigen_correction(*_f64(acts, grads, q_a, q_s), mask=mask), tol, ctx)
        ctx = _ctx("self-strided", DT_ID[dtype], TC_ID[tc])
        si, _ = self_influence(lib, a, gr, qa, qs, lam, 0.3, m, ctx, **_eigen_kernels(tc, True, dtype))
        ref = reference.self_influence(*_f64(acts, grads, q_a, q_s, lambdas), 0.3, mask=mask)
        assert_close(si, ref, tol, ctx)


# ---- covariance ------------------------------------------------------------------------------

@pytest.mark.parametrize("tc", TC_MODES, ids=lambda m: TC_ID[m])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("shape", [(3, 7, 13), (2, 50, 70)], ids=["odd", "tiles"])
def test_covariance(lib, shape, dtype, tc):
    """NaN in the masked padding, strided (transposed) input, exact symmetry, determinism."""
    n, t, d = shape
    g = _gen("cov", shape, str(dtype))
    x = torch.randn(n, d, t, generator=g).to(dtype).transpose(1, 2)  # strided [N, T, d]
    mask = torch.rand(n, t, generator=g) > 0.3
    mask[0, 0] = True
    clean = x.clone()
    x[~mask] = float("nan")
    ctx = _ctx("cov", shape, DT_ID[dtype], TC_ID[tc])
    with native_tc(tc):
        out, _ = covariance(lib, guarded(x), guarded(mask), ctx, expect_kernels=["covariance_kernel"])
        assert_close(out, reference.covariance(clean.double(), mask=mask), FP32_ACC_TOL, ctx)
        assert torch.equal(out, out.T), f"not exactly symmetric {ctx}"
        again, _ = covariance(lib, guarded(x), guarded(mask), ctx)
        assert torch.equal(out, again), f"two calls differ {ctx}"
        out, _ = covariance(lib, guarded(clean), None, ctx)  # no mask
        assert_close(out, reference.covariance(clean.double()), FP32_ACC_TOL, ctx)


# ---- sizes at the edges, errors ---------------------------------------------------------------

@pytest.mark.parametrize("tc", [None, "0", "1"], ids=lambda m: TC_ID[m])
def test_empty_sizes(lib, tc):
    """test_native.py test_empty_sizes on the CUDA entry points: T = 0, N = 0, Q = 0, d = 0."""
    dt = torch.bfloat16
    with native_tc(tc):
        ctx = _ctx("empty-T", TC_ID[tc])
        acts, grads = torch.randn(2, 0, 3).to(dt), torch.randn(2, 0, 4).to(dt)
        left, right = torch.randn(3, 4, 2).to(dt), torch.randn(3, 3, 2).to(dt)
        out, _ = factored_scores(lib, acts, grads, left, right, None, False, ctx)
        assert torch.equal(out, torch.zeros(2, 3)), ctx
        out, _ = factored_scores(lib, acts, grads, left, right, None, True, ctx)
        assert out.shape == (2, 0, 3)
        out, _ = covariance(lib, acts, None, ctx)
        assert torch.equal(out, torch.zeros(3, 3)), ctx
        si, _ = self_influence(lib, acts, grads, torch.eye(3), torch.eye(4), torch.ones(4, 3), 0.1, None, ctx)
        assert torch.equal(si, torch.zeros(2)), ctx
        lam, _ = eigen_correction(lib, acts, grads, torch.eye(3), torch.eye(4), None, ctx)
        assert torch.equal(lam, torch.zeros(4, 3)), ctx
        ctx = _ctx("empty-N-Q-d", TC_ID[tc])
        a0, g0 = torch.randn(0, 5, 3).to(dt), torch.randn(0, 5, 4).to(dt)
        out, _ = factored_scores(lib, a0, g0, left, right, None, False, ctx)
        assert out.shape == (0, 3)
        a1, g1 = torch.randn(2, 5, 3).to(dt), torch.randn(2, 5, 4).to(dt)
        out, _ = factored_scores(lib, a1, g1, left[:0], right[:0], None, True, ctx)
        assert out.shape == (2, 5, 0)
        for per_token in (False, True):  # rank 0 and d_in = 0: every score is an exact 0
            out, _ = factored_scores(lib, a1, g1, left[..., :0], right[..., :0], None, per_token, ctx)
            assert torch.equal(out, torch.zeros(out.shape)) and out.numel() > 0, ctx
            out, _ = factored_scores(lib, a1[..., :0], g1, left, right[:, :0], None, per_token, ctx)
            assert torch.equal(out, torch.zeros(out.shape)) and out.numel() > 0, ctx
        lam, _ = eigen_correction(lib, a0, g0, torch.eye(3), torch.eye(4), None, ctx)  # no documents
        assert torch.equal(lam, torch.zeros(4, 3)), ctx
        si, _ = self_influence(lib, a0, g0, torch.eye(3), torch.eye(4), torch.ones(4, 3), 0.1, None, ctx)
        assert si.shape == (0,)
        out, _ = covariance(lib, a0, None, ctx)
        assert torch.equal(out, torch.zeros(3, 3)), ctx
        # a layer without inputs: self-influence is all zeros (the memset path)
        a_empty = torch.randn(2, 5, 0).to(dt)
        si, _ = self_influence(lib, a_empty, g1, torch.eye(0), torch.eye(4), torch.ones(4, 0), 0.1, None, ctx)
        assert torch.equal(si, torch.zeros(2)), ctx


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("value", [None, "0", "", "true", "11", " 1", "1"])
def test_tc_flag_values(lib, value, dtype):
    """pyinf.h: by default the tensor cores take 16-bit inputs and fp32 inputs stay on FMA;
    PYINF_NATIVE_TC exactly "0" keeps every call on FMA, exactly "1" also takes fp32 inputs of
    the eigen ops to TF32; any other value is the default."""
    acts, grads, left, right, mask = _problem(_gen("flag"), 1, 3, 5, 4, 2, 2, dtype)
    ctx = _ctx("flag", value, DT_ID[dtype])
    rule = value if value in ("0", "1") else None
    with native_tc(value):
        out, _ = factored_scores(lib, acts, grads, left, right, mask, False, ctx, **_fs_kernels(rule, [dtype]))
        eigen_correction(lib, acts, grads, torch.eye(5), torch.eye(4), mask, ctx,
                         **_eigen_kernels(rule, False, dtype))
    assert_close(out, reference.factored_scores(*_f64(acts, grads, left, right), mask=mask), FP32_ACC_TOL, ctx)


def test_workspace_and_argument_errors(lib):
    acts, grads = torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    nbytes = ctypes.c_size_t(0)
    assert lib.pyinf_cuda_eigen_correction_workspace_size(_desc(lib, acts), _desc(lib, grads),
                                                          ctypes.byref(nbytes)) == 0
    assert nbytes.value > 0
    ws = torch.empty(nbytes.value, dtype=torch.uint8)
    out = torch.empty(4, 3)
    lib.pyinf_emu_reset()
    s = lib.pyinf_cuda_eigen_correction(_desc(lib, acts), _desc(lib, grads), _desc(lib, torch.eye(3)),
                                        _desc(lib, torch.eye(4)), None, out.data_ptr(), ws.data_ptr(),
                                        nbytes.value - 1, None)
    assert s == 5 and "workspace" in lib.pyinf_last_error().decode()  # PYINF_ERROR_WORKSPACE
    assert lib.pyinf_emu_launch_log().decode() == ""  # nothing launched
    s = lib.pyinf_cuda_factored_scores(_desc(lib, acts.double()), _desc(lib, grads), _desc(lib, torch.randn(2, 4, 1)),
                                       _desc(lib, torch.randn(2, 3, 1)), None, 0, out.data_ptr(), None)
    assert s == 2  # PYINF_ERROR_UNSUPPORTED_DTYPE


def test_an_earlier_pending_error_is_not_blamed_on_pyinf(lib):
    """cudaGetLastError holds an error that earlier work on the thread left unchecked: each
    entry point takes it before launching and says it is not pyinf's, and the next call runs."""
    acts, grads, left, right, mask = _problem(_gen("pending"), 2, 3, 5, 4, 2, 2, torch.float32)
    out, eig, cov = torch.empty(2, 2), torch.empty(4, 5), torch.empty(5, 5)
    x = torch.randn(2, 3, 5)
    calls = dict(
        factored_scores=lambda: lib.pyinf_cuda_factored_scores(
            *(_desc(lib, t) for t in (acts, grads, left, right, mask)), 0, out.data_ptr(), None),
        eigen_correction=lambda: lib.pyinf_cuda_eigen_correction(
            _desc(lib, acts), _desc(lib, grads), _desc(lib, torch.eye(5)), _desc(lib, torch.eye(4)), None,
            eig.data_ptr(), ws.data_ptr(), ws.numel(), None),
        covariance=lambda: lib.pyinf_cuda_covariance(_desc(lib, x), None, cov.data_ptr(), None))
    nbytes = ctypes.c_size_t(0)
    assert lib.pyinf_cuda_eigen_correction_workspace_size(_desc(lib, acts), _desc(lib, grads),
                                                          ctypes.byref(nbytes)) == 0
    ws = torch.empty(nbytes.value, dtype=torch.uint8)
    for op, call in calls.items():
        lib.pyinf_emu_reset()
        for written in (out, eig, cov, ws):
            _desc(lib, written)  # registered as device memory, as the inputs are
        lib.pyinf_emu_set_last_error(1)  # cudaErrorInvalidValue, from somebody else's call
        assert call() == 4, op  # PYINF_ERROR_CUDA
        said = lib.pyinf_last_error().decode()
        assert f"pyinf_cuda_{op}" in said and "before pyinf launched anything" in said, said
        assert "cudaErrorInvalidValue" in said, said
        assert lib.pyinf_emu_launch_log().decode() == "", op  # nothing launched
        assert call() == 0, (op, lib.pyinf_emu_failures().decode())  # the error was taken: the op runs


def test_emulation_reports_runtime_use(lib):
    """The launch log the other tests rely on, the threads actually run per launch, the
    poisoning of every __shared__ array, and each kernel's static shared memory (the
    launcher fails a block over the 48 KiB static limit)."""
    acts, grads, left, right, mask = _problem(_gen("log"), 1, 3, 5, 4, 2, 2, torch.bfloat16)
    before = lib.pyinf_emu_threads_run()
    with native_tc("1"):
        _, log = factored_scores(lib, acts, grads, left, right, mask, False, _ctx("log"))
    assert log.startswith(f"{TC_KERNEL} grid=(1,1,1) block=(128,1,1) smem=")
    assert lib.pyinf_emu_threads_run() - before == 128
    # every kernel instantiation's arrays: 3 + 3 + 4 + 2 x 4 + 3 (eigen ops, covariance) and 6 per
    # factored-scores instantiation: FMA and 2 WMMA dtypes, each single and grouped (see
    # emulate.py's stats)
    assert lib.shared_arrays_expected == 21 + 6 * 6
    smem = {}
    for entry in ";".join(WARM_UP_LOG.values()).split(";"):
        if entry:
            smem[entry.split(" ")[0]] = int(entry.rsplit("smem=", 1)[1])
    print("static shared memory per kernel (bytes):", smem)
    assert set(smem) == {FMA_KERNEL, TC_KERNEL, "rotate_kernel", "gram_kernel",
                         "reduce_partials_kernel", "rotate_tc_kernel", "gram_tc_kernel<0>", "gram_tc_kernel<1>",
                         "covariance_kernel"}
    assert all(v <= 48 * 1024 for v in smem.values())


def test_emulation_rejects_host_pointers(lib):
    """The kernel-argument check behind every call: an output outside the registered
    "device" buffers fails the launch (on a GPU it would be an illegal address)."""
    acts, grads, left, right, mask = _problem(_gen("host-ptr"), 1, 3, 5, 4, 2, 2, torch.float32)
    out = torch.empty(1, 2)
    lib.pyinf_emu_reset()
    lib.pyinf_emu_add_device_range(acts.data_ptr(), 1)  # any registration enables the check
    s = lib.pyinf_cuda_factored_scores(*(_desc(lib, x) for x in (acts, grads, left, right, mask)), 0,
                                       out.data_ptr(), None)
    assert s == 4 and "outside every registered device buffer" in lib.pyinf_emu_failures().decode()
    assert "cudaErrorLaunchFailure" in lib.pyinf_last_error().decode()
    lib.pyinf_emu_reset()
