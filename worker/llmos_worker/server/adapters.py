"""LoRA adapters over HTTP: the request's `model` picks one, vLLM's routes load and unload them.

A request whose `model` is the served model's name runs on the base model; one naming a
registered adapter runs with it (`resolve_model`); anything else is a 404 `model_not_found` in
OpenAI's shape. `/v1/models` lists each adapter with the served model as its `parent`.
`POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` take vLLM's bodies (`lora_name`,
`lora_path`) and answer as vLLM does (200 and a line of text). Since loading reads a path on the
worker's disk, the two routes answer 403 unless the server was started with
`--allow-runtime-lora-updating` (vLLM gates them behind an environment variable). The adapter is
read and checked in a worker thread, off the engine thread; a malformed, unsupported or oversized
adapter is a 400 that says what is wrong, and the engine keeps serving.

The command-line flags live in `lora_flags` (importing this module loads torch).
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from llmos_worker.engine.adapters import AdapterManager
from llmos_worker.server.admission import Caller
from llmos_worker.server.errors import HTTPError
from llmos_worker.server.response import ModelCard
from llmos_worker.server.state import ServerState


def manager(state: ServerState) -> AdapterManager | None:
    """The engine's adapter manager; None before the model loads or without LoRA."""
    if state.front is None:
        return None
    found = getattr(state.front.engine, "adapters", None)
    return found if isinstance(found, AdapterManager) else None


def resolve_model(state: ServerState, model: str) -> str | None:
    """The adapter a request's `model` names (None: the base model); 404 for anything else."""
    if model == state.model_name:
        return None
    adapters = manager(state)
    if adapters is not None and model in adapters.names:
        return model
    raise HTTPError(
        404, f"The model `{model}` does not exist.", param="model", code="model_not_found"
    )


def adapter_cards(state: ServerState) -> list[ModelCard]:
    """`/v1/models` entries of the registered adapters, the served model as their parent."""
    adapters = manager(state)
    if adapters is None:
        return []
    return [
        ModelCard(id=info.name, created=info.created, root=info.path, parent=state.model_name)
        for info in adapters.listing
    ]


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None  # vLLM's; names identify adapters here


def _updating(state: ServerState) -> AdapterManager:
    state.serving_front()  # 503 while loading or draining
    adapters = manager(state)
    if adapters is None:
        raise HTTPError(
            400,
            "this server does not serve LoRA adapters; start it with --enable-lora",
            code="lora_disabled",
        )
    if not adapters.allow_runtime_updates:
        raise HTTPError(
            403,
            "loading and unloading adapters at run time is disabled; start the server with "
            "--allow-runtime-lora-updating",
            code="lora_updates_disabled",
        )
    return adapters


async def load_lora_adapter(
    state: ServerState, body: object, request: Request, caller: Caller
) -> Response:
    req = LoadLoRAAdapterRequest.model_validate(body)
    adapters = _updating(state)
    if req.lora_name == state.model_name:
        raise HTTPError(
            400,
            f"an adapter cannot be named {req.lora_name!r}: the base model has that name",
            param="lora_name",
            code="invalid_lora_name",
        )
    if req.lora_name in adapters.names:
        raise HTTPError(
            400,
            f"an adapter named {req.lora_name!r} is already loaded; unload it first",
            param="lora_name",
            code="lora_already_loaded",
        )
    if not adapters.runtime_path_allowed(req.lora_path):
        raise HTTPError(
            403,
            "lora_path is outside the directories this server loads adapters from "
            "(--lora-runtime-dir)",
            param="lora_path",
            code="lora_path_not_allowed",
        )
    # why a thread: reading (and maybe decrypting) the files must not stall the event loop
    adapter = await asyncio.to_thread(adapters.read, req.lora_name, req.lora_path)
    adapters.register(adapter)
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")


async def unload_lora_adapter(
    state: ServerState, body: object, request: Request, caller: Caller
) -> Response:
    req = UnloadLoRAAdapterRequest.model_validate(body)
    adapters = _updating(state)
    if req.lora_name not in adapters.names:
        raise HTTPError(
            404,
            f"The model `{req.lora_name}` does not exist.",
            param="lora_name",
            code="model_not_found",
        )
    adapters.unregister(req.lora_name)  # a concurrent unload raises model_not_found: 404
    return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
