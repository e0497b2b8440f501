"""pyinf: EK-FAC influence functions with fused kernels."""
from . import ops

__version__ = "0.1.0"
