"""Train the demo's tiny GPT on the synthetic corpus: seeded, CPU, a few hundred steps.

The model has to memorise the facts (so a factual query's completion is something it
learnt from specific documents) and pick up the procedures' formats; both are checked by
:func:`evaluate`, which greedily completes every query.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from .corpus import Corpus
from .model import GPTConfig, TinyGPT


@dataclass
class TrainConfig:
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 30


FULL_TRAIN = TrainConfig()
QUICK_TRAIN = TrainConfig(steps=200, batch_size=32, lr=5e-3, warmup=15)


def pad_batch(seqs: List[List[int]], pad_id: int = 0) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def lm_loss(model: TinyGPT, ids: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Mean next-token cross-entropy over real (non-padding) targets."""
    logits = model(ids)
    targets = ids[:, 1:].masked_fill(ids[:, 1:] == pad_id, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10%: a short run still ends on a low LR."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model(corpus: Corpus, seed: int, quick: bool = False) -> TinyGPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=len(corpus.tokenizer), max_len=max(48, corpus.max_len))
    if quick:
        cfg = GPTConfig(vocab_size=cfg.vocab_size, max_len=cfg.max_len, d_model=48, n_layers=2, d_mlp=192)
    return TinyGPT(cfg)


def train(model: TinyGPT, corpus: Corpus, cfg: TrainConfig, seed: int = 0,
          log: Optional[Callable[[str], None]] = None) -> dict:
    """AdamW over shuffled epochs of the documents. Returns the loss curve and timing."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    docs = [d.ids for d in corpus.documents]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    model.train()
    order: List[int] = []
    losses = []
    start = time.perf_counter()
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:  # a new epoch, reshuffled
            order += torch.randperm(len(docs), generator=gen).tolist()
        batch, order = order[: cfg.batch_size], order[cfg.batch_size:]
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss = lm_loss(model, pad_batch([docs[i] for i in batch]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if log is not None and (step + 1) % max(1, cfg.steps // 5) == 0:
            log(f"  step {step + 1:4d}/{cfg.steps}  loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return {"steps": cfg.steps, "batch_size": cfg.batch_size, "seconds": time.perf_counter() - start,
            "final_loss": sum(losses[-20:]) / len(losses[-20:]), "losses": losses}


@torch.no_grad()
def greedy_complete(model: TinyGPT, prompt_ids: List[int], n_tokens: int) -> List[int]:
    ids = list(prompt_ids)
    for _ in range(n_tokens):
        logits = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


@torch.no_grad()
def evaluate(model: TinyGPT, corpus: Corpus) -> dict:
    """Greedy accuracy per query (the whole completion must match) and completion loss.

    A factual query counts as answered when the first completion token is the answer; a
    reasoning query when the whole worked solution comes out right.
    """
    model.eval()
    per_query = []
    for q in corpus.queries:
        out = greedy_complete(model, q.prompt_ids, len(q.completion_ids))
        n_check = 1 if q.kind == "factual" else len(q.completion_ids)
        correct = out[:n_check] == q.completion_ids[:n_check]
        ids = torch.tensor([q.prompt_ids + q.completion_ids])
        logits = model(ids)[0, len(q.prompt_ids) - 1: -1]
        nll = F.cross_entropy(logits, torch.tensor(q.completion_ids), reduction="sum").item()
        per_query.append({"correct": bool(correct), "completion_nll": nll,
                          "generated": corpus.tokenizer.decode(out).strip()})
    summary = {}
    for kind in ("factual", "reasoning"):
        rows = [r for r, q in zip(per_query, corpus.queries) if q.kind == kind]
        if rows:
            summary[f"{kind}_accuracy"] = sum(r["correct"] for r in rows) / len(rows)
            summary[f"{kind}_mean_completion_nll"] = sum(r["completion_nll"] for r in rows) / len(rows)
    return {"summary": summary, "per_query": per_query}
