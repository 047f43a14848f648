"""gqa_attention's causal query blocks (prompts of >= 2 blocks without a cache) against the one-block
form, with and without a chunked-attention window, and against a plain numpy softmax attention."""

import jax.numpy as jnp
import numpy as np
import pytest

from infire_jax.models import attention


def _inputs(t: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    b, h, kv, hd = 2, 4, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, hd)), jnp.float32) for n in (h, kv, kv))
    return q, k, v, jnp.asarray([0, 5], jnp.int32)


def _numpy_reference(q, k, v, start, window):
    q, k, v, start = map(np.asarray, (q, k, v, start))
    b, t, h, hd = q.shape
    g = h // k.shape[2]
    out = np.zeros_like(q)
    for r in range(b):
        pos = start[r] + np.arange(t)
        mask = pos[:, None] >= pos[None, :]
        if window is not None:
            mask &= pos[:, None] // window == pos[None, :] // window
        for j in range(h):
            s = q[r, :, j] @ k[r, :, j // g].T
            s = np.where(mask, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[r, :, j] = (p / p.sum(-1, keepdims=True)) @ v[r, :, j // g]
    return out


@pytest.mark.parametrize("window", [None, 48])
def test_causal_blocks_equal_one_block(monkeypatch, window):
    t = 2 * attention.QUERY_BLOCK + 37  # three blocks, the last one partial
    q, k, v, start = _inputs(t)
    blocked = np.asarray(attention.gqa_attention(q, k, v, start, window=window))
    monkeypatch.setattr(attention, "QUERY_BLOCK", 4 * t)  # one block: the full T x T scores
    whole = np.asarray(attention.gqa_attention(q, k, v, start, window=window))
    np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(blocked, _numpy_reference(q, k, v, start, window), rtol=1e-4, atol=1e-5)
