"""InfluenceEngine(compile=True): the model's repeated blocks under torch.compile give the
same scores as eager, later passes reuse the compiled code, and the model is left as it was."""

import pytest
import torch
from torch._dynamo.utils import counters

import pyinf
from pyinf.compile import find_blocks

from .models import MLPTask, RegressionDataset, TinyMLP, TokenDataset, tiny_gpt2


def test_compiled_blocks_score_like_eager_and_compile_once():
    model = tiny_gpt2(seed=1)
    train, query = TokenDataset(8, seed=2), TokenDataset(3, seed=3, completion=2)
    eager = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(), progress=False)
    compiled = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(), progress=False, compile=True)
    assert "compile=True" in repr(compiled)
    results = {}
    for name, engine in (("eager", eager), ("compiled", compiled)):
        factors = engine.fit_factors(train, batch_size=4, fisher="empirical")
        queries = engine.prepare_queries(query, factors, rank=3)
        results[name] = (factors, engine.pairwise_scores(train, queries, batch_size=4))
    layer = results["eager"][0].module_names[0]
    assert torch.allclose(results["compiled"][0][layer].lambdas, results["eager"][0][layer].lambdas, rtol=1e-4)
    ref = results["eager"][1]
    assert ((results["compiled"][1] - ref).norm() / ref.norm()).item() < 1e-5
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # something was compiled
    compiled.pairwise_scores(train, queries, batch_size=4)  # the same shapes again: no new graph
    assert counters["stats"]["unique_graphs"] == graphs
    # nothing is left installed on the model
    assert all("forward" not in block.__dict__ for block in model.transformer.h)
    assert all("forward" not in m.__dict__ for m in compiled.modules.values())


def test_the_recompile_limit_is_raised_only_while_blocks_are_compiled():
    """A block forward has more variants than dynamo's default limit of 8 once two engines (a
    bf16 run and its float32 reference) compile the same block class; past the limit dynamo
    would run the rest eagerly. The limit is raised inside the context and restored after."""
    from pyinf.compile import RECOMPILE_LIMIT, CompiledBlocks

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    before = getattr(config, name)
    model = tiny_gpt2(seed=1)
    engine = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(), progress=False)
    with CompiledBlocks(model, engine.modules):
        assert getattr(config, name) == max(before, RECOMPILE_LIMIT)
    assert getattr(config, name) == before


def test_blocks_are_the_repeated_layers_holding_tracked_modules():
    model = tiny_gpt2()
    engine = pyinf.InfluenceEngine(model, pyinf.CausalLMTask(), progress=False)
    assert find_blocks(model, engine.modules) == list(model.transformer.h)
    only_first = {n: m for n, m in engine.modules.items() if n.startswith("transformer.h.0.")}
    assert find_blocks(model, only_first) == list(model.transformer.h)  # the list that holds them
    mlp = TinyMLP()
    with pytest.warns(UserWarning, match="no list of repeated blocks"):
        engine = pyinf.InfluenceEngine(mlp, MLPTask(), progress=False, compile=True)
        engine.fit_factors(RegressionDataset(6), batch_size=3)


def test_blocks_are_the_outermost_list():
    """A block's own list of heads can be longer than the list of blocks: the blocks are
    still the outer list (the inner one would leave every block but the first alone)."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList(nn.Linear(4, 4) for _ in range(5))

    model = nn.Module()
    model.blocks = nn.ModuleList(Block() for _ in range(3))
    tracked = {f"blocks.{i}.heads.{j}": model.blocks[i].heads[j] for i in range(3) for j in range(5)}
    assert find_blocks(model, tracked) == list(model.blocks)


def test_compiled_forward_follows_a_replaced_class_forward(monkeypatch):
    """The compiled forward is cached per block class, and compiled again when the class's
    forward has been replaced since (a patched class ran its old code)."""
    from torch import nn

    from pyinf import compile as compile_mod

    compiled = []
    monkeypatch.setattr(compile_mod.torch, "compile", lambda fn: compiled.append(fn) or fn)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x)

    model = nn.Module()
    model.blocks = nn.ModuleList(Block() for _ in range(2))
    tracked = {"blocks.0.fc": model.blocks[0].fc, "blocks.1.fc": model.blocks[1].fc}
    x = torch.randn(3, 2)
    with compile_mod.CompiledBlocks(model, tracked):
        model.blocks[0](x)
    with compile_mod.CompiledBlocks(model, tracked):  # cached: not compiled again
        model.blocks[0](x)
    assert len(compiled) == 1
    Block.forward = lambda self, x: 2 * self.fc(x)
    with compile_mod.CompiledBlocks(model, tracked):
        assert torch.allclose(model.blocks[1](x), 2 * model.blocks[1].fc(x))
    assert len(compiled) == 2
