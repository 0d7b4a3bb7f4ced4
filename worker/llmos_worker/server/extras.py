"""vLLM's utility routes: `POST /tokenize`, `POST /detokenize`, and `GET /v1/models/{id}`.

`/tokenize` takes `{"model"?, "prompt": str}` (completions style, `add_special_tokens` default
true) or `{"model"?, "messages": [...]}` (chat style, through the chat template with the
generation prompt, `add_generation_prompt` default true) and answers `{"tokens", "count",
"max_model_len"}`; `return_token_strs: true` adds `token_strs`. `/detokenize` takes
`{"model"?, "tokens": [ids]}` and answers `{"prompt"}`. Both need the API key when keys are
configured, as the other `/v1` routes do. Bodies follow vLLM's field names, so its clients and
tooling work unchanged.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, StrictBool, StrictInt, StrictStr
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llmos_worker.errors import InvalidRequestError
from llmos_worker.server.admission import Caller
from llmos_worker.server.errors import HTTPError
from llmos_worker.server.protocol import ChatMessage, _Strict
from llmos_worker.server.state import ServerState

MAX_DETOKENIZE_TOKENS = 1 << 20


class TokenizeRequest(_Strict):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool | None = None
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False


class DetokenizeRequest(_Strict):
    model: StrictStr | None = None
    tokens: list[StrictInt] = Field(max_length=MAX_DETOKENIZE_TOKENS)


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise HTTPError(
            404, f"The model `{model}` does not exist.", param="model", code="model_not_found"
        )


async def tokenize(state: ServerState, body: object, request: Request, caller: Caller) -> Response:
    req = TokenizeRequest.model_validate(body)
    _check_model(state, req.model)
    front = state.serving_front()
    tokenizer = state.tokenizer
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequestError("exactly one of prompt and messages is required", param="prompt")
    if req.prompt is not None:
        special = True if req.add_special_tokens is None else req.add_special_tokens
        ids = tokenizer.encode(req.prompt, add_special_tokens=special)
    else:
        messages = [m.template_message() for m in req.messages or []]
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=req.add_generation_prompt
        )
    out: dict[str, Any] = {
        "tokens": ids,
        "count": len(ids),
        "max_model_len": front.engine.max_model_len,
    }
    if req.return_token_strs:
        out["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
    return JSONResponse(out)


async def detokenize(
    state: ServerState, body: object, request: Request, caller: Caller
) -> Response:
    req = DetokenizeRequest.model_validate(body)
    _check_model(state, req.model)
    state.serving_front()
    vocab = state.tokenizer.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError(
            f"token ids outside the vocabulary [0, {vocab}): {bad[:5]}",
            param="tokens",
            code="invalid_token_id",
        )
    return JSONResponse({"prompt": state.tokenizer.decode(req.tokens, skip_special_tokens=False)})
