"""``pyinf demo``: the paper's experiment in miniature, end to end on a CPU in minutes.

Trains a tiny GPT on the built-in corpus (procedural and factual documents), fits EK-FAC
factors, prepares factual and reasoning queries, scores every document (per token too),
prints the top documents of a few queries with their most influential tokens highlighted,
and saves the full report. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from typing import Dict, Optional, TextIO

import torch

from .corpus import build_corpus
from .report import analyse, render_terminal, save_report, use_color
from .train import FULL_TRAIN, QUICK_TRAIN, build_model, evaluate, train

DEFAULT_OUT = "pyinf-out/demo"
TOP_K = 5
QUERY_RANK = 32
BATCH_SIZE = 16


@contextmanager
def _single_cpu_thread():
    """Runs the demo's PyTorch work on one CPU thread, restoring the setting after. The
    demo's matrices are tiny (64 wide), so a second thread gains little, while on a busy
    machine two threads contending for two cores made training over ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Stages:
    """Numbered stage lines with their wall time, and the timings for the report."""

    def __init__(self, stream: TextIO, total: int):
        self.stream, self.total, self.index = stream, total, 0
        self.timings: Dict[str, float] = {}

    def say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    @contextmanager
    def stage(self, key: str, text: str):
        self.index += 1
        self.say(f"[{self.index}/{self.total}] {text} ...")
        start = time.perf_counter()
        yield
        self.timings[key] = time.perf_counter() - start
        self.say(f"      done in {self.timings[key]:.1f} s")


def run_demo(out_dir: str = DEFAULT_OUT, quick: bool = False, backend: str = "auto", seed: int = 0,
             progress: Optional[bool] = None, stream: Optional[TextIO] = None,
             color: Optional[bool] = None) -> dict:
    """Runs the demo and returns its metrics (see :func:`pyinf.demo.report.analyse`), with the
    model's greedy accuracy, the stage timings and the report's file paths added.

    ``quick`` shrinks corpus, model and training to a few seconds' work (used by the tests).
    ``progress``: tqdm bars on the engine's passes (None: only when stderr is a terminal).
    ``stream``: where the demo prints (stdout by default); ``color``: ANSI colour in that
    output, by default on a terminal without ``NO_COLOR``.
    """
    with _single_cpu_thread():
        return _run(out_dir, quick, backend, seed, progress, stream, color)


def _run(out_dir, quick, backend, seed, progress, stream, color) -> dict:
    from pyinf import CausalLMTask, InfluenceEngine  # the engine is only needed from here on

    stream = sys.stdout if stream is None else stream
    color = use_color(stream) if color is None else color
    stages = _Stages(stream, total=6)
    start = time.perf_counter()
    torch.manual_seed(seed)

    corpus = build_corpus(seed, quick=quick)
    n_proc = sum(d.kind == "procedural" for d in corpus.documents)
    n_fact_q = sum(q.kind == "factual" for q in corpus.queries)
    corpus_info = (f"{len(corpus.documents)} documents ({n_proc} procedural, {len(corpus.documents) - n_proc} factual), "
                   f"{len(corpus.queries)} queries ({n_fact_q} factual, {len(corpus.queries) - n_fact_q} reasoning), "
                   f"vocabulary {len(corpus.tokenizer)}, up to {corpus.max_len} tokens")
    stages.say(f"pyinf demo{' (quick)' if quick else ''}: {corpus_info}")

    model = build_model(corpus, seed, quick=quick)
    cfg = QUICK_TRAIN if quick else FULL_TRAIN
    c = model.config
    model_info = (f"TinyGPT, {model.num_parameters():,} parameters ({c.n_layers} layers, d_model {c.d_model}, "
                  f"{c.n_heads} heads, MLP {c.d_mlp})")
    with stages.stage("train", f"training {model_info} for {cfg.steps} steps"):
        log = train(model, corpus, cfg, seed=seed, log=stages.say)
        accuracy = evaluate(model, corpus)["summary"]
    stages.say(f"      greedy accuracy: factual {accuracy['factual_accuracy']:.0%}, "
               f"reasoning {accuracy['reasoning_accuracy']:.0%} (whole worked solution right)")

    engine = InfluenceEngine(model, CausalLMTask(), backend=backend, progress=progress)
    train_data, query_data = corpus.train_dataset(), corpus.query_dataset()
    with stages.stage("fit_factors", f"fitting EK-FAC factors on {len(engine.modules)} layers (true Fisher)"):
        factors = engine.fit_factors(train_data, fisher="true", batch_size=BATCH_SIZE, seed=seed)
    with stages.stage("prepare_queries", f"preparing {len(corpus.queries)} queries (rank {QUERY_RANK})"):
        queries = engine.prepare_queries(query_data, factors, rank=QUERY_RANK, batch_size=BATCH_SIZE)
    with stages.stage("score", f"scoring {len(corpus.documents)} documents per token"):
        # One per-token pass gives the document scores too: they are its sum over positions.
        tok_scores = engine.pairwise_scores(train_data, queries, per_token=True, batch_size=BATCH_SIZE)
        scores = tok_scores.sum(dim=1)
    with stages.stage("self_influence", "self-influence of every document"):
        self_inf = engine.self_influence(train_data, factors, batch_size=BATCH_SIZE)

    with stages.stage("report", "analysing and writing the report"):
        result = analyse(corpus, scores, tok_scores, self_inf, k=TOP_K)
        order = torch.argsort(self_inf, descending=True)[:5].tolist()
        result["self_influence_top"] = [{"doc": n, "self_influence": float(self_inf[n]), **corpus.documents[n].meta()}
                                        for n in order]
        result["accuracy"] = accuracy
        result["info"] = {"corpus": corpus_info, "model": model_info,
                          "training": f"{cfg.steps} steps, batch {cfg.batch_size}, final loss {log['final_loss']:.3f}, seed {seed}",
                          "influence": f"EK-FAC, true Fisher, {len(engine.modules)} tracked layers, "
                                       f"query rank {QUERY_RANK}, backend {backend}"}
        result["timings"] = stages.timings
        paths = save_report(out_dir, result, scores, self_inf, corpus)

    stages.say(render_terminal(result, color))
    total = time.perf_counter() - start
    stages.say(f"Report: {paths['report.md']}, {paths['report.html']}, {paths['results.json']}  "
               f"(total {total:.1f} s)")
    metrics = dict(result["metrics"])
    metrics.update(accuracy=accuracy, timings=dict(stages.timings, total=total), report_files=paths)
    return metrics


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``pyinf demo`` options, for the CLI to add to its sub-parser."""
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"directory for report.md, report.html and results.json (default {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true", help="a tiny version that runs in seconds (used by the tests)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed for corpus, model and fitting (default 0)")
    from pyinf.ops import BACKENDS

    parser.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                        help="pyinf op backend (default auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Runs the demo from parsed :func:`add_demo_arguments` options; returns an exit code."""
    run_demo(out_dir=args.out, quick=args.quick, backend=args.backend, seed=args.seed,
             progress=False if args.no_progress else None)
    return 0


def main(argv=None) -> int:
    parser = add_demo_arguments(argparse.ArgumentParser(prog="pyinf demo", description=__doc__.splitlines()[0]))
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
