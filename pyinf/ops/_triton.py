"""The Triton backend of :mod:`pyinf.ops`: a thin adapter from the ops contract (validated
inputs, bool mask or None, python-float damping) to the kernels in :mod:`triton_kernels`.

Runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 (Triton's interpreter,
used by the test-suite on machines without a GPU). Inputs fp32 / bf16 / fp16 (fp64 stays
on the torch reference); accumulation and results fp32. All ops are deterministic:
repeated calls on the same inputs give bitwise-identical results.
"""
from __future__ import annotations

import weakref
from typing import List, Optional, Sequence

import torch

from triton_kernels import covariance as _cov
from triton_kernels import cross_entropy as _ce
from triton_kernels import dense_scores as _dense
from triton_kernels import eigen_correction as _eig
from triton_kernels import factored_scores as _fs
from triton_kernels import self_influence as _si
from triton_kernels._shared import INTERPRETING

from .._padding import padded_empty, padded_width

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OPS = ("covariance", "eigen_correction", "self_influence", "factored_scores", "factored_scores_grouped",
        "dense_scores", "cross_entropy_rows")


def unsupported_reason(op: str, tensors: Sequence[torch.Tensor]) -> Optional[str]:
    if op not in _OPS:
        return f"the triton backend does not implement {op!r}"
    for t in tensors:
        if t.dtype not in _SUPPORTED_DTYPES:
            return f"dtype {t.dtype} is not supported by the triton backend (fp32, bf16, fp16 only)"
        if t.device.type == "cpu" and not INTERPRETING:
            return "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 before importing triton)"
        if t.device.type not in ("cuda", "cpu"):
            return f"device {t.device} is not supported by the triton backend"
    return None


def _cuda_context(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_INT32_OFFSETS = 2**31  # the kernels' int32 offsets (a module constant, so tests can lower it)


def _int32_rows(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """`t`, or a contiguous copy when an offset along its last dimension passes 2^31 elements.
    The kernels index documents and tokens in int64, but the last dimension (features; a
    mask's tokens) in int32, which its unit or small stride keeps far below 2^31; only a view
    with the features outermost (a permuted [d, N, T] buffer) can pass it."""
    if t is not None and t.dim() and (t.shape[-1] - 1) * abs(t.stride(-1)) >= _INT32_OFFSETS:
        return t.contiguous()
    return t


def covariance(x: torch.Tensor, *, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    x, mask = _int32_rows(x), _int32_rows(mask)
    with _cuda_context(x):
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        return _cov.covariance(x, mask, target_programs=2 * sms)


class _CastCache:
    """Copies the kernels need of tensors that stay the same over a pass, made once per
    source tensor: the eigenbases in the kernels' compute dtype (:meth:`get`), and the query
    factors with their rank padded for the scores kernel (:meth:`derived`).

    The fp32 eigenbases are the same tensors for every batch of a pass (Lambda fitting,
    self-influence), and the bf16 kernels need them in bf16: casting on every call would
    reread and rewrite them once per layer per batch (for Llama-7B ``up_proj``, ~0.5 GB of
    traffic per call). The same holds for the query factors of a scoring pass. An entry lives
    as long as its source tensor (a weak reference) and is refreshed when the source is
    modified in place (its version counter moves). Writes that bypass the counter (through
    ``.data``, numpy or DLPack) are not seen: replace the tensor instead. Inference tensors
    have no counter: they are copied on every call."""

    def __init__(self):
        self._entries = {}  # id(source) -> (weakref to source, version, {key: copy})

    def get(self, src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`src` in `dtype` (itself when it has that dtype), rows padded (:func:`_padded_rows`)."""
        if src.dtype == dtype:
            return src
        return self.derived(src, dtype, lambda s: _fp16_checked(s, _padded_rows(s, dtype)))

    def derived(self, src: torch.Tensor, key, make) -> torch.Tensor:
        """``make(src)``, made once per `key` while `src` lives unmodified."""
        if src.is_inference():  # no version counter to tell whether it changed
            return make(src)
        ident = id(src)
        entry = self._entries.get(ident)
        if entry is None or entry[0]() is not src or entry[1] != src._version:
            entry = (weakref.ref(src, lambda _, ident=ident: self._entries.pop(ident, None)), src._version, {})
            self._entries[ident] = entry
        copies = entry[2]
        if key not in copies:
            copies[key] = make(src)
        return copies[key]

    def __len__(self):
        return len(self._entries)

    def clear(self):
        self._entries.clear()


def _fp16_checked(src: torch.Tensor, cast: torch.Tensor) -> torch.Tensor:
    """An eigenbasis cast to fp16 (the kernels' dtype for fp16 tokens) must still be finite:
    an orthonormal basis is (entries <= 1), a basis of other vectors may not be. Checked once
    per cached cast (one host sync)."""
    if cast.dtype == torch.float16 and not bool(torch.isfinite(cast).all()) and bool(torch.isfinite(src).all()):
        raise ValueError(f"its shape {tuple(src.shape)} ({src.dtype}) basis has entries beyond fp16's range "
                         f"(largest {float(src.abs().max()):.3g}): the triton backend rotates fp16 tokens with "
                         f"fp16 bases; give orthonormal bases (entries <= 1), fp32 tokens, or backend='torch' "
                         f"or 'native'")
    return cast


def _padded_rows(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`src` [K, C] cast to `dtype` with rows padded for the kernels (:mod:`pyinf._padding`):
    an eigenbasis of a layer with a bias is 769 x 769 or 3073 x 3073."""
    if padded_width(src.shape[1]) == src.shape[1]:
        return src.to(dtype)
    return padded_empty(*src.shape, dtype=dtype, device=src.device).copy_(src)


_casts = _CastCache()


def release_caches() -> None:
    """Drops the cached casts and padded factors (see :func:`pyinf.ops.release_caches`)."""
    _casts.clear()


def _eigenbases(op, acts, grads, q_a, q_s):
    compute = _eig.compute_dtype_of(acts, grads)
    bases = []
    for name, q in (("q_a", q_a), ("q_s", q_s)):
        try:
            bases.append(_casts.get(q, compute))
        except ValueError as exc:  # _fp16_checked's: say which op and which argument
            raise ValueError(f"pyinf.ops.{op}: '{name}' cannot run on the triton backend: {exc}") from None
    return bases


def eigen_correction(acts, grads, q_a, q_s, *, mask=None) -> torch.Tensor:
    acts, grads, mask = _int32_rows(acts), _int32_rows(grads), _int32_rows(mask)
    with _cuda_context(acts):
        q_a, q_s = _eigenbases("eigen_correction", acts, grads, q_a, q_s)
        return _eig.eigen_correction(acts, grads, q_a, q_s, mask)


def self_influence(acts, grads, q_a, q_s, lambdas, damping, *, mask=None) -> torch.Tensor:
    acts, grads, mask = _int32_rows(acts), _int32_rows(grads), _int32_rows(mask)
    with _cuda_context(acts):
        q_a, q_s = _eigenbases("self_influence", acts, grads, q_a, q_s)
        return _si.self_influence(acts, grads, q_a, q_s, lambdas, float(damping), mask)


def _rank_padded(problems: Sequence[dict]) -> List[dict]:
    """The problems of one launch with their query factors' rank padded as the kernel pads
    it (:func:`triton_kernels.factored_scores.padded_ranks`), from the cache: a scoring pass
    hands every batch the same factor tensors, so a rank that is not a power of two (or a
    rank above the kernel's largest, in slices) is padded once per pass, not once per layer
    per batch (for Llama-7B ``up_proj`` at Q=80 and rank 48, ~0.3 GB copied each time)."""
    ranks = _fs.padded_ranks([p["left"].shape[2] for p in problems])
    out = []
    for p, rp in zip(problems, ranks):
        r = p["left"].shape[2]
        if r != rp:
            pad = lambda t, rp=rp, r=r: torch.nn.functional.pad(t, (0, rp - r))  # noqa: E731
            p = dict(p, left=_casts.derived(p["left"], ("rank", rp), pad),
                     right=_casts.derived(p["right"], ("rank", rp), pad))
        out.append(p)
    return out


def factored_scores(acts, grads, left, right, *, mask=None, per_token=False) -> torch.Tensor:
    (p,) = _rank_padded([dict(acts=acts, grads=grads, left=left, right=right, mask=mask)])
    with _cuda_context(acts):
        return _fs.factored_scores(acts, grads, p["left"], p["right"], mask=mask, per_token=per_token)


def dense_scores(acts, grads, dense, *, mask=None, per_token=False) -> torch.Tensor:
    acts, grads, dense, mask = _int32_rows(acts), _int32_rows(grads), _int32_rows(dense), _int32_rows(mask)
    with _cuda_context(acts):
        return _dense.dense_scores(acts, grads, dense, mask=mask, per_token=per_token)


def factored_scores_grouped(problems, *, per_token=False) -> List[torch.Tensor]:
    """One launch per distinct (acts, grads, left, right) dtype combination: the kernel
    reads every problem through typed pointers from one table, so a launch needs one
    dtype per role. Usually all layers share dtypes and this is a single launch."""
    groups = {}
    for i, p in enumerate(problems):
        key = tuple(p[k].dtype for k in ("acts", "grads", "left", "right"))
        groups.setdefault(key, []).append(i)
    results: List[Optional[torch.Tensor]] = [None] * len(problems)
    with _cuda_context(problems[0]["acts"]):
        for members in groups.values():
            outs = _fs.factored_scores_grouped(_rank_padded([problems[i] for i in members]), per_token=per_token)
            for i, out in zip(members, outs):
                results[i] = out
    return results


def cross_entropy_rows(logits, labels, *, sample=False) -> torch.Tensor:
    with _cuda_context(logits):
        loss = _ce.cross_entropy_rows(logits, labels, sample=sample)
    # the kernel's store bypasses autograd's version counter: move it, as an in-place op does
    # (the version-keyed caches, and autograd's checks of saved tensors, rely on it)
    torch.autograd.graph.increment_version(logits)
    return loss
