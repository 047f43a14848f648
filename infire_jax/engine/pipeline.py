"""Pipeline parallelism inside one SPMD program: shard_map over the "pp" mesh axis only.

tp/dp/ep stay automatic (GSPMD) inside each stage; only the stacked layer parameters and the KV cache
are split across stages, and the only cross-stage traffic is a ring ppermute of activations (plus the
sampled token ids going from the last stage back to the first).

Prefill runs M microbatches through the stages in GPipe order (M + pp - 1 ticks).

Decode keeps pp independent decode microbatches in flight: at tick i stage s works on microbatch
(i - s) mod pp, so once the ring is full every stage works every tick. The microbatch that leaves
the last stage samples its next token, which reaches stage 0 by the ring in time for the next tick.
The ring's state (activations in flight, each row's latest token and length) is carried across
calls, so the pipeline fills once per batch, not once per call.

With pp == 1 the same code runs without shard_map: one stage, one microbatch, no ring.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from infire_jax.engine.sampling import sample
from infire_jax.sharding import Layout, use_layout

__all__ = ["prefill", "decode", "init_ring", "stage_specs"]

PP = "pp"


def stage_specs(state: Any, layout: Layout) -> Any:
    """shard_map specs for an nnx.State: P('pp') for parameters whose leading logical axis the
    layout places on pp (the stacked layers), P() for the rest. Read from the logical axes, so it
    works on tracers too."""

    def spec(var):
        axes = var.get_metadata().get("logical_axes") or (None,)
        return P(PP) if PP in layout.spec(axes[:1]) else P()

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _ring(x: jax.Array, pp: int) -> jax.Array:
    """Send x from stage s to stage (s + 1) mod pp."""
    if pp == 1:
        return x
    return jax.lax.ppermute(x, PP, [(s, (s + 1) % pp) for s in range(pp)])


def _stage_index(pp: int) -> jax.Array:
    return jax.lax.axis_index(PP) if pp > 1 else jnp.int32(0)


def _run_staged(layout: Layout, fn, args: tuple, in_specs: tuple, out_specs: Any):
    pp = layout.mesh.shape[PP]
    if pp == 1:
        return fn(*args)
    return jax.shard_map(
        fn, mesh=layout.mesh, in_specs=in_specs, out_specs=out_specs, axis_names={PP}, check_vma=False
    )(*args)


def _rows(x: jax.Array, start: jax.Array, size: int, axis: int = 0) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def prefill(
    graphdef: Any, state: Any, layout: Layout, tokens: jax.Array, start: jax.Array, microbatches: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Normed hidden states (B, T, D) and the K/V of all layers (L, B, KV, T, hd)."""
    pp = layout.mesh.shape[PP]
    b, t = tokens.shape
    m_count = microbatches if pp > 1 else 1
    mb = b // m_count
    active_all = jnp.asarray(nnx.merge(graphdef, state).active)

    def staged(state, tokens, start, active):
        with use_layout(layout):
            model = nnx.merge(graphdef, state)
            s = _stage_index(pp)
            x_all = model.embed_tokens(tokens)
            ctx_all = model.context(start, t)
            k_shape, v_shape = model.kv_shapes(b, t)
            k_shape, v_shape = (active.shape[0],) + k_shape[1:], (active.shape[0],) + v_shape[1:]

            def tick(carry, i):
                recv, kbuf, vbuf, out = carry
                m = i - s
                valid = (m >= 0) & (m < m_count)
                r0 = jnp.clip(m, 0, m_count - 1) * mb
                x_in = jnp.where(s == 0, _rows(x_all, r0, mb), recv)
                ctx = jax.tree.map(lambda a: _rows(a, r0, mb), ctx_all)
                y, kn, vn = model.stack(x_in, ctx, active=active)
                keep = lambda new, old: jnp.where(valid, new, old)  # noqa: E731
                kbuf = jax.lax.dynamic_update_slice_in_dim(kbuf, keep(kn, _rows(kbuf, r0, mb, 1)), r0, 1)
                vbuf = jax.lax.dynamic_update_slice_in_dim(vbuf, keep(vn, _rows(vbuf, r0, mb, 1)), r0, 1)
                last = valid & (s == pp - 1)
                out = jax.lax.dynamic_update_slice_in_dim(out, jnp.where(last, y, _rows(out, r0, mb)), r0, 0)
                return (_ring(y, pp), kbuf, vbuf, out), None

            init = (
                jnp.zeros((mb, t, x_all.shape[-1]), x_all.dtype),
                jnp.zeros(k_shape, x_all.dtype),
                jnp.zeros(v_shape, x_all.dtype),
                jnp.zeros(x_all.shape, x_all.dtype),
            )
            (_, kbuf, vbuf, out), _ = jax.lax.scan(tick, init, jnp.arange(m_count + pp - 1))
            return model.norm(out)[None], kbuf, vbuf

    specs = (stage_specs(state, layout), P(), P(), P(PP))
    hidden, k, v = _run_staged(layout, staged, (state, tokens, start, active_all), specs, (P(PP), P(PP), P(PP)))
    return hidden[-1], k, v


def init_ring(batch: int, pp: int, width: int, first_tokens: jax.Array, lengths: jax.Array, dtype: Any) -> dict:
    """Decode ring state after prefill: nothing in flight, each row's first token and length."""
    return dict(
        recv=jnp.zeros((pp, batch // pp, 1, width), dtype),
        tokens=jnp.broadcast_to(first_tokens, (pp, batch)),
        lengths=jnp.broadcast_to(lengths, (pp, batch)),
    )


def decode(
    graphdef: Any,
    state: Any,
    layout: Layout,
    k_cache: jax.Array,
    v_cache: jax.Array,
    ring: dict,
    sampling: dict,
    tick0: jax.Array,
    ticks: int,
    with_logits: bool = False,
) -> tuple[Any, jax.Array, jax.Array, dict]:
    """Run `ticks` pipeline ticks from global tick `tick0`. Returns the tokens the last stage sampled,
    (ticks, B / pp) — tick i's belong to microbatch (i - pp + 1) mod pp, valid once i >= pp - 1 —
    (with their logits (ticks, B / pp, vocab) as a pair if with_logits), the caches and the ring."""
    pp = layout.mesh.shape[PP]
    active_all = jnp.asarray(nnx.merge(graphdef, state).active)
    b = k_cache.shape[1]
    mb = b // pp

    def staged(state, k_cache, v_cache, ring, sampling, tick0, active):
        with use_layout(layout):
            model = nnx.merge(graphdef, state)
            s = _stage_index(pp)
            ring = jax.tree.map(lambda a: a[0], ring)  # drop the stage axis (local view)

            def tick(carry, i):
                kc, vc, recv, toks, lens = carry
                m = jnp.mod(i - s, pp)
                valid = i >= s
                r0 = m * mb
                rows = r0 + jnp.arange(mb)
                pos = _rows(lens, r0, mb)
                x_in = jnp.where(s == 0, model.embed_tokens(_rows(toks, r0, mb)[:, None]), recv)
                ctx = model.context(pos, 1)
                y, kn, vn = model.stack(x_in, ctx, _rows(kc, r0, mb, 1), _rows(vc, r0, mb, 1), active=active)
                write = jnp.where(valid, pos, kc.shape[3])  # out of range -> dropped
                kc = kc.at[:, rows, :, write, :].set(kn[:, :, :, 0].transpose(1, 0, 2, 3), mode="drop")
                vc = vc.at[:, rows, :, write, :].set(vn[:, :, :, 0].transpose(1, 0, 2, 3), mode="drop")
                lens = jax.lax.dynamic_update_slice_in_dim(lens, pos + valid.astype(pos.dtype), r0, 0)
                sp = jax.tree.map(lambda a: _rows(a, r0, mb), sampling)
                logits = model.logits(model.norm(y)[:, 0]).astype(jnp.float32)
                nxt = sample(logits, pos + 1, sp)
                # The microbatch leaving the last stage now enters stage 0 next tick with its new token.
                got = _ring(nxt, pp)
                m_exit = jnp.mod(i + 1, pp)
                exit_valid = (i >= pp - 1) & (s == 0)
                old = _rows(toks, m_exit * mb, mb)
                toks = jax.lax.dynamic_update_slice_in_dim(toks, jnp.where(exit_valid, got, old), m_exit * mb, 0)
                return (kc, vc, _ring(y, pp), toks, lens), ((nxt, logits) if with_logits else nxt)

            carry = (k_cache, v_cache, ring["recv"], ring["tokens"], ring["lengths"])
            (kc, vc, recv, toks, lens), emitted = jax.lax.scan(tick, carry, tick0 + jnp.arange(ticks))
            new_ring = dict(recv=recv[None], tokens=toks[None], lengths=lens[None])
            return jax.tree.map(lambda e: e[None], emitted), kc, vc, new_ring

    ring_spec = {k: P(PP) for k in ring}
    specs = (stage_specs(state, layout), P(PP), P(PP), ring_spec, {k: P() for k in sampling}, P(), P(PP))
    emitted, kc, vc, ring = _run_staged(
        layout, staged, (state, k_cache, v_cache, ring, sampling, tick0, active_all), specs,
        (P(PP), P(PP), P(PP), ring_spec),
    )
    return jax.tree.map(lambda e: e[-1], emitted), kc, vc, ring
