"""Hugging Face safetensors -> sharded parameters, one tensor (and one device shard) at a time.

Each parameter is built with `jax.make_array_from_callback`: for every device shard the callback
reads just the byte ranges of the HF tensors that land in it from the memory-mapped files, so the
whole model never sits in one host buffer; in a multi-process run (infire_jax.distributed) every
process builds only its own devices' shards, so it reads only those bytes (counted by
checkpoint/reads.py). Before anything is read, the checkpoint's tensor names and shapes are
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
from infire_jax.checkpoint import reads

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
    """Open safetensors handles, kept for the duration of one load. Reads count into the current
    checkpoint.reads counter."""

    def __init__(self, present: dict[str, tuple[pathlib.Path, tuple[int, ...], str]]):
        self._present = present
        self._handles: dict[pathlib.Path, Any] = {}
        self._touched: set[str] = set()

    def _handle(self, name: str) -> Any:
        path = self._present[name][0]
        if path not in self._handles:
            with boot.clock.phase("read"):
                self._handles[path] = safe_open(path, framework="numpy").__enter__()
        if name not in self._touched:
            self._touched.add(name)
            reads.add(tensors_read=1)
        return self._handles[path]

    def read(self, name: str, dtype: np.dtype) -> np.ndarray:
        """The whole tensor."""
        handle = self._handle(name)
        with boot.clock.phase("read"):
            a = handle.get_tensor(name)
        reads.add(bytes_read=a.nbytes)
        with boot.clock.phase("convert"):
            return _convert(a, dtype)

    def read_box(self, name: str, view_shape: tuple[int, ...], box: tuple[range, ...], dtype: np.dtype) -> np.ndarray:
        """The `box` of the tensor seen as `view_shape` (a C-order reshape of it, e.g. q_proj
        (H*hd, D) seen as (KV, G, hd, D), o_proj (D, H*hd) as (D, H, hd)). Where each axis of the
        tensor is a run of view axes, only the span of each tensor axis that the box covers is
        read: a device shard of a weight split on any axis costs about its own bytes."""
        shape = self._present[name][1]
        groups = _axis_groups(shape, view_shape)
        if groups is None:  # another regrouping: read it whole
            reads.add(whole_reads=1)
            return self.read(name, dtype).reshape(view_shape)[tuple(slice(r.start, r.stop) for r in box)]
        spans = []
        for g in groups:
            dims = [view_shape[i] for i in g]
            first = int(np.ravel_multi_index([box[i].start for i in g], dims)) if g else 0
            last = int(np.ravel_multi_index([box[i].stop - 1 for i in g], dims)) if g else 0
            spans.append(slice(first, last + 1))
        handle = self._handle(name)
        with boot.clock.phase("read"):
            raw = np.ascontiguousarray(handle.get_slice(name)[tuple(spans)])
        reads.add(bytes_read=raw.nbytes)
        # view axis i of tensor axis j steps prod(view sizes after i within j's run) elements of axis j
        strides = [0] * len(view_shape)
        for j, g in enumerate(groups):
            for n, i in enumerate(g):
                strides[i] = int(np.prod([view_shape[m] for m in g[n + 1 :]], dtype=np.int64)) * raw.strides[j]
        part = np.lib.stride_tricks.as_strided(raw, shape=[len(r) for r in box], strides=strides, writeable=False)
        with boot.clock.phase("convert"):
            return _convert(part, dtype)

    def itemsize(self, name: str) -> int:
        return _ITEMSIZE.get(self._present[name][2], 4)

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _axis_groups(shape: tuple[int, ...], view_shape: tuple[int, ...]) -> list[list[int]] | None:
    """For each axis of `shape`, the run of view axes it is split into (size-1 view axes join a
    neighbouring run); None when the view regroups across tensor axes."""
    if not shape:
        return None
    groups: list[list[int]] = [[] for _ in shape]
    j, size = 0, 1
    for i, n in enumerate(view_shape):
        if j == len(shape):
            if n != 1:
                return None
            groups[-1].append(i)
            continue
        groups[j].append(i)
        size *= n
        if size == shape[j]:
            j, size = j + 1, 1
        elif size > shape[j] or shape[j] % size:
            return None
    return groups if j == len(shape) else None


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

            def shard(idx: tuple[slice, ...], path=path, spec=spec, dtype=dtype, done={}) -> np.ndarray:
                idx = tuple(idx) + (slice(None),) * (len(spec.shape) - len(idx))
                ranges = [range(*s.indices(n)) for s, n in zip(idx, spec.shape)]
                key = tuple((r.start, r.stop) for r in ranges)
                if key in done:  # another local device holds the same block (partly replicated)
                    return done[key]
                buf = np.zeros([len(r) for r in ranges], dtype)
                for name, lead, transform in sources[path]:
                    k = len(lead)
                    # per leading axis: the positions this tensor fills, those this shard holds
                    fills = [range(*i.indices(n)) if isinstance(i, slice) else range(i, i + 1) for i, n in zip(lead, spec.shape)]
                    common = [range(max(f.start, r.start), min(f.stop, r.stop)) for f, r in zip(fills, ranges)]
                    if not all(common):
                        continue
                    view = tuple(len(f) for f in fills) + tuple(spec.shape[k:])
                    box = tuple(range(c.start - f.start, c.stop - f.start) for c, f in zip(common, fills)) + tuple(ranges[k:])
                    if transform:  # e.g. repeated KV heads: the transform needs the whole tensor
                        reads.add(whole_reads=1)
                        part = transform(reader.read(name, dtype)).reshape(view)[tuple(slice(r.start, r.stop) for r in box)]
                    else:
                        part = reader.read_box(name, view, box, dtype)
                    reads.add(needed_bytes=part.size * reader.itemsize(name))
                    buf[tuple(slice(c.start - r.start, c.stop - r.start) for c, r in zip(common, ranges))] = part
                done[key] = buf
                return buf

            with boot.clock.phase("place"):  # reading and converting inside are counted as such
                out[path] = jax.make_array_from_callback(spec.shape, shardings[path], shard, dtype=dtype)
            if on_tensor:
                on_tensor("/".join(path))
    finally:
        reader.close()
    return out
