"""Warm-up: compile the programs a deployment's requests will use before the first one arrives.

A dummy wave of requests with the given prompt lengths and output length runs through the engine's
own path (submit, run), so exactly the programs real requests of those shapes reach are compiled
(prefill buckets, KV handoff and insert, decode batch and page buckets; with speculation the verify
programs of those decode shapes at every verify width), or loaded from the
persistent compilation cache on a later start (infire_jax/boot.py). Its tokens do not count as the
process's first token.

Compiles run one after another: on this project's 2-core CPUs, four XLA:CPU compiles in four
threads took 2.3-2.7x longer than the same four in sequence (XLA already compiles one program on
several threads), so there is nothing to gain from overlapping them here.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from infire_jax import boot
from infire_jax.engine.disagg import Engine, generate
from infire_jax.engine.sampling import SamplingParams

__all__ = ["warm_up"]


def warm_up(engine: Engine, prompt_lengths: Sequence[int], max_new_tokens: int) -> dict[str, Any]:
    """Run one greedy dummy request per prompt length (submitted together, as a batch of real
    requests of these lengths would be) for max_new_tokens tokens; returns seconds (wall and CPU of
    this process, all threads) and programs compiled / taken from a cache (persistent or executable) / loaded from
    the executable cache / lowered meanwhile. Raises if a warm-up request fails (a deployment
    that cannot serve these shapes should say so before the first real request)."""
    if not prompt_lengths or min(prompt_lengths) < 1 or max_new_tokens < 1:
        raise ValueError(f"warm-up needs prompt lengths >= 1 and max_new_tokens >= 1, got {list(prompt_lengths)}, "
                         f"{max_new_tokens}")
    clock = boot.clock
    t0, cpu0 = time.perf_counter(), time.process_time()
    before = clock.programs_requested, clock.cache_hits, clock.programs_loaded, clock.programs_lowered
    params = [SamplingParams(max_new_tokens=max_new_tokens) for _ in prompt_lengths]
    with clock.warming_up():
        reqs = generate(engine, [[0] * int(n) for n in prompt_lengths], params)
        failed = [r.error for r in reqs if r.status == "failed"]
        if failed:
            raise RuntimeError(f"warm-up request failed: {failed[0]}")
        for worker in engine.decode_workers:  # speculation: the verify programs of the shapes decode ran
            worker.warm_verify()
    now = clock.programs_requested, clock.cache_hits, clock.programs_loaded, clock.programs_lowered
    requested, hits, loaded, lowered = (a - b for a, b in zip(now, before))
    return dict(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - cpu0,
                programs_compiled=requested - hits, programs_from_cache=hits + loaded, programs_loaded=loaded,
                programs_lowered=lowered)
