"""What a weight stored in an encoded form (compressed, quantised) offers the code that multiplies by it.

Model code holds such weights where a plain array would be (palette12: compression/jax_decode.py;
INT4 experts: models/moe.py) and never inspects them: `kernels.dispatch` and `models.layers.materialize`
use these declared contracts.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["EncodedWeight", "RowEncodedWeight"]


@runtime_checkable
class EncodedWeight(Protocol):
    """A weight kept encoded on the device and decoded inside the step."""

    def decode_f32(self) -> Any:
        """The weight's values as a float32 array of its logical shape."""
        ...


@runtime_checkable
class RowEncodedWeight(EncodedWeight, Protocol):
    """An encoded weight a kernel can multiply by without decoding it first (palette12)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def as_rows(self, contracted: int) -> tuple | None:
        """The kernel's operands for the weight viewed as (N, K), K its last `contracted` axes, or
        None where its stored form has no such view (blocked over a mesh axis)."""
        ...
