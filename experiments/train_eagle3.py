"""Train a small EAGLE-3 head for a target on text the target generates itself, on this CPU, and write it
in the published layout (config.json, model.safetensors with fc / midlayer.* / norm / lm_head / d2t / t2d).

Data: chat prompts (a fixed list of tasks below, disjoint from bench_speculative.py's) answered greedily by
the target. For every position p of prompt + answer the head is trained to predict the target's own greedy
token after p + 1 (its argmax there) from the embedding of token p + 1 and the target's fused hidden states
of p (layers (2, L // 2, L - 3)), over a draft vocabulary of the most frequent predicted tokens. Only the
first draft step is trained (no training-time test unroll), so later drafts of a round are weaker.

  python experiments/train_eagle3.py --out /tmp/smollm2-eagle3
  python experiments/bench_speculative.py --speculative eagle3:/tmp/smollm2-eagle3:4 --workloads code,chat --runs 1
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import bench_common as bc  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Target HF checkpoint (default: SmolLM2-135M-Instruct real weights).")
flags.DEFINE_string("out", None, "Directory to write the head to.", required=True)
flags.DEFINE_integer("new_tokens", 192, "Tokens the target generates per training prompt.")
flags.DEFINE_integer("steps", 60, "Optimizer steps (on ~10k generated tokens more overfit: held-out top-1 stays ~0.27).")
flags.DEFINE_integer("batch", 8, "Sequences per step.")
flags.DEFINE_float("lr", 2e-3, "Peak AdamW learning rate (cosine decay).")
flags.DEFINE_integer("draft_vocab", 4096, "Draft vocabulary size (most frequent target predictions).")
flags.DEFINE_integer("intermediate", 1536, "The head's MLP width.")

SUBJECTS = [
    "binary search", "a linked list", "quicksort", "a stack class", "reading a CSV file", "a REST API client",
    "a prime sieve", "matrix multiplication", "a word counter", "parsing JSON", "a retry decorator", "merge sort",
    "a queue with two stacks", "a thread pool", "a trie", "Dijkstra's algorithm", "an LRU cache", "string reversal",
    "a bank account class", "unit tests for a function", "a command line argument parser", "a rate limiter",
    "a binary tree traversal", "fizzbuzz", "a temperature converter", "a tic-tac-toe board", "a to-do list app",
]
TASKS = (
    [f"Write a Python function for {s} and explain it briefly." for s in SUBJECTS]
    + [f"Explain {s} to a beginner in a few paragraphs." for s in SUBJECTS[:14]]
    + [
        "What are the main causes of the seasons on Earth?", "Give me five tips for better sleep.",
        "Summarize the history of the printing press.", "How do vaccines work?", "Write a short poem about rain.",
        "What is the difference between weather and climate?", "Plan a three-day trip to Rome.",
        "Explain photosynthesis simply.", "Write an email asking for a meeting next week.",
        "What makes a good cup of coffee?", "Describe how a bicycle works.", "Why is the sky blue?",
        "Give advice for a first job interview.", "Explain what a neural network is.",
        "List some healthy breakfast ideas.", "How do airplanes stay in the air?",
    ]
)


def main(argv: list[str]) -> None:
    del argv
    import jax
    import jax.numpy as jnp
    import optax
    import transformers
    from flax import nnx
    from safetensors.numpy import save_file

    from infire_jax.engine.build import Deployment, EngineOptions
    from infire_jax.engine.disagg import generate
    from infire_jax.engine.programs import bucket
    from infire_jax.engine.sampling import SamplingParams
    from infire_jax.models.eagle3 import Eagle3Config, Eagle3Head, default_aux_layers

    model_dir = pathlib.Path(FLAGS.model_dir or bc.ensure_smollm2_instruct())
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    eos = (int(tokenizer.eos_token_id),)
    prompts = [tokenizer.apply_chat_template([dict(role="user", content=t)], add_generation_prompt=True, tokenize=True,
                                             return_dict=False) for t in TASKS]
    deployment = Deployment(model_dir, ["tp=1"], ["tp=1"],
                            options=EngineOptions(max_decode_batch=16, kv_pages=1024, prefill_chunk=None))
    t0 = time.perf_counter()
    reqs = generate(deployment.engine(), prompts, [SamplingParams(FLAGS.new_tokens, stop_token_ids=eos)] * len(prompts))
    seqs = [np.asarray(list(r.prompt) + list(r.output), np.int32) for r in reqs]
    print(f"generated {sum(len(r.output) for r in reqs)} tokens in {time.perf_counter() - t0:.0f} s", flush=True)

    programs = deployment.programs("tp=1")
    tcfg, target = programs.placed.cfg, programs.placed.module
    aux = default_aux_layers(tcfg.num_layers)
    length = bucket(max(len(s) for s in seqs), 16)
    n = len(seqs)
    tokens = np.zeros((n, length), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    states, labels = [], []
    for i in range(n):  # the target's fused states of every position, and its greedy token after each
        states.append(np.asarray(programs.hidden_fn(1, length, aux)(programs.placed.state, tokens[i: i + 1]))[0])
        labels.append(programs.logits(tokens[i: i + 1, : len(seqs[i])])[0].argmax(-1))
    # example p of sequence i: token p + 1, states of p -> the target's greedy token after p + 1
    valid = np.zeros((n, length), bool)
    target_next = np.zeros((n, length), np.int64)
    for i, s in enumerate(seqs):
        valid[i, : len(s) - 1] = True
        target_next[i, : len(s) - 1] = labels[i][1:]
    counts = np.bincount(target_next[valid], minlength=tcfg.vocab_size)
    ids = np.sort(np.argsort(-counts, kind="stable")[: FLAGS.draft_vocab])
    draft_of = np.full(tcfg.vocab_size, -1, np.int64)
    draft_of[ids] = np.arange(len(ids))
    label = draft_of[target_next]
    weight = (valid & (label >= 0)).astype(np.float32)
    print(f"{int(valid.sum())} examples, {weight.sum() / valid.sum():.3f} of them in the {len(ids)}-token draft vocabulary")
    fed = np.zeros_like(tokens)
    fed[:, :-1] = tokens[:, 1:]
    embeds = np.asarray(jax.jit(target.embed_tokens)(fed))
    states = np.stack(states)

    cfg = Eagle3Config(hidden_size=tcfg.hidden_size, intermediate_size=FLAGS.intermediate, num_heads=tcfg.num_heads,
                       num_kv_heads=tcfg.num_kv_heads, head_dim=tcfg.head_dim, rms_norm_eps=tcfg.rms_norm_eps,
                       rope_theta=tcfg.rope_theta, rope_scaling=tcfg.rope_scaling, vocab_size=tcfg.vocab_size,
                       draft_vocab_size=len(ids), target_hidden_size=tcfg.hidden_size, aux_layers=aux)
    head = Eagle3Head(cfg, own_embedding=False)
    rng = np.random.default_rng(0)
    for path, var in nnx.to_flat_state(nnx.state(head, nnx.Param)):
        name, shape = str(path[-1]), var.get_value().shape
        if name.endswith("norm"):
            var.set_value(jnp.ones(shape))
        elif name != "d2t":
            fan_in = shape[-1] if name not in ("wo",) else shape[1] * shape[2]
            var.set_value(jnp.asarray(rng.standard_normal(shape) / np.sqrt(fan_in), jnp.float32))
    graphdef, fixed, params = nnx.split(head, nnx.PathContains("d2t"), nnx.Param)
    schedule = optax.warmup_cosine_decay_schedule(0.0, FLAGS.lr, 20, FLAGS.steps)
    opt = optax.adamw(schedule, weight_decay=0.01)
    opt_state = opt.init(params)

    def loss_fn(params, e, s, y, w):
        module = nnx.merge(graphdef, fixed, params)
        x, _, _ = module(e, module.fuse(s), jnp.zeros(e.shape[0], jnp.int32))
        logits = module.draft_logits(x).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(y, 0))
        acc = (logits.argmax(-1) == y) * w
        return (ce * w).sum() / w.sum(), acc.sum() / w.sum()

    @jax.jit
    def train_step(params, opt_state, e, s, y, w):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, e, s, y, w)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    held = max(1, n // 8)  # the last sequences: a held-out check of first-draft accuracy
    train = np.arange(n - held)
    t0 = time.perf_counter()
    for step in range(FLAGS.steps):
        b = rng.choice(train, FLAGS.batch, replace=False)
        params, opt_state, loss, acc = train_step(params, opt_state, embeds[b], states[b], label[b], weight[b])
        if step % 50 == 0 or step == FLAGS.steps - 1:
            h = np.arange(n - held, n)
            _, held_acc = jax.jit(loss_fn)(params, embeds[h], states[h], label[h], weight[h])
            print(f"step {step}: loss {float(loss):.3f} train top-1 {float(acc):.3f} held-out top-1 {float(held_acc):.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

    # the published layout
    module = nnx.merge(graphdef, fixed, params)
    g, hd, kv, d = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim, cfg.num_kv_heads, cfg.hidden_size
    wqkv, m = np.asarray(module.wqkv[...]), "midlayer."
    tensors = {
        "fc.weight": module.fc[...], m + "input_layernorm.weight": module.input_norm[...],
        m + "hidden_norm.weight": module.hidden_norm[...], m + "post_attention_layernorm.weight": module.mlp_norm[...],
        "norm.weight": module.final_norm[...],
        m + "self_attn.q_proj.weight": wqkv[:, :g].reshape(-1, 2 * d),
        m + "self_attn.k_proj.weight": wqkv[:, g].reshape(kv * hd, 2 * d),
        m + "self_attn.v_proj.weight": wqkv[:, g + 1].reshape(kv * hd, 2 * d),
        m + "self_attn.o_proj.weight": np.asarray(module.wo[...]).reshape(d, -1),
        m + "mlp.gate_proj.weight": module.w_gate_up[...][0], m + "mlp.up_proj.weight": module.w_gate_up[...][1],
        m + "mlp.down_proj.weight": module.w_down[...], "lm_head.weight": module.lm_head[...],
    }
    tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()}
    tensors["d2t"] = (ids - np.arange(len(ids))).astype(np.int64)
    tensors["t2d"] = np.isin(np.arange(tcfg.vocab_size), ids)
    out = pathlib.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLMEagle3"], model_type="llama", hidden_size=d, intermediate_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_heads, num_key_value_heads=kv, head_dim=hd, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        vocab_size=tcfg.vocab_size, draft_vocab_size=len(ids), num_hidden_layers=1, hidden_act="silu",
        eagle_aux_hidden_state_layer_ids=list(aux), target_hidden_size=d,
    ), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
