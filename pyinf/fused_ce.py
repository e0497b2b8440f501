"""Cross-entropy of a linear output layer without materialising the ``[tokens, vocab]``
logits in fp32 (the approach of Liger-Kernel's fused linear cross-entropy).

The loss and its gradient with respect to the hidden states are computed together in the
forward, a chunk of token rows at a time (the logits GEMM, then
:func:`pyinf.ops.cross_entropy_rows` turns the logits into their gradient in place, one
fused pass on a GPU, then the gradient GEMM); the backward only scales the stored
gradient, row by row, so a per-row loss (``reduction="none"``) costs nothing extra.
Only rows that carry a label are computed at all, so prompts and padding cost nothing. The
output layer's weight gets no gradient (influence needs none).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import torch

from . import ops

# The backend of the softmax step when a caller names none: an engine's passes set theirs
# (InfluenceEngine(backend="torch") runs its fused head on PyTorch too), else "auto". Read
# where the head runs, so that a backend that is not there fails only if it is needed.
_PASS_BACKEND = contextvars.ContextVar("pyinf_fused_head_backend", default="auto")


@contextlib.contextmanager
def backend_of_pass(backend: str):
    """Inside, ``linear_cross_entropy(backend=None)`` runs its softmax step on `backend`."""
    token = _PASS_BACKEND.set(backend)
    try:
        yield
    finally:
        _PASS_BACKEND.reset(token)

# Rows per chunk are chosen so one chunk's logits stay near this many elements (128 MiB in
# bf16; the PyTorch reference of cross_entropy_rows adds fp32 copies of the chunk).
_CHUNK_ELEMENTS = 1 << 26


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, sample: bool, backend: str):
        rows = (labels != -100).nonzero().squeeze(1)
        grad_hidden = torch.zeros_like(hidden)
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        row_loss = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)
        chunk = max(1, _CHUNK_ELEMENTS // weight.shape[0])
        for start in range(0, rows.numel(), chunk):
            idx = rows[start:start + chunk]
            h = hidden.index_select(0, idx)
            logits = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
            # loss per row; `logits` becomes d loss / d logits in place (a fused kernel on a GPU)
            row_loss.index_copy_(0, idx, ops.cross_entropy_rows(logits, labels.index_select(0, idx),
                                                                sample=sample, backend=backend).to(acc))
            grad_hidden.index_copy_(0, idx, (logits @ weight).to(hidden.dtype))
        ctx.save_for_backward(grad_hidden)
        return row_loss

    @staticmethod
    def backward(ctx, grad_rows):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_rows.to(grad_hidden.dtype)[:, None], None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, *, sample: bool = False,
                         reduction: str = "sum", backend: Optional[str] = None) -> torch.Tensor:
    """Cross-entropy of ``hidden [N, d] @ weight[V, d]^T (+ bias)`` against ``labels [N]``
    (-100 ignored): summed (``reduction="sum"``) or per row (``"none"``: ``[N]``, zero on
    ignored rows), in fp32 (fp64 for fp64 inputs). ``sample=True`` replaces each label by a
    draw from the softmax. ``backend`` runs the softmax step (:func:`pyinf.ops.cross_entropy_rows`);
    None: the engine's, in its passes (:func:`backend_of_pass`), else ``"auto"``."""
    if backend is None:  # the engine's, unless it lacks the op (native): then auto's choice
        backend = ops.backend_for("cross_entropy_rows", _PASS_BACKEND.get())
    if reduction not in ("sum", "none"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'sum' or 'none', got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden [N, d] and weight [V, d] expected, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: labels must be [N={hidden.shape[0]}], got {tuple(labels.shape)}")
    rows = _LinearCrossEntropy.apply(hidden, weight.detach(), None if bias is None else bias.detach(), labels, sample,
                                      backend)
    return rows.sum() if reduction == "sum" else rows
