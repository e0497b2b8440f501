"""A factor fit in saved stages: resumable after a crash, and split over shards (GPUs or
machines sharing one work directory).

A fit is two passes over the data with a step between them (:mod:`pyinf.factors`): the
covariance sums, the float64 eigendecompositions, the eigenvalue-correction sums. Both
kinds of sums add up over documents, so shard ``k`` of ``n`` takes its contiguous share of
the documents and saves its own partial sums; shard 0 decomposes the summed covariances
once for all and, at the end, adds up the Lambda sums and writes the factors. Each stage
is saved as soon as it is computed (atomically, checksummed), so a rerun after a crash
restarts from the last saved stage: with one shard, a crash in the second pass no longer
repeats the first.

Between stages a shard needs the other shards' files. ``wait=True`` polls the work
directory until they appear (shards started together, one per GPU); ``wait=False`` returns
None at the first missing file, and the same call made again later goes on from there.

Every file records the run (model fingerprint, Fisher, seed, shard count, the hash of the
shard's documents and what the caller adds); a file of another run is an error naming the
difference. Shards draw their true-Fisher labels from their own seeds (shard ``k``'s two
passes use ``seed + 2k`` and ``seed + 2k + 1``), so a sharded true-Fisher fit is a
different sample than an unsharded one; with one shard the fit is bit for bit
:meth:`pyinf.InfluenceEngine.fit_factors`'s, and an empirical-Fisher fit matches it up to
the float64 rounding of the sums' order."""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import Subset

from . import storage
from .corpus import check_shard, documents_hash
from .eigen import resolve_workers
from .factors import Factors, assemble_factors, covariance_sums, eigenbases, factor_dtype, lambda_sums

COVARIANCE_KIND = "fit-covariance-sums"
EIGEN_KIND = "fit-eigenbases"
LAMBDA_KIND = "fit-lambda-sums"
_EIGEN_FIELDS = ("a_cov", "s_cov", "a_eigvals", "q_a", "s_eigvals", "q_s")


def shard_documents(n_docs: int, shard: Tuple[int, int]) -> range:
    k, n = shard
    return range(k * n_docs // n, (k + 1) * n_docs // n)


class StagedFit:
    """See the module docstring. ``engine`` is a :class:`pyinf.InfluenceEngine`."""

    def __init__(self, engine, data, work_dir, *, shard: Tuple[int, int] = (0, 1), fisher: str = "true",
                 batch_size: int = 8, seed: int = 0, eigh_workers: Optional[int] = None,
                 run_meta: Optional[Dict] = None, log: Optional[Callable[[str], None]] = None):
        check_shard(shard)
        self.engine, self.data, self.shard = engine, data, shard
        self.work_dir = Path(work_dir)
        self.fisher, self.batch_size, self.seed = fisher, batch_size, int(seed)  # numpy ints: JSON needs int
        self.device = next(engine.model.parameters()).device
        self.eigh_workers = resolve_workers(eigh_workers, self.device)
        self.dtype = factor_dtype(engine.model)
        k, n = shard
        if len(data) == 0:
            raise ValueError("the factor data is empty")
        self.docs = shard_documents(len(data), shard)
        if len(self.docs) == 0:
            raise ValueError(f"shard {k}/{n} of {len(data)} documents holds none: use at most {len(data)} shards")
        self.run = dict(run_meta or {}, model=engine.fingerprint(), fisher=fisher, seed=self.seed,
                        n_docs=len(data), shards=n, dtype=str(self.dtype),
                        modules=sorted(engine.modules))
        self.log = log if log is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._docs_hash: Dict[int, str] = {}  # shard -> hash of its documents
        # what run_stages(wait=False) stopped for (None: it ran to the end of this shard's part),
        # so a caller can tell "done" from "run me again later"
        self.waiting_for: Optional[str] = None

    # --------------------------------------------------------------- files

    def _path(self, stage: str, k: Optional[int] = None) -> Path:
        n = self.shard[1]
        return self.work_dir / (f"{stage}.safetensors" if k is None else f"{stage}-{k}-of-{n}.safetensors")

    def _load(self, path: Path, kind: str, want: Dict, keys=None):
        """(tensors, meta) of a saved stage of this run, or None when absent or damaged
        (computed again). A stage of another run raises."""
        return storage.load_if_same_run(
            path, kind, want, on_damaged=lambda why: self.log(f"pyinf: {why}; computing that stage again"),
            remedy=f"use a new work directory, or delete {self.work_dir} to start over", keys=keys)

    def _damaged_elsewhere(self, path: Path, why: str, owner: str) -> storage.CorruptFileError:
        """Another shard's saved stage is damaged: removed, so that the owner computes it again
        when the shards run again (shards only wait for files to be there: kept, it would stop
        this shard at the same place on every rerun); the error says so."""
        path.unlink(missing_ok=True)
        return storage.CorruptFileError(f"{why}; removed it: run the shards again ({owner} computes it anew)")

    def _header(self, path: Path, kind: str, want: Dict) -> Dict:
        """A saved stage's metadata (CorruptFileError when damaged); a stage of another run raises."""
        meta = storage.load_meta(path, kind)
        diff = storage.differences(meta, want)
        if diff:
            raise ValueError(f"{path} belongs to another run ({'; '.join(diff)}); use a new work directory, or "
                             f"delete {self.work_dir} to start over")
        return meta

    def _saved(self, path: Path, kind: str, want: Dict) -> Optional[Dict]:
        """The metadata of a saved stage of this run when it is there and whole (every tensor's
        checksum, read one tensor at a time: a 7B model's sums are ~100 GB, not to be held only
        to learn that they are done), else None (computed again). A stage of another run raises."""
        if not path.exists():
            return None
        try:
            self._header(path, kind, want)
            return storage.verify(path, kind)
        except storage.CorruptFileError as exc:
            self.log(f"pyinf: {exc}; computing that stage again")
            return None

    def _saved_or_rerun(self, path: Path, kind: str, want: Dict, shard: int) -> Dict:
        """The header of another shard's saved stage, which must be there for this run (the
        tensors are checked as :meth:`_layers` reads them)."""
        try:
            return self._header(path, kind, want)
        except (storage.CorruptFileError, FileNotFoundError) as exc:
            raise self._damaged_elsewhere(path, f"{path} disappeared or is damaged ({exc})",
                                          f"shard {shard}/{self.shard[1]}") from exc

    def _layers(self, path: Path, kind: str, shard: int, fields) -> Iterator[Tuple[str, List[torch.Tensor]]]:
        """Shard ``shard``'s saved sums of each tracked layer, ``fields`` of it, one layer read
        from the file at a time (every tensor checked as it is read)."""
        for name in self.engine.modules:
            try:
                tensors, _ = storage.load(path, kind, keys=lambda key, name=name: key.rpartition("::")[0] == name)
            except (storage.CorruptFileError, FileNotFoundError) as exc:
                raise self._damaged_elsewhere(path, str(exc), f"shard {shard}/{self.shard[1]}") from exc
            yield name, [tensors[f"{name}::{f}"] for f in fields]

    def _mine(self) -> Dict:
        return self._of_shard(self.shard[0])

    def _of_shard(self, j: int) -> Dict:
        """The run as shard ``j``'s files must record it: with the hash of its documents, so
        that a shard run on another corpus (of the same size) is refused, not summed in."""
        if j not in self._docs_hash:
            docs = shard_documents(len(self.data), (j, self.shard[1]))
            self._docs_hash[j] = documents_hash(self.data, docs.start, docs.stop)
        return dict(self.run, documents=self._docs_hash[j])

    def record(self) -> Dict:
        """The whole fit as its factors record it (``fit_run``): the run and every shard's
        documents hash, as it reads back from the file's JSON."""
        return json.loads(json.dumps(dict(self.run, documents=[self._of_shard(j)["documents"]
                                                               for j in range(self.shard[1])])))

    def done_in(self, path) -> bool:
        """Whether ``path`` holds the factors of this very fit (the same model, data, settings
        and shards, by their record), whole (every tensor's checksum, read one at a time): a
        rerun of a ``fit; score`` script after a crash in the scoring then has nothing to fit.
        A missing, damaged or other fit's file: False (and fitted again)."""
        path = Path(path)
        if not path.is_file():
            return False
        try:
            if Factors.load_header(path).meta.get("fit_run") != self.record():
                return False
            storage.verify(path, Factors.KIND)
        except (storage.CorruptFileError, KeyError, TypeError) as exc:
            self.log(f"pyinf: not reusing {path}: {exc}")
            return False
        return True

    def _wait_for(self, paths, what: str, wait: bool, timeout: Optional[float], poll: float) -> bool:
        start, said = time.monotonic(), False
        while True:
            missing = [p for p in paths if not p.exists()]
            if not missing:
                return True
            if not wait:
                self.waiting_for = what
                self.log(f"pyinf: shard {self.shard[0]}/{self.shard[1]} waits for {what} "
                         f"({len(missing)} files missing in {self.work_dir}); run it again once they are there")
                return False
            if timeout is not None and time.monotonic() - start > timeout:
                raise TimeoutError(f"shard {self.shard[0]}/{self.shard[1]}: {what} still missing after {timeout} s "
                                   f"({', '.join(p.name for p in missing[:4])})")
            if not said:
                self.log(f"pyinf: shard {self.shard[0]}/{self.shard[1]} waiting for {what}")
                said = True
            time.sleep(poll)

    # --------------------------------------------------------------- stages

    def _subset_common(self):
        e = self.engine
        return dict(model=e.model, task=e.task, modules=e.modules, specs=e.specs,
                    loader=e._loader(Subset(self.data, self.docs), self.batch_size, "factor data"),
                    fisher=self.fisher, backend=e.backend, progress=e.progress)

    def _covariance(self) -> None:
        k, n = self.shard
        path = self._path("covariance", k)
        if self._saved(path, COVARIANCE_KIND, self._mine()) is not None:
            return
        t0 = time.perf_counter()
        with self.engine._stage_context():
            sums, n_examples = covariance_sums(**self._subset_common(), seed=self.seed + 2 * k)
        tensors = {f"{name}::{field}": t for name, parts in sums.items()
                   for field, t in zip(("a_sum", "s_sum", "n_tokens"), parts)}
        storage.save(path, COVARIANCE_KIND, tensors, dict(self._mine(), n_examples=n_examples))
        self.log(f"pyinf: shard {k}/{n}: covariance sums of {len(self.docs)} documents in "
                 f"{time.perf_counter() - t0:.1f} s")

    def _eigen(self) -> Optional[Dict]:
        """Shard 0 decomposes the summed covariances; every shard loads the result."""
        path = self._path("eigen")
        # the other shards' Lambda pass reads the eigenbases only (not the covariances: half the file)
        fields = _EIGEN_FIELDS if self.shard[0] == 0 else ("q_a", "q_s")
        found = self._load(path, EIGEN_KIND, self.run, keys=lambda key: key.rpartition("::")[2] in fields)
        if found is None and self.shard[0] == 0:
            t0 = time.perf_counter()
            total: Dict[str, list] = {}
            n_examples = 0
            content = hashlib.sha256()
            for j in range(self.shard[1]):  # in shard order: the same float64 sums on every rerun
                path_j = self._path("covariance", j)
                meta = self._saved_or_rerun(path_j, COVARIANCE_KIND, self._of_shard(j), j)
                n_examples += meta["n_examples"]
                content.update(json.dumps([meta["documents"], meta["n_examples"], meta["crc32"]],
                                          sort_keys=True).encode())
                # one layer at a time from the file, added in place: the total and one shard's
                # layer, on the host and on the device, not a shard's whole file or a third copy
                for name, parts in self._layers(path_j, COVARIANCE_KIND, j, ("a_sum", "s_sum", "n_tokens")):
                    parts = [t.to(self.device) for t in parts]
                    total[name] = parts if name not in total else [a.add_(b) for a, b in zip(total[name], parts)]
                    del parts
            eigen = eigenbases(total, self.dtype, self.eigh_workers)
            # the id follows the covariance sums' content: decomposed again (a damaged file), the
            # same sums give the same id, and the Lambda sums already saved against it still hold
            meta = dict(self.run, eigen_id=content.hexdigest(), n_examples=n_examples,
                        n_tokens={n: int(total[n][2]) for n in total})
            storage.save(path, EIGEN_KIND, {f"{name}::{f}": e[f] for name, e in eigen.items() for f in _EIGEN_FIELDS},
                         meta)
            self.log(f"pyinf: eigendecompositions of {2 * len(eigen)} covariances in {time.perf_counter() - t0:.1f} s")
            return dict(eigen=eigen, meta=meta)  # the saved values, exactly: no need to read them back
        if found is None:
            return None
        tensors, meta = found
        # shard 0: on the device, as when it decomposes them (they go into its factors); the others'
        # stay on the host, and their Lambda pass takes the bases over itself (factors.lambda_sums)
        device = self.device if self.shard[0] == 0 else torch.device("cpu")
        eigen = {name: {f: tensors[f"{name}::{f}"].to(device) for f in fields} for name in self.engine.modules}
        return dict(eigen=eigen, meta=meta)

    def _lambda(self, eigen: Dict) -> None:
        k, n = self.shard
        path = self._path("lambda", k)
        want = dict(self._mine(), eigen_id=eigen["meta"]["eigen_id"])
        if self._saved(path, LAMBDA_KIND, want) is not None:
            return
        t0 = time.perf_counter()
        with self.engine._stage_context():
            sums, n_docs = lambda_sums(**self._subset_common(), eigen=eigen["eigen"], seed=self.seed + 2 * k + 1)
        storage.save(path, LAMBDA_KIND, {f"{name}::sum": t for name, t in sums.items()},
                     dict(want, lambda_docs=n_docs))
        self.log(f"pyinf: shard {k}/{n}: eigenvalue-correction sums of {n_docs} documents in "
                 f"{time.perf_counter() - t0:.1f} s")

    def _finish(self, eigen: Dict) -> Factors:
        n = self.shard[1]
        totals: Dict[str, torch.Tensor] = {}
        n_docs = 0
        for j in range(n):
            want = dict(self._of_shard(j), eigen_id=eigen["meta"]["eigen_id"])
            path_j = self._path("lambda", j)
            meta = self._saved_or_rerun(path_j, LAMBDA_KIND, want, j)
            n_docs += meta["lambda_docs"]
            for name, (t,) in self._layers(path_j, LAMBDA_KIND, j, ("sum",)):  # as above
                t = t.to(self.device)
                totals[name] = t if name not in totals else totals[name].add_(t)
        m = eigen["meta"]
        meta = dict(fisher=self.fisher, n_examples=m["n_examples"], seed=self.seed, dtype=str(self.dtype),
                    n_tokens=m["n_tokens"], shards=n, eigh_workers=self.eigh_workers,
                    model_fingerprint=self.run["model"], model_weights=self.engine.identity().record,
                    fit_run=self.record())
        return assemble_factors(self.engine.specs, eigen["eigen"], totals, n_docs, self.dtype, meta)

    def run_stages(self, *, wait: bool = True, timeout: Optional[float] = None, poll_seconds: float = 10.0,
                   keep_parts: bool = False, save: Optional[Callable[[Factors], object]] = None
                   ) -> Optional[Factors]:
        """Runs this shard's stages. Returns the factors on shard 0 once every shard's sums
        are in (and, unless ``keep_parts``, removes the work files); None on another shard
        when its part is done, or, with ``wait=False``, when another shard's file is missing.
        ``save(factors)`` runs on shard 0 before the work files go: if it fails (a full disk,
        a bad path), they are kept and a rerun only repeats the last step."""
        k, n = self.shard
        self._covariance()
        covs = [self._path("covariance", j) for j in range(n)]
        if not self._wait_for(covs, "the other shards' covariance sums", wait, timeout, poll_seconds):
            return None
        if k != 0 and not self._wait_for([self._path("eigen")], "shard 0's eigendecompositions", wait, timeout,
                                         poll_seconds):
            return None
        eigen = self._eigen()
        if eigen is None:  # shard 0 writes it; it was there a moment ago, so it is damaged
            raise self._damaged_elsewhere(self._path("eigen"), f"{self._path('eigen')} is damaged", f"shard 0/{n}")
        self._lambda(eigen)
        if k != 0:
            self.log(f"pyinf: shard {k}/{n} done; shard 0 writes the factors")
            return None
        lambdas = [self._path("lambda", j) for j in range(n)]
        if not self._wait_for(lambdas, "the other shards' eigenvalue-correction sums", wait, timeout, poll_seconds):
            return None
        factors = self._finish(eigen)
        if save is not None:
            save(factors)
        if not keep_parts:
            self.remove_work_files()
        return factors

    def remove_work_files(self) -> None:
        """Removes this fit's stage files (and what a process killed while saving one left:
        storage.atomic_path's temporaries), and the work directory once it is empty. For
        when the factors are written: every shard has saved its last file by then."""
        n = self.shard[1]
        stages = [*(self._path("covariance", j) for j in range(n)), self._path("eigen"),
                  *(self._path("lambda", j) for j in range(n))]
        for path in stages:
            path.unlink(missing_ok=True)
            for stray in self.work_dir.glob(f".{path.name}.*.tmp"):
                stray.unlink(missing_ok=True)
        if self.work_dir.is_dir() and not any(self.work_dir.iterdir()):
            self.work_dir.rmdir()


def fit_factors_staged(engine, data, work_dir, *, shard: Tuple[int, int] = (0, 1), fisher: str = "true",
                       batch_size: int = 8, seed: int = 0, eigh_workers: Optional[int] = None, wait: bool = True,
                       timeout: Optional[float] = None, poll_seconds: float = 10.0, keep_parts: bool = False,
                       run_meta: Optional[Dict] = None, log: Optional[Callable[[str], None]] = None,
                       save: Optional[Callable[[Factors], object]] = None) -> Optional[Factors]:
    """:meth:`pyinf.InfluenceEngine.fit_factors` in saved stages under ``work_dir``: resumable,
    and split over ``shard=(k, n)`` processes sharing that directory. Returns the factors on
    shard 0, None elsewhere (or, with ``wait=False``, while other shards' files are missing).
    See the module docstring. Shards of a true-Fisher fit should be processes: threads of one
    process share torch's generators, and the draws then depend on their timing."""
    return StagedFit(engine, data, work_dir, shard=shard, fisher=fisher, batch_size=batch_size, seed=seed,
                     eigh_workers=eigh_workers, run_meta=run_meta, log=log).run_stages(
        wait=wait, timeout=timeout, poll_seconds=poll_seconds, keep_parts=keep_parts, save=save)
