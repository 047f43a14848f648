"""Prefill throughput on this CPU: infire_jax vs transformers (and llama.cpp) vs the fp32 matmul peak.

For each batch size, B prompts of --prompt_len tokens (default 512) are prefilled.

  ours (headline, `program`): the prefill program (model.programs.prefill_fn) called directly:
      embed, all layers, K/V of every layer out, last-position logits and the first sampled token.
      tokens/s = B * prompt_len / median wall time. Compile time (first call) reported separately.
  ours (`generate`): Model.generate(max_new_tokens=1) — the same plus host-side padding, transfers
      and the cache handling of a request (time to first token).
  ours_xla (peer): our engine with kernels="xla" (XLA's prompt attention instead of infire_jax's
      causal prefill kernel), timed like ours' `generate`.
  transformers: model(input_ids, use_cache=True, logits_to_keep=1) in torch fp32 on CPU with
      torch.set_num_threads(2) (fills the KV cache, logits of the last position only, as ours).
  roofline: FLOPs of the prefill (linear layers + causal attention + one row of logits) / the
      measured fp32 matmul peak; ours_over_peak = achieved GFLOP/s / peak GFLOP/s.

  python experiments/bench_prefill.py --batch_sizes=1 --out=/tmp/bench_prefill.json
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import bench_common as bc  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "HF checkpoint (default: the smollm-135m preset, written once under "
                    "~/.cache/infire_jax/bench/).")
flags.DEFINE_list("batch_sizes", ["1", "4"], "Batch sizes (B x prompt_len tokens per prefill; 16 and 64 take "
                  "minutes per run with the transformers peer).")
flags.DEFINE_integer("prompt_len", 512, "Prompt tokens per row.")
flags.DEFINE_integer("runs", 5, "Timed runs per figure (median reported), after one warm-up run.")
flags.DEFINE_list("peer", ["transformers"], "Peers: transformers, ours_xla (our engine with kernels='xla'), "
                  "llama_cpp (optional). Empty = none.")
flags.DEFINE_integer("threads", 2, "Threads of the peers.")
flags.DEFINE_boolean("generate", True, "Also time Model.generate(max_new_tokens=1).")
flags.DEFINE_integer("bandwidth_mb", 512, "Size of the bandwidth probe buffer.")
flags.DEFINE_float("quiet_wait", 10.0, "Seconds to wait for other processes to pause before retrying a run they "
                   "disturbed (this machine is shared; 0 = never wait).")
flags.DEFINE_float("quiet_wait_budget", 120.0, "Total seconds of such waiting per run of the bench.")
flags.DEFINE_string("out", "bench_prefill.json", "JSON output path.")


def bench_ours_program(model, tokens: np.ndarray, runs: int) -> dict:
    from infire_jax.engine.programs import bucket
    from infire_jax.engine.sampling import SamplingParams, pack_params

    P = model.programs
    b0, p = tokens.shape
    b, t = P.batch_bucket(b0), bucket(p, 16)
    padded = np.zeros((b, t), np.int32)
    padded[:b0, :p] = tokens
    lengths = np.full((b,), p, np.int32)
    sp = P.put_sampling(pack_params([SamplingParams(1)] * b, b))
    tok, lens = P.put(padded, ("batch", "seq")), P.put(lengths, ("batch",))
    fn = P.prefill_fn(b, t)

    def call():
        first, _, k, v = fn(P.placed.state, tok, lens, sp)
        np.asarray(first)
        k.block_until_ready()
        v.block_until_ready()

    t0 = time.perf_counter()
    call()
    compile_s = time.perf_counter() - t0
    r = bc.quiet_runs(call, runs, warmup=1, max_runs=runs + 3, budget_s=60)
    return dict(method=f"prefill_fn(b={b}, t={t}) called directly", tok_s=b0 * p / r["median"], time=r,
                first_call_s=compile_s)


def bench_ours_generate(model, tokens: np.ndarray, runs: int) -> dict:
    prompts = tokens.tolist()
    model.generate(prompts, max_new_tokens=1)
    r = bc.quiet_runs(lambda: model.generate(prompts, max_new_tokens=1), runs, warmup=1, max_runs=runs + 3, budget_s=60)
    return dict(method="Model.generate(max_new_tokens=1)", tok_s=tokens.size / r["median"], time=r)


def bench_peer(peer, tokens: np.ndarray, runs: int) -> dict:
    r = bc.quiet_runs(lambda: peer.prefill(tokens), runs, warmup=1, max_runs=runs + 3, budget_s=90)
    return dict(tok_s=tokens.size / r["median"], time=r)


def main(argv: list[str]) -> None:
    del argv
    bc.QUIET_WAIT[0] = FLAGS.quiet_wait
    bc.QUIET_WAIT_BUDGET[0] = FLAGS.quiet_wait_budget
    model_dir = FLAGS.model_dir or str(bc.ensure_model())
    shape = bc.Shape.from_dir(model_dir)
    result: dict = dict(
        bench="prefill", model_dir=model_dir, prompt_len=FLAGS.prompt_len, runs=FLAGS.runs, params=shape.params,
        headline="ours.program.tok_s (the prefill program called directly; see module docstring)",
    )
    mach = bc.machine(FLAGS.bandwidth_mb)
    result["machine"] = mach
    peak = mach["matmul"]["peak_gflops"] * 1e9
    print(f"fp32 matmul peak {peak / 1e9:.0f} GFLOP/s (jax {mach['matmul']['jax_peak_gflops']:.0f}), "
          f"bandwidth {mach['bandwidth']['gbps']:.1f} GB/s")

    t0 = time.perf_counter()
    batches = [int(x) for x in FLAGS.batch_sizes]
    model = bc.load_ours(model_dir, max_batch=max(batches), max_tokens=FLAGS.prompt_len + 2)
    result["load_s"] = time.perf_counter() - t0
    peers = {}
    for name in [p for p in FLAGS.peer if p]:
        peer, why = bc.make_peer(name, model_dir, FLAGS.threads, max_batch=max(batches), max_tokens=FLAGS.prompt_len + 2)
        peers[name] = peer if peer is not None else why
        if peer is None:
            print(f"peer {name}: {why}")

    rows = []
    for b in batches:
        tokens = bc.prompts(b, FLAGS.prompt_len, shape.vocab)
        flops = shape.prefill_flops(b, FLAGS.prompt_len)
        row: dict = dict(batch=b, tokens=int(tokens.size), flops=flops,
                         roofline=dict(peak_tok_s=tokens.size / (flops / peak), flops_per_token=flops / tokens.size))
        try:
            row["ours"] = {"program": bench_ours_program(model, tokens, FLAGS.runs)}
        except Exception as e:  # noqa: BLE001 - internal API: fall back to the public one
            row["ours"] = {"program": dict(error=f"{type(e).__name__}: {e}"), "generate": bench_ours_generate(model, tokens, FLAGS.runs)}
            row["ours"]["program"]["tok_s"] = row["ours"]["generate"]["tok_s"]
        if FLAGS.generate and "generate" not in row["ours"]:
            row["ours"]["generate"] = bench_ours_generate(model, tokens, FLAGS.runs)
        ours = row["ours"]["program"]["tok_s"]
        row["ours"]["gflops"] = ours * flops / tokens.size / 1e9
        row["peers"] = {}
        for name, peer in peers.items():
            if isinstance(peer, str):
                row["peers"][name] = dict(status=peer)
                continue
            try:
                row["peers"][name] = bench_peer(peer, tokens, FLAGS.runs)
            except NotImplementedError as e:
                row["peers"][name] = dict(status=f"skipped: {e}")
            except Exception as e:  # noqa: BLE001
                row["peers"][name] = dict(status=f"failed: {type(e).__name__}: {e}")
        row["ratios"] = dict(
            ours_over_peak=bc.ratio(ours, row["roofline"]["peak_tok_s"]),
            ours_over_jax_peak=bc.ratio(row["ours"]["gflops"], mach["matmul"]["jax_peak_gflops"]),
            **{f"ours_over_{n}": bc.ratio(ours, p.get("tok_s")) for n, p in row["peers"].items() if n != "ours_xla"},
        )
        if "ours_xla" in row["peers"]:  # like with like: both through Model.generate
            row["ratios"]["ours_generate_over_ours_xla"] = bc.ratio(
                row["ours"].get("generate", {}).get("tok_s"), row["peers"]["ours_xla"].get("tok_s"))
        rows.append(row)
        peer_txt = "  ".join(
            f"{n} {p['tok_s']:.0f}" if p.get("tok_s") else f"{n} {p.get('status', '-')}" for n, p in row["peers"].items()
        )
        gen = row["ours"].get("generate", {}).get("tok_s")
        print(f"batch {b:3d} x {FLAGS.prompt_len}: ours {ours:7.0f} tok/s ({row['ours']['gflops']:.0f} GFLOP/s, "
              f"{100 * row['ratios']['ours_over_peak']:.0f}% of peak; generate {gen or float('nan'):.0f})  {peer_txt}")
        result["rows"] = rows
        bc.write_json(FLAGS.out, result)
    result["compile_seconds"] = {str(k): v for k, v in getattr(model.programs, "compile_seconds", {}).items()}
    bc.write_json(FLAGS.out, result)


if __name__ == "__main__":
    app.run(main)
