"""Capacity planner: what fits where, from the real model built abstractly.

For a model config and a deployment (hardware, device count, mesh, weight format) the planner builds
the registered family class (models.FAMILIES) with `nnx.eval_shape` for the deployment's Layout (an
AbstractMesh with the mesh's axis sizes and the rules table), exactly as api.place_model would build
it (same layer slots for pipeline stages, same kv_repeat rule), so no memory is allocated. Every
parameter's logical axes give its PartitionSpec (sharding.logical_spec, which replicates what the
mesh does not divide) and so the shape each device holds; per-device bytes follow.

KV cache per token, per device, from the model's own cache arrays (kv_shapes / kv_logical_axes) and
the same rules, per layer type:
  full      a global-attention layer caches K and V of every token;
  chunked   a chunked-attention layer (Llama 4 RoPE layers) needs at most attention_chunk_size
            tokens per sequence (the engine's ring of that many positions, kv/cache.py);
  mla       an MLA layer caches the latent (kv_lora_rank) and the rope key (qk_rope_head_dim) per
            token, shared by all heads (so it is replicated over tp).

Reserved memory per device (the formula; all terms are reported):
  runtime     hardware.runtime_reserve_bytes (CUDA context + NCCL/cuBLAS workspaces; 1 GiB on GPUs)
  headroom    hardware.headroom_fraction x device memory (allocator headroom; 3% on GPUs)
  activations max_step_tokens x act_bytes x (2*D + max(attention_elems, ffn_elems)) where, per token
              and per device (heads / mlp columns divided by the ways they are split):
                attention  GQA: 2*H*hd + 2*KV*hd  (q, attention output, new k and v)
                           MLA: H*(nope+rope) + q_lora + (kv_lora + rope) + H*(nope+v) + H*v
                           (prefill expands the chunk's per-head keys and values)
                ffn        dense: 3*F (gate, up, their product);
                           MoE:   k*(3*F_e + 2*D)  (the token's k dispatched copies in and out, and
                                  their expert activations) + 3*F_shared + E*4/act_bytes (fp32 router)
              max_step_tokens is the engine's token budget per forward: the prefill chunk (default
              4096) for colocated / prefill instances, the decode batch for decode instances.
  logits      max_decode_batch x (V/tp + V) x 4 bytes (fp32 logits shard + the rows gathered for
              top-k / top-p sampling)
KV left per device = device memory - weights - reserved; the maximum context is the longest single
sequence whose cache fits on every device (chunked layers capped), and `max_cache_tokens(L)` the
tokens that fit as sequences of length L.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from infire_jax.config import ConfigError, ModelConfig, configs_dir, from_hf_config
from infire_jax.plan.hardware import GiB, Hardware, HardwareError, get_hardware

__all__ = [
    "PlanError",
    "ConfigError",
    "HardwareError",
    "Deployment",
    "CapacityPlan",
    "ParamShard",
    "AbstractModel",
    "MODELS_DIR",
    "WEIGHT_FORMATS",
    "load_hf_config",
    "model_config",
    "build_abstract",
    "plan_capacity",
    "plan_best",
    "candidate_meshes",
    "param_kind",
    "BootCalibration",
    "boot_time",
]

MODELS_DIR = configs_dir() / "models"
WEIGHT_FORMATS = ("bf16", "fp32", "int4_experts", "compressed")
INT4_GROUP = 32
INT4_RATIO = (0.5 + 2.0 / INT4_GROUP) / 2.0  # int4 + one bf16 scale per 32 weights, over bf16: 0.28125
PALETTE12_RATIO = 0.7502  # measured whole-model palette12 / bf16 (WORKSPACE_NOTES, compression bench)
ROLES = ("colocated", "prefill", "decode")
DEFAULT_STEP_TOKENS = 4096
KV_DTYPES = {"bf16": 2, "bfloat16": 2, "fp8": 1, "float8": 1, "fp32": 4, "float32": 4}


class PlanError(ValueError):
    """A deployment the planner cannot describe (bad mesh / device count / option)."""


# ------------------------------------------------------------------------------------------------
# Model configs
# ------------------------------------------------------------------------------------------------


def load_hf_config(model: str | pathlib.Path | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(name, HF config dict) from a name in configs/models/, a config.json path, a model directory
    or a dict."""
    if isinstance(model, Mapping):
        return str(model.get("_name", "model")), dict(model)
    text = str(model)
    path = pathlib.Path(text)
    named = MODELS_DIR / f"{text}.json"
    if named.is_file() and not path.exists():
        path = named
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        known = sorted(p.stem for p in MODELS_DIR.glob("*.json"))
        raise ConfigError(f"no model {text!r}: give a config.json path, a model directory or one of {known}")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    name = path.stem if path.name != "config.json" else path.parent.name
    return name, hf


def _int4_quant_config(group: int = INT4_GROUP) -> dict[str, Any]:
    """The compressed-tensors block Kimi K2.5 ships (routed experts int4, everything else bf16)."""
    from infire_jax.models.deepseek import INT4_IGNORE

    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group},
            "input_activations": None, "output_activations": None,
        }},
        "ignore": list(INT4_IGNORE),
    }


@functools.lru_cache(maxsize=32)
def _parse(hf_json: str) -> ModelConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return from_hf_config(json.loads(hf_json))


def model_config(hf: Mapping[str, Any], weights: str = "bf16") -> tuple[ModelConfig, bool]:
    """ModelConfig for a weight format, and whether int4 experts are native (the family builds packed
    int4 parameters) rather than estimated from bf16 shapes. Config errors name the missing field."""
    if weights not in WEIGHT_FORMATS:
        raise PlanError(f"weight format {weights!r} is not supported; use one of {WEIGHT_FORMATS}")
    hf = {k: v for k, v in hf.items() if not k.startswith("_")}
    # A multimodal wrapper (config.NESTED) holds the text model in text_config, possibly with its
    # quantization block there (Kimi K2.5): the weight format applies to that text model.
    text = dict(hf["text_config"]) if isinstance(hf.get("text_config"), Mapping) else hf
    arch = (hf.get("architectures") or [None])[0]
    native = False
    if weights == "int4_experts" and (arch == "DeepseekV3ForCausalLM" or text is not hf and text.get("model_type") in ("deepseek_v3", "kimi_k2")):
        if not (hf.get("quantization_config") or text.get("quantization_config")):
            text["quantization_config"] = _int4_quant_config()
        native = True
    else:  # bf16 / fp32 / compressed: the checkpoint's full-precision shapes
        hf.pop("quantization_config", None)
        text.pop("quantization_config", None)
    if text is not hf:
        hf["text_config"] = text
    cfg = _parse(json.dumps(hf, sort_keys=True))
    if native and not cfg.get("expert_int4_group"):
        native = False
    return cfg, native


# ------------------------------------------------------------------------------------------------
# Abstract model for a layout
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParamShard:
    path: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    itemsize: float
    logical_axes: tuple[str | None, ...]
    spec: tuple  # PartitionSpec entries
    shard_shape: tuple[int, ...]
    kind: str  # embedding / lm_head / attention / dense_mlp / shared_expert / routed_expert / router / norm
    factor: float = 1.0  # storage bytes relative to the abstract dtype (int4 estimate / palette12)

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def bytes_total(self) -> float:
        return self.elements * self.itemsize * self.factor

    @property
    def bytes_per_device(self) -> float:
        return math.prod(self.shard_shape) * self.itemsize * self.factor


def param_kind(path: tuple[str, ...], axes: tuple) -> str:
    """What a parameter is, from its path and logical axes: embedding, lm_head, routed_expert, router,
    norm, shared_expert, dense_mlp or attention."""
    name = path[-1]
    if path == ("embed",):
        return "embedding"
    if path == ("lm_head",):
        return "lm_head"
    if "experts" in axes:
        return "routed_expert"
    if "router" in name:
        return "router"
    if "norm" in name or axes[-1:] == ("norm",) and len(axes) <= 2:
        return "norm"
    if name.startswith("shared_"):
        return "shared_expert"
    if name in ("w_gate_up", "w_down"):
        return "dense_mlp"
    return "attention"


def _abstract_mesh(mesh_spec):
    import jax

    from infire_jax import mesh as mesh_lib

    sizes = tuple(s for _, s in mesh_spec.sizes)
    return jax.sharding.AbstractMesh(sizes, mesh_lib.AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(sizes))


def _split_sizes(spec, mesh_shape: Mapping[str, int], shape: Sequence[int]) -> tuple[int, ...]:
    out = list(shape)
    for i, entry in enumerate(spec):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        ways = math.prod(mesh_shape[a] for a in axes)
        out[i] = shape[i] // ways
    return tuple(out)


@dataclasses.dataclass
class AbstractModel:
    """The family class built with nnx.eval_shape for one layout, with per-device shard shapes."""

    cfg: ModelConfig
    mesh: str
    mesh_shape: dict[str, int]
    rules: dict[str, Any]
    num_slots: int
    layer_slots: tuple[int, ...]
    kv_repeat: int
    params: list[ParamShard]
    kv_axes: tuple
    kv_slot_shapes: tuple[tuple[int, ...], ...]  # per cache array: one slot, one token
    kv_slot_shard: tuple[tuple[int, ...], ...]
    ffn_kinds: tuple[str, ...]

    @property
    def stages(self) -> int:
        return self.mesh_shape["pp"]

    @property
    def devices(self) -> int:
        return math.prod(self.mesh_shape.values())

    def axis_ways(self, logical: str, size: int) -> int:
        """Ways a logical dimension of `size` is split (1 if its mesh axes do not divide it)."""
        axes = self.rules.get(logical)
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        ways = math.prod(self.mesh_shape[a] for a in axes)
        return ways if ways and size % ways == 0 else 1

    def stage_of_layer(self, i: int) -> int:
        return self.layer_slots[i] // (self.num_slots // self.stages)


def build_abstract(
    cfg: ModelConfig,
    mesh: str,
    rules: Mapping[str, Any] | None = None,
    *,
    param_dtype: str = "bfloat16",
    weights: str = "bf16",
    int4_native: bool = False,
) -> AbstractModel:
    """Build the family abstractly for `mesh` + `rules` exactly as the loader does (loader.abstract_model:
    its layer slots and kv_repeat rule; layers stacked) and shard every parameter."""
    from infire_jax.flax_nnx import nnx

    from infire_jax import mesh as mesh_lib
    from infire_jax.loader import abstract_model
    from infire_jax.models import family_of
    from infire_jax.sharding import DEFAULT_RULES, Layout

    spec = mesh_lib.parse_mesh(mesh)
    layout = Layout(_abstract_mesh(spec), dict(rules or DEFAULT_RULES))
    mesh_shape = dict(spec.sizes)
    if layout.axis_size("layers") > cfg.num_layers:
        raise PlanError(f"mesh {mesh}: {layout.axis_size('layers')} pipeline stages for {cfg.num_layers} layers")
    if param_dtype not in ("bfloat16", "float32"):
        raise PlanError(f"param_dtype {param_dtype!r}: the planner sizes 'bfloat16' or 'float32' weights")
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        module, options = abstract_model(cfg, layout, dtype=param_dtype, compute_dtype=param_dtype, layer_list=False)
    kv_repeat, num_slots, slots = options.kv_repeat, options.num_slots, options.layer_slots
    _, state = nnx.split(module)
    params = []
    for path, var in nnx.to_flat_state(state):
        path = tuple(str(p) for p in path)
        value = var.get_value()
        axes = tuple(var.get_metadata()["logical_axes"])
        pspec = tuple(layout.spec(axes, value.shape))
        kind = param_kind(path, axes)
        factor = 1.0
        floating = np.dtype(value.dtype).kind == "f" or str(value.dtype) == "bfloat16"
        if weights == "int4_experts" and kind == "routed_expert" and not int4_native and floating:
            factor = INT4_RATIO * 2.0 / np.dtype(value.dtype).itemsize  # relative to bf16 storage
        if weights == "compressed" and len(axes) >= 3 and axes[0] == "layers" and floating:
            factor = PALETTE12_RATIO * 2.0 / np.dtype(value.dtype).itemsize  # palette12 (12 bits / weight)
        params.append(ParamShard(
            path=path, shape=tuple(value.shape), dtype=str(value.dtype), itemsize=np.dtype(value.dtype).itemsize,
            logical_axes=axes, spec=pspec, shard_shape=_split_sizes(pspec, mesh_shape, value.shape), kind=kind,
            factor=factor,
        ))
    kv_axes = tuple(module.kv_logical_axes)
    shapes = module.kv_shapes(1, 1)
    slot_shapes = tuple((1,) + tuple(s[1:]) for s in shapes)
    slot_shard = []
    for s in shapes:
        pspec = tuple(layout.spec(kv_axes, s))
        shard = _split_sizes(pspec, mesh_shape, s)
        slot_shard.append((1,) + tuple(shard[1:]))
    kinds = family_of(cfg).ffn_kinds(cfg)
    return AbstractModel(
        cfg=cfg, mesh=str(spec), mesh_shape=mesh_shape, rules=dict(layout.rules), num_slots=num_slots,
        layer_slots=tuple(slots), kv_repeat=kv_repeat, params=params, kv_axes=kv_axes, kv_slot_shapes=slot_shapes,
        kv_slot_shard=tuple(slot_shard), ffn_kinds=tuple(kinds),
    )


# ------------------------------------------------------------------------------------------------
# Model facts the cost model and the activation formula need (generic over families)
# ------------------------------------------------------------------------------------------------


def layer_types(cfg: ModelConfig) -> tuple[str, ...]:
    """'mla', 'chunked' or 'full' per layer."""
    if cfg.get("kv_lora_rank"):
        return ("mla",) * cfg.num_layers
    types = cfg.get("layer_types")
    if types and cfg.get("attention_chunk_size"):
        return tuple("chunked" if t == "chunked_attention" else "full" for t in types)
    return ("full",) * cfg.num_layers


@dataclasses.dataclass(frozen=True)
class MoEDims:
    experts: int  # routed experts per MoE layer (0: dense model)
    top_k: int
    expert_mlp: int  # F_e
    shared_mlp: int  # total hidden width of shared experts (0: none)
    moe_layers: int


def moe_dims(am: AbstractModel) -> MoEDims:
    cfg = am.cfg
    experts = shared = fe = 0
    for p in am.params:
        if p.kind == "routed_expert" and "experts" in p.logical_axes and not p.path[-1].endswith("_shape"):
            experts = p.shape[p.logical_axes.index("experts")]
            if "expert_mlp" in p.logical_axes and p.path[-1].startswith("w_gate_up") and not p.path[-1].endswith("scale"):
                fe = p.shape[p.logical_axes.index("expert_mlp")]
        if p.path[-1] == "shared_w_gate_up":
            shared = p.shape[p.logical_axes.index("mlp")]
    if experts and not fe:
        fe = int(cfg.get("moe_intermediate_size") or 0)
    k = int(cfg.get("num_experts_per_tok") or 0) if experts else 0
    return MoEDims(experts, k, fe, shared, sum(k_ == "moe" for k_ in am.ffn_kinds))


def activation_elems_per_token(am: AbstractModel, prefill: bool = True) -> dict[str, float]:
    """Per-device activation elements per token at the peak layer (see the module docstring)."""
    c = am.cfg
    d, h = c.hidden_size, c.num_heads
    hl = h // am.axis_ways("heads", h)
    if c.get("kv_lora_rank"):
        nope, rope, v, r = c.get("qk_nope_head_dim"), c.get("qk_rope_head_dim"), c.get("v_head_dim"), c.get("kv_lora_rank")
        attn = hl * (nope + rope) + (c.get("q_lora_rank") or 0) + (r + rope) + hl * v
        attn += hl * (nope + v) if prefill else hl * r  # expanded keys/values (prefill) or q in latent space
    else:
        kv = c.num_kv_heads * am.kv_repeat
        kvl = kv // am.axis_ways("kv_heads", kv)
        attn = 2 * hl * c.head_dim + 2 * kvl * c.head_dim
    ffn = 0.0
    m = moe_dims(am)
    if "dense" in am.ffn_kinds:
        f = c.intermediate_size
        ffn = max(ffn, 3 * f / am.axis_ways("mlp", f))
    if "moe" in am.ffn_kinds and m.experts:
        fe = m.expert_mlp / am.axis_ways("expert_mlp", m.expert_mlp)
        fs = m.shared_mlp / am.axis_ways("mlp", m.shared_mlp) if m.shared_mlp else 0
        ffn = max(ffn, m.top_k * (3 * fe + 2 * d) + 3 * fs + 2 * m.experts)
    return dict(residual=2 * d, attention=attn, ffn=ffn, peak=2 * d + max(attn, ffn))


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Deployment:
    hardware: str | Hardware
    count: int
    mesh: str | None = None  # None: search the meshes of `count` devices
    weights: str = "bf16"
    kv_dtype: str = "bf16"
    role: str = "colocated"
    max_step_tokens: int | None = None  # default: DEFAULT_STEP_TOKENS (colocated/prefill), max_decode_batch (decode)
    max_decode_batch: int = 256
    rules: Mapping[str, Any] | None = None
    min_context: int = 4096  # "fits" needs room for at least one sequence of this many tokens


@dataclasses.dataclass
class CapacityPlan:
    model: str
    family: str
    hardware: Hardware
    count: int
    mesh: str
    replicas: int
    weights: str
    int4_native: bool
    role: str
    params_total: int
    weight_bytes_total: float  # unsharded model (each parameter once)
    weight_bytes_per_device: float
    weight_breakdown_per_device: dict[str, float]
    weight_breakdown_total: dict[str, float]
    reserved: dict[str, float]  # per device
    kv_dtype_bytes: int
    kv_bytes_per_token_per_layer: dict[str, float]  # per device, one layer of each type
    kv_layers_per_device: dict[str, int]  # bottleneck stage
    kv_bytes_per_token_per_device: float  # bottleneck stage, uncapped
    kv_bytes_per_token_total: float  # canonical (unreplicated) KV per token, whole model
    chunk_size: int | None
    kv_free_per_device: float
    max_context_tokens: float
    fits: bool
    reason: str
    abstract: AbstractModel = dataclasses.field(repr=False, default=None)
    stage_layers: list[dict[str, int]] = dataclasses.field(default_factory=list)
    bf16: "CapacityPlan | None" = dataclasses.field(repr=False, default=None)  # compressed: the same deployment in bf16

    def versus_bf16(self) -> dict[str, Any] | None:
        """For compressed weights: what they free against bf16 on the same mesh, per device (weights
        saved in all and by routed experts) and the KV cache gained (GiB over all devices, the longest
        sequence, tokens cached as 8k-token sequences)."""
        if self.bf16 is None:
            return None
        b, g = self.bf16, lambda x: round(x / GiB, 3)  # noqa: E731
        tokens = lambda x: int(min(x, 2**62))  # noqa: E731  (as summary() reports them)
        saved = {k: v - self.weight_breakdown_per_device.get(k, 0.0) for k, v in b.weight_breakdown_per_device.items()}
        return dict(
            weights_saved_gib_per_device=g(b.weight_bytes_per_device - self.weight_bytes_per_device),
            routed_experts_saved_gib_per_device=g(saved.get("routed_expert", 0.0)),
            kv_free_gib_bf16=g(b.kv_free_total), kv_gained_gib=g(self.kv_free_total - b.kv_free_total),
            max_context_tokens_bf16=tokens(b.max_context_tokens),
            max_context_tokens_gained=tokens(self.max_context_tokens) - tokens(b.max_context_tokens),
            cache_tokens_at_8k_gained=(tokens(self.max_cache_tokens(8192)) - tokens(b.max_cache_tokens(8192))) * self.replicas,
        )

    @property
    def devices_per_replica(self) -> int:
        return self.count // self.replicas

    @property
    def kv_free_total(self) -> float:
        return self.kv_free_per_device * self.count

    def seq_bytes_per_stage(self, length: float) -> list[float]:
        """Cache bytes one sequence of `length` tokens takes on a device of each pipeline stage
        (chunked layers capped)."""
        out = []
        for st in self.stage_layers:
            b = 0.0
            for t, n in st.items():
                per = self.kv_bytes_per_token_per_layer[t]
                eff = min(length, self.chunk_size) if (t == "chunked" and self.chunk_size) else length
                b += n * per * eff
            out.append(b)
        return out

    def seq_bytes_per_device(self, length: float) -> float:
        """Bottleneck device's cache bytes for one sequence of `length` tokens (chunked layers capped)."""
        return max(self.seq_bytes_per_stage(length), default=0.0)

    def max_cache_tokens(self, length: int) -> float:
        """Tokens that fit in one replica's cache as sequences of `length` tokens."""
        per = self.seq_bytes_per_device(length)
        if per <= 0:
            return float("inf")
        return max(0.0, self.kv_free_per_device) / per * length

    def summary(self) -> dict[str, Any]:
        g = lambda b: round(b / GiB, 3)  # noqa: E731
        out = dict(
            model=self.model, family=self.family, hardware=self.hardware.name, count=self.count, mesh=self.mesh,
            replicas=self.replicas, weights=self.weights, role=self.role,
            int4_experts=("native (packed int4 parameters of the model class)" if self.int4_native else
                          "estimated (0.28125 x bf16 bytes of routed experts)") if self.weights == "int4_experts" else None,
            fits=self.fits, reason=self.reason,
            params_total=self.params_total, params_b=round(self.params_total / 1e9, 3),
            device_memory_gib=g(self.hardware.memory_bytes),
            weights_gib_total=g(self.weight_bytes_total),
            weights_gib_per_device=g(self.weight_bytes_per_device),
            weights_gib_all_devices=g(self.weight_bytes_per_device * self.count),
            weight_breakdown_gib_per_device={k: g(v) for k, v in self.weight_breakdown_per_device.items()},
            weight_breakdown_gib_total={k: g(v) for k, v in self.weight_breakdown_total.items()},
            reserved_gib_per_device={k: g(v) for k, v in self.reserved.items()},
            kv_dtype_bytes=self.kv_dtype_bytes,
            kv_bytes_per_token_per_layer_per_device=self.kv_bytes_per_token_per_layer,
            kv_layers_per_device=self.kv_layers_per_device,
            kv_bytes_per_token_per_device=self.kv_bytes_per_token_per_device,
            kv_bytes_per_token_total=self.kv_bytes_per_token_total,
            attention_chunk_size=self.chunk_size,
            kv_free_gib_per_device=g(self.kv_free_per_device),
            kv_free_gib=g(self.kv_free_total),
            max_context_tokens=int(min(self.max_context_tokens, 2**62)),
            max_cache_tokens_at_8k=int(min(self.max_cache_tokens(8192), 2**62)) * self.replicas,
            model_max_position_embeddings=self.abstract.cfg.max_position_embeddings if self.abstract else None,
        )
        if self.fits:
            boot = boot_time(self)
            out["boot"] = {k: round(v, 2) if isinstance(v, float) else v for k, v in boot.items()}
        if self.bf16 is not None:
            out["versus_bf16"] = self.versus_bf16()
        return out


def _kv_bytes(dtype: str) -> int:
    if dtype not in KV_DTYPES:
        raise PlanError(f"kv dtype {dtype!r} is not supported; use one of {sorted(KV_DTYPES)}")
    return KV_DTYPES[dtype]


def _max_len(free: float, per: Mapping[str, float], counts: Mapping[str, int], chunk: int | None) -> float:
    """Longest single sequence whose cache (chunked layers capped at `chunk`) fits in `free` bytes."""
    if free <= 0:
        return 0.0
    uncapped = sum(per[t] * n for t, n in counts.items() if not (t == "chunked" and chunk))
    capped = sum(per[t] * n for t, n in counts.items() if t == "chunked" and chunk)
    if uncapped + capped <= 0:
        return float("inf")
    first = free / (uncapped + capped)
    if not capped or first <= chunk:
        return first
    if uncapped <= 0:
        return float("inf")
    return (free - capped * chunk) / uncapped


def plan_capacity(
    model: str | pathlib.Path | Mapping[str, Any],
    deployment: Deployment,
) -> CapacityPlan:
    """Capacity of one deployment (deployment.mesh must be given; see plan_best to search)."""
    hw = get_hardware(deployment.hardware)
    if deployment.role not in ROLES:
        raise PlanError(f"role {deployment.role!r} is not one of {ROLES}")
    if not isinstance(deployment.count, int) or deployment.count < 1:
        raise PlanError(f"device count must be a positive integer, got {deployment.count!r}")
    name, hf = load_hf_config(model)
    cfg, native = model_config(hf, deployment.weights)
    from infire_jax import mesh as mesh_lib

    mesh = deployment.mesh or f"tp={deployment.count}"
    try:
        spec = mesh_lib.parse_mesh(mesh)
    except mesh_lib.MeshSpecError as e:
        raise PlanError(str(e)) from None
    if spec.first_device is not None:
        raise PlanError(f"mesh {mesh!r}: give axis sizes only (no device range) for planning")
    n = spec.num_devices
    if n > deployment.count:
        raise PlanError(f"mesh {mesh} needs {n} devices but the deployment has only {deployment.count} {hw.name}")
    if deployment.count % n:
        raise PlanError(f"{deployment.count} devices do not split into replicas of mesh {mesh} ({n} devices each)")
    if spec.shape["dp"] > 1:
        raise PlanError(f"mesh {mesh}: plan data-parallel copies as replicas (count a multiple of the mesh), not dp")
    param_dtype = "float32" if deployment.weights == "fp32" else "bfloat16"
    am = build_abstract(cfg, mesh, deployment.rules, param_dtype=param_dtype, weights=deployment.weights, int4_native=native)
    plan = _plan_from_abstract(name, am, hw, deployment, native, n)
    if deployment.weights == "compressed":  # what compression gains is read against bf16 on the same mesh
        plan.bf16 = plan_capacity(model, dataclasses.replace(deployment, mesh=mesh, weights="bf16"))
    return plan


def _plan_from_abstract(name: str, am: AbstractModel, hw: Hardware, dep: Deployment, native: bool, n: int) -> CapacityPlan:
    cfg = am.cfg
    weights_dev = sum(p.bytes_per_device for p in am.params)
    by_dev: dict[str, float] = {}
    by_tot: dict[str, float] = {}
    for p in am.params:
        by_dev[p.kind] = by_dev.get(p.kind, 0.0) + p.bytes_per_device
        by_tot[p.kind] = by_tot.get(p.kind, 0.0) + p.bytes_total
    # the unsharded model counts real layers only (pipeline padding slots hold zeros)
    pad = am.num_slots - cfg.num_layers
    total = sum(by_tot.values())
    if pad:
        total = 0.0
        by_tot = {}
        for p in am.params:
            b = p.bytes_total
            if p.logical_axes[:1] == ("layers",):
                b *= _real_fraction(am, p)
            by_tot[p.kind] = by_tot.get(p.kind, 0.0) + b
            total += b
    params_total = int(round(sum(p.elements * (_real_fraction(am, p) if p.logical_axes[:1] == ("layers",) else 1)
                                 for p in am.params if not p.path[-1].endswith("_shape"))))
    if am.cfg.get("expert_int4_group"):  # packed int4: 8 weights per int32 word; scales are not weights
        params_total = _params_unpacked(am)

    # KV per token and device
    kvb = _kv_bytes(dep.kv_dtype)
    per_slot = sum(math.prod(s) for s in am.kv_slot_shard) * kvb  # one slot, one token, this device
    types = layer_types(cfg)
    per_layer = {t: float(per_slot) for t in set(types)}
    stages: list[dict[str, int]] = [dict() for _ in range(am.stages)]
    for i, t in enumerate(types):
        st = stages[am.stage_of_layer(i)]
        st[t] = st.get(t, 0) + 1
    chunk = cfg.get("attention_chunk_size") if "chunked" in types else None
    canonical = sum(math.prod(s) for s in am.kv_slot_shapes) * kvb * cfg.num_layers
    if am.kv_repeat > 1:
        canonical /= am.kv_repeat
    worst = max(stages, key=lambda st: sum(per_layer[t] * c for t, c in st.items()))

    # reserved memory
    role = dep.role
    step = dep.max_step_tokens or (dep.max_decode_batch if role == "decode" else DEFAULT_STEP_TOKENS)
    act_bytes = 2 if hw.compute_dtype == "bfloat16" else 4
    elems = activation_elems_per_token(am, prefill=role != "decode")
    v = cfg.vocab_size
    reserved = dict(
        runtime=hw.runtime_reserve_bytes,
        headroom=hw.headroom_fraction * hw.memory_bytes,
        activations=step * elems["peak"] * act_bytes,
        logits=dep.max_decode_batch * (v / am.axis_ways("vocab", v) + v) * 4.0,
    )
    free = hw.memory_bytes - weights_dev - sum(reserved.values())
    max_ctx = min(_max_len(free, per_layer, st, chunk) for st in stages) if free > 0 else 0.0
    if free <= 0:
        fits, reason = False, (
            f"weights {weights_dev / GiB:.2f} GiB + reserved {sum(reserved.values()) / GiB:.2f} GiB per device exceed "
            f"{hw.memory_gib:.2f} GiB ({-free / GiB:.2f} GiB short)")
    elif max_ctx < dep.min_context:
        fits, reason = False, (
            f"only {max_ctx:.0f} tokens of KV cache fit ({free / GiB:.2f} GiB per device left); need >= {dep.min_context}")
    else:
        fits, reason = True, f"{free / GiB:.2f} GiB per device left for KV ({max_ctx:,.0f} tokens in one sequence)"
    return CapacityPlan(
        model=name, family=cfg.family, hardware=hw, count=dep.count, mesh=am.mesh, replicas=dep.count // n,
        weights=dep.weights, int4_native=native, role=role, params_total=params_total, weight_bytes_total=total,
        weight_bytes_per_device=weights_dev, weight_breakdown_per_device=by_dev, weight_breakdown_total=by_tot,
        reserved=reserved, kv_dtype_bytes=kvb, kv_bytes_per_token_per_layer=per_layer, kv_layers_per_device=worst,
        kv_bytes_per_token_per_device=sum(per_layer[t] * c for t, c in worst.items()),
        kv_bytes_per_token_total=canonical, chunk_size=chunk,
        kv_free_per_device=free, max_context_tokens=max_ctx, fits=fits,
        reason=reason, abstract=am, stage_layers=stages,
    )


def _real_fraction(am: AbstractModel, p: ParamShard) -> float:
    """Share of a stacked parameter's slots that hold real layers (pipeline padding excluded)."""
    slots = p.shape[0]
    kind_layers = {"dense": sum(k == "dense" for k in am.ffn_kinds), "moe": sum(k == "moe" for k in am.ffn_kinds)}
    if p.path[0] in kind_layers and slots:  # a per-kind FFN stack (moe.MoEDecoder)
        return min(1.0, kind_layers[p.path[0]] / slots)
    if slots == am.num_slots:
        return am.cfg.num_layers / am.num_slots
    return 1.0


def _params_unpacked(am: AbstractModel) -> int:
    total = 0.0
    for p in am.params:
        name = p.path[-1]
        if name.endswith("_shape") or name.endswith("_scale"):
            continue
        n = p.elements * (8 if name.endswith("_packed") else 1)
        if p.logical_axes[:1] == ("layers",):
            n *= _real_fraction(am, p)
        total += n
    return int(round(total))


# ------------------------------------------------------------------------------------------------
# Boot time on paper
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BootCalibration:
    """Constants of the boot estimate that are not bandwidths, measured on this project's 2-core CPU
    (experiments/bench_cold_start.py --calibrate_layers=2,8,16,30; WORKSPACE_NOTES, issue 21), in CPU
    seconds of the process, which other jobs on a shared machine do not inflate: imports before the
    loader starts (with the executables prefetched meanwhile); per program compiled (cold cache) a fixed
    part plus a part per layer the program unrolls (pp=1 layer lists); per program taken from the
    executable cache in the warm-up (what the prefetch left). XLA:CPU stands in for XLA:GPU, whose
    compiles (with autotuning) take longer, so the cold-cache figure is a floor. `programs`: what
    generate.py's one request shape compiles before its first token (page allocation, prefill, KV
    canonicalisation and insert, decode). Measured 2026-12-07, quiet machine, 2 / 8 / 16 / 30 layers."""

    init_s: float = 0.76  # Python, absl, JAX and Flax NNX imports (0.6 s wall), the executables' prefetch
    compile_s_per_program: float = 0.41
    compile_s_per_layer: float = 0.0092
    cached_s_per_program: float = 0.011
    programs: int = 5


BOOT = BootCalibration()


def boot_time(plan: CapacityPlan, calibration: BootCalibration = BOOT, storage_bw: float | None = None,
              host_to_device_bw: float | None = None) -> dict[str, Any]:
    """Seconds from process start to serving for one replica of `plan`, on paper, stage by stage:
    init (imports), read (each node reads its devices' shards: per-device weight bytes x devices per
    node / storage bandwidth), host_to_device (per-device bytes over PCIe, devices in parallel),
    compile (cold: every program compiled; warm: loaded from the executable cache).
    The stages run one after another, as infire_jax's loader does."""
    hw = plan.hardware
    storage = storage_bw or hw.storage_bw
    h2d = host_to_device_bw or hw.host_to_device_bw
    per_device = plan.weight_bytes_per_device
    devices = plan.devices_per_replica
    read = per_device * min(devices, hw.devices_per_node) / storage
    to_device = per_device / h2d
    am = plan.abstract
    unrolled = am.cfg.num_layers if am is not None and am.stages == 1 else 1  # pp > 1: layers are scanned
    c = calibration
    cold = c.programs * (c.compile_s_per_program + c.compile_s_per_layer * unrolled)
    warm = c.programs * c.cached_s_per_program
    base = c.init_s + read + to_device
    return dict(
        init_s=c.init_s, read_s=read, host_to_device_s=to_device, compile_s=warm, compile_cold_cache_s=cold,
        total_s=base + warm, total_cold_cache_s=base + cold,
        assumptions=dict(storage_bytes_per_s=storage, host_to_device_bytes_per_s=h2d,
                         weight_bytes_per_device=per_device, devices_per_node=min(devices, hw.devices_per_node),
                         unrolled_layers=unrolled) | dataclasses.asdict(c),
    )


# ------------------------------------------------------------------------------------------------
# Searching meshes
# ------------------------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_meshes(count: int, cfg: ModelConfig | None = None, max_pp: int = 16) -> list[str]:
    """Meshes of exactly `count` devices: pp x ep x tp (ep only for MoE models)."""
    moe = bool(cfg and (cfg.get("n_routed_experts") or cfg.get("num_local_experts") or cfg.get("num_experts")))
    out = []
    for pp in _divisors(count):
        if pp > max_pp or (cfg and pp > cfg.num_layers):
            continue
        rest = count // pp
        for ep in (_divisors(rest) if moe else [1]):
            tp = rest // ep
            parts = [f"pp={pp}"] * (pp > 1) + [f"ep={ep}"] * (ep > 1) + [f"tp={tp}"] * (tp > 1)
            out.append(",".join(parts) or "tp=1")
    return out


def plan_best(
    model: str | pathlib.Path | Mapping[str, Any],
    deployment: Deployment,
    meshes: Sequence[str] | None = None,
    objective: str = "kv_bytes",
) -> tuple[CapacityPlan, list[CapacityPlan]]:
    """The best plan over candidate meshes of deployment.count devices (or deployment.mesh alone):
    fitting plans first, then the objective ("kv_bytes": most KV memory left, the default; "tokens":
    the longest single-sequence context), then the fewest pipeline stages / expert-parallel ways.
    Returns (best, all candidates sorted best first)."""
    if deployment.mesh:
        p = plan_capacity(model, deployment)
        return p, [p]
    get_hardware(deployment.hardware)  # unknown hardware fails before any model work
    name, hf = load_hf_config(model)
    cfg, _ = model_config(hf, deployment.weights)
    plans = []
    for mesh in meshes or candidate_meshes(deployment.count, cfg):
        try:
            plans.append(plan_capacity(hf | {"_name": name}, dataclasses.replace(deployment, mesh=mesh)))
        except PlanError:
            continue
    if not plans:
        raise PlanError(f"no mesh of {deployment.count} devices could be planned")
    for p in plans:
        p.model = name
    if objective not in ("kv_bytes", "tokens"):
        raise PlanError(f"objective {objective!r} is not one of ('kv_bytes', 'tokens')")
    score = (lambda p: p.kv_free_per_device) if objective == "kv_bytes" else (lambda p: min(p.max_context_tokens, 1e18))
    plans.sort(key=lambda p: (not p.fits, -round(score(p), 3), p.abstract.mesh_shape["pp"], p.abstract.mesh_shape["ep"]))
    return plans[0], plans
