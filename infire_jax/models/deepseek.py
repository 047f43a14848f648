"""DeepSeek-V3 / Kimi K2 text backbone (HF DeepseekV3ForCausalLM): multi-head latent attention (MLA)
and sigmoid-routed, group-limited experts with shared experts.

MLA (transformers DeepseekV3Attention):
  q      = W_qb · rms(W_qa · x)            (or W_q · x without q_lora_rank), per head [nope | rope]
  c, k_r = W_kva · x  split [kv_lora_rank | qk_rope_head_dim];  c = rms(c);  k_r = rope(k_r) (one head)
  k_h    = [W_UK_h · c | k_r],  v_h = W_UV_h · c        (W_UK, W_UV: the two halves of kv_b_proj)
  score  = q_h · k_h * qk_head_dim^-0.5 * mscale^2      (YaRN mscale_all_dim, as transformers)

The cache holds the latent c (kv_lora_rank values per token) as "k" and the roped k_r as "v": the pair
(L, B, 1, S, kv_lora_rank) / (L, B, 1, S, qk_rope_head_dim). Decode never expands it: the query is
absorbed into latent space (q_lat_h = W_UK_h^T · q_nope_h; score = q_lat · c + q_rope · k_r) and the
attention output stays latent until W_UV_h is applied per head (o_h = W_UV_h · sum_s p_s c_s).
Prefill without a cache uses the expanded form (per-head keys/values of the new tokens only), which
costs fewer FLOPs for long prompts; both forms are one function (`mla_attention`, absorb=...).

The two lora RMSNorms use eps 1e-6 whatever rms_norm_eps is (transformers builds them with the
default). Layers < first_k_dense_replace have a dense SwiGLU; the others route (see moe.py).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

import jax
import jax.numpy as jnp

from infire_jax.config import ModelConfig
from infire_jax.kernels import dispatch
from infire_jax.kv.paged import PagedLayerCache
from infire_jax.models import layers, moe
from infire_jax.models.llama import head_tensor_map, layer_norms_tensor_map
from infire_jax.models.qwen3_moe import dense_ffn_params, dense_ffn_tensor_map, expert_tensor_map
from infire_jax.sharding import constrain

__all__ = ["DeepseekV3", "hf_tensor_map", "mla_attention", "softmax_scale"]

_NEG = -1e30
_LORA_EPS = 1e-6


def softmax_scale(cfg: ModelConfig) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (transformers yarn_apply_mscale)."""
    scale = (cfg.get("qk_nope_head_dim") + cfg.get("qk_rope_head_dim")) ** -0.5
    rope = cfg.rope
    if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
        factor = float(rope["factor"])
        m = 1.0 if factor <= 1 else 0.1 * float(rope["mscale_all_dim"]) * math.log(factor) + 1.0
        scale *= m * m
    return scale


def mla_attention(
    q_nope: jax.Array,  # (B, T, H, nope)
    q_rope: jax.Array,  # (B, T, H, rope), rotated
    c_new: jax.Array,  # (B, T, r) normed latent of the new tokens
    kr_new: jax.Array,  # (B, T, rope) rotated shared rope key
    w_uk: Any,  # (H, nope, r)
    w_uv: Any,  # (H, v, r)
    start: jax.Array,  # (B,) cache entries before the new tokens
    scale: float,
    c_cache: jax.Array | PagedLayerCache | None = None,  # (B, S, r), or pages (L, pages, 1, page, r)
    kr_cache: jax.Array | PagedLayerCache | None = None,  # (B, S, rope), or pages (L, pages, 1, page, rope)
    *,
    absorb: bool | None = None,  # None: absorbed with a cache, expanded without
) -> jax.Array:
    """Attention output per head, (B, T, H, v). A paged cache is read in place where the kernel
    dispatch has a kernel for the absorbed form, else gathered."""
    absorb = (c_cache is not None) if absorb is None else absorb
    paged = isinstance(c_cache, PagedLayerCache)
    gathered = lambda: (c_cache.gather()[:, 0], kr_cache.gather()[:, 0])  # noqa: E731  (B, S, r), (B, S, rope)
    if absorb:
        if paged:
            o_lat = dispatch.paged_latent_attention(
                layers.dense(q_nope, w_uk, "bthk,hkr->bthr"), q_rope, c_new, kr_new, c_cache, kr_cache, start, scale,
                xla=lambda: _absorbed(q_nope, w_uk, q_rope, c_new, kr_new, start, scale, *gathered()),
            )
        else:
            o_lat = _absorbed(q_nope, w_uk, q_rope, c_new, kr_new, start, scale, c_cache, kr_cache)
        return layers.dense(o_lat, w_uv, "bthr,hvr->bthv")
    if paged:
        c_cache, kr_cache = gathered()
    t = q_nope.shape[1]
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]  # (T, T)
    if c_cache is not None:
        visible = jnp.arange(c_cache.shape[1])[None, :] < start[:, None]  # (B, S)
    # Expanded: per-head keys and values (of the cache too, if any: the reference form for tests).
    c_all = c_new if c_cache is None else jnp.concatenate([c_cache, c_new], axis=1)
    kr_all = kr_new if kr_cache is None else jnp.concatenate([kr_cache, kr_new], axis=1)
    k_nope = layers.dense(c_all, w_uk, "bsr,hkr->bshk")
    v = layers.dense(c_all, w_uv, "bsr,hvr->bshv")
    s = jnp.einsum("bthk,bshk->bhts", q_nope, k_nope) + jnp.einsum("bthk,bsk->bhts", q_rope, kr_all)
    mask = causal[None]
    if c_cache is not None:
        mask = jnp.concatenate([jnp.broadcast_to(visible[:, None, :], visible.shape[:1] + (t, visible.shape[1])),
                                jnp.broadcast_to(causal, (visible.shape[0], t, t))], axis=-1)
    probs = jax.nn.softmax(jnp.where(mask[:, None], s * scale, _NEG), axis=-1)
    return jnp.einsum("bhts,bshv->bthv", probs, v)


def _absorbed(q_nope, w_uk, q_rope, c_new, kr_new, start, scale, c_cache, kr_cache) -> jax.Array:
    """XLA's absorbed attention in latent space (B, T, H, r) over an optional contiguous cache."""
    t = q_nope.shape[1]
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]  # (T, T)
    if c_cache is not None:
        visible = jnp.arange(c_cache.shape[1])[None, :] < start[:, None]  # (B, S)
    q_lat = layers.dense(q_nope, w_uk, "bthk,hkr->bthr")
    s_new = jnp.einsum("bthr,bsr->bhts", q_lat, c_new) + jnp.einsum("bthk,bsk->bhts", q_rope, kr_new)
    scores = [jnp.where(causal, s_new * scale, _NEG)]
    if c_cache is not None:
        s_c = jnp.einsum("bthr,bsr->bhts", q_lat, c_cache) + jnp.einsum("bthk,bsk->bhts", q_rope, kr_cache)
        scores.insert(0, jnp.where(visible[:, None, None, :], s_c * scale, _NEG))
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
    values = c_new if c_cache is None else jnp.concatenate([c_cache, c_new], axis=1)
    return jnp.einsum("bhts,bsr->bthr", probs, values)


def deepseek_kinds(cfg: ModelConfig) -> tuple[str, ...]:
    first = cfg.get("first_k_dense_replace", 0)
    has_experts = cfg.get("n_routed_experts", 0) > 0
    return tuple("moe" if (has_experts and i >= first) else "dense" for i in range(cfg.num_layers))


class DeepseekV3(moe.MoEDecoder):
    """DeepSeek-V3 / Kimi K2 decoder (MLA + MoE)."""

    # k = latent (one "head"), v = rope key: (layers, batch, 1, seq, kv_lora_rank / qk_rope_head_dim)
    kv_logical_axes = ("layers", "batch", None, "cache_seq", "latent")
    absorb: bool | None = None  # None: absorbed decode, expanded prefill (tests may force either)

    @staticmethod
    def ffn_kinds(cfg: ModelConfig) -> tuple[str, ...]:
        return deepseek_kinds(cfg)

    def __init__(self, cfg: ModelConfig, **kwargs):
        super().__init__(cfg, **kwargs)
        rope = cfg.get("qk_rope_head_dim")
        self.inv_freq, self.rope_scale = layers.rope_setup(rope, cfg)
        self.scale = softmax_scale(cfg)

    def _attn_params(self, p, n):
        c = self.cfg
        h, d = c.num_heads, c.hidden_size
        nope, rope, vd = c.get("qk_nope_head_dim"), c.get("qk_rope_head_dim"), c.get("v_head_dim")
        r, qr = c.get("kv_lora_rank"), c.get("q_lora_rank")
        out = dict(
            wkv_a=p((n, r + rope, d), ("layers", "latent", "embed")),
            kv_a_norm=p((n, r), ("layers", "latent")),
            wkv_b=p((n, h, nope + vd, r), ("layers", "heads", "head_dim", "latent")),
            wo=p((n, d, h, vd), ("layers", "embed", "heads", "head_dim")),
        )
        if qr:
            out |= dict(
                wq_a=p((n, qr, d), ("layers", "q_lora", "embed")),
                q_a_norm=p((n, qr), ("layers", "q_lora")),
                wq_b=p((n, h, nope + rope, qr), ("layers", "heads", "head_dim", "q_lora")),
            )
        else:
            out["wq"] = p((n, h, nope + rope, d), ("layers", "heads", "head_dim", "embed"))
        return out

    def _ffn_params(self, kind, p, n):
        c, d = self.cfg, self.cfg.hidden_size
        if kind == "dense":
            return dense_ffn_params(p, n, c.intermediate_size, d)
        e, f = c.get("n_routed_experts"), c.get("moe_intermediate_size")
        shared = f * c.get("n_shared_experts", 0)
        gu_axes, d_axes = moe.expert_axes(in_major=False)
        out = dict(
            router=p((n, e, d), ("layers", None, "embed")),
            # transformers keeps the correction bias in float32 (it decides expert choice)
            router_bias=moe._param((n, e), ("layers", None), jnp.float32),
        )
        group = c.get("expert_int4_group")
        if group:  # packed int4 words + bf16 group scales (+ the checkpoint's weight_shape, [out, in])
            q = lambda shape, axes, dtype: moe._param(shape, axes, dtype)  # noqa: E731
            out |= dict(
                w_gate_up_packed=q((n, e, 2, f, d // 8), ("layers",) + gu_axes, jnp.int32),
                w_gate_up_scale=q((n, e, 2, f, d // group), ("layers",) + gu_axes, jnp.bfloat16),
                w_gate_up_shape=q((n, e, 2, 2), ("layers", "experts", "fused", None), jnp.int32),
                w_down_packed=q((n, e, d, f // 8), ("layers",) + d_axes, jnp.int32),
                w_down_scale=q((n, e, d, f // group), ("layers",) + d_axes, jnp.bfloat16),
                w_down_shape=q((n, e, 2), ("layers", "experts", None), jnp.int32),
            )
        else:
            out |= dict(
                w_gate_up=p((n, e, 2, f, d), ("layers",) + gu_axes),
                w_down=p((n, e, d, f), ("layers",) + d_axes),
            )
        if shared:
            out |= dense_ffn_params(p, n, shared, d, prefix="shared_")
        return out

    def kv_shapes(self, batch: int, seq: int):
        c, n = self.cfg, len(self.active)
        return (n, batch, 1, seq, c.get("kv_lora_rank")), (n, batch, 1, seq, c.get("qk_rope_head_dim"))

    def context(self, start: jax.Array, t: int) -> dict[str, jax.Array]:
        positions = start[:, None] + jnp.arange(t)[None, :]
        if self.cfg.get("rope_interleave", True):
            cos, sin = moe.rope_half_tables(positions, self.inv_freq, self.rope_scale, self.compute_dtype)
        else:
            cos, sin = layers.rope_tables(positions, self.inv_freq, self.rope_scale, self.compute_dtype)
        return dict(start=start, cos=cos, sin=sin)

    def _rope(self, x, cos, sin):
        if self.cfg.get("rope_interleave", True):
            return moe.rope_interleaved(x, cos, sin)
        return layers.apply_rope(x, cos, sin)

    def _attention(self, w, x, ctx, kc, vc, flags):
        c = self.cfg
        nope, r = c.get("qk_nope_head_dim"), c.get("kv_lora_rank")
        h = layers.rms_norm(x, w["attn_norm"], c.rms_norm_eps)
        if "wq_a" in w:
            q_lat = layers.rms_norm(layers.dense(h, w["wq_a"], "btd,qd->btq"), w["q_a_norm"], _LORA_EPS)
            q = layers.dense(q_lat, w["wq_b"], "btq,hkq->bthk")
        else:
            q = layers.dense(h, w["wq"], "btd,hkd->bthk")
        q = constrain(q, ("batch", "seq", "heads", "head_dim"))
        kv = layers.dense(h, w["wkv_a"], "btd,rd->btr")
        latent = layers.rms_norm(kv[..., :r], w["kv_a_norm"], _LORA_EPS)
        cos, sin = ctx["cos"], ctx["sin"]
        q_rope = self._rope(q[..., nope:], cos, sin)
        k_rope = self._rope(kv[..., None, r:], cos, sin)[:, :, 0]
        wkv_b = layers.materialize(w["wkv_b"], x.dtype)  # in the compute dtype (decoded if compressed): sliced below
        out = mla_attention(
            q[..., :nope], q_rope, latent, k_rope, wkv_b[:, :nope], wkv_b[:, nope:], ctx["start"], self.scale,
            *((kc, vc) if kc is None or isinstance(kc, PagedLayerCache) else (kc[:, 0], vc[:, 0])), absorb=self.absorb,
        )
        out = constrain(out, ("batch", "seq", "heads", "head_dim"))
        y = constrain(layers.dense(out, w["wo"], "bthv,dhv->btd"), ("batch", "seq", "embed"))
        return x + y, (latent[:, None], k_rope[:, None])

    def _ffn(self, kind, w, h):
        if kind == "dense":
            return layers.gated_mlp(h, w["w_gate_up"], w["w_down"])
        c = self.cfg
        b, t, d = h.shape
        x = h.reshape(b * t, d)
        logits = layers.dense(x.astype(jnp.float32), w["router"], "nd,ed->ne")
        weights, idx = moe.sigmoid_group_topk(
            logits, w["router_bias"], c.get("num_experts_per_tok"), c.get("n_group", 1) or 1,
            c.get("topk_group", 1) or 1, c.get("norm_topk_prob", True), c.get("routed_scaling_factor", 1.0),
        )
        gu_axes, d_axes = moe.expert_axes(in_major=False)
        if "w_gate_up_packed" in w:
            w_gate_up = moe.PackedInt4(w["w_gate_up_packed"], w["w_gate_up_scale"])
            w_down = moe.PackedInt4(w["w_down_packed"], w["w_down_scale"])
        else:
            w_gate_up, w_down = w["w_gate_up"], w["w_down"]
        y = moe.routed_experts(x, weights, idx, w_gate_up, w_down, gate_up_axes=gu_axes, down_axes=d_axes)
        y = y.reshape(b, t, d)
        if "shared_w_gate_up" in w:
            y = y + layers.gated_mlp(h, w["shared_w_gate_up"], w["shared_w_down"])
        return y


def hf_tensor_map(cfg: ModelConfig, layer_slots: tuple[int, ...], stages: int | None = None) -> dict:
    c, d = cfg, cfg.hidden_size
    h = c.num_heads
    nope, rope, vd = c.get("qk_nope_head_dim"), c.get("qk_rope_head_dim"), c.get("v_head_dim")
    r, qr = c.get("kv_lora_rank"), c.get("q_lora_rank")
    e, f = c.get("n_routed_experts"), c.get("moe_intermediate_size")
    shared = f * c.get("n_shared_experts", 0) if f else 0
    plan = moe.SlotPlan.for_model(deepseek_kinds(cfg), layer_slots, stages=stages)
    out = head_tensor_map(c)
    for i, s in enumerate(layer_slots):
        pre = f"model.layers.{i}."
        a = pre + "self_attn."
        out |= layer_norms_tensor_map(pre, s, d)
        out |= {
            a + "kv_a_proj_with_mqa.weight": (("layers", "wkv_a"), (s,), (r + rope, d)),
            a + "kv_a_layernorm.weight": (("layers", "kv_a_norm"), (s,), (r,)),
            a + "kv_b_proj.weight": (("layers", "wkv_b"), (s,), (h * (nope + vd), r)),
            a + "o_proj.weight": (("layers", "wo"), (s,), (d, h * vd)),
        }
        if qr:
            out |= {
                a + "q_a_proj.weight": (("layers", "wq_a"), (s,), (qr, d)),
                a + "q_a_layernorm.weight": (("layers", "q_a_norm"), (s,), (qr,)),
                a + "q_b_proj.weight": (("layers", "wq_b"), (s,), (h * (nope + rope), qr)),
            }
        else:
            out[a + "q_proj.weight"] = (("layers", "wq"), (s,), (h * (nope + rope), d))
        j = plan.position(s)
        if moe.KINDS[plan.slot_kind[s]] == "dense":
            out |= dense_ffn_tensor_map(pre + "mlp.", "dense", "", j, c.intermediate_size, d)
            continue
        out |= {
            pre + "mlp.gate.weight": (("moe", "router"), (j,), (e, d)),
            pre + "mlp.gate.e_score_correction_bias": (("moe", "router_bias"), (j,), (e,)),
        }
        group = c.get("expert_int4_group")
        if group:
            out |= int4_expert_tensor_map(pre + "mlp.experts.", j, e, f, d, group)
        else:
            out |= expert_tensor_map(pre + "mlp.experts.", j, e, f, d)
        if shared:
            out |= dense_ffn_tensor_map(pre + "mlp.shared_experts.", "moe", "shared_", j, shared, d)
    return out


def int4_expert_tensor_map(pre: str, i: int, num_experts: int, f: int, d: int, group: int) -> dict:
    """compressed-tensors pack-quantized expert tensors -> the packed moe stack."""
    out = {}
    for e in range(num_experts):
        for name, index, (rows, cols) in (("gate_proj", (i, e, 0), (f, d)), ("up_proj", (i, e, 1), (f, d)),
                                          ("down_proj", (i, e), (d, f))):
            target = "w_down" if name == "down_proj" else "w_gate_up"
            out |= {
                f"{pre}{e}.{name}.weight_packed": (("moe", target + "_packed"), index, (rows, cols // 8)),
                f"{pre}{e}.{name}.weight_scale": (("moe", target + "_scale"), index, (rows, cols // group)),
                f"{pre}{e}.{name}.weight_shape": (("moe", target + "_shape"), index, (2,)),
            }
    return out


INT4_IGNORE = ["lm_head", "re:.*self_attn\\..*", "re:.*shared_experts\\..*", "re:.*\\.mlp\\.(gate|up|down)_proj$"]


def write_int4_experts(src: str, dst: str, group_size: int = 32) -> None:
    """Write the checkpoint in `src` (HF DeepseekV3 safetensors) to `dst` with its routed experts in
    compressed-tensors pack-quantized int4 (symmetric, group `group_size` along the input dim, bf16
    scales) and everything else unchanged, plus the matching quantization_config (the K2.5 format)."""
    import json
    import pathlib
    import re
    import shutil

    from safetensors import safe_open
    from safetensors.numpy import save_file

    src, dst = pathlib.Path(src), pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    expert = re.compile(r".*\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
    tensors = {}
    for path in sorted(src.glob("*.safetensors")):
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                a = f.get_tensor(name)
                if expert.match(name):
                    packed, scale = moe.int4_quantize(a.astype(np.float32), group_size)
                    base = name[: -len("weight")]
                    tensors |= {base + "weight_packed": packed, base + "weight_scale": scale,
                                base + "weight_shape": np.asarray(a.shape, np.int64)}
                else:
                    tensors[name] = a
    save_file(tensors, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                            "group_size": group_size, "dynamic": False, "observer": "minmax"},
                "input_activations": None,
                "output_activations": None,
            }
        },
        "ignore": INT4_IGNORE,
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / extra).is_file():
            shutil.copy(src / extra, dst / extra)
