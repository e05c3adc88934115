"""The request and response bodies of the search service (pydantic models; FastAPI validates and documents them).

Every text is a non-empty str that encodes to UTF-8 (JSON can spell a lone surrogate, `"\\ud800"`, which no
file or tokenizer takes). A document id holds no control character (a newline, a tab, U+0000...): ids travel in
URL paths (DELETE /documents/{id}), in tab-separated qrels and in log lines, where those characters break or
forge a line, so they are refused at POST (422) rather than made to match in one place. Unknown fields are errors, so a misspelled `top_k` is not silently ignored.
"""

from __future__ import annotations

import inspect
import unicodedata
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, StrictInt, StrictStr, WithJsonSchema

from textcl.errors import TextclError
from textcl.retrieval.search_index import SearchIndex

try:
    import orjson
except ModuleNotFoundError as missing:
    raise TextclError(f"textcl serve needs {missing.name}: pip install \"textcl[serve]\"") from missing

MAX_K = 1000  # results per query
MAX_TEXTS = 256  # queries per search, texts per embed call
MAX_DOCUMENTS = 1000  # documents per add
DEFAULT_K = inspect.signature(SearchIndex.search).parameters["k"].default


def dump_json(body: Any) -> bytes:
    """`body` as JSON, float32 arrays in it written in float32's shortest form (0.12573022, not 0.1257302165031433
    as their float64 `tolist()` reads): the same float32 values in about half the bytes, which is what a client
    parses for every vector it gets (bench/RESULTS.md, issue 26). orjson, because the json module and pydantic
    write only float64."""
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def check_text(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid UTF-8 (it holds a lone surrogate)") from None
    return text


def check_texts(value: object) -> list[str]:
    """A text or a list of texts -> the list, each checked."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        raise ValueError("must be a string or a list of strings")
    if not 1 <= len(texts) <= MAX_TEXTS:
        raise ValueError(f"must hold 1 to {MAX_TEXTS} texts, got {len(texts)}")
    return [check_text(text) for text in texts]


def check_id(text: str) -> str:
    check_text(text)
    control = next((char for char in text if unicodedata.category(char) == "Cc"), None)
    if control is not None:
        raise ValueError(f"must not hold control characters (it holds U+{ord(control):04X})")
    return text


Text = Annotated[StrictStr, AfterValidator(check_text)]
Id = Annotated[StrictStr, AfterValidator(check_id)]
# One validator for `str | list[str]`, so a mistake gets one message instead of one per member of the union.
Texts = Annotated[list[str], PlainValidator(check_texts), WithJsonSchema({"anyOf": [
    {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": MAX_TEXTS}]})]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchRequest(Strict):
    query: Texts = Field(description="a query, or a list of queries searched together")
    k: StrictInt = Field(DEFAULT_K, ge=1, le=MAX_K, description="results per query (fewer when the index is smaller)")
    mode: Literal["dense", "bm25", "hybrid"] | None = Field(
        None, description="dense, bm25 or hybrid (default: hybrid for an index built with --hybrid, else dense)")


class Hit(BaseModel):
    id: str
    score: float = Field(description="cosine similarity (inner product when the index is not normalized); in a "
                         "hybrid search the fused score, in a bm25 search the BM25 score")
    text: str
    dense_score: float | None = Field(None, description="hybrid and bm25 searches: the dense side's score (null: "
                                      "that side did not return the document)")
    bm25_score: float | None = Field(None, description="hybrid and bm25 searches: the BM25 score (null: that side "
                                     "did not return the document)")


class QueryResult(BaseModel):
    query: str
    hits: list[Hit] = Field(description="best first")


class SearchResponse(BaseModel):
    results: list[QueryResult] = Field(description="one per query, in request order")


class EmbedRequest(Strict):
    texts: Texts
    kind: Literal["query", "document"] = Field(
        "query", description="encode with the index's query or document settings (prompt, truncation)")


class EmbedResponse(BaseModel):
    vectors: list[list[float]] = Field(description="[n_texts, dimension]")
    dimension: int


class Document(Strict):
    id: Id
    text: Text


Documents = Annotated[list[Document], Field(min_length=1, max_length=MAX_DOCUMENTS)]


class AddResponse(BaseModel):
    added: int
    documents: int = Field(description="documents in the index now")


class DeleteResponse(BaseModel):
    deleted: str
    documents: int = Field(description="documents in the index now")


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    dimension: int
    documents: int
    index_type: str = Field(description="the faiss index factory string, e.g. Flat or IVF1024,Flat")
    metric: str
    max_batch_size: int = Field(description="texts per micro-batch at most (1: batching off)")
    mean_batch_size: float = Field(description="texts per encoder forward so far")
    writes_need_key: bool


class Error(BaseModel):
    detail: str = Field(description="what was wrong, in one line")
