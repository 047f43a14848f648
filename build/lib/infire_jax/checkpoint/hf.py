"""Hugging Face safetensors -> sharded parameters, one tensor (and one device shard) at a time.

Each parameter is built with `jax.make_array_from_callback`: for every device shard the callback
reads just the HF tensors that land in it from the memory-mapped files, so the whole model never
sits in one host buffer. Before anything is read, the checkpoint's tensor names and shapes are
checked against what the model expects, and every problem is reported in one error.
"""

from __future__ import annotations

import collections
import json
import pathlib
import re
from typing import Any, Callable, Iterable

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

from infire_jax import boot

__all__ = ["CheckpointError", "list_tensors", "load_into"]

# Tensors some exporters write that carry no parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """Checkpoint files that do not match the model (missing, extra or mis-shaped tensors)."""


def _files(model_dir: pathlib.Path) -> list[pathlib.Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {model_dir}")
    return files


def list_tensors(model_dir: str | pathlib.Path) -> dict[str, tuple[pathlib.Path, tuple[int, ...], str]]:
    """name -> (file, shape, dtype) from the safetensors headers (no tensor data is read)."""
    out = {}
    for path in _files(pathlib.Path(model_dir)):
        try:
            with safe_open(path, framework="numpy") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    out[name] = (path, tuple(sl.get_shape()), sl.get_dtype())
        except Exception as e:  # safetensors raises its own error types for torn files
            raise CheckpointError(f"cannot read {path}: {e}") from None
    return out


def layer_list_key(path: tuple[str, ...]) -> tuple[tuple[str, ...], int] | None:
    """(("layers", "wo"), 3) for the path ("layers", "3", "wo") of a per-layer weight (the models'
    layer-list form, models/llama.py: per_layer_tensor_map writes such paths); None for the rest."""
    if len(path) >= 3 and path[0] == "layers" and path[1].isdigit():
        return (path[0],) + tuple(path[2:]), int(path[1])
    return None


def _layer_index(name: str, prefix: str = "") -> int | None:
    m = re.match(re.escape(prefix) + r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def check_tensors(
    present: dict[str, tuple[pathlib.Path, tuple[int, ...], str]],
    expected: dict[str, tuple[int, ...]],
    ignore: Iterable[str] = (),
    ignore_layers_from: int | None = None,
    prefix: str = "",
    skip_prefixes: Iterable[str] = (),
) -> None:
    """One error that lists every missing, unexpected and mis-shaped tensor (tensors of layers at or
    past `ignore_layers_from` are not served and not reported). `expected` names are full checkpoint
    names; `prefix` is where the text model's tensors sit (for the layer numbers) and tensors under
    `skip_prefixes` (a multimodal checkpoint's vision tower) are not served and not reported."""
    ignore, skip = set(ignore), tuple(skip_prefixes)

    def ignored(n: str) -> bool:
        layer = _layer_index(n, prefix)
        beyond = ignore_layers_from is not None and layer is not None and layer >= ignore_layers_from
        return n in ignore or n.endswith(_IGNORED_SUFFIXES) or beyond or (bool(skip) and n.startswith(skip))

    missing = sorted(set(expected) - set(present))
    extra = sorted(n for n in set(present) - set(expected) if not ignored(n))
    shapes = sorted(
        f"{n}: checkpoint {present[n][1]}, model expects {expected[n]}"
        for n in set(expected) & set(present)
        if present[n][1] != tuple(expected[n])
    )
    if missing or extra or shapes:
        parts = []
        for title, items in (("missing tensors", missing), ("unexpected tensors", extra), ("wrong shapes", shapes)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                parts.append(f"{title} ({len(items)}):\n  " + "\n  ".join(shown))
        raise CheckpointError("checkpoint does not match the model config:\n" + "\n".join(parts))


class _Reader:
    """Open safetensors handles, kept for the duration of one load."""

    def __init__(self, present: dict[str, tuple[pathlib.Path, tuple[int, ...], str]]):
        self._present = present
        self._handles: dict[pathlib.Path, Any] = {}

    def read(self, name: str, dtype: np.dtype) -> np.ndarray:
        path = self._present[name][0]
        with boot.clock.phase("read"):
            if path not in self._handles:
                self._handles[path] = safe_open(path, framework="numpy").__enter__()
            a = self._handles[path].get_tensor(name)
        with boot.clock.phase("convert"):
            return _convert(a, dtype)

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()


def _convert(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if a.dtype == dtype:
        return a
    if dtype == ml_dtypes.bfloat16 or a.dtype == ml_dtypes.bfloat16:  # through float32 (exact from bf16)
        return a.astype(np.float32, copy=False).astype(dtype, copy=False)  # one copy, not two
    return a.astype(dtype)


def load_into(
    model_dir: str | pathlib.Path,
    abstract: dict[tuple[str, ...], jax.ShapeDtypeStruct],
    shardings: dict[tuple[str, ...], jax.sharding.Sharding],
    tensor_map: dict[str, tuple],
    ignore: Iterable[str] = (),
    on_tensor: Callable[[str], None] | None = None,
    ignore_layers_from: int | None = None,
    prefix: str = "",
    skip_prefixes: Iterable[str] = (),
) -> dict[tuple[str, ...], jax.Array]:
    """Build every parameter in `abstract` (path -> shape/dtype) from the HF tensors of `tensor_map`.

    tensor_map: HF name -> (parameter path, leading index into the parameter (ints and slices, e.g.
    (slot, slice(None), slice(0, 3)) for the query rows of a fused QKV weight), HF shape[, transform
    applied to the HF array before the reshape]). Parts of a parameter no tensor maps to (pipeline
    padding slots) are zeros. A multimodal checkpoint (config.NESTED) stores the text model's tensors
    under `prefix` (tensor_map and ignore names are given without it) and tensors under
    `skip_prefixes` are not read."""
    present = list_tensors(model_dir)
    tensor_map = {prefix + n: entry for n, entry in tensor_map.items()}
    ignore = [prefix + n for n in ignore]
    expected = {n: entry[2] for n, entry in tensor_map.items()}
    check_tensors(present, expected, ignore, ignore_layers_from, prefix, skip_prefixes)
    sources: dict[tuple[str, ...], list[tuple[str, tuple[int, ...], Callable | None]]] = collections.defaultdict(list)
    for name, (path, index, _, *transform) in tensor_map.items():
        if path not in abstract:
            raise KeyError(f"tensor map names parameter {path} that the model does not have")
        sources[path].append((name, index, transform[0] if transform else None))
    reader = _Reader(present)
    out = {}
    try:
        for path, spec in abstract.items():
            dtype = np.dtype(spec.dtype)

            def shard(idx: tuple[slice, ...], path=path, spec=spec, dtype=dtype) -> np.ndarray:
                idx = tuple(idx) + (slice(None),) * (len(spec.shape) - len(idx))
                ranges = [range(*s.indices(n)) for s, n in zip(idx, spec.shape)]
                buf = np.zeros([len(r) for r in ranges], dtype)
                for name, lead, transform in sources[path]:
                    k = len(lead)
                    # per leading axis: the positions this tensor fills, those this shard holds
                    fills = [range(*i.indices(n)) if isinstance(i, slice) else range(i, i + 1) for i, n in zip(lead, spec.shape)]
                    common = [range(max(f.start, r.start), min(f.stop, r.stop)) for f, r in zip(fills, ranges)]
                    if not all(common):
                        continue
                    part = reader.read(name, dtype)
                    part = (transform(part) if transform else part).reshape([len(f) for f in fills] + list(spec.shape[k:]))
                    part = part[tuple(slice(c.start - f.start, c.stop - f.start) for c, f in zip(common, fills)) + idx[k:]]
                    buf[tuple(slice(c.start - r.start, c.stop - r.start) for c, r in zip(common, ranges))] = part
                return buf

            with boot.clock.phase("place"):  # reading and converting inside are counted as such
                out[path] = jax.make_array_from_callback(spec.shape, shardings[path], shard)
            if on_tensor:
                on_tensor("/".join(path))
    finally:
        reader.close()
    return out
