"""Row padding for kernel-friendly layouts.

A layer with a bias has d + 1 inputs (769, 3073, ...). A buffer with that row width puts
every row start off a 16-byte boundary, and the Triton kernels then lose their 16-byte,
pipelined loads. The tensors pyinf builds for the kernels (the capture's bias-augmented
activations, the eigenbases cast to bf16) are therefore views of buffers whose rows are
padded to a multiple of ROW_ALIGN elements. (``triton_kernels.eigen_correction.load_width``
pads the kernels' own temporaries the same way.)
"""
from __future__ import annotations

import torch

ROW_ALIGN = 16  # elements: 32 bytes for bf16, 64 for fp32


def padded_width(n: int) -> int:
    return -(-n // ROW_ALIGN) * ROW_ALIGN


def padded_empty(*shape: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised tensor of `shape` that views a buffer whose last dimension is padded
    to ROW_ALIGN; the padding (never part of the view) holds zeros."""
    *lead, n = shape
    buf = torch.empty(*lead, padded_width(n), dtype=dtype, device=device)
    buf[..., n:] = 0
    return buf[..., :n]
