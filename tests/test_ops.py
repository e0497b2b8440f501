"""Every op of pyinf.ops, on every backend that can run here, against the float64 oracle:
fresh random inputs each run, odd sizes, masks (a fully masked document included), T=1,
Q*r not a multiple of any block size, fp32 / bf16 / fp16 inputs."""
import pytest
import torch

import pyinf.ops as ops
from pyinf.ops import _registry

from . import oracle


def _backend_params():
    params = []
    for name in ops.BACKENDS:
        devices = ["cpu"] if name != "triton" else []
        if torch.cuda.is_available() and name != "torch":
            devices.append("cuda")
        if name == "triton" and not torch.cuda.is_available():
            devices.append("cpu")  # Triton's interpreter (TRITON_INTERPRET=1, set in conftest)
        for dev in devices:
            params.append(pytest.param((name, dev), id=f"{name}-{dev}"))
    return params


BACKEND_PARAMS = _backend_params()

# (N, T, d_in, d_out, Q, r): odd sizes, T=1, a single document, Q*r off any block multiple.
SHAPES = [
    (3, 7, 13, 11, 3, 5),
    (1, 1, 9, 6, 2, 3),
    (4, 33, 20, 17, 5, 7),
    (2, 5, 1, 3, 1, 1),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tolerance(dtype, backend, device, op):
    """The relative error allowed against the float64 oracle. The oracle is given the very
    16-bit tensors the backend gets (float64 holds them exactly), so for 16-bit inputs the
    only error is the fp32 accumulation: factored_scores on the torch backend, seeds 0-29 of
    SHAPES on a CPU, measured median 7e-8 and at most 4.5e-7 (bf16; fp16 9.6e-8, 2.9e-7). An
    emulated 16-bit accumulation of factored_scores measured median 4.8e-4 (bf16) and 6.6e-5
    (fp16), at least 8e-6 (fp16). So 1e-5 on a CPU and 2e-5 on a GPU (other accumulation
    orders, not measured yet) fail it in nearly every case (not the rare fp16 one near 8e-6),
    and an all-zero result always. The exceptions are the eigen ops (squares of rotated
    values) where the backend rounds on purpose: Triton's, which casts the fp32 eigenbases to
    the input dtype, and the native CUDA kernels', which rotate in TF32
    (oracle.SQUARED_TOLERANCE)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return oracle.TOLERANCE[dtype]
    if op in ("eigen_correction", "self_influence") and (backend == "triton" or device == "cuda"):
        return oracle.SQUARED_TOLERANCE[dtype]
    return 1e-5 if device == "cpu" else 2e-5


def _skip_unless_runs(backend, device, op, tensors):
    reason = _registry.unsupported_reason(backend, op, tensors)
    if reason is not None:
        pytest.skip(reason)


def _orthonormal(d, device):
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    return q.float().to(device)


def _mask(n, t, kind, device):
    if kind == "none":
        return None
    m = torch.rand(n, t) > 0.35
    if n > 1:
        m[-1] = False  # a document that is all padding
    m[0, 0] = True
    return (m if kind == "bool" else m.to(torch.int64)).to(device)


def _inputs(shape, dtype, device):
    n, t, d_in, d_out, q, r = shape
    acts = torch.randn(n, t, d_in).to(dtype).to(device)
    grads = torch.randn(n, t, d_out).to(dtype).to(device)
    return acts, grads


@pytest.mark.parametrize("backend_device", BACKEND_PARAMS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "int"])
def test_covariance(backend_device, shape, dtype, mask_kind):
    backend, device = backend_device
    acts, _ = _inputs(shape, dtype, device)
    mask = _mask(shape[0], shape[1], mask_kind, device)
    _skip_unless_runs(backend, device, "covariance", [acts])
    out = ops.covariance(acts, mask=mask, backend=backend)
    assert out.dtype == torch.float32 and out.device.type == device
    assert oracle.rel_err(out, oracle.covariance(acts, mask)) < _tolerance(dtype, backend, device, "covariance")
    assert torch.allclose(out, out.T), "covariance must be exactly symmetric"


@pytest.mark.parametrize("backend_device", BACKEND_PARAMS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "bool"])
def test_eigen_correction(backend_device, shape, dtype, mask_kind):
    backend, device = backend_device
    acts, grads = _inputs(shape, dtype, device)
    q_a, q_s = _orthonormal(shape[2], device), _orthonormal(shape[3], device)
    mask = _mask(shape[0], shape[1], mask_kind, device)
    _skip_unless_runs(backend, device, "eigen_correction", [acts, grads, q_a, q_s])
    out = ops.eigen_correction(acts, grads, q_a, q_s, mask=mask, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (shape[3], shape[2])
    err = oracle.rel_err(out, oracle.eigen_correction(acts, grads, q_a, q_s, mask))
    assert err < _tolerance(dtype, backend, device, "eigen_correction")


@pytest.mark.parametrize("backend_device", BACKEND_PARAMS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "bool"])
def test_self_influence(backend_device, shape, dtype, mask_kind):
    backend, device = backend_device
    acts, grads = _inputs(shape, dtype, device)
    q_a, q_s = _orthonormal(shape[2], device), _orthonormal(shape[3], device)
    lambdas = torch.rand(shape[3], shape[2]).to(device) * 3
    damping = 0.1 + torch.rand(()).item()
    mask = _mask(shape[0], shape[1], mask_kind, device)
    _skip_unless_runs(backend, device, "self_influence", [acts, grads, q_a, q_s, lambdas])
    out = ops.self_influence(acts, grads, q_a, q_s, lambdas, damping, mask=mask, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (shape[0],)
    ref = oracle.self_influence(acts, grads, q_a, q_s, lambdas, damping, mask)
    assert oracle.rel_err(out, ref) < _tolerance(dtype, backend, device, "self_influence")


@pytest.mark.parametrize("backend_device", BACKEND_PARAMS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "int"])
@pytest.mark.parametrize("per_token", [False, True])
def test_factored_scores(backend_device, shape, dtype, mask_kind, per_token):
    backend, device = backend_device
    n, t, d_in, d_out, q, r = shape
    acts, grads = _inputs(shape, dtype, device)
    left = torch.randn(q, d_out, r).to(dtype).to(device)
    right = torch.randn(q, d_in, r).to(dtype).to(device)
    mask = _mask(n, t, mask_kind, device)
    _skip_unless_runs(backend, device, "factored_scores", [acts, grads, left, right])
    out = ops.factored_scores(acts, grads, left, right, mask=mask, per_token=per_token, backend=backend)
    assert out.dtype == torch.float32 and out.shape == ((n, t, q) if per_token else (n, q))
    ref = oracle.factored_scores(acts, grads, left, right, mask, per_token)
    scale = oracle.factored_scores(acts, grads, left, right, mask, per_token, absolute=True)
    assert oracle.rel_err(out, ref, scale) < _tolerance(dtype, backend, device, "factored_scores")


@pytest.mark.parametrize("backend_device", BACKEND_PARAMS)
@pytest.mark.parametrize("per_token", [False, True])
def test_factored_scores_grouped(backend_device, per_token):
    backend, device = backend_device
    n, q = 3, 4
    problems = []
    for (t, d_in, d_out, r) in [(5, 9, 12, 3), (5, 16, 7, 3), (5, 4, 4, 3)]:
        acts, grads = torch.randn(n, t, d_in, device=device), torch.randn(n, t, d_out, device=device)
        problems.append(dict(acts=acts, grads=grads, left=torch.randn(q, d_out, r, device=device),
                             right=torch.randn(q, d_in, r, device=device), mask=_mask(n, t, "bool", device)))
    tensors = [p[k] for p in problems for k in ("acts", "grads", "left", "right")]
    _skip_unless_runs(backend, device, "factored_scores_grouped", tensors)
    outs = ops.factored_scores_grouped(problems, per_token=per_token, backend=backend)
    for p, out in zip(problems, outs):
        args = (p["acts"], p["grads"], p["left"], p["right"], p["mask"], per_token)
        assert oracle.rel_err(out, oracle.factored_scores(*args), oracle.factored_scores(*args, absolute=True)) < 1e-4


@pytest.mark.parametrize("backend_device", BACKEND_PARAMS)
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 6, 10, 7, 4), (2, 37, 20, 33, 3), (1, 1, 17, 5, 1)])
@pytest.mark.parametrize("mask_kind", ["none", "bool"])
def test_dense_scores(backend_device, per_token, dtype, shape, mask_kind):
    backend, device = backend_device
    n, t, d_in, d_out, q = shape
    acts, grads = _inputs((n, t, d_in, d_out, q, 1), dtype, device)
    dense = torch.randn(q, d_out, d_in).to(dtype).to(device)
    mask = _mask(n, t, mask_kind, device)
    _skip_unless_runs(backend, device, "dense_scores", [acts, grads, dense])
    out = ops.dense_scores(acts, grads, dense, mask=mask, per_token=per_token, backend=backend)
    ref = oracle.dense_scores(acts, grads, dense, mask, per_token)
    scale = oracle.dense_scores(acts, grads, dense, mask, per_token, absolute=True)
    assert oracle.rel_err(out, ref, scale) < _tolerance(dtype, backend, device, "dense_scores")


def test_fp64_stays_exact_on_reference():
    acts, grads = torch.randn(2, 5, 6, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    left, right = torch.randn(3, 4, 2, dtype=torch.float64), torch.randn(3, 6, 2, dtype=torch.float64)
    out = ops.factored_scores(acts, grads, left, right)
    assert out.dtype == torch.float64
    assert oracle.rel_err(out, oracle.factored_scores(acts, grads, left, right)) < 1e-12


def test_padding_garbage_never_leaks():
    """NaN/Inf in masked-out rows must not reach a result: each result is the oracle's on the
    same inputs with the padding zeroed (rel_err also refuses a non-finite result)."""
    acts, grads = torch.randn(2, 4, 5), torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    clean_a, clean_g = acts * mask[..., None], grads * mask[..., None]
    acts[~mask] = float("nan")
    grads[~mask] = float("inf")
    q_a, q_s = _orthonormal(5, "cpu"), _orthonormal(3, "cpu")
    left, right = torch.randn(2, 3, 2), torch.randn(2, 5, 2)
    lambdas = torch.rand(3, 5) + 0.1
    for backend, reason in ops.available_backends().items():
        if reason is not None:
            continue
        assert oracle.rel_err(ops.covariance(acts, mask=mask, backend=backend), oracle.covariance(clean_a)) < 1e-5
        assert oracle.rel_err(ops.eigen_correction(acts, grads, q_a, q_s, mask=mask, backend=backend),
                              oracle.eigen_correction(clean_a, clean_g, q_a, q_s)) < 1e-4
        assert oracle.rel_err(ops.self_influence(acts, grads, q_a, q_s, lambdas, 0.1, mask=mask, backend=backend),
                              oracle.self_influence(clean_a, clean_g, q_a, q_s, lambdas, 0.1)) < 1e-4
        out = ops.factored_scores(acts, grads, left, right, mask=mask, per_token=True, backend=backend)
        assert oracle.rel_err(out, oracle.factored_scores(clean_a, clean_g, left, right, per_token=True),
                              oracle.factored_scores(clean_a, clean_g, left, right, per_token=True,
                                                     absolute=True)) < 1e-5, backend


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ops.covariance(torch.randn(3, 4)), "'x' must have 3 dimensions"),
        (lambda: ops.covariance(torch.randn(2, 3, 4, dtype=torch.float64).long()), "'x' must be float32"),
        (lambda: ops.covariance(torch.randn(2, 3, 4), mask=torch.ones(2, 4)), "'mask' must have shape"),
        (lambda: ops.factored_scores(torch.randn(2, 3, 4), torch.randn(2, 5, 6), torch.randn(1, 6, 2),
                                     torch.randn(1, 4, 2)), "must share [N, T]"),
        (lambda: ops.factored_scores(torch.randn(2, 3, 4), torch.randn(2, 3, 6), torch.randn(1, 5, 2),
                                     torch.randn(1, 4, 2)), "'left' must be [Q, d_out=6, r]"),
        (lambda: ops.factored_scores(torch.randn(2, 3, 4), torch.randn(2, 3, 6), torch.randn(1, 6, 2),
                                     torch.randn(2, 4, 2)), "must share Q and r"),
        (lambda: ops.eigen_correction(torch.randn(2, 3, 4), torch.randn(2, 3, 6), torch.eye(5), torch.eye(6)),
         "'q_a' must be [d_in, d_in]"),
        (lambda: ops.self_influence(torch.randn(2, 3, 4), torch.randn(2, 3, 6), torch.eye(4), torch.eye(6),
                                    torch.rand(6, 4), -1.0), "'damping' must be a finite non-negative number"),
        (lambda: ops.covariance(torch.randn(2, 3, 4), backend="cuda-magic"), "unknown pyinf backend"),
        (lambda: ops.covariance(torch.randn(2, 3, 4), mask=torch.full((2, 3), 0.5)), "'mask' must hold only 0 and 1"),
        (lambda: ops.covariance(torch.randn(2, 3, 4), mask=torch.tensor([[1, 2, 0], [1, 1, 1]])),
         "'mask' must hold only 0 and 1"),
        (lambda: ops.covariance(torch.randn(2, 3, 4), mask=torch.full((2, 3), float("nan"))),
         "'mask' must hold only 0 and 1"),
        (lambda: ops.factored_scores(torch.randn(2, 3, 4), torch.randn(2, 3, 6), torch.randn(1, 6, 2),
                                     torch.randn(1, 4, 2), per_token="yes"), "'per_token' must be True or False"),
        (lambda: ops.factored_scores_grouped([(torch.randn(2, 3, 4),)]), "problem 0 must be a dict"),
        (lambda: ops.factored_scores_grouped(p for p in []), "'problems' must be a list or tuple"),
        (lambda: ops.factored_scores_grouped([], backend="bogus"), "unknown pyinf backend 'bogus'"),
        (lambda: ops.cross_entropy_rows(torch.randn(2, 3), None, sample=2), "'sample' must be True or False"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert message in str(info.value)


def test_explicit_unavailable_backend_raises():
    """A backend asked for by name that cannot run the call raises and names itself (fp64 is
    the reference's alone); auto falls back to torch for the same call."""
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    for name in ("triton", "native"):
        with pytest.raises(ops.BackendUnavailable, match=name):
            ops.covariance(x, backend=name)
    assert ops.resolve_backend("covariance", "auto", [x]) == "torch"
    with pytest.raises(ops.BackendUnavailable, match="backend 'native' cannot run"):
        ops.dense_scores(torch.randn(1, 2, 3), torch.randn(1, 2, 4), torch.randn(1, 4, 3), backend="native")
    # one argument of another dtype: the refusal names it
    with pytest.raises(ops.BackendUnavailable, match=r"cannot run this call \('lambdas'\): .*float64"):
        ops.self_influence(torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.eye(4), torch.eye(5),
                           torch.rand(5, 4, dtype=torch.float64), 0.1, backend="native")


@pytest.mark.parametrize("backend_device", BACKEND_PARAMS)
@pytest.mark.parametrize("rows_vocab", [(5, 37), (1, 1), (3, 300), (9, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_rows(backend_device, rows_vocab, dtype):
    backend, device = backend_device
    rows, vocab = rows_vocab
    logits = (3 * torch.randn(rows, vocab)).to(dtype).to(device)
    labels = torch.randint(0, vocab, (rows,)).to(device)
    _skip_unless_runs(backend, device, "cross_entropy_rows", [logits])
    ref_loss, ref_grad = oracle.cross_entropy_rows(logits, labels)
    x = logits.clone()
    loss = ops.cross_entropy_rows(x, labels, backend=backend)
    assert loss.dtype == torch.float32 and x.dtype == dtype and x.device.type == device
    assert oracle.rel_err(loss, ref_loss) < 1e-5
    assert oracle.rel_err(x, ref_grad) < oracle.TOLERANCE[dtype]


@pytest.mark.parametrize("backend_device", BACKEND_PARAMS)
def test_cross_entropy_rows_bad_label_is_nan_not_a_stray_read(backend_device):
    backend, device = backend_device
    logits = torch.randn(3, 20, device=device)
    _skip_unless_runs(backend, device, "cross_entropy_rows", [logits])
    labels = torch.tensor([4, 20, -1], device=device)
    x = logits.clone()
    loss = ops.cross_entropy_rows(x, labels, backend=backend)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all()
    softmax = torch.softmax(logits.double(), -1).cpu()
    assert torch.allclose(x[1:].double().cpu(), softmax[1:], atol=1e-6)  # no one-hot on invalid rows


@pytest.mark.parametrize("backend_device", BACKEND_PARAMS)
def test_cross_entropy_rows_sampling_follows_the_softmax(backend_device):
    """sample=True: each row's target is drawn from its softmax (empirical frequencies over
    many rows), the loss is that target's, the gradient has its one-hot, and a seed repeats it."""
    backend, device = backend_device
    base = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5])
    rows = 800  # the interpreter runs one program per row: ~10 ms each
    logits = base.repeat(rows, 1).to(device)
    _skip_unless_runs(backend, device, "cross_entropy_rows", [logits])
    x = logits.clone()
    loss = ops.cross_entropy_rows(x, None, sample=True, backend=backend)
    target = x.argmin(dim=1).cpu()  # the only negative entry: p - 1
    assert ((x < 0).sum(1) == 1).all()
    probs = torch.softmax(base.double(), -1)
    assert torch.allclose(loss.double().cpu(), torch.logsumexp(base.double(), -1) - base.double()[target], atol=1e-5)
    freq = torch.bincount(target, minlength=5).double() / rows
    assert (freq - probs).abs().max() < 0.06, (freq, probs)  # 4 standard errors
    draws = []
    for _ in range(2):
        torch.manual_seed(8)
        y = logits[:40].clone()
        ops.cross_entropy_rows(y, None, sample=True, backend=backend)
        draws.append(y)
    assert torch.equal(draws[0], draws[1])


def test_zero_one_masks_of_any_number_dtype():
    """A mask of 0/1 in any integer or float dtype (uint16 too) is the bool mask's result."""
    x = torch.randn(2, 3, 4)
    keep = torch.tensor([[True, False, True], [False, True, True]])
    want = ops.covariance(x, mask=keep)
    for dtype in (torch.uint8, torch.int16, torch.uint16, torch.int32, torch.float16, torch.float64):
        assert torch.equal(ops.covariance(x, mask=keep.to(dtype)), want), dtype


@pytest.mark.parametrize("backend_device", BACKEND_PARAMS)
def test_inputs_that_need_a_gradient(backend_device):
    """Only the PyTorch reference builds a gradient: a fused backend asked by name refuses an
    input that requires one (it would return a detached result), auto takes the reference."""
    backend, device = backend_device
    acts = torch.randn(2, 3, 4, device=device, requires_grad=True)
    grads, left, right = torch.randn(2, 3, 5, device=device), torch.randn(2, 5, 2, device=device), \
        torch.randn(2, 4, 2, device=device)
    _skip_unless_runs(backend, device, "factored_scores", [acts.detach()])
    if backend == "torch":
        ops.factored_scores(acts, grads, left, right, backend=backend).sum().backward()
        assert acts.grad is not None
        return
    with pytest.raises(ops.BackendUnavailable, match="an input requires a gradient"):
        ops.factored_scores(acts, grads, left, right, backend=backend)
    with torch.no_grad():  # no gradient wanted: the fused backend runs
        ops.factored_scores(acts, grads, left, right, backend=backend)
    assert ops.resolve_backend("factored_scores", "auto", [acts, grads, left, right]) == "torch"


@pytest.mark.parametrize("backend_device", BACKEND_PARAMS)
def test_lazily_negated_inputs(backend_device):
    """A float view carrying torch's negative bit (``.conj().imag`` of a complex tensor) is
    negated only in torch's view of its memory: the native backend read the memory and
    returned exactly the negated scores. A fused backend asked by name refuses it, naming
    the argument; auto takes the reference; the reference gives the values of the view."""
    backend, device = backend_device
    acts = torch.randn(2, 3, 4, dtype=torch.complex64, device=device).conj().imag
    assert acts.is_neg()
    grads, left, right = torch.randn(2, 3, 5, device=device), torch.randn(2, 5, 2, device=device), \
        torch.randn(2, 4, 2, device=device)
    want = oracle.factored_scores(acts.resolve_neg(), grads, left, right, None, False)
    if backend == "torch":
        assert oracle.rel_err(ops.factored_scores(acts, grads, left, right, backend=backend), want) < 1e-6
        return
    _skip_unless_runs(backend, device, "factored_scores", [acts.resolve_neg()])
    with pytest.raises(ops.BackendUnavailable, match=r"\('acts'\): an input is a lazily negated view"):
        ops.factored_scores(acts, grads, left, right, backend=backend)
    assert oracle.rel_err(ops.factored_scores(acts, grads, left, right), want) < 1e-6


def test_sparse_inputs_are_refused_by_name():
    x = torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match=r"covariance: 'x' must be a dense \(strided\) tensor, got layout "
                                        r"torch.sparse_coo"):
        ops.covariance(x.to_sparse())
    with pytest.raises(TypeError, match=r"'mask' must be a dense"):
        ops.covariance(x, mask=torch.ones(2, 3).to_sparse())


@pytest.mark.parametrize("backend_device", BACKEND_PARAMS)
def test_cross_entropy_rows_with_a_masked_vocabulary(backend_device):
    """-inf logits (a vocabulary masked by a -inf bias) over the first columns, wider than any
    kernel's column block (8192 on a GPU): a finite loss and gradient, as the reference gives
    (Triton's running max was -inf there, and exp(-inf - -inf) made the row NaN); sampling
    never draws a masked column."""
    backend, device = backend_device
    masked = 8200 if device == "cuda" else 40  # the interpreter's column block is 16
    logits = torch.randn(3, masked + 100, device=device)
    _skip_unless_runs(backend, device, "cross_entropy_rows", [logits])
    logits[:, :masked] = float("-inf")
    labels = torch.randint(masked, masked + 100, (3,), device=device)
    ref_loss, ref_grad = oracle.cross_entropy_rows(logits, labels)
    x = logits.clone()
    loss = ops.cross_entropy_rows(x, labels, backend=backend)
    assert torch.isfinite(loss).all() and torch.isfinite(x).all()
    assert oracle.rel_err(loss, ref_loss) < 1e-5 and oracle.rel_err(x, ref_grad) < 1e-5
    x = logits.clone()
    loss = ops.cross_entropy_rows(x, None, sample=True, backend=backend)
    assert torch.isfinite(loss).all() and (x[:, :masked] == 0).all()  # softmax 0, and no one-hot there


@pytest.mark.parametrize("backend_device", BACKEND_PARAMS)
def test_cross_entropy_rows_sampling_a_non_finite_row(backend_device):
    """sample=True on a row holding Inf or NaN (an overflowed fp16 logit): a NaN loss for that
    row, the others drawn as usual; and the in-place write moves the version counter."""
    backend, device = backend_device
    logits = torch.randn(4, 7, device=device)
    _skip_unless_runs(backend, device, "cross_entropy_rows", [logits])
    logits[1, 3] = float("inf")
    logits[2, 0] = float("nan")
    version = logits._version
    loss = ops.cross_entropy_rows(logits, None, sample=True, backend=backend)
    assert torch.isnan(loss[1:3]).all() and torch.isfinite(loss[[0, 3]]).all()
    assert logits._version > version


def test_fp16_tokens_with_bases_beyond_fp16_are_refused_by_triton():
    """Triton rotates fp16 tokens with fp16 bases: a (non-orthonormal) basis with entries past
    65504 would turn to Inf there; it is refused, naming the basis, instead."""
    if _registry.unsupported_reason("triton", "eigen_correction", [torch.zeros(1)]) is not None:
        pytest.skip("triton cannot run here")
    acts, grads = torch.randn(2, 3, 4).half(), torch.randn(2, 3, 5).half()
    q_a = torch.eye(4) * 1e5
    with pytest.raises(ValueError, match=r"pyinf.ops.eigen_correction: 'q_a' cannot run on the triton backend: its "
                                         r"shape \(4, 4\) .*beyond fp16's range"):
        ops.eigen_correction(acts, grads, q_a, torch.eye(5), backend="triton")


def test_cross_entropy_rows_rejects_bad_input():
    with pytest.raises(ValueError, match=r"'labels' must be int64 of shape \[R=3\], got shape \(3,\), dtype torch.int32"):
        ops.cross_entropy_rows(torch.randn(3, 4), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="'labels' is required unless sample=True"):
        ops.cross_entropy_rows(torch.randn(3, 4), None)
    with pytest.raises(ValueError, match="unit stride along the vocabulary"):
        ops.cross_entropy_rows(torch.randn(4, 3).T, torch.zeros(3, dtype=torch.int64))
    # a one-word vocabulary's column stride is never used: any is fine (loss 0, gradient 0)
    loss = ops.cross_entropy_rows(torch.randn(1, 4).T, torch.zeros(4, dtype=torch.int64))
    assert torch.equal(loss, torch.zeros(4))


def test_cross_entropy_rows_rejects_overlapping_rows_and_an_empty_vocabulary():
    """logits is written in place: rows sharing memory (an expanded row) would overwrite
    each other, and an empty vocabulary has no softmax."""
    with pytest.raises(ValueError, match=r"rows of 'logits' overlap in memory \(shape \(3, 6\), strides \(0, 1\)\)"):
        ops.cross_entropy_rows(torch.randn(1, 6).expand(3, 6), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"'logits' has an empty vocabulary \(shape \(2, 0\)\)"):
        ops.cross_entropy_rows(torch.randn(2, 0), torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("backend_device", BACKEND_PARAMS)
def test_cross_entropy_rows_strided_labels(backend_device):
    """Labels as a strided column view and as an expanded scalar (stride 0) are read by
    their strides."""
    backend, device = backend_device
    logits = torch.randn(6, 11, device=device)
    _skip_unless_runs(backend, device, "cross_entropy_rows", [logits])
    for labels in (torch.randint(0, 11, (6, 3), device=device)[:, 1], torch.tensor(4, device=device).expand(6)):
        ref_loss, ref_grad = oracle.cross_entropy_rows(logits, labels)
        x = logits.clone()
        loss = ops.cross_entropy_rows(x, labels, backend=backend)
        assert oracle.rel_err(loss, ref_loss) < 1e-5 and oracle.rel_err(x, ref_grad) < 1e-5


@pytest.mark.parametrize("backend_device", BACKEND_PARAMS)
def test_fp16_rotations_beyond_the_fp16_range(backend_device):
    """fp16 tokens whose rotation gathers more than fp16's 65504 into one coordinate (every
    entry 20000, an eigenvector along the mean): finite and exact to fp32 rounding."""
    backend, device = backend_device
    n, t, d_in, d_out = 2, 3, 16, 5
    acts = (20000 * (1 + 0.01 * torch.rand(n, t, d_in))).half().to(device)
    grads = torch.randn(n, t, d_out).half().to(device)
    basis = torch.randn(d_in, d_in, dtype=torch.float64)
    basis[:, 0] = 1.0  # first direction: the mean
    q_a = torch.linalg.qr(basis)[0].float().to(device)
    q_s = _orthonormal(d_out, device)
    _skip_unless_runs(backend, device, "eigen_correction", [acts, grads, q_a, q_s])
    lambdas = torch.rand(d_out, d_in, device=device) + 0.5
    out = ops.eigen_correction(acts, grads, q_a, q_s, backend=backend)
    assert oracle.rel_err(out, oracle.eigen_correction(acts, grads, q_a, q_s)) < 1e-3
    si = ops.self_influence(acts, grads, q_a, q_s, lambdas, 0.1, backend=backend)
    assert oracle.rel_err(si, oracle.self_influence(acts, grads, q_a, q_s, lambdas, 0.1)) < 1e-3


@pytest.mark.parametrize("backend_device", BACKEND_PARAMS)
def test_bf16_tokens_whose_products_cancel_over_the_tokens(backend_device):
    """bf16 activations with a large component shared by the tokens and gradients whose sum
    over the tokens nearly vanishes: a document's gradient is a small difference of large
    per-token terms. A backend that rounds each token's rotated values before the sum loses
    it: Triton's bf16 rotated tokens were 15% off, its tf32 Gram tiles on fp32 ones 2.0e-2
    (the interpreter emulates tf32); centring each document's activations (rotated_chunks)
    keeps 2.5e-3: held to 1e-2. The native CUDA kernels' TF32 tiles, not centred, were
    emulated at 2.3e-2 (benchmarks/eigen_numerics.py): held to 5e-2."""
    backend, device = backend_device
    n, t, d_in, d_out = 2, 64, 32, 24
    shared = 4 * torch.randn(d_in)
    acts = (shared + 0.05 * torch.randn(n, t, d_in)).bfloat16().to(device)
    v = torch.randn(n, t, d_out)
    grads = (v - v.mean(1, keepdim=True) + 1e-3 * torch.randn(n, 1, d_out)).bfloat16().to(device)
    q_a, q_s = _orthonormal(d_in, device), _orthonormal(d_out, device)
    lambdas = torch.rand(d_out, d_in, device=device) + 0.1
    _skip_unless_runs(backend, device, "eigen_correction", [acts, grads, q_a, q_s])
    # fp32 accumulation's own rounding is magnified by the cancellation too (1.2e-5 measured)
    tol = max(1e-4, _tolerance(torch.bfloat16, backend, device, "eigen_correction"))
    if backend == "triton":
        tol = 1e-2
    elif device == "cuda" and backend == "native":
        tol = 5e-2
    out = ops.eigen_correction(acts, grads, q_a, q_s, backend=backend)
    assert oracle.rel_err(out, oracle.eigen_correction(acts, grads, q_a, q_s)) < tol
    si = ops.self_influence(acts, grads, q_a, q_s, lambdas, 1e-3, backend=backend)
    assert oracle.rel_err(si, oracle.self_influence(acts, grads, q_a, q_s, lambdas, 1e-3)) < tol


@pytest.mark.parametrize("backend_device", BACKEND_PARAMS)
def test_grouped_problems_are_checked_for_unknown_keys_and_return_their_own_tensors(backend_device):
    """A misspelled 'mask' would score padding silently: refused by name. Each problem's scores
    are a tensor of their own (one layer's kept or saved does not hold every layer's)."""
    backend, device = backend_device
    acts, grads = torch.randn(2, 3, 4, device=device), torch.randn(2, 3, 5, device=device)
    left, right = torch.randn(2, 5, 1, device=device), torch.randn(2, 4, 1, device=device)
    _skip_unless_runs(backend, device, "factored_scores_grouped", [acts, grads, left, right])
    problem = dict(acts=acts, grads=grads, left=left, right=right)
    with pytest.raises(ValueError, match=r"problem 1 has unknown keys \['masks'\]; the keys are acts, grads, left, "
                                         r"right and mask"):
        ops.factored_scores_grouped([problem, dict(problem, masks=torch.ones(2, 3, dtype=torch.bool))],
                                    backend=backend)
    outs = ops.factored_scores_grouped([problem, problem], backend=backend)
    assert all(o.untyped_storage().nbytes() == o.numel() * o.element_size() for o in outs)


def test_a_damping_that_requires_a_gradient_is_refused():
    """No op differentiates through the damping: float() of it would drop its gradient silently."""
    acts, grads = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    q_a, q_s, lambdas = _orthonormal(4, "cpu"), _orthonormal(5, "cpu"), torch.rand(5, 4)
    damping = torch.tensor(0.1, requires_grad=True)
    with pytest.raises(ValueError, match="pyinf.ops.self_influence: 'damping' requires a gradient"):
        ops.self_influence(acts, grads, q_a, q_s, lambdas, damping)
    with torch.no_grad():
        assert ops.self_influence(acts, grads, q_a, q_s, lambdas, damping).shape == (2,)


def test_resolve_backend_names_an_unknown_op_and_a_call_without_tensors():
    with pytest.raises(ValueError, match="unknown op 'no_such_op'"):
        ops.resolve_backend("no_such_op", "auto", [torch.zeros(1)])
    with pytest.raises(ValueError, match="no tensor given for 'covariance'"):
        ops.resolve_backend("covariance", "auto", [])


@pytest.mark.parametrize("backend_device", BACKEND_PARAMS)
@pytest.mark.parametrize("scale", [1e5, 1e-6])
def test_fp16_tokens_with_fp32_factors_out_of_the_fp16_range(backend_device, scale):
    """fp16 tokens with fp32 query factors too large (or too small) for fp16: no backend
    rounds the factors to fp16."""
    backend, device = backend_device
    acts, grads = _inputs((3, 5, 9, 7, 2, 3), torch.float16, device)
    left = (scale * torch.randn(2, 7, 3)).to(device)
    right = torch.randn(2, 9, 3).to(device)
    _skip_unless_runs(backend, device, "factored_scores", [acts, grads, left, right])
    out = ops.factored_scores(acts, grads, left, right, backend=backend)
    assert oracle.rel_err(out, oracle.factored_scores(acts, grads, left, right)) < 1e-4


@pytest.mark.parametrize("backend_device", BACKEND_PARAMS)
def test_eigenbases_made_under_inference_mode(backend_device):
    """Eigenbases created under torch.inference_mode (no version counter to cache by)."""
    backend, device = backend_device
    acts, grads = _inputs((2, 4, 6, 5, 1, 1), torch.bfloat16, device)
    with torch.inference_mode():
        q_a, q_s = _orthonormal(6, device), _orthonormal(5, device)
        lambdas = torch.rand(5, 6, device=device)
    _skip_unless_runs(backend, device, "eigen_correction", [acts, grads, q_a, q_s])
    tol = oracle.TOLERANCE[torch.bfloat16]
    for _ in range(2):  # the second call would be served from a cache
        out = ops.eigen_correction(acts, grads, q_a, q_s, backend=backend)
        assert oracle.rel_err(out, oracle.eigen_correction(acts, grads, q_a, q_s)) < tol
        si = ops.self_influence(acts, grads, q_a, q_s, lambdas, 0.1, backend=backend)
        assert oracle.rel_err(si, oracle.self_influence(acts, grads, q_a, q_s, lambdas, 0.1)) < tol


@pytest.mark.parametrize("backend_device", BACKEND_PARAMS)
def test_empty_sizes(backend_device):
    """N, T, Q or d of 0: each op returns its empty (or zero) result, as the reference does."""
    backend, device = backend_device

    def r(*shape):
        return torch.randn(*shape, device=device)

    calls = [
        ("factored_scores", lambda: ops.factored_scores(r(0, 3, 4), r(0, 3, 5), r(2, 5, 2), r(2, 4, 2), backend=backend), (0, 2)),
        ("factored_scores", lambda: ops.factored_scores(r(2, 3, 4), r(2, 3, 5), r(0, 5, 2), r(0, 4, 2), backend=backend), (2, 0)),
        ("factored_scores", lambda: ops.factored_scores(r(2, 0, 4), r(2, 0, 5), r(2, 5, 2), r(2, 4, 2), per_token=True,
                                                        backend=backend), (2, 0, 2)),
        ("dense_scores", lambda: ops.dense_scores(r(2, 0, 3), r(2, 0, 4), r(3, 4, 3), per_token=True, backend=backend),
         (2, 0, 3)),
        ("dense_scores", lambda: ops.dense_scores(r(2, 5, 3), r(2, 5, 4), r(0, 4, 3), per_token=True, backend=backend),
         (2, 5, 0)),
        ("covariance", lambda: ops.covariance(r(2, 5, 0), backend=backend), (0, 0)),
    ]
    ran = 0
    for op, call, shape in calls:
        if _registry.unsupported_reason(backend, op, [r(1, 1, 1)]) is not None:
            continue
        out = call()
        assert tuple(out.shape) == shape and not out.any(), (op, shape)
        ran += 1
    if not ran:
        pytest.skip(f"backend {backend} runs none of these ops here")


def test_numpy_damping_is_a_number():
    np = pytest.importorskip("numpy")
    acts, grads = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    q_a, q_s, lambdas = _orthonormal(4, "cpu"), _orthonormal(5, "cpu"), torch.rand(5, 4)
    expected = ops.self_influence(acts, grads, q_a, q_s, lambdas, 0.25)
    for damping in (np.float32(0.25), np.float64(0.25)):
        assert torch.allclose(ops.self_influence(acts, grads, q_a, q_s, lambdas, damping), expected)
    with pytest.raises(ValueError, match="'damping' must be a finite non-negative number, got True"):
        ops.self_influence(acts, grads, q_a, q_s, lambdas, True)
    # no float for them: an int past float's range, a tensor without a value
    for damping, why in ((10**400, "int too large"), (torch.empty((), device="meta"), "meta")):
        with pytest.raises(ValueError, match=f"'damping' must be a finite non-negative number, got .*{why}"):
            ops.self_influence(acts, grads, q_a, q_s, lambdas, damping)


def test_numpy_bools_are_flags():
    """numpy's bool (np.bool_, named 'bool' since numpy 2) is a yes/no flag as Python's is."""
    np = pytest.importorskip("numpy")
    args = (torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.randn(1, 5, 2), torch.randn(1, 4, 2))
    assert ops.factored_scores(*args, per_token=np.True_).shape == (2, 3, 1)
    assert ops.factored_scores(*args, per_token=np.bool_(False)).shape == (2, 1)


def test_grouped_problems_on_different_devices_are_refused():
    """One launch reads every problem: problems on two devices (here the CPU and the meta
    device, standing in for two GPUs) are an error naming both, on every backend."""
    def problem(device):
        return dict(acts=torch.randn(2, 3, 4, device=device), grads=torch.randn(2, 3, 5, device=device),
                    left=torch.randn(1, 5, 2, device=device), right=torch.randn(1, 4, 2, device=device))

    for backend in ops.BACKENDS:
        with pytest.raises(ValueError, match="all problems must be on one device; problem 0 is on cpu, problem 1 on meta"):
            ops.factored_scores_grouped([problem("cpu"), problem("meta")], backend=backend)


def test_gpus_before_ampere_are_left_to_the_reference(monkeypatch):
    """On an sm_70 / sm_75 GPU the fused backends say why they do not run (the native build's
    oldest architecture is sm_80: 'no kernel image' at launch; Triton's bf16 dots need sm_80),
    so auto takes PyTorch there and an explicit request names the GPU."""
    class OnCuda:  # a tensor's face on a GPU this machine does not have
        device = torch.device("cuda", 0)

        def __init__(self, dtype):
            self.dtype = dtype

        def is_neg(self):
            return False

    monkeypatch.setattr(_registry, "_capability", lambda index: (7, 5))
    assert _registry._gpu_reason("native", [OnCuda(torch.float32)]) == (
        "the native CUDA kernels need an sm_80 or newer GPU, cuda:0 is sm_75")
    assert _registry._gpu_reason("triton", [OnCuda(torch.bfloat16)]) == (
        "the Triton kernels on bf16 need an sm_80 or newer GPU, cuda:0 is sm_75")
    assert _registry._gpu_reason("triton", [OnCuda(torch.float16)]) is None  # fp16 / fp32 dots run there
    assert _registry._gpu_reason("torch", [OnCuda(torch.bfloat16)]) is None
    if _registry.unsupported_reason("native", "covariance", [torch.zeros(1)]) is None:  # through the registry
        assert "sm_75" in _registry.unsupported_reason("native", "covariance", [OnCuda(torch.float32)])
    monkeypatch.setattr(_registry, "_capability", lambda index: (8, 6))
    assert _registry.older_than_ampere([OnCuda(torch.bfloat16)]) is None


def test_an_op_the_backend_lacks_runs_on_autos_choice(monkeypatch):
    """The full-rank route takes auto's choice under the native backend, which has no
    dense_scores; a backend asked for by name that does not load still says so."""
    assert ops.backend_for("dense_scores", "auto") == "auto" and ops.backend_for("dense_scores", "torch") == "torch"
    if _registry.unsupported_reason("native", "covariance", [torch.zeros(1)]) is None:
        assert ops.backend_for("dense_scores", "native") == "auto"
        assert ops.backend_for("covariance", "native") == "native"

    def unavailable(name):
        raise ops.BackendUnavailable(f"pyinf backend {name!r} is not available: test")

    monkeypatch.setattr(_registry, "load", unavailable)
    with pytest.raises(ops.BackendUnavailable, match="'native' is not available"):
        ops.backend_for("dense_scores", "native")
