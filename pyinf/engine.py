"""InfluenceEngine: the public entry point that ties a model and a task to the pipeline
stages (factors, queries, scores)."""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from . import factors as factors_mod
from . import queries as queries_mod
from . import scoring
from .checkpoint import CheckpointedBlocks
from .compile import CompiledBlocks
from .fingerprint import WeightsIdentity, same_weights, weights_identity
from .fused_ce import backend_of_pass
from .data import make_loader
from .factors import Factors
from .modules import ModuleSpec, find_tracked_modules, spec_of
from .ops._checks import check_flag, check_instance
from .ops import BACKENDS
from .queries import Queries
from .task import Task


class InfluenceEngine:
    """EK-FAC influence of training documents on queries.

    ``score[n, q] = grad(measurement_q)^T (G + lambda I)^-1 grad(loss_n)``, summed over the
    tracked layers, unnormalised and without a sign flip (kronfluence's convention).

    Args:
        model: any ``nn.Module``; its ``nn.Linear`` (and subclasses), Hugging Face
            ``Conv1D``, and ``nn.Conv1d`` / ``nn.Conv2d`` layers with ``groups=1`` can be tracked. It is not converted: pyinf installs and removes
            its hooks around each pass.
        task: a :class:`pyinf.Task` (kronfluence's method names).
        backend: ``"auto"`` (fused kernels on CUDA, PyTorch elsewhere), ``"torch"``,
            ``"triton"`` or ``"native"``, for every op of the passes, the fused LM head's
            softmax step included; an op the backend lacks (native: ``dense_scores``, the
            full-rank route, and ``cross_entropy_rows``) runs on auto's choice.
        progress: tqdm bars on passes over data; None means on only when stderr is a TTY.
        compile: run the model's repeated blocks under ``torch.compile`` during the passes
            (see :mod:`pyinf.compile`): fuses the work between tracked layers, at the cost
            of compiling on first use. Off by default.
        checkpoint: activation checkpointing of the same blocks during the passes (see
            :mod:`pyinf.checkpoint`): the activations saved for the backward drop from all
            blocks' to one block's, for one more forward of the blocks; for batches that
            would not fit otherwise. Off by default.
    """

    def __init__(self, model: nn.Module, task: Task, *, backend: str = "auto", progress: Optional[bool] = None,
                 compile: bool = False, checkpoint: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {', '.join(BACKENDS)}")
        if next(model.parameters(), None) is None:
            raise ValueError(f"{type(model).__name__} has no parameters")
        if isinstance(task, type):
            raise TypeError(f"task must be an instance, got the class {task.__name__}: pass {task.__name__}()")
        if not callable(getattr(task, "compute_train_loss", None)):
            raise TypeError(f"task must be a pyinf.Task (or a kronfluence Task), got {type(task).__name__}")
        if getattr(task, "enable_post_process_per_sample_gradient", False):
            # a kronfluence Task's hook on per-sample gradients: pyinf never forms them, and a
            # task whose scores depend on it would be scored without it
            raise ValueError(f"{type(task).__name__} sets enable_post_process_per_sample_gradient (kronfluence): "
                             f"pyinf never forms per-sample gradients, so post_process_per_sample_gradient "
                             f"cannot be applied; express it in the loss or the model instead")
        self.model = model
        self.task = task
        self.backend = backend
        self.progress = progress
        self.compile = bool(compile)
        self.checkpoint = bool(checkpoint)
        self.modules: Dict[str, nn.Module] = find_tracked_modules(model, task.get_influence_tracked_modules())
        _check_fused_head_untracked(model, task, self.modules)
        self.specs: Dict[str, ModuleSpec] = {n: spec_of(n, m) for n, m in self.modules.items()}

    def __repr__(self) -> str:
        return (f"InfluenceEngine({type(self.model).__name__}, {len(self.modules)} tracked modules, "
                f"backend={self.backend!r}{', compile=True' if self.compile else ''}"
                f"{', checkpoint=True' if self.checkpoint else ''})")

    def _loader(self, data, batch_size, what, max_examples=None):
        on_gpu = next(self.model.parameters()).device.type == "cuda"
        return make_loader(data, batch_size=batch_size, collate_fn=getattr(self.task, "collate_fn", None),
                           max_examples=max_examples, what=what, pin_memory=on_gpu)

    def _common(self):
        return dict(model=self.model, task=self.task, modules=self.modules, specs=self.specs)

    def _stage_context(self):
        """The stage's context: the engine's backend for the fused LM head's softmax step too,
        the model's blocks compiled when ``compile=True``, and checkpointed (around the
        compiled forward) when ``checkpoint=True``."""
        stack = contextlib.ExitStack()
        stack.enter_context(backend_of_pass(self.backend))
        if self.compile:
            stack.enter_context(CompiledBlocks(self.model, self.modules))
        if self.checkpoint:
            stack.enter_context(CheckpointedBlocks(self.model, self.modules))
        return stack

    def identity(self) -> WeightsIdentity:
        """:func:`pyinf.fingerprint.weights_identity` of the model, read again at every call (a
        few milliseconds per hundred parameters): weights edited through ``.data`` move no
        version counter, so a cache keyed on them let a resumed run mix two sets of weights."""
        return weights_identity(self.model)

    def fingerprint(self) -> str:
        """The model's exact fingerprint (names, shapes, dtypes, sampled values): what a
        resumable run checks before it continues."""
        return self.identity().fingerprint

    def _check_weights(self, meta: Dict, what: str) -> None:
        """Warns when `meta` (of factors or queries) records other weights than this model's.
        The same weights in another dtype (factors fit in float32, scores in bf16) pass."""
        if not self.same_weights_as(meta):
            warnings.warn(_weights_warning(what, meta["model_fingerprint"], self.fingerprint()), stacklevel=3)

    def same_weights_as(self, meta: Dict) -> bool:
        """Whether `meta` (of factors or queries) was made with this model's weights, in any
        dtype; True when it records no weights (made by hand, or by another tool)."""
        ours = self.identity()
        theirs = meta.get("model_fingerprint")
        if theirs is None or theirs == ours.fingerprint:
            return True
        same = same_weights(meta.get("model_weights"), ours.record)
        return bool(same)  # files without a record: only the exact fingerprint can tell

    def _stamp(self, meta: Dict) -> None:
        identity = self.identity()
        meta["model_fingerprint"] = identity.fingerprint
        meta["model_weights"] = identity.record

    def fit_factors(self, data: Any, *, fisher: str = "true", batch_size: int = 8,
                    max_examples: Optional[int] = None, seed: int = 0,
                    eigh_workers: Optional[int] = None) -> Factors:
        """Covariances A and S over non-padding tokens, their float64 eigenbases, and the
        eigenvalue correction Lambda over documents. ``fisher="true"`` samples labels from the
        model (``compute_train_loss(sample=True)``); ``"empirical"`` uses the data's labels.
        ``eigh_workers``: how many eigendecompositions run at once, each on its own CUDA
        stream on a GPU (default ``$PYINF_EIGH_WORKERS``, else on a GPU the measured count in
        ``pyinf/ops/_preferences.py``, else 1; see :mod:`pyinf.eigen`)."""
        loader = self._loader(data, batch_size, "factor data", max_examples)
        with self._stage_context():
            factors = factors_mod.fit_factors(**self._common(), loader=loader, fisher=fisher, backend=self.backend,
                                              seed=seed, progress=self.progress, eigh_workers=eigh_workers)
        self._stamp(factors.meta)
        return factors

    def prepare_queries(self, query_data: Any, factors: Factors, *, rank: Optional[int] = 32,
                        damping: Optional[float] = None, batch_size: int = 8, svd: str = "full") -> Queries:
        """``P_q = H^-1 grad(measurement_q)`` per tracked layer, truncated to ``rank`` by SVD
        (``rank=None`` keeps it full). ``damping=None`` means 0.1 x mean(Lambda) per module.
        ``svd="randomized"`` truncates with a randomized SVD: far cheaper for wide layers on
        a GPU, near-exact when the spectrum decays (see :func:`pyinf.queries.low_rank`)."""
        check_instance("prepare_queries", "factors", factors, Factors)
        loader = self._loader(query_data, batch_size, "query data")
        self._check_weights(factors.meta, "these factors")
        with self._stage_context():
            queries = queries_mod.prepare_queries(**self._common(), loader=loader, factors=factors, rank=rank,
                                                  damping=damping, svd=svd, progress=self.progress)
        self._stamp(queries.meta)
        return queries

    def pairwise_scores(self, train_data: Any, queries: Queries, *, per_token: bool = False,
                        per_module: bool = False, batch_size: int = 8,
                        route: str = "factored", group_modules: bool = False,
                        query_batch_size: Optional[int] = None) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """float32 ``[n_train, n_query]`` on the CPU (``per_token``: ``[n_train, T, n_query]``, T the
        longest padded document, position ``t`` the document's ``t``-th token whichever side
        its batch was padded on (given one ``[B, T]`` mask per batch; per-module masks are not
        moved); ``per_module``: a dict of those by module name).

        ``route="factored"`` scores low-rank queries without building any per-document
        gradient; ``"auto"`` lets DESIGN.md's cost model pick the dense route per layer.
        ``group_modules=True`` keeps every layer's activations and gradients of a batch until
        its backward ends and scores them all in one grouped launch: faster for many small
        layers, at the cost of holding them in memory.

        ``query_batch_size``: score the queries in groups of this many, one pass over the
        training data per group, so that only one group's query factors are on the device at a
        time (every tracked layer's: ``queries.bytes_per_query()``, ``(d_out + d_in) x rank`` values
        per layer, ~0.47 GB in float32 at rank 32 for the MLPs of a 35B model of 40 layers of
        8192 -> 22528 -> 8192). Default: all queries in one pass."""
        check_instance("pairwise_scores", "queries", queries, Queries)
        per_token, per_module, group_modules = (check_flag("pairwise_scores", n, v) for n, v in (
            ("per_token", per_token), ("per_module", per_module), ("group_modules", group_modules)))
        loader = self._loader(train_data, batch_size, "training data")
        self._check_weights(queries.meta, "these queries")
        if query_batch_size is not None and (not isinstance(query_batch_size, int) or isinstance(query_batch_size, bool)
                                             or query_batch_size < 1):
            raise ValueError(f"query_batch_size must be a positive integer or None, got {query_batch_size!r}")
        step = queries.n_queries if query_batch_size is None else query_batch_size
        groups = [range(s, min(s + step, queries.n_queries)) for s in range(0, queries.n_queries, step)]
        parts = []
        with self._stage_context():
            for group in groups:
                subset = queries if len(groups) == 1 else queries.select(group)
                parts.append(scoring.pairwise_scores(**self._common(), loader=loader, queries=subset,
                                                     per_token=per_token, per_module=per_module,
                                                     backend=self.backend, route=route, group_modules=group_modules,
                                                     progress=self.progress))
        if len(parts) == 1:
            return parts[0]
        # the groups side by side on the query axis (per token: every pass over the same
        # documents pads them to the same T)
        if per_module:
            return {name: torch.cat([p[name] for p in parts], dim=-1) for name in parts[0]}
        return torch.cat(parts, dim=-1)

    def self_influence(self, train_data: Any, factors: Factors, *, damping: Optional[float] = None,
                       batch_size: int = 8, per_module: bool = False):
        """float32 ``[n_train]``: ``grad(loss_n)^T (G + lambda I)^-1 grad(loss_n)``, summed over
        the tracked layers; ``per_module=True``: ``{module: [n_train]}``, each layer's term."""
        check_instance("self_influence", "factors", factors, Factors)
        per_module = check_flag("self_influence", "per_module", per_module)
        loader = self._loader(train_data, batch_size, "training data")
        self._check_weights(factors.meta, "these factors")
        with self._stage_context():
            return scoring.self_influence(**self._common(), loader=loader, factors=factors, damping=damping,
                                          per_module=per_module, backend=self.backend, progress=self.progress)


def _weights_warning(what: str, theirs: str, ours: str) -> str:
    return (f"pyinf: {what} were made with other weights than this model's (fingerprint {theirs[:12]} there, "
            f"{ours[:12]} here: another checkpoint, or other parameter names or shapes); influence "
            f"computed from them mixes two models")


def _check_fused_head_untracked(model: nn.Module, task: Task, modules: Dict[str, nn.Module]) -> None:
    """CausalLMTask(fused_head=True) takes the loss from the output embedding's weight
    directly (pyinf.fused_ce), never through its forward: tracked, it would see no token."""
    if not getattr(task, "fused_head", False) or not hasattr(model, "get_output_embeddings"):
        return
    head = model.get_output_embeddings()
    for name, module in modules.items():
        if module is head:
            raise ValueError(f"{type(task).__name__}(fused_head=True) computes the loss from {name!r}'s weight "
                             f"directly, so it cannot be tracked: leave it out of tracked_modules, or use "
                             f"fused_head=False")
