"""The eigendecompositions of a fit: ``torch.linalg.eigh`` of every covariance, several at once.

A fit of a Pythia-160M-shaped model ends its first pass with 48 symmetric float64 matrices
(A and S of 24 layers, up to 3073 rows), and each needs ``eigh`` before the second pass can
start. On a GPU, ``torch.linalg.eigh`` (cuSOLVER ``syevd``) waits for the device at the end of
every call to check for failure, and one matrix of a few thousand rows runs long chains of
small, latency-bound kernels that leave most of the GPU idle. One after another, the 48 are
predicted to take seconds: most of a fit (benchmarks/RESULTS.md, row 8).

:func:`eigendecompose` splits the matrices over ``workers`` threads, largest first, and on
a GPU gives each thread its own CUDA stream, so that one thread's kernels run while another
waits. Each matrix still goes through the same routine on the same input, so the results
are the same bits as one after another (the tests check it); only the overlap changes.

Set ``workers`` per fit (``InfluenceEngine.fit_factors(..., eigh_workers=4)``,
``pyinf fit --eigh-workers 4``) or for the process (``PYINF_EIGH_WORKERS``). Otherwise a fit
on a GPU takes the count that measured fastest there (``EIGH_WORKERS`` in
``pyinf/ops/_preferences.py``, written by ``python -m benchmarks.preferences`` from the
``eigh`` benchmark section), and 1 (one after another) until that has been measured. On a
CPU the default is 1: LAPACK already uses every core for one matrix, so more workers only
oversubscribe it.
"""
from __future__ import annotations

import contextlib
import numbers
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Hashable, List, Mapping, Optional, Tuple

import torch

ENV_WORKERS = "PYINF_EIGH_WORKERS"


def resolve_workers(workers: Optional[int], device: Optional[torch.device] = None) -> int:
    """``workers`` if given, else ``$PYINF_EIGH_WORKERS``, else on a CUDA ``device`` the
    measured default (``pyinf.ops._preferences.EIGH_WORKERS``), else 1; a clear error for
    anything but a positive integer."""
    where = "eigh_workers"
    if workers is None:
        raw = os.environ.get(ENV_WORKERS, "").strip()
        if not raw:
            if device is not None and torch.device(device).type == "cuda":
                from .ops import _preferences

                return _preferences.EIGH_WORKERS or 1
            return 1
        where = f"${ENV_WORKERS}"
        try:
            workers = int(raw)
        except ValueError:
            raise ValueError(f"{where} must be a positive integer, got {raw!r}") from None
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1:
        raise ValueError(f"{where} must be a positive integer, got {workers!r}")
    return int(workers)  # numpy integers too


def _check(key: Hashable, m: torch.Tensor) -> None:
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{key}: eigh needs a square matrix, got shape {tuple(m.shape)}")
    if not m.is_floating_point():
        raise TypeError(f"{key}: eigh needs a floating-point matrix, got {m.dtype}")


def _balanced(keys: List[Hashable], sizes: Dict[Hashable, int], workers: int) -> List[List[Hashable]]:
    """Keys split into ``workers`` lists of about equal cost (n^3), largest first: each key
    goes to the least loaded list. The split depends only on the sizes, so a run is
    repeatable."""
    order = sorted(keys, key=lambda k: -sizes[k])
    lists: List[List[Hashable]] = [[] for _ in range(workers)]
    load = [0] * workers
    for k in order:
        i = min(range(workers), key=lambda j: (load[j], j))
        lists[i].append(k)
        load[i] += sizes[k] ** 3
    return [lst for lst in lists if lst]


def _all_finite(ms: List[torch.Tensor]) -> List[bool]:
    """One flag per matrix, read back once per device."""
    flags = [m.isfinite().all() for m in ms]
    if len({f.device for f in flags}) == 1 and flags:
        return torch.stack(flags).tolist()
    return [bool(f) for f in flags]


def _eigh(key: Hashable, m: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    try:
        return torch.linalg.eigh(m)
    except RuntimeError as exc:  # e.g. no convergence: say which matrix
        raise RuntimeError(f"{key}: eigh failed ({m.shape[0]}x{m.shape[1]} {m.dtype}): {exc}") from exc


def eigendecompose(matrices: Mapping[Hashable, torch.Tensor], *,
                   workers: Optional[int] = None) -> Dict[Hashable, Tuple[torch.Tensor, torch.Tensor]]:
    """``{key: torch.linalg.eigh(m)}`` (ascending eigenvalues, eigenvectors as columns), the
    matrices split over ``workers`` threads (see the module docstring). The matrices are
    used as given (the fit passes float64). Keys name the matrix in errors."""
    workers = resolve_workers(workers)
    for key, m in matrices.items():
        _check(key, m)
    keys = list(matrices)
    # eigh reads one triangle and returns garbage, not an error, for NaN or Inf there:
    # check them all with one read-back
    bad = [k for k, ok in zip(keys, _all_finite([matrices[k] for k in keys])) if not ok]
    if bad:
        raise ValueError(f"{bad[0]}: non-finite entries, cannot eigendecompose"
                         + (f" ({len(bad) - 1} more matrices too)" if len(bad) > 1 else ""))
    devices = {m.device for m in matrices.values()}
    if workers == 1 or len(keys) <= 1 or len(devices) > 1:  # (several devices: nothing to overlap)
        return {k: _eigh(k, matrices[k]) for k in keys}
    (device,) = devices
    plan = _balanced(keys, {k: matrices[k].shape[0] for k in keys}, workers)
    out: Dict[Hashable, Tuple[torch.Tensor, torch.Tensor]] = {}
    lock = threading.Lock()
    # On a GPU, one stream per worker. The matrices were written on the caller's stream:
    # each worker stream waits for it first, and the caller waits for every worker stream
    # at the end. Memory crossing streams is recorded on the stream that uses it, so the
    # caching allocator never hands it out again while that stream may still read it.
    gpu = device.type == "cuda"
    caller = torch.cuda.current_stream(device) if gpu else None
    streams = [torch.cuda.Stream(device=device) if gpu else None for _ in plan]

    def work(chunk, stream):
        with _worker_stream(device, stream, caller):
            for k in chunk:
                m = matrices[k]
                if gpu:
                    m.record_stream(stream)
                vals, vecs = _eigh(k, m)
                if gpu:
                    vals.record_stream(caller)
                    vecs.record_stream(caller)
                with lock:
                    out[k] = (vals, vecs)

    errors = []
    with ThreadPoolExecutor(max_workers=len(plan), thread_name_prefix="pyinf-eigh") as pool:
        for f in [pool.submit(work, chunk, stream) for chunk, stream in zip(plan, streams)]:
            try:
                f.result()
            except Exception as exc:  # every worker finishes (and is waited for) before raising
                errors.append(exc)
    for s in streams:
        if s is not None:
            caller.wait_stream(s)
    if errors:
        raise errors[0]
    return {k: out[k] for k in keys}


@contextlib.contextmanager
def _worker_stream(device: torch.device, stream, caller):
    """A worker thread's CUDA context: the matrices' device (a new thread starts on the
    default one) and its own stream, after the caller's queued work. Nothing on a CPU."""
    if stream is None:
        yield
        return
    with torch.cuda.device(device), torch.cuda.stream(stream):
        stream.wait_stream(caller)
        yield
