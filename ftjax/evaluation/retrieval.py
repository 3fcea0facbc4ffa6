"""The retrieval baseline's prompts: for each eval prompt, the k most similar training examples by BM25 over the
prompt text (placed as earlier chat turns, as the fixed few-shot prompt is), or, with a document collection
(`eval.documents`, records {"id", "text"}), the k most similar passages written into the question.

BM25 is bm25s's (Lucene variant, k1 = 1.5, b = 0.75, English stopwords). The selection is cached in $FTJAX_CACHE
by content (the queries' and the collection's bytes, k, the retriever's settings), so every workdir on the same
data reuses it, and a changed train file, document file or k selects again.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from typing import Any, Sequence

from ftjax.data.records import Record, check_data_file, iter_json
from ftjax.errors import DataError
from ftjax.evaluation import shared_cache
from ftjax.evaluation.conversations import Turns, few_shot_turns, split_reply

RETRIEVER = f"bm25s {importlib.metadata.version('bm25s')}: lucene k1=1.5 b=0.75, stopwords=english, lowercase"
PASSAGES_TEMPLATE = "Answer using these passages.\n\n{passages}\n\nQuestion: {question}"
PASSAGE_TEMPLATE = "[{n}] {text}"


@dataclasses.dataclass(frozen=True)
class Passage:
    """One document of the collection: its id (unique in the file) and its text."""

    id: str
    text: str


def query_text(prompt: Turns) -> str:
    """What BM25 compares: the prompt's user turns (a shared system prompt would only add the same words to all)."""
    return "\n".join(text for role, text in prompt if role == "user")


def bm25_top_k(corpus: Sequence[str], queries: Sequence[str], k: int) -> list[list[int]]:
    """Indices of the k corpus texts most similar to each query by BM25, most similar first (bm25s's numpy top-k
    on the host: its order of tied scores is the same on every platform, jax's is not)."""
    if not 0 < k <= len(corpus):
        raise DataError(f"retrieval of k={k} examples needs 1 <= k <= the collection's size ({len(corpus)})")
    import bm25s  # here, not at import: bm25s runs a jax op when imported, which would start the backend before
    # a multi-process run's jax.distributed.initialize and compile before a bad config's one-line error

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(list(corpus), show_progress=False), show_progress=False)
    found, _ = retriever.retrieve(bm25s.tokenize(list(queries), show_progress=False), k=k, show_progress=False,
                                  backend_selection="numpy", n_threads=0)
    return [[int(i) for i in row] for row in found]


def load_documents(path: str) -> list[Passage]:
    """The passages of a JSONL / JSON file of {"id", "text"} records; a bad record is one line naming file:line."""
    check_data_file(path)
    passages, seen = [], {}
    for line, obj in iter_json(path):
        where = f"{path}:{line}"
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
            raise DataError(f"{where}: a document needs a non-empty string \"text\" (records are "
                            f"{{\"id\": ..., \"text\": ...}})")
        if not isinstance(obj.get("id"), (str, int)) or isinstance(obj.get("id"), bool):
            raise DataError(f"{where}: a document needs an \"id\" (a string or an integer)")
        doc_id = str(obj["id"])
        if doc_id in seen:
            raise DataError(f"{where}: document id {doc_id!r} repeats the one at line {seen[doc_id]}")
        seen[doc_id] = line
        passages.append(Passage(doc_id, obj["text"]))
    if not passages:
        raise DataError(f"{path}: holds no documents")
    return passages


def selection_identity(queries_path: str, collection_path: str, k: int, collection: str) -> dict[str, Any]:
    """What a selection depends on: the eval file's and the collection's (train examples or documents) bytes, k."""
    return {"retriever": RETRIEVER, "queries": shared_cache.data_content_id(queries_path), "collection": collection,
            "source": shared_cache.data_content_id(collection_path), "k": k}


def cached_top_k(corpus: Sequence[str], queries: Sequence[str], k: int, identity: dict[str, Any]) -> list[list[int]]:
    """`bm25_top_k`, read from $FTJAX_CACHE when this identity was selected before (any workdir), else stored."""
    picked = shared_cache.lookup("retrieval", identity)
    if picked is None:
        picked = bm25_top_k(corpus, queries, k)
        shared_cache.store("retrieval", identity, picked)
    return picked


def retrieved_shots(eval_records: Sequence[Record], eval_path: str, train_records: Sequence[Record],
                    train_path: str, k: int) -> list[list[Record]]:
    """For each eval record, the k train records whose prompts are most similar to its prompt, the most similar
    last (nearest the question): `few_shot_turns(prompt, shots)` lays them out as the fixed few-shot prompt."""
    queries = [query_text(split_reply(r)[0]) for r in eval_records]
    corpus = [query_text(split_reply(r)[0]) for r in train_records]
    picked = cached_top_k(corpus, queries, k, selection_identity(eval_path, train_path, k, "train examples"))
    return [[train_records[i] for i in reversed(row)] for row in picked]


def retrieved_passages(eval_records: Sequence[Record], eval_path: str, documents: Sequence[Passage],
                       documents_path: str, k: int) -> list[list[Passage]]:
    """For each eval record, the k passages most similar to its prompt, the most similar first."""
    queries = [query_text(split_reply(r)[0]) for r in eval_records]
    picked = cached_top_k([d.text for d in documents], queries, k,
                          selection_identity(eval_path, documents_path, k, "documents"))
    return [[documents[i] for i in row] for row in picked]


def with_passages(prompt: Turns, passages: Sequence[Passage]) -> Turns:
    """The prompt with its passages written into its last user turn by `PASSAGES_TEMPLATE` (report.md shows it)."""
    last = max((i for i, (role, _) in enumerate(prompt) if role == "user"), default=None)
    if last is None:
        raise DataError("a prompt for retrieval needs a user turn to put the passages in")
    listed = "\n\n".join(PASSAGE_TEMPLATE.format(n=n, text=p.text) for n, p in enumerate(passages, 1))
    question = PASSAGES_TEMPLATE.format(passages=listed, question=prompt[last][1])
    return prompt[:last] + (("user", question),) + prompt[last + 1:]


@dataclasses.dataclass(frozen=True)
class RetrievalPrompts:
    """Each eval record's retrieval prompt, by its index among the eval records (`evaluate_task`'s `prompt_of`):
    its k retrieved train examples as earlier turns, or its k passages written into the question."""

    picked: list[list[Any]]  # per eval record: its train Records, or its Passages
    passages: bool
    k: int
    identity: dict[str, Any]  # what the selection depends on (the cached rows' key)
    source: str  # the collection's file, as the report names it

    def __call__(self, i: int, prompt: Turns) -> Turns:
        return with_passages(prompt, self.picked[i]) if self.passages else few_shot_turns(prompt, self.picked[i])

    def describe(self) -> dict[str, Any]:
        """What report.md says about the retrieval rows (report.json meta.retrieval)."""
        out = {"k": self.k, "retriever": RETRIEVER, "from": "documents" if self.passages else "train examples",
               "source": self.source}
        if self.passages:
            out["template"] = PASSAGES_TEMPLATE.format(
                passages="\n\n".join(PASSAGE_TEMPLATE.format(n=n, text="{passage}") for n in range(1, self.k + 1)),
                question="{question}")
        return out


def retrieval_prompts(eval_records: Sequence[Record], eval_path: str, k: int, *,
                      train: tuple[Sequence[Record], str] | None = None,
                      documents: tuple[Sequence[Passage], str] | None = None) -> RetrievalPrompts | None:
    """The retrieval rows' prompts: from the documents when the run names them, else from the train examples;
    None without either (or with k = 0)."""
    if k <= 0 or not eval_records:
        return None
    if documents is not None:
        passages, path = documents
        picked = retrieved_passages(eval_records, eval_path, passages, path, k)
        identity = {**selection_identity(eval_path, path, k, "documents"), "template": PASSAGES_TEMPLATE,
                    "passage": PASSAGE_TEMPLATE}
        return RetrievalPrompts(picked, True, k, identity, path)
    if train is not None and train[0]:
        records, path = train
        picked = retrieved_shots(eval_records, eval_path, records, path, k)
        return RetrievalPrompts(picked, False, k, selection_identity(eval_path, path, k, "train examples"), path)
    return None
