"""Triton-backend extras beyond the backend-parametrised contract in test_ops.py: strided
inputs, block-boundary sizes, the chunk / slab / split paths, bitwise determinism,
agreement with the torch backend, padding garbage, mixed dtypes. On a machine without a
GPU the kernels run on CPU through Triton's interpreter (conftest sets TRITON_INTERPRET=1),
whose fixed config uses 16-wide blocks: sizes 15 / 16 / 17 / 32 / 33 straddle them."""
import pytest
import torch

import pyinf.ops as ops
from pyinf.ops import _registry

from . import oracle

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if _registry.unsupported_reason("triton", "covariance", [torch.zeros(1, device=DEVICE)]) is not None:
    pytest.skip("the triton backend cannot run here", allow_module_level=True)

from triton_kernels import _shared  # noqa: E402  (after the skip: needs triton)
from triton_kernels import covariance as tk_covariance  # noqa: E402
from triton_kernels import factored_scores as tk_factored  # noqa: E402


def _orthonormal(d):
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    return q.float().to(DEVICE)


def _mask(n, t):
    m = torch.rand(n, t) > 0.3
    m[0, 0] = True
    if n > 1:
        m[-1] = False
    return m.to(DEVICE)


def _strided(shape, dtype):
    """A non-contiguous view with the given shape: features strided by 2, tokens and docs
    swapped in memory."""
    n, t, d = shape
    base = torch.randn(t, n, 2 * d).to(dtype).to(DEVICE)
    return base.transpose(0, 1)[:, :, ::2]


def _tokens(n, t, d_in, d_out, dtype=torch.float32, strided=False):
    if strided:
        return _strided((n, t, d_in), dtype), _strided((n, t, d_out), dtype)
    return torch.randn(n, t, d_in).to(dtype).to(DEVICE), torch.randn(n, t, d_out).to(dtype).to(DEVICE)


# --- strided / non-contiguous inputs ----------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_inputs_all_ops(dtype):
    n, t, d_in, d_out, q, r = 3, 9, 17, 15, 3, 4
    acts, grads = _tokens(n, t, d_in, d_out, dtype, strided=True)
    assert not acts.is_contiguous() and not grads.is_contiguous()
    mask = _mask(n, t)
    tol = oracle.TOLERANCE[dtype]
    q_a, q_s = _orthonormal(d_in).T, _orthonormal(d_out).T  # transposed eigenbases: strided too
    lambdas = (torch.rand(d_in, d_out, device=DEVICE) * 2).T
    left = torch.randn(q, r, d_out).to(dtype).to(DEVICE).transpose(1, 2)
    right = torch.randn(r, q, d_in).to(dtype).to(DEVICE).permute(1, 2, 0)

    assert oracle.rel_err(ops.covariance(acts, mask=mask, backend="triton"), oracle.covariance(acts, mask)) < tol
    out = ops.eigen_correction(acts, grads, q_a, q_s, mask=mask, backend="triton")
    squared_tol = oracle.SQUARED_TOLERANCE[dtype]
    assert oracle.rel_err(out, oracle.eigen_correction(acts, grads, q_a, q_s, mask)) < squared_tol
    out = ops.self_influence(acts, grads, q_a, q_s, lambdas, 0.3, mask=mask, backend="triton")
    assert oracle.rel_err(out, oracle.self_influence(acts, grads, q_a, q_s, lambdas, 0.3, mask)) < squared_tol
    for per_token in (False, True):
        out = ops.factored_scores(acts, grads, left, right, mask=mask, per_token=per_token, backend="triton")
        assert oracle.rel_err(out, oracle.factored_scores(acts, grads, left, right, mask, per_token)) < tol
    dense = torch.randn(d_in, q, d_out).to(dtype).to(DEVICE).permute(1, 2, 0)  # [Q, d_out, d_in], strided
    for per_token in (False, True):
        out = ops.dense_scores(acts, grads, dense, mask=mask, per_token=per_token, backend="triton")
        assert oracle.rel_err(out, oracle.dense_scores(acts, grads, dense, mask, per_token)) < tol


def test_features_outermost_past_int32_offsets_are_copied(monkeypatch):
    """The kernels offset features in int32: a view with the features outermost (a permuted
    [d, N, T] buffer) whose last offset passes 2^31 elements read out of bounds (a crash in
    the interpreter, on a GPU an illegal address). The adapter copies such a tensor first.
    The limit is lowered here so that small tensors cross it; each op must then see only
    copies, and still give the reference's results."""
    from pyinf.ops import _triton

    monkeypatch.setattr(_triton, "_INT32_OFFSETS", 50)
    n, t, d_in, d_out, q = 2, 5, 9, 7, 2
    acts = torch.randn(d_in, n, t, device=DEVICE).permute(1, 2, 0)  # feature stride n*t = 10: offsets to 80
    grads = torch.randn(d_out, n, t, device=DEVICE).permute(1, 2, 0)  # to 60
    dense = torch.randn(d_in, q, d_out, device=DEVICE).permute(1, 2, 0)  # feature stride 14: offsets to 112
    mask = _mask(n, t)  # token offsets to 4: kept
    assert [_triton._int32_rows(x) is x for x in (acts, grads, dense, mask)] == [False, False, False, True]
    seen = []
    original = _triton._int32_rows
    monkeypatch.setattr(_triton, "_int32_rows", lambda x: seen.append(original(x)) or seen[-1])
    q_a, q_s = _orthonormal(d_in), _orthonormal(d_out)
    lambdas = torch.rand(d_out, d_in, device=DEVICE)
    got = [ops.covariance(acts, mask=mask, backend="triton"),
           ops.eigen_correction(acts, grads, q_a, q_s, mask=mask, backend="triton"),
           ops.self_influence(acts, grads, q_a, q_s, lambdas, 0.3, mask=mask, backend="triton"),
           ops.dense_scores(acts, grads, dense, mask=mask, backend="triton")]
    want = [oracle.covariance(acts, mask), oracle.eigen_correction(acts, grads, q_a, q_s, mask),
            oracle.self_influence(acts, grads, q_a, q_s, lambdas, 0.3, mask),
            oracle.dense_scores(acts, grads, dense, mask, False)]
    assert all(oracle.rel_err(a, b) < 1e-5 for a, b in zip(got, want))
    assert all(x.is_contiguous() for x in seen if x is not mask) and len(seen) == 2 + 3 + 3 + 4


# --- block-boundary sizes ----------------------------------------------------------------

@pytest.mark.parametrize("t, d_in, d_out", [(16, 16, 16), (17, 15, 33), (1, 1, 32), (32, 33, 1)])
def test_block_boundaries_covariance_eigen(t, d_in, d_out):
    n = 2
    acts, grads = _tokens(n, t, d_in, d_out)
    mask = _mask(n, t) if t > 1 else None
    q_a, q_s = _orthonormal(d_in), _orthonormal(d_out)
    cov = ops.covariance(grads, mask=mask, backend="triton")
    assert oracle.rel_err(cov, oracle.covariance(grads, mask)) < 1e-5
    assert torch.equal(cov, cov.T)
    out = ops.eigen_correction(acts, grads, q_a, q_s, mask=mask, backend="triton")
    assert oracle.rel_err(out, oracle.eigen_correction(acts, grads, q_a, q_s, mask)) < 1e-5


# r = 16 fills a 16-column block with one query; r = 17 pads to 32 and widens the block;
# Q * r = 32 is an exact multiple of the block; r = 1.
@pytest.mark.parametrize("q, r", [(2, 16), (3, 17), (8, 4), (5, 1)])
@pytest.mark.parametrize("per_token", [False, True])
def test_block_boundaries_factored(q, r, per_token):
    n, t, d_in, d_out = 2, 17, 16, 33
    acts, grads = _tokens(n, t, d_in, d_out)
    left, right = torch.randn(q, d_out, r, device=DEVICE), torch.randn(q, d_in, r, device=DEVICE)
    mask = _mask(n, t)
    out = ops.factored_scores(acts, grads, left, right, mask=mask, per_token=per_token, backend="triton")
    assert oracle.rel_err(out, oracle.factored_scores(acts, grads, left, right, mask, per_token)) < 1e-5


@pytest.mark.parametrize("per_token", [False, True])
def test_ranks_above_one_launch_go_in_slices(monkeypatch, per_token):
    """A rank above MAX_RANK (128 on a GPU, where one block holding a rank of 1024 needs more
    shared memory than there is) is scored in slices of ranks, summed; grouped layers of
    other ranks (one under the limit, one a whole number of slices) drop out of the later
    slices (a rank of 0 gives zeros). MAX_RANK is lowered here so that small ranks cross it."""
    monkeypatch.setattr(tk_factored, "MAX_RANK", 4)
    n, t, q = 2, 9, 3
    problems = []
    for d_in, d_out, r in ((7, 5, 11), (6, 4, 3), (5, 8, 8), (3, 2, 0)):
        acts, grads = _tokens(n, t, d_in, d_out)
        problems.append(dict(acts=acts, grads=grads, left=torch.randn(q, d_out, r, device=DEVICE),
                             right=torch.randn(q, d_in, r, device=DEVICE), mask=_mask(n, t)))
    calls = []  # (layers, largest rank) of each launch of the grouped kernel
    grouped = tk_factored.factored_scores_grouped

    def counted(problems, *args, **kwargs):
        calls.append((len(problems), max(p["left"].shape[2] for p in problems)))
        return grouped(problems, *args, **kwargs)

    monkeypatch.setattr(tk_factored, "factored_scores_grouped", counted)
    outs = ops.factored_scores_grouped(problems, per_token=per_token, backend="triton")
    # the call itself (rank 11 padded to whole slices, 12, ahead: pyinf.ops._triton), then
    # slices of ranks 0-3 (every layer), 4-7 (ranks 12 and 8), 8-11 (12)
    assert calls == [(4, 12), (4, 4), (2, 4), (1, 4)]
    for p, out in zip(problems, outs):
        want = oracle.factored_scores(p["acts"], p["grads"], p["left"], p["right"], p["mask"], per_token)
        assert oracle.rel_err(out, want) < 1e-5


def test_padded_query_factors_are_reused_until_they_change():
    """Ranks that are not the kernel's padded rank (a power of two, at least 8) are padded
    once per factor tensor, not on every call: a scoring pass hands each batch the same
    query tensors. An in-place change pads again; the pass's end releases the copies."""
    from pyinf.ops import _triton

    n, t, q = 2, 9, 3
    problems = []
    for d_in, d_out, r in ((7, 5, 5), (6, 4, 3), (5, 8, 8)):  # padded to 8; the last one is already
        acts, grads = _tokens(n, t, d_in, d_out)
        problems.append(dict(acts=acts, grads=grads, left=torch.randn(q, d_out, r, device=DEVICE),
                             right=torch.randn(q, d_in, r, device=DEVICE), mask=_mask(n, t)))
    _triton.release_caches()
    first = _triton._rank_padded(problems)
    assert [p["left"].shape[2] for p in first] == [8, 8, 8] and first[2]["left"] is problems[2]["left"]
    assert len(_triton._casts) == 4  # left and right of the two padded layers
    again = _triton._rank_padded(problems)
    assert all(a["left"] is b["left"] and a["right"] is b["right"] for a, b in zip(first, again))
    for p in first[:2]:
        assert not p["left"][..., -1].any()  # zero columns: they add exactly 0
    want = [oracle.factored_scores(p["acts"], p["grads"], p["left"], p["right"], p["mask"], False) for p in problems]
    for out, w in zip(ops.factored_scores_grouped(problems, backend="triton"), want):
        assert oracle.rel_err(out, w) < 1e-5
    problems[0]["left"].mul_(2)  # in place: padded again, and scored with the new values
    assert _triton._rank_padded(problems)[0]["left"] is not first[0]["left"]
    out = ops.factored_scores(**problems[0], backend="triton")
    assert oracle.rel_err(out, 2 * want[0]) < 1e-5
    _triton.release_caches()
    assert len(_triton._casts) == 0


# --- the split / chunk / slab paths ------------------------------------------------------

def test_covariance_row_splits_exactly_symmetric():
    x = torch.randn(3, 21, 37, device=DEVICE)
    mask = _mask(3, 21)
    one = tk_covariance.covariance(x, mask, splits=1)
    split = tk_covariance.covariance(x, mask, splits=4)
    assert torch.equal(split, split.T)
    assert oracle.rel_err(split, oracle.covariance(x, mask)) < 1e-5
    assert oracle.rel_err(one, oracle.covariance(x, mask)) < 1e-5


@pytest.mark.parametrize("per_token", [False, True])
def test_factored_token_splits(per_token):
    n, t, d_in, d_out, q, r = 2, 50, 12, 9, 3, 5
    acts, grads = _tokens(n, t, d_in, d_out)
    left, right = torch.randn(q, d_out, r, device=DEVICE), torch.randn(q, d_in, r, device=DEVICE)
    mask = _mask(n, t)
    ref = oracle.factored_scores(acts, grads, left, right, mask, per_token)
    for splits in (1, 3, 100):
        out = tk_factored.factored_scores(acts, grads, left, right, mask=mask, per_token=per_token, splits=splits)
        assert oracle.rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("budget", [1, 40 * 33 * 4 + 1, 3 * 7 * (20 + 33) * 4])
def test_eigen_and_self_influence_bounded_temporaries(monkeypatch, budget):
    """Tiny budgets force one document per chunk and d_out in one-tile slabs; a medium one
    chunks documents. The answer must not change."""
    monkeypatch.setattr(_shared, "ROTATED_TEMP_BYTES", budget)
    n, t, d_in, d_out = 4, 7, 20, 33
    acts, grads = _tokens(n, t, d_in, d_out)
    mask = _mask(n, t)
    q_a, q_s = _orthonormal(d_in), _orthonormal(d_out)
    lambdas = torch.rand(d_out, d_in, device=DEVICE)
    out = ops.eigen_correction(acts, grads, q_a, q_s, mask=mask, backend="triton")
    assert oracle.rel_err(out, oracle.eigen_correction(acts, grads, q_a, q_s, mask)) < 1e-5
    out = ops.self_influence(acts, grads, q_a, q_s, lambdas, 0.05, mask=mask, backend="triton")
    assert oracle.rel_err(out, oracle.self_influence(acts, grads, q_a, q_s, lambdas, 0.05, mask)) < 1e-5


def test_rotation_plan():
    # fits: several documents per chunk, d_out whole
    assert _shared.rotation_plan(8, 10, 4, 6, 2, 16, 10 * 10 * 2 * 3) == (3, 6)
    # one document does not fit: slabs of whole 16-row tiles
    docs, slab = _shared.rotation_plan(8, 10, 4, 100, 2, 16, 10 * (4 + 40) * 2)
    assert docs == 1 and slab == 32
    # Llama-7B up_proj, bf16, 32 MiB: one document, 3 slabs of d_out
    docs, slab = _shared.rotation_plan(4, 2048, 4096, 11008, 2, 128, 32 << 20)
    assert docs == 1 and slab % 128 == 0 and 2048 * (4096 + slab) * 2 <= 32 << 20


# --- determinism and agreement with the torch backend ------------------------------------

def _all_ops(dtype):
    n, t, d_in, d_out, q, r = 3, 19, 18, 13, 3, 6
    acts, grads = _tokens(n, t, d_in, d_out, dtype)
    mask = _mask(n, t)
    q_a, q_s = _orthonormal(d_in), _orthonormal(d_out)
    lambdas = torch.rand(d_out, d_in, device=DEVICE)
    left = torch.randn(q, d_out, r).to(dtype).to(DEVICE)
    right = torch.randn(q, d_in, r).to(dtype).to(DEVICE)
    problems = [dict(acts=acts, grads=grads, left=left, right=right, mask=mask),
                dict(acts=acts[:, :5, :7], grads=grads[:, :5], left=left, right=right[:, :7], mask=None)]

    def run(backend):
        return {
            "covariance": ops.covariance(acts, mask=mask, backend=backend),
            "eigen_correction": ops.eigen_correction(acts, grads, q_a, q_s, mask=mask, backend=backend),
            "self_influence": ops.self_influence(acts, grads, q_a, q_s, lambdas, 0.2, mask=mask, backend=backend),
            "factored_scores": ops.factored_scores(acts, grads, left, right, mask=mask, backend=backend),
            "per_token": ops.factored_scores(acts, grads, left, right, mask=mask, per_token=True, backend=backend),
            "grouped": torch.cat([o.flatten() for o in ops.factored_scores_grouped(problems, backend=backend)]),
        }
    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repeated_calls_bitwise_identical(dtype):
    run = _all_ops(dtype)
    first, second = run("triton"), run("triton")
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} is not deterministic"


# fp16: the triton backend keeps rotated tokens in fp16 (eigen / self-influence), torch in fp32
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
def test_agrees_with_torch_backend(dtype, tol):
    run = _all_ops(dtype)
    triton_out, torch_out = run("triton"), run("torch")
    for name in triton_out:
        assert oracle.rel_err(triton_out[name], torch_out[name]) < tol, name


# --- padding garbage, mixed dtypes, grouping ---------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padding_garbage_never_leaks(dtype):
    acts, grads = torch.randn(2, 20, 5), torch.randn(2, 20, 3)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, 17:] = True
    acts[~mask] = float("nan")
    grads[~mask] = float("inf")
    acts, grads, mask = acts.to(dtype).to(DEVICE), grads.to(dtype).to(DEVICE), mask.to(DEVICE)
    q_a, q_s = _orthonormal(5), _orthonormal(3)
    left, right = torch.randn(2, 3, 2, device=DEVICE), torch.randn(2, 5, 2, device=DEVICE)
    lambdas = torch.rand(3, 5, device=DEVICE)
    dense = torch.randn(2, 3, 5, device=DEVICE)
    tol = oracle.TOLERANCE[dtype]
    outs = {
        "covariance": (ops.covariance(acts, mask=mask, backend="triton"), oracle.covariance(acts, mask)),
        "eigen": (ops.eigen_correction(acts, grads, q_a, q_s, mask=mask, backend="triton"),
                  oracle.eigen_correction(acts, grads, q_a, q_s, mask)),
        "self": (ops.self_influence(acts, grads, q_a, q_s, lambdas, 0.1, mask=mask, backend="triton"),
                 oracle.self_influence(acts, grads, q_a, q_s, lambdas, 0.1, mask)),
        "per_token": (ops.factored_scores(acts, grads, left, right, mask=mask, per_token=True, backend="triton"),
                      oracle.factored_scores(acts, grads, left, right, mask, True)),
        "dense": (ops.dense_scores(acts, grads, dense, mask=mask, backend="triton"), None),
        "dense_per_token": (ops.dense_scores(acts, grads, dense, mask=mask, per_token=True, backend="triton"), None),
    }
    # the oracle multiplies by the mask, so NaN reaches it: compare on the finite reference
    for name, (out, _) in outs.items():
        assert torch.isfinite(out).all(), name
    clean_a = torch.where(mask.unsqueeze(-1), acts, torch.zeros((), dtype=dtype, device=DEVICE))
    clean_g = torch.where(mask.unsqueeze(-1), grads, torch.zeros((), dtype=dtype, device=DEVICE))
    assert oracle.rel_err(outs["covariance"][0], oracle.covariance(clean_a, mask)) < tol
    squared_tol = oracle.SQUARED_TOLERANCE[dtype]
    assert oracle.rel_err(outs["eigen"][0], oracle.eigen_correction(clean_a, clean_g, q_a, q_s, mask)) < squared_tol
    assert oracle.rel_err(outs["self"][0],
                          oracle.self_influence(clean_a, clean_g, q_a, q_s, lambdas, 0.1, mask)) < squared_tol
    assert oracle.rel_err(outs["per_token"][0], oracle.factored_scores(clean_a, clean_g, left, right, mask, True)) < tol
    assert oracle.rel_err(outs["dense"][0], oracle.dense_scores(clean_a, clean_g, dense, mask)) < tol
    assert oracle.rel_err(outs["dense_per_token"][0], oracle.dense_scores(clean_a, clean_g, dense, mask, True)) < tol


def test_mixed_dtypes_within_a_call():
    n, t, d_in, d_out, q, r = 2, 9, 11, 7, 2, 3
    acts = torch.randn(n, t, d_in).bfloat16().to(DEVICE)
    grads = torch.randn(n, t, d_out, device=DEVICE)  # fp32 grads: compute in fp32
    left = torch.randn(q, d_out, r).half().to(DEVICE)
    right = torch.randn(q, d_in, r, device=DEVICE)
    out = ops.factored_scores(acts, grads, left, right, backend="triton")
    assert oracle.rel_err(out, oracle.factored_scores(acts, grads, left, right)) < 1e-5
    # bf16 tokens with fp32 factors: factors are rounded to bf16 (to nearest) in-kernel
    grads16 = grads.bfloat16()
    out = ops.factored_scores(acts, grads16, left.float(), right, backend="triton")
    assert oracle.rel_err(out, oracle.factored_scores(acts, grads16, left.float(), right)) < 1e-2
    dense = torch.randn(q, d_out, d_in, device=DEVICE)  # bf16 tokens, fp32 grads and queries: fp32 dots
    for per_token in (False, True):
        out = ops.dense_scores(acts, grads, dense, per_token=per_token, backend="triton")
        assert oracle.rel_err(out, oracle.dense_scores(acts, grads, dense, None, per_token)) < 1e-5


def test_grouped_mixed_problems():
    """Different T, d, r, dtypes and masks per problem; N and Q shared."""
    n, q = 2, 3
    specs = [(5, 9, 12, 3, torch.float32, True), (17, 16, 7, 5, torch.float32, False),
             (1, 4, 4, 1, torch.bfloat16, True), (3, 2, 20, 2, torch.float32, True)]
    problems = []
    for t, d_in, d_out, r, dtype, masked in specs:
        acts, grads = _tokens(n, t, d_in, d_out, dtype)
        problems.append(dict(acts=acts, grads=grads, left=torch.randn(q, d_out, r).to(dtype).to(DEVICE),
                             right=torch.randn(q, d_in, r).to(dtype).to(DEVICE),
                             mask=_mask(n, t) if masked else None))
    for per_token in (False, True):
        outs = ops.factored_scores_grouped(problems, per_token=per_token, backend="triton")
        for p, out in zip(problems, outs):
            ref = oracle.factored_scores(p["acts"], p["grads"], p["left"], p["right"], p["mask"], per_token)
            assert oracle.rel_err(out, ref) < oracle.TOLERANCE[p["acts"].dtype]


def test_empty_token_axis():
    acts, grads = torch.randn(2, 0, 5, device=DEVICE), torch.randn(2, 0, 3, device=DEVICE)
    left, right = torch.randn(2, 3, 2, device=DEVICE), torch.randn(2, 5, 2, device=DEVICE)
    assert torch.equal(ops.factored_scores(acts, grads, left, right, backend="triton"), torch.zeros(2, 2, device=DEVICE))
    assert ops.factored_scores(acts, grads, left, right, per_token=True, backend="triton").shape == (2, 0, 2)
    assert torch.equal(ops.covariance(acts, backend="triton"), torch.zeros(5, 5, device=DEVICE))


def test_unsupported_reason():
    from pyinf.ops import _triton
    x = torch.randn(2, 3, 4, device=DEVICE)
    assert _triton.unsupported_reason("covariance", [x]) is None
    assert "float64" in _triton.unsupported_reason("covariance", [x.double()])
    assert "dense_scores" not in str(_triton.unsupported_reason("dense_scores", [x]))
    assert "does not implement" in _triton.unsupported_reason("dense_scores_v2", [x])
    with pytest.raises(ops.BackendUnavailable):
        ops.covariance(x.double(), backend="triton")


# --- the GPU code path, compiled without a GPU -------------------------------------------


def test_kernels_compile_for_h100_without_spills(tmp_path):
    """Compiles every kernel with its H100 config for sm_90a (no GPU needed: Triton's bundled
    ptxas; see benchmarks/compiled.py) - the interpreter never runs Triton's code generator,
    so this is what catches GPU-only errors. Also checks: no register spills, no wgmma
    serialised or fenced by ptxas (C7515, C7519, C7520), software-pipelined (cp.async) K loops in the GEMM kernels,
    and for bf16 tensor-core (wgmma) dots kept in flight across K steps."""
    from benchmarks import compiled

    if compiled.ptxas_path() is None:
        pytest.skip("Triton's bundled ptxas is missing")
    report = compiled.report(cache_dir=tmp_path)
    assert len(report) == 25
    for r in report:
        assert r["ok"] and not r["spills"] and not r["serialized"], r
        if r["gemm"]:
            assert r["pipelined"] and r["cp_async"] > 0, r
            if "bfloat16" in r["label"]:
                assert r["wgmma"] and r["async_wgmma"], r
    assert "| factored_scores torch.bfloat16 per_token=False |" in compiled.markdown(report)


def test_eigenbasis_casts_are_reused_until_the_source_changes():
    """The bf16 ops cast the fp32 eigenbases once per source tensor, not once per call; an
    in-place change of the source, or a new tensor, is cast again; dead sources leave the cache."""
    import gc

    from pyinf.ops import _triton
    cache = _triton._CastCache()
    q = torch.randn(6, 6, device=DEVICE)
    first = cache.get(q, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and torch.equal(first, q.to(torch.bfloat16))
    assert cache.get(q, torch.bfloat16) is first
    assert cache.get(q, torch.float32) is q
    q.mul_(2)  # in place: the version counter moves
    again = cache.get(q, torch.bfloat16)
    assert again is not first and torch.equal(again, q.to(torch.bfloat16))
    del q, first, again
    gc.collect()
    assert not cache._entries

    # through the op: the same answer as with a fresh cast
    acts = torch.randn(2, 5, 4, device=DEVICE).bfloat16()
    grads = torch.randn(2, 5, 3, device=DEVICE).bfloat16()
    q_a, q_s = torch.linalg.qr(torch.randn(4, 4))[0].to(DEVICE), torch.linalg.qr(torch.randn(3, 3))[0].to(DEVICE)
    one = ops.eigen_correction(acts, grads, q_a, q_s, backend="triton")
    two = ops.eigen_correction(acts, grads, q_a, q_s, backend="triton")
    assert torch.equal(one, two)
    assert torch.equal(one, _eig_fresh(acts, grads, q_a, q_s))


def test_every_pass_releases_the_casts():
    """A cast lives as long as its source, and factors outlive their passes: a bf16 copy of
    every eigenbasis stayed on the GPU after a fit. Every pass ends by releasing the casts
    (pyinf.ops.release_caches); the next one casts again."""
    import pyinf
    from pyinf.ops import _triton

    from .models import MLPTask, RegressionDataset, TinyMLP

    acts, grads = torch.randn(2, 5, 4, device=DEVICE).bfloat16(), torch.randn(2, 5, 3, device=DEVICE).bfloat16()
    q_a, q_s = torch.linalg.qr(torch.randn(4, 4))[0].to(DEVICE), torch.linalg.qr(torch.randn(3, 3))[0].to(DEVICE)
    ops.eigen_correction(acts, grads, q_a, q_s, backend="triton")
    assert len(_triton._casts) == 2
    pyinf.InfluenceEngine(TinyMLP(), MLPTask(), progress=False).fit_factors(RegressionDataset(4), batch_size=2)
    assert len(_triton._casts) == 0


def _eig_fresh(acts, grads, q_a, q_s):
    from triton_kernels import eigen_correction as eig
    return eig.eigen_correction(acts, grads, q_a.bfloat16(), q_s.bfloat16(), None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("per_token", [False, True])
def test_factored_biased_layer_rows_padded_k_tail(dtype, per_token):
    """A bias-augmented input as the capture stores it (pyinf.capture._append_ones: [.., d+1]
    viewing rows padded to 16): the aligned path with whole K slices plus the column-by-column
    tail (bf16), or the k-masked loop (fp32), against the float64 oracle."""
    from pyinf.capture import _append_ones

    n, t, d_in, d_out, q, r = 3, 21, 36, 48, 4, 8  # d_in + 1 = 37 = two 16-slices + a tail of 5
    acts = _append_ones(torch.randn(n, t, d_in, device=DEVICE).to(dtype))
    assert acts.shape[2] == d_in + 1 and acts.stride(1) % 16 == 0 and acts.stride(2) == 1
    grads = torch.randn(n, t, d_out, device=DEVICE).to(dtype)
    left = torch.randn(q, d_out, r, device=DEVICE).to(dtype)
    right = torch.randn(q, d_in + 1, r, device=DEVICE).to(dtype)
    assert tk_factored._aligned([dict(acts=acts, grads=grads, left=left, right=right)])
    mask = _mask(n, t)
    out = ops.factored_scores(acts, grads, left, right, mask=mask, per_token=per_token, backend="triton")
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert oracle.rel_err(out, oracle.factored_scores(acts, grads, left, right, mask, per_token)) < tol


def test_eigen_ops_biased_layer_k_tail():
    """bf16 eigen-correction and self-influence of a biased layer as the pipeline runs them:
    the capture's padded [.., d+1] input and the eigenbasis cast into padded rows
    (_CastCache); the rotation takes whole K slices, then the tail."""
    from pyinf.capture import _append_ones
    from pyinf.ops import _triton

    n, t, d, d_out = 3, 19, 36, 20  # K = 37 = two 16-slices + 5
    acts = _append_ones(torch.randn(n, t, d, device=DEVICE).to(torch.bfloat16))
    grads = torch.randn(n, t, d_out, device=DEVICE).to(torch.bfloat16)
    q_a = torch.linalg.qr(torch.randn(d + 1, d + 1))[0].to(DEVICE)
    q_s = torch.linalg.qr(torch.randn(d_out, d_out))[0].to(DEVICE)
    cast = _triton._CastCache().get(q_a, torch.bfloat16)
    assert cast.stride(0) % 16 == 0 and torch.equal(cast, q_a.to(torch.bfloat16))
    lambdas = torch.rand(d_out, d + 1, device=DEVICE)
    mask = _mask(n, t)
    out = ops.eigen_correction(acts, grads, q_a, q_s, mask=mask, backend="triton")
    assert oracle.rel_err(out, oracle.eigen_correction(acts, grads, q_a, q_s, mask)) < 2e-2
    out = ops.self_influence(acts, grads, q_a, q_s, lambdas, 0.1, mask=mask, backend="triton")
    assert oracle.rel_err(out, oracle.self_influence(acts, grads, q_a, q_s, lambdas, 0.1, mask)) < 2e-2


def test_dense_scores_document_offsets_past_2_31():
    """Documents 2^30 + 16 elements apart (a legal strided view of a 4 GiB buffer, of which
    only the viewed elements are touched): the third document's offset passes 2^31, which
    wrapped in 32-bit arithmetic."""
    stride = 2**30 + 16
    try:
        base = torch.empty(2 * stride + 8, dtype=torch.bfloat16, device=DEVICE)
    except RuntimeError as exc:  # no 4 GiB of address space here
        pytest.skip(f"cannot reserve the 4 GiB buffer: {exc}")
    grads = base.as_strided((3, 2, 4), (stride, 4, 1))
    grads.copy_(torch.randn(3, 2, 4))
    acts = torch.randn(3, 2, 4, device=DEVICE).bfloat16()
    dense = torch.randn(2, 4, 4, device=DEVICE).bfloat16()
    for per_token in (False, True):
        out = ops.dense_scores(acts, grads, dense, per_token=per_token, backend="triton")
        ref = oracle.dense_scores(acts, grads, dense, per_token=per_token)
        assert oracle.rel_err(out, ref) < oracle.TOLERANCE[torch.bfloat16]
    del grads, base


def test_grid_limits_split_documents_and_queries(monkeypatch):
    """A CUDA grid holds at most 65535 programs in y and z: per-token dense scores take
    queries and documents in pieces, and the rotations' chunks hold at most that many
    documents (here the limit is lowered to 2, so that small shapes cross it)."""
    monkeypatch.setattr(_shared, "GRID_YZ_LIMIT", 2)
    acts, grads = torch.randn(5, 3, 4, device=DEVICE), torch.randn(5, 3, 6, device=DEVICE)
    dense, mask = torch.randn(5, 6, 4, device=DEVICE), _mask(5, 3)
    out = ops.dense_scores(acts, grads, dense, mask=mask, per_token=True, backend="triton")
    assert oracle.rel_err(out, oracle.dense_scores(acts, grads, dense, mask, per_token=True)) < 1e-5
    assert _shared.rotation_plan(5, 3, 4, 6, 4, 16, 1 << 20)[0] == 2
    q_a, q_s = _orthonormal(4), _orthonormal(6)
    out = ops.eigen_correction(acts, grads, q_a, q_s, mask=mask, backend="triton")
    assert oracle.rel_err(out, oracle.eigen_correction(acts, grads, q_a, q_s, mask)) < 1e-5


def test_a_config_too_large_for_the_device_runs_with_fewer_stages(monkeypatch):
    """The configs are the H100's: on a GPU with less shared memory per block (99 KiB on
    sm_86 / sm_89) Triton refuses a 4-stage bf16 covariance (128 KiB) when it loads the
    kernel, before it runs; the launch retries with fewer stages and remembers what fits."""
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(_shared, "INTERPRETING", False)
    monkeypatch.setattr(_shared, "_STAGES_THAT_FIT", {})
    tried = []

    class Kernel:  # stands in for a jitted kernel on a GPU with room for 2 stages
        def __getitem__(self, grid):
            def run(*args, num_stages, **kwargs):
                tried.append(num_stages)
                if num_stages > 2:
                    raise OutOfResources(32768 * num_stages, 101376, "shared memory")
            return run

    kernel = Kernel()
    _shared.launch(kernel, (1,), 7, BLOCK=128, num_warps=8, num_stages=4)
    assert tried == [4, 3, 2]
    _shared.launch(kernel, (1,), 7, BLOCK=128, num_warps=8, num_stages=4)  # straight to what fits
    assert tried == [4, 3, 2, 2]
    _shared.launch(kernel, (1,), 7, BLOCK=64, num_warps=8, num_stages=2)  # another config: its own
    assert tried[-1] == 2

    class TooLarge:
        def __getitem__(self, grid):
            def run(*args, num_stages, **kwargs):
                raise OutOfResources(300000, 101376, "shared memory")
            return run

    with pytest.raises(OutOfResources):  # even one stage does not fit: Triton's own error
        _shared.launch(TooLarge(), (1,), num_stages=3)
    # benchmarks.tune: a candidate that does not fit fails, instead of being timed with fewer
    # stages under its own name
    monkeypatch.setattr(_shared, "EXACT_STAGES", {kernel})
    with pytest.raises(OutOfResources):
        _shared.launch(kernel, (1,), 7, BLOCK=32, num_warps=8, num_stages=4)
    _shared.launch(Kernel(), (1,), 7, BLOCK=32, num_warps=8, num_stages=4)  # another kernel still adapts


def test_sampling_keys_of_two_calls_do_not_overlap(monkeypatch):
    """Row r of a sampling call draws from Philox key seed + r. Seeds drawn below 2^31 made
    two calls whose seeds differed by less than their row count share draws (shifted by that
    difference): over ~1e5 chunked calls a few percent of the true Fisher's labels. Seeds are
    62-bit now (and >= 2^32, one compiled seed type)."""
    from triton_kernels import cross_entropy as tk_ce

    seeds = []
    monkeypatch.setattr(tk_ce, "launch", lambda kernel, grid, *args, **kwargs: seeds.append(args[6]))
    logits = torch.randn(5, 7, device=DEVICE)
    for sample in (True, True, False):
        tk_ce.cross_entropy_rows(logits.clone(), torch.zeros(5, dtype=torch.int64, device=DEVICE), sample=sample)
    assert all(2**32 <= s < 2**62 for s in seeds) and seeds[0] != seeds[1], seeds
