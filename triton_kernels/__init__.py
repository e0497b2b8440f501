"""Fused Triton kernels of pyinf, one op per file (Liger-Kernel style):

- covariance.py        masked x^T x, upper-triangle tiles mirrored, exactly symmetric
- factored_scores.py   low-rank query scores, pairwise and per-token, grouped over layers
- eigen_correction.py  EK-FAC Lambda without the [N, d_out, d_in] temporary
- self_influence.py    self-influence, same contraction with a damped-inverse epilogue
- cross_entropy.py     softmax cross-entropy of logit rows, gradient written in place (LM head)
- _shared.py           dot helper, config selection, masked rotation GEMM, chunk planner

Each file holds its kernel(s), the H100 launch configs (an explicit table, no autotuning at
first call) and a Python launcher; pyinf.ops._triton adapts the pyinf.ops contract to them.
Every kernel is deterministic (no atomics; split reductions are summed in a fixed order).
Under TRITON_INTERPRET=1 the same kernels run on CPU tensors with one small fixed config.
"""
