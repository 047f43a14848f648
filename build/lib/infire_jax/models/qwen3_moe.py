"""Qwen3-MoE (HF Qwen3MoeForCausalLM): Qwen3 attention (GQA, q/k RMSNorm, rope) and softmax top-k
routed experts without a shared expert. Layers in `mlp_only_layers`, or off the `decoder_sparse_step`
grid, keep a dense SwiGLU (their own stack; see moe.py on the per-kind stacks).

Mixtral (MixtralForCausalLM) is this family too: the same router (softmax, top-k, renormalised) and
experts, no q/k norms, every layer sparse; only its HF tensor names differ (MOE_TENSOR_NAMES)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from infire_jax.config import ModelConfig
from infire_jax.models import layers, moe
from infire_jax.models.attention import gqa_attention
from infire_jax.models.llama import gqa_project, gqa_tensor_map, head_tensor_map, layer_norms_tensor_map
from infire_jax.sharding import constrain

__all__ = ["Qwen3Moe", "hf_tensor_map", "gqa_block"]


def gqa_block(cfg: ModelConfig, w: dict, x: jax.Array, start, cos, sin, k_cache, v_cache):
    """Pre-norm GQA attention with its residual: (x, (k_new, v_new) as (B, KV, T, hd))."""
    h = layers.rms_norm(x, w["attn_norm"], cfg.rms_norm_eps)
    q, k, v = gqa_project(w, h)
    if cfg.qk_norm:
        q = layers.rms_norm(q, w["q_norm"], cfg.rms_norm_eps)
        k = layers.rms_norm(k, w["k_norm"], cfg.rms_norm_eps)
    q = layers.apply_rope(q, cos, sin) * (cfg.head_dim**-0.5)
    k = layers.apply_rope(k, cos, sin)
    attn = constrain(gqa_attention(q, k, v, start, k_cache, v_cache), ("batch", "seq", "heads", "head_dim"))
    out = layers.dense(attn, w["wo"], "btkh,dkh->btd", w.get("bo"))
    return x + constrain(out, ("batch", "seq", "embed")), (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))


def dense_ffn_params(p, n: int, f: int, d: int, prefix: str = "") -> dict[str, Any]:
    return {
        prefix + "w_gate_up": p((n, 2, f, d), ("layers", "fused", "mlp", "embed")),
        prefix + "w_down": p((n, d, f), ("layers", "embed", "mlp")),
    }


def dense_ffn_tensor_map(pre: str, path: str, prefix: str, i: int, f: int, d: int) -> dict:
    return {
        pre + "gate_proj.weight": ((path, prefix + "w_gate_up"), (i, 0), (f, d)),
        pre + "up_proj.weight": ((path, prefix + "w_gate_up"), (i, 1), (f, d)),
        pre + "down_proj.weight": ((path, prefix + "w_down"), (i,), (d, f)),
    }


def expert_tensor_map(
    pre: str, i: int, num_experts: int, f: int, d: int, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
) -> dict:
    """Per-expert HF Linear tensors `{pre}{e}.gate_proj.weight` ... -> the moe stack (out-major);
    `names` are the (gate, up, down) module names."""
    gate, up, down = names
    out = {}
    for e in range(num_experts):
        out |= {
            f"{pre}{e}.{gate}.weight": (("moe", "w_gate_up"), (i, e, 0), (f, d)),
            f"{pre}{e}.{up}.weight": (("moe", "w_gate_up"), (i, e, 1), (f, d)),
            f"{pre}{e}.{down}.weight": (("moe", "w_down"), (i, e), (d, f)),
        }
    return out


# HF module names of a sparse block: (block, router, (expert gate, up, down)), by config `moe_tensor_names`.
MOE_TENSOR_NAMES = {
    "qwen3_moe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": ("block_sparse_moe", "gate", ("w1", "w3", "w2")),
}


class Qwen3Moe(moe.MoEDecoder):
    """Qwen3-MoE decoder."""

    @staticmethod
    def ffn_kinds(cfg: ModelConfig) -> tuple[str, ...]:
        return qwen3_moe_kinds(cfg)

    def __init__(self, cfg: ModelConfig, **kwargs):
        super().__init__(cfg, **kwargs)
        self.inv_freq, self.rope_scale = layers.rope_setup(cfg.head_dim, cfg)

    def _ffn_params(self, kind, p, n):
        c, d = self.cfg, self.cfg.hidden_size
        if kind == "dense":
            return dense_ffn_params(p, n, c.intermediate_size, d)
        e, f = c.get("num_experts"), c.get("moe_intermediate_size")
        gu_axes, d_axes = moe.expert_axes(in_major=False)
        return dict(
            router=p((n, e, d), ("layers", None, "embed")),
            w_gate_up=p((n, e, 2, f, d), ("layers",) + gu_axes),
            w_down=p((n, e, d, f), ("layers",) + d_axes),
        )

    def context(self, start: jax.Array, t: int) -> dict[str, jax.Array]:
        positions = start[:, None] + jnp.arange(t)[None, :]
        cos, sin = layers.rope_tables(positions, self.inv_freq, self.rope_scale, self.compute_dtype)
        return dict(start=start, cos=cos, sin=sin)

    def _attention(self, w, x, ctx, kc, vc, flags):
        return gqa_block(self.cfg, w, x, ctx["start"], ctx["cos"], ctx["sin"], kc, vc)

    def _ffn(self, kind, w, h):
        if kind == "dense":
            return layers.gated_mlp(h, w["w_gate_up"], w["w_down"])
        c = self.cfg
        b, t, d = h.shape
        x = h.reshape(b * t, d)
        logits = layers.dense(x, w["router"], "nd,ed->ne")
        weights, idx = moe.softmax_topk(logits, c.get("num_experts_per_tok"), c.get("norm_topk_prob"))
        gu_axes, d_axes = moe.expert_axes(in_major=False)
        y = moe.routed_experts(
            x, weights, idx, w["w_gate_up"], w["w_down"], gate_up_axes=gu_axes, down_axes=d_axes
        )
        return y.reshape(b, t, d)


def qwen3_moe_kinds(cfg: ModelConfig) -> tuple[str, ...]:
    step, only = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers", ()))
    has_experts = cfg.get("num_experts", 0) > 0
    return tuple(
        "moe" if (i not in only and has_experts and (i + 1) % step == 0) else "dense" for i in range(cfg.num_layers)
    )


def hf_tensor_map(cfg: ModelConfig, layer_slots: tuple[int, ...], stages: int | None = None) -> dict:
    c, d = cfg, cfg.hidden_size
    plan = moe.SlotPlan.for_model(qwen3_moe_kinds(cfg), layer_slots, stages=stages)
    out = head_tensor_map(c)
    e, f = c.get("num_experts"), c.get("moe_intermediate_size")
    block, router, expert_names = MOE_TENSOR_NAMES[c.get("moe_tensor_names", "qwen3_moe")]
    for i, s in enumerate(layer_slots):
        pre = f"model.layers.{i}."
        out |= layer_norms_tensor_map(pre, s, d) | gqa_tensor_map(c, pre, s)
        j = plan.position(s)
        if moe.KINDS[plan.slot_kind[s]] == "dense":
            out |= dense_ffn_tensor_map(pre + "mlp.", "dense", "", j, c.intermediate_size, d)
        else:
            out[f"{pre}{block}.{router}.weight"] = (("moe", "router"), (j,), (e, d))
            out |= expert_tensor_map(f"{pre}{block}.experts.", j, e, f, d, expert_names)
    return out

