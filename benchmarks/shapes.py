"""Every layer shape, workload and model configuration the benchmarks use, in one place.

Two presets: ``full`` (the sizes from the benchmark issue, meant for one H100) and
``smoke`` (tiny sizes that run the same code paths on a CPU in seconds; their timings mean
nothing). FLOP formulas are those of DESIGN.md section 2, per document, times N.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Tuple

from pyinf.ops._preferences import work

# --------------------------------------------------------------------------------------
# Layer shapes (d_in -> d_out of y = W x), as in DESIGN.md section 3.
# --------------------------------------------------------------------------------------
LAYERS: Dict[str, Tuple[int, int]] = {
    "gpt2-small c_fc": (768, 3072),
    "pythia-1b mlp.dense_h_to_4h": (2048, 8192),
    "llama-7b up_proj": (4096, 11008),
}


@dataclass(frozen=True)
class OpWorkload:
    """One op call: documents N of T tokens through a d_in -> d_out layer; Q queries of
    rank r for the score ops."""

    name: str          # short label used in tables, e.g. "llama-7b up_proj"
    d_in: int
    d_out: int
    n: int
    t: int
    q: int = 0
    r: int = 0
    bias: bool = False  # d_in counts a bias column: acts laid out as the capture stores them

    def to_dict(self):
        return asdict(self)


# FLOPs of one call (DESIGN.md section 2, "FLOPs per document" times N).
def flops(op: str, w: OpWorkload) -> float:
    """The dispatcher's own count (pyinf.ops._preferences.work), per benchmarked call."""
    if op == "covariance":  # both factors of the layer: A from acts, S from grads
        return work(op, dict(n=w.n, t=w.t, d=w.d_in)) + work(op, dict(n=w.n, t=w.t, d=w.d_out))
    op = dispatched_op(op)  # per token: the same two products; the epilogue writes [N, T, Q] instead
    if op not in OPS:
        raise ValueError(f"no FLOP formula for {op!r}")
    return work(op, dict(n=w.n, t=w.t, d_in=w.d_in, d_out=w.d_out, q=w.q, r=w.r))


def _score_workloads(preset: str) -> List[OpWorkload]:
    if preset == "full":
        return [
            OpWorkload("gpt2-small c_fc", 768, 3072, n=8, t=512, q=16, r=32),
            # The same layer with its bias, as the pipeline scores it: d_in = 769 (rows of the
            # capture's buffer padded to 784), as in every tracked layer of the e2e workload.
            OpWorkload("gpt2-small c_fc +bias", 769, 3072, n=8, t=512, q=16, r=32, bias=True),
            # Pythia-1B: the issue gives only the layer; we use its context 2048 with the
            # GPT-2 document count and Q=32 (our choice, documented in RESULTS.md).
            OpWorkload("pythia-1b mlp.dense_h_to_4h", 2048, 8192, n=8, t=2048, q=32, r=32),
            OpWorkload("llama-7b up_proj", 4096, 11008, n=8, t=2048, q=80, r=32),
        ]
    return [
        OpWorkload("tiny-a", 24, 40, n=2, t=16, q=3, r=4),
        OpWorkload("tiny-b", 48, 20, n=3, t=8, q=2, r=5),
        OpWorkload("tiny-a +bias", 25, 40, n=2, t=16, q=3, r=4, bias=True),
    ]


def _eigen_workloads(preset: str) -> List[OpWorkload]:
    if preset == "full":
        return [
            OpWorkload("gpt2-small c_fc", 768, 3072, n=8, t=512),
            OpWorkload("pythia-1b mlp.dense_h_to_4h", 2048, 8192, n=4, t=2048),
            OpWorkload("llama-7b up_proj", 4096, 11008, n=4, t=2048),
        ]
    return [
        OpWorkload("tiny-a", 24, 40, n=2, t=16),
        OpWorkload("tiny-b", 48, 20, n=3, t=8),
    ]


def unmatched_workload_filters(filters, ops, preset: str) -> List[str]:
    """The ``--workloads`` filters (substrings of workload names) that match no workload of
    these ops: a typo there would otherwise measure nothing, silently."""
    names = {w.name for op in ops for w in op_workloads(op, preset)}
    return [f for f in (filters or ()) if not any(f in n for n in names)]


def op_workloads(op: str, preset: str) -> List[OpWorkload]:
    """Workloads for one op. Score ops use the scoring shapes (Q, r); covariance,
    eigen-correction and self-influence use the factor-fitting shapes."""
    if op in ("factored_scores", PER_TOKEN_OP, "dense_scores"):
        # dense_scores at Llama Q=80 needs a [Q, d_out, d_in] query tensor of 7.2 GB in
        # bf16 (14.4 GB as the torch reference's fp32 copy): fits on an 80 GB GPU.
        return _score_workloads(preset)
    if op in ("covariance", "eigen_correction", "self_influence"):
        return _eigen_workloads(preset)
    raise ValueError(op)


# factored_scores(per_token=True), benchmarked as an op of its own (issue 3: at most 1.2x the
# time of the document scores at the same shape); the dispatcher's op is factored_scores.
PER_TOKEN_OP = "factored_scores_per_token"
OPS: Tuple[str, ...] = ("covariance", "eigen_correction", "self_influence", "factored_scores", PER_TOKEN_OP,
                        "dense_scores")


def dispatched_op(op: str) -> str:
    """The pyinf.ops function a benchmarked op calls."""
    return "factored_scores" if op == PER_TOKEN_OP else op


# --------------------------------------------------------------------------------------
# Grouped scoring: all 24 MLP layers of a 12-layer GPT-2 in one call.
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupedWorkload:
    name: str
    layers: Tuple[Tuple[int, int], ...]  # (d_in, d_out) per problem
    n: int
    t: int
    q: int
    r: int

    def per_layer(self) -> List[OpWorkload]:
        return [OpWorkload(f"{self.name}[{i}]", di, do, self.n, self.t, self.q, self.r)
                for i, (di, do) in enumerate(self.layers)]

    def flops(self) -> float:
        return sum(flops("factored_scores", w) for w in self.per_layer())


def grouped_workload(preset: str) -> GroupedWorkload:
    if preset == "full":
        layers = tuple(x for _ in range(12) for x in ((768, 3072), (3072, 768)))
        return GroupedWorkload("gpt2-small 24 MLP layers", layers, n=8, t=512, q=16, r=32)
    layers = tuple(x for _ in range(3) for x in ((16, 64), (64, 16)))
    return GroupedWorkload("tiny 6 layers", layers, n=2, t=8, q=2, r=4)


# --------------------------------------------------------------------------------------
# End to end: a Pythia-160M-shaped GPT-NeoX with random weights.
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 50304
    rotary_pct: float = 0.25
    max_position_embeddings: int = 2048

    def to_dict(self):
        return asdict(self)


PYTHIA_160M = ModelConfig()
TINY_NEOX = ModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                        vocab_size=512, max_position_embeddings=256)


@dataclass(frozen=True)
class E2EWorkload:
    model: ModelConfig
    n_docs: int
    doc_len: int
    n_queries: int
    query_len: int
    rank: int = 32
    fisher: str = "empirical"
    dtype: str = "bfloat16"                 # model weights and kernel inputs
    batch_sizes: Tuple[int, ...] = (8, 32)  # for fit and for scoring (query batch fixed at 8)
    query_batch_size: int = 8
    floor_batch_sizes: Tuple[int, ...] = (8, 32, 64)
    compile_floor: bool = True              # also time a torch.compile'd forward + input-grad backward
    pyinf_compiled_batch: int = 32          # also run pyinf with compile=True at this batch (GPU; 0: no)
    pyinf_checkpoint_batch: int = 32        # also run pyinf with checkpoint=True at this batch (0: no)
    kronfluence_fp32: bool = True           # also run kronfluence with its fp32 defaults (reference row)
    pyinf_fp32: bool = True                 # also run pyinf in float32 (the bf16 runs' accuracy reference)
    kronfluence_full_svd: bool = False      # kronfluence query SVD: torch.svd_lowrank (default) or full
    seed: int = 0

    def to_dict(self):
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d


def e2e_workload(preset: str) -> E2EWorkload:
    if preset == "full":
        return E2EWorkload(PYTHIA_160M, n_docs=512, doc_len=512, n_queries=32, query_len=128)
    # CPU smoke: fp32 (bf16 matmuls on CPU are slow and noisy), one batch size, full SVD in
    # kronfluence so that the Pearson sanity check compares like with like.
    return E2EWorkload(TINY_NEOX, n_docs=16, doc_len=32, n_queries=4, query_len=16, rank=8, dtype="float32",
                       batch_sizes=(8,), query_batch_size=4, floor_batch_sizes=(8,), compile_floor=False, pyinf_compiled_batch=0,
                       pyinf_checkpoint_batch=8,
                       kronfluence_fp32=False, kronfluence_full_svd=True)


# --------------------------------------------------------------------------------------
# Scaling runs (pyinf only by default): one axis at a time away from the base point.
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScalingPlan:
    base: E2EWorkload
    n_docs: Tuple[int, ...]
    doc_len: Tuple[int, ...]
    n_queries: Tuple[int, ...]
    rank: Tuple[int, ...]
    batch_size: int = 32
    max_seconds: float = 480.0  # points left when this is spent are reported as skipped

    def points(self) -> List[Tuple[str, int, E2EWorkload]]:
        out = []
        for axis in ("n_docs", "doc_len", "n_queries", "rank"):
            for v in getattr(self, axis):
                out.append((axis, v, replace(self.base, **{axis: v})))
        return out


def scaling_plan(preset: str) -> ScalingPlan:
    if preset == "full":
        base = e2e_workload("full")
        return ScalingPlan(base, n_docs=(64, 128, 256, 512, 1024), doc_len=(128, 256, 512, 1024, 2048),
                           n_queries=(8, 16, 32, 64, 128), rank=(8, 16, 32, 64, 128), batch_size=32)
    base = replace(e2e_workload("smoke"), n_docs=8)
    return ScalingPlan(base, n_docs=(4, 8), doc_len=(16, 32), n_queries=(2, 4), rank=(4, 8), batch_size=8)


# Peak-matmul probe: bf16 8192^3 on GPU; fp32 on CPU (smaller, so the smoke stays quick).
def peak_matmul_size(device_type: str, preset: str) -> int:
    if device_type == "cuda":
        return 8192
    return 512 if preset == "smoke" else 2048
