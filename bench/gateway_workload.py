"""The gateway benchmark's workload and per-run statistics (pure: no servers, no clock).

Many chat sessions, each with its own long system prompt cut from real text (Python's reference
documentation, `bench.corpus`), and several turns each: turn k sends the system prompt, the k-1
earlier user turns with the replies the server gave, and a new user turn. A session's requests
therefore share a long leading prefix that only one worker's prefix cache needs to hold. Every
session's system prompt opens with its run's salt and its own number, so that a run never finds a
previous run's prefix cached and no two sessions share their first characters (the gateway keys
prefix routing on the leading characters).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.metrics import RequestTiming, summarize

HITS, QUERIES = "llmos_prefix_cache_hits", "llmos_prefix_cache_queries"
DECISIONS = "llmos_gateway_routing_decisions"


@dataclass(frozen=True)
class Session:
    """One conversation: its system prompt and the user turns it sends, in order."""

    sid: str
    system: str
    users: tuple[str, ...]


def _window(text: str, start: int, chars: int) -> str:
    """`chars` characters of `text` from `start`, wrapping around its end."""
    start %= len(text)
    out = text[start : start + chars]
    while len(out) < chars:
        out += "\n" + text[: chars - len(out) - 1]
    return out[:chars]


def make_sessions(
    text: str, *, sessions: int, turns: int, system_chars: int, user_chars: int, salt: str
) -> list[Session]:
    """`sessions` sessions of `turns` user turns, system prompts of `system_chars` characters.

    Sessions take their text from evenly spaced places in `text`, so their prompts differ from
    the first character on (the salt and number) and in the body."""
    if sessions < 1 or turns < 1:
        raise ValueError("sessions and turns must be at least 1")
    if system_chars < 64 or user_chars < 8:
        raise ValueError("system_chars must be >= 64 and user_chars >= 8")
    if not text.strip():
        raise ValueError("the source text is empty")
    stride = max(1, len(text) // sessions)
    out: list[Session] = []
    for i in range(sessions):
        sid = f"{salt}-{i:02d}"
        head = f"[session {sid}] You answer questions about the text below.\n\n"
        system = head + _window(text, i * stride, system_chars - len(head))
        users = tuple(
            f"Question {k + 1}: "
            + _window(text, i * stride + system_chars + k * user_chars, user_chars)
            for k in range(turns)
        )
        out.append(Session(sid, system, users))
    return out


def messages(session: Session, replies: Sequence[str]) -> list[dict[str, str]]:
    """The chat messages of the session's next turn, after `replies` (one per earlier turn)."""
    turn = len(replies)
    if turn >= len(session.users):
        raise ValueError(f"session {session.sid} has only {len(session.users)} turns")
    msgs = [{"role": "system", "content": session.system}]
    for k, reply in enumerate(replies):
        msgs += [
            {"role": "user", "content": session.users[k]},
            {"role": "assistant", "content": reply},
        ]
    msgs.append({"role": "user", "content": session.users[turn]})
    return msgs


def chat_body(model: str, msgs: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """A streamed chat completion of exactly `max_tokens` tokens (greedy, EOS ignored)."""
    return {
        "model": model,
        "messages": msgs,
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def parse_chunk(data: str) -> tuple[str, int | None, int | None]:
    """(content delta, completion tokens, prompt tokens) of one chat SSE `data:` payload."""
    import json

    msg = json.loads(data)
    usage = msg.get("usage") if isinstance(msg, dict) else None
    completion = prompt = None
    if isinstance(usage, dict):
        if usage.get("completion_tokens") is not None:
            completion = int(usage["completion_tokens"])
        if usage.get("prompt_tokens") is not None:
            prompt = int(usage["prompt_tokens"])
    choices = msg.get("choices") if isinstance(msg, dict) else None
    text = ""
    if choices and isinstance(choices[0], dict):
        delta = choices[0].get("delta") or {}
        text = str(delta.get("content") or "") if isinstance(delta, dict) else ""
    return text, completion, prompt


def prefix_counters(metrics_text: str) -> dict[str, float]:
    """The prefix cache's hit and query counters (prompt tokens) of a worker's /metrics page."""
    out = {HITS: 0.0, QUERIES: 0.0}
    for family in text_string_to_metric_families(metrics_text):
        if family.name in out:
            out[family.name] = sum(
                s.value for s in family.samples if s.name in (family.name, family.name + "_total")
            )
    return out


def routing_outcomes(metrics_text: str) -> dict[str, float]:
    """The gateway's replica choices by outcome (affinity, overflow, round_robin, least_load)
    from its /metrics page, summed over strategies."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != DECISIONS:
            continue
        for s in family.samples:
            if s.name in (DECISIONS, DECISIONS + "_total") and "outcome" in s.labels:
                out[s.labels["outcome"]] = out.get(s.labels["outcome"], 0.0) + s.value
    return out


def outcome_shares(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """Each outcome's share of the choices made between two scrapes (empty: none made)."""
    made = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    total = sum(made.values())
    return {k: round(v / total, 3) for k, v in sorted(made.items()) if v > 0} if total else {}


def hit_rate(before: Mapping[str, float], after: Mapping[str, float]) -> float | None:
    """Prompt tokens found in the cache over those looked up between two scrapes (None: none)."""
    queries = after[QUERIES] - before[QUERIES]
    if queries < 0 or after[HITS] < before[HITS]:
        raise ValueError("a counter went backwards (did the worker restart?)")
    return (after[HITS] - before[HITS]) / queries if queries > 0 else None


def run_stats(timings: Sequence[RequestTiming], wall_s: float) -> dict[str, Any]:
    """One run of one strategy: TTFT mean / median / p90 (ms), mean TTFT of first and of later
    turns (request ids `SESSION/TURN`), and output tokens per second over the run's wall time
    (first send to last reply), with the counts."""
    done = [t for t in timings if t.ok]
    ttft = summarize([t.ttft for t in done])
    first = [t.ttft for t in done if t.request_id.endswith("/0")]
    later = [t.ttft for t in done if not t.request_id.endswith("/0")]
    tokens = sum(t.output_len for t in done)
    errors = sorted({t.error for t in timings if t.error})
    return {
        "requests": len(timings),
        "completed": len(done),
        "failed": len(timings) - len(done),
        "ttft_mean_ms": round(ttft["mean_ms"], 1),
        "ttft_median_ms": round(ttft["median_ms"], 1),
        "ttft_p90_ms": round(ttft["p90_ms"], 1),
        # why: a session's first turn finds nothing cached under any strategy; later turns are
        # where the routing makes its difference
        "ttft_first_turn_mean_ms": round(summarize(first)["mean_ms"], 1) if first else None,
        "ttft_later_turns_mean_ms": round(summarize(later)["mean_ms"], 1) if later else None,
        "output_tokens": tokens,
        "wall_s": round(wall_s, 2),
        "output_tok_s": round(tokens / wall_s, 2) if wall_s > 0 else 0.0,
        "errors": errors[:3],
    }
