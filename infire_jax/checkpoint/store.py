"""orbax save/restore of a loaded model, independent of the layout it was loaded with.

The saved form is canonical: stacked layer parameters hold exactly the real layers (no pipeline
padding slots), so a model saved from pp=2 restores onto tp=4 or pp=3. Restoring reads each array
straight onto the target mesh, then places layers into the target's pipeline slots on device.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

__all__ = ["MARKER", "is_saved_model", "save", "restore"]

MARKER = "infire_jax_checkpoint.json"
_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def is_saved_model(path: str | pathlib.Path) -> bool:
    return (pathlib.Path(path) / MARKER).is_file()


def _is_stacked(var: nnx.Variable) -> bool:
    axes = var.get_metadata().get("logical_axes") or ()
    return bool(axes) and axes[0] == "layers"


def _flat(state: Any) -> dict[str, nnx.Variable]:
    return {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def save(placed: Any, path: str | pathlib.Path, source_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """Write the model's parameters (canonical layer order) and its config/tokenizer files."""
    path = pathlib.Path(path).absolute()
    if hasattr(placed.module, "stack_index"):
        raise NotImplementedError(
            f"Model.save supports the dense families; {placed.cfg.architecture} keeps per-kind layer stacks "
            "(dense/MoE) that the canonical saved form does not describe yet — keep the HF checkpoint instead"
        )
    if path.exists():
        raise FileExistsError(f"{path} exists; choose a new directory for the saved model")
    slots = np.asarray(placed.module.layer_slots)
    repeat = _kv_repeat(placed.module)
    tree = {}
    for name, var in _flat(placed.state).items():
        value = var.get_value()
        if hasattr(value, "decode_f32"):
            raise ValueError(
                "Model.save does not write compressed weights; the compressed checkpoint directory the "
                "model was loaded from is already its saved form (or load the original and save that)"
            )
        value = value[slots] if _is_stacked(var) else value
        axes = var.get_metadata()["logical_axes"]
        if repeat > 1 and "kv_heads" in axes:  # canonical form: each KV head once
            value = jax.lax.slice_in_dim(value, 0, None, repeat, axes.index("kv_heads"))
        tree[name] = value
    path.mkdir(parents=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path / "params", tree)
    ckpt.wait_until_finished()
    for name in _COPIED:
        if source_dir and (pathlib.Path(source_dir) / name).is_file():
            shutil.copy(pathlib.Path(source_dir) / name, path / name)
    dtypes = sorted({str(v.dtype) for v in tree.values()})
    (path / MARKER).write_text(json.dumps({"format": "orbax-canonical-v1", "dtypes": dtypes}, indent=1))
    return path


def _kv_repeat(module: Any) -> int:
    return getattr(module, "kv_heads", module.cfg.num_kv_heads) // module.cfg.num_kv_heads


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
        if kv_repeat > 1 and "kv_heads" in axes:
            i = axes.index("kv_heads")
            shape = shape[:i] + (shape[i] // kv_repeat,) + shape[i + 1 :]
        target[name] = jax.ShapeDtypeStruct(shape, v.dtype, sharding=layout.sharding(axes, shape))
    try:
        restored = ocp.StandardCheckpointer().restore(path / "params", target)
    except Exception as e:  # orbax raises a variety of types for structure/shape mismatches
        raise ValueError(f"cannot restore {path}: it does not match this model config ({e})") from None
    slots = jnp.asarray(layer_slots)
    for name, var in flat.items():
        v = var.get_value()
        sharding = layout.sharding(var.get_metadata()["logical_axes"], v.shape)
        value = restored[name]
        axes = var.get_metadata()["logical_axes"]
        if kv_repeat > 1 and "kv_heads" in axes:
            value = jnp.repeat(value, kv_repeat, axis=axes.index("kv_heads"))
        if _is_stacked(var):
            value = jax.jit(
                lambda c, shape=v.shape: jnp.zeros(shape, c.dtype).at[slots].set(c), out_shardings=sharding
            )(value)
        var.set_value(value)
