"""`POST /v1/embeddings` for the served model (or one of its LoRA adapters).

An embedding is the model's final hidden state (after the last norm, Hugging Face's
`last_hidden_state`) mean-pooled over every token of the input and L2-normalized, so the dot
product of two embeddings is their cosine similarity. The engine runs embedding inputs as
prefill-only requests batched with generation; nothing is sampled, and the prefix cache is not
used for them (every position must be computed to be pooled).

The request takes OpenAI's fields: `input` (a string, a list of strings, a list of token ids or
a list of token-id lists; at most 2,048 inputs, none empty), `model`, `encoding_format` (`float`,
the default, or `base64`: the float32 little-endian bytes base64-encoded, as the openai client
asks for by default and decodes), `dimensions` (only the model's hidden size: the vectors are not
trained to be truncated), `user` (ignored); plus vLLM's `truncate_prompt_tokens` (keep the last k
tokens of each input) and `add_special_tokens` (default true). Inputs longer than the model's
context are a 400 naming `input`.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from typing import Any, Literal

from pydantic import Field, StrictBool, StrictInt, StrictStr, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llmos_worker.engine.params import SamplingParams
from llmos_worker.errors import InvalidRequestError
from llmos_worker.server.adapters import resolve_model
from llmos_worker.server.admission import Caller, admit
from llmos_worker.server.generation import Generation, collect_or_abort
from llmos_worker.server.protocol import EnginePrompt, _Strict
from llmos_worker.server.state import ServerState

MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit
ENGINE_WAVE = 64  # inputs handed to the engine at once (the engine's waiting queue is bounded)


class EmbeddingRequest(_Strict):
    input: str | list[str] | list[int] | list[list[int]]
    model: StrictStr
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None
    truncate_prompt_tokens: StrictInt | None = Field(default=None, ge=1)
    add_special_tokens: StrictBool = True
    priority: StrictInt = 0

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value: Any) -> Any:
        # why: a plain union would report one error per member; one clear message is better
        def ids(v: Any) -> bool:
            return isinstance(v, list) and all(type(t) is int for t in v)

        if isinstance(value, str) or ids(value):
            return value
        if isinstance(value, list) and (
            all(isinstance(p, str) for p in value) or all(ids(p) for p in value)
        ):
            return value
        raise ValueError(
            "input must be a string, a list of strings, a list of token ids or a list of "
            "token-id lists"
        )

    def inputs(self) -> list[EnginePrompt]:
        value = self.input
        if isinstance(value, str):
            items: list[EnginePrompt] = [value]
        elif value and all(isinstance(t, int) for t in value):
            items = [[t for t in value if isinstance(t, int)]]
        else:
            items = list(value)  # type: ignore[arg-type]
        if not items:
            raise InvalidRequestError("input must not be an empty list", param="input")
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise InvalidRequestError(
                f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(items)}",
                param="input",
            )
        if any(len(item) == 0 for item in items):
            raise InvalidRequestError("input must not contain an empty string", param="input")
        return items


def _encoded(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def create_embedding(
    state: ServerState, body: object, request: Request, caller: Caller
) -> Response:
    req = EmbeddingRequest.model_validate(body)
    front = state.serving_front()
    lora_name = resolve_model(state, req.model)  # 404 unless the base model or an adapter
    hidden = getattr(front.engine, "hidden_size", None)
    if req.dimensions is not None and req.dimensions != hidden:
        raise InvalidRequestError(
            f"dimensions must be the model's hidden size ({hidden}); its embeddings are not "
            "trained to be truncated",
            param="dimensions",
        )
    encode = state.tokenizer.encode
    vocab = getattr(front.engine, "vocab_size", None)
    prompts: list[EnginePrompt] = []
    for item in req.inputs():
        if isinstance(item, list) and vocab is not None and not all(0 <= t < vocab for t in item):
            raise InvalidRequestError(
                f"input has token ids outside the vocabulary [0, {vocab})",
                param="input",
                code="invalid_token_id",
            )
        ids = encode(item, req.add_special_tokens) if isinstance(item, str) else item
        if req.truncate_prompt_tokens is not None:
            ids = ids[-req.truncate_prompt_tokens :]
        prompts.append(ids)
    params = SamplingParams(embed=True, max_tokens=1, temperature=0.0, lora_name=lora_name)
    response_id = f"embd-{uuid.uuid4().hex}"
    data: list[dict[str, Any]] = []
    prompt_tokens = 0
    for start in range(0, len(prompts), ENGINE_WAVE):
        wave = prompts[start : start + ENGINE_WAVE]
        admission = admit(
            state.limiter,
            caller,
            [len(p) for p in wave],
            params,
            max_model_len=front.engine.max_model_len,
            priority=req.priority,
        )
        generation = Generation(front, f"{response_id}-{start}", wave, params, admission)
        await generation.start()
        outputs = await collect_or_abort(request, generation)
        if outputs is None:
            return Response(status_code=499)  # client closed the request; nobody reads this
        for i, out in enumerate(outputs):
            assert out.embedding is not None
            prompt_tokens += len(out.prompt_token_ids)
            data.append(
                {
                    "object": "embedding",
                    "index": start + i,
                    "embedding": _encoded(out.embedding, req.encoding_format),
                }
            )
    return JSONResponse(
        {
            "id": response_id,
            "object": "list",
            "created": int(time.time()),
            "model": req.model,
            "data": data,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    )
