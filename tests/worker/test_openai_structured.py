"""Structured outputs, tool calling and logit_bias through the unchanged `openai` client.

The tiny model's weights are random, so whatever it writes unconstrained is noise: every
structured answer below parses and validates only because the grammar mask made it so.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.worker.server_harness import InProcessServer, engine_factory

ASK = [{"role": "user", "content": "Describe a person."}]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "role": {"enum": ["admin", "user", "guest"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {
            "type": "array",
            "items": {"enum": ["a", "b", "c"]},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["name", "role", "age", "address", "tags"],
    "additionalProperties": False,
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[InProcessServer]:
    with InProcessServer(engine_factory(str(tiny_model_dir))) as srv:
        yield srv


@pytest.fixture
def client(server: InProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def chat(client: openai.OpenAI, server: InProcessServer, **kw: Any) -> Any:
    kw.setdefault("messages", ASK)
    kw.setdefault("max_tokens", 200)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=server.model, **kw)


# ------------------------------------------------------------------ structured outputs
@pytest.mark.parametrize("seed", [None, 1, 2])
def test_json_schema_output_validates(
    client: openai.OpenAI, server: InProcessServer, seed: int | None
) -> None:
    resp = chat(
        client,
        server,
        temperature=0 if seed is None else 1.0,
        seed=seed,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        },
    )
    (choice,) = resp.choices
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_output_is_an_object(client: openai.OpenAI, server: InProcessServer) -> None:
    resp = chat(client, server, response_format={"type": "json_object"}, max_tokens=400)
    assert isinstance(json.loads(resp.choices[0].message.content), dict)


def test_response_format_text_is_unconstrained(
    client: openai.OpenAI, server: InProcessServer
) -> None:
    plain = chat(client, server, max_tokens=8)
    text = chat(client, server, max_tokens=8, response_format={"type": "text"})
    assert text.choices[0].message.content == plain.choices[0].message.content


def test_json_schema_streamed_parses(client: openai.OpenAI, server: InProcessServer) -> None:
    stream = chat(
        client,
        server,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        ({"guided_regex": r"[0-9]{3}-[a-z]{2}"}, lambda t: len(t) == 6 and t[3] == "-"),
        ({"guided_choice": ["yes", "no", "maybe"]}, lambda t: t in ("yes", "no", "maybe")),
        ({"structured_outputs": {"choice": ["red", "green"]}}, lambda t: t in ("red", "green")),
        (
            {"guided_json": {"type": "array", "items": {"type": "integer"}, "maxItems": 4}},
            lambda t: all(isinstance(x, int) for x in json.loads(t)),
        ),
        (
            {"guided_grammar": 'start: "(" num ("+" num)* ")"\nnum: /[1-9]/'},
            lambda t: t.startswith("(") and t.endswith(")"),
        ),
    ],
)
def test_vllm_guided_fields(
    client: openai.OpenAI, server: InProcessServer, extra: dict[str, Any], check: Any
) -> None:
    resp = chat(client, server, extra_body=extra, max_tokens=60)
    text = resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "stop", text
    assert check(text), text


def test_guided_completion_endpoint(client: openai.OpenAI, server: InProcessServer) -> None:
    resp = client.completions.create(
        model=server.model,
        prompt="Pick: ",
        max_tokens=10,
        temperature=0,
        extra_body={"guided_choice": ["left", "right"]},
    )
    assert resp.choices[0].text in ("left", "right")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"guided_json": {"type": "nonsense"}}, "guided_json"),
        ({"guided_regex": "([a-z"}, "guided_regex"),
        ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 3}}}},
            "response_format.json_schema",
        ),
    ],
)
def test_invalid_constraint_is_a_400_naming_it(
    client: openai.OpenAI, server: InProcessServer, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, server, extra_body=extra)
    body = err.value.body
    assert isinstance(body, dict) and body["param"] == param, body


# ------------------------------------------------------------------ tools
def test_required_tool_call_is_valid_and_round_trips(
    client: openai.OpenAI, server: InProcessServer
) -> None:
    resp = chat(
        client,
        server,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    (choice,) = resp.choices
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])

    # the result goes back as a `tool` message; the assistant turn has content null
    follow = chat(
        client,
        server,
        max_tokens=5,
        tools=[WEATHER, TIME],
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [call.model_dump()],
            },
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
        ],
    )
    assert follow.choices[0].message.role == "assistant"
    assert follow.usage.prompt_tokens > resp.usage.prompt_tokens


def test_named_tool_choice_streams_openai_deltas(
    client: openai.OpenAI, server: InProcessServer
) -> None:
    stream = chat(
        client,
        server,
        stream=True,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    ids, names, args, reasons, content = [], [], "", [], ""
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                assert tc.index == 0
                if tc.id:
                    ids.append(tc.id)
                    names.append(tc.function.name)
                args += tc.function.arguments or ""
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert names == ["get_time"] and len(ids) == 1 and ids[0].startswith("call_")
    assert json.loads(args)["zone"] in ("UTC", "CET")
    assert reasons == ["tool_calls"]
    assert content == ""


def test_parallel_required_calls_each_validate(
    client: openai.OpenAI, server: InProcessServer
) -> None:
    resp = chat(client, server, tools=[WEATHER, TIME], tool_choice="required", max_tokens=300)
    calls = resp.choices[0].message.tool_calls
    assert calls and len({c.id for c in calls}) == len(calls)
    for call in calls:
        tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_tool_choice_none_and_auto_answer_in_text(
    client: openai.OpenAI, server: InProcessServer
) -> None:
    for choice in ("none", "auto"):
        resp = chat(client, server, tools=[WEATHER], tool_choice=choice, max_tokens=6)
        # the random model writes no <tool_call> block: a plain answer
        assert resp.choices[0].message.tool_calls is None
        assert resp.choices[0].finish_reason in ("stop", "length")


def test_tool_choice_naming_an_unknown_tool_is_a_400(
    client: openai.OpenAI, server: InProcessServer
) -> None:
    with pytest.raises(openai.BadRequestError):
        chat(
            client,
            server,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )


def test_tools_with_response_format_and_required_is_a_400(
    client: openai.OpenAI, server: InProcessServer
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        chat(
            client,
            server,
            tools=[WEATHER],
            tool_choice="required",
            response_format={"type": "json_object"},
        )
    assert err.value.body["param"] == "tool_choice"  # type: ignore[index]


# ------------------------------------------------------------------ logit_bias
def test_logit_bias_bans_and_forces(client: openai.OpenAI, server: InProcessServer) -> None:
    def tokens(**kw: Any) -> list[str]:
        resp = client.completions.create(
            model=server.model, prompt="Hello", temperature=0, logprobs=0, **kw
        )
        logprobs = resp.choices[0].logprobs
        assert logprobs is not None and logprobs.tokens is not None
        return logprobs.tokens

    (greedy,) = tokens(max_tokens=1)
    text_of = server.state.token_text
    greedy_id = next(t for t in range(server.state.tokenizer.vocab_size) if text_of(t) == greedy)
    (other,) = tokens(max_tokens=1, logit_bias={str(greedy_id): -100})
    assert other != greedy
    assert tokens(max_tokens=3, logit_bias={"42": 100}) == [server.state.token_text(42)] * 3


def test_unknown_fields_are_ignored_and_unsupported_ones_named(
    client: openai.OpenAI, server: InProcessServer
) -> None:
    resp = chat(
        client,
        server,
        max_tokens=2,
        store=False,
        metadata={"k": "v"},
        service_tier="auto",
        extra_body={"reasoning_effort": "low", "some_future_field": {"x": 1}},
    )
    assert resp.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, server, extra_body={"audio": {"voice": "alloy", "format": "wav"}})
    assert err.value.body["param"] == "audio"  # type: ignore[index]
