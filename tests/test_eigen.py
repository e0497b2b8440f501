"""pyinf.eigen: the fit's eigendecompositions split over workers (threads, one CUDA stream
each on a GPU) give the same bits as one after another, and bad input is named."""
import pytest
import torch

import pyinf
from pyinf.eigen import ENV_WORKERS, _balanced, eigendecompose, resolve_workers

from .models import TokenDataset, tiny_gpt2

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _covariances(sizes, device="cpu", seed=None):
    """Fresh random float64 covariances (x^T x / rows, decaying column scales, like a
    layer's activations), one per size; a few rows fewer than columns for the largest ones so
    that some have zero eigenvalues."""
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
    out = {}
    for i, n in enumerate(sizes):
        rows = max(1, n - 3) if n > 8 else 2 * n
        x = torch.randn(rows, n, generator=g, dtype=torch.float64) * torch.logspace(0, -3, n, dtype=torch.float64)
        out[f"m{i} ({n})"] = (x.T @ x / rows).to(device)
    return out


SIZES = [1, 5, 17, 33, 64, 63, 2, 40]


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_same_bits_as_one_after_another_cpu(workers):
    mats = _covariances(SIZES)
    got = eigendecompose(mats, workers=workers)
    assert list(got) == list(mats)  # the caller's order
    for k, m in mats.items():
        vals, vecs = torch.linalg.eigh(m)
        assert torch.equal(got[k][0], vals) and torch.equal(got[k][1], vecs), k
        # and it is an eigendecomposition, against the float64 matrix
        rec = (got[k][1] * got[k][0]) @ got[k][1].T
        assert (rec - m).abs().max() <= 1e-12 * max(1.0, m.abs().max().item()), k


@needs_cuda
@pytest.mark.parametrize("workers", [2, 4])
def test_same_bits_as_one_after_another_cuda(workers):
    # the matrices are still being written on the caller's stream when eigendecompose starts:
    # the worker streams must wait for them
    x = {f"m{i} ({n})": torch.randn(4096, n, dtype=torch.float64, device="cuda")
         for i, n in enumerate([769, 768, 3073, 3072, 5, 1, 100])}
    mats = {k: v.T @ v / v.shape[0] for k, v in x.items()}
    got = eigendecompose(mats, workers=workers)
    sums = {k: got[k][1].sum() for k in mats}  # used on the caller's stream right away
    for k, m in mats.items():
        vals, vecs = torch.linalg.eigh(m)
        assert torch.equal(got[k][0], vals) and torch.equal(got[k][1], vecs), k
        assert torch.equal(sums[k], vecs.sum()), k


def test_work_is_balanced_largest_first():
    sizes = {"a": 3073, "b": 3072, "c": 769, "d": 768, "e": 3073, "f": 3072}
    plan = _balanced(list(sizes), sizes, 2)
    assert [lst[0] for lst in plan] == ["a", "e"]  # the two largest start first, one each
    assert sorted(k for lst in plan for k in lst) == sorted(sizes)
    loads = [sum(sizes[k] ** 3 for k in lst) for lst in plan]
    assert max(loads) / min(loads) < 1.05
    assert len(_balanced(["a", "b"], sizes, 8)) == 2  # no idle workers


def test_workers_from_the_environment(monkeypatch):
    monkeypatch.delenv(ENV_WORKERS, raising=False)
    assert resolve_workers(None) == 1
    import numpy as np

    assert resolve_workers(np.int64(2)) == 2 and type(resolve_workers(np.int64(2))) is int  # numpy integers too
    monkeypatch.setenv(ENV_WORKERS, "3")
    assert resolve_workers(None) == 3
    assert resolve_workers(2) == 2  # an explicit value wins
    monkeypatch.setenv(ENV_WORKERS, "many")
    with pytest.raises(ValueError, match=r"\$PYINF_EIGH_WORKERS must be a positive integer, got 'many'"):
        resolve_workers(None)


def test_measured_default_on_cuda_only(monkeypatch):
    from pyinf.ops import _preferences

    monkeypatch.delenv(ENV_WORKERS, raising=False)
    monkeypatch.setattr(_preferences, "EIGH_WORKERS", None)
    assert resolve_workers(None, torch.device("cuda")) == 1  # nothing measured
    monkeypatch.setattr(_preferences, "EIGH_WORKERS", 4)
    assert resolve_workers(None, torch.device("cuda")) == 4
    assert resolve_workers(None, torch.device("cpu")) == 1
    assert resolve_workers(2, torch.device("cuda")) == 2
    monkeypatch.setenv(ENV_WORKERS, "3")
    assert resolve_workers(None, torch.device("cuda")) == 3


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "2"])
def test_bad_worker_counts_are_refused(bad):
    with pytest.raises(ValueError, match="eigh_workers must be a positive integer"):
        resolve_workers(bad)


def test_bad_matrices_are_named():
    mats = _covariances([4, 6])
    with pytest.raises(ValueError, match=r"m1 \(6\): eigh needs a square matrix, got shape \(6, 5\)"):
        eigendecompose({**mats, "m1 (6)": mats["m1 (6)"][:, :5]})
    with pytest.raises(TypeError, match="eigh needs a floating-point matrix"):
        eigendecompose({"ints": torch.eye(3, dtype=torch.int64)})
    broken = mats["m1 (6)"].clone()
    broken[4, 1] = float("nan")
    for workers in (1, 2):
        with pytest.raises(ValueError, match=r"m1 \(6\): non-finite entries"):
            eigendecompose({**mats, "m1 (6)": broken}, workers=workers)


def test_fit_with_eigh_workers_gives_the_same_factors():
    model, task, train = tiny_gpt2(seed=4), pyinf.CausalLMTask(), TokenDataset(7, seed=5)
    engine = pyinf.InfluenceEngine(model, task, progress=False)
    one = engine.fit_factors(train, fisher="empirical", batch_size=4)
    three = engine.fit_factors(train, fisher="empirical", batch_size=4, eigh_workers=3)
    assert one.meta["eigh_workers"] == 1 and three.meta["eigh_workers"] == 3
    for name in one.modules:
        for field in ("a_cov", "s_cov", "q_a", "q_s", "a_eigvals", "s_eigvals", "lambdas"):
            assert torch.equal(getattr(one[name], field), getattr(three[name], field)), (name, field)
    with pytest.raises(ValueError, match="eigh_workers must be a positive integer"):
        engine.fit_factors(train, eigh_workers=0)
