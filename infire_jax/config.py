"""ModelConfig: one dataclass for every supported family, built from a Hugging Face config.json.

Only the fields the model code reads are kept; everything is validated here so a bad checkpoint
fails at load time with a message that names the field, not deep inside a compiled program.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable

__all__ = ["ModelConfig", "ConfigError", "from_hf_config", "load_config", "FAMILIES", "NESTED", "configs_dir"]


def configs_dir() -> pathlib.Path:
    """The shipped configs (deployments/, models/): inside the package after a plain install (pyproject
    maps the repository's configs/ to infire_jax/configs), the repository's top-level configs/ in a source
    checkout or an editable install, where users edit them."""
    package = pathlib.Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


class ConfigError(ValueError):
    """A config.json that infire_jax cannot serve (unknown architecture, missing or bad field)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # key into FAMILIES (the model file that implements it)
    architecture: str  # the HF architecture name, for messages
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # frozen dict of the HF rope_scaling
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 (always) / Llama attention_bias (also on o_proj)
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    extra: tuple[tuple[str, Any], ...] = ()  # family-specific fields (MoE, MLA, ...)
    # Where the served (text) weights sit in the checkpoint files: a multimodal checkpoint nests them
    # under a prefix, next to tensors a text server never reads (vision tower, projector). A property
    # of the files, not of the model: left out of equality and repr, so a nested and a text-only
    # checkpoint of the same weights give equal configs (and equal KV fingerprints).
    weight_prefix: str = dataclasses.field(default="", compare=False, repr=False)
    skip_weight_prefixes: tuple[str, ...] = dataclasses.field(default=(), compare=False, repr=False)

    @property
    def rope(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.extra).get(key, default)

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _require(hf: dict, key: str, arch: str) -> Any:
    if key not in hf or hf[key] is None:
        raise ConfigError(f"config.json for {arch} is missing the required field {key!r}")
    return hf[key]


def rope_scaling_of(hf: dict, arch: str) -> tuple | None:
    """Normalise HF rope scaling (classic `rope_scaling` or transformers-5 `rope_parameters`)."""
    scaling = hf.get("rope_scaling") or None
    if scaling is None:
        params = hf.get("rope_parameters") or {}
        if params.get("rope_type", "default") != "default":
            scaling = params
    if scaling is None:
        return None
    scaling = dict(scaling)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    scaling["rope_type"] = kind
    supported = {"default", "llama3", "linear", "yarn"}
    if kind not in supported:
        raise ConfigError(
            f"{arch}: rope_scaling type {kind!r} is not supported (supported: {sorted(supported)})"
        )
    if kind == "default":
        return None
    needed = {
        "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
        "linear": ("factor",),
        "yarn": ("factor", "original_max_position_embeddings"),
    }[kind]
    for key in needed:
        if key not in scaling:
            raise ConfigError(f"{arch}: rope_scaling of type {kind!r} is missing {key!r}")
    return _freeze(scaling)


def rope_theta_of(hf: dict) -> float:
    """rope_theta from an HF config (classic key or transformers-5 `rope_parameters`)."""
    if "rope_theta" in hf:
        return float(hf["rope_theta"])
    return float((hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))


def _eos_ids(hf: dict) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _dense_common(hf: dict, arch: str, family: str) -> dict[str, Any]:
    heads = int(_require(hf, "num_attention_heads", arch))
    hidden = int(_require(hf, "hidden_size", arch))
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ConfigError(f"{arch}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    return dict(
        family=family,
        architecture=arch,
        vocab_size=int(_require(hf, "vocab_size", arch)),
        hidden_size=hidden,
        intermediate_size=int(_require(hf, "intermediate_size", arch)),
        num_layers=int(_require(hf, "num_hidden_layers", arch)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rms_norm_eps=float(_require(hf, "rms_norm_eps", arch)),
        rope_theta=rope_theta_of(hf),
        rope_scaling=rope_scaling_of(hf, arch),
        max_position_embeddings=int(hf.get("max_position_embeddings") or 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf),
    )


def _llama(hf: dict, arch: str) -> dict[str, Any]:
    cfg = _dense_common(hf, arch, "llama")
    if hf.get("mlp_bias", False):
        raise ConfigError(f"{arch}: mlp_bias=True is not supported")
    bias = bool(hf.get("attention_bias", False))
    return cfg | dict(qkv_bias=bias, o_bias=bias)


def _check_window(hf: dict, arch: str, context: int) -> None:
    """Sliding-window attention is not implemented: refuse a window that would bind."""
    window = hf.get("sliding_window")
    if window is not None and int(window) < context:
        raise ConfigError(
            f"{arch}: sliding_window={window} is not supported (attention is always full); it must be null "
            f"or at least max_position_embeddings={context}"
        )


def _mistral(hf: dict, arch: str) -> dict[str, Any]:
    cfg = _llama(hf, arch)
    _check_window(hf, arch, cfg["max_position_embeddings"])
    return cfg


def _qwen2(hf: dict, arch: str) -> dict[str, Any]:
    if hf.get("use_sliding_window", False):
        raise ConfigError(f"{arch}: use_sliding_window=True is not supported; set it to false")
    return _dense_common(hf, arch, "llama") | dict(qkv_bias=True)


def _qwen3(hf: dict, arch: str) -> dict[str, Any]:
    if hf.get("use_sliding_window", False):
        raise ConfigError(f"{arch}: use_sliding_window=True is not supported; set it to false")
    bias = bool(hf.get("attention_bias", False))
    return _dense_common(hf, arch, "llama") | dict(qkv_bias=bias, o_bias=bias, qk_norm=True)


def _flag(hf: dict, key: str, default: Any) -> Any:
    value = hf.get(key)
    return default if value is None else value


def _check_act(hf: dict, arch: str) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{arch}: hidden_act={act!r} is not supported (only 'silu')")


def _qwen3_moe(hf: dict, arch: str) -> dict[str, Any]:
    """Qwen3-MoE: Qwen3 attention + softmax top-k experts (no shared expert)."""
    _check_act(hf, arch)
    if hf.get("use_sliding_window", False):
        raise ConfigError(f"{arch}: use_sliding_window=True is not supported; set it to false")
    bias = bool(hf.get("attention_bias", False))
    experts = int(_flag(hf, "num_experts", _flag(hf, "num_local_experts", 0)))
    top_k = int(_require(hf, "num_experts_per_tok", arch))
    if experts and not 0 < top_k <= experts:
        raise ConfigError(f"{arch}: num_experts_per_tok={top_k} must be in [1, num_experts={experts}]")
    return _dense_common(hf, arch, "qwen3_moe") | dict(
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=True,
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=int(_require(hf, "moe_intermediate_size", arch)),
        norm_topk_prob=bool(_flag(hf, "norm_topk_prob", False)),
        decoder_sparse_step=int(_flag(hf, "decoder_sparse_step", 1)),
        mlp_only_layers=tuple(int(i) for i in _flag(hf, "mlp_only_layers", [])),
    )


def _mixtral(hf: dict, arch: str) -> dict[str, Any]:
    """Mixtral: Mistral GQA attention + softmax top-k experts renormalised over the chosen ones
    (transformers MixtralTopKRouter), every layer sparse, no shared expert. The same equations as
    Qwen3-MoE with norm_topk_prob and without q/k norms, so it is served by that family; only the HF
    tensor names differ (block_sparse_moe.experts.{e}.w1/w3/w2)."""
    _check_act(hf, arch)
    cfg = _dense_common(hf, arch, "qwen3_moe")
    _check_window(hf, arch, cfg["max_position_embeddings"])
    experts = int(_require(hf, "num_local_experts", arch))
    top_k = int(_require(hf, "num_experts_per_tok", arch))
    if not 0 < top_k <= experts:
        raise ConfigError(f"{arch}: num_experts_per_tok={top_k} must be in [1, num_local_experts={experts}]")
    return cfg | dict(
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=cfg["intermediate_size"],
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=(),
        moe_tensor_names="mixtral",
    )


def _linear_names(layers: int, first_dense: int, experts: int, shared: int) -> tuple[list[str], list[str]]:
    """(routed-expert Linear module names, every other Linear module name) of a DeepSeek-V3 model."""
    expert, other = [], ["lm_head"]
    for i in range(layers):
        pre = f"model.layers.{i}."
        other += [pre + "self_attn." + n for n in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                                                    "kv_b_proj", "o_proj")]
        proj = ("gate_proj", "up_proj", "down_proj")
        if i < first_dense or not experts:
            other += [pre + "mlp." + n for n in proj]
        else:
            other += [pre + "mlp.shared_experts." + n for n in proj] if shared else []
            expert += [f"{pre}mlp.experts.{e}.{n}" for e in range(experts) for n in proj]
    return expert, other


def _expert_int4_group(hf: dict, arch: str, expert_names: list[str], other_names: list[str], dims: tuple) -> int | None:
    """Group size of int4 routed experts from a compressed-tensors quantization_config (None: no
    quantisation). Only the format Kimi K2.5 ships is accepted: pack-quantized, weight-only int4,
    symmetric, group-wise along the input dim, on the routed experts and nothing else. In a nested
    (multimodal) checkpoint a pattern may name a module with or without the text-weight prefix."""
    import re

    q = hf.get("quantization_config")
    if not q:
        return None
    where = f"{arch}: quantization_config"
    method, fmt = q.get("quant_method"), q.get("format")
    if method != "compressed-tensors" or fmt != "pack-quantized":
        raise ConfigError(
            f"{where}: quant_method={method!r}, format={fmt!r} is not supported; only compressed-tensors "
            "'pack-quantized' int4 expert weights are"
        )
    groups = q.get("config_groups") or {}
    if len(groups) != 1:
        raise ConfigError(f"{where}: expected exactly one config group, found {len(groups)}")
    scheme = next(iter(groups.values()))
    w = scheme.get("weights") or {}
    got = (w.get("type", "int"), w.get("num_bits"), w.get("symmetric", True), w.get("strategy"))
    if got != ("int", 4, True, "group") or scheme.get("input_activations") or scheme.get("output_activations"):
        raise ConfigError(
            f"{where}: scheme type={got[0]!r} num_bits={got[1]!r} symmetric={got[2]!r} strategy={got[3]!r} "
            "(activations quantised: %s) is not supported; only weight-only int4, symmetric, strategy 'group'"
            % bool(scheme.get("input_activations") or scheme.get("output_activations"))
        )
    group = w.get("group_size")
    if not isinstance(group, int) or group <= 0 or group % 8 or any(dim % group for dim in dims):
        raise ConfigError(
            f"{where}: group_size={group!r} is not supported; it must be a multiple of 8 that divides the "
            f"expert input dims {dims}"
        )
    targets, ignore = scheme.get("targets") or [], q.get("ignore") or []

    prefix = hf.get(_PREFIX_KEY, "")

    def matches(name: str, patterns) -> bool:
        names = (name, prefix + name) if prefix else (name,)
        return any(re.fullmatch(p[3:], n) if p.startswith("re:") else p in (n, "Linear") for p in patterns for n in names)

    def quantized(name: str) -> bool:
        return matches(name, targets) and not matches(name, [p for p in ignore if p != "Linear"])

    bad = [n for n in other_names if quantized(n)]
    if bad:
        raise ConfigError(
            f"{where}: only routed-expert weights may be quantised; also quantised: {bad[:6]}"
            + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
        )
    on = [quantized(n) for n in expert_names]
    if any(on) and not all(on):
        raise ConfigError(f"{where}: some routed experts are quantised and others not; expected all or none")
    return group if all(on) and on else None


def _deepseek_v3(hf: dict, arch: str) -> dict[str, Any]:
    """DeepSeek-V3 / Kimi K2: MLA attention + sigmoid group-limited top-k experts + shared experts."""
    _check_act(hf, arch)
    if hf.get("attention_bias", False):
        raise ConfigError(f"{arch}: attention_bias=True is not supported")
    scoring = hf.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise ConfigError(f"{arch}: scoring_func={scoring!r} is not supported (only 'sigmoid', as DeepSeek-V3)")
    cfg = _dense_common(hf, arch, "deepseek_v3")
    if dict(cfg["rope_scaling"] or ()).get("truncate") is False:
        raise ConfigError(f"{arch}: YaRN with truncate=false is not supported (the correction range is always truncated)")
    nope = int(_require(hf, "qk_nope_head_dim", arch))
    rope = int(_require(hf, "qk_rope_head_dim", arch))
    if rope % 2:
        raise ConfigError(f"{arch}: qk_rope_head_dim={rope} must be even")
    experts = int(_flag(hf, "n_routed_experts", 0))
    n_group, topk_group = int(_flag(hf, "n_group", 1)), int(_flag(hf, "topk_group", 1))
    top_k = int(_flag(hf, "num_experts_per_tok", 0))
    if experts:
        if experts % n_group:
            raise ConfigError(f"{arch}: n_routed_experts={experts} is not a multiple of n_group={n_group}")
        if not 0 < topk_group <= n_group:
            raise ConfigError(f"{arch}: topk_group={topk_group} must be in [1, n_group={n_group}]")
        if not 0 < top_k <= topk_group * (experts // n_group):
            raise ConfigError(f"{arch}: num_experts_per_tok={top_k} exceeds the experts of topk_group groups")
    q_lora = hf.get("q_lora_rank")
    first_dense = int(_flag(hf, "first_k_dense_replace", 0))
    names = _linear_names(cfg["num_layers"], first_dense, experts, int(_flag(hf, "n_shared_experts", 0)))
    moe_inter = int(_flag(hf, "moe_intermediate_size", 0))
    int4 = _expert_int4_group(hf, arch, *names, dims=(cfg["hidden_size"], moe_inter))
    return cfg | dict(
        expert_int4_group=int4,
        num_kv_heads=cfg["num_heads"],  # MLA: every head has its own key/value (from the shared latent)
        head_dim=nope + rope,
        q_lora_rank=int(q_lora) if q_lora else None,
        kv_lora_rank=int(_require(hf, "kv_lora_rank", arch)),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=int(_require(hf, "v_head_dim", arch)),
        rope_interleave=bool(_flag(hf, "rope_interleave", True)),
        n_routed_experts=experts,
        n_shared_experts=int(_flag(hf, "n_shared_experts", 0)),
        num_experts_per_tok=top_k,
        moe_intermediate_size=moe_inter,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=float(_flag(hf, "routed_scaling_factor", 1.0)),
        norm_topk_prob=bool(_flag(hf, "norm_topk_prob", True)),
        first_k_dense_replace=first_dense,
    )


def _llama4_text(hf: dict, arch: str) -> dict[str, Any]:
    """Llama 4 text (Llama4ForCausalLM): chunked-rope / global-NoPE attention, sigmoid top-k MoE."""
    _check_act(hf, arch)
    layers = int(_require(hf, "num_hidden_layers", arch))
    dense = dict(hf, intermediate_size=hf.get("intermediate_size_mlp") or hf.get("intermediate_size"))
    cfg = _dense_common(dense, arch, "llama4")
    bias = bool(hf.get("attention_bias", False))
    experts = int(_flag(hf, "num_local_experts", 0))
    step = int(_flag(hf, "interleave_moe_layer_step", 1))
    moe_layers = hf.get("moe_layers")
    if moe_layers is None:
        moe_layers = list(range(step - 1, layers, step)) if experts else []
    interval = int(_flag(hf, "no_rope_layer_interval", 4))
    no_rope = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
    if len(no_rope) < layers:
        raise ConfigError(f"{arch}: no_rope_layers has {len(no_rope)} entries for {layers} layers")
    layer_types = hf.get("layer_types") or [
        "chunked_attention" if r else "full_attention" for r in no_rope[:layers]
    ]
    unknown = sorted(set(layer_types) - {"chunked_attention", "full_attention"})
    if unknown:
        raise ConfigError(f"{arch}: layer_types {unknown} are not supported (chunked_attention, full_attention)")
    if any(not 0 <= i < layers for i in moe_layers):
        raise ConfigError(f"{arch}: moe_layers {moe_layers} name layers outside [0, {layers})")
    top_k = int(_flag(hf, "num_experts_per_tok", 1))
    if moe_layers and not 0 < top_k <= experts:
        raise ConfigError(f"{arch}: num_experts_per_tok={top_k} must be in [1, num_local_experts={experts}]")
    chunk = hf.get("attention_chunk_size")
    return cfg | dict(
        qkv_bias=bias,
        o_bias=bias,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=int(_require(hf, "intermediate_size", arch)),
        moe_layers=tuple(int(i) for i in moe_layers),
        no_rope_layers=tuple(int(r) for r in no_rope[:layers]),
        layer_types=tuple(layer_types[:layers]),
        attention_chunk_size=int(chunk) if chunk else None,
        use_qk_norm=bool(_flag(hf, "use_qk_norm", True)),
        attn_temperature_tuning=bool(_flag(hf, "attn_temperature_tuning", True)),
        floor_scale=float(_flag(hf, "floor_scale", 8192)),
        attn_scale=float(_flag(hf, "attn_scale", 0.1)),
    )


# HF architecture name -> parser. Families beyond dense Llama register here too.
FAMILIES: dict[str, Callable[[dict, str], dict[str, Any]]] = {
    "LlamaForCausalLM": _llama,
    "MistralForCausalLM": _mistral,
    "MixtralForCausalLM": _mixtral,
    "Qwen2ForCausalLM": _qwen2,
    "Qwen3ForCausalLM": _qwen3,
    "Qwen3MoeForCausalLM": _qwen3_moe,
    "DeepseekV3ForCausalLM": _deepseek_v3,
    "Llama4ForCausalLM": _llama4_text,
}


@dataclasses.dataclass(frozen=True)
class Nested:
    """A multimodal checkpoint served as text only: which text backbones its text_config may hold,
    where their weights sit, and which tensors (vision tower, projector) are not read."""

    text_types: dict[str, str]  # text_config model_type -> text architecture (a FAMILIES key)
    prefix: str  # of every text-model tensor name
    skip: tuple[str, ...]  # prefixes of the tensors a text server ignores


NESTED: dict[str, Nested] = {
    # transformers Llama4ForConditionalGeneration.save_pretrained and the published Llama 4 checkpoints
    "Llama4ForConditionalGeneration": Nested(
        {"llama4_text": "Llama4ForCausalLM"}, "language_model.", ("vision_model.", "multi_modal_projector.")
    ),
    # moonshotai/Kimi-K2.5 (remote code; text_config model_type "kimi_k2", DeepSeek-V3 fields)
    "KimiK25ForConditionalGeneration": Nested(
        {"kimi_k2": "DeepseekV3ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"},
        "language_model.", ("vision_tower.", "mm_projector."),
    ),
}
# Wrapper fields that apply to the text model when its text_config does not set them (not
# tie_word_embeddings: transformers ties the language model by its own config).
_INHERITED = ("bos_token_id", "eos_token_id", "quantization_config")
_PREFIX_KEY = "_weight_prefix"  # passed to the text parser inside the merged dict (int4 pattern matching)


def _text_config(hf: dict, arch: str) -> tuple[dict, str]:
    """(the text model's config, its architecture) from a nested multimodal config."""
    nested, text = NESTED[arch], hf.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"{arch}: config.json has no text_config object; cannot find the text model")
    kind = text.get("model_type")
    if kind not in nested.text_types:
        raise ConfigError(
            f"{arch}: text_config model_type {kind!r} is not supported; supported: {sorted(nested.text_types)}"
        )
    merged = text | {k: hf[k] for k in _INHERITED if text.get(k) is None and hf.get(k) is not None}
    return merged | {_PREFIX_KEY: nested.prefix}, nested.text_types[kind]


def from_hf_config(hf: dict) -> ModelConfig:
    """Build a ModelConfig from the parsed contents of an HF config.json. A multimodal checkpoint
    (NESTED) gives the config of its text backbone, plus where the text weights sit in its files."""
    archs = hf.get("architectures") or []
    if not archs:
        raise ConfigError("config.json has no 'architectures' field; cannot tell which model family it is")
    arch = label = archs[0]
    layout = {}
    if arch in NESTED:
        layout = dict(weight_prefix=NESTED[arch].prefix, skip_weight_prefixes=NESTED[arch].skip)
        hf, arch = _text_config(hf, arch)
        label = f"{label} text_config ({arch})"
    elif arch not in FAMILIES:
        raise ConfigError(
            f"unsupported architecture {arch!r}; supported: {', '.join(sorted(FAMILIES))}; multimodal "
            f"(text served, vision ignored): {', '.join(sorted(NESTED))}"
        )
    fields = FAMILIES[arch](hf, label) | dict(architecture=arch) | layout
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    extra = {k: v for k, v in fields.items() if k not in known}
    fields = {k: v for k, v in fields.items() if k in known}
    return ModelConfig(**fields, extra=_freeze(extra) if extra else ())


def load_config(model_dir: str | pathlib.Path) -> ModelConfig:
    path = pathlib.Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {model_dir}; pass a Hugging Face model directory")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    return from_hf_config(hf)
