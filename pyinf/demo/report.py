"""What the demo concludes from the scores, and how it shows it.

* :func:`analyse` turns the score matrices into the paper's measurements: does a factual
  query's answer appear in its top documents, how concentrated the influence is, how
  reasoning queries of one task correlate, which kinds of documents rank on top.
* :func:`render_terminal` prints a few queries with their top documents, most influential
  tokens highlighted (ANSI colour only on a terminal without ``NO_COLOR``).
* :func:`save_report` writes ``report.md``, ``report.html`` and ``results.json`` atomically.

Token-level influence: the engine gives ``I[n, t, q]`` for input position ``t``, and position
``t`` predicts token ``t + 1``. The demo shows each score on the token its position predicts
(so the answer word of a fact lights up, not the word before it); BOS and EOS are not shown.
"""
from __future__ import annotations

import html
import json
import math
import os
from typing import Dict, List, Optional, Sequence, TextIO

import numpy as np
import torch

from ..scoring import display_token_scores, top_positive
from ..storage import write_text_atomic
from .corpus import TASKS, Corpus

# --------------------------------------------------------------------------- analysis


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denom) if denom > 0 else 0.0


def _gini(values: np.ndarray) -> float:
    """Gini coefficient of non-negative values: 0 = spread evenly, 1 = all on one document."""
    v = np.sort(np.clip(values, 0, None))
    total = v.sum()
    if total <= 0:
        return 0.0
    n = len(v)
    return float((2 * np.arange(1, n + 1) - n - 1).dot(v) / (n * total))


def _concentration(col: np.ndarray) -> Dict[str, float]:
    """Share of the total positive influence held by the top 1% and 10% of documents."""
    pos = np.sort(np.clip(col, 0, None))[::-1]
    total = pos.sum()
    n = len(col)

    def share(frac):
        return float(pos[: max(1, math.ceil(frac * n))].sum() / total) if total > 0 else 0.0

    return {"top1pct_share": share(0.01), "top10pct_share": share(0.10), "gini": _gini(col)}


def _doc_entry(corpus: Corpus, n: int, score: float, tok_col: torch.Tensor, n_top_tokens: int) -> dict:
    doc = corpus.documents[n]
    shown = doc.ids[1:-1]  # without BOS and EOS
    per_tok = display_token_scores(tok_col, len(doc.ids))[1:-1]
    top = top_positive(per_tok, n_top_tokens)
    return {"doc": n, "score": float(score), **doc.meta(),
            "pieces": corpus.tokenizer.display_pieces(shown),
            "token_scores": [round(float(s), 6) for s in per_tok],
            "top_tokens": top}


def analyse(corpus: Corpus, scores: torch.Tensor, tok_scores: torch.Tensor, self_inf: torch.Tensor,
            k: int = 5, n_top_tokens: int = 3) -> Dict[str, object]:
    """Per-query details (top-``k`` documents with token scores) and the summary metrics."""
    S = scores.double().numpy()
    docs, queries = corpus.documents, corpus.queries
    per_query = []
    for qi, q in enumerate(queries):
        col = S[:, qi]
        order = np.argsort(-col, kind="stable")
        entry = {"name": q.name, **q.meta(), **_concentration(col),
                 "top": [_doc_entry(corpus, int(n), col[n], tok_scores[n, :, qi], n_top_tokens) for n in order[:k]]}
        top_docs = [docs[int(n)] for n in order[:k]]
        entry["procedural_share_topk"] = sum(d.kind == "procedural" for d in top_docs) / k
        if q.kind == "factual":
            ranks = [int(r) + 1 for r, n in enumerate(order)
                     if docs[n].kind == "factual" and docs[n].entity == q.entity and docs[n].attribute == q.attribute]
            entry["answer_doc_ranks"] = ranks  # one per wording of the fact, best first
            entry["answer_rank"] = ranks[0]
            entry["answer_in_topk"] = ranks[0] <= k
            entry["same_entity_share_topk"] = sum(d.entity == q.entity for d in top_docs) / k
            entry["rank_by_wording"] = {docs[n].style: int(r) + 1 for r, n in enumerate(order)
                                        if docs[n].entity == q.entity and docs[n].attribute == q.attribute}
            best = entry["top"][0]
            if best.get("answer") == q.answer and best["top_tokens"]:
                # Does the top answer document's most influential token spell the answer?
                shown = corpus.tokenizer.tokens(docs[best["doc"]].ids[1:-1])
                entry["top_token_is_answer"] = shown[best["top_tokens"][0]] == q.answer
        else:
            entry["same_task_share_topk"] = sum(d.task == q.task for d in top_docs) / k
            entry["code_share_topk"] = sum(d.style == "code" for d in top_docs) / k
        per_query.append(entry)
    return {"queries": per_query, "metrics": _summarise(corpus, S, per_query, self_inf.double().numpy(), k)}


def _mean(xs) -> Optional[float]:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else None


def _summarise(corpus: Corpus, S: np.ndarray, per_query: List[dict], self_inf: np.ndarray, k: int) -> dict:
    queries = corpus.queries
    fact = [e for e in per_query if e["kind"] == "factual"]
    reas = [e for e in per_query if e["kind"] == "reasoning"]
    m: Dict[str, object] = {"k": k, "n_documents": len(corpus.documents), "n_queries": len(queries)}

    m["factual"] = {
        "n_queries": len(fact),
        "answer_in_topk_rate": _mean(e["answer_in_topk"] for e in fact),
        "answer_at_top1_rate": _mean(e["answer_rank"] == 1 for e in fact),
        "answer_mrr": _mean(1.0 / e["answer_rank"] for e in fact),
        # Recall of all three answer-bearing documents in the top k.
        "answer_docs_recall_topk": _mean(sum(r <= k for r in e["answer_doc_ranks"]) / len(e["answer_doc_ranks"])
                                         for e in fact),
        "mean_rank_by_wording": {w: _mean(e["rank_by_wording"][w] for e in fact)
                                 for w in fact[0]["rank_by_wording"]} if fact else {},
        "top_token_is_answer_rate": _mean(e["top_token_is_answer"] for e in fact if "top_token_is_answer" in e),
        "procedural_share_topk": _mean(e["procedural_share_topk"] for e in fact),
    }
    m["reasoning"] = {
        "n_queries": len(reas),
        "procedural_share_topk": _mean(e["procedural_share_topk"] for e in reas),
        "same_task_share_topk": _mean(e["same_task_share_topk"] for e in reas),
        "code_share_topk": _mean(e["code_share_topk"] for e in reas),
    }
    for kind, rows in (("factual", fact), ("reasoning", reas)):
        m[kind]["concentration"] = {key: _mean(e[key] for e in rows)
                                    for key in ("top1pct_share", "top10pct_share", "gini")}
    m["correlation"] = _correlations(S, queries)
    m["self_influence_mean_by_kind"] = {kind: _mean(self_inf[i] for i, d in enumerate(corpus.documents) if d.kind == kind)
                                        for kind in ("factual", "procedural")}
    return m


def _correlations(S: np.ndarray, queries) -> dict:
    """Mean Pearson correlation between queries' score vectors over all documents, for
    reasoning pairs of the same task, reasoning pairs across tasks, and factual pairs; plus
    the same for Spearman's rank correlation, which a few extreme documents cannot drive."""
    ranks = np.argsort(np.argsort(S, axis=0, kind="stable"), axis=0).astype(np.float64)
    out: Dict[str, object] = {}
    for name, M in (("", S), ("_spearman", ranks)):
        same, cross, fact = [], [], []
        per_task: Dict[str, List[float]] = {t: [] for t in TASKS}
        for i in range(len(queries)):
            for j in range(i + 1, len(queries)):
                qi, qj = queries[i], queries[j]
                if qi.kind == qj.kind == "reasoning":
                    r = _pearson(M[:, i], M[:, j])
                    (same if qi.task == qj.task else cross).append(r)
                    if qi.task == qj.task:
                        per_task[qi.task].append(r)
                elif qi.kind == qj.kind == "factual":
                    fact.append(_pearson(M[:, i], M[:, j]))
        out.update({f"reasoning_same_task{name}": _mean(same), f"reasoning_cross_task{name}": _mean(cross),
                    f"factual_pairs{name}": _mean(fact),
                    f"reasoning_same_task_by_task{name}": {t: _mean(v) for t, v in per_task.items()}})
    return out


# --------------------------------------------------------------------------- terminal


def use_color(stream: TextIO) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


_TOP1 = "\x1b[1;30;42m"  # bold black on green: the most influential token
_TOPN = "\x1b[1;32m"  # bold green: the next ones
_NEG = "\x1b[31m"  # red: a strongly negative (opposing) token
_DIM = "\x1b[2m"
_RESET = "\x1b[0m"


def highlight(pieces: Sequence[str], token_scores: Sequence[float], top_tokens: Sequence[int], color: bool) -> str:
    """The document's text with its top tokens marked: colours on a terminal, ``[brackets]``
    otherwise. In colour, a token whose negative influence is at least half the top positive
    one is shown in red."""
    best = max((token_scores[i] for i in top_tokens), default=0.0)
    out = []
    for i, piece in enumerate(pieces):
        lead, word = (" ", piece[1:]) if piece.startswith(" ") else ("", piece)
        if i in top_tokens:
            rank = list(top_tokens).index(i)
            word = (_TOP1 if rank == 0 else _TOPN) + word + _RESET if color else f"[{word}]"
        elif color and best > 0 and token_scores[i] <= -0.5 * best:
            word = _NEG + word + _RESET
        out.append(lead + word)
    return "".join(out).strip()


def _fmt(x: Optional[float], pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.0f}%" if pct else f"{x:.2f}"


def _doc_label(d: dict) -> str:
    if d["kind"] == "factual":
        return f"fact/{d['attribute']}"
    return f"{d['task']}/{d['style']}"


def _word_order_note(f: dict) -> str:
    """Grosse et al. (2023) found that a document stating the answer *before* the query's key
    words carries little influence; say so only when this run's numbers show it."""
    by = f["mean_rank_by_wording"]
    if "answer_first" in by and len(by) > 1 and by["answer_first"] > max(v for w, v in by.items() if w != "answer_first"):
        return "  (answer-first wordings rank lowest: influence follows word order)"
    return ""


def summary_lines(metrics: dict) -> List[str]:
    f, r, c = metrics["factual"], metrics["reasoning"], metrics["correlation"]
    k = metrics["k"]
    lines = [
        f"Factual queries ({f['n_queries']}): answer-bearing document in the top {k} for "
        f"{_fmt(f['answer_in_topk_rate'], True)}, at rank 1 for {_fmt(f['answer_at_top1_rate'], True)} "
        f"(MRR {_fmt(f['answer_mrr'])}); {_fmt(f['answer_docs_recall_topk'], True)} of all answer documents in the top {k}.",
        "  mean rank of the answer document by wording: "
        + ", ".join(f"{w} {v:.1f}" for w, v in f["mean_rank_by_wording"].items()) + _word_order_note(f),
        f"  the top answer document's most influential token is the answer itself for {_fmt(f['top_token_is_answer_rate'], True)}.",
        f"Reasoning queries ({r['n_queries']}): top {k} are {_fmt(r['procedural_share_topk'], True)} procedural, "
        f"{_fmt(r['same_task_share_topk'], True)} from the query's own task ({_fmt(r['code_share_topk'], True)} code).",
        f"  factual queries' top {k}: {_fmt(f['procedural_share_topk'], True)} procedural.",
        f"Score correlation between queries (Pearson / Spearman over all documents): reasoning same task "
        f"{_fmt(c['reasoning_same_task'])} / {_fmt(c['reasoning_same_task_spearman'])}, across tasks "
        f"{_fmt(c['reasoning_cross_task'])} / {_fmt(c['reasoning_cross_task_spearman'])}; factual pairs "
        f"{_fmt(c['factual_pairs'])} / {_fmt(c['factual_pairs_spearman'])}.",
        "Concentration (share of positive influence in the top 1% / 10% of documents, Gini): "
        f"factual {_fmt(f['concentration']['top1pct_share'], True)} / {_fmt(f['concentration']['top10pct_share'], True)}, "
        f"{_fmt(f['concentration']['gini'])}; reasoning {_fmt(r['concentration']['top1pct_share'], True)} / "
        f"{_fmt(r['concentration']['top10pct_share'], True)}, {_fmt(r['concentration']['gini'])}.",
    ]
    return lines


def render_query(entry: dict, color: bool, n_docs: int = 3) -> List[str]:
    head = f"{entry['kind'].upper()} query: {entry['prompt']} -> {entry['completion']}"
    lines = [(_DIM if color else "") + "-" * 78 + (_RESET if color else ""), head]
    if entry["kind"] == "factual":
        lines.append(f"  answer-bearing documents at ranks {entry['answer_doc_ranks']}")
    for rank, d in enumerate(entry["top"][:n_docs], start=1):
        mark = ""
        if entry["kind"] == "factual" and d.get("answer") == entry["answer"]:
            mark = "  <- states the answer"
        elif entry["kind"] == "reasoning" and d.get("task") == entry["task"]:
            mark = "  <- same task"
        lines.append(f"  #{rank} {d['score']:+.3g}  [{_doc_label(d)}]{mark}")
        lines.append("      " + highlight(d["pieces"], d["token_scores"], d["top_tokens"], color))
    return lines


def pick_showcase(queries: Sequence[dict], n_factual: int = 3) -> List[int]:
    """A few queries to print: factual ones about different entities and attributes, and
    one reasoning query per task."""
    picked, seen_entities, seen_attrs, seen_tasks = [], set(), set(), set()
    for i, q in enumerate(queries):
        if q["kind"] == "factual" and len(seen_entities) < n_factual \
                and q["entity"] not in seen_entities and q["attribute"] not in seen_attrs:
            picked.append(i)
            seen_entities.add(q["entity"])
            seen_attrs.add(q["attribute"])
        elif q["kind"] == "reasoning" and q["task"] not in seen_tasks:
            picked.append(i)
            seen_tasks.add(q["task"])
    return picked


def render_terminal(result: dict, color: bool) -> str:
    lines = []
    for i in pick_showcase(result["queries"]):
        lines += render_query(result["queries"][i], color)
    lines += ["-" * 78, "Summary"] + ["  " + s for s in summary_lines(result["metrics"])]
    return "\n".join(lines)


# --------------------------------------------------------------------------- files


# Enough to keep inline text and table cells literal: emphasis, code, links, cell bars, HTML.
_MD_SPECIAL = set("\\`*_[]|<>")


def _md_escape(text: str) -> str:
    return "".join("\\" + ch if ch in _MD_SPECIAL else ch for ch in text)


def _md_doc(d: dict) -> str:
    out = []
    for i, piece in enumerate(d["pieces"]):
        lead, word = (" ", piece[1:]) if piece.startswith(" ") else ("", piece)
        word = _md_escape(word)
        out.append(lead + (f"**{word}**" if i in d["top_tokens"] else word))
    return "".join(out).strip()


def _header(result: dict) -> List[str]:
    info = result["info"]
    return [f"corpus: {info['corpus']}", f"model: {info['model']}", f"training: {info['training']}",
            f"influence: {info['influence']}", "timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["timings"].items())] \
        + (["greedy accuracy of the trained model: " + ", ".join(f"{k} {v:.2f}" for k, v in result["accuracy"].items())]
           if "accuracy" in result else [])


def _self_influence_rows(result: dict) -> List[str]:
    return [f"{r['self_influence']:.4g}  [{_doc_label(r)}]  {r['text']}" for r in result.get("self_influence_top", [])]


def markdown_report(result: dict) -> str:
    lines = ["# pyinf demo: influence of procedural and factual documents", ""]
    lines += [f"- {s}" for s in _header(result)] + ["", "## Summary", ""]
    lines += [f"- {_md_escape(s.strip())}" for s in summary_lines(result["metrics"])]
    lines += ["", "Token scores are shown on the token each position predicts; **bold** = the most influential tokens.", ""]
    for entry in result["queries"]:
        lines += [f"## {entry['kind']}: {_md_escape(entry['prompt'])} → {_md_escape(entry['completion'])}", ""]
        if entry["kind"] == "factual":
            lines += [f"answer-bearing documents at ranks {entry['answer_doc_ranks']}; "
                      f"top-1% share {entry['top1pct_share']:.2f}, Gini {entry['gini']:.2f}", ""]
        lines += ["| rank | score | document | text |", "| --- | --- | --- | --- |"]
        for rank, d in enumerate(entry["top"], start=1):
            lines.append(f"| {rank} | {d['score']:+.4g} | {_doc_label(d)} | {_md_doc(d)} |")
        lines.append("")
    if result.get("self_influence_top"):
        lines += ["## Highest self-influence (the least typical documents, whose own loss the model is most sensitive to)", ""]
        lines += [f"- {_md_escape(row)}" for row in _self_influence_rows(result)]
    return "\n".join(lines)


def _html_doc(d: dict) -> str:
    scale = max((abs(s) for s in d["token_scores"]), default=0.0) or 1.0
    out = []
    for piece, s in zip(d["pieces"], d["token_scores"]):
        lead, word = (" ", piece[1:]) if piece.startswith(" ") else ("", piece)
        alpha = min(1.0, abs(s) / scale)
        rgb = "0,170,60" if s > 0 else "220,40,40"
        out.append(f'{lead}<span style="background:rgba({rgb},{alpha:.2f})" title="{s:.4g}">{html.escape(word)}</span>')
    return "".join(out).strip()


def html_report(result: dict) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>pyinf demo</title>",
             "<style>body{font-family:sans-serif;max-width:70em;margin:auto}td{padding:2px 8px;vertical-align:top}"
             ".doc{font-family:monospace}</style></head><body>",
             "<h1>pyinf demo: influence of procedural and factual documents</h1><ul>"]
    parts += [f"<li>{html.escape(s)}</li>" for s in _header(result)]
    parts += ["</ul><h2>Summary</h2><ul>"] + [f"<li>{html.escape(s.strip())}</li>" for s in summary_lines(result["metrics"])]
    parts.append("</ul><p>Token colour: green helps the query's completion, red opposes it; "
                 "each score sits on the token its position predicts (hover for the value).</p>")
    for entry in result["queries"]:
        parts.append(f"<h3>{html.escape(entry['kind'])}: {html.escape(entry['prompt'])} &rarr; "
                     f"<b>{html.escape(entry['completion'])}</b></h3><table>")
        for rank, d in enumerate(entry["top"], start=1):
            parts.append(f"<tr><td>{rank}</td><td>{d['score']:+.4g}</td><td>{html.escape(_doc_label(d))}</td>"
                         f"<td class='doc'>{_html_doc(d)}</td></tr>")
        parts.append("</table>")
    if result.get("self_influence_top"):
        parts.append("<h2>Highest self-influence</h2><ul>")
        parts += [f"<li class='doc'>{html.escape(row)}</li>" for row in _self_influence_rows(result)]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def save_report(out_dir: str, result: dict, scores: torch.Tensor, self_inf: torch.Tensor,
                corpus: Corpus) -> Dict[str, str]:
    """``report.md``, ``report.html`` and ``results.json`` (metrics, per-query top documents,
    document metadata, the full score matrix and self-influence), each written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    payload = dict(result)
    payload["documents"] = [d.meta() for d in corpus.documents]
    payload["query_names"] = [q.name for q in corpus.queries]
    payload["scores"] = [[float(f"{x:.6g}") for x in row] for row in scores.tolist()]
    payload["self_influence"] = [float(f"{x:.6g}") for x in self_inf.tolist()]
    paths = {name: os.path.join(out_dir, name) for name in ("report.md", "report.html", "results.json")}
    write_text_atomic(paths["results.json"], json.dumps(payload, indent=1, allow_nan=False) + "\n")
    write_text_atomic(paths["report.md"], markdown_report(result))
    write_text_atomic(paths["report.html"], html_report(result))
    return paths
