"""The compiled programs of a (model, layout) pair: forward (full logits), prefill, decode.

Every program is jitted with explicit input and output shardings, once per shape bucket: batch
sizes and prompt lengths are padded up to powers of two, so prompts of many lengths share a handful
of executables. The KV cache is donated to the decode program, which updates it in place and runs
several decode steps (with on-device sampling) per dispatch.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infire_jax.engine.sampling import sample
from infire_jax.sharding import Layout, use_layout

__all__ = ["Programs", "bucket", "PlacedModel"]


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


@dataclasses.dataclass
class PlacedModel:
    """An NNX model's graph and its parameters placed on a layout."""

    graphdef: Any
    state: Any  # nnx.State of jax.Arrays with NamedShardings
    layout: Layout

    @functools.cached_property
    def module(self) -> Any:
        return nnx.merge(self.graphdef, self.state)

    @property
    def cfg(self):
        return self.module.cfg


SAMPLING_KEYS = ("temperature", "top_k", "top_p", "seed")


class Programs:
    """Compiled forward / prefill / decode programs for one PlacedModel."""

    def __init__(self, placed: PlacedModel, decode_steps: int = 8):
        self.placed = placed
        self.layout = placed.layout
        self.decode_steps = decode_steps
        self._state_shardings = jax.tree.map(lambda x: x.sharding, placed.state)
        self._cache: dict[tuple, Any] = {}
        self.compile_seconds: dict[tuple, float] = {}

    # ---- shardings -------------------------------------------------------------------------
    def _sh(self, axes: tuple, shape: tuple[int, ...]) -> jax.sharding.NamedSharding:
        return self.layout.sharding(axes, shape)

    def kv_sharding(self, batch: int, seq: int) -> jax.sharding.NamedSharding:
        m = self.placed.module
        return self._sh(m.kv_logical_axes, m.kv_shape(batch, seq))

    def _sampling_shardings(self, b: int) -> dict[str, Any]:
        return {k: self._sh(("batch",), (b,)) for k in SAMPLING_KEYS}

    def put(self, x: np.ndarray, axes: tuple) -> jax.Array:
        return jax.device_put(x, self._sh(axes, x.shape))

    def put_sampling(self, packed: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: self.put(packed[k], ("batch",)) for k in SAMPLING_KEYS}

    def _compiled(self, key: tuple, build) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def _timed(self, key: tuple, fn, *args):
        """Run fn; record the first call's wall time per key (dominated by compilation)."""
        if key in self.compile_seconds:
            return fn(*args)
        t0 = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        self.compile_seconds[key] = time.perf_counter() - t0
        return out

    @property
    def num_compiled(self) -> int:
        return len(self._cache)

    # ---- programs --------------------------------------------------------------------------
    def forward_fn(self, b: int, t: int):
        """(state, tokens (b, t)) -> logits (b, t, vocab): the whole sequence, no cache."""
        graphdef, layout = self.placed.graphdef, self.layout

        def forward(state, tokens):
            with use_layout(layout):
                model = nnx.merge(graphdef, state)
                h, _, _ = model(tokens, jnp.zeros((tokens.shape[0],), jnp.int32))
                return model.logits(h).astype(jnp.float32)

        vocab = self.placed.cfg.vocab_size
        return self._compiled(
            ("forward", b, t),
            lambda: jax.jit(
                forward,
                in_shardings=(self._state_shardings, self._sh(("batch", "seq"), (b, t))),
                out_shardings=self._sh(("batch", "seq", "vocab"), (b, t, vocab)),
            ),
        )

    def prefill_fn(self, b: int, t: int):
        """(state, tokens (b, t) right-padded, lengths (b,), sampling) ->
        (first sampled token (b,), its logits (b, vocab), k, v (L, b, KV, t, hd))."""
        graphdef, layout = self.placed.graphdef, self.layout

        def prefill(state, tokens, lengths, sp):
            with use_layout(layout):
                model = nnx.merge(graphdef, state)
                h, k, v = model(tokens, jnp.zeros((tokens.shape[0],), jnp.int32))
                last = h[jnp.arange(tokens.shape[0]), lengths - 1]
                logits = model.logits(last).astype(jnp.float32)
                return sample(logits, lengths, sp), logits, k, v

        vocab = self.placed.cfg.vocab_size
        kv = self.kv_sharding(b, t)
        row = self._sh(("batch",), (b,))
        return self._compiled(
            ("prefill", b, t),
            lambda: jax.jit(
                prefill,
                in_shardings=(self._state_shardings, self._sh(("batch", "seq"), (b, t)), row, self._sampling_shardings(b)),
                out_shardings=(row, self._sh(("batch", "vocab"), (b, vocab)), kv, kv),
            ),
        )

    def extend_cache_fn(self, b: int, t: int, s: int):
        """Pad prefill K/V (L, b, KV, t, hd) to a decode cache of s positions."""
        src, dst = self.kv_sharding(b, t), self.kv_sharding(b, s)

        def extend(k, v):
            pad = [(0, 0)] * 3 + [(0, s - t), (0, 0)]
            return jnp.pad(k, pad), jnp.pad(v, pad)

        return self._compiled(
            ("extend", b, t, s), lambda: jax.jit(extend, in_shardings=(src, src), out_shardings=(dst, dst))
        )

    def decode_fn(self, b: int, s: int, steps: int, with_logits: bool = False):
        """(state, k, v (L, b, KV, s, hd), tokens (b,), lengths (b,), sampling) ->
        (tokens (b, steps), k, v, last tokens, lengths[, logits (steps, b, vocab)]).

        Each step feeds tokens at position `lengths`, writes their K/V there and samples the next."""
        graphdef, layout = self.placed.graphdef, self.layout

        def decode(state, k_cache, v_cache, tokens, lengths, sp):
            with use_layout(layout):
                model = nnx.merge(graphdef, state)
                rows = jnp.arange(tokens.shape[0])

                def step(carry, _):
                    kc, vc, tok, ln = carry
                    h, kn, vn = model(tok[:, None], ln, kc, vc)
                    kc = kc.at[:, rows, :, ln, :].set(kn[:, :, :, 0].transpose(1, 0, 2, 3))
                    vc = vc.at[:, rows, :, ln, :].set(vn[:, :, :, 0].transpose(1, 0, 2, 3))
                    logits = model.logits(h[:, 0]).astype(jnp.float32)
                    nxt = sample(logits, ln + 1, sp)
                    return (kc, vc, nxt, ln + 1), ((nxt, logits) if with_logits else nxt)

                (kc, vc, tok, ln), ys = jax.lax.scan(step, (k_cache, v_cache, tokens, lengths), None, length=steps)
                toks = ys[0] if with_logits else ys
                out = (toks.T, kc, vc, tok, ln)
                return out + (ys[1],) if with_logits else out

        kv = self.kv_sharding(b, s)
        row = self._sh(("batch",), (b,))
        outs = (self._sh(("batch", None), (b, steps)), kv, kv, row, row)
        if with_logits:
            outs += (self._sh((None, "batch", "vocab"), (steps, b, self.placed.cfg.vocab_size)),)
        return self._compiled(
            ("decode", b, s, steps, with_logits),
            lambda: jax.jit(
                decode,
                in_shardings=(self._state_shardings, kv, kv, row, row, self._sampling_shardings(b)),
                out_shardings=outs,
                donate_argnums=(1, 2),
            ),
        )

    # ---- host-side drivers -----------------------------------------------------------------
    def logits(self, tokens: np.ndarray) -> np.ndarray:
        b, t = tokens.shape
        bb, tb = bucket(b), bucket(t, 16)
        padded = np.zeros((bb, tb), np.int32)
        padded[:b, :t] = tokens
        fn = self.forward_fn(bb, tb)
        out = self._timed(("forward", bb, tb), fn, self.placed.state, self.put(padded, ("batch", "seq")))
        return np.asarray(out)[:b, :t]
