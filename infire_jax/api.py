"""The public surface: `load(model_dir)` -> Model with `logits`, `generate` and text helpers."""

from __future__ import annotations

import inspect
import pathlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infire_jax import mesh as mesh_lib
from infire_jax.checkpoint import compressed, hf, store
from infire_jax.config import ModelConfig, load_config
from infire_jax.engine import generation
from infire_jax.engine.disagg import DecodeWorker, Engine, PrefillWorker, Request
from infire_jax.engine.disagg import generate as run_engine
from infire_jax.engine.programs import PlacedModel, Programs
from infire_jax.engine.sampling import SamplingParams, per_request
from infire_jax.models import FAMILIES
from infire_jax.sharding import DEFAULT_RULES, Layout, load_deployment, stage_slots, use_layout

__all__ = ["load", "Model", "place_model"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype(name: str) -> Any:
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _flat_abstract(module: nnx.Module) -> tuple[Any, dict, dict]:
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
    module_cls, tensor_map = FAMILIES[cfg.family]
    num_slots, slots = stage_slots(cfg.num_layers, layout.axis_size("layers"))
    layout_kwargs = dict(layer_slots=slots, num_slots=num_slots)
    accepts = inspect.signature(module_cls.__init__).parameters
    tp_ways = layout.axis_size("kv_heads")
    if "kv_repeat" in accepts and cfg.num_kv_heads < tp_ways and tp_ways % cfg.num_kv_heads == 0:
        layout_kwargs["kv_repeat"] = tp_ways // cfg.num_kv_heads  # each tp device holds one KV head
    # Without pipeline stages the layers are stored as a list of per-layer weights, run unrolled
    # (models/llama.py).
    layer_list = "layer_list" in accepts and layout.axis_size("layers") == 1
    saved = store.is_saved_model(model_dir)

    def build(layer_list: bool):
        form = {"layer_list": True} if layer_list else {}
        with use_layout(layout):  # families whose stacks depend on the pipeline depth read it here
            abstract = nnx.eval_shape(
                lambda: module_cls(cfg, **layout_kwargs, **form, param_dtype=_dtype(dtype), compute_dtype=_dtype(compute_dtype))
            )
            map_kwargs = {"kv_repeat": layout_kwargs["kv_repeat"]} if "kv_repeat" in layout_kwargs else {}
            tmap = tensor_map(cfg, slots, **map_kwargs, **form)
        return abstract, tmap

    abstract, tmap = build(layer_list and not saved)
    graphdef, state, flat = _flat_abstract(abstract)
    if saved:  # the saved form is stacked: restore it, then split into per-layer weights if wanted
        store.restore(model_dir, state, layout, slots, layout_kwargs.get("kv_repeat", 1))
        if not layer_list:
            return PlacedModel(graphdef, state, layout)
        stacked = {p: v.get_value() for p, v in flat.items()}
        graphdef, state, flat = _flat_abstract(build(True)[0])
        arrays = store.split_layers(stacked, flat, layout)
    else:
        specs = {p: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype) for p, v in flat.items()}
        shardings = {p: layout.sharding(v.get_metadata()["logical_axes"], specs[p].shape) for p, v in flat.items()}
        ignore = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
        if compressed.is_compressed_checkpoint(model_dir):  # layer matrices stay compressed on the device
            arrays = compressed.load_into(
                model_dir, flat, layout, tmap, ignore=ignore, ignore_layers_from=cfg.num_layers,
                prefix=cfg.weight_prefix, skip_prefixes=cfg.skip_weight_prefixes,
            )
        else:
            # Layers past num_layers (e.g. DeepSeek-V3's multi-token-prediction layer) are not served.
            arrays = hf.load_into(
                model_dir, specs, shardings, tmap, ignore=ignore, ignore_layers_from=cfg.num_layers,
                prefix=cfg.weight_prefix, skip_prefixes=cfg.skip_weight_prefixes,
            )
    for p, var in flat.items():
        var.set_value(arrays[p])
    return PlacedModel(graphdef, state, layout)


def _layout(mesh_spec: str, rules: Mapping[str, Any] | None, kernels: str = "auto") -> Layout:
    return Layout(mesh_lib.make_mesh(mesh_spec), dict(rules or DEFAULT_RULES), kernels)


class Model:
    """A loaded model: colocated (one placement serves prefill and decode) or disaggregated (prefill
    and decode on distinct meshes, each with its own copy of the weights in its own layout)."""

    def __init__(
        self,
        placed: PlacedModel,
        model_dir: pathlib.Path | None = None,
        *,
        decode_placed: PlacedModel | None = None,
        decode_steps: int = 8,
        kv_pages: int = 512,
        page_size: int = 16,
        max_decode_batch: int = 16,
    ):
        self.placed = placed
        self.cfg: ModelConfig = placed.cfg
        self.model_dir = model_dir
        self.programs = Programs(placed, decode_steps=decode_steps)
        self.decode_programs = Programs(decode_placed, decode_steps=decode_steps) if decode_placed else self.programs
        self._engine_args = dict(num_pages=kv_pages, page_size=page_size, max_batch=max_decode_batch)
        self._engine: Engine | None = None
        self._tokenizer = None

    @property
    def disaggregated(self) -> bool:
        return self.decode_programs is not self.programs

    @property
    def engine(self) -> Engine:
        """The serving engine behind `generate` (one prefill and one decode worker), made on first use.
        The prefill worker may batch as many rows as the decode batch holds (its token budget still
        applies): with fewer, a full decode batch arrives in groups and runs its first and last
        dispatches part-empty (16 prompts: 5 decode dispatches for 32 tokens instead of 4)."""
        if self._engine is None:
            self._engine = Engine(
                [PrefillWorker("prefill", self.programs, max_batch=self._engine_args["max_batch"])],
                [DecodeWorker("decode", self.decode_programs, **self._engine_args)],
            )
        return self._engine

    @property
    def context_length(self) -> int:
        return self.cfg.max_position_embeddings

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """Full-sequence logits, float32 (B, T, vocab), for int32 tokens (B, T) with no padding."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] == 0:
            raise generation.RequestError(f"tokens must be a non-empty (batch, length) array, got shape {tokens.shape}")
        for row in tokens:
            generation.validate_prompt(row, self.cfg.vocab_size, self.context_length, 0)
        return self.programs.logits(tokens.astype(np.int32))

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_token_ids: Sequence[int] = (),
    ) -> list[list[int]]:
        """New tokens for each prompt. Request i draws with seed `seed + i`; a row ends after
        max_new_tokens or after emitting one of stop_token_ids (kept in the output)."""
        if isinstance(prompts, np.ndarray) and prompts.ndim == 1 or (prompts and isinstance(prompts[0], (int, np.integer))):
            raise generation.RequestError("prompts must be a list of token-id lists (one per request), not one flat list")
        params = per_request(len(prompts), max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids)
        arrays = [
            generation.validate_prompt(p, self.cfg.vocab_size, self.context_length, max_new_tokens) for p in prompts
        ]
        return [r.output for r in self.run_requests(arrays, params)]

    def run_requests(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], with_logits: bool = False
    ) -> list[Request]:
        """Run requests with per-request sampling params through the engine; raises the first error."""
        reqs = run_engine(self.engine, prompts, params, with_logits)
        for r in reqs:
            if r.status == "failed":
                raise generation.RequestError(f"request {r.id} failed: {r.error}")
        return reqs

    def save(self, path: str | pathlib.Path) -> pathlib.Path:
        """Save the loaded parameters with orbax (restorable by `load(path)` on any mesh)."""
        return store.save(self.placed, path, self.model_dir)

    # ---- text helpers ----------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The `tokenizers.Tokenizer` of the checkpoint (tokenizer.json)."""
        if self._tokenizer is None:
            path = (self.model_dir or pathlib.Path(".")) / "tokenizer.json"
            if not path.is_file():
                raise FileNotFoundError(f"no tokenizer.json in {self.model_dir}; pass token ids instead of text")
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(path))
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        bos = self.cfg.bos_token_id
        return ([bos] if bos is not None else []) + ids

    def generate_text(self, prompts: Sequence[str], *, max_new_tokens: int, **sampling: Any) -> list[str]:
        """Text in, text out; stops at the model's EOS tokens unless stop_token_ids is given."""
        sampling.setdefault("stop_token_ids", self.cfg.eos_token_ids)
        outs = self.generate([self.encode(p) for p in prompts], max_new_tokens=max_new_tokens, **sampling)
        stop = set(sampling["stop_token_ids"])
        return [self.tokenizer.decode([t for t in o if t not in stop]) for o in outs]


def load(
    model_dir: str | pathlib.Path,
    *,
    mesh: str = "tp=1",
    dtype: str = "float32",
    compute_dtype: str = "float32",
    rules: Mapping[str, Any] | None = None,
    deployment: str | None = None,
    prefill_mesh: str | None = None,
    decode_mesh: str | None = None,
    decode_steps: int = 8,
    kv_pages: int = 512,
    page_size: int = 16,
    max_decode_batch: int = 16,
    kernels: str = "auto",
) -> Model:
    """Load an HF checkpoint directory onto a mesh ("tp=2", "pp=2,tp=2@0-3", ...).

    dtype is the storage dtype of the weights, compute_dtype the dtype of activations; rules maps
    logical axes to mesh axes (default: sharding.DEFAULT_RULES); deployment names a JSON file in
    configs/deployments/ (or a path) that gives both mesh and rules. With prefill_mesh and
    decode_mesh (e.g. "pp=2,tp=2@0-3" and "tp=4@4-7") prefill and decode run on distinct meshes,
    each with its own copy of the weights. kv_pages x page_size is the decode worker's KV capacity
    in tokens; max_decode_batch bounds its continuous batch. kernels="auto" lets decode and prefill on
    one CPU device (float32 compute; float32, bf16 or compressed weights) use infire_jax's own kernels
    (kernels/cpu.py: few-row projections, paged decode attention, causal prefill attention, bf16
    embedding rows); "xla" keeps XLA's code everywhere."""
    model_dir = pathlib.Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    _dtype(dtype), _dtype(compute_dtype)
    if deployment is not None:
        mesh, rules = load_deployment(deployment)
    if (prefill_mesh is None) != (decode_mesh is None):
        raise ValueError("give both prefill_mesh and decode_mesh (disaggregated) or neither (colocated)")
    kwargs = dict(dtype=dtype, compute_dtype=compute_dtype)
    engine = dict(decode_steps=decode_steps, kv_pages=kv_pages, page_size=page_size, max_decode_batch=max_decode_batch)
    if prefill_mesh is None:
        return Model(place_model(model_dir, _layout(mesh, rules, kernels), **kwargs), model_dir, **engine)
    p_layout, d_layout = _layout(prefill_mesh, rules, kernels), _layout(decode_mesh, rules, kernels)
    shared = {d.id for d in p_layout.mesh.devices.flat} & {d.id for d in d_layout.mesh.devices.flat}
    if shared:
        raise ValueError(
            f"prefill mesh {prefill_mesh!r} and decode mesh {decode_mesh!r} share devices {sorted(shared)}; "
            "give them disjoint device ranges (e.g. '@0-3' and '@4-7')"
        )
    cfg = load_config(model_dir)
    prefill = place_model(model_dir, p_layout, cfg=cfg, **kwargs)
    decode = place_model(model_dir, d_layout, cfg=cfg, **kwargs)
    return Model(prefill, model_dir, decode_placed=decode, **engine)
