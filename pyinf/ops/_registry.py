"""Backend registry for :mod:`pyinf.ops`.

A backend is a module that defines the op functions under their op names (same
signatures as :mod:`pyinf.ops.reference`, inputs already validated, mask a bool tensor
or None) and, optionally, ``unsupported_reason(op, tensors) -> str | None`` saying why it
cannot run a given call (wrong device, dtype, ...). A backend that fails to import is
unavailable; asking for it by name raises with the import error, while ``"auto"`` falls
back to the next candidate.
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Dict, Optional, Sequence

import torch

BACKENDS: Dict[str, str] = {
    "torch": "pyinf.ops.reference",
    "triton": "pyinf.ops._triton",
    "native": "pyinf.ops._native",
}

# Order in which "auto" tries backends on a CUDA device when no measured preference
# (pyinf.ops._preferences) covers the call. The torch reference always works. The native
# CUDA kernels join auto only through measured preferences: until a GPU run has timed
# them against Triton, they run when asked for by name.
CUDA_ORDER: Sequence[str] = ("triton", "torch")


class BackendUnavailable(RuntimeError):
    """Raised when a backend asked for by name cannot run the call."""


_loaded: Dict[str, ModuleType] = {}
_failures: Dict[str, str] = {}


def load(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise ValueError(f"unknown pyinf backend {name!r}; choose one of 'auto', {', '.join(map(repr, BACKENDS))}")
    if name in _loaded:
        return _loaded[name]
    if name in _failures:
        raise BackendUnavailable(_failures[name])
    try:
        module = importlib.import_module(BACKENDS[name])
    except Exception as exc:  # ImportError, or a broken toolchain raising at import
        _failures[name] = f"pyinf backend {name!r} is not available: {type(exc).__name__}: {exc}"
        raise BackendUnavailable(_failures[name]) from exc
    _loaded[name] = module
    return module


def loaded_modules():
    """The backends imported so far (a backend never imported holds nothing)."""
    return _loaded.values()


@functools.lru_cache(maxsize=None)
def _capability(index: int):
    return torch.cuda.get_device_capability(index)


def older_than_ampere(tensors, what: str = "the fused kernels need") -> Optional[str]:
    """Why a kernel does not run on these tensors' GPU, if it predates sm_80; else None."""
    for t in tensors:
        if t is not None and t.device.type == "cuda":
            major, minor = _capability(t.device.index if t.device.index is not None else torch.cuda.current_device())
            if major < 8:
                return f"{what} an sm_80 or newer GPU, {t.device} is sm_{major}{minor}"
    return None


def _gpu_reason(name: str, tensors) -> Optional[str]:
    """The native build's oldest architecture is sm_80 (older GPUs: 'no kernel image' at
    launch); Triton's bf16 dots need sm_80, its fp32 and fp16 kernels run on older GPUs."""
    if name == "native":
        return older_than_ampere(tensors, "the native CUDA kernels need")
    if name == "triton" and any(t is not None and t.dtype == torch.bfloat16 for t in tensors):
        return older_than_ampere(tensors, "the Triton kernels on bf16 need")
    return None


def unsupported_reason(name: str, op: str, tensors: Sequence[Optional[torch.Tensor]]) -> Optional[str]:
    """None when backend `name` can run `op` on these tensors, else why not."""
    try:
        module = load(name)
    except BackendUnavailable as exc:
        return str(exc)
    if not hasattr(module, op):
        return f"pyinf backend {name!r} does not implement {op!r}"
    tensors = [t for t in tensors if t is not None]
    if name != "torch" and any(t.is_neg() for t in tensors):
        # a kernel reads the memory, not torch's view of it: the values would come out negated
        return ("an input is a lazily negated view (torch's negative bit, e.g. from .conj().imag), which a "
                "kernel would read unnegated; call .resolve_neg() on it first")
    old_gpu = _gpu_reason(name, tensors)
    if old_gpu is not None:
        return old_gpu
    check = getattr(module, "unsupported_reason", None)
    return check(op, tensors) if check is not None else None


def available_backends() -> Dict[str, Optional[str]]:
    """Each backend's name -> None if it imports, else the reason it does not."""
    out = {}
    for name in BACKENDS:
        try:
            load(name)
            out[name] = None
        except BackendUnavailable as exc:
            out[name] = str(exc)
    return out
