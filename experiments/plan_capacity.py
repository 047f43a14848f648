"""What fits where: per-device weights, KV per token and left, reserved memory and maximum context of
a model on N devices, from the real model class built abstractly (infire_jax.plan.capacity).

  python experiments/plan_capacity.py --model=kimi_k25 --hardware=h100 --count=8 --json
  python experiments/plan_capacity.py --model=llama4_scout --hardware=h200 --count=2 --weights=bf16
  python experiments/plan_capacity.py --model=path/to/config.json --hardware=h100 --count=4 --mesh=pp=2,tp=2
  python experiments/plan_capacity.py --standard_plot=memory.png   # the acceptance deployments in one figure

--model: a name in configs/models/ (kimi_k25, llama4_scout, llama31_8b, qwen3_30b_a3b), a config.json
path or a model directory. --weights: auto (the checkpoint's own format: int4 experts when its
config.json carries the compressed-tensors block, else bf16), bf16, int4_experts, compressed
(palette12, 0.75 of bf16 for stacked layer matrices, routed experts included; the plan then also
reports what it gains against bf16 on the same mesh) or fp32. Without --mesh every pp x ep x tp mesh of
--count devices is planned and the best kept (fits first, then the most KV left; --objective=tokens
prefers the longest context). --json prints one JSON object (fits, weights_gib_per_device, kv_free_gib
(total over devices), max_context_tokens, boot (seconds from process start to serving, on paper:
plan.capacity.boot_time; also printed beside the fit and in --standard_plot), ... and the other
candidates). Bad input exits with status 2 and a one-line message.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "kimi_k25", "A name in configs/models/, a config.json path or a model directory.")
flags.DEFINE_string("hardware", "h100", "Accelerator (plan/hardware.py): h100, h200, b200, cpu, ...")
flags.DEFINE_integer("count", 8, "Devices.")
flags.DEFINE_string("weights", "auto", "auto | bf16 | int4_experts | compressed | fp32")
flags.DEFINE_string("mesh", None, "e.g. tp=8 or pp=2,tp=4 (default: search every pp x ep x tp mesh).")
flags.DEFINE_string("kv_dtype", "bf16", "KV cache dtype.")
flags.DEFINE_string("role", "colocated", "colocated | prefill | decode (sets the activation workspace).")
flags.DEFINE_integer("max_step_tokens", None, "Tokens per forward (default 4096; decode: batch).")
flags.DEFINE_integer("max_decode_batch", 256, "Decode batch the activations are sized for.")
flags.DEFINE_string("objective", "kv_bytes", "kv_bytes | tokens (mesh search).")
flags.DEFINE_bool("json", False, "Print one JSON object.")
flags.DEFINE_string("plot", None, "PNG: memory per device of the best plans.")
flags.DEFINE_string("standard_plot", None, "PNG of K2.5 7/8xH100 (int4) and Scout 1/2xH200 (bf16).")


def _weights(model: str, weights: str) -> str:
    if weights != "auto":
        return weights
    from infire_jax.plan.capacity import load_hf_config

    _, hf = load_hf_config(model)
    return "int4_experts" if hf.get("quantization_config") else "bf16"


KIND_ORDER = ["embedding", "lm_head", "attention", "dense_mlp", "shared_expert", "routed_expert", "router", "norm"]
KIND_COLORS = {"embedding": "#9ecae1", "lm_head": "#6baed6", "attention": "#3182bd", "dense_mlp": "#fd8d3c",
               "shared_expert": "#fdae6b", "routed_expert": "#e6550d", "router": "#a1d99b", "norm": "#31a354"}
RESERVED_COLORS = {"runtime": "#636363", "headroom": "#969696", "activations": "#bcbddc", "logits": "#dadaeb"}


def plot_memory(plans, path: str, title: str = "") -> None:
    """Stacked bars: one device's memory per plan (weights by kind, reserved terms, KV left)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from infire_jax.plan.capacity import boot_time

    gib = float(1 << 30)
    fig, ax = plt.subplots(figsize=(max(6, 1.9 * len(plans) + 2), 5.5))
    labels = []
    for i, p in enumerate(plans):
        bottom = 0.0
        for kind in KIND_ORDER:
            v = p.weight_breakdown_per_device.get(kind, 0.0) / gib
            if v > 0:
                ax.bar(i, v, bottom=bottom, color=KIND_COLORS[kind], label=kind if i == 0 or kind not in
                       {h.get_label() for h in ax.patches} else None, edgecolor="white", linewidth=0.3)
                bottom += v
        for k, v in p.reserved.items():
            ax.bar(i, v / gib, bottom=bottom, color=RESERVED_COLORS[k], hatch="//", edgecolor="white", linewidth=0.3,
                   label=f"reserved: {k}")
            bottom += v / gib
        free = p.kv_free_per_device / gib
        if free > 0:
            ax.bar(i, free, bottom=bottom, color="#74c476", label="KV cache (free)")
        ax.hlines(p.hardware.memory_gib, i - 0.45, i + 0.45, colors="black", linestyles="--")
        status = "fits" if p.fits else "does not fit"
        labels.append(f"{p.model}\n{p.count}x{p.hardware.name} [{p.mesh}]\n{p.weights}\n{status}")
        note = (f"KV {p.kv_free_total / gib:.1f} GiB total\n{p.max_context_tokens / 1e3:,.0f}k tok\n"
                f"boot ~{boot_time(p)['total_s']:.0f} s" if p.fits else
                f"KV {p.kv_free_total / gib:.1f} GiB total\n{p.max_context_tokens / 1e3:,.0f}k tok" if p.kv_free_per_device > 0
                else f"short {-p.kv_free_per_device / gib:.1f} GiB\nper device")
        ax.text(i, max(bottom, p.hardware.memory_gib) + 1.5, note, ha="center", va="bottom", fontsize=7)
    handles, names = ax.get_legend_handles_labels()
    uniq = dict(zip(names, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_xticks(range(len(plans)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("GiB per device (dashed: device memory)")
    ax.set_title(title or "Memory per device")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv) -> int:
    del argv
    args = FLAGS

    from infire_jax.plan.capacity import ConfigError, Deployment, HardwareError, PlanError, plan_best

    try:
        if args.standard_plot:
            plans = []
            for model, hw, n, w in (("kimi_k25", "h100", 7, "int4_experts"), ("kimi_k25", "h100", 8, "int4_experts"),
                                    ("llama4_scout", "h200", 1, "bf16"), ("llama4_scout", "h200", 2, "bf16"),
                                    ("llama31_8b", "h100", 1, "bf16")):
                plans.append(plan_best(model, Deployment(hw, n, weights=w))[0])
            plot_memory(plans, args.standard_plot, "Memory per device: weights, reserved, KV left")
            print(f"wrote {args.standard_plot}")
            if not args.json:
                return 0
        weights = _weights(args.model, args.weights)
        dep = Deployment(args.hardware, args.count, mesh=args.mesh, weights=weights, kv_dtype=args.kv_dtype,
                         role=args.role, max_step_tokens=args.max_step_tokens, max_decode_batch=args.max_decode_batch)
        best, cands = plan_best(args.model, dep, objective=args.objective)
    except (ConfigError, HardwareError, PlanError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = best.summary()
    out["candidates"] = [dict(mesh=p.mesh, fits=p.fits, weights_gib_per_device=round(p.weight_bytes_per_device / (1 << 30), 3),
                              kv_free_gib=round(p.kv_free_total / (1 << 30), 3), max_context_tokens=int(p.max_context_tokens))
                         for p in cands]
    if args.plot:
        plot_memory(cands[:6], args.plot, f"{best.model} on {args.count}x{best.hardware.name} ({weights})")
        out["plot"] = args.plot
    if args.json:
        print(json.dumps(out, indent=1, default=str))
        return 0
    g = out
    print(f"{g['model']} ({g['family']}, {g['params_b']:.2f}B params, {weights}) on {args.count} x {g['hardware']} "
          f"[{g['mesh']}]: {'FITS' if g['fits'] else 'DOES NOT FIT'} - {g['reason']}")
    print(f"  weights: {g['weights_gib_total']:.2f} GiB total, {g['weights_gib_per_device']:.2f} GiB per device "
          f"{g['weight_breakdown_gib_per_device']}")
    print(f"  reserved per device: {g['reserved_gib_per_device']}")
    print(f"  KV per token per device: {g['kv_bytes_per_token_per_device']:,.0f} B ({g['kv_layers_per_device']} layers; "
          f"per layer {g['kv_bytes_per_token_per_layer_per_device']}), chunk cap {g['attention_chunk_size']}")
    print(f"  KV left: {g['kv_free_gib']:.2f} GiB total ({g['kv_free_gib_per_device']:.2f} per device); max context "
          f"{g['max_context_tokens']:,} tokens")
    if "boot" in g:
        b = g["boot"]
        print(f"  boot on paper: ~{b['total_s']:.0f} s with a warm compilation cache ({b['total_cold_cache_s']:.0f} s cold): "
              f"init {b['init_s']:.1f} + read {b['read_s']:.1f} ({b['assumptions']['storage_bytes_per_s'] / 1e9:g} GB/s "
              f"per node) + host->device {b['host_to_device_s']:.1f} + compile {b['compile_s']:.1f} "
              f"(cold {b['compile_cold_cache_s']:.1f}) s")
    if g.get("versus_bf16"):
        v = g["versus_bf16"]
        print(f"  vs bf16 on {g['mesh']}: weights {v['weights_saved_gib_per_device']:.2f} GiB per device smaller (routed "
              f"experts {v['routed_experts_saved_gib_per_device']:.2f}); KV +{v['kv_gained_gib']:.2f} GiB total "
              f"({v['kv_free_gib_bf16']:.2f} -> {g['kv_free_gib']:.2f}); max context +{v['max_context_tokens_gained']:,} "
              f"tokens; +{v['cache_tokens_at_8k_gained']:,} tokens cached as 8k-token sequences")
    for c in out["candidates"][:8]:
        print(f"    {c['mesh']:16s} fits={c['fits']!s:5s} weights/dev {c['weights_gib_per_device']:8.2f} GiB  "
              f"KV left {c['kv_free_gib']:9.2f} GiB  context {c['max_context_tokens']:>12,}")
    return 0


if __name__ == "__main__":
    app.run(main)
