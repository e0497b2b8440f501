import os

import torch

# Triton kernels run on CPU through Triton's interpreter; it must be chosen before triton
# is imported anywhere. On a GPU machine the kernels run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
