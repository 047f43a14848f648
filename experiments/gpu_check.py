"""The GPU check: infire_jax's GPU path on a real GPU, ready to run the day one is there.

Steps, in order (--dry_run prints them with their parameters and exits 0):
  devices    the GPU has what the kernels need: a CUDA device (jax[cuda12]) of compute capability >= 8.0
             (bf16 tensor-core dots in Triton), the requested meshes' GPU count, and the Pallas Triton
             lowering compiling and running one paged-attention call against XLA's result.
  reference  the reference tests' tiny models (tests/helpers.py DENSE_CONFIGS, tests/reference/
             test_moe_reference.py CONFIGS; written with transformers) on each of --meshes, kernels="auto"
             (which must resolve to "pallas" on the GPU) and kernels="xla", float32 with the highest matmul
             precision (no TF32): greedy tokens equal to a CPU run of the same checkpoint (a child process
             on the CPU backend, kernels="xla") and logits within 1e-4 of its largest.
  roofline   HBM bandwidth measured with a copy (x + 1 over --copy_mb MiB: bytes read + written per
             second) and the bf16 matmul peak (the largest of a few square matmuls).
  attention  paged decode attention (one new token per row over --contexts cached positions, pages at
             random places in the pool) and causal prefill attention of --prefill_lengths, kernels="pallas"
             vs kernels="xla", against bytes / bandwidth (decode) and FLOPs / peak (prefill).
  decode     the engine's steady-state decode of the --bench_model checkpoint, (t(generate 1 + n) -
             t(generate 1)) / n per step, for --batch_sizes x --contexts: pallas vs xla vs the roofline
             (weights + the rows' KV bytes per step / bandwidth).
  prefill    the engine's prefill (generate 1 token) of --prefill_lengths prompts: pallas vs xla vs
             max(weight bytes / bandwidth, FLOPs / peak). A prompt of at most --prefill_chunk tokens runs the
             whole-prompt program (flash kernel), a longer one the chunk program (chunks of --prefill_chunk
             new tokens over the pages written so far: the paged kernel with T > 1). No prefix cache.
Benchmarks run --compute_dtype / --dtype (bf16 by default: the GPU configuration). Medians of --runs
after a warm-up; compile times are reported apart. A missing feature or a failed step ends the check
with one sentence on stderr and exit code 1; the figures so far are in --out (JSON).

  python experiments/gpu_check.py --dry_run
  python experiments/gpu_check.py --meshes=tp=1,tp=2 --out=gpu_check.json
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import bench_common as bc  # noqa: E402  (puts this checkout on sys.path when infire_jax is not installed)

sys.path.append(str(bc.REPO))  # the reference tests' model writers (tests/)

FLAGS = flags.FLAGS
flags.DEFINE_bool("dry_run", False, "List the steps this run would take, with their parameters, and exit 0.")
flags.DEFINE_list("meshes", ["tp=1"], "Meshes of the reference step (e.g. tp=1,tp=2; needs that many GPUs).")
flags.DEFINE_list("families", ["llama", "qwen2", "qwen3", "llama4", "deepseek_v3", "qwen3_moe"],
                  "Reference tests' tiny models to check.")
flags.DEFINE_string("bench_model", None, "HF checkpoint for the decode/prefill benchmarks (default: a Llama-3.2-1B "
                    "shaped model with random weights, written once under ~/.cache/infire_jax/bench/).")
flags.DEFINE_list("batch_sizes", ["1", "16", "64"], "Decode batch sizes.")
flags.DEFINE_list("contexts", ["1024", "4096"], "Cached positions per row in the decode benchmarks.")
flags.DEFINE_list("prefill_lengths", ["512", "2048"], "Prompt lengths of the prefill benchmarks.")
flags.DEFINE_integer("prefill_batch", 4, "Rows of the prefill benchmarks.")
flags.DEFINE_integer("prefill_chunk", 512, "Prompt tokens per prefill call of the benchmarked engine (its default).")
flags.DEFINE_integer("decode_tokens", 64, "Tokens per row timed in the decode benchmarks (n).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Stored weight dtype of the benchmarks.")
flags.DEFINE_enum("compute_dtype", "bfloat16", ["bfloat16", "float32"], "Activation and KV dtype of the benchmarks.")
flags.DEFINE_integer("runs", 5, "Timed runs per figure (median), after one warm-up run.")
flags.DEFINE_integer("copy_mb", 1024, "Buffer size of the bandwidth probe.")
flags.DEFINE_string("out", "gpu_check.json", "JSON output path.")
flags.DEFINE_string("cpu_reference", None, "Internal: run the reference models from this directory on the CPU "
                    "backend and write their outputs there (the child process of the reference step).")

KERNELS = ("pallas", "xla")
PROMPT_LENGTHS = (19, 1, 8, 4)  # mixed: longer than Llama 4's chunk, one token, one chunk, short
REFERENCE_ENGINE = dict(page_size=4, kv_pages=64, max_decode_batch=4, decode_steps=8)
REFERENCE_NEW_TOKENS = 16
BENCH_SHAPE = dict(  # Llama-3.2-1B's shapes (vocab cut to 32000: the head is not what is measured here)
    vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, max_position_embeddings=16384,
)
MIN_COMPUTE_CAPABILITY = 8.0


class CheckFailed(Exception):
    """A missing feature or a failed step: its message is the one sentence the check ends with."""


# ---- the plan ---------------------------------------------------------------------------------


def plan() -> list[tuple[str, dict[str, Any]]]:
    """Every step with its parameters, in the order they run."""
    ints = lambda xs: [int(x) for x in xs]  # noqa: E731
    steps: list[tuple[str, dict[str, Any]]] = [("devices", dict(min_compute_capability=MIN_COMPUTE_CAPABILITY,
                                                                  meshes=FLAGS.meshes))]
    for family in FLAGS.families:
        for mesh in FLAGS.meshes:
            steps.append((f"reference/{family}/{mesh}", dict(
                kernels=["auto", "xla"], prompts=list(PROMPT_LENGTHS), new_tokens=REFERENCE_NEW_TOKENS,
                against="cpu xla run", tolerance="tokens equal, logits 1e-4 of max", **REFERENCE_ENGINE)))
    steps += [("roofline/hbm_copy", dict(mbytes=FLAGS.copy_mb)), ("roofline/matmul_peak", dict(dtype="bfloat16"))]
    model = FLAGS.bench_model or "llama-3.2-1b-shaped (random weights)"
    common = dict(dtype=FLAGS.dtype, compute_dtype=FLAGS.compute_dtype, runs=FLAGS.runs, kernels=list(KERNELS))
    for b in ints(FLAGS.batch_sizes):
        for c in ints(FLAGS.contexts):
            steps.append((f"attention/decode/b{b}/ctx{c}", dict(model_shape=model, **common)))
    for t in ints(FLAGS.prefill_lengths):
        steps.append((f"attention/prefill/b{FLAGS.prefill_batch}/t{t}", dict(model_shape=model, **common)))
    for b in ints(FLAGS.batch_sizes):
        for c in ints(FLAGS.contexts):
            steps.append((f"decode/b{b}/ctx{c}", dict(model=model, new_tokens=FLAGS.decode_tokens, **common)))
    for t in ints(FLAGS.prefill_lengths):
        program = "whole prompt (flash)" if t <= FLAGS.prefill_chunk else f"chunks of {FLAGS.prefill_chunk} (paged, T > 1)"
        steps.append((f"prefill/b{FLAGS.prefill_batch}/t{t}", dict(model=model, program=program, **common)))
    return steps


# ---- devices ----------------------------------------------------------------------------------


def check_devices() -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus:
        raise CheckFailed(f"no GPU: JAX sees only {sorted({d.platform for d in jax.devices()})} devices; run on a machine "
                          "with a CUDA GPU and `pip install -e '.[cuda12]'` (or pass --dry_run)")
    capability = getattr(gpus[0], "compute_capability", None)
    if capability is None:
        raise CheckFailed(f"{gpus[0].device_kind} is not a CUDA device; the Pallas kernels are built and checked for CUDA")
    if float(capability) < MIN_COMPUTE_CAPABILITY:
        raise CheckFailed(f"{gpus[0].device_kind} has compute capability {capability}; the bf16 Pallas kernels need "
                          f"{MIN_COMPUTE_CAPABILITY} (Ampere) or newer")
    from infire_jax.kernels import pallas_attention
    from infire_jax.mesh import parse_mesh

    need = max(parse_mesh(m).num_devices for m in FLAGS.meshes)
    if need > len(gpus):
        raise CheckFailed(f"--meshes needs {need} GPUs, this machine has {len(gpus)}")
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.bfloat16)  # noqa: E731
    args = (f(2, 1, 2, 4, 64), f(2, 1, 2, 64), f(2, 1, 2, 64), f(1, 8, 2, 16, 64), f(1, 8, 2, 16, 64),
            jnp.asarray([[0, 1, 2, 3], [4, 5, 6, 7]], jnp.int32), jnp.asarray([40, 7], jnp.int32))
    try:
        got = jax.jit(lambda *a: pallas_attention.paged_gqa(*a, 0, None, None, interpret=False))(*args)
        want = jax.jit(lambda *a: pallas_attention.paged_gqa(*a, 0, None, None, interpret=True))(*args)
    except Exception as e:  # noqa: BLE001 - any failure here means the GPU lacks what the kernels need
        raise CheckFailed(f"the Pallas Triton lowering failed on {gpus[0].device_kind}: {_first_line(e)}") from e
    err = float(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)).max())
    if err > 0.05:
        raise CheckFailed(f"the Pallas kernel on {gpus[0].device_kind} differs from its interpreted run by {err}")
    return dict(gpus=len(gpus), kind=gpus[0].device_kind, compute_capability=str(capability), jax=jax.__version__,
                smoke_max_abs_diff=err)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


# ---- reference models -------------------------------------------------------------------------


def _prompts() -> list[np.ndarray]:
    from tests.reference.test_moe_reference import VOCAB

    return [np.random.default_rng(i).integers(1, VOCAB, n).astype(np.int32) for i, n in enumerate(PROMPT_LENGTHS)]


def _run_reference(path: pathlib.Path, **kwargs: Any) -> tuple[Any, list[list[int]], list[np.ndarray]]:
    import infire_jax
    from infire_jax.engine.sampling import SamplingParams

    model = infire_jax.load(path, **REFERENCE_ENGINE, **kwargs)
    reqs = model.run_requests(_prompts(), [SamplingParams(REFERENCE_NEW_TOKENS)] * len(PROMPT_LENGTHS), with_logits=True)
    return model, [r.output for r in reqs], [np.stack(r.logits) for r in reqs]


def write_reference_models(root: pathlib.Path) -> None:
    """The reference tests' tiny checkpoints (transformers, random weights) under root/<family>."""
    try:
        from tests.helpers import DENSE_CONFIGS, save_reference
        from tests.reference.test_moe_reference import save_moe_reference
    except ImportError as e:
        raise CheckFailed(f"the reference models need torch and transformers ({_first_line(e)}); "
                          "pip install -e '.[test]'") from e
    for family in FLAGS.families:
        (save_reference if family in DENSE_CONFIGS else save_moe_reference)(family, root / family)


def cpu_reference_main(root: pathlib.Path) -> None:
    """The child process: every family on the CPU backend with XLA's code, outputs to root/<family>.npz."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    for family in FLAGS.families:
        _, tokens, logits = _run_reference(root / family, kernels="xla")
        np.savez(root / f"{family}.npz", tokens=np.asarray(tokens), **{f"logits{i}": x for i, x in enumerate(logits)})


def check_reference(root: pathlib.Path, family: str, mesh: str) -> dict[str, Any]:
    import jax

    from infire_jax.kernels import dispatch
    from infire_jax.sharding import use_layout

    ref = np.load(root / f"{family}.npz")
    out = {}
    with jax.default_matmul_precision("highest"):
        for kernels in ("auto", "xla"):
            model, tokens, logits = _run_reference(root / family, mesh=mesh, kernels=kernels)
            with use_layout(model.programs.layout):
                backend = dispatch.backend()
            if kernels == "auto" and backend != "pallas":
                raise CheckFailed(f"kernels='auto' resolved to {backend!r} on the GPU, not 'pallas'")
            if tokens != ref["tokens"].tolist():
                raise CheckFailed(f"{family} on {mesh} with kernels={kernels!r}: greedy tokens differ from the CPU run")
            err = max(float(np.abs(x - ref[f"logits{i}"]).max() / np.abs(ref[f"logits{i}"]).max()) for i, x in enumerate(logits))
            if err > 1e-4:
                raise CheckFailed(f"{family} on {mesh} with kernels={kernels!r}: logits differ from the CPU run by {err:.2e} "
                                  "of their largest (allowed 1e-4)")
            out[kernels] = dict(backend=backend, logits_rel_err=err)
    return out


# ---- roofline ---------------------------------------------------------------------------------


def _median_seconds(fn: Callable[[], Any], runs: int) -> float:
    import jax

    return bc.summary(bc.timed_runs(lambda: jax.block_until_ready(fn()), runs))["median"]


def measure_copy_bandwidth(mbytes: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((mbytes * 2**20 // 4,), jnp.uint32)
    copy = jax.jit(lambda a: a + 1)
    seconds = _median_seconds(lambda: copy(x), max(FLAGS.runs, 5))
    return dict(bytes=2 * x.nbytes, seconds=seconds, gbps=2 * x.nbytes / seconds / 1e9)


def measure_matmul_peak() -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    best = 0.0
    for n in (4096, 8192):
        a = jnp.ones((n, n), jnp.bfloat16)
        mm = jax.jit(lambda a: a @ a)
        best = max(best, 2 * n**3 / _median_seconds(lambda: mm(a), FLAGS.runs) / 1e12)
    return dict(tflops=best)


# ---- benchmarks -------------------------------------------------------------------------------


def bench_model_dir() -> pathlib.Path:
    if FLAGS.bench_model:
        return pathlib.Path(FLAGS.bench_model)
    from infire_jax.checkpoint.tiny import write_tiny_checkpoint

    target = bc.bench_cache_dir() / "llama-3.2-1b-shaped-bf16-v1"
    if not (target / "model.safetensors").is_file():
        write_tiny_checkpoint(target, "smollm-135m", dtype="bfloat16", overrides=BENCH_SHAPE, tokenizer=False)
    return target


def _layout(kernels: str):
    from infire_jax.loader import make_layout

    return make_layout("tp=1", kernels=kernels)


def bench_decode_attention(shape: bc.Shape, batch: int, context: int, bandwidth: float) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from infire_jax.kv.paged import PagedLayerCache
    from infire_jax.models.attention import gqa_attention
    from infire_jax.sharding import use_layout

    dtype, page = jnp.dtype(FLAGS.compute_dtype), 16
    width = -(-context // page)
    rng = np.random.default_rng(0)
    kv, h, hd = shape.kv_heads, shape.heads, shape.head_dim
    pool = lambda: jnp.asarray(rng.normal(size=(1, batch * width + 1, kv, page, hd)), dtype)  # noqa: E731
    k_pages, v_pages = pool(), pool()
    table = jnp.asarray(rng.permutation(batch * width + 1)[: batch * width].reshape(batch, width), jnp.int32)
    q, k_new, v_new = (jnp.asarray(rng.normal(size=(batch, 1, n, hd)), dtype) for n in (h, kv, kv))
    start = jnp.full((batch,), context, jnp.int32)
    out: dict[str, Any] = {}
    for kernels in KERNELS:
        with use_layout(_layout(kernels)):
            fn = jax.jit(lambda q, k, v, kp, vp, t, s: gqa_attention(q, k, v, s, PagedLayerCache(kp, t, 0), PagedLayerCache(vp, t, 0)))
        out[kernels] = dict(us=1e6 * _median_seconds(lambda: fn(q, k_new, v_new, k_pages, v_pages, table, start), FLAGS.runs))
    kv_bytes = 2 * batch * context * kv * hd * dtype.itemsize
    out["roofline_us"] = 1e6 * kv_bytes / (bandwidth * 1e9)
    return out


def bench_prefill_attention(shape: bc.Shape, batch: int, t: int, peak_tflops: float) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from infire_jax.models.attention import gqa_attention
    from infire_jax.sharding import use_layout

    dtype = jnp.dtype(FLAGS.compute_dtype)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(batch, t, n, shape.head_dim)), dtype) for n in (shape.heads, shape.kv_heads, shape.kv_heads))
    start = jnp.zeros((batch,), jnp.int32)
    out: dict[str, Any] = {}
    for kernels in KERNELS:
        with use_layout(_layout(kernels)):
            fn = jax.jit(lambda q, k, v, s: gqa_attention(q, k, v, s))
        out[kernels] = dict(us=1e6 * _median_seconds(lambda: fn(q, k, v, start), FLAGS.runs))
    flops = 4 * batch * shape.heads * shape.head_dim * t * (t + 1) / 2
    out["roofline_us"] = 1e6 * flops / (peak_tflops * 1e12)
    return out


def bench_engine(model_dir: pathlib.Path, shape: bc.Shape, machine: dict[str, float]) -> dict[str, Any]:
    """Decode and prefill of the engine, pallas vs xla (each model loaded once for all cases)."""
    import infire_jax

    batches, contexts = [int(b) for b in FLAGS.batch_sizes], [int(c) for c in FLAGS.contexts]
    lengths, pb = [int(t) for t in FLAGS.prefill_lengths], FLAGS.prefill_batch
    max_rows, max_tokens = max(batches + [pb]), max(contexts + lengths) + FLAGS.decode_tokens + 16
    results: dict[str, Any] = {}
    for kernels in KERNELS:
        model = infire_jax.load(model_dir, dtype=FLAGS.dtype, compute_dtype=FLAGS.compute_dtype, kernels=kernels,
                                max_decode_batch=max_rows, kv_pages=max_rows * -(-max_tokens // 16) + 8,
                                prefix_cache=False, prefill_chunk=FLAGS.prefill_chunk)
        gen = lambda tokens, n: model.generate(tokens.tolist(), max_new_tokens=n)  # noqa: E731
        for b in batches:
            for c in contexts:
                tokens = bc.prompts(b, c, shape.vocab)
                t0 = time.perf_counter()
                gen(tokens, 1 + FLAGS.decode_tokens)
                first = time.perf_counter() - t0
                one = bc.summary(bc.timed_runs(lambda: gen(tokens, 1), FLAGS.runs))["median"]
                full = bc.summary(bc.timed_runs(lambda: gen(tokens, 1 + FLAGS.decode_tokens), FLAGS.runs))["median"]
                step = (full - one) / FLAGS.decode_tokens
                results.setdefault(f"decode/b{b}/ctx{c}", {})[kernels] = dict(
                    step_ms=1e3 * step, tokens_per_s=b / step, first_call_s=first)
        for t in lengths:
            tokens = bc.prompts(pb, t, shape.vocab)
            seconds = bc.summary(bc.timed_runs(lambda: gen(tokens, 1), FLAGS.runs))["median"]
            results.setdefault(f"prefill/b{pb}/t{t}", {})[kernels] = dict(ms=1e3 * seconds, tokens_per_s=pb * t / seconds)
    bw, peak = machine["gbps"] * 1e9, machine["tflops"] * 1e12
    for b in batches:
        for c in contexts:
            step_bytes = shape.step_weight_bytes + b * c * shape.kv_bytes_per_token
            results[f"decode/b{b}/ctx{c}"]["roofline_step_ms"] = 1e3 * step_bytes / bw
    for t in lengths:
        seconds = max(shape.step_weight_bytes / bw, shape.prefill_flops(pb, t) / peak)
        results[f"prefill/b{pb}/t{t}"]["roofline_ms"] = 1e3 * seconds
    return results


# ---- main -------------------------------------------------------------------------------------


def _step(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
    """Run one step into results[name]; any failure becomes the check's one sentence."""
    try:
        results[name] = fn()
    except CheckFailed:
        raise
    except Exception as e:  # noqa: BLE001 - a failed step ends the check, saying which and why
        raise CheckFailed(f"step {name} failed: {_first_line(e)}") from e
    return results[name]


def run(results: dict[str, Any]) -> None:
    _step(results, "devices", check_devices)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        root = pathlib.Path(tmp)
        write_reference_models(root)
        child = subprocess.run([sys.executable, os.path.abspath(__file__), f"--cpu_reference={root}",
                                f"--families={','.join(FLAGS.families)}"], capture_output=True, text=True)
        if child.returncode:
            raise CheckFailed(f"the CPU reference run failed: {(child.stderr.strip().splitlines() or [''])[-1]}")
        for family in FLAGS.families:
            for mesh in FLAGS.meshes:
                _step(results, f"reference/{family}/{mesh}", lambda: check_reference(root, family, mesh))
    bandwidth = _step(results, "roofline/hbm_copy", lambda: measure_copy_bandwidth(FLAGS.copy_mb))
    peak = _step(results, "roofline/matmul_peak", measure_matmul_peak)
    model_dir = bench_model_dir()
    shape = bc.Shape.from_dir(model_dir)
    shape = bc.Shape(**{**shape.__dict__, "bytes_per_param": 2 if FLAGS.compute_dtype == "bfloat16" else 4,
                        "weight_bytes_per_param": 2 if FLAGS.dtype == "bfloat16" else 4})
    for b in FLAGS.batch_sizes:
        for c in FLAGS.contexts:
            _step(results, f"attention/decode/b{b}/ctx{c}",
                  lambda: bench_decode_attention(shape, int(b), int(c), bandwidth["gbps"]))
    for t in FLAGS.prefill_lengths:
        _step(results, f"attention/prefill/b{FLAGS.prefill_batch}/t{t}",
              lambda: bench_prefill_attention(shape, FLAGS.prefill_batch, int(t), peak["tflops"]))
    machine = dict(gbps=bandwidth["gbps"], tflops=peak["tflops"])
    _step(results, "engine", lambda: bench_engine(model_dir, shape, machine))
    results.update(results.pop("engine"))


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # JAX's backend probing logs at INFO: keep the output to the check's
    if FLAGS.cpu_reference:
        cpu_reference_main(pathlib.Path(FLAGS.cpu_reference))
        return
    steps = plan()
    if FLAGS.dry_run:
        print(f"gpu_check would run {len(steps)} steps (results to {FLAGS.out}):")
        for name, params in steps:
            print(f"  {name}  {json.dumps(params)}")
        return
    results: dict[str, Any] = {"plan": [name for name, _ in steps]}
    try:
        run(results)
    except CheckFailed as e:
        results["failed"] = str(e)
        pathlib.Path(FLAGS.out).write_text(json.dumps(results, indent=2))
        raise SystemExit(f"gpu_check failed: {e}.") from None
    pathlib.Path(FLAGS.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    app.run(main)
