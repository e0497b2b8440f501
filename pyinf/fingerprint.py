"""Which weights a result was made with.

Two records of a model's weights, taken from one strided sample of every parameter:

- the **fingerprint**, a SHA-256 over every parameter's name, shape, dtype and sampled values:
  exact. A resumable run (:mod:`pyinf.corpus`, :mod:`pyinf.staged_fit`) continues only with
  the very model it started with, dtype included, since a bf16 model's scores are not its
  fp32 copy's.
- the **weights record**: the names and shapes, and per parameter its dtype and a hash of
  its sample as it would be stored in float32, in bf16 and in fp16. Factors and queries carry
  it, so that using them with another model warns (:func:`same_weights`) while the same
  checkpoint in another dtype (factors fit in float32, scores in bf16) is recognised: its
  bf16 copy was rounded by the same round-to-nearest-even as the record's bf16 hash, so the
  hashes at the coarser of the two dtypes agree exactly, with no tolerance for another
  checkpoint to slip through.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

# The dtype whose cast a comparison is made at: the coarser of the two parameters' dtypes.
_COARSENESS = {"torch.float64": 0, "torch.float32": 1, "torch.float16": 2, "torch.bfloat16": 3}
_HASHED = {"torch.float32": torch.float32, "torch.float16": torch.float16, "torch.bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class WeightsIdentity:
    fingerprint: str  # exact (hex SHA-256)
    record: Dict      # layout hash, and per parameter [dtype, {cast dtype: hash of the sample}] (JSON-able)


def weights_identity(model: torch.nn.Module, samples_per_tensor: int = 4096) -> WeightsIdentity:
    """The model's fingerprint (every parameter's name, shape, dtype and an evenly strided
    sample of about ``samples_per_tensor`` of its values, end to end: cheap for a 7B model, and
    any retrained or swapped checkpoint changes it) and its weights record (see the module
    docstring) of the same samples."""
    params = list(model.named_parameters())
    host = host_samples([p for _, p in params], samples_per_tensor)
    exact = hashlib.sha256()
    layout = hashlib.sha256()
    tensors = []
    for (name, p), sample in zip(params, host):
        exact.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        exact.update(sample.numpy().tobytes())
        layout.update(f"{name}:{tuple(p.shape)};".encode())
        casts = ({key: _digest(sample.to(dtype)) for key, dtype in _HASHED.items()} if p.is_floating_point()
                 else {"exact": _digest(sample)})
        tensors.append([str(p.dtype), casts])
    record = dict(layout=layout.hexdigest(), tensors=tensors)
    return WeightsIdentity(exact.hexdigest(), record)


def same_weights(theirs: Optional[Dict], ours: Dict) -> Optional[bool]:
    """Whether two weights records describe the same weights: the same parameter names and
    shapes, and each parameter's sample equal once both are cast to the coarser of their two
    dtypes (float32 for float32 against float64). None when ``theirs`` is not such a record
    (files written before pyinf kept one: only the exact fingerprint can tell)."""
    if not isinstance(theirs, dict) or not {"layout", "tensors"} <= theirs.keys():
        return None
    if theirs["layout"] != ours["layout"] or len(theirs["tensors"]) != len(ours["tensors"]):
        return False
    for (dt_a, casts_a), (dt_b, casts_b) in zip(theirs["tensors"], ours["tensors"]):
        if dt_a not in _COARSENESS or dt_b not in _COARSENESS:  # not floating point: exactly equal
            if dt_a != dt_b or casts_a != casts_b:
                return False
            continue
        coarse = max(dt_a, dt_b, key=_COARSENESS.__getitem__)
        key = "torch.float32" if coarse == "torch.float64" else coarse
        if casts_a.get(key) is None or casts_a.get(key) != casts_b.get(key):
            return False
    return True


def _digest(t: torch.Tensor) -> str:
    raw = t.view(torch.int16) if t.dtype in (torch.float16, torch.bfloat16) else t
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()[:16]


def host_samples(params: List[torch.Tensor], samples_per_tensor: int) -> List[torch.Tensor]:
    """Each parameter's strided sample as float32 on the host, with one copy per device (a
    copy per parameter would wait on the device each time)."""
    samples = []
    for p in params:
        flat = p.detach().reshape(-1)
        samples.append(flat[::max(1, flat.numel() // samples_per_tensor)].float())
    host: List[Optional[torch.Tensor]] = [None] * len(samples)
    by_device: Dict[torch.device, List[int]] = {}
    for i, sample in enumerate(samples):
        by_device.setdefault(sample.device, []).append(i)
    for idx in by_device.values():
        joined = torch.cat([samples[i] for i in idx]).cpu()
        for i, part in zip(idx, joined.split([samples[i].numel() for i in idx])):
            host[i] = part
    return host
