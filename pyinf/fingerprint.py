"""Which weights a result was made with.

Two records of a model's weights, taken from one strided sample of every parameter:

- the **fingerprint**, a SHA-256 over every parameter's name, shape, dtype and sampled values:
  exact. A resumable run (:mod:`pyinf.corpus`, :mod:`pyinf.staged_fit`) continues only with
  the very model it started with, dtype included, since a bf16 model's scores are not its
  fp32 copy's.
- the **weights record**, a few sampled values per parameter kept as they are, with the
  names, shapes and dtypes. Factors and queries carry it, so that using them with another
  model warns (:func:`same_weights`) while the same checkpoint in another dtype (factors fit
  in float32, scores in bf16) is recognised as the same weights: its values agree within
  the lower precision's rounding, which no hash can tell.
"""
from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch

# Unit roundoff of each floating dtype a model may be cast to: a cast moves a value by at most
# this times its magnitude (below the smallest normal, by at most half the smallest subnormal).
_ROUNDOFF = {"torch.float64": 2.0 ** -53, "torch.float32": 2.0 ** -24, "torch.bfloat16": 2.0 ** -8,
             "torch.float16": 2.0 ** -11}
_SMALLEST_SUBNORMAL = {"torch.float64": 5e-324, "torch.float32": 1.4e-45, "torch.bfloat16": 9.2e-41,
                       "torch.float16": 6.0e-8}


@dataclass(frozen=True)
class WeightsIdentity:
    fingerprint: str  # exact (hex SHA-256)
    record: Dict      # names' and shapes' hash, dtypes, a few values per parameter (JSON-able)


def weights_identity(model: torch.nn.Module, samples_per_tensor: int = 4096,
                     record_values: int = 4096) -> WeightsIdentity:
    """The model's fingerprint (every parameter's name, shape, dtype and an evenly strided
    sample of ``samples_per_tensor`` of its values: cheap for a 7B model, and any retrained or
    swapped checkpoint changes it) and its weights record (about ``record_values`` of those
    samples in all, at least one per parameter, as float32)."""
    params = list(model.named_parameters())
    host = _host_samples([p for _, p in params], samples_per_tensor)
    exact = hashlib.sha256()
    layout = hashlib.sha256()
    per_tensor = max(1, record_values // max(1, len(params)))
    kept: List[np.ndarray] = []
    for (name, p), sample in zip(params, host):
        exact.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        exact.update(sample.tobytes())
        layout.update(f"{name}:{tuple(p.shape)};".encode())
        kept.append(sample[::max(1, sample.size // per_tensor)][:per_tensor])
    record = dict(layout=layout.hexdigest(), dtypes=[str(p.dtype) for _, p in params],
                  counts=[int(k.size) for k in kept],
                  values=base64.b64encode(np.concatenate(kept).astype("<f4").tobytes()).decode("ascii"))
    return WeightsIdentity(exact.hexdigest(), record)


def model_fingerprint(model: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """The exact fingerprint of :func:`weights_identity`."""
    return weights_identity(model, samples_per_tensor).fingerprint


def same_weights(theirs: Optional[Dict], ours: Dict) -> Optional[bool]:
    """Whether two weights records describe the same weights: the same parameter names and
    shapes, and values that differ by no more than a cast to the lower of the two dtypes
    (per parameter) moves them. None when ``theirs`` is not a weights record (files written
    before pyinf kept one)."""
    if not isinstance(theirs, dict) or not {"layout", "dtypes", "counts", "values"} <= theirs.keys():
        return None
    if theirs["layout"] != ours["layout"] or theirs["counts"] != ours["counts"]:
        return False
    try:
        a = np.frombuffer(base64.b64decode(theirs["values"]), dtype="<f4").astype(np.float64)
    except (ValueError, TypeError):
        return None
    b = np.frombuffer(base64.b64decode(ours["values"]), dtype="<f4").astype(np.float64)
    if a.shape != b.shape:
        return False
    start = 0
    for count, dt_a, dt_b in zip(ours["counts"], theirs["dtypes"], ours["dtypes"]):
        x, y = a[start:start + count], b[start:start + count]
        start += count
        u = max(_ROUNDOFF.get(dt_a, 0.0), _ROUNDOFF.get(dt_b, 0.0))
        tiny = max(_SMALLEST_SUBNORMAL.get(dt_a, 0.0), _SMALLEST_SUBNORMAL.get(dt_b, 0.0))
        # both sides went through at most one cast from a common source; the float32 record
        # adds its own rounding (2^-24) to each
        bound = (2 * u + 2.0 ** -23) * np.maximum(np.abs(x), np.abs(y)) + tiny
        same_nan = np.isnan(x) & np.isnan(y)
        if not np.all(same_nan | (np.abs(x - y) <= bound) | (x == y)):
            return False
    return True


def _host_samples(params: List[torch.Tensor], samples_per_tensor: int) -> List[np.ndarray]:
    """Each parameter's strided sample as float32 on the host, with one copy per device (a
    copy per parameter would wait on the device each time)."""
    samples = []
    for p in params:
        flat = p.detach().reshape(-1)
        samples.append(flat[::max(1, flat.numel() // samples_per_tensor)].float())
    host: List[Optional[np.ndarray]] = [None] * len(samples)
    by_device: Dict[torch.device, List[int]] = {}
    for i, sample in enumerate(samples):
        by_device.setdefault(sample.device, []).append(i)
    for idx in by_device.values():
        joined = torch.cat([samples[i] for i in idx]).cpu()
        for i, part in zip(idx, joined.split([samples[i].numel() for i in idx])):
            host[i] = part.numpy()
    return host
