"""User inputs for the CLI: a causal LM from a local Hugging Face directory (or a
transformers config with random weights) and JSONL text files, tokenised into the dict
examples that :class:`pyinf.CausalLMTask` reads."""
from __future__ import annotations

import json
import os
import warnings
from array import array
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


# the files of a Hugging Face tokenizer that decide how it splits text
_TOKENIZER_FILES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "spiece", "sentencepiece")


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the token ids of a text, hashed: the tokenizer's class and the files it
    was loaded from (or the byte tokenizer's). Recorded by resumable CLI runs, so that a
    model directory given a tokenizer since is another run, not one continued with other ids."""
    import hashlib

    h = hashlib.sha256(type(tokenizer).__name__.encode())
    where = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if where.is_dir():
        for f in sorted(where.iterdir()):
            if f.is_file() and f.name.startswith(_TOKENIZER_FILES):
                h.update(f.name.encode())
                h.update(f.read_bytes())
    else:  # no files to hash (the byte tokenizer, or one built in memory): what it holds
        h.update(json.dumps(sorted(getattr(tokenizer, "get_vocab", dict)().items())).encode())
    return h.hexdigest()[:16]


# weight files of other frameworks and formats: TensorFlow, Flax, raw torch checkpoints, GGUF
_OTHER_WEIGHT_FILES = ("*.h5", "*.msgpack", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.index")


class MissingDependency(ImportError):
    """An optional dependency a command needs is not installed (said in one line by the CLI)."""


def load_model(path: str, *, seed: int = 0, dtype: Optional[torch.dtype] = None):
    """(model, tokenizer). `path` is a local model directory, or a config JSON file (or a
    directory holding only config.json) for a model with random weights."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise MissingDependency(f"reading a model needs Hugging Face transformers, which does not import here "
                                f"({exc}): pip install 'pyinf[hf]' (make install does)") from exc

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no model directory or config file at {path}")
    loadable = p.is_dir() and (any(p.glob("*.safetensors")) or any(p.glob("*.bin")))
    if p.is_dir() and not loadable:
        # weights in a format from_pretrained does not read here: refuse rather than score a
        # model with random weights as if it were this one
        other = sorted(f.name for pattern in _OTHER_WEIGHT_FILES for f in p.glob(pattern))
        if other:
            raise ValueError(f"{path} holds weights pyinf cannot load ({', '.join(other[:3])}): only PyTorch "
                             f"weights (*.safetensors, *.bin) are read; convert them, or give the config "
                             f"JSON file itself for a model with random weights")
    if not loadable:
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


_NAMED_ONE_TOKEN = 10  # per dataset (per worker process)


class JsonlTextDataset(Dataset):
    """One document per line: ``{"text": ...}`` (every token carries the loss) or
    ``{"prompt": ..., "completion": ...}`` (only the completion does, as for queries).

    Built for corpora of millions of documents: opening the file checks every line's JSON
    and keys (so a bad line is named before any compute) but keeps only each line's byte
    offset; a document is read and tokenised when it is asked for (``os.pread``, so
    DataLoader worker processes can share the dataset).

    A text of one token predicts nothing: as a training document it scores exactly 0 (with
    a warning naming its line); with ``queries=True`` it is an error, as is any record too
    short to carry a loss (a query's measurement needs one)."""

    def __init__(self, path: str, tokenizer, *, max_length: int = 512, queries: bool = False):
        self.path = str(path)
        self.queries = bool(queries)  # a query too short to carry a loss is an error, a document's scores 0
        self.tokenizer = tokenizer
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2 (a document needs two tokens to carry a "
                             f"loss), got {max_length!r}")
        self.max_length = max_length
        offsets, lengths, line_numbers = array("q"), array("q"), array("q")
        with open(path, "rb") as f:
            offset = 0
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    self._parse(line, f"{path}:{line_no}")
                    offsets.append(offset)
                    lengths.append(len(line))
                    line_numbers.append(line_no)
                offset += len(line)
        if not offsets:
            raise ValueError(f"{path} holds no document")
        self._offsets, self._lengths, self._line_numbers = offsets, lengths, line_numbers
        self._one_token: set = set()  # the documents of one token named in a warning (the first few)
        self._fd: Optional[int] = None
        self._fd_pid: Optional[int] = None

    @staticmethod
    def _parse(line: bytes, where: str) -> Dict:
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{where}: not valid JSON: {exc}") from None
        if not isinstance(rec, dict) or not ("text" in rec or ("prompt" in rec and "completion" in rec)):
            raise ValueError(f"{where}: a record needs 'text', or 'prompt' and 'completion'")
        for key in ("text", "prompt", "completion"):
            if key in rec and not isinstance(rec[key], str):
                raise ValueError(f"{where}: '{key}' must be a string, got {type(rec[key]).__name__}")
            # found when the file is opened, not when a pass reaches the record (a fit would
            # lose the pass; a score run could only drop the line, which renumbers the corpus)
            if key in rec and key != "prompt" and not rec[key]:
                raise ValueError(f"{where}: '{key}' is empty: it carries no loss")
            try:
                rec.get(key, "").encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800"), which no tokenizer encodes
                raise ValueError(f"{where}: '{key}' is not valid Unicode: {exc}") from None
        return rec

    def _read(self, i: int) -> bytes:
        if self._fd is None or self._fd_pid != os.getpid():  # a forked worker opens its own
            self._fd, self._fd_pid = os.open(self.path, os.O_RDONLY), os.getpid()
        line = os.pread(self._fd, self._lengths[i], self._offsets[i])
        if len(line) != self._lengths[i]:
            raise RuntimeError(f"{self.where(i)}: the file changed while it was being read")
        return line

    def where(self, i: int) -> str:
        """``path:line`` of document ``i``, for messages."""
        return f"{self.path}:{self._line_numbers[i]}"

    def line_number(self, i: int) -> int:
        """The file line (from 1) of document ``i``: documents count non-blank lines only."""
        return self._line_numbers[i]

    def record(self, i: int) -> Dict:
        return self._parse(self._read(i), self.where(i))

    def raw(self, i: int) -> bytes:
        """Document ``i``'s line as stored (what a fingerprint of the corpus hashes)."""
        return self._read(i)

    @staticmethod
    def _encode(rec, tokenizer, max_length, where, queries=False):
        if "text" in rec:
            ids = tokenizer.encode(rec["text"])
            labels = list(ids)
        else:
            prompt = tokenizer.encode(rec["prompt"])
            completion = tokenizer.encode(rec["completion"], add_special_tokens=False) \
                if not isinstance(tokenizer, ByteTokenizer) else tokenizer.encode(rec["completion"])
            ids = prompt + completion
            labels = [-100] * len(prompt) + completion
            if len(ids) > max_length:  # a text is cut to its first max_length tokens; a completion may not be
                raise ValueError(f"{where}: prompt ({len(prompt)} tokens) and completion ({len(completion)}) "
                                 f"exceed max_length={max_length}: the completion would be cut, and its loss "
                                 f"measured on part of it; raise --max-length or shorten the record")
        ids, labels = ids[:max_length], labels[:max_length]
        if "text" in rec and len(ids) == 1 and not queries:
            # a training document of one token predicts nothing: its gradient, and so its
            # influence on every query, is exactly 0. Scored as such (a corpus of millions has
            # such lines, and an error would stop the run at the same chunk on every rerun)
            return {"input_ids": torch.tensor(ids), "labels": torch.tensor([-100])}
        if len(ids) < 2 or all(l == -100 for l in labels[1:]):
            raise ValueError(f"{where}: too short to carry a loss after tokenisation ({len(ids)} tokens)")
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}

    def __len__(self):
        return len(self._offsets)

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} of {self.path}, which holds {len(self)}")
        i %= len(self)
        try:
            item = self._encode(self.record(i), self.tokenizer, self.max_length, self.where(i), self.queries)
        except (UnicodeError, TypeError) as exc:  # e.g. a lone surrogate ("\ud800") the tokenizer cannot encode
            raise ValueError(f"{self.where(i)}: cannot tokenise this record: {exc}") from exc
        if len(item["input_ids"]) == 1 and i not in self._one_token and len(self._one_token) < _NAMED_ONE_TOKEN:
            self._one_token.add(i)  # named once, however many passes read it
            more = " (further ones are not named)" if len(self._one_token) == _NAMED_ONE_TOKEN else ""
            warnings.warn(f"pyinf: {self.where(i)} is one token after tokenisation: it predicts nothing, so its "
                          f"gradient and its influence are 0{more}", stacklevel=2)
        return item

    def text(self, i: int) -> str:
        rec = self.record(i)
        return rec.get("text") or rec.get("prompt", "") + rec.get("completion", "")

    def __getstate__(self):  # file descriptors do not travel to other processes
        state = dict(self.__dict__)
        state["_fd"] = state["_fd_pid"] = None
        return state

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._fd_pid == os.getpid():
            os.close(self._fd)
