"""Running kronfluence 1.0.1 (the reference EK-FAC implementation) on the same model, task
and data as pyinf, for agreement tests and side-by-side benchmarks.

kronfluence is an optional dependency (the ``bench``/``dev`` extras). Its ``prepare_model``
wraps the model's layers in place, so it runs on a deep copy and the caller's model is
left alone.
"""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import nn


@dataclass
class KronfluenceRun:
    scores: torch.Tensor          # [n_train, n_query] float32, pyinf's orientation
    fit_seconds: float
    score_seconds: float


def as_kronfluence_task(task, tracked_modules: List[str]):
    """A kronfluence Task that delegates to a pyinf task (same method names) and tracks
    exactly `tracked_modules`."""
    from kronfluence.task import Task as KTask

    class _Delegate(KTask):
        def compute_train_loss(self, batch, model, sample=False):
            return task.compute_train_loss(batch, model, sample=sample)

        def compute_measurement(self, batch, model):
            return task.compute_measurement(batch, model)

        def get_influence_tracked_modules(self):
            return list(tracked_modules)

        def get_attention_mask(self, batch):
            return task.get_attention_mask(batch)

    return _Delegate()


def run_kronfluence(model: nn.Module, task, tracked_modules: List[str], train_data, query_data, *,
                    fisher: str = "empirical", rank: Optional[int] = 32, damping: Optional[float] = None,
                    batch_size: int = 8, query_batch_size: int = 8, dtype: torch.dtype = torch.float32,
                    collate_fn: Optional[Callable] = None, output_dir: Optional[str] = None,
                    synchronize: Callable[[], None] = lambda: None) -> KronfluenceRun:
    """Fits EK-FAC factors and computes pairwise scores with kronfluence. `dtype` selects its
    fp32 default or its bf16 preset (bf16 per-sample gradients and scores, fp32 factors).
    Full SVD is used for the query low-rank step so that it matches pyinf's exactly."""
    import time

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    ktask = as_kronfluence_task(task, tracked_modules)
    kmodel = prepare_model(copy.deepcopy(model), ktask)
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=(fisher == "empirical"))
    score_args = ScoreArguments(damping_factor=damping, query_gradient_low_rank=rank, use_full_svd=True)
    if dtype != torch.float32:
        factor_args.per_sample_gradient_dtype = dtype
        score_args.per_sample_gradient_dtype = dtype
        score_args.score_dtype = dtype
        score_args.precondition_dtype = dtype
    with tempfile.TemporaryDirectory(dir=output_dir) as out:
        analyzer = Analyzer("pyinf_compare", kmodel, ktask, cpu=next(model.parameters()).device.type == "cpu",
                            disable_tqdm=True, output_dir=out, log_level=40)
        if collate_fn is not None:
            analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate_fn))
        synchronize()
        t0 = time.perf_counter()
        analyzer.fit_all_factors("factors", train_data, per_device_batch_size=batch_size, factor_args=factor_args,
                                 overwrite_output_dir=True)
        synchronize()
        t1 = time.perf_counter()
        analyzer.compute_pairwise_scores("scores", "factors", query_data, train_data,
                                         per_device_query_batch_size=query_batch_size,
                                         per_device_train_batch_size=batch_size, score_args=score_args,
                                         overwrite_output_dir=True)
        synchronize()
        t2 = time.perf_counter()
        scores = analyzer.load_pairwise_scores("scores")["all_modules"]
    return KronfluenceRun(scores=scores.T.float().contiguous(), fit_seconds=t1 - t0, score_seconds=t2 - t1)
