"""Query preparation: each query's measurement gradient per tracked layer, preconditioned
by the EK-FAC inverse ``P = H^-1 grad_q``, then truncated to rank r as ``P ~ L R^T`` so that
one pass over the training data serves every query (DESIGN.md section 1, step 6)."""
from __future__ import annotations

import hashlib
import json
import numbers
import warnings
from typing import Dict, Optional

import torch

from . import storage
from .factors import Factors, check_same_modules
from .modules import ModuleSpec
from .progress import bar
from .runner import eval_mode, run_pass


def _is_position(i) -> bool:
    return isinstance(i, numbers.Integral) and not isinstance(i, bool)


class Queries:
    """Preconditioned query gradients of every tracked layer: ``left [Q, d_out, r]`` and
    ``right [Q, d_in, r]`` per module (``rank=None``: ``dense [Q, d_out, d_in]``), the damping
    used, and the id of the factors they were made with."""

    KIND = "queries"

    def __init__(self, specs: Dict[str, ModuleSpec], tensors: Dict[str, Dict[str, torch.Tensor]], meta: Dict):
        self.specs = specs
        self.tensors = tensors
        self.meta = meta
        self._fingerprint: Optional[str] = None

    @property
    def rank(self) -> Optional[int]:
        return self.meta["rank"]

    @property
    def n_queries(self) -> int:
        return self.meta["n_queries"]

    @property
    def factors_id(self) -> str:
        return self.meta["factors_id"]

    @property
    def damping(self) -> Dict[str, float]:
        return self.meta["damping"]

    @property
    def measurements(self) -> torch.Tensor:
        """Each query's measurement (for CausalLMTask, the completion's -log p in nats)."""
        return torch.tensor(self.meta["measurements"], dtype=torch.float64)

    @property
    def self_influence(self) -> torch.Tensor:
        """``grad_q^T H^-1 grad_q`` per query (full rank, before truncation)."""
        return torch.tensor(self.meta["self_influence"], dtype=torch.float64)

    @property
    def module_names(self):
        return list(self.specs)

    @property
    def fingerprint(self) -> str:
        """SHA-256 over every query tensor's bytes and the settings that shaped them: two
        Queries score alike exactly when their fingerprints match (what resumable, sharded
        scoring checks before it reuses scores computed in another run)."""
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps(dict(rank=self.rank, factors_id=self.factors_id, damping=self.damping),
                                          sort_keys=True).encode())
            for name in sorted(self.tensors):
                for field in sorted(self.tensors[name]):
                    h.update(f"{name}::{field}".encode())
                    storage.hash_tensor(h, self.tensors[name][field])
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def __repr__(self) -> str:
        return f"Queries({self.n_queries} queries, rank={self.rank}, {len(self.specs)} modules)"

    def is_dense(self, name: str) -> bool:
        return "dense" in self.tensors[name]

    def dense_matrix(self, name: str) -> torch.Tensor:
        """``P_q`` of module `name` as ``[Q, d_out, d_in]`` (``L R^T`` for low-rank queries)."""
        t = self.tensors[name]
        return t["dense"] if "dense" in t else t["left"] @ t["right"].transpose(1, 2)

    def check_model(self, specs: Dict[str, ModuleSpec]) -> None:
        check_same_modules(self.specs, specs, what="these queries")

    def check_factors(self, factors: Factors) -> None:
        if factors.id != self.factors_id:
            raise ValueError(f"these queries were prepared with factors {self.factors_id}, not with the given "
                             f"factors {factors.id}; prepare them again with these factors")

    def to(self, device) -> "Queries":
        """The same queries with their tensors on ``device`` (for many scoring calls in a row,
        such as the chunks of :func:`pyinf.score_corpus`, which then copy them there once)."""
        moved = Queries(self.specs, {n: {k: v.to(device) for k, v in d.items()} for n, d in self.tensors.items()},
                        dict(self.meta))
        moved._fingerprint = self._fingerprint
        return moved

    def select(self, index) -> "Queries":
        """The queries at ``index`` (a range, a list, a numpy array or a 1-D tensor of
        positions), in that order."""
        idx = list(index.tolist() if hasattr(index, "tolist") else index)
        if not idx or not all(_is_position(i) and 0 <= i < self.n_queries for i in idx):
            raise ValueError(f"query positions must be a non-empty list in 0..{self.n_queries - 1}, got {idx!r}")
        idx = [int(i) for i in idx]
        tensors = {n: {k: v[idx] for k, v in d.items()} for n, d in self.tensors.items()}
        meta = dict(self.meta, n_queries=len(idx))
        for key in ("measurements", "self_influence"):
            if meta.get(key) is not None:
                meta[key] = [meta[key][i] for i in idx]
        return Queries(self.specs, tensors, meta)

    def bytes_per_query(self) -> int:
        """Bytes of query tensors per query, over all modules (what scoring keeps on the device)."""
        return sum(v[0].numel() * v.element_size() for d in self.tensors.values() for v in d.values())

    def save(self, path):
        flat = {f"{n}::{k}": v for n, d in self.tensors.items() for k, v in d.items()}
        meta = dict(self.meta, modules=[s.to_dict() for s in self.specs.values()])
        return storage.save(path, self.KIND, flat, meta)

    @classmethod
    def load(cls, path, factors: Optional[Factors] = None) -> "Queries":
        flat, meta = storage.load(path, cls.KIND)
        specs = {d["name"]: ModuleSpec(**d) for d in meta.pop("modules")}
        tensors: Dict[str, Dict[str, torch.Tensor]] = {n: {} for n in specs}
        for key, value in flat.items():
            name, _, field = key.rpartition("::")
            if name not in tensors:
                raise storage.CorruptFileError(f"{path}: tensor {key!r} names no module of the file")
            tensors[name][field] = value
        for name, d in tensors.items():
            if not ({"left", "right"} <= set(d) or "dense" in d):
                raise storage.CorruptFileError(f"{path}: module {name!r} lacks its query tensors")
        queries = cls(specs, tensors, meta)
        if factors is not None:
            queries.check_factors(factors)
        return queries


def low_rank(p: torch.Tensor, rank: int, svd: str = "full"):
    """Truncated SVD of ``p [Q, d_out, d_in]``: ``L [Q, d_out, r]`` with the singular values
    folded in, ``R [Q, d_in, r]``; ``r = min(rank, d_out, d_in)``.

    ``svd="full"`` is exact; ``"randomized"`` (Halko et al. 2011: a Gaussian sketch with 10
    extra columns and 2 power iterations, then a small exact SVD) costs a few GEMMs instead of
    a full decomposition per query and layer, which matters for wide layers on a GPU, where
    batched full SVDs of 3072 x 769 matrices take tens of milliseconds each. kronfluence's
    default truncation is randomized too (``torch.svd_lowrank(q=rank)``), but without the
    extra columns, and much less exact."""
    r = min(rank, p.shape[-1], p.shape[-2])
    if svd == "randomized" and r + 10 < min(p.shape[-2:]):
        u, s, vh = _randomized_svd(p, r, oversample=10, power_iterations=2)
    elif svd in ("full", "randomized"):
        u, s, vh = torch.linalg.svd(p, full_matrices=False)
    else:
        raise ValueError(f"svd must be 'full' or 'randomized', got {svd!r}")
    return u[..., :r] * s[..., None, :r], vh[..., :r, :].transpose(-1, -2)


def _randomized_svd(p: torch.Tensor, r: int, *, oversample: int, power_iterations: int):
    k = r + oversample
    sketch = torch.randn(p.shape[:-2] + (p.shape[-1], k), dtype=p.dtype, device=p.device,
                         generator=torch.Generator(p.device).manual_seed(0))
    y = p @ sketch  # [Q, d_out, k]
    for _ in range(power_iterations):  # sharpen the spectrum; QR keeps it well conditioned
        y, _ = torch.linalg.qr(y)
        y, _ = torch.linalg.qr(p.transpose(-1, -2) @ y)
        y = p @ y
    basis, _ = torch.linalg.qr(y)  # [Q, d_out, k]
    u_small, s, vh = torch.linalg.svd(basis.transpose(-1, -2) @ p, full_matrices=False)
    return basis @ u_small, s, vh


def _consistent_per_example(task):
    """``task.compute_measurement_per_example``, unless the measurement was redefined below the
    class that defines it: a ``CausalLMTask`` subclass that overrides ``compute_measurement``
    (or ``compute_train_loss``, which it calls) inherits a per-example method that still
    computes the summed cross-entropy, and its gradient would be the wrong one. Such a task
    gets the other path (the batch's ``compute_measurement``, and per-query values from one
    more gradient-free pass)."""
    name = "compute_measurement_per_example"
    if getattr(task, name, None) is None:
        return None

    def owner(attr):  # the instance, or the most derived class that defines attr
        if attr in getattr(task, "__dict__", {}):
            return task
        return next((c for c in type(task).__mro__ if attr in vars(c)), None)

    mine = owner(name)
    if isinstance(mine, type):
        mro = type(task).__mro__
        for dep in ("compute_measurement", "compute_train_loss"):
            theirs = owner(dep)
            # redefined on the instance, or by a class that comes before it in the MRO (a
            # subclass, or a mixin listed first): the per-example method predates it
            if theirs is task or (isinstance(theirs, type) and mro.index(theirs) < mro.index(mine)):
                return None
    return getattr(task, name)


class _MeasurementObjective:
    """The query pass's objective: the batch's summed measurement. When the task has
    ``compute_measurement_per_example``, each query's own value is kept from the same forward
    (no second pass over the queries)."""

    def __init__(self, task):
        self.task = task
        self.per_example = _consistent_per_example(task)
        self.n_docs = 0
        self.kept: list = []
        self.complete = self.per_example is not None

    def __call__(self, batch, model):
        values = self.per_example(batch, model) if self.complete else None
        if values is None:
            self.complete = False
            return self.task.compute_measurement(batch, model)
        if not isinstance(values, torch.Tensor) or values.shape != (self.n_docs,):
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"{type(self.task).__name__}.compute_measurement_per_example must return one value per "
                             f"example ([{self.n_docs}] for this batch), got {shape}")
        self.kept.append(values.detach())
        return values.sum()

    def values(self):
        """Every query's measurement in order, or None when the task gave batch sums only."""
        return torch.cat(self.kept).double().cpu().tolist() if self.complete and self.kept else None


def per_example_measurements(model, task, loader, progress=None) -> list:
    """Each query's own measurement (e.g. the completion's -log p), one example at a time,
    without gradients: the task returns batch sums, so this is how per-query values come out."""
    from .data import to_device

    device = next(model.parameters()).device
    collate = loader.collate_fn
    order = _query_order(loader)
    values = []
    with eval_mode(model), torch.no_grad():
        for i in bar(order, desc="pyinf: query measurements", total=len(order), progress=progress):
            batch = to_device(collate([loader.dataset[i]]), device)
            values.append(float(task.compute_measurement(batch, model)))
    return values


def _query_order(loader) -> list:
    """The dataset indices in the order the loader yields them (its sampler: the order of the
    query gradients, so each measurement stays with its own query). The loader must read in a
    fixed order (prepare_queries makes it so: see _fixed_order)."""
    if isinstance(loader.dataset, torch.utils.data.IterableDataset):
        raise ValueError("per-query measurements of a task without compute_measurement_per_example read the "
                         "queries one at a time by index: give a map-style Dataset of queries")
    if loader.batch_sampler is not None:
        return [i for batch in loader.batch_sampler for i in batch]
    return list(loader.sampler)


def _fixed_order(loader):
    """The loader with its batches drawn once and kept: a shuffling sampler draws a new order on
    every pass, and the measurements (a second pass) must follow the gradients' order. The
    user's batches, collate function and workers are kept."""
    from torch.utils.data import DataLoader, IterableDataset

    from .data import in_order

    if isinstance(loader.dataset, IterableDataset) or loader.batch_sampler is None or in_order(loader):
        return loader  # nothing to draw, or already the same order every time
    batches = [list(b) for b in loader.batch_sampler]
    return DataLoader(loader.dataset, batch_sampler=batches, collate_fn=loader.collate_fn,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory)


def prepare_queries(model, task, modules, specs, loader, factors: Factors, *, rank: Optional[int],
                    damping: Optional[float], svd: str, progress) -> Queries:
    factors.check_model(specs)
    if svd not in ("full", "randomized"):
        raise ValueError(f"svd must be 'full' or 'randomized', got {svd!r}")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"rank must be a positive integer or None (full rank), got {rank!r}")
    damping_by_module = {n: factors[n].damping(damping) for n in modules}
    loader = _fixed_order(loader)  # the gradient pass and the measurements in one order
    device = next(model.parameters()).device
    # the tracked layers' only; on the host if they would crowd the GPU (each call copies them)
    on_device = factors.subset(specs).preconditioners_on(device, what="prepare_queries").modules
    parts: Dict[str, Dict[str, list]] = {n: {} for n in modules}
    self_terms: list = []  # per batch: grad_q^T H^-1 grad_q summed over modules, [B]

    called: set = set()  # the modules the current batch ran

    def consume(spec, acts, grads, mask):
        called.add(spec.name)
        f = on_device[spec.name]
        dtype = f.q_a.dtype
        if mask is not None:
            m = mask.unsqueeze(-1)
            acts = torch.where(m, acts, acts.new_zeros(()))
            grads = torch.where(m, grads, grads.new_zeros(()))
        # Per-query gradients of the measurement (queries are few: dense is fine here).
        dw = grads.to(dtype).transpose(1, 2) @ acts.to(dtype)  # [B, d_out, d_in]
        p = f.inverse_hvp(dw, damping_by_module[spec.name])
        term = (p * dw).sum((1, 2))
        self_terms[-1] = term if self_terms[-1] is None else self_terms[-1] + term
        if rank is None:
            parts[spec.name].setdefault("dense", []).append(p.cpu())
        else:
            left, right = low_rank(p, rank, svd)
            parts[spec.name].setdefault("left", []).append(left.contiguous().cpu())
            parts[spec.name].setdefault("right", []).append(right.contiguous().cpu())

    objective = _MeasurementObjective(task)

    def on_start(batch_index, first, n_docs, mask):
        self_terms.append(None)
        called.clear()
        objective.n_docs = n_docs

    def on_end(batch_index, first, n_docs, mask):
        # a layer this batch never ran (an expert no token of these queries was routed to):
        # their gradients there are 0
        for name in modules:
            if name not in called:
                f = on_device[name]
                d_out, d_in = f.q_s.shape[0], f.q_a.shape[0]
                if rank is None:
                    parts[name].setdefault("dense", []).append(torch.zeros(n_docs, d_out, d_in, dtype=f.q_a.dtype))
                else:
                    r = min(rank, d_out, d_in)
                    parts[name].setdefault("left", []).append(torch.zeros(n_docs, d_out, r, dtype=f.q_a.dtype))
                    parts[name].setdefault("right", []).append(torch.zeros(n_docs, d_in, r, dtype=f.q_a.dtype))
        if self_terms[-1] is None:  # no tracked layer ran at all
            self_terms[-1] = torch.zeros(n_docs)

    n_queries = run_pass(model, task, modules, specs, loader, objective=objective, consumer=consume,
                         desc="pyinf: queries", progress=progress, on_batch_start=on_start, on_batch_end=on_end)
    measurements = objective.values()
    if measurements is None:  # the task gives batch sums only
        measurements = per_example_measurements(model, task, loader, progress)
    tensors = {n: {k: torch.cat(v) for k, v in d.items()} for n, d in parts.items()}
    for n, d in tensors.items():
        if not d or next(iter(d.values())).shape[0] != n_queries:
            raise RuntimeError(f"module {n!r} did not receive a gradient for every query")
    self_influence = torch.cat([t.cpu() for t in self_terms]).tolist()
    # grad^T H^-1 grad is 0 only for a zero gradient (H^-1 is positive definite)
    empty = [i for i, v in enumerate(self_influence) if v == 0.0]
    if empty:
        warnings.warn(f"pyinf: queries {empty[:10]}{' ...' if len(empty) > 10 else ''} have a zero gradient in the "
                      f"tracked layers (no token carries a loss: every label -100?): every score against them is 0",
                      stacklevel=3)
    meta = dict(rank=rank, svd=svd, n_queries=n_queries, factors_id=factors.id, damping=damping_by_module,
                damping_arg=None if damping is None else float(damping),
                self_influence=self_influence, measurements=measurements)
    return Queries(dict(specs), tensors, meta)
