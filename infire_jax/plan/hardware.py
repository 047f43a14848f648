"""Hardware catalog for planning: device memory, HBM bandwidth, peak FLOP/s, links, and the
efficiency factors the roofline cost model applies.

Device memory is what the driver reports as total (nvidia-smi `memory.total`): H100 SXM 80 GB =
81,559 MiB (79.65 GiB), H200 141 GB = 143,771 MiB (140.40 GiB). Bandwidth and FLOP/s are NVIDIA's
datasheet figures (H100 SXM: 3.35 TB/s, 989 TFLOP/s dense bf16; H200: 4.8 TB/s, same FLOP/s);
NVLink 4 is 900 GB/s per GPU (both directions), 450 GB/s one way. Between nodes each GPU has one
400 Gb/s NIC (ConnectX-7 / InfiniBand NDR): 50 GB/s. For boot time on paper: weights cross PCIe 5.0
x16 at ~50 GB/s per GPU (80% of its 63 GB/s per direction) and a node reads checkpoint files at 20 GB/s
(local NVMe drives striped; an assumption to replace with your storage's figure).

"cpu" is this machine: memory from /proc/meminfo, and bandwidth / fp32 matmul peak either measured
(`measure_cpu()`, the methods of experiments/bench_common.py: np.copyto into a preallocated buffer,
(read + written) bytes / s; best median GFLOP/s of jitted fp32 matmuls) or, without measuring, the
figures recorded in shared/CPU_NOTES.md (34 GB/s, 120 GFLOP/s).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Any

__all__ = ["Hardware", "HardwareError", "CATALOG", "get_hardware", "measure_cpu", "cpu_hardware", "GiB"]

GiB = float(1 << 30)
MiB = float(1 << 20)


class HardwareError(ValueError):
    """Unknown hardware name or a bad hardware description."""


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    memory_bytes: float  # per device, as the driver reports it
    hbm_bw: float  # bytes/s per device (datasheet / measured)
    flops: float  # dense FLOP/s per device in `compute_dtype`
    compute_dtype: str  # the dtype activations and matmuls run in ("bfloat16" on GPUs, "float32" here)
    link_bw: float  # bytes/s one way per device inside a node (NVLink)
    network_bw: float  # bytes/s one way per device between nodes
    devices_per_node: int
    # ---- what a serving process cannot give to weights or KV --------------------------------
    runtime_reserve_bytes: float  # CUDA context + NCCL / cuBLAS workspaces, per device
    headroom_fraction: float  # allocator headroom (fragmentation), fraction of device memory
    # ---- efficiency of the roofline terms (achieved / datasheet) ----------------------------
    bw_efficiency: float  # streaming weights / KV from HBM
    flops_efficiency: float  # large GEMMs (prefill)
    collective_latency_s: float  # per all-reduce / point-to-point message (launch + sync)
    step_overhead_s: float  # per model step (scheduling, sampling, launches not hidden)
    layer_overhead_s: float = 0.0  # per layer and step (kernel launch / op dispatch not hidden)
    # measured matmul rate by rows m: ((m, FLOP/s), ...) ascending; None = flops * flops_efficiency
    # at every m (GPUs). On this CPU small-m matmuls run far below the large-matmul peak.
    matmul_rates: tuple[tuple[int, float], ...] | None = None
    # extra full passes over the stacked layer weights (not experts) per step that the engine's program
    # makes beyond the one its matmuls need (0 on GPUs; on this CPU XLA copies / transposes each
    # layer's weights every step, see plan.calibrate), each costing weight bytes / hbm_bw
    weight_passes: float = 0.0
    # ---- boot (plan.capacity.boot_time) --------------------------------------------------------
    storage_bw: float = 20e9  # bytes/s one node reads checkpoint files at (local NVMe; an assumption)
    host_to_device_bw: float = 50e9  # bytes/s per device from host memory (~80% of PCIe 5.0 x16's 63 GB/s)
    measured: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    # measured attention rate by query rows m (QK and PV FLOPs over cached key positions per second):
    # ((m, FLOP/s), ...) ascending; None = the matmul rate at the step's rows. On this CPU paged
    # attention gathers pages and runs far below the linear layers' rate (plan.calibrate / the agent
    # calibration measure it from the context slope of the engine's steps).
    attention_rates: tuple[tuple[int, float], ...] | None = None
    # this engine on this machine (plan.calibrate.fit_engine_steps): a whole-prompt prefill call (the
    # prefill program, nothing cached) takes this times a chunk call of the same padded width (the
    # chunk program, which writes and reads pages); and the fixed cost of one P -> D KV shipment
    # (None: 10 collective latencies)
    whole_prompt_factor: float = 1.0
    transfer_latency_s: float | None = None
    # the same factor by padded tokens of the call ((tokens, factor), ...) ascending, where measured:
    # on this CPU it grows with the width (the prefill program gains less over the chunk program on
    # long prompts), so one median under-prices wide calls
    whole_prompt_factors: tuple[tuple[int, float], ...] | None = None
    # spread of one program call's time around its price (the standard deviation of log(time /
    # median time) of repeated identical calls; 0 on a quiet accelerator). The simulator's engine loop
    # draws each call's time with it: on a shared CPU the calls jitter, and jitter lets sessions fall
    # into lockstep (turns that end in one step are prefilled together, padded, and stay together),
    # which a loop of exact step times never does.
    call_time_spread: float = 0.0

    def matmul_rate(self, m: float) -> float:
        """Achieved FLOP/s of a linear layer applied to m rows (flops_efficiency applies to both the
        datasheet peak and the measured rates)."""
        if not self.matmul_rates:
            return self.flops * self.flops_efficiency
        return self.flops_efficiency * _rate_at(self.matmul_rates, m)

    def whole_factor(self, tokens: float) -> float:
        """Hardware.whole_prompt_factor for a whole-prompt call of `tokens` padded tokens: linear in
        log(tokens) between measured sizes, flat outside them (whole_prompt_factor if none measured)."""
        table = self.whole_prompt_factors
        if not table:
            return self.whole_prompt_factor
        if tokens <= table[0][0]:
            return table[0][1]
        for (n0, f0), (n1, f1) in zip(table, table[1:]):
            if tokens <= n1:
                return f0 + (f1 - f0) * math.log(tokens / n0) / math.log(n1 / n0)
        return table[-1][1]

    def attention_rate(self, m: float) -> float:
        """Achieved FLOP/s of attention for m query rows (the matmul rate unless measured)."""
        if not self.attention_rates:
            return self.matmul_rate(max(m, 1))
        return self.flops_efficiency * _rate_at(self.attention_rates, m)

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GiB

    def usable_bytes(self) -> float:
        """Device memory minus the runtime reserve and the allocator headroom."""
        return self.memory_bytes * (1.0 - self.headroom_fraction) - self.runtime_reserve_bytes

    def describe(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["memory_gib"] = round(self.memory_gib, 3)
        return d


# GPU defaults shared by the catalog entries (stated in the report and in WORKSPACE_NOTES):
#   runtime reserve 1 GiB per GPU: CUDA context (~0.5 GiB) + NCCL and cuBLAS workspaces (~0.5 GiB);
#   allocator headroom 3% of device memory (the XLA client preallocating 97%);
#   80% of datasheet HBM bandwidth when streaming weights, 60% of datasheet FLOP/s for prefill GEMMs;
#   10 us per collective (NVLink all-reduce of decode-sized messages), 0.5 ms per step.
_GPU = dict(
    compute_dtype="bfloat16",
    link_bw=450e9,
    network_bw=50e9,
    devices_per_node=8,
    runtime_reserve_bytes=1.0 * GiB,
    headroom_fraction=0.03,
    bw_efficiency=0.80,
    flops_efficiency=0.60,
    collective_latency_s=10e-6,
    step_overhead_s=0.5e-3,
)

CATALOG: dict[str, Hardware] = {
    "h100": Hardware(name="h100", memory_bytes=81559 * MiB, hbm_bw=3.35e12, flops=989e12, **_GPU),
    "h200": Hardware(name="h200", memory_bytes=143771 * MiB, hbm_bw=4.8e12, flops=989e12, **_GPU),
}
ALIASES = {"h100_sxm": "h100", "h100-sxm": "h100", "h200_sxm": "h200", "h200-sxm": "h200"}

# This CPU without measuring: shared/CPU_NOTES.md (np.copyto ~34 GB/s read + write; fp32 matmul
# peak 110-150 GFLOP/s). measure_cpu() replaces them with numbers measured now.
CPU_NOTES_BW = 34e9
CPU_NOTES_FLOPS = 120e9


def _meminfo_total() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * GiB


def cpu_hardware(bandwidth: float | None = None, flops: float | None = None, **overrides: Any) -> Hardware:
    """This machine as a planning target (one 'device' = the whole CPU)."""
    kw = dict(
        name="cpu",
        memory_bytes=_meminfo_total(),
        hbm_bw=bandwidth or CPU_NOTES_BW,
        flops=flops or CPU_NOTES_FLOPS,
        compute_dtype="float32",
        link_bw=10e9,
        network_bw=1e9,
        devices_per_node=os.cpu_count() or 1,
        runtime_reserve_bytes=0.5 * GiB,
        headroom_fraction=0.10,
        bw_efficiency=1.0,  # measured figures are already achieved rates
        flops_efficiency=1.0,
        collective_latency_s=20e-6,
        step_overhead_s=0.0,
        storage_bw=2e9,  # files in the page cache or on a local SSD (an assumption)
        host_to_device_bw=(bandwidth or CPU_NOTES_BW) / 2,  # a device_put is a copy: read + write
    )
    kw.update(overrides)
    return Hardware(**kw)


def get_hardware(name: str | Hardware) -> Hardware:
    """Catalog entry by name ('h100', 'h200', 'cpu'); a Hardware passes through."""
    if isinstance(name, Hardware):
        return name
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key == "cpu":
        cached = _read_cache()
        if cached:
            return cpu_hardware(cached["bandwidth"], cached["flops"], measured=cached)
        return cpu_hardware()
    if key not in CATALOG:
        raise HardwareError(f"unknown hardware {name!r}; known: {', '.join(sorted(CATALOG) + ['cpu'])}")
    return CATALOG[key]


# ------------------------------------------------------------------------------------------------
# Measuring this CPU (same methods as experiments/bench_common.py, shorter)
# ------------------------------------------------------------------------------------------------


def _cache_path() -> pathlib.Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(cache) / "infire_jax" / "plan" / "cpu.json"


def _read_cache() -> dict[str, Any] | None:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return None


def _median_time(fn, runs: int) -> float:
    import numpy as np

    fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def measure_cpu(mbytes: int = 256, runs: int = 7, save: bool = True) -> dict[str, Any]:
    """Measure this CPU's copy bandwidth and fp32 matmul peak; returns the figures (and caches
    them for get_hardware('cpu')).

    bandwidth: np.copyto of `mbytes` MiB fp32 into a preallocated buffer, 2 * bytes / median time;
    flops: best median GFLOP/s of jitted fp32 matmuls over square and prefill-like shapes (jax)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = mbytes * (1 << 20) // 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    t = _median_time(lambda: np.copyto(dst, src), runs)
    bw = 2 * src.nbytes / t
    rng = np.random.default_rng(0)
    best = 0.0
    per_shape = {}
    nt = jax.jit(lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ()))))
    for m, k, nn in ((2048, 2048, 2048), (512, 576, 3072), (512, 1536, 576)):
        x = jnp.asarray(rng.standard_normal((m, k), np.float32))
        w = jnp.asarray(rng.standard_normal((nn, k), np.float32))
        t = _median_time(lambda: nt(x, w).block_until_ready(), runs)
        per_shape[f"{m}x{k}x{nn}"] = 2.0 * m * k * nn / t / 1e9
        best = max(best, per_shape[f"{m}x{k}x{nn}"])
    out = dict(
        bandwidth=bw,
        flops=best * 1e9,
        matmul_gflops=per_shape,
        method="np.copyto (read + write) of %d MiB; best median jitted fp32 matmul GFLOP/s" % mbytes,
        loadavg=os.getloadavg(),
        time=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    if save:
        path = _cache_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2))
    return out


def _rate_at(table: tuple[tuple[int, float], ...], m: float) -> float:
    """A rate table ((m, rate), ...) at m rows: log-linear between entries, flat past the last, and
    proportional to m below the first (fewer rows than measured do proportionally less work per call)."""
    ms = [r[0] for r in table]
    rs = [r[1] for r in table]
    if m <= ms[0]:
        return rs[0] * max(m, 1e-9) / ms[0] if m < ms[0] else rs[0]
    if m >= ms[-1]:
        return rs[-1]
    x = math.log(m)
    for i in range(1, len(ms)):
        if m <= ms[i]:
            x0, x1 = math.log(ms[i - 1]), math.log(ms[i])
            return rs[i - 1] + (rs[i] - rs[i - 1]) * (x - x0) / (x1 - x0)
    return rs[-1]
