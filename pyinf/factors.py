"""EK-FAC factors: per tracked layer, the covariances ``A = E[a a^T]`` and ``S = E[g g^T]``
over non-padding tokens, their eigenbases (eigh in float64), and the eigenvalue
correction ``Lambda = E_n[(Q_S^T DW_n Q_A)^2]`` over documents (DESIGN.md section 1)."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import numbers
import time
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from . import ops, storage
from .eigen import eigendecompose, resolve_workers
from .fingerprint import host_samples
from .modules import ModuleSpec
from .ops._checks import check_damping
from .runner import run_pass

HEURISTIC_DAMPING_SCALE = 0.1


@dataclass
class ModuleFactors:
    spec: ModuleSpec
    a_cov: Optional[torch.Tensor]  # [d_in, d_in]   E[a a^T] over tokens (None: loaded without, see Factors.load)
    s_cov: Optional[torch.Tensor]  # [d_out, d_out] E[g g^T] over tokens
    a_eigvals: torch.Tensor   # [d_in]
    q_a: torch.Tensor         # [d_in, d_in]   columns are eigenvectors of a_cov
    s_eigvals: torch.Tensor   # [d_out]
    q_s: torch.Tensor         # [d_out, d_out]
    lambdas: torch.Tensor     # [d_out, d_in]  E_n[(Q_S^T DW_n Q_A)^2]

    def damping(self, damping: Optional[float] = None) -> float:
        """The damping to use: `damping` when given, else 0.1 x mean(Lambda). Refused where the
        damped inverse ``1 / (Lambda + damping)`` would not exist (a NaN or infinite score
        otherwise, or a failed SVD of the query gradient), naming the module."""
        name = self.spec.name
        if damping is not None:
            damping = check_damping("", damping)
        lambdas = self.lambdas.double()
        low, high = torch.aminmax(lambdas)
        if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
            raise ValueError(f"module {name!r}: its eigenvalue correction Lambda holds NaN or infinite values "
                             f"(factors fitted from non-finite gradients, or damaged)")
        if damping is None:
            damping = HEURISTIC_DAMPING_SCALE * float(lambdas.mean())
        if float(low) + damping <= 0:
            zero = int((self.lambdas == 0).sum())
            why = ("every entry is 0: the fit saw no gradient for this layer (no token with a loss: every label "
                   "-100, or documents of one token?)" if float(high) == 0 else
                   f"{zero} of {self.lambdas.numel()} entries are 0 (directions the fit's gradients never took)")
            raise ValueError(f"module {name!r}: Lambda + damping is 0 in some directions, so the damped inverse does "
                             f"not exist (damping {damping:g}; Lambda: {why}); give a positive damping")
        return damping

    def inverse_hvp(self, v: torch.Tensor, damping: float) -> torch.Tensor:
        """``H^-1 V = Q_S [(Q_S^T V Q_A) / (Lambda + damping)] Q_A^T`` for ``v [..., d_out, d_in]``,
        computed in the factors' dtype."""
        q_a, q_s = self.q_a.to(v.device), self.q_s.to(v.device)
        v = v.to(q_a.dtype)
        rotated = q_s.T @ v @ q_a
        rotated = rotated / (self.lambdas.to(v.device) + damping)
        return q_s @ rotated @ q_a.T


_FIELDS = ("a_cov", "s_cov", "a_eigvals", "q_a", "s_eigvals", "q_s", "lambdas")
# what preconditioning (prepare, self-influence) reads; the covariances only the fit does
_PRECONDITIONER_FIELDS = ("a_eigvals", "q_a", "s_eigvals", "q_s", "lambdas")


class _FactorsIdentity:
    """What factors are, without their tensors: an id, settings (``meta``) and layers (``specs``);
    shared by :class:`Factors` and :class:`FactorsHeader`."""

    meta: Dict
    specs: Dict[str, ModuleSpec]

    @property
    def id(self) -> str:
        return self.meta["id"]

    @property
    def module_names(self):
        return list(self.specs)

    def check_model(self, specs: Dict[str, ModuleSpec]) -> None:
        """Raises unless these factors hold every tracked layer, with its shape. Factors of
        more layers serve any subset of them: EK-FAC's blocks are per layer, so a layer's
        factors (and its default damping) do not depend on which others were fitted."""
        check_same_modules({n: s for n, s in self.specs.items() if n in specs}, specs, what="these factors")


class Factors(_FactorsIdentity):
    """EK-FAC factors of every tracked layer, with ``save(path)`` / ``Factors.load(path)``."""

    KIND = "factors"

    def __init__(self, modules: Dict[str, ModuleFactors], meta: Dict):
        self.modules = modules
        self.meta = meta
        self._placed_for: Optional[torch.device] = None  # set by preconditioners_on on what it returns

    @property
    def specs(self) -> Dict[str, ModuleSpec]:
        return {n: m.spec for n, m in self.modules.items()}

    def __getitem__(self, name: str) -> ModuleFactors:
        return self.modules[name]

    def __repr__(self) -> str:
        return (f"Factors({len(self.modules)} modules, fisher={self.meta.get('fisher')}, "
                f"examples={self.meta.get('n_examples')})")

    def subset(self, names) -> "Factors":
        """The factors of these layers only (the same id: each layer's factors are its own),
        placed where these are (:meth:`preconditioners_on`)."""
        sub = Factors({n: self.modules[n] for n in names}, dict(self.meta))
        sub._placed_for = self._placed_for
        return sub

    def to(self, device) -> "Factors":
        moved = {n: ModuleFactors(m.spec, *[None if getattr(m, f) is None else getattr(m, f).to(device)
                                            for f in _FIELDS])
                 for n, m in self.modules.items()}
        return Factors(moved, dict(self.meta))

    def preconditioners_on(self, device, *, what: str) -> "Factors":
        """These factors with the eigenbases, eigenvalues and Lambda on ``device`` (the
        passes after a fit read nothing else; the covariances stay where they are). On a GPU
        whose free memory they would take more than half of (a 7B model's MLPs: ~70 GB in
        float32), they stay on the host and each batch copies each layer's over as it is used:
        slower (PCIe), but the pass runs; ``what`` names the pass in the warning."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())  # "cuda" is where "cuda:0" is
        if self._placed_for == device:  # placed (or kept on the host) for this device already
            return self
        fields = [getattr(m, f) for m in self.modules.values() for f in _PRECONDITIONER_FIELDS]
        if all(t.device == device for t in fields):
            return self
        if device.type == "cuda":
            need = sum(t.numel() * t.element_size() for t in fields if t.device != device)
            free, _ = torch.cuda.mem_get_info(device)
            if need > free // 2:
                warnings.warn(f"pyinf {what}: the factors' eigenbases and Lambda ({need / 2**30:.1f} GiB) would take "
                              f"more than half of the GPU's free memory ({free / 2**30:.1f} GiB): they stay on the "
                              f"host and every batch copies each layer's to the GPU (slow); track fewer layers per "
                              f"run to keep them there", stacklevel=3)
                kept = Factors(dict(self.modules), dict(self.meta))
                kept._placed_for = device  # a later pass over the same factors does not ask (or warn) again
                return kept
        placed = Factors({n: dataclasses.replace(m, **{f: getattr(m, f).to(device) for f in _PRECONDITIONER_FIELDS})
                          for n, m in self.modules.items()}, dict(self.meta))
        placed._placed_for = device
        return placed

    @classmethod
    def merge(cls, parts: Sequence["Factors"]) -> "Factors":
        """One set of factors from fits of disjoint groups of layers (``fit --track``, one group
        per run, when all the layers' covariance sums would not fit on the GPU at once: a 7B
        model's MLPs need ~106 GB of float64 sums). EK-FAC's blocks are per layer, so the
        merge is what one fit of every layer gives, if the parts were fitted on the same data
        with the same settings: their fisher, seed, dtype, examples and model are checked, and,
        for fits that record their inputs (the CLI's and :func:`pyinf.fit_factors_staged`'s),
        the data's hash, the tokenisation and the shards (a difference is an error naming it).
        The id is computed as a fit's, from the merged layers and settings. Saved parts too
        large to hold at once merge file to file with :meth:`merge_files`."""
        parts = list(parts)
        if not parts or not all(isinstance(p, Factors) for p in parts):
            raise TypeError(f"Factors.merge: a non-empty sequence of Factors expected, got "
                            f"{[type(p).__name__ for p in parts] or 'none'}")
        meta = _merged_meta(parts, "Factors.merge")
        modules = {n: m for part in parts for n, m in part.modules.items()}
        return cls(modules, dict(meta, id=content_id(modules, meta)))

    @staticmethod
    def merge_files(paths: Sequence, out) -> "FactorsHeader":
        """:meth:`merge` of saved factors into the file ``out``, one tensor in memory at a time
        (a 7B model's MLP factors are ~123 GB): the same checks, tensors, metadata and id as
        ``Factors.merge([Factors.load(p) for p in paths]).save(out)``. Every tensor is checked
        against its part's checksum as it is read; a damaged part stops the merge and leaves
        nothing at ``out``. The eigenbases and Lambda are read twice (once for the id's
        samples, once to copy): ~43% more reading than one pass. Returns the merged header."""
        if not paths:
            raise TypeError("Factors.merge_files: no factors files given")
        with contextlib.ExitStack() as files:
            opened = [files.enter_context(storage.reading(p, Factors.KIND)) for p in paths]
            parts = [Factors._header(dict(meta)) for meta, _ in opened]
            meta = _merged_meta(parts, "Factors.merge_files")
            source = {f"{n}::{f}": i for i, part in enumerate(parts) for n in part.specs for f in _FIELDS}
            missing = [k for k, i in source.items() if k not in opened[i][0]["crc32"]]
            if missing:
                raise storage.CorruptFileError(f"{paths[source[missing[0]]]}: missing tensor {missing[0]!r}")

            def read(key: str) -> torch.Tensor:
                return opened[source[key]][1](key)

            specs = {n: s for part in parts for n, s in part.specs.items()}
            meta["id"] = _content_hash(meta, ((f"{n}.{f}", host_samples([read(f"{n}::{f}")], _ID_SAMPLES)[0])
                                              for n in specs for f in _ID_FIELDS))
            layout = {}
            for key, i in source.items():
                if "layout" in opened[i][0]:
                    dtype, shape = opened[i][0]["layout"][key]
                    dtype = getattr(torch, dtype)
                else:  # a file saved before pyinf recorded its tensors' layout
                    t = read(key)
                    dtype, shape = t.dtype, t.shape
                layout[key] = (dtype, tuple(shape), opened[i][0]["crc32"][key])
            storage.save_streamed(out, Factors.KIND, layout, read,  # read: checked against these checksums
                                  dict(meta, modules=[s.to_dict() for s in specs.values()]), checked=True)
        return FactorsHeader(specs, meta)

    def save(self, path):
        if any(m.a_cov is None or m.s_cov is None for m in self.modules.values()):
            raise ValueError("these factors were loaded without their covariances (Factors.load(covariances=False)): "
                             "load them whole to save them")
        tensors = {f"{n}::{f}": getattr(m, f) for n, m in self.modules.items() for f in _FIELDS}
        meta = dict(self.meta, modules=[m.spec.to_dict() for m in self.modules.values()])
        return storage.save(path, self.KIND, tensors, meta)

    @staticmethod
    def load_header(path) -> "FactorsHeader":
        """What a factors file says of itself (id, settings, layers), from its header: no tensor
        is read (a 7B model's factors are ~120 GB), so nothing is checksummed but the header.
        Enough where only the id is checked, as for queries prepared from these factors."""
        return Factors._header(storage.load_meta(path, Factors.KIND))

    @staticmethod
    def _header(meta: Dict) -> "FactorsHeader":
        specs = {d["name"]: ModuleSpec(**d) for d in meta.pop("modules")}
        return FactorsHeader(specs, meta)

    @classmethod
    def load(cls, path, *, covariances: bool = True, modules: Optional[Sequence[str]] = None) -> "Factors":
        """The factors saved at ``path``, every tensor read checked. ``covariances=False`` leaves
        out ``a_cov`` and ``s_cov`` (None), which only the fit reads: 43% of a file less to read
        and hold for preparing queries or self-influence (a 7B model's MLPs: ~53 of ~123 GB);
        ``modules``: only these layers (each must be in the file)."""
        if modules is not None:
            have = {d["name"] for d in storage.load_meta(path, cls.KIND)["modules"]}
            absent = [n for n in modules if n not in have]
            if absent:
                raise ValueError(f"{path} holds no factors for {absent[:5]}")
        wanted = None if modules is None else set(modules)
        skipped = () if covariances else ("a_cov", "s_cov")

        def read(key: str) -> bool:
            name, _, field = key.rpartition("::")
            return (wanted is None or name in wanted) and field not in skipped

        tensors, meta = storage.load(path, cls.KIND, keys=read)
        loaded = {}
        for d in meta["modules"]:
            spec = ModuleSpec(**d)
            if wanted is not None and spec.name not in wanted:
                continue
            try:
                fields = [None if f in skipped else tensors[f"{spec.name}::{f}"] for f in _FIELDS]
            except KeyError as exc:
                raise storage.CorruptFileError(f"{path}: missing tensor {exc}") from None
            mf = ModuleFactors(spec, *fields)
            if tuple(mf.lambdas.shape) != (spec.d_out, spec.d_in):
                raise storage.CorruptFileError(f"{path}: module {spec.name!r} has Lambda of shape "
                                               f"{tuple(mf.lambdas.shape)}, expected {(spec.d_out, spec.d_in)}")
            loaded[spec.name] = mf
        meta.pop("modules")
        return cls(loaded, meta)


@dataclass
class FactorsHeader(_FactorsIdentity):
    """A factors file's id, settings and layers without its tensors (:meth:`Factors.load_header`)."""
    specs: Dict[str, ModuleSpec]
    meta: Dict


def _short(value) -> str:
    """A setting in an error message: its repr, cut where long (a list of data hashes)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_same_modules(have: Dict[str, ModuleSpec], want: Dict[str, ModuleSpec], *, what: str) -> None:
    missing = [n for n in want if n not in have]
    extra = [n for n in have if n not in want]
    if missing or extra:
        raise ValueError(f"{what} do not match the model's tracked modules: missing {missing[:5]}, "
                         f"not tracked in the model {extra[:5]}")
    for n, spec in want.items():
        h = have[n]
        if (h.d_out, h.d_in, h.has_bias) != (spec.d_out, spec.d_in, spec.has_bias):
            raise ValueError(f"{what} do not match the model: module {n!r} is {spec.d_out}x{spec.d_in} "
                             f"(bias={spec.has_bias}) in the model but {h.d_out}x{h.d_in} (bias={h.has_bias}) in "
                             f"{what}")


def factor_dtype(model: nn.Module) -> torch.dtype:
    """Factors are kept in float32, or float64 for a float64 model (exact-math checks)."""
    p = next(model.parameters(), None)
    return torch.float64 if p is not None and p.dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int):
    """A pass's random draws (true-Fisher labels) from ``seed``, leaving the caller's RNG as it was.

    ``torch.manual_seed`` seeds the CPU and every GPU, so every GPU's state is kept and given
    back, not only the model's. These generators are the process's: passes that overlap in
    threads (shards of one fit in one process) draw from each other's seeds, so a sharded
    true-Fisher fit is reproducible when its shards are processes, as the CLI runs them."""
    if device.type != "cuda":  # the CPU generator only: torch.manual_seed would reseed the GPUs too
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
        return
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        torch.manual_seed(seed)
        yield


def _objective(task, fisher: str):
    if fisher not in ("true", "empirical"):
        raise ValueError(f"fisher must be 'true' or 'empirical', got {fisher!r}")
    sample = fisher == "true"
    return lambda batch, m: task.compute_train_loss(batch, m, sample=sample)


def covariance_sums(model, task, modules, specs, loader, *, fisher: str, backend: str, seed: int, progress):
    """Pass 1: per module ``[sum a a^T, sum g g^T, unmasked tokens]`` in float64 (per-batch
    sums come from the op in fp32; across batches they add up in float64, so that long
    passes lose nothing to rounding), and the number of documents seen."""
    objective = _objective(task, fisher)
    device = next(model.parameters()).device
    sums = {n: [None, None, torch.zeros((), dtype=torch.float64, device=device)] for n in modules}

    def add_covariance(spec, acts, grads, mask):
        acc = sums[spec.name]
        a = ops.covariance(acts, mask=mask, backend=backend)
        s = ops.covariance(grads, mask=mask, backend=backend)
        # add_ widens fp32 to fp64 as it adds (exactly, as .double() would), without a float64
        # temporary of the d x d sum per layer per batch
        acc[0] = a.double() if acc[0] is None else acc[0].add_(a)
        acc[1] = s.double() if acc[1] is None else acc[1].add_(s)
        acc[2] += acts.shape[0] * acts.shape[1] if mask is None else mask.sum()

    with _seeded(device, seed):
        n_examples = run_pass(model, task, modules, specs, loader, objective=objective, consumer=add_covariance,
                              desc="pyinf: covariances", progress=progress)
    for name, (a_sum, _, n_tokens) in sums.items():
        if a_sum is None:
            raise RuntimeError(f"module {name!r} received no gradient in the factor pass: the model's forward does "
                               f"not run it (a spare head or adapter), reads its weight directly (F.linear(x, "
                               f"m.weight)), or its output does not reach the loss (used only through an argmax, "
                               f"or detached), or it is a mixture-of-experts expert that no token of the factor "
                               f"data was routed to; leave it out of the tracked modules (or fit on more data)")
        if float(n_tokens) == 0:
            raise RuntimeError(f"module {name!r} saw no unmasked token while fitting factors (every token it saw "
                               f"was padding)")
    return sums, n_examples


# float64 eigenvectors decomposed at once by eigenbases (a bound on its peak beyond the sums;
# the e2e benchmark model's ~1.9 GB is one group, a 7B model's MLPs ~106 GB are ~14)
_EIGH_GROUP_BYTES = 8 << 30


def eigenbases(sums, dtype: torch.dtype, eigh_workers: int) -> Dict[str, Dict[str, torch.Tensor]]:
    """The covariances (summed ``[a_sum, s_sum, n_tokens]`` per module) and their float64
    eigendecompositions, as the precision policy asks; several at once when eigh_workers > 1.

    The sums are divided in place (they become the covariances: no float64 copy of every
    layer's beside them, ~106 GB for a 7B model's MLPs), and the layers are decomposed in
    groups of at most ``_EIGH_GROUP_BYTES`` of float64 eigenvectors, each group's results let
    go once its ``dtype`` copies are made: the peak is the sums and one group's float64
    eigenvectors, not every layer's (a model of the e2e benchmark's size is one group, as
    before). The results are those of one call, bit for bit."""
    def key(name, which):  # names the matrix in eigh's errors
        return f"module {name!r}, covariance {which}"

    covariances = {}
    for name, (a_sum, s_sum, n_tokens) in sums.items():
        if not bool(s_sum.any()):
            warnings.warn(f"pyinf: module {name!r} received only zero output gradients while fitting factors (no "
                          f"token with a loss: every label -100, or documents of one token?); its Lambda will be 0, "
                          f"and scoring with it needs a positive damping")
        covariances[key(name, "A")] = a_sum.div_(n_tokens)
        covariances[key(name, "S")] = s_sum.div_(n_tokens)
    groups, size = [[]], 0
    for name in sums:  # in order; a group holds at least one layer
        layer = sum(covariances[key(name, w)].numel() for w in "AS") * 8
        if groups[-1] and size + layer > _EIGH_GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += layer
    eigen = {}
    for group in groups:
        decomposed = eigendecompose({key(n, w): covariances[key(n, w)] for n in group for w in "AS"},
                                    workers=eigh_workers)
        for name in group:
            (a_vals, q_a), (s_vals, q_s) = decomposed.pop(key(name, "A")), decomposed.pop(key(name, "S"))
            # contiguous: eigh returns column-major eigenvectors, and a GEMM's rounding may follow
            # the operand's layout (a reloaded, row-major copy would then give other bits)
            eigen[name] = dict(a_cov=covariances.pop(key(name, "A")).to(dtype),
                               s_cov=covariances.pop(key(name, "S")).to(dtype),
                               a_eigvals=a_vals.to(dtype), q_a=q_a.to(dtype).contiguous(),
                               s_eigvals=s_vals.to(dtype), q_s=q_s.to(dtype).contiguous())
            del a_vals, q_a, s_vals, q_s  # this layer's float64 results: free before the next layer's copies
    return eigen


def lambda_sums(model, task, modules, specs, loader, eigen, *, fisher: str, backend: str, seed: int, progress):
    """Pass 2: per module the float64 sum over documents of ``(Q_S^T DW_n Q_A)^2``, and the
    number of documents seen."""
    objective = _objective(task, fisher)
    device = next(model.parameters()).device
    sums = {n: None for n in modules}
    on_device = {n: {k: e[k].to(device) for k in ("q_a", "q_s")} for n, e in eigen.items()}

    def add_lambda(spec, acts, grads, mask):
        e = on_device[spec.name]
        lam = ops.eigen_correction(acts, grads, e["q_a"], e["q_s"], mask=mask, backend=backend)
        prev = sums[spec.name]
        sums[spec.name] = lam.double() if prev is None else prev.add_(lam)  # widened as it adds

    with _seeded(device, seed):
        n_docs = run_pass(model, task, modules, specs, loader, objective=objective, consumer=add_lambda,
                          desc="pyinf: eigenvalue correction", progress=progress)
    for name, lam in sums.items():
        if lam is None:
            raise RuntimeError(f"module {name!r} received no gradient during the eigenvalue-correction pass")
    return sums, n_docs


def assemble_factors(specs, eigen, lambda_totals, n_lambda: int, dtype: torch.dtype, meta: Dict) -> Factors:
    out = {name: ModuleFactors(specs[name], lambdas=(lam / n_lambda).to(dtype), **eigen[name])
           for name, lam in lambda_totals.items()}
    return Factors(out, dict(meta, id=content_id(out, meta)))


# metadata that says how a fit went, not what it computed
_VOLATILE_META = ("seconds", "eigh_workers", "id", "fit_run")  # fit_run: the staged fit's record of its
# inputs, which the content hashed already stands for (ids stay those of fits before it was kept)
# settings the parts of a merge may differ in: how each part's fit went, its own layers' token
# counts, the weights' per-parameter record (their fingerprint is compared), the path the model
# was read from, and what a file records of itself
_MERGE_FREE = _VOLATILE_META + ("n_tokens", "shards", "model_weights", "model", "merged_from") + storage.FILE_KEYS


def _merged_meta(parts: Sequence[_FactorsIdentity], what: str) -> Dict:
    """The settings of the merge of ``parts`` (without its id), once they are checked to be
    fits of disjoint layers on the same data with the same settings."""
    seen = set()
    for i, part in enumerate(parts):
        again = [n for n in part.module_names if n in seen]
        if again:
            raise ValueError(f"{what}: part {i} ({part.id[:12]}) holds layers an earlier part holds "
                             f"too: {again[:5]}; merge fits of disjoint layers")
        seen.update(part.module_names)

    def settings(part):
        kept = {k: v for k, v in part.meta.items() if k not in _MERGE_FREE}
        # a CLI or staged fit's record of its inputs: the data's hash per shard, the
        # tokenisation, the shards; all but its layers must agree
        run = part.meta.get("fit_run")
        if isinstance(run, dict):
            kept.update({f"fit_run.{k}": v for k, v in run.items() if k != "modules"})
        return kept

    first = settings(parts[0])
    for i, part in enumerate(parts[1:], 1):
        theirs = settings(part)
        keys = sorted(set(first) | set(theirs))
        if "fit_run.documents" not in first or "fit_run.documents" not in theirs:
            # a part records no fit run (the Python API's fit): its data cannot be compared
            keys = [k for k in keys if not k.startswith("fit_run.")]
        diff = [f"{k}: {_short(theirs.get(k))} in part {i}, {_short(first.get(k))} in part 0"
                for k in keys if theirs.get(k) != first.get(k)]
        if diff:
            raise ValueError(f"{what}: part {i} ({part.id[:12]}) was fitted otherwise than part 0 "
                             f"({'; '.join(diff)}); merge fits of the same data and settings")
    meta = {k: v for k, v in parts[0].meta.items() if k not in storage.FILE_KEYS}  # save writes its own
    meta.pop("fit_run", None)  # part 0's, of its layers only: the merge is no fit to skip
    meta["n_tokens"] = {n: t for p in parts for n, t in (p.meta.get("n_tokens") or {}).items()}
    seconds: Dict[str, float] = {}
    for p in parts:
        for phase, t in (p.meta.get("seconds") or {}).items():
            seconds[phase] = seconds.get(phase, 0.0) + t
    meta["seconds"] = seconds
    if len({json.dumps(p.meta.get("shards")) for p in parts}) > 1:
        meta.pop("shards", None)  # each part's own: none for the whole
    meta["merged_from"] = [p.id for p in parts]
    meta.pop("id", None)
    return meta


# what a factors id samples of each layer, and how much of each tensor
_ID_FIELDS = ("q_a", "q_s", "lambdas")
_ID_SAMPLES = 4096


def content_id(modules: Dict[str, ModuleFactors], meta: Dict) -> str:
    """The factors' id: a hash of their settings and of an evenly strided sample of each
    layer's eigenbases and Lambda (as :func:`pyinf.fingerprint.weights_identity` samples a
    model's weights), not a random one. A fit repeated bit for bit (a ``fit; score`` script
    run again after a crash) then keeps its id, and the query and score files prepared
    against the first one still count; a fit of other data or settings gets another."""
    tensors = [getattr(m, field) for m in modules.values() for field in _ID_FIELDS]
    names = [f"{n}.{f}" for n in modules for f in _ID_FIELDS]
    return _content_hash(meta, zip(names, host_samples(tensors, _ID_SAMPLES)))


def _content_hash(meta: Dict, samples) -> str:
    """:func:`content_id` of the settings ``meta`` and the ``(name, sample)`` pairs."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k not in _VOLATILE_META}, sort_keys=True,
                                  default=str).encode())
    for name, sample in samples:
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


def fit_factors(model, task, modules, specs, loader, *, fisher: str, backend: str, seed: int,
                progress, eigh_workers: Optional[int] = None) -> Factors:
    _objective(task, fisher)  # a bad value fails now, not after the first pass
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):  # numpy integers too
        raise TypeError(f"fit_factors: seed must be an integer (it seeds the true Fisher's label draws), got {seed!r}")
    seed = int(seed)
    dtype = factor_dtype(model)
    device = next(model.parameters()).device
    eigh_workers = resolve_workers(eigh_workers, device)
    common = dict(model=model, task=task, modules=modules, specs=specs, loader=loader, fisher=fisher,
                  backend=backend, progress=progress)
    clock = _PhaseClock(device)
    cov, n_examples = covariance_sums(**common, seed=seed)
    clock.lap("covariance_pass")
    eigen = eigenbases(cov, dtype, eigh_workers)
    clock.lap("eigendecomposition")
    lam, n_lambda = lambda_sums(**common, eigen=eigen, seed=seed + 1)
    clock.lap("lambda_pass")
    meta = dict(fisher=fisher, n_examples=n_examples, seed=int(seed), dtype=str(dtype),
                n_tokens={n: int(cov[n][2]) for n in modules}, seconds=clock.seconds, eigh_workers=eigh_workers)
    return assemble_factors(specs, eigen, lam, n_lambda, dtype, meta)


class _PhaseClock:
    """Wall-clock seconds of each phase of a fit (recorded in the factors' metadata, so a
    benchmark can tell the passes from the eigendecompositions). On a GPU it synchronises
    at each phase boundary only, where the pipeline waits anyway."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: Dict[str, float] = {}
        self._start = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, phase: str) -> None:
        now = self._now()
        self.seconds[phase] = now - self._start
        self._start = now
