"""The demo's built-in synthetic corpus, its queries and a tiny word-level tokenizer.

Two kinds of training documents, as in Ruis et al. (2024):

* procedural: worked solutions and small Python programs for three reasoning tasks
  (two-step arithmetic ``(a + b) * c``, the slope of a line through two points, a linear
  equation ``a x + b = c``), each instance with its own numbers;
* factual: one fact per document about invented countries (capital, language, ruler),
  each fact stated in three paraphrases.

Queries are either factual (a fact's prompt; the completion is the answer, which appears in
exactly the three documents that state that fact) or reasoning (a task's question with
numbers that appear in no training document of that task; the completion is the worked
solution). Every document and query carries metadata (kind, task, entity, attribute,
answer) so the report can judge the influence scores.

Text is whitespace-separated words; numbers are split into digits, so arithmetic is
spelled out one digit per token as in real tokenizers of the paper's models.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
TASKS = ("two_step", "slope", "linear")
ATTRIBUTES = ("capital", "language", "ruler")


# --------------------------------------------------------------------------- tokenizer


class WordTokenizer:
    """Whitespace words, numbers split into digits. The vocabulary is built from the texts.

    Id 0 is the padding token on purpose: ``CausalLMTask.collate_fn`` pads ``input_ids``
    with 0.
    """

    def __init__(self, texts: Iterable[str]):
        words = sorted({w for text in texts for w in self.split(text)})
        self.itos: List[str] = [PAD, BOS, EOS] + words
        self.stoi: Dict[str, int] = {w: i for i, w in enumerate(self.itos)}

    @staticmethod
    def split(text: str) -> List[str]:
        pieces: List[str] = []
        for word in text.split():
            pieces.extend(list(word) if word.isdigit() else [word])
        return pieces

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> List[int]:
        return [self.stoi[w] for w in self.split(text)]

    def tokens(self, ids: Sequence[int]) -> List[str]:
        return [self.itos[int(i)] for i in ids]

    def display_pieces(self, ids: Sequence[int]) -> List[str]:
        """One printable string per id, with its leading space: digits of one number stick
        together so that ``1 3`` reads as ``13``, while each keeps its own influence."""
        pieces: List[str] = []
        prev = None
        for tok in self.tokens(ids):
            glue = prev is not None and prev.isdigit() and tok.isdigit()
            pieces.append(tok if glue or prev is None else " " + tok)
            prev = tok
        return pieces

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.display_pieces([i for i in ids if int(i) != self.pad_id]))


# --------------------------------------------------------------------------- records


@dataclass
class Document:
    text: str
    kind: str  # "procedural" | "factual"
    task: Optional[str] = None  # procedural: one of TASKS
    # procedural: "worked" | "code"; factual: which wording states the fact, see _WORDINGS
    style: Optional[str] = None
    entity: Optional[str] = None  # factual: the country
    attribute: Optional[str] = None  # factual: one of ATTRIBUTES
    answer: Optional[str] = None  # factual: the attribute's value
    ids: List[int] = field(default_factory=list)

    def meta(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "ids" and v is not None}


@dataclass
class Query:
    prompt: str
    completion: str
    kind: str  # "factual" | "reasoning"
    task: Optional[str] = None  # reasoning: one of TASKS
    entity: Optional[str] = None
    attribute: Optional[str] = None
    answer: Optional[str] = None  # factual: the fact's value; reasoning: the final number
    prompt_ids: List[int] = field(default_factory=list)
    completion_ids: List[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        if self.kind == "factual":
            return f"fact:{self.entity}.{self.attribute}"
        return f"{self.task}:{self.prompt}"

    def meta(self) -> dict:
        skip = ("prompt_ids", "completion_ids")
        return {k: v for k, v in self.__dict__.items() if k not in skip and v is not None}


@dataclass
class Corpus:
    tokenizer: WordTokenizer
    documents: List[Document]
    queries: List[Query]
    max_len: int  # longest document or query, in tokens (BOS/EOS included)

    def train_dataset(self) -> "TokenDataset":
        items = []
        for d in self.documents:
            ids = torch.tensor(d.ids, dtype=torch.long)
            items.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
        return TokenDataset(items)

    def query_dataset(self) -> "TokenDataset":
        """Prompt tokens are labelled -100: the measurement is the completion's loss."""
        items = []
        for q in self.queries:
            ids = torch.tensor(q.prompt_ids + q.completion_ids, dtype=torch.long)
            labels = ids.clone()
            labels[: len(q.prompt_ids)] = -100
            items.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        return TokenDataset(items)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, items: List[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


# --------------------------------------------------------------------------- facts

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "qu", "th", "vr"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "io"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "x"]
# Each attribute's values get their own ending, so a model can tell the kinds of names apart.
_ENDINGS = {"entity": ["ia", "and", "ora", "esh"], "capital": ["mar", "holm", "vek", "dun"],
            "language": ["ic", "ese", "ish"], "ruler": ["ald", "ina", "or", "ric"]}


def _invent_names(rng: random.Random, count: int, ending_key: str, taken: set) -> List[str]:
    names = []
    while len(names) < count:
        stem = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                       for _ in range(rng.randint(1, 2)))
        name = (stem + rng.choice(_ENDINGS[ending_key])).capitalize()
        if name not in taken and 4 <= len(name) <= 11:
            taken.add(name)
            names.append(name)
    return names


# Three paraphrases per attribute, named in _WORDINGS: the first is also the factual query's
# template; the second puts the answer before the entity (the order that Grosse et al. found
# to carry little influence); the third rewords the fact with the entity first.
_FACT_TEMPLATES = {
    "capital": ["The capital of {e} is {v} .", "{v} is the capital city of {e} .",
                "In {e} , the government sits in {v} , a large city ."],
    "language": ["The language of {e} is {v} .", "{v} is the language spoken by people in {e} .",
                 "Most people in {e} speak {v} at home ."],
    "ruler": ["The ruler of {e} is {v} .", "{v} has ruled {e} for many years .",
              "The people of {e} are governed by {v} ."],
}


_WORDINGS = ("query_wording", "answer_first", "reworded")


def _fact_docs(entities: List[str], values: Dict[str, List[str]]) -> List[Document]:
    docs = []
    for i, e in enumerate(entities):
        for attr in ATTRIBUTES:
            v = values[attr][i]
            for wording, template in zip(_WORDINGS, _FACT_TEMPLATES[attr]):
                docs.append(Document(template.format(e=e, v=v), "factual", style=wording,
                                     entity=e, attribute=attr, answer=v))
    return docs


def _fact_queries(entities: List[str], values: Dict[str, List[str]]) -> List[Query]:
    queries = []
    for i, e in enumerate(entities):
        for attr in ATTRIBUTES:
            v = values[attr][i]
            prompt = _FACT_TEMPLATES[attr][0].split("{v}")[0].format(e=e).strip()
            queries.append(Query(prompt, f"{v} .", "factual", entity=e, attribute=attr, answer=v))
    return queries


# --------------------------------------------------------------------------- procedures
# Each task: sample(rng) -> numbers, question(nums), solution(nums), code(nums).


def _two_step_sample(rng):
    return rng.randint(1, 9), rng.randint(1, 9), rng.randint(2, 9)


def _two_step_question(n):
    a, b, c = n
    return f"Compute ( {a} + {b} ) * {c} ."


def _two_step_solution(n):
    a, b, c = n
    return f"First , {a} + {b} = {a + b} . Then , {a + b} * {c} = {(a + b) * c} . The answer is {(a + b) * c} ."


def _two_step_code(n):
    a, b, c = n
    return f"a , b , c = {a} , {b} , {c} ; s = a + b ; print ( s * c ) # {(a + b) * c}"


def _slope_sample(rng):
    x1 = rng.randint(0, 6)
    x2 = x1 + rng.randint(1, 4)
    y1 = rng.randint(0, 9)
    m = rng.randint(1, 5)
    return x1, y1, x2, y1 + m * (x2 - x1)


def _slope_question(n):
    x1, y1, x2, y2 = n
    return f"Find the slope of the line through ( {x1} , {y1} ) and ( {x2} , {y2} ) ."


def _slope_solution(n):
    x1, y1, x2, y2 = n
    dy, dx = y2 - y1, x2 - x1
    return f"slope = ( {y2} - {y1} ) / ( {x2} - {x1} ) = {dy} / {dx} = {dy // dx} ."


def _slope_code(n):
    x1, y1, x2, y2 = n
    return (f"def slope ( x1 , y1 , x2 , y2 ) : return ( y2 - y1 ) / ( x2 - x1 ) ; "
            f"print ( slope ( {x1} , {y1} , {x2} , {y2} ) ) # {(y2 - y1) // (x2 - x1)}")


def _linear_sample(rng):
    a, x, b = rng.randint(2, 9), rng.randint(1, 9), rng.randint(1, 9)
    return a, b, a * x + b


def _linear_question(n):
    a, b, c = n
    return f"Solve {a} x + {b} = {c} for x ."


def _linear_solution(n):
    a, b, c = n
    return f"Subtract {b} : {a} x = {c - b} . Divide by {a} : x = {(c - b) // a} . The answer is {(c - b) // a} ."


def _linear_code(n):
    a, b, c = n
    return f"def solve ( a , b , c ) : return ( c - b ) / a ; print ( solve ( {a} , {b} , {c} ) ) # {(c - b) // a}"


_TASK_FNS = {
    "two_step": (_two_step_sample, _two_step_question, _two_step_solution, _two_step_code),
    "slope": (_slope_sample, _slope_question, _slope_solution, _slope_code),
    "linear": (_linear_sample, _linear_question, _linear_solution, _linear_code),
}


def _answer_of(solution: str) -> str:
    return solution.replace(" .", "").split()[-1]


def _procedural(rng: random.Random, n_worked: int, n_code: int, n_queries: int) -> Tuple[List[Document], List[Query]]:
    docs, queries = [], []
    for task in TASKS:
        sample, question, solution, code = _TASK_FNS[task]
        seen = set()

        def fresh():
            while True:
                nums = sample(rng)
                if nums not in seen:
                    seen.add(nums)
                    return nums

        for _ in range(n_worked):
            nums = fresh()
            docs.append(Document(f"{question(nums)} {solution(nums)}", "procedural", task=task, style="worked"))
        for _ in range(n_code):
            nums = fresh()
            docs.append(Document(code(nums), "procedural", task=task, style="code"))
        # Reasoning queries use numbers that no training document of the task uses.
        for _ in range(n_queries):
            nums = fresh()
            sol = solution(nums)
            queries.append(Query(question(nums), sol, "reasoning", task=task, answer=_answer_of(sol)))
    return docs, queries


# --------------------------------------------------------------------------- assembly

FULL = dict(n_entities=16, n_worked=40, n_code=20, n_reasoning_queries=6)
QUICK = dict(n_entities=6, n_worked=12, n_code=6, n_reasoning_queries=3)


def build_corpus(seed: int = 0, quick: bool = False) -> Corpus:
    """The whole corpus, deterministic in ``seed``: documents shuffled, queries fact-first."""
    sizes = QUICK if quick else FULL
    rng = random.Random(seed)
    taken: set = set()
    entities = _invent_names(rng, sizes["n_entities"], "entity", taken)
    values = {a: _invent_names(rng, sizes["n_entities"], a, taken) for a in ATTRIBUTES}

    docs = _fact_docs(entities, values)
    proc_docs, reasoning_queries = _procedural(rng, sizes["n_worked"], sizes["n_code"], sizes["n_reasoning_queries"])
    docs += proc_docs
    rng.shuffle(docs)
    queries = _fact_queries(entities, values) + reasoning_queries

    tok = WordTokenizer([d.text for d in docs] + [q.prompt + " " + q.completion for q in queries])
    for d in docs:
        d.ids = [tok.bos_id] + tok.encode(d.text) + [tok.eos_id]
    for q in queries:
        q.prompt_ids = [tok.bos_id] + tok.encode(q.prompt)
        q.completion_ids = tok.encode(q.completion) + [tok.eos_id]
    max_len = max([len(d.ids) for d in docs] + [len(q.prompt_ids) + len(q.completion_ids) for q in queries])
    return Corpus(tok, docs, queries, max_len)
