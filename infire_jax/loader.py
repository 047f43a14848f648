"""Placing a model on a layout: the one way a family is built for a deployment and its weights read.

Below the engine and the planner, above models and checkpoint readers:
- `make_layout(mesh_spec, rules, kernels)`: the Layout of a mesh spec string and a rules table.
- `abstract_model(cfg, layout, ...)`: the family's module built abstractly (nnx.eval_shape) for the
  layout, with the storage options the layout implies (models.contract.build_options) — what the
  planner sizes and what `place_model` fills.
- `place_model(model_dir, layout, ...)`: the abstract model with its parameters read from a checkpoint
  (HF safetensors, a compressed checkpoint, or a directory written by Model.save) straight into shards.
Engines are assembled from placed models by engine/build.py.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from infire_jax import mesh as mesh_lib
from infire_jax.checkpoint import compressed, hf, store
from infire_jax.config import ModelConfig, load_config
from infire_jax.flax_nnx import nnx
from infire_jax.kernels import cpu as cpu_kernels  # native Huffman decode for compressed checkpoints
from infire_jax.models import BuildOptions, ServingModel, build_options, family_of
from infire_jax.sharding import DEFAULT_RULES, Layout, use_layout

__all__ = ["DTYPES", "dtype_of", "make_layout", "abstract_model", "place_model", "PlacedModel"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str) -> Any:
    """The jnp dtype of a dtype name ("float32", "bfloat16", "float16")."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def make_layout(mesh_spec: str, rules: Mapping[str, Any] | None = None, kernels: str = "auto") -> Layout:
    """The Layout of a mesh spec ("pp=2,tp=2@0-3") with a rules table (default: sharding.DEFAULT_RULES)."""
    return Layout(mesh_lib.make_mesh(mesh_spec), dict(rules or DEFAULT_RULES), kernels)


@dataclasses.dataclass
class PlacedModel:
    """An NNX model's graph and its parameters placed on a layout, and how: the checkpoint it came
    from and its dtypes (what a draft model or an EAGLE-3 head placed beside it follows)."""

    graphdef: Any
    state: Any  # nnx.State of jax.Arrays with NamedShardings
    layout: Layout
    source: pathlib.Path | None = None
    dtype: str = "float32"
    compute_dtype: str = "float32"

    @functools.cached_property
    def module(self) -> ServingModel:
        return nnx.merge(self.graphdef, self.state)

    @property
    def cfg(self) -> ModelConfig:
        return self.module.cfg


def abstract_model(
    cfg: ModelConfig,
    layout: Layout,
    *,
    dtype: str = "float32",
    compute_dtype: str = "float32",
    layer_list: bool | None = None,
) -> tuple[ServingModel, BuildOptions]:
    """The family's module for `layout` as ShapeDtypeStructs (no memory), and the options it was built with."""
    family = family_of(cfg)
    options = build_options(family, cfg, layout, layer_list=layer_list)
    with use_layout(layout):  # families whose stacks depend on the pipeline depth read it here
        module = nnx.eval_shape(
            lambda: family.build(cfg, options, param_dtype=dtype_of(dtype), compute_dtype=dtype_of(compute_dtype))
        )
    return module, options


def _flat(module: nnx.Module) -> tuple[Any, Any, dict]:
    graphdef, state = nnx.split(module)
    flat = {tuple(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}
    return graphdef, state, flat


def place_model(
    model_dir: str | pathlib.Path,
    layout: Layout,
    *,
    dtype: str = "float32",
    compute_dtype: str = "float32",
    cfg: ModelConfig | None = None,
) -> PlacedModel:
    """Build the model abstractly for `layout`, then read the checkpoint (HF safetensors, a
    compressed checkpoint (checkpoint/compressed.py) or a directory written by Model.save) straight
    into sharded arrays."""
    cfg = cfg or load_config(model_dir)
    family = family_of(cfg)
    abstract, options = abstract_model(cfg, layout, dtype=dtype, compute_dtype=compute_dtype)
    graphdef, state, flat = _flat(abstract)
    if store.is_saved_model(model_dir):  # per-layer saved arrays, read onto the devices that hold them
        store.restore(model_dir, state, layout, abstract.stack_index(), options.kv_repeat)
        return PlacedModel(graphdef, state, layout, pathlib.Path(model_dir), dtype, compute_dtype)
    tmap = family.tensor_map(cfg, options)
    specs = {p: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype) for p, v in flat.items()}
    shardings = {p: layout.sharding(v.get_metadata()["logical_axes"], specs[p].shape) for p, v in flat.items()}
    ignore = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
    # Layers past num_layers (e.g. DeepSeek-V3's multi-token-prediction layer) are not served.
    common = dict(ignore=ignore, ignore_layers_from=cfg.num_layers, prefix=cfg.weight_prefix, skip_prefixes=cfg.skip_weight_prefixes)
    if compressed.is_compressed_checkpoint(model_dir):  # layer matrices stay compressed on the device
        arrays = compressed.load_into(model_dir, flat, layout, tmap, host_ops=cpu_kernels, **common)
    else:
        arrays = hf.load_into(model_dir, specs, shardings, tmap, **common)
    for p, var in flat.items():
        var.set_value(arrays[p])
    return PlacedModel(graphdef, state, layout, pathlib.Path(model_dir), dtype, compute_dtype)
