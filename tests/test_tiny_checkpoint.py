"""Tiny HF checkpoints: deterministic bytes, and transformers 5 loads them exactly (no missing keys)."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from infire_jax.checkpoint import tiny

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = ["tiny-llama", "tiny-qwen2", "tiny-qwen3"]
TEXTS = [
    "The weather is nice today.",
    "  def f(x):\n\treturn x**2  # 12345\n\n",
    "Café, naïve, 日本語 and an emoji 🙂 — 3.14159!",
    "",
]


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _all_tensors(d):
    out = {}
    for p in sorted(d.glob("*.safetensors")):
        out.update(load_file(p))
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {p: tiny.write_tiny_checkpoint(root / p, p) for p in TINY}


def test_writes_are_bytewise_deterministic(tmp_path, ckpts):
    again = tiny.write_tiny_checkpoint(tmp_path / "again", "tiny-llama")
    assert _files(again) == _files(ckpts["tiny-llama"])
    a = tiny.write_tiny_checkpoint(tmp_path / "a", "tiny-qwen3", seed=3, dtype="bfloat16", shard_max_bytes=50_000)
    b = tiny.write_tiny_checkpoint(tmp_path / "b", "tiny-qwen3", seed=3, dtype="bfloat16", shard_max_bytes=50_000)
    assert _files(a) == _files(b)
    other = tiny.write_tiny_checkpoint(tmp_path / "c", "tiny-llama", seed=1, tokenizer=False)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()
    assert not (other / "tokenizer.json").exists()


def test_tokenizer_training_is_deterministic_across_processes():
    """Fresh processes (different hash seeds, thread counts) train the same tokenizer.json."""
    code = ("import hashlib, importlib.util, sys; s = importlib.util.spec_from_file_location('t', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print(hashlib.sha256(m.train_tiny_tokenizer(512).to_str(pretty=True).encode()).hexdigest())")
    want = hashlib.sha256(tiny.train_tiny_tokenizer(512).to_str(pretty=True).encode()).hexdigest()
    for env in ({"RAYON_NUM_THREADS": "1", "PYTHONHASHSEED": "1"}, {"RAYON_NUM_THREADS": "4", "PYTHONHASHSEED": "2"}):
        got = subprocess.run([sys.executable, "-c", code, tiny.__file__], env={**os.environ, **env},
                             capture_output=True, text=True, check=True).stdout.strip()
        assert got == want


@pytest.mark.parametrize("preset", [*TINY, "smollm-135m"])
def test_config_matches_transformers(preset):
    cfg = tiny.make_config(preset)
    assert "rope_theta" in cfg and "rope_scaling" in cfg  # classic keys, read by infire_jax.config
    hf = transformers.AutoConfig.for_model(**cfg)
    assert type(hf).__name__ == cfg["architectures"][0].replace("ForCausalLM", "Config")
    assert hf.rope_parameters["rope_theta"] == cfg["rope_theta"]
    want_type = (cfg["rope_scaling"] or {}).get("rope_type", "default")
    assert hf.rope_parameters["rope_type"] == want_type == cfg["rope_parameters"]["rope_type"]
    if want_type == "llama3":
        for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            assert hf.rope_parameters[k] == cfg["rope_scaling"][k]
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "tie_word_embeddings", "rms_norm_eps", "max_position_embeddings"):
        assert getattr(hf, k) == cfg[k], k
    if preset == "tiny-qwen3":
        assert hf.head_dim == 32 != hf.hidden_size // hf.num_attention_heads
    if preset != "smollm-135m":
        assert cfg["vocab_size"] == tiny.train_tiny_tokenizer(cfg["vocab_size"]).get_vocab_size() == 512


def test_smollm_shape():
    cfg = tiny.make_config("smollm-135m")
    n = sum(int(np.prod(shape)) for _, shape, _ in tiny.tensor_specs(cfg))
    assert n == 134_515_008  # SmolLM-135M's parameter count (tied embeddings)
    assert tiny.train_tiny_tokenizer(cfg["vocab_size"]).get_vocab_size() < cfg["vocab_size"]


@pytest.mark.parametrize("preset", TINY)
def test_transformers_loads_exactly(preset, ckpts):
    d = ckpts[preset]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == tiny.PRESETS[preset]["architectures"][0]
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    ours = _all_tensors(d)
    sd = model.state_dict()
    expected = set(sd) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    assert set(ours) == expected
    for name, arr in ours.items():
        np.testing.assert_array_equal(sd[name].numpy(), arr, err_msg=name)
    if preset == "tiny-qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in ours and "model.layers.0.self_attn.o_proj.bias" not in ours
    if preset == "tiny-qwen3":
        assert ours["model.layers.0.self_attn.q_norm.weight"].shape == (32,)
    with torch.no_grad():
        logits = model(torch.tensor([[0, 44, 73, 292, 83]])).logits
    assert torch.isfinite(logits).all() and logits.std() > 0.1  # not degenerate


def test_llama_attention_bias_matches_transformers(tmp_path):
    """Llama attention_bias means q/k/v *and* o bias in transformers; mlp_bias adds MLP biases."""
    d = tiny.write_tiny_checkpoint(tmp_path, "tiny-llama", overrides=dict(attention_bias=True, mlp_bias=True),
                                   tokenizer=False)
    _, info = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert "model.layers.0.self_attn.o_proj.bias" in _all_tensors(d)


def test_sharded_bf16_and_overrides(tmp_path, ckpts):
    d = tiny.write_tiny_checkpoint(tmp_path, "tiny-llama", dtype="bfloat16", shard_max_bytes=64 * 1024,
                                   overrides={"num_hidden_layers": 5})
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in d.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards) and not (d / "model.safetensors").exists()
    sizes = sum(v.nbytes for v in _all_tensors(d).values())
    assert index["metadata"]["total_size"] == sizes
    assert json.loads((d / "config.json").read_text())["num_hidden_layers"] == 5
    model, info = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert len(model.model.layers) == 5
    # Per-tensor seeding: the shared layers equal the 4-layer float32 checkpoint, rounded to bf16.
    ref = load_file(ckpts["tiny-llama"] / "model.safetensors")
    ours = _all_tensors(d)
    assert set(ref) < set(ours) and "model.layers.4.mlp.up_proj.weight" in ours
    for name, arr in ref.items():
        np.testing.assert_array_equal(ours[name], arr.astype(ours[name].dtype), err_msg=name)


@pytest.mark.parametrize("preset", TINY)
def test_tokenizer_roundtrip_and_chat(preset, ckpts):
    from tokenizers import Tokenizer

    d = ckpts[preset]
    raw = Tokenizer.from_file(str(d / "tokenizer.json"))
    hf = transformers.AutoTokenizer.from_pretrained(d)
    assert raw.get_vocab_size() == len(hf) == 512
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert [raw.token_to_id(t) for t in tiny.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    config = json.loads((d / "config.json").read_text())
    gen = json.loads((d / "generation_config.json").read_text())
    assert config["bos_token_id"] == gen["bos_token_id"] == 0 and config["eos_token_id"] == gen["eos_token_id"] == 1
    for text in TEXTS:
        ids = raw.encode(text).ids
        assert ids[0] == 0 and hf(text).input_ids == ids  # both stacks tokenize identically
        assert raw.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text

    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Weather?"}]
    text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|user|>\nHi<|end_of_text|>\n<|assistant|>\nHello!<|end_of_text|>\n"
                    "<|user|>\nWeather?<|end_of_text|>\n<|assistant|>\n")
    assert hf.apply_chat_template(msgs[:1], tokenize=False) == "<|begin_of_text|><|user|>\nHi<|end_of_text|>\n"
    ids = hf.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == raw.encode(text, add_special_tokens=False).ids and ids.count(0) == 1 and ids[-2:] == [4, raw.token_to_id("Ċ")]
    import jinja2  # our own code may render the template with plain jinja2: same text

    plain = jinja2.Environment().from_string(tiny.CHAT_TEMPLATE).render(
        messages=msgs, add_generation_prompt=True, bos_token=tiny.BOS_TOKEN, eos_token=tiny.EOS_TOKEN)
    assert plain == text


def test_ensure_default_model(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    d = tiny.default_model_dir()
    assert d == tmp_path / "infire_jax" / "tiny-llama-v1"
    (d).mkdir(parents=True)
    (d / "config.json").write_text("{}")  # a partial leftover is replaced
    assert tiny.ensure_default_model() == d
    assert _files(d) == _files(tiny.write_tiny_checkpoint(tmp_path / "fresh", "tiny-llama"))
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    assert tiny.ensure_default_model() == d and (d / "model.safetensors").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in d.parent.iterdir()) == ["tiny-llama-v1"]  # no temp dirs left
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tiny.default_model_dir() == tmp_path / "home" / ".cache" / "infire_jax" / "tiny-llama-v1"
