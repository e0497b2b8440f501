"""User inputs for the CLI: a causal LM from a local Hugging Face directory (or a
transformers config with random weights) and JSONL text files, tokenised into the dict
examples that :class:`pyinf.CausalLMTask` reads."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.utils.data import Dataset


class ByteTokenizer:
    """Fallback for a model without a tokenizer (a config with random weights): UTF-8 bytes
    as token ids, which needs a vocabulary of at least 256."""

    def __init__(self, vocab_size: int):
        if vocab_size < 256:
            raise ValueError(f"no tokenizer found and the vocabulary ({vocab_size}) is too small for byte tokens")
        self.pad_token_id = 0

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


def load_model(path: str, *, seed: int = 0, dtype: Optional[torch.dtype] = None):
    """(model, tokenizer). `path` is a local model directory, or a config JSON file (or a
    directory holding only config.json) for a model with random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no model directory or config file at {path}")
    config_only = p.is_file() or not any(p.glob("*.safetensors")) and not any(p.glob("*.bin"))
    if config_only:
        cfg_file = p if p.is_file() else p / "config.json"
        with open(cfg_file) as f:
            cfg_dict = json.load(f)
        model_type = cfg_dict.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"{cfg_file} has no 'model_type'")
        config = AutoConfig.for_model(model_type, **cfg_dict)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        tok_dir = p.parent if p.is_file() else p
    else:
        model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True)
        tok_dir = p
    if dtype is not None:
        model = model.to(dtype)
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if any((tok_dir / name).exists() for name in tokenizer_files):
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    else:
        tokenizer = ByteTokenizer(model.config.vocab_size)
    return model.eval(), tokenizer


class JsonlTextDataset(Dataset):
    """One document per line: ``{"text": ...}`` (every token carries the loss) or
    ``{"prompt": ..., "completion": ...}`` (only the completion does, as for queries)."""

    def __init__(self, path: str, tokenizer, *, max_length: int = 512):
        self.path = str(path)
        self.records: List[Dict] = []
        self.items: List[Dict[str, torch.Tensor]] = []
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{line_no}: not valid JSON: {exc}") from None
                self.records.append(rec)
                self.items.append(self._encode(rec, tokenizer, max_length, f"{path}:{line_no}"))
        if not self.items:
            raise ValueError(f"{path} holds no document")

    @staticmethod
    def _encode(rec, tokenizer, max_length, where):
        if "text" in rec:
            ids = tokenizer.encode(rec["text"])
            labels = list(ids)
        elif "prompt" in rec and "completion" in rec:
            prompt = tokenizer.encode(rec["prompt"])
            completion = tokenizer.encode(rec["completion"], add_special_tokens=False) \
                if not isinstance(tokenizer, ByteTokenizer) else tokenizer.encode(rec["completion"])
            ids = prompt + completion
            labels = [-100] * len(prompt) + completion
        else:
            raise ValueError(f"{where}: a record needs 'text', or 'prompt' and 'completion'")
        ids, labels = ids[:max_length], labels[:max_length]
        if len(ids) < 2 or all(l == -100 for l in labels[1:]):
            raise ValueError(f"{where}: too short to carry a loss after tokenisation ({len(ids)} tokens)")
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def text(self, i: int) -> str:
        rec = self.records[i]
        return rec.get("text") or rec.get("prompt", "") + rec.get("completion", "")
