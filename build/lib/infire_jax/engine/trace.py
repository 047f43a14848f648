"""Multi-turn agent traces: generate them, replay them through an engine.

A coding agent resends the whole conversation every turn: turn k's prompt is turn k - 1's prompt, the
model's answer to it, a tool output and a new user message. A trace stores only what each turn adds
(`append`): the replay builds the prompt from the previous prompt and the tokens the engine actually
generated, so the history a turn resends is exactly what the engine cached.

JSONL, one line per turn, sessions interleaved by arrival time:
    {"session": 3, "turn": 0, "arrival_s": 0.41, "append": [ids...], "max_tokens": 16}
turn 0 appends the system prompt (shared by every session, or one per session) and the first user
message; turn k >= 1 appends a tool output and a user message. A turn is submitted at its arrival time
(seconds from the start of the replay) or when the session's previous turn finishes, whichever is later.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Iterable, Sequence

import numpy as np

from infire_jax.engine.sampling import SamplingParams

__all__ = ["Turn", "make_trace", "write_trace", "read_trace", "replay", "history_stats"]


@dataclasses.dataclass(frozen=True)
class Turn:
    session: int
    turn: int
    arrival_s: float
    append: tuple[int, ...]
    max_tokens: int


def make_trace(
    *,
    sessions: int,
    turns: int,
    vocab_size: int,
    system_tokens: int = 512,
    shared_system: bool = True,
    user_tokens: tuple[int, int] = (16, 48),
    tool_tokens: tuple[int, int] = (64, 256),
    max_tokens: int = 16,
    session_interval_s: float = 0.5,
    think_s: float = 0.0,
    seed: int = 0,
    low_token: int = 3,
) -> list[Turn]:
    """S sessions x T turns. Session s starts at s x session_interval_s; turn k arrives think_s x k
    later (the replay also waits for turn k - 1 to finish). Lengths are drawn uniformly from the
    (lo, hi) ranges; tokens uniformly from [low_token, vocab_size) (no special ids)."""
    if sessions < 1 or turns < 1:
        raise ValueError(f"sessions and turns must be >= 1, got {sessions} x {turns}")
    rng = np.random.default_rng(seed)

    def tokens(n: int) -> tuple[int, ...]:
        return tuple(int(t) for t in rng.integers(low_token, vocab_size, n))

    def length(lo_hi: tuple[int, int]) -> int:
        lo, hi = lo_hi
        return int(rng.integers(lo, hi + 1))

    shared = tokens(system_tokens)
    out = []
    for s in range(sessions):
        system = shared if shared_system else tokens(system_tokens)
        start = s * session_interval_s
        for k in range(turns):
            append = system + tokens(length(user_tokens)) if k == 0 else tokens(length(tool_tokens)) + tokens(length(user_tokens))
            out.append(Turn(s, k, round(start + k * think_s, 6), append, max_tokens))
    return sorted(out, key=lambda t: (t.arrival_s, t.session, t.turn))


def write_trace(trace: Iterable[Turn], path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        for t in trace:
            f.write(json.dumps(dict(session=t.session, turn=t.turn, arrival_s=t.arrival_s, append=list(t.append),
                                    max_tokens=t.max_tokens)) + "\n")


def read_trace(path: str | os.PathLike) -> list[Turn]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            d = json.loads(line)
            try:
                out.append(Turn(int(d["session"]), int(d["turn"]), float(d["arrival_s"]), tuple(int(x) for x in d["append"]),
                                int(d["max_tokens"])))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{n}: not a trace turn ({type(e).__name__}: {e}); fields: session, turn, "
                                 "arrival_s, append, max_tokens") from None
    _check(out)
    return out


def _check(trace: Sequence[Turn]) -> None:
    seen: dict[int, int] = {}
    for t in sorted(trace, key=lambda t: (t.session, t.turn)):
        if t.turn != seen.get(t.session, -1) + 1:
            raise ValueError(f"session {t.session} jumps to turn {t.turn}; turns must be 0, 1, 2, ... in each session")
        seen[t.session] = t.turn


def replay(
    engine: Any,
    trace: Sequence[Turn],
    *,
    temperature: float = 0.0,
    seed: int = 0,
    stop_token_ids: Sequence[int] = (),
    time_scale: float = 1.0,
    timeout: float = 3600.0,
) -> list[dict[str, Any]]:
    """Run a trace through an engine (engine/disagg.Engine or engine/remote.RemoteEngine): each turn
    submitted at arrival_s x time_scale or when its session's previous turn finished, whichever is
    later, with prompt = previous prompt + generated tokens + append. Returns one record per turn
    (request metrics + session, turn, prompt, output), in trace order."""
    _check(trace)
    by_session: dict[int, list[Turn]] = {}
    for t in sorted(trace, key=lambda t: (t.session, t.turn)):
        by_session.setdefault(t.session, []).append(t)
    history: dict[int, list[int]] = {s: [] for s in by_session}
    nxt = {s: 0 for s in by_session}
    running: dict[int, tuple[Turn, Any]] = {}
    records: dict[tuple[int, int], dict[str, Any]] = {}
    t0 = time.perf_counter()
    while len(records) < len(trace):
        now = time.perf_counter() - t0
        if now > timeout:
            raise TimeoutError(f"trace replay did not finish within {timeout:g} s ({len(records)}/{len(trace)} turns)")
        for s, turns in by_session.items():
            if s in running or nxt[s] >= len(turns) or turns[nxt[s]].arrival_s * time_scale > now:
                continue
            t = turns[nxt[s]]
            prompt = history[s] + list(t.append)
            params = SamplingParams(t.max_tokens, temperature, seed=(seed + 7919 * s + t.turn) % 2**32,
                                    stop_token_ids=tuple(stop_token_ids))
            running[s] = (t, engine.submit(prompt, params, request_id=("trace", s, t.turn)), prompt)
            nxt[s] += 1
        engine.step()
        for s in list(running):
            t, r, prompt = running[s]
            if not r.finished:
                continue
            del running[s]
            engine.requests.pop(r.id, None)
            if r.status != "done":
                raise RuntimeError(f"session {s} turn {t.turn} failed: {r.error}")
            history[s] = prompt + list(r.output)
            records[(s, t.turn)] = dict(r.metrics(), session=s, turn=t.turn, prompt=prompt, output=list(r.output),
                                        arrival_s=t.arrival_s)
    return [records[(t.session, t.turn)] for t in trace]


def history_stats(records: Sequence[dict[str, Any]], page_size: int) -> dict[str, int]:
    """What an exact prefix cache must do for a replayed trace (no evictions), from the conversations:
    per turn, the tokens of the previous turn's conversation (prompt + generated, but the last
    generated token, whose KV is never written) in whole pages are cached where that turn ran
    (colocated, or a decode worker); only the previous prompt's whole pages where a prefill worker
    ran it. Returns the totals: prompt tokens, tokens to compute colocated / on a prefill worker,
    pages a decode worker lacks (to transfer), and the cached share of the prompts of turns >= 1."""
    prev: dict[int, dict[str, Any]] = {}
    out = dict(prompt_tokens=0, colocated_computed=0, prefill_computed=0, pages_to_transfer=0,
               later_prompt_tokens=0, later_cached_tokens=0)
    for rec in sorted(records, key=lambda r: (r["session"], r["turn"])):
        n = len(rec["prompt"])
        p = prev.get(rec["session"])
        conv = (len(p["prompt"]) + len(p["output"]) - 1) // page_size * page_size if p else 0
        prompt_pages = len(p["prompt"]) // page_size * page_size if p else 0
        out["prompt_tokens"] += n
        out["colocated_computed"] += n - conv
        out["prefill_computed"] += n - prompt_pages
        out["pages_to_transfer"] += -(-n // page_size) - conv // page_size
        if p:
            out["later_prompt_tokens"] += n
            out["later_cached_tokens"] += conv
        prev[rec["session"]] = rec
    return out
