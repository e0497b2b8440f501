"""Plain-PyTorch implementations of the pyinf ops: the oracle every backend is tested
against, and the backend that runs on CPU and on any device without a fused kernel.

All functions take already-validated inputs (see :mod:`pyinf.ops._checks`): acts
``[N, T, d_in]``, grads ``[N, T, d_out]``, an optional bool mask ``[N, T]``. They accumulate
in fp32 (fp64 when an input is fp64) and never build an ``N x d_out x d_in`` tensor for
more than a bounded chunk of documents at a time.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._checks import accum_dtype

# Upper bound on the elements of one temporary (per-document gradients, or rotated
# gradients) that a reference op builds at once: 2**26 fp32 values = 256 MiB.
_MAX_TEMP_ELEMENTS = 1 << 26


def _masked(x: torch.Tensor, mask: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype` with masked-out token rows set to zero (where, not multiply, so that
    NaN or Inf in padding never leaks into a result)."""
    x = x.to(dtype)
    if mask is not None:
        x = torch.where(mask.unsqueeze(-1), x, x.new_zeros(()))
    return x


def _doc_chunks(n: int, per_doc_elements: int):
    step = max(1, _MAX_TEMP_ELEMENTS // max(1, per_doc_elements))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def covariance(x: torch.Tensor, *, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    dtype = accum_dtype(x)
    d = x.shape[-1]
    out = torch.zeros(d, d, dtype=dtype, device=x.device)
    for sl in _doc_chunks(x.shape[0], x.shape[1] * d):
        xs = x[sl]
        xf = _masked(xs, None if mask is None else mask[sl], dtype).reshape(xs.shape[0] * xs.shape[1], d)
        out.addmm_(xf.T, xf)
    return out


def _rotated_doc_gradients(acts, grads, q_a, q_s, mask, dtype, sl):
    """(Q_S^T DW_n Q_A) for the documents in `sl`, in the cheaper order: rotate the tokens,
    then one outer product per document (T (d_in^2 + d_out^2) + T d_in d_out multiply-adds:
    a long document of wide layers), or form each document's gradient, then rotate it
    (T d_in d_out + d_in d_out (d_in + d_out): a convolution's many positions on a narrow
    layer, 4-10x less on a ResNet's early layers)."""
    m = None if mask is None else mask[sl]
    t, d_in, d_out = acts.shape[1], acts.shape[-1], grads.shape[-1]
    a, g = _masked(acts[sl], m, dtype), _masked(grads[sl], m, dtype)
    if t * (d_in * d_in + d_out * d_out) <= d_in * d_out * (d_in + d_out):
        return (g @ q_s.to(dtype)).transpose(1, 2) @ (a @ q_a.to(dtype))  # [n, d_out, d_in]
    return q_s.to(dtype).T @ (g.transpose(1, 2) @ a) @ q_a.to(dtype)


def eigen_correction(acts, grads, q_a, q_s, *, mask=None) -> torch.Tensor:
    dtype = accum_dtype(acts, grads, q_a, q_s)
    d_in, d_out = acts.shape[-1], grads.shape[-1]
    out = torch.zeros(d_out, d_in, dtype=dtype, device=acts.device)
    for sl in _doc_chunks(acts.shape[0], d_in * d_out):
        out += _rotated_doc_gradients(acts, grads, q_a, q_s, mask, dtype, sl).square().sum(0)
    return out


def self_influence(acts, grads, q_a, q_s, lambdas, damping, *, mask=None) -> torch.Tensor:
    dtype = accum_dtype(acts, grads, q_a, q_s, lambdas)
    d_in, d_out = acts.shape[-1], grads.shape[-1]
    inv = 1.0 / (lambdas.to(dtype) + damping)
    out = torch.empty(acts.shape[0], dtype=dtype, device=acts.device)
    for sl in _doc_chunks(acts.shape[0], d_in * d_out):
        rotated = _rotated_doc_gradients(acts, grads, q_a, q_s, mask, dtype, sl)
        out[sl] = (rotated.square() * inv).sum((1, 2))
    return out


def factored_scores(acts, grads, left, right, *, mask=None, per_token=False) -> torch.Tensor:
    dtype = accum_dtype(acts, grads, left, right)
    n, t, d_in = acts.shape
    d_out = grads.shape[-1]
    q, _, r = left.shape
    # [d, Q*r]: every query's factor side by side, so each side is one GEMM.
    left_cols = left.to(dtype).permute(1, 0, 2).reshape(d_out, q * r)
    right_cols = right.to(dtype).permute(1, 0, 2).reshape(d_in, q * r)
    out_shape = (n, t, q) if per_token else (n, q)
    out = torch.empty(out_shape, dtype=dtype, device=acts.device)
    for sl in _doc_chunks(n, t * q * r * 2):
        m = None if mask is None else mask[sl]
        g = _masked(grads[sl], m, dtype) @ left_cols  # [n, T, Q*r]
        a = _masked(acts[sl], m, dtype) @ right_cols
        per_tok = (g * a).view(g.shape[0], t, q, r).sum(-1)  # [n, T, Q]
        out[sl] = per_tok if per_token else per_tok.sum(1)
    return out


def dense_scores(acts, grads, dense, *, mask=None, per_token=False) -> torch.Tensor:
    """Scores against full-rank query matrices P [Q, d_out, d_in]: <P_q, DW_n>. Builds
    per-document gradients (bounded chunks), the cheaper route when T is long and the
    query rank high; per-token form: sum_t g_t^T P_q a_t."""
    dtype = accum_dtype(acts, grads, dense)
    n, t, d_in = acts.shape
    d_out = grads.shape[-1]
    q = dense.shape[0]
    p = dense.to(dtype)
    if per_token:
        out = torch.empty(n, t, q, dtype=dtype, device=acts.device)
        p_cols = p.permute(2, 0, 1).reshape(d_in, q * d_out)  # a_t -> (P_q a_t) for all q
        for sl in _doc_chunks(n, t * q * d_out):
            m = None if mask is None else mask[sl]
            pa = (_masked(acts[sl], m, dtype) @ p_cols).view(sl.stop - sl.start, t, q, d_out)
            out[sl] = (pa * _masked(grads[sl], m, dtype).unsqueeze(2)).sum(-1)
        return out
    out = torch.empty(n, q, dtype=dtype, device=acts.device)
    p_flat = p.reshape(q, d_out * d_in)
    for sl in _doc_chunks(n, d_in * d_out):
        m = None if mask is None else mask[sl]
        dw = _masked(grads[sl], m, dtype).transpose(1, 2) @ _masked(acts[sl], m, dtype)
        out[sl] = dw.reshape(dw.shape[0], -1) @ p_flat.T
    return out


def factored_scores_grouped(problems, *, per_token=False):
    return [factored_scores(p["acts"], p["grads"], p["left"], p["right"], mask=p["mask"], per_token=per_token)
            for p in problems]


def cross_entropy_rows(logits, labels, *, sample=False) -> torch.Tensor:
    """Softmax cross-entropy per row, the gradient written into ``logits`` in place. Same
    arithmetic as the fused kernels: the stored logits upcast to fp32 (fp64 stays fp64)."""
    dtype = accum_dtype(logits)
    rows, vocab = logits.shape
    x = logits.to(dtype)
    lse = torch.logsumexp(x, dim=-1)
    probs = torch.exp(x - lse[:, None])
    if sample:
        # a row with NaN or Inf has no distribution to draw from: it gets a NaN loss (an invalid
        # target), as in the fused kernels, and the pass stops on its non-finite loss
        finite = torch.isfinite(probs).all(1)
        drawable = torch.where(finite[:, None], probs, torch.ones_like(probs))
        target = torch.multinomial(drawable, 1).squeeze(1) if rows else labels
        target = torch.where(finite, target, torch.full_like(target, -1))
    else:
        target = labels
    valid = (target >= 0) & (target < vocab)
    safe = torch.where(valid, target, torch.zeros_like(target))
    loss = lse - x.gather(1, safe[:, None]).squeeze(1)
    loss = torch.where(valid, loss, torch.full_like(loss, float("nan")))
    probs[torch.arange(rows, device=logits.device), safe] -= valid.to(dtype)
    logits.copy_(probs)
    return loss
