"""Cold start: JAX's persistent compilation cache, and where a process's time to its first token goes.

A second start of the same deployment should compile nothing: :func:`use_compilation_cache` points
JAX's persistent cache at the user's cache directory (one subdirectory per CPU: XLA:CPU code is
built for the host's instruction set and JAX's cache key does not name it) and caches every
program, however small or quick to compile (JAX by default skips programs that compiled in under a
second). Call it before the first compilation; ``infire_jax.load`` and the scripts do.

The engine's compiled programs also outlive the process as executables (``infire_jax.executables``), and
:func:`gc_paused` keeps Python's cyclic collector out of a process's imports.

:data:`clock` (one per process) collects the boot breakdown the scripts report as ``"boot"``:

  read_s           checkpoint bytes read from disk (safetensors / containers / orbax)
  convert_s        host-side conversion (dtype casts; Huffman decode + palette12 re-encoding)
  place_s          putting arrays on the devices (the rest of building the parameters)
  compile_s        XLA compilation, or loading a program from the persistent cache
  first_token_s    process start (as the OS recorded it) to the first generated token
  programs_compiled  XLA programs this process compiled: programs it needed minus those the
                   persistent cache supplied (counted from jax.monitoring events)
  programs_from_cache  programs the persistent cache or the executable cache supplied
  programs_loaded  of those, executables loaded from the executable cache (neither traced nor lowered)
  programs_prefetched  of those, loaded ahead on background threads (``executables.prefetch``)
  programs_lowered programs traced and lowered to StableHLO (compiled or persistent-cache hits)

Loaders report into it with ``with boot.clock.phase("read"): ...``; phases are exclusive (a phase
nested in another is not counted twice, nor is a compilation that happens inside one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pathlib
import platform
import threading
import time
from typing import Any, Iterator

from infire_jax.machine import cpu_signature

__all__ = ["BootClock", "clock", "cpu_signature", "default_cache_dir", "gc_paused", "use_compilation_cache",
           "process_start"]

PHASES = ("read", "convert", "place")
# jax.monitoring event names (public strings; recorded by jax for every program it compiles or loads
# from the persistent cache, and for every persistent-cache hit).
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def _user_cache() -> pathlib.Path:
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "infire_jax"


def default_cache_dir() -> pathlib.Path:
    """~/.cache/infire_jax/xla/<cpu>: JAX keys its cache on the program, jax/jaxlib version and
    devices, not on the CPU's instruction set, so machines sharing a home directory get their own."""
    key = hashlib.sha256((cpu_signature() + platform.machine()).encode()).hexdigest()[:12]
    return _user_cache() / "xla" / key


CACHE_MAX_BYTES = 4 << 30  # least recently used entries go past this; also makes JAX lock the directory


def use_compilation_cache(path: str | os.PathLike | None = "default") -> pathlib.Path | None:
    """Turn on JAX's persistent compilation cache at ``path`` ("default": :func:`default_cache_dir`;
    None: leave JAX's own setting alone) with no size or compile-time threshold, so every program
    is cached. The directory is bounded (CACHE_MAX_BYTES, least recently used entries evicted),
    which also makes concurrent processes take JAX's file lock around writes. Idempotent; call
    before the first compilation. Returns the directory in use."""
    import jax

    if path is None:
        current = jax.config.jax_compilation_cache_dir
        return pathlib.Path(current) if current else None
    path = default_cache_dir() if str(path) == "default" else pathlib.Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    if jax.config.jax_compilation_cache_dir not in (None, str(path)):
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()  # JAX opens its cache once: make it reopen at the new place
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size threshold
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    return path


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused inside: for a process's imports and set-up. Importing jax,
    flax and infire_jax allocates about a million long-lived objects and next to no cyclic garbage, yet
    sets off hundreds of collections that walk them (measured here: 0.07 s of a 0.7 s second start). On
    the way out the survivors are frozen (gc.freeze: later collections skip them) and collection resumes
    as it was. Keep compilation outside: tracing does make cyclic garbage."""
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def process_start() -> float:
    """This process's start as a time.time() value: the kernel's record (Linux), else the import of
    this module."""
    try:
        fields = pathlib.Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = float(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: starttime after boot
        uptime = float(pathlib.Path("/proc/uptime").read_text().split()[0])  # 10 ms resolution
        return time.time() - (uptime - started)
    except (OSError, ValueError, IndexError):
        return _IMPORTED


_IMPORTED = time.time()


@dataclasses.dataclass
class _Frame:
    name: str
    start: float
    excluded: float = 0.0


class BootClock:
    """Per-process boot breakdown (see the module doc). Thread-safe; phases nest per thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self.seconds: dict[str, float] = {p: 0.0 for p in PHASES}
        self.compile_s = 0.0
        self.programs_requested = 0
        self.cache_hits = 0
        self.programs_lowered = 0  # traced and lowered to StableHLO (a persistent-cache hit needs this too)
        self.programs_loaded = 0  # executables loaded from the executable cache: neither lowered nor compiled
        self.programs_prefetched = 0  # of those, loaded ahead on executables.prefetch's thread
        self.first_token: float | None = None  # time.perf_counter() of the first generated token
        self._warming_up = 0
        self._listening = False
        # time.perf_counter() at process start: perf_counter is what the engine's request times use
        self._start_perf = time.perf_counter() - (time.time() - process_start())

    # -- compilation events -----------------------------------------------------------------
    def start(self) -> None:
        """Listen to JAX's compilation events (idempotent; done when this module is imported, which
        importing infire_jax does: programs compiled before that are not counted)."""
        with self._lock:
            if self._listening:
                return
            self._listening = True
        import jax

        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)

    def _on_duration(self, event: str, duration: float, **_: Any) -> None:
        if event == _LOWER_EVENT:
            with self._lock:
                self.programs_lowered += 1
            return
        if event != _COMPILE_EVENT:
            return
        with self._lock:
            self.compile_s += duration
            self.programs_requested += 1
        self._local.compiles = getattr(self._local, "compiles", 0) + 1  # (jax reports in the compiling thread)
        stack = getattr(self._local, "stack", None)
        if stack:  # a compilation inside a loading phase counts as compilation only
            stack[-1].excluded += duration

    def _on_event(self, event: str, **_: Any) -> None:
        if event == _CACHE_HIT_EVENT:
            with self._lock:
                self.cache_hits += 1
            self._local.hits = getattr(self._local, "hits", 0) + 1

    def program_loaded(self, prefetched: bool) -> None:
        """Count an executable loaded from the executable cache (ahead, on a prefetch thread, or not)."""
        with self._lock:
            self.programs_loaded += 1
            self.programs_prefetched += int(prefetched)

    def thread_compiles(self) -> tuple[int, int]:
        """(backend compiles, persistent-cache hits among them) this thread has seen."""
        return getattr(self._local, "compiles", 0), getattr(self._local, "hits", 0)

    # -- phases ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the time inside as `name` (one of PHASES), minus nested phases and compilations."""
        if name not in self.seconds:
            raise ValueError(f"unknown boot phase {name!r}; known: {PHASES}")
        stack = self._local.__dict__.setdefault("stack", [])
        frame = _Frame(name, time.perf_counter())
        stack.append(frame)
        try:
            yield
        finally:
            stack.pop()
            elapsed = time.perf_counter() - frame.start
            with self._lock:
                self.seconds[name] += elapsed - frame.excluded
            if stack:
                stack[-1].excluded += elapsed

    def mark_first_token(self, when: float | None = None) -> None:
        """Record the first generated token of this process (perf_counter time; later calls and
        tokens of warm-up requests are ignored)."""
        if self.first_token is None and not self._warming_up:
            self.first_token = time.perf_counter() if when is None else when

    @contextlib.contextmanager
    def warming_up(self) -> Iterator[None]:
        """Tokens generated inside (warm-up requests) do not count as the first token."""
        self._warming_up += 1
        try:
            yield
        finally:
            self._warming_up -= 1

    # -- report ----------------------------------------------------------------------------
    @property
    def programs_compiled(self) -> int:
        return self.programs_requested - self.cache_hits

    @property
    def programs_prepared(self) -> int:
        """Programs made ready to run: compiled, taken from the persistent cache or loaded from the
        executable cache (a call during which this changed measured that, not the call)."""
        return self.programs_requested + self.programs_loaded

    def since_start(self, when: float | None = None) -> float:
        """Seconds from process start to `when` (perf_counter; default now)."""
        return (time.perf_counter() if when is None else when) - self._start_perf

    def report(self) -> dict[str, Any]:
        """The "boot" block of the scripts' JSON."""
        first = self.since_start(self.first_token) if self.first_token is not None else None
        return dict(
            read_s=round(self.seconds["read"], 4),
            convert_s=round(self.seconds["convert"], 4),
            place_s=round(self.seconds["place"], 4),
            compile_s=round(self.compile_s, 4),
            first_token_s=None if first is None else round(first, 4),
            programs_compiled=self.programs_compiled,
            programs_from_cache=self.cache_hits + self.programs_loaded,
            programs_loaded=self.programs_loaded,
            programs_prefetched=self.programs_prefetched,
            programs_lowered=self.programs_lowered,
        )


clock = BootClock()
clock.start()
