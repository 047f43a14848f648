"""Decode speed with runtime-compressed (palette12) weights vs the same weights raw in bf16.

Both models come from one bf16 checkpoint: raw = `infire_jax.load(hf_dir, dtype="bfloat16")`,
compressed = `infire_jax.load(compressed_dir, dtype="bfloat16")`, where compressed_dir is written by
checkpoint/compressed.py. Only the stacked layer matrices differ (embedding / LM head / norms are
raw bf16 in both), and their greedy outputs must be identical (checked). The checkpoint:
  --family=dense      the smollm-135m preset's shape with deterministic random weights, by default
                      cut to --layers layers (tiny.py);
  --family=qwen3_moe  a Qwen3-MoE shaped like a scaled-down Qwen3-30B-A3B (64 experts of 192 hidden
                      columns, top 8, hidden 512, --layers layers), random N(0, 0.02) weights built
                      with transformers; its routed experts are most of the bytes and run through the
                      few-row CPU kernel (raw bf16 and palette12 alike) on one device;
  --family=llama4     a Llama 4 shaped like a scaled-down Scout (16 experts of 512 columns, top 1, a
                      shared expert, hidden 512): raw, its fused input-major expert tensors multiply
                      through XLA (widened to float32 inside the step); compressed, they are stored
                      output-major and run through the palette12 kernel.

Decode tok/s at batch --batch (default 1) through the public API: per run, generate N_long and
N_short new tokens after the same prompt; (N_long - N_short) / (t_long - t_short) cancels prefill
and fixed costs. Runs
of the two models alternate so machine load hits both alike; medians of --runs runs. The breakdown
section times one scanned stack of layer matmuls (8 layers of this model's 6 matrices at m = 1)
with f32 weights, bf16 weights (bit-op upcast) and palette12 weights (decode + dot, and decode only).

  python experiments/bench_compressed_decode.py --out /tmp/bench_compressed_decode.json
  python experiments/bench_compressed_decode.py --family=qwen3_moe --runs=9 --out /tmp/bench_moe.json
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax import lax  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "bench_compressed_decode.json", "Where to write the JSON results.")
flags.DEFINE_enum("family", "dense", ["dense", "qwen3_moe", "llama4"], "Model family of the checkpoint (see above).")
flags.DEFINE_string("preset", "smollm-135m", "tiny.py preset giving the model shape (--family=dense).")
flags.DEFINE_integer("batch", 1, "Decode rows (the same prompt each).")
flags.DEFINE_integer("layers", 8, "num_hidden_layers override (0 = the preset's own).")
flags.DEFINE_string("mesh", "tp=1", "Mesh of both models.")
flags.DEFINE_integer("runs", 7, "Timed runs per model (median reported; >= 5).")
flags.DEFINE_integer("prompt_len", 16, "Prompt tokens.")
flags.DEFINE_integer("short", 8, "New tokens of the short generation.")
flags.DEFINE_integer("long", 72, "New tokens of the long generation.")
flags.DEFINE_integer("decode_steps", 8, "Decode steps per dispatch (infire_jax.load's default is 8).")
flags.DEFINE_bool("breakdown", True, "Also time the per-layer matmul stack (f32 / bf16 / palette12; --family=dense).")
flags.DEFINE_enum("kernels", "auto", ["auto", "xla"], "Both models' kernels (infire_jax.load): with 'auto' raw bf16 "
                  "weights (all of the raw model; embedding and LM head of the compressed one) go through the CPU "
                  "few-row kernel while compressed layer weights decode through XLA; 'xla' is XLA's code for both.")
flags.DEFINE_string("work_dir", "", "Where to keep the checkpoints (default: a cache dir under /tmp).")


# ------------------------------------------------------------------------------------- machine load


def _cpu_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    return sum(vals[:8]) - vals[3] - vals[4], sum(vals[:8])


def _self_jiffies() -> int:
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15])


class Contention:
    """Share of all CPU time that *other* processes used during the block."""

    def __enter__(self):
        self.b0, self.t0 = _cpu_jiffies()
        self.s0 = _self_jiffies()
        return self

    def __exit__(self, *exc):
        b1, t1 = _cpu_jiffies()
        s1 = _self_jiffies()
        self.foreign = round(max(0.0, ((b1 - self.b0) - (s1 - self.s0)) / max(1, t1 - self.t0)), 3)


# ------------------------------------------------------------------------------------- models


MOE_SHAPES = {
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(
        vocab_size=8192, hidden_size=512, intermediate_size=1536, moe_intermediate_size=192, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, num_experts=64, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, max_position_embeddings=2048, tie_word_embeddings=False)),
    "llama4": ("Llama4ForCausalLM", "Llama4TextConfig", dict(
        vocab_size=8192, hidden_size=512, intermediate_size=512, intermediate_size_mlp=2048, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1,
        attention_chunk_size=8192, max_position_embeddings=2048)),
}


def write_moe_checkpoint(out: pathlib.Path, family: str, layers: int) -> None:
    """A bf16 HF checkpoint of MOE_SHAPES[family] with random N(0, 0.02) weights (transformers' init)."""
    import torch
    import transformers

    arch, config, shape = MOE_SHAPES[family]
    torch.manual_seed(0)
    cfg = getattr(transformers, config)(**shape, num_hidden_layers=layers or 8, initializer_range=0.02)
    model = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():  # every matrix N(0, 0.02), norms 1 (whatever the family's own init does)
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.02 if p.ndim >= 2 else torch.ones_like(p))
    model.to(torch.bfloat16).save_pretrained(out)


def checkpoints(work: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, dict]:
    from infire_jax.checkpoint.compressed import compress_checkpoint, read_manifest
    from infire_jax.checkpoint.tiny import write_tiny_checkpoint

    name = FLAGS.preset if FLAGS.family == "dense" else FLAGS.family
    tag = f"{name}-L{FLAGS.layers or 'all'}-bf16"
    raw, comp = work / tag, work / f"{tag}-compressed"
    if not (raw / "config.json").is_file():
        tmp = pathlib.Path(tempfile.mkdtemp(dir=work))
        overrides = {"num_hidden_layers": FLAGS.layers} if FLAGS.layers else None
        if FLAGS.family == "dense":
            write_tiny_checkpoint(tmp, FLAGS.preset, dtype="bfloat16", overrides=overrides)
        else:
            write_moe_checkpoint(tmp, FLAGS.family, FLAGS.layers)
        os.replace(tmp, raw)
    if not (comp / "manifest.json").is_file():
        shutil.rmtree(comp, ignore_errors=True)
        t0 = time.perf_counter()
        compress_checkpoint(raw, comp)
        print(f"compressed {raw} in {time.perf_counter() - t0:.1f} s", flush=True)
    return raw, comp, read_manifest(comp)


def device_bytes(model) -> dict[str, int]:
    """Bytes of the layer matrices, of the routed experts and of all parameters, summed over leaves
    (global)."""
    from flax import nnx

    stacked = experts = total = 0
    for path, var in nnx.to_flat_state(model.placed.state):
        leaves = jax.tree.leaves(var.get_value())
        nb = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)
        total += nb
        axes = var.get_metadata()["logical_axes"]
        if "layers" in axes and len(axes) >= 3:
            stacked += nb
        if "experts" in axes:
            experts += nb
    return dict(layer_matrices=stacked, routed_experts=experts, all_params=total)


def bench_decode(models: dict, prompt: list[int]) -> dict:
    n1, n2 = FLAGS.short, FLAGS.long
    prompts = [prompt] * FLAGS.batch
    outs = {}
    for name, m in models.items():  # warm-up: compiles every program both lengths use
        outs[name] = m.generate(prompts, max_new_tokens=n2)[0]
        m.generate(prompts, max_new_tokens=n1)
    identical = len({tuple(o) for o in outs.values()}) == 1
    per = {name: dict(tok_s=[], t_long=[], t_short=[]) for name in models}
    with Contention() as c:
        for _ in range(FLAGS.runs):
            for name, m in models.items():
                t0 = time.perf_counter()
                m.generate(prompts, max_new_tokens=n2)
                t1 = time.perf_counter()
                m.generate(prompts, max_new_tokens=n1)
                t2 = time.perf_counter()
                per[name]["t_long"].append(t1 - t0)
                per[name]["t_short"].append(t2 - t1)
                per[name]["tok_s"].append(FLAGS.batch * (n2 - n1) / max(1e-9, (t1 - t0) - (t2 - t1)))
    res = {"greedy_outputs_identical": identical, "foreign_cpu_fraction": c.foreign}
    for name, d in per.items():
        res[name] = dict(
            decode_tok_s_median=float(np.median(d["tok_s"])),
            decode_tok_s_runs=[round(x, 3) for x in d["tok_s"]],
            t_long_median_s=float(np.median(d["t_long"])),
            t_short_median_s=float(np.median(d["t_short"])),
        )
    names = list(models)
    res["ratio_compressed_over_raw"] = res[names[1]]["decode_tok_s_median"] / res[names[0]]["decode_tok_s_median"]
    # paired per-run ratios are less sensitive to load drifting between runs
    paired = [b / a for a, b in zip(per[names[0]]["tok_s"], per[names[1]]["tok_s"])]
    res["ratio_paired_median"] = float(np.median(paired))
    return res


# ------------------------------------------------------------------------------------- breakdown


def _stacked(model, name: str):
    """A layer weight of all layers with a leading layers axis (stacking the per-layer weights of
    an unrolled model, compressed ones leaf by leaf)."""
    module = model.placed.module
    if not module.unrolled:
        return module.layers[name].get_value()
    return jax.tree.map(lambda *a: jnp.stack(a), *[layer[name].get_value() for layer in module.layers])


def bench_breakdown(raw_model, comp_model, runs: int) -> dict:
    """ms per layer of the 4 matmuls at m = 1, in one lax.scan over all layers of the model."""
    from infire_jax.models.layers import materialize

    specs = dict(wqkv="btd,kghd->btkgh", wo="btkh,dkh->btd",
                 w_gate_up="btd,cfd->btcf", w_down="btf,df->btd")
    comp = {k: _stacked(comp_model, k) for k in specs}
    raw = {k: _stacked(raw_model, k) for k in specs}
    f32 = {k: jax.jit(lambda w: materialize(w, jnp.float32))(v) for k, v in raw.items()}
    xs = {k: jnp.ones((1, 1) + (w.shape[2:] if k == "wo" else w.shape[-1:]), jnp.float32) for k, w in raw.items()}
    n_layers = raw["wqkv"].shape[0]

    def prog(decode_only: bool):
        def f(ws, xs):
            def body(c, wl):
                for k, w in wl.items():
                    d = materialize(w, jnp.float32)
                    c = c + (d.reshape(-1)[:: 4096].sum() if decode_only else jnp.einsum(specs[k], xs[k], d).sum())
                return c, None

            return lax.scan(body, jnp.float32(0), ws)[0]

        return jax.jit(f)

    cases = {"f32_weights": (prog(False), f32), "bf16_weights": (prog(False), raw),
             "palette12_weights": (prog(False), comp), "palette12_decode_only": (prog(True), comp)}
    for fn, w in cases.values():
        jax.block_until_ready(fn(w, xs))
    times = {k: [] for k in cases}
    for _ in range(runs):
        for k, (fn, w) in cases.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(w, xs))
            times[k].append(time.perf_counter() - t0)
    out = {k: dict(ms_per_layer_median=1e3 * float(np.median(v)) / n_layers,
                   ms_per_layer_min=1e3 * float(np.min(v)) / n_layers) for k, v in times.items()}
    steps = FLAGS.decode_steps
    f32, bf16 = out["f32_weights"]["ms_per_layer_median"], out["bf16_weights"]["ms_per_layer_median"]
    out["raw_bf16_in_decode_program_est_ms_per_layer"] = f32 + (bf16 - f32) / steps
    out["note"] = (
        "bf16_weights converts every layer on every call: XLA rewrites materialize's bit-op upcast into a "
        "bf16->f32 `convert` (slow on this CPU). In the decode program XLA also hoists that convert of all "
        "stacked bf16 weights out of the decode-step loop (an f32 copy of every layer per dispatch), so raw "
        "bf16 decode costs about f32_weights + (bf16_weights - f32_weights) / decode_steps per layer and step. "
        "palette12 decodes each layer inside every step and is never rewritten into a convert."
    )
    return out


def main(argv):
    del argv
    import infire_jax

    if FLAGS.runs < 5:
        raise app.UsageError("--runs must be >= 5")
    work = pathlib.Path(FLAGS.work_dir or os.path.join(tempfile.gettempdir(), "infire_jax_bench_compressed"))
    work.mkdir(parents=True, exist_ok=True)
    raw_dir, comp_dir, manifest = checkpoints(work)
    t0 = time.perf_counter()
    raw = infire_jax.load(raw_dir, mesh=FLAGS.mesh, dtype="bfloat16", decode_steps=FLAGS.decode_steps, kernels=FLAGS.kernels)
    t_raw = time.perf_counter() - t0
    t0 = time.perf_counter()
    comp = infire_jax.load(comp_dir, mesh=FLAGS.mesh, dtype="bfloat16", decode_steps=FLAGS.decode_steps, kernels=FLAGS.kernels)
    t_comp = time.perf_counter() - t0
    prompt = np.random.default_rng(0).integers(5, raw.cfg.vocab_size, FLAGS.prompt_len).tolist()

    results = dict(
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), jax=jax.__version__,
                     loadavg_at_start=os.getloadavg()),
        model=dict(family=FLAGS.family, preset=FLAGS.preset if FLAGS.family == "dense" else None,
                   experts=raw.cfg.get("num_experts") or raw.cfg.get("num_local_experts"),
                   experts_per_token=raw.cfg.get("num_experts_per_tok"), expert_mlp=raw.cfg.get("moe_intermediate_size"),
                   layers=raw.cfg.num_layers, hidden=raw.cfg.hidden_size,
                   mlp=raw.cfg.intermediate_size, vocab=raw.cfg.vocab_size, mesh=FLAGS.mesh,
                   raw_dir=str(raw_dir), compressed_dir=str(comp_dir)),
        checkpoint=manifest["totals"],
        device_bytes=dict(raw_bf16=device_bytes(raw), compressed=device_bytes(comp)),
        load_seconds=dict(raw_bf16=t_raw, compressed=t_comp),
        settings=dict(runs=FLAGS.runs, prompt_len=FLAGS.prompt_len, short=FLAGS.short, long=FLAGS.long,
                      decode_steps=FLAGS.decode_steps, batch=FLAGS.batch, kernels=FLAGS.kernels, sampling="greedy"),
    )
    db = results["device_bytes"]
    db["layer_matrices_ratio"] = db["compressed"]["layer_matrices"] / db["raw_bf16"]["layer_matrices"]
    if db["raw_bf16"]["routed_experts"]:
        db["routed_experts_ratio"] = db["compressed"]["routed_experts"] / db["raw_bf16"]["routed_experts"]
    results["decode"] = bench_decode({"raw_bf16": raw, "compressed": comp}, prompt)
    if FLAGS.breakdown and FLAGS.family == "dense":
        results["breakdown"] = bench_breakdown(raw, comp, FLAGS.runs * 2)
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    pathlib.Path(FLAGS.out).write_text(json.dumps(results, indent=1) + "\n")
    d = results["decode"]
    print(json.dumps({k: v for k, v in results.items() if k not in ("checkpoint",)}, indent=1))
    print(f"decode tok/s raw bf16 {d['raw_bf16']['decode_tok_s_median']:.2f}, compressed "
          f"{d['compressed']['decode_tok_s_median']:.2f}, ratio {d['ratio_compressed_over_raw']:.3f} "
          f"(paired {d['ratio_paired_median']:.3f}); wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
