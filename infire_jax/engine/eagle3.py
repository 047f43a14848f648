"""The EAGLE-3 proposer: a one-layer head drafts from the target's own hidden states.

Placement: the head (models/eagle3.py, the published checkpoint layout) is placed on the decoding
worker's own layout (tp-sharded like the target: heads, MLP and vocabulary on tp), with a one-layer
page pool of the worker's page count and size, one lease per row (no prefix index). A head without
embed_tokens embeds with the target's table (the target module's embed_tokens).

The target's hidden states: a decoding worker whose Speculator holds this proposer asks its decode
and verify programs for the inputs of the head's three target layers (Programs.capture_selection,
models.contract.Family.captures_hidden) and hands each row's kept positions to `observe`. The
prompt's states come from the prefill calls that compute it (a colocated worker's own; a prefill
worker's ride in the Shipment), and a prefix the prefix cache serves brings the states its blocks
had when computed (the worker's state cache, by block hash). Positions none of these cover (states
evicted, a prefill worker with another head) are recomputed by the target's hidden-state program
(Programs.hidden_fn) at the row's first draft. The head's KV of the prompt is fed in catch-up calls of at most
CATCH_UP_MAX positions (so the head compiles a few widths, all at warm-up, not one per prompt length).

Per propose call (one batch of rows), one head program: a catch-up chunk feeds each row the
positions p whose target state it has not consumed yet (token p + 1 with the fused state of p), its
last output gives the first draft; then k - 1 steps feed each draft with the head's own pre-norm
output. Drafts are the argmax over the reduced vocabulary mapped to target ids (d2t). Rollback: the
head's KV of positions fed from its own outputs is overwritten by the next catch-up (by length, as
in the target's verify step); exactness is the verify step's (greedy tokens equal plain decoding).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from infire_jax import distributed, executables
from infire_jax.checkpoint import hf
from infire_jax.config import ConfigError, ModelConfig
from infire_jax.engine import pipeline
from infire_jax.engine.programs import Programs, bucket, graph_description, page_tables
from infire_jax.engine.speculative import DraftRow, SpecError
from infire_jax.flax_nnx import nnx
from infire_jax.kv import cache as kv_cache
from infire_jax.kv.manager import KVManager, Lease
from infire_jax.kv.paged import PagedLayerCache
from infire_jax.loader import dtype_of
from infire_jax.models import family_of
from infire_jax.models.eagle3 import Eagle3Config, Eagle3Head, default_aux_layers, eagle3_config, hf_tensor_map
from infire_jax.sharding import use_layout

__all__ = ["PlacedHead", "HeadCheck", "check_head", "place_head", "Eagle3Proposer"]


@dataclasses.dataclass(eq=False)
class PlacedHead:
    """A head placed on a decoding worker's layout, and the target layers it reads."""

    graphdef: Any
    state: Any
    cfg: Eagle3Config
    aux_layers: tuple[int, ...]
    compiled: dict = dataclasses.field(default_factory=dict)  # the head programs, shared by its proposers


def _read_config(path: pathlib.Path) -> Eagle3Config:
    where = f"EAGLE-3 head {path}"
    try:
        return eagle3_config(json.loads((path / "config.json").read_text()), where)
    except (OSError, json.JSONDecodeError) as e:
        raise SpecError(f"{where}: cannot read config.json ({e}); give 'eagle3:DIR:K' with DIR an EAGLE-3 checkpoint") from None
    except ConfigError as e:
        raise SpecError(str(e)) from None


def _read_maps(path: pathlib.Path, present: dict, cfg: Eagle3Config, vocab: int) -> np.ndarray:
    """The head's target id per draft id (d2t: i + d2t[i]), checked against t2d and the target's vocabulary."""
    missing = [n for n in ("d2t", "t2d") if n not in present]
    if missing:
        raise SpecError(f"EAGLE-3 head {path} lacks the vocabulary maps {missing} (d2t: draft id -> target id offset, "
                        "t2d: target ids in the draft vocabulary); it is not an EAGLE-3 checkpoint")

    def read(name: str) -> np.ndarray:
        with safe_open(present[name][0], framework="numpy") as f:
            return f.get_tensor(name)

    d2t, t2d = read("d2t").astype(np.int64), read("t2d").astype(bool)
    if d2t.shape != (cfg.draft_vocab_size,) or t2d.shape != (cfg.vocab_size,):
        raise SpecError(f"EAGLE-3 head {path}: d2t {d2t.shape} / t2d {t2d.shape} do not match draft_vocab_size "
                        f"{cfg.draft_vocab_size} / vocab_size {cfg.vocab_size}")
    ids = np.arange(cfg.draft_vocab_size) + d2t
    if ids.min() < 0 or ids.max() >= vocab:
        raise SpecError(f"EAGLE-3 head {path}: d2t maps draft ids to target ids {ids.min()}..{ids.max()}, outside the "
                        f"target's vocabulary of {vocab}")
    if len(np.unique(ids)) != len(ids) or not t2d[ids].all() or t2d.sum() != len(ids):
        raise SpecError(f"EAGLE-3 head {path}: d2t and t2d disagree (t2d must mark exactly the target ids d2t maps to)")
    return ids.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class HeadCheck:
    """What check_head read: the head's config, the target layers it reads, its tensors, its target ids."""

    cfg: Eagle3Config
    aux_layers: tuple[int, ...]
    present: dict
    target_ids: np.ndarray


def check_head(path: str | pathlib.Path, tcfg: ModelConfig) -> HeadCheck:
    """The head checkpoint at `path` (module doc of models/eagle3.py) checked against the target's
    config, before anything is placed: one SpecError per problem."""
    path = pathlib.Path(path)
    if not family_of(tcfg).captures_hidden:
        raise SpecError(f"EAGLE-3 needs the target's hidden states of chosen layers, which the {tcfg.family} family "
                        "cannot return yet (models.contract.Family.captures_hidden); use 'ngram:K' or 'draft:DIR:K'")
    cfg = _read_config(path)
    if cfg.target_hidden_size != tcfg.hidden_size:
        raise SpecError(f"EAGLE-3 head {path} reads target hidden states of size {cfg.target_hidden_size}, the target's "
                        f"are {tcfg.hidden_size}: it was trained for another model")
    if cfg.vocab_size > tcfg.vocab_size:
        raise SpecError(f"EAGLE-3 head {path} has vocab_size {cfg.vocab_size}, the target {tcfg.vocab_size}: it was "
                        "trained for another tokenizer")
    if cfg.hidden_size != tcfg.hidden_size:
        # (a head may read target states of another width through fc, but it embeds with the target's table
        # unless it ships its own, and no published head differs; refused rather than half supported)
        raise SpecError(f"EAGLE-3 head {path} has hidden_size {cfg.hidden_size}, the target {tcfg.hidden_size}: it was "
                        "trained for another model")
    aux = cfg.aux_layers or default_aux_layers(tcfg.num_layers)
    if not all(0 <= i < tcfg.num_layers for i in aux):
        raise SpecError(f"EAGLE-3 head {path} reads target layers {list(aux)}, the target has {tcfg.num_layers}: it was "
                        "trained for another model")
    try:
        present = hf.list_tensors(path)
    except hf.CheckpointError as e:
        raise SpecError(f"EAGLE-3 head {path}: {e}") from None
    return HeadCheck(cfg, tuple(aux), present, _read_maps(path, present, cfg, tcfg.vocab_size))


def place_head(path: str | pathlib.Path, target: Programs) -> PlacedHead:
    """The head checkpoint at `path` checked (check_head) and placed on the target's layout in the
    target's dtypes."""
    path, layout = pathlib.Path(path), target.layout
    if len(distributed.owner_processes(layout.replicated)) > 1:
        raise SpecError("an EAGLE-3 head needs its decoding mesh within one process (its drafts are host-side, per "
                        "worker); use 'ngram:K', or a one-process decode mesh")
    check = check_head(path, target.placed.cfg)
    cfg, aux, present, ids = check.cfg, check.aux_layers, check.present, check.target_ids
    own = "embed_tokens.weight" in present
    tp = layout.axis_size("kv_heads")
    repeat = tp // cfg.num_kv_heads if cfg.num_kv_heads < tp and tp % cfg.num_kv_heads == 0 else 1
    with use_layout(layout):
        abstract = nnx.eval_shape(lambda: Eagle3Head(cfg, own_embedding=own, kv_repeat=repeat,
                                                     param_dtype=dtype_of(target.placed.dtype),
                                                     compute_dtype=dtype_of(target.placed.compute_dtype)))
    graphdef, state = nnx.split(abstract)
    flat = {tuple(str(p) for p in path_): var for path_, var in nnx.to_flat_state(state)}
    loaded = {p: v for p, v in flat.items() if p != ("d2t",)}
    specs = {p: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype) for p, v in loaded.items()}
    shardings = {p: layout.sharding(v.get_metadata()["logical_axes"], specs[p].shape) for p, v in loaded.items()}
    try:
        arrays = hf.load_into(path, specs, shardings, hf_tensor_map(cfg, own_embedding=own, kv_repeat=repeat),
                              ignore=("d2t", "t2d"))
    except hf.CheckpointError as e:
        raise SpecError(f"EAGLE-3 head {path}: {e}") from None
    for p, var in loaded.items():
        var.set_value(arrays[p])
    flat[("d2t",)].set_value(jax.device_put(ids, layout.replicated))
    return PlacedHead(graphdef, state, cfg, tuple(aux))


@dataclasses.dataclass
class _Row:
    # the target's fused states (3 T,) by position, of positions the head has not consumed yet
    states: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    lease: Lease | None = None
    consumed: int = 0  # positions 0 .. consumed - 1 are in the head's KV from the target's states


def _store(k_pages: jax.Array, v_pages: jax.Array, table: jax.Array, pos: jax.Array, ok: jax.Array, k: jax.Array,
           v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Write new K/V (B, KV, T, hd) at positions pos (B, T) where ok into the head's one-layer page pool
    (the target's own KV write, pipeline.write_kv: positions the table does not cover are dropped)."""
    b, t = pos.shape
    arrange = lambda x: x.transpose(0, 2, 1, 3).reshape(b * t, 1, x.shape[1], x.shape[3]).astype(k_pages.dtype)  # noqa: E731
    flat = pos.reshape(-1)
    (k_pages,), (v_pages,) = pipeline.write_kv((k_pages,), (v_pages,), [table], (None,), jnp.repeat(jnp.arange(b), t),
                                               flat, ok.reshape(-1), [(k, v)], arrange, end=flat + 1)
    return k_pages, v_pages


class Eagle3Proposer:
    """Greedy drafts from an EAGLE-3 head fed the target's hidden states (module doc); implements
    speculative.HiddenStateProposer."""

    costly = True
    CATCH_UP_MAX = 64  # positions per catch-up call: a prompt is fed in pieces, so the widths are few (all warmed)

    def __init__(self, head: PlacedHead, target: Programs, *, num_pages: int, page_size: int, max_batch: int,
                 k: int, chunk: int = 512):
        """k: the most drafts a row asks for; every call runs k - 1 own-state steps (the head is one layer:
        one program per batch and catch-up width rather than one per draft count). chunk: the most
        positions one catch-up call feeds (at most CATCH_UP_MAX)."""
        self.head, self.target, self.k = head, target, k
        self.catch_up = min(chunk, self.CATCH_UP_MAX)
        self.captures = head.aux_layers
        self.width = len(head.aux_layers) * head.cfg.target_hidden_size
        self.pools = kv_cache.pools(None, num_pages, page_size, max_batch)
        self.kv = KVManager(self.pools, b"eagle3", prefix_cache=False)
        module = nnx.merge(head.graphdef, head.state)
        shape = module.kv_shape(num_pages, page_size)
        self._pages_sh = target.layout.sharding(module.kv_logical_axes, shape)
        self.k_pages = target.zeros(shape, module.compute_dtype, self._pages_sh)
        self.v_pages = target.zeros(shape, module.compute_dtype, self._pages_sh)
        self.rows: dict[Any, _Row] = {}
        self.recomputed_positions = 0  # prompt positions whose states hidden_fn computed (none were captured)

    # -- target states ------------------------------------------------------------------------
    def _row(self, rid: Any) -> _Row:
        return self.rows.setdefault(rid, _Row())

    def observe(self, rid: Any, start: int, hidden: np.ndarray) -> None:
        """The target's fused states (n, 3 T) of a row's positions start .. start + n - 1 (tokens it kept;
        any later position held is stale)."""
        row, end = self._row(rid), start + len(hidden)
        for p in [p for p in row.states if p >= end]:
            del row.states[p]
        row.states.update(zip(range(start, end), np.asarray(hidden, np.float32)))
        row.consumed = min(row.consumed, start)

    def _fill_prompts(self, rows: Sequence[DraftRow]) -> None:
        """Positions a row's head has yet to consume (< len(seq) - 1) that no observed call covered (its
        prompt): computed by the target's hidden-state program, rows of a call batched."""
        todo = []
        for r in rows:
            row = self._row(r.id)
            missing = [p for p in range(row.consumed, len(r.seq) - 1) if p not in row.states]
            if missing:
                todo.append((r, missing[-1] + 1))
        if not todo:
            return
        t = self.target
        b, width = t.batch_bucket(len(todo)), bucket(max(m for _, m in todo), 16)
        tokens = np.zeros((b, width), np.int32)
        for i, (r, m) in enumerate(todo):
            tokens[i, :m] = r.seq[:m]
        out = distributed.fetch(t.hidden_fn(b, width, self.captures)(t.placed.state, t.put(tokens, ("batch", "seq"))))
        for i, (r, m) in enumerate(todo):
            row = self._row(r.id)
            self.recomputed_positions += m
            row.states.update((p, out[i, p]) for p in range(row.consumed, m) if p not in row.states)

    # -- the head program -----------------------------------------------------------------------
    def _program(self, b: int, c: int, steps: int, pages: int):
        """(head state, target state, k_pages, v_pages, table (b, pages), start, n_new, tokens (b, c), hidden
        (b, c, 3 T)) -> (drafts (1 + steps, b), k_pages, v_pages): catch-up chunk, first draft, `steps` more.
        One compiled program per key (executables.CachedProgram: a loaded executable takes its shapes only)."""
        key = (id(self.target), b, c, steps, pages, self.k_pages.shape)
        if key not in self.head.compiled:
            self.head.compiled[key] = executables.CachedProgram(lambda: self._build(b, c, steps),
                                                                (self._description, key[1:]))
        return self.head.compiled[key]

    @functools.cached_property
    def _description(self) -> tuple:
        """What decides the head's programs besides their key (executables.CachedProgram): the target's
        programs' description, the head's graph and the layers it reads."""
        return self.target.description, "eagle3 head", graph_description(self.head.graphdef), self.head.aux_layers

    def _build(self, b: int, c: int, steps: int):
        hg, tg, layout = self.head.graphdef, self.target.placed.graphdef, self.target.layout

        def run(head_state, target_state, k_pages, v_pages, table, start, n_new, tokens, hidden):
            with use_layout(layout):
                head = nnx.merge(hg, head_state)
                embed = head.embed_tokens if head.own_embedding else nnx.merge(tg, target_state).embed_tokens
                caches = lambda kp, vp: (PagedLayerCache(kp, table, 0), PagedLayerCache(vp, table, 0))  # noqa: E731
                x, k, v = head(embed(tokens), head.fuse(hidden), start, *caches(k_pages, v_pages))
                pos = start[:, None] + jnp.arange(c)[None, :]
                ok = jnp.arange(c)[None, :] < n_new[:, None]
                k_pages, v_pages = _store(k_pages, v_pages, table, pos, ok, k, v)
                last = x[jnp.arange(b), jnp.maximum(n_new - 1, 0)]
                first = head.greedy(last)

                def step(carry, _):
                    kp, vp, tok, h, p = carry
                    y, k, v = head(embed(tok[:, None]), h[:, None], p, *caches(kp, vp))
                    live = (n_new > 0)[:, None]
                    kp, vp = _store(kp, vp, table, p[:, None], live, k, v)
                    nxt = head.greedy(y[:, 0])
                    return (kp, vp, nxt, y[:, 0], p + 1), nxt

                (k_pages, v_pages, *_), more = jax.lax.scan(step, (k_pages, v_pages, first, last, start + n_new), None,
                                                            length=steps)
                return jnp.concatenate([first[None], more]), k_pages, v_pages

        rep = layout.replicated
        state_sh = lambda state: jax.tree.map(lambda x: x.sharding, state)  # noqa: E731
        return jax.jit(
            run,
            in_shardings=(state_sh(self.head.state), state_sh(self.target.placed.state), self._pages_sh, self._pages_sh,
                          rep, rep, rep, rep, rep),
            out_shardings=(rep, self._pages_sh, self._pages_sh),
            donate_argnums=(2, 3),
        )

    # -- Proposer -------------------------------------------------------------------------------

    def warm(self, shapes: Sequence[tuple[int, int]], k: int) -> None:
        """The head programs of every catch-up width (2 .. catch_up, powers of two) for each (batch, pages
        per row), run with padding rows only (n_new 0: nothing written)."""
        p = self.target
        put = lambda x: jax.device_put(x, p.layout.replicated)  # noqa: E731
        for b, width in shapes:
            zeros = put(np.zeros(b, np.int32))
            for c in sorted({bucket(n, 2) for n in range(1, self.catch_up + 1)}):
                _, self.k_pages, self.v_pages = self._program(b, c, self.k - 1, width)(
                    self.head.state, p.placed.state, self.k_pages, self.v_pages, put(np.zeros((b, width), np.int32)),
                    zeros, zeros, put(np.zeros((b, c), np.int32)), put(np.zeros((b, c, self.width), np.float32)))

    def support(self, rid: Any) -> int:
        """A head's drafts carry no per-draft evidence beyond the row's acceptance."""
        return 0

    def forget(self, rid: Any) -> None:
        row = self.rows.pop(rid, None)
        if row is not None and row.lease is not None:
            self.kv.release(row.lease)

    def draft(self, rows: Sequence[DraftRow]) -> list[np.ndarray]:
        out = [r.seq[:0] for r in rows]
        self._fill_prompts(rows)
        pending: list[tuple[int, _Row]] = []
        for i, r in enumerate(rows):
            row = self._row(r.id)
            if row.lease is None:
                row.lease = self.kv.reserve(r.id, r.seq, r.positions)
                if row.lease is None:  # cannot happen with the worker's page count; no drafts rather than a failure
                    continue
            pending.append((i, row))
        if not pending:
            return out
        b = self.target.batch_bucket(len(pending))
        while pending:  # a long catch-up (a prompt) in pieces of at most `catch_up` positions, then the drafts
            pending = self._head_call(rows, pending, b, out)
        return out

    def _head_call(self, rows: Sequence[DraftRow], pending: list[tuple[int, _Row]], b: int, out: list[np.ndarray]
                   ) -> list[tuple[int, _Row]]:
        """One head program call over the pending rows (b rows padded): each row's next catch-up piece;
        rows caught up get their drafts in `out`. Returns the rows still catching up."""
        live = []  # (index in rows, row, first position fed, positions fed)
        for i, row in pending:
            last = len(rows[i].seq) - 2  # the last position whose target state is known: it predicts the next token
            first = min(row.consumed, last)
            live.append((i, row, first, min(last + 1 - first, self.catch_up)))
        p, steps = self.target, self.k - 1
        c = bucket(max(n for *_, n in live), 2)
        done = [first + n == len(rows[i].seq) - 1 for i, _, first, n in live]
        tokens, hidden = np.zeros((b, c), np.int32), np.zeros((b, c, self.width), np.float32)
        start, n_new = np.zeros(b, np.int32), np.zeros(b, np.int32)
        for j, (i, row, first, n) in enumerate(live):
            tokens[j, :n] = rows[i].seq[first + 1: first + 1 + n]
            hidden[j, :n] = [row.states[q] for q in range(first, first + n)]
            start[j], n_new[j] = first, n
        reach = [first + n + steps for _, _, first, n in live]
        _, (table,) = page_tables([[row.lease.blocks] for _, row, _, _ in live], self.pools, reach, b)
        put = lambda x: jax.device_put(x, p.layout.replicated)  # noqa: E731
        drafts, self.k_pages, self.v_pages = self._program(b, c, steps, table.shape[1])(
            self.head.state, p.placed.state, self.k_pages, self.v_pages, put(table), put(start), put(n_new),
            put(tokens), put(hidden),
        )
        drafts = distributed.fetch(drafts).T  # (b, 1 + steps)
        for j, (i, row, first, n) in enumerate(live):
            row.consumed = first + n
            for q in range(first, first + n - 1):  # (the last is fed again while the row drafts from it)
                row.states.pop(q, None)
            if done[j]:
                out[i] = drafts[j, : rows[i].k].astype(np.int32)
        return [(i, row) for (i, row, _, _), d in zip(live, done) if not d]
