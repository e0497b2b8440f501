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


def normalize(scores: torch.Tensor, how: str, *, queries: Optional[Queries] = None,
              train_self_influence: Optional[torch.Tensor] = None, eps: float = 1e-30) -> torch.Tensor:
    """``scores [n_train, n_query]`` (or ``[n_train, T, n_query]``) normalised as `how` says."""
    scores64 = scores.double()
    query_shape = (1,) * (scores.dim() - 1) + (-1,)
    train_shape = (-1,) + (1,) * (scores.dim() - 1)
    if how == "per_nat":
        _need(queries, "queries", how)
        out = scores64 / queries.measurements.clamp_min(eps).reshape(query_shape)
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
