"""Pairwise influence ``I(n, q) = <P_q, DW_n>`` and self-influence ``<H^-1 DW_n, DW_n>`` over
a training set, streamed: each layer's contribution is computed in its backward and the
layer's activations and gradients are let go at once (DESIGN.md section 1, steps 7-8)."""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

from . import ops
from .factors import Factors
from .queries import Queries
from .runner import run_pass


def prefer_dense(t: int, d_in: int, d_out: int, q: int, r: int) -> bool:
    """DESIGN.md section 2's cost model: materialising DW_n and dotting with dense P costs
    ``2T d_in d_out + 2 d_in d_out Q`` per document, the factored form ``2T (d_in + d_out) Q r``."""
    return t * d_in * d_out + d_in * d_out * q < t * (d_in + d_out) * q * r


def display_token_scores(tok_scores: torch.Tensor, n_tokens: int) -> np.ndarray:
    """Per-token influence aligned to the tokens of a causal LM's document: the activations
    and gradients at position ``t`` serve the prediction of token ``t + 1``, so entry ``i`` is
    the score of the position that predicts token ``i`` (the first token, never predicted,
    gets 0)."""
    out = np.zeros(n_tokens, dtype=np.float64)
    out[1:] = tok_scores[: n_tokens - 1].double().numpy()
    return out


def top_positive(values: np.ndarray, k: int) -> List[int]:
    """Positions of the ``k`` largest values, largest first (ties in position order), keeping
    only those above 0: a document's most influential tokens."""
    return [int(i) for i in np.argsort(-values, kind="stable")[:k] if values[i] > 0]


def _pad_tokens(chunks: List[torch.Tensor], t_max: int) -> torch.Tensor:
    """Concatenates per-batch ``[B, T_b, Q]`` results into ``[N, t_max, Q]``, zero-padded."""
    padded = [torch.nn.functional.pad(c, (0, 0, 0, t_max - c.shape[1])) for c in chunks]
    return torch.cat(padded)


def _leading_padding(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """Each row's count of padding positions before its first real token (``mask`` [B, T]), on
    the host; None when no row has any (right padding)."""
    mask = mask.to(device="cpu", dtype=torch.bool)
    lead = torch.where(mask.any(1), mask.int().argmax(1), 0)
    return lead if bool(lead.any()) else None


def _from_first_token(scores: torch.Tensor, lead: torch.Tensor) -> torch.Tensor:
    """Per-token scores ``[B, T, Q]`` (on the host) of a left-padded batch moved so that each
    document's first real token is at position 0, as it is with right padding: position ``t``
    is then the document's own ``t``-th token in every batch. ``lead``: :func:`_leading_padding`."""
    t = scores.shape[1]
    idx = torch.arange(t)[None, :] + lead[:, None]
    moved = scores.gather(1, idx.clamp(max=t - 1)[..., None].expand(-1, -1, scores.shape[2]))
    return torch.where((idx < t)[..., None], moved, torch.zeros((), dtype=moved.dtype))  # Inf * 0 would be NaN


class _BatchScores:
    """Per-batch accumulator of total and per-module scores, moved to CPU at batch end."""

    def __init__(self, names, per_module: bool):
        self.names = list(names)
        self.per_module = per_module
        self.total: Optional[torch.Tensor] = None
        self.modules: Dict[str, torch.Tensor] = {}
        self.done_total: List[torch.Tensor] = []
        self.done_modules: Dict[str, List[torch.Tensor]] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.float()
        self.total = value.clone() if self.total is None else self.total.add_(value)
        if self.per_module:
            self.modules[name] = value

    def finish_batch(self, n_docs: int, shape_tail, token_mask: Optional[torch.Tensor] = None) -> None:
        """``token_mask``: the batch's [B, T] mask, for per-token scores (see _from_first_token)."""
        if self.total is None:  # no tracked layer received a gradient (the loss ignored them)
            self.total = torch.zeros((n_docs,) + tuple(shape_tail))
        lead = None if token_mask is None else _leading_padding(token_mask)  # once for every module
        values = [self.total]
        if self.per_module:  # a layer the batch's loss never reached scores zero
            values += [self.modules[n] if n in self.modules else torch.zeros_like(self.total) for n in self.names]
        # one device-to-host read (a wait for the GPU) for the batch, not one per layer
        host = torch.stack([v.to(self.total.device) for v in values]).cpu() if len(values) > 1 else self.total.cpu()
        host = [host] if len(values) == 1 else list(host.unbind(0))
        if lead is not None:
            host = [_from_first_token(h, lead) for h in host]
        self.done_total.append(host[0])
        for name, value in zip(self.names if self.per_module else (), host[1:]):
            self.done_modules.setdefault(name, []).append(value)
        self.total, self.modules = None, {}


def fp16_scaled(tensors: List[torch.Tensor]):
    """Query tensors (each [Q, ...], fp32) in fp16 for fp16 activations, each query's slice
    divided by its largest magnitude, and the per-query product of those divisors [Q].

    A query's scores are linear in each of its tensors (left and right factors, or the dense
    matrix), so scores of the scaled tensors times that product are the scores. Without the
    scaling, a preconditioned gradient (divided by Lambda + damping: large where the Fisher
    is small) can pass fp16's 65504, or lose its small entries below 6e-8, when cast."""
    out, scale = [], None
    for t in tensors:
        amax = t.abs().flatten(1).amax(1).float() if t.numel() else torch.ones(t.shape[0], device=t.device)
        amax = torch.where(amax > 0, amax, torch.ones_like(amax))  # an all-zero query stays zero
        out.append((t / amax.view(-1, *[1] * (t.dim() - 1)).to(t.dtype)).to(torch.float16).contiguous())
        scale = amax if scale is None else scale * amax
    return out, scale


def pairwise_scores(model, task, modules, specs, loader, queries: Queries, *, per_token: bool,
                    per_module: bool, backend: str, route: str, group_modules: bool, progress):
    queries.check_model(specs)
    if route not in ("factored", "auto", "dense"):
        raise ValueError(f"route must be 'factored', 'auto' or 'dense', got {route!r}")
    device = next(model.parameters()).device
    q = queries.n_queries
    acc = _BatchScores(modules, per_module)
    cache: Dict[tuple, tuple] = {}  # query tensors on the device, in the activations' dtype, and their scales
    token_counts: List[int] = []
    pending: List[tuple] = []  # (name, problem, scale) held until the batch's backward ends, when grouping

    def query_tensors(name: str, fields, dtype: torch.dtype):
        """The module's query tensors (`fields`: ("left", "right") or ("dense",)) in `dtype`,
        and the per-query factor their scores must be multiplied by (None: 1)."""
        key = (name, fields, dtype)
        if key not in cache:
            srcs = [queries.dense_matrix(name) if f == "dense" else queries.tensors[name][f] for f in fields]
            srcs = [src.to(device=device) for src in srcs]
            cache[key] = fp16_scaled(srcs) if dtype == torch.float16 else (
                [src.to(dtype).contiguous() for src in srcs], None)
        return cache[key]

    def scaled(value, scale):
        return value if scale is None else value * scale.to(value.dtype)

    dense_backend = ops.backend_for("dense_scores", backend)  # the full-rank route (native has none)

    set_by: List[str] = []  # the layer that set the batch's token count, where no mask did

    def consume(spec, acts, grads, mask):
        t = acts.shape[1]
        if per_token and token_counts[-1] is None:
            token_counts[-1] = t  # no mask: the first layer sets the batch's token count
            set_by[:] = [spec.name]
        if per_token and t != token_counts[-1]:
            by = f"module {set_by[0]!r}" if set_by else "the batch's mask"
            raise ValueError(f"per-token scores need every tracked layer to run per token; module {spec.name!r} "
                             f"has {t} rows per document (tokens, or a convolution's output positions), {by} "
                             f"has {token_counts[-1]}: layers see sequences of other lengths (a pooled head, an encoder-decoder's "
                             f"encoder and decoder, a convolution, a layer called several times per forward, whose "
                             f"calls' tokens are joined): track the layers of one sequence, or score without "
                             f"per_token")
        dtype = acts.dtype
        dense = queries.is_dense(spec.name) or route == "dense" or (
            route == "auto" and prefer_dense(t, spec.d_in, spec.d_out, q, queries.rank))
        if dense:
            (p,), scale = query_tensors(spec.name, ("dense",), dtype)
            value = ops.dense_scores(acts, grads, p, mask=mask, per_token=per_token, backend=dense_backend)
        else:
            (left, right), scale = query_tensors(spec.name, ("left", "right"), dtype)
            if group_modules:
                pending.append((spec.name, dict(acts=acts, grads=grads, left=left, right=right, mask=mask), scale))
                return
            value = ops.factored_scores(acts, grads, left, right, mask=mask, per_token=per_token, backend=backend)
        acc.add(spec.name, scaled(value, scale))

    def on_start(batch_index, first, n_docs, mask):
        if per_token:
            token_counts.append(mask.shape[1] if mask is not None else None)
            set_by.clear()

    def on_end(batch_index, first, n_docs, mask):
        if pending:  # every layer of the batch in one grouped launch
            values = ops.factored_scores_grouped([p for _, p, _ in pending], per_token=per_token, backend=backend)
            for (name, _, scale), value in zip(pending, values):
                acc.add(name, scaled(value, scale))
            pending.clear()
        # per token: left-padded rows moved to start at their first real token
        aligned = per_token and mask is not None and tuple(mask.shape) == (n_docs, token_counts[-1])
        acc.finish_batch(n_docs, ((token_counts[-1] or 1,) if per_token else ()) + (q,),
                         token_mask=mask if aligned else None)

    run_pass(model, task, modules, specs, loader, objective=lambda b, m: task.compute_train_loss(b, m, sample=False),
             consumer=consume, desc="pyinf: pairwise scores", on_batch_start=on_start, on_batch_end=on_end,
             progress=progress)

    def assemble(chunks):
        if per_token:
            return _pad_tokens(chunks, max(c.shape[1] for c in chunks))
        return torch.cat(chunks)

    total = assemble(acc.done_total)
    if per_module:
        return {name: assemble(chunks) for name, chunks in acc.done_modules.items()}
    return total


def self_influence(model, task, modules, specs, loader, factors: Factors, *, damping: Optional[float],
                   backend: str, progress, per_module: bool = False):
    factors.check_model(specs)
    device = next(model.parameters()).device
    # the tracked layers' only; on the host if they would crowd the GPU (then copied per call)
    on_device = factors.subset(specs).preconditioners_on(device, what="self_influence").modules
    damping_by_module = {n: factors[n].damping(damping) for n in modules}
    acc = _BatchScores(modules, per_module=per_module)

    def consume(spec, acts, grads, mask):
        f = on_device[spec.name]
        q_a, q_s, lambdas = (t.to(acts.device, non_blocking=True) for t in (f.q_a, f.q_s, f.lambdas))
        acc.add(spec.name, ops.self_influence(acts, grads, q_a, q_s, lambdas, damping_by_module[spec.name],
                                              mask=mask, backend=backend))

    run_pass(model, task, modules, specs, loader, objective=lambda b, m: task.compute_train_loss(b, m, sample=False),
             consumer=consume, desc="pyinf: self-influence",
             on_batch_end=lambda i, first, n, mask: acc.finish_batch(n, ()), progress=progress)
    if per_module:
        return {name: torch.cat(chunks) for name, chunks in acc.done_modules.items()}
    return torch.cat(acc.done_total)
