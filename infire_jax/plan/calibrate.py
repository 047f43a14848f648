"""Calibration: the simulator's cost model, given this CPU's measured rates, predicts the engine's
own measured prefill and decode step times here.

Machine figures (measured here, independently of the models being predicted):
  bandwidth      np.copyto of 256 MiB fp32 into a preallocated buffer, (read + written) bytes / s
                 (experiments/bench_common.py's method): the rate weights stream at;
  matmul rates   achieved fp32 FLOP/s of x (m, K) . W (N, K)^T (the engine's weight layout, jitted)
                 for m = 1 ... 512 rows, on cache-resident weights (so the figure is the kernel's
                 compute rate at that m, not memory): small-m matmuls on this CPU run far below the
                 large-matmul peak, and the cost model uses the rate at the step's row count;
  overheads      per decode step and per layer: the decode program of two tiny models (hidden 64,
                 vocab 512, 2 and 8 layers; weights of a few hundred KB, so the time is dispatch and
                 op overhead) -> intercept and slope per layer.
Engine figures: the compiled programs called directly (as experiments/bench_prefill.py does): the
prefill program on (B, T) prompts, and the paged decode program (8 steps per call, per step =
call / 8) at a given context. Every figure is the minimum over runs (this machine is shared; the
minimum is the least disturbed run), and each model's machine figures are re-measured right before
its engine figures so both see the same machine state.

Prediction = simulator.CostModel(plan_capacity(model, cpu, weights=fp32)).decode_step / stage_time
with the measured Hardware: max(compute at the measured rate for the step's rows, bytes / bandwidth)
+ step overhead + layers x layer overhead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import tempfile
import time
from typing import Any, Callable, Sequence

import numpy as np

from infire_jax.plan.capacity import Deployment, plan_capacity
from infire_jax.plan.hardware import Hardware, cpu_hardware
from infire_jax.plan.simulator import CostModel

__all__ = [
    "Case", "DEFAULT_CASES", "pin_one_core", "measure_rates", "measure_overheads", "measure_case", "predict_case", "calibrate",
    "fit_engine_steps", "call_time_spread", "replay_sessions",
]

MATMUL_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


CLOCK: list[Callable[[], float]] = [time.process_time]  # process CPU time (see pin_one_core)


def pin_one_core(core: int = 0) -> bool:
    """Run this process (and the threads it creates afterwards: call before JAX starts) on one core.
    On a shared machine wall time measures the scheduler; the process's CPU time on one core
    measures the work. Returns False where affinity is not supported (then wall time is used)."""
    try:
        os.sched_setaffinity(0, {core})
        return True
    except (AttributeError, OSError):
        CLOCK[0] = time.perf_counter
        return False


def _min_time(fn: Callable[[], Any], runs: int, warmup: int = 1) -> float:
    """Minimum over runs of the clock (process CPU time by default) spent in fn."""
    clock = CLOCK[0]
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(runs):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def measure_rates(runs: int = 5, hidden: int = 576, mlp: int = 1536, mbytes: int = 224) -> dict[str, Any]:
    """This CPU's rates, measured with the clock and core the engine figures use:
      bandwidth     np.copyto of the same bytes into a preallocated buffer, (read + written) / time;
      matmul rates  FLOP/s of a scan over stacked (mlp x hidden) and (hidden x mlp) fp32 weights
                    applied to m rows (x . W^T, the engine's layout), for m = 1 ... 512: `mbytes` MB
                    of weights, far beyond the caches, so at small m the figure is the rate the
                    matmul kernel streams weights at and at large m its compute rate. The shapes are
                    a model's MLP shapes (the kernel's speed depends on them)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    layers = max(2, int(mbytes * 1e6 // (2 * hidden * mlp * 4)))
    w1 = jnp.asarray(rng.standard_normal((layers, mlp, hidden), np.float32))
    w2 = jnp.asarray(rng.standard_normal((layers, hidden, mlp), np.float32))
    nbytes = 2 * layers * mlp * hidden * 4
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    bw = 2 * nbytes / _min_time(lambda: np.copyto(dst, src), runs)
    src = dst = None  # free before the matmuls
    nt = (((1,), (1,)), ((), ()))

    @jax.jit
    def stack(x, w1, w2):
        def body(x, ws):
            y = jax.lax.dot_general(x, ws[0], nt)
            return x + 1e-3 * jax.lax.dot_general(y, ws[1], nt), None

        return jax.lax.scan(body, x, (w1, w2))[0]

    rates = []
    for m in MATMUL_ROWS:
        x = jnp.ones((m, hidden), jnp.float32)
        t = _min_time(lambda: stack(x, w1, w2).block_until_ready(), runs)
        rates.append((m, 2.0 * m * (nbytes / 4) / t))
    return dict(bandwidth=bw, matmul_rates=rates, peak=max(r for _, r in rates),
                method=f"copy bandwidth; scan of {layers} x ({mlp}x{hidden}, {hidden}x{mlp}) fp32 matmuls at m rows; "
                       f"minimum over {runs} runs of the process CPU time")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str  # model label
    overrides: dict  # on the smollm-135m preset
    kind: str  # "decode" | "prefill"
    batch: int
    tokens: int  # decode: context length; prefill: prompt length


DEFAULT_CASES: tuple[Case, ...] = tuple(
    [Case(f"smollm-L{L}", dict(num_hidden_layers=L), "decode", b, 128) for L in (8, 30) for b in (1, 4, 16)]
    + [Case(f"smollm-L{L}", dict(num_hidden_layers=L), "prefill", b, t) for L in (8, 30) for b, t in ((1, 128), (1, 512), (4, 256))]
    + [Case("smollm-L16-D384", dict(num_hidden_layers=16, hidden_size=384, intermediate_size=1024, num_attention_heads=6,
                                     num_key_value_heads=2), k, b, t)
       for k, b, t in (("decode", 1, 128), ("decode", 8, 128), ("prefill", 1, 512))]
)

TINY_OVERRIDES = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16)


def _checkpoint(root: pathlib.Path, name: str, overrides: dict) -> pathlib.Path:
    from infire_jax.checkpoint.tiny import write_tiny_checkpoint

    d = root / name
    if not (d / "model.safetensors").is_file():
        write_tiny_checkpoint(d, "smollm-135m", overrides=overrides, tokenizer=False)
    return d


def _load(model_dir: pathlib.Path):
    import infire_jax

    return infire_jax.load(model_dir, decode_steps=8)


def _decode_call(model, batch: int, context: int, steps: int = 8):
    from infire_jax.engine.programs import bucket
    from infire_jax.engine.sampling import SamplingParams, pack_params

    p = model.programs
    page, num_pages = 16, 512
    per_row = bucket(-(-(context + steps) // page))
    b = p.batch_bucket(batch)
    if b * per_row > num_pages:
        num_pages = b * per_row
    kp, vp = p.allocate_pages(num_pages, page)
    table = (np.arange(b * per_row, dtype=np.int32).reshape(b, per_row)) % num_pages
    lengths = np.full(b, context, np.int32)
    tokens = np.full(b, 7, np.int32)
    active = np.arange(b) < batch
    sp = pack_params([SamplingParams(steps)] * batch, b)
    fn = p.decode_fn(b, per_row, num_pages, page, steps, False)
    st = {"k": kp, "v": vp}

    def call():
        out, st["k"], st["v"] = fn(p.placed.state, st["k"], st["v"], table, lengths, tokens, active, sp)
        np.asarray(out)

    return call


def _prefill_call(model, batch: int, t: int):
    from infire_jax.engine.sampling import SamplingParams, pack_params

    p = model.programs
    b = p.batch_bucket(batch)
    tok = p.put(np.full((b, t), 5, np.int32), ("batch", "seq"))
    lens = p.put(np.full((b,), t, np.int32), ("batch",))
    sp = p.put_sampling(pack_params([SamplingParams(1)] * b, b))
    fn = p.prefill_fn(b, t)

    def call():
        first, _, k, v = fn(p.placed.state, tok, lens, sp)
        np.asarray(first)
        k.block_until_ready()

    return call


def measure_overheads(root: pathlib.Path, runs: int = 7) -> dict[str, float]:
    """Per-step and per-layer overhead of the decode program, from two tiny models (2 and 8 layers)."""
    times = {}
    for layers in (2, 8):
        m = _load(_checkpoint(root, f"tiny-L{layers}", dict(TINY_OVERRIDES, num_hidden_layers=layers)))
        times[layers] = _min_time(_decode_call(m, 1, 64), runs) / 8
    slope = max(0.0, (times[8] - times[2]) / 6)
    return dict(layer_overhead_s=slope, step_overhead_s=max(0.0, times[2] - 2 * slope), tiny_step_s=times)


def measure_case(model, case: Case, runs: int = 5) -> float:
    """Seconds per decode step (the decode program's call / 8) or per prefill call."""
    if case.kind == "decode":
        return _min_time(_decode_call(model, case.batch, case.tokens), runs) / 8
    return _min_time(_prefill_call(model, case.batch, case.tokens), runs)


def cpu_from(rates: dict[str, Any], overheads: dict[str, float], flops_efficiency: float = 1.0,
             weight_passes: float = 0.0) -> Hardware:
    return cpu_hardware(
        bandwidth=rates["bandwidth"], flops=rates["peak"], matmul_rates=tuple(tuple(r) for r in rates["matmul_rates"]),
        step_overhead_s=overheads["step_overhead_s"], layer_overhead_s=overheads["layer_overhead_s"],
        flops_efficiency=flops_efficiency, weight_passes=weight_passes,
    )


def predict_case(model_dir: pathlib.Path, case: Case, hw: Hardware) -> dict[str, Any]:
    cfg = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
    cap = plan_capacity(cfg | {"_name": case.name}, Deployment(hw, 1, mesh="tp=1", weights="fp32"))
    cost = CostModel(cap, hw)
    if case.kind == "decode":
        d = cost.decode_step(case.batch, case.tokens + 4, detail=True)  # mean context over the 8 steps
        d["extra"] = d.get("extra", 0.0)
    else:
        terms = {k: v * case.batch for k, v in cost.chunk_terms(0, case.tokens).items()}
        d = cost.stage_time(case.batch * case.tokens, case.batch, detail=True, **terms)
    d["weight_time"] = cost.layer_bytes / cost.bw
    return d


def weight_copies(model, batch: int = 1, context: int = 128) -> dict[str, Any]:
    """Evidence for weight_passes: bytes of copy / transpose / dynamic-slice results of >= 1 MB in the
    compiled decode program (per layer-loop iteration, as printed), against one layer's weights."""
    import re

    from infire_jax.engine.programs import bucket
    from infire_jax.engine.sampling import SamplingParams, pack_params

    p = model.programs
    page, num_pages, steps = 16, 512, 8
    per_row = bucket(-(-(context + steps) // page))
    b = p.batch_bucket(batch)
    kp, vp = p.allocate_pages(num_pages, page)
    table = (np.arange(b * per_row, dtype=np.int32).reshape(b, per_row)) % num_pages
    args = (p.placed.state, kp, vp, table, np.full(b, context, np.int32), np.full(b, 7, np.int32),
            np.arange(b) < batch, pack_params([SamplingParams(steps)] * batch, b))
    txt = p.decode_fn(b, per_row, num_pages, page, steps, False).lower(*args).compile().as_text()
    ops: dict[str, int] = {}
    for line in txt.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = f32\[([\d,]*)\]\S* (copy|transpose|dynamic-slice)\(", line)
        if m:
            n = 4 * int(np.prod([int(d) for d in m.group(1).split(",") if d] or [1]))
            if n >= 1 << 20 and not m.group(1).startswith(("8,", "30,", "16,")):  # skip whole-stack KV arrays
                ops[m.group(2)] = ops.get(m.group(2), 0) + n
    return ops


def calibrate(
    cases: Sequence[Case] = DEFAULT_CASES,
    root: str | os.PathLike | None = None,
    runs: int = 5,
    reference: str = "smollm-L8",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure every case and predict it twice:
      roofline    the cost model with the measured rates alone (flops_efficiency 1, weight_passes 0);
      calibrated  plus two engine-on-this-CPU constants fitted on the `reference` model's cases only:
                  flops_efficiency = predicted / measured compute of its longest prefill, and
                  weight_passes = (measured - predicted) / (weight bytes / bandwidth) of its batch-1
                  decode. The other models' cases are held out (errors reported separately)."""
    root = pathlib.Path(root or os.path.join(tempfile.gettempdir(), "infire_jax_calibrate"))
    root.mkdir(parents=True, exist_ok=True)
    overheads = measure_overheads(root)
    log(f"clock: {'process CPU time, one core' if CLOCK[0] is time.process_time else 'wall'}; overheads: step "
        f"{overheads['step_overhead_s'] * 1e3:.3f} ms, layer {overheads['layer_overhead_s'] * 1e3:.3f} ms")
    by_model: dict[str, list[Case]] = {}
    for c in cases:
        by_model.setdefault(c.name, []).append(c)
    order = sorted(by_model, key=lambda n: n != reference)
    fitted = dict(flops_efficiency=1.0, weight_passes=0.0)
    best_bw = [measure_rates(runs=max(runs, 7), mbytes=128)["bandwidth"]]
    records, evidence = [], {}
    for name in order:
        group = by_model[name]
        model_dir = _checkpoint(root, name, group[0].overrides)
        model = _load(model_dir)
        cfgj = json.loads((model_dir / "config.json").read_text())
        rates = measure_rates(runs=runs, hidden=cfgj["hidden_size"], mlp=cfgj["intermediate_size"])
        # the machine's best observed bandwidth (memory bandwidth is shared with other jobs, and the
        # engine figures are best runs too)
        best_bw[0] = max(best_bw[0], rates["bandwidth"])
        rates["bandwidth_now"], rates["bandwidth"] = rates["bandwidth"], best_bw[0]
        log(f"{name}: bandwidth {rates['bandwidth'] / 1e9:.1f} GB/s, matmul "
            + ", ".join(f"m={m}: {r / 1e9:.0f}" for m, r in rates["matmul_rates"]) + " GFLOP/s")
        measured = {id(c): measure_case(model, c, runs) for c in group}
        roof_hw = cpu_from(rates, overheads)
        roof = {id(c): predict_case(model_dir, c, roof_hw) for c in group}
        if name == reference:
            # measured - (overheads) = t_compute(measured rates) / flops_efficiency + weight_passes * t_weights,
            # solved by least squares in relative terms over the reference model's cases
            rows, ys = [], []
            for c in group:
                r = roof[id(c)]
                rest = r["time"] - max(r["compute"], r["memory"]) - r.get("extra", 0.0)
                y = measured[id(c)] - rest
                rows.append([r["compute"] / y, r["weight_time"] / y])
                ys.append(1.0)
            (inv_eff, passes), *_ = np.linalg.lstsq(np.asarray(rows), np.asarray(ys), rcond=None)
            fitted["flops_efficiency"] = float(1.0 / max(inv_eff, 1e-6))
            fitted["weight_passes"] = float(max(0.0, passes))
            fitted["fit_cases"] = [f"{x.kind} B={x.batch} T={x.tokens}" for x in group]
            log(f"  fitted on {name}: flops_efficiency {fitted['flops_efficiency']:.3f}, "
                f"weight_passes {fitted['weight_passes']:.2f}")
            try:
                evidence = weight_copies(model)
            except Exception as e:  # noqa: BLE001 - evidence only
                evidence = dict(error=f"{type(e).__name__}: {e}")
        cal_hw = cpu_from(rates, overheads, fitted["flops_efficiency"], fitted["weight_passes"])
        for c in group:
            cal = predict_case(model_dir, c, cal_hw)
            m_, r = measured[id(c)], roof[id(c)]
            rec = dict(model=name, kind=c.kind, batch=c.batch, tokens=c.tokens, held_out=name != reference,
                       measured_ms=m_ * 1e3, roofline_ms=r["time"] * 1e3, roofline_error=r["time"] / m_ - 1,
                       predicted_ms=cal["time"] * 1e3, error=cal["time"] / m_ - 1, bound=cal["bound"],
                       bandwidth_gbs=rates["bandwidth"] / 1e9, loadavg=round(os.getloadavg()[0], 2))
            records.append(rec)
            log(f"  {c.kind:7s} B={c.batch:2d} {'ctx' if c.kind == 'decode' else 'T'}={c.tokens:4d}: measured "
                f"{m_ * 1e3:8.2f} ms  roofline {r['time'] * 1e3:8.2f} ({100 * rec['roofline_error']:+4.0f}%)  "
                f"calibrated {cal['time'] * 1e3:8.2f} ({100 * rec['error']:+4.0f}%){'' if rec['held_out'] else '  [fit model]'}")
        del model
    held = np.array([abs(r["error"]) for r in records if r["held_out"]])
    allr = np.array([abs(r["error"]) for r in records])
    roofe = np.array([abs(r["roofline_error"]) for r in records])
    return dict(
        clock="process CPU time on one core" if CLOCK[0] is time.process_time else "wall time",
        overheads=overheads, fitted=fitted, weight_copies_evidence=evidence, records=records,
        held_out_cases=int(len(held)), held_out_within_25pct=int((held <= 0.25).sum()),
        held_out_median_abs_error=float(np.median(held)) if len(held) else None,
        all_within_25pct=int((allr <= 0.25).sum()), cases=len(records),
        roofline_within_25pct=int((roofe <= 0.25).sum()),
    )


# ------------------------------------------------------------------------------------------------
# Agent traces: the simulator's engine loop calibrated on the engine's own steps
# ------------------------------------------------------------------------------------------------


def fit_engine_steps(
    cost: CostModel,
    decode_s: dict[tuple[int, int], float],
    chunk_s: dict[tuple[int, int], float],
    bandwidth: float,
    link_bw: float,
    whole_s: dict[int, float] | None = None,
    transfer_s: dict[int, float] | None = None,
    kv_bytes_per_token: float = 0.0,
    call_overhead_s: float = 0.0,
    decode_steps: int = 8,
    spread: float = 0.0,
) -> Hardware:
    """This CPU as the simulator's Hardware, from the engine's step times measured in isolation:
      decode_s[(rows, context)]   seconds per decode step of `rows` rows (a power of two) at that context
      chunk_s[(width, prefix)]    seconds of one chunked-prefill call of `width` tokens (a power of two)
                                  after `prefix` cached tokens, one row
    Two contexts per row count (two prefixes per width) give the attention rate at those rows from
    the slope; the linear layers' rate at those rows is what the rest of the time leaves. Decode
    fills the table below the smallest chunk width, chunks the rest. call_overhead_s: the engine's
    fixed cost per program call (Python, dispatch, reading tokens back), measured apart (a decode
    call of one step against one of many) and kept out of the per-token rates (the simulator's
    engine loop charges it per call: Hardware.step_overhead_s). bandwidth: the copy rate (the memory term); link_bw:
    bytes/s of a KV page move between two devices of this process.
      whole_s[n]       seconds of a whole-prompt prefill call of n tokens (nothing cached): the
                       ratio to the fitted chunk time at the same padded width, per width, is
                       Hardware.whole_prompt_factors (their median whole_prompt_factor)
      transfer_s[n]    seconds one P -> D shipment of an n-token prompt adds (two or more n): a line
                       in bytes (kv_bytes_per_token each) gives link_bw and transfer_latency_s
    spread: Hardware.call_time_spread (call_time_spread() of the repeated calls behind the medians)."""
    n_layers = cost.n_layers

    def shared_slope(points: dict[int, list[tuple[float, float]]]) -> tuple[float, dict[int, float]]:
        """Least squares of y = base[m] + slope * x over every m: one attention cost per FLOP for the
        family (a shared machine makes single slopes noisy), a base time per row count."""
        xs, ys, cols = [], [], sorted(points)
        for m in cols:
            for x, y in points[m]:
                xs.append([x] + [1.0 if c == m else 0.0 for c in cols])
                ys.append(y)
        sol, *_ = np.linalg.lstsq(np.asarray(xs), np.asarray(ys), rcond=None)
        slope = max(float(sol[0]), 1e-15)
        return slope, {m: float(np.mean([y - slope * x for x, y in points[m]])) for m in cols}

    # decode: time = (lin + head)(m) / R(m) + attn / A
    dec_pts: dict[int, list[tuple[float, float]]] = {}
    for (m, ctx), t in decode_s.items():
        dec_pts.setdefault(m, []).append((cost.attn_decode * n_layers * m * ctx, t))
    if 1 not in dec_pts:
        raise ValueError("decode_s needs rows = 1 (the LM head of a prefill call runs at one row)")
    slope, base = shared_slope(dec_pts)
    base = {m: b - call_overhead_s / decode_steps for m, b in base.items()}  # decode_s: per step of such calls
    rates = {m: 2.0 * (cost.dense_elems + cost.head_elems) * m / max(b, 1e-9) for m, b in base.items()}
    attn = {m: 1.0 / slope for m in base}
    head_rate_1 = rates[1]
    # chunks: time = lin(c) / R(c) + head(1) / R(1) + attn pairs / A
    pf_pts: dict[int, list[tuple[float, float]]] = {}
    for (c, prefix), t in chunk_s.items():
        pairs = cost.chunk_terms(prefix, c)["pf_pairs_full"]
        pf_pts.setdefault(c, []).append((cost.attn_prefill * n_layers * pairs,
                                         t - 2.0 * cost.head_elems / head_rate_1 - call_overhead_s))
    if pf_pts:
        lo = min(pf_pts)
        for m in [m for m in rates if m >= lo]:
            del rates[m], attn[m]
        slope, base = shared_slope(pf_pts)
        for c, b in base.items():
            rates[c] = 2.0 * cost.dense_elems * c / max(b, 1e-9)
            attn[c] = 1.0 / slope
    extra: dict[str, Any] = {}
    if transfer_s and len(transfer_s) >= 2 and kv_bytes_per_token > 0:
        xs = np.array([n * kv_bytes_per_token for n in transfer_s])
        ys = np.array(list(transfer_s.values()))
        slope, intercept = np.polyfit(xs, ys, 1)
        if slope > 0:
            link_bw = 1.0 / slope
        extra["transfer_latency_s"] = max(0.0, float(intercept))
    hw = cpu_hardware(
        bandwidth=bandwidth, flops=max(rates.values()), matmul_rates=tuple(sorted(rates.items())),
        attention_rates=tuple(sorted(attn.items())), link_bw=link_bw, step_overhead_s=call_overhead_s,
        call_time_spread=spread, **extra,
        measured=dict(decode_s={f"{k[0]}x{k[1]}": v for k, v in decode_s.items()},
                      chunk_s={f"{k[0]}@{k[1]}": v for k, v in chunk_s.items()}),
    )
    if whole_s:
        chunked = CostModel(cost.plan, hw)
        ratios: dict[int, list[float]] = {}
        for n, t in whole_s.items():
            width = 1 << max(4, int(n - 1).bit_length())  # the engine pads to a power of two >= 16
            ratios.setdefault(width, []).append(t / chunked.stage_time(width, 1, **chunked.chunk_terms(0, width)))
        hw = dataclasses.replace(hw, whole_prompt_factor=float(np.median([x for v in ratios.values() for x in v])),
                                 whole_prompt_factors=tuple((w, float(np.median(v))) for w, v in sorted(ratios.items())))
    return hw


def call_time_spread(samples: Sequence[Sequence[float]]) -> float:
    """How much one program call's time varies on this machine: the standard deviation of log(time /
    median) over repeated identical calls (each sequence: the times of one call shape; shapes with
    fewer than two times are skipped), pooled over the shapes with one degree of freedom per shape
    spent on its median. A shared machine's load moves each call, and the engine loop's batching
    follows those moves (Hardware.call_time_spread)."""
    sq, dof = 0.0, 0
    for times in samples:
        t = np.asarray([x for x in times if x > 0], np.float64)
        if len(t) < 2:
            continue
        d = np.log(t / np.median(t))
        sq += float(np.sum(d * d))
        dof += len(t) - 1
    return math.sqrt(sq / dof) if dof else 0.0


def replay_sessions(turns: Sequence[Any]) -> tuple[list[list[Any]], list[float]]:
    """A replayed agent trace (engine/trace.py turns: session, turn, arrival_s, append, max_tokens) as
    the simulator's sessions and start times: turn k's prompt = turn k - 1's prompt and answer + what
    turn k appends; the next turn follows the answer at once (a replay submits it when the previous
    one finishes, or at its arrival if later: only think_s = 0 traces map exactly)."""
    from infire_jax.plan.simulator import Turn

    by: dict[int, list[Any]] = {}
    for t in sorted(turns, key=lambda t: (t.session, t.turn)):
        by.setdefault(t.session, []).append(t)
    sessions, starts = [], []
    for s in sorted(by):
        prompt, out = 0, []
        for k, t in enumerate(by[s]):
            prompt += len(t.append) + (by[s][k - 1].max_tokens if k else 0)
            out.append(Turn(prompt, int(t.max_tokens), 0.0))
        sessions.append(out)
        starts.append(float(by[s][0].arrival_s))
    return sessions, starts
