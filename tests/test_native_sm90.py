"""The native Hopper factored-scores kernel (csrc/cuda/factored_scores_sm90.cu: TMA loads,
wgmma on two warpgroups, CuTe), opt-in with PYINF_NATIVE_SM90=1.

Without a GPU: that the build compiled it in wherever it could (nvcc >= 12.3, 90a in the
architectures, the CUTLASS headers of nvidia-cutlass), what ptxas makes of it for sm_90a
(no spills, the wgmma and TMA instructions present, no serialised wgmma), and its barrier
protocol, transcribed into tests/sm90_pipeline_model.py, under random interleavings (and
three broken variants of it, which must fail there). tests/test_native_sm90_emulated.py
runs the kernel itself on the CPU, with TMA, mbarriers and wgmma emulated.
On an H100 / H200 (skipped elsewhere): the kernel against the float64 reference on fresh
random inputs (odd T, ranks that are not powers of two, many queries, masks with NaN in the
masked rows, bf16 and fp16, per-token and document scores), bit-identical on a second run,
the fallback to the WMMA kernel where it does not apply, and the opt-in itself.
"""
import os
import re
import shutil
import subprocess

import pytest
import torch

import pyinf.ops as ops

from . import oracle

_C = pytest.importorskip("pyinf._C", reason="native extension pyinf._C not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "csrc", "cuda", "factored_scores_sm90.cu")


def _cutlass_include():
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")
    if spec is None:
        return None
    inc = os.path.join(list(spec.submodule_search_locations)[0], "source", "include")
    return inc if os.path.exists(os.path.join(inc, "cute", "tensor.hpp")) else None


def _nvcc_version(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _can_build_sm90():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, "nvcc not on PATH"
    if _nvcc_version(nvcc) < (12, 3):
        return None, "nvcc older than 12.3"
    inc = _cutlass_include()
    if inc is None:
        return None, "nvidia-cutlass (CUTLASS headers) not installed"
    return (nvcc, inc), ""


def test_sm90_kernel_is_compiled_in_when_it_can_be():
    """CI has nvcc 13 and the CUTLASS headers (Makefile): a build that silently dropped the
    Hopper kernel would otherwise go unnoticed until a GPU session."""
    if os.environ.get("PYINF_CUDA", "auto").strip().lower() == "0" or os.environ.get("PYINF_CUDA_SM90") == "0":
        pytest.skip("CUDA or the Hopper kernel switched off for this build")
    tools, why = _can_build_sm90()
    if tools is None:
        pytest.skip(why)
    archs = os.environ.get("PYINF_CUDA_ARCHS") or "90a;80"
    if "90a" not in archs.split(";"):
        pytest.skip(f"PYINF_CUDA_ARCHS={archs} has no 90a")
    assert _C.cuda_compiled() and _C.cuda_sm90_compiled(), (
        "nvcc and the CUTLASS headers are there but pyinf._C was built without the Hopper kernel "
        "(see 'pyinf: Hopper kernel' in the pip build log)")


def test_sm90_kernel_compiles_to_wgmma_and_tma_without_spills(tmp_path):
    """What the H100 would run, read from the compiler: the two accumulators (2 x 64 fp32 per
    thread) stay in registers, the products are wgmma m64n128k16 with fp32 accumulation for
    bf16 and fp16, the loads are TMA (cp.async.bulk.tensor) on mbarriers, and ptxas does not
    serialise the wgmma (its C7515 warning)."""
    tools, why = _can_build_sm90()
    if tools is None:
        pytest.skip(why)
    nvcc, inc = tools
    ptx = tmp_path / "sm90.ptx"
    flags = ["-std=c++17", "-O3", "-arch=sm_90a", "-DPYINF_WITH_CUDA", "-DPYINF_WITH_SM90",
             f"-I{os.path.join(ROOT, 'csrc', 'include')}", f"-I{inc}", "--expt-relaxed-constexpr"]
    subprocess.run([nvcc, *flags, "-ptx", SOURCE, "-o", str(ptx)], check=True, capture_output=True, text=True)
    ptxas = os.path.join(os.path.dirname(os.path.realpath(nvcc)), "ptxas")
    res = subprocess.run([ptxas if os.path.exists(ptxas) else "ptxas", "-arch=sm_90a", "-v", str(ptx),
                          "-o", str(tmp_path / "sm90.cubin")], check=True, capture_output=True, text=True)
    log = res.stdout + res.stderr
    # C7515 / C7520: wgmma serialised (C7520 came from a branch between the two accumulators
    # inside one K loop); C7519: ptxas had to inject warpgroup.arrive because it could not prove
    # the accumulators untouched between wgmmas (a __syncwarp in the K loop did that).
    assert "C7515" not in log and "serialized" not in log and "C7519" not in log, log
    kernels = re.findall(r"Compiling entry function '(\w*factored_scores_sm90_kernel\w*)'.*?"
                         r"(\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers", log, re.S)
    assert len(kernels) == 6, log  # bf16 and fp16 x the K-loop modes "1", "wait0" and "ws"
    for name, stores, loads, regs in kernels:
        assert int(stores) == 0 and int(loads) == 0, (name, stores, loads)
        assert int(regs) <= 255, (name, regs)
    text = ptx.read_text()
    assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in text
    assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16" in text
    assert "cp.async.bulk.tensor" in text and "mbarrier.try_wait.parity" in text
    assert "wgmma.wait_group.sync.aligned 1;" in text  # the default keeps a wgmma batch in flight


# ---- on an H100 / H200 --------------------------------------------------------------------
def _hopper():
    return (torch.cuda.is_available() and _C.cuda_compiled() and _C.cuda_sm90_compiled()
            and torch.cuda.get_device_capability() == (9, 0))


hopper_only = pytest.mark.skipif(not _hopper(), reason="needs an sm_90 GPU and pyinf._C built with the Hopper kernel")


def _problem(n, t, d_in, d_out, q, r, dtype):
    dev = "cuda"
    acts = torch.randn(n, t, d_in, device=dev).to(dtype)
    grads = torch.randn(n, t, d_out, device=dev).to(dtype)
    left = (torch.randn(q, d_out, r, device=dev) / d_out ** 0.5).to(dtype)
    right = (torch.randn(q, d_in, r, device=dev) / d_in ** 0.5).to(dtype)
    mask = torch.rand(n, t, device=dev) > 0.25
    mask[0, 0] = True
    return acts, grads, left, right, mask


def _reference(acts, grads, left, right, mask):
    """Per-token and document scores, and the same sums over absolute values (rel_err's scale),
    in float64 on the GPU: the CPU oracle takes seconds at these sizes, and the session gives
    these tests 60 s in all."""
    out = {}
    for absolute in (False, True):
        f = (lambda x: x.double().abs()) if absolute else (lambda x: x.double())
        gl = torch.einsum("nto,qok->ntqk", f(grads), f(left))
        ar = torch.einsum("nti,qik->ntqk", f(acts), f(right))
        tok = (gl * ar).sum(-1) * mask.double().unsqueeze(-1)
        out[absolute] = {True: tok, False: tok.sum(1)}
    return out[False], out[True]


def _kernel(acts, grads, left, right, per_token):
    ws = _C.factored_scores_workspace_size(acts, grads, left, right, per_token)
    return _C.factored_scores_kernel(acts, grads, left, right, per_token, ws)


SM90_SHAPES = [  # (N, T, d_in, d_out, Q, r)
    (2, 130, 136, 72, 5, 32),     # two token tiles (the second nearly empty), K past one 64-slice
    (3, 1, 8, 16, 1, 1),          # T = 1, r = 1 (padded to 8), d smaller than a K slice
    (1, 300, 200, 264, 7, 20),    # r = 20 (padded to 32), d not a multiple of 64
    (2, 128, 64, 64, 3, 128),     # r = 128: one query per column tile
    (2, 257, 512, 1024, 40, 8),   # 16 queries per column tile, three column tiles
]


@hopper_only
@pytest.mark.parametrize("shape", SM90_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["1", "wait0", "ws"])  # wgmma in flight, waited per step, producer + persistent
def test_sm90_factored_scores_match_reference(shape, dtype, mode, monkeypatch):
    n, t, d_in, d_out, q, r = shape
    acts, grads, left, right, mask = _problem(n, t, d_in, d_out, q, r, dtype)
    clean_a, clean_g = acts.clone(), grads.clone()
    acts[~mask] = float("nan")  # masked rows are read by TMA but must never reach a score
    grads[~mask] = float("inf")
    monkeypatch.setenv("PYINF_NATIVE_SM90", mode)
    ref, scale = _reference(clean_a, clean_g, left, right, mask)
    for per_token in (False, True):
        assert _kernel(acts, grads, left, right, per_token) == "sm90"
        out = ops.factored_scores(acts, grads, left, right, mask=mask, per_token=per_token, backend="native")
        assert oracle.rel_err(out, ref[per_token], scale[per_token]) < 1e-5, (shape, dtype, per_token)
        again = ops.factored_scores(acts, grads, left, right, mask=mask, per_token=per_token, backend="native")
        assert torch.equal(out, again)  # fixed reduction order, no atomics


@hopper_only
@pytest.mark.parametrize("ctas", ["1", "7", ""])  # "": one CTA per SM
def test_sm90_persistent_grid_takes_every_tile_once(ctas, monkeypatch):
    """PYINF_NATIVE_SM90=ws runs a persistent grid: a CTA takes tiles blockIdx.x, + gridDim.x, ...
    and the pipeline runs on across them. With 7 CTAs for 27 tiles some take 4 tiles and some 3;
    with 1, one CTA takes them all; with one per SM, 216 tiles are more than one each."""
    monkeypatch.setenv("PYINF_NATIVE_SM90", "ws")
    monkeypatch.setenv("PYINF_NATIVE_SM90_CTAS", ctas)
    n = 8 if ctas == "" else 1  # 8 x 9 token tiles x 3 column tiles = 216 tiles; 1 document: 27
    acts, grads, left, right, mask = _problem(n, 1030, 64, 72, 40, 8, torch.bfloat16)
    ref, scale = _reference(acts, grads, left, right, mask)
    for per_token in (False, True):
        assert _kernel(acts, grads, left, right, per_token) == "sm90"
        out = ops.factored_scores(acts, grads, left, right, mask=mask, per_token=per_token, backend="native")
        assert oracle.rel_err(out, ref[per_token], scale[per_token]) < 1e-5, (ctas, per_token)
        monkeypatch.setenv("PYINF_NATIVE_SM90", "1")  # one CTA per tile: the same sums, bit for bit
        assert torch.equal(out, ops.factored_scores(acts, grads, left, right, mask=mask, per_token=per_token,
                                                    backend="native"))
        monkeypatch.setenv("PYINF_NATIVE_SM90", "ws")


@hopper_only
def test_sm90_is_opt_in_and_falls_back_where_it_does_not_apply(monkeypatch):
    acts, grads, left, right, mask = _problem(2, 70, 48, 40, 3, 16, torch.bfloat16)
    monkeypatch.delenv("PYINF_NATIVE_SM90", raising=False)
    assert _kernel(acts, grads, left, right, False) == "wmma"
    monkeypatch.setenv("PYINF_NATIVE_SM90", "1")
    assert _kernel(acts, grads, left, right, False) == "sm90"
    assert _C.factored_scores_kernel(acts, grads, left, right, False, 0) == "wmma"  # no workspace
    odd = torch.randn(2, 70, 47, device="cuda").to(torch.bfloat16)  # rows of 47 elements: no TMA
    right_odd = torch.randn(3, 47, 16, device="cuda").to(torch.bfloat16)
    assert _kernel(odd, grads, left, right_odd, False) == "wmma"
    assert _kernel(acts.float(), grads.float(), left.float(), right.float(), False) == "fma"
    expanded = acts[:1].expand(2, -1, -1)  # a zero document stride: not a layout TMA takes
    assert _kernel(expanded, grads, left, right, False) == "wmma"
    wide = torch.randn(3, 40, 200, device="cuda").to(torch.bfloat16)  # r > 128
    assert _kernel(acts, grads, wide, torch.randn(3, 48, 200, device="cuda").to(torch.bfloat16), False) == "wmma"
    monkeypatch.setenv("PYINF_NATIVE_TC", "0")  # "FMA for every call" covers this kernel too
    assert _kernel(acts, grads, left, right, False) == "fma"
    # The fallbacks give the reference answer.
    monkeypatch.delenv("PYINF_NATIVE_TC")
    out = ops.factored_scores(odd, grads, left, right_odd, mask=mask, backend="native")
    assert oracle.rel_err(out, oracle.factored_scores(odd, grads, left, right_odd, mask)) < 1e-2


@hopper_only
def test_sm90_strided_views_and_side_stream(monkeypatch):
    """Token rows inside a wider buffer (row stride 72, 16-byte aligned) and factors as views;
    on a side stream, the same answer as the default stream."""
    monkeypatch.setenv("PYINF_NATIVE_SM90", "1")
    buf = torch.randn(3, 100, 72, device="cuda").to(torch.bfloat16)
    acts = buf[..., :64]
    grads = torch.randn(100, 3, 40, device="cuda").to(torch.bfloat16).transpose(0, 1)
    assert _kernel(acts, grads.contiguous(), *_factors(4, 40, 64, 24), False) == "sm90"
    left, right = _factors(4, 40, 64, 24)
    left_t = left.transpose(1, 2).contiguous().transpose(1, 2)  # strided factor: read by the copy kernel
    mask = torch.rand(3, 100, device="cuda") > 0.3
    g = grads.contiguous()
    ref = oracle.factored_scores(acts, g, left, right, mask)
    out = ops.factored_scores(acts, g, left_t, right, mask=mask, backend="native")
    assert oracle.rel_err(out, ref) < 1e-5
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        side = ops.factored_scores(acts, g, left_t, right, mask=mask, backend="native")
    s.synchronize()
    assert torch.equal(out, side)


@hopper_only
def test_sm90_packs_each_factor_pair_once(monkeypatch):
    """The native adapter packs a pair of query factors once (pyinf_cuda_factored_scores_pack)
    and reuses it for every call with the same, unmodified tensors: same scores as the reference
    for two batches; an in-place change of the factors packs again."""
    from pyinf.ops import _native

    monkeypatch.setenv("PYINF_NATIVE_SM90", "1")
    left, right = _factors(3, 40, 48, 16)
    before = len(_native._PACKED)
    for batch in range(2):
        acts, grads, _, _, mask = _problem(2, 70, 48, 40, 3, 16, torch.bfloat16)
        assert _kernel(acts, grads, left, right, False) == "sm90"
        out = ops.factored_scores(acts, grads, left, right, mask=mask, backend="native")
        assert oracle.rel_err(out, oracle.factored_scores(acts, grads, left, right, mask)) < 1e-5, batch
        assert len(_native._PACKED) == before + 1
    packed = _native._PACKED._entries[id(left)][3]
    left.mul_(2)  # in place: the version counter moves, the pair is packed again
    out = ops.factored_scores(acts, grads, left, right, mask=mask, backend="native")
    assert oracle.rel_err(out, oracle.factored_scores(acts, grads, left, right, mask)) < 1e-5
    assert _native._PACKED._entries[id(left)][3] is not packed


def test_packed_factor_cache_reuses_only_the_same_unmodified_tensors():
    """pyinf.ops._native.PackedFactors (CPU tensors stand in for CUDA ones; `pack` counts):
    a hit needs the same two tensor objects, unchanged version counters, size and stream."""
    from pyinf.ops._native import PackedFactors

    cache, packs = PackedFactors(), []

    def get(left, right, nbytes=64, stream=None):
        return cache.get(left, right, nbytes, stream, lambda p: packs.append(p))

    left, right = torch.randn(2, 8, 4), torch.randn(2, 6, 4)
    first = get(left, right)
    assert get(left, right) is first and len(packs) == 1
    assert get(left, right.clone()) is not first and len(packs) == 2  # another tensor, equal values
    second = get(left, right)
    assert len(packs) == 3
    right.add_(1)  # in-place change
    assert get(left, right) is not second and len(packs) == 4
    get(left, right, nbytes=128)
    get(left, right, nbytes=128, stream=7)
    assert len(packs) == 6
    assert get(left, right, nbytes=128, stream=7) is packs[-1] and len(packs) == 6
    assert len(cache) == 1
    del left  # the entry goes with its left factor
    import gc

    gc.collect()
    assert len(cache) == 0


class _RecordingC:
    """pyinf._C with its factored_scores calls recorded by the kernel each one runs."""

    def __init__(self, c, names):
        self._c, self._names = c, names

    def __getattr__(self, name):
        return getattr(self._c, name)

    def factored_scores(self, acts, grads, left, right, mask, per_token, out, ws=None, stream=None, packed=None):
        nbytes = 0 if ws is None else ws.numel() * ws.element_size()
        if packed is not None:
            # The kernel query describes the unpacked call, whose workspace would also hold the
            # packed factors; with them passed apart, the workspace holds only the partials.
            nbytes += packed.numel() * packed.element_size()
        aligned = all(x.stride(1) % 8 == 0 and x.stride(0) % 8 == 0 for x in (acts, grads))  # TMA rows
        self._names.append((self._c.factored_scores_kernel(acts, grads, left, right, per_token, nbytes), aligned))
        return self._c.factored_scores(acts, grads, left, right, mask, per_token, out, ws, stream, packed)


@hopper_only
def test_sm90_pipeline_matches_torch_on_the_demo_model(monkeypatch):
    """The whole pipeline (bf16 demo model, biased layers read through their padded rows) with
    the native backend on the Hopper kernel gives torch's scores; every factored call whose token
    rows TMA can read ran it (the LM head's 101-wide gradient rows cannot: WMMA there)."""
    from pyinf.demo.corpus import build_corpus
    from pyinf.demo.train import build_model
    from pyinf.ops import _native
    from torch.utils.data import Subset

    from .test_backends_pipeline import _rel, _run

    corpus = build_corpus(seed=0, quick=True)
    model = build_model(corpus, seed=0, quick=True).eval().to(device="cuda", dtype=torch.bfloat16)
    train = Subset(corpus.train_dataset(), range(0, 108, 9))
    query = Subset(corpus.query_dataset(), [0, 1, 20])
    kernels = []
    monkeypatch.setenv("PYINF_NATIVE_SM90", "1")
    monkeypatch.setattr(_native, "_C", _RecordingC(_native._C, kernels))
    ours = _run(model, train, query, "native", False)
    ref = _run(model, train, query, "torch", False)
    assert any(name == "sm90" for name, _ in kernels), kernels
    assert all(name == ("sm90" if aligned else "wmma") for name, aligned in kernels), kernels
    for key in ("scores", "per_token"):
        assert _rel(ours[key], ref[key]) < 2e-2, key


def _factors(q, d_out, d_in, r):
    left = torch.randn(q, d_out, r, device="cuda").to(torch.bfloat16)
    right = torch.randn(q, d_in, r, device="cuda").to(torch.bfloat16)
    return left, right


# ---- the kernel's barrier protocol, without a GPU (tests/sm90_pipeline_model.py) ------------
from . import sm90_pipeline_model as model  # noqa: E402

PIPELINE_CASES = [  # (stages, K steps per tile, tiles of the CTA)
    (4, 2, 1),    # fewer K steps than stages
    (4, 3, 5),    # persistent, and the refills cross tile ends inside the prologue's reach
    (4, 9, 3),
    (2, 5, 4),    # two stages: every refill waits
    (4, 64, 2),   # long K loops
]


@pytest.mark.parametrize("mode", ["1", "wait0", "ws"])
@pytest.mark.parametrize("case", PIPELINE_CASES)
def test_sm90_barrier_protocol_under_random_interleavings(mode, case):
    seed0 = int.from_bytes(os.urandom(4), "little")
    for seed in range(seed0, seed0 + 20):
        try:
            model.check(mode, *case, seed=seed)
        except model.ProtocolError as exc:
            raise AssertionError(f"mode {mode}, case {case}, seed {seed}: {exc}") from exc


class _ReleaseTooEarly(model.Pipeline):
    """With a wgmma in flight, releasing the step just issued instead of the one before."""

    def k_step(self, wg, g, kt):
        st, phase = g % self.S, g // self.S
        yield lambda: self.full[st].ready(phase & 1, phase)
        self.wgmma(wg, g)
        yield lambda: len(self.outstanding[wg]) <= self.in_flight
        yield from self.release(wg, g)


class _NoReleaseAtTileEnd(model.Pipeline):
    """Forgetting to release a tile's last step before the next tile (persistent grid)."""

    release_at_tile_end = False


class _ProducerWaitsWrongPhase(model.Pipeline):
    """The ws producer waiting for the empty barrier's phase g // S instead of g // S - 1."""

    def producer(self):
        for g in range(self.steps):
            st = g % self.S
            if g >= self.S:
                phase = g // self.S
                yield lambda st=st, phase=phase: self.empty[st].ready(phase & 1, phase)
            self.issue(g, st)


@pytest.mark.parametrize("broken, mode", [(_ReleaseTooEarly, "1"), (_NoReleaseAtTileEnd, "ws"),
                                          (_ProducerWaitsWrongPhase, "ws")])
def test_sm90_protocol_model_catches_broken_protocols(broken, mode):
    """The model has teeth: three plausible mistakes each fail it (a stage released while its
    wgmma still reads it, a deadlock, a wait passed on the wrong phase's parity)."""
    import random

    failures = 0
    for seed in range(30):
        try:
            broken(mode, 4, 6, 3, random.Random(seed)).run()
        except model.ProtocolError:
            failures += 1
    assert failures > 0
