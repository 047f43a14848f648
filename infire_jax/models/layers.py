"""Building blocks shared by the model families: norms, rotary embeddings, linear maps, gated MLP.

Weights are stored as HF stores them, (out_features..., in_features): that is the layout the CPU's
dot kernels like best for small batches (../shared/CPU_NOTES.md) and it needs no transpose at load.
A weight may be stored in a narrower dtype (bf16) or compressed; `dense` turns it into the compute
dtype right where it is used, so the full-precision copy of a layer exists only inside the step.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["materialize", "dense", "rms_norm", "rope_tables", "apply_rope", "gated_mlp"]


def materialize(w: Any, dtype: jnp.dtype) -> jax.Array:
    """A stored weight in the compute dtype. bf16 -> f32 goes through bit operations: exact, and
    30-50x faster than `astype` on CPUs without native bf16 (identical result on GPUs)."""
    if hasattr(w, "decode_f32"):  # compressed weight (infire_jax.compression.jax_decode)
        w = w.decode_f32()
    if w.dtype == dtype:
        return w
    if w.dtype == jnp.bfloat16 and dtype == jnp.float32:
        bits = jax.lax.bitcast_convert_type(w, jnp.uint16).astype(jnp.uint32) << 16
        return jax.lax.bitcast_convert_type(bits, jnp.float32)
    return w.astype(dtype)


def dense(x: jax.Array, w: Any, spec: str, bias: Any = None) -> jax.Array:
    """einsum(spec, x, w) with the weight materialised in x's dtype (plus an optional bias)."""
    y = jnp.einsum(spec, x, materialize(w, x.dtype))
    if bias is not None:
        y = y + materialize(bias, x.dtype)
    return y


def rms_norm(x: jax.Array, weight: Any, eps: float) -> jax.Array:
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + eps) * materialize(weight, x.dtype)


def _yarn_ramp(low: float, high: float, dim: int) -> np.ndarray:
    if low == high:
        high += 1e-3
    return np.clip((np.arange(dim, dtype=np.float64) - low) / (high - low), 0.0, 1.0)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(rotary_dim: int, theta: float, scaling: dict[str, Any] | None) -> tuple[np.ndarray, float]:
    """Inverse frequencies (float64, computed on the host) and the cos/sin magnitude scale."""
    inv = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * inv / factor + smooth * inv
        out = np.where(wavelen > old_ctx / low, inv / factor, inv)
        is_mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        return np.where(is_mid, mid, out), 1.0
    if kind == "yarn":
        old_ctx = float(scaling["original_max_position_embeddings"])
        beta_fast, beta_slow = float(scaling.get("beta_fast", 32)), float(scaling.get("beta_slow", 1))

        def correction_dim(rotations: float) -> float:
            return rotary_dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), rotary_dim - 1)
        extrapolation = 1.0 - _yarn_ramp(low, high, rotary_dim // 2)
        inv = inv / factor * (1 - extrapolation) + inv * extrapolation
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if "attention_factor" in scaling and scaling["attention_factor"] is not None:
            attn = float(scaling["attention_factor"])
        elif mscale and mscale_all:
            attn = _yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(mscale_all))
        else:
            attn = _yarn_mscale(factor)
        return inv, attn
    raise ValueError(f"unsupported rope type {kind!r}")


def rope_tables(positions: jax.Array, inv_freq: np.ndarray, scale: float, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape positions.shape + (rotary_dim,) in the HF half-split convention."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return (jnp.cos(angles) * scale).astype(dtype), (jnp.sin(angles) * scale).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x[..., T, heads, d] with cos/sin[..., T, d] (half-split: pairs (i, i + d/2))."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[..., None, :] + rotated * sin[..., None, :]


def gated_mlp(x: jax.Array, w_gate_up: Any, w_down: Any) -> jax.Array:
    """SwiGLU with gate and up fused in one (2, F, D) weight: one read of the input per layer."""
    gate_up = dense(x, w_gate_up, "...d,cfd->...cf")
    h = jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]
    return dense(h, w_down, "...f,df->...d")
