"""Computing over a corpus too large for one uninterrupted run (Ruis et al. 2024 scored 5M
documents against 80 queries): pairwise scores (:func:`score_corpus`) and self-influence
(:func:`self_influence_corpus`). The documents are cut into fixed chunks, and each chunk's
values are saved the moment they are computed (atomically, checksummed, see
:mod:`pyinf.storage`). A rerun into the same directory skips the chunks already there, so a
job killed after hours loses at most one chunk. ``shard=(k, n)`` gives process ``k`` of ``n``
its own contiguous run of chunks, so several GPUs or machines can share one directory; the
chunk grid does not depend on the shard count, so a run may be resumed with another one.

Each chunk records what its values depend on: the queries' content
(:attr:`pyinf.Queries.fingerprint`) or the factors' id and the damping, a fingerprint of the
model's weights, a hash of the chunk's own documents and whatever the caller adds
(``run_meta``). A chunk that does not match is an error that names the difference, never a
silent mix of two runs; a chunk that fails its checksum is computed again. When every chunk
is present they are joined into ``scores.safetensors`` (float32 ``[n_docs, n_queries]``) or
``self_influence.safetensors`` (``[n_docs]``), which records the run and a hash of all the
documents, and is returned by a later run only while both still match; a later run that
does not match it (other queries, another corpus) is refused, as for a chunk. A document
whose loss or gradients are not finite on its own gets NaN values, and the run goes on
(:meth:`ChunkedRun._compute_isolating`)."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from . import storage
from .data import in_order
from .factors import Factors
from .ops._checks import check_instance
from .queries import Queries

SCORES_KIND = "scores"
SELF_INFLUENCE_KIND = "self_influence"
DEFAULT_CHUNK_SIZE = 4096


# (this process's rank, the number of processes, its rank on its machine) as launchers set them
_LAUNCHER_ENV = (("RANK", "WORLD_SIZE", "LOCAL_RANK"),  # torchrun, torch.distributed.launch
                 # srun: the step's task count (a batch script, not a step, has SLURM_NTASKS and
                 # SLURM_PROCID=0 but no step: shard 0 of N alone would look done)
                 ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),
                 ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI
                 ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"))  # MPICH, Intel MPI


def launcher_rank(environ=None) -> Optional[Tuple[int, int, Optional[int]]]:
    """``(rank, world size, local rank or None)`` from the environment a launcher (torchrun,
    srun, mpirun) gives each process it starts; None outside one."""
    environ = os.environ if environ is None else environ
    for rank, size, local in _LAUNCHER_ENV:
        if rank in environ and size in environ:
            named = [k for k in (rank, size, local) if k in environ]
            try:
                values = [int(environ[k]) for k in named]
            except ValueError:
                raise ValueError(", ".join(f"{k}={environ[k]!r}" for k in named) + ": not all integers") from None
            return values[0], values[1], values[2] if len(values) == 3 else None
    return None


def parse_shard(text: str, environ=None) -> Tuple[int, int]:
    """``"K/N"`` (shard K of N, counted from 0) as ``(K, N)``; ``"auto"``: this process's rank
    and the number of processes of the launcher that started it (torchrun, srun, mpirun)."""
    if text == "auto":
        found = launcher_rank(environ)
        if found is None:
            raise ValueError("shard 'auto' takes K/N from a launcher's environment (RANK and WORLD_SIZE of torchrun, "
                             "SLURM_PROCID and SLURM_STEP_NUM_TASKS of an srun step, or mpirun's), and none is set: "
                             "give K/N")
        check_shard(found[:2])
        return found[:2]
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"a shard is written K/N (shard K of N, counted from 0) or auto, got {text!r}") from None
    check_shard((k, n))
    return k, n


def check_shard(shard: Tuple[int, int]) -> None:
    k, n = shard
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"shard {k}/{n}: N must be >= 1 and K in 0..N-1")


def chunk_ranges(n_docs: int, chunk_size: int) -> List[Tuple[int, int]]:
    """The document ranges ``[start, end)`` of the chunks, which fixed ``chunk_size`` alone decides."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return [(s, min(s + chunk_size, n_docs)) for s in range(0, n_docs, chunk_size)]


def shard_ranges(ranges: List[Tuple[int, int]], shard: Optional[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """Shard ``k`` of ``n``'s contiguous share of the chunks (shards differ by at most one chunk)."""
    if shard is None:
        return list(ranges)
    check_shard(shard)
    k, n = shard
    return ranges[k * len(ranges) // n:(k + 1) * len(ranges) // n]


_PLAIN_NUMBERS = frozenset((int, float))  # exactly these types (not bool): repr is what the general path hashes


def _item_bytes(item: Any, h) -> None:
    """Feeds one example into ``h``, every byte of it: two documents that differ must hash
    apart, or a resumed run keeps a chunk of the old ones. Lists are prefixed with their
    length and scalars end with a NUL (their repr never holds one), so ``[12, 3]`` and
    ``[1, 23]`` differ; numpy arrays go by their bytes, never their repr, which numpy
    shortens with "..." past 1000 elements."""
    if isinstance(item, torch.Tensor):
        storage.hash_tensor(h, item)
    elif item is None or isinstance(item, (str, bytes, int, float)):  # bool is an int; str is a Sequence
        h.update(repr(item).encode() + b"\0")  # exact and complete for these types
    elif isinstance(item, Mapping):  # dicts, and tokenizer outputs (BatchEncoding is a UserDict)
        for k in sorted(item, key=str):
            h.update(str(k).encode())
            _item_bytes(item[k], h)
    elif isinstance(item, (np.ndarray, np.generic)) or hasattr(item, "__array__"):
        _array_bytes(np.asarray(item), h)
    elif isinstance(item, Sequence):
        h.update(f"[{len(item)}]".encode())
        if item and set(map(type, item)) <= _PLAIN_NUMBERS:
            # a tokenized document as Python lists (a datasets.Dataset's rows): the very bytes of
            # the loop below, made in one join (~4x faster: 0.18 ms, not 0.8 ms, per 2048 tokens
            # on one core; hours less for a corpus of millions hashed at every join)
            h.update(("\0".join(map(repr, item)) + "\0").encode())
            return
        for v in item:
            _item_bytes(v, h)
    else:
        raise TypeError(f"cannot hash a document holding a {type(item).__module__}.{type(item).__qualname__}: "
                        "give examples of tensors, numpy arrays, str, bytes, numbers, None, or dicts and "
                        "lists of those (resuming a run needs every byte of each document)")


def _array_bytes(a: np.ndarray, h) -> None:
    h.update(f"{a.dtype!r}{a.shape}".encode())
    if a.dtype.hasobject:  # its bytes are pointers: hash what they point to
        for v in a.reshape(-1):
            _item_bytes(v, h)
    else:
        h.update(np.ascontiguousarray(a).tobytes())


def documents_hash(dataset, start: int, end: int) -> str:
    """SHA-256 of documents ``start..end-1``: their stored lines when the dataset can give
    them (``raw(i)``, as :class:`pyinf.textdata.JsonlTextDataset` does), else their examples."""
    h = hashlib.sha256()
    base, index = dataset, list(range(start, end))
    while isinstance(base, Subset):  # a Subset of a JSONL corpus still hashes the stored lines
        index = [base.indices[i] for i in index]
        base = base.dataset
    raw = getattr(base, "raw", None)
    for i in index:
        if raw is not None:
            h.update(raw(i))
        else:
            _item_bytes(base[i], h)
    return h.hexdigest()


def _final_path(out_dir, kind: str) -> Path:
    return Path(out_dir) / f"{kind}.safetensors"


def _chunks_dir(out_dir, kind: str) -> Path:
    return Path(out_dir) / f"{kind}-chunks"


def result_files(out_dir, kind: str) -> List[Path]:
    """The files a chunked run of ``kind`` left in ``out_dir``: the joined file first (when
    there), then its chunks; empty when it has none."""
    final = _final_path(out_dir, kind)
    return ([final] if final.exists() else []) + sorted(_chunks_dir(out_dir, kind).glob("*.safetensors"))


def recorded_run(path: Path) -> Optional[Dict]:
    """The run a result file of :func:`result_files` records, from its header alone; None when
    the header is damaged (the run computes that file again)."""
    try:
        meta = storage.describe(path)
    except storage.CorruptFileError:
        return None
    # a chunk records the run in its metadata; the joined file under "run", beside its own keys
    return meta if path.parent.name.endswith("-chunks") else meta.get("run") or {}


class ChunkedRun:
    """One value per document, computed chunk by chunk into ``out_dir`` (see the module
    docstring): ``compute(subset) -> [len(subset), ...]`` for a Subset of ``data``; ``run``
    (JSON values) is what the values depend on besides the documents, recorded in and
    checked against every chunk; ``kind`` names the chunks' directory and the joined file
    (``<kind>.safetensors``), so several kinds of run can share one directory."""

    def __init__(self, data, out_dir, *, kind: str, compute: Callable[[Subset], torch.Tensor], run: Dict,
                 row_shape: Tuple[int, ...] = (), chunk_size: int = DEFAULT_CHUNK_SIZE,
                 log: Optional[Callable[[str], None]] = None, final_meta: Optional[Dict] = None):
        self.data = data
        self.out_dir = Path(out_dir)
        self.kind = kind
        self.compute = compute
        self.row_shape = tuple(row_shape)  # one document's values (NaN for one that cannot be computed)
        self.n_docs = len(data)
        self.ranges = chunk_ranges(self.n_docs, chunk_size)
        self.run = dict(run, n_docs=self.n_docs, chunk_size=chunk_size)
        json.dumps(self.run)  # fail now, not after the first chunk, on a value JSON cannot hold
        self.final_meta = dict(final_meta or {})
        self.log = log if log is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._documents: Dict[Tuple[int, int], str] = {}  # chunk -> documents_hash, computed once

    def _documents_hash(self, start: int, end: int) -> str:
        if (start, end) not in self._documents:
            self._documents[start, end] = documents_hash(self.data, start, end)
        return self._documents[start, end]

    def _chunk_run(self, start: int, end: int) -> Dict:
        """What chunk ``start..end-1`` records and is checked against: the run and its documents."""
        return dict(self.run, start=start, end=end, documents=self._documents_hash(start, end))

    def _final_run(self) -> Dict:
        """What the joined file records and is checked against: the run and every document (a
        hash over the chunks' documents hashes), so it is never returned for another corpus,
        nor after a document changed. Reads the whole corpus once, as joining does."""
        h = hashlib.sha256()
        for start, end in self.ranges:
            h.update(self._documents_hash(start, end).encode())
        return dict(self.run, documents=h.hexdigest())

    @property
    def final_path(self) -> Path:
        return _final_path(self.out_dir, self.kind)

    def _chunk_path(self, start: int, end: int) -> Path:
        return _chunks_dir(self.out_dir, self.kind) / f"{start:010d}-{end:010d}.safetensors"

    def _load_chunk(self, start: int, end: int) -> Optional[torch.Tensor]:
        """The chunk's saved values if they are there for this run (its documents included);
        None when absent or damaged (to be computed again). A chunk of another run raises.
        The one check of a chunk, before skipping it and before joining it."""
        path = self._chunk_path(start, end)
        if not path.exists():
            return None
        found = storage.load_if_same_run(
            path, f"{self.kind}-chunk", self._chunk_run(start, end),
            on_damaged=lambda why: self.log(f"pyinf: {why}; computing that chunk again"),
            remedy=f"write into a new output directory, or delete {path.parent} to start over")
        if found is None:
            return None
        values = found[0].get("values")
        if values is None or values.shape[0] != end - start:
            self.log(f"pyinf: {path} holds no values for documents {start}..{end - 1}; computing it again")
            return None
        return values

    def execute(self, shard: Optional[Tuple[int, int]] = None) -> Optional[torch.Tensor]:
        """Computes this shard's missing chunks; returns the values of every document once
        every chunk of every shard is present (and writes them), else None."""
        joined = self._joined()  # a finished run needs none of its chunks (they may be deleted)
        if joined is not None:
            self.log(f"pyinf: {self.final_path} holds this run's {self.kind}, complete: nothing to compute")
            return joined
        self._check_grid()
        mine = shard_ranges(self.ranges, shard)
        todo = [(s, e) for s, e in mine if self._load_chunk(s, e) is None]
        if len(todo) < len(mine):
            self.log(f"pyinf: {len(mine) - len(todo)} of {len(mine)} chunks already done in {self.out_dir}")
        for i, (start, end) in enumerate(todo):
            t0 = time.perf_counter()
            run = self._chunk_run(start, end)  # hashed before the compute, as the documents were then
            values, failed = self._compute_isolating(Subset(self.data, range(start, end)))
            storage.save(self._chunk_path(start, end), f"{self.kind}-chunk", {"values": values},
                         dict(run, nan_documents=failed))
            dt = time.perf_counter() - t0
            self.log(f"pyinf: {self.kind} chunk {i + 1}/{len(todo)} (documents {start}..{end - 1}) in {dt:.1f} s, "
                     f"{(end - start) / dt:.1f} docs/s")
        return self._join_chunks()

    def _compute_isolating(self, subset: Subset) -> Tuple[torch.Tensor, List[int]]:
        """``(compute(subset), [])``; where a batch's loss or a layer's gradient is not finite
        (FloatingPointError: one document overflowing in bf16, say), the documents are halved
        until the one that fails alone is found: its values are NaN, it is logged (with its
        file line when the corpus knows it) and listed in the chunk's record, and the run goes
        on (an error would stop it at this chunk on every rerun). Nothing is spent where no
        document fails; with b failing documents in a chunk of n, about
        ``2 b log2(n / b)`` documents are computed again. More than ``max(8, n / 100)`` failing
        alone in one chunk is no document's fault (NaN weights, a dtype too narrow for the
        model): the error of the document past that count is raised (and the chunk, its
        documents named as NaN until then included, is not saved)."""
        limit = max(8, len(subset) // 100)
        failed: List[int] = []

        def isolate(part: Subset) -> torch.Tensor:
            try:
                return self.compute(part)
            except FloatingPointError as exc:
                # out of the handler before going on: its traceback holds the failed pass's
                # frames (the batch on the device, the query tensors), which must be let go
                error = exc
            indices = list(part.indices)
            if len(indices) > 1:
                half = len(indices) // 2
                del error
                return torch.cat([isolate(Subset(part.dataset, indices[:half])),
                                  isolate(Subset(part.dataset, indices[half:]))])
            if len(failed) >= limit:
                if hasattr(error, "add_note"):  # Python 3.11+
                    error.add_note(f"more than {limit} documents of chunk {subset.indices[0]}..{subset.indices[-1]} "
                                   f"fail on their own: the model or its dtype, not the documents (float32 weights?); "
                                   f"the chunk is not saved")
                raise error
            n, why = indices[0], str(error)
            del error  # its traceback holds the failed pass (a reference cycle, freed only by the collector)
            failed.append(n)
            where = f" ({self.data.where(n)})" if callable(getattr(self.data, "where", None)) else ""
            self.log(f"pyinf: document {n}{where} gives a non-finite loss or gradient on its own ({why}); its "
                     f"{self.kind} are NaN")
            return torch.full((1, *self.row_shape), float("nan"), dtype=torch.float32)

        return isolate(subset), failed

    def _check_grid(self) -> None:
        """Chunk files of another grid (another chunk size, or another corpus length) would
        lie beside this run's unused, and the run would compute everything again: refused."""
        grid = {self._chunk_path(s, e).name for s, e in self.ranges}
        folder = _chunks_dir(self.out_dir, self.kind)
        foreign = sorted(p.name for p in folder.glob("*.safetensors") if p.name not in grid) if folder.exists() else []
        if foreign:
            sizes = sorted({int(e) - int(s) for s, e in (name[: -len(".safetensors")].split("-") for name in foreign)
                            if s.isdigit() and e.isdigit()})
            raise ValueError(
                f"{folder} holds chunks that are not on this run's grid of {self.run['chunk_size']}-document chunks over "
                f"{self.n_docs} documents (e.g. {foreign[0]}, chunks of {sizes[-1] if sizes else '?'} documents): "
                f"another chunk size or another corpus; rerun with that chunk size, or write into a new output "
                f"directory")

    def missing(self) -> List[Tuple[int, int]]:
        return [(s, e) for s, e in self.ranges if not self._chunk_path(s, e).exists()]

    def _joined(self) -> Optional[torch.Tensor]:
        """The values of ``<kind>.safetensors`` if it was joined for this run, else None."""
        if not self.final_path.exists():
            return None
        try:
            tensors, meta = storage.load(self.final_path, self.kind)
        except storage.CorruptFileError as exc:
            self.log(f"pyinf: {exc}; joining the chunks again")
            return None
        diff = storage.differences(meta.get("run", {}), self._final_run())
        if not diff:
            return tensors[self.kind]
        # another run's finished result (other queries, another corpus...) is never replaced
        # silently, even when its chunks were deleted (as a finished run allows)
        raise ValueError(f"{self.final_path} holds the {self.kind} of another run ({'; '.join(diff)}): write into "
                         f"a new output directory, or delete {self.final_path} (and {self.kind}-chunks/) to start "
                         f"over")

    def _join_chunks(self) -> Optional[torch.Tensor]:
        """The chunks' values joined, and written as ``<kind>.safetensors``, if every chunk is
        present, else None."""
        if self.missing():
            return None
        parts = []
        for start, end in self.ranges:
            values = self._load_chunk(start, end)  # other shards' chunks get the same check as ours
            if values is None:
                self.log(f"pyinf: chunk {start}..{end - 1} in {self.out_dir} cannot be joined; rerun its shard")
                return None
            parts.append(values)
        values = torch.cat(parts)
        # documents that failed alone (_compute_isolating): said once more, and recorded
        failed = values.reshape(values.shape[0], -1).isnan().all(1).nonzero().squeeze(1).tolist()
        if failed and len(failed) == values.shape[0]:
            raise FloatingPointError(f"every document gave a non-finite loss or gradient on its own: the model or its "
                                     f"dtype, not the documents; fix it and delete {_chunks_dir(self.out_dir, self.kind)}")
        if failed:
            self.log(f"pyinf: {len(failed)} document{'s' if len(failed) > 1 else ''} gave a non-finite loss or gradient "
                     f"on their own and have NaN {self.kind} (ranked last): {failed[:10]}"
                     f"{' ...' if len(failed) > 10 else ''}; delete a chunk's file to compute it again")
        storage.save(self.final_path, self.kind, {self.kind: values},
                     dict(self.final_meta, run=self._final_run(), nan_documents=len(failed)))
        # what processes killed while saving left (hidden, but never cleaned up otherwise): a
        # chunk, or the joined file of a join killed before (as large as the result); another
        # process's save in progress is recent, and stays
        storage.remove_stale_temporaries(_chunks_dir(self.out_dir, self.kind))
        storage.remove_stale_temporaries(self.out_dir, names=[self.final_path.name])
        return values


def _documents(train, what: str) -> Tuple[Any, Callable[[Subset], Any]]:
    """The corpus to cut into chunks (chunks are ranges of its indices) and what turns a chunk
    into the engine's input. A DataLoader, which the engine also takes, gives its dataset, and
    each chunk is batched and collated as the loader would (its batch size wins, as in the
    engine); it must read that dataset by index, in order, for rows to be documents."""
    if not isinstance(train, DataLoader):
        return train, lambda subset: subset
    if not in_order(train) or train.batch_size is None:
        raise ValueError(f"{what} indexes the documents: give a DataLoader over a map-style Dataset that reads "
                         "it in order (no shuffle, sampler or batch_sampler), or the Dataset itself")

    def batched(subset):
        return DataLoader(subset, batch_size=train.batch_size, collate_fn=train.collate_fn,
                          num_workers=train.num_workers, pin_memory=train.pin_memory)
    return train.dataset, batched


def score_corpus(engine, train, queries: Queries, out_dir, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 shard: Optional[Tuple[int, int]] = None, batch_size: int = 8, query_batch_size: Optional[int] = None,
                 run_meta: Optional[Dict] = None, log: Optional[Callable[[str], None]] = None) -> Optional[torch.Tensor]:
    """Resumable, shardable :meth:`pyinf.InfluenceEngine.pairwise_scores` into ``out_dir``
    (``scores.safetensors``, chunks under ``scores-chunks/``): the ``[n_docs, n_queries]``
    scores once every chunk is there, else None (other shards still running). ``run_meta``
    (JSON values) is recorded in and checked against every chunk, next to the queries', the
    model's and the documents' fingerprints. See the module docstring."""
    check_instance("score_corpus", "queries", queries, Queries)
    # before any chunk is skipped as done: a finished run must not answer for other layers
    queries.check_model(engine.specs)
    run = dict(run_meta or {}, queries=queries.fingerprint, model=engine.fingerprint(),
               n_queries=queries.n_queries)
    train, batched = _documents(train, "score_corpus")
    if query_batch_size is None:  # copied to the device once, not once per chunk
        queries = queries.to(next(engine.model.parameters()).device)

    def compute(subset):
        return engine.pairwise_scores(batched(subset), queries, batch_size=batch_size,
                                      query_batch_size=query_batch_size)

    return ChunkedRun(train, out_dir, kind=SCORES_KIND, compute=compute, run=run, row_shape=(queries.n_queries,),
                      chunk_size=chunk_size, log=log,
                      final_meta=dict(rank=queries.rank, damping=queries.damping,
                                      factors_id=queries.factors_id)).execute(shard)


def _layers_key(specs) -> str:
    """Which layers a result sums over, in a line: their count and a hash of their names."""
    names = "\n".join(sorted(specs))
    return f"{len(specs)} layer{'' if len(specs) == 1 else 's'}, {hashlib.sha256(names.encode()).hexdigest()[:12]}"


def self_influence_corpus(engine, train, factors, out_dir, *, damping: Optional[float] = None,
                          chunk_size: int = DEFAULT_CHUNK_SIZE, shard: Optional[Tuple[int, int]] = None,
                          batch_size: int = 8, run_meta: Optional[Dict] = None,
                          log: Optional[Callable[[str], None]] = None) -> Optional[torch.Tensor]:
    """Resumable, shardable :meth:`pyinf.InfluenceEngine.self_influence` into ``out_dir``
    (``self_influence.safetensors``, chunks under ``self_influence-chunks/``): the ``[n_docs]``
    values once every chunk is there, else None. The same checks as :func:`score_corpus`,
    with the factors' id and the damping in place of the queries."""
    check_instance("self_influence_corpus", "factors", factors, Factors)
    factors.check_model(engine.specs)  # before any chunk is skipped as done (as in score_corpus)
    # the layers summed over, when factors of more layers serve a subset (Factors.check_model);
    # all the factors' layers record none, as runs did before subsets
    fewer_layers = sorted(engine.specs) != sorted(factors.specs)
    run = dict(run_meta or {}, factors=factors.id, damping=damping, model=engine.fingerprint(),
               layers=_layers_key(engine.specs) if fewer_layers else None)
    train, batched = _documents(train, "self_influence_corpus")
    # once, not once per chunk; the tracked layers' only
    on_device = factors.subset(engine.specs).preconditioners_on(next(engine.model.parameters()).device,
                                                               what="self_influence_corpus")

    def compute(subset):
        return engine.self_influence(batched(subset), on_device, damping=damping, batch_size=batch_size)

    return ChunkedRun(train, out_dir, kind=SELF_INFLUENCE_KIND, compute=compute, run=run, chunk_size=chunk_size,
                      log=log, final_meta=dict(factors_id=factors.id, damping=damping)).execute(shard)


def top_documents(scores: torch.Tensor, k: int, *, lowest: bool = False) -> List[List[int]]:
    """Per query (column of ``scores``), the indices of its ``k`` highest-scoring documents
    (``lowest=True``: its ``k`` lowest, the documents that most oppose the query's completion),
    in order; ties in document order, NaN scores last (a NaN is no evidence of influence).

    ``torch.topk`` finds each column's k-th value, and only the documents at or past it are
    sorted: no full sort (nor a float64 copy) of a ``[millions, queries]`` matrix."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"top_documents: k must be a non-negative integer, got {k!r}")
    if scores.dim() != 2:
        raise ValueError(f"top_documents: scores must be [documents, queries], got {tuple(scores.shape)}")
    k = min(k, scores.shape[0])
    if k == 0:
        return [[] for _ in range(scores.shape[1])]
    ranked = scores.detach().cpu()
    if not ranked.is_floating_point():
        ranked = ranked.double()
    # highest first in both cases: the lowest are the highest of the negated scores; one
    # query per row (contiguous: each query's pass below reads one stretch of memory)
    ranked = (-ranked if lowest else ranked).T.contiguous()
    order = []
    for column in ranked:
        nan = column.isnan()
        # NaN below every value, -inf included (topk would rank it first)
        keyed = column.masked_fill(nan, -float("inf"))
        kth = keyed.topk(k).values[-1]
        # every document at or past the k-th value (ties included), in document order
        candidates = (keyed >= kth).nonzero().squeeze(1)
        by_value = torch.sort(keyed[candidates], descending=True, stable=True).indices
        # then the NaN after the rest (a stable sort keeps each group's order)
        by_value = by_value[torch.sort(nan[candidates][by_value].to(torch.uint8), stable=True).indices]
        order.append(candidates[by_value[:k]].tolist())
    return order


def token_scores_of(engine, train, queries: Queries, documents: List[List[int]], *, batch_size: int = 8,
                    query_batch_size: Optional[int] = None, docs_per_pass: int = 256) -> torch.Tensor:
    """Per-token scores of chosen documents, each against its own query: ``documents[q]`` the
    document indices to show for query q (the same count for every query). Returns float32
    ``[n_queries, k, T]``: row ``[q, i]`` the per-token scores of document ``documents[q][i]``
    for query q, T the longest padded document among them (zeros past a document's end;
    position t serves the prediction of token t + 1: see
    :func:`pyinf.scoring.display_token_scores`).

    One pass over the documents' union (never over the corpus), ``docs_per_pass`` documents
    at a time, keeping only each document's own queries' columns: memory is ``k x T`` per query,
    not ``[union, T, n_queries]`` (at 80 queries of 100 documents of 2048 tokens: 65 MB, not
    up to 5.2 GB)."""
    train, batched = _documents(train, "token_scores_of")
    if len(documents) != queries.n_queries or len({len(d) for d in documents}) > 1:
        raise ValueError(f"token_scores_of: documents must hold one list per query ({queries.n_queries}), all of "
                         f"one length; got lengths {[len(d) for d in documents]}")
    if isinstance(docs_per_pass, bool) or not isinstance(docs_per_pass, int) or docs_per_pass < 1:
        raise ValueError(f"token_scores_of: docs_per_pass must be a positive integer, got {docs_per_pass!r}")
    k = len(documents[0]) if documents else 0
    wanted: Dict[int, List[Tuple[int, int]]] = {}  # document -> its (query, slot) pairs
    for q, per_query in enumerate(documents):
        for i, n in enumerate(per_query):
            wanted.setdefault(int(n), []).append((q, i))
    union = sorted(wanted)
    rows: Dict[Tuple[int, int], torch.Tensor] = {}
    for start in range(0, len(union), docs_per_pass):
        part = union[start:start + docs_per_pass]
        per_token = engine.pairwise_scores(batched(Subset(train, part)), queries, per_token=True,
                                           batch_size=batch_size, query_batch_size=query_batch_size)
        for row, n in enumerate(part):
            for q, i in wanted[n]:
                rows[q, i] = per_token[row, :, q].clone()  # not a view that keeps the whole block
        del per_token
    t = max((r.shape[0] for r in rows.values()), default=0)
    out = torch.zeros(len(documents), k, t, dtype=torch.float32)
    for (q, i), r in rows.items():
        out[q, i, :r.shape[0]] = r
    return out


def top_token_scores(engine, train, queries: Queries, scores: torch.Tensor, k: int, *, lowest: bool = False,
                     batch_size: int = 8, query_batch_size: Optional[int] = None):
    """Which tokens of the most influential documents carry the influence: each query's top
    ``k`` documents by ``scores`` (``lowest=True``: its k lowest, see :func:`top_documents`) and
    their per-token scores for that query, in one extra pass over those documents only (their
    union), never over the corpus. Returns ``(top, per_token)``: ``top[q]`` query q's document
    indices, ``per_token [n_queries, k, T]`` (:func:`token_scores_of`)."""
    top = top_documents(scores, k, lowest=lowest)
    return top, token_scores_of(engine, train, queries, top, batch_size=batch_size, query_batch_size=query_batch_size)
