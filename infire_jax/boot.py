"""Cold start: JAX's persistent compilation cache, and where a process's time to its first token goes.

A second start of the same deployment should compile nothing: :func:`use_compilation_cache` points
JAX's persistent cache at the user's cache directory (one subdirectory per CPU: XLA:CPU code is
built for the host's instruction set and JAX's cache key does not name it) and caches every
program, however small or quick to compile (JAX by default skips programs that compiled in under a
second). Call it before the first compilation; ``infire_jax.load`` and the scripts do.

JAX's persistent cache is keyed on the lowered program, so a hit still traces and lowers it (most of a
second start's warm-up). :class:`CachedProgram` skips both: the engine's programs keep their compiled
executables in ``<cache dir>/executables``, keyed on everything that decides the program (the caller's
description of it, the arguments' structure, types and shardings, the devices, jax / jaxlib / flax,
XLA flags, the CPU and the source of this package), and a later process loads them directly.
What is left of a second start is mostly importing jax and flax; two things shorten it further.
:func:`prefetch_executables` loads the executables the last start of the same deployment used on
background threads (XLA's deserialization runs outside the GIL) while flax and the engine are still
being imported, and :func:`gc_paused` keeps Python's cyclic collector out of those imports.

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
  programs_prefetched  of those, loaded ahead on background threads (:func:`prefetch_executables`)
  programs_lowered programs traced and lowered to StableHLO (compiled or persistent-cache hits)

Loaders report into it with ``with boot.clock.phase("read"): ...``; phases are exclusive (a phase
nested in another is not counted twice, nor is a compilation that happens inside one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import pathlib
import platform
import tempfile
import threading
import time
import warnings
from typing import Any, Callable, Iterator

from infire_jax.machine import cpu_signature

__all__ = ["BootClock", "CachedProgram", "clock", "cpu_signature", "default_cache_dir", "executable_cache_dir",
           "gc_paused", "prefetch_executables", "use_compilation_cache", "process_start"]

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
        self.programs_prefetched = 0  # of those, loaded ahead on prefetch_executables' threads
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


# -- executable cache -------------------------------------------------------------------------
EXECUTABLES = "executables"  # subdirectory of the compilation cache directory (JAX's LRU ignores it)
EXECUTABLES_MAX_BYTES = 2 << 30  # least recently used entries go past this
_FORMAT = "infire_jax-executable-3"
# jax settings that change what a traced program means (the rest is in the arguments and the caller's
# description); read for the cache key only.
_JAX_SETTINGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_numpy_dtype_promotion",
                 "jax_numpy_rank_promotion", "jax_default_prng_impl", "jax_threefry_partitionable",
                 "jax_use_shardy_partitioner", "jax_platforms")
_warned: set[str] = set()


def executable_cache_dir() -> pathlib.Path | None:
    """Where this process keeps compiled executables: ``executables`` inside JAX's persistent cache
    directory (None when that is off, or in a multi-process run, whose programs span processes)."""
    import jax

    path = jax.config.jax_compilation_cache_dir
    if not path or not jax.config.jax_enable_compilation_cache or jax.process_count() > 1:
        return None
    return pathlib.Path(path) / EXECUTABLES


@functools.cache
def _environment() -> str:
    """Everything outside the arguments and the caller's description that decides a compiled
    program: versions, backend, CPU, XLA flags, jax settings, usable CPUs (the CPU kernels' thread
    count) and this package's source (its programs are traced from it)."""
    import jax
    import jaxlib
    import numpy as np
    from importlib import metadata

    versions = []
    for name in ("flax", "ml_dtypes"):
        try:
            versions.append(metadata.version(name))
        except metadata.PackageNotFoundError:
            versions.append("-")
    client = jax.devices()[0].client
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    source = hashlib.sha256()
    package = pathlib.Path(__file__).resolve().parent
    for f in sorted(p for pattern in ("*.py", "*.cc", "*.h") for p in package.rglob(pattern)):
        source.update(str(f.relative_to(package)).encode() + b"\0" + f.read_bytes() + b"\0")
    return repr((
        _FORMAT, jax.__version__, jaxlib.__version__, *versions, np.__version__, client.platform,
        client.platform_version, cpu_signature(), platform.machine(), os.environ.get("XLA_FLAGS", ""),
        [(name, str(getattr(jax.config, name, None))) for name in _JAX_SETTINGS], cpus, source.hexdigest(),
    ))


def _argument_signature(args: tuple) -> tuple[Any, list[str]]:
    """(tree structure of (args, {}) as a compiled program takes them, one line per leaf: type,
    weak type, sharding and its device order)."""
    import jax
    import numpy as np

    leaves, tree = jax.tree.flatten((tuple(args), {}))
    lines = []
    for x in leaves:
        if isinstance(x, jax.Array):
            sh = x.sharding
            devices = [f"{d.platform}:{d.id}" for d in (sh.mesh.devices.flat if hasattr(sh, "mesh")
                                                         else sorted(sh.device_set, key=lambda d: d.id))]
            lines.append(f"{x.aval!r} {sh!r} {devices}")
        else:  # numpy arrays and Python scalars: traced by type, placed by the program's in_shardings
            lines.append(f"{type(x).__name__} {np.shape(x)} {np.result_type(x)}")
    return tree, lines


def _warn_once(what: str, message: str) -> None:
    if what not in _warned:
        _warned.add(what)
        warnings.warn(f"infire_jax executable cache: {message}", RuntimeWarning, stacklevel=4)


class CachedProgram:
    """A jitted program whose compiled executable outlives the process.

    ``build()`` returns the ``jax.jit`` object; ``description`` must name everything besides the
    arguments that decides what it traces to (the model graph, layout, program key, ...). The first
    call looks the executable up in :func:`executable_cache_dir` (or takes it from a running
    :func:`prefetch_executables`); on a miss it lowers and compiles (through JAX's persistent cache, as
    a plain call would) and stores the executable if it was compiled afresh. Later calls run the
    executable. Without a cache directory it is the jitted function. A key mismatch is a miss; an
    unreadable entry is a miss with one warning (the entry is removed); the loaded executable still
    checks its arguments' types and shardings on every call. Entries are trusted as JAX trusts its own
    cache: loading one runs code from the cache directory."""

    def __init__(self, build: Callable[[], Any], description: Any):
        self._build = build
        self._description = description
        self._jitted: Any = None
        self._call: Callable[..., Any] | None = None

    @property
    def jitted(self) -> Any:
        """The jax.jit object (built on first use: a program loaded from the cache never needs it)."""
        if self._jitted is None:
            self._jitted = self._build()
        return self._jitted

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        return self.jitted.lower(*args, **kwargs)

    def __call__(self, *args: Any) -> Any:
        if self._call is None:
            self._call = self._resolve(args)
        return self._call(*args)

    def _resolve(self, args: tuple) -> Callable[..., Any]:
        directory = executable_cache_dir()
        if directory is None:
            return self.jitted
        tree, leaves = _argument_signature(args)
        text = "\n".join([_environment(), repr(self._description), str(tree), *leaves])
        key = hashlib.sha256(text.encode()).hexdigest()
        path = directory / f"{key}.exe"
        loaded = _load(path, key)
        if loaded is not None:
            with clock._lock:
                clock.programs_loaded += 1
            _record(key)
            return loaded
        lowered = self.jitted.lower(*args)
        compiles, hits = clock.thread_compiles()
        compiled = lowered.compile()
        after = clock.thread_compiles()
        # Stored only if freshly compiled here: jaxlib serializes an executable that JAX's persistent cache
        # (or an earlier compile in this process) supplied without its machine code (XLA:CPU: "Function ...
        # not found" when run). A persistent-cache hit stays a hit on later starts, as without this cache.
        if after[0] > compiles and after[1] == hits and _store(path, key, compiled, tree):
            _record(key)
        return compiled


class _LoadedProgram:
    """A loaded executable, called with the program's own argument pytrees.

    Entries are deserialized against flat argument and result lists (one leaf each), so loading needs
    none of the pytree node classes (flax's State, ...) and can run on a prefetch thread while flax is
    still being imported; each call flattens its arguments (the cache key fixed their structure) and
    rebuilds the result tree."""

    __slots__ = ("_flat", "_out_tree")

    def __init__(self, flat: Any, out_tree: Any):
        self._flat = flat
        self._out_tree = out_tree

    def __call__(self, *args: Any) -> Any:
        import jax

        return jax.tree.unflatten(self._out_tree, self._flat(*jax.tree.leaves(args)))


def _deserialize(path: pathlib.Path, key: str) -> tuple[Any, bytes] | None:
    """(flat executable, pickled (in_tree, out_tree)) of the entry at path; None if there is none.
    Raises on an unreadable entry. Needs jax and, for programs that call them, the CPU kernels only."""
    import pickle

    import jax
    from jax.experimental import serialize_executable

    try:
        blob = path.read_bytes()
    except OSError:
        return None
    header, payload = pickle.loads(blob)
    if header["format"] != _FORMAT or header["key"] != key:
        raise ValueError("its key does not match its name")
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise ValueError("checksum mismatch")
    if header["cpu_kernels"]:
        from infire_jax.kernels import cpu

        if not cpu.available():
            raise ValueError("it calls infire_jax's CPU kernels, which are unavailable")
    devices = {d.id: d for d in jax.devices()}
    devices = [devices[i] for i in header["devices"]]  # the program's device assignment, in order
    flat_in = jax.tree.structure((tuple(range(header["in_leaves"])), {}))
    flat_out = jax.tree.structure(list(range(header["out_leaves"])))
    flat = serialize_executable.deserialize_and_load(payload, flat_in, flat_out, backend=devices[0].client,
                                                     execution_devices=devices)
    return flat, header["trees"]


def _load(path: pathlib.Path, key: str) -> Any:
    """The executable stored at path (prefetched, or read now), or None (missing, or unreadable: one
    warning, entry removed)."""
    import pickle

    try:
        entry = _prefetch.take(key) if _prefetch is not None else _Prefetch.MISSING
        prefetched = entry is not _Prefetch.MISSING
        if not prefetched:
            entry = _deserialize(path, key)
        if entry is None:
            return None
        flat, trees = entry
        _, out_tree = pickle.loads(trees)
        if prefetched:
            with clock._lock:
                clock.programs_prefetched += 1
    except Exception as e:  # noqa: BLE001 - whatever is wrong with an entry, compiling again is correct
        _warn_once("corrupt", f"ignoring unreadable entry {path} ({type(e).__name__}: {e}); compiling it again")
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used: evicted last
    return _LoadedProgram(flat, out_tree)


def _store(path: pathlib.Path, key: str, compiled: Any, tree: Any) -> bool:
    """Write the executable (atomically; best effort: a failure costs only the next start's lowering).
    Whether it was stored."""
    import pickle

    from jax.experimental import serialize_executable

    from infire_jax.kernels import cpu

    try:
        payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    except (NotImplementedError, ValueError):  # programs jax cannot serialize (closed-over constants, ...)
        return False
    if in_tree != tree:
        return False
    tmp = None
    try:
        devices = [d.id for d in compiled.runtime_executable().local_devices()]
        header = dict(format=_FORMAT, key=key, sha256=hashlib.sha256(payload).hexdigest(), devices=devices,
                      in_leaves=in_tree.num_leaves, out_leaves=out_tree.num_leaves,
                      trees=pickle.dumps((in_tree, out_tree)), cpu_kernels=cpu.registered())
        blob = pickle.dumps((header, payload))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
        tmp = None
        _evict(path.parent, EXECUTABLES_MAX_BYTES)
        return True
    except Exception as e:  # noqa: BLE001 - an unwritable cache must not fail the program
        _warn_once("store", f"cannot store executables in {path.parent} ({type(e).__name__}: {e})")
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return False


# -- prefetch: a start loads the executables the last start of its deployment used ---------------
BOOT_SETS = "boot"  # subdirectory of the executables directory: one key list per deployment


class _Prefetch:
    """Background loading of one deployment's executables (see :func:`prefetch_executables`)."""

    MISSING = object()  # take(): this key is not being prefetched

    def __init__(self, deployment: str, workers: int):
        self.deployment = deployment
        self.path: pathlib.Path | None = None  # the deployment's key list (known once the backend is up)
        self._ready = threading.Event()  # set once the key list is read and every load is queued
        self._futures: dict[str, Any] = {}
        self._environment = ""
        self._keys: list[str] = []  # this environment's keys, in first-use order
        self._lock = threading.Lock()
        self._workers = workers
        self.error: BaseException | None = None
        threading.Thread(target=self._start, name="infire_jax-prefetch", daemon=True).start()

    def _start(self) -> None:
        import concurrent.futures
        import json

        try:
            directory = executable_cache_dir()  # initializes the backend (here, not on the caller's thread)
            if directory is None:  # a multi-process run
                return
            self.path = directory / BOOT_SETS / f"{hashlib.sha256(self.deployment.encode()).hexdigest()[:32]}.json"
            self._environment = hashlib.sha256(_environment().encode()).hexdigest()
            try:
                saved = json.loads(self.path.read_text())
            except (OSError, ValueError):
                saved = {}
            if saved.get("environment") == self._environment:
                self._keys = [k for k in saved.get("keys", []) if isinstance(k, str)]
            if self._keys:
                # Not a `with` block: the pool must outlive this thread; idle workers exit at shutdown.
                pool = concurrent.futures.ThreadPoolExecutor(self._workers, thread_name_prefix="infire_jax-load")
                for key in self._keys:  # first used, first loaded
                    self._futures[key] = pool.submit(_deserialize, directory / f"{key}.exe", key)
                pool.shutdown(wait=False)
        except BaseException as e:  # noqa: BLE001 - prefetching is an optimisation: the calls load themselves
            self.error = e
        finally:
            self._ready.set()

    def take(self, key: str) -> Any:
        """The prefetched entry for key (as _deserialize returns it, or raising what it raised), or MISSING."""
        self._ready.wait()
        future = self._futures.pop(key, None)
        return self.MISSING if future is None else future.result()

    def record(self, key: str) -> None:
        """Note that this start used key (saved at once: a start that dies later still taught the next one)."""
        import json

        self._ready.wait()
        with self._lock:
            if key in self._keys or not self._environment or self.path is None:
                return
            self._keys.append(key)
            text = json.dumps(dict(deployment=self.deployment, environment=self._environment, keys=self._keys))
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, self.path)
            tmp = None
        except OSError as e:
            _warn_once("store", f"cannot store the boot set {self.path} ({e})")
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


_prefetch: _Prefetch | None = None


def prefetch_executables(deployment: str, workers: int = 1) -> bool:
    """Start loading, on background threads, the executables that the last start of ``deployment``
    took from (or put into) the executable cache, in the order it used them; this start's programs then
    find them loaded. Any string naming what decides the programs serves as ``deployment`` (model,
    meshes, dtype, engine options). Call it after :func:`use_compilation_cache` and after any setting
    that must precede the backend (it initializes the backend), ideally before importing the rest of
    infire_jax and flax: loading runs in native code and overlaps those imports. Every program this
    process then resolves through the cache is recorded for the next start. An entry the keys name that
    is gone or stale is skipped; a failed prefetch only means the programs load themselves. One
    deployment per process (a second call is refused). Returns whether prefetching started (False
    without an executable cache)."""
    global _prefetch

    if _prefetch is not None:
        if _prefetch.deployment == deployment:
            return True
        raise ValueError(f"prefetch_executables: this process already prefetches {_prefetch.deployment!r}; "
                         "one deployment per process (start another process for another deployment)")
    import jax
    from jax.experimental import serialize_executable  # noqa: F401  (imported here, not on the threads)

    if not jax.config.jax_compilation_cache_dir or not jax.config.jax_enable_compilation_cache:
        return False
    _prefetch = _Prefetch(deployment, workers)
    return True


def _record(key: str) -> None:
    if _prefetch is not None:
        _prefetch.record(key)


def _evict(directory: pathlib.Path, max_bytes: int) -> None:
    """Remove the least recently used entries until the directory holds at most max_bytes."""
    entries = []
    for f in directory.glob("*.exe"):
        with contextlib.suppress(OSError):
            st = f.stat()
            entries.append((st.st_mtime, st.st_size, f))
    total = sum(size for _, size, _ in entries)
    for _, size, f in sorted(entries):
        if total <= max_bytes:
            break
        with contextlib.suppress(OSError):
            f.unlink()
        total -= size
