"""Deterministic tiny Hugging Face-format checkpoints, generated locally from a seed.

Tests and the default job need real HF-layout checkpoints (config.json, safetensors with HF tensor
names, tokenizer.json) but can download nothing, so we synthesise them: random weights from numpy's
default_rng and a byte-level BPE tokenizer trained on an embedded corpus. Nothing here needs torch or
transformers; the tests check that transformers loads the result with no missing or unexpected keys.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import pathlib
import shutil
import struct
import tempfile
import zlib
from typing import TYPE_CHECKING, Any, Callable, Iterable

import ml_dtypes
import numpy as np

if TYPE_CHECKING:
    import tokenizers

# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------

_TINY_SHAPE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    hidden_act="silu",
    # Used as the std of the random weight matrices: 0.1 keeps tiny models' logits non-degenerate.
    initializer_range=0.1,
    attention_dropout=0.0,
    use_cache=True,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
)
_QWEN_EXTRA = dict(use_sliding_window=False, sliding_window=None, rms_norm_eps=1e-6,
                   rope_theta=1_000_000.0, rope_scaling=None, tie_word_embeddings=True)

# HF config.json dicts in the classic key style (`rope_theta` + `rope_scaling`); `make_config` adds
# the transformers-5 `rope_parameters` so both readers agree.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        _TINY_SHAPE,
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=128),
        attention_bias=False,
        mlp_bias=False,
        pretraining_tp=1,
        tie_word_embeddings=False,
    ),
    # Like real Qwen2 configs: no head_dim key (= hidden/heads), q/k/v bias is implied by the arch.
    "tiny-qwen2": dict(
        _TINY_SHAPE, **_QWEN_EXTRA,
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
    ),
    # head_dim 32 != hidden/heads (16): catches code that derives head_dim from hidden_size.
    "tiny-qwen3": dict(
        _TINY_SHAPE, **_QWEN_EXTRA,
        architectures=["Qwen3ForCausalLM"],
        model_type="qwen3",
        head_dim=32,
        attention_bias=False,
    ),
    # Qwen3-MoE (served by models/qwen3_moe.py): 4 routed experts, top-2, every layer sparse.
    "tiny-qwen3-moe": dict(
        _TINY_SHAPE, **_QWEN_EXTRA,
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        head_dim=16,
        attention_bias=False,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    # The shape of HuggingFaceTB/SmolLM-135M (with our own tokenizer's special-token ids).
    "smollm-135m": dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=2048,
        hidden_act="silu",
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        attention_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
        pretraining_tp=1,
        tie_word_embeddings=True,
        use_cache=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    ),
}

DEFAULT_PRESET = "tiny-llama"
_SUPPORTED_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe")


def make_config(preset: str = DEFAULT_PRESET, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json dict of `preset` with `overrides` applied and `rope_parameters` filled in.

    transformers 5 reads `rope_parameters`, but if `rope_scaling`/`rope_theta` are also present they
    take priority over it, so the three are always written consistently from the classic keys
    (unless `overrides` sets `rope_parameters` itself).
    """
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[preset])
    cfg.update(copy.deepcopy(overrides or {}))
    if cfg["model_type"] not in _SUPPORTED_TYPES:
        raise ValueError(f"model_type {cfg['model_type']!r} not in {_SUPPORTED_TYPES}")
    if "rope_parameters" not in (overrides or {}):
        scaling = dict(cfg.get("rope_scaling") or {})
        rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
        cfg["rope_parameters"] = dict(rope_type=rope_type, rope_theta=float(cfg["rope_theta"]), **scaling)
    return cfg


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------

def tensor_specs(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF name, HF shape (out, in), kind) of every stored tensor, in HF module order.

    kind is "matrix", "norm" or "bias" and selects the init. Bias rules follow transformers: Qwen2
    always has q/k/v bias; Llama/Qwen3 `attention_bias` adds q/k/v *and* o bias; Llama `mlp_bias`.
    """
    t = config["model_type"]
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    nh, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // nh
    attn_bias = t != "qwen2" and bool(config.get("attention_bias"))
    qkv_bias = t == "qwen2" or attn_bias
    mlp_bias = t == "llama" and bool(config.get("mlp_bias"))

    specs = [("model.embed_tokens.weight", (vocab, h), "matrix")]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs.append((p + "input_layernorm.weight", (h,), "norm"))
        for proj, out in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)):
            specs.append((f"{p}self_attn.{proj}_proj.weight", (out, h), "matrix"))
            if qkv_bias:
                specs.append((f"{p}self_attn.{proj}_proj.bias", (out,), "bias"))
        specs.append((p + "self_attn.o_proj.weight", (h, nh * hd), "matrix"))
        if attn_bias:
            specs.append((p + "self_attn.o_proj.bias", (h,), "bias"))
        if t in ("qwen3", "qwen3_moe"):
            specs += [(p + "self_attn.q_norm.weight", (hd,), "norm"),
                      (p + "self_attn.k_norm.weight", (hd,), "norm")]
        if t == "qwen3_moe":  # router, then each expert's gate/up/down
            experts, f = config["num_experts"], config["moe_intermediate_size"]
            specs.append((p + "mlp.gate.weight", (experts, h), "matrix"))
            for e in range(experts):
                for proj, shape in (("gate", (f, h)), ("up", (f, h)), ("down", (h, f))):
                    specs.append((f"{p}mlp.experts.{e}.{proj}_proj.weight", shape, "matrix"))
        else:
            for proj, shape in (("gate", (inter, h)), ("up", (inter, h)), ("down", (h, inter))):
                specs.append((f"{p}mlp.{proj}_proj.weight", shape, "matrix"))
                if mlp_bias:
                    specs.append((f"{p}mlp.{proj}_proj.bias", shape[:1], "bias"))
        specs.append((p + "post_attention_layernorm.weight", (h,), "norm"))
    specs.append(("model.norm.weight", (h,), "norm"))
    if not config.get("tie_word_embeddings", False):
        specs.append(("lm_head.weight", (vocab, h), "matrix"))
    return specs


def make_tensor(name: str, shape: tuple[int, ...], kind: str, std: float, seed: int) -> np.ndarray:
    """One float32 tensor: matrices N(0, std), norms 1 + N(0, std/2), biases N(0, std/2).

    Seeded by (seed, name), so values do not depend on the other tensors: checkpoints with more
    layers, another dtype or another sharding share every common tensor.
    """
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    x = rng.standard_normal(shape, dtype=np.float32)
    if kind == "matrix":
        x *= np.float32(std)
    elif kind == "norm":
        x *= np.float32(std / 2)
        x += np.float32(1.0)
    else:
        x *= np.float32(std / 2)
    return x


# dtype name -> (safetensors dtype tag, numpy dtype)
_DTYPES: dict[str, tuple[str, np.dtype]] = {
    "float32": ("F32", np.dtype("<f4")),
    "float16": ("F16", np.dtype("<f2")),
    "bfloat16": ("BF16", np.dtype(ml_dtypes.bfloat16)),
}


def _write_safetensors(path: pathlib.Path, specs: list[tuple[str, tuple[int, ...], str]], dtype: str,
                       make: Callable[[str, tuple[int, ...], str], np.ndarray]) -> None:
    """Stream tensors into one safetensors file, one tensor in memory at a time.

    The format is an 8-byte little-endian header length, a JSON header with each tensor's dtype,
    shape and byte range (padded with spaces to 8 bytes), then the raw little-endian data. Writing it
    directly avoids `safetensors.numpy.save_file`, which needs the whole shard (and a copy) in memory.
    """
    st_dtype, np_dtype = _DTYPES[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in specs:
        size = int(np.prod(shape)) * np_dtype.itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, kind in specs:
            arr = make(name, shape, kind).astype(np_dtype, copy=False)  # no copy for float32
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))


def _shard(specs: list, itemsize: int, max_bytes: int | None) -> list[list]:
    """Greedy HF-style split: start a new shard when the next tensor would exceed `max_bytes`."""
    shards: list[list] = [[]]
    used = 0
    for spec in specs:
        size = int(np.prod(spec[1])) * itemsize
        if max_bytes is not None and shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += size
    return shards


def _dump_json(path: pathlib.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_tiny_checkpoint(out_dir: str | os.PathLike, preset: str = DEFAULT_PRESET, *, seed: int = 0,
                          dtype: str = "float32", shard_max_bytes: int | None = None, tokenizer: bool = True,
                          overrides: dict[str, Any] | None = None) -> pathlib.Path:
    """Write a complete HF checkpoint directory for `preset` and return its path.

    Same arguments give the same bytes. With `shard_max_bytes`, weights are split into
    model-0000k-of-0000n.safetensors plus model.safetensors.index.json (a single resulting shard is
    written as model.safetensors, as transformers does). dtype: float32, bfloat16 or float16.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # leftovers of an earlier write with another sharding

    config = make_config(preset, overrides)
    config["dtype"] = config["torch_dtype"] = dtype  # transformers 5 reads `dtype`; older readers `torch_dtype`
    _dump_json(out / "config.json", config)
    _dump_json(out / "generation_config.json", {
        k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None})

    specs = tensor_specs(config)
    std = float(config.get("initializer_range", 0.02))
    make = lambda name, shape, kind: make_tensor(name, shape, kind, std, seed)  # noqa: E731
    itemsize = _DTYPES[dtype][1].itemsize
    shards = _shard(specs, itemsize, shard_max_bytes)
    if len(shards) == 1:
        _write_safetensors(out / "model.safetensors", specs, dtype, make)
    else:
        weight_map, total = {}, 0
        for k, shard in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(out / fname, shard, dtype, make)
            for name, shape, _ in shard:
                weight_map[name] = fname
                total += int(np.prod(shape)) * itemsize
        _dump_json(out / "model.safetensors.index.json",
                   {"metadata": {"total_size": total}, "weight_map": weight_map})

    if tokenizer:
        write_tokenizer(out, config)
    return out


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
USER_TOKEN, ASSISTANT_TOKEN = "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)  # ids 0..4

# Each turn ends with eos, so generation stops at the end of the assistant's turn. The literal
# newlines sit after `{{ }}`/text, never right after a `{% %}` tag, so transformers' trim_blocks
# rendering and a plain jinja2 Environment give the same string.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER_TOKEN + "\n{{ message['content'] }}{{ eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT_TOKEN + "\n{{ message['content'] }}{{ eos_token }}\n"
    "{% else %}{{ message['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT_TOKEN + "\n{% endif %}"
)

_CORPUS = pathlib.Path(__file__).with_name("tiny_corpus.txt")


# Pre-tokenization split as in Qwen2/Llama-3 tokenizers (contractions, letter runs, single digits,
# punctuation runs, newlines, spaces). transformers 5 always loads model_type "qwen2" checkpoints with
# Qwen2Tokenizer, which rebuilds NFC + this split + ByteLevel around our vocab/merges; using the same
# pipeline everywhere keeps AutoTokenizer and plain `tokenizers` in agreement for every preset.
_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


@functools.lru_cache(maxsize=8)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS.read_text(encoding="utf-8")], trainer)
    # Llama-3 style: plain encodes start with bos (chat prompts carry it in the template instead).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0", pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, 0)])
    return tok.to_str(pretty=True)


def train_tiny_tokenizer(vocab_size: int) -> tokenizers.Tokenizer:
    """A byte-level BPE of at most `vocab_size` tokens trained on the embedded corpus.

    Training is deterministic (tokenizers breaks merge ties by pair, independent of thread count),
    so the saved tokenizer.json is byte-identical across runs. A corpus this small runs out of merges
    at a few thousand tokens; larger requests return that smaller vocab.
    """
    from tokenizers import Tokenizer

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + 256} (specials + 256 bytes)")
    return Tokenizer.from_str(_tokenizer_json(vocab_size))


def write_tokenizer(out_dir: str | os.PathLike, config: dict[str, Any]) -> None:
    """tokenizer.json + tokenizer_config.json for a model config (vocab may be < the model's)."""
    out = pathlib.Path(out_dir)
    tok = train_tiny_tokenizer(config["vocab_size"])
    if tok.get_vocab_size() > config["vocab_size"]:
        raise AssertionError("tokenizer vocab exceeds model vocab")
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True))
    _dump_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,  # byte-level: nothing is unknown (and Qwen2Tokenizer would add one)
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    })


# --------------------------------------------------------------------------------------------------
# The embedded default model
# --------------------------------------------------------------------------------------------------

# Bump the suffix whenever the generator's output for the default preset changes, so stale caches
# are not reused.
DEFAULT_MODEL_NAME = "tiny-llama-v1"
_REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                   "tokenizer_config.json")


def default_model_dir() -> pathlib.Path:
    """$XDG_CACHE_HOME/infire_jax/tiny-llama-v1 (or ~/.cache/... when XDG_CACHE_HOME is unset)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(cache) / "infire_jax" / DEFAULT_MODEL_NAME


def _is_complete(d: pathlib.Path, files: Iterable[str] = _REQUIRED_FILES) -> bool:
    return all((d / f).is_file() for f in files)


def ensure_default_model() -> pathlib.Path:
    """Write the default tiny-llama checkpoint once and return its directory.

    Written into a temp dir beside the target and renamed into place, so concurrent callers and
    interrupted writes never expose a half-written model.
    """
    target = default_model_dir()
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write_tiny_checkpoint(tmp, DEFAULT_PRESET)
        try:
            os.replace(tmp, target)
        except OSError:  # target exists: another process won the race, or a partial dir from elsewhere
            if not _is_complete(target):
                shutil.rmtree(target, ignore_errors=True)
                try:
                    os.replace(tmp, target)
                except OSError:
                    if not _is_complete(target):
                        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
