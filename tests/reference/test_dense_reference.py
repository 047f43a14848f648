"""Dense Llama/Qwen2/Qwen3 against transformers: logits and greedy generation (fp32)."""

import numpy as np
import pytest

import infire_jax
from infire_jax.engine.sampling import SamplingParams
from tests.helpers import save_reference, torch_greedy, torch_logits

PROMPT_LENGTHS = (5, 17, 30)  # a batch of different lengths (right-padded inside the engine)


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def pair(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    ref = save_reference(request.param, out)
    return request.param, ref, infire_jax.load(out)


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, vocab, n).tolist() for n in PROMPT_LENGTHS]


def test_logits_match_transformers(pair):
    _, ref, model = pair
    tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (2, 21)).astype(np.int32)
    ours, theirs = model.logits(tokens), torch_logits(ref, tokens)
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_greedy_generate_matches_transformers(pair):
    _, ref, model = pair
    prompts = _prompts(model.cfg.vocab_size)
    ours = model.generate(prompts, max_new_tokens=32)
    for prompt, got in zip(prompts, ours):
        assert got == torch_greedy(ref, prompt, 32)


def test_decode_logits_equal_full_recompute(pair):
    """The logits each decoded token came from equal a cache-free forward over the whole sequence."""
    _, _, model = pair
    prompts = _prompts(model.cfg.vocab_size)
    arrays = [np.asarray(p, np.int32) for p in prompts]
    reqs = model.run_requests(arrays, [SamplingParams(12)] * len(arrays), with_logits=True)
    for prompt, out, step_logits in zip(prompts, [r.output for r in reqs], [r.logits for r in reqs]):
        seq = np.asarray([prompt + out[:-1]], np.int32)
        full = model.logits(seq)[0, len(prompt) - 1 :]
        assert np.abs(np.stack(step_logits) - full).max() <= 1e-4 * np.abs(full).max()
