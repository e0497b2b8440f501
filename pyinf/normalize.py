"""Normalisations of pairwise scores that users ask for (DESIGN.md section 1, step 9).

- ``per_nat``: divide by each query's measurement, for CausalLMTask the completion's
  ``-log p`` in nats (influence per nat of the query's loss).
- ``relative``: divide by each training document's ``sqrt(grad_n^T H^-1 grad_n)`` (its
  self-influence), so that documents with large gradients do not dominate by norm alone
  (RelatIF, Barshan et al. 2020).
- ``cosine``: divide by both documents' and queries' ``H^-1``-norms, giving the cosine of
  the angle between ``grad_q`` and ``grad_n`` in the ``H^-1`` inner product, in [-1, 1]
  (exactly so for full-rank queries).
"""
from __future__ import annotations

from typing import Optional

import torch

from .queries import Queries


def normalize(scores, how: str, *, queries: Optional[Queries] = None,
              train_self_influence: Optional[torch.Tensor] = None, eps: float = 1e-30):
    """``scores [n_train, n_query]`` (or ``[n_train, T, n_query]``, or a dict of those per
    module, as ``per_module=True`` gives) normalised as `how` says."""
    if isinstance(scores, dict):
        return {name: normalize(value, how, queries=queries, train_self_influence=train_self_influence, eps=eps)
                for name, value in scores.items()}
    if not isinstance(scores, torch.Tensor) or scores.dim() not in (2, 3):
        what = f"shape {tuple(scores.shape)}" if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"normalize: scores must be [n_train, n_query] or [n_train, T, n_query], got {what}")
    if queries is not None and queries.n_queries != scores.shape[-1]:
        raise ValueError(f"normalize: scores of shape {tuple(scores.shape)} hold {scores.shape[-1]} queries, the "
                         f"given Queries {queries.n_queries}")
    if train_self_influence is not None:
        train_self_influence = torch.as_tensor(train_self_influence)
        # NaN: a document that could not be computed alone (pyinf.corpus); its scores are NaN too
        if bool((train_self_influence < 0).any()) or bool(train_self_influence.isinf().any()):
            raise ValueError("normalize: train_self_influence must be finite (or NaN, for a document that could not "
                             "be computed) and >= 0 (grad^T H^-1 grad), got "
                             f"{train_self_influence.nan_to_num(nan=float('inf')).min().item()} at its smallest")
    if train_self_influence is not None and tuple(train_self_influence.shape) != (scores.shape[0],):
        raise ValueError(f"normalize: train_self_influence must be [n_train={scores.shape[0]}] for scores of shape "
                         f"{tuple(scores.shape)}, got shape {tuple(train_self_influence.shape)}")
    scores64 = scores.double()
    query_shape = (1,) * (scores.dim() - 1) + (-1,)
    train_shape = (-1,) + (1,) * (scores.dim() - 1)
    if how == "per_nat":
        _need(queries, "queries", how)
        measured = queries.measurements
        bad = (~(measured > 0)).nonzero().flatten().tolist()  # <= 0 or NaN
        if bad:
            raise ValueError(f"normalize: per_nat divides by each query's measurement, and queries {bad[:10]} have "
                             f"{[float(measured[i]) for i in bad[:10]]}: a measurement must be > 0 (for "
                             f"CausalLMTask, -log p of the completion: 0 when the model is certain of it)")
        out = scores64 / measured.reshape(query_shape)
    elif how == "relative":
        _need(train_self_influence, "train_self_influence", how)
        out = scores64 / train_self_influence.double().clamp_min(eps).sqrt().reshape(train_shape)
    elif how == "cosine":
        _need(queries, "queries", how)
        _need(train_self_influence, "train_self_influence", how)
        out = scores64 / train_self_influence.double().clamp_min(eps).sqrt().reshape(train_shape)
        out = out / queries.self_influence.clamp_min(eps).sqrt().reshape(query_shape)
    else:
        raise ValueError(f"unknown normalisation {how!r}; choose 'per_nat', 'relative' or 'cosine'")
    return out.to(scores.dtype)


def _need(value, name: str, how: str) -> None:
    if value is None:
        raise ValueError(f"normalisation {how!r} needs {name}")
