"""Prefill/decode cluster simulator: best disaggregated vs best colocated plan by goodput per GPU.

  python experiments/simulate_pd.py --model=kimi_k25 --hardware=h100 --count=32 --workload=rag --json
  python experiments/simulate_pd.py --model=kimi_k25 --hardware=h100 --count=32 --workload=chat --plot=chat.png
  python experiments/simulate_pd.py --model=kimi_k25 --hardware=h100 --count=8 --decode_table

Searches P:D splits of --count devices and per-phase parallelism (instance meshes: tp inside a node,
pp across nodes, pp=2 inside a node; the two smallest instance sizes the model fits), and colocated
plans (chunked prefill budgets 512 / 2048 / 8192), simulating Poisson arrivals of the workload
(infire_jax.plan.simulator: chat, rag, agent length distributions with default SLOs; --ttft_slo /
--tpot_slo in ms override them). Goodput = highest rate with >= 90% of requests meeting both SLOs;
per GPU = / GPUs the plan uses. --json prints one JSON object with best_colocated and
best_disaggregated (goodput_per_gpu, plan, ttft/tpot p50/p90/p99 at that rate) and the winner.
--decode_table prints roofline decode step times of the model on --count devices (per mesh).
--plot: p90 TTFT and TPOT vs arrival rate for the two best plans (PNG).

Cost: every row carries usd_per_mtok_input / usd_per_mtok_output / usd_per_mtok_all at the plan's
goodput, from the $/GPU-hour table --prices (default configs/gpu_prices.json, each price with its
source): GPU time spent prefilling is charged to prompt tokens, decoding to generated tokens
(disaggregated: the prefill instances' GPUs vs the decode ones'). --pareto=PNG draws cost per
million tokens against TPOT p90 for the best plans at 40-100% of their goodput, TTFT p90 as colour.

--workload=agent simulates multi-turn sessions (simulator.AgentWorkload: a shared system prompt,
each turn resending the conversation plus a tool output and a user message; rates are sessions/s)
with per-instance prefix caches in the KV memory each plan leaves, chunked prefill over the cached
prefix and P/D transfer of the pages decode lacks; rows add hit_ratio. Routing uses session affinity
(--no_affinity: least loaded, cache-blind); the JSON's affinity_effect compares both policies on the
best plan of each kind where routing has a choice (more than one instance of a role).

  python experiments/simulate_pd.py --model=kimi_k25 --hardware=h100 --count=16 --workload=agent --json
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "kimi_k25", "A name in configs/models/, a config.json path or a model directory.")
flags.DEFINE_string("hardware", "h100", "Accelerator (plan/hardware.py).")
flags.DEFINE_integer("count", 32, "Devices in the cluster.")
flags.DEFINE_string("workload", "chat", "chat | rag | agent")
flags.DEFINE_string("weights", "auto", "auto | bf16 | int4_experts | compressed | fp32")
flags.DEFINE_string("kv_dtype", "bf16", "KV cache dtype.")
flags.DEFINE_float("ttft_slo", None, "TTFT SLO in ms (default: the workload's).")
flags.DEFINE_float("tpot_slo", None, "TPOT SLO in ms (default: the workload's).")
flags.DEFINE_integer("requests", None, "Requests per simulation (default: by rate, 300-2000; agent: sessions).")
flags.DEFINE_integer("seed", 0, "Arrival and length seed.")
flags.DEFINE_string("meshes", None, "Restrict instance meshes, ';'-separated (e.g. 'tp=8;pp=2,tp=8').")
flags.DEFINE_bool("no_prune", False, "Simulate every candidate plan.")
flags.DEFINE_bool("decode_table", False, "Print roofline decode step times per mesh instead.")
flags.DEFINE_string("plot", None, "PNG: p90 TTFT and TPOT vs arrival rate for the two best plans.")
flags.DEFINE_string("pareto", None, "PNG: cost per million tokens vs TPOT p90 (TTFT p90 as colour).")
flags.DEFINE_string("prices", None, "$/GPU-hour table (default: configs/gpu_prices.json).")
flags.DEFINE_bool("no_affinity", False, "Agent workload: cache-blind least-loaded routing.")
flags.DEFINE_bool("json", False, "Print one JSON object.")


def _weights(model: str, weights: str) -> str:
    if weights != "auto":
        return weights
    from infire_jax.plan.capacity import load_hf_config

    _, hf = load_hf_config(model)
    return "int4_experts" if hf.get("quantization_config") else "bf16"


def decode_table(model: str, hardware: str, count: int, weights: str, meshes=None) -> list[dict]:
    from infire_jax.plan.capacity import Deployment, candidate_meshes, load_hf_config, model_config, plan_capacity
    from infire_jax.plan.simulator import CostModel

    _, hf = load_hf_config(model)
    cfg, _ = model_config(hf, weights)
    rows = []
    for mesh in meshes or [m for m in candidate_meshes(count, cfg) if "ep" not in m][:4]:
        cap = plan_capacity(model, Deployment(hardware, count, mesh=mesh, weights=weights, role="decode"))
        if not cap.fits:
            continue
        cost = CostModel(cap)
        for b, ctx in ((1, 2048), (16, 2048), (32, 2048), (48, 1024), (64, 1024), (64, 2048), (128, 1024)):
            d = cost.decode_step(b, ctx, detail=True)
            need = b * cap.seq_bytes_per_device(ctx)
            rows.append(dict(mesh=mesh, batch=b, context=ctx, step_ms=round(d["time"] * 1e3, 2),
                             memory_ms=round(d["memory"] * 1e3, 2), compute_ms=round(d["compute"] * 1e3, 2),
                             comm_ms=round(d["comm"] * 1e3, 2), experts_touched=round(cost.touched(b / cost.pp), 3),
                             kv_fits=bool(need <= cap.kv_free_per_device)))
    return rows


def rate_sweep(plan, workload, goodput: float, n=None, points=(0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5)) -> list[dict]:
    from infire_jax.plan.simulator import simulate

    out = []
    for f in points:
        r = simulate(plan, workload, max(goodput * f, 1e-3), n=n)
        out.append(r.row())
    return out


def plot_sweeps(sweeps: dict[str, list[dict]], workload, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (label, rows), color in zip(sweeps.items(), ("#e6550d", "#3182bd")):
        x = [r["rate"] for r in rows]
        axes[0].plot(x, [min(r["ttft_p90_ms"], 1e6) / 1e3 for r in rows], "o-", color=color, label=label)
        axes[1].plot(x, [min(r["tpot_p90_ms"], 1e6) for r in rows], "o-", color=color, label=label)
    axes[0].axhline(workload.ttft_slo, ls="--", color="gray", label="SLO")
    axes[1].axhline(workload.tpot_slo * 1e3, ls="--", color="gray", label="SLO")
    axes[0].set_ylabel("TTFT p90 (s)")
    axes[1].set_ylabel("TPOT p90 (ms)")
    ttft_max = max(max(r["ttft_p90_ms"] for r in rows if r["ttft_p90_ms"] < 1e9) for rows in sweeps.values()) / 1e3
    axes[0].set_ylim(0, min(ttft_max * 1.1, workload.ttft_slo * 4))
    axes[1].set_ylim(0, workload.tpot_slo * 1e3 * 3)
    for ax in axes:
        ax.set_xlabel("arrival rate (req/s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def pareto_points(rows: list[dict], workload, price: float, n=None, per_kind: int = 3,
                  points=(0.4, 0.6, 0.8, 1.0), affinity: bool = True) -> list[dict]:
    """The best `per_kind` plans of each kind at fractions of their goodput: cost and latencies."""
    from infire_jax.plan.simulator import simulate

    out = []
    for kind in ("colocated", "disaggregated"):
        best = sorted((r for r in rows if r["kind"] == kind and r.get("goodput")), key=lambda r: -r["goodput_per_gpu"])
        for r in best[:per_kind]:
            for f in points:
                res = simulate(r["cluster"], workload, r["goodput"] * f, n=n, affinity=affinity).row(price)
                out.append(dict(kind=kind, plan=r["plan"]["label"], load=f, **{k: res[k] for k in (
                    "rate", "ttft_p90_ms", "tpot_p90_ms", "usd_per_mtok_all", "usd_per_mtok_input", "usd_per_mtok_output")}))
    return out


def plot_pareto(points: list[dict], path: str, title: str) -> None:
    """Cost per million tokens vs TPOT p90, TTFT p90 as colour; the frontier (no point both cheaper
    and faster) as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    pts = [p for p in points if p["usd_per_mtok_all"] < 1e9 and p["tpot_p90_ms"] < 1e9 and p["ttft_p90_ms"] < 1e12]
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    if not pts:
        ax.text(0.5, 0.5, "no plan served this workload", ha="center", transform=ax.transAxes)
    else:
        ttft = [max(p["ttft_p90_ms"], 1.0) for p in pts]
        norm = LogNorm(vmin=min(ttft), vmax=max(max(ttft), min(ttft) * 1.01))
        for kind, marker in (("colocated", "o"), ("disaggregated", "^")):
            sel = [p for p in pts if p["kind"] == kind]
            if sel:
                sc = ax.scatter([p["tpot_p90_ms"] for p in sel], [p["usd_per_mtok_all"] for p in sel],
                                c=[max(p["ttft_p90_ms"], 1.0) for p in sel], cmap="viridis", norm=norm, marker=marker,
                                s=46, edgecolors="black", linewidths=0.4, label=kind)
        for label in sorted({p["plan"] for p in pts}):
            sel = sorted((p for p in pts if p["plan"] == label), key=lambda p: p["load"])
            ax.plot([p["tpot_p90_ms"] for p in sel], [p["usd_per_mtok_all"] for p in sel], color="gray", lw=0.6, alpha=0.6)
            ax.annotate(label, (sel[-1]["tpot_p90_ms"], sel[-1]["usd_per_mtok_all"]), fontsize=6, alpha=0.8,
                        xytext=(3, 3), textcoords="offset points")
        front, best = [], float("inf")
        for p in sorted(pts, key=lambda p: (p["tpot_p90_ms"], p["usd_per_mtok_all"])):
            if p["usd_per_mtok_all"] < best:
                front.append(p)
                best = p["usd_per_mtok_all"]
        ax.step([p["tpot_p90_ms"] for p in front], [p["usd_per_mtok_all"] for p in front], where="post", color="#d62728",
                lw=1.2, label="Pareto frontier")
        fig.colorbar(sc, ax=ax, label="TTFT p90 (ms)")
        ax.set_yscale("log")
    ax.set_xlabel("TPOT p90 (ms)")
    ax.set_ylabel("$ per million tokens (input + output)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def affinity_block(out: dict, workload, price: float, n=None) -> dict:
    """For each kind: session affinity on and off on its best plan where routing has a choice."""
    from infire_jax.plan.simulator import affinity_effect, routed

    block = {}
    for kind in ("colocated", "disaggregated"):
        rows = sorted((r for r in out["evaluated"] if r["kind"] == kind and r.get("goodput") and routed(r["cluster"])),
                      key=lambda r: -r["goodput_per_gpu"])
        best = out[f"best_{kind}"]
        if not rows:
            block[kind] = dict(note="no evaluated plan of this kind has more than one instance of a role: routing has "
                                    "no choice, so affinity cannot change anything")
            continue
        eff = affinity_effect(rows[0]["cluster"], workload, price, n=n)
        if best is not None and not routed(best["cluster"]):
            eff["note"] = (f"the best {kind} plan ({best['plan']['label']}) has one instance per role, where "
                           "affinity changes nothing; shown for the best plan with a routing choice")
        block[kind] = _clean_tree(eff)
    return block


def _clean_tree(x):
    if isinstance(x, dict):
        return {k: _clean_tree(v) for k, v in x.items()}
    if isinstance(x, float):
        return round(x, 4) if x < 1e12 else None
    return x


def _clean(row: dict | None) -> dict | None:
    if row is None:
        return None
    out = {k: v for k, v in row.items() if k != "cluster"}
    for k, v in list(out.items()):
        if isinstance(v, float):
            out[k] = round(v, 4) if v < 1e12 else None
    return out


def main(argv) -> int:
    del argv
    args = FLAGS

    from infire_jax.plan.capacity import ConfigError, HardwareError, PlanError
    from infire_jax.plan.prices import PriceError, entry_of, load_prices
    from infire_jax.plan.simulator import WORKLOADS, AgentWorkload, search

    t0 = time.perf_counter()
    try:
        if args.workload not in WORKLOADS:
            raise PlanError(f"unknown workload {args.workload!r}; known: {sorted(WORKLOADS)}")
        weights = _weights(args.model, args.weights)
        wl = WORKLOADS[args.workload]
        wl = dataclasses.replace(wl, ttft_slo=args.ttft_slo / 1e3 if args.ttft_slo else wl.ttft_slo,
                                 tpot_slo=args.tpot_slo / 1e3 if args.tpot_slo else wl.tpot_slo)
        if args.decode_table:
            rows = decode_table(args.model, args.hardware, args.count, weights)
            if args.json:
                print(json.dumps(dict(decode_steps=rows), indent=1))
            else:
                for r in rows:
                    print(f"{r['mesh']:12s} B={r['batch']:4d} ctx={r['context']:5d}: {r['step_ms']:6.2f} ms/token "
                          f"(weights+KV {r['memory_ms']:.2f}, compute {r['compute_ms']:.2f}, comm {r['comm_ms']:.2f}; "
                          f"experts touched {100 * r['experts_touched']:.0f}%; KV fits: {r['kv_fits']})")
            return 0
        meshes = tuple(m.strip() for m in args.meshes.split(";")) if args.meshes else None
        log = None if args.json else (lambda s: print("  " + s, flush=True))
        price_entry = entry_of(args.hardware, load_prices(args.prices))
        price = price_entry["usd_per_gpu_hour"]
        out = search(args.model, args.hardware, args.count, wl, weights=weights, kv_dtype=args.kv_dtype,
                     n=args.requests, seed=args.seed, prune=not args.no_prune, meshes=meshes, log=log,
                     affinity=not args.no_affinity, usd_per_gpu_hour=price)
    except (ConfigError, HardwareError, PlanError, PriceError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bd, bc = out["best_disaggregated"], out["best_colocated"]
    result = dict(
        model=args.model, hardware=args.hardware, count=args.count, weights=weights, workload=out["workload"],
        best_disaggregated=_clean(bd), best_colocated=_clean(bc),
        winner=("disaggregated" if (bd or {}).get("goodput_per_gpu", 0) > (bc or {}).get("goodput_per_gpu", 0)
                else "colocated"),
        advantage=(round(bd["goodput_per_gpu"] / bc["goodput_per_gpu"], 3) if bd and bc and bc["goodput_per_gpu"] else None),
        candidates=out["candidates"], evaluated=[_clean(r) for r in out["evaluated"]],
        price=price_entry,
    )
    if isinstance(wl, AgentWorkload):
        result["affinity"] = not args.no_affinity
        result["affinity_effect"] = affinity_block(out, wl, price, n=args.requests)
    if args.pareto:
        result["pareto_points"] = [_clean_tree(p) for p in pareto_points(
            out["evaluated"], wl, price, n=args.requests, affinity=not args.no_affinity)]
        plot_pareto(result["pareto_points"], args.pareto,
                    f"{args.model} on {args.count}x{args.hardware}, {args.workload}: cost vs TPOT "
                    f"(${price:g}/GPU-h; TTFT SLO {wl.ttft_slo:g} s, TPOT SLO {wl.tpot_slo * 1e3:g} ms)")
        result["pareto"] = args.pareto
    if args.plot:
        sweeps = {}
        for key, row in (("disaggregated", bd), ("colocated", bc)):
            if row and row.get("goodput"):
                sweeps[f"{key}: {row['plan']['label']}"] = rate_sweep(row["cluster"], wl, row["goodput"], n=args.requests)
        plot_sweeps(sweeps, wl, args.plot, f"{args.model} on {args.count}x{args.hardware}, {args.workload} "
                    f"(TTFT SLO {wl.ttft_slo:g} s, TPOT SLO {wl.tpot_slo * 1e3:g} ms)")
        result["plot"] = args.plot
        result["sweeps"] = sweeps
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
        return 0
    for key in ("best_disaggregated", "best_colocated"):
        r = result[key]
        if r is None:
            print(f"{key}: none fits")
            continue
        print(f"{key}: {r['plan']['label']} ({r['plan']['gpus']} GPUs): goodput {r['goodput']:.3f}/s = "
              f"{r['goodput_per_gpu']:.4f}/s/GPU; TTFT p50/p90/p99 {r.get('ttft_p50_ms') or 0:.0f}/"
              f"{r.get('ttft_p90_ms') or 0:.0f}/{r.get('ttft_p99_ms') or 0:.0f} ms, TPOT {r.get('tpot_p50_ms') or 0:.1f}/"
              f"{r.get('tpot_p90_ms') or 0:.1f}/{r.get('tpot_p99_ms') or 0:.1f} ms; hit ratio {r.get('hit_ratio') or 0:.3f}; "
              f"$/Mtok input {r.get('usd_per_mtok_input') or 0:.3f}, output {r.get('usd_per_mtok_output') or 0:.3f}")
    for kind, eff in (result.get("affinity_effect") or {}).items():
        if "with_affinity" in eff:
            on, off = eff["with_affinity"], eff["without_affinity"]
            print(f"session affinity, {kind} {eff['plan']}: hit ratio {off.get('hit_ratio')} -> {on.get('hit_ratio')}, "
                  f"goodput {off.get('goodput')} -> {on.get('goodput')}/s, $/Mtok all {off.get('usd_per_mtok_all')} -> "
                  f"{on.get('usd_per_mtok_all')}")
    print(f"winner: {result['winner']} (disaggregated / colocated goodput per GPU = {result['advantage']}); "
          f"{result['seconds']} s")
    return 0


if __name__ == "__main__":
    app.run(main)
