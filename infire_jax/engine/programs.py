"""The compiled programs of a (model, layout) pair: forward (full logits), prefill, decode.

Every program is jitted with explicit input and output shardings, once per shape bucket: batch
sizes and prompt lengths are padded up to powers of two, so prompts of many lengths share a handful
of executables. The KV cache is donated to the decode program, which updates it in place and runs
several decode steps (with on-device sampling) per dispatch.
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from infire_jax import distributed, executables
from infire_jax.engine import pipeline
from infire_jax.flax_nnx import nnx
from infire_jax.kv import cache as kv_cache
from infire_jax.kv import transfer
from infire_jax.loader import PlacedModel
from infire_jax.models import family_of
from infire_jax.engine.sampling import sample, verify
from infire_jax.kernels import dispatch
from infire_jax.sharding import use_layout

__all__ = ["Programs", "bucket", "PlacedModel"]


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def page_tables(pages: Sequence[Sequence[Sequence[int]]], pools: Sequence[Any], reach: Sequence[int], b: int
                ) -> tuple[list[int], list[np.ndarray]]:
    """Page tables (one per cache group, b rows) for the programs' page_table argument, covering only
    positions < reach[i] of row i, whose page ids per group are pages[i]: a request reserves pages for
    every token it may generate, and attending over not-yet-written ones would gather them each step.
    Returns (pages per row per group, bucketed; tables)."""
    used = [[min(len(pg), pool.pages_for(n)) for pg, pool in zip(pgs, pools)] for n, pgs in zip(reach, pages)]
    per_row = [bucket(max(u[g] for u in used)) for g in range(len(pools))]
    tables = [np.zeros((b, n), np.int32) for n in per_row]
    for i, (pgs, u) in enumerate(zip(pages, used)):
        for table, pg, n in zip(tables, pgs, u):
            table[i, :n] = pg[:n]
    return per_row, tables


_NO_YNN = (("xla_cpu_experimental_ynn_fusion_type", ""),)  # an experimental XLA:CPU option


@functools.cache
def _xla_accepts(options: tuple[tuple[str, Any], ...]) -> bool:
    """Whether this jaxlib's XLA:CPU knows the (experimental) compile options: a newer one may drop
    them, and an unknown option fails the compile."""
    try:
        x = jax.device_put(np.float32(0), jax.local_devices(backend="cpu")[0])  # (every process decides alike)
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(x).compile()
        return True
    except Exception:  # noqa: BLE001 - any rejection means: do not pass the option
        return False


SAMPLING_KEYS = ("temperature", "top_k", "top_p", "seed")


def graph_description(graphdef: Any) -> str:
    """A module graph with every static attribute (config, dtypes, tables) in full: GraphDef's own repr
    leaves the values out, and a program traced from the graph depends on them."""
    with np.printoptions(threshold=sys.maxsize):  # static numpy arrays in full
        return repr((graphdef.nodes, graphdef.attributes, graphdef.num_leaves))


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

    @functools.cached_property
    def description(self) -> str:
        """What decides this model's programs besides their key and arguments (the executable cache's
        key, executables.CachedProgram): the module graph with every static attribute, the layout and its
        device order, and the kernels a trace picks."""
        with use_layout(self.layout):
            kernels = dispatch.backend()  # also registers the CPU kernels, which a loaded program calls
        return repr((graph_description(self.placed.graphdef), self.layout, self.layout.platform,
                     self.layout.mesh.device_ids.tolist(), self.placed.dtype, self.placed.compute_dtype,
                     self.decode_steps, kernels))

    def _compiled(self, key: tuple, build, compiler_options: Callable[[], dict[str, Any]] | None = None) -> Any:
        """The program of `key`: build() makes its jax.jit (with compiler_options(), if given), needed only
        when the executable cache does not have it (executables.CachedProgram)."""
        if key not in self._cache:
            self._cache[key] = executables.CachedProgram(build, (self.description, key), compiler_options)
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

    def decode_compiler_options(self, batch: int) -> dict[str, Any]:
        """XLA options for a decode program of `batch` rows. On CPU: copy insertion with region
        analysis (without it XLA:CPU copies the loop-carried KV pages defensively inside the decode
        loop), and for one row no YNNPACK fusions: with kernels="xla" its weight matvecs are XLA's own
        dots either way and only the tiny attention dots went to YNNPACK, 3% slower per 8-step
        dispatch (179.3 vs 173.7 ms); with more rows YNNPACK's matmuls are XLA's fast ones
        (WORKSPACE_NOTES, issue 9). With the CPU kernels (kernels="auto") no weight dot is left to XLA."""
        if {d.platform for d in self.layout.mesh.devices.flat} != {"cpu"}:
            return {}
        options: dict[str, Any] = {"xla_cpu_copy_insertion_use_region_analysis": True}
        if batch == 1 and _xla_accepts(_NO_YNN):
            options.update(_NO_YNN)
        return options

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

    def _run_prefill(self, state, tokens, sel: np.ndarray | None = None):
        """pipeline.prefill of whole sequences from position 0 (sel: a capture_selection, whose captured
        states come last)."""
        return pipeline.prefill(self.placed.graphdef, state, self.layout, tokens, jnp.zeros((tokens.shape[0],), jnp.int32),
                                self.stages, capture=None if sel is None else jnp.asarray(sel))

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

    def prefill_fn(self, b: int, t: int, capture: tuple[int, ...] = ()):
        """(state, tokens (b, t) right-padded, lengths (b,), sampling) ->
        (first sampled token (b,), its logits (b, vocab), k, v (L, b, KV, t, hd)). With capture (layer
        ids, see capture_selection) the inputs of those layers at every position come before k and v,
        (b, t, n x hidden): an EAGLE-3 head's prompt states, computed by the prefill itself."""
        graphdef, layout = self.placed.graphdef, self.layout
        sel = self.capture_selection(capture) if capture else None

        def prefill(state, tokens, lengths, sp):
            h, k, v, *cap = self._run_prefill(state, tokens, sel)
            with use_layout(layout):
                last = h[jnp.arange(tokens.shape[0]), lengths - 1]
                logits = nnx.merge(graphdef, state).logits(last).astype(jnp.float32)
                return sample(logits, lengths, sp), logits, *cap, k, v

        vocab = self.placed.cfg.vocab_size
        k_sh, v_sh = self.kv_shardings(b, t)
        row = self._sh(("batch",), (b,))
        return self._compiled(
            ("prefill", b, t) + ((capture,) if capture else ()),
            lambda: jax.jit(
                prefill,
                in_shardings=(self._state_shardings, self._sh(("batch", "seq"), (b, t)), row, self._sampling_shardings(b)),
                out_shardings=(row, self._sh(("batch", "vocab"), (b, vocab)))
                + ((self.layout.replicated,) if capture else ()) + (k_sh, v_sh),
            ),
        )

    # ---- paged decode ----------------------------------------------------------------------
    # A model with KV cache groups (kv/cache.py; Llama 4's chunked layers) has one page pool per group:
    # the page arguments below (counts, sizes, arrays, tables) are then tuples with one entry per group;
    # for every other model they are single values, as they always were (`pack`).
    @functools.cached_property
    def cache_groups(self) -> kv_cache.CacheGroups | None:
        return self.placed.module.cache_groups()

    def pack(self, per_group: Any) -> Any:
        """Per-group values in the form the page arguments take: a tuple, or the value of the one group."""
        return tuple(per_group) if self.cache_groups else per_group[0]

    def unpack(self, packed: Any) -> tuple:
        """The inverse of pack: one value per group."""
        return tuple(packed) if self.cache_groups else (packed,)

    def pool_shapes(self, num_pages: Any, page_size: Any) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(k, v) page-array shapes per group."""
        m, groups = self.placed.module, self.cache_groups
        layers = groups.plan.sizes if groups else (len(m.active),)
        return [
            tuple((n, pages, s[2], ps, s[4]) for s in m.kv_shapes(1, 1))
            for n, pages, ps in zip(layers, self.unpack(num_pages), self.unpack(page_size))
        ]

    def page_shardings(self, num_pages: Any, page_size: Any):
        axes = kv_cache.paged_axes(self.placed.module.kv_logical_axes)
        shs = [tuple(self._sh(axes, shape) for shape in pair) for pair in self.pool_shapes(num_pages, page_size)]
        return self.pack([k for k, _ in shs]), self.pack([v for _, v in shs])

    def allocate_pages(self, num_pages: Any, page_size: Any) -> tuple[Any, Any]:
        """Zeroed k and v pages, created directly in their shardings."""
        dtype = self.placed.module.compute_dtype
        k_sh, v_sh = self.page_shardings(num_pages, page_size)
        out = [[], []]
        for pair, shs in zip(self.pool_shapes(num_pages, page_size), zip(self.unpack(k_sh), self.unpack(v_sh))):
            for i, (shape, sh) in enumerate(zip(pair, shs)):
                out[i].append(self.zeros(shape, dtype, sh))  # k and v alike: one program
        return self.pack(out[0]), self.pack(out[1])

    def zeros(self, shape: tuple[int, ...], dtype: Any, sharding: Any) -> jax.Array:
        """A zeroed array created directly in its sharding (one cached program per shape, dtype and spec)."""
        build = lambda: jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)  # noqa: E731
        return self._compiled(("zeros", tuple(shape), jnp.dtype(dtype).name, str(sharding.spec)), build)()

    def _paged_step(self, key: tuple, fn, b: int, num_pages: Any, page_size: Any, outs: tuple) -> Any:
        """One compiled step over the paged KV: fn(state, k_pages, v_pages, page_table, four per-row
        arrays, sampling) -> (*outs, k_pages, v_pages), the pages donated (updated in place). The
        decode, chunk and verify programs share this signature and compile options."""
        k_sh, v_sh = self.page_shardings(num_pages, page_size)
        rep = self.layout.replicated
        options = functools.partial(self.decode_compiler_options, b)  # (it may compile a probe: asked for lazily)
        return self._compiled(
            key,
            lambda: jax.jit(
                fn,
                in_shardings=(self._state_shardings, k_sh, v_sh, rep, rep, rep, rep, {k: rep for k in SAMPLING_KEYS}),
                out_shardings=(*outs, k_sh, v_sh),
                donate_argnums=(1, 2),
                compiler_options=options(),
            ),
            options,
        )

    # ---- target hidden states (an EAGLE-3 head's input) -------------------------------------
    def capture_selection(self, layers: Sequence[int]) -> np.ndarray:
        """(slots, n) bool: which layer slot's input is captured hidden state j (layers[j] = a layer id:
        the input of that layer, the output of the one before; 0 = the embedding output). Raises
        ValueError for a family that cannot capture (models.contract.Family.captures_hidden) or a bad id."""
        cfg, module = self.placed.cfg, self.placed.module
        if not family_of(cfg).captures_hidden:
            raise ValueError(f"the {cfg.family} family cannot return hidden states of chosen layers "
                             "(Family.captures_hidden); EAGLE-3 heads need a target family that can")
        bad = [i for i in layers if not 0 <= i < cfg.num_layers]
        if bad:
            raise ValueError(f"hidden-state layer ids {bad} are outside the target's {cfg.num_layers} layers")
        sel = np.zeros((len(module.active), len(layers)), bool)
        for j, i in enumerate(layers):
            sel[module.layer_slots[i], j] = True
        return sel

    def hidden_fn(self, b: int, t: int, capture: tuple[int, ...]):
        """(state, tokens (b, t)) -> the inputs of layers `capture` at every position, side by side
        (b, t, len(capture) x hidden): the prefill program's forward, no cache written."""
        sel = self.capture_selection(capture)

        def hidden(state, tokens):
            *_, cap = self._run_prefill(state, tokens, sel)
            return cap

        return self._compiled(
            ("hidden", b, t, capture),
            lambda: jax.jit(hidden, in_shardings=(self._state_shardings, self._sh(("batch", "seq"), (b, t))),
                            out_shardings=self.layout.replicated),
        )

    def decode_fn(self, b: int, pages_per_row: Any, num_pages: Any, page_size: Any, steps: int, with_logits: bool = False,
                  capture: tuple[int, ...] = ()):
        """(state, k_pages, v_pages, page_table (b, P), lengths, tokens, active, sampling) ->
        (tokens (steps, b)[, logits], k_pages, v_pages); the pages are donated (updated in place). With
        capture (layer ids, see capture_selection) the inputs of those layers at every step come after
        the tokens, (steps, b, n x hidden)."""
        graphdef, layout = self.placed.graphdef, self.layout
        sel = self.capture_selection(capture) if capture else None

        def decode(state, k_pages, v_pages, page_table, lengths, tokens, active, sp):
            out = pipeline.decode(
                graphdef, state, layout, k_pages, v_pages, page_table, lengths, tokens, active, sp, steps, with_logits,
                capture=None if sel is None else jnp.asarray(sel),
            )
            return out if sel is None else (out[0], out[3], out[1], out[2])

        rep = self.layout.replicated
        return self._paged_step(
            ("decode", b, pages_per_row, num_pages, page_size, steps, with_logits) + ((capture,) if capture else ()),
            decode, b, num_pages, page_size, outs=((rep, rep) if with_logits else rep,) + ((rep,) if capture else ()),
        )

    def chunk_fn(self, b: int, c: int, pages_per_row: Any, num_pages: Any, page_size: Any, with_logits: bool = False,
                 capture: tuple[int, ...] = ()):
        """(state, k_pages, v_pages, page_table (b, P), start (b,), n_new (b,), tokens (b, c), sampling) ->
        (next token (b,), its logits (b, vocab) or None, k_pages, v_pages): prefill over a cached prefix.

        Row r's tokens[r, :n_new[r]] (right-padded; n_new = 0: a padding row that writes nothing) sit
        at positions start[r] ..; they attend to the row's cached positions < start[r] in its pages and
        causally to each other, their K/V is written into the pages (the table covers positions up to
        start + n_new - 1; a windowed group's ring as in decode_fn), and the next token is drawn from
        the last one's logits, keyed by its position start + n_new exactly as prefill_fn keys a
        prompt's first token: a prompt run as chunks draws what the whole-prompt prefill draws. Serves
        prefix reuse (start = cached tokens) and chunked prefill (successive chunks of one prompt).
        The pages are donated; one program per (b, c, pages_per_row, pool) bucket. With capture (layer
        ids, see capture_selection) the inputs of those layers at every column come before the pages,
        (b, c, n x hidden)."""
        if b % self.stages:
            raise ValueError(f"chunk_fn: b={b} rows must be a multiple of the {self.stages} pipeline stages (use batch_bucket)")
        graphdef, layout = self.placed.graphdef, self.layout
        sel = self.capture_selection(capture) if capture else None

        def run(state, k_pages, v_pages, page_table, start, n_new, tokens, sp):
            hidden, k_pages, v_pages, *cap = pipeline.chunk(graphdef, state, layout, k_pages, v_pages, page_table, start,
                                                            n_new, tokens, capture=None if sel is None else jnp.asarray(sel))
            with use_layout(layout):
                logits = nnx.merge(graphdef, state).logits(hidden).astype(jnp.float32)
            return sample(logits, start + n_new, sp), logits if with_logits else None, *cap, k_pages, v_pages

        rep = self.layout.replicated
        return self._paged_step(
            ("chunk", b, c, pages_per_row, num_pages, page_size, with_logits) + ((capture,) if capture else ()),
            run, b, num_pages, page_size, outs=(rep, rep if with_logits else None) + ((rep,) if capture else ()),
        )

    def verify_fn(self, b: int, c: int, pages_per_row: Any, num_pages: Any, page_size: Any, with_logits: bool = False,
                  capture: tuple[int, ...] = ()):
        """(state, k_pages, v_pages, page_table (b, P), start (b,), proposed (b,), tokens (b, c), sampling) ->
        (tokens (b, c), accepted (b,), logits (b, c, vocab) or None, k_pages, v_pages): one speculative
        verification step.

        Row r feeds tokens[r, 0] (its last token, at position start[r]) and its proposed[r] drafts
        tokens[r, 1 : proposed[r] + 1] at the positions after it, as one chunk over its cached pages
        (chunk_fn's program with the logits of every column), writing all their K/V. sampling.verify
        judges the drafts: the row keeps tokens[r, :accepted[r] + 1], and the K/V of positions
        start .. start + accepted is valid; the K/V written past it is stale and is overwritten by
        the row's next call (attention never reads past a row's length). Rows with proposed = -1 are
        padding (write nothing). The pages are donated. With capture (layer ids, see capture_selection)
        the inputs of those layers at every column come before the pages, (b, c, n x hidden)."""
        if b % self.stages:
            raise ValueError(f"verify_fn: b={b} rows must be a multiple of the {self.stages} pipeline stages (use batch_bucket)")
        graphdef, layout = self.placed.graphdef, self.layout

        sel = self.capture_selection(capture) if capture else None

        def run(state, k_pages, v_pages, page_table, start, proposed, tokens, sp):
            n_new = jnp.maximum(proposed + 1, 0)
            hidden, k_pages, v_pages, *cap = pipeline.chunk(
                graphdef, state, layout, k_pages, v_pages, page_table, start, n_new, tokens, all_positions=True,
                capture=None if sel is None else jnp.asarray(sel),
            )
            with use_layout(layout):
                logits = nnx.merge(graphdef, state).logits(hidden).astype(jnp.float32)
            drafts = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)  # column j judges tokens[:, j + 1]
            out, accepted = verify(logits, drafts, jnp.maximum(proposed, 0), start, sp)
            return out, accepted, logits if with_logits else None, *cap, k_pages, v_pages

        rep = self.layout.replicated
        return self._paged_step(
            ("verify", b, c, pages_per_row, num_pages, page_size, with_logits) + ((capture,) if capture else ()),
            run, b, num_pages, page_size, outs=(rep, rep, rep if with_logits else None) + ((rep,) if capture else ()),
        )

    # ---- KV handoff --------------------------------------------------------------------------
    def kv_spec(self) -> transfer.KVSpec:
        m, groups = self.placed.module, self.cache_groups
        shapes = m.kv_shapes(1, 1)
        repeat = self.kv_repeat
        return transfer.KVSpec(
            model=transfer.model_fingerprint(self.placed.cfg),
            num_layers=len(m.layer_slots),
            heads=tuple(sh[2] // repeat for sh in shapes),
            dims=tuple(sh[4] for sh in shapes),
            dtype=str(jnp.dtype(m.compute_dtype)),
            logical_axes=tuple(m.kv_logical_axes),
            groups=tuple((len(groups.layers(g, m.layer_slots)[0]), w) for g, w in enumerate(groups.windows))
            if groups else (),
        )

    def _group_layers(self) -> list[tuple[np.ndarray, np.ndarray, int | None]]:
        """Per group: (slots of its real layers in layer order, their positions in the group's page
        arrays, window)."""
        m, groups = self.placed.module, self.cache_groups
        if groups is None:
            slots = np.asarray(m.layer_slots)
            return [(slots, slots, None)]
        out = []
        for g, w in enumerate(groups.windows):
            layers, pos = groups.layers(g, m.layer_slots)
            out.append((np.asarray(m.layer_slots)[layers], np.asarray(pos), w))
        return out

    @property
    def kv_repeat(self) -> int:
        m = self.placed.module
        return m.kv_heads // m.cfg.num_kv_heads

    def canonical_kv_shardings(self, b: int, t: int) -> tuple[jax.sharding.NamedSharding, ...]:
        spec = self.kv_spec()
        return tuple(self._sh(spec.logical_axes, shape) for shape in spec.array_shapes(b, t))

    def canonical_kv_fn(self, b: int, t: int):
        """(prefill k, v in slot order (with repeated KV heads), lengths (b,)) -> canonical KV: per
        cache group a (k, v) pair of its real layers, each KV head once; a windowed group only its ring
        of the prompt's last partial window (kv/cache.py ring_window). The form that crosses between
        meshes of different layouts."""
        repeat, parts = self.kv_repeat, self._group_layers()

        def canon(k, v, lengths):
            out = []
            for slots, _, window in parts:
                for x in (k, v):
                    x = x[slots][:, :, ::repeat]
                    out.append(x if window is None else kv_cache.ring_window(x, lengths, window))
            return tuple(out)

        row = self._sh(("batch",), (b,))
        return self._compiled(
            ("canonical", b, t),
            lambda: jax.jit(
                canon, in_shardings=self.kv_shardings(b, t) + (row,), out_shardings=self.canonical_kv_shardings(b, t)
            ),
        )

    def insert_fn(self, b: int, t: int, num_pages: Any, page_size: Any):
        """(k_pages, v_pages, canonical KV arrays, page ids (b, seq / page)) -> pages with each row's
        prompt KV written into its pages (rows with page id = num_pages are skipped). Per cache group
        (see decode_fn) the ids and the canonical (k, v) pair of its layers (seq = t, or the ring)."""
        repeat, parts = self.kv_repeat, self._group_layers()

        def insert(k_pages, v_pages, kv, page_ids):
            k_pages, v_pages, page_ids = self.unpack(k_pages), self.unpack(v_pages), self.unpack(page_ids)
            out = [[], []]
            for g, (_, positions, _) in enumerate(parts):
                for i, pages in enumerate((k_pages[g], v_pages[g])):
                    x, page = kv[2 * g + i], pages.shape[3]
                    x = jnp.repeat(x, repeat, axis=2) if repeat > 1 else x
                    x = jnp.zeros((pages.shape[0],) + x.shape[1:], x.dtype).at[positions].set(x)
                    s_, b_, h, t_, d = x.shape
                    x = x.reshape(s_, b_, h, t_ // page, page, d).transpose(0, 1, 3, 2, 4, 5)
                    x = x.reshape(s_, b_ * (t_ // page), h, page, d)
                    out[i].append(pages.at[:, page_ids[g].reshape(-1)].set(x.astype(pages.dtype), mode="drop"))
            return self.pack(out[0]), self.pack(out[1])

        k_sh, v_sh = self.page_shardings(num_pages, page_size)
        rep = self.layout.replicated
        return self._compiled(
            ("insert", b, t, num_pages, page_size),
            lambda: jax.jit(
                insert,
                in_shardings=(k_sh, v_sh, self.canonical_kv_shardings(b, t), rep),
                out_shardings=(k_sh, v_sh),
                donate_argnums=(0, 1),
            ),
        )

    # ---- KV pages between workers (engine/core.py: prefix reuse, P/D page shipping) ----------
    # The canonical page form is the canonical KV's (real layers only, each KV head once) with the
    # batch x seq axes replaced by pages x page positions: per cache group a (k, v) pair of
    # (layers, pages, heads, page, dim). Page counts per group are bucketed by the caller; page id
    # num_pages marks padding (export reads zeros, import writes nothing).
    def canonical_page_shardings(self, counts: Any, page_size: Any) -> tuple[jax.sharding.NamedSharding, ...]:
        spec = self.kv_spec()
        axes = kv_cache.paged_axes(spec.logical_axes)
        return tuple(self._sh(axes, s) for s in spec.page_shapes(self.unpack(counts), self.unpack(page_size)))

    def export_pages_fn(self, counts: Any, num_pages: Any, page_size: Any):
        """(k_pages, v_pages, page ids per group (counts,)) -> canonical pages of those ids."""
        repeat, parts = self.kv_repeat, self._group_layers()

        def export(k_pages, v_pages, ids):
            k_pages, v_pages, ids = self.unpack(k_pages), self.unpack(v_pages), self.unpack(ids)
            out = []
            for g, (_, positions, _) in enumerate(parts):
                for pages in (k_pages[g], v_pages[g]):
                    x = jnp.take(pages[jnp.asarray(positions)], ids[g], axis=1, mode="fill", fill_value=0)
                    out.append(x[:, :, ::repeat])
            return tuple(out)

        k_sh, v_sh = self.page_shardings(num_pages, page_size)
        rep = self.layout.replicated
        return self._compiled(
            ("export_pages", counts, num_pages, page_size),
            lambda: jax.jit(export, in_shardings=(k_sh, v_sh, rep),
                            out_shardings=self.canonical_page_shardings(counts, page_size)),
        )

    def import_pages_fn(self, counts: Any, num_pages: Any, page_size: Any):
        """(k_pages, v_pages, canonical pages, page ids per group) -> pages with those written at the
        ids (padding ids dropped); the pages are donated."""
        repeat, parts = self.kv_repeat, self._group_layers()

        def import_(k_pages, v_pages, arrays, ids):
            k_pages, v_pages, ids = self.unpack(k_pages), self.unpack(v_pages), self.unpack(ids)
            out = [[], []]
            for g, (_, positions, _) in enumerate(parts):
                for i, pages in enumerate((k_pages[g], v_pages[g])):
                    x = arrays[2 * g + i]
                    x = jnp.repeat(x, repeat, axis=2) if repeat > 1 else x
                    x = jnp.zeros((pages.shape[0],) + x.shape[1:], x.dtype).at[jnp.asarray(positions)].set(x)
                    out[i].append(pages.at[:, ids[g]].set(x.astype(pages.dtype), mode="drop"))
            return self.pack(out[0]), self.pack(out[1])

        k_sh, v_sh = self.page_shardings(num_pages, page_size)
        rep = self.layout.replicated
        return self._compiled(
            ("import_pages", counts, num_pages, page_size),
            lambda: jax.jit(import_, in_shardings=(k_sh, v_sh, self.canonical_page_shardings(counts, page_size), rep),
                            out_shardings=(k_sh, v_sh), donate_argnums=(0, 1)),
        )

    # ---- host-side drivers -----------------------------------------------------------------
    def logits(self, tokens: np.ndarray) -> np.ndarray:
        b, t = tokens.shape
        bb, tb = self.batch_bucket(b), bucket(t, 16)
        padded = np.zeros((bb, tb), np.int32)
        padded[:b, :t] = tokens
        fn = self.forward_fn(bb, tb)
        out = self._timed(("forward", bb, tb), fn, self.placed.state, self.put(padded, ("batch", "seq")))
        return distributed.fetch(out, schedule=(padded,))[:b, :t]
