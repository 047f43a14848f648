"""Dense Llama / Qwen2 / Qwen3 decoder in Flax NNX.

Every parameter declares its logical axes. Two storage forms of the layers:
- stacked (pipeline parallel): one array per weight with a leading "layers" axis of `num_slots`
  entries (sharded over pp), run by one scan; slots beyond the real layers (padding so pipeline
  stages are equal) are skipped by `lax.cond` and hold zeros.
- a list of per-layer weights (`layer_list=True`, when no mesh axis splits the layers), run by an
  unrolled loop, as jax-llm-examples does: a scan over stacked weights slices each layer's weights
  out with a copy on every step (XLA:CPU measured ~half of decode time), per-layer arrays are read
  in place.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from infire_jax.config import ModelConfig
from infire_jax.flax_nnx import nnx
from infire_jax.kv.paged import scan_layers
from infire_jax.models import layers
from infire_jax.models.attention import gqa_attention
from infire_jax.sharding import constrain

__all__ = ["Llama", "hf_tensor_map", "per_layer_tensor_map", "gqa_params", "gqa_project", "gqa_tensor_map", "head_tensor_map", "layer_norms_tensor_map"]


def _param(shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: Any) -> nnx.Param:
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)


class Llama(nnx.Module):
    """Decoder-only transformer with GQA, RMSNorm, SwiGLU and rotary embeddings."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        layer_slots: tuple[int, ...] | None = None,
        num_slots: int | None = None,
        kv_repeat: int = 1,
        layer_list: bool = False,
        param_dtype: Any = jnp.float32,
        compute_dtype: Any = jnp.float32,
    ):
        """kv_repeat > 1 stores each KV head that many times (consecutively), so that kv_heads *
        kv_repeat can be split evenly over tensor-parallel devices when kv_heads < tp: every device
        then holds (and caches) just the KV head its query heads use, instead of all of them.
        layer_list stores the layers as a list of per-layer weights (see the module docstring)."""
        self.cfg = cfg
        self.kv_heads = cfg.num_kv_heads * kv_repeat
        self.layer_slots = tuple(layer_slots or range(cfg.num_layers))
        num_slots = num_slots or max(self.layer_slots) + 1
        self.active = tuple(s in set(self.layer_slots) for s in range(num_slots))
        self.compute_dtype = compute_dtype
        v, d, f = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size
        kv, hd, n = self.kv_heads, cfg.head_dim, num_slots
        p = lambda shape, axes: _param(shape, axes, param_dtype)  # noqa: E731

        self.embed = p((v, d), ("vocab", "embed"))
        self.final_norm = p((d,), ("norm",))
        if not cfg.tie_word_embeddings:
            self.lm_head = p((v, d), ("vocab", "embed"))

        def layer_params(p):
            return dict(
                attn_norm=p((n, d), ("layers", "norm")),
                mlp_norm=p((n, d), ("layers", "norm")),
                w_gate_up=p((n, 2, f, d), ("layers", "fused", "mlp", "embed")),
                w_down=p((n, d, f), ("layers", "embed", "mlp")),
            ) | gqa_params(cfg, p, n, kv)

        if layer_list:
            if not all(self.active):
                raise ValueError("layer_list needs every layer slot in use (no pipeline padding slots)")
            one = lambda shape, axes: p(shape[1:], axes[1:])  # noqa: E731  (drop the "layers" axis)
            self.layers = nnx.List([nnx.Dict(layer_params(one)) for _ in range(n)])
        else:
            self.layers = nnx.Dict(layer_params(p))
        self.inv_freq, self.rope_scale = layers.rope_setup(hd, cfg)

    # KV cache layout: (layers, batch, kv_heads, seq, head_dim) for k and for v. Every family
    # caches a pair of arrays with these logical axes (MLA: the latent and the rope key).
    kv_logical_axes = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")

    @staticmethod
    def ffn_kinds(cfg: ModelConfig) -> tuple[str, ...]:
        return ("dense",) * cfg.num_layers

    def cache_groups(self) -> None:
        """One full-length cache for every layer."""
        return None

    def stack_index(self) -> dict[str, tuple[tuple[int, int], ...]]:
        """(layer, position in the stack) of every real layer of the stacked attribute "layers" (its
        slot): code that moves stacked parameters between layouts (Model.save / restore) uses this."""
        return {"layers": tuple(enumerate(self.layer_slots))}

    @property
    def unrolled(self) -> bool:
        """Layers run as an unrolled loop (so a caller may pass the KV cache as a per-layer list)."""
        return isinstance(self.layers, nnx.List)

    def kv_shapes(self, batch: int, seq: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        c = self.cfg
        shape = (len(self.active), batch, self.kv_heads, seq, c.head_dim)
        return shape, shape

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        x = layers.embed_lookup(self.embed[...], tokens, self.compute_dtype)
        return constrain(x, ("batch", "seq", "embed"))

    def _layer(self, w: dict[str, Any], x: jax.Array, start: jax.Array, cos, sin, k_cache, v_cache):
        c = self.cfg
        b, t, _ = x.shape
        h = layers.rms_norm(x, w["attn_norm"], c.rms_norm_eps)
        q, k, v = gqa_project(w, h)
        if c.qk_norm:
            q = layers.rms_norm(q, w["q_norm"], c.rms_norm_eps)
            k = layers.rms_norm(k, w["k_norm"], c.rms_norm_eps)
        q = layers.apply_rope(q, cos, sin) * (c.head_dim**-0.5)
        k = layers.apply_rope(k, cos, sin)
        attn = gqa_attention(q, k, v, start, k_cache, v_cache)
        attn = constrain(attn, ("batch", "seq", "heads", "head_dim"))
        x = x + constrain(layers.dense(attn, w["wo"], "btkh,dkh->btd", w.get("bo")), ("batch", "seq", "embed"))
        h = layers.rms_norm(x, w["mlp_norm"], c.rms_norm_eps)
        x = x + constrain(layers.gated_mlp(h, w["w_gate_up"], w["w_down"]), ("batch", "seq", "embed"))
        return x, (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))

    def context(self, start: jax.Array, t: int) -> dict[str, jax.Array]:
        """Per-row inputs every layer needs (batch-major, so a pipeline can cut microbatches)."""
        positions = start[:, None] + jnp.arange(t)[None, :]
        cos, sin = layers.rope_tables(positions, self.inv_freq, self.rope_scale, self.compute_dtype)
        return dict(start=start, cos=cos, sin=sin)

    def stack(
        self,
        x: jax.Array,
        ctx: dict[str, jax.Array],
        k_cache: jax.Array | None = None,
        v_cache: jax.Array | None = None,
        active: jax.Array | None = None,
        capture: jax.Array | None = None,
    ) -> tuple[jax.Array, ...]:
        """Run this module's stacked layers (all of them, or one pipeline stage's slice) over x.

        capture (slots, n) bool (Family.captures_hidden): capture[s, j] keeps the input of slot s as
        hidden state j; the captured (n, B, T, D) are returned after the K/V (zeros for a j whose slot
        is not in this stack, e.g. another pipeline stage's)."""
        b, t, d = x.shape
        cap = None if capture is None else layers.capture_buffer(capture.shape[1], x)
        if self.unrolled:  # per-layer weights (and k/v caches: arrays or lists), each read in place
            k_new, v_new = [], []
            for i, layer in enumerate(self.layers):
                w = {name: var[...] for name, var in layer.items()}
                kc, vc = (None, None) if k_cache is None else (k_cache[i], v_cache[i])
                cap = None if cap is None else layers.capture_input(cap, capture[i], x)
                x, (k, v) = self._layer(w, x, ctx["start"], ctx["cos"], ctx["sin"], kc, vc)
                k_new.append(k)
                v_new.append(v)
            out = x, jnp.stack(k_new), jnp.stack(v_new)
            return out if cap is None else out + (cap,)
        kv_zeros = jnp.zeros((b, self.kv_heads, t, self.cfg.head_dim), x.dtype)
        k_cache, v_cache, layer_caches = scan_layers(k_cache, v_cache)

        def body(carry, xs):
            x, cap = carry
            w, on, kc, vc, sel = xs
            kc, vc = layer_caches(kc, vc)
            cap = None if cap is None else layers.capture_input(cap, sel, x)
            run = lambda x: self._layer(w, x, ctx["start"], ctx["cos"], ctx["sin"], kc, vc)  # noqa: E731
            if all(self.active):  # no padding slots: no cond (a cond copies the layer's weights)
                x, kv = run(x)
            else:
                x, kv = jax.lax.cond(on, run, lambda x: (x, (kv_zeros, kv_zeros)), x)
            return (x, cap), kv

        stacked = {name: var[...] for name, var in self.layers.items()}
        active = jnp.asarray(self.active) if active is None else active
        (x, cap), (k_new, v_new) = jax.lax.scan(body, (x, cap), (stacked, active, k_cache, v_cache, capture))
        return (x, k_new, v_new) if cap is None else (x, k_new, v_new, cap)

    def norm(self, x: jax.Array) -> jax.Array:
        return layers.rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps)

    def __call__(
        self,
        tokens: jax.Array,  # (B, T) int32
        start: jax.Array,  # (B,) position of tokens[:, 0] = valid entries in the cache
        k_cache: jax.Array | None = None,  # (L, B, KV, S, hd)
        v_cache: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Hidden states (B, T, D) after the final norm and the new K/V of every layer, (L, B, KV, T, hd)."""
        x = self.embed_tokens(tokens)
        x, k_new, v_new = self.stack(x, self.context(start, tokens.shape[1]), k_cache, v_cache)
        return self.norm(x), k_new, v_new

    def logits(self, hidden: jax.Array) -> jax.Array:
        head = self.embed if self.cfg.tie_word_embeddings else self.lm_head
        out = layers.dense(hidden, head[...], "...d,vd->...v")
        return constrain(out, ("batch", "seq", "vocab")[-out.ndim :])


def gqa_params(cfg: ModelConfig, p: Any, n: int, kv_heads: int | None = None) -> dict[str, nnx.Param]:
    """Stacked GQA attention parameters for n slots; kv_heads may exceed cfg.num_kv_heads when heads
    are repeated for tensor parallelism.

    q, k and v are one fused weight, grouped by KV head: wqkv[kv] holds that head's G query heads,
    then its key, then its value (kv, G + 2, hd, D). One dot reads all three (at batch 1 three
    separate dots cost 1.4x: the small k/v dots run far below the memory bandwidth), and splitting
    the kv axis over tensor-parallel devices gives each device exactly its own q, k and v rows."""
    h, hd, d = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    kv = kv_heads or cfg.num_kv_heads
    if h % kv:
        raise ValueError(f"num_heads {h} is not a multiple of the {kv} KV heads (kv_repeat included)")
    g = h // kv
    out = dict(
        wqkv=p((n, kv, g + 2, hd, d), ("layers", "kv_heads", "fused", "head_dim", "embed")),
        wo=p((n, d, h, hd), ("layers", "embed", "heads", "head_dim")),
    )
    if cfg.qkv_bias:
        out["bqkv"] = p((n, kv, g + 2, hd), ("layers", "kv_heads", "fused", "head_dim"))
    if cfg.o_bias:
        out["bo"] = p((n, d), ("layers", "norm"))
    if cfg.qk_norm:
        out |= dict(q_norm=p((n, hd), ("layers", "head_dim")), k_norm=p((n, hd), ("layers", "head_dim")))
    return out


def gqa_project(w: dict[str, Any], x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q (B, T, H, hd), k and v (B, T, KV, hd) of x (B, T, D) through the fused wqkv (gqa_params)."""
    qkv = layers.dense(x, w["wqkv"], "btd,kghd->btkgh", w.get("bqkv"))
    b, t, kv, rows, hd = qkv.shape  # rows per KV head: G queries, then k, then v
    g = rows - 2
    q = constrain(qkv[:, :, :, :g].reshape(b, t, kv * g, hd), ("batch", "seq", "heads", "head_dim"))
    k = constrain(qkv[:, :, :, g], ("batch", "seq", "kv_heads", "head_dim"))
    v = constrain(qkv[:, :, :, g + 1], ("batch", "seq", "kv_heads", "head_dim"))
    return q, k, v


def head_tensor_map(cfg: ModelConfig) -> dict[str, tuple]:
    """HF names of the embedding, final norm and (untied) LM head."""
    v, d = cfg.vocab_size, cfg.hidden_size
    out = {
        "model.embed_tokens.weight": (("embed",), (), (v, d)),
        "model.norm.weight": (("final_norm",), (), (d,)),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (("lm_head",), (), (v, d))
    return out


def layer_norms_tensor_map(pre: str, slot: int, d: int) -> dict[str, tuple]:
    """HF names of a decoder layer's two RMSNorms."""
    return {
        pre + "input_layernorm.weight": (("layers", "attn_norm"), (slot,), (d,)),
        pre + "post_attention_layernorm.weight": (("layers", "mlp_norm"), (slot,), (d,)),
    }


def gqa_tensor_map(cfg: ModelConfig, pre: str, slot: int, kv_repeat: int = 1) -> dict[str, tuple]:
    """HF names of one layer's GQA attention tensors (with KV heads repeated kv_repeat times): q, k
    and v go to their rows of the fused wqkv (kv, G + 2, hd, D) (see gqa_params)."""
    h, kv, hd, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    g = h // (kv * kv_repeat)
    rep = (lambda a: np.repeat(a.reshape(kv, -1, *a.shape[1:]), kv_repeat, axis=0)) if kv_repeat > 1 else None
    a, s, every = pre + "self_attn.", slot, slice(None)
    out = {
        a + "q_proj.weight": (("layers", "wqkv"), (s, every, slice(0, g)), (h * hd, d)),
        a + "k_proj.weight": (("layers", "wqkv"), (s, every, g), (kv * hd, d), rep),
        a + "v_proj.weight": (("layers", "wqkv"), (s, every, g + 1), (kv * hd, d), rep),
        a + "o_proj.weight": (("layers", "wo"), (s,), (d, h * hd)),
    }
    if cfg.qkv_bias:
        out |= {
            a + "q_proj.bias": (("layers", "bqkv"), (s, every, slice(0, g)), (h * hd,)),
            a + "k_proj.bias": (("layers", "bqkv"), (s, every, g), (kv * hd,), rep),
            a + "v_proj.bias": (("layers", "bqkv"), (s, every, g + 1), (kv * hd,), rep),
        }
    if cfg.o_bias:
        out[a + "o_proj.bias"] = (("layers", "bo"), (s,), (d,))
    if cfg.qk_norm:
        out |= {
            a + "q_norm.weight": (("layers", "q_norm"), (s,), (hd,)),
            a + "k_norm.weight": (("layers", "k_norm"), (s,), (hd,)),
        }
    return out


def hf_tensor_map(
    cfg: ModelConfig, layer_slots: tuple[int, ...], kv_repeat: int = 1, layer_list: bool = False
) -> dict[str, tuple]:
    """HF tensor name -> (parameter path, index into that parameter, the tensor's HF shape[, transform]).

    The loader reshapes each HF tensor into the indexed part of the parameter (e.g. q_proj
    (H*hd, D) -> wqkv[slot, :, :G] (KV, G, hd, D); gate_proj -> w_gate_up[slot, 0]), after the optional
    transform (here: repeating KV heads, see Llama's kv_repeat). With layer_list the paths name
    the per-layer weights instead (("layers", "3", "wo") rather than ("layers", "wo")[3])."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    out = head_tensor_map(cfg)
    for i, s in enumerate(layer_slots):
        pre = f"model.layers.{i}."
        out |= layer_norms_tensor_map(pre, s, d) | gqa_tensor_map(cfg, pre, s, kv_repeat)
        out |= {
            pre + "mlp.gate_proj.weight": (("layers", "w_gate_up"), (s, 0), (f, d)),
            pre + "mlp.up_proj.weight": (("layers", "w_gate_up"), (s, 1), (f, d)),
            pre + "mlp.down_proj.weight": (("layers", "w_down"), (s,), (d, f)),
        }
    return per_layer_tensor_map(out) if layer_list else out


def per_layer_tensor_map(tensor_map: dict[str, tuple]) -> dict[str, tuple]:
    """A stacked-layer tensor map rewritten for per-layer weights: (("layers", name), (slot, ...))
    becomes (("layers", str(slot), name), (...))."""

    def entry(e: tuple) -> tuple:
        path, index, *rest = e
        if path[0] != "layers":
            return e
        return (("layers", str(index[0])) + tuple(path[1:]), tuple(index[1:]), *rest)

    return {name: entry(e) for name, e in tensor_map.items()}
