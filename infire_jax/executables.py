"""The engine's compiled programs, kept across processes as executables, and loaded ahead at start-up.

JAX's persistent compilation cache (boot.use_compilation_cache) is keyed on the lowered program, so a
hit still traces and lowers it (most of a second start's warm-up). :class:`CachedProgram` skips both:
the engine's programs keep their compiled executables in ``<compilation cache dir>/executables``, keyed
on everything that decides the program (the caller's description of it, the arguments' structure,
types and shardings, the devices, jax / jaxlib / flax, XLA flags, the CPU and the source of this
package), and a later process loads them directly. A program JAX's persistent cache supplied is compiled
once more outside it before it is stored (jaxlib serializes what that cache supplies without its machine
code). An edit to the source changes every key; a program
that still lowers to what an entry was compiled from (same platform, description, compiler options
and StableHLO) takes that entry over on its first start after the edit instead of compiling.

What is left of a second start is mostly importing jax and flax. :func:`prefetch` loads the executables
the last start of the same deployment used, on a background thread (XLA's deserialization runs outside
the GIL), while flax and the engine are still being imported.

Entries are trusted as JAX trusts its own cache: loading one runs code from the cache directory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import pathlib
import platform
import tempfile
import threading
import warnings
from typing import Any, Callable

from infire_jax import boot
from infire_jax.kernels import cpu
from infire_jax.machine import cpu_signature

__all__ = ["CachedProgram", "EXECUTABLES", "executable_cache_dir", "prefetch"]

EXECUTABLES = "executables"  # subdirectory of the compilation cache directory (JAX's LRU ignores it)
EXECUTABLES_MAX_BYTES = 2 << 30  # least recently used entries go past this
_FORMAT = "infire_jax-executable-4"
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
def _platform() -> str:
    """Everything outside the program, the arguments and the caller's description that decides a
    compiled executable: versions, backend, CPU, XLA flags, jax settings and usable CPUs (the CPU
    kernels' thread count)."""
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
    return repr((
        _FORMAT, jax.__version__, jaxlib.__version__, *versions, np.__version__, client.platform,
        client.platform_version, cpu_signature(), platform.machine(), os.environ.get("XLA_FLAGS", ""),
        [(name, str(getattr(jax.config, name, None))) for name in _JAX_SETTINGS], cpus,
    ))


@functools.cache
def _source() -> str:
    """sha256 of this package's source: the engine's programs are traced from it."""
    source = hashlib.sha256()
    package = pathlib.Path(__file__).resolve().parent
    for f in sorted(p for pattern in ("*.py", "*.cc", "*.h") for p in package.rglob(pattern)):
        source.update(str(f.relative_to(package)).encode() + b"\0" + f.read_bytes() + b"\0")
    return source.hexdigest()


def _environment() -> str:
    """The platform and this package's source: with the caller's description and the arguments, what
    names a program without tracing it."""
    return f"{_platform()} {_source()}"


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
    arguments that decides what it traces to and how its compiler options are chosen (the model graph,
    layout, program key, ...); ``compiler_options()``, if given, returns the options ``build`` compiles
    with (asked for only when the program is lowered). The first call looks the executable up in
    :func:`executable_cache_dir` (or takes it from a running :func:`prefetch`); on a miss it lowers
    the program and, if it lowers to what an entry was compiled from (the usual case after an edit to
    this package, which changes every key), takes that entry over; else it compiles (through JAX's
    persistent cache, and again outside it if that cache supplied it) and stores the executable. Later
    calls run the executable. Without a cache directory it is the jitted function. A key mismatch is a miss; an
    unreadable entry is a miss with one warning (the entry is removed); the loaded executable still
    checks its arguments' types and shardings on every call. Entries are trusted as JAX trusts its own
    cache: loading one runs code from the cache directory."""

    def __init__(self, build: Callable[[], Any], description: Any,
                 compiler_options: Callable[[], dict[str, Any]] | None = None):
        self._build = build
        self._description = description
        self._compiler_options = compiler_options
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
            _record(key)
            return loaded
        lowered = self.jitted.lower(*args)
        # The lowered program itself: after an edit to this package's source (a new key for every program)
        # most programs lower to what they were, and the executable compiled from that is taken over.
        options = sorted(self._compiler_options().items()) if self._compiler_options else []
        program = hashlib.sha256("\n".join([_platform(), repr(self._description), repr(options), str(lowered.in_tree),
                                            str(lowered.out_tree), lowered.as_text()]).encode()).hexdigest()
        adopted = _adopt(directory, program, path, key)
        if adopted is not None:
            _record(key)
            return adopted
        compiles, hits = boot.clock.thread_compiles()
        compiled = lowered.compile()
        after = boot.clock.thread_compiles()
        if after[1] > hits and _pickled(lowered.out_tree) is not None:
            # JAX's persistent cache supplied it, and jaxlib serializes such an executable without its machine
            # code (XLA:CPU: "Function ... not found" when run): compiled once more outside that cache, so that
            # it can be stored (else it would stay a persistent-cache hit, traced and lowered, on every start).
            compiled = _compile_afresh(lowered)
            after = boot.clock.thread_compiles()
        if after[0] > compiles and _store(path, key, compiled, tree):
            _name_program(directory, program, key)
            _record(key)
        return compiled


_AFRESH = threading.Lock()


# An XLA option at its default value: given explicitly, it makes JAX compile again rather than return the
# executable its in-memory cache holds for the same program and options.
_RECOMPILE = {"xla_embed_ir_in_executable": False}


def _compile_afresh(lowered: Any) -> Any:
    """`lowered` compiled again with JAX's persistent cache switched off. The switch is process-wide: a
    compile on another thread meanwhile skips that cache too (slower, never wrong)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    with _AFRESH:
        compilation_cache.reset_cache()  # JAX decides once whether its cache is used: make it decide again
        jax.config.update("jax_enable_compilation_cache", False)
        try:
            return lowered.compile(compiler_options=_RECOMPILE)
        finally:
            jax.config.update("jax_enable_compilation_cache", True)
            compilation_cache.reset_cache()


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


def _read_entry(path: pathlib.Path, key: str) -> tuple[dict, bytes]:
    """(header, payload) of the entry at path, checked against its name and checksum. Raises OSError
    when there is none, another exception when it is unreadable."""
    import pickle

    header, payload = pickle.loads(path.read_bytes())
    if header["format"] != _FORMAT or header["key"] != key:
        raise ValueError("its key does not match its name")
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise ValueError("checksum mismatch")
    return header, payload


def _deserialize(path: pathlib.Path, key: str) -> tuple[Any, bytes] | None:
    """(flat executable, its pickled result tree) of the entry at path; None if there is none.
    Raises on an unreadable entry. Needs jax and, for programs that call them, the CPU kernels only."""
    import jax
    from jax.experimental import serialize_executable

    try:
        header, payload = _read_entry(path, key)
    except OSError:
        return None
    if header["cpu_kernels"]:
        if not cpu.available():
            raise ValueError("it calls infire_jax's CPU kernels, which are unavailable")
    devices = {d.id: d for d in jax.devices()}
    devices = [devices[i] for i in header["devices"]]  # the program's device assignment, in order
    flat_in = jax.tree.structure((tuple(range(header["in_leaves"])), {}))
    flat_out = jax.tree.structure(list(range(header["out_leaves"])))
    flat = serialize_executable.deserialize_and_load(payload, flat_in, flat_out, backend=devices[0].client,
                                                     execution_devices=devices)
    return flat, header["out_tree"]


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
        flat, out_tree = entry
        out_tree = pickle.loads(out_tree)
    except Exception as e:  # noqa: BLE001 - whatever is wrong with an entry, compiling again is correct
        _warn_once("corrupt", f"ignoring unreadable entry {path} ({type(e).__name__}: {e}); compiling it again")
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used: evicted last
    boot.clock.program_loaded(prefetched)
    return _LoadedProgram(flat, out_tree)


def _store(path: pathlib.Path, key: str, compiled: Any, tree: Any) -> bool:
    """Write the executable (best effort: a failure costs only the next start's lowering). Whether it was
    stored."""
    from jax.experimental import serialize_executable

    try:
        payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    except (NotImplementedError, ValueError):  # programs jax cannot serialize (closed-over constants, ...)
        return False
    if in_tree != tree:
        return False
    result_tree = _pickled(out_tree)
    if result_tree is None:
        return False
    devices = [d.id for d in compiled.runtime_executable().local_devices()]
    header = dict(format=_FORMAT, key=key, sha256=hashlib.sha256(payload).hexdigest(), devices=devices,
                  in_leaves=in_tree.num_leaves, out_leaves=out_tree.num_leaves, out_tree=result_tree,
                  cpu_kernels=cpu.registered())
    return _write_entry(path, header, payload)


def _pickled(tree: Any) -> bytes | None:
    """A result tree as an entry keeps it (the argument tree is not kept: the key fixes it), or None when
    it cannot be pickled (node data holding devices, ...): such a program is not stored."""
    import pickle

    try:
        return pickle.dumps(tree)
    except Exception:  # noqa: BLE001 - any pickling failure means: not storable
        return None


def _write_entry(path: pathlib.Path, header: dict, payload: bytes) -> bool:
    """Write one entry atomically, then keep the directory within EXECUTABLES_MAX_BYTES."""
    import pickle

    if _write_atomically(path, pickle.dumps((header, payload))):
        _evict(path.parent, EXECUTABLES_MAX_BYTES)
        return True
    return False


def _write_atomically(path: pathlib.Path, data: bytes) -> bool:
    """Best effort: False (after one warning per process) if the cache directory is not writable."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return True
    except OSError as e:  # an unwritable cache must not fail the program
        _warn_once("store", f"cannot write to {path.parent} ({type(e).__name__}: {e})")
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return False


# -- a program lowered to what an entry was compiled from: the entry is taken over -----------------
PROGRAMS = "programs"  # subdirectory: one file per lowered program, naming the entry compiled from it


def _name_program(directory: pathlib.Path, program: str, key: str) -> None:
    _write_atomically(directory / PROGRAMS / program, key.encode())


def _adopt(directory: pathlib.Path, program: str, path: pathlib.Path, key: str) -> Any:
    """The executable compiled from `program` under an earlier key (before an edit to this package's
    source), stored again under `key` and loaded; None if there is none (or it is gone or unreadable)."""
    name = directory / PROGRAMS / program
    try:
        old_key = name.read_text().strip()
        header, payload = _read_entry(directory / f"{old_key}.exe", old_key)
    except Exception:  # noqa: BLE001 - gone, evicted or unreadable: compile as without it
        with contextlib.suppress(OSError):
            name.unlink()
        return None
    if not _write_entry(path, dict(header, key=key), payload):
        return None
    _name_program(directory, program, key)
    return _load(path, key)


# -- prefetch: a start loads the executables the last start of its deployment used ---------------
BOOT_SETS = "boot"  # subdirectory of the executables directory: one key list per deployment


class _Prefetch:
    """Background loading of one deployment's executables (see :func:`prefetch`)."""

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
        except Exception as e:  # noqa: BLE001 - prefetching is an optimisation: the calls load themselves
            _warn_once("prefetch", f"prefetching {self.deployment!r} failed ({type(e).__name__}: {e}); "
                                   "its programs load as they are needed")
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
        _write_atomically(self.path, text.encode())


_prefetch: _Prefetch | None = None


def prefetch(deployment: str, workers: int = 1) -> bool:
    """Start loading, on background threads, the executables that the last start of ``deployment``
    took from (or put into) the executable cache, in the order it used them; this start's programs then
    find them loaded. Any string naming what decides the programs serves as ``deployment`` (model,
    meshes, dtype, engine options). Call it after :func:`boot.use_compilation_cache` and after any setting
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
        raise ValueError(f"executables.prefetch: this process already prefetches {_prefetch.deployment!r}; "
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
