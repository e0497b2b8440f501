"""InfluenceEngine(checkpoint=True): activation checkpointing of the repeated blocks gives
the same factors and scores as without (tracked layers recomputed in the backward are not
counted or captured twice), stores a fraction of the activations, combines with
compile=True, and leaves the model as it was."""

import pytest
import torch

import pyinf
from pyinf.checkpoint import CheckpointedBlocks

from .models import MLPTask, RegressionDataset, TinyMLP, TokenDataset, tiny_gpt2


def _run(engine, train, query, per_token=False):
    factors = engine.fit_factors(train, batch_size=4, fisher="empirical")
    queries = engine.prepare_queries(query, factors, rank=3)
    scores = engine.pairwise_scores(train, queries, batch_size=4, per_token=per_token)
    self_inf = engine.self_influence(train, factors, batch_size=4)
    return factors, scores, self_inf


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("custom_layer", [False, True])
def test_checkpointed_blocks_score_like_plain_ones(custom_layer):
    model = tiny_gpt2(seed=4, dtype=torch.float64)
    if custom_layer:  # a tracked layer captured through forward hooks, not the stock-Linear path
        from .models import MatmulLinear

        old = model.transformer.h[1].mlp.c_fc
        new = MatmulLinear(old.weight.shape[0], old.weight.shape[1]).double()
        with torch.no_grad():
            new.weight.copy_(old.weight.t())
            new.bias.copy_(old.bias)
        model.transformer.h[1].mlp.c_fc = new
    train, query = TokenDataset(8, seed=5), TokenDataset(3, seed=6, completion=2)
    plain = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(), progress=False)
    ckpt = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(), progress=False, checkpoint=True)
    assert "checkpoint=True" in repr(ckpt)
    f0, s0, i0 = _run(plain, train, query, per_token=True)
    f1, s1, i1 = _run(ckpt, train, query, per_token=True)
    for name in f0.module_names:
        assert _rel(f1[name].lambdas, f0[name].lambdas) < 1e-10, name
    assert _rel(s1, s0) < 1e-10 and _rel(i1, i0) < 1e-10
    assert all("forward" not in block.__dict__ for block in model.transformer.h)


def test_checkpointing_stores_a_fraction_of_the_activations():
    """Bytes of tensors kept for the backward during one forward: with checkpointing only the
    blocks' inputs (and what lies outside the blocks) remain."""
    model = tiny_gpt2(seed=1, vocab=40)
    engine = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(), progress=False)
    ids = torch.randint(0, 40, (4, 24))

    def saved_bytes(checkpointed):
        kept = []

        def pack(t):
            kept.append(t.numel() * t.element_size())
            return t

        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if checkpointed:
                with CheckpointedBlocks(model, engine.modules):
                    out = model(inputs_embeds=emb).logits
            else:
                out = model(inputs_embeds=emb).logits
        out.float().sum().backward()
        return sum(kept)

    plain, ckpt = saved_bytes(False), saved_bytes(True)
    assert ckpt < 0.5 * plain, (ckpt, plain)


def test_checkpoint_combines_with_compile():
    model = tiny_gpt2(seed=2)
    train, query = TokenDataset(8, seed=2), TokenDataset(3, seed=3, completion=2)
    _, ref, _ = _run(pyinf.InfluenceEngine(model, pyinf.CausalLMTask(), progress=False), train, query)
    both = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(), progress=False, compile=True, checkpoint=True)
    _, out, _ = _run(both, train, query)
    assert _rel(out, ref) < 1e-5
    assert all("forward" not in block.__dict__ for block in model.transformer.h)


def test_checkpoint_without_repeated_blocks_warns_and_runs():
    with pytest.warns(UserWarning, match="no list of repeated blocks"):
        engine = pyinf.InfluenceEngine(TinyMLP(), MLPTask(), progress=False, checkpoint=True)
        engine.fit_factors(RegressionDataset(6), batch_size=3)
