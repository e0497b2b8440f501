"""The EK-FAC pipeline against exact math and brute force, in float64, and its
consistency properties (full rank, per-token/per-module sums, self-influence, batch size
and padding invariance)."""
import warnings

import pytest
import torch

import pyinf
from pyinf.queries import low_rank

from . import brute_force as bf
from . import seeds
from .models import ImageDataset, MLPTask, RegressionDataset, TinyCNN, TinyMLP, TokenDataset, tiny_gpt2


def _rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(params=["mlp", "gpt2", "cnn"])
def setup64(request):
    """A float64 model, its task, training set and query set."""
    if request.param in ("mlp", "cnn"):  # regression on vectors, or on images through convolutions
        model_class, data = (TinyMLP, RegressionDataset) if request.param == "mlp" else (TinyCNN, ImageDataset)
        torch.manual_seed(seeds.offset(1))
        model = model_class().double()
        task = MLPTask()
        train = data(13, seed=2, dtype=torch.float64)
        query = data(3, seed=3, dtype=torch.float64)
    else:
        model = tiny_gpt2(seed=1, dtype=torch.float64)
        task = pyinf.CausalLMTask()
        train = TokenDataset(9, seed=2)
        query = TokenDataset(3, seed=3, completion=2)
    return model, task, train, query


def test_inverse_hvp_equals_dense_kronecker_inverse():
    d_out, d_in = 4, 6
    q_a, _ = torch.linalg.qr(torch.randn(d_in, d_in, dtype=torch.float64))
    q_s, _ = torch.linalg.qr(torch.randn(d_out, d_out, dtype=torch.float64))
    lambdas = torch.rand(d_out, d_in, dtype=torch.float64) * 2
    spec = pyinf.modules.ModuleSpec("layer", d_out, d_in, False, False)
    mf = pyinf.factors.ModuleFactors(spec, torch.eye(d_in, dtype=torch.float64), torch.eye(d_out, dtype=torch.float64),
                                     torch.ones(d_in, dtype=torch.float64), q_a, torch.ones(d_out, dtype=torch.float64),
                                     q_s, lambdas)
    v = torch.randn(5, d_out, d_in, dtype=torch.float64)
    damping = 0.37
    out = mf.inverse_hvp(v, damping)
    dense = bf.dense_inverse(q_a, q_s, lambdas, damping)
    for i in range(v.shape[0]):
        expected = bf.unvec(dense @ bf.vec(v[i]), d_out, d_in)
        assert torch.allclose(out[i], expected, rtol=1e-12, atol=1e-12)


def test_factors_match_brute_force(setup64):
    model, task, train, _ = setup64
    engine = pyinf.InfluenceEngine(model, task, progress=False)
    factors = engine.fit_factors(train, fisher="empirical", batch_size=4)
    covs = bf.covariances(model, task, train, engine.modules, engine.specs)
    grads = bf.doc_gradients(model, task, train, engine.modules, engine.specs)
    for name, f in factors.modules.items():
        a, s = covs[name]
        assert _rel(f.a_cov, a) < 1e-10 and _rel(f.s_cov, s) < 1e-10, name
        # the eigenbases are orthonormal eigenbases of the covariances, A's and S's
        for q, eigvals, cov in ((f.q_a, f.a_eigvals, a), (f.q_s, f.s_eigvals, s)):
            assert torch.allclose(q.T @ q, torch.eye(q.shape[0], dtype=q.dtype), atol=1e-10), name
            assert torch.allclose(q @ torch.diag(eigvals) @ q.T, cov, atol=1e-10), name
        lam = torch.stack([(f.q_s.T @ g[name] @ f.q_a) ** 2 for g in grads]).mean(0)
        assert _rel(f.lambdas, lam) < 1e-10, name


def _brute_scores(factors, train_grads, query_grads, damping=None, rank=None):
    total = torch.zeros(len(train_grads), len(query_grads), dtype=torch.float64)
    for name, f in factors.modules.items():
        lam = bf.default_damping(f.lambdas) if damping is None else damping
        dense = bf.dense_inverse(f.q_a, f.q_s, f.lambdas, lam)
        for j, qg in enumerate(query_grads):
            p = bf.unvec(dense @ bf.vec(qg[name]), f.spec.d_out, f.spec.d_in)
            if rank is not None:
                u, s, vh = torch.linalg.svd(p)
                p = (u[:, :rank] * s[:rank]) @ vh[:rank]
            for i, tg in enumerate(train_grads):
                total[i, j] += (p * tg[name]).sum()
    return total


@pytest.mark.parametrize("rank", [None, 2])
def test_pairwise_scores_match_brute_force(setup64, rank):
    model, task, train, query = setup64
    engine = pyinf.InfluenceEngine(model, task, progress=False)
    factors = engine.fit_factors(train, fisher="empirical", batch_size=4)
    queries = engine.prepare_queries(query, factors, rank=rank, batch_size=2)
    scores = engine.pairwise_scores(train, queries, batch_size=4)
    assert scores.dtype == torch.float32 and scores.shape == (len(train), len(query))
    train_grads = bf.doc_gradients(model, task, train, engine.modules, engine.specs)
    query_grads = bf.doc_gradients(model, task, query, engine.modules, engine.specs, measurement=True)
    expected = _brute_scores(factors, train_grads, query_grads, rank=rank)
    assert _rel(scores, expected) < 1e-6  # float32 output of float64 math


def test_self_influence_matches_brute_force(setup64):
    model, task, train, _ = setup64
    engine = pyinf.InfluenceEngine(model, task, progress=False)
    factors = engine.fit_factors(train, fisher="empirical", batch_size=5)
    damping = 0.05
    si = engine.self_influence(train, factors, damping=damping, batch_size=3)
    grads = bf.doc_gradients(model, task, train, engine.modules, engine.specs)
    expected = torch.zeros(len(train), dtype=torch.float64)
    for name, f in factors.modules.items():
        dense = bf.dense_inverse(f.q_a, f.q_s, f.lambdas, damping)
        for i, g in enumerate(grads):
            expected[i] += bf.vec(g[name]) @ dense @ bf.vec(g[name])
    assert _rel(si, expected) < 1e-6


def test_layers_called_several_times_are_the_sum_over_their_calls():
    """A layer called k times per forward (weights shared across depth) has one weight
    gradient, the sum over its calls: its covariances count every call's tokens, Lambda,
    scores and self-influence follow the summed per-document gradients of plain autograd
    (kronfluence's has_shared_parameters=True: tests/test_kronfluence.py); per-token scores,
    whose tokens would be counted k times, are refused."""
    from .models import SharedLayers

    torch.manual_seed(seeds.offset(11))
    model, task = SharedLayers().double(), MLPTask()
    train, query = RegressionDataset(9, seed=12, dtype=torch.float64), RegressionDataset(3, seed=13, dtype=torch.float64)
    engine = pyinf.InfluenceEngine(model, task, progress=False)
    factors = engine.fit_factors(train, fisher="empirical", batch_size=4)
    # covariances: every call's inputs and output gradients, one document at a time
    seen = {n: [] for n in engine.modules}
    hooks = []
    for name, m in engine.modules.items():
        def fwd(mod, args, out, name=name):
            a = args[0].detach()
            if engine.specs[name].has_bias:
                a = torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], -1)
            out.register_hook(lambda g, a=a, name=name: seen[name].append((a.reshape(-1, a.shape[-1]),
                                                                          g.reshape(-1, g.shape[-1]))))
        hooks.append(m.register_forward_hook(fwd))
    try:
        for i in range(len(train)):
            task.compute_train_loss(bf.collate(task, [train[i]]), model).backward()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    for name, f in factors.modules.items():
        a = torch.cat([a for a, _ in seen[name]])
        g = torch.cat([g for _, g in seen[name]])
        assert _rel(f.a_cov, a.T @ a / len(a)) < 1e-10 and _rel(f.s_cov, g.T @ g / len(g)) < 1e-10, name
    assert factors.meta["n_tokens"] == {"fc": 18, "cell": 27, "head": 9}
    grads = bf.doc_gradients(model, task, train, engine.modules, engine.specs)
    for name, f in factors.modules.items():
        lam = torch.stack([(f.q_s.T @ g[name] @ f.q_a) ** 2 for g in grads]).mean(0)
        assert _rel(f.lambdas, lam) < 1e-10, name
    queries = engine.prepare_queries(query, factors, rank=None)
    expected = _brute_scores(factors, grads, bf.doc_gradients(model, task, query, engine.modules, engine.specs,
                                                               measurement=True))
    assert _rel(engine.pairwise_scores(train, queries, batch_size=4), expected) < 1e-6
    si = engine.self_influence(train, factors, damping=0.05, batch_size=4)
    want = torch.zeros(len(train), dtype=torch.float64)
    for name, f in factors.modules.items():
        dense = bf.dense_inverse(f.q_a, f.q_s, f.lambdas, 0.05)
        want += torch.stack([bf.vec(g[name]) @ dense @ bf.vec(g[name]) for g in grads])
    assert _rel(si, want) < 1e-6
    with pytest.raises(ValueError, match="per-token scores need every tracked layer to run per token"):
        engine.pairwise_scores(train, queries, per_token=True)


def test_a_convolution_over_several_frames_per_document():
    """A Conv2d on [B*F, C, H, W] (F frames per document, batch-major, as a video encoder runs
    its frames): each document's positions are those of its F frames; self-influence follows
    the per-document gradients of plain autograd."""
    class Frames(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = torch.nn.Conv2d(2, 3, 2, stride=2)
            self.head = torch.nn.Linear(3, 3)

        def forward(self, x):  # [B, F, C, H, W]
            b, f = x.shape[:2]
            h = torch.tanh(self.patch(x.flatten(0, 1)))  # [B*F, 3, H/2, W/2]
            return self.head(h.reshape(b, f, 3, -1).mean((1, 3)))

    torch.manual_seed(seeds.offset(14))
    model, task = Frames().double(), MLPTask()
    g = torch.Generator().manual_seed(seeds.offset(15))
    data = [(torch.randn(3, 2, 4, 6, generator=g, dtype=torch.float64),
             torch.randn(3, generator=g, dtype=torch.float64)) for _ in range(7)]
    engine = pyinf.InfluenceEngine(model, task, progress=False)
    factors = engine.fit_factors(data, fisher="empirical", batch_size=3)
    assert factors.meta["n_tokens"]["patch"] == 7 * 3 * 2 * 3  # documents x frames x positions
    si = engine.self_influence(data, factors, damping=0.05, batch_size=3)
    grads = bf.doc_gradients(model, task, data, engine.modules, engine.specs)
    want = torch.zeros(len(data), dtype=torch.float64)
    for name, f in factors.modules.items():
        dense = bf.dense_inverse(f.q_a, f.q_s, f.lambdas, 0.05)
        want += torch.stack([bf.vec(d[name]) @ dense @ bf.vec(d[name]) for d in grads])
    assert _rel(si, want) < 1e-6


def test_a_tracked_layer_the_first_batch_never_calls_is_said_at_once():
    """A layer whose owner reads its weight directly has nothing to capture; the fit stops on
    it after its pass, and the first batch already warns, naming it."""
    class Direct(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(5, 5)
            self.head = torch.nn.Linear(5, 3)

        def forward(self, x):
            return self.head(torch.tanh(torch.nn.functional.linear(x, self.fc.weight, self.fc.bias)))

    engine = pyinf.InfluenceEngine(Direct(), MLPTask(), progress=False)
    with pytest.warns(UserWarning, match=r"tracked modules \['fc'\] were not called in the first batch"):
        with pytest.raises(RuntimeError, match="module 'fc' received no gradient"):
            engine.fit_factors(RegressionDataset(6), batch_size=3)


def test_per_module_self_influence_sums_to_the_total(setup64):
    model, task, train, _ = setup64
    engine = pyinf.InfluenceEngine(model, task, progress=False)
    factors = engine.fit_factors(train, fisher="empirical", batch_size=4)
    total = engine.self_influence(train, factors, batch_size=3)
    layers = engine.self_influence(train, factors, batch_size=3, per_module=True)
    assert list(layers) == list(engine.specs) and all(v.shape == total.shape for v in layers.values())
    assert _rel(sum(layers.values()), total) < 1e-6
    one = pyinf.InfluenceEngine(model, _tracking(task, [factors.module_names[0]]), progress=False)
    assert _rel(layers[factors.module_names[0]], one.self_influence(train, factors, batch_size=3)) < 1e-6


def _tracking(task, names):
    """``task`` tracking ``names`` only."""
    import copy

    tracked = copy.copy(task)
    tracked.get_influence_tracked_modules = lambda: list(names)
    return tracked


@pytest.fixture(scope="module")
def gpt2_fp32():
    model = tiny_gpt2(seed=4)
    task = pyinf.CausalLMTask()
    train = TokenDataset(10, seed=5)
    query = TokenDataset(4, seed=6, completion=3)
    engine = pyinf.InfluenceEngine(model, task, progress=False)
    factors = engine.fit_factors(train, batch_size=4, seed=0)
    return engine, factors, train, query


def test_full_rank_equals_rank_none(gpt2_fp32):
    engine, factors, train, query = gpt2_fp32
    full = engine.prepare_queries(query, factors, rank=None)
    big = engine.prepare_queries(query, factors, rank=10_000)  # clipped to min(d_out, d_in) per layer
    s_full = engine.pairwise_scores(train, full)
    s_big = engine.pairwise_scores(train, big)
    assert _rel(s_big, s_full) < 1e-4


def test_per_token_and_per_module_sum_to_totals(gpt2_fp32):
    engine, factors, train, query = gpt2_fp32
    queries = engine.prepare_queries(query, factors, rank=4)
    total = engine.pairwise_scores(train, queries, batch_size=3)
    per_token = engine.pairwise_scores(train, queries, per_token=True, batch_size=3)
    per_module = engine.pairwise_scores(train, queries, per_module=True, batch_size=3)
    longest = max(len(x["input_ids"]) for x in train.items)
    assert per_token.shape == (len(train), longest, len(query))
    assert _rel(per_token.sum(1), total) < 1e-5
    assert set(per_module) == set(engine.specs)
    assert _rel(sum(per_module.values()), total) < 1e-5
    # padding positions carry no influence
    for i, item in enumerate(train.items):
        assert torch.all(per_token[i, len(item["input_ids"]):] == 0)


def test_query_groups_give_the_scores_of_one_pass(gpt2_fp32):
    engine, factors, train, query = gpt2_fp32
    queries = engine.prepare_queries(query, factors, rank=3)
    for kwargs in (dict(), dict(per_token=True), dict(per_module=True)):
        whole = engine.pairwise_scores(train, queries, batch_size=4, **kwargs)
        for size in (1, 3):  # 4 queries: groups of 1, and of 3 + 1
            grouped = engine.pairwise_scores(train, queries, batch_size=4, query_batch_size=size, **kwargs)
            if kwargs.get("per_module"):
                assert set(grouped) == set(whole)
                assert all(_rel(grouped[n], whole[n]) < 1e-6 for n in whole)
            else:  # the same sums, in GEMMs of other widths: equal up to fp32 rounding
                assert grouped.shape == whole.shape and _rel(grouped, whole) < 1e-6
    picked = queries.select([3, 1])
    assert picked.n_queries == 2 and picked.measurements.tolist() == queries.measurements[[3, 1]].tolist()
    assert queries.bytes_per_query() == sum(4 * 3 * (s.d_in + s.d_out) for s in engine.specs.values())
    import numpy as np

    for index in (np.array([3, 1]), torch.tensor([3, 1]), [np.int64(3), 1]):  # positions from topk / argsort
        assert torch.equal(queries.select(index).measurements, picked.measurements)
    for bad in ([4], [True], [1.0], []):
        with pytest.raises(ValueError, match="query positions"):
            queries.select(bad)
    with pytest.raises(ValueError, match="query_batch_size"):
        engine.pairwise_scores(train, queries, query_batch_size=0)


@pytest.mark.parametrize("per_token", [False, True])
def test_grouped_and_dense_routes_agree_with_factored(gpt2_fp32, per_token):
    engine, factors, train, query = gpt2_fp32
    queries = engine.prepare_queries(query, factors, rank=3)
    base = engine.pairwise_scores(train, queries, batch_size=4, per_token=per_token)
    grouped = engine.pairwise_scores(train, queries, batch_size=4, per_token=per_token, group_modules=True)
    dense = engine.pairwise_scores(train, queries, batch_size=4, per_token=per_token, route="dense")
    assert _rel(grouped, base) < 1e-6
    assert _rel(dense, base) < 1e-4


def test_self_influence_is_diagonal_of_full_rank_pairwise(gpt2_fp32):
    engine, factors, train, _ = gpt2_fp32
    queries = engine.prepare_queries(train, factors, rank=None, damping=0.01)
    pairwise = engine.pairwise_scores(train, queries)
    si = engine.self_influence(train, factors, damping=0.01)
    assert _rel(si, torch.diagonal(pairwise)) < 1e-4
    assert (si > 0).all()


def test_scores_invariant_to_batch_size_and_padding(gpt2_fp32):
    engine, factors, train, query = gpt2_fp32
    queries = engine.prepare_queries(query, factors, rank=4)
    one = engine.pairwise_scores(train, queries, batch_size=1)  # no padding at all
    many = engine.pairwise_scores(train, queries, batch_size=7)  # padded batches
    assert _rel(many, one) < 1e-5
    si1 = engine.self_influence(train, factors, batch_size=1)
    si7 = engine.self_influence(train, factors, batch_size=7)
    assert _rel(si7, si1) < 1e-5


class _LabelsAreInputIds(pyinf.CausalLMTask):
    """The common recipe: pad on the right, then ``labels = input_ids.clone()`` (padding is
    not -100 in the labels, only 0 in the attention mask)."""

    def collate_fn(self, examples):
        batch = pyinf.pad_collate([{"input_ids": e["input_ids"]} for e in examples], pad_token_id=0)
        batch["labels"] = batch["input_ids"].clone()
        return batch


def test_padding_in_the_labels_is_no_target():
    """The first padding token after a right-padded document was counted as a target (it is
    predicted from a real position), so a document scored differently padded than alone
    (0.5-4x here); padding is no target wherever the labels put it."""
    model = tiny_gpt2(seed=12)
    train, query = TokenDataset(6, seed=13), TokenDataset(2, seed=14, completion=2)
    engine = pyinf.InfluenceEngine(model, _LabelsAreInputIds(), progress=False)
    factors = engine.fit_factors(train, fisher="empirical", batch_size=1)
    queries = engine.prepare_queries(query, factors, rank=None)
    assert _rel(engine.pairwise_scores(train, queries, batch_size=6),
                engine.pairwise_scores(train, queries, batch_size=1)) < 1e-5
    batch = engine.task.collate_fn([train[i] for i in range(6)])
    targets = (engine.task._labels(batch) != -100).sum(1)
    assert targets.tolist() == [len(train[i]["input_ids"]) - 1 for i in range(6)]


def test_a_query_without_a_target_is_named():
    """A query whose labels are all -100 has a zero gradient: every score against it is 0,
    which a warning names instead of leaving for a ranking of ties."""
    model = tiny_gpt2(seed=15)
    train, query = TokenDataset(4, seed=16), TokenDataset(3, seed=17, completion=2)
    query.items[1]["labels"][:] = -100
    engine = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(), progress=False)
    factors = engine.fit_factors(train, batch_size=2)
    with pytest.warns(UserWarning, match=r"queries \[1\] have a zero gradient"):
        queries = engine.prepare_queries(query, factors, rank=2)
    scores = engine.pairwise_scores(train, queries)
    assert (scores[:, 1] == 0).all() and (scores[:, [0, 2]] != 0).all()


def test_factors_invariant_to_batch_size_and_padding():
    model, task = tiny_gpt2(seed=8), pyinf.CausalLMTask()
    train = TokenDataset(9, seed=9)
    engine = pyinf.InfluenceEngine(model, task, progress=False)
    f1 = engine.fit_factors(train, fisher="empirical", batch_size=1)
    f5 = engine.fit_factors(train, fisher="empirical", batch_size=5)
    for name in f1.modules:
        for field in ("a_cov", "s_cov", "lambdas"):
            assert _rel(getattr(f5[name], field), getattr(f1[name], field)) < 1e-5, (name, field)


def test_true_fisher_is_seeded_and_differs_from_empirical():
    model, task = tiny_gpt2(seed=8), pyinf.CausalLMTask()
    train = TokenDataset(6, seed=9)
    engine = pyinf.InfluenceEngine(model, task, progress=False)
    a = engine.fit_factors(train, fisher="true", seed=3)
    b = engine.fit_factors(train, fisher="true", seed=3)
    e = engine.fit_factors(train, fisher="empirical")
    name = next(iter(a.modules))
    assert torch.equal(a[name].s_cov, b[name].s_cov)
    assert _rel(a[name].s_cov, e[name].s_cov) > 1e-3
    assert torch.equal(a[name].a_cov, e[name].a_cov)  # activations do not depend on labels


def test_low_rank_is_truncated_svd():
    p = torch.randn(3, 7, 5, dtype=torch.float64)
    left, right = low_rank(p, 2)
    assert left.shape == (3, 7, 2) and right.shape == (3, 5, 2)
    u, s, vh = torch.linalg.svd(p, full_matrices=False)
    expected = (u[..., :2] * s[..., None, :2]) @ vh[..., :2, :]
    assert torch.allclose(left @ right.transpose(1, 2), expected, atol=1e-12)


def test_randomized_svd_recovers_a_decaying_spectrum():
    u, _ = torch.linalg.qr(torch.randn(2, 60, 40, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(2, 50, 40, dtype=torch.float64))
    s = 0.7 ** torch.arange(40, dtype=torch.float64)
    p = (u * s) @ v.transpose(1, 2)
    exact = low_rank(p, 5, "full")
    approx = low_rank(p, 5, "randomized")
    dense = lambda lr: lr[0] @ lr[1].transpose(1, 2)  # noqa: E731
    assert _rel(dense(approx), dense(exact)) < 1e-6
    with pytest.raises(ValueError, match="svd must be"):
        low_rank(p, 5, "magic")


def test_default_tracking_skips_output_embedding_and_keeps_conv1d():
    engine = pyinf.InfluenceEngine(tiny_gpt2(), pyinf.CausalLMTask(), progress=False)
    assert "lm_head" not in engine.specs
    assert all(spec.transposed for spec in engine.specs.values())  # GPT-2's Conv1D layers
    assert len(engine.specs) == 8  # 2 blocks x (c_attn, c_proj, c_fc, mlp c_proj)


def test_tracked_modules_by_name():
    names = ["transformer.h.1.mlp.c_fc", "transformer.h.0.mlp.c_fc"]
    engine = pyinf.InfluenceEngine(tiny_gpt2(), pyinf.CausalLMTask(tracked_modules=names), progress=False)
    assert list(engine.specs) == sorted(names)  # model order


def test_normalisations(gpt2_fp32):
    from pyinf.normalize import normalize

    engine, factors, train, query = gpt2_fp32
    queries = engine.prepare_queries(train, factors, rank=None, damping=0.01)  # train set as its own queries
    scores = engine.pairwise_scores(train, queries)
    si = engine.self_influence(train, factors, damping=0.01)
    # the queries' own H^-1 norms equal the documents' self-influence (same gradients)
    assert _rel(queries.self_influence, si) < 1e-4
    cos = normalize(scores, "cosine", queries=queries, train_self_influence=si)
    assert torch.allclose(torch.diagonal(cos), torch.ones(len(train)), atol=1e-4)
    assert cos.abs().max() <= 1 + 1e-4
    # per-nat divides by the queries' own losses, which are the summed CE of each document
    task = engine.task
    with torch.no_grad():
        losses = [float(task.compute_train_loss(pyinf.pad_collate([train[i]]), engine.model)) for i in range(len(train))]
    assert _rel(queries.measurements, torch.tensor(losses)) < 1e-6
    assert _rel(normalize(scores, "per_nat", queries=queries), scores / torch.tensor(losses)[None, :]) < 1e-6
    rel = normalize(scores, "relative", train_self_influence=si)
    assert _rel(rel, scores / si.sqrt()[:, None]) < 1e-6
    with pytest.raises(ValueError, match="needs queries"):
        normalize(scores, "cosine", train_self_influence=si)
    # shapes that do not belong together are named, not broadcast
    n = len(train)
    with pytest.raises(ValueError, match=rf"hold 5 queries, the given Queries {n}"):
        normalize(scores[:, :5], "per_nat", queries=queries)
    with pytest.raises(ValueError, match=rf"train_self_influence must be \[n_train={n}\] for scores of shape "
                                         rf"\({n}, {n}\), got shape \(1,\)"):
        normalize(scores, "relative", train_self_influence=si[:1])
    # per-module scores (a dict) are normalised module by module
    per_module = {"a": scores, "b": 2 * scores}
    out = normalize(per_module, "relative", train_self_influence=si)
    assert set(out) == {"a", "b"} and _rel(out["b"], 2 * rel) < 1e-6
    # a list of self-influences is taken; values no self-influence can have, and measurements
    # per_nat cannot divide by (0, negative: 1e30-scale scores, signs lost), are refused
    assert _rel(normalize(scores, "relative", train_self_influence=si.tolist()), rel) < 1e-6
    with pytest.raises(ValueError, match=r"train_self_influence must be finite \(or NaN, .*\) and >= 0"):
        normalize(scores, "relative", train_self_influence=-si)
    with pytest.raises(ValueError, match=r"train_self_influence must be finite"):
        normalize(scores, "relative", train_self_influence=torch.cat([si[:-1], torch.tensor([float("inf")])]))
    # a document that could not be computed (NaN self-influence and scores) stays NaN, alone
    gap = si.clone()
    gap[1] = float("nan")
    with_gap = normalize(scores, "relative", train_self_influence=gap)
    assert bool(with_gap[1].isnan().all()) and _rel(with_gap[[0, *range(2, n)]], rel[[0, *range(2, n)]]) < 1e-6
    zeroed = queries.select(range(n))
    zeroed.meta["measurements"] = [0.0] + [-1.5] + list(zeroed.meta["measurements"][2:])
    with pytest.raises(ValueError, match=r"queries \[0, 1\] have \[0.0, -1.5\]: a measurement must be > 0"):
        normalize(scores, "per_nat", queries=zeroed)


def test_dataloader_input_matches_dataset_input(gpt2_fp32):
    engine, factors, train, query = gpt2_fp32
    queries = engine.prepare_queries(query, factors, rank=3)
    loader = torch.utils.data.DataLoader(train, batch_size=3, collate_fn=engine.task.collate_fn)
    assert torch.equal(engine.pairwise_scores(loader, queries), engine.pairwise_scores(train, queries, batch_size=3))


class _BroadcastFirstTask(MLPTask):
    """Batches (OrderedDicts) whose first tensor is shared by the documents (``scale [1, d]``,
    as ``position_ids [1, T]`` often is); the task gives no mask."""

    def compute_train_loss(self, batch, model, sample=False):
        assert type(batch).__name__ == "OrderedDict"  # the loader's batch type reaches the task
        return super().compute_train_loss((batch["x"] * batch["scale"], batch["y"]), model, sample)


def _broadcast_first_collate(items):
    from collections import OrderedDict
    x, y = torch.utils.data.default_collate(items)
    return OrderedDict(scale=torch.ones(1, x.shape[1], dtype=x.dtype), x=x, y=y)


def _shared_after_collate(items):  # a one-document batch may come last: its shared tensor follows
    x, y = torch.utils.data.default_collate(items)
    return (x, y, torch.ones(5, dtype=x.dtype))


class _SharedAfterTask(MLPTask):
    def compute_train_loss(self, batch, model, sample=False):
        return super().compute_train_loss(batch[:2], model, sample)


def test_a_tensor_shared_by_the_documents_does_not_count_as_them():
    """A leading [1, ...] tensor made each batch one document (7 documents gave 3 score rows):
    the loader says how many examples it batched. A one-document batch whose shared tensor
    comes after its inputs ([T]) stays one document."""
    torch.manual_seed(seeds.offset(4))
    model = TinyMLP().double()
    train, query = RegressionDataset(7, seed=5, dtype=torch.float64), RegressionDataset(3, seed=6, dtype=torch.float64)
    plain = pyinf.InfluenceEngine(model, MLPTask(), progress=False)
    factors = plain.fit_factors(train, fisher="empirical", batch_size=3)
    expected = plain.pairwise_scores(train, plain.prepare_queries(query, factors, rank=None), batch_size=3)

    for task, collate in ((_BroadcastFirstTask(), _broadcast_first_collate), (_SharedAfterTask(), _shared_after_collate)):
        engine = pyinf.InfluenceEngine(model, task, progress=False)
        loader = lambda data: torch.utils.data.DataLoader(data, batch_size=3, collate_fn=collate)  # noqa: E731
        factors2 = engine.fit_factors(loader(train), fisher="empirical")
        assert factors2.meta["n_examples"] == 7
        scores = engine.pairwise_scores(loader(train), engine.prepare_queries(loader(query), factors2, rank=None))
        assert scores.shape == (7, 3)
        assert _rel(scores, expected) < 1e-10


def test_a_loader_that_drops_its_last_batch_is_named(gpt2_fp32):
    engine, factors, train, query = gpt2_fp32
    queries = engine.prepare_queries(query, factors, rank=3)
    loader = torch.utils.data.DataLoader(train, batch_size=4, drop_last=True, collate_fn=engine.task.collate_fn)
    with pytest.warns(UserWarning, match=f"drops its last {len(train) % 4} examples"):
        scores = engine.pairwise_scores(loader, queries)
    assert scores.shape[0] == len(train) - len(train) % 4


def test_per_module_masks_match_one_shared_mask(gpt2_fp32):
    engine, factors, train, query = gpt2_fp32

    class PerModule(pyinf.CausalLMTask):
        def get_attention_mask(self, batch):
            return {name: batch["attention_mask"] for name in engine.specs}

    per_module = pyinf.InfluenceEngine(engine.model, PerModule(), progress=False)
    queries = engine.prepare_queries(query, factors, rank=3)
    for kwargs in ({}, {"per_token": True}):
        assert _rel(per_module.pairwise_scores(train, queries, batch_size=4, **kwargs),
                    engine.pairwise_scores(train, queries, batch_size=4, **kwargs)) < 1e-6
    f2 = per_module.fit_factors(train, batch_size=4, seed=0)
    name = factors.module_names[0]
    assert _rel(f2[name].a_cov, factors[name].a_cov) < 1e-6


def test_query_measurements_come_from_the_gradient_pass(gpt2_fp32):
    """CausalLMTask gives per-example measurements, so query preparation makes one forward per
    batch; a task with batch sums only falls back to one more forward per query. Both agree."""
    engine, factors, train, query = gpt2_fp32

    class SumsOnly(pyinf.CausalLMTask):
        def compute_measurement_per_example(self, batch, model):
            return None

    forwards = []
    handle = engine.model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        one_pass = engine.prepare_queries(query, factors, rank=3, batch_size=3)
        n_one_pass = len(forwards)
        forwards.clear()
        sums_only = pyinf.InfluenceEngine(engine.model, SumsOnly(), progress=False)
        two_pass = sums_only.prepare_queries(query, factors, rank=3, batch_size=3)
        n_two_pass = len(forwards)
    finally:
        handle.remove()
    assert n_one_pass == 2  # 4 queries in batches of 3
    assert n_two_pass == 2 + len(query)
    assert _rel(one_pass.measurements, two_pass.measurements) < 1e-6
    assert (one_pass.measurements > 0).all()


def test_per_example_measurement_of_the_wrong_shape_is_refused(gpt2_fp32):
    engine, factors, train, query = gpt2_fp32

    class Broken(pyinf.CausalLMTask):
        def compute_measurement_per_example(self, batch, model):
            return super().compute_measurement_per_example(batch, model)[:1]

    broken = pyinf.InfluenceEngine(engine.model, Broken(), progress=False)
    with pytest.raises(ValueError, match=r"Broken.compute_measurement_per_example must return one value per example "
                                         r"\(\[3\] for this batch\), got \(1,\)"):
        broken.prepare_queries(query, factors, rank=3, batch_size=3)


def test_fit_records_the_time_of_each_phase(gpt2_fp32, tmp_path):
    engine, factors, train, query = gpt2_fp32
    phases = factors.meta["seconds"]
    assert list(phases) == ["covariance_pass", "eigendecomposition", "lambda_pass"]
    assert all(v >= 0 for v in phases.values())
    factors.save(tmp_path / "f.safetensors")
    assert pyinf.Factors.load(tmp_path / "f.safetensors").meta["seconds"] == phases


def test_prefetched_batches_keep_order_and_errors():
    from pyinf.runner import prefetched

    assert list(prefetched(range(7))) == list(range(7))
    assert list(prefetched([])) == []

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            if i == 4:
                raise KeyError(f"example {i} is unreadable")
            return torch.tensor([i])

    seen = []
    with pytest.raises(KeyError, match="example 4 is unreadable"):
        for batch in prefetched(torch.utils.data.DataLoader(Broken(), batch_size=2)):
            seen.append(batch)
    assert len(seen) == 2  # the batches before the broken one arrived, in order


def test_prefetching_passes_give_the_same_results(gpt2_fp32, monkeypatch):
    """On a GPU the passes load batches one ahead in a thread; forced on here, nothing changes."""
    import functools

    from pyinf import factors as factors_mod
    from pyinf import queries as queries_mod
    from pyinf import runner
    from pyinf import scoring

    engine, factors, train, query = gpt2_fp32
    queries = engine.prepare_queries(query, factors, rank=3)
    plain = engine.pairwise_scores(train, queries, batch_size=3)
    forced = functools.partial(runner.run_pass, prefetch=True)
    for mod in (factors_mod, queries_mod, scoring):
        monkeypatch.setattr(mod, "run_pass", forced)
    assert torch.equal(engine.pairwise_scores(train, queries, batch_size=3), plain)
    f2 = engine.fit_factors(train, batch_size=4, seed=0)
    name = factors.module_names[0]
    assert torch.equal(f2[name].lambdas, factors[name].lambdas)


def test_every_submodule_keeps_its_own_training_flag():
    """The passes run the model in eval mode and give each submodule back its own flag: a
    training model with one block frozen in eval mode (say, for its dropout or norm
    statistics) keeps that block in eval mode, and the rest in training mode."""
    model = tiny_gpt2(seed=2)
    model.train()
    model.transformer.h[0].eval()
    before = {name: m.training for name, m in model.named_modules()}
    engine = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(), progress=False)
    data = TokenDataset(4, seed=3)
    factors = engine.fit_factors(data, batch_size=2)
    queries = engine.prepare_queries(TokenDataset(2, seed=4), factors, rank=2)
    engine.pairwise_scores(data, queries, batch_size=2)
    assert {name: m.training for name, m in model.named_modules()} == before


@pytest.mark.parametrize("group_modules", [False, True])
def test_fp16_model_scores_with_query_factors_outside_the_fp16_range(group_modules):
    """An fp16 model's query factors are cast to fp16 per query scaled to at most 1 (and the
    scores scaled back): factors of 1e6 and 1e-7 (past fp16's 65504, and under its 6e-8
    smallest subnormal after products) give the scores of the unscaled ones, times 0.1."""
    import copy

    model = tiny_gpt2(seed=1, dtype=torch.float16)
    engine = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(), progress=False)
    data = TokenDataset(4, seed=2)
    factors = engine.fit_factors(data, batch_size=2)
    queries = engine.prepare_queries(TokenDataset(2, seed=3), factors, rank=2)
    base = engine.pairwise_scores(data, queries, batch_size=2, group_modules=group_modules)
    scaled = copy.deepcopy(queries)
    for tensors in scaled.tensors.values():
        tensors["left"] = tensors["left"] * 1e6
        tensors["right"] = tensors["right"] * 1e-7
    got = engine.pairwise_scores(data, scaled, batch_size=2, group_modules=group_modules)
    assert torch.isfinite(got).all()
    assert _rel(got, 0.1 * base) < 1e-3


def test_factors_and_queries_of_other_weights_are_flagged():
    """Factors and queries record a fingerprint of the model they were made with; using them
    with other weights (another checkpoint of the same shapes) warns, naming both."""
    train, query = TokenDataset(4, seed=2), TokenDataset(2, seed=3)
    engine_a = pyinf.InfluenceEngine(tiny_gpt2(seed=1), pyinf.CausalLMTask(), progress=False)
    engine_b = pyinf.InfluenceEngine(tiny_gpt2(seed=5), pyinf.CausalLMTask(), progress=False)
    factors = engine_a.fit_factors(train, fisher="empirical", batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same model: no warning
        queries = engine_a.prepare_queries(query, factors, rank=2)
        engine_a.pairwise_scores(train, queries)
    assert factors.meta["model_fingerprint"] == queries.meta["model_fingerprint"]
    with pytest.warns(UserWarning, match="these factors were made with other weights than this model's"):
        engine_b.prepare_queries(query, factors, rank=2)
    with pytest.warns(UserWarning, match="these queries were made with other weights"):
        engine_b.pairwise_scores(train, queries)
    with pytest.warns(UserWarning, match="these factors were made with other weights"):
        engine_b.self_influence(train, factors)


def test_the_same_weights_in_another_dtype_are_not_flagged(tmp_path):
    """Factors fit with the float32 model and used with its bf16 (or fp16, float64) cast are
    the same weights: no warning, through a save and a load too. Another checkpoint in
    another dtype still warns (renamed or reshaped parameters: the next test)."""
    import copy

    train, query = TokenDataset(4, seed=2), TokenDataset(2, seed=3)
    model = tiny_gpt2(seed=1)
    factors = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(), progress=False).fit_factors(
        train, fisher="empirical", batch_size=2)
    factors.save(tmp_path / "f.safetensors")
    loaded = pyinf.Factors.load(tmp_path / "f.safetensors")
    assert loaded.meta["model_weights"] == factors.meta["model_weights"]
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        engine = pyinf.InfluenceEngine(copy.deepcopy(model).to(dtype), pyinf.CausalLMTask(), progress=False)
        assert engine.fingerprint() != factors.meta["model_fingerprint"]  # the exact one tells them apart
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            engine.prepare_queries(query, loaded, rank=2)
            engine.self_influence(train, loaded)
    other = pyinf.InfluenceEngine(tiny_gpt2(seed=5).to(torch.bfloat16), pyinf.CausalLMTask(), progress=False)
    with pytest.warns(UserWarning, match="these factors were made with other weights"):
        other.self_influence(train, loaded)
    # one parameter scaled by 1% in the bf16 copy: beyond bf16's rounding, so other weights
    nudged = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        nudged.transformer.h[1].mlp.c_fc.weight.mul_(1.01)
    with pytest.warns(UserWarning, match="these factors were made with other weights"):
        pyinf.InfluenceEngine(nudged, pyinf.CausalLMTask(), progress=False).self_influence(train, loaded)


def test_weights_records_compare_per_parameter():
    """pyinf.fingerprint.same_weights: names and shapes must match, and every parameter's
    sample must be equal at the coarser dtype of the two, exactly: a checkpoint that differs in
    one value is other weights, in the same dtype or (beyond the rounding) in another; a record
    missing from an old file is 'unknown' (None)."""
    import collections
    import copy

    from pyinf.fingerprint import same_weights, weights_identity

    a = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    ours = weights_identity(a).record
    assert same_weights(ours, ours) is True
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert same_weights(weights_identity(copy.deepcopy(a).to(dtype)).record, ours) is True, dtype
    b = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 4))  # a shape differs
    assert same_weights(weights_identity(b).record, ours) is False
    renamed = torch.nn.Sequential(collections.OrderedDict(first=copy.deepcopy(a[0]), second=copy.deepcopy(a[1])))
    assert same_weights(weights_identity(renamed).record, ours) is False  # the same values under other names
    c = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))  # same shapes, other values
    assert same_weights(weights_identity(c).record, ours) is False
    assert same_weights(None, ours) is None and same_weights({"layout": "x"}, ours) is None
    # one value changed, the last of a tensor, by far less than bf16's rounding: in float32
    # the same dtype, so other weights; against the bf16 copy, it rounds the same
    d = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    d.load_state_dict(a.state_dict())
    with torch.no_grad():
        d[1].bias[-1] += 1e-7 * max(1.0, float(d[1].bias[-1].abs()))
    assert same_weights(weights_identity(d).record, ours) is False
    assert same_weights(weights_identity(copy.deepcopy(d).to(torch.bfloat16)).record, ours) is True
    with torch.no_grad():
        d[1].bias[-1] += 1.0
    assert same_weights(weights_identity(d.to(torch.bfloat16)).record, ours) is False


def test_factors_of_more_layers_serve_a_subset():
    """EK-FAC's factors are per layer: factors fitted on every layer give a subset of them the
    same queries, scores and self-influence as factors fitted on that subset alone."""
    model = tiny_gpt2(seed=5)
    train, query = TokenDataset(5, seed=1), TokenDataset(2, seed=2, completion=2)
    every = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(), progress=False)
    mlp = [n for n in every.modules if ".mlp." in n]
    subset = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(tracked_modules=mlp), progress=False)
    all_factors = every.fit_factors(train, fisher="empirical", batch_size=5)
    own_factors = subset.fit_factors(train, fisher="empirical", batch_size=5)
    for factors_ in (all_factors, own_factors):
        queries = subset.prepare_queries(query, factors_, rank=2)
        assert queries.module_names == mlp
    assert all_factors.subset(mlp).module_names == mlp and all_factors.subset(mlp).id == all_factors.id
    moved = []  # only the tracked layers' factors go to the model's device
    original_to = pyinf.Factors.preconditioners_on
    with pytest.MonkeyPatch.context() as m:
        m.setattr(pyinf.Factors, "preconditioners_on",
                  lambda self, device, what: moved.append(len(self.modules)) or original_to(self, device, what=what))
        subset.prepare_queries(query, all_factors, rank=2)
        subset.self_influence(train, all_factors)
    assert moved == [len(mlp), len(mlp)]
    a, b = (subset.prepare_queries(query, f, rank=2) for f in (all_factors, own_factors))
    assert torch.allclose(subset.pairwise_scores(train, a), subset.pairwise_scores(train, b), rtol=1e-5, atol=1e-9)
    assert torch.allclose(subset.self_influence(train, all_factors), subset.self_influence(train, own_factors),
                          rtol=1e-5)
    with pytest.raises(ValueError, match="these factors do not match the model's tracked modules: missing"):
        every.prepare_queries(query, own_factors)  # a layer without factors is refused


def test_weights_edited_through_data_are_other_weights():
    """Edits through ``.data`` (a hand-written EMA, weights loaded by hand) move no version
    counter: the engine's cached fingerprint missed them, and a resumed corpus run joined
    chunks of two sets of weights. The fingerprint is read again at every call."""
    model = tiny_gpt2(seed=4)
    engine = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(), progress=False)
    before = engine.fingerprint()
    factors = engine.fit_factors(TokenDataset(4, seed=1), batch_size=2)
    for p in model.parameters():
        p.data.mul_(1.5)
    assert engine.fingerprint() != before
    with pytest.warns(UserWarning, match="these factors were made with other weights"):
        engine.prepare_queries(TokenDataset(2, seed=2, completion=2), factors, rank=2)


class _HalfMeasurement(pyinf.CausalLMTask):
    """Redefines the measurement only: half the summed cross-entropy."""

    def compute_measurement(self, batch, model):
        return 0.5 * super().compute_measurement(batch, model)


class _LastTokenMeasurement(pyinf.CausalLMTask):
    """-log p of each query's last token only, and its own per-example values (consistent)."""

    def compute_measurement_per_example(self, batch, model):
        losses = self._token_losses(batch, model, sample=False)
        last = batch["attention_mask"][:, 1:].sum(1) - 1  # right padding: the last real label
        return losses.gather(1, last[:, None]).squeeze(1)

    def compute_measurement(self, batch, model):
        return self.compute_measurement_per_example(batch, model).sum()


def test_a_per_example_measurement_from_a_mixin_is_kept():
    """The per-example method is kept when nothing before its class in the MRO redefines the
    measurement: from a mixin listed first, or from a class defining both."""
    from pyinf.queries import _consistent_per_example

    class PerExample:
        def compute_measurement_per_example(self, batch, model):
            return None

    class Both:
        def compute_measurement(self, batch, model):
            return None

        def compute_measurement_per_example(self, batch, model):
            return None

    class LossMixin:
        def compute_train_loss(self, batch, model, sample=False):
            return None

    assert _consistent_per_example(type("T1", (PerExample, _HalfMeasurement), {})()) is not None
    assert _consistent_per_example(type("T2", (Both, LossMixin), {})()) is not None
    assert _consistent_per_example(_HalfMeasurement()) is None  # the inherited one is CausalLMTask's
    assert _consistent_per_example(type("T3", (LossMixin, pyinf.CausalLMTask), {})()) is None


def test_a_redefined_measurement_is_the_one_differentiated():
    """A CausalLMTask subclass that redefines compute_measurement (but inherits
    compute_measurement_per_example, which measures the summed cross-entropy) gets its own
    measurement's gradient and values; a subclass that redefines both is taken at its word."""
    model = tiny_gpt2(seed=2, dtype=torch.float64)
    train, query = TokenDataset(5, seed=6), TokenDataset(3, seed=7)
    engine = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(), progress=False)
    factors = engine.fit_factors(train, fisher="empirical", batch_size=2)
    base = engine.prepare_queries(query, factors, rank=None, damping=1e-3, batch_size=3)
    base_scores = engine.pairwise_scores(train, base, batch_size=2)
    half = pyinf.InfluenceEngine(model, _HalfMeasurement(), progress=False)
    queries = half.prepare_queries(query, factors, rank=None, damping=1e-3, batch_size=3)
    assert torch.allclose(torch.as_tensor(queries.measurements), 0.5 * torch.as_tensor(base.measurements))
    assert _rel(half.pairwise_scores(train, queries, batch_size=2), 0.5 * base_scores) < 1e-10
    # the last token only: one query at a time equals the batch, and not the summed CE
    last = pyinf.InfluenceEngine(model, _LastTokenMeasurement(), progress=False)
    together = last.prepare_queries(query, factors, rank=None, damping=1e-3, batch_size=3)
    alone = last.prepare_queries(query, factors, rank=None, damping=1e-3, batch_size=1)
    assert _rel(last.pairwise_scores(train, together), last.pairwise_scores(train, alone)) < 1e-10
    assert _rel(last.pairwise_scores(train, together), base_scores) > 0.1


def test_left_padding_gives_the_scores_of_right_padding():
    """Left-padded batches (a GPT-2 has learned absolute positions): the same factors, query
    measurements and scores as right-padded ones, per token too. The first real token of a
    left-padded row is predicted by no real position: it carries no loss."""
    import functools

    model = tiny_gpt2(seed=3, dtype=torch.float64)
    train, query = TokenDataset(6, seed=4), TokenDataset(3, seed=5)  # fully labelled queries
    results, per_token = {}, {}
    for side in ("right", "left"):
        task = pyinf.CausalLMTask()
        task.collate_fn = functools.partial(pyinf.pad_collate, side=side)
        engine = pyinf.InfluenceEngine(model, task, progress=False)
        factors = engine.fit_factors(train, fisher="empirical", batch_size=3)
        queries = engine.prepare_queries(query, factors, rank=None, batch_size=3)
        results[side] = (factors, queries, engine.pairwise_scores(train, queries, batch_size=3))
        per_token[side] = engine.pairwise_scores(train, queries, batch_size=3, per_token=True, per_module=True)
    (f_r, q_r, s_r), (f_l, q_l, s_l) = results["right"], results["left"]
    # per token: position t is the document's t-th token on either side (batches of lengths
    # that differ, so left-padded rows start at different positions)
    for name in f_r.module_names:
        assert _rel(per_token["left"][name], per_token["right"][name]) < 1e-10, name
    for name in f_r.module_names:
        assert _rel(f_l[name].a_cov, f_r[name].a_cov) < 1e-12 and _rel(f_l[name].lambdas, f_r[name].lambdas) < 1e-10
    assert _rel(q_l.measurements, q_r.measurements) < 1e-12
    assert _rel(s_l, s_r) < 1e-10
    # a float64 model's loss stays float64 (it was computed from float32 logits)
    assert pyinf.CausalLMTask().compute_train_loss(pyinf.pad_collate([query[0]]), model).dtype == torch.float64


def test_positions_follow_a_models_own_numbering():
    """RoBERTa-family models number positions from padding_idx + 1: the positions pyinf passes
    (counting real tokens, for left padding) start there too, so a document's loss is the
    model's own, and left and right padding give the same scores."""
    import functools

    from transformers import RobertaConfig, RobertaForCausalLM

    torch.manual_seed(seeds.offset(7))
    cfg = RobertaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                        max_position_embeddings=40, is_decoder=True, pad_token_id=1, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = RobertaForCausalLM(cfg).double().eval()
    ids = torch.tensor([5, 17, 22, 8, 23, 31, 9])
    with torch.no_grad():
        own = model(input_ids=ids[None], labels=ids[None]).loss.item() * (len(ids) - 1)  # HF's mean, summed
    task = pyinf.CausalLMTask(pad_token_id=1)
    loss = task.compute_train_loss(task.collate_fn([{"input_ids": ids}]), model).item()
    assert loss == pytest.approx(own, rel=1e-6)  # (HF computes its loss in float32)
    train, query = TokenDataset(5, seed=8), TokenDataset(2, seed=9, completion=2)
    scores = {}
    for side in ("right", "left"):
        task = pyinf.CausalLMTask(pad_token_id=1)
        task.collate_fn = functools.partial(pyinf.pad_collate, pad_token_id=1, side=side)
        engine = pyinf.InfluenceEngine(model, task, progress=False)
        factors = engine.fit_factors(train, fisher="empirical", batch_size=3)
        scores[side] = engine.pairwise_scores(train, engine.prepare_queries(query, factors, rank=None), batch_size=3)
    assert _rel(scores["left"], scores["right"]) < 1e-6


def test_left_padding_for_a_model_that_takes_no_position_ids_is_warned_about():
    """A model whose forward takes its inputs through **kwargs cannot be given positions that
    count real tokens: a left-padded batch would place its rows' tokens after the padding."""
    import functools

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    task = pyinf.CausalLMTask()
    task.collate_fn = functools.partial(pyinf.pad_collate, side="left")
    engine = pyinf.InfluenceEngine(Wrapper(tiny_gpt2(seed=3)), task, progress=False)
    docs = [{"input_ids": torch.arange(1, n + 1)} for n in (5, 3, 7, 4)]  # rows of other lengths: padded
    with pytest.warns(UserWarning, match=r"Wrapper.forward names no position_ids, and this batch is left-padded"):
        engine.fit_factors(docs, batch_size=4)


def test_a_model_with_an_instance_forward_is_not_kept_alive():
    """accelerate's hooks set a forward on the instance that holds the model: pyinf's cache of
    which forwards take position_ids must not keep such a model (and its GPU memory) alive."""
    import functools
    import gc
    import weakref

    def load():
        model = tiny_gpt2(seed=1)
        plain = model.forward
        model.forward = functools.update_wrapper(functools.partial(lambda m, *a, **k: plain(*a, **k), model), plain)
        return model

    model = load()
    pyinf.CausalLMTask().compute_train_loss(pyinf.pad_collate([{"input_ids": torch.tensor([5, 6, 7])}]), model)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_a_loss_on_padding_is_warned_about():
    """pyinf leaves padded positions out of every gradient (a document's scores do not depend
    on its batch's padding); a task whose loss reaches them (labels on padding, the habit of
    `labels = input_ids` after padding) gets scores that are not those of its own gradients,
    and is told so, once; CausalLMTask's loss never reaches padding."""
    from pyinf import capture

    class LabelsOnPadding(pyinf.CausalLMTask):
        def _labels(self, batch):
            return batch["input_ids"][:, 1:]  # padding labelled too

    class Model(torch.nn.Module):  # a class of its own: the warning is once per model class
        def __init__(self):
            super().__init__()
            self.inner = tiny_gpt2(seed=3)

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    # lengths that pad every batch by more than one token (a row padded by one has no padded
    # position that predicts anything)
    g = torch.Generator().manual_seed(seeds.offset(4))
    train = [{"input_ids": torch.randint(1, 40, (n,), generator=g)} for n in (9, 3, 5, 8, 4, 9)]
    model = Model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pyinf.InfluenceEngine(model, pyinf.CausalLMTask(), progress=False).fit_factors(train, batch_size=3)
    engine = pyinf.InfluenceEngine(model, LabelsOnPadding(), progress=False)
    with pytest.warns(UserWarning, match=r"the loss reaches positions the attention mask marks as padding "
                                         r"\(module 'inner.transformer.h.1.mlp.c_proj': .*% of its output gradient's"):
        engine.fit_factors(train, batch_size=3)
    assert (Model, "padding") in capture._WARNED_ONCE
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        engine.fit_factors(train, batch_size=3)


def test_a_non_finite_per_token_score_moved_to_the_front_leaves_zeros():
    from pyinf.scoring import _from_first_token, _leading_padding

    lead = _leading_padding(torch.tensor([[0, 1, 1]]))
    moved = _from_first_token(torch.tensor([[[0.0], [2.0], [float("inf")]]]), lead)
    assert moved.flatten().tolist() == [2.0, float("inf"), 0.0]  # not Inf * 0 = NaN behind it
    assert _leading_padding(torch.tensor([[1, 1, 0]])) is None  # right padding: nothing to move


def test_yes_no_arguments_take_0_and_1_and_refuse_the_rest(gpt2_fp32):
    engine, factors, train, query = gpt2_fp32
    queries = engine.prepare_queries(query, factors, rank=2)
    assert torch.equal(engine.pairwise_scores(train, queries, per_token=1),
                       engine.pairwise_scores(train, queries, per_token=True))
    with pytest.raises(TypeError, match="pairwise_scores: 'per_module' must be True or False, got 'yes'"):
        engine.pairwise_scores(train, queries, per_module="yes")


def test_measurements_follow_the_query_loaders_order():
    """A task without per-example measurements gets them one query at a time, in the query
    loader's own order (its sampler), as the query gradients are."""
    model = TinyMLP().double()
    engine = pyinf.InfluenceEngine(model, MLPTask(), progress=False)
    train, query = RegressionDataset(8, seed=2, dtype=torch.float64), RegressionDataset(4, seed=3, dtype=torch.float64)
    factors = engine.fit_factors(train, fisher="empirical", batch_size=4)
    order = [3, 1, 0, 2]
    loader = torch.utils.data.DataLoader(query, batch_size=2, sampler=order)
    in_order = engine.prepare_queries(torch.utils.data.Subset(query, order), factors, rank=None)
    shuffled = engine.prepare_queries(loader, factors, rank=None)
    assert _rel(shuffled.measurements, in_order.measurements) < 1e-12
    assert _rel(engine.pairwise_scores(train, shuffled), engine.pairwise_scores(train, in_order)) < 1e-12
    # a shuffling loader draws its order once: each measurement is its own query's (the query's
    # self-influence, from the gradient pass, identifies it)
    shuffling = torch.utils.data.DataLoader(query, batch_size=2, shuffle=True)
    with pytest.warns(UserWarning, match="does not iterate in order"):
        drawn = engine.prepare_queries(shuffling, factors, rank=None)
    own = {round(s, 6): m for s, m in zip(in_order.self_influence.tolist(), in_order.measurements.tolist())}
    for s, m in zip(drawn.self_influence.tolist(), drawn.measurements.tolist()):
        assert own[round(s, 6)] == pytest.approx(m, rel=1e-9)


def _host_reads(fn) -> int:
    """How many times `fn` reads tensor values on the host from pyinf's own code in a pass
    (.cpu(), .item(), bool(t), ...: on a GPU each waits for the queued work to finish), not
    counting the per-pass weight fingerprint, nor reads of what .cpu() returned (on the CPU
    every tensor is a host tensor: those copies are marked)."""
    import sys

    names = ("cpu", "item", "tolist", "numpy", "__bool__", "__int__", "__float__")
    count = [0]
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def counted(orig):
        def call(self, *args, **kwargs):
            where = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if "/pyinf/" in where and not where.endswith("fingerprint.py") and not getattr(self, "_host_copy", False):
                count[0] += 1
            out = orig(self, *args, **kwargs)
            if orig is saved["cpu"]:
                out._host_copy = True
            return out
        return call

    for name, orig in saved.items():
        setattr(torch.Tensor, name, counted(orig))
    try:
        fn()
    finally:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, orig)
    return count[0]


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_one_host_read_per_batch_and_check_not_per_layer(fisher):
    """Per batch, each pass reads from the device once for its checks (the loss and every
    tracked layer's NaN/Inf flag together) and once for the batch's scores (all layers' too,
    with per_module): a read per layer or per check would stall a GPU every time. Counted
    as the growth from 2 to 4 batches, with 2 and then 8 tracked layers."""
    model = tiny_gpt2(seed=5)
    conv1d = [name for name, module in model.named_modules() if type(module).__name__ == "Conv1D"]
    growth = {}
    for layers in (conv1d[:2], conv1d):
        engine = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(tracked_modules=layers), backend="torch",
                                       progress=False)
        factors = engine.fit_factors(TokenDataset(4, seed=6), batch_size=2)
        queries = engine.prepare_queries(TokenDataset(2, seed=7, completion=2), factors, rank=4)
        for what, run in dict(
                fit=lambda data: engine.fit_factors(data, batch_size=2, fisher=fisher),
                scores=lambda data: engine.pairwise_scores(data, queries, per_module=True, batch_size=2),
                self_influence=lambda data: engine.self_influence(data, factors, batch_size=2)).items():
            reads = [_host_reads(lambda: run(TokenDataset(n, seed=8))) for n in (4, 8)]
            growth[what, len(layers)] = (reads[1] - reads[0]) / 2  # per added batch
    # fit: two passes (covariances, Lambda), one read each; scoring: checks and scores
    assert growth == {("fit", 2): 2, ("fit", 8): 2, ("scores", 2): 2, ("scores", 8): 2,
                      ("self_influence", 2): 2, ("self_influence", 8): 2}
