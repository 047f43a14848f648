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

__all__ = ["SamplingParams", "SamplingError", "sample", "verify", "pack_params", "per_request"]


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


def _filtered(logits: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    """Temperature-scaled logits with the tokens outside top-k / top-p set to -inf: the distribution a
    sampled token is drawn from (softmax of this)."""
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
    return jnp.where(scaled >= jnp.maximum(kth, pth), scaled, -jnp.inf)


def _keys(p: dict[str, jax.Array], position: jax.Array) -> jax.Array:
    return jax.vmap(lambda s, pos: jax.random.fold_in(jax.random.key(s), pos))(p["seed"], position)


def _sample_rows(logits: jax.Array, position: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    return jax.vmap(jax.random.categorical)(_keys(p, position), _filtered(logits, p)).astype(jnp.int32)


def sample(logits: jax.Array, position: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
    """Next token per row. logits (B, V) float32; position (B,) = index of the token being drawn."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    any_random = jnp.any(params["temperature"] > 0)
    drawn = jax.lax.cond(any_random, lambda: _sample_rows(logits, position, params), lambda: greedy)
    return jnp.where(params["temperature"] > 0, drawn, greedy)


def verify(
    logits: jax.Array, drafts: jax.Array, proposed: jax.Array, start: jax.Array, params: dict[str, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    """Speculative verification: which proposed tokens the target model keeps, and the token after them.

    logits (B, C, V): the target's logits at columns 0 .. C-1 of a verify chunk (column j predicts the
    token at position start + j + 1); drafts (B, C): drafts[:, j] is the proposed token for that
    position (used for j < proposed); proposed (B,) proposals per row. Returns tokens (B, C) and
    accepted (B,): row r keeps tokens[r, :accepted[r] + 1] (its accepted drafts, then the target's own
    token at the first rejection, or a bonus token when every draft was accepted).

    Greedy rows accept a draft iff it is the argmax, so their tokens are exactly those of plain decoding.
    Sampled rows use speculative rejection sampling with a deterministic proposal (q = one-hot at the
    draft, as n-gram lookup and greedy drafting give): accept draft d with probability p(d), else draw
    from p with d removed (renormalised); the output follows p, the target's filtered distribution,
    exactly. Keys depend on (seed, position) only: a draw with no proposal uses the key `sample` uses,
    so a row that proposes nothing draws what plain decoding draws."""
    b, c, v = logits.shape
    logits = logits.astype(jnp.float32)
    cols = jnp.arange(c)[None, :]
    live = cols < proposed[:, None]  # (B, C): a draft to judge at this column
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    hit_greedy = live & (drafts == greedy)

    def sampled():
        flat = lambda x: jnp.repeat(x, c, axis=0)  # noqa: E731  (B,) -> (B * C,) row-major
        p = {k: flat(x) for k, x in params.items()}
        pos = (start[:, None] + cols + 1).reshape(-1)
        filt = _filtered(logits.reshape(b * c, v), p)
        d = drafts.reshape(-1)
        p_d = jnp.take_along_axis(jax.nn.softmax(filt, axis=-1), d[:, None], axis=-1)[:, 0]
        keys = _keys(p, pos)
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1)))(keys)
        hit = live.reshape(-1) & (u < p_d)
        removed = jnp.where(live.reshape(-1)[:, None] & (jnp.arange(v)[None, :] == d[:, None]), -jnp.inf, filt)
        removed = jnp.where(jnp.isfinite(removed).any(axis=-1, keepdims=True), removed, filt)  # p(d) = 1: always hit
        drawn = jax.vmap(jax.random.categorical)(keys, removed).astype(jnp.int32)
        return hit.reshape(b, c), drawn.reshape(b, c)

    hit_s, drawn = jax.lax.cond(jnp.any(params["temperature"] > 0), sampled, lambda: (hit_greedy, greedy))
    rand = (params["temperature"] > 0)[:, None]
    hit = jnp.where(rand, hit_s, hit_greedy)
    accepted = jnp.sum(jnp.cumprod(hit.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    own = jnp.where(rand, drawn, greedy)
    tokens = jnp.where(cols < accepted[:, None], drafts, own)
    return tokens, accepted
