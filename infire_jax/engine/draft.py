"""The draft-model proposer: a second, smaller checkpoint with the target's vocabulary drafts greedily.

Placement: the draft is placed on the first `tp` devices of the decoding worker's mesh as a tp=`tp`
mesh of its own (its own layout and rules, whatever the target's), with its own compiled programs
and its own paged KV: a pool of the worker's page count and page size, one lease per row (no prefix
index), so the draft's KV fits wherever the target's does.

Per propose call (one batch of rows):
  1. catch-up: one chunk call (Programs.chunk_fn) feeds every row the tokens its draft KV lacks (the
     whole prompt on a row's first call, then one or two tokens: the target's bonus token, and the
     last kept draft when every draft was kept) and draws each row's first draft from the last one;
  2. one multi-step decode call (Programs.decode_fn, k - 1 steps) draws the rest.
A row's catch-up feeds at most `chunk` tokens per call (a long prompt takes several calls, the row
drafting from the call that completes it), so the chunk program's width stays bounded.
The proposer remembers the tokens whose KV it wrote per row (the sequence plus its drafts but the
last); a row's next call keeps the longest prefix of those that its sequence still starts with, so a
rejected draft's KV is simply overwritten (rollback by length, as in the target's verify step), and
tokens the target decoded without drafts are fed by the next catch-up.

Under P/D the prompt's draft KV is computed on the prefill worker (engine/core.py PrefillWorker with
a `draft`: a proposer of its own beside the prefill mesh). After each target prefill call it `prefill`s
the draft up to the tokens the target has prefilled, always from position 0: the draft keeps no prefix
index, so a prefix the target reused from its cache is computed for the draft anyway (the draft is
small; no index to keep in step on either side). `export` gives the canonical pages of the blocks that
call completed, which ride in the target's Shipment (the same transfer); the decode worker's proposer
`receive`s them into its own pool, and when the prompt is complete its first draft call feeds only the
tokens generated since (`fed_tokens`, `imported_tokens` count both ways).

Drafts are greedy (the draft's argmax): with sampling the verify step's rejection sampling keeps the
target's distribution for any draft token (sampling.verify), so greedy drafts are exact too.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Sequence

import numpy as np

from infire_jax import distributed
from infire_jax.config import ModelConfig, load_config
from infire_jax.engine.programs import Programs, bucket, page_tables
from infire_jax.engine.sampling import SamplingParams, pack_params
from infire_jax.engine.speculative import DraftRow, SpecError
from infire_jax.kv import cache as kv_cache
from infire_jax.kv.manager import KVManager, Lease
from infire_jax.loader import make_layout, place_model

__all__ = ["check_draft", "draft_mesh", "place_draft", "DraftModelProposer"]


def _tokenizer_vocab(model_dir: pathlib.Path) -> dict[str, int] | None:
    """The token -> id map of a checkpoint's tokenizer.json (model vocabulary and added tokens), or None."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    vocab = dict(data.get("model", {}).get("vocab") or {})
    vocab.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    return vocab


def check_draft(target: ModelConfig, draft: ModelConfig, target_dir: pathlib.Path | None, draft_dir: pathlib.Path) -> None:
    """The draft must speak the target's token ids: its tokenizer (when both checkpoints ship one) maps
    every token to the same id, and it cannot draw an id the target lacks."""
    fix = "use a draft checkpoint made with the target's tokenizer (e.g. a smaller model of the same family)"
    if draft.vocab_size > target.vocab_size:
        raise SpecError(f"draft model {draft_dir} has vocab_size {draft.vocab_size}, the target {target.vocab_size}: "
                        f"its drafts could name tokens the target does not have; {fix}")
    if target_dir is not None:
        a, b = _tokenizer_vocab(target_dir), _tokenizer_vocab(draft_dir)
        if a is not None and b is not None and a != b:
            differ = sorted(set(a.items()) ^ set(b.items()), key=str)[:3]
            raise SpecError(f"draft model {draft_dir} has a different tokenizer than the target {target_dir} "
                            f"(e.g. {differ}); {fix}")
    if draft.vocab_size != target.vocab_size and (target_dir is None or _tokenizer_vocab(target_dir) is None):
        raise SpecError(f"draft model {draft_dir} has vocab_size {draft.vocab_size}, the target {target.vocab_size}, "
                        f"and no tokenizer.json shows they share token ids; {fix}")


def draft_mesh(decode: Programs, tp: int) -> str:
    """The draft's mesh spec: tp=`tp` over the first `tp` devices of the decoding worker's mesh."""
    devices = list(decode.layout.mesh.devices.flat)
    if len(distributed.owner_processes(decode.layout.replicated)) > 1:
        raise SpecError("a draft model needs its decoding mesh within one process (its proposals are host-side, per "
                        "worker); this decode mesh spans several processes: use 'ngram:K', or a one-process decode mesh")
    ids = sorted(d.id for d in devices)
    if tp < 1 or tp > len(ids) or ids[:tp] != list(range(ids[0], ids[0] + tp)):
        raise SpecError(f"draft_tp={tp} does not fit the decoding mesh (devices {ids}); use 1 .. {len(ids)}")
    return f"tp={tp}@{ids[0]}-{ids[0] + tp - 1}"


def place_draft(path: str | pathlib.Path, decode: Programs, *, tp: int = 1) -> Programs:
    """The draft checkpoint placed beside a decoding (or prefill) worker's programs (module doc), its
    vocabulary checked against the target's checkpoint: on a tp=`tp` mesh of the worker's first
    devices, with the target's rules, kernels and dtypes, so every worker of a deployment, in this
    process or another, places the same draft the same way."""
    path, target = pathlib.Path(path), decode.placed
    cfg = load_config(path)
    check_draft(target.cfg, cfg, target.source, path)
    layout = make_layout(draft_mesh(decode, tp), decode.layout.rules, decode.layout.kernels)
    programs = Programs(place_model(path, layout, dtype=target.dtype, compute_dtype=target.compute_dtype, cfg=cfg))
    if programs.cache_groups is not None:
        raise SpecError(f"draft model {path} has windowed (chunked) attention layers; a draft model must use full "
                        "attention in every layer (its rolled-back drafts would overwrite ring slots still read)")
    return programs


@dataclasses.dataclass
class _Held:
    lease: Lease
    fed: np.ndarray  # the tokens whose KV the draft wrote, positions 0 ..


GREEDY = SamplingParams()


class DraftModelProposer:
    """Greedy drafts from a draft model with its own paged KV (module doc); implements speculative.Proposer."""

    costly = True

    def __init__(self, programs: Programs, *, num_pages: int, page_size: int, max_batch: int, chunk: int = 512):
        self.programs, self.chunk = programs, chunk
        self.pools = kv_cache.pools(None, num_pages, page_size, max_batch)
        self.kv = KVManager(self.pools, b"draft", prefix_cache=False)
        self.k_pages, self.v_pages = programs.allocate_pages(num_pages, page_size)
        self.kv_spec = programs.kv_spec()  # what its shipped pages must match (P/D)
        self.held: dict[Any, _Held] = {}
        self.fed_tokens = 0  # tokens fed through the draft's chunk program (catch-up or prefill), ever
        self.imported_tokens = 0  # prompt tokens whose draft KV arrived from a prefill worker, ever

    def forget(self, rid: Any) -> None:
        held = self.held.pop(rid, None)
        if held is not None:
            self.kv.release(held.lease)

    def support(self, rid: Any) -> int:
        """A model's drafts carry no per-draft evidence beyond the row's acceptance."""
        return 0

    WARM_CATCH_UP = (2, 4, 8, 16)  # catch-up widths after a verification or a decode call of up to 8 steps

    def warm(self, shapes: Sequence[tuple[int, int]], k: int) -> None:
        """The catch-up chunk programs (WARM_CATCH_UP widths) and the decode programs of 1 .. k - 1
        steps for each (batch, pages per row), with padding rows only (n_new 0, inactive: nothing
        written). (A prompt fed here, colocated, meets its own chunk width once.)"""
        p, pool = self.programs, self.pools[0]
        geometry = (pool.num_pages, pool.page_size)
        for b, width in shapes:
            table, zeros = np.zeros((b, width), np.int32), np.zeros(b, np.int32)
            sp = pack_params([], b)
            for c in self.WARM_CATCH_UP:
                shape = (b, c, width, *geometry)
                _, _, self.k_pages, self.v_pages = p._timed(
                    ("chunk",) + shape + (False,), p.chunk_fn(*shape), p.placed.state, self.k_pages, self.v_pages,
                    table, zeros, zeros, np.zeros((b, c), np.int32), sp)
            for steps in range(1, k):
                shape = (b, width, *geometry, steps, False)
                _, self.k_pages, self.v_pages = p._timed(
                    ("decode",) + shape, p.decode_fn(*shape), p.placed.state, self.k_pages, self.v_pages, table,
                    zeros, zeros, np.zeros(b, bool), sp)

    def _table(self, leases: Sequence[Lease], reach: Sequence[int], b: int) -> tuple[int, np.ndarray]:
        """A page table (b rows) covering positions < reach[i] of each row (one full-length group)."""
        (width,), (table,) = page_tables([[lease.blocks] for lease in leases], self.pools, reach, b)
        return width, table

    def _hold(self, rid: Any, tokens: np.ndarray, positions: int) -> _Held | None:
        """The row's draft KV, its pages reserved on first sight (None: no pages free now)."""
        held = self.held.get(rid)
        if held is None:
            lease = self.kv.reserve(rid, tokens, positions)
            if lease is None:  # cannot happen with the worker's page count; no draft KV rather than a failure
                return None
            held = self.held[rid] = _Held(lease, tokens[:0].astype(np.int32))
        return held

    @staticmethod
    def _kept(held: _Held, seq: np.ndarray) -> int:
        """Tokens of held KV that `seq` still starts with (the last token of seq is always fed)."""
        n = min(len(held.fed), len(seq) - 1)
        diff = np.flatnonzero(held.fed[:n] != seq[:n])
        return int(diff[0]) if diff.size else n

    def _feed(self, live: Sequence[tuple[_Held, int, np.ndarray]]) -> tuple[Any, list[int], int, Any]:
        """One chunk call: each row (held, kept, seq) is fed seq[kept:] (at most `chunk` tokens of it).
        Returns (the next token per row, on the device; tokens fed per row; padded batch; sampling)."""
        p, ps = self.programs, self.pools[0].page_size
        geometry = (self.pools[0].num_pages, ps)
        b = p.batch_bucket(len(live))
        pending = [min(len(seq) - keep, self.chunk) for _, keep, seq in live]
        c = bucket(max(pending), 2)  # one or two tokens after the first call: one program
        tokens = np.zeros((b, c), np.int32)
        start, n_new = np.zeros(b, np.int32), np.zeros(b, np.int32)
        for j, (_, keep, seq) in enumerate(live):
            tokens[j, : pending[j]] = seq[keep: keep + pending[j]]
            start[j], n_new[j] = keep, pending[j]
        width, table = self._table([held.lease for held, _, _ in live], list(start[: len(live)] + n_new[: len(live)]), b)
        sp = pack_params([GREEDY] * len(live), b)
        shape = (b, c, width, *geometry)
        first, _, self.k_pages, self.v_pages = p._timed(
            ("chunk",) + shape + (False,), p.chunk_fn(*shape), p.placed.state,
            self.k_pages, self.v_pages, table, start, n_new, tokens, sp,
        )
        for j, (held, keep, seq) in enumerate(live):
            held.fed = seq[: keep + pending[j]].astype(np.int32)
        self.fed_tokens += sum(pending)
        return first, pending, b, sp

    def draft(self, rows: Sequence[DraftRow]) -> list[np.ndarray]:
        out = [row.seq[:0] for row in rows]
        live: list[tuple[int, _Held, int]] = []  # (index in rows, held, tokens its KV keeps)
        for i, row in enumerate(rows):
            held = self._hold(row.id, row.seq, row.positions)
            if held is not None:
                live.append((i, held, self._kept(held, row.seq)))
        if not live:
            return out
        p = self.programs
        geometry = (self.pools[0].num_pages, self.pools[0].page_size)
        first, pending, b, sp = self._feed([(held, keep, rows[i].seq) for i, held, keep in live])
        done = [keep + n == len(rows[i].seq) for (i, _, keep), n in zip(live, pending)]  # else still catching up
        leases = [held.lease for _, held, _ in live]
        steps = max([rows[i].k for (i, _, _), d in zip(live, done) if d], default=1) - 1
        if steps:
            width, table = self._table(leases, [len(rows[i].seq) + steps for i, _, _ in live], b)
            lengths = np.zeros(b, np.int32)
            lengths[: len(live)] = [keep + n for (_, _, keep), n in zip(live, pending)]
            active = np.zeros(b, bool)
            active[: len(live)] = done
            shape = (b, width, *geometry, steps, False)
            more, self.k_pages, self.v_pages = p._timed(
                ("decode",) + shape, p.decode_fn(*shape), p.placed.state, self.k_pages, self.v_pages, table,
                lengths, first, active, sp,
            )
            drafts = np.concatenate([distributed.fetch(first)[None], distributed.fetch(more)], axis=0).T  # (b, 1 + steps)
        else:
            drafts = distributed.fetch(first)[:, None]
        for j, (i, held, _) in enumerate(live):
            row = rows[i]
            if done[j]:
                held.fed = np.concatenate([row.seq, drafts[j, :steps]]).astype(np.int32)
                out[i] = drafts[j, : row.k].astype(np.int32)
        return out

    # -- the draft's prompt KV under P/D: prefilled by the prefill worker, imported by the decode worker --
    def prefill(self, rows: Sequence[tuple[Any, np.ndarray, int]]) -> int:
        """Bring each row's draft KV up to its tokens (id, tokens so far, positions to reserve): chunk
        calls of at most `chunk` tokens per row until every row is fed. Returns the tokens computed. A
        row the draft's pool has no room for is left out (not in `held`: its decode worker catches up)."""
        fed = 0
        while True:
            live = []
            for rid, tokens, positions in rows:
                held = self._hold(rid, tokens, positions)
                if held is not None and len(held.fed) < len(tokens):
                    live.append((held, len(held.fed), np.asarray(tokens, np.int32)))
            if not live:
                return fed
            fed += sum(self._feed(live)[1])

    def export(self, rows: Sequence[tuple[Any, int, int]]) -> tuple[int, int, tuple[Any, ...]]:
        """Canonical pages (Programs.export_pages_fn) of blocks [first, first + n) of each row (id, first,
        n), in row order: (bucketed page count, real page count, (k, v))."""
        ids = [b for rid, first, n in rows for b in self.held[rid].lease.blocks[first: first + n]]
        pool = self.pools[0]
        count = bucket(max(len(ids), 1))
        padded = np.asarray(ids + [pool.num_pages] * (count - len(ids)), np.int32)
        arrays = self.programs.export_pages_fn(count, pool.num_pages, pool.page_size)(self.k_pages, self.v_pages, padded)
        return count, len(ids), arrays

    def receive(self, rows: Sequence[tuple[Any, np.ndarray, int, int, bool, int]], count: int,
                arrays: tuple[Any, ...]) -> None:
        """Write shipped canonical pages (on this draft's mesh, canonical shardings) into the rows' pages:
        rows (id, prompt, first block, blocks, final: the prompt is complete, positions to reserve) in
        the shipment's row order; id None: the row is gone here (its pages are written nowhere). A
        final row drafts from its prompt's KV without feeding the prompt again."""
        pool = self.pools[0]
        ids = []
        for rid, prompt, first, n, final, positions in rows:
            fresh = rid is not None and rid not in self.held
            # a row whose first pages found no room holds no draft KV here (it catches up when drafting)
            held = self._hold(rid, prompt, positions) if rid is not None and not (fresh and first) else None
            ids.extend(held.lease.blocks[first: first + n] if held is not None else [pool.num_pages] * n)
            if held is not None and final:
                held.fed = np.asarray(prompt, np.int32)
                self.imported_tokens += len(prompt)
        padded = np.asarray(ids + [pool.num_pages] * (count - len(ids)), np.int32)
        self.k_pages, self.v_pages = self.programs.import_pages_fn(count, pool.num_pages, pool.page_size)(
            self.k_pages, self.v_pages, arrays, padded)
