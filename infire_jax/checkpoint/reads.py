"""How many checkpoint bytes this process read: the measure of "each process reads only its shards".

    with reads.counting() as counter:
        model = infire_jax.load(model_dir, mesh="pp=2,tp=2")
    counter.bytes_read, counter.needed_bytes

The loaders (hf.py, compressed.py, store.py) report into the counter of the innermost `counting()`
block (a context variable, as sharding.use_layout does for layouts); outside one they count nothing.
`bytes_read` is what was taken from the files (for safetensors: the byte ranges sliced out of each
tensor, in the checkpoint's dtype; for compressed checkpoints: whole tensor blobs; for orbax: the
bytes tensorstore read from disk), `needed_bytes` the checkpoint bytes of the elements this
process's shards hold (each element once, however many local devices hold it).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Iterator

__all__ = ["ReadCounter", "counting", "add"]


@dataclasses.dataclass
class ReadCounter:
    bytes_read: int = 0
    needed_bytes: int = 0
    tensors_read: int = 0  # checkpoint tensors (or orbax arrays) this process read any part of
    whole_reads: int = 0  # tensors read whole where a part was needed (a transform, a compressed blob)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


_COUNTER: contextvars.ContextVar[ReadCounter | None] = contextvars.ContextVar("infire_reads", default=None)


@contextlib.contextmanager
def counting() -> Iterator[ReadCounter]:
    """Count the checkpoint reads of the loads inside the block."""
    counter = ReadCounter()
    token = _COUNTER.set(counter)
    try:
        yield counter
    finally:
        _COUNTER.reset(token)


def add(bytes_read: int = 0, needed_bytes: int = 0, tensors_read: int = 0, whole_reads: int = 0) -> None:
    counter = _COUNTER.get()
    if counter is not None:
        counter.bytes_read += int(bytes_read)
        counter.needed_bytes += int(needed_bytes)
        counter.tensors_read += int(tensors_read)
        counter.whole_reads += int(whole_reads)
