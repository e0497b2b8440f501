"""Turning what the user passes (a Dataset or a DataLoader) into batches on the model's
device, in a fixed order, with the number of documents in each."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, SequentialSampler, Subset
from torch.utils.data.dataloader import default_collate


def in_order(loader: DataLoader) -> bool:
    """Whether a map-style loader yields its dataset in index order: a SequentialSampler under
    the plain BatchSampler (a custom batch sampler may reorder, whatever its .sampler says)."""
    if loader.batch_sampler is None:  # batch_size=None: one example at a time, by the sampler
        return isinstance(loader.sampler, SequentialSampler)
    return (type(loader.batch_sampler) is BatchSampler and isinstance(loader.batch_sampler.sampler, SequentialSampler))


def make_loader(data: Any, *, batch_size: int, collate_fn: Optional[Callable] = None,
                max_examples: Optional[int] = None, what: str = "dataset", pin_memory: bool = False) -> DataLoader:
    """A loader in dataset order. ``pin_memory`` (for a model on a GPU) lets each batch's
    host-to-device copy run asynchronously (:func:`to_device` uses ``non_blocking``)."""
    if isinstance(data, DataLoader):
        if max_examples is not None:
            raise ValueError(f"max_examples cannot limit a DataLoader; pass the {what} as a Dataset")
        # an IterableDataset has no index order: its own iteration order is the order
        if not isinstance(data.dataset, IterableDataset) and not in_order(data):
            warnings.warn(f"the {what} DataLoader does not iterate in order; scores follow its order")
        _check_not_empty(data.dataset, what)
        dropped = _dropped(data)
        if dropped:
            warnings.warn(f"the {what} DataLoader drops its last {dropped} examples (drop_last=True): the results "
                          f"leave them out")
        return data
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise TypeError(f"the {what} must be a torch Dataset (with __len__ and __getitem__) or a DataLoader, "
                        f"got {type(data).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    _check_not_empty(data, what)
    if max_examples is not None:
        if max_examples < 1:
            raise ValueError(f"max_examples must be positive, got {max_examples}")
        data = Subset(data, range(min(max_examples, len(data))))
    return DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_fn or default_collate,
                      pin_memory=pin_memory)


def _dropped(loader: DataLoader) -> int:
    """Examples a loader with drop_last=True never yields (0 when it drops none, or cannot tell)."""
    sampler = loader.batch_sampler
    if sampler is None or not getattr(sampler, "drop_last", False) or not getattr(sampler, "batch_size", None):
        return 0
    try:
        return len(sampler.sampler) % sampler.batch_size
    except TypeError:
        return 0


def _check_not_empty(dataset, what: str) -> None:
    try:
        n = len(dataset)
    except TypeError:
        return  # an iterable dataset: emptiness shows up as zero batches
    if n == 0:
        raise ValueError(f"the {what} is empty")


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        moved = {k: to_device(v, device) for k, v in batch.items()}
        if type(batch) is dict:
            return moved
        try:  # keep a dict subclass (OrderedDict, a task's own batch class) for the task
            return type(batch)(moved)
        except TypeError:  # a constructor that takes other arguments (defaultdict)
            return moved
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(moved) if not hasattr(batch, "_fields") else type(batch)(*moved)
    if hasattr(batch, "to") and callable(batch.to):  # e.g. transformers' BatchEncoding
        return batch.to(device)
    return batch


def count_documents(batch: Any, mask: Optional[torch.Tensor]) -> int:
    """Documents in a batch: the mask's first dimension, else the first tensor's. (A first
    tensor shared by the documents, ``position_ids [1, T]``, says 1: the runner then asks the
    loader how many examples it batched, :func:`batch_sizes`.)"""
    if mask is not None:
        return int(mask.shape[0])
    stack = [batch]
    while stack:
        item = stack.pop(0)
        if isinstance(item, torch.Tensor) and item.dim() > 0:
            return int(item.shape[0])
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif hasattr(item, "keys") and hasattr(item, "__getitem__"):
            stack.extend(item[k] for k in item.keys())
    raise ValueError("cannot tell how many documents a batch holds: it has no tensor and the task gives no mask")


def batch_count(loader) -> Optional[int]:
    """The loader's number of batches, or None when it cannot say (a DataLoader over an
    IterableDataset without ``__len__`` has ``__len__`` itself, which raises TypeError)."""
    try:
        return len(loader)
    except TypeError:
        return None


def batch_sizes(loader) -> Optional[Callable[[int], int]]:
    """For a loader over a map-style dataset in index order, batch ``i``'s number of examples
    (the documents, whatever the collate function puts first); else None. Worked out from the
    sizes, not by iterating the sampler (a random one would draw from torch's generator)."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset) or not in_order(loader):
        return None
    size = loader.batch_sampler.batch_size if loader.batch_sampler is not None else 1
    try:
        n = len(loader.batch_sampler.sampler) if loader.batch_sampler is not None else len(loader.sampler)
    except TypeError:
        return None
    return lambda i: max(0, min(size, n - i * size))
