"""Token sampling on the device: greedy, temperature, top-k, top-p, seeded per request.

The random key of a token is fold_in(key(seed), position of the token), so a request's tokens depend
only on its own seed and text, never on which other requests share its batch or step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SamplingParams", "SamplingError", "sample", "pack_params", "per_request"]


class SamplingError(ValueError):
    """Sampling parameters outside their valid range."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (vLLM/OpenAI semantics)."""

    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 = disabled), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.seed, (int, np.integer)) or not (0 <= self.seed < 2**32):
            raise SamplingError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


def per_request(
    count: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_token_ids: Sequence[int] = (),
) -> list[SamplingParams]:
    """The params of a generate call's `count` requests: request i draws with seed + i."""
    return [
        SamplingParams(max_new_tokens, temperature, top_k, top_p, (seed + i) % 2**32, tuple(stop_token_ids))
        for i in range(count)
    ]


def pack_params(params: Sequence[SamplingParams | None], batch: int) -> dict[str, np.ndarray]:
    """Column arrays for a batch (padding rows are greedy)."""
    rows = list(params) + [None] * (batch - len(params))
    return dict(
        temperature=np.array([p.temperature if p else 0.0 for p in rows], np.float32),
        top_k=np.array([p.top_k if p else 0 for p in rows], np.int32),
        top_p=np.array([p.top_p if p else 1.0 for p in rows], np.float32),
        seed=np.array([p.seed if p else 0 for p in rows], np.uint32),
    )


def _sample_rows(logits: jax.Array, position: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    vocab = logits.shape[-1]
    temp = jnp.maximum(p["temperature"], 1e-6)[:, None]
    scaled = logits / temp
    order = jnp.sort(scaled, axis=-1)[:, ::-1]  # descending
    k = jnp.where(p["top_k"] > 0, jnp.minimum(p["top_k"], vocab), vocab)
    kth = jnp.take_along_axis(order, (k - 1)[:, None], axis=-1)
    probs = jax.nn.softmax(order, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each sorted token
    keep = (before < p["top_p"][:, None]) & (jnp.arange(vocab)[None, :] < k[:, None])
    pth = jnp.min(jnp.where(keep, order, jnp.inf), axis=-1, keepdims=True)
    masked = jnp.where(scaled >= jnp.maximum(kth, pth), scaled, -jnp.inf)
    keys = jax.vmap(lambda s, pos: jax.random.fold_in(jax.random.key(s), pos))(p["seed"], position)
    return jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)


def sample(logits: jax.Array, position: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
    """Next token per row. logits (B, V) float32; position (B,) = index of the token being drawn."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    any_random = jnp.any(params["temperature"] > 0)
    drawn = jax.lax.cond(any_random, lambda: _sample_rows(logits, position, params), lambda: greedy)
    return jnp.where(params["temperature"] > 0, drawn, greedy)
