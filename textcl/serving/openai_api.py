"""The OpenAI embeddings API of `textcl serve`: `POST /v1/embeddings` and `GET /v1/models`.

LangChain, LlamaIndex and the official `openai` client call these routes (point their base URL at
`http://HOST:PORT/v1`). A request is `{"input": str | [str], "model", "encoding_format"?, "dimensions"?,
"user"?}`; the answer is `{"object": "list", "data": [{"object": "embedding", "index", "embedding"}],
"model", "usage": {"prompt_tokens", "total_tokens"}}`, with `embedding` a list of floats or, for
`encoding_format: "base64"` (what the `openai` client asks for by default), the little-endian float32
bytes in base64. Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.

- `model` must name the served model: its folder's name (what `GET /v1/models` lists) or the path the index
  records. Any other name is a 404, so a client configured for another model fails instead of silently
  getting these vectors.
- `input` is encoded with the index's *document* settings (document prompt, `max_seq_length`), as `/embed`
  does with `kind: "document"`: the API has no notion of queries. The extension field `input_type: "query"`
  encodes with the query settings instead (query prompt, `query_max_length`).
- `dimensions` keeps the first `dimensions` coordinates and scales them back to unit length (Matryoshka
  truncation); it is only meaningful for a model trained for it.
- Each input is truncated at the model's maximum length in tokens, never refused for its length (the body
  limit bounds it); the header `X-Truncated-Inputs` counts the inputs that were cut. `prompt_tokens` counts
  the tokens encoded (special tokens included, after truncation; prompts not counted).
- At most 2048 inputs per request (OpenAI's own limit), each a non-empty string; token-id arrays are refused.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import time
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictInt, StrictStr, WithJsonSchema
from pydantic_core import to_json

from textcl.serving.schemas import check_text, dump_json
from textcl.serving.service import SearchService

PREFIX = "/v1"
MAX_INPUTS = 2048
INLINE_CHARACTERS = 20_000  # inputs up to this size are counted on the event loop (~1 ms), longer ones in a thread
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               429: "rate_limit_error"}


def check_inputs(value: object) -> list[str]:
    """`input`, a text or a list of texts -> the list, each checked."""
    texts = [value] if isinstance(value, str) else value
    if isinstance(texts, list) and texts and all(isinstance(t, (int, list)) for t in texts):
        raise ValueError("token ids are not supported: send the texts")
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        raise ValueError("must be a string or a list of strings")
    if not 1 <= len(texts) <= MAX_INPUTS:
        raise ValueError(f"must hold 1 to {MAX_INPUTS} texts, got {len(texts)}")
    return [check_text(text) for text in texts]


Inputs = Annotated[list[str], PlainValidator(check_inputs), WithJsonSchema({"anyOf": [
    {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": MAX_INPUTS}]})]


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: Inputs = Field(description="a text or a list of texts (document settings unless input_type is query)")
    model: StrictStr = Field(description="the served model (GET /v1/models)")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32 bytes")
    dimensions: StrictInt | None = Field(None, ge=1, description="keep the first dimensions, renormalised")
    user: StrictStr | None = Field(None, description="accepted and ignored")
    input_type: Literal["query", "document"] = Field(
        "document", description="textcl extension: encode with the index's query or document settings")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "textcl"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: ErrorBody


def is_openai(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def openai_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in OpenAI's shape; `param` names the field when the message starts with `field: `."""
    param = message.split(":", 1)[0] if ": " in message and " " not in message.split(":", 1)[0] else None
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    code = {404: "model_not_found", 429: "rate_limit_exceeded", 413: "request_too_large"}.get(status)
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class TokenCounter:
    """Counts tokens with a private copy of the model's tokenizer, its truncation and padding off for good: the
    model thread sets them on its own tokenizer for every forward, and a fast tokenizer whose settings change
    while another thread encodes with it raises "Already borrowed" (or encodes at the other's length)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = copy.deepcopy(tokenizer)
        self.backend = getattr(self.tokenizer, "backend_tokenizer", None)  # None for a slow (Python) tokenizer
        if self.backend is not None:
            self.backend.no_truncation()
            self.backend.no_padding()

    def __call__(self, texts: list[str], max_length: int) -> tuple[int, int]:
        """(tokens encoded, texts truncated) of `texts` at `max_length` tokens (special tokens included)."""
        if self.backend is not None:
            lengths = [len(encoding.ids) for encoding in self.backend.encode_batch(texts)]
        else:
            lengths = [len(ids) for ids in self.tokenizer(texts, verbose=False)["input_ids"]]
        return sum(min(length, max_length) for length in lengths), sum(length > max_length for length in lengths)


def shorten(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """The first `dimensions` columns of `[n, dim]` vectors, each row scaled back to unit length."""
    if dimensions is None or dimensions == vectors.shape[1]:
        return vectors
    head = vectors[:, :dimensions]
    return head / np.maximum(np.linalg.norm(head, axis=1, keepdims=True), 1e-12)


def encoded(vectors: np.ndarray, encoding_format: str) -> list[Any]:
    """The rows of `[n, dim]` vectors as `dump_json` writes them: float32 arrays, or base64 of their bytes."""
    rows = np.ascontiguousarray(vectors, dtype="<f4")
    if encoding_format == "float":
        return list(rows)
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]


def openai_router(service: SearchService, served: str) -> APIRouter:
    """The routes above over `service`'s index and encoder, its model named `served` (as /health names it)."""
    router = APIRouter(prefix=PREFIX, tags=["OpenAI"])
    recorded = str(service.index.meta["model"])
    started = int(time.time())
    count_tokens = TokenCounter(service.index.require_encoder().tokenizer)

    @router.get("/models", response_model=ModelList)
    async def models() -> Response:
        """The one model this server embeds with."""
        return Response(to_json({"object": "list", "data": [
            {"id": served, "object": "model", "created": started, "owned_by": "textcl"}]}),
            media_type="application/json")

    @router.post("/embeddings", response_model=EmbeddingsResponse,
                 responses={code: {"model": OpenAIError} for code in (400, 404, 413, 415, 422, 429)})
    async def embeddings(request: EmbeddingsRequest) -> Response:
        """Embeddings of `input` in OpenAI's format."""
        if request.model not in (served, recorded):
            raise HTTPException(404, f"model: the model {request.model!r} is not served here; this server "
                                f"serves {served!r} (GET /v1/models)")
        dim = service.index.meta["dim"]
        if request.dimensions is not None and request.dimensions > dim:
            raise HTTPException(422, f"dimensions: must be at most {dim}, the model's dimension, "
                                f"got {request.dimensions}")
        meta = service.index.meta
        max_length = meta["query_max_length" if request.input_type == "query" else "max_seq_length"]
        if sum(len(text) for text in request.input) > INLINE_CHARACTERS:  # keep the event loop free
            tokens, truncated = await asyncio.to_thread(count_tokens, request.input, max_length)
        else:
            tokens, truncated = count_tokens(request.input, max_length)
        vectors = shorten(await service.embed(request.input, request.input_type), request.dimensions)
        data = [{"object": "embedding", "index": i, "embedding": row}
                for i, row in enumerate(encoded(vectors, request.encoding_format))]
        body = {"object": "list", "data": data, "model": served,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return Response(dump_json(body), media_type="application/json", headers={"X-Truncated-Inputs": str(truncated)})

    return router
