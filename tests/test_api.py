"""Public API on the embedded tiny model: bad input, sampling, stop tokens, save/restore, buckets."""

import json
import shutil

import numpy as np
import pytest

import infire_jax
from infire_jax.checkpoint import hf
from infire_jax.checkpoint.tiny import write_tiny_checkpoint
from infire_jax.config import ConfigError
from infire_jax.engine.generation import RequestError
from infire_jax.engine.sampling import SamplingError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "m", "tiny-llama")


@pytest.fixture(scope="module")
def model(tiny_dir):
    return infire_jax.load(tiny_dir)


@pytest.mark.parametrize(
    "prompts, kwargs, message",
    [
        ([[]], {}, "prompt is empty"),
        ([[1] * 600], {}, "exceeds the context length"),
        ([[5, 512]], {}, "outside the vocabulary"),
        ([[5, -1]], {}, "outside the vocabulary"),
        ([[5]], {"temperature": -0.5}, "temperature must be >= 0"),
        ([[5]], {"top_p": 0.0}, "top_p must be in (0, 1]"),
        ([[5]], {"top_p": 1.5}, "top_p must be in (0, 1]"),
        ([[5]], {"top_k": -1}, "top_k must be"),
        ([5, 6], {}, "list of token-id lists"),
    ],
)
def test_bad_input_raises_one_clear_error(model, prompts, kwargs, message):
    with pytest.raises((RequestError, SamplingError)) as err:
        model.generate(prompts, max_new_tokens=4, **kwargs)
    assert message in str(err.value)


def test_max_new_tokens_must_be_positive(model):
    with pytest.raises(SamplingError, match="max_new_tokens"):
        model.generate([[1, 2]], max_new_tokens=0)


def test_logits_bad_shapes(model):
    with pytest.raises(RequestError, match="non-empty"):
        model.logits(np.zeros((2, 0), np.int32))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        model.logits(np.full((1, 3), 999, np.int32))


def test_unsupported_architecture(tmp_path, tiny_dir):
    shutil.copytree(tiny_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m/config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "m/config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unsupported architecture 'GPT2LMHeadModel'"):
        infire_jax.load(tmp_path / "m")


def test_missing_config_field(tmp_path, tiny_dir):
    shutil.copytree(tiny_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m/config.json").read_text())
    del cfg["hidden_size"]
    (tmp_path / "m/config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="missing the required field 'hidden_size'"):
        infire_jax.load(tmp_path / "m")


def test_checkpoint_with_missing_and_misshaped_tensors(tmp_path, tiny_dir):
    from safetensors.numpy import load_file, save_file

    shutil.copytree(tiny_dir, tmp_path / "m")
    path = tmp_path / "m/model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.norm.weight"] = np.ones(7, np.float32)
    tensors["model.layers.0.extra.weight"] = np.ones(3, np.float32)
    tensors["model.layers.9.mlp.up_proj.weight"] = np.ones(3, np.float32)  # past num_layers (like MTP): ignored
    save_file(tensors, path)
    with pytest.raises(hf.CheckpointError) as err:
        infire_jax.load(tmp_path / "m")
    text = str(err.value)
    assert "missing tensors (1)" in text and "model.layers.1.mlp.up_proj.weight" in text
    assert "wrong shapes (1)" in text and "model.norm.weight" in text
    assert "unexpected tensors (1)" in text and "model.layers.0.extra.weight" in text
    assert "model.layers.9" not in text


def test_sampling_is_seeded_and_respects_top_k(model):
    prompts = [[0, 10, 20, 30], [0, 7]]
    a = model.generate(prompts, max_new_tokens=12, temperature=1.0, seed=3)
    b = model.generate(prompts, max_new_tokens=12, temperature=1.0, seed=3)
    c = model.generate(prompts, max_new_tokens=12, temperature=1.0, seed=4)
    assert a == b and a != c
    # Request i uses seed + i: a request alone with seed 4 draws what it drew as row 1 of seed 3.
    assert model.generate([prompts[1]], max_new_tokens=12, temperature=1.0, seed=4)[0] == a[1]
    # top_k=1 is greedy whatever the temperature.
    assert model.generate(prompts, max_new_tokens=8, temperature=5.0, top_k=1) == model.generate(
        prompts, max_new_tokens=8
    )


def test_top_p_keeps_only_the_nucleus(model):
    """With a tiny top_p only the most likely token survives: equals greedy."""
    prompts = [[0, 3, 4, 5]]
    assert model.generate(prompts, max_new_tokens=8, temperature=1.0, top_p=1e-6) == model.generate(
        prompts, max_new_tokens=8
    )


def test_stop_tokens_end_a_row_and_are_kept(model):
    prompts = [[0, 11, 12], [0, 40]]
    full = model.generate(prompts, max_new_tokens=10)
    stop = full[0][3]
    out = model.generate(prompts, max_new_tokens=10, stop_token_ids=[stop])
    first = full[0].index(stop)
    assert out[0] == full[0][: first + 1]
    assert out[1] == (full[1][: full[1].index(stop) + 1] if stop in full[1] else full[1])


def test_prompt_lengths_share_compiled_programs(model):
    model.generate([[0] * 3], max_new_tokens=4)
    before = model.programs.num_compiled
    for n in (4, 7, 11, 16):
        model.generate([[0] * n], max_new_tokens=4)
    assert model.programs.num_compiled == before


def test_a_full_decode_batch_is_prefilled_at_once(model):
    """generate with more prompts than 8 (the old prefill batch) prefills them in one call and decodes
    every row from the first dispatch: a batch arriving in groups runs part-empty dispatches."""
    n = 12
    worker = model.engine.decode_workers[0]
    rows_per_dispatch, prefill_rows = [], []
    decode, prefill = type(worker)._decode_call, type(worker)._prefill_call
    worker._decode_call = lambda steps: (decode(worker, steps), rows_per_dispatch.append(len(worker.in_call)))[0]
    worker._prefill_call = lambda: (prefill(worker), prefill_rows.append(len(worker.in_call)))[0]
    try:
        outs = model.generate([[i + 1, 7, 9] for i in range(n)], max_new_tokens=9)
    finally:
        del worker._decode_call, worker._prefill_call
    assert prefill_rows == [n] and rows_per_dispatch == [n] and all(len(o) == 9 for o in outs)
    assert outs[3] == model.generate([[4, 7, 9]], max_new_tokens=9)[0]


def test_text_helpers(model):
    text = model.generate_text(["The weather today is"], max_new_tokens=6)
    assert isinstance(text[0], str)
    assert model.encode("hi")[0] == model.cfg.bos_token_id


def test_save_restore_on_another_mesh(model, tmp_path):
    tokens = np.arange(1, 20, dtype=np.int32)[None]
    path = model.save(tmp_path / "saved")
    restored = infire_jax.load(path, mesh="pp=2,tp=2")
    np.testing.assert_allclose(restored.logits(tokens), model.logits(tokens), rtol=0, atol=1e-5)
    assert (path / "tokenizer.json").is_file()
    with pytest.raises(FileExistsError):
        model.save(path)


def test_bf16_storage_matches_f32_of_rounded_weights(tiny_dir, tmp_path):
    """bfloat16 storage computes in float32 from the exact bf16 values (bit-op upcast). Both use
    XLA's dot: float32 weights would otherwise take the CPU kernel, whose sums run in another order."""
    bf = infire_jax.load(tiny_dir, dtype="bfloat16", kernels="xla")
    tokens = np.arange(1, 12, dtype=np.int32)[None]
    ref_dir = write_tiny_checkpoint(tmp_path / "bf", "tiny-llama", dtype="bfloat16")
    f32_of_bf16 = infire_jax.load(ref_dir, dtype="float32", kernels="xla")
    np.testing.assert_allclose(bf.logits(tokens), f32_of_bf16.logits(tokens), rtol=0, atol=1e-6)


def test_cpu_kernels_decode_the_same_tokens_as_xla(tiny_dir, monkeypatch):
    """The default layout (one CPU device) decodes through infire_jax's CPU kernels (few-row matmul,
    paged attention); kernels="xla" through XLA's code: the same greedy tokens, rows of different
    lengths crossing page boundaries."""
    from infire_jax import executables
    from infire_jax.kernels import cpu

    if not cpu.available():
        pytest.skip("no C++ compiler: the kernels cannot be built")
    traced = []

    def counting(name):
        real = getattr(cpu, name)
        return lambda *args, **kwargs: traced.append(name) or real(*args, **kwargs)

    for name in ("matmul_nt", "paged_decode_attention"):
        monkeypatch.setattr(cpu, name, counting(name))
    prompts = [[5, 17, 99, 3, 8, 21, 40], [42, 8], list(range(5, 30))]
    monkeypatch.setattr(executables, "executable_cache_dir", lambda: None)  # counting traces: trace every program
    got = infire_jax.load(tiny_dir, page_size=4).generate(prompts, max_new_tokens=12)  # traced after the patch
    assert {"matmul_nt", "paged_decode_attention"} <= set(traced)
    assert got == infire_jax.load(tiny_dir, page_size=4, kernels="xla").generate(prompts, max_new_tokens=12)
