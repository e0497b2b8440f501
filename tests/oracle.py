"""Float64 oracles for the ops contract, written from the math in DESIGN.md section 1
and independent of pyinf's own code: per-document gradients are built explicitly."""
import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor = None) -> float:
    """||out - ref|| / ||ref||, or / ||scale|| when given: for a score that is a sum of
    terms of both signs, `scale` is the same sum over absolute values (see
    factored_scores(..., absolute=True)), the quantity a rounding-error bound is relative to.
    Relative to ||ref|| alone, a sum that cancels to near zero (a 5-token document of
    random numbers) turns fp32 rounding into a spurious 1e-4 failure."""
    out, ref = out.double().cpu(), ref.double().cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "result has NaN or Inf"
    denom = (ref if scale is None else scale.double().cpu()).norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


# DESIGN.md section 5: fp32 well under 1e-4, tf32 near 3e-4, bf16/fp16 inputs under 1e-2.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-10}
# eigen_correction and self_influence return squares of rotated values: the 16-bit
# backends round the eigenbases and the rotated values to the input dtype, and a square
# doubles the relative error of what it squares. Measured (Triton, bf16, 300 fresh inputs of
# the smallest test shape, d_in = 1, d_out = 3, where nothing averages out): median 3.5e-3,
# p99 1.3e-2, max 1.4e-2. So twice TOLERANCE for 16-bit inputs.
SQUARED_TOLERANCE = {**TOLERANCE, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def _mask64(mask, n, t):
    if mask is None:
        return torch.ones(n, t, dtype=torch.float64)
    return (mask.cpu() != 0).double()


def doc_gradients(acts, grads, mask=None):
    """DW[n] = sum_t mask[n,t] g[n,t] a[n,t]^T, float64, [N, d_out, d_in]."""
    a, g = acts.double().cpu(), grads.double().cpu()
    m = _mask64(mask, a.shape[0], a.shape[1])
    return torch.einsum("nt,nto,nti->noi", m, g, a)


def covariance(x, mask=None):
    x64 = x.double().cpu()
    m = _mask64(mask, x.shape[0], x.shape[1])
    return torch.einsum("nt,nti,ntj->ij", m, x64, x64)


def eigen_correction(acts, grads, q_a, q_s, mask=None):
    dw = doc_gradients(acts, grads, mask)
    rot = q_s.double().cpu().T @ dw @ q_a.double().cpu()
    return rot.square().sum(0)


def self_influence(acts, grads, q_a, q_s, lambdas, damping, mask=None):
    dw = doc_gradients(acts, grads, mask)
    rot = q_s.double().cpu().T @ dw @ q_a.double().cpu()
    return (rot.square() / (lambdas.double().cpu() + damping)).sum((1, 2))


def factored_scores(acts, grads, left, right, mask=None, per_token=False, absolute=False):
    """``absolute``: the same sums over the absolute values of every factor (rel_err's scale)."""
    f = (lambda x: x.double().cpu().abs()) if absolute else (lambda x: x.double().cpu())
    a, g = f(acts), f(grads)
    m = _mask64(mask, a.shape[0], a.shape[1])
    gl = torch.einsum("nto,qok->ntqk", g, f(left))
    ar = torch.einsum("nti,qik->ntqk", a, f(right))
    per_tok = (gl * ar).sum(-1) * m.unsqueeze(-1)
    return per_tok if per_token else per_tok.sum(1)


def dense_scores(acts, grads, dense, mask=None, per_token=False, absolute=False):
    """``absolute``: the same sums over the absolute values of every factor (rel_err's scale)."""
    f = (lambda x: x.double().cpu().abs()) if absolute else (lambda x: x.double().cpu())
    a, g = f(acts), f(grads)
    m = _mask64(mask, a.shape[0], a.shape[1])
    per_tok = torch.einsum("nto,qoi,nti->ntq", g, f(dense), a) * m.unsqueeze(-1)
    return per_tok if per_token else per_tok.sum(1)


def cross_entropy_rows(logits, labels):
    """(loss [R], gradient [R, V]) in float64: logsumexp - x[y], softmax - onehot."""
    x = logits.double().cpu()
    y = labels.cpu()
    lse = torch.logsumexp(x, dim=-1)
    loss = lse - x[torch.arange(x.shape[0]), y]
    grad = torch.softmax(x, dim=-1) - torch.nn.functional.one_hot(y, x.shape[1]).double()
    return loss, grad
