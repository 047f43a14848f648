"""Request validation and the colocated generation loop (prefill once, decode in multi-step chunks)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from infire_jax.engine.programs import Programs, bucket
from infire_jax.engine.sampling import SamplingParams, pack_params

__all__ = ["RequestError", "validate_prompt", "generate"]


class RequestError(ValueError):
    """A request that cannot be served as given (empty prompt, too long, bad token ids)."""


def validate_prompt(prompt: Sequence[int], vocab_size: int, context: int, max_new_tokens: int) -> np.ndarray:
    """The prompt as int32, or one RequestError that names the problem and the fix."""
    try:
        arr = np.asarray(prompt)
    except Exception:
        raise RequestError("prompt must be a list of integer token ids") from None
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise RequestError(f"prompt must be a flat list of integer token ids, got array of shape {arr.shape} and dtype {arr.dtype}")
    if arr.size == 0:
        raise RequestError("prompt is empty; give at least one token (e.g. the BOS token)")
    bad = arr[(arr < 0) | (arr >= vocab_size)]
    if bad.size:
        raise RequestError(f"prompt has token ids outside the vocabulary [0, {vocab_size}): {bad[:8].tolist()}")
    if arr.size + max_new_tokens > context:
        raise RequestError(
            f"prompt of {arr.size} tokens + max_new_tokens={max_new_tokens} exceeds the context length {context}; "
            "shorten the prompt or lower max_new_tokens"
        )
    return arr.astype(np.int32)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def generate(
    programs: Programs, prompts: Sequence[np.ndarray], params: Sequence[SamplingParams], with_logits: bool = False
) -> list[list[int]] | tuple[list[list[int]], list[list[np.ndarray]]]:
    """Generate for a static batch of validated prompts. A row stops at max_new_tokens or right after
    one of its stop tokens (which is included in its output, as in HF generate). with_logits also
    returns the logits each token was drawn from (for tests and analysis)."""
    n = len(prompts)
    b = programs.batch_bucket(n)
    lengths = np.array([len(p) for p in prompts] + [1] * (b - n), np.int32)
    t = bucket(int(lengths.max()), 16)
    tokens = np.zeros((b, t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    sp = programs.put_sampling(pack_params(params, b))
    state = programs.placed.state
    first, first_logits, k, v = programs._timed(
        ("prefill", b, t), programs.prefill_fn(b, t), state,
        programs.put(tokens, ("batch", "seq")), programs.put(lengths, ("batch",)), sp,
    )
    max_new = max(p.max_new_tokens for p in params)
    pp, steps = programs.stages, programs.decode_steps
    s = bucket(max(t, int(lengths.max()) + _round_up(max_new, steps) + 1))
    k, v = programs.extend_cache_fn(b, t, s)(k, v)
    outputs: list[list[int]] = [[int(x)] for x in np.asarray(first)[:n]]
    logits: list[list[np.ndarray]] = [[row] for row in np.asarray(first_logits)[:n]] if with_logits else []
    done = [_finished(o, p) for o, p in zip(outputs, params)]
    ring = programs.init_ring(first, lengths)
    ticks, tick0, mb = steps * pp, 0, b // pp
    while not all(done):
        fn = programs.decode_fn(b, s, ticks, with_logits)
        emitted, k, v, ring = programs._timed(
            ("decode", b, s, ticks, with_logits), fn, state, k, v, ring, sp, np.int32(tick0)
        )
        if with_logits:
            emitted, step_logits = np.asarray(emitted[0]), np.asarray(emitted[1])
        emitted = np.asarray(emitted)
        for j in range(ticks):
            i = tick0 + j
            if i < pp - 1:
                continue  # the pipeline is still filling: the last stage has nothing yet
            r0 = ((i - pp + 1) % pp) * mb
            for row in range(r0, min(r0 + mb, n)):
                if not done[row]:
                    outputs[row].append(int(emitted[j, row - r0]))
                    if with_logits:
                        logits[row].append(step_logits[j, row - r0])
                    done[row] = _finished(outputs[row], params[row])
        tick0 += ticks
    return (outputs, logits) if with_logits else outputs


def _finished(out: list[int], p: SamplingParams) -> bool:
    return len(out) >= p.max_new_tokens or (bool(out) and out[-1] in p.stop_token_ids)
