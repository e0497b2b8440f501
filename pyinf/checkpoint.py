"""``InfluenceEngine(checkpoint=True)``: activation checkpointing of the model's repeated blocks.

A pass keeps, for the backward, every activation the model's blocks save: for a
Pythia-160M-shaped model at batch 32 x 512 tokens several GB, which is what bounds the batch
size on a GPU. With checkpointing each block keeps only its inputs during the forward and
recomputes its own activations when the backward reaches it (PyTorch's non-reentrant
``torch.utils.checkpoint``): saved activations drop from all blocks' to one block's at a
time, for one more forward of the blocks (about a third more model FLOPs per pass). It pays
where memory, not compute, limits the batch, or where a larger batch is what fills the GPU.

What is checkpointed: the same blocks ``compile=True`` compiles (:func:`pyinf.compile.find_blocks`,
the longest list of identical blocks holding tracked layers), for the duration of a stage.
Both options combine: the (compiled) block forward is what gets checkpointed. Tracked layers
run again during the recomputation; :mod:`pyinf.capture` recognises that (the forward runs
inside the backward) and neither counts it as a second call nor captures anything twice:
the original layer's backward receives the recomputed input.
"""
from __future__ import annotations

import functools
import warnings
from typing import Dict, List, Tuple

from torch import nn
from torch.utils.checkpoint import checkpoint

from .compile import find_blocks


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


class CheckpointedBlocks:
    """Context manager: each block's forward (whatever it is on entry, e.g. a compiled one)
    runs under non-reentrant activation checkpointing inside, and is restored on exit."""

    def __init__(self, model: nn.Module, tracked: Dict[str, nn.Module]):
        self.blocks = find_blocks(model, tracked)
        if not self.blocks:
            warnings.warn(f"pyinf checkpoint=True: {type(model).__name__} has no list of repeated blocks holding "
                          f"tracked layers; running without activation checkpointing", stacklevel=3)
        self._saved: List[Tuple[nn.Module, object]] = []

    def __enter__(self) -> "CheckpointedBlocks":
        for block in self.blocks:
            own = block.__dict__.get("forward")  # an instance forward (compile=True installs one)
            inner = own if own is not None else type(block).forward.__get__(block)
            block.forward = functools.partial(_checkpointed, inner)
            self._saved.append((block, own))
        return self

    def __exit__(self, *exc) -> None:
        for block, own in reversed(self._saved):
            if own is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = own
        self._saved.clear()
