"""Offline batch generation: OpenAI Batch API-shaped JSONL in, one JSON result per line out, resumable.

The library half of experiments/batch_generate.py (the script adds flags, the progress bar and the
summary print). The pieces:

- `read_input`: parses every line once (bad JSON / a missing `custom_id` become per-line errors) and
  raises `DuplicateCustomIds` before any work when a `custom_id` repeats.
- `RequestBuilder`: turns a line's `body` into prompt token ids + `SamplingParams` + stop strings.
  `prompt` (text or token ids) or `messages` (rendered with the checkpoint's jinja chat template,
  `add_generation_prompt=True`); `max_tokens`/`max_completion_tokens`, `temperature`, `top_p`,
  `top_k`, `seed`, `stop`, `stop_token_ids`, `ignore_eos`.
- `ResultsWriter`: appends results to the output with one `write` per engine step (so a SIGKILL
  never loses a finished result: the data is in the page cache), fsyncs them (in a background
  thread by default, so the 3 ms fsync does not stall the engine), holds an exclusive lock on the
  file, and on open detects a torn last line (a kill mid-write) and truncates it so it is redone.
- `run_job`: keeps up to `max_inflight` requests submitted to an `Engine`, steps it, ends requests
  that produced a stop string early, and writes each result as its request finishes.

Stop semantics (documented for users in experiments/batch_generate.py):
- integer entries of `stop` and `stop_token_ids` stop on that token id (the engine ends the request
  at that token, kept in `token_ids`); the model's EOS ids are added unless `ignore_eos` is true.
- a string entry that the tokenizer encodes as exactly one token (and that decodes back to the same
  string) is *also* added as a stop token id, so it ends the request at once. Every string entry is
  in addition matched on the decoded text, because the same text can come out as other tokens
  ("\\n" inside a "\\n\\n" token, or a word spelled as two pieces): after each engine step the
  request's text is checked and a request whose text contains a stop string is ended.
- the output `text` stops right before the earliest stop string (stop strings and stop tokens are
  not part of `text`, as in the OpenAI API); `token_ids` are the generated ids up to and including
  the token that completed the stop (the stop token itself for token stops), and
  `usage.completion_tokens` counts those ids. `stop_reason` names the matched stop (an id or a string).
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import fcntl
import json
import math
import os
import pathlib
import threading
import time
import zlib
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from infire_jax.engine.generation import RequestError, validate_prompt
from infire_jax.engine.sampling import SamplingError, SamplingParams

__all__ = [
    "LineError",
    "DuplicateCustomIds",
    "OutputCorrupted",
    "InputLine",
    "read_input",
    "RequestBuilder",
    "ResultsWriter",
    "run_job",
    "engine_throughput",
    "result_key",
]

URLS = ("/v1/completions", "/v1/chat/completions")
_SUPPORTED = (
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "seed", "stop", "stop_token_ids", "ignore_eos", "user",
)
# Accepted only at their default value (anything else changes the semantics we do not implement).
_DEFAULT_ONLY = dict(n=1, best_of=1, stream=False, echo=False, logprobs=None, top_logprobs=None,
                     presence_penalty=0, frequency_penalty=0, logit_bias=None, suffix=None, tools=None)
MAX_STOPS = 32


class LineError(Exception):
    """One input line that cannot be served; becomes that line's error result."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    def as_dict(self) -> dict[str, str]:
        return dict(code=self.code, message=self.message)


class DuplicateCustomIds(ValueError):
    """The input names the same custom_id on more than one line."""


class OutputCorrupted(RuntimeError):
    """The output file has an unreadable line that is not the last one (not a torn append)."""


# ------------------------------------------------------------------------------------------------
# Input
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class InputLine:
    line: int  # 1-based line number in the input file
    custom_id: str | None
    request: dict | None  # the parsed JSON object
    error: LineError | None = None

    @property
    def key(self) -> str | int:
        """What a result is matched by when resuming: the custom_id, or the line number of a line
        that has none (malformed JSON)."""
        return self.custom_id if self.custom_id is not None else self.line


def result_key(record: dict) -> str | int:
    return record["custom_id"] if record.get("custom_id") is not None else record["line"]


def read_input(path: str | os.PathLike) -> list[InputLine]:
    """Every non-blank line of a JSONL batch file. Lines that are not JSON objects or lack a string
    custom_id carry their error; duplicated custom_ids raise DuplicateCustomIds (before any work)."""
    items: list[InputLine] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                items.append(InputLine(n, None, None, LineError("invalid_json", f"line is not UTF-8: {e}")))
                continue
            except json.JSONDecodeError as e:
                items.append(InputLine(n, None, None, LineError("invalid_json", f"line is not valid JSON: {e}")))
                continue
            if not isinstance(obj, dict):
                items.append(InputLine(n, None, None, LineError(
                    "invalid_request", f"line must be a JSON object, got {type(obj).__name__}")))
                continue
            cid = obj.get("custom_id")
            if not isinstance(cid, str) or not cid:
                items.append(InputLine(n, None, obj, LineError(
                    "invalid_request", f"custom_id must be a non-empty string, got {cid!r}")))
                continue
            items.append(InputLine(n, cid, obj))
    seen: dict[str, list[int]] = collections.defaultdict(list)
    for it in items:
        if it.custom_id is not None:
            seen[it.custom_id].append(it.line)
    dups = {cid: lines for cid, lines in seen.items() if len(lines) > 1}
    if dups:
        shown = "; ".join(f"{cid!r} on lines {', '.join(map(str, lines))}" for cid, lines in list(dups.items())[:10])
        more = f" (and {len(dups) - 10} more)" if len(dups) > 10 else ""
        raise DuplicateCustomIds(
            f"{path}: {len(dups)} custom_id(s) appear more than once: {shown}{more}. custom_id must be unique "
            "(results are matched and resumed by it); nothing was run"
        )
    return items


# ------------------------------------------------------------------------------------------------
# Requests
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Prepared:
    prompt: np.ndarray
    params: SamplingParams
    stop_strings: tuple[str, ...] = ()
    stop_token_strings: dict[int, str] = dataclasses.field(default_factory=dict)  # single-token stop strings


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _token_text(tok: Any) -> str | None:
    """A special token of tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def load_chat_template(model_dir: str | os.PathLike) -> tuple[str | None, dict[str, str | None]]:
    """(chat template or None, special tokens for rendering) of a checkpoint: tokenizer_config.json's
    chat_template (a string, or a list of named templates: the one named "default"), else a
    chat_template.jinja file beside it (newer transformers save it there)."""
    d = pathlib.Path(model_dir)
    cfg: dict[str, Any] = {}
    path = d / "tokenizer_config.json"
    if path.is_file():
        cfg = json.loads(path.read_text())
    template = cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not template and (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text()
    specials = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return template or None, specials


def _compile_template(template: str):
    """Compiled like transformers' apply_chat_template: sandboxed, trim_blocks + lstrip_blocks."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


class RequestBuilder:
    """Turns a batch line's body into (prompt ids, SamplingParams, stop strings) or a LineError."""

    def __init__(
        self,
        *,
        vocab_size: int,
        context: int,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        tokenizer: Any = None,  # tokenizers.Tokenizer
        chat_template: str | None = None,
        special_tokens: dict[str, str | None] | None = None,
        default_max_tokens: int = 16,
        source: str = "the checkpoint",
    ):
        self.vocab_size, self.context = vocab_size, context
        self.bos_token_id, self.eos_token_ids = bos_token_id, tuple(eos_token_ids)
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self._template = _compile_template(chat_template) if chat_template else None
        self.special_tokens = dict(special_tokens or {})
        self.default_max_tokens = default_max_tokens
        self.source = source
        self._single_token: dict[str, int | None] = {}

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike, *, context: int | None = None,
                       default_max_tokens: int = 16) -> "RequestBuilder":
        from infire_jax.config import load_config

        cfg = load_config(model_dir)
        tok_path = pathlib.Path(model_dir) / "tokenizer.json"
        tokenizer = None
        if tok_path.is_file():
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(tok_path))
        template, specials = load_chat_template(model_dir)
        return cls(
            vocab_size=cfg.vocab_size,
            context=context or cfg.max_position_embeddings,
            bos_token_id=cfg.bos_token_id,
            eos_token_ids=cfg.eos_token_ids,
            tokenizer=tokenizer,
            chat_template=template,
            special_tokens=specials,
            default_max_tokens=default_max_tokens,
            source=str(model_dir),
        )

    # -- text ---------------------------------------------------------------------------------
    def _need_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise LineError("no_tokenizer", f"{self.source} has no tokenizer.json, so {what} cannot be used; "
                                            "give the prompt as a list of token ids")
        return self.tokenizer

    def encode_text(self, text: str) -> list[int]:
        """A plain text prompt: the tokenizer's ids with the model's BOS first (as Model.encode)."""
        ids = self._need_tokenizer("a text prompt").encode(text, add_special_tokens=False).ids
        return ([self.bos_token_id] if self.bos_token_id is not None else []) + ids

    def decode(self, ids: Sequence[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def render_chat(self, messages: list[dict]) -> str:
        if self._template is None:
            raise LineError(
                "no_chat_template",
                f"{self.source} has no chat template (tokenizer_config.json has no chat_template and there is no "
                "chat_template.jinja), so 'messages' cannot be used; send a 'prompt' instead",
            )
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise LineError("chat_template_error", f"the chat template rejected these messages: {e}") from None

    def single_token(self, s: str) -> int | None:
        """The id of a stop string that is exactly one token, else None."""
        if s not in self._single_token:
            ids = self.tokenizer.encode(s, add_special_tokens=False).ids if self.tokenizer else []
            ok = len(ids) == 1 and self.tokenizer.decode(ids, skip_special_tokens=False) == s
            self._single_token[s] = ids[0] if ok else None
        return self._single_token[s]

    # -- bodies -------------------------------------------------------------------------------
    def _messages(self, messages: Any) -> list[dict]:
        if not isinstance(messages, list) or not messages:
            raise LineError("invalid_request", "messages must be a non-empty list of {role, content} objects")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise LineError("invalid_request", f"messages[{i}] must be an object with a string 'role'")
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts: only text parts are supported
                texts = []
                for part in content:
                    if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                        raise LineError("invalid_request",
                                        f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) "
                                        "are supported")
                    texts.append(part["text"])
                content = "".join(texts)
            if not isinstance(content, str):
                raise LineError("invalid_request", f"messages[{i}].content must be a string or a list of text parts")
            out.append(dict(m, content=content))
        return out

    def _prompt_ids(self, body: dict, url: str | None) -> list[int]:
        has_prompt, has_messages = "prompt" in body, "messages" in body
        if has_prompt == has_messages:
            raise LineError("invalid_request", "body must have exactly one of 'prompt' and 'messages'")
        if url == "/v1/chat/completions" and not has_messages:
            raise LineError("invalid_request", "url /v1/chat/completions needs 'messages' in the body")
        if url == "/v1/completions" and not has_prompt:
            raise LineError("invalid_request", "url /v1/completions needs 'prompt' in the body")
        if has_messages:
            text = self.render_chat(self._messages(body["messages"]))
            # the template writes the BOS and the turn markers itself
            return self._need_tokenizer("'messages'").encode(text, add_special_tokens=False).ids
        prompt = body["prompt"]
        if isinstance(prompt, str):
            return self.encode_text(prompt)
        if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            return list(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            raise LineError("invalid_request", "one prompt per line: put each prompt of a list on its own line")
        raise LineError("invalid_request", "prompt must be a string or a non-empty list of integer token ids")

    def _stops(self, body: dict) -> tuple[set[int], tuple[str, ...], dict[int, str]]:
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, (str, int)) and not isinstance(stop, bool):
            stop = [stop]
        if not isinstance(stop, list):
            raise LineError("invalid_parameter", "stop must be a string, a token id, or a list of them")
        extra = body.get("stop_token_ids") or []
        if not isinstance(extra, list) or not all(_is_int(t) for t in extra):
            raise LineError("invalid_parameter", "stop_token_ids must be a list of integer token ids")
        if len(stop) + len(extra) > MAX_STOPS:
            raise LineError("invalid_parameter", f"at most {MAX_STOPS} stop entries are supported")
        ids, strings = set(extra), []
        for s in stop:
            if _is_int(s):
                ids.add(s)
            elif isinstance(s, str) and s:
                strings.append(s)
            else:
                raise LineError("invalid_parameter", f"stop entries must be non-empty strings or token ids, got {s!r}")
        bad = sorted(t for t in ids if not 0 <= t < self.vocab_size)
        if bad:
            raise LineError("invalid_parameter", f"stop token ids outside the vocabulary [0, {self.vocab_size}): {bad[:8]}")
        single: dict[int, str] = {}
        if strings:
            self._need_tokenizer("stop strings")
            for s in strings:
                t = self.single_token(s)
                if t is not None:
                    single.setdefault(t, s)
            ids.update(single)
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise LineError("invalid_parameter", f"ignore_eos must be true or false, got {ignore_eos!r}")
        if not ignore_eos:
            ids.update(self.eos_token_ids)
        return ids, tuple(dict.fromkeys(strings)), single

    def build(self, item: InputLine) -> Prepared:
        if item.error is not None:
            raise item.error
        req = item.request
        url = req.get("url")
        if url is not None and url not in URLS:
            raise LineError("invalid_request", f"url {url!r} is not supported; use one of {list(URLS)}")
        method = req.get("method")
        if method is not None and method != "POST":
            raise LineError("invalid_request", f"method must be POST, got {method!r}")
        body = req.get("body")
        if not isinstance(body, dict):
            raise LineError("invalid_request", "the line needs a 'body' object (with 'prompt' or 'messages')")
        unknown = sorted(set(body) - set(_SUPPORTED) - set(_DEFAULT_ONLY))
        if unknown:
            raise LineError("invalid_parameter", f"unknown body field(s) {unknown}; supported: {sorted(_SUPPORTED)}")
        for k, default in _DEFAULT_ONLY.items():
            if k in body and body[k] != default and not (default is None and not body[k]):  # [] / false / null
                raise LineError("invalid_parameter", f"{k}={body[k]!r} is not supported (only {k}={default!r})")

        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", self.default_max_tokens))
        if max_tokens is None:
            max_tokens = self.default_max_tokens
        if not _is_int(max_tokens) or max_tokens < 1:
            raise LineError("invalid_parameter", f"max_tokens must be a positive integer, got {max_tokens!r}")
        temperature = body.get("temperature", 0.0)
        top_p = body.get("top_p", 1.0)
        temperature = 0.0 if temperature is None else temperature
        top_p = 1.0 if top_p is None else top_p
        if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
            raise LineError("invalid_parameter", f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
        if not _is_number(top_p) or not 0 < top_p <= 1:
            raise LineError("invalid_parameter", f"top_p must be a number in (0, 1], got {top_p!r}")
        top_k = body.get("top_k", 0)
        top_k = 0 if top_k in (None, -1) else top_k  # vLLM spells "no cut" -1
        if not _is_int(top_k) or top_k < 0:
            raise LineError("invalid_parameter", f"top_k must be an integer >= 0 (0 or -1 = no cut), got {top_k!r}")
        seed = body.get("seed")
        if seed is None:  # stable per request, so a rerun (or a resumed run) draws the same tokens
            seed = zlib.crc32(item.custom_id.encode())
        if not _is_int(seed):
            raise LineError("invalid_parameter", f"seed must be an integer, got {seed!r}")
        stop_ids, stop_strings, single = self._stops(body)
        prompt = self._prompt_ids(body, url)
        try:
            params = SamplingParams(max_tokens, float(temperature), top_k, float(top_p), seed % 2**32,
                                    tuple(sorted(stop_ids)))
        except SamplingError as e:
            raise LineError("invalid_parameter", str(e)) from None
        try:
            arr = validate_prompt(prompt, self.vocab_size, self.context, max_tokens)
        except RequestError as e:
            code = "prompt_too_long" if "exceeds the context" in str(e) else "invalid_request"
            raise LineError(code, str(e)) from None
        return Prepared(arr, params, stop_strings, single)

    # -- results ------------------------------------------------------------------------------
    def find_stop(self, ids: Sequence[int], strings: Sequence[str]) -> tuple[int, str] | None:
        """(character position, stop string) of the earliest stop string in the text of ids."""
        if not strings or not ids:
            return None
        text = self.decode(ids)
        hits = [(text.find(s), -len(s), s) for s in strings if s in text]
        if not hits:
            return None
        pos, _, s = min(hits)
        return pos, s

    def finalize(self, prep: Prepared, output: Sequence[int], finish_reason: str | None) -> dict[str, Any]:
        """text / token_ids / finish_reason / stop_reason of a finished request (see the module doc)."""
        ids = list(output)
        stop_reason: int | str | None = None
        content = ids
        if finish_reason == "stop" and ids and ids[-1] in prep.params.stop_token_ids:
            stop_reason, content = prep.stop_token_strings.get(ids[-1], ids[-1]), ids[:-1]
        hit = self.find_stop(content, prep.stop_strings)
        if hit is not None:
            pos, s = hit
            lo, hi = 1, len(content)  # the fewest tokens whose text contains the stop string
            while lo < hi:
                mid = (lo + hi) // 2
                if s in self.decode(content[:mid]):
                    hi = mid
                else:
                    lo = mid + 1
            ids, finish_reason, stop_reason = content[:lo], "stop", s
            text = self.decode(content)[:pos]
        else:
            text = self.decode(content)
        return dict(text=text, token_ids=ids, finish_reason=finish_reason, stop_reason=stop_reason)


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------

class ResultsWriter:
    """Appends JSON result lines to `path` durably; see the module doc.

    fsync: "background" (default: a thread fsyncs after every append, so results are on disk within
    one fsync of finishing and the engine never waits for the disk), "always" (fsync inside append),
    "never" (page cache only: still safe against the process being killed, not against a power cut).
    """

    def __init__(self, path: str | os.PathLike, fsync: str = "background"):
        if fsync not in ("background", "always", "never"):
            raise ValueError(f"fsync must be background, always or never, got {fsync!r}")
        self.path = pathlib.Path(path)
        self.fsync_mode = fsync
        self._thread: threading.Thread | None = None
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self.fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RuntimeError(f"{self.path} is locked by another running batch job; wait for it or pick "
                                   "another --output") from None
            raise
        self.records: list[dict] = []
        self.dropped_bytes = 0  # torn tail removed on open
        try:
            self._recover()
        except BaseException:
            self.close()
            raise
        self.done: set = {result_key(r) for r in self.records}
        self._pending_sync = False
        self._cond = threading.Condition()
        self._closing = False
        if fsync == "background":
            self._thread = threading.Thread(target=self._sync_loop, name="results-fsync", daemon=True)
            self._thread.start()

    def _recover(self) -> None:
        size = os.fstat(self.fd).st_size
        data = os.pread(self.fd, size, 0) if size else b""
        keep = data.rfind(b"\n") + 1  # bytes after the last newline: a torn append
        lines = data[:keep].split(b"\n")[:-1]
        for i, raw in enumerate(lines):
            try:
                rec = json.loads(raw.decode("utf-8"))
                if not isinstance(rec, dict) or "line" not in rec or "custom_id" not in rec:
                    raise ValueError("not a result record")
            except ValueError as e:
                if i == len(lines) - 1:  # a complete-looking but unreadable last line: redo it too
                    keep -= len(raw) + 1
                    break
                raise OutputCorrupted(
                    f"{self.path}: line {i + 1} is not a result record ({e}) and it is not the last line, so it is "
                    "not a torn write; fix or remove that line (or choose another --output)"
                ) from None
            self.records.append(rec)
        if keep < len(data):
            self.dropped_bytes = len(data) - keep
            os.ftruncate(self.fd, keep)
            os.fsync(self.fd)

    def append(self, records: Iterable[dict]) -> None:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        if not data:
            return
        view = memoryview(data)
        while view:  # O_APPEND: each write lands at the end
            view = view[os.write(self.fd, view):]
        if self.fsync_mode == "always":
            os.fsync(self.fd)
        elif self.fsync_mode == "background":
            with self._cond:
                self._pending_sync = True
                self._cond.notify()

    def _sync_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending_sync and not self._closing:
                    self._cond.wait()
                if not self._pending_sync and self._closing:
                    return
                self._pending_sync = False
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd < 0:
            return
        if self._thread is not None:
            with self._cond:
                self._closing = True
                self._cond.notify()
            self._thread.join()
        if self.fsync_mode != "never":
            os.fsync(self.fd)
        os.close(self.fd)  # also drops the lock
        self.fd = -1

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------

def error_record(item: InputLine, err: LineError) -> dict:
    return dict(custom_id=item.custom_id, line=item.line, error=err.as_dict())


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


def _programs(engine) -> list:
    seen, out = set(), []
    for w in list(engine.prefill_workers) + list(engine.decode_workers):
        if id(w.programs) not in seen:
            seen.add(id(w.programs))
            out.append(w.programs)
    return out


def compile_seconds(engine) -> float:
    """Wall time of every program's first call (dominated by compilation) so far."""
    return float(sum(sum(p.compile_seconds.values()) for p in _programs(engine)))


def _end_early(r) -> None:
    """End a request whose text reached a stop string. The engine has no cancel call; a request whose
    finish_reason is set is dropped by its decode worker at its next decode call, adding no tokens
    (DecodeWorker.step checks finish_reason before adding each token). finalize() cuts the text anyway,
    so this only saves work: results do not depend on when the request actually stops."""
    if not r.finished:
        r.finish_reason = "stop"


def run_job(
    engine,
    items: Sequence[InputLine],
    builder: RequestBuilder,
    writer: ResultsWriter,
    *,
    max_inflight: int = 256,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run every line of `items` whose key is not in writer.done; write one result per line.

    Order: lines are submitted sorted by their prompt tokens, so prompts that share a prefix (a system
    prompt, a few-shot block) run one after another; and a line whose first KV page of tokens equals
    that of a line still being prefilled waits for it, so it reuses that prefix from the engine's
    prefix cache instead of computing it alongside. Each result reports the prompt tokens that came
    from the cache (usage.prompt_tokens_details.cached_tokens, as OpenAI's API).

    on_progress(finished lines, generated tokens) is called after each engine step. Returns counts
    and throughput (generated tokens are the engine's work, before stop-string truncation)."""
    pending = [it for it in items if it.key not in writer.done]
    counts: dict[str, Any] = dict(lines=len(items), already_done=len(items) - len(pending), processed=len(pending),
                                  succeeded=0, errors=0)
    errors_by_code: collections.Counter = collections.Counter()
    finish_reasons: collections.Counter = collections.Counter()
    tokens = dict(prompt_tokens=0, cached_tokens=0, completion_tokens=0, generated_tokens=0)
    inflight: dict[Any, tuple[InputLine, Prepared, Any]] = {}
    checked: dict[Any, int] = {}  # request id -> output tokens already searched for stop strings
    compile0 = compile_seconds(engine)
    t0, cpu0 = time.perf_counter(), time.process_time()
    steps = 0

    def failed(item: InputLine, err: LineError) -> dict:
        errors_by_code[err.code] += 1
        counts["errors"] += 1
        return error_record(item, err)

    records: list[dict] = []
    built: list[tuple[InputLine, Prepared]] = []
    for item in pending:
        try:
            built.append((item, builder.build(item)))
        except LineError as e:
            records.append(failed(item, e))
    built.sort(key=lambda x: x[1].prompt.tolist())
    todo = collections.deque(built)
    page = min(w.page_size for w in engine.decode_workers)
    prefilling: dict[tuple, Any] = {}  # first page of tokens -> the request prefilling it

    def leader(prep: Prepared) -> Any:
        """The in-flight request still prefilling this prompt's first page, if any."""
        key = tuple(prep.prompt[:page].tolist()) if len(prep.prompt) > page else None
        r = prefilling.get(key)
        if r is not None and (r.finished or r.status not in ("queued", "prefill")):
            del prefilling[key]
            r = None
        return key, r

    while todo or inflight or records:
        while todo and len(inflight) < max_inflight:
            item, prep = todo[0]
            key, ahead = leader(prep)
            if ahead is not None:
                break  # after its leader's prefill, it reuses the leader's pages
            todo.popleft()
            r = engine.submit(prep.prompt, prep.params, request_id=item.key)
            if key is not None:
                prefilling[key] = r
            if r.finished:  # rejected on submit (e.g. needs more KV pages than a decode worker has)
                engine.requests.pop(r.id, None)
                records.append(failed(item, LineError("invalid_request", r.error or "rejected by the engine")))
                continue
            inflight[r.id] = (item, prep, r)
        if inflight:
            engine.run(max_steps=1)  # one step, with the engine's own stuck check
            steps += 1
        elif not todo:  # every line failed before reaching the engine
            writer.append(records)
            if on_progress is not None:
                on_progress(len(records), 0)
            break
        done_ids = []
        for rid, (item, prep, r) in inflight.items():
            if not r.finished and prep.stop_strings and len(r.output) > checked.get(rid, 0):
                # only the new tokens and the few before them that a stop string could start in
                # (a string of n bytes spans at most n tokens)
                start = max(0, checked.get(rid, 0) - max(len(x.encode()) for x in prep.stop_strings))
                checked[rid] = len(r.output)
                if builder.find_stop(r.output[start:], prep.stop_strings):
                    _end_early(r)
            if r.finished:
                done_ids.append(rid)
                checked.pop(rid, None)
        for rid in done_ids:
            item, prep, r = inflight.pop(rid)
            engine.requests.pop(rid, None)
            tokens["generated_tokens"] += len(r.output)
            if r.status == "failed":
                records.append(failed(item, LineError("engine_error", r.error or "failed in the engine")))
                continue
            res = builder.finalize(prep, r.output, r.finish_reason)
            m = r.metrics()
            n_prompt, n_out = int(len(prep.prompt)), len(res["token_ids"])
            usage = dict(prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=n_prompt + n_out,
                         prompt_tokens_details=dict(cached_tokens=int(r.cached_tokens)))
            tokens["cached_tokens"] += int(r.cached_tokens)
            timing = {k: _round(m.get(k)) for k in ("queue_s", "ttft_s", "tpot_s", "e2e_s")}
            records.append(dict(custom_id=item.custom_id, line=item.line, **res, usage=usage, timing=timing, error=None))
            counts["succeeded"] += 1
            finish_reasons[res["finish_reason"]] += 1
            tokens["prompt_tokens"] += n_prompt
            tokens["completion_tokens"] += n_out
        writer.append(records)
        if on_progress is not None:
            on_progress(len(records), tokens["generated_tokens"])
        records = []
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    compile_s = compile_seconds(engine) - compile0
    gen = tokens["generated_tokens"]
    return dict(
        counts,
        errors_by_code=dict(sorted(errors_by_code.items())),
        finish_reasons=dict(sorted(finish_reasons.items())),
        **tokens,
        engine_steps=steps,
        generation_s=round(wall, 4),
        compile_s=round(compile_s, 4),
        tokens_per_s=round(gen / wall, 2) if wall else 0.0,
        tokens_per_s_excl_compile=round(gen / (wall - compile_s), 2) if wall > compile_s else None,
        cpu_s=round(cpu, 4),  # CPU time of this process (all threads): steadier than wall on a shared machine
        tokens_per_cpu_s=round(gen / cpu, 2) if cpu else None,
    )


# ------------------------------------------------------------------------------------------------
# Engines
# ------------------------------------------------------------------------------------------------

def engine_throughput(engine, prompts: Sequence[np.ndarray], params: Sequence[SamplingParams]) -> dict[str, Any]:
    """serve_offline.py's measurement on this engine: submit every request, Engine.run(), stats()."""
    engine.requests.clear()
    engine.reset_stats()
    cpu0 = time.process_time()
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.submit(p, sp, request_id=("bench", i))
    engine.run()
    cpu = time.process_time() - cpu0
    stats = engine.stats()
    stats.update(cpu_s=cpu, tokens_per_cpu_s=stats["generated_tokens"] / cpu if cpu else None)
    engine.requests.clear()
    return stats
