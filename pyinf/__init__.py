"""pyinf: EK-FAC influence functions with fused kernels.

    engine = pyinf.InfluenceEngine(model, pyinf.CausalLMTask())
    factors = engine.fit_factors(train_data)
    queries = engine.prepare_queries(query_data, factors, rank=32)
    scores = engine.pairwise_scores(train_data, queries)   # [n_train, n_query]
    scores = pyinf.score_corpus(engine, train_data, queries, "out/")   # resumable, shardable
"""
__version__ = "0.1.0"

from . import ops
from .corpus import score_corpus, self_influence_corpus
from .engine import InfluenceEngine
from .factors import Factors
from .queries import Queries
from .staged_fit import fit_factors_staged
from .normalize import normalize
from .storage import CorruptFileError
from .task import CausalLMTask, Task, pad_collate

__all__ = ["InfluenceEngine", "Task", "CausalLMTask", "Factors", "Queries", "CorruptFileError", "pad_collate", "normalize", "score_corpus", "self_influence_corpus", "fit_factors_staged", "ops"]
