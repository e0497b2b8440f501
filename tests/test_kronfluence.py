"""Agreement with kronfluence 1.0.1 on a tiny MLP, a tiny CNN and a tiny transformer (empirical
Fisher, the same damping): relative error <= 1e-4."""
import pytest
import torch

import pyinf

from . import seeds
from .models import ImageDataset, MLPTask, RegressionDataset, TinyCNN, TinyMLP, TokenDataset

pytest.importorskip("kronfluence")
from pyinf.kronfluence_compat import kronfluence_arguments, run_kronfluence  # noqa: E402


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_neox(seed=0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seeds.offset(seed))
    cfg = GPTNeoXConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0)
    return GPTNeoXForCausalLM(cfg).eval()


def _plain_mlp():
    # kronfluence tracks only stock nn.Linear: no custom-forward subclass here.
    model = TinyMLP()
    model.head = torch.nn.Linear(4, 3)
    return model


def _conv2d_net():
    # kronfluence tracks nn.Conv2d (not Conv1d): padded, strided, dilated, with and without bias
    model = TinyCNN()
    model.c3 = torch.nn.Identity()
    model.head = torch.nn.Linear(4, 3)
    return model


@pytest.mark.parametrize("rank", [None, 2])
@pytest.mark.parametrize("which", ["mlp", "transformer", "cnn"])
def test_matches_kronfluence(which, rank, tmp_path):
    if which == "mlp":
        model, task = _plain_mlp(), MLPTask()
        train, query = RegressionDataset(24, seed=1), RegressionDataset(4, seed=2)
    elif which == "cnn":
        model, task = _conv2d_net(), MLPTask()
        train, query = ImageDataset(20, seed=1), ImageDataset(4, seed=2)
    else:
        model, task = tiny_neox(), pyinf.CausalLMTask()
        train, query = TokenDataset(12, seed=1, min_len=6), TokenDataset(3, seed=2, completion=3, min_len=6)
    engine = pyinf.InfluenceEngine(model, task, backend="torch", progress=False)
    damping = 1e-3
    factors = engine.fit_factors(train, fisher="empirical", batch_size=4)
    queries = engine.prepare_queries(query, factors, rank=rank, damping=damping, batch_size=4)
    ours = engine.pairwise_scores(train, queries, batch_size=4)
    fa, sa = kronfluence_arguments(fisher="empirical", rank=rank, damping=damping)
    theirs = run_kronfluence(model, task, list(engine.specs), train, query, factor_args=fa, score_args=sa,
                             batch_size=4, query_batch_size=4, collate_fn=getattr(task, "collate_fn", None),
                             output_dir=str(tmp_path)).scores
    assert theirs.shape == ours.shape
    assert _rel(ours, theirs) <= 1e-4


def test_kronfluence_arguments_refuse_an_unknown_fisher():
    with pytest.raises(ValueError, match="fisher must be 'true' or 'empirical', got 'emprical'"):
        kronfluence_arguments(fisher="emprical")


def test_a_pyinf_task_in_kronfluence_tracks_its_own_layers_by_default():
    from pyinf.kronfluence_compat import as_kronfluence_task

    assert as_kronfluence_task(pyinf.CausalLMTask(tracked_modules=["a", "b"])).get_influence_tracked_modules() == \
        ["a", "b"]
    assert as_kronfluence_task(pyinf.CausalLMTask()).get_influence_tracked_modules() is None  # kronfluence's default
    assert as_kronfluence_task(MLPTask(), ["fc1"]).get_influence_tracked_modules() == ["fc1"]


def test_a_model_kronfluence_prepared_is_named_as_such():
    """kronfluence's prepare_model replaces the tracked layers in place: a migrant who hands
    pyinf that model is told, by layer, what happened and what to do."""
    from kronfluence.analyzer import prepare_model

    class Named(MLPTask):
        def get_influence_tracked_modules(self):
            return ["fc1"]

    from pyinf.kronfluence_compat import as_kronfluence_task

    model = prepare_model(TinyMLP(), as_kronfluence_task(Named()))
    with pytest.raises(ValueError, match=r"tracked module 'fc1' is a TrackedLinear \(kronfluence's wrapper: its "
                                         r"prepare_model replaced the layer; .* 'fc1.original_module'\)"):
        pyinf.InfluenceEngine(model, Named(), progress=False)


def test_layers_called_several_times_fit_kronfluences_shared_parameter_factors(tmp_path):
    """A layer called several times per forward: pyinf's factors are kronfluence's with
    has_shared_parameters=True (covariances over every call's tokens, Lambda of the summed
    gradients). Its pairwise scores are not compared: kronfluence 1.0.1's pairwise-score hook
    removes the hooks of a layer's other calls after the first backward (module/tracker/
    pairwise_score.py, clear_all_cache), so it keeps one call's term (49% off the exact
    EK-FAC scores of the same factors; pyinf's agree with them, test_pipeline.py)."""
    import copy
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model

    from pyinf.kronfluence_compat import as_kronfluence_task

    from .models import SharedLayers

    torch.manual_seed(seeds.offset(5))
    model, task = SharedLayers().double(), MLPTask()
    train = RegressionDataset(12, seed=1, dtype=torch.float64)
    engine = pyinf.InfluenceEngine(model, task, backend="torch", progress=False)
    factors = engine.fit_factors(train, fisher="empirical", batch_size=4)
    fa, _ = kronfluence_arguments(fisher="empirical")
    fa.has_shared_parameters = True
    for name in ("activation_covariance_dtype", "gradient_covariance_dtype", "lambda_dtype"):
        setattr(fa, name, torch.float64)
    ktask = as_kronfluence_task(task, list(engine.specs))
    analyzer = Analyzer("shared", prepare_model(copy.deepcopy(model), ktask), ktask, cpu=True, disable_tqdm=True,
                        output_dir=str(tmp_path), log_level=logging.WARNING)
    analyzer.fit_all_factors("factors", train, per_device_batch_size=4, factor_args=fa, overwrite_output_dir=True)
    theirs = {**analyzer.load_all_factors("factors"), **analyzer.load_covariance_matrices("factors")}
    for name, f in factors.modules.items():
        for ours, total, count in ((f.a_cov, "activation_covariance", "num_activation_covariance_processed"),
                                   (f.s_cov, "gradient_covariance", "num_gradient_covariance_processed"),
                                   (f.lambdas, "lambda_matrix", "num_lambda_processed")):
            assert _rel(ours, theirs[total][name].double() / theirs[count][name]) < 1e-6, (name, total)
