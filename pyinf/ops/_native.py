"""The native backend of :mod:`pyinf.ops`: the C API of ``csrc/`` through ``pyinf._C``.

CPU tensors run the C++ implementations (OpenMP), CUDA tensors the CUDA kernels (sm_80+:
tensor cores, WMMA and TF32, for 16-bit inputs, fp32 FMA otherwise; the opt-in Hopper
kernel with ``PYINF_NATIVE_SM90=1``) on torch's current stream. Inputs may be fp32, bf16 or
fp16, each with its own dtype and any strides, and are read in place (only the Hopper
kernel copies the query factors, into its packed layout); results are fp32. ``dense_scores`` has no native kernel, so it is absent here: ``auto`` falls back
and an explicit request raises. ``factored_scores_grouped`` is one C call: on CUDA one launch
per 16 layers (``pyinf_cuda_factored_scores_grouped``).

Imports fail (making the backend unavailable) when the extension was not built.
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, Optional, Sequence

import torch

try:
    from .. import _C
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "pyinf._C (the native extension) is not built: reinstall pyinf with a C++ toolchain and cmake "
        "(`pip install --no-build-isolation -v -e .`, PYINF_CUDA=0|1|auto) to see why "
        f"(import error: {exc})"
    ) from exc

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unsupported_reason(op: str, tensors: Sequence[torch.Tensor]) -> Optional[str]:
    for t in tensors:
        if t.dtype not in _DTYPES:
            return f"the native backend takes float32, bfloat16 or float16 tensors, got {t.dtype}"
        if t.device.type == "cuda":
            if not _C.cuda_compiled():
                return "pyinf._C was built without CUDA (no nvcc at install time, or PYINF_CUDA=0)"
        elif t.device.type != "cpu":
            return f"the native backend runs on cpu and cuda tensors, got device {t.device}"
    return None


def _stream(t: torch.Tensor):
    return torch.cuda.current_stream(t.device).cuda_stream if t.device.type == "cuda" else None


class _on_device:
    """Makes the tensor's CUDA device current for the call (kernels launch on the current device)."""

    def __init__(self, t: torch.Tensor):
        self.ctx = torch.cuda.device(t.device) if t.device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _workspace(nbytes: int, like: torch.Tensor):
    if like.device.type != "cuda" or nbytes == 0:
        return None
    return torch.empty(nbytes, dtype=torch.uint8, device=like.device)


def covariance(x, *, mask=None):
    out = torch.empty(x.shape[2], x.shape[2], dtype=torch.float32, device=x.device)
    with _on_device(x):
        _C.covariance(x, mask, out, _stream(x))
    return out


def eigen_correction(acts, grads, q_a, q_s, *, mask=None):
    out = torch.empty(grads.shape[2], acts.shape[2], dtype=torch.float32, device=acts.device)
    with _on_device(acts):
        ws = _workspace(_C.eigen_correction_workspace_size(acts, grads), acts)
        _C.eigen_correction(acts, grads, q_a, q_s, mask, out, ws, _stream(acts))
    return out


def self_influence(acts, grads, q_a, q_s, lambdas, damping, *, mask=None):
    out = torch.empty(acts.shape[0], dtype=torch.float32, device=acts.device)
    with _on_device(acts):
        ws = _workspace(_C.self_influence_workspace_size(acts, grads), acts)
        _C.self_influence(acts, grads, q_a, q_s, lambdas, float(damping), mask, out, ws, _stream(acts))
    return out


class PackedFactors:
    """The Hopper kernel's packed copy of a pair of query factors (rank-padded, K-major: see
    pyinf_cuda_factored_scores_pack), made once and reused while the same two tensors are
    alive and unmodified. A scoring pass hands each layer the same query tensors once per
    batch, so the copy happens once per pass instead of once per call.

    An entry is reused only for the very same tensor objects (weak references), with the
    same in-place version counters (``Tensor._version``), the same size and the same stream;
    anything else packs again. It is dropped when ``left`` is freed. Writes that bypass the
    counters (``.data``, numpy, DLPack) are not seen; inference tensors, which have no
    counter, are packed on every call."""

    def __init__(self):
        self._entries: Dict[int, tuple] = {}

    def get(self, left: torch.Tensor, right: torch.Tensor, nbytes: int, stream,
            pack: Callable[[torch.Tensor], None]) -> torch.Tensor:
        if left.is_inference() or right.is_inference():  # no version counters to tell whether they changed
            packed = torch.empty(nbytes, dtype=torch.uint8, device=left.device)
            pack(packed)
            return packed
        key = id(left)
        entry = self._entries.get(key)
        state = (left._version, right._version, nbytes, stream)
        if entry is not None and entry[0]() is left and entry[1]() is right and entry[2] == state:
            return entry[3]
        packed = torch.empty(nbytes, dtype=torch.uint8, device=left.device)
        pack(packed)
        entries = self._entries
        self._entries[key] = (weakref.ref(left, lambda _: entries.pop(key, None)), weakref.ref(right), state, packed)
        return packed

    def __len__(self):
        return len(self._entries)

    def clear(self):
        """Forget every packed copy (the next call with any factors packs again)."""
        self._entries.clear()


_PACKED = PackedFactors()


def release_caches() -> None:
    """Drops the packed query factors (see :func:`pyinf.ops.release_caches`)."""
    _PACKED.clear()


def _packed_factors(left, right):
    """The packed factors when the Hopper kernel can take them (opt-in, sm_90, 16-bit), else None."""
    if left.device.type != "cuda":
        return None
    nbytes = _C.factored_scores_pack_size(left, right)
    if nbytes == 0:
        return None
    stream = _stream(left)
    return _PACKED.get(left, right, nbytes, stream, lambda packed: _C.factored_scores_pack(left, right, packed, stream))


def _scores_out(acts, left, per_token):
    """The fp32 output of one layer's scores: [N, Q], or [N, T, Q] per token."""
    n, t = acts.shape[:2]
    shape = (n, t, left.shape[0]) if per_token else (n, left.shape[0])
    return torch.empty(shape, dtype=torch.float32, device=acts.device)


def factored_scores(acts, grads, left, right, *, mask=None, per_token=False):
    out = _scores_out(acts, left, per_token)
    with _on_device(acts):
        # a workspace when the kernel splits the tokens of few documents over more blocks, or
        # for the Hopper kernel's partial sums (PYINF_NATIVE_SM90=1; its factors packed once)
        packed = _packed_factors(left, right)
        ws = _workspace(_C.factored_scores_workspace_size(acts, grads, left, right, bool(per_token),
                                                          packed=packed is not None), acts)
        _C.factored_scores(acts, grads, left, right, mask, bool(per_token), out, ws, _stream(acts), packed)
    return out


def factored_scores_grouped(problems, *, per_token=False):
    """One C call for all problems: on CUDA one launch per 16 layers (the WMMA / FMA kernels;
    the opt-in Hopper kernel takes single-layer calls only), on the CPU one layer after another."""
    first = problems[0]["acts"]
    outs = [_scores_out(p["acts"], p["left"], per_token) for p in problems]
    with _on_device(first):
        ws = _workspace(_C.factored_scores_grouped_workspace_size(
            [(p["acts"], p["grads"], p["left"], p["right"]) for p in problems], bool(per_token)), first)
        _C.factored_scores_grouped([(p["acts"], p["grads"], p["left"], p["right"], p["mask"], out)
                                    for p, out in zip(problems, outs)], bool(per_token), ws, _stream(first))
    return outs
