"""Request validation shared by the engine and the public API."""

from __future__ import annotations

from typing import Sequence

import numpy as np


__all__ = ["RequestError", "validate_prompt"]


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
