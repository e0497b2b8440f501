"""Cross-entropy of a linear output layer without materialising the ``[tokens, vocab]``
logits in fp32 (the approach of Liger-Kernel's fused linear cross-entropy).

The loss and its gradient with respect to the hidden states are computed together in the
forward, a chunk of token rows at a time; the backward only scales the stored gradient
(row by row, so a per-row loss, ``reduction="none"``, costs nothing extra).
Only rows that carry a label are computed at all, so prompts and padding cost nothing. The
output layer's weight gets no gradient (influence needs none).
"""
from __future__ import annotations

from typing import Optional

import torch

# Rows per chunk are chosen so one chunk's fp32 logits stay near this many elements (256 MiB).
_CHUNK_ELEMENTS = 1 << 26


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, sample: bool):
        rows = (labels != -100).nonzero().squeeze(1)
        grad_hidden = torch.zeros_like(hidden)
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        row_loss = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)
        chunk = max(1, _CHUNK_ELEMENTS // weight.shape[0])
        for start in range(0, rows.numel(), chunk):
            idx = rows[start:start + chunk]
            h = hidden.index_select(0, idx)
            logits = h @ weight.T
            if bias is not None:
                logits = logits + bias
            logits = logits.to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            target = labels.index_select(0, idx)
            probs = torch.exp(logits - lse[:, None])
            if sample:  # true Fisher: labels drawn from the model's own predictive distribution
                target = torch.multinomial(probs, 1).squeeze(1)
            row_loss.index_copy_(0, idx, lse - logits.gather(1, target[:, None]).squeeze(1))
            probs[torch.arange(idx.numel(), device=idx.device), target] -= 1.0  # d loss / d logits
            grad_hidden.index_copy_(0, idx, (probs.to(weight.dtype) @ weight).to(hidden.dtype))
        ctx.save_for_backward(grad_hidden)
        return row_loss

    @staticmethod
    def backward(ctx, grad_rows):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_rows.to(grad_hidden.dtype)[:, None], None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, *, sample: bool = False,
                         reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of ``hidden [N, d] @ weight[V, d]^T (+ bias)`` against ``labels [N]``
    (-100 ignored): summed (``reduction="sum"``) or per row (``"none"``: ``[N]``, zero on
    ignored rows), in fp32 (fp64 for fp64 inputs). ``sample=True`` replaces each label by a
    draw from the softmax."""
    if reduction not in ("sum", "none"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'sum' or 'none', got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden [N, d] and weight [V, d] expected, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: labels must be [N={hidden.shape[0]}], got {tuple(labels.shape)}")
    rows = _LinearCrossEntropy.apply(hidden, weight.detach(), None if bias is None else bias.detach(), labels, sample)
    return rows.sum() if reduction == "sum" else rows
