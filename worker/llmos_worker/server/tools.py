"""Tool calling: tools into the prompt, tool calls out of the model's text, streamed or not.

Prompt. A chat template that knows tools (its source mentions `tools`, as Qwen2.5's, Hermes'
and Llama 3.1's do) gets them through `apply_chat_template(..., tools=...)`. Other templates
(SmolLM2's is plain ChatML) get the documented fallback, the Hermes format: a system message
that lists the functions' JSON schemas inside `<tools></tools>` and asks for each call as
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`; earlier assistant calls are
rendered in that same form and `role: tool` results as user turns wrapped in
`<tool_response></tool_response>`, so a multi-turn tool conversation reads consistently.

Output. The Hermes `<tool_call>` blocks of the answer become `message.tool_calls` (ids
`call_<24 hex>`, `arguments` a JSON string, as OpenAI sends them), the text before the first
block is `content` (null if empty) and `finish_reason` is `tool_calls`. With `tool_choice`
`required` or a named function, the output is constrained by a grammar (llguidance Lark with the
call's JSON schema embedded): one call (or, with `parallel_tool_calls`, one or more) whose
`arguments` always validate against the function's `parameters`. With `auto` the model decides;
a block that is not valid JSON naming an offered function is left in `content`.

Streaming. Text before a call streams as content deltas (holding back a tail that could begin
`<tool_call>`). Each call is sent as OpenAI does: a first delta with `index`, `id`, `type` and
`function.name` (arguments `""`) once the name has been generated, then its `arguments` when the
call's block closes.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from llmos_worker.engine.guided import Guide
from llmos_worker.server.protocol import ChatCompletionRequest, NamedToolChoice, Tool

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def template_knows_tools(chat_template: str | None) -> bool:
    """Whether the model's own chat template renders `tools` (else the fallback prompt)."""
    return bool(chat_template) and "tools" in str(chat_template)


def tool_dicts(tools: list[Tool]) -> list[dict[str, Any]]:
    return [t.model_dump(exclude_none=True) for t in tools]


def fallback_system_prompt(tools: list[Tool], choice: object) -> str:
    listing = "\n".join(_compact(t) for t in tool_dicts(tools))
    lines = [
        "You may call one or more functions to assist with the user query. The functions "
        "are described in JSON Schema within <tools></tools>:",
        f"<tools>\n{listing}\n</tools>",
        "To call a function, answer with a JSON object holding its name and arguments inside "
        "<tool_call></tool_call> tags:",
        '<tool_call>\n{"name":<function-name>,"arguments":<args-json-object>}\n</tool_call>',
    ]
    if isinstance(choice, NamedToolChoice):
        lines.append(f"You must call the function `{choice.function.name}`.")
    elif choice == "required":
        lines.append("You must call at least one function.")
    return "\n".join(lines)


def _call_text(name: str, arguments: Any) -> str:
    return f"{OPEN}\n{_compact({'name': name, 'arguments': arguments})}\n{CLOSE}"


def fallback_messages(req: ChatCompletionRequest, tools: list[Tool]) -> list[dict[str, Any]]:
    """The request's messages in the fallback format, for a template without tools support."""
    messages = req.template_messages()
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [
                _call_text(c["function"]["name"], c["function"]["arguments"])
                for c in m["tool_calls"]
            ]
            text = "\n".join(([m["content"]] if m["content"] else []) + calls)
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            out.append(
                {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
            )
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools:
        system = fallback_system_prompt(tools, req.tool_choice)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{system}"}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def call_schema(tools: list[Tool]) -> dict[str, Any]:
    """JSON schema of one call object `{"name": ..., "arguments": {...}}` of any of `tools`."""
    options = []
    for t in tools:
        params = t.function.parameters or {"type": "object", "properties": {}}
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": t.function.name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    # why: compact JSON, as the prompt shows it; flexible whitespace lets a weak model pad forever
    return {**schema, "x-guidance": {"whitespace_flexible": False}}


def forced_call_guide(req: ChatCompletionRequest, tools: list[Tool]) -> Guide | None:
    """The grammar that enforces tool_choice `required` / named; None for auto and none."""
    if not tools or not (
        req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice)
    ):
        return None
    call = f'"{OPEN}\\n" %json {json.dumps(call_schema(tools))} "\\n{CLOSE}"'
    many = req.parallel_tool_calls and not isinstance(req.tool_choice, NamedToolChoice)
    start = 'start: call ("\\n" call)*' if many else "start: call"
    return Guide.lark(f"{start}\ncall: {call}", "tools", kind="tool_call")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str  # a JSON object as text

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def parse_block(body: str, names: set[str]) -> ParsedCall | None:
    """One `<tool_call>` block's body as a call, or None if it is not a valid call."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # why: some models quote the arguments object
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(new_call_id(), str(obj["name"]), _compact(args))


def parse_tool_calls(
    text: str, tools: list[Tool], *, parallel: bool = True
) -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) of a finished answer; with no valid call, the whole text is content."""
    names = {t.function.name for t in tools}
    calls: list[ParsedCall] = []
    first = None
    for match in _BLOCK.finditer(text):
        call = parse_block(match.group(1), names)
        if call is None:
            continue
        if first is None:
            first = match.start()
        calls.append(call)
        if not parallel:
            break
    if not calls:
        return text, []
    content = text[:first].strip() if first is not None else ""
    return (content or None), calls


@dataclass
class ToolStreamParser:
    """Splits one choice's streamed text into content deltas and tool-call deltas."""

    names: set[str]
    parallel: bool = True
    text: str = ""  # all text received so far
    content_sent: int = 0  # chars of `text` sent as content
    calls: list[ParsedCall] = field(default_factory=list)
    _open_at: int | None = None  # where the block being generated starts
    _named: bool = False  # its name delta was sent
    _pending_id: str = ""

    def feed(self, delta: str, *, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        """New content and tool-call deltas (OpenAI's `delta.tool_calls` items) for `delta`."""
        self.text += delta
        content: list[str] = []
        out: list[dict[str, Any]] = []
        while True:
            if self._open_at is None:
                if self.calls and not self.parallel:
                    break
                start = self.text.find(OPEN, self.content_sent)
                if start < 0:
                    safe = len(self.text) if final else len(self.text) - _partial_open(self.text)
                    if not self.calls and safe > self.content_sent:
                        content.append(self.text[self.content_sent : safe])
                    self.content_sent = max(self.content_sent, safe)
                    break
                if not self.calls:
                    content.append(self.text[self.content_sent : start])
                self._open_at = start
                self.content_sent = start
            body_start = self._open_at + len(OPEN)
            end = self.text.find(CLOSE, body_start)
            if not self._named:
                m = _NAME.search(self.text, body_start, end if end >= 0 else len(self.text))
                if m is not None and m.group(1) in self.names:
                    self._pending_id = new_call_id()
                    self._named = True
                    out.append(
                        {
                            "index": len(self.calls),
                            "id": self._pending_id,
                            "type": "function",
                            "function": {"name": m.group(1), "arguments": ""},
                        }
                    )
            if end < 0:
                break
            call = parse_block(self.text[body_start:end].strip(), self.names)
            block_start, self.content_sent = self._open_at, end + len(CLOSE)
            self._open_at = None
            if call is not None:
                if self._named:
                    call.id = self._pending_id
                else:
                    out.append(
                        {
                            "index": len(self.calls),
                            "id": call.id,
                            "type": "function",
                            "function": {"name": call.name, "arguments": ""},
                        }
                    )
                out.append({"index": len(self.calls), "function": {"arguments": call.arguments}})
                self.calls.append(call)
            elif not self.calls:
                # why: a malformed block is content, as in the non-streamed answer
                content.append(self.text[block_start : self.content_sent])
            self._named = False
        if final and self._open_at is not None and not self.calls:
            content.append(self.text[self._open_at :])  # an unfinished block stays text
            self.content_sent = len(self.text)
            self._open_at = None
        return "".join(content), out


def _partial_open(text: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `<tool_call>`."""
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:k]):
            return k
    return 0
