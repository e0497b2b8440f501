"""pyinf benchmark suite: kernel benchmarks (bench_ops), end to end against kronfluence
(bench_e2e), and ``python -m benchmarks.run`` that runs them all and writes the results.

This module holds the measurement helpers shared by the suite: device choice, timing
(median of many runs after warm-up; CUDA events on a GPU), peak-memory deltas and the
environment description written next to every result.
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional

import torch

# Triton kernels run on CPU through Triton's interpreter, which must be chosen before
# triton is imported anywhere (same rule as tests/conftest.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


class OutOfTime(BaseException):
    """The run's time limit was reached (SIGTERM from ``timeout``; see :func:`stop_on_sigterm`).

    A ``BaseException``, so that the ``except Exception`` guards around single benchmark runs
    let it through: each section catches it once, at its top, and returns what it has measured
    so far, marked as stopped."""


_STOPPED = False


def stop_on_sigterm() -> None:
    """Turn the first SIGTERM into :class:`OutOfTime` in the main thread.

    A GPU session runs each step of the suite under ``timeout``: without this, a step that
    runs past its limit dies with every measurement of its section unsaved, because
    ``benchmarks.run`` writes its JSON and markdown at the end. With it, the section in
    progress keeps its finished measurements, later sections are not started, and the
    results are written as usual (``timeout -k`` still kills a run that then hangs)."""
    import signal

    def handler(signum, frame):
        global _STOPPED
        if _STOPPED:  # a second SIGTERM while the results are being written: let them finish
            return
        _STOPPED = True
        raise OutOfTime("stopped by SIGTERM (the step's time limit)")

    signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def until_out_of_time(skipped: List[Dict[str, object]], **what):
    """Run the block; if the time limit stops it, note that in `skipped` (``what`` plus the
    reason) and carry on after the block with what it measured."""
    try:
        yield
    except OutOfTime as exc:
        skipped.append(dict(what, reason=f"out of time: {exc}"))


def out_of_time() -> bool:
    """Whether :class:`OutOfTime` has been raised in this process (no new section starts)."""
    return _STOPPED


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, min_reps: int = 5,
            max_reps: int = 100, target_s: float = 0.5) -> Dict[str, float]:
    """Median time of ``fn()`` in milliseconds after ``warmup`` calls.

    The number of timed repetitions is chosen so that they take about ``target_s`` in all
    (within ``[min_reps, max_reps]``). On CUDA every repetition is bracketed by CUDA events
    (device time of the queued work); on CPU by ``time.perf_counter``.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    estimate = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(max_reps, max(min_reps, target_s / estimate)))
    samples: List[float] = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        samples = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    q = lambda f: samples[min(len(samples) - 1, int(f * len(samples)))]  # noqa: E731
    return dict(ms=statistics.median(samples), p20_ms=q(0.2), p80_ms=q(0.8), min_ms=samples[0], reps=len(samples))


def peak_extra_bytes(fn: Callable[[], object], device: torch.device, with_result: bool = False):
    """Peak memory ``fn()`` allocates on top of what is already allocated (its result
    included), from ``torch.cuda.max_memory_allocated`` deltas; None off CUDA. With
    ``with_result``: (that peak, the result), so a caller can tell the result's bytes apart."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = int(torch.cuda.max_memory_allocated(device) - base)
    if with_result:
        return peak, out
    del out
    return peak


class WallTimer:
    """Wall-clock seconds of a block, synchronising the device on entry and exit, and the
    peak memory allocated during it (CUDA only; ``peak_bytes`` is the absolute peak)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = float("nan")
        self.peak_bytes: Optional[int] = None

    def __enter__(self):
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0
        if self.device.type == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        return False


def _version(module_name: str) -> Optional[str]:
    try:
        module = __import__(module_name)
        return getattr(module, "__version__", "unknown")
    except Exception:
        return None


def _git_rev() -> Optional[str]:
    """The commit measured: git's, else $PYINF_GIT_REV (the GPU machine gets a copy of the
    working tree without .git: `make wheelhouse` records the commit in .wheelhouse/REV, which
    gpu_session.sh exports)."""
    if os.environ.get("PYINF_GIT_REV"):
        return os.environ["PYINF_GIT_REV"]
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
        rev = out.stdout.strip()
        return (rev + ("+dirty" if dirty.stdout.strip() else "")) if rev else None
    except Exception:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> Dict[str, object]:
    """What the numbers were measured on."""
    env: Dict[str, object] = dict(
        device_type=device.type,
        device_name=(torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()),
        cpu_threads=torch.get_num_threads(),
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=_version("triton"),
        transformers=_version("transformers"),
        kronfluence=_version("kronfluence"),
        pyinf=_version("pyinf"),
        git=_git_rev(),
        triton_interpret=os.environ.get("TRITON_INTERPRET"),
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        env["sm_count"] = props.multi_processor_count
    return env
