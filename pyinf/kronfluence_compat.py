"""Running kronfluence 1.0.1 (the reference EK-FAC implementation) on the same model, task
and data as pyinf, for agreement tests and side-by-side benchmarks.

kronfluence is an optional dependency (the ``bench``/``dev`` extras). Its ``prepare_model``
wraps the model's layers in place, so it runs on a deep copy and the caller's model is
left alone.
"""
from __future__ import annotations

import copy
import logging
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import nn


@dataclass
class KronfluenceRun:
    scores: torch.Tensor          # [n_train, n_query] float32 on the CPU, pyinf's orientation
    fit_seconds: float
    score_seconds: float
    fit_peak_bytes: Optional[int] = None
    score_peak_bytes: Optional[int] = None


class _Timer:
    """Wall-clock seconds of a block (the benchmarks pass one that also syncs the device
    and records peak memory)."""

    peak_bytes = None

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        return False


def as_kronfluence_task(task, tracked_modules: Optional[List[str]] = None):
    """A kronfluence Task that delegates to a pyinf task (same method names) and tracks
    `tracked_modules`; None: those the pyinf task names (``get_influence_tracked_modules``),
    and where it names none, kronfluence's default (every Linear and Conv2d, the output
    embedding included, unlike pyinf's default: pass ``list(engine.specs)`` for pyinf's)."""
    from kronfluence.task import Task as KTask

    if tracked_modules is None:
        tracked_modules = task.get_influence_tracked_modules()
    tracked = None if tracked_modules is None else list(tracked_modules)

    class _Delegate(KTask):
        def compute_train_loss(self, batch, model, sample=False):
            return task.compute_train_loss(batch, model, sample=sample)

        def compute_measurement(self, batch, model):
            return task.compute_measurement(batch, model)

        def get_influence_tracked_modules(self):
            return None if tracked is None else list(tracked)

        def get_attention_mask(self, batch):
            return task.get_attention_mask(batch)

    return _Delegate()


def kronfluence_arguments(*, fisher: str = "empirical", rank: Optional[int] = 32, damping: Optional[float] = None,
                          precision: str = "fp32", full_svd: bool = True, query_accumulation_steps: int = 1):
    """``(FactorArguments, ScoreArguments)``: EK-FAC, every example used, rank-r queries.
    ``precision="fp32"`` is kronfluence's default; ``"bf16"`` its "smart low precision"
    recipe (bf16 AMP, covariances and per-sample gradients, fp32 Lambda and preconditioning,
    bf16 scores). ``full_svd=True`` makes its query truncation exact, as pyinf's is; without
    it kronfluence truncates with ``torch.svd_lowrank(q=rank)``, which does not oversample and
    is off by 10-50% (relative) on small layers, so its scores then differ from pyinf's by
    more than the two implementations do."""
    from kronfluence.arguments import FactorArguments, ScoreArguments

    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if fisher not in ("true", "empirical"):  # a typo would otherwise be the true Fisher
        raise ValueError(f"fisher must be 'true' or 'empirical', got {fisher!r}")
    fa = FactorArguments(strategy="ekfac", use_empirical_fisher=(fisher == "empirical"),
                         covariance_max_examples=None, lambda_max_examples=None)
    sa = ScoreArguments(damping_factor=damping, query_gradient_low_rank=rank, use_full_svd=full_svd,
                        query_gradient_accumulation_steps=query_accumulation_steps)
    if precision == "bf16":
        bf16 = torch.bfloat16
        fa.amp_dtype = fa.activation_covariance_dtype = fa.gradient_covariance_dtype = bf16
        fa.per_sample_gradient_dtype = bf16
        fa.lambda_dtype = torch.float32
        sa.amp_dtype = sa.per_sample_gradient_dtype = sa.score_dtype = bf16
        sa.precondition_dtype = sa.query_gradient_svd_dtype = torch.float32
    return fa, sa


def run_kronfluence(model: nn.Module, task, tracked_modules: List[str], train_data, query_data, *,
                    factor_args=None, score_args=None, batch_size: int = 8, query_batch_size: int = 8,
                    collate_fn: Optional[Callable] = None, output_dir: Optional[str] = None,
                    timer: Callable[[], object] = _Timer, copy_model: bool = True) -> KronfluenceRun:
    """Fits EK-FAC factors and computes pairwise scores with kronfluence (arguments from
    :func:`kronfluence_arguments` unless given), timing each phase with `timer()`.
    kronfluence wraps the model's modules in place: it gets a copy, unless ``copy_model=False``
    (a caller whose model is already a private copy: the timed peak memory then holds one
    model, as pyinf's does)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.utils.dataset import DataLoaderKwargs

    if factor_args is None or score_args is None:
        fa, sa = kronfluence_arguments()
        factor_args, score_args = factor_args or fa, score_args or sa
    ktask = as_kronfluence_task(task, tracked_modules)
    kmodel = prepare_model(copy.deepcopy(model) if copy_model else model, ktask)
    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory(prefix="pyinf-kronfluence-", dir=output_dir) as out:
        analyzer = Analyzer("pyinf_compare", kmodel, ktask, cpu=device.type == "cpu", disable_tqdm=True,
                            output_dir=out, log_level=logging.WARNING)
        if collate_fn is not None:
            analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate_fn))
        with timer() as fit:
            analyzer.fit_all_factors("factors", train_data, per_device_batch_size=batch_size,
                                     factor_args=factor_args, overwrite_output_dir=True)
        with timer() as score:
            analyzer.compute_pairwise_scores("scores", "factors", query_data, train_data,
                                             per_device_query_batch_size=query_batch_size,
                                             per_device_train_batch_size=batch_size, score_args=score_args,
                                             overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores("scores")["all_modules"]  # [n_query, n_train]
    return KronfluenceRun(scores=scores.T.float().contiguous().cpu(), fit_seconds=fit.seconds,
                          score_seconds=score.seconds, fit_peak_bytes=fit.peak_bytes,
                          score_peak_bytes=score.peak_bytes)
