"""The contract between a model family and the code that builds, loads and runs it.

`ServingModel` is what the programs (engine/programs.py, engine/pipeline.py), the loaders and the
planner use of a model; every family's module implements it (checked by tests/test_contracts.py).
`BuildOptions` is how a model is built for a layout, made in one place (`build_options`) from the
family's declared capabilities instead of probing constructor signatures. `Family` is one entry of
the registry (models/__init__.py FAMILIES).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, runtime_checkable

import jax

from infire_jax.config import ModelConfig
from infire_jax.kv.cache import CacheGroups
from infire_jax.sharding import Layout, stage_slots

__all__ = ["BuildOptions", "ServingModel", "Family", "build_options"]


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """How a model's weights are stored for one layout.

    layer_slots: the slot of each layer in the stacked layer axis (pipeline stages get equal slot
        counts; padding slots hold zeros, sharding.stage_slots).
    num_slots: length of the stacked layer axis.
    kv_repeat: each KV head stored this many times, so tp > KV heads gives each device its own head.
    layer_list: layers stored as a list of per-layer weights, run unrolled (no pipeline axis).
    """

    layer_slots: tuple[int, ...]
    num_slots: int
    kv_repeat: int = 1
    layer_list: bool = False


@runtime_checkable
class ServingModel(Protocol):
    """What the programs use of a model module (Flax NNX)."""

    cfg: ModelConfig
    layer_slots: tuple[int, ...]  # slot of each real layer
    active: tuple[bool, ...]  # per slot: a real layer (False: pipeline padding)
    compute_dtype: Any
    kv_logical_axes: tuple[str, ...]  # (layers, batch, heads, seq, dim) of each cached array

    @property
    def kv_heads(self) -> int:
        """KV heads as stored and cached (cfg.num_kv_heads x kv_repeat)."""
        ...

    @property
    def unrolled(self) -> bool:
        """Layers run as an unrolled loop, so a decode step may pass the cache as per-layer views."""
        ...

    def kv_shapes(self, batch: int, seq: int) -> tuple[tuple[int, ...], tuple[int, ...]]: ...

    def stack_index(self) -> dict[str, tuple[tuple[int, int], ...]]:
        """For each stacked attribute (e.g. "layers"; MoE families also "dense", "moe"): (layer,
        position in that stack) of every real layer it holds. Code moving stacked parameters between
        layouts (Model.save / restore) reads positions here, never assuming one entry per slot."""
        ...

    def cache_groups(self) -> CacheGroups | None:
        """Layers caching differently (Llama 4's windowed layers), or None: one full-length cache."""
        ...

    def embed_tokens(self, tokens: jax.Array) -> jax.Array: ...

    def context(self, start: jax.Array, t: int) -> dict[str, jax.Array]: ...

    def stack(self, x: jax.Array, ctx: dict[str, jax.Array], k_cache: Any = None, v_cache: Any = None,
              active: jax.Array | None = None) -> tuple[jax.Array, Any, Any]: ...

    def norm(self, x: jax.Array) -> jax.Array: ...

    def logits(self, hidden: jax.Array) -> jax.Array: ...

    def __call__(self, tokens: jax.Array, start: jax.Array, k_cache: Any = None, v_cache: Any = None
                 ) -> tuple[jax.Array, Any, Any]: ...


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: its module, its HF tensor map, and the storage options it supports."""

    name: str
    module: Callable[..., ServingModel]  # (cfg, *, layer_slots, num_slots, [kv_repeat], [layer_list], param_dtype, compute_dtype)
    hf_tensor_map: Callable[..., dict[str, tuple]]  # (cfg, layer_slots, [kv_repeat], [layer_list])
    ffn_kinds: Callable[[ModelConfig], tuple[str, ...]]  # per layer: "dense" or "moe"
    repeats_kv_heads: bool = False  # can store each KV head several times (BuildOptions.kv_repeat)
    per_layer_weights: bool = False  # can store layers as a list (BuildOptions.layer_list)
    # stack(..., capture=(slots, n) bool) also returns the inputs of the chosen layer slots (n, B, T, D):
    # the target hidden states an EAGLE-3 head reads (engine/eagle3.py)
    captures_hidden: bool = False

    def _storage_kwargs(self, options: BuildOptions) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.repeats_kv_heads:
            out["kv_repeat"] = options.kv_repeat
        if self.per_layer_weights:
            out["layer_list"] = options.layer_list
        return out

    def build(self, cfg: ModelConfig, options: BuildOptions, *, param_dtype: Any, compute_dtype: Any) -> ServingModel:
        """The module for these options (call under nnx.eval_shape for an abstract model, and under
        sharding.use_layout: families whose stacks depend on the pipeline depth read it there)."""
        return self.module(
            cfg, layer_slots=options.layer_slots, num_slots=options.num_slots, **self._storage_kwargs(options),
            param_dtype=param_dtype, compute_dtype=compute_dtype,
        )

    def tensor_map(self, cfg: ModelConfig, options: BuildOptions) -> dict[str, tuple]:
        """HF tensor name -> (parameter path, index, HF shape[, transform]) for these options."""
        return self.hf_tensor_map(cfg, options.layer_slots, **self._storage_kwargs(options))


def build_options(family: Family, cfg: ModelConfig, layout: Layout, *, layer_list: bool | None = None) -> BuildOptions:
    """The storage options for `layout`: layer slots for its pipeline depth; KV heads repeated when tp
    splits them finer than the model has them (and evenly); per-layer weights when no mesh axis splits
    the layers (a scan over stacked weights copies each layer's slice every step on XLA:CPU) unless
    `layer_list` says otherwise."""
    stages = layout.axis_size("layers")
    num_slots, slots = stage_slots(cfg.num_layers, stages)
    tp = layout.axis_size("kv_heads")
    repeat = tp // cfg.num_kv_heads if family.repeats_kv_heads and cfg.num_kv_heads < tp and tp % cfg.num_kv_heads == 0 else 1
    per_layer = family.per_layer_weights and stages == 1 if layer_list is None else layer_list and family.per_layer_weights
    return BuildOptions(layer_slots=slots, num_slots=num_slots, kv_repeat=repeat, layer_list=per_layer)
