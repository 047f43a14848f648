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
from infire_jax.kv import cache as kv_cache
from infire_jax.kv import transfer
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

    @functools.cached_property
    def compiler_options(self) -> dict[str, Any]:
        """XLA options for the decode program. On CPU, copy insertion with region analysis: without
        it XLA:CPU copies the loop-carried KV pages defensively inside the decode loop."""
        platforms = {d.platform for d in self.layout.mesh.devices.flat}
        return {"xla_cpu_copy_insertion_use_region_analysis": True} if platforms == {"cpu"} else {}

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

    # ---- paged decode ----------------------------------------------------------------------
    def page_shardings(self, num_pages: int, page_size: int):
        m = self.placed.module
        axes = kv_cache.paged_axes(m.kv_logical_axes)
        return tuple(
            self._sh(axes, (shape[0], num_pages, shape[2], page_size, shape[4]))
            for shape in m.kv_shapes(1, page_size)
        )

    def allocate_pages(self, num_pages: int, page_size: int) -> tuple[jax.Array, jax.Array]:
        """Zeroed k and v pages, created directly in their shardings."""
        m = self.placed.module
        out = []
        for shape, sh in zip(m.kv_shapes(1, page_size), self.page_shardings(num_pages, page_size)):
            full = (shape[0], num_pages, shape[2], page_size, shape[4])
            out.append(jax.jit(lambda: jnp.zeros(full, m.compute_dtype), out_shardings=sh)())
        return tuple(out)

    def decode_fn(self, b: int, pages_per_row: int, num_pages: int, page_size: int, steps: int, with_logits: bool = False):
        """(state, k_pages, v_pages, page_table (b, P), lengths, tokens, active, sampling) ->
        (tokens (steps, b)[, logits], k_pages, v_pages); the pages are donated (updated in place)."""
        graphdef, layout = self.placed.graphdef, self.layout

        def decode(state, k_pages, v_pages, page_table, lengths, tokens, active, sp):
            return pipeline.decode(
                graphdef, state, layout, k_pages, v_pages, page_table, lengths, tokens, active, sp, steps, with_logits
            )

        k_sh, v_sh = self.page_shardings(num_pages, page_size)
        rep = self.layout.replicated
        out = (rep, rep) if with_logits else rep
        return self._compiled(
            ("decode", b, pages_per_row, num_pages, page_size, steps, with_logits),
            lambda: jax.jit(
                decode,
                in_shardings=(self._state_shardings, k_sh, v_sh, rep, rep, rep, rep, {k: rep for k in SAMPLING_KEYS}),
                out_shardings=(out, k_sh, v_sh),
                donate_argnums=(1, 2),
                compiler_options=self.compiler_options,
            ),
        )

    # ---- KV handoff --------------------------------------------------------------------------
    def kv_spec(self) -> transfer.KVSpec:
        m = self.placed.module
        shapes = m.kv_shapes(1, 1)
        repeat = self.kv_repeat
        return transfer.KVSpec(
            model=transfer.model_fingerprint(self.placed.cfg),
            num_layers=len(m.layer_slots),
            heads=tuple(sh[2] // repeat for sh in shapes),
            dims=tuple(sh[4] for sh in shapes),
            dtype=str(jnp.dtype(m.compute_dtype)),
            logical_axes=tuple(m.kv_logical_axes),
        )

    @property
    def kv_repeat(self) -> int:
        m = self.placed.module
        return getattr(m, "kv_heads", m.cfg.num_kv_heads) // m.cfg.num_kv_heads

    def canonical_kv_shardings(self, b: int, t: int):
        spec = self.kv_spec()
        return tuple(
            self._sh(spec.logical_axes, (spec.num_layers, b, h, t, d)) for h, d in zip(spec.heads, spec.dims)
        )

    def canonical_kv_fn(self, b: int, t: int):
        """Prefill K/V in slot order (and with repeated KV heads) -> canonical (real layers, each KV
        head once): the form that crosses between meshes of different layouts."""
        slots = np.asarray(self.placed.module.layer_slots)
        repeat = self.kv_repeat

        def canon(k, v):
            return tuple(x[slots][:, :, ::repeat] for x in (k, v))

        return self._compiled(
            ("canonical", b, t),
            lambda: jax.jit(canon, in_shardings=self.kv_shardings(b, t), out_shardings=self.canonical_kv_shardings(b, t)),
        )

    def insert_fn(self, b: int, t: int, num_pages: int, page_size: int):
        """(k_pages, v_pages, canonical k, v (L, b, KV, t, hd), page ids (b, t / page)) -> pages with
        each row's prompt KV written into its pages (rows with page id = num_pages are skipped)."""
        slots = np.asarray(self.placed.module.layer_slots)
        num_slots = len(self.placed.module.active)
        repeat = self.kv_repeat

        def insert(k_pages, v_pages, k, v, page_ids):
            out = []
            for pages, x in ((k_pages, k), (v_pages, v)):
                x = jnp.repeat(x, repeat, axis=2) if repeat > 1 else x
                x = jnp.zeros((num_slots,) + x.shape[1:], x.dtype).at[slots].set(x)
                s_, b_, h, t_, d = x.shape
                x = x.reshape(s_, b_, h, t_ // page_size, page_size, d).transpose(0, 1, 3, 2, 4, 5)
                x = x.reshape(s_, b_ * (t_ // page_size), h, page_size, d)
                out.append(pages.at[:, page_ids.reshape(-1)].set(x.astype(pages.dtype), mode="drop"))
            return tuple(out)

        k_sh, v_sh = self.page_shardings(num_pages, page_size)
        ck, cv = self.canonical_kv_shardings(b, t)
        return self._compiled(
            ("insert", b, t, num_pages, page_size),
            lambda: jax.jit(
                insert,
                in_shardings=(k_sh, v_sh, ck, cv, self.layout.replicated),
                out_shardings=(k_sh, v_sh),
                donate_argnums=(0, 1),
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
