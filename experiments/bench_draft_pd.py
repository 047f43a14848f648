"""P/D with a draft model: what the decode worker spends when the draft's prompt KV is shipped from the
prefill worker vs fed to the draft on the decode worker, paired in one process.

One in-process deployment (prefill tp=1 on device 0, decode tp=1 on device 1, the draft beside each),
two engines over its compiled programs: "shipped" (the prefill worker prefills the draft's KV and ships
it with the target's pages) and "fed_on_decode" (the prefill worker has no draft, so the decode worker's
draft is fed the prompt on its first call). Every decode call verifies (the cost model off), one request
of --prompt_tokens random tokens at a time. Timed: each decode-worker step after its pages have arrived
(so the prefill worker's work is not in it); first_step_s is the row's first step (its first draft
call + verification), decode_s all of them. Medians over --runs paired rounds after a warm-up.

  python experiments/bench_draft_pd.py --draft_layers 10 --prompt_tokens 480 --runs 3
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import bench_common as bc  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "HF checkpoint (default: SmolLM2-135M-Instruct real weights, fetched once).")
flags.DEFINE_integer("draft_layers", 10, "The draft: the target's first this many layers (same weights file).")
flags.DEFINE_integer("prompt_tokens", 480, "Prompt length (random token ids).")
flags.DEFINE_integer("new_tokens", 9, "Tokens generated per request.")
flags.DEFINE_integer("runs", 3, "Paired rounds (medians), after a warm-up round.")
flags.DEFINE_string("out", "bench_draft_pd.json", "JSON output path.")


def _draft_dir(target: pathlib.Path, layers: int, root: pathlib.Path) -> pathlib.Path:
    """A checkpoint of the target's first `layers` layers: its files linked, num_hidden_layers cut."""
    out = root / f"draft{layers}"
    out.mkdir()
    for f in target.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f)
    cfg = json.loads((target / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=layers)))
    return out


def main(argv: list[str]) -> None:
    del argv
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    import numpy as np

    from infire_jax.engine.build import Deployment, EngineOptions
    from infire_jax.engine.disagg import generate
    from infire_jax.engine.sampling import per_request

    target = pathlib.Path(FLAGS.model_dir) if FLAGS.model_dir else bc.ensure_smollm2_instruct()
    with tempfile.TemporaryDirectory() as tmp:
        draft = _draft_dir(target, FLAGS.draft_layers, pathlib.Path(tmp))
        options = EngineOptions(kv_pages=2 * -(-(FLAGS.prompt_tokens + FLAGS.new_tokens + 8) // 16), page_size=16,
                                max_decode_batch=1, decode_steps=4, prefill_chunk=512, speculative=f"draft:{draft}:4")
        deployment = Deployment(target, ["tp=1@0-0"], ["tp=1@1-1"], options=options)
        vocab = deployment.cfg.vocab_size
        prompt = np.random.default_rng(0).integers(100, vocab - 1, FLAGS.prompt_tokens).tolist()

        def run(shipped: bool) -> dict:
            engine = deployment.engine()
            if not shipped:
                engine.prefill_workers[0].draft = None
            d = engine.decode_workers[0]
            d.speculator.adaptive = False
            steps, step = [], d.step

            def timed():
                jax.block_until_ready((d.k_pages, d.v_pages, d.draft_kv.k_pages, d.draft_kv.v_pages))
                t0 = time.perf_counter()
                out = step()
                if d.in_call:
                    steps.append(time.perf_counter() - t0)
                return out

            d.step = timed
            r = generate(engine, [prompt], per_request(1, FLAGS.new_tokens))[0]
            s = engine.stats()
            return dict(output=r.output, first_step_s=steps[0], decode_s=sum(steps),
                        **{k: s[k] for k in ("draft_prefill_tokens", "draft_fed_tokens", "draft_kv_bytes_transferred",
                                             "spec_proposed_tokens", "spec_accepted_tokens")})

        for shipped in (True, False):
            run(shipped)  # warm-up: compiles
        rounds = {True: [], False: []}
        for i in range(FLAGS.runs):
            for shipped in ((True, False) if i % 2 == 0 else (False, True)):
                rounds[shipped].append(run(shipped))
    same = all(a["output"] == b["output"] for a, b in zip(rounds[True], rounds[False]))
    result = dict(
        model_dir=str(target), draft_layers=FLAGS.draft_layers, prompt_tokens=FLAGS.prompt_tokens,
        new_tokens=FLAGS.new_tokens, runs=FLAGS.runs, same_tokens=same,
        **{name: dict({k: statistics.median(r[k] for r in rs) for k in ("first_step_s", "decode_s")},
                      **{k: v for k, v in rs[0].items() if k not in ("output", "first_step_s", "decode_s")})
           for name, rs in (("shipped", rounds[True]), ("fed_on_decode", rounds[False]))},
    )
    print(json.dumps(result, indent=1))
    with open(FLAGS.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)
