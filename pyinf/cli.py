"""The pyinf command line: ``pyinf demo`` (the built-in end-to-end example); ``pyinf fit``,
``pyinf prepare``, ``pyinf score`` and ``pyinf self-influence`` on a local Hugging Face model
and JSONL files; ``pyinf info`` on saved files; ``pyinf backends``."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import torch

from .corpus import DEFAULT_CHUNK_SIZE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# `fit --shard K/N --no-wait` stopped because another shard's files are missing: not an error,
# but not done either (EX_TEMPFAIL of sysexits.h: "try again later")
EXIT_RUN_AGAIN = 75
DEFAULT_MAX_LENGTH = 512  # tokens per training document, unless --max-length or the model says fewer


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local Hugging Face model directory, or a config JSON "
                   "(random weights)")
    p.add_argument("--track", default=None, help="regex over module names: track only the matching "
                   "Linear/Conv1D/convolution layers (default: those of --factors where given, else all but the output "
                   "embedding)")
    p.add_argument("--device", default=None, help="default: the GPU of this process's local rank under a launcher "
                   "(torchrun, srun, mpirun) that shows it several, else cuda, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the model (default: as stored)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "native"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=_at_least(2), default=None,
                   help=f"truncate training documents to this many tokens (default {DEFAULT_MAX_LENGTH}, or the "
                        f"model's number of positions if fewer); a query that does not fit is refused")
    p.add_argument("--seed", type=int, default=None, help="random seed (true-Fisher label samples; a config-only "
                   "--model also draws its random weights from it, so every command must use the same; default "
                   "0 for fit, and the fit's seed, recorded in the factors, for the later commands)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--fused-head", action="store_true", help="loss from the final hidden states without fp32 "
                   "[tokens, vocab] logits (pyinf.fused_ce)")
    p.add_argument("--compile", action="store_true", help="run the model's blocks under torch.compile "
                   "(compiles once; pays on long passes)")
    p.add_argument("--checkpoint", action="store_true", help="activation checkpointing of the model's blocks "
                   "(a fraction of the activation memory, for one more forward of the blocks)")


QUERY_DEFAULTS = dict(rank=32, svd="full")


def _add_query_args(p: argparse.ArgumentParser) -> None:
    # defaults None: `score --prepared` refuses a setting given explicitly that the prepared
    # queries do not have (see _query_settings)
    p.add_argument("--rank", type=_at_least(0), default=None, help="query rank (0 = full rank; default 32)")
    p.add_argument("--damping", type=float, default=None, help="default: 0.1 x mean(Lambda) per module")
    p.add_argument("--svd", choices=["full", "randomized"], default=None, help="how query gradients are "
                   "truncated to the rank (randomized: far cheaper for wide layers; default full)")


def _query_settings(args, prepared: Optional[dict] = None) -> None:
    """Fills in the query settings left unset. With ``prepared`` (the source recorded in a
    prepared queries file), the prepared ones apply, and one given explicitly that differs is
    an error rather than silently ignored."""
    if prepared is not None:
        given = dict(rank=args.rank, damping_arg=args.damping, svd=args.svd)
        differ = [f"--{k.replace('_arg', '')} {v!r} (prepared: {prepared.get(k)!r})" for k, v in given.items()
                  if v is not None and k in prepared and prepared[k] != v]
        if differ:
            raise ValueError(f"{args.prepared} was prepared with other settings than {', '.join(differ)}: leave "
                             f"them out (the prepared ones apply), or prepare the queries again")
        for k in ("rank", "svd"):
            if k in prepared:
                setattr(args, k, prepared[k])
        if "damping_arg" in prepared:
            args.damping = prepared["damping_arg"]
    for k, v in QUERY_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def _at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _shard(text: str):
    from .corpus import parse_shard

    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def default_device(environ=None) -> str:
    """cuda:LOCAL_RANK for a process of a launcher (torchrun, srun, mpirun) that sees several
    GPUs, so that `--shard auto` processes on one machine each take their own; else cuda (a
    launcher that gives each process one GPU, or none), else cpu."""
    from .corpus import launcher_rank

    if not torch.cuda.is_available():
        return "cpu"
    found = launcher_rank(environ)
    local = found[2] if found is not None else None
    if local is not None and torch.cuda.device_count() > 1:
        if local >= torch.cuda.device_count():
            raise ValueError(f"this process's local rank is {local}, but it sees {torch.cuda.device_count()} GPUs: "
                             f"give --device")
        return f"cuda:{local}"
    return "cuda"


def max_positions(model) -> Optional[int]:
    """The longest sequence the model's config allows (GPT-2's n_positions, most others'
    max_position_embeddings), or None when it names none."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _engine(args, factors=None, layers=None):
    """The model and its tokenizer, tracking --track's layers, else ``layers`` (those of the
    --prepared queries), else those of ``factors`` (the layers they were fitted on), else every
    trackable layer but the output embedding."""
    from . import CausalLMTask, InfluenceEngine
    from .modules import find_tracked_modules
    from .textdata import load_model, tokenizer_fingerprint

    if args.seed is None:  # the fit's: a config-only model's random weights come from it
        recorded = factors.meta.get("seed") if factors is not None else None
        args.seed = recorded if isinstance(recorded, int) else 0
    model, tokenizer = load_model(args.model, seed=args.seed, dtype=DTYPES.get(args.dtype))
    args.tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)
    # the dtype the model runs in (--dtype float32 on a float32 checkpoint is no other setting)
    args.model_dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    if args.device is None:
        args.device = default_device()
    model = model.to(args.device)
    limit = max_positions(model)
    if args.max_length is None:  # the default: 512 tokens, or fewer if the model has fewer positions
        args.max_length = min(DEFAULT_MAX_LENGTH, limit or DEFAULT_MAX_LENGTH)
    elif limit is not None and args.max_length > limit:  # longer documents would index past its position table
        print(f"pyinf: --max-length {args.max_length} lowered to {limit}, the model's maximum number of positions",
              file=sys.stderr)
        args.max_length = limit
    tracked: Optional[List[str]] = None
    if args.track:
        pattern = re.compile(args.track)
        tracked = [n for n in find_tracked_modules(model) if pattern.search(n)]
        if not tracked:
            raise ValueError(f"--track {args.track!r} matches no trackable module (every nn.Linear, Conv1D "
                             f"and ungrouped convolution but the output embedding, which is never tracked by default)")
    elif layers is not None:
        tracked = list(layers)
    elif factors is not None:
        tracked = factors.module_names
    if factors is not None:
        _check_factor_weights(args, factors, model)
    task = CausalLMTask(tracked_modules=tracked, pad_token_id=getattr(tokenizer, "pad_token_id", None) or 0,
                        fused_head=args.fused_head)
    engine = InfluenceEngine(model, task, backend=args.backend, progress=False if args.no_progress else None,
                             compile=args.compile, checkpoint=args.checkpoint)
    return engine, tokenizer


def _check_factor_weights(args, factors, model) -> None:
    """Factors fitted with other weights than --model's are refused (the Python API warns):
    in a script of many runs a warning is easily lost, and the influence would mix two
    models. --allow-other-weights takes them (a base model's factors for its fine-tune)."""
    from .fingerprint import same_weights, weights_identity

    theirs = factors.meta.get("model_fingerprint")
    if theirs is None or getattr(args, "allow_other_weights", False):
        return
    ours = weights_identity(model)
    if theirs == ours.fingerprint:
        return
    same = same_weights(factors.meta.get("model_weights"), ours.record)
    if same:
        return
    if same is None:  # a file without the per-parameter record (older pyinf): another dtype looks different
        warnings.warn(f"pyinf: {args.factors} records no per-parameter weights (an older pyinf wrote it), so "
                      f"whether {args.model} has its weights in another dtype cannot be told: fingerprint "
                      f"{theirs[:12]} there, {ours.fingerprint[:12]} here")
        return
    seed = factors.meta.get("seed")
    hint = (f"; a config-only --model draws its weights from --seed ({args.seed} here, {seed} in the fit)"
            if isinstance(seed, int) and seed != args.seed else "")
    raise ValueError(f"{args.factors} was fitted with other weights than {args.model}'s (fingerprint {theirs[:12]} "
                     f"there, {ours.fingerprint[:12]} here{hint}): influence from them would mix two models; pass "
                     f"--allow-other-weights to use them anyway")


def cmd_merge_factors(args) -> int:
    from . import Factors

    out = Path(args.out)
    if out.exists() and not args.force:
        ids = [Factors.load_header(p).id for p in args.parts]
        try:
            done = Factors.load_header(out).meta.get("merged_from") == ids
        except (ValueError, KeyError, TypeError):  # damaged, or not factors
            done = False
        if done:  # a `fit A; fit B; merge-factors; score` script run again
            print(f"pyinf: {out} already holds the merge of these factors: nothing to do")
            return 0
        raise ValueError(f"{out} exists and is no merge of these factors: give another --out, or --force to "
                         f"replace it")
    merged = Factors.merge_files(args.parts, out)  # one tensor in memory at a time
    print(f"pyinf: merged the factors of {len(merged.specs)} modules from {len(args.parts)} fits -> {out} "
          f"(id {merged.id[:12]})")
    return 0


def cmd_fit(args) -> int:
    from .staged_fit import StagedFit
    from .textdata import JsonlTextDataset

    if args.sample_seed is not None and args.max_examples is None:  # before minutes of loading a model
        raise ValueError("--sample-seed draws the --max-examples documents: give --max-examples too")
    engine, tokenizer = _engine(args)
    train = JsonlTextDataset(args.train, tokenizer, max_length=args.max_length)
    if args.max_examples is not None:
        from torch.utils.data import Subset

        if args.max_examples < 1:
            raise ValueError(f"--max-examples must be positive, got {args.max_examples}")

        n = min(args.max_examples, len(train))
        if args.sample_seed is None:
            train = Subset(train, range(n))
        else:  # a uniform sample, in file order (a sorted or concatenated corpus's first lines are one source)
            g = torch.Generator().manual_seed(args.sample_seed)
            train = Subset(train, sorted(torch.randperm(len(train), generator=g)[:n].tolist()))
    shard = args.shard or (0, 1)
    work_dir = Path(args.work_dir or f"{args.out}.parts")
    saved = []

    def save(factors):  # before the work files are removed: a failed save keeps them
        factors.meta["model"] = str(args.model)
        saved.append(factors.save(args.out))

    fit = StagedFit(engine, train, work_dir, shard=shard, fisher=args.fisher, batch_size=args.batch_size,
                    seed=args.seed, eigh_workers=args.eigh_workers, run_meta=_run_meta(args))
    if not args.refit and fit.done_in(args.out):
        if shard[0] == 0:  # what a fit killed between writing the factors and cleaning up left
            fit.remove_work_files()
        print(f"pyinf: {args.out} already holds the factors of this fit (the same model, data and settings): "
              f"not fitting again (--refit does)")
        return 0
    factors = fit.run_stages(wait=not args.no_wait, save=save)
    if factors is None:
        # the staged fit has said why it stopped: done (shard 0 writes the factors), or, with
        # --no-wait, waiting for other shards' files: EX_TEMPFAIL, so a script can loop on it
        print(f"pyinf: shard {shard[0]}/{shard[1]}: its part of the fit so far is saved in {work_dir}"
              + ("; run it again once the other shards are further" if fit.waiting_for else ""))
        return EXIT_RUN_AGAIN if fit.waiting_for else 0
    print(f"pyinf: fitted EK-FAC factors for {len(factors.modules)} modules on {factors.meta['n_examples']} "
          f"documents -> {saved[0]}")
    return 0


def _query_source(args, path) -> dict:
    """What prepared queries depend on besides the factors: recorded in a prepared file and
    checked before a score run reuses it."""
    import hashlib

    return dict(queries_sha256=hashlib.sha256(Path(path).read_bytes()).hexdigest(), rank=args.rank,
                damping_arg=args.damping, svd=args.svd, max_length=args.max_length, **_model_source(args))


def _model_source(args) -> dict:
    """What decides the model's weights, its loss and its token ids: a prepared file made with
    others is not reused (--seed draws a config-only model's random weights)."""
    return dict(model=str(args.model), seed=args.seed, dtype=args.model_dtype, fused_head=bool(args.fused_head),
                tokenizer=args.tokenizer_fingerprint)


def _run_meta(args) -> dict:
    """The settings a resumable run (fit, score, self-influence) records in each of its files
    besides the model's fingerprint, the data's and the factors' or queries': a rerun with
    others is refused rather than mixed in. (model_dtype: the staged fit records the factors'
    dtype as dtype.)"""
    return dict(max_length=args.max_length, model_dtype=args.model_dtype, tokenizer=args.tokenizer_fingerprint)


def _prepare(engine, args, factors, query):
    queries = engine.prepare_queries(query, factors, rank=None if args.rank == 0 else args.rank,
                                     damping=args.damping, batch_size=args.batch_size, svd=args.svd)
    queries.meta["source"] = _query_source(args, args.queries)
    return queries


def _shard_pending(shard) -> int:
    print(f"pyinf: shard {shard[0]}/{shard[1]} done; chunks of other shards are still missing. The shard that "
          f"finishes last joins them (or rerun this command without --shard).")
    return 0


def cmd_prepare(args) -> int:
    from . import Factors, Queries
    from .textdata import JsonlTextDataset

    factors = Factors.load_header(args.factors)  # enough to tell whether the saved queries are these
    engine, tokenizer = _engine(args, factors)
    _query_settings(args)
    query = JsonlTextDataset(args.queries, tokenizer, max_length=args.max_length, queries=True)
    out = Path(args.out)
    if out.exists():  # a script run again: the same queries, not new bits (a GPU's SVD may differ in
        try:          # the last place, and scores chunked against the saved ones would be refused)
            saved = Queries.load(out)
        except ValueError as exc:  # damaged, or not queries: prepared again
            print(f"pyinf: not reusing {out}: {exc}", file=sys.stderr)
        else:
            differ = _query_differences(saved, engine, factors, _query_source(args, args.queries))
            if not differ:
                print(f"pyinf: {out} already holds these queries (the same factors, model, queries and settings): "
                      f"nothing to do (delete it to prepare them again)")
                return 0
            print(f"pyinf: replacing {out} ({'; '.join(differ)})", file=sys.stderr)
    factors = Factors.load(args.factors, covariances=False)  # only the fit reads the covariances
    path = _prepare(engine, args, factors, query).save(out)
    print(f"pyinf: prepared {len(query)} queries (rank {args.rank or 'full'}) -> {path}")
    return 0


def _load_or_prepare(engine, args, factors, query, out: Path, prepared=None):
    """The run's queries: ``prepared`` (``--prepared``, loaded), else the ones an earlier run
    into ``out`` prepared from the same inputs (so a resumed run scores against the very same
    factors), else new."""
    from .queries import Queries

    if prepared is not None:
        queries = prepared
        source = queries.meta.get("source", {})
        # the settings the queries were prepared with, from the queries themselves (files
        # prepared with the Python API have no CLI source)
        _query_settings(args, dict(rank=queries.meta.get("rank") or 0, svd=queries.meta.get("svd"),
                                   damping_arg=queries.meta.get("damping_arg")))
        if queries.n_queries != len(query) or source.get("queries_sha256") not in (
                None, _query_source(args, args.queries)["queries_sha256"]):
            raise ValueError(f"{args.prepared} was not prepared from {args.queries} ({queries.n_queries} queries "
                             f"there, {len(query)} in {args.queries})")
        if source.get("tokenizer") not in (None, args.tokenizer_fingerprint):
            raise ValueError(f"{args.prepared} was prepared with another tokenizer (fingerprint "
                             f"{source['tokenizer']} there, {args.tokenizer_fingerprint} here)")
        # the weights decide, in any dtype, not the path they were read from (shards may mount
        # them elsewhere) nor the seed (it only draws a config-only model's weights, named
        # then as the likely cause); the loss's implementation (--fused-head) does not change
        # the queries
        if not engine.same_weights_as(queries.meta):
            differ = [f"{k}: {source[k]!r} there, {v!r} here" for k, v in _model_source(args).items()
                      if k == "seed" and k in source and source[k] != v]
            theirs = queries.meta["model_fingerprint"]
            differ.append(f"weights: fingerprint {theirs[:12]} there, {engine.fingerprint()[:12]} here")
            raise ValueError(f"{args.prepared} was prepared with another model ({'; '.join(differ)})")
        return queries
    _query_settings(args)
    if args.shard is not None and args.shard[1] > 1:
        raise ValueError("--shard needs --prepared QUERIES (from `pyinf prepare`), so that every shard "
                         "scores against the same query factors")
    saved = out / "queries.safetensors"
    if saved.exists():
        try:
            queries = Queries.load(saved)
        except ValueError as exc:  # damaged (CorruptFileError) or of other modules: prepare again
            print(f"pyinf: not reusing {saved}: {exc}", file=sys.stderr)
        else:
            differ = _query_differences(queries, engine, factors, _query_source(args, args.queries))
            if not differ:
                print(f"pyinf: reusing the queries prepared by an earlier run: {saved}", file=sys.stderr)
                return queries
            # the saved queries are those the directory's scores were computed against: not
            # replaced while any of those scores is there (the run could not be resumed after)
            from .corpus import SCORES_KIND, result_files

            if result_files(out, SCORES_KIND):
                raise ValueError(f"{out} holds scores of other queries ({'; '.join(differ)}): write into a new output "
                                 f"directory, or delete {out} to start over")
            print(f"pyinf: not reusing {saved} ({'; '.join(differ)})", file=sys.stderr)
    queries = _prepare(engine, args, factors, query)
    _check_saved_scores(out, queries, saved)
    queries.save(saved)
    return queries


def _check_saved_scores(out: Path, queries, saved: Path) -> None:
    """Queries prepared anew (the saved ones were missing or damaged) replace the saved file
    only if the directory's scores were computed against them: a run with other settings
    would otherwise leave the directory's scores with queries they do not belong to, and
    the run that does match them refused. The scores' files record the queries' fingerprint."""
    from .corpus import SCORES_KIND, recorded_run, result_files

    for path in result_files(out, SCORES_KIND):
        recorded = recorded_run(path)
        if recorded is None:
            continue  # damaged: computed again by the run
        if recorded.get("queries") in (None, queries.fingerprint):
            return  # the same queries (or a file of no queries): the run checks each file again
        raise ValueError(f"{out} holds scores of other queries (fingerprint {str(recorded['queries'])[:12]} in "
                         f"{path.name}, {queries.fingerprint[:12]} now; {saved.name}, which would name the "
                         f"settings that differ, was missing or damaged): rerun with the settings those scores were "
                         f"computed with, write into a new output directory, or delete {out} to start over")


# what the weights decide (compared by their fingerprint, not by the path they were read
# from, nor by the seed that drew a config-only model's), and the loss's implementation,
# which does not change the queries (as with --prepared)
_NOT_COMPARED = ("model", "seed", "fused_head")


def _query_differences(queries, engine, factors, source: dict) -> List[str]:
    """How saved queries differ from the ones this run would prepare: ``setting: there, now``."""
    from .storage import differences

    theirs = queries.meta.get("source") or {}
    differ = []
    if queries.factors_id != factors.id:
        differ.append(f"factors: {queries.factors_id[:12]} there, {factors.id[:12]} now")
    if sorted(queries.specs) != sorted(engine.specs):
        differ.append(f"tracked modules: {len(queries.specs)} there ({', '.join(sorted(queries.specs)[:2])}, ...), "
                      f"{len(engine.specs)} now ({', '.join(sorted(engine.specs)[:2])}, ...)")
    if not engine.same_weights_as(queries.meta):
        seed = f" (seed: {theirs['seed']!r} there, {source['seed']!r} now)" if theirs.get("seed") != source["seed"] else ""
        differ.append(f"weights: fingerprint {str(queries.meta.get('model_fingerprint'))[:12]} there, "
                      f"{engine.fingerprint()[:12]} now{seed}")
    return differ + differences({k: v for k, v in theirs.items() if k not in _NOT_COMPARED},
                                {k: v for k, v in source.items() if k not in _NOT_COMPARED})


def _token_highlights(args, train, tokenizer, documents, per_token, *, lowest: bool) -> dict:
    """``{(doc, query): the doc's most influential tokens for the query}`` for top.json, from
    :func:`pyinf.corpus.token_scores_of`'s ``per_token [Q, k, T]`` of ``documents [Q][k]``: the
    highest positive scores, or with ``lowest`` the most negative."""
    from .scoring import display_token_scores, top_positive

    highlights, token_ids = {}, {}
    for q, per_query in enumerate(documents):
        for i, n in enumerate(per_query):
            if n not in token_ids:  # a document listed for several queries is tokenised once
                token_ids[n] = train[n]["input_ids"].tolist()
            ids = token_ids[n]
            shown = display_token_scores(per_token[q, i], len(ids))
            picked = top_positive(-shown if lowest else shown, args.top_tokens)
            highlights[n, q] = [dict(position=j, token=tokenizer.decode([ids[j]]), score=float(shown[j]))
                                for j in picked]
    return highlights


def _json_number(value) -> Optional[float]:
    """A value for top.json: a float, or None (JSON null) for a NaN, which JSON cannot hold
    (a document that could not be scored alone)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _shown(value: Optional[float]) -> str:
    return f"{value:+.4e}" if value is not None else "       nan"


def _document_row(train, n: int, id_key: str, **values) -> dict:
    """A document as top.json and top_self_influence.json list it: its index (the row of the
    scores), its file line, its id field when the record has one, the values, its text."""
    row = dict(index=n, line=train.line_number(n))
    record = train.record(n)
    if id_key in record:
        row["id"] = record[id_key]
    return dict(row, **values, text=train.text(n))


def cmd_score(args) -> int:
    from . import Factors, Queries, storage
    from .corpus import score_corpus, token_scores_of, top_documents
    from .textdata import JsonlTextDataset

    # with --prepared queries only the factors' id, seed and layers are read: their header,
    # not the ~120 GB of a 7B model's factors in every shard
    factors = (Factors.load_header(args.factors) if args.prepared
               else Factors.load(args.factors, covariances=False))  # covariances: only the fit reads them
    # --prepared queries of some of the factors' layers (prepare --track): score those layers
    prepared = Queries.load(args.prepared, factors) if args.prepared else None
    engine, tokenizer = _engine(args, factors, layers=prepared.module_names if prepared is not None else None)
    train = JsonlTextDataset(args.train, tokenizer, max_length=args.max_length)
    query = JsonlTextDataset(args.queries, tokenizer, max_length=args.max_length, queries=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # what a run killed while saving these left (the join cleans up after the scores' own)
    storage.remove_stale_temporaries(out, names=["queries.safetensors", "top.json", "tokens.safetensors"])
    queries = _load_or_prepare(engine, args, factors, query, out, prepared)
    scores = score_corpus(engine, train, queries, out, chunk_size=args.chunk_size, shard=args.shard,
                          batch_size=args.batch_size, query_batch_size=args.query_batch_size,
                          run_meta=_run_meta(args))
    if scores is None:
        return _shard_pending(args.shard)
    # documents that failed alone have NaN rows (corpus.ChunkedRun): never listed, so never
    # scored again per token, where they would fail again
    scored = int((~scores.isnan().all(1)).sum())
    k, k_low = min(args.top_k, scored), min(args.bottom_k, scored)
    ranked = {"top": top_documents(scores, k)}
    if k_low:  # the documents that most oppose each query's completion
        ranked["bottom"] = top_documents(scores, k_low, lowest=True)
    tokens = {}
    if args.per_token:
        # one pass over the union of every list's documents, each scored against its own query
        both = [sum((ranked[side][q] for side in ranked), []) for q in range(scores.shape[1])]
        per_token = token_scores_of(engine, train, queries, both, batch_size=args.batch_size,
                                    query_batch_size=args.query_batch_size)
        saved, start = {}, 0
        for side, docs in ranked.items():
            width = len(docs[0]) if docs else 0
            part = per_token[:, start:start + width]
            saved[f"{side}_per_token"] = part.contiguous()
            saved[f"{side}_documents"] = torch.tensor(docs, dtype=torch.int64).reshape(len(docs), width)
            tokens[side] = _token_highlights(args, train, tokenizer, docs, part, lowest=side == "bottom")
            start += width
        # kind "query-token-scores": [queries, k, T] per query ("token-scores", before, held
        # [documents, T, queries] of the top documents' union: a reader of that is told)
        storage.save(out / "tokens.safetensors", "query-token-scores", saved,
                     dict(queries=queries.fingerprint, note="top_per_token[q, i, t]: query q, document "
                          "top_documents[q, i], the position t that predicts token t + 1 (bottom_*: the lowest)"))
    else:
        # an earlier run's token scores would no longer belong to this top.json
        (out / "tokens.safetensors").unlink(missing_ok=True)
    top = []
    for q in range(scores.shape[1]):
        entry = dict(query=query.text(q))
        for side, docs in ranked.items():
            rows = []
            for n in docs[q]:
                row = _document_row(train, n, args.id_key, score=_json_number(scores[n, q]))
                if args.per_token:
                    row["tokens"] = tokens[side][n, q]
                rows.append(row)
            entry[side] = rows
        top.append(entry)
    storage.write_text_atomic(out / "top.json", json.dumps(top, indent=1))  # shards may write it at once
    for entry in top:
        print(f"\nquery: {entry['query'][:100]!r}")
        for side in ranked:
            for row in entry[side][: min(5, k if side == "top" else k_low)]:
                line = f"  {_shown(row['score'])}  #{row['index']:<6d} {row['text'][:90]!r}"
                if row.get("tokens"):
                    line += "  tokens: " + ", ".join(repr(t["token"]) for t in row["tokens"][:3])
                print(line)
            if side == "top" and "bottom" in ranked:
                print("  ...")
    print(f"\npyinf: scores {tuple(scores.shape)} -> {out / 'scores.safetensors'}, top {k}"
          + (f" and bottom {k_low}" if k_low else "") + f" -> {out / 'top.json'}"
          + (f", token scores of those documents -> {out / 'tokens.safetensors'}" if args.per_token else ""))
    return 0


def cmd_self_influence(args) -> int:
    from . import Factors, storage
    from .corpus import self_influence_corpus, top_documents
    from .textdata import JsonlTextDataset

    factors = Factors.load(args.factors, covariances=False)  # only the fit reads them
    engine, tokenizer = _engine(args, factors)
    train = JsonlTextDataset(args.train, tokenizer, max_length=args.max_length)
    out = Path(args.out)
    values = self_influence_corpus(engine, train, factors, out, damping=args.damping, chunk_size=args.chunk_size,
                                   shard=args.shard, batch_size=args.batch_size,
                                   run_meta=_run_meta(args))
    if values is None:
        return _shard_pending(args.shard)
    storage.remove_stale_temporaries(out, names=["top_self_influence.json"])  # a killed run's
    k = min(args.top_k, values.shape[0])
    # NaN (a document that fails alone) last, not first as topk would have it
    (index,) = top_documents(values[:, None], k)
    rows = [_document_row(train, i, args.id_key, self_influence=_json_number(values[i])) for i in index]
    storage.write_text_atomic(out / "top_self_influence.json", json.dumps(rows, indent=1))
    print("highest self-influence (the documents the model finds hardest to fit: outliers, mislabeled text):")
    for row in rows[:5]:
        print(f"  {_shown(row['self_influence'])}  #{row['index']:<6d} {row['text'][:90]!r}")
    print(f"\npyinf: self-influence {tuple(values.shape)} -> {out / 'self_influence.safetensors'}, top {k} -> "
          f"{out / 'top_self_influence.json'}")
    return 0


def cmd_info(args) -> int:
    """Describes every file named; one that cannot be read is reported (on stderr, as
    `pyinf: error:` lines are) and the rest are still described: exit status 1 if any failed."""
    from . import storage

    failed = 0
    for path in args.files:
        try:
            info = storage.describe(path)
        except (ValueError, OSError) as exc:  # CorruptFileError is a ValueError
            print(f"pyinf: error: {exc}", file=sys.stderr)
            failed += 1
            continue
        tensors = info.pop("tensors")
        print(json.dumps(info, indent=1, default=str))
        shown = list(tensors.items())[: args.max_tensors]
        for name, t in shown:
            print(f"  {name}: {t['dtype']} {t['shape']}")
        if len(tensors) > len(shown):
            print(f"  ... {len(tensors) - len(shown)} more tensors")
    return 1 if failed else 0


def cmd_demo(args) -> int:
    from .demo.run import run_demo

    run_demo(out_dir=args.out, quick=args.quick, backend=args.backend, seed=args.seed,
             progress=False if args.no_progress else None)
    return 0


def cmd_backends(args) -> int:
    from .ops import available_backends

    available = available_backends()
    for name, reason in available.items():
        status = "available" if reason is None else reason
        if name == "triton" and reason is None and not torch.cuda.is_available() \
                and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            status = "importable; runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (slow)"
        print(f"{name:7s} {status}")
    if available.get("native") is None:
        from . import _C

        if _C.cuda_compiled():
            sm90 = ("compiled, opt-in PYINF_NATIVE_SM90=1" if _C.cuda_sm90_compiled()
                    else "not built (needs 90a, nvcc 12.3+ and the CUTLASS headers)")
            print(f"        CUDA kernels for {_C.cuda_archs()}; Hopper factored_scores kernel: {sm90}")
        else:
            print("        CPU kernels only (built without CUDA)")
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
    fit.add_argument("--max-examples", type=int, default=None, help="fit on this many documents: the first ones, "
                     "or with --sample-seed a uniform sample")
    fit.add_argument("--sample-seed", type=int, default=None, help="draw the --max-examples documents at random "
                     "(uniformly, kept in file order) with this seed")
    fit.add_argument("--refit", action="store_true", help="fit even when --out holds the factors of this very fit "
                     "(the same model, data and settings; by default a rerun then does nothing)")
    fit.add_argument("--eigh-workers", type=int, default=None, help="eigendecompositions run at once, each on "
                     "its own CUDA stream on a GPU (default $PYINF_EIGH_WORKERS, else the measured count on a GPU, else 1)")
    fit.add_argument("--work-dir", default=None, help="where the fit's stages are saved, so that a rerun resumes "
                     "(default: OUT.parts; removed once the factors are written)")
    fit.add_argument("--shard", type=_shard, default=None, metavar="K/N", help="fit on shard K of N (from 0) of "
                     "the documents; shards share --work-dir and shard 0 writes the factors; auto: the rank and "
                     "process count of the launcher (torchrun, srun, mpirun)")
    fit.add_argument("--no-wait", action="store_true", help="with --shard: exit instead of waiting when another "
                     f"shard's files are still missing, with status {EXIT_RUN_AGAIN} (rerun later to go on)")
    fit.set_defaults(func=cmd_fit)

    prepare = sub.add_parser("prepare", help="prepare query factors once (for sharded or repeated scoring)")
    _add_model_args(prepare)
    prepare.add_argument("--factors", required=True)
    prepare.add_argument("--queries", required=True, help="JSONL, {'prompt': ..., 'completion': ...} per line")
    prepare.add_argument("--out", required=True, help="queries file to write (.safetensors)")
    _add_query_args(prepare)
    prepare.add_argument("--allow-other-weights", action="store_true", help="use factors fitted with other "
                       "weights than --model's (refused by default: the influence would mix two models)")
    prepare.set_defaults(func=cmd_prepare)

    score = sub.add_parser("score", help="score training documents against queries (resumable, shardable)")
    _add_model_args(score)
    score.add_argument("--factors", required=True)
    score.add_argument("--train", required=True, help="JSONL, one {'text': ...} per line")
    score.add_argument("--queries", required=True, help="JSONL, {'prompt': ..., 'completion': ...} per line")
    score.add_argument("--out", required=True, help="output directory (a rerun into it resumes)")
    score.add_argument("--prepared", default=None, help="queries prepared by `pyinf prepare` from --queries "
                       "(their rank, damping and SVD apply; the model's weights must be theirs, in any --dtype; "
                       "default: prepare them, once per output directory)")
    _add_query_args(score)
    score.add_argument("--chunk-size", type=_at_least(1), default=DEFAULT_CHUNK_SIZE, help="documents per saved chunk: "
                       "an interrupted run loses at most one chunk")
    score.add_argument("--shard", type=_shard, default=None, metavar="K/N", help="score only shard K of N "
                       "(from 0) of the chunks; shards share --out, the last to finish joins the scores; auto: the "
                       "rank and process count of the launcher (torchrun, srun, mpirun)")
    score.add_argument("--query-batch-size", type=int, default=None, help="score the queries in groups of this "
                       "many, one pass each, when all their factors do not fit on the device at once")
    score.add_argument("--top-k", type=_at_least(1), default=10, help="documents listed per query in top.json, "
                       "highest scores first")
    score.add_argument("--bottom-k", type=_at_least(0), default=0, help="also list this many lowest-scoring "
                       "documents per query (the most negative: they most oppose the completion)")
    score.add_argument("--per-token", action="store_true", help="per-token scores of each query's listed "
                       "documents (tokens.safetensors, and their most influential tokens in top.json)")
    score.add_argument("--top-tokens", type=_at_least(1), default=5,
                       help="tokens listed per document with --per-token (the most negative for --bottom-k's)")
    score.add_argument("--id-key", default="id", help="a training record's field that top.json copies as the "
                       "document's id when the record has it (each row also gives its index and file line)")
    score.add_argument("--allow-other-weights", action="store_true", help="use factors fitted with other "
                       "weights than --model's (refused by default: the influence would mix two models)")
    score.set_defaults(func=cmd_score)

    self_inf = sub.add_parser("self-influence", help="each training document's self-influence (resumable, "
                              "shardable)")
    _add_model_args(self_inf)
    self_inf.add_argument("--factors", required=True)
    self_inf.add_argument("--train", required=True, help="JSONL, one {'text': ...} per line")
    self_inf.add_argument("--out", required=True, help="output directory (a rerun into it resumes)")
    self_inf.add_argument("--damping", type=float, default=None, help="default: 0.1 x mean(Lambda) per module")
    self_inf.add_argument("--chunk-size", type=_at_least(1), default=DEFAULT_CHUNK_SIZE,
                          help="documents per saved chunk")
    self_inf.add_argument("--shard", type=_shard, default=None, metavar="K/N", help="only shard K of N (from 0) of "
                          "the chunks; shards share --out, the last to finish joins the values; auto: the launcher's "
                          "rank and process count")
    self_inf.add_argument("--top-k", type=_at_least(1), default=10)
    self_inf.add_argument("--id-key", default="id", help="a training record's field copied as the document's id")
    self_inf.add_argument("--allow-other-weights", action="store_true", help="use factors fitted with other "
                       "weights than --model's (refused by default: the influence would mix two models)")
    self_inf.set_defaults(func=cmd_self_influence)

    merge = sub.add_parser("merge-factors", help="one factors file from fits of disjoint groups of layers "
                           "(fit --track, a group per run, when one fit of every layer does not fit on the GPU)")
    merge.add_argument("parts", nargs="+", help="factors files, fitted on the same data with the same settings")
    merge.add_argument("--out", required=True)
    merge.add_argument("--force", action="store_true", help="replace --out if it exists")
    merge.set_defaults(func=cmd_merge_factors)

    info = sub.add_parser("info", help="what a saved pyinf file holds (kind, versions, settings, run "
                          "fingerprints, tensor shapes), from its header")
    info.add_argument("files", nargs="+")
    info.add_argument("--max-tensors", type=int, default=12, help="tensors listed per file")
    info.set_defaults(func=cmd_info)

    backends = sub.add_parser("backends", help="which kernel backends can run here")
    backends.set_defaults(func=cmd_backends)
    return parser


def run(argv: Optional[List[str]] = None) -> int:
    """The command line, raising what goes wrong (for callers and tests)."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"pyinf: warning: {str(message).removeprefix('pyinf: ')}\n"


def _stop_on_sigterm():
    """SIGTERM (how Slurm and Kubernetes preempt a job, before SIGKILL) stops the command as
    Ctrl-C does, so the file being saved is removed rather than left as a hidden temporary of
    up to the size of a corpus's scores; Python's default would end the process on the spot.
    Returns what tells whether it came (``restore=True`` puts the previous handler back)."""
    import signal

    came = []

    def on_sigterm(signum, frame):
        came.append(signum)
        raise KeyboardInterrupt

    try:
        before = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread (main() called from a thread): Python's default stays
        before = None

    def came_and_restore(restore: bool = False) -> bool:
        if restore and before is not None:
            signal.signal(signal.SIGTERM, before)
        return bool(came)
    return came_and_restore


def main(argv: Optional[List[str]] = None) -> int:
    """The ``pyinf`` command: :func:`run`, with a user's mistake (a missing file, a bad record,
    a mismatched run, an unavailable backend) printed as one line and exit status 1 instead of
    a traceback; ``PYINF_TRACEBACK=1`` shows the traceback. Warnings are lines too,
    ``pyinf: warning: ...``, without Python's source line."""
    from .capture import CaptureError
    from .ops import BackendUnavailable
    from .textdata import MissingDependency

    python_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    terminated = _stop_on_sigterm()
    try:
        return run(argv)
    except KeyboardInterrupt:
        if os.environ.get("PYINF_TRACEBACK", "") not in ("", "0"):
            raise
        # what was saved stays (stages, chunks, each written whole): the same command resumes,
        # and the file being saved when the signal came is removed (storage.atomic_path)
        how = "terminated (SIGTERM)" if terminated() else "interrupted"
        print(f"\npyinf: {how}; rerun the same command to go on from what was saved", file=sys.stderr)
        return 143 if terminated() else 130  # 128 + the signal, as a shell reports it
    except BrokenPipeError:
        # the reader went away (`pyinf info ... | head`): nothing left to print to, and no error
        # of pyinf's; stdout is pointed at /dev/null so that Python's own flush at exit is quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a writer killed by it
    except (ValueError, OSError, re.error, BackendUnavailable, CaptureError, FloatingPointError,
            MissingDependency) as exc:
        if os.environ.get("PYINF_TRACEBACK", "") not in ("", "0"):
            raise
        notes = "".join(f"\n{note}" for note in getattr(exc, "__notes__", ()))  # e.g. the batch it happened in
        print(f"pyinf: error: {exc}{notes}\n(PYINF_TRACEBACK=1 shows where it came from)", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = python_format
        terminated(restore=True)


if __name__ == "__main__":
    sys.exit(main())
