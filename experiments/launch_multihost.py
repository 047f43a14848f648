"""One model over the devices of several processes (infire_jax.distributed): launch, generate, report.

Without --process_id this script is the launcher: it starts --num_processes copies of itself on this
machine (process i with --local_devices[i] simulated CPU devices, a coordinator on a free port of
127.0.0.1), prints every run's outputs (after checking that every process produced the same) and
each process's checkpoint bytes read, and exits non-zero if a process failed.

  python experiments/launch_multihost.py --num_processes 2 --local_devices 2 \
      --mesh pp=2,tp=2 --mesh tp=4 --mesh pp=4 --prompts "The weather today is" --max_new_tokens 16
  python experiments/launch_multihost.py --num_processes 4 --local_devices 2 \
      --prefill_mesh pp=2,tp=2@0-3 --decode_mesh tp=4@4-7 --prompts_file prompts.json

With --process_id it is one process of the cluster, which is how it runs on a real cluster: one
command per host, the same flags everywhere but the id (local devices are then the host's own):

  python experiments/launch_multihost.py --coordinator host0:4321 --num_processes 2 --process_id 0 \
      --model_dir /models/m --mesh pp=2,tp=8          # on host0; --process_id 1 on host1

(or --cluster_env under SLURM and similar launchers: JAX reads the coordinator, count and id from
the environment they set). Every --mesh is a run of its own with the same processes: load
(timed, bytes read counted per process), then generate the prompts greedily. A mesh may name another
checkpoint as MESH::MODEL_DIR. --json_out: every process's results, per run.

Fault drill: --kill_process K --kill_after_s S: after the last run's result, every process keeps
generating the prompts (compiled programs, collectives in flight) and process K is killed with
SIGKILL S seconds after all of them started; the others must stop within --heartbeat_timeout with a
message naming process K (JAX catches SIGTERM in distributed processes: use SIGKILL or SIGINT).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import flags_common  # noqa: E402  (experiments/flags_common.py)

FLAGS = flags.FLAGS
flags_common.define_model_flags()
flags_common.define_engine_flags(kv_pages=128)
flags_common.define_compilation_cache_flag()
flags.DEFINE_multi_string("mesh", None, "Global mesh of a run (repeat for several runs), e.g. pp=2,tp=2; "
                          "MESH::MODEL_DIR runs another checkpoint.")
flags.DEFINE_string("prefill_mesh", None, "P/D run: the prefill mesh (global devices, e.g. pp=2,tp=2@0-3).")
flags.DEFINE_string("decode_mesh", None, "P/D run: the decode mesh (e.g. tp=4@4-7).")
flags.DEFINE_multi_string("prompts", None, "Prompt text or comma-separated token ids (repeat).")
flags.DEFINE_string("prompts_file", None, "JSON list of prompts (text or token-id lists).")
flags.DEFINE_integer("max_new_tokens", 16, "Greedy tokens per prompt.")
flags.DEFINE_integer("num_processes", None, "Processes in the cluster (launcher: how many to start).")
flags.DEFINE_integer("process_id", None, "Run as this process of the cluster (unset: launch them all here).")
flags.DEFINE_string("coordinator", None, "host:port of process 0's coordination service (launcher: a free "
                    "port on 127.0.0.1).")
flags.DEFINE_bool("cluster_env", False, "Run as one process of a cluster whose launcher (SLURM, ...) set the "
                  "environment JAX reads the coordinator, process count and id from.")
flags.DEFINE_list("local_devices", None, "Simulated CPU devices per process: one count for all, or one each "
                  "(launcher); unset in a per-host process = the host's own devices.")
flags.DEFINE_float("initialization_timeout", 120.0, "Seconds for the whole cluster to form.")
flags.DEFINE_float("heartbeat_timeout", 20.0, "A peer silent this long is reported lost.")
flags.DEFINE_float("timeout", 600.0, "Launcher: seconds before every process still running is killed.")
flags.DEFINE_integer("kill_process", None, "Fault drill: SIGKILL this process mid-generation.")
flags.DEFINE_float("kill_after_s", 2.0, "Fault drill: seconds after generation started.")
flags.DEFINE_string("process_logs", None, "Launcher: write each process's whole stderr to PROCESS_LOGS/process_<i>.log.")
flags.DEFINE_string("json_out", None, "Write the results (launcher: of every process) to this JSON file.")
flags.adopt_module_key_flags(flags_common)  # --help lists the shared flags too

MARK = "@@multihost "  # prefix of the lines a process reports to the launcher


def _emit(kind: str, **payload) -> None:
    print(MARK + json.dumps(dict(kind=kind, **payload)), flush=True)


def _prompts(tokenizer, bos) -> list[list[int]]:
    items = []
    if FLAGS.prompts_file:
        items = json.loads(pathlib.Path(FLAGS.prompts_file).read_text())
    items += list(FLAGS.prompts or [])
    items = items or ["The weather today is", "Once upon a time", "In a distant galaxy far away, a small robot"]
    out = []
    for item in items:
        if isinstance(item, str) and item.replace(",", "").replace(" ", "").isdigit():
            item = [int(t) for t in item.split(",")]
        if isinstance(item, str):
            if tokenizer is None:
                raise app.UsageError("text prompts need tokenizer.json in the model directory; give token ids")
            item = ([bos] if bos is not None else []) + tokenizer.encode(item, add_special_tokens=False).ids
        out.append([int(t) for t in item])
    return out


def _runs(default_dir: str, default_mesh: str) -> list[dict]:
    if FLAGS.prefill_mesh or FLAGS.decode_mesh:
        if FLAGS.mesh:
            raise app.UsageError("give --mesh runs or one --prefill_mesh/--decode_mesh pair, not both")
        return [dict(model_dir=default_dir, prefill_mesh=FLAGS.prefill_mesh, decode_mesh=FLAGS.decode_mesh)]
    runs = []
    for spec in FLAGS.mesh or [default_mesh]:
        mesh, _, model_dir = spec.partition("::")
        runs.append(dict(model_dir=model_dir or default_dir, mesh=mesh))
    return runs


# ---- one process of the cluster -----------------------------------------------------------------
def process_main() -> None:
    import infire_jax
    from infire_jax.mesh import MeshSpecError

    local = FLAGS.local_devices
    count = int(local[0] if len(local) == 1 else local[FLAGS.process_id]) if local else None
    t0 = time.perf_counter()
    cluster = infire_jax.distributed.initialize(
        FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id, count,
        initialization_timeout=FLAGS.initialization_timeout, heartbeat_timeout=FLAGS.heartbeat_timeout,
    )
    me = cluster.process_id
    _emit("joined", process=me, pid=os.getpid(), cluster=cluster.describe(), join_s=round(time.perf_counter() - t0, 2))
    from infire_jax.checkpoint import reads, tiny
    from infire_jax.config import load_config

    default_dir = FLAGS.model_dir or str(tiny.ensure_default_model())
    import jax

    runs = _runs(default_dir, f"tp={jax.device_count()}")
    options = flags_common.engine_options()
    engine = dict(decode_steps=options.decode_steps, kv_pages=options.kv_pages, page_size=options.page_size,
                  max_decode_batch=options.max_decode_batch, prefix_cache=options.prefix_cache,
                  prefill_chunk=options.prefill_chunk)
    for i, run in enumerate(runs):
        model_dir = run["model_dir"]
        cfg = load_config(model_dir)
        tokenizer = None
        if os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        prompts = _prompts(tokenizer, cfg.bos_token_id)
        meshes = {k: run[k] for k in ("mesh", "prefill_mesh", "decode_mesh") if run.get(k)}
        t0 = time.perf_counter()
        try:
            with reads.counting() as counter:
                model = infire_jax.load(
                    model_dir, dtype=FLAGS.dtype, compilation_cache_dir=FLAGS.compilation_cache_dir or None, **engine,
                    **meshes,
                )
        except MeshSpecError as e:  # the same in every process: leave normally, all of us together
            print(f"process {me}: MeshSpecError: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        outputs = model.generate(prompts, max_new_tokens=FLAGS.max_new_tokens)
        compiled = [s for p in {id(model.programs): model.programs, id(model.decode_programs): model.decode_programs}.values()
                    for s in p.compile_seconds.values()]  # first call of each program: mostly compilation
        _emit(
            "result", process=me, run=i, model_dir=model_dir, **meshes, outputs=outputs,
            load_s=round(load_s, 3), generate_s=round(time.perf_counter() - t0, 3), reads=counter.as_dict(),
            checkpoint_bytes=_checkpoint_bytes(model_dir), compiled=len(compiled), compile_s=round(sum(compiled), 3),
        )
        if i == len(runs) - 1 and FLAGS.kill_process is not None:  # the fault drill: generate until killed
            _emit("generating", process=me)
            while True:
                model.generate(prompts, max_new_tokens=FLAGS.max_new_tokens)
    infire_jax.distributed.shutdown()


def _checkpoint_bytes(model_dir: str) -> int:
    """Bytes of the checkpoint's weight files (safetensors, compressed containers or orbax data)."""
    root = pathlib.Path(model_dir)
    patterns = ("*.safetensors", "*.ijxc", "params/**/d/*")
    return sum(f.stat().st_size for p in patterns for f in root.glob(p) if f.is_file())


# ---- the launcher --------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Process:
    def __init__(self, i: int, argv: list[str]):
        self.id = i
        self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.reports: list[dict] = []
        self.stderr: list[str] = []
        self.ended_at: float | None = None
        self.threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
            threading.Thread(target=self._wait, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _read_stdout(self) -> None:
        for line in self.popen.stdout:
            if line.startswith(MARK):
                self.reports.append(json.loads(line[len(MARK):]))
            elif not line.startswith("[Gloo]"):
                sys.stdout.write(f"[{self.id}] {line}")

    def _wait(self) -> None:
        self.popen.wait()
        self.ended_at = time.perf_counter()

    def _read_stderr(self) -> None:
        for line in self.popen.stderr:
            self.stderr.append(line.rstrip("\n"))

    def kinds(self, kind: str) -> list[dict]:
        return [r for r in self.reports if r["kind"] == kind]


def launch() -> int:
    n = FLAGS.num_processes or 2
    coordinator = FLAGS.coordinator or f"127.0.0.1:{_free_port()}"
    passed = [a for a in sys.argv[1:] if not a.startswith(("--coordinator", "--num_processes", "--json_out", "--process_logs"))]
    base = [sys.executable, os.path.abspath(__file__), *passed, f"--coordinator={coordinator}", f"--num_processes={n}"]
    t0 = time.perf_counter()
    procs = [_Process(i, base + [f"--process_id={i}"]) for i in range(n)]
    killed_at = None
    deadline = t0 + FLAGS.timeout
    try:
        while any(p.popen.poll() is None for p in procs):
            if time.perf_counter() > deadline:
                print(f"launcher: timeout of {FLAGS.timeout:.0f} s; killing the processes still running")
                break
            if FLAGS.kill_process is not None and killed_at is None and all(p.kinds("generating") for p in procs):
                time.sleep(FLAGS.kill_after_s)
                procs[FLAGS.kill_process].popen.send_signal(signal.SIGKILL)
                killed_at = time.perf_counter()
                print(f"launcher: killed process {FLAGS.kill_process} (SIGKILL) mid-generation")
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.popen.poll() is None:
                p.popen.kill()  # SIGKILL: JAX catches SIGTERM in distributed processes
            p.popen.wait()
            for t in p.threads:
                t.join(timeout=5)
    wall = time.perf_counter() - t0
    summary = dict(num_processes=n, coordinator=coordinator, wall_s=round(wall, 2), processes=[])
    failed = False
    for p in procs:
        p.threads[-1].join(timeout=5)
        if FLAGS.process_logs:
            os.makedirs(FLAGS.process_logs, exist_ok=True)
            pathlib.Path(FLAGS.process_logs, f"process_{p.id}.log").write_text("\n".join(p.stderr) + "\n")
        entry = dict(process=p.id, exit_code=p.popen.returncode, reports=p.reports,
                     stderr_tail=[line for line in p.stderr if "Gloo" not in line][-8:])
        if killed_at is not None and p.id != FLAGS.kill_process and p.ended_at is not None:
            entry["stopped_after_kill_s"] = round(p.ended_at - killed_at, 2)
        summary["processes"].append(entry)
        failed |= p.popen.returncode != 0
    _print_summary(summary, procs)
    if FLAGS.json_out:
        pathlib.Path(FLAGS.json_out).write_text(json.dumps(summary, indent=1))
        print(f"wrote {FLAGS.json_out}")
    return 1 if failed else 0


def _print_summary(summary: dict, procs: list[_Process]) -> None:
    runs: dict[int, list[dict]] = {}
    for p in procs:
        for r in p.kinds("result"):
            runs.setdefault(r["run"], []).append(r)
    for i in sorted(runs):
        results = sorted(runs[i], key=lambda r: r["process"])
        r0 = results[0]
        where = r0.get("mesh") or f"prefill {r0['prefill_mesh']} / decode {r0['decode_mesh']}"
        same = all(r["outputs"] == r0["outputs"] for r in results)
        print(f"=== run {i}: {r0['model_dir']} on {where}: outputs {'identical in every process' if same else 'DIFFER between processes'}")
        for j, out in enumerate(r0["outputs"]):
            print(f"  prompt {j}: {out}")
        for r in results:
            c = r["reads"]
            print(f"  process {r['process']}: read {c['bytes_read'] / 2**20:.3f} MiB of the checkpoint's "
                  f"{r['checkpoint_bytes'] / 2**20:.3f} MiB ({c['bytes_read'] / max(1, r['checkpoint_bytes']):.0%}; its "
                  f"shards need {c['needed_bytes'] / 2**20:.3f} MiB), load {r['load_s']:.1f} s, generate {r['generate_s']:.1f} s "
                  f"(of which {r['compile_s']:.1f} s in the first calls of {r['compiled']} programs)")
    for entry in summary["processes"]:
        if entry["exit_code"] != 0:
            print(f"process {entry['process']} exited with {entry['exit_code']}:")
            for line in entry["stderr_tail"]:
                print(f"    {line}")


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.process_id is not None or FLAGS.cluster_env:
        process_main()
    else:
        sys.exit(launch())


if __name__ == "__main__":
    app.run(main)
