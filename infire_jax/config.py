"""ModelConfig: one dataclass for every supported family, built from a Hugging Face config.json.

Only the fields the model code reads are kept; everything is validated here so a bad checkpoint
fails at load time with a message that names the field, not deep inside a compiled program.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable

__all__ = ["ModelConfig", "ConfigError", "from_hf_config", "load_config", "FAMILIES"]


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


def _rope_scaling(hf: dict, arch: str) -> tuple | None:
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


def _rope_theta(hf: dict) -> float:
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
        rope_theta=_rope_theta(hf),
        rope_scaling=_rope_scaling(hf, arch),
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


def _qwen2(hf: dict, arch: str) -> dict[str, Any]:
    if hf.get("use_sliding_window", False):
        raise ConfigError(f"{arch}: use_sliding_window=True is not supported; set it to false")
    return _dense_common(hf, arch, "llama") | dict(qkv_bias=True)


def _qwen3(hf: dict, arch: str) -> dict[str, Any]:
    if hf.get("use_sliding_window", False):
        raise ConfigError(f"{arch}: use_sliding_window=True is not supported; set it to false")
    bias = bool(hf.get("attention_bias", False))
    return _dense_common(hf, arch, "llama") | dict(qkv_bias=bias, o_bias=bias, qk_norm=True)


# HF architecture name -> parser. Families beyond dense Llama register here too.
FAMILIES: dict[str, Callable[[dict, str], dict[str, Any]]] = {
    "LlamaForCausalLM": _llama,
    "MistralForCausalLM": _llama,
    "Qwen2ForCausalLM": _qwen2,
    "Qwen3ForCausalLM": _qwen3,
}


def from_hf_config(hf: dict) -> ModelConfig:
    """Build a ModelConfig from the parsed contents of an HF config.json."""
    archs = hf.get("architectures") or []
    if not archs:
        raise ConfigError("config.json has no 'architectures' field; cannot tell which model family it is")
    arch = archs[0]
    if arch not in FAMILIES:
        raise ConfigError(
            f"unsupported architecture {arch!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    fields = FAMILIES[arch](hf, arch)
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
