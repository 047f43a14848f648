"""orbax save/restore of a loaded model, independent of the layout it was loaded with.

The saved form is canonical: stacked layer parameters hold exactly the real layers (no pipeline
padding slots), so a model saved from pp=2 restores onto tp=4 or pp=3. Restoring reads each array
straight onto the target mesh, then places layers into the target's pipeline slots on device; in a
multi-process run each process reads the chunks of its own shards (checkpoint/reads.py counts the
file bytes tensorstore read).
"""

from __future__ import annotations

import functools
import json
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infire_jax import boot
from infire_jax.checkpoint import hf, reads
from infire_jax.compression.weights import EncodedWeight

__all__ = ["MARKER", "is_saved_model", "save", "restore", "split_layers"]

MARKER = "infire_jax_checkpoint.json"
_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def _orbax() -> Any:
    """orbax.checkpoint, imported on first save/restore: importing it costs ~1 s of every start."""
    import orbax.checkpoint as ocp

    return ocp


def is_saved_model(path: str | pathlib.Path) -> bool:
    return (pathlib.Path(path) / MARKER).is_file()


def _is_stacked(var: nnx.Variable) -> bool:
    axes = var.get_metadata().get("logical_axes") or ()
    return bool(axes) and axes[0] == "layers"


def _flat(state: Any) -> dict[str, nnx.Variable]:
    return {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def _canonical_values(placed: Any) -> dict[str, tuple[Any, tuple]]:
    """name -> (value, logical axes) in the canonical stacked form, whichever form the model is
    stored in: stacked weights keep only the real layers' slots, per-layer weights are stacked here
    (one weight at a time)."""
    slots = np.asarray(placed.module.layer_slots)
    out, per_layer = {}, {}
    for name, var in _flat(placed.state).items():
        if isinstance(var.get_value(), EncodedWeight):
            raise ValueError(
                "Model.save does not write compressed weights; the compressed checkpoint directory the "
                "model was loaded from is already its saved form (or load the original and save that)"
            )
        axes = tuple(var.get_metadata()["logical_axes"])
        key = hf.layer_list_key(tuple(name.split("/")))
        if key is not None:
            per_layer.setdefault("/".join(key[0]), {})[key[1]] = (var.get_value(), ("layers",) + axes)
        elif _is_stacked(var):
            out[name] = (var.get_value()[slots], axes)
        else:
            out[name] = (var.get_value(), axes)
    for name, layers in per_layer.items():
        out[name] = (jnp.stack([layers[i][0] for i in sorted(layers)]), layers[0][1])
    return out


def save(
    placed: Any, path: str | pathlib.Path, source_dir: str | pathlib.Path | None = None, chunk_bytes: int = 4 << 20
) -> pathlib.Path:
    """Write the model's parameters (canonical layer order) and its config/tokenizer files. Arrays
    are stored in chunks of at most chunk_bytes and at most one layer, the unit a restore reads: a
    process of a multi-process restore reads the chunks its shards touch, not whole arrays."""
    path = pathlib.Path(path).absolute()
    if hasattr(placed.module, "stack_index"):
        raise NotImplementedError(
            f"Model.save supports the dense families; {placed.cfg.architecture} keeps per-kind layer stacks "
            "(dense/MoE) that the canonical saved form does not describe yet — keep the HF checkpoint instead"
        )
    if path.exists():
        raise FileExistsError(f"{path} exists; choose a new directory for the saved model")
    repeat = _kv_repeat(placed.module)
    tree, save_args = {}, {}
    for name, (value, axes) in _canonical_values(placed).items():
        if repeat > 1 and "kv_heads" in axes:  # canonical form: each KV head once
            value = _unrepeat_kv(value, axes, repeat)
        tree[name] = value
        # one layer per chunk at most: a pipeline stage's restore reads its own layers only
        save_args[name] = _orbax().SaveArgs(chunk_byte_size=chunk_bytes, shard_axes=(0,) if axes[:1] == ("layers",) else ())
    path.mkdir(parents=True)
    ckpt = _orbax().StandardCheckpointer()
    ckpt.save(path / "params", tree, save_args=save_args)
    ckpt.wait_until_finished()
    for name in _COPIED:
        if source_dir and (pathlib.Path(source_dir) / name).is_file():
            shutil.copy(pathlib.Path(source_dir) / name, path / name)
    dtypes = sorted({str(v.dtype) for v in tree.values()})
    (path / MARKER).write_text(json.dumps({"format": "orbax-canonical-v1", "dtypes": dtypes}, indent=1))
    return path


def _is_fused_qkv(axes: tuple) -> bool:
    """A fused q/k/v weight or bias (models.llama.gqa_params): (..., kv_heads, G + 2, ...)."""
    i = axes.index("kv_heads")
    return i + 1 < len(axes) and axes[i + 1] == "fused"


def _unrepeat_kv(value: jax.Array, axes: tuple, r: int) -> jax.Array:
    """A weight with each KV head stored r times -> each KV head once. In a fused q/k/v weight the
    r copies of a KV head hold different query heads (G / r each): those are joined back."""
    i = axes.index("kv_heads")
    if not _is_fused_qkv(axes):
        return jax.lax.slice_in_dim(value, 0, None, r, i)
    shape = value.shape
    g = shape[i + 1] - 2
    v = value.reshape(shape[:i] + (shape[i] // r, r) + shape[i + 1 :])  # (.., kv, r, g + 2, ..)
    q = jax.lax.slice_in_dim(v, 0, g, axis=i + 2).reshape(shape[:i] + (shape[i] // r, r * g) + shape[i + 2 :])
    k_v = jax.lax.slice_in_dim(jax.lax.index_in_dim(v, 0, i + 1, keepdims=False), g, g + 2, axis=i + 1)
    return jnp.concatenate([q, k_v], axis=i + 1)


def _repeat_kv(value: jax.Array, axes: tuple, r: int) -> jax.Array:
    """Inverse of _unrepeat_kv: each KV head r times (a fused q/k/v weight's query heads dealt out
    G / r to each copy)."""
    i = axes.index("kv_heads")
    if not _is_fused_qkv(axes):
        return jnp.repeat(value, r, axis=i)
    shape = value.shape
    kv, g = shape[i], (shape[i + 1] - 2) // r
    q = jax.lax.slice_in_dim(value, 0, g * r, axis=i + 1).reshape(shape[:i] + (kv, r, g) + shape[i + 2 :])
    k_v = jnp.repeat(jnp.expand_dims(jax.lax.slice_in_dim(value, g * r, g * r + 2, axis=i + 1), i + 1), r, axis=i + 1)
    return jnp.concatenate([q, k_v], axis=i + 2).reshape(shape[:i] + (kv * r, g + 2) + shape[i + 2 :])


def _kv_repeat(module: Any) -> int:
    return module.kv_heads // module.cfg.num_kv_heads


def restore(path: str | pathlib.Path, abstract_state: Any, layout: Any, layer_slots: tuple[int, ...], kv_repeat: int = 1) -> None:
    """Fill `abstract_state` (an nnx.State of ShapeDtypeStructs for the target layout) in place."""
    path = pathlib.Path(path).absolute()
    flat = _flat(abstract_state)
    num_layers = len(layer_slots)
    target = {}
    for name, var in flat.items():
        v = var.get_value()
        shape = (num_layers,) + v.shape[1:] if _is_stacked(var) else v.shape
        axes = var.get_metadata()["logical_axes"]
        if kv_repeat > 1 and "kv_heads" in axes:  # saved with each KV head once (see save)
            unrepeat = functools.partial(_unrepeat_kv, axes=axes, r=kv_repeat)
            shape = jax.eval_shape(unrepeat, jax.ShapeDtypeStruct(shape, v.dtype)).shape
        target[name] = jax.ShapeDtypeStruct(shape, v.dtype, sharding=layout.sharding(axes, shape))
    before = _file_bytes_read()
    try:
        with boot.clock.phase("read"):
            restored = _orbax().StandardCheckpointer().restore(path / "params", target)
    except Exception as e:  # orbax raises a variety of types for structure/shape mismatches
        raise ValueError(f"cannot restore {path}: it does not match this model config ({e})") from None
    jax.block_until_ready(restored)
    reads.add(
        bytes_read=_file_bytes_read() - before, tensors_read=sum(bool(a.addressable_shards) for a in restored.values()),
        needed_bytes=sum(_local_bytes(a) for a in restored.values()),
    )
    with boot.clock.phase("place"):  # orbax reads straight onto the devices; here the pipeline slots
        slots = jnp.asarray(layer_slots)
        for name, var in flat.items():
            v = var.get_value()
            sharding = layout.sharding(var.get_metadata()["logical_axes"], v.shape)
            value = restored[name]
            axes = var.get_metadata()["logical_axes"]
            if kv_repeat > 1 and "kv_heads" in axes:
                value = _repeat_kv(value, axes, kv_repeat)
            if _is_stacked(var):
                value = jax.jit(
                    lambda c, shape=v.shape: jnp.zeros(shape, c.dtype).at[slots].set(c), out_shardings=sharding
                )(value)
            var.set_value(value)


def _file_bytes_read() -> int:
    """Bytes tensorstore (orbax's reader) has read from files in this process so far."""
    import tensorstore as ts

    metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
    return sum(v.get("value", 0) for m in metrics for v in m["values"])


def _local_bytes(a: jax.Array) -> int:
    """Bytes of the distinct blocks of `a` this process holds."""
    blocks = {tuple((s.start, s.stop) for s in shard.index): shard.data.nbytes for shard in a.addressable_shards}
    return sum(blocks.values())


def split_layers(stacked: dict[tuple[str, ...], Any], per_layer: dict[tuple[str, ...], nnx.Variable], layout: Any) -> dict:
    """Values for a per-layer (layer_list) model's variables from its stacked form's arrays (a
    restored checkpoint): ("layers", "3", "wo") <- stacked[("layers", "wo")][3]."""
    out = {}
    for path, var in per_layer.items():
        stacked_path, i = hf.layer_list_key(path) or (path, None)
        source = stacked[stacked_path]
        sharding = layout.sharding(var.get_metadata()["logical_axes"], var.get_value().shape)
        out[path] = source if i is None else jax.jit(lambda a, i=i: a[i], out_shardings=sharding)(source)
    return out
