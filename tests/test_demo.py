"""The built-in demo: corpus invariants, and one quick end-to-end run whose saved report is
checked against the raw score matrix it contains."""
import argparse
import io
import json
import math

import numpy as np
import pytest

from pyinf.demo import add_demo_arguments, run_demo
from pyinf.demo.corpus import build_corpus
from pyinf.demo.report import highlight


# --------------------------------------------------------------------------- corpus


def test_corpus_is_deterministic_and_seeded():
    a, b, c = build_corpus(0, quick=True), build_corpus(0, quick=True), build_corpus(1, quick=True)
    assert [d.text for d in a.documents] == [d.text for d in b.documents]
    assert [d.text for d in a.documents] != [d.text for d in c.documents]


def test_factual_answers_appear_only_in_their_fact_documents():
    corpus = build_corpus(0)
    for q in (q for q in corpus.queries if q.kind == "factual"):
        holders = [d for d in corpus.documents if q.answer in d.text.split()]
        assert len(holders) == 3  # the three wordings of that one fact
        assert all(d.entity == q.entity and d.attribute == q.attribute for d in holders)


def test_reasoning_queries_use_numbers_no_training_document_has():
    corpus = build_corpus(0)
    texts = [d.text for d in corpus.documents]
    for q in (q for q in corpus.queries if q.kind == "reasoning"):
        assert not any(q.prompt in t for t in texts), q.prompt


def test_tokenizer_round_trip_and_padding_id():
    corpus = build_corpus(0, quick=True)
    tok = corpus.tokenizer
    assert tok.itos[0] == "<pad>" and tok.pad_id == 0
    for d in corpus.documents[:20]:
        assert tok.decode(d.ids[1:-1]).split() == d.text.split()
    assert corpus.max_len <= 48


def test_highlight_colour_only_when_asked():
    pieces, scores, top = ["The", " capital", " is", " Namar"], [0.1, -0.9, 0.2, 1.0], [3, 2]
    assert highlight(pieces, scores, top, color=False) == "The capital [is] [Namar]"
    coloured = highlight(pieces, scores, top, color=True)
    assert "\x1b[" in coloured and "Namar" in coloured


def test_cli_arguments():
    args = add_demo_arguments(argparse.ArgumentParser()).parse_args(
        ["--out", "x", "--quick", "--seed", "3", "--backend", "torch", "--no-progress"])
    assert (args.out, args.quick, args.seed, args.backend, args.no_progress) == ("x", True, 3, "torch", True)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    metrics = run_demo(out_dir=str(out), quick=True, seed=0, progress=False, stream=printed)
    results = json.loads((out / "results.json").read_text())
    return out, metrics, results, printed.getvalue()


def test_report_files_written(quick_run):
    out, metrics, results, printed = quick_run
    for name in ("report.md", "report.html", "results.json"):
        assert (out / name).stat().st_size > 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left
    n_docs, n_queries = metrics["n_documents"], metrics["n_queries"]
    scores = np.array(results["scores"])
    assert scores.shape == (n_docs, n_queries) and np.isfinite(scores).all()
    assert len(results["self_influence"]) == n_docs and min(results["self_influence"]) > 0
    # Not a terminal: no ANSI escapes, top tokens marked with brackets instead.
    assert "\x1b[" not in printed and "FACTUAL query" in printed and "REASONING query" in printed


def test_factual_queries_find_their_fact_documents(quick_run):
    """The paper's first check, recomputed from the raw scores in results.json: the
    documents stating a factual query's answer rank on top of its scores."""
    _, metrics, results, _ = quick_run
    scores, docs, queries = np.array(results["scores"]), results["documents"], results["queries"]
    k = metrics["k"]
    hits = 0
    for qi, q in enumerate(queries):
        if q["kind"] != "factual":
            continue
        top = np.argsort(-scores[:, qi])[:k]
        hits += any(docs[n].get("entity") == q["entity"] and docs[n].get("answer") == q["answer"] for n in top)
        assert q["top"][0]["doc"] == int(top[0])  # the report lists what the scores say
    n_fact = metrics["factual"]["n_queries"]
    assert hits >= 0.8 * n_fact
    assert math.isclose(metrics["factual"]["answer_in_topk_rate"], hits / n_fact)
    # The top answer document's most influential token is mostly the answer word itself.
    assert metrics["factual"]["top_token_is_answer_rate"] >= 0.5


def test_reasoning_queries_draw_on_procedural_documents(quick_run):
    _, metrics, _, _ = quick_run
    assert metrics["reasoning"]["procedural_share_topk"] >= 0.8
    assert metrics["factual"]["procedural_share_topk"] <= 0.5
    assert metrics["reasoning"]["same_task_share_topk"] > 1 / 3  # better than a random task


def test_metrics_are_well_formed(quick_run):
    _, metrics, _, _ = quick_run
    for kind in ("factual", "reasoning"):
        c = metrics[kind]["concentration"]
        assert 0 < c["top1pct_share"] <= c["top10pct_share"] <= 1
        assert 0 <= c["gini"] <= 1
    for key, value in metrics["correlation"].items():
        values = value.values() if isinstance(value, dict) else [value]
        assert all(v is None or -1 <= v <= 1 for v in values), key
    assert metrics["accuracy"]["factual_accuracy"] >= 0.8  # the model did learn the facts
    assert set(metrics["timings"]) >= {"train", "fit_factors", "prepare_queries", "score", "self_influence"}
