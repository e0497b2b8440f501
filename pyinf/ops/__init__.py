"""The kernel contract of pyinf: one function per hot op, backend-agnostic.

``backend="auto"`` picks a fused backend for CUDA tensors (measured preferences first,
then Triton, then the PyTorch reference; native only where it measured fastest) and the
PyTorch reference elsewhere; ``"torch"``, ``"triton"``
and ``"native"`` force one, and raise :class:`BackendUnavailable` when it cannot run the
call. Inputs may be fp32, bf16 or fp16 (fp64 runs on the reference only); accumulation is
fp32, and every result is fp32 (fp64 for fp64 inputs).

Shapes: acts ``[N, T, d_in]``, grads ``[N, T, d_out]``, mask ``[N, T]`` (bool or 0/1),
q_a ``[d_in, d_in]``, q_s ``[d_out, d_out]``, lambdas ``[d_out, d_in]``,
left ``[Q, d_out, r]``, right ``[Q, d_in, r]``, dense ``[Q, d_out, d_in]``.
:func:`cross_entropy_rows` (the softmax step of the fused linear cross-entropy) takes
logits ``[R, V]`` and int64 labels ``[R]``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Sequence

import torch

from . import _checks, _preferences, _registry
from ._registry import BACKENDS, BackendUnavailable, available_backends

__all__ = [
    "covariance",
    "eigen_correction",
    "self_influence",
    "factored_scores",
    "dense_scores",
    "factored_scores_grouped",
    "cross_entropy_rows",
    "resolve_backend",
    "available_backends",
    "backend_for",
    "release_caches",
    "BackendUnavailable",
    "BACKENDS",
]


def _check_backend_name(backend: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown pyinf backend {backend!r}; choose 'auto' or one of {', '.join(BACKENDS)}")


def _needs_autograd(tensors: Sequence[Optional[torch.Tensor]]) -> bool:
    """Whether the result must carry a gradient: only the PyTorch reference builds one (the
    fused kernels are for the no-grad passes, where their inputs are detached)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def resolve_backend(op: str, backend: str, tensors, shape=None) -> str:
    """The backend name that will run `op` on `tensors` (a sequence, or a dict of them by
    argument name, which a refusal then names) when asked for `backend`."""
    _check_backend_name(backend)
    named = dict(tensors) if isinstance(tensors, Mapping) else None
    tensors = list(named.values()) if named is not None else list(tensors)
    if backend != "auto":
        reason = _registry.unsupported_reason(backend, op, tensors)
        if reason is None and backend != "torch" and _needs_autograd(tensors):
            reason = ("an input requires a gradient and this backend computes none; detach the inputs or call "
                      "under torch.no_grad(), or use backend='torch'")
        if reason is not None:
            culprits = [] if named is None else [
                name for name, t in named.items() if t is not None and (
                    _registry.unsupported_reason(backend, op, [t]) is not None
                    or (backend != "torch" and _needs_autograd([t])))]
            which = f" ('{', '.join(culprits)}')" if 0 < len(culprits) < len(named) else ""
            raise BackendUnavailable(f"pyinf.ops.{op}: backend {backend!r} cannot run this call{which}: {reason}")
        return backend
    first = next((t for t in tensors if t is not None), None)
    if first is None:
        raise ValueError(f"pyinf.ops.resolve_backend: no tensor given for {op!r} to run on")
    if not hasattr(_registry.load("torch"), op):  # every op has a reference: an unknown name is a typo
        raise ValueError(f"pyinf.ops.resolve_backend: unknown op {op!r}")
    if first.device.type != "cuda" or any(t is not None and t.dtype == torch.float64 for t in tensors) \
            or _needs_autograd(tensors):
        return "torch"
    candidates = list(_registry.CUDA_ORDER)
    measured = _preferences.preferred(op, shape or {})
    if measured is not None:
        candidates.insert(0, measured)
    for name in candidates:
        if _registry.unsupported_reason(name, op, tensors) is None:
            return name
    return "torch"


def release_caches() -> None:
    """Frees what the fused backends keep between calls for the tensors they were given: the
    Triton backend's eigenbases cast to 16 bits, the native backend's packed query factors.
    Each lives as long as its source tensor, and factors or queries usually outlive a pass
    (a bf16 copy of every eigenbasis stayed on the GPU after a fit: half as much again as the
    fp32 bases). Every pass over data ends with this; the next pass casts or packs again."""
    for module in list(_registry.loaded_modules()):
        release = getattr(module, "release_caches", None)
        if release is not None:
            release()


def backend_for(op: str, backend: str) -> str:
    """`backend`, or "auto" when it has no implementation of `op` at all (native has no
    ``dense_scores`` nor ``cross_entropy_rows``): what an engine whose backend is `backend`
    runs `op` on. Whether it can run a given call is :func:`resolve_backend`'s question. A
    backend that does not load raises BackendUnavailable (asked for by name, it must say so)."""
    _check_backend_name(backend)
    return backend if backend == "auto" or hasattr(_registry.load(backend), op) else "auto"


def _run(op: str, backend: str, tensors, shape, *args, **kwargs):
    name = resolve_backend(op, backend, tensors, shape)
    return getattr(_registry.load(name), op)(*args, **kwargs)


def covariance(x: torch.Tensor, *, mask: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """``[d, d]``: sum over unmasked token rows of ``x x^T``; x is ``[N, T, d]``."""
    _checks.check_tensor("x", x, 3, op="covariance")
    mask = _checks.check_mask("covariance", mask, x.shape[0], x.shape[1])
    _checks.check_same_device("covariance", x=x, mask=mask)
    shape = dict(n=x.shape[0], t=x.shape[1], d=x.shape[2])
    return _run("covariance", backend, dict(x=x), shape, x, mask=mask)


def eigen_correction(acts, grads, q_a, q_s, *, mask=None, backend: str = "auto") -> torch.Tensor:
    """``[d_out, d_in]``: ``sum_n (Q_S^T DW_n Q_A)^2`` with ``DW_n = sum_t mask g a^T``."""
    op = "eigen_correction"
    _checks.check_tokens(op, acts, grads)
    _checks.check_eigenbases(op, acts, grads, q_a, q_s)
    mask = _checks.check_mask(op, mask, acts.shape[0], acts.shape[1])
    _checks.check_same_device(op, acts=acts, grads=grads, q_a=q_a, q_s=q_s, mask=mask)
    shape = dict(n=acts.shape[0], t=acts.shape[1], d_in=acts.shape[2], d_out=grads.shape[2])
    return _run(op, backend, dict(acts=acts, grads=grads, q_a=q_a, q_s=q_s), shape, acts, grads, q_a, q_s, mask=mask)


def self_influence(acts, grads, q_a, q_s, lambdas, damping, *, mask=None, backend: str = "auto") -> torch.Tensor:
    """``[N]``: ``sum_ij (Q_S^T DW_n Q_A)[i,j]^2 / (lambdas[i,j] + damping)``."""
    op = "self_influence"
    _checks.check_tokens(op, acts, grads)
    _checks.check_eigenbases(op, acts, grads, q_a, q_s)
    damping = _checks.check_lambdas(op, lambdas, damping, grads.shape[-1], acts.shape[-1])
    mask = _checks.check_mask(op, mask, acts.shape[0], acts.shape[1])
    _checks.check_same_device(op, acts=acts, grads=grads, q_a=q_a, q_s=q_s, lambdas=lambdas, mask=mask)
    shape = dict(n=acts.shape[0], t=acts.shape[1], d_in=acts.shape[2], d_out=grads.shape[2])
    tensors = dict(acts=acts, grads=grads, q_a=q_a, q_s=q_s, lambdas=lambdas)
    return _run(op, backend, tensors, shape, acts, grads, q_a, q_s, lambdas, damping, mask=mask)


def factored_scores(acts, grads, left, right, *, mask=None, per_token: bool = False, backend: str = "auto"):
    """``[N, Q]`` (``[N, T, Q]`` when per_token):
    ``sum_t mask[n,t] sum_k (grads[n,t] . left[q,:,k]) (acts[n,t] . right[q,:,k])``."""
    op = "factored_scores"
    _checks.check_tokens(op, acts, grads)
    _checks.check_query_factors(op, acts, grads, left, right)
    mask = _checks.check_mask(op, mask, acts.shape[0], acts.shape[1])
    _checks.check_same_device(op, acts=acts, grads=grads, left=left, right=right, mask=mask)
    per_token = _checks.check_flag(f"pyinf.ops.{op}", "per_token", per_token)
    shape = dict(n=acts.shape[0], t=acts.shape[1], d_in=acts.shape[2], d_out=grads.shape[2],
                 q=left.shape[0], r=left.shape[2], per_token=int(per_token))
    return _run(op, backend, dict(acts=acts, grads=grads, left=left, right=right), shape, acts, grads, left, right,
                mask=mask, per_token=per_token)


def dense_scores(acts, grads, dense, *, mask=None, per_token: bool = False, backend: str = "auto"):
    """``[N, Q]`` (``[N, T, Q]``): ``<P_q, DW_n>`` against full-rank query matrices
    ``dense [Q, d_out, d_in]``; the route for ``rank=None`` and for layers where the
    factored form costs more (see :func:`pyinf.scoring.prefer_dense`)."""
    op = "dense_scores"
    _checks.check_tokens(op, acts, grads)
    _checks.check_dense_queries(op, acts, grads, dense)
    mask = _checks.check_mask(op, mask, acts.shape[0], acts.shape[1])
    _checks.check_same_device(op, acts=acts, grads=grads, dense=dense, mask=mask)
    per_token = _checks.check_flag(f"pyinf.ops.{op}", "per_token", per_token)
    shape = dict(n=acts.shape[0], t=acts.shape[1], d_in=acts.shape[2], d_out=grads.shape[2], q=dense.shape[0])
    return _run(op, backend, dict(acts=acts, grads=grads, dense=dense), shape, acts, grads, dense, mask=mask,
                per_token=per_token)


def factored_scores_grouped(problems, *, per_token: bool = False, backend: str = "auto"):
    """Several layers' factored scores in one call: ``problems`` is a sequence of dicts
    with keys ``acts, grads, left, right`` and optionally ``mask`` (same meaning as
    :func:`factored_scores`; sizes may differ between problems, N and Q may not). Returns the
    list of per-problem results. A fused backend scores all of them in one launch, so small
    layers (GPT-2 sized) do not pay one launch each."""
    op = "factored_scores_grouped"
    _check_backend_name(backend)
    if not isinstance(problems, (list, tuple)):
        raise TypeError(f"pyinf.ops.{op}: 'problems' must be a list or tuple of dicts, got {type(problems).__name__}")
    per_token = _checks.check_flag(f"pyinf.ops.{op}", "per_token", per_token)
    if len(problems) == 0:
        return []
    checked = []
    for i, p in enumerate(problems):
        if not isinstance(p, Mapping):
            raise TypeError(f"pyinf.ops.{op}: problem {i} must be a dict with keys acts, grads, left, right (and "
                            f"optionally mask), got {type(p).__name__}")
        try:
            acts, grads, left, right = p["acts"], p["grads"], p["left"], p["right"]
        except KeyError as exc:
            raise ValueError(f"pyinf.ops.{op}: problem {i} lacks key {exc}") from None
        unknown = sorted(set(p) - {"acts", "grads", "left", "right", "mask"})
        if unknown:  # a misspelled 'mask' would score the padding silently
            raise ValueError(f"pyinf.ops.{op}: problem {i} has unknown keys {unknown}; the keys are acts, grads, "
                             f"left, right and mask")
        _checks.check_tokens(f"{op}[{i}]", acts, grads)
        _checks.check_query_factors(f"{op}[{i}]", acts, grads, left, right)
        mask = _checks.check_mask(f"{op}[{i}]", p.get("mask"), acts.shape[0], acts.shape[1])
        _checks.check_same_device(f"{op}[{i}]", acts=acts, grads=grads, left=left, right=right, mask=mask)
        checked.append(dict(acts=acts, grads=grads, left=left, right=right, mask=mask))
    n, q = checked[0]["acts"].shape[0], checked[0]["left"].shape[0]
    for i, p in enumerate(checked):
        if p["acts"].shape[0] != n or p["left"].shape[0] != q:
            raise ValueError(f"pyinf.ops.{op}: all problems must share N={n} and Q={q}; problem {i} has "
                             f"N={p['acts'].shape[0]}, Q={p['left'].shape[0]}")
        if p["acts"].device != checked[0]["acts"].device:  # one launch reads them all
            raise ValueError(f"pyinf.ops.{op}: all problems must be on one device; problem 0 is on "
                             f"{checked[0]['acts'].device}, problem {i} on {p['acts'].device}")
    tensors = {f"problems[{i}].{k}": p[k] for i, p in enumerate(checked) for k in ("acts", "grads", "left", "right")}
    return _run(op, backend, tensors, dict(groups=len(checked), n=n, q=q), checked, per_token=per_token)


def cross_entropy_rows(logits: torch.Tensor, labels: Optional[torch.Tensor], *, sample: bool = False,
                       backend: str = "auto") -> torch.Tensor:
    """``[R]`` fp32 (fp64 for fp64 logits): ``logsumexp(logits[r]) - logits[r, y_r]``, and
    ``logits`` is overwritten **in place** by the gradient ``softmax(logits[r]) - onehot(y_r)``
    in its own dtype (the memory it takes is reused, no ``R x V`` temporary in the fused
    backends). ``sample=True`` draws each ``y_r`` from the row's softmax (the true Fisher;
    reproducible under ``torch.manual_seed``, with backend-specific streams) and ignores
    ``labels``. A label outside ``[0, V)`` gives a NaN loss and a plain softmax row."""
    op = "cross_entropy_rows"
    _checks.check_tensor("logits", logits, 2, op=op)
    if logits.shape[1] > 1 and logits.stride(-1) != 1:  # (one column: its stride is never used)
        raise ValueError(f"pyinf.ops.{op}: 'logits' must have unit stride along the vocabulary (it is written in "
                         f"place), got strides {logits.stride()}")
    if logits.shape[0] > 1 and logits.shape[1] > 0 and logits.stride(0) < logits.shape[1]:
        raise ValueError(f"pyinf.ops.{op}: the rows of 'logits' overlap in memory (shape {tuple(logits.shape)}, "
                         f"strides {logits.stride()}); it is written in place, so each row needs its own memory")
    if logits.shape[1] == 0:
        raise ValueError(f"pyinf.ops.{op}: 'logits' has an empty vocabulary (shape {tuple(logits.shape)})")
    if labels is None:
        if not sample:
            raise ValueError(f"pyinf.ops.{op}: 'labels' is required unless sample=True")
        labels = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or tuple(labels.shape) != logits.shape[:1]:
        what = f"shape {tuple(labels.shape)}, dtype {labels.dtype}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"pyinf.ops.{op}: 'labels' must be int64 of shape [R={logits.shape[0]}], got {what}")
    _checks.check_same_device(op, logits=logits, labels=labels)
    sample = _checks.check_flag(f"pyinf.ops.{op}", "sample", sample)
    shape = dict(r=logits.shape[0], v=logits.shape[1], sample=int(sample))
    return _run(op, backend, dict(logits=logits), shape, logits, labels, sample=sample)
