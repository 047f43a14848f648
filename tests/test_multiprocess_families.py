"""Multi-process P/D with the prefix cache on, for the families whose KV is not plain GQA pages:
Llama 4 (ring layers next to full-length ones) and DeepSeek MLA (one latent cache). Prefill (tp=2) and
decode (tp=1) are separate processes with different layouts; two turns of a conversation give
transformers' greedy tokens, and the second turn's prefix is reused on both sides."""

import numpy as np
import pytest

from infire_jax.engine.remote import RemoteEngine, WorkerConfig
from tests.helpers import torch_greedy
from tests.reference.test_moe_reference import VOCAB, save_moe_reference
from tests.test_multiprocess import RUN_S, TIMEOUTS, hard_limit  # noqa: F401  (the alarm fixture)

PAGE = 16


@pytest.mark.parametrize("family", ["llama4", "deepseek_v3"])
def test_two_turns_across_processes_equal_transformers(family, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"mp_{family}")
    ref = save_moe_reference(family, out)
    rng = np.random.default_rng(3)
    first = [rng.integers(3, VOCAB, n).tolist() for n in (37, 21)]
    engine = RemoteEngine(
        out,
        [WorkerConfig("prefill", "prefill0", mesh="tp=2")],
        [WorkerConfig("decode", "decode0", mesh="tp=1", decode_steps=4, num_pages=64)],
        compilation_cache_dir=tmp_path_factory.mktemp("xla_cache"),
        **TIMEOUTS,
    )
    engine.start()
    try:
        answers = engine.generate(first, max_new_tokens=6, timeout=RUN_S)
        assert answers == [torch_greedy(ref, p, 6) for p in first]
        second = [p + a + rng.integers(3, VOCAB, 9).tolist() for p, a in zip(first, answers)]
        engine.reset_stats()
        assert engine.generate(second, max_new_tokens=6, timeout=RUN_S) == [torch_greedy(ref, p, 6) for p in second]
        stats = engine.stats()
        assert stats["prefix_hit_tokens"] > 0 and stats["decode_hit_tokens"] > 0
        assert stats["prefill_tokens_computed"] < sum(len(p) for p in second)
        assert stats["kv_pages_transferred"] < sum(-(-len(p) // PAGE) for p in second)
    finally:
        engine.close()
