"""One pass over data: for each batch, forward, the task's objective, backward with every
tracked layer captured. Factor fitting, query preparation and scoring are each such a
pass with their own objective and consumer."""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterable, Iterator, Optional

import torch
from torch import nn

from . import data as data_mod
from . import ops
from ._process_setting import ProcessSetting
from .capture import Capture, Consumer
from .modules import ModuleSpec
from .progress import bar

# objective(batch, model) -> scalar loss summed over the batch's documents
Objective = Callable[[object, nn.Module], torch.Tensor]
# called with (batch_index, first_document_index, n_docs, mask): before a batch's forward
# (on_batch_start) or after its backward (on_batch_end)
BatchEnd = Callable[[int, int, int, Optional[torch.Tensor]], None]


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


_END = object()


def prefetched(iterable: Iterable) -> Iterator:
    """The items of `iterable`, each fetched in a background thread while the caller works on
    the one before: on a GPU, collating the next batch overlaps the device's work on the
    current one instead of leaving it idle after each batch's synchronisation."""
    it = iter(iterable)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pyinf-prefetch") as pool:
        pending = pool.submit(next, it, _END)
        while True:
            item = pending.result()  # re-raises the loader's own exception
            if item is _END:
                return
            pending = pool.submit(next, it, _END)
            yield item


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode (no dropout, frozen norm statistics) inside; afterwards every
    submodule gets back its own flag (``model.train(flag)`` would set one flag on all of
    them, and a BatchNorm the user froze in a training model would start updating)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def caches_released_after():
    """The fused backends' casts and packed factors, made for this pass's factors or queries,
    are freed when it ends (they would live as long as those, on the GPU)."""
    try:
        yield
    finally:
        ops.release_caches()


def _attention_fastpath():
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        return None
    return ProcessSetting(mha.get_fastpath_enabled, mha.set_fastpath_enabled)


_FASTPATH = _attention_fastpath()


def no_attention_fastpath():
    """torch's nn.TransformerEncoderLayer and nn.MultiheadAttention, in eval mode with no
    parameter needing a gradient (as in every pyinf pass), take a fused fast path that never
    calls their Linear submodules: tracked ones would see no token. Off during a pass (a
    process-wide flag: see :mod:`pyinf._process_setting` for passes in threads)."""
    return _FASTPATH.changed(lambda before: False) if _FASTPATH is not None else contextlib.nullcontext()


def run_pass(model: nn.Module, task, modules: Dict[str, nn.Module], specs: Dict[str, ModuleSpec],
             loader, *, objective: Objective, consumer: Consumer, desc: str,
             on_batch_start: Optional[BatchEnd] = None, on_batch_end: Optional[BatchEnd] = None,
             progress: Optional[bool] = None, prefetch: Optional[bool] = None) -> int:
    """Runs the pass and returns the number of documents seen. The model is put in eval
    mode for the pass (no dropout) and restored after. ``prefetch`` (default: on for a model
    on a GPU) loads batches one ahead in a background thread."""
    device = model_device(model)
    if prefetch is None:
        prefetch = device.type == "cuda"
    n_seen = 0
    with eval_mode(model), no_attention_fastpath(), caches_released_after(), \
            Capture(model, modules, specs, consumer) as capture:
        total = data_mod.batch_count(loader)  # for the progress bar
        sizes = data_mod.batch_sizes(loader)  # examples per batch, when the loader can say
        # An iterator, not the loader: tqdm.auto would create two DataLoader iterators,
        # each drawing from torch's RNG, and seeded true-Fisher samples would then depend
        # on whether batches are prefetched.
        batches = prefetched(loader) if prefetch else iter(loader)
        where = "loading batch 0"
        try:
            for batch_index, batch in enumerate(bar(batches, desc=desc, total=total, progress=progress)):
                where = f"batch {batch_index} (from document {n_seen} in the loader's order)"
                batch = data_mod.to_device(batch, device)
                mask = task.get_attention_mask(batch)
                per_module_masks = mask if isinstance(mask, dict) else None
                if per_module_masks is not None:
                    # e.g. encoder-decoder models: one mask per module; the callbacks below
                    # see none (per-token scores then take the token count from the layers)
                    mask = None
                    first = next(iter(per_module_masks.values()), None)
                    n_docs = data_mod.count_documents(batch, first)
                else:
                    n_docs = data_mod.count_documents(batch, mask)
                    if mask is None and n_docs == 1 and sizes is not None:
                        # a first tensor shared by the batch's documents ([1, T] position_ids):
                        # the loader says how many examples it batched
                        n_docs = max(1, sizes(batch_index))
                where = f"batch {batch_index} (documents {n_seen} to {n_seen + n_docs - 1} in the loader's order)"
                capture.begin_batch(batch_index, n_docs, per_module_masks if per_module_masks is not None else mask)
                if on_batch_start is not None:
                    on_batch_start(batch_index, n_seen, n_docs, mask)
                loss = objective(batch, model)
                _check_loss(loss, batch_index, desc)
                loss.backward()
                # the loss is checked after backward, with the gradients, so that reading it
                # does not stall the GPU between forward and backward
                capture.end_batch(loss)
                if on_batch_end is not None:
                    on_batch_end(batch_index, n_seen, n_docs, mask)
                n_seen += n_docs
                where = f"loading batch {batch_index + 1}"
        except Exception as exc:  # which batch: a model's or loader's own error names none (a token id
            if hasattr(exc, "add_note"):  # past the vocabulary); Python 3.11+
                exc.add_note(f"{desc}: in {where}")
            raise
    if n_seen == 0:
        raise ValueError(f"{desc}: the data yielded no batch")
    return n_seen


def _check_loss(loss, batch_index: int, desc: str) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"{desc}: the task's loss must be a scalar tensor (summed over the batch), got {shape}")
    if not loss.requires_grad:
        raise RuntimeError(f"{desc}: the loss of batch {batch_index} does not depend on any tracked module")
