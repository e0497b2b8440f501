"""The pyinf command line: ``pyinf demo`` (the built-in end-to-end example), ``pyinf fit``
and ``pyinf score`` on a local Hugging Face model and JSONL files, ``pyinf backends``."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import List, Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local Hugging Face model directory, or a config JSON "
                   "(random weights)")
    p.add_argument("--track", default=None, help="regex over module names: track only the matching "
                   "Linear/Conv1D layers (default: all but the output embedding)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the model (default: as stored)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "native"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512, help="truncate documents to this many tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--fused-head", action="store_true", help="loss from the final hidden states without fp32 "
                   "[tokens, vocab] logits (pyinf.fused_ce)")
    p.add_argument("--compile", action="store_true", help="run the model's blocks under torch.compile "
                   "(compiles once; pays on long passes)")
    p.add_argument("--checkpoint", action="store_true", help="activation checkpointing of the model's blocks "
                   "(a fraction of the activation memory, for one more forward of the blocks)")


def _engine(args):
    from . import CausalLMTask, InfluenceEngine
    from .modules import find_tracked_modules
    from .textdata import load_model

    model, tokenizer = load_model(args.model, seed=args.seed, dtype=DTYPES.get(args.dtype))
    model = model.to(args.device)
    tracked: Optional[List[str]] = None
    if args.track:
        pattern = re.compile(args.track)
        tracked = [n for n in find_tracked_modules(model) if pattern.search(n)]
        if not tracked:
            raise SystemExit(f"pyinf: --track {args.track!r} matches no trackable module")
    task = CausalLMTask(tracked_modules=tracked, pad_token_id=getattr(tokenizer, "pad_token_id", None) or 0,
                        fused_head=args.fused_head)
    engine = InfluenceEngine(model, task, backend=args.backend, progress=False if args.no_progress else None,
                             compile=args.compile, checkpoint=args.checkpoint)
    return engine, tokenizer


def cmd_fit(args) -> int:
    from .textdata import JsonlTextDataset

    engine, tokenizer = _engine(args)
    train = JsonlTextDataset(args.train, tokenizer, max_length=args.max_length)
    factors = engine.fit_factors(train, fisher=args.fisher, batch_size=args.batch_size,
                                 max_examples=args.max_examples, seed=args.seed, eigh_workers=args.eigh_workers)
    factors.meta["model"] = str(args.model)
    path = factors.save(args.out)
    print(f"pyinf: fitted EK-FAC factors for {len(factors.modules)} modules on {factors.meta['n_examples']} "
          f"documents -> {path}")
    return 0


def cmd_score(args) -> int:
    from . import Factors, storage
    from .textdata import JsonlTextDataset

    engine, tokenizer = _engine(args)
    factors = Factors.load(args.factors)
    train = JsonlTextDataset(args.train, tokenizer, max_length=args.max_length)
    query = JsonlTextDataset(args.queries, tokenizer, max_length=args.max_length)
    queries = engine.prepare_queries(query, factors, rank=None if args.rank == 0 else args.rank,
                                     damping=args.damping, batch_size=args.batch_size)
    scores = engine.pairwise_scores(train, queries, batch_size=args.batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"scores": scores}
    if args.per_token:
        tensors["per_token"] = engine.pairwise_scores(train, queries, per_token=True, batch_size=args.batch_size)
    storage.save(out / "scores.safetensors", "scores", tensors,
                 dict(rank=queries.rank, damping=queries.damping, factors_id=factors.id, train=str(args.train),
                      queries=str(args.queries), model=str(args.model)))
    top = []
    k = min(args.top_k, scores.shape[0])
    for q in range(scores.shape[1]):
        values, index = scores[:, q].topk(k)
        top.append(dict(query=query.text(q), top=[dict(index=int(i), score=float(v), text=train.text(int(i)))
                                                  for v, i in zip(values, index)]))
    tmp = out / ".top.json.tmp"
    tmp.write_text(json.dumps(top, indent=1))
    tmp.replace(out / "top.json")
    for entry in top:
        print(f"\nquery: {entry['query'][:100]!r}")
        for row in entry["top"][: min(5, k)]:
            print(f"  {row['score']:+.4e}  #{row['index']:<6d} {row['text'][:90]!r}")
    print(f"\npyinf: scores {tuple(scores.shape)} -> {out / 'scores.safetensors'}, top {k} -> {out / 'top.json'}")
    return 0


def cmd_demo(args) -> int:
    from .demo.run import run_demo

    run_demo(out_dir=args.out, quick=args.quick, backend=args.backend, seed=args.seed,
             progress=False if args.no_progress else None)
    return 0


def cmd_backends(args) -> int:
    from .ops import available_backends

    for name, reason in available_backends().items():
        print(f"{name:7s} {'available' if reason is None else reason}")
    print(f"cuda    {'available: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyinf", description="EK-FAC influence functions with fused kernels")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a tiny model on a synthetic corpus and show what influenced what")
    from .demo.run import add_demo_arguments

    add_demo_arguments(demo)
    demo.set_defaults(func=cmd_demo)

    fit = sub.add_parser("fit", help="fit EK-FAC factors on a JSONL training set")
    _add_model_args(fit)
    fit.add_argument("--train", required=True, help="JSONL, one {'text': ...} per line")
    fit.add_argument("--out", required=True, help="factors file to write (.safetensors)")
    fit.add_argument("--fisher", choices=["true", "empirical"], default="true")
    fit.add_argument("--max-examples", type=int, default=None)
    fit.add_argument("--eigh-workers", type=int, default=None, help="eigendecompositions run at once, each on "
                     "its own CUDA stream on a GPU (default $PYINF_EIGH_WORKERS, else the measured count on a GPU, else 1)")
    fit.set_defaults(func=cmd_fit)

    score = sub.add_parser("score", help="score training documents against queries")
    _add_model_args(score)
    score.add_argument("--factors", required=True)
    score.add_argument("--train", required=True, help="JSONL, one {'text': ...} per line")
    score.add_argument("--queries", required=True, help="JSONL, {'prompt': ..., 'completion': ...} per line")
    score.add_argument("--out", required=True, help="output directory")
    score.add_argument("--rank", type=int, default=32, help="query rank (0 = full rank)")
    score.add_argument("--damping", type=float, default=None, help="default: 0.1 x mean(Lambda) per module")
    score.add_argument("--top-k", type=int, default=10)
    score.add_argument("--per-token", action="store_true", help="also save per-token scores")
    score.set_defaults(func=cmd_score)

    backends = sub.add_parser("backends", help="which kernel backends can run here")
    backends.set_defaults(func=cmd_backends)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
