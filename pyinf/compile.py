"""``InfluenceEngine(compile=True)``: the model's repeated blocks under ``torch.compile``.

The passes of the pipeline are the model's own forward and input-gradient backward, and
on a GPU those, not the influence kernels, take most of the time. Compiling fuses what sits
between the tracked layers (norms, activations, residual adds, rotary embeddings) in the
forward and the backward. Each tracked layer is a graph break (its capture runs eagerly,
see :func:`pyinf.capture._linear_forward`), so the compiled graphs are the stretches
between them.

What is compiled: the children of the largest ``nn.ModuleList`` whose children all have
one type and contain tracked layers (the transformer blocks), each block's ``forward``
run through ``torch.compile`` while a stage runs and restored after. Identical blocks share
compiled code, and the compiled function persists per block class, so later stages and
passes reuse it (a new sequence length recompiles once, then shapes are dynamic).
Compilation itself takes seconds to minutes on first use: it pays on long passes.
"""
from __future__ import annotations

import functools
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

# One compiled forward per block class (it takes the block as its first argument): identical
# blocks share compiled code, and no block is kept alive by the cache.
_COMPILED_BY_CLASS: Dict[type, tuple] = {}  # class -> (the forward compiled, its compiled form)

# Variants of one block forward that dynamo compiles: the first block's input needs no
# gradient and the others' do, the last partial batch (then dynamic sizes), the queries'
# length, and each dtype of a model compiled in the same process (the benchmarks' bf16 run and
# its float32 reference). Dynamo's default limit (8 per code object) is reached by two engines,
# and past it dynamo runs the rest eagerly: silently slower. Raised while the blocks are compiled.
RECOMPILE_LIMIT = 64


def find_blocks(model: nn.Module, tracked: Dict[str, nn.Module]) -> List[nn.Module]:
    """The repeated blocks of `model` that hold tracked layers (the longest list not nested in another)."""
    tracked_ids = {id(m) for m in tracked.values()}
    candidates = []
    for m in model.modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2 or len({type(c) for c in m}) != 1:
            continue
        if not any(id(sub) in tracked_ids for child in m for sub in child.modules()):
            continue
        candidates.append(m)
    # The outermost lists: a block's own list of heads or experts can be longer than the list
    # of blocks, and choosing it would leave every block but the first alone.
    inner = {id(sub) for m in candidates for child in m for sub in child.modules()}
    best: List[nn.Module] = []
    for m in candidates:
        if id(m) not in inner and len(m) > len(best):
            best = list(m)
    return best


class CompiledBlocks:
    """Context manager: each block's forward is its ``torch.compile`` wrapper inside.

    It raises dynamo's recompile limit for its scope and restores it after: per thread from
    torch 2.12, process-wide before. Passes with ``compile=True`` in overlapping threads are
    not supported (torch.compile itself is not thread-safe); run such shards as processes."""

    def __init__(self, model: nn.Module, tracked: Dict[str, nn.Module]):
        self.blocks = find_blocks(model, tracked)
        if not self.blocks:
            warnings.warn(f"pyinf compile=True: {type(model).__name__} has no list of repeated blocks holding "
                          f"tracked layers; running uncompiled", stacklevel=3)
        self._installed: List[nn.Module] = []
        self._limit: Optional[Tuple[str, int]] = None  # (dynamo's config name, its value before)

    def __enter__(self) -> "CompiledBlocks":
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        self._limit = (name, getattr(config, name))
        setattr(config, name, max(self._limit[1], RECOMPILE_LIMIT))
        for block in self.blocks:
            if "forward" in block.__dict__:
                continue  # someone else's per-instance forward: left as it is, uncompiled
            cls = type(block)
            source, compiled = _COMPILED_BY_CLASS.get(cls, (None, None))
            if source is not cls.forward:  # first use, or the class's forward was replaced since
                source, compiled = cls.forward, torch.compile(cls.forward)
                _COMPILED_BY_CLASS[cls] = (source, compiled)
            block.forward = functools.partial(compiled, block)
            self._installed.append(block)
        return self

    def __exit__(self, *exc) -> None:
        for block in self._installed:
            block.__dict__.pop("forward", None)
        self._installed.clear()
        if self._limit is not None:
            setattr(torch._dynamo.config, *self._limit)
            self._limit = None
