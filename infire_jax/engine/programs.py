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

from infire_jax.engine import pipeline
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

    def kv_shardings(self, batch: int, seq: int) -> tuple[jax.sharding.NamedSharding, jax.sharding.NamedSharding]:
        m = self.placed.module
        return tuple(self._sh(m.kv_logical_axes, shape) for shape in m.kv_shapes(batch, seq))

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
    @property
    def stages(self) -> int:
        return self.layout.mesh.shape["pp"]

    def batch_bucket(self, n: int) -> int:
        """Padded batch size: a power of two, and a multiple of the pipeline depth."""
        return -(-bucket(n) // self.stages) * self.stages

    def _run_prefill(self, state, tokens):
        return pipeline.prefill(
            self.placed.graphdef, state, self.layout, tokens, jnp.zeros((tokens.shape[0],), jnp.int32), self.stages
        )

    def forward_fn(self, b: int, t: int):
        """(state, tokens (b, t)) -> logits (b, t, vocab): the whole sequence, no cache."""
        graphdef, layout = self.placed.graphdef, self.layout

        def forward(state, tokens):
            h, _, _ = self._run_prefill(state, tokens)
            with use_layout(layout):
                return nnx.merge(graphdef, state).logits(h).astype(jnp.float32)

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
            h, k, v = self._run_prefill(state, tokens)
            with use_layout(layout):
                last = h[jnp.arange(tokens.shape[0]), lengths - 1]
                logits = nnx.merge(graphdef, state).logits(last).astype(jnp.float32)
                return sample(logits, lengths, sp), logits, k, v

        vocab = self.placed.cfg.vocab_size
        k_sh, v_sh = self.kv_shardings(b, t)
        row = self._sh(("batch",), (b,))
        return self._compiled(
            ("prefill", b, t),
            lambda: jax.jit(
                prefill,
                in_shardings=(self._state_shardings, self._sh(("batch", "seq"), (b, t)), row, self._sampling_shardings(b)),
                out_shardings=(row, self._sh(("batch", "vocab"), (b, vocab)), k_sh, v_sh),
            ),
        )

    def extend_cache_fn(self, b: int, t: int, s: int):
        """Pad prefill K/V (L, b, KV, t, hd) to a decode cache of s positions."""
        src, dst = self.kv_shardings(b, t), self.kv_shardings(b, s)

        def extend(k, v):
            pad = [(0, 0)] * 3 + [(0, s - t), (0, 0)]
            return jnp.pad(k, pad), jnp.pad(v, pad)

        return self._compiled(
            ("extend", b, t, s), lambda: jax.jit(extend, in_shardings=src, out_shardings=dst)
        )

    def ring_shardings(self, b: int) -> dict[str, Any]:
        pp, d = self.stages, self.placed.cfg.hidden_size
        return dict(
            recv=self._sh(("stages", None, None, "embed"), (pp, b // pp, 1, d)),
            tokens=self._sh(("stages", None), (pp, b)),
            lengths=self._sh(("stages", None), (pp, b)),
        )

    def init_ring(self, first: jax.Array, lengths: np.ndarray) -> dict[str, jax.Array]:
        b = lengths.shape[0]
        ring = pipeline.init_ring(
            b, self.stages, self.placed.cfg.hidden_size, np.asarray(first), lengths, self.placed.module.compute_dtype
        )
        return jax.device_put(ring, self.ring_shardings(b))

    def decode_fn(self, b: int, s: int, ticks: int, with_logits: bool = False):
        """(state, k, v (L, b, KV, s, hd), ring, sampling, tick0) -> (tokens (ticks, b / pp), k, v, ring).

        Each tick runs one decode step of one in-flight microbatch on every stage (see pipeline.py)."""
        graphdef, layout = self.placed.graphdef, self.layout

        def decode(state, k_cache, v_cache, ring, sp, tick0):
            return pipeline.decode(graphdef, state, layout, k_cache, v_cache, ring, sp, tick0, ticks, with_logits)

        k_sh, v_sh = self.kv_shardings(b, s)
        ring = self.ring_shardings(b)
        return self._compiled(
            ("decode", b, s, ticks, with_logits),
            lambda: jax.jit(
                decode,
                in_shardings=(self._state_shardings, k_sh, v_sh, ring, self._sampling_shardings(b), self.layout.replicated),
                out_shardings=(self.layout.replicated, k_sh, v_sh, ring),
                donate_argnums=(1, 2, 3),
            ),
        )

    # ---- host-side drivers -----------------------------------------------------------------
    def logits(self, tokens: np.ndarray) -> np.ndarray:
        b, t = tokens.shape
        bb, tb = self.batch_bucket(b), bucket(t, 16)
        padded = np.zeros((bb, tb), np.int32)
        padded[:b, :t] = tokens
        fn = self.forward_fn(bb, tb)
        out = self._timed(("forward", bb, tb), fn, self.placed.state, self.put(padded, ("batch", "seq")))
        return np.asarray(out)[:b, :t]
