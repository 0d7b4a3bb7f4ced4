"""The Hermes-format tool-call parser and its streaming form, on fixed model outputs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmos_worker.server.protocol import ChatCompletionRequest, Tool
from llmos_worker.server.tools import (
    ToolStreamParser,
    fallback_messages,
    parse_tool_calls,
    template_knows_tools,
)

TOOLS = [
    Tool.model_validate(
        {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    )
    for n in ("get_weather", "get_time")
]
NAMES = {"get_weather", "get_time"}

ANSWER = (
    "Let me check.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name":"get_time","arguments":{"zone":"UTC"}}\n</tool_call>'
)


def test_calls_and_leading_content_are_split() -> None:
    content, calls = parse_tool_calls(ANSWER, TOOLS)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "UTC"}),
    ]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id


def test_parallel_false_keeps_the_first_call() -> None:
    _, calls = parse_tool_calls(ANSWER, TOOLS, parallel=False)
    assert [c.name for c in calls] == ["get_weather"]


@pytest.mark.parametrize(
    "text",
    [
        "no calls here",
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',  # not offered
        '<tool_call>\n{"name": "get_time", "arguments": [1]}\n</tool_call>',
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}',  # never closed
    ],
)
def test_anything_but_a_valid_offered_call_stays_content(text: str) -> None:
    assert parse_tool_calls(text, TOOLS) == (text, [])


def stream(text: str, step: int) -> tuple[str, list[dict[str, Any]]]:
    parser = ToolStreamParser(NAMES)
    content, deltas = "", []
    pieces = [text[i : i + step] for i in range(0, len(text), step)]
    for i, piece in enumerate(pieces):
        c, d = parser.feed(piece, final=i == len(pieces) - 1)
        content += c
        deltas += d
    return content, deltas


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_streamed_deltas_accumulate_to_the_same_calls(step: int) -> None:
    content, deltas = stream(ANSWER, step)
    assert content == "Let me check.\n"
    by_index: dict[int, dict[str, Any]] = {}
    for d in deltas:
        call = by_index.setdefault(d["index"], {"id": None, "name": None, "arguments": ""})
        if "id" in d:
            assert call["id"] is None  # the id and name come once, first
            call["id"], call["name"] = d["id"], d["function"]["name"]
        call["arguments"] += d["function"].get("arguments", "")
    assert [c["name"] for c in by_index.values()] == ["get_weather", "get_time"]
    assert [json.loads(c["arguments"]) for c in by_index.values()] == [
        {"city": "Paris"},
        {"zone": "UTC"},
    ]


@pytest.mark.parametrize("step", [1, 4])
def test_streamed_text_without_calls_is_all_content(step: int) -> None:
    text = "a < b and <tool but not a call; <tool_call>{broken</tool_call> end"
    content, deltas = stream(text, step)
    assert (content, deltas) == (text, [])


def test_fallback_renders_history_and_tools_in_hermes_form() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "tools": [t.model_dump() for t in TOOLS],
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
            ],
        }
    )
    out = fallback_messages(req, req.active_tools())
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n") and "<tools>" in out[0]["content"]
    assert '"name":"get_weather"' in out[0]["content"]
    assert out[2]["content"] == (
        '<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo"}}\n</tool_call>'
    )
    assert out[3]["content"] == "<tool_response>\nrain\n</tool_response>"


def test_template_tools_support_is_detected() -> None:
    assert not template_knows_tools(None)
    assert not template_knows_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert template_knows_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
