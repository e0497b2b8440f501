"""The fused linear cross-entropy against plain autograd, and CausalLMTask's fused head
against its default path on a Hugging Face model."""
import pytest
import torch
import torch.nn.functional as F

import pyinf
from pyinf import fused_ce

from .models import TokenDataset, tiny_gpt2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_loss_and_hidden_gradient_match_autograd(dtype, monkeypatch):
    monkeypatch.setattr(fused_ce, "_CHUNK_ELEMENTS", 3 * 37)  # several chunks, a ragged last one
    n, d, v = 23, 8, 37
    hidden = torch.randn(n, d, dtype=torch.float64)
    weight, bias = torch.randn(v, d, dtype=torch.float64), torch.randn(v, dtype=torch.float64)
    labels = torch.randint(0, v, (n,))
    labels[::4] = -100
    h = hidden.to(dtype).requires_grad_()
    loss = fused_ce.linear_cross_entropy(h, weight.to(dtype), labels, bias.to(dtype))
    loss.backward(torch.tensor(2.0))
    ref_h = hidden.to(dtype).double().requires_grad_()
    ref = F.cross_entropy(ref_h @ weight.to(dtype).double().T + bias.to(dtype).double(), labels,
                          ignore_index=-100, reduction="sum")
    (2 * ref).backward()
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert abs(loss.item() - ref.item()) / ref.item() < tol
    assert ((h.grad.double() - ref_h.grad).norm() / ref_h.grad.norm()).item() < tol
    assert h.grad[::4].abs().max() == 0  # unlabelled rows get no gradient


def test_fused_head_scores_match_default_path():
    model = tiny_gpt2(seed=2)
    train, query = TokenDataset(8, seed=3), TokenDataset(3, seed=4, completion=2)
    results = []
    for fused in (False, True):
        engine = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(fused_head=fused), progress=False)
        factors = engine.fit_factors(train, fisher="empirical", batch_size=4)
        queries = engine.prepare_queries(query, factors, rank=4)
        results.append(engine.pairwise_scores(train, queries, batch_size=4))
    assert ((results[0] - results[1]).norm() / results[0].norm()).item() < 1e-4


def test_fused_head_true_fisher_is_seeded():
    model = tiny_gpt2(seed=2)
    engine = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(fused_head=True), progress=False)
    a = engine.fit_factors(TokenDataset(5), fisher="true", seed=1)
    b = engine.fit_factors(TokenDataset(5), fisher="true", seed=1)
    name = a.module_names[0]
    assert torch.equal(a[name].s_cov, b[name].s_cov)


def test_fused_head_refuses_plain_modules():
    from .models import TinyMLP

    with pytest.raises(TypeError, match="fused_head=True"):
        pyinf.CausalLMTask(fused_head=True).compute_train_loss(
            {"input_ids": torch.ones(1, 3, dtype=torch.long)}, TinyMLP())


def test_fused_head_cannot_be_tracked():
    """The fused head takes the output embedding's weight directly, never its forward: a
    tracked output embedding is refused when the engine is made, not after a pass."""
    task = pyinf.CausalLMTask(tracked_modules=["transformer.h.0.mlp.c_fc", "lm_head"], fused_head=True)
    with pytest.raises(ValueError, match="'lm_head''s weight directly, so it cannot be tracked"):
        pyinf.InfluenceEngine(tiny_gpt2(seed=1), task, progress=False)


def test_per_row_losses_and_their_gradient_match_autograd(monkeypatch):
    monkeypatch.setattr(fused_ce, "_CHUNK_ELEMENTS", 2 * 29)
    n, d, v = 17, 6, 29
    hidden = torch.randn(n, d, dtype=torch.float64)
    weight = torch.randn(v, d, dtype=torch.float64)
    labels = torch.randint(0, v, (n,))
    labels[1::3] = -100
    weights = torch.randn(n, dtype=torch.float64)  # a different upstream gradient per row
    h = hidden.clone().requires_grad_()
    rows = fused_ce.linear_cross_entropy(h, weight, labels, reduction="none")
    (rows * weights).sum().backward()
    ref_h = hidden.clone().requires_grad_()
    ref = F.cross_entropy(ref_h @ weight.T, labels, ignore_index=-100, reduction="none")
    (ref * weights).sum().backward()
    assert rows.shape == (n,) and torch.allclose(rows, ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(h.grad, ref_h.grad, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'none'"):
        fused_ce.linear_cross_entropy(hidden, weight, labels, reduction="mean")


def test_fused_head_per_example_measurements_match_default_path():
    model = tiny_gpt2(seed=3)
    batch = pyinf.pad_collate([TokenDataset(3, seed=5, completion=2)[i] for i in range(3)])
    with torch.no_grad():
        plain = pyinf.CausalLMTask().compute_measurement_per_example(batch, model)
        fused = pyinf.CausalLMTask(fused_head=True).compute_measurement_per_example(batch, model)
        total = pyinf.CausalLMTask().compute_measurement(batch, model)
    assert plain.shape == (3,) and torch.allclose(plain, fused, rtol=1e-5)
    assert torch.allclose(plain.sum(), total, rtol=1e-6)


def test_batch_of_input_ids_only_scores_every_next_token():
    model = tiny_gpt2(seed=1)
    ids = torch.randint(0, 40, (2, 5))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
        ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        for fused in (False, True):
            loss = pyinf.CausalLMTask(fused_head=fused).compute_train_loss({"input_ids": ids}, model)
            assert torch.allclose(loss, ref, rtol=1e-5)


@pytest.mark.parametrize("sample", [False, True])
def test_fused_kernel_backend_matches_torch_backend(sample, monkeypatch):
    """The Triton softmax step (interpreted on CPU) inside the fused loss and its gradient."""
    monkeypatch.setattr(fused_ce, "_CHUNK_ELEMENTS", 4 * 41)
    n, d, v = 13, 8, 41
    hidden = torch.randn(n, d).bfloat16()
    weight, bias = torch.randn(v, d).bfloat16(), torch.randn(v).bfloat16()
    labels = torch.randint(0, v, (n,))
    labels[::3] = -100
    out = {}
    for backend in ("torch", "triton"):
        h = hidden.clone().requires_grad_()
        loss = fused_ce.linear_cross_entropy(h, weight, labels, bias, sample=sample, backend=backend)
        loss.backward()
        out[backend] = (loss.detach(), h.grad)
    if sample:  # different random streams: same shapes, finite, unlabelled rows untouched
        assert torch.isfinite(out["triton"][0]) and out["triton"][1][::3].abs().max() == 0
        return
    assert torch.allclose(out["triton"][0], out["torch"][0], rtol=1e-5)
    assert ((out["triton"][1].float() - out["torch"][1].float()).norm() / out["torch"][1].float().norm()) < 1e-2


_PEAKED = torch.tensor([2.0, 0.0, -1.0, 1.0, -2.0])  # softmax ~ [.63, .09, .03, .23, .01]


def _assert_drawn_from_softmax(losses: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Each loss is lse(z) - z[y] for the drawn y: the draws' frequencies must be the softmax
    (within 4.5 standard errors, plus 1e-3), not the given labels' nor a uniform draw's.
    Returns the draws. The inputs are this run's (tests/seeds.py: PYINF_TEST_SEED replays them)."""
    p = torch.softmax(z.double(), 0)
    lse = torch.logsumexp(z.double(), 0)
    y = ((lse - losses.double())[:, None] - z.double()[None, :]).abs().argmin(1)
    assert ((lse - losses.double()) - z.double()[y]).abs().max() < 1e-3  # each loss is one of V values
    freq = torch.bincount(y, minlength=z.numel()).double() / y.numel()
    se = (p * (1 - p) / y.numel()).sqrt()
    assert ((freq - p).abs() <= 4.5 * se + 1e-3).all(), (freq, p)
    return y


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_true_fisher_draws_from_the_softmax(backend):
    """sample=True in the fused loss: each row's label is drawn from its softmax (the given
    labels, all the least likely token, are ignored), and the hidden gradient is the drawn
    label's: (p - onehot(y)) W per row, which averages to zero over draws."""
    rows, v = 800, _PEAKED.numel()  # the interpreter runs one program per row
    weight = torch.zeros(v, v)
    weight[:, 0] = _PEAKED  # logits of hidden e_0 = the peaked vector
    hidden = torch.zeros(rows, v)
    hidden[:, 0] = 1.0
    hidden.requires_grad_()
    labels = torch.full((rows,), 4, dtype=torch.int64)
    losses = fused_ce.linear_cross_entropy(hidden, weight, labels, sample=True, reduction="none", backend=backend)
    y = _assert_drawn_from_softmax(losses.detach(), _PEAKED)
    losses.sum().backward()
    p = torch.softmax(_PEAKED.double(), 0)
    want = (p[None, :] - torch.nn.functional.one_hot(y, v).double()) @ weight.double()
    assert torch.allclose(hidden.grad.double(), want, atol=1e-5)
    spread = ((p * _PEAKED.double() ** 2).sum() - (p * _PEAKED.double()).sum() ** 2).sqrt()
    assert hidden.grad[:, 0].double().mean().abs() < 4.5 * spread / rows ** 0.5


def test_true_fisher_labels_of_the_default_path_are_drawn_from_the_softmax():
    """CausalLMTask(sample=True) without the fused head: the same, through torch.multinomial."""

    class Peaked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.z = torch.nn.Parameter(_PEAKED.clone())

        def forward(self, input_ids, attention_mask=None):
            return self.z.expand(*input_ids.shape, -1)

    ids = torch.full((40, 21), 4, dtype=torch.int64)  # labels: all the least likely token
    losses = pyinf.CausalLMTask()._token_losses({"input_ids": ids}, Peaked(), sample=True)
    _assert_drawn_from_softmax(losses.detach().reshape(-1), _PEAKED)


def test_the_fused_head_follows_the_engines_backend(monkeypatch):
    """InfluenceEngine(backend="torch") runs the fused head's softmax step on PyTorch too (it
    took 'auto', Triton on a GPU); outside an engine's passes the head's default is 'auto'."""
    from pyinf import ops

    seen = []
    real = ops.cross_entropy_rows
    monkeypatch.setattr(ops, "cross_entropy_rows",
                        lambda *args, backend, **kwargs: seen.append(backend) or real(*args, backend="torch", **kwargs))
    model = tiny_gpt2(seed=2)
    engine = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(fused_head=True), backend="torch", progress=False)
    engine.fit_factors(TokenDataset(2, seed=1), batch_size=2)
    assert seen and set(seen) == {"torch"}
    seen.clear()
    from pyinf.ops import _registry

    if _registry.unsupported_reason("native", "covariance", [torch.zeros(1)]) is None:
        # native has no cross_entropy_rows: its engine's head takes auto's choice
        pyinf.InfluenceEngine(model, pyinf.CausalLMTask(fused_head=True), backend="native",
                              progress=False).fit_factors(TokenDataset(2, seed=1), batch_size=2)
        assert seen and set(seen) == {"auto"}
        seen.clear()
    hidden, weight = torch.randn(3, 4), torch.randn(5, 4)
    fused_ce.linear_cross_entropy(hidden, weight, torch.tensor([1, -100, 2]))
    assert seen == ["auto"]


def test_an_unbuilt_backend_fails_only_where_the_head_needs_it(monkeypatch):
    """The pass's backend is resolved where the fused head runs: a stage that runs no op of
    an explicit backend that is not there (query preparation of a model without a fused
    head) works, and the head that needs it names it."""
    from pyinf import ops
    from pyinf.ops import _registry

    from .models import MLPTask, RegressionDataset, TinyMLP

    engine = pyinf.InfluenceEngine(TinyMLP(), MLPTask(), backend="torch", progress=False)
    data = RegressionDataset(4)
    factors = engine.fit_factors(data, batch_size=2)
    real_load = _registry.load

    def load(name):
        if name == "native":
            raise ops.BackendUnavailable("pyinf backend 'native' is not available: test")
        return real_load(name)

    monkeypatch.setattr(_registry, "load", load)
    native = pyinf.InfluenceEngine(engine.model, MLPTask(), backend="native", progress=False)
    native.prepare_queries(data, factors, rank=1)
    with fused_ce.backend_of_pass("native"), pytest.raises(ops.BackendUnavailable, match="'native' is not"):
        fused_ce.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([1, 2, 3]))


def test_fused_head_refuses_what_lies_between_the_base_model_and_its_output_embedding():
    """The fused head scores the loss of the output embedding applied to the base model's last
    hidden state. A model that transforms the hidden state before its output embedding (BERT's
    LM head) or its logits after it (a multiplier no config attribute names) is refused at its
    first batch, naming the side, not scored on another loss."""
    from transformers import BertConfig, BertLMHeadModel

    cfg = BertConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                     max_position_embeddings=32, is_decoder=True, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    bert = BertLMHeadModel(cfg).eval()
    task = pyinf.CausalLMTask(fused_head=True, tracked_modules=["bert.encoder.layer.0.output.dense"])
    with pytest.raises(ValueError, match=r"output embedding 'cls.predictions.decoder', but BertLMHeadModel does more "
                                         r"before it: .*use fused_head=False"):
        pyinf.InfluenceEngine(bert, task, progress=False).fit_factors(TokenDataset(3), batch_size=2)

    gpt2 = tiny_gpt2(seed=1)
    plain = gpt2.forward

    def scaled(*args, **kwargs):  # logits * 3 after the output embedding
        out = plain(*args, **kwargs)
        out.logits = out.logits * 3
        return out

    gpt2.forward = scaled
    with pytest.raises(ValueError, match=r"'lm_head', but GPT2LMHeadModel does more after it: the model's logits are "
                                         r"not its output"):
        pyinf.InfluenceEngine(gpt2, pyinf.CausalLMTask(fused_head=True), progress=False).fit_factors(
            TokenDataset(3), batch_size=2)
    del gpt2.forward  # the model's own forward again: checked once, and scored
    engine = pyinf.InfluenceEngine(gpt2, pyinf.CausalLMTask(fused_head=True), progress=False)
    engine.fit_factors(TokenDataset(3), batch_size=2)
