"""Write a multi-turn coding-agent trace (JSONL) for experiments/bench_agent_trace.py.

  python experiments/agent_trace.py --out /tmp/trace.jsonl --sessions 8 --turns 6 \
      --system_tokens 1024 --tool_tokens 200,300 --user_tokens 16,48 --max_tokens 16 --vocab_size 49152

S sessions x T turns. Turn 0 = a system prompt (shared by all sessions unless --noshared_system) + a
user message; turn k >= 1 = everything before (the replay appends the tokens the engine generated) + a
tool output + a new user message. Session s arrives at s x --session_interval_s, its turn k --think_s x k
later (and never before turn k - 1 has finished). Format: infire_jax/engine/trace.py.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSONL.", required=True)
flags.DEFINE_integer("sessions", 8, "Sessions (conversations).")
flags.DEFINE_integer("turns", 6, "Turns per session.")
flags.DEFINE_integer("system_tokens", 1024, "System prompt length.")
flags.DEFINE_bool("shared_system", True, "One system prompt for every session (else one per session).")
flags.DEFINE_string("user_tokens", "16,48", "User message length range lo,hi.")
flags.DEFINE_string("tool_tokens", "64,256", "Tool output length range lo,hi.")
flags.DEFINE_integer("max_tokens", 16, "Tokens generated per turn.")
flags.DEFINE_float("session_interval_s", 0.5, "Seconds between session starts.")
flags.DEFINE_float("think_s", 0.0, "Seconds between a session's turns (on top of waiting for the previous one).")
flags.DEFINE_integer("vocab_size", None, "Token ids are drawn from [3, vocab_size) (default: --model_dir's config).")
flags.DEFINE_string("model_dir", None, "Checkpoint whose vocab_size to use (default: the embedded tiny model).")
flags.DEFINE_integer("seed", 0, "Trace seed.")


def _range(text: str, name: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise app.UsageError(f"--{name} expects lo,hi (e.g. 16,48), got {text!r}") from None
    if not 0 <= lo <= hi:
        raise app.UsageError(f"--{name}: need 0 <= lo <= hi, got {lo},{hi}")
    return lo, hi


def main(argv: list[str]) -> None:
    del argv
    from infire_jax.engine import trace

    vocab = FLAGS.vocab_size
    if vocab is None:
        from infire_jax.checkpoint import tiny
        from infire_jax.config import load_config

        vocab = load_config(FLAGS.model_dir or tiny.ensure_default_model()).vocab_size
    turns = trace.make_trace(
        sessions=FLAGS.sessions, turns=FLAGS.turns, vocab_size=vocab, system_tokens=FLAGS.system_tokens,
        shared_system=FLAGS.shared_system, user_tokens=_range(FLAGS.user_tokens, "user_tokens"),
        tool_tokens=_range(FLAGS.tool_tokens, "tool_tokens"), max_tokens=FLAGS.max_tokens,
        session_interval_s=FLAGS.session_interval_s, think_s=FLAGS.think_s, seed=FLAGS.seed,
    )
    trace.write_trace(turns, FLAGS.out)
    last = max(turns, key=lambda t: t.turn)
    longest = sum(len(t.append) + t.max_tokens for t in turns if t.session == last.session)
    print(json.dumps(dict(out=FLAGS.out, turns=len(turns), sessions=FLAGS.sessions, vocab_size=vocab,
                          longest_conversation_tokens=longest)))


if __name__ == "__main__":
    app.run(main)
