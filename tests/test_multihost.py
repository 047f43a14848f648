"""Multi-host meshes (infire_jax.distributed): local processes on 127.0.0.1 form one cluster through
experiments/launch_multihost.py, and one model spans all their devices.

Four launches, each bounded (the launcher's --timeout, a subprocess timeout on top, SIGKILL):
- 2 processes x 2 devices: a dense model on pp=2,tp=2 and tp=4 (safetensors) and pp=4 (its
  orbax-saved form), an MoE model with its experts split between the processes (ep=2,tp=2), the
  dense model's compressed form on pp=2,tp=2: every run's greedy tokens equal to one process's,
  every process reading about its own shards' checkpoint bytes; then process 1 is killed
  mid-generation and process 0 must stop naming it;
- 4 processes: prefill on processes 0-1, decode on processes 2-3, outputs equal to colocated;
- a mesh that does not use every device, and a process whose peer never starts: both fail fast
  with a clear error.
"""

import json
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

import infire_jax
from infire_jax.checkpoint import compressed, hf, store, tiny

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "experiments" / "launch_multihost.py"
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
NEW_TOKENS = 8
ENGINE = dict(decode_steps=4, kv_pages=128, max_decode_batch=8)  # as the launcher's defaults


def launch(tmp_path, name, *flags, timeout=240):
    """Run the launcher; its JSON summary (every process's exit code, reports and stderr tail)."""
    out = tmp_path / f"{name}.json"
    argv = [sys.executable, str(LAUNCHER), *flags, f"--json_out={out}", f"--timeout={timeout - 20}",
            "--prompts=" + ",".join(map(str, PROMPTS[0])), "--prompts=" + ",".join(map(str, PROMPTS[1])),
            f"--max_new_tokens={NEW_TOKENS}", *(f"--{k}={v}" for k, v in ENGINE.items())]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert out.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def results(summary):
    """run index -> the result reports of every process, by process."""
    runs = {}
    for p in summary["processes"]:
        for r in p["reports"]:
            if r["kind"] == "result":
                runs.setdefault(r["run"], {})[r["process"]] = r
    return runs


def reference(model_dir):
    return infire_jax.load(model_dir, **ENGINE).generate(PROMPTS, max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    dense = tiny.write_tiny_checkpoint(root / "dense", "tiny-llama", tokenizer=False)
    moe = tiny.write_tiny_checkpoint(root / "moe", "tiny-qwen3-moe", tokenizer=False)
    comp = root / "compressed"
    compressed.compress_checkpoint(dense, comp, runtime_ratio=False)
    saved = store.save(infire_jax.load(dense).placed, root / "orbax", dense, chunk_bytes=16 << 10)
    return dict(dense=dense, moe=moe, compressed=comp, orbax=saved)


def _tensor_bytes(model_dir):
    """HF name -> bytes of each tensor in the checkpoint."""
    return {n: int(np.prod(shape)) * 4 for n, (_, shape, _) in hf.list_tensors(model_dir).items()}


def test_one_model_over_two_processes_then_a_killed_process_stops_the_other(dirs, tmp_path):
    # the dense model on pp=2,tp=2 and tp=4 from safetensors and on pp=4 from its orbax-saved form
    runs = [f"--mesh=pp=2,tp=2::{dirs['dense']}", f"--mesh=tp=4::{dirs['dense']}", f"--mesh=pp=4::{dirs['orbax']}",
            f"--mesh=ep=2,tp=2::{dirs['moe']}", f"--mesh=pp=2,tp=2::{dirs['compressed']}"]
    summary = launch(tmp_path, "two", "--num_processes=2", "--local_devices=2", *runs,
                     "--kill_process=1", "--kill_after_s=1", "--heartbeat_timeout=20", timeout=400)
    got = results(summary)
    assert sorted(got) == list(range(5)), summary["processes"][0]["stderr_tail"]
    want = {k: reference(dirs[k]) for k in ("dense", "moe", "compressed")}
    want["orbax"] = want["dense"]
    kinds = ["dense", "dense", "orbax", "moe", "compressed"]
    sizes = _tensor_bytes(dirs["dense"])
    total = sum(sizes.values())
    replicated = sum(b for n, b in sizes.items() if "norm" in n or "embed" in n or "lm_head" in n)
    for i, kind in enumerate(kinds):
        for p, r in got[i].items():
            assert r["outputs"] == want[kind], (i, kind, p)
            c = r["reads"]
            assert 0 < c["bytes_read"] < 0.8 * r["checkpoint_bytes"], (i, kind, p, c)  # no process reads it all
    # safetensors, pp=2,tp=2: exactly one pipeline stage's layers plus the embeddings, head and norm
    for p, r in got[0].items():
        layers = {2 * p, 2 * p + 1}
        mine = sum(b for n, b in sizes.items() if not n.startswith("model.layers.") or int(n.split(".")[2]) in layers)
        assert r["reads"]["bytes_read"] == r["reads"]["needed_bytes"] == mine
    # tp=4: about half the sharded weights, plus what both processes replicate
    for r in got[1].values():
        assert total / 2 - replicated <= r["reads"]["bytes_read"] <= total / 2 + replicated, r["reads"]
    moe_total = sum(_tensor_bytes(dirs["moe"]).values())
    for r in got[3].values():  # experts split over the processes (ep), tp within each
        assert r["reads"]["bytes_read"] <= moe_total / 2 + replicated, r["reads"]

    survivor, killed = summary["processes"]
    assert killed["exit_code"] == -9
    assert survivor["exit_code"] == infire_jax.distributed.LOST_PROCESS_EXIT
    assert survivor["stopped_after_kill_s"] < 60
    message = "\n".join(survivor["stderr_tail"])
    assert "lost process 1" in message and f"pid {killed['reports'][0]['pid']}" in message, message


def test_prefill_and_decode_on_different_process_groups(dirs, tmp_path):
    summary = launch(tmp_path, "pd", "--num_processes=4", "--local_devices=2", f"--model_dir={dirs['dense']}",
                     "--prefill_mesh=pp=2,tp=2@0-3", "--decode_mesh=tp=4@4-7", timeout=400)
    assert [p["exit_code"] for p in summary["processes"]] == [0] * 4, [p["stderr_tail"] for p in summary["processes"]]
    got = results(summary)[0]
    want = reference(dirs["dense"])
    assert all(r["outputs"] == want for r in got.values())
    sizes = _tensor_bytes(dirs["dense"])
    for p, r in got.items():  # each process builds only its own devices' shards of its own side
        assert r["reads"]["bytes_read"] < 0.7 * sum(sizes.values()), (p, r["reads"])


def test_wrong_mesh_and_missing_process_fail_fast(dirs, tmp_path):
    """A mesh over 2 of the cluster's 4 devices is refused in every process before loading; a
    process whose peer never starts stops after its initialization timeout, saying so."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lone = subprocess.Popen(
        [sys.executable, str(LAUNCHER), "--process_id=0", "--num_processes=2", f"--coordinator=127.0.0.1:{port}",
         "--local_devices=1", "--initialization_timeout=5", f"--model_dir={dirs['dense']}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    summary = launch(tmp_path, "badmesh", "--num_processes=2", "--local_devices=2", f"--model_dir={dirs['dense']}",
                     "--mesh=tp=2", timeout=120)
    for p in summary["processes"]:
        assert p["exit_code"] == 2, p
        assert any("MeshSpecError: mesh 'tp=2' uses 2 devices but the cluster has 4" in line for line in p["stderr_tail"])
    assert not any(r["kind"] == "result" for p in summary["processes"] for r in p["reports"])
    _, err = lone.communicate(timeout=90)
    assert lone.returncode == infire_jax.distributed.JOIN_FAILED_EXIT, err[-2000:]
    assert "waited 5 s for 2 processes to join" in err


def test_each_checkpoint_byte_is_read_once_per_shard(dirs):
    """In one process holding every device, the per-shard reads of a pp x tp layout add up to the
    checkpoint exactly: shards read their own byte ranges, and partly replicated blocks once."""
    from infire_jax.checkpoint import reads

    with reads.counting() as counter:
        infire_jax.load(dirs["dense"], mesh="pp=2,tp=2")
    total = sum(_tensor_bytes(dirs["dense"]).values())
    assert counter.bytes_read == counter.needed_bytes == total and counter.whole_reads == 0


def test_initialize_after_a_device_was_touched_is_refused():
    import jax

    jax.devices()
    with pytest.raises(infire_jax.distributed.DistributedError, match="before anything touches a device"):
        infire_jax.distributed.initialize("127.0.0.1:1", num_processes=2, process_id=0)
