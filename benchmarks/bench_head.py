"""The language-model head: the loss of the output layer and its gradient with respect to
the final hidden states, which every pass of the pipeline runs once per batch.

Two measurements, each backend side by side in one run:

- ``cross_entropy_rows`` alone on one chunk of bf16 logits (the op that turns logits into
  their gradient in place): ms and effective GB/s over its ideal traffic (two reads and one
  write of the logits), against the measured device-to-device copy bandwidth;
- the whole head, forward and backward, for one batch of the end-to-end workload
  (Pythia-160M: hidden 768, vocabulary 50304, 32 x 512 tokens): plain autograd
  (``h @ W^T``, fp32 ``F.cross_entropy``), and pyinf's fused linear cross-entropy with the
  softmax step on each backend. Peak extra memory and the error against plain autograd.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

import pyinf.ops as ops
from pyinf import fused_ce
from pyinf.ops import _registry

from . import peak_extra_bytes, time_fn


@dataclass(frozen=True)
class HeadWorkload:
    name: str
    hidden: int
    vocab: int
    rows: int        # token rows of one batch (the whole head)
    chunk_rows: int  # rows of one chunk (the op alone): what fused_ce gives the op at this vocabulary


def head_workload(preset: str) -> HeadWorkload:
    if preset == "full":
        return HeadWorkload("pythia-160m head, batch 32 x 512", 768, 50304, 32 * 512,
                            fused_ce._CHUNK_ELEMENTS // 50304)
    return HeadWorkload("tiny head", 16, 97, 64, 24)


def _timing(device):
    if device.type == "cuda":
        return dict(warmup=3, min_reps=10, max_reps=100, target_s=0.5)
    return dict(warmup=1, min_reps=2, max_reps=5, target_s=0.02)


def copy_bandwidth(device, nbytes: int) -> float:
    """GB/s of a device-to-device copy of `nbytes` (read + write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device, **_timing(device))["ms"]
    return 2 * nbytes / (ms * 1e-3) / 1e9


def run_head(preset: str, device: torch.device, *, backends=("torch", "triton"), log=print) -> Dict[str, object]:
    w = head_workload(preset)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    records, skipped = [], []

    # -- the op alone, on one chunk ------------------------------------------------------
    logits = torch.randn(w.chunk_rows, w.vocab, generator=g, device=device, dtype=dtype).mul_(3)
    labels = torch.randint(0, w.vocab, (w.chunk_rows,), generator=g, device=device)
    ideal_bytes = 3 * logits.numel() * logits.element_size()
    bandwidth = copy_bandwidth(device, logits.numel() * logits.element_size())
    work = logits.clone()
    ref_loss = None
    for backend in backends:
        reason = _registry.unsupported_reason(backend, "cross_entropy_rows", [logits])
        if reason is not None:
            skipped.append(dict(what="cross_entropy_rows", backend=backend, reason=reason))
            continue
        work.copy_(logits)
        loss = ops.cross_entropy_rows(work, labels, backend=backend)
        ref_loss = loss if ref_loss is None else ref_loss
        err = ((loss.double() - ref_loss.double()).norm() / ref_loss.double().norm()).item()
        # in place: re-running on its own output still streams the same bytes
        t = time_fn(lambda: ops.cross_entropy_rows(work, labels, backend=backend), device, **_timing(device))
        gbps = ideal_bytes / (t["ms"] * 1e-3) / 1e9
        records.append(dict(what="cross_entropy_rows", backend=backend, ms=t["ms"], gbps=gbps,
                            pct_copy_bw=100 * gbps / bandwidth, loss_rel_err=err))
        log(f"[head] cross_entropy_rows {w.chunk_rows}x{w.vocab} {backend:<7} {t['ms']:8.3f} ms {gbps:7.1f} GB/s")
    del logits, work

    # -- the whole head, forward + backward ---------------------------------------------
    hidden = torch.randn(w.rows, w.hidden, generator=g, device=device, dtype=dtype)
    weight = torch.randn(w.vocab, w.hidden, generator=g, device=device, dtype=dtype).mul_(w.hidden ** -0.5)
    labels = torch.randint(0, w.vocab, (w.rows,), generator=g, device=device)

    def plain():
        h = hidden.detach().requires_grad_()
        loss = F.cross_entropy((h @ weight.T).float(), labels, reduction="sum")
        loss.backward()
        return loss.detach(), h.grad

    def fused(backend):
        def run():
            h = hidden.detach().requires_grad_()
            loss = fused_ce.linear_cross_entropy(h, weight, labels, backend=backend)
            loss.backward()
            return loss.detach(), h.grad
        return run

    ref = plain()
    variants = [("plain autograd", plain)]
    for backend in backends:
        if _registry.unsupported_reason(backend, "cross_entropy_rows", [hidden]) is None:
            variants.append((f"fused, {backend}", fused(backend)))
    base_ms: Optional[float] = None
    for name, fn in variants:
        loss, grad = fn()
        err = max(abs(loss.item() - ref[0].item()) / abs(ref[0].item()),
                  ((grad.float() - ref[1].float()).norm() / ref[1].float().norm()).item())
        t = time_fn(fn, device, **_timing(device))
        mem = peak_extra_bytes(fn, device)
        base_ms = t["ms"] if base_ms is None else base_ms
        records.append(dict(what="head fwd+bwd", backend=name, ms=t["ms"], speedup_vs_plain=base_ms / t["ms"],
                            peak_extra_mb=None if mem is None else mem / 2**20, rel_err_vs_plain=err))
        log(f"[head] fwd+bwd {w.rows}x{w.hidden}->{w.vocab} {name:<16} {t['ms']:8.3f} ms")
    return dict(workload=asdict(w), dtype=str(dtype).replace("torch.", ""), copy_gbps=bandwidth,
                records=records, skipped=skipped)
