"""Input validation shared by every backend of :mod:`pyinf.ops`.

Each op validates once, here, before any backend sees the tensors, so that a bad call
fails with a message that names the argument, its shape and its dtype, whichever
backend would have run it.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, ndim: int, *, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"pyinf.ops.{op}: '{name}' must be a torch.Tensor, got {type(t).__name__}")
    check_dense(op, name, t)
    if t.dim() != ndim:
        raise ValueError(f"pyinf.ops.{op}: '{name}' must have {ndim} dimensions, got {_describe(t)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"pyinf.ops.{op}: '{name}' must be float32, bfloat16, float16 or float64, got {_describe(t)}"
        )


def check_dense(op: str, name: str, t: torch.Tensor) -> None:
    """A strided tensor: a sparse or nested one has no strides for a kernel to follow."""
    if t.layout != torch.strided or t.is_nested:
        raise TypeError(f"pyinf.ops.{op}: '{name}' must be a dense (strided) tensor, got layout {t.layout}"
                        f"{' (nested)' if t.is_nested else ''}; call .to_dense() on it")


def check_same_device(op: str, **tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"pyinf.ops.{op}: all tensors must be on one device, got {listing}")


def check_mask(op: str, mask: Optional[torch.Tensor], n: int, t: int) -> Optional[torch.Tensor]:
    """Returns the mask as a bool tensor of shape [n, t] (or None)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"pyinf.ops.{op}: 'mask' must be a torch.Tensor or None, got {type(mask).__name__}")
    check_dense(op, "mask", mask)
    if tuple(mask.shape) != (n, t):
        raise ValueError(f"pyinf.ops.{op}: 'mask' must have shape [N, T] = [{n}, {t}], got {_describe(mask)}")
    if mask.dtype == torch.bool:  # no values to check: no host sync
        return mask
    if mask.dtype.is_complex:
        raise TypeError(f"pyinf.ops.{op}: 'mask' must be bool or 0/1 numbers, got {_describe(mask)}")
    keep = mask != 0
    # one host sync (pass a bool mask to avoid it): 0.5 or NaN is no answer to "keep this token?"
    if not bool((keep == (mask == 1)).all()):
        raise ValueError(f"pyinf.ops.{op}: 'mask' must hold only 0 and 1 (or be bool), got other values "
                         f"({_describe(mask)})")
    return keep


def check_flag(where: str, name: str, value) -> bool:
    """A yes/no argument: a bool (numpy's too) or 0/1; anything else is refused by name."""
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")  # numpy 1, 2
    if isinstance(value, bool) or numpy_bool or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{where}: '{name}' must be True or False, got {value!r}")


def check_instance(where: str, name: str, value, cls: type) -> None:
    """`value` must be a `cls` (Factors where Queries go, and the reverse, are easy to swap)."""
    if not isinstance(value, cls):
        raise TypeError(f"{where}: '{name}' must be a pyinf {cls.__name__}, got {type(value).__name__}")


def check_tokens(op: str, acts: torch.Tensor, grads: torch.Tensor) -> None:
    check_tensor("acts", acts, 3, op=op)
    check_tensor("grads", grads, 3, op=op)
    if acts.shape[:2] != grads.shape[:2]:
        raise ValueError(
            f"pyinf.ops.{op}: 'acts' and 'grads' must share [N, T], got acts {tuple(acts.shape)} "
            f"and grads {tuple(grads.shape)}"
        )


def check_eigenbases(op: str, acts, grads, q_a, q_s) -> None:
    check_tensor("q_a", q_a, 2, op=op)
    check_tensor("q_s", q_s, 2, op=op)
    d_in, d_out = acts.shape[-1], grads.shape[-1]
    if tuple(q_a.shape) != (d_in, d_in):
        raise ValueError(f"pyinf.ops.{op}: 'q_a' must be [d_in, d_in] = [{d_in}, {d_in}], got {_describe(q_a)}")
    if tuple(q_s.shape) != (d_out, d_out):
        raise ValueError(
            f"pyinf.ops.{op}: 'q_s' must be [d_out, d_out] = [{d_out}, {d_out}], got {_describe(q_s)}"
        )


def check_query_factors(op: str, acts, grads, left, right) -> None:
    check_tensor("left", left, 3, op=op)
    check_tensor("right", right, 3, op=op)
    d_in, d_out = acts.shape[-1], grads.shape[-1]
    if left.shape[0] != right.shape[0] or left.shape[2] != right.shape[2]:
        raise ValueError(
            f"pyinf.ops.{op}: 'left' [Q, d_out, r] and 'right' [Q, d_in, r] must share Q and r, got "
            f"left {tuple(left.shape)} and right {tuple(right.shape)}"
        )
    if left.shape[1] != d_out:
        raise ValueError(f"pyinf.ops.{op}: 'left' must be [Q, d_out={d_out}, r], got {_describe(left)}")
    if right.shape[1] != d_in:
        raise ValueError(f"pyinf.ops.{op}: 'right' must be [Q, d_in={d_in}, r], got {_describe(right)}")


def check_dense_queries(op: str, acts, grads, dense) -> None:
    check_tensor("dense", dense, 3, op=op)
    d_in, d_out = acts.shape[-1], grads.shape[-1]
    if tuple(dense.shape[1:]) != (d_out, d_in):
        raise ValueError(f"pyinf.ops.{op}: 'dense' must be [Q, d_out={d_out}, d_in={d_in}], got {_describe(dense)}")


def check_lambdas(op: str, lambdas, damping, d_out: int, d_in: int) -> float:
    check_tensor("lambdas", lambdas, 2, op=op)
    if tuple(lambdas.shape) != (d_out, d_in):
        raise ValueError(f"pyinf.ops.{op}: 'lambdas' must be [d_out, d_in] = [{d_out}, {d_in}], got {_describe(lambdas)}")
    return check_damping(f"pyinf.ops.{op}: ", damping)


def check_damping(where: str, damping) -> float:
    """A damping: a finite non-negative number (a Python, numpy or one-element torch scalar)."""
    given = damping
    try:
        if isinstance(damping, torch.Tensor):
            if damping.numel() != 1:
                raise ValueError(f"{where}'damping' must be a scalar, got {_describe(damping)}")
            if damping.requires_grad and torch.is_grad_enabled():  # float() would drop its gradient silently
                raise ValueError(f"{where}'damping' requires a gradient, which no op computes for it: pass a "
                                 f"number or a detached tensor")
            damping = float(damping)
        if isinstance(damping, numbers.Real) and not isinstance(damping, bool):  # numpy scalars too
            damping = float(damping)
    except (OverflowError, RuntimeError) as exc:  # an int past float's range; a meta tensor has no value
        raise ValueError(f"{where}'damping' must be a finite non-negative number, got {given!r} ({exc})") from None
    if not isinstance(damping, float) or not (0 <= damping < float("inf")):  # NaN fails both
        raise ValueError(f"{where}'damping' must be a finite non-negative number, got {damping!r}")
    return damping


def accum_dtype(*tensors) -> torch.dtype:
    """fp32 accumulation always; fp64 when any input is fp64 (used by the exact-math tests)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
