"""A tiny GPT in plain PyTorch, shaped so that EK-FAC has the usual layers to track.

Every matmul that carries weights is an ``nn.Linear`` (``q``, ``k``, ``v``, ``o`` in the
attention, ``fc`` and ``proj`` in the MLP), as in the paper's models; the output head is a
separate ``lm_head`` Linear, which ``CausalLMTask`` leaves untracked by default.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int
    max_len: int = 48
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 3
    d_mlp: int = 256

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, cfg.d_mlp)
        self.proj = nn.Linear(cfg.d_mlp, d)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        # Causal attention alone suffices for right-padded batches: a real token never
        # attends to the padding after it, and padded positions carry no loss.
        att = F.scaled_dot_product_attention(self._heads(self.q(h)), self._heads(self.k(h)),
                                             self._heads(self.v(h)), is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(x.shape))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[B, T, V]``. ``attention_mask`` is accepted for the Task interface; see
        :meth:`Block.forward` for why causal masking already handles right padding."""
        t = input_ids.shape[1]
        if t > self.config.max_len:
            raise ValueError(f"sequence of {t} tokens exceeds the model's max_len {self.config.max_len}")
        pos = torch.arange(t, device=input_ids.device)
        x = self.tok_emb(input_ids) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
