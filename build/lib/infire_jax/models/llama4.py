"""Llama 4 text backbone (HF Llama4ForCausalLM, model_type llama4_text), e.g. Scout / Maverick.

Attention (transformers Llama4TextAttention), per layer:
  RoPE layers (no_rope_layers[i] == 1): complex ("interleaved pairs") rope on q and k, then, with
      use_qk_norm, a weightless RMS ("L2") norm of q and k (eps rms_norm_eps); these layers are
      "chunked_attention": a query sees only keys in its own attention_chunk_size block of positions.
  NoPE layers (no_rope_layers[i] == 0): no rope; with attn_temperature_tuning the query is scaled by
      1 + attn_scale * log1p(floor((pos + 1) / floor_scale)); global causal attention.
  (layer_types from config.json decides chunked vs global; it defaults to the rule above.)
Per-layer differences are static flags turned into per-slot arrays, so every layer shares one scan:
the elementwise parts are selected with jnp.where, and the chunk size is a per-layer array (global
layers get one no position reaches), so both patterns are one attention.

Feed-forward: layers in `moe_layers` route each token to top-k experts by sigmoid(router logit); the
routing weight scales the expert's *input*, and a shared expert (same size) is added. The fused
expert tensors are stored as HF writes them ("in-major": gate_up_proj [E, D, 2F], down_proj [E, F, D]),
reshaped, never transposed. Other layers have a dense SwiGLU of intermediate_size_mlp.

KV cache: two cache groups (kv/cache.py CacheGroups, `cache_groups()`): the global layers keep every
position in the engine's paged cache (their pages grow with the sequence); the chunked layers keep a
ring of attention_chunk_size positions per request (position p at ring slot p mod chunk, in pages of a
second pool whose size does not depend on the context), so long contexts cost only the global layers.
Decode reads each layer's own group through attention.grouped_attention; the prefill -> decode
handoff sends the chunked layers' last partial chunk only. Prefill and full-sequence forward
(no cache) are one attention with a per-layer window, as above.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from infire_jax.config import ModelConfig
from infire_jax.models import layers, moe
from infire_jax.kv.cache import CacheGroups
from infire_jax.models.attention import gqa_attention, grouped_attention
from infire_jax.models.llama import gqa_project, gqa_tensor_map, head_tensor_map, layer_norms_tensor_map
from infire_jax.models.qwen3_moe import dense_ffn_params, dense_ffn_tensor_map
from infire_jax.sharding import constrain

__all__ = ["Llama4", "hf_tensor_map"]


def llama4_kinds(cfg: ModelConfig) -> tuple[str, ...]:
    return moe.moe_layer_kinds(cfg.num_layers, cfg.get("moe_layers", ()))


_GLOBAL = 1 << 30  # "chunk size" of global-attention layers


def _l2_norm(x: jax.Array, eps: float) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class Llama4(moe.MoEDecoder):
    """Llama 4 text decoder: chunked-rope / global-NoPE attention, top-k sigmoid MoE + shared expert."""

    @staticmethod
    def ffn_kinds(cfg: ModelConfig) -> tuple[str, ...]:
        return llama4_kinds(cfg)

    def __init__(self, cfg: ModelConfig, **kwargs):
        super().__init__(cfg, **kwargs)
        self.inv_freq, self.rope_scale = layers.rope_setup(cfg.head_dim, cfg)

    def slot_flags(self) -> dict[str, tuple]:
        c = self.cfg
        use_rope, chunked = [0] * len(self.active), [0] * len(self.active)
        for i, s in enumerate(self.layer_slots):
            use_rope[s] = int(c.get("no_rope_layers")[i])
            chunked[s] = int(c.get("layer_types")[i] == "chunked_attention")
        return dict(use_rope=tuple(use_rope), chunked=tuple(chunked))

    def cache_groups(self) -> CacheGroups | None:
        """Global layers: every position; chunked layers: a ring of one chunk (None without them)."""
        c = self.cfg
        chunk = c.get("attention_chunk_size")
        kinds = ["ring" if t == "chunked_attention" else "full" for t in c.get("layer_types")]
        if not chunk or "ring" not in kinds:
            return None
        names = tuple(k for k in ("full", "ring") if k in kinds)
        plan = moe.SlotPlan.build(kinds, self.layer_slots, len(self.active), self.plan.stages, kinds=names)
        return CacheGroups(tuple(chunk if k == "ring" else None for k in names), plan)

    def _ffn_params(self, kind, p, n):
        c, d = self.cfg, self.cfg.hidden_size
        if kind == "dense":
            return dense_ffn_params(p, n, c.intermediate_size, d)
        e, f = c.get("num_local_experts"), c.get("moe_intermediate_size")
        gu_axes, d_axes = moe.expert_axes(in_major=True)
        return dict(
            router=p((n, e, d), ("layers", None, "embed")),
            w_gate_up=p((n, e, d, 2, f), ("layers",) + gu_axes),
            w_down=p((n, e, f, d), ("layers",) + d_axes),
        ) | dense_ffn_params(p, n, f, d, prefix="shared_")

    def context(self, start: jax.Array, t: int) -> dict[str, jax.Array]:
        positions = start[:, None] + jnp.arange(t)[None, :]
        cos, sin = moe.rope_half_tables(positions, self.inv_freq, self.rope_scale, self.compute_dtype)
        return dict(start=start, positions=positions, cos=cos, sin=sin)

    def _attention(self, w, x, ctx, kc, vc, flags):
        c = self.cfg
        h = layers.rms_norm(x, w["attn_norm"], c.rms_norm_eps)
        q, k, v = gqa_project(w, h)
        rope = flags["use_rope"] > 0
        cos, sin = ctx["cos"], ctx["sin"]
        q = jnp.where(rope, moe.rope_interleaved(q, cos, sin), q)
        k = jnp.where(rope, moe.rope_interleaved(k, cos, sin), k)
        if c.get("use_qk_norm"):
            q = jnp.where(rope, _l2_norm(q, c.rms_norm_eps), q)
            k = jnp.where(rope, _l2_norm(k, c.rms_norm_eps), k)
        if c.get("attn_temperature_tuning"):
            pos = ctx["positions"].astype(jnp.float32)
            temp = jnp.log1p(jnp.floor((pos + 1.0) / c.get("floor_scale"))) * c.get("attn_scale") + 1.0
            q = jnp.where(rope, q, q * temp[:, :, None, None].astype(q.dtype))
        q = q * (c.head_dim**-0.5)
        if isinstance(kc, tuple):  # decode: the layer's own cache group (chunked layers: a ring)
            windows = self.cache_groups().windows
            attn = grouped_attention(q, k, v, ctx["start"], kc, vc, flags["cache_group"], flags["cache_index"], windows)
        else:  # one attention for both patterns: global layers get a window no position reaches
            window = c.get("attention_chunk_size") or _GLOBAL
            window = jnp.where(flags["chunked"] > 0, window, _GLOBAL).astype(jnp.int32)
            attn = gqa_attention(q, k, v, ctx["start"], kc, vc, window=window)
        attn = constrain(attn, ("batch", "seq", "heads", "head_dim"))
        out = constrain(layers.dense(attn, w["wo"], "btkh,dkh->btd", w.get("bo")), ("batch", "seq", "embed"))
        return x + out, (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))

    def _ffn(self, kind, w, h):
        if kind == "dense":
            return layers.gated_mlp(h, w["w_gate_up"], w["w_down"])
        c = self.cfg
        b, t, d = h.shape
        x = h.reshape(b * t, d)
        weights, idx = moe.sigmoid_topk_logits(layers.dense(x, w["router"], "nd,ed->ne"), c.get("num_experts_per_tok"))
        gu_axes, d_axes = moe.expert_axes(in_major=True)
        y = moe.routed_experts(
            x, weights, idx, w["w_gate_up"], w["w_down"], gate_up_axes=gu_axes, down_axes=d_axes,
            in_major=True, scale_input=True,
        )
        return y.reshape(b, t, d) + layers.gated_mlp(h, w["shared_w_gate_up"], w["shared_w_down"])


def hf_tensor_map(cfg: ModelConfig, layer_slots: tuple[int, ...], stages: int | None = None) -> dict:
    c, d = cfg, cfg.hidden_size
    e, f = c.get("num_local_experts"), c.get("moe_intermediate_size")
    plan = moe.SlotPlan.for_model(llama4_kinds(cfg), layer_slots, stages=stages)
    out = head_tensor_map(c)
    for i, s in enumerate(layer_slots):
        pre = f"model.layers.{i}."
        ff = pre + "feed_forward."
        out |= layer_norms_tensor_map(pre, s, d) | gqa_tensor_map(c, pre, s)
        j = plan.position(s)
        if moe.KINDS[plan.slot_kind[s]] == "dense":
            out |= dense_ffn_tensor_map(ff, "dense", "", j, c.intermediate_size, d)
            continue
        out |= {
            ff + "router.weight": (("moe", "router"), (j,), (e, d)),
            ff + "experts.gate_up_proj": (("moe", "w_gate_up"), (j,), (e, d, 2 * f)),
            ff + "experts.down_proj": (("moe", "w_down"), (j,), (e, f, d)),
        }
        out |= dense_ffn_tensor_map(ff + "shared_expert.", "moe", "shared_", j, f, d)
    return out
