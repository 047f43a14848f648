"""Mixture-of-experts: routers, capacity-free expert dispatch, expert parallelism, and the stacked
decoder skeleton shared by the MoE families (Qwen3-MoE, Llama 4, DeepSeek-V3 / Kimi K2).

Routers (all in float32, as transformers computes them):
  softmax_topk          Qwen3-MoE / Mixtral: softmax over all experts, top-k, optional renormalisation.
  sigmoid_group_topk    DeepSeek-V3: sigmoid scores, + e_score_correction_bias for the *choice* only,
                        group-limited top-k (n_group / topk_group, a group scores the sum of its top 2),
                        weights = unbiased scores of the chosen experts, optional renormalisation, x scale.
  sigmoid_topk_logits   Llama 4: top-k of the raw logits, weight = sigmoid(logit); the weight scales the
                        expert's *input* (not its output).

Dispatch (`routed_experts`): the (token, k) assignments are sorted by expert and each expert's rows go
through its SwiGLU as one contiguous group: capacity-free (no token is ever dropped) and without a
dense all-experts product. Two group-matmul implementations:
  "ragged"  jax.lax.ragged_dot_general. On GPU/TPU XLA lowers it to a real grouped GEMM. On CPU, jax
            0.10.2 lowers it to a masked *dense* product over all groups (measured: time grows linearly
            with the expert count, 64 experts x 8 rows took 54 ms vs 0.07 ms for one expert's matmul;
            the `ragged-dot` HLO is "not supported by XLA:CPU ThunkEmitter"), so it is not used there.
  "tiled"   the CPU path: rows are cut into tiles of tm (8..64, ~ the mean rows per expert); a scan
            visits the (tile, expert) pairs that
            hold rows (at most tiles + experts - 1 of them, and at most one per row), each reading one
            expert's weights once and multiplying only that tile. Empty pairs are skipped by lax.cond.
"auto" picks ragged on gpu/tpu and tiled on cpu.

Expert parallelism: the expert weights carry the logical axis "experts" (-> "ep") and their hidden
columns "expert_mlp" (-> "tp"). When a layout splits either, the dispatch runs inside a shard_map over
exactly those mesh axes (`_expert_mesh`, the one place that reads mesh axis names, through the current
Layout): tokens are replicated over ep/tp, each device runs the rows routed to its local experts
against its column slice, and one psum over (ep, tp) of the (tokens, hidden) output combines them.
No expert weight ever moves; the only collective is that all-reduce of activations.

Stacked layers of different kinds: layers whose FFN differs (dense vs MoE) keep their FFN weights in
separate stacks, each holding only the layers of its kind ("dense", "moe"), so no dense layer carries
zero expert weights. The attention weights stay one stack over all slots. A static `SlotPlan` maps each
slot to (kind, position in that kind's stack); inside the one scan over slots, lax.switch picks the FFN
and dynamic-indexes its stack. For pipeline parallelism each kind's stack is laid out stage-major and
padded to the same count per stage, so the "layers" -> pp split hands every stage exactly its layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from infire_jax.compression.jax_decode import Palette12Weight
from infire_jax.config import ModelConfig
from infire_jax.flax_nnx import nnx
from infire_jax.kv.paged import scan_layers
from infire_jax.models import layers
from infire_jax.models.llama import gqa_params
from infire_jax.sharding import constrain, current_layout, stage_slots

__all__ = [
    "softmax_topk",
    "sigmoid_group_topk",
    "sigmoid_topk_logits",
    "routed_experts",
    "grouped_mlp",
    "SlotPlan",
    "pipeline_stages",
    "MoEDecoder",
    "PackedInt4",
    "int4_quantize",
    "int4_dequantize",
]

KINDS = ("dense", "moe")


# ------------------------------------------------------------------------------------------------
# Routers
# ------------------------------------------------------------------------------------------------


def softmax_topk(logits: jax.Array, k: int, norm: bool) -> tuple[jax.Array, jax.Array]:
    """(weights (N, k) f32, expert ids (N, k)) from router logits (N, E)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    w, idx = jax.lax.top_k(probs, k)
    if norm:
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    return w, idx


def sigmoid_group_topk(
    logits: jax.Array,
    bias: jax.Array,
    k: int,
    n_group: int,
    topk_group: int,
    norm: bool,
    scale: float,
) -> tuple[jax.Array, jax.Array]:
    """DeepSeek-V3 "noaux_tc" routing (transformers DeepseekV3TopkRouter)."""
    n, e = logits.shape
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    choice = scores + bias.astype(jnp.float32)
    if n_group > 1 and topk_group < n_group:
        grouped = choice.reshape(n, n_group, e // n_group)
        group_scores = jnp.sum(jax.lax.top_k(grouped, min(2, e // n_group))[0], axis=-1)  # (N, G)
        _, top_groups = jax.lax.top_k(group_scores, topk_group)
        keep = jnp.sum(jax.nn.one_hot(top_groups, n_group, dtype=jnp.int32), axis=1) > 0  # (N, G)
        keep = jnp.repeat(keep, e // n_group, axis=1)
        choice = jnp.where(keep, choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, k)
    w = jnp.take_along_axis(scores, idx, axis=-1)
    if norm:
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
    return w * scale, idx


def sigmoid_topk_logits(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Llama 4: top-k of the logits, weight sigmoid(logit) (applied to the expert input)."""
    vals, idx = jax.lax.top_k(logits.astype(jnp.float32), k)
    return jax.nn.sigmoid(vals), idx


# ------------------------------------------------------------------------------------------------
# Grouped (per-expert) SwiGLU over rows sorted by expert
# ------------------------------------------------------------------------------------------------
# Expert weight layouts (the HF tensors reshaped, never transposed, so loading is a plain copy):
#   in_major=False (HF nn.Linear per expert: DeepSeek, Qwen3-MoE): gate_up (G, 2, F, D), down (G, D, F)
#   in_major=True  (Llama 4 fused experts):                       gate_up (G, D, 2, F), down (G, F, D)

_TILE = 64
_UNROLL = 16  # (tile, expert) pairs up to which the tiled dispatch is unrolled
DEFAULT_IMPL = "auto"  # "tiled" on cpu, "ragged" elsewhere; tests may force one


def _expert_swiglu(x: jax.Array, w_gate_up: Any, w_down: Any, in_major: bool) -> jax.Array:
    """One expert's SwiGLU on rows x (m, D)."""
    if in_major:
        gu = layers.dense(x, w_gate_up, "md,dcf->mcf")
        return layers.dense(jax.nn.silu(gu[:, 0]) * gu[:, 1], w_down, "mf,fd->md")
    gu = layers.dense(x, w_gate_up, "md,cfd->mcf")
    return layers.dense(jax.nn.silu(gu[:, 0]) * gu[:, 1], w_down, "mf,df->md")


def _grouped_tiled(xs: jax.Array, sizes: jax.Array, w_gate_up: Any, w_down: Any, in_major: bool) -> jax.Array:
    m, d = xs.shape
    g = sizes.shape[0]
    # tile ~ the mean rows per expert (>= 8): decode (few rows, many experts) multiplies 8-row tiles,
    # prefill (many rows per expert) 64-row ones
    per_expert = -(-m // g)
    tm = min(_TILE, max(8, 1 << (per_expert - 1).bit_length()), -(-m // 8) * 8)
    tiles = -(-m // tm)
    xs = jnp.pad(xs, ((0, tiles * tm - m), (0, 0)))
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first = starts // tm
    n_pairs = jnp.where(sizes > 0, (ends - 1) // tm - first + 1, 0)
    pair_end = jnp.cumsum(n_pairs)
    pair_start = pair_end - n_pairs
    total = pair_end[-1]

    def step(out, p):
        e = jnp.minimum(jnp.searchsorted(pair_end, p, side="right"), g - 1)
        r0 = (first[e] + p - pair_start[e]) * tm
        # Slice the expert here, not inside the cond: a cond operand that is the whole expert stack
        # was copied on every iteration (measured ~30x slower).
        wgu, wd = entry(w_gate_up, e), entry(w_down, e)

        def compute(out):
            rows = r0 + jnp.arange(tm)
            mask = (rows >= starts[e]) & (rows < ends[e])
            y = _expert_swiglu(jax.lax.dynamic_slice_in_dim(xs, r0, tm), wgu, wd, in_major)
            y = jnp.where(mask[:, None], y, 0).astype(out.dtype)
            return jax.lax.dynamic_update_slice_in_dim(out, jax.lax.dynamic_slice_in_dim(out, r0, tm) + y, r0, 0)

        return jax.lax.cond(p < total, compute, lambda o: o, out), None

    pairs = min(tiles + g - 1, m)
    # Decode (all rows in one tile, a few pairs) is unrolled: inside a loop, each pair's expert is
    # sliced from a copy of the layer's whole expert stack (the loop's operand) made every step, a
    # cost in all experts' bytes where a step reads k of them (bench model, 64 experts, top 8: float32
    # experts 80 -> 6 ms per layer). Prefill keeps the loop: it reads most experts anyway.
    unroll = tiles == 1 and pairs <= _UNROLL
    out, _ = jax.lax.scan(step, jnp.zeros((tiles * tm, d), xs.dtype), jnp.arange(pairs), unroll=unroll)
    return out[:m]


def _grouped_ragged(xs: jax.Array, sizes: jax.Array, w_gate_up: Any, w_down: Any, in_major: bool) -> jax.Array:
    wgu = layers.materialize(w_gate_up, xs.dtype)
    wd = layers.materialize(w_down, xs.dtype)
    g = wgu.shape[0]

    def rdot(x, w, contract):
        dims = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(([1], [contract]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0]
        )
        return jax.lax.ragged_dot_general(x, w, sizes, dims)

    if in_major:
        gu = rdot(xs, wgu.reshape(g, wgu.shape[1], -1), 1)
        f = gu.shape[-1] // 2
        h = jax.nn.silu(gu[:, :f]) * gu[:, f:]
        y = rdot(h, wd, 1)
    else:
        gu = rdot(xs, wgu.reshape(g, -1, wgu.shape[-1]), 2)
        f = gu.shape[-1] // 2
        h = jax.nn.silu(gu[:, :f]) * gu[:, f:]
        y = rdot(h, wd, 2)
    rows = jnp.arange(xs.shape[0])
    return jnp.where((rows < jnp.sum(sizes))[:, None], y, 0)


def _platform() -> str:
    layout = current_layout()
    if layout is not None:
        return layout.mesh.devices.flat[0].platform
    return jax.default_backend()


def _stored_order(w_gate_up: Any, w_down: Any, in_major: bool) -> tuple[Any, Any, bool]:
    """Input-major expert weights that a compressed checkpoint stored output-major (checkpoint/
    compressed.py stored_order) are used in their stored order: the (N, K) operand of the few-row
    kernel and of XLA's 2-D dot, with no transpose."""
    stored = in_major and all(isinstance(w, Palette12Weight) and w.perm not in (None, tuple(range(len(w.perm))))
                              for w in (w_gate_up, w_down))
    if not stored:
        return w_gate_up, w_down, in_major
    return dataclasses.replace(w_gate_up, perm=None), dataclasses.replace(w_down, perm=None), False


def grouped_mlp(
    xs: jax.Array, sizes: jax.Array, w_gate_up: Any, w_down: Any, *, in_major: bool, impl: str = "auto"
) -> jax.Array:
    """Rows xs (M, D) sorted by expert, sizes (G,) rows per expert (sum <= M; rows past the sum give
    zeros) -> each row through its expert's SwiGLU, (M, D)."""
    w_gate_up, w_down, in_major = _stored_order(w_gate_up, w_down, in_major)
    impl = DEFAULT_IMPL if impl == "auto" else impl
    if impl == "auto":
        impl = "tiled" if _platform() == "cpu" else "ragged"
    if impl == "tiled":
        return _grouped_tiled(xs, sizes, w_gate_up, w_down, in_major)
    if impl == "ragged":
        return _grouped_ragged(xs, sizes, w_gate_up, w_down, in_major)
    raise ValueError(f"unknown grouped matmul impl {impl!r} (auto, tiled, ragged)")


# ------------------------------------------------------------------------------------------------
# INT4 expert weights (compressed-tensors "pack-quantized": int4 symmetric, group-wise scales)
# ------------------------------------------------------------------------------------------------
# A Linear weight W (out, in) is stored as weight_packed (out, in/8) int32 -- eight 4-bit values
# q + 8 per word, value j of a word in bits 4j..4j+3 -- weight_scale (out, in/group) (bf16) and
# weight_shape [out, in]; W = q * scale of its group along `in`. The packed words and the scales stay
# on the device as they are; an expert's weights are unpacked inside the step right before its
# matmul (one expert at a time in the tiled dispatch), so no dequantised copy of the experts exists.


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedInt4:
    packed: Any  # (..., in/8) int32
    scale: Any  # (..., in/group) bf16 / f32

    def decode_f32(self) -> jax.Array:
        packed = jnp.asarray(self.packed)
        shifts = jnp.arange(8, dtype=jnp.int32) * 4
        q = (jnp.right_shift(packed[..., None], shifts) & 15) - 8  # (..., in/8, 8)
        scale = layers.materialize(self.scale, jnp.float32)
        groups = scale.shape[-1]
        q = q.reshape(*packed.shape[:-1], groups, -1).astype(jnp.float32)
        return (q * scale[..., None]).reshape(*packed.shape[:-1], -1)


def int4_quantize(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 group quantisation of w (out, in) as compressed-tensors does it (scale =
    absmax / 7.5, stored in bf16; q = clip(round(w / scale), -8, 7)) -> (packed int32, bf16 scale)."""
    import ml_dtypes

    out, inp = w.shape
    if inp % group or group % 8:
        raise ValueError(f"input dim {inp} is not a multiple of the group size {group} (a multiple of 8)")
    g = w.astype(np.float32).reshape(out, inp // group, group)
    scale = (np.abs(g).max(axis=-1) / 7.5).astype(ml_dtypes.bfloat16)
    s = scale.astype(np.float32)
    q = np.clip(np.round(g / np.where(s == 0, 1, s)[..., None]), -8, 7).astype(np.int64).reshape(out, inp)
    u = (q + 8).reshape(out, inp // 8, 8)
    packed = np.sum(u << (4 * np.arange(8)), axis=-1).astype(np.uint32).view(np.int32)
    return packed, scale


def int4_dequantize(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """numpy reference of PackedInt4.decode_f32 for one (out, in/8) tensor."""
    u = (packed.view(np.uint32)[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 15
    q = u.reshape(packed.shape[0], -1).astype(np.int64) - 8
    s = np.asarray(scale, np.float32)
    return (q.reshape(q.shape[0], s.shape[1], -1) * s[..., None]).reshape(q.shape).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Dispatch with expert parallelism
# ------------------------------------------------------------------------------------------------


def _dispatch_local(
    x: jax.Array,
    weights: jax.Array,
    idx: jax.Array,
    w_gate_up: Any,
    w_down: Any,
    first_expert: jax.Array | int,
    in_major: bool,
    scale_input: bool,
    impl: str,
) -> jax.Array:
    """The contribution of the experts [first_expert, first_expert + G) held locally to every token."""
    n, k = idx.shape
    g = jax.tree.leaves(w_gate_up)[0].shape[0]
    local = idx.reshape(-1) - first_expert
    mine = (local >= 0) & (local < g)
    key = jnp.where(mine, local, g)  # rows of other devices' experts sort last and are skipped
    order = jnp.argsort(key, stable=True)
    sizes = jnp.bincount(key, length=g + 1)[:g].astype(jnp.int32)
    w_rows = weights.reshape(-1)[order].astype(x.dtype)[:, None]
    xs = x[order // k]
    if scale_input:
        xs = xs * w_rows
    ys = grouped_mlp(xs, sizes, w_gate_up, w_down, in_major=in_major, impl=impl)
    if not scale_input:
        ys = ys * w_rows
    ys = jnp.where(mine[order][:, None], ys, 0)
    back = jnp.zeros_like(ys).at[order].set(ys)  # undo the sort: row r = (token r // k, choice r % k)
    return jnp.sum(back.reshape(n, k, -1), axis=1)


def _mesh_axes(entry: Any) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _weight_spec(layout, w: Any, axes: Sequence[str | None]) -> tuple[Any, P]:
    """(shard_map spec tree of an expert weight, its PartitionSpec). A packed int4 weight takes the
    spec its group scales allow, for the packed words and the scales alike (so they stay aligned).
    A compressed (palette12) weight was cut into blocks for its layout when it was loaded: its
    leaves are split over the experts axis and those blocks, and each device decodes its own."""
    if isinstance(w, PackedInt4):
        spec = layout.spec(axes, w.scale.shape)
        return PackedInt4(spec, spec), spec
    spec = layout.spec(axes, w.shape)
    if isinstance(w, Palette12Weight):
        expert = tuple(spec)[:1] or (None,)
        blocks = tuple(w.block_spec or ())
        if w.perm is not None and blocks:  # stored order -> logical order
            blocks = tuple(blocks[list(w.perm).index(i)] for i in range(len(blocks)))
        if _trim(spec) != _trim((*expert, *blocks)):
            raise ValueError(
                f"a compressed expert weight blocked as {w.block_spec} runs on a layout that splits it as {spec}; "
                "load the compressed checkpoint for the layout it runs on"
            )
        return w.leaf_specs(expert), spec
    return spec, spec


def _trim(entries: Sequence[Any]) -> tuple:
    entries = list(entries)
    while entries and entries[-1] is None:
        entries.pop()
    return tuple(entries)


def _local(w: Any) -> Any:
    """An expert weight as one device holds it inside the dispatch's shard_map."""
    return w.local_shard() if isinstance(w, Palette12Weight) else w


def _axis_of(spec: P, axes: Sequence[str | None], logical: str) -> Any:
    i = list(axes).index(logical)
    return spec[i] if i < len(spec) else None


def _expert_mesh(gate_up_axes: Sequence[str | None], down_axes: Sequence[str | None], w_gate_up, w_down):
    """The one place that reads mesh axis names: (mesh, weight specs, expert axes, manual axes) for
    the shard_map of the current layout, or None when the layout does not split the experts."""
    layout = current_layout()
    if layout is None or layout.mesh.size == 1:
        return None
    tree_gu, spec_gu = _weight_spec(layout, w_gate_up, gate_up_axes)
    tree_d, spec_d = _weight_spec(layout, w_down, down_axes)
    if _axis_of(spec_gu, gate_up_axes, "expert_mlp") != _axis_of(spec_d, down_axes, "expert_mlp"):
        # e.g. packed int4 down_proj whose group count tp does not divide: keep hidden columns whole
        rules = dict(layout.rules, expert_mlp=None)
        layout = dataclasses.replace(layout, rules=rules)
        tree_gu, spec_gu = _weight_spec(layout, w_gate_up, gate_up_axes)
        tree_d, spec_d = _weight_spec(layout, w_down, down_axes)
    manual = {a for s in (spec_gu, spec_d) for entry in s for a in _mesh_axes(entry)}
    if not manual:
        return None
    expert_axes = _mesh_axes(spec_gu[0]) if len(spec_gu) else ()
    context = jax.sharding.get_abstract_mesh()
    mesh = layout.mesh if context.empty else context
    return mesh, tree_gu, tree_d, expert_axes, tuple(sorted(manual))


def routed_experts(
    x: jax.Array,  # (N, D)
    weights: jax.Array,  # (N, k) routing weights
    idx: jax.Array,  # (N, k) expert ids
    w_gate_up: Any,
    w_down: Any,
    *,
    gate_up_axes: Sequence[str | None],
    down_axes: Sequence[str | None],
    in_major: bool = False,
    scale_input: bool = False,
    impl: str = "auto",
) -> jax.Array:
    """sum_j weights[:, j] * expert_{idx[:, j]}(x) (or expert(weights * x) with scale_input), (N, D)."""
    ep = _expert_mesh(gate_up_axes, down_axes, w_gate_up, w_down)
    if ep is None:
        return _dispatch_local(x, weights, idx, w_gate_up, w_down, 0, in_major, scale_input, impl)
    mesh, spec_gu, spec_d, expert_axes, manual = ep

    def local(x, weights, idx, w_gate_up, w_down):
        w_gate_up, w_down = _local(w_gate_up), _local(w_down)
        g = jax.tree.leaves(w_gate_up)[0].shape[0]
        first = jax.lax.axis_index(expert_axes) * g if expert_axes else 0
        y = _dispatch_local(x, weights, idx, w_gate_up, w_down, first, in_major, scale_input, impl)
        return jax.lax.psum(y, manual)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(), P(), spec_gu, spec_d),
        out_specs=P(),
        axis_names=set(manual),
        check_vma=False,
    )(x, weights, idx, w_gate_up, w_down)


# ------------------------------------------------------------------------------------------------
# Slot plan: stacks per layer kind, laid out per pipeline stage
# ------------------------------------------------------------------------------------------------


def pipeline_stages(num_layers: int, layer_slots: Sequence[int]) -> int:
    """The pipeline depth a slot assignment was made for: the current layout's (when one is active
    and matches), else the smallest depth that reproduces `layer_slots`.

    Depths giving the same slots (e.g. 4 layers on 1 or 2 stages) are told apart only by the layout;
    SlotPlan.local_tables checks at trace time that the stacks split over the stages actually used,
    and raises a clear error otherwise."""
    slots = tuple(layer_slots)
    layout = current_layout()
    if layout is not None:
        p = layout.axis_size("layers")
        if stage_slots(num_layers, p)[1] == slots:
            return p
    for p in range(1, max(slots) + 2):
        if stage_slots(num_layers, p)[1] == slots:
            return p
    return 1


@dataclasses.dataclass(frozen=True)
class SlotPlan:
    """Static map slot -> (FFN kind, position in that kind's stack); -1 for padding slots."""

    num_slots: int
    stages: int
    slot_kind: tuple[int, ...]
    slot_pos: tuple[int, ...]
    sizes: tuple[int, ...]  # stack length per kind (KINDS order); 0 = no layer of that kind

    @classmethod
    def build(
        cls, layer_kinds: Sequence[str], layer_slots: Sequence[int], num_slots: int, stages: int,
        kinds: Sequence[str] = KINDS,
    ) -> "SlotPlan":
        """kinds: the kind names in stack order (the FFN kinds by default; KV cache groups use it too)."""
        kinds = tuple(kinds)
        per = -(-len(layer_kinds) // stages)  # slots per stage, as stage_slots assigns them
        counts = np.zeros((len(kinds), stages), int)
        for kind, slot in zip(layer_kinds, layer_slots):
            counts[kinds.index(kind), slot // per] += 1
        width = counts.max(axis=1)
        kind_of, pos_of = [-1] * num_slots, [-1] * num_slots
        seen = np.zeros_like(counts)
        for kind, slot in zip(layer_kinds, layer_slots):
            k, s = kinds.index(kind), slot // per
            kind_of[slot], pos_of[slot] = k, int(s * width[k] + seen[k, s])
            seen[k, s] += 1
        return cls(num_slots, stages, tuple(kind_of), tuple(pos_of), tuple(int(w * stages) for w in width))

    @classmethod
    def for_model(
        cls,
        layer_kinds: Sequence[str],
        layer_slots: Sequence[int],
        num_slots: int | None = None,
        stages: int | None = None,
    ) -> "SlotPlan":
        """The plan a module builds and its hf_tensor_map uses: both infer the pipeline depth from the
        slots alone (or the active layout), so they always agree on stack positions."""
        stages = stages or pipeline_stages(len(layer_kinds), layer_slots)
        return cls.build(layer_kinds, layer_slots, num_slots or max(layer_slots) + 1, stages)

    def position(self, slot: int) -> int:
        return self.slot_pos[slot]

    def local_tables(self, local_slots: int) -> tuple[np.ndarray, np.ndarray]:
        """(kind, index into the stage-local part of the kind's stack), each (stages, local_slots),
        for stages of `local_slots` slots each. Raises if the stacks do not split that way."""
        if self.num_slots % local_slots:
            raise ValueError(f"{self.num_slots} layer slots do not split into stages of {local_slots}")
        p = self.num_slots // local_slots
        kind = np.zeros(self.num_slots, np.int32)
        index = np.zeros(self.num_slots, np.int32)
        for slot, (k, pos) in enumerate(zip(self.slot_kind, self.slot_pos)):
            if k < 0:
                continue
            chunk = self.sizes[k] // p
            if self.sizes[k] % p or pos // chunk != slot // local_slots:
                raise ValueError(
                    f"this model's layer stacks were laid out for {self.stages} pipeline stage(s) but run on {p}; "
                    "build it for the layout it runs on: load it inside `with sharding.use_layout(layout):` "
                    "(or pass stages= to the model and to hf_tensor_map)"
                )
            kind[slot], index[slot] = k, pos - (slot // local_slots) * chunk
        return kind.reshape(p, local_slots), index.reshape(p, local_slots)


def _stage_index(local_slots: int, num_slots: int) -> jax.Array:
    """Which pipeline stage is tracing (0 when one stage holds every slot)."""
    if local_slots == num_slots:
        return jnp.int32(0)
    layout = current_layout()
    if layout is None:
        raise ValueError("a pipeline stage's slice of the layers is traced outside a layout")
    return jax.lax.axis_index(_mesh_axes(layout.rules.get("layers")))


def _param(shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: Any) -> nnx.Param:
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)


def entry(w: Any, i: jax.Array) -> Any:
    """Entry i of a stacked weight's leading axis, leaf by leaf (a compressed weight is a pytree whose
    leaves all carry the stack axes). bf16 leaves are sliced as their 16-bit patterns: XLA:CPU
    slices a bf16 array by converting it to float32 first (the whole stack, hoisted out of the decode
    loop: a float32 copy of every expert per dispatch)."""

    def index(a):
        if a.dtype != jnp.bfloat16:
            return jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False)
        bits = jax.lax.dynamic_index_in_dim(jax.lax.bitcast_convert_type(a, jnp.uint16), i, 0, keepdims=False)
        return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)

    return jax.tree.map(index, w)


def take(stack: dict[str, jax.Array], i: jax.Array) -> dict[str, jax.Array]:
    """Layer i of a stack of parameters."""
    return {k: entry(v, i) for k, v in stack.items()}


# ------------------------------------------------------------------------------------------------
# Decoder skeleton
# ------------------------------------------------------------------------------------------------


class MoEDecoder(nnx.Module):
    """Embedding, stacked layers (attention stack over all slots + per-kind FFN stacks), final norm,
    LM head. Subclasses define the attention and FFN of their family:

      ffn_kinds(cfg) -> per-layer kind ("dense" / "moe")
      _attn_params(p, n) / _ffn_params(kind, p, n) -> dict of stacked nnx.Params (attention: GQA
          by default)
      _attention(w, x, ctx, kc, vc, flags) -> (x after the attention residual, (k_new, v_new))
      _ffn(kind, w, h) -> FFN output
      slot_flags() -> dict name -> per-slot static tuple (optional, passed to _attention as arrays)
      cache_groups() -> kv/cache.py CacheGroups (optional: layers keeping different caches)
      context(start, t), kv_shapes(batch, seq) (GQA's k/v pair by default)
    """

    kv_logical_axes = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        layer_slots: tuple[int, ...] | None = None,
        num_slots: int | None = None,
        param_dtype: Any = jnp.float32,
        compute_dtype: Any = jnp.float32,
        stages: int | None = None,
    ):
        self.cfg = cfg
        self.layer_slots = tuple(layer_slots or range(cfg.num_layers))
        num_slots = num_slots or max(self.layer_slots) + 1
        self.active = tuple(s in set(self.layer_slots) for s in range(num_slots))
        self.compute_dtype = compute_dtype
        self.plan = SlotPlan.for_model(self.ffn_kinds(cfg), self.layer_slots, num_slots, stages)
        for p in range(1, num_slots + 1):  # fail here, not in a compile, if the stacks cannot split
            if stage_slots(cfg.num_layers, p) == (num_slots, self.layer_slots):
                if p != self.plan.stages:
                    self.plan.local_tables(num_slots // p)
                break
        v, d = cfg.vocab_size, cfg.hidden_size
        p = lambda shape, axes: _param(shape, axes, param_dtype)  # noqa: E731
        self.embed = p((v, d), ("vocab", "embed"))
        self.final_norm = p((d,), ("norm",))
        if not cfg.tie_word_embeddings:
            self.lm_head = p((v, d), ("vocab", "embed"))
        n = num_slots
        self.layers = nnx.Dict(
            dict(attn_norm=p((n, d), ("layers", "norm")), mlp_norm=p((n, d), ("layers", "norm")))
            | self._attn_params(p, n)
        )
        self.dense = nnx.Dict(self._ffn_params("dense", p, self.plan.sizes[0]) if self.plan.sizes[0] else {})
        self.moe = nnx.Dict(self._ffn_params("moe", p, self.plan.sizes[1]) if self.plan.sizes[1] else {})

    def stack_index(self) -> dict[str, tuple[tuple[int, int], ...]]:
        """For each stacked attribute ("layers", "dense", "moe"): (layer, position in that stack) of
        every real layer it holds. Code that moves stacked parameters between layouts (e.g. orbax
        save/restore) must use this instead of assuming one entry per slot in every stack."""
        out: dict[str, list[tuple[int, int]]] = {"layers": [], "dense": [], "moe": []}
        for layer, slot in enumerate(self.layer_slots):
            out["layers"].append((layer, slot))
            out[KINDS[self.plan.slot_kind[slot]]].append((layer, self.plan.slot_pos[slot]))
        return {k: tuple(v) for k, v in out.items() if v}

    @property
    def kv_heads(self) -> int:
        """KV heads as cached (MoE families never repeat them for tp)."""
        return self.cfg.num_kv_heads

    @property
    def unrolled(self) -> bool:
        """The layers are stacked and scanned (never a per-layer list)."""
        return False

    # ---- family hooks ----------------------------------------------------------------------
    @staticmethod
    def ffn_kinds(cfg: ModelConfig) -> tuple[str, ...]:
        raise NotImplementedError

    def slot_flags(self) -> dict[str, tuple]:
        return {}

    def _attn_params(self, p, n):
        return gqa_params(self.cfg, p, n)

    def kv_shapes(self, batch: int, seq: int):
        c = self.cfg
        shape = (len(self.active), batch, c.num_kv_heads, seq, c.head_dim)
        return shape, shape

    def cache_groups(self) -> Any:
        """kv/cache.py CacheGroups when layers cache differently (then stack() also takes a tuple of
        per-group caches, and _attention gets them whole plus flags cache_group / cache_index);
        None: one full-length cache for every layer."""
        return None

    # ---- shared machinery ------------------------------------------------------------------
    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        x = layers.embed_lookup(self.embed[...], tokens, self.compute_dtype)
        return constrain(x, ("batch", "seq", "embed"))

    def norm(self, x: jax.Array) -> jax.Array:
        return layers.rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps)

    def logits(self, hidden: jax.Array) -> jax.Array:
        head = self.embed if self.cfg.tie_word_embeddings else self.lm_head
        out = layers.dense(hidden, head[...], "...d,vd->...v")
        return constrain(out, ("batch", "seq", "vocab")[-out.ndim :])

    def _ffn_switch(self, kind: jax.Array, index: jax.Array, h: jax.Array) -> jax.Array:
        stacks = {"dense": self.dense, "moe": self.moe}
        present = [k for k, size in zip(KINDS, self.plan.sizes) if size]
        branches = []
        for name in present:
            stack = {key: var[...] for key, var in stacks[name].items()}
            branches.append(lambda h, name=name, stack=stack: self._ffn(name, take(stack, index), h))
        if len(branches) == 1:
            return branches[0](h)
        code = jnp.searchsorted(jnp.asarray([KINDS.index(k) for k in present]), kind)
        return jax.lax.switch(code, branches, h)

    def stack(
        self,
        x: jax.Array,
        ctx: dict[str, jax.Array],
        k_cache: jax.Array | tuple[jax.Array, ...] | None = None,
        v_cache: jax.Array | tuple[jax.Array, ...] | None = None,
        active: jax.Array | None = None,
        capture: jax.Array | None = None,
    ) -> tuple[jax.Array, ...]:
        """Run this module's stacked layers (all of them, or one pipeline stage's slice) over x.
        Caches: per slot (slots, B, KV, S, hd) or a kv.paged.PagedPool, or a tuple with one per cache
        group (see cache_groups).

        capture (slots, n) bool (Family.captures_hidden): capture[s, j] keeps the input of slot s as
        hidden state j, whatever the slot runs (attention kind, dense or MoE FFN); the captured
        (n, B, T, D) are returned after the K/V (zeros for a j whose slot is not in this stack)."""
        b, t, _ = x.shape
        num_slots = len(self.active)
        active = jnp.asarray(self.active) if active is None else active
        local = active.shape[0]
        stage = _stage_index(local, num_slots)
        kind_table, index_table = self.plan.local_tables(local)
        flags = {
            name: jnp.asarray(np.asarray(values).reshape(-1, local))[stage]
            for name, values in self.slot_flags().items()
        }
        xs_static = dict(kind=jnp.asarray(kind_table)[stage], index=jnp.asarray(index_table)[stage], flags=flags)
        grouped = isinstance(k_cache, tuple)  # one cache per KV cache group (cache_groups()), not per slot
        if grouped:
            caches, k_cache, v_cache = (k_cache, v_cache), None, None
            group_table, entry_table = self.cache_groups().plan.local_tables(local)
            xs_static["cache"] = (jnp.asarray(group_table)[stage], jnp.asarray(entry_table)[stage])
        k_shape, v_shape = self.kv_shapes(b, t)
        zeros = (jnp.zeros(k_shape[1:], x.dtype), jnp.zeros(v_shape[1:], x.dtype))
        k_cache, v_cache, layer_caches = scan_layers(k_cache, v_cache)
        cap = None if capture is None else layers.capture_buffer(capture.shape[1], x)

        def layer(w, s, kc, vc, x):
            flags = s["flags"]
            if grouped:  # the whole per-group caches; the layer's attention picks its group and entry
                (kc, vc), flags = caches, dict(flags, cache_group=s["cache"][0], cache_index=s["cache"][1])
            else:
                kc, vc = layer_caches(kc, vc)
            x, kv = self._attention(w, x, ctx, kc, vc, flags)
            h = layers.rms_norm(x, w["mlp_norm"], self.cfg.rms_norm_eps)
            y = self._ffn_switch(s["kind"], s["index"], h)
            return x + constrain(y, ("batch", "seq", "embed")), kv

        def body(carry, xs):
            x, cap = carry
            w, on, s, kc, vc, sel = xs
            cap = None if cap is None else layers.capture_input(cap, sel, x)
            x, kv = jax.lax.cond(on, lambda x: layer(w, s, kc, vc, x), lambda x: (x, zeros), x)
            return (x, cap), kv

        stacked = {name: var[...] for name, var in self.layers.items()}
        (x, cap), (k_new, v_new) = jax.lax.scan(body, (x, cap), (stacked, active, xs_static, k_cache, v_cache, capture))
        return (x, k_new, v_new) if cap is None else (x, k_new, v_new, cap)

    def __call__(
        self,
        tokens: jax.Array,
        start: jax.Array,
        k_cache: jax.Array | None = None,
        v_cache: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Hidden states (B, T, D) after the final norm and the new cache entries of every layer."""
        x = self.embed_tokens(tokens)
        x, k_new, v_new = self.stack(x, self.context(start, tokens.shape[1]), k_cache, v_cache)
        return self.norm(x), k_new, v_new


# ------------------------------------------------------------------------------------------------
# Helpers the families share
# ------------------------------------------------------------------------------------------------


def rope_interleaved(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate pairs (x[2i], x[2i+1]) of x[..., T, heads, d] by cos/sin[..., T, d/2] (Llama 4's complex
    rope, DeepSeek's rope_interleave). The output lists the rotated first members, then the second
    ones: a fixed permutation of the interleaved result, applied to q and k alike, so q.k is unchanged."""
    a, b = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., None, :], sin[..., None, :]
    return jnp.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def rope_half_tables(positions: jax.Array, inv_freq: Sequence[float], scale: float, dtype: Any):
    """cos/sin of shape positions.shape + (len(inv_freq),) for rope_interleaved."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return (jnp.cos(angles) * scale).astype(dtype), (jnp.sin(angles) * scale).astype(dtype)


def moe_layer_kinds(num_layers: int, moe_layers: Sequence[int]) -> tuple[str, ...]:
    chosen = set(moe_layers)
    return tuple("moe" if i in chosen else "dense" for i in range(num_layers))


def expert_axes(in_major: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Logical axes of one layer's expert weights (gate_up, down), without the leading layers axis."""
    if in_major:
        return ("experts", "embed", "fused", "expert_mlp"), ("experts", "expert_mlp", "embed")
    return ("experts", "fused", "expert_mlp", "embed"), ("experts", "embed", "expert_mlp")

