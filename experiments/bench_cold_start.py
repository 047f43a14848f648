"""Cold start, measured in fresh processes of experiments/generate.py (its JSON "boot" block).

1. compressed vs raw: the SmolLM-135M shape as raw bf16 safetensors and as a compressed checkpoint
   (experiments/compress_checkpoint.py), each loaded by a new generate.py process producing one
   token, the compilation cache warm for both (one untimed start each first); rounds alternate
   raw / compressed so machine load hits both alike. Compared: load + first token (from the start
   of infire_jax.load to the first token, `load_to_first_token_s`) and process start to first token.
2. second start: generate.py on one deployment twice with a fresh compilation cache directory for
   the first start; boot.first_token_s of the second over the first, and the second's
   programs_compiled (0 = everything came from the cache) and programs_lowered (0 = the engine's
   programs came from the executable cache, neither traced nor lowered), programs_prefetched (loaded
   on generate.py's prefetch thread while it imported flax and the engine). Repeated --start_rounds
   times, each with a new directory.

  python experiments/bench_cold_start.py --out /tmp/bench_cold_start.json
  python experiments/bench_cold_start.py --skip_compressed --start_model_dir /path/to/hf_model
  python experiments/bench_cold_start.py --skip_compressed --skip_second_start --calibrate_layers=2,8,16

Medians over rounds; the load average is recorded (other jobs on a shared machine slow every
phase, compilation most).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Also write the JSON results here.")
flags.DEFINE_string("work_dir", "", "Where the 135M-shape checkpoints live (default: ~/.cache/infire_jax/bench).")
flags.DEFINE_integer("rounds", 3, "Alternating raw / compressed starts (medians reported).")
flags.DEFINE_integer("start_rounds", 2, "First + second start pairs, each with a fresh cache directory.")
flags.DEFINE_string("start_model_dir", None, "Model of the second-start measurement (default: generate.py's own).")
flags.DEFINE_integer("max_new_tokens", 8, "Tokens generated in the second-start measurement (compressed vs raw: 1).")
flags.DEFINE_bool("skip_compressed", False, "Only the second-start measurement.")
flags.DEFINE_bool("skip_second_start", False, "Only the compressed vs raw measurement.")
flags.DEFINE_bool("bytecode", True, "Starts write and use .pyc files, as Python does by default (the child processes "
                  "run without PYTHONDONTWRITEBYTECODE); --nobytecode keeps this environment's setting (with it set, "
                  "every start compiles infire_jax's source: 0.07 s here).")
flags.DEFINE_list("calibrate_layers", [], "Also fit the planner's compile constants (plan.capacity.BootCalibration): "
                  "the default tiny model with these layer counts, first and second start each.")

GENERATE = pathlib.Path(__file__).resolve().parent / "generate.py"


def start(model_dir: str | None, cache_dir: str, max_new_tokens: int) -> dict:
    """One fresh generate.py process; its JSON line (with the wall time of the whole process)."""
    cmd = [sys.executable, str(GENERATE), f"--compilation_cache_dir={cache_dir}", f"--max_new_tokens={max_new_tokens}"]
    if model_dir:
        cmd.append(f"--model_dir={model_dir}")
    env = dict(os.environ)
    if FLAGS.bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = round(wall, 3)
    return result


def _median(rows: list[dict], *path: str) -> float:
    vals = []
    for r in rows:
        for p in path:
            r = r[p]
        vals.append(r)
    return round(statistics.median(vals), 4)


def _summary(rows: list[dict]) -> dict:
    out = dict(
        load_to_first_token_s=_median(rows, "load_to_first_token_s"),
        first_token_s=_median(rows, "boot", "first_token_s"),
        load_seconds=_median(rows, "load_seconds"),
        programs_compiled=max(r["boot"]["programs_compiled"] for r in rows),
    )
    out["boot_median"] = {k: _median(rows, "boot", k) for k in ("read_s", "convert_s", "place_s", "compile_s")}
    out["runs"] = [dict(load_to_first_token_s=r["load_to_first_token_s"], boot=r["boot"]) for r in rows]
    return out


def checkpoints(work: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """The SmolLM-135M shape in bf16 (deterministic random weights) and its compressed form."""
    from infire_jax.checkpoint import tiny
    from infire_jax.checkpoint.compressed import compress_checkpoint

    raw, comp = work / "smollm-135m-bf16-v1", work / "smollm-135m-bf16-v1-compressed"
    if not (raw / "config.json").is_file():
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=".raw-", dir=work))
        tiny.write_tiny_checkpoint(tmp, "smollm-135m", seed=0, dtype="bfloat16")
        os.replace(tmp, raw)
    if not (comp / "manifest.json").is_file():
        tmp = work / f".comp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        compress_checkpoint(raw, tmp, runtime_ratio=False)
        os.replace(tmp, comp)
    return raw, comp


def compressed_vs_raw(cache_dir: str) -> dict:
    work = pathlib.Path(FLAGS.work_dir) if FLAGS.work_dir else pathlib.Path.home() / ".cache" / "infire_jax" / "bench"
    work.mkdir(parents=True, exist_ok=True)
    raw, comp = checkpoints(work)
    for d in (raw, comp):  # untimed: the compilation cache gets both models' programs
        start(str(d), cache_dir, 1)
    rows: dict[str, list[dict]] = {"raw_bf16": [], "compressed": []}
    for _ in range(FLAGS.rounds):
        for name, d in (("raw_bf16", raw), ("compressed", comp)):
            rows[name].append(start(str(d), cache_dir, 1))
    out = {k: _summary(v) for k, v in rows.items()}
    pairs = [c["load_to_first_token_s"] / r["load_to_first_token_s"] for r, c in zip(rows["raw_bf16"], rows["compressed"])]
    out["compressed_over_raw"] = round(out["compressed"]["load_to_first_token_s"] / out["raw_bf16"]["load_to_first_token_s"], 3)
    out["compressed_over_raw_pairs"] = [round(p, 3) for p in pairs]
    out["checkpoints"] = dict(raw=str(raw), compressed=str(comp))
    return out


def second_start() -> dict:
    rounds = []
    for _ in range(FLAGS.start_rounds):
        cache = tempfile.mkdtemp(prefix="infire_jax_xla_")
        try:
            first = start(FLAGS.start_model_dir, cache, FLAGS.max_new_tokens)
            second = start(FLAGS.start_model_dir, cache, FLAGS.max_new_tokens)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        rounds.append(dict(first=first["boot"], second=second["boot"],
                           ratio=round(second["boot"]["first_token_s"] / first["boot"]["first_token_s"], 3)))
    return dict(
        model_dir=FLAGS.start_model_dir or "generate.py's default",
        first_token_s_first=round(statistics.median(r["first"]["first_token_s"] for r in rounds), 3),
        first_token_s_second=round(statistics.median(r["second"]["first_token_s"] for r in rounds), 3),
        ratio=round(statistics.median(r["ratio"] for r in rounds), 3),
        second_programs_compiled=max(r["second"]["programs_compiled"] for r in rounds),
        second_programs_lowered=max(r["second"].get("programs_lowered", 0) for r in rounds),  # 0: executable cache
        second_programs_loaded=min(r["second"]["programs_loaded"] for r in rounds),
        second_programs_prefetched=min(r["second"]["programs_prefetched"] for r in rounds),  # = loaded: all ahead
        rounds=rounds,
    )


def calibrate(layers: list[int]) -> dict:
    """Compile seconds per program = a + b x layers (cold cache; the layer list of a pp=1 model is
    unrolled), seconds per program from the warm cache (warm-up: tracing, lowering and loading),
    and the time before the loader starts (imports): the constants of plan.capacity.BootCalibration.
    In CPU seconds of the process (all threads), which other jobs on a shared machine do not
    inflate the way they inflate wall time; XLA compiles on several threads, so on an idle machine
    the wall time of a compile is up to the thread count lower."""
    import numpy as np

    from infire_jax.checkpoint import tiny

    rows = []
    with tempfile.TemporaryDirectory(prefix="infire_jax_calib_") as tmp:
        for n in layers:
            model = tiny.write_tiny_checkpoint(pathlib.Path(tmp) / f"l{n}", overrides={"num_hidden_layers": n})
            cache = pathlib.Path(tmp) / f"xla{n}"
            first, second = start(str(model), str(cache), 2), start(str(model), str(cache), 2)
            rows.append(dict(
                layers=n, programs=first["warmup"]["programs_compiled"],
                compile_s_per_program=first["warmup"]["cpu_seconds"] / max(1, first["warmup"]["programs_compiled"]),
                cached_s_per_program=second["warmup"]["cpu_seconds"] / max(1, second["warmup"]["programs_from_cache"]),
                init_s=second["before_load_cpu_s"],
                wall=dict(first_warmup_s=first["warmup"]["seconds"], second_warmup_s=second["warmup"]["seconds"],
                          before_load_s=second["boot"]["first_token_s"] - second["load_to_first_token_s"]),
            ))
    slope, base = np.polyfit([r["layers"] for r in rows], [r["compile_s_per_program"] for r in rows], 1)
    return dict(
        compile_s_per_program=round(float(base), 3), compile_s_per_layer=round(float(slope), 4),
        cached_s_per_program=round(statistics.median(r["cached_s_per_program"] for r in rows), 3),
        init_s=round(statistics.median(r["init_s"] for r in rows), 3),
        programs=int(statistics.median(r["programs"] for r in rows)), runs=rows,
    )


def main(argv: list[str]) -> None:
    del argv
    result: dict = dict(loadavg_before=os.getloadavg(),
                        bytecode=FLAGS.bytecode or not os.environ.get("PYTHONDONTWRITEBYTECODE"))
    if FLAGS.calibrate_layers:
        result["calibration"] = calibrate([int(n) for n in FLAGS.calibrate_layers])
    if not FLAGS.skip_second_start:
        result["second_start"] = second_start()
    if not FLAGS.skip_compressed:
        with tempfile.TemporaryDirectory(prefix="infire_jax_xla_") as cache:
            result["compressed_vs_raw"] = compressed_vs_raw(cache)
    result["loadavg_after"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    print(text)
    if FLAGS.out:
        pathlib.Path(FLAGS.out).write_text(text + "\n")


if __name__ == "__main__":
    app.run(main)
