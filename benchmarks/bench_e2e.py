"""End to end: pyinf against kronfluence 1.0.1 on one model, one data set, one device.

A Pythia-160M-shaped GPT-NeoX (``transformers.GPTNeoXConfig``, random weights, nothing is
downloaded), MLP linear layers tracked (``dense_h_to_4h`` and ``dense_4h_to_h``; 24 modules
at full size). Both libraries fit EK-FAC factors (empirical Fisher) on the same documents,
then score the same queries with rank-r query factors and damping 0.1 x mean(Lambda).

Reported: seconds and documents/s for fitting and for scoring, peak GPU memory, the
per-query Pearson correlation between the score matrices (pyinf against kronfluence, and a
bf16 pyinf run against pyinf's own float32 run of a float32 copy of the model), and as the
floor the plain forward+backward time of the same model over the same documents (a training
step, and a forward plus an input-gradient-only backward). Scaling runs (pyinf) grow
documents, sequence length, queries and rank one at a time.
"""
from __future__ import annotations

import copy
import gc
import math
import tempfile
import time
from dataclasses import replace
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils import data

from . import WallTimer, default_device, until_out_of_time
from .shapes import E2EWorkload, ModelConfig, ScalingPlan

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
# kronfluence's precision preset of the same precision as a workload dtype (it has none for fp16)
KRONFLUENCE_PRECISION = {"bfloat16": "bf16", "float32": "fp32"}


def kronfluence_precision(dtype: str) -> str:
    """The preset kronfluence runs a workload of `dtype` with: the same precision, else fp32."""
    return KRONFLUENCE_PRECISION.get(dtype, "fp32")


# --------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------
def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A GPT-NeoX with random weights (transformers' own initialisation), SDPA attention."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    config = GPTNeoXConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                           num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
                           vocab_size=cfg.vocab_size, rotary_pct=cfg.rotary_pct,
                           max_position_embeddings=cfg.max_position_embeddings, use_cache=False,
                           hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    except (TypeError, ValueError):
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model.to(device=device, dtype=dtype)


def tracked_module_names(cfg: ModelConfig) -> List[str]:
    return [f"gpt_neox.layers.{i}.mlp.{name}" for i in range(cfg.num_hidden_layers)
            for name in ("dense_h_to_4h", "dense_4h_to_h")]


class ListDataset(data.Dataset):
    def __init__(self, items):
        self.items = list(items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def make_documents(n: int, length: int, vocab: int, seed: int) -> ListDataset:
    """Training documents: uniform random tokens, every token labelled."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    return ListDataset({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids)


def make_queries(n: int, length: int, vocab: int, seed: int) -> ListDataset:
    """Queries: a prompt (first half, labels -100) and a completion (second half)."""
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    out = []
    for x in ids:
        labels = x.clone()
        labels[: length // 2] = -100
        out.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels})
    return ListDataset(out)


def _collate(examples):
    from pyinf.task import pad_collate

    return pad_collate(examples)


def _to(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _summed_ce(logits, labels):
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------
def pearson_per_query(a: torch.Tensor, b: torch.Tensor) -> List[float]:
    """Pearson correlation of column q of `a` with column q of `b` (both [n_train, n_query])."""
    a, b = a.double().cpu(), b.double().cpu()
    a = a - a.mean(0, keepdim=True)
    b = b - b.mean(0, keepdim=True)
    num = (a * b).sum(0)
    den = a.norm(dim=0) * b.norm(dim=0)
    return [float(x) for x in (num / den.clamp_min(1e-300))]


def _summary(values: Sequence[float]) -> Dict[str, float]:
    v = sorted(values)
    return dict(min=v[0], median=v[len(v) // 2], mean=sum(v) / len(v), max=v[-1]) if v else {}


# --------------------------------------------------------------------------------------
# Floor: the model's own forward + backward over the same documents
# --------------------------------------------------------------------------------------
def floor_times(model: torch.nn.Module, docs: ListDataset, batch_size: int, device: torch.device,
                compiled: bool = False) -> Dict[str, object]:
    """Seconds for (a) a training step (forward + full backward, parameter gradients; no
    optimiser) and (b) a forward plus an input-gradient-only backward, over all documents
    at `batch_size`. `compiled` times (b) only, through torch.compile (compile excluded)."""
    loader = data.DataLoader(docs, batch_size=batch_size, collate_fn=_collate)
    out: Dict[str, object] = dict(batch_size=batch_size, compiled=compiled)
    m = copy.deepcopy(model).to(device)
    emb = m.get_input_embeddings()

    def input_grad_pass(fwd, batch):
        x = emb(batch["input_ids"]).detach().requires_grad_(True)
        logits = fwd(inputs_embeds=x, attention_mask=batch["attention_mask"]).logits
        _summed_ce(logits, batch["labels"]).backward()

    if not compiled:
        for p in m.parameters():
            p.requires_grad_(True)
        first = _to(next(iter(loader)), device)  # warm-up (allocator, cuBLAS handles)
        _summed_ce(m(input_ids=first["input_ids"], attention_mask=first["attention_mask"]).logits, first["labels"]).backward()
        m.zero_grad(set_to_none=True)
        with WallTimer(device) as t:
            for batch in loader:
                batch = _to(batch, device)
                loss = _summed_ce(m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                  batch["labels"])
                loss.backward()
            m.zero_grad(set_to_none=True)
        out["train_step_s"], out["train_step_peak_bytes"] = t.seconds, t.peak_bytes
    for p in m.parameters():
        p.requires_grad_(False)
    fwd = torch.compile(m) if compiled else m
    input_grad_pass(fwd, _to(next(iter(loader)), device))  # warm-up (and compilation)
    with WallTimer(device) as t:
        for batch in loader:
            input_grad_pass(fwd, _to(batch, device))
    out["fwd_inputgrad_s"], out["fwd_inputgrad_peak_bytes"] = t.seconds, t.peak_bytes
    if not compiled:
        # The same pass with the loss pyinf's e2e runs use (CausalLMTask(fused_head=True):
        # pyinf.fused_ce from the final hidden states, no fp32 logits): the floor its scoring
        # time is held against.
        from pyinf.fused_ce import linear_cross_entropy

        head = m.get_output_embeddings()

        def fused_pass(batch):  # CausalLMTask(fused_head=True)'s loss (task.py), from inputs_embeds
            x = emb(batch["input_ids"]).detach().requires_grad_(True)
            hidden = m.base_model(inputs_embeds=x, attention_mask=batch["attention_mask"]).last_hidden_state
            labels = batch["labels"][:, 1:].reshape(-1)
            linear_cross_entropy(hidden[:, :-1].reshape(-1, hidden.shape[-1]), head.weight, labels,
                                 getattr(head, "bias", None)).backward()

        fused_pass(_to(next(iter(loader)), device))  # warm-up
        with WallTimer(device) as t:
            for batch in loader:
                fused_pass(_to(batch, device))
        out["fwd_inputgrad_fused_s"], out["fwd_inputgrad_fused_peak_bytes"] = t.seconds, t.peak_bytes
    del m, fwd
    _free(device)
    return out


# --------------------------------------------------------------------------------------
# kronfluence
# --------------------------------------------------------------------------------------
def kronfluence_arguments(wl: E2EWorkload, precision: str):
    """FactorArguments / ScoreArguments for kronfluence 1.0.1 on this workload (see
    :func:`pyinf.kronfluence_compat.kronfluence_arguments`): damping None (0.1 x mean(Lambda),
    kronfluence's heuristic), every query in one pass."""
    from pyinf.kronfluence_compat import kronfluence_arguments as arguments

    return arguments(fisher=wl.fisher, rank=wl.rank, damping=None, precision=precision,
                     full_svd=wl.kronfluence_full_svd,
                     query_accumulation_steps=max(1, math.ceil(wl.n_queries / wl.query_batch_size)))


def run_kronfluence(model: torch.nn.Module, wl: E2EWorkload, docs, queries, batch_size: int, device: torch.device,
                    precision: str, log=print) -> Dict[str, object]:
    from pyinf.kronfluence_compat import run_kronfluence as run
    from pyinf.task import CausalLMTask

    names = tracked_module_names(wl.model)
    fa, sa = kronfluence_arguments(wl, precision)
    kmodel = copy.deepcopy(model).to(device)  # the master copy stays on the CPU
    if precision == "fp32":
        kmodel = kmodel.float()
    result = run(kmodel, CausalLMTask(tracked_modules=names), names, docs, queries, factor_args=fa, score_args=sa,
                 batch_size=batch_size, query_batch_size=wl.query_batch_size, collate_fn=_collate,
                 timer=lambda: WallTimer(device), copy_model=False)  # kmodel is this run's own copy
    out: Dict[str, object] = dict(library="kronfluence", precision=precision, batch_size=batch_size,
                                  factor_args=fa.to_str_dict(), score_args=sa.to_str_dict(),
                                  fit_s=result.fit_seconds, fit_peak_bytes=result.fit_peak_bytes,
                                  score_s=result.score_seconds, score_peak_bytes=result.score_peak_bytes,
                                  scores=result.scores)
    del kmodel, result
    _free(device)
    log(f"[e2e] kronfluence {precision} batch {batch_size}: fit {out['fit_s']:.2f} s, score {out['score_s']:.2f} s")
    return out


# --------------------------------------------------------------------------------------
# pyinf
# --------------------------------------------------------------------------------------
def pyinf_available() -> Optional[str]:
    """None when the engine can be imported, else why not."""
    try:
        from pyinf import CausalLMTask, InfluenceEngine  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _pyinf_engine(model, wl: E2EWorkload, backend: str = "auto", compile: bool = False, checkpoint: bool = False):
    from pyinf import CausalLMTask, InfluenceEngine

    # fused_head: the loss comes from the final hidden states without fp32 [tokens, vocab]
    # logits (pyinf.fused_ce), the configuration pyinf is meant to run large vocabularies in.
    task = CausalLMTask(tracked_modules=tracked_module_names(wl.model), fused_head=True)
    return InfluenceEngine(model, task, backend=backend, progress=False, compile=compile, checkpoint=checkpoint)


def _time_chunked(engine, docs, qs, scores, batch_size: int, device: torch.device) -> Dict[str, object]:
    """The same scores through the resumable path (pyinf.score_corpus: 4 chunks, each hashed,
    scored and saved to disk, then joined): what crash safety and sharding cost."""
    from pyinf import score_corpus

    n = len(docs)
    chunk = math.ceil(math.ceil(n / 4) / batch_size) * batch_size  # a quarter, rounded up to whole batches
    with tempfile.TemporaryDirectory(prefix="pyinf-bench-chunks-") as tmp:
        with WallTimer(device) as t:
            chunked = score_corpus(engine, docs, qs, tmp, chunk_size=chunk, batch_size=batch_size, log=lambda *_: None)
    diff = float((chunked.float() - scores.float()).abs().max() / scores.float().abs().max().clamp_min(1e-30))
    return dict(chunk_size=chunk, chunks=math.ceil(n / chunk), seconds=t.seconds, max_rel_diff=diff)


def run_pyinf(model: torch.nn.Module, wl: E2EWorkload, docs, queries, batch_size: int, device: torch.device,
              backend: str = "auto", compile: bool = False, checkpoint: bool = False, chunked: bool = False,
              log=print) -> Dict[str, object]:
    engine = _pyinf_engine(copy.deepcopy(model).to(device), wl, backend, compile, checkpoint)
    out: Dict[str, object] = dict(library="pyinf", precision=wl.dtype, batch_size=batch_size, backend=backend,
                                  compile=compile, checkpoint=checkpoint)
    with WallTimer(device) as t:
        factors = engine.fit_factors(docs, fisher=wl.fisher, batch_size=batch_size, seed=wl.seed)
    out["fit_s"], out["fit_peak_bytes"] = t.seconds, t.peak_bytes
    out["fit_phases_s"] = dict(factors.meta.get("seconds", {}))  # covariance pass, eigh, Lambda pass
    out["eigh_workers"] = factors.meta.get("eigh_workers")
    with WallTimer(device) as t:
        with WallTimer(device) as tq:
            qs = engine.prepare_queries(queries, factors, rank=wl.rank, damping=None, batch_size=wl.query_batch_size,
                                        svd="full" if wl.kronfluence_full_svd else "randomized")
        scores = engine.pairwise_scores(docs, qs, batch_size=batch_size)
    out["score_s"], out["score_peak_bytes"] = t.seconds, t.peak_bytes
    out["prepare_queries_s"] = tq.seconds
    out["pairwise_s"] = t.seconds - tq.seconds
    out["scores"] = scores.float().cpu()
    if chunked:
        out["chunked"] = _time_chunked(engine, docs, qs, out["scores"], batch_size, device)
        log(f"[e2e] pyinf resumable scoring, {out['chunked']['chunks']} chunks: {out['chunked']['seconds']:.2f} s "
            f"(one call: {out['pairwise_s']:.2f} s)")
    del engine, factors, qs
    _free(device)
    phases = ", ".join(f"{k} {v:.2f}" for k, v in out["fit_phases_s"].items())
    log(f"[e2e] pyinf{' compiled' if compile else ''}{' checkpointed' if checkpoint else ''} {wl.dtype} batch {batch_size}: fit {out['fit_s']:.2f} s ({phases}), score {out['score_s']:.2f} s "
        f"(queries {out['prepare_queries_s']:.2f} s)")
    return out


def _warm_up(model, wl: E2EWorkload, docs, queries, device, with_pyinf: bool, with_kronfluence: bool = True,
             log=print):
    """One small untimed pass of each library (CUDA context, cuBLAS, Triton JIT/autotune
    for the batch shapes), so that the timed runs measure steady state. A library that fails
    here (kronfluence missing a dependency on the GPU machine) is logged, not raised: the
    other library's runs must still happen."""
    if device.type != "cuda":
        return
    # every query: the scoring kernels specialise on the query count (Triton compiles an int
    # divisible by 16 apart), so fewer queries here would leave a compile in the timed run
    small = replace(wl, n_docs=min(wl.n_docs, 2 * max(wl.batch_sizes)))
    sd = ListDataset(docs.items[: small.n_docs])
    for bs in wl.batch_sizes:
        if with_pyinf:
            try:
                run_pyinf(model, small, sd, queries, bs, device, log=lambda *_: None)
            except Exception as exc:
                log(f"[e2e] pyinf warm-up failed: {type(exc).__name__}: {exc}")
        if with_kronfluence:
            try:
                run_kronfluence(model, small, sd, queries, bs, device, kronfluence_precision(wl.dtype),
                                log=lambda *_: None)
            except Exception as exc:
                log(f"[e2e] kronfluence warm-up failed: {type(exc).__name__}: {exc}")


def _guarded(_runs, _result, _what, _log, _device, _fn, *args, **kwargs):
    """Run one library run; a failure (an OOM, a library error) is recorded, not raised."""
    try:
        _runs.append(_fn(*args, **kwargs))
    except Exception as exc:
        _result["skipped"].append(dict(what=_what, reason=f"failed: {type(exc).__name__}: {exc}"[:500]))
        _log(f"[e2e] {_what} FAILED: {type(exc).__name__}: {exc}")
        _free(_device)


def _strip(rec: Dict[str, object]) -> Dict[str, object]:
    return {k: v for k, v in rec.items() if k != "scores"}


def run_e2e(wl: E2EWorkload, device: Optional[torch.device] = None, *, log=print, with_pyinf: bool = True,
            with_kronfluence: bool = True, with_floor: bool = True) -> Dict[str, object]:
    device = device or default_device()
    dtype = DTYPES[wl.dtype]
    # The master copy stays on the CPU; every run moves its own copy to the device, so that
    # a run's peak memory counts its own model copy and nothing else of the benchmark's.
    model = build_model(wl.model, dtype, torch.device("cpu"), wl.seed)
    docs = make_documents(wl.n_docs, wl.doc_len, wl.model.vocab_size, wl.seed)
    queries = make_queries(wl.n_queries, wl.query_len, wl.model.vocab_size, wl.seed)
    result: Dict[str, object] = dict(workload=wl.to_dict(), tracked_modules=len(tracked_module_names(wl.model)),
                                     runs=[], floor=[], pearson=[], skipped=[])
    why_not = pyinf_available() if with_pyinf else "disabled"
    if why_not is not None:
        result["skipped"].append(dict(what="pyinf", reason=why_not))
        log(f"[e2e] pyinf skipped: {why_not}")
    runs: List[Dict[str, object]] = []
    # Most important first: if the step's time limit stops the section (OutOfTime), what ran
    # is kept and reported, and the rest is listed as not run.
    with until_out_of_time(result["skipped"], what="the rest of the e2e section"):
        _warm_up(model, wl, docs, queries, device, why_not is None, with_kronfluence, log)
        _library_runs(model, wl, docs, queries, device, runs, result, log, with_pyinf=why_not is None,
                      with_kronfluence=with_kronfluence)
        if with_floor:
            _floor_runs(model, wl, docs, device, result, log)
        if why_not is None and wl.pyinf_fp32 and dtype != torch.float32:
            # pyinf's own float32 run (factors, queries and scores in float32 from a float32
            # copy of the model): the accuracy reference of the bf16 runs. Not warmed up: its
            # time includes the float32 kernels' compilation and is no speed figure.
            _guarded(runs, result, "pyinf float32", log, device, run_pyinf, copy.deepcopy(model).float(),
                     replace(wl, dtype="float32"), docs, queries, wl.batch_sizes[0], device, log=log)
        # Then what compiles or only adds detail: a short session loses these first.
        _option_runs(model, wl, docs, queries, device, runs, result, log, with_pyinf=why_not is None,
                     with_kronfluence=with_kronfluence)
        if with_floor and wl.compile_floor and device.type == "cuda":
            _compiled_floor(model, docs, device, result, log)
    for r in runs:
        r["fit_docs_per_s"] = wl.n_docs / r["fit_s"]
        r["score_docs_per_s"] = wl.n_docs / r["score_s"]
    result["pearson"] = score_agreement(runs)
    for p in result["pearson"]:
        log(f"[e2e] pearson {p['run']} vs {p['against']}: min {p['min']:.4f} mean {p['mean']:.4f}")
    result["runs"] = [_strip(r) for r in runs]
    del model
    _free(device)
    return result


def run_label(r: Dict[str, object]) -> str:
    """A run's name in the agreement table: library, precision, batch and options."""
    return (f"{r['library']} {r['precision']} b{r['batch_size']}" + (" compiled" if r.get("compile") else "")
            + (" checkpoint" if r.get("checkpoint") else ""))


def score_agreement(runs: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """Per-query Pearson correlations of score matrices: every pyinf run against every
    kronfluence run (same model, data and settings), every reduced-precision pyinf run
    against pyinf's float32 run (issue 5 asks >= 0.99 against both), and kronfluence's
    first run against its others (batch size, precision: its own noise floor)."""
    pyinf = [r for r in runs if r["library"] == "pyinf"]
    kf = [r for r in runs if r["library"] == "kronfluence"]
    fp32 = [r for r in pyinf if r["precision"] == "float32"]
    pairs = [(a, b, "kronfluence") for a in pyinf for b in kf]
    pairs += [(a, fp32[0], "pyinf float32") for a in pyinf if fp32 and a is not fp32[0]]
    pairs += [(kf[0], b, "kronfluence itself") for b in kf[1:]]
    out = []
    for a, b, kind in pairs:
        per_q = pearson_per_query(a["scores"], b["scores"])
        out.append(dict(run=run_label(a), against=run_label(b), kind=kind, per_query=per_q, **_summary(per_q)))
    return out


def _library_runs(model, wl: E2EWorkload, docs, queries, device, runs, result, log, *, with_pyinf: bool,
                  with_kronfluence: bool) -> None:
    """pyinf and kronfluence at each batch size, each appended to `runs` when it finishes."""
    kf_precision = kronfluence_precision(wl.dtype)
    for bs in wl.batch_sizes:
        if with_pyinf:
            _guarded(runs, result, f"pyinf batch {bs}", log, device, run_pyinf, model, wl, docs, queries, bs, device,
                     chunked=bs == wl.batch_sizes[0], log=log)
        if with_kronfluence:
            _guarded(runs, result, f"kronfluence batch {bs}", log, device, run_kronfluence, model, wl, docs, queries,
                     bs, device, kf_precision, log=log)


def _option_runs(model, wl: E2EWorkload, docs, queries, device, runs, result, log, *, with_pyinf: bool,
                 with_kronfluence: bool) -> None:
    """pyinf compiled and checkpointed, then kronfluence's float32 defaults."""
    if with_pyinf and wl.pyinf_compiled_batch and device.type == "cuda":
        # Compilation happens in an untimed warm-up on a few batches of the same shapes
        # (its wall time is reported on its own); the timed run is the steady state.
        bs = wl.pyinf_compiled_batch
        small = replace(wl, n_docs=2 * bs)  # every query, as in _warm_up
        t0 = time.perf_counter()
        warm: List[Dict[str, object]] = []
        _guarded(warm, result, f"pyinf compiled warm-up batch {bs}", log, device, run_pyinf, model, small,
                 ListDataset(docs.items[: small.n_docs]), queries, bs, device, compile=True, log=lambda *_: None)
        result["pyinf_compile_warmup_s"] = time.perf_counter() - t0
        if warm:
            _guarded(runs, result, f"pyinf compiled batch {bs}", log, device, run_pyinf, model, wl, docs, queries, bs,
                     device, compile=True, log=log)
    if with_pyinf and wl.pyinf_checkpoint_batch:
        # Activation checkpointing at 4x kronfluence's smallest batch: the memory goal's run.
        _guarded(runs, result, f"pyinf checkpoint batch {wl.pyinf_checkpoint_batch}", log, device, run_pyinf, model,
                 wl, docs, queries, wl.pyinf_checkpoint_batch, device, checkpoint=True, log=log)
    if with_kronfluence and wl.kronfluence_fp32 and wl.dtype != "float32":
        _guarded(runs, result, "kronfluence fp32", log, device, run_kronfluence, model, wl, docs, queries,
                 wl.batch_sizes[0], device, "fp32", log=log)


def _floor_runs(model, wl: E2EWorkload, docs, device, result, log) -> None:
    """The model's own passes over the documents at each floor batch size, appended to
    ``result["floor"]``."""
    for bs in wl.floor_batch_sizes:
        try:
            f = floor_times(model, docs, bs, device)
        except Exception as exc:
            result["skipped"].append(dict(what=f"floor batch {bs}", reason=f"failed: {type(exc).__name__}: {exc}"[:500]))
            _free(device)
            continue
        result["floor"].append(f)
        log(f"[e2e] floor batch {bs}: train step {f['train_step_s']:.2f} s, fwd+input-grad {f['fwd_inputgrad_s']:.2f} s "
            f"(fused head {f['fwd_inputgrad_fused_s']:.2f} s)")


def _compiled_floor(model, docs, device, result, log) -> None:
    """The forward + input-gradient pass at batch 32 under torch.compile (compilation excluded)."""
    try:
        f = floor_times(model, docs, 32, device, compiled=True)
        result["floor"].append(f)
        log(f"[e2e] floor batch 32 compiled: fwd+input-grad {f['fwd_inputgrad_s']:.2f} s")
    except Exception as exc:
        result["skipped"].append(dict(what="compiled floor", reason=f"{type(exc).__name__}: {exc}"[:500]))


# --------------------------------------------------------------------------------------
# Scaling (pyinf): one axis at a time
# --------------------------------------------------------------------------------------
def run_scaling(plan: ScalingPlan, device: Optional[torch.device] = None, *, log=print,
                axes: Sequence[str] = ("n_docs", "doc_len", "n_queries", "rank")) -> Dict[str, object]:
    """For each point: pyinf fit time (document axes), query preparation and pairwise
    scoring time, and the peak memory of each phase. Factors for the query axes are
    fitted once at the base point."""
    device = device or default_device()
    why_not = pyinf_available()
    if why_not is not None:
        log(f"[scaling] skipped: {why_not}")
        return dict(points=[], skipped=[dict(what="scaling", reason=why_not)])
    base = plan.base
    model = build_model(base.model, DTYPES[base.dtype], torch.device("cpu"), base.seed)
    bs = plan.batch_size
    points, skipped = [], []
    base_factors = None
    if device.type == "cuda":  # warm-up
        run_pyinf(model, replace(base, n_docs=2 * bs, n_queries=base.query_batch_size),
                  make_documents(2 * bs, base.doc_len, base.model.vocab_size, 0),
                  make_queries(base.query_batch_size, base.query_len, base.model.vocab_size, 0), bs, device,
                  log=lambda *_: None)
    engine = _pyinf_engine(copy.deepcopy(model).to(device), base)
    t_start = time.perf_counter()
    for axis, value, wl in plan.points():
        if axis not in axes:
            continue
        if time.perf_counter() - t_start > plan.max_seconds:
            skipped.append(dict(what=f"{axis}={value}", reason=f"time budget of {plan.max_seconds:.0f} s spent"))
            continue
        docs = make_documents(wl.n_docs, wl.doc_len, wl.model.vocab_size, wl.seed)
        queries = make_queries(wl.n_queries, wl.query_len, wl.model.vocab_size, wl.seed)
        rec: Dict[str, object] = dict(axis=axis, value=value, n_docs=wl.n_docs, doc_len=wl.doc_len,
                                      n_queries=wl.n_queries, rank=wl.rank)
        try:
            if axis in ("n_docs", "doc_len") or base_factors is None:
                with WallTimer(device) as t:
                    factors = engine.fit_factors(docs, fisher=wl.fisher, batch_size=bs, seed=wl.seed)
                if axis in ("n_docs", "doc_len"):
                    rec["fit_s"], rec["fit_peak_bytes"] = t.seconds, t.peak_bytes
                if base_factors is None and axis not in ("n_docs", "doc_len"):
                    base_factors = factors
            else:
                factors = base_factors
            with WallTimer(device) as t:
                qs = engine.prepare_queries(queries, factors, rank=wl.rank, damping=None,
                                            batch_size=wl.query_batch_size)
            rec["prepare_queries_s"], rec["prepare_queries_peak_bytes"] = t.seconds, t.peak_bytes
            with WallTimer(device) as t:
                engine.pairwise_scores(docs, qs, batch_size=bs)
            rec["pairwise_s"], rec["pairwise_peak_bytes"] = t.seconds, t.peak_bytes
            rec["score_s"] = rec["prepare_queries_s"] + rec["pairwise_s"]
            rec["score_docs_per_s"] = wl.n_docs / rec["score_s"]
            del qs
            if factors is not base_factors:
                del factors
        except Exception as exc:
            skipped.append(dict(what=f"{axis}={value}", reason=f"{type(exc).__name__}: {exc}"[:500]))
            log(f"[scaling] {axis}={value} FAILED: {type(exc).__name__}: {exc}")
            _free(device)
            continue
        points.append(rec)
        log(f"[scaling] {axis}={value}: " + ", ".join(f"{k} {v:.3f}" for k, v in rec.items() if k.endswith("_s")))
        _free(device)
    del engine, model, base_factors
    _free(device)
    return dict(base=base.to_dict(), batch_size=bs, points=points, skipped=skipped)


# --------------------------------------------------------------------------------------
# python -m benchmarks.bench_e2e [--smoke]: the end-to-end part alone
# --------------------------------------------------------------------------------------
if __name__ == "__main__":
    import argparse
    import json

    from .shapes import e2e_workload

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    res = run_e2e(e2e_workload("smoke" if args.smoke else "full"))
    print(json.dumps({k: v for k, v in res.items()}, indent=1, default=str)[:4000])
