"""What the user tells pyinf about a model: the training loss, the measurement, which
modules to track and which tokens are padding.

:class:`Task` has kronfluence's method names and meanings, so a kronfluence task class
works unchanged; :class:`CausalLMTask` covers Hugging Face style causal language models.
"""
from __future__ import annotations

import contextlib
import inspect
import re
import warnings
import weakref
from collections.abc import Mapping
from abc import ABC, abstractmethod
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .fused_ce import linear_cross_entropy


class Task(ABC):
    """Same contract and method names as ``kronfluence.Task`` (a kronfluence task runs in
    pyinf unchanged, except one that post-processes per-sample gradients, which pyinf never
    forms); a pyinf task goes into kronfluence through
    :func:`pyinf.kronfluence_compat.as_kronfluence_task`.

    - :meth:`compute_train_loss` returns the loss summed over the batch and its tokens
      (per-document gradients then come out unscaled); with ``sample=True`` the labels are
      drawn from the model's own predictive distribution (the true Fisher).
    - :meth:`compute_measurement` returns the measurement ``f`` summed over the batch.
    """

    @abstractmethod
    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        raise NotImplementedError

    @abstractmethod
    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def compute_measurement_per_example(self, batch: Any, model: nn.Module) -> Optional[torch.Tensor]:
        """Optional (not in kronfluence): the measurement of each example of the batch,
        ``[B]``, whose sum is :meth:`compute_measurement`. When given, query preparation takes
        the gradient and each query's own measurement (the per-nat normalisation needs it)
        from one pass; when None, it makes one more gradient-free pass, one example at a time.
        A subclass that redefines compute_measurement or compute_train_loss without redefining
        this method gets that second pass too (the inherited method would measure the parent's
        objective)."""
        return None

    def get_influence_tracked_modules(self) -> Optional[List[str]]:
        """Names of the modules to track, or None for every trackable layer (Linear, Conv1D,
        ungrouped Conv1d / Conv2d) but the output embedding."""
        return None

    def get_attention_mask(self, batch: Any):
        """``[B, T]`` with 1 for real tokens and 0 for padding, or None; or a dict of such
        masks by module name when layers see different sequences (encoder-decoder models)."""
        return None


def _model_inputs(model, batch) -> Dict[str, Any]:
    """Keyword arguments of a causal LM call. A Hugging Face model (it has ``config.use_cache``)
    runs with ``use_cache=False``: no pass needs the key/value cache, building it costs memory,
    and a cache filled in the forward would be filled again when activation checkpointing
    (``InfluenceEngine(checkpoint=True)``) recomputes a block."""
    mask = batch.get("attention_mask")
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=mask)
    if hasattr(getattr(model, "config", None), "use_cache"):
        kwargs["use_cache"] = False
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"]
    elif mask is not None and _takes_position_ids(model):
        # Positions count real tokens, as Hugging Face's generate() does: in a left-padded
        # batch GPT-2-style models (learned absolute positions) would otherwise place each
        # row's tokens after its padding. They start where the model's own start (RoBERTa's
        # after its padding_idx), and padding gets the model's padding position (else 1),
        # which the mask hides.
        first, pad = _position_start(model)
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1 + first).masked_fill(mask == 0, pad)
    elif mask is not None and type(model) not in _CHECKED_NO_POSITIONS and _position_table(model) is not None:
        # the collate pads every batch the same way: its first batch says (one host read)
        _CHECKED_NO_POSITIONS.add(type(model))
        if bool((mask[:, 0] == 0).any()):
            warnings.warn(f"pyinf: {type(model).__name__}.forward names no position_ids, and this batch is left-padded: "
                          f"its position table ({_position_table(model)!r}) then places each row's tokens after "
                          f"its padding, and the scores depend on the padding (pad on the right, or pass "
                          f"position_ids in the batch)", stacklevel=4)
    return kwargs


_POSITION_TABLES: "weakref.WeakKeyDictionary[nn.Module, Optional[str]]" = weakref.WeakKeyDictionary()


def _position_table(model) -> Optional[str]:
    """The name of the model's learned absolute position table (an ``nn.Embedding`` named as
    one: GPT-2's ``wpe``, ``position_embeddings``, ``embed_positions``), or None: a model with
    relative positions (rotary: Llama) or none (Mamba) scores a left-padded row the same
    whatever positions it is given."""
    if model not in _POSITION_TABLES:
        _POSITION_TABLES[model] = next((name for name, m in model.named_modules() if isinstance(m, nn.Embedding)
                                        and re.search(r"(^|\.)(wpe|[^.]*pos[^.]*)$", name)), None)
    return _POSITION_TABLES[model]


_TAKES_POSITION_IDS: Dict[Any, bool] = {}
_POSITION_START: "weakref.WeakKeyDictionary[nn.Module, Tuple[int, int]]" = weakref.WeakKeyDictionary()
_CHECKED_NO_POSITIONS: set = set()  # model classes whose first batch was looked at


def _position_start(model) -> Tuple[int, int]:
    """``(first token's position, padding's position)``: ``(0, 1)``, or for models that number
    positions after a padding index, as RoBERTa, XLM-R, CamemBERT, ESM do (their position
    embedding has the ``padding_idx`` their embeddings keep, and their own positions are
    ``padding_idx + 1, +2, ...`` with ``padding_idx`` on padding), ``(padding_idx + 1, padding_idx)``."""
    if model not in _POSITION_START:
        start = (0, 1)
        for module in model.modules():
            table = getattr(module, "position_embeddings", None)
            # the family's embeddings keep the padding index themselves (LXMERT's table has a
            # padding_idx of 0 and positions from 0: not one of them)
            if isinstance(table, nn.Embedding) and table.padding_idx is not None and \
                    getattr(module, "padding_idx", None) == table.padding_idx:
                start = (table.padding_idx + 1, table.padding_idx)
                break
        _POSITION_START[model] = start
    return _POSITION_START[model]


def _takes_position_ids(model) -> bool:
    forward = getattr(model.forward, "__func__", None)  # the class's function, for a method
    if forward is not None and forward in _TAKES_POSITION_IDS:
        return _TAKES_POSITION_IDS[forward]
    try:
        takes = "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes = False
    # cached per class function; a forward set on the instance (a wrapper, accelerate's hook:
    # it holds the model) has its own signature and is read each time, not kept alive here
    if forward is not None:
        _TAKES_POSITION_IDS[forward] = takes
    return takes


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"CausalLMTask: the model returned {type(output).__name__}, with no logits tensor in it")
    return logits


def pad_collate(examples: Sequence[Dict[str, Any]], pad_token_id: int = 0, side: str = "right"
                ) -> Dict[str, torch.Tensor]:
    """Pads a list of ``{"input_ids", "attention_mask"?, "labels"?}`` examples on the right
    (or, ``side="left"``, on the left): ``input_ids`` with ``pad_token_id``, ``attention_mask``
    with 0, ``labels`` with -100. Both give the same scores with :class:`CausalLMTask` for models
    whose ``forward`` names ``position_ids`` (it passes positions that count real tokens; Hugging
    Face models do); a model that takes them through ``**kwargs`` only, or has learned positions
    and no such argument, needs right padding."""
    if len(examples) == 0:
        raise ValueError("pad_collate: empty batch")
    if side not in ("right", "left"):
        raise ValueError(f"pad_collate: side must be 'right' or 'left', got {side!r}")
    for i, e in enumerate(examples):
        if not isinstance(e, Mapping) or "input_ids" not in e:
            what = f"a {type(e).__name__}" if not isinstance(e, Mapping) else f"a dict with keys {list(e)[:8]}"
            raise TypeError(f"pad_collate: example {i} of the batch is {what}, not a dict with 'input_ids' "
                            f"(CausalLMTask's examples; for other data, give the engine a Task and its collate_fn)")
    ids = [torch.as_tensor(e["input_ids"], dtype=torch.long).reshape(-1) for e in examples]
    length = max(x.numel() for x in ids)
    batch = {
        "input_ids": torch.full((len(ids), length), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(ids), length, dtype=torch.long),
        "labels": torch.full((len(ids), length), -100, dtype=torch.long),
    }
    def field(i, e, key, n):  # an example's attention_mask or labels: one value per token
        value = torch.as_tensor(e[key], dtype=torch.long).reshape(-1)
        if value.numel() != n:
            raise ValueError(f"pad_collate: example {i} of the batch has {n} input_ids but {value.numel()} {key}")
        return value

    for i, (e, x) in enumerate(zip(examples, ids)):
        n = x.numel()
        at = slice(0, n) if side == "right" else slice(length - n, length)
        batch["input_ids"][i, at] = x
        batch["attention_mask"][i, at] = 1 if e.get("attention_mask") is None else field(i, e, "attention_mask", n)
        batch["labels"][i, at] = x if e.get("labels") is None else field(i, e, "labels", n)
    return batch


def _eager():
    """torch.compile'd code run eagerly inside (where torch has compiler stances: 2.6+)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


# models whose fused head gives their own loss (CausalLMTask._check_fused_head)
_FUSED_HEAD_CHECKED: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


class CausalLMTask(Task):
    """Next-token language modelling on dict batches with ``input_ids``, ``attention_mask``
    and ``labels`` (-100 marks tokens that carry no loss; labels are shifted inside, as in
    Hugging Face models).

    The train loss is the summed cross-entropy. The measurement is the summed cross-entropy
    over the labelled tokens, i.e. ``-log p(completion | prompt)`` when the prompt's labels are
    -100 (kronfluence's language-model convention: a positive score means the training
    document makes the query's completion more likely).

    With ``fused_head=True`` (Hugging Face models: ``model.base_model`` and
    ``model.get_output_embeddings()``), the loss is computed from the final hidden states by
    :func:`pyinf.fused_ce.linear_cross_entropy`, without materialising fp32 logits and only
    on labelled tokens; the output embedding then cannot be a tracked module.
    """

    # config attributes that change logits after the output layer: the fused head refuses them
    _LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")

    def __init__(self, tracked_modules: Optional[List[str]] = None, pad_token_id: int = 0, fused_head: bool = False):
        self.tracked_modules = list(tracked_modules) if tracked_modules is not None else None
        self.pad_token_id = pad_token_id
        self.fused_head = fused_head

    def collate_fn(self, examples):
        return pad_collate(examples, self.pad_token_id)

    def _labels(self, batch):
        """The label each position predicts, ``[B, T-1]``: -100 (no loss) where either the
        predicting position or the predicted one is padding: on a left-padded row's first real
        token (a padding position would predict it), and on a right-padded row's first padding
        token even when the labels hold it (``labels = input_ids`` after padding, where Hugging
        Face's loss and kronfluence count it), so that a document's loss does not depend on
        the batch it was padded in."""
        labels = batch.get("labels")
        mask = batch.get("attention_mask")
        if labels is None:
            labels = batch["input_ids"]
        labels = labels[:, 1:]
        if mask is not None:
            labels = labels.masked_fill((mask[:, :-1] == 0) | (mask[:, 1:] == 0), -100)
        return labels

    def _token_losses(self, batch, model, sample: bool) -> torch.Tensor:
        """Cross-entropy of each next-token prediction, ``[B, T-1]``, zero where the label is
        -100; fp32 (fp64 for an fp64 model)."""
        if self.fused_head:
            if model not in _FUSED_HEAD_CHECKED:
                self._check_fused_head(batch, model)
            return self._fused_token_losses(batch, model, sample)
        return self._logit_token_losses(batch, model, sample)

    def _fused_token_losses(self, batch, model, sample: bool) -> torch.Tensor:
        hidden, head = self._hidden_and_head(batch, model)
        labels = self._labels(batch)
        # in the head's dtype, as models cast it themselves (Mamba's bf16 model returns fp32 states)
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).to(head.weight.dtype)
        rows = linear_cross_entropy(h, head.weight, labels.reshape(-1), getattr(head, "bias", None),
                                    sample=sample, reduction="none")
        return rows.reshape(labels.shape)

    def _check_fused_head(self, batch, model) -> None:
        """The fused head takes the logits to be the output embedding applied to the base
        model's last hidden state. A model that does more between the two (BERT's and RoBERTa's
        LM head transform before it, a logit multiplier after it that no config attribute
        names) would be scored on another loss, silently: the first document of the model's
        first batch is run through the model (no gradient, once per model), and what reaches
        the output embedding and what the model returns are compared with the base model's
        last hidden state and the output embedding's own output. Both are the same computation
        when nothing is in between, in any dtype."""
        rows = batch["input_ids"].shape[0]
        first = {k: v[:1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows else v
                 for k, v in batch.items()}
        seen: Dict[str, torch.Tensor] = {}
        # a tracked layer's forward under no_grad is not captured; compiled blocks
        # (InfluenceEngine(compile=True)) run eagerly: no recompilation for this one check
        with torch.no_grad(), _eager():
            hidden, head = self._hidden_and_head(first, model)
            hooks = [head.register_forward_pre_hook(lambda m, args: seen.setdefault("input", args[0])),
                     head.register_forward_hook(lambda m, args, out: seen.setdefault("output", out))]
            try:
                logits = _logits(model(**_model_inputs(model, first)))
            finally:
                for h in hooks:
                    h.remove()
        # relative norm of the difference: one computation by two code paths (a model's forward
        # may take another kernel than its base model's) differs by rounding, 1e-3 in bf16 (seen:
        # Mamba); a transform or scale between the two differs by its own size
        half = {hidden.dtype, next(model.parameters()).dtype} & {torch.float16, torch.bfloat16}
        tol = 3e-2 if half else 1e-5  # (Mamba's bf16 model returns fp32 hidden states)

        mask = first.get("attention_mask")

        def differ(got: torch.Tensor, want: torch.Tensor) -> bool:
            if got.shape != want.shape:
                return True
            got, want = got.double(), want.double()
            if mask is not None and tuple(mask.shape) == tuple(want.shape[:2]):  # padding's values are no one's
                got, want = got[mask != 0], want[mask != 0]
            return bool((got - want).norm() > tol * want.norm() + 1e-12) if want.numel() else False

        name = next((n for n, m in model.named_modules() if m is head), "the output embedding")
        if "input" not in seen:
            raise ValueError(f"CausalLMTask(fused_head=True): {type(model).__name__}'s forward never calls its output "
                             f"embedding {name!r}, so the fused head cannot know it computes the model's logits; use "
                             f"fused_head=False")
        where = ("before it: what reaches it is not the base model's last hidden state (an LM head transform?)"
                 if differ(seen["input"], hidden) else
                 "after it: the model's logits are not its output (a scale or a cap?)"
                 if differ(logits, seen["output"].to(logits.dtype)) else None)
        if where is not None:
            raise ValueError(f"CausalLMTask(fused_head=True) computes the loss from the base model's last hidden "
                             f"state through the output embedding {name!r}, but {type(model).__name__} does more "
                             f"{where}; the fused head would score another loss: use fused_head=False")
        _FUSED_HEAD_CHECKED[model] = True

    def _logit_token_losses(self, batch, model, sample: bool) -> torch.Tensor:
        logits = _logits(model(**_model_inputs(model, batch)))[:, :-1]
        if logits.dtype != torch.float64:
            logits = logits.float()
        labels = self._labels(batch)
        if sample:
            # True Fisher: labels drawn from the model's own predictive distribution, on the
            # positions that carry a loss.
            with torch.no_grad():
                probs = torch.softmax(logits.detach(), dim=-1)
                # a row with NaN or Inf has no distribution to draw from: it draws from a uniform
                # one instead, its loss is NaN all the same, and the pass stops on that loss after
                # the backward. (Checking here would stall the GPU between forward and backward,
                # and multinomial would fail on such a row, on a GPU with a device-side assert.)
                finite = torch.isfinite(probs).all(-1, keepdim=True)
                probs = torch.where(finite, probs, torch.ones((), dtype=probs.dtype, device=probs.device))
                sampled = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(labels.shape)
            labels = torch.where(labels == -100, labels, sampled)
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                 ignore_index=-100, reduction="none")
        return losses.reshape(labels.shape)

    def _hidden_and_head(self, batch, model):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        base = getattr(model, "base_model", None)
        if head is None or base is None or base is model:
            raise TypeError(f"CausalLMTask(fused_head=True) needs a Hugging Face causal LM with base_model and "
                            f"get_output_embeddings(); {type(model).__name__} has not")
        config = getattr(model, "config", None)
        for attr in self._LOGIT_TRANSFORMS:
            if getattr(config, attr, None) not in (None, 1, 1.0):
                raise ValueError(f"CausalLMTask(fused_head=True): the model's config sets {attr}, which the fused "
                                 f"head does not apply; use fused_head=False")
        out = base(**_model_inputs(base, batch))
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden, head

    def compute_train_loss(self, batch, model, sample: bool = False):
        return self._token_losses(batch, model, sample).sum()

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model, sample=False)

    def compute_measurement_per_example(self, batch, model):
        return self._token_losses(batch, model, sample=False).sum(1)

    def get_influence_tracked_modules(self):
        return self.tracked_modules

    def get_attention_mask(self, batch):
        return batch.get("attention_mask")
