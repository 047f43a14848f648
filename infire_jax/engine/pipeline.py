"""Pipeline parallelism inside one SPMD program: shard_map over the "pp" mesh axis only.

tp/dp/ep stay automatic (GSPMD) inside each stage; only the stacked layer parameters and the KV cache
are split across stages, and the only cross-stage traffic is a ring ppermute of activations (plus the
sampled token ids going from the last stage back to the first).

Prefill runs M microbatches through the stages in GPipe order (M + pp - 1 ticks).

Decode keeps pp independent decode microbatches in flight: at tick i stage s works on microbatch
(i - s) mod pp, so once the ring is full every stage works every tick. The microbatch that leaves
the last stage samples its next token, which reaches stage 0 by the ring in time for the next tick.
Each call starts from an empty ring and runs `steps` tokens per row (fill and drain cost pp - 1
ticks out of steps * pp + pp - 1), so requests can join and leave the batch between any two calls.

With pp == 1 the same code runs without shard_map: one stage, one microbatch, no ring.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from infire_jax.engine.sampling import sample
from infire_jax.flax_nnx import nnx
from infire_jax.kernels import dispatch
from infire_jax.kv.paged import PagedLayerCache, PagedPool, rows_of_pages
from infire_jax.sharding import Layout, use_layout

__all__ = ["prefill", "decode", "chunk", "stage_specs"]

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


def _capturing(capture: jax.Array | None) -> dict[str, jax.Array]:
    """stack()'s keyword for a capture selection (none without one: families that cannot capture)."""
    return {} if capture is None else {"capture": capture}


def _fused(captured: jax.Array) -> jax.Array:
    """Per-stage captures (stages, n, B, ..., D), each stage's own layers filled and zeros elsewhere,
    as the layers' hidden states side by side (B, ..., n D)."""
    cap = captured.sum(0)
    return jnp.moveaxis(cap, 0, -2).reshape(cap.shape[1:-1] + (cap.shape[0] * cap.shape[-1],))


def prefill(
    graphdef: Any, state: Any, layout: Layout, tokens: jax.Array, start: jax.Array, microbatches: int,
    capture: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """Normed hidden states (B, T, D) and the K/V of all layers (L, B, KV, T, hd); with capture (a
    (slots, n) bool selection, Family.captures_hidden) also the captured layer inputs (B, T, n D)."""
    pp = layout.mesh.shape[PP]
    b, t = tokens.shape
    m_count = microbatches if pp > 1 else 1
    mb = b // m_count
    active_all = jnp.asarray(nnx.merge(graphdef, state).active)

    def staged(state, tokens, start, active, capture):
        with use_layout(layout):
            model = nnx.merge(graphdef, state)
            s = _stage_index(pp)
            x_all = model.embed_tokens(tokens)
            ctx_all = model.context(start, t)
            k_shape, v_shape = model.kv_shapes(b, t)
            k_shape, v_shape = (active.shape[0],) + k_shape[1:], (active.shape[0],) + v_shape[1:]

            def tick(carry, i):
                recv, kbuf, vbuf, out, cbuf = carry
                m = i - s
                valid = (m >= 0) & (m < m_count)
                r0 = jnp.clip(m, 0, m_count - 1) * mb
                x_in = jnp.where(s == 0, _rows(x_all, r0, mb), recv)
                ctx = jax.tree.map(lambda a: _rows(a, r0, mb), ctx_all)
                y, kn, vn, *cap = model.stack(x_in, ctx, active=active, **_capturing(capture))
                keep = lambda new, old: jnp.where(valid, new, old)  # noqa: E731
                kbuf = jax.lax.dynamic_update_slice_in_dim(kbuf, keep(kn, _rows(kbuf, r0, mb, 1)), r0, 1)
                vbuf = jax.lax.dynamic_update_slice_in_dim(vbuf, keep(vn, _rows(vbuf, r0, mb, 1)), r0, 1)
                if cap:
                    cbuf = jax.lax.dynamic_update_slice_in_dim(cbuf, keep(cap[0], _rows(cbuf, r0, mb, 1)), r0, 1)
                last = valid & (s == pp - 1)
                out = jax.lax.dynamic_update_slice_in_dim(out, jnp.where(last, y, _rows(out, r0, mb)), r0, 0)
                return (_ring(y, pp), kbuf, vbuf, out, cbuf), None

            init = (
                jnp.zeros((mb, t, x_all.shape[-1]), x_all.dtype),
                jnp.zeros(k_shape, x_all.dtype),
                jnp.zeros(v_shape, x_all.dtype),
                jnp.zeros(x_all.shape, x_all.dtype),
                None if capture is None else jnp.zeros((capture.shape[1],) + x_all.shape, x_all.dtype),
            )
            (_, kbuf, vbuf, out, cbuf), _ = jax.lax.scan(tick, init, jnp.arange(m_count + pp - 1))
            return model.norm(out)[None], kbuf, vbuf, None if cbuf is None else cbuf[None]

    specs = (stage_specs(state, layout), P(), P(), P(PP), P(PP))
    hidden, k, v, cap = _run_staged(
        layout, staged, (state, tokens, start, active_all, capture), specs, (P(PP), P(PP), P(PP), P(PP))
    )
    return (hidden[-1], k, v) if cap is None else (hidden[-1], k, v, _fused(cap))


def _gather_pages(pages: jax.Array, table: jax.Array, per_layer: bool = False, in_place: bool = False) -> Any:
    """(L, pages, H, page, d)[:, table (B, P)] -> a contiguous per-row view (L, B, H, P * page, d),
    or with per_layer a list of L per-layer views of the pool (kv.paged.PagedLayerCache): a model
    that runs its layers unrolled reads each layer's pages in place (a kernel) or gathers that
    layer alone (slicing one layer out of an all-layer gather would copy it again). in_place (the
    kernel dispatch reads every layer's pages in place): a scanned stack gets the pool itself."""
    if per_layer:
        return [PagedLayerCache(pages, table, i) for i in range(pages.shape[0])]
    if in_place:
        return PagedPool(pages, table)
    return rows_of_pages(pages[:, table])


def write_kv(
    k_pages: tuple, v_pages: tuple, tables: list, windows: tuple, rows: jax.Array, pos: jax.Array, ok: jax.Array,
    new_kv: list, arrange, end: jax.Array | None = None,
) -> tuple[tuple, tuple]:
    """Store new K/V in the pages of every cache group. Entry i of rows, pos, ok (N,) is row rows[i]'s
    position pos[i], stored where ok[i]: in page table[rows[i], pos[i] // page] (a windowed group: ring
    slot pos mod W). new_kv[g] is group g's (k, v), which `arrange` turns into (N, layers, KV, hd).
    end (N,), one past the last new position of entry i's row, marks a chunk: a ring keeps only its
    last W positions (older ones would share their slots) and positions the table does not cover are
    dropped; without it (decode: one token per row) every entry is stored."""
    k_pages, v_pages = list(k_pages), list(v_pages)
    for g, ((kg, vg), table, window) in enumerate(zip(new_kv, tables, windows)):
        num_pages, page = k_pages[g].shape[1], k_pages[g].shape[3]
        slot = pos if window is None else pos % window
        keep = ok
        if end is not None:  # a chunk: positions past the table are dropped, not clamped onto its last page
            keep = keep & (slot // page < table.shape[1])
            if window is not None:
                keep = keep & (pos >= end - window)
        target = jnp.where(keep, table[rows, slot // page], num_pages)  # out of range: dropped
        k_pages[g] = k_pages[g].at[:, target, :, slot % page, :].set(arrange(kg), mode="drop")
        v_pages[g] = v_pages[g].at[:, target, :, slot % page, :].set(arrange(vg), mode="drop")
    return tuple(k_pages), tuple(v_pages)


def _group_kv(kn: jax.Array, vn: jax.Array, write_slots: list | None, stage: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """The new K/V (slots, B, ...) of a stage's layer slots, per cache group: the group's stage-local
    stack (CacheGroups.write_slots), or every slot for a model with one group."""
    if write_slots is None:
        return [(kn, vn)]
    return [(kn[w[stage]], vn[w[stage]]) for w in write_slots]


def decode(
    graphdef: Any,
    state: Any,
    layout: Layout,
    k_pages: Any,
    v_pages: Any,
    page_table: Any,
    lengths: jax.Array,
    tokens: jax.Array,
    active: jax.Array,
    sampling: dict,
    steps: int,
    with_logits: bool = False,
    capture: jax.Array | None = None,
) -> tuple[Any, ...]:
    """`steps` decode steps for every row of a paged batch, from an empty pipeline.

    Row r feeds tokens[r] at position lengths[r] (its KV goes to page page_table[r, pos // page]),
    samples the next token and repeats. Inactive rows write nothing. With pp stages the B rows form
    pp microbatches and the program runs steps * pp + pp - 1 ticks: pp - 1 to fill the pipeline, then
    every stage works every tick, then pp - 1 to drain. Returns the sampled tokens (steps, B) (and
    their logits (steps, B, vocab) as a pair if with_logits) and the updated pages.

    A model with KV cache groups (kv/cache.py) takes k_pages, v_pages and page_table as tuples with
    one entry per group; a windowed group's position p goes to ring slot p mod W. With capture (see
    prefill) the captured layer inputs of every step come after the tokens, (steps, B, n D)."""
    pp = layout.mesh.shape[PP]
    module = nnx.merge(graphdef, state)
    active_layers = jnp.asarray(module.active)
    b = tokens.shape[0]
    mb = b // pp
    ticks = steps * pp + pp - 1
    groups = module.cache_groups()
    windows = groups.windows if groups else (None,)
    # per group, (stages, stage-local stack) -> the stage-local slot whose new K/V it stores
    write_slots = [jnp.asarray(t) for t in groups.write_slots(len(module.active) // pp)] if groups else None
    as_groups = (lambda x: x) if groups else (lambda x: (x,))  # noqa: E731

    def staged(state, k_pages, v_pages, page_table, lengths, tokens, active, sampling, active_layers, capture):
        with use_layout(layout):
            model = nnx.merge(graphdef, state)
            s = _stage_index(pp)
            d = model.cfg.hidden_size
            vocab = model.cfg.vocab_size

            def tick(carry, i):
                kp, vp, recv, toks, lens, out_tok, out_logits, cbuf = carry
                m = jnp.mod(i - s, pp)
                valid = (i >= s) & (i - s < steps * pp)
                r0 = m * mb
                pos = _rows(lens, r0, mb)
                tables = [_rows(t, r0, mb) for t in as_groups(page_table)]
                x_in = jnp.where(s == 0, model.embed_tokens(_rows(toks, r0, mb)[:, None]), recv)
                ctx = model.context(pos, 1)
                per_layer, in_place = model.unrolled, dispatch.pages_in_place()
                kc = tuple(_gather_pages(k, t, per_layer, in_place) for k, t in zip(kp, tables))
                vc = tuple(_gather_pages(v, t, per_layer, in_place) for v, t in zip(vp, tables))
                kc, vc = (kc, vc) if groups else (kc[0], vc[0])
                y, kn, vn, *cap = model.stack(x_in, ctx, kc, vc, active=active_layers, **_capturing(capture))
                if cap:  # this stage's captures of its microbatch's step, (n, mb, 1, D)
                    at = (0, jnp.clip((i - s) // pp, 0, steps - 1), r0, 0)
                    cur = jax.lax.dynamic_slice(cbuf, at, (cbuf.shape[0], 1, mb, d))
                    cbuf = jax.lax.dynamic_update_slice(cbuf, jnp.where(valid, cap[0].transpose(0, 2, 1, 3), cur), at)
                ok = valid & _rows(active, r0, mb)
                one = lambda x: x[:, :, :, 0].transpose(1, 0, 2, 3)  # noqa: E731  (L, mb, KV, 1, hd) -> (mb, L, KV, hd)
                kp, vp = write_kv(kp, vp, tables, windows, jnp.arange(mb), pos, ok, _group_kv(kn, vn, write_slots, s), one)
                lens = jax.lax.dynamic_update_slice_in_dim(lens, pos + valid.astype(pos.dtype), r0, 0)
                logits = model.logits(model.norm(y)[:, 0]).astype(jnp.float32)
                nxt = sample(logits, pos + 1, jax.tree.map(lambda a: _rows(a, r0, mb), sampling))
                # The microbatch leaving the last stage enters stage 0 next tick with its new token.
                exit_i = i - (pp - 1)
                exit_ok = (exit_i >= 0) & (exit_i < steps * pp)
                m_exit, k_exit = jnp.mod(exit_i, pp), jnp.maximum(exit_i, 0) // pp
                got = _ring(nxt, pp)
                old = _rows(toks, m_exit * mb, mb)
                toks = jax.lax.dynamic_update_slice_in_dim(toks, jnp.where(exit_ok & (s == 0), got, old), m_exit * mb, 0)
                # The last stage records what it sampled (its own microbatch is the exiting one).
                keep = exit_ok & (s == pp - 1)
                at = (jnp.minimum(k_exit, steps - 1), r0)
                cur = jax.lax.dynamic_slice(out_tok, at, (1, mb))
                out_tok = jax.lax.dynamic_update_slice(out_tok, jnp.where(keep, nxt[None], cur), at)
                if with_logits:
                    cur = jax.lax.dynamic_slice(out_logits, at + (0,), (1, mb, vocab))
                    out_logits = jax.lax.dynamic_update_slice(out_logits, jnp.where(keep, logits[None], cur), at + (0,))
                return (kp, vp, _ring(y, pp), toks, lens, out_tok, out_logits, cbuf), None

            carry = (
                as_groups(k_pages),
                as_groups(v_pages),
                jnp.zeros((mb, 1, d), model.compute_dtype),
                tokens,
                lengths,
                jnp.zeros((steps, b), jnp.int32),
                jnp.zeros((steps, b, vocab) if with_logits else (0,), jnp.float32),
                None if capture is None else jnp.zeros((capture.shape[1], steps, b, d), model.compute_dtype),
            )
            (kp, vp, _, _, _, out_tok, out_logits, cbuf), _ = jax.lax.scan(tick, carry, jnp.arange(ticks))
            out = (out_tok[None], out_logits[None]) if with_logits else out_tok[None]
            cbuf = None if cbuf is None else cbuf[None]
            return (out, kp, vp, cbuf) if groups else (out, kp[0], vp[0], cbuf)

    specs = (
        stage_specs(state, layout), P(PP), P(PP), P(), P(), P(), P(), {k: P() for k in sampling}, P(PP), P(PP),
    )
    out_spec = (P(PP), P(PP)) if with_logits else P(PP)
    out, kp, vp, cap = _run_staged(
        layout, staged,
        (state, k_pages, v_pages, page_table, lengths, tokens, active, sampling, active_layers, capture),
        specs, (out_spec, P(PP), P(PP), P(PP)),
    )
    out = jax.tree.map(lambda e: e[-1], out)
    return (out, kp, vp) if cap is None else (out, kp, vp, _fused(cap))


def chunk(
    graphdef: Any,
    state: Any,
    layout: Layout,
    k_pages: Any,
    v_pages: Any,
    page_table: Any,
    start: jax.Array,
    n_new: jax.Array,
    tokens: jax.Array,
    all_positions: bool = False,
    capture: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """A chunk of new tokens per row over the row's cached pages: prefill at an offset.

    Row r's tokens[r, :n_new[r]] sit at positions start[r] ..; each attends to the row's cached
    positions < start[r] (read through its page table, a windowed group's ring as in `decode`) and to
    the chunk's tokens before it, and its K/V is written into the pages (columns past n_new[r] are
    padding: computed, never stored). Returns the normed hidden state of each row's last new token
    (B, D), or with all_positions of every column (B, T, D) (speculative verification scores them
    all), and the updated pages. With pp stages the B rows form pp microbatches that run through the
    stages in GPipe order (2 pp - 1 ticks), every stage reading and writing only its own layers' pages.
    With capture (see prefill) also the captured layer inputs of every column, (B, T, n D)."""
    pp = layout.mesh.shape[PP]
    module = nnx.merge(graphdef, state)
    active_layers = jnp.asarray(module.active)
    b, t = tokens.shape
    mb = b // pp
    groups = module.cache_groups()
    windows = groups.windows if groups else (None,)
    write_slots = [jnp.asarray(w) for w in groups.write_slots(len(module.active) // pp)] if groups else None
    as_groups = (lambda x: x) if groups else (lambda x: (x,))  # noqa: E731

    def staged(state, k_pages, v_pages, page_table, start, n_new, tokens, active_layers, capture):
        with use_layout(layout):
            model = nnx.merge(graphdef, state)
            s = _stage_index(pp)
            x_all = model.embed_tokens(tokens)
            ctx_all = model.context(start, t)
            per_layer, in_place = model.unrolled, dispatch.pages_in_place()

            def tick(carry, i):
                kp, vp, recv, last, cbuf = carry
                m = i - s
                valid = (m >= 0) & (m < pp)
                r0 = jnp.clip(m, 0, pp - 1) * mb
                first, count = _rows(start, r0, mb), _rows(n_new, r0, mb)
                tables = [_rows(table, r0, mb) for table in as_groups(page_table)]
                x_in = jnp.where(s == 0, _rows(x_all, r0, mb), recv)
                ctx = jax.tree.map(lambda a: _rows(a, r0, mb), ctx_all)
                kc = tuple(_gather_pages(k, table, per_layer, in_place) for k, table in zip(kp, tables))
                vc = tuple(_gather_pages(v, table, per_layer, in_place) for v, table in zip(vp, tables))
                kc, vc = (kc, vc) if groups else (kc[0], vc[0])
                y, kn, vn, *cap = model.stack(x_in, ctx, kc, vc, active=active_layers, **_capturing(capture))
                if cap:
                    cbuf = jax.lax.dynamic_update_slice_in_dim(cbuf, jnp.where(valid, cap[0], _rows(cbuf, r0, mb, 1)), r0, 1)
                # entries (row, column) of the chunk, row-major: mb * t of them
                cols = jnp.arange(t)
                rows, end = jnp.repeat(jnp.arange(mb), t), jnp.repeat(first + count, t)
                pos = (first[:, None] + cols).reshape(-1)
                ok = (valid & (cols[None, :] < count[:, None])).reshape(-1)
                # (L, mb, KV, t, hd) -> (mb * t, L, KV, hd)
                many = lambda x: x.transpose(1, 3, 0, 2, 4).reshape((mb * t, x.shape[0], x.shape[2], x.shape[4]))  # noqa: E731
                kp, vp = write_kv(kp, vp, tables, windows, rows, pos, ok, _group_kv(kn, vn, write_slots, s), many, end)
                y_last = y if all_positions else y[jnp.arange(mb), jnp.maximum(count - 1, 0)]
                done = valid & (s == pp - 1)
                last = jax.lax.dynamic_update_slice_in_dim(last, jnp.where(done, y_last, _rows(last, r0, mb)), r0, 0)
                return (kp, vp, _ring(y, pp), last, cbuf), None

            carry = (
                as_groups(k_pages),
                as_groups(v_pages),
                jnp.zeros((mb, t, x_all.shape[-1]), x_all.dtype),
                jnp.zeros((b, t, x_all.shape[-1]) if all_positions else (b, x_all.shape[-1]), x_all.dtype),
                None if capture is None else jnp.zeros((capture.shape[1],) + x_all.shape, x_all.dtype),
            )
            if pp == 1:
                carry, _ = tick(carry, jnp.int32(0))
            else:
                carry, _ = jax.lax.scan(tick, carry, jnp.arange(2 * pp - 1))
            kp, vp, _, last, cbuf = carry
            hidden = model.norm(last)[None]
            cbuf = None if cbuf is None else cbuf[None]
            return (hidden, kp, vp, cbuf) if groups else (hidden, kp[0], vp[0], cbuf)

    specs = (stage_specs(state, layout), P(PP), P(PP), P(), P(), P(), P(), P(PP), P(PP))
    hidden, kp, vp, cap = _run_staged(
        layout, staged, (state, k_pages, v_pages, page_table, start, n_new, tokens, active_layers, capture), specs,
        (P(PP), P(PP), P(PP), P(PP)),
    )
    return (hidden[-1], kp, vp) if cap is None else (hidden[-1], kp, vp, _fused(cap))
