"""Building blocks shared by the model families: norms, rotary embeddings, linear maps, gated MLP,
capture of chosen layers' inputs.

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

from infire_jax.compression.weights import EncodedWeight
from infire_jax.kernels import dispatch
from infire_jax.sharding import current_layout

__all__ = ["materialize", "embed_lookup", "dense", "rms_norm", "rope_tables", "apply_rope", "gated_mlp"]


def materialize(w: Any, dtype: jnp.dtype) -> jax.Array:
    """A stored weight in the compute dtype. bf16 -> f32 goes through bit operations: exact, and
    30-50x faster than `astype` on CPUs without native bf16 (identical result on GPUs)."""
    if isinstance(w, EncodedWeight):  # compressed or quantised (compression/weights.py)
        w = w.decode_f32()
    if w.dtype == dtype:
        return w
    if w.dtype == jnp.bfloat16 and dtype == jnp.float32:
        return _widen_bf16_bits(jax.lax.bitcast_convert_type(w, jnp.uint16))
    return w.astype(dtype)


def _widen_bf16_bits(bits: jax.Array) -> jax.Array:
    """float32 values of bf16 bit patterns (uint16): the high half of the float."""
    return jax.lax.bitcast_convert_type(bits.astype(jnp.uint32) << 16, jnp.float32)


def embed_lookup(table: Any, tokens: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Rows `tokens` of an embedding table, in dtype. XLA:CPU runs a bf16 gather in float32 by
    converting the whole table, hoisted out of the decode loop (a 113 MB float32 copy per dispatch,
    31.6 ms for SmolLM-135M, 4 ms per one-row decode step); gathering the table's 16-bit patterns
    instead still copies the table once per dispatch (bitcast), so on a layout that allows CPU
    kernels the rows come from one (kernels/dispatch.py), elsewhere from the 16-bit gather."""
    if isinstance(table, EncodedWeight):  # a compressed table decodes whole
        return jnp.take(materialize(table, dtype), tokens, axis=0)

    def xla() -> jax.Array:
        if table.dtype == jnp.bfloat16 and dtype == jnp.float32:
            return _widen_bf16_bits(jnp.take(jax.lax.bitcast_convert_type(table, jnp.uint16), tokens, axis=0))
        return materialize(jnp.take(table, tokens, axis=0), dtype)

    return dispatch.embed_rows(table, tokens, dtype, xla=xla)


def _as_matmul(spec: str) -> int:
    """Number of trailing dims contracted when `spec` is a plain x @ W.T ("...k,nk->...n", with any
    number of n and k dims), else 0."""
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    contracted = "".join(c for c in rhs if c in lhs and c not in out)
    n = len(contracted)
    ok = n and lhs.endswith(contracted) and rhs.endswith(contracted) and out == lhs[:-n] + rhs[:-n]
    return n if ok and "." not in rhs else 0


def dense(x: jax.Array, w: Any, spec: str, bias: Any = None) -> jax.Array:
    """einsum(spec, x, w) with the weight materialised in x's dtype (plus an optional bias).

    A plain projection runs as one 2-D dot_general of (tokens, K) with the weight viewed as (N, K):
    with higher-rank weights XLA:CPU canonicalises the dot by transposing the weight, a full copy of
    it on every step (measured 3.4 vs 12.3 GB/s for a scanned (24, 64, 576) weight). The kernel
    dispatch may run it with a kernel that reads the weight as stored (kernels/dispatch.py)."""
    n = _as_matmul(spec)
    if n:

        def xla() -> jax.Array:
            wm = materialize(w, x.dtype)  # some encoded forms have a shape only once decoded
            k = int(np.prod(wm.shape[wm.ndim - n :]))
            y = jax.lax.dot_general(x.reshape(-1, k), wm.reshape(-1, k), (((1,), (1,)), ((), ())))
            return y.reshape(x.shape[: x.ndim - n] + wm.shape[: wm.ndim - n])

        y = dispatch.projection(x, w, n, xla=xla)
    else:
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


def rope_setup(rotary_dim: int, cfg: Any) -> tuple[tuple[float, ...], float]:
    """(inverse frequencies as a static tuple, cos/sin scale) for a model config: what every family
    keeps on its module (a tuple, not array data, so NNX treats it as static)."""
    inv_freq, scale = rope_inv_freq(rotary_dim, cfg.rope_theta, cfg.rope or None)
    return tuple(float(f) for f in inv_freq), scale


def rope_tables(positions: jax.Array, inv_freq: np.ndarray, scale: float, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape positions.shape + (rotary_dim,) in the HF half-split convention."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return (jnp.cos(angles) * scale).astype(dtype), (jnp.sin(angles) * scale).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x[..., T, heads, d] with cos/sin[..., T, d] (half-split: pairs (i, i + d/2))."""
    # Each half computed on its own and joined once: the rotate-half form (x * cos + [-x2, x1] * sin)
    # makes XLA:CPU select per element inside the fused transposes that follow (5% of a 512-token
    # prefill); the values are the same bit for bit.
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[..., None, :half], sin[..., None, :half]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def capture_buffer(n: int, x: jax.Array) -> jax.Array:
    """Zeros for n captured layer inputs shaped like x (n, B, T, D): what a stack returns for a capture
    selection (models.contract.Family.captures_hidden) at every j whose slot it does not run."""
    return jnp.zeros((n,) + x.shape, x.dtype)


def capture_input(captured: jax.Array, selected: jax.Array, x: jax.Array) -> jax.Array:
    """captured (n, B, T, D) with x, the input of one layer slot, written at every j where selected[j]
    (that slot's row of the (slots, n) capture selection)."""
    return jnp.where(selected[:, None, None, None], x[None], captured)


def gated_mlp(x: jax.Array, w_gate_up: Any, w_down: Any) -> jax.Array:
    """SwiGLU with gate and up fused in one (2, F, D) weight: one read of the input per layer."""
    layout = current_layout()
    if layout is None or layout.axis_size("mlp") == 1:
        # One dot over the weight viewed as (2F, D): a free reshape, where taking w[0] and w[1]
        # of a per-layer weight would copy each half (measured ~60% of decode time on CPU).
        gate, up = jnp.moveaxis(dense(x, w_gate_up, "...d,gfd->...gf"), -2, 0)
    else:
        # Two dots when F is split over devices: merging the fused axis with a split F would make
        # GSPMD gather the weight.
        w = materialize(w_gate_up, x.dtype)
        gate, up = dense(x, w[0], "...d,fd->...f"), dense(x, w[1], "...d,fd->...f")
    return dense(jax.nn.silu(gate) * up, w_down, "...f,df->...d")
