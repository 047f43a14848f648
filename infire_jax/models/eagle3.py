"""EAGLE-3 draft heads: one decoder layer over the target's fused hidden states, a reduced-vocabulary LM head.

The published layout (SafeAILab EAGLE-3, SpecForge; served by vLLM and SGLang as "eagle3"):
  config.json  a Llama config of the head (hidden_size, num_attention_heads, num_key_value_heads,
               intermediate_size, rms_norm_eps, rope settings, num_hidden_layers = 1), vocab_size (the
               target's), draft_vocab_size (the head's reduced vocabulary), optionally target_hidden_size
               (default hidden_size), norm_before_residual, and the target layers it reads,
               eagle_aux_hidden_state_layer_ids (top level or under eagle_config; default
               (2, L // 2, L - 3) of a target with L layers). Id j names the input of target layer j
               (the output of layer j - 1; 0 is the embedding output).
  safetensors  fc.weight (H, 3 T): the low, mid and high hidden states concatenated -> H;
               midlayer.{input_layernorm, hidden_norm, post_attention_layernorm}.weight (H,);
               midlayer.self_attn.{q,k,v}_proj.weight (heads x hd, 2 H): attention reads
               [input_layernorm(embedding of the next token), hidden_norm(hidden)], o_proj (H, heads x hd);
               midlayer.mlp.{gate,up,down}_proj.weight; norm.weight; lm_head.weight (draft_vocab, H);
               d2t (draft_vocab,) int: draft id i is target id i + d2t[i]; t2d (vocab,) bool: the target
               ids the draft vocabulary holds; embed_tokens.weight (vocab, H) only in some checkpoints
               (else the head embeds with the target's table).

One step at position p reads the embedding of token p + 1 and a hidden state h_p: the target's fused
states through fc for positions the target has computed, else (for the head's own later drafts) the
head's previous pre-norm output. Its residual stream is h_p (hidden_norm(h_p) with
norm_before_residual); the output before the final norm is the next step's hidden state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from infire_jax.config import ConfigError, rope_scaling_of, rope_theta_of
from infire_jax.flax_nnx import nnx
from infire_jax.models import layers
from infire_jax.models.attention import gqa_attention
from infire_jax.models.llama import gqa_project
from infire_jax.sharding import constrain

__all__ = ["Eagle3Config", "eagle3_config", "Eagle3Head", "hf_tensor_map", "default_aux_layers"]


@dataclasses.dataclass(frozen=True)
class Eagle3Config:
    """An EAGLE-3 head's config.json (module doc)."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int  # the target's vocabulary (embedding rows, t2d)
    draft_vocab_size: int
    target_hidden_size: int
    aux_layers: tuple[int, ...] | None  # target layer ids read (None: the default for the target's depth)
    norm_before_residual: bool = False
    rope_scaling: tuple[tuple[str, Any], ...] | None = None

    @property
    def rope(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())


def default_aux_layers(num_layers: int) -> tuple[int, ...]:
    """The low / mid / high target layers vLLM and SGLang feed a head that names none."""
    return (2, num_layers // 2, num_layers - 3)


def eagle3_config(hf: dict, where: str = "EAGLE-3 head") -> Eagle3Config:
    """An Eagle3Config from a head's config.json dict (ConfigError naming the problem otherwise)."""

    def need(key: str) -> Any:
        if hf.get(key) is None:
            raise ConfigError(f"{where}: config.json lacks {key!r}; an EAGLE-3 head's config is a Llama config "
                              "with draft_vocab_size")
        return hf[key]

    if int(hf.get("num_hidden_layers", 1)) != 1:
        raise ConfigError(f"{where}: num_hidden_layers={hf['num_hidden_layers']}; only one-layer EAGLE-3 heads are supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError(f"{where}: attention_bias / mlp_bias heads are not supported")
    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    kv = int(hf.get("num_key_value_heads") or heads)
    if heads % kv:
        raise ConfigError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    eagle = hf.get("eagle_config") or {}
    aux = hf.get("eagle_aux_hidden_state_layer_ids") or eagle.get("eagle_aux_hidden_state_layer_ids")
    if eagle.get("use_aux_hidden_state") is False:
        raise ConfigError(f"{where}: use_aux_hidden_state=false (an EAGLE-1/2 style head); only EAGLE-3 heads are supported")
    if aux is not None and len(aux) != 3:
        raise ConfigError(f"{where}: eagle_aux_hidden_state_layer_ids={aux} must name 3 target layers")
    vocab = int(need("vocab_size"))
    return Eagle3Config(
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rms_norm_eps=float(need("rms_norm_eps")),
        rope_theta=rope_theta_of(hf),
        rope_scaling=rope_scaling_of(hf, where),
        vocab_size=vocab,
        draft_vocab_size=int(hf.get("draft_vocab_size") or vocab),
        target_hidden_size=int(hf.get("target_hidden_size") or hidden),
        aux_layers=tuple(int(i) for i in aux) if aux is not None else None,
        norm_before_residual=bool(hf.get("norm_before_residual", False)),
    )


def _param(shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: Any) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)


class Eagle3Head(nnx.Module):
    """The head (module doc). `own_embedding`: the checkpoint ships embed_tokens (else the caller embeds
    with the target's table); kv_repeat stores each KV head that many times (tp > KV heads)."""

    kv_logical_axes = ("layers", "pages", "kv_heads", "page_pos", "head_dim")  # its one-layer page pool

    def __init__(self, cfg: Eagle3Config, *, own_embedding: bool, kv_repeat: int = 1,
                 param_dtype: Any = jnp.float32, compute_dtype: Any = jnp.float32):
        self.cfg, self.compute_dtype = cfg, compute_dtype
        self.kv_heads = cfg.num_kv_heads * kv_repeat
        h, d, t, f = cfg.num_heads, cfg.hidden_size, cfg.target_hidden_size, cfg.intermediate_size
        kv, hd, g = self.kv_heads, cfg.head_dim, cfg.num_heads // self.kv_heads
        p = lambda shape, axes: _param(shape, axes, param_dtype)  # noqa: E731
        self.own_embedding = own_embedding
        if own_embedding:
            self.embed = p((cfg.vocab_size, d), ("vocab", "embed"))
        self.fc = p((d, 3 * t), ("embed", None))
        self.input_norm = p((d,), ("norm",))
        self.hidden_norm = p((d,), ("norm",))
        self.mlp_norm = p((d,), ("norm",))
        self.final_norm = p((d,), ("norm",))
        # q, k and v fused per KV head as in llama.gqa_params, over the 2 H input [embedding, hidden]
        self.wqkv = p((kv, g + 2, hd, 2 * d), ("kv_heads", "fused", "head_dim", None))
        self.wo = p((d, h, hd), ("embed", "heads", "head_dim"))
        self.w_gate_up = p((2, f, d), ("fused", "mlp", "embed"))
        self.w_down = p((d, f), ("embed", "mlp"))
        self.lm_head = p((cfg.draft_vocab_size, d), ("vocab", "embed"))
        self.d2t = nnx.Param(jnp.zeros((cfg.draft_vocab_size,), jnp.int32), logical_axes=(None,))  # target id of each draft id
        self.inv_freq, self.rope_scale = layers.rope_setup(hd, cfg)

    def kv_shape(self, num_pages: int, page_size: int) -> tuple[int, ...]:
        return (1, num_pages, self.kv_heads, page_size, self.cfg.head_dim)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Its own embedding of target token ids (only with own_embedding)."""
        return constrain(layers.embed_lookup(self.embed[...], tokens, self.compute_dtype), ("batch", "seq", "embed"))

    def fuse(self, aux: jax.Array) -> jax.Array:
        """The target's low / mid / high hidden states (..., 3 T) -> the head's hidden (..., H)."""
        return layers.dense(aux.astype(self.compute_dtype), self.fc[...], "...i,di->...d")

    def __call__(self, embeds: jax.Array, hidden: jax.Array, start: jax.Array, k_cache: Any = None, v_cache: Any = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """embeds, hidden (B, T, H) at positions start[b] + t -> the pre-norm outputs (B, T, H) (the next
        step's hidden) and the new K/V (B, KV, T, hd). k_cache / v_cache: the rows' earlier positions."""
        c = self.cfg
        eps = c.rms_norm_eps
        e = layers.rms_norm(embeds, self.input_norm[...], eps)
        normed = layers.rms_norm(hidden, self.hidden_norm[...], eps)
        residual = normed if c.norm_before_residual else hidden
        q, k, v = gqa_project({"wqkv": self.wqkv[...]}, jnp.concatenate([e, normed], axis=-1))
        positions = start[:, None] + jnp.arange(embeds.shape[1])[None, :]
        cos, sin = layers.rope_tables(positions, self.inv_freq, self.rope_scale, self.compute_dtype)
        q = layers.apply_rope(q, cos, sin) * (c.head_dim**-0.5)
        k = layers.apply_rope(k, cos, sin)
        attn = constrain(gqa_attention(q, k, v, start, k_cache, v_cache), ("batch", "seq", "heads", "head_dim"))
        x = residual + constrain(layers.dense(attn, self.wo[...], "btkh,dkh->btd"), ("batch", "seq", "embed"))
        h = layers.rms_norm(x, self.mlp_norm[...], eps)
        x = x + constrain(layers.gated_mlp(h, self.w_gate_up[...], self.w_down[...]), ("batch", "seq", "embed"))
        return x, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def draft_logits(self, prenorm: jax.Array) -> jax.Array:
        """Logits over the draft vocabulary (..., draft_vocab)."""
        out = layers.dense(layers.rms_norm(prenorm, self.final_norm[...], self.cfg.rms_norm_eps), self.lm_head[...],
                           "...d,vd->...v")
        return constrain(out, ("batch", "seq", "vocab")[-out.ndim:])

    def greedy(self, prenorm: jax.Array) -> jax.Array:
        """The target token id of the head's argmax draft token."""
        return self.d2t[...][jnp.argmax(self.draft_logits(prenorm).astype(jnp.float32), axis=-1)]


def hf_tensor_map(cfg: Eagle3Config, *, own_embedding: bool, kv_repeat: int = 1) -> dict[str, tuple]:
    """Checkpoint name -> (parameter path, index, HF shape[, transform]) as models/llama.py's maps (the
    loader reshapes each tensor into the indexed part). d2t is read by the caller (an int tensor of offsets)."""
    h, kv, hd, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    f, g = cfg.intermediate_size, cfg.num_heads // (cfg.num_kv_heads * kv_repeat)
    rep = (lambda a: np.repeat(a.reshape(kv, -1, *a.shape[1:]), kv_repeat, axis=0)) if kv_repeat > 1 else None
    every, m = slice(None), "midlayer."
    out = {
        "fc.weight": (("fc",), (), (d, 3 * cfg.target_hidden_size)),
        m + "input_layernorm.weight": (("input_norm",), (), (d,)),
        m + "hidden_norm.weight": (("hidden_norm",), (), (d,)),
        m + "post_attention_layernorm.weight": (("mlp_norm",), (), (d,)),
        "norm.weight": (("final_norm",), (), (d,)),
        m + "self_attn.q_proj.weight": (("wqkv",), (every, slice(0, g)), (h * hd, 2 * d)),
        m + "self_attn.k_proj.weight": (("wqkv",), (every, g), (kv * hd, 2 * d), rep),
        m + "self_attn.v_proj.weight": (("wqkv",), (every, g + 1), (kv * hd, 2 * d), rep),
        m + "self_attn.o_proj.weight": (("wo",), (), (d, h * hd)),
        m + "mlp.gate_proj.weight": (("w_gate_up",), (0,), (f, d)),
        m + "mlp.up_proj.weight": (("w_gate_up",), (1,), (f, d)),
        m + "mlp.down_proj.weight": (("w_down",), (), (d, f)),
        "lm_head.weight": (("lm_head",), (), (cfg.draft_vocab_size, d)),
    }
    if own_embedding:
        out["embed_tokens.weight"] = (("embed",), (), (cfg.vocab_size, d))
    return out
