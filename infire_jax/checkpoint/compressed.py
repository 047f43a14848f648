"""Compressed checkpoints: the distribution format on disk, the runtime format on the device.

Directory layout written by :func:`compress_checkpoint` (experiments/compress_checkpoint.py)::

    manifest.json          format tag, per-tensor entry and whole-model totals (below)
    weights-00001.ijxc     container(s): 8-byte magic b"IJXCONT1", then one blob per tensor, each
    ...                    64-byte aligned; a blob is compression.to_bytes(encode(t, "huffman"))
    config.json, generation_config.json, tokenizer*.json, ...   copied from the source

Every tensor is stored as bf16 (an fp32/fp16 source is rounded to bf16 first, round-to-nearest-even
as ``astype`` does, and its manifest entry says ``source_dtype``), encoded with the Huffman
distribution format, or raw where that does not pay. Manifest entry per tensor: file, offset,
nbytes (the blob: payload + a ~0.3 KB self-describing header, which dominates for tiny tensors such
as norms), payload_bytes, crc32 (of the blob), kind, shape, dtype, source_dtype, bf16_bytes, ratio
(nbytes / bf16_bytes) and the runtime (palette12) bytes and ratio; ``totals`` holds whole-model
ratios (all tensors, and the matrices alone).

:func:`load_into` (reached through ``infire_jax.load(dir)``) first checks every container's size
against the manifest (a truncated file fails before anything is decoded, naming the first tensor
cut off), then reads each tensor, verifies its CRC32 (a flipped byte fails naming the tensor), and
places the model's parameters:

* stacked layer matrices (logical axes start with "layers", rank >= 3: wqkv, wo, w_gate_up,
  w_down) become :class:`~infire_jax.compression.jax_decode.Palette12Weight` values in codec's
  blocked palette12 layout (12 bits per weight): a palette per layer slot; each layer slice stored
  in its natural (out..., in...) order (the decoded array is the (N, K) operand of layers.dense's
  2-D dot as is, no transposing copy) and cut into the blocks the layout's sharding gives
  each device, every block packed on its own with its own escape list. Leaves: packed_idx /
  sign_mant sharded exactly as the bf16 weight would be (layers on pp, heads / kv_heads / mlp on
  tp, in stored axis order), palette (L, 16) on pp, escapes (L, G, E) on (pp, the weight's tp
  axes). Every leaf has the leading layers axis, so pipeline.stage_specs (one P("pp") per
  Variable, a pytree prefix of its leaves) and the lax.scan over layers work unchanged, and inside
  the step each device decodes only its own shard (a shard_map over the weight's mesh axes, see
  Palette12Weight.decode_f32): no weight collectives, and tp peers hold 1/tp of the compressed
  weight, as with bf16. A matrix for which this would not be smaller than bf16 stays raw.
  Routed experts (logical axes start with "layers", "experts") are stacked over both axes: a
  palette and escape list per (layer, expert), leaves (L, X, ...), palette (L, X, 16), escapes
  (L, X, G, E) on (pp, ep, the weight's tp axes). The expert dispatch (models/moe.py) indexes a
  layer, then an expert, and decodes only the experts a step routes to, inside its shard_map over
  ep / tp, each device its own block.
* everything else (embeddings, LM head, norms, biases) is placed raw in the model's param dtype,
  exactly like the safetensors loader does (bf16 -> f32 is exact).

In a multi-process run (infire_jax.distributed) a process reads only the tensors its own devices'
shards hold (a tensor's Huffman blob is read whole: a tp-split matrix is read by each of its
processes; another pipeline stage's layers are not read at all) and places only its own shards.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import os
import pathlib
import shutil
import zlib
from typing import Any, Callable, Iterable

import jax
import ml_dtypes
import numpy as np

from infire_jax import boot
from infire_jax.compression import codec
from infire_jax.checkpoint import hf, reads

__all__ = [
    "FORMAT",
    "MANIFEST",
    "CompressedCheckpointError",
    "compress_checkpoint",
    "is_compressed_checkpoint",
    "read_manifest",
    "read_tensor",
    "load_into",
]

FORMAT = "infire_jax-compressed-v1"
MANIFEST = "manifest.json"
CONTAINER_MAGIC = b"IJXCONT1"
_ALIGN = 64
_COPIED = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model",
)
_BF16 = np.dtype(ml_dtypes.bfloat16)
_FLOAT_SOURCES = {"BF16": "bfloat16", "F32": "float32", "F16": "float16", "F64": "float64"}


class CompressedCheckpointError(ValueError):
    """A compressed checkpoint that cannot be read: corrupt or truncated data, bad manifest."""


# ------------------------------------------------------------------------------------- writing


def compress_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    container_max_bytes: int = 2 << 30,
    runtime_ratio: bool = True,
    on_tensor: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Compress the HF safetensors checkpoint in ``src`` into a new directory ``dst``.

    Reads one tensor at a time (converted to bf16 if stored wider), encodes it with the Huffman
    distribution format (raw where that does not pay), appends it to the current container file
    (a new one starts past ``container_max_bytes``), and writes manifest.json last, so an
    interrupted run leaves no loadable directory. ``runtime_ratio`` also measures each tensor's
    palette12 (runtime format) ratio. Returns the manifest."""
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} has no config.json; expected a Hugging Face checkpoint directory")
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty; choose a new directory")
    present = hf.list_tensors(src)
    bad = {n: d for n, (_, _, d) in present.items() if d not in _FLOAT_SOURCES}
    if bad:
        raise hf.CheckpointError(f"only floating-point tensors can be compressed; got {bad}")
    dst.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, dict[str, Any]] = {}
    containers: dict[str, int] = {}
    out, out_name, pos = None, "", 0
    handles: dict[pathlib.Path, Any] = {}
    from safetensors import safe_open

    try:
        for name, (path, shape, st_dtype) in present.items():
            if path not in handles:
                handles[path] = safe_open(path, framework="numpy").__enter__()
            a = handles[path].get_tensor(name)
            x = a if a.dtype == _BF16 else a.astype(np.float32).astype(_BF16)
            c = codec.encode(x, "huffman")
            blob = codec.to_bytes(c)
            if out is None or (pos > len(CONTAINER_MAGIC) and pos + len(blob) > container_max_bytes):
                if out is not None:
                    out.close()
                    containers[out_name] = pos
                out_name = f"weights-{len(containers) + 1:05d}.ijxc"
                out = open(dst / out_name, "wb")
                out.write(CONTAINER_MAGIC)
                pos = len(CONTAINER_MAGIC)
            pad = -pos % _ALIGN
            out.write(b"\0" * pad + blob)
            pos += pad
            bf16_bytes = 2 * int(np.prod(shape, dtype=np.int64))
            entry = dict(
                file=out_name, offset=pos, nbytes=len(blob), payload_bytes=c.nbytes, crc32=zlib.crc32(blob),
                kind=c.kind, shape=list(shape), dtype="bfloat16", source_dtype=_FLOAT_SOURCES[st_dtype],
                bf16_bytes=bf16_bytes, ratio=round(len(blob) / bf16_bytes, 5) if bf16_bytes else 1.0,
            )
            if runtime_ratio:
                r = codec.transcode_to_palette12(c, allow_raw=False) if x.size else c
                entry["palette12_bytes"] = r.nbytes
                entry["palette12_ratio"] = round(r.nbytes / bf16_bytes, 5) if bf16_bytes else 1.0
            pos += len(blob)
            tensors[name] = entry
            if on_tensor:
                on_tensor(name, entry)
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
        if out is not None:
            out.close()
            containers[out_name] = pos

    copied = []
    for fname in _COPIED:
        if (src / fname).is_file():
            shutil.copy(src / fname, dst / fname)
            copied.append(fname)
    manifest = dict(
        format=FORMAT,
        codec="huffman",
        runtime_format="palette12",
        containers=containers,
        source=dict(
            path=str(src.absolute()),
            dtypes=sorted({e["source_dtype"] for e in tensors.values()}),
            converted_to_bf16=sorted({e["source_dtype"] for e in tensors.values()} - {"bfloat16"}) != [],
            copied_files=copied,
        ),
        totals=_totals(tensors),
        tensors=tensors,
    )
    tmp = dst / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, dst / MANIFEST)
    return manifest


def _totals(tensors: dict[str, dict[str, Any]]) -> dict[str, Any]:
    bf16 = sum(e["bf16_bytes"] for e in tensors.values())
    comp = sum(e["nbytes"] for e in tensors.values())
    kinds = collections.Counter(e["kind"] for e in tensors.values())
    out = dict(
        tensors=len(tensors), bf16_bytes=bf16, compressed_bytes=comp, ratio=round(comp / bf16, 5) if bf16 else 1.0,
        kinds=dict(kinds),
    )
    if tensors and all("palette12_bytes" in e for e in tensors.values()):
        p12 = sum(e["palette12_bytes"] for e in tensors.values())
        out |= dict(palette12_bytes=p12, palette12_ratio=round(p12 / bf16, 5) if bf16 else 1.0)
    matrices = [e for e in tensors.values() if len(e["shape"]) >= 2]
    if matrices:
        mb = sum(e["bf16_bytes"] for e in matrices)
        out["matrices_ratio"] = round(sum(e["nbytes"] for e in matrices) / mb, 5)
    return out


# ------------------------------------------------------------------------------------- reading


def is_compressed_checkpoint(path: str | os.PathLike) -> bool:
    """A directory with our manifest.json (or an unreadable manifest.json next to container files,
    so that load reports the broken manifest instead of missing safetensors)."""
    path = pathlib.Path(path)
    p = path / MANIFEST
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == FORMAT
    except (ValueError, UnicodeDecodeError, AttributeError):
        return any(path.glob("*.ijxc"))


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = pathlib.Path(path)
    try:
        m = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CompressedCheckpointError(f"cannot read {path / MANIFEST}: {e}") from None
    if m.get("format") != FORMAT:
        raise CompressedCheckpointError(
            f"{path / MANIFEST}: format {m.get('format')!r}, this reader knows {FORMAT!r}")
    for key in ("containers", "tensors"):
        if not isinstance(m.get(key), dict):
            raise CompressedCheckpointError(f"{path / MANIFEST}: missing {key!r}")
    return m


def check_containers(path: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Every container exists, starts with the magic and has exactly the manifest's size; else one
    error naming the file and the first tensor it cuts off (a truncated download or copy)."""
    path = pathlib.Path(path)
    for fname, size in manifest["containers"].items():
        f = path / fname
        if not f.is_file():
            raise CompressedCheckpointError(f"container {fname} named by the manifest is missing from {path}")
        actual = f.stat().st_size
        if actual < size:
            cut = sorted(
                (e["offset"], n) for n, e in manifest["tensors"].items()
                if e["file"] == fname and e["offset"] + e["nbytes"] > actual
            )
            raise CompressedCheckpointError(
                f"container {f} is truncated: {actual} of {size} bytes; tensor {cut[0][1]!r}"
                + (f" and {len(cut) - 1} more tensors" if len(cut) > 1 else "")
                + " lie past its end. Re-copy or re-create the checkpoint."
            )
        if actual != size:
            raise CompressedCheckpointError(f"container {f} has {actual} bytes, the manifest says {size}")
        with open(f, "rb") as fh:
            if fh.read(len(CONTAINER_MAGIC)) != CONTAINER_MAGIC:
                raise CompressedCheckpointError(f"container {f} does not start with {CONTAINER_MAGIC!r}")


def read_tensor(path: str | os.PathLike, name: str, entry: dict[str, Any]) -> codec.Compressed:
    """One tensor's Compressed form, checksum-verified; CompressedCheckpointError names the tensor."""
    f = pathlib.Path(path) / entry["file"]
    with open(f, "rb") as fh:
        fh.seek(entry["offset"])
        blob = fh.read(entry["nbytes"])
    if len(blob) != entry["nbytes"]:
        raise CompressedCheckpointError(
            f"tensor {name!r}: {f} is truncated "
            f"(read {len(blob)} of {entry['nbytes']} bytes at offset {entry['offset']})"
        )
    crc = zlib.crc32(blob)
    if crc != entry["crc32"]:
        raise CompressedCheckpointError(
            f"checksum mismatch in tensor {name!r} "
            f"({f}, bytes {entry['offset']}..{entry['offset'] + entry['nbytes']}): "
            f"CRC32 {crc:#010x}, manifest says {entry['crc32']:#010x}; the file is corrupt"
        )
    try:
        c = codec.from_bytes(blob)
    except ValueError as e:
        raise CompressedCheckpointError(f"tensor {name!r} in {f}: {e}") from None
    if list(c.shape) != list(entry["shape"]):
        raise CompressedCheckpointError(f"tensor {name!r}: payload shape {c.shape}, manifest says {entry['shape']}")
    return c


# ------------------------------------------------------------------------------------- placing


def is_compressible(var: Any, per_layer: bool = False) -> bool:
    """Layer matrices: stacked (leading logical axis "layers" and at least two more axes), or one
    layer's matrix (per_layer: a weight of the models' layer-list form, two axes or more)."""
    axes = var.get_metadata().get("logical_axes") or ()
    return len(axes) >= 2 if per_layer else len(axes) >= 3 and axes[0] == "layers"


def stack_depth(var: Any) -> int:
    """Leading axes a compressed weight is stacked over, each entry with its own palette and escapes:
    (layers, experts) for routed experts, so the expert dispatch indexes a layer, then an expert, and
    decodes only the experts a step routes to; (layers,) for the other layer matrices."""
    axes = var.get_metadata().get("logical_axes") or ()
    return 2 if tuple(axes[:2]) == ("layers", "experts") else 1


def stored_order(slice_axes: tuple) -> tuple[int, ...]:
    """Stored order of a compressed weight's slice axes (stored axis i = logical axis perm[i]): as
    the model holds them, output axes first, except routed experts held input-major (Llama 4's fused
    tensors: gate/up (embed, fused, expert_mlp), down (expert_mlp, embed)), stored output-major with
    their input axis (embed for gate/up, expert_mlp for down) last: the expert dispatch then reads
    them in stored order as the (N, K) operand of the few-row kernel or of XLA's 2-D dot."""
    axes = tuple(slice_axes)
    natural = tuple(range(len(axes)))
    if "experts" in axes or "expert_mlp" not in axes:  # not one expert's slice
        return natural
    source = axes.index("embed" if "fused" in axes else "expert_mlp")
    return tuple(i for i in natural if i != source) + (source,)


def _bits_to(bits: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """bf16 bit patterns -> dtype, exactly as the safetensors loader converts bf16."""
    if dtype == _BF16:
        return bits.view(_BF16)
    f32 = (bits.astype(np.uint32) << 16).view(np.float32)
    return f32 if dtype == np.float32 else f32.astype(dtype)


@functools.lru_cache(maxsize=4)
def _join_table(dtype: np.dtype) -> np.ndarray:
    """Value of every (exponent byte, sign+mantissa byte) pair, indexed by exp << 8 | sign_mant."""
    key = np.arange(1 << 16, dtype=np.uint16)
    with np.errstate(over="ignore", invalid="ignore"):  # every pattern, so float16 overflows some
        return _bits_to(codec.join_bits((key >> 8).astype(np.uint8), (key & 0xFF).astype(np.uint8)), dtype)


def _join_to(exp: np.ndarray, sm: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """_bits_to(codec.join_bits(exp, sm), dtype) with one lookup per weight in a 64K-entry table
    (a gather copies the table's bytes: the same values, NaN payloads included), ~3x faster."""
    key = exp.astype(np.uint16)
    key <<= 8
    key |= sm
    return _join_table(np.dtype(dtype))[key]


def load_into(
    model_dir: str | os.PathLike,
    variables: dict[tuple[str, ...], Any],
    layout: Any,
    tensor_map: dict[str, tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]],
    ignore: Iterable[str] = (),
    on_tensor: Callable[[str], None] | None = None,
    ignore_layers_from: int | None = None,
    prefix: str = "",
    skip_prefixes: Iterable[str] = (),
    host_ops: codec.HostOps | None = None,
) -> dict[tuple[str, ...], Any]:
    """Values for the abstract nnx Variables ``variables`` (path -> Variable) on ``layout``: a
    sharded jax.Array per raw parameter, a Palette12Weight per compressed stacked matrix.
    ``host_ops``: native decode helpers (kernels/cpu.py; numpy's code without them).

    tensor_map as for hf.load_into (HF name -> (parameter path, leading index, HF shape[, transform
    of the HF array])); parts of a parameter no tensor maps to (pipeline padding slots) are zeros.
    ignore_layers_from / prefix / skip_prefixes as for hf.load_into (multimodal wrappers, MTP layers)."""
    from infire_jax.compression import jax_decode

    model_dir = pathlib.Path(model_dir)
    manifest = read_manifest(model_dir)
    entries = manifest["tensors"]
    present = {n: (model_dir / e["file"], tuple(e["shape"]), e["dtype"]) for n, e in entries.items()}
    tensor_map = {prefix + n: entry for n, entry in tensor_map.items()}  # as for hf.load_into
    ignore = [prefix + n for n in ignore]
    hf.check_tensors(present, {n: entry[2] for n, entry in tensor_map.items()}, ignore, ignore_layers_from, prefix, skip_prefixes)
    check_containers(model_dir, manifest)
    sources: dict[tuple[str, ...], list[tuple[str, tuple[int, ...], Any]]] = collections.defaultdict(list)
    for name, (path, index, _, *transform) in tensor_map.items():
        if path not in variables:
            raise KeyError(f"tensor map names parameter {path} that the model does not have")
        sources[path].append((name, index, transform[0] if transform else None))

    mesh = layout.mesh
    out: dict[tuple[str, ...], Any] = {}
    for path, var in variables.items():
        spec_struct = var.get_value()
        shape, dtype = tuple(spec_struct.shape), np.dtype(spec_struct.dtype)
        axes = var.get_metadata()["logical_axes"]
        sharding = layout.sharding(axes, shape)
        local = _local_blocks(sharding, shape)  # this process's shards; only their tensors are read
        wspec = tuple(layout.spec(axes, shape))
        wspec = wspec + (None,) * (len(shape) - len(wspec))
        exp = np.zeros(shape, np.uint8)
        sm = np.zeros(shape, np.uint8)
        for name, lead, transform in sources[path]:
            region = _region(lead, shape)
            held = sum(_overlap(region, block) for block in local)
            if not held:  # no shard of this process holds any of it: not read
                continue
            entry = entries[name]
            reads.add(
                bytes_read=entry["nbytes"], tensors_read=1, whole_reads=int(held < _volume(region)),
                needed_bytes=entry["nbytes"] * held // max(1, _volume(region)),
            )
            with boot.clock.phase("read"):
                c = read_tensor(model_dir, name, entry)
            with boot.clock.phase("convert"):
                parts = codec.decode_parts(c, host_ops)
                if transform is not None:  # e.g. repeated KV heads; works on the uint8 split as on values
                    parts = tuple(transform(a) for a in parts)
                exp[lead] = parts[0].reshape(exp[lead].shape)  # lead: ints and slices, as for hf.load_into
                sm[lead] = parts[1].reshape(sm[lead].shape)
        value = None
        per_layer = hf.layer_list_key(path) is not None
        if is_compressible(var, per_layer):
            # (N..., K...) order: layers.dense runs projections as 2-D dots over (N, K), which XLA:CPU
            # reads in place (a contraction-first order measured 0.43x raw bf16 speed).
            depth = 0 if per_layer else stack_depth(var)
            perm = stored_order(axes[depth:])
            if per_layer:  # encoded as a stack of one, placed as its one slice
                value = _palette12_param(exp[None], sm[None], mesh, (None,) + wspec, perm, 1, jax_decode,
                                         {0} if local else set(), host_ops, stacked=False)
            else:  # the stack entries (flat over the stack axes) this process's shards hold
                held = {int(np.ravel_multi_index(i, shape[:depth])) for block in local
                        for i in itertools.product(*block[:depth])}
                value = _palette12_param(exp, sm, mesh, wspec, perm, depth, jax_decode, held, host_ops)
        if value is None:
            with boot.clock.phase("convert"):
                host = _join_to(exp, sm, dtype)
            with boot.clock.phase("place"):
                value = jax_decode.put_host_array(host, sharding)
        out[path] = value
        if on_tensor:
            on_tensor("/".join(path))
    return out


def _local_blocks(sharding: Any, shape: tuple[int, ...]) -> list[tuple[range, ...]]:
    """Index ranges of the distinct blocks this process's devices hold."""
    blocks = {
        tuple(range(*sl.indices(n)) for sl, n in zip(tuple(idx) + (slice(None),) * (len(shape) - len(idx)), shape))
        for idx in sharding.addressable_devices_indices_map(shape).values()
    }
    return sorted(blocks, key=lambda b: tuple((r.start, r.stop) for r in b))


def _region(lead: tuple, shape: tuple[int, ...]) -> tuple[range, ...]:
    """The index ranges a tensor fills in its parameter (lead: its ints and slices on leading axes)."""
    fills = tuple(range(*i.indices(n)) if isinstance(i, slice) else range(i, i + 1) for i, n in zip(lead, shape))
    return fills + tuple(range(n) for n in shape[len(lead):])


def _overlap(a: tuple[range, ...], b: tuple[range, ...]) -> int:
    return int(np.prod([max(0, min(x.stop, y.stop) - max(x.start, y.start)) for x, y in zip(a, b)], dtype=np.int64))


def _volume(region: tuple[range, ...]) -> int:
    return int(np.prod([len(r) for r in region], dtype=np.int64))


def _palette12_param(exp: np.ndarray, sm: np.ndarray, mesh: Any, wspec: tuple, perm: tuple[int, ...], depth: int,
                     jax_decode: Any, held: set[int], host_ops: codec.HostOps | None = None,
                     stacked: bool = True) -> Any:
    """The stacked blocked Palette12Weight of one parameter: one palette and escape list per entry
    of its ``depth`` leading stack axes (layers; layers x experts for routed experts), slice axes
    stored in ``perm`` order; or None if it would not be smaller than bf16. ``held``: the stack
    entries (flat, row-major over the stack axes) this process's shards hold (the others are not
    encoded: the processes that hold them place their blocks). In a multi-process run the processes
    agree on the choice, the palette kind and the escape width (distributed.exchange), so every
    process builds the same program. ``stacked=False``: a stack of one slice, placed as that slice
    (the leading axis dropped on the host, so no program runs per leaf)."""
    from infire_jax import distributed

    with boot.clock.phase("convert"):
        order = tuple(range(depth)) + tuple(depth + p for p in perm)
        exp, sm = np.ascontiguousarray(exp.transpose(order)), np.ascontiguousarray(sm.transpose(order))
        spec = tuple(wspec[i] for i in order)
        blocks = jax_decode.block_counts(mesh, spec[depth:])
        lead = exp.shape[:depth]
        exp, sm = exp.reshape((-1,) + exp.shape[depth:]), sm.reshape((-1,) + sm.shape[depth:])
        placeholder = None
        slices = []
        for i in range(exp.shape[0]):
            if i in held:
                slices.append(codec.encode_palette12_blocks(exp[i], sm[i], blocks, host_ops))
            else:
                placeholder = placeholder or codec.encode_palette12_blocks(
                    np.zeros_like(exp[i]), np.zeros_like(sm[i]), blocks, host_ops)
                slices.append(placeholder)
        mine = [slices[i] for i in sorted(held)]
        width = max((len(e) for s in mine for e in s["escape_idx"]), default=0)
        leaves = jax_decode.stack_palette12_blocks(slices, width)
        smaller = sum(a.nbytes for a in leaves.values()) < 2 * exp.size  # than bf16
        is_range = all(codec.palette_is_range(s["palette"][: s["n_palette"]]) for s in mine)
    if distributed.process_count() > 1:  # agree: compress only if it pays everywhere, the widest escapes
        votes = distributed.exchange(np.array([smaller or not held, is_range or not held, width], np.int64))
        smaller, is_range, wide = bool(votes[:, 0].all()), bool(votes[:, 1].all()), int(votes[:, 2].max())
        if wide != width:
            leaves = jax_decode.stack_palette12_blocks(slices, wide)
    if not smaller:
        return None
    leaves = {k: a.reshape(lead + a.shape[1:]) for k, a in leaves.items()}
    if not stacked:
        leaves, spec = {k: v[0] for k, v in leaves.items()}, spec[1:]
    with boot.clock.phase("place"):
        return jax_decode.place_stacked_palette12(leaves, mesh, spec, is_range, perm)
