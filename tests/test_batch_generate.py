"""Offline batch generation (experiments/batch_generate.py, infire_jax/engine/batch.py): OpenAI
Batch-shaped input, per-line errors, chat templates, stop strings, durable appends, resuming after
SIGKILL with every custom_id exactly once and the same outputs as an uninterrupted run."""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from infire_jax.checkpoint import tiny
from infire_jax.engine import batch
from infire_jax.engine.build import build_engine

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "batch_generate.py"
# The same for every run, so the runs share compiled programs through a persistent compilation cache.
JOB_FLAGS = ["--noprogress"]
WORDS = "the cat sat on a mat and then it rained over the hills while people walked home".split()


@pytest.fixture(scope="module")
def model_dir():
    return tiny.ensure_default_model()


@pytest.fixture(scope="module")
def builder(model_dir):
    return batch.RequestBuilder.from_model_dir(model_dir)


def _line(**body) -> batch.InputLine:
    return batch.InputLine(1, "c1", {"body": body})


# ---- input and request building (no model run) ----------------------------------------------------


def test_duplicate_custom_ids_fail_before_any_work(tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [dict(custom_id=c, body=dict(prompt="x")) for c in ("a", "b", "a", "c", "b")]
    src.write_text("\n".join(map(json.dumps, rows)) + "\n")
    with pytest.raises(batch.DuplicateCustomIds, match=r"'a' on lines 1, 3; 'b' on lines 2, 5"):
        batch.read_input(src)
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, str(SCRIPT), f"--input={src}", f"--output={out}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "appear more than once" in proc.stderr and "nothing was run" in proc.stderr
    assert not out.exists()


def test_malformed_lines_become_line_errors(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"custom_id": "ok", "body": {"prompt": "x"}}\n\n{"custom_id": \n[1, 2]\n'
                    b'{"body": {"prompt": "x"}}\n\xff\xfe\n')
    items = batch.read_input(src)
    assert [(it.line, it.custom_id, it.error and it.error.code) for it in items] == [
        (1, "ok", None), (3, None, "invalid_json"), (4, None, "invalid_request"), (5, None, "invalid_request"),
        (6, None, "invalid_json"),
    ]
    assert [it.key for it in items] == ["ok", 3, 4, 5, 6]


def test_prompts_chat_template_and_parameters(builder):
    p = builder.build(_line(prompt="the cat", max_tokens=3, temperature=0.5, top_p=0.9, top_k=-1, seed=-1))
    assert p.prompt.tolist() == builder.encode_text("the cat") and p.prompt[0] == 0  # BOS first
    assert (p.params.max_new_tokens, p.params.temperature, p.params.top_p, p.params.top_k) == (3, 0.5, 0.9, 0)
    assert p.params.seed == 2**32 - 1 and p.params.stop_token_ids == (1,)  # EOS by default
    assert builder.build(_line(prompt=[5, 6, 7])).prompt.tolist() == [5, 6, 7]
    assert builder.build(_line(prompt="x", ignore_eos=True)).params.stop_token_ids == ()
    # default seed: stable per custom_id
    assert builder.build(_line(prompt="x")).params.seed == builder.build(_line(prompt="x")).params.seed

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "the cat"}]
    chat = builder.build(_line(messages=msgs, max_completion_tokens=5))
    want = ("<|begin_of_text|>Be brief.\n<|user|>\nHi<|end_of_text|>\n<|assistant|>\nHello<|end_of_text|>\n"
            "<|user|>\nthe cat<|end_of_text|>\n<|assistant|>\n")
    assert builder.decode(chat.prompt) == want and chat.params.max_new_tokens == 5
    assert chat.prompt.tolist() == builder.tokenizer.encode(want, add_special_tokens=False).ids

    errors = {
        "invalid_request": [dict(), dict(prompt="x", messages=[]), dict(messages="hi"), dict(prompt=["a", "b"]),
                            dict(messages=[{"role": "user", "content": [{"type": "image_url"}]}])],
        "invalid_parameter": [dict(prompt="x", max_tokens=0), dict(prompt="x", temperature=-1),
                              dict(prompt="x", top_p=0), dict(prompt="x", n=2), dict(prompt="x", frobnicate=1),
                              dict(prompt="x", stop=[""]), dict(prompt="x", stop=[999]), dict(prompt="x", seed="1"),
                              dict(prompt="x", max_tokens=True)],
        "prompt_too_long": [dict(prompt=[5] * 500, max_tokens=20)],
    }
    for code, bodies in errors.items():
        for body in bodies:
            with pytest.raises(batch.LineError) as e:
                builder.build(_line(**body))
            assert e.value.code == code, (body, e.value.message)
    with pytest.raises(batch.LineError, match="needs 'messages'"):
        builder.build(batch.InputLine(1, "c", {"url": "/v1/chat/completions", "body": {"prompt": "x"}}))
    with pytest.raises(batch.LineError, match="not supported"):
        builder.build(batch.InputLine(1, "c", {"url": "/v1/embeddings", "body": {"prompt": "x"}}))


def test_checkpoint_without_chat_template(tmp_path, model_dir):
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(model_dir / f, tmp_path / f)
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    b = batch.RequestBuilder.from_model_dir(tmp_path)
    with pytest.raises(batch.LineError, match="no chat template") as e:
        b.build(_line(messages=[{"role": "user", "content": "hi"}]))
    assert e.value.code == "no_chat_template"
    assert b.build(_line(prompt="hi")).prompt.size  # prompts still work


def test_stop_strings_map_to_tokens_and_truncate_text(builder):
    tok = builder.tokenizer
    p = builder.build(_line(prompt="x", stop=["\n", " on", "at the", 7]))
    nl, on = (tok.encode(s, add_special_tokens=False).ids[0] for s in ("\n", " on"))
    assert p.stop_token_strings == {nl: "\n", on: " on"}  # single-token strings become stop ids too
    assert set(p.params.stop_token_ids) == {1, 7, nl, on} and p.stop_strings == ("\n", " on", "at the")

    ids = tok.encode(" sat at the mat", add_special_tokens=False).ids
    res = builder.finalize(p, ids + [5, 6], "length")  # a multi-token stop string, found in the text
    assert (res["text"], res["finish_reason"], res["stop_reason"]) == (" sat ", "stop", "at the")
    assert builder.decode(res["token_ids"][:-1]).find("at the") < 0 and "at the" in builder.decode(res["token_ids"])
    res = builder.finalize(p, ids[:2] + [1], "stop")  # EOS: stop token kept in ids, not in text
    assert res == dict(text=builder.decode(ids[:2]), token_ids=ids[:2] + [1], finish_reason="stop", stop_reason=1)
    res = builder.finalize(p, ids[:1] + [on], "stop")
    assert res["stop_reason"] == " on" and res["text"] == builder.decode(ids[:1])
    two_newlines = tok.encode("a\n\nb", add_special_tokens=False).ids  # "\n" inside a "\n\n" token
    res = builder.finalize(p, two_newlines, "length")
    assert res["text"] == "a" and res["stop_reason"] == "\n" and len(res["token_ids"]) == 2


# ---- the results file ----------------------------------------------------------------------------


def _records(n):
    return [dict(custom_id=f"r{i}", line=i + 1, text="t", error=None) for i in range(n)]


def test_results_writer_redoes_a_torn_tail_and_locks(tmp_path):
    out = tmp_path / "out.jsonl"
    with batch.ResultsWriter(out, fsync="always") as w:
        w.append(_records(3))
        with pytest.raises(RuntimeError, match="locked by another running batch job"):
            batch.ResultsWriter(out)
    whole = out.read_bytes()
    with open(out, "ab") as f:
        f.write(b'{"custom_id": "r3", "line": 4, "te')  # killed mid-write
    with batch.ResultsWriter(out) as w:
        assert w.dropped_bytes == 34 and w.done == {"r0", "r1", "r2"}
        assert out.read_bytes() == whole
        w.append(_records(4)[3:])
    with open(out, "ab") as f:
        f.write(b"\0" * 10 + b"\n")  # a complete-looking but unreadable last line (zero-filled block)
    with batch.ResultsWriter(out) as w:
        assert w.dropped_bytes == 11 and w.done == {"r0", "r1", "r2", "r3"}
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:1] + ["garbage"] + lines[1:]) + "\n")
    with pytest.raises(batch.OutputCorrupted, match="line 2 .* not the last line"):
        batch.ResultsWriter(out)


# ---- running the engine --------------------------------------------------------------------------


def test_text_stop_ends_the_request_early(model_dir, builder, tmp_path):
    engine = build_engine(model_dir, ["tp=1"], ["tp=1"])
    items = [batch.InputLine(1, "free", {"body": dict(prompt="hello world, this is", max_tokens=40, ignore_eos=True)}),
             batch.InputLine(2, "stop", {"body": dict(prompt="hello world, this is", max_tokens=40, stop="\n")})]
    with batch.ResultsWriter(tmp_path / "out.jsonl") as w:
        stats = batch.run_job(engine, items, builder, w)
    free, stop = (_load(tmp_path / "out.jsonl")[k] for k in ("free", "stop"))  # in finishing order in the file
    assert free["finish_reason"] == "length" and len(free["token_ids"]) == 40 and "\n" in free["text"]
    cut = free["text"].index("\n")
    assert stop["text"] == free["text"][:cut] and stop["finish_reason"] == "stop" and stop["stop_reason"] == "\n"
    assert stop["token_ids"] == free["token_ids"][: len(stop["token_ids"])]
    assert "\n" in builder.decode(stop["token_ids"]) and "\n" not in builder.decode(stop["token_ids"][:-1])
    # ended at the engine step after the stop appeared, not after 40 tokens
    assert stats["generated_tokens"] < 40 + len(stop["token_ids"]) + 2 * engine.decode_workers[0].steps
    assert stats["succeeded"] == 2 and stop["usage"]["completion_tokens"] == len(stop["token_ids"])
    timing = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])["timing"]
    assert set(timing) == {"queue_s", "ttft_s", "tpot_s", "e2e_s"} and timing["e2e_s"] > 0


# ---- the script: 200 mixed lines, SIGKILL, resume -----------------------------------------------

BAD = {  # line number (1-based) -> (raw line, expected error code)
    8: ('{"custom_id": "broken", "body": {"prompt": "x"', "invalid_json"),
    23: ('{"body": {"prompt": "no id"}}', "invalid_request"),
    37: ('{"custom_id": "nobody"}', "invalid_request"),
    51: ('{"custom_id": "neg", "body": {"prompt": "x", "max_tokens": -2}}', "invalid_parameter"),
    64: ('{"custom_id": "hot", "body": {"prompt": "x", "temperature": -0.5}}', "invalid_parameter"),
    77: ('{"custom_id": "long", "body": {"prompt": [' + ",".join(["5"] * 505) + '], "max_tokens": 10}}',
         "prompt_too_long"),
    90: ('{"custom_id": "both", "body": {"prompt": "x", "messages": []}}', "invalid_request"),
    111: ('{"custom_id": "n2", "body": {"prompt": "x", "n": 2}}', "invalid_parameter"),
    140: ("not json at all", "invalid_json"),
    199: ('{"custom_id": "chatbad", "body": {"messages": [{"content": "no role"}]}}', "invalid_request"),
}


def _write_requests(path: pathlib.Path, n: int = 200) -> None:
    rng = random.Random(0)
    lines = []
    for i in range(1, n + 1):
        if i in BAD:
            lines.append(BAD[i][0])
            continue
        # short prompts and max_tokens <= 8 (one decode call): few distinct compiled shapes
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3 if i % 2 else 2)))
        body = {"max_tokens": rng.randint(1, 8)}
        if i % 2:
            body["prompt"] = text
            url = "/v1/completions"
        else:
            body["messages"] = [{"role": "user", "content": text}]
            url = "/v1/chat/completions"
        if i % 7 == 0:
            body["stop"] = [" the", "\n"]
        if i % 11 == 0:
            body.update(temperature=0.8, top_p=0.9, seed=i)
        lines.append(json.dumps({"custom_id": f"req-{i:03d}", "method": "POST", "url": url, "body": body}))
    path.write_text("\n".join(lines) + "\n")


def _env(cache: pathlib.Path) -> dict:
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))


def _job(src, out, env, *extra, timeout=120):
    proc = subprocess.run([sys.executable, str(SCRIPT), f"--input={src}", f"--output={out}", *JOB_FLAGS, *extra],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _load(path) -> dict:
    out = {}
    for raw in pathlib.Path(path).read_text().splitlines():
        rec = json.loads(raw)
        key = batch.result_key(rec)
        assert key not in out, f"{key!r} appears twice in {path}"
        rec.pop("timing", None)
        out[key] = rec
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, model_dir):
    d = tmp_path_factory.mktemp("batch_job")
    src, out = d / "requests.jsonl", d / "full.jsonl"
    _write_requests(src)
    env = _env(d / "jax_cache")
    summary = _job(src, out, env, f"--summary={d / 'summary.json'}")
    return d, src, env, summary, _load(out)


def test_200_mixed_requests_one_result_per_line(uninterrupted):
    d, src, env, summary, results = uninterrupted
    assert len(results) == 200
    errors = {rec["line"]: rec["error"]["code"] for rec in results.values() if rec["error"]}
    assert errors == {line: code for line, (_, code) in BAD.items()}
    ok = [rec for rec in results.values() if not rec["error"]]
    assert all(rec["finish_reason"] in ("stop", "length") and rec["usage"]["completion_tokens"] == len(rec["token_ids"])
               and isinstance(rec["text"], str) for rec in ok)
    assert any(rec["stop_reason"] in (" the", "\n") for rec in ok)  # some stop strings were hit
    assert summary["succeeded"] == 190 and summary["errors"] == 10 and summary["lines"] == 200
    assert summary["errors_by_code"] == {"invalid_json": 2, "invalid_parameter": 3, "invalid_request": 4,
                                         "prompt_too_long": 1}
    assert summary["tokens_per_s"] > 0 and summary["completion_tokens"] == sum(len(r["token_ids"]) for r in ok)
    assert json.loads((d / "summary.json").read_text()) == summary


def test_sigkill_and_rerun_gives_every_result_exactly_once(uninterrupted):
    d, src, env, _, want = uninterrupted
    out = d / "killed.jsonl"
    seed = int(os.environ.get("BATCH_KILL_SEED", time.time_ns() % 10**6))
    threshold = random.Random(seed).randint(1, 120)  # successful results before the kill
    cmd = [sys.executable, str(SCRIPT), f"--input={src}", f"--output={out}", *JOB_FLAGS]
    with open(d / "killed.err", "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if out.exists() and out.read_bytes().count(b'"error": null') >= threshold:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"job ended before the kill (seed {seed}, threshold {threshold})"
    partial = out.read_bytes()
    done_before = partial.count(b"\n")
    assert 0 < done_before < 200
    with open(out, "ab") as f:  # and a torn append, as if the kill had landed mid-write
        f.write(b'{"custom_id": "req-002", "line": 2, "text": "to')
    summary = _job(src, out, env)
    assert summary["repaired_torn_bytes"] >= 47
    assert summary["already_done"] == done_before and summary["processed"] == 200 - done_before
    got = _load(out)  # asserts every key once
    assert got == want, f"seed {seed}, threshold {threshold}"
    rerun = _job(src, out, env)  # nothing left: loads no model, writes nothing
    assert rerun["processed"] == 0 and rerun["already_done"] == 200 and "model_dir" not in rerun
    assert _load(out) == want
