"""Patched copies of the few CUTLASS / CuTe headers whose Hopper instructions the emulation
replaces, for compiling csrc/cuda/factored_scores_sm90.cu (unmodified) on the CPU.

CuTe writes every Hopper instruction the kernel uses as inline PTX inside a guard such as
``#if defined(CUTE_ARCH_MMA_SM90A_ENABLED)``; a host compiler takes the other branch, which
fails or returns a dummy. Each patch below keeps a header as it is except for one such
branch, whose body becomes a call into emu_sm90.cpp (TMA loads, mbarriers, wgmma, named
barriers, the shared-memory address of a pointer, the warp index). The patched headers go
into an overlay directory ahead of the real CUTLASS include directory, so everything else
(layouts, partitioning, descriptors, the host-side TMA setup) is CUTLASS's own code. A patch
whose anchor is not found exactly once fails the build: a CUTLASS release that moved the
code is noticed, not silently emulated wrong. Pinned to nvidia-cutlass 4.2.0.0 (Makefile).
"""
from __future__ import annotations

import os


class OverlayError(RuntimeError):
    pass


def _branch(anchor: str, guard: str, stop: str, code: str):
    """In the code after `anchor` (unique in the header): the preprocessor branch that starts
    at the line `guard` and ends at the next `stop` gets `code` as its body, and its guard
    becomes `#if 1`."""
    return (anchor, guard, stop, code)


_MMA_GUARD = "#if defined(CUTE_ARCH_MMA_SM90A_ENABLED)"
_TMA_GUARD = "#if defined(CUTE_ARCH_TMA_SM90_ENABLED)"
_BAR_GUARD = "#if CUDA_BARRIER_ENABLED"
_BAR_STOP = "#elif defined(__CUDA_ARCH__)"


def _gmma(name: str, dtype: int) -> tuple:
    regs = ", ".join(f"&d{i:02d}" for i in range(64))
    code = (f"    float* emu_d[64] = {{{regs}}};\n"
            f"    ::emu::sm90::wgmma_ss({dtype}, 64, 128, 16, desc_a, desc_b, emu_d, int(scale_D), int(scaleA),"
            f" int(scaleB), int(tnspA), int(tnspB));")
    return _branch(f"struct {name}\n{{", _MMA_GUARD, "#else", code)


def _tma_load(rank: int) -> tuple:
    crds = ", ".join(f"crd{i}" for i in range(rank))
    code = (f"    const int32_t emu_crd[{rank}] = {{{crds}}};\n"
            f"    (void)cache_hint;\n"
            f"    ::emu::sm90::tma_load(desc_ptr, mbar_ptr, smem_ptr, {rank}, emu_crd);")
    # (the branch holds an inner #if / #else / #endif: stop at the outer #else)
    return _branch(f"struct SM90_TMA_LOAD_{rank}D\n{{", _TMA_GUARD, "#else\n    CUTE_INVALID_CONTROL_PATH", code)


PATCHES: dict[str, list[tuple]] = {
    "cute/arch/util.hpp": [
        _branch("cast_smem_ptr_to_uint(void const* const ptr)\n{", "#if CUTE_CVTA_GENERIC_TO_SHARED_ACTIVATED",
                "#elif", "  return ::emu::sm90::smem_addr(ptr);"),
    ],
    "cute/arch/cluster_sm90.hpp": [
        _branch("CUTE_HOST_DEVICE uint32_t elect_one_sync()\n{", "#if defined(CUTE_ARCH_ELECT_ONE_SM90_ENABLED)",
                "#elif", "  return ::emu::sm90::elect_one() ? 1u : 0u;"),
    ],
    "cutlass/cutlass.h": [
        _branch("int canonical_warp_idx_sync() {", "#if defined(__CUDA_ARCH__)", "#else",
                "    return ::emu::warp_id();"),
        _branch("int canonical_warp_group_idx() {", "#if defined(__CUDA_ARCH__)", "#else",
                "    return ::emu::warp_id() / 4;"),
    ],
    "cute/arch/mma_sm90_gmma.hpp": [
        _branch("warpgroup_arrive()\n{", _MMA_GUARD, "#else", "  ::emu::sm90::wgmma_fence();"),
        _branch("warpgroup_wait()\n{", _MMA_GUARD, "#else", "  ::emu::sm90::wgmma_wait(N);"),
        _branch("warpgroup_commit_batch()\n{", _MMA_GUARD, "#else", "  ::emu::sm90::wgmma_commit();"),
        _gmma("MMA_64x128x16_F32BF16BF16_SS", 1),
        _gmma("MMA_64x128x16_F32F16F16_SS", 2),
    ],
    "cute/arch/copy_sm90_tma.hpp": [_tma_load(r) for r in range(1, 6)],
    "cute/arch/copy_sm90_desc.hpp": [
        _branch("prefetch_tma_descriptor(TmaDescriptor const* desc_ptr)\n{", _TMA_GUARD, "#else",
                "  ::emu::sm90::tma_prefetch(desc_ptr);"),
    ],
    "cutlass/arch/barrier.h": [
        _branch("static void arrive_and_wait_internal(uint32_t num_threads, uint32_t barrier_id) {", _BAR_GUARD,
                _BAR_STOP, "    ::emu::named_barrier(barrier_id, num_threads);"),
        _branch("static void init(ValueType const* smem_ptr, uint32_t arrive_count) {", _BAR_GUARD, _BAR_STOP,
                "    ::emu::sm90::mbar_init(smem_ptr, arrive_count);"),
        _branch("static void wait(ValueType const* smem_ptr, uint32_t phase) {", _BAR_GUARD, _BAR_STOP,
                "    ::emu::sm90::mbar_wait(smem_ptr, phase);"),
        _branch("static bool try_wait(ValueType const* smem_ptr, uint32_t phase) {", _BAR_GUARD, _BAR_STOP,
                "    return ::emu::sm90::mbar_try_wait(smem_ptr, phase);"),
        _branch("static void arrive(ValueType const* smem_ptr) {", _BAR_GUARD, _BAR_STOP,
                "    ::emu::sm90::mbar_arrive(smem_ptr, 0);"),
        _branch("static void arrive_and_expect_tx(ValueType const* smem_ptr, uint32_t transaction_bytes) {",
                _BAR_GUARD, _BAR_STOP, "    ::emu::sm90::mbar_arrive(smem_ptr, transaction_bytes);"),
        _branch("void fence_barrier_init() {", _BAR_GUARD, _BAR_STOP, "  // a barrier fence: nothing to emulate"),
        _branch("void fence_view_async_shared() {", _BAR_GUARD, _BAR_STOP, "  // a proxy fence: nothing to emulate"),
    ],
}


def _apply(text: str, header: str, anchor: str, guard: str, stop: str, code: str) -> str:
    if text.count(anchor) != 1:
        raise OverlayError(f"{header}: anchor {anchor!r} found {text.count(anchor)} times (expected once)")
    a = text.index(anchor) + len(anchor)
    g = text.find(guard, a)
    if g < 0:
        raise OverlayError(f"{header}: {guard!r} not found after {anchor!r}")
    g_end = text.index("\n", g) + 1
    s = text.find(stop, g_end)
    if s < 0:
        raise OverlayError(f"{header}: {stop!r} not found after {guard!r} ({anchor!r})")
    return text[:g] + "#if 1  // pyinf CPU emulation (tests/cuda_emu/emu_sm90.cpp)\n" + code + "\n" + text[s:]


def cutlass_include() -> str | None:
    """The CUTLASS headers the real build uses (PYINF_CUTLASS_DIR or the nvidia-cutlass
    package), or None."""
    env = os.environ.get("PYINF_CUTLASS_DIR")
    if env:
        return env if os.path.exists(os.path.join(env, "cute", "tensor.hpp")) else None
    try:
        import cutlass_library
    except ImportError:
        return None
    inc = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return inc if os.path.exists(os.path.join(inc, "cute", "tensor.hpp")) else None


def write_overlay(include: str, out_dir: str) -> list[str]:
    """Writes the patched headers under out_dir; returns their paths."""
    written = []
    for header, patches in PATCHES.items():
        with open(os.path.join(include, header)) as f:
            text = f.read()
        for anchor, guard, stop, code in patches:
            text = _apply(text, header, anchor, guard, stop, code)
        dst = os.path.join(out_dir, header)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(dst, "w") as f:
            f.write(text)
        written.append(dst)
    return written
